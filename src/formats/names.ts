// Tensor names and layouts between Hugging Face Mixtral checkpoints and GGUF (llama.cpp), both ways.
//
// Names (per layer N, expert E):
//   model.embed_tokens.weight                          token_embd.weight
//   model.norm.weight                                  output_norm.weight
//   lm_head.weight                                     output.weight (absent when the embeddings are tied)
//   model.layers.N.input_layernorm.weight              blk.N.attn_norm.weight
//   model.layers.N.self_attn.{q,k,v,o}_proj.weight     blk.N.attn_{q,k,v,output}.weight
//   model.layers.N.post_attention_layernorm.weight     blk.N.ffn_norm.weight
//   model.layers.N.block_sparse_moe.gate.weight        blk.N.ffn_gate_inp.weight
//   ...block_sparse_moe.experts.E.{w1,w3,w2}.weight    blk.N.ffn_{gate,up,down}_exps.weight, stacked [E, out, in]
//                                                      (older GGUFs: blk.N.ffn_{gate,up,down}.E.weight per expert)
//   dense (Mistral/Llama): model.layers.N.mlp.{gate,up,down}_proj.weight   blk.N.ffn_{gate,up,down}.weight
//
// q and k rows are permuted for RoPE as llama.cpp's converter does (conversion/llama.py LlamaModel.permute):
// HF rotates the pairs (i, i + hd/2) of each head, ggml adjacent pairs (2i, 2i+1), so
// GGUF row h*hd + 2i = HF row h*hd + i and GGUF row h*hd + 2i + 1 = HF row h*hd + i + hd/2.
// Whole rows move, so this works for every dtype, quantized rows included.

import { FormatError } from './errors.js';
import type { MixtralConfig } from '../model/config.js';
import { sliceFirst, shapeString, tensorByteSize, type Tensor } from '../tensor/tensor.js';

// ---------------------------------------------------------------------------------------------------------------
// Row permutation and expert stacking

function rowLayout(t: Tensor, nHeads: number, what: string): { rows: number; rowBytes: number; hd: number } {
  if (t.shape.length < 1) throw new Error(`${what}: a scalar has no rows`);
  const rows = t.shape[0];
  if (!(Number.isInteger(nHeads) && nHeads > 0) || rows % nHeads !== 0) {
    throw new Error(`${what}: ${rows} rows do not split into ${nHeads} heads`);
  }
  const hd = rows / nHeads;
  if (hd % 2 !== 0) throw new Error(`${what}: head size ${hd} is odd, RoPE needs pairs`);
  const want = tensorByteSize(t.dtype, t.shape);
  if (t.data.length !== want) throw new Error(`${what}: ${t.data.length} data bytes, ${t.dtype} ${shapeString(t.shape)} needs ${want}`);
  return { rows, rowBytes: rows === 0 ? 0 : t.data.length / rows, hd };
}

/** Moves rows: output row `to(r)` receives input row r. */
function moveRows(t: Tensor, nHeads: number, toGGUF: boolean): Tensor {
  const { rows, rowBytes, hd } = rowLayout(t, nHeads, toGGUF ? 'permuteQKForGGUF' : 'unpermuteQKFromGGUF');
  const out = new Uint8Array(t.data.length);
  const half = hd / 2;
  for (let h = 0; h < rows / hd; h++) {
    for (let i = 0; i < half; i++) {
      for (let j = 0; j < 2; j++) {
        const hf = h * hd + j * half + i;
        const gg = h * hd + 2 * i + j;
        const [src, dst] = toGGUF ? [hf, gg] : [gg, hf];
        out.set(t.data.subarray(src * rowBytes, (src + 1) * rowBytes), dst * rowBytes);
      }
    }
  }
  return { dtype: t.dtype, shape: [...t.shape], data: out };
}

/** HF q_proj/k_proj row order -> GGUF (ggml RoPE) order; `nHeads` is the heads of this tensor (kv heads for k). */
export function permuteQKForGGUF(t: Tensor, nHeads: number): Tensor {
  return moveRows(t, nHeads, true);
}

/** GGUF q/k row order -> HF order; the inverse of permuteQKForGGUF. */
export function unpermuteQKFromGGUF(t: Tensor, nHeads: number): Tensor {
  return moveRows(t, nHeads, false);
}

