#!/usr/bin/env node
// `npm run bench`: moe-ts against llama.cpp's own llama-bench on the same files, same thread count, same run.
// See docs/benchmarks.md for the method. Options (npm run bench -- --threads 2 ...):
//   --threads N        threads for both engines (default 2)
//   --backend B        moe-ts backend: auto (default: native when built, else ref), native or ref (MOE_BACKEND)
//   --types a,b        model types (default f16,q8_0,q4_0)
//   --reps N           alternating repetitions (default 3; 2 on the ref backend)
//   --prompt N --gen N test sizes (default 512 / 128; 32 / 16 when only the ref backend is available)
//   --full | --small   force the issue's setting / the small one whatever the backend
//   --no-llama         skip the peer (no build either)
//   --no-doc           print only; do not rewrite docs/benchmarks.md
//   --note "text"      a line for the report's notes (e.g. "quiet machine")
//   --rewrite-models   write the model files anew;  --rebuild-llama  rebuild llama-bench
//   --no-build         do not run tsc first;  --timeout-s N  per process (default 3600)
//   --json             also print the report as JSON
// Cache (models, llama-bench, probe): $MOE_CACHE_DIR or ~/.cache/moe-ts.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cacheRoot, ensureLlamaBench } from './bench-llama.mjs';
import { BENCH_CONFIG, ensureBenchModel } from './bench-models.mjs';
import { measureLimits, rusageWrapper } from './bench-probes.mjs';
import { distImport, snapshotDist } from './bench-dist.mjs';

const repoRoot = resolve(fileURLToPath(new URL('..', import.meta.url)));
const argv = process.argv.slice(2);
const flag = (n) => argv.includes(`--${n}`);
function opt(n, def) {
  const i = argv.indexOf(`--${n}`);
  return i >= 0 && argv[i + 1] !== undefined ? argv[i + 1] : def;
}
function intOpt(n, def) {
  const v = opt(n, undefined);
  if (v === undefined) return def;
  const x = Number(v);
  if (!Number.isInteger(x) || x < 1) throw new Error(`--${n} must be a positive integer, got ${v}`);
  return x;
}
const known = new Set(['threads', 'backend', 'types', 'reps', 'prompt', 'gen', 'full', 'small', 'no-llama', 'no-doc', 'note', 'rewrite-models', 'rebuild-llama', 'no-build', 'timeout-s', 'json']);
for (const a of argv) if (a.startsWith('--') && !known.has(a.slice(2))) throw new Error(`unknown option ${a} (see the top of scripts/bench.mjs)`);

const threads = intOpt('threads', 2);
const types = opt('types', 'f16,q8_0,q4_0').split(',').filter(Boolean);
for (const t of types) if (!['f16', 'q8_0', 'q4_0', 'f32', 'bf16'].includes(t)) throw new Error(`--types: unsupported model type ${t}`);
const timeoutMs = intOpt('timeout-s', 3600) * 1000;
const backendOpt = opt('backend', process.env.MOE_BACKEND ?? 'auto');
if (!['auto', 'native', 'ref'].includes(backendOpt)) throw new Error(`--backend must be auto, native or ref, got ${backendOpt}`);

// ---- progress: one status line, redrawn in place on a TTY, plain lines (throttled) otherwise ----
const tty = process.stderr.isTTY;
let lastPlain = 0;
let lastText = '';
function status(text, important = false) {
  if (tty) {
    process.stderr.write(`\r\x1b[K${text.slice(0, (process.stderr.columns || 120) - 1)}`);
  } else if (important || (text !== lastText && Date.now() - lastPlain > 5000)) {
    process.stderr.write(`${text}\n`);
    lastPlain = Date.now();
  }
  lastText = text;
}
function log(text) {
  if (tty) process.stderr.write('\r\x1b[K');
  process.stderr.write(`${text}\n`);
  if (tty && lastText) process.stderr.write(lastText);
}

// ---- child processes ----
/** Runs a command under the rusage wrapper; resolves { stdout, stderr, code, maxRssBytes }. */
function runMeasured(cmd, args, { onStderrLine, env } = {}) {
  const rssFile = join(os.tmpdir(), `moe-bench-rss-${process.pid}-${Math.random().toString(36).slice(2)}`);
  const w = rusageWrapper(rssFile, cmd, args);
  return new Promise((res, rej) => {
    const child = spawn(w.cmd, w.args, { cwd: repoRoot, env: env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let partial = '';
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
    }, timeoutMs);
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => {
      const s = d.toString();
      stderr += s;
      if (stderr.length > 100_000) stderr = stderr.slice(-50_000);
      partial += s;
      const lines = partial.split('\n');
      partial = lines.pop();
      for (const l of lines) onStderrLine?.(l);
    });
    child.on('error', (e) => {
      clearTimeout(timer);
      rej(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      let maxRssBytes = null;
      try {
        const kib = Number(readFileSync(rssFile, 'utf8').trim());
        if (Number.isFinite(kib) && kib > 0) maxRssBytes = kib * 1024;
      } catch { /* no wrapper: unknown */ }
      rmSync(rssFile, { force: true });
      res({ stdout, stderr, code: signal ? `signal ${signal}` : code, maxRssBytes });
    });
  });
}

