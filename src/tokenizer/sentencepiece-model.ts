/**
 * A minimal protobuf reader and writer for SentencePiece's ModelProto (`tokenizer.model`), just the fields a BPE
 * tokenizer needs (src/sentencepiece_model.proto of google/sentencepiece):
 *
 *   ModelProto     { repeated SentencePiece pieces = 1; TrainerSpec trainer_spec = 2; NormalizerSpec normalizer_spec = 3; }
 *   SentencePiece  { string piece = 1; float score = 2; Type type = 3 [default NORMAL]; }
 *   TrainerSpec    { ModelType model_type = 3 [UNIGRAM]; int32 vocab_size = 4; int32 max_sentencepiece_length = 20;
 *                    bool treat_whitespace_as_suffix = 24; bool split_digits = 25; bool allow_whitespace_only_pieces = 26;
 *                    bool byte_fallback = 35; int32 unk_id = 40 [0]; int32 bos_id = 41 [1]; int32 eos_id = 42 [2];
 *                    int32 pad_id = 43 [-1]; string unk_surface = 44; string unk_piece = 45 ["<unk>"];
 *                    string bos_piece = 46 ["<s>"]; string eos_piece = 47 ["</s>"]; string pad_piece = 48 ["<pad>"]; }
 *   NormalizerSpec { string name = 1; bytes precompiled_charsmap = 2; bool add_dummy_prefix = 3 [true];
 *                    bool remove_extra_whitespaces = 4 [true]; bool escape_whitespaces = 5 [true]; }
 *
 * Other fields are skipped when reading. Every read is bounds-checked; bad input raises a FormatError naming the
 * file and the field.
 */
import { FormatError } from '../formats/errors.js';

export const ModelType = { Unigram: 1, BPE: 2, Word: 3, Char: 4 } as const;

export interface SentencePieceEntry {
  piece: string;
  score: number;
  /** ModelProto.SentencePiece.Type: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. */
  type: number;
}

export interface TrainerSpec {
  modelType: number;
  vocabSize: number;
  maxSentencepieceLength: number;
  treatWhitespaceAsSuffix: boolean;
  splitDigits: boolean;
  allowWhitespaceOnlyPieces: boolean;
  byteFallback: boolean;
  unkId: number;
  bosId: number;
  eosId: number;
  padId: number;
  unkSurface: string;
  unkPiece: string;
  bosPiece: string;
  eosPiece: string;
  padPiece: string;
}

export interface NormalizerSpec {
  name: string;
  precompiledCharsmap: Uint8Array;
  addDummyPrefix: boolean;
  removeExtraWhitespaces: boolean;
  escapeWhitespaces: boolean;
}

export interface SentencePieceModel {
  pieces: SentencePieceEntry[];
  trainerSpec: TrainerSpec;
  normalizerSpec: NormalizerSpec;
}

/** The proto's defaults: what a field that is absent from the file means. */
export function defaultTrainerSpec(): TrainerSpec {
  return {
    modelType: ModelType.Unigram, vocabSize: 8000, maxSentencepieceLength: 16, treatWhitespaceAsSuffix: false,
    splitDigits: false, allowWhitespaceOnlyPieces: false, byteFallback: false, unkId: 0, bosId: 1, eosId: 2,
    padId: -1, unkSurface: ' \u2047 ', unkPiece: '<unk>', bosPiece: '<s>', eosPiece: '</s>', padPiece: '<pad>',
  };
}

export function defaultNormalizerSpec(): NormalizerSpec {
  return { name: '', precompiledCharsmap: new Uint8Array(0), addDummyPrefix: true, removeExtraWhitespaces: true, escapeWhitespaces: true };
}

// ---------------------------------------------------------------------------------------------------------------
// Reading

const WIRE_VARINT = 0;
const WIRE_I64 = 1;
const WIRE_LEN = 2;
const WIRE_I32 = 5;

// ignoreBOM: a piece may be U+FEFF itself (Mistral v1 id 31759), which a default TextDecoder would drop.
const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

