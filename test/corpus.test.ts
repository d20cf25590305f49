import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  CORPUS_LANGUAGES,
  SHARD_HEADER_BYTES,
  ShardWriter,
  buildShards,
  compressText,
  documentHash,
  formatDocuments,
  listShards,
  parseDocuments,
  readManifest,
  readShard,
  readShards,
  readSnapshotText,
  sha256Hex,
  splitDocuments,
  splitOf,
  type SnapshotManifest,
} from '../src/workflows/corpus.js';
import { mistralV1Tokenizer } from '../src/tokenizer/sources.js';
import { LANGS, MIN_WORDS, identify, isLanguage, words, type Lang } from '../scripts/corpus/langid.js';
import { cleanDocument, emptyStats, newSeen } from '../scripts/corpus/clean.js';
import { brownSentences, decodeText, fortunes, htmlBlocks, normalizeLine } from '../scripts/corpus/extract.js';
import { assertFormatError } from './helpers/assert-format-error.js';
import { rng } from './gguf-helpers.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const SNAPSHOT = path.join(ROOT, 'data/corpus');
const tmpDirs: string[] = [];
const tmpDir = () => {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-corpus-'));
  tmpDirs.push(d);
  return d;
};
after(() => {
  for (const d of tmpDirs) fs.rmSync(d, { recursive: true, force: true });
});

let manifestCache: SnapshotManifest | undefined;
const manifest = () => (manifestCache ??= readManifest(SNAPSHOT));
const docsCache = new Map<string, string[]>();
/** The documents of one snapshot file (checksums verified by readSnapshotText). */
const docsOf = (p: string): string[] => {
  let d = docsCache.get(p);
  if (!d) {
    d = parseDocuments(readSnapshotText(SNAPSHOT, manifest().files.find((f) => f.path === p)!));
    docsCache.set(p, d);
  }
  return d;
};

// ---------------------------------------------------------------------------------------------------------------
// Shards

test('shard writer and reader round-trip documents, in one piece and streamed in chunks', () => {
  const dir = tmpDir();
  const rand = rng(7);
  const docs: number[][] = [];
  for (let d = 0; d < 40; d++) {
    const n = Math.floor(rand() * 300);
    // Ids above 2: BOS (1) and EOS (2) only mark boundaries; include the highest id 31999.
    docs.push(Array.from({ length: n }, () => 3 + Math.floor(rand() * 31997)));
  }
  docs[5] = [];
  docs[6] = [31999, 3];
  const w = new ShardWriter(path.join(dir, 'en-train-000.tok'), { vocabSize: 32000, bosId: 1, eosId: 2 });
  for (const d of docs) w.writeDocument(d);
  const h = w.close();
  const total = docs.reduce((a, d) => a + d.length + 2, 0);
  assert.deepEqual(h, { version: 1, vocabSize: 32000, tokens: total, documents: docs.length, bosId: 1, eosId: 2 });
  const file = path.join(dir, 'en-train-000.tok');
  assert.equal(fs.statSync(file).size, SHARD_HEADER_BYTES + 2 * total);
  assert.equal(fs.readFileSync(file).toString('latin1', 0, 8), 'MOESHARD');

  const { header, ids } = readShard(file);
  assert.deepEqual(header, h);
  assert.deepEqual(splitDocuments(ids, 1, 2).map((x) => Array.from(x)), docs);
  // Little-endian uint16 on disk, whatever the machine.
  assert.equal(fs.readFileSync(file).readUInt16LE(SHARD_HEADER_BYTES), 1);
  assert.equal(fs.readFileSync(file).readUInt16LE(SHARD_HEADER_BYTES + 2), docs[0]![0]);

  const streamed: number[] = [];
  let chunks = 0;
  for (const c of readShards(dir, { chunkTokens: 97 })) {
    assert.equal(c.offset, streamed.length);
    assert.ok(c.ids.length <= 97);
    streamed.push(...c.ids);
    chunks++;
  }
  assert.deepEqual(streamed, Array.from(ids));
  assert.equal(chunks, Math.ceil(total / 97));
});

