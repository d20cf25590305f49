// HF <-> GGUF tensor names and layouts: the micro reference HF checkpoint, converted, must equal bit for bit the f32
// GGUF that llama.cpp's converter made from it (names, order, shapes, q/k RoPE permutation, stacked experts), and
// back; round trips through every layout; and the errors for checkpoints that do not fit the config.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rng } from './gguf-helpers.js';
import { assertFormatError } from './helpers/assert-format-error.js';
import { fileURLToPath } from 'node:url';
import {
  expectedShapes, ggufNameToHF, ggufTensorsToHF, hfNameToGGUF, hfTensorsToGGUF, permuteQKForGGUF, stackExperts,
  unpermuteQKFromGGUF, unstackExperts,
} from '../src/formats/names.js';
import { readCheckpointTensors } from '../src/formats/safetensors.js';
import { readHFConfig } from '../src/formats/hf-config.js';
import { readGGUF } from '../src/formats/gguf.js';
import { FormatError } from '../src/formats/errors.js';
import type { MixtralConfig } from '../src/model/config.js';
import { tensorByteSize, type Tensor } from '../src/tensor/tensor.js';
import type { DType } from '../src/tensor/dtype.js';

const fixture = (p: string): string => fileURLToPath(new URL(`../../test/fixtures/${p}`, import.meta.url));
const HF_DIR = fixture('micro/hf');
const GGUF_F32 = fixture('micro/micro-f32.gguf');


function randomTensor(r: () => number, dtype: DType, shape: number[]): Tensor {
  const data = new Uint8Array(tensorByteSize(dtype, shape));
  for (let i = 0; i < data.length; i++) data[i] = Math.floor(r() * 256);
  return { dtype, shape, data };
}

function same(a: Tensor, b: Tensor, what: string): void {
  assert.equal(a.dtype, b.dtype, `${what}: dtype`);
  assert.deepEqual([...a.shape], [...b.shape], `${what}: shape`);
  assert.ok(Buffer.from(a.data).equals(Buffer.from(b.data)), `${what}: bytes differ`);
}

function sameMaps(a: ReadonlyMap<string, Tensor>, b: ReadonlyMap<string, Tensor>, ordered = true): void {
  if (ordered) assert.deepEqual([...a.keys()], [...b.keys()]);
  else assert.deepEqual([...a.keys()].sort(), [...b.keys()].sort());
  for (const [n, t] of a) same(t, b.get(n)!, n);
}


const micro = () => ({ hf: readCheckpointTensors(HF_DIR).tensors, config: readHFConfig(HF_DIR).config, gguf: readGGUF(GGUF_F32).tensors });

test('HF -> GGUF equals llama.cpp\'s converted f32 GGUF bit for bit (names, order, permutation, stacking)', () => {
  const { hf, config, gguf } = micro();
  const converted = hfTensorsToGGUF(hf, config, { source: HF_DIR });
  sameMaps(converted, gguf);
  // The permutation really moved rows (the test would pass vacuously otherwise).
  assert.ok(!Buffer.from(hf.get('model.layers.0.self_attn.q_proj.weight')!.data).equals(Buffer.from(gguf.get('blk.0.attn_q.weight')!.data)));
  assert.ok(!Buffer.from(hf.get('model.layers.0.self_attn.k_proj.weight')!.data).equals(Buffer.from(gguf.get('blk.0.attn_k.weight')!.data)));
});

test('GGUF -> HF equals the reference HF checkpoint bit for bit', () => {
  const { hf, config, gguf } = micro();
  const back = ggufTensorsToHF(gguf, config, { source: GGUF_F32 });
  sameMaps(back, hf, false);
  // Experts come back as views of the stacked GGUF tensor, not copies.
  const w1 = back.get('model.layers.1.block_sparse_moe.experts.3.w1.weight')!;
  assert.equal(w1.data.buffer, gguf.get('blk.1.ffn_gate_exps.weight')!.data.buffer);
});

test('expectedShapes matches the reference files', () => {
  const { hf, config, gguf } = micro();
  const shapes = (m: ReadonlyMap<string, Tensor>) => new Map([...m].map(([n, t]) => [n, [...t.shape]]));
  assert.deepEqual(expectedShapes(config, 'gguf'), shapes(gguf));
  assert.deepEqual(new Map([...expectedShapes(config, 'hf')].sort()), new Map([...shapes(hf)].sort()));
});

