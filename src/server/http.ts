// The OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions (whole responses and
// server-sent events), /v1/stats (expert load), /health, and the playground at /. Inference runs in a worker
// thread (server/worker.ts); this thread only parses, validates, streams, and cancels.

import * as http from 'node:http';
import { randomBytes, timingSafeEqual } from 'node:crypto';
import * as path from 'node:path';
import { Worker } from 'node:worker_threads';
import type { WorkerInit, WorkerReply, WorkerRequest } from './worker.js';
import type { BackendName } from '../backend/select.js';
import type { EngineEvent } from './engine.js';
import type { ChatMessage } from '../workflows/chat-template.js';
import type { SamplerOptions } from '../workflows/sampling.js';
import { PLAYGROUND_HTML } from './playground.js';

export interface ServerOptions {
  modelPath: string;
  host: string;
  port: number;
  apiKey?: string;
  /** Sequences decoded together (continuous batching). */
  parallel: number;
  /** Requests allowed to wait for a slot; more get 429. */
  maxQueue: number;
  threads: number;
  /** Compute backend for the inference worker (default 'auto'). */
  backend?: BackendName;
  contextLength?: number;
  /** Sessions keep their KV cache in f16 (half the memory) instead of f32. */
  kvF16?: boolean;
  /** Largest request body accepted, in bytes. */
  maxBodyBytes: number;
  /** Most prompt characters accepted before tokenizing (a cheap bound; the token limit is the context). */
  maxPromptChars: number;
  /** Largest n (choices per request). */
  maxN: number;
}

export const DEFAULT_SERVER_OPTIONS = { host: '127.0.0.1', port: 8080, parallel: 4, maxQueue: 64, threads: 0, maxBodyBytes: 1 << 20, maxPromptChars: 200_000, maxN: 8 };

