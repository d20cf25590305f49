/**
 * FLAN-style instruction examples from the committed material snapshot (data/instruct/, built by
 * scripts/instruct/build.ts): many tasks, several phrasings per task written in each of the five languages, whole
 * tasks held out for evaluation (FLAN's method), and a tokenized form with a loss mask on the answer tokens.
 * See docs/instruct-data.md.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as zlib from 'node:zlib';
import { FormatError } from '../formats/errors.js';
import type { Tokenizer } from '../model/types.js';
import { mistralV1Tokenizer } from '../tokenizer/sources.js';
import { intArg, parse, UsageError } from '../cli/args.js';
import { Rng } from '../util/rng.js';
import type { ChatMessage } from './chat-template.js';
import { documentHash, sha256Hex, splitOfHash } from './corpus.js';

export const INSTRUCT_LANGUAGES = ['en', 'fr', 'de', 'it', 'es'] as const;
export type InstructLang = (typeof INSTRUCT_LANGUAGES)[number];
export const DEFAULT_INSTRUCT_DIR = fileURLToPath(new URL('../../../data/instruct/', import.meta.url));

// ---------------------------------------------------------------------------------------------------------------
// The material snapshot

export interface TranslationMaterial {
  langs: InstructLang[];
  /** Aligned paragraphs, one string per language in `langs` order. */
  tuples: string[][];
}
/** English word -> translation, per target language. */
export type BilingualMaterial = Record<'fr' | 'de' | 'it' | 'es', [string, string][]>;
export interface WordNetMaterial {
  /** [word, part of speech (n v a r), gloss of its first sense, other words of that synset]. */
  entries: [string, string, string, string[]][];
}
export type WordListMaterial = Record<InstructLang, string[]>;
export interface AfinnMaterial {
  words: [string, number][];
}
export interface EmojiMaterial {
  langs: InstructLang[];
  /** [emoji, name per language in `langs` order]. */
  items: string[][];
}
export interface InstructMaterial {
  translation: TranslationMaterial;
  bilingual: BilingualMaterial;
  wordnet: WordNetMaterial;
  words: WordListMaterial;
  afinn: AfinnMaterial;
  emoji: EmojiMaterial;
}
export const MATERIAL_IDS = ['translation', 'bilingual', 'wordnet', 'words', 'afinn', 'emoji'] as const;

export interface InstructMaterialFile {
  path: string;
  material: string;
  sha256: string;
  text_sha256: string;
  compressed_bytes: number;
  bytes: number;
  items: Record<string, number>;
}
export interface InstructSource {
  id: string;
  title: string;
  license: string;
  license_file: string;
  packages: { registry: 'debian' | 'npm'; name: string; version: string; sha256?: string }[];
}
export interface InstructManifest {
  format: 'moe-ts-instruct-material';
  version: 1;
  description: string;
  builder: { script: string; version: number; node: string };
  sources: InstructSource[];
  files: InstructMaterialFile[];
}

/** Reads and checks the snapshot: every material present, sizes and sha256 as the manifest says. */
export function readInstructMaterial(dir: string = DEFAULT_INSTRUCT_DIR): InstructMaterial {
  const mfile = path.join(dir, 'manifest.json');
  let manifest: InstructManifest;
  try {
    manifest = JSON.parse(fs.readFileSync(mfile, 'utf8')) as InstructManifest;
  } catch (e) {
    throw new FormatError(mfile, `cannot read the instruct material manifest: ${(e as Error).message}`);
  }
  if (manifest.format !== 'moe-ts-instruct-material' || manifest.version !== 1) throw new FormatError(mfile, `format/version is ${manifest.format}/${manifest.version}, not moe-ts-instruct-material/1`);
  const out: Partial<Record<string, unknown>> = {};
  for (const id of MATERIAL_IDS) {
    const entry = manifest.files?.find((f) => f.material === id);
    if (!entry) throw new FormatError(mfile, `files: no entry for material "${id}"`);
    const file = path.join(dir, entry.path);
    let raw: Buffer;
    try {
      raw = zlib.brotliDecompressSync(fs.readFileSync(file), { maxOutputLength: Math.max(0, entry.bytes) + 1 });
    } catch (e) {
      throw new FormatError(file, `cannot read or decompress (brotli): ${(e as Error).message}`);
    }
    if (raw.length !== entry.bytes) throw new FormatError(file, `decompresses to ${raw.length} bytes, the manifest says ${entry.bytes}`);
    if (sha256Hex(raw) !== entry.text_sha256) throw new FormatError(file, 'text sha256 does not match the manifest');
    out[id] = JSON.parse(raw.toString('utf8'));
  }
  return out as unknown as InstructMaterial;
}

// ---------------------------------------------------------------------------------------------------------------
// Tasks and phrasings

