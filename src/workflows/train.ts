// `moe train`: the training loop (nanoGPT-shaped): data windows, forward + backward with the MoE auxiliary losses,
// gradient accumulation and clipping, AdamW with warm-up + cosine schedule, periodic validation, atomic checkpoints
// that resume onto the same loss curve, and at the end SVG loss curves and a layer x expert load heatmap.
// Fine-tuning (finetune.ts) reuses this loop through three seams in TrainOptions: the batch source, the starting
// model and the trainable parameters.

import * as fs from 'node:fs';
import * as path from 'node:path';
import { FormatError } from '../formats/errors.js';
import { readSafetensors, writeSafetensors } from '../formats/safetensors.js';
import { f32Tensor, type Tensor } from '../tensor/tensor.js';
import { dequantize } from '../tensor/quant.js';
import { MixtralTrain, mixtralTrainConfig, trainConfigProblems, inferenceConfig, type MixtralTrainConfig, type MoeOptions } from '../model/mixtral-train.js';
import { configProblems, type MixtralConfig } from '../model/config.js';
import { noGrad, type Var } from '../autograd/tape.js';
import { Rng } from '../util/rng.js';
import { Progress } from '../util/progress.js';
import { heatmapSVG, lineChartSVG } from '../util/svg.js';
import { AdamW, clipGradNorm, learningRate, DEFAULT_ADAMW, type OptimParam } from './optimizer.js';
import { listShards, readShard } from './corpus.js';
import { exportTrainedModel } from './export.js';
import { gradKernels, setGradKernels, type GradKernels } from '../autograd/kernels.js';
import { selectGradKernels } from '../autograd/native-kernels.js';

export interface TrainRunConfig {
  model: MixtralTrainConfig;
  /** Tokens per training sequence. */
  seqLen: number;
  /** Sequences per micro-batch. */
  batchSize: number;
  /** Micro-batches per optimizer step. */
  gradAccum: number;
  steps: number;
  maxLr: number;
  minLr: number;
  warmupSteps: number;
  weightDecay: number;
  clip: number;
  seed: number;
  /** Validate every n steps (and at the end) on `evalBatches` fixed validation micro-batches. */
  evalInterval: number;
  evalBatches: number;
  /** Write a checkpoint every n steps (and at the end). */
  checkpointInterval: number;
}

const base = (m: MixtralConfig, moe: Partial<MoeOptions>, over: Partial<TrainRunConfig>): TrainRunConfig => ({
  model: mixtralTrainConfig(m, moe),
  seqLen: 128, batchSize: 4, gradAccum: 1, steps: 1000, maxLr: 3e-3, minLr: 3e-4, warmupSteps: 50,
  weightDecay: 0.1, clip: 1.0, seed: 1, evalInterval: 100, evalBatches: 8, checkpointInterval: 100, ...over,
});

const mixtralShape = (o: Partial<MixtralConfig>): MixtralConfig => ({
  vocabSize: 32000, hiddenSize: 128, intermediateSize: 256, numHiddenLayers: 4, numAttentionHeads: 4, numKeyValueHeads: 2, headDim: 32,
  numLocalExperts: 8, numExpertsPerTok: 2, rmsNormEps: 1e-5, ropeTheta: 1e6, maxPositionEmbeddings: 2048, slidingWindow: null,
  tieWordEmbeddings: true, ...o,
});

/** Named starting points; a JSON file can override any field. */
export const TRAIN_PRESETS: Record<string, () => TrainRunConfig> = {
  /** For tests: a few seconds on the ref backend. */
  tiny: () => base(mixtralShape({ vocabSize: 32000, hiddenSize: 32, intermediateSize: 64, numHiddenLayers: 2, numAttentionHeads: 2, numKeyValueHeads: 1, headDim: 16, numLocalExperts: 4 }), { routerZLossCoef: 0 }, { seqLen: 32, batchSize: 2, steps: 20, warmupSteps: 4, evalInterval: 10, evalBatches: 2, checkpointInterval: 5 }),
  /** The project's small MoE: 8 experts, top-2. */
  'small-moe': () => base(mixtralShape({}), { routerAuxLossCoef: 0.02, routerZLossCoef: 1e-3 }, {}),
  /** A dense model with the same active parameters as small-moe (one FFN of 2x the width). */
  'small-dense': () => base(mixtralShape({ numLocalExperts: 1, numExpertsPerTok: 1, intermediateSize: 512 }), { routerZLossCoef: 0 }, {}),
};

