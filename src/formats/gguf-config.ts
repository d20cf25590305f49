// Mixtral hyper-parameters <-> GGUF metadata. llama.cpp stores Mixtral as general.architecture = "llama" with
// llama.expert_count / llama.expert_used_count; a file without expert keys is a dense Llama/Mistral model.

import { FormatError } from './errors.js';
import { getNumber, getString, getStringArray, GGUFWriter, type GGUFFile } from './gguf.js';
import { vocabFromGGUFMetadata } from '../tokenizer/sources.js';
import type { VocabData } from '../tokenizer/sentencepiece.js';
import type { Tensor } from '../tensor/tensor.js';
import { configProblems, type MixtralConfig } from '../model/config.js';
import type { DType } from '../tensor/dtype.js';

const ARCHS = new Set(['llama']);

export function mixtralConfigFromGGUF(file: GGUFFile): MixtralConfig {
  const arch = getString(file, 'general.architecture');
  if (!ARCHS.has(arch)) {
    throw new FormatError(file.path, `general.architecture is '${arch}'; moe-ts runs the Mixtral/Llama architecture ('llama')`);
  }
  const num = (key: string, def?: number) => {
    const v = getNumber(file, `${arch}.${key}`, { required: def === undefined });
    return v ?? (def as number);
  };
  const hiddenSize = num('embedding_length');
  const numAttentionHeads = num('attention.head_count');
  const numExperts = num('expert_count', 0);
  const vocabFromTokens = getStringArray(file, 'tokenizer.ggml.tokens', { required: false })?.length;
  const embd = file.tensors.get('token_embd.weight');
  const vocabSize = getNumber(file, `${arch}.vocab_size`, { required: false }) ?? vocabFromTokens ?? embd?.shape[0];
  if (vocabSize === undefined) throw new FormatError(file.path, `cannot tell the vocabulary size: no ${arch}.vocab_size, tokenizer.ggml.tokens or token_embd.weight`);
  const headDim = num('attention.key_length', num('rope.dimension_count', Math.floor(hiddenSize / numAttentionHeads)));
  const window = getNumber(file, `${arch}.attention.sliding_window`, { required: false });
  const config: MixtralConfig = {
    vocabSize,
    hiddenSize,
    intermediateSize: num('feed_forward_length'),
    numHiddenLayers: num('block_count'),
    numAttentionHeads,
    numKeyValueHeads: num('attention.head_count_kv', numAttentionHeads),
    headDim,
    numLocalExperts: numExperts > 0 ? numExperts : 1,
    numExpertsPerTok: numExperts > 0 ? num('expert_used_count') : 1,
    rmsNormEps: num('attention.layer_norm_rms_epsilon', 1e-5),
    ropeTheta: num('rope.freq_base', 10000),
    maxPositionEmbeddings: num('context_length'),
    slidingWindow: window && window > 0 ? window : null,
    tieWordEmbeddings: !file.tensors.has('output.weight'),
  };
  const vDim = getNumber(file, `${arch}.attention.value_length`, { required: false });
  if (vDim !== undefined && vDim !== headDim) throw new FormatError(file.path, `${arch}.attention.value_length ${vDim} differs from key_length ${headDim}; moe-ts needs them equal`);
  const rot = getNumber(file, `${arch}.rope.dimension_count`, { required: false });
  if (rot !== undefined && rot !== headDim) throw new FormatError(file.path, `${arch}.rope.dimension_count ${rot} differs from the head size ${headDim}; partial RoPE is not supported`);
  const problems = configProblems(config);
  if (problems.length) throw new FormatError(file.path, `inconsistent hyper-parameters: ${problems.join('; ')}`);
  return config;
}

