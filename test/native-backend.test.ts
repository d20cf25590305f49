// The native backend (native/src via the N-API addon) against the ref backend (src/backend/ref.ts, the oracle that
// follows llama.cpp's arithmetic), op by op on seeded random inputs of awkward sizes, for every kernel set this CPU
// has (avx512 / avx2 / generic) and 1..4 threads; then whole models against the logits llama.cpp stored.
//
// Tolerances, from what may legitimately differ:
// - Sums: the kernels add in a different order (SIMD lanes, blocks) than ref.ts. An f32 sum of n terms is off by at
//   most about (terms per lane + lanes) * 2^-24 of the sum of |terms| (the "magnitude"); 1e-5 of the magnitude
//   covers every size here. Activations are converted exactly as ref.ts converts them (f16 / bf16 rounding, q8_0 /
//   q8_1 / q8_K blocks), so the products are the same and only the order of the additions differs.
// - rmsnorm and rope do the same f32 operations in the same order as ref.ts; only the double-precision sum of
//   squares (rmsnorm) and libm's cos/sin against V8's (rope) may differ in the last bit: a few ulps.
// - attention: scores are f32 dots (ref.ts sums in double), so each score is off by <= 1e-5 of its magnitude; a
//   softmax input off by d moves each probability by a factor within exp(+-2d).
// - Rounding an intermediate (f16-KV probabilities; the MoE hidden row converted for the down projection) can
//   amplify a last-bit difference into a whole rounding step where a value sits next to a rounding boundary. The
//   bounds allow exactly that where it is possible (attention) or as a step per element (MoE; there, in addition,
//   at least 90% of the outputs must meet the bound without any rounding step: a flip changes only the rows of the
//   one slot it occurs in, and each element flips with a probability of about 1e-4).
// Results must also be bit-identical for every thread count and whatever rows are batched together (work is split
// without changing any summation order): a sequence gets the same logits alone or in the server's batch.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { NativeBackend, nativeBackendError, nativeCompute } from '../src/backend/native.js';
import { RefBackend } from '../src/backend/ref.js';
import { selectBackend } from '../src/backend/select.js';
import type { AttentionShape } from '../src/backend/backend.js';
import { dequantize, quantize, vecDotType } from '../src/tensor/quant.js';
import { floatToHalf, roundF16 } from '../src/tensor/f16.js';
import { dtypeInfo, type DType } from '../src/tensor/dtype.js';
import { sliceFirst, type Tensor } from '../src/tensor/tensor.js';
import { loadModel, type LoadedModel } from '../src/model/load.js';
import { rng } from './gguf-helpers.js';

const loadError = nativeBackendError();
if (loadError) {
  process.stderr.write(`\n!!! native-backend tests SKIPPED: ${loadError}\n!!! build the addon with \`npm run build:native\`\n\n`);
}
const skip = loadError ? `native addon not built: ${loadError}` : false;

test('the native addon is built and loads (required when CI is set)', { skip: loadError && !process.env.CI ? skip : false }, () => {
  assert.equal(loadError, null, `CI is set but the native addon did not load: ${loadError}`);
  const info = new NativeBackend({ threads: 1 }).info();
  assert.ok(['avx512-vnni', 'avx512', 'avx2', 'neon', 'generic'].includes(info.cpu), info.cpu);
});

const ref = new RefBackend();
const THREADS = [1, 2, 3, 4];
const ALL_QUANT: DType[] = ['q4_0', 'q4_1', 'q5_0', 'q5_1', 'q8_0', 'q2_k', 'q3_k', 'q4_k', 'q5_k', 'q6_k'];

/** The kernel sets this CPU can run (avx512, avx2, generic); each test runs all of them. */
function kernelSets(): string[] {
  const a = nativeCompute();
  if (!a) return [];
  const sets = ['avx512', 'avx2', 'generic'].filter((k) => a.setKernels(k));
  a.setKernels('auto');
  return sets;
}

/** Runs fn for every kernel set and thread count; returns each kernel set's results, checked to be thread-independent. */
function everyConfig(what: string, fn: (be: NativeBackend) => Float32Array): void {
  const a = nativeCompute()!;
  try {
    for (const k of kernelSets()) {
      assert.ok(a.setKernels(k));
      let first: Float32Array | null = null;
      for (const t of THREADS) {
        const got = fn(new NativeBackend({ threads: t }));
        if (!first) first = got;
        else assert.ok(bitEqual(first, got), `${what}: ${k} kernels, ${t} threads differ from 1 thread`);
      }
    }
  } finally {
    a.setKernels('auto');
  }
}

function bitEqual(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length), y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
  return true;
}

function randomArray(r: () => number, n: number, scale = 1): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = (r() * 2 - 1) * scale;
  return a;
}

function weights(r: () => number, dtype: DType, shape: number[], scale = 1): Tensor {
  const n = shape.reduce((p, d) => p * d, 1);
  return { dtype, shape, data: quantize(dtype, randomArray(r, n, scale), shape[shape.length - 1]) };
}

