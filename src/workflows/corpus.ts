/**
 * The training corpus, library side: the committed text snapshot (data/corpus/, written by scripts/corpus/build.ts),
 * its train/validation split, and tokenized shards (what `moe data build` writes and a trainer reads).
 *
 * Snapshot: data/corpus/manifest.json lists files <lang>/<source>.txt.br, brotli-compressed UTF-8 text. Documents
 * are separated by one empty line ("\n\n"); a document's lines (paragraphs, sentences, verse lines) by "\n"; no
 * document holds an empty line, so the split is unambiguous. The manifest holds each file's sha256 (compressed and
 * uncompressed) and its byte, line, document and token counts per split.
 *
 * Split: a document is in the validation split when the first 4 bytes of the sha256 of its UTF-8 text, read as a
 * big-endian uint32, are below valFraction * 2^32. It depends on the document alone, never on its position, so the
 * split of every document stays the same when sources grow or are reordered.
 *
 * Shard file (<lang>-<split>-<nnn>.tok), all numbers little-endian:
 *   0  8 bytes  magic "MOESHARD"
 *   8  u32      version (1)
 *  12  u32      vocabulary size (token ids are below it; at most 65536, as ids are uint16)
 *  16  u64      token count N
 *  24  u32      document count
 *  28  u16      BOS id, u16 EOS id
 *  32  N x u16  token ids: each document is BOS, its tokens (SentencePiece encoding, no BOS of its own), EOS
 * Within a language and split, documents are ordered by their hash: a fixed shuffle that mixes sources and is
 * stable as the corpus grows. `index.json` beside the shards records the snapshot they came from and the counts.
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as zlib from 'node:zlib';
import { FormatError } from '../formats/errors.js';
import type { Tokenizer } from '../model/types.js';
import { mistralV1Tokenizer } from '../tokenizer/sources.js';
import { parse, UsageError, intArg } from '../cli/args.js';
import { withProgress } from '../util/progress.js';

export const CORPUS_LANGUAGES = ['en', 'fr', 'de', 'it', 'es'] as const;
export type CorpusLang = (typeof CORPUS_LANGUAGES)[number];
export const SPLITS = ['train', 'val'] as const;
export type Split = (typeof SPLITS)[number];

/** The committed snapshot (repo root data/corpus), resolved from this file's place in dist/src/workflows. */
export const DEFAULT_SNAPSHOT_DIR = fileURLToPath(new URL('../../../data/corpus/', import.meta.url));

// ---------------------------------------------------------------------------------------------------------------
// Documents and the split

export function documentHash(doc: string): Buffer {
  return crypto.createHash('sha256').update(doc, 'utf8').digest();
}

export function splitOfHash(hash: Uint8Array, valFraction: number): Split {
  const x = ((hash[0]! << 24) >>> 0) + (hash[1]! << 16) + (hash[2]! << 8) + hash[3]!;
  return x < valFraction * 2 ** 32 ? 'val' : 'train';
}

export function splitOf(doc: string, valFraction: number): Split {
  return splitOfHash(documentHash(doc), valFraction);
}

/** The documents of a snapshot text (see the file comment for the layout). */
export function parseDocuments(text: string): string[] {
  return text.split('\n\n').map((d) => d.replace(/^\n+|\n+$/g, '')).filter((d) => d.length > 0);
}

/** Snapshot text from documents; each must be non-empty, without empty lines or surrounding newlines. */
export function formatDocuments(docs: readonly string[]): string {
  for (const d of docs) {
    if (!d || d.includes('\n\n') || d.startsWith('\n') || d.endsWith('\n')) throw new Error(`not a valid corpus document: ${JSON.stringify(d.slice(0, 80))}`);
  }
  return docs.length ? docs.join('\n\n') + '\n' : '';
}

/** Brotli at its best setting (quality 11, 16 MiB window, text mode): what the snapshot files are written with. */
export function compressText(text: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  return zlib.brotliCompressSync(bytes, {
    params: {
      [zlib.constants.BROTLI_PARAM_MODE]: zlib.constants.BROTLI_MODE_TEXT,
      [zlib.constants.BROTLI_PARAM_QUALITY]: 11,
      [zlib.constants.BROTLI_PARAM_LGWIN]: 24,
      [zlib.constants.BROTLI_PARAM_SIZE_HINT]: bytes.length,
    },
  });
}

