// The arithmetic and the report of `npm run bench` (scripts/bench.mjs runs the processes; this file turns their
// timings into the table): summaries of repeated runs, the share of the machine's physical limit each figure
// reaches, the parsing of llama-bench's JSON, and the text / Markdown tables.

import type { MixtralConfig } from '../model/config.js';

/** Best and median of repeated tokens/s figures (best = highest). */
export interface Summary {
  best: number;
  median: number;
  n: number;
}

export function summarize(values: readonly number[]): Summary | null {
  const v = values.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return null;
  const mid = v.length >> 1;
  const median = v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
  return { best: v[v.length - 1], median, n: v.length };
}

/** Per-token costs of a model file (scripts/bench-models.mjs perTokenCosts computes them from the tensor list). */
export interface PerTokenCosts {
  /** Bytes of weights one generated token reads (k of E experts, one embedding row, the whole head). */
  weightBytesPerToken: number;
  /** K and V bytes of one cached position over all layers. */
  kvBytesPerKey: number;
  /** Weights one prompt token multiplies (attention, router, k experts; not the head, not the embedding). */
  matmulParamsPerToken: number;
  /** Parameters of the output head (computed once per prompt, for its last token). */
  headParams: number;
  /** Attention flops per visible key per token (scores and weighted V sum, all layers). */
  attnFlopsPerKey: number;
}

/** One tensor of a model file, as the bench's model sidecar lists them. */
export interface TensorEntry {
  name: string;
  shape: readonly number[];
  /** Bytes in the file (the dtype's size). */
  bytes: number;
}

/**
 * Bytes read and multiply-adds done per token, from a GGUF-named tensor list:
 *  - weightBytesPerToken: what one generated token reads: every attention matrix, norm and router, k of the E
 *    experts (in the file's dtype), one embedding row, the whole output head;
 *  - kvBytesPerKey: K and V of one position over all layers (f16 cache, llama.cpp's default);
 *  - matmulParamsPerToken: weights one token multiplies in a long prompt (attention, router, k experts); the head
 *    (headParams) is computed for a prompt's last token only, and the embedding is a row lookup;
 *  - attnFlopsPerKey: attention flops per visible key per token.
 */
export function perTokenCosts(tensors: readonly TensorEntry[], c: MixtralConfig): PerTokenCosts {
  let weightBytes = 0;
  let matmulParams = 0;
  let headParams = 0;
  const kOfE = c.numExpertsPerTok / c.numLocalExperts;
  for (const t of tensors) {
    const numel = t.shape.reduce((a, b) => a * b, 1);
    if (t.name === 'token_embd.weight') {
      weightBytes += t.bytes / c.vocabSize;
      if (c.tieWordEmbeddings) {
        // A tied head is the embedding matrix, read whole.
        weightBytes += t.bytes - t.bytes / c.vocabSize;
        headParams = numel;
      }
    } else if (/_exps\.weight$/.test(t.name)) {
      weightBytes += t.bytes * kOfE;
      matmulParams += numel * kOfE;
    } else {
      weightBytes += t.bytes;
      if (t.name === 'output.weight') headParams = numel;
      else if (t.shape.length === 2) matmulParams += numel;
    }
  }
  return {
    weightBytesPerToken: weightBytes,
    kvBytesPerKey: c.numHiddenLayers * 2 * c.numKeyValueHeads * c.headDim * 2,
    matmulParamsPerToken: matmulParams,
    headParams,
    // Scores (q.k) and the weighted sum of V: 2 + 2 flops per head dimension per key per layer.
    attnFlopsPerKey: c.numHiddenLayers * 4 * c.numAttentionHeads * c.headDim,
  };
}

/**
 * Bytes read per generated token when generating `nGen` tokens from an empty context (llama-bench's tg test):
 * the weights, plus the KV cache, which holds on average (nGen + 1) / 2 positions.
 */
export function generationBytesPerToken(c: PerTokenCosts, nGen: number): number {
  return c.weightBytesPerToken + c.kvBytesPerKey * ((nGen + 1) / 2);
}

/**
 * Flops per prompt token for an `nPrompt`-token prompt (llama-bench's pp test): 2 per multiply-add of the weights,
 * attention over on average (nPrompt + 1) / 2 keys, and the head once per prompt.
 */
export function promptFlopsPerToken(c: PerTokenCosts, nPrompt: number): number {
  return 2 * c.matmulParamsPerToken + c.attnFlopsPerKey * ((nPrompt + 1) / 2) + (2 * c.headParams) / nPrompt;
}

/** Fraction of a limit reached: tokens/s x cost per token / limit per second. */
export function shareOfLimit(tokensPerSecond: number, costPerToken: number, limitPerSecond: number): number {
  return (tokensPerSecond * costPerToken) / limitPerSecond;
}

/** One test result from llama-bench's `-o json` output. */
export interface LlamaBenchResult {
  nPrompt: number;
  nGen: number;
  nThreads: number;
  avgTs: number;
  samplesTs: number[];
  buildCommit: string;
  buildNumber: number | null;
  cpuInfo: string;
  modelType: string;
  modelSize: number;
  typeK: string;
}

