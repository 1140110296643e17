// Every contract error code (CONTRACT §5) in one table, and the one mapping from any thrown
// value to an RFC 7807 problem. Adapters only encode what this module decides.
// A small class of our own rather than @fastify/error: KERNEL_REJECTED carries the Kernel's
// own 4xx status, and problems need a detail and headers beside the fixed code and status.

export const ErrorCodes = {
  UNAUTHENTICATED: { status: 401, title: 'Unauthenticated' },
  FORBIDDEN: { status: 403, title: 'Forbidden' },
  FIREWALL_BLOCKED: { status: 403, title: 'Blocked by the AI firewall' },
  NOT_FOUND: { status: 404, title: 'Not found' },
  VALIDATION_FAILED: { status: 400, title: 'Validation failed' },
  PAYLOAD_TOO_LARGE: { status: 413, title: 'Payload too large' },
  UNSUPPORTED_MEDIA_TYPE: { status: 415, title: 'Unsupported media type' },
  IDEMPOTENCY_CONFLICT: { status: 409, title: 'Idempotent call still running' },
  IDEMPOTENCY_KEY_REUSED: { status: 422, title: 'Idempotency key reused with another input or by another user' },
  RATE_LIMITED: { status: 429, title: 'Rate limited' },
  BAD_REQUEST: { status: 400, title: 'Bad request' },
  KERNEL_REJECTED: { status: 400, title: 'Rejected by the Kernel' },
  KERNEL_ERROR: { status: 502, title: 'Kernel error' },
  KERNEL_UNAVAILABLE: { status: 503, title: 'Kernel unavailable' },
  KERNEL_TIMEOUT: { status: 504, title: 'Kernel timeout' },
  OVERLOADED: { status: 503, title: 'Overloaded' },
  INTERNAL: { status: 500, title: 'Internal error' },
  // Not a contract code, and never sent: the call's caller had left (its response closed, its
  // WebSocket closed) and the call was cancelled. It names how the call ended, in its audit
  // entry and its metrics, with nginx's 499 for a client that closed its request.
  CLIENT_CLOSED: { status: 499, title: 'Client closed the request' }
} as const

export type ErrorCode = keyof typeof ErrorCodes

export interface Problem {
  type: string
  title: string
  status: number
  code: ErrorCode
  detail?: string
  requestId: string
}

export interface MantleErrorOptions {
  status?: number
  headers?: Record<string, string>
  cause?: unknown
  /** Refusals that can come at a high rate skip the stack trace: it is never shown anyway. */
  stack?: boolean
  /**
   * The detail as a log line may hold it, when the client's holds data the logs must not (the
   * keys of a Kernel answer that broke its schema): see detailForLog.
   */
  logDetail?: string
}

export class MantleError extends Error {
  readonly code: ErrorCode
  readonly statusCode: number
  readonly headers: Record<string, string> | null
  /** The detail for log lines, when it differs from the client's (null: the same). */
  readonly logDetail: string | null

  constructor (code: ErrorCode, detail?: string, options: MantleErrorOptions = {}) {
    const limit = Error.stackTraceLimit
    if (options.stack !== true) Error.stackTraceLimit = 0
    super(detail ?? ErrorCodes[code].title, options.cause === undefined ? undefined : { cause: options.cause })
    if (options.stack !== true) Error.stackTraceLimit = limit
    this.name = 'MantleError'
    this.code = code
    this.statusCode = options.status ?? ErrorCodes[code].status
    this.headers = options.headers ?? null
    this.logDetail = options.logDetail ?? null
  }
}

/**
 * A call refused because the gateway is shutting down (its preClose has run): OVERLOADED, retried
 * in a second on another instance. `what` names it as its face does (a call, a mutation).
 */
export function shuttingDownRefusal (what = 'call'): MantleError {
  return new MantleError('OVERLOADED', `The gateway is shutting down: this ${what} did not run; retry it on another instance`, { headers: { 'retry-after': '1' } })
}

/**
 * The detail a `call failed` line logs for `err`: the client's (`problem.detail`) unless the error
 * carries one for logs. The client gets what concerns its own call; a log line never holds a
 * call's input or answer (README, "Logs").
 */
