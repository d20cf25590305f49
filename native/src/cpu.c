// CPU feature detection for run-time kernel dispatch. The build never uses -march=native: every ISA-specific
// kernel lives in a translation unit compiled for that ISA and is called only when the CPU (and the OS, for the
// wide register state) supports it.
#include "kernels.h"
#include <stdatomic.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define MOE_X86 1
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

static moe_cpu_features g_feat;
static atomic_int g_done;

#ifdef MOE_X86
static unsigned long long xgetbv0(void) {
  unsigned int lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((unsigned long long)hi << 32) | lo;
}
#endif

static void detect(moe_cpu_features *f) {
  memset(f, 0, sizeof *f);
#ifdef MOE_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return;
  int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
  int fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
  if (!osxsave || !avx) return;
  unsigned long long xcr0 = xgetbv0();
  int ymm_ok = (xcr0 & 0x6) == 0x6;            // SSE and AVX state saved by the OS
  int zmm_ok = ymm_ok && (xcr0 & 0xe0) == 0xe0; // opmask, upper ZMM0-15, ZMM16-31
  if (!ymm_ok) return;
  f->fma = fma;
  f->f16c = f16c;
  unsigned maxleaf = __get_cpuid_max(0, 0);
  if (maxleaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    f->avx2 = (b >> 5) & 1;
    if (zmm_ok) {
      f->avx512f = (b >> 16) & 1;
      f->avx512bw = (b >> 30) & 1;
      f->avx512vl = (b >> 31) & 1;
      f->avx512vnni = (c >> 11) & 1;
    }
    __cpuid_count(7, 1, a, b, c, d);
    f->avxvnni = (a >> 4) & 1;
    if (zmm_ok) f->avx512bf16 = (a >> 5) & 1;
  }
#elif defined(__aarch64__)
  f->neon = 1; // Advanced SIMD is part of the AArch64 base ISA
#if defined(__linux__)
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
  f->dotprod = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__ARM_FEATURE_DOTPROD)
  f->dotprod = 1;
#endif
#endif
}

const moe_cpu_features *moe_cpu(void) {
  // Detected into a local copy and published whole: clearing g_feat in place while another thread already read
  // g_done = 1 made that thread see no features and pick the generic kernels (the addon's init now detects on the
  // main thread before any worker exists; this keeps a late first call from several threads safe too).
  if (!atomic_load_explicit(&g_done, memory_order_acquire)) {
    moe_cpu_features f;
    detect(&f);
    g_feat = f; // every thread that gets here writes the same values
    atomic_store_explicit(&g_done, 1, memory_order_release);
  }
  return &g_feat;
}

int moe_cpu_has_avx512(void) {
  const moe_cpu_features *f = moe_cpu();
  return f->avx512f && f->avx512bw && f->avx512vl && f->fma && f->f16c;
}

int moe_cpu_has_avx2(void) {
  const moe_cpu_features *f = moe_cpu();
  return f->avx2 && f->fma && f->f16c;
}

const char *moe_cpu_path(void) {
  const moe_cpu_features *f = moe_cpu();
  if (moe_cpu_has_avx512()) return f->avx512vnni ? "avx512-vnni" : "avx512";
  if (moe_cpu_has_avx2()) return "avx2";
  if (f->neon) return "neon";
  return "generic";
}
