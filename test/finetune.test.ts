// `moe finetune`: loss only on answer tokens, the frozen modes leave their weights bit-identical, --tasks picks
// examples through the .jsonl, resume is exact, GGUF in and out, NaN stops. Tiny models and hand-made instruct
// shards (three synthetic tasks whose answers follow from the prompt).
import { test, after } from 'node:test';
import { spawn, spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  countTruncated, exampleBatch, finetune, finetuneCommand, defaultFinetuneConfig, instructBatches, loadFinetuneData, readStartingModel,
  trainableParameters, type FinetuneConfig, type TokenizedExample,
} from '../src/workflows/finetune.js';
import { writeInstructShard, type EncodedExample } from '../src/workflows/instruct.js';
import { TRAIN_PRESETS, TrainingDivergedError, findCheckpoint } from '../src/workflows/train.js';
import { exportTrainedModel } from '../src/workflows/export.js';
import { MixtralTrain, inferenceConfig, mixtralTrainConfig, type MixtralTrainConfig } from '../src/model/mixtral-train.js';
import { writeHFConfig } from '../src/formats/hf-config.js';
import { writeSafetensors } from '../src/formats/safetensors.js';
import { Rng } from '../src/util/rng.js';
import { assertFormatError } from './helpers/assert-format-error.js';
import { commandStdout, lastJsonLine } from './helpers/command-output.js';

const V = 64;
const BOS = 1;
const EOS = 2;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-finetune-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));
const quiet = () => {};

/** A task example: prompt [BOS, task marker, x.., SEP] (mask 0), answer + EOS (mask 1). */
function example(task: string, rng: Rng): { task: string; ids: number[]; mask: number[] } {
  const x = [20 + rng.int(40), 20 + rng.int(40), 20 + rng.int(40)];
  const turn = (t: string): [number[], number[]] => {
    if (t === 'copy') return [[10, ...x, 11], x];
    if (t === 'rev') return [[12, ...x, 11], [...x].reverse()];
    return [[13, x[0]!, 11], [x[0]! + 1]]; // succ
  };
  const ids = [BOS];
  const mask = [0];
  for (const t of task.split('+')) {
    const [p, a] = turn(t);
    ids.push(...p, ...a, EOS);
    mask.push(...p.map(() => 0), ...a.map(() => 1), 1);
  }
  return { task, ids, mask };
}

/** Writes <d>/{train,val}.{instr,jsonl}: `n` examples per task and some two-task conversations. */
function writeData(d: string, n: number, opts: { vocabSize?: number; seed?: number } = {}): string {
  fs.mkdirSync(d, { recursive: true });
  const rng = new Rng(opts.seed ?? 3);
  for (const [split, count] of [['train', n], ['val', Math.max(2, n >> 1)]] as const) {
    const ex = [];
    for (let i = 0; i < count; i++) for (const t of ['copy', 'rev', 'succ']) ex.push(example(t, rng));
    ex.push(example('copy+succ', rng), example('copy+rev', rng));
    writeInstructShard(path.join(d, `${split}.instr`), { vocabSize: opts.vocabSize ?? V, bosId: BOS, eosId: EOS }, ex as EncodedExample[]);
    fs.writeFileSync(path.join(d, `${split}.jsonl`), ex.map((e) => JSON.stringify({ task: e.task, lang: 'en', messages: [] })).join('\n') + '\n');
  }
  return d;
}

function tinyConfig(over: Partial<MixtralTrainConfig> = {}): MixtralTrainConfig {
  const base = TRAIN_PRESETS.tiny().model;
  return mixtralTrainConfig({ ...inferenceConfig(base), vocabSize: V, ...over }, base.moe);
}

/** A starting model as a Hugging Face directory (config.json + model.safetensors). */
function writeHFModel(d: string, c: MixtralTrainConfig, seed = 5): MixtralTrain {
  const m = MixtralTrain.init(c, { seed });
  writeHFConfig(d, inferenceConfig(c), { bosTokenId: BOS, eosTokenId: EOS, torchDtype: 'float32', routerAuxLossCoef: 0.01 });
  writeSafetensors(path.join(d, 'model.safetensors'), m.toHFTensors(), { format: 'pt' });
  return m;
}

const data = writeData(path.join(dir, 'data'), 4);
const hfModel = path.join(dir, 'start-hf');
const start = writeHFModel(hfModel, tinyConfig());
const cfg = (over: Partial<FinetuneConfig> = {}): FinetuneConfig =>
  defaultFinetuneConfig(hfModel, data, { steps: 30, batchSize: 4, seqLen: 32, maxLr: 1e-2, minLr: 1e-3, warmupSteps: 3, evalInterval: 10, evalBatches: 2, checkpointInterval: 10, ...over });

