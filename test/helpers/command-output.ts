/**
 * Runs an in-process CLI command (one of src/cli's `argv => Promise<void>` functions) with its stdout captured and
 * its stderr (progress and log lines) silenced; resolves to what it printed on stdout. The streams are restored
 * even when the command throws.
 */
export async function commandStdout(run: () => Promise<unknown>): Promise<string> {
  let stdout = '';
  const write = process.stdout.write.bind(process.stdout);
  const err = process.stderr.write.bind(process.stderr);
  process.stdout.write = ((s: string) => ((stdout += s), true)) as typeof process.stdout.write;
  process.stderr.write = (() => true) as typeof process.stderr.write;
  try {
    await run();
  } finally {
    process.stdout.write = write;
    process.stderr.write = err;
  }
  return stdout;
}

/** The JSON summary a command prints as its last stdout line (moe finetune, moe train). */
export function lastJsonLine(stdout: string): any {
  return JSON.parse(stdout.trim().split('\n').pop()!);
}
