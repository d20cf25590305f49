import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Sampler, Rng, selectTop, type SamplerOptions } from '../src/workflows/sampling.js';

const OFF: SamplerOptions = { temperature: 1, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1 };

/** Random logits from a generator that is not the one under test (a plain LCG), roughly N(0, scale). */
function randomLogits(n: number, seed: number, scale = 3): Float32Array {
  let s = seed >>> 0;
  const u = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) + 0.5) / 4294967296;
  const l = new Float32Array(n);
  for (let i = 0; i < n; i++) l[i] = scale * Math.sqrt(-2 * Math.log(u())) * Math.cos(2 * Math.PI * u());
  return l;
}

/** Reference: ids sorted by logit descending, ties by id (a full sort, the obviously-right way). */
function sortedIds(l: Float32Array): number[] {
  return [...l.keys()].sort((a, b) => l[b]! - l[a]! || a - b);
}

function softmax(xs: number[]): number[] {
  const m = Math.max(...xs);
  const e = xs.map((x) => Math.exp(x - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / s);
}

// Known answers from Vigna's reference xoshiro128starstar.c (version 1.1, which feeds s[1] to the scrambler),
// compiled with gcc. (rand_xoshiro's test vector 5760, 40320, ... is version 1.0, which used s[0].)
test('xoshiro128** matches the reference C implementation', () => {
  const r = Rng.fromState([1, 2, 3, 4]);
  const expected = [11520, 0, 5927040, 70819200, 2031721883, 1637235492, 1287239034, 3734860849, 3729100597, 4258142804];
  assert.deepEqual(expected.map(() => r.nextUint32()), expected);
  const r2 = Rng.fromState([0xdeadbeef, 0x12345678, 0x9abcdef0, 0x0badf00d]);
  for (let i = 0; i < 1000; i++) r2.nextUint32();
  assert.deepEqual([r2.nextUint32(), r2.nextUint32(), r2.nextUint32(), r2.nextUint32()], [285280189, 3509135031, 4017953115, 1797157445]);
});

test('xoshiro128** floats are uniform in [0,1) and seeds give distinct streams', () => {
  const r = new Rng(7);
  const bins = new Array<number>(16).fill(0);
  const N = 32000;
  for (let i = 0; i < N; i++) {
    const x = r.nextFloat();
    assert.ok(x >= 0 && x < 1);
    bins[Math.floor(x * 16)]!++;
  }
  const chi2 = bins.reduce((a, c) => a + (c - N / 16) ** 2 / (N / 16), 0);
  assert.ok(chi2 < 45, `chi2 ${chi2} (df 15)`);
  const a = new Rng(2 ** 32 + 5);
  const b = new Rng(5);
  assert.notEqual(a.nextUint32(), b.nextUint32(), 'the seed high word matters');
  assert.throws(() => new Rng(-1), RangeError);
  assert.throws(() => new Rng(1.5), RangeError);
});

test('same seed -> same tokens; different seed -> different; default seed is random and reported', () => {
  const logits = randomLogits(32000, 1, 1);
  const draw = (s: Sampler) => Array.from({ length: 200 }, () => s.sample(logits));
  assert.deepEqual(draw(new Sampler({ ...OFF, seed: 42 })), draw(new Sampler({ ...OFF, seed: 42 })));
  assert.notDeepEqual(draw(new Sampler({ ...OFF, seed: 42 })), draw(new Sampler({ ...OFF, seed: 43 })));
  const s1 = new Sampler(OFF);
  const s2 = new Sampler(OFF);
  assert.ok(Number.isSafeInteger(s1.seed) && s1.seed >= 0);
  assert.notEqual(s1.seed, s2.seed);
  assert.deepEqual(draw(s1), draw(new Sampler({ ...OFF, seed: s1.seed })));
});

test('greedy is the argmax, ties to the lowest id; logits are not modified', () => {
  for (let seed = 1; seed <= 5; seed++) {
    const l = randomLogits(32000, seed);
    const copy = l.slice();
    assert.equal(new Sampler({ temperature: 0 }).sample(l), sortedIds(l)[0]);
    assert.deepEqual(l, copy);
  }
  const tie = new Float32Array([1, 5, 3, 5, 5]);
  assert.equal(new Sampler({ temperature: 0 }).sample(tie), 1);
});

test('top-k = 1 equals greedy at any temperature', () => {
  for (let seed = 1; seed <= 5; seed++) {
    const l = randomLogits(32000, seed, 0.5);
    const s = new Sampler({ ...OFF, topK: 1, temperature: 1.5, seed });
    for (let i = 0; i < 20; i++) assert.equal(s.sample(l), sortedIds(l)[0]);
  }
});

test('top-k keeps exactly the k most likely (partial selection agrees with a full sort)', () => {
  const l = randomLogits(32000, 9);
  l[100] = l[200] = l[300] = 50; // ties at the top go to the lower id
  const ref = sortedIds(l);
  for (const k of [1, 2, 3, 40, 1000, 31999]) {
    const c = new Sampler({ ...OFF, topK: k, seed: 1 }).candidates(l);
    assert.deepEqual([...c.ids], ref.slice(0, k), `k=${k}`);
  }
  // selectTop over an explicit candidate list
  const cand = Int32Array.from([5, 9, 2, 7]);
  const v = new Float32Array(10).map((_, i) => (i * 7) % 10);
  const out = new Int32Array(4);
  assert.equal(selectTop(v, cand, 4, 2, out), 2);
  assert.deepEqual([...out.subarray(0, 2)], [7, 5]); // v[5]=5, v[9]=3, v[2]=4, v[7]=9
});

/** Reference top-p: smallest prefix of the sorted distribution (at temperature 1) whose mass is >= p. */
function refTopP(l: Float32Array, p: number, k = 0): number[] {
  let ids = sortedIds(l);
  if (k > 0) ids = ids.slice(0, k);
  const probs = softmax(ids.map((i) => l[i]!));
  let cum = 0;
  for (let i = 0; i < ids.length; i++) {
    cum += probs[i]!;
    if (cum >= p) return ids.slice(0, i + 1);
  }
  return ids;
}

const byId = (ids: Iterable<number>) => [...ids].sort((a, b) => a - b);

test('top-p keeps the smallest most-likely prefix whose mass is >= p (after top-k, and on the whole vocabulary)', () => {
  // A hand-made distribution, away from the float boundaries: probabilities 0.5, 0.3, 0.2.
  const l = new Float32Array([Math.log(0.2), Math.log(0.5), Math.log(0.3)]);
  const kept = (p: number) => byId(new Sampler({ ...OFF, topP: p, seed: 1 }).candidates(l).ids);
  assert.deepEqual(kept(0.49), [1]);
  assert.deepEqual(kept(0.51), [1, 2]);
  assert.deepEqual(kept(0.79), [1, 2]);
  assert.deepEqual(kept(0.81), [0, 1, 2]);
  // A 32000 vocabulary, peaked (a few tokens kept) to flat (thousands kept), with ties at the cut.
  for (const [scale, p] of [[4, 0.9], [3, 0.7], [2, 0.5], [0.3, 0.95], [1, 0.99], [6, 0.99]] as const) {
    const big = randomLogits(32000, 11, scale);
    const ref = refTopP(big, p);
    assert.ok(ref.length > 1, `${ref.length}`);
    assert.deepEqual(byId(new Sampler({ ...OFF, topP: p, seed: 1 }).candidates(big).ids), byId(ref), `scale ${scale} p ${p}`);
    const refK = refTopP(big, p, 500);
    assert.deepEqual([...new Sampler({ ...OFF, topK: 500, topP: p, seed: 1 }).candidates(big).ids], refK, `top-k 500 then p ${p}`);
  }
  const ties = Float32Array.from({ length: 1000 }, (_, i) => (i % 10 === 0 ? 2 : 0)); // 100 tokens share the top
  assert.deepEqual(byId(new Sampler({ ...OFF, topP: 0.2, seed: 1 }).candidates(ties).ids), byId(refTopP(ties, 0.2)));
});

test('top-p then min-p (llama.cpp order) on the same candidates, with and without top-k', () => {
  for (const [scale, p, minP, k] of [[2, 0.9, 0.05, 0], [0.5, 0.95, 0.5, 0], [2, 0.5, 0.01, 0], [2, 0.95, 0.05, 40], [0.5, 0.8, 0.3, 200]] as const) {
    const l = randomLogits(32000, 23, scale);
    const afterP = refTopP(l, p, k);
    const pmax = l[afterP[0]!]!;
    const ref = afterP.filter((i) => Math.exp(l[i]! - pmax) >= minP);
    const got = new Sampler({ ...OFF, topK: k, topP: p, minP, seed: 1 }).candidates(l);
    assert.deepEqual(byId(got.ids), byId(ref), `scale ${scale} p ${p} minP ${minP} k ${k}`);
    const probs = softmax(ref.map((i) => l[i]!));
    got.ids.forEach((id, j) => assert.ok(Math.abs(got.probs[j]! - probs[ref.indexOf(id)]!) < 1e-9));
  }
});

test('min-p keeps tokens whose probability is >= minP times the top probability', () => {
  const l = randomLogits(32000, 5, 2);
  const pmax = Math.max(...l);
  for (const minP of [0.05, 0.2, 0.9]) {
    const ref = [...l.keys()].filter((i) => Math.exp(l[i]! - pmax) >= minP).sort((a, b) => a - b);
    const got = [...new Sampler({ ...OFF, minP, seed: 1 }).candidates(l).ids].sort((a, b) => a - b);
    assert.deepEqual(got, ref, `minP ${minP}`);
  }
});

test('llama.cpp order: top-p judges probabilities at temperature 1, temperature then reshapes the survivors', () => {
  const l = new Float32Array([Math.log(0.1), Math.log(0.6), Math.log(0.3)]);
  const c = new Sampler({ ...OFF, topP: 0.8, temperature: 0.1, seed: 1 }).candidates(l);
  assert.deepEqual(byId(c.ids), [1, 2]); // at temperature 0.1 first, only token 1 would reach 0.8
  const ref = softmax([l[1]! / 0.1, l[2]! / 0.1]);
  c.ids.forEach((id, i) => assert.ok(Math.abs(c.probs[i]! - ref[id - 1]!) < 1e-12));
});

test('repetition penalty: positive logits divided, negative multiplied, over the last repeatLastN tokens, once per token', () => {
  const greedy = (l: number[], history: number[], o: SamplerOptions = {}) =>
    new Sampler({ temperature: 0, repetitionPenalty: 1.1, ...o }).sample(Float32Array.from(l), history);
  assert.equal(greedy([2.0, 1.9], []), 0);
  assert.equal(greedy([2.0, 1.9], [0]), 1); // 2.0 / 1.1 = 1.82 < 1.9
  assert.equal(greedy([2.0, 1.9], [0], { repetitionPenalty: 1 }), 0);
  assert.equal(greedy([-1, -1.05], [0]), 1); // -1 * 1.1 = -1.1 < -1.05
  assert.equal(greedy([2.0, 1.9], [0, 1, 1], { repeatLastN: 2 }), 0); // token 0 is outside the window; 1 is penalised
  assert.equal(greedy([2.0, 1.9], [0, 1, 1], { repeatLastN: -1 }), 0); // both penalised: 1.82 vs 1.73
  // Occurring three times is penalised like occurring once (sampled distributions are identical).
  const l = Float32Array.from([1, 2, 3, -1]);
  const once = new Sampler({ ...OFF, repetitionPenalty: 1.3, seed: 1 }).candidates(l, [2, 3]);
  const thrice = new Sampler({ ...OFF, repetitionPenalty: 1.3, seed: 1 }).candidates(l, [2, 2, 3, 2, 3]);
  assert.deepEqual(thrice, once);
  const ref = softmax([1, 2, 3 / 1.3, -1 * 1.3]);
  once.probs.forEach((p, i) => assert.ok(Math.abs(p - ref[once.ids[i]!]!) < 1e-6));
});

function chiSquare(counts: number[], probs: number[], n: number): number {
  return counts.reduce((a, c, i) => a + (c - n * probs[i]!) ** 2 / (n * probs[i]!), 0);
}

test('empirical distribution at temperature 1 matches softmax (chi-square, fixed seed)', () => {
  const l = Float32Array.from([0.5, 1.5, -0.3, 2.2, 0.0, 1.1, -1.0, 0.7, 1.9, 0.2]);
  const probs = softmax([...l]);
  const N = 20000;
  const s = new Sampler({ ...OFF, seed: 2024 });
  const counts = new Array<number>(l.length).fill(0);
  for (let i = 0; i < N; i++) counts[s.sample(l)]!++;
  const chi2 = chiSquare(counts, probs, N);
  assert.ok(chi2 < 33, `chi2 ${chi2.toFixed(2)} with 9 degrees of freedom (p < 1e-4 above 33)`);
  // A token that the filter removed must never come out, and the rest follow softmax(logits / T) renormalised.
  const s2 = new Sampler({ ...OFF, topK: 4, temperature: 0.7, seed: 99 });
  const top = sortedIds(l).slice(0, 4);
  const p2 = softmax(top.map((i) => l[i]! / 0.7));
  const c2 = new Array<number>(4).fill(0);
  for (let i = 0; i < N; i++) {
    const t = s2.sample(l);
    const j = top.indexOf(t);
    assert.ok(j >= 0, `token ${t} is outside the top 4`);
    c2[j]!++;
  }
  const chi2b = chiSquare(c2, p2, N);
  assert.ok(chi2b < 22, `chi2 ${chi2b.toFixed(2)} with 3 degrees of freedom`);
});

test('bad options and bad logits give clear RangeErrors', () => {
  assert.throws(() => new Sampler({ temperature: -1 }), /temperature/);
  assert.throws(() => new Sampler({ topK: 1.5 }), /topK/);
  assert.throws(() => new Sampler({ topP: 0 }), /topP/);
  assert.throws(() => new Sampler({ minP: 2 }), /minP/);
  assert.throws(() => new Sampler({ repetitionPenalty: 0 }), /repetitionPenalty/);
  assert.throws(() => new Sampler({ repeatLastN: -2 }), /repeatLastN/);
  assert.throws(() => new Sampler({ seed: -3 }), /seed/);
  const s = new Sampler({ ...OFF, seed: 1 });
  assert.throws(() => s.sample(Float32Array.from([0, NaN])), /NaN/);
  assert.throws(() => s.sample(Float32Array.from([-Infinity, -Infinity])), /-Infinity/);
  assert.throws(() => s.sample(new Float32Array(0)), /empty/);
  // -Infinity entries are simply impossible tokens.
  for (let i = 0; i < 50; i++) assert.equal(s.sample(Float32Array.from([-Infinity, 0, -Infinity])), 1);
});