test('a batch: targets only on answer tokens (prompt and padding -1), truncation, EOS padding', () => {
  const a: TokenizedExample = { ids: Uint16Array.of(BOS, 10, 30, 31, 11, 30, 31, EOS), mask: Uint8Array.of(0, 0, 0, 0, 0, 1, 1, 1), task: null };
  const b: TokenizedExample = { ids: Uint16Array.of(BOS, 13, 40, 11, 41, EOS), mask: Uint8Array.of(0, 0, 0, 0, 1, 1), task: null };
  const x = exampleBatch([a, b], 32, EOS);
  assert.equal(x.batch, 2);
  assert.deepEqual([...x.inputs], [BOS, 10, 30, 31, 11, 30, 31, BOS, 13, 40, 11, 41, EOS, EOS]);
  // Position i predicts token i + 1: answer tokens 30 31 EOS in a, 41 EOS in b; nothing on prompts or padding.
  assert.deepEqual([...x.targets], [-1, -1, -1, -1, 30, 31, EOS, -1, -1, -1, 41, EOS, -1, -1]);
  assert.deepEqual([...x.tokenMask!], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]);
  // Truncated to 5 positions (6 tokens): a keeps its first answer token only.
  const t = exampleBatch([a, b], 5, EOS);
  assert.deepEqual([...t.targets], [-1, -1, -1, -1, 30, -1, -1, -1, 41, EOS]);
  assert.equal(countTruncated([a, b], 5), 1);
  assert.equal(countTruncated([a, b], 7), 0);
});

test('the loss is the mean over the batch\'s answer tokens and prompt positions get no gradient', () => {
  const ex = loadFinetuneData(data).train.slice(0, 3);
  const b = exampleBatch(ex, 32, EOS);
  const model = MixtralTrain.init(tinyConfig(), { seed: 2 });
  const r = model.loss(b.inputs, b.targets, { batch: b.batch, tokenMask: b.tokenMask! });
  // By hand: -log softmax at the answer positions, averaged over the answer tokens of all examples.
  let sum = 0, n = 0;
  const L = r.logits.data;
  for (let i = 0; i < b.targets.length; i++) {
    if (b.targets[i]! < 0) continue;
    let max = -Infinity;
    for (let j = 0; j < V; j++) max = Math.max(max, L[i * V + j]!);
    let z = 0;
    for (let j = 0; j < V; j++) z += Math.exp(L[i * V + j]! - max);
    sum += Math.log(z) + max - L[i * V + b.targets[i]!]!;
    n++;
  }
  assert.equal(n, ex.reduce((a, e) => a + e.mask.reduce((s, v) => s + v, 0), 0), 'every answer token (mask 1) is a target, nothing else');
  assert.ok(Math.abs(r.ce.item() - sum / n) < 1e-5, `${r.ce.item()} vs ${sum / n}`);
  r.logits.retainGrad = true;
  r.ce.backward();
  const g = r.logits.grad!;
  for (let i = 0; i < b.targets.length; i++) {
    let s = 0;
    for (let j = 0; j < V; j++) s += Math.abs(g[i * V + j]!);
    if (b.targets[i]! < 0) assert.equal(s, 0, `position ${i} (prompt or padding) has a gradient`);
    else assert.ok(s > 0, `answer position ${i} has no gradient`);
  }
});

test('full fine-tuning lowers the loss on a repeated tiny set; validation, plots, checkpoint, settings', () => {
  const out = path.join(dir, 'full');
  const lines: string[] = [];
  const r = finetune(cfg(), { outDir: out, log: (s) => lines.push(s) });
  assert.equal(r.state.step, 30);
  assert.equal(r.run.model.moe.routerAuxLossCoef, 0.01, 'the aux coefficient comes from the model\'s config.json');
  const first = r.state.history[0]!.ce;
  const lastFive = r.state.history.slice(-5).reduce((a, h) => a + h.ce, 0) / 5;
  assert.ok(first > 3.5, `starts near ln(64) = 4.16: ${first}`);
  assert.ok(lastFive < first - 1, `loss falls: ${first} -> ${lastFive}`);
  assert.deepEqual(r.state.evals.map((e) => e.step), [10, 20, 30]);
  assert.ok(r.state.evals[2]!.valLoss < r.state.evals[0]!.valLoss, 'validation loss falls too');
  for (const f of ['loss.svg', 'expert-load.svg', 'finetune.json', 'checkpoint/model.safetensors', 'checkpoint/optimizer.safetensors']) assert.ok(fs.existsSync(path.join(out, f)), f);
  assert.ok(lines.some((l) => /0 train \(0\.0%\) and 0 val examples longer than --seq-len 32 are truncated/.test(l)), lines.join('\n'));
  assert.ok(lines.some((l) => /not exported: .*vocabulary/.test(l)), 'a 64-token model cannot be exported with the Mistral tokenizer, and says so');
});

