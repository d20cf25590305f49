// GGML block formats: dequantize, quantize and the dot product of a weight row with an activation vector, written
// to reproduce ggml bit for bit (ggml/src/ggml-quants.c and ggml-cpu/quants.c). Every float operation that ggml does
// in float32 is rounded with Math.fround at the same place, in the same order; integer sums stay integers.
// This is the oracle the fast kernels are tested against, so it is plain rather than clever.

import { dtypeInfo, type DType } from './dtype.js';
import { bf16ToFloat, floatToBf16, floatToHalf, halfTableF32 } from './f16.js';
import { numel, shapeString, tensorByteSize, type Tensor } from './tensor.js';

const fround = Math.fround;
const HALF = halfTableF32();
const QK_K = 256;

// ggml's constants as float32 (C float literals).
const F0_1 = fround(0.1);
const GROUP_MAX_EPS = fround(1e-15);

// Scratch for reading / writing a little-endian float32 inside a byte array without a DataView per call.
const scratchF32 = new Float32Array(1);
const scratchU8 = new Uint8Array(scratchF32.buffer);
const scratchU32 = new Uint32Array(scratchF32.buffer);

function f16At(b: Uint8Array, o: number): number {
  return HALF[b[o] | (b[o + 1] << 8)];
}

function putU16(b: Uint8Array, o: number, v: number): void {
  b[o] = v & 0xff;
  b[o + 1] = (v >>> 8) & 0xff;
}

function f32At(b: Uint8Array, o: number): number {
  scratchU8[0] = b[o];
  scratchU8[1] = b[o + 1];
  scratchU8[2] = b[o + 2];
  scratchU8[3] = b[o + 3];
  return scratchF32[0];
}

function putF32(b: Uint8Array, o: number, v: number): void {
  scratchF32[0] = v;
  b[o] = scratchU8[0];
  b[o + 1] = scratchU8[1];
  b[o + 2] = scratchU8[2];
  b[o + 3] = scratchU8[3];
}

/** n float32 values at byte offset o of b: a view when aligned, else a copy. */
function f32View(b: Uint8Array, o: number, n: number): Float32Array {
  const at = b.byteOffset + o;
  if ((at & 3) === 0) return new Float32Array(b.buffer, at, n);
  return new Float32Array(b.slice(o, o + 4 * n).buffer);
}

function u32At(b: Uint8Array, o: number): number {
  return (b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24)) >>> 0;
}

function i8(v: number): number {
  return (v << 24) >> 24;
}

/**
 * ggml's nearest_int: add 1.5*2^23 in float32 and read the low mantissa bits, i.e. round half to even for
 * |v| <= 2^22. Done on the bits, as ggml does, so that out-of-range inputs give ggml's (garbage) values too.
 */
function nearestInt(v: number): number {
  scratchF32[0] = v + 12582912;
  return (scratchU32[0] & 0x007fffff) - 0x00400000;
}

/** C roundf: half away from zero. */
function roundAway(v: number): number {
  return v < 0 ? -Math.round(-v) : Math.round(v);
}

/** Round half to even (x86 _mm256_round_ps with _MM_ROUND_NEAREST). */
function roundEven(v: number): number {
  const r = Math.round(v);
  return r - v === 0.5 && r & 1 ? r - 1 : r;
}

/** x86 cvttss2si: truncate toward zero; NaN and out-of-range values give INT32_MIN ("integer indefinite"). */
function cvtt(v: number): number {
  const t = Math.trunc(v);
  return t >= -2147483648 && t <= 2147483647 ? t : -2147483648;
}

/** C conversion of a float to int8_t / uint8_t as x86 compilers emit it (cvttss2si, keep the low byte). */
function truncToI8(v: number): number {
  return i8(cvtt(v));
}

function truncToU8(v: number): number {
  return cvtt(v) & 0xff;
}

