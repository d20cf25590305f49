// The `moe` command line. Each command parses its flags, loads what it needs, and prints a clear error
// (exit 1 for bad input files, 2 for usage) rather than a stack trace.

import { FormatError } from '../formats/errors.js';
import { ContextOverflowError } from '../model/types.js';
import { UsageError } from './args.js';
import { commands } from './commands.js';

const USAGE = `moe — Mixture-of-Experts (Mixtral) engine in TypeScript

Usage: moe <command> [options]       (<m> is a GGUF file or a Hugging Face checkpoint directory)

  inspect <m>                              architecture, shapes, dtypes, parameter counts, tokenizer
  generate --model <m> --prompt <text>     stream a continuation
           [--chat] [--max-tokens N] [--temperature T] [--top-k K] [--top-p P] [--min-p P]
           [--repeat-penalty R] [--seed S] [--threads N] [--backend auto|native|ref] [--ctx N]
           [--kv-cache f32|f16] [--json]
  chat --model <m> [sampling options]      interactive chat (one user turn per stdin line when piped)
  logits --model <m> --tokens <id,id,...>  raw logits, one row per input position (no BOS added)
  tokenize --model <m> [--no-bos] [--jsonl]  tokenize stdin
  convert <in> <out> [--type f32|f16|bf16|q8_0|q4_0]   HF directory <-> GGUF
  quantize <in.gguf> <out.gguf> --type q8_0|q4_0|q4_k|q5_k|q6_k|q4_k_m|... [--dry-run]
                                           llama-quantize's tensor-type rules, byte-identical output
  data build --out <dir>                   tokenize the bundled multilingual corpus into shards
  data instruct --out <dir> [--seed N] [--per-task N]   FLAN-style instruction data (held-out tasks apart)
  train --config <preset|json> --data <dir> --out <dir> [--steps N] [--resume]
                                           train an MoE (or dense) model; checkpoints, loss curves, load heatmap
  finetune --model <m|train-out> --data <instruct-dir> --out <dir> [--mode full|router-frozen|experts-frozen|lora]
           [--lora-rank 8] [--lora-alpha 16] [--lora-targets attn,experts]
           [--tasks a,b] [--steps N] [--lr X] [--batch N] [--seq-len N] [--resume]
                                           instruction-tune / fine-tune (loss on answer tokens only); HF + GGUF export
  finetune --merge-adapter <adapter-dir> --model <m> --out <dir>   merge a (PEFT) LoRA adapter; HF + GGUF export
  eval --model <m> --data <dir> [--window N] [--json]   perplexity per language on the validation shards
  eval-tasks --model <m> --tasks <instruct-dir> [--split heldout|val|train|<file.jsonl>] [--limit N]
           [--max-tokens N] [--parallel N] [--json] [--threads N] [--backend auto|native|ref]
                                           exact match per task and language (greedy, chat template)
  serve [--model <m>] [--host 127.0.0.1] [--port 8080] [--api-key K] [--parallel N] [--max-queue N] [--ctx N]
        [--kv-cache f32|f16]
                                           OpenAI-compatible HTTP API and the playground at /
  start                                    chat with the default model (what \`npm start\` runs)
`;

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (!cmd || cmd === '--help' || cmd === '-h' || cmd === 'help') {
    process.stdout.write(USAGE);
    return cmd ? 0 : 2;
  }
  const run = commands[cmd];
  if (!run) {
    process.stderr.write(`moe: unknown command '${cmd}'\n\n${USAGE}`);
    return 2;
  }
  try {
    await run(rest);
    return 0;
  } catch (e) {
    if (e instanceof UsageError) {
      process.stderr.write(`moe ${cmd}: ${e.message}\n(run 'moe --help' for usage)\n`);
      return 2;
    }
    if (e instanceof FormatError || e instanceof ContextOverflowError) {
      process.stderr.write(`moe ${cmd}: ${e.message}\n`);
      return 1;
    }
    const err = e as NodeJS.ErrnoException;
    if (err && (err.code === 'ENOENT' || err.code === 'EACCES' || err.code === 'EISDIR' || err.code === 'ENOTDIR')) {
      process.stderr.write(`moe ${cmd}: ${err.message}\n`);
      return 1;
    }
    if (err && err.code === 'EPIPE') return 0;
    process.stderr.write(`moe ${cmd}: ${err?.message ?? String(e)}\n`);
    if (process.env.MOE_DEBUG) process.stderr.write(`${err?.stack}\n`);
    return 1;
  }
}

process.stdout.on('error', (e: NodeJS.ErrnoException) => {
  if (e.code === 'EPIPE') process.exit(0);
});

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