class ProtoReader {
  pos: number;
  /** Low 32 bits of the last varint, as int32: how protobuf reads a (possibly negative) int32 field. */
  lo = 0;

  constructor(
    readonly bytes: Uint8Array,
    readonly file: string,
    start: number,
    readonly end: number,
    readonly where: string,
  ) {
    this.pos = start;
  }

  fail(msg: string): never {
    throw new FormatError(this.file, `${this.where}: ${msg}`);
  }

  /** A varint as a JS number (exact up to 2^53); `lo` gets its low 32 bits. */
  varint(field: string): number {
    let value = 0;
    let lo = 0;
    for (let i = 0; ; i++) {
      if (i === 10) this.fail(`${field}: varint longer than 10 bytes`);
      if (this.pos >= this.end) this.fail(`${field}: truncated varint at byte ${this.pos}`);
      const b = this.bytes[this.pos++]!;
      if (i < 5) lo |= (b & 0x7f) << (7 * i);
      value += (b & 0x7f) * 2 ** (7 * i);
      if ((b & 0x80) === 0) break;
    }
    this.lo = lo | 0;
    return value;
  }

  /** Reads a field key; returns [fieldNumber, wireType]. */
  key(): [number, number] {
    const k = this.varint('field key');
    const field = Math.floor(k / 8);
    if (field === 0) this.fail(`field number 0 at byte ${this.pos}`);
    return [field, k % 8];
  }

  /** A length-delimited field's [start, end). */
  span(field: string): [number, number] {
    const len = this.varint(field);
    if (len > this.end - this.pos) this.fail(`${field}: length ${len} runs past the end of its message (${this.end - this.pos} bytes left)`);
    const s = this.pos;
    this.pos += len;
    return [s, this.pos];
  }

  string(field: string): string {
    const [s, e] = this.span(field);
    try {
      return utf8.decode(this.bytes.subarray(s, e));
    } catch {
      return this.fail(`${field}: not valid UTF-8`);
    }
  }

  float(field: string): number {
    if (this.end - this.pos < 4) this.fail(`${field}: truncated float`);
    const v = new DataView(this.bytes.buffer, this.bytes.byteOffset + this.pos, 4).getFloat32(0, true);
    this.pos += 4;
    return v;
  }

  skip(wire: number, field: number): void {
    switch (wire) {
      case WIRE_VARINT: this.varint(`field ${field}`); return;
      case WIRE_I64:
        if (this.end - this.pos < 8) this.fail(`field ${field}: truncated`);
        this.pos += 8;
        return;
      case WIRE_LEN: this.span(`field ${field}`); return;
      case WIRE_I32:
        if (this.end - this.pos < 4) this.fail(`field ${field}: truncated`);
        this.pos += 4;
        return;
      default: this.fail(`field ${field} has wire type ${wire}, which this reader does not accept (groups or garbage)`);
    }
  }

  expect(wire: number, want: number, field: string): void {
    if (wire !== want) this.fail(`${field} has wire type ${wire}, expected ${want}`);
  }

  sub(where: string): ProtoReader {
    const [s, e] = this.span(where);
    return new ProtoReader(this.bytes, this.file, s, e, where);
  }
}

/** Parses a SentencePiece `tokenizer.model` (a serialized ModelProto). */
export function parseSentencePieceModel(bytes: Uint8Array, file = 'tokenizer.model'): SentencePieceModel {
  const r = new ProtoReader(bytes, file, 0, bytes.length, 'ModelProto');
  const pieces: SentencePieceEntry[] = [];
  const trainerSpec = defaultTrainerSpec();
  const normalizerSpec = defaultNormalizerSpec();
  while (r.pos < r.end) {
    const [field, wire] = r.key();
    if (field === 1) {
      r.expect(wire, WIRE_LEN, 'pieces');
      pieces.push(readPiece(r.sub(`pieces[${pieces.length}]`)));
    } else if (field === 2) {
      r.expect(wire, WIRE_LEN, 'trainer_spec');
      readTrainerSpec(r.sub('trainer_spec'), trainerSpec);
    } else if (field === 3) {
      r.expect(wire, WIRE_LEN, 'normalizer_spec');
      readNormalizerSpec(r.sub('normalizer_spec'), normalizerSpec);
    } else {
      r.skip(wire, field);
    }
  }
  if (pieces.length === 0) throw new FormatError(file, 'ModelProto has no pieces (is this a SentencePiece model?)');
  return { pieces, trainerSpec, normalizerSpec };
}

