// N-API glue: every call is synchronous and works on the caller's TypedArrays in place (no copies). Arguments are
// checked here (types, sizes, ranges) so that a wrong call throws a JavaScript error instead of reading or writing
// out of bounds; the kernels behind this file trust what they are given.
#include <node_api.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifndef _WIN32
#include <sys/mman.h>
#endif
#include "kernels.h"
#include "ops.h"

#include "mmap.h"
void moe_quant_force_path(int path); // quant.c: 0 = best, 1 = generic, 2 = avx2, 3 = avx512

#define MAXARGS 16
#define CHECK(call) \
  do { if ((call) != napi_ok) { throw_err(env, "internal N-API error in " #call); return NULL; } } while (0)

static void throw_err(napi_env env, const char *msg) {
  bool pending = false;
  napi_is_exception_pending(env, &pending);
  if (!pending) napi_throw_error(env, "ERR_MOE_NATIVE", msg);
}
static void throw_range(napi_env env, const char *msg) {
  bool pending = false;
  napi_is_exception_pending(env, &pending);
  if (!pending) napi_throw_range_error(env, "ERR_MOE_NATIVE_RANGE", msg);
}

typedef struct {
  napi_env env;
  const char *fn;
  size_t argc;
  napi_value argv[MAXARGS];
  int failed;
} args_t;

static int get_args(args_t *a, napi_env env, napi_callback_info info, const char *fn, size_t want) {
  a->env = env;
  a->fn = fn;
  a->argc = MAXARGS;
  a->failed = 0;
  if (napi_get_cb_info(env, info, &a->argc, a->argv, NULL, NULL) != napi_ok) {
    throw_err(env, "cannot read arguments");
    return 0;
  }
  if (a->argc < want) {
    char m[160];
    snprintf(m, sizeof m, "%s: expected %zu arguments, got %zu", fn, want, a->argc);
    napi_throw_type_error(env, "ERR_MOE_NATIVE_ARGS", m);
    return 0;
  }
  return 1;
}

__attribute__((format(printf, 3, 4))) static void fail(args_t *a, int range, const char *fmt, ...) {
  char m[256], d[200];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(d, sizeof d, fmt, ap);
  va_end(ap);
  snprintf(m, sizeof m, "%s: %s", a->fn, d);
  if (range) throw_range(a->env, m);
  else napi_throw_type_error(a->env, "ERR_MOE_NATIVE_ARGS", m);
  a->failed = 1;
}

/** A TypedArray argument of the given kind; its element count goes to *len. */
static void *typed(args_t *a, size_t i, napi_typedarray_type want, const char *what, size_t *len) {
  if (a->failed) return NULL;
  bool is = false;
  napi_is_typedarray(a->env, a->argv[i], &is);
  napi_typedarray_type t;
  void *data = NULL;
  size_t n = 0;
  if (is) napi_get_typedarray_info(a->env, a->argv[i], &t, &n, &data, NULL, NULL);
  if (!is || t != want) {
    const char *name = want == napi_float32_array ? "a Float32Array" : want == napi_int32_array ? "an Int32Array"
                     : want == napi_uint16_array ? "a Uint16Array" : "another typed array";
    fail(a, 0, "%s has the wrong type (want %s)", what, name);
    return NULL;
  }
  *len = n;
  return data;
}

/** Any TypedArray (weights: a Uint8Array view of the file); its byte length goes to *bytes. */
static const void *bytes_of(args_t *a, size_t i, const char *what, size_t *bytes) {
  if (a->failed) return NULL;
  bool is = false;
  napi_is_typedarray(a->env, a->argv[i], &is);
  if (!is) {
    fail(a, 0, "%s must be a TypedArray", what);
    return NULL;
  }
  napi_typedarray_type t;
  void *data = NULL;
  size_t n = 0;
  napi_get_typedarray_info(a->env, a->argv[i], &t, &n, &data, NULL, NULL);
  size_t es = 1;
  switch (t) {
    case napi_int16_array: case napi_uint16_array: es = 2; break;
    case napi_int32_array: case napi_uint32_array: case napi_float32_array: es = 4; break;
    case napi_float64_array: case napi_bigint64_array: case napi_biguint64_array: es = 8; break;
    default: es = 1;
  }
  *bytes = n * es;
  return data;
}

static long long integer(args_t *a, size_t i, const char *what, long long lo, long long hi) {
  if (a->failed) return 0;
  double v;
  if (napi_get_value_double(a->env, a->argv[i], &v) != napi_ok) {
    fail(a, 0, "%s must be a number", what);
    return 0;
  }
  if (!(v >= (double)lo && v <= (double)hi) || v != (double)(long long)v) {
    fail(a, 1, "%s must be an integer in %lld..%lld", what, lo, hi);
    return 0;
  }
  return (long long)v;
}

static double number(args_t *a, size_t i, const char *what) {
  if (a->failed) return 0;
  double v;
  if (napi_get_value_double(a->env, a->argv[i], &v) != napi_ok) fail(a, 0, "%s must be a number", what);
  return v;
}

static int need(args_t *a, const char *what, size_t have, long long want) {
  if (a->failed) return 0;
  if ((long long)have < want) {
    fail(a, 1, "%s is too short: %lld elements, need %lld", what, (long long)have, want);
    return 0;
  }
  return 1;
}

static napi_value js_bool(napi_env env, int v) {
  napi_value r;
  napi_get_boolean(env, v != 0, &r);
  return r;
}
static napi_value undef(napi_env env) {
  napi_value r;
  napi_get_undefined(env, &r);
  return r;
}

#define DIM_MAX 0x7fffffffLL

/**
 * Checks weight matrix argument `what` [outDim, inDim] of type wtype, held in nw bytes: 1 when it fits, 0 for a type
 * the addon does not know (the caller falls back to ref), -1 after throwing (a partial block, too few bytes).
 */
static int check_weights(args_t *a, const char *what, long long wtype, size_t nw, long long outDim, long long inDim) {
  int bs = moe_block_size((int)wtype);
  if (!bs) return 0;
  if (inDim % bs) {
    fail(a, 1, "inDim %lld is not a whole number of blocks of %d (type %lld)", inDim, bs, wtype);
    return -1;
  }
  long long want = (long long)moe_row_bytes((int)wtype, inDim) * outDim;
  if ((long long)nw < want) {
    fail(a, 1, "%s hold %lld bytes, need %lld", what, (long long)nw, want);
    return -1;
  }
  return 1;
}

// matmul(out: Float32Array, x: Float32Array, rows, w: TypedArray, wtype, outDim, inDim) -> false if wtype unsupported
static napi_value js_matmul(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "matmul", 7)) return NULL;
  size_t no = 0, nx = 0, nw = 0;
  float *out = typed(&a, 0, napi_float32_array, "out", &no);
  const float *x = typed(&a, 1, napi_float32_array, "x", &nx);
  long long rows = integer(&a, 2, "rows", 0, DIM_MAX);
  const void *w = bytes_of(&a, 3, "weights", &nw);
  long long wtype = integer(&a, 4, "weight type", 0, 255);
  long long outDim = integer(&a, 5, "outDim", 1, DIM_MAX), inDim = integer(&a, 6, "inDim", 1, DIM_MAX);
  if (a.failed) return NULL;
  int wok = check_weights(&a, "weights", wtype, nw, outDim, inDim);
  if (wok <= 0) return wok ? NULL : js_bool(env, 0); // unknown type: the caller falls back to ref
  if (!need(&a, "out", no, rows * outDim) || !need(&a, "x", nx, rows * inDim)) return NULL;
  bool acc = false; // optional 8th argument: add the product into out (f32 weights only)
  if (a.argc > 7 && napi_get_value_bool(env, a.argv[7], &acc) != napi_ok) { fail(&a, 0, "accumulate must be a boolean"); return NULL; }
  if (acc) {
    if (wtype != MOE_F32) { fail(&a, 1, "accumulate needs f32 weights"); return NULL; }
    return js_bool(env, moe_matmul_acc(out, x, (int)rows, (const float *)w, (int)outDim, (int)inDim) == 0);
  }
  return js_bool(env, moe_matmul(out, x, (int)rows, w, (int)wtype, (int)outDim, (int)inDim) == 0);
}

// matmulMany(outs: Float32Array[], x: Float32Array, rows, ws: TypedArray[], wtypes: number[], outDims: number[], inDim)
// -> false if a type is unsupported or the types convert x differently (then nothing is written)
#define MANY_MAX 16
static napi_value js_matmul_many(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "matmulMany", 7)) return NULL;
  size_t nx = 0;
  const float *x = typed(&a, 1, napi_float32_array, "x", &nx);
  long long rows = integer(&a, 2, "rows", 0, DIM_MAX), inDim = integer(&a, 6, "inDim", 1, DIM_MAX);
  if (a.failed) return NULL;
  uint32_t count = 0;
  bool isArr = false;
  for (int i = 0; i < 4; i++) {
    const size_t at[4] = {0, 3, 4, 5};
    uint32_t len = 0;
    napi_is_array(env, a.argv[at[i]], &isArr);
    if (!isArr || napi_get_array_length(env, a.argv[at[i]], &len) != napi_ok) { fail(&a, 0, "outs, ws, wtypes and outDims must be arrays"); return NULL; }
    if (i == 0) count = len;
    else if (len != count) { fail(&a, 1, "outs, ws, wtypes and outDims must have the same length"); return NULL; }
  }
  if (count < 1 || count > MANY_MAX) { fail(&a, 1, "between 1 and %d matrices, got %u", MANY_MAX, count); return NULL; }
  float *outs[MANY_MAX];
  const void *ws[MANY_MAX];
  int types[MANY_MAX], dims[MANY_MAX];
  if (!need(&a, "x", nx, rows * inDim)) return NULL;
  for (uint32_t i = 0; i < count; i++) {
    args_t e = a; // the i-th elements, checked by the same helpers
    e.argc = 4;
    CHECK(napi_get_element(env, a.argv[0], i, &e.argv[0]));
    CHECK(napi_get_element(env, a.argv[3], i, &e.argv[1]));
    CHECK(napi_get_element(env, a.argv[4], i, &e.argv[2]));
    CHECK(napi_get_element(env, a.argv[5], i, &e.argv[3]));
    size_t no = 0, nw = 0;
    outs[i] = typed(&e, 0, napi_float32_array, "outs[i]", &no);
    ws[i] = bytes_of(&e, 1, "ws[i]", &nw);
    long long t = integer(&e, 2, "wtypes[i]", 0, 255), od = integer(&e, 3, "outDims[i]", 1, DIM_MAX);
    if (e.failed) return NULL;
    int wok = check_weights(&e, "ws[i]", t, nw, od, inDim);
    if (wok <= 0) return wok ? NULL : js_bool(env, 0);
    if (!need(&e, "outs[i]", no, rows * od)) return NULL;
    types[i] = (int)t;
    dims[i] = (int)od;
  }
  return js_bool(env, moe_matmul_many((int)count, outs, x, (int)rows, ws, types, dims, (int)inDim) == 0);
}

