// GGUF reader/writer: the micro reference files against what llama.cpp's own Python reader (gguf-py) sees in them,
// byte-exact round trips, every value type, and the writer's checks.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { constants as bufferConstants } from 'node:buffer';
import { fileURLToPath } from 'node:url';
import {
  GGUFWriter, getArray, getBool, getNumber, getString, getStringArray, parseGGUF, readGGUF,
  type GGUFArray, type GGUFFile, type GGUFValue,
} from '../src/formats/gguf.js';
import { FormatError } from '../src/formats/errors.js';
import { nativeAddon } from '../src/backend/native-addon.js';
import { dtypeFromGgml, dtypeInfo, type DType } from '../src/tensor/dtype.js';
import { tensorByteSize, type Tensor } from '../src/tensor/tensor.js';
import { floatToHalf } from '../src/tensor/f16.js';
import { ALL_VALUES, rng, randomTensor } from './gguf-helpers.js';

const fixture = (name: string): string => fileURLToPath(new URL(`../../test/fixtures/micro/${name}`, import.meta.url));
const MICRO = ['micro-f32', 'micro-f16', 'micro-q8_0', 'micro-q4_0'] as const;

interface PyMeta { key: string; types: string[]; value: unknown }
interface PyTensor { name: string; ggml_type: number; ne: number[]; data_offset: number; n_bytes: number }
interface PyFile { version: number; data_offset: number; metadata: PyMeta[]; tensors: PyTensor[] }
const gguFPy = JSON.parse(fs.readFileSync(fixture('gguf-py-reference.json'), 'utf8')) as Record<string, PyFile>;

function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'moe-gguf-'));
}

/** A value as plain JSON-like data, in the form gguf-py-dump.py writes (64-bit integers as strings). */
function plain(v: GGUFValue | GGUFArray): unknown {
  if ('itemType' in v) {
    return Array.from(v.items as ArrayLike<unknown>, (x) =>
      typeof x === 'bigint' ? String(x) : typeof x === 'object' ? plain(x as GGUFArray) : x);
  }
  if (v.type === 'array') return plain(v.value);
  return typeof v.value === 'bigint' ? String(v.value) : v.value;
}

function typesOf(v: GGUFValue): string[] {
  return v.type === 'array' ? ['array', v.value.itemType] : [v.type];
}

for (const name of MICRO) {
  test(`${name}: metadata and tensor infos match gguf-py's reading`, () => {
    const bytes = fs.readFileSync(fixture(`${name}.gguf`));
    const f = parseGGUF(bytes, name);
    const ref = gguFPy[name];
    assert.equal(f.version, ref.version);
    assert.equal(f.dataOffset, ref.data_offset);
    assert.equal(f.alignment, 32);
    assert.deepEqual([...f.metadata.keys()], ref.metadata.map((m) => m.key));
    for (const m of ref.metadata) {
      const v = f.metadata.get(m.key)!;
      assert.deepEqual(typesOf(v), m.types, m.key);
      assert.deepEqual(plain(v), m.value, m.key);
    }
    assert.deepEqual([...f.tensors.keys()], ref.tensors.map((t) => t.name));
    for (const [i, rt] of ref.tensors.entries()) {
      const t = f.tensors.get(rt.name)!;
      const info = f.tensorInfos[i];
      assert.equal(info.name, rt.name);
      assert.equal(t.dtype, dtypeFromGgml(rt.ggml_type)?.name, rt.name);
      assert.deepEqual(t.shape, [...rt.ne].reverse(), rt.name);
      assert.deepEqual(info.shape, t.shape);
      assert.equal(f.dataOffset + info.offset, rt.data_offset, rt.name);
      assert.equal(info.byteLength, rt.n_bytes, rt.name);
      assert.equal(t.data.byteLength, rt.n_bytes, rt.name);
      assert.equal(tensorByteSize(t.dtype, t.shape), rt.n_bytes, rt.name);
      // Zero copy: the tensor views the very bytes that were parsed.
      assert.equal(t.data.buffer, bytes.buffer, rt.name);
      assert.equal(t.data.byteOffset - bytes.byteOffset, rt.data_offset, rt.name);
    }
  });
}

