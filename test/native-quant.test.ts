// The native quantized kernels (native/src/quant*.c) on every code path this CPU has (generic C, AVX2, AVX-512
// VNNI), compared with the TypeScript oracle (src/tensor/quant.ts: prepareActivation with llama.cpp's x86 rounding,
// then dotRow) *bit for bit*.
//
// Why bit-exact comparison is fair here: the kernels may add block results in any order, so in general they agree
// with dotRow only to float rounding. These cases are built so that no float operation rounds: every weight-block
// scale (d, dmin, m) in a row is +-2^-e for one e, every activation block is zero or holds small integers times 2^-7
// with one element at +-127 * 2^-7 (so its q8_0 / q8_K scale is exactly 2^-7 and its quants are the integers
// themselves), and at most four activation blocks per row are non-zero, which keeps every partial sum an integer
// multiple of 2^-(e+7) below 2^24 of them. The quant bytes themselves (nibbles, high bits, 6-bit sub-scales, q8
// weights including -128) are uniformly random, so every bit of every field is exercised. Any error in the integer
// parts or in the block bookkeeping (wrong element pairing, scale lane, tail block, row offset) changes the result.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as v8 from 'node:v8';
import * as vm from 'node:vm';

import { NativeBackend, nativeBackendAvailable, nativeCompute } from '../src/backend/native.js';
import { nativeAddon } from '../src/backend/native-addon.js';
import { loadModel } from '../src/model/load.js';
import { writeRandomMixtralGGUF } from '../src/workflows/random-model.js';
import { dtypeInfo, type DType } from '../src/tensor/dtype.js';
import { floatToHalf } from '../src/tensor/f16.js';
import { dotRow, prepareActivation } from '../src/tensor/quant.js';
import type { Tensor } from '../src/tensor/tensor.js';

const skip = nativeBackendAvailable() ? false : 'native addon not built';

const TYPES: DType[] = ['q4_0', 'q4_1', 'q5_0', 'q5_1', 'q8_0', 'q2_k', 'q3_k', 'q4_k', 'q5_k', 'q6_k'];

/** Byte offsets of a block's f16 scale fields: [d, min or dmin (-1: none)] (ggml block layouts). */
const SCALES: Record<string, [number, number]> = {
  q4_0: [0, -1], q4_1: [0, 2], q5_0: [0, -1], q5_1: [0, 2], q8_0: [0, -1],
  q2_k: [80, 82], q3_k: [108, -1], q4_k: [0, 2], q5_k: [0, 2], q6_k: [208, -1],
};

function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 4294967296;
  };
}

function putU16(b: Uint8Array, o: number, v: number): void {
  b[o] = v & 0xff;
  b[o + 1] = v >>> 8;
}

/** outDim rows of random block bytes; each row's scales are +-2^-e for one e in 8..10. */
function exactWeights(r: () => number, dtype: DType, outDim: number, inDim: number): Tensor {
  const { blockSize, typeSize } = dtypeInfo(dtype);
  const nb = inDim / blockSize;
  const data = new Uint8Array(outDim * nb * typeSize);
  for (let i = 0; i < data.length; i++) data[i] = Math.floor(r() * 256);
  const [od, om] = SCALES[dtype];
  for (let j = 0; j < outDim; j++) {
    const scale = 2 ** -(8 + Math.floor(r() * 3));
    for (let b = 0; b < nb; b++) {
      const o = (j * nb + b) * typeSize;
      putU16(data, o + od, floatToHalf(r() < 0.5 ? -scale : scale));
      if (om >= 0) putU16(data, o + om, floatToHalf(r() < 0.5 ? -scale : scale));
    }
  }
  return { dtype, shape: [outDim, inDim], data };
}

/**
 * rows activation rows of inDim: zero except four blocks of `group` (the first, the last, two random) holding
 * integers in [-small, small] times 2^-7 with one element at +-127 * 2^-7.
 */
function exactActivations(r: () => number, rows: number, inDim: number, group: number, small: number): Float32Array {
  const x = new Float32Array(rows * inDim);
  const ng = inDim / group;
  for (let row = 0; row < rows; row++) {
    const picks = [0, ng - 1, Math.floor(r() * ng), Math.floor(r() * ng)];
    for (const g of picks) {
      const at = row * inDim + g * group;
      for (let i = 0; i < group; i++) x[at + i] = (Math.floor(r() * (2 * small + 1)) - small) / 128;
      x[at + Math.floor(r() * group)] = (r() < 0.5 ? -127 : 127) / 128;
    }
  }
  return x;
}

