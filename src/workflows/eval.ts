// `moe eval --model <m> --data <dir>`: perplexity per language on the validation shards, with the inference model
// (any GGUF or HF checkpoint moe-ts loads), in non-overlapping windows of the model's context (or --ctx).

import { listShards, readShard, CORPUS_LANGUAGES } from './corpus.js';
import type { LoadedModel } from '../model/load.js';

export interface LanguageEval {
  lang: string;
  tokens: number;
  /** Mean negative log-likelihood in nats per predicted token. */
  nll: number;
  perplexity: number;
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
    for (const s of shards.filter((x) => x.lang === lang)) {
      if (s.header.vocabSize > V) throw new Error(`${s.file}: token ids up to ${s.header.vocabSize - 1} but the model's vocabulary has ${V}`);
      const ids = readShard(s.file).ids;
      for (let start = 0; start + 1 < ids.length && count < maxTokens; start += window) {
        const chunk = Array.from(ids.subarray(start, Math.min(start + window + 1, ids.length)));
        if (chunk.length < 2) break;
        const logits = model.newSession({ contextLength: window + 1 }).forward(chunk.slice(0, -1), { allLogits: true });
        for (let i = 0; i + 1 < chunk.length && count < maxTokens; i++, count++) nll -= logProb(logits, V, i, chunk[i + 1]);
      }
    }
    if (count > 0) results.push({ lang, tokens: count, nll: nll / count, perplexity: Math.exp(nll / count) });
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
  process.stdout.write('| language | tokens | nll (nats/token) | perplexity |\n| --- | --- | --- | --- |\n');
  for (const x of r) process.stdout.write(`| ${x.lang} | ${x.tokens} | ${x.nll.toFixed(4)} | ${x.perplexity.toFixed(2)} |\n`);
}
