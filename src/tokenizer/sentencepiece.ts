/**
 * SentencePiece BPE with byte fallback: the tokenizer of Mistral v1 / Mixtral (and Llama 1/2), reproducing
 * SentencePiece's ids exactly (sentencepiece_processor.cc, normalizer.cc, bpe_model.cc; llama.cpp's
 * llm_tokenizer_spm is the same algorithm).
 *
 * Encoding: normalize (spaces -> U+2581 "▁", a dummy "▁" in front), split into Unicode characters (user-defined
 * pieces stay whole), then repeatedly merge the adjacent pair whose concatenation is a vocabulary piece with the
 * highest score (ties: leftmost), using a priority queue over a linked list of symbols. A final symbol that is not
 * a piece is spelled as its UTF-8 bytes with the <0xNN> byte tokens.
 */
import type { Tokenizer } from '../model/types.js';

/** SentencePiece piece types (ModelProto.SentencePiece.Type), the numbering GGUF's tokenizer.ggml.token_type uses. */
export const TokenType = {
  Normal: 1,
  Unknown: 2,
  Control: 3,
  UserDefined: 4,
  Unused: 5,
  Byte: 6,
} as const;
export type TokenTypeId = (typeof TokenType)[keyof typeof TokenType];

/** Everything a SentencePiece BPE vocabulary is; what every source (GGUF, tokenizer.json, tokenizer.model) yields. */
export interface VocabData {
  /** Piece strings, index = id ("▁the", "<0x0A>", "<s>"). */
  tokens: readonly string[];
  /** Merge priority of each piece (higher merges first); stored as float32, as SentencePiece and GGUF do. */
  scores: Float32Array | readonly number[];
  /** TokenType of each piece. */
  types: Int32Array | readonly number[];
  bosId: number;
  eosId: number;
  unkId: number;
  /** Whether the model's prompts start with BOS (GGUF tokenizer.ggml.add_bos_token). */
  addBos: boolean;
  /** Whether encode appends EOS (GGUF tokenizer.ggml.add_eos_token); false for Mistral. */
  addEos?: boolean;
  /** NormalizerSpec.add_dummy_prefix (GGUF tokenizer.ggml.add_space_prefix); default true. */
  addDummyPrefix?: boolean;
  /** NormalizerSpec.remove_extra_whitespaces: drop leading/trailing spaces, collapse runs; default false. */
  removeExtraWhitespaces?: boolean;
}

export interface EncodeOptions {
  /** Prepend BOS. Default: false (SentencePiece's EncodeAsIds). */
  addBos?: boolean;
  /** Append EOS. Default false. */
  addEos?: boolean;
  /**
   * Recognise the text of control tokens ("<s>", "</s>", "<unk>") as those tokens, as llama.cpp's parse_special
   * does: the text is cut at each occurrence (longest token first) and each text fragment after a control token
   * gets the dummy-prefix space again. Off (default): "<s>" is plain text, as in SentencePiece.
   */
  parseSpecial?: boolean;
}

export interface DecodeOptions {
  /** Control and unknown tokens decode to their piece text ("<s>") instead of "". */
  keepSpecial?: boolean;
}

const SPACE = '\u2581'; // "▁", SentencePiece's kSpaceSymbol
const utf8Encoder = new TextEncoder();
const BYTE_PIECE = /^<0x([0-9A-F]{2})>$/;

/** A vocabulary that cannot be used (inconsistent lengths, ids out of range, ...). Sources wrap it in a FormatError. */
export class VocabError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'VocabError';
  }
}

/**
 * The byte a byte piece stands for, or -1. SentencePiece writes byte pieces as <0xNN> with upper-case hex;
 * llama.cpp accepts the same form.
 */
export function byteOfPiece(piece: string): number {
  const m = BYTE_PIECE.exec(piece);
  return m ? parseInt(m[1]!, 16) : -1;
}

/** The byte piece of a byte: 0x0A -> "<0x0A>". */
export function pieceOfByte(b: number): string {
  return `<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`;
}

// Lone UTF-16 surrogates cannot be UTF-8-encoded; SentencePiece only ever sees the U+FFFD that TextEncoder (and
// every UTF-8 conversion of a JS string) puts in their place, so the tokenizer does the same.
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g;

