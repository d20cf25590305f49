// AVX2 (+FMA, F16C) quantized matrix products and the AVX q8_0 / q8_1 activation quantizer (llama.cpp's
// quantize_row_q8_0 / q8_1 for x86, whose rounding the whole backend follows). Compiled for any x86-64; called only
// when moe_cpu() reports the features.
//
// Kernels read ggml's block layouts directly (AVX2 unpacks blocks in element order). Each weight block is unpacked
// once and multiplied with up to RA activation rows (register tiling for prefill); R = 1 is a plain GEMV.
// Integer block sums are exact (maddubs never saturates for these ranges), as in ggml.
#include "quant_impl.h"

#if MOE_X86

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c")
#endif
#include <immintrin.h>

#define AI static inline __attribute__((always_inline))
#define MAXA 4

#if defined(__clang__)
#define UNROLL _Pragma("clang loop unroll(full)")
#else
#define UNROLL _Pragma("GCC unroll 16")
#endif

// ---------------------------------------------------------------------------------------------------------------
// Activation quantization (llama.cpp ggml-cpu/arch/x86/quants.c, AVX2 branch)
// ---------------------------------------------------------------------------------------------------------------

static inline uint16_t f2h_hw(float f) { return (uint16_t)_cvtss_sh(f, 0); } // round to nearest even

/** One block: d, and the 32 quants (round half to even, packs saturate). Returns the 8 int32 partial sums. */
AI __m256i q8_block(const float *x, float *d_out, int8_t *qs) {
  __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8), v2 = _mm256_loadu_ps(x + 16),
         v3 = _mm256_loadu_ps(x + 24);
  const __m256 signBit = _mm256_set1_ps(-0.0f);
  __m256 maxAbs = _mm256_andnot_ps(signBit, v0);
  maxAbs = _mm256_max_ps(maxAbs, _mm256_andnot_ps(signBit, v1));
  maxAbs = _mm256_max_ps(maxAbs, _mm256_andnot_ps(signBit, v2));
  maxAbs = _mm256_max_ps(maxAbs, _mm256_andnot_ps(signBit, v3));
  __m128 max4 = _mm_max_ps(_mm256_extractf128_ps(maxAbs, 1), _mm256_castps256_ps128(maxAbs));
  max4 = _mm_max_ps(max4, _mm_movehl_ps(max4, max4));
  max4 = _mm_max_ss(max4, _mm_movehdup_ps(max4));
  const float maxScalar = _mm_cvtss_f32(max4);
  *d_out = maxScalar / 127.f;
  const float id = (maxScalar != 0.0f) ? 127.f / maxScalar : 0.0f;
  const __m256 mul = _mm256_set1_ps(id);
  v0 = _mm256_round_ps(_mm256_mul_ps(v0, mul), _MM_ROUND_NEAREST);
  v1 = _mm256_round_ps(_mm256_mul_ps(v1, mul), _MM_ROUND_NEAREST);
  v2 = _mm256_round_ps(_mm256_mul_ps(v2, mul), _MM_ROUND_NEAREST);
  v3 = _mm256_round_ps(_mm256_mul_ps(v3, mul), _MM_ROUND_NEAREST);
  __m256i i0 = _mm256_cvtps_epi32(v0), i1 = _mm256_cvtps_epi32(v1), i2 = _mm256_cvtps_epi32(v2),
          i3 = _mm256_cvtps_epi32(v3);
  const __m256i sums = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
  i0 = _mm256_packs_epi32(i0, i1);
  i2 = _mm256_packs_epi32(i2, i3);
  i0 = _mm256_packs_epi16(i0, i2);
  i0 = _mm256_permutevar8x32_epi32(i0, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256((__m256i *)qs, i0);
  return sums;
}

static int hsum_i32_8(const __m256i a) {
  const __m128i sum128 = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extractf128_si256(a, 1));
  const __m128i hi64 = _mm_unpackhi_epi64(sum128, sum128);
  const __m128i sum64 = _mm_add_epi32(hi64, sum128);
  const __m128i hi32 = _mm_shuffle_epi32(sum64, _MM_SHUFFLE(2, 3, 0, 1));
  return _mm_cvtsi128_si32(_mm_add_epi32(sum64, hi32));
}

