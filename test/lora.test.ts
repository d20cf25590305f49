// LoRA adapters (src/model/lora.ts) and `moe finetune --mode lora`: float64 gradient checks of the adapted linear and
// grouped expert GEMM and of a whole adapted model; the start is exactly the base model; only adapters train; the
// merged model gives the adapted model's logits; PEFT file layout; exact resume; the exported GGUF loads and gives
// the merged trainer's logits; --merge-adapter; bad adapter files. Tiny models and hand-made instruct shards.
import { test, after, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Var, noGrad } from '../src/autograd/tape.js';
import * as ops from '../src/autograd/ops.js';
import { planDispatch } from '../src/autograd/moe.js';
import { gradcheck, type GradcheckReport } from '../src/autograd/gradcheck.js';
import { refKernels, setGradKernels } from '../src/autograd/kernels.js';
import { nativeGradKernels } from '../src/autograd/native-kernels.js';
import {
  LoraAdapters, loraGroupedLinear, loraLinear, loraModules, mergeLoraTensors, readLoraAdapter, peftNames, DEFAULT_LORA, type LoraConfig,
} from '../src/model/lora.js';
import { MixtralTrain, inferenceConfig, mixtralTrainConfig, type MixtralTrainConfig } from '../src/model/mixtral-train.js';
import { defaultFinetuneConfig, finetune, finetuneCommand, mergeAdapter, readStartingModel, trainableParameters, type FinetuneConfig } from '../src/workflows/finetune.js';
import { writeInstructShard, type EncodedExample } from '../src/workflows/instruct.js';
import { TRAIN_PRESETS } from '../src/workflows/train.js';
import { exportTrainedModel } from '../src/workflows/export.js';
import { writeHFConfig } from '../src/formats/hf-config.js';
import { readSafetensors, writeSafetensors } from '../src/formats/safetensors.js';
import { f32Tensor } from '../src/tensor/tensor.js';
import { loadModel } from '../src/model/load.js';
import { Rng } from '../src/util/rng.js';
import { assertFormatError } from './helpers/assert-format-error.js';
import { commandStdout, lastJsonLine } from './helpers/command-output.js';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-lora-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));
const quiet = () => {};
const TOL = 1e-6;

function rand(rng: Rng, shape: number[], scale = 1): Var {
  const n = shape.reduce((a, b) => a * b, 1);
  const d = new Float64Array(n);
  for (let i = 0; i < n; i++) d[i] = rng.normal() * scale;
  return new Var(d, shape, true);
}

/** loss = sum(v * R), R fixed: checks the whole vector-Jacobian product. */
function prober(rng: Rng, shape: readonly number[]): (v: Var) => Var {
  const R = rand(rng, [...shape]);
  R.requiresGrad = false;
  return (v: Var) => ops.sum(ops.mul(v, R));
}

function expectOk(t: TestContext, what: string, r: GradcheckReport): void {
  t.diagnostic(`${what}: max rel error ${r.maxRelError.toExponential(2)} over ${r.checked} elements`);
  assert.ok(r.checked > 0);
  assert.equal(r.signatureChanges, 0, `${what}: a perturbation changed the routing`);
  assert.ok(r.maxRelError < TOL, `${what}: max rel error ${r.maxRelError} at input ${r.worst.input}[${r.worst.index}]: analytic ${r.worst.analytic} numeric ${r.worst.numeric}`);
}

const bits = (a: ArrayLike<number> & { buffer: ArrayBufferLike; byteOffset: number; byteLength: number }) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);
const sameBits = (a: Var['data'], b: Var['data']) => Buffer.compare(bits(a), bits(b)) === 0;
function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let d = 0;
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i]! - b[i]!));
  return d;
}

// ---------------------------------------------------------------------------------------------------------------
// The differentiable pieces

