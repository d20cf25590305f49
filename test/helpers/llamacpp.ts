// Live llama.cpp oracle for tests: node-llama-cpp's prebuilt CPU build (llama.cpp as shipped with node-llama-cpp
// 3.21.1) run on a GGUF file, given exact token ids. Each call runs in a child process
// (llamacpp-worker.ts), so a llama.cpp abort on a malformed file or a leaked native handle cannot take down or hang
// the test process; the cost is about 1 s per call (node start, importing node-llama-cpp, and its check of the
// prebuilt binary in yet another process), so the *Many variants batch work into one call.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { WorkerError, WorkerRequest } from './llamacpp-worker.js';

export interface LlamaCppEvalOptions {
  /** CPU threads for llama.cpp (default 2, the CI machine's core count). */
  threads?: number;
  /** Use llama.cpp's default F16 KV cache instead of F32 (default false: F32, to compare f32 models exactly). */
  kvF16?: boolean;
  /** Kill the worker and fail after this long (default 120 000 ms). */
  timeoutMs?: number;
}

export interface LlamaCppTokenizeOptions {
  /** Prepend the model's BOS token id (llama.cpp's own tokenize call is made with add_special = false). */
  addBos?: boolean;
  /** Parse special-token text such as "<s>" into their ids (llama.cpp's parse_special). */
  special?: boolean;
  timeoutMs?: number;
}

/** node-llama-cpp (its prebuilt binary) cannot be loaded on this platform: tests may skip on this, and only this. */
export class LlamaCppUnavailableError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'LlamaCppUnavailableError';
  }
}

const WORKER = fileURLToPath(new URL('./llamacpp-worker.js', import.meta.url));
const DEFAULT_TIMEOUT_MS = 120_000;

function checkTokens(tokens: readonly number[], what: string): void {
  if (!Array.isArray(tokens) || tokens.length === 0) throw new RangeError(`${what}: need at least one token id`);
  for (let i = 0; i < tokens.length; i++) {
    const t = tokens[i];
    if (!Number.isInteger(t) || t < 0 || t > 0x7fffffff) throw new RangeError(`${what}: token[${i}] = ${t} is not a token id`);
  }
}

function checkThreads(threads: number): number {
  if (!Number.isInteger(threads) || threads < 1 || threads > 256) throw new RangeError(`threads must be an integer in [1, 256], got ${threads}`);
  return threads;
}

function ggufFile(p: string | URL): string {
  const file = typeof p === 'string' ? path.resolve(p) : fileURLToPath(p);
  if (!fs.existsSync(file)) throw new Error(`GGUF file not found: ${file}`);
  return file;
}

/** Runs one request in a fresh worker; resolves with the request directory (caller reads and removes it). */
async function runWorker(req: WorkerRequest, timeoutMs: number): Promise<string> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-llamacpp-'));
  fs.writeFileSync(path.join(dir, 'request.json'), JSON.stringify(req));
  const env = { ...process.env };
  // The worker is not a test file: keep node:test's runner context away from it.
  delete env.NODE_TEST_CONTEXT;
  // Own process group, so a timeout also kills the binary check node-llama-cpp spawns from the worker.
  const child = spawn(process.execPath, [WORKER, dir], { stdio: ['ignore', 'pipe', 'pipe'], env, detached: true });
  let log = '';
  const keep = (b: Buffer): void => { log = (log + b.toString('utf8')).slice(-8000); };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  const { code, signal, timedOut } = await new Promise<{ code: number | null; signal: NodeJS.Signals | null; timedOut: boolean }>((resolve, reject) => {
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      try { process.kill(-child.pid!, 'SIGKILL'); } catch { child.kill('SIGKILL'); }
    }, timeoutMs);
    child.on('error', (e) => { clearTimeout(timer); fs.rmSync(dir, { recursive: true, force: true }); reject(e); });
    child.on('close', (code, signal) => { clearTimeout(timer); resolve({ code, signal, timedOut }); });
  });
  const cleanupAndThrow = (e: Error): never => {
    fs.rmSync(dir, { recursive: true, force: true });
    throw e;
  };
  const errFile = path.join(dir, 'error.json');
  if (fs.existsSync(errFile)) {
    const err = JSON.parse(fs.readFileSync(errFile, 'utf8')) as WorkerError;
    const msg = `llama.cpp oracle (${req.op} on ${req.gguf}): ${err.message}${log ? `\n--- worker log ---\n${log}` : ''}`;
    cleanupAndThrow(err.kind === 'unavailable' ? new LlamaCppUnavailableError(msg) : new Error(msg));
  }
  if (timedOut) cleanupAndThrow(new Error(`llama.cpp oracle (${req.op} on ${req.gguf}): no answer within ${timeoutMs} ms, worker killed\n${log}`));
  if (code !== 0 || !fs.existsSync(path.join(dir, 'result.json'))) {
    cleanupAndThrow(new Error(`llama.cpp oracle (${req.op} on ${req.gguf}): worker exited with ${signal ?? `code ${code}`} and no result` +
      ` (llama.cpp may have aborted on this file)\n--- worker log ---\n${log}`));
  }
  return dir;
}

