import type { FastifyInstance, FastifyRequest, FastifySchema, FastifyReply } from 'fastify'
import { hash } from 'node:crypto'
import { Ajv, type ValidateFunction } from 'ajv'
import { addGatewayFormats } from '../../formats.js'
import { CallContext } from '../../plugins/pipeline/index.js'
import { compiledOnce } from '../../compiled.js'
import { withoutKeyword } from '../../schema-walk.js'
import { takesIfNoneMatch } from '../../plugins/cache/index.js'
import { COMPRESSION_THRESHOLD, negotiate } from '../../plugins/compression/index.js'
import { clientRequestId } from '../../ids.js'
import { MantleError } from '../../errors.js'
import { addJsonBodyParser } from '../../json-body.js'
import type { JsonSchema, Operation } from '../../manifest.js'

// The REST face decodes (path params + query string or JSON body into one input), hands the
// call to the pipeline and encodes with the op's compiled output serializer, so fields the
// schema does not declare never reach the client. No policy lives here.

const problem = { content: { 'application/problem+json': { schema: { $ref: 'Problem#' } } } }
const IDEMPOTENCY_KEY = /^[\x21-\x7e]{1,255}$/
const VISIBLE_ASCII = /^[\x21-\x7e]+$/
/**
 * The longest call name kept as it is in a call's key (a REST batch call id's own bound): a longer
 * one, a GraphQL alias (bounded only by the document's size), is shortened (see callKey).
 */
export const MAX_CALL_SUFFIX = 128
/** How much of a longer call name its key keeps, before the hash of the whole name. */
const SUFFIX_HEAD = 64

/**
 * The longest a path parameter may be, in characters once decoded: the router's bound (app.ts),
 * beyond which a call is refused 414 BAD_REQUEST before any route. The document says so of each
 * path parameter that may be text.
 */
export const MAX_PATH_PARAM_LENGTH = 256

export interface RestAdapterOptions {
  /** Adds the bearer security requirement to the OpenAPI document. */
  secured: boolean
}

/**
 * Which concerns add headers to an answer, or refusals of their own: the OpenAPI document says
 * which, per operation.
 */
export interface HeaderConcerns {
  cache: boolean
  idempotency: boolean
  /** How long a stored outcome answers repeats, in words (BFF_IDEMPOTENCY_TTL_SECONDS: it said 24 h whatever it was). */
  idempotencyFor: string
  rateLimit: boolean
  firewall: boolean
  shedding: boolean
  /** Response compression on: an answer of 1 KiB or more may carry `Vary: accept-encoding`. */
  compression: boolean
}

type HeaderDoc = Record<string, { type: 'string', description: string }>

// The OpenAPI document is built once, from the routes' schemas, while a manifest reload may
// give an operation a cache or a rate limit, or take them away: what those concerns add is
// documented for every operation they may apply to (headers a response "may" carry), not only
// for those that had them at start-up, so that no reload makes the document untrue.

/** Whether a call of `op` may be cached: a query, over GET or POST (the cache plugin on). */
const mayCache = (op: Operation, on: HeaderConcerns): boolean => on.cache && op.type === 'query'

const RATE_LIMIT_HEADERS: HeaderDoc = {
  'RateLimit-Limit': { type: 'string', description: 'Calls allowed per window (an operation with a limit, or the gateway\'s own)' },
  'RateLimit-Remaining': { type: 'string', description: 'Calls left in the window' },
  'RateLimit-Reset': { type: 'string', description: 'Seconds until the window frees a call' }
}

/** The Vary of an answer compression may encode, where no other concern adds one. */
export const COMPRESSED_VARY = { type: 'string', description: 'accept-encoding, when the answer is compressed (1 KiB or more, to an Accept-Encoding naming br, gzip or deflate)' } as const

/** The response headers a 2xx answer of `op` may carry, for the OpenAPI document only. */
function responseHeaders (op: Operation, on: HeaderConcerns): HeaderDoc {
  const doc: HeaderDoc = { 'x-request-id': { type: 'string', description: 'The request id: the client\'s x-request-id when it is plain and short, else one the gateway made' } }
  if (mayCache(op, on)) {
    doc['x-cache'] = { type: 'string', description: 'hit, miss or stale: where the answer came from (when the operation is cached)' }
    // Only where If-None-Match is read: a cached query over POST answers no ETag.
    if (takesIfNoneMatch(op)) doc.ETag = { type: 'string', description: 'A weak tag of the answer (W/"…"); send it back in If-None-Match for a 304 (when the operation is cached)' }
    doc['Cache-Control'] = { type: 'string', description: 'private, max-age=<seconds of freshness left> (0 when stale; when the operation is cached)' }
    doc.Vary = { type: 'string', description: 'authorization (the answer is the token\'s), and accept-encoding when compressed' }
  } else if (on.compression) {
    // Compression's own: it was declared on a cached query's alone, and every other 2xx of 1 KiB or more sent it undeclared.
    doc.Vary = COMPRESSED_VARY
  }
  if (on.idempotency && op.type === 'mutation') {
    doc['Idempotent-Replayed'] = { type: 'string', description: 'true when the answer is the stored one of an earlier call with the same Idempotency-Key' }
  }
  if (on.rateLimit) Object.assign(doc, RATE_LIMIT_HEADERS)
  return doc
}

