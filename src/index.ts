// The library API of moe-ts.
export { loadModel, describeModel, LoadedModel, type LoadOptions } from './model/load.js';
export { MixtralModel, MixtralSession, route, type MixtralWeights } from './model/mixtral.js';
export { parameterCounts, configProblems, type MixtralConfig } from './model/config.js';
export { ContextOverflowError, type LanguageModel, type InferenceSession, type Tokenizer, type RouterTrace } from './model/types.js';
export { generate, generateStream, encodeChatPrompt, type GenerateOptions, type GenerationResult, type TokenEvent } from './workflows/generate.js';
export { Sampler, type SamplerOptions } from './workflows/sampling.js';
export { renderChat, type ChatMessage } from './workflows/chat-template.js';
export { convertHFToGGUF, convertGGUFToHF } from './workflows/convert.js';
export { readGGUF, parseGGUF, GGUFWriter, type GGUFFile } from './formats/gguf.js';
export { readSafetensors, writeSafetensors, readCheckpointTensors } from './formats/safetensors.js';
export { FormatError } from './formats/errors.js';
export { SentencePieceTokenizer, type VocabData } from './tokenizer/sentencepiece.js';
export { mistralV1Tokenizer } from './tokenizer/sources.js';
export { RefBackend } from './backend/ref.js';
export type { Backend } from './backend/backend.js';
export type { Tensor } from './tensor/tensor.js';
export type { DType } from './tensor/dtype.js';
