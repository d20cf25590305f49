// The bytes of a model file, memory-mapped when the native addon is built (zero copy: a file larger than the JS heap,
// or than RAM, loads; pages are read on first touch) and read into memory otherwise.
//
// Node 20 caps one ArrayBuffer view (and one external ArrayBuffer) at buffer.constants.MAX_LENGTH = 4 GiB, so a
// larger file is mapped as several windows of at most that size: the first window holds the header (`head`), and
// view(offset, length) hands out a zero-copy view of any range inside one window, mapping a new window when needed.
// Tensors are far below 4 GiB (a Mixtral 8x22B f16 expert stack is 1.6 GB), so every tensor is one view.

import * as fs from 'node:fs';
import * as path from 'node:path';
import { constants as bufferConstants } from 'node:buffer';
import { FormatError } from './errors.js';
import { nativeAddon } from '../backend/native-addon.js';
import { Progress } from '../util/progress.js';

/** The largest single view (and single mapping) this Node can make. */
export const MAX_VIEW_BYTES = bufferConstants.MAX_LENGTH;

export interface FileBytesOptions {
  /** Memory-map when the native addon is available (default true); false always reads the file. */
  mmap?: boolean;
  /** Ask the kernel to read the mapped file in ahead of use (madvise WILLNEED). Default false. */
  willNeed?: boolean;
  /** Show a progress bar while reading a large file (TTY only). Default true. */
  progress?: boolean;
  /** For tests: the largest window to map (default MAX_VIEW_BYTES). */
  maxWindowBytes?: number;
}

export interface FileBytes {
  readonly path: string;
  readonly size: number;
  /** True when the bytes are a memory mapping of the file (else a copy in memory). */
  readonly mapped: boolean;
  /** The first min(size, the largest view) bytes: where headers live. */
  readonly head: Uint8Array;
  /** A zero-copy view of bytes [offset, offset + length); the range must lie inside the file. */
  view(offset: number, length: number): Uint8Array;
  /** Releases the file descriptor; views stay valid (a mapping outlives its descriptor). */
  close(): void;
}

function cannotRead(file: string, e: unknown): FormatError {
  return e instanceof FormatError ? e : new FormatError(file, `cannot read the file: ${(e as Error).message}`);
}

function checkRange(file: string, size: number, offset: number, length: number, limit: number): void {
  if (!(Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0 && offset + length <= size)) {
    throw new FormatError(file, `bytes [${offset}, ${offset + length}) are outside the file (${size} bytes)`);
  }
  if (length > limit) {
    throw new FormatError(file, `a single range of ${length} bytes (at offset ${offset}) is larger than the ${limit} bytes ` +
      'one view can hold in this Node version');
  }
}

/** Opens a file's bytes: mapped when possible, read otherwise. Throws FormatError naming the file. */
export function openFileBytes(file: string, opts: FileBytesOptions = {}): FileBytes {
  let fd: number;
  let size: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (e) {
    throw cannotRead(file, e);
  }
  try {
    const st = fs.fstatSync(fd);
    if (st.isDirectory()) throw new FormatError(file, 'cannot read the file: it is a directory');
    size = st.size;
    const addon = opts.mmap === false ? null : nativeAddon();
    // Only regular files are mapped (a pipe or device is read).
    if (addon !== null && st.isFile()) {
      const mapped = mapFile(file, fd, size, addon.mmap, opts);
      if (mapped !== null) return mapped;
    }
    const bytes = readAll(file, fd, size, opts.progress !== false);
    fs.closeSync(fd);
    const view = (offset: number, length: number): Uint8Array => {
      checkRange(file, size, offset, length, MAX_VIEW_BYTES);
      return bytes.subarray(offset, offset + length);
    };
    return { path: file, size, mapped: false, head: bytes, view, close: () => {} };
  } catch (e) {
    try { fs.closeSync(fd); } catch { /* already closed */ }
    throw cannotRead(file, e);
  }
}

type MmapFn = (file: string | number, offset?: number, length?: number, willNeed?: boolean) => ArrayBuffer;

