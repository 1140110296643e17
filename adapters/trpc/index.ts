import { clientRequestId, uuidv7 } from '../../ids.js'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { TRPCError } from '@trpc/server'
import { incomingMessageToRequest } from '@trpc/server/adapters/node-http'
import { getWSConnectionHandler, jsonEncoder, type Encoder } from '@trpc/server/adapters/ws'
import { eventJsonOf } from '../../plugins/events/index.js'
import { resolveResponse, type TRPCRequestInfo } from '@trpc/server/http'
import type { WebSocket } from 'ws'
import type { IncomingHttpHeaders, IncomingMessage } from 'node:http'
import type { FaceOptions } from '../face.js'
import { MantleError, refusalHeaders, type ErrorCode } from '../../errors.js'
import { CLOSE_TRY_AGAIN_LATER, ConnectionSlots, UNIDENTIFIED_DEFAULTS, reportSlots } from '../connection-slots.js'
import { closedByTheirFace, inFlightBoundMs, refusedByWs, upgradeAuthorization, upgradeTrace } from '../upgrade.js'
import { countSlowReaderCuts, slowReader, slowReaderCuts, utf8Sends } from '../slow-reader.js'
import { defaultUnreadBytes } from '../unread.js'
import { httpAuthorization, httpContext, socketContext, TRPC_CALLS, type TrpcContext } from './context.js'
import { decisions, messageGuardOf, runCall } from '../face.js'
import { clientAddress } from '../../address.js'
import { idempotencyKeyOf, single } from '../rest/index.js'
import { BATCH_TOO_LONG, DUPLICATE_ID, ProblemError, errorShape, isInternal } from './errors.js'
import { buildRouter, earlyRequestIds, unparsed, wrongMethod } from './router.js'
import { DEFAULT_SETTINGS as WEBSOCKET_DEFAULTS } from '../websocket/index.js'
import { MAX_ID_LENGTH } from '../websocket/frames.js'
import { LiveSubscriptions } from './subscriptions.js'
import { untilIdentityEnds, IDENTITY_ENDED } from '../expiry.js'
import type { Identity } from '../../plugins/auth/index.js'
import { jsonText } from '../../json-body.js'
import { encodeStreamsFast } from './utf8-stream.js'

export { ProblemError, errorShape, trpcCodeOf, type MantleErrorShape, type MantleErrorData } from './errors.js'

export interface TrpcFaceSettings {
  /** Calls one WebSocket connection may run at once; beyond it a call is refused with OVERLOADED. */
  maxInFlight: number
  /** Event subscriptions one WebSocket connection may hold. */
  maxSubscriptions: number
  /** WebSocket connections at /trpc on this instance; beyond it an upgrade gets 503 OVERLOADED. */
  maxConnections: number
  /** A WebSocket that sends no connectionParams within this time is closed with 4401. */
  authTimeoutMs: number
  /** Idle time before a WebSocket is pinged (closed without a pong); SSE keep-alive interval. */
  pingMs: number
  /**
   * Bytes a WebSocket may hold for a client that does not read before its subscriptions stop
   * pulling events (the bus then drops the oldest of each), and beyond which a call's answer
   * closes it with 1013 instead. The /ws face's bound.
   */
  maxBufferedBytes: number
  /**
   * Calls one WebSocket message may carry (wsLink sends every call started in one tick in one
   * message); beyond it the whole message is refused PAYLOAD_TOO_LARGE. Far more than the calls
   * a connection runs at once: past those, each call is refused OVERLOADED on its own.
   */
  maxCallsPerMessage: number
  /**
   * WebSocket connections at /trpc opened without a token (`?connectionParams=1`) and not
   * identified yet: on this instance, and from one client address; beyond either such an upgrade
   * gets 503 OVERLOADED. With identity off, not applied.
   */
  maxUnidentified: number
  maxUnidentifiedPerAddress: number
  /** How long a shutdown waits for clients to acknowledge 1001 before dropping them. */
  closeGraceMs: number
}

export const DEFAULT_SETTINGS: Readonly<TrpcFaceSettings> = Object.freeze({
  maxInFlight: 64,
  maxSubscriptions: 32,
  maxConnections: 100_000,
  authTimeoutMs: 10_000,
  pingMs: 30_000,
  maxBufferedBytes: WEBSOCKET_DEFAULTS.maxBufferedBytes,
  maxCallsPerMessage: 1000,
  maxUnidentified: UNIDENTIFIED_DEFAULTS.max,
  maxUnidentifiedPerAddress: UNIDENTIFIED_DEFAULTS.perAddress,
  closeGraceMs: WEBSOCKET_DEFAULTS.closeGraceMs
})

/** 4401: the token is missing, refused or expired (the /ws face uses the same code). */
const CLOSE_UNAUTHENTICATED = 4401
/** 4400: a message the protocol does not define (graphql-transport-ws closes so on /graphql). */
const CLOSE_BAD_MESSAGE = 4400

/**
 * How long a socket whose connectionParams were refused stays open before its close (4401, or
 * 1013 beyond the tenant's share), so that the calls its client sent behind them get that error
 * too, as the README says: wsLink sends its queued calls right after the connectionParams, often
 * in a read of their own, which came after a close made at the next turn of the event loop and
 * went unanswered (the client saw "Unknown error", no code). tRPC answers each with the
 * context's error; the time bounds what the client may send meanwhile.
 */
const REFUSED_PARAMS_LINGER_MS = 200

/**
 * Closes a socket whose context was refused, with its code and reason, once the calls sent behind
 * its connectionParams have been answered (REFUSED_PARAMS_LINGER_MS). tRPC closes it itself at the
 * next turn, without a code (1005, which wsLink takes for a network drop and reconnects after
 * with the same token): that close, the only one made without a code, is held back for ours.
 * Hand-written: neither tRPC nor ws has an option for it.
 */
function closeAfterCallsSent (socket: WebSocket, code: number, reason: string): void {
  const close = socket.close.bind(socket)
  socket.close = ((closeCode?: number, closeReason?: string | Buffer) => {
    if (closeCode !== undefined) close(closeCode, closeReason)
  }) as WebSocket['close']
  setTimeout(() => { close(code, reason) }, REFUSED_PARAMS_LINGER_MS).unref()
}

/** Why a connectionParams message tRPC could not read (PARSE_ERROR) closes its socket: never its text. */
function unreadableParams (error: TRPCError): string {
  return error.cause instanceof SyntaxError
    ? 'The connectionParams message is not JSON'
    : 'The connectionParams message must be {"method":"connectionParams","data":{<name>:<string>}}'
}

