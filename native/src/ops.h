// Internal interface between the kernel drivers (ops.c) and the per-ISA kernel files (ops_avx512.c, ops_avx2.c;
// the generic C versions live in ops.c). Not part of the shared kernels.h interface.
#pragma once
#include <stddef.h>
#include <stdint.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(MOE_NO_X86_KERNELS)
#define MOE_HAVE_X86_KERNELS 1 // ops_avx2.c / ops_avx512.c (each enables its instruction set for itself)
#endif

int moe_cpu_has_avx512(void); // AVX-512 F/BW/VL + FMA + F16C usable (OS saves ZMM state)
int moe_cpu_has_avx2(void);   // AVX2 + FMA + F16C

/** Kernels for f32 / f16 / bf16 weights on one instruction set. */
typedef struct {
  const char *name;
  /**
   * out[r*ldo + j] = dot(act row r, weight row j) for r < R, j in [j0, j1). act: f32 rows (already rounded as the
   * weight type's vec_dot_type asks). Each output's summation order is fixed (independent of R, j0, j1).
   */
  void (*tile)(int wtype, int n, const void *w, size_t w_row_bytes, const float *act, size_t lda, int R, int j0, int j1,
               float *out, size_t ldo);
  /** out = x rounded to wtype's vec_dot_type (f16 or bf16, kept as f32), or a copy for f32. */
  void (*round_act)(int wtype, const float *x, float *out, int n);
  float (*dot)(const float *a, const float *b, int n);
  /** y += a * x */
  void (*axpy)(float *y, float a, const float *x, int n);
  /** sum of x[i]^2 in double */
  double (*sumsq)(const float *x, int n);
  /**
   * In place: s[j] = exp(s[j] - max s) / sum (the sum in double), each then rounded to f16 when round_f16.
   * Returns log(sum exp(s)) (max + log sum), the row's log-normaliser.
   */
  double (*softmax_row)(float *s, int n, int round_f16);
  /** g[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u. */
  void (*silu_mul)(float *g, const float *u, int n);
  /**
   * Attention scores of G query heads (q: G rows of hd) against L keys (row j at k + j * kstride elements; f32, or
   * f16 bits when kf16): sc[g * ldsc + j] = dot(q_g, k_j) * scale, with dot's arithmetic on the keys' f32 values.
   */
  void (*scores)(const float *q, int G, int hd, const void *k, int kf16, size_t kstride, int L, float scale, float *sc,
                 size_t ldsc);
  /**
   * out[g * hd + d] = sum over j = 0..L-1 in order of p[g * ldp + j] * v[j * vstride + d] (f32, or f16 bits when
   * vf16), with axpy's arithmetic from zero (out is overwritten).
   */
  void (*weighted_sum)(const float *p, size_t ldp, int G, int hd, const void *v, int vf16, size_t vstride, int L,
                       float *out);
  /** out[i] = the f16 bits of x[i] (round to nearest even): how an f16 KV cache stores a key or value. */
  void (*to_f16)(const float *x, uint16_t *out, size_t n);
} moe_fkern;

/** The plain C versions (ops.c), also used by kernel sets that have no vector version of their own. */
double moe_softmax_row_generic(float *s, int n, int round_f16);
void moe_silu_mul_generic(float *g, const float *u, int n);
void moe_scores_generic(const float *q, int G, int hd, const void *k, int kf16, size_t kstride, int L, float scale,
                        float *sc, size_t ldsc);
void moe_weighted_sum_generic(const float *p, size_t ldp, int G, int hd, const void *v, int vf16, size_t vstride, int L,
                              float *out);
void moe_to_f16_generic(const float *x, uint16_t *out, size_t n);

extern const moe_fkern moe_fkern_generic;
#if defined(MOE_HAVE_X86_KERNELS)
extern const moe_fkern moe_fkern_avx2;
extern const moe_fkern moe_fkern_avx512;
#endif

const moe_fkern *moe_fk(void);

