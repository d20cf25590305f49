// `moe finetune`: instruction tuning / task fine-tuning of a trained model on `moe data instruct` shards. It is the
// training loop of train.ts with three seams filled in: the starting model (a GGUF file, a Hugging Face directory or
// a moe-ts training checkpoint, loaded into MixtralTrain in f32), the batches (whole examples, padded, loss only on
// the answer tokens) and the trainable parameters (full, router frozen, experts frozen, or LoRA adapters only:
// src/model/lora.ts). Checkpoints, --resume, the NaN stop, plots and the export at the end are train.ts's own; LoRA
// adds its adapters to each checkpoint and exports the merged model.

import * as fs from 'node:fs';
import * as path from 'node:path';
import { FormatError } from '../formats/errors.js';
import { readGGUF } from '../formats/gguf.js';
import { mixtralConfigFromGGUF } from '../formats/gguf-config.js';
import { readHFConfig } from '../formats/hf-config.js';
import { ggufTensorsToHF } from '../formats/names.js';
import { readCheckpointTensors, readSafetensors } from '../formats/safetensors.js';
import type { Tensor } from '../tensor/tensor.js';
import { noGrad, type Var } from '../autograd/tape.js';
import type { GradKernels } from '../autograd/kernels.js';
import { MixtralTrain, inferenceConfig, isMoeLayer, mixtralTrainConfig, type MixtralTrainConfig, type MoeOptions } from '../model/mixtral-train.js';
import { Rng } from '../util/rng.js';
import { ADAPTER_WEIGHTS_FILE, DEFAULT_LORA, LORA_TARGETS, LoraAdapters, loraConfigProblems, mergeLoraTensors, readLoraAdapter, type LoraConfig, type LoraTarget } from '../model/lora.js';
import { exportTrainedModel, type ExportedModel } from './export.js';
import { readInstructShard } from './instruct.js';
import { findCheckpoint, train, type BatchSource, type TrainBatch, type TrainerState, type TrainRunConfig } from './train.js';

// ---------------------------------------------------------------------------------------------------------------
// The starting model

export interface StartingModel {
  path: string;
  format: 'gguf' | 'hf' | 'checkpoint';
  /** Architecture plus MoE options: a checkpoint's own; else the defaults with the HF config's router_aux_loss_coef. */
  config: MixtralTrainConfig;
  /** Hugging Face-named tensors (any dtype; fromHFTensors dequantizes them to f32). */
  tensors: ReadonlyMap<string, Tensor>;
  /** A LoRA run's checkpoint: the adapter directory merged into `tensors`. */
  mergedAdapter?: string;
}

/**
 * Reads a model to fine-tune: a GGUF file (through the converter's GGUF -> HF naming, q/k rows back in HF order), a
 * Hugging Face checkpoint directory (config.json + safetensors), or a moe-ts training output (its checkpoint/, or
 * the checkpoint folder itself: the run's MoE options come along; a LoRA run's adapters are merged in).
 */