export const INSTRUCT_TASKS = ['translate', 'define', 'synonyms', 'lookup', 'spell', 'langid', 'arithmetic', 'sentiment', 'letter_count', 'emoji_name'] as const;
export type InstructTask = (typeof INSTRUCT_TASKS)[number];
/** Whole tasks never seen in training: the evaluation of instruction tuning scores these (FLAN's held-out clusters). */
export const HELDOUT_TASKS: readonly InstructTask[] = ['sentiment', 'letter_count', 'emoji_name'];
export const HELDIN_TASKS: readonly InstructTask[] = INSTRUCT_TASKS.filter((t) => !HELDOUT_TASKS.includes(t));

type L = InstructLang;
type Phr = Record<L, string[]>;

/** Language names as written in each language: NAMES[in][of]. */
export const LANGUAGE_NAMES: Record<L, Record<L, string>> = {
  en: { en: 'English', fr: 'French', de: 'German', it: 'Italian', es: 'Spanish' },
  fr: { en: 'anglais', fr: 'français', de: 'allemand', it: 'italien', es: 'espagnol' },
  de: { en: 'Englisch', fr: 'Französisch', de: 'Deutsch', it: 'Italienisch', es: 'Spanisch' },
  it: { en: 'inglese', fr: 'francese', de: 'tedesco', it: 'italiano', es: 'spagnolo' },
  es: { en: 'inglés', fr: 'francés', de: 'alemán', it: 'italiano', es: 'español' },
};