function readPiece(r: ProtoReader): SentencePieceEntry {
  const e: SentencePieceEntry = { piece: '', score: 0, type: 1 };
  let hasPiece = false;
  while (r.pos < r.end) {
    const [field, wire] = r.key();
    if (field === 1) {
      r.expect(wire, WIRE_LEN, 'piece');
      e.piece = r.string('piece');
      hasPiece = true;
    } else if (field === 2) {
      r.expect(wire, WIRE_I32, 'score');
      e.score = r.float('score');
    } else if (field === 3) {
      r.expect(wire, WIRE_VARINT, 'type');
      r.varint('type');
      e.type = r.lo;
    } else {
      r.skip(wire, field);
    }
  }
  if (!hasPiece || e.piece.length === 0) r.fail('piece is missing or empty');
  return e;
}

function readTrainerSpec(r: ProtoReader, t: TrainerSpec): void {
  while (r.pos < r.end) {
    const [field, wire] = r.key();
    const int = (name: string) => { r.expect(wire, WIRE_VARINT, name); r.varint(name); return r.lo; };
    switch (field) {
      case 3: t.modelType = int('model_type'); break;
      case 4: t.vocabSize = int('vocab_size'); break;
      case 20: t.maxSentencepieceLength = int('max_sentencepiece_length'); break;
      case 24: t.treatWhitespaceAsSuffix = int('treat_whitespace_as_suffix') !== 0; break;
      case 25: t.splitDigits = int('split_digits') !== 0; break;
      case 26: t.allowWhitespaceOnlyPieces = int('allow_whitespace_only_pieces') !== 0; break;
      case 35: t.byteFallback = int('byte_fallback') !== 0; break;
      case 40: t.unkId = int('unk_id'); break;
      case 41: t.bosId = int('bos_id'); break;
      case 42: t.eosId = int('eos_id'); break;
      case 43: t.padId = int('pad_id'); break;
      case 44: r.expect(wire, WIRE_LEN, 'unk_surface'); t.unkSurface = r.string('unk_surface'); break;
      case 45: r.expect(wire, WIRE_LEN, 'unk_piece'); t.unkPiece = r.string('unk_piece'); break;
      case 46: r.expect(wire, WIRE_LEN, 'bos_piece'); t.bosPiece = r.string('bos_piece'); break;
      case 47: r.expect(wire, WIRE_LEN, 'eos_piece'); t.eosPiece = r.string('eos_piece'); break;
      case 48: r.expect(wire, WIRE_LEN, 'pad_piece'); t.padPiece = r.string('pad_piece'); break;
      default: r.skip(wire, field);
    }
  }
}