/**
 * A query's or mutation's `params.lastEventId`, dropped: @trpc/server's WebSocket adapter put it
 * into every call's input (`{ ...input, lastEventId }`, or `{ lastEventId }` for none), where over
 * HTTP it puts a `Last-Event-ID` into a subscription's alone. The same call then differed by face:
 * an input schema without `additionalProperties: false` sent the Kernel a `lastEventId` its
 * client never put in the input, one with it refused the call VALIDATION_FAILED. A
 * subscription's is kept, and refused there as any input is (tRPC's `lastEventId`, README).
 */
function dropLastEventId (call: unknown): void {
  if (call === null || typeof call !== 'object' || (call as { method?: unknown }).method === 'subscription') return
  const params = (call as { params?: unknown }).params
  if (params !== null && typeof params === 'object' && Object.hasOwn(params, 'lastEventId')) delete (params as { lastEventId?: unknown }).lastEventId
}

/**
 * A subscription's message as tRPC's JSON encoder writes it, an event's payload spliced in as the
 * bus serialized it (eventJsonOf), not stringified again for each subscriber: a 1 MB event to
 * 1,000 subscribers of a tenant was 1,000 encodings of 1 MB on the event loop (/ws pays one).
 * Any other message (an answer, an error, a payload the bus did not deliver) is encoded whole.
 */
function encodeMessage (message: unknown): string {
  const result = (message as { result?: unknown } | null)?.result
  const json = result !== null && typeof result === 'object' ? eventJsonOf((result as { data?: unknown }).data) : undefined
  if (json === undefined) return jsonEncoder.encode(message) as string
  const { result: _result, ...outer } = message as Record<string, unknown>
  const { data: _data, ...inner } = result as Record<string, unknown>
  const head = JSON.stringify(outer)
  const body = JSON.stringify(inner)
  return head.slice(0, -1) + (head === '{}' ? '' : ',') + '"result":' + body.slice(0, -1) + (body === '{}' ? '' : ',') + '"data":' + json + '}}'
}

/**
 * Refuses a subscription whose id is longer than MAX_ID_LENGTH: @trpc/server holds its id while it
 * lasts and writes it into each of its messages (`started`, every event, `stopped`). Of any length
 * up to the frame limit, 32 subscriptions (a connection's bound) under 60 KB ids made each event of
 * the tenant some 2 MB of messages to encode and write to that one connection. Bounded as /ws
 * bounds its frame ids and /graphql its subscribe ids. Thrown from the decoder, the message is
 * refused whole, as one tRPC cannot parse is (id null, VALIDATION_FAILED); never echoed.
 */
function checkSubscriptionId (call: unknown): void {
  if (call === null || typeof call !== 'object' || (call as { method?: unknown }).method !== 'subscription') return
  const id = (call as { id?: unknown }).id
  if (typeof id === 'string' && id.length > MAX_ID_LENGTH) throw new Error(`A subscription's id holds at most ${MAX_ID_LENGTH} characters`)
}

/** One call of a message as the face reads it: its subscription id bounded, its lastEventId dropped. */
function readCall (call: unknown): void {
  checkSubscriptionId(call)
  dropLastEventId(call)
}

/** tRPC's JSON encoder, each call of a message read as over HTTP (dropLastEventId), its subscription ids bounded (checkSubscriptionId), an event's payload encoded once (encodeMessage). */
const wsEncoder: Encoder = {
  encode: encodeMessage,
  decode: (data) => {
    const message = jsonEncoder.decode(data)
    if (Array.isArray(message)) for (const call of message) readCall(call)
    else readCall(message)
    return message
  }
}

interface Wildcard { '*'?: string }

const JSON_TYPE = Object.freeze({ 'content-type': 'application/json' })
const OCTET = '(?:25[0-5]|2[0-4]\\d|1\\d\\d|[1-9]?\\d)'
/**
 * The Hosts taken without parsing: a name whose last label is not a number (a URL reads such a
 * host as an IPv4 address: `a.1`, `a.0x12` are none), or a dotted IPv4 address, and a port of
 * at most 5 digits (checked against 65535). Every other Host is parsed as tRPC parses it
 * (urlHost). The character class alone took `example.com:99999`, `1.2.3.4.5` or `a[b`, which
 * tRPC's WebSocket adapter then threw on once the socket was open (logged at error, 1006).
 */
// The last label's letter is found by a lookahead: `[0-9a-z]*[a-z][0-9a-z]*` backtracked in
// O(n^2) on a long label that then failed (a 16 KB Host held the event loop 314 ms, before any
// token was checked).
const HOST = new RegExp(`^(?:(?:[A-Za-z0-9_-]+\\.)*(?!0[xX][0-9A-Fa-f]*\\.?(?::|$))(?=[0-9]*[A-Za-z_-])[A-Za-z0-9_-]+\\.?|(?:${OCTET}\\.){3}${OCTET})(?::(\\d{1,5}))?$`)

const PUNYCODE = /(?:^|\.)xn--/i

/** Whether a Host is one HOST takes: a URL can be made of it as it is. */
function plainHost (host: string): boolean {
  // A label in Punycode (xn--) is a URL's only if it decodes: parsed (urlHost), as tRPC does.
  if (PUNYCODE.test(host)) return false
  const m = HOST.exec(host)
  return m !== null && (m[1] === undefined || Number(m[1]) <= 65535)
}

/** Whether a Host that HOST does not take is still one a URL may have (an IDN), without credentials. */
function urlHost (host: string): boolean {
  const url = plainUrl(`http://${host}`)
  return url !== null && url.host !== '' && url.pathname === '/' && url.search === '' && url.hash === ''
}

/** `text` as a URL, or null when it is none or carries credentials (which a fetch Request refuses). */
function plainUrl (text: string): URL | null {
  try {
    const url = new URL(text)
    return url.username === '' && url.password === '' ? url : null
  } catch {
    return null
  }
}

/**
 * Refuses (400 BAD_REQUEST) a request of which tRPC could make no URL, or one with credentials:
 * it makes its URL of the Host and the request target (one in absolute form takes the Host's
 * place). Over HTTP one it cannot (`a@b`, credentials) threw a TypeError, a 500 logged with the
 * URL, query string (input, access_token) and all; a WebSocket upgrade with such a Host was
 * accepted, and one with no URL at all (`a b`) then thrown on, logged at error and dropped (1006).
 * Both routes at /trpc call it: HTTP calls and WebSocket upgrades are refused alike.
 */
