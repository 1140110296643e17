// Normalization for the injection rules: what a model would read, in one canonical spelling.
// Written by hand: no maintained library folds homoglyphs, leetspeak and spacing tricks into
// one form (confusables packages fold to a skeleton for identifier spoofing, not for prose).
// Every step is a single linear pass (a character loop or a regex over one character class).

import { charTable } from './text.js'

/**
 * The Basic Multilingual Plane's part of a Unicode property class, as a class of UTF-16 units for
 * a regex without the `u` flag: V8 walks such a regex a unit at a time, and the same class under
 * `u` cost a non-ASCII text a fifth more to normalize. Built once, at load (65,536 tests).
 */
function bmpClass (property: RegExp, keep: string = ''): string {
  const hex = (c: number): string => '\\u' + c.toString(16).padStart(4, '0')
  let out = ''
  let start = -1
  for (let c = 0; c <= 0x10000; c++) {
    const inside = c < 0x10000 && (c < 0xd800 || c > 0xdfff) && !keep.includes(String.fromCharCode(c)) && property.test(String.fromCharCode(c))
    if (inside && start < 0) start = c
    else if (!inside && start >= 0) {
      out += start === c - 1 ? hex(start) : hex(start) + '-' + hex(c - 1)
      start = -1
    }
  }
  return out
}
// A high surrogate: the text holds characters beyond the BMP, which the `u` class reads.
const ASTRAL = /[\ud800-\udbff]/

// Invisible characters, by their Unicode properties: controls (tab, newline, CR are kept as
// whitespace), format characters (zero-width, bidi, soft hyphen, the BOM, interlinear
// annotation, ...) and every default-ignorable code point (variation selectors, Hangul fillers,
// ...). A hand-written list of ranges missed many (tag characters, U+E0100 and later variation
// selectors, U+FFF9, U+1D173, U+1BCA0): one inside "ignore" split the word, and the call passed.
const INVISIBLE_PROPERTY = /[\p{Cc}\p{Cf}\p{Default_Ignorable_Code_Point}]/u
const INVISIBLE_BMP = bmpClass(INVISIBLE_PROPERTY, '\t\n\r')
const INVISIBLE = new RegExp(`[${INVISIBLE_BMP}]`, 'g')
const INVISIBLE_ASTRAL = /[\p{Cf}\p{Default_Ignorable_Code_Point}]/gu
// Tag characters U+E0020 to U+E007E mirror ASCII, invisibly. A reader that decodes them reads
// the ASCII they mirror ("ASCII smuggling": a whole instruction in them passed), one that does
// not reads the text without them (a tag space inside "ignore" passed): both are read, the
// decoded tags after the text, on a line of their own.
const TAGS = /[\u{E0020}-\u{E007E}]/gu
const untag = (c: string): string => String.fromCharCode(c.codePointAt(0)! - 0xE0000)
// Combining marks left by NFD, every script's: diacritics are dropped so that rules are written
// once in ASCII (U+0300 to U+036F alone let U+1AB0, U+1DC0, U+20DD or U+FE20 split a word).
const COMBINING = new RegExp(`[${bmpClass(/\p{M}/u)}]`, 'g')
const COMBINING_ASTRAL = /\p{M}/gu

/** NFKC'd text as read: invisible characters gone, and any tag characters decoded after it. */
function visible (s: string): string {
  // \udb40: the high surrogate of every tag character, so most texts skip this.
  if (s.includes('\udb40')) {
    const smuggled = s.match(TAGS)
    if (smuggled !== null) s = s.replace(TAGS, '') + '\n' + smuggled.map(untag).join('')
  }
  s = s.replace(INVISIBLE, '')
  return ASTRAL.test(s) ? s.replace(INVISIBLE_ASTRAL, '') : s
}

// Invisible characters between two letters or digits: only there does reading them as a space
// change the words (the variation selector of ❤️, the joiners inside an emoji sequence, sit
// between symbols, and such texts are not read a second time). The invisible characters are
// one class: as `(?:INVISIBLE|INVISIBLE_ASTRAL)+`, whose two classes share every BMP format
// character, a run of n soft hyphens after a letter and before no letter was tried in 2^n ways
// (24 of them held the event loop 150 ms, 30 seconds, in one prompt).
export const BETWEEN_LETTERS = new RegExp(`[\\p{L}\\p{N}][${INVISIBLE_BMP}\\p{Cf}\\p{Default_Ignorable_Code_Point}]+[\\p{L}\\p{N}]`, 'u')

/**
 * The text with each invisible character read as a space, and tag characters as the ASCII they
 * mirror, in place; null when none sits between two letters or digits. The rules read it
 * beside `rulesView`'s text, where they are removed: removed, one inside a word no longer splits it (ig\u200bnore), and read as a
 * space, one between two words no longer joins them (ignore\u200ball previous instructions read
 * as "ignoreall previous instructions", and every rule missed it).
 */
export function invisibleAsSpaces (text: string): string | null {
  if (!BETWEEN_LETTERS.test(text)) return null
  let s = text.includes('\udb40') ? text.replace(TAGS, untag) : text
  s = s.replace(INVISIBLE, ' ')
  return ASTRAL.test(s) ? s.replace(INVISIBLE_ASTRAL, ' ') : s
}

/** Combining marks dropped (after NFD). */
function unmarked (s: string): string {
  s = s.replace(COMBINING, '')
  return ASTRAL.test(s) ? s.replace(COMBINING_ASTRAL, '') : s
}