for (const mode of ['router-frozen', 'experts-frozen'] as const) {
  test(`--mode ${mode}: the frozen weights stay bit-identical, get no gradient; the others change`, () => {
    const r = finetune(cfg({ mode, steps: 3, evalInterval: 3, checkpointInterval: 3 }), { outDir: path.join(dir, mode), log: quiet });
    const before = new Map(start.namedParameters());
    const isGate = (n: string) => n.endsWith('block_sparse_moe.gate.weight');
    const isExpert = (n: string) => /block_sparse_moe\.experts\.w[123]\.weight$/.test(n);
    let frozen = 0, trained = 0;
    for (const [name, v] of r.model.namedParameters()) {
      const same = Buffer.compare(Buffer.from(v.data.buffer, v.data.byteOffset, v.data.byteLength), Buffer.from(before.get(name)!.data.buffer, before.get(name)!.data.byteOffset, before.get(name)!.data.byteLength)) === 0;
      const shouldFreeze = mode === 'router-frozen' ? isGate(name) : isExpert(name);
      if (shouldFreeze) {
        frozen++;
        assert.ok(same, `${name} changed`);
        assert.equal(v.requiresGrad, false, `${name} still wants a gradient`);
        assert.equal(v.grad, null, `${name} got a gradient`);
      } else if (isGate(name) || isExpert(name)) {
        trained++;
        assert.ok(!same, `${name} did not change`);
      }
    }
    assert.equal(frozen, mode === 'router-frozen' ? 2 : 6);
    assert.equal(trained, mode === 'router-frozen' ? 6 : 2);
    // The optimiser holds state for the trained parameters only.
    const names = trainableParameters(r.model, mode).map(([n]) => n);
    assert.ok(names.every((n) => !(mode === 'router-frozen' ? isGate(n) : isExpert(n))));
  });
}

test('a dense model has no router or experts to freeze', () => {
  const d = path.join(dir, 'dense-hf');
  writeHFModel(d, tinyConfig({ numLocalExperts: 1, numExpertsPerTok: 1 }));
  assert.throws(() => finetune(defaultFinetuneConfig(d, data, { mode: 'router-frozen', steps: 1 }), { outDir: path.join(dir, 'dense'), log: quiet }), /no MoE layers/);
});

test('--tasks keeps only examples of those tasks (the .jsonl gives each shard example its task)', () => {
  const all = loadFinetuneData(data, { tasks: ['copy', 'rev', 'succ'] });
  assert.equal(all.train.length, 4 * 3 + 2, 'every example has one of the three tasks');
  const some = loadFinetuneData(data, { tasks: ['copy', 'succ'] });
  assert.deepEqual([...new Set(some.train.map((e) => e.task))].sort(), ['copy', 'copy+succ', 'succ']);
  assert.equal(some.train.length, 4 * 2 + 1);
  // The task read from the .jsonl is the task of the shard example at the same index: copy's prompt starts with 10.
  for (const e of some.train) assert.equal(e.ids[1], e.task!.startsWith('copy') ? 10 : 13);
  const one = loadFinetuneData(data, { tasks: ['rev'] });
  assert.ok(one.train.every((e) => e.task === 'rev' && e.ids[1] === 12));
  assert.ok(one.val.length > 0 && one.val.every((e) => e.task === 'rev'));
  assertFormatError(() => loadFinetuneData(data, { tasks: ['nope'] }), 'train.jsonl', 'nope', 'copy');
  // A .jsonl that does not match its shard is refused.
  const bad = writeData(path.join(dir, 'bad-data'), 2);
  fs.appendFileSync(path.join(bad, 'train.jsonl'), JSON.stringify({ task: 'copy' }) + '\n');
  assertFormatError(() => loadFinetuneData(bad, { tasks: ['copy'] }), 'train.instr', 'jsonl');
  const bad2 = writeData(path.join(dir, 'bad-data-2'), 2);
  fs.writeFileSync(path.join(bad2, 'val.jsonl'), '{"task": 3}\n');
  assertFormatError(() => loadFinetuneData(bad2, { tasks: ['copy'] }), 'val.jsonl', 'line 1', 'task');
});

