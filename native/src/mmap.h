// Memory-mapped files for the GGUF / safetensors loaders (src/backend/native-addon.ts, src/formats/mapped-file.ts).
#pragma once
#include <node_api.h>

/**
 * JS: mmap(file: string | number, offset?: number, length?: number, willNeed?: boolean): ArrayBuffer
 *
 * Maps bytes [offset, offset + length) of a file (a path, or an open file descriptor, which stays open) copy-on-write
 * and returns them as an external ArrayBuffer; the mapping is released when the ArrayBuffer is garbage-collected.
 * offset defaults to 0 and length to the rest of the file; any offset works (the mapping starts at the page below).
 * willNeed = true asks the kernel to start reading the range in (madvise MADV_WILLNEED). An empty range gives an
 * empty ArrayBuffer. Throws an Error naming the file and the system's reason (err.code = 'ENOENT', 'EACCES',
 * 'EISDIR', 'ERANGE', ...) when it cannot map.
 *
 * Ranges: Node 20 backs an external ArrayBuffer with a Buffer, so one mapping can be at most
 * buffer.constants.MAX_LENGTH (4 GiB) long there; larger files are mapped as several ranges (the loaders do this).
 */
napi_value moe_napi_mmap(napi_env env, napi_callback_info info);

/**
 * Memory the addon hands to JavaScript and frees itself when collected: the file mappings above, and the weight
 * copies of addon.c's repack. A region is registered while it lives; moe_region_remove (before freeing it) also
 * stops the pool's reading ahead (kernels.h moe_pool_prefetch_cancel), so only registered memory may be posted there.
 */
typedef struct moe_region {
  void *base;
  size_t len;
  int file; // a file mapping (moe_mmap_contains / moe_mmap_release see only these)
  struct moe_region *next;
} moe_region;
void moe_region_add(moe_region *r);
void moe_region_remove(moe_region *r);
/** Whether [p, p + len) lies inside one registered region. */
int moe_region_contains(const void *p, size_t len);

/** Whether [p, p + len) lies inside one live mapping made by moe_napi_mmap (bytes of a model file). */
int moe_mmap_contains(const void *p, size_t len);

/**
 * Drops this process's page-table entries for the whole pages inside [p, p + len) when the range lies in one of the
 * file mappings above (madvise MADV_DONTNEED: the pages stay in the page cache and a later read faults them back in
 * from the file, so nothing changes but the resident size). Used once weights have been repacked into a copy, so the
 * file's pages and the copy are not both resident. Returns 1 when it released something, 0 otherwise (anything not
 * a file mapping of ours is never touched).
 */
int moe_mmap_release(const void *p, size_t len);
