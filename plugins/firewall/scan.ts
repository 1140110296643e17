// One scan of one text: injection rules on the normalized text, secrets and personal data on
// the raw text, and the same again inside base64 and hex runs that decode to text (bounded in
// count, size and depth). Plain functions: the plugin only wires them into the pipeline.
import { rulesView, normalizeForMarkers, invisibleAsSpaces, unescapedCopy, unhyphenated, visibleCopy, withoutComments, type VisibleCopy } from './normalize.js'
import { INJECTION_RULES, RULE_KEYS, hasMarkerGate, matchWordRules } from './injection.js'
import { findSpans, type Category, type Detection } from './detectors.js'
import { charTable, hasRun } from './text.js'
import type { Finding, RiskLevel } from '../pipeline/index.js'

export type { Category, Detection } from './detectors.js'
export type { Finding } from '../pipeline/index.js'
export type { RiskLevel }

/** Bounds of the decoding of embedded base64/hex runs. */
export const DECODE_LIMITS = Object.freeze({
  /** Nested encodings followed (base64 of base64 is 2). */
  depth: 2,
  /** Runs decoded per text. */
  runsPerText: 8,
  /** Characters of one run decoded (longer runs are decoded up to this). */
  runChars: 16384,
  /** Decoded characters scanned per field (a string, or all the texts of an array or object), all runs and depths together. */
  totalDecoded: 65536,
  /** Shortest run looked at. */
  minRun: 24
})

// Single character classes, greedy and global: each match consumes its whole run. A base64 run
// goes on across line breaks (the `base64` command, MIME: 76 characters a line), each line of
// four characters or more: decoded line by line, an instruction across a break was never whole.
const BASE64_RUN = /[A-Za-z0-9+/_-]{24,}(?:\r?\n[A-Za-z0-9+/_-]{4,})*={0,2}/g
const LINE_BREAKS = /\r?\n/g
const HEX_RUN = /(?<![0-9A-Fa-f])[0-9A-Fa-f]{32,}(?![0-9A-Fa-f])/g

/** The share of characters a human would read as text. */
function readable (s: string): boolean {
  if (s.length < 8) return false
  let good = 0
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i)
    if ((c >= 32 && c < 127) || c === 10 || c === 13 || c === 9 || (c >= 0xa0 && c !== 0xfffd)) good++
  }
  return good / s.length >= 0.9
}

interface Budget { decoded: number }

// Base64 characters (with the URL alphabet and padding), for the pre-check. Hex digits are
// among them, and a hex run (32 or more) is longer than the shortest base64 run: a text with
// no base64 run long enough has no hex run either.
const B64_CHARS = charTable('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/_-=')

/** Whether the text holds a run of base64 characters long enough to be an encoded payload. */
export const hasLongRun = (text: string): boolean => hasRun(text, B64_CHARS, DECODE_LIMITS.minRun)

/** The text as the marker rules read it, or '' when it holds none of their gates. */
function markersView (text: string, plain: boolean): string {
  // A plain text is searched as it is: no lowercase copy is made to find that none is there.
  if (plain) return hasMarkerGate(text) ? text.toLowerCase() : ''
  const markers = normalizeForMarkers(text)
  return hasMarkerGate(markers) ? markers : ''
}

/**
 * The base64 and hex runs of a text decoded and scanned again: the raw text's, then those of
 * its visible copy `seen` (null: none) that are not the raw text's, their spans mapped back to
 * the raw characters they were read from. The runs of both count toward runsPerText.
 */
