// Seeded random Mixtral models, written with the project's own GGUF writer: test fixtures of any shape for the
// live comparisons with llama.cpp, the benchmark model and the tests.

import type { MixtralConfig } from '../model/config.js';
import type { Tensor } from '../tensor/tensor.js';
import { f32Tensor } from '../tensor/tensor.js';
import type { DType } from '../tensor/dtype.js';
import { quantizeTensor } from '../tensor/quant.js';
import { Rng } from '../util/rng.js';
import { TokenType, type VocabData } from '../tokenizer/sentencepiece.js';
import { writeMixtralGGUF } from '../formats/gguf-config.js';


/**
 * Random weights for `c`, named as in GGUF (stacked experts), q/k rows already in GGUF RoPE order (random rows need
 * no permutation). Matrices use std 1/sqrt(fan-in) so activations stay O(1) through the layers; the router gets a
 * larger std so that routing decisions are not near ties; norms are 1 + small noise. Matrices are stored as
 * `dtype`; norms and the router stay f32, as llama.cpp's converter keeps them.
 */
export function randomMixtralTensors(c: MixtralConfig, seed: number, dtype: DType = 'f32'): Map<string, Tensor> {
  const rng = new Rng(seed);
  const t = new Map<string, Tensor>();
  const d = c.hiddenSize;
  const hd = c.headDim;
  const E = c.numLocalExperts;
  const ffn = c.intermediateSize;
  const mat = (shape: number[], fanIn: number): Tensor => {
    const n = shape.reduce((a, b) => a * b, 1);
    const f = f32Tensor(rng.fill(n, 1 / Math.sqrt(fanIn)), shape);
    return dtype === 'f32' ? f : quantizeTensor(dtype, f);
  };
  const norm = () => f32Tensor(rng.fill(d, 0.1, 1), [d]);
  // A tied embedding is also the output head: give it the head's std (1/sqrt(d)) so logits stay O(1) there too.
  t.set('token_embd.weight', mat([c.vocabSize, d], c.tieWordEmbeddings ? d : 1));
  for (let l = 0; l < c.numHiddenLayers; l++) {
    const b = `blk.${l}.`;
    t.set(`${b}attn_norm.weight`, norm());
    t.set(`${b}attn_q.weight`, mat([c.numAttentionHeads * hd, d], d));
    t.set(`${b}attn_k.weight`, mat([c.numKeyValueHeads * hd, d], d));
    t.set(`${b}attn_v.weight`, mat([c.numKeyValueHeads * hd, d], d));
    t.set(`${b}attn_output.weight`, mat([d, c.numAttentionHeads * hd], c.numAttentionHeads * hd));
    t.set(`${b}ffn_norm.weight`, norm());
    if (E > 1) t.set(`${b}ffn_gate_inp.weight`, f32Tensor(rng.fill(E * d, 3 / Math.sqrt(d)), [E, d]));
    if (E > 1) {
      t.set(`${b}ffn_gate_exps.weight`, mat([E, ffn, d], d));
      t.set(`${b}ffn_down_exps.weight`, mat([E, d, ffn], ffn));
      t.set(`${b}ffn_up_exps.weight`, mat([E, ffn, d], d));
    } else {
      // A dense model (one FFN) uses llama.cpp's plain names.
      t.set(`${b}ffn_gate.weight`, mat([ffn, d], d));
      t.set(`${b}ffn_down.weight`, mat([d, ffn], ffn));
      t.set(`${b}ffn_up.weight`, mat([ffn, d], d));
    }
  }
  t.set('output_norm.weight', norm());
  if (!c.tieWordEmbeddings) t.set('output.weight', mat([c.vocabSize, d], d));
  return t;
}

/**
 * A synthetic SentencePiece vocabulary of `size` pieces, laid out as the reference micro model's (and Mistral's) are:
 * <unk>, <s>, </s>, the 256 byte pieces <0x00>..<0xFF>, then normal pieces "▁", "▁a", "a", ... "▁-", "-", and
 * "▁tok0", "▁tok1", ... up to `size`. Scores: 0 for control and byte pieces, -(id - 259) for normal pieces (the
 * Mistral convention: earlier pieces merge first). Types: 2 unknown, 3 control, 6 byte, 1 normal.
 */
export function syntheticVocab(size: number): VocabData {
  const FIRST_NORMAL = 259; // 3 specials + 256 bytes
  if (!Number.isInteger(size) || size < FIRST_NORMAL + 1) throw new RangeError(`syntheticVocab: size must be an integer >= ${FIRST_NORMAL + 1}, got ${size}`);
  const tokens: string[] = ['<unk>', '<s>', '</s>'];
  const types: number[] = [TokenType.Unknown, TokenType.Control, TokenType.Control];
  for (let b = 0; b < 256; b++) {
    tokens.push(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`);
    types.push(TokenType.Byte);
  }
  const chars = [
    ...'abcdefghijklmnopqrstuvwxyz', ...'ABCDEFGHIJKLMNOPQRSTUVWXYZ', ...'0123456789', '.', ',', '!', '?', "'", '-',
  ];
  const normal = ['\u2581', ...chars.flatMap((ch) => [`\u2581${ch}`, ch])];
  for (let i = 0; tokens.length < size; i++) {
    tokens.push(i < normal.length ? normal[i] : `\u2581tok${i - normal.length}`);
    types.push(TokenType.Normal);
  }
  const scores = new Float32Array(size);
  for (let id = FIRST_NORMAL; id < size; id++) scores[id] = -(id - FIRST_NORMAL);
  return { tokens, scores, types: Int32Array.from(types), bosId: 1, eosId: 2, unkId: 0, addBos: true, addEos: false };
}

export interface RandomModelOptions {
  seed: number;
  /** dtype of the big matrices (norms and router stay f32). Default f32. */
  dtype?: DType;
  /** Default: syntheticVocab(config.vocabSize). */
  vocab?: VocabData;
  /** general.name; default `random-<seed>`. */
  name?: string;
}

/**
 * Writes a whole seeded random Mixtral model as GGUF with the project's own writer: architecture keys, vocabulary and
 * tensors (no output.weight when config.tieWordEmbeddings, so readers tie the head to token_embd, as llama.cpp does).
 * Returns the tensors written.
 */
export function writeRandomMixtralGGUF(file: string, config: MixtralConfig, opts: RandomModelOptions): Map<string, Tensor> {
  const dtype = opts.dtype ?? 'f32';
  const vocab = opts.vocab ?? syntheticVocab(config.vocabSize);
  if (vocab.tokens.length !== config.vocabSize) throw new RangeError(`writeRandomMixtralGGUF: vocabulary has ${vocab.tokens.length} pieces but config.vocabSize is ${config.vocabSize}`);
  const tensors = randomMixtralTensors(config, opts.seed, dtype);
  writeMixtralGGUF(file, { config, tensors, vocab, name: opts.name ?? `random-${opts.seed}`, dtype });
  return tensors;
}
