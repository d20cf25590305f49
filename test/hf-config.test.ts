// Hugging Face config.json / generation_config.json: the micro reference config against the hyper-parameters
// llama.cpp's GGUF of the same model records, transformers' defaults, round trip back to JSON, and bad configs.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { assertFormatError } from './helpers/assert-format-error.js';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  mixtralConfigToHF, parseGenerationConfig, parseHFConfig, readGenerationConfig, readHFConfig, writeHFConfig,
} from '../src/formats/hf-config.js';
import { getNumber, readGGUF } from '../src/formats/gguf.js';
import { FormatError } from '../src/formats/errors.js';

const fixture = (p: string): string => fileURLToPath(new URL(`../../test/fixtures/${p}`, import.meta.url));
const HF_DIR = fixture('micro/hf');
const refJson = (): Record<string, unknown> => JSON.parse(fs.readFileSync(path.join(HF_DIR, 'config.json'), 'utf8')) as Record<string, unknown>;


test('the micro config.json agrees with the GGUF llama.cpp runs for the same model', () => {
  const hf = readHFConfig(HF_DIR);
  const c = hf.config;
  const gguf = readGGUF(fixture('micro/micro-f32.gguf'));
  const g = (k: string) => getNumber(gguf, `llama.${k}`);
  assert.equal(hf.architecture, 'MixtralForCausalLM');
  assert.equal(c.vocabSize, g('vocab_size'));
  assert.equal(c.hiddenSize, g('embedding_length'));
  assert.equal(c.intermediateSize, g('feed_forward_length'));
  assert.equal(c.numHiddenLayers, g('block_count'));
  assert.equal(c.numAttentionHeads, g('attention.head_count'));
  assert.equal(c.numKeyValueHeads, g('attention.head_count_kv'));
  assert.equal(c.headDim, g('rope.dimension_count'));
  assert.equal(c.numLocalExperts, g('expert_count'));
  assert.equal(c.numExpertsPerTok, g('expert_used_count'));
  assert.equal(c.ropeTheta, g('rope.freq_base'));
  assert.equal(Math.fround(c.rmsNormEps), g('attention.layer_norm_rms_epsilon')); // stored as float32 in GGUF
  assert.equal(c.maxPositionEmbeddings, g('context_length'));
  const raw = refJson();
  assert.equal(c.slidingWindow, raw.sliding_window);
  assert.equal(c.tieWordEmbeddings, raw.tie_word_embeddings);
  assert.equal(hf.bosTokenId, raw.bos_token_id);
  assert.deepEqual(hf.eosTokenIds, [raw.eos_token_id]);
  assert.equal(hf.torchDtype, raw.torch_dtype);
  assert.equal(hf.routerAuxLossCoef, raw.router_aux_loss_coef);
});

