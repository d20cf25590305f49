// The serving engine: continuous batching over one model. Every step runs ONE forward pass over all active
// sequences (new ones bring their whole prompt, running ones their last token), so tokens of different requests
// share each weight read, and in the MoE blocks each expert's GEMM covers the tokens of every request routed to it.
// Sequences join and leave the batch between steps. It knows nothing of HTTP; server/worker.ts runs it off the
// HTTP event loop.

import { forwardBatch, type BatchItem, type MixtralSession } from '../model/mixtral.js';
import type { LoadedModel } from '../model/load.js';
import type { RouterTrace } from '../model/types.js';
import { SequenceDecoder, type FinishReason } from '../workflows/generate.js';
import { Sampler, randomSeed, type SamplerOptions } from '../workflows/sampling.js';

export interface EngineRequest {
  id: string;
  promptIds: number[];
  maxTokens: number;
  stop: string[];
  sampling: SamplerOptions;
  /** Return the router's choices with each token. */
  trace: boolean;
}

export type EngineEvent =
  | { type: 'token'; id: string; token: number; text: string; router?: { experts: number[][]; weights: number[][] } }
  | { type: 'done'; id: string; finishReason: FinishReason; promptTokens: number; completionTokens: number; text: string }
  | { type: 'error'; id: string; status: number; code: string; message: string };

export interface EngineOptions {
  /** Most sequences decoding together. */
  parallel: number;
  /** Most requests waiting for a slot; more are refused (HTTP 429). */
  maxQueue: number;
  contextLength: number;
  /** Sessions keep their KV cache in f16 (half the memory) instead of f32. */
  kvF16?: boolean;
}

interface Active {
  req: EngineRequest;
  session: MixtralSession;
  decoder: SequenceDecoder;
  /** Tokens to run at the next step: the prompt at first, then the last sampled token. */
  pending: number[];
  cancelled: boolean;
}

export class Engine {
  private readonly queue: EngineRequest[] = [];
  private readonly active: Active[] = [];
  private running = false;
  /** load[layer][expert]: token-slots routed there since start. */
  readonly load: number[][];
  tokensProcessed = 0;
  steps = 0;

  constructor(
    readonly model: LoadedModel,
    readonly opts: EngineOptions,
    private readonly emit: (e: EngineEvent) => void,
  ) {
    const c = model.config;
    this.load = Array.from({ length: c.numHiddenLayers }, () => new Array<number>(c.numLocalExperts).fill(0));
  }

  get queued(): number {
    return this.queue.length;
  }

  get busy(): number {
    return this.active.length;
  }

  /** Queues a request; emits an error event at once when it cannot be served. */
  submit(req: EngineRequest): void {
    const ctx = this.opts.contextLength;
    if (req.promptIds.length === 0) return this.emit({ type: 'error', id: req.id, status: 400, code: 'invalid_prompt', message: 'the prompt is empty' });
    if (req.promptIds.length >= ctx) {
      return this.emit({
        type: 'error', id: req.id, status: 400, code: 'context_length_exceeded',
        message: `This model's maximum context length is ${ctx} tokens; the prompt has ${req.promptIds.length} tokens and leaves no room to generate.`,
      });
    }
    if (this.queue.length >= this.opts.maxQueue) {
      return this.emit({ type: 'error', id: req.id, status: 429, code: 'rate_limit_exceeded', message: `the server is busy: ${this.queue.length} requests are already waiting; retry later` });
    }
    this.queue.push(req);
    this.kick();
  }

  /** Cancels a queued or running request (a client that went away); no further events are sent for it. */
  cancel(id: string): void {
    const q = this.queue.findIndex((r) => r.id === id);
    if (q >= 0) {
      this.queue.splice(q, 1);
      return;
    }
    const a = this.active.find((x) => x.req.id === id);
    if (a) a.cancelled = true;
  }

  private kick(): void {
    if (this.running) return;
    this.running = true;
    setImmediate(() => this.loop());
  }

  private loop(): void {
    try {
      this.step();
    } catch (e) {
      // A failure inside the forward pass fails the requests of this batch, not the server.
      for (const a of this.active.splice(0)) {
        this.emit({ type: 'error', id: a.req.id, status: 500, code: 'server_error', message: `inference failed: ${(e as Error).message}` });
      }
    }
    if (this.active.length > 0 || this.queue.length > 0) setImmediate(() => this.loop());
    else this.running = false;
  }

  /** One batched forward pass over every active sequence, then one sampled token each. */
  step(): void {
    // Drop cancelled sequences, admit queued ones into free slots.
    for (let i = this.active.length - 1; i >= 0; i--) if (this.active[i].cancelled) this.active.splice(i, 1);
    while (this.active.length < this.opts.parallel && this.queue.length > 0) {
      const req = this.queue.shift()!;
      const sampler = new Sampler({ ...req.sampling, seed: req.sampling.seed ?? randomSeed() });
      const session = this.model.newSession({ contextLength: this.opts.contextLength, kvF16: this.opts.kvF16 ?? false });
      const decoder = new SequenceDecoder(this.model.tokenizer, req.promptIds, sampler, {
        maxTokens: req.maxTokens,
        stops: req.stop,
        ignoreEos: false,
        contextLength: this.opts.contextLength,
      });
      this.active.push({ req, session, decoder, pending: req.promptIds.slice(), cancelled: false });
    }
    if (this.active.length === 0) return;

    const traces: RouterTrace[][] = this.active.map(() => []);
    const items: BatchItem[] = this.active.map((a, i) => ({ session: a.session, tokens: a.pending, trace: traces[i] }));
    const logits = forwardBatch(this.model.model, items);
    this.steps++;

    for (let i = 0; i < this.active.length; i++) {
      const a = this.active[i];
      this.tokensProcessed += a.pending.length;
      for (const t of traces[i]) t.experts.forEach((ex, l) => ex.forEach((e) => this.load[l][e]++));
      const ev = a.decoder.step(logits[i], a.session.position);
      const last = traces[i][traces[i].length - 1];
      this.emit({ type: 'token', id: a.req.id, token: ev.token, text: ev.text, ...(a.req.trace ? { router: last } : {}) });
      a.pending = [ev.token];
    }
    for (let i = this.active.length - 1; i >= 0; i--) {
      const a = this.active[i];
      if (!a.decoder.done) continue;
      this.active.splice(i, 1);
      const r = a.decoder.result();
      this.emit({ type: 'done', id: a.req.id, finishReason: r.finishReason, promptTokens: r.promptTokens, completionTokens: r.tokens.length, text: r.text });
    }
  }
}