function checkBlocks(what: string, dtype: DType, n: number): void {
  const { blockSize } = dtypeInfo(dtype);
  if (!Number.isInteger(n) || n < 0) throw new Error(`${what}: element count ${n} is not a non-negative integer`);
  if (n % blockSize !== 0) {
    throw new Error(`${what}: row length ${n} is not a multiple of the ${dtype} block size ${blockSize}`);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Dequantization (ggml dequantize_row_* / to_float)
// ---------------------------------------------------------------------------------------------------------------

/**
 * Dequantize `n` elements (a whole number of blocks) of `dtype` starting at byte `srcByteOffset` of `src` into
 * `out[outOffset ..]`, bit-exact with ggml's dequantize_row_* (ggml_fp16_to_fp32_row / bf16 for the plain types).
 */
export function dequantizeRow(
  dtype: DType,
  src: Uint8Array,
  srcByteOffset: number,
  n: number,
  out: Float32Array,
  outOffset = 0,
): void {
  checkBlocks(`dequantize ${dtype}`, dtype, n);
  const { blockSize, typeSize } = dtypeInfo(dtype);
  const bytes = (n / blockSize) * typeSize;
  if (!Number.isInteger(srcByteOffset) || srcByteOffset < 0 || srcByteOffset + bytes > src.length) {
    throw new Error(
      `dequantize ${dtype}: ${n} elements need ${bytes} bytes at offset ${srcByteOffset}, source has ${src.length}`,
    );
  }
  if (!Number.isInteger(outOffset) || outOffset < 0 || outOffset + n > out.length) {
    throw new Error(`dequantize ${dtype}: output holds ${out.length} values, need ${n} at offset ${outOffset}`);
  }
  const nb = n / blockSize;
  let o = srcByteOffset;
  let y = outOffset;
  switch (dtype) {
    case 'f32':
      out.set(f32View(src, o, n), y);
      return;
    case 'f16':
      for (let i = 0; i < n; i++, o += 2) out[y++] = f16At(src, o);
      return;
    case 'bf16':
      for (let i = 0; i < n; i++, o += 2) out[y++] = bf16ToFloat(src[o] | (src[o + 1] << 8));
      return;
    case 'q4_0':
      for (let i = 0; i < nb; i++, o += 18, y += 32) {
        const d = f16At(src, o);
        for (let j = 0; j < 16; j++) {
          const q = src[o + 2 + j];
          out[y + j] = fround(((q & 0x0f) - 8) * d);
          out[y + j + 16] = fround(((q >> 4) - 8) * d);
        }
      }
      return;
    case 'q4_1':
      for (let i = 0; i < nb; i++, o += 20, y += 32) {
        const d = f16At(src, o);
        const m = f16At(src, o + 2);
        for (let j = 0; j < 16; j++) {
          const q = src[o + 4 + j];
          out[y + j] = fround(fround((q & 0x0f) * d) + m);
          out[y + j + 16] = fround(fround((q >> 4) * d) + m);
        }
      }
      return;
    case 'q5_0':
      for (let i = 0; i < nb; i++, o += 22, y += 32) {
        const d = f16At(src, o);
        const qh = u32At(src, o + 2);
        for (let j = 0; j < 16; j++) {
          const q = src[o + 6 + j];
          const xh0 = ((qh >>> j) << 4) & 0x10;
          const xh1 = (qh >>> (j + 12)) & 0x10;
          out[y + j] = fround((((q & 0x0f) | xh0) - 16) * d);
          out[y + j + 16] = fround((((q >> 4) | xh1) - 16) * d);
        }
      }
      return;
    case 'q5_1':
      for (let i = 0; i < nb; i++, o += 24, y += 32) {
        const d = f16At(src, o);
        const m = f16At(src, o + 2);
        const qh = u32At(src, o + 4);
        for (let j = 0; j < 16; j++) {
          const q = src[o + 8 + j];
          const xh0 = ((qh >>> j) << 4) & 0x10;
          const xh1 = (qh >>> (j + 12)) & 0x10;
          out[y + j] = fround(fround(((q & 0x0f) | xh0) * d) + m);
          out[y + j + 16] = fround(fround(((q >> 4) | xh1) * d) + m);
        }
      }
      return;
    case 'q8_0':
      for (let i = 0; i < nb; i++, o += 34, y += 32) {
        const d = f16At(src, o);
        for (let j = 0; j < 32; j++) out[y + j] = fround(i8(src[o + 2 + j]) * d);
      }
      return;
    case 'q8_1': // ggml has no dequantize_row_q8_1; same rule as q8_0 (s is only a cached sum)
      for (let i = 0; i < nb; i++, o += 36, y += 32) {
        const d = f16At(src, o);
        for (let j = 0; j < 32; j++) out[y + j] = fround(i8(src[o + 4 + j]) * d);
      }
      return;
    case 'q2_k':
      for (let i = 0; i < nb; i++, o += 84) y = dequantQ2K(src, o, out, y);
      return;
    case 'q3_k':
      for (let i = 0; i < nb; i++, o += 110) y = dequantQ3K(src, o, out, y);
      return;
    case 'q4_k':
      for (let i = 0; i < nb; i++, o += 144) y = dequantQ4K(src, o, out, y);
      return;
    case 'q5_k':
      for (let i = 0; i < nb; i++, o += 176) y = dequantQ5K(src, o, out, y);
      return;
    case 'q6_k':
      for (let i = 0; i < nb; i++, o += 210) y = dequantQ6K(src, o, out, y);
      return;
    case 'q8_k':
      for (let i = 0; i < nb; i++, o += 292, y += QK_K) {
        const d = f32At(src, o);
        for (let j = 0; j < QK_K; j++) out[y + j] = fround(d * i8(src[o + 4 + j]));
      }
      return;
  }
}

// block_q2_K: scales[16] | qs[64] | d | dmin
function dequantQ2K(b: Uint8Array, o: number, out: Float32Array, y: number): number {
  const d = f16At(b, o + 80);
  const min = f16At(b, o + 82);
  let q = o + 16;
  let is = 0;
  for (let n = 0; n < QK_K; n += 128) {
    for (let shift = 0; shift < 8; shift += 2) {
      for (let half = 0; half < 2; half++) {
        const sc = b[o + is++];
        const dl = fround(d * (sc & 0xf));
        const ml = fround(min * (sc >> 4));
        for (let l = 0; l < 16; l++) out[y++] = fround(fround(dl * ((b[q + half * 16 + l] >> shift) & 3)) - ml);
      }
    }
    q += 32;
  }
  return y;
}

/** The 16 six-bit scales of a q3_K block (stored as 12 bytes), minus 32. */
function q3kScales(b: Uint8Array, s: number, out: Int32Array): void {
  for (let j = 0; j < 16; j++) {
    const lo = j < 8 ? b[s + j] & 0xf : b[s + j - 8] >> 4;
    const hi = (b[s + 8 + (j % 4)] >> (2 * (j >> 2))) & 3;
    out[j] = (lo | (hi << 4)) - 32;
  }
}
const q3Scales = new Int32Array(16);

// block_q3_K: hmask[32] | qs[64] | scales[12] | d
function dequantQ3K(b: Uint8Array, o: number, out: Float32Array, y: number): number {
  const dAll = f16At(b, o + 108);
  q3kScales(b, o + 96, q3Scales);
  let q = o + 32;
  let m = 1;
  let is = 0;
  for (let n = 0; n < QK_K; n += 128) {
    for (let shift = 0; shift < 8; shift += 2) {
      for (let half = 0; half < 2; half++) {
        const dl = fround(dAll * q3Scales[is++]);
        for (let l = 0; l < 16; l++) {
          const k = half * 16 + l;
          out[y++] = fround(dl * (((b[q + k] >> shift) & 3) - (b[o + k] & m ? 0 : 4)));
        }
      }
      m <<= 1;
    }
    q += 32;
  }
  return y;
}

/** ggml get_scale_min_k4: 6-bit scale and min number j of a q4_K / q5_K block. */
function scaleMinK4(b: Uint8Array, s: number, j: number): [number, number] {
  if (j < 4) return [b[s + j] & 63, b[s + j + 4] & 63];
  return [(b[s + j + 4] & 0xf) | ((b[s + j - 4] >> 6) << 4), (b[s + j + 4] >> 4) | ((b[s + j] >> 6) << 4)];
}

// block_q4_K: d | dmin | scales[12] | qs[128]
function dequantQ4K(b: Uint8Array, o: number, out: Float32Array, y: number): number {
  const d = f16At(b, o);
  const min = f16At(b, o + 2);
  let q = o + 16;
  for (let is = 0; is < 8; is += 2, q += 32) {
    const [sc1, m1i] = scaleMinK4(b, o + 4, is);
    const [sc2, m2i] = scaleMinK4(b, o + 4, is + 1);
    const d1 = fround(d * sc1), m1 = fround(min * m1i);
    const d2 = fround(d * sc2), m2 = fround(min * m2i);
    for (let l = 0; l < 32; l++) out[y++] = fround(fround(d1 * (b[q + l] & 0xf)) - m1);
    for (let l = 0; l < 32; l++) out[y++] = fround(fround(d2 * (b[q + l] >> 4)) - m2);
  }
  return y;
}

// block_q5_K: d | dmin | scales[12] | qh[32] | qs[128]
function dequantQ5K(b: Uint8Array, o: number, out: Float32Array, y: number): number {
  const d = f16At(b, o);
  const min = f16At(b, o + 2);
  const qh = o + 16;
  let ql = o + 48;
  let u1 = 1, u2 = 2;
  for (let is = 0; is < 8; is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
    const [sc1, m1i] = scaleMinK4(b, o + 4, is);
    const [sc2, m2i] = scaleMinK4(b, o + 4, is + 1);
    const d1 = fround(d * sc1), m1 = fround(min * m1i);
    const d2 = fround(d * sc2), m2 = fround(min * m2i);
    for (let l = 0; l < 32; l++) out[y++] = fround(fround(d1 * ((b[ql + l] & 0xf) + (b[qh + l] & u1 ? 16 : 0))) - m1);
    for (let l = 0; l < 32; l++) out[y++] = fround(fround(d2 * ((b[ql + l] >> 4) + (b[qh + l] & u2 ? 16 : 0))) - m2);
  }
  return y;
}

// block_q6_K: ql[128] | qh[64] | scales[16] (int8) | d
function dequantQ6K(b: Uint8Array, o: number, out: Float32Array, y: number): number {
  const d = f16At(b, o + 208);
  let ql = o, qh = o + 128, sc = o + 192;
  for (let n = 0; n < QK_K; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
    for (let l = 0; l < 32; l++) {
      const is = l >> 4;
      const h = b[qh + l];
      const q1 = ((b[ql + l] & 0xf) | ((h & 3) << 4)) - 32;
      const q2 = ((b[ql + l + 32] & 0xf) | (((h >> 2) & 3) << 4)) - 32;
      const q3 = ((b[ql + l] >> 4) | (((h >> 4) & 3) << 4)) - 32;
      const q4 = ((b[ql + l + 32] >> 4) | (((h >> 6) & 3) << 4)) - 32;
      out[y + l] = fround(fround(d * i8(b[sc + is])) * q1);
      out[y + l + 32] = fround(fround(d * i8(b[sc + is + 2])) * q2);
      out[y + l + 64] = fround(fround(d * i8(b[sc + is + 4])) * q3);
      out[y + l + 96] = fround(fround(d * i8(b[sc + is + 6])) * q4);
    }
  }
  return y;
}

/** All elements of a tensor as f32 (row-major, same shape), bit-exact with ggml's to_float. */
export function dequantize(t: Tensor): Float32Array {
  const count = numel(t.shape);
  const need = tensorByteSize(t.dtype, t.shape);
  if (t.data.length < need) {
    throw new Error(`dequantize: ${t.dtype} tensor of shape ${shapeString(t.shape)} needs ${need} bytes, has ${t.data.length}`);
  }
  const out = new Float32Array(count);
  dequantizeRow(t.dtype, t.data, 0, count, out, 0);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Quantization (ggml quantize_row_*_ref: what llama.cpp writes into model files)
// ---------------------------------------------------------------------------------------------------------------

/** dtypes that `quantize` can write. */
export const QUANTIZABLE: readonly DType[] = [
  'f32', 'f16', 'bf16', 'q4_0', 'q4_1', 'q5_0', 'q5_1', 'q8_0', 'q8_1', 'q2_k', 'q3_k', 'q4_k', 'q5_k', 'q6_k', 'q8_k',
];

/**
 * Quantize `values` (rows of `rowLength` elements) to `dtype`, bit-exact with ggml's quantize_row_*_ref
 * (and ggml_fp32_to_fp16_row / ggml_fp32_to_bf16_row_ref for the plain types).
 */
export function quantize(dtype: DType, values: Float32Array, rowLength: number): Uint8Array {
  const { blockSize, typeSize } = dtypeInfo(dtype);
  if (!QUANTIZABLE.includes(dtype)) throw new Error(`quantize: cannot write ${dtype}`);
  if (!Number.isInteger(rowLength) || rowLength <= 0) throw new Error(`quantize ${dtype}: bad row length ${rowLength}`);
  checkBlocks(`quantize ${dtype}`, dtype, rowLength);
  if (values.length % rowLength !== 0) {
    throw new Error(`quantize ${dtype}: ${values.length} values is not a whole number of rows of ${rowLength}`);
  }
  const n = values.length;
  const out = new Uint8Array((n / blockSize) * typeSize);
  // Blocks never straddle rows (rowLength is a multiple of the block size), so the rows can be done as one run.
  quantizeInto(dtype, values, 0, n, out, 0);
  return out;
}

function quantizeInto(dtype: DType, x: Float32Array, xo: number, n: number, out: Uint8Array, o: number): void {
  switch (dtype) {
    case 'f32':
      for (let i = 0; i < n; i++, o += 4) putF32(out, o, x[xo + i]);
      return;
    case 'f16':
      for (let i = 0; i < n; i++, o += 2) putU16(out, o, floatToHalf(x[xo + i]));
      return;
    case 'bf16':
      for (let i = 0; i < n; i++, o += 2) putU16(out, o, floatToBf16(x[xo + i]));
      return;
    case 'q4_0':
      for (let i = 0; i < n; i += 32, o += 18) quantQ4_0(x, xo + i, out, o);
      return;
    case 'q4_1':
      for (let i = 0; i < n; i += 32, o += 20) quantQ4_1(x, xo + i, out, o);
      return;
    case 'q5_0':
      for (let i = 0; i < n; i += 32, o += 22) quantQ5_0(x, xo + i, out, o);
      return;
    case 'q5_1':
      for (let i = 0; i < n; i += 32, o += 24) quantQ5_1(x, xo + i, out, o);
      return;
    case 'q8_0':
      for (let i = 0; i < n; i += 32, o += 34) quantQ8_0(x, xo + i, out, o, 'ref');
      return;
    case 'q8_1':
      for (let i = 0; i < n; i += 32, o += 36) quantQ8_1(x, xo + i, out, o, 'ref');
      return;
    case 'q8_k':
      for (let i = 0; i < n; i += QK_K, o += 292) quantQ8K(x, xo + i, out, o);
      return;
    case 'q2_k':
      for (let i = 0; i < n; i += QK_K, o += 84) quantQ2K(x, xo + i, out, o);
      return;
    case 'q3_k':
      for (let i = 0; i < n; i += QK_K, o += 110) quantQ3K(x, xo + i, out, o);
      return;
    case 'q4_k':
      for (let i = 0; i < n; i += QK_K, o += 144) quantQ45K(x, xo + i, out, o, false);
      return;
    case 'q5_k':
      for (let i = 0; i < n; i += QK_K, o += 176) quantQ45K(x, xo + i, out, o, true);
      return;
    case 'q6_k':
      for (let i = 0; i < n; i += QK_K, o += 210) quantQ6K(x, xo + i, out, o);
      return;
  }
}

/** Value with the largest magnitude in x[s .. s+n) (first one wins ties), as ggml's q4_0/q5_0/K-quant loops find it. */
function signedAbsMax(x: Float32Array, s: number, n: number): number {
  let amax = 0, max = 0;
  for (let j = 0; j < n; j++) {
    const v = x[s + j];
    if (amax < Math.abs(v)) {
      amax = Math.abs(v);
      max = v;
    }
  }
  return max;
}

function quantQ4_0(x: Float32Array, s: number, out: Uint8Array, o: number): void {
  const max = signedAbsMax(x, s, 32);
  const d = fround(max / -8);
  const id = d ? fround(1 / d) : 0;
  putU16(out, o, floatToHalf(d));
  for (let j = 0; j < 16; j++) {
    const x0 = fround(x[s + j] * id);
    const x1 = fround(x[s + 16 + j] * id);
    const xi0 = Math.min(15, truncToI8(fround(x0 + 8.5))) & 0xff;
    const xi1 = Math.min(15, truncToI8(fround(x1 + 8.5))) & 0xff;
    out[o + 2 + j] = (xi0 | (xi1 << 4)) & 0xff;
  }
}

const FLT_MAX = fround(3.4028234663852886e38);

function minMax(x: Float32Array, s: number, n: number): [number, number] {
  let min = FLT_MAX, max = -FLT_MAX; // as ggml starts them
  for (let j = 0; j < n; j++) {
    const v = x[s + j];
    if (v < min) min = v;
    if (v > max) max = v;
  }
  return [min, max];
}

function quantQ4_1(x: Float32Array, s: number, out: Uint8Array, o: number): void {
  const [min, max] = minMax(x, s, 32);
  const d = fround(fround(max - min) / 15);
  const id = d ? fround(1 / d) : 0;
  putU16(out, o, floatToHalf(d));
  putU16(out, o + 2, floatToHalf(min));
  for (let j = 0; j < 16; j++) {
    const x0 = fround(fround(x[s + j] - min) * id);
    const x1 = fround(fround(x[s + 16 + j] - min) * id);
    const xi0 = Math.min(15, truncToI8(fround(x0 + 0.5))) & 0xff;
    const xi1 = Math.min(15, truncToI8(fround(x1 + 0.5))) & 0xff;
    out[o + 4 + j] = (xi0 | (xi1 << 4)) & 0xff;
  }
}

function putU32(b: Uint8Array, o: number, v: number): void {
  b[o] = v & 0xff;
  b[o + 1] = (v >>> 8) & 0xff;
  b[o + 2] = (v >>> 16) & 0xff;
  b[o + 3] = (v >>> 24) & 0xff;
}

function quantQ5_0(x: Float32Array, s: number, out: Uint8Array, o: number): void {
  const max = signedAbsMax(x, s, 32);
  const d = fround(max / -16);
  const id = d ? fround(1 / d) : 0;
  putU16(out, o, floatToHalf(d));
  let qh = 0;
  for (let j = 0; j < 16; j++) {
    const x0 = fround(x[s + j] * id);
    const x1 = fround(x[s + 16 + j] * id);
    const xi0 = Math.min(31, truncToI8(fround(x0 + 16.5))) & 0xff;
    const xi1 = Math.min(31, truncToI8(fround(x1 + 16.5))) & 0xff;
    out[o + 6 + j] = (xi0 & 0x0f) | ((xi1 & 0x0f) << 4);
    qh |= ((xi0 & 0x10) >>> 4) << j;
    qh |= ((xi1 & 0x10) >>> 4) << (j + 16);
  }
  putU32(out, o + 2, qh >>> 0);
}

function quantQ5_1(x: Float32Array, s: number, out: Uint8Array, o: number): void {
  const [min, max] = minMax(x, s, 32);
  const d = fround(fround(max - min) / 31);
  const id = d ? fround(1 / d) : 0;
  putU16(out, o, floatToHalf(d));
  putU16(out, o + 2, floatToHalf(min));
  let qh = 0;
  for (let j = 0; j < 16; j++) {
    const x0 = fround(fround(x[s + j] - min) * id);
    const x1 = fround(fround(x[s + 16 + j] - min) * id);
    const xi0 = truncToU8(fround(x0 + 0.5));
    const xi1 = truncToU8(fround(x1 + 0.5));
    out[o + 8 + j] = (xi0 & 0x0f) | ((xi1 & 0x0f) << 4);
    qh |= ((xi0 & 0x10) >>> 4) << j;
    qh |= ((xi1 & 0x10) >>> 4) << (j + 16);
  }
  putU32(out, o + 4, qh >>> 0);
}

/**
 * How activations are rounded to 8 bits. 'x86': llama.cpp's AVX/AVX2/AVX-512 CPU builds (the ones raced here):
 * id = 127/amax, round half to even. 'ref': ggml's portable reference (and model files): id = 1/d, round half away
 * from zero. They differ only where x*id lands on (or one ulp from) a half.
 */
export type ActivationRounding = 'x86' | 'ref';

function absMax(x: Float32Array, s: number, n: number): number {
  let amax = 0;
  for (let j = 0; j < n; j++) amax = Math.max(amax, Math.abs(x[s + j]));
  return amax;
}

/** Quantize one block of 32 to q8_0 bytes (ints into qs at q), returning d (the f32 before f16 rounding). */
function q8Block(x: Float32Array, s: number, out: Uint8Array, q: number, rounding: ActivationRounding): [number, number] {
  const amax = absMax(x, s, 32);
  const d = fround(amax / 127);
  let sum = 0;
  if (rounding === 'ref') {
    const id = d ? fround(1 / d) : 0;
    for (let j = 0; j < 32; j++) {
      const v = roundAway(fround(x[s + j] * id));
      out[q + j] = v & 0xff;
      sum += v;
    }
  } else {
    const id = amax !== 0 ? fround(127 / amax) : 0;
    for (let j = 0; j < 32; j++) {
      const v = Math.max(-128, Math.min(127, roundEven(fround(x[s + j] * id)))); // packs saturate
      out[q + j] = v & 0xff;
      sum += v;
    }
  }
  return [d, sum];
}

function quantQ8_0(x: Float32Array, s: number, out: Uint8Array, o: number, rounding: ActivationRounding): void {
  const [d] = q8Block(x, s, out, o + 2, rounding);
  putU16(out, o, floatToHalf(d));
}

function quantQ8_1(x: Float32Array, s: number, out: Uint8Array, o: number, rounding: ActivationRounding): void {
  const [d, sum] = q8Block(x, s, out, o + 4, rounding);
  putU16(out, o, floatToHalf(d));
  putU16(out, o + 2, floatToHalf(fround(sum * d)));
}

// block_q8_K: f32 d | qs[256] | int16 bsums[16]
function quantQ8K(x: Float32Array, s: number, out: Uint8Array, o: number): void {
  const max = signedAbsMax(x, s, QK_K);
  if (!max) {
    out.fill(0, o, o + 292); // ggml leaves bsums unset here; they are only ever multiplied by d = 0
    return;
  }
  const iscale = fround(-127 / max);
  for (let j = 0; j < QK_K; j++) {
    const v = Math.min(127, nearestInt(fround(iscale * x[s + j])));
    out[o + 4 + j] = v & 0xff;
  }
  for (let j = 0; j < 16; j++) {
    let sum = 0;
    for (let ii = 0; ii < 16; ii++) sum += i8(out[o + 4 + j * 16 + ii]);
    putU16(out, o + 260 + 2 * j, sum & 0xffff);
  }
  putF32(out, o, fround(1 / iscale));
}

// ---- K-quant reference quantizers (ggml quantize_row_q{2,3,4,5,6}_K_ref) ----

function clamp(v: number, lo: number, hi: number): number {
  return v < lo ? lo : v > hi ? hi : v;
}

// Scratch for the K-quant quantizers (single-threaded module, so shared buffers are safe).
const kL = new Int32Array(QK_K);
const kLaux = new Int32Array(32);
const kWeights = new Float32Array(32);
const kScales = new Float32Array(16);
const kMins = new Float32Array(16);

/** ggml make_qkx2_quants: scale and (negated) min of an asymmetric nmax-level group; L gets the levels. */
function makeQkx2Quants(
  n: number, nmax: number, x: Float32Array, xs: number, weights: Float32Array, L: Int32Array, ls: number,
  rmin: number, rdelta: number, nstep: number, useMad: boolean,
): [number, number] {
  let min = x[xs], max = x[xs];
  let sumW = weights[0];
  let sumX = fround(sumW * x[xs]);
  for (let i = 1; i < n; i++) {
    const v = x[xs + i];
    if (v < min) min = v;
    if (v > max) max = v;
    const w = weights[i];
    sumW = fround(sumW + w);
    sumX = fround(sumX + fround(w * v));
  }
  if (min > 0) min = 0;
  if (max === min) {
    for (let i = 0; i < n; i++) L[ls + i] = 0;
    return [0, -min];
  }
  let iscale = fround(nmax / fround(max - min));
  let scale = fround(1 / iscale);
  let bestError = 0;
  for (let i = 0; i < n; i++) {
    const l = clamp(nearestInt(fround(iscale * fround(x[xs + i] - min))), 0, nmax);
    L[ls + i] = l;
    let diff = fround(fround(fround(scale * l) + min) - x[xs + i]);
    diff = useMad ? Math.abs(diff) : fround(diff * diff);
    bestError = fround(bestError + fround(weights[i] * diff));
  }
  if (nstep < 1) return [scale, -min];
  for (let is = 0; is <= nstep; is++) {
    // min moves when a candidate wins, and later candidates are scaled to the new range (as in ggml)
    iscale = fround(fround(fround(rmin + fround(rdelta * is)) + nmax) / fround(max - min));
    let sumL = 0, sumL2 = 0, sumXL = 0;
    for (let i = 0; i < n; i++) {
      const l = clamp(nearestInt(fround(iscale * fround(x[xs + i] - min))), 0, nmax);
      kLaux[i] = l;
      const wl = fround(weights[i] * l);
      sumL = fround(sumL + wl);
      sumL2 = fround(sumL2 + fround(wl * l));
      sumXL = fround(sumXL + fround(wl * x[xs + i]));
    }
    const D = fround(fround(sumW * sumL2) - fround(sumL * sumL));
    if (D > 0) {
      let thisScale = fround(fround(fround(sumW * sumXL) - fround(sumX * sumL)) / D);
      let thisMin = fround(fround(fround(sumL2 * sumX) - fround(sumL * sumXL)) / D);
      if (thisMin > 0) {
        thisMin = 0;
        thisScale = fround(sumXL / sumL2);
      }
      let curError = 0;
      for (let i = 0; i < n; i++) {
        let diff = fround(fround(fround(thisScale * kLaux[i]) + thisMin) - x[xs + i]);
        diff = useMad ? Math.abs(diff) : fround(diff * diff);
        curError = fround(curError + fround(weights[i] * diff));
      }
      if (curError < bestError) {
        for (let i = 0; i < n; i++) L[ls + i] = kLaux[i];
        bestError = curError;
        scale = thisScale;
        min = thisMin;
      }
    }
  }
  return [scale, -min];
}

function quantQ2K(x: Float32Array, s: number, out: Uint8Array, o: number): void {
  const L = kL;
  let maxScale = 0, maxMin = 0;
  for (let j = 0; j < 16; j++) {
    for (let l = 0; l < 16; l++) kWeights[l] = Math.abs(x[s + 16 * j + l]);
    const [scale, min] = makeQkx2Quants(16, 3, x, s + 16 * j, kWeights, L, 16 * j, fround(-0.5), F0_1, 15, true);
    kScales[j] = scale;
    kMins[j] = min;
    if (scale > maxScale) maxScale = scale;
    if (min > maxMin) maxMin = min;
  }
  // scales[16] at o, qs[64] at o+16, d at o+80, dmin at o+82
  if (maxScale > 0) {
    const iscale = fround(15 / maxScale);
    for (let j = 0; j < 16; j++) out[o + j] = nearestInt(fround(iscale * kScales[j])) & 0xff;
    putU16(out, o + 80, floatToHalf(fround(maxScale / 15)));
  } else {
    for (let j = 0; j < 16; j++) out[o + j] = 0;
    putU16(out, o + 80, floatToHalf(0));
  }
  if (maxMin > 0) {
    const iscale = fround(15 / maxMin);
    for (let j = 0; j < 16; j++) out[o + j] = (out[o + j] | (nearestInt(fround(iscale * kMins[j])) << 4)) & 0xff;
    putU16(out, o + 82, floatToHalf(fround(maxMin / 15)));
  } else {
    putU16(out, o + 82, floatToHalf(0));
  }
  const dAll = f16At(out, o + 80), dminAll = f16At(out, o + 82);
  for (let j = 0; j < 16; j++) {
    const d = fround(dAll * (out[o + j] & 0xf));
    if (!d) continue;
    const dm = fround(dminAll * (out[o + j] >> 4));
    for (let ii = 0; ii < 16; ii++) {
      L[16 * j + ii] = clamp(nearestInt(fround(fround(x[s + 16 * j + ii] + dm) / d)), 0, 3);
    }
  }
  for (let j = 0; j < QK_K; j += 128) {
    for (let l = 0; l < 32; l++) {
      out[o + 16 + j / 4 + l] = (L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)) & 0xff;
    }
  }
}

/** ggml make_q3_quants with do_rmse = true: symmetric levels -nmax..nmax-1 (stored +nmax), returns the scale. */
function makeQ3Quants(n: number, nmax: number, x: Float32Array, xs: number, L: Int32Array, ls: number): number {
  let max = 0, amax = 0;
  for (let i = 0; i < n; i++) {
    const ax = Math.abs(x[xs + i]);
    if (ax > amax) {
      amax = ax;
      max = x[xs + i];
    }
  }
  if (amax < GROUP_MAX_EPS) {
    for (let i = 0; i < n; i++) L[ls + i] = 0;
    return 0;
  }
  const iscale = fround(-nmax / max);
  let sumlx = 0, suml2 = 0;
  for (let i = 0; i < n; i++) {
    const v = x[xs + i];
    const l = clamp(nearestInt(fround(iscale * v)), -nmax, nmax - 1);
    L[ls + i] = l;
    const w = fround(v * v);
    sumlx = fround(sumlx + fround(fround(w * v) * l));
    suml2 = fround(suml2 + fround(fround(w * l) * l));
  }
  for (let itry = 0; itry < 5; itry++) {
    let nChanged = 0;
    for (let i = 0; i < n; i++) {
      const v = x[xs + i];
      const w = fround(v * v);
      const li = L[ls + i];
      let slx = fround(sumlx - fround(fround(w * v) * li));
      if (slx > 0) {
        let sl2 = fround(suml2 - fround(fround(w * li) * li));
        const newL = clamp(nearestInt(fround(fround(v * sl2) / slx)), -nmax, nmax - 1);
        if (newL !== li) {
          slx = fround(slx + fround(fround(w * v) * newL));
          sl2 = fround(sl2 + fround(fround(w * newL) * newL));
          if (sl2 > 0 && fround(fround(slx * slx) * suml2) > fround(fround(sumlx * sumlx) * sl2)) {
            L[ls + i] = newL;
            sumlx = slx;
            suml2 = sl2;
            nChanged++;
          }
        }
      }
    }
    if (!nChanged) break;
  }
  for (let i = 0; i < n; i++) L[ls + i] += nmax;
  return suml2 > 0 ? fround(sumlx / suml2) : 0;
}

function quantQ3K(x: Float32Array, s: number, out: Uint8Array, o: number): void {
  const L = kL;
  let maxScale = 0, amax = 0;
  for (let j = 0; j < 16; j++) {
    kScales[j] = makeQ3Quants(16, 4, x, s + 16 * j, L, 16 * j);
    const scale = Math.abs(kScales[j]);
    if (scale > amax) {
      amax = scale;
      maxScale = kScales[j];
    }
  }
  // hmask[32] at o, qs[64] at o+32, scales[12] at o+96, d at o+108
  const sc = o + 96;
  out.fill(0, sc, sc + 12);
  if (maxScale) {
    const iscale = fround(-32 / maxScale);
    for (let j = 0; j < 16; j++) {
      let l = clamp(i8(nearestInt(fround(iscale * kScales[j]))), -32, 31) + 32;
      if (j < 8) out[sc + j] = l & 0xf;
      else out[sc + j - 8] |= (l & 0xf) << 4;
      l >>= 4;
      out[sc + (j % 4) + 8] |= l << (2 * (j >> 2));
    }
    putU16(out, o + 108, floatToHalf(fround(1 / iscale)));
  } else {
    putU16(out, o + 108, floatToHalf(0));
  }
  const dAll = f16At(out, o + 108);
  q3kScales(out, sc, q3Scales);
  for (let j = 0; j < 16; j++) {
    const d = fround(dAll * q3Scales[j]);
    if (!d) continue;
    for (let ii = 0; ii < 16; ii++) {
      L[16 * j + ii] = clamp(nearestInt(fround(x[s + 16 * j + ii] / d)), -4, 3) + 4;
    }
  }
  out.fill(0, o, o + 32);
  let m = 0, hm = 1;
  for (let j = 0; j < QK_K; j++) {
    if (L[j] > 3) {
      out[o + m] |= hm;
      L[j] -= 4;
    }
    if (++m === 32) {
      m = 0;
      hm <<= 1;
    }
  }
  for (let j = 0; j < QK_K; j += 128) {
    for (let l = 0; l < 32; l++) {
      out[o + 32 + j / 4 + l] = (L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)) & 0xff;
    }
  }
}

/** q4_K (five = false) and q5_K (five = true): they share everything but the level count and the bit packing. */
function quantQ45K(x: Float32Array, s: number, out: Uint8Array, o: number, five: boolean): void {
  const L = kL;
  const nmax = five ? 31 : 15;
  let maxScale = 0, maxMin = 0;
  for (let j = 0; j < 8; j++) {
    let sumX2 = 0;
    for (let l = 0; l < 32; l++) sumX2 = fround(sumX2 + fround(x[s + 32 * j + l] * x[s + 32 * j + l]));
    const avX = fround(Math.sqrt(fround(sumX2 / 32)));
    for (let l = 0; l < 32; l++) kWeights[l] = fround(avX + Math.abs(x[s + 32 * j + l]));
    const [scale, min] = five
      ? makeQkx2Quants(32, nmax, x, s + 32 * j, kWeights, L, 32 * j, fround(-0.5), F0_1, 15, false)
      : makeQkx2Quants(32, nmax, x, s + 32 * j, kWeights, L, 32 * j, -1, F0_1, 20, false);
    kScales[j] = scale;
    kMins[j] = min;
    if (scale > maxScale) maxScale = scale;
    if (min > maxMin) maxMin = min;
  }
  // d at o, dmin at o+2, scales[12] at o+4, then (q5_K) qh[32] at o+16 and qs[128] after
  const sc = o + 4;
  const invScale = maxScale > 0 ? fround(63 / maxScale) : 0;
  const invMin = maxMin > 0 ? fround(63 / maxMin) : 0;
  for (let j = 0; j < 8; j++) {
    const ls = Math.min(63, nearestInt(fround(invScale * kScales[j])) & 0xff);
    const lm = Math.min(63, nearestInt(fround(invMin * kMins[j])) & 0xff);
    if (j < 4) {
      out[sc + j] = ls;
      out[sc + j + 4] = lm;
    } else {
      out[sc + j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
      out[sc + j - 4] |= (ls >> 4) << 6;
      out[sc + j] |= (lm >> 4) << 6;
    }
  }
  putU16(out, o, floatToHalf(fround(maxScale / 63)));
  putU16(out, o + 2, floatToHalf(fround(maxMin / 63)));
  const dAll = f16At(out, o), dminAll = f16At(out, o + 2);
  for (let j = 0; j < 8; j++) {
    const [scj, mj] = scaleMinK4(out, sc, j);
    const d = fround(dAll * scj);
    if (!d) continue;
    const dm = fround(dminAll * mj);
    for (let ii = 0; ii < 32; ii++) {
      L[32 * j + ii] = clamp(nearestInt(fround(fround(x[s + 32 * j + ii] + dm) / d)), 0, nmax);
    }
  }
  if (!five) {
    let q = o + 16;
    for (let j = 0; j < QK_K; j += 64, q += 32) {
      for (let l = 0; l < 32; l++) out[q + l] = (L[j + l] | (L[j + l + 32] << 4)) & 0xff;
    }
    return;
  }
  const qh = o + 16;
  let ql = o + 48;
  out.fill(0, qh, qh + 32);
  let m1 = 1, m2 = 2;
  for (let n = 0; n < QK_K; n += 64, ql += 32, m1 <<= 2, m2 <<= 2) {
    for (let j = 0; j < 32; j++) {
      let l1 = L[n + j];
      if (l1 > 15) {
        l1 -= 16;
        out[qh + j] |= m1;
      }
      let l2 = L[n + j + 32];
      if (l2 > 15) {
        l2 -= 16;
        out[qh + j] |= m2;
      }
      out[ql + j] = (l1 | (l2 << 4)) & 0xff;
    }
  }
}

/** ggml make_qx_quants with rmse_type = 1 and no importance weights (what q6_K_ref uses). */
function makeQxQuants(n: number, nmax: number, x: Float32Array, xs: number, L: Int32Array, ls: number): number {
  let max = 0, amax = 0;
  for (let i = 0; i < n; i++) {
    const ax = Math.abs(x[xs + i]);
    if (ax > amax) {
      amax = ax;
      max = x[xs + i];
    }
  }
  if (amax < GROUP_MAX_EPS) {
    for (let i = 0; i < n; i++) L[ls + i] = 0;
    return 0;
  }
  let iscale = fround(-nmax / max);
  let sumlx = 0, suml2 = 0;
  for (let i = 0; i < n; i++) {
    const v = x[xs + i];
    const l = clamp(nearestInt(fround(iscale * v)), -nmax, nmax - 1);
    L[ls + i] = l + nmax;
    const w = fround(v * v);
    sumlx = fround(sumlx + fround(fround(w * v) * l));
    suml2 = fround(suml2 + fround(fround(w * l) * l));
  }
  let scale = suml2 ? fround(sumlx / suml2) : 0;
  let best = fround(scale * sumlx);
  for (let is = -9; is <= 9; is++) {
    if (is === 0) continue;
    iscale = fround(-fround(nmax + fround(F0_1 * is)) / max);
    sumlx = 0;
    suml2 = 0;
    for (let i = 0; i < n; i++) {
      const v = x[xs + i];
      const l = clamp(nearestInt(fround(iscale * v)), -nmax, nmax - 1);
      const w = fround(v * v);
      sumlx = fround(sumlx + fround(fround(w * v) * l));
      suml2 = fround(suml2 + fround(fround(w * l) * l));
    }
    if (suml2 > 0 && fround(sumlx * sumlx) > fround(best * suml2)) {
      for (let i = 0; i < n; i++) L[ls + i] = nmax + clamp(nearestInt(fround(iscale * x[xs + i])), -nmax, nmax - 1);
      scale = fround(sumlx / suml2);
      best = fround(scale * sumlx);
    }
  }
  return scale;
}

function quantQ6K(x: Float32Array, s: number, out: Uint8Array, o: number): void {
  const L = kL;
  let maxScale = 0, maxAbsScale = 0;
  for (let ib = 0; ib < 16; ib++) {
    const scale = makeQxQuants(16, 32, x, s + 16 * ib, L, 16 * ib);
    kScales[ib] = scale;
    const abs = Math.abs(scale);
    if (abs > maxAbsScale) {
      maxAbsScale = abs;
      maxScale = scale;
    }
  }
  // ql[128] at o, qh[64] at o+128, scales[16] at o+192, d at o+208
  if (maxAbsScale < GROUP_MAX_EPS) {
    out.fill(0, o, o + 210);
    return;
  }
  const iscale = fround(-128 / maxScale);
  putU16(out, o + 208, floatToHalf(fround(1 / iscale)));
  for (let ib = 0; ib < 16; ib++) out[o + 192 + ib] = Math.min(127, nearestInt(fround(iscale * kScales[ib]))) & 0xff;
  const dAll = f16At(out, o + 208);
  for (let j = 0; j < 16; j++) {
    const d = fround(dAll * i8(out[o + 192 + j]));
    if (!d) continue;
    for (let ii = 0; ii < 16; ii++) {
      L[16 * j + ii] = clamp(nearestInt(fround(x[s + 16 * j + ii] / d)), -32, 31) + 32;
    }
  }
  let ql = o, qh = o + 128;
  for (let j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
    for (let l = 0; l < 32; l++) {
      const q1 = L[j + l] & 0xf, q2 = L[j + l + 32] & 0xf, q3 = L[j + l + 64] & 0xf, q4 = L[j + l + 96] & 0xf;
      out[ql + l] = q1 | (q3 << 4);
      out[ql + l + 32] = q2 | (q4 << 4);
      out[qh + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6)) & 0xff;
    }
  }
}

/** Convert any tensor (through f32) to `dtype`, same shape; rows are the last dimension. */
export function quantizeTensor(dtype: DType, t: Tensor): Tensor {
  const rowLength = t.shape.length === 0 ? 1 : t.shape[t.shape.length - 1];
  const values = dequantize(t);
  return { dtype, shape: [...t.shape], data: quantize(dtype, values, rowLength) };
}

// ---------------------------------------------------------------------------------------------------------------
// Dot products with llama.cpp's semantics: the activation is first converted to the weight type's vec_dot_type
// (type_traits_cpu in ggml-cpu.c), then multiplied block by block as ggml's generic ggml_vec_dot_* do.
// ---------------------------------------------------------------------------------------------------------------

/** The activation format ggml pairs with each weight type (type_traits_cpu[...].vec_dot_type). */
export function vecDotType(weightDtype: DType): DType {
  switch (weightDtype) {
    case 'f32': case 'f16': case 'bf16': return weightDtype;
    case 'q4_0': case 'q5_0': case 'q8_0': return 'q8_0';
    case 'q4_1': case 'q5_1': return 'q8_1';
    case 'q2_k': case 'q3_k': case 'q4_k': case 'q5_k': case 'q6_k': return 'q8_k';
    default: throw new Error(`no dot product for weights of type ${weightDtype}`);
  }
}

/** An activation vector converted for dot products with one weight type (ggml layout; f32 is a view of x). */
export interface PreparedActivation {
  dtype: DType;
  data: Uint8Array | Float32Array;
  n: number;
}

/**
 * Convert x[offset .. offset+n) to the vec_dot_type of `weightDtype`, as llama.cpp's CPU backend does before a
 * matmul: f16 / bf16 rounding, q8_0 / q8_1 blocks (rounded per `rounding`, default as llama.cpp's x86 builds) or
 * q8_K blocks (ggml's quantize_row_q8_K_ref on every platform).
 */
export function prepareActivation(
  weightDtype: DType,
  x: Float32Array,
  offset: number,
  n: number,
  rounding: ActivationRounding = 'x86',
): PreparedActivation {
  const dtype = vecDotType(weightDtype);
  checkBlocks(`prepareActivation for ${weightDtype}`, weightDtype, n);
  if (!Number.isInteger(offset) || offset < 0 || offset + n > x.length) {
    throw new Error(`prepareActivation: ${n} values at offset ${offset} do not fit in a vector of ${x.length}`);
  }
  if (dtype === 'f32') return { dtype, data: x.subarray(offset, offset + n), n };
  const { blockSize, typeSize } = dtypeInfo(dtype);
  const data = new Uint8Array((n / blockSize) * typeSize);
  if (dtype === 'q8_0') {
    for (let i = 0, o = 0; i < n; i += 32, o += 34) quantQ8_0(x, offset + i, data, o, rounding);
  } else if (dtype === 'q8_1') {
    for (let i = 0, o = 0; i < n; i += 32, o += 36) quantQ8_1(x, offset + i, data, o, rounding);
  } else {
    quantizeInto(dtype, x, offset, n, data, 0);
  }
  return { dtype, data, n };
}

/**
 * Dot product of one weight row (n = act.n elements of `weightDtype` at byte `wByteOffset` of `w`) with a prepared
 * activation, computed as ggml's generic ggml_vec_dot_* do: integer block sums, then float32 scaling in ggml's
 * order (f32 / f16 / bf16: float products summed in double). Returns the float32 result.
 */
export function dotRow(weightDtype: DType, w: Uint8Array, wByteOffset: number, act: PreparedActivation): number {
  const want = vecDotType(weightDtype);
  if (act.dtype !== want) {
    throw new Error(`dotRow: ${weightDtype} weights need a ${want} activation, got ${act.dtype}`);
  }
  const n = act.n;
  checkBlocks(`dotRow ${weightDtype}`, weightDtype, n);
  const { blockSize, typeSize } = dtypeInfo(weightDtype);
  const bytes = (n / blockSize) * typeSize;
  if (!Number.isInteger(wByteOffset) || wByteOffset < 0 || wByteOffset + bytes > w.length) {
    throw new Error(`dotRow ${weightDtype}: row of ${n} needs ${bytes} bytes at offset ${wByteOffset}, have ${w.length}`);
  }
  const a = act.data;
  const actInfo = dtypeInfo(act.dtype);
  const actBytes = (n / actInfo.blockSize) * actInfo.typeSize;
  if (act.dtype === 'f32' ? !(a instanceof Float32Array) || a.length < n : !(a instanceof Uint8Array) || a.length < actBytes) {
    const need = act.dtype === 'f32' ? `a Float32Array of ${n}` : `a Uint8Array of ${actBytes} bytes`;
    throw new Error(`dotRow: a ${act.dtype} activation of ${n} elements needs ${need}, got ${a.constructor.name} of ${a.length}`);
  }
  if (a instanceof Float32Array) {
    const wf = f32View(w, wByteOffset, n);
    let sum = 0;
    for (let i = 0; i < n; i++) sum += fround(wf[i] * a[i]);
    return fround(sum);
  }
  const ab = a;
  const ai = new Int8Array(ab.buffer, ab.byteOffset, ab.length); // the activation's int8 quants
  const nb = n / blockSize;
  switch (weightDtype) {
    case 'f16': {
      let sum = 0;
      for (let i = 0, o = wByteOffset; i < n; i++, o += 2) sum += fround(f16At(w, o) * f16At(ab, 2 * i));
      return fround(sum);
    }
    case 'bf16': {
      let sum = 0;
      for (let i = 0, o = wByteOffset; i < n; i++, o += 2) {
        sum += fround(bf16ToFloat(w[o] | (w[o + 1] << 8)) * bf16ToFloat(ab[2 * i] | (ab[2 * i + 1] << 8)));
      }
      return fround(sum);
    }
    case 'q4_0': {
      let sumf = 0;
      for (let ib = 0, o = wByteOffset, p = 0; ib < nb; ib++, o += 18, p += 34) {
        let sumi = 0;
        for (let j = 0; j < 16; j++) {
          const q = w[o + 2 + j];
          sumi += ((q & 0x0f) - 8) * ai[p + 2 + j] + ((q >> 4) - 8) * ai[p + 18 + j];
        }
        sumf = fround(sumf + fround(fround(sumi * f16At(w, o)) * f16At(ab, p)));
      }
      return sumf;
    }
    case 'q4_1': {
      let sumf = 0;
      for (let ib = 0, o = wByteOffset, p = 0; ib < nb; ib++, o += 20, p += 36) {
        let sumi = 0;
        for (let j = 0; j < 16; j++) {
          const q = w[o + 4 + j];
          sumi += (q & 0x0f) * ai[p + 4 + j] + (q >> 4) * ai[p + 20 + j];
        }
        const dd = fround(f16At(w, o) * f16At(ab, p));
        sumf = fround(sumf + fround(fround(dd * sumi) + fround(f16At(w, o + 2) * f16At(ab, p + 2))));
      }
      return sumf;
    }
    case 'q5_0': {
      let sumf = 0;
      for (let ib = 0, o = wByteOffset, p = 0; ib < nb; ib++, o += 22, p += 34) {
        const qh = u32At(w, o + 2);
        let sumi = 0;
        for (let j = 0; j < 16; j++) {
          const q = w[o + 6 + j];
          const x0 = ((q & 0x0f) | (((qh >>> j) << 4) & 0x10)) - 16;
          const x1 = ((q >> 4) | ((qh >>> (j + 12)) & 0x10)) - 16;
          sumi += x0 * ai[p + 2 + j] + x1 * ai[p + 18 + j];
        }
        sumf = fround(sumf + fround(fround(f16At(w, o) * f16At(ab, p)) * sumi));
      }
      return sumf;
    }
    case 'q5_1': {
      let sumf = 0;
      for (let ib = 0, o = wByteOffset, p = 0; ib < nb; ib++, o += 24, p += 36) {
        const qh = u32At(w, o + 4);
        let sumi = 0;
        for (let j = 0; j < 16; j++) {
          const q = w[o + 8 + j];
          const x0 = (q & 0x0f) | (((qh >>> j) << 4) & 0x10);
          const x1 = (q >> 4) | ((qh >>> (j + 12)) & 0x10);
          sumi += x0 * ai[p + 4 + j] + x1 * ai[p + 20 + j];
        }
        const dd = fround(f16At(w, o) * f16At(ab, p));
        sumf = fround(sumf + fround(fround(dd * sumi) + fround(f16At(w, o + 2) * f16At(ab, p + 2))));
      }
      return sumf;
    }
    case 'q8_0': {
      const wi = new Int8Array(w.buffer, w.byteOffset, w.length);
      let sumf = 0;
      for (let ib = 0, o = wByteOffset, p = 0; ib < nb; ib++, o += 34, p += 34) {
        let sumi = 0;
        for (let j = 0; j < 32; j++) sumi += wi[o + 2 + j] * ai[p + 2 + j];
        sumf = fround(sumf + fround(sumi * fround(f16At(w, o) * f16At(ab, p))));
      }
      return sumf;
    }
    case 'q2_k': return dotQ2K(w, wByteOffset, ab, nb);
    case 'q3_k': return dotQ3K(w, wByteOffset, ab, nb);
    case 'q4_k': return dotQ45K(w, wByteOffset, ab, nb, false);
    case 'q5_k': return dotQ45K(w, wByteOffset, ab, nb, true);
    case 'q6_k': return dotQ6K(w, wByteOffset, ab, nb);
    default: throw new Error(`dotRow: no dot product for ${weightDtype}`);
  }
}

// q8_K activation block: f32 d at 0, qs at 4, int16 bsums at 260.
function bsum(a: Uint8Array, p: number, j: number): number {
  return ((a[p + 260 + 2 * j] | (a[p + 261 + 2 * j] << 8)) << 16) >> 16;
}

function dotQ2K(w: Uint8Array, o: number, a: Uint8Array, nb: number): number {
  let sumf = 0;
  for (let i = 0, p = 0; i < nb; i++, o += 84, p += 292) {
    let summs = 0;
    for (let j = 0; j < 16; j++) summs += bsum(a, p, j) * (w[o + j] >> 4);
    const yd = f32At(a, p);
    const dall = fround(yd * f16At(w, o + 80));
    const dmin = fround(yd * f16At(w, o + 82));
    let isum = 0, is = 0;
    let q2 = o + 16, q8 = p + 4;
    for (let k = 0; k < 2; k++, q2 += 32) {
      for (let shift = 0; shift < 8; shift += 2, q8 += 32) {
        let d = w[o + is++] & 0xf;
        let isuml = 0;
        for (let l = 0; l < 16; l++) isuml += i8(a[q8 + l]) * ((w[q2 + l] >> shift) & 3);
        isum += d * isuml;
        d = w[o + is++] & 0xf;
        isuml = 0;
        for (let l = 16; l < 32; l++) isuml += i8(a[q8 + l]) * ((w[q2 + l] >> shift) & 3);
        isum += d * isuml;
      }
    }
    sumf = fround(sumf + fround(fround(dall * isum) - fround(dmin * summs)));
  }
  return sumf;
}

// The generic K-quant dots keep 8 float lane sums (sums[l] += d * aux32[l]) and add them to sumf at the end.
const lanes = new Float64Array(8);
const aux32 = new Int32Array(8);
const aux8 = new Int32Array(QK_K);

/** Shared tail of the q3_K..q6_K generic dots: aux32[l] += scale * q8[k] * a[k] over groups of 16 or 32. */
function laneAccumulate(a: Uint8Array, q8: number, scales: ArrayLike<number>, group: number): void {
  aux32.fill(0);
  for (let k = 0; k < QK_K; k++) {
    aux32[k & 7] += scales[(k / group) | 0] * (i8(a[q8 + k]) * aux8[k]);
  }
}

function finishLanes(sumf: number): number {
  for (let l = 0; l < 8; l++) sumf = fround(sumf + lanes[l]);
  return sumf;
}

function addLanes(d: number): void {
  for (let l = 0; l < 8; l++) lanes[l] = fround(lanes[l] + fround(d * fround(aux32[l])));
}

function dotQ3K(w: Uint8Array, o: number, a: Uint8Array, nb: number): number {
  lanes.fill(0);
  for (let i = 0, p = 0; i < nb; i++, o += 110, p += 292) {
    let q3 = o + 32;
    let k = 0;
    let m = 1;
    for (let j = 0; j < QK_K; j += 128, q3 += 32) {
      for (let shift = 0; shift < 8; shift += 2, m <<= 1) {
        for (let l = 0; l < 32; l++) aux8[k++] = ((w[q3 + l] >> shift) & 3) - (w[o + l] & m ? 0 : 4);
      }
    }
    q3kScales(w, o + 96, q3Scales);
    laneAccumulate(a, p + 4, q3Scales, 16);
    addLanes(fround(f16At(w, o + 108) * f32At(a, p)));
  }
  return finishLanes(0);
}

const k4Scales = new Int32Array(8);

function dotQ45K(w: Uint8Array, o: number, a: Uint8Array, nb: number, five: boolean): number {
  lanes.fill(0);
  let sumf = 0;
  const size = five ? 176 : 144;
  for (let i = 0, p = 0; i < nb; i++, o += size, p += 292) {
    const qs = o + (five ? 48 : 16);
    const qh = o + 16;
    let k = 0;
    let m = 1;
    for (let j = 0; j < 4; j++) {
      for (let l = 0; l < 32; l++) aux8[k++] = (w[qs + 32 * j + l] & 0xf) + (five && w[qh + l] & m ? 16 : 0);
      m <<= 1;
      for (let l = 0; l < 32; l++) aux8[k++] = (w[qs + 32 * j + l] >> 4) + (five && w[qh + l] & m ? 16 : 0);
      m <<= 1;
    }
    let sumi = 0;
    for (let j = 0; j < 8; j++) {
      const [sc, mn] = scaleMinK4(w, o + 4, j);
      k4Scales[j] = sc;
      sumi += (bsum(a, p, 2 * j) + bsum(a, p, 2 * j + 1)) * mn;
    }
    laneAccumulate(a, p + 4, k4Scales, 32);
    const yd = f32At(a, p);
    addLanes(fround(f16At(w, o) * yd));
    const dmin = fround(f16At(w, o + 2) * yd);
    sumf = fround(sumf - fround(dmin * sumi));
  }
  return finishLanes(sumf);
}

const q6Scales = new Int32Array(16);

function dotQ6K(w: Uint8Array, o: number, a: Uint8Array, nb: number): number {
  lanes.fill(0);
  for (let i = 0, p = 0; i < nb; i++, o += 210, p += 292) {
    let ql = o, qh = o + 128;
    let k = 0;
    for (let j = 0; j < QK_K; j += 128, ql += 64, qh += 32, k += 128) {
      for (let l = 0; l < 32; l++) {
        const h = w[qh + l];
        aux8[k + l] = ((w[ql + l] & 0xf) | ((h & 3) << 4)) - 32;
        aux8[k + l + 32] = ((w[ql + l + 32] & 0xf) | (((h >> 2) & 3) << 4)) - 32;
        aux8[k + l + 64] = ((w[ql + l] >> 4) | (((h >> 4) & 3) << 4)) - 32;
        aux8[k + l + 96] = ((w[ql + l + 32] >> 4) | (((h >> 6) & 3) << 4)) - 32;
      }
    }
    for (let j = 0; j < 16; j++) q6Scales[j] = i8(w[o + 192 + j]);
    laneAccumulate(a, p + 4, q6Scales, 16);
    addLanes(fround(f16At(w, o + 208) * f32At(a, p)));
  }
  return finishLanes(0);
}