// Markup comment delimiters: removed, so their content is read and words split by an empty
// comment (ig<!---->nore) join again. HTML, C-style and Jinja/Twig comments.
const COMMENT_DELIMITERS = /<!--|-{2,3}>|\/\*|\*\/|\{#|#\}/g
// eslint-disable-next-line no-control-regex -- the ASCII range
const NOT_ASCII = /[^\x00-\x7f]/
const LEET_CHARS = /[0134578@$]/g
const LEET: Readonly<Record<string, string>> = { 0: 'o', 1: 'i', 3: 'e', 4: 'a', 5: 's', 7: 't', 8: 'b', '@': 'a', $: 's' }

/**
 * Letters of other scripts that look like Latin ones, read as the Latin letter(s). Capitals are
 * read by their own look, before the text is lowercased: lowercase first, the Greek capital Ν (N)
 * became ν, read as v, and Η, Μ, Υ as n, u, u. The lowercase letters are folded again after
 * lowercasing.
 *
 * A hand table, not a confusables package: UTS #39 skeletons are made to compare identifiers
 * (they map Latin letters among themselves, rn to m, l to I, and digits to letters, and their
 * prototype of a letter is often not ASCII), where the rules need each look-alike read as the
 * one lowercase ASCII letter a reader sees; and the gateway takes no dependency for a table of
 * a few hundred entries. The entries were checked against Unicode's confusables.txt and names;
 * every key is one BMP code unit, and the test reads each through normalizeForRules.
 */
const HOMOGLYPH_LIST: readonly string[] = [
  // Each entry is the look-alike character followed by the Latin letter(s) it reads as.
  // Cyrillic
  '\u0430a \u0431b \u0432b \u0435e \u0451e \u0454e \u043ak \u043cm \u043dh \u043eo \u0440p \u0441c \u0442t \u0443y \u0445x \u0456i \u0457i \u0458j \u0455s \u0501d \u051bq \u051dw \u04bbh \u0491r \u0433r \u043fn \u0438u \u044cb \u0261g',
  '\u04cfi \u04afy \u04b3x \u04bde \u04bfe \u0511e \u0475v \u04abc \u04d5ae \u0461w \ua647i',
  // Cyrillic capitals
  '\u0410a \u0412b \u0415e \u041ak \u041cm \u041dh \u041eo \u0420p \u0421c \u0422t \u0423y \u0425x \u0406i \u0408j \u0405s \u0500d \u051aq \u051cw \u04bah',
  '\u04c0i \u04aey \u04b2x \u04bce \u04bee \u0474v \u04aac \ua646i',
  // Greek (lunate sigma: NFKC makes it a sigma, so it is folded before NFKC, see BEFORE_NFKC)
  '\u03b1a \u03b2b \u03b5e \u03b7n \u03b9i \u03bak \u03bdv \u03bfo \u03c1p \u03c4t \u03c5u \u03c7x \u03b3y \u03c9w \u03bcu \u03c2s \u03b6z',
  '\u03c3o \u03f2c \u03f3j \u03f1p',
  // Greek capitals
  '\u0391a \u0392b \u0395e \u0396z \u0397h \u0399i \u039ak \u039cm \u039dn \u039fo \u03a1p \u03a4t \u03a5y \u03a7x',
  '\u03f9c \u037fj \u03dcf \u03fam',
  // Armenian
  '\u0578n \u0585o \u057du \u0570h \u0566q \u0581g \u057cn \u053cl \u0555o \u054du \u054fs',
  // Latin small capitals (the "small caps" of text generators) and phonetic letters
  '\u1d00a \u1d01ae \u1d03b \u1d04c \u1d05d \u1d06d \u1d07e \u1d09i \u1d0aj \u1d0bk \u1d0cl \u1d0dm \u1d0en \u1d0fo \u1d11o \u1d13o',
  '\u1d18p \u1d19r \u1d1ar \u1d1bt \u1d1cu \u1d20v \u1d21w \u1d22z \u1d26r \u1d28n \u1d29p \u1d7bi \u1d7eu',
  '\u0262g \u026ai \u0274n \u0276oe \u0280r \u0281r \u028fy \u0299b \u029bg \u029ch \u029fl \ua730f \ua731s \ua7aei',
  // Latin letters with hooks, strokes, tildes and tails that NFD does not take apart
  '\u0131i \u0237j \u00dfss \u00f8o \u0153oe \u00e6ae \u0142l \u0111d \u0127h \u0167t',
  '\u0180b \u0183b \u0188c \u018cd \u0192f \u019al \u019en \u01a5p \u01abt \u01adt \u01b4y \u01b6z \u01c0i \u01e5g \u0225z \u0240z',
  '\u0247e \u0249j \u024bq \u024dr \u0251a \u0253b \u0255c \u0256d \u0257d \u025be \u0260g \u0266h \u0268i \u0269i \u026bl \u026cl',
  '\u026dl \u0271m \u0272n \u0273n \u0275o \u027cr \u027dr \u027er \u0282s \u0288t \u0289u \u0290z \u0291z \u029dj \u02a0q',
  '\u1d6cb \u1d6dd \u1d6ef \u1d6fm \u1d70n \u1d71p \u1d72r \u1d73r \u1d74s \u1d75t \u1d76z \u1d7dp',
  '\u1d80b \u1d81d \u1d82f \u1d83g \u1d84k \u1d85l \u1d86m \u1d87n \u1d88p \u1d89r \u1d8as \u1d8cv \u1d8dx \u1d8ez',
  // Coptic, capitals and small letters
  '\u2c80a \u2c81a \u2c82b \u2c83b \u2c84r \u2c85r \u2c88e \u2c89e \u2c8cz \u2c8dz \u2c8eh \u2c8fh \u2c92i \u2c93i \u2c94k \u2c95k',
  '\u2c98m \u2c99m \u2c9an \u2c9bn \u2c9eo \u2c9fo \u2ca1n \u2ca2p \u2ca3p \u2ca4c \u2ca5c \u2ca6t \u2ca7t \u2ca8y \u2ca9y \u2cacx',
  '\u2cadx \u2cb1w \u2cd0l \u2cd1l',
  // Cherokee capitals (their small letters, which look the same, are added below)
  '\u13a0d \u13a1r \u13a2t \u13a5i \u13a9y \u13aaa \u13abj \u13ace \u13b3w \u13b7m \u13bbh \u13bdy \u13c0g \u13c2h \u13c3z \u13cfb',
  '\u13d2r \u13d5s \u13d9v \u13das \u13del \u13dfc \u13e2p \u13e6k \u13f3g \u13f4b',
  // Lisu
  '\ua4d0b \ua4d1p \ua4d3d \ua4d4t \ua4d6g \ua4d7k \ua4d9j \ua4dac \ua4dcz \ua4ddf \ua4dfm \ua4e0n \ua4e1l \ua4e2s \ua4e3r \ua4e6v',
  '\ua4e7h \ua4eaw \ua4ebx \ua4ecy \ua4eea \ua4f0e \ua4f2i \ua4f3o \ua4f4u',
  // Zeros (and the Arabic-Indic fives) that look like the letter o, as the leetspeak 0 is read
  '\u0966o \u07c0o \u09e6o \u0a66o \u0ae6o \u0b66o \u0be6o \u0c66o \u0ce6o \u0d66o \u0e50o \u0ed0o \u1040o \u0665o \u06f5o'
]

export const HOMOGLYPHS: ReadonlyMap<string, string> = (() => {
  const map = new Map(HOMOGLYPH_LIST.join(' ').split(' ').map(pair => [pair[0], pair.slice(1)] as [string, string]))
  // Cherokee small letters look like their capitals (U+13A0-13EF to U+AB70-ABBF, 13F0-13F5 to 13F8-13FD).
  for (const [from, to] of [...map]) if (from >= '\u13a0' && from <= '\u13f5') map.set(from.toLowerCase(), to)
  // Parenthesized small letters (U+249C to U+24B5): NFKC writes them "(a)", a letter the rules
  // read alone, so that an instruction in them passed; folded before NFKC (BEFORE_NFKC).
  for (let i = 0; i < 26; i++) map.set(String.fromCharCode(0x249c + i), String.fromCharCode(97 + i))
  return map
})()

// The table as a lookup by char code, built once: FOLD_AT[c] is 1 + the index in FOLD_TO of the
// reading of the character of code c, 0 when it has none.
const FOLD_AT = new Uint16Array(0x10000)
const FOLD_TO: string[] = []
for (const [from, to] of HOMOGLYPHS) { FOLD_TO.push(to); FOLD_AT[from.charCodeAt(0)] = FOLD_TO.length }
// The look-alikes that NFKC would turn into another letter first (lunate sigma into sigma):
// folded before it.
const BEFORE_NFKC_CHARS = [...HOMOGLYPHS.keys()].filter(c => c.normalize('NFKC') !== c && HOMOGLYPHS.get(c.normalize('NFKC')) !== HOMOGLYPHS.get(c)).join('')
const BEFORE_NFKC = new RegExp(`[${BEFORE_NFKC_CHARS}]`)
const BEFORE_NFKC_ALL = new RegExp(BEFORE_NFKC.source, 'g')

function foldHomoglyphs (text: string): string {
  let out = ''
  let from = 0
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i)
    if (c < 0x80) continue
    const at = FOLD_AT[c]
    if (at !== 0) {
      out += text.slice(from, i) + FOLD_TO[at - 1]
      from = i + 1
    }
  }
  return from === 0 ? text : out + text.slice(from)
}

