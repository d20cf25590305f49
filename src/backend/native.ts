// The native backend: C kernels (native/src: AVX-512 / AVX2 / generic paths chosen at run time from CPUID, a
// persistent thread pool) behind the N-API addon. Every call is synchronous and works on the caller's TypedArrays in
// place. Weights stay in their file dtype: f32 / f16 / bf16 go to the float GEMM/GEMV kernels (native/src/ops*.c),
// quantized types to quant.c's kernels after the activation rows are converted to the weight's vec_dot_type (once
// per row, shared by all threads), as llama.cpp does; ref.ts is the oracle it is tested against. A model file's
// weight matrices are copied once into the addon's own memory on 2 MB pages (q4_0 rearranged for the AVX-512 kernels;
// prepareWeights, repack below), which changes speed and resident pages, never results.

import * as os from 'node:os';
import { checkKvCache, type AttentionShape, type Backend, type KvCache } from './backend.js';
import { RefBackend } from './ref.js';
import { nativeAddon, nativeAddonError } from './native-addon.js';
import type { Tensor } from '../tensor/tensor.js';
import { dtypeInfo, type DType } from '../tensor/dtype.js';
import { Progress } from '../util/progress.js';

/** The compute part of the addon (native/src/addon.c). */
interface ComputeAddon {
  /** out = x . W^T (accumulate: out += x . W^T, f32 weights only). */
  matmul(out: Float32Array, x: Float32Array, rows: number, w: Uint8Array, wtype: number, outDim: number, inDim: number, accumulate?: boolean): boolean;
  /** outs[i] = x . W_i^T, x converted once, one job; false (nothing written) when a type is unsupported or they convert x differently. */
  matmulMany(outs: Float32Array[], x: Float32Array, rows: number, ws: Uint8Array[], wtypes: number[], outDims: number[], inDim: number): boolean;
  /** Training: dst[cols, rows] = src[rows, cols]^T. */
  transpose(dst: Float32Array, src: Float32Array, rows: number, cols: number): void;
  /** Training: lse[r] = log sum exp(x[r, :]); probs[r, :] = exp(x[r, :] - lse[r]) when given. */
  softmaxRows(x: Float32Array, rows: number, n: number, lse: Float64Array, probs: Float32Array | null): void;
  /** Training: causal GQA attention over B sequences of T rows (window 0 = none); probs [B, H, T, T]. */
  trainAttention(out: Float32Array, probs: Float64Array, q: Float32Array, k: Float32Array, v: Float32Array, B: number, T: number, H: number, KV: number, hd: number, window: number): void;
  trainAttentionBackward(g: Float32Array, probs: Float64Array, q: Float32Array, k: Float32Array, v: Float32Array, dq: Float32Array | null, dk: Float32Array | null, dv: Float32Array | null,
    B: number, T: number, H: number, KV: number, hd: number, window: number): void;
  /** Training: dz[r] += c probs[r]; dz[r, targets[r]] -= c (rows with a negative target skipped). */
  crossEntropyBackward(dz: Float32Array, probs: Float32Array, targets: Int32Array, rows: number, n: number, c: number): void;
  /** Training: one AdamW update of f32 parameters p with gradient g and moments m, v (optimizer.ts). */
  adamw(p: Float32Array, g: Float32Array, m: Float32Array, v: Float32Array, beta1: number, beta2: number, stepSize: number, bc2Sqrt: number, eps: number, decay: number): void;
  rmsNorm(out: Float32Array, x: Float32Array, rows: number, weight: Float32Array, eps: number): void;
  /** Idle workers read these (the next job's weights) into cache until a job arrives. */
  prefetch(ws: Uint8Array[]): void;
  /** dst[i] = the f16 bits of src[i]. */
  toF16(dst: Uint16Array, src: Float32Array): void;
  rope(x: Float32Array, rows: number, nHeads: number, headDim: number, positions: Int32Array, theta: number): void;
  attention(out: Float32Array, q: Float32Array, rows: number, start: number, k: KvCache, v: KvCache,
    nHeads: number, nKvHeads: number, headDim: number, scale: number, window: number, kvF16: boolean): void;
  moeFFN(out: Float32Array, x: Float32Array, rows: number, experts: Int32Array, weights: Float32Array, k: number,
    gate: Uint8Array, gateType: number, up: Uint8Array, upType: number, down: Uint8Array, downType: number,
    nExperts: number, ffn: number, dim: number): boolean;
  /**
   * The weights [rows, n] copied into memory the addon owns (2 MB pages where the OS has them), in the layout the
   * kernels in use want (q4_0 on AVX-512: MOE_Q4_0_RP; other types unchanged), or null. Only mapped file bytes
   * unless anyMemory; the file's pages are then released (the copy replaces them in memory).
   */
  repack(w: Uint8Array, wtype: number, rows: number, n: number, anyMemory?: boolean): { data: Uint8Array; type: number } | null;
  setThreads(n: number): number;
  /** Tests: the float kernel set ('avx512' | 'avx2' | 'generic' | 'auto'; quant.c follows); false if this CPU lacks it. */
  setKernels(name: string): boolean;
  /** Tests: rows per MoE chunk (0 = automatic: per-slot buffers of ~64 MB). */
  setMoeChunk(rows: number): void;
  supports(type: number): boolean;
  info(): NativeInfo;
}