/** Parses llama-bench's `-o json` stdout (an array of test objects). Throws with the text's start on bad input. */
export function parseLlamaBenchJson(text: string): LlamaBenchResult[] {
  const start = text.indexOf('[');
  const end = text.lastIndexOf(']');
  let data: unknown;
  try {
    if (start < 0 || end < start) throw new Error('no JSON array');
    data = JSON.parse(text.slice(start, end + 1));
  } catch (e) {
    throw new Error(`llama-bench output is not its JSON array (${(e as Error).message}): ${text.slice(0, 300)}`);
  }
  if (!Array.isArray(data)) throw new Error('llama-bench output is not an array');
  return data.map((o: Record<string, unknown>, i) => {
    const num = (k: string): number => {
      const v = o[k];
      if (typeof v !== 'number' || !Number.isFinite(v)) throw new Error(`llama-bench result ${i}: field ${k} is not a number`);
      return v;
    };
    const samples = Array.isArray(o.samples_ts) ? o.samples_ts.filter((x): x is number => typeof x === 'number') : [];
    return {
      nPrompt: num('n_prompt'),
      nGen: num('n_gen'),
      nThreads: num('n_threads'),
      avgTs: num('avg_ts'),
      samplesTs: samples.length ? samples : [num('avg_ts')],
      buildCommit: String(o.build_commit ?? ''),
      buildNumber: typeof o.build_number === 'number' ? o.build_number : null,
      cpuInfo: String(o.cpu_info ?? ''),
      modelType: String(o.model_type ?? ''),
      modelSize: typeof o.model_size === 'number' ? o.model_size : 0,
      typeK: String(o.type_k ?? ''),
    };
  });
}

export interface BenchRow {
  model: string;
  test: 'pp' | 'tg';
  tokens: number;
  moe: Summary | null;
  llama: Summary | null;
  /** Best over best. */
  ratio: number | null;
  /**
   * moe-ts / llama.cpp within each repetition (the two runs of a repetition are adjacent in time, so they saw the
   * same machine state; on a shared machine whose memory bandwidth drifts between runs this is the steadier figure):
   * median, lowest and highest. Null without two runs in at least one repetition.
   */
  paired: { median: number; min: number; max: number; n: number } | null;
  moeShare: number | null;
  llamaShare: number | null;
}

export interface RssRow {
  model: string;
  fileBytes: number;
  kvBytes: number;
  moeMaxRssBytes: number | null;
  llamaMaxRssBytes: number | null;
}

/** The issue's bound on moe-ts's peak RSS: file + KV cache + 300 MB. */
export function rssBound(r: RssRow): number {
  return r.fileBytes + r.kvBytes + 300e6;
}

export interface BenchLimit {
  threads: number;
  value: number;
  source: string;
}

export interface BenchReport {
  date: string;
  machine: { cpu: string; cpuFeatures: string[]; cores: number; ramBytes: number; node: string; os: string };
  setting: {
    backend: string;
    threads: number;
    nPrompt: number;
    nGen: number;
    reps: number;
    small: boolean;
    llama: string;
  };
  limits: { bandwidthGBs: BenchLimit[]; fmaGflops: BenchLimit[] };
  rows: BenchRow[];
  rss: RssRow[];
  notes: string[];
}

/** Per-repetition ratios a[i] / b[i] (index = repetition; non-finite entries are runs that gave no figure). */
export function pairedRatios(a: readonly number[], b: readonly number[]): BenchRow['paired'] {
  const r: number[] = [];
  for (let i = 0; i < Math.min(a.length, b.length); i++) if (Number.isFinite(a[i]) && Number.isFinite(b[i]) && b[i] > 0) r.push(a[i] / b[i]);
  const s = summarize(r);
  return s ? { median: s.median, min: Math.min(...r), max: s.best, n: s.n } : null;
}

/** Builds a row from repeated figures (index = repetition) and the two shares' denominators. */
export function makeRow(
  model: string,
  test: 'pp' | 'tg',
  tokens: number,
  moeTs: readonly number[],
  llamaTs: readonly number[],
  costPerToken: number,
  limitPerSecond: number,
): BenchRow {
  const moe = summarize(moeTs);
  const llama = summarize(llamaTs);
  return {
    model,
    test,
    tokens,
    moe,
    llama,
    ratio: moe && llama ? moe.best / llama.best : null,
    paired: pairedRatios(moeTs, llamaTs),
    moeShare: moe ? shareOfLimit(moe.best, costPerToken, limitPerSecond) : null,
    llamaShare: llama ? shareOfLimit(llama.best, costPerToken, limitPerSecond) : null,
  };
}

