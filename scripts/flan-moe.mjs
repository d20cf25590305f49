#!/usr/bin/env node
// The FLAN-MoE comparison at our scale (docs/instruct-tuning.md): the project's pretrained MoE and its dense twin
// (same active parameters, same pre-training tokens), each
//   (a) fine-tuned directly on the held-out tasks' own training data (heldout-tasks/),
//   (b) instruction-tuned on the held-in tasks only (zero-shot on the held-out ones),
//   (c) instruction-tuned, then fine-tuned on the held-out tasks' training data as in (a),
// all scored by `moe eval-tasks` on the held-out evaluation split (items disjoint from heldout-tasks/). Every step is
// a public command (`moe data instruct`, `moe finetune`, `moe eval-tasks`); a step whose output exists is skipped,
// so the script resumes after an interruption. The table is written between the markers in docs/instruct-tuning.md.
//
// Usage: node scripts/flan-moe.mjs [--runs runs/flan] [--it-steps 2000] [--task-steps 400] [--parallel] [--no-doc]
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { normalizeAnswer } from '../dist/src/workflows/eval-tasks.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const bin = path.join(root, 'bin', 'moe.js');
const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: path.join(root, 'runs', 'flan') },
    'it-steps': { type: 'string', default: '2000' },
    'task-steps': { type: 'string', default: '400' },
    parallel: { type: 'boolean', default: false },
    'no-doc': { type: 'boolean', default: false },
  },
});
const runs = path.resolve(values.runs);
const data = path.join(runs, 'instruct');
const threads = values.parallel ? ['--threads', '1'] : [];
const MODELS = [
  { id: 'moe', title: 'MoE (8 experts, top-2)', base: path.join(root, 'models', 'moe-ts-pretrained-moe-f16.gguf') },
  { id: 'dense', title: 'dense, same active parameters', base: path.join(root, 'models', 'moe-ts-pretrained-dense-f16.gguf') },
];
const gguf = (id) => path.join(runs, id, 'model-f32.gguf');

function run(args, opts = {}) {
  const r = spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8', maxBuffer: 256 << 20, ...opts });
  if (r.status !== 0) throw new Error(`moe ${args.join(' ')} failed:\n${r.stderr?.slice(-2000) ?? ''}`);
  return r.stdout;
}

/** `moe finetune` into runs/<id> unless its export exists; resolves to its JSON summary (read back from finetune-summary.json). */
function finetune(id, model, dataDir, steps) {
  const out = path.join(runs, id);
  const summary = path.join(out, 'finetune-summary.json');
  if (fs.existsSync(gguf(id)) && fs.existsSync(summary)) return Promise.resolve(JSON.parse(fs.readFileSync(summary, 'utf8')));
  fs.mkdirSync(out, { recursive: true });
  const args = [bin, 'finetune', '--model', model, '--data', dataDir, '--out', out, '--steps', String(steps), ...threads, ...(fs.existsSync(path.join(out, 'checkpoint')) ? ['--resume'] : [])];
  process.stderr.write(`flan-moe: moe ${args.slice(1).join(' ')}\n`);
  const t0 = Date.now();
  return new Promise((resolve, reject) => {
    const log = fs.openSync(path.join(out, 'finetune.log'), 'a');
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', log] });
    let stdout = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.on('close', (code) => {
      if (code !== 0) return reject(new Error(`moe finetune ${id} exited with ${code} (log: ${path.join(out, 'finetune.log')})`));
      const s = { ...JSON.parse(stdout.trim().split('\n').pop()), wallSeconds: (Date.now() - t0) / 1000 };
      fs.writeFileSync(summary, JSON.stringify(s, null, 2) + '\n');
      resolve(s);
    });
  });
}
const pairs = async (make) => (values.parallel ? Promise.all(MODELS.map(make)) : MODELS.reduce(async (acc, m) => [...(await acc), await make(m)], Promise.resolve([])));

