// GGUF (v2 and v3) reader and writer, following ggml/src/gguf.cpp and gguf-py (gguf_reader.py, gguf_writer.py).
//
// Layout (little-endian): "GGUF", u32 version, i64 n_tensors, i64 n_kv, n_kv x (string key, i32 type, value),
// n_tensors x (string name, u32 n_dims, n_dims x i64 ne (innermost first), i32 ggml type, u64 offset),
// zero padding to `general.alignment` (default 32), then the data section; each tensor's offset is relative to the
// data section start and a multiple of the alignment. Strings are u64 length + bytes (no NUL). An array value is
// i32 item type, u64 count, then the items (a nested array item is again item type + count + items).
// v2 and v3 have the same layout (v3 only added the possibility of big-endian files, which we refuse); v1 used
// 32-bit counts and lengths and is refused, as llama.cpp does.
//
// Representation choices:
// - Every value keeps its GGUF type, so writing back what was read reproduces the same bytes (uint32 stays uint32).
// - uint64 / int64 are always `bigint` (lossless, one representation); `getNumber` converts when exactly representable.
// - Numeric arrays are typed arrays (Float32Array for tokenizer.ggml.scores ...), copied out of the file; bool arrays
//   are boolean[], string arrays string[], nested arrays GGUFArray[].
// - Strings are decoded as UTF-8 with U+FFFD for invalid bytes (llama.cpp stores raw bytes; we never fail on them,
//   but such a string does not round-trip byte for byte).
// - Tensor data is a zero-copy subarray of the file bytes.
//
// Robustness: every count and length is checked against the bytes that remain before anything is allocated, so a
// hostile header gives a FormatError naming the field, never a RangeError, a hang, or a giant allocation.
//
// Where we differ from llama.cpp's reader (gguf.cpp), deliberately:
// - it requires tensors packed in file order (each offset = the previous ones' padded sizes); we accept any order
//   as long as offsets are aligned, in bounds and do not overlap (our writer produces llama.cpp's layout);
// - it refuses tensor names of 64+ bytes and nested arrays; we read both (the writer refuses long names; it writes
//   nested arrays, which gguf-py and node-llama-cpp read but llama.cpp would not load);
// - like it, we accept zero-size dimensions (an empty tensor), bool bytes other than 0/1 (true) and raw non-UTF-8.

import * as fs from 'node:fs';
import { constants as bufferConstants } from 'node:buffer';
import { basename } from 'node:path';
import { FormatError } from './errors.js';
import { openFileBytes, prefetchViews, type FileBytes } from './mapped-file.js';
import { dtypeFromGgml, dtypeInfo, isDType, type DType } from '../tensor/dtype.js';
import type { Tensor } from '../tensor/tensor.js';

export const GGUF_VERSION = 3;
export const GGUF_DEFAULT_ALIGNMENT = 32;
/** ggml tensors have at most 4 dimensions. */
export const GGUF_MAX_DIMS = 4;
/** ggml keeps tensor names in a char[64] (GGML_MAX_NAME) including the NUL, so llama.cpp refuses longer names. */
export const GGUF_MAX_TENSOR_NAME_BYTES = 63;
/** Nested arrays deeper than this are refused (recursion depth is otherwise set by the file). */
export const GGUF_MAX_ARRAY_DEPTH = 16;

const MAGIC = [0x47, 0x47, 0x55, 0x46]; // "GGUF"

export type GGUFValueType =
  | 'uint8' | 'int8' | 'uint16' | 'int16' | 'uint32' | 'int32' | 'float32' | 'bool' | 'string' | 'array'
  | 'uint64' | 'int64' | 'float64';

/** GGUF type ids, index = id (gguf.h enum gguf_type). */
const TYPE_BY_ID: readonly GGUFValueType[] = [
  'uint8', 'int8', 'uint16', 'int16', 'uint32', 'int32', 'float32', 'bool', 'string', 'array', 'uint64', 'int64', 'float64',
];
export const GGUF_TYPE_ID: Readonly<Record<GGUFValueType, number>> = Object.fromEntries(
  TYPE_BY_ID.map((t, i) => [t, i]),
) as Record<GGUFValueType, number>;

/** Smallest encoding of one value of each type (strings and arrays: their length prefix). */
const MIN_SIZE: Readonly<Record<GGUFValueType, number>> = {
  uint8: 1, int8: 1, uint16: 2, int16: 2, uint32: 4, int32: 4, float32: 4, bool: 1, string: 8, array: 12,
  uint64: 8, int64: 8, float64: 8,
};

export type GGUFNumberType = 'uint8' | 'int8' | 'uint16' | 'int16' | 'uint32' | 'int32' | 'float32' | 'float64';
export type GGUFBigIntType = 'uint64' | 'int64';

export type GGUFArray =
  | { readonly itemType: 'uint8'; readonly items: Uint8Array }
  | { readonly itemType: 'int8'; readonly items: Int8Array }
  | { readonly itemType: 'uint16'; readonly items: Uint16Array }
  | { readonly itemType: 'int16'; readonly items: Int16Array }
  | { readonly itemType: 'uint32'; readonly items: Uint32Array }
  | { readonly itemType: 'int32'; readonly items: Int32Array }
  | { readonly itemType: 'float32'; readonly items: Float32Array }
  | { readonly itemType: 'float64'; readonly items: Float64Array }
  | { readonly itemType: 'uint64'; readonly items: BigUint64Array }
  | { readonly itemType: 'int64'; readonly items: BigInt64Array }
  | { readonly itemType: 'bool'; readonly items: readonly boolean[] }
  | { readonly itemType: 'string'; readonly items: readonly string[] }
  | { readonly itemType: 'array'; readonly items: readonly GGUFArray[] };

