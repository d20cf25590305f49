// Standalone check and benchmark of the quantized kernels (native/src/quant*.c); not part of `npm test`.
//   gcc -O3 -std=gnu11 -ffp-contract=off -Inative/src native/test/quant_test.c native/src/quant.c
//       native/src/quant_avx2.c native/src/quant_avx512.c -lm -o /tmp/quant_test
//   /tmp/quant_test                      correctness (a few seconds)
//   /tmp/quant_test bench [only [TYPE [REPS]]]   + speed: GEMV GB/s (4096 x 4096, 1 thread), the same GEMV on
//                                        ~0.5 MB of weights (L2-resident: the kernel's own speed), R = 64 GFLOP/s
//   add -DMOE_NO_X86_KERNELS to build what a non-x86 target builds (generic C only)
// Correctness: every SIMD path against the generic C path (which follows ggml's generic code operation for
// operation, as src/tensor/quant.ts does; test/native-quant.test.ts ties the two), for every type, R in
// {1,2,3,5,8}, n in {256, 4096, 14336} (+ odd block counts), several row ranges, and the AVX-512 path both on rows
// from moe_quantize_act_row (with the appended kernel layout) and on bare ggml rows.
//  * exact mode: scales are powers of two and activation values small integers in a few blocks, so every float
//    operation is exact and all paths must agree bit for bit (tests the integer parts and the block bookkeeping);
//  * dense mode: random data everywhere, full value ranges (saturation checks), agreement to float rounding.
// Also: the AVX2 q8_0/q8_1 activation quantizer against the scalar one, bit for bit, including round-half cases.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "quant_impl.h"

// ---- CPU features (cpu.c belongs to the addon; this harness asks the compiler's runtime) ----
static moe_cpu_features feats;
const moe_cpu_features *moe_cpu(void) {
  static int done;
  if (!done) {
#if MOE_X86
    __builtin_cpu_init();
    feats.avx2 = __builtin_cpu_supports("avx2");
    feats.fma = __builtin_cpu_supports("fma");
    feats.f16c = 1; // every AVX2 CPU has F16C (not queryable on older gcc)
    feats.avx512f = __builtin_cpu_supports("avx512f");
    feats.avx512bw = __builtin_cpu_supports("avx512bw");
    feats.avx512vl = __builtin_cpu_supports("avx512vl");
    feats.avx512vnni = __builtin_cpu_supports("avx512vnni");
#endif
    done = 1;
  }
  return &feats;
}

static uint64_t rng = 0x9E3779B97F4A7C15ULL;
static uint32_t rnd(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (uint32_t)(rng >> 16);
}
static float frand(void) { return (float)((int)(rnd() % 2000001) - 1000000) / 1000000.0f; }

typedef struct {
  const char *name;
  int type, block, bytes;
} tinfo;
static const tinfo TYPES[] = {
    {"q4_0", MOE_Q4_0, 32, B_Q4_0}, {"q4_1", MOE_Q4_1, 32, B_Q4_1}, {"q5_0", MOE_Q5_0, 32, B_Q5_0},
    {"q5_1", MOE_Q5_1, 32, B_Q5_1}, {"q8_0", MOE_Q8_0, 32, B_Q8_0}, {"q2_k", MOE_Q2_K, 256, B_Q2_K},
    {"q3_k", MOE_Q3_K, 256, B_Q3_K}, {"q4_k", MOE_Q4_K, 256, B_Q4_K}, {"q5_k", MOE_Q5_K, 256, B_Q5_K},
    {"q6_k", MOE_Q6_K, 256, B_Q6_K},
};
#define NTYPES (int)(sizeof(TYPES) / sizeof(TYPES[0]))

static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

/** Offsets of a block's f16 scale fields (d first; -1 = none). */
static void scale_fields(int type, int *d, int *m) {
  *m = -1;
  switch (type) {
    case MOE_Q4_1: case MOE_Q5_1: *d = 0, *m = 2; break;
    case MOE_Q2_K: *d = 80, *m = 82; break;
    case MOE_Q3_K: *d = 108; break;
    case MOE_Q4_K: case MOE_Q5_K: *d = 0, *m = 2; break;
    case MOE_Q6_K: *d = 208; break;
    default: *d = 0; break;
  }
}

