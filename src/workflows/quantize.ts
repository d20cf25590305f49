// `moe quantize <in.gguf> <out.gguf> --type q4_k_m`: llama-quantize's job, with its choices.
//
// Which tensor gets which type follows llama.cpp's src/llama-quant.cpp (llama_tensor_get_type and its helpers),
// transcribed for the file types below: 1-D tensors, norms and the MoE router keep their type; output.weight (and a
// tied token_embd) get Q6_K in K-quant mixes; Q4_K_M / Q5_K_M give Q6_K to attn_v and ffn_down of the layers its
// use_more_bits rule picks; 8-expert models get Q8_0 attn_k / attn_v and (some mixes) Q5_K attn_output; rows whose
// length is not a multiple of a type's block fall back as llama.cpp does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
// Q2_K/Q3_K -> Q4_0, then F16). Tensors are visited in llama.cpp's order (its weights_map: non-layer tensors by name,
// then layers in number order, each by name), which the use_more_bits counters depend on, and written in that order;
// metadata is copied with general.quantization_version and general.file_type set last, as llama-quantize does. The
// quantizers are ggml's *_ref (what llama-quantize runs without an importance matrix), so the output is the file
// llama-quantize writes, byte for byte.
//
// Inputs may be f32 / f16 / bf16; a quantized input tensor that needs another type is dequantized first, with a
// warning (llama-quantize --allow-requantize), since requantizing loses more than quantizing from the original.

import * as path from 'node:path';
import { FormatError } from '../formats/errors.js';
import { getNumber, getString, GGUFWriter, readGGUF, type GGUFFile } from '../formats/gguf.js';
import { dequantizeRow, quantize } from '../tensor/quant.js';
import { dtypeInfo, isQuantized, type DType } from '../tensor/dtype.js';
import type { Tensor } from '../tensor/tensor.js';
import { numel } from '../tensor/tensor.js';
import { Progress, formatBytes } from '../util/progress.js';
import { parse, UsageError } from '../cli/args.js';

/** llama.cpp file types (enum llama_ftype) moe-ts can write, by llama-quantize's names (lower case). */
export const QUANT_FILE_TYPES = {
  f32: { ftype: 0, base: 'f32' },
  f16: { ftype: 1, base: 'f16' },
  q4_0: { ftype: 2, base: 'q4_0' },
  q4_1: { ftype: 3, base: 'q4_1' },
  q8_0: { ftype: 7, base: 'q8_0' },
  q5_0: { ftype: 8, base: 'q5_0' },
  q5_1: { ftype: 9, base: 'q5_1' },
  q2_k: { ftype: 10, base: 'q2_k' },
  q3_k_s: { ftype: 11, base: 'q3_k' },
  q3_k_m: { ftype: 12, base: 'q3_k' },
  q3_k_l: { ftype: 13, base: 'q3_k' },
  q4_k_s: { ftype: 14, base: 'q4_k' },
  q4_k_m: { ftype: 15, base: 'q4_k' },
  q5_k_s: { ftype: 16, base: 'q5_k' },
  q5_k_m: { ftype: 17, base: 'q5_k' },
  q6_k: { ftype: 18, base: 'q6_k' },
  bf16: { ftype: 32, base: 'bf16' },
} as const satisfies Record<string, { ftype: number; base: DType }>;

export type QuantFileType = keyof typeof QUANT_FILE_TYPES;

/** llama-quantize's aliases: Q3_K, Q4_K and Q5_K mean the _M mixes. */
const ALIASES: Readonly<Record<string, QuantFileType>> = { q3_k: 'q3_k_m', q4_k: 'q4_k_m', q5_k: 'q5_k_m' };

/** A file type from a name as llama-quantize takes it (any case; Q4_K = Q4_K_M), or undefined. */
export function parseQuantFileType(name: string): QuantFileType | undefined {
  const n = name.toLowerCase();
  if (Object.hasOwn(QUANT_FILE_TYPES, n)) return n as QuantFileType;
  return Object.hasOwn(ALIASES, n) ? ALIASES[n] : undefined;
}

