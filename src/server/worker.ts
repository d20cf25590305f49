// The inference thread: loads the model, encodes prompts, runs the Engine, and talks to the HTTP thread by messages,
// so a long forward pass never blocks the server's event loop.

import { parentPort, workerData } from 'node:worker_threads';
import { loadModel } from '../model/load.js';
import { Engine, type EngineEvent } from './engine.js';
import { encodeChatPrompt } from '../workflows/generate.js';
import type { ChatMessage } from '../workflows/chat-template.js';
import type { SamplerOptions } from '../workflows/sampling.js';
import type { BackendName } from '../backend/select.js';

export interface WorkerInit {
  modelPath: string;
  threads: number;
  backend?: BackendName;
  parallel: number;
  maxQueue: number;
  contextLength?: number;
  kvF16?: boolean;
}

/** What the HTTP thread asks for. Prompts are encoded here, where the tokenizer lives. */
export type WorkerRequest =
  | {
      type: 'submit';
      id: string;
      prompt: { chat: ChatMessage[] } | { text: string };
      maxTokens: number;
      stop: string[];
      sampling: SamplerOptions;
      trace: boolean;
    }
  | { type: 'cancel'; id: string }
  | { type: 'stats'; rid: number };

export type WorkerReply =
  | EngineEvent
  | { type: 'ready'; model: string; config: unknown; contextLength: number }
  | { type: 'stats'; rid: number; load: number[][]; tokens: number; steps: number; busy: number; queued: number }
  | { type: 'fatal'; message: string };

const port = parentPort!;
const init = workerData as WorkerInit;
const send = (m: WorkerReply) => port.postMessage(m);

try {
  const model = loadModel(init.modelPath, { threads: init.threads, ...(init.backend ? { backend: init.backend } : {}) });
  const contextLength = Math.min(init.contextLength ?? model.config.maxPositionEmbeddings, model.config.maxPositionEmbeddings);
  const engine = new Engine(model, { parallel: init.parallel, maxQueue: init.maxQueue, contextLength, kvF16: init.kvF16 ?? false }, send);
  port.on('message', (m: WorkerRequest) => {
    if (m.type === 'cancel') return engine.cancel(m.id);
    if (m.type === 'stats') {
      return send({ type: 'stats', rid: m.rid, load: engine.load, tokens: engine.tokensProcessed, steps: engine.steps, busy: engine.busy, queued: engine.queued });
    }
    let promptIds: number[];
    try {
      promptIds = 'chat' in m.prompt ? encodeChatPrompt(model, m.prompt.chat) : model.tokenizer.encode(m.prompt.text, { addBos: true });
    } catch (e) {
      return send({ type: 'error', id: m.id, status: 400, code: 'invalid_request', message: (e as Error).message });
    }
    engine.submit({ id: m.id, promptIds, maxTokens: m.maxTokens, stop: m.stop, sampling: m.sampling, trace: m.trace });
  });
  send({ type: 'ready', model: init.modelPath, config: model.config, contextLength });
} catch (e) {
  send({ type: 'fatal', message: (e as Error).message });
}
