// The benchmark's model: a seeded random Mixtral-architecture model (dim 1024, 8 layers, 16 q-heads / 4 kv-heads of
// 64, ffn 3584, 8 experts top-2, Mistral v1 vocabulary of 32000; 791M parameters) written with the project's own
// GGUF writer in f16, q8_0 and q4_0. The same seed gives the same underlying weights in each type. Files are cached
// outside git ($MOE_CACHE_DIR or ~/.cache/moe-ts/bench-models/), keyed by the config, the seed and
// BENCH_MODEL_VERSION (bump it when the writer's output changes; `npm run bench -- --rewrite-models` forces new
// files), each with a sidecar JSON listing its tensors (for the bytes-per-token figures).
//
//   node scripts/bench-models.mjs --write <dtype> <path>   # internal: write one file (run as a child process)
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cacheRoot } from './bench-llama.mjs';
import { distDir, distImport } from './bench-dist.mjs';


/** The model (HF MixtralConfig field names, camelCase). */
export const BENCH_CONFIG = Object.freeze({
  vocabSize: 32000,
  hiddenSize: 1024,
  intermediateSize: 3584,
  numHiddenLayers: 8,
  numAttentionHeads: 16,
  numKeyValueHeads: 4,
  headDim: 64,
  numLocalExperts: 8,
  numExpertsPerTok: 2,
  rmsNormEps: 1e-5,
  ropeTheta: 1e6,
  maxPositionEmbeddings: 4096,
  slidingWindow: null,
  tieWordEmbeddings: false,
});
export const BENCH_SEED = 20240101;

/** Part of the cache key: bump when the writer's output for this model changes. */
export const BENCH_MODEL_VERSION = 1;

function cacheKey() {
  const h = createHash('sha256');
  h.update(JSON.stringify({ config: BENCH_CONFIG, seed: BENCH_SEED, version: BENCH_MODEL_VERSION }));
  return h.digest('hex').slice(0, 12);
}

/**
 * Returns { path, sidecar } for the bench model in `dtype`, writing it first if the cache lacks it (a child process;
 * about a minute per file). Older files of the same dtype (another cache key) are removed.
 */
export async function ensureBenchModel(dtype, { progress = (m) => process.stderr.write(m + '\n'), rewrite = false } = {}) {
  const dir = join(cacheRoot(), 'bench-models');
  mkdirSync(dir, { recursive: true });
  const base = `mixtral-d1024-l8-e8-${dtype}-${cacheKey()}`;
  const path = join(dir, `${base}.gguf`);
  const sidecarPath = join(dir, `${base}.json`);
  if (rewrite || !isComplete(path, sidecarPath)) {
    if (!existsSync(join(distDir(), 'src/workflows/random-model.js'))) throw new Error(`${distDir()} lacks src/workflows/random-model.js: build first (npx tsc -p .)`);
    for (const f of readdirSync(dir)) {
      if (f.startsWith(`mixtral-d1024-l8-e8-${dtype}-`)) rmSync(join(dir, f), { force: true });
    }
    progress(`writing the ${dtype} bench model with moe-ts's GGUF writer (about a minute): ${path}`);
    const t0 = Date.now();
    await new Promise((res, rej) => {
      const child = spawn(process.execPath, [fileURLToPath(import.meta.url), '--write', dtype, path, sidecarPath], { stdio: ['ignore', 'inherit', 'inherit'] });
      child.on('error', rej);
      child.on('close', (code) => (code === 0 ? res() : rej(new Error(`writing ${path} failed (exit ${code})`))));
    });
    progress(`  wrote ${(statSync(path).size / 1e9).toFixed(2)} GB in ${Math.round((Date.now() - t0) / 1000)}s`);
  }
  return { path, sidecar: JSON.parse(readFileSync(sidecarPath, 'utf8')) };
}

/** A cached file is used only when its sidecar (written last) says it is complete and the size matches. */
function isComplete(path, sidecarPath) {
  try {
    return JSON.parse(readFileSync(sidecarPath, 'utf8')).fileBytes === statSync(path).size;
  } catch {
    return false;
  }
}

async function writeOne(dtype, path, sidecarPath) {
  const { randomMixtralTensors } = await distImport('src/workflows/random-model.js');
  const { writeMixtralGGUF } = await distImport('src/formats/gguf-config.js');
  const { mistralV1Vocab } = await distImport('src/tokenizer/sources.js');
  const tensors = randomMixtralTensors(BENCH_CONFIG, BENCH_SEED, dtype);
  writeMixtralGGUF(path, { config: BENCH_CONFIG, tensors, vocab: mistralV1Vocab(), name: `moe-ts bench ${dtype}`, dtype });
  const list = [...tensors].map(([name, t]) => ({ name, dtype: t.dtype, shape: [...t.shape], bytes: t.data.byteLength }));
  writeFileSync(sidecarPath, JSON.stringify({ dtype, seed: BENCH_SEED, config: BENCH_CONFIG, fileBytes: statSync(path).size, tensors: list }, null, 1));
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url) && process.argv[2] === '--write') {
  const [dtype, path, sidecarPath] = process.argv.slice(3);
  writeOne(dtype, path, sidecarPath).catch((e) => {
    rmSync(path, { force: true });
    console.error(e.stack ?? String(e));
    process.exit(1);
  });
}
