// Shared by the GGUF tests: a seeded PRNG, random tensors, a metadata set with every value type, and a raw byte
// builder for hand-crafted (hostile) files that does not use the writer under test.
import type { GGUFValue } from '../src/formats/gguf.js';
import { tensorByteSize, type Tensor } from '../src/tensor/tensor.js';
import type { DType } from '../src/tensor/dtype.js';

/** Seeded PRNG (mulberry32) for test data. */
export function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function randomTensor(r: () => number, dtype: DType, shape: number[]): Tensor {
  const data = new Uint8Array(tensorByteSize(dtype, shape));
  for (let i = 0; i < data.length; i++) data[i] = Math.floor(r() * 256);
  return { dtype, shape, data };
}

export const ALL_VALUES: [string, GGUFValue][] = [
  ['general.architecture', { type: 'string', value: 'llama' }],
  ['t.uint8', { type: 'uint8', value: 255 }],
  ['t.int8', { type: 'int8', value: -128 }],
  ['t.uint16', { type: 'uint16', value: 65535 }],
  ['t.int16', { type: 'int16', value: -32768 }],
  ['t.uint32', { type: 'uint32', value: 4294967295 }],
  ['t.int32', { type: 'int32', value: -2147483648 }],
  ['t.float32', { type: 'float32', value: Math.fround(-1.5e-7) }],
  ['t.float32.nan', { type: 'float32', value: NaN }],
  ['t.float32.inf', { type: 'float32', value: -Infinity }],
  ['t.bool', { type: 'bool', value: false }],
  ['t.string', { type: 'string', value: 'h\u00e9llo \u2581 \u4e16\u754c \u{1f642}' }],
  ['t.string.bom', { type: 'string', value: '\ufeffkept' }],
  ['t.string.empty', { type: 'string', value: '' }],
  ['t.uint64', { type: 'uint64', value: 2n ** 64n - 1n }],
  ['t.int64', { type: 'int64', value: -(2n ** 63n) }],
  ['t.float64', { type: 'float64', value: 1 / 3 }],
  ['a.uint8', { type: 'array', value: { itemType: 'uint8', items: Uint8Array.of(0, 1, 255) } }],
  ['a.int8', { type: 'array', value: { itemType: 'int8', items: Int8Array.of(-128, 127) } }],
  ['a.uint16', { type: 'array', value: { itemType: 'uint16', items: Uint16Array.of(65535, 7) } }],
  ['a.int16', { type: 'array', value: { itemType: 'int16', items: Int16Array.of(-32768, 9) } }],
  ['a.uint32', { type: 'array', value: { itemType: 'uint32', items: Uint32Array.of(4294967295, 0) } }],
  ['a.int32', { type: 'array', value: { itemType: 'int32', items: Int32Array.of(-5, 2147483647) } }],
  ['a.float32', { type: 'array', value: { itemType: 'float32', items: Float32Array.of(0.1, -0, Infinity, NaN) } }],
  ['a.float64', { type: 'array', value: { itemType: 'float64', items: Float64Array.of(0.1, -1e300) } }],
  ['a.uint64', { type: 'array', value: { itemType: 'uint64', items: BigUint64Array.of(0n, 2n ** 64n - 1n) } }],
  ['a.int64', { type: 'array', value: { itemType: 'int64', items: BigInt64Array.of(-(2n ** 63n), 2n ** 63n - 1n) } }],
  ['a.bool', { type: 'array', value: { itemType: 'bool', items: [true, false, true] } }],
  ['a.string', { type: 'array', value: { itemType: 'string', items: ['', 'a', '\u0000x', '\u2581the'] } }],
  ['a.empty', { type: 'array', value: { itemType: 'float32', items: new Float32Array(0) } }],
  ['a.nested', {
    type: 'array',
    value: {
      itemType: 'array',
      items: [
        { itemType: 'string', items: ['x', 'yz'] },
        { itemType: 'int16', items: Int16Array.of(-3, 4) },
        { itemType: 'array', items: [{ itemType: 'bool', items: [true] }, { itemType: 'uint64', items: BigUint64Array.of(5n) }] },
        { itemType: 'array', items: [] },
      ],
    },
  }],
];


/** Little-endian bytes built by hand, so hostile files can say anything (independent of GGUFWriter). */
export class Raw {
  private readonly parts: number[] = [];
  get length(): number {
    return this.parts.length;
  }
  u8(...xs: number[]): this {
    for (const x of xs) this.parts.push(x & 0xff);
    return this;
  }
  u32(x: number): this {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, x >>> 0, true);
    return this.u8(...b);
  }
  i32(x: number): this {
    return this.u32(x | 0);
  }
  u64(x: bigint | number): this {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt.asUintN(64, BigInt(x)), true);
    return this.u8(...b);
  }
  f32(x: number): this {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setFloat32(0, x, true);
    return this.u8(...b);
  }
  /** A GGUF string: u64 length + UTF-8 bytes (or raw bytes). */
  str(s: string | Uint8Array, claimedLength?: bigint | number): this {
    const b = typeof s === 'string' ? new TextEncoder().encode(s) : s;
    this.u64(claimedLength ?? b.byteLength);
    return this.u8(...b);
  }
  /** "GGUF", version, n_tensors, n_kv. */
  header(nTensors: bigint | number, nKv: bigint | number, version = 3): this {
    return this.u8(0x47, 0x47, 0x55, 0x46).u32(version).u64(nTensors).u64(nKv);
  }
  /** A metadata entry of a scalar GGUF type id (4 = uint32, 8 = string ...). */
  kvU32(key: string, value: number): this {
    return this.str(key).u32(4).u32(value);
  }
  kvStr(key: string, value: string): this {
    return this.str(key).u32(8).str(value);
  }
  /** A tensor info: ne innermost first, ggml type id, offset. */
  tensor(name: string, ne: (bigint | number)[], type: number, offset: bigint | number): this {
    this.str(name).u32(ne.length);
    for (const n of ne) this.u64(n);
    return this.i32(type).u64(offset);
  }
  padTo(alignment: number): this {
    while (this.parts.length % alignment !== 0) this.parts.push(0);
    return this;
  }
  zeros(n: number): this {
    for (let i = 0; i < n; i++) this.parts.push(0);
    return this;
  }
  bytes(): Uint8Array {
    return Uint8Array.from(this.parts);
  }
}