export type GGUFValue =
  | { readonly type: GGUFNumberType; readonly value: number }
  | { readonly type: GGUFBigIntType; readonly value: bigint }
  | { readonly type: 'bool'; readonly value: boolean }
  | { readonly type: 'string'; readonly value: string }
  | { readonly type: 'array'; readonly value: GGUFArray };

export interface GGUFTensorInfo {
  readonly name: string;
  /** Row-major (outermost first): GGUF's ne[] reversed. Its length is the file's n_dims. */
  readonly shape: readonly number[];
  readonly dtype: DType;
  /** Offset of the tensor's bytes from the start of the data section. */
  readonly offset: number;
  readonly byteLength: number;
}

export interface GGUFFile {
  readonly path: string;
  readonly version: number;
  /** In file order. */
  readonly metadata: ReadonlyMap<string, GGUFValue>;
  /** In file order; `data` views the file bytes. */
  readonly tensors: ReadonlyMap<string, Tensor>;
  /** In file order. */
  readonly tensorInfos: readonly GGUFTensorInfo[];
  readonly alignment: number;
  /** Absolute offset of the data section in the file. */
  readonly dataOffset: number;
  /** True when tensor data are views of a memory mapping of the file (readGGUF with the native addon). */
  readonly mapped: boolean;
}

// ---------------------------------------------------------------------------------------------------------------
// Reading

/** ggml type names for ids moe-ts does not support, so the error says what the file holds. */
const GGML_TYPE_NAMES: Readonly<Record<number, string>> = {
  16: 'iq2_xxs', 17: 'iq2_xs', 18: 'iq3_xxs', 19: 'iq1_s', 20: 'iq4_nl', 21: 'iq3_s', 22: 'iq2_s', 23: 'iq4_xs',
  24: 'i8', 25: 'i16', 26: 'i32', 27: 'i64', 28: 'f64', 29: 'iq1_m', 34: 'tq1_0', 35: 'tq2_0', 39: 'mxfp4',
  40: 'nvfp4', 41: 'q1_0', 42: 'q2_0',
};

const utf8Decoder = new TextDecoder('utf-8', { fatal: false, ignoreBOM: true });
const utf8Encoder = new TextEncoder();

function quote(s: string): string {
  return JSON.stringify(s.length > 200 ? `${s.slice(0, 200)}...` : s);
}

class Cursor {
  readonly view: DataView;
  pos = 0;
  /** `bytes` holds the start of the file (the whole file unless it is larger than one view); `fileSize` is its size. */
  constructor(
    readonly bytes: Uint8Array,
    readonly path: string,
    readonly fileSize: number = bytes.byteLength,
  ) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  get remaining(): number {
    return this.bytes.byteLength - this.pos;
  }

  fail(message: string): never {
    throw new FormatError(this.path, message);
  }

  need(n: number, what: string): void {
    if (n > this.remaining) {
      if (this.bytes.byteLength < this.fileSize) {
        this.fail(`the header runs past the first ${this.bytes.byteLength} bytes, the most this Node can view at once ` +
          `(${what} at offset ${this.pos})`);
      }
      this.fail(`file ends inside ${what}: needs ${n} bytes at offset ${this.pos}, file is ${this.bytes.byteLength} bytes`);
    }
  }

  u8(what: string): number {
    this.need(1, what);
    return this.view.getUint8(this.pos++);
  }
  u32(what: string): number {
    this.need(4, what);
    const v = this.view.getUint32(this.pos, true);
    this.pos += 4;
    return v;
  }
  i32(what: string): number {
    this.need(4, what);
    const v = this.view.getInt32(this.pos, true);
    this.pos += 4;
    return v;
  }
  u64(what: string): bigint {
    this.need(8, what);
    const v = this.view.getBigUint64(this.pos, true);
    this.pos += 8;
    return v;
  }
  i64(what: string): bigint {
    this.need(8, what);
    const v = this.view.getBigInt64(this.pos, true);
    this.pos += 8;
    return v;
  }

  /** A u64 count of items of at least `minItemBytes` each, checked against what remains before any allocation. */
  count(what: string, minItemBytes: number): number {
    const n = this.u64(`the length of ${what}`);
    if (n * BigInt(minItemBytes) > BigInt(this.remaining)) {
      this.fail(`${what} claims ${n} ${minItemBytes === 1 ? 'bytes' : `items of at least ${minItemBytes} bytes`}, ` +
        `but only ${this.remaining} bytes remain (offset ${this.pos})`);
    }
    return Number(n);
  }

  string(what: string): string {
    const n = this.count(what, 1);
    const s = utf8Decoder.decode(this.bytes.subarray(this.pos, this.pos + n));
    this.pos += n;
    return s;
  }

  scalar(type: GGUFValueType, what: string): number | bigint | boolean | string {
    const v = this.view;
    switch (type) {
      case 'uint8': return this.u8(what);
      case 'int8': this.need(1, what); return v.getInt8(this.pos++);
      case 'uint16': { this.need(2, what); const x = v.getUint16(this.pos, true); this.pos += 2; return x; }
      case 'int16': { this.need(2, what); const x = v.getInt16(this.pos, true); this.pos += 2; return x; }
      case 'uint32': return this.u32(what);
      case 'int32': return this.i32(what);
      case 'float32': { this.need(4, what); const x = v.getFloat32(this.pos, true); this.pos += 4; return x; }
      case 'float64': { this.need(8, what); const x = v.getFloat64(this.pos, true); this.pos += 8; return x; }
      case 'uint64': return this.u64(what);
      case 'int64': return this.i64(what);
      case 'bool': return this.u8(what) !== 0; // as llama.cpp: any non-zero byte is true
      case 'string': return this.string(what);
      case 'array': throw new Error('unreachable: arrays are read by readArray');
    }
  }