export function readStartingModel(p: string): StartingModel {
  let st: fs.Stats;
  try {
    st = fs.statSync(p);
  } catch {
    throw new FormatError(p, 'no such file or directory');
  }
  if (!st.isDirectory()) {
    const f = readGGUF(p);
    const arch = mixtralConfigFromGGUF(f);
    return { path: p, format: 'gguf', config: mixtralTrainConfig(arch, {}), tensors: ggufTensorsToHF(f.tensors, arch, { source: p }) };
  }
  const ckpt = fs.existsSync(path.join(p, 'run.json')) && fs.existsSync(path.join(p, 'model.safetensors')) ? p : fs.existsSync(path.join(p, 'config.json')) ? null : findCheckpoint(p);
  if (ckpt) {
    const file = path.join(ckpt, 'run.json');
    let saved: TrainRunConfig;
    try {
      saved = JSON.parse(fs.readFileSync(file, 'utf8')) as TrainRunConfig;
    } catch (e) {
      throw new FormatError(file, `not valid JSON: ${(e as Error).message}`);
    }
    if (!saved.model || typeof saved.model !== 'object') throw new FormatError(file, 'model: missing');
    // As train.ts resumes it: options added since the checkpoint was written take their defaults.
    const config = mixtralTrainConfig(inferenceConfig(saved.model), saved.model.moe ?? {});
    const tensors = readSafetensors(path.join(ckpt, 'model.safetensors')).tensors;
    // A LoRA checkpoint's model.safetensors is the frozen base: the model it trained is base + adapters.
    if (!fs.existsSync(path.join(ckpt, ADAPTER_WEIGHTS_FILE))) return { path: p, format: 'checkpoint', config, tensors };
    const a = readLoraAdapter(ckpt);
    return { path: p, format: 'checkpoint', config, tensors: mergeLoraTensors(tensors, { scale: a.scale, tensors: a.tensors, source: a.weightsFile }), mergedAdapter: ckpt };
  }
  if (!fs.existsSync(path.join(p, 'config.json'))) throw new FormatError(p, 'is neither a Hugging Face checkpoint (no config.json) nor a moe-ts training output (no checkpoint/)');
  const hf = readHFConfig(p);
  const moe: Partial<MoeOptions> = hf.routerAuxLossCoef !== null ? { routerAuxLossCoef: hf.routerAuxLossCoef } : {};
  return { path: p, format: 'hf', config: mixtralTrainConfig(hf.config, moe), tensors: readCheckpointTensors(p).tensors };
}

// ---------------------------------------------------------------------------------------------------------------
// Which parameters train

export type FinetuneMode = 'full' | 'router-frozen' | 'experts-frozen' | 'lora';
export const FINETUNE_MODES: readonly FinetuneMode[] = ['full', 'router-frozen', 'experts-frozen', 'lora'];

const ROUTER_RE = /\.block_sparse_moe\.(gate|noise)\.weight$/;
const EXPERTS_RE = /\.block_sparse_moe\.experts\.w[123]\.weight$/;

/**
 * The parameters a mode trains: full = all; router-frozen = all but the routers (block_sparse_moe.gate, and the
 * noisy router's W_noise); experts-frozen = all but the experts' w1/w2/w3 (dense FFN layers still train); lora =
 * the LoRA adapters attached to the model only (every weight of the model, router and norms included, is frozen).
 * The rest are frozen by the loop (no gradient computed, no optimiser state).
 */
export function trainableParameters(model: MixtralTrain, mode: FinetuneMode): [string, Var][] {
  if (mode === 'lora') {
    if (!(model.adapters instanceof LoraAdapters)) throw new Error('--mode lora: the model has no LoRA adapters attached');
    return model.adapters.namedParameters();
  }
  const all = model.namedParameters();
  if (mode === 'full') return all;
  const c = model.config;
  if (!Array.from({ length: c.numHiddenLayers }, (_, l) => isMoeLayer(c, l)).some(Boolean)) throw new Error(`--mode ${mode}: the model has no MoE layers (it is dense)`);
  const frozen = mode === 'router-frozen' ? ROUTER_RE : EXPERTS_RE;
  return all.filter(([name]) => !frozen.test(name));
}

// ---------------------------------------------------------------------------------------------------------------
// Data

/** One tokenized example: ids and loss mask (1 = answer token) as `moe data instruct` wrote them. */
export interface TokenizedExample {
  ids: Uint16Array;
  mask: Uint8Array;
  /** From <split>.jsonl when it was read ("a+b" for a two-task conversation); null otherwise. */
  task: string | null;
}

export interface FinetuneData {
  vocabSize: number;
  bosId: number;
  eosId: number;
  train: TokenizedExample[];
  val: TokenizedExample[];
}

/** The component tasks of an example's task ("translate+define" -> translate, define). */
const taskParts = (task: string) => task.split('+');

/** Example i of the shard as views of its arrays. */
function examplesOf(file: string, tasks: (string | null)[] | null): { vocabSize: number; bosId: number; eosId: number; examples: TokenizedExample[] } {
  const s = readInstructShard(file);
  const n = s.offsets.length - 1;
  if (tasks && tasks.length !== n) throw new FormatError(file, `holds ${n} examples but its .jsonl lists ${tasks.length}; rebuild both with moe data instruct`);
  const examples: TokenizedExample[] = [];
  for (let i = 0; i < n; i++) {
    const a = s.offsets[i]!, b = s.offsets[i + 1]!;
    examples.push({ ids: s.ids.subarray(a, b), mask: s.mask.subarray(a, b), task: tasks ? tasks[i]! : null });
  }
  return { vocabSize: s.vocabSize, bosId: s.bosId, eosId: s.eosId, examples };
}

