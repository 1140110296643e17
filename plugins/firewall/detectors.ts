// Secrets and personal data, found in the raw text with their spans (for redaction). Patterns
// with a checksum are validated (Luhn, mod 97, check letters), so that random digits do not
// fire. Every quantifier is bounded and repeated groups begin with a mandatory separator: the
// work per starting position is bounded, so a scan is linear in the input. JWTs and private
// key blocks, which have no useful bound, are found by hand-written single-pass scanners.

import { charTable, hasRun, literalSearch } from './text.js'

export type Category = 'injection' | 'secret' | 'pii'

export interface Detection {
  readonly category: Category
  readonly type: string
  readonly score: number
  /** The span in the scanned text, for redaction; injection findings have none. */
  readonly start: number
  readonly end: number
}

export interface SpanRule {
  readonly category: 'secret' | 'pii'
  readonly type: string
  readonly score: number
  /** Global; with the `d` flag when `group` is used. */
  readonly pattern: RegExp
  /** The capture group whose span is the finding (default: the whole match). */
  readonly group?: number
  /**
   * Where the rule is tried: only on texts holding one of these strings, or (`digits`) only
   * on the numeric regions of the text (runs of digits, spaces, dots, dashes, parentheses).
   */
  readonly gate: readonly string[] | 'digits' | null
  /** Tried only on texts holding a run of at least `min` characters of this table (charTable), which every match is. */
  readonly run?: { readonly chars: Uint8Array, readonly min: number }
  /** Returns the score to keep (the rule's, or another), or 0 to drop the match. */
  readonly validate?: (match: RegExpExecArray, text: string) => number
}

// --- checksums --------------------------------------------------------------------------------

export function luhn (digits: string): boolean {
  let sum = 0
  for (let i = 0; i < digits.length; i++) {
    let d = digits.charCodeAt(digits.length - 1 - i) - 48
    if (d < 0 || d > 9) return false
    if (i % 2 === 1) { d *= 2; if (d > 9) d -= 9 }
    sum += d
  }
  return digits.length > 0 && sum % 10 === 0
}

/** The remainder of a long decimal string modulo 97, digit by digit (IBAN, NIR). */
export function mod97 (digits: string): number {
  let r = 0
  for (let i = 0; i < digits.length; i++) r = (r * 10 + (digits.charCodeAt(i) - 48)) % 97
  return r
}

/** Issuer prefixes of the card networks (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay). */
export function cardNetwork (digits: string): string | null {
  const n = digits.length
  const p2 = Number(digits.slice(0, 2))
  const p3 = Number(digits.slice(0, 3))
  const p4 = Number(digits.slice(0, 4))
  if (digits[0] === '4' && (n === 13 || n === 16 || n === 19)) return 'visa'
  if (((p2 >= 51 && p2 <= 55) || (p4 >= 2221 && p4 <= 2720)) && n === 16) return 'mastercard'
  if ((p2 === 34 || p2 === 37) && n === 15) return 'amex'
  if ((p4 === 6011 || p2 === 65 || (p3 >= 644 && p3 <= 649)) && n >= 16) return 'discover'
  if (p4 >= 3528 && p4 <= 3589 && n >= 16) return 'jcb'
  if ((p2 === 36 || p2 === 38 || (p3 >= 300 && p3 <= 305)) && n >= 14) return 'diners'
  if (p2 === 62 && n >= 16) return 'unionpay'
  return null
}

const DNI_LETTERS = 'TRWAGMYFPDXBNJZSQVHLCKE'
// IBAN length per country: every country of SWIFT's IBAN registry. Only Europe's larger
// economies and their neighbours were listed, and the IBANs of six EU members (Bulgaria, Cyprus,
// Estonia, Latvia, Lithuania, Malta), of SEPA's Iceland and Liechtenstein and of every country
// beyond were never found. Each entry is the country's code followed by its length.
const IBAN_LENGTH: ReadonlyMap<string, number> = new Map([
  'AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BI27 BR29 BY28 CH21 CR22 CY28 CZ24 DE22 DJ27 DK18 DO28 EE20 EG29',
  'ES24 FI18 FK18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 GT28 HN28 HR21 HU28 IE22 IL23 IQ23 IS26 IT27 JO30 KW30 KZ20',
  'LB28 LC32 LI21 LT20 LU20 LV21 LY25 MC27 MD24 ME22 MK19 MN20 MR27 MT31 MU30 NI28 NL18 NO15 OM23 PK24 PL28 PS29',
  'PT25 QA29 RO24 RS22 RU33 SA24 SC31 SD18 SE24 SI19 SK24 SM27 SO23 ST25 SV28 TL23 TN24 TR26 UA29 VA22 VG24 XK20',
  'YE30'
].join(' ').split(' ').map(e => [e.slice(0, 2), Number(e.slice(2))]))

