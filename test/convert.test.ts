// moe convert: an HF checkpoint and its GGUF conversion give the same logits here and in llama.cpp; GGUF -> HF -> GGUF
// keeps every tensor; bad input gets clear errors.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execFileSync, spawnSync } from 'node:child_process';
import { convertGGUFToHF, convertHFToGGUF, writeHFTokenizerFiles } from '../src/workflows/convert.js';
import { loadModel } from '../src/model/load.js';
import { readGGUF } from '../src/formats/gguf.js';
import { vocabFromGGUF } from '../src/formats/gguf-config.js';
import { llamaCppLogProbsMany, LlamaCppUnavailableError } from './helpers/llamacpp.js';

const fixture = (p: string) => fileURLToPath(new URL(`../../test/fixtures/${p}`, import.meta.url));
const moeBin = fileURLToPath(new URL('../../bin/moe.js', import.meta.url));
const tokens: number[] = JSON.parse(fs.readFileSync(fixture('tokens-synthetic512.json'), 'utf8')).tokens;

function tmpdir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'moe-convert-'));
}

/** The reference HF checkpoint plus tokenizer files (it ships without them) written from the GGUF's vocabulary. */
function hfWithTokenizer(): string {
  const dir = tmpdir();
  for (const f of fs.readdirSync(fixture('micro/hf'))) fs.copyFileSync(path.join(fixture('micro/hf'), f), path.join(dir, f));
  writeHFTokenizerFiles(dir, vocabFromGGUF(readGGUF(fixture('micro/micro-f32.gguf'))));
  return dir;
}

function logits(modelPath: string): Float32Array {
  return loadModel(modelPath).newSession().forward(tokens, { allLogits: true });
}