/** The `task` of every line of a .jsonl written by `moe data instruct` (same order as the .instr shard). */
function readTasks(file: string): string[] {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new FormatError(file, `cannot read the examples (needed for --tasks: the .instr shard holds no task names): ${(e as Error).message}`);
  }
  const lines = text.split('\n');
  if (lines[lines.length - 1] === '') lines.pop();
  return lines.map((line, i) => {
    let j: { task?: unknown };
    try {
      j = JSON.parse(line) as { task?: unknown };
    } catch (e) {
      throw new FormatError(file, `line ${i + 1}: not valid JSON: ${(e as Error).message}`);
    }
    if (typeof j?.task !== 'string' || j.task === '') throw new FormatError(file, `line ${i + 1}: "task" is not a non-empty string`);
    return j.task;
  });
}

/**
 * Reads <dir>/train.instr and <dir>/val.instr. With `tasks`, the matching train.jsonl / val.jsonl give each
 * example's task and only examples whose every task (both of a two-task conversation) is listed are kept.
 */
export function loadFinetuneData(dir: string, opts: { tasks?: readonly string[] | null } = {}): FinetuneData {
  const tasks = opts.tasks && opts.tasks.length ? new Set(opts.tasks) : null;
  const read = (split: 'train' | 'val') => examplesOf(path.join(dir, `${split}.instr`), tasks ? readTasks(path.join(dir, `${split}.jsonl`)) : null);
  const tr = read('train');
  const va = read('val');
  if (tr.vocabSize !== va.vocabSize || tr.bosId !== va.bosId || tr.eosId !== va.eosId) {
    throw new FormatError(path.join(dir, 'val.instr'), `vocab size / BOS / EOS ${va.vocabSize}/${va.bosId}/${va.eosId} differ from train.instr's ${tr.vocabSize}/${tr.bosId}/${tr.eosId}`);
  }
  let train = tr.examples;
  let val = va.examples;
  if (tasks) {
    const known = new Set(train.flatMap((e) => taskParts(e.task!)));
    const unknown = [...tasks].filter((t) => !known.has(t));
    if (unknown.length) throw new FormatError(path.join(dir, 'train.jsonl'), `no training examples of task ${unknown.join(', ')} (tasks here: ${[...known].sort().join(', ')})`);
    const keep = (e: TokenizedExample) => taskParts(e.task!).every((t) => tasks.has(t));
    train = train.filter(keep);
    val = val.filter(keep);
  }
  if (!train.length) throw new FormatError(path.join(dir, 'train.instr'), 'holds no examples' + (tasks ? ' of the chosen tasks' : ''));
  if (!val.length) throw new FormatError(path.join(dir, 'val.instr'), 'holds no examples' + (tasks ? ' of the chosen tasks' : ''));
  return { vocabSize: tr.vocabSize, bosId: tr.bosId, eosId: tr.eosId, train, val };
}

/** Examples whose model positions (tokens - 1) exceed seqLen: they are cut to seqLen + 1 tokens. */
export function countTruncated(examples: readonly TokenizedExample[], seqLen: number): number {
  return examples.reduce((n, e) => n + (e.ids.length > seqLen + 1 ? 1 : 0), 0);
}

/**
 * A padded batch of whole examples: inputs = ids[0..n-1), targets[i] = ids[i+1] where mask[i+1] = 1 (an answer
 * token or its EOS), else -1 (prompt: no loss); each example cut to seqLen positions, then padded with EOS to the
 * longest in the batch (padding: target -1, tokenMask 0, so neither the loss nor the router's losses see it).
 * Sequences are separate rows (positions restart at 0), so examples never attend to one another.
 */
