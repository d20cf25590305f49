// Exporting a trained model as the checkpoints everyone else reads: a Hugging Face Mixtral directory (config.json,
// generation_config.json, model.safetensors, the Mistral v1 tokenizer files) and, from that directory through the
// same converter `moe convert` uses, a GGUF file for llama.cpp. One path, so what training exports is exactly what a
// converted HF checkpoint would be.

import * as fs from 'node:fs';
import * as path from 'node:path';
import { writeSafetensors } from '../formats/safetensors.js';
import { writeHFConfig } from '../formats/hf-config.js';
import { mistralV1Vocab } from '../tokenizer/sources.js';
import { inferenceConfig, type MixtralTrain } from '../model/mixtral-train.js';
import type { DType } from '../tensor/dtype.js';
import { convertHFToGGUF, writeHFTokenizerFiles } from './convert.js';

export interface ExportedModel {
  /** The Hugging Face checkpoint directory. */
  hfDir: string;
  /** The GGUF file. */
  gguf: string;
}

/**
 * Writes `model` to `<outDir>/hf/` and `<outDir>/model-<type>.gguf` (default f32: the trained weights unrounded).
 * Refuses what the Mixtral inference model cannot express (a switch router, dense layers between MoE layers with
 * k > 1), with the reason, before writing anything.
 */
export function exportTrainedModel(model: MixtralTrain, outDir: string, opts: { type?: DType; log?: (s: string) => void } = {}): ExportedModel {
  model.toInferenceWeights(); // throws the reason when inference (and so the exported files) could not run this model
  const c = model.config;
  const hfDir = path.join(outDir, 'hf');
  const tmp = `${hfDir}.tmp-${process.pid}`;
  fs.rmSync(tmp, { recursive: true, force: true });
  fs.mkdirSync(tmp, { recursive: true });
  const vocab = mistralV1Vocab();
  if (vocab.tokens.length !== c.vocabSize) throw new Error(`export: the model's vocabulary has ${c.vocabSize} tokens, the Mistral v1 tokenizer ${vocab.tokens.length}`);
  writeHFConfig(tmp, inferenceConfig(c), { bosTokenId: vocab.bosId, eosTokenId: vocab.eosId, torchDtype: 'float32' });
  fs.writeFileSync(path.join(tmp, 'generation_config.json'), JSON.stringify({ bos_token_id: vocab.bosId, eos_token_id: vocab.eosId }, null, 2) + '\n');
  writeSafetensors(path.join(tmp, 'model.safetensors'), model.toHFTensors(), { format: 'pt' });
  writeHFTokenizerFiles(tmp, vocab);
  fs.rmSync(hfDir, { recursive: true, force: true });
  fs.renameSync(tmp, hfDir);
  const type = opts.type ?? 'f32';
  const gguf = path.join(outDir, `model-${type}.gguf`);
  convertHFToGGUF(hfDir, gguf, type, opts.log);
  return { hfDir, gguf };
}
