/**
 * Builds the committed instruction-tuning material snapshot (data/instruct/) from Debian and npm packages, the
 * way scripts/corpus/build.ts builds data/corpus/. `moe data instruct` (src/workflows/instruct.ts) turns it into
 * FLAN-style examples and token shards.
 *
 *   npx tsc -p . && node dist/scripts/instruct/build.js [--cache DIR] [--corpus-cache DIR] [--out DIR]
 *
 * 1. fetch: `apt-get download pkg=version` + `dpkg-deb -x`, `npm install --prefix <cache>/npm --no-save
 *    --ignore-scripts pkg@version` (never the project's package.json), at the versions pinned below. The
 *    LibreOffice help packages are the corpus builder's (same pins): they are taken from its cache when present.
 * 2. extract each material (sources.ts) into a compact JSON value;
 * 3. write <out>/<material>.json.br (brotli), licenses/<source>.txt, LICENSES.md and manifest.json.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { compressText, sha256Hex } from '../../src/workflows/corpus.js';
import type { InstructManifest, InstructMaterialFile, InstructSource } from '../../src/workflows/instruct.js';
import { INSTRUCT_DEBIAN_PINS, INSTRUCT_NPM_PINS, MATERIALS, type FetchContext } from './sources.js';

const REPO = fileURLToPath(new URL('../../../', import.meta.url));
const BUILDER_VERSION = 1;
const log = (s: string) => process.stderr.write(s + '\n');

function run(cmd: string, args: string[], cwd?: string): string {
  return execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 64 << 20 });
}

interface Fetched {
  ctx: FetchContext;
  debs: Record<string, { version: string; sha256: string }>;
  npm: Record<string, string>;
}

// The fetch step follows scripts/corpus/build.ts fetchAll (which is private to that script and runs main() on
// import, so it cannot be imported): same cache layout, same pin handling, plus a second cache to look in.
function fetchAll(cache: string, corpusCache: string): Fetched {
  const debDir = path.join(cache, 'debs');
  const rootDir = path.join(cache, 'deb');
  const npmDir = path.join(cache, 'npm');
  fs.mkdirSync(debDir, { recursive: true });
  fs.mkdirSync(rootDir, { recursive: true });
  const debs: Fetched['debs'] = {};
  const roots: Record<string, string> = {};
  const wanted = [...new Set(MATERIALS.flatMap((m) => m.debian ?? []))];
  for (const pkg of wanted) {
    const version = INSTRUCT_DEBIAN_PINS[pkg];
    if (!version) throw new Error(`no pinned version for ${pkg} in scripts/instruct/sources.ts`);
    const prefix = `${pkg}_${version.replace(/:/g, '%3a')}_`;
    let found: { file: string; root: string } | undefined;
    for (const c of [cache, corpusCache]) {
      const dd = path.join(c, 'debs');
      const deb = fs.existsSync(dd) ? fs.readdirSync(dd).find((f) => f.startsWith(prefix) && f.endsWith('.deb')) : undefined;
      if (deb) {
        found = { file: path.join(dd, deb), root: path.join(c, 'deb', deb.replace(/\.deb$/, '')) };
        break;
      }
    }
    if (!found) {
      log(`fetch: apt-get download ${pkg}=${version}`);
      try {
        run('apt-get', ['download', `${pkg}=${version}`], debDir);
      } catch (e) {
        throw new Error(`apt-get download ${pkg}=${version} failed (run apt-get update; the pin may have left the archive): ${(e as Error & { stderr?: string }).stderr ?? e}`);
      }
      const deb = fs.readdirSync(debDir).find((f) => f.startsWith(prefix) && f.endsWith('.deb'));
      if (!deb) throw new Error(`apt-get download ${pkg}=${version} left no ${prefix}*.deb in ${debDir}`);
      found = { file: path.join(debDir, deb), root: path.join(rootDir, deb.replace(/\.deb$/, '')) };
    }
    if (!fs.existsSync(found.root)) {
      const tmp = `${found.root}.tmp`;
      fs.rmSync(tmp, { recursive: true, force: true });
      run('dpkg-deb', ['-x', found.file, tmp]);
      fs.renameSync(tmp, found.root);
    }
    roots[pkg] = found.root;
    debs[pkg] = { version, sha256: sha256Hex(fs.readFileSync(found.file)) };
  }
  const npmWanted = [...new Set(MATERIALS.flatMap((m) => m.npm ?? []))];
  const installed = (pkg: string): string | undefined => {
    try {
      return (JSON.parse(fs.readFileSync(path.join(npmDir, 'node_modules', pkg, 'package.json'), 'utf8')) as { version: string }).version;
    } catch {
      return undefined;
    }
  };
  if (npmWanted.some((p) => installed(p) !== INSTRUCT_NPM_PINS[p])) {
    const specs = npmWanted.map((p) => `${p}@${INSTRUCT_NPM_PINS[p]}`);
    fs.mkdirSync(npmDir, { recursive: true });
    log(`fetch: npm install --prefix ${npmDir} ${specs.join(' ')}`);
    run('npm', ['install', '--prefix', npmDir, '--no-save', '--ignore-scripts', '--no-audit', '--no-fund', ...specs]);
  }
  const npm: Record<string, string> = {};
  for (const p of npmWanted) {
    const v = installed(p);
    if (v !== INSTRUCT_NPM_PINS[p]) throw new Error(`npm package ${p} in ${npmDir} is ${v ?? 'missing'}, not the pinned ${INSTRUCT_NPM_PINS[p]}`);
    npm[p] = v!;
  }
  const ctx: FetchContext = {
    deb: (pkg) => {
      const r = roots[pkg];
      if (!r) throw new Error(`Debian package ${pkg} was not fetched`);
      return r;
    },
    npm: (pkg) => path.join(npmDir, 'node_modules', pkg),
  };
  return { ctx, debs, npm };
}

function main(): void {
  const { values } = parseArgs({
    options: {
      cache: { type: 'string', default: path.join(os.homedir(), '.cache/moe-ts/instruct-src') },
      'corpus-cache': { type: 'string', default: path.join(os.homedir(), '.cache/moe-ts/corpus-src') },
      out: { type: 'string', default: path.join(REPO, 'data/instruct') },
    },
  });
  const out = path.resolve(values.out!);
  const t0 = performance.now();
  const fetched = fetchAll(path.resolve(values.cache!), path.resolve(values['corpus-cache']!));
  fs.rmSync(path.join(out, 'licenses'), { recursive: true, force: true });
  fs.mkdirSync(path.join(out, 'licenses'), { recursive: true });

  const files: InstructMaterialFile[] = [];
  const sources: InstructSource[] = [];
  const texts = new Set<string>();
  for (const m of MATERIALS) {
    const value = m.extract(fetched.ctx);
    const text = JSON.stringify(value);
    const raw = Buffer.from(text, 'utf8');
    const comp = compressText(text);
    const rel = `${m.id}.json.br`;
    fs.writeFileSync(path.join(out, rel), comp);
    const items = m.count(value);
    files.push({ path: rel, material: m.id, sha256: sha256Hex(comp), text_sha256: sha256Hex(raw), compressed_bytes: comp.length, bytes: raw.length, items });
    const licenseFile = `licenses/${m.id}.txt`;
    fs.writeFileSync(path.join(out, licenseFile), m.notice(fetched.ctx));
    for (const t of m.licenseTexts) texts.add(t);
    sources.push({
      id: m.id,
      title: m.title,
      license: m.license,
      license_file: licenseFile,
      packages: [
        ...(m.debian ?? []).map((name) => ({ registry: 'debian' as const, name, version: fetched.debs[name]!.version, sha256: fetched.debs[name]!.sha256 })),
        ...(m.npm ?? []).map((name) => ({ registry: 'npm' as const, name, version: fetched.npm[name]! })),
      ],
    });
    log(`${rel}: ${JSON.stringify(items)}, ${(raw.length / 1e6).toFixed(2)} MB -> ${(comp.length / 1e6).toFixed(2)} MB (${((performance.now() - t0) / 1000).toFixed(0)} s)`);
  }
  for (const t of [...texts].sort()) fs.copyFileSync(path.join('/usr/share/common-licenses', t), path.join(out, 'licenses', `${t}.txt`));
  const manifest: InstructManifest = {
    format: 'moe-ts-instruct-material',
    version: 1,
    description: 'Material for FLAN-style instruction examples (en, fr, de, it, es); see LICENSES.md and docs/instruct-data.md',
    builder: { script: 'scripts/instruct/build.ts', version: BUILDER_VERSION, node: process.version },
    sources,
    files,
  };
  fs.writeFileSync(path.join(out, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
  fs.writeFileSync(path.join(out, 'LICENSES.md'), licensesMarkdown(manifest, [...texts].sort()));
  const total = files.reduce((a, f) => a + f.compressed_bytes, 0);
  log(`wrote ${out}: ${files.length} files, ${(total / 1e6).toFixed(2)} MB compressed, in ${((performance.now() - t0) / 1000).toFixed(0)} s`);
}

function licensesMarkdown(m: InstructManifest, texts: string[]): string {
  const rows = m.sources.map((s) => {
    const pk = s.packages.map((p) => `${p.registry} \`${p.name}\` ${p.version}`).join('<br>');
    return `| ${s.title} | \`${s.id}.json.br\` | ${pk} | ${s.license} | [${s.license_file}](${s.license_file}) |`;
  });
  return [
    '# Licenses of the instruction-tuning material',
    '',
    'Each file `<material>.json.br` here is extracted (selected, reformatted) from the packages in its row and is',
    'under that source\'s license. Each notice is copied verbatim from its package into `licenses/<material>.txt`;',
    `the full license texts referred to are in ${texts.map((t) => `\`licenses/${t}.txt\``).join(', ')}.`,
    'The GPL material is distributed in modified form: the changes are those made by `scripts/instruct/build.ts`,',
    'which regenerates these files from the unmodified packages (the corresponding sources are the Debian source',
    'packages and npm packages of the versions listed).',
    '',
    '| source | file | packages | license | notice |',
    '| --- | --- | --- | --- | --- |',
    ...rows,
    '',
  ].join('\n');
}

main();
