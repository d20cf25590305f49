/**
 * The corpus builder's line-level language filter: a stop-word scorer, deliberately simple so that it can be read
 * and checked by hand.
 *
 * A line is split into words (runs of letters; an elision keeps its apostrophe: "l'homme" gives "l'", "homme"). Each word
 * that is in a language's list of ~120 frequent function words adds 1/k to that language, k being the number of
 * the five lists that hold it (so "la", shared by fr/it/es, adds 1/3 to each, and "the" adds 1 to English alone).
 * Letters only some languages use add a little more (ß ä ö: German; ñ ¿ ¡ á í ó ú: Spanish; ç œ ê â î ô û ë ï:
 * French; ì ò: Italian), half a point per word that holds one.
 *
 * A line of at least MIN_WORDS words is identified as language L when
 *   - it is prose: letters make up at least 60% of its non-space characters, almost all letters are Latin, and
 *     at most 30% of its space-separated tokens look like code, paths, options or markup (/ \\ _ = < > { } [ ] | # @
 *     $ % ^ * ~ \` or a leading "-");
 *   - L scores at least 1.5 and at least 15% of the word count (real prose in these languages is 30-50% function
 *     words; tables, code, lists of names are not);
 *   - L scores highest, and its own evidence (words in L's list only, and L's letter cues) is at least twice
 *     any other language's own evidence: words shared between lists ("la", "de", "un") choose no side.
 * Shorter lines are "short": too few words to tell. The builder keeps them only inside a document identified as
 * L as a whole, and only when no other language outscores L on the line itself (identifyShort).
 */

export type Lang = 'en' | 'fr' | 'de' | 'it' | 'es';
export const LANGS: readonly Lang[] = ['en', 'fr', 'de', 'it', 'es'];

export const MIN_WORDS = 4;
export const MIN_SCORE = 1.5;
export const MIN_DENSITY = 0.15;
export const MIN_MARGIN = 2;
export const MIN_LETTER_RATIO = 0.6;
export const MAX_CODE_TOKENS = 0.3;

const STOP: Record<Lang, string> = {
  en: `the of and to in is that it was for on are as with his they at be this have from or one had by but not what
    all were we when your can said there an each which she do how their if will up other about out many then them
    these so some her would make like him into has more two could no than been who its now my over did down only
    way any our should where after through also between because those such being very must under while does shall
    upon you he i a me here just why same before much most both well even still new ever never every own off again
    against once until whom himself herself itself themselves yourself myself s t ll ve re don' isn' doesn' didn'
    won' wasn' aren' weren' couldn' wouldn' shouldn' can' it' that' there' i' you' we' they' let' am us let may might within without whether though although`,
  fr: `le la les de des du un une et est en que qui dans pour pas par sur au aux avec ce cette ces il elle ils elles
    nous vous je tu on se sa son ses leur leurs mais ou où donc ne plus tout tous toute toutes être avoir sont été
    fait peut comme si lorsque quand entre aussi très sans sous chez vers dont cela ceci celui celle même autre
    autres notre votre nos vos mon ma mes ton ta tes y à était sera ont avez avons faire peu puis alors après avant
    depuis encore déjà toujours jamais rien l' d' qu' n' s' j' c' m' t' jusqu' lorsqu' puisqu' lui moi toi eux ceux celles lequel laquelle pourquoi
    comment chaque selon afin ainsi être fois deux trois bien ici voici voilà quelque quelques aucun aucune parce`,
  de: `der die das und ist in zu den von mit sich des auf für nicht ein eine einer eines einem einen als auch es an
    werden aus er hat dass daß sie nach wird bei um am sind noch wie über so zum zur war haben nur oder aber vor bis
    mehr durch man dem kann wenn ich du wir ihr ihre ihren ihrem ihrer sein seine seiner seinen seinem wurde wurden
    dieser diese dieses diesem diesen kein keine keinen schon hier dann doch also sehr immer unter gegen ohne
    zwischen sowie muss soll können müssen wo was wer warum ob weil damit denn jetzt alle allem allen etwas nichts
    mich dich uns euch mir dir ihm ihn ihnen ja nein einmal gibt bereits wieder eines jedoch werden worden hatte
    hätte wäre sondern sollte zwei drei`,
  it: `il lo la i gli le di a da in con su per tra fra e è un uno una che non si del della dei delle degli dello al
    alla ai alle agli allo dal dalla dai dalle nel nella nei nelle negli sul sulla sui sulle come più ma o anche
    questo questa questi queste quello quella quelli sono essere ha hanno ho era erano siamo stato stata può
    possono se perché quando dove così molto tutto tutti tutte ogni suo sua suoi sue loro mio mia io tu lui lei
    noi voi ci vi ne già ancora sempre mai solo poi dopo prima cui quale quali fare l' d' c' dell' all' nell'
    sull' dall' un' quest' quell' po' anch' cosa nulla niente senza verso dentro sotto sopra viene essere deve sia fatto altro altri altre
    però quindi mentre due tre ed ad mie miei tuo tua tuoi`,
  es: `el la los las de del y en a que un una unos unas es por con para no se su sus al lo como más pero o sí si
    este esta estos estas ese esa eso esto ser son está están fue ha han hay muy también cuando donde porque sin
    sobre entre hasta desde todo todos toda todas cada otro otra otros otras yo tú él ella ellos ellas nosotros
    usted ustedes le les me te nos mi mis tu tus qué cómo cuál quien quién ya ni aunque mismo misma puede pueden
    hace tiene tienen era sido estar después antes siempre nunca nada algo bien aquí así según mientras tanto
    había fueron será sea están hacer debe cual mucho muchos poco dos tres solo uno da`,
};

