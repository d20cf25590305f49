// syntheticVocab and writeRandomMixtralGGUF (src/workflows/random-model.ts): the synthetic vocabulary is the one the
// reference micro model was made with, and a written model reads back as the config and tensors that were written.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { readGGUF } from '../src/formats/gguf.js';
import { mixtralConfigFromGGUF, vocabFromGGUF } from '../src/formats/gguf-config.js';
import type { MixtralConfig } from '../src/model/config.js';
import { syntheticVocab, writeRandomMixtralGGUF } from '../src/workflows/random-model.js';

const fixture = (name: string): string => fileURLToPath(new URL(`../../test/fixtures/${name}`, import.meta.url));

test('syntheticVocab(512) is exactly the reference micro model vocabulary (pieces, scores, types, special ids)', () => {
  const micro = vocabFromGGUF(readGGUF(fixture('micro/micro-f32.gguf')));
  const v = syntheticVocab(512);
  assert.deepEqual(v.tokens, micro.tokens);
  assert.deepEqual(Array.from(v.scores), Array.from(micro.scores));
  assert.deepEqual(Array.from(v.types), Array.from(micro.types));
  assert.deepEqual([v.bosId, v.eosId, v.unkId, v.addBos, v.addEos], [micro.bosId, micro.eosId, micro.unkId, micro.addBos, micro.addEos]);
});

test('syntheticVocab: other sizes keep the layout; too small a size is refused', () => {
  const v = syntheticVocab(1000);
  assert.equal(v.tokens.length, 1000);
  assert.equal(new Set(v.tokens).size, 1000, 'pieces are distinct');
  assert.equal(v.tokens[999], `\u2581tok${999 - 396}`);
  assert.equal(v.scores[999], -(999 - 259));
  assert.deepEqual(syntheticVocab(260).tokens.slice(-1), ['\u2581']);
  assert.throws(() => syntheticVocab(259), RangeError);
  assert.throws(() => syntheticVocab(300.5), RangeError);
});

test('writeRandomMixtralGGUF: reads back the same config and tensors; tied models have no output.weight', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-random-'));
  try {
    const c: MixtralConfig = {
      vocabSize: 300, hiddenSize: 64, intermediateSize: 32, numHiddenLayers: 2, numAttentionHeads: 8, numKeyValueHeads: 2,
      headDim: 16, numLocalExperts: 4, numExpertsPerTok: 3, rmsNormEps: 1e-6, ropeTheta: 1e6, maxPositionEmbeddings: 512,
      slidingWindow: null, tieWordEmbeddings: true,
    };
    for (const dtype of ['f32', 'q8_0'] as const) {
      const file = path.join(dir, `m-${dtype}.gguf`);
      const written = writeRandomMixtralGGUF(file, c, { seed: 3, dtype });
      const f = readGGUF(file);
      assert.deepEqual(mixtralConfigFromGGUF(f), { ...c, rmsNormEps: Math.fround(c.rmsNormEps) });
      assert.equal(f.tensors.has('output.weight'), false);
      assert.deepEqual([...f.tensors.keys()].sort(), [...written.keys()].sort());
      for (const [name, t] of written) {
        const r = f.tensors.get(name)!;
        assert.equal(r.dtype, t.dtype, name);
        assert.deepEqual(r.shape, t.shape, name);
        assert.ok(Buffer.from(r.data).equals(Buffer.from(t.data)), `${name}: bytes differ`);
      }
      assert.deepEqual(vocabFromGGUF(f).tokens, syntheticVocab(300).tokens);
    }
    // Same seed, same model; another seed, another model.
    const a = writeRandomMixtralGGUF(path.join(dir, 'a.gguf'), c, { seed: 3 });
    const b = writeRandomMixtralGGUF(path.join(dir, 'b.gguf'), c, { seed: 4 });
    assert.ok(Buffer.from(a.get('blk.0.attn_q.weight')!.data).equals(Buffer.from(writeRandomMixtralGGUF(path.join(dir, 'c.gguf'), c, { seed: 3 }).get('blk.0.attn_q.weight')!.data)));
    assert.ok(!Buffer.from(a.get('blk.0.attn_q.weight')!.data).equals(Buffer.from(b.get('blk.0.attn_q.weight')!.data)));
    assert.throws(() => writeRandomMixtralGGUF(path.join(dir, 'd.gguf'), c, { seed: 1, vocab: syntheticVocab(512) }), /vocabulary has 512/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
