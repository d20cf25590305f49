// The OpenAI-compatible server driven by the official `openai` npm client: chat, completion, streaming, n, seeds,
// router insight, stats, errors, cancellation on disconnect, and continuous batching.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import OpenAI from 'openai';
import { startServer, DEFAULT_SERVER_OPTIONS, type RunningServer } from '../src/server/http.js';
import { loadModel } from '../src/model/load.js';
import { generate, encodeChatPrompt } from '../src/workflows/generate.js';
import type { RouterTrace } from '../src/model/types.js';

const MICRO = fileURLToPath(new URL('../../test/fixtures/micro/micro-q8_0.gguf', import.meta.url));
const TINY_A = fileURLToPath(new URL('../../test/fixtures/tiny-a/tiny-a-q8_0.gguf', import.meta.url));
let server: RunningServer;
let client: OpenAI;
const lib = loadModel(MICRO);
const greedy = { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1 };

before(async () => {
  server = await startServer({ ...DEFAULT_SERVER_OPTIONS, modelPath: MICRO, port: 0, parallel: 4, maxQueue: 16, contextLength: 256 });
  client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0 });
});
after(async () => {
  await server?.close();
});

test('GET /v1/models lists the model; /health answers', async () => {
  const models = await client.models.list();
  assert.equal(models.data.length, 1);
  assert.equal(models.data[0].id, 'micro-q8_0');
  const h = await fetch(`${server.url}/health`);
  assert.equal(h.status, 200);
  assert.equal((await h.json()).status, 'ok');
});

test('chat completion (greedy) equals the library generating the same prompt; usage counts tokens', async () => {
  const messages = [{ role: 'user' as const, content: 'a b c d' }];
  const r = await client.chat.completions.create({ model: 'micro-q8_0', messages, max_tokens: 12, temperature: 0 });
  const ids = encodeChatPrompt(lib, messages);
  const want = await generate(lib, ids, { ...greedy, maxTokens: 12 });
  assert.equal(r.object, 'chat.completion');
  assert.equal(r.choices[0].message.role, 'assistant');
  assert.equal(r.choices[0].message.content, want.text.replace(/^ /, ''));
  assert.equal(r.choices[0].finish_reason, want.finishReason === 'length' ? 'length' : 'stop');
  assert.deepEqual(r.usage, { prompt_tokens: ids.length, completion_tokens: want.tokens.length, total_tokens: ids.length + want.tokens.length });
});

test('text completion, whole and streamed, give the same text; stream ends with a finish_reason and usage', async () => {
  const whole = await client.completions.create({ model: 'm', prompt: 'a b c', max_tokens: 10, temperature: 0 });
  const want = await generate(lib, lib.tokenizer.encode('a b c', { addBos: true }), { ...greedy, maxTokens: 10 });
  assert.equal(whole.choices[0].text, want.text);
  const stream = await client.completions.create({ model: 'm', prompt: 'a b c', max_tokens: 10, temperature: 0, stream: true, stream_options: { include_usage: true } });
  let text = '';
  let finish: string | null = null;
  let usage: OpenAI.CompletionUsage | undefined;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      text += c.text;
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  assert.equal(text, want.text);
  assert.equal(finish, 'length');
  assert.equal(usage?.completion_tokens, 10);
});

test('chat streaming: role first, content deltas, finish_reason; equals the whole response', async () => {
  const messages = [{ role: 'user' as const, content: 'x y' }];
  const whole = await client.chat.completions.create({ model: 'm', messages, max_tokens: 9, temperature: 0 });
  const stream = await client.chat.completions.create({ model: 'm', messages, max_tokens: 9, temperature: 0, stream: true });
  let text = '';
  let role: string | undefined;
  let finish: string | null = null;
  for await (const chunk of stream) {
    assert.equal(chunk.object, 'chat.completion.chunk');
    const c = chunk.choices[0];
    role ??= c.delta.role;
    text += c.delta.content ?? '';
    if (c.finish_reason) finish = c.finish_reason;
  }
  assert.equal(role, 'assistant');
  assert.equal(text.replace(/^ /, ''), whole.choices[0].message.content);
  assert.equal(finish, whole.choices[0].finish_reason);
});

test('seed reproduces sampling; n returns several choices; stop ends before the stop string', async () => {
  const ask = (seed: number, n = 1) => client.completions.create({ model: 'm', prompt: 'a', max_tokens: 8, temperature: 1, seed, n });
  const a = await ask(7);
  const b = await ask(7);
  assert.equal(a.choices[0].text, b.choices[0].text);
  const many = await ask(7, 3);
  assert.equal(many.choices.length, 3);
  assert.deepEqual(many.choices.map((c) => c.index), [0, 1, 2]);
  assert.equal(many.choices[0].text, a.choices[0].text, 'choice 0 uses the request seed');
  assert.equal(many.usage?.completion_tokens, 24);
  // Stop: take a greedy continuation and stop at a piece of it.
  const full = (await client.completions.create({ model: 'm', prompt: 'a b', max_tokens: 12, temperature: 0 })).choices[0].text;
  const stop = full.slice(4, 7);
  assert.ok(stop.length > 0 && full.indexOf(stop) >= 4);
  const cut = await client.completions.create({ model: 'm', prompt: 'a b', max_tokens: 12, temperature: 0, stop: [stop] });
  assert.equal(cut.choices[0].text, full.slice(0, full.indexOf(stop)));
  assert.equal(cut.choices[0].finish_reason, 'stop');
});