test('the command: --tasks and --mode reach the run; the summary line counts the chosen examples', async () => {
  const out = path.join(dir, 'cli');
  const j = lastJsonLine(await commandStdout(() => finetuneCommand(['--model', hfModel, '--data', data, '--out', out, '--tasks', 'succ', '--mode', 'router-frozen', '--steps', '2', '--batch', '2', '--seq-len', '4', '--eval-batches', '1', '--backend', 'ref'])));
  assert.equal(j.step, 2);
  assert.equal(j.mode, 'router-frozen');
  assert.deepEqual(j.examples, { train: 4, val: 2 });
  assert.deepEqual(j.truncated, { train: 4, val: 2 }, 'a succ example is 6 tokens (5 positions): --seq-len 4 cuts every one');
});

test('resume continues onto the very same loss curve; another mode is refused', () => {
  const a = path.join(dir, 'res-a');
  const b = path.join(dir, 'res-b');
  const c = cfg({ steps: 12, checkpointInterval: 4, evalInterval: 6 });
  const full = finetune(c, { outDir: a, log: quiet }).state;
  finetune(c, { outDir: b, stopAfter: 6, log: quiet }); // checkpoint at step 4; steps 5-6 are lost
  assertFormatError(() => finetune({ ...c, mode: 'experts-frozen' }, { outDir: b, resume: true, log: quiet }), 'finetune.json', 'mode');
  const lines: string[] = [];
  const resumed = finetune(c, { outDir: b, resume: true, log: (s) => lines.push(s) }).state;
  assert.ok(lines.some((l) => /moe finetune: resumed from .* at step 4/.test(l)), lines.join('\n'));
  const strip = (s: typeof full) => s.history.map(({ tokensPerSecond: _t, ...rest }) => rest);
  assert.deepEqual(strip(resumed), strip(full));
  assert.deepEqual(resumed.evals, full.evals);
});

test('from a GGUF file: the weights arrive exactly; the fine-tuned model is exported as HF + GGUF', () => {
  const c = mixtralTrainConfig(inferenceConfig(TRAIN_PRESETS.tiny().model), TRAIN_PRESETS.tiny().model.moe); // Mistral vocabulary (32000)
  const orig = MixtralTrain.init(c, { seed: 9 });
  const e = exportTrainedModel(orig, path.join(dir, 'gguf-src'));
  const s = readStartingModel(e.gguf);
  assert.equal(s.format, 'gguf');
  const back = MixtralTrain.fromHFTensors(s.config, s.tensors, { source: e.gguf });
  const want = new Map(orig.namedParameters());
  for (const [name, v] of back.namedParameters()) assert.deepEqual(v.data, want.get(name)!.data, name);

  const d = writeData(path.join(dir, 'data-32k'), 2, { vocabSize: 32000 });
  const out = path.join(dir, 'from-gguf');
  const r = finetune(defaultFinetuneConfig(e.gguf, d, { steps: 2, batchSize: 2, seqLen: 16, maxLr: 1e-2, evalBatches: 1 }), { outDir: out, log: quiet });
  assert.equal(r.run.model.moe.routerAuxLossCoef, 0.02, 'a GGUF carries no aux coefficient: the default');
  const gguf = path.join(out, 'model-f32.gguf');
  assert.ok(fs.existsSync(path.join(out, 'hf', 'config.json')) && fs.existsSync(gguf));
  const again = readStartingModel(gguf);
  const tuned = new Map(r.model.namedParameters());
  const reread = MixtralTrain.fromHFTensors(again.config, again.tensors, { source: gguf });
  let changed = false;
  for (const [name, v] of reread.namedParameters()) {
    assert.deepEqual(v.data, tuned.get(name)!.data, name);
    changed ||= Buffer.compare(Buffer.from(v.data.buffer, v.data.byteOffset, v.data.byteLength), Buffer.from(want.get(name)!.data.buffer, want.get(name)!.data.byteOffset, want.get(name)!.data.byteLength)) !== 0;
  }
  assert.ok(changed, 'the exported weights are the fine-tuned ones');
  // A moe-ts training output is a starting model too (the checkpoint, with its run's MoE options).
  const fromRun = readStartingModel(out);
  assert.equal(fromRun.format, 'checkpoint');
});

