// mmap(file, offset?, length?, willNeed?) -> ArrayBuffer: zero-copy model loading (see mmap.h).
//
// Why copy-on-write (PROT_READ | PROT_WRITE, MAP_PRIVATE) rather than read-only: V8 does not know the memory is
// read-only, so a stray write through a JS view of a PROT_READ mapping would kill the process with SIGSEGV instead of
// raising an error. A private writable mapping costs nothing until a page is written (then only that page is copied;
// the file never changes). Under strict overcommit accounting (vm.overcommit_memory = 2) a large writable private
// mapping can be refused with ENOMEM; then we map read-only, as llama.cpp does.
// As with any mapping (llama.cpp's too), a file truncated by another process while mapped raises SIGBUS on access.

// madvise, MAP_* and O_CLOEXEC are outside strict ISO C (-std=c11): ask the C library for them before any header.
#if !defined(_WIN32) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE
#endif
#include "mmap.h"
#include "kernels.h" // moe_pool_prefetch_cancel

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef _WIN32
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

static const char *errno_code(int e) {
  switch (e) {
    case ENOENT: return "ENOENT";
    case EACCES: return "EACCES";
    case EPERM: return "EPERM";
    case EISDIR: return "EISDIR";
    case ENOMEM: return "ENOMEM";
    case EINVAL: return "EINVAL";
    case ENODEV: return "ENODEV";
    case EBADF: return "EBADF";
    case EFBIG: return "EFBIG";
    case ERANGE: return "ERANGE";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case ENOTDIR: return "ENOTDIR";
    case ELOOP: return "ELOOP";
    case EMFILE: return "EMFILE";
    case ENFILE: return "ENFILE";
    case EOVERFLOW: return "EOVERFLOW";
    case ENOSYS: return "ENOSYS";
    default: return "EIO";
  }
}

/** Throws `Error("mmap <file>: <what>: <reason>")` with err.code set. */
static void throw_errno(napi_env env, const char *file, const char *what, int e) {
  const char *reason = strerror(e);
  size_t n = strlen(file) + strlen(what) + strlen(reason) + 32;
  char *msg = (char *)malloc(n);
  if (msg == NULL) {
    napi_throw_error(env, "ENOMEM", "mmap: out of memory while reporting an error");
    return;
  }
  snprintf(msg, n, "mmap %s: %s: %s", file, what, reason);
  napi_throw_error(env, errno_code(e), msg);
  free(msg);
}

/** Reads an optional non-negative integer argument (undefined -> *present = false). Returns false after throwing. */
static bool get_size_arg(napi_env env, napi_value v, const char *name, uint64_t *out, bool *present) {
  napi_valuetype t;
  *present = false;
  if (napi_typeof(env, v, &t) != napi_ok) return false;
  if (t == napi_undefined) return true;
  double d;
  // 2^53: beyond it a JS number no longer holds every integer, so the caller's offset may already be rounded.
  if (t != napi_number || napi_get_value_double(env, v, &d) != napi_ok || !(d >= 0) || d != floor(d) || d > 9007199254740992.0) {
    char msg[96];
    snprintf(msg, sizeof msg, "mmap(file, offset?, length?, willNeed?): %s must be a non-negative integer", name);
    napi_throw_type_error(env, NULL, msg);
    return false;
  }
  *out = (uint64_t)d;
  *present = true;
  return true;
}

#ifndef _WIN32
#include <pthread.h>

static pthread_mutex_t live_mu = PTHREAD_MUTEX_INITIALIZER; // worker threads may map and collect concurrently
static moe_region *live;

void moe_region_add(moe_region *r) {
  pthread_mutex_lock(&live_mu);
  r->next = live;
  live = r;
  pthread_mutex_unlock(&live_mu);
}

void moe_region_remove(moe_region *r) {
  pthread_mutex_lock(&live_mu);
  for (moe_region **pp = &live; *pp; pp = &(*pp)->next) {
    if (*pp == r) {
      *pp = r->next;
      break;
    }
  }
  pthread_mutex_unlock(&live_mu);
  moe_pool_prefetch_cancel(); // a worker may be reading ahead in it (kernels.h)
}

