// safetensors reader/writer: files written by the official safetensors library (its Rust core) read as that library
// reads them and written back byte for byte; the micro reference checkpoint; sharded checkpoints; and hostile files,
// which must give FormatErrors and nothing else.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { assertFormatError } from './helpers/assert-format-error.js';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  SAFETENSORS_INDEX_FILE, parseSafetensors, readCheckpointTensors, readSafetensors, readSafetensorsHeader,
  safetensorsFileSize, writeSafetensors, writeShardedSafetensors,
} from '../src/formats/safetensors.js';
import { FormatError } from '../src/formats/errors.js';
import type { Tensor } from '../src/tensor/tensor.js';

const fixture = (p: string): string => fileURLToPath(new URL(`../../test/fixtures/${p}`, import.meta.url));
const MICRO_HF = fixture('micro/hf/model.safetensors');

function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'moe-st-'));
}

function hex(b: Uint8Array): string {
  return Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('hex');
}

/** Builds a file by hand (not with the writer under test): u64 length, header text, data. */
function rawFile(header: string | object | Uint8Array, data: Uint8Array = new Uint8Array(0), lengthOverride?: bigint): Uint8Array {
  const h = header instanceof Uint8Array ? header : new TextEncoder().encode(typeof header === 'string' ? header : JSON.stringify(header));
  const out = new Uint8Array(8 + h.length + data.length);
  new DataView(out.buffer).setBigUint64(0, lengthOverride ?? BigInt(h.length), true);
  out.set(h, 8);
  out.set(data, 8 + h.length);
  return out;
}


function sameTensors(a: ReadonlyMap<string, Tensor>, b: ReadonlyMap<string, Tensor>): void {
  assert.deepEqual([...a.keys()].sort(), [...b.keys()].sort());
  for (const [name, t] of a) {
    const u = b.get(name)!;
    assert.equal(u.dtype, t.dtype, name);
    assert.deepEqual([...u.shape], [...t.shape], name);
    assert.ok(Buffer.from(u.data).equals(Buffer.from(t.data)), `${name}: bytes differ`);
  }
}

interface Expected { name: string; dtype: string; shape: number[]; hex: string }
const official = JSON.parse(fs.readFileSync(fixture('safetensors/official-expected.json'), 'utf8')) as Record<string, Expected[]>;
const ST_NAME: Record<string, string> = { F32: 'f32', F16: 'f16', BF16: 'bf16' };

test('reads files written by the official library as it reads them, zero-copy', () => {
  for (const [file, expected] of Object.entries(official)) {
    const bytes = new Uint8Array(fs.readFileSync(fixture(`safetensors/${file}`)));
    const parsed = parseSafetensors(bytes, file);
    assert.equal(parsed.tensors.size, expected.length, file);
    for (const e of expected) {
      const t = parsed.tensors.get(e.name);
      assert.ok(t, `${file}: ${e.name} missing`);
      assert.equal(t.dtype, ST_NAME[e.dtype]);
      assert.deepEqual([...t.shape], e.shape);
      assert.equal(hex(t.data), e.hex, `${file}: ${e.name}`);
      assert.equal(t.data.buffer, bytes.buffer, 'tensor data must view the file bytes');
    }
    // readSafetensors agrees with parseSafetensors.
    sameTensors(readSafetensors(fixture(`safetensors/${file}`)).tensors, parsed.tensors);
  }
  assert.deepEqual(parseSafetensors(new Uint8Array(fs.readFileSync(fixture('safetensors/official-mixed.safetensors'))), 'x').metadata, { format: 'pt' });
  assert.deepEqual(readSafetensors(fixture('safetensors/official-nometa.safetensors')).metadata, {});
});