/** What llama.cpp needs to know about the model to choose types (read from the GGUF metadata). */
export interface QuantModelInfo {
  nLayer: number;
  nExpert: number;
  nHead: number;
  nHeadKv: number;
}

export function quantModelInfo(file: GGUFFile): QuantModelInfo {
  const arch = getString(file, 'general.architecture');
  const num = (key: string, def?: number) => getNumber(file, `${arch}.${key}`, { required: def === undefined }) ?? (def as number);
  const nHead = num('attention.head_count', 0);
  return { nLayer: num('block_count'), nExpert: num('expert_count', 0), nHead, nHeadKv: num('attention.head_count_kv', nHead) };
}

export interface TensorPlan {
  readonly name: string;
  readonly shape: readonly number[];
  readonly from: DType;
  readonly to: DType;
  /** The mix's type did not fit the row length and llama.cpp's fallback type was used instead. */
  readonly fallbackFrom?: DType;
}

type Category = 'token_embd' | 'attn_q' | 'attn_v' | 'attn_k' | 'attn_qkv' | 'attn_kv_b' | 'attn_output' | 'ffn_up' | 'ffn_gate' | 'ffn_down' | 'output' | 'other';

/** tensor_get_category (first match wins, by substring as llama.cpp matches). */
function category(name: string): Category {
  if (name === 'output.weight') return 'output';
  if (name === 'token_embd.weight' || name === 'per_layer_token_embd.weight') return 'token_embd';
  if (name.includes('attn_qkv.weight')) return 'attn_qkv';
  if (name.includes('attn_kv_b.weight')) return 'attn_kv_b';
  if (name.includes('attn_v.weight')) return 'attn_v';
  if (name.includes('attn_k.weight')) return 'attn_k';
  if (name.includes('attn_q.weight')) return 'attn_q';
  if (name.includes('attn_output.weight')) return 'attn_output';
  if (name.includes('ffn_up')) return 'ffn_up';
  if (name.includes('ffn_gate')) return 'ffn_gate';
  if (name.includes('ffn_down')) return 'ffn_down';
  return 'other';
}

const isAttnVLike = (c: Category) => c === 'attn_v' || c === 'attn_qkv' || c === 'attn_kv_b';

/** Substrings that keep a tensor unquantized (tensor_allows_quantization's list). */
const NEVER_QUANTIZED = [
  '_norm.weight', 'ffn_gate_inp.weight', 'ffn_gate_tid2eid.weight', 'altup', 'laurel', 'per_layer_model_proj',
  'ssm_conv1d', 'shortconv.conv.weight', 'indexer.k_proj.weight', 'indexer.q_proj.weight',
  'time_mix_first.weight', 'time_mix_w0.weight', 'time_mix_w1.weight', 'time_mix_w2.weight', 'time_mix_v0.weight',
  'time_mix_v1.weight', 'time_mix_v2.weight', 'time_mix_a0.weight', 'time_mix_a1.weight', 'time_mix_a2.weight',
  'time_mix_g1.weight', 'time_mix_g2.weight', 'time_mix_decay_w1.weight', 'time_mix_decay_w2.weight',
  'time_mix_lerp_fused.weight', 'attn_rel_b.weight', '.position_embd', 'sam.pos_embd', 'sam.neck.', 'sam.net_',
  '.rel_pos', '.patch_embd', '.patch_merger', 'a.rvq.codebook', 'mm.a.code_embd',
];

/** ggml_n_dims: trailing dimensions of size 1 do not count (a [1, 64] matrix is 1-D to llama.cpp). */
function ggmlNDims(shape: readonly number[]): number {
  // shape is row-major: ne[i] = shape[shape.length - 1 - i].
  for (let i = shape.length - 1; i >= 1; i--) if (shape[shape.length - 1 - i] > 1) return i + 1;
  return 1;
}

