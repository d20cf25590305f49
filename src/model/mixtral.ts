// The Mixtral forward pass. Module names mirror the Hugging Face checkpoint (model.layers.N.self_attn.q_proj ...),
// as MLX-LM and transformers name them; tensors keep their file dtype. q/k rows are in GGUF (ggml) RoPE order: the
// loader permutes Hugging Face checkpoints on the way in, so one RoPE convention serves both formats.

import type { Backend, KvCache } from '../backend/backend.js';
import type { Tensor } from '../tensor/tensor.js';
import { dequantizeRow } from '../tensor/quant.js';
import type { MixtralConfig } from './config.js';
import { ContextOverflowError, type InferenceSession, type RouterTrace } from './types.js';

const fr = Math.fround;

export interface MixtralAttention {
  q_proj: Tensor; // [heads*hd, dim], rows in GGUF RoPE order
  k_proj: Tensor; // [kvHeads*hd, dim], rows in GGUF RoPE order
  v_proj: Tensor; // [kvHeads*hd, dim]
  o_proj: Tensor; // [dim, heads*hd]
}

export interface MixtralSparseMoe {
  /** Router, [E, dim]; null for a dense layer (one expert, always chosen with weight 1). */
  gate: Tensor | null;
  /** Stacked experts: w1 (gate) and w3 (up) [E, ffn, dim], w2 (down) [E, dim, ffn]. */
  experts: { w1: Tensor; w2: Tensor; w3: Tensor };
}

export interface MixtralDecoderLayer {
  input_layernorm: Float32Array;
  self_attn: MixtralAttention;
  post_attention_layernorm: Float32Array;
  block_sparse_moe: MixtralSparseMoe;
}

export interface MixtralWeights {
  embed_tokens: Tensor; // [vocab, dim]
  layers: MixtralDecoderLayer[];
  norm: Float32Array; // [dim]
  lm_head: Tensor; // [vocab, dim]; the embedding itself when tied
}

export interface MixtralSessionOptions {
  contextLength?: number;
  /** Store K/V in f16 (llama.cpp's default) instead of f32. */
  kvF16?: boolean;
}

/**
 * One layer's KV cache, grown on demand up to the context length (so a 32k context costs nothing until used): f32,
 * or f16 bits (llama.cpp's default cache type: half the memory, and what its logits are computed with).
 */
class LayerCache {
  k: KvCache;
  v: KvCache;
  constructor(
    readonly rowSize: number,
    readonly f16: boolean,
  ) {
    this.k = this.alloc(0);
    this.v = this.alloc(0);
  }
  private alloc(n: number): KvCache {
    return this.f16 ? new Uint16Array(n) : new Float32Array(n);
  }
  ensure(rows: number): void {
    if (this.k.length >= rows * this.rowSize) return;
    const cap = Math.max(rows, 2 * (this.k.length / this.rowSize), 64);
    const k = this.alloc(cap * this.rowSize);
    const v = this.alloc(cap * this.rowSize);
    k.set(this.k);
    v.set(this.v);
    this.k = k;
    this.v = v;
  }
  /** Stores the keys and values of positions start.. (rows of rowSize), converted to the cache's type. */
  store(be: Backend, start: number, kRows: Float32Array, vRows: Float32Array): void {
    const at = start * this.rowSize;
    if (this.k instanceof Uint16Array && this.v instanceof Uint16Array) {
      be.toF16(this.k.subarray(at, at + kRows.length), kRows);
      be.toF16(this.v.subarray(at, at + vRows.length), vRows);
    } else {
      this.k.set(kRows, at);
      this.v.set(vRows, at);
    }
  }
}

/** Passes of at most this many rows (decode steps, small batches) reuse the model's buffers instead of allocating. */
const REUSE_ROWS = 64;

/** forwardBatch's activation buffers, for up to `rows` rows. */
class ForwardBuffers {
  readonly x: Float32Array;
  readonly xn: Float32Array;
  readonly q: Float32Array;
  readonly kNew: Float32Array;
  readonly vNew: Float32Array;
  readonly attn: Float32Array;
  readonly proj: Float32Array;
  readonly routerLogits: Float32Array;
  readonly chosen: Int32Array;
  readonly chosenW: Float32Array;
  constructor(
    private readonly c: MixtralConfig,
    readonly rows: number,
  ) {
    const qDim = c.numAttentionHeads * c.headDim, kvDim = c.numKeyValueHeads * c.headDim;
    this.x = new Float32Array(rows * c.hiddenSize);
    this.xn = new Float32Array(rows * c.hiddenSize);
    this.q = new Float32Array(rows * qDim);
    this.kNew = new Float32Array(rows * kvDim);
    this.vNew = new Float32Array(rows * kvDim);
    this.attn = new Float32Array(rows * qDim);
    this.proj = new Float32Array(rows * c.hiddenSize);
    this.routerLogits = new Float32Array(rows * c.numLocalExperts);
    this.chosen = new Int32Array(rows * c.numExpertsPerTok);
    this.chosenW = new Float32Array(rows * c.numExpertsPerTok);
  }

