import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ContextOverflowError } from '../src/model/types.js';
import { MIXTRAL_8X7B_INSTRUCT_V01_TEMPLATE, renderChat } from '../src/workflows/chat-template.js';
import { encodeChatPrompt, generate, generateStream, type GenerateOptions, type TokenEvent } from '../src/workflows/generate.js';
import { Sampler } from '../src/workflows/sampling.js';
import { FakeModel, FakeTokenizer, oneHot, scriptedModel } from './helpers/fake-lm.js';

const tok = new FakeTokenizer(['\u2581', '\u2581Hello', '\u2581world', '!', 'ST', 'OP', '\u2581the', '[INST]', '[/INST]', '\u2581[INST]', '\u2581[/INST]', '\u2581Hi']);
const GREEDY: GenerateOptions = { temperature: 0 };
const id = (p: string) => tok.id(p);
const bytes = (s: string) => [...Buffer.from(s, 'utf8')].map((b) => tok.byte(b));

async function collect(model: FakeModel, prompt: number[], opts: GenerateOptions) {
  const events: TokenEvent[] = [];
  const result = await generate(model, prompt, opts, (_t, e) => events.push(e));
  return { events, result };
}

/** All events, including those with empty text (generate's callback only sees non-empty ones). */
async function stream(model: FakeModel, prompt: number[], opts: GenerateOptions) {
  const events: TokenEvent[] = [];
  const it = generateStream(model, prompt, opts);
  for (;;) {
    const r = await it.next();
    if (r.done) return { events, result: r.value };
    events.push(r.value);
  }
}

test('prefill is one forward call with the whole prompt, then one call per generated token', async () => {
  const prompt = [tok.bosId, id('\u2581the')];
  const script = [id('\u2581Hello'), id('\u2581world'), id('!')];
  const model = scriptedModel(tok, prompt.length, script);
  const { result } = await collect(model, prompt, GREEDY);
  assert.deepEqual(result.tokens, [...script, tok.eosId]);
  assert.equal(result.finishReason, 'eos');
  assert.equal(result.text, ' Hello world!');
  assert.equal(result.promptTokens, 2);
  const s = model.sessions[0]!;
  // The final EOS is sampled but never run: prompt, then each generated token but the last.
  assert.deepEqual(s.calls, [prompt, [script[0]], [script[1]], [script[2]]]);
  for (const k of ['prefillMs', 'decodeMs', 'prefillTokensPerSecond', 'decodeTokensPerSecond'] as const) {
    assert.ok(Number.isFinite(result[k]) && result[k] >= 0, `${k} = ${result[k]}`);
  }
  assert.ok(result.prefillTokensPerSecond > 0 && result.decodeTokensPerSecond > 0);
});

test('the text is what the tokens add after the prompt: decode(prompt + generated) minus decode(prompt)', async () => {
  const cases: [number[], number[]][] = [
    [[tok.bosId], [id('\u2581Hello'), id('!')]], // after BOS alone the first piece's space is the text's start
    [[tok.bosId, id('\u2581the')], [id('\u2581Hello'), id('\u2581world')]],
    [[tok.bosId, id('!')], [...bytes('é'), id('\u2581world')]],
  ];
  for (const [prompt, script] of cases) {
    const { result } = await collect(scriptedModel(tok, prompt.length, script), prompt, GREEDY);
    const whole = tok.decode([...prompt, ...script]);
    const before = tok.decode(prompt);
    assert.ok(whole.startsWith(before));
    assert.equal(result.text, whole.slice(before.length));
  }
});

test('maxTokens ends with finishReason length; ignoreEos generates past EOS', async () => {
  const prompt = [tok.bosId];
  const model = scriptedModel(tok, 1, [id('\u2581Hello'), id('\u2581world'), id('!')]);
  const r = await generate(model, prompt, { ...GREEDY, maxTokens: 2 });
  assert.equal(r.finishReason, 'length');
  assert.deepEqual(r.tokens, [id('\u2581Hello'), id('\u2581world')]);
  assert.equal(r.text, 'Hello world');
  const r2 = await generate(model, prompt, { ...GREEDY, maxTokens: 5, ignoreEos: true });
  assert.equal(r2.finishReason, 'length');
  assert.deepEqual(r2.tokens, [id('\u2581Hello'), id('\u2581world'), id('!'), tok.eosId, tok.eosId]);
  const r0 = await generate(model, prompt, { ...GREEDY, maxTokens: 0 });
  assert.deepEqual([r0.tokens, r0.text, r0.finishReason], [[], '', 'length']);
});

