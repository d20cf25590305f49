// `moe eval-tasks --model <m> --tasks <dir>`: exact match per task and per language on instruction data
// (docs/instruct-data.md). Each example's conversation up to its last assistant turn is formatted as `moe chat`
// formats it (encodeChatPrompt), answered greedily until EOS or a token budget, and compared with that turn after
// normalisation. Batched through the server's Engine (one forward pass per step over many sequences) when the model
// is a loaded Mixtral, else one sequence at a time through `generate`; both are the project's one generation loop.

import * as fs from 'node:fs';
import * as path from 'node:path';
import { FormatError } from '../formats/errors.js';
import type { LanguageModel } from '../model/types.js';
import { LoadedModel, loadModel } from '../model/load.js';
import { Engine, type EngineEvent } from '../server/engine.js';
import { isBackendName } from '../backend/select.js';
import { Progress } from '../util/progress.js';
import { ChatTemplateError, type ChatMessage } from './chat-template.js';
import { encodeChatPrompt, generate } from './generate.js';
import { INSTRUCT_LANGUAGES, INSTRUCT_TASKS } from './instruct.js';

/** Tasks whose answer is one of a few labels: their exact match is accuracy. */
export const LABEL_TASKS: readonly string[] = ['sentiment', 'langid'];

/**
 * Two-turn conversations (task "a+b" in instruct.ts: two examples chained, scored on the second answer) are reported
 * together as one task, so the few examples of each of the dozens of pairs do not each weigh as a task in the macro.
 */
export const TWO_TURN_TASK = 'two-turn';

/** The task an example is reported under: its own, or TWO_TURN_TASK for a chained "a+b" conversation. */
export function reportedTask(task: string): string {
  return task.includes('+') ? TWO_TURN_TASK : task;
}

/** Default generation budget per task: the longest reference answer (in tokens) of that task in the file, plus a margin, capped. */
export const DEFAULT_MAX_TOKENS_CAP = 256;
export function defaultTokenBudget(longestAnswerTokens: number): number {
  return Math.min(DEFAULT_MAX_TOKENS_CAP, Math.ceil(longestAnswerTokens * 1.25) + 8);
}

// ---------------------------------------------------------------------------------------------------------------
// Normalisation and matching

/**
 * The form answers are compared in: Unicode NFC; case-folded (upper- then lower-case, which folds "ß" to "ss" as
 * full case folding does); runs of whitespace (any Unicode space, newlines) collapsed to one space; trimmed; one
 * trailing period removed (and the text trimmed again).
 */
export function normalizeAnswer(s: string): string {
  let t = s.normalize('NFC').toUpperCase().toLowerCase().normalize('NFC');
  t = t.replace(/\s+/gu, ' ').trim();
  if (t.endsWith('.')) t = t.slice(0, -1).trimEnd();
  return t;
}

// A plain decimal number (after normalizeAnswer): optional sign (ASCII or U+2212 minus), digits, optional fraction.
const NUMBER = /^([+\-\u2212]?)(\d+(?:\.\d*)?|\.\d+)$/u;

/** The number a normalised answer states, or undefined when it is not a plain decimal number. */
export function parseNumberAnswer(normalized: string): number | undefined {
  const m = NUMBER.exec(normalized);
  if (!m) return undefined;
  const v = Number(m[2]);
  return m[1] === '' || m[1] === '+' ? v : -v;
}

/** Exact match after normalizeAnswer; when both sides are plain numbers, they are compared as numbers ("3" = "3.0"). */
export function answersMatch(output: string, reference: string): boolean {
  const a = normalizeAnswer(output);
  const b = normalizeAnswer(reference);
  if (a === b) return true;
  const x = parseNumberAnswer(a);
  const y = parseNumberAnswer(b);
  return x !== undefined && y !== undefined && x === y;
}

// ---------------------------------------------------------------------------------------------------------------
// Reading examples

export interface EvalExample {
  /** The task it is reported under (reportedTask of the file's task). */
  task: string;
  /** The task as the file names it (e.g. "spell+lookup"). */
  fileTask: string;
  lang: string;
  /** The conversation before the scored turn (ends with a user message). */
  prompt: ChatMessage[];
  /** The scored turn: the last assistant message's content. */
  reference: string;
  /** 1-based line in the file. */
  line: number;
}

/**
 * Reads a JSON-lines file of `{task, lang, messages}` examples (what `moe data instruct` writes). Blank lines are
 * skipped. A missing file, a line that is not JSON or lacks a field, or an example with no assistant turn throws
 * FormatError naming the file and the line.
 */
