// Block formats against ggml itself: test/fixtures/quant/golden.json was written by gen-golden.c, which calls the
// ggml libraries node-llama-cpp ships (quantize_row_*_ref, dequantize_row_*, the CPU backend's activation
// converters and ggml_vec_dot_*), on seeded inputs stored in the same file.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

import type { DType } from '../src/tensor/dtype.js';
import { dtypeInfo } from '../src/tensor/dtype.js';
import { f32Tensor } from '../src/tensor/tensor.js';
import {
  dequantize,
  dequantizeRow,
  dotRow,
  prepareActivation,
  quantize,
  quantizeTensor,
  vecDotType,
} from '../src/tensor/quant.js';

interface GoldenType {
  quant: string;
  dequant: string;
  specialsQuant?: string;
  specialsDequant?: string;
  extraQuant: string;
  extraDequant?: string;
  actType: string;
  act_x64: string;
  act_haswell: string;
  act_zen4: string;
  dot_x64: string;
  dot_haswell: string;
  dot_zen4: string;
}
interface Golden {
  rows: number;
  rowLength: number;
  weights: string;
  activation: string;
  specials: string;
  extra: string;
  types: Record<string, GoldenType>;
}

const golden = JSON.parse(
  readFileSync(new URL('../../test/fixtures/quant/golden.json', import.meta.url), 'utf8'),
) as Golden;

function bytes(b64: string): Uint8Array {
  const b = Buffer.from(b64, 'base64');
  return new Uint8Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.length));
}
function floats(b64: string): Float32Array {
  return new Float32Array(bytes(b64).buffer);
}

const ROWS = golden.rows;
const N = golden.rowLength;
const weights = floats(golden.weights);
const activation = floats(golden.activation);
const specials = floats(golden.specials);
const extra = floats(golden.extra); // rows of 256: ties, zero groups, one-signed, outliers, tiny, constant
const ALL = Object.keys(golden.types) as DType[];

/** Bit-for-bit float comparison (any NaN equals any NaN: the payload is not part of the format contract). */
function assertSameFloats(actual: Float32Array, expected: Float32Array, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  const a = new Uint32Array(actual.buffer, actual.byteOffset, actual.length);
  const e = new Uint32Array(expected.buffer, expected.byteOffset, expected.length);
  for (let i = 0; i < a.length; i++) {
    if (a[i] !== e[i] && !(Number.isNaN(actual[i]) && Number.isNaN(expected[i]))) {
      assert.fail(`${what}: element ${i} is ${actual[i]} (0x${a[i].toString(16)}), ggml has ${expected[i]} (0x${e[i].toString(16)})`);
    }
  }
}

function assertSameBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] !== expected[i]) assert.fail(`${what}: byte ${i} is ${actual[i]}, ggml wrote ${expected[i]}`);
  }
}

test('the fixture covers all 13 weight types', () => {
  assert.deepEqual(ALL.sort(), ['bf16', 'f16', 'f32', 'q2_k', 'q3_k', 'q4_0', 'q4_1', 'q4_k', 'q5_0', 'q5_1', 'q5_k', 'q6_k', 'q8_0']);
});

test('dequantize matches ggml dequantize_row_* bit for bit', () => {
  for (const dtype of ALL) {
    const g = golden.types[dtype];
    const q = bytes(g.quant);
    const expected = floats(g.dequant);
    // the whole tensor at once
    assertSameFloats(dequantize({ dtype, shape: [ROWS, N], data: q }), expected, `${dtype} dequantize`);
    // row by row, at a byte offset and into an output offset
    const rowBytes = q.length / ROWS;
    const out = new Float32Array(ROWS * N + 3);
    for (let r = 0; r < ROWS; r++) dequantizeRow(dtype, q, r * rowBytes, N, out, 3 + r * N);
    assertSameFloats(out.subarray(3), expected, `${dtype} dequantizeRow`);
  }
});

test('quantize matches ggml quantize_row_*_ref bytes for every type', () => {
  for (const dtype of ALL) {
    assertSameBytes(quantize(dtype, weights, N), bytes(golden.types[dtype].quant), `${dtype} quantize`);
  }
});

