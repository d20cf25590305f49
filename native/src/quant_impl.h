// Internals shared by the quantized-kernel files (quant.c: generic C and dispatch; quant_avx2.c; quant_avx512.c).
// Block layouts are ggml's (ggml-common.h); all multi-byte fields are little-endian and blocks are unaligned.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#define QK 32     // elements per q4_0 .. q8_1 block
#define QKK 256   // elements per K-quant super-block

// Bytes per block (ggml type_size).
#define B_Q4_0 18
#define B_Q4_1 20
#define B_Q5_0 22
#define B_Q5_1 24
#define B_Q8_0 34
#define B_Q8_1 36
#define B_Q2_K 84
#define B_Q3_K 110
#define B_Q4_K 144
#define B_Q5_K 176
#define B_Q6_K 210
#define B_Q8_K 292

static inline uint16_t rd16(const uint8_t *p) {
  uint16_t v;
  memcpy(&v, p, 2);
  return v;
}
static inline uint32_t rd32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}
static inline float rdf32(const uint8_t *p) {
  float v;
  memcpy(&v, p, 4);
  return v;
}

/** f16 bits -> f32, exact (software; ggml's GGML_FP16_TO_FP32 gives the same values). */
static inline float moe_h2f(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else { // subnormal half: normalise
      int e = -1;
      do {
        e++;
        mant <<= 1;
      } while (!(mant & 0x400));
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ff) << 13);
    }
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/** f32 -> f16 bits, round to nearest even (as F16C and ggml; src/tensor/f16.ts floatToHalf). */
static inline uint16_t moe_f2h(float v) {
  uint32_t x;
  memcpy(&x, &v, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  const uint32_t exp = (x >> 23) & 0xff;
  uint32_t mant = x & 0x7fffff;
  if (exp == 0xff) return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
  int e = (int)exp - 127 + 15;
  if (e >= 31) return (uint16_t)(sign | 0x7c00);
  if (e <= 0) {
    if (e < -10) return (uint16_t)sign;
    mant |= 0x800000;
    const int shift = 14 - e;
    uint32_t hm = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (hm & 1))) hm++;
    return (uint16_t)(sign | hm);
  }
  uint32_t hm = mant >> 13;
  const uint32_t rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (hm & 1))) {
    hm++;
    if (hm == 0x400) {
      hm = 0;
      if (++e >= 31) return (uint16_t)(sign | 0x7c00);
    }
  }
  return (uint16_t)(sign | ((uint32_t)e << 10) | hm);
}

/** ggml get_scale_min_k4: 6-bit scale and min number j (0..7) of a q4_K / q5_K block's 12 scale bytes. */
static inline void moe_scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
  }
}

/** The 8 scales then the 8 mins of a q4_K / q5_K block, as bytes in 4 words (ggml's utmp unpacking). */
static inline void moe_k4_scales_u32(const uint8_t *sc12, uint32_t u[4]) {
  memcpy(u, sc12, 12);
  const uint32_t kmask1 = 0x3f3f3f3f, kmask2 = 0x0f0f0f0f, kmask3 = 0x03030303;
  u[3] = ((u[2] >> 4) & kmask2) | (((u[1] >> 6) & kmask3) << 4);
  const uint32_t uaux = u[1] & kmask1;
  u[1] = (u[2] & kmask2) | (((u[0] >> 6) & kmask3) << 4);
  u[2] = uaux;
  u[0] &= kmask1;
}

static inline void moe_k4_scales(const uint8_t *sc12, uint8_t out[16]) {
  uint32_t u[4];
  moe_k4_scales_u32(sc12, u);
  memcpy(out, u, 16); // bytes 0..7: scales, 8..15: mins
}

/** The 16 signed 6-bit scales of a q3_K block (stored in 12 bytes) as bytes biased by +32, in 4 words. */
static inline void moe_q3k_scales_u32(const uint8_t *sc12, uint32_t aux[4]) {
  memcpy(aux, sc12, 12);
  const uint32_t kmask1 = 0x03030303, kmask2 = 0x0f0f0f0f;
  const uint32_t tmp = aux[2];
  aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
  aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
  aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
  aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
}

/** The 16 signed 6-bit scales of a q3_K block (stored in 12 bytes), minus 32, as int8. */
static inline void moe_q3k_scales(const uint8_t *sc12, int8_t out[16]) {
  uint32_t aux[4];
  moe_q3k_scales_u32(sc12, aux);
  memcpy(out, aux, 16);
  for (int j = 0; j < 16; j++) out[j] = (int8_t)(out[j] - 32);
}

/** Per-thread scratch memory, 64-byte aligned, grown on demand and kept (pool threads are persistent). */
void *moe_quant_scratch(size_t bytes);

// ---- per-ISA entry points: return 1 when they handled wtype, 0 to fall back ----
typedef int (*moe_gemm_fn)(int wtype, int n, const uint8_t *w, size_t wrb, const uint8_t *act, size_t arb, int R,
                           int j0, int j1, float *out, int ldo);
int moe_gemm_generic(int wtype, int n, const uint8_t *w, size_t wrb, const uint8_t *act, size_t arb, int R, int j0,
                     int j1, float *out, int ldo);
int moe_gemm_avx2(int wtype, int n, const uint8_t *w, size_t wrb, const uint8_t *act, size_t arb, int R, int j0,
                  int j1, float *out, int ldo);
int moe_gemm_avx512(int wtype, int n, const uint8_t *w, size_t wrb, const uint8_t *act, size_t arb, int R, int j0,
                    int j1, float *out, int ldo);
/** Which types each path implements (tests and dispatch). */
int moe_gemm_avx2_supports(int wtype);
int moe_gemm_avx512_supports(int wtype);

/** q8_0 / q8_1 activation rows with llama.cpp's x86 rounding; the AVX2 version (x86 only) gives the same bytes. */
void moe_quantize_q8_0_generic(const float *x, uint8_t *out, int n);
void moe_quantize_q8_1_generic(const float *x, uint8_t *out, int n);
void moe_quantize_q8_0_avx2(const float *x, uint8_t *out, int n);
void moe_quantize_q8_1_avx2(const float *x, uint8_t *out, int n);

/**
 * AVX-512 kernel layout of a q8_0 / q8_1 activation row (quant_avx512.c), appended by moe_quantize_act_row after the
 * ggml bytes (at the next multiple of 64) on CPUs with AVX-512 VNNI, so that each row is rearranged once per matmul
 * rather than once per tile. Depends only on the activation type, so rows stay shareable between weight types.
 */
size_t moe_act32_suffix_bytes(int n);
void moe_act32_suffix(const uint8_t *row, int n, int q81, uint8_t *suffix);
/** The same for q8_K rows (one layout for all five K types). */
size_t moe_actK_suffix_bytes(int n);
void moe_actK_suffix(const uint8_t *row, int n, uint8_t *suffix);

/** Forces a code path for tests and benchmarks: 0 = best available (default), 1 = generic, 2 = avx2, 3 = avx512. */
void moe_quant_force_path(int path);

// MOE_NO_X86_KERNELS builds what a non-x86 target builds (the generic C path only), to test that path anywhere.
#if (defined(__x86_64__) || defined(__i386__) || defined(_M_X64)) && !defined(MOE_NO_X86_KERNELS)
#define MOE_X86 1
#else
#define MOE_X86 0
#endif