// transpose(dst, src, rows, cols): dst[cols, rows] = src[rows, cols]^T
static napi_value js_transpose(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "transpose", 4)) return NULL;
  size_t nd = 0, ns = 0;
  float *dst = typed(&a, 0, napi_float32_array, "dst", &nd);
  const float *src = typed(&a, 1, napi_float32_array, "src", &ns);
  long long rows = integer(&a, 2, "rows", 0, DIM_MAX), cols = integer(&a, 3, "cols", 0, DIM_MAX);
  if (a.failed || !need(&a, "dst", nd, rows * cols) || !need(&a, "src", ns, rows * cols)) return NULL;
  if (rows > 0 && cols > 0) moe_transpose_f32(dst, src, (int)rows, (int)cols);
  return undef(env);
}

/** An optional Float32Array argument (null / undefined: NULL) of at least `want` elements. */
static float *opt_f32(args_t *a, size_t i, const char *what, long long want) {
  napi_valuetype t;
  if (a->failed || napi_typeof(a->env, a->argv[i], &t) != napi_ok || t == napi_null || t == napi_undefined) return NULL;
  size_t n = 0;
  float *p = typed(a, i, napi_float32_array, what, &n);
  if (p && !need(a, what, n, want)) return NULL;
  return p;
}

// trainAttention(out, probs: Float64Array, q, k, v, B, T, H, KV, hd, window) and
// trainAttentionBackward(g, probs, q, k, v, dq | null, dk | null, dv | null, B, T, H, KV, hd, window)
static int att_dims(args_t *a, size_t i0, long long d[6]) {
  const char *names[6] = {"B", "T", "H", "KV", "hd", "window"};
  for (int i = 0; i < 6; i++) d[i] = integer(a, i0 + i, names[i], i == 5 ? 0 : 1, DIM_MAX);
  if (a->failed) return 0;
  if (d[2] % d[3]) { fail(a, 1, "H %lld is not a multiple of KV %lld", d[2], d[3]); return 0; }
  if (d[0] * d[1] > DIM_MAX || d[0] * d[2] * d[1] * d[1] > (1LL << 40)) { fail(a, 1, "attention too large"); return 0; }
  return 1;
}

