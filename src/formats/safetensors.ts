// safetensors reader and writer, following the reference Rust library (huggingface/safetensors).
//
// Layout: u64 little-endian header length N, N bytes of UTF-8 JSON
//   {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}
// (padded with spaces to a multiple of 8), then the data section; offsets are relative to its start.
// moe-ts holds F32, F16 and BF16 tensors; other dtypes are refused with a FormatError naming the tensor.
//
// Sharded checkpoints (transformers' save_pretrained): model-00001-of-0000N.safetensors ... plus
// model.safetensors.index.json {"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}.
//
// Robustness: the header length is checked against the file size and a 100 MB cap (the Rust library's) before
// anything is allocated; every entry's dtype, shape and offsets are checked, overlaps refused, so a hostile or
// truncated file gives a FormatError naming the file and tensor.

import * as fs from 'node:fs';
import * as path from 'node:path';
import { FormatError } from './errors.js';
import { MAX_VIEW_BYTES, openFileBytes, prefetchViews } from './mapped-file.js';
import { nativeAddon } from '../backend/native-addon.js';
import type { DType } from '../tensor/dtype.js';
import { tensorByteSize, shapeString, type Tensor } from '../tensor/tensor.js';

/** The Rust library refuses headers above this (MAX_HEADER_SIZE), and so do we. */
export const SAFETENSORS_MAX_HEADER_BYTES = 100_000_000;
export const SAFETENSORS_SINGLE_FILE = 'model.safetensors';
export const SAFETENSORS_INDEX_FILE = 'model.safetensors.index.json';

const ST_TO_DTYPE: Readonly<Record<string, DType>> = { F32: 'f32', F16: 'f16', BF16: 'bf16' };
const DTYPE_TO_ST: Partial<Record<DType, string>> = { f32: 'F32', f16: 'F16', bf16: 'BF16' };
/** Order the Rust writer lays tensors out in: larger dtypes first (its enum order, descending), so data stays aligned. */
const WRITE_RANK: Partial<Record<DType, number>> = { f32: 0, bf16: 1, f16: 2 };
/** safetensors dtypes that exist but moe-ts does not hold, so the error can say "unsupported" rather than "unknown". */
const KNOWN_UNSUPPORTED = new Set([
  'BOOL', 'U8', 'I8', 'I16', 'U16', 'I32', 'U32', 'I64', 'U64', 'F64', 'F8_E5M2', 'F8_E4M3', 'F8_E8M0', 'F4',
  'F6_E2M3', 'F6_E3M2', 'C64',
]);

export interface SafetensorsEntry {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly number[];
  /** Byte offsets relative to the start of the data section. */
  readonly begin: number;
  readonly end: number;
}

export interface SafetensorsHeader {
  /** In header order. */
  readonly entries: readonly SafetensorsEntry[];
  readonly metadata: Record<string, string>;
  /** Absolute offset of the data section (8 + header length). */
  readonly dataOffset: number;
}

export interface SafetensorsFile {
  /** In header order; `data` views the file bytes (zero-copy). */
  readonly tensors: Map<string, Tensor>;
  readonly metadata: Record<string, string>;
}

// ---------------------------------------------------------------------------------------------------------------
// Reading

function quote(s: string): string {
  return JSON.stringify(s);
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Reads the header length and checks it against the file size and the cap; returns N. */
function headerLength(prefix: Uint8Array, fileSize: number, file: string): number {
  if (fileSize < 8 || prefix.length < 8) {
    throw new FormatError(file, `file is ${fileSize} bytes, too short for the 8-byte header length of a safetensors file`);
  }
  const n = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(SAFETENSORS_MAX_HEADER_BYTES)) {
    throw new FormatError(file, `header length ${n} exceeds the ${SAFETENSORS_MAX_HEADER_BYTES}-byte limit (not a safetensors file, or corrupt)`);
  }
  if (n > BigInt(fileSize - 8)) {
    throw new FormatError(file, `header length ${n} runs past the end of the file (${fileSize} bytes): truncated or not a safetensors file`);
  }
  return Number(n);
}

