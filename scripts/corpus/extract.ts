/**
 * Text extraction and normalisation for the corpus builder: HTML to text blocks, fortune files, man pages
 * (rendered by groff), the tagged Brown corpus, and the line normaliser every source goes through.
 */
import { spawnSync } from 'node:child_process';
import { gunzipSync } from 'node:zlib';

// ---------------------------------------------------------------------------------------------------------------
// Normalisation

/**
 * One line of corpus text: Unicode NFC; control characters, zero-width characters, soft hyphens and BOMs removed;
 * every run of whitespace (tabs, no-break spaces, ...) one space; trimmed.
 */
export function normalizeLine(s: string): string {
  return s
    .normalize('NFC')
    .replace(/[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u00ad\u200b-\u200d\u2060\ufeff\ufffe\uffff]/g, '')
    .replace(/[\s\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+/gu, ' ')
    .trim();
}

/** UTF-8 when the bytes are valid UTF-8, else Windows-1252 (old fortune files are Latin-1). */
export function decodeText(bytes: Uint8Array): string {
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    return new TextDecoder('windows-1252').decode(bytes);
  }
}

export function maybeGunzip(bytes: Uint8Array): Uint8Array {
  return bytes[0] === 0x1f && bytes[1] === 0x8b ? gunzipSync(bytes) : bytes;
}

// ---------------------------------------------------------------------------------------------------------------
// HTML

const ENTITIES: Record<string, string> = {
  amp: '&', lt: '<', gt: '>', quot: '"', apos: "'", nbsp: ' ', ndash: '–', mdash: '—', hellip: '…',
  laquo: '«', raquo: '»', lsquo: '‘', rsquo: '’', ldquo: '“', rdquo: '”', sbquo: '‚', bdquo: '„',
  copy: '©', reg: '®', trade: '™', deg: '°', times: '×', middot: '·', bull: '•', euro: '€', shy: '',
  rarr: '→', larr: '←', hArr: '⇔', rArr: '⇒', minus: '−', le: '≤', ge: '≥', ne: '≠', zwsp: '',
};

export function decodeEntities(s: string): string {
  return s.replace(/&(#x[0-9a-fA-F]+|#[0-9]+|[a-zA-Z][a-zA-Z0-9]*);/g, (m, e: string) => {
    if (e[0] === '#') {
      const cp = e[1] === 'x' || e[1] === 'X' ? parseInt(e.slice(2), 16) : parseInt(e.slice(1), 10);
      return cp > 0 && cp <= 0x10ffff && !(cp >= 0xd800 && cp <= 0xdfff) ? String.fromCodePoint(cp) : '';
    }
    return ENTITIES[e] ?? m;
  });
}

const VOID = new Set(['area', 'base', 'br', 'col', 'embed', 'hr', 'img', 'input', 'link', 'meta', 'param', 'source', 'track', 'wbr']);
const BLOCK = new Set([
  'p', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'li', 'dt', 'dd', 'td', 'th', 'tr', 'div', 'table', 'ul', 'ol', 'dl',
  'caption', 'blockquote', 'section', 'br', 'header', 'footer', 'figure', 'figcaption', 'title', 'body', 'html', 'hr',
]);
/** Elements whose text is not prose: scripts, styles, preformatted blocks (program listings, terminal output). */
const SKIP = new Set(['script', 'style', 'head', 'pre', 'noscript', 'svg', 'math', 'object', 'template']);

export interface HtmlOptions {
  /** Extra elements to skip, by their opening tag's attributes (e.g. DocBook navigation: class="navheader"). */
  skip?: (tag: string, attrs: string) => boolean;
}

/**
 * The text blocks (paragraphs, headings, list items, table cells) of an HTML document, in order, with markup
 * dropped and entities decoded. Not a full HTML parser: enough for the generated, well-formed pages used here.
 */