export function detailForLog (err: unknown, problem: Problem): string | undefined {
  return err instanceof MantleError && err.logDetail !== null ? err.logDetail : problem.detail
}

/**
 * A body the gateway's JSON parser refuses before any face sees it (bytes that are not UTF-8, a
 * charset other than UTF-8), as Fastify's own parser refusals are: audited as `security`.
 */
export class BodyRefused extends MantleError {}

/**
 * The headers of a response that carries refusals (a tRPC call or batch, a GraphQL document, a
 * REST batch), each with its own headers or none: all of them, but Retry-After and RateLimit-*
 * those of the refusal that asks the longest wait alone (a client that waits less is refused
 * again; the first of equal waits), never one call's wait beside another's window. `perCall` false: the response carries several calls, and a header that speaks for one
 * call only (Idempotent-Replayed) is left out, lest it mark calls that ran. The challenge
 * (WWW-Authenticate) only when the response is a 401 (`unauthorized`; RFC 9110 §11.6.1): a 200
 * or 207 that carries an UNAUTHENTICATED call says so in that call's error, and a challenge on
 * it told clients and proxies that the whole response asked for credentials. Null for none.
 */
export function refusalHeaders (list: Iterable<Record<string, string> | null>, perCall: boolean, unauthorized: boolean): Record<string, string> | null {
  const all: Array<Record<string, string>> = []
  let longest: Record<string, string> | null = null
  for (const h of list) {
    if (h === null) continue
    all.push(h)
    if (longest === null || waitOf(h) > waitOf(longest)) longest = h
  }
  if (longest === null) return null
  let headers: Record<string, string> = { ...longest }
  if (all.length > 1) {
    headers = Object.assign({}, ...all)
    for (const name in headers) if (isWaitHeader(name)) delete headers[name]
    Object.assign(headers, longest)
  }
  if (!perCall) delete headers['idempotent-replayed']
  if (!unauthorized) delete headers['www-authenticate']
  return Object.keys(headers).length === 0 ? null : headers
}

/** Retry-After or a RateLimit-* field: what a refusal says of its own wait and window. */
function isWaitHeader (name: string): boolean {
  const lower = name.toLowerCase()
  return lower === 'retry-after' || lower.startsWith('ratelimit')
}

/** The seconds a problem's Retry-After asks for (0 without one). */
function waitOf (headers: Record<string, string>): number {
  return retryAfterOf(headers) ?? 0
}

/**
 * A refusal's Retry-After in whole seconds, for the answers that have no headers to carry it
 * (a WebSocket frame, a tRPC error over WebSocket or SSE); undefined without one.
 */
export function retryAfterOf (headers: Record<string, string> | null): number | undefined {
  const text = headers?.['retry-after']
  if (text === undefined) return undefined
  const seconds = Number(text)
  return Number.isFinite(seconds) && seconds >= 0 ? Math.ceil(seconds) : undefined
}

/**
 * The challenge of a 401 (RFC 9110 §11.6.1: a 401 carries WWW-Authenticate; RFC 6750 names the
 * scheme). identity.ts gives a refused token's its `error`; every other 401 gets this one, a
 * Kernel's 401 passed on (KERNEL_REJECTED) too.
 */
export const CHALLENGE: Readonly<Record<string, string>> = Object.freeze({ 'www-authenticate': 'Bearer' })

export function problemType (code: ErrorCode): string {
  return 'urn:mantle:problem:' + code.toLowerCase().replace(/_/g, '-')
}

interface FastifyLikeError {
  code?: unknown
  statusCode?: unknown
  message?: unknown
  validation?: Array<{ instancePath?: string, message?: string, params?: Record<string, unknown> }>
  validationContext?: string
}

const statusToCode: Record<number, ErrorCode> = {
  400: 'VALIDATION_FAILED',
  401: 'UNAUTHENTICATED',
  403: 'FORBIDDEN',
  404: 'NOT_FOUND',
  413: 'PAYLOAD_TOO_LARGE',
  415: 'UNSUPPORTED_MEDIA_TYPE',
  429: 'RATE_LIMITED'
}

