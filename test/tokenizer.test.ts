/**
 * The SentencePiece BPE tokenizer against references nobody here wrote: SentencePiece's own ids for texts in five
 * languages (tokenizer-cases.json), real SentencePiece run live (@sctg/sentencepiece-js, C++ compiled to WASM) on
 * a multilingual corpus and generated edge cases, llama.cpp run live (node-llama-cpp, vocabulary-only load) for
 * parse_special, the official scores embedded in a llama.cpp GGUF, and the merges of mistral-tokenizer-js.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { FormatError } from '../src/formats/errors.js';
import { parseGGUF } from '../src/formats/gguf.js';
import { SentencePieceTokenizer, TokenType, decodeUtf8Bytes, type VocabData } from '../src/tokenizer/sentencepiece.js';
import { parseSentencePieceModel, serializeSentencePieceModel, ModelType } from '../src/tokenizer/sentencepiece-model.js';
import {
  mergesFromVocab,
  mistralV1Vocab,
  readHFTokenizer,
  tokenizerFromGGUFMetadata,
  tokenizerFromSentencePieceModel,
  tokenizerFromTokenizerJson,
  tokenizerFromVocab,
  tokenizerJsonFromVocab,
  vocabFromGGUFMetadata,
  vocabFromSentencePieceModel,
  vocabFromTokenizerJson,
  writeSentencePieceModel,
} from '../src/tokenizer/sources.js';

const fixture = (name: string) => new URL(`../../test/fixtures/tokenizer/${name}`, import.meta.url);
const cases = JSON.parse(fs.readFileSync(fixture('tokenizer-cases.json'), 'utf8')) as { text: string; ids: number[] }[];
const corpus = JSON.parse(fs.readFileSync(fixture('corpus.json'), 'utf8')) as string[];
const withBos = JSON.parse(fs.readFileSync(fixture('tokens.json'), 'utf8')) as { text: string; tokens: number[]; pieces: string[] };
const ggufBytes = zlib.gunzipSync(fs.readFileSync(fixture('tiny-a-vocab.gguf.gz')));
const gguf = parseGGUF(ggufBytes, 'tiny-a-vocab.gguf');

const mistral = mistralV1Vocab();
const tok = tokenizerFromVocab(mistral, 'mistral-tokenizer-js');

/** Deterministic PRNG (mulberry32), so generated cases are the same on every run. */
function rng(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = seed;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Edge cases: whitespace runs, tabs, CR/LF, emoji with joiners and modifiers, scripts, lone marks, specials' text. */
const edgeCases: string[] = [
  '', ' ', '  ', '   x', 'x   ', ' x ', '\t', '\t\tx', 'a\tb', '\r\n', 'x\r\ny\r\n', '\n\n\n', ' \n ', '\n x',
  ' '.repeat(40) + 'grabbed', 'a' + ' '.repeat(17) + 'b', '👨\u200d👩\u200d👧\u200d👦', '🏳️\u200d🌈', '👍🏽 ok', '🦙Ꙋ', 'Ꙋ🦙',
  'e\u0301', '\u0301', ' \u0301', '\u0301\u0302x', '日本語のテキストです。', '中文测试，标点。', '한국어 텍스트', 'Ελληνικά κείμενα',
  'العربية', 'עברית', 'हिन्दी', 'ไทย', 'Русский текст.', '<s>', '</s>', '<unk>', '<s>[INST] hi [/INST]', '<0x0A>', '<<s>>',
  '0123456789', '3.14159', '1,000,000.00', 'a\u00a0b', '\u3000x', '\uFEFFbom', '\0', 'a\0b', '\x01\x02\x7f', '\uFFFD',
  '𝔘𝔫𝔦𝔠𝔬𝔡𝔢', 'a'.repeat(300), 'ab'.repeat(150), '....', '!!!???', 'http://example.com/a?b=c&d=e#f', 'x'.repeat(17),
  'end. ', '  leading', 'trailing  ', 'mid    dle',
];
/** Random strings over an alphabet of hard characters; no lone surrogates (no UTF-8 form) and no "▁" (see below). */
function randomStrings(count: number, seed: number): string[] {
  const alphabet = [' ', ' ', ' ', '\t', '\n', '\r', 'a', 'b', 'e', 's', 't', 'é', 'ß', '日', '本', '🦙', '\u200d', '\u0301', '0', '7', '<', '>', '/', '.', ',', 'Ꙋ', 'Ж', '\u00a0'];
  const r = rng(seed);
  return Array.from({ length: count }, () => Array.from({ length: 1 + Math.floor(r() * 40) }, () => alphabet[Math.floor(r() * alphabet.length)]!).join(''));
}
const generated = [...edgeCases, ...randomStrings(300, 7)];

/** 200 KB of the corpus and generated cases, joined by newlines: one long input for the BPE. */
function bigText(): string {
  const parts: string[] = [];
  let n = 0;
  for (let i = 0; n < 200_000; i++) {
    const s = i % 2 ? corpus[i % corpus.length]! : generated[i % generated.length]!;
    parts.push(s);
    n += s.length + 1;
  }
  return parts.join('\n');
}

// ---------------------------------------------------------------------------------------------------------------
// Vocabulary sources

test('mistralV1Vocab: the pieces of mistral-tokenizer-js, and the types and scores of the official model (GGUF)', async () => {
  const pkg = 'mistral-tokenizer-js'; // no type declarations: import by a name TypeScript does not resolve
  const { default: mt } = (await import(pkg)) as { default: { vocabById: string[] } };
  assert.deepEqual([...mistral.tokens], mt.vocabById);

  const official = vocabFromGGUFMetadata(gguf.metadata, gguf.path);
  assert.equal(official.tokens.length, 32000);
  assert.deepEqual([...official.tokens], [...mistral.tokens]);
  assert.deepEqual(Array.from(official.types), Array.from(mistral.types));
  let differing = 0;
  for (let i = 0; i < 32000; i++) if (official.scores[i] !== mistral.scores[i]) differing++;
  assert.equal(differing, 0, 'scores that differ from the official ones');
  assert.deepEqual(
    [official.bosId, official.eosId, official.unkId, official.addBos, official.addEos],
    [mistral.bosId, mistral.eosId, mistral.unkId, mistral.addBos, mistral.addEos],
  );
});

test('tokenizer.json: the merges derived from the vocabulary are exactly those of mistral-tokenizer-js, in order', async () => {
  const pkg = 'mistral-tokenizer-js';
  const { default: mt } = (await import(pkg)) as { default: { merges: Map<string, number> } };
  const theirs = [...mt.merges.entries()].sort((a, b) => a[1] - b[1]).map(([k]) => k);
  const ours = mergesFromVocab(mistral).map(([l, r]) => `${l} ${r}`);
  assert.equal(ours.length, theirs.length);
  assert.deepEqual(ours, theirs);
});

/** The tokenizer built from each source the project reads. */
function allSources(): [string, SentencePieceTokenizer][] {
  const model = writeSentencePieceModel(mistral);
  const json = JSON.stringify(tokenizerJsonFromVocab(mistral));
  return [
    ['mistral-tokenizer-js', tok],
    ['GGUF metadata (llama.cpp file)', tokenizerFromGGUFMetadata(gguf.metadata, gguf.path)],
    ['GGUF metadata via a getter', tokenizerFromGGUFMetadata((k) => gguf.metadata.get(k), gguf.path)],
    ['tokenizer.model written and read back', tokenizerFromSentencePieceModel(model)],
    ['tokenizer.json written and read back', tokenizerFromTokenizerJson(json)],
  ];
}

test('every source encodes the reference cases to SentencePiece\'s ids, and decodes them back to the text', () => {
  assert.ok(cases.length >= 60);
  for (const [name, t] of allSources()) {
    for (const c of cases) {
      assert.deepEqual(t.encode(c.text), c.ids, `${name}: ${JSON.stringify(c.text)}`);
      assert.equal(t.decode(c.ids), c.text, `${name}: decode of ${JSON.stringify(c.text)}`);
    }
    const ids = t.encode(withBos.text, { addBos: true });
    assert.deepEqual(ids, withBos.tokens, `${name}: tokens.json`);
    assert.deepEqual(ids.map((i) => t.piece(i)), withBos.pieces);
    assert.equal(t.decode(ids), withBos.text);
    assert.deepEqual([t.vocabSize, t.bosId, t.eosId, t.unkId], [32000, 1, 2, 0]);
  }
});

test('all sources yield the same vocabulary, scores and flags', () => {
  const ref = tok.vocab;
  for (const [name, t] of allSources()) {
    const v = t.vocab;
    assert.deepEqual([...v.tokens], [...ref.tokens], name);
    assert.deepEqual(Array.from(v.scores), Array.from(ref.scores), name);
    assert.deepEqual(Array.from(v.types), Array.from(ref.types), name);
    assert.deepEqual([v.bosId, v.eosId, v.unkId, v.addBos, v.addEos, v.addDummyPrefix, v.removeExtraWhitespaces], [1, 2, 0, true, false, true, false], name);
  }
});

test('tokenizer.model: ModelProto survives serialize -> parse, fields and all', () => {
  const bytes = writeSentencePieceModel(mistral);
  const m = parseSentencePieceModel(bytes);
  assert.equal(m.pieces.length, 32000);
  assert.equal(m.pieces[31759]!.piece, '\uFEFF'); // a BOM-only piece must not be eaten by the UTF-8 decoder
  assert.equal(m.trainerSpec.modelType, ModelType.BPE);
  assert.equal(m.trainerSpec.byteFallback, true);
  assert.equal(m.trainerSpec.padId, -1); // negative int32: a 10-byte varint
  assert.equal(m.normalizerSpec.name, 'identity');
  assert.equal(m.normalizerSpec.removeExtraWhitespaces, false);
  const again = serializeSentencePieceModel(m);
  assert.deepEqual(again, bytes);
});

test('readHFTokenizer: tokenizer.json (or tokenizer.model) with tokenizer_config.json from a checkpoint directory', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-tok-'));
  try {
    fs.writeFileSync(path.join(dir, 'tokenizer.model'), writeSentencePieceModel(mistral));
    const a = readHFTokenizer(dir, 1, 2);
    assert.deepEqual(tokenizerFromVocab(a.vocab).encode(cases[0]!.text), cases[0]!.ids);
    assert.equal(a.chatTemplate, undefined);
    fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(tokenizerJsonFromVocab(mistral)));
    fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify({ add_bos_token: false, chat_template: '{{ x }}' }));
    const b = readHFTokenizer(dir, null, null);
    assert.equal(b.vocab.addBos, false);
    assert.equal(b.chatTemplate, '{{ x }}');
    assert.deepEqual(tokenizerFromVocab(b.vocab).encode(cases[1]!.text), cases[1]!.ids);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// ---------------------------------------------------------------------------------------------------------------
// Real SentencePiece, run live

interface SPProcessor {
  loadFromB64StringModel(b64: string): Promise<void>;
  encodeIds(text: string): number[];
  decodeIds(ids: number[]): string;
}

async function sentencePiece(model: Uint8Array): Promise<SPProcessor> {
  const pkg = '@sctg/sentencepiece-js'; // its 3 MB of type declarations are not worth compiling
  const { SentencePieceProcessor } = (await import(pkg)) as { SentencePieceProcessor: new () => SPProcessor };
  const sp = new SentencePieceProcessor();
  await sp.loadFromB64StringModel(Buffer.from(model).toString('base64'));
  // The wrapper ignores load errors: make sure the model is live before trusting any comparison.
  assert.deepEqual(sp.encodeIds(cases[0]!.text), tokenizerFromSentencePieceModel(model).encode(cases[0]!.text), 'SentencePiece did not load the model');
  return sp;
}

/** Encodes every text with both; returns the texts whose ids or decoded strings differ (with details). */
function compareWithSentencePiece(sp: SPProcessor, t: SentencePieceTokenizer, texts: readonly string[]): string[] {
  const bad: string[] = [];
  for (const text of texts) {
    const want = sp.encodeIds(text);
    const got = t.encode(text);
    if (JSON.stringify(want) !== JSON.stringify(got)) bad.push(`encode ${JSON.stringify(text)}: SentencePiece ${JSON.stringify(want)}, moe-ts ${JSON.stringify(got)}`);
    const d = sp.decodeIds(want);
    if (t.decode(want) !== d) bad.push(`decode ${JSON.stringify(want)}: SentencePiece ${JSON.stringify(d)}, moe-ts ${JSON.stringify(t.decode(want))}`);
  }
  return bad;
}

test('live SentencePiece: identical ids and decoded text on the multilingual corpus and generated edge cases', async () => {
  const model = writeSentencePieceModel(mistral);
  const sp = await sentencePiece(model);
  // The reference ids came from the official tokenizer.model; the written model must give them too.
  for (const c of cases) assert.deepEqual(sp.encodeIds(c.text), c.ids, `SentencePiece with the written model: ${JSON.stringify(c.text)}`);
  assert.ok(corpus.length > 500);
  const bad = compareWithSentencePiece(sp, tok, [...corpus, ...generated, bigText()]);
  assert.deepEqual(bad.slice(0, 10), []);
});

test('live SentencePiece: decoding random id sequences (byte fragments, controls, "▁" pieces) gives the same text', async () => {
  const sp = await sentencePiece(writeSentencePieceModel(mistral));
  const r = rng(99);
  const pool = () => {
    const k = r();
    if (k < 0.35) return 3 + Math.floor(r() * 256); // byte tokens, often invalid UTF-8 in sequence
    if (k < 0.45) return 1 + Math.floor(r() * 2); // <s>, </s>
    if (k < 0.6) return [28705, 259, 2287, 13, 28801][Math.floor(r() * 5)]!; // "▁" runs, \n, \r
    return 259 + Math.floor(r() * (32000 - 259));
  };
  const bad: string[] = [];
  for (let i = 0; i < 2000; i++) {
    const ids = Array.from({ length: 1 + Math.floor(r() * 12) }, pool);
    const want = sp.decodeIds(ids);
    if (tok.decode(ids) !== want) bad.push(`${JSON.stringify(ids)}: SentencePiece ${JSON.stringify(want)}, moe-ts ${JSON.stringify(tok.decode(ids))}`);
  }
  assert.deepEqual(bad.slice(0, 10), []);
});

test('live SentencePiece: user-defined and unused pieces, no dummy prefix, remove_extra_whitespaces', async () => {
  // Variants of the Mistral vocabulary that exercise the rest of SentencePiece's BPE (bpe_model.cc).
  const idOf = (p: string) => {
    const i = mistral.tokens.indexOf(p);
    assert.ok(i >= 0, p);
    return i;
  };
  const types = Int32Array.from(mistral.types);
  for (const p of ['▁the', 'ing', '<', '▁▁', 'ab']) types[idOf(p)] = TokenType.UserDefined;
  for (const p of ['er', '▁a', '▁▁▁▁', 'ation', '▁s', 'on']) types[idOf(p)] = TokenType.Unused;
  const variants: [string, VocabData][] = [
    ['user-defined + unused', { ...mistral, types }],
    ['no dummy prefix', { ...mistral, addDummyPrefix: false }],
    ['remove_extra_whitespaces', { ...mistral, removeExtraWhitespaces: true }],
  ];
  const texts = [...corpus.slice(0, 200), ...generated, 'the thing in abab <tab> ▁▁ x', 'ablative nation'];
  for (const [name, v] of variants) {
    const model = writeSentencePieceModel(v);
    const sp = await sentencePiece(model);
    const t = tokenizerFromSentencePieceModel(model);
    assert.equal(t.addDummyPrefix, v.addDummyPrefix ?? true);
    const bad = compareWithSentencePiece(sp, t, texts);
    assert.deepEqual(bad.slice(0, 10), [], name);
  }
});

// ---------------------------------------------------------------------------------------------------------------
// llama.cpp, run live, for parse_special

test('live llama.cpp (node-llama-cpp): parseSpecial and plain encoding match llama_tokenize', async (t) => {
  interface LlamaModelLike {
    tokenize(text: string, specialTokens: boolean): readonly number[];
    dispose(): Promise<void>;
  }
  let getLlama: (o: object) => Promise<{ loadModel(o: object): Promise<LlamaModelLike>; dispose(): Promise<void> }>;
  try {
    const pkg = 'node-llama-cpp';
    ({ getLlama } = (await import(pkg)) as { getLlama: typeof getLlama });
  } catch (e) {
    t.skip(`node-llama-cpp is not available: ${(e as Error).message}`);
    return;
  }
  const logs: string[] = [];
  const llama = await getLlama({ gpu: false, build: 'never', logLevel: 'warn', logger: (_: string, m: string) => logs.push(m) });
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'moe-tok-')), 'tiny-a-vocab.gguf');
  fs.writeFileSync(file, ggufBytes);
  try {
    // node-llama-cpp first tries a full load to measure memory, which fails on a weightless file (logged), then
    // loads the vocabulary only.
    const model = await llama.loadModel({ modelPath: file, vocabOnly: true, gpuLayers: 0 });
    const g = tokenizerFromGGUFMetadata(gguf.metadata, gguf.path);
    const special = [
      '<s>[INST] hi [/INST]', '<s>[INST] hi [/INST] ok</s>[INST] again [/INST]', 'a<s>b', '<s> x', '</s></s>', '<unk>x',
      'x <s>', '<s>', ' <s>', '<s>  two', 'x</s>\n', '<<s>>', '</s><s>', '<s>\n<s>', '[INST]<s>[/INST]',
    ];
    const texts = [...special, ...corpus.slice(0, 150), ...generated.slice(0, 150)];
    for (const text of texts) {
      assert.deepEqual(g.encode(text, { parseSpecial: true }), [...model.tokenize(text, true)], `parseSpecial ${JSON.stringify(text)}`);
      assert.deepEqual(g.encode(text), [...model.tokenize(text, false)], `plain ${JSON.stringify(text)}`);
    }
    await model.dispose();
  } finally {
    await llama.dispose();
    fs.rmSync(path.dirname(file), { recursive: true, force: true });
  }
});

