import { parseArgs, type ParseArgsConfig } from 'node:util';

/** A usage error: printed with the command's usage, exit code 2. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

type Options = NonNullable<ParseArgsConfig['options']>;

export function parse(argv: string[], options: Options, allowPositionals = false) {
  try {
    return parseArgs({ args: joinDashValues(argv, options), options, allowPositionals, strict: true });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

/**
 * parseArgs refuses "--max-tokens -1" and "--prompt -x" (the value looks like a flag) with a three-line
 * "ambiguous" message: pass such a value as "--opt=value" so the option's own check names it.
 */
function joinDashValues(argv: string[], options: Options): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--') return out.concat(argv.slice(i));
    const next = argv[i + 1];
    const opt = a.startsWith('--') && !a.includes('=') ? options[a.slice(2)] : undefined;
    if (opt?.type === 'string' && next !== undefined && next.startsWith('-') && !next.startsWith('--')) {
      out.push(`${a}=${next}`);
      i++;
    } else out.push(a);
  }
  return out;
}

export function intArg(name: string, v: string | undefined, def: number, min = 0): number {
  if (v === undefined) return def;
  // Number('') is 0 and 1e20 is an "integer": accept only safe integers written out.
  const n = v.trim() === '' ? NaN : Number(v);
  if (!Number.isSafeInteger(n) || n < min) throw new UsageError(`--${name} must be an integer >= ${min}, got '${v}'`);
  return n;
}

export function numArg(name: string, v: string | undefined, def: number, min = -Infinity, max = Infinity): number {
  if (v === undefined) return def;
  const n = v.trim() === '' ? NaN : Number(v);
  if (!Number.isFinite(n) || n < min || n > max) throw new UsageError(`--${name} must be a number in [${min}, ${max}], got '${v}'`);
  return n;
}

export function required(name: string, v: string | undefined): string {
  if (v === undefined || v === '') throw new UsageError(`--${name} is required`);
  return v;
}