export function exampleBatch(examples: readonly TokenizedExample[], seqLen: number, padId: number): TrainBatch {
  const B = examples.length;
  const len = examples.map((e) => Math.max(0, Math.min(e.ids.length, seqLen + 1) - 1));
  const T = Math.max(1, ...len);
  const inputs = new Int32Array(B * T).fill(padId);
  const targets = new Int32Array(B * T).fill(-1);
  const tokenMask = new Uint8Array(B * T);
  examples.forEach((e, b) => {
    for (let i = 0; i < len[b]!; i++) {
      inputs[b * T + i] = e.ids[i]!;
      tokenMask[b * T + i] = 1;
      if (e.mask[i + 1]) targets[b * T + i] = e.ids[i + 1]!;
    }
  });
  return { inputs, targets, batch: B, tokenMask };
}

export interface InstructBatchOptions {
  /** Examples per step. */
  batchSize: number;
  seqLen: number;
  seed: number;
  /** Validation on the first evalBatches * batchSize examples of val (all of them when fewer). */
  evalBatches: number;
}

/**
 * Fine-tuning batches: epochs over the training examples, each epoch in its own seeded order; step s takes the
 * examples s*B .. s*B+B-1 of that endless sequence (a pure function of the step, so --resume is exact). One batch
 * per step; its cross-entropy is the mean over the batch's answer tokens. The validation loss is the mean over all
 * answer tokens of the evaluation examples.
 */
export function instructBatches(data: FinetuneData, o: InstructBatchOptions): BatchSource {
  const N = data.train.length;
  const orders = new Map<number, Uint32Array>();
  const order = (epoch: number): Uint32Array => {
    let p = orders.get(epoch);
    if (!p) {
      p = Uint32Array.from({ length: N }, (_, i) => i);
      const rng = new Rng((o.seed * 1_000_003 + epoch * 7919 + 0xf1e) % 2 ** 52);
      for (let i = N - 1; i > 0; i--) {
        const j = rng.int(i + 1);
        [p[i], p[j]] = [p[j]!, p[i]!];
      }
      if (orders.size > 4) orders.clear();
      orders.set(epoch, p);
    }
    return p;
  };
  const evalSet = data.val.slice(0, o.evalBatches * o.batchSize);
  return {
    train(step, micro) {
      if (micro !== 0) throw new Error('instructBatches: one batch per step (gradAccum 1)');
      const picked: TokenizedExample[] = [];
      for (let b = 0; b < o.batchSize; b++) {
        const j = step * o.batchSize + b;
        picked.push(data.train[order(Math.floor(j / N))[j % N]!]!);
      }
      return exampleBatch(picked, o.seqLen, data.eosId);
    },
    validate(model) {
      return noGrad(() => {
        let sum = 0, count = 0;
        for (let i = 0; i < evalSet.length; i += o.batchSize) {
          const b = exampleBatch(evalSet.slice(i, i + o.batchSize), o.seqLen, data.eosId);
          const n = b.targets.reduce((a, t) => a + (t >= 0 ? 1 : 0), 0);
          if (n === 0) continue;
          sum += model.loss(b.inputs, b.targets, { batch: b.batch, tokenMask: b.tokenMask! }).ce.item() * n;
          count += n;
        }
        return count ? sum / count : 0;
      });
    },
  };
}

// ---------------------------------------------------------------------------------------------------------------
// The run

export interface FinetuneConfig {
  /** GGUF file, Hugging Face directory, or moe-ts training output. */
  model: string;
  /** Directory with train.instr / val.instr (and .jsonl for `tasks`) from `moe data instruct`. */
  data: string;
  mode: FinetuneMode;
  /** Only examples of these tasks (null: all). */
  tasks: string[] | null;
  steps: number;
  /** Examples per step. */
  batchSize: number;
  /** Model positions per example (longer examples are truncated). */
  seqLen: number;
  maxLr: number;
  minLr: number;
  warmupSteps: number;
  weightDecay: number;
  clip: number;
  seed: number;
  evalInterval: number;
  evalBatches: number;
  checkpointInterval: number;
  /** Load-balancing loss coefficient (null: the model's own: its training run's, its config.json's, else 0.02). */
  auxCoef: number | null;
  /** Router z-loss coefficient (null: its training run's, else the project default 1e-3). */
  zCoef: number | null;
  /** Rank, alpha and targets of the adapters (mode lora only). */
  lora: LoraConfig;
}

