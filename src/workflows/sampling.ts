/**
 * Token sampling: a seeded PRNG and a Sampler that turns one row of logits into a token id.
 *
 * The chain runs in llama.cpp's default order (common/sampling.cpp):
 *   repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.
 * Consequence of that order (as in llama.cpp, unlike Hugging Face, which applies temperature first): top-p and
 * min-p judge the probabilities at temperature 1; temperature only reshapes what they kept.
 * temperature 0 is greedy: argmax of the penalised logits (ties go to the lowest id); the other filters cannot
 * change the argmax, so they are skipped.
 */
import { getRandomValues } from 'node:crypto';
import { Rng } from '../util/rng.js';

export { Rng };
/** @deprecated the old name of Rng (src/util/rng.ts). */
export { Rng as Xoshiro128ss };

/** A random seed in [0, 2^53) from the OS's cryptographic source. */
export function randomSeed(): number {
  const w = getRandomValues(new Uint32Array(2));
  return (w[0]! & 0x1fffff) * 0x100000000 + w[1]!;
}

// top-p buckets: 1/16 nat wide over the 32 nats below the max logit; everything further down shares the last one.
const TOPP_BINS_PER_NAT = 16;
const TOPP_BINS = 32 * TOPP_BINS_PER_NAT;

export interface SamplerOptions {
  /** 0 = greedy (argmax). Default 0.8 (llama.cpp's default). */
  temperature?: number;
  /** Keep the k most likely tokens; 0 = off. Default 40 (llama.cpp). */
  topK?: number;
  /** Keep the smallest most-likely set whose probability mass is >= p; 1 = off. Default 0.95 (llama.cpp). */
  topP?: number;
  /** Drop tokens whose probability is below minP * (the top token's probability); 0 = off. Default 0.05 (llama.cpp). */
  minP?: number;
  /** llama.cpp / HF repetition penalty: positive logits are divided by it, negative ones multiplied; 1 = off. Default 1. */
  repetitionPenalty?: number;
  /** How many of the most recent tokens the penalty looks at; -1 = all of the history, 0 = none. Default 64. */
  repeatLastN?: number;
  /** PRNG seed, an integer in [0, 2^53); default: a random one from crypto (readable afterwards as `sampler.seed`). */
  seed?: number;
}

/** Defaults follow llama.cpp's common_params_sampling. */
export const DEFAULT_SAMPLER_OPTIONS: Readonly<Required<Omit<SamplerOptions, 'seed'>>> = Object.freeze({
  temperature: 0.8,
  topK: 40,
  topP: 0.95,
  minP: 0.05,
  repetitionPenalty: 1,
  repeatLastN: 64,
});

/** The tokens left after the filters, most likely first when a filter sorted them, and their final probabilities. */
export interface Candidates {
  ids: Int32Array;
  probs: Float64Array;
}

export class Sampler {
  readonly temperature: number;
  readonly topK: number;
  readonly topP: number;
  readonly minP: number;
  readonly repetitionPenalty: number;
  readonly repeatLastN: number;
  readonly seed: number;
  private readonly rng: Rng;
  // Scratch buffers reused across calls (one decode step must not allocate vocab-sized arrays).
  private work = new Float32Array(0);
  private ids = new Int32Array(0);
  private tmp = new Int32Array(0);
  private weights = new Float64Array(0);
  private readonly binMass = new Float64Array(TOPP_BINS);

  constructor(opts: SamplerOptions = {}) {
    const o = { ...DEFAULT_SAMPLER_OPTIONS, ...definedOnly(opts) };
    if (!(Number.isFinite(o.temperature) && o.temperature >= 0)) throw new RangeError(`temperature must be a finite number >= 0, got ${o.temperature}`);
    if (!(Number.isInteger(o.topK) && o.topK >= 0)) throw new RangeError(`topK must be an integer >= 0, got ${o.topK}`);
    if (!(o.topP > 0 && o.topP <= 1)) throw new RangeError(`topP must be in (0, 1], got ${o.topP}`);
    if (!(o.minP >= 0 && o.minP <= 1)) throw new RangeError(`minP must be in [0, 1], got ${o.minP}`);
    if (!(Number.isFinite(o.repetitionPenalty) && o.repetitionPenalty > 0)) throw new RangeError(`repetitionPenalty must be a finite number > 0, got ${o.repetitionPenalty}`);
    if (!(Number.isInteger(o.repeatLastN) && o.repeatLastN >= -1)) throw new RangeError(`repeatLastN must be an integer >= -1, got ${o.repeatLastN}`);
    this.temperature = o.temperature;
    this.topK = o.topK;
    this.topP = o.topP;
    this.minP = o.minP;
    this.repetitionPenalty = o.repetitionPenalty;
    this.repeatLastN = o.repeatLastN;
    this.seed = opts.seed ?? randomSeed();
    this.rng = new Rng(this.seed);
  }