void moe_quantize_q8_0_avx2(const float *x, uint8_t *out, int n) {
  for (int i = 0; i < n / QK; i++, x += QK, out += B_Q8_0) {
    float d;
    q8_block(x, &d, (int8_t *)(out + 2));
    const uint16_t h = f2h_hw(d);
    memcpy(out, &h, 2);
  }
}

void moe_quantize_q8_1_avx2(const float *x, uint8_t *out, int n) {
  for (int i = 0; i < n / QK; i++, x += QK, out += B_Q8_1) {
    float d;
    const int sum = hsum_i32_8(q8_block(x, &d, (int8_t *)(out + 4)));
    const uint16_t h = f2h_hw(d), s = f2h_hw(d * (float)sum);
    memcpy(out, &h, 2);
    memcpy(out + 2, &s, 2);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------

AI float h2f(const uint8_t *p) { return _cvtsh_ss(rd16(p)); }

static float hsum_f8(const __m256 x) {
  __m128 res = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
  res = _mm_add_ps(res, _mm_movehl_ps(res, res));
  res = _mm_add_ss(res, _mm_movehdup_ps(res));
  return _mm_cvtss_f32(res);
}

/** 32 nibbles -> 32 bytes in element order (low nibbles are elements 0..15, high nibbles 16..31). */
AI __m256i nibbles32(const uint8_t *p) {
  const __m128i t = _mm_loadu_si128((const __m128i *)p);
  return _mm256_and_si256(_mm256_set1_epi8(0x0F), _mm256_inserti128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1));
}

/** 32 bits -> 32 bytes {0x00, 0xFF}. */
AI __m256i bytes_from_bits_32(const uint8_t *x) {
  const uint32_t x32 = rd32(x);
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x32), shuf);
  bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

/** Signed x times signed y, summed in 4s to int32 (the sign trick: |x| * (y signed like x)). */
AI __m256i dot_i8(const __m256i x, const __m256i y) {
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/** Unsigned x times signed y, summed in 4s to int32. */
AI __m256i dot_u8(const __m256i x, const __m256i y) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1));
}

// ---------------------------------------------------------------------------------------------------------------
// Blocks of 32 (q4_0, q4_1, q5_0, q5_1, q8_0): one weight row x RA activation rows
// ---------------------------------------------------------------------------------------------------------------

AI void row32(const int wtype, const int RA, int nb, const uint8_t *x, const uint8_t *act, size_t arb, float *out,
              int ldo) {
  const int q81 = wtype == MOE_Q4_1 || wtype == MOE_Q5_1;
  const int bs = wtype == MOE_Q4_0 ? B_Q4_0 : wtype == MOE_Q4_1 ? B_Q4_1 : wtype == MOE_Q5_0 ? B_Q5_0
               : wtype == MOE_Q5_1 ? B_Q5_1 : B_Q8_0;
  const int abs_ = q81 ? B_Q8_1 : B_Q8_0, aqo = q81 ? 4 : 2;
  __m256 acc[MAXA];
  float summs[MAXA];
  UNROLL for (int r = 0; r < RA; r++) acc[r] = _mm256_setzero_ps(), summs[r] = 0;
  for (int ib = 0; ib < nb; ib++, x += bs) {
    __m256i qx;
    switch (wtype) {
      case MOE_Q4_0: qx = _mm256_sub_epi8(nibbles32(x + 2), _mm256_set1_epi8(8)); break;
      case MOE_Q4_1: qx = nibbles32(x + 4); break;
      case MOE_Q5_0: {
        const __m256i hi = _mm256_andnot_si256(bytes_from_bits_32(x + 2), _mm256_set1_epi8((char)0xF0));
        qx = _mm256_or_si256(nibbles32(x + 6), hi); // q - 16: the high nibble is all ones where the 5th bit is clear
        break;
      }
      case MOE_Q5_1: {
        const __m256i hi = _mm256_and_si256(bytes_from_bits_32(x + 4), _mm256_set1_epi8(0x10));
        qx = _mm256_or_si256(nibbles32(x + 8), hi);
        break;
      }
      default: qx = _mm256_loadu_si256((const __m256i *)(x + 2)); break;
    }
    const float dx = h2f(x);
    const float mx = q81 ? h2f(x + 2) : 0.0f;
    UNROLL for (int r = 0; r < RA; r++) {
      const uint8_t *y = act + (size_t)r * arb + (size_t)ib * abs_;
      const __m256i qy = _mm256_loadu_si256((const __m256i *)(y + aqo));
      const __m256i isum = q81 ? dot_u8(qx, qy) : dot_i8(qx, qy);
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dx * h2f(y)), _mm256_cvtepi32_ps(isum), acc[r]);
      if (q81) summs[r] += mx * h2f(y + 2);
    }
  }
  UNROLL for (int r = 0; r < RA; r++) out[(size_t)r * ldo] = hsum_f8(acc[r]) + summs[r];
}