static napi_value js_train_attention(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "trainAttention", 11)) return NULL;
  long long d[6];
  size_t no = 0, np = 0, nq = 0, nk = 0, nv = 0;
  float *out = typed(&a, 0, napi_float32_array, "out", &no);
  double *probs = typed(&a, 1, napi_float64_array, "probs", &np);
  const float *q = typed(&a, 2, napi_float32_array, "q", &nq), *k = typed(&a, 3, napi_float32_array, "k", &nk), *v = typed(&a, 4, napi_float32_array, "v", &nv);
  if (a.failed || !att_dims(&a, 5, d)) return NULL;
  const long long rows = d[0] * d[1];
  if (!need(&a, "out", no, rows * d[2] * d[4]) || !need(&a, "q", nq, rows * d[2] * d[4]) || !need(&a, "k", nk, rows * d[3] * d[4]) ||
      !need(&a, "v", nv, rows * d[3] * d[4]) || !need(&a, "probs", np, d[0] * d[2] * d[1] * d[1]))
    return NULL;
  moe_train_attention(out, probs, q, k, v, (int)d[0], (int)d[1], (int)d[2], (int)d[3], (int)d[4], (int)d[5]);
  return undef(env);
}

static napi_value js_train_attention_backward(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "trainAttentionBackward", 14)) return NULL;
  long long d[6];
  size_t ng = 0, np = 0, nq = 0, nk = 0, nv = 0;
  const float *g = typed(&a, 0, napi_float32_array, "g", &ng);
  const double *probs = typed(&a, 1, napi_float64_array, "probs", &np);
  const float *q = typed(&a, 2, napi_float32_array, "q", &nq), *k = typed(&a, 3, napi_float32_array, "k", &nk), *v = typed(&a, 4, napi_float32_array, "v", &nv);
  if (a.failed || !att_dims(&a, 8, d)) return NULL;
  const long long rows = d[0] * d[1], qn = rows * d[2] * d[4], kn = rows * d[3] * d[4];
  float *dq = opt_f32(&a, 5, "dq", qn), *dk = opt_f32(&a, 6, "dk", kn), *dv = opt_f32(&a, 7, "dv", kn);
  if (a.failed || !need(&a, "g", ng, qn) || !need(&a, "q", nq, qn) || !need(&a, "k", nk, kn) || !need(&a, "v", nv, kn) ||
      !need(&a, "probs", np, d[0] * d[2] * d[1] * d[1]))
    return NULL;
  moe_train_attention_backward(g, probs, q, k, v, dq, dk, dv, (int)d[0], (int)d[1], (int)d[2], (int)d[3], (int)d[4], (int)d[5]);
  return undef(env);
}

