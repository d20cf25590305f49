// Gradient checking: the tape's gradients against central finite differences in float64, by default the 4-point
// stencil (8(f(x+h) - f(x-h)) - (f(x+2h) - f(x-2h))) / 12h, whose O(h^4) truncation allows a step large enough that
// round-off (|f| * 1e-16 / h) stays far below the 1e-6 relative errors the checks demand.
// Used by the tests for every op, router and loss, and available to check a native backend's backward kernels.

import { noGrad, type Var } from './tape.js';
import type { Rng } from '../util/rng.js';

export interface GradcheckOptions {
  /** Finite-difference step (default 1e-3 with the 4-point stencil, 1e-5 with the 2-point one). */
  eps?: number;
  /** 4 (default) or 2 evaluation points per element. */
  points?: 2 | 4;
  /** Check at most this many elements of each input (chosen with rng; default all). */
  maxPerInput?: number;
  rng?: Rng;
  /** Errors are relative to max(|analytic|, |numeric|, floor) (default floor 1e-4, so near-zero gradients compare absolutely). */
  floor?: number;
  /**
   * The discrete decisions of the function (e.g. the routers' chosen experts) as a string: every perturbed
   * evaluation must give the same string as the unperturbed one, or the finite difference would straddle a jump.
   */
  signature?: () => string;
}

export interface GradcheckReport {
  /** Largest |analytic - numeric| / max(|analytic|, |numeric|, floor). */
  maxRelError: number;
  maxAbsError: number;
  /** Where the largest relative error is. */
  worst: { input: number; index: number; analytic: number; numeric: number };
  /** Elements checked (each took `points` evaluations). */
  checked: number;
  /** Evaluations whose signature differed from the unperturbed one (must be 0 for the check to mean anything). */
  signatureChanges: number;
  /** The unperturbed signature, when one was given. */
  signature: string | null;
}

/**
 * Checks d f / d inputs. f builds a scalar from the inputs (it is re-run for every perturbation, so any randomness
 * in it must be re-seeded inside). The inputs' .grad are overwritten.
 */
export function gradcheck(f: () => Var, inputs: readonly Var[], opts: GradcheckOptions = {}): GradcheckReport {
  const points = opts.points ?? 4;
  const eps = opts.eps ?? (points === 4 ? 1e-3 : 1e-5);
  const floor = opts.floor ?? 1e-4;
  for (const v of inputs) {
    if (v.precision !== 'f64') throw new Error('gradcheck: inputs must be float64 for finite differences to mean anything');
    v.requiresGrad = true;
    v.grad = null;
  }
  const base = f();
  if (base.size !== 1) throw new Error(`gradcheck: f must return a scalar, got [${base.shape.join(', ')}]`);
  const sig0 = opts.signature ? opts.signature() : null;
  base.backward();
  const analytic = inputs.map((v) => (v.grad ? Float64Array.from(v.grad) : new Float64Array(v.size)));

  const report: GradcheckReport = {
    maxRelError: 0,
    maxAbsError: 0,
    worst: { input: -1, index: -1, analytic: 0, numeric: 0 },
    checked: 0,
    signatureChanges: 0,
    signature: sig0,
  };
  const evalAt = (): number =>
    noGrad(() => {
      const y = f().item();
      if (opts.signature && opts.signature() !== sig0) report.signatureChanges++;
      return y;
    });
  inputs.forEach((v, which) => {
    const idx = pickIndices(v.size, opts.maxPerInput, opts.rng);
    for (const i of idx) {
      const x0 = v.data[i];
      const at = (h: number): number => {
        v.data[i] = x0 + h;
        const y = evalAt();
        v.data[i] = x0;
        return y;
      };
      const d1 = at(eps) - at(-eps);
      const numeric = points === 4 ? (8 * d1 - (at(2 * eps) - at(-2 * eps))) / (12 * eps) : d1 / (2 * eps);
      const a = analytic[which][i];
      const abs = Math.abs(a - numeric);
      const rel = abs / Math.max(Math.abs(a), Math.abs(numeric), floor);
      report.checked++;
      if (abs > report.maxAbsError) report.maxAbsError = abs;
      if (!(rel <= report.maxRelError)) {
        report.maxRelError = rel;
        report.worst = { input: which, index: i, analytic: a, numeric };
      }
    }
  });
  return report;
}

function pickIndices(n: number, max: number | undefined, rng: Rng | undefined): number[] {
  const all = Array.from({ length: n }, (_, i) => i);
  if (max === undefined || max >= n) return all;
  if (!rng) throw new Error('gradcheck: maxPerInput needs an rng');
  // Partial Fisher-Yates: a reproducible sample without repeats.
  for (let i = 0; i < max; i++) {
    const j = i + rng.int(n - i);
    [all[i], all[j]] = [all[j], all[i]];
  }
  return all.slice(0, max).sort((a, b) => a - b);
}