/** The kernel sets this CPU can run ('generic' always). */
function kernelSets(): string[] {
  const a = nativeCompute()!;
  const sets = ['generic', 'avx2', 'avx512'].filter((k) => a.setKernels(k));
  a.setKernels('auto');
  return sets;
}

function checkExact(dtype: DType, rows: number, outDim: number, inDim: number, seed: number): void {
  const r = rng(seed);
  const blockSize = dtypeInfo(dtype).blockSize;
  const w = exactWeights(r, dtype, outDim, inDim);
  const x = exactActivations(r, rows, inDim, blockSize === 32 ? 32 : 256, blockSize === 32 ? 127 : 2);
  const { typeSize } = dtypeInfo(dtype);
  const rowBytes = (inDim / blockSize) * typeSize;
  const want = new Float32Array(rows * outDim);
  let nonzero = 0;
  for (let row = 0; row < rows; row++) {
    const act = prepareActivation(dtype, x, row * inDim, inDim, 'x86');
    for (let j = 0; j < outDim; j++) {
      want[row * outDim + j] = dotRow(dtype, w.data, j * rowBytes, act);
      if (want[row * outDim + j] !== 0) nonzero++;
    }
  }
  assert.ok(nonzero > (rows * outDim) / 2, `${dtype}: the reference results are mostly zero (${nonzero})`);
  const a = nativeCompute()!;
  try {
    for (const k of kernelSets()) {
      assert.ok(a.setKernels(k));
      for (const threads of [1, 2]) {
        const be = new NativeBackend({ threads });
        const got = new Float32Array(rows * outDim).fill(NaN);
        be.matmul(got, x, rows, w);
        for (let i = 0; i < got.length; i++) {
          if (!Object.is(got[i], want[i]) && !(got[i] === 0 && want[i] === 0)) {
            assert.fail(`${dtype} ${k} kernels, ${threads} threads, ${rows}x[${outDim}, ${inDim}]: out[${Math.floor(i / outDim)}]` +
              `[${i % outDim}] = ${got[i]}, dotRow gives ${want[i]}`);
          }
        }
      }
    }
  } finally {
    a.setKernels('auto');
  }
}

test('native quantized matmul equals dotRow bit for bit on exactly representable data, every type and code path', { skip }, () => {
  const be = new NativeBackend({ threads: 1 });
  let seed = 1000;
  for (const dtype of TYPES) {
    assert.ok(be.supports(dtype), `${dtype} has no native kernel`);
    const k = dtypeInfo(dtype).blockSize === 256;
    // inner sizes: one block pair / super-block, odd block counts (the AVX-512 path pairs blocks), long rows
    const inDims = k ? [256, 768, 4096] : [32, 224, 288, 4096];
    for (const inDim of inDims) {
      for (const rows of [1, 2, 3, 5, 8]) checkExact(dtype, rows, 13, inDim, seed++);
    }
  }
});

test('native quantized matmul on long rows (14336, Mixtral 8x7B ffn) equals dotRow bit for bit', { skip }, () => {
  let seed = 2000;
  for (const dtype of ['q4_0', 'q8_0', 'q4_k', 'q6_k'] as DType[]) {
    for (const rows of [1, 5]) checkExact(dtype, rows, 6, 14336, seed++);
  }
});

// ---------------------------------------------------------------------------------------------------------------
// Repacked q4_0 (native/src/quant.c MOE_Q4_0_RP): the AVX-512 kernels' own layout, made once per weight tensor of a
// model file. It must change nothing but speed: the same bits as the file layout, on every row count (decode and
// prefill tiles), every thread count and, after a switch of kernel set, on the other code paths too.
// ---------------------------------------------------------------------------------------------------------------

/** Random q4_0 weights with ordinary scales (results round: only bit-identity between layouts is asserted). */
function randomQ4_0(r: () => number, rows: number, n: number): Uint8Array {
  const data = new Uint8Array((rows * n / 32) * 18);
  for (let i = 0; i < data.length; i++) data[i] = Math.floor(r() * 256);
  for (let o = 0; o < data.length; o += 18) putU16(data, o, floatToHalf((r() - 0.5) * 0.02));
  return data;
}

const repackSkip = skip || (nativeCompute()!.repack(new Uint8Array(18 * 16), 2, 1, 512, true) === null ? 'no repacked layout on this CPU (AVX-512 only)' : false);

function assertSameBits(got: Float32Array, want: Float32Array, what: string): void {
  assert.equal(got.length, want.length);
  for (let i = 0; i < got.length; i++) {
    if (!Object.is(got[i], want[i])) assert.fail(`${what}: [${i}] = ${got[i]}, the file layout gives ${want[i]}`);
  }
}