test('parseSpecial: "<s>" is BOS only when asked; "[INST]" is plain text in the v1 vocabulary', () => {
  const text = '<s>[INST] hi [/INST]';
  assert.deepEqual(tok.encode(text, { parseSpecial: true }), [tok.bosId, ...tok.encode('[INST] hi [/INST]')]);
  assert.ok(!tok.encode(text).includes(tok.bosId));
  assert.equal(tok.pieceToId('[INST]'), undefined);
  assert.equal(tok.encode('x</s>', { parseSpecial: true }).at(-1), tok.eosId);
  assert.deepEqual(tok.encode('hi', { addBos: true, addEos: true }), [1, ...tok.encode('hi'), 2]);
});

// ---------------------------------------------------------------------------------------------------------------
// Decoding

test('decode: round trip of every text that SentencePiece itself round-trips; control tokens and keepSpecial', () => {
  for (const text of [...corpus, ...generated]) {
    assert.equal(tok.decode(tok.encode(text)), text, JSON.stringify(text));
    assert.equal(tok.decode(tok.encode(text, { addBos: true, addEos: true })), text, JSON.stringify(text));
  }
  const hello = tok.encode('Hello');
  assert.equal(tok.decode([tok.bosId, ...hello, tok.eosId]), 'Hello');
  assert.equal(tok.decode([tok.bosId, ...hello, tok.eosId], { keepSpecial: true }), '<s> Hello</s>');
  assert.equal(tok.decode([tok.unkId]), '');
  assert.equal(tok.decode([tok.unkId], { keepSpecial: true }), '<unk>');
  assert.ok(tok.isControl(tok.bosId) && tok.isControl(tok.eosId) && tok.isControl(tok.unkId) && !tok.isControl(hello[0]!));
  assert.throws(() => tok.decode([32000]), RangeError);
  assert.throws(() => tok.decode([-1]), RangeError);
  assert.throws(() => tok.piece(1.5), RangeError);
});

