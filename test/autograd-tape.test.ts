// The tape's mechanics (accumulation, no-grad, freeing, precision), the gradient checker's ability to fail, and
// the values of the MoE routing and loss pieces against definitions that do not depend on our code: transformers'
// load_balancing_loss_func transcribed loop by loop, tensor2tensor's cv_squared, the normal CDF from C's erfc.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { isGradEnabled, noGrad, record, gradOf, Var } from '../src/autograd/tape.js';
import { Rng } from '../src/util/rng.js';
import { gradcheck } from '../src/autograd/gradcheck.js';
import { gradKernels, refKernels, setGradKernels, type GradKernels } from '../src/autograd/kernels.js';
import * as ops from '../src/autograd/ops.js';
import * as moe from '../src/autograd/moe.js';
import * as losses from '../src/autograd/losses.js';
import { mixtralTrainConfig, trainConfigProblems, MixtralTrain } from '../src/model/mixtral-train.js';
import type { MixtralConfig } from '../src/model/config.js';
import { AdamW } from '../src/workflows/optimizer.js';

function f64(values: number[], shape: number[], requiresGrad = true): Var {
  return new Var(Float64Array.from(values), shape, requiresGrad);
}

function randVar(rng: Rng, shape: number[], requiresGrad = true, precision: 'f32' | 'f64' = 'f64'): Var {
  const n = shape.reduce((a, b) => a * b, 1);
  const d = precision === 'f64' ? new Float64Array(n) : new Float32Array(n);
  for (let i = 0; i < n; i++) d[i] = rng.normal();
  return new Var(d, shape, requiresGrad);
}

// ---------------------------------------------------------------------------------------------------------------
// Tape mechanics

test('tape: gradients accumulate across backward calls; intermediate gradients and the graph are freed', () => {
  const x = f64([1, 2, 3], [3]);
  const y = ops.mul(x, x); // y = x^2, dy/dx = 2x
  const l = ops.sum(y);
  assert.equal(l.item(), 14);
  l.backward();
  assert.deepEqual([...x.grad!], [2, 4, 6]);
  assert.equal(y.grad, null, 'an intermediate gradient is dropped after backward');
  assert.equal(y.node, null, 'the graph is freed');
  assert.throws(() => l.backward(), /already freed/);
  // A second graph adds to the leaf's gradient (gradient accumulation).
  ops.sum(ops.affine(x, 3)).backward();
  assert.deepEqual([...x.grad!], [5, 7, 9]);
  x.zeroGrad();
  assert.deepEqual([...x.grad!], [0, 0, 0]);
});

test('tape: retainGrad keeps an intermediate gradient; a Var used twice gets both contributions', () => {
  const x = f64([0.5, -1], [2]);
  const y = ops.affine(x, 2); // 2x
  y.retainGrad = true;
  const l = ops.sum(ops.add(ops.mul(y, y), y)); // 4x^2 + 2x
  l.backward();
  assert.deepEqual([...y.grad!], [2 * 1 + 1, 2 * -2 + 1]);
  assert.deepEqual([...x.grad!], [8 * 0.5 + 2, 8 * -1 + 2]);
});

test('tape: no-grad mode records nothing; constants get no gradient', () => {
  const x = f64([1, 2], [2]);
  const c = f64([3, 4], [2], false);
  const y = noGrad(() => {
    assert.equal(isGradEnabled(), false);
    return ops.mul(x, c);
  });
  assert.equal(isGradEnabled(), true);
  assert.equal(y.requiresGrad, false);
  assert.equal(y.node, null);
  assert.throws(() => ops.sum(y).backward(), /does not depend/);
  ops.sum(ops.mul(x, c)).backward();
  assert.deepEqual([...x.grad!], [3, 4]);
  assert.equal(c.grad, null);
});

test('tape: seeds, shapes and precisions are checked', () => {
  const x = f64([1, 2], [2]);
  const y = ops.affine(x, 2);
  assert.throws(() => y.backward(), /needs a seed/);
  y.backward(Float64Array.from([1, 10]));
  assert.deepEqual([...x.grad!], [2, 20]);
  const a32 = new Var(new Float32Array(2), [2], true);
  assert.throws(() => ops.add(x, a32), /mix f32 and f64/);
  assert.throws(() => new Var(new Float32Array(3), [2, 2]), /3 values/);
  assert.throws(() => ops.linear(f64([1, 2, 3], [1, 3]), f64([1, 2], [1, 2])), /columns/);
  assert.throws(() => ops.embedding(f64([1, 2], [2, 1]), [2]), /outside/);
  // f32 in, f32 out.
  const rng = new Rng(1);
  const w = randVar(rng, [3, 4], true, 'f32');
  const out = ops.linear(randVar(rng, [2, 4], false, 'f32'), w);
  assert.ok(out.data instanceof Float32Array);
  ops.sum(out).backward();
  assert.ok(w.grad instanceof Float32Array);
});