// Fastify's own client errors, by code, with the detail we give instead of theirs.
const fastifyClientErrors: Record<string, [ErrorCode, string]> = {
  FST_ERR_CTP_BODY_TOO_LARGE: ['PAYLOAD_TOO_LARGE', 'The request body is larger than the limit'],
  FST_ERR_CTP_INVALID_MEDIA_TYPE: ['UNSUPPORTED_MEDIA_TYPE', 'The request body must be application/json'],
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: ['BAD_REQUEST', 'The Content-Length header does not match the body'],
  FST_ERR_CTP_EMPTY_JSON_BODY: ['VALIDATION_FAILED', 'The JSON body is empty'],
  FST_ERR_CTP_INVALID_JSON_BODY: ['VALIDATION_FAILED', 'The body is not valid JSON'],
  // Never the URL itself in the detail: it may carry a token.
  FST_ERR_BAD_URL: ['BAD_REQUEST', 'The URL path is not valid percent-encoding'],
  FST_ERR_MAX_PARAM_LENGTH: ['BAD_REQUEST', 'A path segment is longer than 256 characters']
}

/**
 * How a failed call is logged, the one rule of every face: a gateway bug (`INTERNAL`) at error,
 * a call the Kernel failed (`KERNEL_ERROR`, `KERNEL_TIMEOUT`, `KERNEL_UNAVAILABLE` when it could
 * not be reached) at warn, and a refusal never, per request: it is the client's answer, and
 * metrics count it. A refusal is every 4xx, `OVERLOADED` (load shed, a bound reached) and the
 * `KERNEL_UNAVAILABLE` of an open breaker or a full bulkhead, made without a Kernel call: that
 * one asks for a wait (`Retry-After`), which a Kernel that could not be reached does not.
 */
export function logLevelOf (problem: Problem, headers: Record<string, string> | null): 'error' | 'warn' | null {
  switch (problem.code) {
    case 'INTERNAL': return 'error'
    case 'KERNEL_ERROR':
    case 'KERNEL_TIMEOUT': return 'warn'
    case 'KERNEL_UNAVAILABLE': return headers?.['retry-after'] === undefined ? 'warn' : null
    default: return null
  }
}

/** Turns any thrown value into the problem a client sees; never exposes internals for 5xx. */
export function toProblem (err: unknown, requestId: string): { problem: Problem, headers: Record<string, string> | null } {
  if (err instanceof MantleError) {
    return {
      problem: { type: problemType(err.code), title: ErrorCodes[err.code].title, status: err.statusCode, code: err.code, detail: err.message, requestId },
      headers: err.statusCode === 401 && err.headers?.['www-authenticate'] === undefined ? { ...err.headers, ...CHALLENGE } : err.headers
    }
  }
  const e = (err ?? {}) as FastifyLikeError
  if (Array.isArray(e.validation)) {
    return { problem: make('VALIDATION_FAILED', describeValidation(e.validation, e.validationContext), requestId), headers: null }
  }
  // A body whose client stopped sending it (its connection closed, or answered 408 and closed):
  // Node's 'aborted', which Fastify's body reader passes on as a 400. Nobody is left to answer,
  // and nothing was malformed: it was recorded as a VALIDATION_FAILED body (category security on
  // a call's route) and counted as a 400 no one was sent.
  if (e.code === 'ECONNRESET' && e.message === 'aborted') return { problem: make('CLIENT_CLOSED', 'The client left before its request arrived whole', requestId), headers: null }
  if (typeof e.code === 'string' && e.code in fastifyClientErrors) {
    const [code, detail] = fastifyClientErrors[e.code]
    const problem = make(code, detail, requestId)
    // Fastify's own status where it is more precise than the code's (414 URI Too Long).
    if (typeof e.statusCode === 'number' && e.statusCode >= 400 && e.statusCode < 500) problem.status = e.statusCode
    return { problem, headers: null }
  }
  if (err instanceof SyntaxError && typeof e.statusCode === 'number' && e.statusCode === 400) {
    return { problem: make('VALIDATION_FAILED', 'The body is not valid JSON', requestId), headers: null }
  }
  const status = typeof e.statusCode === 'number' ? e.statusCode : 500
  if (status >= 400 && status < 500) {
    const code = statusToCode[status] ?? 'BAD_REQUEST'
    return { problem: { ...make(code, ErrorCodes[code].title, requestId), status }, headers: null }
  }
  return { problem: make('INTERNAL', 'The gateway could not complete the call', requestId), headers: null }
}