// ---------------------------------------------------------------------------------------------------------------
// K-quants: one weight row x RA activation rows; each 32-quant chunk's int16 products are scaled with madd
// ---------------------------------------------------------------------------------------------------------------

AI __m256i sc2(int a, int b) { // int16 pattern: 8 lanes a, 8 lanes b (two sub-blocks of 16)
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16((short)a)), _mm_set1_epi16((short)b), 1);
}

AI void rowK(const int wtype, const int RA, int nsb, const uint8_t *x, const uint8_t *act, size_t arb, float *out,
             int ldo) {
  const int bs = wtype == MOE_Q2_K ? B_Q2_K : wtype == MOE_Q3_K ? B_Q3_K : wtype == MOE_Q4_K ? B_Q4_K
               : wtype == MOE_Q5_K ? B_Q5_K : B_Q6_K;
  __m256 acc[MAXA];
  UNROLL for (int r = 0; r < RA; r++) acc[r] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3);
  for (int s = 0; s < nsb; s++, x += bs) {
    __m256i isum[MAXA], msum[MAXA];
    UNROLL for (int r = 0; r < RA; r++) isum[r] = _mm256_setzero_si256(), msum[r] = _mm256_setzero_si256();
    const uint8_t *ya[MAXA];
    UNROLL for (int r = 0; r < RA; r++) ya[r] = act + (size_t)r * arb + (size_t)s * B_Q8_K;
    float d, dmin = 0;
    // 8 chunks of 32 quants (element order); sc: the chunk's int16 scale pattern
#define CHUNK(c, Q, SC)                                                                                             \
  UNROLL for (int r = 0; r < RA; r++) {                                                                             \
    const __m256i qy = _mm256_loadu_si256((const __m256i *)(ya[r] + 4 + 32 * (c)));                               \
    isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(_mm256_maddubs_epi16((Q), qy), (SC)));                  \
  }
    if (wtype == MOE_Q4_K || wtype == MOE_Q5_K) {
      d = h2f(x);
      dmin = h2f(x + 2);
      uint8_t sm[16];
      moe_k4_scales(x + 4, sm);
      const uint8_t *qs = x + (wtype == MOE_Q5_K ? 48 : 16);
      const __m256i qh = wtype == MOE_Q5_K ? _mm256_loadu_si256((const __m256i *)(x + 16)) : _mm256_setzero_si256();
      UNROLL for (int j = 0; j < 4; j++) {
        const __m256i q4 = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
        __m256i lo = _mm256_and_si256(q4, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
        if (wtype == MOE_Q5_K) {
          const __m256i b0 = _mm256_set1_epi8((char)(1 << (2 * j))), b1 = _mm256_set1_epi8((char)(2 << (2 * j)));
          lo = _mm256_add_epi8(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b0), b0), _mm256_set1_epi8(16)));
          hi = _mm256_add_epi8(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b1), b1), _mm256_set1_epi8(16)));
        }
        const __m256i s0 = _mm256_set1_epi16(sm[2 * j]), s1 = _mm256_set1_epi16(sm[2 * j + 1]);
        CHUNK(2 * j, lo, s0)
        CHUNK(2 * j + 1, hi, s1)
      }
      const __m128i mins = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(sm + 8)));
      UNROLL for (int r = 0; r < RA; r++) { // sums of 32 from the 16 sums of 16
        const __m256i bs16 = _mm256_loadu_si256((const __m256i *)(ya[r] + 260));
        const __m128i b32 = _mm_hadd_epi16(_mm256_castsi256_si128(bs16), _mm256_extracti128_si256(bs16, 1));
        msum[r] = _mm256_castsi128_si256(_mm_madd_epi16(mins, b32));
      }
    } else if (wtype == MOE_Q6_K) {
      d = h2f(x + 208);
      const int8_t *sc = (const int8_t *)(x + 192);
      UNROLL for (int h = 0; h < 2; h++) {
        const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(x + 64 * h));
        const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(x + 64 * h + 32));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(x + 128 + 32 * h));
        const __m256i q0 = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4));
        const __m256i q1 = _mm256_or_si256(_mm256_and_si256(ql1, m4),
                                           _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(12)), 2));
        const __m256i q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                                           _mm256_and_si256(qh, _mm256_set1_epi8(48)));
        const __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                           _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8((char)0xC0)), 2));
        const int o = 8 * h;
        CHUNK(4 * h + 0, q0, sc2(sc[o + 0], sc[o + 1]))
        CHUNK(4 * h + 1, q1, sc2(sc[o + 2], sc[o + 3]))
        CHUNK(4 * h + 2, q2, sc2(sc[o + 4], sc[o + 5]))
        CHUNK(4 * h + 3, q3, sc2(sc[o + 6], sc[o + 7]))
      }
      // quants are stored + 32: subtract 32 * sum_j scale_j * bsum_j
      const __m256i sc32 = _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc)), 5);
      UNROLL for (int r = 0; r < RA; r++)
        isum[r] = _mm256_sub_epi32(isum[r], _mm256_madd_epi16(sc32, _mm256_loadu_si256((const __m256i *)(ya[r] + 260))));
    } else { // q2_K, q3_K: 2-bit planes; q3_K adds a high bit (values stored + 4)
      const int q3 = wtype == MOE_Q3_K;
      int8_t sc[16];
      if (q3) {
        d = h2f(x + 108);
        moe_q3k_scales(x + 96, sc);
      } else {
        d = h2f(x + 80);
        dmin = h2f(x + 82);
        for (int j = 0; j < 16; j++) sc[j] = (int8_t)(x[j] & 0xF);
      }
      const uint8_t *qs = x + (q3 ? 32 : 16);
      const __m256i hm = q3 ? _mm256_loadu_si256((const __m256i *)x) : _mm256_setzero_si256();
      UNROLL for (int h = 0; h < 2; h++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * h));
        UNROLL for (int sh = 0; sh < 4; sh++) {
          __m256i v = _mm256_and_si256(_mm256_srli_epi16(q, 2 * sh), m3);
          if (q3) {
            const __m256i bit = _mm256_set1_epi8((char)(1 << (4 * h + sh)));
            v = _mm256_add_epi8(v, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit), _mm256_set1_epi8(4)));
          }
          const int is = 8 * h + 2 * sh;
          CHUNK(4 * h + sh, v, sc2(sc[is], sc[is + 1]))
        }
      }
      if (q3) {
        const __m256i sc4 = _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc)), 2);
        UNROLL for (int r = 0; r < RA; r++)
          isum[r] = _mm256_sub_epi32(isum[r], _mm256_madd_epi16(sc4, _mm256_loadu_si256((const __m256i *)(ya[r] + 260))));
      } else {
        const __m256i mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(_mm_loadu_si128((const __m128i *)x), 4), _mm_set1_epi8(0x0F)));
        UNROLL for (int r = 0; r < RA; r++) msum[r] = _mm256_madd_epi16(mins, _mm256_loadu_si256((const __m256i *)(ya[r] + 260)));
      }
    }