test('listShards orders by language, split and index and filters; readShards streams only what was asked', () => {
  const dir = tmpDir();
  const write = (name: string, docs: number[][]) => {
    const w = new ShardWriter(path.join(dir, name), { vocabSize: 100, bosId: 1, eosId: 2 });
    for (const d of docs) w.writeDocument(d);
    w.close();
  };
  write('fr-val-000.tok', [[10]]);
  write('en-train-001.tok', [[20, 21]]);
  write('en-train-000.tok', [[30]]);
  write('en-val-000.tok', [[40]]);
  fs.writeFileSync(path.join(dir, 'notes.txt'), 'not a shard');
  assert.deepEqual(listShards(dir).map((s) => path.basename(s.file)), ['en-train-000.tok', 'en-train-001.tok', 'en-val-000.tok', 'fr-val-000.tok']);
  assert.deepEqual(listShards(dir, { split: 'val' }).map((s) => s.lang), ['en', 'fr']);
  const en = [...readShards(dir, { lang: 'en', split: 'train' })].flatMap((c) => Array.from(c.ids));
  assert.deepEqual(en, [1, 30, 2, 1, 20, 21, 2]);
  assertFormatError(() => listShards(dir, { lang: 'de' }), 'no token shards for de');
});

test('shard reader refuses damaged or foreign files with a FormatError naming the file', () => {
  const dir = tmpDir();
  const good = path.join(dir, 'it-train-000.tok');
  const w = new ShardWriter(good, { vocabSize: 1000, bosId: 1, eosId: 2 });
  w.writeDocument([5, 6, 7]);
  w.close();
  const bytes = fs.readFileSync(good);
  const variant = (name: string, edit: (b: Buffer) => Buffer) => {
    const f = path.join(dir, name);
    fs.writeFileSync(f, edit(Buffer.from(bytes)));
    return f;
  };
  assertFormatError(() => readShard(variant('magic.tok', (b) => (b.write('NOTSHARD', 0, 'latin1'), b))), 'magic.tok', 'magic');
  assertFormatError(() => readShard(variant('short.tok', (b) => b.subarray(0, b.length - 2))), 'short.tok', 'token count 5');
  assertFormatError(() => readShard(variant('tiny.tok', (b) => b.subarray(0, 10))), 'tiny.tok', 'shorter than');
  assertFormatError(() => readShard(variant('version.tok', (b) => (b.writeUInt32LE(9, 8), b))), 'version.tok', 'version is 9');
  assertFormatError(() => readShard(variant('vocab.tok', (b) => (b.writeUInt32LE(70000, 12), b))), 'vocab.tok', 'vocab size 70000');
  // A huge token count must be refused from the file size, before anything is allocated.
  assertFormatError(() => readShard(variant('huge.tok', (b) => (b.writeBigUInt64LE(1n << 60n, 16), b))), 'huge.tok', 'needs');
  assertFormatError(() => readShard(variant('docs.tok', (b) => (b.writeUInt32LE(1000, 24), b))), 'docs.tok', 'document count 1000');
  assertFormatError(() => readShard(variant('id.tok', (b) => (b.writeUInt16LE(1000, SHARD_HEADER_BYTES + 4), b))), 'id.tok', 'token 2 is id 1000');
  assert.throws(() => new ShardWriter(path.join(dir, 'x.tok'), { vocabSize: 1000, bosId: 1, eosId: 2 }).writeDocument([1000]), /outside/);
});