static void finalize_mapping(napi_env env, void *data, void *hint) {
  (void)env;
  (void)data;
  moe_region *m = (moe_region *)hint;
  moe_region_remove(m);
  munmap(m->base, m->len);
  free(m);
}

/** Whether [p, p + len) lies inside one live region (a file mapping when files_only); the caller holds live_mu. */
static int live_contains(const void *p, size_t len, int files_only) {
  const uintptr_t a = (uintptr_t)p, b = a + len;
  for (moe_region *m = live; m; m = m->next)
    if ((m->file || !files_only) && a >= (uintptr_t)m->base && b <= (uintptr_t)m->base + m->len) return 1;
  return 0;
}

int moe_region_contains(const void *p, size_t len) {
  pthread_mutex_lock(&live_mu);
  const int found = live_contains(p, len, 0);
  pthread_mutex_unlock(&live_mu);
  return found;
}

int moe_mmap_contains(const void *p, size_t len) {
  pthread_mutex_lock(&live_mu);
  const int found = live_contains(p, len, 1);
  pthread_mutex_unlock(&live_mu);
  return found;
}

int moe_mmap_release(const void *p, size_t len) {
  long page = sysconf(_SC_PAGESIZE);
  const uintptr_t ps = (uintptr_t)(page > 0 ? page : 4096);
  const uintptr_t lo = ((uintptr_t)p + ps - 1) / ps * ps, hi = ((uintptr_t)p + len) / ps * ps;
  int done = 0;
  pthread_mutex_lock(&live_mu); // held across the madvise: the mapping cannot be unmapped meanwhile
  if (hi > lo && live_contains(p, len, 1)) done = madvise((void *)lo, hi - lo, MADV_DONTNEED) == 0;
  pthread_mutex_unlock(&live_mu);
  return done;
}

#else
void moe_region_add(moe_region *r) { (void)r; }
void moe_region_remove(moe_region *r) { (void)r; }
int moe_region_contains(const void *p, size_t len) {
  (void)p;
  (void)len;
  return 0;
}
int moe_mmap_contains(const void *p, size_t len) {
  (void)p;
  (void)len;
  return 0;
}
int moe_mmap_release(const void *p, size_t len) {
  (void)p;
  (void)len;
  return 0;
}
#endif