/** Checks |got - want| <= tol elementwise; reports the worst offender. */
function within(what: string, got: Float32Array, want: Float32Array, tol: (i: number) => number): void {
  assert.equal(got.length, want.length, `${what}: length`);
  let worst = -1, worstRatio = 0;
  for (let i = 0; i < got.length; i++) {
    const d = Math.abs(got[i] - want[i]);
    const t = tol(i);
    if (!(d <= t)) {
      const ratio = Number.isFinite(d) ? d / t : Infinity;
      if (worst < 0 || ratio > worstRatio) (worst = i), (worstRatio = ratio);
    }
  }
  assert.ok(worst < 0, `${what}: element ${worst}: native ${got[worst]}, ref ${want[worst]}, tolerance ${worst >= 0 ? tol(worst) : 0}`);
}

// ---------------------------------------------------------------------------------------------------------------
// matmul
// ---------------------------------------------------------------------------------------------------------------

/** Largest |x| of each row (bounds the q8 activation rounding: |q8(x) - x| <= amax / 254 per element). */
function rowAmax(x: Float32Array, rows: number, n: number): Float64Array {
  const m = new Float64Array(rows);
  for (let r = 0; r < rows; r++) for (let i = 0; i < n; i++) m[r] = Math.max(m[r], Math.abs(x[r * n + i]));
  return m;
}

/** Per output: the sum of |w * x| over the row (using an upper bound of the converted activation). */
function magnitudes(w: Tensor, x: Float32Array, rows: number): Float64Array {
  const [outDim, inDim] = w.shape;
  const wf = dequantize(w);
  const quant = dtypeInfo(w.dtype).blockSize > 1;
  const amax = rowAmax(x, rows, inDim);
  const m = new Float64Array(rows * outDim);
  for (let r = 0; r < rows; r++) {
    const slack = quant ? amax[r] / 250 : 0;
    const grow = w.dtype === 'f32' ? 1 : 1.01; // f16 / bf16 rounding of x
    for (let j = 0; j < outDim; j++) {
      let s = 0;
      for (let k = 0; k < inDim; k++) s += Math.abs(wf[j * inDim + k]) * (Math.abs(x[r * inDim + k]) * grow + slack);
      m[r * outDim + j] = s;
    }
  }
  return m;
}

function matmulCase(dtype: DType, rows: number, outDim: number, inDim: number, seed: number): void {
  const r = rng(seed);
  const w = weights(r, dtype, [outDim, inDim]);
  const x = randomArray(r, rows * inDim, 2);
  const want = new Float32Array(rows * outDim);
  ref.matmul(want, x, rows, w);
  const mag = magnitudes(w, x, rows);
  everyConfig(`matmul ${dtype} ${rows}x${outDim}x${inDim}`, (be) => {
    const got = new Float32Array(rows * outDim).fill(NaN);
    be.matmul(got, x, rows, w);
    within(`matmul ${dtype} rows ${rows} [${outDim}, ${inDim}]`, got, want, (i) => 1e-5 * mag[i] + 1e-30);
    return got;
  });
}

test('matmul f32 (odd sizes, 1 to 64 rows, every register-tile shape and tail) matches ref', { skip }, () => {
  let seed = 100;
  for (const rows of [1, 3, 4, 5, 17, 64]) {
    for (const [o, i] of [[1, 1], [5, 7], [33, 100], [130, 257], [47, 600]]) matmulCase('f32', rows, o, i, seed++);
  }
});

for (const dtype of ['f16', 'bf16'] as DType[]) {
  test(`matmul ${dtype} (activations rounded to ${dtype} as ref.ts does) matches ref`, { skip }, () => {
    let seed = dtype === 'f16' ? 200 : 300;
    for (const rows of [1, 3, 17, 64]) for (const [o, i] of [[5, 7], [37, 100], [130, 300]]) matmulCase(dtype, rows, o, i, seed++);
  });
}

test('matmul on every quantized type quant.c supports matches ref (activations converted as llama.cpp does)', { skip }, () => {
  const be = new NativeBackend({ threads: 1 });
  const types = ALL_QUANT.filter((t) => be.supports(t));
  assert.ok(types.includes('q8_0') && types.includes('q4_0'), `supported: ${types.join(', ')}`);
  let seed = 400;
  for (const dtype of types) {
    const b = dtypeInfo(dtype).blockSize;
    const shapes: [number, number, number][] = b === 32
      ? [[1, 37, 96], [3, 5, 32], [17, 64, 288], [64, 33, 128]]
      : [[1, 37, 256], [3, 5, 512], [17, 40, 256], [64, 9, 256]];
    for (const [rows, o, i] of shapes) matmulCase(dtype, rows, o, i, seed++);
  }
});

test('matmul is batch-invariant: each row gives the same bits alone as in a batch (for every dtype)', { skip }, () => {
  const be = new NativeBackend({ threads: 3 });
  const types = (['f32', 'f16', 'bf16', ...ALL_QUANT] as DType[]).filter((t) => be.supports(t));
  const r = rng(60);
  for (const dtype of types) {
    const K = dtypeInfo(dtype).blockSize === 256 ? 512 : 96, N = 45, R = 13;
    const w = weights(r, dtype, [N, K]);
    const x = randomArray(r, R * K, 2);
    const batch = new Float32Array(R * N);
    be.matmul(batch, x, R, w);
    for (let i = 0; i < R; i++) {
      const one = new Float32Array(N);
      be.matmul(one, x.subarray(i * K, (i + 1) * K), 1, w);
      assert.ok(bitEqual(one, batch.subarray(i * N, (i + 1) * N)), `${dtype}: row ${i} alone differs from row ${i} of the batch`);
    }
  }
});

