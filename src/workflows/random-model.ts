// Seeded random Mixtral models, written with the project's own GGUF writer: test fixtures of any shape for the
// live comparisons with llama.cpp, and the stand-in default model until a trained one ships.

import type { MixtralConfig } from '../model/config.js';
import type { Tensor } from '../tensor/tensor.js';
import { f32Tensor } from '../tensor/tensor.js';
import type { DType } from '../tensor/dtype.js';
import { quantizeTensor } from '../tensor/quant.js';
import { Xoshiro128ss } from './sampling.js';

/** Standard normal samples from a seeded generator (Box-Muller). */
export class NormalRng {
  private spare: number | null = null;
  private readonly rng: Xoshiro128ss;
  constructor(seed: number) {
    this.rng = new Xoshiro128ss(seed);
  }
  next(): number {
    if (this.spare !== null) {
      const s = this.spare;
      this.spare = null;
      return s;
    }
    let u = 0;
    while (u === 0) u = this.rng.nextFloat();
    const v = this.rng.nextFloat();
    const r = Math.sqrt(-2 * Math.log(u));
    this.spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  }
  fill(n: number, std: number, mean = 0): Float32Array {
    const a = new Float32Array(n);
    for (let i = 0; i < n; i++) a[i] = mean + std * this.next();
    return a;
  }
}

/**
 * Random weights for `c`, named as in GGUF (stacked experts), q/k rows already in GGUF RoPE order (random rows need
 * no permutation). Matrices use std 1/sqrt(fan-in) so activations stay O(1) through the layers; the router gets a
 * larger std so that routing decisions are not near ties; norms are 1 + small noise. Matrices are stored as
 * `dtype`; norms and the router stay f32, as llama.cpp's converter keeps them.
 */
export function randomMixtralTensors(c: MixtralConfig, seed: number, dtype: DType = 'f32'): Map<string, Tensor> {
  const rng = new NormalRng(seed);
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
  t.set('token_embd.weight', mat([c.vocabSize, d], 1));
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