export function sha256Hex(bytes: Uint8Array | string): string {
  return crypto.createHash('sha256').update(bytes).digest('hex');
}

// ---------------------------------------------------------------------------------------------------------------
// The snapshot manifest

export interface SplitCounts {
  documents: number;
  lines: number;
  /** UTF-8 bytes of the documents' text (without the separating empty lines). */
  bytes: number;
  /** Mistral v1 tokens of the documents, without the BOS/EOS the shards add around each. */
  tokens: number;
}

export interface SnapshotFile {
  /** Relative to the snapshot directory: <lang>/<source>.txt.br */
  path: string;
  lang: CorpusLang;
  source: string;
  /** sha256 of the compressed file as committed. */
  sha256: string;
  /** sha256 of the uncompressed text (what a rebuild must reproduce; brotli output may differ between versions). */
  text_sha256: string;
  compressed_bytes: number;
  /** Uncompressed UTF-8 bytes of the whole file. */
  bytes: number;
  splits: Record<Split, SplitCounts>;
}

export interface SnapshotSource {
  id: string;
  title: string;
  license: string;
  /** File under the snapshot directory holding the source's copyright and license notice. */
  license_file: string;
  languages: CorpusLang[];
  packages: { registry: 'debian' | 'npm'; name: string; version: string; sha256?: string }[];
}

export interface SnapshotManifest {
  format: 'moe-ts-corpus';
  version: 1;
  tokenizer: string;
  vocab_size: number;
  val_fraction: number;
  sources: SnapshotSource[];
  files: SnapshotFile[];
  [extra: string]: unknown;
}

const MAX_SNAPSHOT_FILE = 1 << 30;

function isObj(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

/** Reads and checks data/corpus/manifest.json (structure only; readSnapshotText checks the files). */
export function readManifest(dir: string): SnapshotManifest {
  const file = path.join(dir, 'manifest.json');
  let raw: unknown;
  try {
    raw = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    if (err.code === 'ENOENT') throw new FormatError(file, 'no corpus manifest here (is this a corpus snapshot directory?)');
    throw new FormatError(file, `cannot read: ${err.message}`);
  }
  const bad = (field: string, msg: string): never => {
    throw new FormatError(file, `${field} ${msg}`);
  };
  if (!isObj(raw)) return bad('top level', 'is not an object');
  if (raw['format'] !== 'moe-ts-corpus') bad('format', `is ${JSON.stringify(raw['format'])}, not "moe-ts-corpus"`);
  if (raw['version'] !== 1) bad('version', `is ${JSON.stringify(raw['version'])}; this moe-ts reads version 1`);
  const vf = raw['val_fraction'];
  if (typeof vf !== 'number' || !(vf > 0 && vf < 1)) bad('val_fraction', `must be a number in (0, 1), got ${JSON.stringify(vf)}`);
  const vs = raw['vocab_size'];
  if (typeof vs !== 'number' || !Number.isInteger(vs) || vs < 1 || vs > 65536) bad('vocab_size', `must be an integer in [1, 65536], got ${JSON.stringify(vs)}`);
  if (!Array.isArray(raw['sources'])) bad('sources', 'must be an array');
  if (!Array.isArray(raw['files'])) bad('files', 'must be an array');
  const count = (v: unknown, field: string): number => {
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) bad(field, `must be a non-negative integer, got ${JSON.stringify(v)}`);
    return v as number;
  };
  (raw['files'] as unknown[]).forEach((f, i) => {
    const at = `files[${i}]`;
    if (!isObj(f)) return bad(at, 'is not an object');
    const p = f['path'];
    if (typeof p !== 'string' || !/^[a-z]{2}\/[a-z0-9][a-z0-9.-]*\.txt\.br$/.test(p)) bad(`${at}.path`, `must be "<lang>/<source>.txt.br", got ${JSON.stringify(p)}`);
    if (!(CORPUS_LANGUAGES as readonly unknown[]).includes(f['lang'])) bad(`${at}.lang`, `must be one of ${CORPUS_LANGUAGES.join(', ')}, got ${JSON.stringify(f['lang'])}`);
    for (const k of ['sha256', 'text_sha256']) if (typeof f[k] !== 'string' || !/^[0-9a-f]{64}$/.test(f[k] as string)) bad(`${at}.${k}`, 'must be 64 hex digits');
    count(f['compressed_bytes'], `${at}.compressed_bytes`);
    if (count(f['bytes'], `${at}.bytes`) > MAX_SNAPSHOT_FILE) bad(`${at}.bytes`, `is over the ${MAX_SNAPSHOT_FILE}-byte limit`);
    const sp = f['splits'];
    if (!isObj(sp)) return bad(`${at}.splits`, 'must be an object');
    for (const s of SPLITS) {
      const c = sp[s];
      if (!isObj(c)) return bad(`${at}.splits.${s}`, 'must be an object');
      for (const k of ['documents', 'lines', 'bytes', 'tokens']) count(c[k], `${at}.splits.${s}.${k}`);
    }
  });
  return raw as unknown as SnapshotManifest;
}

