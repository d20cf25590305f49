// Losses: next-token cross-entropy (with positions that carry no loss), and the MoE router's auxiliary losses:
// the Switch/Mixtral load-balancing loss exactly as Hugging Face transformers computes it, ST-MoE's router z-loss,
// and the squared coefficient of variation of Shazeer et al.'s importance and load losses. Each returns a scalar [1].

import { alloc, gradOf, record, samePrecision, Var } from './tape.js';
import { logSumExpRow, softmaxRow } from './ops.js';
import { gradKernels } from './kernels.js';

export interface CrossEntropyOptions {
  /**
   * Divide the summed loss by this instead of by the number of target positions (e.g. the token count of a whole
   * accumulated batch, so micro-batches of unequal size add up to the batch's mean).
   */
  divisor?: number;
}

/**
 * Mean cross-entropy of logits [N, V] against targets [N]. A negative target (PyTorch/HF use -100) marks a
 * position with no loss: prompt tokens in instruction tuning, padding. With no target positions the loss is 0.
 */
export function crossEntropy(logits: Var, targets: ArrayLike<number>, opts: CrossEntropyOptions = {}): Var {
  if (logits.shape.length !== 2) throw new Error(`crossEntropy: logits must be [N, V], got [${logits.shape.join(', ')}]`);
  const [N, V] = logits.shape;
  if (targets.length !== N) throw new Error(`crossEntropy: ${targets.length} targets for ${N} rows`);
  let count = 0;
  for (let i = 0; i < N; i++) {
    const t = targets[i];
    if (!Number.isInteger(t) || t >= V) throw new Error(`crossEntropy: target ${t} at ${i} outside 0..${V - 1} (negative = ignored)`);
    if (t >= 0) count++;
  }
  const div = opts.divisor ?? count;
  if (!(div > 0) && count > 0) throw new Error(`crossEntropy: divisor must be > 0, got ${div}`);
  const lse = new Float64Array(N);
  // The probabilities are kept for the backward pass (one more logits-sized array) when a gradient will be wanted.
  const probs = logits.requiresGrad ? alloc(logits.precision, N * V) : null;
  gradKernels().softmaxRows(logits.data, N, V, lse, probs);
  let total = 0;
  for (let i = 0; i < N; i++) {
    if (targets[i] < 0) continue;
    total += lse[i] - logits.data[i * V + targets[i]];
  }
  const out = alloc(logits.precision, 1);
  out[0] = count > 0 ? total / div : 0;
  return record('crossEntropy', out, [1], [logits], (g) => {
    if (count === 0) return;
    // The usual case, nothing else has added to the logits' gradient yet: it becomes the probabilities array itself,
    // scaled in place, which saves a logits-sized allocation (and its page faults) every step.
    if (logits.grad === null) logits.grad = probs;
    gradKernels().crossEntropyBackward(gradOf(logits)!, probs!, targets, N, V, g[0] / div);
  });
}

/**
 * The Switch/Mixtral load-balancing loss as transformers' `load_balancing_loss_func` computes it: the router
 * logits of all MoE layers are concatenated ([L*T, E] rows), p = softmax per row, and
 *   loss = E * sum_e f_e * P_e,  f_e = (top-k slots routed to e) / rows,  P_e = mean over rows of p_e.
 * HF takes the mean of the one-hot [rows, k, E] over rows and sums over k, so sum_e f_e = k and the loss is k when
 * the router probabilities are uniform (1 for Switch's top-1). f is a count and gets no gradient; P does.
 * `experts[l]` holds layer l's chosen experts [T*k] (for the Mixtral and Switch routers exactly HF's
 * topk(softmax(logits))). `mask` [T] (1 = a real token) leaves padding out, as HF's attention_mask does.
 * The caller multiplies by router_aux_loss_coef (0.02 for Mixtral).
 */