  /**
   * Picks the next token. `history` is the sequence so far (prompt and generated tokens, oldest first); only its
   * last `repeatLastN` entries matter, and only for the repetition penalty. `logits` is not modified.
   */
  sample(logits: Float32Array, history: readonly number[] = []): number {
    const count = this.filter(logits, history);
    const ids = this.ids;
    if (count === 1) return ids[0]!;
    const w = this.weights;
    let total = 0;
    for (let i = 0; i < count; i++) total += w[i]!;
    // Inverse CDF over the unnormalised weights; the fallback covers r landing on total through rounding.
    const r = this.rng.nextFloat() * total;
    let acc = 0;
    for (let i = 0; i < count; i++) {
      acc += w[i]!;
      if (r < acc) return ids[i]!;
    }
    for (let i = count - 1; i >= 0; i--) if (w[i]! > 0) return ids[i]!;
    return ids[0]!;
  }

  /** The candidates `sample` would draw from, with normalised probabilities (for tests, logprobs, inspection). */
  candidates(logits: Float32Array, history: readonly number[] = []): Candidates {
    const count = this.filter(logits, history);
    const ids = this.ids.slice(0, count);
    const probs = new Float64Array(count);
    let total = 0;
    for (let i = 0; i < count; i++) total += this.weights[i]!;
    for (let i = 0; i < count; i++) probs[i] = this.weights[i]! / total;
    return { ids, probs };
  }

  /** Runs the chain; leaves the kept ids in this.ids[0..count) and their unnormalised weights in this.weights. */
  private filter(logits: Float32Array, history: readonly number[]): number {
    const n = logits.length;
    if (n === 0) throw new RangeError('cannot sample from an empty logits row');
    if (this.work.length !== n) {
      this.work = new Float32Array(n);
      this.ids = new Int32Array(n);
      this.tmp = new Int32Array(n);
      this.weights = new Float64Array(n);
    }
    const v = this.work;
    v.set(logits);
    for (let i = 0; i < n; i++) if (Number.isNaN(v[i]!)) throw new RangeError(`logits[${i}] is NaN`);

    this.applyPenalty(v, history);
    const ids = this.ids;
    const w = this.weights;

    if (this.temperature === 0) {
      let best = 0;
      for (let i = 1; i < n; i++) if (v[i]! > v[best]!) best = i;
      checkMax(v[best]!);
      ids[0] = best;
      w[0] = 1;
      return 1;
    }

    // top-k: a bounded heap keeps this O(n log k) instead of sorting the vocabulary.
    let count: number;
    let sorted = false;
    if (this.topK > 0 && this.topK < n) {
      count = selectTop(v, null, n, this.topK, ids);
      sorted = true;
    } else {
      for (let i = 0; i < n; i++) ids[i] = i;
      count = n;
    }
    let maxL = -Infinity;
    if (sorted) maxL = v[ids[0]!]!;
    else for (let i = 0; i < count; i++) if (v[ids[i]!]! > maxL) maxL = v[ids[i]!]!;
    checkMax(maxL);

    // top-p and min-p both keep a most-likely prefix of the same ranking, so applying them in llama.cpp's order
    // (top-p, then min-p) keeps the shorter of the two prefixes, whichever runs first. Running min-p first is O(n)
    // and leaves top-p fewer tokens; top-p's mass is still measured against every candidate that top-k left.
    let sum = 0;
    const topP = this.topP < 1 && count > 1;
    if (topP) for (let i = 0; i < count; i++) sum += Math.exp(v[ids[i]!]! - maxL);

    // min-p: p_i >= minP * p_max  <=>  logit_i >= maxLogit + log(minP). The top token always survives.
    if (this.minP > 0 && count > 1) {
      const threshold = maxL + Math.log(this.minP);
      let kept = 0;
      for (let i = 0; i < count; i++) {
        const id = ids[i]!;
        if (v[id]! >= threshold) ids[kept++] = id;
      }
      count = kept;
    }

    // top-p at temperature 1 (llama.cpp: cut at the first prefix whose mass reaches p, keep at least one).
    if (topP && count > 1) {
      const target = this.topP * sum;
      if (sorted) {
        let cum = 0;
        for (let i = 0; i < count; i++) {
          cum += Math.exp(v[ids[i]!]! - maxL);
          if (cum >= target) {
            count = i + 1;
            break;
          }
        }
      } else {
        count = this.topPUnsorted(v, count, maxL, target);
      }
    }

    const invT = 1 / this.temperature;
    for (let i = 0; i < count; i++) w[i] = Math.exp((v[ids[i]!]! - maxL) * invT);
    return count;
  }