/** Random weight rows: random bytes (every bit pattern of the quants and sub-scales), f16 scales set. */
static void make_weights(const tinfo *t, uint8_t *w, int rows, int n, int exact) {
  const int nb = n / t->block;
  int od, om;
  scale_fields(t->type, &od, &om);
  for (int j = 0; j < rows; j++) {
    const int e = 8 + (int)(rnd() % 3); // exact mode: one power of two per row
    for (int b = 0; b < nb; b++) {
      uint8_t *x = w + ((size_t)j * nb + b) * t->bytes;
      for (int k = 0; k < t->bytes; k++) x[k] = (uint8_t)rnd();
      if (exact) {
        put16(x + od, moe_f2h((rnd() & 1 ? -1.0f : 1.0f) * ldexpf(1.0f, -e)));
        if (om >= 0) put16(x + om, moe_f2h((rnd() & 1 ? -1.0f : 1.0f) * ldexpf(1.0f, -e)));
      } else {
        put16(x + od, moe_f2h(frand() * 0.02f));
        if (om >= 0) put16(x + om, moe_f2h(frand() * 0.02f));
      }
    }
  }
}

/**
 * Activation floats. exact: zero except a few blocks of `group` (the first, the last, two random) holding small
 * integers times 2^-7 with one element +-127 * 2^-7, so the converted quants and scales are exact; dense: random.
 */
static void make_act(float *x, int n, int group, int exact, int small) {
  if (!exact) {
    for (int i = 0; i < n; i++) x[i] = frand() * 3.0f;
    return;
  }
  memset(x, 0, sizeof(float) * n);
  const int ng = n / group;
  int pick[4] = {0, ng - 1, (int)(rnd() % ng), (int)(rnd() % ng)};
  for (int p = 0; p < 4; p++) {
    float *g = x + (size_t)pick[p] * group;
    for (int i = 0; i < group; i++) g[i] = ldexpf((float)((int)(rnd() % (2 * small + 1)) - small), -7);
    g[rnd() % group] = ldexpf(rnd() & 1 ? 127.0f : -127.0f, -7);
  }
}

static int failures;

static void check_type(const tinfo *t, int n, int R, int exact) {
  const int rows = 13, nb = n / t->block;
  const size_t wrb = (size_t)nb * t->bytes, arb = moe_act_row_bytes(t->type, n);
  uint8_t *w = malloc(wrb * rows);
  float *x = malloc(sizeof(float) * n * R);
  uint8_t *act = aligned_alloc(64, (arb * R + 63) & ~(size_t)63); // as ops.c allocates rows
  make_weights(t, w, rows, n, exact);
  const int group = t->block == 32 ? 32 : 256;
  for (int r = 0; r < R; r++) {
    make_act(x + (size_t)r * n, n, group, exact, t->block == 32 ? 127 : 2);
    moe_quantize_act_row(t->type, x + (size_t)r * n, act + arb * r, n);
  }
  const int ldo = rows + 3;
  float *ref = calloc((size_t)R * ldo, sizeof(float)), *got = calloc((size_t)R * ldo, sizeof(float));
  // two ranges: all rows, and an inner range (row offsets, remainders)
  const int ranges[2][2] = {{0, rows}, {2, 9}};
  for (int q = 0; q < 2; q++) {
    const int j0 = ranges[q][0], j1 = ranges[q][1];
    moe_gemm_generic(t->type, n, w, wrb, act, arb, R, j0, j1, ref, ldo);
    float amax = 0;
    for (int r = 0; r < R; r++)
      for (int j = j0; j < j1; j++) amax = fmaxf(amax, fabsf(ref[r * ldo + j]));
    // path 4: AVX-512 on bare ggml rows (without the kernel layout moe_quantize_act_row appends)
    const size_t gb = (size_t)(n / (t->block == 32 ? 32 : 256)) * (t->block == 32 ? (t->type == MOE_Q4_1 || t->type == MOE_Q5_1 ? 36 : 34) : 292);
    uint8_t *bare = malloc(gb * R);
    for (int r = 0; r < R; r++) memcpy(bare + gb * r, act + arb * r, gb);
    for (int path = 2; path <= 4; path++) {
      moe_gemm_fn fn = path == 2 ? moe_gemm_avx2 : moe_gemm_avx512;
      const char *pname = path == 2 ? "avx2" : path == 3 ? "avx512" : "avx512 (bare rows)";
      if (path == 2 ? !(moe_cpu()->avx2) : !(moe_cpu()->avx512vnni && moe_cpu()->avx512bw)) continue;
      for (int i = 0; i < R * ldo; i++) got[i] = -12345.0f; // sentinel: untouched outputs must stay
      if (!fn(t->type, n, w, wrb, path == 4 ? bare : act, path == 4 ? gb : arb, R, j0, j1, got, ldo)) {
        printf("FAIL %s %s: not supported\n", t->name, pname);
        failures++;
        continue;
      }
      int bad = 0;
      for (int r = 0; r < R && bad < 3; r++)
        for (int j = 0; j < ldo && bad < 3; j++) {
          const float g = got[r * ldo + j], e = ref[r * ldo + j];
          int ok;
          if (j < j0 || j >= j1) ok = g == -12345.0f;
          else if (exact) ok = g == e;
          else ok = fabsf(g - e) <= 2e-5f * amax + 1e-30f;
          if (!ok) {
            printf("FAIL %s %s n=%d R=%d rows %d..%d %s: out[%d][%d] = %.9g, generic %.9g\n", t->name, pname, n, R, j0,
                   j1, exact ? "exact" : "dense", r, j, g, e);
            bad++;
            failures++;
          }
        }
    }
    free(bare);
  }
  free(w), free(x), free(act), free(ref), free(got);
}

