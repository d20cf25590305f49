// The differentiable Mixtral against the inference model and against llama.cpp: same weights, same logits.
//  - random models of several kinds: MixtralTrain.forward (f32) vs MixtralModel (ref backend) built by
//    toInferenceModel() and, independently, by toHFTensors() -> names.ts hfTensorsToGGUF -> load.ts's
//    mixtralWeightsFromGGUFTensors (the path a saved checkpoint takes);
//  - the micro Hugging Face checkpoint (test/fixtures/micro/hf) loaded with fromHFTensors, against the logits
//    llama.cpp computed for its GGUF (fixtures/micro/micro-f32.logits.json), and our cross-entropy against the
//    mean next-token NLL stored with them.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { MixtralTrain, mixtralTrainConfig, hfParameterShapes, type MoeOptions } from '../src/model/mixtral-train.js';
import type { MixtralConfig } from '../src/model/config.js';
import { MixtralModel } from '../src/model/mixtral.js';
import { mixtralWeightsFromGGUFTensors } from '../src/model/load.js';
import { expectedShapes, hfTensorsToGGUF } from '../src/formats/names.js';
import { readCheckpointTensors } from '../src/formats/safetensors.js';
import { readHFConfig } from '../src/formats/hf-config.js';
import { RefBackend } from '../src/backend/ref.js';
import { Rng } from '../src/util/rng.js';
import { Var } from '../src/autograd/tape.js';
import * as moe from '../src/autograd/moe.js';
import { f32Tensor } from '../src/tensor/tensor.js';

const fixture = (name: string): string => fileURLToPath(new URL(`../../test/fixtures/${name}`, import.meta.url));

/** f32 forward passes that differ only in summation order and rounding points (measured ~3e-6 on logits up to ~7). */
const F32_TOL = 2e-5;

const BASE: MixtralConfig = {
  vocabSize: 64, hiddenSize: 16, intermediateSize: 24, numHiddenLayers: 2, numAttentionHeads: 4, numKeyValueHeads: 2,
  headDim: 4, numLocalExperts: 4, numExpertsPerTok: 2, rmsNormEps: 1e-5, ropeTheta: 10000, maxPositionEmbeddings: 64,
  slidingWindow: null, tieWordEmbeddings: false,
};

function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    assert.ok(Number.isFinite(d), `non-finite at ${i}: ${a[i]} vs ${b[i]}`);
    m = Math.max(m, d);
  }
  return m;
}

function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

const cases: [string, Partial<MixtralConfig>, Partial<MoeOptions>][] = [
  ['Mixtral softmax-top-2', {}, {}],
  ['sliding window 3, 8 experts top-3', { slidingWindow: 3, numLocalExperts: 8, numExpertsPerTok: 3 }, {}],
  ['tied embeddings, one kv head', { tieWordEmbeddings: true, numKeyValueHeads: 1 }, {}],
  ['noisy top-2 (evaluation: no noise)', {}, { router: 'noisy-topk' }],
  ['dense (one FFN)', { numLocalExperts: 1, numExpertsPerTok: 1 }, {}],
  ['MoE every 2nd layer, top-1', { numHiddenLayers: 3, numExpertsPerTok: 1 }, { moeLayerFrequency: 2 }],
];

for (const [what, arch, moeOpts] of cases) {
  test(`forward logits equal the inference model's: ${what}`, (t) => {
    const config = mixtralTrainConfig({ ...BASE, ...arch }, moeOpts);
    const model = MixtralTrain.init(config, { seed: 3, std: 0.3 });
    const rng = new Rng(4);
    const tokens = Array.from({ length: 13 }, () => rng.int(config.vocabSize));
    const ours = model.forward(tokens).logits.data;
    const inf = model.toInferenceModel().newSession().forward(tokens, { allLogits: true });
    const d = maxDiff(ours, inf);
    t.diagnostic(`max |difference| ${d.toExponential(2)}, logits up to ${maxAbs(inf).toFixed(2)}`);
    assert.ok(maxAbs(inf) > 1, 'logits large enough for the comparison to mean something');
    assert.ok(d < F32_TOL, `max difference ${d}`);

    // The checkpoint path: HF tensors -> GGUF names and q/k order -> the loader's weights. Same logits, bit for bit.
    if (config.moe.moeLayerFrequency === 1) {
      const hf = model.toHFTensors();
      assert.deepEqual([...hf.keys()], [...expectedShapes(config, 'hf').keys()], 'exactly the tensors names.ts expects, in its order');
      const weights = mixtralWeightsFromGGUFTensors(hfTensorsToGGUF(hf, config), config, 'exported');
      const viaGGUF = new MixtralModel(config, weights, new RefBackend()).newSession().forward(tokens, { allLogits: true });
      assert.deepEqual([...viaGGUF], [...inf]);
    }
  });
}

