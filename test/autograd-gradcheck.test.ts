// Every autograd op, router and loss, and whole small MoE models, against central finite differences in float64.
// Each op is checked through a random linear probe (loss = sum(out * R), R fixed), so the whole vector-Jacobian
// product is tested, not one direction. Router checks also assert that no perturbation changed the discrete choice
// of experts (or the capacity mask), and report how many evaluations that covered.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { Var } from '../src/autograd/tape.js';
import { Rng } from '../src/util/rng.js';
import { gradcheck, type GradcheckReport } from '../src/autograd/gradcheck.js';
import * as ops from '../src/autograd/ops.js';
import * as moe from '../src/autograd/moe.js';
import * as losses from '../src/autograd/losses.js';
import { MixtralTrain, mixtralTrainConfig, type MoeOptions } from '../src/model/mixtral-train.js';
import type { MixtralConfig } from '../src/model/config.js';

/** The bound the issue asks for (4-point central differences in float64, h = 1e-3, land near 1e-10). */
const TOL = 1e-6;

function rand(rng: Rng, shape: number[], scale = 1, requiresGrad = true): Var {
  const n = shape.reduce((a, b) => a * b, 1);
  const d = new Float64Array(n);
  for (let i = 0; i < n; i++) d[i] = rng.normal() * scale;
  return new Var(d, shape, requiresGrad);
}

/** loss = sum(v * R) for a fixed random R: checks the full vector-Jacobian product of the op producing v. */
function prober(rng: Rng, shape: readonly number[]): (v: Var) => Var {
  const R = rand(rng, [...shape], 1, false);
  return (v: Var) => ops.sum(ops.mul(v, R));
}

function expectOk(t: TestContext, what: string, r: GradcheckReport, tol = TOL): void {
  t.diagnostic(`${what}: max rel error ${r.maxRelError.toExponential(2)} (abs ${r.maxAbsError.toExponential(2)}) over ${r.checked} elements` +
    (r.signature !== null ? `; expert choice unchanged in all ${4 * r.checked} perturbed evaluations: ${r.signatureChanges === 0}` : ''));
  assert.ok(r.checked > 0, `${what}: nothing checked`);
  assert.equal(r.signatureChanges, 0, `${what}: a perturbation changed the routing; the finite differences are meaningless`);
  assert.ok(r.maxRelError < tol, `${what}: max rel error ${r.maxRelError} at input ${r.worst.input}[${r.worst.index}]: analytic ${r.worst.analytic} numeric ${r.worst.numeric}`);
}

// ---------------------------------------------------------------------------------------------------------------
// Dense ops

test('gradcheck: embedding (repeated ids scatter-add), linear', (t) => {
  const rng = new Rng(1);
  const w = rand(rng, [10, 5]);
  const ids = [3, 1, 3, 9, 0, 3];
  const probe = prober(rng, [ids.length, 5]);
  expectOk(t, 'embedding', gradcheck(() => probe(ops.embedding(w, ids)), [w]));

  const x = rand(rng, [4, 6]);
  const wl = rand(rng, [5, 6]);
  const probe2 = prober(rng, [4, 5]);
  expectOk(t, 'linear', gradcheck(() => probe2(ops.linear(x, wl)), [x, wl]));
});

test('gradcheck: rmsNorm, softmax, silu, softplus, mul, add, affine, sum, sumRows, reshape', (t) => {
  const rng = new Rng(2);
  const x = rand(rng, [3, 8]);
  const w = rand(rng, [8]);
  const p1 = prober(rng, [3, 8]);
  expectOk(t, 'rmsNorm', gradcheck(() => p1(ops.rmsNorm(x, w, 1e-5)), [x, w]));

  const s = rand(rng, [3, 5], 2);
  const p2 = prober(rng, [3, 5]);
  expectOk(t, 'softmax', gradcheck(() => p2(ops.softmax(s)), [s]));

  const a = rand(rng, [4, 5], 2);
  const b = rand(rng, [4, 5], 2);
  const p3 = prober(rng, [4, 5]);
  expectOk(t, 'silu', gradcheck(() => p3(ops.silu(a)), [a]));
  expectOk(t, 'softplus', gradcheck(() => p3(ops.softplus(a)), [a]));
  expectOk(t, 'mul', gradcheck(() => p3(ops.mul(a, b)), [a, b]));
  expectOk(t, 'add (same input twice)', gradcheck(() => p3(ops.add(a, ops.mul(a, b))), [a, b]));
  expectOk(t, 'affine', gradcheck(() => p3(ops.affine(a, -1.7, 0.3)), [a]));
  expectOk(t, 'sum', gradcheck(() => ops.sum(ops.mul(a, a)), [a]));
  const p4 = prober(rng, [5]);
  expectOk(t, 'sumRows', gradcheck(() => p4(ops.sumRows(a)), [a]));
  const p5 = prober(rng, [2, 10]);
  expectOk(t, 'reshape', gradcheck(() => p5(ops.reshape(a, [2, 10])), [a]));
});

