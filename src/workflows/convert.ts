// `moe convert`: Hugging Face checkpoint directory <-> GGUF file, with the tokenizer carried across.

import * as fs from 'node:fs';
import * as path from 'node:path';
import { FormatError } from '../formats/errors.js';
import { readGGUF, getString } from '../formats/gguf.js';
import { mixtralConfigFromGGUF, vocabFromGGUF, writeMixtralGGUF } from '../formats/gguf-config.js';
import { readHFConfig, writeHFConfig } from '../formats/hf-config.js';
import { readCheckpointTensors, writeShardedSafetensors } from '../formats/safetensors.js';
import { ggufTensorsToHF, hfTensorsToGGUF } from '../formats/names.js';
import { readHFTokenizer, tokenizerJsonFromVocab, writeSentencePieceModel } from '../tokenizer/sources.js';
import type { VocabData } from '../tokenizer/sentencepiece.js';
import { dtypeInfo, isDType, type DType } from '../tensor/dtype.js';
import type { Tensor } from '../tensor/tensor.js';
import { quantizeTensor } from '../tensor/quant.js';
import { parse, UsageError } from '../cli/args.js';
import { Progress } from '../util/progress.js';

export const GGUF_WRITE_TYPES: readonly DType[] = ['f32', 'f16', 'bf16', 'q8_0', 'q4_0'];
const HF_WRITE_TYPES: readonly DType[] = ['f32', 'f16', 'bf16'];

/** Tensors llama.cpp keeps in f32 whatever the file type: 1-D norms and the MoE router. */
function keepsF32(name: string, t: Tensor): boolean {
  return t.shape.length < 2 || name.endsWith('ffn_gate_inp.weight');
}

/** Casts every matrix to `dtype` (norms and router to f32); a row length that is not a whole number of blocks falls back to f16. */
export function castTensors(tensors: ReadonlyMap<string, Tensor>, dtype: DType, log?: (s: string) => void): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  const progress = new Progress({ label: `converting to ${dtype}`, total: [...tensors.values()].reduce((n, t) => n + t.data.byteLength, 0) });
  for (const [name, t] of tensors) {
    let want: DType = keepsF32(name, t) ? 'f32' : dtype;
    const row = t.shape[t.shape.length - 1];
    if (row % dtypeInfo(want).blockSize !== 0) {
      log?.(`${name}: rows of ${row} are not whole ${want} blocks; stored as f16`);
      want = 'f16';
    }
    out.set(name, t.dtype === want ? t : quantizeTensor(want, t));
    progress.tick(t.data.byteLength);
  }
  progress.finish();
  return out;
}

/** The dtype most of a model's matrices have (what "keep the type" means for a conversion without --type). */
function dominantDtype(tensors: ReadonlyMap<string, Tensor>): DType {
  const count = new Map<DType, number>();
  for (const [name, t] of tensors) if (!keepsF32(name, t)) count.set(t.dtype, (count.get(t.dtype) ?? 0) + t.data.length);
  let best: DType = 'f32';
  let n = -1;
  for (const [d, c] of count) if (c > n) [best, n] = [d, c];
  return best;
}

export function convertHFToGGUF(dir: string, outFile: string, type?: DType, log: (s: string) => void = () => {}): void {
  const hf = readHFConfig(dir);
  const ckpt = readCheckpointTensors(dir);
  const tensors = hfTensorsToGGUF(ckpt.tensors, hf.config, { source: dir });
  const { vocab, chatTemplate } = readHFTokenizer(dir, hf.bosTokenId, hf.eosTokenIds[0] ?? null);
  if (vocab.tokens.length !== hf.config.vocabSize) throw new FormatError(dir, `the tokenizer has ${vocab.tokens.length} tokens but config.json says vocab_size ${hf.config.vocabSize}`);
  const dtype = type ?? dominantDtype(tensors);
  if (!GGUF_WRITE_TYPES.includes(dtype)) throw new UsageError(`GGUF output types: ${GGUF_WRITE_TYPES.join(', ')}; got ${dtype}`);
  writeMixtralGGUF(outFile, {
    config: hf.config,
    tensors: castTensors(tensors, dtype, log),
    vocab,
    ...(chatTemplate !== undefined ? { chatTemplate } : {}),
    name: path.basename(path.resolve(dir)),
    dtype,
  });
}