/** An error with OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}. */
class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly type: string = status === 401 ? 'authentication_error' : status === 429 ? 'rate_limit_error' : status >= 500 ? 'server_error' : 'invalid_request_error',
    readonly param: string | null = null,
    readonly code: string | null = null,
  ) {
    super(message);
  }
  body() {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

type Listener = (e: EngineEvent) => void;

export interface RunningServer {
  url: string;
  server: http.Server;
  close(): Promise<void>;
}

/** Starts the worker (model load) and the HTTP server; resolves once both are ready. */
export async function startServer(opts: ServerOptions): Promise<RunningServer> {
  const init: WorkerInit = { modelPath: path.resolve(opts.modelPath), threads: opts.threads, ...(opts.backend ? { backend: opts.backend } : {}), parallel: opts.parallel, maxQueue: opts.maxQueue, ...(opts.contextLength ? { contextLength: opts.contextLength } : {}), ...(opts.kvF16 ? { kvF16: true } : {}) };
  const worker = new Worker(new URL('./worker.js', import.meta.url), { workerData: init });
  const listeners = new Map<string, Listener>();
  const statsWaiters = new Map<number, (s: Extract<WorkerReply, { type: 'stats' }>) => void>();
  let nextRid = 0;
  let modelInfo: Extract<WorkerReply, { type: 'ready' }> | undefined;
  const created = Math.floor(Date.now() / 1000);
  const modelId = path.basename(opts.modelPath).replace(/\.gguf$/i, '') || 'moe-ts';

  await new Promise<void>((resolve, reject) => {
    worker.once('error', reject);
    worker.on('message', (m: WorkerReply) => {
      if (m.type === 'ready') {
        modelInfo = m;
        resolve();
      } else if (m.type === 'fatal') reject(new Error(m.message));
      else if (m.type === 'stats') statsWaiters.get(m.rid)?.(m);
      else listeners.get(m.id)?.(m);
    });
  });
  worker.on('error', (e) => {
    // The inference thread died: fail every open request rather than hang it.
    for (const [id, l] of listeners) l({ type: 'error', id, status: 500, code: 'server_error', message: `inference thread failed: ${e.message}` });
  });
  const post = (m: WorkerRequest) => worker.postMessage(m);

  const server = http.createServer((req, res) => {
    handle(req, res).catch((e: unknown) => {
      const err = e instanceof ApiError ? e : new ApiError(500, `internal error: ${(e as Error).message}`);
      if (!res.headersSent) sendJson(res, err.status, err.body());
      else res.end();
    });
  });
  // Slow or stuck clients must not hold sockets forever.
  server.headersTimeout = 20_000;
  server.requestTimeout = 60_000;

  async function handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://localhost');
    const route = `${req.method} ${url.pathname.replace(/\/+$/, '') || '/'}`;
    if (req.method === 'OPTIONS') return void cors(res).writeHead(204).end();
    if (route === 'GET /') return void cors(res).writeHead(200, { 'content-type': 'text/html; charset=utf-8' }).end(PLAYGROUND_HTML);
    if (route === 'GET /health') return sendJson(res, 200, { status: 'ok', model: modelId });
    checkAuth(req);
    switch (route) {
      case 'GET /v1/models':
        return sendJson(res, 200, { object: 'list', data: [{ id: modelId, object: 'model', created, owned_by: 'moe-ts', context_length: modelInfo?.contextLength, config: modelInfo?.config }] });
      case 'GET /v1/stats':
        return sendJson(res, 200, await stats());
      case 'POST /v1/completions':
        return completion(req, res, 'text');
      case 'POST /v1/chat/completions':
        return completion(req, res, 'chat');
      default:
        if (['/v1/models', '/v1/stats', '/v1/completions', '/v1/chat/completions', '/health'].includes(url.pathname)) {
          throw new ApiError(405, `method ${req.method} is not allowed on ${url.pathname}`);
        }
        throw new ApiError(404, `unknown endpoint ${req.method} ${url.pathname}`, 'invalid_request_error', null, 'unknown_url');
    }
  }

  function checkAuth(req: http.IncomingMessage): void {
    if (!opts.apiKey) return;
    const h = req.headers.authorization ?? '';
    const m = /^Bearer\s+(.+)$/i.exec(h);
    const given = Buffer.from(m ? m[1].trim() : '');
    const want = Buffer.from(opts.apiKey);
    if (given.length !== want.length || !timingSafeEqual(given, want)) {
      throw new ApiError(401, m ? 'Incorrect API key provided.' : 'You did not provide an API key: send it as "Authorization: Bearer <key>".', 'authentication_error', null, 'invalid_api_key');
    }
  }

  function stats(): Promise<unknown> {
    const rid = nextRid++;
    return new Promise((resolve) => {
      statsWaiters.set(rid, (s) => {
        statsWaiters.delete(rid);
        const c = modelInfo?.config as { numHiddenLayers: number; numLocalExperts: number; numExpertsPerTok: number } | undefined;
        resolve({ object: 'moe.stats', model: modelId, layers: c?.numHiddenLayers, experts: c?.numLocalExperts, experts_per_token: c?.numExpertsPerTok, tokens: s.tokens, steps: s.steps, running: s.busy, queued: s.queued, load: s.load });
      });
      post({ type: 'stats', rid });
    });
  }

  async function completion(req: http.IncomingMessage, res: http.ServerResponse, kind: 'text' | 'chat'): Promise<void> {
    const body = await readJson(req, opts.maxBodyBytes);
    const p = parseRequest(body, kind, opts);
    const id = `${kind === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomBytes(12).toString('hex')}`;
    const object = kind === 'chat' ? 'chat.completion' : 'text_completion';
    const ids = Array.from({ length: p.n }, (_, i) => `${id}:${i}`);
    const texts = ids.map(() => '');
    const finish: (string | null)[] = ids.map(() => null);
    let promptTokens = 0;
    let completionTokens = 0;
    let ended = false;
    const routers: unknown[][] = ids.map(() => []);

    const cleanup = () => {
      for (const sub of ids) {
        if (listeners.delete(sub)) post({ type: 'cancel', id: sub });
      }
    };
    // A client that goes away cancels its generation.
    res.on('close', () => {
      if (!ended) cleanup();
    });

    const chunkBase = () => ({ id, object: kind === 'chat' ? 'chat.completion.chunk' : 'text_completion', created: Math.floor(Date.now() / 1000), model: modelId });
    const sse = (data: unknown) => res.write(`data: ${JSON.stringify(data)}\n\n`);
    let started = false;
    const startStream = () => {
      if (started) return;
      started = true;
      cors(res).writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', connection: 'keep-alive' });
      if (kind === 'chat') ids.forEach((_, i) => sse({ ...chunkBase(), choices: [{ index: i, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }] }));
    };

    await new Promise<void>((resolve, reject) => {
      let remaining = p.n;
      ids.forEach((sub, i) => {
        listeners.set(sub, (e) => {
          if (e.type === 'error') {
            cleanup();
            if (started) {
              sse({ error: { message: e.message, type: 'server_error', param: null, code: e.code } });
              res.end();
              ended = true;
              return resolve();
            }
            return reject(new ApiError(e.status, e.message, undefined, e.code === 'context_length_exceeded' ? 'messages' : null, e.code));
          }
          if (e.type === 'token') {
            if (p.trace) routers[i].push({ token: e.token, text: e.text, experts: e.router?.experts, weights: e.router?.weights });
            if (!p.stream) {
              texts[i] += e.text;
              return;
            }
            startStream();
            if (e.text === '' && !p.trace) return;
            const extra = p.trace ? { moe_router: { token: e.token, experts: e.router?.experts, weights: e.router?.weights } } : {};
            if (kind === 'chat') sse({ ...chunkBase(), choices: [{ index: i, delta: { content: e.text }, logprobs: null, finish_reason: null, ...extra }] });
            else sse({ ...chunkBase(), choices: [{ index: i, text: e.text, logprobs: null, finish_reason: null, ...extra }] });
            return;
          }
          // done
          listeners.delete(sub);
          promptTokens = e.promptTokens;
          completionTokens += e.completionTokens;
          finish[i] = e.finishReason === 'length' ? 'length' : 'stop';
          if (!p.stream) texts[i] = e.text;
          else {
            startStream();
            if (kind === 'chat') sse({ ...chunkBase(), choices: [{ index: i, delta: {}, logprobs: null, finish_reason: finish[i] }] });
            else sse({ ...chunkBase(), choices: [{ index: i, text: '', logprobs: null, finish_reason: finish[i] }] });
          }
          if (--remaining === 0) resolve();
        });
      });
      for (let i = 0; i < p.n; i++) {
        const seed = p.sampling.seed === undefined ? undefined : p.sampling.seed + i;
        post({ type: 'submit', id: ids[i], prompt: p.prompt, maxTokens: p.maxTokens, stop: p.stop, sampling: { ...p.sampling, ...(seed !== undefined ? { seed } : {}) }, trace: p.trace });
      }
    });
    if (ended || res.destroyed) return;
    ended = true;
    const usage = { prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens };
    if (p.stream) {
      if (p.includeUsage) sse({ ...chunkBase(), choices: [], usage });
      res.end('data: [DONE]\n\n');
      return;
    }
    const choices = ids.map((_, i) => {
      const extra = p.trace ? { moe_router: routers[i] } : {};
      return kind === 'chat'
        ? { index: i, message: { role: 'assistant', content: texts[i].replace(/^ /, ''), refusal: null }, logprobs: null, finish_reason: finish[i], ...extra }
        : { index: i, text: texts[i], logprobs: null, finish_reason: finish[i], ...extra };
    });
    sendJson(res, 200, { id, object, created: Math.floor(Date.now() / 1000), model: modelId, choices, usage });
  }

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, opts.host, () => resolve());
  });
  const addr = server.address();
  const port = typeof addr === 'object' && addr ? addr.port : opts.port;
  const host = opts.host.includes(':') ? `[${opts.host}]` : opts.host;
  return {
    url: `http://${host}:${port}`,
    server,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
      await worker.terminate();
    },
  };
}

