// Data types a tensor can hold, in GGML's numbering (the numbers are GGUF's on-disk type ids).
// Block types store `blockSize` elements in `typeSize` bytes; plain types have blockSize 1.

export type DType =
  | 'f32' | 'f16' | 'bf16'
  | 'q4_0' | 'q4_1' | 'q5_0' | 'q5_1' | 'q8_0' | 'q8_1'
  | 'q2_k' | 'q3_k' | 'q4_k' | 'q5_k' | 'q6_k' | 'q8_k';

export interface DTypeInfo {
  readonly name: DType;
  readonly ggmlType: number;
  readonly blockSize: number; // elements per block
  readonly typeSize: number; // bytes per block
}

const table: DTypeInfo[] = [
  { name: 'f32', ggmlType: 0, blockSize: 1, typeSize: 4 },
  { name: 'f16', ggmlType: 1, blockSize: 1, typeSize: 2 },
  { name: 'q4_0', ggmlType: 2, blockSize: 32, typeSize: 18 },
  { name: 'q4_1', ggmlType: 3, blockSize: 32, typeSize: 20 },
  { name: 'q5_0', ggmlType: 6, blockSize: 32, typeSize: 22 },
  { name: 'q5_1', ggmlType: 7, blockSize: 32, typeSize: 24 },
  { name: 'q8_0', ggmlType: 8, blockSize: 32, typeSize: 34 },
  { name: 'q8_1', ggmlType: 9, blockSize: 32, typeSize: 36 },
  { name: 'q2_k', ggmlType: 10, blockSize: 256, typeSize: 84 },
  { name: 'q3_k', ggmlType: 11, blockSize: 256, typeSize: 110 },
  { name: 'q4_k', ggmlType: 12, blockSize: 256, typeSize: 144 },
  { name: 'q5_k', ggmlType: 13, blockSize: 256, typeSize: 176 },
  { name: 'q6_k', ggmlType: 14, blockSize: 256, typeSize: 210 },
  { name: 'q8_k', ggmlType: 15, blockSize: 256, typeSize: 292 },
  { name: 'bf16', ggmlType: 30, blockSize: 1, typeSize: 2 },
];

const byName = new Map<DType, DTypeInfo>(table.map((t) => [t.name, t]));
const byGgml = new Map<number, DTypeInfo>(table.map((t) => [t.ggmlType, t]));

export function dtypeInfo(d: DType): DTypeInfo {
  const info = byName.get(d);
  if (!info) throw new Error(`unknown dtype '${d}'`);
  return info;
}

/** The dtype for a GGUF/GGML type id, or undefined when moe-ts does not know that type. */
export function dtypeFromGgml(type: number): DTypeInfo | undefined {
  return byGgml.get(type);
}

export function isDType(s: string): s is DType {
  return byName.has(s as DType);
}

export function isQuantized(d: DType): boolean {
  return dtypeInfo(d).blockSize > 1;
}

/**
 * Bytes needed for `numel` elements of dtype `d` laid out in rows of `rowLength` elements.
 * Throws when the row length is not a whole number of blocks.
 */
export function byteSize(d: DType, numel: number, rowLength: number): number {
  const { blockSize, typeSize } = dtypeInfo(d);
  if (rowLength % blockSize !== 0) {
    throw new Error(`row length ${rowLength} is not a multiple of the ${d} block size ${blockSize}`);
  }
  return (numel / blockSize) * typeSize;
}
