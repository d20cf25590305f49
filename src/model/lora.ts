// LoRA (Hu et al. 2021) for the trainable Mixtral: y = x W^T + (alpha/r) (x A^T) B^T, W frozen, A [r, in] drawn
// Kaiming-uniform as PEFT does, B [out, r] zero, so training starts exactly at the base model. Attention's q/k/v/o and
// the feed-forward (every expert's w1/w2/w3, one A/B pair per expert, run inside the grouped expert GEMM over that
// expert's rows only; a dense layer's gate/up/down_proj) can be adapted. Adapters are saved in PEFT's layout
// (adapter_model.safetensors with base_model.model.<module>.lora_A.weight names, adapter_config.json) and merge
// back into the weights as W += (alpha/r) B A.

import * as fs from 'node:fs';
import * as path from 'node:path';
import { FormatError } from '../formats/errors.js';
import { readSafetensors, writeSafetensors } from '../formats/safetensors.js';
import { dequantize } from '../tensor/quant.js';
import { f32Tensor, shapeString, type Tensor } from '../tensor/tensor.js';
import { alloc, Var, type Float } from '../autograd/tape.js';
import { add, affine, linear } from '../autograd/ops.js';
import { groupedLinear } from '../autograd/moe.js';
import { Rng } from '../util/rng.js';
import { isMoeLayer, MixtralTrain, type MixtralTrainConfig, type ProjectionAdapters } from './mixtral-train.js';

// ---------------------------------------------------------------------------------------------------------------
// The differentiable pieces

/** x [N, in] W^T + scale (x A^T) B^T with W [out, in], A [r, in], B [out, r]: [N, out]. */
export function loraLinear(x: Var, w: Var, a: Var, b: Var, scale: number): Var {
  // The scale multiplies the narrow [N, r] intermediate, not the [N, out] result.
  return add(linear(x, w), linear(affine(linear(x, a), scale), b));
}

/**
 * The grouped expert GEMM with per-expert adapters: rows of x [S, in] sorted by expert (offsets), each through its
 * expert's W [E, out, in] plus scale (x A_e^T) B_e^T with A [E, r, in], B [E, out, r]: [S, out].
 */
export function loraGroupedLinear(x: Var, w: Var, a: Var, b: Var, offsets: Int32Array, scale: number): Var {
  return add(groupedLinear(x, w, offsets), groupedLinear(affine(groupedLinear(x, a, offsets), scale), b, offsets));
}

// ---------------------------------------------------------------------------------------------------------------
// Configuration and the adapted modules

/** attn = q_proj, k_proj, v_proj, o_proj; experts = every expert's w1, w2, w3 (in a dense layer: gate/up/down_proj). */
export type LoraTarget = 'attn' | 'experts';
export const LORA_TARGETS: readonly LoraTarget[] = ['attn', 'experts'];

export interface LoraConfig {
  /** Rank r. */
  r: number;
  /** The update is scaled by alpha / r. */
  alpha: number;
  targets: LoraTarget[];
}

export const DEFAULT_LORA: Readonly<LoraConfig> = Object.freeze({ r: 8, alpha: 16, targets: ['attn', 'experts'] as LoraTarget[] });

export function loraConfigProblems(c: LoraConfig): string[] {
  const p: string[] = [];
  if (!(Number.isInteger(c.r) && c.r >= 1)) p.push(`LoRA rank must be a positive integer, got ${String(c.r)}`);
  if (!(typeof c.alpha === 'number' && Number.isFinite(c.alpha) && c.alpha > 0)) p.push(`LoRA alpha must be a number > 0, got ${String(c.alpha)}`);
  if (!Array.isArray(c.targets) || !c.targets.length || c.targets.some((t) => !LORA_TARGETS.includes(t))) p.push(`LoRA targets must be some of ${LORA_TARGETS.join(', ')}, got ${String(c.targets)}`);
  return p;
}

/** One adapted weight. */
export interface LoraModule {
  /** The Hugging Face module path (model.layers.0.self_attn.q_proj); experts stacked: model.layers.0.block_sparse_moe.experts.w1. */
  name: string;
  in: number;
  out: number;
  /** Experts stacked in A [E, r, in] and B [E, out, r] (the grouped path); null for a plain linear. */
  experts: number | null;
}

const ATTN = ['q_proj', 'k_proj', 'v_proj', 'o_proj'] as const;
const EXPERT_W = ['w1', 'w2', 'w3'] as const;
const DENSE_FFN = ['gate_proj', 'up_proj', 'down_proj'] as const;
/** PEFT's prefix of a causal LM's adapter tensors. */
const PEFT_PREFIX = 'base_model.model.';