  /** The first n rows of every buffer. */
  view(n: number): Omit<ForwardBuffers, 'view' | 'rows'> {
    const c = this.c, dim = c.hiddenSize, qDim = c.numAttentionHeads * c.headDim, kvDim = c.numKeyValueHeads * c.headDim;
    if (n === this.rows) return this;
    return {
      x: this.x.subarray(0, n * dim),
      xn: this.xn.subarray(0, n * dim),
      q: this.q.subarray(0, n * qDim),
      kNew: this.kNew.subarray(0, n * kvDim),
      vNew: this.vNew.subarray(0, n * kvDim),
      attn: this.attn.subarray(0, n * qDim),
      proj: this.proj.subarray(0, n * dim),
      routerLogits: this.routerLogits.subarray(0, n * c.numLocalExperts),
      chosen: this.chosen.subarray(0, n * c.numExpertsPerTok),
      chosenW: this.chosenW.subarray(0, n * c.numExpertsPerTok),
    };
  }
}

export class MixtralModel {
  /** Buffers kept for small passes (a decode step allocates nothing but its logits); grown up to REUSE_ROWS rows. */
  private buffers: ForwardBuffers | null = null;
  private prepared = false;

  constructor(
    readonly config: MixtralConfig,
    readonly weights: MixtralWeights,
    readonly backend: Backend,
  ) {}

  /** Hands every weight matrix to the backend to ready once (Backend.prepareWeights); forwardBatch's first call does. */
  prepare(): void {
    if (this.prepared) return;
    const w = this.weights;
    const ws = w.layers.flatMap((l) => {
      const { q_proj, k_proj, v_proj, o_proj } = l.self_attn, moe = l.block_sparse_moe;
      return [q_proj, k_proj, v_proj, o_proj, ...(moe.gate ? [moe.gate] : []), moe.experts.w1, moe.experts.w3, moe.experts.w2];
    });
    this.backend.prepareWeights([...ws, w.lm_head]);
    this.prepared = true;
  }

  /** Activation buffers for a pass of n rows (forwardBatch is synchronous, so one set serves every pass). */
  forwardBuffers(n: number): Omit<ForwardBuffers, 'view' | 'rows'> {
    if (n > REUSE_ROWS) return new ForwardBuffers(this.config, n);
    if (!this.buffers || this.buffers.rows < n) this.buffers = new ForwardBuffers(this.config, n);
    return this.buffers.view(n);
  }

  newSession(opts: MixtralSessionOptions = {}): MixtralSession {
    const ctx = opts.contextLength ?? this.config.maxPositionEmbeddings;
    if (!(Number.isInteger(ctx) && ctx > 0)) throw new Error(`context length must be a positive integer, got ${ctx}`);
    return new MixtralSession(this, ctx, opts.kvF16 ?? false);
  }
}

export class MixtralSession implements InferenceSession {
  private pos = 0;
  private readonly caches: LayerCache[];

  constructor(
    readonly model: MixtralModel,
    readonly contextLength: number,
    readonly kvF16: boolean,
  ) {
    const c = model.config;
    this.caches = Array.from({ length: c.numHiddenLayers }, () => new LayerCache(c.numKeyValueHeads * c.headDim, kvF16));
  }

  get position(): number {
    return this.pos;
  }

  truncate(position: number): void {
    if (!(Number.isInteger(position) && position >= 0 && position <= this.pos)) throw new Error(`truncate: position ${position} outside 0..${this.pos}`);
    this.pos = position;
  }

  forward(tokens: readonly number[], opts: { allLogits?: boolean; trace?: RouterTrace[] } = {}): Float32Array {
    return forwardBatch(this.model, [{ session: this, tokens, ...opts }])[0];
  }

  /** Advances the cached length after a forward pass (forwardBatch's bookkeeping). */
  advance(n: number): void {
    this.pos += n;
  }

  /** Layer l's KV cache, grown to hold `rows` positions. */
  cache(l: number, rows: number): LayerCache {
    this.caches[l].ensure(rows);
    return this.caches[l];
  }
}