test('buildShards on a synthetic snapshot: counts, a damaged file and a bad manifest are FormatErrors', () => {
  const dir = tmpDir();
  const tok = mistralV1Tokenizer();
  const docs = Array.from({ length: 60 }, (_, i) => `Document number ${i}.\nIt has a second line, ${i * 7} times.`);
  docs.push('Un document.\nDuplicate below.', 'Un document.\nDuplicate below.');
  const text = formatDocuments(docs);
  const comp = compressText(text);
  fs.mkdirSync(path.join(dir, 'fr'));
  fs.writeFileSync(path.join(dir, 'fr/synthetic.txt.br'), comp);
  const unique = [...new Set(docs)];
  const splits = { train: { documents: 0, lines: 0, bytes: 0, tokens: 0 }, val: { documents: 0, lines: 0, bytes: 0, tokens: 0 } };
  for (const d of unique) {
    const c = splits[splitOf(d, 0.25)];
    c.documents++;
    c.lines += 2;
    c.bytes += Buffer.byteLength(d);
    c.tokens += tok.encode(d, { addBos: false }).length;
  }
  const entry = { path: 'fr/synthetic.txt.br', lang: 'fr', source: 'synthetic', sha256: sha256Hex(comp), text_sha256: sha256Hex(text), compressed_bytes: comp.length, bytes: Buffer.byteLength(text), splits };
  const man = { format: 'moe-ts-corpus', version: 1, tokenizer: 'Mistral v1', vocab_size: 32000, val_fraction: 0.25, sources: [], files: [entry] };
  fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify(man));
  const out = path.join(dir, 'shards');
  const { index, mismatches } = buildShards(dir, out, { languages: ['fr'], tokenizer: tok });
  assert.deepEqual(mismatches, []);
  for (const s of ['train', 'val'] as const) {
    assert.equal(index.counts['fr']![s].documents, splits[s].documents);
    assert.equal(index.counts['fr']![s].tokens, splits[s].tokens + 2 * splits[s].documents);
  }
  assert.ok(splits.val.documents > 0 && splits.train.documents > 0);

  // A changed byte in the text file: the checksum names it before anything is written.
  const bad = Buffer.from(comp);
  bad[bad.length >> 1]! ^= 1;
  fs.writeFileSync(path.join(dir, 'fr/synthetic.txt.br'), bad);
  assertFormatError(() => buildShards(dir, out, { languages: ['fr'], tokenizer: tok }), 'synthetic.txt.br', 'sha256');
  assert.ok(fs.existsSync(path.join(out, 'fr-train-000.tok')), 'the shards of the good build are still there');
  // A manifest whose checksum matches a file that inflates past its declared size.
  fs.writeFileSync(path.join(dir, 'fr/synthetic.txt.br'), comp);
  fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify({ ...man, files: [{ ...entry, bytes: 100 }] }));
  assertFormatError(() => buildShards(dir, out, { languages: ['fr'], tokenizer: tok }), 'synthetic.txt.br', 'decompress');
  fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify({ ...man, files: [{ ...entry, path: '../x.txt.br' }] }));
  assertFormatError(() => readManifest(dir), 'manifest.json', 'files[0].path');
  fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify({ ...man, val_fraction: 2 }));
  assertFormatError(() => readManifest(dir), 'val_fraction');
  assertFormatError(() => readManifest(path.join(dir, 'fr')), 'no corpus manifest');
});

// ---------------------------------------------------------------------------------------------------------------
// The committed snapshot

test('manifest checksums and counts match the committed snapshot files', () => {
  const m = manifest();
  const listed = new Set(m.files.map((f) => f.path));
  for (const lang of CORPUS_LANGUAGES) {
    for (const name of fs.readdirSync(path.join(SNAPSHOT, lang))) assert.ok(listed.has(`${lang}/${name}`), `${lang}/${name} is not in the manifest`);
  }
  for (const f of m.files) {
    const comp = fs.readFileSync(path.join(SNAPSHOT, f.path));
    assert.equal(sha256Hex(comp), f.sha256, f.path);
    assert.equal(comp.length, f.compressed_bytes, f.path);
    const docs = docsOf(f.path); // also checks the text's sha256 and size
    const count = { train: { documents: 0, lines: 0, bytes: 0 }, val: { documents: 0, lines: 0, bytes: 0 } };
    for (const d of docs) {
      const c = count[splitOf(d, m.val_fraction)];
      c.documents++;
      c.lines += d.split('\n').length;
      c.bytes += Buffer.byteLength(d);
    }
    for (const s of ['train', 'val'] as const) {
      assert.deepEqual(count[s], { documents: f.splits[s].documents, lines: f.splits[s].lines, bytes: f.splits[s].bytes }, `${f.path} ${s}`);
    }
  }
});

test('every language is present with at least 1M training and 50k validation tokens; token counts are real', () => {
  const m = manifest();
  for (const lang of CORPUS_LANGUAGES) {
    const files = m.files.filter((f) => f.lang === lang);
    const train = files.reduce((a, f) => a + f.splits.train.tokens, 0);
    const val = files.reduce((a, f) => a + f.splits.val.tokens, 0);
    assert.ok(train >= 1_000_000, `${lang}: ${train} training tokens`);
    assert.ok(val >= 50_000, `${lang}: ${val} validation tokens`);
  }
  // Recount the smallest file of each language with the tokenizer (the whole corpus would be too slow here).
  const tok = mistralV1Tokenizer();
  for (const lang of CORPUS_LANGUAGES) {
    const f = m.files.filter((x) => x.lang === lang).sort((a, b) => a.bytes - b.bytes)[0]!;
    const n = { train: 0, val: 0 };
    for (const d of docsOf(f.path)) n[splitOf(d, m.val_fraction)] += tok.encode(d, { addBos: false }).length;
    assert.deepEqual(n, { train: f.splits.train.tokens, val: f.splits.val.tokens }, f.path);
  }
});

