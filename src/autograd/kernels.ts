// The heavy arithmetic of training, behind one small interface so a faster backend (native C, WASM) can take it
// over: the dense matmul y = x W^T with its backward, and the grouped expert GEMM (rows sorted by expert, one GEMM
// per expert over its rows) with its backward. Everything else in the tape is O(activations) and stays in JS.
//
// All arrays are row-major; x is [m, k], W is [n, k] (PyTorch/HF Linear layout, [out, in]), y is [m, n].
// Backward kernels ADD into dx / dw (gradient accumulation); a null target is skipped.

import type { Float } from './tape.js';

/** The per-step scalars of an AdamW update (bias corrections folded in). */
export interface AdamWScalars {
  beta1: number;
  beta2: number;
  stepSize: number;
  bc2Sqrt: number;
  eps: number;
  decay: number;
}

/** The shape of a training attention call (see ops.ts attention). */
export interface AttentionDims {
  batch: number;
  seqLen: number;
  nHeads: number;
  nKvHeads: number;
  headDim: number;
  /** Key j is visible from query i iff j <= i and (null or i - j < slidingWindow). */
  slidingWindow: number | null;
}

export interface GradKernels {
  readonly name: string;
  /** y[m, n] = x[m, k] W[n, k]^T (overwrites y). */
  matmul(y: Float, x: Float, w: Float, m: number, k: number, n: number): void;
  /** dx[m, k] += dy[m, n] W[n, k];  dw[n, k] += dy[m, n]^T x[m, k]. */
  matmulBackward(dy: Float, x: Float, w: Float, m: number, k: number, n: number, dx: Float | null, dw: Float | null): void;
  /**
   * Grouped GEMM over stacked weights W [E, n, k]: rows offsets[e] .. offsets[e+1]-1 of x use W[e].
   * offsets has E+1 non-decreasing entries, offsets[0] = 0, offsets[E] = rows of x. Experts without rows cost nothing.
   */
  groupedMatmul(y: Float, x: Float, w: Float, offsets: Int32Array, k: number, n: number): void;
  /** Backward of groupedMatmul: dx rows from their expert's W; dw[e] += dy_e^T x_e for each expert with rows. */
  groupedMatmulBackward(dy: Float, x: Float, w: Float, offsets: Int32Array, k: number, n: number, dx: Float | null, dw: Float | null): void;
  /**
   * For each row of x [rows, n] (the cross-entropy's logits): lse[r] = log sum_j exp(x[r, j]) and, when probs is
   * given, probs[r, j] = exp(x[r, j] - lse[r]).
   */
  softmaxRows(x: Float, rows: number, n: number, lse: Float64Array, probs: Float | null): void;
  /**
   * Cross-entropy backward: dz[r, :] += c probs[r, :] and dz[r, targets[r]] -= c, for rows with targets[r] >= 0.
   * When dz is probs itself (the same array) it is overwritten instead: dz = c (probs - onehot), rows with a
   * negative target set to zero.
   */
  crossEntropyBackward(dz: Float, probs: Float, targets: ArrayLike<number>, rows: number, n: number, c: number): void;
  /**
   * One AdamW update (see workflows/optimizer.ts AdamW.step, which computes the scalars):
   * m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p = p * decay - stepSize m / (sqrt(v) / bc2Sqrt + eps).
   */
  adamw(p: Float, g: Float, m: Float, v: Float, h: AdamWScalars): void;
  /**
   * Causal grouped-query attention: q [B*T, H*hd], k and v [B*T, KV*hd] -> out [B*T, H*hd]; scores scaled by
   * 1/sqrt(hd); probs [B, H, T, T] receives the attention probabilities (zero where masked) for the backward.
   */
  attentionForward(out: Float, probs: Float64Array, q: Float, k: Float, v: Float, d: AttentionDims): void;
  /** Adds the gradients of q, k and v (null: not wanted) for the output gradient g. */
  attentionBackward(g: Float, probs: Float64Array, q: Float, k: Float, v: Float, dq: Float | null, dk: Float | null, dv: Float | null, d: AttentionDims): void;
}

/**
 * Plain TypeScript kernels: every product is a row-times-row dot product (gemmNT) summed in double with one
 * rounding on store; backward transposes the operands so it runs through the same loop. The oracle for other
 * backends.
 */