export function validIban (compact: string): boolean {
  const length = IBAN_LENGTH.get(compact.slice(0, 2))
  if (length === undefined || compact.length !== length) return false
  const rearranged = compact.slice(4) + compact.slice(0, 4)
  let digits = ''
  for (let i = 0; i < rearranged.length; i++) {
    const c = rearranged.charCodeAt(i)
    digits += c >= 65 ? String(c - 55) : rearranged[i]
  }
  return mod97(digits) === 1
}

/** French NIR (numéro de sécurité sociale): 13 digits and a key of 97 - (number mod 97). */
export function validNir (compact: string): boolean {
  if (compact.length !== 15) return false
  const body = compact.slice(0, 13).replace('2A', '19').replace('2B', '18')
  if (!/^\d{13}$/.test(body)) return false
  return 97 - mod97(body) === Number(compact.slice(13))
}

/** German tax id (Steuer-IdNr): 11 digits, one digit twice or thrice in the first ten, ISO 7064 MOD 11,10. */
export function validSteuerId (digits: string): boolean {
  if (!/^[1-9]\d{10}$/.test(digits)) return false
  const counts = new Map<string, number>()
  for (const d of digits.slice(0, 10)) counts.set(d, (counts.get(d) ?? 0) + 1)
  const repeated = [...counts.values()].filter(c => c > 1)
  if (repeated.length !== 1 || repeated[0] > 3) return false
  let product = 10
  for (let i = 0; i < 10; i++) {
    let sum = (Number(digits[i]) + product) % 10
    if (sum === 0) sum = 10
    product = (sum * 2) % 11
  }
  return (11 - product) % 10 === Number(digits[10])
}

// --- validators -------------------------------------------------------------------------------

const hasMixedCaseAndDigit = (s: string): boolean => /[a-z]/.test(s) && /[A-Z]/.test(s) && /\d/.test(s)
// example.* (RFC 2606's example.com, .net, .org), and the reserved top-level domains .test,
// .invalid, .localhost and .local. Any one label after each of them passed: test.de, local.ch,
// mail.test.fr, real domains, were never found.
const RESERVED_DOMAIN = /(?:^|\.)example(?:\.[a-z]{2,6})?$|\.(?:test|invalid|localhost|local)$/i
const CONTEXT_BEFORE = (text: string, index: number, words: RegExp): boolean => words.test(text.slice(Math.max(0, index - 40), index))
const PHONE_WORDS = /(?:phone|tel|t[ée]l[ée]phone|tel[ée]fono|telefon|mobile?|cell|handy|fax|call|ring|whatsapp|sms|appelle[rz]?|llam[ae]|ruf)\W{0,6}(?:\w{1,12}\W{1,3}){0,2}$/i
const TAX_WORDS = /(?:steuer|idnr|identifikationsnummer|tax ?id|tin)\W{0,6}(?:\w{1,12}\W{1,3}){0,1}$/i

function validEmail (m: RegExpExecArray): number {
  const text = m[0]
  const at = text.indexOf('@')
  const local = text.slice(0, at)
  const domain = text.slice(at + 1).replace(/[.-]+$/, '')
  if (!/\.[A-Za-z]{2,24}$/.test(domain) || RESERVED_DOMAIN.test(domain)) return 0
  if (local === 'git' || local.startsWith('.') || local.endsWith('.')) return 0
  return 0.7
}

function validCard (m: RegExpExecArray): number {
  const digits = m[0].replace(/[ .-]/g, '')
  return cardNetwork(digits) !== null && luhn(digits) ? 0.9 : 0
}

function validPhone (m: RegExpExecArray, text: string): number {
  const raw = m[0]
  const digits = raw.replace(/\D/g, '')
  const international = raw[0] === '+' || /^00[1-9]/.test(raw)
  if (digits.length < (international ? 8 : 9) || digits.length > 15) return 0
  const context = CONTEXT_BEFORE(text, m.index, PHONE_WORDS)
  if (international) return 0.8
  const groups = raw.replace(/[()]/g, '').split(/[ .-]/).filter(g => g !== '')
  const seps = raw.replace(/[\d()+]/g, '')
  // Dotted numbers are versions and addresses unless they are French pairs (06.12.34.56.78).
  if (seps !== '' && /^\.+$/.test(seps) && !groups.every(g => g.length === 2)) return 0
  // Phone groups after the first have two digits or more (4 8 15 16 23 42 is not a number).
  if (groups.slice(1).some(g => g.length < 2)) return 0
  const shape = groups.map(g => g.length).join('-')
  const national = raw[0] === '(' || (/^0[1-9]/.test(raw) && digits.length >= 9 && digits.length <= 11) ||
    shape === '3-3-4' || shape === '3-3-3' || shape === '3-7' || shape === '3-8'
  if (national) return context ? 0.8 : 0.65
  return context && digits.length <= 12 ? 0.7 : 0
}