test('decodeUtf8Bytes: one U+FFFD per byte that does not start a well-formed character, like SentencePiece', () => {
  const enc = new TextEncoder();
  for (const s of ['abc', 'é', '日本', '🦙', '\u{10FFFF}']) assert.equal(decodeUtf8Bytes(enc.encode(s)), s);
  assert.equal(decodeUtf8Bytes([0xf0, 0x9f, 0xa6]), '\uFFFD\uFFFD\uFFFD'); // truncated 4-byte sequence
  assert.equal(decodeUtf8Bytes([0xc0, 0x80]), '\uFFFD\uFFFD'); // overlong
  assert.equal(decodeUtf8Bytes([0xed, 0xa0, 0x80]), '\uFFFD\uFFFD\uFFFD'); // surrogate
  assert.equal(decodeUtf8Bytes([0xf4, 0x90, 0x80, 0x80]), '\uFFFD\uFFFD\uFFFD\uFFFD'); // above U+10FFFF
});

test('encode: a lone UTF-16 surrogate is tokenized as U+FFFD, the only UTF-8 form it has', () => {
  assert.deepEqual(tok.encode('a\ud800b'), tok.encode('a\uFFFDb'));
  assert.deepEqual(tok.encode('\udc00'), tok.encode('\uFFFD'));
  assert.deepEqual(tok.encode('🦙'), tok.encode('\ud83e\udd99')); // a proper pair is untouched
});