function allowsQuantization(name: string, shape: readonly number[]): boolean {
  if (ggmlNDims(shape) < 2) return false;
  if (!name.endsWith('weight')) return false;
  if (name === 'position_embd.weight' || name === 'token_types.weight') return false;
  return !NEVER_QUANTIZED.some((s) => name.includes(s));
}

/** The layer of a tensor named blk.N.... (sscanf "blk.%d."), or -1. */
const LAYER_RE = /^blk\.([+-]?\d+)\./;
function layerOf(name: string): number {
  const m = LAYER_RE.exec(name);
  return m ? Number.parseInt(m[1], 10) : -1;
}

/** llama_model_loader's weights_map order: layer (non-layer tensors first, as -1), then name bytes. */
export function llamaTensorOrder(names: Iterable<string>): string[] {
  return [...names].sort((a, b) => layerOf(a) - layerOf(b) || Buffer.compare(Buffer.from(a), Buffer.from(b)));
}

const useMoreBits = (i: number, n: number): boolean =>
  i < Math.trunc(n / 8) || i >= Math.trunc((7 * n) / 8) || (i - Math.trunc(n / 8)) % 3 === 2;

interface State {
  readonly info: QuantModelInfo;
  readonly ftype: QuantFileType;
  readonly tied: boolean;
  nAttentionWv: number;
  iAttentionWv: number;
  iFfnDown: number;
  iFfnGate: number;
  iFfnUp: number;
}

/** llama_tensor_get_type_impl for the mixes moe-ts writes (the IQ / TQ / MXFP4 branches cannot match them). */
function mixType(s: State, type: DType, name: string, shape: readonly number[], cat: Category): DType {
  const { info, ftype } = s;
  const nExpert = Math.max(1, info.nExpert);
  const nGqa = info.nHeadKv > 0 ? Math.trunc(info.nHead / info.nHeadKv) : 0;
  // LLM_TYPE_70B: a dense llama with 80 layers and grouped-query attention.
  const is70B = info.nExpert !== 8 && info.nLayer === 80 && info.nHead !== info.nHeadKv;
  const layerInfo = (i: number, n: number): [number, number] => {
    if (nExpert > 1) {
      // Expert tensors are not always in layer order (old Mixtral files): the layer comes from the name.
      const m = LAYER_RE.exec(name);
      if (m === null) throw new Error(`failed to determine the layer of tensor ${name}`);
      const l = Number.parseInt(m[1], 10);
      if (l < 0 || l >= n) throw new Error(`bad layer ${l} for tensor ${name}: must be in [0, ${n})`);
      return [l, n];
    }
    return [i, n];
  };
  const nx = shape[shape.length - 1];
  if (cat === 'output' || (s.tied && cat === 'token_embd')) {
    if (nx % dtypeInfo(type).blockSize !== 0) type = 'q8_0';
    else if (type !== 'q8_0') type = 'q6_k';
  } else if (cat === 'token_embd') {
    // Only IQ / TQ mixes change the embedding.
  } else if (isAttnVLike(cat)) {
    if (ftype === 'q2_k') type = nGqa >= 4 ? 'q4_k' : 'q3_k';
    else if (ftype === 'q3_k_m') type = s.iAttentionWv < 2 ? 'q5_k' : 'q4_k';
    else if (ftype === 'q3_k_l') type = 'q5_k';
    else if ((ftype === 'q4_k_m' || ftype === 'q5_k_m') && useMoreBits(s.iAttentionWv, s.nAttentionWv)) type = 'q6_k';
    else if (ftype === 'q4_k_s' && s.iAttentionWv < 4) type = 'q5_k';
    if (is70B && (type === 'q3_k' || type === 'q4_k')) type = 'q5_k';
    // "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
    if (info.nExpert === 8) type = 'q8_0';
    s.iAttentionWv++;
  } else if (cat === 'attn_k') {
    if (info.nExpert === 8) type = 'q8_0';
  } else if (cat === 'attn_q') {
    // Only IQ mixes change attn_q.
  } else if (cat === 'ffn_down') {
    const [iLayer, nLayer] = layerInfo(s.iFfnDown, info.nLayer);
    if (ftype === 'q2_k') type = 'q3_k';
    else if (ftype === 'q3_k_m') type = iLayer < Math.trunc(nLayer / 16) ? 'q5_k' : 'q4_k';
    else if (ftype === 'q3_k_l') type = 'q5_k';
    else if (ftype === 'q4_k_m') {
      if (useMoreBits(iLayer, nLayer)) type = 'q6_k';
    } else if (ftype === 'q5_k_m' && useMoreBits(iLayer, nLayer)) type = 'q6_k';
    else if (ftype === 'q4_k_s' && iLayer < Math.trunc(nLayer / 8)) type = 'q5_k';
    s.iFfnDown++;
  } else if (cat === 'attn_output') {
    if (info.nExpert === 8) {
      if (ftype === 'q2_k' || ftype === 'q3_k_s' || ftype === 'q3_k_m' || ftype === 'q4_k_s' || ftype === 'q4_k_m') type = 'q5_k';
    } else if (ftype === 'q2_k') type = 'q3_k';
    else if (ftype === 'q3_k_m') type = 'q4_k';
    else if (ftype === 'q3_k_l') type = 'q5_k';
  } else if (cat === 'ffn_gate') {
    // (llama.cpp's attn_qkv branch here is unreachable: attn_qkv is attn_v-like, handled above.)
    layerInfo(s.iFfnGate, info.nLayer); // llama.cpp checks the layer even though no mix here changes the type
    s.iFfnGate++;
  } else if (cat === 'ffn_up') {
    layerInfo(s.iFfnUp, info.nLayer);
    s.iFfnUp++;
  }
  return type;
}

