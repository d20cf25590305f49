// `moe quantize` against llama.cpp's own llama-quantize (results recorded in
// test/fixtures/quantize/llama-quantize-reference.json by make-reference.mjs from real llama-quantize runs):
// the type of every tensor for every file type on models of several shapes (8-expert 32-layer, tied 4-expert,
// dense 80-layer GQA "70B" and MHA, rows that force fallbacks), and the output files byte for byte where the input
// is in the repository (the micro model, f32 and already-quantized q8_0; a model with rows of 256 in f16, so real
// Q4_K / Q5_K / Q6_K / Q2_K / Q3_K blocks). The CLI's flags and errors.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  GGML_QNT_VERSION, QUANT_FILE_TYPES, parseQuantFileType, planQuantization, planTensors, quantizeGGUF,
  type QuantFileType,
} from '../src/workflows/quantize.js';
import { GGUFWriter, getNumber, readGGUF } from '../src/formats/gguf.js';
import { expectedShapes } from '../src/formats/names.js';
import type { MixtralConfig } from '../src/model/config.js';
import type { DType } from '../src/tensor/dtype.js';
import { f32Tensor } from '../src/tensor/tensor.js';

const root = fileURLToPath(new URL('../../', import.meta.url));
const fixture = (p: string) => path.join(root, 'test/fixtures', p);
const CLI = path.join(root, 'dist/src/cli/main.js');

interface RefModel {
  file?: string;
  config?: MixtralConfig;
  dtype?: DType;
  inputSha256: string;
  tensors: string[];
  types: Record<string, string>;
  outputSha256?: Record<string, string>;
}
const REF = JSON.parse(fs.readFileSync(fixture('quantize/llama-quantize-reference.json'), 'utf8')) as { models: Record<string, RefModel> };
const FTYPES = Object.keys(QUANT_FILE_TYPES) as QuantFileType[];

const sha256 = (file: string) => createHash('sha256').update(fs.readFileSync(file)).digest('hex');
const tmpDir = () => fs.mkdtempSync(path.join(os.tmpdir(), 'moe-quantize-'));

/** Tensor names, shapes and dtypes of a model written by random-model.ts (norms and the router stay f32). */
function describe(c: MixtralConfig, dtype: DType) {
  return [...expectedShapes(c, 'gguf')].map(([name, shape]) => ({
    name, shape, dtype: (shape.length === 1 || name.endsWith('ffn_gate_inp.weight') ? 'f32' : dtype) as DType,
  }));
}

test('the reference covers every file type moe quantize writes', () => {
  for (const [name, m] of Object.entries(REF.models)) assert.deepEqual(Object.keys(m.types).sort(), [...FTYPES].sort(), name);
});

