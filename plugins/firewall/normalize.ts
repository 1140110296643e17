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
const INVISIBLE = new RegExp(`[${bmpClass(INVISIBLE_PROPERTY, '\t\n\r')}]`, 'g')
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
// between symbols, and such texts are not read a second time).
const BETWEEN_LETTERS = new RegExp(`[\\p{L}\\p{N}](?:${INVISIBLE.source}|${INVISIBLE_ASTRAL.source})+[\\p{L}\\p{N}]`, 'u')

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
 * Cyrillic, Greek and Armenian letters that look like Latin ones. Capitals are read by their own
 * look, before the text is lowercased: lowercase first, the Greek capital Ν (N) became ν, read as
 * v, and Η, Μ, Υ as n, u, u. The lowercase letters are folded again after lowercasing.
 */
const HOMOGLYPHS: ReadonlyMap<string, string> = new Map(
  // Each entry is the look-alike character followed by the Latin letter(s) it reads as.
  [
    // Cyrillic
    '\u0430a \u0431b \u0432b \u0435e \u0451e \u0454e \u043ak \u043cm \u043dh \u043eo \u0440p \u0441c \u0442t \u0443y \u0445x \u0456i \u0457i \u0458j \u0455s \u0501d \u051bq \u051dw \u04bbh \u0491r \u0433r \u043fn \u0438u \u044cb \u0261g',
    // Cyrillic capitals
    '\u0410a \u0412b \u0415e \u041ak \u041cm \u041dh \u041eo \u0420p \u0421c \u0422t \u0423y \u0425x \u0406i \u0408j \u0405s \u0500d \u051aq \u051cw \u04bah',
    // Greek
    '\u03b1a \u03b2b \u03b5e \u03b7n \u03b9i \u03bak \u03bdv \u03bfo \u03c1p \u03c4t \u03c5u \u03c7x \u03b3y \u03c9w \u03bcu \u03c2s \u03b6z',
    // Greek capitals
    '\u0391a \u0392b \u0395e \u0396z \u0397h \u0399i \u039ak \u039cm \u039dn \u039fo \u03a1p \u03a4t \u03a5y \u03a7x',
    // Armenian
    '\u0578n \u0585o \u057du \u0570h \u0566q \u0581g',
    // Latin look-alikes that NFKC keeps
    '\u0131i \u0237j \u00dfss \u00f8o \u0153oe \u00e6ae \u0142l \u0111d'
  ].join(' ').split(' ').map(pair => [pair[0], pair.slice(1)] as [string, string])
)

function foldHomoglyphs (text: string): string {
  let out = ''
  let from = 0
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i)
    if (c < 0x80) continue
    const folded = HOMOGLYPHS.get(text[i])
    if (folded !== undefined) {
      out += text.slice(from, i) + folded
      from = i + 1
    }
  }
  return from === 0 ? text : out + text.slice(from)
}

const isLetter = (c: number): boolean => c >= 97 && c <= 122
// Space, tab, line breaks (letters written one a line), . - _ * / |
const isSpacer = (c: number): boolean => c === 32 || c === 46 || c === 45 || c === 95 || c === 42 || c === 9 || c === 10 || c === 13 || c === 47 || c === 124

/** The length of the spacer at `i`: one spacer character, or CR LF as one; 0 when none. */
function spacerAt (text: string, i: number): number {
  const c = text.charCodeAt(i)
  if (c === 13 && text.charCodeAt(i + 1) === 10) return 2
  return isSpacer(c) ? 1 : 0
}

/**
 * Joins letters spaced out one by one (`i g n o r e`, `i.g.n.o.r.e`, one a line): a run of at
 * least three single letters each followed by one spacer becomes one word; two or more spacers
 * end a word, so `i g n o r e   a l l` gives `ignore all`. One pass over the text.
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
      // j: the last letter taken; the next one is a single letter after one spacer.
      for (;;) {
        const gap = spacerAt(text, j + 1)
        const k = j + 1 + gap
        if (gap === 0 || k >= n || !isLetter(text.charCodeAt(k)) || (k + 1 < n && isLetter(text.charCodeAt(k + 1)))) break
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

/**
 * The text as the injection rules read it: lowercase ASCII words, one space between words,
 * with the keys of its words. NFKC (full-width and compatibility forms), invisible characters
 * removed, diacritics dropped, homoglyphs folded, markup comment delimiters removed, leetspeak
 * undone, letters spaced out one by one joined, everything that is not a letter one space.
 */
export function rulesView (text: string, only: Uint8Array | null = null): RulesView {
  // Optimization: most texts are ASCII with no comment delimiter; copying the text's bytes tells
  // the first, the one pass that collapses them checks the second, and only the other texts are
  // normalized first and collapsed again.
  let s = text
  const ascii = asciiBytes(s)
  let collapsed = ascii ? collapse(s, true, only) : null
  const plain = collapsed !== null && !collapsed.control
  if (collapsed === null) {
    if (!ascii) s = plainLetters(s)
    if (s.includes('<!--') || s.includes('->') || s.includes('/*') || s.includes('*/') || s.includes('{#') || s.includes('#}')) s = s.replace(COMMENT_DELIMITERS, '')
    collapsed = collapseAny(s, only)
  }
  if (collapsed.spaced) collapsed = collapseAny(joinSpacedLetters(s.toLowerCase().replace(LEET_CHARS, (c) => LEET[c])), only)
  return { words: words.toString('latin1', 0, collapsed.length), keys: keys.subarray(0, collapsed.keyCount), starts: starts.subarray(0, collapsed.keyCount), plain }
}

/** The words of `rulesView`, alone. */
export function normalizeForRules (text: string): string {
  return rulesView(text).words
}

/**
 * A text that is not ASCII, for the rules: NFKC, invisible characters removed, diacritics dropped
 * (before folding: an accented look-alike such as ό or ѐ is in no table, its base letter is),
 * look-alikes folded (capitals by their own look), lowercase, look-alikes folded again.
 */
function plainLetters (text: string): string {
  const s = foldHomoglyphs(unmarked(visible(text.normalize('NFKC')).normalize('NFD')))
  return foldHomoglyphs(s.toLowerCase())
}

/**
 * The text for rules that read punctuation (chat-template delimiters): NFKC, invisible
 * characters removed, diacritics dropped and look-alikes folded as for the word rules (a
 * Cyrillic І in `[INST]` hid it), lowercase.
 */
export function normalizeForMarkers (text: string): string {
  return NOT_ASCII.test(text) ? plainLetters(text) : visible(text).toLowerCase()
}