test('matmul reads weights at any byte offset (tensors inside a file need not be aligned)', { skip }, () => {
  const r = rng(77);
  for (const dtype of ['f32', 'f16', 'bf16', 'q8_0'] as DType[]) {
    const w = weights(r, dtype, [19, 64]);
    for (const shift of [1, 2, 3]) {
      const buf = new Uint8Array(w.data.length + shift);
      buf.set(w.data, shift);
      const moved: Tensor = { dtype, shape: w.shape, data: buf.subarray(shift) };
      const x = randomArray(r, 3 * 64);
      const want = new Float32Array(3 * 19), got = new Float32Array(3 * 19);
      ref.matmul(want, x, 3, w);
      everyConfig(`matmul ${dtype} at offset ${shift}`, (be) => {
        be.matmul(got, x, 3, moved);
        const mag = magnitudes(w, x, 3);
        within(`matmul ${dtype} at byte offset ${shift}`, got, want, (i) => 1e-5 * mag[i] + 1e-30);
        return got.slice();
      });
    }
  }
});

test('matmul falls back to ref for a weight type without native kernels, and checks its arguments', { skip }, () => {
  const be = new NativeBackend({ threads: 2 });
  const x = new Float32Array(2 * 256);
  const out = new Float32Array(2 * 3);
  // q8_K weights have no kernel anywhere (llama.cpp never stores them): native defers to ref, which refuses them.
  const q8k: Tensor = { dtype: 'q8_k', shape: [3, 256], data: new Uint8Array(3 * 292) };
  assert.equal(be.supports('q8_k'), false);
  assert.throws(() => be.matmul(out, x, 2, q8k), /no dot product for weights of type q8_k/);
  // Short weight data is a RangeError from the addon, not a read past the end.
  const short: Tensor = { dtype: 'f32', shape: [3, 256], data: new Uint8Array(100) };
  assert.throws(() => be.matmul(out, x, 2, short), RangeError);
  const badBlocks: Tensor = { dtype: 'q8_0', shape: [3, 40], data: new Uint8Array(1000) };
  assert.throws(() => be.matmul(new Float32Array(6), new Float32Array(80), 2, badBlocks), /whole number of blocks/);
  assert.throws(() => be.matmul(new Float32Array(5), x, 2, { dtype: 'f32', shape: [3, 256], data: new Uint8Array(3 * 1024) }), /output has 5 values/);
});

test('matmulMany (q, k and v in one job) gives each matmul\'s bits, every type and code path; mixed conversions fall back', { skip }, () => {
  const r = rng(4242);
  const inDim = 512;
  for (const dtype of ['f32', 'f16', 'bf16', 'q8_0', 'q4_0', 'q4_k', 'q6_k'] as DType[]) {
    const ws = [weights(r, dtype, [64, inDim]), weights(r, dtype, [16, inDim]), weights(r, dtype, [24, inDim])];
    for (const rows of [1, 2, 7]) {
      const x = randomArray(r, rows * inDim);
      everyConfig(`matmulMany ${dtype} ${rows} rows`, (be) => {
        const outs = ws.map((w) => new Float32Array(rows * w.shape[0]).fill(NaN));
        be.matmulMany(outs, x, rows, ws);
        const one = ws.map((w) => {
          const o = new Float32Array(rows * w.shape[0]);
          be.matmul(o, x, rows, w);
          return o;
        });
        outs.forEach((o, i) => assert.ok(bitEqual(o, one[i]), `matmulMany ${dtype} ${rows} rows: output ${i} differs from matmul`));
        return Float32Array.from(outs.flatMap((o) => Array.from(o)));
      });
    }
  }
  // q8_0 and q4_k convert x differently (q8_0 vs q8_K): done one at a time, still right.
  const be = new NativeBackend({ threads: 2 });
  const mixed = [weights(r, 'q8_0', [8, inDim]), weights(r, 'q4_k', [8, inDim]), weights(r, 'f16', [8, inDim])];
  const x = randomArray(r, inDim);
  const outs = mixed.map(() => new Float32Array(8));
  be.matmulMany(outs, x, 1, mixed);
  mixed.forEach((w, i) => {
    const o = new Float32Array(8);
    ref.matmul(o, x, 1, w);
    within('mixed matmulMany', outs[i], o, (j) => 1e-3 * (1 + Math.abs(o[j])));
  });
  assert.throws(() => be.matmulMany([outs[0]], x, 1, mixed), /1 outputs for 3 weights/);
  assert.throws(() => be.matmulMany([new Float32Array(3), ...outs.slice(1)], x, 1, mixed), /output has 3 values/);
});

// ---------------------------------------------------------------------------------------------------------------
// rmsNorm, rope
// ---------------------------------------------------------------------------------------------------------------

