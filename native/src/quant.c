// Quantized matrix products: activation conversion (llama.cpp's vec_dot_type), the portable C kernels, and the
// run-time choice between them and the AVX2 / AVX-512 kernels (quant_avx2.c, quant_avx512.c).
// The generic kernels follow ggml's ggml_vec_dot_*_generic (src/tensor/quant.ts dotRow) operation for operation, so
// they are the C oracle the SIMD paths are tested against (native/test/quant_test.c).
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "quant_impl.h"
#include "ops.h" // moe_row_bytes, moe_is_float_type

// ---------------------------------------------------------------------------------------------------------------
// Scratch memory
// ---------------------------------------------------------------------------------------------------------------

#if defined(_MSC_VER)
#define MOE_TLS __declspec(thread)
#else
#define MOE_TLS __thread
#endif

static MOE_TLS void *scratch_ptr;
static MOE_TLS size_t scratch_cap;

void *moe_quant_scratch(size_t bytes) {
  if (bytes > scratch_cap) {
    free(scratch_ptr);
    size_t cap = (bytes + (bytes >> 2) + 63) & ~(size_t)63; // room to grow a little
    scratch_ptr = aligned_alloc(64, cap);
    if (!scratch_ptr) abort(); // out of memory: nothing sensible to return to a kernel
    scratch_cap = cap;
  }
  return scratch_ptr;
}

// ---------------------------------------------------------------------------------------------------------------
// Activation conversion
// ---------------------------------------------------------------------------------------------------------------

int moe_vec_dot_type(int wtype) {
  switch (wtype) {
    case MOE_F32: case MOE_F16: case MOE_BF16: return wtype;
    case MOE_Q4_0: case MOE_Q4_0_RP: case MOE_Q5_0: case MOE_Q8_0: return MOE_Q8_0;
    case MOE_Q4_1: case MOE_Q5_1: return MOE_Q8_1;
    case MOE_Q2_K: case MOE_Q3_K: case MOE_Q4_K: case MOE_Q5_K: case MOE_Q6_K: return MOE_Q8_K;
    default: return -1;
  }
}

static int have_avx512(void);

/** ggml bytes of a q8_0 / q8_1 row, then (AVX-512 CPUs) the kernel layout at the next multiple of 64. */
static size_t act32_bytes(int n, int block) {
  const size_t ggml = (size_t)(n / QK) * block;
  if (!have_avx512()) return ggml;
  return ((ggml + 63) & ~(size_t)63) + moe_act32_suffix_bytes(n);
}

size_t moe_act_row_bytes(int wtype, int n) {
  switch (moe_vec_dot_type(wtype)) {
    case MOE_F32: return (size_t)n * 4;
    case MOE_F16: case MOE_BF16: return (size_t)n * 2;
    case MOE_Q8_0: return act32_bytes(n, B_Q8_0);
    case MOE_Q8_1: return act32_bytes(n, B_Q8_1);
    case MOE_Q8_K: {
      const size_t ggml = (size_t)(n / QKK) * B_Q8_K;
      return have_avx512() ? ((ggml + 63) & ~(size_t)63) + moe_actK_suffix_bytes(n) : ggml;
    }
    default: return 0;
  }
}

/** x86 round-half-even then pack with signed saturation (what _mm256_cvtps_epi32 + packs give; NaN -> -128). */
static inline int8_t q8_x86(float v) {
  v = nearbyintf(v); // default rounding mode: to nearest, ties to even
  if (v >= -128.0f && v <= 127.0f) return (int8_t)(int)v;
  return v > 127.0f ? 127 : -128;
}

/** One block of 32 with llama.cpp's AVX rounding: id = 127/amax. Returns the sum of the quants. */
static int q8_block_x86(const float *x, float *d_out, int8_t *qs) {
  float amax = 0.0f;
  for (int j = 0; j < QK; j++) {
    const float a = fabsf(x[j]);
    amax = a > amax ? a : amax;
  }
  *d_out = amax / 127.0f;
  const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
  int sum = 0;
  for (int j = 0; j < QK; j++) {
    qs[j] = q8_x86(x[j] * id);
    sum += qs[j];
  }
  return sum;
}