test('round trips: stacked and per-expert GGUF layouts', () => {
  const { hf, config, gguf } = micro();
  const perExpert = hfTensorsToGGUF(hf, config, { expertLayout: 'per-expert' });
  assert.ok(perExpert.has('blk.1.ffn_gate.7.weight') && perExpert.has('blk.0.ffn_down.0.weight') && perExpert.has('blk.0.ffn_up.5.weight'));
  assert.ok(![...perExpert.keys()].some((n) => n.endsWith('_exps.weight')));
  assert.equal(perExpert.size, gguf.size + config.numHiddenLayers * 3 * (config.numLocalExperts - 1));
  sameMaps(ggufTensorsToHF(perExpert, config), hf, false);
  same(perExpert.get('blk.1.ffn_up.2.weight')!, unstackExperts(gguf.get('blk.1.ffn_up_exps.weight')!)[2], 'per-expert vs stacked');
  sameMaps(ggufTensorsToHF(hfTensorsToGGUF(hf, config), config), hf, false);
  sameMaps(hfTensorsToGGUF(ggufTensorsToHF(gguf, config), config), gguf);
});

test('quantized GGUFs convert by whole rows: q8_0 / q4_0 -> HF -> GGUF is the identity', () => {
  const { hf, config } = micro();
  for (const q of ['micro-q8_0.gguf', 'micro-q4_0.gguf']) {
    const gguf = readGGUF(fixture(`micro/${q}`)).tensors;
    assert.equal(gguf.get('blk.0.attn_q.weight')!.dtype, q.slice(6, 10));
    const asHF = ggufTensorsToHF(gguf, config);
    assert.deepEqual([...asHF.keys()].sort(), [...hf.keys()].sort());
    for (const [n, t] of asHF) assert.deepEqual([...t.shape], [...hf.get(n)!.shape], n);
    sameMaps(hfTensorsToGGUF(asHF, config), gguf);
  }
});

test('single-name mapping is a bijection on every HF and GGUF name', () => {
  const { config } = micro();
  for (const name of expectedShapes(config, 'hf').keys()) {
    const g = hfNameToGGUF(name);
    assert.ok(g, name);
    assert.equal(ggufNameToHF(g), name);
  }
  for (const name of expectedShapes({ ...config, numLocalExperts: 1, numExpertsPerTok: 1 }, 'hf').keys()) {
    assert.equal(ggufNameToHF(hfNameToGGUF(name)!), name);
  }
  assert.equal(hfNameToGGUF('model.layers.0.block_sparse_moe.experts.3.w2.weight'), 'blk.0.ffn_down.3.weight');
  assert.equal(hfNameToGGUF('model.layers.4.mlp.gate_proj.weight'), 'blk.4.ffn_gate.weight');
  for (const n of ['model.layers.0.self_attn.q_norm.weight', 'model.layers.01.input_layernorm.weight', 'model.layers.0.block_sparse_moe.experts.0.w4.weight', 'foo']) {
    assert.equal(hfNameToGGUF(n), undefined, n);
  }
  for (const n of ['blk.0.ffn_gate_exps.weight', 'blk.0.attn_q.3.weight', 'blk.x.attn_q.weight', 'rope_freqs.weight']) assert.equal(ggufNameToHF(n), undefined, n);
});

/** llama.cpp's LlamaModel.permute, written as its numpy expression reads: reshape(h, 2, hd/2, in).swapaxes(1, 2). */
function numpyPermuteRowOrder(rows: number, nHeads: number): number[] {
  const hd = rows / nHeads;
  const order: number[] = []; // order[newRow] = oldRow
  for (let h = 0; h < nHeads; h++) for (let i = 0; i < hd / 2; i++) for (let two = 0; two < 2; two++) order.push(h * hd + two * (hd / 2) + i);
  return order;
}

