// Training's native kernels (src/autograd/native-kernels.ts) against the TypeScript ones (refKernels), and a short
// training run on each giving the same losses.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { nativeGradKernels } from '../src/autograd/native-kernels.js';
import { refKernels, setGradKernels, type GradKernels } from '../src/autograd/kernels.js';
import { nativeBackendError } from '../src/backend/native.js';
import { Rng } from '../src/util/rng.js';
import { TRAIN_PRESETS, train, type TokenData } from '../src/workflows/train.js';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const loadError = nativeBackendError();
const skip = loadError ? (process.env.CI ? false : `native addon not built: ${loadError}`) : false;
const nk = () => {
  const k = nativeGradKernels();
  assert.ok(k, `native kernels unavailable: ${loadError}`);
  return k;
};

const rnd = (rng: Rng, n: number) => Float32Array.from({ length: n }, () => rng.uniform() * 2 - 1);

/** Max |a - b| relative to max |b|. */
function rel(a: Float32Array | Float64Array, b: Float32Array | Float64Array): number {
  let d = 0, m = 0;
  for (let i = 0; i < b.length; i++) (d = Math.max(d, Math.abs(a[i] - b[i]))), (m = Math.max(m, Math.abs(b[i])));
  return d / (m || 1);
}

test('native matmul and its backward (accumulating into pre-filled gradients) match ref', { skip }, () => {
  const k = nk();
  const rng = new Rng(5);
  for (const [m, kk, n] of [[1, 1, 1], [3, 7, 5], [17, 33, 9], [64, 128, 256], [130, 64, 1000]]) {
    const x = rnd(rng, m * kk), w = rnd(rng, n * kk), dy = rnd(rng, m * n);
    const y1 = new Float32Array(m * n), y2 = new Float32Array(m * n).fill(NaN);
    refKernels.matmul(y1, x, w, m, kk, n);
    k.matmul(y2, x, w, m, kk, n);
    assert.ok(rel(y2, y1) < 1e-5, `y ${m}x${kk}x${n}: ${rel(y2, y1)}`);
    const dx1 = rnd(rng, m * kk), dw1 = rnd(rng, n * kk), dx2 = Float32Array.from(dx1), dw2 = Float32Array.from(dw1);
    refKernels.matmulBackward(dy, x, w, m, kk, n, dx1, dw1);
    k.matmulBackward(dy, x, w, m, kk, n, dx2, dw2);
    assert.ok(rel(dx2, dx1) < 1e-5 && rel(dw2, dw1) < 1e-5, `backward ${m}x${kk}x${n}: dx ${rel(dx2, dx1)} dw ${rel(dw2, dw1)}`);
    const only = Float32Array.from(dx1);
    k.matmulBackward(dy, x, w, m, kk, n, only, null); // dw not wanted
    refKernels.matmulBackward(dy, x, w, m, kk, n, dx1, null);
    assert.ok(rel(only, dx1) < 1e-5);
  }
});

test('native grouped GEMM and backward (experts without rows, offsets into x) match ref', { skip }, () => {
  const k = nk();
  const rng = new Rng(6);
  const E = 5, kk = 24, n = 40;
  const offsets = Int32Array.from([0, 3, 3, 10, 10, 17]); // experts 1 and 3 get no rows
  const S = offsets[E];
  const x = rnd(rng, S * kk), w = rnd(rng, E * n * kk), dy = rnd(rng, S * n);
  const y1 = new Float32Array(S * n), y2 = new Float32Array(S * n);
  refKernels.groupedMatmul(y1, x, w, offsets, kk, n);
  k.groupedMatmul(y2, x, w, offsets, kk, n);
  assert.ok(rel(y2, y1) < 1e-5);
  const dx1 = rnd(rng, S * kk), dw1 = rnd(rng, E * n * kk), dx2 = Float32Array.from(dx1), dw2 = Float32Array.from(dw1);
  refKernels.groupedMatmulBackward(dy, x, w, offsets, kk, n, dx1, dw1);
  k.groupedMatmulBackward(dy, x, w, offsets, kk, n, dx2, dw2);
  assert.ok(rel(dx2, dx1) < 1e-5 && rel(dw2, dw1) < 1e-5);
});