/**
 * The headers a refusal may carry, for the document's 4XX and 5XX: Retry-After on each that asks
 * for a wait (IDEMPOTENCY_CONFLICT, the breaker's or the bulkhead's KERNEL_UNAVAILABLE, OVERLOADED,
 * a Kernel 4xx's own passed on), whatever concern is on; and a 401's challenge. Only the 429 had
 * its Retry-After documented, and only with the rate limits on.
 */
const retryAfterDoc = (idempotency: boolean): HeaderDoc => ({ 'Retry-After': { type: 'string', description: `Seconds to wait before calling again, on a refusal that asks for a wait (${idempotency ? 'IDEMPOTENCY_CONFLICT 409, RATE_LIMITED 429 of a tenant holding the most idempotency keys it may, ' : ''}KERNEL_UNAVAILABLE or OVERLOADED 503, a Kernel refusal or failure (KERNEL_ERROR 502) that said so)` } })
// With idempotency off, the description named its two refusals, which cannot happen then.
const RETRY_AFTER = retryAfterDoc(true)
const RETRY_AFTER_NO_KEYS = retryAfterDoc(false)
const retryAfter = (on: HeaderConcerns): HeaderDoc => on.idempotency ? RETRY_AFTER : RETRY_AFTER_NO_KEYS
const BEARER_CHALLENGE: HeaderDoc = { 'WWW-Authenticate': { type: 'string', description: 'Bearer, with error="invalid_token" or "invalid_request" for a token refused: on a 401' } }

/**
 * What a 4XX may carry: Retry-After, a 401's challenge (identity on), RateLimit-* (rate limits
 * on), and with `replays` (a mutation, idempotency on) the Idempotent-Replayed of a Kernel
 * refusal stored under an Idempotency-Key and answered again, which the 2XX alone documented.
 */
export function refusalHeaderDoc (secured: boolean, on: HeaderConcerns, replays = false): HeaderDoc {
  return {
    ...retryAfter(on),
    ...(secured ? BEARER_CHALLENGE : {}),
    ...(replays ? { 'Idempotent-Replayed': { type: 'string', description: 'true when the refusal is the stored one (the Kernel\'s 4xx) of an earlier call with the same Idempotency-Key' } } : {}),
    ...(on.rateLimit ? RATE_LIMIT_HEADERS : {})
  }
}

/**
 * What a 5XX may carry: Retry-After, and RateLimit-* (rate limits on). A call that fails or is
 * refused past the HTTP guard or an operation's limit (a Kernel failure here, a 400, 401, 403,
 * 404 ... in refusalHeaderDoc) carries the window's RateLimit-* as its 2XX would: the document
 * declared them on the 2XX and the 429 only.
 */
export function failureHeaders (on: HeaderConcerns): HeaderDoc {
  return on.rateLimit ? { ...retryAfter(on), ...RATE_LIMIT_HEADERS } : retryAfter(on)
}

export function problemResponse (description: string, headers: HeaderDoc): Record<string, unknown> {
  return { description, headers, ...problem }
}

/**
 * The codes a 4XX of `op` may carry, for its description (it read "Default Response"): only those
 * that can happen to it, with the concerns that are on. The firewall's on any operation while the
 * firewall is on, as a reload may give an operation a `firewall`.
 */
function refusalDescription (op: Operation, secured: boolean, on: HeaderConcerns): string {
  const codes = [op.type === 'mutation' ? 'VALIDATION_FAILED 400 (the input, or a malformed Idempotency-Key)' : 'VALIDATION_FAILED 400 (the input)']
  if (secured) codes.push('UNAUTHENTICATED 401', 'FORBIDDEN 403 (the token\'s roles or zone)')
  if (on.firewall) codes.push('FIREWALL_BLOCKED 403')
  codes.push('NOT_FOUND 404')
  if (on.idempotency && op.type === 'mutation') codes.push('IDEMPOTENCY_CONFLICT 409', 'IDEMPOTENCY_KEY_REUSED 422')
  if (op.inputInBody) codes.push('PAYLOAD_TOO_LARGE 413', 'UNSUPPORTED_MEDIA_TYPE 415')
  if (op.pathParams.length > 0) codes.push('BAD_REQUEST 414 (a path parameter over 256 characters)')
  if (op.type === 'mutation') codes.push('BAD_REQUEST 412 (an If-Match other than *: the gateway\'s entity tags are weak, so none holds)')
  codes.push('KERNEL_REJECTED (any other 4xx of the Kernel, with its status)')
  return `A refusal (its code is stable): ${codes.join(', ')}`
}

/** The codes a 5XX may carry, for its description. */
function failureDescription (on: HeaderConcerns): string {
  return `A failure (its code is stable): INTERNAL 500, KERNEL_ERROR 502, KERNEL_UNAVAILABLE 503${on.shedding ? ', OVERLOADED 503' : ''}, KERNEL_TIMEOUT 504`
}

