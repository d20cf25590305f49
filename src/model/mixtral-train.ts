// The differentiable Mixtral: the same architecture as src/model/mixtral.ts, built from the autograd ops so it can
// be trained (experts and router together), plus the MoE training options (routers, auxiliary losses, capacity,
// MoE every n-th layer, dense). Parameters carry Hugging Face Mixtral names; experts are stacked [E, out, in] as in
// the inference model. q/k rows are in Hugging Face order (RoPE rotates the pairs (i, i + hd/2), transformers'
// rotate_half), so each parameter equals the checkpoint tensor of its name; export permutes them for GGUF/inference.

import { FormatError } from '../formats/errors.js';
import { checkTensorSet, permuteQKForGGUF } from '../formats/names.js';
import type { Backend } from '../backend/backend.js';
import { RefBackend } from '../backend/ref.js';
import { dequantize } from '../tensor/quant.js';
import { f32Tensor, shapeString, type Tensor } from '../tensor/tensor.js';
import { alloc, numelOf, Var, type Float, type Precision } from '../autograd/tape.js';
import { add, addScalars, affine, attention, embedding, linear, mul, rmsNorm, rope, silu } from '../autograd/ops.js';
import { denseFFN, groupedLinear, sparseMoeBlock, type MoeBlockResult, type RouterKind } from '../autograd/moe.js';
import { crossEntropy, cvSquared, loadBalancingLoss, routerZLoss } from '../autograd/losses.js';
import { Rng } from '../util/rng.js';
import { configProblems, type MixtralConfig } from './config.js';
import { MixtralModel, type MixtralDecoderLayer, type MixtralWeights } from './mixtral.js';

export type { RouterKind } from '../autograd/moe.js';

// ---------------------------------------------------------------------------------------------------------------
// Training configuration

/** How the MoE layers route and are regularised in training. Kept beside the MixtralConfig, saved in checkpoints. */
export interface MoeOptions {
  /**
   * 'softmax-topk' (Mixtral: softmax over all experts, top k, renormalised over the k), 'noisy-topk' (Shazeer 2017:
   * top k of x Wg + N(0,1) softplus(x Wnoise), softmax over the kept k; needs k < E), 'switch' (top-1, gate = its
   * softmax probability, not renormalised; needs numExpertsPerTok 1).
   */
  router: RouterKind;
  /** Load-balancing loss coefficient (HF router_aux_loss_coef; Mixtral 0.02); 0 = off. */
  routerAuxLossCoef: number;
  /**
   * 'concatenated' (Hugging Face's load_balancing_loss_func: the router logits of all layers counted together, so
   * it balances each expert index summed over layers) or 'per-layer' (Switch / GShard: each layer's loss, averaged
   * over the MoE layers, so each layer is pushed towards balance). Both equal k at a perfectly even load.
   */
  routerAuxLossScope: 'concatenated' | 'per-layer';
  /** Router z-loss coefficient (ST-MoE: 1e-3); 0 = off. */
  routerZLossCoef: number;
  /**
   * Multiplicative uniform jitter U(1-j, 1+j) on the router input in training, as Switch applies it (router only;
   * HF's Mixtral block multiplies the experts' input too). HF router_jitter_noise; 0 = off.
   */
  routerJitterNoise: number;
  /** Noisy top-k: coefficients of CV^2(importance) and CV^2(load) (tensor2tensor's default loss_coef 1e-2 each). */
  noisyImportanceCoef: number;
  noisyLoadCoef: number;
  /** Noisy top-k: noise std = softplus(x Wnoise) + this (tensor2tensor's noise_epsilon 1e-2; 0 = the paper's formula). */
  noisyNoiseEpsilon: number;
  /**
   * Expert capacity factor in training: each expert takes at most ceil(factor * tokens * k / E) token-slots, the
   * rest are dropped (their token passes on through the residual). null = dropless (MegaBlocks; the default).
   * Evaluation and the exported inference model are always dropless. The balancing loss counts the routed slots
   * before dropping (as HF computes it from the router's choice).
   */
  capacityFactor: number | null;
  /** MoE in layers l with (l + 1) % n === 0 (1 = every layer, 2 = every other as GShard); the rest are dense FFNs. */
  moeLayerFrequency: number;
}

