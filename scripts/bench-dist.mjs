// Which compiled moe-ts the benchmark runs. The bench's processes import the library from $MOE_BENCH_DIST (a
// directory holding src/), else from the repository's dist/. scripts/bench.mjs snapshots dist/ (and the native
// addon) once at the start and points every child at the snapshot, so that a rebuild during the run (tsc or
// node-gyp in another terminal) cannot change, or half-break, the code being measured half-way.
import { spawnSync } from 'node:child_process';
import { copyFileSync, cpSync, existsSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

export const repoRoot = resolve(fileURLToPath(new URL('..', import.meta.url)));

export function distDir() {
  return process.env.MOE_BENCH_DIST ? resolve(process.env.MOE_BENCH_DIST) : join(repoRoot, 'dist');
}

/** Imports a compiled module, e.g. distImport('src/model/load.js'). */
export function distImport(rel) {
  return import(pathToFileURL(join(distDir(), rel)).href);
}

const CHECK = ['src/model/load.js', 'src/workflows/random-model.js', 'src/formats/gguf-config.js', 'src/tokenizer/sources.js', 'src/workflows/bench.js'];

/**
 * Copies dist/src and the native addon to node_modules/.cache/moe-ts-bench/run-<pid>/ (inside the repository, so the copy
 * still resolves the repository's node_modules) and checks that the copy imports; retries a few times when a build
 * is writing dist/ at that moment. Sets MOE_BENCH_DIST (and MOE_NATIVE_ADDON when the addon is built and no other
 * was chosen) for this process and its children. Returns the snapshot's directory.
 */
export function snapshotDist({ log = () => {} } = {}) {
  const base = join(repoRoot, 'node_modules', '.cache', 'moe-ts-bench');
  // Snapshots of runs that are over (their process is gone) are removed.
  if (existsSync(base)) {
    for (const d of readdirSync(base)) {
      const pid = Number(/^run-(\d+)$/.exec(d)?.[1]);
      if (pid && pid !== process.pid && !alive(pid)) rmSync(join(base, d), { recursive: true, force: true });
    }
  }
  const root = join(base, `run-${process.pid}`);
  const snap = join(root, 'dist');
  process.on('exit', () => rmSync(root, { recursive: true, force: true }));
  let lastErr = '';
  for (let attempt = 0; attempt < 5; attempt++) {
    if (attempt > 0) {
      log(`dist/ did not import cleanly (a build running?), retrying the snapshot: ${lastErr.split('\n').find((l) => /Error/.test(l)) ?? lastErr.slice(0, 200)}`);
      spawnSync('sleep', ['5']);
    }
    rmSync(root, { recursive: true, force: true });
    mkdirSync(snap, { recursive: true });
    // Node stops looking for a package.json's "type" at node_modules: say ESM here.
    writeFileSync(join(root, 'package.json'), '{ "type": "module", "private": true }\n');
    cpSync(join(repoRoot, 'dist', 'src'), join(snap, 'src'), { recursive: true, filter: (p) => !p.endsWith('.map') && !p.endsWith('.d.ts') });
    const addon = join(repoRoot, 'native', 'build', 'Release', 'moe_native.node');
    const env = { ...process.env, MOE_BENCH_DIST: snap };
    if (existsSync(addon) && !process.env.MOE_NATIVE_ADDON) {
      copyFileSync(addon, join(root, 'moe_native.node'));
      env.MOE_NATIVE_ADDON = join(root, 'moe_native.node');
    }
    const code = CHECK.map((m) => `await import(${JSON.stringify(pathToFileURL(join(snap, m)).href)});`).join('');
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', code], { env, encoding: 'utf8' });
    if (r.status === 0) {
      process.env.MOE_BENCH_DIST = snap;
      if (env.MOE_NATIVE_ADDON) process.env.MOE_NATIVE_ADDON = env.MOE_NATIVE_ADDON;
      return snap;
    }
    lastErr = r.stderr || `exit ${r.status}`;
  }
  throw new Error(`could not snapshot a dist/ that imports cleanly:\n${lastErr.slice(0, 2000)}`);
}

function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return e.code === 'EPERM';
  }
}