test('stop strings: the text stops before the stop string, even when it is split across tokens', async () => {
  const prompt = [tok.bosId];
  const script = [id('\u2581Hello'), id('ST'), id('OP'), id('\u2581world')];
  const { events, result } = await stream(scriptedModel(tok, 1, script), prompt, { ...GREEDY, stop: ['STOP'] });
  assert.equal(result.finishReason, 'stop');
  assert.equal(result.stopString, 'STOP');
  assert.equal(result.text, 'Hello');
  assert.deepEqual(result.tokens, [id('\u2581Hello'), id('ST'), id('OP')]);
  assert.deepEqual(events.map((e) => e.text), ['Hello', '', '']); // "ST" was held back, never streamed
  assert.equal(events.map((e) => e.text).join(''), result.text);

  // A held-back prefix that turns out not to be a stop string is released with the next piece.
  const script2 = [id('\u2581Hello'), id('ST'), id('\u2581world'), id('!')];
  const s2 = await stream(scriptedModel(tok, 1, script2), prompt, { ...GREEDY, stop: ['STOP'] });
  assert.deepEqual(s2.events.map((e) => e.text), ['Hello', '', 'ST world', '!', '']);
  assert.equal(s2.result.finishReason, 'eos');
  assert.equal(s2.result.text, 'HelloST world!');

  // A stop string inside one token cuts it; the earliest of several stop strings wins; a prefix held at the end
  // (finish by length) is released.
  const s3 = await generate(scriptedModel(tok, 1, script2), prompt, { ...GREEDY, stop: ['orld', 'llo'] });
  assert.deepEqual([s3.text, s3.stopString, s3.finishReason], ['He', 'llo', 'stop']);
  const s4 = await generate(scriptedModel(tok, 1, script2), prompt, { ...GREEDY, stop: ['STOP'], maxTokens: 2 });
  assert.deepEqual([s4.text, s4.finishReason], ['HelloST', 'length']);
  // A stop string spanning three tokens, starting mid-token.
  const s5 = await generate(scriptedModel(tok, 1, script2), prompt, { ...GREEDY, stop: ['loST w'] });
  assert.deepEqual([s5.text, s5.finishReason], ['Hel', 'stop']);
});

test('streamed text is valid UTF-8 at every emission when byte-fallback tokens split characters', async () => {
  const prompt = [tok.bosId, id('\u2581Hello')];
  const script = [...bytes(' €'), ...bytes('😀'), id('!'), ...bytes('日本')];
  const { events, result } = await stream(scriptedModel(tok, prompt.length, script), prompt, GREEDY);
  for (const e of events) {
    assert.ok(!e.text.includes('\uFFFD'), `event ${JSON.stringify(e.text)} has a broken character`);
    assert.equal(Buffer.from(e.text, 'utf8').toString('utf8'), e.text, 'no lone surrogates');
  }
  assert.equal(result.text, ' €😀!日本');
  assert.equal(events.map((e) => e.text).join(''), result.text);
  // Characters come out whole: '€' on its third byte, '😀' on its fourth.
  const nonEmpty = events.filter((e) => e.text !== '').map((e) => e.text);
  assert.deepEqual(nonEmpty, [' ', '€', '😀', '!', '日', '本']);
});