// softmaxRows(x, rows, n, lse: Float64Array, probs: Float32Array | null)
static napi_value js_softmax_rows(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "softmaxRows", 5)) return NULL;
  size_t nx = 0, nl = 0, np = 0;
  const float *x = typed(&a, 0, napi_float32_array, "x", &nx);
  long long rows = integer(&a, 1, "rows", 0, DIM_MAX), n = integer(&a, 2, "n", 1, DIM_MAX);
  double *lse = typed(&a, 3, napi_float64_array, "lse", &nl);
  napi_valuetype pt;
  float *probs = NULL;
  if (!a.failed && napi_typeof(env, a.argv[4], &pt) == napi_ok && pt != napi_null) probs = typed(&a, 4, napi_float32_array, "probs", &np);
  if (a.failed || !need(&a, "x", nx, rows * n) || !need(&a, "lse", nl, rows) || (probs && !need(&a, "probs", np, rows * n))) return NULL;
  if (rows > 0) moe_softmax_rows(x, (int)rows, (int)n, lse, probs);
  return undef(env);
}

// crossEntropyBackward(dz, probs, targets: Int32Array, rows, n, c)
static napi_value js_ce_backward(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "crossEntropyBackward", 6)) return NULL;
  size_t nd = 0, np = 0, nt = 0;
  float *dz = typed(&a, 0, napi_float32_array, "dz", &nd);
  const float *probs = typed(&a, 1, napi_float32_array, "probs", &np);
  const int32_t *targets = typed(&a, 2, napi_int32_array, "targets", &nt);
  long long rows = integer(&a, 3, "rows", 0, DIM_MAX), n = integer(&a, 4, "n", 1, DIM_MAX);
  double c = number(&a, 5, "c");
  if (a.failed || !need(&a, "dz", nd, rows * n) || !need(&a, "probs", np, rows * n) || !need(&a, "targets", nt, rows)) return NULL;
  for (long long r = 0; r < rows; r++)
    if (targets[r] >= n) { fail(&a, 1, "target %d at row %lld is outside 0..%lld", targets[r], r, n - 1); return NULL; }
  if (rows > 0) moe_cross_entropy_backward(dz, probs, targets, (int)rows, (int)n, c);
  return undef(env);
}

