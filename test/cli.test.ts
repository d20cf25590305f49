/**
 * End-to-end tests of the `moe` command line: the built CLI (bin/moe.js) runs as a child process, and what it prints
 * is checked against the library, against readers nobody here wrote (gguf-py's view of the micro files, stored
 * llama.cpp logits, npm mistral-tokenizer-js) and against counts made here from the tensor shapes.
 * The model with the real Mistral v1 vocabulary is the default model `moe start` runs (models/, committed).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadModel, type LoadedModel } from '../src/model/load.js';
import { readGGUF, GGUFWriter } from '../src/formats/gguf.js';
import { encodeChatPrompt, generate, type GenerateOptions } from '../src/workflows/generate.js';
import type { ChatMessage } from '../src/workflows/chat-template.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const BIN = path.join(ROOT, 'bin', 'moe.js');
const fixture = (p: string) => fileURLToPath(new URL(`../../test/fixtures/${p}`, import.meta.url));
const MICRO = fixture('micro/micro-f32.gguf');
const MICRO_Q4 = fixture('micro/micro-q4_0.gguf');
const MICRO_HF = fixture('micro/hf');

// The package ships no types; import it by a name TypeScript does not resolve.
const mistralPkg = 'mistral-tokenizer-js';
const { default: mistralTokenizer } = (await import(mistralPkg)) as {
  default: { encode(text: string, addBos: boolean, addPrecedingSpace: boolean): number[] };
};

let tmp = '';
let cache = '';
const DEFAULT_MODEL = path.join(ROOT, 'models', 'moe-ts-instruct-moe-f16.gguf');
let env: NodeJS.ProcessEnv = {};

interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `moe args...` with `input` on stdin (an empty, closed pipe by default). */
function moe(args: string[], input = ''): Run {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', input, timeout: 60_000, env, cwd: ROOT, maxBuffer: 64 << 20 });
  if (r.error) throw r.error;
  assert.equal(r.signal, null, `moe ${args.join(' ')} was killed by ${r.signal}`);
  return { status: r.status, stdout: r.stdout, stderr: withoutBackendNotice(r.stderr) };
}

/** Drops the one-line notice that a build without the native addon prints (select.ts); tests run with either. */
function withoutBackendNotice(stderr: string): string {
  return stderr.replace(/^moe-ts: using the slow ref backend.*\n/m, '');
}

/** Runs a command that must succeed; returns its stdout. */
function ok(args: string[], input = ''): string {
  const r = moe(args, input);
  assert.equal(r.status, 0, `moe ${args.join(' ')} failed (${r.status}): ${r.stderr}`);
  return r.stdout;
}

function json<T = any>(args: string[], input = ''): T {
  return JSON.parse(ok(args, input)) as T;
}

/** A failing command: exit code, a first stderr line matching `message`, nothing on stdout, no stack trace. */
function fails(args: string[], message: RegExp, opts: { status?: number; input?: string; stdout?: string } = {}): string {
  const r = moe(args, opts.input ?? '');
  const what = `moe ${args.join(' ').slice(0, 120)}`;
  assert.notEqual(r.status, 0, `${what} should fail; stdout: ${r.stdout.slice(0, 200)}`);
  if (opts.status !== undefined) assert.equal(r.status, opts.status, `${what}: exit code; stderr: ${r.stderr}`);
  assert.equal(r.stdout, opts.stdout ?? '', `${what}: stdout`);
  const first = r.stderr.split('\n')[0];
  assert.match(first, message, `${what}: first stderr line`);
  assert.ok(first.length < 400, `${what}: the message is one short line: ${first}`);
  assert.doesNotMatch(r.stderr, /^\s+at /m, `${what}: a stack trace leaked: ${r.stderr}`);
  assert.doesNotMatch(r.stderr, /^(\w*Error|node:internal)/m, `${what}: an uncaught error: ${r.stderr}`);
  return r.stderr;
}

const modelCache = new Map<string, LoadedModel>();
const lib = (p: string): LoadedModel => {
  let m = modelCache.get(p);
  if (!m) modelCache.set(p, (m = loadModel(p)));
  return m;
};

function argmax(row: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

const product = (xs: readonly number[]) => xs.reduce((a, b) => a * b, 1);

/** Total and active parameters from tensor shapes alone: active drops (E-k)/E of the expert tensors. */
function countParameters(tensors: { name: string; shape: readonly number[] }[], E: number, k: number) {
  let total = 0;
  let experts = 0;
  for (const t of tensors) {
    const n = product(t.shape);
    total += n;
    if (/\.ffn_(gate|up|down)_exps\.weight$/.test(t.name)) experts += n;
  }
  assert.ok(experts > 0, 'the model has stacked expert tensors');
  return { total, active: total - (experts * (E - k)) / E };
}

// First run of `moe start` (empty stdin); the tests below check its output.
let firstStart: Run;
before(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-cli-test-'));
  cache = path.join(tmp, 'cache');
  env = { ...process.env, MOE_CACHE_DIR: cache };
  delete env.MOE_DEBUG; // it turns on stack traces, which these tests check are absent
  delete env.MOE_DEFAULT_MODEL;
  firstStart = moe(['start']); // exactly what `npm start` runs
});