// 1. The data: held-in tasks (train/val), the held-out evaluation (heldout) and the held-out tasks' training data.
if (!fs.existsSync(path.join(data, 'index.json'))) run(['data', 'instruct', '--out', data], { stdio: ['ignore', 'inherit', 'inherit'] });

// 2. Fine-tuning: (b) instruction tuning, then (a) and (c) on the held-out tasks' data.
const itSteps = Number(values['it-steps']);
const taskSteps = Number(values['task-steps']);
const summaries = {};
for (const [m, s] of (await pairs((m) => finetune(`it-${m.id}`, m.base, data, itSteps))).map((s, i) => [MODELS[i], s])) summaries[`it-${m.id}`] = s;
const task = path.join(data, 'heldout-tasks');
for (const [m, s] of (await pairs((m) => finetune(`direct-${m.id}`, m.base, task, taskSteps))).map((s, i) => [MODELS[i], s])) summaries[`direct-${m.id}`] = s;
for (const [m, s] of (await pairs((m) => finetune(`it-ft-${m.id}`, gguf(`it-${m.id}`), task, taskSteps))).map((s, i) => [MODELS[i], s])) summaries[`it-ft-${m.id}`] = s;

// 3. Scores on the held-out evaluation split (and, for the instruction-tuned models, the held-in val split).
const evalDir = path.join(runs, 'eval');
fs.mkdirSync(evalDir, { recursive: true });
function evalTasks(name, model, split) {
  const file = path.join(evalDir, `${name}-${split}.json`);
  if (!fs.existsSync(file)) {
    process.stderr.write(`flan-moe: moe eval-tasks --model ${model} --split ${split}\n`);
    fs.writeFileSync(file, run(['eval-tasks', '--model', model, '--tasks', data, '--split', split, '--json']));
  }
  return JSON.parse(fs.readFileSync(file, 'utf8'));
}
const CONDITIONS = [
  { id: 'pre', title: 'pretrained, zero-shot', model: (m) => m.base, tokens: () => 0 },
  { id: 'direct', title: '(a) fine-tuned on the held-out tasks', model: (m) => gguf(`direct-${m.id}`), tokens: (m) => summaries[`direct-${m.id}`].tokens },
  { id: 'it', title: '(b) instruction-tuned (held-in tasks), zero-shot', model: (m) => gguf(`it-${m.id}`), tokens: (m) => summaries[`it-${m.id}`].tokens },
  { id: 'it-ft', title: '(c) instruction-tuned, then fine-tuned on the held-out tasks', model: (m) => gguf(`it-ft-${m.id}`), tokens: (m) => summaries[`it-${m.id}`].tokens + summaries[`it-ft-${m.id}`].tokens },
];
const results = [];
for (const c of CONDITIONS) for (const m of MODELS) results.push({ c, m, heldout: evalTasks(`${c.id}-${m.id}`, c.model(m), 'heldout'), val: c.id === 'it' || c.id === 'pre' ? evalTasks(`${c.id}-${m.id}`, c.model(m), 'val') : null });