function maxAbs(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

function logSoftmaxRows(x: Float32Array, vocab: number): Float64Array[] {
  const rows: Float64Array[] = [];
  for (let r = 0; r < x.length / vocab; r++) {
    const row = x.subarray(r * vocab, (r + 1) * vocab);
    let max = -Infinity;
    for (const v of row) max = Math.max(max, v);
    let s = 0;
    for (const v of row) s += Math.exp(v - max);
    const lse = max + Math.log(s);
    rows.push(Float64Array.from(row, (v) => v - lse));
  }
  return rows;
}

test('HF checkpoint and its f32 GGUF conversion: same tensors as llama.cpp\'s converter, same logits', () => {
  const hf = hfWithTokenizer();
  const out = path.join(tmpdir(), 'micro.gguf');
  convertHFToGGUF(hf, out, 'f32');
  // Every tensor equals, byte for byte, the one in the GGUF that llama.cpp's own converter wrote.
  const mine = readGGUF(out);
  const ref = readGGUF(fixture('micro/micro-f32.gguf'));
  assert.deepEqual([...mine.tensors.keys()].sort(), [...ref.tensors.keys()].sort());
  for (const [name, t] of ref.tensors) {
    const m = mine.tensors.get(name)!;
    assert.equal(m.dtype, t.dtype, name);
    assert.deepEqual(m.shape, t.shape, name);
    assert.ok(Buffer.from(m.data).equals(Buffer.from(t.data)), `${name} bytes differ`);
  }
  const a = logits(hf);
  const b = logits(out);
  assert.equal(maxAbs(a, b), 0, 'the HF directory and its GGUF conversion must give identical logits');
  fs.rmSync(hf, { recursive: true });
  fs.rmSync(path.dirname(out), { recursive: true });
});

test('GGUF -> HF -> GGUF keeps every tensor and the tokenizer; the HF directory gives the same logits', () => {
  const dir = tmpdir();
  const hf = path.join(dir, 'hf');
  convertGGUFToHF(fixture('micro/micro-f32.gguf'), hf);
  for (const f of ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.model', 'tokenizer.json', 'tokenizer_config.json']) {
    assert.ok(fs.existsSync(path.join(hf, f)), `${f} written`);
  }
  assert.equal(maxAbs(logits(hf), logits(fixture('micro/micro-f32.gguf'))), 0);
  const back = path.join(dir, 'back.gguf');
  convertHFToGGUF(hf, back);
  const a = readGGUF(back);
  const ref = readGGUF(fixture('micro/micro-f32.gguf'));
  for (const [name, t] of ref.tensors) assert.ok(Buffer.from(a.tensors.get(name)!.data).equals(Buffer.from(t.data)), name);
  const va = vocabFromGGUF(a);
  const vr = vocabFromGGUF(ref);
  assert.deepEqual(va.tokens, vr.tokens);
  assert.deepEqual(Array.from(va.scores), Array.from(vr.scores));
  assert.deepEqual(Array.from(va.types), Array.from(vr.types));
  assert.equal(loadModel(back).tokenizer.encode('a b c').join(','), loadModel(fixture('micro/micro-f32.gguf')).tokenizer.encode('a b c').join(','));
  fs.rmSync(dir, { recursive: true });
});

test('quantized GGUF -> HF dequantizes to f32 and keeps the logits', () => {
  const dir = tmpdir();
  convertGGUFToHF(fixture('micro/micro-q8_0.gguf'), dir);
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
  assert.equal(cfg.torch_dtype, 'float32');
  // The HF model holds the dequantized weights, so it differs from the q8_0 run only by the q8_0 rounding of the
  // activations that llama.cpp applies: the quantized-model tolerance of the reference README applies.
  const a = logits(dir);
  const b = logits(fixture('micro/micro-q8_0.gguf'));
  const V = 512;
  let mean = 0;
  let top = 0;
  for (let i = 0; i < a.length; i++) mean += Math.abs(a[i] - b[i]) / a.length;
  for (let r = 0; r < tokens.length; r++) {
    let x = 0;
    let y = 0;
    for (let j = 0; j < V; j++) {
      if (a[r * V + j] > a[r * V + x]) x = j;
      if (b[r * V + j] > b[r * V + y]) y = j;
    }
    if (x === y) top++;
  }
  assert.ok(mean < 0.1, `mean |diff| ${mean}`);
  assert.ok(top >= 0.9 * tokens.length, `top-1 agreement ${top}/${tokens.length}`);
  fs.rmSync(dir, { recursive: true });
});

test('converted GGUF files (f32, f16, q8_0, q4_0) load in llama.cpp and agree with moe-ts', async (t) => {
  const hf = hfWithTokenizer();
  const dir = tmpdir();
  const vocab = 512;
  try {
    for (const type of ['f32', 'f16', 'q8_0', 'q4_0'] as const) {
      const out = path.join(dir, `micro-${type}.gguf`);
      convertHFToGGUF(hf, out, type);
      let theirs: Float32Array[];
      try {
        [theirs] = await llamaCppLogProbsMany(out, [tokens]);
      } catch (e) {
        if (e instanceof LlamaCppUnavailableError) return t.skip(`llama.cpp unavailable: ${e.message}`);
        throw e;
      }
      const ours = logSoftmaxRows(logits(out), vocab);
      let max = 0;
      let mean = 0;
      let top = 0;
      for (let i = 0; i < tokens.length; i++) {
        let a = 0;
        let b = 0;
        for (let j = 0; j < vocab; j++) {
          const d = Math.abs(ours[i][j] - theirs[i][j]);
          max = Math.max(max, d);
          mean += d / (vocab * tokens.length);
          if (ours[i][j] > ours[i][a]) a = j;
          if (theirs[i][j] > theirs[i][b]) b = j;
        }
        if (a === b) top++;
      }
      const tol = { f32: 1e-3, f16: 5e-2, q8_0: Infinity, q4_0: Infinity }[type];
      assert.ok(max <= tol, `${type}: max |diff| ${max}`);
      assert.ok(mean <= 0.1, `${type}: mean |diff| ${mean}`);
      assert.ok(top / tokens.length >= 0.9, `${type}: top-1 agreement ${top}/${tokens.length}`);
    }
  } finally {
    fs.rmSync(hf, { recursive: true });
    fs.rmSync(dir, { recursive: true });
  }
});

test('moe convert CLI: converts, and refuses bad input with a clear message and a non-zero exit', () => {
  const dir = tmpdir();
  const out = path.join(dir, 'x.gguf');
  const hf = hfWithTokenizer();
  execFileSync(process.execPath, [moeBin, 'convert', hf, out, '--type', 'q8_0'], { stdio: 'pipe' });
  assert.equal(readGGUF(out).tensors.get('blk.0.attn_q.weight')!.dtype, 'q8_0');
  assert.equal(readGGUF(out).tensors.get('blk.0.ffn_gate_inp.weight')!.dtype, 'f32', 'the router stays f32');
  const cases: [string[], RegExp][] = [
    [['convert', path.join(dir, 'missing'), out], /no such file/],
    [['convert', hf, out, '--type', 'q9_9'], /unknown type/],
    [['convert', hf], /takes <in> <out>/],
    [['convert', out, path.join(dir, 'hf-out'), '--type', 'q4_0'], /safetensors holds/],
    [['convert', fixture('micro/hf'), out], /no tokenizer/],
  ];
  for (const [args, re] of cases) {
    const r = spawnSync(process.execPath, [moeBin, ...args], { encoding: 'utf8' });
    assert.notEqual(r.status, 0, args.join(' '));
    assert.match(r.stderr, re, args.join(' '));
    assert.doesNotMatch(r.stderr, /at .*\.js:\d+/, 'no stack trace');
  }
  fs.rmSync(dir, { recursive: true });
  fs.rmSync(hf, { recursive: true });
});
