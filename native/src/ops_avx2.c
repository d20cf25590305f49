// f32 / f16 / bf16 kernels for AVX2 with FMA and F16C: the instructions are enabled for this file alone (pragma
// below) and its functions are called only after moe_cpu_has_avx2() said yes.
#include "ops.h"
#include "kernels.h"
#if defined(MOE_HAVE_X86_KERNELS)
// The instruction set is enabled for this file only (never -march=native for the whole addon).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#include <immintrin.h>
#include <string.h>

static inline __m256 load_w_full(int wtype, const void *p) {
  if (wtype == MOE_F32) return _mm256_loadu_ps(p);
  __m128i h = _mm_loadu_si128((const __m128i *)p);
  if (wtype == MOE_F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
/** n < 8 weights at p, zero-filled to 8. */
static inline __m256 load_w_part(int wtype, const void *p, int n) {
  unsigned char buf[32] = {0};
  memcpy(buf, p, (size_t)n * (wtype == MOE_F32 ? 4 : 2));
  return load_w_full(wtype, buf);
}
static inline __m256 load_f_part(const float *p, int n) {
  float buf[8] = {0};
  memcpy(buf, p, (size_t)n * 4);
  return _mm256_loadu_ps(buf);
}
static inline void store_f_part(float *p, __m256 v, int n) {
  float buf[8];
  _mm256_storeu_ps(buf, v);
  memcpy(p, buf, (size_t)n * 4);
}
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- Matrix tile: as ops_avx512.c (one accumulator per output, lane l sums k = l, l+8, ... in order, then a fixed
// reduction tree), so an output does not depend on the tile shape, the thread count or the rest of the batch.
static inline __attribute__((always_inline)) void dot_tile(const int RB, const int JB, int wtype, int n, const char *w,
                                                           size_t rb, int jn, const float *act, size_t lda, float *out,
                                                           size_t ldo) {
  const size_t es = wtype == MOE_F32 ? 4 : 2;
  const char *wr[6];
#pragma GCC unroll 6
  for (int j = 0; j < JB; j++) wr[j] = w + (size_t)(j < jn ? j : jn - 1) * rb;
  __m256 c[4][6];
#pragma GCC unroll 4
  for (int r = 0; r < RB; r++)
#pragma GCC unroll 6
    for (int j = 0; j < JB; j++) c[r][j] = _mm256_setzero_ps();
  for (int k = 0; k < n; k += 8) {
    __m256 wv[6];
    int full = k + 8 <= n;
#pragma GCC unroll 6
    for (int j = 0; j < JB; j++) wv[j] = full ? load_w_full(wtype, wr[j] + k * es) : load_w_part(wtype, wr[j] + k * es, n - k);
#pragma GCC unroll 4
    for (int r = 0; r < RB; r++) {
      __m256 a = full ? _mm256_loadu_ps(act + r * lda + k) : load_f_part(act + r * lda + k, n - k);
#pragma GCC unroll 6
      for (int j = 0; j < JB; j++) c[r][j] = _mm256_fmadd_ps(wv[j], a, c[r][j]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RB; r++)
#pragma GCC unroll 6
    for (int j = 0; j < JB; j++)
      if (j < jn) out[r * ldo + j] = hsum(c[r][j]);
}

#define TILE(RB, JB) \
  static void tile_##RB##x##JB(int wtype, int n, const char *w, size_t rb, int jn, const float *act, size_t lda, \
                               float *out, size_t ldo) { \
    dot_tile(RB, JB, wtype, n, w, rb, jn, act, lda, out, ldo); \
  }
TILE(1, 6) TILE(2, 4) TILE(3, 3) TILE(4, 3) // accumulators + weight vectors + 1 within 16 ymm registers

static void tile(int wtype, int n, const void *w, size_t rb, const float *act, size_t lda, int R, int j0, int j1,
                 float *out, size_t ldo) {
  int jblk = (int)((256 * 1024) / (rb ? rb : 1));
  jblk = jblk < 12 ? 12 : jblk > 240 ? 240 : jblk - jblk % 12;
  for (int jb = j0; jb < j1; jb += jblk) {
    int je = j1 - jb < jblk ? j1 : jb + jblk;
    for (int r = 0; r < R; r += 4) {
      int m = R - r < 4 ? R - r : 4, step = m == 1 ? 6 : m == 2 ? 4 : 3;
      const float *a = act + (size_t)r * lda;
      float *o = out + (size_t)r * ldo;
      for (int j = jb; j < je; j += step) {
        const char *wj = (const char *)w + (size_t)j * rb;
        switch (m) {
          case 1: tile_1x6(wtype, n, wj, rb, je - j, a, lda, o + j, ldo); break;
          case 2: tile_2x4(wtype, n, wj, rb, je - j, a, lda, o + j, ldo); break;
          case 3: tile_3x3(wtype, n, wj, rb, je - j, a, lda, o + j, ldo); break;
          default: tile_4x3(wtype, n, wj, rb, je - j, a, lda, o + j, ldo); break;
        }
      }
    }
  }
}

static void round_act(int wtype, const float *x, float *out, int n) {
  int i = 0;
  if (wtype == MOE_F16) {
    for (; i + 8 <= n; i += 8) {
      __m256 v = _mm256_loadu_ps(x + i);
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    }
    for (; i < n; i++) out[i] = moe_f16_to_f32(moe_f32_to_f16(x[i]));
  } else if (wtype == MOE_BF16) {
    for (; i < n; i++) out[i] = moe_bf16_to_f32(moe_f32_to_bf16(x[i]));
  } else {
    for (; i < n; i++) out[i] = x[i];
  }
}

static float dot(const float *a, const float *b, int n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i < n; i += 8) {
    int m = n - i < 8 ? n - i : 8;
    s0 = _mm256_fmadd_ps(load_f_part(a + i, m), load_f_part(b + i, m), s0);
  }
  return hsum(_mm256_add_ps(s0, s1));
}

static void axpy(float *y, float a, const float *x, int n) {
  __m256 av = _mm256_set1_ps(a);
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  if (i < n) store_f_part(y + i, _mm256_fmadd_ps(av, load_f_part(x + i, n - i), load_f_part(y + i, n - i)), n - i);
}

static double sumsq(const float *x, int n) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    s0 = _mm256_fmadd_pd(lo, lo, s0);
    s1 = _mm256_fmadd_pd(hi, hi, s1);
  }
  __m256d s = _mm256_add_pd(s0, s1);
  double t[4];
  _mm256_storeu_pd(t, s);
  double r = (t[0] + t[1]) + (t[2] + t[3]);
  for (; i < n; i++) r += (double)x[i] * x[i];
  return r;
}

static void to_f16(const float *x, uint16_t *out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  moe_to_f16_generic(x + i, out + i, n - i);
}

const moe_fkern moe_fkern_avx2 = {"avx2", tile, round_act, dot, axpy, sumsq, moe_softmax_row_generic, moe_silu_mul_generic,
                                  moe_scores_generic, moe_weighted_sum_generic, to_f16};
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
