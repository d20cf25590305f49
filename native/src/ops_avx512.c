// f32 / f16 / bf16 kernels for AVX-512 (F, BW, VL) with FMA and F16C: the instructions are enabled for this file
// alone (pragma below) and its functions are called only after moe_cpu_has_avx512() said yes.
#include "ops.h"
#include "kernels.h"
#if defined(MOE_HAVE_X86_KERNELS)
// The instruction set is enabled for this file only (never -march=native for the whole addon).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
#endif
#include <immintrin.h>
#include <math.h>

static inline __mmask16 tailmask(int n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

/** 16 weights at p (element type wtype) as f32; m selects which to load (the rest are 0). */
static inline __m512 load_w(int wtype, const void *p, __mmask16 m) {
  if (wtype == MOE_F32) return _mm512_maskz_loadu_ps(m, p);
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  if (wtype == MOE_F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); // bf16: the top half of an f32
}
static inline __m512 load_w_full(int wtype, const void *p) {
  if (wtype == MOE_F32) return _mm512_loadu_ps(p);
  __m256i h = _mm256_loadu_si256((const __m256i *)p);
  if (wtype == MOE_F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// ---- Matrix tile: out[r, j] = dot(act row r, weight row j), a register tile of RB activation rows x JB weight rows.
// Every output has its own accumulator: lane l sums k = l, l+16, l+32, ... in order (the tail masked), then the
// lanes are added by the same fixed tree. So an output's value does not depend on the tile shape, the row count,
// the thread count or on the other rows of the batch: a sequence gives the same logits alone or batched.
static inline __attribute__((always_inline)) void dot_tile(const int RB, const int JB, int wtype, int n, const char *w,
                                                           size_t rb, int jn, const float *act, size_t lda, float *out,
                                                           size_t ldo) {
  const size_t es = wtype == MOE_F32 ? 4 : 2;
  const char *wr[8];
#pragma GCC unroll 8
  for (int j = 0; j < JB; j++) wr[j] = w + (size_t)(j < jn ? j : jn - 1) * rb; // past the edge: repeat a row
  __m512 c[6][8];
#pragma GCC unroll 6
  for (int r = 0; r < RB; r++)
#pragma GCC unroll 8
    for (int j = 0; j < JB; j++) c[r][j] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 16 <= n; k += 16) {
    __m512 wv[8];
#pragma GCC unroll 8
    for (int j = 0; j < JB; j++) wv[j] = load_w_full(wtype, wr[j] + k * es);
#pragma GCC unroll 6
    for (int r = 0; r < RB; r++) {
      __m512 a = _mm512_loadu_ps(act + r * lda + k);
#pragma GCC unroll 8
      for (int j = 0; j < JB; j++) c[r][j] = _mm512_fmadd_ps(wv[j], a, c[r][j]);
    }
  }
  if (k < n) {
    __mmask16 m = tailmask(n - k);
    __m512 wv[8];
#pragma GCC unroll 8
    for (int j = 0; j < JB; j++) wv[j] = load_w(wtype, wr[j] + k * es, m);
#pragma GCC unroll 6
    for (int r = 0; r < RB; r++) {
      __m512 a = _mm512_maskz_loadu_ps(m, act + r * lda + k);
#pragma GCC unroll 8
      for (int j = 0; j < JB; j++) c[r][j] = _mm512_fmadd_ps(wv[j], a, c[r][j]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < RB; r++)
#pragma GCC unroll 8
    for (int j = 0; j < JB; j++)
      if (j < jn) out[r * ldo + j] = _mm512_reduce_add_ps(c[r][j]);
}

#define TILE(RB, JB) \
  static void tile_##RB##x##JB(int wtype, int n, const char *w, size_t rb, int jn, const float *act, size_t lda, \
                               float *out, size_t ldo) { \
    dot_tile(RB, JB, wtype, n, w, rb, jn, act, lda, out, ldo); \
  }
// One or two rows (decode): one weight row at a time, so the weights are read as one sequential stream (rows are
// contiguous); 8 rows side by side are 8 short streams that the prefetchers follow badly (measured on Zen 5, f16
// 3584 x 1024 from DRAM, 2 threads: 31 GB/s against 21). More rows: 4 x up to 6 (24 of 32 zmm).
TILE(1, 1) TILE(2, 1) TILE(3, 4) TILE(4, 4) TILE(5, 4) TILE(6, 4)

static void tile(int wtype, int n, const void *w, size_t rb, const float *act, size_t lda, int R, int j0, int j1,
                 float *out, size_t ldo) {
  // Weight rows in blocks of ~256 KiB (they stay in L2 while the activation rows pass 6 at a time).
  int jblk = (int)((256 * 1024) / (rb ? rb : 1));
  jblk = jblk < 8 ? 8 : jblk > 256 ? 256 : jblk & ~7;
  for (int jb = j0; jb < j1; jb += jblk) {
    int je = j1 - jb < jblk ? j1 : jb + jblk;
    for (int r = 0; r < R; r += 6) {
      int m = R - r < 6 ? R - r : 6;
      const float *a = act + (size_t)r * lda;
      float *o = out + (size_t)r * ldo;
      const char *wb = (const char *)w;
      if (m <= 2) {
        for (int j = jb; j < je; j++) {
          if (m == 1) tile_1x1(wtype, n, wb + (size_t)j * rb, rb, 1, a, lda, o + j, ldo);
          else tile_2x1(wtype, n, wb + (size_t)j * rb, rb, 1, a, lda, o + j, ldo);
        }
      } else {
        for (int j = jb; j < je; j += 4) {
          const char *wj = wb + (size_t)j * rb;
          switch (m) {
            case 3: tile_3x4(wtype, n, wj, rb, je - j, a, lda, o + j, ldo); break;
            case 4: tile_4x4(wtype, n, wj, rb, je - j, a, lda, o + j, ldo); break;
            case 5: tile_5x4(wtype, n, wj, rb, je - j, a, lda, o + j, ldo); break;
            default: tile_6x4(wtype, n, wj, rb, je - j, a, lda, o + j, ldo); break;
          }
        }
      }
    }
  }
}

// ---- Small vector helpers ----
static void round_act(int wtype, const float *x, float *out, int n) {
  int i = 0;
  if (wtype == MOE_F16) {
    for (; i < n; i += 16) {
      __mmask16 m = tailmask(n - i);
      __m512 v = _mm512_maskz_loadu_ps(m, x + i);
      v = _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      _mm512_mask_storeu_ps(out + i, m, v);
    }
  } else if (wtype == MOE_BF16) {
    const __m512i lo = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), hi = _mm512_set1_epi32((int)0xffff0000u);
    const __m512i absm = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000), q = _mm512_set1_epi32(0x400000);
    for (; i < n; i += 16) {
      __mmask16 m = tailmask(n - i);
      __m512i v = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, x + i));
      __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(v, absm), inf);
      __m512i r = _mm512_add_epi32(v, _mm512_add_epi32(lo, _mm512_and_si512(_mm512_srli_epi32(v, 16), one)));
      r = _mm512_mask_or_epi32(r, nan, v, q); // NaN: keep it, quiet (ggml sets bit 6 of the bf16)
      _mm512_mask_storeu_ps(out + i, m, _mm512_castsi512_ps(_mm512_and_si512(r, hi)));
    }
  } else {
    for (; i < n; i++) out[i] = x[i];
  }
}