  /**
   * top-p without sorting the vocabulary: bucket the candidates by logit distance from the max, find the bucket
   * where the running mass reaches the target, and sort only that bucket to place the exact cut. Leaves the kept
   * ids (in no particular order) in this.ids[0..return).
   */
  private topPUnsorted(v: Float32Array, count: number, maxL: number, target: number): number {
    const ids = this.ids;
    const tmp = this.tmp;
    const mass = this.binMass;
    mass.fill(0);
    const bin = (x: number) => {
      const d = maxL - x;
      return d < TOPP_BINS / TOPP_BINS_PER_NAT ? Math.floor(d * TOPP_BINS_PER_NAT) : TOPP_BINS - 1;
    };
    for (let i = 0; i < count; i++) {
      const x = v[ids[i]!]!;
      mass[bin(x)] += Math.exp(x - maxL);
    }
    let cum = 0;
    let cutBin = -1;
    for (let b = 0; b < TOPP_BINS; b++) {
      if (cum + mass[b]! >= target) {
        cutBin = b;
        break;
      }
      cum += mass[b]!;
    }
    if (cutBin < 0) return count; // rounding kept the total just under p: keep everything
    // Bins above the cut are all kept; the cut bin's tokens go to tmp to be ranked. (k <= i: in place is safe.)
    let k = 0;
    let m = 0;
    for (let i = 0; i < count; i++) {
      const id = ids[i]!;
      const b = bin(v[id]!);
      if (b < cutBin) ids[k++] = id;
      else if (b === cutBin) tmp[m++] = id;
    }
    const edge = tmp.subarray(0, m).sort((a, b) => (v[b]! - v[a]!) || (a - b));
    for (let j = 0; j < m; j++) {
      ids[k++] = edge[j]!;
      cum += Math.exp(v[edge[j]!]! - maxL);
      if (cum >= target) break;
    }
    return k;
  }

  private applyPenalty(v: Float32Array, history: readonly number[]): void {
    const p = this.repetitionPenalty;
    if (p === 1 || this.repeatLastN === 0 || history.length === 0) return;
    const start = this.repeatLastN < 0 ? 0 : Math.max(0, history.length - this.repeatLastN);
    // Each distinct recent token is penalised once, however often it occurred (llama.cpp and HF agree).
    const seen = new Set<number>();
    for (let i = start; i < history.length; i++) {
      const id = history[i]!;
      if (seen.has(id) || !(id >= 0 && id < v.length)) continue;
      seen.add(id);
      const x = v[id]!;
      v[id] = x <= 0 ? x * p : x / p;
    }
  }
}

function checkMax(maxL: number): void {
  if (maxL === -Infinity) throw new RangeError('every logit is -Infinity: nothing to sample');
  if (maxL === Infinity) throw new RangeError('a logit is +Infinity');
}

function definedOnly<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, x]) => x !== undefined)) as Partial<T>;
}

/**
 * Writes the k best candidates to out[0..k), best first; ties go to the lower id. Candidates are cand[0..count)
 * or, when cand is null, 0..count-1. A min-heap of size k holds the best seen so far, worst at the root.
 */
export function selectTop(v: Float32Array, cand: Int32Array | null, count: number, k: number, out: Int32Array): number {
  k = Math.min(k, count);
  if (k <= 0) return 0;
  // a is worse than b
  const worse = (a: number, b: number) => v[a]! < v[b]! || (v[a]! === v[b]! && a > b);
  const siftDown = (i: number) => {
    const x = out[i]!;
    for (;;) {
      let c = 2 * i + 1;
      if (c >= k) break;
      if (c + 1 < k && worse(out[c + 1]!, out[c]!)) c++;
      if (!worse(out[c]!, x)) break;
      out[i] = out[c]!;
      i = c;
    }
    out[i] = x;
  };
  for (let i = 0; i < k; i++) out[i] = cand ? cand[i]! : i;
  for (let i = (k >> 1) - 1; i >= 0; i--) siftDown(i);
  for (let j = k; j < count; j++) {
    const id = cand ? cand[j]! : j;
    if (worse(out[0]!, id)) {
      out[0] = id;
      siftDown(0);
    }
  }
  out.subarray(0, k).sort((a, b) => (v[b]! - v[a]!) || (a - b));
  return k;
}
