// Horizontal sums of AVX-512 float vectors for the x86 kernel files (include after their target pragma).
//
// One fixed pairing, GCC's _mm512_reduce_add_ps written out so that every compiler gives the same bits: lanes i and
// i + 8, then i and i + 4, then 0 + 2 and 1 + 3, then 0 + 1. hsum16_many sums up to 16 vectors with exactly those
// additions while transposing them into one vector, so an output's value is the same whether its vector was reduced
// alone or with 15 others. A matrix-vector product reduces every output row: done one at a time, the reduction's
// chain of dependent shuffles and adds per row is most of the work for a short row (measured on Zen 5, f16 and q4_0
// rows of 1024 from L2, one thread); batched, it is 30 shuffles and adds per 16 rows with no long chain.
#pragma once
#include <immintrin.h>

static inline __attribute__((always_inline)) float hsum16(__m512 v) {
  const __m256 s8 = _mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)), _mm512_castps512_ps256(v));
  const __m128 s4 = _mm_add_ps(_mm256_extractf128_ps(s8, 1), _mm256_castps256_ps128(s8));
  const __m128 s2 = _mm_add_ps(s4, _mm_shuffle_ps(s4, s4, _MM_SHUFFLE(1, 0, 3, 2))); // lanes 0 + 2, 1 + 3
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));                      // 0 + 1
}

/** out[r] = hsum16(v[r]) for r < n (n <= 16; v[n..15] are read but their sums are not stored). */
static inline __attribute__((always_inline)) void hsum16_many(const __m512 v[16], float *out, int n) {
  __m512 t[8], u[4], w[2];
  // Lanes i + 8 and i: rows 2p and 2p + 1 side by side (8 lanes each).
  for (int p = 0; p < 8; p++)
    t[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)),
                         _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)));
  // Lanes i + 4 and i: one row per 128-bit quarter (rows 4p .. 4p + 3).
  for (int p = 0; p < 4; p++)
    u[p] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * p], t[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)),
                         _mm512_shuffle_f32x4(t[2 * p], t[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)));
  // 0 + 2 and 1 + 3 within each quarter: quarter q holds rows 8p + q (lanes 0, 1) and 8p + 4 + q (lanes 2, 3).
  for (int p = 0; p < 2; p++)
    w[p] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * p], u[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)),
                         _mm512_shuffle_ps(u[2 * p], u[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)));
  // 0 + 1: quarter q holds rows q, 4 + q, 8 + q, 12 + q; lane 4q + m is row q + 4m.
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  _mm512_mask_storeu_ps(out, (__mmask16)((1u << n) - 1), _mm512_permutexvar_ps(order, s));
}
