// Memory-mapped loading (native/src/mmap.c through src/formats/mapped-file.ts): the addon's mmap against the file's
// bytes, GGUF and safetensors files larger than 4 GiB (sparse: no disk or memory used) loading with a small RSS,
// windows across the 4 GiB view limit, the read fallback, and the progress line.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as v8 from 'node:v8';
import * as vm from 'node:vm';
import { fileURLToPath } from 'node:url';
import { nativeAddon, nativeAddonError } from '../src/backend/native-addon.js';
import { GGUFWriter, readGGUF } from '../src/formats/gguf.js';
import { readSafetensors, writeSafetensors } from '../src/formats/safetensors.js';
import { MAX_VIEW_BYTES, openFileBytes } from '../src/formats/mapped-file.js';
import { FormatError } from '../src/formats/errors.js';
import { f32Tensor } from '../src/tensor/tensor.js';
import { formatProgressLine, Progress, type ProgressStream } from '../src/util/progress.js';
import { rng } from './gguf-helpers.js';

const MICRO = fileURLToPath(new URL('../../test/fixtures/micro/micro-f32.gguf', import.meta.url));
const addon = nativeAddon();
const NO_ADDON = addon === null ? `native addon not built: ${nativeAddonError()}` : false;
const GiB = 2 ** 30;

function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'moe-mmap-'));
}

function randomBytes(n: number, seed: number): Uint8Array {
  const r = rng(seed);
  return Uint8Array.from({ length: n }, () => Math.floor(r() * 256));
}