test('encode: 200 KB of mixed text runs through the priority-queue BPE and decodes back (speed sanity)', () => {
  const text = bigText();
  const ids = tok.encode(text);
  assert.ok(ids.length > 40_000);
  assert.equal(tok.decode(ids), text);
});

// ---------------------------------------------------------------------------------------------------------------
// Bad input

test('bad GGUF metadata: FormatError naming the file and key', () => {
  const base = new Map<string, unknown>(gguf.metadata);
  const variant = (changes: Record<string, unknown>) => {
    const m = new Map(base);
    for (const [k, v] of Object.entries(changes)) {
      if (v === undefined) m.delete(k);
      else m.set(k, v);
    }
    return m;
  };
  const expect = (changes: Record<string, unknown>, re: RegExp) =>
    assert.throws(() => tokenizerFromGGUFMetadata(variant(changes), 'x.gguf'), (e: unknown) => e instanceof FormatError && e.file === 'x.gguf' && re.test(e.message));
  expect({ 'tokenizer.ggml.model': 'gpt2' }, /tokenizer\.ggml\.model.*gpt2/);
  expect({ 'tokenizer.ggml.model': undefined }, /no tokenizer/);
  expect({ 'tokenizer.ggml.tokens': undefined }, /tokenizer\.ggml\.tokens/);
  expect({ 'tokenizer.ggml.tokens': [1, 2, 3] }, /array of strings/);
  expect({ 'tokenizer.ggml.scores': new Float32Array(5) }, /tokenizer\.ggml\.scores.*5 entries/);
  expect({ 'tokenizer.ggml.token_type': new Int32Array(32000).fill(9) }, /unknown type 9/);
  expect({ 'tokenizer.ggml.bos_token_id': 40000 }, /bos_token_id/);
  expect({ 'tokenizer.ggml.add_bos_token': 'yes' }, /add_bos_token.*bool/);
  expect({ 'tokenizer.ggml.scores': [Number.NaN, ...new Array<number>(31999).fill(0)] }, /scores.*entry 0/);
  // Plain values work too (a getter returning arrays and numbers).
  const plain: Record<string, unknown> = { 'tokenizer.ggml.model': 'llama', 'tokenizer.ggml.tokens': [...mistral.tokens], 'tokenizer.ggml.scores': Array.from(mistral.scores), 'tokenizer.ggml.token_type': Array.from(mistral.types), 'tokenizer.ggml.bos_token_id': 1n };
  assert.deepEqual(tokenizerFromGGUFMetadata((k) => plain[k]).encode(cases[2]!.text), cases[2]!.ids);
});