#undef CHUNK
    UNROLL for (int r = 0; r < RA; r++) {
      const float da = rdf32(ya[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * da), _mm256_cvtepi32_ps(isum[r]), acc[r]);
      if (wtype != MOE_Q3_K && wtype != MOE_Q6_K)
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(-(dmin * da)), _mm256_cvtepi32_ps(msum[r]), acc[r]);
    }
  }
  UNROLL for (int r = 0; r < RA; r++) out[(size_t)r * ldo] = hsum_f8(acc[r]);
}

#define ROW_FN(NAME, BODY, T)                                                                                       \
  static void NAME(int RA, int nb, const uint8_t *x, const uint8_t *act, size_t arb, float *out, int ldo) {       \
    switch (RA) {                                                                                                   \
      case 1: BODY(T, 1, nb, x, act, arb, out, ldo); break;                                                         \
      case 2: BODY(T, 2, nb, x, act, arb, out, ldo); break;                                                         \
      case 3: BODY(T, 3, nb, x, act, arb, out, ldo); break;                                                         \
      default: BODY(T, 4, nb, x, act, arb, out, ldo); break;                                                        \
    }                                                                                                               \
  }
ROW_FN(row_q4_0, row32, MOE_Q4_0)
ROW_FN(row_q4_1, row32, MOE_Q4_1)
ROW_FN(row_q5_0, row32, MOE_Q5_0)
ROW_FN(row_q5_1, row32, MOE_Q5_1)
ROW_FN(row_q8_0, row32, MOE_Q8_0)
ROW_FN(row_q2_K, rowK, MOE_Q2_K)
ROW_FN(row_q3_K, rowK, MOE_Q3_K)
ROW_FN(row_q4_K, rowK, MOE_Q4_K)
ROW_FN(row_q5_K, rowK, MOE_Q5_K)
ROW_FN(row_q6_K, rowK, MOE_Q6_K)

