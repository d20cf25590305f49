// The physical limits the benchmark's figures are shares of, measured on this machine in the same run by a small C
// probe compiled on the fly (gcc or cc, -O2 -march=native; cached outside git):
//   bw <threads>:  memory read bandwidth, a streaming read of a 512 MiB buffer (far beyond the caches) split across
//                  threads, best of several passes, bytes / wall time;
//   fma <threads>: FP32 FMA peak, 12 independent chains of vector FMAs per thread (AVX-512, else AVX2+FMA, else
//                  scalar), enough to cover FMA latency x pipes, flops / wall time;
//   rusage <file> <cmd> [args...]: runs a command and writes its peak RSS (wait4's ru_maxrss, KiB) to <file>.
// Without a C compiler the limits fall back to the figures documented for this project's machine (marked so).
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cacheRoot } from './bench-llama.mjs';

const PROBE_C = String.raw`
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <immintrin.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

static pthread_barrier_t barrier;
typedef struct { const char *p; size_t n; long iters; double t0, t1; float sink; } job_t;

static float read_stream(const char *p, size_t n) {
#if defined(__AVX512F__)
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 256 <= n; i += 256) {
    a0 = _mm512_add_epi64(a0, _mm512_load_si512((const void *)(p + i)));
    a1 = _mm512_add_epi64(a1, _mm512_load_si512((const void *)(p + i + 64)));
    a2 = _mm512_add_epi64(a2, _mm512_load_si512((const void *)(p + i + 128)));
    a3 = _mm512_add_epi64(a3, _mm512_load_si512((const void *)(p + i + 192)));
  }
  a0 = _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3));
  return (float)_mm512_reduce_add_epi64(a0);
#elif defined(__AVX2__)
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 128 <= n; i += 128) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i *)(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i *)(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256((const __m256i *)(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256((const __m256i *)(p + i + 96)));
  }
  a0 = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  int64_t o[4]; _mm256_storeu_si256((__m256i *)o, a0);
  return (float)(o[0] + o[1] + o[2] + o[3]);
#else
  const uint64_t *q = (const uint64_t *)p; uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (size_t i = 0; i + 4 <= n / 8; i += 4) { s0 += q[i]; s1 += q[i + 1]; s2 += q[i + 2]; s3 += q[i + 3]; }
  return (float)(s0 + s1 + s2 + s3);
#endif
}

static void *bw_worker(void *arg) {
  job_t *j = arg;
  pthread_barrier_wait(&barrier);
  j->t0 = now();
  j->sink += read_stream(j->p, j->n);
  j->t1 = now();
  pthread_barrier_wait(&barrier);
  return NULL;
}

#if defined(__AVX512F__)
typedef __m512 vf;
#define VSET(x) _mm512_set1_ps(x)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VLANES 16
static float vsum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vf;
#define VSET(x) _mm256_set1_ps(x)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VLANES 8
static float vsum(vf v) { float o[8]; _mm256_storeu_ps(o, v); return o[0] + o[1] + o[2] + o[3] + o[4] + o[5] + o[6] + o[7]; }
#else
typedef float vf;
#define VSET(x) (x)
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VLANES 1
static float vsum(vf v) { return v; }
#endif

static void *fma_worker(void *arg) {
  job_t *j = arg;
  vf a = VSET(0.999999f), b = VSET(1e-7f);
  vf c0 = VSET(1), c1 = VSET(2), c2 = VSET(3), c3 = VSET(4), c4 = VSET(5), c5 = VSET(6);
  vf c6 = VSET(7), c7 = VSET(8), c8 = VSET(9), c9 = VSET(10), c10 = VSET(11), c11 = VSET(12);
  pthread_barrier_wait(&barrier);
  j->t0 = now();
  for (long i = 0; i < j->iters; i++) {
    c0 = VFMA(c0, a, b); c1 = VFMA(c1, a, b); c2 = VFMA(c2, a, b); c3 = VFMA(c3, a, b);
    c4 = VFMA(c4, a, b); c5 = VFMA(c5, a, b); c6 = VFMA(c6, a, b); c7 = VFMA(c7, a, b);
    c8 = VFMA(c8, a, b); c9 = VFMA(c9, a, b); c10 = VFMA(c10, a, b); c11 = VFMA(c11, a, b);
  }
  j->t1 = now();
  j->sink = vsum(c0) + vsum(c1) + vsum(c2) + vsum(c3) + vsum(c4) + vsum(c5) + vsum(c6) + vsum(c7) + vsum(c8) + vsum(c9) + vsum(c10) + vsum(c11);
  pthread_barrier_wait(&barrier);
  return NULL;
}

/* Runs nt workers once; returns the wall time from the first start to the last finish. */
static double run_threads(int nt, job_t *jobs, void *(*fn)(void *)) {
  pthread_t th[256];
  pthread_barrier_init(&barrier, NULL, nt);
  for (int t = 1; t < nt; t++) pthread_create(&th[t], NULL, fn, &jobs[t]);
  fn(&jobs[0]);
  for (int t = 1; t < nt; t++) pthread_join(th[t], NULL);
  pthread_barrier_destroy(&barrier);
  double t0 = jobs[0].t0, t1 = jobs[0].t1;
  for (int t = 1; t < nt; t++) { if (jobs[t].t0 < t0) t0 = jobs[t].t0; if (jobs[t].t1 > t1) t1 = jobs[t].t1; }
  return t1 - t0;
}

int main(int argc, char **argv) {
  if (argc >= 4 && !strcmp(argv[1], "rusage")) {
    pid_t pid = fork();
    if (pid == 0) { execvp(argv[3], argv + 3); perror(argv[3]); _exit(127); }
    int status = 0; struct rusage ru;
    if (wait4(pid, &status, 0, &ru) < 0) { perror("wait4"); return 1; }
    FILE *f = fopen(argv[2], "w");
    if (f) { fprintf(f, "%ld\n", ru.ru_maxrss); fclose(f); }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  if (argc < 3) { fprintf(stderr, "usage: probe bw|fma <threads> | probe rusage <file> <cmd...>\n"); return 2; }
  int nt = atoi(argv[2]);
  if (nt < 1 || nt > 256) nt = 1;
  job_t jobs[256];
  memset(jobs, 0, sizeof jobs);
  double best = 1e30;
  if (!strcmp(argv[1], "bw")) {
    size_t total = (size_t)512 << 20;
    char *buf = aligned_alloc(4096, total);
    if (!buf) { perror("alloc"); return 1; }
    memset(buf, 1, total);
    size_t per = (total / nt) & ~(size_t)4095;
    for (int pass = 0; pass < 8; pass++) {
      for (int t = 0; t < nt; t++) { jobs[t].p = buf + t * per; jobs[t].n = per; }
      double s = run_threads(nt, jobs, bw_worker);
      if (s < best) best = s;
    }
    printf("{\"threads\":%d,\"bytes\":%zu,\"seconds\":%g,\"gbPerSecond\":%g,\"sink\":%g}\n", nt, per * nt, best, per * (double)nt / best / 1e9, (double)jobs[0].sink);
  } else if (!strcmp(argv[1], "fma")) {
    long iters = 40L * 1000 * 1000;
    for (int pass = 0; pass < 5; pass++) {
      for (int t = 0; t < nt; t++) jobs[t].iters = iters;
      double s = run_threads(nt, jobs, fma_worker);
      if (s < best) best = s;
    }
    double flops = (double)iters * 12 * VLANES * 2 * nt;
    printf("{\"threads\":%d,\"lanes\":%d,\"flops\":%g,\"seconds\":%g,\"gflops\":%g,\"sink\":%g}\n", nt, VLANES, flops, best, flops / best / 1e9, (double)jobs[0].sink);
  } else { fprintf(stderr, "unknown probe %s\n", argv[1]); return 2; }
  return 0;
}
`;