/** The modules a config adapts, in layer order (attention, then the feed-forward). */
export function loraModules(c: MixtralTrainConfig, targets: readonly LoraTarget[]): LoraModule[] {
  const D = c.hiddenSize;
  const F = c.intermediateSize;
  const q = c.numAttentionHeads * c.headDim;
  const kv = c.numKeyValueHeads * c.headDim;
  const out: LoraModule[] = [];
  for (let l = 0; l < c.numHiddenLayers; l++) {
    const b = `model.layers.${l}.`;
    if (targets.includes('attn')) {
      const dims: Record<(typeof ATTN)[number], [number, number]> = { q_proj: [D, q], k_proj: [D, kv], v_proj: [D, kv], o_proj: [q, D] };
      for (const k of ATTN) out.push({ name: `${b}self_attn.${k}`, in: dims[k][0], out: dims[k][1], experts: null });
    }
    if (targets.includes('experts')) {
      if (isMoeLayer(c, l)) {
        for (const w of EXPERT_W) out.push({ name: `${b}block_sparse_moe.experts.${w}`, in: w === 'w2' ? F : D, out: w === 'w2' ? D : F, experts: c.numLocalExperts });
      } else {
        for (const k of DENSE_FFN) out.push({ name: `${b}mlp.${k}`, in: k === 'down_proj' ? F : D, out: k === 'down_proj' ? D : F, experts: null });
      }
    }
  }
  return out;
}

/** The PEFT module of expert e of a stacked module (model.layers.0.block_sparse_moe.experts.w1 -> ...experts.<e>.w1). */
function expertModule(name: string, e: number): string {
  return name.replace(/\.experts\.(w[123])$/, `.experts.${e}.$1`);
}

/** PEFT tensor names of a module: base_model.model.<module>.lora_A.weight / lora_B.weight. */
export function peftNames(module: string): { a: string; b: string } {
  return { a: `${PEFT_PREFIX}${module}.lora_A.weight`, b: `${PEFT_PREFIX}${module}.lora_B.weight` };
}

// ---------------------------------------------------------------------------------------------------------------
// The adapter set

interface Pair {
  module: LoraModule;
  a: Var;
  b: Var;
}

/** A module's A [r, in] and B [out, r] (experts stacked: [E, r, in], [E, out, r]) as trainable Vars with PEFT names. */
function pairOf(m: LoraModule, r: number, a: Float, b: Float): Pair {
  const n = peftNames(m.name);
  const E = m.experts;
  return { module: m, a: Var.param(a, E ? [E, r, m.in] : [r, m.in], n.a), b: Var.param(b, E ? [E, m.out, r] : [m.out, r], n.b) };
}

export const ADAPTER_WEIGHTS_FILE = 'adapter_model.safetensors';
export const ADAPTER_CONFIG_FILE = 'adapter_config.json';

/**
 * The adapters of one model: attach() makes its forward pass consult them; namedParameters() are what trains.
 * The model's own weights are never touched (merge() returns a new model).
 */
export class LoraAdapters implements ProjectionAdapters {
  readonly scale: number;
  private readonly pairs = new Map<string, Pair>();

  private constructor(
    readonly modelConfig: MixtralTrainConfig,
    readonly config: LoraConfig,
    pairs: Pair[],
  ) {
    this.scale = config.alpha / config.r;
    for (const p of pairs) this.pairs.set(p.module.name, p);
  }

  /**
   * Fresh adapters for `model`: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform_(a=sqrt(5))), one seeded
   * stream in module order (experts in order within a module); B = 0. Same precision as the model.
   */
  static init(model: MixtralTrain, cfg: LoraConfig, opts: { seed?: number } = {}): LoraAdapters {
    const problems = loraConfigProblems(cfg);
    if (problems.length) throw new Error(problems.join('; '));
    const prec = model.params.embed_tokens.precision;
    const rng = new Rng(((opts.seed ?? 0) * 1_000_003 + 0x10a) % 2 ** 52);
    const pairs = loraModules(model.config, cfg.targets).map((m): Pair => {
      const E = m.experts ?? 1;
      const a = alloc(prec, E * cfg.r * m.in);
      const bound = 1 / Math.sqrt(m.in);
      for (let i = 0; i < a.length; i++) a[i] = (2 * rng.uniform() - 1) * bound;
      return pairOf(m, cfg.r, a, alloc(prec, E * m.out * cfg.r));
    });
    return new LoraAdapters(model.config, { ...cfg, targets: [...cfg.targets] }, pairs);
  }