/** A 429's own entry: its Retry-After and RateLimit-*. */
export const tooManyRequests = {
  description: 'RATE_LIMITED: the operation\'s limit, or the gateway\'s, is reached; retry after Retry-After seconds',
  headers: { 'Retry-After': { type: 'string', description: 'Seconds to wait before a call may pass' }, ...RATE_LIMIT_HEADERS },
  content: { 'application/problem+json': { schema: { $ref: 'Problem#' } } }
}

export function single (value: string | string[] | undefined): string | undefined {
  return typeof value === 'string' ? value : undefined
}

/**
 * The Idempotency-Key header: undefined when absent, null when no store could key on it. A
 * malformed key is refused by the pipeline's validation stage, and only for a mutation (queries
 * ignore the key): refused there, the call has its audit entry like every other refusal.
 */
export function idempotencyKeyOf (request: FastifyRequest): string | null | undefined {
  return checkedIdempotencyKey(single(request.headers['idempotency-key']))
}

/**
 * The key of one call of several sent under one Idempotency-Key: `<key> <suffix>` (a REST batch
 * call's id, a tRPC batch index, a GraphQL field). The space is the one character a header
 * value may hold inside that a client's key never does: so no call's key equals a key a client
 * can send, nor another key's call. Before, `<key>.<suffix>` made a batch's call `0` under `K`
 * and a single call keyed `K.0` one key, and either replayed the other's answer (or was refused
 * 422). The key travels to the Kernel as a header, so the suffix must be visible ASCII like the
 * key itself: a REST batch call id may be any text, and one holding a newline or a non-ASCII
 * character made undici refuse the header, which was answered 503 and counted towards the
 * breaker. Such a call gets null, a malformed key, and its own refusal.
 */
export function callKey (key: string | null | undefined, suffix: string): string | null | undefined {
  if (key == null) return key
  if (!VISIBLE_ASCII.test(suffix)) return null
  // A name over MAX_CALL_SUFFIX characters is its first 64, a space and the SHA-256 of it whole
  // (base64url): a key of 384 characters at most (255, a space and a name of 128). A GraphQL
  // alias made the key as long as the document allows (64 KiB), sent to the Kernel as a header
  // (one over ~16 KB answered 431, and that refusal was stored) and written in the store's keys. No name kept as it is holds a
  // space, so no shortened name is one, and two names differ in their hashes.
  return suffix.length <= MAX_CALL_SUFFIX ? `${key} ${suffix}` : `${key} ${suffix.slice(0, SUFFIX_HEAD)} ${hash('sha256', suffix, 'base64url')}`
}

/**
 * The concerns that are on, for the document of a route registered after them (app.ts): their
 * decorators say which headers exist.
 */
export function headerConcerns (app: FastifyInstance): HeaderConcerns {
  return { cache: app.hasDecorator('responseCache'), idempotency: app.hasDecorator('idempotency'), idempotencyFor: app.hasDecorator('idempotency') ? duration(app.idempotency.ttlSeconds) : '', rateLimit: app.hasDecorator('rateLimiter'), firewall: app.hasPlugin('mantle-firewall'), shedding: app.hasPlugin('mantle-pressure'), compression: app.hasPlugin('mantle-compression') }
}

/** The Idempotency-Key request header, for the document (`keyed`: what a key does to the calls). */
export function idempotencyKeyHeader (concerns: HeaderConcerns, keyed = 'Runs the mutation'): JsonSchema {
  return {
    type: 'string',
    minLength: 1,
    maxLength: 255,
    pattern: '^[\\x21-\\x7e]+$',
    description: concerns.idempotency
      ? `${keyed} once per tenant and key for ${concerns.idempotencyFor}; a repeat by the same user gets the stored answer with Idempotent-Replayed: true (by another user of the tenant, 422)`
      : 'Passed on to the Kernel as its Idempotency-Key (which may answer a repeat from its own record); the call may then be retried after a Kernel failure. The gateway stores no answer (BFF_IDEMPOTENCY_ENABLED=false)'
  }
}

/** Seconds in the largest whole unit that states them exactly: 86400 is `24 h`, 90 is `90 s`. */
function duration (seconds: number): string {
  if (seconds % 3600 === 0) return `${seconds / 3600} h`
  if (seconds % 60 === 0) return `${seconds / 60} min`
  return `${seconds} s`
}

/** An Idempotency-Key as sent (undefined: none), or null when no store could key on it. */
export function checkedIdempotencyKey (key: string | undefined): string | null | undefined {
  return key === undefined || IDEMPOTENCY_KEY.test(key) ? key : null
}

