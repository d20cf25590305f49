// Files written by GGUFWriter, read by programs nobody here wrote: node-llama-cpp's JavaScript GGUF reader and
// llama.cpp itself (through node-llama-cpp's prebuilt CPU binary), which must compute the reference logits from a
// re-laid-out copy of micro-f32.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { getLlama, LlamaLogLevel, readGgufFileInfo, type Token } from 'node-llama-cpp';
import { GGUFWriter, readGGUF, type GGUFArray, type GGUFValue } from '../src/formats/gguf.js';
import { ALL_VALUES } from './gguf-helpers.js';

const fixture = (name: string): string => fileURLToPath(new URL(`../../test/fixtures/micro/${name}`, import.meta.url));

/** node-llama-cpp's representation: plain arrays (nested too), bigints for 64-bit integers. */
function plain(v: GGUFValue | GGUFArray): unknown {
  if ('itemType' in v) return Array.from(v.items as ArrayLike<unknown>, (x) => (typeof x === 'object' ? plain(x as GGUFArray) : x));
  return v.type === 'array' ? plain(v.value) : v.value;
}

/** Flat keys that do not nest into each other (node-llama-cpp turns dotted keys into nested objects). */
const flatKey = (k: string): string => `moe_test.${k.replaceAll('.', '_')}`;

test("node-llama-cpp's GGUF reader reads every value type our writer writes", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-gguf-'));
  try {
    const w = new GGUFWriter();
    for (const [k, v] of ALL_VALUES) w.set(flatKey(k), v);
    w.addTensor('t', { dtype: 'f32', shape: [2, 3], data: new Uint8Array(24) });
    const out = path.join(dir, 'values.gguf');
    w.write(out);
    const info = await readGgufFileInfo(out, { readTensorInfo: true, logWarnings: false });
    assert.equal(info.version, 3);
    const theirs = (info.metadata as unknown as Record<string, Record<string, unknown>>).moe_test;
    for (const [k, v] of ALL_VALUES) assert.deepEqual(theirs[k.replaceAll('.', '_')], plain(v), k);
    assert.deepEqual(info.fullTensorInfo?.map((t) => [t.name, t.dimensions, t.ggmlType, t.offset]), [['t', [3, 2], 0, 0]]);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('llama.cpp loads a re-laid-out micro-f32 written by GGUFWriter and reproduces the reference logits', async () => {
  const ref = JSON.parse(fs.readFileSync(fixture('micro-f32.logits.json'), 'utf8')) as {
    tokens: Token[]; logits: number[][]; logsumexp: number[];
  };
  const src = readGGUF(fixture('micro-f32.gguf'));
  const w = new GGUFWriter();
  for (const [k, v] of src.metadata) w.set(k, v);
  // A layout unlike the original: 64-byte alignment, tensors in reverse order, extra keys of every flat type
  // (llama.cpp itself refuses nested arrays, so those are left out here).
  w.setUint32('general.alignment', 64);
  for (const [k, v] of ALL_VALUES) if (!(v.type === 'array' && v.value.itemType === 'array') && k !== 'general.architecture') w.set(flatKey(k), v);
  for (const [name, t] of [...src.tensors].reverse()) w.addTensor(name, t);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-gguf-'));
  const llama = await getLlama({ gpu: false, build: 'never', logLevel: LlamaLogLevel.error });
  try {
    const file = path.join(dir, 'micro-f32-relaid.gguf');
    w.write(file);
    assert.notDeepEqual(fs.readFileSync(file), fs.readFileSync(fixture('micro-f32.gguf')));
    const model = await llama.loadModel({ modelPath: file });
    const ctx = await model.createContext({
      contextSize: 64, batchSize: 64, threads: 1, flashAttention: false,
      experimentalKvCacheKeyType: 'F32', experimentalKvCacheValueType: 'F32',
    });
    const n = 4;
    const out = await ctx.getSequence().controlledEvaluate(ref.tokens.slice(0, n).map((t) => [
      t, { generateNext: { probabilities: true, options: { temperature: 1, topK: 0, topP: 1, minP: 0 } } },
    ]));
    for (let i = 0; i < n; i++) {
      const probs: ReadonlyMap<number, number> | undefined = out[i]?.next.probabilities;
      assert.ok(probs !== undefined && probs.size === ref.logits[i].length, `position ${i}`);
      let best = 0;
      for (let v = 0; v < ref.logits[i].length; v++) {
        const expected = Math.exp(ref.logits[i][v] - ref.logsumexp[i]);
        // f32 weights and KV cache: logits agree to ~5e-6 (reference README), probabilities far closer than 1e-5.
        assert.ok(Math.abs((probs.get(v as Token) ?? 0) - expected) < 1e-5, `position ${i} token ${v}: ${probs.get(v as Token)} vs ${expected}`);
        if (ref.logits[i][v] > ref.logits[i][best]) best = v;
      }
      assert.equal([...probs.entries()].reduce((a, b) => (b[1] > a[1] ? b : a))[0], best, `top-1 at position ${i}`);
    }
    await ctx.dispose();
    await model.dispose();
  } finally {
    await llama.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