function make (code: ErrorCode, detail: string, requestId: string): Problem {
  return { type: problemType(code), title: ErrorCodes[code].title, status: ErrorCodes[code].status, code, detail, requestId }
}

type ValidationError = { instancePath?: string, schemaPath?: string, keyword?: string, message?: string, params?: Record<string, unknown>, propertyName?: string }

/**
 * What describeValidation is told of the value refused: its schema and the value (to tell an
 * array's index from an object's key, and a union's branches apart), and whether the keys the
 * schema does not name are the value's data (`hideDataKeys`: a Kernel answer's, for a log line).
 */
export interface ValidationSubject { schema: unknown, value: unknown, hideDataKeys?: boolean }

/**
 * "input/limit must be <= 100": names the field, as CONTRACT §5 asks. Under an `anyOf` or a
 * `oneOf`, Ajv reports each branch's first error, then that none matched: the first branch's
 * was named, about a branch the value was never meant to match (an object failing inside the
 * object branch of `anyOf: [{type: "null"}, {...}]` was "must be null"). The error named is the
 * one of the branch the value came closest to (see `closest`); when every branch refused the
 * value's type, all of them are named ("must be null or object"). Work only on a refusal, over
 * the few errors Ajv gives. With `hideDataKeys`, a key no `properties` or `required` of the
 * schema names (a map's: an e-mail address, a user's name) is shown as `[<key>]`.
 */
export function describeValidation (errors: readonly ValidationError[], context = 'input', subject?: ValidationSubject): string {
  const first = closest(errors, subject === undefined ? null : otherKinds(errors, subject.schema, subject.value))
  if (first === undefined) return 'The input is not valid'
  const named = subject?.hideDataKeys === true ? namesOf(subject.schema) : null
  const keySegment = (key: string): string => named !== null && !named.has(key) ? DATA_KEY : segment(key, false)
  const segments = pathOf(first.instancePath ?? '', subject === undefined ? NO_VALUE : subject.value, named)
  const params = first.params ?? {}
  // A key `propertyNames` refused: Ajv's errors of the key's rule carry the key (the rule's
  // message is the key's, not the object's: "input.m must match pattern" named the map), and
  // its own error says only "property name must be valid". The key is named as additionalProperties'
  // is, cut and quoted as every key.
  const key = typeof first.propertyName === 'string' ? first.propertyName : first.keyword === 'propertyNames' && typeof params.propertyName === 'string' ? params.propertyName : undefined
  if (key !== undefined) {
    return `${field(context, [...segments, keySegment(key)])} is not allowed: the key ${first.keyword === 'propertyNames' ? 'is not valid' : first.message ?? 'is not valid'}`
  }
  if (typeof params.missingProperty === 'string') {
    return `${field(context, [...segments, keySegment(params.missingProperty)])} is required`
  }
  if (typeof params.additionalProperty === 'string') {
    return `${field(context, [...segments, keySegment(params.additionalProperty)])} is not allowed`
  }
  return `${field(context, segments)} ${first.message ?? 'is not valid'}`
}

/** A key of the value's own data in a path describeValidation writes with `hideDataKeys`. */
const DATA_KEY = '[<key>]'

/** The property names a schema declares (`properties`' keys, `required`'s names), anywhere in it; computed once per schema. */
const schemaNames = new WeakMap<object, ReadonlySet<string>>()

function namesOf (schema: unknown): ReadonlySet<string> {
  if (typeof schema !== 'object' || schema === null) return new Set()
  let names = schemaNames.get(schema)
  if (names === undefined) {
    const found = new Set<string>()
    const seen = new Set<object>()
    const walk = (node: unknown): void => {
      if (typeof node !== 'object' || node === null || seen.has(node)) return
      seen.add(node)
      if (Array.isArray(node)) { for (const item of node) walk(item); return }
      const { properties, required } = node as { properties?: unknown, required?: unknown }
      if (typeof properties === 'object' && properties !== null && !Array.isArray(properties)) for (const name of Object.keys(properties)) found.add(name)
      if (Array.isArray(required)) for (const name of required) if (typeof name === 'string') found.add(name)
      for (const k in node) if (Object.hasOwn(node, k)) walk((node as Record<string, unknown>)[k])
    }
    walk(schema)
    names = found
    schemaNames.set(schema, names)
  }
  return names
}

