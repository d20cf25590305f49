// `moe eval --model <m> --data <dir>`: perplexity per language on the validation shards, with the inference model
// (any GGUF or HF checkpoint moe-ts loads), in non-overlapping windows of the model's context (or --ctx).

import { listShards, readShard, CORPUS_LANGUAGES } from './corpus.js';
import type { LoadedModel } from '../model/load.js';
import type { RouterTrace } from '../model/types.js';

export interface LanguageEval {
  lang: string;
  tokens: number;
  /** Mean negative log-likelihood in nats per predicted token. */
  nll: number;
  perplexity: number;
  /**
   * MoE models: the share of token-slots each expert took, per layer ([layer][expert], rows sum to 1), over the
   * evaluated tokens of this language. Absent for dense models.
   */
  load?: number[][];
}

/** Coefficient of variation (std / mean) of each layer's expert shares: 0 is perfectly balanced. */
export function loadCV(load: number[][]): number[] {
  return load.map((row) => {
    const mean = row.reduce((a, b) => a + b, 0) / row.length;
    const v = row.reduce((a, b) => a + (b - mean) ** 2, 0) / row.length;
    return mean > 0 ? Math.sqrt(v) / mean : 0;
  });
}

/** log-softmax of row `r` at `target`, in float64. */
function logProb(logits: Float32Array, vocab: number, r: number, target: number): number {
  const o = r * vocab;
  let max = -Infinity;
  for (let j = 0; j < vocab; j++) max = Math.max(max, logits[o + j]);
  let s = 0;
  for (let j = 0; j < vocab; j++) s += Math.exp(logits[o + j] - max);
  return logits[o + target] - max - Math.log(s);
}

export function evaluatePerplexity(model: LoadedModel, dataDir: string, opts: { window?: number; maxTokens?: number; split?: 'val' | 'train' } = {}): LanguageEval[] {
  const window = Math.min(opts.window ?? 256, model.config.maxPositionEmbeddings);
  const maxTokens = opts.maxTokens ?? 20_000;
  const V = model.config.vocabSize;
  const shards = listShards(dataDir, { split: opts.split ?? 'val' });
  const langs = [...new Set(shards.map((s) => s.lang))].sort((a, b) => (CORPUS_LANGUAGES as readonly string[]).indexOf(a) - (CORPUS_LANGUAGES as readonly string[]).indexOf(b));
  const results: LanguageEval[] = [];
  for (const lang of langs) {
    let nll = 0;
    let count = 0;
    const E = model.config.numLocalExperts;
    const counts = E > 1 ? Array.from({ length: model.config.numHiddenLayers }, () => new Array<number>(E).fill(0)) : null;
    for (const s of shards.filter((x) => x.lang === lang)) {
      if (s.header.vocabSize > V) throw new Error(`${s.file}: token ids up to ${s.header.vocabSize - 1} but the model's vocabulary has ${V}`);
      const ids = readShard(s.file).ids;
      for (let start = 0; start + 1 < ids.length && count < maxTokens; start += window) {
        const chunk = Array.from(ids.subarray(start, Math.min(start + window + 1, ids.length)));
        if (chunk.length < 2) break;
        const trace: RouterTrace[] = [];
        const logits = model.newSession({ contextLength: window + 1 }).forward(chunk.slice(0, -1), { allLogits: true, ...(counts ? { trace } : {}) });
        for (let i = 0; i + 1 < chunk.length && count < maxTokens; i++, count++) {
          nll -= logProb(logits, V, i, chunk[i + 1]);
          if (counts) trace[i].experts.forEach((chosen, l) => chosen.forEach((e) => counts[l][e]++));
        }
      }
    }
    if (count > 0) {
      const load = counts?.map((row) => row.map((c) => c / (row.reduce((a, b) => a + b, 0) || 1)));
      results.push({ lang, tokens: count, nll: nll / count, perplexity: Math.exp(nll / count), ...(load ? { load } : {}) });
    }
  }
  return results;
}

export async function evalCommand(argv: string[]): Promise<void> {
  const { parse, intArg, required } = await import('../cli/args.js');
  const { loadModel } = await import('../model/load.js');
  const { values } = parse(argv, { model: { type: 'string' }, data: { type: 'string' }, window: { type: 'string' }, 'max-tokens': { type: 'string' }, threads: { type: 'string' }, json: { type: 'boolean' } });
  const model = loadModel(required('model', values.model as string | undefined), { threads: intArg('threads', values.threads as string | undefined, 0, 0) });
  const r = evaluatePerplexity(model, required('data', values.data as string | undefined), {
    window: intArg('window', values.window as string | undefined, 256, 2),
    maxTokens: intArg('max-tokens', values['max-tokens'] as string | undefined, 20_000, 1),
  });
  if (values.json) {
    process.stdout.write(JSON.stringify(r) + '\n');
    return;
  }
  const moe = r.some((x) => x.load);
  process.stdout.write(`| language | tokens | nll (nats/token) | perplexity |${moe ? ' expert-load CV per layer |' : ''}\n| --- | --- | --- | --- |${moe ? ' --- |' : ''}\n`);
  for (const x of r) {
    const cv = x.load ? ` ${loadCV(x.load).map((v) => v.toFixed(2)).join(' ')} |` : '';
    process.stdout.write(`| ${x.lang} | ${x.tokens} | ${x.nll.toFixed(4)} | ${x.perplexity.toFixed(2)} |${cv}\n`);
  }
}