after(() => {
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------------------------
// start (what `npm start` runs)

const DEFAULT_NOTICE = /moe-ts-instruct-moe, the project's own tiny MoE[\s\S]*instruction-tuned[\s\S]*docs\/instruct-tuning\.md/;

test('start with empty stdin: runs the committed default model, says what it is on stderr, runs one demo generation', () => {
  assert.equal(firstStart.status, 0, firstStart.stderr);
  assert.match(firstStart.stderr, DEFAULT_NOTICE);
  assert.ok(!fs.existsSync(cache) || fs.readdirSync(cache).length === 0, 'nothing is downloaded or written');
  const lines = firstStart.stdout.split('\n');
  assert.match(lines[0], /^> \S/, 'echoes the demo prompt');
  const m = /\[(\d+) tokens, prefill [\d.]+ tok\/s, decode [\d.]+ tok\/s\]/.exec(firstStart.stdout);
  assert.ok(m, firstStart.stdout);
  assert.ok(+m[1] >= 1, m[0]);
  assert.doesNotMatch(firstStart.stderr, /^\s+at /m);
});

test('start with a prompt piped: answers it with the default model, greedy = `moe generate --chat` on the same file', () => {
  const q = 'Quelle langue est-ce ? Der Text wird in der Tabelle angezeigt.';
  const r = moe(['start', '--max-tokens', '8', '--temperature', '0'], `${q}\n`);
  assert.equal(r.status, 0, r.stderr);
  assert.ok(r.stdout.startsWith(`> ${q}\n`), r.stdout);
  // The answer, then one stats line for the one prompt line.
  const m = /^> [^\n]*\n([^]*)\n\[(\d+) tokens, prefill [\d.]+ tok\/s, decode [\d.]+ tok\/s\]\n$/.exec(r.stdout);
  assert.ok(m && +m[2] >= 1 && +m[2] <= 8, r.stdout);
  const g = genJson(DEFAULT_MODEL, ['--prompt', q, '--chat', '--max-tokens', '8', '--temperature', '0']);
  assert.equal(m[1], g.text.replace(/^ /, ''));
});

test('start: MOE_DEFAULT_MODEL names another model; a missing default model is a clear error', () => {
  const saved = env;
  try {
    env = { ...saved, MOE_DEFAULT_MODEL: MICRO };
    const r = moe(['start', '--max-tokens', '2'], 'hi\n');
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stderr, /default model .*micro-f32\.gguf \(MOE_DEFAULT_MODEL\)/);
    env = { ...saved, MOE_DEFAULT_MODEL: path.join(tmp, 'nope.gguf') };
    const bad = moe(['start'], 'hi\n');
    assert.notEqual(bad.status, 0);
    assert.match(bad.stderr, /default model .*nope\.gguf is missing/);
    assert.doesNotMatch(bad.stderr, /^\s+at /m);
  } finally {
    env = saved;
  }
});

test('serve without --model serves the default model; SIGTERM shuts it down', async () => {
  const child = spawn(process.execPath, [BIN, 'serve', '--port', '0'], { env, cwd: ROOT, stdio: ['ignore', 'ignore', 'pipe'] });
  try {
    let stderr = '';
    const url = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no listening line: ${stderr}`)), 60_000);
      child.stderr.on('data', (d: Buffer) => {
        stderr += d.toString('utf8');
        const m = /moe serve: (.+) on (http:\/\/\S+) /.exec(stderr);
        if (m) {
          clearTimeout(timer);
          assert.equal(m[1], DEFAULT_MODEL);
          resolve(m[2]!);
        }
      });
      child.once('exit', (code) => reject(new Error(`serve exited (${code}): ${stderr}`)));
    });
    const models = (await (await fetch(`${url}/v1/models`)).json()) as { data: { id: string; config: { numLocalExperts: number } }[] };
    assert.equal(models.data.length, 1);
    assert.equal(models.data[0]!.config.numLocalExperts, 8);
  } finally {
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    assert.equal(await exited, 0);
  }
});

// ---------------------------------------------------------------------------------------------------------------
// inspect

interface PyTensor { name: string; ggml_type: number; ne: number[] }
interface PyFile { metadata: { key: string; value: unknown }[]; tensors: PyTensor[] }
const GGUF_PY = JSON.parse(fs.readFileSync(fixture('micro/gguf-py-reference.json'), 'utf8')) as Record<string, PyFile>;
const GGML_TYPE_NAME: Record<number, string> = { 0: 'f32', 1: 'f16', 2: 'q4_0', 8: 'q8_0' };

for (const [name, file] of [['micro-f32', MICRO], ['micro-q4_0', MICRO_Q4]] as const) {
  test(`inspect --json ${name}: shapes, dtypes, parameter counts and tokenizer agree with gguf-py's reading of the file`, () => {
    const py = GGUF_PY[name];
    const meta = new Map(py.metadata.map((e) => [e.key, e.value]));
    const E = meta.get('llama.expert_count') as number;
    const k = meta.get('llama.expert_used_count') as number;
    // gguf-py's ne[] is innermost first; moe-ts shapes are row-major.
    const tensors = py.tensors.map((t) => ({ name: t.name, dtype: GGML_TYPE_NAME[t.ggml_type], shape: [...t.ne].reverse() }));
    const d = json(['inspect', file, '--json']);

    assert.match(d.architecture, new RegExp(`Mixtral.*\\b${E} experts, top-${k}\\b`));
    assert.equal(d.format, 'gguf');
    assert.equal(d.config.hiddenSize, meta.get('llama.embedding_length'));
    assert.equal(d.config.numHiddenLayers, meta.get('llama.block_count'));
    assert.equal(d.config.numLocalExperts, E);
    assert.equal(d.config.numExpertsPerTok, k);
    assert.deepEqual(d.tensors, tensors);
    const dtypes: Record<string, number> = {};
    for (const t of tensors) dtypes[t.dtype] = (dtypes[t.dtype] ?? 0) + 1;
    assert.deepEqual(d.dtypes, dtypes);
    assert.deepEqual(d.parameters, countParameters(tensors, E, k));

    const vocab = meta.get('tokenizer.ggml.tokens') as string[];
    assert.equal(d.tokenizer.vocabSize, vocab.length);
    assert.equal(d.tokenizer.bos, meta.get('tokenizer.ggml.bos_token_id'));
    assert.equal(d.tokenizer.eos, meta.get('tokenizer.ggml.eos_token_id'));
    assert.equal(d.tokenizer.unk, meta.get('tokenizer.ggml.unknown_token_id'));
    assert.equal(d.chatTemplate, (meta.get('tokenizer.chat_template') as string | undefined) ?? null);
  });
}

/** Parses "484.7K" / "1.23M" / "512" as printed by `moe inspect`; returns the value and its rounding step. */
function parseCount(s: string): { value: number; step: number } {
  const m = /^([\d.]+)([KMB]?)$/.exec(s);
  assert.ok(m, s);
  const scale = { '': 1, K: 1e3, M: 1e6, B: 1e9 }[m[2] as '' | 'K' | 'M' | 'B'];
  const decimals = m[1].split('.')[1]?.length ?? 0;
  return { value: Number(m[1]) * scale, step: scale * 10 ** -decimals };
}

test('inspect (text) of micro-q4_0: architecture, parameter counts, dtypes, every tensor and the tokenizer line', () => {
  const py = GGUF_PY['micro-q4_0'];
  const meta = new Map(py.metadata.map((e) => [e.key, e.value]));
  const tensors = py.tensors.map((t) => ({ name: t.name, dtype: GGML_TYPE_NAME[t.ggml_type], shape: [...t.ne].reverse() }));
  const want = countParameters(tensors, meta.get('llama.expert_count') as number, meta.get('llama.expert_used_count') as number);
  const text = ok(['inspect', MICRO_Q4]);
  assert.match(text, /^architecture: +Mixtral \(sparse MoE: 8 experts, top-2\)$/m);
  const p = /^parameters: +(\S+) total, (\S+) active per token$/m.exec(text);
  assert.ok(p, text);
  for (const [printed, exact] of [[p[1], want.total], [p[2], want.active]] as const) {
    const { value, step } = parseCount(printed);
    assert.ok(Math.abs(value - exact) <= step / 2 + 1e-9, `${printed} is ${exact} rounded`);
  }
  const t = /^tensors: +(\d+) \((.*)\)$/m.exec(text);
  assert.ok(t, text);
  assert.equal(+t[1], tensors.length);
  for (const dt of new Set(tensors.map((x) => x.dtype))) {
    assert.ok(t[2].includes(`${dt}: ${tensors.filter((x) => x.dtype === dt).length}`), `${dt} count in "${t[2]}"`);
  }
  for (const x of tensors) assert.match(text, new RegExp(`^ +${x.name.replace(/\./g, '\\.')} +${x.dtype} +\\[${x.shape.join(', ')}\\]$`, 'm'));
  const vocab = (meta.get('tokenizer.ggml.tokens') as string[]).length;
  assert.match(text, new RegExp(`^tokenizer: .*\\b${vocab} tokens, bos=${meta.get('tokenizer.ggml.bos_token_id')} eos=${meta.get('tokenizer.ggml.eos_token_id')} unk=${meta.get('tokenizer.ggml.unknown_token_id')}\\b`, 'm'));
});

test('inspect --json of the default model: Mistral v1 vocabulary, counts from the tensor shapes in the file', () => {
  const f = readGGUF(DEFAULT_MODEL);
  const E = f.metadata.get('llama.expert_count')!.value as number;
  const k = f.metadata.get('llama.expert_used_count')!.value as number;
  const d = json(['inspect', '--json', DEFAULT_MODEL]);
  const tensors = f.tensorInfos.map((t) => ({ name: t.name, dtype: t.dtype, shape: [...t.shape] }));
  assert.deepEqual(d.tensors, tensors);
  assert.deepEqual(d.parameters, countParameters(tensors, E, k));
  const dtypes: Record<string, number> = {};
  for (const t of tensors) dtypes[t.dtype] = (dtypes[t.dtype] ?? 0) + 1;
  assert.deepEqual(d.dtypes, dtypes);
  assert.ok(dtypes.f16! > 0, 'an f16 file');
  // Mistral v1: 32000 pieces, <unk>=0, <s>=1, </s>=2.
  assert.deepEqual(d.tokenizer, { ...d.tokenizer, vocabSize: 32000, bos: 1, eos: 2, unk: 0 });
  assert.equal(d.config.vocabSize, 32000);
  assert.match(ok(['inspect', DEFAULT_MODEL]), /chat template: built-in Mistral \[INST\]/);
});

test('an HF checkpoint directory without tokenizer files is refused with a "no tokenizer" error naming it', () => {
  for (const args of [['inspect', MICRO_HF], ['generate', '--model', MICRO_HF, '--prompt', 'hi']]) {
    const err = fails(args, /no tokenizer/i, { status: 1 });
    assert.ok(err.includes(MICRO_HF), err);
  }
});

// ---------------------------------------------------------------------------------------------------------------
// generate

const PROMPT = 'Once upon a time';

function genJson(model: string, extra: string[]) {
  const j = json(['generate', '--model', model, '--prompt', PROMPT, '--json', ...extra]);
  for (const key of ['text', 'tokens', 'prefill_tokens_per_s', 'decode_tokens_per_s']) assert.ok(key in j, `JSON has ${key}`);
  assert.equal(typeof j.text, 'string');
  assert.ok(Array.isArray(j.tokens) && j.tokens.every((t: unknown) => Number.isInteger(t)), 'tokens are integers');
  for (const key of ['prefill_tokens_per_s', 'decode_tokens_per_s']) assert.ok(typeof j[key] === 'number' && Number.isFinite(j[key]) && j[key] >= 0, `${key}: ${j[key]}`);
  return j as { text: string; tokens: number[]; prompt_tokens?: number; prefill_tokens_per_s: number; decode_tokens_per_s: number };
}

test('generate --json, greedy: the fields, tokens.length <= N, deterministic, the argmax chain of the library forward pass', () => {
  const N = 8;
  const a = genJson(MICRO, ['--max-tokens', String(N), '--temperature', '0']);
  const b = genJson(MICRO, ['--max-tokens', String(N), '--temperature', '0']);
  assert.ok(a.tokens.length >= 1 && a.tokens.length <= N, `${a.tokens.length} tokens`);
  assert.deepEqual(b, { ...b, text: a.text, tokens: a.tokens }, 'greedy is deterministic across runs');

  // Greedy = argmax of the library's logits, token after token, until EOS or N.
  const m = lib(MICRO);
  const prompt = m.tokenizer.encode(PROMPT, { addBos: true });
  const s = m.newSession();
  let logits = s.forward(prompt);
  const want: number[] = [];
  for (;;) {
    const t = argmax(logits);
    want.push(t);
    if (t === m.tokenizer.eosId || want.length === N) break;
    logits = s.forward([t]);
  }
  assert.deepEqual(a.tokens, want);
  // The text is what the tokens add to the prompt's text.
  assert.equal(a.text, m.tokenizer.decode([...prompt, ...want]).slice(m.tokenizer.decode(prompt).length));
  if (a.prompt_tokens !== undefined) assert.equal(a.prompt_tokens, prompt.length);
});

test('generate: the streamed text (no --json) equals the JSON text for greedy, plain and --chat', () => {
  for (const extra of [[], ['--chat']]) {
    const args = ['generate', '--model', MICRO, '--prompt', PROMPT, '--max-tokens', '12', '--temperature', '0', ...extra];
    const streamed = ok(args);
    const j = json([...args, '--json']);
    assert.equal(streamed, j.text + '\n', `streamed vs JSON ${extra.join(' ')}`);
  }
});

test('generate, temperature 1: one seed gives the same output twice, as the library sampler does; other seeds differ', async () => {
  const sampling = ['--temperature', '1', '--top-k', '0', '--top-p', '1', '--min-p', '0', '--max-tokens', '12'];
  const s1 = genJson(MICRO, [...sampling, '--seed', '11']);
  const s1again = genJson(MICRO, [...sampling, '--seed', '11']);
  assert.deepEqual([s1again.text, s1again.tokens], [s1.text, s1.tokens]);
  // With the whole distribution kept, 12 tokens from 512 agree for two seeds with negligible probability.
  const s2 = genJson(MICRO, [...sampling, '--seed', '12']);
  assert.notDeepEqual(s2.tokens, s1.tokens);
  // The CLI hands its flags to the library unchanged: the library with the same options and seed agrees.
  const m = lib(MICRO);
  const opts: GenerateOptions = { temperature: 1, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, maxTokens: 12, seed: 11 };
  const r = await generate(m, m.tokenizer.encode(PROMPT, { addBos: true }), opts);
  assert.deepEqual([s1.text, s1.tokens], [r.text, r.tokens]);
});

test('generate --chat on the default model (Mistral vocab): the prompt is "<s>[INST] p [/INST]" as `moe tokenize` gives it', () => {
  const p = 'What is a mixture of experts?';
  const chat = genJson(DEFAULT_MODEL, ['--prompt', p, '--chat', '--max-tokens', '3', '--temperature', '0']);
  // llama.cpp and HF tokenize the text after the "<s>" special token with the SentencePiece dummy prefix, which
  // is what `moe tokenize` (BOS added) does to the text without "<s>".
  const ids = json<{ ids: number[] }>(['tokenize', '--model', DEFAULT_MODEL], `[INST] ${p} [/INST]`).ids;
  assert.deepEqual(ids, [1, ...mistralTokenizer.encode(`[INST] ${p} [/INST]`, false, true)], 'independent tokenizer');
  assert.equal(chat.prompt_tokens, ids.length, 'the chat prompt has the template\'s tokens');
  // The same ids as a plain prompt: the same greedy continuation (the chat answer drops its one leading space).
  const plain = genJson(DEFAULT_MODEL, ['--prompt', `[INST] ${p} [/INST]`, '--max-tokens', '3', '--temperature', '0']);
  assert.equal(plain.prompt_tokens, ids.length);
  assert.deepEqual(chat.tokens, plain.tokens);
  assert.equal(chat.text, plain.text.replace(/^ /, ''));
  assert.ok(chat.tokens.length >= 1 && chat.tokens.length <= 3);
});

// ---------------------------------------------------------------------------------------------------------------
// logits

test('logits: one row of vocab floats per input token, equal to the library forward pass (f32 and q4_0)', () => {
  for (const file of [MICRO, MICRO_Q4]) {
    const ids = [1, 2, 3];
    const j = json<{ tokens: number[]; logits: number[][] }>(['logits', '--model', file, '--tokens', ids.join(',')]);
    const m = lib(file);
    const V = m.config.vocabSize;
    assert.deepEqual(j.tokens, ids);
    assert.equal(j.logits.length, ids.length);
    const want = m.newSession().forward(ids, { allLogits: true });
    for (let i = 0; i < ids.length; i++) {
      assert.equal(j.logits[i].length, V);
      // The CLI prints each float32 in full (shortest round-trip digits), so the values are exactly equal.
      for (let v = 0; v < V; v++) if (j.logits[i][v] !== want[i * V + v]) assert.fail(`${path.basename(file)} row ${i}, token ${v}: ${j.logits[i][v]} vs ${want[i * V + v]}`);
    }
  }
});

test('logits of micro-f32 for 32 tokens match the stored llama.cpp logits (as log-probabilities)', () => {
  const ref = JSON.parse(fs.readFileSync(fixture('micro/micro-f32.logits.json'), 'utf8')) as { tokens: number[]; logits: number[][] };
  const j = json<{ logits: number[][] }>(['logits', '--model', MICRO, '--tokens', ref.tokens.join(',')]);
  assert.equal(j.logits.length, ref.logits.length);
  const logSoftmax = (row: number[]) => {
    const mx = Math.max(...row);
    const lse = mx + Math.log(row.reduce((s, x) => s + Math.exp(x - mx), 0));
    return row.map((x) => x - lse);
  };
  let max = 0;
  for (let i = 0; i < ref.logits.length; i++) {
    const a = logSoftmax(j.logits[i]);
    const b = logSoftmax(ref.logits[i]);
    assert.equal(a.length, b.length);
    for (let v = 0; v < a.length; v++) max = Math.max(max, Math.abs(a[v] - b[v]));
  }
  // The stored logits have 6 decimals; the library agrees with llama.cpp to ~1e-5 (test/llamacpp-oracle.test.ts).
  assert.ok(max < 1e-4, `max |log-prob diff| ${max}`);
});

test('convert GGUF -> HF directory -> q8_0 GGUF: the directory gives the same logits; the q8_0 tensors are the reference file\'s', () => {
  const hf = path.join(tmp, 'micro-hf');
  const q8 = path.join(tmp, 'micro-q8_0.gguf');
  ok(['convert', MICRO, hf]);
  const ids = '1,2,3';
  assert.equal(ok(['logits', '--model', hf, '--tokens', ids]), ok(['logits', '--model', MICRO, '--tokens', ids]));
  ok(['convert', hf, q8, '--type', 'q8_0']);
  const mine = readGGUF(q8).tensors;
  const ref = readGGUF(fixture('micro/micro-q8_0.gguf')).tensors;
  assert.deepEqual([...mine.keys()].sort(), [...ref.keys()].sort());
  for (const [name, t] of ref) {
    const u = mine.get(name)!;
    assert.deepEqual([u.dtype, u.shape], [t.dtype, t.shape], name);
    assert.ok(Buffer.from(u.data).equals(Buffer.from(t.data)), `${name}: bytes differ from the reference q8_0 file`);
  }
});

// ---------------------------------------------------------------------------------------------------------------
// tokenize

const LINES = ['Hello world', '  two leading spaces, a tab\tand a newline\nhere', 'Mixtral 8x7B: 46.7B params 🌊 日本語 café', ''];

test('tokenize (whole stdin) matches the library tokenizer, with and without BOS; on the default model also mistral-tokenizer-js', () => {
  for (const file of [MICRO, DEFAULT_MODEL]) {
    const tok = lib(file).tokenizer;
    for (const text of LINES.slice(0, 3)) {
      const withBos = json<{ ids: number[] }>(['tokenize', '--model', file], text).ids;
      assert.deepEqual(withBos, tok.encode(text, { addBos: true }), `${path.basename(file)}: ${JSON.stringify(text)}`);
      assert.equal(withBos[0], tok.bosId);
      if (file === DEFAULT_MODEL) assert.deepEqual(withBos, mistralTokenizer.encode(text, true, true), `mistral-tokenizer-js: ${JSON.stringify(text)}`);
    }
    const noBos = json<{ ids: number[] }>(['tokenize', '--model', file, '--no-bos'], LINES[1]).ids;
    assert.deepEqual(noBos, tok.encode(LINES[1], { addBos: false }));
  }
});

test('tokenize --jsonl: one JSON array per JSON-string line ("\\n", emoji, CJK, empty string); blank lines skipped', () => {
  const tok = lib(DEFAULT_MODEL).tokenizer;
  const input = LINES.map((l) => JSON.stringify(l)).join('\n') + '\n\n' + JSON.stringify('last') + '\n';
  const texts = [...LINES, 'last'];
  for (const noBos of [false, true]) {
    const out = ok(['tokenize', '--model', DEFAULT_MODEL, '--jsonl', ...(noBos ? ['--no-bos'] : [])], input);
    const rows = out.trimEnd().split('\n').map((l) => JSON.parse(l) as number[]);
    assert.equal(rows.length, texts.length);
    texts.forEach((t, i) => {
      assert.deepEqual(rows[i], tok.encode(t, { addBos: !noBos }), JSON.stringify(t));
      if (t) assert.deepEqual(rows[i], mistralTokenizer.encode(t, !noBos, true), `mistral-tokenizer-js: ${JSON.stringify(t)}`);
    });
  }
  // Lines before the bad one are answered (streamed), then the error.
  const okIds = JSON.stringify(lib(MICRO).tokenizer.encode('ok', { addBos: true }));
  fails(['tokenize', '--model', MICRO, '--jsonl'], /line 2 is not JSON/, { status: 2, input: '"ok"\nnot json\n', stdout: okIds + '\n' });
  fails(['tokenize', '--model', MICRO, '--jsonl'], /line 1 is not a JSON string/, { status: 2, input: '[1,2]\n' });
});

// ---------------------------------------------------------------------------------------------------------------
// chat

test('chat with two piped lines: two answers, the second turn sees the first (the library transcript), exit 0', async () => {
  const opts: GenerateOptions = { maxTokens: 4, temperature: 0 };
  const out = ok(['chat', '--model', MICRO, '--max-tokens', '4', '--temperature', '0'], 'hello there\nand then?\n');
  // The same conversation through the library: each answer (less its leading space) becomes an assistant turn.
  const m = lib(MICRO);
  const messages: ChatMessage[] = [];
  const answers: string[] = [];
  for (const line of ['hello there', 'and then?']) {
    messages.push({ role: 'user', content: line });
    const r = await generate(m, encodeChatPrompt(m, messages), opts);
    answers.push(r.text.replace(/^ /, ''));
    messages.push({ role: 'assistant', content: answers[answers.length - 1] });
  }
  assert.equal(out, answers.map((a) => a + '\n').join(''));
  // The check above tells history from none only if the second line alone gets another answer: make sure it does.
  const alone = await generate(m, encodeChatPrompt(m, [{ role: 'user', content: 'and then?' }]), opts);
  assert.notEqual(alone.text.replace(/^ /, ''), answers[1], 'premise: the first turn changes the second answer');
});

// ---------------------------------------------------------------------------------------------------------------
// errors

test('usage errors: exit 2, one line naming the problem', () => {
  const m = ['--model', MICRO];
  fails(['frobnicate'], /unknown command 'frobnicate'/, { status: 2 });
  fails(['generate', '--prompt', 'hi'], /--model is required/, { status: 2 });
  fails(['logits', '--tokens', '1,2'], /--model is required/, { status: 2 });
  fails(['generate', ...m], /--prompt is required/, { status: 2 });
  fails(['logits', ...m, '--tokens', '1,x'], /--tokens: 'x' is not a token id/, { status: 2 });
  fails(['logits', ...m, '--tokens', '1,,2'], /--tokens: '' is not a token id/, { status: 2 });
  fails(['logits', ...m, '--tokens', '99999'], /--tokens: id 99999 is outside the vocabulary \(0\.\.511\)/, { status: 2 });
  fails(['generate', ...m, '--prompt', 'hi', '--max-tokens', '-1'], /--max-tokens must be an integer >= 1, got '-1'/, { status: 2 });
  fails(['generate', ...m, '--prompt', 'hi', '--max-tokens', 'abc'], /--max-tokens must be an integer >= 1, got 'abc'/, { status: 2 });
  fails(['generate', ...m, '--prompt', 'hi', '--temperature', 'nan'], /--temperature must be a number .*'nan'/, { status: 2 });
  fails(['generate', ...m, '--prompt', 'hi', '--top-p', '0'], /--top-p must be a number in \(0, 1\]/, { status: 2 });
  fails(['generate', ...m, '--prompt', 'hi', '--seed', '1e300'], /--seed must be an integer/, { status: 2 });
  fails(['generate', ...m, '--prompt', 'hi', '--bogus'], /Unknown option '--bogus'/, { status: 2 });
  fails(['inspect'], /inspect takes one model path/, { status: 2 });
  fails(['logits', ...m, '--tokens', '1', '--backend', 'gpu'], /--backend must be auto, native or ref, got 'gpu'/, { status: 2 });
  fails(['generate', ...m, '--prompt', 'hi', '--kv-cache', 'q8_0'], /--kv-cache must be f32 or f16, got 'q8_0'/, { status: 2 });
});

test('generate --kv-cache f16, greedy: the argmax chain of a library session with an f16 KV cache (f32 is the default)', () => {
  // micro-q8_0 on this prompt: the greedy continuation with an f16 cache differs from the f32 one.
  const model = fixture('micro/micro-q8_0.gguf'), prompt = 'x y z w', N = 12;
  const run = (extra: string[]) => json(['generate', '--model', model, '--prompt', prompt, '--json', '--max-tokens', String(N), '--temperature', '0', ...extra]).tokens as number[];
  const m = lib(model);
  const chain = (kvF16: boolean): number[] => {
    const s = m.newSession({ kvF16 });
    let logits = s.forward(m.tokenizer.encode(prompt, { addBos: true }));
    const want: number[] = [];
    for (;;) {
      const t = argmax(logits);
      want.push(t);
      if (t === m.tokenizer.eosId || want.length === N) return want;
      logits = s.forward([t]);
    }
  };
  const f16 = chain(true), f32 = chain(false);
  assert.notDeepEqual(f16, f32, 'the two cache types give different continuations here');
  assert.deepEqual(run(['--kv-cache', 'f16']), f16);
  assert.deepEqual(run(['--kv-cache', 'f32']), f32);
  assert.deepEqual(run([]), f32);
});

test('--backend ref and --backend native give the same logits (native when the addon is built)', (t) => {
  const args = ['logits', '--model', MICRO, '--tokens', '1,50,300,7,99'];
  const ref = JSON.parse(ok([...args, '--backend', 'ref'])) as { logits: number[][] };
  const native = moe([...args, '--backend', 'native']);
  if (native.status !== 0) {
    assert.match(native.stderr, /native backend requested but unavailable/);
    if (!process.env.CI) return t.skip('native addon not built');
    assert.fail(native.stderr);
  }
  const got = (JSON.parse(native.stdout) as { logits: number[][] }).logits;
  let worst = 0;
  got.forEach((row, i) => row.forEach((v, j) => (worst = Math.max(worst, Math.abs(v - ref.logits[i][j])))));
  assert.ok(worst < 1e-4, `max abs difference ${worst}`);
});

test('--help lists every command (exit 0); no command prints the usage and exits 2', () => {
  const help = ok(['--help']);
  for (const c of ['inspect', 'generate', 'chat', 'logits', 'tokenize', 'convert', 'start']) assert.match(help, new RegExp(`^  ${c}\\b`, 'm'));
  const r = moe([]);
  assert.equal(r.status, 2);
  assert.equal(r.stdout, help);
});

test('bad model files: exit 1, the message names the file (and the tensor for a shape that contradicts the config)', () => {
  const missing = path.join(tmp, 'no-such-model.gguf');
  assert.ok(fails(['generate', '--model', missing, '--prompt', 'hi'], /no such file or directory/, { status: 1 }).includes(missing));

  const truncated = path.join(tmp, 'truncated.gguf');
  fs.writeFileSync(truncated, fs.readFileSync(MICRO).subarray(0, 1000));
  assert.ok(fails(['inspect', truncated], /truncated\.gguf/, { status: 1 }).split('\n')[0].includes(truncated));

  // Deterministic "random" bytes (a xorshift stream), so the file is the same on every run.
  const noise = new Uint8Array(4096);
  let x = 0x9e3779b9;
  for (let i = 0; i < noise.length; i++) {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
    noise[i] = x & 0xff;
  }
  const random = path.join(tmp, 'random.bin');
  fs.writeFileSync(random, noise);
  assert.ok(fails(['generate', '--model', random, '--prompt', 'hi'], /not a GGUF file/, { status: 1 }).includes(random));

  // A valid GGUF whose config (hidden size 96) contradicts its tensors (hidden size 64).
  const w = GGUFWriter.fromFile(readGGUF(MICRO));
  w.setUint32('llama.embedding_length', 96);
  const badShape = path.join(tmp, 'bad-shape.gguf');
  w.write(badShape);
  const err = fails(['inspect', badShape], /tensor shapes contradict the config: [\w.]+ is \[[\d, ]+\], expected \[[\d, ]+\]/, { status: 1 });
  assert.ok(err.includes(badShape), err);
});

test('a prompt longer than the context: the context error, exit 1 (--ctx 8, and the model\'s own context)', () => {
  const m = lib(MICRO);
  const short = 'a prompt that is much longer than eight tokens of context';
  const n = m.tokenizer.encode(short, { addBos: true }).length;
  assert.ok(n > 8);
  fails(['generate', '--model', MICRO, '--prompt', short, '--ctx', '8', '--max-tokens', '4'], new RegExp(`need ${n} tokens but the context holds 8\\b`), { status: 1 });

  const ctx = m.config.maxPositionEmbeddings;
  let long = 'the quick brown fox. ';
  while (m.tokenizer.encode(long, { addBos: true }).length <= ctx) long += long;
  const need = m.tokenizer.encode(long, { addBos: true }).length;
  fails(['generate', '--model', MICRO, '--prompt', long, '--max-tokens', '4'], new RegExp(`need ${need} tokens but the context holds ${ctx}\\b`), { status: 1 });
});

test('a reader that closes the pipe early (| head -c 10): no EPIPE trace, exit 0', () => {
  const q = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
  const node = q(process.execPath);
  for (const args of [
    // Greedy micro generation runs on for hundreds of tokens after head has gone.
    ['generate', '--model', MICRO, '--prompt', PROMPT, '--max-tokens', '2000', '--temperature', '0'],
    // Megabytes of logits: more than a pipe buffer, so the write must fail.
    ['logits', '--model', DEFAULT_MODEL, '--tokens', '1,2,3,4'],
  ]) {
    const cmd = `(${node} ${q(BIN)} ${args.map(q).join(' ')}; echo "moe exit $?" >&2) | head -c 10`;
    const r = spawnSync('/bin/sh', ['-c', cmd], { env, cwd: ROOT, timeout: 60_000 });
    assert.equal(r.status, 0);
    assert.equal(r.stdout.length, 10, 'head got its 10 bytes');
    assert.equal(withoutBackendNotice(r.stderr.toString('utf8')), 'moe exit 0\n', `${args[0]}: stderr must be clean`);
  }
});