test('rmsNorm matches ref to a few ulps', { skip }, () => {
  let seed = 500;
  for (const rows of [1, 3, 17, 64]) {
    for (const dim of [1, 7, 64, 100, 257]) {
      const r = rng(seed++);
      const x = randomArray(r, rows * dim, 3);
      if (rows > 2) x.fill(0, 0, dim); // an all-zero row: the scale is 1/sqrt(eps)
      const w = randomArray(r, dim, 2);
      const want = new Float32Array(rows * dim);
      ref.rmsNorm(want, x, rows, w, 1e-5);
      everyConfig(`rmsNorm ${rows}x${dim}`, (be) => {
        const got = new Float32Array(rows * dim);
        be.rmsNorm(got, x, rows, w, 1e-5);
        within(`rmsNorm ${rows}x${dim}`, got, want, (i) => 3 * 2 ** -23 * Math.abs(want[i]) + 1e-38);
        return got;
      });
    }
  }
});

test('rope (ggml adjacent pairs) matches ref to a few ulps', { skip }, () => {
  let seed = 600;
  for (const rows of [1, 3, 17, 64]) {
    for (const [nHeads, hd, theta] of [[1, 2, 10000], [3, 18, 1e6], [4, 64, 1e6], [2, 128, 10000]]) {
      const r = rng(seed++);
      const x = randomArray(r, rows * nHeads * hd, 4);
      const pos = Int32Array.from({ length: rows }, () => Math.floor(r() * 5000));
      const want = x.slice();
      ref.rope(want, rows, nHeads, hd, pos, theta);
      everyConfig(`rope ${rows}x${nHeads}x${hd}`, (be) => {
        const got = x.slice();
        be.rope(got, rows, nHeads, hd, pos, theta);
        // Each output is x0*cos -/+ x1*sin; cos and sin may differ from V8's by an ulp.
        within(`rope rows ${rows} heads ${nHeads} hd ${hd}`, got, want, (i) => {
          const p = i - (i % 2);
          return 2 ** -22 * (Math.abs(x[p]) + Math.abs(x[p + 1])) + 1e-38;
        });
        return got;
      });
    }
  }
});

// ---------------------------------------------------------------------------------------------------------------
// attention
// ---------------------------------------------------------------------------------------------------------------

interface AttCase { rows: number; start: number; nHeads: number; nKvHeads: number; hd: number; window: number | null; kvF16: boolean }

/** Tight and rounding-step bounds per output element (see the file comment). */
function attentionBounds(c: AttCase, q: Float32Array, k: Float32Array, v: Float32Array, scale: number): { tight: Float64Array; loose: Float64Array } {
  const { rows, start, nHeads, nKvHeads, hd, window, kvF16 } = c;
  const group = nHeads / nKvHeads;
  const tight = new Float64Array(rows * nHeads * hd), loose = new Float64Array(rows * nHeads * hd);
  for (let r = 0; r < rows; r++) {
    const i = start + r;
    const jMin = window === null ? 0 : Math.max(0, i - window + 1);
    for (let h = 0; h < nHeads; h++) {
      const kvh = Math.floor(h / group);
      const qh = Array.from({ length: hd }, (_, d) => (kvF16 ? roundF16(q[(r * nHeads + h) * hd + d]) : q[(r * nHeads + h) * hd + d]));
      const s: number[] = [], mag: number[] = [];
      for (let j = jMin; j <= i; j++) {
        let dot = 0, m = 0;
        for (let d = 0; d < hd; d++) {
          const kk = k[(j * nKvHeads + kvh) * hd + d];
          dot += qh[d] * kk;
          m += Math.abs(qh[d] * kk);
        }
        s.push(dot * scale);
        mag.push(m * Math.abs(scale));
      }
      const mx = Math.max(...s);
      const e = s.map((x) => Math.exp(x - mx));
      const sum = e.reduce((a, b) => a + b, 0);
      const p = e.map((x) => x / sum);
      const eps = 2 * 1e-5 * Math.max(...mag) + 1e-6; // relative change of any probability
      for (let d = 0; d < hd; d++) {
        let pv = 0, step = 0;
        for (let j = jMin; j <= i; j++) {
          const vv = Math.abs(v[(j * nKvHeads + kvh) * hd + d]);
          pv += p[j - jMin] * vv;
          if (kvF16) step += (roundF16(p[j - jMin] * (1 + eps + 1e-6)) - roundF16(p[j - jMin] * (1 - eps - 1e-6))) * vv;
        }
        const o = (r * nHeads + h) * hd + d;
        tight[o] = (eps + 1e-5) * pv + 1e-30;
        loose[o] = tight[o] + step;
      }
    }
  }
  return { tight, loose };
}