void moe_quantize_q8_0_generic(const float *x, uint8_t *out, int n) {
  for (int i = 0; i < n / QK; i++, x += QK, out += B_Q8_0) {
    float d;
    q8_block_x86(x, &d, (int8_t *)(out + 2));
    const uint16_t h = moe_f2h(d);
    memcpy(out, &h, 2);
  }
}

void moe_quantize_q8_1_generic(const float *x, uint8_t *out, int n) {
  for (int i = 0; i < n / QK; i++, x += QK, out += B_Q8_1) {
    float d;
    const int sum = q8_block_x86(x, &d, (int8_t *)(out + 4));
    const uint16_t h = moe_f2h(d), s = moe_f2h(d * (float)sum);
    memcpy(out, &h, 2);
    memcpy(out + 2, &s, 2);
  }
}

/** ggml's nearest_int (round half to even through the float adder, read off the mantissa bits). */
static inline int nearest_int(float fval) {
  float val = fval + 12582912.f;
  int i;
  memcpy(&i, &val, sizeof(int));
  return (i & 0x007fffff) - 0x00400000;
}

/** ggml quantize_row_q8_K_ref (llama.cpp uses it on every platform). */
static void quantize_q8_K(const float *x, uint8_t *y, int n) {
  for (int i = 0; i < n / QKK; i++, x += QKK, y += B_Q8_K) {
    float max = 0, amax = 0;
    for (int j = 0; j < QKK; ++j) {
      const float ax = fabsf(x[j]);
      if (ax > amax) {
        amax = ax;
        max = x[j];
      }
    }
    if (!amax) {
      memset(y, 0, B_Q8_K); // ggml leaves bsums unset; they only ever meet d = 0
      continue;
    }
    const float iscale = -127.f / max;
    int8_t *qs = (int8_t *)(y + 4);
    for (int j = 0; j < QKK; ++j) {
      const int v = nearest_int(iscale * x[j]);
      qs[j] = (int8_t)(v < 127 ? v : 127);
    }
    for (int j = 0; j < QKK / 16; ++j) {
      int sum = 0;
      for (int ii = 0; ii < 16; ++ii) sum += qs[j * 16 + ii];
      const int16_t s16 = (int16_t)sum;
      memcpy(y + 260 + 2 * j, &s16, 2);
    }
    const float d = 1 / iscale;
    memcpy(y, &d, 4);
  }
}

static uint16_t f2bf16(float v) {
  uint32_t x;
  memcpy(&x, &v, 4);
  if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 64);
  return (uint16_t)((x + (0x7fff + ((x >> 16) & 1))) >> 16);
}

enum { PATH_AUTO = 0, PATH_GENERIC = 1, PATH_AVX2 = 2, PATH_AVX512 = 3 };
static int forced_path = PATH_AUTO;
void moe_quant_force_path(int path) { forced_path = path; }

static int have_avx2(void) {
#if MOE_X86
  const moe_cpu_features *c = moe_cpu();
  return c->avx2 && c->fma && c->f16c;
#else
  return 0;
#endif
}

static int have_avx512(void) {
#if MOE_X86
  const moe_cpu_features *c = moe_cpu();
  return c->avx2 && c->fma && c->f16c && c->avx512f && c->avx512bw && c->avx512vl && c->avx512vnni;
#else
  return 0;
#endif
}

/** Appends the AVX-512 kernel layout to a converted q8_0 / q8_1 row (the padding before it zeroed). */
static void act32_suffix(uint8_t *o, int n, int block, int q81) {
  const size_t ggml = (size_t)(n / QK) * block, off = (ggml + 63) & ~(size_t)63;
  memset(o + ggml, 0, off - ggml);
  moe_act32_suffix(o, n, q81, o + off);
}