async function runForJson<T>(req: WorkerRequest, timeoutMs: number): Promise<T> {
  const dir = await runWorker(req, timeoutMs);
  try {
    return JSON.parse(fs.readFileSync(path.join(dir, 'result.json'), 'utf8')) as T;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * For every position i of `tokens` (given as-is: no BOS added, no tokenization), the log-softmax over the vocabulary
 * of the logits llama.cpp computes there; row i predicts token i + 1. CPU, no flash attention, the whole sequence in
 * one batch, F32 KV cache unless `kvF16`.
 *
 * node-llama-cpp exposes probabilities, not logits: llama.cpp's softmax in float32 is taken back to logs and
 * renormalised in float64, exact to about 1e-7 absolute. Because that softmax uses expf, log-probabilities below
 * about -87 lose precision (subnormal floats) and below about -103 come back as -Infinity.
 */
export async function llamaCppLogProbs(ggufPath: string | URL, tokens: readonly number[], opts: LlamaCppEvalOptions = {}): Promise<Float32Array[]> {
  return (await llamaCppLogProbsMany(ggufPath, [tokens], opts))[0];
}

/**
 * `llamaCppLogProbs` for several independent sequences (each in a fresh context) in one worker, which saves the
 * ~1 s it costs to start node-llama-cpp per call. Result [sequence][position] = log-probs over the vocabulary.
 */
export async function llamaCppLogProbsMany(ggufPath: string | URL, sequences: readonly (readonly number[])[], opts: LlamaCppEvalOptions = {}): Promise<Float32Array[][]> {
  if (!Array.isArray(sequences) || sequences.length === 0) throw new RangeError('llamaCppLogProbsMany: need at least one sequence');
  sequences.forEach((q, i) => checkTokens(q, `llamaCppLogProbs sequence ${i}`));
  const req: WorkerRequest = {
    op: 'logprobs', gguf: ggufFile(ggufPath), sequences: sequences.map((q) => [...q]), threads: checkThreads(opts.threads ?? 2),
    kvF16: opts.kvF16 ?? false,
  };
  const dir = await runWorker(req, opts.timeoutMs ?? DEFAULT_TIMEOUT_MS);
  try {
    const { nPos, nVocab } = JSON.parse(fs.readFileSync(path.join(dir, 'result.json'), 'utf8')) as { nPos: number[]; nVocab: number };
    const bytes = fs.readFileSync(path.join(dir, 'result.f32'));
    const total = sequences.reduce((a, q) => a + q.length, 0);
    if (nPos.length !== sequences.length || nPos.some((n, i) => n !== sequences[i].length) || bytes.byteLength !== total * nVocab * 4) {
      throw new Error(`llama.cpp oracle: result of ${bytes.byteLength} bytes does not match ${total} positions x ${nVocab}`);
    }
    // Copy into an aligned buffer (a pooled Buffer's byteOffset need not be a multiple of 4).
    const all = new Float32Array(total * nVocab);
    new Uint8Array(all.buffer).set(bytes);
    let row = 0;
    return sequences.map((q) => Array.from({ length: q.length }, () => all.subarray(row * nVocab, ++row * nVocab)));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** llama.cpp's tokenization of `text` with the GGUF's own vocabulary (add_special = false; see `addBos`). */
export async function llamaCppTokenize(ggufPath: string | URL, text: string, opts: LlamaCppTokenizeOptions = {}): Promise<number[]> {
  return (await llamaCppTokenizeMany(ggufPath, [text], opts))[0];
}

/** `llamaCppTokenize` for many texts in one worker (one start of node-llama-cpp, ~1 s, instead of one per text). */
export async function llamaCppTokenizeMany(ggufPath: string | URL, texts: readonly string[], opts: LlamaCppTokenizeOptions = {}): Promise<number[][]> {
  if (!Array.isArray(texts) || texts.some((x) => typeof x !== 'string')) throw new TypeError('llamaCppTokenize: texts must be strings');
  if (texts.length === 0) return [];
  const req: WorkerRequest = {
    op: 'tokenize', gguf: ggufFile(ggufPath), texts: [...texts], addBos: opts.addBos ?? false, special: opts.special ?? false, threads: 1,
  };
  const { tokens } = await runForJson<{ tokens: number[][] }>(req, opts.timeoutMs ?? DEFAULT_TIMEOUT_MS);
  if (tokens.length !== texts.length) throw new Error(`llama.cpp oracle: ${tokens.length} tokenizations for ${texts.length} texts`);
  return tokens;
}

/**
 * The `n` token ids llama.cpp's greedy sampler (argmax, first index on ties) appends to `tokens`, each fed back in
 * turn. Does not stop at EOS. Same context settings as `llamaCppLogProbs`.
 */
export async function llamaCppGenerateGreedy(ggufPath: string | URL, tokens: readonly number[], n: number, opts: LlamaCppEvalOptions = {}): Promise<number[]> {
  checkTokens(tokens, 'llamaCppGenerateGreedy');
  if (!Number.isInteger(n) || n < 0 || n > 1_000_000) throw new RangeError(`llamaCppGenerateGreedy: n must be a non-negative integer, got ${n}`);
  if (n === 0) return [];
  const req: WorkerRequest = {
    op: 'generate', gguf: ggufFile(ggufPath), tokens: [...tokens], n, threads: checkThreads(opts.threads ?? 2), kvF16: opts.kvF16 ?? false,
  };
  return (await runForJson<{ tokens: number[] }>(req, opts.timeoutMs ?? DEFAULT_TIMEOUT_MS)).tokens;
}

/** Log-softmax of one row of logits, in float64 (for comparing stored reference logits with the oracle). */
export function logSoftmax(logits: ArrayLike<number>): Float64Array {
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i] > max) max = logits[i];
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i] - max);
  const lse = max + Math.log(sum);
  const out = new Float64Array(logits.length);
  for (let i = 0; i < logits.length; i++) out[i] = logits[i] - lse;
  return out;
}