test('addon mmap: bytes, ranges at any offset, descriptors, empty files, copy-on-write', { skip: NO_ADDON }, () => {
  const dir = tmpDir();
  try {
    const file = path.join(dir, 'data.bin');
    const bytes = randomBytes(3 * 4096 + 123, 1);
    fs.writeFileSync(file, bytes);
    assert.deepEqual(new Uint8Array(addon!.mmap(file)), bytes);
    for (const [o, n] of [[0, 1], [1, 4096], [4095, 2], [4096, 4096], [5000, 7000], [bytes.length, 0], [bytes.length - 1, 1]]) {
      assert.deepEqual(new Uint8Array(addon!.mmap(file, o, n)), bytes.subarray(o, o + n), `range [${o}, ${o + n})`);
    }
    assert.deepEqual(new Uint8Array(addon!.mmap(file, 10000)), bytes.subarray(10000), 'offset without length: to the end');
    const fd = fs.openSync(file, 'r');
    try {
      assert.deepEqual(new Uint8Array(addon!.mmap(fd, 77, 300)), bytes.subarray(77, 377));
    } finally {
      fs.closeSync(fd);
    }
    // A write through the view changes the process's copy only (a PROT_READ mapping would kill the process).
    const m = new Uint8Array(addon!.mmap(file));
    m[0] = bytes[0] ^ 0xff;
    assert.equal(m[0], bytes[0] ^ 0xff);
    assert.deepEqual(new Uint8Array(fs.readFileSync(file)), bytes);
    const empty = path.join(dir, 'empty.bin');
    fs.writeFileSync(empty, '');
    assert.equal(addon!.mmap(empty).byteLength, 0);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('addon mmap: missing, unreadable, directory, out-of-range and bad arguments throw errors naming the file', { skip: NO_ADDON }, () => {
  const dir = tmpDir();
  try {
    const file = path.join(dir, 'data.bin');
    fs.writeFileSync(file, randomBytes(100, 2));
    const missing = path.join(dir, 'missing.bin');
    const err = (fn: () => unknown, code: string | undefined, re: RegExp) => assert.throws(fn, (e: unknown) => {
      const x = e as NodeJS.ErrnoException;
      return x instanceof Error && x.code === code && re.test(x.message);
    });
    err(() => addon!.mmap(missing), 'ENOENT', new RegExp(`mmap ${missing}: cannot open: No such file`));
    err(() => addon!.mmap(dir), 'EISDIR', new RegExp(`mmap ${dir}: .*directory`));
    err(() => addon!.mmap('/dev/null'), 'ENODEV', /not a regular file/);
    err(() => addon!.mmap(file, 101), 'ERANGE', /bytes \[101, 101\) are outside the file \(100 bytes\)/);
    err(() => addon!.mmap(file, 50, 51), 'ERANGE', /bytes \[50, 101\) are outside the file/);
    err(() => addon!.mmap(file, -1), undefined, /offset must be a non-negative integer/);
    err(() => addon!.mmap(file, 1.5), undefined, /offset must be a non-negative integer/);
    err(() => addon!.mmap(file, 0, 1, 'yes' as unknown as boolean), undefined, /willNeed must be a boolean/);
    err(() => addon!.mmap({} as unknown as string), undefined, /file must be a path or a file descriptor/);
    err(() => addon!.mmap(`${file}\0x`), undefined, /NUL/);
    if (process.getuid?.() !== 0) {
      fs.chmodSync(file, 0);
      err(() => addon!.mmap(file), 'EACCES', /cannot open: Permission denied/);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('addon mmap: mappings are released when their ArrayBuffers are collected', { skip: NO_ADDON || (process.platform !== 'linux' && 'needs /proc/self/maps') }, async () => {
  const dir = tmpDir();
  try {
    const file = path.join(dir, 'collected.bin');
    fs.writeFileSync(file, randomBytes(8192, 3));
    v8.setFlagsFromString('--expose-gc');
    const gc = vm.runInNewContext('gc') as () => void;
    const count = () => fs.readFileSync('/proc/self/maps', 'utf8').split('\n').filter((l) => l.endsWith(file)).length;
    let kept: ArrayBuffer[] = [];
    for (let i = 0; i < 200; i++) kept.push(addon!.mmap(file));
    assert.ok(count() >= 200, `200 live mappings, /proc/self/maps shows ${count()}`);
    kept = [];
    // Node runs external-buffer finalizers after the collection, on a later turn of the event loop.
    for (let i = 0; i < 20 && count() > 0; i++) {
      gc();
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.equal(count(), 0, 'every mapping was unmapped');
    assert.equal(kept.length, 0);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

/** Moves tensor `name`'s data offset in a GGUF header written by GGUFWriter (the u64 right after its type id). */
function setTensorOffset(header: Uint8Array, name: string, nDims: number, offset: bigint): void {
  const key = new Uint8Array(8 + name.length);
  new DataView(key.buffer).setBigUint64(0, BigInt(name.length), true);
  key.set(new TextEncoder().encode(name), 8);
  const at = Buffer.from(header).indexOf(Buffer.from(key));
  assert.ok(at > 0, `tensor info of ${name} found`);
  const field = at + key.length + 4 + 8 * nDims + 4;
  new DataView(header.buffer, header.byteOffset).setBigUint64(field, offset, true);
}

test('readGGUF maps a sparse file larger than 4 GiB: tensors past 4 GiB and across the 4 GiB line read right, RSS stays small', { skip: NO_ADDON }, () => {
  const dir = tmpDir();
  try {
    const file = path.join(dir, 'big.gguf');
    const near = randomBytes(4096, 4); // straddles byte 2^32 of the file
    const far = randomBytes(4096, 5); // at 4.5 GiB
    const w = new GGUFWriter();
    w.setString('general.architecture', 'llama');
    w.addTensor('small.weight', f32Tensor(Float32Array.from([1, 2, 3, 4]), [4]));
    w.addTensor('near.weight', { dtype: 'f32', shape: [4, 256], data: near });
    w.addTensor('zeros.weight', { dtype: 'f32', shape: [1024], data: new Uint8Array(4096) });
    w.addTensor('far.weight', { dtype: 'f32', shape: [4, 256], data: far });
    const bytes = w.toBytes();
    const dataOffset = readGGUFHeaderOffset(bytes);
    const nearAt = 4 * GiB - 2048 - dataOffset;
    const zerosAt = 4 * GiB + 64 * 2 ** 20;
    const farAt = 4.5 * GiB;
    const header = bytes.slice(0, dataOffset);
    setTensorOffset(header, 'near.weight', 2, BigInt(nearAt));
    setTensorOffset(header, 'zeros.weight', 1, BigInt(zerosAt));
    setTensorOffset(header, 'far.weight', 2, BigInt(farAt));
    const fd = fs.openSync(file, 'w');
    try {
      fs.writeSync(fd, header, 0, header.length, 0);
      fs.writeSync(fd, bytes, dataOffset, 16, dataOffset); // small.weight at data offset 0
      fs.writeSync(fd, near, 0, near.length, dataOffset + nearAt);
      fs.writeSync(fd, far, 0, far.length, dataOffset + farAt);
      fs.ftruncateSync(fd, 5 * GiB);
    } finally {
      fs.closeSync(fd);
    }
    const rssBefore = process.memoryUsage().rss;
    const f = readGGUF(file);
    assert.equal(f.mapped, true);
    assert.deepEqual(f.tensors.get('small.weight')!.data, bytes.subarray(dataOffset, dataOffset + 16));
    assert.deepEqual(f.tensors.get('near.weight')!.data, near);
    assert.deepEqual(f.tensors.get('far.weight')!.data, far);
    const zeros = f.tensors.get('zeros.weight')!.data;
    assert.equal(zeros.byteLength, 4096);
    assert.ok(zeros.every((b) => b === 0), 'a tensor in the sparse hole past 4 GiB reads as zeros');
    const rss = process.memoryUsage().rss;
    assert.ok(rss - rssBefore < 256 * 2 ** 20, `RSS grew by ${rss - rssBefore} bytes for a ${5 * GiB}-byte file`);
    assert.ok(rss < GiB, `RSS ${rss} stays far below the file size`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

/** The data section offset of a GGUF file in memory (via the parser on its bytes). */
function readGGUFHeaderOffset(bytes: Uint8Array): number {
  const dir = tmpDir();
  try {
    const p = path.join(dir, 'h.gguf');
    fs.writeFileSync(p, bytes);
    return readGGUF(p, { mmap: false }).dataOffset;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

test('readSafetensors maps a sparse file larger than 4 GiB', { skip: NO_ADDON }, () => {
  const dir = tmpDir();
  try {
    const file = path.join(dir, 'big.safetensors');
    const far = randomBytes(1024, 6);
    const json = JSON.stringify({
      __metadata__: { format: 'pt' },
      small: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
      far: { dtype: 'F16', shape: [512], data_offsets: [4.25 * GiB, 4.25 * GiB + 1024] },
    });
    const text = new TextEncoder().encode(json + ' '.repeat((8 - (json.length % 8)) % 8));
    const fd = fs.openSync(file, 'w');
    try {
      const len = new Uint8Array(8);
      new DataView(len.buffer).setBigUint64(0, BigInt(text.length), true);
      fs.writeSync(fd, len, 0, 8, 0);
      fs.writeSync(fd, text, 0, text.length, 8);
      fs.writeSync(fd, new Uint8Array(new Float32Array([5, 6]).buffer), 0, 8, 8 + text.length);
      fs.writeSync(fd, far, 0, far.length, 8 + text.length + 4.25 * GiB);
    } finally {
      fs.closeSync(fd);
    }
    const rssBefore = process.memoryUsage().rss;
    const st = readSafetensors(file);
    assert.deepEqual(new Float32Array(st.tensors.get('small')!.data.slice().buffer), new Float32Array([5, 6]));
    assert.deepEqual(st.tensors.get('far')!.data, far);
    assert.ok(process.memoryUsage().rss - rssBefore < 256 * 2 ** 20, 'RSS stays small');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('mapped and read GGUF / safetensors give the same tensors', () => {
  const read = readGGUF(MICRO, { mmap: false });
  assert.equal(read.mapped, false);
  const mapped = readGGUF(MICRO, { prefetch: true, progress: false });
  assert.equal(mapped.mapped, addon !== null);
  assert.deepEqual([...mapped.tensors.keys()], [...read.tensors.keys()]);
  for (const [name, t] of read.tensors) assert.ok(Buffer.from(t.data).equals(mapped.tensors.get(name)!.data), name);
  const dir = tmpDir();
  try {
    const file = path.join(dir, 'm.safetensors');
    writeSafetensors(file, [['a', f32Tensor(Float32Array.from({ length: 999 }, (_, i) => i), [9, 111])], ['b', f32Tensor(new Float32Array([1, 2, 3]), [3])]]);
    const r = readSafetensors(file, { mmap: false });
    const m = readSafetensors(file, { prefetch: true, progress: false });
    for (const name of ['a', 'b']) assert.ok(Buffer.from(r.tensors.get(name)!.data).equals(m.tensors.get(name)!.data), name);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('openFileBytes: views across window boundaries equal the file bytes (small windows stand in for 4 GiB)', { skip: NO_ADDON }, () => {
  const dir = tmpDir();
  try {
    const file = path.join(dir, 'w.bin');
    const bytes = randomBytes(100_000, 7);
    fs.writeFileSync(file, bytes);
    const fb = openFileBytes(file, { maxWindowBytes: 10_000 });
    try {
      assert.equal(fb.mapped, true);
      assert.equal(fb.head.byteLength, 10_000);
      const r = rng(8);
      for (let i = 0; i < 300; i++) {
        const n = Math.floor(r() * 10_001);
        const o = Math.floor(r() * (bytes.length - n + 1));
        assert.deepEqual(fb.view(o, n), bytes.subarray(o, o + n), `[${o}, ${o + n})`);
      }
      assert.throws(() => fb.view(0, 10_001), (e: unknown) => e instanceof FormatError && /larger than the 10000 bytes one view can hold/.test(e.message));
      assert.throws(() => fb.view(99_999, 2), (e: unknown) => e instanceof FormatError && /outside the file \(100000 bytes\)/.test(e.message));
    } finally {
      fb.close();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('openFileBytes: missing files and directories are FormatErrors, mapped or read', () => {
  const dir = tmpDir();
  try {
    for (const mmap of [true, false]) {
      const missing = path.join(dir, 'nope.gguf');
      assert.throws(() => openFileBytes(missing, { mmap }), (e: unknown) => e instanceof FormatError && e.file === missing && /cannot read the file: ENOENT/.test(e.message));
      assert.throws(() => openFileBytes(dir, { mmap }), (e: unknown) => e instanceof FormatError && e.file === dir && /directory/.test(e.message));
    }
    const empty = path.join(dir, 'empty');
    fs.writeFileSync(empty, '');
    for (const mmap of [true, false]) {
      const fb = openFileBytes(empty, { mmap });
      assert.equal(fb.size, 0);
      assert.equal(fb.head.byteLength, 0);
      assert.equal(fb.view(0, 0).byteLength, 0);
      fb.close();
    }
    assert.ok(MAX_VIEW_BYTES >= 2 ** 32 - 1);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

class FakeStream implements ProgressStream {
  out = '';
  constructor(readonly isTTY: boolean, readonly columns = 200) {}
  write(s: string): boolean {
    this.out += s;
    return true;
  }
}

test('progress line: percent, amounts, rate and ETA; drawn in place on a TTY, silent on a pipe unless forced', () => {
  assert.equal(formatProgressLine('loading x', 250e6, 1e9, 2000), 'loading x   25%  250.0 MB/1.00 GB  125.0 MB/s  ETA 6s');
  assert.equal(formatProgressLine('quantizing', 3, 12, 1500, 'items', 'tensors'), 'quantizing   25%  3/12 tensors  2.0 tensors/s  ETA 5s');
  assert.equal(formatProgressLine('done', 1e9, 1e9, 125_000), 'done  100%  1.00 GB/1.00 GB  8.0 MB/s  in 2m05s');
  assert.equal(formatProgressLine('no total', 2048, 0, 0), 'no total  2.0 kB');

  const saved = process.env.MOE_PROGRESS;
  delete process.env.MOE_PROGRESS;
  try {
    let t = 0;
    const tty = new FakeStream(true);
    const p = new Progress({ label: 'L', total: 100, unit: 'items', stream: tty, now: () => t });
    t = 50; p.update(10); // first update draws
    t = 60; p.update(20); // within 100 ms of the last draw: skipped
    t = 200; p.update(30, 'loss 5.1234');
    p.finish();
    p.finish();
    const frames = tty.out.split('\r').filter(Boolean);
    assert.equal(frames.length, 3);
    assert.match(frames[0], /^L   10% {2}10\/100 items/);
    assert.match(frames[1], /^L   30% {2}30\/100 items.* {2}loss 5\.1234\x1b\[K$/); // the detail follows the figures
    assert.match(frames[2], /^L  100% {2}100\/100 items.*loss 5\.1234\x1b\[K\n$/);

    const pipe = new FakeStream(false);
    const quiet = new Progress({ label: 'L', total: 10, stream: pipe, now: () => t });
    quiet.update(5);
    quiet.finish();
    assert.equal(pipe.out, '');
    const forced = new Progress({ label: 'L', total: 10, stream: pipe, force: true, now: () => t });
    forced.update(5);
    forced.finish();
    assert.equal(pipe.out.split('\n').filter(Boolean).length, 2);
    assert.ok(!pipe.out.includes('\r'), 'plain lines on a pipe');

    process.env.MOE_PROGRESS = '0';
    const off = new FakeStream(true);
    new Progress({ label: 'L', total: 1, stream: off }).finish();
    assert.equal(off.out, '');
    process.env.MOE_PROGRESS = '1';
    const on = new FakeStream(false);
    new Progress({ label: 'L', total: 1, stream: on }).finish();
    assert.match(on.out, /^L  100%/);
  } finally {
    if (saved === undefined) delete process.env.MOE_PROGRESS;
    else process.env.MOE_PROGRESS = saved;
  }
});