function validSsn (m: RegExpExecArray): number {
  const area = Number(m[1])
  if (area === 0 || area === 666 || area >= 900) return 0
  if (m[2] === '00' || m[3] === '0000') return 0
  return 0.85
}

function validDni (m: RegExpExecArray): number {
  const compact = m[0].replace(/[ -]/g, '').toUpperCase()
  const letter = compact[compact.length - 1]
  const number = compact.slice(0, -1).replace(/^X/, '0').replace(/^Y/, '1').replace(/^Z/, '2')
  return DNI_LETTERS[Number(number) % 23] === letter ? 0.85 : 0
}

function validIbanMatch (m: RegExpExecArray): number {
  const compact = m[0].replace(/ /g, '')
  const length = IBAN_LENGTH.get(compact.slice(0, 2))
  return length !== undefined && validIban(compact.slice(0, length)) ? 0.85 : 0
}

// --- rules ------------------------------------------------------------------------------------

const S = (type: string, score: number, gate: SpanRule['gate'], pattern: RegExp, extra: Partial<SpanRule> = {}): SpanRule => Object.freeze({ category: 'secret', type, score, gate, pattern, ...extra })
const P = (type: string, score: number, gate: SpanRule['gate'], pattern: RegExp, extra: Partial<SpanRule> = {}): SpanRule => Object.freeze({ category: 'pii', type, score, gate, pattern, ...extra })
const AWS_PREFIXES = ['AKIA', 'ASIA', 'ABIA', 'ACCA', 'AGPA', 'AIDA', 'AROA', 'ANPA', 'ANVA', 'AIPA']

