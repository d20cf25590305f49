// Training's heavy products on the native addon's f32 GEMM (native/src: AVX-512 / AVX2 tiles on the thread pool).
// The addon multiplies row by row, out[r, j] = dot(a row r, b row j), so every product here is that form over
// transposed copies where needed: dx = dy W needs W^T, dw = dy^T x needs dy^T and x^T. The copies are O(size) next to
// the O(m n k) products. Float64 arrays (gradient checks) go to the ref kernels unchanged.

import type { Float } from './tape.js';
import { refKernels, type GradKernels } from './kernels.js';
import { nativeCompute } from '../backend/native.js';
import { selectBackend, type SelectBackendOptions } from '../backend/select.js';

const F32 = 0; // GGML type id of f32 weights

/** Grow-only scratch buffers, reused across calls (training calls the same shapes every step). */
class Scratch {
  private bufs: Float32Array[] = [];
  get(slot: number, n: number): Float32Array {
    let b = this.bufs[slot];
    if (!b || b.length < n) this.bufs[slot] = b = new Float32Array(Math.max(n, Math.ceil((b?.length ?? 0) * 1.5)));
    return b.subarray(0, n);
  }
}

/** The native kernels, or null when the addon is not built (then training stays on refKernels). */
export function nativeGradKernels(): GradKernels | null {
  const addon = nativeCompute();
  if (!addon) return null;
  const s = new Scratch();
  const bytes = (a: Float32Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  /** c[m, n] (+)= a[m, k] . b[n, k]^T over views at offsets. */
  const gemmNT = (c: Float32Array, co: number, a: Float32Array, ao: number, b: Float32Array, bo: number, m: number, n: number, k: number, accumulate: boolean) => {
    if (m === 0 || n === 0) return;
    const out = c.subarray(co, co + m * n);
    if (k === 0) {
      if (!accumulate) out.fill(0);
      return;
    }
    if (!addon.matmul(out, a.subarray(ao, ao + m * k), m, bytes(b.subarray(bo, bo + n * k)), F32, n, k, accumulate)) throw new Error('native f32 matmul refused its arguments');
  };
  const transposed = (slot: number, src: Float32Array, off: number, rows: number, cols: number) => {
    const dst = s.get(slot, rows * cols);
    addon.transpose(dst, src.subarray(off, off + rows * cols), rows, cols);
    return dst;
  };
  const backward = (dy: Float32Array, dyo: number, x: Float32Array, xo: number, w: Float32Array, wo: number, m: number, k: number, n: number, dx: Float32Array | null, dw: Float32Array | null) => {
    if (dx) gemmNT(dx, xo, dy, dyo, transposed(1, w, wo, n, k), 0, m, k, n, true);
    if (dw) gemmNT(dw, wo, transposed(2, dy, dyo, m, n), 0, transposed(3, x, xo, m, k), 0, n, k, m, true);
  };
  const f32 = (...a: (Float | null)[]) => a.every((v) => v === null || v instanceof Float32Array);
  return {
    name: 'native',
    matmul(y, x, w, m, k, n) {
      if (!f32(y, x, w)) return refKernels.matmul(y, x, w, m, k, n);
      gemmNT(y as Float32Array, 0, x as Float32Array, 0, w as Float32Array, 0, m, n, k, false);
    },
    matmulBackward(dy, x, w, m, k, n, dx, dw) {
      if (!f32(dy, x, w, dx, dw)) return refKernels.matmulBackward(dy, x, w, m, k, n, dx, dw);
      backward(dy as Float32Array, 0, x as Float32Array, 0, w as Float32Array, 0, m, k, n, dx as Float32Array | null, dw as Float32Array | null);
    },
    groupedMatmul(y, x, w, offsets, k, n) {
      if (!f32(y, x, w)) return refKernels.groupedMatmul(y, x, w, offsets, k, n);
      for (let e = 0; e + 1 < offsets.length; e++) {
        const r0 = offsets[e], rows = offsets[e + 1] - r0;
        if (rows > 0) gemmNT(y as Float32Array, r0 * n, x as Float32Array, r0 * k, w as Float32Array, e * n * k, rows, n, k, false);
      }
    },
    groupedMatmulBackward(dy, x, w, offsets, k, n, dx, dw) {
      if (!f32(dy, x, w, dx, dw)) return refKernels.groupedMatmulBackward(dy, x, w, offsets, k, n, dx, dw);
      for (let e = 0; e + 1 < offsets.length; e++) {
        const r0 = offsets[e], rows = offsets[e + 1] - r0;
        if (rows > 0) backward(dy as Float32Array, r0 * n, x as Float32Array, r0 * k, w as Float32Array, e * n * k, rows, k, n, dx as Float32Array | null, dw as Float32Array | null);
      }
    },
    attentionForward(out, probs, q, k, v, d) {
      if (!f32(out, q, k, v)) return refKernels.attentionForward(out, probs, q, k, v, d);
      addon.trainAttention(out as Float32Array, probs, q as Float32Array, k as Float32Array, v as Float32Array, d.batch, d.seqLen, d.nHeads, d.nKvHeads, d.headDim, d.slidingWindow ?? 0);
    },
    attentionBackward(g, probs, q, k, v, dq, dk, dv, d) {
      if (!f32(g, q, k, v, dq, dk, dv)) return refKernels.attentionBackward(g, probs, q, k, v, dq, dk, dv, d);
      addon.trainAttentionBackward(g as Float32Array, probs, q as Float32Array, k as Float32Array, v as Float32Array, dq as Float32Array | null,
        dk as Float32Array | null, dv as Float32Array | null, d.batch, d.seqLen, d.nHeads, d.nKvHeads, d.headDim, d.slidingWindow ?? 0);
    },
    crossEntropyBackward(dz, probs, targets, rows, n, c) {
      if (!f32(dz, probs)) return refKernels.crossEntropyBackward(dz, probs, targets, rows, n, c);
      addon.crossEntropyBackward(dz as Float32Array, probs as Float32Array, targets instanceof Int32Array ? targets : Int32Array.from(targets), rows, n, c);
    },
    adamw(p, g, m, v, h) {
      if (!f32(p, g, m, v)) return refKernels.adamw(p, g, m, v, h);
      addon.adamw(p as Float32Array, g as Float32Array, m as Float32Array, v as Float32Array, h.beta1, h.beta2, h.stepSize, h.bc2Sqrt, h.eps, h.decay);
    },
    softmaxRows(x, rows, n, lse, probs) {
      if (!f32(x, probs) || n === 0) return refKernels.softmaxRows(x, rows, n, lse, probs);
      addon.softmaxRows(x as Float32Array, rows, n, lse, probs as Float32Array | null);
    },
  };
}

/**
 * The kernels training should use, chosen as inference chooses its backend (select.ts: --backend / MOE_BACKEND,
 * native when built, else ref with one notice); for native this also sets the kernel thread count.
 */
export function selectGradKernels(opts: SelectBackendOptions = {}): GradKernels {
  const be = selectBackend(opts);
  return (be.name === 'native' && nativeGradKernels()) || refKernels;
}