function readNormalizerSpec(r: ProtoReader, n: NormalizerSpec): void {
  while (r.pos < r.end) {
    const [field, wire] = r.key();
    const bool = (name: string) => { r.expect(wire, WIRE_VARINT, name); return r.varint(name) !== 0; };
    switch (field) {
      case 1: r.expect(wire, WIRE_LEN, 'name'); n.name = r.string('name'); break;
      case 2: {
        r.expect(wire, WIRE_LEN, 'precompiled_charsmap');
        const [s, e] = r.span('precompiled_charsmap');
        n.precompiledCharsmap = r.bytes.slice(s, e);
        break;
      }
      case 3: n.addDummyPrefix = bool('add_dummy_prefix'); break;
      case 4: n.removeExtraWhitespaces = bool('remove_extra_whitespaces'); break;
      case 5: n.escapeWhitespaces = bool('escape_whitespaces'); break;
      default: r.skip(wire, field);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Writing

class ProtoWriter {
  buf = new Uint8Array(1 << 16);
  n = 0;

  private room(k: number): void {
    if (this.n + k <= this.buf.length) return;
    let cap = this.buf.length * 2;
    while (cap < this.n + k) cap *= 2;
    const b = new Uint8Array(cap);
    b.set(this.buf.subarray(0, this.n));
    this.buf = b;
  }

  rawVarint(v: number): void {
    this.room(10);
    // Negative int32 values are written as 10-byte two's-complement varints, as protobuf does.
    if (v < 0) {
      let lo = v >>> 0;
      let hi = 0xffffffff;
      for (let i = 0; i < 9; i++) {
        this.buf[this.n++] = (lo & 0x7f) | 0x80;
        lo = (lo >>> 7) | ((hi & 0x7f) << 25);
        hi >>>= 7;
      }
      this.buf[this.n++] = 0x01;
      return;
    }
    while (v >= 0x80) {
      this.buf[this.n++] = (v % 128) | 0x80;
      v = Math.floor(v / 128);
    }
    this.buf[this.n++] = v;
  }

  key(field: number, wire: number): void {
    this.rawVarint(field * 8 + wire);
  }

  int(field: number, v: number): void {
    this.key(field, WIRE_VARINT);
    this.rawVarint(v);
  }

  bool(field: number, v: boolean): void {
    this.int(field, v ? 1 : 0);
  }

  bytes(field: number, b: Uint8Array): void {
    this.key(field, WIRE_LEN);
    this.rawVarint(b.length);
    this.room(b.length);
    this.buf.set(b, this.n);
    this.n += b.length;
  }

  string(field: number, s: string): void {
    this.bytes(field, utf8Encoder.encode(s));
  }

  float(field: number, v: number): void {
    this.key(field, WIRE_I32);
    this.room(4);
    new DataView(this.buf.buffer, this.n, 4).setFloat32(0, v, true);
    this.n += 4;
  }

  message(field: number, fill: (w: ProtoWriter) => void): void {
    const w = new ProtoWriter();
    fill(w);
    this.bytes(field, w.result());
  }

  result(): Uint8Array {
    return this.buf.slice(0, this.n);
  }
}

const utf8Encoder = new TextEncoder();

/** Serializes a ModelProto. Fields equal to nothing in particular are still written, so the file is explicit. */
export function serializeSentencePieceModel(m: SentencePieceModel): Uint8Array {
  const w = new ProtoWriter();
  for (const p of m.pieces) {
    w.message(1, (pw) => {
      pw.string(1, p.piece);
      pw.float(2, p.score);
      if (p.type !== 1) pw.int(3, p.type); // NORMAL is the default, and SentencePiece's trainer leaves it out
    });
  }
  const t = m.trainerSpec;
  w.message(2, (tw) => {
    tw.int(3, t.modelType);
    tw.int(4, t.vocabSize);
    tw.int(20, t.maxSentencepieceLength);
    tw.bool(24, t.treatWhitespaceAsSuffix);
    tw.bool(25, t.splitDigits);
    tw.bool(26, t.allowWhitespaceOnlyPieces);
    tw.bool(35, t.byteFallback);
    tw.int(40, t.unkId);
    tw.int(41, t.bosId);
    tw.int(42, t.eosId);
    tw.int(43, t.padId);
    tw.string(44, t.unkSurface);
    tw.string(45, t.unkPiece);
    tw.string(46, t.bosPiece);
    tw.string(47, t.eosPiece);
    tw.string(48, t.padPiece);
  });
  const n = m.normalizerSpec;
  w.message(3, (nw) => {
    nw.string(1, n.name);
    nw.bytes(2, n.precompiledCharsmap);
    nw.bool(3, n.addDummyPrefix);
    nw.bool(4, n.removeExtraWhitespaces);
    nw.bool(5, n.escapeWhitespaces);
  });
  return w.result();
}