export interface NativeInfo {
  /** Best code path this CPU has: 'avx512-vnni', 'avx512', 'avx2', 'neon', 'generic'. */
  cpu: string;
  /** Float kernel set in use: 'avx512', 'avx2', 'generic'. */
  kernels: string;
  threads: number;
  features: Record<string, number>;
}

const FUNCTIONS = ['matmul', 'matmulMany', 'transpose', 'softmaxRows', 'trainAttention', 'trainAttentionBackward', 'crossEntropyBackward', 'adamw', 'rmsNorm', 'toF16', 'prefetch', 'rope', 'attention', 'moeFFN', 'repack', 'setThreads', 'setKernels', 'setMoeChunk', 'supports', 'info'];

let compute: ComputeAddon | null | undefined;
let computeError: string | null = null;

/** The addon's compute functions, or null (see nativeBackendError()). */
export function nativeCompute(): ComputeAddon | null {
  if (compute !== undefined) return compute;
  const a = nativeAddon();
  if (!a) {
    computeError = nativeAddonError();
    return (compute = null);
  }
  const missing = FUNCTIONS.filter((f) => typeof a[f] !== 'function');
  if (missing.length) {
    computeError = `the native addon lacks ${missing.join(', ')} (an old build? rebuild with \`npm run build:native\`)`;
    return (compute = null);
  }
  return (compute = a as unknown as ComputeAddon);
}

/** Why the native backend is unavailable (null when it is available). */
export function nativeBackendError(): string | null {
  nativeCompute();
  return computeError;
}

export function nativeBackendAvailable(): boolean {
  return nativeCompute() !== null;
}

/**
 * The engine's own copies of weight tensors (addon.repack), by their bytes (a mapped model file's, which never
 * change), shared by every backend of this thread; null: used from the file as they are. llama.cpp repacks q4_0 at
 * load the same way (ggml-cpu/repack.cpp).
 */
const repacked = new WeakMap<Uint8Array, { data: Uint8Array; type: number } | null>();
/**
 * Bytes copied so far, and the most this thread copies: half the machine's memory. Beyond it weights stay in the
 * file's pages, which the OS can drop and read again, so a model larger than memory still runs from its mapping.
 */
let repackedBytes = 0;
const REPACK_LIMIT = os.totalmem() / 2;

/** The thread count the process-wide pool was last set to (the addon has one pool; backends share it). */
let poolThreads = 0;

export function defaultThreads(): number {
  return Math.min(256, Math.max(1, os.availableParallelism())); // the pool's limit
}