const fmtTs = (s: Summary | null): string => {
  if (!s) return 'n/a';
  const f = (x: number) => (x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2));
  return s.n > 1 ? `${f(s.best)} (${f(s.median)})` : f(s.best);
};
const fmtPct = (x: number | null): string => (x === null ? 'n/a' : `${(x * 100).toFixed(x < 0.1 ? 1 : 0)}%`);
const fmtRatio = (x: number | null): string => (x === null ? 'n/a' : `${x.toFixed(x < 0.1 ? 3 : 2)}x`);
const fmtPaired = (p: BenchRow['paired']): string =>
  p === null ? 'n/a' : p.n > 1 ? `${fmtRatio(p.median)} (${p.min.toFixed(2)}-${p.max.toFixed(2)})` : fmtRatio(p.median);
const fmtMB = (x: number | null): string => (x === null ? 'n/a' : `${Math.round(x / 1e6)} MB`);

function tableLines(header: string[], rows: string[][]): string[] {
  return [`| ${header.join(' | ')} |`, `|${header.map(() => '---').join('|')}|`, ...rows.map((r) => `| ${r.join(' | ')} |`)];
}

export function resultTable(rows: readonly BenchRow[]): string[] {
  return tableLines(
    ['model', 'test', 'moe-ts tok/s best (median)', 'llama.cpp tok/s best (median)', 'moe-ts / llama.cpp (best / best)', 'per repetition: median (range)', 'moe-ts share of limit', 'llama.cpp share of limit'],
    rows.map((r) => [r.model, `${r.test}${r.tokens}`, fmtTs(r.moe), fmtTs(r.llama), fmtRatio(r.ratio), fmtPaired(r.paired), fmtPct(r.moeShare), fmtPct(r.llamaShare)]),
  );
}

export function rssTable(rows: readonly RssRow[]): string[] {
  return tableLines(
    ['model', 'file', 'moe-ts peak RSS', 'llama.cpp peak RSS', 'bound (file + KV + 300 MB)', 'moe-ts within bound'],
    rows.map((r) => [
      r.model,
      fmtMB(r.fileBytes),
      fmtMB(r.moeMaxRssBytes),
      fmtMB(r.llamaMaxRssBytes),
      fmtMB(rssBound(r)),
      r.moeMaxRssBytes === null ? 'n/a' : r.moeMaxRssBytes <= rssBound(r) ? 'yes' : 'no',
    ]),
  );
}

function limitText(l: readonly BenchLimit[], unit: string): string {
  return l.map((x) => `${x.value.toFixed(1)} ${unit} with ${x.threads} thread${x.threads > 1 ? 's' : ''} (${x.source})`).join('; ');
}

/** The tables as printed to the terminal. */
export function renderText(r: BenchReport): string {
  return [
    `moe-ts (backend ${r.setting.backend}) vs llama.cpp ${r.setting.llama}, ${r.setting.threads} threads, best (median) of ${r.setting.reps}`,
    ...resultTable(r.rows),
    '',
    ...rssTable(r.rss),
    '',
    `limits: read bandwidth ${limitText(r.limits.bandwidthGBs, 'GB/s')}; FP32 FMA ${limitText(r.limits.fmaGflops, 'GFLOP/s')}`,
    ...r.notes.map((n) => `note: ${n}`),
  ].join('\n');
}

/** The results section of docs/benchmarks.md (between the markers). */
export function renderMarkdownResults(r: BenchReport): string {
  const m = r.machine;
  const s = r.setting;
  return [
    `Run of ${r.date}.`,
    '',
    `- Machine: ${m.cpu} (${m.cpuFeatures.join(', ') || 'no AVX'}), ${m.cores} cores, ${(m.ramBytes / 2 ** 30).toFixed(1)} GiB RAM, ${m.os}, Node ${m.node}`,
    `- moe-ts backend: **${s.backend}**, ${s.threads} threads; llama.cpp: llama-bench ${s.llama}, ${s.threads} threads`,
    `- Setting: prompt processing of ${s.nPrompt} tokens (pp${s.nPrompt}), generation of ${s.nGen} tokens (tg${s.nGen}), ${s.reps} alternating repetitions${s.small ? ' — **the small setting** (the `ref` backend is far too slow for the full 512 / 128 in minutes)' : ''}`,
    `- Limits measured in the same run: read bandwidth ${limitText(r.limits.bandwidthGBs, 'GB/s')}; FP32 FMA peak ${limitText(r.limits.fmaGflops, 'GFLOP/s')}`,
    '',
    ...resultTable(r.rows),
    '',
    ...rssTable(r.rss),
    '',
    ...r.notes.map((n) => `- ${n}`),
  ].join('\n');
}

export const RESULTS_BEGIN = '<!-- bench:results:begin (written by npm run bench) -->';
export const RESULTS_END = '<!-- bench:results:end -->';

/** Replaces the results between the markers of `doc` (or appends them when the markers are missing). */
export function replaceResults(doc: string, results: string): string {
  const block = `${RESULTS_BEGIN}\n${results}\n${RESULTS_END}`;
  const a = doc.indexOf(RESULTS_BEGIN);
  const b = doc.indexOf(RESULTS_END);
  if (a >= 0 && b > a) return doc.slice(0, a) + block + doc.slice(b + RESULTS_END.length);
  return `${doc.replace(/\s*$/, '')}\n\n${block}\n`;
}
