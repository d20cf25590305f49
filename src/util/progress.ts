// A one-line progress display on stderr for slow work (loading, converting, quantizing):
//   quantizing model.gguf  42% 1.21/2.87 GB  310 MB/s  ETA 5s
// Drawn in place on a TTY, throttled; silent when stderr is not a TTY (logs and pipes stay clean) unless forced with
// `force: true` or MOE_PROGRESS=1, in which case plain lines are written at most every few seconds. MOE_PROGRESS=0
// silences it everywhere.

export type ProgressUnit = 'bytes' | 'items';

export interface ProgressOptions {
  /** What is being done, e.g. "loading model.gguf". */
  label: string;
  /** Total amount of work in `unit`s (0 or unknown: no percent / ETA). */
  total: number;
  unit?: ProgressUnit;
  /** Name of the items for unit 'items' (default "items"). */
  itemName?: string;
  /** Draw even when the stream is not a TTY. */
  force?: boolean;
  /** Where to draw (default process.stderr). */
  stream?: ProgressStream;
  /** Clock in milliseconds (default performance.now); injectable for tests. */
  now?: () => number;
}

/** The part of a stream Progress needs (process.stderr satisfies it). */
export interface ProgressStream {
  write(s: string): unknown;
  readonly isTTY?: boolean;
  readonly columns?: number;
}

const TTY_INTERVAL_MS = 100;
const LOG_INTERVAL_MS = 5000;

export function formatBytes(n: number): string {
  if (n < 1e3) return `${Math.round(n)} B`;
  if (n < 1e6) return `${(n / 1e3).toFixed(1)} kB`;
  if (n < 1e9) return `${(n / 1e6).toFixed(1)} MB`;
  return `${(n / 1e9).toFixed(2)} GB`;
}

export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '?';
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

/** The text of one progress line (no control characters). `elapsedMs` is the time since the start. */
export function formatProgressLine(label: string, done: number, total: number, elapsedMs: number, unit: ProgressUnit = 'bytes', itemName = 'items'): string {
  const parts = [label];
  const clamped = total > 0 ? Math.min(done, total) : done;
  if (total > 0) parts.push(`${String(Math.floor((clamped / total) * 100)).padStart(3)}%`);
  const amount = (n: number) => (unit === 'bytes' ? formatBytes(n) : String(Math.round(n)));
  parts.push(total > 0 ? `${amount(clamped)}/${amount(total)}${unit === 'items' ? ` ${itemName}` : ''}` : `${amount(clamped)}${unit === 'items' ? ` ${itemName}` : ''}`);
  const seconds = elapsedMs / 1000;
  if (seconds > 0 && clamped > 0) {
    const rate = clamped / seconds;
    parts.push(unit === 'bytes' ? `${formatBytes(rate)}/s` : `${rate >= 10 ? Math.round(rate) : rate.toFixed(1)} ${itemName}/s`);
    if (total > 0 && clamped < total) parts.push(`ETA ${formatDuration((total - clamped) / rate)}`);
  }
  if (total > 0 && clamped >= total) parts.push(`in ${formatDuration(seconds)}`);
  return parts.join('  ');
}

/** Whether a progress display would draw on `stream` (TTY, or forced; MOE_PROGRESS=0/1 overrides). */
export function progressEnabled(stream: ProgressStream = process.stderr, force = false): boolean {
  const env = process.env.MOE_PROGRESS;
  if (env === '0') return false;
  if (env === '1' || force) return true;
  return stream.isTTY === true;
}

export class Progress {
  readonly active: boolean;
  private readonly stream: ProgressStream;
  private readonly tty: boolean;
  private readonly now: () => number;
  private readonly start: number;
  private lastDraw = -Infinity;
  private doneAmount = 0;
  private finished = false;
  private total: number;
  private detail = '';

  constructor(private readonly opts: ProgressOptions) {
    this.stream = opts.stream ?? process.stderr;
    this.active = progressEnabled(this.stream, opts.force === true);
    this.tty = this.stream.isTTY === true;
    this.now = opts.now ?? (() => performance.now());
    this.start = this.now();
    this.total = opts.total;
  }

  /** Sets the amount done so far (absolute); `detail` (e.g. a training step's loss) is shown after the figures. */
  update(done: number, detail?: string): void {
    this.doneAmount = done;
    if (detail !== undefined) this.detail = detail;
    if (!this.active || this.finished) return;
    const t = this.now();
    if (t - this.lastDraw < (this.tty ? TTY_INTERVAL_MS : LOG_INTERVAL_MS)) return;
    this.draw(t, false);
  }

  /** Adds `n` to the amount done. */
  tick(n = 1): void {
    this.update(this.doneAmount + n);
  }

  /** Changes the total (when it becomes known late). */
  setTotal(total: number): void {
    this.total = total;
  }

  /** Draws the final state and ends the line. Calling it again does nothing. */
  finish(): void {
    if (this.finished) return;
    if (this.active) {
      if (this.total > 0) this.doneAmount = this.total;
      this.draw(this.now(), true);
    }
    this.finished = true;
  }

  /** Ends the display where it stands (work failed or was cut short): the line is kept, not completed. */
  abandon(): void {
    if (this.finished) return;
    if (this.active && this.tty && this.lastDraw !== -Infinity) this.stream.write('\n');
    this.finished = true;
  }

  private draw(t: number, final: boolean): void {
    this.lastDraw = t;
    let line = formatProgressLine(this.opts.label, this.doneAmount, this.total, t - this.start, this.opts.unit ?? 'bytes', this.opts.itemName) + (this.detail ? `  ${this.detail}` : '');
    if (this.tty) {
      const cols = this.stream.columns ?? 0;
      if (cols > 1 && line.length > cols - 1) line = line.slice(0, cols - 1);
      this.stream.write(`\r${line}\x1b[K${final ? '\n' : ''}`);
    } else {
      this.stream.write(`${line}\n`);
    }
  }
}

/** Runs `fn` with a progress display that is finished afterwards (also on error, without claiming completion). */
export function withProgress<T>(opts: ProgressOptions, fn: (p: Progress) => T): T {
  const p = new Progress(opts);
  let ok = false;
  try {
    const r = fn(p);
    ok = true;
    return r;
  } finally {
    if (ok) p.finish();
    else p.abandon();
  }
}