/** Stacks same-shape, same-dtype tensors into one [E, ...shape] tensor (a copy). */
export function stackExperts(tensors: readonly Tensor[]): Tensor {
  if (tensors.length === 0) throw new Error('stackExperts: no tensors');
  const { dtype, shape } = tensors[0];
  const bytes = tensorByteSize(dtype, shape);
  const out = new Uint8Array(bytes * tensors.length);
  tensors.forEach((t, e) => {
    if (t.dtype !== dtype || shapeString(t.shape) !== shapeString(shape)) {
      throw new Error(`stackExperts: expert ${e} is ${t.dtype} ${shapeString(t.shape)}, expert 0 is ${dtype} ${shapeString(shape)}`);
    }
    if (t.data.length !== bytes) throw new Error(`stackExperts: expert ${e} has ${t.data.length} bytes, needs ${bytes}`);
    out.set(t.data, e * bytes);
  });
  return { dtype, shape: [tensors.length, ...shape], data: out };
}

/** Splits a stacked [E, ...] tensor into E views (zero-copy). */
export function unstackExperts(t: Tensor): Tensor[] {
  if (t.shape.length < 2) throw new Error(`unstackExperts: shape ${shapeString(t.shape)} has no expert dimension`);
  if (t.data.length !== tensorByteSize(t.dtype, t.shape)) throw new Error(`unstackExperts: data size does not match ${t.dtype} ${shapeString(t.shape)}`);
  return Array.from({ length: t.shape[0] }, (_, e) => sliceFirst(t, e));
}

// ---------------------------------------------------------------------------------------------------------------
// Names of single tensors

type Slot = 'attn_norm' | 'attn_q' | 'attn_k' | 'attn_v' | 'attn_output' | 'ffn_norm' | 'ffn_gate_inp' | 'ffn_gate' | 'ffn_up' | 'ffn_down';

const HF_LAYER: Readonly<Record<string, Slot>> = {
  'input_layernorm': 'attn_norm',
  'self_attn.q_proj': 'attn_q',
  'self_attn.k_proj': 'attn_k',
  'self_attn.v_proj': 'attn_v',
  'self_attn.o_proj': 'attn_output',
  'post_attention_layernorm': 'ffn_norm',
  'block_sparse_moe.gate': 'ffn_gate_inp',
  'mlp.gate_proj': 'ffn_gate',
  'mlp.up_proj': 'ffn_up',
  'mlp.down_proj': 'ffn_down',
};
const GGUF_LAYER: Readonly<Record<string, string>> = Object.fromEntries(Object.entries(HF_LAYER).map(([h, g]) => [g, h]));
const EXPERT_W: Readonly<Record<string, 'ffn_gate' | 'ffn_up' | 'ffn_down'>> = { w1: 'ffn_gate', w3: 'ffn_up', w2: 'ffn_down' };
const W_OF: Readonly<Record<string, string>> = { ffn_gate: 'w1', ffn_up: 'w3', ffn_down: 'w2' };
const GLOBAL_HF_TO_GGUF: Readonly<Record<string, string>> = {
  'model.embed_tokens.weight': 'token_embd.weight',
  'model.norm.weight': 'output_norm.weight',
  'lm_head.weight': 'output.weight',
};
const GLOBAL_GGUF_TO_HF: Readonly<Record<string, string>> = Object.fromEntries(Object.entries(GLOBAL_HF_TO_GGUF).map(([h, g]) => [g, h]));

const HF_LAYER_RE = /^model\.layers\.(0|[1-9]\d*)\.(.+)\.weight$/;
const HF_EXPERT_RE = /^block_sparse_moe\.experts\.(0|[1-9]\d*)\.(w[123])$/;
const GGUF_LAYER_RE = /^blk\.(0|[1-9]\d*)\.([a-z_]+)(?:\.(0|[1-9]\d*))?\.weight$/;
/** Tensors HF checkpoints may carry that are not weights (old Llama checkpoints); llama.cpp's converter skips them. */
const HF_IGNORED_RE = /^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$/;

/**
 * The GGUF name of one HF tensor, or undefined when it has none. Expert weights map to the old per-expert GGUF
 * names (blk.N.ffn_gate.E.weight); current GGUFs stack them (see hfTensorsToGGUF).
 */
