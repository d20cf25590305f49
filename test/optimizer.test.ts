// AdamW, gradient clipping and the LR schedule against PyTorch (torch.optim.AdamW, clip_grad_norm_), from a fixture
// made by test/fixtures/optim/make-adamw-reference.py with Debian's python3-torch.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { AdamW, clipGradNorm, learningRate, type OptimParam } from '../src/workflows/optimizer.js';

const ref = JSON.parse(fs.readFileSync(new URL('../../test/fixtures/optim/adamw-reference.json', import.meta.url), 'utf8')) as {
  start: Record<'a' | 'b', number[]>;
  grads: Record<'a' | 'b', number[]>[];
  lrs: number[];
  norms: number[];
  end: Record<'a' | 'b', number[]>;
};

test('AdamW + clipping + warm-up/cosine schedule reproduce torch.optim.AdamW step for step', () => {
  const params: OptimParam[] = [
    { name: 'a', data: Float64Array.from(ref.start.a), grad: null, decay: true },
    { name: 'b', data: Float64Array.from(ref.start.b), grad: null, decay: false },
  ];
  const opt = new AdamW(params, { beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1 });
  ref.grads.forEach((g, step) => {
    params[0].grad = Float64Array.from(g.a);
    params[1].grad = Float64Array.from(g.b);
    const norm = clipGradNorm(params, 1.0);
    assert.ok(Math.abs(norm - ref.norms[step]) < 1e-12 * ref.norms[step], `norm at step ${step}`);
    const lr = learningRate(step, { maxLr: 3e-2, minLr: 3e-3, warmupSteps: 3, totalSteps: 10 });
    assert.ok(Math.abs(lr - ref.lrs[step]) < 1e-15, `lr at step ${step}: ${lr} vs ${ref.lrs[step]}`);
    opt.step(lr);
  });
  for (const p of params) {
    const want = ref.end[p.name as 'a' | 'b'];
    for (let i = 0; i < want.length; i++) assert.ok(Math.abs(p.data[i] - want[i]) < 1e-12, `${p.name}[${i}]: ${p.data[i]} vs ${want[i]}`);
  }
});

test('parameters without a gradient stay frozen; duplicate names are refused', () => {
  const p: OptimParam = { name: 'w', data: new Float32Array([1, 2]), grad: null, decay: true };
  new AdamW([p]).step(0.1);
  assert.deepEqual(Array.from(p.data), [1, 2]);
  assert.throws(() => new AdamW([p, p]), /given twice/);
});

test('clipGradNorm leaves small gradients alone and reports a NaN norm without touching the gradients', () => {
  const p: OptimParam = { name: 'w', data: new Float32Array(2), grad: new Float32Array([0.3, 0.4]), decay: false };
  assert.ok(Math.abs(clipGradNorm([p], 1) - 0.5) < 1e-7);
  assert.deepEqual(Array.from(p.grad!), [Math.fround(0.3), Math.fround(0.4)]);
  p.grad = new Float32Array([NaN, 1]);
  assert.ok(Number.isNaN(clipGradNorm([p], 1)));
  assert.equal(p.grad[1], 1);
});