/** Reads a preset name or a JSON file ({"preset": name, ...fields, "model": {...}, "moe": {...}}). */
export function resolveTrainConfig(spec: string): TrainRunConfig {
  if (TRAIN_PRESETS[spec]) return TRAIN_PRESETS[spec]();
  if (!fs.existsSync(spec)) throw new FormatError(spec, `not a preset (${Object.keys(TRAIN_PRESETS).join(', ')}) and no such file`);
  let j: Record<string, unknown>;
  try {
    j = JSON.parse(fs.readFileSync(spec, 'utf8'));
  } catch (e) {
    throw new FormatError(spec, `not valid JSON: ${(e as Error).message}`);
  }
  const presetName = typeof j.preset === 'string' ? j.preset : 'small-moe';
  if (!TRAIN_PRESETS[presetName]) throw new FormatError(spec, `preset '${presetName}' is unknown`);
  const cfg = TRAIN_PRESETS[presetName]();
  const { preset: _p, model, moe, ...rest } = j as { preset?: string; model?: Partial<MixtralConfig>; moe?: Partial<MoeOptions> } & Partial<TrainRunConfig>;
  void _p;
  const merged: TrainRunConfig = { ...cfg, ...rest, model: mixtralTrainConfig({ ...cfg.model, ...(model ?? {}) }, { ...cfg.model.moe, ...(moe ?? {}) }) };
  checkRunConfig(merged, spec);
  return merged;
}

function checkRunConfig(c: TrainRunConfig, file: string): void {
  const problems = [...configProblems(c.model), ...trainConfigProblems(c.model)];
  for (const k of ['seqLen', 'batchSize', 'gradAccum', 'steps', 'evalInterval', 'evalBatches', 'checkpointInterval'] as const) {
    if (!(Number.isInteger(c[k]) && c[k] > 0)) problems.push(`${k} must be a positive integer, got ${c[k]}`);
  }
  for (const k of ['maxLr', 'minLr', 'weightDecay', 'clip'] as const) if (!(Number.isFinite(c[k]) && c[k] >= 0)) problems.push(`${k} must be >= 0, got ${c[k]}`);
  if (problems.length) throw new FormatError(file, problems.join('; '));
}

/** Training and validation tokens: every language's shards concatenated (documents stay delimited by BOS/EOS). */
export interface TokenData {
  train: Uint16Array;
  val: Uint16Array;
}

export function loadTokenData(dir: string): TokenData {
  const cat = (split: 'train' | 'val') => {
    const parts = listShards(dir, { split }).map((s) => readShard(s.file).ids);
    const out = new Uint16Array(parts.reduce((a, p) => a + p.length, 0));
    let o = 0;
    for (const p of parts) {
      out.set(p, o);
      o += p.length;
    }
    return out;
  };
  return { train: cat('train'), val: cat('val') };
}

/** The (inputs, targets) of micro-batch `micro` of step `step`: random windows, a pure function of (seed, step, micro). */
export function batchAt(tokens: Uint16Array, c: TrainRunConfig, step: number, micro: number, salt = 0): { inputs: Int32Array; targets: Int32Array } {
  const T = c.seqLen;
  if (tokens.length < T + 2) throw new Error(`the data holds ${tokens.length} tokens; a training window needs ${T + 1}`);
  const rng = new Rng((c.seed * 1_000_003 + step * 1009 + micro * 7 + salt) % 2 ** 52);
  const inputs = new Int32Array(c.batchSize * T);
  const targets = new Int32Array(c.batchSize * T);
  for (let b = 0; b < c.batchSize; b++) {
    const start = rng.int(tokens.length - T - 1);
    for (let i = 0; i < T; i++) {
      inputs[b * T + i] = tokens[start + i];
      targets[b * T + i] = tokens[start + i + 1];
    }
  }
  return { inputs, targets };
}

/** One micro-batch: `batch` sequences of equal length stacked in `inputs`; a negative target carries no loss. */
export interface TrainBatch {
  inputs: Int32Array;
  targets: Int32Array;
  batch: number;
  /** 1 = a real token, 0 = padding (left out of the router's auxiliary losses and of the token count). */
  tokenMask?: Uint8Array;
}