export function hfNameToGGUF(name: string): string | undefined {
  if (GLOBAL_HF_TO_GGUF[name]) return GLOBAL_HF_TO_GGUF[name];
  const m = HF_LAYER_RE.exec(name);
  if (!m) return undefined;
  const [, layer, rest] = m;
  const slot = HF_LAYER[rest];
  if (slot) return `blk.${layer}.${slot}.weight`;
  const x = HF_EXPERT_RE.exec(rest);
  if (x) return `blk.${layer}.${EXPERT_W[x[2]]}.${x[1]}.weight`;
  return undefined;
}

/** The HF name of one GGUF tensor (per-expert names included), or undefined (stacked tensors have no single name). */
export function ggufNameToHF(name: string): string | undefined {
  if (GLOBAL_GGUF_TO_HF[name]) return GLOBAL_GGUF_TO_HF[name];
  const m = GGUF_LAYER_RE.exec(name);
  if (!m) return undefined;
  const [, layer, slot, expert] = m;
  if (expert !== undefined) return W_OF[slot] ? `model.layers.${layer}.block_sparse_moe.experts.${expert}.${W_OF[slot]}.weight` : undefined;
  return GGUF_LAYER[slot] ? `model.layers.${layer}.${GGUF_LAYER[slot]}.weight` : undefined;
}

// ---------------------------------------------------------------------------------------------------------------
// Expected shapes

/**
 * Every tensor a checkpoint for `c` holds, with its row-major shape, in the order llama.cpp writes them (GGUF) or a
 * transformers model lists them (HF). The output head is left out when the embeddings are tied. A dense config
 * (numLocalExperts 1) uses the dense names (mlp.* / ffn_gate ...), a MoE config the router and stacked (GGUF) or
 * per-expert (HF) expert weights.
 */
