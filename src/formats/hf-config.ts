// Hugging Face config.json / generation_config.json for Mixtral (and dense Mistral / Llama, read as one expert).
//
// Defaults follow transformers' config classes (MixtralConfig, MistralConfig, LlamaConfig) where the brief allows a
// field to be absent; the fields that decide tensor shapes are required. Anything the forward pass cannot honour
// (another activation, RoPE scaling, attention/MLP biases) is refused rather than silently run wrong.

import * as fs from 'node:fs';
import * as path from 'node:path';
import { FormatError } from './errors.js';
import { configProblems, type MixtralConfig } from '../model/config.js';

export type HFArchitecture = 'MixtralForCausalLM' | 'MistralForCausalLM' | 'LlamaForCausalLM';

const MODEL_TYPE: Readonly<Record<HFArchitecture, string>> = {
  MixtralForCausalLM: 'mixtral',
  MistralForCausalLM: 'mistral',
  LlamaForCausalLM: 'llama',
};

/** transformers' class defaults for the optional fields. */
const DEFAULTS: Readonly<Record<HFArchitecture, { rmsNormEps: number; ropeTheta: number; maxPositionEmbeddings: number }>> = {
  MixtralForCausalLM: { rmsNormEps: 1e-5, ropeTheta: 1e6, maxPositionEmbeddings: 4096 * 32 },
  MistralForCausalLM: { rmsNormEps: 1e-6, ropeTheta: 10000, maxPositionEmbeddings: 4096 * 32 },
  LlamaForCausalLM: { rmsNormEps: 1e-6, ropeTheta: 10000, maxPositionEmbeddings: 2048 },
};

export interface HFModelConfig {
  readonly config: MixtralConfig;
  readonly architecture: HFArchitecture;
  readonly bosTokenId: number | null;
  /** eos_token_id as a list (config.json may hold one id or several). */
  readonly eosTokenIds: number[];
  /** torch_dtype (or transformers 5's `dtype`), e.g. "bfloat16"; null when absent. */
  readonly torchDtype: string | null;
  /** router_aux_loss_coef when given (Mixtral). */
  readonly routerAuxLossCoef: number | null;
  /** The parsed JSON, for fields moe-ts does not model. */
  readonly raw: Readonly<Record<string, unknown>>;
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function readJson(file: string): unknown {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new FormatError(file, `cannot read the file: ${(e as Error).message}`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new FormatError(file, `not valid JSON: ${(e as Error).message}`);
  }
}

/** Typed field access that names the field in every error. null counts as absent, as transformers treats it. */
class Fields {
  constructor(
    readonly file: string,
    readonly obj: Record<string, unknown>,
  ) {}

  private fail(key: string, want: string): never {
    throw new FormatError(this.file, `${key} must be ${want}, got ${JSON.stringify(this.obj[key])}`);
  }

  has(key: string): boolean {
    return this.obj[key] !== undefined && this.obj[key] !== null;
  }

  int(key: string, fallback?: number): number {
    if (!this.has(key)) {
      if (fallback === undefined) throw new FormatError(this.file, `required field ${key} is missing`);
      return fallback;
    }
    const v = this.obj[key];
    if (typeof v !== 'number' || !Number.isSafeInteger(v)) this.fail(key, 'an integer');
    return v;
  }

  num(key: string, fallback?: number): number {
    if (!this.has(key)) {
      if (fallback === undefined) throw new FormatError(this.file, `required field ${key} is missing`);
      return fallback;
    }
    const v = this.obj[key];
    if (typeof v !== 'number' || !Number.isFinite(v)) this.fail(key, 'a finite number');
    return v;
  }

  optNum(key: string): number | undefined {
    return this.has(key) ? this.num(key) : undefined;
  }

  optInt(key: string): number | undefined {
    return this.has(key) ? this.int(key) : undefined;
  }

  bool(key: string, fallback: boolean): boolean {
    if (!this.has(key)) return fallback;
    const v = this.obj[key];
    if (typeof v !== 'boolean') this.fail(key, 'true or false');
    return v;
  }

  optBool(key: string): boolean | undefined {
    return this.has(key) ? this.bool(key, false) : undefined;
  }