export const refKernels: GradKernels = {
  name: 'ref',

  matmul(y, x, w, m, k, n) {
    gemmNT(y, 0, x, 0, w, 0, m, n, k, false);
  },

  matmulBackward(dy, x, w, m, k, n, dx, dw) {
    mmBackward(dy, 0, x, 0, w, 0, m, k, n, dx, dw);
  },

  groupedMatmul(y, x, w, offsets, k, n) {
    const E = offsets.length - 1;
    for (let e = 0; e < E; e++) {
      const r0 = offsets[e];
      const rows = offsets[e + 1] - r0;
      if (rows > 0) gemmNT(y, r0 * n, x, r0 * k, w, e * n * k, rows, n, k, false);
    }
  },

  groupedMatmulBackward(dy, x, w, offsets, k, n, dx, dw) {
    const E = offsets.length - 1;
    for (let e = 0; e < E; e++) {
      const r0 = offsets[e];
      const rows = offsets[e + 1] - r0;
      if (rows > 0) mmBackward(dy, r0 * n, x, r0 * k, w, e * n * k, rows, k, n, dx, dw);
    }
  },

  softmaxRows(x, rows, n, lse, probs) {
    for (let r = 0; r < rows; r++) {
      const o = r * n;
      let max = -Infinity;
      for (let j = 0; j < n; j++) if (x[o + j] > max) max = x[o + j];
      let sum = 0;
      for (let j = 0; j < n; j++) sum += Math.exp(x[o + j] - max);
      lse[r] = max === -Infinity ? -Infinity : max + Math.log(sum);
      if (probs) for (let j = 0; j < n; j++) probs[o + j] = Math.exp(x[o + j] - lse[r]);
    }
  },

  crossEntropyBackward(dz, probs, targets, rows, n, c) {
    const inPlace = dz === probs;
    for (let i = 0; i < rows; i++) {
      const o = i * n;
      if (targets[i] < 0) {
        if (inPlace) dz.fill(0, o, o + n);
        continue;
      }
      if (inPlace) for (let v = 0; v < n; v++) dz[o + v] = c * probs[o + v];
      else for (let v = 0; v < n; v++) dz[o + v] += c * probs[o + v];
      dz[o + targets[i]] -= c;
    }
  },

  adamw(d, g, m, v, h) {
    const { beta1, beta2, stepSize, bc2Sqrt, eps, decay } = h;
    for (let j = 0; j < d.length; j++) {
      const gj = g[j];
      m[j] = beta1 * m[j] + (1 - beta1) * gj;
      v[j] = beta2 * v[j] + (1 - beta2) * gj * gj;
      d[j] = d[j] * decay - (stepSize * m[j]) / (Math.sqrt(v[j]) / bc2Sqrt + eps);
    }
  },

  attentionForward(out, probs, qd, kd, vd, d) {
    const { batch: B, seqLen: T, nHeads: H, nKvHeads: KV, headDim: hd, slidingWindow: win } = d;
    const qs = H * hd, ks = KV * hd, group = H / KV;
    const scale = 1 / Math.sqrt(hd);
    for (let b = 0; b < B; b++) {
      for (let h = 0; h < H; h++) {
        const kvh = Math.floor(h / group);
        for (let i = 0; i < T; i++) {
          const qo = (b * T + i) * qs + h * hd;
          const po = ((b * H + h) * T + i) * T;
          const j0 = win === null ? 0 : Math.max(0, i - win + 1);
          let max = -Infinity;
          for (let j = j0; j <= i; j++) {
            const ko = (b * T + j) * ks + kvh * hd;
            let s = 0;
            for (let e = 0; e < hd; e++) s += qd[qo + e] * kd[ko + e];
            s *= scale;
            probs[po + j] = s;
            if (s > max) max = s;
          }
          let sum = 0;
          for (let j = j0; j <= i; j++) {
            const e = Math.exp(probs[po + j] - max);
            probs[po + j] = e;
            sum += e;
          }
          for (let j = j0; j <= i; j++) probs[po + j] /= sum;
          const acc = new Float64Array(hd);
          for (let j = j0; j <= i; j++) {
            const pj = probs[po + j];
            const vo = (b * T + j) * ks + kvh * hd;
            for (let e = 0; e < hd; e++) acc[e] += pj * vd[vo + e];
          }
          for (let e = 0; e < hd; e++) out[qo + e] = acc[e];
        }
      }
    }
  },

  attentionBackward(g, probs, qd, kd, vd, dq, dk, dv, d) {
    const { batch: B, seqLen: T, nHeads: H, nKvHeads: KV, headDim: hd, slidingWindow: win } = d;
    const qs = H * hd, ks = KV * hd, group = H / KV;
    const scale = 1 / Math.sqrt(hd);
    const dp = new Float64Array(T);
    for (let b = 0; b < B; b++) {
      for (let h = 0; h < H; h++) {
        const kvh = Math.floor(h / group);
        for (let i = 0; i < T; i++) {
          const qo = (b * T + i) * qs + h * hd;
          const po = ((b * H + h) * T + i) * T;
          const j0 = win === null ? 0 : Math.max(0, i - win + 1);
          // dP_ij = dO_i . V_j ; dV_j += P_ij dO_i ; dS = P (dP - sum_j P dP).
          let dot = 0;
          for (let j = j0; j <= i; j++) {
            const vo = (b * T + j) * ks + kvh * hd;
            let s = 0;
            for (let e = 0; e < hd; e++) s += g[qo + e] * vd[vo + e];
            dp[j] = s;
            dot += probs[po + j] * s;
            if (dv) {
              const pj = probs[po + j];
              for (let e = 0; e < hd; e++) dv[vo + e] += pj * g[qo + e];
            }
          }
          for (let j = j0; j <= i; j++) {
            const ds = probs[po + j] * (dp[j] - dot) * scale;
            if (ds === 0) continue;
            const ko = (b * T + j) * ks + kvh * hd;
            if (dq) for (let e = 0; e < hd; e++) dq[qo + e] += ds * kd[ko + e];
            if (dk) for (let e = 0; e < hd; e++) dk[ko + e] += ds * qd[qo + e];
          }
        }
      }
    }
  },
};

