// The model `npm start` runs. No trained model ships yet (training and instruction tuning are later issues), so
// moe-ts writes a small seeded random Mixtral with the real Mistral v1 vocabulary once, caches it, and says so.

import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { MixtralConfig } from '../model/config.js';
import { writeMixtralGGUF } from '../formats/gguf-config.js';
import { mistralV1Vocab } from '../tokenizer/sources.js';
import { randomMixtralTensors } from './random-model.js';

/** dim 128, 2 layers, 8 q-heads / 2 kv-heads, 8 experts top-2, Mistral's 32000-token vocabulary (the reference tiny-a shape). */
export const STAND_IN_CONFIG: MixtralConfig = {
  vocabSize: 32000,
  hiddenSize: 128,
  intermediateSize: 256,
  numHiddenLayers: 2,
  numAttentionHeads: 8,
  numKeyValueHeads: 2,
  headDim: 16,
  numLocalExperts: 8,
  numExpertsPerTok: 2,
  rmsNormEps: 1e-5,
  ropeTheta: 1e6,
  maxPositionEmbeddings: 4096,
  slidingWindow: null,
  tieWordEmbeddings: false,
};
const STAND_IN_SEED = 20261128;
/** Bump when randomMixtralTensors or the stand-in's shape changes, so a cached older file is not reused. */
const STAND_IN_VERSION = 2;
const STAND_IN_NAME = 'moe-ts stand-in (seeded random weights, untrained)';

export function cacheDir(): string {
  return process.env.MOE_CACHE_DIR ?? path.join(os.homedir(), '.cache', 'moe-ts');
}

/** Path of the default model (writing it on first use) and a line telling the user what it is. */
export async function defaultModelPath(): Promise<{ path: string; note: string }> {
  const tag = createHash('sha256').update(JSON.stringify({ STAND_IN_CONFIG, STAND_IN_SEED, STAND_IN_VERSION })).digest('hex').slice(0, 12);
  const file = path.join(cacheDir(), `stand-in-mixtral-f32-${tag}.gguf`);
  if (!fs.existsSync(file)) {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    process.stderr.write(`moe: writing the stand-in model to ${file} (first run only) ...\n`);
    writeMixtralGGUF(file, {
      config: STAND_IN_CONFIG,
      tensors: randomMixtralTensors(STAND_IN_CONFIG, STAND_IN_SEED, 'f32'),
      vocab: mistralV1Vocab(),
      name: STAND_IN_NAME,
      dtype: 'f32',
    });
  }
  return {
    path: file,
    note:
      'moe: no trained default model ships yet. This is a stand-in that moe-ts wrote itself: a Mixtral-architecture\n' +
      '     model (8 experts, top-2, Mistral v1 vocabulary) with seeded RANDOM weights, so its replies are gibberish.\n' +
      '     It shows the whole path (tokenizer, chat template, MoE forward pass, sampling, streaming) working.\n' +
      '     Run your own model with: moe chat --model <file.gguf | hf-dir>',
  };
}