// adamw(p, g, m, v, beta1, beta2, stepSize, bc2Sqrt, eps, decay): all four Float32Arrays of p's length
static napi_value js_adamw(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "adamw", 10)) return NULL;
  size_t np = 0, ng = 0, nm = 0, nv = 0;
  float *p = typed(&a, 0, napi_float32_array, "p", &np);
  const float *g = typed(&a, 1, napi_float32_array, "g", &ng);
  float *m = typed(&a, 2, napi_float32_array, "m", &nm), *v = typed(&a, 3, napi_float32_array, "v", &nv);
  double h[6];
  const char *names[6] = {"beta1", "beta2", "stepSize", "bc2Sqrt", "eps", "decay"};
  for (int i = 0; i < 6; i++) h[i] = number(&a, 4 + i, names[i]);
  if (a.failed || !need(&a, "g", ng, (long long)np) || !need(&a, "m", nm, (long long)np) || !need(&a, "v", nv, (long long)np)) return NULL;
  moe_adamw_f32(p, g, m, v, (long long)np, h[0], h[1], h[2], h[3], h[4], h[5]);
  return undef(env);
}

// rmsNorm(out, x, rows, weight, eps)
static napi_value js_rmsnorm(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "rmsNorm", 5)) return NULL;
  size_t no = 0, nx = 0, nw = 0;
  float *out = typed(&a, 0, napi_float32_array, "out", &no);
  const float *x = typed(&a, 1, napi_float32_array, "x", &nx);
  long long rows = integer(&a, 2, "rows", 0, DIM_MAX);
  const float *w = typed(&a, 3, napi_float32_array, "weight", &nw);
  double eps = number(&a, 4, "eps");
  if (a.failed) return NULL;
  if (nw == 0 || nw > DIM_MAX) { fail(&a, 1, "weight has %lld elements", (long long)nw); return NULL; }
  if (!need(&a, "out", no, rows * (long long)nw) || !need(&a, "x", nx, rows * (long long)nw)) return NULL;
  moe_rmsnorm(out, x, (int)rows, w, (int)nw, eps);
  return undef(env);
}

// toF16(dst: Uint16Array, src: Float32Array): dst[i] = the f16 bits of src[i] (round to nearest even, as an f16 KV
// cache stores keys and values); dst must hold src.length values.
static napi_value js_to_f16(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "toF16", 2)) return NULL;
  size_t nd = 0, ns = 0;
  uint16_t *dst = typed(&a, 0, napi_uint16_array, "dst", &nd);
  const float *src = typed(&a, 1, napi_float32_array, "src", &ns);
  if (a.failed) return NULL;
  if (!need(&a, "dst", nd, (long long)ns)) return NULL;
  moe_fk()->to_f16(src, dst, ns);
  return undef(env);
}

// rope(x, rows, nHeads, headDim, positions: Int32Array, theta)
static napi_value js_rope(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "rope", 6)) return NULL;
  size_t nx = 0, np = 0;
  float *x = typed(&a, 0, napi_float32_array, "x", &nx);
  long long rows = integer(&a, 1, "rows", 0, DIM_MAX), nH = integer(&a, 2, "nHeads", 1, 1 << 20);
  long long hd = integer(&a, 3, "headDim", 2, 1 << 20);
  const int32_t *pos = typed(&a, 4, napi_int32_array, "positions", &np);
  double theta = number(&a, 5, "theta");
  if (a.failed) return NULL;
  if (hd % 2) { fail(&a, 1, "headDim %lld is odd", hd); return NULL; }
  if (!need(&a, "x", nx, rows * nH * hd) || !need(&a, "positions", np, rows)) return NULL;
  moe_rope(x, (int)rows, (int)nH, (int)hd, pos, theta);
  return undef(env);
}

// attention(out, q, rows, start, kCache, vCache, nHeads, nKvHeads, headDim, scale, window (0 = none), kvF16)
// kCache / vCache: Float32Array, or the f16 bits in a Uint16Array when kvF16.
static napi_value js_attention(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "attention", 12)) return NULL;
  bool kvF16 = false;
  if (napi_get_value_bool(env, a.argv[11], &kvF16) != napi_ok) { fail(&a, 0, "kvF16 must be a boolean"); return NULL; }
  size_t no = 0, nq = 0, nk = 0, nv = 0;
  float *out = typed(&a, 0, napi_float32_array, "out", &no);
  const float *q = typed(&a, 1, napi_float32_array, "q", &nq);
  long long rows = integer(&a, 2, "rows", 0, DIM_MAX), start = integer(&a, 3, "start", 0, DIM_MAX);
  const napi_typedarray_type kvType = kvF16 ? napi_uint16_array : napi_float32_array;
  const void *k = typed(&a, 4, kvType, "kCache", &nk);
  const void *v = typed(&a, 5, kvType, "vCache", &nv);
  long long nH = integer(&a, 6, "nHeads", 1, 1 << 20), nKv = integer(&a, 7, "nKvHeads", 1, 1 << 20);
  long long hd = integer(&a, 8, "headDim", 1, 1 << 20);
  double scale = number(&a, 9, "scale");
  long long window = integer(&a, 10, "window", 0, DIM_MAX);
  if (a.failed) return NULL;
  if (nH % nKv) { fail(&a, 1, "nHeads %lld is not a multiple of nKvHeads %lld", nH, nKv); return NULL; }
  if (start + rows > DIM_MAX) { fail(&a, 1, "start + rows = %lld is too large", start + rows); return NULL; }
  long long total = start + rows;
  if (!need(&a, "out", no, rows * nH * hd) || !need(&a, "q", nq, rows * nH * hd) ||
      !need(&a, "kCache", nk, total * nKv * hd) || !need(&a, "vCache", nv, total * nKv * hd))
    return NULL;
  moe_attention(out, q, (int)rows, (int)start, k, v, (int)nH, (int)nKv, (int)hd, (float)scale, (int)window, kvF16);
  return undef(env);
}