export interface NativeBackendOptions {
  /** Threads for the kernels (0 or absent: one per available core). */
  threads?: number;
  /**
   * Copy weights from model files into the engine's own memory at first use, on 2 MB pages and in the kernels' own
   * layout (q4_0 on AVX-512), the file's pages released (default true; MOE_REPACK=0 turns it off and runs from the
   * file's pages). Results are bit-identical either way; only speed and which pages are resident change.
   */
  repack?: boolean;
}

export class NativeBackend implements Backend {
  readonly name = 'native';
  readonly threads: number;
  readonly repack: boolean;
  private readonly addon: ComputeAddon;
  private readonly ref = new RefBackend();
  private readonly supported = new Map<DType, boolean>();

  constructor(opts: NativeBackendOptions = {}) {
    const a = nativeCompute();
    if (!a) throw new Error(`native backend unavailable: ${computeError}`);
    this.addon = a;
    const t = opts.threads ?? 0;
    if (!(Number.isInteger(t) && t >= 0 && t <= 256)) throw new Error(`threads must be an integer in 0..256, got ${t}`);
    this.threads = t === 0 ? defaultThreads() : t;
    this.repack = opts.repack ?? process.env.MOE_REPACK !== '0';
    this.pool();
  }

  /** The bytes and type code the kernels get for weight matrix `w`: the engine's own copy where there is one. */
  private weight(w: Tensor): [Uint8Array, number] {
    const type = dtypeInfo(w.dtype).ggmlType;
    if (!this.repack) return [w.data, type];
    const n = w.shape[w.shape.length - 1], rows = w.shape.length ? w.shape.slice(0, -1).reduce((a, b) => a * b, 1) : 0;
    let r = repacked.get(w.data);
    if (r === undefined) {
      r = repackedBytes + w.data.length <= REPACK_LIMIT ? this.addon.repack(w.data, type, rows, n) : null;
      if (r) repackedBytes += r.data.length;
      repacked.set(w.data, r);
    }
    return r ? [r.data, r.type] : [w.data, type];
  }

  /** CPU path, kernel set and thread count, for messages. */
  info(): NativeInfo {
    return { ...this.addon.info(), threads: this.threads };
  }

  /** Whether `dtype` weights run natively (otherwise matmul / moeFFN fall back to the ref backend). */
  supports(dtype: DType): boolean {
    let s = this.supported.get(dtype);
    if (s === undefined) this.supported.set(dtype, (s = this.addon.supports(dtypeInfo(dtype).ggmlType)));
    return s;
  }

  private pool(): void {
    if (poolThreads !== this.threads) poolThreads = this.addon.setThreads(this.threads) === this.threads ? this.threads : 0;
  }

  matmul(out: Float32Array, x: Float32Array, rows: number, w: Tensor): void {
    if (w.shape.length !== 2) throw new Error(`matmul: weight must be 2-D, got [${w.shape.join(', ')}]`);
    const [outDim, inDim] = w.shape;
    if (x.length < rows * inDim) throw new Error(`matmul: input has ${x.length} values, need ${rows} x ${inDim}`);
    if (out.length < rows * outDim) throw new Error(`matmul: output has ${out.length} values, need ${rows} x ${outDim}`);
    if (rows === 0) return;
    this.pool();
    // Types neither the float kernels nor quant.c handle (q8_1, q8_k weights: never in model files) use ref.ts.
    if (!this.supports(w.dtype) || !this.addon.matmul(out, x, rows, ...this.weight(w), outDim, inDim)) {
      this.ref.matmul(out, x, rows, w);
    }
  }