test('random token streams: the concatenated events equal decode(prompt + generated) minus decode(prompt)', async () => {
  // Logits depend on the last token only: a fixed random table, sampled at temperature 1.
  const table = new Map<number, Float32Array>();
  let x = 12345;
  const rnd = () => ((x = (Math.imul(x, 1103515245) + 12345) >>> 0) / 4294967296) * 6;
  const model = new FakeModel(tok, (seen) => {
    const last = seen[seen.length - 1]!;
    let l = table.get(last);
    if (!l) {
      l = Float32Array.from({ length: tok.vocabSize }, rnd);
      // Lead bytes are common and usually (not always) followed by the right continuation: whole characters,
      // characters split across tokens, and invalid sequences all occur.
      for (const b of [0xe2, 0xf0, 0xc3]) l[tok.byte(b)]! += 3;
      const follow: Record<number, number> = { 0xe2: 0x82, 0x82: 0xac, 0xf0: 0x9f, 0x9f: 0x98, 0x98: 0x80, 0xc3: 0xa9 };
      const f = follow[last - tok.byte(0)];
      if (last >= tok.byte(0) && f !== undefined) l[tok.byte(f)]! += 8;
      l[tok.eosId] = -Infinity;
      table.set(last, l);
    }
    return l;
  }, 200);
  let whole = 0;
  let broken = 0;
  for (let seed = 1; seed <= 8; seed++) {
    const prompt = [tok.bosId, id('\u2581the')];
    const { events, result } = await stream(model, prompt, { temperature: 1, topK: 0, topP: 1, minP: 0, seed, maxTokens: 60 });
    const expected = tok.decode([...prompt, ...result.tokens]).slice(tok.decode(prompt).length);
    assert.equal(result.text, expected, `seed ${seed}`);
    assert.equal(events.map((e) => e.text).join(''), expected);
    for (const e of events) assert.equal(Buffer.from(e.text, 'utf8').toString('utf8'), e.text, 'no lone surrogates');
    whole += events.filter((e) => /[€😀é]/u.test(e.text)).length;
    broken += events.filter((e) => e.text.includes('\uFFFD')).length;
  }
  assert.ok(whole > 5 && broken > 0, `${whole} events with whole multi-byte characters, ${broken} with invalid sequences`);
});

test('a prompt longer than the context throws ContextOverflowError before any compute', async () => {
  const model = scriptedModel(tok, 10, [], 8);
  const prompt = new Array<number>(10).fill(id('!'));
  await assert.rejects(generate(model, prompt, GREEDY), (e: unknown) => e instanceof ContextOverflowError && e.needed === 10 && e.contextLength === 8);
  assert.equal(model.sessions[0]!.calls.length, 0);
  // With an existing session, what it already holds counts.
  const s = model.newSession();
  s.forward([1, 2, 3, 4, 5]);
  await assert.rejects(generate(model, [1, 2, 3, 4], { ...GREEDY, session: s }), ContextOverflowError);
  assert.equal(s.calls.length, 1);
});

test('generation that reaches the context limit stops with length: prompt + generated <= context', async () => {
  const never = [id('\u2581Hello'), id('\u2581world'), id('!'), id('\u2581the'), id('\u2581Hi'), id('!'), id('!'), id('!')];
  for (const promptLen of [1, 5, 7, 8]) {
    const model = scriptedModel(tok, promptLen, never, 8);
    const prompt = new Array<number>(promptLen).fill(id('!'));
    const r = await generate(model, prompt, GREEDY);
    assert.equal(r.finishReason, 'length');
    assert.equal(r.tokens.length, 8 - promptLen, `prompt ${promptLen}`);
    assert.ok(model.sessions[0]!.position <= 8);
  }
});

test('abort: before the start nothing runs; during generation it stops after the current token', async () => {
  const model = scriptedModel(tok, 1, [id('\u2581Hello'), id('\u2581world'), id('!'), id('\u2581the')]);
  const ac = new AbortController();
  ac.abort();
  const r0 = await generate(model, [tok.bosId], { ...GREEDY, signal: ac.signal });
  assert.deepEqual([r0.finishReason, r0.tokens, r0.text], ['abort', [], '']);
  assert.equal(model.sessions[0]!.calls.length, 0);
  const ac2 = new AbortController();
  const r = await generate(model, [tok.bosId], { ...GREEDY, signal: ac2.signal }, (_t, e) => {
    if (e.token === id('\u2581world')) ac2.abort();
  });
  assert.equal(r.finishReason, 'abort');
  assert.deepEqual(r.tokens, [id('\u2581Hello'), id('\u2581world')]);
  assert.equal(r.text, 'Hello world');
  // An abort from a timer (as a closed HTTP connection would) gets through between tokens.
  const slow = new FakeModel(tok, (seen) => oneHot(tok.vocabSize, seen.length % 2 ? id('!') : id('\u2581Hi')), 100000);
  const ac3 = new AbortController();
  setTimeout(() => ac3.abort(), 5);
  const r3 = await generate(slow, [tok.bosId], { ...GREEDY, signal: ac3.signal });
  assert.equal(r3.finishReason, 'abort');
  // Leaving the stream early (the consumer breaks out) stops generation too.
  let n = 0;
  for await (const _e of generateStream(slow, [tok.bosId], GREEDY)) if (++n === 3) break;
  assert.equal(slow.sessions[1]!.calls.length, 3);
});

