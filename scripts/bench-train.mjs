#!/usr/bin/env node
// `npm run bench:train`: training tokens/s of moe-ts against PyTorch (Debian python3-torch, development only) on
// the same small MoE config with the same threads, alternating, best of N; writes its section of docs/benchmarks.md.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import { parseArgs } from 'node:util';

const { values } = parseArgs({ options: { threads: { type: 'string', default: '2' }, reps: { type: 'string', default: '3' }, steps: { type: 'string', default: '10' }, 'no-write': { type: 'boolean', default: false } } });
const cfg = { vocab: 32000, dim: 128, layers: 4, heads: 4, kv_heads: 2, head_dim: 32, ffn: 256, experts: 8, k: 2, seq_len: 128, batch: 4, steps: Number(values.steps), warmup: 1, threads: Number(values.threads) };

function runTs() {
  const code = `
    import { MixtralTrain, mixtralTrainConfig } from './dist/src/model/mixtral-train.js';
    import { AdamW } from './dist/src/workflows/optimizer.js';
    import { Rng } from './dist/src/util/rng.js';
    import { setGradKernels } from './dist/src/autograd/kernels.js';
    import { selectGradKernels } from './dist/src/autograd/native-kernels.js';
    const c = ${JSON.stringify(cfg)};
    const kernels = selectGradKernels({ threads: c.threads }); // native (the addon) when built, else ref
    setGradKernels(kernels);
    const model = MixtralTrain.init(mixtralTrainConfig({ vocabSize: c.vocab, hiddenSize: c.dim, intermediateSize: c.ffn, numHiddenLayers: c.layers, numAttentionHeads: c.heads,
      numKeyValueHeads: c.kv_heads, headDim: c.head_dim, numLocalExperts: c.experts, numExpertsPerTok: c.k, rmsNormEps: 1e-5, ropeTheta: 1e6, maxPositionEmbeddings: 2048,
      slidingWindow: null, tieWordEmbeddings: true }, { routerAuxLossCoef: 0.02, routerZLossCoef: 0 }), { seed: 0 });
    const named = model.namedParameters();
    const params = named.map(([name, v]) => ({ name, data: v.data, grad: null, decay: v.shape.length >= 2 }));
    const opt = new AdamW(params);
    const rng = new Rng(1);
    const step = () => {
      const ids = new Int32Array(c.batch * c.seq_len).map(() => 3 + rng.int(c.vocab - 3));
      const tg = new Int32Array(c.batch * c.seq_len).map(() => 3 + rng.int(c.vocab - 3));
      for (const [, v] of named) v.grad = null;
      model.loss(ids, tg, { batch: c.batch, training: true, rng }).loss.backward();
      params.forEach((p, i) => (p.grad = named[i][1].grad));
      opt.step(1e-3);
    };
    for (let i = 0; i < c.warmup; i++) step();
    const t0 = performance.now();
    for (let i = 0; i < c.steps; i++) step();
    const s = (performance.now() - t0) / 1000;
    console.log(JSON.stringify({ tokens_per_s: c.steps * c.batch * c.seq_len / s, seconds: s, kernels: kernels.name }));`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', code], { encoding: 'utf8', cwd: new URL('..', import.meta.url).pathname });
  if (r.status !== 0) throw new Error(`moe-ts run failed: ${r.stderr}`);
  return JSON.parse(r.stdout.trim().split('\n').pop());
}

function runTorch() {
  const r = spawnSync('/usr/bin/python3', [new URL('./bench_train_torch.py', import.meta.url).pathname, JSON.stringify(cfg)], { encoding: 'utf8', env: { ...process.env, OMP_NUM_THREADS: String(cfg.threads) } });
  if (r.status !== 0) throw new Error(`PyTorch run failed (apt-get install python3-torch): ${r.stderr.slice(-400)}`);
  return JSON.parse(r.stdout.trim().split('\n').pop());
}

const ts = [];
const pt = [];
let kernels = '?';
let torchInfo = null;
for (let i = 0; i < Number(values.reps); i++) {
  process.stderr.write(`bench:train rep ${i + 1}/${values.reps} ...\r`);
  const r = runTs();
  kernels = r.kernels;
  ts.push(r.tokens_per_s);
  const t = runTorch();
  pt.push(t.tokens_per_s);
  torchInfo = t;
}
const best = (a) => Math.max(...a);
// Debian's torch calls whatever libblas.so.3 is: the netlib reference BLAS (a few GFLOP/s) unless OpenBLAS is installed.
const weakBlas = torchInfo.sgemm_gflops < 20;
if (weakBlas) console.error(`bench:train: PyTorch's sgemm runs at ${torchInfo.sgemm_gflops.toFixed(1)} GFLOP/s: it is on the reference BLAS, not a fair peer. apt-get install libopenblas0-pthread, then rerun.`);
const rows = [
  '| trainer | training tokens/s (best of ' + values.reps + ') | ratio moe-ts / PyTorch |',
  '| --- | --- | --- |',
  `| moe-ts (${kernels} training kernels, ${cfg.threads} threads) | ${best(ts).toFixed(1)} | ${(best(ts) / best(pt)).toFixed(3)}x |`,
  `| PyTorch ${torchInfo.torch} (CPU, ${cfg.threads} threads; its sgemm ${torchInfo.sgemm_gflops.toFixed(0)} GFLOP/s${weakBlas ? ', reference BLAS: not a fair peer' : ''}) | ${best(pt).toFixed(1)} | 1 |`,
];
const section = ['<!-- benchtrain:start -->', '## Training throughput (`npm run bench:train`)', '',
  `${new Date().toISOString().slice(0, 10)}, ${os.cpus()[0]?.model}, ${cfg.threads} threads, Node ${process.version}, Debian python3-torch ${weakBlas ? 'on the reference BLAS' : 'with an optimised BLAS (libopenblas0-pthread; on Debian\'s default reference BLAS it is several times slower)'}. ` +
  `Model: dim ${cfg.dim}, ${cfg.layers} layers, ${cfg.heads} q-heads / ${cfg.kv_heads} kv-heads, ffn ${cfg.ffn}, ${cfg.experts} experts top-${cfg.k}, vocab ${cfg.vocab} (tied); ` +
  `batch ${cfg.batch} x ${cfg.seq_len} tokens; forward + backward + AdamW; ${cfg.steps} timed steps after ${cfg.warmup} warm-up.`, '',
  ...rows, '', 'moe-ts runs its matmuls (forward and backward, with the grouped expert GEMM), attention, the cross-entropy and AdamW on the native addon with the same thread count; norms, RoPE, routing and the elementwise ops are TypeScript. Figures from a shared 2-core machine are noisy.',
  '<!-- benchtrain:end -->'].join('\n');
console.log(rows.join('\n'));
if (!values['no-write']) {
  const file = new URL('../docs/benchmarks.md', import.meta.url);
  const old = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '# Benchmarks\n';
  const re = /<!-- benchtrain:start -->[\s\S]*<!-- benchtrain:end -->/;
  fs.writeFileSync(file, re.test(old) ? old.replace(re, section) : old.trimEnd() + '\n\n' + section + '\n');
}