static float dot(const float *a, const float *b, int n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i < n; i += 16) {
    __mmask16 m = tailmask(n - i);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

static void axpy(float *y, float a, const float *x, int n) {
  __m512 av = _mm512_set1_ps(a);
  for (int i = 0; i < n; i += 16) {
    __mmask16 m = tailmask(n - i);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
  }
}

static double sumsq(const float *x, int n) {
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  for (int i = 0; i < n; i += 16) {
    __mmask16 m = tailmask(n - i);
    __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    s0 = _mm512_fmadd_pd(lo, lo, s0); // products of floats are exact in double
    s1 = _mm512_fmadd_pd(hi, hi, s1);
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
}

/**
 * exp(x) for 16 floats (Cephes' expf: range reduction by ln 2 in two parts, degree-6 polynomial, then scalef):
 * within 2 ulp of expf; NaN stays NaN, large arguments give 0 or inf.
 */
static inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x)); // NaN passes (2nd operand)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

static double softmax_row(float *s, int n, int round_f16) {
  __m512 vmx = _mm512_set1_ps(-INFINITY);
  for (int j = 0; j < n; j += 16) vmx = _mm512_max_ps(vmx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tailmask(n - j), s + j));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmx));
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  for (int j = 0; j < n; j += 16) {
    const __mmask16 m = tailmask(n - j);
    const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), mx)));
    _mm512_mask_storeu_ps(s + j, m, e);
    s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
    s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
  }
  const double sum = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  const __m512 inv = _mm512_set1_ps((float)(1.0 / sum));
  for (int j = 0; j < n; j += 16) {
    const __mmask16 m = tailmask(n - j);
    __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), inv);
    if (round_f16) p = _mm512_cvtph_ps(_mm512_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm512_mask_storeu_ps(s + j, m, p);
  }
  return (double)_mm512_cvtss_f32(mx) + log(sum);
}

