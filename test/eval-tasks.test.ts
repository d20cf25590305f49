import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FormatError } from '../src/formats/errors.js';
import { loadModel } from '../src/model/load.js';
import type { ChatMessage } from '../src/workflows/chat-template.js';
import { encodeChatPrompt, generate } from '../src/workflows/generate.js';
import {
  answersMatch,
  defaultTokenBudget,
  evalTasksCommand,
  evaluateTasks,
  formatEvalTasksTable,
  normalizeAnswer,
  readEvalExamples,
  type AnswerRequest,
  type EvalTasksReport,
} from '../src/workflows/eval-tasks.js';
import { assertFormatError } from './helpers/assert-format-error.js';
import { FakeModel, FakeTokenizer, oneHot } from './helpers/fake-lm.js';

const MICRO = fileURLToPath(new URL('../../test/fixtures/micro/micro-f32.gguf', import.meta.url));
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-eval-tasks-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));

interface Row {
  task: string;
  lang: string;
  messages: ChatMessage[];
}
const qa = (task: string, lang: string, q: string, a: string): Row => ({ task, lang, messages: [{ role: 'user', content: q }, { role: 'assistant', content: a }] });

function writeJsonl(name: string, rows: readonly (Row | string)[]): string {
  const f = path.join(tmp, name);
  fs.writeFileSync(f, rows.map((r) => (typeof r === 'string' ? r : JSON.stringify(r))).join('\n') + '\n');
  return f;
}

test('normalisation: NFC, case fold, whitespace, one trailing period', () => {
  const cases: [string, string][] = [
    ['  Paris. ', 'paris'],
    ['Hello   World\n', 'hello world'],
    ['a\u00a0\tb', 'a b'], // no-break space and tab are whitespace too
    ['Stra\u00dfe', 'strasse'], // ß folds to ss, as full case folding does
    ['e\u0301t\u00e9', '\u00e9t\u00e9'], // decomposed é composes
    ['Wait...', 'wait..'], // only one period goes
    ['Positive !', 'positive !'],
    ['Ein Haus .', 'ein haus'],
    ['', ''],
    ['.', ''],
  ];
  for (const [input, want] of cases) assert.equal(normalizeAnswer(input), want, JSON.stringify(input));
});

test('matching: exact after normalisation, numbers as numbers when both parse', () => {
  const cases: [string, string, boolean][] = [
    ['positive.', 'Positive', true],
    ['POSITIVE', 'positive', true],
    ['positive!', 'positive', false],
    ['Flagge: Dominikanische Republik', 'flagge:  dominikanische republik.', true],
    ['Flagge: Dominikanische', 'Flagge: Dominikanische Republik', false],
    ['5.0', '5', true],
    ['007', '7', true],
    ['.5', '0.5', true],
    ['\u22124', '-4', true], // U+2212 minus sign
    ['+3', '3', true],
    ['-4', '4', false],
    ['4.', '4', true],
    ['12', '13', false],
    ['three', '3', false],
    ['1,5', '1.5', false], // a decimal comma is not read as a number
    ['3 apples', '3', false],
    ['', '0', false],
    ['Fran\u00e7ais', 'francais', false], // accents matter
  ];
  for (const [out, ref, want] of cases) assert.equal(answersMatch(out, ref), want, `${JSON.stringify(out)} vs ${JSON.stringify(ref)}`);
});

test('reading: missing file, bad JSON (with its line number), missing fields, no assistant turn, empty file', () => {
  assertFormatError(() => readEvalExamples(path.join(tmp, 'nope.jsonl')), 'nope.jsonl', 'no such file');
  assertFormatError(() => readEvalExamples(tmp), 'directory');
  const good = qa('arithmetic', 'en', '1 + 1?', '2');
  // A blank line 2 still counts: the bad JSON is on line 3.
  assertFormatError(() => readEvalExamples(writeJsonl('bad-json.jsonl', [good, '', '{"task": "x",'])), 'bad-json.jsonl', 'line 3', 'not valid JSON');
  assertFormatError(() => readEvalExamples(writeJsonl('no-task.jsonl', [good, { lang: 'en', messages: [] } as unknown as Row])), 'line 2', '"task"');
  assertFormatError(() => readEvalExamples(writeJsonl('no-msgs.jsonl', [{ task: 't', lang: 'en', messages: 'hi' } as unknown as Row])), 'line 1', '"messages" must be an array');
  assertFormatError(() => readEvalExamples(writeJsonl('bad-role.jsonl', [{ task: 't', lang: 'en', messages: [{ role: 'bot', content: 'x' }] } as unknown as Row])), 'line 1', 'messages[0].role');
  assertFormatError(
    () => readEvalExamples(writeJsonl('no-answer.jsonl', [good, good, { task: 't', lang: 'en', messages: [{ role: 'user', content: 'hi' }] }])),
    'line 3',
    'no assistant turn',
  );
  assertFormatError(() => readEvalExamples(writeJsonl('assistant-first.jsonl', [{ task: 't', lang: 'en', messages: [{ role: 'assistant', content: 'x' }] }])), 'line 1', 'must follow a user message');
  assertFormatError(() => readEvalExamples(writeJsonl('empty.jsonl', [])), 'no examples');
  // A trailing user turn after the last answer is not part of the scored conversation.
  const [e] = readEvalExamples(writeJsonl('trailing.jsonl', [{ task: 't', lang: 'en', messages: [...good.messages, { role: 'user', content: 'and?' }] }]));
  assert.deepEqual(e!.prompt, [good.messages[0]]);
  assert.equal(e!.reference, '2');
  assert.equal(e!.line, 1);
});

