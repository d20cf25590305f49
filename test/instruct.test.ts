import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { FormatError } from '../src/formats/errors.js';
import { UsageError } from '../src/cli/args.js';
import { mistralV1Tokenizer } from '../src/tokenizer/sources.js';
import { renderChat } from '../src/workflows/chat-template.js';
import {
  HELDIN_TASKS,
  HELDOUT_TASKS,
  INSTRUCT_LANGUAGES,
  INSTRUCT_TASKS,
  LANGUAGE_NAMES,
  PHRASINGS,
  buildInstructData,
  encodeInstructExample,
  instructDataCommand,
  generateInstructExamples,
  readInstructMaterial,
  readInstructShard,
  type InstructExample,
} from '../src/workflows/instruct.js';

// The committed snapshot (data/instruct/, a few MB) is the material; nothing under /work/shared is read.
const MATERIAL = new URL('../../data/instruct/', import.meta.url).pathname;
const material = readInstructMaterial(MATERIAL);
const PER_TASK = 60;
const ex = generateInstructExamples(material, { seed: 7, perTask: PER_TASK });
const tok = mistralV1Tokenizer();
const single = (e: InstructExample) => !e.task.includes('+');
const tasksOf = (e: InstructExample) => e.task.split('+');

test('same seed gives the same examples; another seed differs', () => {
  assert.deepEqual(generateInstructExamples(material, { seed: 7, perTask: PER_TASK }), ex);
  const other = generateInstructExamples(material, { seed: 8, perTask: PER_TASK });
  assert.notDeepEqual(other.train, ex.train);
});

test('held-out tasks appear only in the heldout split; every task and language is present', () => {
  for (const split of ['train', 'val'] as const) {
    for (const e of ex[split]) for (const t of tasksOf(e)) assert.ok(HELDIN_TASKS.includes(t as never), `${split} has ${t}`);
  }
  for (const e of ex.heldout) assert.ok(HELDOUT_TASKS.includes(e.task as never), `heldout has ${e.task}`);
  const seen = new Set([...ex.train, ...ex.val, ...ex.heldout].filter(single).map((e) => e.task));
  assert.deepEqual([...seen].sort(), [...INSTRUCT_TASKS].sort());
  for (const task of INSTRUCT_TASKS) {
    const split = HELDOUT_TASKS.includes(task) ? ex.heldout : ex.train;
    const langs = new Set(split.filter((e) => e.task === task).map((e) => e.lang));
    assert.deepEqual([...langs].sort(), [...INSTRUCT_LANGUAGES].sort(), `languages of ${task}`);
  }
  assert.ok(ex.train.some((e) => !single(e) && e.messages.length === 4), 'multi-turn examples in train');
});

test('val items are disjoint from train items', () => {
  // The item of a translation or lookup example is its answer (plus the prompt's text); no val answer-and-prompt pair is in train.
  const key = (e: InstructExample) => e.messages.map((m) => m.content).join('\u0000');
  const train = new Set(ex.train.filter(single).map(key));
  for (const e of ex.val.filter(single)) assert.ok(!train.has(key(e)), `val example also in train: ${key(e).slice(0, 80)}`);
  // Arithmetic: the expression itself decides the split.
  const exprs = (s: InstructExample[]) => new Set(s.filter((e) => e.task === 'arithmetic').map((e) => /(\d+ [+\-×] \d+)/.exec(e.messages[0]!.content)![1]));
  const tr = exprs(ex.train);
  for (const x of exprs(ex.val)) assert.ok(!tr.has(x), `${x} in both train and val`);
});