/** llama.cpp's general.file_type for a model whose big matrices are `dtype`. */
export function llamaFileType(dtype: DType): number {
  const t: Partial<Record<DType, number>> = { f32: 0, f16: 1, q4_0: 2, q4_1: 3, q8_0: 7, q5_0: 8, q5_1: 9, q2_k: 10, q3_k: 12, q4_k: 15, q5_k: 17, q6_k: 18, bf16: 32 };
  const v = t[dtype];
  if (v === undefined) throw new Error(`no llama.cpp file type for ${dtype}`);
  return v;
}

/** Writes the architecture keys llama.cpp reads for a Mixtral model (in the order its converter writes them). */
export function writeMixtralMetadata(w: GGUFWriter, c: MixtralConfig, opts: { name: string; dtype: DType }): void {
  w.setString('general.architecture', 'llama');
  w.setString('general.name', opts.name);
  w.setUint32('llama.context_length', c.maxPositionEmbeddings);
  w.setUint32('llama.embedding_length', c.hiddenSize);
  w.setUint32('llama.block_count', c.numHiddenLayers);
  w.setUint32('llama.feed_forward_length', c.intermediateSize);
  w.setUint32('llama.attention.head_count', c.numAttentionHeads);
  w.setUint32('llama.attention.head_count_kv', c.numKeyValueHeads);
  w.setFloat32('llama.rope.freq_base', c.ropeTheta);
  w.setFloat32('llama.attention.layer_norm_rms_epsilon', c.rmsNormEps);
  if (c.numLocalExperts > 1) {
    w.setUint32('llama.expert_count', c.numLocalExperts);
    w.setUint32('llama.expert_used_count', c.numExpertsPerTok);
  }
  if (c.headDim !== c.hiddenSize / c.numAttentionHeads) {
    w.setUint32('llama.attention.key_length', c.headDim);
    w.setUint32('llama.attention.value_length', c.headDim);
  }
  w.setUint32('llama.rope.dimension_count', c.headDim);
  if (c.slidingWindow !== null) w.setUint32('llama.attention.sliding_window', c.slidingWindow);
  w.setUint32('llama.vocab_size', c.vocabSize);
  w.setUint32('general.file_type', llamaFileType(opts.dtype));
}


/** The SentencePiece vocabulary embedded in a GGUF file (tokenizer.ggml.*), as llama.cpp reads it. */
export function vocabFromGGUF(file: GGUFFile): VocabData {
  return vocabFromGGUFMetadata(file.metadata, file.path);
}

/** Writes a SentencePiece vocabulary (and optionally a chat template) as llama.cpp's converter does. */
export function writeVocabMetadata(w: GGUFWriter, v: VocabData, chatTemplate?: string): void {
  w.setString('tokenizer.ggml.model', 'llama');
  w.setStringArray('tokenizer.ggml.tokens', v.tokens);
  w.setFloat32Array('tokenizer.ggml.scores', v.scores);
  w.setInt32Array('tokenizer.ggml.token_type', v.types);
  w.setUint32('tokenizer.ggml.bos_token_id', v.bosId);
  w.setUint32('tokenizer.ggml.eos_token_id', v.eosId);
  w.setUint32('tokenizer.ggml.unknown_token_id', v.unkId);
  w.setBool('tokenizer.ggml.add_bos_token', v.addBos);
  w.setBool('tokenizer.ggml.add_eos_token', v.addEos ?? false);
  if (chatTemplate !== undefined) w.setString('tokenizer.chat_template', chatTemplate);
}

/** A whole Mixtral GGUF: architecture keys, vocabulary, tensors (GGUF names), written atomically. */
export function writeMixtralGGUF(
  file: string,
  m: { config: MixtralConfig; tensors: ReadonlyMap<string, Tensor>; vocab: VocabData; chatTemplate?: string; name: string; dtype: DType },
): void {
  const w = new GGUFWriter();
  writeMixtralMetadata(w, m.config, { name: m.name, dtype: m.dtype });
  writeVocabMetadata(w, m.vocab, m.chatTemplate);
  for (const [name, t] of m.tensors) w.addTensor(name, t);
  w.write(file);
}
