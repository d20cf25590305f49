// AVX-512 (F, BW, VL, VNNI) quantized matrix products. Compiled for any x86-64 (the instructions are enabled per
// function by the pragma below) and only called when moe_cpu() reports the features.
//
// Shape of every kernel: a tile of RW weight rows x RA activation rows over whole rows. Each weight block is loaded
// and unpacked once per tile and multiplied with up to 4 activation rows (register tiling), so prefill (R > 2) is
// compute-bound; for R <= 2 (decode) the tiles are one weight row, which streams from memory fastest.
//
// Weights are rearranged in registers so that each 32-bit lane holds one block (q4_0 .. q8_0: 16 blocks of 32 per
// register) or one 16-quant sub-block (K types: a super-block per register): dpbusd then leaves each block's exact
// integer dot product in its own lane and the float work (scale, convert, accumulate) happens once per 512 / 256
// quants. On this class of CPU (512-bit operations issued as two 256-bit halves), dpbusd and the float multiplies
// share the same pipes, so removing per-block float work is what makes prefill fast. Activation rows use a matching
// "kernel layout", which moe_quantize_act_row appends to the ggml bytes (or gemm32 / gemmK build per call).
//
// Integer sums are exact, as in ggml (dpbusd sums u8 x s8 products in 32 bits without saturation); only the float
// accumulation order differs from ggml's.
#include "quant_impl.h"

#if MOE_X86

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"))), \
                             apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#endif
#include <immintrin.h>
#include "hsum_avx512.h"

#define AI static inline __attribute__((always_inline))
#define MAXW 4
#define MAXA 4
#ifndef W32
#define W32 2 // weight rows per tile for the 32-block types (their unpacked weights take 8 registers a row)
#endif

#if defined(__clang__)
#define UNROLL _Pragma("clang loop unroll(full)")
#else
#define UNROLL _Pragma("GCC unroll 16")
#endif

static float hsum512(__m512 v) { return hsum16(v); }

// ================================================================================================================
// q4_0, q4_1, q5_0, q5_1, q8_0: blocks of 32, in groups of 16 blocks with one block per 32-bit lane
// ================================================================================================================
//
// Why transpose: the natural layout (a block or two per register) needs a float conversion, scale multiply and add
// for every 64 weights, and on this class of CPU those share the multiply pipes with dpbusd. Instead, 16 blocks of a
// row are transposed on the fly (4x4 dword transposes) so that 32-bit lane b of every register belongs to block b:
// eight dpbusd then leave each block's exact integer dot product in its own lane, and one cvt + fma with the 16
// blocks' dw * da finishes the group. The activation side is stored once per call in the same order.
//
// Kernel layout of one activation group (16 blocks): A[8] (A[k] lane b = quants 4k..4k+3 of block b) | N (lane b:
// -8 * the sum of block b's quants: weights stored unsigned as u = w + k need -k * sum, k = 8, 16 or 128) | DA (block
// scales) | S (q8_1: the sums s). It depends only on the activation type (q8_0 or q8_1), so one converted row serves
// every weight type that shares it. moe_quantize_act_row appends it to the ggml bytes on AVX-512 CPUs (see
// moe_act32_suffix); rows without it are converted per call.
#define G_A 0
#define G_N 512
#define G_DA 576
#define G_S 640
#define G_STRIDE 704

static int block_bytes(int wtype) {
  switch (wtype) {
    case MOE_Q4_0: case MOE_Q4_0_RP: return B_Q4_0; // a repacked group has the same 16 * 18 bytes
    case MOE_Q4_1: return B_Q4_1;
    case MOE_Q5_0: return B_Q5_0;
    case MOE_Q5_1: return B_Q5_1;
    default: return B_Q8_0;
  }
}

/** 16 f16 values at p, p + bs, ... as floats: scalar packing, one conversion. */
AI __m512 scales16(const uint8_t *p, const int bs) {
  // The 16 f16 fields are words W = bs / 2 apart (every block size is even), so word permutes over 64-word windows
  // (vpermt2w, AVX512BW) collect them: 8 blocks per window for q4_0, 4 for q8_0. Far fewer instructions than 16
  // scalar loads, shifts and ors, which cost as much as the rest of a q4_0 group. A window starts at a block's field
  // or, near the end, at 16 * bs - 2 - 128 bytes, so no byte past the group is read (p may be the group + 2).
  const int W = bs / 2, per = 63 / W + 1, smax = 8 * bs - 65;
  __m512i r = _mm512_setzero_si512();
  UNROLL for (int b0 = 0; b0 < 16; b0 += per) {
    const int s = b0 * W < smax ? b0 * W : smax;
    short idx[32] = {0};
    __mmask32 m = 0;
    UNROLL for (int b = b0; b < b0 + per; b++) {
      if (b < 16) {
        idx[b] = (short)(b * W - s);
        m |= 1u << b;
      }
    }
    const __m512i lo = _mm512_loadu_si512((const void *)(p + 2 * s)), hi = _mm512_loadu_si512((const void *)(p + 2 * s + 64));
    r = _mm512_mask_mov_epi16(r, m, _mm512_permutex2var_epi16(lo, _mm512_loadu_si512((const void *)idx), hi));
  }
  return _mm512_cvtph_ps(_mm512_castsi512_si256(r));
}

/** 16 x 32 bits at p, p + bs, ... (q5's high bits) as one vector. */
AI __m512i words16(const uint8_t *p, const int bs) {
  uint64_t q[8];
  UNROLL for (int k = 0; k < 8; k++) q[k] = rd32(p + 2 * k * bs) | (uint64_t)rd32(p + (2 * k + 1) * bs) << 32;
  return _mm512_set_epi64((long long)q[7], (long long)q[6], (long long)q[5], (long long)q[4], (long long)q[3],
                          (long long)q[2], (long long)q[1], (long long)q[0]);
}