test('gradcheck: rope in both pair layouts', (t) => {
  const rng = new Rng(3);
  const x = rand(rng, [5, 12]);
  const pos = [0, 1, 2, 7, 100];
  const p = prober(rng, [5, 12]);
  expectOk(t, 'rope hf', gradcheck(() => p(ops.rope(x, 2, 6, pos, 10000, 'hf')), [x]));
  expectOk(t, 'rope gguf', gradcheck(() => p(ops.rope(x, 2, 6, pos, 1e6, 'gguf')), [x]));
});

test('gradcheck: causal grouped-query attention, batched, with and without a sliding window', (t) => {
  const rng = new Rng(4);
  const B = 2, T = 5, H = 4, KV = 2, hd = 3;
  const q = rand(rng, [B * T, H * hd]);
  const k = rand(rng, [B * T, KV * hd]);
  const v = rand(rng, [B * T, KV * hd]);
  const p = prober(rng, [B * T, H * hd]);
  for (const slidingWindow of [null, 2]) {
    const o = { batch: B, seqLen: T, nHeads: H, nKvHeads: KV, headDim: hd, slidingWindow };
    expectOk(t, `attention window ${slidingWindow}`, gradcheck(() => p(ops.attention(q, k, v, o)), [q, k, v]));
  }
});

// ---------------------------------------------------------------------------------------------------------------
// MoE pieces

test('gradcheck: gatherRows, groupedLinear (an expert with no rows), combineSlots (a dropped slot), scatterGates', (t) => {
  const rng = new Rng(5);
  const x = rand(rng, [4, 5]);
  const idx = Int32Array.from([2, 0, 2, 3, 1, 2]);
  const p1 = prober(rng, [6, 5]);
  expectOk(t, 'gatherRows', gradcheck(() => p1(moe.gatherRows(x, idx)), [x]));

  const xs = rand(rng, [7, 5]);
  const w = rand(rng, [3, 4, 5]);
  const offsets = Int32Array.from([0, 3, 3, 7]);
  const p2 = prober(rng, [7, 4]);
  expectOk(t, 'groupedLinear', gradcheck(() => p2(moe.groupedLinear(xs, w, offsets)), [xs, w]));
  assert.ok(w.grad!.subarray(20, 40).every((g) => g === 0), 'the expert without rows gets no gradient');

  const y = rand(rng, [5, 4]);
  const gates = rand(rng, [3, 2]);
  const rowOfSlot = Int32Array.from([4, 0, 1, -1, 2, 3]);
  const p3 = prober(rng, [3, 4]);
  expectOk(t, 'combineSlots', gradcheck(() => p3(moe.combineSlots(y, gates, rowOfSlot)), [y, gates]));

  const p4 = prober(rng, [3, 5]);
  const experts = Int32Array.from([4, 1, 0, 2, 3, 4]);
  expectOk(t, 'scatterGates', gradcheck(() => p4(moe.scatterGates(gates, experts, 5)), [gates]));
});