test('train and validation never share a document: the split is a function of the text, and texts are unique', () => {
  const m = manifest();
  for (const lang of CORPUS_LANGUAGES) {
    const seen = new Map<string, string>();
    for (const f of m.files.filter((x) => x.lang === lang)) {
      for (const d of docsOf(f.path)) {
        const h = documentHash(d).toString('hex');
        assert.ok(!seen.has(h), `${lang}: a document of ${f.path} repeats one of ${seen.get(h)}`);
        seen.set(h, f.path);
      }
    }
  }
  // Splits by hash, not position: the same text lands in the same split wherever it is.
  assert.equal(splitOf('Bonjour à tous.', 0.5), splitOf('Bonjour à tous.', 0.5));
  const texts = Array.from({ length: 2000 }, (_, i) => `document ${i}`);
  const val = texts.filter((t) => splitOf(t, 0.03) === 'val').length;
  assert.ok(val > 20 && val < 100, `${val} of 2000 in validation at 3%`);
});

test('buildShards on a slice: shards decode to the snapshot documents, each in its own split, ordered by hash', () => {
  const m = manifest();
  const dir = tmpDir();
  const tok = mistralV1Tokenizer();
  const { index, mismatches } = buildShards(SNAPSHOT, dir, { documentsPerFile: 40, maxShardTokens: 20_000, tokenizer: tok, languages: ['it', 'es'] });
  assert.deepEqual(mismatches, []);
  for (const lang of ['it', 'es'] as const) {
    const expected = new Map<string, 'train' | 'val'>();
    for (const f of m.files.filter((x) => x.lang === lang)) for (const d of docsOf(f.path).slice(0, 40)) expected.set(d, splitOf(d, m.val_fraction));
    const got = { train: new Set<string>(), val: new Set<string>() };
    for (const split of ['train', 'val'] as const) {
      const shards = listShards(dir, { lang, split });
      assert.deepEqual(shards.map((s) => path.basename(s.file)), index.counts[lang]![split].shards);
      let prev: Buffer | undefined;
      for (const s of shards) {
        const { header, ids } = readShard(s.file);
        const docs = splitDocuments(ids, 1, 2);
        // A shard takes documents until it reaches maxShardTokens; only the last one of a split may be smaller.
        assert.ok(header.tokens - (docs[docs.length - 1]!.length + 2) < 20_000, `${s.file} went on past maxShardTokens`);
        if (s !== shards[shards.length - 1]) assert.ok(header.tokens >= 20_000, `${s.file} closed early`);
        for (const d of docs) {
          const text = tok.decode(Array.from(d));
          assert.equal(expected.get(text), split, `a ${lang} document in ${path.basename(s.file)} is not a ${split} document of the snapshot`);
          const h = documentHash(text);
          if (prev) assert.ok(Buffer.compare(prev, h) < 0, 'documents are ordered by hash');
          prev = h;
          got[split].add(text);
        }
      }
    }
    assert.equal(got.train.size + got.val.size, expected.size, `${lang}: every sliced document is in the shards once`);
    for (const t of got.val) assert.ok(!got.train.has(t));
  }
});

// ---------------------------------------------------------------------------------------------------------------
// Language filter and cleaning

test('snapshot lines pass the language filter for their own language and fail for the others', () => {
  const m = manifest();
  for (const lang of CORPUS_LANGUAGES) {
    const lines: string[] = [];
    for (const f of m.files.filter((x) => x.lang === lang)) {
      const long = docsOf(f.path).flatMap((d) => d.split('\n')).filter((l) => words(l).length >= MIN_WORDS);
      // 10 lines spread over each file.
      for (let i = 0; i < 10; i++) lines.push(long[Math.floor(((i + 0.5) * long.length) / 10)]!);
    }
    for (const line of lines) {
      assert.ok(isLanguage(line, lang), `${lang}: ${JSON.stringify(line.slice(0, 120))} fails for ${lang}`);
      for (const other of LANGS) if (other !== lang) assert.ok(!isLanguage(line, other), `${lang} line passes for ${other}: ${line.slice(0, 120)}`);
    }
  }
});

