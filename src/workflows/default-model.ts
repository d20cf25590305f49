// The model `npm start` (and `moe serve` without --model) runs: the project's own instruction-tuned MoE, committed in
// models/ so that it loads with no download. How it was made and how well it does: docs/instruct-tuning.md.

import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The package's models/ folder (this file runs as dist/src/workflows/default-model.js). */
const MODELS_DIR = fileURLToPath(new URL('../../../models/', import.meta.url));

export const DEFAULT_MODEL_FILE = 'moe-ts-instruct-moe-f16.gguf';

/** Where the default model is; MOE_DEFAULT_MODEL overrides it (a path to any model moe-ts loads). */
export function defaultModelFile(): string {
  return process.env.MOE_DEFAULT_MODEL || path.join(MODELS_DIR, DEFAULT_MODEL_FILE);
}

/** Path of the default model and a line telling the user what it is. Throws when the file is missing. */
export async function defaultModelPath(): Promise<{ path: string; note: string }> {
  const file = defaultModelFile();
  if (!fs.existsSync(file)) {
    throw new Error(
      `the default model ${file} is missing` +
        (process.env.MOE_DEFAULT_MODEL ? ' (MOE_DEFAULT_MODEL names it)' : ' (it ships in the repository\'s models/ folder; a git checkout without it, or a Git LFS pointer, cannot run `moe start`)') +
        '. Run a model of your own with: moe chat --model <file.gguf | hf-dir>',
    );
  }
  const note = process.env.MOE_DEFAULT_MODEL
    ? `moe: default model ${file} (MOE_DEFAULT_MODEL)`
    : 'moe: moe-ts-instruct-moe, the project\'s own tiny MoE (7.4M parameters, 8 experts, top-2): pretrained on 1.5M\n' +
      '     tokens of software documentation in en/fr/de/it/es and instruction-tuned on `moe data instruct`. It is far\n' +
      '     too small to know much: it answers in the form it was taught, rarely with the right content\n' +
      '     (docs/instruct-tuning.md). Run your own model with: moe chat --model <file.gguf | hf-dir>';
  return { path: file, note };
}