export const DEFAULT_MOE_OPTIONS: Readonly<MoeOptions> = Object.freeze({
  router: 'softmax-topk',
  routerAuxLossCoef: 0.02,
  routerAuxLossScope: 'concatenated',
  routerZLossCoef: 1e-3,
  routerJitterNoise: 0,
  noisyImportanceCoef: 1e-2,
  noisyLoadCoef: 1e-2,
  noisyNoiseEpsilon: 1e-2,
  capacityFactor: null,
  moeLayerFrequency: 1,
});

export interface MixtralTrainConfig extends MixtralConfig {
  moe: MoeOptions;
}

/** A training config: the architecture plus MoE options (defaults filled in). */
export function mixtralTrainConfig(c: MixtralConfig, moe: Partial<MoeOptions> = {}): MixtralTrainConfig {
  return { ...c, moe: { ...DEFAULT_MOE_OPTIONS, ...moe } };
}

/** The architecture part alone (what inference and the checkpoint formats know). */
export function inferenceConfig(c: MixtralTrainConfig): MixtralConfig {
  const { moe: _moe, ...rest } = c;
  return rest;
}

export function trainConfigProblems(c: MixtralTrainConfig): string[] {
  const p = configProblems(c);
  const m = c.moe;
  if (!m) return [...p, 'moe options missing'];
  if (!['softmax-topk', 'noisy-topk', 'switch'].includes(m.router)) p.push(`moe.router must be softmax-topk, noisy-topk or switch, got ${String(m.router)}`);
  for (const k of ['routerAuxLossCoef', 'routerZLossCoef', 'routerJitterNoise', 'noisyImportanceCoef', 'noisyLoadCoef', 'noisyNoiseEpsilon'] as const) {
    if (!(typeof m[k] === 'number' && m[k] >= 0 && Number.isFinite(m[k]))) p.push(`moe.${k} must be a finite number >= 0, got ${String(m[k])}`);
  }
  if (m.routerAuxLossScope !== 'concatenated' && m.routerAuxLossScope !== 'per-layer') p.push(`moe.routerAuxLossScope must be concatenated or per-layer, got ${String(m.routerAuxLossScope)}`);
  if (m.routerJitterNoise >= 1) p.push(`moe.routerJitterNoise must be < 1, got ${m.routerJitterNoise}`);
  if (m.capacityFactor !== null && !(typeof m.capacityFactor === 'number' && m.capacityFactor > 0 && Number.isFinite(m.capacityFactor))) {
    p.push(`moe.capacityFactor must be > 0 or null, got ${String(m.capacityFactor)}`);
  }
  if (!(Number.isInteger(m.moeLayerFrequency) && m.moeLayerFrequency >= 1)) p.push(`moe.moeLayerFrequency must be a positive integer, got ${String(m.moeLayerFrequency)}`);
  if (c.numLocalExperts > 1) {
    if (m.router === 'switch' && c.numExpertsPerTok !== 1) p.push(`the switch router is top-1, but numExpertsPerTok is ${c.numExpertsPerTok}`);
    if (m.router === 'noisy-topk' && c.numExpertsPerTok >= c.numLocalExperts) p.push(`noisy-topk needs numExpertsPerTok < numLocalExperts (${c.numExpertsPerTok} >= ${c.numLocalExperts})`);
  }
  return p;
}

/** Whether layer l has a sparse MoE block (else a dense FFN). A one-expert config is dense throughout. */
export function isMoeLayer(c: MixtralTrainConfig, l: number): boolean {
  return c.numLocalExperts > 1 && (l + 1) % c.moe.moeLayerFrequency === 0;
}

/**
 * Every tensor of the Hugging Face checkpoint of this config, with its shape, in transformers' order: MoE layers
 * have block_sparse_moe.gate and experts.E.w1/w2/w3, dense layers mlp.gate_proj/up_proj/down_proj. (For a model
 * with MoE in every layer, or none, this is exactly names.ts's expectedShapes(c, 'hf').)
 */
