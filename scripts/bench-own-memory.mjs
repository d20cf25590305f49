// A/B of the native backend's own copy of the weights (2 MB pages, q4_0 repacked; NativeBackendOptions.repack)
// against running from the file's mapped pages: one process loads the model twice, once each way, and alternates
// decode runs of 128 tokens between them, so both see the same machine state. Prints tokens/s of every run and
// the medians.
//
//   node scripts/bench-own-memory.mjs <model.gguf> [--runs 8] [--threads 2]
// (the bench models are in ~/.cache/moe-ts/bench-models after `npm run bench`)
import { performance } from 'node:perf_hooks';
import { distImport } from './bench-dist.mjs';

const args = process.argv.slice(2);
const opt = (n, d) => (args.includes(`--${n}`) ? Number(args[args.indexOf(`--${n}`) + 1]) : d);
const file = args.find((a) => !a.startsWith('--') && !/^\d+$/.test(a));
if (!file) throw new Error('usage: node scripts/bench-own-memory.mjs <model.gguf> [--runs 8] [--threads 2]');
const runs = opt('runs', 8), threads = opt('threads', 2);

const { loadModel } = await distImport('src/model/load.js');
const { NativeBackend } = await distImport('src/backend/native.js');
const mapped = loadModel(file, { backend: new NativeBackend({ threads, repack: false }) });
const own = loadModel(file, { backend: new NativeBackend({ threads, repack: true }) });
const decode = (m) => {
  const s = m.newSession({ contextLength: 128, kvF16: true });
  const t = performance.now();
  for (let i = 0; i < 128; i++) s.forward([300 + i]);
  return 128 / ((performance.now() - t) / 1000);
};
decode(mapped), decode(own); // warm-up (and the copy)
const a = [], b = [];
for (let i = 0; i < runs; i++) a.push(decode(mapped)), b.push(decode(own));
const median = (x) => [...x].sort((p, q) => p - q)[x.length >> 1];
const show = (x) => x.map((v) => v.toFixed(1)).join(' ');
console.log(`file's mapped pages: ${show(a)}  median ${median(a).toFixed(1)} tok/s`);
console.log(`engine's own copy:   ${show(b)}  median ${median(b).toFixed(1)} tok/s  (${(median(b) / median(a)).toFixed(2)}x)`);