test('gradcheck fails on a wrong backward and on a routing change, so its passes mean something', () => {
  const x = f64([0.3, -0.8, 1.1], [3]);
  // sin with a backward that is 1% off.
  const badSin = (v: Var) => {
    const out = Float64Array.from(v.data, Math.sin);
    return record('badSin', out, v.shape, [v], (g) => {
      const dv = gradOf(v)!;
      for (let i = 0; i < v.size; i++) dv[i] += 1.01 * g[i] * Math.cos(v.data[i]);
    });
  };
  const rep = gradcheck(() => ops.sum(badSin(x)), [x]);
  assert.ok(rep.maxRelError > 5e-3 && rep.maxRelError < 2e-2, `relative error ${rep.maxRelError} should be ~1e-2`);

  // Two nearly tied router logits: a step of 1e-3 flips the choice, and the checker says so.
  const z = f64([1, 1 + 5e-4, -1], [1, 3]);
  let r: moe.Routing | null = null;
  const rep2 = gradcheck(() => ops.sum((r = moe.topkRoute(z, 1, 'softmax')).gates), [z], { signature: () => r!.experts.join() });
  assert.ok(rep2.signatureChanges > 0);
});

test('kernels: the matmuls go through the replaceable GradKernels interface', () => {
  const calls: string[] = [];
  const spy: GradKernels = {
    name: 'spy',
    matmul: (...a) => (calls.push('matmul'), refKernels.matmul(...a)),
    matmulBackward: (...a) => (calls.push('matmulBackward'), refKernels.matmulBackward(...a)),
    groupedMatmul: (...a) => (calls.push('groupedMatmul'), refKernels.groupedMatmul(...a)),
    groupedMatmulBackward: (...a) => (calls.push('groupedMatmulBackward'), refKernels.groupedMatmulBackward(...a)),
    softmaxRows: (...a) => (calls.push('softmaxRows'), refKernels.softmaxRows(...a)),
    attentionForward: (...a) => (calls.push('attentionForward'), refKernels.attentionForward(...a)),
    attentionBackward: (...a) => (calls.push('attentionBackward'), refKernels.attentionBackward(...a)),
    crossEntropyBackward: (...a) => (calls.push('crossEntropyBackward'), refKernels.crossEntropyBackward(...a)),
    adamw: (...a) => (calls.push('adamw'), refKernels.adamw(...a)),
  };
  const prev = setGradKernels(spy);
  try {
    assert.equal(gradKernels().name, 'spy');
    const rng = new Rng(2);
    const x = randVar(rng, [3, 4]);
    const y = ops.linear(x, randVar(rng, [2, 4]));
    const g = moe.groupedLinear(x, randVar(rng, [2, 5, 4]), Int32Array.from([0, 1, 3]));
    ops.sum(ops.add(ops.sum(y), ops.sum(g))).backward();
    losses.crossEntropy(y, Int32Array.from([0, 1, 1])).backward();
    const qkv = randVar(rng, [4, 4]);
    ops.sum(ops.attention(qkv, qkv, qkv, { batch: 2, seqLen: 2, nHeads: 2, nKvHeads: 2, headDim: 2, slidingWindow: null })).backward();
    new AdamW([{ name: 'x', data: x.data, grad: x.grad, decay: true }]).step(1e-3);
  } finally {
    setGradKernels(prev);
  }
  assert.deepEqual([...new Set(calls)].sort(), ['adamw', 'attentionBackward', 'attentionForward', 'crossEntropyBackward', 'groupedMatmul', 'groupedMatmulBackward', 'matmul', 'matmulBackward', 'softmaxRows']);
});