test('mixtralConfigToHF writes back the reference config.json', () => {
  const raw = refJson();
  const hf = readHFConfig(path.join(HF_DIR, 'config.json'));
  const out = mixtralConfigToHF(hf.config, {
    bosTokenId: hf.bosTokenId, eosTokenId: hf.eosTokenIds, torchDtype: hf.torchDtype ?? undefined,
    routerAuxLossCoef: hf.routerAuxLossCoef ?? undefined, fields: { transformers_version: raw.transformers_version },
  });
  // Same fields, values and order as transformers wrote them.
  assert.equal(JSON.stringify(out), JSON.stringify(raw));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-hfc-'));
  try {
    writeHFConfig(dir, hf.config);
    assert.deepEqual(readHFConfig(dir).config, hf.config);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('absent optional fields take transformers defaults', () => {
  const raw = refJson();
  for (const k of ['num_key_value_heads', 'head_dim', 'rope_theta', 'sliding_window', 'tie_word_embeddings', 'rms_norm_eps', 'max_position_embeddings']) delete raw[k];
  raw.eos_token_id = null;
  const hf = parseHFConfig(raw, 'config.json');
  const c = hf.config;
  assert.equal(c.numKeyValueHeads, raw.num_attention_heads);
  assert.equal(c.headDim, (raw.hidden_size as number) / (raw.num_attention_heads as number));
  assert.equal(c.ropeTheta, 1e6); // MixtralConfig.rope_theta
  assert.equal(c.rmsNormEps, 1e-5); // MixtralConfig.rms_norm_eps
  assert.equal(c.maxPositionEmbeddings, 4096 * 32); // MixtralConfig.max_position_embeddings
  assert.equal(c.slidingWindow, null);
  assert.equal(c.tieWordEmbeddings, false);
  assert.deepEqual(hf.eosTokenIds, []);
  // transformers 5 keeps rope_theta inside rope_parameters.
  assert.equal(parseHFConfig({ ...raw, rope_parameters: { rope_type: 'default', rope_theta: 5e5 } }, 'c').config.ropeTheta, 5e5);
});

test('dense Mistral and Llama configs read as one expert', () => {
  const raw = refJson();
  for (const k of ['num_local_experts', 'num_experts_per_tok', 'router_aux_loss_coef', 'rope_theta']) delete raw[k];
  const mistral = parseHFConfig({ ...raw, architectures: ['MistralForCausalLM'], model_type: 'mistral', sliding_window: 4096 }, 'c');
  assert.equal(mistral.architecture, 'MistralForCausalLM');
  assert.equal(mistral.config.numLocalExperts, 1);
  assert.equal(mistral.config.numExpertsPerTok, 1);
  assert.equal(mistral.config.slidingWindow, 4096);
  assert.equal(mistral.config.ropeTheta, 10000); // MistralConfig.rope_theta
  const llama = parseHFConfig({ ...raw, architectures: undefined, model_type: 'llama', eos_token_id: [2, 7] }, 'c');
  assert.equal(llama.architecture, 'LlamaForCausalLM');
  assert.deepEqual(llama.eosTokenIds, [2, 7]);
  // Written back as Mistral, without the MoE fields.
  const out = mixtralConfigToHF(mistral.config);
  assert.deepEqual(out.architectures, ['MistralForCausalLM']);
  assert.equal('num_local_experts' in out, false);
  assert.deepEqual(parseHFConfig(out, 'c').config, mistral.config);
});

test('bad configs give FormatErrors naming the field', () => {
  const raw = refJson();
  const bad = (patch: Record<string, unknown>, ...mentions: string[]) => {
    const j = { ...raw, ...patch };
    for (const [k, v] of Object.entries(patch)) if (v === undefined) delete j[k];
    assertFormatError(() => parseHFConfig(j, 'my/config.json'), 'my/config.json', ...mentions);
  };
  bad({ hidden_size: undefined }, 'hidden_size', 'missing');
  bad({ hidden_size: '64' }, 'hidden_size', '"64"');
  bad({ num_hidden_layers: 2.5 }, 'num_hidden_layers');
  bad({ num_local_experts: undefined }, 'num_local_experts');
  bad({ num_experts_per_tok: 9 }, 'num_experts_per_tok 9', 'num_local_experts 8');
  bad({ num_key_value_heads: 3 }, 'num_key_value_heads 3');
  bad({ vocab_size: 0 }, 'vocab_size');
  bad({ rope_theta: -1 }, 'rope_theta');
  bad({ head_dim: undefined, num_attention_heads: 5 }, 'head_dim', 'hidden_size');
  bad({ rms_norm_eps: 'small' }, 'rms_norm_eps');
  bad({ tie_word_embeddings: 'no' }, 'tie_word_embeddings');
  bad({ sliding_window: 1.5 }, 'sliding_window');
  bad({ architectures: ['GPT2LMHeadModel'] }, 'architectures', 'GPT2LMHeadModel');
  bad({ architectures: 'MixtralForCausalLM' }, 'architectures');
  bad({ architectures: undefined, model_type: 'gpt2' }, 'model_type');
  bad({ hidden_act: 'gelu' }, 'hidden_act', 'gelu');
  bad({ rope_scaling: { type: 'yarn', factor: 4 } }, 'rope_scaling', 'yarn');
  bad({ attention_bias: true }, 'attention_bias');
  bad({ eos_token_id: 'eos' }, 'eos_token_id');
  bad({ bos_token_id: [1, 2] }, 'bos_token_id');
  assertFormatError(() => parseHFConfig([], 'c.json'), 'c.json');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-hfc-'));
  try {
    fs.writeFileSync(path.join(dir, 'config.json'), '{"vocab_size": ');
    assertFormatError(() => readHFConfig(dir), 'config.json', 'JSON');
    assertFormatError(() => readHFConfig(path.join(dir, 'nope')), 'nope');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('generation_config.json', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-gen-'));
  try {
    assert.equal(readGenerationConfig(dir), null);
    const json = { _from_model_config: true, bos_token_id: 1, eos_token_id: [2, 32000], do_sample: true, temperature: 0.6, top_p: 0.9, top_k: 40, max_new_tokens: 256, repetition_penalty: 1.1, pad_token_id: null, transformers_version: '4.46.0' };
    fs.writeFileSync(path.join(dir, 'generation_config.json'), JSON.stringify(json));
    assert.deepEqual(readGenerationConfig(dir), {
      temperature: json.temperature, topP: json.top_p, topK: json.top_k, maxNewTokens: json.max_new_tokens,
      doSample: json.do_sample, eosTokenIds: json.eos_token_id, bosTokenId: json.bos_token_id, repetitionPenalty: json.repetition_penalty,
    });
    assert.deepEqual(parseGenerationConfig({ eos_token_id: 2 }, 'g'), { eosTokenIds: [2] });
    assertFormatError(() => parseGenerationConfig({ temperature: 'hot' }, 'gen.json'), 'gen.json', 'temperature');
    assertFormatError(() => parseGenerationConfig({ top_k: 1.5 }, 'g'), 'top_k');
    assertFormatError(() => parseGenerationConfig({ do_sample: 1 }, 'g'), 'do_sample');
    assertFormatError(() => parseGenerationConfig({ eos_token_id: [2, 'x'] }, 'g'), 'eos_token_id');
    assertFormatError(() => parseGenerationConfig({ max_new_tokens: -1 }, 'g'), 'max_new_tokens');
    fs.writeFileSync(path.join(dir, 'generation_config.json'), '{');
    assertFormatError(() => readGenerationConfig(dir), 'generation_config.json');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