// Placeholders: {src} {tgt} language names, {text}, {word}, {letter}, {expr}, {emoji}.
export const PHRASINGS: Record<InstructTask, Phr> = {
  translate: {
    en: ['Translate from {src} to {tgt}:\n{text}', 'How would you say this in {tgt}?\n{text}', 'Give the {tgt} translation of the following {src} text.\n\n{text}', '{text}\n\nTranslate the text above into {tgt}.'],
    fr: ['Traduis ce texte {src} en {tgt} :\n{text}', 'Comment dit-on ceci en {tgt} ?\n{text}', 'Donne la traduction en {tgt} du texte {src} suivant.\n\n{text}', '{text}\n\nTraduis le texte ci-dessus en {tgt}.'],
    de: ['Übersetze aus dem {src}en ins {tgt}e:\n{text}', 'Wie sagt man das auf {tgt}?\n{text}', 'Gib die Übersetzung des folgenden Textes ins {tgt}e an.\n\n{text}', '{text}\n\nÜbersetze den obigen Text ins {tgt}e.'],
    it: ['Traduci in {tgt} questo testo in {src}:\n{text}', 'Come si dice questo in {tgt}?\n{text}', 'Fornisci la traduzione in {tgt} del seguente testo.\n\n{text}', '{text}\n\nTraduci il testo qui sopra in {tgt}.'],
    es: ['Traduce del {src} al {tgt}:\n{text}', '¿Cómo se dice esto en {tgt}?\n{text}', 'Da la traducción al {tgt} del siguiente texto.\n\n{text}', '{text}\n\nTraduce el texto anterior al {tgt}.'],
  },
  define: {
    en: ['What does the word "{word}" mean?', 'Define "{word}".', 'Give a short definition of the English word "{word}".'],
    fr: ['Que signifie le mot anglais « {word} » ? Réponds en anglais.', 'Donne la définition anglaise de « {word} ».', 'Définis en anglais le mot « {word} ».'],
    de: ['Was bedeutet das englische Wort „{word}“? Antworte auf Englisch.', 'Gib die englische Definition von „{word}“ an.', 'Definiere das englische Wort „{word}“ auf Englisch.'],
    it: ['Che cosa significa la parola inglese "{word}"? Rispondi in inglese.', 'Dai la definizione inglese di "{word}".', 'Definisci in inglese la parola "{word}".'],
    es: ['¿Qué significa la palabra inglesa «{word}»? Responde en inglés.', 'Da la definición inglesa de «{word}».', 'Define en inglés la palabra «{word}».'],
  },
  synonyms: {
    en: ['Give synonyms of "{word}".', 'What are other words for "{word}"?', 'List words that mean the same as "{word}".'],
    fr: ['Donne des synonymes anglais de « {word} ».', 'Quels autres mots anglais veulent dire « {word} » ?', 'Cite des mots anglais de même sens que « {word} ».'],
    de: ['Nenne englische Synonyme für „{word}“.', 'Welche anderen englischen Wörter bedeuten „{word}“?', 'Zähle englische Wörter mit derselben Bedeutung wie „{word}“ auf.'],
    it: ['Dai dei sinonimi inglesi di "{word}".', 'Quali altre parole inglesi significano "{word}"?', 'Elenca parole inglesi con lo stesso significato di "{word}".'],
    es: ['Da sinónimos ingleses de «{word}».', '¿Qué otras palabras inglesas significan «{word}»?', 'Enumera palabras inglesas con el mismo significado que «{word}».'],
  },
  lookup: {
    en: ['What is the {tgt} word for the {src} word "{word}"?', 'Translate the word "{word}" from {src} to {tgt}.', '"{word}" ({src}) in {tgt} is:'],
    fr: ['Quel est le mot {tgt} pour le mot {src} « {word} » ?', 'Traduis le mot « {word} » ({src}) en {tgt}.', '« {word} » ({src}) se dit en {tgt} :'],
    de: ['Wie heißt „{word}“ ({src}) auf {tgt}?', 'Übersetze das Wort „{word}“ aus dem {src}en ins {tgt}e.', '„{word}“ ({src}) auf {tgt}:'],
    it: ['Come si dice "{word}" ({src}) in {tgt}?', 'Traduci in {tgt} la parola "{word}" ({src}).', '"{word}" ({src}) in {tgt} si dice:'],
    es: ['¿Cuál es la palabra en {tgt} para la palabra en {src} «{word}»?', 'Traduce la palabra «{word}» del {src} al {tgt}.', '«{word}» ({src}) en {tgt} se dice:'],
  },
  spell: {
    en: ['Spell "{word}" letter by letter.', 'How do you spell "{word}"? Give each letter.', 'Write the letters of "{word}" one by one.'],
    fr: ['Épelle « {word} » lettre par lettre.', 'Comment s\'écrit « {word} » ? Donne chaque lettre.', 'Écris les lettres de « {word} » une par une.'],
    de: ['Buchstabiere „{word}“.', 'Wie schreibt man „{word}“? Nenne jeden Buchstaben.', 'Schreibe die Buchstaben von „{word}“ einzeln auf.'],
    it: ['Scandisci "{word}" lettera per lettera.', 'Come si scrive "{word}"? Dai ogni lettera.', 'Scrivi le lettere di "{word}" una alla volta.'],
    es: ['Deletrea «{word}» letra por letra.', '¿Cómo se escribe «{word}»? Da cada letra.', 'Escribe las letras de «{word}» una por una.'],
  },
  langid: {
    en: ['Which language is this text written in?\n{text}', '{text}\n\nWhat language is the sentence above?', 'Identify the language: {text}'],
    fr: ['En quelle langue ce texte est-il écrit ?\n{text}', '{text}\n\nDans quelle langue est la phrase ci-dessus ?', 'Identifie la langue : {text}'],
    de: ['In welcher Sprache ist dieser Text geschrieben?\n{text}', '{text}\n\nIn welcher Sprache ist der obige Satz?', 'Erkenne die Sprache: {text}'],
    it: ['In quale lingua è scritto questo testo?\n{text}', '{text}\n\nIn che lingua è la frase qui sopra?', 'Identifica la lingua: {text}'],
    es: ['¿En qué idioma está escrito este texto?\n{text}', '{text}\n\n¿En qué idioma está la frase anterior?', 'Identifica el idioma: {text}'],
  },
  arithmetic: {
    en: ['What is {expr}?', 'Compute {expr}.', 'Calculate: {expr} ='],
    fr: ['Combien font {expr} ?', 'Calcule {expr}.', 'Calcul : {expr} ='],
    de: ['Was ist {expr}?', 'Berechne {expr}.', 'Rechne: {expr} ='],
    it: ['Quanto fa {expr}?', 'Calcola {expr}.', 'Calcolo: {expr} ='],
    es: ['¿Cuánto es {expr}?', 'Calcula {expr}.', 'Cálculo: {expr} ='],
  },
  sentiment: {
    en: ['Is the word "{word}" positive or negative?', 'What is the sentiment of "{word}": positive or negative?', 'Does "{word}" sound positive or negative?'],
    fr: ['Le mot anglais « {word} » est-il positif ou négatif ?', 'Quelle est la tonalité de « {word} » : positive ou négative ?', '« {word} » a-t-il un sens positif ou négatif ?'],
    de: ['Ist das englische Wort „{word}“ positiv oder negativ?', 'Welche Stimmung hat „{word}“: positiv oder negativ?', 'Klingt „{word}“ positiv oder negativ?'],
    it: ['La parola inglese "{word}" è positiva o negativa?', 'Qual è il sentimento di "{word}": positivo o negativo?', '"{word}" ha un senso positivo o negativo?'],
    es: ['¿La palabra inglesa «{word}» es positiva o negativa?', '¿Cuál es el sentimiento de «{word}»: positivo o negativo?', '¿«{word}» suena positivo o negativo?'],
  },
  letter_count: {
    en: ['How many times does the letter "{letter}" appear in "{word}"?', 'Count the letter "{letter}" in the word "{word}".', 'How many "{letter}"s are there in "{word}"?'],
    fr: ['Combien de fois la lettre « {letter} » apparaît-elle dans « {word} » ?', 'Compte les lettres « {letter} » dans le mot « {word} ».', 'Combien y a-t-il de « {letter} » dans « {word} » ?'],
    de: ['Wie oft kommt der Buchstabe „{letter}“ in „{word}“ vor?', 'Zähle den Buchstaben „{letter}“ im Wort „{word}“.', 'Wie viele „{letter}“ hat „{word}“?'],
    it: ['Quante volte compare la lettera "{letter}" in "{word}"?', 'Conta la lettera "{letter}" nella parola "{word}".', 'Quante "{letter}" ci sono in "{word}"?'],
    es: ['¿Cuántas veces aparece la letra «{letter}» en «{word}»?', 'Cuenta la letra «{letter}» en la palabra «{word}».', '¿Cuántas «{letter}» hay en «{word}»?'],
  },
  emoji_name: {
    en: ['What is the name of this emoji: {emoji}', 'Name this emoji: {emoji}', 'What does the emoji {emoji} show?'],
    fr: ['Quel est le nom de cet emoji : {emoji}', 'Nomme cet emoji : {emoji}', 'Que représente l\'emoji {emoji} ?'],
    de: ['Wie heißt dieses Emoji: {emoji}', 'Benenne dieses Emoji: {emoji}', 'Was zeigt das Emoji {emoji}?'],
    it: ['Qual è il nome di questa emoji: {emoji}', 'Dai il nome di questa emoji: {emoji}', "Che cosa rappresenta l'emoji {emoji}?"],
    es: ['¿Cuál es el nombre de este emoji?: {emoji}', 'Nombra este emoji: {emoji}', '¿Qué muestra el emoji {emoji}?'],
  },
};