const weights = new Map<string, Map<Lang, number>>();
for (const lang of LANGS) {
  for (const w of STOP[lang].split(/\s+/)) {
    for (const part of words(w)) {
      let m = weights.get(part);
      if (!m) weights.set(part, (m = new Map()));
      m.set(lang, 1);
    }
  }
}
for (const m of weights.values()) for (const l of m.keys()) m.set(l, 1 / m.size);

/** Letters that hint at one language (half a point per word holding one). */
const CUES: [RegExp, Lang][] = [
  [/[ßäö]/, 'de'],
  [/[ñáíóú]/, 'es'],
  [/[çœêâîôûëï]/, 'fr'],
  [/[ìò]/, 'it'],
];

/**
 * Lower-case words: runs of letters (and combining marks), each with the apostrophe that follows it, if any, so
 * that elisions are words of their own: "l'homme" gives "l'" and "homme", "don't" gives "don'" and "t". An
 * option letter such as "-n" is then not the French "n'".
 */
export function words(line: string): string[] {
  return line.toLowerCase().replace(/[’ʼ]/g, "'").match(/[\p{L}\p{M}]+'?/gu) ?? [];
}

function weightsOf(w: string): Map<Lang, number> | undefined {
  // A word before a closing quote ("said 'the'") is the word itself.
  return weights.get(w) ?? (w.endsWith("'") ? weights.get(w.slice(0, -1)) : undefined);
}

export interface LangScore {
  /** The identified language, or null. For a short line: the best-scoring language if it beats all others. */
  lang: Lang | null;
  /** Why not identified: 'short' (too few words), 'not-prose', 'weak' (few function words), 'ambiguous'. */
  reason?: 'short' | 'not-prose' | 'weak' | 'ambiguous';
  words: number;
  scores: Record<Lang, number>;
}

/** A whitespace-separated token that is code, a path, an option or markup rather than a word. */
const CODE_TOKEN = /[/\\_=<>{}[\]|#@$%^*~`]|^--?\w/;

function isProse(line: string): boolean {
  const count = (re: RegExp) => line.match(re)?.length ?? 0;
  const nonSpace = count(/\S/gu);
  const letters = count(/\p{L}/gu);
  const latin = count(/\p{Script=Latin}/gu);
  const tokens = line.split(/\s+/).filter(Boolean);
  const code = tokens.filter((t) => CODE_TOKEN.test(t)).length;
  return nonSpace > 0 && letters >= MIN_LETTER_RATIO * nonSpace && latin >= 0.95 * letters && code <= MAX_CODE_TOKENS * tokens.length;
}

export function scoreLine(line: string): LangScore {
  const ws = words(line);
  const scores: Record<Lang, number> = { en: 0, fr: 0, de: 0, it: 0, es: 0 };
  // Evidence for one language only: words in one list, and the letter cues.
  const own: Record<Lang, number> = { en: 0, fr: 0, de: 0, it: 0, es: 0 };
  for (const w of ws) {
    const m = weightsOf(w);
    if (m) {
      for (const [l, v] of m) scores[l] += v;
      if (m.size === 1) for (const l of m.keys()) own[l] += 1;
    }
    for (const [re, l] of CUES) {
      if (re.test(w)) {
        scores[l] += 0.5;
        own[l] += 0.5;
      }
    }
  }
  if (/[¿¡]/.test(line)) {
    scores.es += 1;
    own.es += 1;
  }
  const best = [...LANGS].sort((a, b) => scores[b] - scores[a])[0]!;
  const rivals = LANGS.filter((l) => l !== best);
  const base = { words: ws.length, scores };
  if (!isProse(line)) return { lang: null, reason: 'not-prose', ...base };
  if (ws.length < MIN_WORDS) return { lang: rivals.every((l) => scores[l] < scores[best]) ? best : null, reason: 'short', ...base };
  if (scores[best] < MIN_SCORE || scores[best] < MIN_DENSITY * ws.length) return { lang: null, reason: 'weak', ...base };
  if (own[best] === 0 || rivals.some((l) => own[best] < MIN_MARGIN * own[l])) return { lang: null, reason: 'ambiguous', ...base };
  return { lang: best, ...base };
}

/** The language of a line of at least MIN_WORDS words, or null (short, not prose, no clear language). */
export function identify(line: string): Lang | null {
  const s = scoreLine(line);
  return s.reason === undefined ? s.lang : null;
}

/** Whether a line is identified as `lang` (the filter every long line of a `lang` document must pass). */
export function isLanguage(line: string, lang: Lang): boolean {
  return identify(line) === lang;
}

/**
 * Whether a short line (fewer than MIN_WORDS words) may stay in a document of `lang`: it is prose-like and no
 * other language outscores `lang` on it. Headings, poem lines and dialogue turns pass; "Voir aussi" in an English
 * document does not.
 */
export function shortLineFits(line: string, lang: Lang): boolean {
  const s = scoreLine(line);
  if (s.reason === 'not-prose') return false;
  return LANGS.every((l) => l === lang || s.scores[l] <= s.scores[lang]);
}