const isLetter = (c: number): boolean => c >= 97 && c <= 122
// Space, tab, line breaks (letters written one a line: LF, CR, and the Unicode line and
// paragraph separators, which NFKC keeps and which passed), every ASCII punctuation mark but
// leetspeak's @ and $ (only . - _ * / | , : were: a semicolon, a plus, a tilde, a quote passed),
// the middle dots and bullets, and the Unicode hyphen and dashes (NFKC makes the non-breaking
// hyphen, U+2011, a U+2010).
const ASCII_SPACERS = charTable(' \t\n\r!"#%&\'()*+,-./:;<=>?[\\]^_`{|}~')
const isSpacer = (c: number): boolean => c < 128
  ? ASCII_SPACERS[c] === 1
  : c === 0x2028 || c === 0x2029 || (c >= 0x2010 && c <= 0x2015) || c === 0x00b7 || c === 0x2022 || c === 0x2027 || c === 0x2219 || c === 0x22c5 || c === 0x30fb
// Punctuation that may take one space after it and still be one spacer: `i, g, n`, `i. g. n`, `i: g: n`, `i; g; n`.
const isPunctuationSpacer = (c: number): boolean => c === 44 || c === 46 || c === 58 || c === 59

// The kinds of spacer (spacerAt); each but ONE_SPACER is two characters long.
const ONE_SPACER = 1
const CRLF_SPACER = 2
const PUNCTUATION_SPACE_SPACER = 3
const DOUBLED_SPACER = 4