  valueType(what: string): GGUFValueType {
    const id = this.i32(`the type of ${what}`);
    const t = TYPE_BY_ID[id];
    if (t === undefined) this.fail(`${what} has unknown GGUF value type ${id} (known: 0..${TYPE_BY_ID.length - 1})`);
    return t;
  }

  array(what: string, depth: number): GGUFArray {
    if (depth > GGUF_MAX_ARRAY_DEPTH) this.fail(`${what} nests arrays deeper than ${GGUF_MAX_ARRAY_DEPTH} levels`);
    const itemType = this.valueType(`the items of ${what}`);
    const n = this.count(what, MIN_SIZE[itemType]);
    const v = this.view;
    const p = this.pos;
    // Fixed-size items: the whole array was bounds-checked by count(); read through the DataView (file offsets are
    // not aligned for a typed-array view, and DataView reads little-endian on any host).
    const fixed = <T extends { [i: number]: number | bigint }>(arr: T, size: number, get: (o: number) => number | bigint): T => {
      for (let i = 0; i < n; i++) (arr as { [i: number]: number | bigint })[i] = get(p + i * size);
      this.pos = p + n * size;
      return arr;
    };
    switch (itemType) {
      case 'uint8': this.pos = p + n; return { itemType, items: this.bytes.slice(p, p + n) };
      case 'int8': return { itemType, items: fixed(new Int8Array(n), 1, (o) => v.getInt8(o)) };
      case 'uint16': return { itemType, items: fixed(new Uint16Array(n), 2, (o) => v.getUint16(o, true)) };
      case 'int16': return { itemType, items: fixed(new Int16Array(n), 2, (o) => v.getInt16(o, true)) };
      case 'uint32': return { itemType, items: fixed(new Uint32Array(n), 4, (o) => v.getUint32(o, true)) };
      case 'int32': return { itemType, items: fixed(new Int32Array(n), 4, (o) => v.getInt32(o, true)) };
      case 'float32': return { itemType, items: fixed(new Float32Array(n), 4, (o) => v.getFloat32(o, true)) };
      case 'float64': return { itemType, items: fixed(new Float64Array(n), 8, (o) => v.getFloat64(o, true)) };
      case 'uint64': return { itemType, items: fixed(new BigUint64Array(n), 8, (o) => v.getBigUint64(o, true)) };
      case 'int64': return { itemType, items: fixed(new BigInt64Array(n), 8, (o) => v.getBigInt64(o, true)) };
      case 'bool': {
        const items: boolean[] = [];
        for (let i = 0; i < n; i++) items.push(this.bytes[p + i] !== 0);
        this.pos = p + n;
        return { itemType, items };
      }
      case 'string': {
        const items: string[] = [];
        for (let i = 0; i < n; i++) items.push(this.string(`item ${i} of ${what}`));
        return { itemType, items };
      }
      case 'array': {
        const items: GGUFArray[] = [];
        for (let i = 0; i < n; i++) items.push(this.array(`item ${i} of ${what}`, depth + 1));
        return { itemType, items };
      }
    }
  }
}

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0 && n <= 2 ** 31;
}

function padTo(n: number, alignment: number): number {
  return Math.ceil(n / alignment) * alignment;
}

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

/**
 * Parses a whole GGUF file held in memory. `bytes` is the entire file; tensor data are views into it. Throws
 * FormatError (naming `path` and the field) on anything malformed.
 */
export function parseGGUF(bytes: Uint8Array, path: string): GGUFFile {
  return parseGGUFBytes({ head: bytes, size: bytes.byteLength, mapped: false, view: (o, n) => bytes.subarray(o, o + n) }, path);
}

/** Where parseGGUFBytes gets bytes: the start of the file (`head`) and views of any range (mapped-file.ts). */
type GGUFSource = Pick<FileBytes, 'head' | 'size' | 'mapped' | 'view'>;