export default async function restAdapter (app: FastifyInstance, opts: RestAdapterOptions): Promise<void> {
  // A body is a call's input: a prototype key in it is the pipeline's to refuse (json-body.ts).
  addJsonBodyParser(app, 'keep')
  // Path params and query strings arrive as strings: this Ajv only coerces them to the types the
  // input schema declares. Validation proper is the pipeline's, the same on every face. One Ajv
  // per schema, compiled once per schema text in the process (compiledOnce), as the pipeline's.
  const coercer = (loose: JsonSchema): ValidateFunction => compiledOnce('coercer', loose, () => {
    const ajv = new Ajv({ coerceTypes: 'array', strict: false, allErrors: true, useDefaults: false })
    addGatewayFormats(ajv)
    return ajv.compile(loose)
  })
  const passthrough = (): true => true
  // `input`: the operation's, whose fields not named (patternProperties, an additionalProperties
  // schema) a query string may carry too; the route's own query schema leaves them out (they are
  // not parameters the document can name).
  const validatorCompiler = (input: JsonSchema) => ({ schema, httpPart }: { schema: FastifySchema, httpPart?: string }) => {
    if (httpPart === 'body' || httpPart === 'headers') return passthrough
    // Only the fields are coerced (the other rules of the input are the pipeline's to check).
    // Without their patterns: this Ajv reads every keyword of a field (allErrors), and ran a
    // pattern on text longer than the field's maxLength, which the pipeline's check refuses
    // first. The manifest lets a pattern that backtracks through only when maxLength bounds it
    // (manifest-patterns.ts): `^(a|a)*$` with maxLength 20 held the event loop 0.8 s for 26
    // characters of a query string, doubling with each more.
    const unnamed = httpPart === 'querystring' ? unnamedFields(input) : null
    const loose = withoutKeyword({ type: 'object', properties: (schema as JsonSchema).properties ?? {}, ...unnamed }, 'pattern') as JsonSchema
    // Optimization: string-only parts (most path params) need no coercion at all.
    const props = Object.values((loose.properties ?? {}) as Record<string, JsonSchema>)
    if (unnamed === null && props.every(p => p.type === 'string')) return passthrough
    const coerce = coercer(loose)
    const numeric = numericFields(loose.properties as Record<string, JsonSchema>)
    const literals = literalFields(loose.properties as Record<string, JsonSchema>)
    const others = unnamed === null ? null : schemasOfUnnamed(loose)
    if (numeric.length === 0 && literals === null && others === null) return (data: unknown) => { coerce(data); return true }
    return (data: unknown) => {
      // A field not named is read by the rules of the schemas that take it, as a named one is.
      const extra = others === null ? null : others(data as Record<string, unknown>)
      const numericNow = extra === null ? numeric : [...numeric, ...numericFields(extra)]
      const literalsNow = extra === null ? literals : [...(literals ?? []), ...(literalFields(extra) ?? [])]
      // Ajv turns any text Number() reads into a number (`0x10`, ` 16 `, `+5`, `0b11`) and ""
      // into null, where the other faces refuse them: such a value is left as text, and the
      // pipeline's validation refuses it as it does on every face.
      const held = numericNow.length === 0 ? null : holdLooseNumbers(data as Record<string, unknown>, numericNow)
      coerce(data)
      if (held !== null) restoreLooseNumbers(data as Record<string, unknown>, held)
      if (literalsNow !== null && literalsNow.length > 0) readLiterals(data as Record<string, unknown>, literalsNow)
      return true
    }
  }

  const concerns = headerConcerns(app)
  for (const op of app.pipeline.manifest.operations) {
    app.route({
      method: op.method,
      url: op.path,
      schema: routeSchema(op, opts.secured, concerns),
      config: { inputInPath: op.pathParams.length > 0, op: op.name, identity: 'required' },
      validatorCompiler: validatorCompiler(op.input),
      handler: handlerFor(app, op)
    })
  }
}

