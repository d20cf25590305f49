// The training loop: learns, resumes onto the same loss curve (also after SIGKILL), stops on NaN keeping the last
// good checkpoint, writes SVG plots.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { train, TRAIN_PRESETS, TrainingDivergedError, findCheckpoint, type TrainRunConfig, type TokenData } from '../src/workflows/train.js';
import { mixtralTrainConfig } from '../src/model/mixtral-train.js';
import { ShardWriter, shardName } from '../src/workflows/corpus.js';
import { Rng } from '../src/util/rng.js';
import { lastJsonLine } from './helpers/command-output.js';

const moeBin = fileURLToPath(new URL('../../bin/moe.js', import.meta.url));
const V = 64;

/** A learnable stream: a first-order Markov chain where each token has 3 likely successors. */
function markov(n: number, seed: number): Uint16Array {
  const rng = new Rng(seed);
  const out = new Uint16Array(n);
  let t = 3;
  for (let i = 0; i < n; i++) {
    const r = rng.uniform();
    t = r < 0.9 ? (t * 5 + 1 + Math.floor(r * 3.3)) % (V - 3) + 3 : 3 + rng.int(V - 3);
    out[i] = t;
  }
  return out;
}

const data: TokenData = { train: markov(20000, 1), val: markov(4000, 2) };

function runConfig(over: Partial<TrainRunConfig> = {}): TrainRunConfig {
  const base = TRAIN_PRESETS.tiny();
  return {
    ...base,
    model: mixtralTrainConfig({ ...base.model, vocabSize: V, tieWordEmbeddings: false }, { ...base.model.moe, routerAuxLossCoef: 0.02 }),
    seqLen: 16, batchSize: 4, steps: 40, maxLr: 1e-2, minLr: 1e-3, warmupSteps: 5, evalInterval: 20, evalBatches: 2, checkpointInterval: 10,
    ...over,
  };
}

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'moe-train-'));

test('training lowers the loss of a learnable stream; plots and checkpoints are written', () => {
  const out = tmp();
  const { state } = train(runConfig(), { data, outDir: out, log: () => {} });
  assert.equal(state.step, 40);
  const first = state.history[0].ce;
  const lastFive = state.history.slice(-5).reduce((a, h) => a + h.ce, 0) / 5;
  assert.ok(first > 3.8, `starts near ln(64) = 4.16: ${first}`);
  assert.ok(lastFive < first - 1, `loss falls: ${first} -> ${lastFive}`);
  assert.equal(state.evals.length, 2);
  assert.ok(state.evals[1].valLoss < state.evals[0].valLoss + 0.05);
  for (const row of state.load) assert.ok(Math.abs(row.reduce((a, b) => a + b, 0) - 1) < 1e-9, 'load rows are fractions');
  for (const f of ['loss.svg', 'expert-load.svg', 'checkpoint/model.safetensors', 'checkpoint/optimizer.safetensors', 'checkpoint/trainer_state.json']) {
    assert.ok(fs.existsSync(path.join(out, f)), f);
  }
  assert.match(fs.readFileSync(path.join(out, 'loss.svg'), 'utf8'), /^<svg[\s\S]*validation[\s\S]*<\/svg>\n$/);
  fs.rmSync(out, { recursive: true });
});

test('resume continues onto the very same loss curve as an uninterrupted run', () => {
  const a = tmp();
  const b = tmp();
  const cfg = runConfig({ steps: 16, checkpointInterval: 4, evalInterval: 8 });
  const full = train(cfg, { data, outDir: a, log: () => {} }).state;
  train(cfg, { data, outDir: b, stopAfter: 6, log: () => {} }); // checkpoint at step 4; steps 5-6 are lost
  const resumed = train(cfg, { data, outDir: b, resume: true, log: () => {} }).state;
  const strip = (s: typeof full) => s.history.map(({ tokensPerSecond: _t, ...rest }) => rest);
  assert.deepEqual(strip(resumed), strip(full));
  assert.deepEqual(resumed.evals, full.evals);
  fs.rmSync(a, { recursive: true });
  fs.rmSync(b, { recursive: true });
});

test('a NaN loss stops training with a clear message and leaves the last good checkpoint intact', () => {
  const out = tmp();
  const cfg = runConfig({ steps: 12, checkpointInterval: 3, maxLr: 1e30, minLr: 1e30, warmupSteps: 1, clip: 1e30 });
  let err: unknown;
  try {
    train(cfg, { data, outDir: out, log: () => {} });
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof TrainingDivergedError, String(err));
  assert.match(err.message, /the loss is (NaN|Infinity|-Infinity)|gradient norm/);
  const ck = findCheckpoint(out);
  if (ck) {
    const st = JSON.parse(fs.readFileSync(path.join(ck, 'trainer_state.json'), 'utf8'));
    assert.ok(st.history.every((h: { loss: number }) => Number.isFinite(h.loss)), 'the checkpoint holds only finite steps');
    assert.match(err.message, /is intact/);
  }
  fs.rmSync(out, { recursive: true });
});

test('SIGKILL mid-run, then --resume: the same final loss as an uninterrupted run', async () => {
  const dir = tmp();
  const dataDir = path.join(dir, 'data');
  fs.mkdirSync(dataDir);
  for (const [split, ids] of [['train', data.train], ['val', data.val]] as const) {
    const w = new ShardWriter(path.join(dataDir, shardName('en', split, 0)), { vocabSize: V, bosId: 1, eosId: 2 });
    w.writeDocument(ids);
    w.close();
  }
  const cfgFile = path.join(dir, 'run.json');
  const cfg = runConfig({ steps: 30, checkpointInterval: 2, evalInterval: 10 });
  fs.writeFileSync(cfgFile, JSON.stringify({ preset: 'tiny', ...cfg, model: { ...cfg.model, moe: undefined }, moe: cfg.model.moe }));
  const args = (out: string) => [moeBin, 'train', '--config', cfgFile, '--data', dataDir, '--out', out];
  const whole = spawnSync(process.execPath, args(path.join(dir, 'a')), { encoding: 'utf8' });
  assert.equal(whole.status, 0, whole.stderr);
  const wholeResult = lastJsonLine(whole.stdout);

  const outB = path.join(dir, 'b');
  const child = spawn(process.execPath, args(outB), { stdio: 'ignore' });
  // Kill it once a mid-run checkpoint exists.
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
  const resumed = spawnSync(process.execPath, [...args(outB), '--resume'], { encoding: 'utf8' });
  assert.equal(resumed.status, 0, resumed.stderr);
  assert.match(resumed.stderr, /resumed from .* at step \d+/);
  const resumedResult = lastJsonLine(resumed.stdout);
  assert.equal(resumedResult.step, 30);
  assert.equal(resumedResult.loss, wholeResult.loss);
  assert.equal(resumedResult.val_loss, wholeResult.val_loss);
  fs.rmSync(dir, { recursive: true });
});