export function hfParameterShapes(c: MixtralTrainConfig): Map<string, number[]> {
  const D = c.hiddenSize;
  const F = c.intermediateSize;
  const E = c.numLocalExperts;
  const m = new Map<string, number[]>();
  m.set('model.embed_tokens.weight', [c.vocabSize, D]);
  for (let l = 0; l < c.numHiddenLayers; l++) {
    const b = `model.layers.${l}.`;
    m.set(`${b}input_layernorm.weight`, [D]);
    m.set(`${b}self_attn.q_proj.weight`, [c.numAttentionHeads * c.headDim, D]);
    m.set(`${b}self_attn.k_proj.weight`, [c.numKeyValueHeads * c.headDim, D]);
    m.set(`${b}self_attn.v_proj.weight`, [c.numKeyValueHeads * c.headDim, D]);
    m.set(`${b}self_attn.o_proj.weight`, [D, c.numAttentionHeads * c.headDim]);
    m.set(`${b}post_attention_layernorm.weight`, [D]);
    if (isMoeLayer(c, l)) {
      m.set(`${b}block_sparse_moe.gate.weight`, [E, D]);
      for (let e = 0; e < E; e++) {
        m.set(`${b}block_sparse_moe.experts.${e}.w1.weight`, [F, D]);
        m.set(`${b}block_sparse_moe.experts.${e}.w2.weight`, [D, F]);
        m.set(`${b}block_sparse_moe.experts.${e}.w3.weight`, [F, D]);
      }
    } else {
      m.set(`${b}mlp.gate_proj.weight`, [F, D]);
      m.set(`${b}mlp.up_proj.weight`, [F, D]);
      m.set(`${b}mlp.down_proj.weight`, [D, F]);
    }
  }
  m.set('model.norm.weight', [D]);
  if (!c.tieWordEmbeddings) m.set('lm_head.weight', [c.vocabSize, D]);
  return m;
}

/** The noisy router's extra weight (not part of HF Mixtral): model.layers.N.block_sparse_moe.noise.weight [E, D]. */
export function noiseWeightName(l: number): string {
  return `model.layers.${l}.block_sparse_moe.noise.weight`;
}

// ---------------------------------------------------------------------------------------------------------------
// Parameters, named as the checkpoint

export interface AttentionParams {
  q_proj: Var; // [H*hd, D], HF row order
  k_proj: Var; // [KV*hd, D], HF row order
  v_proj: Var;
  o_proj: Var;
}

export interface SparseMoeParams {
  gate: Var; // [E, D]
  /** Noisy top-k's W_noise [E, D]; null for the other routers. */
  noise: Var | null;
  /** Stacked: experts.E.w1.weight is w1[E] ([F, D]); w2 [E, D, F]; w3 [E, F, D]. */
  experts: { w1: Var; w2: Var; w3: Var };
}

export interface DenseMlpParams {
  gate_proj: Var; // [F, D]
  up_proj: Var; // [F, D]
  down_proj: Var; // [D, F]
}

export interface DecoderLayerParams {
  input_layernorm: Var;
  self_attn: AttentionParams;
  post_attention_layernorm: Var;
  /** Exactly one of these two is set, per isMoeLayer. */
  block_sparse_moe: SparseMoeParams | null;
  mlp: DenseMlpParams | null;
}