/**
 * A binary max-heap of candidate merges in parallel typed arrays (no object per candidate): a 200 KB text makes
 * a few hundred thousand candidates. Order: higher score first, then smaller left index, as SentencePiece's
 * SymbolPairComparator and llama.cpp's llm_bigram_spm.
 */
class MergeQueue {
  score = new Float32Array(64);
  left = new Int32Array(64);
  right = new Int32Array(64);
  size = new Int32Array(64);
  n = 0;

  private before(i: number, j: number): boolean {
    const si = this.score[i]!;
    const sj = this.score[j]!;
    return si > sj || (si === sj && this.left[i]! < this.left[j]!);
  }

  private swap(i: number, j: number): void {
    let t = this.score[i]!; this.score[i] = this.score[j]!; this.score[j] = t;
    t = this.left[i]!; this.left[i] = this.left[j]!; this.left[j] = t;
    t = this.right[i]!; this.right[i] = this.right[j]!; this.right[j] = t;
    t = this.size[i]!; this.size[i] = this.size[j]!; this.size[j] = t;
  }

  push(score: number, left: number, right: number, size: number): void {
    if (this.n === this.score.length) {
      const cap = this.n * 2;
      const grow = <T extends Float32Array | Int32Array>(a: T, make: (n: number) => T): T => {
        const b = make(cap);
        b.set(a);
        return b;
      };
      this.score = grow(this.score, (k) => new Float32Array(k));
      this.left = grow(this.left, (k) => new Int32Array(k));
      this.right = grow(this.right, (k) => new Int32Array(k));
      this.size = grow(this.size, (k) => new Int32Array(k));
    }
    let i = this.n++;
    this.score[i] = score;
    this.left[i] = left;
    this.right[i] = right;
    this.size[i] = size;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.before(i, p)) break;
      this.swap(i, p);
      i = p;
    }
  }

  /** Moves the top entry to slot `n` (past the end) and returns its index there; read it before the next push. */
  pop(): number {
    const last = --this.n;
    this.swap(0, last);
    let i = 0;
    for (;;) {
      const l = 2 * i + 1;
      if (l >= last) break;
      const r = l + 1;
      const c = r < last && this.before(r, l) ? r : l;
      if (!this.before(c, i)) break;
      this.swap(c, i);
      i = c;
    }
    return last;
  }
}

