// The one place that loads the native addon (native/, built by node-gyp at `npm install`). The native backend
// (src/backend/native.ts) and the memory-mapping file loaders (src/formats/mapped-file.ts) both import it from here,
// so the .node file is required once and a failure is explained once.
//
// Environment: MOE_NATIVE=0 disables the addon (everything runs on the `ref` backend and files are read, not
// mapped); MOE_NATIVE_ADDON=/path/to/moe_native.node loads that file instead of the build output.

import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

/** What the addon exports. Each part of the addon documents its own functions; others may be present. */
export interface NativeAddon {
  /**
   * native/src/mmap.c: maps bytes [offset, offset + length) of a file (path, or an open descriptor that stays open)
   * copy-on-write; the mapping is released when the ArrayBuffer is garbage-collected. One ArrayBuffer can be at most
   * buffer.constants.MAX_LENGTH bytes (4 GiB on Node 20). Throws an Error with `code` ('ENOENT', 'EACCES', ...).
   */
  readonly mmap: (file: string | number, offset?: number, length?: number, willNeed?: boolean) => ArrayBuffer;
  readonly [name: string]: unknown;
}

/** Build outputs tried in order (node-gyp's target in native/binding.gyp is `moe_native`). */
const CANDIDATES = ['../../../native/build/Release/moe_native.node', '../../../native/build/Debug/moe_native.node'];

let loaded: NativeAddon | null | undefined;
let loadError: string | null = null;

function load(): NativeAddon | null {
  if (process.env.MOE_NATIVE === '0') {
    loadError = 'disabled by MOE_NATIVE=0';
    return null;
  }
  const require = createRequire(import.meta.url);
  const override = process.env.MOE_NATIVE_ADDON;
  const paths = override ? [override] : CANDIDATES.map((c) => fileURLToPath(new URL(c, import.meta.url)));
  const errors: string[] = [];
  for (const p of paths) {
    try {
      const addon = require(p) as NativeAddon;
      if (typeof addon !== 'object' || addon === null) throw new Error('did not export an object');
      return addon;
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      errors.push(err.code === 'MODULE_NOT_FOUND' ? `${p}: not built` : `${p}: ${err.message}`);
    }
  }
  loadError = `native addon not loaded (${errors.join('; ')}); build it with \`npx node-gyp rebuild --directory=native\``;
  return null;
}

/** The native addon, or null when it is not built, fails to load, or is disabled (see nativeAddonError()). */
export function nativeAddon(): NativeAddon | null {
  if (loaded === undefined) loaded = load();
  return loaded;
}

/** Why nativeAddon() is null (null when it loaded). */
export function nativeAddonError(): string | null {
  nativeAddon();
  return loadError;
}