export interface MixtralTrainParams {
  embed_tokens: Var;
  layers: DecoderLayerParams[];
  norm: Var;
  /** The embedding Var itself when tied. */
  lm_head: Var;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward and loss

export interface TrainForwardOptions {
  /** Sequences stacked in `tokens`, all of the same length (default 1). Each starts at position 0. */
  batch?: number;
  /** Training mode: router noise, jitter and capacity dropping apply (default false). */
  training?: boolean;
  /** Randomness for training mode (needed with noisy-topk or jitter). */
  rng?: Rng;
  /** [tokens] 1 = a real token, 0 = padding: padding is left out of the router's auxiliary losses (HF attention_mask). */
  tokenMask?: ArrayLike<number>;
}

/** One MoE layer's routing in a forward pass. */
export interface LayerRouting extends MoeBlockResult {
  layer: number;
}

export interface TrainForwardResult {
  /** [tokens, vocab] */
  logits: Var;
  /** MoE layers only, in layer order. */
  routing: LayerRouting[];
}

export interface LossOptions extends TrainForwardOptions {
  /** Passed to crossEntropy (e.g. the token count of the whole accumulated batch). */
  ceDivisor?: number;
}

export interface LossResult {
  /** What backward() starts from: ce + auxCoef*balance + zCoef*z + the noisy router's CV^2 terms. */
  loss: Var;
  ce: Var;
  /** E * sum f_e P_e over all MoE layers (unscaled; HF's load_balancing_loss_func); null without MoE layers. */
  balance: Var | null;
  /** Mean logsumexp^2 of the router logits (unscaled); null without MoE layers. */
  zLoss: Var | null;
  /** Noisy top-k: sum over MoE layers of CV^2(importance) and of CV^2(load) (unscaled). */
  importanceLoss: Var | null;
  loadLoss: Var | null;
  logits: Var;
  routing: LayerRouting[];
}

/**
 * Extra terms on the projections (LoRA, src/model/lora.ts): consulted by forward() for every weight matrix of the
 * attention and feed-forward blocks, named by their Hugging Face module path.
 */
export interface ProjectionAdapters {
  /** x W^T plus the adapter's term for module `name` (model.layers.0.self_attn.q_proj, ...mlp.gate_proj), or null when it has none. */
  linear(name: string, x: Var, w: Var): Var | null;
  /** The same for stacked experts [E, out, in] over rows sorted by expert (name: model.layers.0.block_sparse_moe.experts.w1). */
  groupedLinear(name: string, x: Var, w: Var, offsets: Int32Array): Var | null;
}

export interface InitOptions {
  seed?: number;
  /** Normal std of the weight matrices (HF initializer_range; default 0.02). Norms start at 1, W_noise at 0. */
  std?: number;
  precision?: Precision;
}

export class MixtralTrain {
  readonly params: MixtralTrainParams;
  /** Adapters the projections consult (not parameters of the model: namedParameters() and toHFTensors() leave them out). */
  adapters: ProjectionAdapters | null = null;

  constructor(
    readonly config: MixtralTrainConfig,
    params: MixtralTrainParams,
  ) {
    const p = trainConfigProblems(config);
    if (p.length) throw new Error(`MixtralTrain: bad config: ${p.join('; ')}`);
    this.params = params;
    const want = this.parameterShapes();
    for (const [name, v] of this.namedParameters()) {
      const s = want.get(name);
      if (!s || shapeString(s) !== shapeString(v.shape)) throw new Error(`MixtralTrain: ${name} is ${shapeString(v.shape)}, expected ${s ? shapeString(s) : 'nothing'}`);
    }
  }

  /** A freshly initialised model: weight matrices ~ N(0, std^2) from a seeded generator. */
  static init(config: MixtralTrainConfig, opts: InitOptions = {}): MixtralTrain {
    const rng = new Rng(opts.seed ?? 0);
    const std = opts.std ?? 0.02;
    const prec = opts.precision ?? 'f32';
    const make = (name: string, shape: readonly number[]): Var => {
      const d = alloc(prec, numelOf(shape));
      if (name.endsWith('norm.weight')) d.fill(1);
      else if (!name.endsWith('.noise.weight')) for (let i = 0; i < d.length; i++) d[i] = rng.normal() * std;
      return Var.param(d, shape, name);
    };
    return new MixtralTrain(config, buildParams(config, make));
  }

