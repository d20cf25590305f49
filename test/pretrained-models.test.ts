// The models shipped in models/. The pretrained ones (scripts/train-pretrained.mjs, docs/training.md) load, have the
// shapes the docs give, and are trained: on sentences in each of the five languages their perplexity is a small
// fraction of what an untrained model of this vocabulary gives (seeded random weights: about 50,000). The default
// model is instruction-tuned (below).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadModel } from '../src/model/load.js';
import { generateInstructExamples, readInstructMaterial } from '../src/workflows/instruct.js';
import { evaluateTasks } from '../src/workflows/eval-tasks.js';

/** Val examples scored per (task, language), and the least macro exact-match gain the default model must show. */
const LIMIT = 10;
const MIN_GAIN = 0.03;

const shipped = (name: string) => fileURLToPath(new URL(`../../models/${name}`, import.meta.url));

// In the register of the training corpus (software documentation: LibreOffice help, Debian guides, manual pages);
// everyday prose is far from it and gets perplexities in the thousands from these small models.
const SENTENCES: Record<string, string> = {
  en: 'To open the dialog, choose Tools - Options. Select the check box to show the file name in the title bar, then click OK.',
  fr: 'Pour ouvrir la boîte de dialogue, choisissez Outils - Options. Cochez la case pour afficher le nom du fichier, puis cliquez sur OK.',
  de: 'Um den Dialog zu öffnen, wählen Sie Extras - Optionen. Aktivieren Sie das Markierfeld, um den Dateinamen anzuzeigen, und klicken Sie auf OK.',
  it: 'Per aprire la finestra di dialogo, scegliete Strumenti - Opzioni. Selezionate la casella per mostrare il nome del file, quindi fate clic su OK.',
  es: 'Para abrir el diálogo, elija Herramientas - Opciones. Seleccione la casilla para mostrar el nombre del archivo y después pulse Aceptar.',
};

function perplexity(file: string, text: string): number {
  const m = loadModel(file);
  const ids = m.tokenizer.encode(text, { addBos: true });
  const V = m.config.vocabSize;
  const logits = m.newSession({ contextLength: ids.length }).forward(ids.slice(0, -1), { allLogits: true });
  let nll = 0;
  for (let i = 0; i + 1 < ids.length; i++) {
    const row = logits.subarray(i * V, (i + 1) * V);
    let max = -Infinity;
    for (const x of row) max = Math.max(max, x);
    let s = 0;
    for (const x of row) s += Math.exp(x - max);
    nll += max + Math.log(s) - row[ids[i + 1]];
  }
  return Math.exp(nll / (ids.length - 1));
}

for (const [name, experts] of [['moe-ts-pretrained-moe-f16.gguf', 8], ['moe-ts-pretrained-dense-f16.gguf', 1]] as const) {
  test(`models/${name}: loads with the documented shape and is trained in all five languages`, { skip: fs.existsSync(shipped(name)) ? false : 'not in this checkout' }, () => {
    const m = loadModel(shipped(name));
    assert.equal(m.config.vocabSize, 32000);
    assert.equal(m.config.numLocalExperts, experts);
    if (experts > 1) assert.equal(m.config.numExpertsPerTok, 2);
    for (const [lang, text] of Object.entries(SENTENCES)) {
      const ppl = perplexity(shipped(name), text);
      assert.ok(ppl < 1000, `${lang}: perplexity ${ppl.toFixed(0)} is what an untrained model gives`);
    }
  });
}

// The default model (`npm start`): the pretrained MoE instruction-tuned (docs/instruct-tuning.md). On held-in tasks'
// val items (never trained on), greedy answers beat the pretrained model's in each of the five languages. The
// models are deterministic under greedy decoding, so the scores are fixed for a given file; the margins below
// are well under the measured gap (docs/instruct-tuning.md), so the test fails only if the model stops following
// instructions (a wrong file, a broken chat template, a regression in the forward pass).
test('models/moe-ts-instruct-moe-f16.gguf (the default model) answers held-in instructions better than the pretrained MoE, in every language', { skip: fs.existsSync(shipped('moe-ts-instruct-moe-f16.gguf')) ? false : 'not in this checkout' }, async () => {
  const material = readInstructMaterial(fileURLToPath(new URL('../../data/instruct/', import.meta.url)));
  const val = generateInstructExamples(material, { seed: 1, perTask: 1000 }).val;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-default-model-'));
  try {
    const file = path.join(dir, 'val.jsonl');
    fs.writeFileSync(file, val.map((e) => JSON.stringify(e)).join('\n') + '\n');
    const score = async (name: string) => evaluateTasks(loadModel(shipped(name)), file, { limit: LIMIT });
    const tuned = await score('moe-ts-instruct-moe-f16.gguf');
    const pre = await score('moe-ts-pretrained-moe-f16.gguf');
    const [t, p] = [tuned.overall.macroExactMatch, pre.overall.macroExactMatch];
    assert.ok(t >= p + MIN_GAIN, `macro exact match ${t.toFixed(3)} (tuned) vs ${p.toFixed(3)} (pretrained)`);
    for (const lang of Object.keys(tuned.languages)) {
      assert.ok(tuned.languages[lang]!.correct > pre.languages[lang]!.correct, `${lang}: ${tuned.languages[lang]!.correct} right (tuned) vs ${pre.languages[lang]!.correct} (pretrained)`);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
