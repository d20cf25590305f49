// Loading a Mixtral model from a GGUF file or a Hugging Face checkpoint directory into MixtralWeights.
// Both paths meet in GGUF naming and GGUF RoPE row order (HF checkpoints are renamed and q/k rows permuted).

import * as fs from 'node:fs';
import { FormatError } from '../formats/errors.js';
import { readGGUF, getString } from '../formats/gguf.js';
import { mixtralConfigFromGGUF, vocabFromGGUF } from '../formats/gguf-config.js';
import { readHFConfig } from '../formats/hf-config.js';
import { readCheckpointTensors } from '../formats/safetensors.js';
import { readHFTokenizer } from '../tokenizer/sources.js';
import { SentencePieceTokenizer, VocabError, type VocabData } from '../tokenizer/sentencepiece.js';
import type { Tensor } from '../tensor/tensor.js';
import { shapeString } from '../tensor/tensor.js';
import { dequantize } from '../tensor/quant.js';
import { checkTensorSet, expectedShapes, hfTensorsToGGUF, stackExperts } from '../formats/names.js';
import type { Backend } from '../backend/backend.js';
import { selectBackend, type BackendName } from '../backend/select.js';
import { parameterCounts, type MixtralConfig } from './config.js';
import { MixtralModel, type MixtralDecoderLayer, type MixtralSession, type MixtralSessionOptions, type MixtralWeights } from './mixtral.js';
import type { LanguageModel } from './types.js';

/** Turns GGUF-named tensors (stacked experts, or the older one-tensor-per-expert layout) into the model's weights. */
export function mixtralWeightsFromGGUFTensors(tensors: ReadonlyMap<string, Tensor>, c: MixtralConfig, file: string): MixtralWeights {
  const all = stackPerExpertTensors(tensors, c, file);
  checkTensorSet(all, expectedShapes(c, 'gguf'), file);
  const get = (name: string): Tensor => all.get(name)!;
  const E = c.numLocalExperts;
  // A dense model's single FFN is expert 0 of a one-expert stack (same bytes, one more dimension).
  const experts = (l: number, kind: 'gate' | 'up' | 'down'): Tensor => {
    if (E > 1) return get(`blk.${l}.ffn_${kind}_exps.weight`);
    const t = get(`blk.${l}.ffn_${kind}.weight`);
    return { dtype: t.dtype, shape: [1, ...t.shape], data: t.data };
  };
  const layers: MixtralDecoderLayer[] = [];
  for (let l = 0; l < c.numHiddenLayers; l++) {
    const b = `blk.${l}.`;
    layers.push({
      input_layernorm: dequantize(get(`${b}attn_norm.weight`)),
      self_attn: {
        q_proj: get(`${b}attn_q.weight`),
        k_proj: get(`${b}attn_k.weight`),
        v_proj: get(`${b}attn_v.weight`),
        o_proj: get(`${b}attn_output.weight`),
      },
      post_attention_layernorm: dequantize(get(`${b}ffn_norm.weight`)),
      block_sparse_moe: {
        gate: E > 1 ? get(`${b}ffn_gate_inp.weight`) : null,
        experts: { w1: experts(l, 'gate'), w3: experts(l, 'up'), w2: experts(l, 'down') },
      },
    });
  }
  const embed = get('token_embd.weight');
  return { embed_tokens: embed, layers, norm: dequantize(get('output_norm.weight')), lm_head: c.tieWordEmbeddings ? embed : get('output.weight') };
}

/** Older llama.cpp files store experts one by one (blk.N.ffn_gate.E.weight): stack them (a copy only these files pay). */
function stackPerExpertTensors(tensors: ReadonlyMap<string, Tensor>, c: MixtralConfig, file: string): ReadonlyMap<string, Tensor> {
  if (c.numLocalExperts < 2 || !tensors.has('blk.0.ffn_gate.0.weight')) return tensors;
  const out = new Map(tensors);
  for (let l = 0; l < c.numHiddenLayers; l++) {
    for (const kind of ['gate', 'up', 'down']) {
      const names = Array.from({ length: c.numLocalExperts }, (_, e) => `blk.${l}.ffn_${kind}.${e}.weight`);
      const missing = names.filter((n) => !tensors.has(n));
      if (missing.length) throw new FormatError(file, `missing tensors: ${missing.join(', ')}`);
      const parts = names.map((n) => tensors.get(n)!);
      const shapes = new Set(parts.map((p) => `${p.dtype} ${shapeString(p.shape)}`));
      if (shapes.size > 1) throw new FormatError(file, `experts of blk.${l}.ffn_${kind} differ in type or shape: ${[...shapes].join(' / ')}`);
      names.forEach((n) => out.delete(n));
      out.set(`blk.${l}.ffn_${kind}_exps.weight`, stackExperts(parts));
    }
  }
  return out;
}