function parseGGUFBytes(src: GGUFSource, path: string): GGUFFile {
  const bytes = src.head;
  const fileSize = src.size;
  const c: Cursor = new Cursor(bytes, path, fileSize);

  // Header.
  if (fileSize < 4) c.fail(`not a GGUF file: only ${fileSize} bytes`);
  if (MAGIC.some((m, i) => bytes[i] !== m)) {
    const shown = Array.from(bytes.subarray(0, 4), (b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : '?')).join('');
    c.fail(`not a GGUF file: magic is '${shown}', expected 'GGUF'`);
  }
  c.pos = 4;
  const version = c.u32('the GGUF version');
  if (version === 0) c.fail('bad GGUF version 0');
  if ((version & 0xffff) === 0) {
    // A big-endian file's version 3 reads as 0x03000000 here (the same test llama.cpp uses).
    c.fail(`GGUF version reads as ${version} (0x${version.toString(16)}): this looks like a big-endian file, which is not supported`);
  }
  if (version === 1) c.fail('GGUF version 1 is not supported (convert the model again with a current llama.cpp)');
  if (version > GGUF_VERSION) c.fail(`GGUF version ${version} is newer than the versions supported (2 and 3)`);
  const nTensorsBig = c.i64('the tensor count');
  const nKvBig = c.i64('the metadata count');
  if (nTensorsBig < 0n) c.fail(`the tensor count is negative (${nTensorsBig})`);
  if (nKvBig < 0n) c.fail(`the metadata count is negative (${nKvBig})`);
  // Each metadata entry takes at least 12 bytes (key length + type), each tensor info at least 24 (name length,
  // n_dims, type, offset): refuse impossible counts before looping.
  if (nKvBig * 12n + nTensorsBig * 24n > BigInt(c.remaining)) {
    c.fail(`header claims ${nKvBig} metadata entries and ${nTensorsBig} tensors, which cannot fit in the ` +
      `${c.remaining} bytes that follow`);
  }
  const nKv = Number(nKvBig);
  const nTensors = Number(nTensorsBig);

  // Metadata.
  const metadata = new Map<string, GGUFValue>();
  for (let i = 0; i < nKv; i++) {
    const key = c.string(`metadata key #${i}`);
    if (key.length === 0) c.fail(`metadata key #${i} is empty`);
    const what = `metadata key ${quote(key)}`;
    if (metadata.has(key)) c.fail(`duplicate ${what} (entry #${i})`);
    const type = c.valueType(what);
    const value: GGUFValue =
      type === 'array'
        ? { type, value: c.array(`the array value of ${what}`, 1) }
        : ({ type, value: c.scalar(type, `the value of ${what}`) } as GGUFValue);
    metadata.set(key, value);
  }

  let alignment = GGUF_DEFAULT_ALIGNMENT;
  const al = metadata.get('general.alignment');
  if (al !== undefined) {
    if (al.type !== 'uint32') c.fail(`metadata key 'general.alignment' must be uint32 but is ${al.type}`);
    if (!isPowerOfTwo(al.value)) c.fail(`metadata key 'general.alignment' is ${al.value}, which is not a power of two`);
    alignment = al.value;
  }

  // Tensor infos.
  interface RawInfo { name: string; shape: number[]; dtype: DType; offset: bigint; byteLength: bigint }
  const infos: RawInfo[] = [];
  const names = new Set<string>();
  for (let i = 0; i < nTensors; i++) {
    const name = c.string(`the name of tensor #${i}`);
    const what = `tensor ${quote(name)}`;
    if (names.has(name)) c.fail(`duplicate ${what} (tensor #${i})`);
    names.add(name);
    const nDims = c.u32(`the dimension count of ${what}`);
    if (nDims > GGUF_MAX_DIMS) c.fail(`${what} has ${nDims} dimensions (at most ${GGUF_MAX_DIMS})`);
    const ne: bigint[] = [];
    let count = 1n;
    for (let d = 0; d < nDims; d++) {
      const n = c.i64(`dimension ${d} of ${what}`);
      if (n < 0n) c.fail(`${what} has negative size ${n} in dimension ${d} (ne[${d}])`);
      ne.push(n);
      count *= n;
      // Zero-size dimensions are allowed, as llama.cpp allows them (an empty tensor).
      if (count > MAX_SAFE) c.fail(`${what} has too many elements: ne = [${ne.join(', ')}${d + 1 < nDims ? ', ...' : ''}] exceeds 2^53`);
    }
    const typeId = c.i32(`the type of ${what}`);
    const info = dtypeFromGgml(typeId);
    if (info === undefined) {
      const known = GGML_TYPE_NAMES[typeId];
      c.fail(known !== undefined
        ? `${what} has ggml type ${typeId} (${known}), which moe-ts does not support`
        : `${what} has unknown ggml type id ${typeId}`);
    }
    const rowLength = nDims === 0 ? 1n : ne[0];
    if (rowLength % BigInt(info.blockSize) !== 0n) {
      c.fail(`${what} of type ${info.name} has rows of ${rowLength} elements, not a multiple of the block size ${info.blockSize}`);
    }
    const offset = c.u64(`the data offset of ${what}`);
    infos.push({
      name,
      shape: ne.map(Number).reverse(),
      dtype: info.name,
      offset,
      byteLength: (count / BigInt(info.blockSize)) * BigInt(info.typeSize),
    });
  }

  // Data section: aligned after the tensor infos (llama.cpp only pads when there are tensors).
  const dataOffset = nTensors > 0 ? padTo(c.pos, alignment) : c.pos;
  if (dataOffset > fileSize) {
    c.fail(`file ends at ${fileSize} bytes, before the data section, which starts at ${dataOffset} (alignment ${alignment})`);
  }
  const dataLength = BigInt(fileSize - dataOffset);
  const alignBig = BigInt(alignment);
  for (const t of infos) {
    if (t.offset % alignBig !== 0n) {
      c.fail(`tensor ${quote(t.name)} has data offset ${t.offset}, which is not a multiple of the alignment ${alignment}`);
    }
    if (t.offset + t.byteLength > dataLength) {
      c.fail(`tensor ${quote(t.name)} data (bytes ${t.offset}..${t.offset + t.byteLength} of the data section) runs ` +
        `past the end of the file (the data section holds ${dataLength} bytes)`);
    }
  }
  const byOffset = infos.filter((t) => t.byteLength > 0n).sort((a, b) => (a.offset < b.offset ? -1 : a.offset > b.offset ? 1 : 0));
  for (let i = 1; i < byOffset.length; i++) {
    const a = byOffset[i - 1];
    const b = byOffset[i];
    if (b.offset < a.offset + a.byteLength) {
      c.fail(`tensors ${quote(a.name)} (bytes ${a.offset}..${a.offset + a.byteLength}) and ${quote(b.name)} ` +
        `(bytes ${b.offset}..${b.offset + b.byteLength}) overlap in the data section`);
    }
  }

  const tensors = new Map<string, Tensor>();
  const tensorInfos: GGUFTensorInfo[] = [];
  for (const t of infos) {
    const offset = Number(t.offset);
    const byteLength = Number(t.byteLength);
    const start = dataOffset + offset;
    tensors.set(t.name, { dtype: t.dtype, shape: t.shape, data: src.view(start, byteLength) });
    tensorInfos.push({ name: t.name, shape: t.shape, dtype: t.dtype, offset, byteLength });
  }
  return { path, version, metadata, tensors, tensorInfos, alignment, dataOffset, mapped: src.mapped };
}