export function loadBalancingLoss(logits: readonly Var[], experts: readonly Int32Array[], k: number, mask: ArrayLike<number> | null = null): Var {
  if (logits.length === 0) throw new Error('loadBalancingLoss: no router logits');
  if (experts.length !== logits.length) throw new Error(`loadBalancingLoss: ${experts.length} expert lists for ${logits.length} layers`);
  const p = samePrecision('loadBalancingLoss', ...logits);
  const E = logits[0].shape[1];
  const f = new Float64Array(E);
  const P = new Float64Array(E);
  let rows = 0;
  const probs = logits.map((z, l) => {
    const [T, e2] = z.shape;
    if (e2 !== E) throw new Error(`loadBalancingLoss: layer ${l} has ${e2} experts, layer 0 has ${E}`);
    if (experts[l].length !== T * k) throw new Error(`loadBalancingLoss: layer ${l} has ${experts[l].length} choices for ${T} x ${k}`);
    if (mask && mask.length !== T) throw new Error(`loadBalancingLoss: mask has ${mask.length} entries for ${T} tokens`);
    const pr = new Float64Array(T * E);
    for (let t = 0; t < T; t++) {
      if (mask && !mask[t]) continue;
      rows++;
      softmaxRow(z.data, t * E, E, pr, t * E);
      for (let e = 0; e < E; e++) P[e] += pr[t * E + e];
      for (let s = 0; s < k; s++) f[experts[l][t * k + s]] += 1;
    }
    return pr;
  });
  const out = alloc(p, 1);
  let loss = 0;
  if (rows > 0) {
    for (let e = 0; e < E; e++) {
      f[e] /= rows;
      P[e] /= rows;
      loss += f[e] * P[e];
    }
    loss *= E;
  }
  out[0] = loss;
  return record('loadBalancingLoss', out, [1], logits, (g) => {
    if (rows === 0) return;
    // dL/dP_e = E f_e; P_e = mean_t p_te; dp_te/dz_t = p_t (delta - p_t).
    logits.forEach((z, l) => {
      const dz = gradOf(z);
      if (!dz) return;
      const pr = probs[l];
      const T = z.shape[0];
      for (let t = 0; t < T; t++) {
        if (mask && !mask[t]) continue;
        let dot = 0;
        for (let e = 0; e < E; e++) dot += pr[t * E + e] * f[e];
        const c = (g[0] * E) / rows;
        for (let e = 0; e < E; e++) dz[t * E + e] += c * pr[t * E + e] * (f[e] - dot);
      }
    });
  });
}

/**
 * ST-MoE's router z-loss: mean over router rows (tokens of all MoE layers together, as HF's Switch Transformers
 * `router_z_loss_func` over the concatenated logits) of logsumexp(logits)^2. The caller multiplies by its
 * coefficient (1e-3 in ST-MoE). `mask` [T] as in loadBalancingLoss.
 */
export function routerZLoss(logits: readonly Var[], mask: ArrayLike<number> | null = null): Var {
  if (logits.length === 0) throw new Error('routerZLoss: no router logits');
  const p = samePrecision('routerZLoss', ...logits);
  let rows = 0;
  let total = 0;
  const lses = logits.map((z) => {
    const [T, E] = z.shape;
    if (mask && mask.length !== T) throw new Error(`routerZLoss: mask has ${mask.length} entries for ${T} tokens`);
    const lse = new Float64Array(T);
    for (let t = 0; t < T; t++) {
      if (mask && !mask[t]) continue;
      lse[t] = logSumExpRow(z.data, t * E, E);
      total += lse[t] * lse[t];
      rows++;
    }
    return lse;
  });
  const out = alloc(p, 1);
  out[0] = rows > 0 ? total / rows : 0;
  return record('routerZLoss', out, [1], logits, (g) => {
    if (rows === 0) return;
    logits.forEach((z, l) => {
      const dz = gradOf(z);
      if (!dz) return;
      const [T, E] = z.shape;
      for (let t = 0; t < T; t++) {
        if (mask && !mask[t]) continue;
        const c = (g[0] * 2 * lses[l][t]) / rows;
        for (let e = 0; e < E; e++) dz[t * E + e] += c * Math.exp(z.data[t * E + e] - lses[l][t]);
      }
    });
  });
}

/**
 * Squared coefficient of variation of v [n]: population variance / (mean^2 + 1e-10), as tensor2tensor's
 * cv_squared (the reference code of Shazeer et al. 2017) computes it. Applied to importance and load.
 */
export function cvSquared(v: Var): Var {
  const n = v.size;
  const EPS = 1e-10;
  let mean = 0;
  for (let i = 0; i < n; i++) mean += v.data[i];
  mean /= n;
  let varSum = 0;
  for (let i = 0; i < n; i++) varSum += (v.data[i] - mean) ** 2;
  const variance = varSum / n;
  const den = mean * mean + EPS;
  const out = alloc(v.precision, 1);
  out[0] = variance / den;
  return record('cvSquared', out, [1], [v], (g) => {
    const dv = gradOf(v)!;
    // d var / dv_i = 2 (v_i - mean) / n ; d mean^2 / dv_i = 2 mean / n.
    for (let i = 0; i < n; i++) {
      const dVar = (2 * (v.data[i] - mean)) / n;
      const dDen = (2 * mean) / n;
      dv[i] += g[0] * (dVar / den - (variance * dDen) / (den * den));
    }
  });
}