test('gradcheck: top-k routing, Mixtral (renormalised over the k) and Switch (softmax probability)', (t) => {
  const rng = new Rng(6);
  const z = rand(rng, [6, 5], 1.5);
  for (const [k, gating] of [[2, 'renormalize'], [3, 'renormalize'], [1, 'softmax'], [2, 'softmax']] as const) {
    let r: moe.Routing | null = null;
    const p = prober(rng, [6, k]);
    const rep = gradcheck(() => p((r = moe.topkRoute(z, k, gating)).gates), [z], { signature: () => r!.experts.join(',') });
    expectOk(t, `topkRoute k=${k} ${gating}`, rep);
  }
  // Mixtral's gates are the chosen softmax probabilities divided by their sum: check against that formula.
  const r = moe.topkRoute(z, 2, 'renormalize');
  const pr = new Float64Array(5);
  ops.softmaxRow(z.data, 0, 5, pr, 0);
  const [e0, e1] = [r.experts[0], r.experts[1]];
  assert.ok(Math.abs(r.gates.data[0] - pr[e0] / (pr[e0] + pr[e1])) < 1e-15);
  assert.ok(pr[e0] >= pr[e1] && [...pr].filter((v) => v > pr[e1]).length === 1, 'the two largest probabilities are chosen');
});

test('gradcheck: noisy top-k pieces: probInTopK (through clean, threshold and std), cvSquared', (t) => {
  const rng = new Rng(7);
  const clean = rand(rng, [6, 5]);
  const noisy = rand(rng, [6, 5], 1.5);
  const std = rand(rng, [6, 5], 0.3);
  for (let i = 0; i < std.size; i++) std.data[i] = 0.5 + Math.abs(std.data[i]);
  const p = prober(rng, [6, 5]);
  const order = () => {
    const s: number[] = [];
    for (let r = 0; r < 6; r++) {
      const o = new Int32Array(3);
      moe.topkIndices(noisy.data, r * 5, 5, 3, o, 0);
      s.push(...o);
    }
    return s.join(',');
  };
  expectOk(t, 'probInTopK k=2', gradcheck(() => p(moe.probInTopK(clean, noisy, std, 2)), [clean, noisy, std], { signature: order }));

  const v = rand(rng, [6]);
  for (let i = 0; i < 6; i++) v.data[i] += 3;
  expectOk(t, 'cvSquared', gradcheck(() => losses.cvSquared(v), [v]));
});

// ---------------------------------------------------------------------------------------------------------------
// Losses

test('gradcheck: cross-entropy with ignored positions, and with an external divisor', (t) => {
  const rng = new Rng(8);
  const z = rand(rng, [6, 7], 2);
  const targets = [3, -100, 0, 6, -1, 2];
  expectOk(t, 'crossEntropy', gradcheck(() => losses.crossEntropy(z, targets), [z]));
  expectOk(t, 'crossEntropy divisor 10', gradcheck(() => losses.crossEntropy(z, targets, { divisor: 10 }), [z]));
  assert.ok([1, 4].every((r) => z.grad!.subarray(r * 7, r * 7 + 7).every((g) => g === 0)), 'ignored positions get no gradient');
});

test('gradcheck: load-balancing loss over two layers (with a padding mask) and router z-loss', (t) => {
  const rng = new Rng(9);
  const E = 5, k = 2, T = 7;
  const z1 = rand(rng, [T, E]);
  const z2 = rand(rng, [T, E]);
  const ex = (z: Var) => moe.topkRoute(z.detach(), k, 'renormalize').experts;
  const e1 = ex(z1), e2 = ex(z2);
  const mask = [1, 1, 0, 1, 1, 1, 0];
  const sig = () => [...ex(z1), ...ex(z2)].join(',');
  expectOk(t, 'loadBalancingLoss', gradcheck(() => losses.loadBalancingLoss([z1, z2], [ex(z1), ex(z2)], k), [z1, z2], { signature: sig }));
  expectOk(t, 'loadBalancingLoss masked', gradcheck(() => losses.loadBalancingLoss([z1, z2], [e1, e2], k, mask), [z1, z2]));
  expectOk(t, 'routerZLoss', gradcheck(() => losses.routerZLoss([z1, z2]), [z1, z2]));
  expectOk(t, 'routerZLoss masked', gradcheck(() => losses.routerZLoss([z1, z2], mask), [z1, z2]));
});

// ---------------------------------------------------------------------------------------------------------------
// Whole MoE blocks, one per router

