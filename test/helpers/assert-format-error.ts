import assert from 'node:assert/strict';
import { FormatError } from '../../src/formats/errors.js';

/** Runs fn, asserts it throws a FormatError whose message holds every mention; returns the error. */
export function assertFormatError(fn: () => unknown, ...mentions: (string | RegExp)[]): FormatError {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof FormatError, `expected a FormatError, got ${err === undefined ? 'no error' : String(err)}`);
  for (const m of mentions) {
    if (typeof m === 'string') assert.ok(err.message.includes(m), `message ${JSON.stringify(err.message)} lacks ${JSON.stringify(m)}`);
    else assert.match(err.message, m);
  }
  return err;
}