test('router insight: moe_router gives, per generated token, the experts and weights of every layer; /v1/stats counts load', async () => {
  const before = (await (await fetch(`${server.url}/v1/stats`)).json()) as { tokens: number; load: number[][] };
  const r = (await client.completions.create({ model: 'm', prompt: 'a b c', max_tokens: 5, temperature: 0, moe_router: true } as never)) as unknown as {
    choices: { moe_router: { token: number; experts: number[][]; weights: number[][] }[] }[];
  };
  const trace = r.choices[0].moe_router;
  assert.equal(trace.length, 5);
  for (const t of trace) {
    assert.equal(t.experts.length, lib.config.numHiddenLayers);
    for (let l = 0; l < t.experts.length; l++) {
      assert.equal(t.experts[l].length, 2);
      assert.ok(t.experts[l].every((e) => Number.isInteger(e) && e >= 0 && e < 8));
      assert.ok(Math.abs(t.weights[l][0] + t.weights[l][1] - 1) < 1e-5, 'renormalised top-2 weights sum to 1');
    }
  }
  // The first token's choices are those the library's forward pass makes at the last prompt position.
  const ids = lib.tokenizer.encode('a b c', { addBos: true });
  const libTrace: RouterTrace[] = [];
  lib.newSession().forward(ids, { trace: libTrace });
  assert.deepEqual(trace[0].experts, libTrace[libTrace.length - 1].experts);
  const after = (await (await fetch(`${server.url}/v1/stats`)).json()) as { tokens: number; load: number[][]; layers: number; experts: number };
  assert.equal(after.load.length, after.layers);
  assert.equal(after.load[0].length, after.experts);
  const slots = (s: { load: number[][] }) => s.load[0].reduce((a, b) => a + b, 0);
  // Prompt tokens + 4 decode steps (the last sampled token is never run), 2 slots each, in every layer.
  assert.equal(slots(after) - slots(before), 2 * (ids.length + 4));
  assert.equal(after.tokens - before.tokens, ids.length + 4);
});

test('continuous batching: concurrent requests decode together and each equals its solo result', async () => {
  const prompts = ['a', 'b c', 'd e f', 'g h i j', 'k'];
  const solo = [];
  for (const p of prompts) solo.push((await client.completions.create({ model: 'm', prompt: p, max_tokens: 16, temperature: 0 })).choices[0].text);
  const s0 = (await (await fetch(`${server.url}/v1/stats`)).json()) as { steps: number; tokens: number };
  const together = await Promise.all(prompts.map((p) => client.completions.create({ model: 'm', prompt: p, max_tokens: 16, temperature: 0 })));
  const s1 = (await (await fetch(`${server.url}/v1/stats`)).json()) as { steps: number; tokens: number };
  assert.deepEqual(together.map((r) => r.choices[0].text), solo);
  // 5 requests x 16 tokens one at a time would take 80 steps; with 4 slots they share steps.
  assert.ok(s1.steps - s0.steps < 5 * 16, `steps ${s1.steps - s0.steps} show the requests were batched`);
});

test('a client that disconnects cancels its generation', async () => {
  const ac = new AbortController();
  const res = await fetch(`${server.url}/v1/completions`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, signal: ac.signal,
    body: JSON.stringify({ prompt: 'a', max_tokens: 200, temperature: 0, stream: true }),
  });
  const reader = res.body!.getReader();
  await reader.read();
  ac.abort();
  // The engine notices within a step or two; a 200-token generation would take far longer than this poll.
  let running = -1;
  for (let i = 0; i < 100; i++) {
    await new Promise((r) => setTimeout(r, 20));
    const s = (await (await fetch(`${server.url}/v1/stats`)).json()) as { running: number; queued: number };
    running = s.running + s.queued;
    if (running === 0) break;
  }
  assert.equal(running, 0, 'the cancelled request no longer runs');
});