/** tensor_type_fallback: a type whose block does not divide the row length is replaced (then F16 if still not). */
function fallbackType(type: DType, rowLength: number): DType {
  if (rowLength % dtypeInfo(type).blockSize === 0) return type;
  const next: Partial<Record<DType, DType>> = { q2_k: 'q4_0', q3_k: 'q4_0', q4_k: 'q5_0', q5_k: 'q5_1', q6_k: 'q8_0' };
  let r = next[type];
  if (r === undefined) {
    if (dtypeInfo(type).blockSize > 32) throw new Error(`no tensor type fallback is defined for type ${type}`);
    r = type;
  }
  return rowLength % dtypeInfo(r).blockSize === 0 ? r : 'f16';
}

/**
 * The type llama-quantize gives each tensor of `file` for file type `ftype`, in llama-quantize's (and our output's)
 * tensor order.
 */
export function planQuantization(file: GGUFFile, ftype: QuantFileType): TensorPlan[] {
  const info = quantModelInfo(file);
  return planTensors([...file.tensors].map(([name, t]) => ({ name, shape: t.shape, dtype: t.dtype })), info, ftype);
}

/** planQuantization on tensor descriptions (name, row-major shape, current dtype). */
export function planTensors(
  tensors: readonly { name: string; shape: readonly number[]; dtype: DType }[],
  info: QuantModelInfo,
  ftype: QuantFileType,
): TensorPlan[] {
  const byName = new Map(tensors.map((t) => [t.name, t]));
  const order = llamaTensorOrder(byName.keys());
  const base: DType = QUANT_FILE_TYPES[ftype].base;
  const s: State = {
    info, ftype,
    tied: !byName.has('output.weight'),
    nAttentionWv: order.filter((n) => isAttnVLike(category(n))).length,
    iAttentionWv: 0, iFfnDown: 0, iFfnGate: 0, iFfnUp: 0,
  };
  return order.map((name) => {
    const t = byName.get(name)!;
    if (!allowsQuantization(name, t.shape)) return { name, shape: t.shape, from: t.dtype, to: t.dtype };
    if (!isQuantized(base)) return { name, shape: t.shape, from: t.dtype, to: base };
    const mixed = mixType(s, base, name, t.shape, category(name));
    const to = fallbackType(mixed, t.shape[t.shape.length - 1]);
    return { name, shape: t.shape, from: t.dtype, to, ...(to !== mixed ? { fallbackFrom: mixed } : {}) };
  });
}

