// The reverse-mode tape: a Var is a dense row-major array plus, when it came from an op that needs gradients, the
// op's backward step and its inputs. backward() walks those links in reverse topological order, accumulates
// gradients into every Var that requires one, and frees the graph behind it (micrograd / PyTorch style, arrays
// instead of scalars).
//
// Element type is a per-Var parameter: Float32Array for training, Float64Array for gradient checks (so finite
// differences are tight). Ops produce results of their inputs' precision and refuse to mix the two.

export type Float = Float32Array | Float64Array;
export type Precision = 'f32' | 'f64';

export function alloc(p: Precision, n: number): Float {
  return p === 'f64' ? new Float64Array(n) : new Float32Array(n);
}

export function precisionOf(a: Float): Precision {
  return a instanceof Float64Array ? 'f64' : 'f32';
}

export function numelOf(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) {
    if (!(Number.isInteger(d) && d >= 0)) throw new Error(`bad dimension ${d} in shape [${shape.join(', ')}]`);
    n *= d;
  }
  return n;
}

// ---------------------------------------------------------------------------------------------------------------
// Grad mode

let gradEnabled = true;

/** Whether ops currently record backward steps. */
export function isGradEnabled(): boolean {
  return gradEnabled;
}

/** Runs fn without recording anything (evaluation, finite differences, optimizer updates). */
export function noGrad<T>(fn: () => T): T {
  const prev = gradEnabled;
  gradEnabled = false;
  try {
    return fn();
  } finally {
    gradEnabled = prev;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Var

interface GradNode {
  readonly op: string;
  readonly inputs: readonly Var[];
  /** Adds this op's contribution to its inputs' gradients, given the gradient of its output. */
  readonly backward: (gradOut: Float) => void;
}

export class Var {
  /** Gradient, same length and precision as data; allocated on first accumulation. */
  grad: Float | null = null;
  /** Keep this (non-leaf) Var's gradient after backward (leaves always keep theirs). */
  retainGrad = false;
  /** @internal the op that produced this Var; null for leaves, for results made without grad, and once freed. */
  node: GradNode | null = null;
  /** @internal true for op results that recorded a node (so a second backward through a freed graph is caught). */
  recorded = false;

  constructor(
    readonly data: Float,
    readonly shape: readonly number[],
    public requiresGrad = false,
    public name = '',
  ) {
    const n = numelOf(shape);
    if (data.length !== n) throw new Error(`Var${name ? ` ${name}` : ''}: ${data.length} values for shape [${shape.join(', ')}]`);
  }

  /** A trainable leaf (a parameter). */
  static param(data: Float, shape: readonly number[], name = ''): Var {
    return new Var(data, shape, true, name);
  }

  /** A constant (no gradient). */
  static constant(data: Float, shape: readonly number[], name = ''): Var {
    return new Var(data, shape, false, name);
  }

  static zeros(p: Precision, shape: readonly number[], requiresGrad = false): Var {
    return new Var(alloc(p, numelOf(shape)), shape, requiresGrad);
  }

  get precision(): Precision {
    return precisionOf(this.data);
  }

  get size(): number {
    return this.data.length;
  }

  get isLeaf(): boolean {
    return !this.recorded;
  }

  /** The value of a one-element Var. */
  item(): number {
    if (this.data.length !== 1) throw new Error(`item: Var of shape [${this.shape.join(', ')}] is not a scalar`);
    return this.data[0];
  }

  /** Same data, cut from the graph. */
  detach(): Var {
    return new Var(this.data, this.shape, false, this.name);
  }

  zeroGrad(): void {
    this.grad?.fill(0);
  }

  backward(seed?: Float): void {
    backward(this, seed);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Recording and backward

/** Checks that all inputs share one precision and returns it. */
export function samePrecision(op: string, ...vs: Var[]): Precision {
  const p = vs[0].precision;
  for (const v of vs) if (v.precision !== p) throw new Error(`${op}: inputs mix f32 and f64`);
  return p;
}

/**
 * An op's result. When grad mode is on and some input requires a gradient, the result requires one too and
 * remembers `backward`, which must add (never assign) into the inputs' gradients via gradOf().
 */
export function record(op: string, data: Float, shape: readonly number[], inputs: readonly Var[], backward: (gradOut: Float) => void): Var {
  const needs = gradEnabled && inputs.some((v) => v.requiresGrad);
  const out = new Var(data, shape, needs);
  if (needs) {
    out.node = { op, inputs, backward };
    out.recorded = true;
  }
  return out;
}

/** The gradient buffer of v to accumulate into (allocated zeroed on first use), or null when v needs none. */
export function gradOf(v: Var): Float | null {
  if (!v.requiresGrad) return null;
  if (!v.grad) v.grad = alloc(v.precision, v.size);
  return v.grad;
}

/**
 * Back-propagates from `root` (a scalar, or any Var given a seed gradient of its size). Leaf gradients accumulate
 * across calls (gradient accumulation); the graph is freed as it is walked, so each graph is walked once.
 */
export function backward(root: Var, seed?: Float): void {
  if (!root.requiresGrad) throw new Error('backward: this value does not depend on anything that requires a gradient');
  if (root.recorded && !root.node) throw new Error('backward: this graph was already freed by an earlier backward()');
  if (!seed && root.size !== 1) throw new Error(`backward: a Var of shape [${root.shape.join(', ')}] needs a seed gradient`);
  if (seed && seed.length !== root.size) throw new Error(`backward: seed has ${seed.length} values, the Var ${root.size}`);

  // Reverse topological order of the op results reachable from root (iterative DFS: graphs can be deep).
  const order: Var[] = [];
  const seen = new Set<Var>([root]);
  const stack: { v: Var; i: number }[] = [{ v: root, i: 0 }];
  while (stack.length > 0) {
    const top = stack[stack.length - 1];
    const inputs = top.v.node?.inputs ?? [];
    if (top.i < inputs.length) {
      const u = inputs[top.i++];
      if (u.node && !seen.has(u)) {
        seen.add(u);
        stack.push({ v: u, i: 0 });
      }
    } else {
      stack.pop();
      order.push(top.v);
    }
  }

  const g = gradOf(root)!;
  if (seed) for (let i = 0; i < g.length; i++) g[i] += seed[i];
  else g[0] += 1;

  for (let i = order.length - 1; i >= 0; i--) {
    const v = order[i];
    const node = v.node;
    if (!node) continue; // a leaf root
    if (v.grad) node.backward(v.grad);
    // Free the tape: the closure holds the op's saved arrays; intermediate gradients are not needed any more.
    v.node = null;
    if (!v.retainGrad) v.grad = null;
  }
}