async function runMoe(model, nPrompt, nGen, warmupPrompt, label) {
  const args = [join(repoRoot, 'scripts', 'bench-moe-child.mjs'), '--model', model, '--threads', String(threads), '--prompt', String(nPrompt), '--gen', String(nGen), '--warmup-prompt', String(warmupPrompt)];
  const r = await runMeasured(process.execPath, args, {
    env: { ...process.env, MOE_PROGRESS: '0', MOE_BACKEND: backendOpt },
    onStderrLine: (l) => {
      if (l.startsWith('@progress ')) status(`${label}: ${l.slice(10)}`);
    },
  });
  const line = r.stdout.split('\n').find((l) => l.startsWith('BENCH_RESULT '));
  if (r.code !== 0 || !line) throw new Error(`moe-ts run failed (exit ${r.code}):\n${r.stderr.split('\n').filter((l) => !l.startsWith('@progress')).join('\n').slice(-3000)}`);
  const res = JSON.parse(line.slice('BENCH_RESULT '.length));
  // The wrapper's figure (wait4) is what llama-bench gets too; the child's own report is the fallback.
  res.maxRssBytes = r.maxRssBytes ?? res.maxRssBytes;
  return res;
}

async function runLlama(bin, model, nPrompt, nGen, label) {
  const { parseLlamaBenchJson } = await distImport('src/workflows/bench.js');
  const args = ['-m', model, '-p', String(nPrompt), '-n', String(nGen), '-t', String(threads), '-r', '1', '-o', 'json', '--progress'];
  const r = await runMeasured(bin, args, {
    onStderrLine: (l) => {
      const m = /benchmark (\d+)\/(\d+): (.*)$/.exec(l);
      if (m) status(`${label}: test ${m[1]}/${m[2]} ${m[3]}`);
    },
  });
  if (r.code !== 0) throw new Error(`llama-bench failed (exit ${r.code}):\n${r.stderr.slice(-3000)}`);
  const results = parseLlamaBenchJson(r.stdout);
  const pp = results.find((x) => x.nPrompt === nPrompt && x.nGen === 0);
  const tg = results.find((x) => x.nGen === nGen && x.nPrompt === 0);
  return { pp: pp?.avgTs ?? null, tg: tg?.avgTs ?? null, maxRssBytes: r.maxRssBytes, info: results[0] };
}