// 4. The table.
const pct = (x) => (100 * x).toFixed(1);
const active = Object.fromEntries(MODELS.map((m) => [m.id, JSON.parse(run(['inspect', m.base, '--json'])).parameters.active]));
const heldoutTasks = results[0].heldout.tasks.map((t) => t.task);
const lines = [
  `| condition | model | ${heldoutTasks.join(' | ')} | macro average | fine-tuning tokens | fine-tuning compute (6 x active x tokens) |`,
  `| --- | --- |${heldoutTasks.map(() => ' ---: |').join('')} ---: | ---: | ---: |`,
];
for (const r of results) {
  const t = r.c.tokens(r.m);
  lines.push(`| ${r.c.title} | ${r.m.title} | ${r.heldout.tasks.map((x) => pct(x.exactMatch)).join(' | ')} | **${pct(r.heldout.overall.macroExactMatch)}** | ${t.toLocaleString('en-US')} | ${((6 * active[r.m.id] * t) / 1e12).toFixed(2)} TFLOP |`);
}
// The score of always giving the most common reference answer of each (task, language): what learning only the
// label prior reaches (sentiment's negatives, letter_count's "1").
const heldoutExamples = fs.readFileSync(path.join(data, 'heldout.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
const prior = {};
for (const e of heldoutExamples) {
  const k = `${e.task}\u0000${e.lang}`;
  const a = normalizeAnswer(e.messages[e.messages.length - 1].content);
  (prior[k] ??= new Map()).set(a, (prior[k].get(a) ?? 0) + 1);
}
const priorOf = (task, lang) => {
  let hit = 0;
  let n = 0;
  for (const [k, m] of Object.entries(prior)) {
    const [t, l] = k.split('\u0000');
    if (t !== task || (lang && l !== lang)) continue;
    hit += Math.max(...m.values());
    n += [...m.values()].reduce((a, b) => a + b, 0);
  }
  return hit / n;
};
const priorTitle = 'always the most common answer of the task and language (no model)';
lines.push(`| ${priorTitle} | - | ${heldoutTasks.map((t) => pct(priorOf(t))).join(' | ')} | ${pct(heldoutTasks.reduce((a, t) => a + priorOf(t), 0) / heldoutTasks.length)} | - | - |`);
const langs = Object.keys(results[0].heldout.languages);
const byLang = [`| condition | model | ${langs.join(' | ')} |`, `| --- | --- |${langs.map(() => ' ---: |').join('')}`];
for (const r of results) byLang.push(`| ${r.c.title} | ${r.m.title} | ${langs.map((l) => pct(r.heldout.languages[l].macroExactMatch)).join(' | ')} |`);
byLang.push(`| ${priorTitle} | - | ${langs.map((l) => pct(heldoutTasks.reduce((a, t) => a + priorOf(t, l), 0) / heldoutTasks.length)).join(' | ')} |`);
const valRows = results.filter((r) => r.val);
const valTasks = valRows[0].val.tasks.map((t) => t.task);
const heldin = [`| model | ${valTasks.join(' | ')} | macro average |`, `| --- |${valTasks.map(() => ' ---: |').join('')} ---: |`];
for (const r of valRows) heldin.push(`| ${r.m.title}, ${r.c.id === 'pre' ? 'pretrained' : 'instruction-tuned'} | ${r.val.tasks.map((x) => pct(x.exactMatch)).join(' | ')} | **${pct(r.val.overall.macroExactMatch)}** |`);

const table = [
  `Exact match in % (accuracy for sentiment) on the held-out split of \`moe data instruct --seed 1 --per-task 1000\` (${results[0].heldout.examples} examples); instruction tuning ${itSteps} steps, task fine-tuning ${taskSteps} steps, batch 8, full fine-tuning with the default LR schedule.`,
  '',
  ...lines,
  '',
  'Macro average over the held-out tasks per instruction language:',
  '',
  ...byLang,
  '',
  `Held-in tasks (the val split, ${valRows[0].val.examples} examples: items never trained on), before and after instruction tuning:`,
  '',
  ...heldin,
].join('\n');
process.stdout.write(table + '\n');
if (!values['no-doc']) {
  const doc = path.join(root, 'docs', 'instruct-tuning.md');
  const text = fs.readFileSync(doc, 'utf8');
  const a = '<!-- flan-moe table: written by scripts/flan-moe.mjs -->';
  const b = '<!-- end flan-moe table -->';
  const i = text.indexOf(a);
  const j = text.indexOf(b);
  if (i < 0 || j < i) throw new Error(`${doc}: the table markers are missing`);
  fs.writeFileSync(doc, text.slice(0, i + a.length) + '\n' + table + '\n' + text.slice(j));
  process.stderr.write(`flan-moe: wrote ${doc}\n`);
}