function decodeRuns (raw: string, seen: VisibleCopy | null, depth: number, budget: Budget, out: Detection[]): void {
  if (depth >= DECODE_LIMITS.depth) return
  let runs = 0
  // The raw text's runs, by encoding and span, when there is a copy: not decoded again in it.
  let rawRuns = null as Set<string> | null
  for (const copy of seen === null ? [null] : [null, seen]) {
    const text = copy === null ? raw : copy.text
    // Optimization: most texts hold no run long enough; the regexes below are not even tried.
    if (!hasLongRun(text)) continue
    for (const [re, encoding] of [[BASE64_RUN, 'base64'], [HEX_RUN, 'hex']] as const) {
      re.lastIndex = 0
      let m: RegExpExecArray | null
      while ((m = re.exec(text)) !== null && runs < DECODE_LIMITS.runsPerText && budget.decoded > 0) {
        const start = copy === null ? m.index : copy.from[m.index]
        const end = copy === null ? m.index + m[0].length : copy.to[m.index + m[0].length - 1]
        if (seen !== null) {
          const span = encoding + start + ':' + end
          if (copy === null) (rawRuns ??= new Set()).add(span)
          else if (rawRuns?.has(span) === true) continue
        }
        let run = (encoding === 'base64' && m[0].includes('\n') ? m[0].replace(LINE_BREAKS, '') : m[0]).slice(0, DECODE_LIMITS.runChars)
        // A run of hex digits is decoded as hex, not as base64.
        if (encoding === 'base64' && /^[0-9A-Fa-f]+$/.test(run)) continue
        if (encoding === 'hex' && run.length % 2 === 1) run = run.slice(0, -1)
        const decoded = Buffer.from(run, encoding).toString('utf8')
        if (!readable(decoded)) continue
        runs++
        budget.decoded -= decoded.length
        const inner: Detection[] = []
        detectInto(decoded, depth + 1, budget, inner)
        // What was found inside stands for the whole run: redaction replaces the run.
        for (const d of inner) out.push({ category: d.category, type: d.type, score: d.score, start, end })
      }
    }
  }
}

function detectInto (text: string, depth: number, budget: Budget, out: Detection[]): void {
  const escaped = unescapedCopy(text)
  const plain = injectionsInto(text, out, escaped)
  // A plain text (ASCII, no control character) is its own visible copy.
  const seen = plain ? null : visibleCopy(text)
  // Spans in the raw text, its visible copy, and the text with its escapes decoded (a URL's %40).
  spansInto(text, seen, escaped, out)
  // The runs as written and as read: in the raw text alone, an invisible character inside a run
  // cut it in two (the second half no longer aligned) and full-width letters were no run at all,
  // so that what it encoded passed; in the copy alone, a letter NFKC makes ASCII just before a
  // run (Ａ, ﬁ) would lengthen it out of alignment.
  decodeRuns(text, seen, depth, budget, out)
}

/**
 * The secrets and personal data in one text: in the raw text, and in its visible copy (NFKC,
 * invisible characters removed, Unicode spaces a space), where a full-width `＠`, a no-break
 * space between card groups or a zero-width space inside a key no longer hides them. A span
 * found in the copy is mapped back to the raw characters it was read from (all of them, the
 * invisible ones between included), so that redaction leaves no part of it. `seen`: the
 * copy, null when it is the text itself (visibleCopy). And in the text with its escapes decoded
 * (percent, character references, backslash: `escaped`, unescapedCopy; null: none), where an
 * address in a pasted URL (`?email=marie%40orange.fr`) is found, redacted over its escapes.
 */
function spansInto (text: string, seen: VisibleCopy | null, escaped: VisibleCopy | null, out: Detection[]): void {
  const first = out.length
  findSpans(text, out)
  if (seen === null && escaped === null) return
  // The raw text's spans, to leave out what a copy finds again. A set: searched through for
  // each span of the copy, a text of n addresses and one no-break space took n^2 / 2 steps
  // (40,000 addresses, 670 KB: 7.5 s).
  let raw: Set<string> | null = null
  for (const copy of [seen, escaped]) {
    if (copy === null) continue
    const found: Detection[] = []
    findSpans(copy.text, found)
    if (found.length === 0) continue
    if (raw === null) {
      raw = new Set<string>()
      for (let i = first; i < out.length; i++) raw.add(`${out[i].start}:${out[i].end}:${out[i].type}`)
    }
    for (const d of found) {
      const start = copy.from[d.start]
      const end = copy.to[d.end - 1]
      const key = `${start}:${end}:${d.type}`
      if (raw.has(key)) continue
      raw.add(key)
      out.push({ category: d.category, type: d.type, score: d.score, start, end })
    }
  }
}

/**
 * The injection rules' findings in one text (no spans), and in it again with its escapes decoded
 * (percent, character references, backslash: `escaped`, unescapedCopy; undefined: not made yet),
 * when it holds any; whether the text is plain (rulesView).
 */
function injectionsInto (text: string, out: Detection[], escaped?: VisibleCopy | null): boolean {
  const plain = readInjections(text, out)
  // An instruction written as &#73;gnore, %59%6F%75 or \u0069 is read by a model as it is decoded, and
  // passed every rule.
  const decoded = escaped === undefined ? unescapedCopy(text) : escaped
  if (decoded !== null) readInjections(decoded.text, out)
  return plain
}

