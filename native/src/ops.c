// Float kernels (generic C), kernel dispatch, and the multi-threaded drivers behind the addon: matmul (f32 / f16 /
// bf16 here, quantized types through quant.c's moe_gemm_tile), rmsnorm, rope, attention and the grouped MoE FFN.
// Each computes what src/backend/ref.ts computes, up to float summation order; the comments say where the order
// or the rounding is chosen to follow ref.ts (and so llama.cpp).
#include "kernels.h"
#include "ops.h"
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------------------------------------------
// Scalar conversions (bit-exact with ggml / src/tensor/f16.ts)
// ---------------------------------------------------------------------------------------------------------------
static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

float moe_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp == 0) { // zero or subnormal: mant * 2^-24, exact in f32
    float v = (float)mant * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (exp == 31) return u2f(sign | 0x7f800000 | (mant << 13));
  return u2f(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t moe_f32_to_f16(float f) {
  uint32_t x = f2u(f), sign = (x >> 16) & 0x8000, exp = (x >> 23) & 0xff, mant = x & 0x7fffff;
  if (exp == 0xff) return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
  int e = (int)exp - 127 + 15;
  if (e >= 31) return (uint16_t)(sign | 0x7c00);
  if (e <= 0) {
    if (e < -10) return (uint16_t)sign;
    mant |= 0x800000;
    int shift = 14 - e;
    uint32_t hm = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (hm & 1))) hm++;
    return (uint16_t)(sign | hm);
  }
  uint32_t hm = mant >> 13, rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (hm & 1))) {
    hm++;
    if (hm == 0x400) {
      hm = 0;
      if (++e >= 31) return (uint16_t)(sign | 0x7c00);
    }
  }
  return (uint16_t)(sign | ((uint32_t)e << 10) | hm);
}

float moe_bf16_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }

uint16_t moe_f32_to_bf16(float f) {
  uint32_t x = f2u(f);
  if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 64);
  return (uint16_t)((x + (0x7fff + ((x >> 16) & 1))) >> 16);
}

// ---------------------------------------------------------------------------------------------------------------
// Type sizes
// ---------------------------------------------------------------------------------------------------------------
static int block_info(int type, int *bs, int *ts) {
  switch (type) {
    case MOE_F32: *bs = 1; *ts = 4; return 1;
    case MOE_F16: case MOE_BF16: *bs = 1; *ts = 2; return 1;
    case MOE_Q4_0: case MOE_Q4_0_RP: *bs = 32; *ts = 18; return 1;
    case MOE_Q4_1: *bs = 32; *ts = 20; return 1;
    case MOE_Q5_0: *bs = 32; *ts = 22; return 1;
    case MOE_Q5_1: *bs = 32; *ts = 24; return 1;
    case MOE_Q8_0: *bs = 32; *ts = 34; return 1;
    case MOE_Q8_1: *bs = 32; *ts = 36; return 1;
    case MOE_Q2_K: *bs = 256; *ts = 84; return 1;
    case MOE_Q3_K: *bs = 256; *ts = 110; return 1;
    case MOE_Q4_K: *bs = 256; *ts = 144; return 1;
    case MOE_Q5_K: *bs = 256; *ts = 176; return 1;
    case MOE_Q6_K: *bs = 256; *ts = 210; return 1;
    case MOE_Q8_K: *bs = 256; *ts = 292; return 1;
    default: return 0;
  }
}

size_t moe_row_bytes(int type, long long n) {
  int bs, ts;
  if (n < 0 || !block_info(type, &bs, &ts) || n % bs) return 0;
  return (size_t)(n / bs) * (size_t)ts;
}

int moe_block_size(int type) {
  int bs, ts;
  return block_info(type, &bs, &ts) ? bs : 0;
}

int moe_is_float_type(int type) { return type == MOE_F32 || type == MOE_F16 || type == MOE_BF16; }

// ---------------------------------------------------------------------------------------------------------------
// Generic C kernels (any CPU; the compiler vectorizes the element-wise loops, e.g. to NEON on AArch64)
// ---------------------------------------------------------------------------------------------------------------
static inline float load_w1(int wtype, const void *w, size_t i) {
  if (wtype == MOE_F32) { // memcpy: weights inside a file need not be 4-byte aligned
    float f;
    memcpy(&f, (const char *)w + 4 * i, 4);
    return f;
  }
  uint16_t h;
  memcpy(&h, (const char *)w + 2 * i, 2);
  return wtype == MOE_F16 ? moe_f16_to_f32(h) : moe_bf16_to_f32(h);
}

/** One output at a time: four partial sums (k mod 4), added in a fixed order; the same for any batch. */
static void g_tile(int wtype, int n, const void *w, size_t rb, const float *act, size_t lda, int R, int j0, int j1,
                   float *out, size_t ldo) {
  float wf[4];
  for (int j = j0; j < j1; j++) {
    const void *row = (const char *)w + (size_t)j * rb;
    for (int r = 0; r < R; r++) {
      const float *a = act + (size_t)r * lda;
      float s[4] = {0, 0, 0, 0};
      int k = 0;
      for (; k + 4 <= n; k += 4) {
        for (int u = 0; u < 4; u++) wf[u] = load_w1(wtype, row, (size_t)(k + u));
        for (int u = 0; u < 4; u++) s[u] += wf[u] * a[k + u];
      }
      for (; k < n; k++) s[k & 3] += load_w1(wtype, row, (size_t)k) * a[k];
      out[(size_t)r * ldo + j] = (s[0] + s[1]) + (s[2] + s[3]);
    }
  }
}

static void g_round_act(int wtype, const float *x, float *out, int n) {
  if (wtype == MOE_F16) for (int i = 0; i < n; i++) out[i] = moe_f16_to_f32(moe_f32_to_f16(x[i]));
  else if (wtype == MOE_BF16) for (int i = 0; i < n; i++) out[i] = moe_bf16_to_f32(moe_f32_to_bf16(x[i]));
  else memcpy(out, x, (size_t)n * 4);
}