test('bad tokenizer.model: every truncation and many corruptions give a FormatError or a valid model, never a crash', () => {
  // A small model keeps this fast: the first 300 pieces of Mistral plus the specs.
  const small: VocabData = { ...mistral, tokens: mistral.tokens.slice(0, 300), scores: Array.from(mistral.scores).slice(0, 300), types: Array.from(mistral.types).slice(0, 300) };
  const bytes = writeSentencePieceModel(small);
  const tryParse = (b: Uint8Array, what: string) => {
    try {
      tokenizerFromSentencePieceModel(b);
    } catch (e) {
      assert.ok(e instanceof FormatError, `${what}: ${String(e)}`);
    }
  };
  for (let n = 0; n < bytes.length; n += 7) tryParse(bytes.subarray(0, n), `truncated to ${n}`);
  const r = rng(5);
  for (let i = 0; i < 3000; i++) {
    const b = bytes.slice();
    for (let k = 0; k < 1 + Math.floor(r() * 4); k++) b[Math.floor(r() * b.length)] = Math.floor(r() * 256);
    tryParse(b, `corruption ${i}`);
  }
  assert.throws(() => tokenizerFromSentencePieceModel(new Uint8Array(0)), FormatError);
  // A unigram model (model_type absent = UNIGRAM) and a NFKC normalizer are refused by name.
  const m = parseSentencePieceModel(bytes);
  assert.throws(() => vocabFromSentencePieceModel(serializeSentencePieceModel({ ...m, trainerSpec: { ...m.trainerSpec, modelType: ModelType.Unigram } })), /UNIGRAM/);
  assert.throws(() => vocabFromSentencePieceModel(serializeSentencePieceModel({ ...m, normalizerSpec: { ...m.normalizerSpec, name: 'nmt_nfkc', precompiledCharsmap: new Uint8Array(10) } })), /nmt_nfkc/);
  assert.throws(() => vocabFromSentencePieceModel(serializeSentencePieceModel({ ...m, trainerSpec: { ...m.trainerSpec, byteFallback: false } })), /byte_fallback/);
});