/**
 * Where training data comes from: micro-batch `micro` of step `step` must be a pure function of (step, micro) so a
 * resumed run sees exactly the batches an uninterrupted one would; `validate` gives the validation loss.
 */
export interface BatchSource {
  train(step: number, micro: number): TrainBatch;
  validate(model: MixtralTrain): number;
}

/** Pre-training's source: random windows of the token stream, validation on fixed windows of `val`. */
export function tokenBatches(data: TokenData, run: TrainRunConfig): BatchSource {
  return {
    train: (step, micro) => ({ ...batchAt(data.train, run, step, micro), batch: run.batchSize }),
    validate: (model) => evaluate(model, data.val, run),
  };
}

export interface StepRecord {
  step: number;
  loss: number;
  ce: number;
  /** coef * balancing loss (what the optimiser sees). */
  aux: number;
  z: number;
  lr: number;
  gradNorm: number;
  tokensPerSecond: number;
}

export interface TrainerState {
  step: number;
  tokensSeen: number;
  history: StepRecord[];
  evals: { step: number; valLoss: number }[];
  /** Latest fraction of token-slots per layer and expert (rows sum to 1). */
  load: number[][];
}

export class TrainingDivergedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TrainingDivergedError';
  }
}

const CKPT = 'checkpoint';

/** Writes a checkpoint directory atomically: a fresh folder is filled, then swapped in by rename. */
export function saveCheckpoint(outDir: string, run: TrainRunConfig, model: MixtralTrain, opt: AdamW, state: TrainerState, extra?: (dir: string) => void): string {
  const final = path.join(outDir, CKPT);
  const tmp = path.join(outDir, `${CKPT}.tmp-${process.pid}`);
  fs.rmSync(tmp, { recursive: true, force: true });
  fs.mkdirSync(tmp, { recursive: true });
  writeSafetensors(path.join(tmp, 'model.safetensors'), model.toHFTensors({ includeNoise: true }), { format: 'pt' });
  const moments = new Map<string, Tensor>();
  opt.params.forEach((p, i) => {
    moments.set(`m.${p.name}`, f32Tensor(Float32Array.from(opt.m[i]), [p.data.length]));
    moments.set(`v.${p.name}`, f32Tensor(Float32Array.from(opt.v[i]), [p.data.length]));
  });
  writeSafetensors(path.join(tmp, 'optimizer.safetensors'), moments, { t: String(opt.t) });
  fs.writeFileSync(path.join(tmp, 'run.json'), JSON.stringify(run, null, 2) + '\n');
  fs.writeFileSync(path.join(tmp, 'trainer_state.json'), JSON.stringify(state) + '\n');
  extra?.(tmp);
  const old = path.join(outDir, `${CKPT}.old`);
  fs.rmSync(old, { recursive: true, force: true });
  if (fs.existsSync(final)) fs.renameSync(final, old);
  fs.renameSync(tmp, final);
  fs.rmSync(old, { recursive: true, force: true });
  return final;
}

/** The newest complete checkpoint in outDir (a crash between the two renames leaves it as checkpoint.old). */
export function findCheckpoint(outDir: string): string | null {
  for (const name of [CKPT, `${CKPT}.old`]) {
    const p = path.join(outDir, name);
    if (fs.existsSync(path.join(p, 'trainer_state.json'))) return p;
  }
  return null;
}