// moeFFN(out, x, rows, experts: Int32Array, weights: Float32Array, k, gate, gateType, up, upType, down, downType,
//        nExperts, ffn, dim) -> false if a type is unsupported
static napi_value js_moe(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "moeFFN", 15)) return NULL;
  size_t no = 0, nx = 0, ne = 0, nwt = 0, ng = 0, nu = 0, nd = 0;
  float *out = typed(&a, 0, napi_float32_array, "out", &no);
  const float *x = typed(&a, 1, napi_float32_array, "x", &nx);
  long long rows = integer(&a, 2, "rows", 0, DIM_MAX);
  const int32_t *ex = typed(&a, 3, napi_int32_array, "experts", &ne);
  const float *wt = typed(&a, 4, napi_float32_array, "weights", &nwt);
  long long k = integer(&a, 5, "k", 1, 1 << 16);
  const void *gate = bytes_of(&a, 6, "gate", &ng);
  long long gt = integer(&a, 7, "gate type", 0, 255);
  const void *up = bytes_of(&a, 8, "up", &nu);
  long long ut = integer(&a, 9, "up type", 0, 255);
  const void *down = bytes_of(&a, 10, "down", &nd);
  long long dt = integer(&a, 11, "down type", 0, 255);
  long long E = integer(&a, 12, "nExperts", 1, 1 << 20), ffn = integer(&a, 13, "ffn", 1, DIM_MAX);
  long long dim = integer(&a, 14, "dim", 1, DIM_MAX);
  if (a.failed) return NULL;
  if (!moe_block_size((int)gt) || !moe_block_size((int)ut) || !moe_block_size((int)dt)) return js_bool(env, 0);
  size_t grb = moe_row_bytes((int)gt, dim), urb = moe_row_bytes((int)ut, dim), drb = moe_row_bytes((int)dt, ffn);
  if (!grb || !urb || !drb) { fail(&a, 1, "dim %lld / ffn %lld are not whole numbers of blocks of the expert types", dim, ffn); return NULL; }
  if (rows * k > DIM_MAX) { fail(&a, 1, "rows * k = %lld is too large", rows * k); return NULL; }
  if (!need(&a, "out", no, rows * dim) || !need(&a, "x", nx, rows * dim) || !need(&a, "experts", ne, rows * k) ||
      !need(&a, "weights", nwt, rows * k))
    return NULL;
  if ((long long)ng < E * ffn * (long long)grb || (long long)nu < E * ffn * (long long)urb || (long long)nd < E * dim * (long long)drb) {
    fail(&a, 1, "expert weights are too short for %lld experts (ffn %lld, dim %lld)", E, ffn, dim);
    return NULL;
  }
  int rc = moe_moe_ffn(out, x, (int)rows, ex, wt, (int)k, gate, (int)gt, up, (int)ut, down, (int)dt, (int)E, (int)ffn,
                       (int)dim);
  if (rc == -2) { fail(&a, 1, "an expert id is outside 0..%lld", E - 1); return NULL; }
  return js_bool(env, rc == 0);
}

// A weight copy is a registered region (mmap.h) while it lives, so prefetch() may post it.
static void free_repacked(napi_env env, void *data, void *hint) {
  (void)env;
  moe_region_remove(hint); // returns once no worker reads ahead in it
  free(hint);
  free(data);
}