test('gradcheck: LoRA linear x W^T + s (x A^T) B^T (f64), and its value by hand', (t) => {
  const rng = new Rng(1);
  const [N, IN, OUT, R] = [5, 6, 4, 3];
  const x = rand(rng, [N, IN]), w = rand(rng, [OUT, IN]), a = rand(rng, [R, IN]), b = rand(rng, [OUT, R]);
  const s = 16 / 3;
  const y = loraLinear(x, w, a, b, s);
  for (let n = 0; n < N; n++) {
    for (let o = 0; o < OUT; o++) {
      let base = 0, low = 0;
      for (let i = 0; i < IN; i++) base += x.data[n * IN + i]! * w.data[o * IN + i]!;
      for (let k = 0; k < R; k++) {
        let xa = 0;
        for (let i = 0; i < IN; i++) xa += x.data[n * IN + i]! * a.data[k * IN + i]!;
        low += xa * b.data[o * R + k]!;
      }
      assert.ok(Math.abs(y.data[n * OUT + o]! - (base + s * low)) < 1e-12);
    }
  }
  const p = prober(rng, [N, OUT]);
  expectOk(t, 'loraLinear', gradcheck(() => p(loraLinear(x, w, a, b, s)), [x, w, a, b]));
});

test('gradcheck: grouped LoRA over rows sorted by expert; each expert\'s A/B sees only its own rows', (t) => {
  const rng = new Rng(2);
  const [E, IN, OUT, R] = [3, 5, 4, 2];
  const offsets = Int32Array.of(0, 3, 3, 7); // expert 1 has no rows
  const S = 7;
  const x = rand(rng, [S, IN]), w = rand(rng, [E, OUT, IN]), a = rand(rng, [E, R, IN]), b = rand(rng, [E, OUT, R]);
  const s = 2;
  const y = loraGroupedLinear(x, w, a, b, offsets, s);
  // Row by row against the plain LoRA linear with that expert's matrices.
  const slice = (v: Var, e: number, shape: number[]) => new Var(v.data.slice(e * shape[0]! * shape[1]!, (e + 1) * shape[0]! * shape[1]!), shape);
  for (let e = 0; e < E; e++) {
    for (let row = offsets[e]!; row < offsets[e + 1]!; row++) {
      const xr = new Var(x.data.slice(row * IN, (row + 1) * IN), [1, IN]);
      const ref = loraLinear(xr, slice(w, e, [OUT, IN]), slice(a, e, [R, IN]), slice(b, e, [OUT, R]), s);
      assert.ok(maxDiff(ref.data, y.data.subarray(row * OUT, (row + 1) * OUT)) < 1e-12, `row ${row} (expert ${e})`);
    }
  }
  const p = prober(rng, [S, OUT]);
  expectOk(t, 'loraGroupedLinear', gradcheck(() => p(loraGroupedLinear(x, w, a, b, offsets, s)), [x, w, a, b]));
  // Expert 1 had no rows: its adapter gets an exactly zero gradient.
  for (const v of [a, b]) {
    const per = v.size / E;
    assert.ok(v.grad!.subarray(per, 2 * per).every((g) => g === 0), 'expert 1 got a gradient');
    assert.ok(v.grad!.subarray(0, per).some((g) => g !== 0) && v.grad!.subarray(2 * per).some((g) => g !== 0));
  }
  // The dispatch the MoE block builds works as the offsets here do.
  const plan = planDispatch(Int32Array.of(2, 0, 0, 2), 2, 2, 3);
  assert.deepEqual([...plan.offsets], [0, 2, 2, 4]);
});

const SMALL = {
  vocabSize: 64, hiddenSize: 16, intermediateSize: 12, numHiddenLayers: 2, numAttentionHeads: 4, numKeyValueHeads: 2,
  headDim: 4, numLocalExperts: 4, numExpertsPerTok: 2, rmsNormEps: 1e-5, ropeTheta: 10000, maxPositionEmbeddings: 32,
  slidingWindow: null, tieWordEmbeddings: false,
};

