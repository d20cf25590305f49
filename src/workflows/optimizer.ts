// The training optimiser: AdamW with decoupled weight decay (Loshchilov & Hutter; PyTorch's torch.optim.AdamW),
// global-norm gradient clipping, and the warm-up + cosine learning-rate schedule. Parameters are plain arrays with
// their gradients, so the optimiser does not care which tape produced them.

import { gradKernels } from '../autograd/kernels.js';

export type FloatArray = Float32Array | Float64Array;

export interface OptimParam {
  name: string;
  data: FloatArray;
  grad: FloatArray | null;
  /** Apply weight decay to this parameter (nanoGPT / GPT-2 practice: matrices yes, norms and biases no). */
  decay: boolean;
}

export interface AdamWOptions {
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
}

export const DEFAULT_ADAMW: AdamWOptions = { beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1 };

export class AdamW {
  /** Steps taken (PyTorch's `step` state, for bias correction). */
  t = 0;
  readonly m: FloatArray[];
  readonly v: FloatArray[];

  constructor(
    readonly params: readonly OptimParam[],
    readonly opts: AdamWOptions = DEFAULT_ADAMW,
  ) {
    const names = new Set<string>();
    for (const p of params) {
      if (names.has(p.name)) throw new Error(`AdamW: parameter ${p.name} given twice`);
      names.add(p.name);
    }
    // Moments in the parameter's own precision (f64 for exact comparisons with PyTorch in tests).
    const zeros = (p: OptimParam) => (p.data instanceof Float64Array ? new Float64Array(p.data.length) : new Float32Array(p.data.length));
    this.m = params.map(zeros);
    this.v = params.map(zeros);
  }

  /**
   * One update with learning rate `lr`, exactly torch.optim.AdamW's (non-amsgrad) step:
   * p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).
   * Parameters without a gradient are left as they are (a frozen part of the model).
   */
  step(lr: number): void {
    const { beta1, beta2, eps, weightDecay } = this.opts;
    this.t++;
    const bc1 = 1 - Math.pow(beta1, this.t);
    const bc2 = 1 - Math.pow(beta2, this.t);
    const stepSize = lr / bc1;
    const bc2Sqrt = Math.sqrt(bc2);
    const kernels = gradKernels();
    this.params.forEach((p, i) => {
      if (!p.grad) return;
      if (p.grad.length !== p.data.length) throw new Error(`AdamW: ${p.name} has ${p.grad.length} gradients for ${p.data.length} values`);
      kernels.adamw(p.data, p.grad, this.m[i], this.v[i], { beta1, beta2, stepSize, bc2Sqrt, eps, decay: p.decay ? 1 - lr * weightDecay : 1 });
    });
  }
}

/** Scales all gradients so their global L2 norm is at most maxNorm (torch.nn.utils.clip_grad_norm_); returns the norm before clipping. */
export function clipGradNorm(params: readonly OptimParam[], maxNorm: number): number {
  let sq = 0;
  for (const p of params) if (p.grad) for (let j = 0; j < p.grad.length; j++) sq += p.grad[j] * p.grad[j];
  const norm = Math.sqrt(sq);
  if (!Number.isFinite(norm)) return norm; // the caller stops on a NaN/Inf
  if (norm > maxNorm) {
    const s = maxNorm / (norm + 1e-6);
    for (const p of params) if (p.grad) for (let j = 0; j < p.grad.length; j++) p.grad[j] *= s;
  }
  return norm;
}

export interface ScheduleOptions {
  maxLr: number;
  minLr: number;
  warmupSteps: number;
  totalSteps: number;
}

/** Linear warm-up from 0 to maxLr over warmupSteps, then cosine decay to minLr at totalSteps (nanoGPT's get_lr). */
export function learningRate(step: number, o: ScheduleOptions): number {
  if (step < o.warmupSteps) return (o.maxLr * (step + 1)) / o.warmupSteps;
  if (step >= o.totalSteps) return o.minLr;
  const ratio = (step - o.warmupSteps) / Math.max(1, o.totalSteps - o.warmupSteps);
  return o.minLr + 0.5 * (1 + Math.cos(Math.PI * ratio)) * (o.maxLr - o.minLr);
}