  /**
   * A model from Hugging Face checkpoint tensors (any dtype the project reads; dequantized). The noisy router's
   * W_noise is taken when present, else starts at 0. Names and shapes are checked (FormatError naming `source`).
   */
  static fromHFTensors(config: MixtralTrainConfig, tensors: ReadonlyMap<string, Tensor>, opts: { precision?: Precision; source?: string } = {}): MixtralTrain {
    const source = opts.source ?? 'checkpoint';
    const prec = opts.precision ?? 'f32';
    const problems = trainConfigProblems(config);
    if (problems.length) throw new FormatError(source, `config: ${problems.join('; ')}`);
    const expected = hfParameterShapes(config);
    const optional = new Set<string>();
    const input = new Map<string, Tensor>();
    for (const [name, t] of tensors) {
      if (/^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$/.test(name)) continue;
      if (name === 'lm_head.weight' && config.tieWordEmbeddings) continue;
      input.set(name, t);
    }
    for (let l = 0; l < config.numHiddenLayers; l++) {
      if (isMoeLayer(config, l) && config.moe.router === 'noisy-topk') {
        expected.set(noiseWeightName(l), [config.numLocalExperts, config.hiddenSize]);
        optional.add(noiseWeightName(l));
      }
    }
    checkTensorSet(input, expected, source, optional);
    const values = (name: string): Float => {
      const f = dequantize(input.get(name)!);
      return prec === 'f64' ? Float64Array.from(f) : f;
    };
    const make = (name: string, shape: readonly number[]): Var => {
      const E = config.numLocalExperts;
      const ex = /^(model\.layers\.\d+\.block_sparse_moe\.experts)\.(w[123])\.weight$/.exec(name);
      if (ex) {
        const d = alloc(prec, numelOf(shape));
        const per = d.length / E;
        for (let e = 0; e < E; e++) d.set(values(`${ex[1]}.${e}.${ex[2]}.weight`), e * per);
        return Var.param(d, shape, name);
      }
      if (!input.has(name)) return Var.param(alloc(prec, numelOf(shape)), shape, name); // W_noise absent
      return Var.param(values(name), shape, name);
    };
    return new MixtralTrain(config, buildParams(config, make));
  }

  /**
   * Every trainable parameter once, with its name: the HF checkpoint name, except that each layer's experts are one
   * stacked tensor `model.layers.N.block_sparse_moe.experts.w1.weight` [E, out, in] (HF's experts.E.w1.weight is
   * slice E) and the noisy router adds `...block_sparse_moe.noise.weight`. A tied lm_head is not listed again.
   */
  namedParameters(): [string, Var][] {
    const c = this.config;
    const p = this.params;
    const out: [string, Var][] = [['model.embed_tokens.weight', p.embed_tokens]];
    p.layers.forEach((L, l) => {
      const b = `model.layers.${l}.`;
      out.push([`${b}input_layernorm.weight`, L.input_layernorm]);
      for (const k of ['q_proj', 'k_proj', 'v_proj', 'o_proj'] as const) out.push([`${b}self_attn.${k}.weight`, L.self_attn[k]]);
      out.push([`${b}post_attention_layernorm.weight`, L.post_attention_layernorm]);
      if (L.block_sparse_moe) {
        const m = L.block_sparse_moe;
        out.push([`${b}block_sparse_moe.gate.weight`, m.gate]);
        if (m.noise) out.push([noiseWeightName(l), m.noise]);
        for (const w of ['w1', 'w2', 'w3'] as const) out.push([`${b}block_sparse_moe.experts.${w}.weight`, m.experts[w]]);
      } else {
        const m = L.mlp!;
        for (const k of ['gate_proj', 'up_proj', 'down_proj'] as const) out.push([`${b}mlp.${k}.weight`, m[k]]);
      }
    });
    out.push(['model.norm.weight', p.norm]);
    if (!c.tieWordEmbeddings) out.push(['lm_head.weight', p.lm_head]);
    return out;
  }

  parameters(): Var[] {
    return this.namedParameters().map(([, v]) => v);
  }

  zeroGrad(): void {
    for (const v of this.parameters()) v.grad = null;
  }

  /** Shapes of namedParameters(). */
  parameterShapes(): Map<string, number[]> {
    return new Map(buildShapes(this.config));
  }

