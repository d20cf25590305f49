import { byteSize, type DType } from './dtype.js';

/**
 * A tensor as stored: raw bytes in the file's dtype, shape in row-major order (outermost first, as numpy and
 * Hugging Face write it; GGUF's ne[] is the reverse). A weight matrix of shape [out, in] has `out` rows of `in`
 * elements; quantized blocks run along a row. `data` is a view (often into a memory-mapped or read file), never
 * expanded to f32 unless a caller asks for that explicitly.
 */
export interface Tensor {
  readonly dtype: DType;
  readonly shape: readonly number[];
  readonly data: Uint8Array;
}

export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** Bytes that a tensor of this dtype and shape occupies (rows are the last dimension). */
export function tensorByteSize(dtype: DType, shape: readonly number[]): number {
  const row = shape.length === 0 ? 1 : shape[shape.length - 1];
  return byteSize(dtype, numel(shape), row);
}

export function shapeString(shape: readonly number[]): string {
  return `[${shape.join(', ')}]`;
}

/** A view of the i-th slice along the first dimension (e.g. one expert of a stacked [E, out, in] tensor). */
export function sliceFirst(t: Tensor, i: number): Tensor {
  const inner = t.shape.slice(1);
  const bytes = tensorByteSize(t.dtype, inner);
  return { dtype: t.dtype, shape: inner, data: t.data.subarray(i * bytes, (i + 1) * bytes) };
}

/** A tensor holding a copy of f32 values. */
export function f32Tensor(values: Float32Array, shape: readonly number[]): Tensor {
  if (values.length !== numel(shape)) throw new Error(`f32Tensor: ${values.length} values for shape ${shapeString(shape)}`);
  const copy = new Float32Array(values);
  return { dtype: 'f32', shape: [...shape], data: new Uint8Array(copy.buffer) };
}