export interface TrainOptions {
  /** Pre-training tokens (used when `batches` is not given). */
  data?: TokenData;
  /** The training batches and validation loss (default: tokenBatches(data, run)); fine-tuning passes its own. */
  batches?: BatchSource;
  /** The starting model when no checkpoint is resumed (default: MixtralTrain.init(run.model, { seed: run.seed })). */
  initialModel?: () => MixtralTrain;
  /**
   * The named parameters the optimiser updates (default: all of model.namedParameters()). The model's parameters
   * not listed are frozen: requiresGrad is turned off, so no gradient is computed for them, and they have no
   * optimiser state. Parameters outside the model (LoRA adapters, which the model consults through model.adapters)
   * may be listed too. `resumedFrom` is the checkpoint folder being resumed (null for a fresh start), so such
   * parameters can be read back from the files `checkpointFiles` wrote there.
   */
  trainable?: (model: MixtralTrain, resumedFrom: string | null) => [string, Var][];
  /** Writes more files into every checkpoint folder before it is swapped in (LoRA: the adapters). */
  checkpointFiles?: (dir: string) => void;
  /** The model exported at the end (default: the trained model; LoRA merges its adapters into a copy here). */
  exportModel?: (model: MixtralTrain) => MixtralTrain;
  /** The command named in log lines and the progress bar (default "moe train"). */
  name?: string;
  outDir: string;
  resume?: boolean;
  /** Stop after this step (a test's stand-in for an interruption); the run's schedule still spans `steps`. */
  stopAfter?: number;
  /** The matmul kernels (default: the current gradKernels(); `moe train` picks native when built). */
  kernels?: GradKernels;
  log?: (line: string) => void;
}

/** Runs (or resumes) training; returns the final state. */
export function train(run: TrainRunConfig, o: TrainOptions): { model: MixtralTrain; state: TrainerState } {
  if (!o.kernels) return trainWith(run, o);
  const prev = setGradKernels(o.kernels);
  try {
    return trainWith(run, o);
  } finally {
    setGradKernels(prev);
  }
}