napi_value moe_napi_mmap(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  napi_value undef;
  napi_get_undefined(env, &undef);
  for (size_t i = argc; i < 4; i++) argv[i] = undef;

  // The file: a path, or a descriptor the caller keeps open (so a header and the ranges it names come from one file).
  napi_valuetype t;
  char name[64];
  char *path = NULL;
  int fd = -1;
  bool own_fd = false;
  if (napi_typeof(env, argv[0], &t) != napi_ok) return NULL;
  if (t == napi_string) {
    size_t path_len = 0;
    if (napi_get_value_string_utf8(env, argv[0], NULL, 0, &path_len) != napi_ok) return NULL;
    path = (char *)malloc(path_len + 1);
    if (path == NULL) {
      napi_throw_error(env, "ENOMEM", "mmap: out of memory");
      return NULL;
    }
    napi_get_value_string_utf8(env, argv[0], path, path_len + 1, &path_len);
    if (strlen(path) != path_len) { // an embedded NUL would silently open another file
      napi_throw_type_error(env, NULL, "mmap: path contains a NUL character");
      free(path);
      return NULL;
    }
  } else if (t == napi_number) {
    int32_t v;
    double d;
    napi_get_value_double(env, argv[0], &d);
    napi_get_value_int32(env, argv[0], &v);
    if (d != (double)v || v < 0) {
      napi_throw_type_error(env, NULL, "mmap: a file descriptor must be a non-negative integer");
      return NULL;
    }
    fd = v;
    snprintf(name, sizeof name, "(file descriptor %d)", fd);
  } else {
    napi_throw_type_error(env, NULL, "mmap(file, offset?, length?, willNeed?): file must be a path or a file descriptor");
    return NULL;
  }
  const char *file = path != NULL ? path : name;

  uint64_t offset = 0, length = 0;
  bool has_offset, has_length;
  bool will_need = false;
  if (!get_size_arg(env, argv[1], "offset", &offset, &has_offset) ||
      !get_size_arg(env, argv[2], "length", &length, &has_length)) {
    free(path);
    return NULL;
  }
  if (napi_typeof(env, argv[3], &t) != napi_ok) {
    free(path);
    return NULL;
  }
  if (t != napi_undefined && (t != napi_boolean || napi_get_value_bool(env, argv[3], &will_need) != napi_ok)) {
    napi_throw_type_error(env, NULL, "mmap(file, offset?, length?, willNeed?): willNeed must be a boolean");
    free(path);
    return NULL;
  }

#ifdef _WIN32
  (void)fd;
  (void)own_fd;
  (void)offset;
  (void)length;
  (void)has_offset;
  (void)has_length;
  (void)will_need;
  throw_errno(env, file, "memory mapping is not implemented on Windows", ENOSYS);
  free(path);
  return NULL;
#else
  napi_value result = NULL;
  if (path != NULL) {
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      throw_errno(env, file, "cannot open", errno);
      goto done;
    }
    own_fd = true;
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    throw_errno(env, file, "cannot stat", errno);
    goto done;
  }
  if (S_ISDIR(st.st_mode)) {
    throw_errno(env, file, "cannot map", EISDIR);
    goto done;
  }
  if (!S_ISREG(st.st_mode)) {
    throw_errno(env, file, "not a regular file", ENODEV);
    goto done;
  }
  uint64_t size = (uint64_t)st.st_size;
  if (!has_offset) offset = 0;
  if (offset > size || (has_length && length > size - offset)) {
    char what[160];
    snprintf(what, sizeof what, "bytes [%llu, %llu) are outside the file (%llu bytes)", (unsigned long long)offset,
             (unsigned long long)(offset + (has_length ? length : 0)), (unsigned long long)size);
    throw_errno(env, file, what, ERANGE);
    goto done;
  }
  if (!has_length) length = size - offset;
  if (length == 0) {
    // mmap of length 0 fails (EINVAL): an empty range is an empty buffer.
    void *unused;
    napi_create_arraybuffer(env, 0, &unused, &result);
    goto done;
  }
  // mmap wants a page-aligned file offset: map from the page below and hand out the view from `offset`.
  long page = sysconf(_SC_PAGESIZE);
  uint64_t skip = offset % (uint64_t)(page > 0 ? page : 4096);
  if (length + skip > (uint64_t)SIZE_MAX) {
    throw_errno(env, file, "range too large for this address space", EFBIG);
    goto done;
  }
  size_t map_len = (size_t)(length + skip);
  void *p = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, (off_t)(offset - skip));
  if (p == MAP_FAILED && errno == ENOMEM) p = mmap(NULL, map_len, PROT_READ, MAP_PRIVATE, fd, (off_t)(offset - skip));
  if (p == MAP_FAILED) {
    throw_errno(env, file, "cannot map", errno);
    goto done;
  }
  if (will_need) madvise(p, map_len, MADV_WILLNEED); // advice only: failure changes nothing
  moe_region *m = (moe_region *)malloc(sizeof *m);
  if (m == NULL) {
    munmap(p, map_len);
    napi_throw_error(env, "ENOMEM", "mmap: out of memory");
    goto done;
  }
  *m = (moe_region){p, map_len, 1, NULL};
  moe_region_add(m);
  if (napi_create_external_arraybuffer(env, (char *)p + skip, (size_t)length, finalize_mapping, m, &result) != napi_ok) {
    // The mapping now belongs to Node: on failure it calls the finalizer itself (node::Buffer::New does so when the
    // length exceeds its limit), so freeing it here would free it twice. Node 20 refuses more than 4 GiB in one
    // external ArrayBuffer: say so with the file's name instead of Node's bare "Cannot create a Buffer" message.
    result = NULL;
    napi_value pending;
    napi_get_and_clear_last_exception(env, &pending);
    char msg[200];
    snprintf(msg, sizeof msg, "bytes [%llu, %llu) do not fit one ArrayBuffer in this Node version (map the file in smaller ranges)",
             (unsigned long long)offset, (unsigned long long)(offset + length));
    throw_errno(env, file, msg, EFBIG);
  }
done:
  if (own_fd) close(fd); // the mapping keeps the file open
  free(path);
  return result;
#endif
}