test('q/k permutation: llama.cpp\'s row order, inverse, and whole rows of any dtype', () => {
  const r = rng(1);
  for (const [nHeads, hd, cols] of [[4, 16, 8], [2, 2, 3], [3, 8, 1], [1, 128, 2]]) {
    const rows = nHeads * hd;
    const t = randomTensor(r, 'f32', [rows, cols]);
    const p = permuteQKForGGUF(t, nHeads);
    const order = numpyPermuteRowOrder(rows, nHeads);
    const rb = cols * 4;
    for (let row = 0; row < rows; row++) {
      assert.ok(Buffer.from(p.data.subarray(row * rb, (row + 1) * rb)).equals(Buffer.from(t.data.subarray(order[row] * rb, (order[row] + 1) * rb))), `row ${row}`);
    }
    same(unpermuteQKFromGGUF(p, nHeads), t, 'f32 round trip');
    same(permuteQKForGGUF(unpermuteQKFromGGUF(t, nHeads), nHeads), t, 'f32 reverse round trip');
  }
  // q8_0 rows (34-byte blocks) and q4_k rows move whole, like f32 rows.
  for (const dtype of ['q8_0', 'q4_0', 'q4_k', 'bf16'] as const) {
    const t = randomTensor(r, dtype, [64, 256]);
    const p = permuteQKForGGUF(t, 4);
    assert.ok(!Buffer.from(p.data).equals(Buffer.from(t.data)), `${dtype}: permutation moved nothing`);
    same(unpermuteQKFromGGUF(p, 4), t, `${dtype} round trip`);
    const rb = tensorByteSize(dtype, [256]);
    const order = numpyPermuteRowOrder(64, 4);
    for (let row = 0; row < 64; row++) {
      assert.ok(Buffer.from(p.data.subarray(row * rb, (row + 1) * rb)).equals(Buffer.from(t.data.subarray(order[row] * rb, (order[row] + 1) * rb))), `${dtype} row ${row}`);
    }
  }
  assert.throws(() => permuteQKForGGUF(randomTensor(r, 'f32', [12, 2]), 5), /heads/);
  assert.throws(() => permuteQKForGGUF(randomTensor(r, 'f32', [12, 2]), 4), /odd/);
});

test('stackExperts / unstackExperts', () => {
  const r = rng(2);
  const experts = [0, 1, 2].map(() => randomTensor(r, 'q8_0', [4, 64]));
  const s = stackExperts(experts);
  assert.deepEqual(s.shape, [3, 4, 64]);
  const back = unstackExperts(s);
  back.forEach((t, e) => {
    same(t, experts[e], `expert ${e}`);
    assert.equal(t.data.buffer, s.data.buffer);
  });
  assert.throws(() => stackExperts([experts[0], randomTensor(r, 'q8_0', [2, 64])]), /expert 1/);
  assert.throws(() => stackExperts([experts[0], randomTensor(r, 'q4_0', [4, 64])]), /expert 1/);
  assert.throws(() => stackExperts([]), /no tensors/);
  assert.throws(() => unstackExperts(randomTensor(r, 'f32', [4])), /expert dimension/);
});

test('checkpoints that contradict the config give FormatErrors naming the tensors', () => {
  const { hf, config, gguf } = micro();
  const src = { source: 'ckpt-dir' };
  const withT = (m: ReadonlyMap<string, Tensor>, name: string, t: Tensor) => new Map(m).set(name, t);
  const without = (m: ReadonlyMap<string, Tensor>, ...names: string[]) => {
    const c = new Map(m);
    for (const n of names) c.delete(n);
    return c;
  };
  const f32 = (shape: number[]) => randomTensor(rng(3), 'f32', shape);

  // Old Llama checkpoints carry rotary inv_freq buffers; llama.cpp's converter skips them, and so do we.
  sameMaps(hfTensorsToGGUF(withT(hf, 'model.layers.0.self_attn.rotary_emb.inv_freq', f32([8])), config), gguf);
  assertFormatError(() => hfTensorsToGGUF(withT(hf, 'model.layers.0.self_attn.q_norm.weight', f32([16])), config, src), 'ckpt-dir', 'unknown', 'q_norm');
  assertFormatError(() => hfTensorsToGGUF(withT(hf, 'model.layers.2.input_layernorm.weight', f32([64])), config, src), 'unknown', 'model.layers.2.input_layernorm.weight');
  assertFormatError(() => hfTensorsToGGUF(withT(hf, 'model.layers.0.block_sparse_moe.experts.8.w1.weight', f32([128, 64])), config, src), 'experts.8.w1');
  assertFormatError(() => hfTensorsToGGUF(without(hf, 'model.layers.1.block_sparse_moe.experts.5.w3.weight', 'lm_head.weight'), config, src),
    'missing', 'model.layers.1.block_sparse_moe.experts.5.w3.weight', 'lm_head.weight');
  assertFormatError(() => hfTensorsToGGUF(withT(hf, 'model.layers.0.self_attn.k_proj.weight', f32([64, 32])), config, src),
    'model.layers.0.self_attn.k_proj.weight', '[64, 32]', '[32, 64]');
  assertFormatError(() => hfTensorsToGGUF(withT(hf, 'model.norm.weight', { dtype: 'f32', shape: [64], data: new Uint8Array(12) }), config, src), 'model.norm.weight', 'bytes');
  assertFormatError(() => hfTensorsToGGUF(withT(hf, 'model.layers.0.block_sparse_moe.experts.2.w1.weight', randomTensor(rng(4), 'f16', [128, 64])), config, src), 'mix dtypes');
  // A config that disagrees with the checkpoint (more heads) is caught on the shapes.
  assertFormatError(() => hfTensorsToGGUF(hf, { ...config, numAttentionHeads: 8 }, src), 'self_attn.q_proj.weight is [64, 64], expected [128, 64]', 'self_attn.o_proj.weight');

  assertFormatError(() => ggufTensorsToHF(withT(gguf, 'rope_freqs.weight', f32([8])), config, src), 'unknown', 'rope_freqs.weight');
  assertFormatError(() => ggufTensorsToHF(without(gguf, 'blk.1.ffn_up_exps.weight'), config, src), 'missing', 'blk.1.ffn_up_exps.weight');
  assertFormatError(() => ggufTensorsToHF(withT(gguf, 'blk.0.ffn_gate_inp.weight', f32([4, 64])), config, src), 'blk.0.ffn_gate_inp.weight', '[4, 64]', '[8, 64]');
  const perExpert = hfTensorsToGGUF(hf, config, { expertLayout: 'per-expert' });
  assertFormatError(() => ggufTensorsToHF(without(perExpert, 'blk.0.ffn_down.6.weight'), config, src), 'blk.0.ffn_down.E.weight', 'expected 0..7');
  assertFormatError(() => ggufTensorsToHF(withT(gguf, 'blk.0.ffn_up.0.weight', f32([128, 64])), config, src), 'blk.0.ffn_up_exps.weight', 'blk.0.ffn_up.0.weight');
});