export class SentencePieceTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bosId: number;
  readonly eosId: number;
  readonly unkId: number;
  readonly addBos: boolean;
  readonly addEos: boolean;
  readonly addDummyPrefix: boolean;
  readonly removeExtraWhitespaces: boolean;

  private readonly tokens: readonly string[];
  private readonly scores: Float32Array;
  private readonly types: Int32Array;
  /** SentencePiece's pieces_: normal, user-defined and unused pieces, the ones merges may produce. */
  private readonly pieces = new Map<string, number>();
  /** SentencePiece's reserved_id_map_: control, unknown and byte pieces, looked up first by PieceToId. */
  private readonly reserved = new Map<string, number>();
  /** byte -> id of its <0xNN> piece, or -1. */
  private readonly byteIds = new Int32Array(256).fill(-1);
  private readonly hasBytePieces: boolean;
  /** Longest piece among `pieces`, in UTF-16 units: longer candidate pairs need no lookup. */
  private readonly maxPieceLength: number;
  /** User-defined pieces by first UTF-16 unit, longest first (SentencePiece's PrefixMatcher). */
  private readonly userDefined = new Map<number, string[]>();
  /** Control and unknown tokens, longest text first: what parseSpecial cuts the text at. */
  private readonly specials: { text: string; id: number }[] = [];

  constructor(vocab: VocabData) {
    const n = vocab.tokens.length;
    if (n === 0) throw new VocabError('the vocabulary is empty');
    if (vocab.scores.length !== n) throw new VocabError(`${n} tokens but ${vocab.scores.length} scores`);
    if (vocab.types.length !== n) throw new VocabError(`${n} tokens but ${vocab.types.length} token types`);
    this.vocabSize = n;
    this.tokens = Array.from(vocab.tokens);
    this.scores = Float32Array.from(vocab.scores);
    this.types = Int32Array.from(vocab.types);
    for (const [name, id] of [['bos', vocab.bosId], ['eos', vocab.eosId], ['unk', vocab.unkId]] as const) {
      if (!Number.isInteger(id) || id < 0 || id >= n) throw new VocabError(`${name} id ${id} is outside the vocabulary [0, ${n})`);
    }
    this.bosId = vocab.bosId;
    this.eosId = vocab.eosId;
    this.unkId = vocab.unkId;
    this.addBos = vocab.addBos;
    this.addEos = vocab.addEos ?? false;
    this.addDummyPrefix = vocab.addDummyPrefix ?? true;
    this.removeExtraWhitespaces = vocab.removeExtraWhitespaces ?? false;

    let maxLen = 0;
    for (let id = 0; id < n; id++) {
      const piece = this.tokens[id];
      if (typeof piece !== 'string') throw new VocabError(`token ${id} is not a string`);
      if (piece.length === 0) throw new VocabError(`token ${id} is the empty string`);
      const type = this.types[id]!;
      if (type < TokenType.Normal || type > TokenType.Byte) throw new VocabError(`token ${id} (${JSON.stringify(piece)}) has unknown type ${type}`);
      if (!Number.isFinite(this.scores[id]!)) throw new VocabError(`token ${id} (${JSON.stringify(piece)}) has score ${this.scores[id]}`);
      // A piece listed twice keeps its first id (SentencePiece refuses such a model; GGUF files in the wild have them).
      if (type === TokenType.Normal || type === TokenType.UserDefined || type === TokenType.Unused) {
        if (!this.pieces.has(piece)) this.pieces.set(piece, id);
        if (piece.length > maxLen) maxLen = piece.length;
        if (type === TokenType.UserDefined) {
          const k = piece.charCodeAt(0);
          let list = this.userDefined.get(k);
          if (!list) this.userDefined.set(k, (list = []));
          list.push(piece);
        }
      } else {
        if (!this.reserved.has(piece)) this.reserved.set(piece, id);
        if (type === TokenType.Byte) {
          const b = byteOfPiece(piece);
          if (b < 0) throw new VocabError(`token ${id} has type byte but its piece ${JSON.stringify(piece)} is not <0xNN>`);
          if (this.byteIds[b] === -1) this.byteIds[b] = id;
        } else {
          this.specials.push({ text: piece, id });
        }
      }
    }
    this.maxPieceLength = maxLen;
    this.hasBytePieces = this.byteIds.some((x) => x >= 0);
    for (const list of this.userDefined.values()) list.sort((a, b) => b.length - a.length);
    // llama.cpp sorts its special-token cache by length, longest first; ties keep id order here.
    this.specials.sort((a, b) => b.text.length - a.text.length || a.id - b.id);
  }

  /** The vocabulary this tokenizer was built from (for the writers of tokenizer.model / tokenizer.json / GGUF); a copy. */
  get vocab(): VocabData {
    return {
      tokens: this.tokens.slice(),
      scores: this.scores.slice(),
      types: this.types.slice(),
      bosId: this.bosId,
      eosId: this.eosId,
      unkId: this.unkId,
      addBos: this.addBos,
      addEos: this.addEos,
      addDummyPrefix: this.addDummyPrefix,
      removeExtraWhitespaces: this.removeExtraWhitespaces,
    };
  }

  piece(id: number): string {
    this.checkId(id);
    return this.tokens[id]!;
  }

  score(id: number): number {
    this.checkId(id);
    return this.scores[id]!;
  }

  tokenType(id: number): TokenTypeId {
    this.checkId(id);
    return this.types[id]! as TokenTypeId;
  }

  isControl(id: number): boolean {
    this.checkId(id);
    const t = this.types[id];
    return t === TokenType.Control || t === TokenType.Unknown;
  }

  /** SentencePiece's PieceToId: the id of a piece string, or undefined when the vocabulary lacks it. */
  pieceToId(piece: string): number | undefined {
    return this.reserved.get(piece) ?? this.pieces.get(piece);
  }

  private checkId(id: number): void {
    if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) throw new RangeError(`token id ${id} is outside the vocabulary [0, ${this.vocabSize})`);
  }

  encode(text: string, opts: EncodeOptions = {}): number[] {
    if (typeof text !== 'string') throw new TypeError(`encode expects a string, got ${typeof text}`);
    text = text.replace(LONE_SURROGATE, '\uFFFD');
    const out: number[] = [];
    if (opts.addBos) out.push(this.bosId);
    if (!opts.parseSpecial || this.specials.length === 0) {
      this.encodeText(text, out);
    } else {
      // As llama.cpp's tokenizer_st_partition: cut at every occurrence of each special text, longest first.
      let frags: (string | number)[] = text.length > 0 ? [text] : [];
      for (const { text: sp, id } of this.specials) {
        const next: (string | number)[] = [];
        for (const f of frags) {
          if (typeof f === 'number') {
            next.push(f);
            continue;
          }
          let from = 0;
          for (let at = f.indexOf(sp); at >= 0; at = f.indexOf(sp, from)) {
            if (at > from) next.push(f.slice(from, at));
            next.push(id);
            from = at + sp.length;
          }
          if (from < f.length) next.push(f.slice(from));
        }
        frags = next;
      }
      // Every text fragment is normalized on its own, so each gets the dummy prefix: llama.cpp prefixes a space
      // to the first fragment and to each one that follows a special token, which is every fragment here.
      for (const f of frags) {
        if (typeof f === 'number') out.push(f);
        else this.encodeText(f, out);
      }
    }
    if (opts.addEos) out.push(this.eosId);
    return out;
  }

  /** SentencePiece's normalizer (identity rule): whitespace escaping, dummy prefix, optional space cleanup. */
  normalize(text: string): string {
    if (this.removeExtraWhitespaces) {
      text = text.replace(/ +/g, ' ').replace(/^ /, '').replace(/ $/, '');
    }
    if (text.length === 0) return '';
    if (this.addDummyPrefix) text = ' ' + text;
    return text.replaceAll(' ', SPACE);
  }

  private encodeText(text: string, out: number[]): void {
    const s = this.normalize(text);
    if (s.length === 0) return;

    // Symbols: one per character (or user-defined piece), as [start, end) into s, in a doubly linked list.
    const cap = s.length;
    const start = new Int32Array(cap);
    const end = new Int32Array(cap);
    const prev = new Int32Array(cap);
    const next = new Int32Array(cap);
    const frozen = this.userDefined.size > 0 ? new Uint8Array(cap) : undefined;
    let count = 0;
    for (let i = 0; i < s.length; ) {
      let len = 0;
      if (frozen) {
        const list = this.userDefined.get(s.charCodeAt(i));
        if (list) {
          for (const u of list) {
            if (s.startsWith(u, i)) {
              len = u.length;
              frozen[count] = 1;
              break;
            }
          }
        }
      }
      if (len === 0) {
        const c = s.charCodeAt(i);
        len = c >= 0xd800 && c <= 0xdbff && i + 1 < s.length ? 2 : 1; // surrogates are paired by now
      }
      start[count] = i;
      end[count] = i + len;
      prev[count] = count - 1;
      next[count] = i + len < s.length ? count + 1 : -1;
      count++;
      i += len;
    }

    const q = new MergeQueue();
    const pieces = this.pieces;
    const scores = this.scores;
    const maxLen = this.maxPieceLength;
    let revMerge: Map<string, [string, string]> | undefined;
    const tryPair = (l: number, r: number): void => {
      if (l < 0 || r < 0 || (frozen && (frozen[l] || frozen[r]))) return;
      const size = end[r]! - start[l]!;
      if (size > maxLen) return;
      const piece = s.slice(start[l]!, end[r]!);
      const id = pieces.get(piece);
      if (id === undefined) return;
      q.push(scores[id]!, l, r, size);
      // Unused pieces may be formed but are spelled out again at the end (bpe_model.cc's resegment).
      if (this.types[id] === TokenType.Unused) {
        (revMerge ??= new Map()).set(piece, [s.slice(start[l]!, end[l]!), s.slice(start[r]!, end[r]!)]);
      }
    };
    for (let i = 1; i < count; i++) tryPair(i - 1, i);

    while (q.n > 0) {
      const top = q.pop();
      const l = q.left[top]!;
      const r = q.right[top]!;
      // Stale entry: one side was merged away or grew since the pair was queued (SentencePiece's same test).
      if (end[l] === start[l] || end[r] === start[r] || end[l]! - start[l]! + end[r]! - start[r]! !== q.size[top]) continue;
      end[l] = end[r]!;
      end[r] = start[r]!; // empty: merged away
      next[l] = next[r]!;
      if (next[r]! >= 0) prev[next[r]!] = l;
      tryPair(prev[l]!, l);
      tryPair(l, next[l]!);
    }

    for (let i = 0; i !== -1; i = next[i]!) this.emit(s.slice(start[i]!, end[i]!), out, revMerge);
  }

  private emit(piece: string, out: number[], revMerge: Map<string, [string, string]> | undefined): void {
    const id = this.reserved.get(piece) ?? this.pieces.get(piece);
    if (id !== undefined) {
      const split = this.types[id] === TokenType.Unused ? revMerge?.get(piece) : undefined;
      if (split) {
        this.emit(split[0], out, revMerge);
        this.emit(split[1], out, revMerge);
      } else {
        out.push(id);
      }
      return;
    }
    // Not a piece: spell its UTF-8 bytes with byte tokens (byte fallback; a byte without its piece is <unk>), or
    // one <unk> for the whole symbol in a vocabulary without byte pieces, as SentencePiece does.
    if (!this.hasBytePieces) {
      out.push(this.unkId);
      return;
    }
    for (const b of utf8Encoder.encode(piece)) {
      const bid = this.byteIds[b]!;
      out.push(bid >= 0 ? bid : this.unkId);
    }
  }

  /**
   * SentencePiece's DecodeIds: "▁" -> " ", the leading space of the first piece that starts with "▁" before any
   * visible text is dropped (it is the dummy prefix), runs of byte tokens are decoded as UTF-8 with one U+FFFD
   * per invalid byte. Control and unknown tokens decode to "" unless keepSpecial (llama.cpp prints nothing for
   * <unk> either; SentencePiece would print " ⁇ ").
   */
  decode(ids: readonly number[], opts: DecodeOptions = {}): string {
    const keep = opts.keepSpecial ?? false;
    let text = '';
    let bytes: number[] = [];
    let isBosWs = true;
    let bosWsSeen = false;
    for (const id of ids) {
      this.checkId(id);
      const type = this.types[id]!;
      if (type === TokenType.Byte) {
        bytes.push(byteOfPiece(this.tokens[id]!));
        continue;
      }
      if (bytes.length > 0) {
        text += decodeUtf8Bytes(bytes);
        bytes = [];
      }
      if (bosWsSeen || text.length > 0) isBosWs = false;
      let piece = this.tokens[id]!;
      if (type === TokenType.Control || type === TokenType.Unknown) {
        if (keep) text += piece;
        bosWsSeen = false;
        continue;
      }
      bosWsSeen = false;
      if (isBosWs && (this.addDummyPrefix || this.removeExtraWhitespaces) && piece.startsWith(SPACE)) {
        piece = piece.slice(1);
        bosWsSeen = !this.removeExtraWhitespaces;
      }
      text += piece.replaceAll(SPACE, ' ');
    }
    if (bytes.length > 0) text += decodeUtf8Bytes(bytes);
    return text;
  }
}