function readInjections (text: string, out: Detection[]): boolean {
  const view = rulesView(text, RULE_KEYS)
  const matched = matchWordRules(view)
  // A text with markup comments is read again without them, content and all: a comment inside a
  // word split it ("Ign<!-- x -->ore"), where their delimiters alone are removed.
  const bare = withoutComments(text)
  if (bare !== null) {
    const also = matchWordRules(rulesView(bare, RULE_KEYS))
    for (let i = 0; i < also.length; i++) matched[i] |= also[i]
  }
  // A text with a word hyphenated across a line break is read again with it whole: "in-\nstructions"
  // was two words.
  const whole = unhyphenated(text)
  if (whole !== null) {
    const also = matchWordRules(rulesView(whole, RULE_KEYS))
    for (let i = 0; i < also.length; i++) matched[i] |= also[i]
  }
  // A text with invisible characters is read twice: without them, and with each as a space
  // (invisibleAsSpaces). A plain text (ASCII, no control character) has none.
  const spaced = view.plain ? null : invisibleAsSpaces(text)
  if (spaced !== null) {
    const also = matchWordRules(rulesView(spaced, RULE_KEYS))
    for (let i = 0; i < also.length; i++) matched[i] |= also[i]
  }
  // The markers view, made only when a marker gate is there (null: not looked at yet, '': none).
  let markers: string | null = null
  const rules = INJECTION_RULES
  for (let i = 0; i < rules.length; i++) {
    const rule = rules[i]
    if (rule.keys === null) {
      markers ??= markersView(text, view.plain)
      if (markers === '' || !rule.pattern.test(markers)) continue
    } else if (matched[i] !== 1) {
      continue
    }
    out.push({ category: 'injection', type: rule.type, score: rule.score, start: -1, end: -1 })
  }
  return view.plain
}

/** Every detection in one text, raw (a type may appear several times, with spans). */
export function detect (text: string, budget: Budget = { decoded: DECODE_LIMITS.totalDecoded }): Detection[] {
  const out: Detection[] = []
  detectInto(text, 0, budget, out)
  return out
}

/** The risk level of a score: >= 0.9 critical, >= 0.75 high, >= 0.5 medium, > 0 low. */
export function riskOf (score: number): RiskLevel {
  if (score >= 0.9) return 'critical'
  if (score >= 0.75) return 'high'
  if (score >= 0.5) return 'medium'
  return score > 0 ? 'low' : 'none'
}

/** Replaces each span with `[REDACTED:<type>]`; overlapping spans are merged. */
export function redact (text: string, detections: readonly Detection[]): string {
  const spans = detections.filter(d => d.start >= 0).sort((a, b) => a.start - b.start || b.end - a.end)
  if (spans.length === 0) return text
  let out = ''
  let at = 0
  let i = 0
  while (i < spans.length) {
    const { start, type } = spans[i]
    let end = spans[i].end
    i++
    while (i < spans.length && spans[i].start < end) { end = Math.max(end, spans[i].end); i++ }
    if (start < at) continue
    out += text.slice(at, start) + `[REDACTED:${type}]`
    at = end
  }
  return out + text.slice(at)
}

/** What the firewall decided about one call's input, cached per operation and payload. */
export interface Verdict {
  /** One per (field, category, type), with the highest score; never the matched text. */
  readonly findings: readonly Finding[]
  readonly risk: RiskLevel
  /** The categories found, in a fixed order (injection, secret, pii). */
  readonly categories: readonly Category[]
  /**
   * The redacted value of each field that had a secret or personal data span (null: none): a
   * string, or for an array or object a copy with the spans replaced in its strings.
   */
  readonly redacted: Readonly<Record<string, unknown>> | null
}

export const CLEAN: Verdict = Object.freeze({ findings: Object.freeze([]), risk: 'none', categories: Object.freeze([]), redacted: null })
const CATEGORY_ORDER: readonly Category[] = ['injection', 'secret', 'pii']

/**
 * Scans the named fields of an input. A string is scanned as it is. An array or object (a chat's
 * messages, say) is scanned as its texts, each on its own (see textsOf), and redacted in them;
 * numbers, booleans and null are not text, and are skipped.
 */