/**
 * c[m, n] = (or +=) a[m, kk] b[n, kk]^T, operands at offsets. Blocked 2 rows x 4 columns so each loaded value
 * serves several products (about 3x a plain triple loop in V8); each output is still one dot product summed in
 * order, so the result is the same as the plain loop's.
 */
function gemmNT(c: Float, co: number, a: Float, ao: number, b: Float, bo: number, m: number, n: number, kk: number, accumulate: boolean): void {
  let r = 0;
  for (; r + 2 <= m; r += 2) {
    const a0 = ao + r * kk;
    const a1 = a0 + kk;
    let j = 0;
    for (; j + 4 <= n; j += 4) {
      const b0 = bo + j * kk;
      const b1 = b0 + kk;
      const b2 = b1 + kk;
      const b3 = b2 + kk;
      let s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
      for (let i = 0; i < kk; i++) {
        const x0 = a[a0 + i];
        const x1 = a[a1 + i];
        const w0 = b[b0 + i];
        const w1 = b[b1 + i];
        const w2 = b[b2 + i];
        const w3 = b[b3 + i];
        s00 += x0 * w0; s01 += x0 * w1; s02 += x0 * w2; s03 += x0 * w3;
        s10 += x1 * w0; s11 += x1 * w1; s12 += x1 * w2; s13 += x1 * w3;
      }
      const o0 = co + r * n + j;
      const o1 = o0 + n;
      c[o0] = accumulate ? c[o0] + s00 : s00;
      c[o0 + 1] = accumulate ? c[o0 + 1] + s01 : s01;
      c[o0 + 2] = accumulate ? c[o0 + 2] + s02 : s02;
      c[o0 + 3] = accumulate ? c[o0 + 3] + s03 : s03;
      c[o1] = accumulate ? c[o1] + s10 : s10;
      c[o1 + 1] = accumulate ? c[o1 + 1] + s11 : s11;
      c[o1 + 2] = accumulate ? c[o1 + 2] + s12 : s12;
      c[o1 + 3] = accumulate ? c[o1 + 3] + s13 : s13;
    }
    for (; j < n; j++) {
      const bj = bo + j * kk;
      let s0 = 0, s1 = 0;
      for (let i = 0; i < kk; i++) {
        s0 += a[a0 + i] * b[bj + i];
        s1 += a[a1 + i] * b[bj + i];
      }
      const o0 = co + r * n + j;
      const o1 = o0 + n;
      c[o0] = accumulate ? c[o0] + s0 : s0;
      c[o1] = accumulate ? c[o1] + s1 : s1;
    }
  }
  for (; r < m; r++) {
    const ar = ao + r * kk;
    for (let j = 0; j < n; j++) {
      const bj = bo + j * kk;
      let s = 0;
      for (let i = 0; i < kk; i++) s += a[ar + i] * b[bj + i];
      const o = co + r * n + j;
      c[o] = accumulate ? c[o] + s : s;
    }
  }
}

/** The [cols, rows] transpose of src[off ..] viewed as [rows, cols], in a new array of the same precision. */
function transpose(src: Float, off: number, rows: number, cols: number): Float {
  const t = src instanceof Float64Array ? new Float64Array(rows * cols) : new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) t[c * rows + r] = src[off + r * cols + c];
  return t;
}

/** dx[m, k] += dy[m, n] W[n, k] and dw[n, k] += dy^T x, both as gemmNT over transposed copies. */
function mmBackward(dy: Float, dyo: number, x: Float, xo: number, w: Float, wo: number, m: number, k: number, n: number, dx: Float | null, dw: Float | null): void {
  if (dx) gemmNT(dx, xo, dy, dyo, transpose(w, wo, n, k), 0, m, k, n, true);
  if (dw) gemmNT(dw, wo, transpose(dy, dyo, m, n), 0, transpose(x, xo, m, k), 0, n, k, m, true);
}

let current: GradKernels = refKernels;

/** The kernels the tape's ops use now. */
export function gradKernels(): GradKernels {
  return current;
}

/** Switches the kernels the ops use (returns the previous ones, so a test can restore them). */
export function setGradKernels(k: GradKernels): GradKernels {
  const prev = current;
  current = k;
  return prev;
}