test('repacked q4_0 matmul gives the file layout\'s bits: rows 1..9, 1 and 2 threads, every kernel set', { skip: repackSkip }, () => {
  const a = nativeCompute()!;
  const r = rng(77);
  const n = 1536, outDim = 37;
  const w = randomQ4_0(r, outDim, n);
  const rp = a.repack(w, 2, outDim, n, true)!;
  assert.equal(rp.data.length, w.length, 'same size as the file layout');
  assert.notDeepEqual(rp.data, w, 'the bytes are rearranged');
  try {
    for (const k of kernelSets()) {
      assert.ok(a.setKernels(k));
      for (const threads of [1, 2]) {
        new NativeBackend({ threads }); // sets the pool's thread count
        for (const rows of [1, 2, 3, 5, 9]) {
          const x = Float32Array.from({ length: rows * n }, () => r() * 2 - 1);
          const want = new Float32Array(rows * outDim), got = new Float32Array(rows * outDim).fill(NaN);
          assert.ok(a.matmul(want, x, rows, w, 2, outDim, n));
          assert.ok(a.matmul(got, x, rows, rp.data, rp.type, outDim, n));
          assertSameBits(got, want, `${k} kernels, ${threads} threads, ${rows} rows`);
        }
      }
    }
  } finally {
    a.setKernels('auto');
  }
});

test('repacked q4_0 experts give the file layout\'s bits in the grouped expert FFN (decode and prefill)', { skip: repackSkip }, () => {
  const a = nativeCompute()!;
  const r = rng(78);
  const E = 4, dim = 512, ffn = 1024, k = 2;
  const gate = randomQ4_0(r, E * ffn, dim), up = randomQ4_0(r, E * ffn, dim), down = randomQ4_0(r, E * dim, ffn);
  const [g2, u2, d2] = [a.repack(gate, 2, E * ffn, dim, true)!, a.repack(up, 2, E * ffn, dim, true)!, a.repack(down, 2, E * dim, ffn, true)!];
  for (const rows of [1, 7]) {
    const x = Float32Array.from({ length: rows * dim }, () => r() * 2 - 1);
    const experts = Int32Array.from({ length: rows * k }, (_, i) => (i * 3 + (i >> 1)) % E);
    const weights = Float32Array.from({ length: rows * k }, () => r());
    const want = new Float32Array(rows * dim), got = new Float32Array(rows * dim).fill(NaN);
    assert.ok(a.moeFFN(want, x, rows, experts, weights, k, gate, 2, up, 2, down, 2, E, ffn, dim));
    assert.ok(a.moeFFN(got, x, rows, experts, weights, k, g2.data, g2.type, u2.data, u2.type, d2.data, d2.type, E, ffn, dim));
    assertSameBits(got, want, `${rows} rows`);
  }
});

