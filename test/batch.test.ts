// forwardBatch: several sequences in one pass give exactly what each gives alone (the server's continuous batching).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { loadModel } from '../src/model/load.js';
import { forwardBatch } from '../src/model/mixtral.js';
import type { RouterTrace } from '../src/model/types.js';

const MICRO = fileURLToPath(new URL('../../test/fixtures/micro/micro-q4_0.gguf', import.meta.url));

test('a batch of sequences at different positions equals each sequence run alone, bit for bit', () => {
  const m = loadModel(MICRO);
  const prompts = [
    [1, 20, 30, 40, 50, 60, 70],
    [1, 300, 301],
    [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
  ];
  // Alone: prefill, then two decode steps each.
  const alone = prompts.map((p) => {
    const s = m.newSession();
    const trace: RouterTrace[] = [];
    const a = s.forward(p, { allLogits: true, trace });
    const b = s.forward([100], { trace });
    const c = s.forward([101], { trace });
    return { logits: [a, b, c], trace };
  });
  // Together: one batched prefill (mixed lengths), then batched decode steps, with one sequence joining late.
  const sessions = prompts.map(() => m.newSession());
  const traces = prompts.map(() => [] as RouterTrace[]);
  const pre = forwardBatch(m.model, [0, 1].map((i) => ({ session: sessions[i], tokens: prompts[i], allLogits: true, trace: traces[i] })));
  const late = forwardBatch(m.model, [
    { session: sessions[0], tokens: [100], trace: traces[0] },
    { session: sessions[2], tokens: prompts[2], allLogits: true, trace: traces[2] },
    { session: sessions[1], tokens: [100], trace: traces[1] },
  ]);
  const step2 = forwardBatch(m.model, [0, 1, 2].map((i) => ({ session: sessions[i], tokens: [i === 2 ? 100 : 101], trace: traces[i] })));
  const step3 = forwardBatch(m.model, [{ session: sessions[2], tokens: [101], trace: traces[2] }]);
  const together = [
    [pre[0], late[0], step2[0]],
    [pre[1], late[2], step2[1]],
    [late[1], step2[2], step3[0]],
  ];
  for (let i = 0; i < 3; i++) {
    for (let j = 0; j < 3; j++) assert.deepEqual(together[i][j], alone[i].logits[j], `sequence ${i}, call ${j}`);
    assert.deepEqual(traces[i], alone[i].trace, `router trace of sequence ${i}`);
    assert.equal(sessions[i].position, prompts[i].length + 2);
  }
});

test('a bad item leaves every session of the batch untouched', () => {
  const m = loadModel(MICRO);
  const a = m.newSession({ contextLength: 8 });
  const b = m.newSession({ contextLength: 8 });
  a.forward([1, 2]);
  assert.throws(() => forwardBatch(m.model, [{ session: a, tokens: [3] }, { session: b, tokens: [1, 2, 3, 4, 5, 6, 7, 8, 9] }]), /context holds 8/);
  assert.throws(() => forwardBatch(m.model, [{ session: a, tokens: [3] }, { session: b, tokens: [99999] }]), /outside the vocabulary/);
  assert.throws(() => forwardBatch(m.model, [{ session: a, tokens: [3] }, { session: a, tokens: [4] }]), /same session twice/);
  assert.equal(a.position, 2);
  assert.equal(b.position, 0);
});
