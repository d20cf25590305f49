import * as readline from 'node:readline';
import { intArg, numArg, parse, required, UsageError } from './args.js';

const parseV = (argv: string[], options: Parameters<typeof parse>[1], positionals = false) => {
  const r = parse(argv, options, positionals);
  return { values: r.values as Values, positionals: r.positionals };
};
import { loadModel, describeModel, type LoadedModel } from '../model/load.js';
import { isBackendName, type BackendName } from '../backend/select.js';
import { generate, encodeChatPrompt, type GenerateOptions } from '../workflows/generate.js';
import type { ChatMessage } from '../workflows/chat-template.js';
import { convertCommand } from '../workflows/convert.js';
import { quantizeCommand } from '../workflows/quantize.js';
import { defaultModelPath } from '../workflows/default-model.js';
import { dataCommand } from '../workflows/corpus.js';
import { instructDataCommand } from '../workflows/instruct.js';
import { DEFAULT_SERVER_OPTIONS, startServer } from '../server/http.js';
import { trainCommand } from '../workflows/train.js';
import { finetuneCommand } from '../workflows/finetune.js';
import { evalCommand } from '../workflows/eval.js';
import { evalTasksCommand } from '../workflows/eval-tasks.js';

type Command = (argv: string[]) => Promise<void>;
type Values = Record<string, string | boolean | undefined>;

const out = (s: string) => process.stdout.write(s);

const samplingOptions = {
  'max-tokens': { type: 'string' },
  temperature: { type: 'string' },
  'top-k': { type: 'string' },
  'top-p': { type: 'string' },
  'min-p': { type: 'string' },
  'repeat-penalty': { type: 'string' },
  seed: { type: 'string' },
  threads: { type: 'string' },
  backend: { type: 'string' },
  ctx: { type: 'string' },
  'kv-cache': { type: 'string' },
} as const;

/** --kv-cache f32|f16 (llama.cpp's --cache-type-k/v; f16 halves the cache's memory): true for f16. */
function kvF16Arg(v: Values): boolean | undefined {
  const t = v['kv-cache'] as string | undefined;
  if (t === undefined) return undefined;
  if (t !== 'f16' && t !== 'f32') throw new UsageError(`--kv-cache must be f32 or f16, got '${t}'`);
  return t === 'f16';
}

function samplingFrom(v: Values, defaultMax: number): GenerateOptions {
  const s = (k: string) => v[k] as string | undefined;
  const o: GenerateOptions = {
    maxTokens: intArg('max-tokens', s('max-tokens'), defaultMax, 1),
    temperature: numArg('temperature', s('temperature'), 0.7, 0),
    topK: intArg('top-k', s('top-k'), 40, 0),
    topP: numArg('top-p', s('top-p'), 0.95, 0, 1),
    minP: numArg('min-p', s('min-p'), 0.05, 0, 1),
    repetitionPenalty: numArg('repeat-penalty', s('repeat-penalty'), 1.0, 0),
  };
  // top-p 0 would keep no token (the sampler refuses it): say so in the flag's terms.
  if (o.topP === 0) throw new UsageError(`--top-p must be a number in (0, 1], got '${s('top-p')}'`);
  if (s('seed') !== undefined) o.seed = intArg('seed', s('seed'), 0, 0);
  if (s('ctx') !== undefined) o.contextLength = intArg('ctx', s('ctx'), 0, 1);
  const kv = kvF16Arg(v);
  if (kv !== undefined) o.kvF16 = kv;
  return o;
}

function backendArg(v: Values): BackendName | undefined {
  const b = v.backend as string | undefined;
  if (b !== undefined && !isBackendName(b)) throw new UsageError(`--backend must be auto, native or ref, got '${b}'`);
  return b;
}

function load(v: Values): LoadedModel {
  const threads = intArg('threads', v.threads as string | undefined, 0, 0);
  const backend = backendArg(v);
  return loadModel(required('model', v.model as string | undefined), { threads, ...(backend ? { backend } : {}) });
}

const inspect: Command = async (argv) => {
  const { values, positionals } = parseV(argv, { json: { type: 'boolean' } }, true);
  if (positionals.length !== 1) throw new UsageError('inspect takes one model path');
  const m = loadModel(positionals[0]);
  const d = describeModel(m);
  out(values.json ? JSON.stringify(d, null, 2) + '\n' : formatDescription(d));
};