/**
 * The kind of the spacer at `i`: one spacer character, CR LF, `,` `.` `:` `;` and one space
 * after it, or one spacer character written twice (`i  g  n`, one letter a paragraph: an array's
 * texts are read with a blank line between them); 0 when none.
 */
function spacerAt (text: string, i: number): number {
  const c = text.charCodeAt(i)
  if (c === 13 && text.charCodeAt(i + 1) === 10) return CRLF_SPACER
  if (isPunctuationSpacer(c) && text.charCodeAt(i + 1) === 32) return PUNCTUATION_SPACE_SPACER
  if (!isSpacer(c)) return 0
  return text.charCodeAt(i + 1) === c ? DOUBLED_SPACER : ONE_SPACER
}

/**
 * Joins letters spaced out one by one (`i g n o r e`, `i.g.n.o.r.e`, `i, g, n, o, r, e`, one a
 * line): a run of at least three single letters each followed by one spacer becomes one word.
 * A word's spacers are all of the kind of its first (spacerAt): two or more spacers end a word, so
 * `i g n o r e   a l l` gives `ignore all`, and so does `i.g.n.o.r.e. a.l.l` (a spacer `. ` after
 * spacers `.`). One pass over the text.
 */
export function joinSpacedLetters (text: string): string {
  let out = ''
  let from = 0
  const n = text.length
  let i = 0
  while (i < n) {
    const c = text.charCodeAt(i)
    if (isLetter(c) && (i === 0 || !isLetter(text.charCodeAt(i - 1)))) {
      let word = text[i]
      let j = i
      let kind = 0
      // j: the last letter taken; the next one is a single letter after one spacer.
      for (;;) {
        const gap = spacerAt(text, j + 1)
        const k = j + 1 + (gap === ONE_SPACER ? 1 : 2)
        if (gap === 0 || (kind !== 0 && gap !== kind) || k >= n || !isLetter(text.charCodeAt(k)) || (k + 1 < n && isLetter(text.charCodeAt(k + 1)))) break
        kind = gap
        word += text[k]
        j = k
      }
      if (word.length >= 3) {
        out += text.slice(from, i) + word
        from = j + 1
        i = j + 1
        continue
      }
      i = j + 1
      continue
    }
    i++
  }
  return from === 0 ? text : out + text.slice(from)
}

// Leetspeak, by char code: 0 1 3 4 5 7 8 @ $ read as o i e a s t b a s.
const LEET_CODES = new Uint8Array(128)
for (const [from, to] of Object.entries(LEET)) LEET_CODES[from.charCodeAt(0)] = to.charCodeAt(0)

/** A word's key: its first four letters (or the whole word when shorter), packed 5 bits each. */
export function packKey (word: string): number {
  let key = 0
  for (let i = 0; i < 4; i++) key = key * 32 + (i < word.length ? word.charCodeAt(i) - 96 : 0)
  return key
}

export interface RulesView {
  /** ' w1 w2 ... wn ': lowercase ASCII words, one space apart. */
  readonly words: string
  /**
   * The keys (packKey) of its words: of every word its first four letters, and of words of ten
   * letters or more also the first two and three; with `only` (a keyFilter), just those it may
   * hold. A view of a buffer the next call reuses.
   */
  readonly keys: Int32Array
  /** Where in `words` the word of each key starts. */
  readonly starts: Int32Array
  /**
   * Whether the text is ASCII with no control character: what `normalizeForMarkers` makes of
   * it is then its lowercase.
   */
  readonly plain: boolean
}

// Reused by every call (the view is read right away, by the same synchronous scan): the text's
// bytes, the bytes of the words and their keys. They grow with the texts scanned up to
// SHARED_CHARS; a longer text gets buffers of its own, so that one large prompt does not pin
// megabytes.
const SHARED_CHARS = 65536
let textBuf = Buffer.allocUnsafeSlow(3 * 4096 + 1)
let wordBuf = Buffer.allocUnsafe(4096)
let keyBuf = new Int32Array(4096)
let startBuf = new Int32Array(4096)
let bytes = textBuf
let words = wordBuf
let keys = keyBuf
let starts = startBuf

/**
 * Points `bytes`, `words`, `keys` and `starts` at buffers for a text of n characters: 3n + 1
 * bytes (its UTF-8, whatever it holds, and one more), n + 2 bytes of words and n + 3 keys.
 */
function buffersFor (n: number): void {
  if (n + 3 > wordBuf.length && n <= SHARED_CHARS) {
    textBuf = Buffer.allocUnsafeSlow(3 * n + 3)
    wordBuf = Buffer.allocUnsafe(n + 3)
    keyBuf = new Int32Array(n + 3)
    startBuf = new Int32Array(n + 3)
  }
  const shared = n + 3 <= wordBuf.length
  bytes = shared ? textBuf : Buffer.allocUnsafe(3 * n + 3)
  words = shared ? wordBuf : Buffer.allocUnsafe(n + 3)
  keys = shared ? keyBuf : new Int32Array(n + 3)
  starts = shared ? startBuf : new Int32Array(n + 3)
}