  forward(tokens: ArrayLike<number>, opts: TrainForwardOptions = {}): TrainForwardResult {
    const c = this.config;
    const p = this.params;
    const B = opts.batch ?? 1;
    const N = tokens.length;
    if (!(Number.isInteger(B) && B >= 1) || N === 0 || N % B !== 0) throw new Error(`forward: ${N} tokens do not split into ${B} sequences`);
    const T = N / B;
    if (T > c.maxPositionEmbeddings) throw new Error(`forward: sequence length ${T} exceeds maxPositionEmbeddings ${c.maxPositionEmbeddings}`);
    if (opts.tokenMask && opts.tokenMask.length !== N) throw new Error(`forward: tokenMask has ${opts.tokenMask.length} entries for ${N} tokens`);
    const training = opts.training ?? false;
    const positions = Int32Array.from({ length: N }, (_, i) => i % T);
    const attnShape = { batch: B, seqLen: T, nHeads: c.numAttentionHeads, nKvHeads: c.numKeyValueHeads, headDim: c.headDim, slidingWindow: c.slidingWindow };
    const routing: LayerRouting[] = [];

    const ad = this.adapters;
    const proj = (u: Var, w: Var, name: string): Var => (ad ? ad.linear(name, u, w) : null) ?? linear(u, w);

    let x = embedding(p.embed_tokens, tokens);
    p.layers.forEach((L, l) => {
      const b = `model.layers.${l}.`;
      // Self-attention block.
      const h = rmsNorm(x, L.input_layernorm, c.rmsNormEps);
      const q = rope(proj(h, L.self_attn.q_proj, `${b}self_attn.q_proj`), c.numAttentionHeads, c.headDim, positions, c.ropeTheta, 'hf');
      const k = rope(proj(h, L.self_attn.k_proj, `${b}self_attn.k_proj`), c.numKeyValueHeads, c.headDim, positions, c.ropeTheta, 'hf');
      const v = proj(h, L.self_attn.v_proj, `${b}self_attn.v_proj`);
      x = add(x, proj(attention(q, k, v, attnShape), L.self_attn.o_proj, `${b}self_attn.o_proj`));

      // Feed-forward block: sparse MoE or dense.
      const h2 = rmsNorm(x, L.post_attention_layernorm, c.rmsNormEps);
      if (L.block_sparse_moe) {
        const m = L.block_sparse_moe;
        const expertLinear = ad
          ? (which: 'w1' | 'w2' | 'w3', u: Var, w: Var, offsets: Int32Array) => ad.groupedLinear(`${b}block_sparse_moe.experts.${which}`, u, w, offsets) ?? groupedLinear(u, w, offsets)
          : null;
        const r = sparseMoeBlock(h2, { gate: m.gate, noise: m.noise, ...m.experts, expertLinear }, {
          router: c.moe.router,
          k: c.numExpertsPerTok,
          training,
          jitter: c.moe.routerJitterNoise,
          capacityFactor: c.moe.capacityFactor,
          noiseEpsilon: c.moe.noisyNoiseEpsilon,
          rng: opts.rng ?? null,
        });
        routing.push({ ...r, layer: l });
        x = add(x, r.out);
      } else {
        const m = L.mlp!;
        const mp = `${b}mlp.`;
        x = add(x, ad ? proj(mul(silu(proj(h2, m.gate_proj, `${mp}gate_proj`)), proj(h2, m.up_proj, `${mp}up_proj`)), m.down_proj, `${mp}down_proj`) : denseFFN(h2, m.gate_proj, m.up_proj, m.down_proj));
      }
    });
    const logits = linear(rmsNorm(x, p.norm, c.rmsNormEps), p.lm_head);
    return { logits, routing };
  }

  /**
   * Next-token training loss: cross-entropy of logits against `targets` (negative = no loss at that position;
   * for plain language modelling targets[i] = tokens[i+1] within each sequence, -1 at its end), plus the router
   * losses the config turns on.
   */
  loss(tokens: ArrayLike<number>, targets: ArrayLike<number>, opts: LossOptions = {}): LossResult {
    const c = this.config.moe;
    const { logits, routing } = this.forward(tokens, opts);
    const ce = crossEntropy(logits, targets, { divisor: opts.ceDivisor });
    let balance: Var | null = null;
    let zLoss: Var | null = null;
    let importanceLoss: Var | null = null;
    let loadLoss: Var | null = null;
    if (routing.length > 0) {
      const mask = opts.tokenMask ?? null;
      const k = this.config.numExpertsPerTok;
      balance =
        c.routerAuxLossScope === 'per-layer'
          ? affine(addScalars(...routing.map((r) => loadBalancingLoss([r.logits], [r.experts], k, mask))), 1 / routing.length)
          : loadBalancingLoss(routing.map((r) => r.logits), routing.map((r) => r.experts), k, mask);
      zLoss = routerZLoss(routing.map((r) => r.logits), mask);
      if (c.router === 'noisy-topk') {
        importanceLoss = addScalars(...routing.map((r) => cvSquared(r.importance!)));
        loadLoss = addScalars(...routing.map((r) => cvSquared(r.load!)));
      }
    }
    const scaled = (v: Var | null, coef: number) => (v && coef !== 0 ? affine(v, coef) : null);
    const loss = addScalars(ce, scaled(balance, c.routerAuxLossCoef), scaled(zLoss, c.routerZLossCoef), scaled(importanceLoss, c.noisyImportanceCoef), scaled(loadLoss, c.noisyLoadCoef));
    return { loss, ce, balance, zLoss, importanceLoss, loadLoss, logits, routing };
  }