/** The text of one snapshot file, after checking both its sha256s against the manifest. */
export function readSnapshotText(dir: string, entry: SnapshotFile): string {
  const file = path.join(dir, entry.path);
  const comp = fs.readFileSync(file);
  if (sha256Hex(comp) !== entry.sha256) throw new FormatError(file, `sha256 ${sha256Hex(comp)} is not the manifest's ${entry.sha256} (the file changed or is damaged)`);
  let raw: Buffer;
  try {
    // Bounded by the manifest's size, so a damaged file cannot expand without limit.
    raw = zlib.brotliDecompressSync(comp, { maxOutputLength: Math.max(entry.bytes, 1) });
  } catch (e) {
    throw new FormatError(file, `cannot decompress (brotli): ${(e as Error).message}`);
  }
  if (raw.length !== entry.bytes) throw new FormatError(file, `decompresses to ${raw.length} bytes, the manifest says ${entry.bytes}`);
  if (sha256Hex(raw) !== entry.text_sha256) throw new FormatError(file, 'text sha256 does not match the manifest');
  return raw.toString('utf8');
}

// ---------------------------------------------------------------------------------------------------------------
// Shards

export const SHARD_MAGIC = 'MOESHARD';
export const SHARD_VERSION = 1;
export const SHARD_HEADER_BYTES = 32;

export interface ShardHeader {
  version: number;
  vocabSize: number;
  tokens: number;
  documents: number;
  bosId: number;
  eosId: number;
}

function encodeHeader(h: ShardHeader): Buffer {
  const b = Buffer.alloc(SHARD_HEADER_BYTES);
  b.write(SHARD_MAGIC, 0, 'latin1');
  b.writeUInt32LE(h.version, 8);
  b.writeUInt32LE(h.vocabSize, 12);
  b.writeBigUInt64LE(BigInt(h.tokens), 16);
  b.writeUInt32LE(h.documents, 24);
  b.writeUInt16LE(h.bosId, 28);
  b.writeUInt16LE(h.eosId, 30);
  return b;
}

/** Writes one shard: documents are appended as BOS + ids + EOS; the header is completed on close. */
export class ShardWriter {
  private fd: number;
  private readonly tmp: string;
  private buf: Uint16Array;
  private used = 0;
  private tokens = 0;
  private documents = 0;
  private closed = false;

  constructor(
    readonly file: string,
    readonly meta: { vocabSize: number; bosId: number; eosId: number },
  ) {
    if (!Number.isInteger(meta.vocabSize) || meta.vocabSize < 1 || meta.vocabSize > 65536) throw new RangeError(`vocabSize ${meta.vocabSize} does not fit uint16 ids`);
    for (const id of [meta.bosId, meta.eosId]) if (!Number.isInteger(id) || id < 0 || id >= meta.vocabSize) throw new RangeError(`special id ${id} is not below vocabSize ${meta.vocabSize}`);
    this.tmp = `${file}.tmp-${process.pid}`;
    this.fd = fs.openSync(this.tmp, 'w');
    fs.writeSync(this.fd, Buffer.alloc(SHARD_HEADER_BYTES));
    this.buf = new Uint16Array(1 << 20);
  }

  get tokenCount(): number {
    return this.tokens;
  }

