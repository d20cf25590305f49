/**
 * The Mixtral architecture's hyper-parameters, named as in Hugging Face's MixtralConfig (camelCase here).
 * GGUF keys (llama.*) and config.json fields both map onto this one shape.
 */
export interface MixtralConfig {
  vocabSize: number;
  hiddenSize: number; // model dim
  intermediateSize: number; // each expert's FFN width
  numHiddenLayers: number;
  numAttentionHeads: number;
  numKeyValueHeads: number;
  headDim: number; // usually hiddenSize / numAttentionHeads
  numLocalExperts: number; // experts per MoE layer (1 = dense FFN)
  numExpertsPerTok: number; // k of top-k
  rmsNormEps: number;
  ropeTheta: number;
  maxPositionEmbeddings: number; // context length
  slidingWindow: number | null; // key j visible from query i iff i - j < window (HF rule); null = full causal
  tieWordEmbeddings: boolean; // output head shares the embedding matrix
}

/** Checks a config for values the forward pass cannot run; returns a list of problems (empty when fine). */
export function configProblems(c: MixtralConfig): string[] {
  const p: string[] = [];
  const posInt = (name: keyof MixtralConfig) => {
    const v = c[name];
    if (typeof v !== 'number' || !Number.isInteger(v) || v <= 0) p.push(`${name} must be a positive integer, got ${String(v)}`);
  };
  for (const k of ['vocabSize', 'hiddenSize', 'intermediateSize', 'numHiddenLayers', 'numAttentionHeads', 'numKeyValueHeads', 'headDim', 'numLocalExperts', 'numExpertsPerTok', 'maxPositionEmbeddings'] as const) posInt(k);
  if (p.length) return p;
  if (c.numAttentionHeads % c.numKeyValueHeads !== 0) p.push(`numAttentionHeads ${c.numAttentionHeads} is not a multiple of numKeyValueHeads ${c.numKeyValueHeads}`);
  if (c.numExpertsPerTok > c.numLocalExperts) p.push(`numExpertsPerTok ${c.numExpertsPerTok} exceeds numLocalExperts ${c.numLocalExperts}`);
  if (c.headDim % 2 !== 0) p.push(`headDim ${c.headDim} must be even for RoPE`);
  if (!(c.rmsNormEps > 0)) p.push(`rmsNormEps must be > 0, got ${c.rmsNormEps}`);
  if (!(c.ropeTheta > 0)) p.push(`ropeTheta must be > 0, got ${c.ropeTheta}`);
  if (c.slidingWindow !== null && !(Number.isInteger(c.slidingWindow) && c.slidingWindow > 0)) p.push(`slidingWindow must be a positive integer or null, got ${c.slidingWindow}`);
  return p;
}

/** Total parameters and parameters touched per token (attention + norms + router + k experts + embedding row + head). */
export function parameterCounts(c: MixtralConfig): { total: number; active: number } {
  const d = c.hiddenSize;
  const attn = d * c.numAttentionHeads * c.headDim * 2 + d * c.numKeyValueHeads * c.headDim * 2;
  const expert = 3 * d * c.intermediateSize;
  const router = c.numLocalExperts > 1 ? d * c.numLocalExperts : 0;
  const norms = 2 * d;
  const layerTotal = attn + router + norms + c.numLocalExperts * expert;
  const layerActive = attn + router + norms + c.numExpertsPerTok * expert;
  const embed = c.vocabSize * d;
  const head = c.tieWordEmbeddings ? 0 : c.vocabSize * d;
  return {
    total: embed + head + d + c.numHiddenLayers * layerTotal,
    active: embed + head + d + c.numHiddenLayers * layerActive,
  };
}
