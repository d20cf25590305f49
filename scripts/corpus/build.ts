/**
 * Builds the committed corpus snapshot (data/corpus/) from Debian and npm packages. See README.md here.
 *
 *   npx tsc -p . && node dist/scripts/corpus/build.js [--cache DIR] [--out DIR] [--latest] [--val-fraction F]
 *
 * 1. fetch: `apt-get download pkg=version` + `dpkg-deb -x` and `npm install --prefix` into the cache directory
 *    (default ~/.cache/moe-ts/corpus-src), at the versions pinned in sources.ts (--latest: the current ones);
 * 2. extract each source's documents, clean and filter them (clean.ts, langid.ts), dedup per language;
 * 3. split each document by its hash, count bytes, lines and Mistral v1 tokens per split;
 * 4. write <out>/<lang>/<source>.txt.br, the license notices, LICENSES.md and manifest.json.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import {
  CORPUS_LANGUAGES,
  SPLITS,
  compressText,
  documentHash,
  formatDocuments,
  sha256Hex,
  splitOfHash,
  type SnapshotFile,
  type SnapshotManifest,
  type SnapshotSource,
  type Split,
  type SplitCounts,
} from '../../src/workflows/corpus.js';
import { mistralV1Tokenizer } from '../../src/tokenizer/sources.js';
import { cleanDocument, emptyStats, newSeen, type CleanStats } from './clean.js';
import { groffVersion } from './extract.js';
import type { Lang } from './langid.js';
import { DEBIAN_PINS, NPM_PINS, SOURCES, type SourceContext } from './sources.js';

const REPO = fileURLToPath(new URL('../../../', import.meta.url));
const BUILDER_VERSION = 1;

const log = (s: string) => process.stderr.write(s + '\n');

function run(cmd: string, args: string[], cwd?: string): string {
  return execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 64 << 20 });
}

function candidateVersion(pkg: string): string {
  const out = run('apt-cache', ['show', '--no-all-versions', pkg]);
  const v = /^Version: (.+)$/m.exec(out)?.[1];
  if (!v) throw new Error(`apt-cache knows no version of ${pkg} (run apt-get update?)`);
  return v.trim();
}

interface Fetched {
  ctx: SourceContext;
  debs: Record<string, { version: string; sha256: string }>;
  npm: Record<string, string>;
}

function fetchAll(cache: string, latest: boolean): Fetched {
  const debDir = path.join(cache, 'debs');
  const rootDir = path.join(cache, 'deb');
  const npmDir = path.join(cache, 'npm');
  fs.mkdirSync(debDir, { recursive: true });
  fs.mkdirSync(rootDir, { recursive: true });
  const debs: Fetched['debs'] = {};
  const roots: Record<string, string> = {};
  const wanted = [...new Set(SOURCES.flatMap((s) => s.debian ?? []))];
  for (const pkg of wanted) {
    const version = latest ? candidateVersion(pkg) : DEBIAN_PINS[pkg];
    if (!version) throw new Error(`no pinned version for ${pkg} in sources.ts`);
    // apt-get names files pkg_version_arch.deb with ":" written as "%3a".
    const prefix = `${pkg}_${version.replace(/:/g, '%3a')}_`;
    let deb = fs.readdirSync(debDir).find((f) => f.startsWith(prefix) && f.endsWith('.deb'));
    if (!deb) {
      log(`fetch: apt-get download ${pkg}=${version}`);
      try {
        run('apt-get', ['download', `${pkg}=${version}`], debDir);
      } catch (e) {
        throw new Error(`apt-get download ${pkg}=${version} failed (the pinned version may have left the archive: rerun with --latest and commit the new snapshot): ${(e as Error & { stderr?: string }).stderr ?? e}`);
      }
      deb = fs.readdirSync(debDir).find((f) => f.startsWith(prefix) && f.endsWith('.deb'));
      if (!deb) throw new Error(`apt-get download ${pkg}=${version} left no ${prefix}*.deb in ${debDir}`);
    }
    const file = path.join(debDir, deb);
    const root = path.join(rootDir, deb.replace(/\.deb$/, ''));
    if (!fs.existsSync(root)) {
      const tmp = `${root}.tmp`;
      fs.rmSync(tmp, { recursive: true, force: true });
      run('dpkg-deb', ['-x', file, tmp]);
      fs.renameSync(tmp, root);
    }
    roots[pkg] = root;
    debs[pkg] = { version, sha256: sha256Hex(fs.readFileSync(file)) };
  }

  const npmWanted = [...new Set(SOURCES.flatMap((s) => s.npm ?? []))];
  const installed = (pkg: string): string | undefined => {
    try {
      return (JSON.parse(fs.readFileSync(path.join(npmDir, 'node_modules', pkg, 'package.json'), 'utf8')) as { version: string }).version;
    } catch {
      return undefined;
    }
  };
  const specs = npmWanted.map((p) => (latest ? `${p}@latest` : `${p}@${NPM_PINS[p]}`));
  if (latest || npmWanted.some((p) => installed(p) !== NPM_PINS[p])) {
    fs.mkdirSync(npmDir, { recursive: true });
    log(`fetch: npm install --prefix ${npmDir} ${specs.join(' ')}`);
    run('npm', ['install', '--prefix', npmDir, '--no-save', '--ignore-scripts', '--no-audit', '--no-fund', ...specs]);
  }
  const npm: Record<string, string> = {};
  for (const p of npmWanted) {
    const v = installed(p);
    if (!v) throw new Error(`npm package ${p} is not in ${npmDir} after npm install`);
    npm[p] = v;
  }
  const ctx: SourceContext = {
    deb: (pkg) => {
      const r = roots[pkg];
      if (!r) throw new Error(`Debian package ${pkg} was not fetched`);
      return r;
    },
    npm: (pkg) => path.join(npmDir, 'node_modules', pkg),
  };
  return { ctx, debs, npm };
}

function zeroCounts(): SplitCounts {
  return { documents: 0, lines: 0, bytes: 0, tokens: 0 };
}

function main(): void {
  const { values } = parseArgs({
    options: {
      cache: { type: 'string', default: path.join(os.homedir(), '.cache/moe-ts/corpus-src') },
      out: { type: 'string', default: path.join(REPO, 'data/corpus') },
      latest: { type: 'boolean', default: false },
      'val-fraction': { type: 'string', default: '0.03' },
      'no-tokens': { type: 'boolean', default: false },
    },
  });
  const out = path.resolve(values.out!);
  const valFraction = Number(values['val-fraction']);
  if (!(valFraction > 0 && valFraction < 1)) throw new Error(`--val-fraction must be in (0, 1), got ${values['val-fraction']}`);
  const t0 = performance.now();
  const groff = groffVersion();
  const fetched = fetchAll(path.resolve(values.cache!), values.latest!);
  const tok = values['no-tokens'] ? undefined : mistralV1Tokenizer();

  fs.mkdirSync(out, { recursive: true });
  for (const lang of CORPUS_LANGUAGES) fs.rmSync(path.join(out, lang), { recursive: true, force: true });
  fs.rmSync(path.join(out, 'licenses'), { recursive: true, force: true });
  fs.mkdirSync(path.join(out, 'licenses'), { recursive: true });

  const files: SnapshotFile[] = [];
  const filterStats: Record<string, CleanStats> = {};
  for (const lang of CORPUS_LANGUAGES as readonly Lang[]) {
    const seen = newSeen();
    for (const src of SOURCES) {
      if (!src.languages.includes(lang)) continue;
      const stats = emptyStats();
      const docs: string[] = [];
      for (const raw of src.docs(fetched.ctx, lang)) {
        const text = cleanDocument(raw.lines, lang, seen, stats);
        if (text !== null) docs.push(text);
      }
      filterStats[`${lang}/${src.id}`] = stats;
      if (docs.length === 0) {
        log(`${lang}/${src.id}: no documents left after filtering`);
        continue;
      }
      const splits = { train: zeroCounts(), val: zeroCounts() } as Record<Split, SplitCounts>;
      for (const d of docs) {
        const c = splits[splitOfHash(documentHash(d), valFraction)];
        c.documents++;
        c.lines += d.split('\n').length;
        c.bytes += Buffer.byteLength(d, 'utf8');
        if (tok) c.tokens += tok.encode(d, { addBos: false }).length;
      }
      const text = formatDocuments(docs);
      const raw = Buffer.from(text, 'utf8');
      const comp = compressText(text);
      const rel = `${lang}/${src.id}.txt.br`;
      fs.mkdirSync(path.join(out, lang), { recursive: true });
      fs.writeFileSync(path.join(out, rel), comp);
      files.push({ path: rel, lang, source: src.id, sha256: sha256Hex(comp), text_sha256: sha256Hex(raw), compressed_bytes: comp.length, bytes: raw.length, splits });
      log(
        `${rel}: ${docs.length} docs, ${(raw.length / 1e6).toFixed(2)} MB text -> ${(comp.length / 1e6).toFixed(2)} MB, ` +
          `${splits.train.tokens + splits.val.tokens} tokens; kept ${stats.longKept} long + ${stats.shortKept} short lines of ${stats.linesIn} ` +
          `(${((performance.now() - t0) / 1000).toFixed(0)} s)`,
      );
    }
  }

  // License notices: each source's own, and the full license texts they refer to.
  const sources: SnapshotSource[] = [];
  const texts = new Set<string>();
  for (const src of SOURCES) {
    const used = files.filter((f) => f.source === src.id);
    if (!used.length) continue;
    const licenseFile = `licenses/${src.id}.txt`;
    fs.writeFileSync(path.join(out, licenseFile), src.notice(fetched.ctx));
    for (const t of src.licenseTexts) texts.add(t);
    sources.push({
      id: src.id,
      title: src.title,
      license: src.license,
      license_file: licenseFile,
      languages: [...new Set(used.map((f) => f.lang))],
      packages: [
        ...(src.debian ?? []).map((name) => ({ registry: 'debian' as const, name, version: fetched.debs[name]!.version, sha256: fetched.debs[name]!.sha256 })),
        ...(src.npm ?? []).map((name) => ({ registry: 'npm' as const, name, version: fetched.npm[name]! })),
      ],
    });
  }
  for (const t of [...texts].sort()) fs.copyFileSync(path.join('/usr/share/common-licenses', t), path.join(out, 'licenses', `${t}.txt`));

  const languages: Record<string, Record<Split, SplitCounts>> = {};
  for (const lang of CORPUS_LANGUAGES) {
    const c = { train: zeroCounts(), val: zeroCounts() } as Record<Split, SplitCounts>;
    for (const f of files.filter((x) => x.lang === lang)) {
      for (const s of SPLITS) for (const k of ['documents', 'lines', 'bytes', 'tokens'] as const) c[s][k] += f.splits[s][k];
    }
    languages[lang] = c;
  }
  const manifest: SnapshotManifest = {
    format: 'moe-ts-corpus',
    version: 1,
    description: 'Multilingual (en, fr, de, it, es) training text from Debian and npm packages; see LICENSES.md and scripts/corpus/README.md',
    builder: { script: 'scripts/corpus/build.ts', version: BUILDER_VERSION, groff, node: process.version },
    tokenizer: 'Mistral v1 (npm mistral-tokenizer-js 1.0.0), SentencePiece BPE; token counts exclude BOS/EOS',
    vocab_size: 32000,
    val_fraction: valFraction,
    split_rule: 'validation when the first 4 bytes of sha256(document UTF-8), big-endian uint32, are < val_fraction * 2^32',
    document_format: 'UTF-8 NFC text, brotli-compressed; documents separated by one empty line, lines by "\\n"',
    sources,
    languages,
    files,
    filter: filterStats,
  };
  fs.writeFileSync(path.join(out, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
  fs.writeFileSync(path.join(out, 'LICENSES.md'), licensesMarkdown(manifest, [...texts].sort()));
  const total = files.reduce((a, f) => a + f.compressed_bytes, 0);
  log(`wrote ${out}: ${files.length} files, ${(total / 1e6).toFixed(2)} MB compressed, in ${((performance.now() - t0) / 1000).toFixed(0)} s`);
}

function licensesMarkdown(m: SnapshotManifest, texts: string[]): string {
  const rows = m.sources.map((s) => {
    const pk = s.packages.map((p) => `${p.registry} \`${p.name}\` ${p.version}`).join('<br>');
    return `| ${s.title} | ${s.languages.join(', ')} | ${pk} | ${s.license} | [${s.license_file}](${s.license_file}) |`;
  });
  return [
    '# Licenses of the corpus text',
    '',
    'The text files under this directory are derived (extracted, cleaned, filtered, deduplicated) from the packages',
    'below; each file `<lang>/<source>.txt.br` comes from one source and is under that source\'s license. The notice',
    'of each source is copied verbatim from its package into `licenses/<source>.txt`; the full license texts it',
    `refers to are in ${texts.map((t) => `\`licenses/${t}.txt\``).join(', ')}.`,
    '',
    'The GPL sources (dasher, fortunes-de, fortunes-es, debian-reference, installation-guide, manpages) are',
    'distributed here in modified form: the changes are those made by `scripts/corpus/build.ts` (markup removed,',
    'lines in other languages and duplicates dropped, whitespace normalised), which regenerates these files from',
    'the unmodified packages. The corresponding sources are the Debian source packages of the versions listed.',
    '',
    '| source | languages | packages | license | notice |',
    '| --- | --- | --- | --- | --- |',
    ...rows,
    '',
  ].join('\n');
}

main();
