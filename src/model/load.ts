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
import { shapeString, tensorByteSize } from '../tensor/tensor.js';
import { dequantize } from '../tensor/quant.js';
import { hfTensorsToGGUF, stackExperts } from '../formats/names.js';
import type { Backend } from '../backend/backend.js';
import { RefBackend } from '../backend/ref.js';
import { parameterCounts, type MixtralConfig } from './config.js';
import { MixtralModel, type MixtralDecoderLayer, type MixtralSession, type MixtralSessionOptions, type MixtralWeights } from './mixtral.js';
import type { LanguageModel } from './types.js';

/** Turns GGUF-named tensors (stacked experts, or the older one-tensor-per-expert layout) into the model's weights. */
export function mixtralWeightsFromGGUFTensors(tensors: ReadonlyMap<string, Tensor>, c: MixtralConfig, file: string): MixtralWeights {
  const used = new Set<string>();
  const get = (name: string, shape: number[]): Tensor => {
    const t = tensors.get(name);
    if (!t) throw new FormatError(file, `missing tensor '${name}' (expected shape ${shapeString(shape)})`);
    checkShape(file, name, t, shape);
    used.add(name);
    return t;
  };
  const vector = (name: string, len: number): Float32Array => dequantize(get(name, [len]));
  const d = c.hiddenSize;
  const hd = c.headDim;
  const E = c.numLocalExperts;
  const ffn = c.intermediateSize;

  const experts = (l: number, kind: 'gate' | 'up' | 'down', shape: number[]): Tensor => {
    const stacked = `blk.${l}.ffn_${kind}_exps.weight`;
    if (tensors.has(stacked)) return get(stacked, [E, ...shape]);
    if (E === 1 && tensors.has(`blk.${l}.ffn_${kind}.weight`)) {
      const t = get(`blk.${l}.ffn_${kind}.weight`, shape);
      return { dtype: t.dtype, shape: [1, ...shape], data: t.data };
    }
    if (tensors.has(`blk.${l}.ffn_${kind}.0.weight`)) {
      // Older llama.cpp files store experts one by one: stack them (a copy; only these legacy files pay it).
      const parts = Array.from({ length: E }, (_, e) => get(`blk.${l}.ffn_${kind}.${e}.weight`, shape));
      const dtypes = new Set(parts.map((p) => p.dtype));
      if (dtypes.size > 1) throw new FormatError(file, `experts of blk.${l}.ffn_${kind} mix dtypes ${[...dtypes].join(', ')}`);
      return stackExperts(parts);
    }
    throw new FormatError(file, `missing tensor '${stacked}' (expected shape ${shapeString([E, ...shape])})`);
  };

  const layers: MixtralDecoderLayer[] = [];
  for (let l = 0; l < c.numHiddenLayers; l++) {
    const b = `blk.${l}.`;
    layers.push({
      input_layernorm: vector(`${b}attn_norm.weight`, d),
      self_attn: {
        q_proj: get(`${b}attn_q.weight`, [c.numAttentionHeads * hd, d]),
        k_proj: get(`${b}attn_k.weight`, [c.numKeyValueHeads * hd, d]),
        v_proj: get(`${b}attn_v.weight`, [c.numKeyValueHeads * hd, d]),
        o_proj: get(`${b}attn_output.weight`, [d, c.numAttentionHeads * hd]),
      },
      post_attention_layernorm: vector(`${b}ffn_norm.weight`, d),
      block_sparse_moe: {
        gate: E > 1 ? get(`${b}ffn_gate_inp.weight`, [E, d]) : null,
        experts: { w1: experts(l, 'gate', [ffn, d]), w3: experts(l, 'up', [ffn, d]), w2: experts(l, 'down', [d, ffn]) },
      },
    });
  }
  const embed = get('token_embd.weight', [c.vocabSize, d]);
  const head = tensors.has('output.weight') ? get('output.weight', [c.vocabSize, d]) : embed;
  const norm = vector('output_norm.weight', d);
  const unused = [...tensors.keys()].filter((n) => !used.has(n) && !n.startsWith('rope_freqs'));
  if (unused.length) throw new FormatError(file, `tensors that a Mixtral model does not have: ${unused.slice(0, 8).join(', ')}${unused.length > 8 ? ` and ${unused.length - 8} more` : ''}`);
  return { embed_tokens: embed, layers, norm, lm_head: head };
}

function checkShape(file: string, name: string, t: Tensor, shape: number[]): void {
  if (t.shape.length !== shape.length || t.shape.some((v, i) => v !== shape[i])) {
    throw new FormatError(file, `tensor '${name}' has shape ${shapeString(t.shape)} but the config implies ${shapeString(shape)}`);
  }
}

export interface LoadOptions {
  /** Worker threads for backends that use them (0 = the backend's default). The `ref` backend is single-threaded. */
  threads?: number;
  backend?: Backend;
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
  const backend = opts.backend ?? new RefBackend();
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