test('kernels: the grouped GEMM equals one dense matmul per expert', () => {
  const rng = new Rng(3);
  const x = randVar(rng, [6, 4], false);
  const w = randVar(rng, [3, 5, 4], false);
  const offsets = Int32Array.from([0, 2, 2, 6]);
  const y = moe.groupedLinear(x, w, offsets);
  for (let e = 0; e < 3; e++) {
    const rows = offsets[e + 1] - offsets[e];
    if (!rows) continue;
    const xe = new Var(x.data.slice(offsets[e] * 4, offsets[e + 1] * 4), [rows, 4]);
    const we = new Var(w.data.slice(e * 20, e * 20 + 20), [5, 4]);
    assert.deepEqual([...ops.linear(xe, we).data], [...y.data.subarray(offsets[e] * 5, offsets[e + 1] * 5)]);
  }
});

// ---------------------------------------------------------------------------------------------------------------
// Numbers from outside

test('normalCdf agrees with C erfc (Python math.erfc) to 1e-15', () => {
  // 0.5 * math.erfc(-z / sqrt(2)) in Python 3.
  const ref: [number, number][] = [
    [0, 0.5], [1, 0.8413447460685429], [-2, 0.02275013194817922], [3, 0.9986501019683699],
    [-5, 2.866515718791946e-7], [0.3, 0.6179114221889526], [-0.7, 0.24196365222307306], [2.5, 0.9937903346742238],
  ];
  for (const [z, p] of ref) assert.ok(Math.abs(moe.normalCdf(z) - p) < 1e-15, `Phi(${z}) = ${moe.normalCdf(z)}, expected ${p}`);
});

test('rng: seeded and reproducible', () => {
  const a = new Rng(42), b = new Rng(42), c = new Rng(43);
  const sa = Array.from({ length: 5 }, () => a.uniform());
  assert.deepEqual(sa, Array.from({ length: 5 }, () => b.uniform()));
  assert.notDeepEqual(sa, Array.from({ length: 5 }, () => c.uniform()));
  assert.ok(sa.every((u) => u >= 0 && u < 1));
});

/** transformers' load_balancing_loss_func (no attention mask), transcribed with the same tensors it builds. */
function hfLoadBalancing(layerLogits: number[][][], E: number, k: number): number {
  const rows = layerLogits.flat(); // torch.cat over layers, dim 0
  const routing = rows.map((z) => { const m = Math.max(...z); const e = z.map((v) => Math.exp(v - m)); const s = e.reduce((a, b) => a + b); return e.map((v) => v / s); });
  const selected = routing.map((p) => [...p.keys()].sort((a, b) => p[b] - p[a] || a - b).slice(0, k));
  // expert_mask: one_hot(selected) [N, k, E]; tokens_per_expert = mean over N -> [k, E].
  const tokensPerExpert = Array.from({ length: k }, (_, s) => Array.from({ length: E }, (_, e) => selected.filter((sel) => sel[s] === e).length / rows.length));
  const routerProb = Array.from({ length: E }, (_, e) => routing.reduce((a, p) => a + p[e], 0) / rows.length);
  let overall = 0;
  for (let s = 0; s < k; s++) for (let e = 0; e < E; e++) overall += tokensPerExpert[s][e] * routerProb[e];
  return overall * E;
}

test('load-balancing loss equals transformers load_balancing_loss_func over concatenated layers (k when the router is uniform)', () => {
  const rng = new Rng(4);
  const E = 6, k = 2, T = 9;
  const zs = [randVar(rng, [T, E]), randVar(rng, [T, E]), randVar(rng, [T, E])];
  const experts = zs.map((z) => moe.topkRoute(z, k, 'renormalize').experts);
  const ours = losses.loadBalancingLoss(zs, experts, k).item();
  const nested = zs.map((z) => Array.from({ length: T }, (_, t) => Array.from(z.data.subarray(t * E, t * E + E))));
  const hf = hfLoadBalancing(nested, E, k);
  assert.ok(Math.abs(ours - hf) < 1e-12, `${ours} vs ${hf}`);
  // Averaging per-layer losses is a different number: the layers are pooled first.
  const perLayer = zs.map((z, l) => losses.loadBalancingLoss([z], [experts[l]], k).item());
  assert.ok(Math.abs(perLayer.reduce((a, b) => a + b) / 3 - ours) > 1e-6);
  // Uniform router probabilities: sum_e f_e = k, so the loss is k (top-2) or 1 (Switch), whatever was chosen.
  const flat = f64(new Array(T * E).fill(0.25), [T, E]);
  for (const kk of [1, 2, 3]) {
    const ex = Int32Array.from({ length: T * kk }, () => rng.int(E));
    assert.ok(Math.abs(losses.loadBalancingLoss([flat], [ex], kk).item() - kk) < 1e-12);
  }
  // A padding mask removes tokens exactly as dropping them would.
  const mask = Array.from({ length: T }, (_, t) => (t % 3 === 1 ? 0 : 1));
  const kept = mask.flatMap((m, t) => (m ? [t] : []));
  const sub = (z: Var) => f64(kept.flatMap((t) => Array.from(z.data.subarray(t * E, t * E + E))), [kept.length, E]);
  const subEx = (ex: Int32Array) => Int32Array.from(kept.flatMap((t) => Array.from(ex.subarray(t * k, t * k + k))));
  const masked = losses.loadBalancingLoss(zs, experts, k, mask).item();
  const dropped = losses.loadBalancingLoss(zs.map(sub), experts.map(subEx), k).item();
  assert.ok(Math.abs(masked - dropped) < 1e-12);
});