test('quantize and dequantize match ggml on awkward inputs (ties, zeros, one sign, outliers, tiny, constant)', () => {
  for (const dtype of ALL) {
    const g = golden.types[dtype];
    const q = quantize(dtype, extra, 256);
    assertSameBytes(q, bytes(g.extraQuant), `${dtype} quantize (awkward rows)`);
    if (g.extraDequant) {
      assertSameFloats(dequantize({ dtype, shape: [extra.length / 256, 256], data: q }), floats(g.extraDequant), `${dtype} dequantize (awkward rows)`);
    }
  }
});

test('f32 / f16 / bf16 conversions of special values (inf, nan, subnormals, overflow) match ggml', () => {
  for (const dtype of ['f32', 'f16', 'bf16'] as DType[]) {
    const g = golden.types[dtype];
    const q = quantize(dtype, specials, specials.length);
    const expectedQ = bytes(g.specialsQuant!);
    const expectedD = floats(g.specialsDequant!);
    for (let i = 0; i < specials.length; i++) {
      const size = dtypeInfo(dtype).typeSize;
      const mine = q.subarray(i * size, (i + 1) * size);
      const theirs = expectedQ.subarray(i * size, (i + 1) * size);
      if (Number.isNaN(specials[i])) {
        // a NaN must stay a NaN; its payload bits are ggml's choice
        const back = new Float32Array(1);
        dequantizeRow(dtype, mine, 0, 1, back);
        assert.ok(Number.isNaN(back[0]), `${dtype}: NaN survives`);
      } else {
        assertSameBytes(mine, theirs, `${dtype} special value ${specials[i]}`);
      }
    }
    const back = new Float32Array(specials.length);
    dequantizeRow(dtype, expectedQ, 0, specials.length, back);
    assertSameFloats(back, expectedD, `${dtype} specials dequantize`);
  }
});

test('prepareActivation converts to vec_dot_type exactly as ggml CPU builds do', () => {
  for (const dtype of ALL) {
    const g = golden.types[dtype];
    assert.equal(vecDotType(dtype), g.actType, `${dtype} vec_dot_type`);
    const ref = prepareActivation(dtype, activation, 0, N, 'ref');
    const x86 = prepareActivation(dtype, activation, 0, N); // default: llama.cpp's x86 (AVX) builds
    assert.equal(ref.dtype, g.actType);
    assert.equal(ref.n, N);
    if (dtype === 'f32') {
      assertSameFloats(ref.data as Float32Array, activation, 'f32 activation');
      continue;
    }
    assertSameBytes(ref.data as Uint8Array, bytes(g.act_x64), `${dtype} activation, portable build`);
    assertSameBytes(x86.data as Uint8Array, bytes(g.act_haswell), `${dtype} activation, AVX2 build`);
    assertSameBytes(x86.data as Uint8Array, bytes(g.act_zen4), `${dtype} activation, AVX-512 build`);
  }
  // The fixture's activation has rounding ties, so the two roundings must really differ for q8_0 / q8_1.
  assert.notDeepEqual(bytes(golden.types.q8_0.act_x64), bytes(golden.types.q8_0.act_haswell));
});

test('prepareActivation reads from an offset', () => {
  const padded = new Float32Array(N + 64);
  padded.set(activation, 64);
  for (const dtype of ['q4_0', 'q4_k', 'f16'] as DType[]) {
    const a = prepareActivation(dtype, padded, 64, N);
    const b = prepareActivation(dtype, activation, 0, N);
    assert.deepEqual(a.data, b.data);
  }
});

test('dotRow equals ggml generic vec_dot bit for bit (portable build)', () => {
  for (const dtype of ALL) {
    const g = golden.types[dtype];
    const q = bytes(g.quant);
    const rowBytes = q.length / ROWS;
    const act = prepareActivation(dtype, activation, 0, N, 'ref');
    const expected = floats(g.dot_x64);
    const mine = new Float32Array(ROWS);
    for (let r = 0; r < ROWS; r++) mine[r] = dotRow(dtype, q, r * rowBytes, act);
    assertSameFloats(mine, expected, `${dtype} dot`);
  }
});

