/**
 * A tiny stand-in LanguageModel for testing the generation workflow without a real model: a SentencePiece-like
 * tokenizer (Mistral's id layout: 0 <unk>, 1 <s>, 2 </s>, 3..258 byte-fallback <0x00>..<0xFF>, then pieces) and
 * a session whose logits are a caller-given function of the tokens seen so far.
 */
import type { MixtralConfig } from '../../src/model/config.js';
import { ContextOverflowError, type InferenceSession, type LanguageModel, type Tokenizer } from '../../src/model/types.js';

const BYTE_BASE = 3;

export class FakeTokenizer implements Tokenizer {
  readonly bosId = 1;
  readonly eosId = 2;
  readonly unkId = 0;
  readonly pieces: string[];
  private readonly byPiece = new Map<string, number>();
  private readonly longestFirst: string[];

  constructor(extraPieces: readonly string[]) {
    this.pieces = ['<unk>', '<s>', '</s>'];
    for (let b = 0; b < 256; b++) this.pieces.push(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`);
    this.pieces.push(...extraPieces);
    this.pieces.forEach((p, i) => {
      if (i >= BYTE_BASE + 256) this.byPiece.set(p, i);
    });
    this.longestFirst = [...this.byPiece.keys()].sort((a, b) => b.length - a.length);
  }

  get vocabSize(): number {
    return this.pieces.length;
  }

  id(piece: string): number {
    const i = this.byPiece.get(piece);
    if (i === undefined) throw new Error(`no piece ${piece}`);
    return i;
  }

  byte(b: number): number {
    return BYTE_BASE + b;
  }

  piece(id: number): string {
    return this.pieces[id]!;
  }

  isControl(id: number): boolean {
    return id < BYTE_BASE;
  }

  /** Greedy longest match; characters without a piece fall back to their UTF-8 bytes. */
  encode(text: string, opts: { addBos?: boolean; parseSpecial?: boolean } = {}): number[] {
    const ids: number[] = opts.addBos ? [this.bosId] : [];
    const parts = opts.parseSpecial ? text.split(/(<s>|<\/s>)/) : [text];
    parts.forEach((part, k) => {
      if (opts.parseSpecial && k % 2 === 1) {
        ids.push(part === '<s>' ? this.bosId : this.eosId);
        return;
      }
      let s = part.replaceAll(' ', '\u2581');
      if (k === 0 && s.length > 0) s = '\u2581' + s; // SentencePiece's dummy prefix
      while (s.length > 0) {
        const p = this.longestFirst.find((q) => s.startsWith(q));
        if (p !== undefined) {
          ids.push(this.byPiece.get(p)!);
          s = s.slice(p.length);
        } else {
          const ch = String.fromCodePoint(s.codePointAt(0)!);
          for (const b of Buffer.from(ch, 'utf8')) ids.push(this.byte(b));
          s = s.slice(ch.length);
        }
      }
    });
    return ids;
  }

  /** SentencePiece-style: bytes joined, "▁" -> " ", the first text piece's leading space dropped, bad UTF-8 -> U+FFFD. */
  decode(ids: readonly number[], opts: { keepSpecial?: boolean } = {}): string {
    const bytes: number[] = [];
    let first = true;
    for (const id of ids) {
      if (id < BYTE_BASE) {
        if (opts.keepSpecial) bytes.push(...Buffer.from(this.pieces[id]!, 'utf8'));
        continue;
      }
      if (id < BYTE_BASE + 256) {
        bytes.push(id - BYTE_BASE);
        first = false;
        continue;
      }
      let s = this.pieces[id]!.replaceAll('\u2581', ' ');
      if (first && s.startsWith(' ')) s = s.slice(1);
      first = false;
      bytes.push(...Buffer.from(s, 'utf8'));
    }
    return new TextDecoder('utf-8').decode(new Uint8Array(bytes));
  }
}

/** Logits for the next token given every token the session has seen. */
export type NextLogits = (seen: readonly number[]) => Float32Array;

export class FakeSession implements InferenceSession {
  readonly seen: number[] = [];
  /** Every forward call's input, in order. */
  readonly calls: number[][] = [];

  constructor(
    readonly contextLength: number,
    private readonly next: NextLogits,
  ) {}

  get position(): number {
    return this.seen.length;
  }

  forward(tokens: readonly number[]): Float32Array {
    const needed = this.seen.length + tokens.length;
    if (needed > this.contextLength) throw new ContextOverflowError(needed, this.contextLength);
    this.calls.push([...tokens]);
    this.seen.push(...tokens);
    return this.next(this.seen);
  }

  truncate(position: number): void {
    this.seen.length = Math.min(this.seen.length, position);
  }
}

export class FakeModel implements LanguageModel {
  readonly config: MixtralConfig;
  readonly sessions: FakeSession[] = [];

  constructor(
    readonly tokenizer: Tokenizer,
    private readonly next: NextLogits,
    contextLength = 64,
    readonly chatTemplate?: string,
  ) {
    this.config = {
      vocabSize: tokenizer.vocabSize,
      hiddenSize: 8,
      intermediateSize: 16,
      numHiddenLayers: 1,
      numAttentionHeads: 2,
      numKeyValueHeads: 1,
      headDim: 4,
      numLocalExperts: 4,
      numExpertsPerTok: 2,
      rmsNormEps: 1e-5,
      ropeTheta: 1e6,
      maxPositionEmbeddings: contextLength,
      slidingWindow: null,
      tieWordEmbeddings: false,
    };
  }

  newSession(opts: { contextLength?: number } = {}): FakeSession {
    const s = new FakeSession(opts.contextLength ?? this.config.maxPositionEmbeddings, this.next);
    this.sessions.push(s);
    return s;
  }
}

/** Logits that make `id` overwhelmingly likely (greedy picks it; sampling nearly always does). */
export function oneHot(vocab: number, id: number): Float32Array {
  const l = new Float32Array(vocab);
  l[id] = 30;
  return l;
}

/** A model that, after the prompt, emits `script` in order (then EOS forever): logits depend on how much was generated. */
export function scriptedModel(tok: Tokenizer, promptLength: number, script: readonly number[], contextLength = 64): FakeModel {
  return new FakeModel(tok, (seen) => oneHot(tok.vocabSize, script[seen.length - promptLength] ?? tok.eosId), contextLength);
}