test('the writer reproduces the official library byte for byte', () => {
  const dir = tmpDir();
  try {
    for (const [file, meta] of [['official-mixed.safetensors', { format: 'pt' }], ['official-nometa.safetensors', undefined]] as const) {
      const original = fs.readFileSync(fixture(`safetensors/${file}`));
      const { tensors } = parseSafetensors(new Uint8Array(original), file);
      // Reversed order in: the writer orders as the Rust library does, not as given.
      const out = path.join(dir, file);
      writeSafetensors(out, [...tensors].reverse(), meta);
      assert.ok(fs.readFileSync(out).equals(original), `${file}: bytes differ`);
      assert.equal(safetensorsFileSize(tensors, meta), original.length);
    }
    assert.deepEqual(fs.readdirSync(dir).sort(), ['official-mixed.safetensors', 'official-nometa.safetensors'], 'no temporary files left');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('unsupported dtypes are refused naming the tensor and dtype', () => {
  assertFormatError(() => readSafetensors(fixture('safetensors/official-i64.safetensors')), '"ids"', 'I64', 'official-i64.safetensors');
  assertFormatError(() => parseSafetensors(rawFile({ t: { dtype: 'F128', shape: [1], data_offsets: [0, 16] } }, new Uint8Array(16)), 'f'), '"t"', 'F128');
});

test('the micro reference checkpoint reads and round-trips', () => {
  const { tensors, metadata } = readSafetensors(MICRO_HF);
  // Independent view of the same header: Python-free, straight JSON.
  const bytes = fs.readFileSync(MICRO_HF);
  const n = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + n).toString('utf8')) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  const { __metadata__: meta, ...entries } = header;
  assert.deepEqual(metadata, meta);
  assert.deepEqual([...tensors.keys()], Object.keys(entries));
  for (const [name, e] of Object.entries(entries)) {
    const t = tensors.get(name)!;
    assert.deepEqual([...t.shape], e.shape);
    assert.ok(Buffer.from(t.data).equals(bytes.subarray(8 + n + e.data_offsets[0], 8 + n + e.data_offsets[1])), name);
  }
  const header2 = readSafetensorsHeader(MICRO_HF);
  assert.equal(header2.entries.length, tensors.size);
  assert.equal(header2.dataOffset, 8 + n);

  const dir = tmpDir();
  try {
    const out = path.join(dir, 'copy.safetensors');
    writeSafetensors(out, tensors, metadata);
    const back = readSafetensors(out);
    sameTensors(back.tensors, tensors);
    assert.deepEqual(back.metadata, metadata);
    const written = fs.readFileSync(out);
    const hn = Number(written.readBigUInt64LE(0));
    assert.equal(hn % 8, 0, 'header padded to a multiple of 8');
    assert.match(written.subarray(8, 8 + hn).toString('latin1'), /} *$/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('sharded write and read equal the single file', () => {
  const { tensors } = readSafetensors(MICRO_HF);
  const total = [...tensors.values()].reduce((s, t) => s + t.data.length, 0);
  const dir = tmpDir();
  try {
    const max = 300_000;
    const files = writeShardedSafetensors(dir, tensors, max);
    const index = JSON.parse(fs.readFileSync(path.join(dir, SAFETENSORS_INDEX_FILE), 'utf8')) as { metadata: { total_size: number }; weight_map: Record<string, string> };
    const shards = files.filter((f) => f.endsWith('.safetensors')).map((f) => path.basename(f));
    const nShards = shards.length;
    assert.ok(nShards > 2, `expected several shards, got ${nShards}`);
    shards.forEach((s, i) => assert.equal(s, `model-${String(i + 1).padStart(5, '0')}-of-${String(nShards).padStart(5, '0')}.safetensors`));
    assert.equal(index.metadata.total_size, total);
    assert.deepEqual(Object.keys(index.weight_map), [...tensors.keys()].sort());
    assert.deepEqual(new Set(Object.values(index.weight_map)), new Set(shards));
    for (const s of shards) {
      const shard = readSafetensors(path.join(dir, s));
      const bytes = [...shard.tensors.values()].reduce((a, t) => a + t.data.length, 0);
      assert.ok(bytes <= max || shard.tensors.size === 1, `${s} holds ${bytes} bytes`);
      for (const name of shard.tensors.keys()) assert.equal(index.weight_map[name], s);
      assert.deepEqual(shard.metadata, { format: 'pt' });
    }
    const back = readCheckpointTensors(dir);
    sameTensors(back.tensors, tensors);
    assert.equal(back.files.length, nShards);

    // Saving again into the same folder as one file removes the shards and the index.
    writeShardedSafetensors(dir, tensors, 10 * total);
    assert.deepEqual(fs.readdirSync(dir), ['model.safetensors']);
    sameTensors(readCheckpointTensors(dir).tensors, tensors);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('broken sharded checkpoints give FormatErrors naming file and tensor', () => {
  const { tensors } = readSafetensors(MICRO_HF);
  const dir = tmpDir();
  const indexPath = path.join(dir, SAFETENSORS_INDEX_FILE);
  const fresh = () => {
    writeShardedSafetensors(dir, tensors, 300_000);
    return JSON.parse(fs.readFileSync(indexPath, 'utf8')) as { weight_map: Record<string, string> };
  };
  const writeIndex = (idx: unknown) => fs.writeFileSync(indexPath, typeof idx === 'string' ? idx : JSON.stringify(idx));
  try {
    assertFormatError(() => readCheckpointTensors(dir), 'model.safetensors');

    // A shard named in the index is missing.
    let idx = fresh();
    const shard2 = [...new Set(Object.values(idx.weight_map))][1];
    fs.rmSync(path.join(dir, shard2));
    assertFormatError(() => readCheckpointTensors(dir), SAFETENSORS_INDEX_FILE, shard2, 'missing');

    // A tensor listed for a shard is not in it.
    idx = fresh();
    const name = 'model.layers.1.self_attn.q_proj.weight';
    const wrongShard = Object.values(idx.weight_map).find((s) => s !== idx.weight_map[name])!;
    writeIndex({ ...idx, weight_map: { ...idx.weight_map, [name]: wrongShard } });
    assertFormatError(() => readCheckpointTensors(dir), wrongShard, name);

    // A name in the index without a shard file of that name.
    idx = fresh();
    writeIndex({ ...idx, weight_map: { ...idx.weight_map, extra: 'model-00099-of-00099.safetensors' } });
    assertFormatError(() => readCheckpointTensors(dir), 'model-00099-of-00099.safetensors', '"extra"');

    // The same tensor in two shards.
    idx = fresh();
    const [s1, s2] = [...new Set(Object.values(idx.weight_map))];
    const a = readSafetensors(path.join(dir, s1));
    const b = readSafetensors(path.join(dir, s2));
    const dup = [...a.tensors.keys()][0];
    writeSafetensors(path.join(dir, s2), [...b.tensors, [dup, a.tensors.get(dup)!] as const], b.metadata);
    assertFormatError(() => readCheckpointTensors(dir), dup, 'also in shard');

    // Hostile or malformed index files.
    fresh();
    writeIndex({ weight_map: { x: '../outside.safetensors' } });
    assertFormatError(() => readCheckpointTensors(dir), 'not a file name');
    writeIndex({ weight_map: { x: 3 } });
    assertFormatError(() => readCheckpointTensors(dir), '"x"');
    writeIndex({ metadata: {} });
    assertFormatError(() => readCheckpointTensors(dir), 'weight_map');
    writeIndex('{"weight_map": {');
    assertFormatError(() => readCheckpointTensors(dir), SAFETENSORS_INDEX_FILE, 'JSON');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('truncated files give FormatErrors at every cut point', () => {
  const small = new Uint8Array(fs.readFileSync(fixture('safetensors/official-mixed.safetensors')));
  for (let cut = 0; cut < small.length; cut++) assertFormatError(() => parseSafetensors(small.subarray(0, cut), 'cut'), 'cut');
  const big = new Uint8Array(fs.readFileSync(MICRO_HF));
  const n = Number(new DataView(big.buffer, big.byteOffset).getBigUint64(0, true));
  const cuts = new Set<number>([0, 1, 7, 8, 9, 8 + n - 1, 8 + n, 8 + n + 1, big.length - 1]);
  for (let i = 0; i < 150; i++) cuts.add(Math.floor((i / 150) * big.length));
  for (const cut of cuts) assertFormatError(() => parseSafetensors(big.subarray(0, cut), 'micro'));
  // The same through the file reader.
  const dir = tmpDir();
  try {
    const p = path.join(dir, 'cut.safetensors');
    for (const cut of [3, 8 + 100, 8 + n + 1000]) {
      fs.writeFileSync(p, big.subarray(0, cut));
      assertFormatError(() => readSafetensors(p), p);
      assertFormatError(() => readSafetensorsHeader(p), p);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('giant header lengths are refused before anything is allocated', () => {
  const dir = tmpDir();
  try {
    const p = path.join(dir, 'giant.safetensors');
    for (const len of [2n ** 64n - 1n, 2n ** 53n, 2n ** 40n, 100_000_001n, 1000n]) {
      const bytes = rawFile('{}', new Uint8Array(16), len);
      assertFormatError(() => parseSafetensors(bytes, 'giant'), 'header length');
      fs.writeFileSync(p, bytes);
      assertFormatError(() => readSafetensors(p), 'header length');
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('malformed headers give FormatErrors naming the tensor', () => {
  const data = new Uint8Array(64);
  const t = (entry: object, extra: object = {}) => rawFile({ ...extra, w: entry }, data);
  const ok = { dtype: 'F32', shape: [2, 2], data_offsets: [0, 16] };
  assert.equal(parseSafetensors(t(ok), 'f').tensors.size, 1);
  const cases: [Uint8Array, ...string[]][] = [
    [rawFile('{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]', data), 'JSON'],
    [rawFile('[1, 2]', data), '{'],
    [rawFile(' {}', data), '{'],
    [rawFile('null', data), '{'],
    [rawFile(new Uint8Array([0x7b, 0x22, 0xff, 0xfe, 0x22, 0x3a, 0x31, 0x7d]), data), 'UTF-8'],
    [t({ ...ok, data_offsets: [16, 0] }), '"w"', 'end before'],
    [t({ ...ok, data_offsets: [0, 65] }), '"w"', 'past the end'],
    [t({ ...ok, data_offsets: [60, 76] }), '"w"', 'past the end'],
    [t({ ...ok, data_offsets: [0, 12] }), '"w"', 'needs 16'],
    [t({ ...ok, data_offsets: [0] }), '"w"', 'data_offsets'],
    [t({ ...ok, data_offsets: [-16, 0] }), '"w"', 'data_offsets'],
    [t({ ...ok, data_offsets: [0, 16.5] }), '"w"', 'data_offsets'],
    [t({ ...ok, data_offsets: '0,16' }), '"w"', 'data_offsets'],
    [t({ ...ok, shape: [-2, -2] }), '"w"', 'shape'],
    [t({ ...ok, shape: [2.5, 2] }), '"w"', 'shape'],
    [t({ ...ok, shape: '2x2' }), '"w"', 'shape'],
    [t({ ...ok, shape: [2 ** 40, 2 ** 40] }), '"w"', 'too many elements'],
    [t({ ...ok, dtype: 7 }), '"w"', 'dtype'],
    [t({ shape: [2, 2], data_offsets: [0, 16] }), '"w"', 'dtype'],
    [t('just a string' as unknown as object), '"w"', 'not an object'],
    [t(ok, { v: { dtype: 'F32', shape: [2, 2], data_offsets: [8, 24] } }), 'overlaps', '"v"', '"w"'],
    [t(ok, { __metadata__: { format: 1 } }), '__metadata__', 'format'],
    [t(ok, { __metadata__: ['pt'] }), '__metadata__'],
  ];
  for (const [bytes, ...mentions] of cases) assertFormatError(() => parseSafetensors(bytes, 'bad.safetensors'), 'bad.safetensors', ...mentions);
  // An empty tensor shares no bytes; tensors may leave gaps.
  const fine = parseSafetensors(t(ok, { e: { dtype: 'F16', shape: [0, 3], data_offsets: [8, 8] }, g: { dtype: 'BF16', shape: [4], data_offsets: [32, 40] } }), 'f');
  assert.equal(fine.tensors.size, 3);
  assert.equal(fine.tensors.get('e')!.data.length, 0);
});

test('random header corruption gives FormatErrors only', () => {
  const original = new Uint8Array(fs.readFileSync(fixture('safetensors/official-mixed.safetensors')));
  const n = Number(new DataView(original.buffer, original.byteOffset).getBigUint64(0, true));
  let s = 12345;
  const next = () => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 2 ** 32);
  let parsed = 0;
  for (let i = 0; i < 2000; i++) {
    const bytes = original.slice();
    const flips = 1 + Math.floor(next() * 4);
    for (let j = 0; j < flips; j++) {
      const at = Math.floor(next() * (8 + n));
      // Mostly JSON-ish characters, so the corruption gets past the parser often.
      bytes[at] = next() < 0.7 ? '0123456789[]{}",:-.e '.charCodeAt(Math.floor(next() * 21)) : Math.floor(next() * 256);
    }
    try {
      parseSafetensors(bytes, 'fuzz');
      parsed++;
    } catch (e) {
      assert.ok(e instanceof FormatError, `iteration ${i}: ${String(e)}`);
    }
  }
  assert.ok(parsed < 2000, 'corruption must be caught at least sometimes');
});

test('the writer refuses what safetensors cannot hold', () => {
  const dir = tmpDir();
  try {
    const p = path.join(dir, 'w.safetensors');
    const f32 = { dtype: 'f32' as const, shape: [2], data: new Uint8Array(8) };
    assertFormatError(() => writeSafetensors(p, [['q', { dtype: 'q8_0', shape: [1, 32], data: new Uint8Array(34) }]]), '"q"', 'q8_0');
    assertFormatError(() => writeSafetensors(p, [['short', { dtype: 'f32', shape: [3], data: new Uint8Array(8) }]]), '"short"', 'needs 12');
    assertFormatError(() => writeSafetensors(p, [['a', f32], ['a', f32]]), '"a"', 'twice');
    assertFormatError(() => writeSafetensors(p, [['__metadata__', f32]]), '__metadata__');
    assert.equal(fs.existsSync(p), false);
    assert.deepEqual(fs.readdirSync(dir), []);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