test('dotRow with x86 activations is within float summation-order error of llama.cpp AVX2 / AVX-512 dots', () => {
  for (const dtype of ALL) {
    const g = golden.types[dtype];
    const q = bytes(g.quant);
    const rowBytes = q.length / ROWS;
    const act = prepareActivation(dtype, activation, 0, N);
    // the size of the terms, for a bound that does not depend on cancellation
    const w = floats(g.dequant);
    for (const variant of ['haswell', 'zen4'] as const) {
      const expected = floats(g[`dot_${variant}`]);
      for (let r = 0; r < ROWS; r++) {
        let scale = 0;
        for (let i = 0; i < N; i++) scale += Math.abs(w[r * N + i] * activation[i]);
        const mine = dotRow(dtype, q, r * rowBytes, act);
        const err = Math.abs(mine - expected[r]);
        assert.ok(err <= 1e-6 * scale + 1e-30, `${dtype} row ${r} vs ${variant}: ${mine} vs ${expected[r]} (|terms| ${scale})`);
      }
    }
  }
});

test('dotRow is the dot product of the dequantized row with the rounded activation', () => {
  // Independent of ggml's fixtures: seeded data, double-precision reference from dequantize().
  let seed = 12345;
  const rand = () => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return seed / 2 ** 32 - 0.5;
  };
  const n = 768;
  const x = Float32Array.from({ length: n }, rand);
  const wv = Float32Array.from({ length: n }, rand);
  for (const dtype of ALL) {
    const qw = quantize(dtype, wv, n);
    const wd = dequantize({ dtype, shape: [n], data: qw });
    const act = prepareActivation(dtype, x, 0, n);
    const xd = act.dtype === 'f32' ? (act.data as Float32Array) : dequantize({ dtype: act.dtype, shape: [n], data: act.data as Uint8Array });
    let exact = 0, scale = 0;
    for (let i = 0; i < n; i++) {
      exact += wd[i] * xd[i];
      scale += Math.abs(wd[i] * xd[i]);
    }
    const got = dotRow(dtype, qw, 0, act);
    // q8_1 keeps s = d * sum(q) rounded to f16, which q4_1 / q5_1 use for the min term
    const tol = act.dtype === 'q8_1' ? 2e-3 * scale : 1e-5 * scale;
    assert.ok(Math.abs(got - exact) <= tol, `${dtype}: ${got} vs ${exact}`);
  }
});

test('round trip error stays within each format\'s bound', () => {
  let seed = 99;
  const gauss = () => {
    seed = (seed * 1664525 + 1013904223) >>> 0;
    const u1 = (seed + 1) / 2 ** 32;
    seed = (seed * 1664525 + 1013904223) >>> 0;
    const u2 = seed / 2 ** 32;
    return Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * u2);
  };
  const n = 4096;
  const x = Float32Array.from({ length: n }, gauss);
  // Relative RMS error bounds, about 1.25x the uniform-rounding estimate step/sqrt(12): step = 2^-10 / 2^-7 of the
  // value for f16 / bf16, and for b-bit blocks of 32 normal samples (E[amax] ~ 2.2 sigma) about 2.2 / 2^(b-1).
  const bound: Record<string, number> = {
    f32: 0, f16: 3e-4, bf16: 2.5e-3, q8_0: 0.0065, q5_0: 0.05, q5_1: 0.05, q4_0: 0.1, q4_1: 0.1,
    q6_k: 0.022, q5_k: 0.045, q4_k: 0.09, q3_k: 0.18, q2_k: 0.36,
  };
  let rms = 0;
  for (const v of x) rms += v * v;
  rms = Math.sqrt(rms / n);
  for (const dtype of ALL) {
    const back = dequantize({ dtype, shape: [n / 256, 256], data: quantize(dtype, x, 256) });
    let err = 0;
    for (let i = 0; i < n; i++) err += (back[i] - x[i]) ** 2;
    const rel = Math.sqrt(err / n) / rms;
    assert.ok(rel <= bound[dtype], `${dtype}: relative RMS error ${rel} > ${bound[dtype]}`);
    if (dtype !== 'f32') assert.ok(rel > 0, `${dtype} is lossy, so some error must show`);
  }
  // q8_0: every element within half a step (plus the f16 rounding of the scale)
  const back = dequantize({ dtype: 'q8_0', shape: [n], data: quantize('q8_0', x, n) });
  for (let b = 0; b < n / 32; b++) {
    let amax = 0;
    for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[b * 32 + j]));
    for (let j = 0; j < 32; j++) {
      const i = b * 32 + j;
      assert.ok(Math.abs(back[i] - x[i]) <= 0.57 * (amax / 127), `q8_0 element ${i}`);
    }
  }
});

