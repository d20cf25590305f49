// moe eval: perplexity per language from validation shards, checked against llama.cpp's NLL on the same tokens.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { spawnSync } from 'node:child_process';
import { evaluatePerplexity, loadCV } from '../src/workflows/eval.js';
import type { RouterTrace } from '../src/model/types.js';
import { loadModel } from '../src/model/load.js';
import { SHARD_HEADER_BYTES, shardName, readShard } from '../src/workflows/corpus.js';

const fixture = (p: string) => fileURLToPath(new URL(`../../test/fixtures/${p}`, import.meta.url));
const moeBin = fileURLToPath(new URL('../../bin/moe.js', import.meta.url));

/** A shard holding exactly these ids (ShardWriter wraps documents in BOS/EOS; here the ids already start with BOS). */
function rawShard(file: string, ids: number[], vocab: number): void {
  const h = Buffer.alloc(SHARD_HEADER_BYTES);
  h.write('MOESHARD', 0, 'latin1');
  h.writeUInt32LE(1, 8);
  h.writeUInt32LE(vocab, 12);
  h.writeBigUInt64LE(BigInt(ids.length), 16);
  h.writeUInt32LE(1, 24);
  h.writeUInt16LE(1, 28);
  h.writeUInt16LE(2, 30);
  fs.writeFileSync(file, Buffer.concat([h, Buffer.from(Uint16Array.from(ids).buffer)]));
}

test('perplexity of the reference tokens equals exp(llama.cpp\'s mean NLL); one row per language', () => {
  const ref = JSON.parse(fs.readFileSync(fixture('micro/micro-f32.logits.json'), 'utf8')) as { tokens: number[]; mean_nll: number };
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-eval-'));
  rawShard(path.join(dir, shardName('en', 'val', 0)), ref.tokens, 512);
  rawShard(path.join(dir, shardName('fr', 'val', 0)), ref.tokens.slice(0, 20), 512);
  assert.deepEqual(Array.from(readShard(path.join(dir, shardName('en', 'val', 0))).ids), ref.tokens);
  const m = loadModel(fixture('micro/micro-f32.gguf'));
  const r = evaluatePerplexity(m, dir, { window: 64 });
  assert.deepEqual(r.map((x) => x.lang), ['en', 'fr']);
  assert.equal(r[0].tokens, ref.tokens.length - 1);
  assert.ok(Math.abs(r[0].nll - ref.mean_nll) < 1e-5, `${r[0].nll} vs llama.cpp ${ref.mean_nll}`);
  assert.ok(Math.abs(r[0].perplexity - Math.exp(ref.mean_nll)) / Math.exp(ref.mean_nll) < 1e-4);
  // Windows: the same tokens in windows of 8 see less context, so the NLL differs but the count stays.
  const w8 = evaluatePerplexity(m, dir, { window: 8 });
  assert.equal(w8[0].tokens, ref.tokens.length - 1);
  const cli = spawnSync(process.execPath, [moeBin, 'eval', '--model', fixture('micro/micro-f32.gguf'), '--data', dir, '--window', '64', '--json'], { encoding: 'utf8' });
  assert.equal(cli.status, 0, cli.stderr);
  assert.deepEqual(JSON.parse(cli.stdout).map((x: { lang: string }) => x.lang), ['en', 'fr']);

  // Expert load per language: the shares of the token-slots each expert took, as the router traces count them.
  const trace: RouterTrace[] = [];
  m.newSession({ contextLength: 65 }).forward(ref.tokens.slice(0, 20 - 1), { trace });
  const L = m.config.numHiddenLayers, E = m.config.numLocalExperts, k = m.config.numExpertsPerTok;
  const want = Array.from({ length: L }, (_, l) => Array.from({ length: E }, (_, e) => trace.reduce((a, t) => a + t.experts[l].filter((x) => x === e).length, 0) / (19 * k)));
  assert.deepEqual(r[1].load, want);
  assert.deepEqual(loadCV([[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0, 0]]), [0, 1]);
  fs.rmSync(dir, { recursive: true });
});
