// Sliding-window attention (Mistral / HF rule: query i sees key j iff 0 <= i - j < window). llama.cpp's "llama"
// architecture ignores the window, so it cannot be the oracle here; instead:
// 1. the ref backend's attention against a direct float64 computation restricted to those keys, including queries
//    that continue a KV cache (start > 0);
// 2. whole models: with one layer, position i of a windowed model sees exactly tokens i-w+1..i, so its logits equal
//    the unwindowed model's last logits on that slice (RoPE scores depend only on i - j); with L layers the receptive
//    field is L*(w-1) tokens back, so the windowed model on the full sequence equals itself run on just that suffix.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RefBackend } from '../src/backend/ref.js';
import { MixtralModel } from '../src/model/mixtral.js';
import { mixtralWeightsFromGGUFTensors } from '../src/model/load.js';
import type { MixtralConfig } from '../src/model/config.js';
import { randomMixtralTensors } from '../src/workflows/random-model.js';
import { Rng } from '../src/util/rng.js';

/** Attention for query rows at absolute positions start..start+rows-1, in float64, keys j with i - j < window. */
function directAttention(q: Float32Array, rows: number, start: number, k: Float32Array, v: Float32Array,
  nHeads: number, nKv: number, hd: number, window: number | null): Float64Array {
  const out = new Float64Array(rows * nHeads * hd);
  const scale = 1 / Math.sqrt(hd);
  for (let r = 0; r < rows; r++) {
    const i = start + r;
    for (let h = 0; h < nHeads; h++) {
      const g = Math.floor(h / (nHeads / nKv));
      const keys: number[] = [];
      for (let j = 0; j <= i; j++) if (window === null || i - j < window) keys.push(j);
      const s = keys.map((j) => {
        let dot = 0;
        for (let d = 0; d < hd; d++) dot += q[(r * nHeads + h) * hd + d] * k[(j * nKv + g) * hd + d];
        return dot * scale;
      });
      const m = Math.max(...s);
      const e = s.map((x) => Math.exp(x - m));
      const z = e.reduce((a, b) => a + b, 0);
      keys.forEach((j, t) => {
        for (let d = 0; d < hd; d++) out[(r * nHeads + h) * hd + d] += (e[t] / z) * v[(j * nKv + g) * hd + d];
      });
    }
  }
  return out;
}

test('ref attention with a sliding window equals attention restricted to keys j with i - j < window', () => {
  const be = new RefBackend();
  const rng = new Rng(5);
  const hd = 16;
  for (const [nHeads, nKv] of [[4, 1], [4, 2], [2, 2]] as const) {
    for (const window of [1, 3, 8, 40, null]) {
      // A fresh sequence (start 0) and a continuation of a cache of 13 positions.
      for (const [start, rows] of [[0, 20], [13, 7]] as const) {
        const total = start + rows;
        const q = rng.fill(rows * nHeads * hd, 1.5);
        const k = rng.fill(total * nKv * hd, 1.5);
        const v = rng.fill(total * nKv * hd, 1);
        const out = new Float32Array(rows * nHeads * hd);
        be.attention(out, q, rows, start, k, v, { nHeads, nKvHeads: nKv, headDim: hd, scale: Math.fround(1 / Math.sqrt(hd)), slidingWindow: window, kvF16: false });
        const want = directAttention(q, rows, start, k, v, nHeads, nKv, hd, window);
        let max = 0;
        for (let i = 0; i < out.length; i++) max = Math.max(max, Math.abs(out[i] - want[i]));
        assert.ok(max <= 2e-5, `heads ${nHeads}/${nKv}, window ${window}, start ${start}: max diff ${max}`);
        if (window !== null && window < total) {
          // The window matters here: the unrestricted result differs.
          const full = directAttention(q, rows, start, k, v, nHeads, nKv, hd, null);
          let diff = 0;
          for (let i = 0; i < out.length; i++) diff = Math.max(diff, Math.abs(out[i] - full[i]));
          assert.ok(diff > 1e-3, `window ${window} made no difference`);
        }
      }
    }
  }
});

const base: MixtralConfig = {
  vocabSize: 300, hiddenSize: 64, intermediateSize: 64, numHiddenLayers: 1, numAttentionHeads: 4, numKeyValueHeads: 2,
  headDim: 16, numLocalExperts: 4, numExpertsPerTok: 2, rmsNormEps: 1e-5, ropeTheta: 1e4, maxPositionEmbeddings: 256,
  slidingWindow: null, tieWordEmbeddings: false,
};

function model(c: MixtralConfig, seed: number): MixtralModel {
  return new MixtralModel(c, mixtralWeightsFromGGUFTensors(randomMixtralTensors(c, seed), c, 'random model'), new RefBackend());
}

const tokens = (n: number, seed: number, vocab: number): number[] => {
  const r = new Rng(seed);
  return Array.from({ length: n }, () => Math.floor(r.nextFloat() * vocab));
};

function maxDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

// RoPE angles are pos * theta_i in float32, so shifting every position changes scores by float rounding only.
const SHIFT_TOL = 1e-4; // measured <= 8e-7

test('one layer: windowed logits at i equal the unwindowed model on tokens i-w+1..i', () => {
  const w = 5;
  const V = base.vocabSize;
  const plain = model(base, 21);
  const windowed = new MixtralModel({ ...base, slidingWindow: w }, plain.weights, plain.backend);
  const toks = tokens(24, 3, V);
  // Windowed, fed in two chunks so later queries read the window from the KV cache.
  const s = windowed.newSession();
  const out = new Float32Array(toks.length * V);
  out.set(s.forward(toks.slice(0, 9), { allLogits: true }), 0);
  out.set(s.forward(toks.slice(9), { allLogits: true }), 9 * V);
  const full = plain.newSession().forward(toks, { allLogits: true });
  for (let i = 0; i < toks.length; i++) {
    const row = out.subarray(i * V, (i + 1) * V);
    if (i < w) {
      assert.deepEqual(row, full.subarray(i * V, (i + 1) * V), `position ${i} < window: identical to no window`);
      continue;
    }
    const slice = plain.newSession().forward(toks.slice(i - w + 1, i + 1));
    const d = maxDiff(row, slice);
    assert.ok(d <= SHIFT_TOL, `position ${i}: ${d}`);
    assert.ok(maxDiff(row, full.subarray(i * V, (i + 1) * V)) > 1e-3, `position ${i}: the window changed nothing`);
  }
});

test('three layers: the windowed model at i equals itself run on its receptive field, the last 3*(w-1)+1 tokens', () => {
  const w = 4;
  const L = 3;
  const V = base.vocabSize;
  const c = { ...base, numHiddenLayers: L, slidingWindow: w };
  const m = model(c, 22);
  const toks = tokens(30, 4, V);
  const out = m.newSession().forward(toks, { allLogits: true });
  const field = L * (w - 1);
  for (let i = field + 1; i < toks.length; i += 3) {
    const suffix = m.newSession().forward(toks.slice(i - field, i + 1));
    const d = maxDiff(out.subarray(i * V, (i + 1) * V), suffix);
    assert.ok(d <= SHIFT_TOL, `position ${i}: ${d}`);
    // One token less of context is a different computation (the field is exactly L*(w-1) back).
    const shorter = m.newSession().forward(toks.slice(i - field + 1, i + 1));
    assert.ok(maxDiff(out.subarray(i * V, (i + 1) * V), shorter) > 1e-3, `position ${i}: receptive field smaller than expected`);
  }
});