static void silu_mul(float *g, const float *u, int n) {
  for (int j = 0; j < n; j += 16) {
    const __mmask16 m = tailmask(n - j);
    const __m512 x = _mm512_maskz_loadu_ps(m, g + j);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
    const __m512 y = _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), _mm512_maskz_loadu_ps(m, u + j));
    _mm512_mask_storeu_ps(g + j, m, y);
  }
}

// Attention over a KV cache: the GQA group's query heads (up to 4 at a time) share each key's and value's loads, and
// the loops stay inside one function instead of a dot() / axpy() call per key and head. The arithmetic is dot()'s
// and axpy()'s exactly (same products, same accumulation order, same final reduction), so results do not change.
// Keys and values are f32 or f16 bits (H = 1: converted as loaded, exactly).
#define ATT_MAXG 4

static inline __attribute__((always_inline)) __m512 load_kv(const int H, const void *p, size_t i) {
  if (H) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
  return _mm512_loadu_ps((const float *)p + i);
}
static inline __attribute__((always_inline)) __m512 load_kv_mask(const int H, __mmask16 m, const void *p, size_t i) {
  if (H) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i));
  return _mm512_maskz_loadu_ps(m, (const float *)p + i);
}

static inline __attribute__((always_inline)) void scores_g(const int GN, const int H, const float *q, int hd,
                                                           const void *k, size_t kstride, int L, float scale, float *sc,
                                                           size_t ldsc) {
  for (int j = 0; j < L; j++) {
    const size_t kj = (size_t)j * kstride;
    __m512 s0[ATT_MAXG], s1[ATT_MAXG];
    for (int g = 0; g < GN; g++) s0[g] = s1[g] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= hd; i += 32) {
      const __m512 k0 = load_kv(H, k, kj + i), k1 = load_kv(H, k, kj + i + 16);
      for (int g = 0; g < GN; g++) {
        s0[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + (size_t)g * hd + i), k0, s0[g]);
        s1[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + (size_t)g * hd + i + 16), k1, s1[g]);
      }
    }
    for (; i < hd; i += 16) {
      const __mmask16 m = tailmask(hd - i);
      const __m512 k0 = load_kv_mask(H, m, k, kj + i);
      for (int g = 0; g < GN; g++) s0[g] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + (size_t)g * hd + i), k0, s0[g]);
    }
    for (int g = 0; g < GN; g++) sc[(size_t)g * ldsc + j] = _mm512_reduce_add_ps(_mm512_add_ps(s0[g], s1[g])) * scale;
  }
}