/** Scalar f16 / bf16 conversions, bit-exact with ggml (round to nearest even). */
float moe_f16_to_f32(uint16_t h);
uint16_t moe_f32_to_f16(float f);
float moe_bf16_to_f32(uint16_t h);
uint16_t moe_f32_to_bf16(float f);

/** Row bytes of n elements of a GGML type, or 0 when the type is unknown or n is not a whole number of blocks. */
size_t moe_row_bytes(int type, long long n);
int moe_is_float_type(int type);
/** Elements per block of a GGML type, 0 when unknown. */
int moe_block_size(int type);

// ---- Drivers (ops.c), all multi-threaded on the pool ----
/** out[rows, outDim] = x[rows, inDim] . W^T for a weight matrix of type wtype; returns 0, or -1 if unsupported. */
int moe_matmul(float *out, const float *x, int rows, const void *w, int wtype, int outDim, int inDim);
/**
 * outs[i][rows, outDims[i]] = x . W_i^T for `count` weight matrices of one input (q, k and v): x converted once and
 * one job for all. Returns 0, or -1 if a type is unsupported or the types convert x differently (nothing written).
 */
int moe_matmul_many(int count, float *const *outs, const float *x, int rows, const void *const *ws, const int *wtypes,
                    const int *outDims, int inDim);
void moe_rmsnorm(float *out, const float *x, int rows, const float *weight, int dim, double eps);
void moe_rope(float *x, int rows, int nHeads, int headDim, const int32_t *positions, double theta);
/** k, v: the KV cache, f32 or (kvF16) f16 bits; kvF16 also rounds q and the probabilities to f16 as llama.cpp does. */
void moe_attention(float *out, const float *q, int rows, int start, const void *k, const void *v, int nHeads,
                   int nKvHeads, int headDim, float scale, int window, int kvF16);
/** Returns 0, -1 for an unsupported type, -2 for an expert id out of range (nothing written then). */
int moe_moe_ffn(float *out, const float *x, int rows, const int32_t *experts, const float *weights, int k,
                const void *gate, int gate_type, const void *up, int up_type, const void *down, int down_type,
                int nExperts, int ffn, int dim);
// ---- Training helpers (f32) ----
/** out[rows, outDim] += x . W^T for f32 W (moe_matmul, then added); 0, or -1 as moe_matmul. */
int moe_matmul_acc(float *out, const float *x, int rows, const float *w, int outDim, int inDim);
/** dst[cols, rows] = src[rows, cols]^T. */
void moe_transpose_f32(float *dst, const float *src, int rows, int cols);
/** For each row of x[rows, n]: lse[r] = log sum exp(x[r]); probs[r] = exp(x[r] - lse[r]) when probs is not NULL. */
void moe_softmax_rows(const float *x, int rows, int n, double *lse, float *probs);

/** Cross-entropy backward: dz[r] += c probs[r]; dz[r, targets[r]] -= c; rows with targets[r] < 0 skipped. */
void moe_cross_entropy_backward(float *dz, const float *probs, const int32_t *targets, int rows, int n, double c);
/** One AdamW update of n f32 parameters (optimizer.ts AdamW.step, bit-identical). */
void moe_adamw_f32(float *p, const float *g, float *m, float *v, long long n, double b1, double b2, double step,
                   double bc2s, double eps, double decay);
/** Training attention (causal GQA, window 0 = none) over B sequences of T rows; probs [B, H, T, T] are written. */
void moe_train_attention(float *out, double *probs, const float *q, const float *k, const float *v, int B, int T, int H,
                         int KV, int hd, int win);
/** Its backward: adds into dq / dk / dv (any of them NULL to skip). */
void moe_train_attention_backward(const float *g, const double *probs, const float *q, const float *k, const float *v,
                                  float *dq, float *dk, float *dv, int B, int T, int H, int KV, int hd, int win);

/** Rows per MoE chunk (0: automatic, ~64 MB buffers). For tests of the chunk boundaries. */
void moe_set_moe_chunk(int rows);
/** Selects the float kernel set ("generic", "avx2", "avx512", "auto"); 0 when this CPU lacks it. For tests. */
int moe_fk_select(const char *name);
