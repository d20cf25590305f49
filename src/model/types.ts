import type { MixtralConfig } from './config.js';

/** What the generation workflow needs of a tokenizer. Implemented by src/tokenizer/sentencepiece.ts. */
export interface Tokenizer {
  readonly vocabSize: number;
  readonly bosId: number;
  readonly eosId: number;
  readonly unkId: number;
  /** SentencePiece encoding; addBos prepends BOS. Control-token text such as "<s>" is plain text unless parseSpecial. */
  encode(text: string, opts?: { addBos?: boolean; parseSpecial?: boolean }): number[];
  /** Decodes ids to text; control tokens (BOS/EOS) decode to "" unless keepSpecial. */
  decode(ids: readonly number[], opts?: { keepSpecial?: boolean }): string;
  /** The piece string of one id as stored in the vocabulary (e.g. "▁the", "<0x0A>", "<s>"). */
  piece(id: number): string;
  /** Whether an id is a control token (BOS, EOS, UNK, ...). */
  isControl(id: number): boolean;
}

/** What the router did for one token: per layer, the chosen experts and their renormalised weights. */
export interface RouterTrace {
  experts: number[][]; // [layer][k]
  weights: number[][]; // [layer][k]
}

/** One running sequence with its KV cache. */
export interface InferenceSession {
  /** Number of tokens already in the KV cache. */
  readonly position: number;
  readonly contextLength: number;
  /**
   * Runs `tokens` through the model after what is cached. Returns logits: when allLogits, one row of vocabSize
   * floats per input token (row i predicts the token after tokens[i]); otherwise only the last row.
   * Throws ContextOverflowError when position + tokens.length exceeds the context.
   */
  forward(tokens: readonly number[], opts?: { allLogits?: boolean; trace?: RouterTrace[] }): Float32Array;
  /** Drops cached tokens from `position` on (0 empties the cache). */
  truncate(position: number): void;
}

export interface LanguageModel {
  readonly config: MixtralConfig;
  readonly tokenizer: Tokenizer;
  /** The file's own chat template (tokenizer.chat_template / tokenizer_config.json), when it has one. */
  readonly chatTemplate?: string;
  /** kvF16: keep the KV cache in f16 (half the memory; llama.cpp's default cache type) instead of f32. */
  newSession(opts?: { contextLength?: number; kvF16?: boolean }): InferenceSession;
}

export class ContextOverflowError extends Error {
  constructor(
    readonly needed: number,
    readonly contextLength: number,
  ) {
    super(`the prompt and generation need ${needed} tokens but the context holds ${contextLength}`);
    this.name = 'ContextOverflowError';
  }
}
