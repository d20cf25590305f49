// The moe-ts side of `npm run bench`, run as its own process (so its peak RSS is its own): loads the model with
// whatever backend loadModel picks, then runs the two tests as llama-bench does (tools/llama-bench/llama-bench.cpp):
//   pp: a fresh context, one forward call over BOS + (prompt - 1) random tokens;
//   tg: a fresh context, BOS then (gen - 1) random tokens, one forward call per token (from position 0, as
//       llama-bench's tg test starts on an empty context).
// Each test is preceded by a warm-up (a prompt of `warmupPrompt` tokens, as llama-bench's warm-up runs; 128 generated
// tokens where llama-bench generates one, see below), which also brings a memory-mapped file's pages in.
//
//   node scripts/bench-moe-child.mjs --model m.gguf --threads 2 --prompt 512 --gen 128 [--warmup-prompt 512]
//     [--warmup-gen 128] [--seed 1]
//
// Prints one line `BENCH_RESULT {json}` on stdout; progress lines `@progress <text>` on stderr.
import { performance } from 'node:perf_hooks';

const args = process.argv.slice(2);
function opt(name, def) {
  const i = args.indexOf(`--${name}`);
  if (i < 0) return def;
  const v = args[i + 1];
  if (v === undefined) throw new Error(`--${name} needs a value`);
  return v;
}
function intOpt(name, def) {
  const v = Number(opt(name, String(def)));
  if (!Number.isInteger(v) || v < 0) throw new Error(`--${name} must be a non-negative integer`);
  return v;
}

const modelPath = opt('model');
if (!modelPath) throw new Error('--model is required');
const threads = intOpt('threads', 2);
const nPrompt = intOpt('prompt', 512);
const nGen = intOpt('gen', 128);
const warmupPrompt = intOpt('warmup-prompt', nPrompt);
let seed = intOpt('seed', 1) >>> 0 || 1;

// xorshift32: the token stream only has to be arbitrary and the same for every run.
function rand() {
  seed ^= seed << 13;
  seed >>>= 0;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  seed >>>= 0;
  return seed;
}
const progress = (s) => process.stderr.write(`@progress ${s}\n`);

const { distImport } = await import('./bench-dist.mjs');
const { loadModel } = await distImport('src/model/load.js');

const t0 = performance.now();
progress('loading');
const m = loadModel(modelPath, { threads });
const loadS = (performance.now() - t0) / 1000;
const c = m.config;
const bos = m.tokenizer.bosId;
const randomTokens = (n) => {
  const t = [bos];
  // Any id but the control/byte pieces at the start of the vocabulary (llama-bench draws from the whole vocabulary;
  // the cost of a token does not depend on its id).
  while (t.length < n) t.push(259 + (rand() % (c.vocabSize - 259)));
  return t;
};
const session = (n) => m.newSession({ contextLength: Math.max(n, 1), kvF16: true });

function prompt(n) {
  const toks = randomTokens(n);
  const s = session(n);
  const t = performance.now();
  s.forward(toks);
  return (performance.now() - t) / 1000;
}

function generate(n, label) {
  const toks = randomTokens(n);
  const s = session(n);
  let last = performance.now();
  const t = last;
  for (let i = 0; i < n; i++) {
    s.forward([toks[i]]);
    const now = performance.now();
    if (label && now - last > 1000) {
      progress(`${label} ${i + 1}/${n}`);
      last = now;
    }
  }
  return (performance.now() - t) / 1000;
}

const be = m.model.backend;
// The native backend says which code path it runs (avx512-vnni, avx2, ...) and with how many threads.
const backendInfo = typeof be.info === 'function' ? be.info() : null;
const result = { backend: be.name, backendInfo, threads, loadS, config: { hiddenSize: c.hiddenSize, layers: c.numHiddenLayers, experts: c.numLocalExperts, k: c.numExpertsPerTok } };
if (nPrompt > 0) {
  if (warmupPrompt > 0) {
    progress(`pp warm-up (${warmupPrompt} tokens)`);
    prompt(warmupPrompt);
  }
  progress(`pp ${nPrompt} tokens`);
  const s = prompt(nPrompt);
  result.pp = { tokens: nPrompt, seconds: s, tokensPerSecond: nPrompt / s };
}
if (nGen > 0) {
  // 128 tokens, not llama-bench's 1: V8 optimises the decode path over a process's first ~150 tokens, and on 2 cores
  // its background compiler thread preempts a kernel thread (docs/benchmarks.md: with 32 warm-up tokens q4_0 tg128
  // measured ~15 % lower). A one-time cost per process, as llama-bench's warm-up excludes its own.
  // (On the ref backend, where a token takes a second, one warm-up token as llama-bench.)
  const warmupGen = Math.max(1, intOpt('warmup-gen', be.name === 'native' ? 128 : 1));
  progress('tg warm-up');
  generate(warmupGen);
  progress(`tg 0/${nGen}`);
  const s = generate(nGen, 'tg');
  result.tg = { tokens: nGen, seconds: s, tokensPerSecond: nGen / s };
}
result.maxRssBytes = process.resourceUsage().maxRSS * 1024;
process.stdout.write(`BENCH_RESULT ${JSON.stringify(result)}\n`);
// A backend thread pool must not keep the process alive.
process.exit(0);