int moe_gemm_avx2_supports(int wtype) {
  switch (wtype) {
    case MOE_Q4_0: case MOE_Q4_1: case MOE_Q5_0: case MOE_Q5_1: case MOE_Q8_0:
    case MOE_Q2_K: case MOE_Q3_K: case MOE_Q4_K: case MOE_Q5_K: case MOE_Q6_K: return 1;
    default: return 0;
  }
}

int moe_gemm_avx2(int wtype, int n, const uint8_t *w, size_t wrb, const uint8_t *act, size_t arb, int R, int j0,
                  int j1, float *out, int ldo) {
  void (*fn)(int, int, const uint8_t *, const uint8_t *, size_t, float *, int);
  int nb = n / QK;
  switch (wtype) {
    case MOE_Q4_0: fn = row_q4_0; break;
    case MOE_Q4_1: fn = row_q4_1; break;
    case MOE_Q5_0: fn = row_q5_0; break;
    case MOE_Q5_1: fn = row_q5_1; break;
    case MOE_Q8_0: fn = row_q8_0; break;
    case MOE_Q2_K: fn = row_q2_K, nb = n / QKK; break;
    case MOE_Q3_K: fn = row_q3_K, nb = n / QKK; break;
    case MOE_Q4_K: fn = row_q4_K, nb = n / QKK; break;
    case MOE_Q5_K: fn = row_q5_K, nb = n / QKK; break;
    case MOE_Q6_K: fn = row_q6_K, nb = n / QKK; break;
    default: return 0;
  }
  // Activation rows in groups of MAXA (kept in L1/L2), each group against all weight rows.
  for (int r = 0; r < R; r += MAXA) {
    const int ra = R - r < MAXA ? R - r : MAXA;
    for (int j = j0; j < j1; j++)
      fn(ra, nb, w + (size_t)j * wrb, act + (size_t)r * arb, arb, out + (size_t)r * ldo + j, ldo);
  }
  return 1;
}

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif // MOE_X86