test('attention (causal, GQA, sliding window, f16 KV) matches ref', { skip }, () => {
  const cases: AttCase[] = [
    { rows: 1, start: 0, nHeads: 4, nKvHeads: 2, hd: 16, window: null, kvF16: false },
    { rows: 1, start: 40, nHeads: 8, nKvHeads: 2, hd: 128, window: null, kvF16: false },
    { rows: 3, start: 5, nHeads: 6, nKvHeads: 1, hd: 20, window: null, kvF16: true },
    { rows: 17, start: 0, nHeads: 3, nKvHeads: 3, hd: 7, window: 4, kvF16: false },
    { rows: 17, start: 9, nHeads: 4, nKvHeads: 2, hd: 33, window: 10, kvF16: true },
    { rows: 64, start: 0, nHeads: 4, nKvHeads: 1, hd: 16, window: null, kvF16: false },
    { rows: 64, start: 30, nHeads: 2, nKvHeads: 2, hd: 64, window: 1000, kvF16: true },
    { rows: 5, start: 2, nHeads: 2, nKvHeads: 1, hd: 16, window: 1, kvF16: false },
  ];
  let seed = 700;
  for (const c of cases) {
    const r = rng(seed++);
    const { rows, start, nHeads, nKvHeads, hd } = c;
    const total = start + rows;
    const cap = total + 3; // the cache may be longer than what is filled
    const q = randomArray(r, rows * nHeads * hd, 2);
    const k = randomArray(r, cap * nKvHeads * hd, 2), v = randomArray(r, cap * nKvHeads * hd, 3);
    if (c.kvF16) for (let i = 0; i < k.length; i++) (k[i] = roundF16(k[i])), (v[i] = roundF16(v[i])); // the values an f16 cache holds
    // The cache as the model keeps it: f16 bits when kvF16.
    const kc = c.kvF16 ? Uint16Array.from(k, floatToHalf) : k, vc = c.kvF16 ? Uint16Array.from(v, floatToHalf) : v;
    const scale = Math.fround(1 / Math.sqrt(hd));
    const shape: AttentionShape = { nHeads, nKvHeads, headDim: hd, scale, slidingWindow: c.window, kvF16: c.kvF16 };
    const want = new Float32Array(rows * nHeads * hd);
    ref.attention(want, q, rows, start, kc, vc, shape);
    const { tight, loose } = attentionBounds(c, q, k, v, scale);
    const what = `attention ${JSON.stringify(c)}`;
    everyConfig(what, (be) => {
      const got = new Float32Array(rows * nHeads * hd).fill(NaN);
      be.attention(got, q, rows, start, kc, vc, shape);
      within(what, got, want, (i) => (c.kvF16 ? loose[i] : tight[i]));
      return got;
    });
    if (c.kvF16) {
      // The f16 rounding of q and of the probabilities really happens: much closer to ref with it than without.
      const got = new Float32Array(rows * nHeads * hd);
      new NativeBackend({ threads: 2 }).attention(got, q, rows, start, kc, vc, shape);
      const plain = new Float32Array(rows * nHeads * hd);
      ref.attention(plain, q, rows, start, k, v, { ...shape, kvF16: false });
      let dF16 = 0, dF32 = 0;
      for (let i = 0; i < got.length; i++) (dF16 += Math.abs(got[i] - want[i])), (dF32 += Math.abs(got[i] - plain[i]));
      assert.ok(dF16 * 3 < dF32, `${what}: distance to ref with f16 rounding ${dF16}, without ${dF32}`);
    }
  }
});

test('attention checks the cache length and its type (f16 bits exactly when kvF16)', { skip }, () => {
  const be = new NativeBackend({ threads: 2 });
  const shape: AttentionShape = { nHeads: 2, nKvHeads: 1, headDim: 8, scale: 0.35, slidingWindow: null, kvF16: false };
  assert.throws(() => be.attention(new Float32Array(32), new Float32Array(32), 2, 3, new Float32Array(8 * 4), new Float32Array(8 * 5), shape), /kCache is too short/);
  assert.throws(() => be.attention(new Float32Array(32), new Float32Array(32), 2, 3, new Uint16Array(8 * 5), new Uint16Array(8 * 5), shape), /must be Float32Arrays/);
  for (const b of [be, ref]) {
    assert.throws(() => b.attention(new Float32Array(32), new Float32Array(32), 2, 3, new Float32Array(8 * 5), new Float32Array(8 * 5), { ...shape, kvF16: true }), /f16 bits in Uint16Arrays/);
  }
});

test('toF16 stores the f16 bits ref.ts (and ggml) give: ties to even, subnormals, overflow, Inf and NaN, any length', { skip }, () => {
  const r = rng(31);
  const special = [0, -0, 1, -1, 65504, 65520, 65519.99, 1e6, -1e6, 6e-8, 5.96e-8, 2.98e-8, 1e-10, Infinity, -Infinity, NaN, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 2 ** -14, 2 ** -15 * 3];
  for (const n of [0, 1, 15, 16, 17, 100]) {
    const src = Float32Array.from({ length: n }, (_, i) => (i < special.length ? special[i] : (r() - 0.5) * 10 ** Math.floor(r() * 12 - 6)));
    const want = new Uint16Array(n), got = new Uint16Array(n + 1).fill(0xabcd);
    ref.toF16(want, src);
    for (const k of kernelSets()) {
      const a = nativeCompute()!;
      try {
        assert.ok(a.setKernels(k));
        new NativeBackend({ threads: 1 }).toF16(got.subarray(0, n), src);
      } finally {
        a.setKernels('auto');
      }
      assert.deepEqual(Array.from(got.subarray(0, n)), Array.from(want), `${k} kernels, ${n} values`);
      assert.equal(got[n], 0xabcd, 'nothing written past the end');
    }
  }
  assert.throws(() => new NativeBackend({ threads: 1 }).toF16(new Uint16Array(3), new Float32Array(4)), /dst is too short/);
});

