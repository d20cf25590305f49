#!/usr/bin/env node
// Builds the native addon (native/binding.gyp) with node-gyp. Run by `npm install` / `npm ci` (the package's
// "install" script) and by `npm run build:native`. It never fails the install: without a compiler or Node's headers
// moe-ts still works on the TypeScript `ref` backend, and this prints one line saying so.
//
// node-gyp is npm's own copy (npm passes its path in npm_config_node_gyp; otherwise it is looked for beside npm).
// Offline, node-gyp needs Node's headers: --nodedir comes from npm's config (npm_config_nodedir) or, failing that,
// the prefix of the running node when <prefix>/include/node/node_api.h exists. MOE_SKIP_NATIVE=1 skips the build.

import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const nativeDir = path.join(root, 'native');
const logFile = path.join(nativeDir, 'build.log');
const FALLBACK = 'moe-ts will use the ref backend (TypeScript, slower)';

function findNodeGyp() {
  const candidates = [
    process.env.npm_config_node_gyp,
    process.env.npm_execpath && path.join(path.dirname(process.env.npm_execpath), '..', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
    path.join(path.dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
    '/usr/lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js',
    '/usr/local/lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js',
  ];
  return candidates.find((p) => p && fs.existsSync(p));
}

function findNodeDir() {
  const fromNpm = process.env.npm_config_nodedir;
  if (fromNpm && fs.existsSync(path.join(fromNpm, 'include', 'node', 'node_api.h'))) return fromNpm;
  const prefix = path.resolve(path.dirname(process.execPath), '..');
  if (fs.existsSync(path.join(prefix, 'include', 'node', 'node_api.h'))) return prefix;
  return fromNpm || null; // let node-gyp use its cache (or download, when online)
}

function main() {
  if (process.env.MOE_SKIP_NATIVE === '1') {
    console.log(`moe-ts: native addon not built (MOE_SKIP_NATIVE=1); ${FALLBACK}`);
    return;
  }
  if (!fs.existsSync(path.join(nativeDir, 'binding.gyp'))) {
    console.log(`moe-ts: native sources missing; ${FALLBACK}`);
    return;
  }
  const gyp = findNodeGyp();
  if (!gyp) {
    console.log(`moe-ts: node-gyp not found; ${FALLBACK}`);
    return;
  }
  const args = [gyp, 'rebuild', `--directory=${nativeDir}`];
  const nodedir = findNodeDir();
  if (nodedir) args.push(`--nodedir=${nodedir}`);
  args.push(`--jobs=${process.env.JOBS || 'max'}`); // one compiler per core
  const r = spawnSync(process.execPath, args, { cwd: root, encoding: 'utf8', timeout: 5 * 60 * 1000, maxBuffer: 64 << 20 });
  const log = `$ node ${args.join(' ')}\n${r.stdout ?? ''}${r.stderr ?? ''}${r.error ? `\n${r.error.message}\n` : ''}`;
  try {
    fs.writeFileSync(logFile, log);
  } catch {
    // a read-only install location: the log is only a convenience
  }
  if (r.status === 0) {
    console.log('moe-ts: native addon built (native/build/Release/moe_native.node)');
    return;
  }
  const out = `${r.stdout ?? ''}\n${r.stderr ?? ''}`;
  const why = r.error?.message ?? // the most telling line: node-gyp's own error, else the compiler's, else any
    [/gyp ERR! stack Error: ([^\n]+)/, /\berror: ([^\n]+)/, /gyp ERR! ([^\n]+)/].map((re) => re.exec(out)?.[1]).find(Boolean) ??
    `node-gyp exited with ${r.status}`;
  console.log(`moe-ts: native addon build failed (${why.trim().slice(0, 160)}; log: ${logFile}); ${FALLBACK}`);
}

try {
  main();
} catch (e) {
  console.log(`moe-ts: native addon build failed (${e instanceof Error ? e.message : e}); ${FALLBACK}`);
}