  writeDocument(ids: ArrayLike<number>): void {
    if (this.closed) throw new Error(`${this.file}: writer is closed`);
    const n = ids.length + 2;
    if (this.used + n > this.buf.length) this.drain();
    if (n > this.buf.length) this.buf = new Uint16Array(n);
    const v = this.meta.vocabSize;
    this.buf[this.used++] = this.meta.bosId;
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i]!;
      if (!Number.isInteger(id) || id < 0 || id >= v) throw new RangeError(`${this.file}: token id ${id} is outside [0, ${v})`);
      this.buf[this.used++] = id;
    }
    this.buf[this.used++] = this.meta.eosId;
    this.tokens += n;
    this.documents++;
  }

  private drain(): void {
    if (!this.used) return;
    const bytes = Buffer.from(this.buf.buffer, this.buf.byteOffset, this.used * 2);
    if (isBigEndian) bytes.swap16();
    fs.writeSync(this.fd, bytes);
    this.used = 0;
  }

  /** Completes the header and moves the file into place (atomically: a reader never sees half a shard). */
  close(): ShardHeader {
    if (this.closed) throw new Error(`${this.file}: writer is closed`);
    this.drain();
    const h: ShardHeader = { version: SHARD_VERSION, vocabSize: this.meta.vocabSize, tokens: this.tokens, documents: this.documents, bosId: this.meta.bosId, eosId: this.meta.eosId };
    fs.writeSync(this.fd, encodeHeader(h), 0, SHARD_HEADER_BYTES, 0);
    fs.closeSync(this.fd);
    fs.renameSync(this.tmp, this.file);
    this.closed = true;
    return h;
  }

  /** Drops the partial file. */
  abort(): void {
    if (this.closed) return;
    this.closed = true;
    fs.closeSync(this.fd);
    fs.rmSync(this.tmp, { force: true });
  }
}

const isBigEndian = new Uint8Array(new Uint16Array([1]).buffer)[0] === 0;

function parseHeader(file: string, b: Buffer, fileSize: number): ShardHeader {
  if (b.length < SHARD_HEADER_BYTES) throw new FormatError(file, `is ${b.length} bytes, shorter than the ${SHARD_HEADER_BYTES}-byte shard header`);
  if (b.toString('latin1', 0, 8) !== SHARD_MAGIC) throw new FormatError(file, `magic is ${JSON.stringify(b.toString('latin1', 0, 8))}, not "${SHARD_MAGIC}" (not a moe-ts token shard)`);
  const version = b.readUInt32LE(8);
  if (version !== SHARD_VERSION) throw new FormatError(file, `version is ${version}; this moe-ts reads shard version ${SHARD_VERSION}`);
  const vocabSize = b.readUInt32LE(12);
  if (vocabSize < 1 || vocabSize > 65536) throw new FormatError(file, `vocab size ${vocabSize} is not in [1, 65536] (ids are uint16)`);
  const tokens64 = b.readBigUInt64LE(16);
  const expected = BigInt(SHARD_HEADER_BYTES) + 2n * tokens64;
  if (expected !== BigInt(fileSize)) throw new FormatError(file, `token count ${tokens64} needs ${expected} bytes but the file has ${fileSize}`);
  const tokens = Number(tokens64);
  const documents = b.readUInt32LE(24);
  if (documents * 2 > tokens) throw new FormatError(file, `document count ${documents} is more than ${tokens} tokens can hold (each has BOS and EOS)`);
  const bosId = b.readUInt16LE(28);
  const eosId = b.readUInt16LE(30);
  if (bosId >= vocabSize || eosId >= vocabSize) throw new FormatError(file, `BOS ${bosId} / EOS ${eosId} is not below vocab size ${vocabSize}`);
  return { version, vocabSize, tokens, documents, bosId, eosId };
}

export function readShardHeader(file: string): ShardHeader {
  const fd = fs.openSync(file, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const b = Buffer.alloc(Math.min(size, SHARD_HEADER_BYTES));
    fs.readSync(fd, b, 0, b.length, 0);
    return parseHeader(file, b, size);
  } finally {
    fs.closeSync(fd);
  }
}

function checkIds(file: string, ids: Uint16Array, vocabSize: number, offset: number): void {
  if (vocabSize === 65536) return;
  for (let i = 0; i < ids.length; i++) {
    if (ids[i]! >= vocabSize) throw new FormatError(file, `token ${offset + i} is id ${ids[i]}, not below the vocab size ${vocabSize}`);
  }
}

/** A whole shard in memory (2 bytes per token). */
export function readShard(file: string): { header: ShardHeader; ids: Uint16Array } {
  const header = readShardHeader(file);
  const b = fs.readFileSync(file);
  if (b.length !== SHARD_HEADER_BYTES + 2 * header.tokens) throw new FormatError(file, 'changed size while being read');
  const ids = new Uint16Array(header.tokens);
  const bytes = new Uint8Array(ids.buffer);
  bytes.set(b.subarray(SHARD_HEADER_BYTES));
  if (isBigEndian) Buffer.from(ids.buffer).swap16();
  checkIds(file, ids, header.vocabSize, 0);
  return { header, ids };
}