/** 128-bit lanes [p, p + s, p + 2s, p + 3s]. */
AI __m512i load4x16(const uint8_t *p, const int s) {
  const __m256i lo = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p)),
                                             _mm_loadu_si128((const __m128i *)(p + s)), 1);
  const __m256i hi = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(p + 2 * s))),
                                             _mm_loadu_si128((const __m128i *)(p + 3 * s)), 1);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/** 16 bytes of each of 16 blocks (at p + b * bs): out[k] lane b = bytes 4k..4k+3 of block b. */
AI void transpose16(const uint8_t *p, const int bs, __m512i out[4]) {
  // t_m lane L = block 4L + m, so after the in-lane 4x4 transpose dword 4L + m of out[k] is block 4L + m's word k
  const __m512i t0 = load4x16(p, 4 * bs), t1 = load4x16(p + bs, 4 * bs), t2 = load4x16(p + 2 * bs, 4 * bs),
                t3 = load4x16(p + 3 * bs, 4 * bs);
  const __m512i a = _mm512_unpacklo_epi32(t0, t1), b = _mm512_unpackhi_epi32(t0, t1);
  const __m512i c = _mm512_unpacklo_epi32(t2, t3), d = _mm512_unpackhi_epi32(t2, t3);
  out[0] = _mm512_unpacklo_epi64(a, c);
  out[1] = _mm512_unpackhi_epi64(a, c);
  out[2] = _mm512_unpacklo_epi64(b, d);
  out[3] = _mm512_unpackhi_epi64(b, d);
}

/** A group's weights as unsigned bytes in the activation order: v[k] lane b = elements 4k..4k+3 of block b. */
AI void unpack_group(const int wtype, const uint8_t *b, const int bs, __m512i v[8]) {
  if (wtype == MOE_Q4_0_RP) { // repacked (quant.c): the transposed nibble bytes as they are stored
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    UNROLL for (int k = 0; k < 4; k++) {
      const __m512i t = _mm512_loadu_si512((const void *)(b + 64 * k));
      v[k] = _mm512_and_si512(t, m4);
      v[4 + k] = _mm512_and_si512(_mm512_srli_epi16(t, 4), m4);
    }
    return;
  }
  if (wtype == MOE_Q8_0) {
    transpose16(b + 2, bs, v);
    transpose16(b + 18, bs, v + 4);
    const __m512i flip = _mm512_set1_epi8((char)0x80); // w + 128 as unsigned
    UNROLL for (int k = 0; k < 8; k++) v[k] = _mm512_xor_si512(v[k], flip);
    return;
  }
  const int qo = wtype == MOE_Q4_0 ? 2 : wtype == MOE_Q4_1 ? 4 : wtype == MOE_Q5_0 ? 6 : 8;
  __m512i t[4];
  transpose16(b + qo, bs, t);
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  UNROLL for (int k = 0; k < 4; k++) {
    v[k] = _mm512_and_si512(t[k], m4);                         // low nibbles: elements 4k..4k+3
    v[4 + k] = _mm512_and_si512(_mm512_srli_epi16(t[k], 4), m4); // high nibbles: elements 16+4k..16+4k+3
  }
  if (wtype == MOE_Q5_0 || wtype == MOE_Q5_1) {
    // qh bit j is element j's 5th bit. Lane b of h holds block b's qh; for elements 4k..4k+3, byte k/2 of it
    // (nibble k%2) is spread to the lane's 4 bytes and each byte tests its own bit.
    const __m512i h = words16(b + qo - 4, bs);
    const __m512i sixteen = _mm512_set1_epi8(16);
    UNROLL for (int k = 0; k < 8; k++) {
      const int byte = k >> 1, nib = 4 * (k & 1);
      const __m512i ctrl = _mm512_add_epi8(_mm512_set1_epi8((char)byte),
                                           _mm512_set4_epi32(0x0C0C0C0C, 0x08080808, 0x04040404, 0)); // dword d: 4d + byte
      const __m512i spread = _mm512_shuffle_epi8(h, ctrl);
      const __m512i bits = _mm512_set1_epi32((int)((1u << nib) | (2u << nib) << 8 | (4u << nib) << 16 | (8u << nib) << 24));
      v[k] = _mm512_mask_add_epi8(v[k], _mm512_test_epi8_mask(spread, bits), v[k], sixteen);
    }
  }
}

/** One ggml q8_0 / q8_1 activation row (nb blocks) in the kernel layout (ng groups, zero-padded) at o. */
static void act32_layout(const uint8_t *a, int nb, int q81, uint8_t *o) {
  const int bsz = q81 ? B_Q8_1 : B_Q8_0, qo = q81 ? 4 : 2, ng = (nb + 15) / 16;
  uint8_t tmp[16 * B_Q8_1];
  for (int g = 0; g < ng; g++, o += G_STRIDE) {
    const int cnt = nb - 16 * g < 16 ? nb - 16 * g : 16;
    const uint8_t *blk = a + (size_t)(16 * g) * bsz;
    if (cnt < 16) { // the last blocks next to zero blocks (scale 0)
      memcpy(tmp, blk, (size_t)cnt * bsz);
      memset(tmp + cnt * bsz, 0, (size_t)(16 - cnt) * bsz);
      blk = tmp;
    }
    __m512i A[8];
    transpose16(blk + qo, bsz, A);
    transpose16(blk + qo + 16, bsz, A + 4);
    __m512i sum = _mm512_setzero_si512();
    const __m512i ones = _mm512_set1_epi8(1);
    UNROLL for (int k = 0; k < 8; k++) {
      _mm512_storeu_si512((void *)(o + G_A + 64 * k), A[k]);
      sum = _mm512_dpbusd_epi32(sum, ones, A[k]);
    }
    _mm512_storeu_si512((void *)(o + G_N), _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, 3)));
    _mm512_storeu_ps((float *)(o + G_DA), scales16(blk, bsz));
    _mm512_storeu_ps((float *)(o + G_S), q81 ? scales16(blk + 2, bsz) : _mm512_setzero_ps());
  }
}

