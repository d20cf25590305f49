// The sparse MoE feed-forward as differentiable pieces, in the order they run:
//   router logits -> top-k routing (Mixtral softmax-top-k, Shazeer noisy top-k, Switch top-1) -> optional capacity
//   (token dropping) -> dispatch (token-slots sorted by expert) -> grouped expert GEMMs (SwiGLU) -> weighted
//   scatter-add back to tokens.
// The choice of experts is discrete and gets no gradient; the gate weights of the chosen experts do, and through
// them the router. Experts are stacked [E, out, in] as in the inference model and GGUF.

import { alloc, gradOf, record, samePrecision, Var } from './tape.js';
import { gradKernels } from './kernels.js';
import { add, affine, linear, mul, silu, softplus, softmaxRow, sumRows } from './ops.js';
import type { Rng } from '../util/rng.js';

// ---------------------------------------------------------------------------------------------------------------
// Routing

/** Chosen experts and their differentiable gate weights. */
export interface Routing {
  /** [T*k]: slot s of token t at t*k + s, best first (ties go to the lower expert id, as in llama.cpp). */
  experts: Int32Array;
  /** [T, k] gate weights of the chosen experts. */
  gates: Var;
}

/** Indices of the k largest of src[off .. off+n), best first, ties to the lower index. */
export function topkIndices(src: ArrayLike<number>, off: number, n: number, k: number, out: Int32Array, outOff: number): void {
  const taken = new Uint8Array(n);
  for (let s = 0; s < k; s++) {
    let best = -1;
    for (let e = 0; e < n; e++) if (!taken[e] && (best < 0 || src[off + e] > src[off + best])) best = e;
    taken[best] = 1;
    out[outOff + s] = best;
  }
}

/**
 * Top-k routing over scores [T, E].
 * - 'renormalize' (Mixtral, and Shazeer's softmax over the kept k): gates = softmax over the k chosen scores, which
 *   equals softmax over all E followed by division by the chosen ones' sum (HF MixtralSparseMoeBlock).
 * - 'softmax' (Switch): gates = the softmax over all E at the chosen experts, not renormalised.
 */
export function topkRoute(scores: Var, k: number, gating: 'renormalize' | 'softmax'): Routing {
  if (scores.shape.length !== 2) throw new Error(`topkRoute: scores must be [T, E], got [${scores.shape.join(', ')}]`);
  const [T, E] = scores.shape;
  if (!(Number.isInteger(k) && k >= 1 && k <= E)) throw new Error(`topkRoute: k = ${k} outside 1..${E}`);
  const experts = new Int32Array(T * k);
  const gates = alloc(scores.precision, T * k);
  // probs: the distribution whose entries are the gates (over the k chosen, or over all E).
  const probs = new Float64Array(gating === 'renormalize' ? T * k : T * E);
  const chosen = new Float64Array(k);
  for (let t = 0; t < T; t++) {
    topkIndices(scores.data, t * E, E, k, experts, t * k);
    if (gating === 'renormalize') {
      for (let s = 0; s < k; s++) chosen[s] = scores.data[t * E + experts[t * k + s]];
      softmaxRow(chosen, 0, k, probs, t * k);
      for (let s = 0; s < k; s++) gates[t * k + s] = probs[t * k + s];
    } else {
      softmaxRow(scores.data, t * E, E, probs, t * E);
      for (let s = 0; s < k; s++) gates[t * k + s] = probs[t * E + experts[t * k + s]];
    }
  }
  const g = record(`topkRoute(${gating})`, gates, [T, k], [scores], (dg) => {
    const dz = gradOf(scores)!;
    for (let t = 0; t < T; t++) {
      if (gating === 'renormalize') {
        // g = softmax(z_chosen): dz_i = g_i (dg_i - sum_j g_j dg_j) for chosen i; unchosen logits get nothing.
        let dot = 0;
        for (let s = 0; s < k; s++) dot += probs[t * k + s] * dg[t * k + s];
        for (let s = 0; s < k; s++) dz[t * E + experts[t * k + s]] += probs[t * k + s] * (dg[t * k + s] - dot);
      } else {
        // g_s = p_{e_s}, p = softmax(z): dz = p * (u - sum p u), u the gate gradient scattered to experts.
        let dot = 0;
        for (let s = 0; s < k; s++) dot += probs[t * E + experts[t * k + s]] * dg[t * k + s];
        for (let e = 0; e < E; e++) dz[t * E + e] -= probs[t * E + e] * dot;
        for (let s = 0; s < k; s++) dz[t * E + experts[t * k + s]] += probs[t * E + experts[t * k + s]] * dg[t * k + s];
      }
    }
  });
  return { experts, gates: g };
}