  optString(key: string): string | undefined {
    if (!this.has(key)) return undefined;
    const v = this.obj[key];
    if (typeof v !== 'string') this.fail(key, 'a string');
    return v;
  }

  /** A token id or a list of them (eos_token_id), as a list. */
  ids(key: string): number[] | undefined {
    if (!this.has(key)) return undefined;
    const v = this.obj[key];
    const list = Array.isArray(v) ? v : [v];
    if (!list.every((x) => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0)) this.fail(key, 'a token id or a list of token ids');
    return list as number[];
  }
}

function architectureOf(f: Fields): HFArchitecture {
  const known = Object.keys(MODEL_TYPE) as HFArchitecture[];
  if (f.has('architectures')) {
    const a = f.obj.architectures;
    if (!Array.isArray(a) || !a.every((x) => typeof x === 'string')) {
      throw new FormatError(f.file, `architectures must be a list of strings, got ${JSON.stringify(a)}`);
    }
    const found = known.find((k) => a.includes(k));
    if (found) return found;
    throw new FormatError(f.file, `architectures ${JSON.stringify(a)} names none that moe-ts runs (${known.join(', ')})`);
  }
  // No architectures list: fall back on model_type.
  const mt = f.optString('model_type');
  const found = known.find((k) => MODEL_TYPE[k] === mt);
  if (found) return found;
  throw new FormatError(f.file, `neither architectures nor model_type names a model moe-ts runs (model_type ${JSON.stringify(mt ?? null)})`);
}

/** Parses a config.json object (already JSON-parsed); `file` is used in errors. */
export function parseHFConfig(json: unknown, file: string): HFModelConfig {
  if (!isRecord(json)) throw new FormatError(file, 'config is not a JSON object');
  const f = new Fields(file, json);
  const architecture = architectureOf(f);
  const defaults = DEFAULTS[architecture];
  const moe = architecture === 'MixtralForCausalLM';

  const act = f.optString('hidden_act') ?? 'silu';
  if (act !== 'silu') throw new FormatError(file, `hidden_act ${JSON.stringify(act)} is not supported (moe-ts runs SwiGLU with silu)`);
  for (const key of ['attention_bias', 'mlp_bias']) {
    if (f.bool(key, false)) throw new FormatError(file, `${key} is true: biases are not supported (Mixtral has none)`);
  }
  // RoPE scaling (linear, dynamic, yarn, llama3 ...) changes the frequencies; only plain RoPE is implemented.
  const ropeTheta = ropeThetaOf(f, defaults.ropeTheta);

  const hiddenSize = f.int('hidden_size');
  const numAttentionHeads = f.int('num_attention_heads');
  let headDim: number;
  if (f.has('head_dim')) headDim = f.int('head_dim');
  else {
    if (numAttentionHeads > 0 && hiddenSize % numAttentionHeads !== 0) {
      throw new FormatError(file, `head_dim is absent and hidden_size ${hiddenSize} is not a multiple of num_attention_heads ${numAttentionHeads}`);
    }
    headDim = numAttentionHeads > 0 ? hiddenSize / numAttentionHeads : 0;
  }
  const sliding = f.has('sliding_window') ? f.int('sliding_window') : null;
  const config: MixtralConfig = {
    vocabSize: f.int('vocab_size'),
    hiddenSize,
    intermediateSize: f.int('intermediate_size'),
    numHiddenLayers: f.int('num_hidden_layers'),
    numAttentionHeads,
    numKeyValueHeads: f.int('num_key_value_heads', numAttentionHeads),
    headDim,
    numLocalExperts: moe ? f.int('num_local_experts') : 1,
    numExpertsPerTok: moe ? f.int('num_experts_per_tok') : 1,
    rmsNormEps: f.num('rms_norm_eps', defaults.rmsNormEps),
    ropeTheta,
    maxPositionEmbeddings: f.int('max_position_embeddings', defaults.maxPositionEmbeddings),
    slidingWindow: sliding,
    tieWordEmbeddings: f.bool('tie_word_embeddings', false),
  };
  const problems = configProblems(config);
  if (problems.length > 0) throw new FormatError(file, `config cannot run: ${problems.map(toHFNames).join('; ')}`);

  const bos = f.ids('bos_token_id');
  if (bos !== undefined && bos.length !== 1) throw new FormatError(file, `bos_token_id must be one token id, got ${JSON.stringify(json.bos_token_id)}`);
  const torchDtype = f.optString('torch_dtype') ?? f.optString('dtype') ?? null;
  return {
    config,
    architecture,
    bosTokenId: bos ? bos[0] : null,
    eosTokenIds: f.ids('eos_token_id') ?? [],
    torchDtype,
    routerAuxLossCoef: moe ? f.optNum('router_aux_loss_coef') ?? null : null,
    raw: json,
  };
}

/** config.json's name for each MixtralConfig field, so problems name what the user sees in the file. */
const HF_FIELD: Readonly<Record<keyof MixtralConfig, string>> = {
  vocabSize: 'vocab_size', hiddenSize: 'hidden_size', intermediateSize: 'intermediate_size',
  numHiddenLayers: 'num_hidden_layers', numAttentionHeads: 'num_attention_heads', numKeyValueHeads: 'num_key_value_heads',
  headDim: 'head_dim', numLocalExperts: 'num_local_experts', numExpertsPerTok: 'num_experts_per_tok',
  rmsNormEps: 'rms_norm_eps', ropeTheta: 'rope_theta', maxPositionEmbeddings: 'max_position_embeddings',
  slidingWindow: 'sliding_window', tieWordEmbeddings: 'tie_word_embeddings',
};

function toHFNames(problem: string): string {
  return problem.replace(/\b[a-z]+(?:[A-Z][a-z]*)+\b/g, (w) => HF_FIELD[w as keyof MixtralConfig] ?? w);
}

function ropeThetaOf(f: Fields, fallback: number): number {
  for (const key of ['rope_scaling', 'rope_parameters']) {
    if (!f.has(key)) continue;
    const r = f.obj[key];
    if (!isRecord(r)) throw new FormatError(f.file, `${key} must be an object, got ${JSON.stringify(r)}`);
    const type = r.rope_type ?? r.type ?? 'default';
    if (type !== 'default') throw new FormatError(f.file, `${key} type ${JSON.stringify(type)} is not supported (only plain RoPE)`);
  }
  if (f.has('rope_theta')) return f.num('rope_theta');
  // transformers 5 moved rope_theta into rope_parameters.
  const rp = f.obj.rope_parameters;
  if (isRecord(rp) && rp.rope_theta !== undefined) {
    return new Fields(f.file, rp).num('rope_theta');
  }
  return fallback;
}

/** Reads config.json from a checkpoint folder (or the file itself). */
export function readHFConfig(dirOrFile: string): HFModelConfig {
  const file = fs.existsSync(dirOrFile) && fs.statSync(dirOrFile).isDirectory() ? path.join(dirOrFile, 'config.json') : dirOrFile;
  return parseHFConfig(readJson(file), file);
}

// ---------------------------------------------------------------------------------------------------------------
// generation_config.json

export interface GenerationConfig {
  temperature?: number;
  topP?: number;
  topK?: number;
  maxNewTokens?: number;
  maxLength?: number;
  doSample?: boolean;
  /** eos_token_id, always as a list. */
  eosTokenIds?: number[];
  bosTokenId?: number;
  padTokenId?: number;
  repetitionPenalty?: number;
}

/** Parses a generation_config.json object; absent or null fields are left out. */
export function parseGenerationConfig(json: unknown, file: string): GenerationConfig {
  if (!isRecord(json)) throw new FormatError(file, 'generation config is not a JSON object');
  const f = new Fields(file, json);
  const g: GenerationConfig = {};
  const set = <K extends keyof GenerationConfig>(k: K, v: GenerationConfig[K] | undefined) => {
    if (v !== undefined) g[k] = v;
  };
  const nonNeg = (key: string, v: number | undefined) => {
    if (v !== undefined && v < 0) throw new FormatError(file, `${key} must not be negative, got ${v}`);
    return v;
  };
  set('temperature', nonNeg('temperature', f.optNum('temperature')));
  set('topP', nonNeg('top_p', f.optNum('top_p')));
  set('topK', nonNeg('top_k', f.optInt('top_k')));
  set('maxNewTokens', nonNeg('max_new_tokens', f.optInt('max_new_tokens')));
  set('maxLength', nonNeg('max_length', f.optInt('max_length')));
  set('doSample', f.optBool('do_sample'));
  set('eosTokenIds', f.ids('eos_token_id'));
  const one = (key: string) => {
    const ids = f.ids(key);
    if (ids !== undefined && ids.length !== 1) throw new FormatError(file, `${key} must be one token id, got ${JSON.stringify(json[key])}`);
    return ids?.[0];
  };
  set('bosTokenId', one('bos_token_id'));
  set('padTokenId', one('pad_token_id'));
  set('repetitionPenalty', nonNeg('repetition_penalty', f.optNum('repetition_penalty')));
  return g;
}

/** Reads generation_config.json from a checkpoint folder; null when the folder has none. */
export function readGenerationConfig(dir: string): GenerationConfig | null {
  const file = path.join(dir, 'generation_config.json');
  if (!fs.existsSync(file)) return null;
  return parseGenerationConfig(readJson(file), file);
}

// ---------------------------------------------------------------------------------------------------------------
// Writing

export interface HFConfigExtra {
  bosTokenId?: number | null;
  eosTokenId?: number | readonly number[] | null;
  /** torch_dtype, e.g. "bfloat16" or "float32". */
  torchDtype?: string;
  routerAuxLossCoef?: number;
  /** Further fields, written last (and overriding). */
  fields?: Record<string, unknown>;
}

/**
 * The config.json object for a config, shaped like the one transformers writes: MixtralForCausalLM for a MoE model,
 * MistralForCausalLM for a dense (one-expert) one, whose checkpoint uses mlp.* names.
 */
export function mixtralConfigToHF(c: MixtralConfig, extra: HFConfigExtra = {}): Record<string, unknown> {
  const problems = configProblems(c);
  if (problems.length > 0) throw new Error(`mixtralConfigToHF: ${problems.join('; ')}`);
  const moe = c.numLocalExperts > 1;
  const arch: HFArchitecture = moe ? 'MixtralForCausalLM' : 'MistralForCausalLM';
  const eos = extra.eosTokenId === undefined ? 2 : extra.eosTokenId;
  const out: Record<string, unknown> = {
    architectures: [arch],
    model_type: MODEL_TYPE[arch],
    vocab_size: c.vocabSize,
    hidden_size: c.hiddenSize,
    intermediate_size: c.intermediateSize,
    num_hidden_layers: c.numHiddenLayers,
    num_attention_heads: c.numAttentionHeads,
    num_key_value_heads: c.numKeyValueHeads,
    head_dim: c.headDim,
    ...(moe ? { num_local_experts: c.numLocalExperts, num_experts_per_tok: c.numExpertsPerTok } : {}),
    hidden_act: 'silu',
    rms_norm_eps: c.rmsNormEps,
    rope_theta: c.ropeTheta,
    max_position_embeddings: c.maxPositionEmbeddings,
    sliding_window: c.slidingWindow,
    tie_word_embeddings: c.tieWordEmbeddings,
    bos_token_id: extra.bosTokenId === undefined ? 1 : extra.bosTokenId,
    eos_token_id: Array.isArray(eos) && eos.length === 1 ? eos[0] : eos,
    attention_dropout: 0.0,
    initializer_range: 0.02,
    ...(moe
      ? { output_router_logits: false, router_aux_loss_coef: extra.routerAuxLossCoef ?? 0.02, router_jitter_noise: 0.0 }
      : {}),
    use_cache: true,
    torch_dtype: extra.torchDtype ?? 'float32',
    ...(extra.fields ?? {}),
  };
  return out;
}

/** Writes config.json into `dir`. */
export function writeHFConfig(dir: string, c: MixtralConfig, extra: HFConfigExtra = {}): string {
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, 'config.json');
  fs.writeFileSync(file, JSON.stringify(mixtralConfigToHF(c, extra), null, 2) + '\n');
  return file;
}