size_t moe_act32_suffix_bytes(int n) { return (size_t)((n / QK + 15) / 16) * G_STRIDE; }

void moe_act32_suffix(const uint8_t *row, int n, int q81, uint8_t *suffix) { act32_layout(row, n / QK, q81, suffix); }

/** One group of 16 blocks: RW weight rows (blocks at wp[i]) x RA activation rows (group data at ag + r * astride). */
AI void group32(const int wtype, const int RW, const int RA, const uint8_t *const *wp, const int bs,
                const uint8_t *ag, const size_t astride, __m512 acc[MAXW][MAXA]) {
  const int q81 = wtype == MOE_Q4_1 || wtype == MOE_Q5_1;
  // All RW rows' unpacked weights stay in registers, so each activation vector is loaded once for all of them.
  __m512i v[MAXW][8];
  __m512 dw[MAXW], mw[MAXW];
  UNROLL for (int i = 0; i < RW; i++) {
    unpack_group(wtype, wp[i], bs, v[i]);
    dw[i] = wtype == MOE_Q4_0_RP ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wp[i] + 256))) : scales16(wp[i], bs);
    if (q81) mw[i] = scales16(wp[i] + 2, bs);
  }
  UNROLL for (int r = 0; r < RA; r++) {
    const uint8_t *a = ag + (size_t)r * astride;
    __m512i isum[MAXW];
    __m512i init = _mm512_setzero_si512(); // -k * sum(a) for weights stored as u = w + k
    if (!q81) {
      init = _mm512_loadu_si512((const void *)(a + G_N)); // -8 * sum
      if (wtype == MOE_Q5_0) init = _mm512_add_epi32(init, init);
      if (wtype == MOE_Q8_0) init = _mm512_slli_epi32(init, 4);
    }
    UNROLL for (int i = 0; i < RW; i++) isum[i] = init;
    UNROLL for (int k = 0; k < 8; k++) {
      const __m512i av = _mm512_loadu_si512((const void *)(a + G_A + 64 * k));
      UNROLL for (int i = 0; i < RW; i++) isum[i] = _mm512_dpbusd_epi32(isum[i], v[i][k], av);
    }
    const __m512 da = _mm512_loadu_ps((const float *)(a + G_DA));
    UNROLL for (int i = 0; i < RW; i++) {
      acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), _mm512_mul_ps(dw[i], da), acc[i][r]);
      if (q81) acc[i][r] = _mm512_fmadd_ps(mw[i], _mm512_loadu_ps((const float *)(a + G_S)), acc[i][r]); // + m * s
    }
  }
}

AI void tile32_acc(const int wtype, const int RW, const int RA, const uint8_t *w, size_t wrb, int nb, const uint8_t *ax,
                   size_t astride, __m512 acc[MAXW][MAXA]) {
  const int bs = block_bytes(wtype), full = nb / 16;
  UNROLL for (int i = 0; i < RW; i++) UNROLL for (int r = 0; r < RA; r++) acc[i][r] = _mm512_setzero_ps();
  const uint8_t *wp[MAXW];
  for (int g = 0; g < full; g++) {
    UNROLL for (int i = 0; i < RW; i++) wp[i] = w + (size_t)i * wrb + (size_t)(16 * g) * bs;
    group32(wtype, RW, RA, wp, bs, ax + (size_t)g * G_STRIDE, astride, acc);
  }
  if (nb % 16) { // the last blocks, copied next to zero blocks (scale 0) so no byte past the row is read
    const int cnt = nb % 16;
    uint8_t tmp[MAXW][16 * B_Q8_0];
    UNROLL for (int i = 0; i < RW; i++) {
      memcpy(tmp[i], w + (size_t)i * wrb + (size_t)(16 * full) * bs, (size_t)cnt * bs);
      memset(tmp[i] + cnt * bs, 0, (size_t)(16 - cnt) * bs);
      wp[i] = tmp[i];
    }
    group32(wtype, RW, RA, wp, bs, ax + (size_t)full * G_STRIDE, astride, acc);
  }
}

AI void tile32(const int wtype, const int RW, const int RA, const uint8_t *w, size_t wrb, int nb, const uint8_t *ax,
               size_t astride, float *out, int ldo) {
  __m512 acc[MAXW][MAXA];
  tile32_acc(wtype, RW, RA, w, wrb, nb, ax, astride, acc);
  UNROLL for (int i = 0; i < RW; i++) UNROLL for (int r = 0; r < RA; r++) out[(size_t)r * ldo + i] = hsum512(acc[i][r]);
}

#define TILE_FN(NAME, T)                                                                                            \
  static void NAME(int RW, int RA, const uint8_t *w, size_t wrb, int nb, const uint8_t *ax, size_t astride,       \
                   float *out, int ldo) {                                                                           \
    switch ((RW - 1) * MAXA + (RA - 1)) {                                                                           \
      case 0: tile32(T, 1, 1, w, wrb, nb, ax, astride, out, ldo); break;                                            \
      case 1: tile32(T, 1, 2, w, wrb, nb, ax, astride, out, ldo); break;                                            \
      case 2: tile32(T, 1, 3, w, wrb, nb, ax, astride, out, ldo); break;                                            \
      case 3: tile32(T, 1, 4, w, wrb, nb, ax, astride, out, ldo); break;                                            \
      case 4: tile32(T, 2, 1, w, wrb, nb, ax, astride, out, ldo); break;                                            \
      case 5: tile32(T, 2, 2, w, wrb, nb, ax, astride, out, ldo); break;                                            \
      case 6: tile32(T, 2, 3, w, wrb, nb, ax, astride, out, ldo); break;                                            \
      case 7: tile32(T, 2, 4, w, wrb, nb, ax, astride, out, ldo); break;                                            \
      case 8: tile32(T, 3, 1, w, wrb, nb, ax, astride, out, ldo); break;                                            \
      case 9: tile32(T, 3, 2, w, wrb, nb, ax, astride, out, ldo); break;                                            \
      case 10: tile32(T, 3, 3, w, wrb, nb, ax, astride, out, ldo); break;                                           \
      case 11: tile32(T, 3, 4, w, wrb, nb, ax, astride, out, ldo); break;                                           \
      case 12: tile32(T, 4, 1, w, wrb, nb, ax, astride, out, ldo); break;                                           \
      case 13: tile32(T, 4, 2, w, wrb, nb, ax, astride, out, ldo); break;                                           \
      case 14: tile32(T, 4, 3, w, wrb, nb, ax, astride, out, ldo); break;                                           \
      default: tile32(T, 4, 4, w, wrb, nb, ax, astride, out, ldo); break;                                           \
    }                                                                                                               \
  }