export function readEvalExamples(file: string): EvalExample[] {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new FormatError(file, code === 'ENOENT' ? 'no such file' : code === 'EISDIR' ? 'is a directory, not a .jsonl file' : `cannot read: ${(e as Error).message}`);
  }
  const out: EvalExample[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i]!.trim();
    if (raw === '') continue;
    const line = i + 1;
    const bad = (msg: string) => new FormatError(file, `line ${line}: ${msg}`);
    let v: unknown;
    try {
      v = JSON.parse(raw);
    } catch (e) {
      throw bad(`not valid JSON (${(e as Error).message})`);
    }
    if (v === null || typeof v !== 'object' || Array.isArray(v)) throw bad('expected an object {task, lang, messages}');
    const o = v as Record<string, unknown>;
    if (typeof o.task !== 'string' || o.task === '') throw bad('"task" must be a non-empty string');
    if (typeof o.lang !== 'string' || o.lang === '') throw bad('"lang" must be a non-empty string');
    if (!Array.isArray(o.messages)) throw bad('"messages" must be an array');
    const messages: ChatMessage[] = o.messages.map((m: unknown, k: number) => {
      if (m === null || typeof m !== 'object') throw bad(`messages[${k}] is not an object`);
      const { role, content } = m as Record<string, unknown>;
      if (role !== 'user' && role !== 'assistant' && role !== 'system') throw bad(`messages[${k}].role must be 'user', 'assistant' or 'system', got ${JSON.stringify(role)}`);
      if (typeof content !== 'string') throw bad(`messages[${k}].content must be a string`);
      return { role, content };
    });
    let last = -1;
    for (let k = messages.length - 1; k >= 0; k--) {
      if (messages[k]!.role === 'assistant') {
        last = k;
        break;
      }
    }
    if (last < 0) throw bad('no assistant turn: nothing to score');
    if (last === 0 || messages[last - 1]!.role !== 'user') throw bad(`messages[${last}] (the scored assistant turn) must follow a user message`);
    out.push({ task: reportedTask(o.task), fileTask: o.task, lang: o.lang, prompt: messages.slice(0, last), reference: messages[last]!.content, line });
  }
  if (out.length === 0) throw new FormatError(file, 'no examples (the file is empty)');
  return out;
}