/** Documented figures for this project's machine (2 Zen 5 cores), used only when the probe cannot be compiled. */
const DOCUMENTED = { fmaGflopsPerCore: 235, bwGBs: { 1: 31, 2: 58 } };

let probePath;

/** Compiles the probe once (cached by source hash); returns its path, or null without a working C compiler. */
export function probeBinary() {
  if (probePath !== undefined) return probePath;
  const hash = createHash('sha256').update(PROBE_C).digest('hex').slice(0, 12);
  const dir = join(cacheRoot(), `probe-${hash}`);
  const bin = join(dir, 'probe');
  if (existsSync(bin)) return (probePath = bin);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'probe.c'), PROBE_C);
  for (const cc of [process.env.CC, 'gcc', 'cc', 'clang'].filter(Boolean)) {
    const r = spawnSync(cc, ['-O2', '-march=native', '-pthread', '-o', bin, join(dir, 'probe.c')], { encoding: 'utf8' });
    if (r.status === 0 && existsSync(bin)) return (probePath = bin);
  }
  return (probePath = null);
}

function runProbe(kind, threads) {
  const bin = probeBinary();
  if (!bin) return null;
  const r = spawnSync(bin, [kind, String(threads)], { encoding: 'utf8' });
  if (r.status !== 0) return null;
  try {
    return JSON.parse(r.stdout.trim());
  } catch {
    return null;
  }
}

/**
 * Measures read bandwidth and FMA peak with 1 and `threads` threads. Each figure says whether it was measured or
 * taken from the documentation.
 */
export function measureLimits(threads) {
  const counts = [...new Set([1, threads])];
  const bw = {};
  const fma = {};
  for (const t of counts) {
    const b = runProbe('bw', t);
    bw[t] = b ? { gbPerSecond: b.gbPerSecond, source: 'measured' } : { gbPerSecond: DOCUMENTED.bwGBs[t] ?? DOCUMENTED.bwGBs[2], source: 'documented' };
    const f = runProbe('fma', t);
    fma[t] = f ? { gflops: f.gflops, lanes: f.lanes, source: 'measured' } : { gflops: DOCUMENTED.fmaGflopsPerCore * t, lanes: null, source: 'documented (235 GFLOP/s per core)' };
  }
  return { bw, fma };
}

/** Runs `cmd args` with the probe as a wait4 wrapper; returns { rssKiB } (null when unmeasurable) after it exits. */
export function rusageWrapper(rssFile, cmd, args) {
  const bin = probeBinary();
  if (bin) return { cmd: bin, args: ['rusage', rssFile, cmd, ...args] };
  if (existsSync('/usr/bin/time')) return { cmd: '/usr/bin/time', args: ['-f', '%M', '-o', rssFile, cmd, ...args] };
  return { cmd, args };
}
