// The arithmetic and report of `npm run bench` (src/workflows/bench.ts). No timing here: the bench itself is never
// run by the tests. The per-token costs are checked against parameterCounts (written independently, for `moe
// inspect`), and llama-bench's JSON parser against real llama-bench output (test/fixtures/bench/).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parameterCounts, type MixtralConfig } from '../src/model/config.js';
import { randomMixtralTensors } from '../src/workflows/random-model.js';
import {
  generationBytesPerToken,
  makeRow,
  pairedRatios,
  parseLlamaBenchJson,
  perTokenCosts,
  promptFlopsPerToken,
  RESULTS_BEGIN,
  RESULTS_END,
  renderMarkdownResults,
  renderText,
  replaceResults,
  rssBound,
  shareOfLimit,
  summarize,
  type BenchReport,
  type TensorEntry,
} from '../src/workflows/bench.js';

const fixture = (name: string): string => fileURLToPath(new URL(`../../test/fixtures/${name}`, import.meta.url));

const tiny: MixtralConfig = {
  vocabSize: 300,
  hiddenSize: 64,
  intermediateSize: 96,
  numHiddenLayers: 2,
  numAttentionHeads: 4,
  numKeyValueHeads: 2,
  headDim: 16,
  numLocalExperts: 4,
  numExpertsPerTok: 2,
  rmsNormEps: 1e-5,
  ropeTheta: 1e6,
  maxPositionEmbeddings: 128,
  slidingWindow: null,
  tieWordEmbeddings: false,
};

function entries(c: MixtralConfig, dtype: 'f32' | 'q8_0'): TensorEntry[] {
  return [...randomMixtralTensors(c, 1, dtype)].map(([name, t]) => ({ name, shape: t.shape, bytes: t.data.byteLength }));
}

test('summarize: best is the highest, median of odd and even counts, non-finite values dropped, empty is null', () => {
  assert.deepEqual(summarize([3, 1, 2]), { best: 3, median: 2, n: 3 });
  assert.deepEqual(summarize([4, 1, 3, 2]), { best: 4, median: 2.5, n: 4 });
  assert.deepEqual(summarize([5, NaN, Infinity]), { best: 5, median: 5, n: 1 });
  assert.equal(summarize([]), null);
});

test('perTokenCosts: the parameters it counts add up to parameterCounts(c).active', () => {
  for (const tie of [false, true]) {
    const c = { ...tiny, tieWordEmbeddings: tie };
    const pc = parameterCounts(c);
    const costs = perTokenCosts(entries(c, 'f32'), c);
    const d = c.hiddenSize;
    const norms = c.numHiddenLayers * 2 * d + d;
    const embed = c.vocabSize * d;
    // active = embedding + head + norms + matrices of the k chosen experts, attention and router.
    assert.equal(costs.matmulParamsPerToken + costs.headParams + norms + (tie ? 0 : embed), pc.active, `tie=${tie}`);
    assert.equal(costs.headParams, c.vocabSize * d);
    // f32: every parameter read is 4 bytes; one embedding row (all of it when the head is tied).
    const read = costs.matmulParamsPerToken + norms + (tie ? embed : costs.headParams + d);
    assert.equal(costs.weightBytesPerToken, 4 * read, `tie=${tie}`);
  }
});

test('perTokenCosts: q8_0 matrices cost 34 bytes per 32 weights, norms and router stay f32', () => {
  const c = tiny;
  const f = perTokenCosts(entries(c, 'f32'), c);
  const q = perTokenCosts(entries(c, 'q8_0'), c);
  const d = c.hiddenSize;
  const f32Params = c.numHiddenLayers * (2 * d + c.numLocalExperts * d) + d; // norms, routers, output norm
  const quantParams = f.weightBytesPerToken / 4 - f32Params;
  assert.equal(q.weightBytesPerToken, f32Params * 4 + (quantParams / 32) * 34);
  assert.equal(q.matmulParamsPerToken, f.matmulParamsPerToken);
  assert.equal(q.kvBytesPerKey, c.numHiddenLayers * 2 * c.numKeyValueHeads * c.headDim * 2);
  assert.equal(q.attnFlopsPerKey, c.numHiddenLayers * 4 * c.numAttentionHeads * c.headDim);
});