TILE_FN(tile_q4_0, MOE_Q4_0)
TILE_FN(tile_q4_0_rp, MOE_Q4_0_RP)
TILE_FN(tile_q4_1, MOE_Q4_1)
TILE_FN(tile_q5_0, MOE_Q5_0)
TILE_FN(tile_q5_1, MOE_Q5_1)
TILE_FN(tile_q8_0, MOE_Q8_0)

typedef void (*tile_fn)(int RW, int RA, const uint8_t *w, size_t wrb, int nb, const uint8_t *ax, size_t astride,
                        float *out, int ldo);

/** Rows j0..j1 in groups of MAXW weight rows; each group against all R activation rows in groups of MAXA. */
static void run_tiles(tile_fn fn, int mw, const uint8_t *w, size_t wrb, int nb, const uint8_t *ax, size_t astride,
                      int R, int j0, int j1, float *out, int ldo) {
  for (int j = j0; j < j1; j += mw) {
    const int rw = j1 - j < mw ? j1 - j : mw;
    for (int r = 0; r < R; r += MAXA) {
      const int ra = R - r < MAXA ? R - r : MAXA;
      fn(rw, ra, w + (size_t)j * wrb, wrb, nb, ax + (size_t)r * astride, astride, out + (size_t)r * ldo + j, ldo);
    }
  }
}

static int gemv(int wtype, int R, const uint8_t *w, size_t wrb, int nb, const uint8_t *ax, size_t astride, int j0,
                int j1, float *out, int ldo);

static int gemm32(int wtype, int n, const uint8_t *w, size_t wrb, const uint8_t *act, size_t arb, int R, int j0,
                  int j1, float *out, int ldo) {
  const int nb = n / QK, q81 = wtype == MOE_Q4_1 || wtype == MOE_Q5_1;
  const size_t ggml = (size_t)nb * (q81 ? B_Q8_1 : B_Q8_0), off = (ggml + 63) & ~(size_t)63;
  const size_t suffix = moe_act32_suffix_bytes(n);
  const uint8_t *ax;
  size_t astride;
  if (arb == off + suffix) { // rows laid out by moe_quantize_act_row (stride moe_act_row_bytes) carry the kernel layout
    ax = act + off;
    astride = arb;
  } else {
    uint8_t *buf = (uint8_t *)moe_quant_scratch(suffix * R);
    for (int r = 0; r < R; r++) act32_layout(act + (size_t)r * arb, nb, q81, buf + suffix * r);
    ax = buf;
    astride = suffix;
  }
  if (wtype == MOE_Q4_0_RP && nb % 16) return 0; // repacked rows are whole groups (moe_repack_type)
  if (R <= 2) return gemv(wtype, R, w, wrb, nb, ax, astride, j0, j1, out, ldo);
  tile_fn fn = wtype == MOE_Q4_0   ? tile_q4_0
               : wtype == MOE_Q4_0_RP ? tile_q4_0_rp
               : wtype == MOE_Q4_1 ? tile_q4_1
               : wtype == MOE_Q5_0 ? tile_q5_0
               : wtype == MOE_Q5_1 ? tile_q5_1
                                   : tile_q8_0;
  run_tiles(fn, W32, w, wrb, nb, ax, astride, R, j0, j1, out, ldo);
  return 1;
}

// ================================================================================================================
// K-quants (super-blocks of 256 against q8_K activations), one 16-quant sub-block per 32-bit lane
// ================================================================================================================
//
// Every K type is rearranged on the fly (vpermt2d / vpermd and per-lane shifts) so that lane t of register w holds
// quants 16t + 4w .. 16t + 4w + 3: four dpbusd leave each 16-quant sub-block's exact integer dot product in its own
// lane, and the float work (one conversion, one multiply-add with the per-lane scale d * scale_t, one for the mins)
// happens once per super-block. Sub-block scales of q4_K / q5_K cover 32 quants, i.e. two lanes.
//
// Kernel layout of one activation super-block (the same for every K type): A[4] (A[w] lane t = quants
// 16t + 4w .. + 3) | NB (lane t: -32 * bsum_t, int32) | BSF (lane t: bsum_t * d, float) | d (float).
#define K_A 0
#define K_NB 256
#define K_BSF 320
#define K_D 384
#define K_STRIDE 448

/** One ggml q8_K activation row (nsb super-blocks) in the kernel layout at o. */
static void actK_layout(const uint8_t *a, int nsb, uint8_t *o) {
  for (int s = 0; s < nsb; s++, a += B_Q8_K, o += K_STRIDE) {
    __m512i A[4];
    transpose16(a + 4, 16, A); // the 16 sub-blocks of 16 quants as "blocks" of 16 bytes
    UNROLL for (int w = 0; w < 4; w++) _mm512_storeu_si512((void *)(o + K_A + 64 * w), A[w]);
    const __m512i bs = _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)(a + 260)));
    _mm512_storeu_si512((void *)(o + K_NB), _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(bs, 5)));
    const float d = rdf32(a);
    _mm512_storeu_ps((float *)(o + K_BSF), _mm512_mul_ps(_mm512_cvtepi32_ps(bs), _mm512_set1_ps(d)));
    _mm512_storeu_ps((float *)(o + K_D), _mm512_set1_ps(d));
  }
}