export function expectedShapes(c: MixtralConfig, naming: 'gguf' | 'hf'): Map<string, number[]> {
  const D = c.hiddenSize;
  const F = c.intermediateSize;
  const E = c.numLocalExperts;
  const q = c.numAttentionHeads * c.headDim;
  const kv = c.numKeyValueHeads * c.headDim;
  const moe = E > 1;
  const m = new Map<string, number[]>();
  if (naming === 'gguf') {
    m.set('token_embd.weight', [c.vocabSize, D]);
    m.set('output_norm.weight', [D]);
    if (!c.tieWordEmbeddings) m.set('output.weight', [c.vocabSize, D]);
    for (let l = 0; l < c.numHiddenLayers; l++) {
      const b = `blk.${l}.`;
      m.set(`${b}attn_norm.weight`, [D]);
      m.set(`${b}attn_q.weight`, [q, D]);
      m.set(`${b}attn_k.weight`, [kv, D]);
      m.set(`${b}attn_v.weight`, [kv, D]);
      m.set(`${b}attn_output.weight`, [D, q]);
      m.set(`${b}ffn_norm.weight`, [D]);
      if (moe) {
        m.set(`${b}ffn_gate_inp.weight`, [E, D]);
        m.set(`${b}ffn_gate_exps.weight`, [E, F, D]);
        m.set(`${b}ffn_down_exps.weight`, [E, D, F]);
        m.set(`${b}ffn_up_exps.weight`, [E, F, D]);
      } else {
        m.set(`${b}ffn_gate.weight`, [F, D]);
        m.set(`${b}ffn_down.weight`, [D, F]);
        m.set(`${b}ffn_up.weight`, [F, D]);
      }
    }
    return m;
  }
  m.set('model.embed_tokens.weight', [c.vocabSize, D]);
  for (let l = 0; l < c.numHiddenLayers; l++) {
    const b = `model.layers.${l}.`;
    m.set(`${b}input_layernorm.weight`, [D]);
    m.set(`${b}self_attn.q_proj.weight`, [q, D]);
    m.set(`${b}self_attn.k_proj.weight`, [kv, D]);
    m.set(`${b}self_attn.v_proj.weight`, [kv, D]);
    m.set(`${b}self_attn.o_proj.weight`, [D, q]);
    m.set(`${b}post_attention_layernorm.weight`, [D]);
    if (moe) {
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

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

/**
 * Checks that `tensors` holds exactly the tensors of `expected` with those shapes; unknown names, missing names and
 * wrong shapes each give one FormatError listing every offender. `optional` names may be absent.
 */
export function checkTensorSet(
  tensors: ReadonlyMap<string, Tensor>,
  expected: ReadonlyMap<string, readonly number[]>,
  source: string,
  optional: ReadonlySet<string> = new Set(),
): void {
  const unknown = [...tensors.keys()].filter((n) => !expected.has(n));
  if (unknown.length > 0) throw new FormatError(source, `unknown tensors for this config: ${list(unknown)}`);
  const missing = [...expected.keys()].filter((n) => !tensors.has(n) && !optional.has(n));
  if (missing.length > 0) throw new FormatError(source, `missing tensors: ${list(missing)}`);
  const wrong: string[] = [];
  for (const [name, t] of tensors) {
    const want = expected.get(name)!;
    if (!sameShape(t.shape, want)) wrong.push(`${name} is ${shapeString(t.shape)}, expected ${shapeString(want)}`);
    else if (t.data.length !== tensorByteSize(t.dtype, t.shape)) wrong.push(`${name} has ${t.data.length} data bytes, ${t.dtype} ${shapeString(t.shape)} needs ${tensorByteSize(t.dtype, t.shape)}`);
  }
  if (wrong.length > 0) {
    const shown = wrong.slice(0, 3).join('; ');
    throw new FormatError(source, `tensor shapes contradict the config: ${shown}${wrong.length > 3 ? `; ... (${wrong.length} tensors in all)` : ''}`);
  }
}

function list(names: string[]): string {
  const shown = names.slice(0, 20).join(', ');
  return names.length > 20 ? `${shown} ... (${names.length} in all)` : shown;
}

// ---------------------------------------------------------------------------------------------------------------
// Whole checkpoints

export interface ConvertOptions {
  /** Names the checkpoint in errors (a path); default "checkpoint". */
  source?: string;
  /** GGUF expert layout to write: stacked ffn_*_exps (current llama.cpp, default) or per-expert ffn_*.E (older). */
  expertLayout?: 'stacked' | 'per-expert';
}

/**
 * HF tensors -> GGUF tensors: names, q/k row permutation, experts stacked (or per-expert). Data are views of the
 * input except where rows move or experts stack. The output is in llama.cpp's order. A tied lm_head, and the
 * rotary inv_freq buffers of old checkpoints, are dropped.
 */
export function hfTensorsToGGUF(tensors: ReadonlyMap<string, Tensor>, c: MixtralConfig, opts: ConvertOptions = {}): Map<string, Tensor> {
  const source = opts.source ?? 'checkpoint';
  const input = new Map<string, Tensor>();
  for (const [name, t] of tensors) {
    if (HF_IGNORED_RE.test(name)) continue;
    if (name === 'lm_head.weight' && c.tieWordEmbeddings) continue;
    input.set(name, t);
  }
  checkTensorSet(input, expectedShapes(c, 'hf'), source);

  const out = new Map<string, Tensor>();
  const get = (n: string) => input.get(n)!;
  const perExpert = opts.expertLayout === 'per-expert';
  for (const name of expectedShapes(c, 'gguf').keys()) {
    const m = GGUF_LAYER_RE.exec(name);
    if (!m) {
      out.set(name, get(GLOBAL_GGUF_TO_HF[name]));
      continue;
    }
    const [, layer, slot] = m;
    const hfLayer = `model.layers.${layer}.`;
    if (slot === 'attn_q') out.set(name, permuteQKForGGUF(get(`${hfLayer}self_attn.q_proj.weight`), c.numAttentionHeads));
    else if (slot === 'attn_k') out.set(name, permuteQKForGGUF(get(`${hfLayer}self_attn.k_proj.weight`), c.numKeyValueHeads));
    else if (slot.endsWith('_exps')) {
      const w = W_OF[slot.slice(0, -'_exps'.length)];
      const experts = Array.from({ length: c.numLocalExperts }, (_, e) => get(`${hfLayer}block_sparse_moe.experts.${e}.${w}.weight`));
      if (perExpert) {
        experts.forEach((t, e) => out.set(`blk.${layer}.${slot.slice(0, -'_exps'.length)}.${e}.weight`, t));
      } else {
        const dtypes = new Set(experts.map((t) => t.dtype));
        if (dtypes.size > 1) throw new FormatError(source, `experts of ${hfLayer}block_sparse_moe ${w} mix dtypes ${[...dtypes].join(', ')}; they cannot be stacked`);
        out.set(name, stackExperts(experts));
      }
    } else out.set(name, get(`${hfLayer}${GGUF_LAYER[slot]}.weight`));
  }
  return out;
}

/**
 * GGUF tensors -> HF tensors: names, q/k rows back in HF order, stacked experts split (views) — per-expert GGUFs
 * are accepted too. A GGUF without output.weight (llama.cpp then uses token_embd) gets lm_head = the embedding
 * when the config is not tied. Output in transformers' order.
 */
export function ggufTensorsToHF(tensors: ReadonlyMap<string, Tensor>, c: MixtralConfig, opts: ConvertOptions = {}): Map<string, Tensor> {
  const source = opts.source ?? 'checkpoint';
  const input = new Map(tensors);
  // Older GGUFs store each expert separately: stack them so one check and one path serve both layouts.
  const perExpert = new Map<string, Map<number, Tensor>>();
  for (const [name, t] of tensors) {
    const m = GGUF_LAYER_RE.exec(name);
    if (!m || m[3] === undefined || !W_OF[m[2]]) continue;
    const key = `blk.${m[1]}.${m[2]}_exps.weight`;
    if (tensors.has(key)) throw new FormatError(source, `both ${key} and per-expert ${name} are present`);
    if (!perExpert.has(key)) perExpert.set(key, new Map());
    perExpert.get(key)!.set(Number(m[3]), t);
    input.delete(name);
  }
  for (const [key, experts] of perExpert) {
    const n = experts.size;
    const missing = Array.from({ length: Math.max(n, c.numLocalExperts) }, (_, e) => e).filter((e) => !experts.has(e));
    if (missing.length > 0 || n !== c.numLocalExperts) {
      throw new FormatError(source, `${key.replace('_exps', '.E')}: has experts ${[...experts.keys()].sort((a, b) => a - b).join(', ')}, ` +
        `expected 0..${c.numLocalExperts - 1}`);
    }
    const list = Array.from({ length: n }, (_, e) => experts.get(e)!);
    const first = list[0];
    const bad = list.findIndex((t) => t.dtype !== first.dtype || !sameShape(t.shape, first.shape));
    if (bad >= 0) throw new FormatError(source, `${key}: expert ${bad} is ${list[bad].dtype} ${shapeString(list[bad].shape)}, expert 0 is ${first.dtype} ${shapeString(first.shape)}`);
    input.set(key, stackExperts(list));
  }
  const expected = expectedShapes(c, 'gguf');
  // llama.cpp treats output.weight as optional (falls back on token_embd).
  checkTensorSet(input, expected, source, new Set(['output.weight']));

  const out = new Map<string, Tensor>();
  for (const name of expectedShapes(c, 'hf').keys()) {
    const g = hfToGgufSource(name);
    if (name === 'lm_head.weight' && !input.has('output.weight')) {
      out.set(name, input.get('token_embd.weight')!);
      continue;
    }
    const t = input.get(g.name)!;
    if (g.expert !== undefined) out.set(name, sliceFirst(t, g.expert));
    else if (g.slot === 'attn_q') out.set(name, unpermuteQKFromGGUF(t, c.numAttentionHeads));
    else if (g.slot === 'attn_k') out.set(name, unpermuteQKFromGGUF(t, c.numKeyValueHeads));
    else out.set(name, t);
  }
  return out;
}

/** The GGUF tensor an HF tensor comes from (stacked tensor + expert index for expert weights). */
function hfToGgufSource(hf: string): { name: string; slot?: string; expert?: number } {
  const global = GLOBAL_HF_TO_GGUF[hf];
  if (global) return { name: global };
  const m = HF_LAYER_RE.exec(hf)!;
  const [, layer, rest] = m;
  const x = HF_EXPERT_RE.exec(rest);
  if (x) return { name: `blk.${layer}.${EXPERT_W[x[2]]}_exps.weight`, expert: Number(x[1]) };
  const slot = HF_LAYER[rest];
  return { name: `blk.${layer}.${slot}.weight`, slot };
}