/**
 * Defaults. LR 3e-4 peak (a tenth of the project's pre-training peak 3e-3, the usual fine-tuning ratio, and the top
 * of the 1e-4..3e-4 range instruction-tuning recipes use; our models are small, which tolerates the top end), cosine
 * to 3e-5 after a 5% warm-up (at most 50 steps). No weight decay: decay pulls towards zero, not towards the
 * pre-trained weights, so in fine-tuning it only erodes what pre-training learned. LoRA (mode lora): rank 8, alpha 16
 * on attention and experts, and a peak LR of 1e-3 (to 1e-4): the adapters start from B = 0 and only they move, so
 * LoRA recipes run several times full fine-tuning's LR (Hu et al. 2e-4..5e-4 on 100M+ models; ours are small).
 */
export function defaultFinetuneConfig(model: string, data: string, over: Partial<FinetuneConfig> = {}): FinetuneConfig {
  const steps = over.steps ?? 500;
  const lora = over.mode === 'lora';
  return {
    model, data, mode: 'full', tasks: null, steps, batchSize: 8, seqLen: 256, maxLr: lora ? 1e-3 : 3e-4, minLr: lora ? 1e-4 : 3e-5,
    warmupSteps: Math.min(50, Math.max(1, Math.round(steps * 0.05))), weightDecay: 0, clip: 1.0, seed: 1,
    evalInterval: 50, evalBatches: 8, checkpointInterval: 50, auxCoef: null, zCoef: null,
    lora: { ...DEFAULT_LORA, targets: [...DEFAULT_LORA.targets] }, ...over,
  };
}

export interface FinetuneOptions {
  outDir: string;
  resume?: boolean;
  /** Stop after this step (a test's stand-in for an interruption). */
  stopAfter?: number;
  kernels?: GradKernels;
  log?: (line: string) => void;
}

export interface FinetuneResult {
  /** The trained model (in mode lora: the frozen base with `adapters` attached). */
  model: MixtralTrain;
  /** Mode lora: the trained adapters; else null. */
  adapters: LoraAdapters | null;
  /** Mode lora, once the run finished: the adapters merged into the weights (what was exported); else null. */
  merged: MixtralTrain | null;
  state: TrainerState;
  run: TrainRunConfig;
  examples: { train: number; val: number };
  truncated: { train: number; val: number };
}

/** A LoRA config in one key order, targets in LORA_TARGETS order (so saved and given ones compare as JSON). */
function normLora(c: LoraConfig | undefined): LoraConfig | null {
  if (!c || typeof c !== 'object') return null;
  return { r: c.r, alpha: c.alpha, targets: LORA_TARGETS.filter((t) => Array.isArray(c.targets) && c.targets.includes(t)) };
}

/** What must match for --resume to continue the same run (finetune.json beside the checkpoint). */
const RESUME_KEYS = ['mode', 'tasks', 'batchSize', 'seqLen', 'seed'] as const;

