// Child-process side of the llama.cpp oracle (test/helpers/llamacpp.ts). It runs node-llama-cpp's prebuilt CPU
// binary on one request and exits. Running it in its own process means a GGML_ASSERT/abort on a bad GGUF, or a
// native handle left open, costs one failed call instead of the whole test file.
//
// Protocol: argv[2] is a directory holding request.json; the worker writes result.json (and, for logprobs,
// result.f32: positions x vocab little-endian float32) or error.json {kind, message}, then exits.
import * as fs from 'node:fs';
import * as path from 'node:path';

export interface WorkerRequestBase { gguf: string; threads: number }
export type WorkerRequest =
  | (WorkerRequestBase & { op: 'logprobs'; sequences: number[][]; kvF16: boolean })
  | (WorkerRequestBase & { op: 'generate'; tokens: number[]; n: number; kvF16: boolean })
  | (WorkerRequestBase & { op: 'tokenize'; texts: string[]; addBos: boolean; special: boolean });

export interface WorkerError { kind: 'unavailable' | 'error'; message: string }

/** Thrown when node-llama-cpp itself (not the model) cannot be loaded. */
class Unavailable extends Error {}

type NLC = typeof import('node-llama-cpp');
// node-llama-cpp brands token ids; ours are plain numbers checked by the parent.
type Token = import('node-llama-cpp').Token;
const asTokens = (ids: number[]): Token[] => ids as unknown as Token[];

async function loadLlama(threads: number): Promise<{ nlc: NLC; llama: import('node-llama-cpp').Llama }> {
  try {
    const nlc: NLC = await import('node-llama-cpp');
    const llama = await nlc.getLlama({
      gpu: false,
      // Use the prebuilt binary from @node-llama-cpp/linux-x64 (or the platform's package); never download or build.
      build: 'never',
      usePrebuiltBinaries: true,
      skipDownload: true,
      progressLogs: false,
      maxThreads: threads,
      logLevel: nlc.LlamaLogLevel.warn,
      // stdout stays clean; llama.cpp's own warnings go to stderr, which the parent shows on failure.
      logger: (level, message) => { process.stderr.write(`[llama.cpp ${level}] ${message}\n`); },
    });
    return { nlc, llama };
  } catch (e) {
    throw new Unavailable(`node-llama-cpp could not load its prebuilt CPU binary: ${(e as Error).message ?? e}`);
  }
}

