// Hostile and broken GGUF files: every one must give a FormatError that names the problem (and the key or tensor),
// never a RangeError/TypeError from a DataView, a hang, or an allocation sized by a header number.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { GGUFWriter, parseGGUF, type GGUFFile } from '../src/formats/gguf.js';
import { FormatError } from '../src/formats/errors.js';
import { tensorByteSize } from '../src/tensor/tensor.js';
import { ALL_VALUES, Raw, randomTensor, rng } from './gguf-helpers.js';

const fixture = (name: string): string => fileURLToPath(new URL(`../../test/fixtures/micro/${name}`, import.meta.url));

// A hang guard only (these tests take a few seconds): a parser that loops forever fails instead of blocking CI.
const HANG_GUARD = { timeout: 120_000 };

function formatError(bytes: Uint8Array, re: RegExp, file = 'hostile.gguf'): FormatError {
  let err: unknown;
  try {
    parseGGUF(bytes, file);
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof FormatError, `expected a FormatError matching ${re}, got ${err === undefined ? 'success' : String(err)}`);
  assert.equal(err.file, file);
  assert.match(err.message, re);
  return err;
}

/** A header with one tensor info and its data, padded as a writer would. */
function oneTensor(ne: (bigint | number)[], type: number, offset: bigint | number, dataBytes: number, name = 'w'): Uint8Array {
  return new Raw().header(1, 0).tensor(name, ne, type, offset).padTo(32).zeros(dataBytes).bytes();
}

const Q = (s: string): string => JSON.stringify(s).replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

test('header: bad magic, versions, endianness, impossible counts', () => {
  formatError(new Uint8Array(0), /not a GGUF file: only 0 bytes/);
  formatError(new Uint8Array([0x47, 0x47, 0x55]), /only 3 bytes/);
  formatError(new Raw().u8(0x47, 0x47, 0x4d, 0x4c).u32(3).u64(0).u64(0).bytes(), /magic is 'GGML', expected 'GGUF'/);
  formatError(new Raw().u8(0x7f, 0x45, 0x4c, 0x46).u32(3).bytes(), /magic is '\?ELF'/);
  formatError(new Raw().header(0, 0, 0).bytes(), /bad GGUF version 0/);
  formatError(new Raw().header(0, 0, 1).bytes(), /GGUF version 1 is not supported/);
  formatError(new Raw().header(0, 0, 4).bytes(), /GGUF version 4 is newer than the versions supported/);
  // A big-endian v3 file: version bytes 00 00 00 03.
  formatError(new Raw().u8(0x47, 0x47, 0x55, 0x46, 0, 0, 0, 3).u64(0).u64(0).bytes(), /big-endian/);
  formatError(new Raw().u8(0x47, 0x47, 0x55, 0x46).u32(3).bytes(), /file ends inside the tensor count/);
  formatError(new Raw().u8(0x47, 0x47, 0x55, 0x46).u32(3).u64(0).u8(1, 2).bytes(), /file ends inside the metadata count/);
  formatError(new Raw().header(2n ** 60n, 0).bytes(), /header claims 0 metadata entries and 1152921504606846976 tensors/);
  formatError(new Raw().header(0, 2n ** 62n).zeros(100).bytes(), /claims 4611686018427387904 metadata entries/);
  formatError(new Raw().header(0, -1).bytes(), /the metadata count is negative \(-1\)/);
  formatError(new Raw().header(-1, 0).bytes(), /the tensor count is negative \(-1\)/);
  formatError(new Raw().header(2n ** 63n, 0).bytes(), /the tensor count is negative/);
  formatError(new Raw().header(1, 1).zeros(35).bytes(), /cannot fit in the 35 bytes/);
});

