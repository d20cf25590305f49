/**
 * Text generation: prefill the prompt in one forward call, then decode one token per call, sampling each next
 * token, streaming text that is valid UTF-8 and free of any stop string.
 *
 * Two entry points over one loop:
 * - `generateStream` is an async generator of per-token events (the server: per-token output, cancellation by
 *   AbortSignal or by leaving the loop); its return value is the GenerationResult.
 * - `generate` drives it and calls `onText` with each piece of text (the CLI), returning the GenerationResult.
 */
import { ContextOverflowError, type InferenceSession, type LanguageModel, type Tokenizer } from '../model/types.js';
import { renderChat, type ChatMessage } from './chat-template.js';
import { Sampler, type SamplerOptions } from './sampling.js';

export interface GenerateOptions extends SamplerOptions {
  /** Most tokens to generate (an EOS counts); default: until EOS or the context is full. 0 only prefills (primes a session). */
  maxTokens?: number;
  /** Generation ends where the text contains one of these; the returned text stops just before it. */
  stop?: readonly string[];
  /** Keep generating past EOS (benchmarks). */
  ignoreEos?: boolean;
  /**
   * Run in this session: the prompt is appended after what it already holds. Default: a new session of
   * `contextLength` (or the model's). On return the session holds the prompt and every generated token but the
   * last one (which was only sampled, never run).
   */
  session?: InferenceSession;
  contextLength?: number;
  /** A new session keeps its KV cache in f16 (half the memory, llama.cpp's default) instead of f32. */
  kvF16?: boolean;
  /** Ends generation with finishReason 'abort' (checked before every forward call). */
  signal?: AbortSignal;
  /** Use this sampler (its PRNG state carries on) instead of building one from the sampler options. */
  sampler?: Sampler;
}

export type FinishReason = 'stop' | 'length' | 'eos' | 'abort';

/** One sampled token and the text it released (may be '': held back as part of a character or a possible stop string). */
export interface TokenEvent {
  token: number;
  text: string;
}

export interface GenerationResult {
  /**
   * The generated text: exactly the concatenation of the events' text. It is what the tokens add after the
   * prompt's text, so a first piece "▁Hello" gives " Hello" (chat front-ends may trim it). On abort, text still
   * held back (the possible start of a stop string, an unfinished character) is dropped.
   */
  text: string;
  /** Every sampled token, in order, including a final EOS and the token that completed a stop string. */
  tokens: number[];
  promptTokens: number;
  finishReason: FinishReason;
  /** The stop string that ended generation, when finishReason is 'stop'. */
  stopString?: string;
  /** The sampler's seed (reproduces the run with the same options). */
  seed: number;
  prefillMs: number;
  /** Time in decode forward calls (sampling and text handling excluded, as llama.cpp's eval time). */
  decodeMs: number;
  prefillTokensPerSecond: number;
  decodeTokensPerSecond: number;
}

/**
 * Generates from `promptIds`. Throws ContextOverflowError before any compute when the prompt does not fit the
 * session's context, and RangeError on an empty prompt or an id outside the vocabulary.
 */
export async function* generateStream(model: LanguageModel, promptIds: readonly number[], opts: GenerateOptions = {}): AsyncGenerator<TokenEvent, GenerationResult, void> {
  const tok = model.tokenizer;
  const maxTokens = opts.maxTokens ?? Infinity;
  if (!(maxTokens === Infinity || (Number.isInteger(maxTokens) && maxTokens >= 0))) throw new RangeError(`maxTokens must be an integer >= 0, got ${maxTokens}`);
  if (promptIds.length === 0) throw new RangeError('the prompt is empty: at least one token (usually BOS) is needed to predict from');
  const vocab = model.config.vocabSize;
  for (let i = 0; i < promptIds.length; i++) {
    const id = promptIds[i]!;
    if (!(Number.isInteger(id) && id >= 0 && id < vocab)) throw new RangeError(`prompt token ${i} is ${id}, outside the vocabulary [0, ${vocab})`);
  }
  const stops = (opts.stop ?? []).filter((s) => s.length > 0);
  const sampler = opts.sampler ?? new Sampler(opts);
  const session = opts.session ?? model.newSession({ ...(opts.contextLength !== undefined ? { contextLength: opts.contextLength } : {}), kvF16: opts.kvF16 ?? false });
  const ctx = session.contextLength;
  const needed = session.position + promptIds.length;
  if (needed > ctx) throw new ContextOverflowError(needed, ctx);

  const decoder = new SequenceDecoder(tok, promptIds, sampler, { maxTokens, stops, ignoreEos: opts.ignoreEos ?? false, contextLength: ctx });
  let prefillMs = 0;
  let decodeMs = 0;
  let decodeCalls = 0;

  const result = (): GenerationResult => ({
    ...decoder.result(),
    prefillMs,
    decodeMs,
    prefillTokensPerSecond: rate(promptIds.length, prefillMs),
    decodeTokensPerSecond: rate(decodeCalls, decodeMs),
  });

  if (opts.signal?.aborted) {
    decoder.finish('abort');
    return result();
  }
  let t0 = performance.now();
  let logits = session.forward(promptIds);
  prefillMs = performance.now() - t0;
  // A prompt that fills the context leaves no room to generate.
  if (session.position >= ctx) decoder.finish('length');

  while (!decoder.done) {
    const event = decoder.step(logits, session.position);
    yield event;
    if (decoder.done) break;
    // Let timers and I/O (an abort, a closed connection) run between tokens.
    await new Promise<void>((resolve) => setImmediate(resolve));
    if (opts.signal?.aborted) {
      decoder.finish('abort');
      break;
    }
    t0 = performance.now();
    logits = session.forward([event.token]);
    decodeMs += performance.now() - t0;
    decodeCalls++;
  }
  return result();
}