function handlerFor (app: FastifyInstance, op: Operation) {
  const entry = app.pipeline.entry(op.name)
  const pathParams = op.pathParams
  const inBody = op.inputInBody
  const conditional = takesIfNoneMatch(op)
  // A 304 carries the Vary its 200 would (RFC 9110 §15.4.5): @fastify/compress adds it only to a
  // body it compresses, and a 304 has none (wouldCompress).
  const compressing = app.hasReplyDecorator('compress')
  // With the audit on: from here on, a refusal is the call's, which the audit stage records.
  const reached = app.hasDecorator('audit') ? app.audit.reached : null
  const mutation = op.type === 'mutation'
  // The fields a POST, PUT or PATCH takes in its body that a client may put in its query string
  // instead (the input's, composed ones too; not the path's, which win anyway). None otherwise.
  const bodyFields = new Set(inBody ? Object.keys(composedFields(op.input).properties).filter(k => !pathParams.includes(k)) : [])
  return async function restHandler (request: FastifyRequest, reply: FastifyReply): Promise<unknown> {
    // If-Match (RFC 9110 §13.1.1: a server MUST evaluate it before performing the method) compares
    // strongly, and the gateway's entity tags are all weak: on a mutation, a list of tags cannot
    // hold, so the method is not performed. It was ignored, and a client guarding an update with
    // the ETag it had read (optimistic concurrency) overwrote whatever had changed since. `*` holds
    // when the target exists, which the Kernel decides. A refusal before the call, as a 415 is.
    let ifMatch: string | undefined
    if (mutation) {
      ifMatch = request.headers['if-match']
      if (ifMatch !== undefined && ifMatch.trim() !== '*') {
        throw new MantleError('BAD_REQUEST', 'If-Match cannot hold: the gateway\'s entity tags are weak, and If-Match compares strong ones; the mutation did not run', { status: 412 })
      }
    }
    // Input from the one place its method takes it (CONTRACT §3); input sent in the other was
    // dropped without a word, and the mutation ran with other input than the client sent.
    if (!inBody) {
      // A DELETE's is its path and query string (a GET's body is never parsed). `{}`, like an
      // absent or empty body, holds none.
      if (request.body !== undefined && !isEmptyObject(request.body)) {
        throw new MantleError('VALIDATION_FAILED', `A ${op.method} takes its input from the path and the query string, not a body: send its fields in the query string`)
      }
    } else if (bodyFields.size > 0) {
      // A POST, PUT or PATCH's is its path and JSON body (`POST /agents?model=x` made an agent of
      // the default model). A parameter the input does not name (a cache-buster, a tracking tag)
      // is let be.
      const query = request.query as Record<string, unknown>
      for (const key in query) {
        if (bodyFields.has(key)) throw new MantleError('VALIDATION_FAILED', `input.${key} goes in the JSON body of a ${op.method}, not in its query string`)
      }
    }
    reached?.(request)
    let input: Record<string, unknown>
    if (inBody) {
      const body = request.body
      // A body that is not an object goes on as it is: the validation stage refuses it, within
      // the pipeline, so that the refusal has its audit entry. Only an absent body is `{}`: the
      // JSON `null` is a body that is no object, as `[]` and `"s"` are (it was read as `{}`, and
      // a PATCH of `null` ran, changing the record's updatedAt).
      input = (body === undefined ? {} : body) as Record<string, unknown>
    } else {
      input = request.query as Record<string, unknown>
    }
    if (pathParams.length > 0 && typeof input === 'object' && input !== null && !Array.isArray(input)) {
      const params = request.params as Record<string, unknown>
      // The path wins over a body or query field of the same name.
      for (const p of pathParams) input[p] = params[p]
    }
    const headers = request.headers
    const ctx = new CallContext(request.id, 'rest', op, input, headers.authorization, single(headers.traceparent), mutation ? idempotencyKeyOf(request) : undefined)
    // Read for every query, not only those cached at start-up: a manifest reload may add a cache
    // (the ETags then went out, but a matching If-None-Match never got its 304).
    // Before, a cached query over POST answered a matching If-None-Match with a 304.
    if (conditional) ctx.ifNoneMatch = single(headers['if-none-match'])
    else if (mutation) {
      // A gateway that is not the origin forwards the conditions it cannot evaluate (RFC 9110
      // §13.2.1): whether the target exists is the Kernel's to say. They were dropped, and a
      // create-only PUT (If-None-Match: *) overwrote what was there.
      ctx.ifNoneMatch = single(headers['if-none-match'])
      if (ifMatch !== undefined) ctx.ifMatch = '*'
    }
    ctx.clientRequestId = clientRequestId(request.raw)
    ctx.tracestate = single(headers.tracestate)
    ctx.caller = reply.raw
    let result: unknown
    try {
      result = await entry.run(ctx)
    } finally {
      // Also when the call failed after the stages that set headers passed (an operation's limit,
      // say: the call used part of it): they go out beside the problem's own.
      if (ctx.headers !== null) applyHeaders(reply, ctx.headers)
    }
    // No content: a 205 too (RFC 9110 §15.3.6), which went out with `null`.
    if (ctx.status === 204 || ctx.status === 205 || ctx.status === 304) {
      if (ctx.status === 304 && compressing && wouldCompress(request, ctx.json)) addVary(reply, 'accept-encoding')
      return reply.code(ctx.status).send()
    }
    // The same compiled output serializer as every other face (the route's 2xx schema is for
    // OpenAPI): undeclared fields never leave, and an answer that breaks it is KERNEL_ERROR.
    const json = ctx.json ?? entry.serialize(result)
    if (ctx.status !== 200) reply.code(ctx.status)
    reply.type('application/json; charset=utf-8')
    return json
  }
}

/**
 * Whether @fastify/compress would have compressed the 200 a 304 stands for, so named
 * `accept-encoding` in its Vary: an answer of at least its threshold, to a request whose
 * Accept-Encoding takes a coding by @fastify/compress's own negotiation (`negotiate`). Every 304
 * named it: the 304 of a small answer, or of a request asking for no encoding, had a Vary its 200
 * did not (found using the gateway as a client would).
 */
function wouldCompress (request: FastifyRequest, json: string | null | undefined): boolean {
  if (json === null || json === undefined || Buffer.byteLength(json) < COMPRESSION_THRESHOLD) return false
  const accept = request.headers['accept-encoding']
  return accept !== undefined && negotiate(accept) !== null
}

/** A JSON object without a key: the one body a DELETE may carry (some clients send `{}` always). */
function isEmptyObject (value: unknown): boolean {
  return typeof value === 'object' && value !== null && !Array.isArray(value) && Object.keys(value).length === 0
}

/** The stages' headers onto the reply; their Vary is added to the one already there, not put in its place. */
function applyHeaders (reply: FastifyReply, headers: Record<string, string>): void {
  const vary = headers.vary
  const before = vary === undefined ? undefined : reply.getHeader('vary')
  reply.headers(headers)
  if (before !== undefined) {
    reply.header('vary', before)
    addVary(reply, vary)
  }
}