test('router z-loss is the mean of logsumexp^2; CV^2 uses the population variance (tensor2tensor cv_squared)', () => {
  const E = 8;
  const z = f64(new Array(3 * E).fill(0), [3, E]);
  assert.ok(Math.abs(losses.routerZLoss([z]).item() - Math.log(E) ** 2) < 1e-12);
  const z2 = f64([0, Math.log(3), 5, 5], [2, 2]); // lse = log 4, 5 + log 2
  assert.ok(Math.abs(losses.routerZLoss([z2]).item() - (Math.log(4) ** 2 + (5 + Math.log(2)) ** 2) / 2) < 1e-12);
  // [1,2,3,4]: mean 2.5, population variance 1.25 -> 0.2 (the unbiased variance would give 0.2667).
  assert.ok(Math.abs(losses.cvSquared(f64([1, 2, 3, 4], [4])).item() - 1.25 / (6.25 + 1e-10)) < 1e-12);
  assert.equal(losses.cvSquared(f64([2, 2, 2], [3])).item(), 0);
});

test('cross-entropy: mean over target positions only; all-ignored is 0', () => {
  const z = f64([0, 0, 0, 0, 1, 2, 3, 4], [2, 4]);
  const ce = losses.crossEntropy(z, [1, -100]).item();
  assert.ok(Math.abs(ce - Math.log(4)) < 1e-12);
  const lse = Math.log(Math.exp(1) + Math.exp(2) + Math.exp(3) + Math.exp(4));
  assert.ok(Math.abs(losses.crossEntropy(z, [2, 3]).item() - (Math.log(4) + lse - 4) / 2) < 1e-12);
  assert.equal(losses.crossEntropy(z, [-1, -100]).item(), 0);
  assert.throws(() => losses.crossEntropy(z, [4, 0]), /outside/);
});

// ---------------------------------------------------------------------------------------------------------------
// Routing, capacity, dispatch

test('routers: Mixtral gates sum to 1, Switch gates are the softmax probability, noisy top-k in evaluation is Mixtral', () => {
  const rng = new Rng(5);
  const T = 7, D = 5, E = 4, F = 3;
  const x = randVar(rng, [T, D], false);
  const p = { gate: randVar(rng, [E, D], false), noise: randVar(rng, [E, D], false), w1: randVar(rng, [E, F, D], false), w2: randVar(rng, [E, D, F], false), w3: randVar(rng, [E, F, D], false) };
  const base = { training: false, jitter: 0, capacityFactor: null, noiseEpsilon: 1e-2, rng: null };
  const mix = moe.sparseMoeBlock(x, p, { ...base, router: 'softmax-topk', k: 2 });
  for (let t = 0; t < T; t++) assert.ok(Math.abs(mix.gates.data[2 * t] + mix.gates.data[2 * t + 1] - 1) < 1e-14);
  const sw = moe.sparseMoeBlock(x, p, { ...base, router: 'switch', k: 1 });
  for (let t = 0; t < T; t++) {
    const pr = new Float64Array(E);
    ops.softmaxRow(mix.logits.data, t * E, E, pr, 0);
    assert.equal(sw.experts[t], mix.experts[2 * t], 'top-1 is the first of the top-2');
    assert.ok(Math.abs(sw.gates.data[t] - pr[sw.experts[t]]) < 1e-14);
    assert.ok(sw.gates.data[t] < 1);
  }
  const noisyEval = moe.sparseMoeBlock(x, p, { ...base, router: 'noisy-topk', k: 2 });
  assert.deepEqual([...noisyEval.experts], [...mix.experts]);
  assert.deepEqual([...noisyEval.out.data], [...mix.out.data]);
  // Training: the noise moves the choice for some tokens, and it needs an rng.
  assert.throws(() => moe.sparseMoeBlock(x, p, { ...base, training: true, router: 'noisy-topk', k: 2 }), /rng/);
  for (let i = 0; i < p.noise.size; i++) p.noise.data[i] = 3; // large noise std
  const noisyTrain = moe.sparseMoeBlock(x, p, { ...base, training: true, rng: new Rng(1), router: 'noisy-topk', k: 2 });
  assert.notDeepEqual([...noisyTrain.experts], [...mix.experts]);
  // Jitter changes the router's input only in training.
  const jit = moe.sparseMoeBlock(x, p, { ...base, router: 'softmax-topk', k: 2, jitter: 0.2 });
  assert.deepEqual([...jit.logits.data], [...mix.logits.data]);
  const jitTrain = moe.sparseMoeBlock(x, p, { ...base, training: true, rng: new Rng(2), router: 'softmax-topk', k: 2, jitter: 0.2 });
  assert.notDeepEqual([...jitTrain.logits.data], [...mix.logits.data]);
});