  // -------------------------------------------------------------------------------------------------------------
  // Export

  /**
   * The Hugging Face Mixtral checkpoint tensors (f32, transformers' names and order, q/k in HF row order, experts
   * split per expert). Turn them into GGUF with names.ts hfTensorsToGGUF; write them with writeSafetensors.
   * `includeNoise` adds the noisy router's W_noise (HF Mixtral has no such tensor; inference does not need it).
   */
  toHFTensors(opts: { includeNoise?: boolean } = {}): Map<string, Tensor> {
    const c = this.config;
    const out = new Map<string, Tensor>();
    const byName = new Map(this.namedParameters());
    for (const [name, shape] of hfParameterShapes(c)) {
      const ex = /^(model\.layers\.\d+\.block_sparse_moe\.experts)\.(\d+)\.(w[123])\.weight$/.exec(name);
      if (ex) {
        const stacked = byName.get(`${ex[1]}.${ex[3]}.weight`)!;
        const per = numelOf(shape);
        const e = Number(ex[2]);
        out.set(name, f32Tensor(Float32Array.from(stacked.data.subarray(e * per, (e + 1) * per)), shape));
      } else {
        out.set(name, f32Tensor(Float32Array.from(byName.get(name)!.data), shape));
      }
    }
    if (opts.includeNoise) {
      this.params.layers.forEach((L, l) => {
        const n = L.block_sparse_moe?.noise;
        if (n) out.set(noiseWeightName(l), f32Tensor(Float32Array.from(n.data), n.shape));
      });
    }
    return out;
  }

  /**
   * The inference model's weights (f32, q/k rows permuted to GGUF RoPE order as the loader does). Dropless and
   * noise-free, so it computes what forward() computes in evaluation mode. Not for the switch router (inference
   * renormalises the top-k weights, Switch does not) nor for MoE-every-n-th-layer with k > 1 (the inference model
   * runs a dense layer as expert 0 once per slot); both need an inference-side option first.
   */
  toInferenceWeights(): MixtralWeights {
    const c = this.config;
    if (c.numLocalExperts > 1 && c.moe.router === 'switch') {
      throw new Error('toInferenceWeights: the Mixtral inference model renormalises the top-k gate weights; a switch-router model (gate = softmax probability) cannot be expressed in it');
    }
    const mixed = c.numLocalExperts > 1 && c.moe.moeLayerFrequency > 1;
    if (mixed && c.numExpertsPerTok > 1) {
      throw new Error('toInferenceWeights: dense layers in a MoE model with k > 1 are not supported by the inference model (it would run the dense FFN once per slot)');
    }
    const t = (v: Var): Tensor => f32Tensor(Float32Array.from(v.data), v.shape);
    const f = (v: Var): Float32Array => Float32Array.from(v.data);
    const stack1 = (v: Var): Tensor => f32Tensor(Float32Array.from(v.data), [1, ...v.shape]);
    const layers: MixtralDecoderLayer[] = this.params.layers.map((L) => ({
      input_layernorm: f(L.input_layernorm),
      self_attn: {
        q_proj: permuteQKForGGUF(t(L.self_attn.q_proj), c.numAttentionHeads),
        k_proj: permuteQKForGGUF(t(L.self_attn.k_proj), c.numKeyValueHeads),
        v_proj: t(L.self_attn.v_proj),
        o_proj: t(L.self_attn.o_proj),
      },
      post_attention_layernorm: f(L.post_attention_layernorm),
      block_sparse_moe: L.block_sparse_moe
        ? { gate: t(L.block_sparse_moe.gate), experts: { w1: t(L.block_sparse_moe.experts.w1), w2: t(L.block_sparse_moe.experts.w2), w3: t(L.block_sparse_moe.experts.w3) } }
        : { gate: null, experts: { w1: stack1(L.mlp!.gate_proj), w2: stack1(L.mlp!.down_proj), w3: stack1(L.mlp!.up_proj) } },
    }));
    const embed = t(this.params.embed_tokens);
    return { embed_tokens: embed, layers, norm: f(this.params.norm), lm_head: c.tieWordEmbeddings ? embed : t(this.params.lm_head) };
  }