function refuseUnusableUrl (request: FastifyRequest): void {
  const host = request.headers.host
  if (host !== undefined && !plainHost(host) && !urlHost(host)) throw new MantleError('BAD_REQUEST', 'The Host header is not a host name')
  const target = request.raw.url ?? '/'
  if (!target.startsWith('/') && !plainUrl(target)) throw new MantleError('BAD_REQUEST', 'The request target is not a URL without credentials')
}

/**
 * Refuses an HTTP call whose `input` tRPC would not read as sent: a GET or HEAD whose query string
 * names it more than once (tRPC reads the first, URLSearchParams.get, and the other went unseen,
 * where REST refuses a repeated scalar field and GraphQL a repeated `query` or `variables`), and a
 * POST whose query string names it at all (its input is its body: the mutation ran without the
 * one in its URL, where REST refuses a POST whose query string names a field of its input).
 * Before the handler has the request, as a bad Host is: the route's onError hook records it.
 */
function refuseMisplacedInput (request: FastifyRequest): void {
  const input = (request.query as Record<string, unknown>).input
  if (input === undefined) return
  if (request.method === 'POST') throw new MantleError('VALIDATION_FAILED', 'A POST takes its input from its body, not the query string: send it as the JSON body')
  if (Array.isArray(input)) throw new MantleError('VALIDATION_FAILED', 'The query string names `input` more than once: send one')
}

/** The procedure path as tRPC splits it at commas: it decodes the path once more than Fastify (`%252C` is a comma to it). */
function trpcPath (request: FastifyRequest): string {
  const path = (request.params as Wildcard)['*'] ?? ''
  try {
    return decodeURIComponent(path)
  } catch {
    return path
  }
}

/** A key of a batch's input that names one of its `calls`: an index as tRPC reads it (inputs[0], inputs[1], ...). */
const callIndex = (key: string, calls: number): boolean => /^(?:0|[1-9][0-9]{0,8})$/.test(key) && Number(key) < calls

/**
 * Refuses a batch (`?batch=1`) whose input names a key that is no index of its calls (`"2"` in a
 * batch of two, `"00"`, `"x"`): tRPC reads inputs[0], inputs[1], ... and dropped any other key
 * unread, the call it was meant for run without it, where the REST batch refuses a key it does
 * not take. A call with no key is still a call without input (httpBatchLink leaves an undefined
 * input out). An input that is not JSON, or no object, is tRPC's to refuse. Before the handler
 * has the request: the route's onError hook records it. Cost: the batch's input parsed once more
 * (tRPC's handler parses it again); nothing for a single call.
 */
function refuseStrayBatchInputs (request: FastifyRequest): void {
  const query = request.query as Record<string, unknown>
  const batch = Array.isArray(query.batch) ? query.batch[0] : query.batch
  if (batch !== '1') return
  const text = request.method === 'POST' ? request.body : query.input
  if (typeof text !== 'string' || text === '') return
  let inputs: unknown
  try {
    inputs = JSON.parse(text)
  } catch {
    return
  }
  if (inputs === null || typeof inputs !== 'object' || Array.isArray(inputs)) return
  const calls = trpcPath(request).split(',').length
  for (const key of Object.keys(inputs)) {
    if (!callIndex(key, calls)) throw new MantleError('VALIDATION_FAILED', `The batch's input names no call of it: ${JSON.stringify(key)} (its keys are the calls' indexes, 0 to ${calls - 1})`)
  }
}

/** Whether tRPC waits for a WebSocket's connectionParams (`?connectionParams=1`, the first one as tRPC reads it). */
function awaitsParams (request: FastifyRequest): boolean {
  const value = (request.query as Record<string, unknown> | null | undefined)?.connectionParams
  return (Array.isArray(value) ? value[0] : value) === '1'
}

/**
 * Whether tRPC answers this request as a stream of results (httpBatchStreamLink's jsonl), read
 * as tRPC reads it: `trpc-accept: application/jsonl`, or, without that header, application/jsonl
 * among `Accept`'s types.
 */
export function asksForStream (headers: IncomingHttpHeaders): boolean {
  const trpcAccept = headers['trpc-accept']
  if (trpcAccept !== undefined) return trpcAccept === 'application/jsonl'
  return headers.accept?.split(',').some(type => type.trim() === 'application/jsonl') === true
}

/** tRPC's own refusals of a request it could not make calls of (see `refusedEarly`). */
const EARLY_REFUSALS: ReadonlySet<TRPCError['code']> = new Set(['PARSE_ERROR', 'BAD_REQUEST', 'PAYLOAD_TOO_LARGE', 'UNSUPPORTED_MEDIA_TYPE', 'METHOD_NOT_SUPPORTED'])

/**
 * Problem headers (Retry-After) of the errors in a response, for the HTTP response itself.
 * Of a batch's several refusals, the one that asks the longest wait has the last word (its
 * Retry-After and RateLimit-*): a client that waits less is refused again.
 * Every answer but a streamed one (jsonl, SSE) is JSON, and says so: tRPC sets no content type
 * on an error it answers for the whole request (one it could not read, a stream request that is
 * no batch), which went out as text/plain.
 */
function responseHeaders (info: TRPCRequestInfo | undefined, errors: readonly TRPCError[], ctx: TrpcContext | undefined, eager: boolean): { headers?: Record<string, string> } {
  // tRPC answers the calls' one status, else 207: a 401 only when every call was refused so.
  const unauthorized = errors.length === (info?.calls.length ?? errors.length) && errors.every(e => e instanceof ProblemError && e.problem.status === 401)
  // A response of one call, a batch of one included (httpBatchLink sends a lone call so), has
  // its HTTP headers to itself, as REST's: Idempotent-Replayed speaks for it.
  const oneCall = info === undefined || info.calls.length === 1
  const refused = refusalHeaders(errors.map(error => error instanceof ProblemError ? error.headers : null), oneCall, unauthorized)
  // An SSE subscription refused before its stream began (a 200, its error the one event): the
  // refusal's Retry-After and RateLimit-* on the response, as on every other refusal.
  const subscription = eager && ctx?.refused != null ? refusalHeaders([ctx.refused], true, false) : null
  // A call alone in its request: its RateLimit-* and Idempotent-Replayed, under a refusal's own, as
  // REST's answer carries them (httpBatchLink sends a lone call as a batch of one, which answered
  // the HTTP guard's RateLimit-*, or none, while the operation's limit had counted the call).
  const own = oneCall && !eager ? ctx?.headers : null
  let headers: Record<string, string> | undefined = eager ? subscription ?? refused ?? undefined : { ...JSON_TYPE, ...own, ...refused }
  // The cache's outcome of each call, in the calls' order, `-` for a call without one. Not on a
  // streamed answer, whose headers leave before its results are known.
  const cache = ctx?.cache
  if (cache !== undefined && cache !== null && info !== undefined && !eager) {
    headers = { ...headers, 'x-cache': info.calls.map((_, i) => cache[i] ?? '-').join(', ') }
  }
  return headers === undefined ? {} : { headers }
}