test('repack: only a mapped model file\'s bytes unless asked; q4_0 rearranged only in rows of whole 512-element groups, other types copied as they are', { skip: repackSkip }, () => {
  const a = nativeCompute()!;
  const w = randomQ4_0(rng(79), 8, 1024);
  assert.equal(a.repack(w, 2, 8, 1024), null, 'JS memory may change later: not repacked by default');
  const odd = randomQ4_0(rng(80), 8, 1024 + 32);
  const copy = a.repack(odd, 2, 8, 1024 + 32, true)!;
  assert.equal(copy.type, 2, 'rows of 1056 are not whole groups: copied as they are');
  assert.deepEqual(copy.data, odd);
  const q8bytes = Uint8Array.from({ length: 8 * 1088 }, (_, i) => (i * 37) & 255);
  const q8 = a.repack(q8bytes, 8, 8, 1024, true)!;
  assert.equal(q8.type, 8, 'q8_0 keeps the file layout');
  assert.deepEqual(q8.data, q8bytes);
  assert.equal(a.repack(w, 15, 8, 256, true), null, 'q8_k: no kernel runs it, nothing to copy');
  assert.throws(() => a.repack(w, 2, 9, 1024, true), /need/);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-repack-'));
  try {
    const file = path.join(dir, 'w.bin');
    fs.writeFileSync(file, Buffer.concat([Buffer.alloc(100), Buffer.from(w)]));
    const mapped = new Uint8Array(nativeAddon()!.mmap(file, 100, w.length));
    const rp = a.repack(mapped, 2, 8, 1024);
    assert.ok(rp, 'a mapped file range is repacked');
    assert.deepEqual(rp.data, a.repack(w, 2, 8, 1024, true)!.data);
    assert.deepEqual(mapped, w, 'the file\'s bytes read back unchanged after their pages were released');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

for (const dtype of ['q4_0', 'f16'] as DType[]) {
test(`a ${dtype} model gives the same logits with and without the engine's own copy of its weights (prompt, then decode steps)`, { skip: dtype === 'q4_0' ? repackSkip : skip }, () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-repack-model-'));
  try {
    const file = path.join(dir, 'm.gguf');
    writeRandomMixtralGGUF(file, {
      vocabSize: 300, hiddenSize: 512, intermediateSize: 1024, numHiddenLayers: 2, numAttentionHeads: 8, numKeyValueHeads: 2,
      headDim: 64, numLocalExperts: 4, numExpertsPerTok: 2, rmsNormEps: 1e-5, ropeTheta: 10000, maxPositionEmbeddings: 64,
      slidingWindow: null, tieWordEmbeddings: false,
    }, { seed: 5, dtype });
    const run = (repack: boolean): Float32Array[] => {
      const m = loadModel(file, { backend: new NativeBackend({ threads: 2, repack }) });
      const s = m.newSession({ contextLength: 64 });
      const out = [s.forward([1, 20, 30, 40, 50], { allLogits: true })];
      for (const t of [60, 70, 80]) out.push(s.forward([t]));
      return out;
    };
    const a = nativeCompute()!;
    const repack = a.repack;
    let repacked = 0, copied = 0;
    a.repack = (...args) => {
      const r = repack(...args);
      if (r?.type === 200) repacked++;
      else if (r) copied++;
      return r;
    };
    let want: Float32Array[], got: Float32Array[];
    try {
      want = run(false);
      assert.equal(repacked + copied, 0);
      got = run(true);
    } finally {
      a.repack = repack;
    }
    // q, k, v, o, the router and the three expert tensors of each layer, and the output head
    if (dtype === 'q4_0') assert.deepEqual([repacked, copied], [2 * 7 + 1, 2], 'every q4_0 matrix rearranged, the f32 routers copied');
    else assert.deepEqual([repacked, copied], [0, 2 * 8 + 1], 'every matrix copied');
    want.forEach((w, i) => assertSameBits(got[i], w, `forward ${i}`));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
}

// ---------------------------------------------------------------------------------------------------------------
// Reading ahead (kernels.h moe_pool_prefetch): idle workers read the next job's weights while the caller works alone.
// Only memory whose release the addon hears of is read, and releasing it first stops the reading.
// ---------------------------------------------------------------------------------------------------------------

test('prefetch reads only the engine\'s weight copies and model mappings; freeing a copy being read ahead is safe', { skip }, () => {
  const a = nativeCompute()!;
  new NativeBackend({ threads: 2 }); // workers to read ahead
  assert.throws(() => a.prefetch([new Float32Array(4) as unknown as Uint8Array]), /ws\[0\] is not a Uint8Array/);
  assert.throws(() => (a.prefetch as (x: unknown) => void)(new Uint8Array(4)), /ws must be an array/);
  a.prefetch([new Uint8Array(1 << 20), new Uint8Array(0)]); // JavaScript memory: ignored (it could be freed unannounced)
  a.prefetch([]);
  // Copies posted, dropped and collected while the workers may still be reading them: the finalizer cancels first.
  v8.setFlagsFromString('--expose-gc');
  const gc = vm.runInNewContext('gc') as () => void;
  const r = rng(90);
  const n = 1024, rows = 2048; // 4 MB of f16: more than the gaps between the calls below let the workers read
  const w = new Uint8Array(rows * n * 2);
  for (let i = 0; i < w.length; i += 2) putU16(w, i, floatToHalf(r() - 0.5));
  const x = Float32Array.from({ length: n }, () => r() - 0.5);
  const want = new Float32Array(rows);
  assert.ok(a.matmul(want, x, 1, w, 1, rows, n));
  for (let i = 0; i < 12; i++) {
    let copy: { data: Uint8Array; type: number } | null = a.repack(w, 1, rows, n, true);
    assert.ok(copy);
    a.prefetch([copy.data, copy.data.subarray(123, 4567)]);
    if (i % 3 === 0) {
      const got = new Float32Array(rows);
      assert.ok(a.matmul(got, x, 1, copy.data, copy.type, rows, n));
      assert.deepEqual(got, want, 'reading ahead changes no result');
    }
    copy = null;
    gc();
  }
  gc();
});