test('native softmax rows: log-normalisers and probabilities match ref (large and tiny logits)', { skip }, () => {
  const k = nk();
  const rng = new Rng(7);
  for (const [rows, n, scale] of [[1, 1, 1], [3, 17, 5], [4, 32000, 20], [2, 100, 200]]) {
    const x = Float32Array.from({ length: rows * n }, () => (rng.uniform() * 2 - 1) * scale);
    const l1 = new Float64Array(rows), l2 = new Float64Array(rows);
    const p1 = new Float32Array(rows * n), p2 = new Float32Array(rows * n);
    refKernels.softmaxRows(x, rows, n, l1, p1);
    k.softmaxRows(x, rows, n, l2, p2);
    for (let r = 0; r < rows; r++) assert.ok(Math.abs(l2[r] - l1[r]) < 1e-5 * Math.max(1, Math.abs(l1[r])), `lse ${l2[r]} vs ${l1[r]}`);
    let worst = 0;
    for (let i = 0; i < p1.length; i++) worst = Math.max(worst, Math.abs(p2[i] - p1[i]) / Math.max(p1[i], 1e-30) * (p1[i] > 1e-30 ? 1 : 0));
    assert.ok(worst < 1e-5, `probabilities: worst relative difference ${worst} (${rows}x${n}, scale ${scale})`);
    const l3 = new Float64Array(rows);
    k.softmaxRows(x, rows, n, l3, null); // without probabilities
    assert.deepEqual(l3, l2);
  }
});

test('native training attention and its backward (GQA, sliding window, missing gradients) match ref', { skip }, () => {
  const k = nk();
  const rng = new Rng(9);
  for (const d of [
    { batch: 1, seqLen: 1, nHeads: 1, nKvHeads: 1, headDim: 4, slidingWindow: null },
    { batch: 2, seqLen: 9, nHeads: 4, nKvHeads: 2, headDim: 8, slidingWindow: null },
    { batch: 3, seqLen: 16, nHeads: 6, nKvHeads: 1, headDim: 5, slidingWindow: 4 },
    { batch: 2, seqLen: 33, nHeads: 4, nKvHeads: 4, headDim: 32, slidingWindow: null },
  ]) {
    const rows = d.batch * d.seqLen, qn = rows * d.nHeads * d.headDim, kn = rows * d.nKvHeads * d.headDim;
    const q = rnd(rng, qn), kk = rnd(rng, kn), v = rnd(rng, kn), g = rnd(rng, qn);
    const probs = d.batch * d.nHeads * d.seqLen * d.seqLen;
    const o1 = new Float32Array(qn), o2 = new Float32Array(qn), p1 = new Float64Array(probs), p2 = new Float64Array(probs);
    refKernels.attentionForward(o1, p1, q, kk, v, d);
    k.attentionForward(o2, p2, q, kk, v, d);
    assert.ok(rel(o2, o1) < 1e-6 && rel(p2, p1) < 1e-12, `forward ${JSON.stringify(d)}: out ${rel(o2, o1)} probs ${rel(p2, p1)}`);
    const grads = () => [rnd(new Rng(10), qn), rnd(new Rng(11), kn), rnd(new Rng(12), kn)];
    const [dq1, dk1, dv1] = grads(), [dq2, dk2, dv2] = grads();
    refKernels.attentionBackward(g, p1, q, kk, v, dq1, dk1, dv1, d);
    k.attentionBackward(g, p2, q, kk, v, dq2, dk2, dv2, d);
    assert.ok(rel(dq2, dq1) < 1e-6 && rel(dk2, dk1) < 1e-6 && rel(dv2, dv1) < 1e-6, `backward ${JSON.stringify(d)}`);
    const [, dk3] = grads();
    k.attentionBackward(g, p2, q, kk, v, null, dk3, null, d); // only dk wanted
    assert.deepEqual(dk3, dk2);
  }
});