export function finetune(cfg: FinetuneConfig, o: FinetuneOptions): FinetuneResult {
  const log = o.log ?? ((s: string) => process.stderr.write(s + '\n'));
  if (!FINETUNE_MODES.includes(cfg.mode)) throw new Error(`mode must be ${FINETUNE_MODES.join(', ')}, got ${String(cfg.mode)}`);
  if (cfg.mode === 'lora') {
    const p = loraConfigProblems(cfg.lora ?? DEFAULT_LORA);
    if (p.length) throw new Error(`--mode lora: ${p.join('; ')}`);
  }
  const lora = cfg.mode === 'lora' ? normLora(cfg.lora ?? DEFAULT_LORA) : null;
  const start = readStartingModel(cfg.model);
  const m = start.config;
  const moe: MoeOptions = {
    ...m.moe,
    routerAuxLossCoef: cfg.auxCoef ?? m.moe.routerAuxLossCoef,
    routerZLossCoef: cfg.zCoef ?? m.moe.routerZLossCoef,
  };
  const run: TrainRunConfig = {
    model: mixtralTrainConfig(inferenceConfig(m), moe),
    seqLen: cfg.seqLen, batchSize: cfg.batchSize, gradAccum: 1, steps: cfg.steps, maxLr: cfg.maxLr, minLr: cfg.minLr,
    warmupSteps: cfg.warmupSteps, weightDecay: cfg.weightDecay, clip: cfg.clip, seed: cfg.seed,
    evalInterval: cfg.evalInterval, evalBatches: cfg.evalBatches, checkpointInterval: cfg.checkpointInterval,
  };
  if (cfg.seqLen > m.maxPositionEmbeddings) throw new Error(`--seq-len ${cfg.seqLen} exceeds the model's context (max_position_embeddings ${m.maxPositionEmbeddings})`);
  const data = loadFinetuneData(cfg.data, { tasks: cfg.tasks });
  if (data.vocabSize !== m.vocabSize) throw new FormatError(path.join(cfg.data, 'train.instr'), `was tokenized for a vocabulary of ${data.vocabSize}, the model ${cfg.model} has ${m.vocabSize}`);
  const truncated = { train: countTruncated(data.train, cfg.seqLen), val: countTruncated(data.val, cfg.seqLen) };
  const pct = (a: number, b: number) => `${((100 * a) / b).toFixed(1)}%`;
  log(`moe finetune: ${start.format} ${cfg.model}, mode ${cfg.mode}; ${data.train.length} train / ${data.val.length} val examples${cfg.tasks ? ` of ${cfg.tasks.join(', ')}` : ''}`);
  log(`moe finetune: ${truncated.train} train (${pct(truncated.train, data.train.length)}) and ${truncated.val} val examples longer than --seq-len ${cfg.seqLen} are truncated`);

  fs.mkdirSync(o.outDir, { recursive: true });
  const settingsFile = path.join(o.outDir, 'finetune.json');
  const settings = { format: 'moe-ts-finetune', version: 1, ...cfg, model: path.resolve(cfg.model), data: path.resolve(cfg.data) };
  if (o.resume && findCheckpoint(o.outDir) && fs.existsSync(settingsFile)) {
    const saved = JSON.parse(fs.readFileSync(settingsFile, 'utf8')) as Record<string, unknown>;
    const keys: (keyof FinetuneConfig)[] = [...RESUME_KEYS, ...(lora ? (['lora'] as const) : [])];
    const same = (k: keyof FinetuneConfig) => (k === 'lora' ? JSON.stringify(normLora(saved.lora as LoraConfig)) === JSON.stringify(lora) : JSON.stringify(saved[k]) === JSON.stringify(cfg[k]));
    const diff = keys.filter((k) => !same(k));
    if (diff.length) throw new FormatError(settingsFile, `the run being resumed had other ${diff.map((k) => `${k} (${JSON.stringify(saved[k])})`).join(', ')}; resume with the same options`);
  }
  fs.writeFileSync(settingsFile, JSON.stringify(settings, null, 2) + '\n');

  let adapters: LoraAdapters | null = null;
  let merged: MixtralTrain | null = null;
  const loraHooks = lora
    ? {
        // A resumed run reads its adapters (and, by name, their optimiser state) back from the checkpoint.
        trainable: (mm: MixtralTrain, resumedFrom: string | null): [string, Var][] => {
          adapters = resumedFrom ? LoraAdapters.read(mm, resumedFrom) : LoraAdapters.init(mm, lora, { seed: cfg.seed });
          if (JSON.stringify(normLora(adapters.config)) !== JSON.stringify(lora)) throw new FormatError(resumedFrom!, `holds LoRA adapters with rank ${adapters.config.r}, alpha ${adapters.config.alpha}, targets ${adapters.config.targets.join(',')}; resume with the same options`);
          adapters.attach(mm);
          const named = trainableParameters(mm, 'lora');
          const n = named.reduce((a, [, v]) => a + v.size, 0);
          const total = mm.namedParameters().reduce((a, [, v]) => a + v.size, 0);
          log(`moe finetune: LoRA rank ${lora.r}, alpha ${lora.alpha} on ${lora.targets.join(' + ')}: ${adapters.modules().length} modules, ${n} adapter parameters (${((100 * n) / total).toFixed(2)}% of the model's ${total}); every model weight, router and norms included, is frozen`);
          return named;
        },
        checkpointFiles: (dir: string) => adapters!.save(dir, path.resolve(cfg.model)),
        exportModel: (mm: MixtralTrain) => (merged = adapters!.merge(mm)),
      }
    : { trainable: (mm: MixtralTrain) => trainableParameters(mm, cfg.mode) };
  const { model, state } = train(run, {
    outDir: o.outDir,
    batches: instructBatches(data, { batchSize: cfg.batchSize, seqLen: cfg.seqLen, seed: cfg.seed, evalBatches: cfg.evalBatches }),
    initialModel: () => MixtralTrain.fromHFTensors(run.model, start.tensors, { source: cfg.model }),
    ...loraHooks,
    name: 'moe finetune',
    log,
    ...(o.resume ? { resume: true } : {}),
    ...(o.stopAfter !== undefined ? { stopAfter: o.stopAfter } : {}),
    ...(o.kernels ? { kernels: o.kernels } : {}),
  });
  const ad = adapters as LoraAdapters | null;
  if (ad && state.step >= run.steps) {
    // The unmerged adapter beside the merged export, for PEFT or --merge-adapter onto another copy of the base.
    ad.save(path.join(o.outDir, 'adapter'), path.resolve(cfg.model));
    merged ??= ad.merge(model);
    log(`moe finetune: wrote the adapter to ${path.join(o.outDir, 'adapter')}`);
  }
  return { model, adapters: ad, merged, state, run, examples: { train: data.train.length, val: data.val.length }, truncated };
}