#define ATT_DISPATCH(FN, G, ...)                                   \
  switch (G) {                                                     \
    case 1: H ? FN(1, 1, __VA_ARGS__) : FN(1, 0, __VA_ARGS__); break; \
    case 2: H ? FN(2, 1, __VA_ARGS__) : FN(2, 0, __VA_ARGS__); break; \
    case 3: H ? FN(3, 1, __VA_ARGS__) : FN(3, 0, __VA_ARGS__); break; \
    default: H ? FN(4, 1, __VA_ARGS__) : FN(4, 0, __VA_ARGS__); break; \
  }

static void scores(const float *q, int G, int hd, const void *k, int H, size_t kstride, int L, float scale, float *sc,
                   size_t ldsc) {
  for (int g0 = 0; g0 < G; g0 += ATT_MAXG) {
    const float *qg = q + (size_t)g0 * hd;
    float *sg = sc + (size_t)g0 * ldsc;
    ATT_DISPATCH(scores_g, G - g0 < ATT_MAXG ? G - g0 : ATT_MAXG, qg, hd, k, kstride, L, scale, sg, ldsc)
  }
}

static inline __attribute__((always_inline)) void weighted_sum_g(const int GN, const int H, const float *p, size_t ldp,
                                                                 int hd, const void *v, size_t vstride, int L,
                                                                 float *out) {
  for (int d0 = 0; d0 < hd; d0 += 64) { // 64 columns x up to 4 heads: 16 accumulators in registers
    __mmask16 m[4];
    for (int c = 0; c < 4; c++) m[c] = d0 + 16 * c < hd ? tailmask(hd - d0 - 16 * c) : 0;
    __m512 acc[ATT_MAXG][4];
    for (int g = 0; g < GN; g++) for (int c = 0; c < 4; c++) acc[g][c] = _mm512_setzero_ps();
    for (int j = 0; j < L; j++) {
      const size_t vj = (size_t)j * vstride + d0;
      __m512 vv[4];
      for (int c = 0; c < 4; c++) vv[c] = load_kv_mask(H, m[c], v, vj + 16 * c);
      for (int g = 0; g < GN; g++) {
        const __m512 pj = _mm512_set1_ps(p[(size_t)g * ldp + j]);
        for (int c = 0; c < 4; c++) acc[g][c] = _mm512_fmadd_ps(pj, vv[c], acc[g][c]);
      }
    }
    for (int g = 0; g < GN; g++)
      for (int c = 0; c < 4; c++) _mm512_mask_storeu_ps(out + (size_t)g * hd + d0 + 16 * c, m[c], acc[g][c]);
  }
}

static void weighted_sum(const float *p, size_t ldp, int G, int hd, const void *v, int H, size_t vstride, int L,
                         float *out) {
  for (int g0 = 0; g0 < G; g0 += ATT_MAXG) {
    const float *pg = p + (size_t)g0 * ldp;
    float *og = out + (size_t)g0 * hd;
    ATT_DISPATCH(weighted_sum_g, G - g0 < ATT_MAXG ? G - g0 : ATT_MAXG, pg, ldp, hd, v, vstride, L, og)
  }
}

static void to_f16(const float *x, uint16_t *out, size_t n) {
  size_t i = 0;
  for (; i < n; i += 16) {
    const __mmask16 m = tailmask(n - i > 16 ? 16 : (int)(n - i));
    _mm256_mask_storeu_epi16(out + i, m, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

const moe_fkern moe_fkern_avx512 = {"avx512", tile, round_act, dot, axpy, sumsq, softmax_row, silu_mul, scores, weighted_sum,
                                    to_f16};
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