export interface ShardInfo {
  file: string;
  lang: string;
  split: Split;
  index: number;
  header: ShardHeader;
}

const SHARD_NAME = /^([a-z]{2})-(train|val)-(\d{3,})\.tok$/;

export function shardName(lang: string, split: Split, index: number): string {
  return `${lang}-${split}-${String(index).padStart(3, '0')}.tok`;
}

/** The shards in a directory (by file name), ordered by language, split and index, with their checked headers. */
export function listShards(dir: string, filter: { lang?: string | readonly string[]; split?: Split } = {}): ShardInfo[] {
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch (e) {
    throw new FormatError(dir, `cannot list shards: ${(e as Error).message}`);
  }
  const langs = filter.lang === undefined ? undefined : typeof filter.lang === 'string' ? [filter.lang] : filter.lang;
  const out: ShardInfo[] = [];
  for (const name of names) {
    const m = SHARD_NAME.exec(name);
    if (!m) continue;
    const [, lang, split, idx] = m;
    if (langs && !langs.includes(lang!)) continue;
    if (filter.split && filter.split !== split) continue;
    const file = path.join(dir, name);
    out.push({ file, lang: lang!, split: split as Split, index: Number(idx), header: readShardHeader(file) });
  }
  const order = (l: string) => {
    const i = (CORPUS_LANGUAGES as readonly string[]).indexOf(l);
    return i < 0 ? CORPUS_LANGUAGES.length : i;
  };
  out.sort((a, b) => order(a.lang) - order(b.lang) || a.lang.localeCompare(b.lang) || SPLITS.indexOf(a.split) - SPLITS.indexOf(b.split) || a.index - b.index);
  if (out.length === 0) throw new FormatError(dir, `no token shards${langs ? ` for ${langs.join(', ')}` : ''}${filter.split ? ` (${filter.split})` : ''} (files named <lang>-<train|val>-<nnn>.tok; build them with \`moe data build --out ${dir}\`)`);
  return out;
}

export interface TokenChunk {
  lang: string;
  split: Split;
  file: string;
  /** Position of ids[0] in the shard's token stream. */
  offset: number;
  ids: Uint16Array;
}

/**
 * Streams the token ids of the shards in `dir` (optionally one language / split) in chunks of at most
 * `chunkTokens`, shard by shard; memory stays at one chunk. Every id is checked against the shard's vocab size.
 */
export function* readShards(
  dir: string,
  opts: { lang?: string | readonly string[]; split?: Split; chunkTokens?: number } = {},
): Generator<TokenChunk> {
  const chunk = opts.chunkTokens ?? 1 << 20;
  if (!Number.isInteger(chunk) || chunk < 1) throw new RangeError(`chunkTokens must be a positive integer, got ${chunk}`);
  for (const s of listShards(dir, opts)) {
    const fd = fs.openSync(s.file, 'r');
    try {
      if (fs.fstatSync(fd).size !== SHARD_HEADER_BYTES + 2 * s.header.tokens) throw new FormatError(s.file, 'changed size while being read');
      for (let off = 0; off < s.header.tokens; off += chunk) {
        const n = Math.min(chunk, s.header.tokens - off);
        const ids = new Uint16Array(n);
        const got = fs.readSync(fd, new Uint8Array(ids.buffer), 0, 2 * n, SHARD_HEADER_BYTES + 2 * off);
        if (got !== 2 * n) throw new FormatError(s.file, `short read at token ${off}`);
        if (isBigEndian) Buffer.from(ids.buffer).swap16();
        checkIds(s.file, ids, s.header.vocabSize, off);
        yield { lang: s.lang, split: s.split, file: s.file, offset: off, ids };
      }
    } finally {
      fs.closeSync(fd);
    }
  }
}

/** The documents of a token stream: the ids between each BOS and the EOS that closes it. */
export function splitDocuments(ids: Uint16Array, bosId: number, eosId: number): Uint16Array[] {
  const docs: Uint16Array[] = [];
  let start = -1;
  for (let i = 0; i < ids.length; i++) {
    if (ids[i] === bosId) start = i + 1;
    else if (ids[i] === eosId && start >= 0) {
      docs.push(ids.subarray(start, i));
      start = -1;
    }
  }
  return docs;
}