const SENTIMENT_WORDS: Record<L, [string, string]> = {
  en: ['positive', 'negative'],
  fr: ['positif', 'négatif'],
  de: ['positiv', 'negativ'],
  it: ['positivo', 'negativo'],
  es: ['positivo', 'negativo'],
};

function fill(t: string, v: Record<string, string>): string {
  return t.replace(/\{(\w+)\}/g, (m, k: string) => v[k] ?? m);
}

// ---------------------------------------------------------------------------------------------------------------
// Example generation

/**
 * train / val: the held-in tasks (instruction tuning). heldout: the held-out tasks' evaluation examples.
 * heldout-train / heldout-val: training examples of the held-out tasks, from items (words, emoji) disjoint from
 * heldout's, for fine-tuning on those tasks (FLAN-MoE's "fine-tuned on the task" conditions); written to
 * <out>/heldout-tasks/{train,val}, a data folder `moe finetune --data` reads as it is.
 */
export type InstructSplit = 'train' | 'val' | 'heldout' | 'heldout-train' | 'heldout-val';
export const INSTRUCT_SPLITS: readonly InstructSplit[] = ['train', 'val', 'heldout', 'heldout-train', 'heldout-val'];
/** The folder (under the data folder) of the held-out tasks' fine-tuning data. */
export const HELDOUT_TASKS_DIR = 'heldout-tasks';
/** A split's files, without extension, relative to the data folder. */
export function instructSplitBase(split: InstructSplit): string {
  return split === 'heldout-train' ? `${HELDOUT_TASKS_DIR}/train` : split === 'heldout-val' ? `${HELDOUT_TASKS_DIR}/val` : split;
}

export interface InstructExample {
  /** One task, or "a+b" for a two-task conversation. */
  task: string;
  /** The language the instructions are written in. */
  lang: InstructLang;
  messages: ChatMessage[];
}

export interface GenerateInstructOptions {
  seed?: number;
  /** Train examples per held-in task (val: a tenth, at least 5; held-out tasks: this many each in heldout and in heldout-train). */
  perTask?: number;
  /** Share of items (by hash of the item) kept for validation; they never appear in train. */
  valFraction?: number;
  /** Two-task conversations added to train and val, as a share of their single-task examples. */
  multiTurnFraction?: number;
}

/** One item of a task: produces the question and answer in an instruction language. */
type Item = (lang: L, rng: Rng) => { vars: Record<string, string>; answer: string };

const pick = <T>(rng: Rng, a: readonly T[]): T => a[rng.int(a.length)]!;