export const SPAN_RULES: readonly SpanRule[] = Object.freeze([
  S('aws-access-key', 0.95, AWS_PREFIXES, /\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z2-7]{16}\b/g),
  S('aws-secret-key', 0.9, ['ecret', 'ECRET'], /(?:aws_?secret_?access_?key|aws_?secret_?key|secret_?access_?key)["']?\s{0,5}[:=]\s{0,5}["']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])/dgi, { group: 1 }),
  S('github-token', 0.95, ['ghp_', 'gho_', 'ghu_', 'ghs_', 'ghr_'], /\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}\b/g),
  S('github-token', 0.95, ['github_pat_'], /\bgithub_pat_[A-Za-z0-9_]{60,100}\b/g),
  S('gitlab-token', 0.9, ['glpat-'], /\bglpat-[A-Za-z0-9_-]{20}(?![A-Za-z0-9_-])/g),
  S('slack-token', 0.9, ['xox'], /\bxox[abposre]-[A-Za-z0-9-]{10,160}/g),
  S('slack-webhook', 0.9, ['hooks.slack.com'], /https:\/\/hooks\.slack\.com\/services\/T[A-Z0-9]{6,12}\/B[A-Z0-9]{6,12}\/[A-Za-z0-9]{20,32}/g),
  S('stripe-key', 0.95, ['_live_'], /\b(?:sk|rk)_live_[A-Za-z0-9]{20,120}\b/g),
  S('stripe-key', 0.7, ['_test_'], /\b(?:sk|rk)_test_[A-Za-z0-9]{20,120}\b/g),
  S('google-api-key', 0.9, ['AIza'], /\bAIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])/g),
  S('anthropic-key', 0.95, ['sk-ant-'], /\bsk-ant-[a-z]{2,8}\d{0,3}-[A-Za-z0-9_-]{40,200}/g),
  S('openai-key', 0.9, ['sk-'], /\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,200}(?![A-Za-z0-9_-])/g, { validate: m => (!m[0].startsWith('sk-ant-') && hasMixedCaseAndDigit(m[0]) ? 0.9 : 0) }),
  S('npm-token', 0.9, ['npm_'], /\bnpm_[A-Za-z0-9]{36}\b/g),
  S('huggingface-token', 0.9, ['hf_'], /\bhf_[A-Za-z]{34}\b/g),
  S('sendgrid-key', 0.9, ['SG.'], /\bSG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])/g),

  // The local part starts after any dots: taken from the first dot on (.anna@...), it was
  // refused for starting with one, and the address after it was never tried.
  P('email', 0.7, ['@'], /[A-Za-z0-9_%+-][A-Za-z0-9._%+-]{0,63}@[A-Za-z0-9-]{1,63}\.[A-Za-z0-9.-]{2,190}/g, { validate: validEmail }),
  // Groups apart by a space, a dash or a dot (other spaces are a space in the visible copy); not
  // inside a longer dotted number (a version, an address).
  P('card-number', 0.9, 'digits', /(?<![\d-]|\d\.)(?:\d{4}([ .-]?)\d{4}\1\d{4}\1\d{4}|\d{4}([ .-]?)\d{6}\2\d{5}|\d{13,19})(?!\d|\.\d)/g, { validate: validCard }),
  P('us-ssn', 0.85, 'digits', /(?<![\d-])(\d{3})-(\d{2})-(\d{4})(?![\d-])/g, { validate: validSsn }),
  P('fr-nir', 0.9, 'digits', /(?<!\d)[12] ?\d{2} ?(?:0[1-9]|1[0-2]|[2-9]\d) ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}(?!\d)/g, { validate: m => (validNir(m[0].replace(/ /g, '')) ? 0.9 : 0) }),
  P('es-dni', 0.85, 'digits', /\b(?:\d{8}|[XYZ]-?\d{7})[ -]?[A-Z]\b/g, { validate: validDni }),
  // Two letters, two digits and 11 or more letters or digits, spaces between: a run of 15 or more.
  P('iban', 0.85, null, /\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b/g, { validate: validIbanMatch, run: { chars: charTable('ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 '), min: 15 } }),
  P('de-tax-id', 0.85, 'digits', /(?<!\d)[1-9]\d{10}(?!\d)/g, { validate: (m, text) => (CONTEXT_BEFORE(text, m.index, TAX_WORDS) && validSteuerId(m[0]) ? 0.85 : 0) }),
  P('phone', 0.8, 'digits', /(?<![A-Za-z0-9+./-])(?:\+\d{7,15}|(?:\+\d{1,3}[ .-]?|00\d{1,3}[ .-]?)?(?:\(0?\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{1,8}){1,5})(?![0-9A-Za-z/-])/g, { validate: validPhone })
])

