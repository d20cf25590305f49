// Differentiable ops of the dense transformer: each computes its result and records how to send the output's
// gradient back to its inputs. Activations are 2-D row-major [rows, features]; weights use the HF Linear layout
// [out, in]. The matmuls go through gradKernels() so a native backend can take them over.

import { alloc, gradOf, numelOf, record, samePrecision, Var, type Float } from './tape.js';
import { gradKernels, type AttentionDims } from './kernels.js';

function check2D(op: string, v: Var, what: string, cols?: number): [number, number] {
  if (v.shape.length !== 2) throw new Error(`${op}: ${what} must be 2-D, got [${v.shape.join(', ')}]`);
  if (cols !== undefined && v.shape[1] !== cols) throw new Error(`${op}: ${what} has ${v.shape[1]} columns, expected ${cols}`);
  return [v.shape[0], v.shape[1]];
}

function sameShape(op: string, a: Var, b: Var): void {
  if (a.shape.length !== b.shape.length || a.shape.some((d, i) => d !== b.shape[i])) {
    throw new Error(`${op}: shapes [${a.shape.join(', ')}] and [${b.shape.join(', ')}] differ`);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Embedding and linear layers

/** Rows of the embedding matrix weight [V, D] for each id: [N, D]. Backward scatter-adds into the rows used. */
export function embedding(weight: Var, ids: ArrayLike<number>): Var {
  const [V, D] = check2D('embedding', weight, 'weight');
  const n = ids.length;
  const idx = Int32Array.from(ids as ArrayLike<number>);
  for (let t = 0; t < n; t++) {
    if (!(Number.isInteger(ids[t]) && ids[t] >= 0 && ids[t] < V)) throw new Error(`embedding: id ${ids[t]} at ${t} outside 0..${V - 1}`);
  }
  const out = alloc(weight.precision, n * D);
  for (let t = 0; t < n; t++) out.set(weight.data.subarray(idx[t] * D, idx[t] * D + D), t * D);
  return record('embedding', out, [n, D], [weight], (g) => {
    const dw = gradOf(weight)!;
    for (let t = 0; t < n; t++) {
      const o = idx[t] * D;
      for (let i = 0; i < D; i++) dw[o + i] += g[t * D + i];
    }
  });
}

/** x [N, in] times W^T, W [out, in] (no bias: Mixtral has none): [N, out]. */
export function linear(x: Var, w: Var): Var {
  const p = samePrecision('linear', x, w);
  const [n, k] = check2D('linear', x, 'input');
  const [m] = check2D('linear', w, 'weight', k);
  const out = alloc(p, n * m);
  gradKernels().matmul(out, x.data, w.data, n, k, m);
  return record('linear', out, [n, m], [x, w], (g) => {
    gradKernels().matmulBackward(g, x.data, w.data, n, k, m, gradOf(x), gradOf(w));
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Normalisation and position

/** RMSNorm over the last dimension: y = x / sqrt(mean(x^2) + eps) * w. */
export function rmsNorm(x: Var, w: Var, eps: number): Var {
  const p = samePrecision('rmsNorm', x, w);
  const D = w.size;
  const [n] = check2D('rmsNorm', x, 'input', D);
  const out = alloc(p, n * D);
  const inv = new Float64Array(n); // 1 / rms per row, saved for backward
  for (let r = 0; r < n; r++) {
    const o = r * D;
    let ss = 0;
    for (let i = 0; i < D; i++) ss += x.data[o + i] * x.data[o + i];
    const s = 1 / Math.sqrt(ss / D + eps);
    inv[r] = s;
    for (let i = 0; i < D; i++) out[o + i] = x.data[o + i] * s * w.data[i];
  }
  return record('rmsNorm', out, [n, D], [x, w], (g) => {
    const dx = gradOf(x);
    const dw = gradOf(w);
    for (let r = 0; r < n; r++) {
      const o = r * D;
      const s = inv[r];
      if (dw) for (let i = 0; i < D; i++) dw[i] += g[o + i] * x.data[o + i] * s;
      if (dx) {
        // d/dx_j of x_i s w_i: s w_i [i=j] - x_i w_i s^3 x_j / D.
        let dot = 0;
        for (let i = 0; i < D; i++) dot += g[o + i] * w.data[i] * x.data[o + i];
        const c = (dot * s * s * s) / D;
        for (let i = 0; i < D; i++) dx[o + i] += g[o + i] * w.data[i] * s - x.data[o + i] * c;
      }
    }
  });
}

/**
 * Which elements of a head RoPE rotates together. 'hf': (i, i + hd/2), transformers' rotate_half, for q/k weights
 * in Hugging Face row order. 'gguf': (2i, 2i+1), ggml's, for q/k rows permuted as llama.cpp's converter does.
 */
export type RopeLayout = 'hf' | 'gguf';

/**
 * Rotary position embedding of x [N, nHeads*headDim]; row r is at positions[r]. Pair i rotates by
 * positions[r] * theta^(-2i/headDim). A rotation: backward rotates the gradient back.
 */
export function rope(x: Var, nHeads: number, headDim: number, positions: ArrayLike<number>, theta: number, layout: RopeLayout = 'hf'): Var {
  const [n] = check2D('rope', x, 'input', nHeads * headDim);
  if (headDim % 2 !== 0) throw new Error(`rope: head size ${headDim} is odd`);
  if (positions.length !== n) throw new Error(`rope: ${positions.length} positions for ${n} rows`);
  const half = headDim / 2;
  const cos = new Float64Array(n * half);
  const sin = new Float64Array(n * half);
  for (let r = 0; r < n; r++) {
    for (let i = 0; i < half; i++) {
      const a = positions[r] * Math.pow(theta, (-2 * i) / headDim);
      cos[r * half + i] = Math.cos(a);
      sin[r * half + i] = Math.sin(a);
    }
  }
  // Offsets of the two elements of pair i within a head.
  const lo = (i: number) => (layout === 'hf' ? i : 2 * i);
  const hi = (i: number) => (layout === 'hf' ? i + half : 2 * i + 1);
  const rotate = (dst: Float, src: ArrayLike<number>, sign: number, add: boolean) => {
    for (let r = 0; r < n; r++) {
      for (let h = 0; h < nHeads; h++) {
        const base = r * nHeads * headDim + h * headDim;
        for (let i = 0; i < half; i++) {
          const c = cos[r * half + i];
          const s = sign * sin[r * half + i];
          const a = src[base + lo(i)];
          const b = src[base + hi(i)];
          const y0 = a * c - b * s;
          const y1 = a * s + b * c;
          if (add) {
            dst[base + lo(i)] += y0;
            dst[base + hi(i)] += y1;
          } else {
            dst[base + lo(i)] = y0;
            dst[base + hi(i)] = y1;
          }
        }
      }
    }
  };
  const out = alloc(x.precision, x.size);
  rotate(out, x.data, 1, false);
  return record('rope', out, x.shape, [x], (g) => rotate(gradOf(x)!, g, -1, true));
}

// ---------------------------------------------------------------------------------------------------------------
// Attention

export type { AttentionDims } from './kernels.js';

export interface AttentionOptions {
  /** Independent sequences stacked as rows: rows = batch * seqLen, sequence b holds rows b*seqLen .. */
  batch: number;
  seqLen: number;
  nHeads: number;
  nKvHeads: number;
  headDim: number;
  /** Key j is visible from query i iff j <= i and (null or i - j < slidingWindow) (HF's rule). */
  slidingWindow: number | null;
}

/**
 * Causal grouped-query attention: q [B*T, H*hd], k and v [B*T, KV*hd]; query head h reads kv head
 * floor(h / (H/KV)). Scores scaled by 1/sqrt(hd), softmax over the visible keys. Returns [B*T, H*hd].
 * The probabilities are saved for backward (B*H*T*T values: fine for the reference path).
 */
export function attention(q: Var, k: Var, v: Var, o: AttentionOptions): Var {
  const p = samePrecision('attention', q, k, v);
  const { batch: B, seqLen: T, nHeads: H, nKvHeads: KV, headDim: hd, slidingWindow: win } = o;
  if (!(H % KV === 0)) throw new Error(`attention: ${H} heads do not share ${KV} kv heads evenly`);
  const qs = H * hd;
  const ks = KV * hd;
  check2D('attention', q, 'q', qs);
  check2D('attention', k, 'k', ks);
  check2D('attention', v, 'v', ks);
  if (q.shape[0] !== B * T || k.shape[0] !== B * T || v.shape[0] !== B * T) throw new Error(`attention: q/k/v need ${B} x ${T} rows`);
  if (win !== null && !(Number.isInteger(win) && win > 0)) throw new Error(`attention: sliding window ${win} must be a positive integer or null`);
  const dims: AttentionDims = { batch: B, seqLen: T, nHeads: H, nKvHeads: KV, headDim: hd, slidingWindow: win };
  const probs = new Float64Array(B * H * T * T); // [b, h, i, j], zero where masked; kept for backward
  const out = alloc(p, B * T * qs);
  gradKernels().attentionForward(out, probs, q.data, k.data, v.data, dims);
  return record('attention', out, [B * T, qs], [q, k, v], (g) => {
    gradKernels().attentionBackward(g, probs, q.data, k.data, v.data, gradOf(q), gradOf(k), gradOf(v), dims);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Activations and elementwise ops

/** Softmax over the last dimension of x [N, C]. */
export function softmax(x: Var): Var {
  const [n, c] = check2D('softmax', x, 'input');
  const out = alloc(x.precision, x.size);
  for (let r = 0; r < n; r++) softmaxRow(x.data, r * c, c, out, r * c);
  return record('softmax', out, x.shape, [x], (g) => {
    const dx = gradOf(x)!;
    for (let r = 0; r < n; r++) {
      const o = r * c;
      let dot = 0;
      for (let i = 0; i < c; i++) dot += out[o + i] * g[o + i];
      for (let i = 0; i < c; i++) dx[o + i] += out[o + i] * (g[o + i] - dot);
    }
  });
}

/** Numerically stable softmax of src[off .. off+n) into dst[dOff ..], computed in double. */
export function softmaxRow(src: ArrayLike<number>, off: number, n: number, dst: { [i: number]: number }, dOff: number): void {
  let max = -Infinity;
  for (let i = 0; i < n; i++) if (src[off + i] > max) max = src[off + i];
  let sum = 0;
  for (let i = 0; i < n; i++) sum += Math.exp(src[off + i] - max);
  for (let i = 0; i < n; i++) dst[dOff + i] = Math.exp(src[off + i] - max) / sum;
}

/** log(sum(exp(src[off .. off+n)))), stable. */
export function logSumExpRow(src: ArrayLike<number>, off: number, n: number): number {
  let max = -Infinity;
  for (let i = 0; i < n; i++) if (src[off + i] > max) max = src[off + i];
  if (max === -Infinity) return -Infinity;
  let sum = 0;
  for (let i = 0; i < n; i++) sum += Math.exp(src[off + i] - max);
  return max + Math.log(sum);
}

export function sigmoid(x: number): number {
  return x >= 0 ? 1 / (1 + Math.exp(-x)) : Math.exp(x) / (1 + Math.exp(x));
}

/** SiLU (swish): x * sigmoid(x). */
export function silu(x: Var): Var {
  const out = alloc(x.precision, x.size);
  for (let i = 0; i < x.size; i++) out[i] = x.data[i] * sigmoid(x.data[i]);
  return record('silu', out, x.shape, [x], (g) => {
    const dx = gradOf(x)!;
    for (let i = 0; i < x.size; i++) {
      const s = sigmoid(x.data[i]);
      dx[i] += g[i] * s * (1 + x.data[i] * (1 - s));
    }
  });
}

/** softplus(x) = log(1 + exp(x)), stable for large |x|. */
export function softplus(x: Var): Var {
  const out = alloc(x.precision, x.size);
  for (let i = 0; i < x.size; i++) {
    const v = x.data[i];
    out[i] = Math.max(v, 0) + Math.log1p(Math.exp(-Math.abs(v)));
  }
  return record('softplus', out, x.shape, [x], (g) => {
    const dx = gradOf(x)!;
    for (let i = 0; i < x.size; i++) dx[i] += g[i] * sigmoid(x.data[i]);
  });
}

/** Elementwise a * b (same shapes). */
export function mul(a: Var, b: Var): Var {
  const p = samePrecision('mul', a, b);
  sameShape('mul', a, b);
  const out = alloc(p, a.size);
  for (let i = 0; i < a.size; i++) out[i] = a.data[i] * b.data[i];
  return record('mul', out, a.shape, [a, b], (g) => {
    const da = gradOf(a);
    const db = gradOf(b);
    if (da) for (let i = 0; i < a.size; i++) da[i] += g[i] * b.data[i];
    if (db) for (let i = 0; i < a.size; i++) db[i] += g[i] * a.data[i];
  });
}

/** Elementwise a + b (same shapes): residual connections, loss sums. */
export function add(a: Var, b: Var): Var {
  const p = samePrecision('add', a, b);
  sameShape('add', a, b);
  const out = alloc(p, a.size);
  for (let i = 0; i < a.size; i++) out[i] = a.data[i] + b.data[i];
  return record('add', out, a.shape, [a, b], (g) => {
    const da = gradOf(a);
    const db = gradOf(b);
    if (da) for (let i = 0; i < a.size; i++) da[i] += g[i];
    if (db) for (let i = 0; i < a.size; i++) db[i] += g[i];
  });
}

/** a * scale + shift with constant numbers (loss coefficients, the noise floor of noisy gating). */
export function affine(a: Var, scale: number, shift = 0): Var {
  const out = alloc(a.precision, a.size);
  for (let i = 0; i < a.size; i++) out[i] = a.data[i] * scale + shift;
  return record('affine', out, a.shape, [a], (g) => {
    const da = gradOf(a)!;
    for (let i = 0; i < a.size; i++) da[i] += g[i] * scale;
  });
}

/** Sum of all elements: a scalar [1]. */
export function sum(a: Var): Var {
  let s = 0;
  for (let i = 0; i < a.size; i++) s += a.data[i];
  const out = alloc(a.precision, 1);
  out[0] = s;
  return record('sum', out, [1], [a], (g) => {
    const da = gradOf(a)!;
    for (let i = 0; i < a.size; i++) da[i] += g[0];
  });
}

/** Sum over rows of x [N, C]: [C] (per-expert totals: Shazeer's importance and load). */
export function sumRows(x: Var): Var {
  const [n, c] = check2D('sumRows', x, 'input');
  const acc = new Float64Array(c);
  for (let r = 0; r < n; r++) for (let i = 0; i < c; i++) acc[i] += x.data[r * c + i];
  const out = alloc(x.precision, c);
  out.set(acc);
  return record('sumRows', out, [c], [x], (g) => {
    const dx = gradOf(x)!;
    for (let r = 0; r < n; r++) for (let i = 0; i < c; i++) dx[r * c + i] += g[i];
  });
}

/** The same data under another shape of the same size (the gradient passes through unchanged). */
export function reshape(x: Var, shape: readonly number[]): Var {
  if (numelOf(shape) !== x.size) throw new Error(`reshape: [${x.shape.join(', ')}] has ${x.size} values, [${shape.join(', ')}] needs ${numelOf(shape)}`);
  return record('reshape', x.data, shape, [x], (g) => {
    const dx = gradOf(x)!;
    for (let i = 0; i < x.size; i++) dx[i] += g[i];
  });
}

/** Sum of scalar Vars (skipping nulls): the total training loss. */
export function addScalars(...terms: (Var | null)[]): Var {
  const ts = terms.filter((t): t is Var => t !== null);
  if (ts.length === 0) throw new Error('addScalars: nothing to add');
  let acc = ts[0];
  for (let i = 1; i < ts.length; i++) acc = add(acc, ts[i]);
  return acc;
}