function blockCase(t: TestContext, what: string, o: Partial<moe.MoeBlockOptions> & { router: moe.RouterKind; k: number }, seed: number): void {
  const rng = new Rng(seed);
  const T = 9, D = 6, F = 5, E = 4;
  const x = rand(rng, [T, D]);
  const p: moe.MoeBlockParams = {
    gate: rand(rng, [E, D]),
    noise: o.router === 'noisy-topk' ? rand(rng, [E, D], 0.5) : null,
    w1: rand(rng, [E, F, D], 0.5),
    w2: rand(rng, [E, D, F], 0.5),
    w3: rand(rng, [E, F, D], 0.5),
  };
  const probe = prober(rng, [T, D]);
  let last: moe.MoeBlockResult | null = null;
  const f = () => {
    // Re-seeded every evaluation, so the noise is the same function of the inputs each time.
    const r = moe.sparseMoeBlock(x, p, { training: true, jitter: 0, capacityFactor: null, noiseEpsilon: 1e-2, rng: new Rng(99), ...o });
    last = r;
    let loss = ops.add(probe(r.out), losses.loadBalancingLoss([r.logits], [r.experts], o.k));
    loss = ops.add(loss, losses.routerZLoss([r.logits]));
    if (r.importance) loss = ops.add(loss, ops.add(losses.cvSquared(r.importance), losses.cvSquared(r.load!)));
    return loss;
  };
  const inputs = [x, p.gate, p.w1, p.w2, p.w3, ...(p.noise ? [p.noise] : [])];
  const rep = gradcheck(f, inputs, { signature: () => `${last!.experts.join(',')}|${last!.kept?.join('') ?? ''}` });
  expectOk(t, what, rep);
  const l = last! as moe.MoeBlockResult;
  if (o.capacityFactor != null) {
    t.diagnostic(`${what}: ${l.dropped} of ${T * o.k} slots dropped over capacity`);
    assert.ok(l.dropped > 0, 'the capacity case must actually drop slots');
  }
  assert.ok(p.gate.grad!.some((g) => g !== 0), 'the router receives a gradient');
}

test('gradcheck: sparse MoE block, Mixtral softmax-top-2 (dropless)', (t) => blockCase(t, 'softmax-topk k=2', { router: 'softmax-topk', k: 2 }, 10));
test('gradcheck: sparse MoE block, noisy top-2 with importance and load losses, and jitter', (t) => blockCase(t, 'noisy-topk k=2', { router: 'noisy-topk', k: 2, jitter: 0.1 }, 11));
test('gradcheck: sparse MoE block, Switch top-1', (t) => blockCase(t, 'switch', { router: 'switch', k: 1 }, 12));
test('gradcheck: sparse MoE block, capacity factor 0.75 (token dropping)', (t) => blockCase(t, 'softmax-topk capacity 0.75', { router: 'softmax-topk', k: 2, capacityFactor: 0.75 }, 13));

// ---------------------------------------------------------------------------------------------------------------
// Whole models

const SMALL: MixtralConfig = {
  vocabSize: 64, hiddenSize: 16, intermediateSize: 12, numHiddenLayers: 2, numAttentionHeads: 4, numKeyValueHeads: 2,
  headDim: 4, numLocalExperts: 4, numExpertsPerTok: 2, rmsNormEps: 1e-5, ropeTheta: 10000, maxPositionEmbeddings: 32,
  slidingWindow: null, tieWordEmbeddings: false,
};

