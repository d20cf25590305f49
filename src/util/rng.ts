// The project's seeded random numbers: xoshiro128** 1.1 with splitmix32 seeding, plus normal and integer draws.
// One generator for sampling, weight initialisation, and training noise, so a seed means the same thing everywhere.

const rotl = (x: number, k: number): number => (x << k) | (x >>> (32 - k));

/** 32-bit finaliser of MurmurHash3 over a Weyl sequence: spreads a seed over the xoshiro state words. */
function splitmix32(state: { s: number }): number {
  state.s = (state.s + 0x9e3779b9) | 0;
  let z = state.s;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
  return (z ^ (z >>> 16)) >>> 0;
}

/**
 * xoshiro128** 1.1 (Blackman & Vigna, https://prng.di.unimi.it/xoshiro128starstar.c): 128-bit state, 32-bit
 * output, only 32-bit integer operations, so it is exact and fast in JS.
 */
export class Rng {
  private s0 = 0;
  private s1 = 0;
  private s2 = 0;
  private s3 = 0;
  private spare: number | null = null;

  /**
   * Seeds from an integer in [0, 2^53): one splitmix32 stream from the low 32 bits gives the four state words; the
   * high bits, when present, are mixed into the third word, so distinct seeds give distinct states.
   */
  constructor(seed: number) {
    checkSeed(seed);
    const lo = { s: seed >>> 0 };
    const st = [splitmix32(lo), splitmix32(lo), splitmix32(lo), splitmix32(lo) | 1];
    const high = Math.floor(seed / 0x100000000);
    if (high !== 0) st[1] ^= splitmix32({ s: high ^ 0x6a09e667 });
    this.setState(st);
  }

  /** A generator with this exact state (for comparing with the reference implementation). */
  static fromState(state: readonly [number, number, number, number]): Rng {
    const r = new Rng(0);
    r.setState(state);
    return r;
  }

  private setState(st: readonly number[]): void {
    [this.s0, this.s1, this.s2, this.s3] = st.map((v) => v | 0);
    // The all-zero state is the generator's one fixed point.
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) this.s0 = 1;
  }

  nextUint32(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5), 7), 9) >>> 0;
    const t = this.s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return result;
  }

  /** Uniform in [0, 1) with 53 random bits. */
  nextFloat(): number {
    const hi = this.nextUint32() >>> 5; // 27 bits
    const lo = this.nextUint32() >>> 6; // 26 bits
    return (hi * 67108864 + lo) / 9007199254740992;
  }

  /** Standard normal (Box-Muller; both values of a pair are used). */
  normal(): number {
    if (this.spare !== null) {
      const s = this.spare;
      this.spare = null;
      return s;
    }
    let u = 0;
    while (u === 0) u = this.nextFloat();
    const v = this.nextFloat();
    const r = Math.sqrt(-2 * Math.log(u));
    this.spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  }

  /** Same as nextFloat: uniform in [0, 1). */
  uniform(): number {
    return this.nextFloat();
  }

  /** Integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.nextFloat() * n);
  }

  /** n normal samples with this mean and standard deviation. */
  fill(n: number, std: number, mean = 0): Float32Array {
    const a = new Float32Array(n);
    for (let i = 0; i < n; i++) a[i] = mean + std * this.normal();
    return a;
  }
}

function checkSeed(seed: number): void {
  if (!Number.isSafeInteger(seed) || seed < 0) throw new RangeError(`seed must be an integer in [0, 2^53), got ${seed}`);
}