/**
 * The text's characters as bytes in `bytes` (buffersFor), followed by a space; false, and
 * nothing to read, when it is not ASCII.
 */
function asciiBytes (s: string): boolean {
  const n = s.length
  buffersFor(n)
  // The buffer holds the whole of the text's UTF-8 (at most 3 bytes per UTF-16 code unit), in
  // which any character outside ASCII takes two bytes or more: n bytes means ASCII.
  if (bytes.write(s, 0, 'utf8') !== n) return false
  bytes[n] = 32
  return true
}

// How collapse reads each byte of an ASCII text: a lowercase letter (ASCII letters lowercased,
// leetspeak read as letters), DROPPED (control characters) or 0, a separator (everything else).
const DROPPED = 1
const READ_AS = new Uint8Array(256)
for (let c = 0; c < 128; c++) {
  if (c >= 65 && c <= 90) READ_AS[c] = c + 32
  else if (c >= 97 && c <= 122) READ_AS[c] = c
  else if (LEET_CODES[c] !== 0) READ_AS[c] = LEET_CODES[c]
  else if ((c < 32 && c !== 9 && c !== 10 && c !== 13) || c === 127) READ_AS[c] = DROPPED
}

// A filter of word keys: 2^14 bits (2 KB, small enough to stay in the CPU's nearest cache while
// a text is collapsed), one per key, at a multiplicative hash of it. It may let through a key
// not in its set (about 1% of words for 164 keys), never the other way round.
const FILTER_SHIFT = 18
const filterSlot = (key: number): number => Math.imul(key, 0x9e3779b1) >>> FILTER_SHIFT

/** A filter (for `rulesView`'s `only`) that holds these keys. */
export function keyFilter (keys: Iterable<number>): Uint8Array {
  const filter = new Uint8Array(1 << (32 - FILTER_SHIFT - 3))
  for (const key of keys) { const slot = filterSlot(key); filter[slot >>> 3] |= 1 << (slot & 7) }
  return filter
}

function mayHold (filter: Uint8Array, key: number): boolean {
  const slot = filterSlot(key)
  return (filter[slot >>> 3] & (1 << (slot & 7))) !== 0
}

interface Collapsed { length: number, keyCount: number, spaced: boolean, control: boolean }

/**
 * One pass over an ASCII text's bytes (asciiBytes): letters lowercased, leetspeak read as
 * letters, control characters dropped, every other run one space, written into `words`; the
 * key of each word, and where the word starts, into `keys` and `starts`. Reports whether three
 * or more one-letter words came in a row (letters spaced out). With `check`, it gives up (null)
 * at the first markup comment delimiter: the text then needs the full normalization first.
 * Bytes, not charCodeAt: rulesView costs 3-20% less at 1, 4 and 20 KB (A/B in one process).
 */
function collapse (s: string, check: boolean, only: Uint8Array | null): Collapsed | null {
  const n = s.length
  const text = bytes
  const buf = words
  const out = keys
  const at = starts
  let len = 1
  buf[0] = 32
  let keyCount = 0
  let wordStart = 1
  let singles = 0
  let spaced = false
  let control = false
  // text[n] is a space (asciiBytes): it ends the last word.
  for (let i = 0; i <= n; i++) {
    const c = text[i]
    const read = READ_AS[c]
    if (read >= 97) { buf[len++] = read; continue }
    if (read === DROPPED) { control = true; continue }
    if (check && DELIMITER_START[c] === 1 && startsDelimiter(s, i, c)) return null
    const w = len - wordStart
    if (w === 0) continue
    const c0 = buf[wordStart] - 96
    const c1 = w > 1 ? buf[wordStart + 1] - 96 : 0
    const c2 = w > 2 ? buf[wordStart + 2] - 96 : 0
    const c3 = w > 3 ? buf[wordStart + 3] - 96 : 0
    const key = ((c0 * 32 + c1) * 32 + c2) * 32 + c3
    if (only === null || mayHold(only, key)) { out[keyCount] = key; at[keyCount++] = wordStart }
    if (w >= 10) {
      const key2 = (c0 * 32 + c1) * 1024
      const key3 = ((c0 * 32 + c1) * 32 + c2) * 32
      if (only === null || mayHold(only, key2)) { out[keyCount] = key2; at[keyCount++] = wordStart }
      if (only === null || mayHold(only, key3)) { out[keyCount] = key3; at[keyCount++] = wordStart }
    }
    if (w === 1) { if (++singles >= 3) spaced = true } else singles = 0
    buf[len++] = 32
    wordStart = len
  }
  return { length: len, keyCount, spaced, control }
}

// Characters outside ASCII, in runs: collapse reads each as a separator, and so one space.
// eslint-disable-next-line no-control-regex -- the ASCII range
const NOT_ASCII_RUN = /[^\x00-\x7f]+/g

/** Collapses a text that needed no check, its characters outside ASCII read as separators. */
function collapseAny (text: string, only: Uint8Array | null): Collapsed {
  let s = text
  if (!asciiBytes(s)) {
    s = s.replace(NOT_ASCII_RUN, ' ')
    asciiBytes(s)
  }
  return collapse(s, false, only) as Collapsed
}