// repack(w: TypedArray, wtype, rows, n, anyMemory = false) -> { data: Uint8Array, type } | null
// The weights [rows, n] of type wtype copied into the engine's own memory, in the layout the kernels in use want
// (kernels.h moe_repack_type: q4_0 rearranged on AVX-512, other types as they are), or null (a type the kernels do
// not run, or no memory). The copy sits on 2 MB pages where the OS has them (madvise MADV_HUGEPAGE): streaming
// hundreds of MB per token through 4 KB file pages costs a TLB miss every 4 KB (scripts/bench-own-memory.mjs on the
// bench model: decode f16 1.11x, q8_0 1.04x, q4_0 1.21x with the repack). Only weights in a mapped model file are copied unless anyMemory (tests): those never
// change, so a copy made once stays right. The file's pages are released afterwards (moe_mmap_release), so only
// the copy stays resident.
static napi_value js_repack(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "repack", 4)) return NULL;
  size_t nw = 0;
  const void *w = bytes_of(&a, 0, "weights", &nw);
  long long wtype = integer(&a, 1, "weight type", 0, 255);
  long long rows = integer(&a, 2, "rows", 1, DIM_MAX), n = integer(&a, 3, "n", 1, DIM_MAX);
  if (a.failed) return NULL;
  napi_value nul;
  napi_get_null(env, &nul);
  bool any = false;
  if (a.argc > 4 && napi_get_value_bool(env, a.argv[4], &any) != napi_ok) { fail(&a, 0, "anyMemory must be a boolean"); return NULL; }
  int rt = moe_repack_type((int)wtype, (int)n);
  if (rt < 0) return nul;
  size_t bytes = moe_row_bytes((int)wtype, n) * (size_t)rows;
  if (nw < bytes) { fail(&a, 1, "weights hold %zu bytes, need %zu", nw, bytes); return NULL; }
  if (!any && !moe_mmap_contains(w, bytes)) return nul;
  void *dst = NULL;
  const size_t huge = (size_t)2 << 20; // whole 2 MB pages for large tensors; small ones need not waste one
  if (posix_memalign(&dst, bytes >= huge ? huge : 64, bytes) != 0) return nul; // no memory: the file's bytes still work
#ifdef MADV_HUGEPAGE
  madvise(dst, bytes, MADV_HUGEPAGE); // advice only
#endif
  moe_region *blk = malloc(sizeof *blk);
  if (!blk) { free(dst); return nul; }
  moe_repack_rows((int)wtype, w, dst, rows, (int)n);
  moe_mmap_release(w, bytes);
  *blk = (moe_region){dst, bytes, 0, NULL};
  moe_region_add(blk);
  napi_value ab, arr, o, t;
  if (napi_create_external_arraybuffer(env, dst, bytes, free_repacked, blk, &ab) != napi_ok) {
    // Node owns dst now and frees it on failure (see mmap.c); the file layout still works.
    napi_value pending;
    napi_get_and_clear_last_exception(env, &pending);
    return nul;
  }
  CHECK(napi_create_typedarray(env, napi_uint8_array, bytes, ab, 0, &arr));
  CHECK(napi_create_object(env, &o));
  CHECK(napi_create_int32(env, rt, &t));
  CHECK(napi_set_named_property(env, o, "data", arr));
  CHECK(napi_set_named_property(env, o, "type", t));
  return o;
}

static napi_value js_set_threads(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "setThreads", 1)) return NULL;
  long long n = integer(&a, 0, "threads", 1, 256);
  if (a.failed) return NULL;
  moe_pool_set_threads((int)n);
  napi_value r;
  napi_create_int32(env, moe_pool_threads(), &r);
  return r;
}

static napi_value js_set_kernels(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "setKernels", 1)) return NULL;
  char name[32];
  size_t len;
  if (napi_get_value_string_utf8(env, a.argv[0], name, sizeof name, &len) != napi_ok) {
    napi_throw_type_error(env, "ERR_MOE_NATIVE_ARGS", "setKernels: name must be a string");
    return NULL;
  }
  // The quantized kernels (quant.c) follow the same choice, so tests can run every path this CPU has.
  int ok = moe_fk_select(name);
  if (ok) moe_quant_force_path(!strcmp(name, "generic") ? 1 : !strcmp(name, "avx2") ? 2 : !strcmp(name, "avx512") ? 3 : 0);
  return js_bool(env, ok);
}