function trainWith(run: TrainRunConfig, o: TrainOptions): { model: MixtralTrain; state: TrainerState } {
  checkRunConfig(run, 'train config');
  const log = o.log ?? ((s: string) => process.stderr.write(s + '\n'));
  const cmd = o.name ?? 'moe train';
  if (!o.batches && !o.data) throw new Error('train: give data or batches');
  const source = o.batches ?? tokenBatches(o.data!, run);
  fs.mkdirSync(o.outDir, { recursive: true });
  let model: MixtralTrain;
  let state: TrainerState = { step: 0, tokensSeen: 0, history: [], evals: [], load: [] };
  const ckpt = o.resume ? findCheckpoint(o.outDir) : null;
  if (o.resume && !ckpt) log(`${cmd}: no checkpoint in ${o.outDir}; starting from scratch`);
  if (ckpt) {
    const saved = JSON.parse(fs.readFileSync(path.join(ckpt, 'run.json'), 'utf8')) as TrainRunConfig;
    // Options added since the checkpoint was written take their defaults (an older checkpoint still resumes).
    const savedModel = mixtralTrainConfig(inferenceConfig(saved.model), saved.model.moe);
    if (JSON.stringify(savedModel) !== JSON.stringify(mixtralTrainConfig(inferenceConfig(run.model), run.model.moe))) throw new FormatError(ckpt, 'the checkpoint was made with another model config; resume with the same --config');
    model = MixtralTrain.fromHFTensors(run.model, readSafetensors(path.join(ckpt, 'model.safetensors')).tensors, { source: ckpt });
    state = JSON.parse(fs.readFileSync(path.join(ckpt, 'trainer_state.json'), 'utf8')) as TrainerState;
  } else {
    model = o.initialModel ? o.initialModel() : MixtralTrain.init(run.model, { seed: run.seed });
  }
  const named = o.trainable ? o.trainable(model, ckpt) : model.namedParameters();
  if (named.length === 0) throw new Error(`${cmd}: no trainable parameters`);
  const chosen = new Set(named.map(([, v]) => v));
  for (const [, v] of model.namedParameters()) v.requiresGrad = chosen.has(v);
  const params: OptimParam[] = named.map(([name, v]) => ({ name, data: v.data, grad: null, decay: v.shape.length >= 2 }));
  const opt = new AdamW(params, { ...DEFAULT_ADAMW, weightDecay: run.weightDecay });
  if (ckpt) {
    const f = readSafetensors(path.join(ckpt, 'optimizer.safetensors'));
    opt.t = Number(f.metadata.t ?? state.step);
    params.forEach((p, i) => {
      const m = f.tensors.get(`m.${p.name}`);
      const v = f.tensors.get(`v.${p.name}`);
      if (!m || !v) throw new FormatError(ckpt, `optimizer state for ${p.name} is missing`);
      opt.m[i].set(dequantize(m));
      opt.v[i].set(dequantize(v));
    });
    log(`${cmd}: resumed from ${ckpt} at step ${state.step}`);
  }

  const sched = { maxLr: run.maxLr, minLr: run.minLr, warmupSteps: run.warmupSteps, totalSteps: run.steps };
  const last = Math.min(run.steps, o.stopAfter ?? run.steps);
  log(`${cmd}: ${gradKernels().name} matmul kernels` + (o.batches ? '' : `, ${run.batchSize * run.seqLen * run.gradAccum} tokens per step`));
  const progress = new Progress({ label: cmd.replace(/^moe /, ''), total: run.steps, unit: 'items', itemName: 'steps' });
  const E = run.model.numLocalExperts;
  while (state.step < last) {
    const step = state.step;
    const t0 = performance.now();
    for (const [, v] of named) v.grad = null;
    let loss = 0, ce = 0, aux = 0, z = 0, tokensPerStep = 0;
    const counts: number[][] = [];
    for (let micro = 0; micro < run.gradAccum; micro++) {
      const { inputs, targets, batch, tokenMask } = source.train(step, micro);
      tokensPerStep += tokenMask ? tokenMask.reduce((a, v) => a + v, 0) : inputs.length;
      const r = model.loss(inputs, targets, { batch, training: true, rng: new Rng((run.seed * 7919 + step * 31 + micro) % 2 ** 52), ...(tokenMask ? { tokenMask } : {}) });
      // Each micro-batch's loss is a mean over its tokens: scale so the accumulated gradient is the batch mean.
      r.loss.backward(Float32Array.of(1 / run.gradAccum));
      loss += r.loss.item() / run.gradAccum;
      ce += r.ce.item() / run.gradAccum;
      aux += (r.balance ? r.balance.item() * run.model.moe.routerAuxLossCoef : 0) / run.gradAccum;
      z += (r.zLoss ? r.zLoss.item() * run.model.moe.routerZLossCoef : 0) / run.gradAccum;
      r.routing.forEach((lr, i) => {
        counts[i] ??= new Array<number>(E).fill(0);
        const k = run.model.numExpertsPerTok;
        lr.experts.forEach((e, j) => {
          if (!tokenMask || tokenMask[Math.floor(j / k)]) counts[i][e]++; // padding's routes are not load
        });
      });
    }
    for (let i = 0; i < params.length; i++) params[i].grad = named[i][1].grad;
    const gradNorm = clipGradNorm(params, run.clip);
    if (!Number.isFinite(loss) || !Number.isFinite(gradNorm)) {
      progress.abandon();
      const where = findCheckpoint(o.outDir);
      throw new TrainingDivergedError(`the loss is ${loss} (gradient norm ${gradNorm}) at step ${step}; training stopped. ` +
        (where ? `The last good checkpoint, ${where} (step ${JSON.parse(fs.readFileSync(path.join(where, 'trainer_state.json'), 'utf8')).step}), is intact.` : 'No checkpoint was written yet.'));
    }
    const lr = learningRate(step, sched);
    opt.step(lr);
    const secs = (performance.now() - t0) / 1000;
    state.step++;
    state.tokensSeen += tokensPerStep;
    state.load = counts.map((row) => {
      const s = row.reduce((a, b) => a + b, 0) || 1;
      return row.map((v) => v / s);
    });
    state.history.push({ step: state.step, loss, ce, aux, z, lr, gradNorm, tokensPerSecond: tokensPerStep / secs });
    // Expert load per MoE layer: the busiest expert's share of the step's token-slots (100/E % when even), and layer
    // 0's whole distribution in the log lines.
    const busiest = state.load.length ? ` busiest expert/layer ${state.load.map((row) => (Math.max(...row) * 100).toFixed(0)).join(' ')}%` : '';
    const loadNote = state.load.length ? ` load L0 [${state.load[0].map((v) => (v * 100).toFixed(0)).join(' ')}]%${busiest}` : '';
    const figures = `loss ${loss.toFixed(4)} ce ${ce.toFixed(4)} aux ${aux.toFixed(4)} lr ${lr.toExponential(2)} ${(tokensPerStep / secs).toFixed(0)} tok/s`;
    progress.update(state.step, figures + busiest);
    if (!progress.active) log(`step ${state.step}/${run.steps} ${figures}${loadNote}`);
    if (state.step % run.evalInterval === 0 || state.step === run.steps) state.evals.push({ step: state.step, valLoss: source.validate(model) });
    if (state.step % run.checkpointInterval === 0 || state.step === run.steps) saveCheckpoint(o.outDir, run, model, opt, state, o.checkpointFiles);
  }
  progress.finish();
  if (state.step >= run.steps) {
    writePlots(o.outDir, state, run);
    // The finished model as checkpoints other tools read (hf/ and model-f32.gguf); a model the inference side cannot
    // express (a switch router, say) keeps its training checkpoint only.
    try {
      const e = exportTrainedModel(o.exportModel ? o.exportModel(model) : model, o.outDir);
      log(`${cmd}: exported ${e.hfDir} and ${e.gguf}`);
    } catch (err) {
      log(`${cmd}: not exported: ${(err as Error).message}`);
    }
  }
  return { model, state };
}