function machine() {
  let cpu = os.cpus()[0]?.model ?? 'unknown';
  let flags = [];
  try {
    const info = readFileSync('/proc/cpuinfo', 'utf8');
    cpu = /^model name\s*:\s*(.*)$/m.exec(info)?.[1]?.trim() ?? cpu;
    const f = new Set((/^(flags|Features)\s*:\s*(.*)$/m.exec(info)?.[2] ?? '').split(/\s+/));
    flags = ['avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'asimd'].filter((x) => f.has(x)).map((x) => (x === 'asimd' ? 'NEON' : x.toUpperCase()));
  } catch { /* not Linux */ }
  return { cpu, cpuFeatures: flags, cores: os.availableParallelism(), ramBytes: os.totalmem(), node: process.versions.node, os: `${os.type()} ${os.release()} ${os.arch()}` };
}

/** The best of several limit measurements (a busy machine only ever measures low, so the highest is the truest). */
function bestLimits(all) {
  const pick = (part, key) =>
    Object.keys(all[0][part]).map((t) => {
      const best = all.map((m) => m[part][t]).reduce((a, b) => (b[key] > a[key] ? b : a));
      return { threads: Number(t), value: best[key], source: best.source };
    });
  return { bandwidthGBs: pick('bw', 'gbPerSecond'), fmaGflops: pick('fma', 'gflops') };
}

async function main() {
  const t0 = Date.now();
  const load0 = os.loadavg()[0];
  if (!flag('no-build')) {
    status('building moe-ts (tsc)', true);
    const tsc = join(repoRoot, 'node_modules', 'typescript', 'bin', 'tsc');
    const r = spawnSync(process.execPath, [tsc, '-p', '.'], { cwd: repoRoot, encoding: 'utf8' });
    if (r.status !== 0) log(`tsc reported errors (continuing with what dist/ holds):\n${(r.stdout + r.stderr).split('\n').slice(0, 10).join('\n')}`);
  }
  // Every process of this run uses one snapshot of the compiled code (see scripts/bench-dist.mjs).
  snapshotDist({ log });
  const report = await distImport('src/workflows/bench.js');

  // The peer's build is slow (minutes): start it now, write the models meanwhile.
  const useLlama = !flag('no-llama');
  const llamaP = useLlama ? ensureLlamaBench({ progress: (m) => log(m), rebuild: flag('rebuild-llama') }) : Promise.resolve(null);
  llamaP.catch(() => {}); // awaited below
  const models = {};
  for (const t of types) models[t] = await ensureBenchModel(t, { progress: (m) => log(m), rewrite: flag('rewrite-models') });

  // Which backend does loadModel pick? A child loads the smallest file and runs nothing.
  status('moe-ts: which backend?', true);
  const smallest = types.map((t) => models[t]).sort((a, b) => a.sidecar.fileBytes - b.sidecar.fileBytes)[0];
  const probe = await runMoe(smallest.path, 0, 0, 0, 'moe-ts backend probe');
  const backend = probe.backend;
  const bi = probe.backendInfo;
  const backendDesc = bi ? `${backend} (${[bi.cpu && `cpu path ${bi.cpu}`, bi.kernels && `kernels ${bi.kernels}`, bi.threads && `${bi.threads} threads`].filter(Boolean).join(', ')})` : backend;
  const small = flag('small') || (!flag('full') && backend === 'ref');
  const nPrompt = intOpt('prompt', small ? 32 : 512);
  const nGen = intOpt('gen', small ? 16 : 128);
  const reps = intOpt('reps', small ? 2 : 3);
  // llama-bench warms up with the whole prompt; the ref backend would spend minutes on it, so it gets a short one.
  const warmupPrompt = backend === 'ref' ? Math.min(nPrompt, 8) : nPrompt;
  log(`moe-ts backend: ${backendDesc}; setting: pp${nPrompt} tg${nGen}, ${reps} repetitions, ${threads} threads${small ? ' (small setting)' : ''}`);

  let llama = null;
  if (useLlama) {
    status('waiting for the llama-bench build', true);
    try {
      llama = await llamaP;
    } catch (e) {
      log(`llama-bench unavailable, measuring moe-ts alone: ${e.message.split('\n')[0]}`);
    }
  }

  // The limits are measured before every repetition and at the end (a second each), and the best kept.
  const limitRuns = [];

  const samples = Object.fromEntries(types.map((t) => [t, { moe: { pp: [], tg: [], rss: [] }, llama: { pp: [], tg: [], rss: [] } }]));
  let llamaInfo = null;
  const total = reps * types.length * (llama ? 2 : 1);
  let done = 0;
  for (let rep = 0; rep < reps; rep++) {
    status('measuring memory bandwidth and FMA peak', true);
    limitRuns.push(measureLimits(threads));
    for (const [i, t] of types.entries()) {
      // Alternate who goes first, so neither side always runs on a machine the other just warmed or heated.
      const order = (rep + i) % 2 === 0 ? ['moe', 'llama'] : ['llama', 'moe'];
      for (const who of order) {
        if (who === 'llama' && !llama) continue;
        const label = `[${++done}/${total}] ${t} ${who === 'moe' ? 'moe-ts' : 'llama.cpp'} rep ${rep + 1}/${reps}`;
        status(label, true);
        const s = samples[t][who];
        if (who === 'moe') {
          const r = await runMoe(models[t].path, nPrompt, nGen, warmupPrompt, label);
          if (r.backend !== backend) throw new Error(`moe-ts ran on the ${r.backend} backend, not ${backend} as at the start: was the addon rebuilt during the run?`);
          s.pp.push(r.pp.tokensPerSecond);
          s.tg.push(r.tg.tokensPerSecond);
          if (r.maxRssBytes) s.rss.push(r.maxRssBytes);
          log(`${label}: pp ${r.pp.tokensPerSecond.toFixed(2)} tok/s, tg ${r.tg.tokensPerSecond.toFixed(2)} tok/s, peak RSS ${Math.round((r.maxRssBytes ?? 0) / 1e6)} MB`);
        } else {
          const r = await runLlama(llama.bin, models[t].path, nPrompt, nGen, label);
          llamaInfo = r.info;
          s.pp.push(r.pp ?? NaN); // NaN (skipped by the summaries) keeps index = repetition for the paired ratios
          s.tg.push(r.tg ?? NaN);
          if (r.maxRssBytes) s.rss.push(r.maxRssBytes);
          log(`${label}: pp ${r.pp?.toFixed(2)} tok/s, tg ${r.tg?.toFixed(2)} tok/s, peak RSS ${Math.round((r.maxRssBytes ?? 0) / 1e6)} MB`);
        }
      }
    }
  }

  status('measuring memory bandwidth and FMA peak again', true);
  limitRuns.push(measureLimits(threads));
  const limits = bestLimits(limitRuns);
  const bw = limits.bandwidthGBs.find((l) => l.threads === threads).value * 1e9;
  const fma = limits.fmaGflops.find((l) => l.threads === threads).value * 1e9;

  const rows = [];
  const rss = [];
  for (const t of types) {
    const c = report.perTokenCosts(models[t].sidecar.tensors, BENCH_CONFIG);
    const s = samples[t];
    rows.push(report.makeRow(t, 'pp', nPrompt, s.moe.pp, s.llama.pp, report.promptFlopsPerToken(c, nPrompt), fma));
    rows.push(report.makeRow(t, 'tg', nGen, s.moe.tg, s.llama.tg, report.generationBytesPerToken(c, nGen), bw));
    rss.push({
      model: t,
      fileBytes: models[t].sidecar.fileBytes,
      kvBytes: c.kvBytesPerKey * (nPrompt + nGen),
      moeMaxRssBytes: s.moe.rss.length ? Math.max(...s.moe.rss) : null,
      llamaMaxRssBytes: s.llama.rss.length ? Math.max(...s.llama.rss) : null,
    });
  }

  const load1 = os.loadavg()[0];
  const notes = [];
  if (small) notes.push(`Small setting (pp${nPrompt} / tg${nGen}, ${reps} repetitions): the moe-ts backend here is \`${backend}\`, the plain-TypeScript oracle, far too slow for pp512 / tg128 in minutes. Run \`npm run bench -- --full\` to force the issue's setting.`);
  // The bench's own threads keep the end figure near the thread count; only the start says whether others were busy.
  notes.push(`Load average (1 min) ${load0.toFixed(2)} at the start (${load1.toFixed(2)} at the end, the bench's own load included) on ${os.availableParallelism()} cores${load0 > 1 ? ': other work was running when it started, so the figures may be noisy' : ''}.`);
  if (rows.some((r) => (r.moeShare ?? 0) > 1 || (r.llamaShare ?? 0) > 1)) {
    notes.push('A share above 100% means the limit was measured low (a busy machine) or, for prompt processing of q8_0 / q4_0, that the engine multiplies in 8-bit integers (VNNI / AVX2 integer dot products do more multiply-adds per cycle than FP32 FMA), which the FP32 peak does not bound.');
  }
  if (opt('note', null)) notes.push(opt('note'));
  notes.push(`Total time ${Math.round((Date.now() - t0) / 1000)} s.`);

  const llamaDesc = llama ? `${llama.tag}${llamaInfo ? ` (build ${llamaInfo.buildNumber ?? '?'}, commit ${llamaInfo.buildCommit})` : ''}` : 'not run';
  const rep = {
    date: new Date().toISOString(),
    machine: machine(),
    setting: { backend: backendDesc, threads, nPrompt, nGen, reps, small, llama: llamaDesc },
    limits,
    rows,
    rss,
    notes,
  };
  if (tty) process.stderr.write('\r\x1b[K');
  console.log(report.renderText(rep));
  if (flag('json')) console.log(JSON.stringify({ ...rep, samples }, null, 1));

  const resultsDir = join(cacheRoot(), 'bench-results');
  mkdirSync(resultsDir, { recursive: true });
  const rawFile = join(resultsDir, `bench-${rep.date.replace(/[:.]/g, '-')}.json`);
  writeFileSync(rawFile, JSON.stringify({ ...rep, samples, config: BENCH_CONFIG }, null, 1));
  console.log(`raw figures: ${rawFile}`);

  if (!flag('no-doc')) {
    const docPath = join(repoRoot, 'docs', 'benchmarks.md');
    const doc = existsSync(docPath) ? readFileSync(docPath, 'utf8') : '# Benchmarks\n';
    writeFileSync(docPath, report.replaceResults(doc, report.renderMarkdownResults(rep)));
    console.log(`wrote ${docPath}`);
  }
}

main().catch((e) => {
  if (tty) process.stderr.write('\r\x1b[K');
  console.error(`bench failed: ${e.stack ?? e}`);
  process.exit(1);
});