test('tensor types: the same choice as llama-quantize for every tensor, file type and model shape', () => {
  for (const [name, m] of Object.entries(REF.models)) {
    let plans: (ft: QuantFileType) => { name: string; to: DType }[];
    if (m.file !== undefined) {
      const f = readGGUF(path.join(root, m.file));
      plans = (ft) => planQuantization(f, ft);
    } else {
      const c = m.config!;
      const info = { nLayer: c.numHiddenLayers, nExpert: c.numLocalExperts > 1 ? c.numLocalExperts : 0, nHead: c.numAttentionHeads, nHeadKv: c.numKeyValueHeads };
      const tensors = describe(c, m.dtype!);
      plans = (ft) => planTensors(tensors, info, ft);
    }
    for (const ft of FTYPES) {
      const plan = plans(ft);
      assert.deepEqual(plan.map((p) => p.name), m.tensors, `${name} ${ft}: tensor order (llama.cpp's weights_map order)`);
      const want = m.types[ft].split(' ');
      const diff = plan.map((p, i) => (p.to === want[i] ? '' : `${p.name}: ours ${p.to}, llama-quantize ${want[i]}`)).filter(Boolean);
      assert.deepEqual(diff, [], `${name} ${ft}`);
    }
  }
  // The rules the fixture exercises, spelled out (so a reference regenerated wrongly cannot pass silently).
  const types = (model: string, ft: string) => {
    const m = REF.models[model];
    return new Map(m.tensors.map((n, i) => [n, m.types[ft].split(' ')[i]]));
  };
  const e8 = types('e8-32layers', 'q4_k_m');
  assert.equal(e8.get('output.weight'), 'q6_k');
  assert.equal(e8.get('token_embd.weight'), 'q4_k');
  assert.equal(e8.get('blk.5.attn_v.weight'), 'q8_0', '8 experts: attn_v q8_0');
  assert.equal(e8.get('blk.5.attn_k.weight'), 'q8_0', '8 experts: attn_k q8_0');
  assert.equal(e8.get('blk.5.attn_output.weight'), 'q5_k', '8 experts, Q4_K_M: attn_output q5_k');
  assert.equal(e8.get('blk.0.ffn_down_exps.weight'), 'q6_k', 'use_more_bits: first eighth');
  assert.equal(e8.get('blk.4.ffn_down_exps.weight'), 'q4_k');
  assert.equal(e8.get('blk.6.ffn_down_exps.weight'), 'q6_k', 'use_more_bits: every third after the first eighth');
  assert.equal(e8.get('blk.0.ffn_gate_inp.weight'), 'f32', 'the router is never quantized');
  assert.equal(e8.get('blk.0.attn_norm.weight'), 'f32');
  assert.equal(types('e4-tied-gqa8', 'q4_k_m').get('token_embd.weight'), 'q6_k', 'a tied embedding is quantized as the output');
  assert.equal(types('dense-80-gqa', 'q4_k_s').get('blk.10.attn_v.weight'), 'q5_k', '"70B": attn_v q4_k -> q5_k');
  assert.equal(types('dense-80-mha', 'q4_k_s').get('blk.10.attn_v.weight'), 'q4_k', 'MHA 80 layers is not "70B"');
  assert.equal(types('micro', 'q4_k_m').get('blk.0.ffn_gate_exps.weight'), 'q5_0', 'rows of 64: q4_k falls back to q5_0');
  assert.equal(types('rows256', 'q4_k_m').get('blk.0.ffn_gate_exps.weight'), 'q4_k');
  assert.equal(types('rows256', 'q4_k_m').get('token_embd.weight'), 'q6_k', 'tied embedding');
});