/** The items of each task, split train/val by a hash of the item's key (so val items never appear in train). */
function taskItems(m: InstructMaterial, task: InstructTask): { key: string; item: Item }[] {
  const items: { key: string; item: Item }[] = [];
  const langs = m.translation.langs;
  switch (task) {
    case 'translate':
      for (const t of m.translation.tuples) {
        items.push({
          key: t[0]!,
          item: (lang, rng) => {
            const s = rng.int(langs.length);
            let d = rng.int(langs.length - 1);
            if (d >= s) d++;
            return { vars: { src: LANGUAGE_NAMES[lang][langs[s]!], tgt: LANGUAGE_NAMES[lang][langs[d]!], text: t[s]! }, answer: t[d]! };
          },
        });
      }
      break;
    case 'langid':
      for (const t of m.translation.tuples) {
        items.push({
          key: `langid:${t[0]}`,
          item: (lang, rng) => {
            const s = rng.int(langs.length);
            return { vars: { text: t[s]! }, answer: cap(LANGUAGE_NAMES[lang][langs[s]!]) };
          },
        });
      }
      break;
    case 'define':
      for (const [w, , gloss] of m.wordnet.entries) items.push({ key: w, item: () => ({ vars: { word: w }, answer: cap(gloss) + '.' }) });
      break;
    case 'synonyms':
      for (const [w, , , syn] of m.wordnet.entries) if (syn.length) items.push({ key: w, item: () => ({ vars: { word: w }, answer: syn.join(', ') }) });
      break;
    case 'lookup':
      for (const x of ['fr', 'de', 'it', 'es'] as const) {
        for (const [en, tr] of m.bilingual[x]) {
          items.push({
            key: `${x}:${en}`,
            item: (lang, rng) => {
              const fwd = rng.int(2) === 0;
              return { vars: { word: fwd ? en : tr, src: LANGUAGE_NAMES[lang][fwd ? 'en' : x], tgt: LANGUAGE_NAMES[lang][fwd ? x : 'en'] }, answer: fwd ? tr : en };
            },
          });
        }
      }
      break;
    case 'spell':
    case 'letter_count':
      for (const l of INSTRUCT_LANGUAGES) {
        for (const w of m.words[l]) {
          items.push({
            key: `${l}:${w}`,
            item: (_lang, rng) => {
              const letters = [...w];
              if (task === 'spell') return { vars: { word: w } as Record<string, string>, answer: letters.join(' ') };
              // Mostly a letter of the word; sometimes one it lacks (answer 0), so the count is not always >= 1.
              const lower = letters.map((c) => c.toLowerCase());
              const letter = rng.int(5) === 0 ? pick(rng, [...'abcdefghijklmnopqrstuvwxyz'].filter((c) => !lower.includes(c)).concat(['z'])) : pick(rng, lower);
              return { vars: { word: w, letter }, answer: String(countLetter(w, letter)) };
            },
          });
        }
      }
      break;
    case 'sentiment':
      for (const [w, s] of m.afinn.words) if (s !== 0) items.push({ key: w, item: (lang) => ({ vars: { word: w }, answer: cap(SENTIMENT_WORDS[lang][s > 0 ? 0 : 1]) }) });
      break;
    case 'emoji_name':
      for (const e of m.emoji.items) {
        items.push({ key: e[0]!, item: (lang) => ({ vars: { emoji: e[0]! }, answer: cap(e[1 + m.emoji.langs.indexOf(lang)]!) }) });
      }
      break;
    case 'arithmetic':
      // Generated: every (a, op, b) with operands below 100 for + and -, below 13 for x; keys split them too.
      for (const op of ['+', '-', '×'] as const) {
        const n = op === '×' ? 13 : 100;
        for (let a = 0; a < n; a++) {
          for (let b = 0; b < n; b++) {
            const expr = `${a} ${op} ${b}`;
            items.push({ key: expr, item: () => ({ vars: { expr }, answer: String(arith(a, op, b)) }) });
          }
        }
      }
      break;
  }
  return items;
}

export function arith(a: number, op: '+' | '-' | '×', b: number): number {
  return op === '+' ? a + b : op === '-' ? a - b : a * b;
}

/** Case-insensitive count of a letter in a word (the letter-counting answer). */
export function countLetter(word: string, letter: string): number {
  const l = letter.toLowerCase();
  return [...word.toLowerCase()].filter((c) => c === l).length;
}

const cap = (s: string) => (s ? s[0]!.toUpperCase() + s.slice(1) : s);