/** One sequence's part of a batched forward pass. */
export interface BatchItem {
  session: MixtralSession;
  tokens: readonly number[];
  /** Logits for every token of this item (else the last only). */
  allLogits?: boolean;
  /** Receives the router's choices for each token. */
  trace?: RouterTrace[];
}

/**
 * Runs several sequences through the model in one pass: their tokens are stacked as rows, so every matmul (and the
 * grouped expert GEMM, where tokens of different sequences share expert weight reads) runs once over all of them;
 * only attention is per sequence, over its own KV cache. Returns each item's logits as Session.forward does.
 * All checks happen before any state changes, so a bad item leaves every session as it was.
 */
export function forwardBatch(model: MixtralModel, items: readonly BatchItem[]): Float32Array[] {
  const { config: c, weights: w, backend: be } = model;
  if (items.length === 0) return [];
  const seen = new Set<MixtralSession>();
  for (const it of items) {
    const n = it.tokens.length;
    if (n === 0) throw new Error('forward: no tokens');
    if (it.session.model !== model) throw new Error('forward: a session of another model');
    if (seen.has(it.session)) throw new Error('forward: the same session twice in one batch');
    seen.add(it.session);
    if (it.session.position + n > it.session.contextLength) throw new ContextOverflowError(it.session.position + n, it.session.contextLength);
    for (const t of it.tokens) {
      if (!(Number.isInteger(t) && t >= 0 && t < c.vocabSize)) throw new Error(`token id ${t} outside the vocabulary (0..${c.vocabSize - 1})`);
    }
  }
  model.prepare();
  const dim = c.hiddenSize;
  const hd = c.headDim;
  const qDim = c.numAttentionHeads * hd;
  const kvDim = c.numKeyValueHeads * hd;
  const k = c.numExpertsPerTok;
  const rowStart: number[] = [];
  let n = 0;
  for (const it of items) {
    rowStart.push(n);
    n += it.tokens.length;
  }
  const positions = new Int32Array(n);
  items.forEach((it, b) => {
    for (let i = 0; i < it.tokens.length; i++) positions[rowStart[b] + i] = it.session.position + i;
  });

  const { x, xn, q, kNew, vNew, attn, proj, routerLogits, chosen, chosenW } = model.forwardBuffers(n);
  // Token embedding (rows of the embedding matrix, dequantized as llama.cpp's get_rows does).
  const embRowBytes = w.embed_tokens.data.length / c.vocabSize;
  items.forEach((it, b) => {
    it.tokens.forEach((t, i) => dequantizeRow(w.embed_tokens.dtype, w.embed_tokens.data, t * embRowBytes, dim, x, (rowStart[b] + i) * dim));
  });

  const traceBase = items.map((it) => {
    if (!it.trace) return 0;
    for (let i = 0; i < it.tokens.length; i++) it.trace.push({ experts: [], weights: [] });
    return it.trace.length - it.tokens.length;
  });

  for (let l = 0; l < c.numHiddenLayers; l++) {
    const layer = w.layers[l];

    // Self-attention block: projections over all rows, attention per sequence.
    be.rmsNorm(xn, x, n, layer.input_layernorm, c.rmsNormEps);
    be.matmulMany([q, kNew, vNew], xn, n, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]);
    be.prefetch?.([layer.self_attn.o_proj]); // read while rope and attention run
    be.rope(q, n, c.numAttentionHeads, hd, positions, c.ropeTheta);
    be.rope(kNew, n, c.numKeyValueHeads, hd, positions, c.ropeTheta);
    items.forEach((it, b) => {
      const s = it.session;
      const m = it.tokens.length;
      const r0 = rowStart[b];
      const start = s.position;
      const cache = s.cache(l, start + m);
      cache.store(be, start, kNew.subarray(r0 * kvDim, (r0 + m) * kvDim), vNew.subarray(r0 * kvDim, (r0 + m) * kvDim));
      be.attention(attn.subarray(r0 * qDim, (r0 + m) * qDim), q.subarray(r0 * qDim, (r0 + m) * qDim), m, start, cache.k, cache.v, {
        nHeads: c.numAttentionHeads,
        nKvHeads: c.numKeyValueHeads,
        headDim: hd,
        scale: fr(1 / Math.sqrt(hd)),
        slidingWindow: c.slidingWindow,
        kvF16: s.kvF16,
      });
    });
    be.matmul(proj, attn, n, layer.self_attn.o_proj);
    addResidual(x, proj, n * dim);

    // Sparse MoE block: route, then the grouped expert FFN over the tokens of every sequence.
    be.rmsNorm(xn, x, n, layer.post_attention_layernorm, c.rmsNormEps);
    const moe = layer.block_sparse_moe;
    if (moe.gate) {
      be.matmul(routerLogits, xn, n, moe.gate);
      route(routerLogits, n, c.numLocalExperts, k, chosen, chosenW);
    } else {
      chosen.fill(0);
      chosenW.fill(1);
    }
    items.forEach((it, b) => {
      if (!it.trace) return;
      for (let i = 0; i < it.tokens.length; i++) {
        const r = rowStart[b] + i;
        it.trace[traceBase[b] + i].experts.push(Array.from(chosen.subarray(r * k, r * k + k)));
        it.trace[traceBase[b] + i].weights.push(Array.from(chosenW.subarray(r * k, r * k + k)));
      }
    });
    be.moeFFN(proj, xn, n, chosen, chosenW, k, moe.experts.w1, moe.experts.w3, moe.experts.w2);
    const next = w.layers[l + 1]?.self_attn; // read while the residual and the norm run
    be.prefetch?.(next ? [next.q_proj, next.k_proj, next.v_proj] : [w.lm_head]);
    addResidual(x, proj, n * dim);
  }

  // Final norm and output head, for the rows each item wants.
  const outRows: number[] = [];
  items.forEach((it, b) => {
    const m = it.tokens.length;
    for (let i = it.allLogits ? 0 : m - 1; i < m; i++) outRows.push(rowStart[b] + i);
  });
  const last = new Float32Array(outRows.length * dim);
  outRows.forEach((r, i) => last.set(x.subarray(r * dim, (r + 1) * dim), i * dim));
  const h = new Float32Array(outRows.length * dim);
  be.rmsNorm(h, last, outRows.length, w.norm, c.rmsNormEps);
  const logits = new Float32Array(outRows.length * c.vocabSize);
  be.matmul(logits, h, outRows.length, w.lm_head);
  const result: Float32Array[] = [];
  let o = 0;
  for (const it of items) {
    const rows = it.allLogits ? it.tokens.length : 1;
    // One item owning every row (a lone session's step) takes the array itself instead of a copy.
    result.push(items.length === 1 ? logits : logits.slice(o * c.vocabSize, (o + rows) * c.vocabSize));
    o += rows;
    it.session.advance(it.tokens.length);
  }
  return result;
}