export interface ReadGGUFOptions {
  /** Memory-map the file when the native addon is built (default true); false reads it into memory. */
  mmap?: boolean;
  /**
   * Read a mapped file's tensor data in now (madvise WILLNEED, then touch every page, with a progress line on a TTY)
   * instead of on first use. Default false: pages come in as inference touches them.
   */
  prefetch?: boolean;
  /** Progress lines while reading or prefetching a large file (TTY only). Default true. */
  progress?: boolean;
}

/**
 * Reads and parses a GGUF file. With the native addon the file is memory-mapped (zero copy; files larger than 4 GiB
 * and than the JS heap load, tensor data are views of the mapping); without it the file is read into one Buffer,
 * so files above Node's Buffer limit (4 GiB on Node 20) are refused with a FormatError.
 */
export function readGGUF(path: string, opts: ReadGGUFOptions = {}): GGUFFile {
  const src = openFileBytes(path, { mmap: opts.mmap, willNeed: opts.prefetch === true, progress: opts.progress });
  try {
    const f = parseGGUFBytes(src, path);
    if (opts.prefetch === true && src.mapped) {
      prefetchViews([...f.tensors.values()].map((t) => t.data), `loading ${basename(path)}`, opts.progress !== false);
    }
    return f;
  } finally {
    src.close();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Typed metadata access

export interface GetOptions {
  /** Default true: a missing key throws. */
  readonly required?: boolean;
}

function missing(file: GGUFFile, key: string, expected: string): never {
  throw new FormatError(file.path, `metadata key ${quote(key)} is missing (expected ${expected})`);
}

function wrongType(file: GGUFFile, key: string, expected: string, v: GGUFValue): never {
  const actual = v.type === 'array' ? `an array of ${v.value.itemType}` : v.type;
  throw new FormatError(file.path, `metadata key ${quote(key)} must be ${expected} but is ${actual}`);
}

export function getString(file: GGUFFile, key: string, opts?: { required?: true }): string;
export function getString(file: GGUFFile, key: string, opts: GetOptions): string | undefined;
export function getString(file: GGUFFile, key: string, opts: GetOptions = {}): string | undefined {
  const v = file.metadata.get(key);
  if (v === undefined) return opts.required === false ? undefined : missing(file, key, 'a string');
  if (v.type !== 'string') wrongType(file, key, 'a string', v);
  return v.value;
}

/** Any numeric type; uint64/int64 only when the value is exactly representable as a JS number. */
export function getNumber(file: GGUFFile, key: string, opts?: { required?: true }): number;
export function getNumber(file: GGUFFile, key: string, opts: GetOptions): number | undefined;
export function getNumber(file: GGUFFile, key: string, opts: GetOptions = {}): number | undefined {
  const expected = 'a number (any integer or float type)';
  const v = file.metadata.get(key);
  if (v === undefined) return opts.required === false ? undefined : missing(file, key, expected);
  if (v.type === 'uint64' || v.type === 'int64') {
    if (v.value > MAX_SAFE || v.value < -MAX_SAFE) {
      throw new FormatError(file.path, `metadata key ${quote(key)} is ${v.value}, too large for a JS number`);
    }
    return Number(v.value);
  }
  if (v.type === 'bool' || v.type === 'string' || v.type === 'array') return wrongType(file, key, expected, v);
  return v.value as number; // the remaining types are the number-valued ones
}

export function getBool(file: GGUFFile, key: string, opts?: { required?: true }): boolean;
export function getBool(file: GGUFFile, key: string, opts: GetOptions): boolean | undefined;
export function getBool(file: GGUFFile, key: string, opts: GetOptions = {}): boolean | undefined {
  const v = file.metadata.get(key);
  if (v === undefined) return opts.required === false ? undefined : missing(file, key, 'a bool');
  if (v.type !== 'bool') wrongType(file, key, 'a bool', v);
  return v.value;
}

/** An array value; with `itemType`, its items must have that type. */
export function getArray(file: GGUFFile, key: string, opts?: { required?: true; itemType?: GGUFValueType }): GGUFArray;
export function getArray(file: GGUFFile, key: string, opts: GetOptions & { itemType?: GGUFValueType }): GGUFArray | undefined;
export function getArray(file: GGUFFile, key: string, opts: GetOptions & { itemType?: GGUFValueType } = {}): GGUFArray | undefined {
  const expected = opts.itemType === undefined ? 'an array' : `an array of ${opts.itemType}`;
  const v = file.metadata.get(key);
  if (v === undefined) return opts.required === false ? undefined : missing(file, key, expected);
  if (v.type !== 'array' || (opts.itemType !== undefined && v.value.itemType !== opts.itemType)) wrongType(file, key, expected, v);
  return v.value;
}

export function getStringArray(file: GGUFFile, key: string, opts?: { required?: true }): readonly string[];
export function getStringArray(file: GGUFFile, key: string, opts: GetOptions): readonly string[] | undefined;
export function getStringArray(file: GGUFFile, key: string, opts: GetOptions = {}): readonly string[] | undefined {
  const a = getArray(file, key, { ...opts, itemType: 'string' });
  return a === undefined ? undefined : (a.items as readonly string[]);
}

// ---------------------------------------------------------------------------------------------------------------
// Writing

/** A growable little-endian byte buffer for the header. */
class Sink {
  buf = new Uint8Array(256);
  view = new DataView(this.buf.buffer);
  length = 0;

  // Callers must call reserve() before touching buf/view: it may replace them.
  private reserve(n: number): number {
    const need = this.length + n;
    if (need > this.buf.byteLength) {
      let cap = this.buf.byteLength * 2;
      while (cap < need) cap *= 2;
      const next = new Uint8Array(cap);
      next.set(this.buf.subarray(0, this.length));
      this.buf = next;
      this.view = new DataView(next.buffer);
    }
    const at = this.length;
    this.length = need;
    return at;
  }
  u8(x: number): void { const at = this.reserve(1); this.view.setUint8(at, x); }
  i8(x: number): void { const at = this.reserve(1); this.view.setInt8(at, x); }
  u16(x: number): void { const at = this.reserve(2); this.view.setUint16(at, x, true); }
  i16(x: number): void { const at = this.reserve(2); this.view.setInt16(at, x, true); }
  u32(x: number): void { const at = this.reserve(4); this.view.setUint32(at, x, true); }
  i32(x: number): void { const at = this.reserve(4); this.view.setInt32(at, x, true); }
  f32(x: number): void { const at = this.reserve(4); this.view.setFloat32(at, x, true); }
  f64(x: number): void { const at = this.reserve(8); this.view.setFloat64(at, x, true); }
  u64(x: bigint): void { const at = this.reserve(8); this.view.setBigUint64(at, x, true); }
  i64(x: bigint): void { const at = this.reserve(8); this.view.setBigInt64(at, x, true); }
  bytes(b: Uint8Array): void { const at = this.reserve(b.byteLength); this.buf.set(b, at); }
  string(s: string): void {
    const b = utf8Encoder.encode(s);
    this.u64(BigInt(b.byteLength));
    this.bytes(b);
  }
  result(): Uint8Array {
    return this.buf.subarray(0, this.length);
  }
}

const INT_RANGE: Readonly<Record<string, readonly [number, number]>> = {
  uint8: [0, 0xff], int8: [-0x80, 0x7f], uint16: [0, 0xffff], int16: [-0x8000, 0x7fff],
  uint32: [0, 0xffffffff], int32: [-0x80000000, 0x7fffffff],
};
const BIG_RANGE: Readonly<Record<string, readonly [bigint, bigint]>> = {
  uint64: [0n, 2n ** 64n - 1n], int64: [-(2n ** 63n), 2n ** 63n - 1n],
};

function checkNumber(type: GGUFValueType, x: unknown, what: string): void {
  const r = INT_RANGE[type];
  if (r !== undefined) {
    if (typeof x !== 'number' || !Number.isInteger(x) || x < r[0] || x > r[1]) {
      throw new RangeError(`${what}: ${String(x)} is not a ${type} (integer in [${r[0]}, ${r[1]}])`);
    }
    return;
  }
  const b = BIG_RANGE[type];
  if (b !== undefined) {
    if (typeof x !== 'bigint' || x < b[0] || x > b[1]) throw new RangeError(`${what}: ${String(x)} is not a ${type} bigint`);
    return;
  }
  if (typeof x !== 'number') throw new TypeError(`${what}: ${String(x)} is not a number (${type})`);
}

const TYPED_ARRAY_CTOR: Partial<Record<GGUFValueType, Function>> = {
  uint8: Uint8Array, int8: Int8Array, uint16: Uint16Array, int16: Int16Array, uint32: Uint32Array, int32: Int32Array,
  float32: Float32Array, float64: Float64Array, uint64: BigUint64Array, int64: BigInt64Array,
};

function encodeScalar(s: Sink, type: GGUFValueType, x: unknown, what: string): void {
  switch (type) {
    case 'uint8': checkNumber(type, x, what); s.u8(x as number); return;
    case 'int8': checkNumber(type, x, what); s.i8(x as number); return;
    case 'uint16': checkNumber(type, x, what); s.u16(x as number); return;
    case 'int16': checkNumber(type, x, what); s.i16(x as number); return;
    case 'uint32': checkNumber(type, x, what); s.u32(x as number); return;
    case 'int32': checkNumber(type, x, what); s.i32(x as number); return;
    case 'float32': checkNumber(type, x, what); s.f32(x as number); return;
    case 'float64': checkNumber(type, x, what); s.f64(x as number); return;
    case 'uint64': checkNumber(type, x, what); s.u64(x as bigint); return;
    case 'int64': checkNumber(type, x, what); s.i64(x as bigint); return;
    case 'bool':
      if (typeof x !== 'boolean') throw new TypeError(`${what}: ${String(x)} is not a boolean`);
      s.u8(x ? 1 : 0);
      return;
    case 'string':
      if (typeof x !== 'string') throw new TypeError(`${what}: ${String(x)} is not a string`);
      s.string(x);
      return;
    case 'array':
      encodeArray(s, x as GGUFArray, what, 1);
      return;
  }
}

function encodeArray(s: Sink, a: GGUFArray, what: string, depth: number): void {
  if (depth > GGUF_MAX_ARRAY_DEPTH) throw new RangeError(`${what}: arrays nested deeper than ${GGUF_MAX_ARRAY_DEPTH} levels`);
  if (a === null || typeof a !== 'object' || !Object.hasOwn(GGUF_TYPE_ID, a.itemType)) {
    throw new TypeError(`${what}: not a GGUFArray ({itemType, items})`);
  }
  const ctor = TYPED_ARRAY_CTOR[a.itemType];
  if (ctor !== undefined ? !(a.items instanceof ctor) : !Array.isArray(a.items)) {
    throw new TypeError(`${what}: items of an array of ${a.itemType} must be a ${ctor !== undefined ? ctor.name : 'plain array'}`);
  }
  s.i32(GGUF_TYPE_ID[a.itemType]);
  s.u64(BigInt(a.items.length));
  if (a.itemType === 'uint8') {
    s.bytes(a.items);
  } else if (a.itemType === 'array') {
    a.items.forEach((item, i) => encodeArray(s, item, `${what}[${i}]`, depth + 1));
  } else {
    const items = a.items as ArrayLike<unknown>;
    for (let i = 0; i < items.length; i++) encodeScalar(s, a.itemType, items[i], `${what}[${i}]`);
  }
}

/** Serialised tensor info and where the tensor's data goes. */
interface WriterLayout {
  header: Uint8Array; // including the padding up to the data section
  offsets: number[]; // relative to the data section
  totalBytes: number;
}

/**
 * Builds a GGUF v3 file: metadata and tensors are written in insertion order, each tensor aligned to
 * `general.alignment` (default 32) and padded after, as llama.cpp's and gguf-py's writers do, so a file read with
 * parseGGUF and written back with `GGUFWriter.fromFile` reproduces a llama.cpp/gguf-py file byte for byte.
 * Invalid values (a uint32 of -1, a tensor whose bytes do not match its shape) throw at the call that adds them.
 */
/** A tensor whose bytes are produced while the file is written (e.g. quantized slab by slab), never all in memory. */
export interface StreamedTensor {
  readonly dtype: DType;
  readonly shape: readonly number[];
  /** Yields the tensor's bytes in order; together they must be exactly the size the dtype and shape need. */
  readonly chunks: () => Iterable<Uint8Array>;
}

interface WriterTensor {
  readonly dtype: DType;
  readonly shape: readonly number[];
  readonly byteLength: number;
  readonly data?: Uint8Array;
  readonly chunks?: () => Iterable<Uint8Array>;
}

export class GGUFWriter {
  private readonly kv = new Map<string, { value: GGUFValue; encoded: Uint8Array }>();
  private readonly tensorList = new Map<string, WriterTensor>();
  private align = GGUF_DEFAULT_ALIGNMENT;

  /** A writer holding all metadata (same types, same order) and tensors of a parsed file. */
  static fromFile(file: GGUFFile): GGUFWriter {
    const w = new GGUFWriter();
    for (const [k, v] of file.metadata) w.set(k, v);
    for (const [name, t] of file.tensors) w.addTensor(name, t);
    return w;
  }

  get alignment(): number {
    return this.align;
  }

  /** Sets a metadata value; setting an existing key replaces its value and keeps its position. */
  set(key: string, value: GGUFValue): this {
    if (typeof key !== 'string' || key.length === 0) throw new TypeError('GGUF metadata keys must be non-empty strings');
    if (value === null || typeof value !== 'object' || !Object.hasOwn(GGUF_TYPE_ID, value.type)) {
      throw new TypeError(`metadata key ${quote(key)}: not a GGUFValue ({type, value})`);
    }
    if (key === 'general.alignment') {
      if (value.type !== 'uint32' || !isPowerOfTwo(value.value)) {
        throw new RangeError(`general.alignment must be a uint32 power of two, got ${value.type} ${String(value.value)}`);
      }
    }
    const s = new Sink();
    s.string(key);
    s.i32(GGUF_TYPE_ID[value.type]);
    encodeScalar(s, value.type, value.value, `metadata key ${quote(key)}`);
    this.kv.set(key, { value, encoded: s.result().slice() });
    if (key === 'general.alignment') this.align = value.value as number;
    return this;
  }

  setString(key: string, value: string): this { return this.set(key, { type: 'string', value }); }
  setUint32(key: string, value: number): this { return this.set(key, { type: 'uint32', value }); }
  setInt32(key: string, value: number): this { return this.set(key, { type: 'int32', value }); }
  setFloat32(key: string, value: number): this { return this.set(key, { type: 'float32', value }); }
  setFloat64(key: string, value: number): this { return this.set(key, { type: 'float64', value }); }
  setBool(key: string, value: boolean): this { return this.set(key, { type: 'bool', value }); }
  setUint64(key: string, value: bigint | number): this { return this.set(key, { type: 'uint64', value: BigInt(value) }); }
  setInt64(key: string, value: bigint | number): this { return this.set(key, { type: 'int64', value: BigInt(value) }); }
  setArray(key: string, value: GGUFArray): this { return this.set(key, { type: 'array', value }); }
  setStringArray(key: string, items: readonly string[]): this { return this.setArray(key, { itemType: 'string', items }); }
  setFloat32Array(key: string, items: ArrayLike<number>): this {
    return this.setArray(key, { itemType: 'float32', items: Float32Array.from(items) });
  }
  setInt32Array(key: string, items: ArrayLike<number>): this {
    for (let i = 0; i < items.length; i++) checkNumber('int32', items[i], `metadata key ${quote(key)}[${i}]`);
    return this.setArray(key, { itemType: 'int32', items: Int32Array.from(items) });
  }

  get metadataKeys(): string[] {
    return [...this.kv.keys()];
  }

  /** Adds a tensor (row-major shape; written with ne[] reversed). Its data is referenced, not copied. */
  addTensor(name: string, tensor: Tensor): this {
    const expected = this.checkTensor(name, tensor.dtype, tensor.shape);
    const what = `tensor ${quote(name)}`;
    if (!(tensor.data instanceof Uint8Array) || tensor.data.byteLength !== expected) {
      throw new RangeError(`${what}: data is ${tensor.data?.byteLength} bytes, but ${tensor.dtype} [${tensor.shape.join(', ')}] needs ${expected}`);
    }
    this.tensorList.set(name, { dtype: tensor.dtype, shape: [...tensor.shape], byteLength: expected, data: tensor.data });
    return this;
  }

  /**
   * Adds a tensor whose bytes `chunks()` yields when the file is written (write() streams them to disk, so a model
   * larger than memory can be produced); a wrong total size fails the write and leaves no file.
   */
  addStreamedTensor(name: string, tensor: StreamedTensor): this {
    const byteLength = this.checkTensor(name, tensor.dtype, tensor.shape);
    if (typeof tensor.chunks !== 'function') throw new TypeError(`tensor ${quote(name)}: chunks must be a function`);
    this.tensorList.set(name, { dtype: tensor.dtype, shape: [...tensor.shape], byteLength, chunks: tensor.chunks });
    return this;
  }

  /** Checks a tensor's name, dtype and shape; returns its byte size. */
  private checkTensor(name: string, dtype: DType, shape: readonly number[]): number {
    const what = `tensor ${quote(name)}`;
    const nameBytes = utf8Encoder.encode(name).byteLength;
    if (nameBytes === 0 || nameBytes > GGUF_MAX_TENSOR_NAME_BYTES) {
      throw new RangeError(`${what}: name must be 1..${GGUF_MAX_TENSOR_NAME_BYTES} bytes of UTF-8 (llama.cpp's limit), it is ${nameBytes}`);
    }
    if (this.tensorList.has(name)) throw new Error(`${what} was already added`);
    if (!isDType(dtype)) throw new TypeError(`${what}: unknown dtype ${String(dtype)}`);
    const { blockSize, typeSize } = dtypeInfo(dtype);
    if (shape.length > GGUF_MAX_DIMS) throw new RangeError(`${what}: ${shape.length} dimensions (GGUF allows ${GGUF_MAX_DIMS})`);
    let count = 1;
    for (const d of shape) {
      if (!Number.isSafeInteger(d) || d < 0) throw new RangeError(`${what}: bad dimension ${d} in shape [${shape.join(', ')}]`);
      count *= d;
    }
    if (!Number.isSafeInteger(count)) throw new RangeError(`${what}: too many elements in shape [${shape.join(', ')}]`);
    const row = shape.length === 0 ? 1 : shape[shape.length - 1];
    if (row % blockSize !== 0) throw new RangeError(`${what}: rows of ${row} elements are not a multiple of the ${dtype} block size ${blockSize}`);
    return (count / blockSize) * typeSize;
  }

  private layout(): WriterLayout {
    const s = new Sink();
    for (const b of [0x47, 0x47, 0x55, 0x46]) s.u8(b);
    s.u32(GGUF_VERSION);
    s.i64(BigInt(this.tensorList.size));
    s.i64(BigInt(this.kv.size));
    for (const { encoded } of this.kv.values()) s.bytes(encoded);
    const offsets: number[] = [];
    let offset = 0;
    for (const [name, t] of this.tensorList) {
      s.string(name);
      s.u32(t.shape.length);
      for (let d = t.shape.length - 1; d >= 0; d--) s.i64(BigInt(t.shape[d]));
      s.i32(dtypeInfo(t.dtype).ggmlType);
      s.u64(BigInt(offset));
      offsets.push(offset);
      offset += padTo(t.byteLength, this.align);
    }
    // llama.cpp and gguf-py pad the header even when there are no tensors.
    const headerLength = padTo(s.length, this.align);
    const header = new Uint8Array(headerLength);
    header.set(s.result());
    return { header, offsets, totalBytes: headerLength + offset };
  }

  /** The whole file in memory (small files and tests; use write() for models). */
  toBytes(): Uint8Array {
    const { header, offsets, totalBytes } = this.layout();
    if (totalBytes > bufferConstants.MAX_LENGTH) throw new RangeError(`GGUF file of ${totalBytes} bytes does not fit one buffer; use write()`);
    const out = new Uint8Array(totalBytes);
    out.set(header);
    let i = 0;
    for (const [name, t] of this.tensorList) {
      let at = header.byteLength + offsets[i++];
      const end = at + t.byteLength;
      for (const chunk of tensorChunks(name, t)) {
        if (at + chunk.byteLength > end) throw new RangeError(`tensor ${quote(name)}: chunks give more than its ${t.byteLength} bytes`);
        out.set(chunk, at);
        at += chunk.byteLength;
      }
      if (at !== end) throw new RangeError(`tensor ${quote(name)}: chunks gave ${t.byteLength - (end - at)} of its ${t.byteLength} bytes`);
    }
    return out;
  }

  /**
   * Writes the file, streaming tensor data (no buffer of the whole file, so models above 2 GiB can be written).
   * Writes to a temporary file beside `path` and renames it, so a failed write never leaves a truncated model.
   */
  write(path: string): void {
    const { header } = this.layout();
    const tmp = `${path}.partial-${process.pid}`;
    const fd = fs.openSync(tmp, 'w');
    let ok = false;
    try {
      writeAll(fd, header);
      const zeros = new Uint8Array(this.align);
      for (const [name, t] of this.tensorList) {
        let written = 0;
        for (const chunk of tensorChunks(name, t)) {
          written += chunk.byteLength;
          if (written > t.byteLength) throw new RangeError(`tensor ${quote(name)}: chunks give more than its ${t.byteLength} bytes`);
          writeAll(fd, chunk);
        }
        if (written !== t.byteLength) throw new RangeError(`tensor ${quote(name)}: chunks gave ${written} of its ${t.byteLength} bytes`);
        const pad = padTo(t.byteLength, this.align) - t.byteLength;
        if (pad > 0) writeAll(fd, zeros.subarray(0, pad));
      }
      ok = true;
    } finally {
      fs.closeSync(fd);
      if (!ok) fs.rmSync(tmp, { force: true });
    }
    fs.renameSync(tmp, path);
  }
}

function tensorChunks(name: string, t: WriterTensor): Iterable<Uint8Array> {
  if (t.data !== undefined) return [t.data];
  return {
    *[Symbol.iterator]() {
      for (const chunk of t.chunks!()) {
        if (!(chunk instanceof Uint8Array)) throw new TypeError(`tensor ${quote(name)}: a chunk is not a Uint8Array`);
        yield chunk;
      }
    },
  };
}

function writeAll(fd: number, data: Uint8Array): void {
  let off = 0;
  while (off < data.byteLength) {
    off += fs.writeSync(fd, data, off, Math.min(data.byteLength - off, 1 << 30));
  }
}