// ---------------------------------------------------------------------------------------------------------------
// moeFFN
// ---------------------------------------------------------------------------------------------------------------

/** One rounding step of value h in the activation format that `down` weights use (0 for f32). */
function roundingSteps(down: DType, h: Float32Array): Float64Array {
  const act = vecDotType(down);
  const steps = new Float64Array(h.length);
  const ulp = (x: number, mant: number) => (x === 0 ? 0 : 2 ** (Math.floor(Math.log2(Math.abs(x))) - mant));
  if (act === 'f32') return steps;
  if (act === 'f16') for (let i = 0; i < h.length; i++) steps[i] = Math.max(ulp(h[i], 10), 2 ** -24);
  else if (act === 'bf16') for (let i = 0; i < h.length; i++) steps[i] = ulp(h[i], 7);
  else {
    const block = act === 'q8_k' ? 256 : 32;
    for (let b = 0; b < h.length; b += block) {
      let amax = 0;
      for (let i = b; i < b + block; i++) amax = Math.max(amax, Math.abs(h[i]));
      for (let i = b; i < b + block; i++) steps[i] = (1.15 * amax) / 127; // one step, with the f16 scale's rounding
    }
  }
  return steps;
}

interface MoeCase { types: [DType, DType, DType]; rows: number; k: number; E: number; dim: number; ffn: number }

function moeCase(c: MoeCase, seed: number): void {
  const r = rng(seed);
  const { rows, k, E, dim, ffn } = c;
  const [gt, ut, dt] = c.types;
  const gate = weights(r, gt, [E, ffn, dim], 0.3), up = weights(r, ut, [E, ffn, dim], 0.3), down = weights(r, dt, [E, dim, ffn], 0.3);
  const x = randomArray(r, rows * dim, 1.5);
  const experts = new Int32Array(rows * k), w = new Float32Array(rows * k);
  for (let i = 0; i < rows * k; i++) {
    experts[i] = rows > 8 && i % 5 === 0 ? 1 : Math.floor(r() * Math.max(1, E - 1)); // a popular expert, one unused
    w[i] = Math.fround(r());
  }
  const want = new Float32Array(rows * dim);
  ref.moeFFN(want, x, rows, experts, w, k, gate, up, down);

  // Bounds: through gate/up (summation order), silu*mul, the rounding of h for the down weights, down.
  const deq = (t: Tensor, e: number) => dequantize(sliceFirst(t, e));
  const tight = new Float64Array(rows * dim), loose = new Float64Array(rows * dim);
  for (let row = 0; row < rows; row++) {
    const xr = x.subarray(row * dim, (row + 1) * dim);
    for (let s = 0; s < k; s++) {
      const e = experts[row * k + s], ws = Math.abs(w[row * k + s]);
      const g = new Float32Array(ffn), u = new Float32Array(ffn);
      ref.matmul(g, xr, 1, sliceFirst(gate, e));
      ref.matmul(u, xr, 1, sliceFirst(up, e));
      const mg = magnitudes(sliceFirst(gate, e), xr, 1), mu = magnitudes(sliceFirst(up, e), xr, 1);
      const h = new Float32Array(ffn), dh = new Float64Array(ffn);
      for (let i = 0; i < ffn; i++) {
        const sg = g[i] / (1 + Math.exp(-g[i]));
        h[i] = sg * u[i];
        const eg = 1e-5 * mg[i], eu = 1e-5 * mu[i];
        dh[i] = 1.1 * eg * (Math.abs(u[i]) + eu) + (Math.abs(sg) + 1.1 * eg) * eu + 4 * 2 ** -24 * Math.abs(h[i]) + 1e-30;
      }
      const steps = roundingSteps(dt, h);
      const D = deq(down, e);
      for (let j = 0; j < dim; j++) {
        let t = 0, l = 0;
        for (let i = 0; i < ffn; i++) {
          const a = Math.abs(D[j * ffn + i]);
          t += a * dh[i] + 1e-5 * a * (Math.abs(h[i]) + steps[i]);
          l += a * steps[i];
        }
        tight[row * dim + j] += ws * t;
        loose[row * dim + j] += ws * l;
      }
    }
    for (let j = 0; j < dim; j++) {
      const o = row * dim + j;
      tight[o] += k * 2 ** -23 * Math.abs(want[o]) + 1e-30; // the k-term sum, rounded at each step
      loose[o] += tight[o];
    }
  }
  const what = `moeFFN ${JSON.stringify(c)}`;
  everyConfig(what, (be) => {
    const got = new Float32Array(rows * dim).fill(NaN);
    be.moeFFN(got, x, rows, experts, w, k, gate, up, down);
    within(what, got, want, (i) => loose[i]);
    let inTight = 0;
    for (let i = 0; i < got.length; i++) if (Math.abs(got[i] - want[i]) <= tight[i]) inTight++;
    assert.ok(inTight >= 0.9 * got.length, `${what}: only ${inTight} of ${got.length} outputs within the tight bound`);
    if (vecDotType(dt) === 'f32') assert.equal(inTight, got.length, `${what}: f32 down weights round nothing`);
    return got;
  });
}