  /**
   * Adapters from PEFT-named tensors (adapter_model.safetensors): exactly the modules `cfg` adapts in this model,
   * experts stacked back. Names and shapes are checked (FormatError naming `source`).
   */
  static fromTensors(model: MixtralTrain, cfg: LoraConfig, tensors: ReadonlyMap<string, Tensor>, source: string): LoraAdapters {
    const problems = loraConfigProblems(cfg);
    if (problems.length) throw new FormatError(source, problems.join('; '));
    const prec = model.params.embed_tokens.precision;
    const used = new Set<string>();
    const take = (name: string, shape: number[]): Float32Array => {
      const t = tensors.get(name);
      if (!t) throw new FormatError(source, `missing tensor ${name} (rank ${cfg.r}, targets ${cfg.targets.join(',')})`);
      if (shapeString(t.shape) !== shapeString(shape)) throw new FormatError(source, `${name} is ${shapeString(t.shape)}, expected ${shapeString(shape)}`);
      used.add(name);
      return dequantize(t);
    };
    const pairs = loraModules(model.config, cfg.targets).map((m): Pair => {
      const E = m.experts ?? 1;
      const a = alloc(prec, E * cfg.r * m.in);
      const b = alloc(prec, E * m.out * cfg.r);
      for (let e = 0; e < E; e++) {
        const n = peftNames(m.experts ? expertModule(m.name, e) : m.name);
        a.set(take(n.a, [cfg.r, m.in]), e * cfg.r * m.in);
        b.set(take(n.b, [m.out, cfg.r]), e * m.out * cfg.r);
      }
      return pairOf(m, cfg.r, a, b);
    });
    const extra = [...tensors.keys()].filter((n) => !used.has(n));
    if (extra.length) throw new FormatError(source, `tensors this model and LoRA config (targets ${cfg.targets.join(',')}) do not have: ${extra.slice(0, 5).join(', ')}${extra.length > 5 ? ` ... (${extra.length} in all)` : ''}`);
    return new LoraAdapters(model.config, { ...cfg, targets: [...cfg.targets] }, pairs);
  }

  /** Reads <dir>/adapter_config.json and adapter_model.safetensors written by save(). */
  static read(model: MixtralTrain, dir: string): LoraAdapters {
    const f = readLoraAdapter(dir);
    if (!f.targets) throw new FormatError(f.configFile, `target_modules ${JSON.stringify(f.targetModules)} are not the attention and/or expert modules this trainer adapts`);
    if (f.rslora) throw new FormatError(f.configFile, 'use_rslora adapters can be merged but not trained further here');
    return LoraAdapters.fromTensors(model, { r: f.r, alpha: f.alpha, targets: f.targets }, f.tensors, f.weightsFile);
  }

  /** Makes the model's forward pass use these adapters (replacing any it had); returns them. */
  attach(model: MixtralTrain): this {
    if (JSON.stringify(model.config) !== JSON.stringify(this.modelConfig)) throw new Error('LoraAdapters.attach: the adapters were made for another model config');
    model.adapters = this;
    return this;
  }

  /** The trainable tensors: A and B of each module, experts stacked, named base_model.model.<module>.lora_A.weight. */
  namedParameters(): [string, Var][] {
    return [...this.pairs.values()].flatMap((p): [string, Var][] => [[p.a.name, p.a], [p.b.name, p.b]]);
  }

  modules(): LoraModule[] {
    return [...this.pairs.values()].map((p) => p.module);
  }

  linear(name: string, x: Var, w: Var): Var | null {
    const p = this.pairs.get(name);
    return p ? loraLinear(x, w, p.a, p.b, this.scale) : null;
  }

  groupedLinear(name: string, x: Var, w: Var, offsets: Int32Array): Var | null {
    const p = this.pairs.get(name);
    return p ? loraGroupedLinear(x, w, p.a, p.b, offsets, this.scale) : null;
  }

  /** PEFT-named f32 tensors, one A/B pair per expert. */
  toPeftTensors(): Map<string, Tensor> {
    const out = new Map<string, Tensor>();
    const r = this.config.r;
    for (const { module: m, a, b } of this.pairs.values()) {
      const E = m.experts ?? 1;
      for (let e = 0; e < E; e++) {
        const n = peftNames(m.experts ? expertModule(m.name, e) : m.name);
        out.set(n.a, f32Tensor(Float32Array.from(a.data.subarray(e * r * m.in, (e + 1) * r * m.in)), [r, m.in]));
        out.set(n.b, f32Tensor(Float32Array.from(b.data.subarray(e * m.out * r, (e + 1) * m.out * r)), [m.out, r]));
      }
    }
    return out;
  }