/** Elements converted per slab: bounds the f32 buffer (16 MiB) whatever the tensor's size. */
const SLAB_ELEMENTS = 4 * 2 ** 20;

/** The bytes of `t` converted to `to`, slab by slab of whole rows (dequantize to f32, quantize with ggml's _ref). */
function* convertedChunks(t: Tensor, to: DType, progress: Progress | null): Generator<Uint8Array> {
  const row = t.shape.length === 0 ? 1 : t.shape[t.shape.length - 1];
  const rows = numel(t.shape) / row;
  const slabRows = Math.max(1, Math.floor(SLAB_ELEMENTS / row));
  const from = dtypeInfo(t.dtype);
  const srcRowBytes = (row / from.blockSize) * from.typeSize;
  const buf = new Float32Array(Math.min(rows, slabRows) * row);
  for (let r = 0; r < rows; r += slabRows) {
    const n = Math.min(slabRows, rows - r);
    const values = buf.subarray(0, n * row);
    dequantizeRow(t.dtype, t.data, r * srcRowBytes, n * row, values, 0);
    yield quantize(to, values, row);
    progress?.tick(n * srcRowBytes);
  }
}

function* copiedChunks(t: Tensor, progress: Progress | null): Generator<Uint8Array> {
  const step = 64 * 2 ** 20;
  for (let o = 0; o < t.data.byteLength; o += step) {
    const chunk = t.data.subarray(o, Math.min(t.data.byteLength, o + step));
    yield chunk;
    progress?.tick(chunk.byteLength);
  }
}

/** Keys llama-quantize drops (split files become one) or sets itself, last. */
const DROPPED_KEYS = new Set(['split.no', 'split.count', 'split.tensors.count', 'general.quantization_version', 'general.file_type']);
/** ggml's GGML_QNT_VERSION, which llama-quantize writes as general.quantization_version. */
export const GGML_QNT_VERSION = 2;

export interface QuantizeOptions {
  /** Warnings (fallbacks, requantization) and notes. Default: none. */
  log?: (message: string) => void;
  /** Progress line on stderr (TTY only). Default true. */
  progress?: boolean;
}

export interface QuantizeResult {
  readonly plan: readonly TensorPlan[];
  readonly bytesIn: number;
  readonly bytesOut: number;
  readonly elements: number;
}