test('capacity: first choices are admitted before second choices, no expert exceeds capacity, dropped tokens get zero', () => {
  assert.equal(moe.expertCapacity(1.0, 10, 2, 4), 5);
  assert.equal(moe.expertCapacity(1.25, 10, 1, 4), 4);
  // 4 tokens, k = 2, 3 experts; capacity 2.
  const experts = Int32Array.from([0, 1, 0, 2, 0, 1, 1, 0]);
  const keep = moe.capacityMask(experts, 4, 2, 3, 2);
  // First choices in token order: t0->0, t1->0, t2->0 (full: dropped), t3->1. Second: t0->1, t1->2, t2->1 (full), t3->0 (full).
  assert.deepEqual([...keep], [1, 1, 1, 1, 0, 0, 1, 0]);
  const plan = moe.planDispatch(experts, 4, 2, 3, keep);
  assert.deepEqual([...plan.offsets], [0, 2, 4, 5]);
  assert.deepEqual([...plan.tokenOfRow], [0, 1, 0, 3, 1]);
  assert.deepEqual([...plan.rowOfSlot], [0, 2, 1, 4, -1, -1, 3, -1]);

  const rng = new Rng(6);
  const T = 12, D = 4, E = 3, F = 2;
  const x = randVar(rng, [T, D], false);
  const p = { gate: randVar(rng, [E, D], false), noise: null, w1: randVar(rng, [E, F, D], false), w2: randVar(rng, [E, D, F], false), w3: randVar(rng, [E, F, D], false) };
  const r = moe.sparseMoeBlock(x, p, { router: 'switch', k: 1, training: true, jitter: 0, capacityFactor: 0.5, noiseEpsilon: 0, rng: null });
  const cap = moe.expertCapacity(0.5, T, 1, E);
  const ran = new Int32Array(E);
  for (let t = 0; t < T; t++) if (r.kept![t]) ran[r.experts[t]]++;
  assert.ok([...ran].every((n) => n <= cap));
  assert.equal(r.dropped, T - ran.reduce((a, b) => a + b));
  assert.ok(r.dropped > 0);
  for (let t = 0; t < T; t++) if (!r.kept![t]) assert.ok(r.out.data.subarray(t * D, t * D + D).every((v) => v === 0), 'a dropped token only has its residual');
  // Evaluation is dropless whatever the factor.
  const ev = moe.sparseMoeBlock(x, p, { router: 'switch', k: 1, training: false, jitter: 0, capacityFactor: 0.5, noiseEpsilon: 0, rng: null });
  assert.equal(ev.kept, null);
  assert.equal(ev.dropped, 0);
});

// ---------------------------------------------------------------------------------------------------------------
// Training config

const SMALL: MixtralConfig = {
  vocabSize: 32, hiddenSize: 8, intermediateSize: 6, numHiddenLayers: 4, numAttentionHeads: 2, numKeyValueHeads: 1,
  headDim: 4, numLocalExperts: 4, numExpertsPerTok: 2, rmsNormEps: 1e-5, ropeTheta: 10000, maxPositionEmbeddings: 16,
  slidingWindow: null, tieWordEmbeddings: false,
};