  /** An inference model with these weights (see toInferenceWeights for what it cannot express). */
  toInferenceModel(backend: Backend = new RefBackend()): MixtralModel {
    return new MixtralModel(inferenceConfig(this.config), this.toInferenceWeights(), backend);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Building the parameter tree

function buildShapes(c: MixtralTrainConfig): [string, number[]][] {
  const D = c.hiddenSize;
  const F = c.intermediateSize;
  const E = c.numLocalExperts;
  const q = c.numAttentionHeads * c.headDim;
  const kv = c.numKeyValueHeads * c.headDim;
  const s: [string, number[]][] = [['model.embed_tokens.weight', [c.vocabSize, D]]];
  for (let l = 0; l < c.numHiddenLayers; l++) {
    const b = `model.layers.${l}.`;
    s.push([`${b}input_layernorm.weight`, [D]], [`${b}self_attn.q_proj.weight`, [q, D]], [`${b}self_attn.k_proj.weight`, [kv, D]]);
    s.push([`${b}self_attn.v_proj.weight`, [kv, D]], [`${b}self_attn.o_proj.weight`, [D, q]], [`${b}post_attention_layernorm.weight`, [D]]);
    if (isMoeLayer(c, l)) {
      s.push([`${b}block_sparse_moe.gate.weight`, [E, D]]);
      if (c.moe.router === 'noisy-topk') s.push([noiseWeightName(l), [E, D]]);
      s.push([`${b}block_sparse_moe.experts.w1.weight`, [E, F, D]], [`${b}block_sparse_moe.experts.w2.weight`, [E, D, F]], [`${b}block_sparse_moe.experts.w3.weight`, [E, F, D]]);
    } else {
      s.push([`${b}mlp.gate_proj.weight`, [F, D]], [`${b}mlp.up_proj.weight`, [F, D]], [`${b}mlp.down_proj.weight`, [D, F]]);
    }
  }
  s.push(['model.norm.weight', [D]]);
  if (!c.tieWordEmbeddings) s.push(['lm_head.weight', [c.vocabSize, D]]);
  return s;
}

function buildParams(c: MixtralTrainConfig, make: (name: string, shape: readonly number[]) => Var): MixtralTrainParams {
  const shapes = new Map(buildShapes(c));
  const v = (name: string): Var => make(name, shapes.get(name)!);
  const embed = v('model.embed_tokens.weight');
  const layers: DecoderLayerParams[] = [];
  for (let l = 0; l < c.numHiddenLayers; l++) {
    const b = `model.layers.${l}.`;
    const moe = isMoeLayer(c, l);
    layers.push({
      input_layernorm: v(`${b}input_layernorm.weight`),
      self_attn: { q_proj: v(`${b}self_attn.q_proj.weight`), k_proj: v(`${b}self_attn.k_proj.weight`), v_proj: v(`${b}self_attn.v_proj.weight`), o_proj: v(`${b}self_attn.o_proj.weight`) },
      post_attention_layernorm: v(`${b}post_attention_layernorm.weight`),
      block_sparse_moe: moe
        ? {
            gate: v(`${b}block_sparse_moe.gate.weight`),
            noise: c.moe.router === 'noisy-topk' ? v(noiseWeightName(l)) : null,
            experts: { w1: v(`${b}block_sparse_moe.experts.w1.weight`), w2: v(`${b}block_sparse_moe.experts.w2.weight`), w3: v(`${b}block_sparse_moe.experts.w3.weight`) },
          }
        : null,
      mlp: moe ? null : { gate_proj: v(`${b}mlp.gate_proj.weight`), up_proj: v(`${b}mlp.up_proj.weight`), down_proj: v(`${b}mlp.down_proj.weight`) },
    });
  }
  const norm = v('model.norm.weight');
  return { embed_tokens: embed, layers, norm, lm_head: c.tieWordEmbeddings ? embed : v('lm_head.weight') };
}
