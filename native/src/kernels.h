// moe-ts native kernels: the C interface shared by the N-API glue (addon.c), the thread pool, and the kernel files.
// Types use GGML's numbering (src/tensor/dtype.ts). Matrices are row-major; a weight matrix [out, in] has `out`
// rows of `in` elements; quantized blocks run along a row. Every kernel computes exactly what src/backend/ref.ts
// computes, up to float summation order.
#pragma once
#include <stddef.h>
#include <stdint.h>

enum moe_type {
  MOE_F32 = 0, MOE_F16 = 1, MOE_Q4_0 = 2, MOE_Q4_1 = 3, MOE_Q5_0 = 6, MOE_Q5_1 = 7, MOE_Q8_0 = 8, MOE_Q8_1 = 9,
  MOE_Q2_K = 10, MOE_Q3_K = 11, MOE_Q4_K = 12, MOE_Q5_K = 13, MOE_Q6_K = 14, MOE_Q8_K = 15, MOE_BF16 = 30,
  // Not a GGML type: q4_0 rows repacked at load for the AVX-512 kernels (moe_repack_rows), same size as q4_0.
  MOE_Q4_0_RP = 200,
};

// CPU features found at start-up (run-time dispatch; the build is never -march=native).
typedef struct {
  int avx2, fma, f16c, avx512f, avx512bw, avx512vl, avx512vnni, avx512bf16, avxvnni, neon, dotprod;
} moe_cpu_features;
const moe_cpu_features *moe_cpu(void);
/** The best code path in use, for messages: "avx512-vnni", "avx2", "neon", "generic". */
const char *moe_cpu_path(void);

// ---- Thread pool (persistent workers; spin briefly, then sleep) ----
typedef void (*moe_task_fn)(void *ctx, int ith, int nth);
void moe_pool_set_threads(int n); // n >= 1; 1 runs on the caller
int moe_pool_threads(void);
/** Runs fn(ctx, ith, nth) for ith = 0..nth-1 on the pool (the caller is thread 0) and waits for all. */
void moe_pool_run(moe_task_fn fn, void *ctx);
/**
 * Hints that the next job reads these byte ranges: idle workers read them into cache until a job arrives (returns
 * at once; a later call replaces the ranges). Changes speed only, never results.
 */
void moe_pool_prefetch(const void *const *ptrs, const size_t *bytes, int count);
/** Drops the posted ranges and returns once no worker reads them: call before freeing memory that may be posted. */
void moe_pool_prefetch_cancel(void);

// ---- Activation conversion (llama.cpp's vec_dot_type) ----
/** The type an activation row is converted to before dot products with weights of `wtype`. */
int moe_vec_dot_type(int wtype);
/**
 * Bytes of one converted activation row of n elements for weights of `wtype`: ggml's bytes for that type first, then
 * (AVX-512 CPUs, q8_0/q8_1/q8_K) a kernel-specific layout from the next 64-byte boundary; callers treat the row as a blob of this size.
 */
size_t moe_act_row_bytes(int wtype, int n);
/** Converts n floats to wtype's vec_dot_type (q8_0 with x86 rounding, q8_K, f16, bf16, or f32 copy). */
void moe_quantize_act_row(int wtype, const float *x, void *out, int n);

// ---- Matrix products on weights in their file type ----
/**
 * out[r * ldo + j] = dot(weight row j, activation row r) for r in [0, R), j in [j0, j1).
 * w: the weight matrix (row stride w_row_bytes); act: R converted activation rows (stride act_row_bytes).
 * Single-threaded: the caller splits [0, outDim) across the pool. n = the row length (in).
 */
void moe_gemm_tile(int wtype, int n, const void *w, size_t w_row_bytes, const void *act, size_t act_row_bytes, int R,
                   int j0, int j1, float *out, int ldo);
/** Whether moe_gemm_tile supports wtype. */
int moe_gemm_supports(int wtype);

// ---- Weights in the engine's own memory (llama.cpp repacks q4_0 at load too; ggml-cpu/repack.cpp) ----
/**
 * The type rows of `wtype` and length n become in the engine's own copy: MOE_Q4_0_RP for q4_0 on AVX-512 when n
 * is a multiple of 512, wtype itself (the same bytes) for every other type the kernels run, -1 for other types.
 */
int moe_repack_type(int wtype, int n);
/** dst = `rows` rows of src (type wtype, length n) as moe_repack_type says; multi-threaded. Same byte size. */
void moe_repack_rows(int wtype, const void *src, void *dst, long long rows, int n);