/** The first `limit` examples of each (task, language) pair, in file order. */
export function limitPerTaskLanguage(examples: readonly EvalExample[], limit: number | undefined): EvalExample[] {
  if (limit === undefined) return examples.slice();
  const seen = new Map<string, number>();
  return examples.filter((e) => {
    const key = `${e.task}\u0000${e.lang}`;
    const n = seen.get(key) ?? 0;
    seen.set(key, n + 1);
    return n < limit;
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Answering

/** One example to answer: the prompt's token ids and the token budget. */
export interface AnswerRequest {
  example: EvalExample;
  promptIds: number[];
  maxTokens: number;
}

export interface Answer {
  /** The generated text, with the one leading space after "[/INST]" dropped (as `moe chat` shows it). */
  text: string;
  tokens: number;
  /** Why generation ended ('eos', 'length'), or 'error' with `error` set (e.g. a prompt longer than the context). */
  finishReason: string;
  error?: string;
}

/** Answers every request (in any order internally); returns the answers in request order. `onDone` counts progress. */
export type Answerer = (requests: readonly AnswerRequest[], onDone: () => void) => Promise<Answer[]>;

/**
 * Greedy answers from a model: batched through the server's Engine (continuous batching, `parallel` sequences per
 * forward pass) for a loaded Mixtral, else one at a time with `generate`.
 */
export function modelAnswerer(model: LanguageModel, opts: { parallel?: number } = {}): Answerer {
  const parallel = opts.parallel ?? 8;
  if (model instanceof LoadedModel && parallel > 1) return (reqs, onDone) => engineAnswers(model, reqs, parallel, onDone);
  return async (reqs, onDone) => {
    const out: Answer[] = [];
    for (const r of reqs) {
      const ctx = model.config.maxPositionEmbeddings;
      if (r.promptIds.length >= ctx) {
        out.push({ text: '', tokens: 0, finishReason: 'error', error: `the prompt has ${r.promptIds.length} tokens; the context holds ${ctx}` });
      } else {
        const g = await generate(model, r.promptIds, { temperature: 0, seed: 0, maxTokens: r.maxTokens, contextLength: ctx });
        out.push({ text: g.text.replace(/^ /, ''), tokens: g.tokens.length, finishReason: g.finishReason });
      }
      onDone();
    }
    return out;
  };
}

function engineAnswers(model: LoadedModel, reqs: readonly AnswerRequest[], parallel: number, onDone: () => void): Promise<Answer[]> {
  return new Promise((resolve, reject) => {
    const out: (Answer | undefined)[] = new Array(reqs.length);
    let left = reqs.length;
    if (left === 0) return resolve([]);
    const settle = (i: number, a: Answer) => {
      if (out[i] !== undefined) return;
      out[i] = a;
      onDone();
      if (--left === 0) resolve(out as Answer[]);
    };
    const onEvent = (e: EngineEvent) => {
      const i = Number(e.id);
      if (e.type === 'done') settle(i, { text: e.text.replace(/^ /, ''), tokens: e.completionTokens, finishReason: e.finishReason });
      else if (e.type === 'error') {
        // A failed forward pass is a bug or a broken model, not a wrong answer: stop the evaluation.
        if (e.status >= 500) reject(new Error(e.message));
        else settle(i, { text: '', tokens: 0, finishReason: 'error', error: e.message });
      }
    };
    const engine = new Engine(model, { parallel, maxQueue: reqs.length, contextLength: model.config.maxPositionEmbeddings }, onEvent);
    reqs.forEach((r, i) => engine.submit({ id: String(i), promptIds: r.promptIds, maxTokens: r.maxTokens, stop: [], sampling: { temperature: 0, seed: 0 }, trace: false }));
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Scoring

export interface Score {
  examples: number;
  correct: number;
  /** correct / examples, in [0, 1]. */
  exactMatch: number;
}

export interface Sample {
  lang: string;
  /** The file's task name (differs from the row's for two-turn conversations). */
  fileTask: string;
  line: number;
  prompt: string;
  reference: string;
  output: string;
  correct: boolean;
}

export interface TaskReport extends Score {
  task: string;
  /** 'label': the answer is one of a few labels, so exact match is accuracy. */
  kind: 'label' | 'exact';
  /** Generation budget used for this task's examples. */
  maxTokens: number;
  /** Examples that could not be answered (counted wrong), e.g. a prompt longer than the context. */
  errors: number;
  byLang: Record<string, Score>;
  /** The first few examples of the task, in file order, with the model's output. */
  samples: Sample[];
}

export interface EvalTasksReport {
  file: string;
  model?: string;
  /** Examples scored, over all tasks. */
  examples: number;
  generatedTokens: number;
  /** Per language: the macro average over tasks of that language's exact match, and the example count. */
  languages: Record<string, Score & { macroExactMatch: number }>;
  tasks: TaskReport[];
  /** Macro average of the tasks' exact match (each task weighs the same), and the plain share of correct answers. */
  overall: { macroExactMatch: number; microExactMatch: number; examples: number; correct: number };
}

const score = (examples: number, correct: number): Score => ({ examples, correct, exactMatch: examples > 0 ? correct / examples : 0 });
const mean = (xs: readonly number[]) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : 0);

/** Known tasks and languages in the order of instruct.ts (two-turn after the single tasks), then others alphabetically. */
function ordered(keys: Iterable<string>, known: readonly string[]): string[] {
  const rank = (k: string) => (known.includes(k) ? known.indexOf(k) : Infinity);
  return [...new Set(keys)].sort((a, b) => rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0));
}

export function scoreAnswers(
  examples: readonly EvalExample[],
  answers: readonly Answer[],
  opts: { file: string; model?: string; maxTokens: ReadonlyMap<string, number>; samplesPerTask?: number },
): EvalTasksReport {
  if (answers.length !== examples.length) throw new Error(`scoreAnswers: ${answers.length} answers for ${examples.length} examples`);
  const nSamples = opts.samplesPerTask ?? 3;
  const tasks: TaskReport[] = [];
  const right = examples.map((e, i) => answersMatch(answers[i]!.text, e.reference));
  const ok = (i: number) => right[i]!;
  for (const task of ordered(examples.map((e) => e.task), [...INSTRUCT_TASKS, TWO_TURN_TASK])) {
    const idx = examples.map((_, i) => i).filter((i) => examples[i]!.task === task);
    const byLang: Record<string, Score> = {};
    for (const lang of ordered(idx.map((i) => examples[i]!.lang), INSTRUCT_LANGUAGES)) {
      const li = idx.filter((i) => examples[i]!.lang === lang);
      byLang[lang] = score(li.length, li.filter(ok).length);
    }
    tasks.push({
      task,
      kind: LABEL_TASKS.includes(task) ? 'label' : 'exact',
      maxTokens: opts.maxTokens.get(task) ?? 0,
      ...score(idx.length, idx.filter(ok).length),
      errors: idx.filter((i) => answers[i]!.finishReason === 'error').length,
      byLang,
      samples: idx.slice(0, nSamples).map((i) => {
        const e = examples[i]!;
        return { lang: e.lang, fileTask: e.fileTask, line: e.line, prompt: e.prompt[e.prompt.length - 1]!.content, reference: e.reference, output: answers[i]!.text, correct: ok(i) };
      }),
    });
  }
  const languages: EvalTasksReport['languages'] = {};
  for (const lang of ordered(examples.map((e) => e.lang), INSTRUCT_LANGUAGES)) {
    const per = tasks.map((t) => t.byLang[lang]).filter((s): s is Score => s !== undefined);
    const n = per.reduce((a, s) => a + s.examples, 0);
    const c = per.reduce((a, s) => a + s.correct, 0);
    languages[lang] = { ...score(n, c), macroExactMatch: mean(per.map((s) => s.exactMatch)) };
  }
  const correct = tasks.reduce((a, t) => a + t.correct, 0);
  return {
    file: opts.file,
    ...(opts.model !== undefined ? { model: opts.model } : {}),
    examples: examples.length,
    generatedTokens: answers.reduce((a, x) => a + x.tokens, 0),
    languages,
    tasks,
    overall: { macroExactMatch: mean(tasks.map((t) => t.exactMatch)), microExactMatch: examples.length ? correct / examples.length : 0, examples: examples.length, correct },
  };
}

// ---------------------------------------------------------------------------------------------------------------
// The whole evaluation

export interface EvalTasksOptions {
  /** Keep the first N examples of each (task, language), in file order. */
  limit?: number;
  /** Generation budget for every example; default per task: defaultTokenBudget(longest reference answer of the task in the file). */
  maxTokens?: number;
  /** Sequences decoded together (Engine batching); 1 = one at a time. Default 8. */
  parallel?: number;
  /** Use this instead of the model's greedy answers (tests). */
  answerer?: Answerer;
  samplesPerTask?: number;
  /** Draw the progress line even when stderr is not a TTY. */
  progress?: boolean;
  /** The file's examples, when already read (readEvalExamples). */
  examples?: EvalExample[];
}

/**
 * Scores `model` on the examples of `file`. The prompt is the chat-template rendering of the conversation before
 * the last assistant turn, exactly as `moe chat` builds it; the same model and file give the same report.
 */
export async function evaluateTasks(model: LanguageModel & { path?: string }, file: string, opts: EvalTasksOptions = {}): Promise<EvalTasksReport> {
  const all = opts.examples ?? readEvalExamples(file);
  // Budgets come from the whole file, so a --limit run answers its examples exactly as the full run does.
  const maxTokens = new Map<string, number>();
  for (const e of all) {
    const n = opts.maxTokens ?? defaultTokenBudget(model.tokenizer.encode(e.reference, { addBos: false }).length + 1);
    maxTokens.set(e.task, Math.max(maxTokens.get(e.task) ?? 0, n));
  }
  const examples = limitPerTaskLanguage(all, opts.limit);
  const requests: AnswerRequest[] = examples.map((e) => {
    let promptIds: number[];
    try {
      promptIds = encodeChatPrompt(model, e.prompt);
    } catch (err) {
      if (err instanceof ChatTemplateError) throw new FormatError(file, `line ${e.line}: ${err.message}`);
      throw err;
    }
    return { example: e, promptIds, maxTokens: maxTokens.get(e.task)! };
  });
  const answerer = opts.answerer ?? modelAnswerer(model, opts.parallel !== undefined ? { parallel: opts.parallel } : {});
  const bar = new Progress({ label: `eval-tasks ${path.basename(file)}`, total: requests.length, unit: 'items', itemName: 'examples', force: opts.progress === true });
  let answers: Answer[];
  try {
    answers = await answerer(requests, () => bar.tick());
  } catch (e) {
    bar.abandon();
    throw e;
  }
  bar.finish();
  return scoreAnswers(examples, answers, { file, ...(model.path !== undefined ? { model: model.path } : {}), maxTokens, ...(opts.samplesPerTask !== undefined ? { samplesPerTask: opts.samplesPerTask } : {}) });
}

const pct = (x: number) => (100 * x).toFixed(1);

/** The report as a markdown table: exact match (%) per task (rows) and language (columns), macro averages last. */
export function formatEvalTasksTable(r: EvalTasksReport): string {
  const langs = Object.keys(r.languages);
  const lines = [
    `Exact match (%), greedy, on ${r.file}${r.model !== undefined ? ` with ${r.model}` : ''}: ${r.examples} examples.`,
    '',
    `| task | kind | examples | ${langs.join(' | ')} | all |`,
    `| --- | --- | ---: | ${langs.map(() => '---:').join(' | ')} | ---: |`,
  ];
  for (const t of r.tasks) {
    const cells = langs.map((l) => (t.byLang[l] ? pct(t.byLang[l]!.exactMatch) : '–'));
    lines.push(`| ${t.task} | ${t.kind === 'label' ? 'accuracy' : 'exact match'} | ${t.examples} | ${cells.join(' | ')} | ${pct(t.exactMatch)} |`);
  }
  lines.push(`| **macro average over tasks** | | ${r.examples} | ${langs.map((l) => pct(r.languages[l]!.macroExactMatch)).join(' | ')} | **${pct(r.overall.macroExactMatch)}** |`);
  const errors = r.tasks.reduce((a, t) => a + t.errors, 0);
  if (errors > 0) lines.push('', `${errors} examples could not be answered (prompt longer than the context) and count as wrong.`);
  return lines.join('\n') + '\n';
}

// ---------------------------------------------------------------------------------------------------------------
// CLI

export const EVAL_TASKS_USAGE =
  'eval-tasks --model <m> --tasks <dir> [--split heldout|val|train|<file.jsonl>] [--limit N] [--max-tokens N] [--parallel N] [--json] [--threads N] [--backend auto|native|ref]';

/** The split's file: `<tasks>/<split>.jsonl` for a split name; a path ending in .jsonl as given (relative to --tasks when it is there). */
export function resolveSplitFile(tasksDir: string | undefined, split: string): string {
  if (split.endsWith('.jsonl')) {
    if (tasksDir !== undefined && !path.isAbsolute(split) && fs.existsSync(path.join(tasksDir, split))) return path.join(tasksDir, split);
    return split;
  }
  if (tasksDir === undefined) throw new Error('--tasks is required unless --split names a .jsonl file');
  return path.join(tasksDir, `${split}.jsonl`);
}

export async function evalTasksCommand(argv: string[], io: { out: (s: string) => void } = { out: (s) => process.stdout.write(s) }): Promise<void> {
  const { parse, intArg, required, UsageError } = await import('../cli/args.js');
  const { values } = parse(argv, {
    model: { type: 'string' },
    tasks: { type: 'string' },
    split: { type: 'string' },
    limit: { type: 'string' },
    'max-tokens': { type: 'string' },
    parallel: { type: 'string' },
    json: { type: 'boolean' },
    threads: { type: 'string' },
    backend: { type: 'string' },
  });
  const s = (k: string) => values[k] as string | undefined;
  const split = s('split') ?? 'heldout';
  if (!split.endsWith('.jsonl') && !/^[\w.-]+$/.test(split)) throw new UsageError(`--split must be heldout, val, train or a .jsonl file, got '${split}'`);
  if (!split.endsWith('.jsonl') && s('tasks') === undefined) throw new UsageError(`--tasks is required: moe ${EVAL_TASKS_USAGE}`);
  const file = resolveSplitFile(s('tasks'), split);
  const backend = s('backend');
  if (backend !== undefined && !isBackendName(backend)) throw new UsageError(`--backend must be auto, native or ref, got '${backend}'`);
  const limit = s('limit') !== undefined ? intArg('limit', s('limit'), 0, 1) : undefined;
  const maxTokens = s('max-tokens') !== undefined ? intArg('max-tokens', s('max-tokens'), 0, 1) : undefined;
  const parallel = intArg('parallel', s('parallel'), 8, 1);
  const threads = intArg('threads', s('threads'), 0, 0);
  // Read the examples before the (slow) model load, so a bad file fails at once.
  const examples = readEvalExamples(file);
  const model = loadModel(required('model', s('model')), { threads, ...(backend !== undefined ? { backend } : {}) });
  const report = await evaluateTasks(model, file, { parallel, examples, ...(limit !== undefined ? { limit } : {}), ...(maxTokens !== undefined ? { maxTokens } : {}) });
  io.out(values.json ? JSON.stringify(report) + '\n' : formatEvalTasksTable(report));
}