/**
 * The per-sequence half of generation, apart from the forward pass: samples each next token from the logits it is
 * given, turns tokens into UTF-8-safe text, finds stop strings, and decides when the sequence ends. generateStream
 * drives one with session.forward; the server drives many with one batched forward pass per step.
 */
export class SequenceDecoder {
  readonly tokens: number[] = [];
  finishReason: FinishReason | undefined;
  private readonly history: number[];
  private readonly text: TextStream;
  private readonly stopper: StopMatcher;
  private emitted = '';

  constructor(
    private readonly tok: Tokenizer,
    private readonly promptIds: readonly number[],
    readonly sampler: Sampler,
    private readonly opts: { maxTokens: number; stops: readonly string[]; ignoreEos: boolean; contextLength: number },
  ) {
    this.history = promptIds.slice();
    this.text = new TextStream(tok, promptIds);
    this.stopper = new StopMatcher(opts.stops.filter((s) => s.length > 0));
    if (opts.maxTokens <= 0) this.finishReason = 'length';
  }

  get done(): boolean {
    return this.finishReason !== undefined;
  }

  /**
   * Samples the next token from `logits` (the model's prediction after `position` cached tokens) and returns it
   * with the text it releases. Ends the sequence on EOS, a stop string, maxTokens, or a full context (the prompt and
   * every generated token must fit; the last sampled token is never run, so it needs no room).
   */
  step(logits: Float32Array, position: number): TokenEvent {
    if (this.done) throw new Error('SequenceDecoder.step: the sequence has ended');
    const token = this.sampler.sample(logits, this.history);
    this.tokens.push(token);
    this.history.push(token);
    const isEos = token === this.tok.eosId && !this.opts.ignoreEos;
    const full = position + 1 >= this.opts.contextLength;
    const last = isEos || this.tokens.length >= this.opts.maxTokens || full;
    let piece = isEos ? '' : this.text.push(token);
    if (last) piece += this.text.flush();
    let out = this.stopper.push(piece);
    if (this.stopper.matched !== undefined) this.finishReason = 'stop';
    else if (last) {
      out += this.stopper.flush();
      this.finishReason = isEos ? 'eos' : 'length';
    }
    this.emitted += out;
    return { token, text: out };
  }

  /** Ends the sequence early: 'abort' for a cancelled request, 'length' when no room is left. */
  finish(reason: FinishReason): void {
    this.finishReason ??= reason;
  }

  result(): Pick<GenerationResult, 'text' | 'tokens' | 'promptTokens' | 'finishReason' | 'stopString' | 'seed'> {
    return {
      text: this.emitted,
      tokens: this.tokens,
      promptTokens: this.promptIds.length,
      finishReason: this.finishReason ?? 'length',
      ...(this.stopper.matched !== undefined ? { stopString: this.stopper.matched } : {}),
      seed: this.sampler.seed,
    };
  }
}

/** Runs generateStream to the end, handing each non-empty piece of text to onText. */
export async function generate(
  model: LanguageModel,
  promptIds: readonly number[],
  opts: GenerateOptions = {},
  onText?: (text: string, event: TokenEvent) => void,
): Promise<GenerationResult> {
  const it = generateStream(model, promptIds, opts);
  for (;;) {
    const r = await it.next();
    if (r.done) return r.value;
    if (onText && r.value.text) onText(r.value.text, r.value);
  }
}