function modelCase(t: TestContext, what: string, arch: Partial<MixtralConfig>, moeOpts: Partial<MoeOptions>, seed: number, perTensor = 6): void {
  const config = mixtralTrainConfig({ ...SMALL, ...arch }, { routerZLossCoef: 1e-3, ...moeOpts });
  const model = MixtralTrain.init(config, { seed, std: 0.3, precision: 'f64' });
  const rng = new Rng(seed + 1000);
  // W_noise starts at 0; give it values so its gradient is exercised.
  for (const [name, v] of model.namedParameters()) if (name.endsWith('.noise.weight')) for (let i = 0; i < v.size; i++) v.data[i] = rng.normal() * 0.3;
  const B = 2, T = 6;
  const tokens = Array.from({ length: B * T }, () => rng.int(config.vocabSize));
  // Next-token targets within each sequence, no target at a sequence's end; one more position masked (a "prompt").
  const targets = tokens.map((_, i) => ((i + 1) % T === 0 ? -100 : tokens[i + 1]));
  targets[1] = -100;
  let last: ReturnType<MixtralTrain['loss']> | null = null;
  const training = moeOpts.router === 'noisy-topk' || moeOpts.capacityFactor != null || (moeOpts.routerJitterNoise ?? 0) > 0;
  const f = () => (last = model.loss(tokens, targets, { batch: B, training, rng: new Rng(7) })).loss;
  const sig = () => last!.routing.map((r) => `${r.experts.join(',')}|${r.kept?.join('') ?? ''}`).join(';');
  const params = model.parameters();
  const rep = gradcheck(f, params, { maxPerInput: perTensor, rng: new Rng(seed + 2000), signature: sig });
  const l = last! as ReturnType<MixtralTrain['loss']>;
  // The smallest gap between a chosen and an unchosen router score: the room the perturbations had.
  let margin = Infinity;
  for (const r of l.routing) {
    const [Tn, E] = r.logits.shape;
    const k = config.numExpertsPerTok;
    for (let i = 0; i < Tn; i++) {
      const row = Array.from(r.logits.data.subarray(i * E, i * E + E)).sort((a, b) => b - a);
      if (config.moe.router !== 'noisy-topk') margin = Math.min(margin, row[k - 1] - row[k]);
    }
  }
  t.diagnostic(`${what}: ${params.length} parameter tensors, loss ${l.loss.item().toFixed(4)} = ce ${l.ce.item().toFixed(4)}` +
    (l.balance ? ` + ${config.moe.routerAuxLossCoef} x balance ${l.balance.item().toFixed(4)} + ${config.moe.routerZLossCoef} x z ${l.zLoss!.item().toFixed(4)}` : '') +
    (l.importanceLoss ? ` + noisy CV^2 (${l.importanceLoss.item().toFixed(4)}, ${l.loadLoss!.item().toFixed(4)})` : '') +
    (Number.isFinite(margin) ? `; smallest router-logit gap between chosen and unchosen ${margin.toExponential(2)} (steps 1e-3 and 2e-3)` : ''));
  expectOk(t, what, rep);
  if (moeOpts.capacityFactor != null) {
    const dropped = l.routing.reduce((a, r) => a + r.dropped, 0);
    t.diagnostic(`${what}: ${dropped} token-slots dropped over capacity`);
    assert.ok(dropped > 0, 'the capacity case must actually drop slots');
  }
  // Every parameter that the loss depends on received a gradient.
  for (const [name, v] of model.namedParameters()) assert.ok(v.grad && v.grad.some((g) => g !== 0), `${name} got no gradient`);
}

test('gradcheck: whole MoE model (2 layers, 4 experts, top-2, dim 16, vocab 64), loss = CE + balance + z-loss', (t) => {
  modelCase(t, 'Mixtral softmax-top-2', {}, { router: 'softmax-topk' }, 20, 10);
});

test('gradcheck: whole model, noisy top-2 in training (noise, jitter, importance/load losses), tied embeddings, sliding window', (t) => {
  modelCase(t, 'noisy top-2', { tieWordEmbeddings: true, slidingWindow: 3 }, { router: 'noisy-topk', routerJitterNoise: 0.05 }, 21);
});

test('gradcheck: whole model, the per-layer balancing loss (Switch / GShard form)', (t) => {
  modelCase(t, 'per-layer balance', {}, { router: 'softmax-topk', routerAuxLossScope: 'per-layer', routerAuxLossCoef: 0.5 }, 23, 4);
});

test('gradcheck: whole model, Switch top-1 with capacity factor 1.0', (t) => {
  modelCase(t, 'switch + capacity', { numExpertsPerTok: 1 }, { router: 'switch', capacityFactor: 1.0 }, 22);
});

test('gradcheck: whole model, MoE every other layer (layer 0 dense), and a fully dense model', (t) => {
  modelCase(t, 'MoE every 2nd layer', {}, { moeLayerFrequency: 2 }, 23);
  modelCase(t, 'dense', { numLocalExperts: 1, numExpertsPerTok: 1 }, {}, 24);
});