size_t moe_actK_suffix_bytes(int n) { return (size_t)(n / QKK) * K_STRIDE; }

void moe_actK_suffix(const uint8_t *row, int n, uint8_t *suffix) { actK_layout(row, n / QKK, suffix); }

/** ggml's utmp unpacking of q4_K / q5_K scales, in SIMD: bytes 0..7 the 6-bit scales, 8..15 the mins. */
AI __m128i k4_scales_vec(const uint8_t *sc12) {
  // u0, u1, u2 = the 12 bytes as words; out = (u0 & m1, (u2 & m2) | ((u0 >> 6) & m3) << 4, u1 & m1,
  // ((u2 >> 4) & m2) | ((u1 >> 6) & m3) << 4). The 16-byte load stays inside the block (scales are followed by qs).
  const __m128i v = _mm_loadu_si128((const __m128i *)sc12);
  const __m128i lo = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(v, _MM_SHUFFLE(2, 1, 2, 0)), _mm_setr_epi32(0, 0, 0, 4)),
                                   _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
  const __m128i hi = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(v, _MM_SHUFFLE(1, 1, 0, 0)), _mm_setr_epi32(0, 6, 0, 6)),
                                   _mm_setr_epi32(0, 0x03030303, 0, 0x03030303));
  return _mm_or_si128(lo, _mm_slli_epi32(hi, 4));
}

/** The 16 q3_K scales (6-bit, stored + 32) as bytes, in SIMD (ggml's aux unpacking). */
AI __m128i q3k_scales_vec(const uint8_t *sc12) {
  // a0, a1, a2 = the 12 bytes as words; out = ((a0, a1, a0 >> 4, a1 >> 4) & 0x0f) | ((a2 >> (0, 2, 4, 6)) & 3) << 4.
  // 12 bytes are loaded as 8 + 4 so nothing past the block (d follows the scales) is read.
  const __m128i v = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)sc12), _mm_cvtsi32_si128((int)rd32(sc12 + 8)));
  const __m128i lo = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 1, 0)), _mm_setr_epi32(0, 0, 4, 4)),
                                   _mm_set1_epi8(0x0f));
  const __m128i hi = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(v, _MM_SHUFFLE(2, 2, 2, 2)), _mm_setr_epi32(0, 2, 4, 6)),
                                   _mm_set1_epi8(0x03));
  return _mm_or_si128(lo, _mm_slli_epi32(hi, 4));
}

/** What one weight super-block unpacks to. */
typedef struct {
  __m512i q[4]; // q[w] lane t: quants 16t + 4w .. + 3 as unsigned bytes
  __m512 sc;    // lane t: d * scale of sub-block t (float)
  __m512 mn;    // lane t: dmin * min of sub-block t (q2/4/5_K; subtracted as mn * bsum * d_act)
} wblockK;

/** lane t -> idx(t) for t = 0..15, as a vector. */
#define LANES(f)                                                                                                    \
  _mm512_set_epi32(f(15), f(14), f(13), f(12), f(11), f(10), f(9), f(8), f(7), f(6), f(5), f(4), f(3), f(2), f(1), \
                   f(0))

/** 16 bytes (b[t] for lane t, or b[t / 2] with dup) as 16 floats times x. */
AI __m512 lanes_f(__m128i b8, const int dup, const int is_signed, float x) {
  if (dup) b8 = _mm_shuffle_epi8(b8, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7));
  const __m512i v = is_signed ? _mm512_cvtepi8_epi32(b8) : _mm512_cvtepu8_epi32(b8);
  return _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(x));
}

AI void unpack_q4_K(const uint8_t *x, wblockK *u, const int five) {
  const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)rd32(x))); // d, dmin
  const __m128i s8 = k4_scales_vec(x + 4);
  u->sc = lanes_f(s8, 1, 0, _mm_cvtss_f32(dm));
  u->mn = lanes_f(_mm_unpackhi_epi64(s8, s8), 1, 0, _mm_cvtss_f32(_mm_movehdup_ps(dm)));
  // quant 16t + 4w + b: chunk j = t / 4 (32 bytes), nibble (t / 2) % 2, byte 16 (t % 2) + 4w + b of the chunk
  const uint8_t *qs = x + (five ? 48 : 16);
  const __m512i z0 = _mm512_loadu_si512((const void *)qs), z1 = _mm512_loadu_si512((const void *)(qs + 64));
#define K4_IDX(t) (8 * ((t) / 4) + 4 * ((t) % 2))
#define K4_SH(t) (4 * (((t) / 2) % 2))
  const __m512i idx = LANES(K4_IDX), sh = LANES(K4_SH), m4 = _mm512_set1_epi8(0x0F);
  __m512i qh = _mm512_setzero_si512(), hbit = _mm512_setzero_si512();
  if (five) { // 5th bit of quant 16t + 4w + b: bit (t / 2) of qh byte 16 (t % 2) + 4w + b
    qh = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(x + 16)));
#define K5_BIT(t) (0x01010101 << ((t) / 2))
    hbit = LANES(K5_BIT);
  }
  UNROLL for (int w = 0; w < 4; w++) {
    const __m512i iw = _mm512_add_epi32(idx, _mm512_set1_epi32(w));
    __m512i v = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutex2var_epi32(z0, iw, z1), sh), m4);
    if (five) {
#define K5_IDX(t) (4 * ((t) % 2))
      const __m512i h = _mm512_permutexvar_epi32(_mm512_add_epi32(LANES(K5_IDX), _mm512_set1_epi32(w)), qh);
      v = _mm512_mask_add_epi8(v, _mm512_test_epi8_mask(h, hbit), v, _mm512_set1_epi8(16));
    }
    u->q[w] = v;
  }
}