async function run(dir: string, req: WorkerRequest): Promise<void> {
  const { llama } = await loadLlama(req.threads);
  const disposers: Array<() => Promise<void> | void> = [() => llama.dispose()];
  try {
    if (req.op === 'tokenize') {
      const model = await llama.loadModel({ modelPath: req.gguf, gpuLayers: 0, vocabOnly: true });
      disposers.unshift(() => model.dispose());
      const bos = model.tokens.bos;
      if (req.addBos && bos == null) throw new Error(`${req.gguf}: addBos requested but the model has no BOS token`);
      const all = req.texts.map((text) => {
        const ids: number[] = text === '' ? [] : Array.from(model.tokenize(text, req.special));
        if (req.addBos) ids.unshift(bos!);
        return ids;
      });
      fs.writeFileSync(path.join(dir, 'result.json'), JSON.stringify({ tokens: all }));
      return;
    }

    const model = await llama.loadModel({ modelPath: req.gguf, gpuLayers: 0 });
    disposers.unshift(() => model.dispose());
    const kvType = req.kvF16 ? 'F16' : 'F32';
    /** A fresh single-sequence context for `tokens` (+ `extra` generated), the whole prompt in one batch. */
    const openSequence = async (tokens: number[], extra: number) => {
      const need = tokens.length + extra;
      const ctx = await model.createContext({
        contextSize: need,
        // node-llama-cpp sets n_ubatch = n_batch, so the prompt is one ubatch, as the reference logits were made.
        batchSize: tokens.length,
        sequences: 1,
        flashAttention: false,
        threads: { ideal: req.threads, min: req.threads },
        experimentalKvCacheKeyType: kvType,
        experimentalKvCacheValueType: kvType,
      });
      // A smaller context would make node-llama-cpp shift (erase) tokens silently; a smaller batch would split it.
      if (ctx.contextSize < need) throw new Error(`context size ${ctx.contextSize} < ${need} tokens needed`);
      if (ctx.batchSize < tokens.length) throw new Error(`batch size ${ctx.batchSize} < ${tokens.length}`);
      return { ctx, seq: ctx.getSequence() };
    };

    if (req.op === 'logprobs') {
      let nVocab = -1;
      const rows: Float32Array[] = [];
      for (const [s, tokens] of req.sequences.entries()) {
        const { ctx, seq } = await openSequence(tokens, 0);
        try {
          // Temperature 0 (the default) makes the sampler chain greedy-only, so every vocab entry keeps its raw
          // logit and the addon returns softmax(logits) over the full vocabulary, as float32.
          const out = await seq.controlledEvaluate(asTokens(tokens).map((t) => [t, { generateNext: { probabilities: true } }]));
          for (let i = 0; i < tokens.length; i++) {
            const where = `sequence ${s}, position ${i}`;
            const probs = out[i]?.next.probabilities;
            if (probs == null) throw new Error(`${where}: no probabilities returned`);
            if (nVocab < 0) nVocab = probs.size;
            if (probs.size !== nVocab) throw new Error(`${where}: ${probs.size} probabilities, expected ${nVocab}`);
            // llama.cpp normalises with a float32 sum, off by a factor common to the row; renormalising in float64
            // makes the row an exact log-softmax of the float32 probabilities (the factor cancels).
            const row = new Float64Array(nVocab).fill(NaN);
            for (const [tok, p] of probs) {
              if (!(tok >= 0 && tok < nVocab)) throw new Error(`${where}: token id ${tok} out of range`);
              row[tok] = Math.log(p);
            }
            let max = -Infinity;
            for (let v = 0; v < nVocab; v++) {
              if (Number.isNaN(row[v])) throw new Error(`${where}: no probability for token ${v}`);
              if (row[v] > max) max = row[v];
            }
            let sum = 0;
            for (let v = 0; v < nVocab; v++) sum += Math.exp(row[v] - max);
            const lse = max + Math.log(sum);
            rows.push(Float32Array.from(row, (x) => x - lse));
          }
        } finally {
          await ctx.dispose();
        }
      }
      const fd = fs.openSync(path.join(dir, 'result.f32'), 'w');
      try {
        for (const r of rows) fs.writeSync(fd, new Uint8Array(r.buffer, r.byteOffset, r.byteLength));
      } finally {
        fs.closeSync(fd);
      }
      fs.writeFileSync(path.join(dir, 'result.json'), JSON.stringify({ nPos: req.sequences.map((q) => q.length), nVocab }));
      return;
    }

    // Greedy generation: temperature 0 => llama.cpp's greedy sampler (first index of the maximum logit).
    // It does not stop at EOS: exactly n tokens come back.
    const { ctx, seq } = await openSequence(req.tokens, req.n);
    disposers.unshift(() => ctx.dispose());
    const generated: number[] = [];
    const last = req.tokens.length - 1;
    let res = await seq.controlledEvaluate(
      asTokens(req.tokens).map((t, i) => (i === last ? [t, { generateNext: { token: true } }] as const : t)));
    let next = res[last]?.next.token;
    while (generated.length < req.n) {
      if (next == null) throw new Error(`no token generated after ${generated.length} tokens`);
      generated.push(next);
      if (generated.length === req.n) break;
      res = await seq.controlledEvaluate([[next, { generateNext: { token: true } }]]);
      next = res[0]?.next.token;
    }
    fs.writeFileSync(path.join(dir, 'result.json'), JSON.stringify({ tokens: generated }));
  } finally {
    for (const d of disposers) {
      try { await d(); } catch { /* disposing after a failure: the first error is the one to report */ }
    }
  }
}

async function main(): Promise<void> {
  const dir = process.argv[2];
  if (dir == null) {
    // `node --test dist/test/` runs every .js under a test/ folder, this one included: nothing to do then.
    if (process.env.NODE_TEST_CONTEXT != null) process.exit(0);
    process.stderr.write('usage: llamacpp-worker.js <request-dir>\n');
    process.exit(2);
  }
  let code = 0;
  try {
    const req = JSON.parse(fs.readFileSync(path.join(dir, 'request.json'), 'utf8')) as WorkerRequest;
    await run(dir, req);
  } catch (e) {
    const err: WorkerError = {
      kind: e instanceof Unavailable ? 'unavailable' : 'error',
      message: e instanceof Error ? e.message : String(e),
    };
    fs.writeFileSync(path.join(dir, 'error.json'), JSON.stringify(err));
    code = 1;
  }
  // Native handles must not keep the worker alive once the answer is written.
  process.exit(code);
}

await main();
