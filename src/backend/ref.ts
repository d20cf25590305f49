import { checkKvCache, type AttentionShape, type Backend, type KvCache } from './backend.js';
import type { Tensor } from '../tensor/tensor.js';
import { sliceFirst } from '../tensor/tensor.js';
import { dotRow, prepareActivation } from '../tensor/quant.js';
import { floatToHalf, halfTableF32, roundF16 } from '../tensor/f16.js';

const fr = Math.fround;

/**
 * The reference backend: plain TypeScript, one thread, written to be obviously right and to follow llama.cpp's CPU
 * arithmetic (activations converted to the weight's vec_dot type before each dot product, f32 softmax and norms),
 * so that its logits match llama.cpp's on the same file. Every other backend is tested against this one.
 */
export class RefBackend implements Backend {
  readonly name = 'ref';

  matmul(out: Float32Array, x: Float32Array, rows: number, w: Tensor): void {
    if (w.shape.length !== 2) throw new Error(`matmul: weight must be 2-D, got [${w.shape.join(', ')}]`);
    const [outDim, inDim] = w.shape;
    if (x.length < rows * inDim) throw new Error(`matmul: input has ${x.length} values, need ${rows} x ${inDim}`);
    if (out.length < rows * outDim) throw new Error(`matmul: output has ${out.length} values, need ${rows} x ${outDim}`);
    const rowBytes = w.data.length / outDim;
    for (let r = 0; r < rows; r++) {
      const act = prepareActivation(w.dtype, x, r * inDim, inDim);
      const o = r * outDim;
      for (let j = 0; j < outDim; j++) out[o + j] = dotRow(w.dtype, w.data, j * rowBytes, act);
    }
  }

  matmulMany(outs: readonly Float32Array[], x: Float32Array, rows: number, ws: readonly Tensor[]): void {
    if (outs.length !== ws.length) throw new Error(`matmulMany: ${outs.length} outputs for ${ws.length} weights`);
    ws.forEach((w, i) => this.matmul(outs[i], x, rows, w));
  }

  prepareWeights(): void {
    // dotRow reads every weight type where it lies: nothing to ready.
  }

  toF16(dst: Uint16Array, src: Float32Array): void {
    if (dst.length < src.length) throw new Error(`toF16: dst holds ${dst.length} values, need ${src.length}`);
    for (let i = 0; i < src.length; i++) dst[i] = floatToHalf(src[i]);
  }

  rmsNorm(out: Float32Array, x: Float32Array, rows: number, weight: Float32Array, eps: number): void {
    const dim = weight.length;
    for (let r = 0; r < rows; r++) {
      const o = r * dim;
      let sum = 0; // ggml sums in double
      for (let i = 0; i < dim; i++) sum += x[o + i] * x[o + i];
      const scale = fr(1 / Math.sqrt(fr(sum / dim + eps)));
      for (let i = 0; i < dim; i++) out[o + i] = fr(fr(x[o + i] * scale) * weight[i]);
    }
  }

  rope(x: Float32Array, rows: number, nHeads: number, headDim: number, positions: Int32Array, theta: number): void {
    // ggml's rope cache: theta_i = pos * base^(-2i/d), built by repeated multiplication in f32.
    const thetaScale = fr(Math.pow(theta, -2 / headDim));
    const cos = new Float32Array(headDim / 2);
    const sin = new Float32Array(headDim / 2);
    for (let r = 0; r < rows; r++) {
      let t = fr(positions[r]);
      for (let i = 0; i < headDim / 2; i++) {
        cos[i] = Math.cos(t);
        sin[i] = Math.sin(t);
        t = fr(t * thetaScale);
      }
      for (let h = 0; h < nHeads; h++) {
        const base = r * nHeads * headDim + h * headDim;
        for (let i = 0; i < headDim / 2; i++) {
          const x0 = x[base + 2 * i];
          const x1 = x[base + 2 * i + 1];
          x[base + 2 * i] = fr(fr(x0 * cos[i]) - fr(x1 * sin[i]));
          x[base + 2 * i + 1] = fr(fr(x0 * sin[i]) + fr(x1 * cos[i]));
        }
      }
    }
  }