/** Quantizes a GGUF file to `ftype` as llama-quantize does, streaming tensors to `outFile` (written atomically). */
export function quantizeGGUF(inFile: string, outFile: string, ftype: QuantFileType, opts: QuantizeOptions = {}): QuantizeResult {
  if (path.resolve(inFile) === path.resolve(outFile)) throw new UsageError('the output file must differ from the input file');
  const log = opts.log ?? (() => {});
  const f = readGGUF(inFile, { progress: opts.progress });
  let plan: TensorPlan[];
  try {
    plan = planQuantization(f, ftype);
  } catch (e) {
    throw new FormatError(inFile, (e as Error).message);
  }
  const w = new GGUFWriter();
  for (const [key, value] of f.metadata) if (!DROPPED_KEYS.has(key)) w.set(key, value);
  w.setUint32('general.quantization_version', GGML_QNT_VERSION);
  w.setUint32('general.file_type', QUANT_FILE_TYPES[ftype].ftype);

  const requantized = plan.filter((p) => p.from !== p.to && isQuantized(p.from));
  if (requantized.length > 0) {
    log(`warning: ${requantized.length} tensors are already quantized (${[...new Set(requantized.map((p) => p.from))].join(', ')}) ` +
      'and are dequantized to be requantized, which loses more than quantizing from the f32/f16/bf16 original');
  }
  for (const p of plan) {
    if (p.fallbackFrom !== undefined) {
      log(`warning: ${p.name}: rows of ${p.shape[p.shape.length - 1]} are not a multiple of the ${p.fallbackFrom} block ` +
        `(${dtypeInfo(p.fallbackFrom).blockSize}); using ${p.to}`);
    }
  }
  const bytesIn = plan.reduce((n, p) => n + f.tensors.get(p.name)!.data.byteLength, 0);
  const progress = opts.progress === false ? null : new Progress({ label: `quantizing ${path.basename(inFile)} to ${ftype.toUpperCase()}`, total: bytesIn });
  let bytesOut = 0;
  let elements = 0;
  for (const p of plan) {
    const t = f.tensors.get(p.name)!;
    const count = numel(t.shape);
    elements += count;
    const row = t.shape.length === 0 ? 1 : t.shape[t.shape.length - 1];
    bytesOut += (count / dtypeInfo(p.to).blockSize) * dtypeInfo(p.to).typeSize;
    if (p.to === t.dtype) {
      w.addStreamedTensor(p.name, { dtype: t.dtype, shape: t.shape, chunks: () => copiedChunks(t, progress) });
    } else {
      if (row % dtypeInfo(p.to).blockSize !== 0) throw new FormatError(inFile, `${p.name}: rows of ${row} cannot be stored as ${p.to}`);
      w.addStreamedTensor(p.name, { dtype: p.to, shape: t.shape, chunks: () => convertedChunks(t, p.to, progress) });
    }
  }
  try {
    w.write(outFile);
  } catch (e) {
    progress?.abandon();
    throw e;
  }
  progress?.finish();
  return { plan, bytesIn, bytesOut, elements };
}

/** "q4_k: 96, q6_k: 24, f32: 65" for a plan. */
export function summarizePlan(plan: readonly TensorPlan[]): string {
  const counts = new Map<DType, number>();
  for (const p of plan) counts.set(p.to, (counts.get(p.to) ?? 0) + 1);
  return [...counts].map(([d, n]) => `${d}: ${n}`).join(', ');
}

export async function quantizeCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parse(argv, { type: { type: 'string' }, 'dry-run': { type: 'boolean' } }, true);
  if (positionals.length !== 2) throw new UsageError('quantize takes <in.gguf> <out.gguf> --type <type>');
  const [input, output] = positionals;
  const names = [...Object.keys(QUANT_FILE_TYPES), ...Object.keys(ALIASES)].join(', ');
  const typeName = values.type as string | undefined;
  if (typeName === undefined) throw new UsageError(`--type is required: one of ${names}`);
  const ftype = parseQuantFileType(typeName);
  if (ftype === undefined) throw new UsageError(`--type: unknown type '${typeName}' (one of ${names})`);
  const log = (s: string) => process.stderr.write(`moe quantize: ${s}\n`);
  if (values['dry-run']) {
    const plan = planQuantization(readGGUF(input), ftype);
    for (const p of plan) process.stdout.write(`${p.name.padEnd(36)} ${p.from.padEnd(5)} -> ${p.to}${p.fallbackFrom ? ` (fallback from ${p.fallbackFrom})` : ''}\n`);
    return;
  }
  const t0 = performance.now();
  const r = quantizeGGUF(input, output, ftype, { log });
  const bpw = (n: number) => ((n * 8) / r.elements).toFixed(2);
  log(`wrote ${output} (${ftype.toUpperCase()}): ${r.plan.length} tensors (${summarizePlan(r.plan)}), ` +
    `${formatBytes(r.bytesIn)} (${bpw(r.bytesIn)} bits/weight) -> ${formatBytes(r.bytesOut)} (${bpw(r.bytesOut)} bits/weight) ` +
    `in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
}
