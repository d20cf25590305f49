/**
 * Writes test/fixtures/corpus/parallel.json: paragraphs that LibreOffice's help has in all five languages (same
 * page, same paragraph id), picked without the language filter (the first ones of at least 8 words in every
 * language, every 40th page), so the filter can be tested on text it did not select. Needs the source cache that
 * build.ts fills.
 *
 *   node dist/scripts/corpus/fixture.js [--cache DIR]
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { htmlBlocks, normalizeLine } from './extract.js';
import { LANGS, words, type Lang } from './langid.js';
import { DEBIAN_PINS } from './sources.js';

const REPO = fileURLToPath(new URL('../../../', import.meta.url));
const { values } = parseArgs({ options: { cache: { type: 'string', default: path.join(os.homedir(), '.cache/moe-ts/corpus-src') } } });
const codes: Record<Lang, [string, string]> = { en: ['en-us', 'en-US'], fr: ['fr', 'fr'], de: ['de', 'de'], it: ['it', 'it'], es: ['es', 'es'] };
const root = (l: Lang) => {
  const pkg = `libreoffice-help-${codes[l][0]}`;
  const dir = path.join(values.cache!, 'deb', `${pkg}_${DEBIAN_PINS[pkg]!.replace(/:/g, '%3a')}_all`);
  return path.join(dir, 'usr/share/libreoffice/help', codes[l][1], 'text');
};
const paras = (file: string): Map<string, string> => {
  const m = new Map<string, string>();
  if (!fs.existsSync(file)) return m;
  const html = fs.readFileSync(file, 'utf8');
  for (const x of html.matchAll(/<p id="(par_id\d+)"[^>]*>([\s\S]*?)<\/p>/g)) {
    const text = normalizeLine(htmlBlocks(x[2]!, { skip: (_t, a) => /\shidden(=|\s|$)/.test(a) && !/\sid="default/.test(a) }).join(' '));
    m.set(x[1]!, text);
  }
  return m;
};
const pages: string[] = [];
const walk = (d: string, rel: string) => {
  for (const e of fs.readdirSync(d, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
    if (e.isDirectory()) walk(path.join(d, e.name), path.join(rel, e.name));
    else if (e.name.endsWith('.html')) pages.push(path.join(rel, e.name));
  }
};
walk(root('en'), '');
const out: Record<string, string>[] = [];
for (let i = 0; i < pages.length && out.length < 40; i += 40) {
  const per = LANGS.map((l) => paras(path.join(root(l), pages[i]!)));
  for (const [id, en] of per[0]!) {
    const row: Record<string, string> = { page: pages[i]!, id };
    let ok = true;
    LANGS.forEach((l, k) => {
      const t = k === 0 ? en : per[k]!.get(id);
      if (!t || words(t).length < 8) ok = false;
      else row[l] = t;
    });
    // An untranslated paragraph is the English text again: not a sample of its language.
    if (ok && LANGS.slice(1).every((l) => row[l] !== en)) {
      out.push(row);
      break;
    }
  }
}
const file = path.join(REPO, 'test/fixtures/corpus/parallel.json');
fs.mkdirSync(path.dirname(file), { recursive: true });
fs.writeFileSync(file, JSON.stringify(out, null, 1) + '\n');
console.log(`wrote ${out.length} parallel paragraphs to ${file}`);