test('metadata: huge lengths, empty and duplicate keys, unknown types, deep nesting', () => {
  const kv = (build: (r: Raw) => Raw, n = 1): Uint8Array => build(new Raw().header(0, n)).zeros(4).bytes();
  formatError(kv((r) => r.str('abc', 2n ** 40n)), /metadata key #0 claims 1099511627776 bytes, but only \d+ bytes remain/);
  formatError(kv((r) => r.str('abc', 2n ** 64n - 1n)), /metadata key #0 claims 18446744073709551615 bytes/);
  formatError(kv((r) => r.str('').u32(4).u32(1)), /metadata key #0 is empty/);
  formatError(kv((r) => r.kvU32('a.b', 1).kvU32('a.b', 2), 2), new RegExp(`duplicate metadata key ${Q('a.b')} \\(entry #1\\)`));
  formatError(kv((r) => r.str('k').u32(13)), /metadata key "k" has unknown GGUF value type 13/);
  formatError(kv((r) => r.str('k').i32(-1)), /metadata key "k" has unknown GGUF value type -1/);
  formatError(kv((r) => r.str('k').u32(8).u64(2n ** 50n)), /the value of metadata key "k" claims 1125899906842624 bytes/);
  formatError(kv((r) => r.str('k').u32(9).u32(99).u64(1)), /the items of the array value of metadata key "k" has unknown GGUF value type 99/);
  formatError(kv((r) => r.str('k').u32(9).u32(0).u64(2n ** 60n)), /the array value of metadata key "k" claims 1152921504606846976 bytes/);
  formatError(kv((r) => r.str('k').u32(9).u32(8).u64(2n ** 61n)), /claims 2305843009213693952 items of at least 8 bytes/);
  formatError(kv((r) => r.str('k').u32(9).u32(10).u64(3).u64(1).u64(2)), /claims 3 items of at least 8 bytes, but only 20 bytes remain/);
  formatError(kv((r) => r.str('k').u32(9).u32(8).u64(2).str('ok').str('x', 2n ** 40n)), /item 1 of the array value of metadata key "k" claims 1099511627776 bytes/);
  formatError(kv((r) => r.str('k').u32(4).u8(1, 2)).subarray(0, 24 + 9 + 4 + 2), /file ends inside the value of metadata key "k"/);
  // Ten thousand nested arrays: refused by depth, not by overflowing the stack.
  const deep = new Raw().header(0, 1).str('k').u32(9);
  for (let i = 0; i < 10000; i++) deep.u32(9).u64(1);
  formatError(deep.u32(0).u64(0).bytes(), /nests arrays deeper than 16 levels/);
  formatError(kv((r) => r.kvU32('general.alignment', 0)), /'general.alignment' is 0, which is not a power of two/);
  formatError(kv((r) => r.kvU32('general.alignment', 48)), /'general.alignment' is 48, which is not a power of two/);
  formatError(kv((r) => r.str('general.alignment').u32(10).u64(32)), /'general.alignment' must be uint32 but is uint64/);
});

test('metadata: invalid UTF-8 becomes U+FFFD (as a lenient reader), odd bools read as llama.cpp does', () => {
  const bytes = new Raw().header(0, 3)
    .str(new Uint8Array([0x6b, 0xff, 0x6b])).u32(8).str(new Uint8Array([0xc3, 0x28, 0xe2, 0x82]))
    .str('b').u32(7).u8(2)
    .kvStr('ok', '\u2581x')
    .bytes();
  const f = parseGGUF(bytes, 'utf8.gguf');
  assert.deepEqual([...f.metadata], [
    ['k\ufffdk', { type: 'string', value: '\ufffd(\ufffd' }],
    ['b', { type: 'bool', value: true }],
    ['ok', { type: 'string', value: '\u2581x' }],
  ]);
});

test('tensor infos: dims, element counts, types, rows, names', () => {
  formatError(new Raw().header(1, 0).str('w', 2n ** 40n).zeros(40).bytes(), /the name of tensor #0 claims 1099511627776 bytes/);
  formatError(new Raw().header(2, 0).tensor('w', [4], 0, 0).tensor('w', [4], 0, 32).padTo(32).zeros(64).bytes(),
    /duplicate tensor "w" \(tensor #1\)/);
  formatError(oneTensor([1, 1, 1, 1, 1], 0, 0, 32), /tensor "w" has 5 dimensions \(at most 4\)/);
  formatError(new Raw().header(1, 0).str('w').u32(0xffffffff).zeros(64).bytes(), /tensor "w" has 4294967295 dimensions/);
  formatError(oneTensor([-1], 0, 0, 32), /tensor "w" has negative size -1 in dimension 0 \(ne\[0\]\)/);
  formatError(oneTensor([4, 2n ** 64n - 1n], 0, 0, 32), /tensor "w" has negative size -1 in dimension 1/);
  formatError(oneTensor([2n ** 40n, 2n ** 40n], 0, 0, 32), /tensor "w" has too many elements: ne = \[1099511627776, 1099511627776\] exceeds 2\^53/);
  formatError(oneTensor([2n ** 20n, 2n ** 20n, 2n ** 20n, 4], 0, 0, 32), /tensor "w" has too many elements: ne = \[1048576, 1048576, 1048576, \.\.\.\]/);
  formatError(oneTensor([2n ** 62n, 2n ** 62n], 0, 0, 32), /tensor "w" has too many elements: ne = \[4611686018427387904, \.\.\.\]/);
  formatError(oneTensor([32], 4, 0, 32), /tensor "w" has unknown ggml type id 4/);
  formatError(oneTensor([32], 1000, 0, 32), /tensor "w" has unknown ggml type id 1000/);
  formatError(oneTensor([32], -1, 0, 32), /tensor "w" has unknown ggml type id -1/);
  formatError(oneTensor([256], 23, 0, 256), /tensor "w" has ggml type 23 \(iq4_xs\), which moe-ts does not support/);
  formatError(oneTensor([33, 2], 8, 0, 96), /tensor "w" of type q8_0 has rows of 33 elements, not a multiple of the block size 32/);
  formatError(oneTensor([100], 12, 0, 512), /tensor "w" of type q4_k has rows of 100 elements, not a multiple of the block size 256/);
  formatError(new Raw().header(1, 0).tensor('w', [4], 0, 0).bytes().slice(0, -3), /file ends inside the data offset of tensor "w"/);
  formatError(new Raw().header(1, 0).str('w').u32(4).u64(4).u64(4).bytes(), /file ends inside dimension 2 of tensor "w"/);
});

test('tensor data: out of bounds, misaligned, overlapping; empty tensors accepted as llama.cpp does', () => {
  formatError(oneTensor([8], 0, 0, 16), /tensor "w" data \(bytes 0\.\.32 of the data section\) runs past the end of the file \(the data section holds 16 bytes\)/);
  formatError(oneTensor([8], 0, 2n ** 63n, 64), /tensor "w" data \(bytes 9223372036854775808\.\.9223372036854775840 .*\) runs past the end/);
  formatError(oneTensor([8], 0, 2n ** 64n - 32n, 64), /runs past the end of the file/);
  formatError(oneTensor([8], 0, 16, 64), /tensor "w" has data offset 16, which is not a multiple of the alignment 32/);
  const withAlign = (al: number, off: number): Uint8Array =>
    new Raw().header(1, 1).kvU32('general.alignment', al).tensor('w', [8], 0, off).padTo(al).zeros(128).bytes();
  formatError(withAlign(64, 32), /data offset 32, which is not a multiple of the alignment 64/);
  assert.equal(parseGGUF(withAlign(64, 64), 'ok').tensors.get('w')!.data.byteLength, 32);
  const overlap = new Raw().header(2, 0).tensor('a', [16], 0, 0).tensor('b', [16], 0, 32).padTo(32).zeros(128).bytes();
  formatError(overlap, /tensors "a" \(bytes 0\.\.64\) and "b" \(bytes 32\.\.96\) overlap in the data section/);
  const same = new Raw().header(2, 0).tensor('a', [8], 0, 32).tensor('b', [8], 0, 32).padTo(32).zeros(128).bytes();
  formatError(same, /tensors "a" .* and "b" .* overlap/);
  // The header ends and the file stops before the aligned data section.
  formatError(new Raw().header(1, 0).tensor('w', [0], 0, 0).bytes(), /before the data section, which starts at 64/);
  // Zero-size dimensions are valid in llama.cpp (gguf.cpp: "a zero-element tensor is trivially representable").
  const empty = parseGGUF(new Raw().header(2, 0).tensor('e', [0, 4], 0, 0).tensor('x', [8], 0, 0).padTo(32).zeros(32).bytes(), 'e');
  assert.deepEqual(empty.tensors.get('e')!.shape, [4, 0]);
  assert.equal(empty.tensors.get('e')!.data.byteLength, 0);
  assert.equal(empty.tensors.get('x')!.data.byteLength, 32);
});

/** The last byte any tensor needs: cutting anywhere before it must fail. */
function dataEnd(f: GGUFFile): number {
  return Math.max(f.dataOffset, ...f.tensorInfos.map((t) => f.dataOffset + t.offset + t.byteLength));
}

const TRUNCATED = /file ends|runs past the end|claims \d+|only \d+ bytes|before the data section|cannot fit/;

test('truncation: micro-f32 cut at every byte of the header and at every tensor boundary', HANG_GUARD, () => {
  const bytes = new Uint8Array(fs.readFileSync(fixture('micro-f32.gguf')));
  const full = parseGGUF(bytes, 'micro-f32.gguf');
  const end = dataEnd(full);
  const cuts = new Set<number>();
  for (let i = 0; i < full.dataOffset + 8; i++) cuts.add(i); // magic, counts, every kv, tensor infos, padding
  for (const t of full.tensorInfos) {
    const s = full.dataOffset + t.offset;
    for (const c of [s, s + 1, s + (t.byteLength >> 1), s + t.byteLength - 1]) cuts.add(c);
  }
  let n = 0;
  for (const cut of cuts) {
    if (cut >= end) continue;
    formatError(bytes.subarray(0, cut), TRUNCATED, 'micro-f32.gguf');
    n++;
  }
  assert.ok(n > full.dataOffset, `${n} cuts`);
});

test('truncation: a file with every value type, cut at every byte', HANG_GUARD, () => {
  const w = new GGUFWriter();
  for (const [k, v] of ALL_VALUES) w.set(k, v);
  const r = rng(3);
  w.addTensor('a', randomTensor(r, 'q8_0', [2, 32]));
  w.addTensor('b', randomTensor(r, 'f16', [3]));
  const bytes = w.toBytes();
  const end = dataEnd(parseGGUF(bytes, 'all.gguf'));
  for (let cut = 0; cut < end; cut++) formatError(bytes.subarray(0, cut), TRUNCATED, 'all.gguf');
});

// A fuzz target: mutations of a valid file. Whatever comes out, the parser either succeeds with a consistent
// result or throws a FormatError.
function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.byteLength;
  }
  return out;
}

function mutate(src: Uint8Array, r: () => number, hot: number): Uint8Array {
  let b: Uint8Array = src.slice();
  const pos = (): number => Math.floor((r() < 0.9 ? Math.min(hot, b.length) : b.length) * r());
  const interesting = [0n, 1n, 2n, 3n, 4n, 5n, 16n, 31n, 32n, 33n, 64n, 255n, 2n ** 31n, 2n ** 32n - 1n, 2n ** 32n, 2n ** 53n,
    2n ** 63n, 2n ** 64n - 1n, 2n ** 64n - 2n, 2n ** 40n];
  const rounds = 1 + Math.floor(r() * 3);
  for (let k = 0; k < rounds && b.length > 0; k++) {
    const op = Math.floor(r() * 7);
    const p = pos();
    if (op === 0) b[p] = Math.floor(r() * 256);
    else if (op === 1) b[p] ^= 1 << Math.floor(r() * 8);
    else if (op === 2 || op === 3) {
      // An interesting 32- or 64-bit little-endian value over whatever was there.
      const width = op === 2 ? 4 : 8;
      let v = interesting[Math.floor(r() * interesting.length)];
      for (let i = 0; i < width && p + i < b.length; i++, v >>= 8n) b[p + i] = Number(v & 0xffn);
    } else if (op === 4) b = b.slice(0, p);
    else if (op === 5) {
      const n = 1 + Math.floor(r() * 16);
      b = concat(b.subarray(0, p), b.subarray(p + n)); // delete n bytes
    } else {
      const n = 1 + Math.floor(r() * 16);
      b = concat(b.subarray(0, p + n), b.subarray(p, p + n), b.subarray(p + n)); // duplicate n bytes
    }
  }
  return b;
}

function fuzz(src: Uint8Array, hot: number, seed: number, iterations: number): { ok: number; failed: number } {
  const r = rng(seed);
  let ok = 0;
  let failed = 0;
  for (let i = 0; i < iterations; i++) {
    const b = mutate(src, r, hot);
    let f: GGUFFile;
    try {
      f = parseGGUF(b, 'fuzz.gguf');
    } catch (e) {
      if (!(e instanceof FormatError)) assert.fail(`seed ${seed} iteration ${i}: ${String((e as Error)?.stack ?? e)}`);
      failed++;
      continue;
    }
    ok++;
    for (const [name, t] of f.tensors) {
      assert.ok(t.shape.length <= 4, name);
      assert.equal(t.data.byteLength, tensorByteSize(t.dtype, t.shape), name);
      assert.equal(t.data.buffer, b.buffer, name);
      assert.ok(t.data.byteOffset + t.data.byteLength <= b.byteOffset + b.byteLength, name);
    }
  }
  return { ok, failed };
}

test('fuzz: 1500 seeded mutations of a file with every value type', HANG_GUARD, () => {
  const w = new GGUFWriter();
  for (const [k, v] of ALL_VALUES) w.set(k, v);
  const r = rng(11);
  w.addTensor('a', randomTensor(r, 'q4_0', [2, 32]));
  w.addTensor('b', randomTensor(r, 'f32', [3, 2]));
  w.addTensor('c', randomTensor(r, 'q6_k', [256]));
  const bytes = w.toBytes();
  const { ok, failed } = fuzz(bytes, parseGGUF(bytes, 'x').dataOffset, 1, 1500);
  // Both outcomes happen, or the fuzzing is not reaching the parser's checks.
  assert.ok(ok > 0 && failed > 0, `ok ${ok}, failed ${failed}`);
});

test('fuzz: 1000 seeded mutations of micro-q4_0, mostly in its header', HANG_GUARD, () => {
  const bytes = new Uint8Array(fs.readFileSync(fixture('micro-q4_0.gguf')));
  const { ok, failed } = fuzz(bytes, parseGGUF(bytes, 'x').dataOffset + 64, 2, 1000);
  assert.ok(ok > 0 && failed > 0, `ok ${ok}, failed ${failed}`);
});
