{
  # The moe-ts native backend: one N-API addon (C only). Built by scripts/build-native.mjs at `npm install`; when that
  # fails (no compiler, no Node headers) moe-ts runs on the pure TypeScript `ref` backend instead.
  # No -march=native: the x86 kernel files enable AVX2 / AVX-512 for themselves (#pragma GCC target) and the code
  # picks them at run time from CPUID (cpu.c), so one build runs on any CPU of the architecture.
  "targets": [
    {
      "target_name": "moe_native",
      "sources": [
        "src/addon.c",
        "src/cpu.c",
        "src/pool.c",
        "src/ops.c",
        "src/ops_avx2.c",
        "src/ops_avx512.c",
        "src/quant.c",
        "src/quant_avx2.c",
        "src/quant_avx512.c",
        "src/mmap.c"
      ],
      "defines": ["NAPI_VERSION=8"],
      # Not -ffast-math: NaN / Inf checks and exact rounding steps must survive. -ffp-contract=off keeps a * b + c
      # as two rounded operations wherever the source writes it so (rope, rmsnorm, the MoE sum follow ref.ts);
      # the kernels use FMA explicitly where they want it.
      "cflags": ["-std=gnu11", "-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
                 "-fomit-frame-pointer", "-pthread", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "cflags!": ["-fno-omit-frame-pointer"],
      "ldflags": ["-pthread"],
      "libraries": ["-lm"],
      "xcode_settings": {
        "GCC_OPTIMIZATION_LEVEL": "3",
        "OTHER_CFLAGS": ["-std=gnu11", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
      }
    }
  ]
}