test('language filter on parallel LibreOffice help paragraphs it never selected: never the wrong language, 90% right', () => {
  const rows = JSON.parse(fs.readFileSync(new URL('../../test/fixtures/corpus/parallel.json', import.meta.url), 'utf8')) as Record<string, string>[];
  assert.ok(rows.length >= 30);
  for (const lang of LANGS) {
    let right = 0;
    for (const r of rows) {
      const got = identify(r[lang]!);
      assert.ok(got === lang || got === null, `${lang} paragraph identified as ${got}: ${r[lang]}`);
      if (got === lang) right++;
    }
    assert.ok(right >= 0.9 * rows.length, `${lang}: ${right} of ${rows.length} identified`);
  }
});

test('language filter: hand-written lines, short lines and non-prose', () => {
  const samples: Record<Lang, string> = {
    en: 'The committee said that the new rules would be applied to all of the members by the end of the year.',
    fr: "Le comité a déclaré que les nouvelles règles seraient appliquées à tous les membres d'ici la fin de l'année.",
    de: 'Der Ausschuss erklärte, dass die neuen Regeln bis zum Ende des Jahres für alle Mitglieder gelten würden.',
    it: "Il comitato ha detto che le nuove regole sarebbero state applicate a tutti i membri entro la fine dell'anno.",
    es: 'El comité dijo que las nuevas reglas se aplicarían a todos los miembros antes del final del año.',
  };
  for (const lang of LANGS) {
    assert.equal(identify(samples[lang]), lang);
    for (const other of LANGS) assert.equal(isLanguage(samples[lang], other), other === lang);
  }
  assert.equal(identify('Voir aussi'), null, 'too short to tell');
  assert.equal(identify('for (i = 0; i < n; i++) { x[i] = y[i] * 2; }'), null);
  assert.equal(identify('ls -la /usr/share/doc --color=auto | grep -v README'), null);
  assert.equal(identify('Это предложение написано по-русски и не должно пройти.'), null);
});

test('cleanDocument keeps the document language, drops foreign, duplicate and stray lines', () => {
  const seen = newSeen();
  const stats = emptyStats();
  const doc = [
    'Barre Rechercher',
    '  La barre  d\u2019outils Rechercher peut être utilisée pour rechercher rapidement du contenu dans les documents.  ',
    'The Find toolbar can be used to quickly search the contents of the documents that you have open.',
    'Icône',
    'Icône',
    'Menu',
    'Appuyez sur Entrée pour réaliser la recherche dans le document, puis fermez la barre.',
    'e\u0301te\u0301 \u00a0ici',
  ];
  const out = cleanDocument(doc, 'fr', seen, stats);
  assert.equal(
    out,
    'Barre Rechercher\nLa barre d\u2019outils Rechercher peut être utilisée pour rechercher rapidement du contenu dans les documents.\n' +
      'Menu\nAppuyez sur Entrée pour réaliser la recherche dans le document, puis fermez la barre.\nété ici',
  );
  assert.equal(stats.longKept, 2);
  assert.equal(stats.longOtherLanguage, 1);
  assert.equal(stats.shortKept, 3, 'short lines next to a kept long line');
  assert.equal(stats.shortDropped, 2, 'the two "Icône" between an English line and another short line');
  // A second document repeating those lines adds nothing; one mostly in English goes as a whole.
  assert.equal(cleanDocument(doc, 'fr', seen, stats), null);
  assert.equal(stats.docsDuplicate, 1);
  const english = ['The Find toolbar can be used to quickly search the contents of the documents that you have open.', 'Use the shortcut keys to open the toolbar when you are in the document.', 'Ouvrez la barre avec le raccourci clavier dans le document.'];
  assert.equal(cleanDocument(english, 'fr', seen, stats), null);
  assert.equal(stats.docsOtherLanguage, 1);
});

