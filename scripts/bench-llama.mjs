// Builds the benchmark's peer: llama.cpp's own `llama-bench`, from the llama.cpp source that node-llama-cpp ships
// (node_modules/node-llama-cpp/llama/gitRelease.bundle, a git bundle of the release named in
// binariesGithubRelease.json). Built once, in Release with -DGGML_NATIVE=ON (llama.cpp at its best on this CPU), and
// cached outside git: $MOE_CACHE_DIR or ~/.cache/moe-ts/llama-bench-<tag>/.
//
//   node scripts/bench-llama.mjs            # build if needed, print the binary's path
//   node scripts/bench-llama.mjs --rebuild  # throw the cached build away first
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const repoRoot = resolve(fileURLToPath(new URL('..', import.meta.url)));

export function cacheRoot() {
  return process.env.MOE_CACHE_DIR ? resolve(process.env.MOE_CACHE_DIR) : join(homedir(), '.cache', 'moe-ts');
}

/** The llama.cpp release node-llama-cpp carries, and the bundle holding its source. */
export function llamaSource() {
  const dir = join(repoRoot, 'node_modules', 'node-llama-cpp', 'llama');
  const bundle = join(dir, 'gitRelease.bundle');
  if (!existsSync(bundle)) throw new Error(`llama.cpp source not found: ${bundle} (run npm install; node-llama-cpp is a devDependency)`);
  let tag = 'unknown';
  for (const f of ['binariesGithubRelease.json', 'llama.cpp.info.json']) {
    try {
      const j = JSON.parse(readFileSync(join(dir, f), 'utf8'));
      tag = j.release ?? j.tag ?? tag;
      if (tag !== 'unknown') break;
    } catch { /* try the next file */ }
  }
  return { bundle, tag: String(tag).replace(/[^A-Za-z0-9._-]/g, '_') };
}

/** Runs a command; its output goes to `logFile` (a failed build shows the log's tail). */
function run(cmd, args, opts = {}) {
  return new Promise((resolveP, reject) => {
    const child = spawn(cmd, args, { cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'], env: opts.env ?? process.env });
    let log = '';
    const onData = (d) => {
      const s = d.toString();
      log += s;
      if (log.length > 200_000) log = log.slice(-100_000);
      opts.onLine?.(s);
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('error', (e) => reject(new Error(`${cmd}: ${e.message}`)));
    child.on('close', (code) => {
      if (opts.logFile) writeFileSync(opts.logFile, log, { flag: 'a' });
      if (code === 0) resolveP(log);
      else reject(new Error(`${cmd} ${args.join(' ')} failed (exit ${code}):\n${log.slice(-3000)}`));
    });
  });
}

/**
 * Returns the path of a built llama-bench, building it first if the cache lacks one (several minutes on 2 cores).
 * `progress(msg)` receives one-line status messages.
 */
export async function ensureLlamaBench({ progress = (m) => process.stderr.write(m + '\n'), rebuild = false, jobs } = {}) {
  const { bundle, tag } = llamaSource();
  const dir = join(cacheRoot(), `llama-bench-${tag}`);
  const src = join(dir, 'src');
  const build = join(dir, 'build');
  const bin = join(build, 'bin', 'llama-bench');
  const stamp = join(dir, 'built.json');
  if (rebuild) rmSync(dir, { recursive: true, force: true });
  if (existsSync(bin) && existsSync(stamp)) return { bin, tag, dir, src };

  mkdirSync(dir, { recursive: true });
  const logFile = join(dir, 'build.log');
  writeFileSync(logFile, '');
  if (!existsSync(join(src, 'CMakeLists.txt'))) {
    rmSync(src, { recursive: true, force: true });
    progress(`llama-bench: cloning llama.cpp ${tag} from ${bundle}`);
    await run('git', ['clone', '--quiet', bundle, src], { logFile });
  }
  // No network, no shared libraries (one self-contained binary), only what llama-bench needs.
  const cmakeArgs = [
    '-S', src, '-B', build,
    '-DCMAKE_BUILD_TYPE=Release',
    '-DGGML_NATIVE=ON',
    '-DBUILD_SHARED_LIBS=OFF',
    '-DLLAMA_CURL=OFF',
    '-DLLAMA_OPENSSL=OFF',
    '-DLLAMA_BUILD_TESTS=OFF',
    '-DLLAMA_BUILD_EXAMPLES=OFF',
    '-DLLAMA_BUILD_SERVER=OFF',
  ];
  progress(`llama-bench: configuring (cmake, Release, GGML_NATIVE=ON) in ${build}`);
  await run('cmake', cmakeArgs, { logFile });
  const j = jobs ?? Math.max(1, (await import('node:os')).availableParallelism());
  const t0 = Date.now();
  let last = '';
  let lastShown = 0;
  progress(`llama-bench: compiling with ${j} jobs (takes several minutes on 2 cores; log: ${logFile})`);
  await run('cmake', ['--build', build, '--config', 'Release', '--target', 'llama-bench', '-j', String(j)], {
    logFile,
    onLine: (s) => {
      // cmake prints "[ 42%] Building ..." lines; show the newest at most every 10 s.
      const m = [...s.matchAll(/\[\s*(\d+)%\]/g)].pop();
      if (m) last = m[1];
      if (last && Date.now() - lastShown > 10_000) {
        lastShown = Date.now();
        progress(`llama-bench: compiling ${last}% (${Math.round((Date.now() - t0) / 1000)}s)`);
      }
    },
  });
  if (!existsSync(bin)) throw new Error(`llama-bench build finished but ${bin} is missing (log: ${logFile})`);
  writeFileSync(stamp, JSON.stringify({ tag, builtAt: new Date().toISOString(), cmakeArgs }, null, 2));
  progress(`llama-bench: built in ${Math.round((Date.now() - t0) / 1000)}s: ${bin}`);
  return { bin, tag, dir, src };
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  ensureLlamaBench({ rebuild: process.argv.includes('--rebuild') })
    .then((r) => console.log(r.bin))
    .catch((e) => {
      console.error(e.message);
      process.exit(1);
    });
}