test('every file type byte for byte as llama-quantize writes it: micro from f32 and from q8_0 (requantized), rows of 256 from f16', () => {
  const dir = tmpDir();
  try {
    for (const name of ['micro', 'micro-q8_0', 'rows256']) {
      const m = REF.models[name];
      const input = path.join(root, m.file!);
      assert.equal(sha256(input), m.inputSha256, `${m.file} changed since the reference was made`);
      for (const ft of FTYPES) {
        const out = path.join(dir, `${name}-${ft}.gguf`);
        const logs: string[] = [];
        const r = quantizeGGUF(input, out, ft, { progress: false, log: (s) => logs.push(s) });
        assert.equal(sha256(out), m.outputSha256![ft], `${name} ${ft}: output differs from llama-quantize's`);
        const requantized = r.plan.some((p) => p.from !== p.to && p.from !== 'f32' && p.from !== 'f16');
        assert.equal(logs.some((l) => /already quantized \(q8_0\)/.test(l)), requantized, `${name} ${ft}: requantization warning`);
        if (r.plan.some((p) => p.fallbackFrom)) assert.ok(logs.some((l) => /not a multiple of the q\d_k block/.test(l)), `${name} ${ft}: fallback warning`);
        const q = readGGUF(out, { mmap: false });
        assert.equal(getNumber(q, 'general.file_type'), QUANT_FILE_TYPES[ft].ftype);
        assert.equal(getNumber(q, 'general.quantization_version'), GGML_QNT_VERSION);
        assert.deepEqual([...q.metadata.keys()].slice(-2), ['general.quantization_version', 'general.file_type']);
        fs.rmSync(out);
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('file type names: llama-quantize\'s, any case, with its aliases', () => {
  assert.equal(parseQuantFileType('Q4_K_M'), 'q4_k_m');
  assert.equal(parseQuantFileType('q4_k'), 'q4_k_m');
  assert.equal(parseQuantFileType('Q5_K'), 'q5_k_m');
  assert.equal(parseQuantFileType('q3_k'), 'q3_k_m');
  assert.equal(parseQuantFileType('q6_k'), 'q6_k');
  assert.equal(parseQuantFileType('q8_k'), undefined);
  assert.equal(parseQuantFileType('iq2_xs'), undefined);
  assert.equal(parseQuantFileType('constructor'), undefined);
});

function cli(...args: string[]) {
  const env = { ...process.env };
  delete env.NODE_TEST_CONTEXT;
  return spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', env });
}

test('moe quantize: writes the file, reports the mix; --dry-run lists the plan; usage and file errors', () => {
  const dir = tmpDir();
  try {
    const input = fixture('micro/micro-f32.gguf');
    const out = path.join(dir, 'q.gguf');
    const r = cli('quantize', input, out, '--type', 'Q4_K');
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stderr, /wrote .*q\.gguf \(Q4_K_M\): 23 tensors \(.*q8_0: \d+.*\).*bits\/weight/);
    assert.match(r.stderr, /blk\.0\.ffn_gate_exps\.weight: rows of 64 are not a multiple of the q4_k block \(256\); using q5_0/);
    assert.equal(sha256(out), REF.models.micro.outputSha256!.q4_k_m);

    const dry = cli('quantize', input, path.join(dir, 'never.gguf'), '--type', 'q6_k', '--dry-run');
    assert.equal(dry.status, 0, dry.stderr);
    // output.weight: rows of 64 are not whole q6_k blocks, so the output rule itself picks q8_0 (no fallback).
    assert.match(dry.stdout, /^output\.weight +f32 +-> q8_0$/m);
    assert.match(dry.stdout, /^token_embd\.weight +f32 +-> q8_0 \(fallback from q6_k\)$/m);
    assert.match(dry.stdout, /^blk\.0\.ffn_gate_inp\.weight +f32 +-> f32$/m);
    assert.ok(!fs.existsSync(path.join(dir, 'never.gguf')));

    const usage = (args: string[], re: RegExp) => {
      const u = cli('quantize', ...args);
      assert.equal(u.status, 2, `${args.join(' ')}: ${u.stderr}`);
      assert.match(u.stderr, re);
    };
    usage([input, out], /--type is required: one of f32, f16, .*q4_k_m/);
    usage([input, out, '--type', 'q7_k'], /unknown type 'q7_k'/);
    usage([input], /quantize takes <in\.gguf> <out\.gguf>/);
    usage([input, input, '--type', 'q8_0'], /output file must differ from the input/);

    const notGguf = path.join(dir, 'not.gguf');
    fs.writeFileSync(notGguf, 'hello, world');
    const bad = cli('quantize', notGguf, out, '--type', 'q8_0');
    assert.equal(bad.status, 1);
    assert.match(bad.stderr, /not\.gguf: not a GGUF file/);
    const missing = cli('quantize', path.join(dir, 'missing.gguf'), out, '--type', 'q8_0');
    assert.equal(missing.status, 1);
    assert.match(missing.stderr, /missing\.gguf: cannot read the file/);
    assert.deepEqual(fs.readdirSync(dir).sort(), ['not.gguf', 'q.gguf'], 'no partial files left behind');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('streamed tensors: the bytes are checked, and a wrong count fails the write without leaving a file', () => {
  const dir = tmpDir();
  try {
    const ok = new GGUFWriter().addStreamedTensor('t', { dtype: 'f32', shape: [2, 4], chunks: function* () { yield new Uint8Array(12); yield new Uint8Array(20); } });
    const file = path.join(dir, 'ok.gguf');
    ok.write(file);
    assert.equal(readGGUF(file).tensors.get('t')!.data.byteLength, 32);
    assert.equal(ok.toBytes().byteLength, fs.statSync(file).size);
    for (const [what, chunks] of [['short', [new Uint8Array(31)]], ['long', [new Uint8Array(16), new Uint8Array(17)]]] as const) {
      const w = new GGUFWriter().addTensor('a', f32Tensor(new Float32Array(4), [4]));
      w.addStreamedTensor('t', { dtype: 'f32', shape: [2, 4], chunks: () => chunks });
      const bad = path.join(dir, `${what}.gguf`);
      assert.throws(() => w.write(bad), /tensor "t": chunks (gave 31 of|give more than) its 32 bytes/);
      assert.throws(() => w.toBytes(), /tensor "t": chunks (gave 31 of|give more than) its 32 bytes/);
      assert.ok(!fs.existsSync(bad));
    }
    assert.deepEqual(fs.readdirSync(dir), ['ok.gguf']);
    assert.throws(() => new GGUFWriter().addStreamedTensor('q', { dtype: 'q4_k', shape: [2, 64], chunks: () => [] }), /not a multiple of the q4_k block size 256/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
