// IEEE half and bfloat16 conversions, bit-exact with ggml (round to nearest even).

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

// Lookup table: all 65536 halves to f32 (256 KiB), built once on first use.
let halfTable: Float32Array | undefined;

function buildHalfTable(): Float32Array {
  const t = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const mant = h & 0x3ff;
    let v: number;
    if (exp === 0) v = sign * mant * 2 ** -24;
    else if (exp === 31) v = mant ? NaN : sign * Infinity;
    else v = sign * (1 + mant / 1024) * 2 ** (exp - 15);
    t[h] = v;
  }
  return t;
}

export function halfToFloat(h: number): number {
  return (halfTable ??= buildHalfTable())[h & 0xffff];
}

export function halfTableF32(): Float32Array {
  return (halfTable ??= buildHalfTable());
}

/** f32 -> f16 bits, round to nearest even (as ggml's GGML_FP32_TO_FP16 / F16C do). */
export function floatToHalf(v: number): number {
  f32[0] = v;
  const x = u32[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0); // inf / nan
  let e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00; // overflow -> inf
  if (e <= 0) {
    // subnormal half (or zero)
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let hm = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && hm & 1)) hm++;
    return sign | hm;
  }
  let hm = mant >>> 13;
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && hm & 1)) {
    hm++;
    if (hm === 0x400) {
      hm = 0;
      e++;
      if (e >= 31) return sign | 0x7c00;
    }
  }
  return sign | (e << 10) | hm;
}

/** Round a value through f16 and back. */
export function roundF16(v: number): number {
  return halfToFloat(floatToHalf(v));
}

export function bf16ToFloat(b: number): number {
  u32[0] = (b & 0xffff) << 16;
  return f32[0];
}

/** f32 -> bf16 bits, round to nearest even; NaN stays a quiet NaN (as ggml_compute_fp32_to_bf16). */
export function floatToBf16(v: number): number {
  f32[0] = v;
  const x = u32[0];
  if ((x & 0x7fffffff) > 0x7f800000) return ((x >>> 16) | 64) & 0xffff;
  return ((x + (0x7fff + ((x >>> 16) & 1))) >>> 16) & 0xffff;
}