// prefetch(ws: Uint8Array[]): hints that the next job reads these weights; idle workers read them into cache
// meanwhile (kernels.h moe_pool_prefetch). Only registered regions (mmap.h: mapped files, the addon's weight copies,
// whose release cancels the reading) are read; anything else, and all past the 8th, is ignored.
static napi_value js_prefetch(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "prefetch", 1)) return NULL;
  bool isArr = false;
  uint32_t len = 0;
  napi_is_array(env, a.argv[0], &isArr);
  if (!isArr || napi_get_array_length(env, a.argv[0], &len) != napi_ok) { fail(&a, 0, "ws must be an array"); return NULL; }
  const void *ptrs[8];
  size_t bytes[8];
  int n = 0;
  for (uint32_t i = 0; i < len && n < 8; i++) {
    napi_value e;
    bool is = false;
    napi_typedarray_type t;
    size_t count = 0;
    void *data = NULL;
    if (napi_get_element(env, a.argv[0], i, &e) != napi_ok || napi_is_typedarray(env, e, &is) != napi_ok || !is ||
        napi_get_typedarray_info(env, e, &t, &count, &data, NULL, NULL) != napi_ok || t != napi_uint8_array) {
      fail(&a, 0, "ws[%u] is not a Uint8Array", i);
      return NULL;
    }
    if (!data || !count || !moe_region_contains(data, count)) continue;
    ptrs[n] = data;
    bytes[n++] = count;
  }
  moe_pool_prefetch(ptrs, bytes, n);
  return undef(env);
}

// setMoeChunk(rows): rows per MoE chunk, 0 = automatic (tests use it to cross chunk boundaries)
static napi_value js_set_moe_chunk(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "setMoeChunk", 1)) return NULL;
  long long n = integer(&a, 0, "rows", 0, DIM_MAX);
  if (a.failed) return NULL;
  moe_set_moe_chunk((int)n);
  return undef(env);
}

static napi_value js_supports(napi_env env, napi_callback_info info) {
  args_t a;
  if (!get_args(&a, env, info, "supports", 1)) return NULL;
  long long t = integer(&a, 0, "type", 0, 255);
  if (a.failed) return NULL;
  return js_bool(env, moe_is_float_type((int)t) || moe_gemm_supports((int)t));
}

static void set_str(napi_env env, napi_value o, const char *k, const char *v) {
  napi_value s;
  napi_create_string_utf8(env, v, NAPI_AUTO_LENGTH, &s);
  napi_set_named_property(env, o, k, s);
}
static void set_int(napi_env env, napi_value o, const char *k, int v) {
  napi_value s;
  napi_create_int32(env, v, &s);
  napi_set_named_property(env, o, k, s);
}

// info() -> { cpu: 'avx512-vnni' | ..., kernels: 'avx512' | ..., threads, features: {...} }
static napi_value js_info(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value o, f;
  napi_create_object(env, &o);
  napi_create_object(env, &f);
  set_str(env, o, "cpu", moe_cpu_path());
  set_str(env, o, "kernels", moe_fk()->name);
  set_int(env, o, "threads", moe_pool_threads());
  const moe_cpu_features *c = moe_cpu();
  set_int(env, f, "avx2", c->avx2); set_int(env, f, "fma", c->fma); set_int(env, f, "f16c", c->f16c);
  set_int(env, f, "avx512f", c->avx512f); set_int(env, f, "avx512bw", c->avx512bw); set_int(env, f, "avx512vl", c->avx512vl);
  set_int(env, f, "avx512vnni", c->avx512vnni); set_int(env, f, "avx512bf16", c->avx512bf16);
  set_int(env, f, "avxvnni", c->avxvnni); set_int(env, f, "neon", c->neon); set_int(env, f, "dotprod", c->dotprod);
  napi_set_named_property(env, o, "features", f);
  return o;
}

NAPI_MODULE_INIT() {
  struct { const char *name; napi_callback cb; } fns[] = {
      {"matmul", js_matmul}, {"matmulMany", js_matmul_many}, {"rmsNorm", js_rmsnorm}, {"toF16", js_to_f16}, {"rope", js_rope}, {"attention", js_attention},
      {"moeFFN", js_moe}, {"setThreads", js_set_threads}, {"setKernels", js_set_kernels}, {"setMoeChunk", js_set_moe_chunk}, {"prefetch", js_prefetch},
      {"supports", js_supports}, {"info", js_info}, {"mmap", moe_napi_mmap}, {"repack", js_repack},
      {"transpose", js_transpose}, {"softmaxRows", js_softmax_rows}, {"trainAttention", js_train_attention},
      {"trainAttentionBackward", js_train_attention_backward}, {"crossEntropyBackward", js_ce_backward}, {"adamw", js_adamw},
  };
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
    napi_value fn;
    if (napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].cb, NULL, &fn) != napi_ok ||
        napi_set_named_property(env, exports, fns[i].name, fn) != napi_ok)
      return NULL;
  }
  // CPU features and the kernel set are chosen here, on the loading thread, before any pool worker can race to.
  moe_cpu();
  moe_fk();
  if (moe_pool_threads() < 1) moe_pool_set_threads(1);
  return exports;
}