// ---------------------------------------------------------------------------------------------------------------
// Building shards from the snapshot

export interface ShardIndex {
  format: 'moe-ts-shards';
  version: 1;
  snapshot: { manifest_sha256: string; val_fraction: number; tokenizer: string };
  vocab_size: number;
  bos_id: number;
  eos_id: number;
  /** Per language and split: documents and tokens written (tokens include each document's BOS and EOS). */
  counts: Record<string, Record<Split, { documents: number; tokens: number; shards: string[] }>>;
}

export interface BuildShardsOptions {
  languages?: readonly CorpusLang[];
  /** Tokens per shard file before a new one starts (default 8M = 16 MB). */
  maxShardTokens?: number;
  /** Only the first n documents of each snapshot file (a slice, for tests and quick runs). */
  documentsPerFile?: number;
  tokenizer?: Tokenizer;
  /** Called as tokenization advances: bytes of text done and in all. */
  onProgress?: (doneBytes: number, totalBytes: number, lang: CorpusLang) => void;
}

export interface BuildShardsResult {
  index: ShardIndex;
  /** Counts that differ from the manifest's (only checked on a full build): a different tokenizer or snapshot. */
  mismatches: string[];
}

/**
 * Tokenizes the snapshot in `snapshotDir` into shards in `outDir` (created; existing shards of the built
 * languages are replaced). Every file's checksums are verified first.
 */
export function buildShards(snapshotDir: string, outDir: string, opts: BuildShardsOptions = {}): BuildShardsResult {
  const manifest = readManifest(snapshotDir);
  const manifestBytes = fs.readFileSync(path.join(snapshotDir, 'manifest.json'));
  const langs = opts.languages ?? CORPUS_LANGUAGES;
  const tok = opts.tokenizer ?? mistralV1Tokenizer();
  if (tok.vocabSize !== manifest.vocab_size) throw new FormatError(path.join(snapshotDir, 'manifest.json'), `vocab_size ${manifest.vocab_size} differs from the tokenizer's ${tok.vocabSize}`);
  const maxShard = opts.maxShardTokens ?? 8 << 20;
  const files = manifest.files.filter((f) => langs.includes(f.lang));
  // Read (and verify) everything first, so that a damaged file fails before any shard is written and the
  // progress total is exact.
  const byLang = new Map<CorpusLang, { hash: Buffer; text: string; split: Split }[]>();
  const expected = new Map<CorpusLang, Record<Split, number>>();
  let totalBytes = 0;
  for (const lang of langs) {
    const docs: { hash: Buffer; text: string; split: Split }[] = [];
    const seen = new Set<string>();
    const exp: Record<Split, number> = { train: 0, val: 0 };
    for (const f of files.filter((x) => x.lang === lang)) {
      let fileDocs = parseDocuments(readSnapshotText(snapshotDir, f));
      if (opts.documentsPerFile !== undefined) fileDocs = fileDocs.slice(0, opts.documentsPerFile);
      for (const text of fileDocs) {
        const hash = documentHash(text);
        const key = hash.toString('hex');
        if (seen.has(key)) continue; // the builder dedups; stay safe if a snapshot was edited by hand
        seen.add(key);
        docs.push({ hash, text, split: splitOfHash(hash, manifest.val_fraction) });
        totalBytes += Buffer.byteLength(text, 'utf8');
      }
      for (const s of SPLITS) exp[s] += f.splits[s].tokens;
    }
    byLang.set(lang, docs);
    expected.set(lang, exp);
  }
  fs.mkdirSync(outDir, { recursive: true });
  for (const s of fs.readdirSync(outDir)) {
    const m = SHARD_NAME.exec(s);
    if (m && (langs as readonly string[]).includes(m[1]!)) fs.rmSync(path.join(outDir, s));
  }

  const index: ShardIndex = {
    format: 'moe-ts-shards',
    version: 1,
    snapshot: { manifest_sha256: sha256Hex(manifestBytes), val_fraction: manifest.val_fraction, tokenizer: manifest.tokenizer },
    vocab_size: tok.vocabSize,
    bos_id: tok.bosId,
    eos_id: tok.eosId,
    counts: {},
  };
  const mismatches: string[] = [];
  let done = 0;
  for (const lang of langs) {
    const docs = byLang.get(lang)!;
    docs.sort((a, b) => Buffer.compare(a.hash, b.hash));
    const counts = {} as Record<Split, { documents: number; tokens: number; shards: string[] }>;
    for (const split of SPLITS) {
      const c = (counts[split] = { documents: 0, tokens: 0, shards: [] as string[] });
      let writer: ShardWriter | undefined;
      let textTokens = 0;
      try {
        for (const d of docs) {
          if (d.split !== split) continue;
          if (!writer || writer.tokenCount >= maxShard) {
            if (writer) writer.close();
            const name = shardName(lang, split, c.shards.length);
            c.shards.push(name);
            writer = new ShardWriter(path.join(outDir, name), { vocabSize: tok.vocabSize, bosId: tok.bosId, eosId: tok.eosId });
          }
          const ids = tok.encode(d.text, { addBos: false });
          writer.writeDocument(ids);
          textTokens += ids.length;
          c.documents++;
          c.tokens += ids.length + 2;
          done += Buffer.byteLength(d.text, 'utf8');
          opts.onProgress?.(done, totalBytes, lang);
        }
        writer?.close();
      } catch (e) {
        writer?.abort();
        throw e;
      }
      const exp = expected.get(lang)![split];
      if (opts.documentsPerFile === undefined && textTokens !== exp) {
        mismatches.push(`${lang} ${split}: ${textTokens} tokens, the manifest says ${exp}`);
      }
    }
    index.counts[lang] = counts;
  }
  const tmp = path.join(outDir, `index.json.tmp-${process.pid}`);
  fs.writeFileSync(tmp, JSON.stringify(index, null, 2) + '\n');
  fs.renameSync(tmp, path.join(outDir, 'index.json'));
  return { index, mismatches };
}