/** Maps the file (null when the first mapping fails for a reason reading may not have: the caller reads instead). */
function mapFile(file: string, fd: number, size: number, mmap: MmapFn, opts: FileBytesOptions): FileBytes | null {
  const limit = Math.min(opts.maxWindowBytes ?? MAX_VIEW_BYTES, MAX_VIEW_BYTES);
  const willNeed = opts.willNeed === true;
  let head: Uint8Array;
  try {
    head = new Uint8Array(mmap(fd, 0, Math.min(size, limit), willNeed));
  } catch (e) {
    // ENOSYS (no mmap on this platform) or a file system that cannot map: fall back to reading.
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOSYS' || code === 'ENODEV' || code === 'EINVAL' || code === 'EACCES') return null;
    throw new FormatError(file, `cannot map the file: ${(e as Error).message}`);
  }
  // Windows beyond the head, each at most `limit` bytes, in the order views are asked for.
  const windows: { start: number; bytes: Uint8Array }[] = [];
  let fdOpen = true;
  const view = (offset: number, length: number): Uint8Array => {
    checkRange(file, size, offset, length, limit);
    if (offset + length <= head.byteLength) return head.subarray(offset, offset + length);
    for (const w of windows) {
      if (offset >= w.start && offset + length <= w.start + w.bytes.byteLength) return w.bytes.subarray(offset - w.start, offset - w.start + length);
    }
    if (!fdOpen) throw new FormatError(file, `bytes [${offset}, ${offset + length}) asked for after the file was closed`);
    let bytes: Uint8Array;
    try {
      bytes = new Uint8Array(mmap(fd, offset, Math.min(size - offset, limit), willNeed));
    } catch (e) {
      throw new FormatError(file, `cannot map bytes [${offset}, ${offset + length}): ${(e as Error).message}`);
    }
    windows.push({ start: offset, bytes });
    return bytes.subarray(0, length);
  };
  const close = (): void => {
    if (fdOpen) fs.closeSync(fd);
    fdOpen = false;
  };
  return { path: file, size, mapped: true, head, view, close };
}

/** Reads a whole file into memory (the fallback without the addon): at most one Buffer's worth. */
function readAll(file: string, fd: number, size: number, showProgress: boolean): Uint8Array {
  if (size > MAX_VIEW_BYTES) {
    throw new FormatError(file, `file is ${size} bytes, more than the ${MAX_VIEW_BYTES} bytes one Buffer can hold; ` +
      'reading such files needs memory mapping (build the native addon: npx node-gyp rebuild --directory=native)');
  }
  const bytes = Buffer.allocUnsafe(size);
  // Only worth a progress line for big files; 64 MiB reads keep it moving.
  const progress = showProgress && size >= 256 * 2 ** 20 ? new Progress({ label: `reading ${path.basename(file)}`, total: size }) : null;
  let off = 0;
  try {
    while (off < size) {
      const n = fs.readSync(fd, bytes, off, Math.min(size - off, 64 * 2 ** 20), off);
      if (n === 0) throw new FormatError(file, `file shrank while being read (got ${off} of ${size} bytes)`);
      off += n;
      progress?.update(off);
    }
  } catch (e) {
    progress?.abandon();
    throw e;
  }
  progress?.finish();
  return bytes;
}

/**
 * Touches every page of `views` so that a mapped file is read in now (with a progress line) rather than on first use
 * during inference. Returns the bytes touched. Reading one byte per 4 KiB page is enough to fault each page in.
 */
export function prefetchViews(views: Iterable<Uint8Array>, label: string, showProgress = true): number {
  const list = [...views];
  const total = list.reduce((s, v) => s + v.byteLength, 0);
  const progress = showProgress ? new Progress({ label, total }) : null;
  let done = 0;
  let sink = 0;
  for (const v of list) {
    // Chunks of 16 MiB between progress updates.
    for (let start = 0; start < v.byteLength; start += 16 * 2 ** 20) {
      const end = Math.min(v.byteLength, start + 16 * 2 ** 20);
      for (let i = start; i < end; i += 4096) sink ^= v[i];
      done += end - start;
      progress?.update(done);
    }
  }
  progress?.finish();
  // `sink` keeps the reads from being optimised away.
  return sink === -1 ? -1 : total;
}