static float g_dot(const float *a, const float *b, int n) {
  float s[8] = {0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; u++) s[u] += a[i + u] * b[i + u];
  for (; i < n; i++) s[0] += a[i] * b[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

static void g_axpy(float *y, float a, const float *x, int n) {
  for (int i = 0; i < n; i++) y[i] += a * x[i];
}

static double g_sumsq(const float *x, int n) {
  double s = 0;
  for (int i = 0; i < n; i++) s += (double)x[i] * x[i];
  return s;
}

double moe_softmax_row_generic(float *s, int n, int round_f16) {
  float mx = -INFINITY;
  for (int j = 0; j < n; j++) mx = s[j] > mx ? s[j] : mx;
  double sum = 0;
  for (int j = 0; j < n; j++) {
    s[j] = (float)exp((double)s[j] - (double)mx);
    sum += s[j];
  }
  float inv = (float)(1.0 / sum);
  for (int j = 0; j < n; j++) {
    float pj = s[j] * inv;
    s[j] = round_f16 ? moe_f16_to_f32(moe_f32_to_f16(pj)) : pj;
  }
  return (double)mx + log(sum);
}

void moe_silu_mul_generic(float *g, const float *u, int n) {
  for (int j = 0; j < n; j++) {
    float e = expf(-g[j]);
    g[j] = (g[j] / (1.0f + e)) * u[j];
  }
}

// Attention scores and weighted sums for kernel sets without their own: the set in use's dot() and axpy() per key and
// head (the kernel set is chosen before any attention runs, so moe_fk() is the set these entries belong to). An f16
// key or value row is converted first (exactly: every f16 is an f32).
static void *scratch(int slot, size_t bytes);
#define S_KV 8 // scratch slot (below) of the row converted from f16

static const float *kv_row(const void *base, int f16, size_t at, int n, float *tmp) {
  if (!f16) return (const float *)base + at;
  const uint16_t *h = (const uint16_t *)base + at;
  for (int i = 0; i < n; i++) tmp[i] = moe_f16_to_f32(h[i]);
  return tmp;
}

void moe_scores_generic(const float *q, int G, int hd, const void *k, int kf16, size_t kstride, int L, float scale,
                        float *sc, size_t ldsc) {
  const moe_fkern *K = moe_fk();
  float *tmp = kf16 ? scratch(S_KV, (size_t)hd * sizeof(float)) : NULL;
  if (kf16 && !tmp) abort();
  for (int j = 0; j < L; j++) {
    const float *kj = kv_row(k, kf16, (size_t)j * kstride, hd, tmp);
    for (int g = 0; g < G; g++) sc[(size_t)g * ldsc + j] = K->dot(q + (size_t)g * hd, kj, hd) * scale;
  }
}

void moe_weighted_sum_generic(const float *p, size_t ldp, int G, int hd, const void *v, int vf16, size_t vstride, int L,
                              float *out) {
  const moe_fkern *K = moe_fk();
  float *tmp = vf16 ? scratch(S_KV, (size_t)hd * sizeof(float)) : NULL;
  if (vf16 && !tmp) abort();
  memset(out, 0, (size_t)G * hd * sizeof(float));
  for (int j = 0; j < L; j++) {
    const float *vj = kv_row(v, vf16, (size_t)j * vstride, hd, tmp);
    for (int g = 0; g < G; g++) K->axpy(out + (size_t)g * hd, p[(size_t)g * ldp + j], vj, hd);
  }
}

void moe_to_f16_generic(const float *x, uint16_t *out, size_t n) {
  for (size_t i = 0; i < n; i++) out[i] = moe_f32_to_f16(x[i]);
}

const moe_fkern moe_fkern_generic = {"generic", g_tile, g_round_act, g_dot, g_axpy, g_sumsq, moe_softmax_row_generic,
                                     moe_silu_mul_generic, moe_scores_generic, moe_weighted_sum_generic,
                                     moe_to_f16_generic};

// ---------------------------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------------------------
static const moe_fkern *g_fk;

const moe_fkern *moe_fk(void) {
  if (!g_fk) {
    const moe_fkern *k = &moe_fkern_generic;
#if defined(MOE_HAVE_X86_KERNELS)
    if (moe_cpu_has_avx512()) k = &moe_fkern_avx512;
    else if (moe_cpu_has_avx2()) k = &moe_fkern_avx2;
#endif
    g_fk = k;
  }
  return g_fk;
}

/** Selects the float kernel set by name (tests run every path the CPU has); returns 0 when the CPU lacks it. */
int moe_fk_select(const char *name) {
  if (!strcmp(name, "generic")) { g_fk = &moe_fkern_generic; return 1; }
#if defined(MOE_HAVE_X86_KERNELS)
  if (!strcmp(name, "avx2") && moe_cpu_has_avx2()) { g_fk = &moe_fkern_avx2; return 1; }
  if (!strcmp(name, "avx512") && moe_cpu_has_avx512()) { g_fk = &moe_fkern_avx512; return 1; }
#endif
  if (!strcmp(name, "auto")) { g_fk = NULL; moe_fk(); return 1; }
  return 0;
}

// ---------------------------------------------------------------------------------------------------------------
// Scratch memory: grow-only buffers per thread (the pool's threads are persistent, so these are reused across calls
// instead of page-faulting fresh allocations on every matmul).
// ---------------------------------------------------------------------------------------------------------------
#define NSCRATCH 9
static _Thread_local void *scratch_p[NSCRATCH];
static _Thread_local size_t scratch_n[NSCRATCH];

static void *scratch(int slot, size_t bytes) {
  if (bytes > scratch_n[slot]) {
    free(scratch_p[slot]);
    size_t n = (bytes + 4095) & ~(size_t)4095;
    scratch_p[slot] = aligned_alloc(64, n);
    scratch_n[slot] = scratch_p[slot] ? n : 0;
  }
  return scratch_p[slot];
}
// Slots: S_ATT per thread (attention scores, rope tables), S_KV (8, above) per thread (an f16 key/value row as f32);
// the others hold one op's buffers on the calling thread.
enum { S_ATT = 0, S_ACT = 1, S_G = 2, S_U = 3, S_H = 4, S_D = 5, S_MISC = 6, S_DOUT = 7 };

// ---------------------------------------------------------------------------------------------------------------
// Tiles: one weight matrix times a block of activation rows, for a range of output features. A job is a list of
// tiles that the pool's threads take one at a time (dynamic scheduling copes with uneven tiles and with threads that
// the OS runs late).
// ---------------------------------------------------------------------------------------------------------------
typedef struct {
  const void *w;
  const void *act; // converted activation rows (f32 for float weights)
  float *out;      // row 0 of this tile's output block; column j at out[j]
  size_t rb, act_bytes;
  int wtype, n, R, j0, j1, ldo;
} tile_t;

#define FEW_ROWS 4 // up to this many rows a matrix is split by output features only (weights read once)

static void float_gemm_tile(const moe_fkern *K, const tile_t *t) {
  K->tile(t->wtype, t->n, t->w, t->rb, (const float *)t->act, t->act_bytes / 4, t->R, t->j0, t->j1, t->out, (size_t)t->ldo);
}

static void exec_tile(const tile_t *t) {
  if (moe_is_float_type(t->wtype)) float_gemm_tile(moe_fk(), t);
  else moe_gemm_tile(t->wtype, t->n, t->w, t->rb, t->act, t->act_bytes, t->R, t->j0, t->j1, t->out, t->ldo);
}

typedef struct {
  tile_t *t;
  int n, cap;
  atomic_int next;
} tiles_t;

static void tiles_push(tiles_t *ts, const tile_t *t) {
  if (ts->n == ts->cap) {
    ts->cap = ts->cap ? 2 * ts->cap : 64;
    ts->t = realloc(ts->t, (size_t)ts->cap * sizeof(tile_t));
    if (!ts->t) abort();
  }
  ts->t[ts->n++] = *t;
}

static void tiles_task(void *p, int ith, int nth) {
  (void)ith; (void)nth;
  tiles_t *ts = p;
  for (int i; (i = atomic_fetch_add_explicit(&ts->next, 1, memory_order_relaxed)) < ts->n;) exec_tile(&ts->t[i]);
}

static void tiles_run(tiles_t *ts) {
  atomic_store(&ts->next, 0);
  if (ts->n == 1 || moe_pool_threads() == 1) tiles_task(ts, 0, 1);
  else moe_pool_run(tiles_task, ts);
  free(ts->t);
  ts->t = NULL;
  ts->n = ts->cap = 0;
}

static int imin(int a, int b) { return a < b ? a : b; }
static int imax(int a, int b) { return a > b ? a : b; }
static int cdiv(int a, int b) { return (a + b - 1) / b; }

/**
 * Splits out[R, N] = act[R] . W^T into tiles. Output-feature blocks keep a block of weights in L2 while the rows
 * stream past; rows are split too when there are too few feature blocks to keep every thread busy.
 * `work_share` is the fraction of the whole job this matrix is (to size tiles for the thread count).
 */
static void add_tiles(tiles_t *ts, int wtype, int n, const void *w, const void *act, size_t act_bytes, int R, int N,
                      float *out, int ldo, double work_share) {
  if (R <= 0 || N <= 0) return;
  int nth = moe_pool_threads();
  size_t rb = moe_row_bytes(wtype, n);
  // Tiles wanted from this matrix: ~4 per thread (dynamic scheduling evens them out), but none smaller than ~64K
  // multiply-adds, where dispatching costs more than it saves.
  double macs = (double)R * N * n, w4 = 4.0 * nth * work_share + 0.5;
  int want = imax(1, (int)(w4 < macs / 65536 ? w4 : macs / 65536));
  int jb, rbk;
  if (moe_is_float_type(wtype) && R > FEW_ROWS) {
    // Many rows: blocks of up to 256 features (the kernel blocks them further for L2), rows split when the feature
    // blocks alone are too few for the threads.
    jb = imin(256, cdiv(N, 8) * 8);
    while (jb > 32 && cdiv(N, jb) < want) jb -= 8;
    int nrb = imax(1, imin(cdiv(want, cdiv(N, jb)), cdiv(R, 48))); // row blocks of at least 48 rows
    rbk = cdiv(cdiv(R, nrb), 6) * 6;
  } else {
    // Few rows (weights are read once, memory-bound), or quantized weights (rows in blocks of 64).
    rbk = moe_is_float_type(wtype) ? R : 64;
    if (R <= rbk) {
      // One row block: every weight is read once (decode, an expert's few rows), so tiles are as large as the
      // balance across threads allows. A long contiguous read per thread streams from DRAM faster than 128 KiB
      // pieces handed out in turn (bench model, same process, alternating: decode q4_0 1.19x, q8_0 1.12x, f16 1.09x).
      jb = cdiv(N, want);
    } else {
      // Several row blocks reuse each weight tile: feature blocks of ~128 KiB of weights stay in L2 between them.
      size_t per = rb ? (128 * 1024) / rb : 64;
      jb = (int)(per < 8 ? 8 : per > 1024 ? 1024 : per);
      int cap = cdiv(N, want);
      if (jb > cap) jb = cap;
    }
    jb = imax(8, (jb + 7) & ~7);
  }
  for (int j0 = 0; j0 < N; j0 += jb) {
    for (int r0 = 0; r0 < R; r0 += rbk) {
      tile_t t = {w, (const char *)act + (size_t)r0 * act_bytes, out + (size_t)r0 * ldo, rb, act_bytes,
                  wtype, n, imin(rbk, R - r0), j0, imin(N, j0 + jb), ldo};
      tiles_push(ts, &t);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Parallel loops over independent items
// ---------------------------------------------------------------------------------------------------------------
typedef void (*range_fn)(void *ctx, int i0, int i1);
typedef struct {
  range_fn fn;
  void *ctx;
  int n, chunk;
  atomic_int next;
} pfor_t;

static void pfor_task(void *p, int ith, int nth) {
  (void)ith; (void)nth;
  pfor_t *f = p;
  for (int i; (i = atomic_fetch_add_explicit(&f->next, f->chunk, memory_order_relaxed)) < f->n;)
    f->fn(f->ctx, i, imin(f->n, i + f->chunk));
}

/** fn over [0, n) in chunks; `cost` is the rough work of one item, to stay on one thread when it is all small. */
static void parallel_for(int n, double cost, range_fn fn, void *ctx) {
  int nth = moe_pool_threads();
  if (n <= 0) return;
  if (nth == 1 || n == 1 || n * cost < 20000) {
    fn(ctx, 0, n);
    return;
  }
  pfor_t f = {.fn = fn, .ctx = ctx, .n = n, .chunk = imax(1, n / (4 * nth))};
  atomic_store(&f.next, 0);
  moe_pool_run(pfor_task, &f);
}

// ---------------------------------------------------------------------------------------------------------------
// Activation conversion
// ---------------------------------------------------------------------------------------------------------------
/** Bytes of one converted activation row: f32 (rounded to f16/bf16 where the weights are) for float weights. */
static size_t act_bytes_for(int wtype, int n) {
  return moe_is_float_type(wtype) ? (size_t)n * 4 : moe_act_row_bytes(wtype, n);
}
/** Two weight types whose activations convert to the same bytes (so one conversion serves both). */
static int same_act(int a, int b) {
  if (moe_is_float_type(a) || moe_is_float_type(b)) return a == b;
  return moe_vec_dot_type(a) == moe_vec_dot_type(b);
}

typedef struct {
  int wtype, n;
  const float *x;
  size_t ldx;
  const int32_t *rowmap; // source row of each converted row (NULL: identity)
  void *out;
  size_t ob;
} conv_t;

static void conv_range(void *p, int i0, int i1) {
  conv_t *c = p;
  for (int i = i0; i < i1; i++) {
    const float *src = c->x + (size_t)(c->rowmap ? c->rowmap[i] : i) * c->ldx;
    void *dst = (char *)c->out + (size_t)i * c->ob;
    if (moe_is_float_type(c->wtype)) moe_fk()->round_act(c->wtype, src, dst, c->n);
    else moe_quantize_act_row(c->wtype, src, dst, c->n);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// matmul
// ---------------------------------------------------------------------------------------------------------------
int moe_matmul(float *out, const float *x, int rows, const void *w, int wtype, int outDim, int inDim) {
  return moe_matmul_many(1, &out, x, rows, &w, &wtype, &outDim, inDim);
}

int moe_matmul_many(int count, float *const *outs, const float *x, int rows, const void *const *ws, const int *wtypes,
                    const int *outDims, int inDim) {
  long long total = 0;
  for (int i = 0; i < count; i++) {
    if (!moe_is_float_type(wtypes[i]) && !moe_gemm_supports(wtypes[i])) return -1;
    if (!same_act(wtypes[0], wtypes[i])) return -1;
    total += outDims[i] > 0 ? outDims[i] : 0;
  }
  if (rows <= 0 || total == 0) return 0;
  const int wtype = wtypes[0];
  size_t ab = act_bytes_for(wtype, inDim);
  const void *act = x;
  if (wtype != MOE_F32) { // f32 weights multiply x as it is; everything else converts each row once
    void *buf = scratch(S_ACT, (size_t)rows * ab + 64);
    if (!buf) abort();
    conv_t c = {wtype, inDim, x, (size_t)inDim, NULL, buf, ab};
    parallel_for(rows, inDim, conv_range, &c);
    act = buf;
  }
  // One tile list for all the matrices: one job (and one wait) instead of one per matrix.
  tiles_t ts = {0};
  for (int i = 0; i < count; i++)
    add_tiles(&ts, wtypes[i], inDim, ws[i], act, ab, rows, outDims[i], outs[i], outDims[i], (double)outDims[i] / total);
  tiles_run(&ts);
  return 0;
}

// ---------------------------------------------------------------------------------------------------------------
// rmsnorm: sum of squares in double (ref.ts / ggml), scale rounded to f32, then (x * scale) * w in f32
// ---------------------------------------------------------------------------------------------------------------
typedef struct { float *out; const float *x, *w; int dim; double eps; } rms_t;

static void rms_range(void *p, int r0, int r1) {
  rms_t *c = p;
  const moe_fkern *K = moe_fk();
  for (int r = r0; r < r1; r++) {
    const float *x = c->x + (size_t)r * c->dim;
    float *o = c->out + (size_t)r * c->dim;
    double sum = K->sumsq(x, c->dim);
    float mean = (float)(sum / c->dim + c->eps);
    float scale = (float)(1.0 / sqrt((double)mean));
    for (int i = 0; i < c->dim; i++) o[i] = (x[i] * scale) * c->w[i];
  }
}

void moe_rmsnorm(float *out, const float *x, int rows, const float *weight, int dim, double eps) {
  rms_t c = {out, x, weight, dim, eps};
  parallel_for(rows, 2.0 * dim, rms_range, &c);
}

// ---------------------------------------------------------------------------------------------------------------
// rope (ggml adjacent pairs): theta_i = pos * base^(-2i/d) by repeated f32 multiplication, cos/sin in double then f32
// ---------------------------------------------------------------------------------------------------------------
typedef struct { float *x; int nHeads, hd; const int32_t *pos; float thetaScale; } rope_t;

static void rope_range(void *p, int r0, int r1) {
  rope_t *c = p;
  int half = c->hd / 2;
  float *cs = scratch(S_ATT, (size_t)c->hd * sizeof(float));
  if (!cs) abort();
  for (int r = r0; r < r1; r++) {
    float t = (float)c->pos[r];
    for (int i = 0; i < half; i++) {
      cs[2 * i] = (float)cos((double)t);
      cs[2 * i + 1] = (float)sin((double)t);
      t = t * c->thetaScale;
    }
    for (int h = 0; h < c->nHeads; h++) {
      float *v = c->x + ((size_t)r * c->nHeads + h) * c->hd;
      for (int i = 0; i < half; i++) {
        float x0 = v[2 * i], x1 = v[2 * i + 1], co = cs[2 * i], si = cs[2 * i + 1];
        v[2 * i] = x0 * co - x1 * si; // -ffp-contract=off: each product rounded, as ref.ts
        v[2 * i + 1] = x0 * si + x1 * co;
      }
    }
  }
}

void moe_rope(float *x, int rows, int nHeads, int headDim, const int32_t *positions, double theta) {
  rope_t c = {x, nHeads, headDim, positions, (float)pow(theta, -2.0 / headDim)};
  parallel_for(rows, 4.0 * nHeads * headDim + 20.0 * headDim, rope_range, &c);
}

// ---------------------------------------------------------------------------------------------------------------
// attention: one task per (query row, kv head); the group's query heads share each K and V row load. Scores are one
// row of length i+1 per query head (never rows x rows), softmax as ref.ts: f32 scores, exp in double of the f32
// difference, sum in double.
// ---------------------------------------------------------------------------------------------------------------
typedef struct {
  float *out;
  const float *q;
  const void *k, *v; // f32, or f16 bits when kvF16
  int rows, start, nH, nKv, hd, window, kvF16;
  float scale;
} att_t;

static void att_range(void *p, int t0, int t1) {
  att_t *c = p;
  const moe_fkern *K = moe_fk();
  int G = c->nH / c->nKv, hd = c->hd, total = c->start + c->rows;
  size_t kvStride = (size_t)c->nKv * hd;
  float *buf = scratch(S_ATT, ((size_t)G * total + (size_t)G * hd) * sizeof(float) + 64);
  if (!buf) abort();
  float *qh = buf, *sc = buf + (size_t)G * hd;
  for (int t = t0; t < t1; t++) {
    int r = t / c->nKv, kvh = t % c->nKv, i = c->start + r;
    int jMin = c->window > 0 ? (i - c->window + 1 > 0 ? i - c->window + 1 : 0) : 0, L = i - jMin + 1;
    for (int g = 0; g < G; g++) {
      const float *src = c->q + (size_t)r * c->nH * hd + (size_t)(kvh * G + g) * hd;
      if (c->kvF16) K->round_act(MOE_F16, src, qh + (size_t)g * hd, hd);
      else memcpy(qh + (size_t)g * hd, src, (size_t)hd * 4);
    }
    const size_t at = (size_t)jMin * kvStride + (size_t)kvh * hd, es = c->kvF16 ? 2 : 4;
    const void *k0 = (const char *)c->k + at * es, *v0 = (const char *)c->v + at * es;
    float *og = c->out + (size_t)r * c->nH * hd + (size_t)kvh * G * hd; // the group's heads are adjacent
    K->scores(qh, G, hd, k0, c->kvF16, kvStride, L, c->scale, sc, (size_t)L);
    for (int g = 0; g < G; g++) K->softmax_row(sc + (size_t)g * L, L, c->kvF16);
    K->weighted_sum(sc, (size_t)L, G, hd, v0, c->kvF16, kvStride, L, og);
  }
}

void moe_attention(float *out, const float *q, int rows, int start, const void *k, const void *v, int nHeads,
                   int nKvHeads, int headDim, float scale, int window, int kvF16) {
  att_t c = {out, q, k, v, rows, start, nHeads, nKvHeads, headDim, window, kvF16, scale};
  double avg_len = start + rows / 2.0 + 1;
  if (window > 0 && avg_len > window) avg_len = window;
  parallel_for(rows * nKvHeads, 4.0 * (nHeads / nKvHeads) * headDim * avg_len, att_range, &c);
}

// ---------------------------------------------------------------------------------------------------------------
// MoE FFN, dropless and grouped: sort token-slots by expert, convert each slot's activation row once, one GEMM per
// active expert over just its rows (gate and up), silu(gate) * up, convert, down GEMM, then sum each row's k slots
// in slot order (ref.ts and llama.cpp add the weighted expert outputs in that order).
// ---------------------------------------------------------------------------------------------------------------
typedef struct {
  int dim, ffn, k, down_type;
  const int32_t *where; // slot -> its row in the expert-sorted buffers
  const float *weights;
  float *G, *U, *D, *out;
  void *act_d;
  size_t ab_d;
} moe_t;

static void silu_range(void *p, int i0, int i1) {
  moe_t *c = p;
  for (int i = i0; i < i1; i++) {
    float *g = c->G + (size_t)i * c->ffn;
    moe_fk()->silu_mul(g, c->U + (size_t)i * c->ffn, c->ffn);
    void *dst = (char *)c->act_d + (size_t)i * c->ab_d;
    if (moe_is_float_type(c->down_type)) moe_fk()->round_act(c->down_type, g, dst, c->ffn);
    else moe_quantize_act_row(c->down_type, g, dst, c->ffn);
  }
}

static void combine_range(void *p, int r0, int r1) {
  moe_t *c = p;
  for (int r = r0; r < r1; r++) {
    float *o = c->out + (size_t)r * c->dim;
    for (int s = 0; s < c->k; s++) {
      int slot = r * c->k + s;
      const float *d = c->D + (size_t)c->where[slot] * c->dim;
      float w = c->weights[slot];
      if (s == 0) for (int i = 0; i < c->dim; i++) o[i] = d[i] * w;
      else for (int i = 0; i < c->dim; i++) o[i] = o[i] + d[i] * w; // fp-contract off: product rounded, as ref.ts
    }
  }
}

static int g_moe_chunk; // rows per chunk; 0: from the memory budget
void moe_set_moe_chunk(int rows) { g_moe_chunk = rows > 0 ? rows : 0; }

/** One chunk of rows of moe_moe_ffn (ids already checked). */
static void moe_chunk(float *out, const float *x, int rows, const int32_t *experts, const float *weights, int k,
                      const void *gate, int gate_type, const void *up, int up_type, const void *down, int down_type,
                      int nExperts, int ffn, int dim) {
  int S = rows * k;
  // Counting sort of slots by expert (slots stay ascending within an expert).
  int32_t *idx = scratch(S_MISC, ((size_t)2 * S + nExperts + 1) * sizeof(int32_t));
  if (!idx) abort();
  int32_t *tok = idx, *where = idx + S, *off = idx + 2 * S;
  memset(off, 0, (size_t)(nExperts + 1) * sizeof(int32_t));
  for (int i = 0; i < S; i++) off[experts[i] + 1]++;
  for (int e = 0; e < nExperts; e++) off[e + 1] += off[e];
  for (int i = 0; i < S; i++) {
    int pos = off[experts[i]]++;
    tok[pos] = i / k;
    where[i] = pos;
  }
  for (int e = nExperts; e > 0; e--) off[e] = off[e - 1]; // back to the start of each expert's rows
  off[0] = 0;

  size_t ab_g = act_bytes_for(gate_type, dim), ab_u = act_bytes_for(up_type, dim), ab_d = act_bytes_for(down_type, ffn);
  int shared = same_act(gate_type, up_type);
  void *act_gu = scratch(S_ACT, (size_t)S * ab_g + 64);
  void *act_u = shared ? act_gu : scratch(S_H, (size_t)S * ab_u + 64);
  float *G = scratch(S_G, (size_t)S * ffn * sizeof(float) + 64);
  float *U = scratch(S_U, (size_t)S * ffn * sizeof(float) + 64);
  void *act_d = scratch(S_D, (size_t)S * ab_d + 64);
  float *D = scratch(S_DOUT, (size_t)S * dim * sizeof(float) + 64);
  if (!act_gu || !act_u || !G || !U || !act_d || !D) abort();

  moe_t c = {dim, ffn, k, down_type, where, weights, G, U, D, out, act_d, ab_d};

  // 1. Convert each slot's token row (gathered in expert order) for the gate and up weights.
  conv_t cg = {gate_type, dim, x, (size_t)dim, tok, act_gu, ab_g};
  parallel_for(S, dim, conv_range, &cg);
  if (!shared) {
    conv_t cu = {up_type, dim, x, (size_t)dim, tok, act_u, ab_u};
    parallel_for(S, dim, conv_range, &cu);
  }

  // 2. gate and up GEMMs of every active expert, one tile list for all of them.
  size_t gbytes = moe_row_bytes(gate_type, dim) * ffn, ubytes = moe_row_bytes(up_type, dim) * ffn;
  size_t dbytes = moe_row_bytes(down_type, ffn) * dim;
  tiles_t ts = {0};
  for (int e = 0; e < nExperts; e++) {
    int n = off[e + 1] - off[e];
    if (!n) continue;
    double share = (double)n / S / 2;
    add_tiles(&ts, gate_type, dim, (const char *)gate + e * gbytes, (char *)act_gu + (size_t)off[e] * ab_g, ab_g, n,
              ffn, G + (size_t)off[e] * ffn, ffn, share);
    add_tiles(&ts, up_type, dim, (const char *)up + e * ubytes, (char *)act_u + (size_t)off[e] * ab_u, ab_u, n, ffn,
              U + (size_t)off[e] * ffn, ffn, share);
  }
  tiles_run(&ts);

  // 3. silu(gate) * up, converted for the down weights.
  parallel_for(S, 20.0 * ffn, silu_range, &c);

  // 4. down GEMMs.
  for (int e = 0; e < nExperts; e++) {
    int n = off[e + 1] - off[e];
    if (!n) continue;
    add_tiles(&ts, down_type, ffn, (const char *)down + e * dbytes, (char *)act_d + (size_t)off[e] * ab_d, ab_d, n, dim,
              D + (size_t)off[e] * dim, dim, (double)n / S);
  }
  tiles_run(&ts);

  // 5. Weighted sum of each row's slots, in slot order.
  parallel_for(rows, 2.0 * k * dim, combine_range, &c);
}

int moe_moe_ffn(float *out, const float *x, int rows, const int32_t *experts, const float *weights, int k,
                const void *gate, int gate_type, const void *up, int up_type, const void *down, int down_type,
                int nExperts, int ffn, int dim) {
  int types[3] = {gate_type, up_type, down_type};
  for (int i = 0; i < 3; i++)
    if (!moe_is_float_type(types[i]) && !moe_gemm_supports(types[i])) return -1;
  if (rows <= 0 || k <= 0) return 0;
  for (long long i = 0; i < (long long)rows * k; i++)
    if (experts[i] < 0 || experts[i] >= nExperts) return -2;
  // Long prompts go in chunks of rows so the per-slot buffers stay bounded (~64 MB each). Every row's result is the
  // same in any chunk (the kernels do not mix rows), so chunking changes nothing but memory.
  int wide = ffn > dim ? ffn : dim;
  int chunk = g_moe_chunk > 0 ? g_moe_chunk : (int)((16LL << 20) / ((long long)k * wide));
  if (chunk < 1) chunk = 1;
  for (int r0 = 0; r0 < rows; r0 += chunk) {
    int n = rows - r0 < chunk ? rows - r0 : chunk;
    moe_chunk(out + (size_t)r0 * dim, x + (size_t)r0 * dim, n, experts + (size_t)r0 * k, weights + (size_t)r0 * k, k,
              gate, gate_type, up, up_type, down, down_type, nExperts, ffn, dim);
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------------------------
// Training helpers: accumulate-into GEMM, transpose, and the cross-entropy's softmax rows (src/autograd/native-kernels.ts)
// ---------------------------------------------------------------------------------------------------------------
typedef struct { float *dst; const float *src; size_t n; } addv_t;
#define ADD_CHUNK 16384
static void add_range(void *p, int i0, int i1) {
  addv_t *c = p;
  size_t a = (size_t)i0 * ADD_CHUNK, b = (size_t)i1 * ADD_CHUNK;
  if (b > c->n) b = c->n;
  for (size_t i = a; i < b; i++) c->dst[i] += c->src[i];
}

int moe_matmul_acc(float *out, const float *x, int rows, const float *w, int outDim, int inDim) {
  if (rows <= 0 || outDim <= 0) return 0;
  size_t n = (size_t)rows * outDim;
  float *tmp = scratch(S_G, n * sizeof(float) + 64);
  if (!tmp) abort();
  int r = moe_matmul(tmp, x, rows, w, MOE_F32, outDim, inDim);
  if (r) return r;
  addv_t c = {out, tmp, n};
  parallel_for((int)((n + ADD_CHUNK - 1) / ADD_CHUNK), ADD_CHUNK, add_range, &c);
  return 0;
}

typedef struct { float *dst; const float *src; int rows, cols; } tr_t;
#define TR_B 32
static void tr_range(void *p, int b0, int b1) {
  tr_t *c = p;
  for (int b = b0; b < b1; b++) {
    int r0 = b * TR_B, r1 = r0 + TR_B < c->rows ? r0 + TR_B : c->rows;
    for (int c0 = 0; c0 < c->cols; c0 += TR_B) {
      int c1 = c0 + TR_B < c->cols ? c0 + TR_B : c->cols;
      for (int r = r0; r < r1; r++)
        for (int k = c0; k < c1; k++) c->dst[(size_t)k * c->rows + r] = c->src[(size_t)r * c->cols + k];
    }
  }
}

void moe_transpose_f32(float *dst, const float *src, int rows, int cols) {
  tr_t c = {dst, src, rows, cols};
  parallel_for(cdiv(rows, TR_B), (double)TR_B * cols, tr_range, &c);
}

typedef struct { const float *x; float *probs; double *lse; int n; } smr_t;
static void smr_range(void *p, int r0, int r1) {
  smr_t *c = p;
  const moe_fkern *K = moe_fk();
  float *row = c->probs ? NULL : scratch(S_ATT, (size_t)c->n * sizeof(float) + 64);
  for (int r = r0; r < r1; r++) {
    float *dst = c->probs ? c->probs + (size_t)r * c->n : row;
    memcpy(dst, c->x + (size_t)r * c->n, (size_t)c->n * sizeof(float));
    c->lse[r] = K->softmax_row(dst, c->n, 0);
  }
}

void moe_softmax_rows(const float *x, int rows, int n, double *lse, float *probs) {
  smr_t c = {x, probs, lse, n};
  parallel_for(rows, 8.0 * n, smr_range, &c);
}

// Cross-entropy backward (src/autograd/losses.ts): dz[r] += c * probs[r], dz[r, target] -= c, rows with a negative
// target skipped (dz == probs: overwritten with c * probs, those rows zeroed); in double with one rounding per store, as the TypeScript does, so the two agree bit for bit.
typedef struct { float *dz; const float *probs; const int32_t *targets; int n; double c; } ceb_t;
static void ceb_range(void *p, int r0, int r1) {
  ceb_t *a = p;
  for (int r = r0; r < r1; r++) {
    float *dz = a->dz + (size_t)r * a->n;
    const float *pr = a->probs + (size_t)r * a->n;
    if (a->targets[r] < 0) {
      if (dz == pr) memset(dz, 0, (size_t)a->n * sizeof(float));
      continue;
    }
    if (dz == pr)
      for (int v = 0; v < a->n; v++) dz[v] = (float)(a->c * (double)pr[v]);
    else
      for (int v = 0; v < a->n; v++) dz[v] = (float)((double)dz[v] + a->c * (double)pr[v]);
    dz[a->targets[r]] = (float)((double)dz[a->targets[r]] - a->c);
  }
}

void moe_cross_entropy_backward(float *dz, const float *probs, const int32_t *targets, int rows, int n, double c) {
  ceb_t a = {dz, probs, targets, n, c};
  parallel_for(rows, 2.0 * n, ceb_range, &a);
}

// AdamW (src/workflows/optimizer.ts AdamW.step) over f32 parameters and moments, the same double arithmetic in the
// same order (-ffp-contract=off keeps it unfused), so the update is bit-identical to the TypeScript loop.
#define ADAMW_CHUNK 16384
typedef struct { float *p; const float *g; float *m, *v; long long n; double b1, b2, step, bc2s, eps, decay; } adamw_t;
static void adamw_range(void *q, int c0, int c1) {
  adamw_t *a = q;
  const long long j1 = (long long)c1 * ADAMW_CHUNK < a->n ? (long long)c1 * ADAMW_CHUNK : a->n;
  const double ob1 = 1 - a->b1, ob2 = 1 - a->b2;
  for (long long j = (long long)c0 * ADAMW_CHUNK; j < j1; j++) {
    const double g = a->g[j];
    const float m = (float)(a->b1 * (double)a->m[j] + ob1 * g);
    const float v = (float)(a->b2 * (double)a->v[j] + ob2 * g * g);
    a->m[j] = m;
    a->v[j] = v;
    a->p[j] = (float)((double)a->p[j] * a->decay - (a->step * (double)m) / (sqrt((double)v) / a->bc2s + a->eps));
  }
}

void moe_adamw_f32(float *p, const float *g, float *m, float *v, long long n, double b1, double b2, double step,
                   double bc2s, double eps, double decay) {
  adamw_t a = {p, g, m, v, n, b1, b2, step, bc2s, eps, decay};
  const long long chunks = (n + ADAMW_CHUNK - 1) / ADAMW_CHUNK;
  if (chunks > 0) parallel_for((int)chunks, 8.0 * ADAMW_CHUNK, adamw_range, &a);
}

// Training attention (src/autograd/ops.ts attention): the same loops as refKernels, in double like the TypeScript,
// one task per (sequence, kv head) so the heads sharing a kv head never write the same dk / dv rows concurrently.
typedef struct {
  float *out;
  double *probs; // [B, H, T, T], zero where masked
  const float *q, *k, *v, *g;
  float *dq, *dk, *dv;
  int B, T, H, KV, hd, win;
} tatt_t;

static void tatt_fwd_range(void *p, int t0, int t1) {
  tatt_t *c = p;
  const int T = c->T, H = c->H, hd = c->hd, group = c->H / c->KV, qs = c->H * hd, ks = c->KV * hd;
  const double scale = 1.0 / sqrt((double)hd);
  double *acc = scratch(S_ATT, (size_t)hd * sizeof(double) + 64);
  if (!acc) abort();
  for (int t = t0; t < t1; t++) {
    const int b = t / c->KV, kvh = t % c->KV;
    for (int h = kvh * group; h < (kvh + 1) * group; h++) {
      for (int i = 0; i < T; i++) {
        const size_t qo = (size_t)(b * T + i) * qs + (size_t)h * hd, po = ((size_t)(b * H + h) * T + i) * T;
        const int j0 = c->win > 0 && i - c->win + 1 > 0 ? i - c->win + 1 : 0;
        double mx = -INFINITY;
        for (int j = j0; j <= i; j++) {
          const float *kr = c->k + (size_t)(b * T + j) * ks + (size_t)kvh * hd;
          double s = 0;
          for (int d = 0; d < hd; d++) s += (double)c->q[qo + d] * kr[d];
          s *= scale;
          c->probs[po + j] = s;
          if (s > mx) mx = s;
        }
        double sum = 0;
        for (int j = j0; j <= i; j++) sum += (c->probs[po + j] = exp(c->probs[po + j] - mx));
        for (int j = j0; j <= i; j++) c->probs[po + j] /= sum;
        for (int d = 0; d < hd; d++) acc[d] = 0;
        for (int j = j0; j <= i; j++) {
          const double pj = c->probs[po + j];
          const float *vr = c->v + (size_t)(b * T + j) * ks + (size_t)kvh * hd;
          for (int d = 0; d < hd; d++) acc[d] += pj * vr[d];
        }
        for (int d = 0; d < hd; d++) c->out[qo + d] = (float)acc[d];
      }
    }
  }
}

static void tatt_bwd_range(void *p, int t0, int t1) {
  tatt_t *c = p;
  const int T = c->T, H = c->H, hd = c->hd, group = c->H / c->KV, qs = c->H * hd, ks = c->KV * hd;
  const double scale = 1.0 / sqrt((double)hd);
  double *dp = scratch(S_ATT, (size_t)T * sizeof(double) + 64);
  if (!dp) abort();
  for (int t = t0; t < t1; t++) {
    const int b = t / c->KV, kvh = t % c->KV;
    for (int h = kvh * group; h < (kvh + 1) * group; h++) {
      for (int i = 0; i < T; i++) {
        const size_t qo = (size_t)(b * T + i) * qs + (size_t)h * hd, po = ((size_t)(b * H + h) * T + i) * T;
        const int j0 = c->win > 0 && i - c->win + 1 > 0 ? i - c->win + 1 : 0;
        const float *gr = c->g + qo;
        double dot = 0;
        for (int j = j0; j <= i; j++) {
          const size_t vo = (size_t)(b * T + j) * ks + (size_t)kvh * hd;
          double s = 0;
          for (int d = 0; d < hd; d++) s += (double)gr[d] * c->v[vo + d];
          dp[j] = s;
          const double pj = c->probs[po + j];
          dot += pj * s;
          if (c->dv) for (int d = 0; d < hd; d++) c->dv[vo + d] = (float)((double)c->dv[vo + d] + pj * gr[d]);
        }
        for (int j = j0; j <= i; j++) {
          const double ds = c->probs[po + j] * (dp[j] - dot) * scale;
          if (ds == 0) continue;
          const size_t ko = (size_t)(b * T + j) * ks + (size_t)kvh * hd;
          if (c->dq) for (int d = 0; d < hd; d++) c->dq[qo + d] = (float)((double)c->dq[qo + d] + ds * c->k[ko + d]);
          if (c->dk) for (int d = 0; d < hd; d++) c->dk[ko + d] = (float)((double)c->dk[ko + d] + ds * c->q[qo + d]);
        }
      }
    }
  }
}

void moe_train_attention(float *out, double *probs, const float *q, const float *k, const float *v, int B, int T, int H,
                         int KV, int hd, int win) {
  tatt_t c = {out, probs, q, k, v, NULL, NULL, NULL, NULL, B, T, H, KV, hd, win};
  parallel_for(B * KV, 2.0 * (H / KV) * T * T * hd, tatt_fwd_range, &c);
}

void moe_train_attention_backward(const float *g, const double *probs, const float *q, const float *k, const float *v,
                                  float *dq, float *dk, float *dv, int B, int T, int H, int KV, int hd, int win) {
  tatt_t c = {NULL, (double *)probs, q, k, v, g, dq, dk, dv, B, T, H, KV, hd, win};
  parallel_for(B * KV, 4.0 * (H / KV) * T * T * hd, tatt_bwd_range, &c);
}