test('moeFFN (grouped by expert, any k, duplicates and unused experts) matches ref on float experts', { skip }, () => {
  let seed = 800;
  for (const types of [['f32', 'f32', 'f32'], ['f16', 'f16', 'f16'], ['bf16', 'bf16', 'bf16'], ['f16', 'bf16', 'f32']] as [DType, DType, DType][]) {
    for (const [rows, k] of [[1, 2], [3, 1], [17, 3], [64, 2]]) moeCase({ types, rows, k, E: 5, dim: 24, ffn: 40 }, seed++);
  }
});

test('moeFFN matches ref on every quantized expert type quant.c supports, and mixed types', { skip }, () => {
  const be = new NativeBackend({ threads: 1 });
  const types = ALL_QUANT.filter((t) => be.supports(t));
  let seed = 900;
  for (const t of types) {
    const big = dtypeInfo(t).blockSize === 256;
    moeCase({ types: [t, t, t], rows: 17, k: 2, E: 4, dim: big ? 256 : 64, ffn: big ? 256 : 96 }, seed++);
  }
  const mixed: [DType, DType, DType][] = [['q4_k', 'q4_k', 'q6_k'], ['q8_0', 'f16', 'q4_0'], ['f32', 'q4_k', 'bf16']];
  for (const m of mixed) if (m.every((t) => be.supports(t))) moeCase({ types: m, rows: 3, k: 2, E: 3, dim: 256, ffn: 256 }, seed++);
});

test('moeFFN gives the same bits when long inputs are split into chunks of rows', { skip }, () => {
  const a = nativeCompute()!;
  const r = rng(950);
  const [rows, k, E, dim, ffn] = [23, 2, 4, 64, 96];
  const gate = weights(r, 'q8_0', [E, ffn, dim], 0.3), up = weights(r, 'q8_0', [E, ffn, dim], 0.3), down = weights(r, 'f16', [E, dim, ffn], 0.3);
  const x = randomArray(r, rows * dim);
  const experts = Int32Array.from({ length: rows * k }, () => Math.floor(r() * E));
  const w = Float32Array.from({ length: rows * k }, () => r());
  const be = new NativeBackend({ threads: 2 });
  const whole = new Float32Array(rows * dim);
  be.moeFFN(whole, x, rows, experts, w, k, gate, up, down);
  try {
    for (const chunk of [1, 5, 22]) {
      a.setMoeChunk(chunk);
      const got = new Float32Array(rows * dim).fill(NaN);
      be.moeFFN(got, x, rows, experts, w, k, gate, up, down);
      assert.ok(bitEqual(got, whole), `chunks of ${chunk} rows`);
    }
  } finally {
    a.setMoeChunk(0);
  }
});

test('moeFFN refuses expert ids out of range', { skip }, () => {
  const be = new NativeBackend({ threads: 2 });
  const r = rng(1);
  const gate = weights(r, 'f32', [2, 8, 4]), up = weights(r, 'f32', [2, 8, 4]), down = weights(r, 'f32', [2, 4, 8]);
  const out = new Float32Array(4);
  assert.throws(() => be.moeFFN(out, new Float32Array(4), 1, Int32Array.of(2), Float32Array.of(1), 1, gate, up, down), /expert id is outside 0\.\.1/);
  assert.throws(() => be.moeFFN(out, new Float32Array(4), 1, Int32Array.of(-1), Float32Array.of(1), 1, gate, up, down), /expert id/);
});

// ---------------------------------------------------------------------------------------------------------------
// Whole model: native logits against llama.cpp's stored logits and against the ref backend
// ---------------------------------------------------------------------------------------------------------------

const fixture = (name: string): string => fileURLToPath(new URL(`../../test/fixtures/${name}`, import.meta.url));
const TOKENS = (JSON.parse(fs.readFileSync(fixture('tokens-synthetic512.json'), 'utf8')) as { tokens: number[] }).tokens;

function logitsOf(m: LoadedModel, kvF16 = false): Float32Array {
  return m.newSession({ contextLength: TOKENS.length, kvF16 }).forward(TOKENS, { allLogits: true });
}

function maxMeanDiff(a: Float32Array, b: ArrayLike<number>): { max: number; mean: number } {
  let max = 0, sum = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    assert.ok(Number.isFinite(d), `logit ${i}: ${a[i]} vs ${b[i]}`);
    max = Math.max(max, d);
    sum += d;
  }
  return { max, mean: sum / a.length };
}