  /** PEFT's adapter_config.json for these adapters. */
  adapterConfig(baseModel: string | null = null): Record<string, unknown> {
    const leaves = [...new Set(this.modules().map((m) => m.name.split('.').pop()!))];
    return {
      peft_type: 'LORA', task_type: 'CAUSAL_LM', base_model_name_or_path: baseModel, r: this.config.r, lora_alpha: this.config.alpha,
      lora_dropout: 0.0, target_modules: leaves, bias: 'none', fan_in_fan_out: false, use_rslora: false, use_dora: false,
      init_lora_weights: true, inference_mode: true, modules_to_save: null, rank_pattern: {}, alpha_pattern: {},
    };
  }

  /** Writes <dir>/adapter_model.safetensors and <dir>/adapter_config.json. */
  save(dir: string, baseModel: string | null = null): void {
    fs.mkdirSync(dir, { recursive: true });
    writeSafetensors(path.join(dir, ADAPTER_WEIGHTS_FILE), this.toPeftTensors(), { format: 'pt' });
    fs.writeFileSync(path.join(dir, ADAPTER_CONFIG_FILE), JSON.stringify(this.adapterConfig(baseModel), null, 2) + '\n');
  }

  /**
   * A new model with W + (alpha/r) B A in every adapted weight (computed in double, rounded to f32 once) and no
   * adapters; `model` is not changed. Its plain forward pass gives the adapted model's logits (up to rounding).
   */
  merge(model: MixtralTrain): MixtralTrain {
    const merged = mergeLoraTensors(model.toHFTensors({ includeNoise: true }), { scale: this.scale, tensors: this.toPeftTensors(), source: 'adapters' });
    return MixtralTrain.fromHFTensors(model.config, merged, { precision: model.params.embed_tokens.precision, source: 'merged LoRA model' });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Adapter files and merging

export interface LoraAdapterFiles {
  dir: string;
  configFile: string;
  weightsFile: string;
  r: number;
  alpha: number;
  rslora: boolean;
  /** The factor of B A: alpha / r (alpha / sqrt(r) with use_rslora). */
  scale: number;
  targetModules: string[];
  /** Our targets when target_modules name exactly the modules of some of them; else null (merge-only). */
  targets: LoraTarget[] | null;
  tensors: Map<string, Tensor>;
}

/** Reads a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors). */
export function readLoraAdapter(dir: string): LoraAdapterFiles {
  const configFile = path.join(dir, ADAPTER_CONFIG_FILE);
  const weightsFile = path.join(dir, ADAPTER_WEIGHTS_FILE);
  let text: string;
  try {
    text = fs.readFileSync(configFile, 'utf8');
  } catch {
    throw new FormatError(configFile, 'cannot be read (is this a LoRA adapter directory?)');
  }
  let j: Record<string, unknown>;
  try {
    j = JSON.parse(text) as Record<string, unknown>;
  } catch (e) {
    throw new FormatError(configFile, `not valid JSON: ${(e as Error).message}`);
  }
  if (!j || typeof j !== 'object') throw new FormatError(configFile, 'not a JSON object');
  if (j.peft_type !== undefined && j.peft_type !== 'LORA') throw new FormatError(configFile, `peft_type is ${JSON.stringify(j.peft_type)}, only LORA is supported`);
  const r = j.r;
  const alpha = j.lora_alpha;
  if (!(typeof r === 'number' && Number.isInteger(r) && r >= 1)) throw new FormatError(configFile, `r must be a positive integer, got ${JSON.stringify(r)}`);
  if (!(typeof alpha === 'number' && Number.isFinite(alpha) && alpha > 0)) throw new FormatError(configFile, `lora_alpha must be a number > 0, got ${JSON.stringify(alpha)}`);
  if (j.fan_in_fan_out === true) throw new FormatError(configFile, 'fan_in_fan_out adapters (Conv1D layout) are not supported');
  if (j.use_dora === true) throw new FormatError(configFile, 'DoRA adapters (use_dora) are not supported');
  for (const k of ['rank_pattern', 'alpha_pattern'] as const) {
    if (j[k] && typeof j[k] === 'object' && Object.keys(j[k] as object).length) throw new FormatError(configFile, `${k} (per-module rank or alpha) is not supported`);
  }
  const tm = j.target_modules;
  const targetModules = typeof tm === 'string' ? [tm] : Array.isArray(tm) && tm.every((t) => typeof t === 'string') ? (tm as string[]) : null;
  if (!targetModules) throw new FormatError(configFile, `target_modules must be a string or a list of strings, got ${JSON.stringify(tm)}`);
  const rslora = j.use_rslora === true;
  // Our targets: all four attention projections, and/or the whole feed-forward (w1..w3, a dense layer's gate/up/down).
  const count = (names: readonly string[]) => names.filter((n) => targetModules.includes(n)).length;
  const whole = (names: readonly string[]) => count(names) === 0 || count(names) === names.length;
  const known = targetModules.every((n) => ([...ATTN, ...EXPERT_W, ...DENSE_FFN] as string[]).includes(n));
  const ffn = count(EXPERT_W) + count(DENSE_FFN) > 0;
  const targets: LoraTarget[] | null =
    known && whole(ATTN) && whole(EXPERT_W) && whole(DENSE_FFN) && (count(ATTN) > 0 || ffn) ? [...(count(ATTN) ? (['attn'] as const) : []), ...(ffn ? (['experts'] as const) : [])] : null;
  const tensors = readSafetensors(weightsFile).tensors;
  return { dir, configFile, weightsFile, r, alpha, rslora, scale: rslora ? alpha / Math.sqrt(r) : alpha / r, targetModules, targets, tensors };
}

/**
 * Hugging Face weights with every adapter pair of `adapter` merged: for each base_model.model.<m>.lora_A.weight
 * (with its lora_B), <m>.weight += scale B A. The result holds f32 copies of the merged weights and the other
 * tensors as given. Every adapter tensor must be a lora_A/lora_B of a weight present, with matching shapes.
 */
export function mergeLoraTensors(base: ReadonlyMap<string, Tensor>, adapter: { scale: number; tensors: ReadonlyMap<string, Tensor>; source: string }): Map<string, Tensor> {
  const out = new Map(base);
  const src = adapter.source;
  const re = /^base_model\.model\.(.+)\.lora_([AB])\.weight$/;
  for (const name of adapter.tensors.keys()) if (!re.test(name)) throw new FormatError(src, `${name} is not a LoRA lora_A/lora_B weight (base_model.model.<module>.lora_A.weight)`);
  for (const [name, ta] of adapter.tensors) {
    const m = re.exec(name)!;
    if (m[2] !== 'A') {
      if (!adapter.tensors.has(`${PEFT_PREFIX}${m[1]}.lora_A.weight`)) throw new FormatError(src, `${name} has no lora_A`);
      continue;
    }
    const bName = `${PEFT_PREFIX}${m[1]}.lora_B.weight`;
    const tb = adapter.tensors.get(bName);
    if (!tb) throw new FormatError(src, `${name} has no ${bName}`);
    const wName = `${m[1]}.weight`;
    const tw = base.get(wName);
    if (!tw) throw new FormatError(src, `${name} adapts ${wName}, which the model does not have`);
    if (tw.shape.length !== 2 || ta.shape.length !== 2 || tb.shape.length !== 2) throw new FormatError(src, `${name}: LoRA weights and their base must be matrices`);
    const [out_, in_] = tw.shape as [number, number];
    const r = ta.shape[0]!;
    if (ta.shape[1] !== in_ || tb.shape[0] !== out_ || tb.shape[1] !== r) {
      throw new FormatError(src, `${m[1]}: lora_A ${shapeString(ta.shape)} and lora_B ${shapeString(tb.shape)} do not fit the weight ${shapeString(tw.shape)} (A [r, ${in_}], B [${out_}, r])`);
    }
    const w = dequantize(tw);
    const a = dequantize(ta);
    const b = dequantize(tb);
    const merged = new Float32Array(out_ * in_);
    const acc = new Float64Array(in_);
    for (let o = 0; o < out_; o++) {
      acc.fill(0);
      for (let k = 0; k < r; k++) {
        const bv = b[o * r + k]!;
        if (bv === 0) continue;
        const ao = k * in_;
        for (let i = 0; i < in_; i++) acc[i] = acc[i]! + bv * a[ao + i]!;
      }
      for (let i = 0; i < in_; i++) merged[o * in_ + i] = w[o * in_ + i]! + adapter.scale * acc[i]!;
    }
    out.set(wName, f32Tensor(merged, tw.shape));
  }
  return out;
}