void moe_quantize_act_row(int wtype, const float *x, void *out, int n) {
  uint8_t *o = (uint8_t *)out;
  switch (moe_vec_dot_type(wtype)) {
    case MOE_F32: memcpy(out, x, (size_t)n * 4); return;
    case MOE_F16:
      for (int i = 0; i < n; i++) {
        const uint16_t h = moe_f2h(x[i]);
        memcpy(o + 2 * i, &h, 2);
      }
      return;
    case MOE_BF16:
      for (int i = 0; i < n; i++) {
        const uint16_t h = f2bf16(x[i]);
        memcpy(o + 2 * i, &h, 2);
      }
      return;
    case MOE_Q8_0:
      if (forced_path != PATH_GENERIC && have_avx2()) moe_quantize_q8_0_avx2(x, o, n);
      else moe_quantize_q8_0_generic(x, o, n);
      if (have_avx512()) act32_suffix(o, n, B_Q8_0, 0);
      return;
    case MOE_Q8_1:
      if (forced_path != PATH_GENERIC && have_avx2()) moe_quantize_q8_1_avx2(x, o, n);
      else moe_quantize_q8_1_generic(x, o, n);
      if (have_avx512()) act32_suffix(o, n, B_Q8_1, 1);
      return;
    case MOE_Q8_K: {
      quantize_q8_K(x, o, n);
      if (have_avx512()) {
        const size_t ggml = (size_t)(n / QKK) * B_Q8_K, off = (ggml + 63) & ~(size_t)63;
        memset(o + ggml, 0, off - ggml);
        moe_actK_suffix(o, n, o + off);
      }
      return;
    }
    default: return;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Generic dot products (ggml_vec_dot_*_generic, one weight row with one activation row)
// ---------------------------------------------------------------------------------------------------------------

static float dot_q4_0(int nb, const uint8_t *x, const uint8_t *y) {
  float sumf = 0;
  for (int ib = 0; ib < nb; ib++, x += B_Q4_0, y += B_Q8_0) {
    const int8_t *q8 = (const int8_t *)(y + 2);
    int sumi0 = 0, sumi1 = 0;
    for (int j = 0; j < 16; j++) {
      sumi0 += ((x[2 + j] & 0x0F) - 8) * q8[j];
      sumi1 += ((x[2 + j] >> 4) - 8) * q8[j + 16];
    }
    sumf += (float)(sumi0 + sumi1) * moe_h2f(rd16(x)) * moe_h2f(rd16(y));
  }
  return sumf;
}

static float dot_q4_1(int nb, const uint8_t *x, const uint8_t *y) {
  float sumf = 0;
  for (int ib = 0; ib < nb; ib++, x += B_Q4_1, y += B_Q8_1) {
    const int8_t *q8 = (const int8_t *)(y + 4);
    int sumi0 = 0, sumi1 = 0;
    for (int j = 0; j < 16; j++) {
      sumi0 += (x[4 + j] & 0x0F) * q8[j];
      sumi1 += (x[4 + j] >> 4) * q8[j + 16];
    }
    sumf += (moe_h2f(rd16(x)) * moe_h2f(rd16(y))) * (float)(sumi0 + sumi1) + moe_h2f(rd16(x + 2)) * moe_h2f(rd16(y + 2));
  }
  return sumf;
}

static float dot_q5_0(int nb, const uint8_t *x, const uint8_t *y) {
  float sumf = 0;
  for (int ib = 0; ib < nb; ib++, x += B_Q5_0, y += B_Q8_0) {
    const int8_t *q8 = (const int8_t *)(y + 2);
    const uint32_t qh = rd32(x + 2);
    int sumi0 = 0, sumi1 = 0;
    for (int j = 0; j < 16; j++) {
      const uint8_t xh0 = ((qh & (1u << (j + 0))) >> (j + 0)) << 4;
      const uint8_t xh1 = ((qh & (1u << (j + 16))) >> (j + 12));
      sumi0 += (((x[6 + j] & 0x0F) | xh0) - 16) * q8[j];
      sumi1 += (((x[6 + j] >> 4) | xh1) - 16) * q8[j + 16];
    }
    sumf += (moe_h2f(rd16(x)) * moe_h2f(rd16(y))) * (float)(sumi0 + sumi1);
  }
  return sumf;
}

static float dot_q5_1(int nb, const uint8_t *x, const uint8_t *y) {
  float sumf = 0;
  for (int ib = 0; ib < nb; ib++, x += B_Q5_1, y += B_Q8_1) {
    const int8_t *q8 = (const int8_t *)(y + 4);
    const uint32_t qh = rd32(x + 4);
    int sumi0 = 0, sumi1 = 0;
    for (int j = 0; j < 16; j++) {
      const uint8_t xh0 = ((qh & (1u << (j + 0))) >> (j + 0)) << 4;
      const uint8_t xh1 = ((qh & (1u << (j + 16))) >> (j + 12));
      sumi0 += ((x[8 + j] & 0x0F) | xh0) * q8[j];
      sumi1 += ((x[8 + j] >> 4) | xh1) * q8[j + 16];
    }
    sumf += (moe_h2f(rd16(x)) * moe_h2f(rd16(y))) * (float)(sumi0 + sumi1) + moe_h2f(rd16(x + 2)) * moe_h2f(rd16(y + 2));
  }
  return sumf;
}

static float dot_q8_0(int nb, const uint8_t *x, const uint8_t *y) {
  float sumf = 0;
  for (int ib = 0; ib < nb; ib++, x += B_Q8_0, y += B_Q8_0) {
    const int8_t *a = (const int8_t *)(x + 2), *b = (const int8_t *)(y + 2);
    int sumi = 0;
    for (int j = 0; j < QK; j++) sumi += a[j] * b[j];
    sumf += (float)sumi * (moe_h2f(rd16(x)) * moe_h2f(rd16(y)));
  }
  return sumf;
}

static inline int16_t bsum(const uint8_t *y, int j) {
  int16_t v;
  memcpy(&v, y + 260 + 2 * j, 2);
  return v;
}

static float dot_q2_K(int nb, const uint8_t *x, const uint8_t *y) {
  float sumf = 0;
  for (int i = 0; i < nb; i++, x += B_Q2_K, y += B_Q8_K) {
    const uint8_t *sc = x, *q2 = x + 16;
    const int8_t *q8 = (const int8_t *)(y + 4);
    int summs = 0;
    for (int j = 0; j < 16; ++j) summs += bsum(y, j) * (sc[j] >> 4);
    const float dall = rdf32(y) * moe_h2f(rd16(x + 80));
    const float dmin = rdf32(y) * moe_h2f(rd16(x + 82));
    int isum = 0, is = 0;
    for (int k = 0; k < QKK / 128; ++k) {
      int shift = 0;
      for (int j = 0; j < 4; ++j) {
        int d = sc[is++] & 0xF, isuml = 0;
        for (int l = 0; l < 16; ++l) isuml += q8[l] * ((q2[l] >> shift) & 3);
        isum += d * isuml;
        d = sc[is++] & 0xF;
        isuml = 0;
        for (int l = 16; l < 32; ++l) isuml += q8[l] * ((q2[l] >> shift) & 3);
        isum += d * isuml;
        shift += 2;
        q8 += 32;
      }
      q2 += 32;
    }
    sumf += dall * isum - dmin * summs;
  }
  return sumf;
}

/** The generic K-quant tail: 8 float lane sums of scale * q * a, as ggml's generic q3_K..q6_K dots keep them. */
static inline void lanes_accumulate(float sums[8], float d, const int8_t *q8, const int8_t *aux8, const int *scales,
                                    int group) {
  int32_t aux32[8] = {0};
  for (int k = 0; k < QKK; k++) aux32[k & 7] += scales[k / group] * (q8[k] * aux8[k]);
  for (int l = 0; l < 8; ++l) sums[l] += d * (float)aux32[l];
}

static float dot_q3_K(int nb, const uint8_t *x, const uint8_t *y) {
  float sums[8] = {0};
  int8_t aux8[QKK];
  for (int i = 0; i < nb; i++, x += B_Q3_K, y += B_Q8_K) {
    const uint8_t *hm = x, *q3 = x + 32;
    int8_t *a = aux8;
    uint8_t m = 1;
    for (int j = 0; j < QKK; j += 128) {
      for (int shift = 0; shift < 8; shift += 2, m <<= 1, a += 32)
        for (int l = 0; l < 32; ++l) a[l] = (int8_t)(((q3[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4));
      q3 += 32;
    }
    int8_t sc8[16];
    int scales[16];
    moe_q3k_scales(x + 96, sc8);
    for (int j = 0; j < 16; j++) scales[j] = sc8[j];
    lanes_accumulate(sums, moe_h2f(rd16(x + 108)) * rdf32(y), (const int8_t *)(y + 4), aux8, scales, 16);
  }
  float sumf = 0;
  for (int l = 0; l < 8; ++l) sumf += sums[l];
  return sumf;
}

static float dot_q45_K(int nb, const uint8_t *x, const uint8_t *y, int five) {
  float sums[8] = {0}, sumf = 0;
  int8_t aux8[QKK];
  const int size = five ? B_Q5_K : B_Q4_K;
  for (int i = 0; i < nb; i++, x += size, y += B_Q8_K) {
    const uint8_t *q4 = x + (five ? 48 : 16), *hm = x + 16;
    int8_t *a = aux8;
    uint8_t m = 1;
    for (int j = 0; j < QKK / 64; ++j) {
      for (int l = 0; l < 32; ++l) a[l] = (int8_t)((q4[l] & 0xF) + (five && (hm[l] & m) ? 16 : 0));
      a += 32;
      m <<= 1;
      for (int l = 0; l < 32; ++l) a[l] = (int8_t)((q4[l] >> 4) + (five && (hm[l] & m) ? 16 : 0));
      a += 32;
      m <<= 1;
      q4 += 32;
    }
    uint8_t sm[16];
    moe_k4_scales(x + 4, sm);
    int scales[8], sumi = 0;
    for (int j = 0; j < 8; j++) {
      scales[j] = sm[j];
      sumi += (bsum(y, 2 * j) + bsum(y, 2 * j + 1)) * sm[8 + j];
    }
    const float yd = rdf32(y);
    lanes_accumulate(sums, moe_h2f(rd16(x)) * yd, (const int8_t *)(y + 4), aux8, scales, 32);
    const float dmin = moe_h2f(rd16(x + 2)) * yd;
    sumf -= dmin * sumi;
  }
  for (int l = 0; l < 8; ++l) sumf += sums[l];
  return sumf;
}

static float dot_q6_K(int nb, const uint8_t *x, const uint8_t *y) {
  float sums[8] = {0};
  int8_t aux8[QKK];
  for (int i = 0; i < nb; i++, x += B_Q6_K, y += B_Q8_K) {
    const uint8_t *ql = x, *qh = x + 128;
    int8_t *a = aux8;
    for (int j = 0; j < QKK; j += 128) {
      for (int l = 0; l < 32; ++l) {
        a[l + 0] = (int8_t)(((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
        a[l + 32] = (int8_t)(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
        a[l + 64] = (int8_t)(((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
        a[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
      }
      a += 128;
      ql += 64;
      qh += 32;
    }
    int scales[16];
    for (int j = 0; j < 16; j++) scales[j] = (int8_t)x[192 + j];
    lanes_accumulate(sums, moe_h2f(rd16(x + 208)) * rdf32(y), (const int8_t *)(y + 4), aux8, scales, 16);
  }
  float sumf = 0;
  for (int l = 0; l < 8; ++l) sumf += sums[l];
  return sumf;
}

static int generic_supports(int wtype) {
  switch (wtype) {
    case MOE_Q4_0: case MOE_Q4_1: case MOE_Q5_0: case MOE_Q5_1: case MOE_Q8_0:
    case MOE_Q2_K: case MOE_Q3_K: case MOE_Q4_K: case MOE_Q5_K: case MOE_Q6_K: return 1;
    default: return 0;
  }
}

int moe_gemm_generic(int wtype, int n, const uint8_t *w, size_t wrb, const uint8_t *act, size_t arb, int R, int j0,
                     int j1, float *out, int ldo) {
  if (!generic_supports(wtype)) return 0;
  for (int r = 0; r < R; r++) {
    const uint8_t *a = act + (size_t)r * arb;
    for (int j = j0; j < j1; j++) {
      const uint8_t *x = w + (size_t)j * wrb;
      float v;
      switch (wtype) {
        case MOE_Q4_0: v = dot_q4_0(n / QK, x, a); break;
        case MOE_Q4_1: v = dot_q4_1(n / QK, x, a); break;
        case MOE_Q5_0: v = dot_q5_0(n / QK, x, a); break;
        case MOE_Q5_1: v = dot_q5_1(n / QK, x, a); break;
        case MOE_Q8_0: v = dot_q8_0(n / QK, x, a); break;
        case MOE_Q2_K: v = dot_q2_K(n / QKK, x, a); break;
        case MOE_Q3_K: v = dot_q3_K(n / QKK, x, a); break;
        case MOE_Q4_K: v = dot_q45_K(n / QKK, x, a, 0); break;
        case MOE_Q5_K: v = dot_q45_K(n / QKK, x, a, 1); break;
        default: v = dot_q6_K(n / QKK, x, a); break;
      }
      out[(size_t)r * ldo + j] = v;
    }
  }
  return 1;
}

// ---------------------------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------------------------

int moe_gemm_supports(int wtype) { return wtype == MOE_Q4_0_RP || generic_supports(wtype); }

// ---------------------------------------------------------------------------------------------------------------
// Repacked q4_0 (MOE_Q4_0_RP): each group of 16 blocks (288 bytes, the same as in the file) holds their quants
// already in the order quant_avx512.c's transpose16 produces (byte 64k + 4b + i = byte 4k + i of block b's 16
// nibble bytes), then the 16 f16 scales side by side. The kernel then loads what it multiplies instead of
// gathering and transposing it for every row on every call; the sums are the same integers and the same float
// operations, so results are bit-identical to the file layout's. Rows must be whole groups (n % 512 == 0).
// ---------------------------------------------------------------------------------------------------------------
#define RP_GROUP (16 * B_Q4_0)

int moe_repack_type(int wtype, int n) {
  if (n <= 0 || !moe_row_bytes(wtype, n) || !(moe_is_float_type(wtype) || generic_supports(wtype))) return -1;
  if (wtype == MOE_Q4_0 && n % (16 * QK) == 0 && (forced_path == PATH_AUTO || forced_path == PATH_AVX512) && have_avx512())
    return MOE_Q4_0_RP;
  return wtype; // the same layout (copied into the engine's own memory)
}

static void repack_q4_0_group(const uint8_t *src, uint8_t *dst) {
  for (int b = 0; b < 16; b++) {
    const uint8_t *blk = src + b * B_Q4_0;
    memcpy(dst + 256 + 2 * b, blk, 2);
    for (int k = 0; k < 4; k++) memcpy(dst + 64 * k + 4 * b, blk + 2 + 4 * k, 4);
  }
}

static void unrepack_q4_0_group(const uint8_t *src, uint8_t *dst) {
  for (int b = 0; b < 16; b++) {
    uint8_t *blk = dst + b * B_Q4_0;
    memcpy(blk, src + 256 + 2 * b, 2);
    for (int k = 0; k < 4; k++) memcpy(blk + 2 + 4 * k, src + 64 * k + 4 * b, 4);
  }
}

// A job is a list of units (288-byte groups, or plain bytes for a copy) claimed in chunks by the pool's threads.
typedef struct { const uint8_t *src; uint8_t *dst; long long units; int group; atomic_llong next; } repack_job;
#define REPACK_CHUNK (1 << 20) // bytes per claim

static void repack_task(void *p, int ith, int nth) {
  (void)ith, (void)nth;
  repack_job *j = p;
  const long long per = j->group ? REPACK_CHUNK / RP_GROUP : REPACK_CHUNK;
  for (long long u0; (u0 = atomic_fetch_add(&j->next, per)) < j->units;) {
    const long long u1 = u0 + per < j->units ? u0 + per : j->units;
    if (!j->group) memcpy(j->dst + u0, j->src + u0, (size_t)(u1 - u0));
    else for (long long g = u0; g < u1; g++) repack_q4_0_group(j->src + g * RP_GROUP, j->dst + g * RP_GROUP);
  }
}

void moe_repack_rows(int wtype, const void *src, void *dst, long long rows, int n) {
  const int to = moe_repack_type(wtype, n);
  if (to < 0) abort(); // callers check moe_repack_type first
  repack_job j = {src, dst, 0, to == MOE_Q4_0_RP, 0};
  j.units = j.group ? rows * (n / (16 * QK)) : rows * (long long)moe_row_bytes(wtype, n);
  moe_pool_run(repack_task, &j);
}

void moe_gemm_tile(int wtype, int n, const void *w, size_t w_row_bytes, const void *act, size_t act_row_bytes, int R,
                   int j0, int j1, float *out, int ldo) {
  if (R <= 0 || j1 <= j0 || n <= 0) return;
  const uint8_t *wb = (const uint8_t *)w, *ab = (const uint8_t *)act;
  const int path = forced_path;
  if ((path == PATH_AUTO || path == PATH_AVX512) && have_avx512() &&
      moe_gemm_avx512(wtype, n, wb, w_row_bytes, ab, act_row_bytes, R, j0, j1, out, ldo))
    return;
  if (wtype == MOE_Q4_0_RP) {
    // Another kernel set was chosen after the weights were repacked (tests switch them): each row back to q4_0.
    const int ng = n / (16 * QK);
    uint8_t *row = (uint8_t *)malloc((size_t)ng * RP_GROUP);
    if (!row) abort();
    for (int j = j0; j < j1; j++) {
      for (int g = 0; g < ng; g++) unrepack_q4_0_group(wb + (size_t)j * w_row_bytes + (size_t)g * RP_GROUP, row + (size_t)g * RP_GROUP);
      moe_gemm_tile(MOE_Q4_0, n, row, w_row_bytes, act, act_row_bytes, R, 0, 1, out + j, ldo);
    }
    free(row);
    return;
  }
  if ((path == PATH_AUTO || path == PATH_AVX2) && have_avx2() &&
      moe_gemm_avx2(wtype, n, wb, w_row_bytes, ab, act_row_bytes, R, j0, j1, out, ldo))
    return;
  moe_gemm_generic(wtype, n, wb, w_row_bytes, ab, act_row_bytes, R, j0, j1, out, ldo);
}

#if !MOE_X86
// Non-x86 builds: the SIMD files compile to nothing, so these stubs keep the dispatch above linkable.
int moe_gemm_avx2(int wtype, int n, const uint8_t *w, size_t wrb, const uint8_t *act, size_t arb, int R, int j0,
                  int j1, float *out, int ldo) {
  (void)wtype, (void)n, (void)w, (void)wrb, (void)act, (void)arb, (void)R, (void)j0, (void)j1, (void)out, (void)ldo;
  return 0;
}
int moe_gemm_avx512(int wtype, int n, const uint8_t *w, size_t wrb, const uint8_t *act, size_t arb, int R, int j0,
                    int j1, float *out, int ldo) {
  (void)wtype, (void)n, (void)w, (void)wrb, (void)act, (void)arb, (void)R, (void)j0, (void)j1, (void)out, (void)ldo;
  return 0;
}
int moe_gemm_avx2_supports(int wtype) { (void)wtype; return 0; }
size_t moe_act32_suffix_bytes(int n) { (void)n; return 0; }
size_t moe_actK_suffix_bytes(int n) { (void)n; return 0; }
void moe_actK_suffix(const uint8_t *row, int n, uint8_t *suffix) { (void)row, (void)n, (void)suffix; }
void moe_act32_suffix(const uint8_t *row, int n, int q81, uint8_t *suffix) { (void)row, (void)n, (void)q81, (void)suffix; }
int moe_gemm_avx512_supports(int wtype) { (void)wtype; return 0; }
void moe_quantize_q8_0_avx2(const float *x, uint8_t *out, int n) { moe_quantize_q8_0_generic(x, out, n); }
void moe_quantize_q8_1_avx2(const float *x, uint8_t *out, int n) { moe_quantize_q8_1_generic(x, out, n); }
#endif