/**
 * x[i] += r[i] for i < n, in f32. Its own function so that a long prompt's hot loop is optimised here, not by
 * on-stack replacement of forwardBatch in the middle of its first call: code compiled that way had no type feedback
 * for the calls after the layer loop and deoptimised on every call for the first ~40 decode steps (node --trace-deopt).
 */
function addResidual(x: Float32Array, r: Float32Array, n: number): void {
  for (let i = 0; i < n; i++) x[i] = fr(x[i] + r[i]);
}

/**
 * Mixtral routing: softmax over all router logits, take the top k, renormalise their probabilities to sum to 1
 * (llama.cpp's build_moe_ffn with norm_w, which clamps the sum away from 0). Ties go to the lower expert id.
 */
export function route(logits: Float32Array, rows: number, nExperts: number, k: number, experts: Int32Array, weights: Float32Array): void {
  const probs = new Float32Array(nExperts);
  for (let r = 0; r < rows; r++) {
    const o = r * nExperts;
    let max = -Infinity;
    for (let e = 0; e < nExperts; e++) max = Math.max(max, logits[o + e]);
    let sum = 0;
    for (let e = 0; e < nExperts; e++) {
      probs[e] = fr(Math.exp(logits[o + e] - max));
      sum += probs[e];
    }
    const inv = fr(1 / sum);
    for (let e = 0; e < nExperts; e++) probs[e] = fr(probs[e] * inv);
    const taken = new Uint8Array(nExperts);
    let wsum = 0;
    for (let s = 0; s < k; s++) {
      let best = -1;
      for (let e = 0; e < nExperts; e++) if (!taken[e] && (best < 0 || probs[e] > probs[best])) best = e;
      taken[best] = 1;
      experts[r * k + s] = best;
      weights[r * k + s] = probs[best];
      wsum = fr(wsum + probs[best]);
    }
    wsum = Math.max(wsum, 6.103515625e-5);
    for (let s = 0; s < k; s++) weights[r * k + s] = fr(weights[r * k + s] / wsum);
  }
}
