// Persistent worker pool. Dispatch cost matters (DESIGN.md: ~29 us per job with plain waits, ~2 us spin-then-wait),
// so workers spin on a generation counter for a short while after each job and only then sleep on a condition
// variable. The calling thread is thread 0 and does work too.
//
// Oversubscription (more runnable threads than cores, e.g. parallel test runs) must not stall a job behind a
// worker that the OS has not scheduled yet: every slot ith is *claimed* with a compare-and-swap, and after finishing
// its own slot the caller claims and runs every slot no worker has claimed. The caller then waits only for slots
// that workers have actually started. Each slot still runs exactly once, so fn(ctx, ith, nth) sees every ith.
#include "kernels.h"
#include "ops.h"
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <sched.h>

#define MAX_THREADS 256
#define SPIN_NS 200000 // how long an idle worker spins before sleeping (covers the gaps between a model's ops)

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ volatile("yield");
#endif
}

static long long now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

typedef struct {
  _Alignas(64) atomic_ullong state; // 2*gen: free in job gen; 2*gen+1: claimed
} slot_t;

static struct {
  pthread_mutex_t mu;        // guards sleeping and the worker set
  pthread_cond_t wake;       // workers sleep here
  pthread_mutex_t run_mu;    // one job at a time (the addon may be called from several JS threads)
  int spawned;               // worker threads created (ids 1..spawned)
  _Alignas(64) atomic_int nth;        // threads in use, caller included
  _Alignas(64) atomic_ullong gen;     // job generation, bumped to publish a job
  _Alignas(64) atomic_int sleepers;   // workers asleep or about to sleep
  _Alignas(64) atomic_int done;       // slots finished in the current job
  moe_task_fn fn;
  void *ctx;
  int job_nth;
  slot_t slot[MAX_THREADS];
  pthread_t th[MAX_THREADS];
} P = {.mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER, .run_mu = PTHREAD_MUTEX_INITIALIZER};

// ---- Reading ahead. Between jobs the caller works alone (norms, rope, routing, JavaScript) while the workers spin
// and the memory bus idles; the forward pass knows which weights the next job streams, so it posts them here and a
// spinning worker reads them into cache meanwhile, a chunk at a time, stopping as soon as a job arrives. Plain loads:
// prefetch instructions issued as fast did not help (decode A/B, bench model), loads did.
//
// Memory lifetime: a worker may still be reading a posted range when the caller moves on, so whoever frees memory
// that may have been posted (the addon's weight copies, file mappings) first calls moe_pool_prefetch_cancel(), which
// returns once no worker is inside a posted range.
#define PF_MAX 8
#define PF_CHUNK 4096
#define PF_LIMIT (2u << 20) // bytes read per posting at most: a gap between jobs covers far less, and a posting
                            // that no job follows (the last of a forward pass) is not read to its end
typedef struct {
  _Atomic(const char *) p[PF_MAX];
  atomic_size_t n[PF_MAX];
  atomic_int count;
} pf_set;
static struct {
  pf_set set[2];                      // the ranges of posting gen live in set[gen & 1]
  _Alignas(64) atomic_ullong gen;     // bumped by each posting (0: none yet)
  _Alignas(64) atomic_size_t cursor;  // bytes of the current posting claimed so far
  _Alignas(64) atomic_int readers;    // workers between announcing a read and finishing it
  pthread_mutex_t post_mu;            // postings and cancels from several JS threads
} PF = {.post_mu = PTHREAD_MUTEX_INITIALIZER};

static void post(const void *const *ptrs, const size_t *bytes, int count) {
  const unsigned long long g = atomic_load(&PF.gen) + 1;
  pf_set *s = &PF.set[g & 1];
  // set[g & 1] last served posting g - 2, which no worker still reads: a reader re-checks the generation after
  // announcing itself, and a posting is published only after the one before it (see prefetch_chunk).
  while (atomic_load(&PF.readers) > 0) cpu_relax();
  for (int i = 0; i < count; i++) {
    atomic_store_explicit(&s->p[i], (const char *)ptrs[i], memory_order_relaxed);
    atomic_store_explicit(&s->n[i], bytes[i], memory_order_relaxed);
  }
  atomic_store_explicit(&s->count, count, memory_order_relaxed);
  atomic_store(&PF.cursor, 0);
  atomic_store(&PF.gen, g);
}

void moe_pool_prefetch(const void *const *ptrs, const size_t *bytes, int count) {
  if (atomic_load(&P.nth) < 2 || count <= 0) return;
  if (count > PF_MAX) count = PF_MAX;
  pthread_mutex_lock(&PF.post_mu);
  post(ptrs, bytes, count);
  pthread_mutex_unlock(&PF.post_mu);
}

void moe_pool_prefetch_cancel(void) {
  pthread_mutex_lock(&PF.post_mu);
  post(NULL, NULL, 0); // an empty posting; returns once no worker reads an older one
  while (atomic_load(&PF.readers) > 0) cpu_relax();
  pthread_mutex_unlock(&PF.post_mu);
}