// ---------------------------------------------------------------------------------------------------------------
// The `moe data` command

const DATA_USAGE = 'data build --out <dir> [--snapshot <dir>] [--lang en,fr,...] [--shard-tokens N] [--slice N]';

/** `moe data build`: tokenizes the committed snapshot into shards. */
export async function dataCommand(argv: string[]): Promise<void> {
  const [sub, ...rest] = argv;
  if (sub !== 'build') throw new UsageError(`usage: moe ${DATA_USAGE}`);
  const { values } = parse(rest, { out: { type: 'string' }, snapshot: { type: 'string' }, lang: { type: 'string' }, 'shard-tokens': { type: 'string' }, slice: { type: 'string' } });
  const out = values.out as string | undefined;
  if (!out) throw new UsageError('--out is required');
  let languages: CorpusLang[] | undefined;
  if (values.lang !== undefined) {
    languages = (values.lang as string).split(',').map((l) => l.trim()) as CorpusLang[];
    const badLang = languages.find((l) => !(CORPUS_LANGUAGES as readonly string[]).includes(l));
    if (badLang !== undefined) throw new UsageError(`--lang: '${badLang}' is not one of ${CORPUS_LANGUAGES.join(', ')}`);
  }
  const snapshot = (values.snapshot as string | undefined) ?? DEFAULT_SNAPSHOT_DIR;
  const opts: BuildShardsOptions = { languages };
  if (values['shard-tokens'] !== undefined) opts.maxShardTokens = intArg('shard-tokens', values['shard-tokens'] as string, 0, 1);
  if (values.slice !== undefined) opts.documentsPerFile = intArg('slice', values.slice as string, 0, 1);
  // Progress in bytes of text tokenized (the total is known once the manifest is read).
  const { index, mismatches } = withProgress({ label: 'tokenizing corpus', total: 0, unit: 'bytes' }, (p) => {
    opts.onProgress = (done, total) => {
      p.setTotal(total);
      p.update(done);
    };
    return buildShards(snapshot, out, opts);
  });
  const lines = [`shards in ${out}:`];
  for (const [lang, c] of Object.entries(index.counts)) {
    lines.push(`  ${lang}: train ${c.train.tokens.toLocaleString('en-US')} tokens (${c.train.documents} docs, ${c.train.shards.length} shards), val ${c.val.tokens.toLocaleString('en-US')} tokens (${c.val.documents} docs)`);
  }
  process.stdout.write(lines.join('\n') + '\n');
  for (const m of mismatches) process.stderr.write(`moe data: warning: ${m}\n`);
}