/** The examples of all splits, deterministic in (material, options). */
export function generateInstructExamples(m: InstructMaterial, opts: GenerateInstructOptions = {}): Record<InstructSplit, InstructExample[]> {
  const seed = opts.seed ?? 1;
  const perTask = opts.perTask ?? 1000;
  const valFraction = opts.valFraction ?? 0.1;
  const multi = opts.multiTurnFraction ?? 0.1;
  const valCount = Math.max(5, Math.ceil(perTask / 10));
  const out: Record<InstructSplit, InstructExample[]> = { train: [], val: [], heldout: [], 'heldout-train': [], 'heldout-val': [] };
  for (const task of INSTRUCT_TASKS) {
    // One generator per task: adding a task or changing another's size leaves this task's examples as they are.
    const rng = new Rng(seed * 1009 + INSTRUCT_TASKS.indexOf(task));
    const all = taskItems(m, task);
    if (!all.length) throw new Error(`instruct: task ${task} has no items (material incomplete?)`);
    const hashSplit = (salt: string, x: (typeof all)[number], f: number) => splitOfHash(documentHash(`${salt}${task}\u0000${x.key}`), f);
    // A held-out task's items: half evaluate (heldout), half fine-tune on the task (heldout-train / heldout-val).
    const evalPool = all.filter((x) => hashSplit('', x, 0.5) === 'val');
    const ftPool = all.filter((x) => hashSplit('', x, 0.5) === 'train');
    const plan: [InstructSplit, number, typeof all][] = HELDOUT_TASKS.includes(task)
      ? [
          ['heldout', perTask, evalPool],
          ['heldout-train', perTask, ftPool.filter((x) => hashSplit('ft\u0000', x, valFraction) === 'train')],
          ['heldout-val', valCount, ftPool.filter((x) => hashSplit('ft\u0000', x, valFraction) === 'val')],
        ]
      : [
          ['train', perTask, all.filter((x) => hashSplit('', x, valFraction) === 'train')],
          ['val', valCount, all.filter((x) => hashSplit('', x, valFraction) === 'val')],
        ];
    for (const [split, n, pool] of plan) {
      if (!pool.length) throw new Error(`instruct: task ${task} has no ${split} items`);
      for (let i = 0; i < n; i++) {
        const lang = INSTRUCT_LANGUAGES[i % INSTRUCT_LANGUAGES.length]!;
        const { vars, answer } = pick(rng, pool).item(lang, rng);
        const user = fill(pick(rng, PHRASINGS[task][lang]), vars);
        out[split].push({ task, lang, messages: [{ role: 'user', content: user }, { role: 'assistant', content: answer }] });
      }
    }
  }
  // Two tasks in one conversation: two single-task examples of the same split and instruction language.
  const rng = new Rng(seed * 1009 + 999);
  for (const split of ['train', 'val'] as const) {
    const singles = out[split];
    const n = Math.floor(singles.length * multi);
    const byLang = new Map<L, InstructExample[]>();
    for (const e of singles) byLang.set(e.lang, [...(byLang.get(e.lang) ?? []), e]);
    for (let i = 0; i < n; i++) {
      const pool = byLang.get(INSTRUCT_LANGUAGES[i % INSTRUCT_LANGUAGES.length]!)!;
      const a = pick(rng, pool);
      const b = pick(rng, pool);
      singles.push({ task: `${a.task}+${b.task}`, lang: a.lang, messages: [...a.messages, ...b.messages] });
    }
  }
  // Shuffle (Fisher-Yates) so that a training run sees the tasks mixed.
  for (const split of INSTRUCT_SPLITS) {
    const a = out[split];
    for (let i = a.length - 1; i > 0; i--) {
      const j = rng.int(i + 1);
      [a[i], a[j]] = [a[j]!, a[i]!];
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Tokenization with a loss mask

export interface EncodedExample {
  ids: number[];
  /** 1 on the assistant answers' tokens and their closing EOS, 0 on BOS and the prompts. */
  mask: number[];
}

/**
 * Mistral instruct v1 tokens: BOS, then per turn `[INST] {user} [/INST]` (mask 0) and the answer + EOS (mask 1).
 * The first prompt is encoded exactly as encodeChatPrompt encodes it (the whole rendered text with BOS); each
 * answer is encoded on its own, as the model generates it after the prompt.
 */
export function encodeInstructExample(tok: Tokenizer, messages: readonly ChatMessage[]): EncodedExample {
  if (messages.length === 0 || messages.length % 2 !== 0) throw new Error('an instruction example is user/assistant pairs');
  const ids: number[] = [tok.bosId];
  const mask: number[] = [0];
  for (let i = 0; i < messages.length; i += 2) {
    const u = messages[i]!;
    const a = messages[i + 1]!;
    if (u.role !== 'user' || a.role !== 'assistant') throw new Error(`message ${i}: roles must alternate user/assistant`);
    const p = tok.encode(`[INST] ${u.content} [/INST]`, { addBos: false });
    const ans = tok.encode(a.content, { addBos: false });
    ids.push(...p, ...ans, tok.eosId);
    for (let k = 0; k < p.length; k++) mask.push(0);
    for (let k = 0; k <= ans.length; k++) mask.push(1);
  }
  return { ids, mask };
}

// Shards: "MOEINSTR" | version u32 | vocab size u32 | tokens u64 | examples u32 | BOS u16 | EOS u16 (32 bytes),
// then (examples + 1) u32 token offsets, tokens u16 ids, tokens u8 mask values (0/1). Little-endian.
export const INSTRUCT_SHARD_MAGIC = 'MOEINSTR';
export const INSTRUCT_SHARD_VERSION = 1;
const HEADER = 32;

export interface InstructShard {
  vocabSize: number;
  bosId: number;
  eosId: number;
  /** Token offsets of the examples: example i is ids[offsets[i] .. offsets[i + 1]). */
  offsets: Uint32Array;
  ids: Uint16Array;
  mask: Uint8Array;
}

export function writeInstructShard(file: string, meta: { vocabSize: number; bosId: number; eosId: number }, examples: readonly EncodedExample[]): void {
  if (meta.vocabSize < 1 || meta.vocabSize > 65536) throw new RangeError(`vocabSize ${meta.vocabSize} does not fit uint16 ids`);
  const tokens = examples.reduce((n, e) => n + e.ids.length, 0);
  if (tokens >= 2 ** 32) throw new RangeError('too many tokens for one instruct shard');
  const b = Buffer.alloc(HEADER + 4 * (examples.length + 1) + 3 * tokens);
  b.write(INSTRUCT_SHARD_MAGIC, 0, 'latin1');
  b.writeUInt32LE(INSTRUCT_SHARD_VERSION, 8);
  b.writeUInt32LE(meta.vocabSize, 12);
  b.writeBigUInt64LE(BigInt(tokens), 16);
  b.writeUInt32LE(examples.length, 24);
  b.writeUInt16LE(meta.bosId, 28);
  b.writeUInt16LE(meta.eosId, 30);
  let off = HEADER;
  let t = 0;
  const idsAt = HEADER + 4 * (examples.length + 1);
  const maskAt = idsAt + 2 * tokens;
  for (const e of examples) {
    if (e.ids.length !== e.mask.length) throw new RangeError('ids and mask differ in length');
    b.writeUInt32LE(t, off);
    off += 4;
    for (let i = 0; i < e.ids.length; i++) {
      const id = e.ids[i]!;
      if (!Number.isInteger(id) || id < 0 || id >= meta.vocabSize) throw new RangeError(`token id ${id} is outside [0, ${meta.vocabSize})`);
      b.writeUInt16LE(id, idsAt + 2 * (t + i));
      b[maskAt + t + i] = e.mask[i] ? 1 : 0;
    }
    t += e.ids.length;
  }
  b.writeUInt32LE(t, off);
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, b);
  fs.renameSync(tmp, file);
}

/** Reads and checks an instruct shard; every inconsistency is a FormatError naming the file and field. */
export function readInstructShard(file: string): InstructShard {
  const b = fs.readFileSync(file);
  if (b.length < HEADER) throw new FormatError(file, `is ${b.length} bytes, shorter than the ${HEADER}-byte instruct shard header`);
  if (b.toString('latin1', 0, 8) !== INSTRUCT_SHARD_MAGIC) throw new FormatError(file, `magic is ${JSON.stringify(b.toString('latin1', 0, 8))}, not "${INSTRUCT_SHARD_MAGIC}" (not a moe-ts instruct shard)`);
  const version = b.readUInt32LE(8);
  if (version !== INSTRUCT_SHARD_VERSION) throw new FormatError(file, `version is ${version}; this moe-ts reads instruct shard version ${INSTRUCT_SHARD_VERSION}`);
  const vocabSize = b.readUInt32LE(12);
  if (vocabSize < 1 || vocabSize > 65536) throw new FormatError(file, `vocab size ${vocabSize} is not in [1, 65536] (ids are uint16)`);
  const tokens64 = b.readBigUInt64LE(16);
  const examples = b.readUInt32LE(24);
  const expected = BigInt(HEADER) + 4n * BigInt(examples + 1) + 3n * tokens64;
  if (expected !== BigInt(b.length)) throw new FormatError(file, `token count ${tokens64} and example count ${examples} need ${expected} bytes but the file has ${b.length} (truncated or corrupted)`);
  const tokens = Number(tokens64);
  const bosId = b.readUInt16LE(28);
  const eosId = b.readUInt16LE(30);
  if (bosId >= vocabSize || eosId >= vocabSize) throw new FormatError(file, `BOS ${bosId} / EOS ${eosId} is not below vocab size ${vocabSize}`);
  const offsets = new Uint32Array(examples + 1);
  for (let i = 0; i <= examples; i++) {
    offsets[i] = b.readUInt32LE(HEADER + 4 * i);
    if (i === 0 ? offsets[0] !== 0 : offsets[i]! < offsets[i - 1]!) throw new FormatError(file, `offsets[${i}] = ${offsets[i]} is out of order`);
  }
  if (offsets[examples] !== tokens) throw new FormatError(file, `offsets[${examples}] = ${offsets[examples]}, not the token count ${tokens}`);
  const idsAt = HEADER + 4 * (examples + 1);
  const ids = new Uint16Array(tokens);
  for (let i = 0; i < tokens; i++) {
    ids[i] = b.readUInt16LE(idsAt + 2 * i);
    if (ids[i]! >= vocabSize) throw new FormatError(file, `token ${i} is id ${ids[i]}, not below the vocab size ${vocabSize}`);
  }
  const mask = new Uint8Array(b.subarray(idsAt + 2 * tokens));
  for (let i = 0; i < tokens; i++) if (mask[i]! > 1) throw new FormatError(file, `mask[${i}] is ${mask[i]}, not 0 or 1`);
  return { vocabSize, bosId, eosId, offsets, ids, mask };
}

// ---------------------------------------------------------------------------------------------------------------
// `moe data instruct`

export interface InstructBuildResult {
  counts: Record<InstructSplit, { examples: number; tokens: number; answerTokens: number; byTask: Record<string, number>; byLang: Record<string, number> }>;
}

/** Writes <out>/<split>.jsonl (the examples) and <out>/<split>.instr (tokens + loss mask) and <out>/index.json. */
export function buildInstructData(outDir: string, opts: GenerateInstructOptions & { materialDir?: string; tokenizer?: Tokenizer } = {}): InstructBuildResult {
  const m = readInstructMaterial(opts.materialDir ?? DEFAULT_INSTRUCT_DIR);
  const ex = generateInstructExamples(m, opts);
  const tok = opts.tokenizer ?? mistralV1Tokenizer();
  fs.mkdirSync(outDir, { recursive: true });
  const counts = {} as InstructBuildResult['counts'];
  for (const split of INSTRUCT_SPLITS) {
    const enc = ex[split].map((e) => encodeInstructExample(tok, e.messages));
    const base = path.join(outDir, instructSplitBase(split));
    fs.mkdirSync(path.dirname(base), { recursive: true });
    writeInstructShard(`${base}.instr`, { vocabSize: tok.vocabSize, bosId: tok.bosId, eosId: tok.eosId }, enc);
    fs.writeFileSync(`${base}.jsonl`, ex[split].map((e) => JSON.stringify(e)).join('\n') + '\n');
    const byTask: Record<string, number> = {};
    const byLang: Record<string, number> = {};
    for (const e of ex[split]) {
      byTask[e.task] = (byTask[e.task] ?? 0) + 1;
      byLang[e.lang] = (byLang[e.lang] ?? 0) + 1;
    }
    counts[split] = {
      examples: enc.length,
      tokens: enc.reduce((n, e) => n + e.ids.length, 0),
      answerTokens: enc.reduce((n, e) => n + e.mask.reduce((a, v) => a + v, 0), 0),
      byTask,
      byLang,
    };
  }
  fs.writeFileSync(
    path.join(outDir, 'index.json'),
    JSON.stringify({ format: 'moe-ts-instruct-data', version: 1, seed: opts.seed ?? 1, perTask: opts.perTask ?? 1000, heldoutTasks: HELDOUT_TASKS, tokenizer: 'Mistral v1', counts }, null, 2) + '\n',
  );
  return { counts };
}

const INSTRUCT_USAGE = 'data instruct --out <dir> [--seed N] [--per-task N] [--material <dir>]';

export async function instructDataCommand(argv: string[]): Promise<void> {
  const { values } = parse(argv, { out: { type: 'string' }, seed: { type: 'string' }, 'per-task': { type: 'string' }, material: { type: 'string' } });
  const out = values.out as string | undefined;
  if (!out) throw new UsageError(`--out is required: moe ${INSTRUCT_USAGE}`);
  const seed = intArg('seed', values.seed as string | undefined, 1, 0);
  const perTask = intArg('per-task', values['per-task'] as string | undefined, 1000, 1);
  const { counts } = buildInstructData(out, { seed, perTask, ...(values.material !== undefined ? { materialDir: values.material as string } : {}) });
  const lines = [`instruction data in ${out} (held-out tasks: ${HELDOUT_TASKS.join(', ')}):`];
  for (const s of INSTRUCT_SPLITS) lines.push(`  ${instructSplitBase(s)}: ${counts[s].examples} examples, ${counts[s].tokens.toLocaleString('en-US')} tokens (${counts[s].answerTokens.toLocaleString('en-US')} answer tokens)`);
  process.stdout.write(lines.join('\n') + '\n');
}