AI void unpack_q6_K(const uint8_t *x, wblockK *u) {
  u->sc = lanes_f(_mm_loadu_si128((const __m128i *)(x + 192)), 0, 1, _cvtsh_ss(rd16(x + 208)));
  u->mn = _mm512_setzero_ps();
  // quant 16t + 4w + b: half h = t / 8, quarter q = (t % 8) / 2; low 4 bits in ql byte 64h + 32 (q % 2) + 16 (t % 2)
  // + 4w + b, nibble q / 2; high 2 bits in qh byte 32h + 16 (t % 2) + 4w + b, bits 2q, 2q + 1
  const __m512i l0 = _mm512_loadu_si512((const void *)x), l1 = _mm512_loadu_si512((const void *)(x + 64));
  const __m512i qh = _mm512_loadu_si512((const void *)(x + 128));
#define K6_LIDX(t) (16 * ((t) / 8) + 8 * (((t) % 8) / 2 % 2) + 4 * ((t) % 2))
#define K6_LSH(t) (4 * (((t) % 8) / 4))
#define K6_HIDX(t) (8 * ((t) / 8) + 4 * ((t) % 2))
#define K6_HROT(t) ((4 - 2 * (((t) % 8) / 2)) & 31)
  const __m512i lidx = LANES(K6_LIDX), lsh = LANES(K6_LSH), hidx = LANES(K6_HIDX), hrot = LANES(K6_HROT);
  const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
  UNROLL for (int w = 0; w < 4; w++) {
    const __m512i wv = _mm512_set1_epi32(w);
    const __m512i lo = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutex2var_epi32(l0, _mm512_add_epi32(lidx, wv), l1), lsh), m4);
    const __m512i hi = _mm512_and_si512(_mm512_rolv_epi32(_mm512_permutexvar_epi32(_mm512_add_epi32(hidx, wv), qh), hrot), m30);
    u->q[w] = _mm512_or_si512(lo, hi);
  }
}

/** q2_K and q3_K: 2-bit planes; quant 16t + 4w + b is in qs byte 32h + 16 (t % 2) + 4w + b, bits 2s, 2s + 1,
 *  with h = t / 8, s = (t % 8) / 2. q3_K adds 4 where hmask byte 16 (t % 2) + 4w + b has bit 4h + s. */
AI void unpack_q23_K(const uint8_t *x, wblockK *u, const int three) {
  const uint8_t *qs = x + (three ? 32 : 16);
  if (three) {
    const __m512i sc = _mm512_sub_epi32(_mm512_cvtepu8_epi32(q3k_scales_vec(x + 96)), _mm512_set1_epi32(32));
    u->sc = _mm512_mul_ps(_mm512_cvtepi32_ps(sc), _mm512_set1_ps(_cvtsh_ss(rd16(x + 108))));
    u->mn = _mm512_setzero_ps();
  } else {
    const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)rd32(x + 80)));
    const __m128i s8 = _mm_loadu_si128((const __m128i *)x);
    u->sc = lanes_f(_mm_and_si128(s8, _mm_set1_epi8(0x0F)), 0, 0, _mm_cvtss_f32(dm));
    u->mn = lanes_f(_mm_and_si128(_mm_srli_epi16(s8, 4), _mm_set1_epi8(0x0F)), 0, 0, _mm_cvtss_f32(_mm_movehdup_ps(dm)));
  }
  const __m512i q = _mm512_loadu_si512((const void *)qs);
#define K2_IDX(t) (8 * ((t) / 8) + 4 * ((t) % 2))
#define K2_SH(t) (2 * (((t) % 8) / 2))
#define K3_HIDX(t) (4 * ((t) % 2))
#define K3_BIT(t) (0x01010101 << (4 * ((t) / 8) + ((t) % 8) / 2))
  const __m512i idx = LANES(K2_IDX), sh = LANES(K2_SH), m3 = _mm512_set1_epi8(3);
  __m512i hm = _mm512_setzero_si512(), hidx = _mm512_setzero_si512(), hbit = _mm512_setzero_si512();
  if (three) {
    hm = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)x));
    hidx = LANES(K3_HIDX);
    hbit = LANES(K3_BIT);
  }
  UNROLL for (int w = 0; w < 4; w++) {
    const __m512i wv = _mm512_set1_epi32(w);
    __m512i v = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(_mm512_add_epi32(idx, wv), q), sh), m3);
    if (three) {
      const __m512i h = _mm512_permutexvar_epi32(_mm512_add_epi32(hidx, wv), hm);
      v = _mm512_mask_add_epi8(v, _mm512_test_epi8_mask(h, hbit), v, _mm512_set1_epi8(4));
    }
    u->q[w] = v;
  }
}

AI int k_bytes(const int wtype) {
  return wtype == MOE_Q2_K ? B_Q2_K : wtype == MOE_Q3_K ? B_Q3_K : wtype == MOE_Q4_K ? B_Q4_K
       : wtype == MOE_Q5_K ? B_Q5_K : B_Q6_K;
}

AI void bodyK(const int wtype, const int RW, const int RA, const uint8_t *const *wp, const uint8_t *ap,
              const size_t astride, __m512 acc[MAXW][MAXA]) {
  const int mins = wtype == MOE_Q2_K || wtype == MOE_Q4_K || wtype == MOE_Q5_K;
  UNROLL for (int i = 0; i < RW; i++) {
    wblockK u;
    switch (wtype) {
      case MOE_Q2_K: unpack_q23_K(wp[i], &u, 0); break;
      case MOE_Q3_K: unpack_q23_K(wp[i], &u, 1); break;
      case MOE_Q4_K: unpack_q4_K(wp[i], &u, 0); break;
      case MOE_Q5_K: unpack_q4_K(wp[i], &u, 1); break;
      default: unpack_q6_K(wp[i], &u); break;
    }
    UNROLL for (int r = 0; r < RA; r++) {
      const uint8_t *a = ap + (size_t)r * astride;
      // quants stored with an offset (q6_K + 32, q3_K + 4) start from -offset * bsum
      __m512i isum = _mm512_setzero_si512();
      if (wtype == MOE_Q6_K) isum = _mm512_loadu_si512((const void *)(a + K_NB));
      if (wtype == MOE_Q3_K) isum = _mm512_srai_epi32(_mm512_loadu_si512((const void *)(a + K_NB)), 3);
      UNROLL for (int w = 0; w < 4; w++)
        isum = _mm512_dpbusd_epi32(isum, u.q[w], _mm512_loadu_si512((const void *)(a + K_A + 64 * w)));
      const __m512 d = _mm512_mul_ps(u.sc, _mm512_loadu_ps((const float *)(a + K_D)));
      acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), d, acc[i][r]);
      if (mins) acc[i][r] = _mm512_fnmadd_ps(u.mn, _mm512_loadu_ps((const float *)(a + K_BSF)), acc[i][r]);
    }
  }
}