/** JWTs: `eyJ` header, `.`, `eyJ` payload, `.`, signature. One pass: each token is read once. */
export function findJwts (text: string, out: Detection[]): void {
  let from = 0
  for (;;) {
    const start = text.indexOf('eyJ', from)
    if (start < 0) return
    let end = start
    let dots = 0
    const n = text.length
    while (end < n) {
      const c = text.charCodeAt(end)
      const b64 = (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c === 45 || c === 95
      if (c === 46) dots++
      else if (!b64) break
      end++
    }
    if (dots === 2) {
      const parts = text.slice(start, end).split('.')
      if (parts[0].length >= 10 && parts[1].startsWith('eyJ') && parts[1].length >= 10 && parts[2].length >= 16) {
        out.push({ category: 'secret', type: 'jwt', score: 0.85, start, end })
      }
    }
    from = end > start ? end : start + 3
  }
}

const KEY_HEADER = /-----BEGIN (?:[A-Z0-9]{1,12} ){0,3}PRIVATE KEY(?: BLOCK)?-----/g
/** Private key blocks, from the BEGIN line to the END line (or 16 KB on, when it has none). */
export function findPrivateKeys (text: string, out: Detection[]): void {
  KEY_HEADER.lastIndex = 0
  let m: RegExpExecArray | null
  while ((m = KEY_HEADER.exec(text)) !== null) {
    const afterHeader = m.index + m[0].length
    const footer = text.indexOf('-----END ', afterHeader)
    let end = Math.min(text.length, afterHeader + 16384)
    if (footer >= 0 && footer < end) {
      const close = text.indexOf('-----', footer + 9)
      end = close >= 0 && close - footer < 64 ? close + 5 : footer + 9
    }
    out.push({ category: 'secret', type: 'private-key', score: 0.99, start: m.index, end })
    KEY_HEADER.lastIndex = end
  }
}

// The numeric regions digit rules are tried on: a digit-led run of digits and separators,
// with a few characters around it (a DNI letter, an NIE or country prefix, a + or a paren). An A
// or a B after a 2 is in it: the department of a NIR of someone born in Corsica (2A, 2B), which
// cut the region in two, so that no such NIR was ever found.
const NUMERIC_REGION = /\d(?:[\d ()./-]|(?<=2)[AB]){5,}\d/g
const REGION_CHARS = charTable('0123456789 ()./-')
const REGION_MIN = 7
const REGION_MARGIN = 4
const DIGIT_RULES = SPAN_RULES.filter(r => r.gate === 'digits')
const TEXT_RULES = SPAN_RULES.filter(r => r.gate !== 'digits')

function runRule (rule: SpanRule, text: string, offset: number, context: string, out: Detection[]): void {
  const re = rule.pattern
  re.lastIndex = 0
  let m: RegExpExecArray | null
  while ((m = re.exec(text)) !== null) {
    if (offset !== 0) m.index += offset
    const score = rule.validate === undefined ? rule.score : rule.validate(m, context)
    if (score > 0) {
      const group = rule.group === undefined ? undefined : m.indices?.[rule.group]
      const span: [number, number] = group ?? [m.index - offset, m.index - offset + m[0].length]
      out.push({ category: rule.category, type: rule.type, score, start: span[0] + offset, end: span[1] + offset })
    }
    if (m[0].length === 0) re.lastIndex++
  }
}

// Every gate string of the text rules, and the two of the hand-written scanners, looked for in
// one search instead of one per rule and gate. A match's position is tried against every gate
// (one may be the prefix of another: sk- and sk-ant-), and the search goes on from the next
// character (one may start inside another). Gates of one character (@) are looked for apart:
// without them the search's shortest alternative is longer, and it skips ahead faster.
const PRIVATE_KEY_GATE = 'PRIVATE KEY'
const JWT_GATE = 'eyJ'
const GATES: readonly string[] = [...new Set([PRIVATE_KEY_GATE, JWT_GATE, ...TEXT_RULES.flatMap(r => r.gate === null ? [] : r.gate as readonly string[])])]
const GATE_SEARCH = literalSearch(GATES.filter(g => g.length > 1), 'g')
const SINGLE_GATES = GATES.flatMap((g, i) => g.length === 1 ? [i] : [])
const GATE_INDEX = new Map(GATES.map((g, i) => [g, i]))
const PRIVATE_KEY_AT = GATES.indexOf(PRIVATE_KEY_GATE)
const JWT_AT = GATES.indexOf(JWT_GATE)
const RULE_GATES = TEXT_RULES.map(r => r.gate === null ? null : (r.gate as readonly string[]).map(g => GATE_INDEX.get(g) as number))

function anyPresent (gates: readonly number[], present: Uint8Array): boolean {
  for (const g of gates) if (present[g] === 1) return true
  return false
}

/** Which gates the text holds, by index in GATES. */
function gatesIn (text: string): Uint8Array {
  const present = new Uint8Array(GATES.length)
  GATE_SEARCH.lastIndex = 0
  let m: RegExpExecArray | null
  while ((m = GATE_SEARCH.exec(text)) !== null) {
    for (let g = 0; g < GATES.length; g++) if (text.startsWith(GATES[g], m.index)) present[g] = 1
    GATE_SEARCH.lastIndex = m.index + 1
  }
  for (const g of SINGLE_GATES) if (text.includes(GATES[g])) present[g] = 1
  return present
}

/** Every secret and personal-data match in the text, with spans. */
export function findSpans (text: string, out: Detection[]): void {
  const present = gatesIn(text)
  if (present[PRIVATE_KEY_AT] === 1) findPrivateKeys(text, out)
  if (present[JWT_AT] === 1) findJwts(text, out)
  for (let r = 0; r < TEXT_RULES.length; r++) {
    const gates = RULE_GATES[r]
    if (gates !== null && !anyPresent(gates, present)) continue
    const rule = TEXT_RULES[r]
    if (rule.run !== undefined && !hasRun(text, rule.run.chars, rule.run.min)) continue
    runRule(rule, text, 0, text, out)
  }
  // Optimization: most texts hold no numeric region (a region is a run of 7 or more of its characters).
  if (!hasRun(text, REGION_CHARS, REGION_MIN)) return
  // Optimization: the digit rules read only the numeric regions, found in one pass.
  NUMERIC_REGION.lastIndex = 0
  let region: RegExpExecArray | null
  while ((region = NUMERIC_REGION.exec(text)) !== null) {
    const from = Math.max(0, region.index - REGION_MARGIN)
    const to = Math.min(text.length, region.index + region[0].length + REGION_MARGIN)
    const slice = text.slice(from, to)
    for (const rule of DIGIT_RULES) runRule(rule, slice, from, text, out)
  }
}