test('heldout-train / heldout-val: only held-out tasks, every language, and items disjoint from the heldout evaluation', () => {
  assert.equal(ex['heldout-train'].length, PER_TASK * HELDOUT_TASKS.length);
  assert.equal(ex['heldout-val'].length, Math.max(5, Math.ceil(PER_TASK / 10)) * HELDOUT_TASKS.length);
  for (const split of ['heldout-train', 'heldout-val'] as const) {
    for (const e of ex[split]) assert.ok(HELDOUT_TASKS.includes(e.task as never), `${split} has ${e.task}`);
    for (const task of HELDOUT_TASKS) {
      const langs = new Set(ex[split].filter((e) => e.task === task).map((e) => e.lang));
      assert.deepEqual([...langs].sort(), [...INSTRUCT_LANGUAGES].sort(), `${split}: languages of ${task}`);
    }
  }
  // The item is the word (sentiment, letter_count: the longest quoted text of the prompt; the letter is the other)
  // or the emoji (emoji_name: its name in the instruction's language identifies it). An evaluation item never
  // appears in fine-tuning data, nor a fine-tuning val item in fine-tuning train.
  const item = (e: InstructExample) =>
    e.task === 'emoji_name'
      ? `${e.lang}:${e.messages[1]!.content}`
      : [...e.messages[0]!.content.matchAll(/[«"„“]\s?([^»"“”]+?)\s?[»"“”]/gu)].map((m) => m[1]!).sort((a, b) => b.length - a.length)[0]!;
  const items = (s: InstructExample[], task: string) => new Set(s.filter((e) => e.task === task).map(item));
  for (const task of HELDOUT_TASKS) {
    const evalItems = items(ex.heldout, task);
    const trainItems = items(ex['heldout-train'], task);
    const valItems = items(ex['heldout-val'], task);
    assert.ok(evalItems.size > 5 && trainItems.size > 5, `${task}: items found`);
    for (const x of trainItems) assert.ok(!evalItems.has(x), `${task}: '${x}' in heldout and heldout-train`);
    for (const x of valItems) assert.ok(!evalItems.has(x) && !trainItems.has(x), `${task}: '${x}' in heldout-val and another split`);
  }
});

test('every task has at least 3 phrasings in each language, written with its own placeholders', () => {
  for (const task of INSTRUCT_TASKS) for (const l of INSTRUCT_LANGUAGES) assert.ok(PHRASINGS[task][l].length >= 3, `${task}/${l}`);
  for (const e of [...ex.train, ...ex.val, ...ex.heldout]) {
    for (const m of e.messages) assert.ok(!/\{(src|tgt|text|word|letter|expr|emoji)\}/.test(m.content), `unfilled placeholder: ${m.content}`);
  }
});

test('mechanically checkable answers are right (arithmetic, letter counts, spelling, language id)', () => {
  const all = [...ex.train, ...ex.val, ...ex.heldout].filter(single);
  const byTask = (t: string) => all.filter((e) => e.task === t);
  const q = (e: InstructExample) => e.messages[0]!.content;
  const a = (e: InstructExample) => e.messages[1]!.content;
  let n = 0;
  for (const e of byTask('arithmetic')) {
    const m = /(\d+) ([+\-×]) (\d+)/.exec(q(e))!;
    const [x, y] = [Number(m[1]), Number(m[3])];
    const want = m[2] === '+' ? x + y : m[2] === '-' ? x - y : x * y;
    assert.equal(Number(a(e)), want, q(e));
    n++;
  }
  for (const e of byTask('letter_count')) {
    // The word is the last quoted string, the letter the first (in every phrasing and quote style).
    const quoted = [...q(e).matchAll(/["«„]\s?([^"»“]+?)\s?["»“]/g)].map((m) => m[1]!);
    const word = quoted[quoted.length - 1]!;
    const letter = quoted[0]!;
    assert.equal(letter.length, 1, q(e));
    const count = [...word.toLowerCase()].filter((c) => c === letter).length;
    assert.equal(a(e), String(count), q(e));
    n++;
  }
  for (const e of byTask('spell')) {
    const quoted = [...q(e).matchAll(/["«„]\s?([^"»“]+?)\s?["»“]/g)].map((m) => m[1]!);
    assert.equal(a(e).split(' ').join(''), quoted[0], q(e));
    assert.ok(a(e).split(' ').every((c) => [...c].length === 1), a(e));
    n++;
  }
  for (const e of byTask('langid')) {
    // The sentence is one of the aligned paragraphs; the answer names its language in the instruction language.
    const t = material.translation.tuples.find((tu) => tu.some((s) => q(e).includes(s)))!;
    assert.ok(t, q(e));
    const names = material.translation.langs.filter((_l, i) => q(e).includes(t[i]!)).map((l) => LANGUAGE_NAMES[e.lang][l].toLowerCase());
    assert.ok(names.includes(a(e).toLowerCase()), `${a(e)} not in ${names}`);
    n++;
  }
  assert.ok(n > 100, `checked ${n}`);
});

test('the loss mask covers exactly the answer tokens and their EOS', () => {
  const sample = [...ex.train.slice(0, 40), ...ex.train.filter((e) => !single(e)).slice(0, 10), ...ex.heldout.slice(0, 20)];
  for (const e of sample) {
    const { ids, mask } = encodeInstructExample(tok, e.messages);
    assert.equal(ids.length, mask.length);
    assert.equal(ids[0], tok.bosId);
    assert.equal(mask[0], 0);
    // Masked runs, in order, are the answers (decoded) each followed by EOS.
    const runs: number[][] = [];
    for (let i = 0; i < ids.length; i++) {
      if (!mask[i]) continue;
      if (i === 0 || !mask[i - 1]) runs.push([]);
      runs[runs.length - 1]!.push(ids[i]!);
    }
    const answers = e.messages.filter((m) => m.role === 'assistant').map((m) => m.content);
    assert.equal(runs.length, answers.length);
    for (let k = 0; k < runs.length; k++) {
      const r = runs[k]!;
      assert.equal(r[r.length - 1], tok.eosId);
      assert.equal(tok.decode(r.slice(0, -1)), answers[k]);
    }
    // Unmasked tokens hold no EOS (the prompt never ends a sequence) and decode to the prompts.
    const un = ids.filter((_id, i) => !mask[i]);
    assert.ok(!un.includes(tok.eosId));
    const text = tok.decode(un.slice(1));
    for (const m of e.messages.filter((x) => x.role === 'user')) assert.ok(text.includes(m.content), `prompt text missing: ${m.content}`);
  }
});

test('the first prompt is tokenized as the chat template renders it (what generation sees)', () => {
  for (const e of ex.train.slice(0, 20)) {
    const { ids, mask } = encodeInstructExample(tok, e.messages);
    const rendered = renderChat([e.messages[0]!], { bosToken: tok.piece(tok.bosId), eosToken: tok.piece(tok.eosId), addGenerationPrompt: true });
    const prompt = tok.encode(rendered, { addBos: false, parseSpecial: true });
    const firstAnswer = mask.indexOf(1);
    assert.deepEqual(ids.slice(0, firstAnswer), prompt);
  }
});

test('buildInstructData writes shards that read back; corrupted shards give FormatError', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-instruct-'));
  try {
    const { counts } = buildInstructData(dir, { seed: 3, perTask: 10, materialDir: MATERIAL, tokenizer: tok });
    const lines = fs.readFileSync(path.join(dir, 'heldout.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as InstructExample);
    const shard = readInstructShard(path.join(dir, 'heldout.instr'));
    assert.equal(shard.offsets.length - 1, lines.length);
    assert.equal(counts.heldout.examples, lines.length);
    for (let i = 0; i < lines.length; i++) {
      const want = encodeInstructExample(tok, lines[i]!.messages);
      assert.deepEqual([...shard.ids.subarray(shard.offsets[i], shard.offsets[i + 1])], want.ids);
      assert.deepEqual([...shard.mask.subarray(shard.offsets[i], shard.offsets[i + 1])], want.mask);
    }
    const file = path.join(dir, 'train.instr');
    const good = fs.readFileSync(file);
    readInstructShard(file);
    const bad = path.join(dir, 'bad.instr');
    const expectFormat = (bytes: Uint8Array, re: RegExp) => {
      fs.writeFileSync(bad, bytes);
      assert.throws(() => readInstructShard(bad), (e: unknown) => e instanceof FormatError && re.test((e as Error).message) && (e as Error).message.includes('bad.instr'));
    };
    expectFormat(good.subarray(0, good.length - 5), /truncated or corrupted/);
    expectFormat(good.subarray(0, 10), /shorter than/);
    const magic = Buffer.from(good);
    magic.write('XXXXXXXX', 0, 'latin1');
    expectFormat(magic, /magic/);
    const huge = Buffer.from(good);
    huge.writeBigUInt64LE(1n << 60n, 16);
    expectFormat(huge, /truncated or corrupted/);
    const m = Buffer.from(good);
    m[m.length - 1] = 7;
    expectFormat(m, /mask\[/);
    const o = Buffer.from(good);
    o.writeUInt32LE(0xffffff, 32 + 4);
    expectFormat(o, /offsets\[\d+\] = \d+ is out of order/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a damaged material file is a FormatError naming it', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-instruct-mat-'));
  try {
    for (const f of fs.readdirSync(MATERIAL)) if (f.endsWith('.br') || f === 'manifest.json') fs.copyFileSync(path.join(MATERIAL, f), path.join(dir, f));
    const p = path.join(dir, 'afinn.json.br');
    const b = fs.readFileSync(p);
    fs.writeFileSync(p, b.subarray(0, b.length >> 1));
    assert.throws(() => readInstructMaterial(dir), (e: unknown) => e instanceof FormatError && (e as Error).message.includes('afinn.json.br'));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('moe data instruct: writes the splits; --out is required', async () => {
  await assert.rejects(instructDataCommand(['--per-task', '5']), UsageError);
  await assert.rejects(instructDataCommand(['--out', 'x', '--per-task', '0']), UsageError);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-instruct-cli-'));
  const write = process.stdout.write;
  try {
    process.stdout.write = (() => true) as typeof process.stdout.write;
    await instructDataCommand(['--out', dir, '--per-task', '5', '--seed', '2', '--material', MATERIAL]);
  } finally {
    process.stdout.write = write;
  }
  try {
    const index = JSON.parse(fs.readFileSync(path.join(dir, 'index.json'), 'utf8')) as { seed: number; counts: Record<string, { examples: number }> };
    assert.equal(index.seed, 2);
    for (const s of ['train', 'val', 'heldout']) assert.equal(readInstructShard(path.join(dir, `${s}.instr`)).offsets.length - 1, index.counts[s]!.examples);
    assert.equal(index.counts.heldout!.examples, 5 * HELDOUT_TASKS.length);
    // The held-out tasks' fine-tuning data is a folder `moe finetune --data` reads as it is.
    for (const s of ['train', 'val']) {
      const n = index.counts[`heldout-${s}`]!.examples;
      assert.equal(readInstructShard(path.join(dir, 'heldout-tasks', `${s}.instr`)).offsets.length - 1, n);
      assert.equal(fs.readFileSync(path.join(dir, 'heldout-tasks', `${s}.jsonl`), 'utf8').trim().split('\n').length, n);
    }
    assert.equal(index.counts['heldout-train']!.examples, 5 * HELDOUT_TASKS.length);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
