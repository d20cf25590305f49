#!/usr/bin/env node
// Load test of `moe serve` on loopback, bounded in count and time: one streaming client alone, then N concurrent
// streaming clients; aggregate generated tokens/s of each, per model. Writes the tables into docs/benchmarks.md between
// the loadtest markers. Usage: node scripts/loadtest.mjs [--clients 4] [--tokens 48] [--model <gguf>]... (default: the
// default model; --model may be repeated)
import * as fs from 'node:fs';
import * as os from 'node:os';
import { parseArgs } from 'node:util';
import { startServer, DEFAULT_SERVER_OPTIONS } from '../dist/src/server/http.js';
import { defaultModelPath } from '../dist/src/workflows/default-model.js';
import { selectBackend } from '../dist/src/backend/select.js';

const { values } = parseArgs({ options: { clients: { type: 'string', default: '4' }, tokens: { type: 'string', default: '48' }, model: { type: 'string', multiple: true }, 'no-write': { type: 'boolean', default: false } } });
const N = Number(values.clients);
const TOKENS = Number(values.tokens);
const modelPaths = values.model?.length ? values.model : [(await defaultModelPath()).path];
const DEADLINE = Date.now() + 10 * 60_000; // never run past 10 minutes

let server;
const prompts = ['Tell me about the sea.', 'Raconte-moi une histoire.', 'Erzähl mir etwas über Berlin.', 'Parlami di Roma.', 'Háblame de Madrid.', 'What is a mixture of experts?', 'Count to ten.', 'Name three colours.'];

/** One streaming chat request; resolves with its generated-token count (completion_tokens) and errors seen. */
async function client(i) {
  const res = await fetch(`${server.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ messages: [{ role: 'user', content: prompts[i % prompts.length] }], max_tokens: TOKENS, temperature: 0.8, seed: i, stream: true, stream_options: { include_usage: true } }),
    signal: AbortSignal.timeout(Math.max(1, DEADLINE - Date.now())),
  });
  if (!res.ok) throw new Error(`client ${i}: HTTP ${res.status} ${await res.text()}`);
  const text = await res.text();
  let tokens = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith('data: ') || line === 'data: [DONE]') continue;
    const j = JSON.parse(line.slice(6));
    if (j.error) throw new Error(`client ${i}: ${j.error.message}`);
    if (j.usage) tokens = j.usage.completion_tokens;
  }
  return tokens;
}

async function run(clients) {
  const t0 = performance.now();
  const counts = await Promise.all(Array.from({ length: clients }, (_, i) => client(i)));
  const s = (performance.now() - t0) / 1000;
  const tokens = counts.reduce((a, b) => a + b, 0);
  return { clients, tokens, seconds: s, tokensPerSecond: tokens / s };
}

const tables = [];
for (const modelPath of modelPaths) {
  server = await startServer({ ...DEFAULT_SERVER_OPTIONS, modelPath, port: 0, host: '127.0.0.1', parallel: N, maxQueue: 2 * N });
  await run(1); // warm-up
  const single = await run(1);
  const many = await run(N);
  await server.close();
  const rows = [
    `| clients | tokens generated | seconds | aggregate tokens/s | vs one client |`,
    `| --- | --- | --- | --- | --- |`,
    `| 1 | ${single.tokens} | ${single.seconds.toFixed(2)} | ${single.tokensPerSecond.toFixed(1)} | 1.00x |`,
    `| ${N} | ${many.tokens} | ${many.seconds.toFixed(2)} | ${many.tokensPerSecond.toFixed(1)} | ${(many.tokensPerSecond / single.tokensPerSecond).toFixed(2)}x |`,
  ];
  console.log(`${modelPath}\n${rows.join('\n')}`);
  tables.push(`Model \`${modelPath.split('/').pop()}\`:`, '', ...rows, '');
}
const cpu = os.cpus()[0]?.model ?? 'unknown CPU';
const backend = selectBackend();
const backendName = backend.name === 'native' ? `native, ${backend.info().cpu}, ${backend.threads} threads` : backend.name;
const section = [
  '<!-- loadtest:start -->',
  '## Server load test (`node scripts/loadtest.mjs`)',
  '',
  `${new Date().toISOString().slice(0, 10)}, ${cpu}, ${os.cpus().length} cores, Node ${process.version}, backend ${backendName}; ` +
    `\`moe serve --parallel ${N}\` on loopback; each client streams one chat completion of up to ${TOKENS} tokens (temperature 0.8, its own seed); errors: 0 (any error stops the run).`,
  '',
  ...tables,
  'Continuous batching runs all active sequences through one forward pass per step, so their tokens share each weight read and, in the MoE blocks, each expert GEMM. Figures from a shared 2-core machine are noisy.',
  '<!-- loadtest:end -->',
].join('\n');
if (!values['no-write']) {
  const file = new URL('../docs/benchmarks.md', import.meta.url);
  const old = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '# Benchmarks\n';
  const re = /<!-- loadtest:start -->[\s\S]*<!-- loadtest:end -->/;
  fs.writeFileSync(file, re.test(old) ? old.replace(re, section) : old.trimEnd() + '\n\n' + section + '\n');
  console.log('written to docs/benchmarks.md');
}