function formatDescription(d: ReturnType<typeof describeModel>): string {
  const lines = [
    `model:        ${d.path} (${d.format})`,
    `architecture: ${d.architecture}`,
    `config:       ${Object.entries(d.config).map(([k, v]) => `${k}=${v}`).join(' ')}`,
    `parameters:   ${fmtCount(d.parameters.total)} total, ${fmtCount(d.parameters.active)} active per token`,
    `tensors:      ${d.tensors.length} (${Object.entries(d.dtypes).map(([k, v]) => `${k}: ${v}`).join(', ')})`,
    `tokenizer:    ${d.tokenizer.kind}, ${d.tokenizer.vocabSize} tokens, bos=${d.tokenizer.bos} eos=${d.tokenizer.eos} unk=${d.tokenizer.unk}, chat template: ${d.chatTemplate ? 'from the file' : 'built-in Mistral [INST]'}`,
    '',
    ...d.tensors.map((t) => `  ${t.name.padEnd(34)} ${t.dtype.padEnd(5)} [${t.shape.join(', ')}]`),
    '',
  ];
  return lines.join('\n');
}

function fmtCount(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}K`;
  return String(n);
}

const generateCmd: Command = async (argv) => {
  const { values } = parseV(argv, { model: { type: 'string' }, prompt: { type: 'string' }, chat: { type: 'boolean' }, json: { type: 'boolean' }, ...samplingOptions });
  const prompt = required('prompt', values.prompt as string | undefined);
  const m = load(values);
  const opts = samplingFrom(values, 128);
  const ids = values.chat ? encodeChatPrompt(m, [{ role: 'user', content: prompt }]) : m.tokenizer.encode(prompt, { addBos: true });
  let first = true;
  const r = await generate(m, ids, opts, values.json ? undefined : (text: string) => {
    // The answer of a chat turn starts after "[/INST]": drop the one leading space the first piece carries.
    out(first && values.chat ? text.replace(/^ /, '') : text);
    first = false;
  });
  if (values.json) {
    out(JSON.stringify({ text: values.chat ? r.text.replace(/^ /, '') : r.text, tokens: r.tokens, prompt_tokens: r.promptTokens, finish_reason: r.finishReason, prefill_tokens_per_s: r.prefillTokensPerSecond, decode_tokens_per_s: r.decodeTokensPerSecond }) + '\n');
  } else out('\n');
};

async function chatLoop(m: LoadedModel, opts: GenerateOptions, banner?: string): Promise<void> {
  const tty = process.stdin.isTTY === true;
  const rl = readline.createInterface({ input: process.stdin, output: tty ? process.stdout : undefined, terminal: tty });
  const messages: ChatMessage[] = [];
  if (tty) out(`${banner ?? ''}Chatting with ${m.path}. Type a message; an empty line or Ctrl-D ends.\n`);
  const ask = () => {
    if (tty) out('> ');
  };
  ask();
  for await (const line of rl) {
    const text = line.trim();
    if (!text) {
      if (tty) break;
      continue;
    }
    messages.push({ role: 'user', content: text });
    let ids = encodeChatPrompt(m, messages);
    // Keep the conversation inside the context: drop the oldest turns (never the newest one).
    const ctx = opts.contextLength ?? m.config.maxPositionEmbeddings;
    const reserve = Math.min(opts.maxTokens ?? 256, Math.floor(ctx / 2));
    while (ids.length + reserve > ctx && messages.length > 1) {
      messages.splice(0, 2);
      ids = encodeChatPrompt(m, messages);
    }
    let first = true;
    const r = await generate(m, ids, opts, (t: string) => {
      out(first ? t.replace(/^ /, '') : t);
      first = false;
    });
    out('\n');
    messages.push({ role: 'assistant', content: r.text.replace(/^ /, '') });
    ask();
  }
  rl.close();
}

const chat: Command = async (argv) => {
  const { values } = parseV(argv, { model: { type: 'string' }, ...samplingOptions });
  const m = load(values);
  await chatLoop(m, samplingFrom(values, 256));
};

const logits: Command = async (argv) => {
  const { values } = parseV(argv, { model: { type: 'string' }, tokens: { type: 'string' }, threads: { type: 'string' }, backend: { type: 'string' } });
  const raw = required('tokens', values.tokens as string | undefined);
  const ids = raw.split(',').map((s) => {
    // Decimal digits only: Number() would read '' as 0 and '0x10' as 16.
    const n = /^\s*\d+\s*$/.test(s) ? Number(s) : NaN;
    if (!Number.isSafeInteger(n)) throw new UsageError(`--tokens: '${s}' is not a token id`);
    return n;
  });
  const m = load(values);
  const bad = ids.find((t) => t >= m.config.vocabSize);
  if (bad !== undefined) throw new UsageError(`--tokens: id ${bad} is outside the vocabulary (0..${m.config.vocabSize - 1})`);
  const session = m.newSession({ contextLength: Math.max(ids.length, 1) });
  const all = session.forward(ids, { allLogits: true });
  const V = m.config.vocabSize;
  out('{"tokens":' + JSON.stringify(ids) + ',"logits":[');
  for (let i = 0; i < ids.length; i++) out((i ? ',' : '') + '[' + Array.from(all.subarray(i * V, (i + 1) * V)).join(',') + ']');
  out(']}\n');
};

const tokenize: Command = async (argv) => {
  const { values } = parseV(argv, { model: { type: 'string' }, 'no-bos': { type: 'boolean' }, jsonl: { type: 'boolean' } });
  const m = load(values);
  const addBos = !values['no-bos'];
  if (values.jsonl) {
    const rl = readline.createInterface({ input: process.stdin });
    let n = 0;
    for await (const line of rl) {
      n++;
      if (!line.trim()) continue;
      let text: unknown;
      try {
        text = JSON.parse(line);
      } catch {
        throw new UsageError(`stdin line ${n} is not JSON: each line must be a JSON-encoded string`);
      }
      if (typeof text !== 'string') throw new UsageError(`stdin line ${n} is not a JSON string`);
      out(JSON.stringify(m.tokenizer.encode(text, { addBos })) + '\n');
    }
    return;
  }
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) chunks.push(c as Buffer);
  const text = Buffer.concat(chunks).toString('utf8');
  out(JSON.stringify({ ids: m.tokenizer.encode(text, { addBos }) }) + '\n');
};

const start: Command = async (argv) => {
  const { values } = parseV(argv, { ...samplingOptions });
  const { path, note } = await defaultModelPath();
  const m = loadModel(path);
  process.stderr.write(note + '\n');
  if (!process.stdin.isTTY) {
    // Piped or no stdin (CI, scripts): answer each stdin line; with none, run one demo generation.
    const chunks: Buffer[] = [];
    for await (const c of process.stdin) chunks.push(c as Buffer);
    const lines = Buffer.concat(chunks).toString('utf8').split('\n').map((l) => l.trim()).filter(Boolean);
    const opts = samplingFrom(values, 48);
    if (lines.length === 0) lines.push('Write a sentence about the sea.');
    for (const line of lines) {
      out(`> ${line}\n`);
      let first = true;
      const r = await generate(m, encodeChatPrompt(m, [{ role: 'user', content: line }]), opts, (t: string) => {
        out(first ? t.replace(/^ /, '') : t);
        first = false;
      });
      out(`\n[${r.tokens.length} tokens, prefill ${r.prefillTokensPerSecond.toFixed(1)} tok/s, decode ${r.decodeTokensPerSecond.toFixed(1)} tok/s]\n`);
    }
    return;
  }
  await chatLoop(m, samplingFrom(values, 64));
};

const serve: Command = async (argv) => {
  const { values } = parseV(argv, {
    model: { type: 'string' }, host: { type: 'string' }, port: { type: 'string' }, 'api-key': { type: 'string' },
    parallel: { type: 'string' }, 'max-queue': { type: 'string' }, threads: { type: 'string' }, backend: { type: 'string' }, ctx: { type: 'string' },
    'kv-cache': { type: 'string' },
  });
  const backend = backendArg(values);
  const kvF16 = kvF16Arg(values);
  const d = DEFAULT_SERVER_OPTIONS;
  const apiKey = (values['api-key'] as string | undefined) ?? process.env.MOE_API_KEY;
  // Without --model, the default model `moe start` chats with (as `ollama serve` serves what is installed).
  const modelPath = (values.model as string | undefined) ?? (await defaultModelPath()).path;
  const s = await startServer({
    ...d,
    modelPath,
    host: (values.host as string | undefined) ?? d.host,
    port: intArg('port', values.port as string | undefined, d.port, 0),
    parallel: intArg('parallel', values.parallel as string | undefined, d.parallel, 1),
    maxQueue: intArg('max-queue', values['max-queue'] as string | undefined, d.maxQueue, 0),
    threads: intArg('threads', values.threads as string | undefined, 0, 0),
    ...(backend ? { backend } : {}),
    ...(values.ctx !== undefined ? { contextLength: intArg('ctx', values.ctx as string | undefined, 0, 2) } : {}),
    ...(kvF16 !== undefined ? { kvF16 } : {}),
    ...(apiKey ? { apiKey } : {}),
  });
  process.stderr.write(`moe serve: ${modelPath} on ${s.url} (OpenAI API at ${s.url}/v1, playground at ${s.url}/)${apiKey ? ', API key required' : ''}\n`);
  await new Promise<void>((resolve) => {
    const stop = () => {
      process.stderr.write('moe serve: shutting down\n');
      s.close().then(resolve);
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
};

export const commands: Record<string, Command> = {
  serve,
  train: trainCommand,
  finetune: finetuneCommand,
  eval: evalCommand,
  'eval-tasks': (argv) => evalTasksCommand(argv),
  inspect,
  generate: generateCmd,
  chat,
  logits,
  tokenize,
  convert: convertCommand,
  // `moe data instruct` builds instruction-tuning data; every other `moe data` subcommand is the corpus's.
  data: (argv) => (argv[0] === 'instruct' ? instructDataCommand(argv.slice(1)) : dataCommand(argv)),
  quantize: quantizeCommand,
  start,
};