function cors(res: http.ServerResponse): http.ServerResponse {
  res.setHeader('access-control-allow-origin', '*');
  res.setHeader('access-control-allow-headers', 'authorization, content-type');
  res.setHeader('access-control-allow-methods', 'GET, POST, OPTIONS');
  return res;
}

function sendJson(res: http.ServerResponse, status: number, body: unknown): void {
  cors(res).writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
}

/** Reads a JSON body of at most `limit` bytes (413 past it, without reading the rest into memory). */
function readJson(req: http.IncomingMessage, limit: number): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const declared = Number(req.headers['content-length']);
    if (Number.isFinite(declared) && declared > limit) {
      req.resume();
      return reject(new ApiError(413, `the request body is ${declared} bytes; the limit is ${limit}`));
    }
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size > limit) {
        reject(new ApiError(413, `the request body is over the limit of ${limit} bytes`));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('error', reject);
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      try {
        resolve(JSON.parse(text));
      } catch {
        reject(new ApiError(400, 'the request body is not valid JSON'));
      }
    });
  });
}

interface ParsedRequest {
  prompt: { chat: ChatMessage[] } | { text: string };
  maxTokens: number;
  stop: string[];
  sampling: SamplerOptions;
  n: number;
  stream: boolean;
  includeUsage: boolean;
  trace: boolean;
}