/**
 * The tRPC face (CONTRACT §3): `/trpc/<op>` over the standard tRPC HTTP protocol (no data
 * transformer, `?batch=1` batching), events as subscriptions over SSE and over WebSocket at
 * `/trpc`. Built on @trpc/server's Fastify request handler and WebSocket connection handler;
 * the routes are our own so that a batch path longer than the router's parameter limit still
 * routes, and so that refusals made before tRPC runs come out as tRPC errors too.
 */
export function createTrpcFace (settings: Partial<TrpcFaceSettings> = {}) {
  return async function trpcFace (app: FastifyInstance, opts: FaceOptions): Promise<void> {
    // Node 20's TextEncoderStream, which @trpc/server streams batches through, is slow (utf8-stream.ts).
    encodeStreamsFast()
    const limits = { ...DEFAULT_SETTINGS, ...settings }
    // An SSE client gets a ping interval to read its stream's end once its token has expired, and
    // holds at most maxBufferedBytes unread, as a WebSocket's client does.
    // What clients leave unread, all faces in one count (app.ts's), each tenant a share of it: SSE
    // responses' too.
    const unread = opts.unread ?? defaultUnreadBytes(opts.maxConnectionsPerTenant !== undefined)
    const sseCuts = slowReaderCuts(app, 'trpc_sse')
    const live = new LiveSubscriptions(app.events.bus, limits.pingMs, limits.maxBufferedBytes, sseCuts === null ? undefined : () => sseCuts.inc(), unread)
    // Each subscription a WebSocket starts is a request of its connection's tenant to the HTTP
    // guard (its address's with identity off), known once createContext has its identity.
    const guard = messageGuardOf(app)
    const guarded = new WeakMap<WebSocket, { caller: Identity, address: string }>()
    const guardSocket = guard === null
      ? null
      : (socket: WebSocket) => {
          const counted = guarded.get(socket)
          return counted === undefined ? null : guard(counted.caller, counted.address)
        }
    const router = buildRouter(app, live, { maxInFlight: limits.maxInFlight, maxSubscriptions: limits.maxSubscriptions, maxBufferedBytes: limits.maxBufferedBytes, ssePingMs: limits.pingMs }, guardSocket)

    // tRPC parses the JSON body itself (a malformed one is its error); Fastify still reads it,
    // so BFF_BODY_LIMIT applies, and it is refused as on every face when it is not UTF-8. This
    // scope only: other faces keep the gateway's parser.
    app.removeContentTypeParser('application/json')
    app.addContentTypeParser('application/json', { parseAs: 'buffer' }, (request, body, done) => {
      const text = jsonText(request.headers['content-type'], body as Buffer)
      if (typeof text === 'string') done(null, text)
      else done(text, undefined)
    })

    // Refusals before tRPC runs (body too large, not JSON, batch too long, bad Host) are
    // tRPC-shaped too, so tRPC clients read them like any other error.
    app.setErrorHandler((err: Error, request: FastifyRequest, reply: FastifyReply) => {
      const error = err instanceof TRPCError ? err : ProblemError.from(err, request.id)
      const shape = errorShape(error, request.id)
      if (shape.data.code === 'INTERNAL') request.log.error({ err }, 'unexpected error')
      if (error instanceof ProblemError && error.headers !== null) reply.headers(error.headers)
      request.server.errorAnswered(shape.data.code, shape.data.httpStatus)
      reply.code(shape.data.httpStatus).type('application/json').send(JSON.stringify({ error: shape }))
    })

    // Requests tRPC refused itself before any call ran (input not JSON, a batch of the wrong
    // shape, a mutation over GET: 405): no pipeline call recorded them, and
    // each gets one audit entry, as a REST body Fastify refuses does, and as GraphQL's mutation
    // over GET does (the 405 was left out, though it names an operation). Not an unknown
    // procedure (tRPC says so first): REST leaves no entry for a route that does not exist
    // either, so that a scanner cannot flood the trail.
    const refusedEarly = app.hasDecorator('audit') ? new WeakMap<FastifyRequest, TRPCError>() : null
    const reached = app.hasDecorator('audit') ? app.audit.reached : null
    // The first error of a request that tRPC made itself, not a call's (an input or body not
    // JSON, a mutation over GET, a procedure that does not exist): no call ran for it, so no
    // call metric saw it, and it is counted in mantle_http_errors_total as REST's and GraphQL's
    // refusals are. Before, these were counted nowhere: a flood of them showed in no metric.
    const ownErrors = new WeakMap<FastifyRequest, TRPCError>()
    // The error of a call alone in its request that tRPC's handler answered (HEAD, a stream asked
    // for): the request's answer, counted as answerSingle's are. A batch's are its calls'.
    const singleErrors = new WeakMap<FastifyRequest, TRPCError>()
    const onError = ({ error, ctx, req }: { error: TRPCError, ctx?: TrpcContext | undefined, req: FastifyRequest }): void => {
      if (ctx === undefined) earlyRequestIds.set(error, req.id)
      if (!(error instanceof ProblemError) && !(error.cause instanceof MantleError) && !ownErrors.has(req)) ownErrors.set(req, error)
      if (refusedEarly !== null && EARLY_REFUSALS.has(error.code) && !(error instanceof ProblemError) && !(error.cause instanceof MantleError) && !refusedEarly.has(req)) refusedEarly.set(req, error)
      if (isInternal(error)) req.log.error({ err: error.cause ?? error }, 'unexpected error')
    }

    // One tRPC call per procedure name in the path: a batch longer than BFF_BATCH_MAX_CALLS is
    // refused whole, before its body is read and before any call runs.
    const boundBatch = (request: FastifyRequest, _reply: FastifyReply, done: (err?: Error) => void): void => {
      // Counted in the path as tRPC reads it: it decodes the path once more before splitting it
      // at commas, so `%252C` (a comma to tRPC) had gone through uncounted.
      const path = trpcPath(request)
      let calls = 1
      for (let i = path.indexOf(','); i !== -1 && calls <= opts.maxCalls; i = path.indexOf(',', i + 1)) calls++
      if (calls > opts.maxCalls) done(new MantleError('PAYLOAD_TOO_LARGE', `A batch carries at most ${opts.maxCalls} calls`))
      else done()
    }

    // Optimization: a single call (no batch, no stream, no subscription), the common case, is
    // answered here in tRPC's documented wire format, through the same runCall and the same
    // error shape as the router. @trpc/server 11 builds a fetch Request, AbortSignals, web
    // streams and a Response for every call: 3x the CPU of a REST call on this machine. Anything
    // else, including every malformed request, goes to tRPC's own handler below.
    const operations = app.pipeline.manifest.byName
    // A procedure is an operation or an event (a subscription): a refusal names either (a reload
    // changes no event).
    const events = new Set(app.pipeline.manifest.events.map(e => e.name))
    // A streamed batch goes out uncompressed: gzip and brotli hold their output until the stream
    // ends, and httpBatchStreamLink must get each result as it completes. @fastify/compress skips
    // a request that carries `x-no-compression` (tRPC's SSE is text/event-stream, never compressed).
    const compressing = app.hasReplyDecorator('compress')
    const singleCall = (request: FastifyRequest, path: string): { input: unknown } | null => {
      const op = operations.get(path)
      if (op === undefined) return null
      const query = request.query as Record<string, unknown>
      const headers = request.headers
      if (query.batch !== undefined || query.connectionParams !== undefined || headers['trpc-accept'] !== undefined) return null
      // Without a Host, tRPC makes its own URL: let it.
      if (headers.host === undefined) return null
      let text: unknown
      if ((request.method === 'GET' || request.method === 'HEAD') && op.type === 'query') text = query.input
      // A query over POST too (tRPC's methodOverride: 'POST', answerByTrpc's allowMethodOverride):
      // its input is the body, and it runs as over GET, the same pipeline call.
      else if (request.method === 'POST' && headers['content-type']?.startsWith('application/json') === true) text = request.body
      else return null
      if (text === undefined || text === '') return { input: undefined }
      if (typeof text !== 'string') return null
      try {
        return { input: JSON.parse(text) }
      } catch {
        return null
      }
    }
    const answerSingle = async (request: FastifyRequest, reply: FastifyReply, path: string, input: unknown): Promise<FastifyReply> => {
      const result = await runCall(app, {
        requestId: request.id,
        reqId: request.id,
        protocol: 'trpc',
        op: path,
        input,
        authorization: httpAuthorization(request, null),
        traceparent: single(request.headers.traceparent),
        tracestate: single(request.headers.tracestate),
        idempotencyKey: idempotencyKeyOf(request),
        clientRequestId: clientRequestId(request.raw),
        caller: reply.raw
      })
      reply.type('application/json')
      if (result.ok && result.headers !== null) reply.headers(result.headers)
      if (result.ok) return await reply.send('{"result":{"data":' + result.json + '}}')
      const shape = errorShape(ProblemError.of(result.problem, result.headers), request.id, path)
      // What the stages set before the call failed (its operation's RateLimit-*: the call used part
      // of the limit), then the refusal's own, as REST's answer carries them.
      if (result.callHeaders != null) reply.headers(result.callHeaders)
      if (result.headers !== null) reply.headers(result.headers)
      // The request's answer is the call's error, its status too: counted as REST's call errors
      // are (a query over GET with an expired token was a 401 counted nowhere, the same over POST was).
      request.server.errorAnswered(shape.data.code, shape.data.httpStatus)
      return await reply.code(shape.data.httpStatus).send(JSON.stringify({ error: shape }))
    }

    // @trpc/server's fastifyRequestHandler, but for HEAD, which it answers 204 whatever the
    // request (resolveResponse's first line): a HEAD goes to tRPC as its GET, and is answered as
    // its GET is, status and header fields (RFC 9110 §9.3.2), as REST and GraphQL answer HEAD;
    // Node sends no body for a HEAD. An SSE subscription's body never ends, and is cancelled:
    // the subscription ends before its first event (it is counted from its first pull).
    const answerByTrpc = async (request: FastifyRequest, reply: FastifyReply, path: string): Promise<void> => {
      const incoming = request.raw as IncomingMessage & { body?: unknown }
      if ('body' in request) incoming.body = request.body
      const fetchRequest = incomingMessageToRequest(incoming, reply.raw, { maxBodySize: opts.bodyLimit })
      const head = request.method === 'HEAD'
      const response = await resolveResponse({
        router,
        req: head ? new Request(fetchRequest, { method: 'GET' }) : fetchRequest,
        path,
        error: null,
        // A query over POST as well as GET: tRPC's remedy for an input too long for a URL
        // (methodOverride: 'POST' on httpLink and httpBatchLink). Before, it was refused 405.
        allowMethodOverride: true,
        createContext: async ({ info }) => httpContext(request, reply.raw, info.connectionParams, info.isBatchCall, info.calls.length),
        onError: (o) => { onError({ ...o, req: request }) },
        responseMeta: ({ info, errors, ctx, eagerGeneration }) => {
          // A call alone in its request (not a batch) that failed: its error is the answer's (answerSingle).
          if (info?.isBatchCall === false && errors.length > 0 && !singleErrors.has(request)) singleErrors.set(request, errors[0])
          return responseHeaders(info, errors, ctx, eagerGeneration)
        }
      })
      if (head && response.headers.get('content-type')?.startsWith('text/event-stream') === true) {
        await response.body?.cancel()
        await reply.send(new Response(null, { status: response.status, headers: response.headers }))
        return
      }
      // An answer of JSON (a batch not streamed, an error of the whole request) is held whole
      // by tRPC's Response anyway: sent as its text, so that onSend sees how long it is, and what
      // a client leaves of it unread counts against its tenant (answerBounds). Sent as the
      // Response, it was a stream to onSend, counted as nothing: batches of large answers left
      // unread were bounded by nothing, as REST's batches were before 159c315. A streamed answer
      // (jsonl, which tRPC sends chunked, and SSE) goes out as it is made: answerBounds counts
      // a jsonl batch's chunks as they are made (countedStream).
      if (response.headers.get('content-type') === JSON_TYPE['content-type'] && !response.headers.has('transfer-encoding') && response.body !== null) {
        reply.code(response.status)
        for (const [name, value] of response.headers) reply.header(name, value)
        await reply.send(await response.text())
        return
      }
      await reply.send(response)
    }

    app.route({
      // HEAD is ours, answered as GET (answerByTrpc): Fastify's automatic HEAD route cannot
      // send a Response.
      method: ['GET', 'HEAD', 'POST'],
      url: TRPC_CALLS,
      exposeHeadRoute: false,
      bodyLimit: opts.bodyLimit,
      schema: { hide: true },
      // Every procedure needs a token: none, or a refused one, is a 401 before a body is read.
      config: { identity: 'required' },
      onRequest: boundBatch,
      handler: async (request, reply) => {
        const path = (request.params as Wildcard)['*'] ?? ''
        refuseUnusableUrl(request)
        refuseMisplacedInput(request)
        refuseStrayBatchInputs(request)
        // From here on tRPC answers: its calls' refusals are the audit stage's, its own refusedEarly's.
        reached?.(request)
        const call = singleCall(request, path)
        if (call !== null) return await answerSingle(request, reply, path, call.input)
        if (compressing && asksForStream(request.headers)) request.raw.headers['x-no-compression'] = 'jsonl'
        await answerByTrpc(request, reply, path)
        const answered = ownErrors.get(request) ?? singleErrors.get(request)
        if (answered !== undefined) {
          const { code, httpStatus } = errorShape(answered, request.id).data
          request.server.errorAnswered(code, httpStatus)
        }
        const refused = refusedEarly?.get(request)
        if (refused !== undefined) {
          // The refusal's own status, as its error says: a streamed batch's response is a 200
          // whose results carry the errors (its headers left first), and was recorded so, a
          // VALIDATION_FAILED with status 200.
          const { code, httpStatus } = errorShape(refused, request.id).data
          app.audit.refused(request, reply, operations.has(path) || events.has(path) ? path : 'trpc', code, httpStatus)
        }
        return reply
      }
    })

    const notHere = async (): Promise<never> => {
      throw new MantleError('NOT_FOUND', 'Call a procedure at /trpc/<name>, or open a WebSocket at /trpc')
    }

    // WebSocket at /trpc on the @fastify/websocket server app.ts registers for every face.
    if (!app.hasDecorator('websocketServer')) {
      app.get('/trpc', { schema: { hide: true } }, notHere)
    } else {
      const slots = new ConnectionSlots('trpc', limits.maxConnections, opts.maxConnectionsPerTenant, { max: limits.maxUnidentified, perAddress: limits.maxUnidentifiedPerAddress })
      const cuts = slowReaderCuts(app, 'trpc')
      reportSlots(app, slots)
      const authenticated = new WeakSet<WebSocket>()
      // The credentials each upgrade carried (its header or ?access_token=), read by its check,
      // and its client address (the guard's key with identity off; '' without a guard).
      const upgrades = new WeakMap<IncomingMessage, { authorization: string | undefined, address: string }>()
      // Sockets whose connectionParams (?connectionParams=1) tRPC has not taken yet: until then
      // an error without a context is tRPC's refusal of that first message.
      const awaiting = new WeakMap<IncomingMessage, WebSocket>()
      const decide = decisions(app)
      // Tenant and user of a connection's token, for an entry of its own (null: public / anonymous).
      const tokenOwner = (authorization: string | undefined): { tenant: string, user: string } | null => {
        try {
          const { tenant, user } = app.identify(authorization)
          return { tenant, user }
        } catch {
          return null
        }
      }
      // Each connection's context, once tRPC made it: whose token a message it refuses spoke with.
      const contexts = new WeakMap<WebSocket, TrpcContext>()
      // Each identified connection's context by its upgrade, for onError: tRPC hands onError its
      // context only once createContext's promise settles, a microtask after the connectionParams
      // message, and messages read with that one (a duplicate id, a batch of too many calls) were
      // refused with none, their refusal unrecorded.
      const identified = new WeakMap<IncomingMessage, TrpcContext>()
      // The open sockets, which this face closes itself at shutdown (below); bounded by the
      // connection slots.
      const sockets = new Set<WebSocket>()
      const auditing = app.hasDecorator('audit')
      // A message tRPC cannot parse (not JSON, a call without an id, a batch one element of which
      // is malformed) is refused whole, its calls unrun (VALIDATION_FAILED, id null); a call whose
      // id is null is refused alone. One that
      // names a procedure of the manifest (an operation or an event) is recorded, once, as an
      // HTTP request of procedures tRPC refuses before running any is: security, the procedure as
      // action (`trpc` for a batch), under the connection's token's tenant and user, with the
      // request id the error carries. Before, it left no entry, while a /ws frame refused for its
      // form that names an op is recorded. One that names none is the protocol's, unrecorded, as
      // such a /ws frame is. Read again here only when refused; never its input.
      const recordUnparsed = (socket: WebSocket, data: unknown, requestId: string, idless: boolean): void => {
        const ctx = contexts.get(socket)
        if (ctx === undefined) return
        let message: unknown
        try {
          message = JSON.parse(String(data))
        } catch {
          return
        }
        const named = (m: unknown): string | null => {
          const params = m !== null && typeof m === 'object' ? (m as { params?: unknown }).params : undefined
          const path = params !== null && typeof params === 'object' ? (params as { path?: unknown }).path : undefined
          return typeof path === 'string' && (operations.has(path) || events.has(path)) ? path : null
        }
        // Of a message whose calls parse, only those whose id is null were refused (idless).
        const refused = (m: unknown): boolean => !idless || (m !== null && typeof m === 'object' && (m as { id?: unknown }).id === null)
        const action = Array.isArray(message) ? (message.some(m => refused(m) && named(m) !== null) ? 'trpc' : null) : refused(message) ? named(message) : null
        if (action === null) return
        try {
          decide({ requestId, protocol: 'trpc', path: action === 'trpc' ? '/trpc' : '/trpc/' + action, action, category: 'security', caller: tokenOwner(ctx.authorization), clientRequestId: false }, () => { throw new MantleError('VALIDATION_FAILED', 'The message could not be parsed') })
        } catch {
          // The refusal rethrown, or the trail's OVERLOADED when it cannot record.
        }
      }
      // Records a refusal tRPC made itself of a connection's message, once, under the connection's
      // token's tenant and user, with the request id its error carries (set here: tRPC formats it
      // after): `action` the procedure's name, or `trpc` for the message; `answered`: the error
      // the client gets in its place (wrongMethod), its code and status.
      const recordRefusal = (error: TRPCError, ctx: TrpcContext, action: string, category: 'read' | 'security', answered = error): void => {
        const requestId = uuidv7()
        earlyRequestIds.set(error, requestId)
        const { code, httpStatus } = errorShape(answered, requestId).data
        try {
          decide({ requestId, protocol: 'trpc', path: action === 'trpc' ? '/trpc' : '/trpc/' + action, action, category, caller: tokenOwner(ctx.authorization), clientRequestId: false }, () => { throw new MantleError(code as ErrorCode, answered.message, { status: httpStatus }) })
        } catch {
          // The refusal rethrown, or the trail's OVERLOADED when it cannot record.
        }
      }
      const onConnection = getWSConnectionHandler({
        router,
        wss: app.websocketServer,
        // Not BFF_BATCH_MAX_CALLS: wsLink sends every call started in one tick in one message,
        // and has no option to cap it, so a page that started more than 50 queries at once had
        // them all refused. Past the in-flight bound each call is refused OVERLOADED on its own
        // (the router's resolve), yet through the pipeline (its audit entry), some 0.1-0.3 ms
        // each, all in one turn of the event loop: bounded by the frame limit alone
        // (BFF_BODY_LIMIT, 17,000 calls in 1 MiB), one message held the loop for seconds. At
        // 1000 calls, no client's tick, a message holds it about as long as one read of /ws
        // call frames does.
        maxBatchSize: limits.maxCallsPerMessage,
        experimental_encoder: wsEncoder,
        keepAlive: { enabled: true, pingMs: limits.pingMs, pongWaitMs: Math.min(limits.pingMs, 10_000) },
        // Once per connection, when it opens or when its connectionParams arrive. A connection
        // without a valid token gets the error, then is closed with 4401; a valid one is closed
        // with 4401 when its token expires or its JWKS key is withdrawn, and wsLink reconnects
        // with a fresh token.
        createContext: ({ req, res: socket, info }) => {
          awaiting.delete(req)
          const upgrade = upgrades.get(req)
          const ctx = socketContext(socket, upgrade?.authorization, info.connectionParams, upgradeTrace(req.headers))
          contexts.set(socket, ctx)
          let identity: Identity
          try {
            identity = app.identify(ctx.authorization)
            // The tenant's share, counted here for a connection identified by its
            // connectionParams (one identified by its upgrade was counted then: nothing changes).
            slots.claim(req.socket, identity.tenant)
          } catch (err) {
            // tRPC sends the error (after this throw, before any timer fires), then closes the
            // socket without a code, a 1005 that wsLink takes for a network drop and answers by
            // reconnecting with the same token. Closed first with 4401, the client sees why; beyond
            // the tenant's share with 1013 (try again later), as a socket too far behind is.
            const overloaded = err instanceof MantleError && err.code === 'OVERLOADED'
            const [code, reason] = overloaded
              ? [CLOSE_TRY_AGAIN_LATER, err.message]
              : [CLOSE_UNAUTHENTICATED, 'The token is missing or was refused']
            closeAfterCallsSent(socket, code, reason)
            const requestId = uuidv7()
            // Recorded as the upgrade's own 401 is (`trpc` at /trpc, public / anonymous): the same
            // credentials refused, brought later. Before, a forged or expired token in
            // connectionParams (and the calls sent behind it, answered with its error) left no
            // entry. Not a refusal for load (the tenant's share), as an upgrade's is not.
            if (!overloaded) {
              try {
                decide({ requestId, protocol: 'trpc', path: '/trpc', action: 'trpc', category: 'auth', caller: null, clientRequestId: false }, () => { throw err })
              } catch {
                // The refusal rethrown, or the trail's OVERLOADED when it cannot record: the
                // connection is refused for its token either way.
              }
            }
            throw ProblemError.from(err, requestId)
          }
          authenticated.add(socket)
          identified.set(req, ctx)
          if (guard !== null) guarded.set(socket, { caller: identity, address: upgrade?.address ?? 'unknown' })
          // 4401 too when the JWKS withdraws (or replaces) the key the token was verified with.
          const disarm = untilIdentityEnds(identity, why => socket.close(CLOSE_UNAUTHENTICATED, IDENTITY_ENDED[why]))
          socket.once('close', disarm)
          return ctx
        },
        onError: ({ error, ctx: settled, req, path, type }) => {
          // The connection's context, settled or not (identified); undefined before its token is accepted.
          const ctx = settled ?? identified.get(req)
          // A message of more calls than maxCallsPerMessage is refused whole (413 each), as an HTTP
          // batch of more than BFF_BATCH_MAX_CALLS is, which is recorded (`trpc`, security): so is
          // this one, once, with the request id its errors carry (set here: tRPC formats them
          // after). Before, it left no entry. Never its calls' input.
          if (ctx !== undefined && path === undefined && error.message === BATCH_TOO_LONG) recordRefusal(error, ctx, 'trpc', 'security')
          // A subscription sent with the id of one its connection runs is refused by tRPC before
          // any procedure runs (BAD_REQUEST, `Duplicate id 1`): recorded as the event's refused
          // subscription, as one refused for its input is. Before, it left no entry (issue 6). One
          // naming an operation is refused so before its method is looked at: recorded as the
          // misdirected call it is (security), as with an id not in use (below). One naming no
          // procedure is not, as its 404 is not.
          if (ctx !== undefined && type === 'subscription' && path !== undefined && error.message.startsWith(DUPLICATE_ID)) {
            if (events.has(path)) recordRefusal(error, ctx, path, 'read')
            else if (operations.has(path)) recordRefusal(error, ctx, path, 'security')
          }
          // A call whose method is not its procedure's type (`query` of a mutation): answered 405
          // METHOD_NOT_SUPPORTED (wrongMethod) and recorded, security, the procedure as action, as
          // a mutation over GET is over HTTP. Before, answered NOT_FOUND 404 and left out.
          const misdirected = ctx === undefined ? null : wrongMethod(router._def.procedures, error, path, type)
          if (misdirected !== null) recordRefusal(error, ctx!, path!, 'security', misdirected)
          // A connectionParams message that is not JSON, or not an object of strings: tRPC sends
          // its error, then closes without a code (1005, a network drop to wsLink). Closed first
          // with 4400 and why, as /graphql closes on a message its protocol does not define.
          const socket = awaiting.get(req)
          if (socket !== undefined && ctx === undefined && error.code === 'PARSE_ERROR') {
            awaiting.delete(req)
            setImmediate(() => socket.close(CLOSE_BAD_MESSAGE, unreadableParams(error)))
          }
          // A frame ws refused (over BFF_BODY_LIMIT, invalid UTF-8, a bad opcode) is the client's
          // fault, and ws has closed the socket with its code (1009, 1007, 1002): not logged, as
          // on /ws. tRPC hands it on as an INTERNAL_SERVER_ERROR, which was logged at error.
          if (isInternal(error) && !refusedByWs(error.cause)) app.log.error({ err: error.cause ?? error }, 'unexpected error on a tRPC WebSocket')
        }
      })
      app.route({
        method: 'GET',
        url: '/trpc',
        schema: { hide: true },
        // Before the upgrade, as on /ws and /graphql: bad credentials in the header or
        // ?access_token=, or none where connectionParams cannot bring them (tRPC waits for those
        // only with ?connectionParams=1), get a 401 over plain HTTP instead of a socket. Before
        // them, a Host or target tRPC could make no URL of gets the 400 an HTTP call gets.
        onRequest: async (request) => {
          refuseUnusableUrl(request)
          slots.reserve(request)
          if (!request.ws) return
          const authorization = upgradeAuthorization(request)
          // The tenant's share too, counted against the upgrade's token whenever it has one. With
          // ?connectionParams=1 those may name another tenant: the connection moves to it in
          // createContext, as /graphql's moves to its connection_init's. Counted nowhere until
          // then (neither the tenant's share nor the bound of connections without a token), a
          // tenant past its share opened as many more as the instance allows, each held until its
          // connectionParams wait ran out, and every other tenant's upgrade was refused.
          if (authorization !== undefined || !awaitsParams(request)) slots.claim(request.raw.socket, app.identify(authorization, request.raw).tenant)
          else slots.awaitIdentity(request)
          upgrades.set(request.raw, { authorization, address: guard === null ? '' : clientAddress(request) })
        },
        handler: notHere,
        wsHandler: (socket, request) => {
          // A client that opens with ?connectionParams=1 and never sends them is not kept.
          const timer = setTimeout(() => {
            if (!authenticated.has(socket)) socket.close(CLOSE_UNAUTHENTICATED, 'No token was given in time')
          }, limits.authTimeoutMs)
          timer.unref()
          socket.once('close', () => clearTimeout(timer))
          if (awaitsParams(request)) awaiting.set(request.raw, socket)
          // tRPC sends each answer and event as a string: sent as its UTF-8 bytes, what the
          // client has not read is counted in bytes by the bound the router checks (see
          // utf8Sends), as on /ws and /graphql. What passing the bound does is the router's.
          // Counted in the instance's unread bytes, against the tenant the connection counts
          // against once known (a frame past the tenant's share or the instance's closes it, 1013).
          const tcp = request.raw.socket
          countSlowReaderCuts(socket, cuts)
          utf8Sends(socket, undefined, { unread, tenant: () => slots.ownerOf(tcp) })
          // A message from a client that has left more than the bound unread is not read: the
          // socket closes with 1013, as on /ws and /graphql. The router checks the bound for calls
          // alone, while @trpc/server answers much else itself, whatever the socket holds: a
          // subscription refused (its input, its roles, its bound), a batch past 1000 calls (an
          // error per call), a PING, a message it cannot parse. A client that sent such messages
          // and read nothing made the socket hold their answers without bound (37 MB, growing, for
          // 200 batches of refused subscriptions), up to its tenant's share of the unread bytes.
          const emit = socket.emit
          socket.emit = function (this: WebSocket, event: string | symbol, ...args: unknown[]): boolean {
            if (event !== 'message') return emit.call(this, event, ...args)
            if (slowReader(socket, limits.maxBufferedBytes)) return false
            if (!auditing) return emit.call(this, event, ...args)
            // tRPC parses the message, and refuses it if it cannot, within this call (recordUnparsed).
            unparsed.watching = true
            unparsed.requestId = null
            try {
              return emit.call(this, event, ...args)
            } finally {
              unparsed.watching = false
              const { requestId, idless } = unparsed
              unparsed.requestId = null
              if (requestId !== null) recordUnparsed(socket, args[0], requestId, idless)
            }
          }
          // Runs before the screen above: a connection awaiting its connectionParams may send
          // little until they identify it.
          slots.screen(socket, tcp)
          onConnection(socket, request.raw)
          // Not closed at once by @fastify/websocket's preClose: its calls in flight are answered
          // first (below).
          closedByTheirFace.add(socket)
          sockets.add(socket)
          socket.once('close', () => { sockets.delete(socket) })
        }
      })

      // At shutdown, as HTTP requests in flight are let finish: every socket is told to reconnect
      // (tRPC's notification: wsLink opens a new connection, through the load balancer, and
      // sends its new calls there while the old one answers those it holds), the calls sent from
      // now on are refused OVERLOADED (the router's resolve), and those in flight are let finish
      // and answered, each by its operation's timeoutMs at most, which the shutdown's grace
      // allows (server.ts); then each socket closes with 1001, and one whose client has not
      // completed the close after closeGraceMs is cut. Before, every socket closed at once with
      // 1001 and the answer of a call in flight was lost: wsLink reported "WebSocket closed" for
      // a mutation the Kernel may have carried out.
      app.addHook('preClose', async () => {
        if (sockets.size === 0) return
        const open = [...sockets]
        // Each socket already has ten 'close' listeners of its own (ws, the bounds, the counters,
        // the expiry...): the two the shutdown adds below would warn of a leak that is none.
        for (const socket of open) socket.setMaxListeners(socket.getMaxListeners() + 2)
        for (const socket of open) if (socket.readyState === socket.OPEN) socket.send('{"id":null,"method":"reconnect"}')
        const busy = open.map(socket => contexts.get(socket)).filter(ctx => ctx !== undefined && ctx.inFlight > 0) as TrpcContext[]
        if (busy.length > 0) {
          let timer: NodeJS.Timeout | undefined
          const bound = new Promise<void>(resolve => { timer = setTimeout(resolve, inFlightBoundMs(app.pipeline)) })
          await Promise.race([Promise.all(busy.map(async ctx => { await new Promise<void>(resolve => { ctx.idle = resolve; ctx.socket?.once('close', () => { resolve() }) }) })), bound])
          clearTimeout(timer)
          // The last answers go out once their resolve has returned: tRPC sends them a few
          // promise steps later, all before the next turn of the event loop.
          await new Promise(resolve => setImmediate(resolve))
        }
        let cut: NodeJS.Timeout | undefined
        const grace = new Promise<void>(resolve => { cut = setTimeout(resolve, limits.closeGraceMs) })
        const closed = open.map(async socket => {
          if (socket.readyState === socket.CLOSED) return
          await new Promise<void>(resolve => {
            socket.once('close', () => { resolve() })
            socket.close(1001, 'The gateway is shutting down')
          })
        })
        await Promise.race([Promise.all(closed), grace])
        clearTimeout(cut)
        for (const socket of sockets) socket.terminate()
      })
    }

    // Open SSE responses would hold the shutdown: end every subscription (WebSockets are
    // closed by @fastify/websocket).
    app.addHook('preClose', (done) => {
      live.closeAll()
      done()
    })
  }
}

export default createTrpcFace()