export function convertGGUFToHF(file: string, outDir: string, type?: DType, log: (s: string) => void = () => {}): void {
  const f = readGGUF(file);
  const config = mixtralConfigFromGGUF(f);
  const vocab = vocabFromGGUF(f);
  const chatTemplate = getString(f, 'tokenizer.chat_template', { required: false });
  let dtype = type ?? dominantDtype(f.tensors);
  if (type === undefined && !HF_WRITE_TYPES.includes(dtype)) {
    log(`the file's ${dtype} blocks cannot be stored in safetensors; writing f32 (dequantized)`);
    dtype = 'f32';
  }
  if (!HF_WRITE_TYPES.includes(dtype)) throw new UsageError(`safetensors holds ${HF_WRITE_TYPES.join(', ')}; got --type ${dtype}`);
  const hfTensors = ggufTensorsToHF(f.tensors, config, { source: file });
  const cast = new Map<string, Tensor>();
  const progress = new Progress({ label: `converting to ${dtype}`, total: [...hfTensors.values()].reduce((n, t) => n + t.data.byteLength, 0) });
  for (const [name, t] of hfTensors) {
    cast.set(name, t.dtype === dtype ? t : quantizeTensor(dtype, t));
    progress.tick(t.data.byteLength);
  }
  progress.finish();
  fs.mkdirSync(outDir, { recursive: true });
  writeShardedSafetensors(outDir, cast, 4 * 1024 ** 3);
  const torchDtype = { f32: 'float32', f16: 'float16', bf16: 'bfloat16' }[dtype as 'f32' | 'f16' | 'bf16'];
  writeHFConfig(outDir, config, { bosTokenId: vocab.bosId, eosTokenId: vocab.eosId, torchDtype });
  fs.writeFileSync(path.join(outDir, 'generation_config.json'), JSON.stringify({ bos_token_id: vocab.bosId, eos_token_id: vocab.eosId }, null, 2) + '\n');
  writeHFTokenizerFiles(outDir, vocab, chatTemplate);
}

/** tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json, as a Mistral checkpoint has them. */
export function writeHFTokenizerFiles(dir: string, vocab: VocabData, chatTemplate?: string): void {
  fs.writeFileSync(path.join(dir, 'tokenizer.model'), writeSentencePieceModel(vocab));
  fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(tokenizerJsonFromVocab(vocab), null, 2) + '\n');
  const piece = (id: number) => vocab.tokens[id];
  const config: Record<string, unknown> = {
    add_bos_token: vocab.addBos,
    add_eos_token: vocab.addEos ?? false,
    bos_token: piece(vocab.bosId),
    eos_token: piece(vocab.eosId),
    unk_token: piece(vocab.unkId),
    clean_up_tokenization_spaces: false,
    legacy: true,
    tokenizer_class: 'LlamaTokenizer',
    ...(chatTemplate !== undefined ? { chat_template: chatTemplate } : {}),
  };
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify(config, null, 2) + '\n');
  fs.writeFileSync(path.join(dir, 'special_tokens_map.json'), JSON.stringify({ bos_token: piece(vocab.bosId), eos_token: piece(vocab.eosId), unk_token: piece(vocab.unkId) }, null, 2) + '\n');
}

export async function convertCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parse(argv, { type: { type: 'string' } }, true);
  if (positionals.length !== 2) throw new UsageError('convert takes <in> <out>: an HF checkpoint directory and a .gguf file, either way round');
  const [input, output] = positionals;
  const t = values.type as string | undefined;
  if (t !== undefined && !isDType(t)) throw new UsageError(`--type: unknown type '${t}'`);
  const type = t as DType | undefined;
  let st: fs.Stats;
  try {
    st = fs.statSync(input);
  } catch {
    throw new FormatError(input, 'no such file or directory');
  }
  const log = (s: string) => process.stderr.write(`moe convert: ${s}\n`);
  const t0 = performance.now();
  if (st.isDirectory()) {
    if (type !== undefined && !GGUF_WRITE_TYPES.includes(type)) throw new UsageError(`--type for GGUF output: ${GGUF_WRITE_TYPES.join(', ')}`);
    convertHFToGGUF(input, output, type, log);
  } else {
    convertGGUFToHF(input, output, type, log);
  }
  log(`wrote ${output} in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
}