AI void tileK_acc(const int wtype, const int RW, const int RA, const uint8_t *w, size_t wrb, int nsb, const uint8_t *ax,
                  size_t astride, __m512 acc[MAXW][MAXA]) {
  const int bs = k_bytes(wtype);
  UNROLL for (int i = 0; i < RW; i++) UNROLL for (int r = 0; r < RA; r++) acc[i][r] = _mm512_setzero_ps();
  const uint8_t *wp[MAXW];
  for (int s = 0; s < nsb; s++) {
    UNROLL for (int i = 0; i < RW; i++) wp[i] = w + (size_t)i * wrb + (size_t)s * bs;
    bodyK(wtype, RW, RA, wp, ax + (size_t)s * K_STRIDE, astride, acc);
  }
}

AI void tileK(const int wtype, const int RW, const int RA, const uint8_t *w, size_t wrb, int nsb, const uint8_t *ax,
              size_t astride, float *out, int ldo) {
  __m512 acc[MAXW][MAXA];
  tileK_acc(wtype, RW, RA, w, wrb, nsb, ax, astride, acc);
  UNROLL for (int i = 0; i < RW; i++) UNROLL for (int r = 0; r < RA; r++) out[(size_t)r * ldo + i] = hsum512(acc[i][r]);
}

#define TILEK_FN(NAME, T)                                                                                           \
  static void NAME(int RW, int RA, const uint8_t *w, size_t wrb, int nb, const uint8_t *ax, size_t astride,       \
                   float *out, int ldo) {                                                                           \
    switch ((RW - 1) * MAXA + (RA - 1)) {                                                                           \
      case 0: tileK(T, 1, 1, w, wrb, nb, ax, astride, out, ldo); break;                                             \
      case 1: tileK(T, 1, 2, w, wrb, nb, ax, astride, out, ldo); break;                                             \
      case 2: tileK(T, 1, 3, w, wrb, nb, ax, astride, out, ldo); break;                                             \
      case 3: tileK(T, 1, 4, w, wrb, nb, ax, astride, out, ldo); break;                                             \
      case 4: tileK(T, 2, 1, w, wrb, nb, ax, astride, out, ldo); break;                                             \
      case 5: tileK(T, 2, 2, w, wrb, nb, ax, astride, out, ldo); break;                                             \
      case 6: tileK(T, 2, 3, w, wrb, nb, ax, astride, out, ldo); break;                                             \
      case 7: tileK(T, 2, 4, w, wrb, nb, ax, astride, out, ldo); break;                                             \
      case 8: tileK(T, 3, 1, w, wrb, nb, ax, astride, out, ldo); break;                                             \
      case 9: tileK(T, 3, 2, w, wrb, nb, ax, astride, out, ldo); break;                                             \
      case 10: tileK(T, 3, 3, w, wrb, nb, ax, astride, out, ldo); break;                                            \
      case 11: tileK(T, 3, 4, w, wrb, nb, ax, astride, out, ldo); break;                                            \
      case 12: tileK(T, 4, 1, w, wrb, nb, ax, astride, out, ldo); break;                                            \
      case 13: tileK(T, 4, 2, w, wrb, nb, ax, astride, out, ldo); break;                                            \
      case 14: tileK(T, 4, 3, w, wrb, nb, ax, astride, out, ldo); break;                                            \
      default: tileK(T, 4, 4, w, wrb, nb, ax, astride, out, ldo); break;                                            \
    }                                                                                                               \
  }
TILEK_FN(tile_q2_K, MOE_Q2_K)
TILEK_FN(tile_q3_K, MOE_Q3_K)
TILEK_FN(tile_q4_K, MOE_Q4_K)
TILEK_FN(tile_q5_K, MOE_Q5_K)
TILEK_FN(tile_q6_K, MOE_Q6_K)

static int gemmK(int wtype, int n, const uint8_t *w, size_t wrb, const uint8_t *act, size_t arb, int R, int j0,
                 int j1, float *out, int ldo) {
  const int nsb = n / QKK;
  const size_t ggml = (size_t)nsb * B_Q8_K, off = (ggml + 63) & ~(size_t)63, suffix = moe_actK_suffix_bytes(n);
  const uint8_t *ax;
  size_t astride;
  if (arb == off + suffix) { // rows laid out by moe_quantize_act_row (stride moe_act_row_bytes) carry the kernel layout
    ax = act + off;
    astride = arb;
  } else {
    uint8_t *buf = (uint8_t *)moe_quant_scratch(suffix * R);
    for (int r = 0; r < R; r++) actK_layout(act + (size_t)r * arb, nsb, buf + suffix * r);
    ax = buf;
    astride = suffix;
  }
  if (R <= 2) return gemv(wtype, R, w, wrb, nsb, ax, astride, j0, j1, out, ldo);
  tile_fn fn = wtype == MOE_Q2_K   ? tile_q2_K
               : wtype == MOE_Q3_K ? tile_q3_K
               : wtype == MOE_Q4_K ? tile_q4_K
               : wtype == MOE_Q5_K ? tile_q5_K
                                   : tile_q6_K;
  run_tiles(fn, MAXW, w, wrb, nsb, ax, astride, R, j0, j1, out, ldo);
  return 1;
}