  matmulMany(outs: readonly Float32Array[], x: Float32Array, rows: number, ws: readonly Tensor[]): void {
    if (outs.length !== ws.length) throw new Error(`matmulMany: ${outs.length} outputs for ${ws.length} weights`);
    const inDim = ws[0]?.shape[1];
    const fused = ws.length > 1 && ws.length <= 16 && rows > 0 &&
      ws.every((w, i) => w.shape.length === 2 && w.shape[1] === inDim && this.supports(w.dtype) && outs[i].length >= rows * w.shape[0]) &&
      x.length >= rows * inDim;
    if (fused) {
      this.pool();
      const packed = ws.map((w) => this.weight(w));
      if (this.addon.matmulMany([...outs], x, rows, packed.map((p) => p[0]), packed.map((p) => p[1]), ws.map((w) => w.shape[0]), inDim)) return;
    }
    ws.forEach((w, i) => this.matmul(outs[i], x, rows, w)); // one at a time (and matmul's own checks and messages)
  }

  prepareWeights(ws: readonly Tensor[]): void {
    if (!this.repack) return;
    const todo = ws.filter((w) => w.shape.length >= 2 && this.supports(w.dtype) && !repacked.has(w.data));
    const total = todo.reduce((s, w) => s + w.data.length, 0);
    // Copies run at memory speed (~1 GB/s with the page faults): a line only for the slow ones.
    const progress = total >= 512 * 2 ** 20 ? new Progress({ label: 'copying weights to the engine\'s memory', total }) : null;
    let done = 0;
    for (const w of todo) {
      this.weight(w);
      progress?.update((done += w.data.length));
    }
    progress?.finish();
  }

  prefetch(ws: readonly Tensor[]): void {
    if (this.threads < 2) return;
    this.addon.prefetch(ws.map((w) => this.weight(w)[0]));
  }

  toF16(dst: Uint16Array, src: Float32Array): void {
    this.addon.toF16(dst, src);
  }

  rmsNorm(out: Float32Array, x: Float32Array, rows: number, weight: Float32Array, eps: number): void {
    if (rows === 0) return;
    this.pool();
    this.addon.rmsNorm(out, x, rows, weight, eps);
  }

  rope(x: Float32Array, rows: number, nHeads: number, headDim: number, positions: Int32Array, theta: number): void {
    if (rows === 0) return;
    this.pool();
    this.addon.rope(x, rows, nHeads, headDim, positions, theta);
  }

  attention(out: Float32Array, q: Float32Array, rows: number, start: number, kCache: KvCache, vCache: KvCache, s: AttentionShape): void {
    if (rows === 0) return;
    checkKvCache(kCache, vCache, s.kvF16);
    if (s.slidingWindow !== null && !(Number.isInteger(s.slidingWindow) && s.slidingWindow > 0)) {
      throw new Error(`attention: sliding window must be a positive integer or null, got ${s.slidingWindow}`);
    }
    this.pool();
    this.addon.attention(out, q, rows, start, kCache, vCache, s.nHeads, s.nKvHeads, s.headDim, s.scale, s.slidingWindow ?? 0, s.kvF16);
  }

  moeFFN(out: Float32Array, x: Float32Array, rows: number, experts: Int32Array, weights: Float32Array, k: number, gate: Tensor, up: Tensor, down: Tensor): void {
    if (gate.shape.length !== 3 || up.shape.length !== 3 || down.shape.length !== 3) {
      throw new Error(`moeFFN: expert weights must be 3-D [E, out, in], got [${gate.shape}], [${up.shape}], [${down.shape}]`);
    }
    const [nExperts, ffn, dim] = gate.shape;
    if (up.shape[0] !== nExperts || up.shape[1] !== ffn || up.shape[2] !== dim || down.shape[0] !== nExperts || down.shape[1] !== dim || down.shape[2] !== ffn) {
      throw new Error(`moeFFN: gate [${gate.shape}], up [${up.shape}] and down [${down.shape}] do not fit together`);
    }
    if (rows === 0) return;
    this.pool();
    const ok = this.supports(gate.dtype) && this.supports(up.dtype) && this.supports(down.dtype) &&
      this.addon.moeFFN(out, x, rows, experts, weights, k, ...this.weight(gate), ...this.weight(up),
        ...this.weight(down), nExperts, ffn, dim);
    if (!ok) this.ref.moeFFN(out, x, rows, experts, weights, k, gate, up, down); // an unsupported expert dtype
  }
}