export function htmlBlocks(html: string, opts: HtmlOptions = {}): string[] {
  const blocks: string[] = [];
  let buf = '';
  const flush = () => {
    const t = decodeEntities(buf).replace(/\s+/g, ' ').trim();
    if (t) blocks.push(t);
    buf = '';
  };
  const stack: string[] = [];
  let skipDepth = -1; // stack depth at which a skipped element opened, or -1
  const re = /<!--[\s\S]*?-->|<!\[CDATA\[[\s\S]*?\]\]>|<![^>]*>|<\?[^>]*>|<(\/?)([a-zA-Z][a-zA-Z0-9]*)((?:[^>"']|"[^"]*"|'[^']*')*)>/g;
  let last = 0;
  for (let m = re.exec(html); m; m = re.exec(html)) {
    if (skipDepth < 0) buf += html.slice(last, m.index);
    last = re.lastIndex;
    const name = m[2]?.toLowerCase();
    if (!name) continue; // comment, doctype
    const closing = m[1] === '/';
    const attrs = m[3] ?? '';
    if (closing) {
      const at = stack.lastIndexOf(name);
      if (at < 0) continue; // stray close tag
      stack.length = at;
      if (skipDepth >= 0 && stack.length <= skipDepth) skipDepth = -1;
      else if (skipDepth < 0 && BLOCK.has(name)) flush();
      continue;
    }
    if (skipDepth < 0 && BLOCK.has(name)) flush();
    if (VOID.has(name) || attrs.trimEnd().endsWith('/')) continue;
    if (skipDepth < 0 && (SKIP.has(name) || opts.skip?.(name, attrs))) skipDepth = stack.length;
    stack.push(name);
  }
  if (skipDepth < 0) buf += html.slice(last);
  flush();
  return blocks;
}

// ---------------------------------------------------------------------------------------------------------------
// Fortune files

/** The fortunes of a strfile source: entries separated by lines holding only "%"; each entry's lines. */
export function fortunes(text: string): string[][] {
  const out: string[][] = [];
  let cur: string[] = [];
  const end = () => {
    while (cur.length && !cur[cur.length - 1]!.trim()) cur.pop();
    if (cur.some((l) => l.trim())) out.push(cur);
    cur = [];
  };
  for (const line of text.replace(/\r\n?/g, '\n').split('\n')) {
    if (line === '%') end();
    else cur.push(line);
  }
  end();
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Man pages

export function groffVersion(): string {
  const r = spawnSync('groff', ['--version'], { encoding: 'utf8' });
  if (r.error || r.status !== 0) throw new Error(`groff is needed to render man pages (Debian package groff-base): ${r.error?.message ?? r.stderr}`);
  return r.stdout.split('\n')[0]!.trim();
}

/**
 * The text lines of a man page, rendered by groff with lines so long that every paragraph is one line, no
 * hyphenation and no overstriking; the running header and footer are dropped. Returns null for a page that only
 * includes another (".so").
 */
export function renderManPage(source: Uint8Array): string[] | null {
  const roff = maybeGunzip(source);
  const head = new TextDecoder('latin1').decode(roff.subarray(0, 200));
  if (/^\.so\s/m.test(head) && roff.length < 200) return null;
  const r = spawnSync('groff', ['-k', '-t', '-mandoc', '-Tutf8', '-rLL=5000n', '-rHY=0', '-P-cbou'], {
    input: roff,
    maxBuffer: 64 << 20,
    encoding: 'utf8',
  });
  if (r.error) throw r.error;
  const lines = r.stdout.split('\n');
  // The first and last non-empty lines are the page's running header and footer ("LS(1)  ...  LS(1)").
  const nonEmpty = lines.map((l, i) => (l.trim() ? i : -1)).filter((i) => i >= 0);
  if (nonEmpty.length < 3) return [];
  return lines.slice(nonEmpty[0]! + 1, nonEmpty[nonEmpty.length - 1]!);
}

// ---------------------------------------------------------------------------------------------------------------
// Brown corpus

/**
 * The sentences of a Brown corpus file (word/tag tokens, one sentence per tab-indented line), detokenised: tags
 * dropped, `` and '' turned into quotes, no space before closing punctuation or after opening brackets.
 */
export function brownSentences(text: string): string[] {
  const out: string[] = [];
  for (const raw of text.split('\n')) {
    const toks = raw.trim().split(/\s+/).filter(Boolean);
    if (!toks.length) continue;
    let s = '';
    let glueNext = false;
    for (const t of toks) {
      const slash = t.lastIndexOf('/');
      let w = slash > 0 ? t.slice(0, slash) : t;
      if (w === '``') {
        w = '"';
        s += (s && !glueNext ? ' ' : '') + w;
        glueNext = true;
        continue;
      }
      if (w === "''") {
        s += '"';
        glueNext = false;
        continue;
      }
      const closing = /^[.,;:!?)\]}%]+$/.test(w) || /^'(s|re|ve|ll|d|m|t)?$/i.test(w) || w === "n't";
      if (s && !glueNext && !closing) s += ' ';
      s += w;
      glueNext = /^[([{$]$/.test(w);
    }
    out.push(s);
  }
  return out;
}