/**
 * `--merge-adapter`: a PEFT LoRA adapter directory merged into a model (W += scale B A for every lora_A/lora_B
 * pair), exported like a fine-tuned model (<outDir>/hf/ and model-f32.gguf).
 */
export function mergeAdapter(adapterDir: string, model: string, outDir: string, log?: (s: string) => void): ExportedModel {
  const start = readStartingModel(model);
  const a = readLoraAdapter(adapterDir);
  const merged = MixtralTrain.fromHFTensors(start.config, mergeLoraTensors(start.tensors, { scale: a.scale, tensors: a.tensors, source: a.weightsFile }), { source: model });
  fs.mkdirSync(outDir, { recursive: true });
  return exportTrainedModel(merged, outDir, log ? { log } : {});
}

// ---------------------------------------------------------------------------------------------------------------
// CLI

export const FINETUNE_USAGE =
  'finetune --model <gguf|hf-dir|train-out> --data <instruct-dir> --out <dir> [--mode full|router-frozen|experts-frozen|lora] [--tasks a,b] ' +
  '[--lora-rank N (8)] [--lora-alpha X (16)] [--lora-targets attn,experts] ' +
  '[--steps N] [--lr X] [--min-lr X] [--warmup N] [--batch N] [--seq-len N] [--aux-coef X] [--z-coef X] [--eval-interval N] [--eval-batches N] ' +
  '[--checkpoint-interval N] [--seed N] [--threads N] [--backend auto|native|ref] [--resume]\n' +
  '       finetune --merge-adapter <adapter-dir> --model <gguf|hf-dir|train-out> --out <dir>';