test('micro: the values a Mixtral loader needs, through the typed getters', () => {
  const q8 = readGGUF(fixture('micro-q8_0.gguf'));
  assert.equal(getString(q8, 'general.architecture'), 'llama');
  assert.equal(getNumber(q8, 'llama.expert_count'), 8);
  assert.equal(getNumber(q8, 'llama.expert_used_count'), 2);
  assert.equal(getNumber(q8, 'llama.block_count'), 2);
  assert.equal(getNumber(q8, 'llama.attention.layer_norm_rms_epsilon'), Math.fround(1e-5));
  assert.equal(getBool(q8, 'tokenizer.ggml.add_bos_token'), true);
  const vocab = getNumber(q8, 'llama.vocab_size');
  const tokens = getStringArray(q8, 'tokenizer.ggml.tokens');
  assert.equal(tokens.length, vocab);
  assert.deepEqual(tokens.slice(0, 4), ['<unk>', '<s>', '</s>', '<0x00>']);
  const scores = getArray(q8, 'tokenizer.ggml.scores', { itemType: 'float32' });
  assert.ok(scores.items instanceof Float32Array);
  assert.equal(scores.items.length, vocab);
  const types = getArray(q8, 'tokenizer.ggml.token_type', { itemType: 'int32' });
  assert.ok(types.items instanceof Int32Array);
  assert.equal(types.items[1], 3); // <s> is a control token
  // The stacked expert tensors: [E, ffn, dim] row-major; q8_0 weights, f32 router.
  const gate = q8.tensors.get('blk.0.ffn_gate_exps.weight')!;
  assert.deepEqual(gate.shape, [8, 128, 64]);
  assert.equal(gate.dtype, 'q8_0');
  assert.deepEqual(q8.tensors.get('blk.1.ffn_down_exps.weight')!.shape, [8, 64, 128]);
  assert.deepEqual(q8.tensors.get('blk.0.ffn_gate_inp.weight')!.shape, [8, 64]);
  assert.equal(q8.tensors.get('blk.0.ffn_gate_inp.weight')!.dtype, 'f32');
  assert.deepEqual(q8.tensors.get('blk.0.attn_k.weight')!.shape, [32, 64]);
});

test("micro: the f16 file holds the f32 file's weights rounded to f16 (data placement, checked by value)", () => {
  const f32 = readGGUF(fixture('micro-f32.gguf'));
  const f16 = readGGUF(fixture('micro-f16.gguf'));
  let checked = 0;
  for (const [name, a] of f32.tensors) {
    const b = f16.tensors.get(name)!;
    assert.deepEqual(b.shape, a.shape, name);
    if (b.dtype !== 'f16') continue;
    const av = new DataView(a.data.buffer, a.data.byteOffset, a.data.byteLength);
    const bv = new DataView(b.data.buffer, b.data.byteOffset, b.data.byteLength);
    for (let i = 0; i < b.data.byteLength / 2; i++) {
      assert.equal(bv.getUint16(2 * i, true), floatToHalf(av.getFloat32(4 * i, true)), `${name}[${i}]`);
    }
    checked++;
  }
  assert.ok(checked >= 10, `${checked} f16 tensors`);
});