/** Adds to the reply's Vary (CORS's Origin, say) rather than replacing it. */
function addVary (reply: FastifyReply, value: string): void {
  const vary = reply.getHeader('vary')
  reply.header('vary', vary === undefined ? value : `${String(vary)}, ${value}`)
}

/** The rules of an input that read it whole: with path parameters, the body alone cannot show them. */
const WHOLE_INPUT_RULES = new Set(['allOf', 'anyOf', 'oneOf', 'not', 'if', 'then', 'else', 'dependencies', 'dependentRequired', 'dependentSchemas', 'minProperties', 'maxProperties', 'propertyNames'])

function routeSchema (op: Operation, secured: boolean, concerns: HeaderConcerns): FastifySchema {
  // A query string's fields include those the input is composed of (composedFields), and so do
  // a body's beside path parameters, whose document leaves the composition out (a rule over the
  // whole input, below): it documented no field the input took from `allOf: [{ $ref }]`, and a
  // client generated from it could not send them. Any other body's document keeps the composition.
  const { properties: props, required } = op.inputInBody && op.pathParams.length === 0
    ? { properties: (op.input.properties ?? {}) as Record<string, JsonSchema>, required: Array.isArray(op.input.required) ? op.input.required as string[] : [] }
    : composedFields(op.input)
  const pick = (keep: (k: string) => boolean): Record<string, JsonSchema> =>
    Object.fromEntries(Object.entries(props).filter(([k]) => keep(k)))
  const isPath = (k: string): boolean => op.pathParams.includes(k)
  // Every rule of the input but the path's: anyOf, minProperties, an additionalProperties schema
  // and the like were left out of the document, which then called valid (and a body optional)
  // what the pipeline refuses. Not patternProperties, which @fastify/swagger writes as an
  // additionalProperties, over a `false`; and with path parameters, no rule over the whole input
  // (it is checked with them, not on the body alone).
  const { properties: _p, required: _r, patternProperties, ...all } = op.input
  // Without patternProperties, a `false` additionalProperties would refuse the fields they admit.
  if (patternProperties !== undefined) delete all.additionalProperties
  const rules = op.pathParams.length === 0 ? all : Object.fromEntries(Object.entries(all).filter(([k]) => !WHOLE_INPUT_RULES.has(k)))
  const rest: JsonSchema = {
    ...rules,
    type: 'object',
    properties: pick(k => !isPath(k)),
    ...(required.some(k => !isPath(k)) ? { required: required.filter(k => !isPath(k)) } : {})
  }
  const schema: Record<string, unknown> = {
    operationId: op.name,
    tags: [op.type === 'query' ? 'queries' : 'mutations'],
    // `headers` is read by @fastify/swagger only; answers are encoded by the op's own serializer.
    response: { '2xx': { ...op.output, headers: responseHeaders(op, concerns) }, ...(concerns.rateLimit ? { 429: tooManyRequests } : {}), '4xx': problemResponse(refusalDescription(op, secured, concerns), refusalHeaderDoc(secured, concerns, concerns.idempotency && op.type === 'mutation')), '5xx': problemResponse(failureDescription(concerns), failureHeaders(concerns)) }
  }
  // Documentation only: the headers validator is a pass-through (the stages check what they read).
  const requestHeaders: Record<string, JsonSchema> = {}
  // Read with the store off too: checked (400 when malformed), passed on to the Kernel, and a
  // keyed mutation is retried. The document left it out then, and a generated client could not send it.
  if (op.type === 'mutation') {
    requestHeaders['idempotency-key'] = idempotencyKeyHeader(concerns)
    requestHeaders['if-none-match'] = { type: 'string', description: 'Sent on to the Kernel, which evaluates it (`*`: only if the target does not exist yet); the Kernel\'s 412 is answered as KERNEL_REJECTED' }
    requestHeaders['if-match'] = { type: 'string', description: 'Only `*` (only if the target exists), sent on to the Kernel, which evaluates it; any other value is refused 412 BAD_REQUEST: the gateway\'s tags are weak' }
  }
  if (mayCache(op, concerns) && takesIfNoneMatch(op)) {
    requestHeaders['if-none-match'] = { type: 'string', description: 'An ETag of an earlier answer: 304 with no body while it still matches (when the operation is cached)' }
  }
  if (Object.keys(requestHeaders).length > 0) schema.headers = { type: 'object', properties: requestHeaders }
  if (op.summary !== null) schema.summary = op.summary
  if (op.description !== null) schema.description = op.description
  if (op.deprecated) schema.deprecated = true
  if (secured) schema.security = [{ bearerAuth: [] }]
  if (op.pathParams.length > 0) schema.params = { type: 'object', properties: Object.fromEntries(Object.entries(pick(isPath)).map(([k, p]) => [k, boundedPathParam(p)])), required: [...op.pathParams] }
  if (op.inputInBody) schema.body = rest
  // With no field named, one the input does not name is still coerced (the route's validatorCompiler).
  else if (Object.keys(rest.properties as object).length > 0 || unnamedFields(op.input) !== null) schema.querystring = rest
  return schema as FastifySchema
}

