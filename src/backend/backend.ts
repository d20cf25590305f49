import type { Tensor } from '../tensor/tensor.js';

/**
 * The compute operations the model needs, over row-major f32 activations. Weights are `Tensor`s in their file's
 * dtype and are multiplied as they are (quantized blocks are never expanded to f32 in memory).
 * `ref` (plain TypeScript) is the oracle; every other backend is tested against it.
 */
export interface Backend {
  readonly name: string;

  /** out[r, o] = sum_i x[r, i] * w[o, i] for r < rows; w has shape [outDim, inDim]. Semantics as llama.cpp's mul_mat. */
  matmul(out: Float32Array, x: Float32Array, rows: number, w: Tensor): void;

  /**
   * outs[i] = x . ws[i]^T for several weights of one input (q, k and v), each exactly as matmul gives it; a backend
   * may convert x once and run them as one job.
   */
  matmulMany(outs: readonly Float32Array[], x: Float32Array, rows: number, ws: readonly Tensor[]): void;

  /**
   * Readies weight matrices (2-D [out, in] or stacked 3-D [E, out, in]) for the kernels before their first use, so
   * that one-time work (native: copying them into the engine's own memory, repacking) happens once, with a progress
   * line when it is slow, instead of inside the first forward pass's matmuls. Results never depend on it.
   */
  prepareWeights(ws: readonly Tensor[]): void;

  /**
   * A hint: the next operation reads these weights. A backend may start bringing them into cache meanwhile (native:
   * an idle worker thread reads them while the calling thread does the serial work between matrix products).
   * Changes speed only, never results.
   */
  prefetch?(ws: readonly Tensor[]): void;

  /** dst[i] = the f16 bits of src[i] (round to nearest even, as ggml): how an f16 KV cache stores a key or value. */
  toF16(dst: Uint16Array, src: Float32Array): void;

  /** out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, for `rows` rows of weight.length. */
  rmsNorm(out: Float32Array, x: Float32Array, rows: number, weight: Float32Array, eps: number): void;

  /**
   * Rotary position embedding in place, GGUF/ggml convention (adjacent pairs (2i, 2i+1) rotate; HF q/k weights are
   * permuted at load so this holds for every checkpoint). x is [rows, nHeads * headDim]; row r is at positions[r].
   */
  rope(x: Float32Array, rows: number, nHeads: number, headDim: number, positions: Int32Array, theta: number): void;

  /**
   * Causal grouped-query attention of `rows` new queries (at positions start..start+rows-1) over the cache, which
   * already holds the keys/values of positions 0..start+rows-1. q: [rows, nHeads*hd]; kCache/vCache:
   * [capacity, nKvHeads*hd], f32 or, when shape.kvF16, f16 bits; out: [rows, nHeads*hd]. Key j is visible from
   * query i iff j <= i and (no window or i - j < window).
   */
  attention(
    out: Float32Array,
    q: Float32Array,
    rows: number,
    start: number,
    kCache: KvCache,
    vCache: KvCache,
    shape: AttentionShape,
  ): void;

  /**
   * The sparse MoE feed-forward, dropless: for each row r and slot s < k, expert e = experts[r*k+s] with weight
   * weights[r*k+s] contributes weight * down_e(silu(gate_e x) * up_e x). gate/up: [E, ffn, dim]; down: [E, dim, ffn].
   * Rows are grouped by expert (one matmul per active expert over its rows), never token x expert loops over all
   * experts. out: [rows, dim] (overwritten).
   */
  moeFFN(
    out: Float32Array,
    x: Float32Array,
    rows: number,
    experts: Int32Array,
    weights: Float32Array,
    k: number,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
  ): void;
}

/** A layer's keys or values: f32, or the f16 bits of each value (llama.cpp's default cache type, half the memory). */
export type KvCache = Float32Array | Uint16Array;

/** Throws unless both caches hold what kvF16 says (f16 bits in a Uint16Array, else f32). */
export function checkKvCache(k: KvCache, v: KvCache, kvF16: boolean): void {
  const want = kvF16 ? Uint16Array : Float32Array;
  if (!(k instanceof want) || !(v instanceof want)) {
    throw new Error(`attention: the KV cache must be ${kvF16 ? 'f16 bits in Uint16Arrays (kvF16)' : 'Float32Arrays'}, got ${k.constructor.name} and ${v.constructor.name}`);
  }
}

export interface AttentionShape {
  nHeads: number;
  nKvHeads: number;
  headDim: number;
  scale: number; // 1/sqrt(headDim)
  slidingWindow: number | null;
  /** The cache holds f16 bits (Uint16Array); q and the softmax probabilities are rounded to f16 as llama.cpp does. */
  kvF16: boolean;
}