/**
 * Renders a chat with the model's own template (else the built-in Mistral v1 format) and tokenizes it with
 * special-token parsing, so the template's "<s>" becomes BOS. BOS is prepended only when the rendered text did
 * not already produce it, so there is exactly one.
 * Note: special-token text inside message contents is parsed too (as llama.cpp and HF do).
 */
export function encodeChatPrompt(model: LanguageModel, messages: readonly ChatMessage[], opts: { addGenerationPrompt?: boolean } = {}): number[] {
  const tok = model.tokenizer;
  const text = renderChat(messages, {
    ...(model.chatTemplate !== undefined ? { template: model.chatTemplate } : {}),
    bosToken: tok.piece(tok.bosId),
    eosToken: tok.piece(tok.eosId),
    addGenerationPrompt: opts.addGenerationPrompt ?? true,
  });
  const ids = tok.encode(text, { addBos: false, parseSpecial: true });
  if (ids[0] !== tok.bosId) ids.unshift(tok.bosId);
  return ids;
}

function rate(count: number, ms: number): number {
  if (count === 0) return 0;
  // A clock tick can be coarser than a fast call; never divide by zero.
  return count / (Math.max(ms, 1e-6) / 1000);
}

/**
 * Incremental detokenisation that only releases complete characters (the approach of HF text-generation-inference):
 * decode a short window of ids twice, without and with the newest ids, and release the difference once it does
 * not end in U+FFFD (an unfinished UTF-8 sequence from byte-fallback tokens). The window starts inside the prompt,
 * so the first generated piece keeps its leading space as it would in decode(prompt + generated).
 */
class TextStream {
  private readonly ids: number[];
  private prefixOffset: number;
  private readOffset: number;

  constructor(
    private readonly tok: Tokenizer,
    prompt: readonly number[],
  ) {
    // A few prompt tokens of context, so the window never starts at the decoder's "first piece" rule.
    const ctxStart = Math.max(0, prompt.length - 4);
    this.ids = prompt.slice(ctxStart);
    this.prefixOffset = 0;
    this.readOffset = this.ids.length;
  }

  /** Adds a token; returns the text it completes (possibly ''). */
  push(token: number): string {
    this.ids.push(token);
    const prefix = this.tok.decode(this.ids.slice(this.prefixOffset, this.readOffset));
    const full = this.tok.decode(this.ids.slice(this.prefixOffset));
    if (full.length > prefix.length && !full.endsWith('\uFFFD')) {
      this.prefixOffset = this.readOffset;
      this.readOffset = this.ids.length;
      return full.slice(prefix.length);
    }
    return '';
  }

  /** Releases whatever is pending, unfinished characters included (as U+FFFD). */
  flush(): string {
    const prefix = this.tok.decode(this.ids.slice(this.prefixOffset, this.readOffset));
    const full = this.tok.decode(this.ids.slice(this.prefixOffset));
    this.prefixOffset = this.readOffset = this.ids.length;
    return full.length > prefix.length ? full.slice(prefix.length) : '';
  }
}

/**
 * Finds stop strings in streamed text. Text that could be the start of a stop string is held back until the
 * next piece settles it, so a stop string split across tokens is never emitted.
 */
class StopMatcher {
  private held = '';
  matched: string | undefined;

  constructor(private readonly stops: readonly string[]) {}

  /** Adds text; returns what is safe to emit. After a match, returns the text before it and sets `matched`. */
  push(piece: string): string {
    if (this.stops.length === 0) return piece;
    const s = this.held + piece;
    let at = -1;
    for (const stop of this.stops) {
      const i = s.indexOf(stop);
      if (i >= 0 && (at < 0 || i < at)) {
        at = i;
        this.matched = stop;
      }
    }
    if (at >= 0) {
      this.held = '';
      return s.slice(0, at);
    }
    const keep = longestStopPrefixSuffix(s, this.stops);
    this.held = s.slice(s.length - keep);
    return s.slice(0, s.length - keep);
  }

  flush(): string {
    const h = this.held;
    this.held = '';
    return h;
  }
}

/** Length of the longest suffix of s that is a proper prefix of some stop string. */
function longestStopPrefixSuffix(s: string, stops: readonly string[]): number {
  let best = 0;
  for (const stop of stops) {
    for (let len = Math.min(stop.length - 1, s.length); len > best; len--) {
      if (s.endsWith(stop.slice(0, len))) {
        best = len;
        break;
      }
    }
  }
  return best;
}