/**
 * UTF-8 bytes -> string the way SentencePiece's DecodeUTF8 does it: each well-formed character as itself, each
 * byte that does not start one as U+FFFD (TextDecoder would fold a truncated sequence into one U+FFFD).
 */
export function decodeUtf8Bytes(b: readonly number[] | Uint8Array): string {
  let out = '';
  const n = b.length;
  const trail = (i: number) => i < n && (b[i]! & 0xc0) === 0x80;
  for (let i = 0; i < n; ) {
    const c = b[i]!;
    let cp = -1;
    let len = 1;
    if (c < 0x80) {
      cp = c;
    } else if ((c & 0xe0) === 0xc0 && trail(i + 1)) {
      const v = ((c & 0x1f) << 6) | (b[i + 1]! & 0x3f);
      if (v >= 0x80) { cp = v; len = 2; }
    } else if ((c & 0xf0) === 0xe0 && trail(i + 1) && trail(i + 2)) {
      const v = ((c & 0x0f) << 12) | ((b[i + 1]! & 0x3f) << 6) | (b[i + 2]! & 0x3f);
      if (v >= 0x800 && (v < 0xd800 || v > 0xdfff)) { cp = v; len = 3; }
    } else if ((c & 0xf8) === 0xf0 && trail(i + 1) && trail(i + 2) && trail(i + 3)) {
      const v = ((c & 0x07) << 18) | ((b[i + 1]! & 0x3f) << 12) | ((b[i + 2]! & 0x3f) << 6) | (b[i + 3]! & 0x3f);
      if (v >= 0x10000 && v <= 0x10ffff) { cp = v; len = 4; }
    }
    out += cp < 0 ? '\uFFFD' : String.fromCodePoint(cp);
    i += len;
  }
  return out;
}