test('round trip: every micro file written back is byte-identical to the original', () => {
  // llama.cpp's and gguf-py's writers lay files out as GGUFWriter does (metadata and tensors in order, n_dims as
  // given, each tensor padded to the alignment, trailing padding included), so the bytes must match exactly.
  const dir = tmpDir();
  try {
    for (const name of MICRO) {
      const orig = fs.readFileSync(fixture(`${name}.gguf`));
      const w = GGUFWriter.fromFile(parseGGUF(orig, name));
      assert.ok(Buffer.from(w.toBytes()).equals(orig), `${name} toBytes`);
      const out = path.join(dir, `${name}.gguf`);
      w.write(out);
      assert.ok(fs.readFileSync(out).equals(orig), `${name} write`);
      assert.deepEqual(fs.readdirSync(dir).filter((f) => f.includes('partial')), []);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('round trip: parse -> write -> parse keeps metadata (with types) and tensor bytes', () => {
  const a = readGGUF(fixture('micro-q4_0.gguf'));
  const w = GGUFWriter.fromFile(a);
  w.setUint32('general.alignment', 64); // a different layout than the original
  const b = parseGGUF(w.toBytes(), 'rewritten');
  assert.equal(b.alignment, 64);
  assert.equal(b.dataOffset % 64, 0);
  const aMeta = [...a.metadata];
  const bMeta = [...b.metadata];
  assert.deepEqual(bMeta.slice(0, aMeta.length), aMeta);
  assert.deepEqual(bMeta.slice(aMeta.length), [['general.alignment', { type: 'uint32', value: 64 }]]);
  assert.deepEqual([...b.tensors.keys()], [...a.tensors.keys()]);
  for (const [name, t] of a.tensors) {
    const u = b.tensors.get(name)!;
    assert.equal(u.dtype, t.dtype);
    assert.deepEqual(u.shape, t.shape);
    assert.ok(Buffer.from(u.data).equals(Buffer.from(t.data)), name);
  }
  for (const info of b.tensorInfos) assert.equal(info.offset % 64, 0, info.name);
});

test('round trip: every value type, nested arrays, 64-bit extremes, NaN, unicode', () => {
  const w = new GGUFWriter();
  for (const [k, v] of ALL_VALUES) w.set(k, v);
  const f = parseGGUF(w.toBytes(), 'values');
  assert.deepEqual([...f.metadata], ALL_VALUES);
  // Writing what was read reproduces the bytes.
  assert.ok(Buffer.from(GGUFWriter.fromFile(f).toBytes()).equals(Buffer.from(w.toBytes())));
  // Setting an existing key replaces the value in place.
  w.setUint32('t.uint8', 7);
  const g = parseGGUF(w.toBytes(), 'values');
  assert.deepEqual([...g.metadata.keys()], ALL_VALUES.map(([k]) => k));
  assert.deepEqual(g.metadata.get('t.uint8'), { type: 'uint32', value: 7 });
});

test('round trip: tensors of every supported layout, alignment 32 and 64, write() equals toBytes()', () => {
  const r = rng(7);
  const tensors: [string, Tensor][] = [
    ['scalar', randomTensor(r, 'f32', [])],
    ['vec', randomTensor(r, 'f32', [5])],
    ['half', randomTensor(r, 'f16', [3, 7])],
    ['brain', randomTensor(r, 'bf16', [2, 3, 5])],
    ['q8', randomTensor(r, 'q8_0', [3, 64])],
    ['q4', randomTensor(r, 'q4_0', [2, 1, 2, 32])],
    ['q4k', randomTensor(r, 'q4_k', [2, 256])],
    ['q6k', randomTensor(r, 'q6_k', [1, 512])],
    ['empty', randomTensor(r, 'q4_0', [0, 32])],
    ['after-empty', randomTensor(r, 'f32', [1])],
  ];
  const dir = tmpDir();
  try {
    for (const alignment of [32, 64]) {
      const w = new GGUFWriter();
      w.setString('general.architecture', 'test');
      if (alignment !== 32) w.setUint32('general.alignment', alignment);
      for (const [n, t] of tensors) w.addTensor(n, t);
      const bytes = w.toBytes();
      const out = path.join(dir, `a${alignment}.gguf`);
      w.write(out);
      assert.ok(fs.readFileSync(out).equals(Buffer.from(bytes)));
      const f = readGGUF(out);
      assert.equal(f.alignment, alignment);
      assert.equal(f.dataOffset % alignment, 0);
      assert.equal(bytes.byteLength % alignment, 0); // trailing padding, as llama.cpp writes
      assert.deepEqual([...f.tensors.keys()], tensors.map(([n]) => n));
      let expectedOffset = 0;
      for (const [i, [n, t]] of tensors.entries()) {
        const u = f.tensors.get(n)!;
        assert.equal(u.dtype, t.dtype, n);
        assert.deepEqual(u.shape, t.shape, n);
        assert.ok(Buffer.from(u.data).equals(Buffer.from(t.data)), n);
        // Packed in order, each padded to the alignment: the layout llama.cpp requires (gguf.cpp checks it).
        assert.equal(f.tensorInfos[i].offset, expectedOffset, n);
        expectedOffset += Math.ceil(t.data.byteLength / alignment) * alignment;
      }
      // The on-disk ne[] is innermost first and n_dims is the shape's length.
      const q4 = f.tensorInfos.find((t) => t.name === 'q4')!;
      assert.deepEqual(q4.shape, [2, 1, 2, 32]);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a GGUF v2 file (same layout) is read; version 1 is refused clearly', () => {
  const w = new GGUFWriter();
  for (const [k, v] of ALL_VALUES) w.set(k, v);
  w.addTensor('x', randomTensor(rng(1), 'f32', [4]));
  const bytes = w.toBytes().slice();
  new DataView(bytes.buffer).setUint32(4, 2, true);
  const f = parseGGUF(bytes, 'v2.gguf');
  assert.equal(f.version, 2);
  assert.deepEqual([...f.metadata], ALL_VALUES);
  new DataView(bytes.buffer).setUint32(4, 1, true);
  assert.throws(() => parseGGUF(bytes, 'v1.gguf'), (e: unknown) => e instanceof FormatError && /v1\.gguf: GGUF version 1 is not supported/.test(e.message));
});

test('typed getters: missing keys, wrong types and unsafe 64-bit values name the key and the expected type', () => {
  const w = new GGUFWriter();
  for (const [k, v] of ALL_VALUES) w.set(k, v);
  w.setUint64('t.u64.small', 12345);
  const f: GGUFFile = parseGGUF(w.toBytes(), 'model.gguf');
  const fails = (fn: () => unknown, re: RegExp): void => {
    assert.throws(fn, (e: unknown) => e instanceof FormatError && e.file === 'model.gguf' && re.test(e.message));
  };
  fails(() => getNumber(f, 'llama.block_count'), /model\.gguf: metadata key "llama\.block_count" is missing \(expected a number/);
  fails(() => getNumber(f, 'general.architecture'), /"general\.architecture" must be a number .* but is string/);
  fails(() => getString(f, 't.uint32'), /"t\.uint32" must be a string but is uint32/);
  fails(() => getBool(f, 't.string'), /"t\.string" must be a bool but is string/);
  fails(() => getArray(f, 't.int8'), /"t\.int8" must be an array but is int8/);
  fails(() => getArray(f, 'a.string', { itemType: 'float32' }), /"a\.string" must be an array of float32 but is an array of string/);
  fails(() => getStringArray(f, 'a.int32'), /must be an array of string but is an array of int32/);
  fails(() => getNumber(f, 't.uint64'), /"t\.uint64" is 18446744073709551615, too large for a JS number/);
  assert.equal(getNumber(f, 'llama.block_count', { required: false }), undefined);
  assert.equal(getString(f, 'nope', { required: false }), undefined);
  assert.equal(getNumber(f, 't.u64.small'), 12345);
  assert.equal(getNumber(f, 't.int16'), -32768);
  assert.equal(getNumber(f, 't.float64'), 1 / 3);
  assert.equal(getString(f, 't.string.bom'), '\ufeffkept');
  assert.deepEqual(getStringArray(f, 'a.string'), ['', 'a', '\u0000x', '\u2581the']);
});

test('writer: invalid values, tensors and alignment are refused where they are added', () => {
  const w = new GGUFWriter();
  assert.throws(() => w.setUint32('k', -1), RangeError);
  assert.throws(() => w.setUint32('k', 1.5), RangeError);
  assert.throws(() => w.set('k', { type: 'int8', value: 128 }), RangeError);
  assert.throws(() => w.set('k', { type: 'uint64', value: -1n }), RangeError);
  assert.throws(() => w.set('k', { type: 'int64', value: 5 as unknown as bigint }), RangeError);
  assert.throws(() => w.setInt32Array('k', [1, 2 ** 31]), RangeError);
  assert.throws(() => w.setArray('k', { itemType: 'float32', items: [1, 2] as unknown as Float32Array }), TypeError);
  assert.throws(() => w.setString('', 'x'), TypeError);
  assert.throws(() => w.set('k', { type: 'toString', value: 1 } as unknown as GGUFValue), /not a GGUFValue/);
  assert.throws(() => w.setUint32('general.alignment', 48), RangeError);
  assert.throws(() => w.setUint32('general.alignment', 0), RangeError);
  assert.throws(() => w.setUint64('general.alignment', 32), RangeError);
  let deep: GGUFArray = { itemType: 'uint8', items: new Uint8Array(1) };
  for (let i = 0; i < 40; i++) deep = { itemType: 'array', items: [deep] };
  assert.throws(() => w.setArray('deep', deep), RangeError);
  assert.equal(w.metadataKeys.length, 0); // nothing half-added
  const f32 = (shape: number[]): Tensor => ({ dtype: 'f32', shape, data: new Uint8Array(tensorByteSize('f32', shape)) });
  w.addTensor('ok', f32([2, 2]));
  assert.throws(() => w.addTensor('ok', f32([2, 2])), /already added/);
  assert.throws(() => w.addTensor('x'.repeat(64), f32([1])), /1\.\.63 bytes/);
  assert.throws(() => w.addTensor('', f32([1])), RangeError);
  assert.throws(() => w.addTensor('5d', f32([1, 1, 1, 1, 1])), /5 dimensions/);
  assert.throws(() => w.addTensor('neg', { dtype: 'f32', shape: [-1, 4], data: new Uint8Array(0) }), /bad dimension -1/);
  assert.throws(() => w.addTensor('short', { dtype: 'f32', shape: [2, 2], data: new Uint8Array(15) }), /15 bytes, but f32 \[2, 2\] needs 16/);
  assert.throws(() => w.addTensor('row', { dtype: 'q8_0', shape: [2, 33], data: new Uint8Array(0) }), /multiple of the q8_0 block size 32/);
  assert.throws(() => w.addTensor('dt', { dtype: 'q3_x' as DType, shape: [1], data: new Uint8Array(1) }), /unknown dtype/);
  const f = parseGGUF(w.toBytes(), 'w');
  assert.deepEqual([...f.tensors.keys()], ['ok']);
  assert.equal(dtypeInfo('f32').ggmlType, 0);
});

test('writer: a file with no tensors and no metadata', () => {
  const bytes = new GGUFWriter().toBytes();
  assert.equal(bytes.byteLength, 32); // 24-byte header padded to the alignment, as llama.cpp writes it
  const f = parseGGUF(bytes, 'empty');
  assert.equal(f.metadata.size, 0);
  assert.equal(f.tensors.size, 0);
  // llama.cpp does not require the padding when there are no tensors.
  assert.equal(parseGGUF(bytes.subarray(0, 24), 'empty').tensors.size, 0);
});

test('readGGUF: an unreadable path and a file above the Buffer limit give FormatErrors naming the file', (t) => {
  const dir = tmpDir();
  try {
    const missing = path.join(dir, 'missing.gguf');
    assert.throws(() => readGGUF(missing), (e: unknown) => e instanceof FormatError && e.file === missing && /cannot read/.test(e.message));
    assert.throws(() => readGGUF(dir), (e: unknown) => e instanceof FormatError && e.file === dir);
    // Node 20's limit is 4 GiB; later Nodes allow 2^53 bytes, which no file here can reach.
    if (bufferConstants.MAX_LENGTH > 2 ** 40) {
      t.skip(`Buffer limit ${bufferConstants.MAX_LENGTH} is beyond any test file`);
      return;
    }
    // A sparse file: no disk space or memory is used, and the size check comes before any read.
    const big = path.join(dir, 'big.gguf');
    fs.writeFileSync(big, '');
    fs.truncateSync(big, bufferConstants.MAX_LENGTH + 1);
    // Without the native addon the file cannot be read into one Buffer; with it the file is mapped (no read) and
    // its zero bytes are not a GGUF header.
    assert.throws(() => readGGUF(big), (e: unknown) => e instanceof FormatError && e.file === big &&
      (nativeAddon() === null ? /more than the \d+ bytes one Buffer can hold/ : /not a GGUF file/).test(e.message));
    assert.throws(() => readGGUF(big, { mmap: false }), (e: unknown) => e instanceof FormatError && e.file === big &&
      /more than the \d+ bytes one Buffer can hold/.test(e.message));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