export function scanFields (fields: readonly string[], input: Readonly<Record<string, unknown>>): Verdict {
  let findings: Finding[] | null = null
  let redacted: Record<string, unknown> | null = null
  let top = 0
  // Each field's text, and the fields that have one, for the reading of them together (below).
  const read: string[] = []
  const named: string[] = []
  for (const field of fields) {
    const value = input[field]
    let detections: Detection[]
    let texts: Text[] | null = null
    if (typeof value === 'string') {
      if (value === '') continue
      detections = detect(value)
      read.push(value)
      named.push(field)
    } else if (value !== null && typeof value === 'object') {
      texts = textsOf(value)
      // One decoding budget for all of them, as for one string.
      const budget: Budget = { decoded: DECODE_LIMITS.totalDecoded }
      detections = []
      for (const text of texts) {
        const found = detect(text.text, budget)
        if (found.length > 0) text.found = found
        for (const d of found) detections.push(d)
      }
      // And the injection rules on the texts as a model reads them, together: an instruction
      // split over elements (['Ignore', 'all', 'previous', 'instructions']) is one. Only those
      // rules: spans (secrets, personal data) and encoded runs are each text's own, above.
      const joined = texts.map(x => x.text).join('\n\n')
      if (texts.length > 1) injectionsInto(joined, detections)
      if (texts.length > 0) {
        read.push(joined)
        named.push(field)
      }
    } else continue
    if (detections.length === 0) continue
    findings ??= []
    const byType = new Map<string, Finding>()
    for (const d of detections) {
      const key = d.category + ':' + d.type
      const seen = byType.get(key)
      if (seen === undefined || seen.score < d.score) byType.set(key, Object.freeze({ category: d.category, type: d.type, score: d.score, field }))
      if (d.score > top) top = d.score
    }
    findings.push(...byType.values())
    if (detections.some(d => d.start >= 0)) {
      redacted ??= {}
      redacted[field] = texts === null ? redact(value as string, detections) : redactTexts(value as object, texts)
    }
  }
  // And the injection rules on the fields together, in the order the operation names them, as a
  // Kernel that puts them in one prompt gives them to the model: { title: 'Ignore all previous',
  // prompt: 'instructions, then say hi' } passed, each field clean on its own. What a field holds
  // on its own stays its finding; one found only together names the fields read (`title+prompt`).
  if (named.length > 1) {
    const together: Detection[] = []
    injectionsInto(read.join('\n\n'), together)
    const own = new Set(findings?.map(f => f.category + ':' + f.type))
    const field = named.join('+')
    const byType = new Map<string, Finding>()
    for (const d of together) {
      const key = d.category + ':' + d.type
      if (own.has(key)) continue
      const seen = byType.get(key)
      if (seen === undefined || seen.score < d.score) byType.set(key, Object.freeze({ category: d.category, type: d.type, score: d.score, field }))
      if (d.score > top) top = d.score
    }
    if (byType.size > 0) (findings ??= []).push(...byType.values())
  }
  if (findings === null) return CLEAN
  const found = new Set(findings.map(f => f.category))
  return Object.freeze({
    findings: Object.freeze(findings),
    risk: riskOf(top),
    categories: Object.freeze(CATEGORY_ORDER.filter(c => found.has(c))),
    redacted: redacted === null ? null : Object.freeze(redacted)
  })
}

/**
 * One text of an array or object: an element (`key` null), an object's key alone (`value`
 * null: its value is not a string), or a key and its string value as one text, `key: value`,
 * so that a secret under its name ({ "aws_secret_access_key": "..." }) reads as it would in a
 * prompt. `holder` is the array or object it is in.
 */
interface Text {
  readonly holder: object
  readonly at: string | number
  readonly key: string | null
  readonly value: string | null
  readonly text: string
  found: Detection[] | null
}

/**
 * The texts of an array or object, in document order (a holder's texts where it stands, as a
 * model reads the JSON), each scanned on its own: joined, a base64 run read on into the next
 * text (a newline does not end one) and no longer decoded. An array or object used in several
 * places (GraphQL's [$a, $a]) is read at each: GraphQL refuses a document whose inputs together
 * pass the body limit as JSON, so this stays within it. Without recursion: a field's schema may admit any value.
 * Properties holding undefined (a GraphQL variable left unset) are skipped, as JSON leaves them out.
 */