// The first characters of the markup comment delimiters (<!--, ->, /*, */, {#, #}).
const DELIMITER_START = charTable('<-/*{#')
function startsDelimiter (s: string, i: number, c: number): boolean {
  const next = s.charCodeAt(i + 1)
  switch (c) {
    case 60: return next === 33 && s.startsWith('--', i + 2) // <!--
    case 45: return next === 62 // ->
    case 47: return next === 42 // /*
    case 42: return next === 47 // */
    case 123: return next === 35 // {#
    default: return next === 125 // #}
  }
}

// A hyphen (or a soft hyphen) at a line's end between two letters: a word broken across lines,
// as wrapped or PDF text writes it.
const LINE_END_HYPHEN = /(\p{L})[-\u00ad\u2010\u2011]\r?\n[ \t]{0,8}(?=\p{L})/gu

/**
 * The text with its words hyphenated across a line break made whole ("in-\nstructions" is
 * "instructions"); null when it holds none: the rules read the two halves as two words.
 */
export function unhyphenated (text: string): string | null {
  if (!text.includes('\n')) return null
  const whole = text.replace(LINE_END_HYPHEN, '$1')
  return whole === text ? null : whole
}

// Markup comments, by their delimiters: HTML, C-style and Jinja/Twig (as COMMENT_DELIMITERS).
const COMMENTS: ReadonlyArray<readonly [string, string]> = [['<!--', '-->'], ['/*', '*/'], ['{#', '#}']]

/**
 * The text without its markup comments, content and all, as markup shows it; null when it holds
 * none. The rules read comments' delimiters removed and their words kept (a hidden instruction
 * is read), and so a comment inside a word split it ("Ign<!-- x -->ore" read "ign x ore"): this is
 * the other reading. One pass: each opener and closer is searched for once from where the last
 * search of its kind stopped, and a kind with an opener that is never closed is looked for no more.
 */
export function withoutComments (text: string): string | null {
  if (!text.includes('<!--') && !text.includes('/*') && !text.includes('{#')) return null
  const next = COMMENTS.map(([open]) => text.indexOf(open))
  let out = ''
  let at = 0
  for (;;) {
    let kind = -1
    for (let k = 0; k < COMMENTS.length; k++) if (next[k] >= 0 && (kind < 0 || next[k] < next[kind])) kind = k
    if (kind < 0) break
    const [open, close] = COMMENTS[kind]
    const start = next[kind]
    const end = text.indexOf(close, start + open.length)
    if (end < 0) { next[kind] = -1; continue }
    out += text.slice(at, start)
    at = end + close.length
    // Openers inside the comment just cut are no openers.
    for (let k = 0; k < COMMENTS.length; k++) if (next[k] >= 0 && next[k] < at) next[k] = text.indexOf(COMMENTS[k][0], at)
  }
  return at === 0 ? null : out + text.slice(at)
}

