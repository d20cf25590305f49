/**
 * The generation workflow with the real Mistral v1 / Mixtral vocabulary (32,000 pieces, byte fallback) and the
 * project's SentencePiece tokenizer, checked against npm mistral-tokenizer-js, an independent implementation.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mistralV1Vocab, tokenizerFromVocab } from '../src/tokenizer/sources.js';
import { MIXTRAL_8X7B_INSTRUCT_V01_TEMPLATE } from '../src/workflows/chat-template.js';
import { encodeChatPrompt, generateStream, type TokenEvent } from '../src/workflows/generate.js';
import { FakeModel, scriptedModel } from './helpers/fake-lm.js';

// The package ships no types (an ES module whose default export has encode/decode); import it by a name
// TypeScript does not resolve.
const pkg = 'mistral-tokenizer-js';
const { default: mistralTokenizer } = (await import(pkg)) as {
  default: { encode(text: string, addBos: boolean, addPrecedingSpace: boolean): number[] };
};
const tok = tokenizerFromVocab(mistralV1Vocab(), 'mistral-tokenizer-js');
/** mistral-tokenizer-js: encode(text, addBos, addPrecedingSpace). */
const ref = (text: string): number[] => mistralTokenizer.encode(text, false, true);

test('encodeChatPrompt: one BOS, "</s>" as EOS, each text run tokenized as SentencePiece does after a special token', () => {
  const messages = [
    { role: 'user' as const, content: 'Hello' },
    { role: 'assistant' as const, content: 'Hi! How can I help?' },
    { role: 'user' as const, content: 'Écris un haïku sur la mer 🌊' },
  ];
  // llama.cpp and HF (legacy SentencePiece) tokenize the text between special tokens as a fresh SentencePiece
  // input, dummy prefix included; Mistral's own recipe tokenizes "[INST]" etc. with a prefix space likewise.
  const expected = [tok.bosId, ...ref('[INST] Hello [/INST]Hi! How can I help?'), tok.eosId, ...ref('[INST] Écris un haïku sur la mer 🌊 [/INST]')];
  for (const chatTemplate of [undefined, MIXTRAL_8X7B_INSTRUCT_V01_TEMPLATE]) {
    const model = new FakeModel(tok, () => new Float32Array(tok.vocabSize), 64, chatTemplate);
    assert.deepEqual(encodeChatPrompt(model, messages), expected);
  }
});

test('streaming with the real vocabulary: whole characters only, and the text equals decode(prompt + generated) minus decode(prompt)', async () => {
  const prompt = [tok.bosId, ...ref('[INST] Say something [/INST]')];
  for (const answer of ['Sure! Here: 🌊🐚 — «mer» 日本語 ok', '\n\n  spaced   out\ttabs', 'x']) {
    const script = tok.encode(answer);
    const model = scriptedModel(tok, prompt.length, script, 256);
    const events: TokenEvent[] = [];
    const it = generateStream(model, prompt, { temperature: 0 });
    let r = await it.next();
    for (; !r.done; r = await it.next()) events.push(r.value);
    const result = r.value;
    assert.equal(result.finishReason, 'eos');
    assert.deepEqual(result.tokens, [...script, tok.eosId]);
    const expected = tok.decode([...prompt, ...script]).slice(tok.decode(prompt).length);
    assert.equal(result.text, expected);
    assert.equal(expected.trimStart(), answer.trimStart());
    for (const e of events) assert.ok(!e.text.includes('\uFFFD'), JSON.stringify(e.text));
  }
});
