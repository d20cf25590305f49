// A trained model exported as a Hugging Face directory and a GGUF file: both load here and give the logits the
// trainer's own forward pass gives, and llama.cpp (run live) agrees on the GGUF.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { LlamaCppUnavailableError, llamaCppLogProbs, logSoftmax } from './helpers/llamacpp.js';
import { MixtralTrain } from '../src/model/mixtral-train.js';
import { TRAIN_PRESETS } from '../src/workflows/train.js';
import { exportTrainedModel } from '../src/workflows/export.js';
import { loadModel } from '../src/model/load.js';
import { noGrad } from '../src/autograd/tape.js';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-export-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

const IDS = [1, 415, 2936, 9060, 285, 1117, 28723, 13, 4014, 349, 264, 1369, 302, 272, 11843, 28723];

function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let d = 0;
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i] - b[i]));
  return d;
}

for (const preset of ['tiny', 'tiny-dense'] as const) {
  test(`export of a ${preset} model: HF directory and GGUF give the trainer's logits; llama.cpp agrees on the GGUF`, async (t) => {
    const run = TRAIN_PRESETS.tiny();
    if (preset === 'tiny-dense') Object.assign(run.model, { numLocalExperts: 1, numExpertsPerTok: 1, intermediateSize: 128 });
    const model = MixtralTrain.init(run.model, { seed: 11 });
    const out = path.join(dir, preset);
    const e = exportTrainedModel(model, out);
    assert.ok(fs.existsSync(path.join(e.hfDir, 'tokenizer.model')) && fs.existsSync(path.join(e.hfDir, 'config.json')));

    const want = noGrad(() => model.forward(IDS).logits.data);
    const fromHF = loadModel(e.hfDir).newSession().forward(IDS, { allLogits: true });
    const fromGGUF = loadModel(e.gguf).newSession().forward(IDS, { allLogits: true });
    const dHF = maxDiff(fromHF, want), dGGUF = maxDiff(fromGGUF, want);
    t.diagnostic(`max |logit diff| vs the trainer: HF ${dHF.toExponential(2)}, GGUF ${dGGUF.toExponential(2)}`);
    assert.ok(dHF < 1e-4 && dGGUF < 1e-4, `HF ${dHF}, GGUF ${dGGUF}`);

    let theirs: Float32Array[];
    try {
      theirs = await llamaCppLogProbs(e.gguf, IDS);
    } catch (err) {
      if (err instanceof LlamaCppUnavailableError && !process.env.MOE_REQUIRE_LLAMACPP) return t.skip(`llama.cpp unavailable: ${err.message.split('\n')[0]}`);
      throw err;
    }
    const V = run.model.vocabSize;
    let worst = 0;
    theirs.forEach((row, i) => {
      const ours = logSoftmax(fromGGUF.subarray(i * V, (i + 1) * V));
      for (let j = 0; j < V; j++) if (row[j] > -80) worst = Math.max(worst, Math.abs(row[j] - ours[j]));
    });
    t.diagnostic(`llama.cpp vs moe-ts on the exported GGUF: max |log-prob diff| ${worst.toExponential(2)}`);
    assert.ok(worst < 1e-3, `llama.cpp disagrees by ${worst}`);
  });
}

test('export refuses a switch-router model (inference renormalises top-k weights) before writing anything', () => {
  const run = TRAIN_PRESETS.tiny();
  Object.assign(run.model, { numExpertsPerTok: 1 });
  run.model.moe = { ...run.model.moe, router: 'switch' };
  const out = path.join(dir, 'switch');
  assert.throws(() => exportTrainedModel(MixtralTrain.init(run.model, { seed: 1 }), out), /switch/);
  assert.equal(fs.existsSync(out), false);
});