// ANSI escape sequences (CSI: ESC [ or U+009B, parameters, a final byte), which a terminal shows
// as nothing (colour, bold): only their escape character was removed, as a control, and the rest
// joined the word it touched ("\x1b[31mIgnore" read "eimignore", and passed every rule).
// eslint-disable-next-line no-control-regex -- the escape characters
const ANSI_CSI = /(?:\u001b\[|\u009b)[\u0030-\u003f]{0,32}[\u0020-\u002f]{0,8}[\u0040-\u007e]/g

/**
 * The text as the injection rules read it: lowercase ASCII words, one space between words,
 * with the keys of its words. ANSI escape sequences removed, NFKC (full-width and compatibility
 * forms), invisible characters removed, diacritics dropped, homoglyphs folded, markup comment delimiters removed, leetspeak
 * undone, letters spaced out one
 * by one joined, everything that is not a letter one space.
 */
export function rulesView (text: string, only: Uint8Array | null = null): RulesView {
  // Optimization: most texts are ASCII with no comment delimiter; copying the text's bytes tells
  // the first, the one pass that collapses them checks the second, and only the other texts are
  // normalized first and collapsed again.
  let s = text.includes('\u001b') || text.includes('\u009b') ? text.replace(ANSI_CSI, '') : text
  const ascii = asciiBytes(s)
  let collapsed = ascii ? collapse(s, true, only) : null
  // A text that held an escape sequence held a control character: not plain.
  const plain = collapsed !== null && !collapsed.control && s === text
  if (collapsed === null) {
    if (!ascii) s = plainLetters(s)
    if (s.includes('<!--') || s.includes('->') || s.includes('/*') || s.includes('*/') || s.includes('{#') || s.includes('#}')) s = s.replace(COMMENT_DELIMITERS, '')
    collapsed = collapseAny(s, only)
  }
  if (collapsed.spaced) {
    const lower = s.toLowerCase()
    collapsed = collapseAny(joinSpacedLetters(lower.replace(LEET_CHARS, (c) => LEET[c])), only)
  }
  return { words: words.toString('latin1', 0, collapsed.length), keys: keys.subarray(0, collapsed.keyCount), starts: starts.subarray(0, collapsed.keyCount), plain }
}

/** The words of `rulesView`, alone. */
export function normalizeForRules (text: string): string {
  return rulesView(text).words
}

// Letters in a negative circle or square and the regional indicators (U+1F150, U+1F170,
// U+1F1E6, A to Z each): no decomposition, and beyond the BMP table, so an instruction written in
// them read as no words and passed, where circled and squared letters (NFKC: the letter) were
// found. Read as the letter, a flag as its two letters.
const ENCLOSED = /[\u{1F150}-\u{1F169}\u{1F170}-\u{1F189}\u{1F1E6}-\u{1F1FF}]/u
const ENCLOSED_ALL = new RegExp(ENCLOSED.source, 'gu')
function unenclosed (c: string): string {
  const code = c.codePointAt(0)!
  return String.fromCharCode(97 + code - (code >= 0x1F1E6 ? 0x1F1E6 : code >= 0x1F170 ? 0x1F170 : 0x1F150))
}

/**
 * A text that is not ASCII, for the rules: NFKC, invisible characters removed, diacritics dropped
 * (before folding: an accented look-alike such as ό or ѐ is in no table, its base letter is),
 * look-alikes folded (capitals by their own look), lowercase, look-alikes folded again.
 */
function plainLetters (text: string): string {
  if (BEFORE_NFKC.test(text)) text = text.replace(BEFORE_NFKC_ALL, c => HOMOGLYPHS.get(c)!)
  if (ASTRAL.test(text) && ENCLOSED.test(text)) text = text.replace(ENCLOSED_ALL, unenclosed)
  const s = foldHomoglyphs(unmarked(visible(text.normalize('NFKC')).normalize('NFD')))
  return foldHomoglyphs(s.toLowerCase())
}

// Controls that break a line (vertical tab, form feed, NEL): a LF in the markers view, where a
// line's start counts (`system:`), not removed as the other controls are (the marker then joined
// the line before it, and passed).
const LINE_BREAK_CONTROLS = /[\v\f\u0085]/
const LINE_BREAK_CONTROLS_ALL = new RegExp(LINE_BREAK_CONTROLS.source, 'g')

/**
 * The text for rules that read punctuation (chat-template delimiters): line-breaking controls a
 * LF, NFKC, invisible characters removed, diacritics dropped and look-alikes folded as for the
 * word rules (a Cyrillic І in `[INST]` hid it), lowercase.
 */
export function normalizeForMarkers (text: string): string {
  if (LINE_BREAK_CONTROLS.test(text)) text = text.replace(LINE_BREAK_CONTROLS_ALL, '\n')
  return NOT_ASCII.test(text) ? plainLetters(text) : visible(text).toLowerCase()
}

// --- escapes a model reads as what they stand for ---------------------------------------------

// HTML character references (numeric, and the named ones of markup: `&lt;|im_start|&gt;`), runs
// of percent-escapes (UTF-8 bytes, as URLs write them) and of \x escapes (bytes, as C and Python
// write them), and \u escapes (JSON, JavaScript: \u0069, \u{69}), in one search.
const ESCAPE = /((?:%[0-9A-Fa-f]{2}){1,4096})|&#(?:[xX]([0-9A-Fa-f]{1,8})|([0-9]{1,10}));?|&(lt|gt|amp|quot|apos|nbsp);|((?:\\x[0-9A-Fa-f]{2}){1,4096})|\\u(?:([0-9A-Fa-f]{4})|\{([0-9A-Fa-f]{1,6})\})/g
const NAMED_REFERENCES: Readonly<Record<string, string>> = { lt: '<', gt: '>', amp: '&', quot: '"', apos: "'", nbsp: '\u00a0' }
const HAS_ESCAPE = /&#|&(?:lt|gt|amp|quot|apos|nbsp);|%[0-9A-Fa-f]{2}|\\x[0-9A-Fa-f]{2}|\\u[0-9A-Fa-f{]/

/** What one escape (a match of ESCAPE) stands for. */
function unescape (m: RegExpExecArray): string {
  const [whole, percent, hex, decimal, name, bytes, unit, point] = m
  // A run of percent or \x escapes that is no UTF-8 has U+FFFD in place of its bad bytes.
  if (percent !== undefined) return Buffer.from(percent.replace(/%/g, ''), 'hex').toString('utf8')
  if (bytes !== undefined) return Buffer.from(bytes.replace(/\\x/g, ''), 'hex').toString('utf8')
  if (name !== undefined) return NAMED_REFERENCES[name]
  // A \u escape is a UTF-16 unit, a surrogate too (a pair of them is one character).
  if (unit !== undefined) return String.fromCharCode(parseInt(unit, 16))
  const code = hex !== undefined ? parseInt(hex, 16) : point !== undefined ? parseInt(point, 16) : Number(decimal)
  // A code point that is none (beyond U+10FFFF, a surrogate, NUL) is left as written.
  return code > 0 && code <= 0x10ffff && (code < 0xd800 || code > 0xdfff) ? String.fromCodePoint(code) : whole
}

/**
 * The text with its HTML character references, percent-escapes and backslash escapes decoded, with where each of its
 * units comes from (as visibleCopy's: a decoded unit maps to its whole escape), or null when it
 * holds none: an instruction written in them (`&#73;gnore`, `%59%6F%75%20%61%72%65`) is read by a
 * model as what they stand for, and passed every rule; an address in a pasted URL
 * (`?email=marie%40orange.fr`) was never found.
 */
export function unescapedCopy (text: string): VisibleCopy | null {
  if ((!text.includes('&') && !text.includes('%') && !text.includes('\\')) || !HAS_ESCAPE.test(text)) return null
  // A decoded escape is never longer than the escape: the copy has text.length units at most.
  const from = new Int32Array(text.length)
  const to = new Int32Array(text.length)
  let out = ''
  let len = 0
  let at = 0
  const kept = (end: number): void => {
    for (let i = at; i < end; i++) { from[len] = i; to[len++] = i + 1 }
    out += text.slice(at, end)
  }
  ESCAPE.lastIndex = 0
  let m: RegExpExecArray | null
  while ((m = ESCAPE.exec(text)) !== null) {
    kept(m.index)
    const decoded = unescape(m)
    const end = m.index + m[0].length
    for (let k = 0; k < decoded.length; k++) { from[len] = m.index; to[len++] = end }
    out += decoded
    at = end
  }
  kept(text.length)
  return out === text ? null : { text: out, from: from.subarray(0, len), to: to.subarray(0, len) }
}

/** The text with its HTML character references and percent-escapes decoded (unescapedCopy), or null. */
export function unescaped (text: string): string | null {
  return unescapedCopy(text)?.text ?? null
}

// --- the visible copy, for the secret and personal-data detectors ----------------------------

// Spaces other than the ASCII one (no-break, narrow, ideographic, Ogham, line and paragraph
// separators, NEL): read as a space.
const UNICODE_SPACE = /[\p{Zs}\u0085\u2028\u2029]/u
// What a visible copy changes (a character that is not NFKC by itself, an invisible one, a
// Unicode space), per BMP char code, found once a code is first met: 0 not looked at yet,
// 1 kept as it is, 2 changed. 64 KB, bounded by the codes.
const KEEP = 1
const CHANGE = 2
const VISIBLE_AS = new Uint8Array(0x10000)
for (let c = 0; c < 0x80; c++) VISIBLE_AS[c] = (c < 32 && c !== 9 && c !== 10 && c !== 13) || c === 127 ? CHANGE : KEEP

/** What the visible copy holds for one character (a code point): '', ' ', or its NFKC. */
function visibleChar (ch: string): string {
  if (UNICODE_SPACE.test(ch)) return ' '
  if (INVISIBLE_PROPERTY.test(ch)) return ''
  return ch.normalize('NFKC')
}

// The visible form of each BMP character met so far (undefined: not yet): the copy of a text
// full of characters NFKC rewrites called visibleChar (two regular expressions and a normalize)
// for each of them, a third of its scan. 64 K entries at most, bounded by the codes.
const VISIBLE_OF: Array<string | undefined> = new Array<string | undefined>(0x10000)

function visibleBmp (c: number): string {
  let seen = VISIBLE_OF[c]
  if (seen === undefined) VISIBLE_OF[c] = seen = visibleChar(String.fromCharCode(c))
  return seen
}

function changes (c: number): boolean {
  let as = VISIBLE_AS[c]
  if (as === 0) VISIBLE_AS[c] = as = visibleBmp(c) === String.fromCharCode(c) ? KEEP : CHANGE
  return as === CHANGE
}

export interface VisibleCopy {
  /** The text as read: each character NFKC on its own, invisible characters removed, Unicode spaces a space. */
  readonly text: string
  /** For each UTF-16 unit of `text`, where the character it comes from starts in the raw text, and where it ends. */
  readonly from: Int32Array
  readonly to: Int32Array
}

/**
 * The text as a reader sees it, for the secret and personal-data detectors (a full-width
 * `＠`, a no-break space between card groups, a zero-width space inside a key hid them), with
 * where each of its units comes from, so that a span found in it is redacted in the raw text.
 * Null when it would be the text itself. Each character is normalized on its own (NFKC of the
 * whole text composes across characters, and its units no longer map back one by one).
 */
export function visibleCopy (text: string): VisibleCopy | null {
  const n = text.length
  let i = 0
  while (i < n) {
    const c = text.charCodeAt(i)
    if ((c >= 0xd800 && c <= 0xdbff) || changes(c)) break
    i++
  }
  if (i === n) return null
  // The copy has n units or fewer unless NFKC expands a character (to 18 units at most, U+FDFA).
  let from = new Int32Array(n + 16)
  let to = new Int32Array(n + 16)
  let len = 0
  const room = (more: number): void => {
    if (len + more <= from.length) return
    const size = Math.max(2 * from.length, len + more)
    const f = new Int32Array(size); f.set(from.subarray(0, len)); from = f
    const t = new Int32Array(size); t.set(to.subarray(0, len)); to = t
  }
  for (; len < i; len++) { from[len] = len; to[len] = len + 1 }
  let out = ''
  // The start of the run of kept units not yet added to `out`.
  let run = 0
  while (i < n) {
    const c = text.charCodeAt(i)
    const astral = c >= 0xd800 && c <= 0xdbff && i + 1 < n
    if (!astral && !changes(c)) {
      room(1)
      from[len] = i; to[len++] = i + 1
      i++
      continue
    }
    const width = astral ? 2 : 1
    const seen = astral ? visibleChar(text.slice(i, i + 2)) : visibleBmp(c)
    out += text.slice(run, i) + seen
    room(seen.length)
    for (let k = 0; k < seen.length; k++) { from[len] = i; to[len++] = i + width }
    i += width
    run = i
  }
  out += text.slice(run)
  // Characters beyond the BMP are looked at one by one, and most (emoji) are kept.
  if (out === text) return null
  return { text: out, from: from.subarray(0, len), to: to.subarray(0, len) }
}