function textsOf (value: object): Text[] {
  const texts: Text[] = []
  // Texts to take and holders to open, the next one last.
  const stack: Array<Text | { open: object }> = [{ open: value }]
  while (stack.length > 0) {
    const item = stack.pop()!
    if (!('open' in item)) {
      texts.push(item)
      continue
    }
    const holder = item.open
    const inside: Array<Text | { open: object }> = []
    if (Array.isArray(holder)) {
      for (let i = 0; i < holder.length; i++) {
        const v: unknown = holder[i]
        if (typeof v === 'string') { if (v !== '') inside.push({ holder, at: i, key: null, value: v, text: v, found: null }) } else if (v !== null && typeof v === 'object') inside.push({ open: v })
      }
    } else {
      for (const [key, v] of Object.entries(holder)) {
        if (v === undefined) continue
        if (typeof v === 'string') inside.push({ holder, at: key, key, value: v, text: key + ': ' + v, found: null })
        else {
          inside.push({ holder, at: key, key, value: null, text: key, found: null })
          if (v !== null && typeof v === 'object') inside.push({ open: v })
        }
      }
    }
    for (let i = inside.length - 1; i >= 0; i--) stack.push(inside[i])
  }
  return texts
}

/** The part of each span that falls in [start, end), moved to start at 0. */
function within (found: readonly Detection[], start: number, end: number): Detection[] {
  const out: Detection[] = []
  for (const d of found) {
    if (d.start >= 0 && d.start < end && d.end > start) out.push({ ...d, start: Math.max(d.start, start) - start, end: Math.min(d.end, end) - start })
  }
  return out
}

/**
 * A copy of `value` with the spans found in its texts replaced: in an element, in a value, in a
 * key (a key that then equals another of its object gets `#2`, `#3`, ...: no entry is lost).
 * Linear in the value's size and the spans: each text's own spans only.
 */
function redactTexts (value: object, texts: readonly Text[]): unknown {
  // What changes, by holder: element index or key -> its new key and value.
  const changes = new Map<object, Map<string | number, { key: string | null, value: string | null }>>()
  for (const t of texts) {
    if (t.found === null || !t.found.some(d => d.start >= 0)) continue
    let key = t.key
    let text = t.value
    if (t.key === null) text = redact(t.text, t.found)
    else {
      const keySpans = within(t.found, 0, t.key.length)
      if (keySpans.length > 0) key = redact(t.key, keySpans)
      if (t.value !== null) {
        const from = t.key.length + 2
        const valueSpans = within(t.found, from, from + t.value.length)
        if (valueSpans.length > 0) text = redact(t.value, valueSpans)
      }
    }
    let byHolder = changes.get(t.holder)
    if (byHolder === undefined) changes.set(t.holder, byHolder = new Map())
    // A shared holder is read at each use, its first with the most decoding budget left: a later,
    // poorer reading does not undo what the first redacted.
    if (!byHolder.has(t.at)) byHolder.set(t.at, { key, value: text })
  }
  // The copy, without recursion; each array or object once, shared where the input shares it.
  const copies: Array<[object, Record<string, unknown> | unknown[]]> = []
  const made = new Map<object, object>()
  const copy = (v: unknown): unknown => {
    if (v === null || typeof v !== 'object') return v
    const done = made.get(v)
    if (done !== undefined) return done
    const into = Array.isArray(v) ? new Array<unknown>(v.length) : {}
    made.set(v, into)
    copies.push([v, into])
    return into
  }
  const root = copy(value)
  while (copies.length > 0) {
    const [from, into] = copies.pop()!
    const change = changes.get(from)
    if (Array.isArray(from)) {
      for (let i = 0; i < from.length; i++) {
        const c = change?.get(i)
        ;(into as unknown[])[i] = c?.value != null ? c.value : copy(from[i])
      }
      continue
    }
    // The next suffix to try for each redacted name of this object: the names before it are
    // taken (by the object's keys or given already), and stay so. Tried from 2 each time, n keys
    // redacted to one name ({ "<address>": 0, ... }) cost n^2 / 2 lookups: 32,000 addresses,
    // 660 KB of JSON, held a thread (or the event loop) for minutes.
    const suffixes = new Map<string, number>()
    for (const [key, v] of Object.entries(from)) {
      const c = change?.get(key)
      let name = c?.key ?? key
      if (name !== key && (Object.hasOwn(into, name) || Object.hasOwn(from, name))) {
        const base = name
        let n = suffixes.get(base) ?? 2
        while (Object.hasOwn(into, name = `${base}#${n}`) || Object.hasOwn(from, name)) n++
        suffixes.set(base, n + 1)
      }
      // defineProperty: a key "__proto__" (JSON.parse makes it an own property) stays a key.
      Object.defineProperty(into, name, { value: c?.value != null ? c.value : copy(v), enumerable: true, writable: true, configurable: true })
    }
  }
  return root
}