function nonNegInt(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

/**
 * Parses and checks a header. `headerBytes` holds at least the 8-byte length and the JSON; `fileSize` is the size of
 * the whole file, against which every tensor's bytes are checked.
 */
export function parseSafetensorsHeader(headerBytes: Uint8Array, fileSize: number, file: string): SafetensorsHeader {
  const n = headerLength(headerBytes, fileSize, file);
  if (headerBytes.length < 8 + n) throw new FormatError(file, `header needs ${n} bytes, only ${headerBytes.length - 8} given`);
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(headerBytes.subarray(8, 8 + n));
  } catch {
    throw new FormatError(file, 'header is not valid UTF-8');
  }
  // The Rust library insists on a JSON object at the very start.
  if (!text.startsWith('{')) throw new FormatError(file, 'header does not start with "{" (not a safetensors file, or corrupt)');
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new FormatError(file, `header is not valid JSON: ${(e as Error).message}`);
  }
  if (!isRecord(json)) throw new FormatError(file, 'header is not a JSON object');

  const dataOffset = 8 + n;
  const dataSize = fileSize - dataOffset;
  const metadata: Record<string, string> = {};
  const entries: SafetensorsEntry[] = [];
  for (const [name, v] of Object.entries(json)) {
    if (name === '__metadata__') {
      if (!isRecord(v)) throw new FormatError(file, '__metadata__ is not an object of strings');
      for (const [k, s] of Object.entries(v)) {
        if (typeof s !== 'string') throw new FormatError(file, `__metadata__[${quote(k)}] is ${JSON.stringify(s)}, not a string`);
        metadata[k] = s;
      }
      continue;
    }
    const where = `tensor ${quote(name)}`;
    if (!isRecord(v)) throw new FormatError(file, `${where}: header entry is not an object`);
    const { dtype: st, shape, data_offsets: offsets } = v;
    if (typeof st !== 'string') throw new FormatError(file, `${where}: dtype is ${JSON.stringify(st)}, not a string`);
    const dtype = ST_TO_DTYPE[st];
    if (dtype === undefined) {
      const what = KNOWN_UNSUPPORTED.has(st) ? 'is not supported' : 'is unknown';
      throw new FormatError(file, `${where}: dtype ${quote(st)} ${what} (moe-ts reads F32, F16 and BF16)`);
    }
    if (!Array.isArray(shape) || !shape.every(nonNegInt)) {
      throw new FormatError(file, `${where}: shape ${JSON.stringify(shape)} is not a list of non-negative integers`);
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(nonNegInt)) {
      throw new FormatError(file, `${where}: data_offsets ${JSON.stringify(offsets)} is not [begin, end] with non-negative integers`);
    }
    const [begin, end] = offsets as [number, number];
    if (end < begin) throw new FormatError(file, `${where}: data_offsets [${begin}, ${end}] end before they begin`);
    if (end > dataSize) {
      throw new FormatError(file, `${where}: data_offsets [${begin}, ${end}] run past the end of the data section ` +
        `(${dataSize} bytes): file truncated or corrupt`);
    }
    // Element count, refusing products that leave exact integer range (the Rust library's checked_mul).
    let count = 1;
    for (const d of shape as number[]) {
      count *= d;
      if (!Number.isSafeInteger(count)) throw new FormatError(file, `${where}: shape ${shapeString(shape as number[])} has too many elements`);
    }
    const expected = count * (st === 'F32' ? 4 : 2);
    if (end - begin !== expected) {
      throw new FormatError(file, `${where}: data_offsets [${begin}, ${end}] hold ${end - begin} bytes, but ${st} ` +
        `${shapeString(shape as number[])} needs ${expected}`);
    }
    entries.push({ name, dtype, shape: [...(shape as number[])], begin, end });
  }
  // No two tensors may share bytes (empty tensors share nothing).
  const sorted = entries.filter((e) => e.end > e.begin).sort((a, b) => a.begin - b.begin);
  for (let i = 1; i < sorted.length; i++) {
    if (sorted[i].begin < sorted[i - 1].end) {
      throw new FormatError(file, `tensor ${quote(sorted[i].name)} (bytes [${sorted[i].begin}, ${sorted[i].end}]) overlaps ` +
        `tensor ${quote(sorted[i - 1].name)} (bytes [${sorted[i - 1].begin}, ${sorted[i - 1].end}])`);
    }
  }
  return { entries, metadata, dataOffset };
}