test('extraction helpers: normalisation, HTML, fortunes, Brown detokenisation, Latin-1', () => {
  assert.equal(normalizeLine(' a\tb\u00a0\u00a0c\u200b\u00ad d\u0007 '), 'a b c d');
  assert.equal(normalizeLine('Cafe\u0301'), 'Café');
  const html =
    '<html><head><title>T</title><script>var x = "<p>no</p>";</script></head><body>' +
    '<h1 id="a">Titre &amp; sous-titre</h1><p class="x">Un <b>texte</b> &laquo;cité&raquo;&#160;&#x263A;</p>' +
    '<pre>code block</pre><div class="navfooter">Suivant</div><p>Touche <span hidden="true" id="MAC1">Cmd</span><span hidden="true" id="default1">Ctrl</span>+F<br>fin</p><!-- <p>comment</p> --></body></html>';
  assert.deepEqual(htmlBlocks(html, { skip: (_t, a) => /class="navfooter"/.test(a) || (/\shidden=/.test(a) && !/id="default/.test(a)) }), [
    'Titre & sous-titre',
    'Un texte «cité» ☺',
    'Touche Ctrl+F',
    'fin',
  ]);
  assert.deepEqual(fortunes('one\nline two\n%\n%\nthree\n\n%\n'), [['one', 'line two'], ['three']]);
  assert.deepEqual(fortunes('a 100% sure\r\n%\r\nb'), [['a 100% sure'], ['b']]);
  assert.deepEqual(brownSentences("\tThe/at jury/nn said/vbd ``/`` it's/pps+bez fine/jj ''/'' (/( really/rb )/) ./.\n\n\tNext/ap one/cd ./.\n"), [
    'The jury said "it\'s fine" (really).',
    'Next one.',
  ]);
  assert.equal(decodeText(Uint8Array.from([0x47, 0x72, 0xfc, 0xdf, 0x65])), 'Grüße');
  assert.equal(decodeText(Buffer.from('Grüße', 'utf8')), 'Grüße');
});

// ---------------------------------------------------------------------------------------------------------------
// Licenses and the command line

test('a license notice is present for every source used, and LICENSES.md lists each', () => {
  const m = manifest();
  const md = fs.readFileSync(path.join(SNAPSHOT, 'LICENSES.md'), 'utf8');
  const ids = new Set(m.sources.map((s) => s.id));
  for (const f of m.files) assert.ok(ids.has(f.source), `${f.path}: source ${f.source} has no license entry`);
  for (const s of m.sources) {
    assert.ok(m.files.some((f) => f.source === s.id), `${s.id} is listed but unused`);
    const notice = fs.readFileSync(path.join(SNAPSHOT, s.license_file), 'utf8');
    assert.ok(notice.trim().length > 100, `${s.license_file} is empty`);
    assert.ok(s.license.length > 0 && s.packages.length > 0 && s.packages.every((p) => p.version), s.id);
    assert.ok(md.includes(`(${s.license_file})`), `LICENSES.md does not link ${s.license_file}`);
    for (const p of s.packages) assert.ok(md.includes(`\`${p.name}\` ${p.version}`), `LICENSES.md lacks ${p.name} ${p.version}`);
    if (/GPL/.test(s.license)) assert.match(notice, /General Public License|GNU GPL/, s.license_file);
  }
  for (const t of md.matchAll(/`(licenses\/[A-Za-z0-9.-]+\.txt)`/g)) {
    assert.ok(fs.statSync(path.join(SNAPSHOT, t[1]!)).size > 1000, `${t[1]} is missing`);
  }
});

test('moe data build tokenizes a slice of the snapshot; bad flags are usage errors', () => {
  const dir = tmpDir();
  const main = path.join(ROOT, 'dist/src/cli/main.js');
  // MOE_PROGRESS=1: draw the progress line although stderr is a pipe.
  const r = spawnSync(process.execPath, [main, 'data', 'build', '--out', dir, '--lang', 'it', '--slice', '3'], { encoding: 'utf8', env: { ...process.env, MOE_PROGRESS: '1' } });
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /it: train [\d,]+ tokens/);
  assert.match(r.stderr, /tokenizing .*100%/);
  const idx = JSON.parse(fs.readFileSync(path.join(dir, 'index.json'), 'utf8')) as { counts: Record<string, { train: { tokens: number } }> };
  const onDisk = listShards(dir, { lang: 'it', split: 'train' }).reduce((a, s) => a + s.header.tokens, 0);
  assert.equal(idx.counts['it']!.train.tokens, onDisk);
  assert.ok(onDisk > 0);
  const noOut = spawnSync(process.execPath, [main, 'data', 'build'], { encoding: 'utf8' });
  assert.equal(noOut.status, 2);
  assert.match(noOut.stderr, /--out is required/);
  const badLang = spawnSync(process.execPath, [main, 'data', 'build', '--out', dir, '--lang', 'pt'], { encoding: 'utf8' });
  assert.equal(badLang.status, 2);
  assert.match(badLang.stderr, /'pt' is not one of/);
});