/**
 * A fake model that answers from a lookup: for a prompt it knows (by token ids), it emits the answer's tokens then
 * EOS; so the scores of a file are known in advance, and a scorer or generator that got them wrong would show.
 */
function lookupModel(answers: ReadonlyMap<string, string>): { model: FakeModel; tok: FakeTokenizer } {
  const tok = new FakeTokenizer(['\u2581', '[INST]', '[/INST]']);
  const table: { prompt: number[]; answer: number[] }[] = [];
  const model = new FakeModel(tok, (seen) => {
    const hit = table.find((t) => t.prompt.length <= seen.length && t.prompt.every((x, i) => seen[i] === x));
    if (!hit) return oneHot(tok.vocabSize, tok.eosId);
    return oneHot(tok.vocabSize, hit.answer[seen.length - hit.prompt.length] ?? tok.eosId);
  }, 512);
  for (const [user, answer] of answers) {
    // The model answers the last user message; earlier turns (two-turn examples) come from the file.
    const messages = JSON.parse(user) as ChatMessage[];
    table.push({ prompt: encodeChatPrompt(model, messages), answer: tok.encode(' ' + answer).slice(1) });
  }
  return { model, tok };
}

test('scores per task and language on a hand-made file, with a model answering from a lookup', async () => {
  // Two-turn conversations (task "a+b" in the file) are scored on the second answer and reported as one task.
  const two: Row = {
    task: 'arithmetic+spell',
    lang: 'en',
    messages: [
      { role: 'user', content: 'What is 2 + 2?' },
      { role: 'assistant', content: '4' },
      { role: 'user', content: 'Spell "cat".' },
      { role: 'assistant', content: 'c a t' },
    ],
  };
  const two2: Row = {
    task: 'spell+sentiment',
    lang: 'fr',
    messages: [
      { role: 'user', content: 'Épelle « chien ».' },
      { role: 'assistant', content: 'c h i e n' },
      { role: 'user', content: '« gentil » : positif ou négatif ?' },
      { role: 'assistant', content: 'Positif' },
    ],
  };
  const rows: Row[] = [
    qa('sentiment', 'en', 'Is "good" positive or negative?', 'Positive'),
    qa('arithmetic', 'en', 'What is 2 + 3?', '5'),
    qa('sentiment', 'fr', '« bon » : positif ou négatif ?', 'Positif'),
    qa('sentiment', 'en', 'Is "bad" positive or negative?', 'Negative'),
    qa('arithmetic', 'de', 'Was ist 7 - 9?', '-2'),
    two,
    qa('sentiment', 'fr', '« mauvais » : positif ou négatif ?', 'Négatif'),
    qa('arithmetic', 'de', 'Was ist 3 × 4?', '12'),
    two2,
  ];
  const file = writeJsonl('scored.jsonl', rows);
  const key = (m: ChatMessage[]) => JSON.stringify(m);
  const replies = new Map<string, string>([
    [key(rows[0]!.messages.slice(0, 1)), 'positive.'], // right (case, period)
    [key(rows[1]!.messages.slice(0, 1)), '5.0'], // right (as a number)
    [key(rows[2]!.messages.slice(0, 1)), 'Positif'], // right
    [key(rows[3]!.messages.slice(0, 1)), 'Positive'], // wrong
    [key(rows[4]!.messages.slice(0, 1)), '2'], // wrong
    [key(two.messages.slice(0, 3)), 'C a  t'], // right; the prompt holds the first turn's reference answer
    [key(rows[6]!.messages.slice(0, 1)), 'Negatif'], // wrong (accent)
    [key(rows[7]!.messages.slice(0, 1)), 'twelve'], // wrong
    [key(two2.messages.slice(0, 3)), 'Négatif'], // wrong
  ]);
  const { model, tok } = lookupModel(replies);
  const r = await evaluateTasks(model, file, { parallel: 1 });

  assert.deepEqual(r.tasks.map((t) => [t.task, t.kind, t.examples, t.correct]), [
    ['arithmetic', 'exact', 3, 1],
    ['sentiment', 'label', 4, 2],
    ['two-turn', 'exact', 2, 1],
  ]);
  const sentiment = r.tasks.find((t) => t.task === 'sentiment')!;
  assert.deepEqual(sentiment.byLang, { en: { examples: 2, correct: 1, exactMatch: 0.5 }, fr: { examples: 2, correct: 1, exactMatch: 0.5 } });
  const arithmetic = r.tasks.find((t) => t.task === 'arithmetic')!;
  assert.deepEqual(arithmetic.byLang, { en: { examples: 1, correct: 1, exactMatch: 1 }, de: { examples: 2, correct: 0, exactMatch: 0 } });
  // Macro over tasks: (1/3 + 2/4 + 1/2) / 3; per language, macro over that language's tasks.
  assert.equal(r.overall.macroExactMatch, (1 / 3 + 0.5 + 0.5) / 3);
  assert.equal(r.overall.microExactMatch, 4 / 9);
  assert.deepEqual([r.overall.examples, r.overall.correct, r.examples], [9, 4, 9]);
  assert.deepEqual(Object.keys(r.languages), ['en', 'fr', 'de']);
  assert.equal(r.languages.en!.macroExactMatch, (1 + 0.5 + 1) / 3);
  assert.deepEqual([r.languages.en!.examples, r.languages.en!.correct], [4, 3]);
  assert.equal(r.languages.fr!.macroExactMatch, (0.5 + 0) / 2);
  assert.equal(r.languages.de!.macroExactMatch, 0);
  // Samples: the task's first examples in file order, with what the model said (the leading space dropped).
  assert.deepEqual(sentiment.samples.map((s) => [s.line, s.output, s.correct]), [[1, 'positive.', true], [3, 'Positif', true], [4, 'Positive', false]]);
  const twoTurn = r.tasks.find((t) => t.task === 'two-turn')!;
  assert.deepEqual(twoTurn.samples.map((s) => [s.fileTask, s.output, s.correct]), [['arithmetic+spell', 'C a  t', true], ['spell+sentiment', 'Négatif', false]]);
  assert.deepEqual(twoTurn.byLang, { en: { examples: 1, correct: 1, exactMatch: 1 }, fr: { examples: 1, correct: 0, exactMatch: 0 } });
  // Budgets: from each task's longest reference answer (in tokens, plus EOS).
  const longest = (task: string) => Math.max(...rows.filter((x) => x.task === task || (task === 'two-turn' && x.task.includes('+'))).map((x) => tok.encode(x.messages.at(-1)!.content).length + 1));
  assert.equal(sentiment.maxTokens, defaultTokenBudget(longest('sentiment')));
  assert.equal(arithmetic.maxTokens, defaultTokenBudget(longest('arithmetic')));
  assert.equal(twoTurn.maxTokens, defaultTokenBudget(longest('two-turn')));

  const table = formatEvalTasksTable(r);
  assert.match(table, /^\| arithmetic \| exact match \| 3 \| 100\.0 \| – \| 0\.0 \| 33\.3 \|$/m);
  assert.match(table, /^\| sentiment \| accuracy \| 4 \| 50\.0 \| 50\.0 \| – \| 50\.0 \|$/m);
  assert.match(table, /^\| two-turn \| exact match \| 2 \| 100\.0 \| 0\.0 \| – \| 50\.0 \|$/m);
  assert.match(table, /^\| \*\*macro average over tasks\*\* \| \| 9 \| 83\.3 \| 25\.0 \| 0\.0 \| \*\*44\.4\*\* \|$/m);

  // --limit 1: the first example of each (task, language), in file order.
  const seen: AnswerRequest[] = [];
  const limited = await evaluateTasks(model, file, {
    limit: 1,
    answerer: async (reqs, onDone) => {
      seen.push(...reqs);
      return reqs.map(() => (onDone(), { text: '', tokens: 0, finishReason: 'eos' }));
    },
  });
  assert.deepEqual(seen.map((q) => q.example.line), [1, 2, 3, 5, 6, 9]);
  assert.deepEqual(seen.map((q) => q.promptIds), seen.map((q) => encodeChatPrompt(model, q.example.prompt)));
  assert.equal(limited.examples, 6);
  // Budgets do not depend on --limit (so a limited run answers exactly as the full run does).
  assert.equal(seen.find((q) => q.example.task === 'sentiment')!.maxTokens, sentiment.maxTokens);

  // --max-tokens caps generation: the lookup model's answers are cut to 1 token.
  const short = await evaluateTasks(model, file, { maxTokens: 1, parallel: 1 });
  assert.equal(short.generatedTokens, 9);
  assert.ok(short.tasks.every((t) => t.maxTokens === 1));
});