static void check_act_quant(void) {
#if MOE_X86
  if (!moe_cpu()->avx2) return;
  const int n = 4096;
  float *x = malloc(sizeof(float) * n);
  uint8_t *a = malloc(36 * n / 32), *b = malloc(36 * n / 32);
  for (int trial = 0; trial < 4; trial++) {
    for (int i = 0; i < n; i++) x[i] = frand() * (trial + 1);
    if (trial >= 2) // ties: amax 127 gives id = 1, so k + 0.5 must round to even
      for (int i = 0; i < n; i++) x[i] = (i % 32 == 0) ? 127.0f : (float)((int)(rnd() % 251) - 125) + 0.5f;
    if (trial == 3) memset(x + 64, 0, sizeof(float) * 32); // an all-zero block
    moe_quantize_q8_0_generic(x, a, n);
    moe_quantize_q8_0_avx2(x, b, n);
    if (memcmp(a, b, 34 * n / 32)) printf("FAIL q8_0 activation quantizer avx2 != generic (trial %d)\n", trial), failures++;
    moe_quantize_q8_1_generic(x, a, n);
    moe_quantize_q8_1_avx2(x, b, n);
    if (memcmp(a, b, 36 * n / 32)) printf("FAIL q8_1 activation quantizer avx2 != generic (trial %d)\n", trial), failures++;
  }
  // round half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0, -1.5 -> -2
  float t[32] = {127.0f, 0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 3.5f};
  moe_quantize_q8_0_generic(t, a, 32);
  const int8_t want[8] = {127, 0, 2, 2, 0, -2, -2, 4};
  if (memcmp(a + 2, want, 8)) printf("FAIL q8_0 rounding is not half-to-even\n"), failures++;
  free(x), free(a), free(b);
#endif
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void bench(const char *only_type, int reps) {
  const int n = 4096, rows = 4096;
  printf("\n%-5s %-7s %14s %14s %18s\n", "type", "path", "GEMV GB/s", "in-L2 GB/s", "R=64 GFLOP/s");
  for (int ti = 0; ti < NTYPES; ti++) {
    const tinfo *t = &TYPES[ti];
    if (only_type && strcmp(only_type, t->name)) continue;
    const size_t wrb = (size_t)(n / t->block) * t->bytes, arb = moe_act_row_bytes(t->type, n);
    uint8_t *w = malloc(wrb * rows);
    make_weights(t, w, rows, n, 0);
    const int R = 64;
    float *x = malloc(sizeof(float) * n * R), *out = malloc(sizeof(float) * rows * R);
    uint8_t *act = aligned_alloc(64, (arb * R + 63) & ~(size_t)63); // as ops.c allocates rows
    for (int i = 0; i < n * R; i++) x[i] = frand();
    for (int r = 0; r < R; r++) moe_quantize_act_row(t->type, x + (size_t)r * n, act + arb * r, n);
    for (int path = 1; path <= 3; path++) {
      if (path == 2 && !moe_cpu()->avx2) continue;
      if (path == 3 && !moe_cpu()->avx512vnni) continue;
      moe_gemm_fn fn = path == 1 ? moe_gemm_generic : path == 2 ? moe_gemm_avx2 : moe_gemm_avx512;
      // GEMV: best of several passes over 4096 x 4096 (weights >> L2, so this is streaming from memory)
      double best = 1e9;
      for (int it = 0; it < (path == 1 ? 2 : reps); it++) {
        const double t0 = now();
        fn(t->type, n, w, wrb, act, arb, 1, 0, rows, out, rows);
        const double dt = now() - t0;
        best = dt < best ? dt : best;
      }
      const double gbs = (double)wrb * rows / best / 1e9;
      // the same GEMV on ~0.5 MB of weights (L2-resident): the kernel's own speed, without the DRAM limit
      const int crow = (int)(512 * 1024 / wrb);
      double bestc = 1e9;
      for (int it = 0; it < (path == 1 ? 2 : 20 * reps); it++) {
        const double t0 = now();
        fn(t->type, n, w, wrb, act, arb, 1, 0, crow, out, crow);
        const double dt = now() - t0;
        bestc = dt < bestc ? dt : bestc;
      }
      const double gbc = (double)wrb * crow / bestc / 1e9;
      // R = 64: 1024 weight rows (as one thread's share of a prefill matmul)
      const int prow = path == 1 ? 64 : 1024;
      double bestg = 1e9;
      for (int it = 0; it < (path == 1 ? 2 : reps / 2 + 1); it++) {
        const double t0 = now();
        fn(t->type, n, w, wrb, act, arb, R, 0, prow, out, prow);
        const double dt = now() - t0;
        bestg = dt < bestg ? dt : bestg;
      }
      const double gf = 2.0 * n * prow * R / bestg / 1e9;
      printf("%-5s %-7s %14.1f %14.1f %18.1f\n", t->name, path == 1 ? "generic" : path == 2 ? "avx2" : "avx512", gbs, gbc, gf);
      fflush(stdout);
    }
    free(w), free(x), free(out), free(act);
  }
}

int main(int argc, char **argv) {
  const int do_bench = argc > 1 && !strcmp(argv[1], "bench");
  // quant_test bench [only [TYPE [REPS]]]
  const int only_bench = argc > 2 && !strcmp(argv[2], "only");
  const char *only_type = argc > 3 ? argv[3] : NULL;
  const int reps = argc > 4 ? atoi(argv[4]) : 10;
  const moe_cpu_features *c = moe_cpu();
  printf("cpu: avx2=%d avx512f=%d avx512bw=%d avx512vl=%d avx512vnni=%d\n", c->avx2, c->avx512f, c->avx512bw,
         c->avx512vl, c->avx512vnni);
  if (!only_bench) {
    check_act_quant();
    const int Rs[] = {1, 2, 3, 5, 8};
    for (int ti = 0; ti < NTYPES; ti++) {
      const tinfo *t = &TYPES[ti];
      const int ns32[] = {256, 4096, 14336, 224, 96, 32};
      const int nsK[] = {256, 4096, 14336, 768};
      const int *ns = t->block == 32 ? ns32 : nsK;
      const int nn = t->block == 32 ? 6 : 4;
      for (int ni = 0; ni < nn; ni++)
        for (int ri = 0; ri < 5; ri++)
          for (int exact = 0; exact < 2; exact++) check_type(t, ns[ni], Rs[ri], exact);
      printf("%s: checked\n", t->name);
    }
    printf(failures ? "%d FAILURES\n" : "all passed\n", failures);
  }
  if (do_bench) bench(only_type, reps);
  return failures ? 1 : 0;
}