  attention(out: Float32Array, q: Float32Array, rows: number, start: number, kCache: KvCache, vCache: KvCache, s: AttentionShape): void {
    const { nHeads, nKvHeads, headDim: hd, scale, slidingWindow, kvF16 } = s;
    checkKvCache(kCache, vCache, kvF16);
    // f16 caches are read through the 65536-entry table (exact: every f16 is an f32).
    const kv = (c: KvCache): Float32Array | null => (c instanceof Uint16Array ? halfTableF32() : null);
    const kt = kv(kCache), vt = kv(vCache);
    const group = nHeads / nKvHeads;
    const kvStride = nKvHeads * hd;
    const total = start + rows;
    const scores = new Float64Array(total);
    const qh = new Float32Array(hd);
    for (let r = 0; r < rows; r++) {
      const i = start + r; // absolute position of this query
      const jMin = slidingWindow === null ? 0 : Math.max(0, i - slidingWindow + 1);
      for (let h = 0; h < nHeads; h++) {
        const kvh = Math.floor(h / group);
        const qOff = r * nHeads * hd + h * hd;
        for (let d = 0; d < hd; d++) qh[d] = kvF16 ? roundF16(q[qOff + d]) : q[qOff + d];
        let max = -Infinity;
        for (let j = jMin; j <= i; j++) {
          const kOff = j * kvStride + kvh * hd;
          let dot = 0;
          if (kt) for (let d = 0; d < hd; d++) dot += qh[d] * kt[kCache[kOff + d]];
          else for (let d = 0; d < hd; d++) dot += qh[d] * kCache[kOff + d];
          const v = fr(fr(dot) * scale);
          scores[j] = v;
          if (v > max) max = v;
        }
        let sum = 0;
        for (let j = jMin; j <= i; j++) {
          const e = fr(Math.exp(scores[j] - max));
          scores[j] = e;
          sum += e;
        }
        const inv = fr(1 / sum);
        const oOff = r * nHeads * hd + h * hd;
        for (let d = 0; d < hd; d++) out[oOff + d] = 0;
        for (let j = jMin; j <= i; j++) {
          let p = fr(scores[j] * inv);
          if (kvF16) p = roundF16(p);
          const vOff = j * kvStride + kvh * hd;
          if (vt) for (let d = 0; d < hd; d++) out[oOff + d] += p * vt[vCache[vOff + d]];
          else for (let d = 0; d < hd; d++) out[oOff + d] += p * vCache[vOff + d];
        }
      }
    }
  }

  moeFFN(out: Float32Array, x: Float32Array, rows: number, experts: Int32Array, weights: Float32Array, k: number, gate: Tensor, up: Tensor, down: Tensor): void {
    const [nExperts, ffn, dim] = gate.shape;
    // Per-slot results, summed in slot order at the end as llama.cpp does (exact for any k).
    const slotOut = new Float32Array(rows * k * dim);
    // Group token-slots by expert.
    const slotsOf: number[][] = Array.from({ length: nExperts }, () => []);
    for (let i = 0; i < rows * k; i++) {
      const e = experts[i];
      if (!(e >= 0 && e < nExperts)) throw new Error(`moeFFN: expert id ${e} out of range 0..${nExperts - 1}`);
      slotsOf[e].push(i);
    }
    for (let e = 0; e < nExperts; e++) {
      const slots = slotsOf[e];
      const n = slots.length;
      if (n === 0) continue;
      const xe = new Float32Array(n * dim);
      for (let t = 0; t < n; t++) xe.set(x.subarray(Math.floor(slots[t] / k) * dim, Math.floor(slots[t] / k) * dim + dim), t * dim);
      const g = new Float32Array(n * ffn);
      const u = new Float32Array(n * ffn);
      this.matmul(g, xe, n, sliceFirst(gate, e));
      this.matmul(u, xe, n, sliceFirst(up, e));
      for (let i = 0; i < n * ffn; i++) g[i] = fr(fr(g[i] / fr(1 + fr(Math.exp(-g[i])))) * u[i]);
      const d = new Float32Array(n * dim);
      this.matmul(d, g, n, sliceFirst(down, e));
      for (let t = 0; t < n; t++) {
        const w = weights[slots[t]];
        const o = slots[t] * dim;
        for (let i = 0; i < dim; i++) slotOut[o + i] = fr(d[t * dim + i] * w);
      }
    }
    for (let r = 0; r < rows; r++) {
      for (let i = 0; i < dim; i++) {
        let acc = slotOut[r * k * dim + i];
        for (let s = 1; s < k; s++) acc = fr(acc + slotOut[(r * k + s) * dim + i]);
        out[r * dim + i] = acc;
      }
    }
  }
}
