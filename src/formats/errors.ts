/**
 * An error in an input file or checkpoint: names the file and the field or tensor at fault, so a user knows what
 * to fix. Everything that parses outside data throws this (never a RangeError from a DataView, never an
 * allocation sized by an unchecked header number).
 */
export class FormatError extends Error {
  constructor(
    readonly file: string,
    message: string,
  ) {
    super(`${file}: ${message}`);
    this.name = 'FormatError';
  }
}