/** Reads one chunk of the current posting; 0 when there is nothing (left) to read. */
static int prefetch_chunk(unsigned long long *done_gen) {
  const unsigned long long g = atomic_load(&PF.gen);
  if (g == *done_gen) return 0;
  atomic_fetch_add(&PF.readers, 1);
  if (atomic_load(&PF.gen) != g) { // superseded (or cancelled) meanwhile: its memory may be gone
    atomic_fetch_sub(&PF.readers, 1);
    return 1;
  }
  const pf_set *s = &PF.set[g & 1];
  size_t off = atomic_fetch_add_explicit(&PF.cursor, PF_CHUNK, memory_order_relaxed);
  const int count = off < PF_LIMIT ? atomic_load_explicit(&s->count, memory_order_relaxed) : 0;
  const char *p = NULL;
  size_t len = 0;
  for (int i = 0; i < count && i < PF_MAX; i++) {
    const size_t n = atomic_load_explicit(&s->n[i], memory_order_relaxed);
    if (off < n) {
      p = atomic_load_explicit(&s->p[i], memory_order_relaxed) + off;
      len = n - off < PF_CHUNK ? n - off : PF_CHUNK;
      break;
    }
    off -= n;
  }
  if (!p) *done_gen = g;
  unsigned sink = 0;
  for (size_t i = 0; i < len; i += 64) sink += *(const volatile unsigned char *)(p + i);
  (void)sink;
  atomic_fetch_sub(&PF.readers, 1);
  return p != NULL;
}

static void run_slot(unsigned long long g, int i) {
  unsigned long long want = 2 * g;
  if (atomic_compare_exchange_strong(&P.slot[i].state, &want, 2 * g + 1)) {
    P.fn(P.ctx, i, P.job_nth);
    atomic_fetch_add(&P.done, 1);
  }
}

static void *worker(void *arg) {
  int id = (int)(size_t)arg;
  unsigned long long seen = atomic_load(&P.gen), pf_done = 0;
  for (;;) {
    // Spin for new work (reading ahead what the caller posted meanwhile), then sleep.
    unsigned long long g;
    long long t0 = 0;
    int spins = 0;
    for (;;) {
      g = atomic_load_explicit(&P.gen, memory_order_acquire);
      if (g != seen && id < atomic_load(&P.nth)) break;
      if (g != seen) seen = g; // a job this worker is not part of
      if (id < atomic_load_explicit(&P.nth, memory_order_relaxed) && prefetch_chunk(&pf_done)) {
        t0 = 0;
        continue;
      }
      cpu_relax();
      if (++spins < 64) continue;
      spins = 0;
      if (t0 == 0) t0 = now_ns();
      else if (now_ns() - t0 > SPIN_NS) {
        pthread_mutex_lock(&P.mu);
        atomic_fetch_add(&P.sleepers, 1);
        while (atomic_load(&P.gen) == seen || id >= atomic_load(&P.nth)) {
          if (atomic_load(&P.gen) != seen) seen = atomic_load(&P.gen);
          pthread_cond_wait(&P.wake, &P.mu);
        }
        atomic_fetch_sub(&P.sleepers, 1);
        pthread_mutex_unlock(&P.mu);
        t0 = 0;
      }
    }
    seen = g;
    if (id < P.job_nth) run_slot(g, id);
  }
  return NULL;
}

int moe_pool_threads(void) { return atomic_load(&P.nth) < 1 ? 1 : atomic_load(&P.nth); }

void moe_pool_set_threads(int n) {
  if (n < 1) n = 1;
  if (n > MAX_THREADS) n = MAX_THREADS;
  pthread_mutex_lock(&P.run_mu); // not while a job runs
  pthread_mutex_lock(&P.mu);
  while (P.spawned < n - 1) {
    int id = P.spawned + 1;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&P.th[id], &attr, worker, (void *)(size_t)id);
    pthread_attr_destroy(&attr);
    if (rc != 0) break; // run with fewer threads rather than fail
    P.spawned = id;
  }
  if (n > P.spawned + 1) n = P.spawned + 1;
  atomic_store(&P.nth, n);
  pthread_cond_broadcast(&P.wake); // workers above n go back to sleep; those below wake to spin
  pthread_mutex_unlock(&P.mu);
  pthread_mutex_unlock(&P.run_mu);
}

static void run_n(moe_task_fn fn, void *ctx, int nth) {
  if (nth <= 1) {
    fn(ctx, 0, 1);
    return;
  }
  if (pthread_mutex_trylock(&P.run_mu) != 0) {
    // Another JS thread is using the pool: run every slot here rather than wait for it.
    for (int i = 0; i < nth; i++) fn(ctx, i, nth);
    return;
  }
  unsigned long long g = atomic_load(&P.gen) + 1;
  P.fn = fn;
  P.ctx = ctx;
  P.job_nth = nth;
  atomic_store(&P.done, 0);
  for (int i = 0; i < nth; i++) atomic_store(&P.slot[i].state, 2 * g);
  atomic_store(&P.gen, g); // publish (seq_cst: pairs with the sleepers check below)
  if (atomic_load(&P.sleepers) > 0) {
    pthread_mutex_lock(&P.mu);
    pthread_cond_broadcast(&P.wake);
    pthread_mutex_unlock(&P.mu);
  }
  run_slot(g, 0);
  for (int i = 1; i < nth; i++) run_slot(g, i); // slots no worker has started yet
  long long t0 = 0;
  int spins = 0;
  while (atomic_load_explicit(&P.done, memory_order_acquire) < nth) {
    cpu_relax();
    if (++spins < 256) continue;
    spins = 0;
    if (t0 == 0) t0 = now_ns();
    else if (now_ns() - t0 > 50000) sched_yield(); // a preempted worker: give it the core
  }
  pthread_mutex_unlock(&P.run_mu);
}

void moe_pool_run(moe_task_fn fn, void *ctx) { run_n(fn, ctx, moe_pool_threads()); }