// The bounds of test/reference-logits.test.ts (which explains them), here for the native backend.
const MODEL_CASES: { dtype: string; kvF16: boolean; llamaMax: number; llamaMean: number; refMax: number }[] = [
  { dtype: 'f32', kvF16: false, llamaMax: 2e-5, llamaMean: 2e-5, refMax: 2e-5 },
  { dtype: 'f32', kvF16: true, llamaMax: 4e-3, llamaMean: 4e-4, refMax: 4e-3 },
  { dtype: 'f16', kvF16: false, llamaMax: 1e-2, llamaMean: 2e-4, refMax: 1e-2 },
  { dtype: 'q8_0', kvF16: false, llamaMax: 2e-5, llamaMean: 2e-5, refMax: 2e-5 },
  { dtype: 'q4_0', kvF16: false, llamaMax: 2e-5, llamaMean: 2e-5, refMax: 2e-5 },
];

for (const c of MODEL_CASES) {
  test(`micro ${c.dtype}${c.kvF16 ? ' (F16 KV cache)' : ''}: native logits match llama.cpp's and the ref backend's`, { skip }, () => {
    const file = fixture(`micro/micro-${c.dtype}.gguf`);
    const stored = JSON.parse(fs.readFileSync(fixture(`micro/micro-${c.dtype}${c.kvF16 ? '.kvf16' : ''}.logits.json`), 'utf8')) as { tokens: number[]; logits: number[][] };
    assert.deepEqual(stored.tokens, TOKENS);
    const llama = stored.logits.flat();
    const want = logitsOf(loadModel(file, { backend: ref }), c.kvF16);
    for (const threads of [1, 3]) {
      const m = loadModel(file, { backend: new NativeBackend({ threads }) });
      const got = logitsOf(m, c.kvF16);
      const vsLlama = maxMeanDiff(got, llama);
      assert.ok(vsLlama.max <= c.llamaMax, `threads ${threads}: max |logit - llama.cpp| ${vsLlama.max} > ${c.llamaMax}`);
      assert.ok(vsLlama.mean <= c.llamaMean, `threads ${threads}: mean |logit - llama.cpp| ${vsLlama.mean} > ${c.llamaMean}`);
      const vsRef = maxMeanDiff(got, want);
      assert.ok(vsRef.max <= c.refMax, `threads ${threads}: max |native - ref| ${vsRef.max} > ${c.refMax}`);
      // Same top-1 token as llama.cpp at every position.
      for (let p = 0; p < TOKENS.length; p++) {
        const row = (a: ArrayLike<number>) => { let b = 0; for (let v = 1; v < 512; v++) if (a[p * 512 + v] > a[p * 512 + b]) b = v; return b; };
        assert.equal(row(got), row(llama), `position ${p}: top-1`);
      }
    }
  });
}

test('loadModel uses the native backend by default when it is built', { skip }, () => {
  assert.equal(loadModel(fixture('micro/micro-q8_0.gguf'), { threads: 2 }).model.backend.name, 'native');
});

// ---------------------------------------------------------------------------------------------------------------
// Backend selection
// ---------------------------------------------------------------------------------------------------------------

test('selectBackend: explicit choices, MOE_BACKEND, and one stderr notice when falling back to ref', () => {
  assert.equal(selectBackend({ backend: 'ref' }).name, 'ref');
  if (!loadError) {
    assert.equal(selectBackend({ backend: 'native', threads: 2 }).name, 'native');
    assert.equal(selectBackend({}).name, 'native');
  } else {
    assert.throws(() => selectBackend({ backend: 'native' }), /native backend requested but unavailable/);
  }
  // A process without the addon (MOE_NATIVE=0): auto gives ref with one notice, however often it is asked.
  const select = fileURLToPath(new URL('../src/backend/select.js', import.meta.url));
  const script = `import { selectBackend } from ${JSON.stringify(select)};
    const names = [selectBackend().name, selectBackend({ threads: 2 }).name, selectBackend({ backend: 'auto' }).name];
    let native = 'ok'; try { selectBackend({ backend: 'native' }); native = 'no error'; } catch (e) { native = e.message; }
    let env = 'ok'; process.env.MOE_BACKEND = 'fast'; try { selectBackend(); env = 'no error'; } catch (e) { env = e.message; }
    console.log(JSON.stringify({ names, native, env }));`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { env: { ...process.env, MOE_NATIVE: '0', MOE_BACKEND: '' }, encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout) as { names: string[]; native: string; env: string };
  assert.deepEqual(out.names, ['ref', 'ref', 'ref']);
  assert.match(out.native, /native backend requested but unavailable: disabled by MOE_NATIVE=0/);
  assert.match(out.env, /MOE_BACKEND must be auto, native or ref, got 'fast'/);
  const notices = r.stderr.split('\n').filter((l) => l.includes('ref backend'));
  assert.equal(notices.length, 1, r.stderr);
  assert.match(notices[0], /MOE_NATIVE=0/);
  const viaEnv = spawnSync(process.execPath, ['--input-type=module', '-e', `import { selectBackend } from ${JSON.stringify(select)}; console.log(selectBackend().name);`], { env: { ...process.env, MOE_BACKEND: 'ref' }, encoding: 'utf8' });
  assert.equal(viaEnv.stdout.trim(), 'ref');
  assert.equal(viaEnv.stderr, '');
});