/** Gate weights [T, k] scattered into a dense [T, E] matrix (zeros for unchosen experts): Shazeer's G(x). */
export function scatterGates(gates: Var, experts: Int32Array, E: number): Var {
  const [T, k] = gates.shape;
  if (experts.length !== T * k) throw new Error(`scatterGates: ${experts.length} expert ids for ${T} x ${k} gates`);
  const out = alloc(gates.precision, T * E);
  for (let i = 0; i < T * k; i++) out[Math.floor(i / k) * E + experts[i]] += gates.data[i];
  return record('scatterGates', out, [T, E], [gates], (g) => {
    const dg = gradOf(gates)!;
    for (let i = 0; i < T * k; i++) dg[i] += g[Math.floor(i / k) * E + experts[i]];
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Noisy top-k gating (Shazeer et al. 2017) and its smooth load estimate

/** Standard normal CDF, accurate to ~1e-16 absolute (gradient checks difference it). */
export function normalCdf(z: number): number {
  const x = z / Math.SQRT2;
  return x < 0 ? 0.5 * erfcPos(-x) : 1 - 0.5 * erfcPos(x);
}

export function normalPdf(z: number): number {
  return Math.exp(-0.5 * z * z) / Math.sqrt(2 * Math.PI);
}

/** erfc(x) for x >= 0: the all-positive series of erf below 3, the continued fraction of erfc above. */
function erfcPos(x: number): number {
  if (x < 3) {
    const x2 = x * x;
    let term = x;
    let s = x;
    for (let n = 1; n < 200; n++) {
      term *= (2 * x2) / (2 * n + 1);
      s += term;
      if (term < 1e-17 * s) break;
    }
    return 1 - (2 / Math.sqrt(Math.PI)) * Math.exp(-x2) * s;
  }
  let f = x;
  for (let n = 80; n >= 1; n--) f = x + n / 2 / f;
  return Math.exp(-x * x) / (Math.sqrt(Math.PI) * f);
}

/**
 * P(expert e is in the top k) per token under fresh noise (Shazeer 2017 eq. 9, as tensor2tensor's _prob_in_top_k):
 * Phi((clean_e - kth_excluding(noisy, k, e)) / std_e), where kth_excluding is the k-th largest noisy score of the
 * other experts: the (k+1)-th overall when e is in the top k, else the k-th. Differentiable in clean, noisy (through
 * the threshold) and std. Needs k < E. Returns [T, E].
 */
export function probInTopK(clean: Var, noisy: Var, std: Var, k: number): Var {
  const p = samePrecision('probInTopK', clean, noisy, std);
  const [T, E] = clean.shape;
  for (const v of [noisy, std]) if (v.shape[0] !== T || v.shape[1] !== E) throw new Error('probInTopK: clean, noisy and std must have one shape');
  if (!(k >= 1 && k < E)) throw new Error(`probInTopK: needs 1 <= k < E, got k = ${k}, E = ${E}`);
  const order = new Int32Array(k + 1);
  const thr = new Int32Array(T * E); // which noisy entry is the threshold of (t, e)
  const z = new Float64Array(T * E);
  const out = alloc(p, T * E);
  for (let t = 0; t < T; t++) {
    topkIndices(noisy.data, t * E, E, k + 1, order, 0);
    const inTop = new Uint8Array(E);
    for (let s = 0; s < k; s++) inTop[order[s]] = 1;
    for (let e = 0; e < E; e++) {
      const j = inTop[e] ? order[k] : order[k - 1];
      const i = t * E + e;
      thr[i] = j;
      z[i] = (clean.data[i] - noisy.data[t * E + j]) / std.data[i];
      out[i] = normalCdf(z[i]);
    }
  }
  return record('probInTopK', out, [T, E], [clean, noisy, std], (g) => {
    const dc = gradOf(clean);
    const dn = gradOf(noisy);
    const ds = gradOf(std);
    for (let t = 0; t < T; t++) {
      for (let e = 0; e < E; e++) {
        const i = t * E + e;
        const a = (g[i] * normalPdf(z[i])) / std.data[i]; // dP/d(clean - threshold)
        if (dc) dc[i] += a;
        if (dn) dn[t * E + thr[i]] -= a;
        if (ds) ds[i] -= a * z[i];
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Dispatch: capacity, sorting token-slots by expert, the grouped GEMM, the weighted scatter-add

/**
 * Which token-slots fit under a per-expert capacity (GShard/Switch token dropping): slots are admitted by rank
 * (every token's first choice before any second choice, as GShard), then in token order; a slot arriving at a
 * full expert is dropped, and the token then gets nothing from that expert (its residual carries it on).
 */
export function capacityMask(experts: Int32Array, T: number, k: number, E: number, capacity: number): Uint8Array {
  const keep = new Uint8Array(T * k);
  const used = new Int32Array(E);
  for (let s = 0; s < k; s++) {
    for (let t = 0; t < T; t++) {
      const e = experts[t * k + s];
      if (used[e] < capacity) {
        used[e]++;
        keep[t * k + s] = 1;
      }
    }
  }
  return keep;
}

/** Expert capacity in token-slots: ceil(factor * T * k / E) (Switch's tokens/experts * capacity factor, times k). */
export function expertCapacity(factor: number, T: number, k: number, E: number): number {
  return Math.ceil((factor * T * k) / E);
}

/** How token-slots are laid out as rows of the expert GEMMs. */
export interface DispatchPlan {
  /** [E+1]: rows offsets[e] .. offsets[e+1]-1 belong to expert e. */
  offsets: Int32Array;
  /** [S]: the token each row reads. */
  tokenOfRow: Int32Array;
  /** [T*k]: the row of each slot, -1 for a dropped slot. */
  rowOfSlot: Int32Array;
}

/** Sorts the kept token-slots by expert (stable: within an expert, in slot order t*k + s). */
export function planDispatch(experts: Int32Array, T: number, k: number, E: number, keep: Uint8Array | null = null): DispatchPlan {
  const counts = new Int32Array(E);
  for (let i = 0; i < T * k; i++) {
    const e = experts[i];
    if (!(Number.isInteger(e) && e >= 0 && e < E)) throw new Error(`planDispatch: expert id ${e} outside 0..${E - 1}`);
    if (!keep || keep[i]) counts[e]++;
  }
  const offsets = new Int32Array(E + 1);
  for (let e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
  const next = offsets.slice(0, E);
  const tokenOfRow = new Int32Array(offsets[E]);
  const rowOfSlot = new Int32Array(T * k).fill(-1);
  for (let i = 0; i < T * k; i++) {
    if (keep && !keep[i]) continue;
    const r = next[experts[i]]++;
    tokenOfRow[r] = Math.floor(i / k);
    rowOfSlot[i] = r;
  }
  return { offsets, tokenOfRow, rowOfSlot };
}

/** Rows idx[i] of x [T, D]: [S, D]. Backward scatter-adds (a token chosen by two experts gets both gradients). */
export function gatherRows(x: Var, idx: Int32Array): Var {
  const [T, D] = x.shape;
  const S = idx.length;
  for (let i = 0; i < S; i++) if (!(idx[i] >= 0 && idx[i] < T)) throw new Error(`gatherRows: row ${idx[i]} outside 0..${T - 1}`);
  const out = alloc(x.precision, S * D);
  for (let i = 0; i < S; i++) out.set(x.data.subarray(idx[i] * D, idx[i] * D + D), i * D);
  return record('gatherRows', out, [S, D], [x], (g) => {
    const dx = gradOf(x)!;
    for (let i = 0; i < S; i++) {
      const o = idx[i] * D;
      for (let j = 0; j < D; j++) dx[o + j] += g[i * D + j];
    }
  });
}

/**
 * The grouped expert GEMM: rows of x [S, in] sorted by expert (offsets), each multiplied by its expert's
 * W [E, out, in] transposed: [S, out]. One GEMM per expert with rows; backward reaches x and every used expert.
 */
export function groupedLinear(x: Var, w: Var, offsets: Int32Array): Var {
  const p = samePrecision('groupedLinear', x, w);
  if (w.shape.length !== 3) throw new Error(`groupedLinear: weight must be [E, out, in], got [${w.shape.join(', ')}]`);
  const [E, n, k] = w.shape;
  if (x.shape.length !== 2 || x.shape[1] !== k) throw new Error(`groupedLinear: input [${x.shape.join(', ')}] does not match weight [${w.shape.join(', ')}]`);
  const S = x.shape[0];
  if (offsets.length !== E + 1 || offsets[0] !== 0 || offsets[E] !== S) throw new Error(`groupedLinear: offsets must run 0..${S} over ${E} experts`);
  for (let e = 0; e < E; e++) if (offsets[e + 1] < offsets[e]) throw new Error('groupedLinear: offsets decrease');
  const out = alloc(p, S * n);
  gradKernels().groupedMatmul(out, x.data, w.data, offsets, k, n);
  return record('groupedLinear', out, [S, n], [x, w], (g) => {
    gradKernels().groupedMatmulBackward(g, x.data, w.data, offsets, k, n, gradOf(x), gradOf(w));
  });
}

/**
 * The weighted scatter-add back to tokens: out[t] = sum over kept slots s of gates[t, s] * y[rowOfSlot[t*k+s]],
 * summed in slot order. y [S, D], gates [T, k]: [T, D]. Backward reaches y and the gates (hence the router).
 */
export function combineSlots(y: Var, gates: Var, rowOfSlot: Int32Array): Var {
  const p = samePrecision('combineSlots', y, gates);
  const [T, k] = gates.shape;
  const D = y.shape[1];
  if (rowOfSlot.length !== T * k) throw new Error(`combineSlots: ${rowOfSlot.length} slots for ${T} x ${k} gates`);
  const out = alloc(p, T * D);
  const acc = new Float64Array(D);
  for (let t = 0; t < T; t++) {
    acc.fill(0);
    for (let s = 0; s < k; s++) {
      const r = rowOfSlot[t * k + s];
      if (r < 0) continue;
      const gw = gates.data[t * k + s];
      for (let j = 0; j < D; j++) acc[j] += gw * y.data[r * D + j];
    }
    for (let j = 0; j < D; j++) out[t * D + j] = acc[j];
  }
  return record('combineSlots', out, [T, D], [y, gates], (g) => {
    const dy = gradOf(y);
    const dg = gradOf(gates);
    for (let t = 0; t < T; t++) {
      for (let s = 0; s < k; s++) {
        const r = rowOfSlot[t * k + s];
        if (r < 0) continue;
        const gw = gates.data[t * k + s];
        let dot = 0;
        for (let j = 0; j < D; j++) {
          dot += g[t * D + j] * y.data[r * D + j];
          if (dy) dy[r * D + j] += gw * g[t * D + j];
        }
        if (dg) dg[t * k + s] += dot;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// The block

export type RouterKind = 'softmax-topk' | 'noisy-topk' | 'switch';

export interface MoeBlockParams {
  /** Router [E, D] (HF block_sparse_moe.gate). */
  gate: Var;
  /** Noisy top-k's noise projection W_noise [E, D]; null for the other routers. */
  noise: Var | null;
  /** Stacked experts: w1 (gate) and w3 (up) [E, F, D], w2 (down) [E, D, F]. */
  w1: Var;
  w2: Var;
  w3: Var;
  /** Computes the expert GEMMs instead of groupedLinear (LoRA adds its per-expert low-rank term here); default groupedLinear. */
  expertLinear?: ExpertLinear | null;
}

/** An expert GEMM over rows sorted by expert: which weight, rows x [S, in], the stacked weight [E, out, in], offsets. */
export type ExpertLinear = (which: 'w1' | 'w2' | 'w3', x: Var, w: Var, offsets: Int32Array) => Var;

export interface MoeBlockOptions {
  router: RouterKind;
  /** Experts per token (Switch: 1). */
  k: number;
  /** Training mode: noise, jitter and capacity apply only then. */
  training: boolean;
  /** Multiplicative uniform noise U(1-j, 1+j) on the router's input (Switch); 0 = off. */
  jitter: number;
  /** Expert capacity factor (token dropping); null = dropless. */
  capacityFactor: number | null;
  /** Added to softplus(x W_noise) as tensor2tensor's noisy_top_k_gating does (noise_epsilon); 0 = the paper's formula. */
  noiseEpsilon: number;
  /** Source of jitter and gating noise; required in training when either is on. */
  rng: Rng | null;
}

export interface MoeBlockResult {
  /** [T, D] the block's output (dropped slots contribute nothing). */
  out: Var;
  /** [T, E] router logits x W_g (clean; for the balancing and z losses). */
  logits: Var;
  experts: Int32Array;
  gates: Var;
  /** [T*k] 1 = the slot ran, 0 = dropped over capacity; null when dropless. */
  kept: Uint8Array | null;
  /** Slots routed to each expert (before dropping). */
  tokensPerExpert: Int32Array;
  /** Slots dropped over capacity. */
  dropped: number;
  /** Noisy top-k only: Shazeer's importance (sum of gates) and load (smooth, training; else counts) per expert, [E]. */
  importance: Var | null;
  load: Var | null;
}

/** Runs one sparse MoE feed-forward block over x [T, D]. */
export function sparseMoeBlock(x: Var, p: MoeBlockParams, o: MoeBlockOptions): MoeBlockResult {
  const [T, D] = x.shape;
  const E = p.gate.shape[0];
  const k = o.k;
  if (o.training && (o.jitter > 0 || o.router === 'noisy-topk') && !o.rng) throw new Error('sparseMoeBlock: training with jitter or noisy gating needs an rng');

  // Router input: jitter multiplies it by fixed noise (a constant; the gradient still reaches x through it).
  let routerIn = x;
  if (o.training && o.jitter > 0) {
    const noise = alloc(x.precision, T * D);
    for (let i = 0; i < T * D; i++) noise[i] = 1 - o.jitter + 2 * o.jitter * o.rng!.uniform();
    routerIn = mul(x, Var.constant(noise, [T, D]));
  }
  const logits = linear(routerIn, p.gate);

  let routing: Routing;
  let importance: Var | null = null;
  let load: Var | null = null;
  if (o.router === 'noisy-topk') {
    if (!p.noise) throw new Error('sparseMoeBlock: noisy-topk needs the noise weight');
    const std = affine(softplus(linear(routerIn, p.noise)), 1, o.noiseEpsilon);
    let scores = logits;
    if (o.training) {
      const eps = alloc(x.precision, T * E);
      for (let i = 0; i < T * E; i++) eps[i] = o.rng!.normal();
      scores = add(logits, mul(std, Var.constant(eps, [T, E])));
    }
    routing = topkRoute(scores, k, 'renormalize');
    importance = sumRows(scatterGates(routing.gates, routing.experts, E));
    if (o.training && k < E) load = sumRows(probInTopK(logits, scores, std, k));
    else {
      const counts = alloc(x.precision, E);
      for (const e of routing.experts) counts[e]++;
      load = Var.constant(counts, [E]);
    }
  } else if (o.router === 'switch') {
    if (k !== 1) throw new Error(`sparseMoeBlock: the switch router is top-1, got k = ${k}`);
    routing = topkRoute(logits, 1, 'softmax');
  } else {
    routing = topkRoute(logits, k, 'renormalize');
  }

  const tokensPerExpert = new Int32Array(E);
  for (const e of routing.experts) tokensPerExpert[e]++;
  let kept: Uint8Array | null = null;
  let dropped = 0;
  if (o.training && o.capacityFactor !== null) {
    kept = capacityMask(routing.experts, T, k, E, expertCapacity(o.capacityFactor, T, k, E));
    for (const v of kept) if (!v) dropped++;
  }

  const plan = planDispatch(routing.experts, T, k, E, kept);
  const out = combineSlots(expertFFN(gatherRows(x, plan.tokenOfRow), p, plan.offsets), routing.gates, plan.rowOfSlot);
  return { out, logits, experts: routing.experts, gates: routing.gates, kept, tokensPerExpert, dropped, importance, load };
}

/** SwiGLU experts over rows sorted by expert: w2(silu(w1 x) * w3 x), one grouped GEMM per weight. */
export function expertFFN(xs: Var, p: { w1: Var; w2: Var; w3: Var; expertLinear?: ExpertLinear | null }, offsets: Int32Array): Var {
  const gl: ExpertLinear = p.expertLinear ?? ((_, x, w, off) => groupedLinear(x, w, off));
  const h = mul(silu(gl('w1', xs, p.w1, offsets)), gl('w3', xs, p.w3, offsets));
  return gl('w2', h, p.w2, offsets);
}

/** A dense SwiGLU FFN (Mistral/Llama mlp): down(silu(gate x) * up x). */
export function denseFFN(x: Var, gateProj: Var, upProj: Var, downProj: Var): Var {
  return linear(mul(silu(linear(x, gateProj)), linear(x, upProj)), downProj);
}