/** Validates an OpenAI request body; every problem is a 400 naming the parameter. */
export function parseRequest(body: unknown, kind: 'text' | 'chat', opts: Pick<ServerOptions, 'maxPromptChars' | 'maxN'>): ParsedRequest {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new ApiError(400, 'the request body must be a JSON object');
  const b = body as Record<string, unknown>;
  const bad = (param: string, msg: string): never => {
    throw new ApiError(400, `${param}: ${msg}`, 'invalid_request_error', param, 'invalid_value');
  };
  const num = (param: string, def: number, min: number, max: number, integer = false): number => {
    const v = b[param];
    if (v === undefined || v === null) return def;
    if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max || (integer && !Number.isInteger(v))) {
      return bad(param, `must be ${integer ? 'an integer' : 'a number'} in [${min}, ${max}], got ${JSON.stringify(v)}`);
    }
    return v;
  };
  let prompt: ParsedRequest['prompt'];
  if (kind === 'chat') {
    const msgs = b.messages;
    if (!Array.isArray(msgs) || msgs.length === 0) return bad('messages', 'must be a non-empty array');
    const chat: ChatMessage[] = msgs.map((m, i) => {
      if (typeof m !== 'object' || m === null) return bad(`messages[${i}]`, 'must be an object');
      const { role, content } = m as Record<string, unknown>;
      if (role !== 'system' && role !== 'user' && role !== 'assistant') return bad(`messages[${i}].role`, `must be system, user or assistant, got ${JSON.stringify(role)}`);
      let text: string;
      if (typeof content === 'string') text = content;
      else if (Array.isArray(content)) {
        // The content-parts form: only text parts can be served by a text model.
        text = content.map((part, j) => {
          const p = part as Record<string, unknown>;
          if (p?.type !== 'text' || typeof p.text !== 'string') return bad(`messages[${i}].content[${j}]`, 'only {"type": "text", "text": ...} parts are supported');
          return p.text as string;
        }).join('');
      } else return bad(`messages[${i}].content`, 'must be a string');
      return { role, content: text };
    });
    const chars = chat.reduce((a, m) => a + m.content.length, 0);
    if (chars > opts.maxPromptChars) throw new ApiError(400, `the messages hold ${chars} characters; the limit is ${opts.maxPromptChars}`, 'invalid_request_error', 'messages', 'context_length_exceeded');
    prompt = { chat };
  } else {
    let p = b.prompt;
    if (Array.isArray(p)) {
      if (p.length !== 1 || typeof p[0] !== 'string') return bad('prompt', 'must be a string (or an array of exactly one string)');
      p = p[0];
    }
    if (typeof p !== 'string') return bad('prompt', 'must be a string');
    if (p.length > opts.maxPromptChars) throw new ApiError(400, `the prompt holds ${p.length} characters; the limit is ${opts.maxPromptChars}`, 'invalid_request_error', 'prompt', 'context_length_exceeded');
    prompt = { text: p };
  }
  const maxTokensParam = kind === 'chat' && b.max_completion_tokens !== undefined ? 'max_completion_tokens' : 'max_tokens';
  const maxTokens = num(maxTokensParam, kind === 'chat' ? 256 : 16, 1, 1 << 20, true);
  let stop: string[] = [];
  if (typeof b.stop === 'string') stop = [b.stop];
  else if (Array.isArray(b.stop)) {
    if (b.stop.length > 4 || !b.stop.every((s) => typeof s === 'string')) return bad('stop', 'must be a string or an array of up to 4 strings');
    stop = b.stop as string[];
  } else if (b.stop !== undefined && b.stop !== null) return bad('stop', 'must be a string or an array of strings');
  const temperature = num('temperature', 1, 0, 2);
  const topP = num('top_p', 1, 0, 1);
  if (topP === 0) bad('top_p', 'must be greater than 0');
  const seedV = b.seed;
  if (seedV !== undefined && seedV !== null && !(typeof seedV === 'number' && Number.isSafeInteger(seedV) && seedV >= 0)) bad('seed', 'must be a non-negative integer');
  const n = num('n', 1, 1, opts.maxN, true);
  if (b.stream !== undefined && b.stream !== null && typeof b.stream !== 'boolean') bad('stream', 'must be a boolean');
  const so = b.stream_options as Record<string, unknown> | undefined | null;
  const trace = b.moe_router === true;
  // OpenAI's defaults: plain temperature sampling, no top-k / min-p / penalty unless asked.
  const sampling: SamplerOptions = { temperature, topP, topK: 0, minP: 0, repetitionPenalty: 1 };
  if (typeof seedV === 'number') sampling.seed = seedV;
  const fp = num('frequency_penalty', 0, -2, 2);
  const pp = num('presence_penalty', 0, -2, 2);
  if (fp !== 0 || pp !== 0) bad(fp !== 0 ? 'frequency_penalty' : 'presence_penalty', 'is not supported by moe-ts; use repetition_penalty');
  const rp = num('repetition_penalty', 1, 0.01, 10);
  sampling.repetitionPenalty = rp;
  return { prompt, maxTokens, stop, sampling, n, stream: b.stream === true, includeUsage: so?.include_usage === true, trace };
}