/** Whether a field's schema says what its values are (a bare `true`, `{}` or description does not). */
const typed = (field: unknown): boolean => field !== null && typeof field === 'object' && ('type' in field || 'enum' in field || 'const' in field)

/** The keywords that compose an input of other schemas, whose fields are the input's too. */
const COMPOSITIONS = ['allOf', 'anyOf', 'oneOf'] as const

/**
 * The fields an input's query string (or body beside path parameters) may carry, and those it
 * must: the input's `properties` and `required`, and those of the schemas it is composed of (`allOf`, `anyOf`, `oneOf`, at any
 * depth; only an `allOf`'s `required` always applies). A field declared more than once is read
 * by its first declaration, the input's own first, but one that says what the field's values are
 * (a `type`, an `enum` or a `const`) wins over one that does not: `properties: { limit: true }`
 * beside an `additionalProperties: false` only lets the field through. Only the input's own `properties` were read:
 * a field an input takes from a shared schema (`allOf: [{ $ref: "#/schemas/Paging" }]`) was
 * never coerced, so `?limit=5` was refused (`input.limit must be integer`) where tRPC took
 * `{"limit":5}`, and the document had no parameter for it.
 */
function composedFields (input: JsonSchema): { properties: Record<string, JsonSchema>, required: string[] } {
  const properties = new Map<string, JsonSchema>()
  const required = new Set<string>()
  const visit = (schema: unknown, always: boolean): void => {
    if (schema === null || typeof schema !== 'object' || Array.isArray(schema)) return
    const s = schema as JsonSchema
    if (s.properties !== null && typeof s.properties === 'object') {
      for (const [key, field] of Object.entries(s.properties as Record<string, JsonSchema>)) {
        const first = properties.get(key)
        if (first === undefined || (!typed(first) && typed(field))) properties.set(key, field)
      }
    }
    if (always && Array.isArray(s.required)) for (const key of s.required as unknown[]) if (typeof key === 'string') required.add(key)
    for (const keyword of COMPOSITIONS) {
      const members = s[keyword]
      if (Array.isArray(members)) for (const member of members) visit(member, always && keyword === 'allOf')
    }
  }
  visit(input, true)
  return { properties: Object.fromEntries(properties), required: [...required] }
}

/**
 * A path parameter's schema with the router's bound on its length (MAX_PATH_PARAM_LENGTH) when it
 * may be text and declares none as tight: the document said any length of an `id` was served, and
 * a longer one was refused 414 before the route. For the document (and the coercion, which
 * refuses nothing): the bound itself is the router's.
 */
function boundedPathParam (schema: JsonSchema): JsonSchema {
  if (schema === null || typeof schema !== 'object') return schema
  const types = Array.isArray(schema.type) ? schema.type as unknown[] : [schema.type]
  if (schema.type !== undefined && !types.includes('string')) return schema
  if (typeof schema.maxLength === 'number' && schema.maxLength <= MAX_PATH_PARAM_LENGTH) return schema
  return { ...schema, maxLength: MAX_PATH_PARAM_LENGTH }
}

/**
 * The schemas an input gives the fields it does not name (`patternProperties`, an
 * `additionalProperties` schema), or null for none. A query string carries such fields too, and
 * they were never coerced: `?f_a=5` for `patternProperties: { "^f_": { type: integer } }` was
 * refused (`input.f_a must be integer`) where tRPC took {"f_a":5}.
 */
function unnamedFields (input: JsonSchema): JsonSchema | null {
  const { patternProperties, additionalProperties } = input
  const patterns = patternProperties !== null && typeof patternProperties === 'object' && Object.keys(patternProperties).length > 0 ? patternProperties : undefined
  const rest = additionalProperties !== null && typeof additionalProperties === 'object' ? additionalProperties : undefined
  if (patterns === undefined && rest === undefined) return null
  return { ...(patterns === undefined ? {} : { patternProperties: patterns }), ...(rest === undefined ? {} : { additionalProperties: rest }) }
}

/**
 * For a query of `loose` (a schema of unnamedFields), the fields of the data it does not name,
 * each with the schema whose rules read its text (numbers and literals): the first pattern that
 * matches its key, else the additionalProperties schema (Ajv's coercion applies each that
 * matches). Null when there are none.
 */
function schemasOfUnnamed (loose: JsonSchema): (data: Record<string, unknown> | null) => Record<string, JsonSchema> | null {
  const named = new Set(Object.keys((loose.properties ?? {}) as object))
  // As Ajv reads a pattern (the `u` flag).
  const patterns = Object.entries((loose.patternProperties ?? {}) as Record<string, JsonSchema>).map(([source, field]) => [new RegExp(source, 'u'), field] as const)
  const rest = loose.additionalProperties as JsonSchema | undefined
  return (data) => {
    if (data === null || typeof data !== 'object') return null
    let fields: Map<string, JsonSchema> | null = null
    for (const key of Object.keys(data)) {
      if (named.has(key)) continue
      const field = patterns.find(([pattern]) => pattern.test(key))?.[1] ?? rest
      if (field !== undefined) (fields ??= new Map()).set(key, field)
    }
    return fields === null ? null : Object.fromEntries(fields)
  }
}

/** A number as JSON writes it: what a query string or path may carry for a numeric field. */
const DECIMAL = /^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?$/