test('a conversation the chat template refuses is a FormatError naming the line', async () => {
  const { model } = lookupModel(new Map());
  const f = writeJsonl('bad-order.jsonl', [
    qa('t', 'en', 'q', 'a'),
    { task: 't', lang: 'en', messages: [{ role: 'user', content: 'a' }, { role: 'user', content: 'b' }, { role: 'assistant', content: 'c' }] },
  ]);
  await assert.rejects(evaluateTasks(model, f), (e: unknown) => e instanceof FormatError && /line 2/.test(e.message) && /alternate/.test(e.message));
});

test('end to end on the micro model: report shape, determinism, batched = one at a time = moe generate --chat greedy', async () => {
  const rows: Row[] = [
    qa('sentiment', 'en', 'Is the English word "happy" positive or negative?', 'Positive'),
    qa('letter_count', 'fr', 'Combien de « a » dans « banane » ?', '2'),
    qa('sentiment', 'de', 'Ist das englische Wort "sad" positiv oder negativ?', 'Negativ'),
    qa('emoji_name', 'es', '¿Qué muestra el emoji 🍎?', 'Manzana roja'),
    qa('letter_count', 'fr', 'Combien de « n » dans « banane » ?', '2'),
  ];
  const dir = path.join(tmp, 'tasks');
  fs.mkdirSync(dir);
  fs.writeFileSync(path.join(dir, 'heldout.jsonl'), rows.map((r) => JSON.stringify(r)).join('\n') + '\n');
  const run = async (extra: string[]) => {
    let out = '';
    await evalTasksCommand(['--model', MICRO, '--tasks', dir, '--backend', 'ref', '--max-tokens', '6', ...extra], { out: (s) => (out += s) });
    return out;
  };
  const a = await run(['--json']);
  const b = await run(['--json']);
  assert.equal(a, b, 'two runs give the same report');
  const r = JSON.parse(a) as EvalTasksReport;
  assert.equal(r.examples, 5);
  assert.equal(r.file, path.join(dir, 'heldout.jsonl'));
  assert.deepEqual(r.tasks.map((t) => [t.task, t.examples, t.maxTokens, t.samples.length]), [['sentiment', 2, 6, 2], ['letter_count', 2, 6, 2], ['emoji_name', 1, 6, 1]]);
  assert.deepEqual(Object.keys(r.languages), ['en', 'fr', 'de', 'es']);
  for (const t of r.tasks) {
    assert.equal(t.correct, t.samples.filter((s) => s.correct).length);
    assert.equal(t.exactMatch, t.correct / t.examples);
  }
  assert.ok(r.generatedTokens >= 5 && r.generatedTokens <= 30, `generated ${r.generatedTokens}`);

  // The Engine's batches change nothing: one at a time gives the same report, and so does generate() greedy.
  assert.equal(await run(['--json', '--parallel', '1']), a);
  const m = loadModel(MICRO, { backend: 'ref' });
  const outputs = r.tasks.flatMap((t) => t.samples.map((s) => [s.line, s.output] as const)).sort((x, y) => x[0] - y[0]);
  for (const [line, output] of outputs) {
    const g = await generate(m, encodeChatPrompt(m, rows[line - 1]!.messages.slice(0, 1)), { temperature: 0, maxTokens: 6 });
    assert.equal(output, g.text.replace(/^ /, ''), `line ${line}`);
  }

  // --limit 1 keeps the first of each (task, language); the table names every task and a macro row.
  const table = await run(['--limit', '1']);
  assert.match(table, /: 4 examples\./);
  for (const t of ['sentiment', 'letter_count', 'emoji_name', '\\*\\*macro average over tasks\\*\\*']) assert.match(table, new RegExp(`^\\| ${t} \\|`, 'm'));

  // Bad input through the command: clear errors before any model work.
  await assert.rejects(evalTasksCommand(['--model', MICRO, '--tasks', dir, '--split', 'val']), (e: unknown) => e instanceof FormatError && /val\.jsonl: no such file/.test(e.message));
  await assert.rejects(evalTasksCommand(['--model', MICRO]), /--tasks is required/);
  await assert.rejects(evalTasksCommand(['--model', MICRO, '--tasks', dir, '--limit', '0']), /--limit must be an integer >= 1/);
});