test('row lengths that are not whole blocks give a clear error', () => {
  assert.throws(() => quantize('q4_0', new Float32Array(33), 33), /row length 33 is not a multiple of the q4_0 block size 32/);
  assert.throws(() => quantize('q4_k', new Float32Array(512), 128), /row length 128 is not a multiple of the q4_k block size 256/);
  assert.throws(() => quantize('q8_0', new Float32Array(96), 64), /96 values is not a whole number of rows of 64/);
  assert.throws(() => dequantizeRow('q8_0', new Uint8Array(34), 0, 16, new Float32Array(16)), /not a multiple of the q8_0 block size/);
  assert.throws(() => prepareActivation('q6_k', new Float32Array(300), 0, 300), /not a multiple of the q6_k block size 256/);
  assert.throws(() => dequantize({ dtype: 'q4_0', shape: [2, 48], data: new Uint8Array(54) }), /not a multiple of the q4_0 block size/);
});

test('short buffers and mismatched activations give a clear error, not garbage', () => {
  assert.throws(() => dequantizeRow('q4_0', new Uint8Array(17), 0, 32, new Float32Array(32)), /need 18 bytes at offset 0, source has 17/);
  assert.throws(() => dequantizeRow('q4_0', new Uint8Array(18), 0, 32, new Float32Array(31)), /output holds 31 values/);
  assert.throws(() => dequantize({ dtype: 'q8_0', shape: [64], data: new Uint8Array(60) }), /needs 68 bytes, has 60/);
  const act = prepareActivation('q4_0', new Float32Array(64), 0, 64);
  assert.throws(() => dotRow('q4_0', new Uint8Array(35), 0, act), /needs 36 bytes/);
  assert.throws(() => dotRow('q4_1', new Uint8Array(40), 0, act), /q4_1 weights need a q8_1 activation, got q8_0/);
  assert.throws(() => prepareActivation('q8_0', new Float32Array(32), 16, 32), /do not fit/);
  assert.throws(() => dotRow('q4_0', new Uint8Array(36), 0, { dtype: 'q8_0', n: 64, data: new Uint8Array(40) }), /needs a Uint8Array of 68 bytes, got Uint8Array of 40/);
  assert.throws(() => dotRow('f32', new Uint8Array(256), 0, { dtype: 'f32', n: 64, data: new Uint8Array(256) }), /needs a Float32Array of 64/);
  assert.throws(() => vecDotType('q8_k'), /no dot product/);
});

test('quantizeTensor converts between any two types through f32', () => {
  const values = weights.subarray(0, 2 * N);
  const t = f32Tensor(values, [2, N]);
  const q4 = quantizeTensor('q4_0', t);
  assert.equal(q4.dtype, 'q4_0');
  assert.deepEqual(q4.shape, [2, N]);
  assertSameBytes(q4.data, bytes(golden.types.q4_0.quant).subarray(0, 2 * 18 * (N / 32)), 'q4_0 via quantizeTensor');
  // q4_0 -> f16 -> f32 keeps the q4_0 values up to f16 rounding of each value
  const h = quantizeTensor('f16', q4);
  const viaHalf = dequantize(h);
  const direct = dequantize(q4);
  for (let i = 0; i < direct.length; i++) assert.ok(Math.abs(viaHalf[i] - direct[i]) <= Math.abs(direct[i]) * 2 ** -11);
  // f32 -> f32 is the identity
  assertSameFloats(dequantize(quantizeTensor('f32', t)), values, 'f32 identity');
});
