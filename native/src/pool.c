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

static void run_slot(unsigned long long g, int i) {
  unsigned long long want = 2 * g;
  if (atomic_compare_exchange_strong(&P.slot[i].state, &want, 2 * g + 1)) {
    P.fn(P.ctx, i, P.job_nth);
    atomic_fetch_add(&P.done, 1);
  }
}

static void *worker(void *arg) {
  int id = (int)(size_t)arg;
  unsigned long long seen = atomic_load(&P.gen);
  for (;;) {
    // Spin for new work, then sleep.
    unsigned long long g;
    long long t0 = 0;
    int spins = 0;
    for (;;) {
      g = atomic_load_explicit(&P.gen, memory_order_acquire);
      if (g != seen && id < atomic_load(&P.nth)) break;
      if (g != seen) seen = g; // a job this worker is not part of
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