function takesNumber (schema: JsonSchema): boolean {
  const types = Array.isArray(schema.type) ? schema.type as unknown[] : [schema.type]
  return types.includes('number') || types.includes('integer')
}

/** The text of each value a field without a `type` lists (`enum`, `const`) that is no string: `"10"` for 10. */
type Literals = Map<string, unknown>

function literalsOf (schema: JsonSchema): Literals | null {
  if (schema === null || typeof schema !== 'object' || schema.type !== undefined) return null
  const values = [...(Array.isArray(schema.enum) ? schema.enum as unknown[] : []), ...('const' in schema ? [schema.const] : [])]
  let literals: Literals | null = null
  for (const v of values) {
    if (typeof v === 'number' || typeof v === 'boolean' || v === null) (literals ??= new Map()).set(String(v), v)
  }
  // A string the field lists stays that string.
  if (literals !== null) for (const v of values) if (typeof v === 'string') literals.delete(v)
  return literals === null || literals.size === 0 ? null : literals
}

/**
 * The fields (or the items of an array field) declared by `enum` or `const` alone with values
 * that are no strings: Ajv coerces by `type` only, so `?size=10` for `size: { enum: [10, 20] }`
 * stayed the text "10" and was refused, where tRPC and batch take 10. Null for none.
 */
function literalFields (properties: Record<string, JsonSchema> | undefined): Array<[string, Literals, boolean]> | null {
  let fields: Array<[string, Literals, boolean]> | null = null
  for (const [key, p] of Object.entries(properties ?? {})) {
    const own = literalsOf(p)
    if (own !== null) (fields ??= []).push([key, own, false])
    else if (p !== null && typeof p === 'object' && typeof p.items === 'object' && p.items !== null && !Array.isArray(p.items)) {
      const items = literalsOf(p.items as JsonSchema)
      if (items !== null) (fields ??= []).push([key, items, true])
    }
  }
  return fields
}

/** Reads each such field's text as the value it names, only in the form String(value) writes it ("10", never "010" or "1e1"). */
function readLiterals (data: Record<string, unknown> | null, fields: Array<[string, Literals, boolean]>): void {
  if (data === null || typeof data !== 'object') return
  for (const [key, literals, items] of fields) {
    const value = data[key]
    if (typeof value === 'string' && !items) {
      if (literals.has(value)) data[key] = literals.get(value)
    } else if (Array.isArray(value) && items) {
      for (let i = 0; i < value.length; i++) {
        const v: unknown = value[i]
        if (typeof v === 'string' && literals.has(v)) value[i] = literals.get(v)
      }
    }
  }
}

/** A numeric field of a query or a path: its name, and whether its items are the numbers (an array field). */
type NumericField = [key: string, items: boolean]

function numericFields (properties: Record<string, JsonSchema> | undefined): NumericField[] {
  const fields: NumericField[] = []
  for (const [key, p] of Object.entries(properties ?? {})) {
    if (takesNumber(p)) fields.push([key, false])
    else if (p.items !== undefined && p.items !== null && typeof p.items === 'object' && !Array.isArray(p.items) && takesNumber(p.items as JsonSchema)) fields.push([key, p.type === 'array'])
  }
  return fields
}

/** A value held out of the coercion: a field's whole (index null), or one item of an array field. */
type Held = [key: string, index: number | null, value: unknown]

/**
 * Takes out of `data` the numbers whose text is not a decimal number; null for none. Of an array
 * field only the loose items are held, each in its place (a lone value made the one-item array
 * Ajv makes of it), so that the validation names the item at fault: `?ns=1&ns=x` was refused as
 * `input.ns.0 must be integer` (the 1), and `?ns=0x10` as `input.ns must be array`, where every
 * other face names `input.ns.1` and `input.ns.0`.
 */
function holdLooseNumbers (data: Record<string, unknown> | null, numeric: readonly NumericField[]): Held[] | null {
  if (data === null || typeof data !== 'object') return null
  let held: Held[] | null = null
  for (const [key, items] of numeric) {
    let value = data[key]
    if (items && typeof value === 'string' && !DECIMAL.test(value)) data[key] = value = [value]
    if (items && Array.isArray(value)) {
      for (let i = 0; i < value.length; i++) {
        const item: unknown = value[i]
        if (typeof item === 'string' && !DECIMAL.test(item)) {
          (held ??= []).push([key, i, item])
          // Left as it is by the coercion (no type reads undefined), and put back after it.
          value[i] = undefined
        }
      }
      continue
    }
    const loose = Array.isArray(value) ? value.some(v => typeof v === 'string' && !DECIMAL.test(v)) : typeof value === 'string' && !DECIMAL.test(value)
    if (loose) {
      (held ??= []).push([key, null, value])
      data[key] = undefined
    }
  }
  return held
}

/** Puts back what holdLooseNumbers took out, where it was. */
function restoreLooseNumbers (data: Record<string, unknown>, held: readonly Held[]): void {
  for (const [key, index, value] of held) {
    if (index === null) data[key] = value
    else {
      const items = data[key]
      if (Array.isArray(items)) items[index] = value
    }
  }
}