test('generation bytes, prompt flops and shares follow their definitions', () => {
  const costs = { weightBytesPerToken: 1000, kvBytesPerKey: 10, matmulParamsPerToken: 500, headParams: 64, attnFlopsPerKey: 8 };
  assert.equal(generationBytesPerToken(costs, 3), 1000 + 10 * 2); // contexts 1, 2, 3: average 2
  assert.equal(promptFlopsPerToken(costs, 4), 2 * 500 + 8 * 2.5 + (2 * 64) / 4);
  assert.equal(shareOfLimit(50, 1e9, 100e9), 0.5);
  const row = makeRow('q4_0', 'tg', 3, [10, 30, 20], [40, 20], 2e9, 100e9);
  assert.deepEqual(row.moe, { best: 30, median: 20, n: 3 });
  assert.deepEqual(row.llama, { best: 40, median: 30, n: 2 });
  assert.equal(row.ratio, 0.75);
  assert.deepEqual(row.paired, { median: 0.875, min: 0.25, max: 1.5, n: 2 }, 'repetitions 1 and 2: 10/40, 30/20 (median of two: their mean)');
  assert.deepEqual(pairedRatios([10, 20, 30], [NaN, 10, 20]), { median: 1.75, min: 1.5, max: 2, n: 2 }, 'a repetition without a figure is left out, the others stay paired');
  assert.equal(pairedRatios([1], []), null);
  assert.equal(row.moeShare, 0.6);
  assert.equal(row.llamaShare, 0.8);
  const alone = makeRow('f16', 'pp', 8, [5], [], 1, 10);
  assert.equal(alone.llama, null);
  assert.equal(alone.ratio, null);
  assert.equal(alone.llamaShare, null);
  assert.equal(rssBound({ model: 'x', fileBytes: 1e9, kvBytes: 5e6, moeMaxRssBytes: null, llamaMaxRssBytes: null }), 1e9 + 5e6 + 300e6);
});

test('parseLlamaBenchJson reads real llama-bench -o json output', () => {
  const text = fs.readFileSync(fixture('bench/llama-bench-output.json'), 'utf8');
  const r = parseLlamaBenchJson(text);
  assert.equal(r.length, 2);
  const pp = r.find((x) => x.nGen === 0)!;
  const tg = r.find((x) => x.nPrompt === 0)!;
  assert.ok(pp && tg);
  const raw = JSON.parse(text) as Array<Record<string, unknown>>;
  const rawPp = raw.find((x) => x.n_gen === 0)!;
  assert.equal(pp.nPrompt, rawPp.n_prompt);
  assert.equal(pp.avgTs, rawPp.avg_ts);
  assert.deepEqual(pp.samplesTs, rawPp.samples_ts);
  assert.equal(pp.buildCommit, rawPp.build_commit);
  assert.ok(pp.avgTs > 0 && tg.avgTs > 0);
  assert.equal(tg.nThreads, raw[0].n_threads);
});

test('parseLlamaBenchJson refuses output that is not its JSON array, naming what is wrong', () => {
  assert.throws(() => parseLlamaBenchJson('error: failed to load model'), /not its JSON array/);
  assert.throws(() => parseLlamaBenchJson('[{"n_prompt": 512}]'), /field n_gen is not a number/);
});

const report: BenchReport = {
  date: '2025-01-01T00:00:00.000Z',
  machine: { cpu: 'Test CPU', cpuFeatures: ['AVX2'], cores: 2, ramBytes: 8 * 2 ** 30, node: '20.0.0', os: 'Linux' },
  setting: { backend: 'ref', threads: 2, nPrompt: 32, nGen: 16, reps: 2, small: true, llama: 'v0' },
  limits: { bandwidthGBs: [{ threads: 2, value: 50, source: 'measured' }], fmaGflops: [{ threads: 2, value: 400, source: 'measured' }] },
  rows: [makeRow('q4_0', 'pp', 32, [1, 2], [300, 310], 4e8, 400e9), makeRow('q4_0', 'tg', 16, [1.5], [], 1.3e8, 50e9)],
  rss: [{ model: 'q4_0', fileBytes: 446e6, kvBytes: 4e5, moeMaxRssBytes: 500e6, llamaMaxRssBytes: 480e6 }],
  notes: ['a note'],
};

test('the Markdown and text reports carry the rows, the RSS bound check and the notes', () => {
  const md = renderMarkdownResults(report);
  assert.match(md, /\| q4_0 \| pp32 \| 2\.00 \(1\.50\) \| 310 \(305\) \| 0\.006x \|/);
  assert.match(md, /\| q4_0 \| tg16 \| 1\.50 \| n\/a \| n\/a \|/);
  assert.match(md, /\| q4_0 \| 446 MB \| 500 MB \| 480 MB \| 746 MB \| yes \|/);
  assert.match(md, /the small setting/);
  assert.match(md, /- a note/);
  assert.match(renderText(report), /moe-ts \(backend ref\) vs llama\.cpp v0, 2 threads, best \(median\) of 2/);
});

test('replaceResults rewrites only the marked section, and appends one when the markers are missing', () => {
  const doc = `# B\n\nintro\n\n${RESULTS_BEGIN}\nold\n${RESULTS_END}\n\ntail\n`;
  const out = replaceResults(doc, 'new');
  assert.equal(out, `# B\n\nintro\n\n${RESULTS_BEGIN}\nnew\n${RESULTS_END}\n\ntail\n`);
  assert.equal(replaceResults(out, 'new'), out);
  assert.equal(replaceResults('# B\n', 'x'), `# B\n\n${RESULTS_BEGIN}\nx\n${RESULTS_END}\n`);
});