test('training config: defaults, checks, MoE every n-th layer, dense', () => {
  const c = mixtralTrainConfig(SMALL);
  assert.equal(c.moe.router, 'softmax-topk');
  assert.equal(c.moe.routerAuxLossCoef, 0.02);
  assert.equal(c.moe.capacityFactor, null);
  assert.deepEqual(trainConfigProblems(c), []);
  assert.match(trainConfigProblems(mixtralTrainConfig(SMALL, { router: 'switch' })).join(), /top-1/);
  assert.match(trainConfigProblems(mixtralTrainConfig({ ...SMALL, numExpertsPerTok: 4 }, { router: 'noisy-topk' })).join(), /noisy-topk needs/);
  assert.match(trainConfigProblems(mixtralTrainConfig(SMALL, { capacityFactor: 0 })).join(), /capacityFactor/);
  assert.match(trainConfigProblems(mixtralTrainConfig(SMALL, { moeLayerFrequency: 0 })).join(), /moeLayerFrequency/);
  assert.equal(c.moe.routerAuxLossScope, 'concatenated');
  assert.match(trainConfigProblems(mixtralTrainConfig(SMALL, { routerAuxLossScope: 'x' as 'per-layer' })).join(), /routerAuxLossScope/);
  assert.throws(() => MixtralTrain.init(mixtralTrainConfig(SMALL, { router: 'switch' })), /bad config/);

  const every2 = MixtralTrain.init(mixtralTrainConfig(SMALL, { moeLayerFrequency: 2 }));
  assert.deepEqual(every2.params.layers.map((L) => (L.block_sparse_moe ? 'moe' : 'dense')), ['dense', 'moe', 'dense', 'moe']);
  const dense = MixtralTrain.init(mixtralTrainConfig({ ...SMALL, numLocalExperts: 1, numExpertsPerTok: 1 }));
  assert.ok(dense.params.layers.every((L) => L.mlp && !L.block_sparse_moe));
  const r = dense.loss([1, 2, 3, 4], [2, 3, 4, -100]);
  assert.equal(r.balance, null);
  assert.equal(r.routing.length, 0);
  // Names: HF names, experts stacked, tied head listed once.
  const tied = MixtralTrain.init(mixtralTrainConfig({ ...SMALL, tieWordEmbeddings: true }, { router: 'noisy-topk' }));
  const names = tied.namedParameters().map(([n]) => n);
  assert.ok(names.includes('model.layers.0.block_sparse_moe.experts.w1.weight'));
  assert.ok(names.includes('model.layers.0.block_sparse_moe.noise.weight'));
  assert.ok(!names.includes('lm_head.weight'));
  assert.equal(tied.params.lm_head, tied.params.embed_tokens);
  assert.deepEqual(tied.params.layers[0].block_sparse_moe!.experts.w2.shape, [4, 8, 6]);
});

test('balancing loss scope: per-layer is the mean of each layer\'s loss, concatenated is HF\'s single count', () => {
  const tokens = [1, 5, 9, 3, 7, 2, 30, 11];
  const targets = tokens.map((_, i) => (i + 1 < tokens.length ? tokens[i + 1] : -100));
  const losses2 = (scope: 'per-layer' | 'concatenated') => {
    const m = MixtralTrain.init(mixtralTrainConfig(SMALL, { routerAuxLossScope: scope, routerZLossCoef: 0 }), { seed: 3, std: 0.5, precision: 'f64' });
    return m.loss(tokens, targets, { batch: 1 });
  };
  const per = losses2('per-layer');
  const cat = losses2('concatenated');
  const each = per.routing.map((r) => losses.loadBalancingLoss([r.logits], [r.experts], SMALL.numExpertsPerTok).item());
  assert.ok(Math.abs(per.balance!.item() - each.reduce((a, b) => a + b, 0) / each.length) < 1e-12);
  const all = losses.loadBalancingLoss(cat.routing.map((r) => r.logits), cat.routing.map((r) => r.experts), SMALL.numExpertsPerTok).item();
  assert.ok(Math.abs(cat.balance!.item() - all) < 1e-12);
  assert.notEqual(per.balance!.item().toFixed(9), cat.balance!.item().toFixed(9)); // the two forms differ on an uneven load
  assert.ok(Math.abs(per.ce.item() - cat.ce.item()) < 1e-12); // same weights, same routing: only the balance term differs
});