test('native cross-entropy backward and AdamW are bit-identical to ref (ignored rows, bad targets refused)', { skip }, () => {
  const k = nk();
  const rng = new Rng(9);
  const rows = 37, n = 1001;
  const probs = Float32Array.from({ length: rows * n }, () => rng.uniform());
  const targets = Int32Array.from({ length: rows }, (_, i) => (i % 5 === 3 ? -100 : rng.int(n)));
  const dz1 = rnd(rng, rows * n), dz2 = Float32Array.from(dz1);
  refKernels.crossEntropyBackward(dz1, probs, targets, rows, n, 0.37);
  k.crossEntropyBackward(dz2, probs, targets, rows, n, 0.37);
  assert.deepEqual(dz2, dz1);
  assert.throws(() => k.crossEntropyBackward(dz2, probs, Int32Array.from({ length: rows }, () => n), rows, n, 1), /target/);
  const own1 = Float32Array.from(probs), own2 = Float32Array.from(probs); // dz is probs: overwritten in place
  refKernels.crossEntropyBackward(own1, own1, targets, rows, n, 0.37);
  k.crossEntropyBackward(own2, own2, targets, rows, n, 0.37);
  assert.deepEqual(own2, own1);
  assert.equal(own1[3 * n + 5], 0); // row 3's target is ignored: zero gradient
  assert.equal(own1[n + targets[1]], Math.fround(Math.fround(0.37 * probs[n + targets[1]]) - 0.37));

  const len = 70001; // several threads' chunks and a ragged end
  const p1 = rnd(rng, len), g = rnd(rng, len), m1 = rnd(rng, len), v1 = Float32Array.from({ length: len }, () => rng.uniform());
  const p2 = Float32Array.from(p1), m2 = Float32Array.from(m1), v2 = Float32Array.from(v1);
  const h = { beta1: 0.9, beta2: 0.95, stepSize: 1e-3 / (1 - 0.9 ** 3), bc2Sqrt: Math.sqrt(1 - 0.95 ** 3), eps: 1e-8, decay: 1 - 1e-4 };
  refKernels.adamw(p1, g, m1, v1, h);
  k.adamw(p2, g, m2, v2, h);
  assert.deepEqual([p2, m2, v2], [p1, m1, v1]);
});

test('Float64 inputs (gradient checks) go to ref unchanged', { skip }, () => {
  const k = nk();
  const x = Float64Array.from([1, 2, 3, 4]), w = Float64Array.from([0.5, -1]);
  const y1 = new Float64Array(2), y2 = new Float64Array(2);
  refKernels.matmul(y1, x, w, 2, 2, 1);
  k.matmul(y2, x, w, 2, 2, 1);
  assert.deepEqual(y2, y1);
});

test('a short training run gives the same losses on native and ref kernels', { skip }, () => {
  const rng = new Rng(8);
  const tokens = Uint16Array.from({ length: 4000 }, () => 3 + rng.int(500));
  const data: TokenData = { train: tokens, val: tokens.subarray(0, 1000) };
  const losses = (kernels: GradKernels) => {
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-nk-'));
    try {
      const run = TRAIN_PRESETS.tiny();
      run.steps = 6;
      return train(run, { data, outDir: out, kernels, log: () => {} }).state.history.map((h) => h.loss);
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  };
  const a = losses(refKernels), b = losses(nk());
  a.forEach((v, i) => assert.ok(Math.abs(v - b[i]) < 1e-4 * Math.abs(v), `step ${i + 1}: ref ${v}, native ${b[i]}`));
  setGradKernels(refKernels);
});