for (const [what, arch] of [['MoE', {}], ['dense (adapters on mlp gate/up/down_proj)', { numLocalExperts: 1, numExpertsPerTok: 1 }]] as const) {
  test(`gradcheck: a whole ${what} model with adapters on attention and the feed-forward (f64), base frozen`, (t) => {
    const config = mixtralTrainConfig({ ...SMALL, ...arch }, { routerZLossCoef: 1e-3 });
    const model = MixtralTrain.init(config, { seed: 30, std: 0.3, precision: 'f64' });
    const ad = LoraAdapters.init(model, { r: 2, alpha: 3, targets: ['attn', 'experts'] }, { seed: 4 }).attach(model);
    const rng = new Rng(31);
    // B starts at 0 (so dA = 0): give it values so A's gradient is exercised too.
    for (const [name, v] of ad.namedParameters()) if (name.endsWith('lora_B.weight')) for (let i = 0; i < v.size; i++) v.data[i] = rng.normal() * 0.3;
    for (const v of model.parameters()) v.requiresGrad = false;
    const B = 2, T = 5;
    const tokens = Array.from({ length: B * T }, () => rng.int(config.vocabSize));
    const targets = tokens.map((_, i) => ((i + 1) % T === 0 ? -100 : tokens[i + 1]!));
    let last: ReturnType<MixtralTrain['loss']> | null = null;
    const f = () => (last = model.loss(tokens, targets, { batch: B })).loss;
    const sig = () => last!.routing.map((r) => r.experts.join(',')).join(';');
    const params = ad.namedParameters().map(([, v]) => v);
    expectOk(t, what, gradcheck(f, params, { maxPerInput: 3, rng: new Rng(32), signature: sig }));
    for (const [name, v] of ad.namedParameters()) assert.ok(v.grad && v.grad.some((g) => g !== 0), `${name} got no gradient`);
    for (const [name, v] of model.namedParameters()) assert.equal(v.grad, null, `${name} (frozen) got a gradient`);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Adapters on a model

const V = 64;
const BOS = 1;
const EOS = 2;

function tinyConfig(over: Partial<MixtralTrainConfig> = {}, vocabSize = V): MixtralTrainConfig {
  const base = TRAIN_PRESETS.tiny().model;
  return mixtralTrainConfig({ ...inferenceConfig(base), vocabSize, ...over }, base.moe);
}
const IDS = [BOS, 10, 30, 31, 33, 11, 30, 31, EOS, 12, 40, 41];

test('at init the adapted model\'s logits are the base model\'s exactly; A is Kaiming-uniform, B zero; PEFT names', () => {
  for (const over of [{}, { numLocalExperts: 1, numExpertsPerTok: 1 }]) {
    const c = tinyConfig(over);
    const model = MixtralTrain.init(c, { seed: 3 });
    const want = noGrad(() => model.forward(IDS, { batch: 2 }).logits.data);
    const ad = LoraAdapters.init(model, DEFAULT_LORA, { seed: 1 }).attach(model);
    const got = noGrad(() => model.forward(IDS, { batch: 2 }).logits.data);
    assert.ok(sameBits(got, want), 'logits differ at init');
    for (const m of ad.modules()) assert.ok(m.in > 0 && m.out > 0);
    for (const [name, v] of ad.namedParameters()) {
      if (name.endsWith('lora_B.weight')) assert.ok(v.data.every((x) => x === 0), name);
      else {
        const bound = 1 / Math.sqrt(v.shape[v.shape.length - 1]!);
        assert.ok(v.data.every((x) => Math.abs(x) <= bound) && v.data.some((x) => Math.abs(x) > bound / 2), name);
      }
    }
    // Same seed, same adapters; another seed, others.
    const again = LoraAdapters.init(model, DEFAULT_LORA, { seed: 1 }).namedParameters();
    const other = LoraAdapters.init(model, DEFAULT_LORA, { seed: 2 }).namedParameters();
    assert.ok(ad.namedParameters().every(([, v], i) => sameBits(v.data, again[i]![1].data)));
    assert.ok(!sameBits(ad.namedParameters()[0]![1].data, other[0]![1].data));
  }
  const c = tinyConfig();
  const peft = LoraAdapters.init(MixtralTrain.init(c, { seed: 3 }), { r: 4, alpha: 8, targets: ['attn', 'experts'] }).toPeftTensors();
  const D = c.hiddenSize, F = c.intermediateSize;
  assert.deepEqual(peft.get('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight')!.shape, [4, D]);
  assert.deepEqual(peft.get('base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight')!.shape, [D, 4]);
  assert.deepEqual(peft.get('base_model.model.model.layers.1.block_sparse_moe.experts.3.w2.lora_A.weight')!.shape, [4, F]);
  assert.deepEqual(peft.get('base_model.model.model.layers.0.block_sparse_moe.experts.0.w1.lora_B.weight')!.shape, [F, 4]);
  // 2 layers x (4 attention + 3 x 4 experts) modules x (A, B).
  assert.equal(peft.size, 2 * (4 + 3 * c.numLocalExperts) * 2);
  assert.deepEqual(loraModules(c, ['attn']).map((m) => m.name.split('.').pop()), ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'q_proj', 'k_proj', 'v_proj', 'o_proj']);
  assert.deepEqual(peftNames('model.layers.0.mlp.up_proj'), { a: 'base_model.model.model.layers.0.mlp.up_proj.lora_A.weight', b: 'base_model.model.model.layers.0.mlp.up_proj.lora_B.weight' });
});

test('merge: W + (alpha/r) B A gives the adapted model\'s logits; files round-trip exactly; the base is untouched', () => {
  for (const [over, targets] of [[{}, ['attn', 'experts']], [{}, ['experts']], [{ numLocalExperts: 1, numExpertsPerTok: 1 }, ['attn', 'experts']]] as const) {
    const c = tinyConfig(over);
    const model = MixtralTrain.init(c, { seed: 4 });
    const before = model.toHFTensors();
    const ad = LoraAdapters.init(model, { r: 4, alpha: 8, targets: [...targets] }, { seed: 5 }).attach(model);
    const rng = new Rng(6);
    for (const [name, v] of ad.namedParameters()) if (name.endsWith('lora_B.weight')) for (let i = 0; i < v.size; i++) v.data[i] = rng.normal() * 0.05;
    const adapted = noGrad(() => model.forward(IDS, { batch: 2 }).logits.data);
    const base = noGrad(() => { model.adapters = null; const l = model.forward(IDS, { batch: 2 }).logits.data; ad.attach(model); return l; });
    const merged = ad.merge(model);
    assert.equal(merged.adapters, null);
    const m = noGrad(() => merged.forward(IDS, { batch: 2 }).logits.data);
    const d = maxDiff(m, adapted);
    assert.ok(maxDiff(base, adapted) > 1e-3, 'the adapters must change the logits for this test to mean anything');
    assert.ok(d < 1e-5, `merged vs adapted logits differ by ${d}`);
    for (const [name, t] of model.toHFTensors()) assert.ok(Buffer.compare(Buffer.from(t.data), Buffer.from(before.get(name)!.data)) === 0, `${name} changed`);
    // Saved and read back: the same adapters, bit for bit.
    const out = path.join(dir, `roundtrip-${targets.join('-')}-${c.numLocalExperts}`);
    ad.save(out, 'base-model');
    const cfgJson = JSON.parse(fs.readFileSync(path.join(out, 'adapter_config.json'), 'utf8'));
    assert.equal(cfgJson.r, 4);
    assert.equal(cfgJson.lora_alpha, 8);
    assert.equal(cfgJson.peft_type, 'LORA');
    const leaves = [...((targets as readonly string[]).includes('attn') ? ['q_proj', 'k_proj', 'v_proj', 'o_proj'] : []), ...(c.numLocalExperts > 1 ? ['w1', 'w2', 'w3'] : ['gate_proj', 'up_proj', 'down_proj'])];
    assert.deepEqual([...cfgJson.target_modules].sort(), leaves.sort());
    const back = LoraAdapters.read(MixtralTrain.init(c, { seed: 4 }), out);
    assert.deepEqual(back.config, { r: 4, alpha: 8, targets: [...targets] });
    ad.namedParameters().forEach(([name, v], i) => assert.ok(sameBits(v.data, back.namedParameters()[i]![1].data), name));
    // The file-level merge (what --merge-adapter and a LoRA starting model use) gives the same weights.
    const f = readLoraAdapter(out);
    const viaFiles = mergeLoraTensors(before, { scale: f.scale, tensors: f.tensors, source: f.weightsFile });
    for (const [name, t] of merged.toHFTensors()) assert.ok(Buffer.compare(Buffer.from(t.data), Buffer.from(viaFiles.get(name)!.data)) === 0, name);
  }
});

test('the native kernels give the ref kernels\' loss and adapter gradients (f32; skipped when the addon is not built)', (t) => {
  const native = nativeGradKernels();
  if (!native) return t.skip('native addon not built');
  const model = MixtralTrain.init(tinyConfig(), { seed: 7, std: 0.1 });
  const ad = LoraAdapters.init(model, DEFAULT_LORA, { seed: 8 }).attach(model);
  const rng = new Rng(9);
  for (const [name, v] of ad.namedParameters()) if (name.endsWith('lora_B.weight')) for (let i = 0; i < v.size; i++) v.data[i] = rng.normal() * 0.05;
  for (const v of model.parameters()) v.requiresGrad = false;
  const targets = IDS.map((_, i) => ((i + 1) % 6 === 0 ? -1 : IDS[i + 1]!));
  const run = (k: typeof native) => {
    const prev = setGradKernels(k);
    try {
      for (const [, v] of ad.namedParameters()) v.grad = null;
      const l = model.loss(IDS, targets, { batch: 2 });
      l.loss.backward();
      return { loss: l.loss.item(), grads: ad.namedParameters().map(([, v]) => Float32Array.from(v.grad!)) };
    } finally {
      setGradKernels(prev);
    }
  };
  const a = run(refKernels), b = run(native);
  assert.ok(Math.abs(a.loss - b.loss) < 1e-5, `${a.loss} vs ${b.loss}`);
  a.grads.forEach((g, i) => {
    const scale = Math.max(1e-6, ...Array.from(g, Math.abs));
    assert.ok(maxDiff(g, b.grads[i]!) / scale < 1e-3, ad.namedParameters()[i]![0]);
  });
});

// ---------------------------------------------------------------------------------------------------------------
// moe finetune --mode lora

/** A task example: prompt [BOS, marker, x.., SEP] (mask 0), answer + EOS (mask 1). */
function example(task: string, rng: Rng): EncodedExample {
  const x = [20 + rng.int(40), 20 + rng.int(40), 20 + rng.int(40)];
  const [p, a] = task === 'copy' ? [[10, ...x, 11], x] : task === 'rev' ? [[12, ...x, 11], [...x].reverse()] : [[13, x[0]!, 11], [x[0]! + 1]];
  return { ids: [BOS, ...p, ...a, EOS], mask: [0, ...p.map(() => 0), ...a.map(() => 1), 1] };
}

function writeData(d: string, n: number, vocabSize = V): string {
  fs.mkdirSync(d, { recursive: true });
  const rng = new Rng(3);
  for (const [split, count] of [['train', n], ['val', Math.max(2, n >> 1)]] as const) {
    const ex: EncodedExample[] = [];
    for (let i = 0; i < count; i++) for (const t of ['copy', 'rev', 'succ']) ex.push(example(t, rng));
    writeInstructShard(path.join(d, `${split}.instr`), { vocabSize, bosId: BOS, eosId: EOS }, ex);
  }
  return d;
}

const data = writeData(path.join(dir, 'data'), 4);
const hfModel = path.join(dir, 'start-hf');
// std 0.1, not the init's 0.02: LoRA leaves the (tied) embedding and the final norm frozen, and with 0.02 embeddings
// no change to the residual stream can move the logits far from uniform, so the loss could barely fall.
const start = MixtralTrain.init(tinyConfig(), { seed: 5, std: 0.1 });
writeHFConfig(hfModel, inferenceConfig(start.config), { bosTokenId: BOS, eosTokenId: EOS, torchDtype: 'float32' });
writeSafetensors(path.join(hfModel, 'model.safetensors'), start.toHFTensors(), { format: 'pt' });
const loraCfg = (over: Partial<FinetuneConfig> = {}): FinetuneConfig =>
  defaultFinetuneConfig(hfModel, data, { mode: 'lora', steps: 20, batchSize: 4, seqLen: 32, maxLr: 1e-2, minLr: 1e-3, warmupSteps: 2, evalInterval: 10, evalBatches: 2, checkpointInterval: 10, ...over });

test('--mode lora: only the adapters train (every model weight bit-identical, no gradient); the loss falls; checkpoint holds PEFT files', () => {
  const out = path.join(dir, 'lora');
  const lines: string[] = [];
  const r = finetune(loraCfg(), { outDir: out, log: (s) => lines.push(s) });
  assert.equal(r.state.step, 20);
  const before = new Map(start.namedParameters());
  for (const [name, v] of r.model.namedParameters()) {
    assert.ok(sameBits(v.data, before.get(name)!.data), `${name} changed`);
    assert.equal(v.requiresGrad, false, `${name} still wants a gradient`);
    assert.equal(v.grad, null, `${name} got a gradient`);
  }
  assert.ok(r.adapters);
  const named = r.adapters.namedParameters();
  assert.deepEqual(trainableParameters(r.model, 'lora').map(([n]) => n), named.map(([n]) => n));
  for (const [name, v] of named) if (name.endsWith('lora_B.weight')) assert.ok(v.data.some((x) => x !== 0), `${name} did not train`);
  const first = r.state.history[0]!.ce;
  const last = r.state.history.slice(-3).reduce((a, h) => a + h.ce, 0) / 3;
  assert.ok(last < first - 1, `loss falls: ${first} -> ${last}`);
  assert.ok(lines.some((l) => /LoRA rank 8, alpha 16 on attn \+ experts: 14 modules/.test(l) && /router and norms included, is frozen/.test(l)), lines.join('\n'));
  // The checkpoint: base weights as they were, adapters beside them in PEFT form.
  const ck = path.join(out, 'checkpoint');
  const base = readSafetensors(path.join(ck, 'model.safetensors')).tensors;
  for (const [name, t] of start.toHFTensors()) assert.ok(Buffer.compare(Buffer.from(base.get(name)!.data), Buffer.from(t.data)) === 0, name);
  const peft = readSafetensors(path.join(ck, 'adapter_model.safetensors')).tensors;
  assert.deepEqual(peft.get('base_model.model.model.layers.1.block_sparse_moe.experts.2.w3.lora_A.weight')!.shape, [8, start.config.hiddenSize]);
  assert.equal(JSON.parse(fs.readFileSync(path.join(ck, 'adapter_config.json'), 'utf8')).lora_alpha, 16);
  const opt = readSafetensors(path.join(ck, 'optimizer.safetensors')).tensors;
  assert.equal(opt.size, 2 * named.length, 'optimizer state for the adapters only');
  assert.ok(opt.has('m.base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight'));
  // The finished run: the unmerged adapter in <out>/adapter; the merged model gives the adapted logits.
  assert.ok(fs.existsSync(path.join(out, 'adapter', 'adapter_model.safetensors')) && fs.existsSync(path.join(out, 'adapter', 'adapter_config.json')));
  assert.ok(r.merged);
  const d = maxDiff(noGrad(() => r.merged!.forward(IDS, { batch: 2 }).logits.data), noGrad(() => r.model.forward(IDS, { batch: 2 }).logits.data));
  assert.ok(d < 1e-5, `merged vs adapted ${d}`);
  // A LoRA run's output as a starting model is the merged model, not the bare base.
  const s = readStartingModel(out);
  assert.equal(s.mergedAdapter, ck);
  for (const [name, t] of r.merged.toHFTensors()) assert.ok(Buffer.compare(Buffer.from(s.tensors.get(name)!.data), Buffer.from(t.data)) === 0, name);
});

test('--mode lora resumes onto the very same loss curve (adapters and their optimizer state); other LoRA options are refused', () => {
  const a = path.join(dir, 'lres-a');
  const b = path.join(dir, 'lres-b');
  const c = loraCfg({ steps: 10, checkpointInterval: 4, evalInterval: 5, lora: { r: 4, alpha: 8, targets: ['attn', 'experts'] } });
  const full = finetune(c, { outDir: a, log: quiet });
  finetune(c, { outDir: b, stopAfter: 6, log: quiet }); // checkpoint at step 4; steps 5-6 are lost
  assertFormatError(() => finetune({ ...c, lora: { ...c.lora, r: 2 } }, { outDir: b, resume: true, log: quiet }), 'finetune.json', 'lora');
  const lines: string[] = [];
  const resumed = finetune(c, { outDir: b, resume: true, log: (s) => lines.push(s) });
  assert.ok(lines.some((l) => /resumed from .* at step 4/.test(l)), lines.join('\n'));
  const strip = (s: typeof full.state) => s.history.map(({ tokensPerSecond: _t, ...rest }) => rest);
  assert.deepEqual(strip(resumed.state), strip(full.state));
  assert.deepEqual(resumed.state.evals, full.state.evals);
  full.adapters!.namedParameters().forEach(([name, v], i) => assert.ok(sameBits(v.data, resumed.adapters!.namedParameters()[i]![1].data), name));
});

test('a LoRA run from a GGUF: the exported GGUF and HF dir load and give the merged trainer\'s logits; --merge-adapter rebuilds it', async () => {
  const c = tinyConfig({}, 32000); // the Mistral vocabulary, so the export can write its tokenizer
  const e = exportTrainedModel(MixtralTrain.init(c, { seed: 9 }), path.join(dir, 'gguf-src'));
  const d = writeData(path.join(dir, 'data-32k'), 2, 32000);
  const out = path.join(dir, 'lora-gguf');
  const r = finetune(defaultFinetuneConfig(e.gguf, d, { mode: 'lora', steps: 3, batchSize: 2, seqLen: 16, maxLr: 3e-2, evalBatches: 1, lora: { r: 4, alpha: 8, targets: ['attn', 'experts'] } }), { outDir: out, log: quiet });
  assert.ok(r.merged);
  const ids = [1, 415, 2936, 9060, 285, 1117, 28723, 13, 4014, 349];
  const want = noGrad(() => r.merged!.forward(ids).logits.data);
  const adapted = noGrad(() => r.model.forward(ids).logits.data);
  const baseModel = MixtralTrain.fromHFTensors(r.run.model, readStartingModel(e.gguf).tensors);
  assert.ok(maxDiff(noGrad(() => baseModel.forward(ids).logits.data), adapted) > 1e-4, 'three LoRA steps must move the logits');
  assert.ok(maxDiff(want, adapted) < 1e-5);
  for (const file of [path.join(out, 'model-f32.gguf'), path.join(out, 'hf')]) {
    const got = loadModel(file).newSession().forward(ids, { allLogits: true });
    const dd = maxDiff(got, want);
    assert.ok(dd < 1e-4, `${file}: ${dd}`);
  }
  // The unmerged adapter merged onto the same base by the command gives the same weights.
  const j = lastJsonLine(await commandStdout(() => finetuneCommand(['--merge-adapter', path.join(out, 'adapter'), '--model', e.gguf, '--out', path.join(dir, 'merged-cli')])));
  const again = readStartingModel(j.gguf);
  for (const [name, t] of r.merged.toHFTensors()) assert.ok(Buffer.compare(Buffer.from(again.tensors.get(name)!.data), Buffer.from(t.data)) === 0, name);
  assert.ok(fs.existsSync(path.join(dir, 'merged-cli', 'hf', 'config.json')));
  // mergeAdapter is the same function.
  mergeAdapter(path.join(out, 'adapter'), e.gguf, path.join(dir, 'merged-fn'));
  assert.ok(fs.existsSync(path.join(dir, 'merged-fn', 'model-f32.gguf')));
});

test('the command: --mode lora with --lora-rank/--lora-alpha/--lora-targets; LoRA flags without --mode lora are refused', async () => {
  const out = path.join(dir, 'cli');
  const stdout = await commandStdout(async () => {
    await finetuneCommand(['--model', hfModel, '--data', data, '--out', out, '--mode', 'lora', '--lora-rank', '3', '--lora-alpha', '6', '--lora-targets', 'experts',
      '--steps', '2', '--batch', '2', '--seq-len', '8', '--eval-batches', '1', '--backend', 'ref']);
    await assert.rejects(finetuneCommand(['--model', hfModel, '--data', data, '--out', out, '--lora-rank', '3']), /--lora-rank needs --mode lora/);
    await assert.rejects(finetuneCommand(['--model', hfModel, '--data', data, '--out', out, '--mode', 'lora', '--lora-targets', 'attn,mlp']), /--lora-targets must be/);
  });
  const j = lastJsonLine(stdout);
  assert.equal(j.mode, 'lora');
  assert.equal(j.step, 2);
  assert.equal(j.adapter, path.join(out, 'adapter'));
  const cfg = JSON.parse(fs.readFileSync(path.join(out, 'adapter', 'adapter_config.json'), 'utf8'));
  assert.equal(cfg.r, 3);
  assert.equal(cfg.lora_alpha, 6);
  assert.deepEqual(cfg.target_modules, ['w1', 'w2', 'w3']);
  const settings = JSON.parse(fs.readFileSync(path.join(out, 'finetune.json'), 'utf8'));
  assert.deepEqual(settings.lora, { r: 3, alpha: 6, targets: ['experts'] });
  assert.equal(settings.maxLr, 1e-3, 'LoRA\'s default peak LR');
});

test('bad adapter files: FormatErrors naming the file and the problem', () => {
  const c = tinyConfig();
  const model = MixtralTrain.init(c, { seed: 3 });
  const good = path.join(dir, 'bad-base');
  LoraAdapters.init(model, { r: 2, alpha: 4, targets: ['attn'] } as LoraConfig).save(good);
  const copy = (name: string) => {
    const d = path.join(dir, name);
    fs.mkdirSync(d, { recursive: true });
    for (const f of fs.readdirSync(good)) fs.copyFileSync(path.join(good, f), path.join(d, f));
    return d;
  };
  assertFormatError(() => readLoraAdapter(path.join(dir, 'no-such-adapter')), 'adapter_config.json', 'cannot be read');
  const badJson = copy('bad-json');
  fs.writeFileSync(path.join(badJson, 'adapter_config.json'), '{"r": 0, "lora_alpha": 4, "target_modules": ["q_proj"]}');
  assertFormatError(() => readLoraAdapter(badJson), 'adapter_config.json', 'r must be a positive integer');
  const dora = copy('dora');
  fs.writeFileSync(path.join(dora, 'adapter_config.json'), JSON.stringify({ ...JSON.parse(fs.readFileSync(path.join(good, 'adapter_config.json'), 'utf8')), use_dora: true }));
  assertFormatError(() => readLoraAdapter(dora), 'adapter_config.json', 'DoRA');
  // A tensor of the wrong shape, a lora_A without its lora_B, a module the model lacks.
  const t = readSafetensors(path.join(good, 'adapter_model.safetensors')).tensors;
  const variant = (name: string, edit: (m: Map<string, typeof t extends Map<string, infer T> ? T : never>) => void) => {
    const d = copy(name);
    const m = new Map(t);
    edit(m);
    writeSafetensors(path.join(d, 'adapter_model.safetensors'), m);
    return d;
  };
  const qa = 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight';
  const wrong = variant('wrong-shape', (m) => m.set(qa, f32Tensor(new Float32Array(3 * c.hiddenSize), [3, c.hiddenSize])));
  assertFormatError(() => LoraAdapters.read(model, wrong), 'adapter_model.safetensors', qa, '[2, 32]');
  const base = model.toHFTensors();
  const mergeOf = (d: string) => {
    const f = readLoraAdapter(d);
    return mergeLoraTensors(base, { scale: f.scale, tensors: f.tensors, source: f.weightsFile });
  };
  assertFormatError(() => mergeOf(wrong), 'adapter_model.safetensors', 'do not fit');
  const noB = variant('no-b', (m) => m.delete('base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight'));
  assertFormatError(() => mergeOf(noB), 'adapter_model.safetensors', 'k_proj.lora_A.weight has no');
  assertFormatError(() => LoraAdapters.read(model, noB), 'adapter_model.safetensors', 'missing tensor');
  const alien = variant('alien', (m) => {
    m.set('base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight', f32Tensor(new Float32Array(2 * c.hiddenSize), [2, c.hiddenSize]));
    m.set('base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight', f32Tensor(new Float32Array(2 * c.hiddenSize), [c.hiddenSize, 2]));
  });
  assertFormatError(() => mergeOf(alien), 'adapter_model.safetensors', 'layers.7.self_attn.q_proj.weight', 'does not have');
  assertFormatError(() => LoraAdapters.read(model, alien), 'adapter_model.safetensors', 'layers.7');
  const junk = variant('junk', (m) => m.set('base_model.model.lm_head.modules_to_save.weight', f32Tensor(new Float32Array(4), [2, 2])));
  assertFormatError(() => mergeOf(junk), 'adapter_model.safetensors', 'not a LoRA');
  // Fresh adapters for a model of another shape do not attach.
  const other = MixtralTrain.init(tinyConfig({ numHiddenLayers: 1 }), { seed: 1 });
  assert.throws(() => LoraAdapters.init(other, DEFAULT_LORA).attach(model), /another model config/);
  assert.throws(() => LoraAdapters.init(model, { r: 0, alpha: 1, targets: ['attn'] }), /rank/);
});