test('bad tokenizer.json: FormatError for non-SentencePiece tokenizers and broken fields', () => {
  const good = tokenizerJsonFromVocab({ ...mistral, tokens: mistral.tokens.slice(0, 400), scores: Array.from(mistral.scores).slice(0, 400), types: Array.from(mistral.types).slice(0, 400) });
  const model = good['model'] as Record<string, unknown>;
  const expect = (j: unknown, re: RegExp) => assert.throws(() => vocabFromTokenizerJson(j, { file: 't.json' }), (e: unknown) => e instanceof FormatError && e.file === 't.json' && re.test(e.message));
  expect('{', /not valid JSON/);
  expect({ ...good, model: { ...model, type: 'Unigram' } }, /model\.type/);
  expect({ ...good, normalizer: null, pre_tokenizer: { type: 'ByteLevel' } }, /SentencePiece-style.*ByteLevel/);
  expect({ ...good, model: { ...model, vocab: { a: 0, b: 2 } }, added_tokens: [] }, /not contiguous/);
  expect({ ...good, model: { ...model, merges: ['a b c'] } }, /merges\[0\]/);
  expect({ ...good, normalizer: { type: 'Sequence', normalizers: [{ type: 'NFKC' }, { type: 'Replace', pattern: { String: ' ' }, content: '▁' }] } }, /NFKC/);
  assert.equal(tokenizerFromTokenizerJson(good).vocabSize, 400);
});

test('tokenizer.json whose merges do not follow the SentencePiece score rule: scores follow merge rank', () => {
  // Reverse the priority of two merges: "▁t" (rank 0) now comes after "in" and "er".
  const j = tokenizerJsonFromVocab(mistral);
  const model = j['model'] as { merges: string[] };
  const merges = [...model.merges];
  merges.splice(0, 1);
  merges.splice(2, 0, '▁ t');
  const t = tokenizerFromTokenizerJson({ ...j, model: { ...model, merges } });
  const id = (p: string) => t.pieceToId(p)!;
  assert.ok(t.score(id('▁t')) < t.score(id('er')) && t.score(id('▁t')) > t.score(id('▁a')));
  // Scores follow first-merge rank for every merged piece.
  const rankOf = new Map<string, number>();
  merges.forEach((m, i) => {
    const p = m.replace(' ', '');
    if (!rankOf.has(p)) rankOf.set(p, i);
  });
  for (const [p, r] of [...rankOf].slice(0, 2000)) assert.equal(t.score(id(p)), -r, p);
});