/** describeValidation without the value: whether a number in a path is an array's index or an object's key is not known. */
const NO_VALUE = Symbol('no value')

/** How many characters of a key a message shows: a key is input, and one of 10,000 made a message of 10,000. */
const KEY_SHOWN = 64
/** Past this length a path leaves out its middle segments ("input.a.….y.z"), keeping its first and its last. */
const PATH_SHOWN = 256
/** A key shown bare in a dotted path; any other is quoted (["a.b"], ["sp ace"]), "…" being the mark of a cut key. */
const PLAIN = /^[^\s.[\]"'\\…\p{C}]+$/u
const INDEX = /^(?:0|[1-9][0-9]*)$/
/** An array's index has at most 10 digits (the last is 4294967294): a longer number in a path is an object's key, shown as one. */
const INDEX_DIGITS = 10

/**
 * The segments of Ajv's instance path (a JSON pointer, its ~1 and ~0 unescaped: a field "a/b" is
 * "a/b", not "a~1b"), each as a path shows it. With the value, a number is an array's index
 * (".3") or an object's key (["3"]); without it, an index as before. With `named`, an object's
 * key not in it is the value's data, shown as DATA_KEY.
 */
function pathOf (pointer: string, value: unknown, named: ReadonlySet<string> | null = null): string[] {
  if (pointer === '') return []
  const segments: string[] = []
  let at = value
  for (const raw of pointer.slice(1).split('/')) {
    const key = raw.replace(/~1/g, '/').replace(/~0/g, '~')
    const known = at !== NO_VALUE && typeof at === 'object' && at !== null
    const index = known ? Array.isArray(at) : INDEX.test(key) && key.length <= INDEX_DIGITS
    segments.push(!index && named !== null && !named.has(key) ? DATA_KEY : segment(key, index))
    at = known && Object.hasOwn(at as object, key) ? (at as Record<string, unknown>)[key] : NO_VALUE
  }
  return segments
}

/**
 * A key or index as a path shows it: ".name", ".3", ["a.b"]. A key is cut after KEY_SHOWN
 * characters (code points), or sooner when its quoted form would pass twice that (a character
 * escaped as \u0001 is six), the cut marked by "…" (outside the quotes).
 */
function segment (key: string, index: boolean): string {
  if (index) return '.' + key
  let shown = ''
  let count = 0
  let width = 0
  for (const c of key) {
    const w = quoted(c).length - 2
    if (count === KEY_SHOWN || width + w > 2 * KEY_SHOWN) break
    shown += c
    count++
    width += w
  }
  const cut = shown.length < key.length ? '…' : ''
  return PLAIN.test(shown) && !INDEX.test(shown) ? `.${shown}${cut}` : `[${quoted(shown)}${cut}]`
}

/**
 * A key JSON-quoted, and every character JSON leaves as it is but a reader would not see as
 * written escaped too: format characters (U+202E turns the rest of the message around, U+200B and
 * U+FEFF hide), U+007F..U+009F, private and unassigned ones, and the line breaks U+2028, U+2029 and
 * U+0085, which would break the detail's line (JSON.stringify escapes U+0000..U+001F only).
 */
function quoted (key: string): string {
  return JSON.stringify(key).replace(/[\p{C}\p{Zl}\p{Zp}]/gu, c => {
    let escaped = ''
    for (let i = 0; i < c.length; i++) escaped += '\\u' + c.charCodeAt(i).toString(16).padStart(4, '0')
    return escaped
  })
}

/** The context and its path's segments, bounded by PATH_SHOWN: the first and as many of the last as fit, "…" between. */
function field (context: string, segments: readonly string[]): string {
  let length = context.length
  for (const s of segments) length += s.length
  if (length <= PATH_SHOWN || segments.length < 3) return context + segments.join('')
  let tail = segments[segments.length - 1]
  const head = context + segments[0]
  for (let i = segments.length - 2; i > 0 && head.length + tail.length + segments[i].length + 2 <= PATH_SHOWN; i--) tail = segments[i] + tail
  return `${head}.…${tail}`
}

/**
 * The schema paths ("#/oneOf/0/") of the union branches the value is not of the kind of: an
 * object branch whose field's `const` or `enum` (a tagged union's `kind`) the value's field
 * breaks while another branch's `const` or `enum` of that field admits it. Ajv checks `required`
 * before `properties` and stops at a branch's first error, so a branch that wants other fields
 * never got to its `kind`: {kind: "b"} missing `y` under `oneOf: [A (kind a, requires x),
 * B (kind b, requires y)]` was named by A's "x is required". A field no other branch tells by
 * (a nullable object's enum field) leaves its branch weighed: its fault is then the value's. Of
 * a union's branches, those with the fewest such faults are weighed, never none.
 */
function otherKinds (errors: readonly ValidationError[], schema: unknown, value: unknown): string[] {
  const others: string[] = []
  for (const s of errors) {
    if (!summary(s) || s.schemaPath === undefined) continue
    const branches = pointer(schema, s.schemaPath.replace(/^#/, ''), true)
    const at = pointer(value, s.instancePath ?? '', false)
    if (!Array.isArray(branches) || typeof at !== 'object' || at === null || Array.isArray(at)) continue
    const kinds = branches.map(branch => kindFields(branch, at as Record<string, unknown>))
    // The fields some branch admits the value's field for; a branch's faults, those it does not.
    const admitted = new Set<string>()
    for (const fields of kinds) for (const [name, admits] of fields) if (admits) admitted.add(name)
    const faults = kinds.map(fields => { let n = 0; for (const [name, admits] of fields) if (!admits && admitted.has(name)) n++; return n })
    // Only the branches of more faults than another: a value whose fields tell two kinds (kind a,
    // version 2 of branches a/1 and b/2) set every branch aside, and nothing of the union was
    // left to name ("output must be null" under a nullable object).
    const fewest = faults.reduce((a, b) => Math.min(a, b), Infinity)
    faults.forEach((n, i) => { if (n > fewest) others.push(`${s.schemaPath}/${i}/`) })
  }
  return others
}

/**
 * An object branch's fields with a `const` or `enum` the object gives, each with whether it admits
 * the object's value. A branch composed with `allOf` (OpenAPI's way: a base schema by $ref, which
 * the manifest inlines, then the branch's own `kind` and fields) gives the fields of its parts, a
 * field admitted only if every part admits it; nested `allOf`s up to `ALL_OF_DEPTH` deep.
 */
function kindFields (branch: unknown, object: Record<string, unknown>, fields = new Map<string, boolean>(), level = 0): Map<string, boolean> {
  if (typeof branch !== 'object' || branch === null) return fields
  const { properties, allOf } = branch as { properties?: Record<string, { const?: unknown, enum?: unknown }>, allOf?: unknown }
  if (typeof properties === 'object' && properties !== null) {
    for (const [name, field] of Object.entries(properties)) {
      if (!Object.hasOwn(object, name) || typeof field !== 'object' || field === null) continue
      const given = object[name]
      let admits: boolean
      if ('const' in field) admits = same(field.const, given)
      else if (Array.isArray(field.enum)) admits = field.enum.some(v => same(v, given))
      else continue
      fields.set(name, admits && fields.get(name) !== false)
    }
  }
  if (Array.isArray(allOf) && level < ALL_OF_DEPTH) for (const part of allOf) kindFields(part, object, fields, level + 1)
  return fields
}

/** How deep in a union's branch `allOf`s are looked into for its kind: bounds the walk, beyond any manifest's need. */
const ALL_OF_DEPTH = 8

/**
 * Whether the value a client or the Kernel gave equals a schema's literal, as Ajv's `const` and
 * `enum` compare (key order aside). Walks the literal, not the value: JSON.stringify of the value
 * overflowed the stack on a deeply nested one (a 500 for a refusal; the depth bound is checked
 * after the schema) and cost a copy of a megabyte `kind` for every branch.
 */
function same (literal: unknown, given: unknown): boolean {
  if (literal === null || typeof literal !== 'object') return literal === given
  if (given === null || typeof given !== 'object' || Array.isArray(literal) !== Array.isArray(given)) return false
  if (Array.isArray(literal)) {
    const list = given as unknown[]
    return list.length === literal.length && literal.every((v, i) => same(v, list[i]))
  }
  const keys = Object.keys(literal)
  let n = 0
  for (const key in given) if (Object.hasOwn(given, key) && ++n > keys.length) return false
  return n === keys.length && keys.every(key => Object.hasOwn(given, key) && same((literal as Record<string, unknown>)[key], (given as Record<string, unknown>)[key]))
}

/** The part of a JSON document at a JSON pointer (Ajv's paths: "/shape/0"; "#" fragments are URI-escaped). */
function pointer (document: unknown, path: string, uri: boolean): unknown {
  let at = document
  if (path === '') return at
  for (const raw of path.slice(1).split('/')) {
    let key: string
    try { key = (uri ? decodeURIComponent(raw) : raw).replace(/~1/g, '/').replace(/~0/g, '~') } catch { return undefined }
    if (typeof at !== 'object' || at === null || !Object.hasOwn(at, key)) return undefined
    at = (at as Record<string, unknown>)[key]
  }
  return at
}

/** Ajv's "must match a schema in anyOf" (and oneOf's with none passing): it says only that the errors before it are its branches'. */
const summary = (e: ValidationError): boolean =>
  (e.keyword === 'anyOf' || (e.keyword === 'oneOf' && e.params?.passingSchemas == null))

/** The segments of an instance path. */
function depth (path: string | undefined): number {
  let n = 0
  if (path !== undefined) for (let i = 0; i < path.length; i++) if (path.charCodeAt(i) === 47) n++
  return n
}

/**
 * The error describeValidation names; errors[0] when there is no `anyOf` or `oneOf` to choose
 * among. A branch whose error says the value is not of its kind, a wrong type of the value
 * itself or a `const` or `enum` of the value or of one of its fields (a discriminator, as
 * `kind` of OpenAPI's tagged unions), is the farthest; among the others, the error deepest in the
 * value (an error of the value itself, a field it lacks, counts one level down from it), the
 * first among equals. A field's wrong type in the branch the discriminator chose ranked below
 * the `required` of another branch until 2026-12-05 ("y is required" for {kind: "a", x: 5}).
 */
function closest (errors: readonly ValidationError[], others: readonly string[] | null = null): ValidationError | undefined {
  if (errors.length < 2 || !errors.some(summary)) return errors[0]
  let best: ValidationError | undefined
  let bestRank = -1
  const ofOther = (e: ValidationError): boolean => others !== null && others.some(prefix => (e.schemaPath ?? '').startsWith(prefix))
  for (const e of errors) {
    if (summary(e) || ofOther(e)) continue
    // The union whose branch this error is of: the summary nearest it in the schema.
    let at = ''
    let within = -1
    for (const s of errors) {
      const prefix = s.schemaPath ?? ''
      if (summary(s) && prefix.length > within && (e.schemaPath ?? '').startsWith(prefix + '/')) { at = s.instancePath ?? ''; within = prefix.length }
    }
    const below = depth(e.instancePath) - depth(at)
    // A wrong type of the value itself ranks lowest; a const or enum of the value or of a field
    // next (a discriminator, or an ordinary field's value: of a nullable object, it is the
    // object's fault, not "must be null"); anything deeper or else, by its depth.
    // Counted from the value's root, by the depth of its union: an error of a union nested in a
    // branch of another (a union field of a nullable object) got as far as that inner union, and
    // its wrong type tied with the outer null branch's, which won ("output must be null" for {a: true}).
    const rank = depth(at) + (e.keyword === 'type' && below === 0 ? 0 : (e.keyword === 'const' || e.keyword === 'enum') && below <= 1 ? 0.5 : 1 + below)
    if (rank > bestRank) { best = e; bestRank = rank }
  }
  if (best === undefined) return errors[0]
  if (best.keyword !== 'type') return best
  // The value's type matched no branch: name every type they admit.
  const types: string[] = []
  for (const e of errors) {
    if (e.keyword !== 'type' || e.instancePath !== best.instancePath || ofOther(e)) continue
    const type = e.params?.type
    if (type === undefined) continue
    for (const t of Array.isArray(type) ? type : String(type).split(',')) if (!types.includes(String(t))) types.push(String(t))
  }
  return types.length < 2 ? best : { ...best, message: `must be ${types.slice(0, -1).join(', ')} or ${types[types.length - 1]}` }
}