// ================================================================================================================
// Decode: matrix-vector products (1 or 2 activation rows)
// ================================================================================================================
//
// Weight rows one at a time (one sequential stream: it reads from DRAM markedly faster than several rows side by
// side, measured q8_0 28 vs 11 GB/s, q6_K 32 vs 15 GB/s on one Zen 5 core), each row's
// accumulators kept and reduced 16 rows at a time (hsum_avx512.h), so that the reduction's chain of shuffles is not
// paid per row. The sums are the tiles' own (tile32_acc / tileK_acc with one weight row, then the same pairwise
// lane tree), so a row's value does not depend on which path computed it. On the bench model (2 threads, decode,
// A/B in one process): q8_0 1.09x, q4_0 1.01x.
AI void gemv_rows(const int wtype, const int RA, const uint8_t *w, size_t wrb, int nb, const uint8_t *ax,
                  size_t astride, int j0, int j1, float *out, int ldo) {
  const int k = wtype == MOE_Q2_K || wtype == MOE_Q3_K || wtype == MOE_Q4_K || wtype == MOE_Q5_K || wtype == MOE_Q6_K;
  for (int j = j0; j < j1; j += 16) {
    const int cnt = j1 - j < 16 ? j1 - j : 16;
    __m512 sums[2][16];
    for (int i = 0; i < cnt; i++) {
      __m512 acc[MAXW][MAXA];
      if (k) tileK_acc(wtype, 1, RA, w + (size_t)(j + i) * wrb, wrb, nb, ax, astride, acc);
      else tile32_acc(wtype, 1, RA, w + (size_t)(j + i) * wrb, wrb, nb, ax, astride, acc);
      UNROLL for (int r = 0; r < RA; r++) sums[r][i] = acc[0][r];
    }
    UNROLL for (int r = 0; r < RA; r++) {
      for (int i = cnt; i < 16; i++) sums[r][i] = _mm512_setzero_ps();
      hsum16_many(sums[r], out + (size_t)r * ldo + j, cnt);
    }
  }
}

#define GEMV_FN(NAME, T)                                                                                            \
  static void NAME(int RA, const uint8_t *w, size_t wrb, int nb, const uint8_t *ax, size_t astride, int j0, int j1, \
                   float *out, int ldo) {                                                                           \
    if (RA == 1) gemv_rows(T, 1, w, wrb, nb, ax, astride, j0, j1, out, ldo);                                        \
    else gemv_rows(T, 2, w, wrb, nb, ax, astride, j0, j1, out, ldo);                                                \
  }
GEMV_FN(gemv_q4_0, MOE_Q4_0)
GEMV_FN(gemv_q4_0_rp, MOE_Q4_0_RP)
GEMV_FN(gemv_q4_1, MOE_Q4_1)
GEMV_FN(gemv_q5_0, MOE_Q5_0)
GEMV_FN(gemv_q5_1, MOE_Q5_1)
GEMV_FN(gemv_q8_0, MOE_Q8_0)
GEMV_FN(gemv_q2_K, MOE_Q2_K)
GEMV_FN(gemv_q3_K, MOE_Q3_K)
GEMV_FN(gemv_q4_K, MOE_Q4_K)
GEMV_FN(gemv_q5_K, MOE_Q5_K)
GEMV_FN(gemv_q6_K, MOE_Q6_K)

/** Rows j0..j1 of out[R, :] for R = 1 or 2 (the weights' blocks nb and activation layout as gemm32 / gemmK set). */
static int gemv(int wtype, int R, const uint8_t *w, size_t wrb, int nb, const uint8_t *ax, size_t astride, int j0,
                int j1, float *out, int ldo) {
  void (*fn)(int, const uint8_t *, size_t, int, const uint8_t *, size_t, int, int, float *, int);
  switch (wtype) {
    case MOE_Q4_0: fn = gemv_q4_0; break;
    case MOE_Q4_0_RP: fn = gemv_q4_0_rp; break;
    case MOE_Q4_1: fn = gemv_q4_1; break;
    case MOE_Q5_0: fn = gemv_q5_0; break;
    case MOE_Q5_1: fn = gemv_q5_1; break;
    case MOE_Q8_0: fn = gemv_q8_0; break;
    case MOE_Q2_K: fn = gemv_q2_K; break;
    case MOE_Q3_K: fn = gemv_q3_K; break;
    case MOE_Q4_K: fn = gemv_q4_K; break;
    case MOE_Q5_K: fn = gemv_q5_K; break;
    case MOE_Q6_K: fn = gemv_q6_K; break;
    default: return 0;
  }
  fn(R, w, wrb, nb, ax, astride, j0, j1, out, ldo);
  return 1;
}

int moe_gemm_avx512_supports(int wtype) {
  switch (wtype) {
    case MOE_Q4_0: case MOE_Q4_1: case MOE_Q5_0: case MOE_Q5_1: case MOE_Q8_0:
    case MOE_Q2_K: case MOE_Q3_K: case MOE_Q4_K: case MOE_Q5_K: case MOE_Q6_K: return 1;
    default: return 0;
  }
}

int moe_gemm_avx512(int wtype, int n, const uint8_t *w, size_t wrb, const uint8_t *act, size_t arb, int R, int j0,
                    int j1, float *out, int ldo) {
  switch (wtype) {
    case MOE_Q4_0: case MOE_Q4_0_RP: case MOE_Q4_1: case MOE_Q5_0: case MOE_Q5_1: case MOE_Q8_0:
      return gemm32(wtype, n, w, wrb, act, arb, R, j0, j1, out, ldo);
    case MOE_Q2_K: case MOE_Q3_K: case MOE_Q4_K: case MOE_Q5_K: case MOE_Q6_K:
      return gemmK(wtype, n, w, wrb, act, arb, R, j0, j1, out, ldo);
    default: return 0;
  }
}

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif // MOE_X86