test('export round trip: fromHFTensors(toHFTensors()) gives the same parameters; noisy W_noise travels on request', () => {
  const config = mixtralTrainConfig({ ...BASE, numHiddenLayers: 3 }, { router: 'noisy-topk', moeLayerFrequency: 2 });
  const a = MixtralTrain.init(config, { seed: 5 });
  const noise = a.params.layers[1].block_sparse_moe!.noise!;
  for (let i = 0; i < noise.size; i++) noise.data[i] = i / 100;
  const hf = a.toHFTensors({ includeNoise: true });
  assert.ok(hf.has('model.layers.0.mlp.gate_proj.weight') && hf.has('model.layers.1.block_sparse_moe.experts.3.w2.weight'));
  assert.deepEqual(hf.get('model.layers.1.block_sparse_moe.experts.3.w2.weight')!.shape, [16, 24]);
  assert.deepEqual([...hf.keys()].filter((n) => !n.includes('noise')), [...hfParameterShapes(config).keys()]);
  const b = MixtralTrain.fromHFTensors(config, hf);
  const pa = a.namedParameters();
  const pb = b.namedParameters();
  assert.deepEqual(pa.map(([n]) => n), pb.map(([n]) => n));
  pa.forEach(([n, v], i) => assert.deepEqual([...pb[i][1].data], [...v.data], n));
  // Without W_noise in the file it starts at zero; a wrong shape is a FormatError naming the tensor.
  const c = MixtralTrain.fromHFTensors(config, a.toHFTensors());
  assert.ok(c.params.layers[1].block_sparse_moe!.noise!.data.every((v) => v === 0));
  const bad = new Map(hf);
  bad.set('model.layers.0.self_attn.q_proj.weight', f32Tensor(new Float32Array(16 * 15), [16, 15]));
  assert.throws(() => MixtralTrain.fromHFTensors(config, bad, { source: 'x.safetensors' }), (e: Error) => e.name === 'FormatError' && /x\.safetensors/.test(e.message) && /q_proj/.test(e.message));
});

test('what the inference model cannot express is refused with a reason', () => {
  assert.throws(() => MixtralTrain.init(mixtralTrainConfig({ ...BASE, numExpertsPerTok: 1 }, { router: 'switch' })).toInferenceModel(), /renormalises/);
  assert.throws(() => MixtralTrain.init(mixtralTrainConfig(BASE, { moeLayerFrequency: 2 })).toInferenceModel(), /dense layers/);
});

test('a batch of sequences gives each sequence the logits it gets alone', () => {
  const config = mixtralTrainConfig({ ...BASE, slidingWindow: 4 });
  const model = MixtralTrain.init(config, { seed: 6, std: 0.3 });
  const rng = new Rng(7);
  const a = Array.from({ length: 7 }, () => rng.int(64));
  const b = Array.from({ length: 7 }, () => rng.int(64));
  const both = model.forward([...a, ...b], { batch: 2 }).logits.data;
  const la = model.forward(a).logits.data;
  const lb = model.forward(b).logits.data;
  assert.deepEqual([...both], [...la, ...lb]);
});

test("the MoE block's grouped GEMM equals the ref backend's moeFFN for the same routing", () => {
  const rng = new Rng(8);
  const T = 11, D = 8, F = 6, E = 5, k = 2;
  const mk = (shape: number[], s = 0.5) => new Var(Float32Array.from({ length: shape.reduce((x, y) => x * y) }, () => rng.normal() * s), shape);
  const x = mk([T, D], 1);
  const p = { gate: mk([E, D], 1), noise: null, w1: mk([E, F, D]), w2: mk([E, D, F]), w3: mk([E, F, D]) };
  const r = moe.sparseMoeBlock(x, p, { router: 'softmax-topk', k, training: false, jitter: 0, capacityFactor: null, noiseEpsilon: 0, rng: null });
  const out = new Float32Array(T * D);
  const t = (v: Var) => f32Tensor(v.data as Float32Array, v.shape);
  new RefBackend().moeFFN(out, x.data as Float32Array, T, r.experts, r.gates.data as Float32Array, k, t(p.w1), t(p.w3), t(p.w2));
  assert.ok(maxDiff(out, r.out.data) < 1e-5 * Math.max(1, maxAbs(out)));
});

// ---------------------------------------------------------------------------------------------------------------
// Against llama.cpp

interface RefLogits { tokens: number[]; logits: number[][]; mean_nll: number; nll_next: number[] }

test('micro HF checkpoint: MixtralTrain (f32 and f64) reproduces llama.cpp logits; cross-entropy matches its mean NLL', (t) => {
  const dir = fixture('micro/hf');
  const hf = readHFConfig(dir);
  const config = mixtralTrainConfig(hf.config);
  const tensors = readCheckpointTensors(dir).tensors;
  const ref = JSON.parse(fs.readFileSync(fixture('micro/micro-f32.logits.json'), 'utf8')) as RefLogits;
  const tokens = ref.tokens;
  const V = config.vocabSize;
  const flatRef = ref.logits.flat();
  for (const precision of ['f32', 'f64'] as const) {
    const model = MixtralTrain.fromHFTensors(config, tensors, { precision, source: dir });
    const targets = tokens.map((_, i) => (i + 1 < tokens.length ? tokens[i + 1] : -100));
    const r = model.loss(tokens, targets);
    assert.equal(r.logits.size, tokens.length * V);
    const d = maxDiff(r.logits.data, flatRef);
    const ceErr = Math.abs(r.ce.item() - ref.mean_nll);
    t.diagnostic(`${precision}: max |logit - llama.cpp| ${d.toExponential(2)} (logits up to ${maxAbs(flatRef).toFixed(1)}); ` +
      `cross-entropy ${r.ce.item().toFixed(6)} vs llama.cpp mean NLL ${ref.mean_nll.toFixed(6)} (|diff| ${ceErr.toExponential(2)}); ` +
      `balance ${r.balance!.item().toFixed(4)}, z ${r.zLoss!.item().toFixed(4)}`);
    // llama.cpp's own CPU builds differ by up to 6e-6 here (reference-logits.test.ts); 2e-5 as there.
    assert.ok(d < 2e-5, `${precision}: max difference ${d}`);
    assert.ok(ceErr < 1e-5);
  }
});