/** `moe finetune ...` (see FINETUNE_USAGE); prints a JSON summary line on stdout. */
export async function finetuneCommand(argv: string[]): Promise<void> {
  const { parse, intArg, numArg, required, UsageError } = await import('../cli/args.js');
  const { isBackendName } = await import('../backend/select.js');
  const { selectGradKernels } = await import('../autograd/native-kernels.js');
  const s = { type: 'string' } as const;
  const { values } = parse(argv, {
    model: s, data: s, out: s, mode: s, tasks: s, steps: s, lr: s, 'min-lr': s, warmup: s, batch: s, 'seq-len': s, 'aux-coef': s, 'z-coef': s,
    'eval-interval': s, 'eval-batches': s, 'checkpoint-interval': s, seed: s, threads: s, backend: s, 'stop-after': s, resume: { type: 'boolean' },
    'lora-rank': s, 'lora-alpha': s, 'lora-targets': s, 'merge-adapter': s,
  });
  const v = (k: string) => values[k] as string | undefined;
  if (v('merge-adapter') !== undefined) {
    const outDir = required('out', v('out'));
    const e = mergeAdapter(v('merge-adapter')!, required('model', v('model')), outDir, (l) => process.stderr.write(l + '\n'));
    process.stdout.write(JSON.stringify({ merged: v('merge-adapter'), hf: e.hfDir, gguf: e.gguf, out: outDir }) + '\n');
    return;
  }
  const backend = v('backend');
  if (backend !== undefined && !isBackendName(backend)) throw new UsageError(`--backend must be auto, native or ref, got '${backend}'`);
  const mode = (v('mode') ?? 'full') as FinetuneMode;
  if (!FINETUNE_MODES.includes(mode)) throw new UsageError(`--mode must be ${FINETUNE_MODES.join(', ')}, got '${mode}'`);
  const tasks = v('tasks') !== undefined ? v('tasks')!.split(',').map((t) => t.trim()).filter(Boolean) : null;
  if (tasks && !tasks.length) throw new UsageError('--tasks needs at least one task name');
  const steps = intArg('steps', v('steps'), 500, 1);
  const d = defaultFinetuneConfig(required('model', v('model')), required('data', v('data')), { steps, mode });
  if (mode !== 'lora') for (const k of ['lora-rank', 'lora-alpha', 'lora-targets']) if (v(k) !== undefined) throw new UsageError(`--${k} needs --mode lora`);
  const targets = v('lora-targets') !== undefined ? [...new Set(v('lora-targets')!.split(',').map((t) => t.trim()).filter(Boolean))] : d.lora.targets;
  const badTarget = targets.find((t) => !LORA_TARGETS.includes(t as LoraTarget));
  if (badTarget !== undefined || !targets.length) throw new UsageError(`--lora-targets must be some of ${LORA_TARGETS.join(',')}, got '${v('lora-targets')}'`);
  const maxLr = numArg('lr', v('lr'), d.maxLr, 0);
  const cfg: FinetuneConfig = {
    ...d,
    mode,
    tasks,
    maxLr,
    minLr: numArg('min-lr', v('min-lr'), v('lr') !== undefined ? maxLr / 10 : d.minLr, 0),
    warmupSteps: intArg('warmup', v('warmup'), d.warmupSteps, 0),
    batchSize: intArg('batch', v('batch'), d.batchSize, 1),
    seqLen: intArg('seq-len', v('seq-len'), d.seqLen, 1),
    auxCoef: v('aux-coef') !== undefined ? numArg('aux-coef', v('aux-coef'), 0, 0) : null,
    zCoef: v('z-coef') !== undefined ? numArg('z-coef', v('z-coef'), 0, 0) : null,
    evalInterval: intArg('eval-interval', v('eval-interval'), d.evalInterval, 1),
    evalBatches: intArg('eval-batches', v('eval-batches'), d.evalBatches, 1),
    checkpointInterval: intArg('checkpoint-interval', v('checkpoint-interval'), d.checkpointInterval, 1),
    seed: intArg('seed', v('seed'), d.seed, 0),
    lora: { r: intArg('lora-rank', v('lora-rank'), d.lora.r, 1), alpha: numArg('lora-alpha', v('lora-alpha'), d.lora.alpha, 0), targets: LORA_TARGETS.filter((t) => targets.includes(t)) },
  };
  const outDir = required('out', v('out'));
  const kernels = selectGradKernels({ threads: intArg('threads', v('threads'), 0, 0), ...(backend ? { backend } : {}) });
  const stop = v('stop-after');
  const r = finetune(cfg, { outDir, kernels, resume: values.resume === true, ...(stop !== undefined ? { stopAfter: intArg('stop-after', stop, 0, 1) } : {}) });
  const h = r.state.history[r.state.history.length - 1];
  const e = r.state.evals[r.state.evals.length - 1];
  process.stdout.write(
    JSON.stringify({ step: r.state.step, mode: cfg.mode, ...(r.adapters && r.state.step >= cfg.steps ? { adapter: path.join(outDir, 'adapter') } : {}), examples: r.examples, truncated: r.truncated, tokens: r.state.tokensSeen, loss: h?.loss, ce: h?.ce, val_loss: e?.valLoss ?? null, out: outDir }) + '\n',
  );
}