/** Mean cross-entropy over `evalBatches` fixed validation micro-batches (no router noise, dropless). */
export function evaluate(model: MixtralTrain, tokens: Uint16Array, run: TrainRunConfig): number {
  return noGrad(() => {
    let sum = 0;
    for (let i = 0; i < run.evalBatches; i++) {
      const { inputs, targets } = batchAt(tokens, run, 0, i, 0x5eed);
      sum += model.loss(inputs, targets, { batch: run.batchSize }).ce.item();
    }
    return sum / run.evalBatches;
  });
}

export function writePlots(outDir: string, state: TrainerState, run: TrainRunConfig): void {
  fs.writeFileSync(
    path.join(outDir, 'loss.svg'),
    lineChartSVG(
      [
        { name: 'train (cross-entropy)', points: state.history.map((h) => [h.step, h.ce] as const) },
        { name: 'validation', points: state.evals.map((e) => [e.step, e.valLoss] as const) },
        ...(run.model.numLocalExperts > 1 ? [{ name: 'aux (balance x coef)', points: state.history.map((h) => [h.step, h.aux] as const) }] : []),
      ],
      { title: 'moe-ts training loss', xLabel: 'step', yLabel: 'loss (nats/token)' },
    ),
  );
  if (state.load.length) {
    fs.writeFileSync(
      path.join(outDir, 'expert-load.svg'),
      heatmapSVG(state.load.map((r) => r.map((v) => v * 100)), { title: `Expert load at step ${state.step} (% of token-slots)`, rowLabel: (i) => `layer ${i}`, colLabel: (j) => `E${j}`, format: (v) => v.toFixed(1) }),
    );
  }
}

export { inferenceConfig };

/** `moe train --config <preset|json> --data <dir> --out <dir> [--steps N] [--resume]` */
export async function trainCommand(argv: string[]): Promise<void> {
  const { parse, intArg, required, UsageError } = await import('../cli/args.js');
  const { isBackendName } = await import('../backend/select.js');
  const { values } = parse(argv, { config: { type: 'string' }, data: { type: 'string' }, out: { type: 'string' }, steps: { type: 'string' }, resume: { type: 'boolean' }, 'stop-after': { type: 'string' }, threads: { type: 'string' }, backend: { type: 'string' } });
  const backend = values.backend as string | undefined;
  if (backend !== undefined && !isBackendName(backend)) throw new UsageError(`--backend must be auto, native or ref, got '${backend}'`);
  const kernels = selectGradKernels({ threads: intArg('threads', values.threads as string | undefined, 0, 0), ...(backend ? { backend } : {}) });
  const run = resolveTrainConfig(required('config', values.config as string | undefined));
  if (values.steps !== undefined) run.steps = intArg('steps', values.steps as string, run.steps, 1);
  const data = loadTokenData(required('data', values.data as string | undefined));
  const outDir = required('out', values.out as string | undefined);
  const stop = values['stop-after'] as string | undefined;
  const { state } = train(run, { data, outDir, kernels, resume: values.resume === true, ...(stop !== undefined ? { stopAfter: intArg('stop-after', stop, 0, 1) } : {}) });
  const h = state.history[state.history.length - 1];
  const v = state.evals[state.evals.length - 1];
  process.stdout.write(JSON.stringify({ step: state.step, tokens: state.tokensSeen, loss: h?.loss, ce: h?.ce, val_loss: v?.valLoss ?? null, out: outDir }) + '\n');
}