test('tied embeddings and a GGUF without output.weight', () => {
  const { hf, config, gguf } = micro();
  const tied: MixtralConfig = { ...config, tieWordEmbeddings: true };
  const g = hfTensorsToGGUF(hf, tied);
  assert.equal(g.has('output.weight'), false);
  const back = ggufTensorsToHF(g, tied);
  assert.equal(back.has('lm_head.weight'), false);
  // llama.cpp runs an untied GGUF without output.weight on token_embd; the HF head then is the embedding.
  const noOut = new Map(gguf);
  noOut.delete('output.weight');
  const hfBack = ggufTensorsToHF(noOut, config);
  same(hfBack.get('lm_head.weight')!, gguf.get('token_embd.weight')!, 'lm_head from token_embd');
});

test('dense (Mistral/Llama) checkpoints map mlp.* to ffn_* without a router', () => {
  const c: MixtralConfig = {
    vocabSize: 40, hiddenSize: 16, intermediateSize: 24, numHiddenLayers: 2, numAttentionHeads: 4, numKeyValueHeads: 1,
    headDim: 4, numLocalExperts: 1, numExpertsPerTok: 1, rmsNormEps: 1e-6, ropeTheta: 10000, maxPositionEmbeddings: 64,
    slidingWindow: null, tieWordEmbeddings: false,
  };
  const r = rng(5);
  const hf = new Map([...expectedShapes(c, 'hf')].map(([n, s]) => [n, randomTensor(r, n.includes('norm') ? 'f32' : 'bf16', s)] as const));
  assert.ok(hf.has('model.layers.1.mlp.down_proj.weight'));
  const g = hfTensorsToGGUF(hf, c);
  assert.deepEqual(new Map([...g].map(([n, t]) => [n, [...t.shape]])), expectedShapes(c, 'gguf'));
  assert.ok(![...g.keys()].some((n) => n.includes('ffn_gate_inp') || n.includes('_exps')));
  same(g.get('blk.1.ffn_down.weight')!, hf.get('model.layers.1.mlp.down_proj.weight')!, 'down');
  same(g.get('blk.0.attn_k.weight')!, permuteQKForGGUF(hf.get('model.layers.0.self_attn.k_proj.weight')!, 1), 'k permuted with the kv heads');
  sameMaps(ggufTensorsToHF(g, c), hf);
  // MoE names in a dense checkpoint are unknown to it.
  assertFormatError(() => hfTensorsToGGUF(new Map(hf).set('model.layers.0.block_sparse_moe.gate.weight', randomTensor(r, 'f32', [1, 16])), c), 'block_sparse_moe.gate');
});
