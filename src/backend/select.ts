// Choosing the compute backend: the native one when its addon loads, else the pure TypeScript reference backend
// (with one notice on stderr per process, so a missing build is visible but not noisy).

import type { Backend } from './backend.js';
import { RefBackend } from './ref.js';
import { NativeBackend, nativeBackendError } from './native.js';

export type BackendName = 'auto' | 'native' | 'ref';

export interface SelectBackendOptions {
  /**
   * 'native' (fail if the addon is not built), 'ref', or 'auto' (native when available, else ref). Default: the
   * MOE_BACKEND environment variable, else 'auto'.
   */
  backend?: BackendName;
  /** Kernel threads for the native backend (0 or absent: one per available core). */
  threads?: number;
}

let noticeShown = false;

export function isBackendName(s: string): s is BackendName {
  return s === 'auto' || s === 'native' || s === 'ref';
}

export function selectBackend(opts: SelectBackendOptions = {}): Backend {
  const env = process.env.MOE_BACKEND;
  let name: BackendName = opts.backend ?? 'auto';
  if (opts.backend === undefined && env) {
    if (!isBackendName(env)) throw new Error(`MOE_BACKEND must be auto, native or ref, got '${env}'`);
    name = env;
  }
  if (name === 'ref') return new RefBackend();
  const err = nativeBackendError();
  if (err === null) return new NativeBackend({ threads: opts.threads });
  if (name === 'native') throw new Error(`native backend requested but unavailable: ${err}`);
  if (!noticeShown) {
    noticeShown = true;
    process.stderr.write(`moe-ts: using the slow ref backend (TypeScript): ${err}\n`);
  }
  return new RefBackend();
}