test('errors come in OpenAI\'s shape with the right status codes', async () => {
  const err = async (p: Promise<unknown>) => {
    try {
      await p;
    } catch (e) {
      return e as InstanceType<typeof OpenAI.APIError>;
    }
    assert.fail('expected an error');
  };
  const e1 = await err(client.chat.completions.create({ model: 'm', messages: [], max_tokens: 4 }));
  assert.ok(e1 instanceof OpenAI.BadRequestError);
  assert.equal(e1.status, 400);
  assert.equal(e1.param, 'messages');
  const e2 = await err(client.completions.create({ model: 'm', prompt: 'a', max_tokens: -3 }));
  assert.equal(e2.status, 400);
  assert.equal(e2.param, 'max_tokens');
  const e3 = await err(client.completions.create({ model: 'm', prompt: 'a', temperature: 9 }));
  assert.equal(e3.param, 'temperature');
  // A prompt over the context (256 tokens here): context_length_exceeded, before any compute.
  const e4 = await err(client.completions.create({ model: 'm', prompt: 'a '.repeat(400), max_tokens: 4 }));
  assert.equal(e4.status, 400);
  assert.equal(e4.code, 'context_length_exceeded');
  const raw = async (path: string, init?: RequestInit) => {
    const r = await fetch(`${server.url}${path}`, init);
    return { status: r.status, body: (await r.json()) as { error: { message: string; type: string; code: string | null } } };
  };
  const e5 = await raw('/v1/nope');
  assert.equal(e5.status, 404);
  assert.equal(e5.body.error.type, 'invalid_request_error');
  const e6 = await raw('/v1/completions', { method: 'POST', body: '{not json' });
  assert.equal(e6.status, 400);
  const e7 = await raw('/v1/completions', { method: 'POST', body: JSON.stringify({ prompt: 'x'.repeat(2 << 20) }) });
  assert.equal(e7.status, 413);
  const e8 = await raw('/v1/completions', { method: 'GET' });
  assert.equal(e8.status, 405);
});

test('--api-key: requests without the key get 401; with it they work', async () => {
  const s = await startServer({ ...DEFAULT_SERVER_OPTIONS, modelPath: MICRO, port: 0, apiKey: 'sekret' });
  try {
    const wrong = new OpenAI({ baseURL: `${s.url}/v1`, apiKey: 'nope', maxRetries: 0 });
    await assert.rejects(wrong.models.list(), (e: unknown) => e instanceof OpenAI.AuthenticationError && e.status === 401);
    const none = await fetch(`${s.url}/v1/models`);
    assert.equal(none.status, 401);
    const right = new OpenAI({ baseURL: `${s.url}/v1`, apiKey: 'sekret', maxRetries: 0 });
    assert.equal((await right.models.list()).data.length, 1);
  } finally {
    await s.close();
  }
});

test('kvF16: the server\'s sessions keep an f16 KV cache; greedy completions equal the library\'s with one', async () => {
  const s = await startServer({ ...DEFAULT_SERVER_OPTIONS, modelPath: MICRO, port: 0, kvF16: true });
  try {
    const c = new OpenAI({ baseURL: `${s.url}/v1`, apiKey: 'x', maxRetries: 0 });
    // A prompt whose greedy continuation on this model differs between an f16 and an f32 cache.
    const prompt = 'x y z w';
    const got = (await c.completions.create({ model: 'm', prompt, max_tokens: 12, temperature: 0 })).choices[0].text;
    const m = loadModel(MICRO);
    const run = async (kvF16: boolean) => (await generate(m, m.tokenizer.encode(prompt, { addBos: true }), { maxTokens: 12, temperature: 0, kvF16 })).text;
    assert.equal(got, await run(true));
    assert.notEqual(got, await run(false));
  } finally {
    await s.close();
  }
});

test('a full queue answers 429', async () => {
  // The ref backend on a larger model keeps the one slot busy for seconds, so the 50 ms steps below cannot race it.
  const s = await startServer({ ...DEFAULT_SERVER_OPTIONS, modelPath: TINY_A, backend: 'ref', port: 0, parallel: 1, maxQueue: 1 });
  const abort = new AbortController();
  try {
    const c = new OpenAI({ baseURL: `${s.url}/v1`, apiKey: 'x', maxRetries: 0 });
    const long = () => c.completions.create({ model: 'm', prompt: 'a', max_tokens: 150, temperature: 0 }, { signal: abort.signal });
    const stats = async () => (await (await fetch(`${s.url}/v1/stats`)).json()) as { running: number; queued: number };
    const until = async (ok: (x: { running: number; queued: number }) => boolean) => {
      for (let i = 0; i < 400 && !ok(await stats()); i++) await new Promise((r) => setTimeout(r, 10));
    };
    const running = long().catch((e: unknown) => e);
    await until((x) => x.running === 1); // the first takes the only slot
    const queued = long().catch((e: unknown) => e);
    await until((x) => x.queued === 1); // the second waits in the queue's one place
    const now = await stats();
    assert.deepEqual([now.running, now.queued], [1, 1]);
    await assert.rejects(long(), (e: unknown) => e instanceof OpenAI.RateLimitError && e.status === 429);
    abort.abort(); // the disconnects cancel both generations
    for (const r of await Promise.all([running, queued])) assert.ok(r instanceof OpenAI.APIUserAbortError, String(r));
  } finally {
    await s.close();
  }
});