export interface LoadOptions {
  /** Worker threads for backends that use them (0 = the backend's default). The `ref` backend is single-threaded. */
  threads?: number;
  /** A backend instance, or which one to pick ('auto': native when its addon is built, else ref). Default 'auto'. */
  backend?: Backend | BackendName;
}

/** A model ready to run: weights, tokenizer, chat template, and where they came from. */
export class LoadedModel implements LanguageModel {
  readonly model: MixtralModel;
  constructor(
    readonly path: string,
    readonly format: 'gguf' | 'hf',
    readonly config: MixtralConfig,
    /** All tensors in GGUF naming and RoPE order (views of the file where possible). */
    readonly tensors: ReadonlyMap<string, Tensor>,
    readonly tokenizer: SentencePieceTokenizer,
    readonly vocab: VocabData,
    readonly chatTemplate: string | undefined,
    weights: MixtralWeights,
    backend: Backend,
  ) {
    this.model = new MixtralModel(config, weights, backend);
  }

  newSession(opts: MixtralSessionOptions = {}): MixtralSession {
    return this.model.newSession(opts);
  }
}

/** Loads a GGUF file or a Hugging Face checkpoint directory. Bad files throw FormatError naming file and field. */
export function loadModel(p: string, opts: LoadOptions = {}): LoadedModel {
  const backend = typeof opts.backend === 'object' ? opts.backend : selectBackend({ threads: opts.threads, ...(opts.backend ? { backend: opts.backend } : {}) });
  let st: fs.Stats;
  try {
    st = fs.statSync(p);
  } catch {
    throw new FormatError(p, 'no such file or directory');
  }
  if (st.isDirectory()) return loadHF(p, backend);
  const f = readGGUF(p);
  const config = mixtralConfigFromGGUF(f);
  const vocab = vocabFromGGUF(f);
  const tokenizer = makeTokenizer(vocab, p);
  if (tokenizer.vocabSize !== config.vocabSize) throw new FormatError(p, `the tokenizer has ${tokenizer.vocabSize} tokens but the model's vocabulary is ${config.vocabSize}`);
  const template = getString(f, 'tokenizer.chat_template', { required: false });
  const weights = mixtralWeightsFromGGUFTensors(f.tensors, config, p);
  return new LoadedModel(p, 'gguf', config, f.tensors, tokenizer, vocab, template, weights, backend);
}

function loadHF(dir: string, backend: Backend): LoadedModel {
  const hf = readHFConfig(dir);
  const config = hf.config;
  const ckpt = readCheckpointTensors(dir);
  const tensors = hfTensorsToGGUF(ckpt.tensors, config, { source: dir });
  const { vocab, chatTemplate } = readHFTokenizer(dir, hf.bosTokenId, hf.eosTokenIds[0] ?? null);
  const tokenizer = makeTokenizer(vocab, dir);
  if (tokenizer.vocabSize !== config.vocabSize) throw new FormatError(dir, `the tokenizer has ${tokenizer.vocabSize} tokens but config.json says vocab_size ${config.vocabSize}`);
  const weights = mixtralWeightsFromGGUFTensors(tensors, config, dir);
  return new LoadedModel(dir, 'hf', config, tensors, tokenizer, vocab, chatTemplate, weights, backend);
}

function makeTokenizer(vocab: VocabData, file: string): SentencePieceTokenizer {
  try {
    return new SentencePieceTokenizer(vocab);
  } catch (e) {
    if (e instanceof VocabError) throw new FormatError(file, `tokenizer: ${e.message}`);
    throw e;
  }
}

/** What `moe inspect` prints. */
export function describeModel(m: LoadedModel) {
  const dtypes: Record<string, number> = {};
  for (const t of m.tensors.values()) dtypes[t.dtype] = (dtypes[t.dtype] ?? 0) + 1;
  return {
    path: m.path,
    format: m.format,
    architecture: m.config.numLocalExperts > 1 ? `Mixtral (sparse MoE: ${m.config.numLocalExperts} experts, top-${m.config.numExpertsPerTok})` : 'dense (Llama/Mistral: one FFN)',
    config: m.config,
    parameters: parameterCounts(m.config),
    dtypes,
    tensors: [...m.tensors].map(([name, t]) => ({ name, dtype: t.dtype, shape: [...t.shape] })),
    tokenizer: { kind: 'SentencePiece BPE with byte fallback', vocabSize: m.tokenizer.vocabSize, bos: m.tokenizer.bosId, eos: m.tokenizer.eosId, unk: m.tokenizer.unkId },
    chatTemplate: m.chatTemplate ?? null,
  };
}
