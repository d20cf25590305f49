/**
 * Cleaning one extracted document: normalise its lines, keep the lines in the document's language, drop lines
 * already seen in that language, and drop the document when little of it is in the language.
 *
 * Rules (langid.ts has the scorer):
 *  - every line is normalised (NFC, whitespace collapsed, control characters dropped); empty lines go;
 *  - a line of MIN_WORDS words or more stays only when identified as the document's language, and only the
 *    first time it is seen in that language (exact match after normalisation: boilerplate such as translator
 *    credits, navigation and repeated help snippets goes);
 *  - a shorter line (heading, attribution) stays when no other language outscores the document's on it and
 *    the line before or after it is a kept long line (runs of short lines are menus, label tables, lists);
 *  - a document stays when its kept long lines hold at least half of the words of its long lines identified as
 *    any language (so an untranslated English page in a French package goes as a whole), and it is not an
 *    exact duplicate of an earlier document.
 */
import { normalizeLine } from './extract.js';
import { scoreLine, shortLineFits, type Lang } from './langid.js';

export interface CleanStats {
  docsIn: number;
  docsKept: number;
  docsOtherLanguage: number;
  docsEmpty: number;
  docsDuplicate: number;
  linesIn: number;
  longKept: number;
  longOtherLanguage: number;
  longNotProse: number;
  longWeak: number;
  longAmbiguous: number;
  longDuplicate: number;
  shortKept: number;
  shortDropped: number;
}

export function emptyStats(): CleanStats {
  return {
    docsIn: 0, docsKept: 0, docsOtherLanguage: 0, docsEmpty: 0, docsDuplicate: 0, linesIn: 0, longKept: 0,
    longOtherLanguage: 0, longNotProse: 0, longWeak: 0, longAmbiguous: 0, longDuplicate: 0, shortKept: 0, shortDropped: 0,
  };
}

export interface Seen {
  lines: Set<string>;
  docs: Set<string>;
}

export function newSeen(): Seen {
  return { lines: new Set(), docs: new Set() };
}

/** The cleaned document text (lines joined by "\n"), or null when it is dropped. Updates `seen` and `stats`. */
export function cleanDocument(rawLines: readonly string[], lang: Lang, seen: Seen, stats: CleanStats): string | null {
  stats.docsIn++;
  const lines = rawLines.map(normalizeLine).filter((l) => l.length > 0);
  stats.linesIn += lines.length;
  // keep: a new long line in the language; short / shortDrop: a short line that fits / does not; drop: a long line not kept.
  const verdicts: ('keep' | 'short' | 'shortDrop' | 'drop')[] = [];
  let wordsKept = 0;
  let wordsOther = 0;
  const fresh = new Set<string>();
  for (const line of lines) {
    const s = scoreLine(line);
    if (s.reason === 'short') {
      verdicts.push(shortLineFits(line, lang) ? 'short' : 'shortDrop');
    } else if (s.reason === undefined && s.lang === lang) {
      wordsKept += s.words;
      if (seen.lines.has(line) || fresh.has(line)) {
        stats.longDuplicate++;
        verdicts.push('drop');
      } else {
        fresh.add(line);
        verdicts.push('keep');
      }
    } else {
      verdicts.push('drop');
      if (s.reason === undefined) {
        wordsOther += s.words;
        stats.longOtherLanguage++;
      } else if (s.reason === 'not-prose') stats.longNotProse++;
      else if (s.reason === 'weak') stats.longWeak++;
      else stats.longAmbiguous++;
    }
  }
  // A short line stays only beside a kept long line (a heading, an attribution): runs of short lines are lists,
  // tables of labels, menus.
  for (let i = 0; i < verdicts.length; i++) {
    if (verdicts[i] === 'short' && verdicts[i - 1] !== 'keep' && verdicts[i + 1] !== 'keep') verdicts[i] = 'shortDrop';
  }
  const shorts = verdicts.filter((v) => v === 'short').length;
  const shortsOut = verdicts.filter((v) => v === 'shortDrop').length;
  const drop = (why: 'docsOtherLanguage' | 'docsEmpty' | 'docsDuplicate'): null => {
    stats[why]++;
    stats.shortDropped += shorts + shortsOut;
    return null;
  };
  if (wordsKept === 0) return drop('docsEmpty');
  if (wordsKept < wordsOther) return drop('docsOtherLanguage');
  // Every long line in the language was seen before: nothing new.
  if (fresh.size === 0) return drop('docsDuplicate');
  const text = lines.filter((_, i) => verdicts[i] === 'keep' || verdicts[i] === 'short').join('\n');
  if (seen.docs.has(text)) return drop('docsDuplicate');
  seen.docs.add(text);
  for (const l of fresh) seen.lines.add(l);
  stats.longKept += fresh.size;
  stats.shortKept += shorts;
  stats.shortDropped += shortsOut;
  stats.docsKept++;
  return text;
}