test('sampling through generate is reproducible by seed, and continues with a given session and sampler', async () => {
  const model = new FakeModel(tok, (seen) => Float32Array.from({ length: tok.vocabSize }, (_, i) => Math.sin(i * 0.37 + seen[seen.length - 1]!) * 2), 500);
  const opts = { temperature: 1, topK: 50, topP: 0.9, minP: 0, maxTokens: 30, ignoreEos: true };
  const a = await generate(model, [tok.bosId], { ...opts, seed: 77 });
  const b = await generate(model, [tok.bosId], { ...opts, seed: 77 });
  const c = await generate(model, [tok.bosId], { ...opts, seed: 78 });
  assert.deepEqual(a.tokens, b.tokens);
  assert.notDeepEqual(a.tokens, c.tokens);
  const d = await generate(model, [tok.bosId], opts);
  assert.deepEqual((await generate(model, [tok.bosId], { ...opts, seed: d.seed })).tokens, d.tokens);
  // Two calls on one session with one sampler: the second prompt is appended after what the session holds.
  const session = model.newSession();
  const sampler = new Sampler({ ...opts, seed: 5 });
  const first = await generate(model, [tok.bosId], { maxTokens: 3, session, sampler, ignoreEos: true });
  const second = await generate(model, [first.tokens[2]!], { maxTokens: 3, session, sampler, ignoreEos: true });
  assert.equal(session.position, 1 + 3 + 2);
  assert.deepEqual(session.calls[0], [tok.bosId]);
  assert.deepEqual(session.seen, [tok.bosId, ...first.tokens, ...second.tokens.slice(0, 2)]);
});

test('repetition penalty sees the prompt and the generated tokens', async () => {
  // Logits favour token A slightly over B after anything; with a penalty, A once seen loses to B.
  const A = id('\u2581Hello');
  const B = id('\u2581world');
  const model = new FakeModel(tok, () => {
    const l = new Float32Array(tok.vocabSize);
    l[A] = 2;
    l[B] = 1.9;
    return l;
  });
  const plain = await generate(model, [tok.bosId], { ...GREEDY, maxTokens: 3 });
  assert.deepEqual(plain.tokens, [A, A, A]);
  const pen = await generate(model, [tok.bosId, A], { ...GREEDY, maxTokens: 1, repetitionPenalty: 1.1 });
  assert.deepEqual(pen.tokens, [B]);
});

test('bad input: empty prompt, ids outside the vocabulary, bad maxTokens', async () => {
  const model = scriptedModel(tok, 1, []);
  await assert.rejects(generate(model, [], GREEDY), /empty/);
  await assert.rejects(generate(model, [tok.bosId, tok.vocabSize], GREEDY), /prompt token 1 is \d+, outside the vocabulary/);
  await assert.rejects(generate(model, [tok.bosId, -1], GREEDY), /outside/);
  await assert.rejects(generate(model, [tok.bosId], { maxTokens: -1 }), /maxTokens/);
  assert.equal(model.sessions.length, 0);
});

test('encodeChatPrompt renders the template and parses "<s>" as BOS, exactly once', () => {
  const messages = [
    { role: 'user' as const, content: 'Hello' },
    { role: 'assistant' as const, content: 'Hi' },
    { role: 'user' as const, content: 'the world' },
  ];
  const builtIn = new FakeModel(tok, () => new Float32Array(tok.vocabSize));
  const ids = encodeChatPrompt(builtIn, messages);
  assert.equal(ids[0], tok.bosId);
  assert.equal(ids.filter((i) => i === tok.bosId).length, 1);
  assert.equal(ids.filter((i) => i === tok.eosId).length, 1); // "</s>" after the answer is the EOS token
  assert.equal(tok.decode(ids, { keepSpecial: true }), renderChat(messages, { bosToken: '<s>', eosToken: '</s>', addGenerationPrompt: true }));
  // The model's own template wins; the official Mixtral one gives the same ids as the built-in format.
  const withTemplate = new FakeModel(tok, () => new Float32Array(tok.vocabSize), 64, MIXTRAL_8X7B_INSTRUCT_V01_TEMPLATE);
  assert.deepEqual(encodeChatPrompt(withTemplate, messages), ids);
  const chatml = new FakeModel(tok, () => new Float32Array(tok.vocabSize), 64, "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}");
  const ids2 = encodeChatPrompt(chatml, messages);
  assert.equal(ids2[0], tok.bosId); // a template without BOS still gets one
  assert.equal(tok.decode(ids2.slice(1)), '<user>Hello<assistant>Hi<user>the world');
});