/** Parses a whole safetensors file held in memory; tensor data are zero-copy views of `bytes`. */
export function parseSafetensors(bytes: Uint8Array, file: string): SafetensorsFile {
  const header = parseSafetensorsHeader(bytes, bytes.length, file);
  const tensors = new Map<string, Tensor>();
  for (const e of header.entries) {
    tensors.set(e.name, {
      dtype: e.dtype,
      shape: e.shape,
      data: bytes.subarray(header.dataOffset + e.begin, header.dataOffset + e.end),
    });
  }
  return { tensors, metadata: header.metadata };
}

function readExactly(fd: number, dest: Uint8Array, position: number, file: string): void {
  let off = 0;
  while (off < dest.length) {
    // 1 GiB chunks: a single read stops at 2 GiB.
    const n = fs.readSync(fd, dest, off, Math.min(dest.length - off, 1 << 30), position + off);
    if (n === 0) throw new FormatError(file, `file ended early (wanted ${dest.length} bytes at offset ${position})`);
    off += n;
  }
}

function withFile<T>(file: string, fn: (fd: number, size: number) => T): T {
  let fd: number | undefined;
  try {
    fd = fs.openSync(file, 'r');
    return fn(fd, fs.fstatSync(fd).size);
  } catch (e) {
    if (e instanceof FormatError) throw e;
    throw new FormatError(file, `cannot read the file: ${(e as Error).message}`);
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
}

function readHeaderFrom(fd: number, size: number, file: string): SafetensorsHeader {
  const prefix = new Uint8Array(8);
  if (size >= 8) readExactly(fd, prefix, 0, file);
  const n = headerLength(prefix, size, file);
  const bytes = new Uint8Array(8 + n);
  readExactly(fd, bytes, 0, file);
  return parseSafetensorsHeader(bytes, size, file);
}

/** Reads and checks only the header (names, dtypes, shapes, offsets) without touching the tensor data. */
export function readSafetensorsHeader(file: string): SafetensorsHeader {
  return withFile(file, (fd, size) => readHeaderFrom(fd, size, file));
}

export interface ReadSafetensorsOptions {
  /** Memory-map the file when the native addon is built (default true); false reads it into memory. */
  mmap?: boolean;
  /** Read a mapped file's tensor data in now (with a progress line on a TTY) instead of on first use. Default false. */
  prefetch?: boolean;
  /** Progress lines while reading or prefetching a large file (TTY only). Default true. */
  progress?: boolean;
}

/**
 * Reads a safetensors file. With the native addon it is memory-mapped and tensors are zero-copy views of the mapping
 * (files larger than 4 GiB and than the JS heap load); without it a file that fits in one Buffer is read whole and its
 * tensors are views of it, and a larger one (a big shard past buffer.constants.MAX_LENGTH) is read tensor by tensor.
 */
export function readSafetensors(file: string, opts: ReadSafetensorsOptions = {}): SafetensorsFile {
  let size: number;
  try {
    size = fs.statSync(file).size;
  } catch (e) {
    throw new FormatError(file, `cannot read the file: ${(e as Error).message}`);
  }
  if (size > MAX_VIEW_BYTES && (opts.mmap === false || nativeAddon() === null)) return readTensorByTensor(file);
  const src = openFileBytes(file, { mmap: opts.mmap, willNeed: opts.prefetch === true, progress: opts.progress });
  try {
    const header = parseSafetensorsHeader(src.head, src.size, file);
    const tensors = new Map<string, Tensor>();
    for (const e of header.entries) {
      tensors.set(e.name, { dtype: e.dtype, shape: e.shape, data: src.view(header.dataOffset + e.begin, e.end - e.begin) });
    }
    if (opts.prefetch === true && src.mapped) {
      prefetchViews([...tensors.values()].map((t) => t.data), `loading ${path.basename(file)}`, opts.progress !== false);
    }
    return { tensors, metadata: header.metadata };
  } finally {
    src.close();
  }
}

/** Without memory mapping, a file over one Buffer's limit is read tensor by tensor into separate Buffers. */
function readTensorByTensor(file: string): SafetensorsFile {
  return withFile(file, (fd, size) => {
    const header = readHeaderFrom(fd, size, file);
    const tensors = new Map<string, Tensor>();
    for (const e of header.entries) {
      const data = Buffer.allocUnsafe(e.end - e.begin);
      readExactly(fd, data, header.dataOffset + e.begin, file);
      tensors.set(e.name, { dtype: e.dtype, shape: e.shape, data });
    }
    return { tensors, metadata: header.metadata };
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Sharded checkpoints

export interface CheckpointTensors {
  readonly tensors: Map<string, Tensor>;
  /** The __metadata__ of the (first) file. */
  readonly metadata: Record<string, string>;
  /** The safetensors files read, in order. */
  readonly files: readonly string[];
}

/** A shard name from an index must be a plain file in the checkpoint folder (no paths out of it). */
function checkShardName(shard: string, indexFile: string, tensor: string): void {
  if (shard === '' || shard === '.' || shard === '..' || shard.includes('/') || shard.includes('\\') || shard.includes('\0')) {
    throw new FormatError(indexFile, `weight_map[${quote(tensor)}] = ${quote(shard)} is not a file name in the checkpoint folder`);
  }
}

/** Reads and checks model.safetensors.index.json; returns its weight_map. */
export function readSafetensorsIndex(indexFile: string): Map<string, string> {
  let text: string;
  try {
    text = fs.readFileSync(indexFile, 'utf8');
  } catch (e) {
    throw new FormatError(indexFile, `cannot read the file: ${(e as Error).message}`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new FormatError(indexFile, `not valid JSON: ${(e as Error).message}`);
  }
  if (!isRecord(json)) throw new FormatError(indexFile, 'not a JSON object');
  if (!isRecord(json.weight_map)) throw new FormatError(indexFile, 'weight_map is missing or not an object');
  const map = new Map<string, string>();
  for (const [name, shard] of Object.entries(json.weight_map)) {
    if (typeof shard !== 'string') throw new FormatError(indexFile, `weight_map[${quote(name)}] is ${JSON.stringify(shard)}, not a file name`);
    checkShardName(shard, indexFile, name);
    map.set(name, shard);
  }
  if (map.size === 0) throw new FormatError(indexFile, 'weight_map is empty');
  return map;
}

/**
 * Reads the tensors of a Hugging Face checkpoint folder: model.safetensors, or (as transformers does when that is
 * absent) the shards listed by model.safetensors.index.json. Every tensor the index names must be in its shard, and
 * no name may appear in two shards.
 */
export function readCheckpointTensors(dir: string, opts: ReadSafetensorsOptions = {}): CheckpointTensors {
  const single = path.join(dir, SAFETENSORS_SINGLE_FILE);
  const indexFile = path.join(dir, SAFETENSORS_INDEX_FILE);
  if (fs.existsSync(single)) {
    const f = readSafetensors(single, opts);
    return { tensors: f.tensors, metadata: f.metadata, files: [single] };
  }
  if (!fs.existsSync(indexFile)) {
    throw new FormatError(dir, `no ${SAFETENSORS_SINGLE_FILE} or ${SAFETENSORS_INDEX_FILE} in this folder`);
  }
  const weightMap = readSafetensorsIndex(indexFile);
  const shards = [...new Set(weightMap.values())];
  const tensors = new Map<string, Tensor>();
  const owner = new Map<string, string>();
  let metadata: Record<string, string> | undefined;
  const files: string[] = [];
  for (const shard of shards) {
    const shardPath = path.join(dir, shard);
    if (!fs.existsSync(shardPath)) {
      const example = [...weightMap].find(([, s]) => s === shard)![0];
      throw new FormatError(indexFile, `shard ${quote(shard)} (holding e.g. ${quote(example)}) is missing from ${dir}`);
    }
    const f = readSafetensors(shardPath, opts);
    files.push(shardPath);
    metadata ??= f.metadata;
    for (const [name, t] of f.tensors) {
      const prev = owner.get(name);
      if (prev !== undefined) throw new FormatError(shardPath, `tensor ${quote(name)} is also in shard ${quote(prev)}`);
      owner.set(name, shard);
      tensors.set(name, t);
    }
  }
  for (const [name, shard] of weightMap) {
    if (owner.get(name) !== shard) {
      throw new FormatError(path.join(dir, shard), `tensor ${quote(name)} is listed for this shard in ${SAFETENSORS_INDEX_FILE} but is not in it`);
    }
  }
  return { tensors, metadata: metadata ?? {}, files };
}

// ---------------------------------------------------------------------------------------------------------------
// Writing

export type TensorList = ReadonlyMap<string, Tensor> | readonly (readonly [string, Tensor])[];

function entriesOf(tensors: TensorList): (readonly [string, Tensor])[] {
  return tensors instanceof Map ? [...tensors] : [...(tensors as readonly (readonly [string, Tensor])[])];
}

interface Layout {
  header: Uint8Array; // 8-byte length + padded JSON
  order: (readonly [string, Tensor])[];
  dataBytes: number;
}

/** Builds the header as the Rust library does: tensors by dtype (F32, BF16, F16) then name, header padded to 8. */
function layout(file: string, tensors: TensorList, metadata?: Record<string, string>): Layout {
  const list = entriesOf(tensors);
  const seen = new Set<string>();
  for (const [name, t] of list) {
    if (name === '__metadata__') throw new FormatError(file, 'a tensor cannot be named "__metadata__"');
    if (seen.has(name)) throw new FormatError(file, `tensor ${quote(name)} is given twice`);
    seen.add(name);
    const st = DTYPE_TO_ST[t.dtype];
    if (st === undefined) throw new FormatError(file, `tensor ${quote(name)}: safetensors cannot hold ${t.dtype} (only f32, f16, bf16)`);
    if (!t.shape.every(nonNegInt)) throw new FormatError(file, `tensor ${quote(name)}: bad shape ${shapeString(t.shape)}`);
    const want = tensorByteSize(t.dtype, t.shape);
    if (t.data.length !== want) {
      throw new FormatError(file, `tensor ${quote(name)}: ${t.data.length} data bytes, but ${t.dtype} ${shapeString(t.shape)} needs ${want}`);
    }
  }
  // Names compare as UTF-8 bytes, as Rust's String ordering does.
  const order = [...list].sort(([an, a], [bn, b]) =>
    (WRITE_RANK[a.dtype]! - WRITE_RANK[b.dtype]!) || Buffer.compare(Buffer.from(an), Buffer.from(bn)));
  const json: Record<string, unknown> = {};
  if (metadata !== undefined) json.__metadata__ = metadata;
  let offset = 0;
  for (const [name, t] of order) {
    json[name] = { dtype: DTYPE_TO_ST[t.dtype], shape: [...t.shape], data_offsets: [offset, offset + t.data.length] };
    offset += t.data.length;
  }
  const textBytes = new TextEncoder().encode(JSON.stringify(json));
  const pad = (8 - (textBytes.length % 8)) % 8;
  const header = new Uint8Array(8 + textBytes.length + pad);
  new DataView(header.buffer).setBigUint64(0, BigInt(textBytes.length + pad), true);
  header.set(textBytes, 8);
  header.fill(0x20, 8 + textBytes.length);
  return { header, order, dataBytes: offset };
}

function writeAll(fd: number, bytes: Uint8Array): void {
  let off = 0;
  while (off < bytes.length) {
    // Chunked: one write call is limited to about 2 GiB.
    off += fs.writeSync(fd, bytes, off, Math.min(bytes.length - off, 1 << 30));
  }
}

/**
 * Writes a safetensors file, laid out byte for byte as the reference Rust library lays it out, streaming each
 * tensor's bytes (no single buffer of the whole file). Writes to a temporary name and renames, so a failure never
 * leaves a half-written file under the real name.
 */
export function writeSafetensors(file: string, tensors: TensorList, metadata?: Record<string, string>): void {
  const { header, order } = layout(file, tensors, metadata);
  const tmp = `${file}.tmp-${process.pid}`;
  let fd: number | undefined;
  try {
    fd = fs.openSync(tmp, 'w');
    writeAll(fd, header);
    for (const [, t] of order) writeAll(fd, t.data);
    fs.closeSync(fd);
    fd = undefined;
    fs.renameSync(tmp, file);
  } catch (e) {
    if (fd !== undefined) fs.closeSync(fd);
    fs.rmSync(tmp, { force: true });
    throw e;
  }
}

/** Bytes of the whole safetensors file writeSafetensors would write. */
export function safetensorsFileSize(tensors: TensorList, metadata?: Record<string, string>): number {
  const l = layout('(size)', tensors, metadata);
  return l.header.length + l.dataBytes;
}

export function shardFileName(i: number, n: number): string {
  return `model-${String(i + 1).padStart(5, '0')}-of-${String(n).padStart(5, '0')}.safetensors`;
}

const SHARD_RE = /^model-\d{5}-of-\d{5}\.safetensors$/;

/**
 * Writes a checkpoint folder as transformers' save_pretrained does: tensors, in the given order, fill shards of at
 * most `maxShardBytes` of tensor data (a tensor larger than that gets a shard of its own), named
 * model-00001-of-0000N.safetensors, with model.safetensors.index.json (metadata.total_size, sorted weight_map).
 * When everything fits in one shard it writes model.safetensors and no index, as transformers does. Checkpoint
 * files of an earlier save in `dir` (model.safetensors, the index, model-*-of-*.safetensors) are removed first so
 * they cannot shadow the new ones. Returns the files written.
 */
export function writeShardedSafetensors(
  dir: string,
  tensors: TensorList,
  maxShardBytes: number,
  metadata: Record<string, string> = { format: 'pt' },
): string[] {
  if (!(Number.isSafeInteger(maxShardBytes) && maxShardBytes > 0)) throw new Error(`maxShardBytes must be a positive integer, got ${maxShardBytes}`);
  const list = entriesOf(tensors);
  // Checks names, dtypes and sizes before anything is removed or written.
  layout(path.join(dir, SAFETENSORS_SINGLE_FILE), list, metadata);
  const shards: (readonly [string, Tensor])[][] = [];
  let current: (readonly [string, Tensor])[] = [];
  let bytes = 0;
  for (const entry of list) {
    const size = entry[1].data.length;
    if (current.length > 0 && bytes + size > maxShardBytes) {
      shards.push(current);
      current = [];
      bytes = 0;
    }
    current.push(entry);
    bytes += size;
  }
  if (current.length > 0 || shards.length === 0) shards.push(current);

  fs.mkdirSync(dir, { recursive: true });
  for (const f of fs.readdirSync(dir)) {
    if (f === SAFETENSORS_SINGLE_FILE || f === SAFETENSORS_INDEX_FILE || SHARD_RE.test(f)) fs.rmSync(path.join(dir, f));
  }
  if (shards.length === 1) {
    const file = path.join(dir, SAFETENSORS_SINGLE_FILE);
    writeSafetensors(file, shards[0], metadata);
    return [file];
  }
  const written: string[] = [];
  const weightMap: Record<string, string> = {};
  let total = 0;
  shards.forEach((shard, i) => {
    const name = shardFileName(i, shards.length);
    const file = path.join(dir, name);
    writeSafetensors(file, shard, metadata);
    written.push(file);
    for (const [t, tensor] of shard) {
      weightMap[t] = name;
      total += tensor.data.length;
    }
  });
  const sortedMap = Object.fromEntries(Object.keys(weightMap).sort().map((k) => [k, weightMap[k]]));
  const indexFile = path.join(dir, SAFETENSORS_INDEX_FILE);
  fs.writeFileSync(indexFile, JSON.stringify({ metadata: { total_size: total }, weight_map: sortedMap }, null, 2) + '\n');
  written.push(indexFile);
  return written;
}