test('a NaN loss stops fine-tuning with a clear message', () => {
  let err: unknown;
  try {
    finetune(cfg({ steps: 8, checkpointInterval: 2, maxLr: 1e30, minLr: 1e30, warmupSteps: 1, clip: 1e30 }), { outDir: path.join(dir, 'nan'), log: quiet });
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof TrainingDivergedError, String(err));
  assert.match(err.message, /the loss is (NaN|Infinity|-Infinity)|gradient norm/);
});

test('bad inputs: a vocabulary mismatch, a context overrun, a missing model', () => {
  const d = writeData(path.join(dir, 'data-other-vocab'), 1, { vocabSize: 100 });
  assertFormatError(() => finetune(defaultFinetuneConfig(hfModel, d, { steps: 1 }), { outDir: path.join(dir, 'x'), log: quiet }), 'train.instr', '100', '64');
  assert.throws(() => finetune(defaultFinetuneConfig(hfModel, data, { steps: 1, seqLen: 1e6 }), { outDir: path.join(dir, 'x'), log: quiet }), /exceeds the model's context/);
  assertFormatError(() => readStartingModel(path.join(dir, 'nothing-here')), 'no such file');
  assertFormatError(() => readStartingModel(data), 'neither');
});

test('batches are a pure function of the step; an epoch visits every example once', () => {
  const d = loadFinetuneData(data);
  const src = instructBatches(d, { batchSize: 2, seqLen: 32, seed: 7, evalBatches: 1 });
  assert.deepEqual(src.train(5, 0), src.train(5, 0));
  const N = d.train.length; // 14 = 7 steps of 2
  const seen = new Set<string>();
  for (let s = 0; s < N / 2; s++) {
    const b = src.train(s, 0);
    const T = b.inputs.length / 2;
    for (let k = 0; k < 2; k++) seen.add(Array.from(b.inputs.subarray(k * T, (k + 1) * T)).filter((_, i) => b.tokenMask![k * T + i]).join(','));
  }
  const expected = new Set(d.train.map((e) => Array.from(e.ids.subarray(0, e.ids.length - 1)).join(',')));
  assert.deepEqual(seen, expected);
});

test('SIGKILL mid-run, then --resume: the same final loss as an uninterrupted run', async () => {
  // The command is run as `moe finetune` would run it (through finetuneCommand) in a child process.
  const mod = fileURLToPath(new URL('../src/workflows/finetune.js', import.meta.url));
  const script = `import(${JSON.stringify(mod)}).then((m) => m.finetuneCommand(process.argv.slice(1))).catch((e) => { console.error(e); process.exit(1); })`;
  const args = (out: string) => ['-e', script, '--', '--model', hfModel, '--data', data, '--out', out, '--steps', '120', '--batch', '4', '--seq-len', '32', '--lr', '1e-2',
    '--checkpoint-interval', '2', '--eval-interval', '40', '--eval-batches', '1', '--backend', 'ref'];
  const env = { ...process.env, MOE_PROGRESS: '0' };
  const whole = spawnSync(process.execPath, args(path.join(dir, 'kill-a')), { encoding: 'utf8', env });
  assert.equal(whole.status, 0, whole.stderr);
  const wholeResult = lastJsonLine(whole.stdout);
  const outB = path.join(dir, 'kill-b');
  const child = spawn(process.execPath, args(outB), { stdio: 'ignore', env });
  await new Promise<void>((resolve, reject) => {
    const t = setInterval(() => {
      const ck = findCheckpoint(outB);
      if (ck && JSON.parse(fs.readFileSync(path.join(ck, 'trainer_state.json'), 'utf8')).step >= 8) {
        clearInterval(t);
        child.kill('SIGKILL');
      }
    }, 20);
    child.on('exit', (code, signal) => {
      clearInterval(t);
      if (signal === 'SIGKILL') resolve();
      else reject(new Error(`the run ended (${code}) before it could be killed; make it longer`));
    });
  });
  const resumed = spawnSync(process.execPath, [...args(outB), '--resume'], { encoding: 'utf8', env });
  assert.equal(resumed.status, 0, resumed.stderr);
  assert.match(resumed.stderr, /moe finetune: resumed from .* at step \d+/);
  const r = lastJsonLine(resumed.stdout);
  assert.equal(r.step, 120);
  assert.equal(r.loss, wholeResult.loss);
  assert.equal(r.val_loss, wholeResult.val_loss);
});
