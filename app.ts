import Fastify, { errorCodes, type FastifyInstance, type FastifyServerOptions, type FastifyError, type FastifyRequest, type FastifyReply, type RouteOptions } from 'fastify'
import { keepRequestId, markClientRequestId, requestIdOf, uuidv7 } from './ids.js'
import { answeredStraight, closeAfterAnswer, framesBody, lingering, lingeringClose } from './lingering.js'
import { STATUS_CODES, type IncomingHttpHeaders, type IncomingMessage, type ServerResponse } from 'node:http'
import { readFileSync } from 'node:fs'
import { randomUUID } from 'node:crypto'
import { Counter, Gauge } from 'prom-client'
import type { SpanExporter } from '@opentelemetry/sdk-trace'
import { type Config, ConfigError, DEV_JWT_SECRET, productionProblems, corsOrigins, listEntries, rateLimitStore, storeFor } from './schemas/config.js'
import type { Socket } from 'node:net'
import type { Duplex } from 'node:stream'
import { ProblemSchema } from './schemas/manifest.js'
import { SETTLE_MS, loadManifestFile, type Manifest } from './manifest.js'
import { toProblem, logLevelOf, detailForLog, MantleError, BodyRefused, type ErrorCode } from './errors.js'
import { addJsonBodyParser } from './json-body.js'
import pipeline, { PROTOCOLS, type Protocol } from './plugins/pipeline/index.js'
import { compiledSchemas, COMPILED_SCHEMAS, COMPILED_SCHEMA_TEXT } from './compiled.js'
import metrics from './plugins/metrics/index.js'
import auth, { ANONYMOUS, parsePublicKeys, parseSecrets } from './plugins/auth/index.js'
import kernel from './plugins/kernel/index.js'
import events, { EVENTS_CHANNEL } from './plugins/events/index.js'
import redis from './plugins/redis/index.js'
import type {} from './plugins/tracing/index.js' // its decorators' types; the plugin is loaded when on
import rateLimit, { opKey, RATE_LIMIT_COMMANDS } from './plugins/rate-limit/index.js'
import { requestLoggerFactory } from './request-logger.js'
import { CallFailedLog } from './call-failed-log.js'
import { trustedProxies } from './address.js'
import { connectionBound, openFilesLimit } from './connection-bound.js'
import firewall from './plugins/firewall/index.js'
import idempotency, { storeKey, tenantIndex, IDEMPOTENCY_COMMANDS } from './plugins/idempotency/index.js'
import cache, { CACHE_COMMANDS, INVALIDATE_CHANNEL, sharedKey, tagKey, tenantBudgetKeys } from './plugins/cache/index.js'
import audit from './plugins/audit/index.js'
import diagz, { diagzRoute } from './plugins/diagz/index.js'
import pressure from './plugins/pressure/index.js'
import compression from './plugins/compression/index.js'
import openapi from './adapters/openapi/index.js'
import rest, { MAX_PATH_PARAM_LENGTH } from './adapters/rest/index.js'
import { overlongOperation } from './overlong-route.js'
import trpc from './adapters/trpc/index.js'
import graphql, { chooseSubprotocol } from './adapters/graphql/index.js'
import websocketFace from './adapters/websocket/index.js'
import type { FaceOptions } from './adapters/face.js'
import { UnreadBytes, answerBounds, defaultUnreadBytes, streamMade } from './adapters/unread.js'
import { requestAuthorization } from './adapters/credentials.js'
import websocket from '@fastify/websocket'
import { FIELDS_OVERFLOW, FIELDS_OVERFLOW_DETAIL, OFFER_BODY_OVERFLOW, servePlainUpgrades, WEBSOCKET_UPGRADE, wholeHead } from './plain-upgrades.js'
import AjvCompiler, { type ValidatorFactory } from '@fastify/ajv-compiler'
import type { SerializerFactory } from '@fastify/fast-json-stringify-compiler'
import helmet from 'helmet'
import cors from '@fastify/cors'
import health from './routes/health.js'
import batch from './routes/batch.js'
import { withHook } from './route-hooks.js'
import { closedByTheirFace, crossSiteUpgrade, refusedByWs } from './adapters/upgrade.js'
import { parseQuery, literalQuery, MALFORMED_QUERY } from './query-string.js'
import { PROBE_PATHS } from './probes.js'
import { RouteMethods } from './allowed-methods.js'

declare module 'fastify' {
  interface FastifyInstance {
    /**
     * Reads BFF_MANIFEST again and applies it without dropping a call (SIGHUP does this in
     * server.ts). A manifest that is invalid, or changes more than policies, is refused and the
     * one in force is kept; the answer says why.
     */
    reloadManifest: () => Promise<{ applied: boolean, reasons: string[] }>
    /** Whether the gateway is shutting down (its preClose has run): new requests are refused. */
    shuttingDown: () => boolean
    /** Writes every face's `call failed` warn lines, bounded per operation and code (call-failed-log.ts). */
    callFailedLog: CallFailedLog
    /** Counts an error answered over HTTP by code and status (mantle_http_errors_total; a no-op with metrics off). */
    errorAnswered: (code: string, status: number) => void
    /**
     * A condition start-up refuses, found only once the gateway runs (production: pending audit
     * migrations once PostgreSQL answers): logged at fatal with its message, and the gateway shuts
     * down through BuildOptions.onFatal (server.ts: the graceful shutdown of a signal, then exit
     * 1), or without one by closing the app. Once: a second call is ignored.
     */
    fatal: (err: Error) => void
  }
  interface FastifyContextConfig {
    /** The route's path parameters are a call's input (REST): logs show its pattern instead. */
    inputInPath?: boolean
    /** The route serves WebSocket upgrades (it has a wsHandler): an upgrade of any other route is refused (see refusedEarly). */
    servesWebSocket?: boolean
    /** The operation the route serves (REST): its `call failed` lines are bounded under its name. */
    op?: string
  }
}

/** The package version, read once at start-up (from the source tree or from dist/). */
export const VERSION: string = ((): string => {
  for (const candidate of ['./package.json', '../package.json']) {
    try {
      return (JSON.parse(readFileSync(new URL(candidate, import.meta.url), 'utf8')) as { version: string }).version
    } catch {}
  }
  return '0.0.0'
})()

/** Requests one connection may have waiting behind an answer under way (pipelined). */
export const MAX_PIPELINED = 128
/** Bytes of memory those requests may hold between them (their heads, reckoned as below). */
export const MAX_PIPELINED_BYTES = 512 * 1024
const REQUEST_BYTES = 2048
const HEADER_STRING_BYTES = 32

/** The longest a request's head may take to arrive (ms): a head is 16 KB at the most. BFF_REQUEST_TIMEOUT_MS bounds it too. */
export const HEADERS_TIMEOUT_MS = 10_000

/**
 * Node's HTTP server options bounding how long a request may take to arrive (its head within
 * HEADERS_TIMEOUT_MS, head and body within BFF_REQUEST_TIMEOUT_MS), and how often it checks:
 * every tenth of the request timeout (100 ms to 5 s), so that a request is cut at most a tenth
 * late (Node's default, every 30 s, let one take up to twice the timeout). Only a request still
 * arriving is timed: a call the gateway is answering, an SSE stream and an upgraded WebSocket are not.
 */
export function requestTimeouts (requestTimeoutMs: number): { requestTimeout: number, headersTimeout: number, connectionsCheckingInterval: number } {
  return {
    requestTimeout: requestTimeoutMs,
    headersTimeout: Math.min(HEADERS_TIMEOUT_MS, requestTimeoutMs),
    connectionsCheckingInterval: Math.min(5000, Math.max(100, Math.ceil(requestTimeoutMs / 10)))
  }
}

/**
 * How long a connection's answer may wait, written out but not all taken by its client, before
 * the connection is closed (ms): Node's historic server timeout. Node refreshes a socket's timer
 * when a write completes, and an answer is one write: a client that reads slowly cannot be told
 * from one that reads nothing before this runs out (a shorter bound, 30 s, cut a client reading
 * 8 MB at 0.5 MB/s).
 */
export const ANSWER_STALL_MS = 120_000

/** How long a WebSocket client has to complete the close at shutdown before it is cut. */
export const WEBSOCKET_CLOSE_GRACE_MS = 2000

/**
 * @fastify/websocket's preClose, for the one WebSocket server every face shares: each socket
 * is closed with 1001 (going away, so clients reconnect elsewhere), and one whose client has not
 * completed the close within WEBSOCKET_CLOSE_GRACE_MS is cut. The plugin's own closed without a
 * code and waited for every client: one that never answered (a phone out of coverage, a NAT that
 * dropped the flow) held the HTTP server's close for ws's 30 s, past the shutdown's grace, and
 * the process was killed before its audit queue was flushed.
 */
export function closeWebSockets (this: FastifyInstance, done: () => void): void {
  const server = this.websocketServer
  // A face's own (closedByTheirFace) answers its calls in flight first, and is closed by it.
  for (const client of server.clients) if (!closedByTheirFace.has(client)) client.close(1001, 'The gateway is shutting down')
  const cut = setTimeout(() => { for (const client of server.clients) if (!closedByTheirFace.has(client)) client.terminate() }, WEBSOCKET_CLOSE_GRACE_MS)
  cut.unref()
  server.close(() => { clearTimeout(cut) })
  done()
}

export interface BuildOptions {
  /** A compiled manifest; by default the file named by BFF_MANIFEST is loaded. */
  manifest?: Manifest
  /** Overrides the Kernel origin (the demo Kernel's, or a test's). */
  kernelUrl?: string
  logger?: FastifyServerOptions['logger']
  /** Where the gateway's own logger writes (default stdout); tests capture lines with it. */
  logStream?: { write: (line: string) => void }
  /** Kernel retry backoff (tests shorten it). */
  kernelBackoff?: { baseMs: number, capMs: number }
  /** Where spans go instead of OTLP (tests); tracing still needs an endpoint configured. */
  traceExporter?: SpanExporter
  /** The response cache's clock, epoch ms (tests move it). */
  cacheClock?: () => number
  /** JWKS timings (tests shorten them). */
  identity?: { jwksRefreshMs?: number, jwksMinRefetchMs?: number, jwksTimeoutMs?: number }
  /** Rate-limit internals (tests: the memory store's clock, the Redis retry pause). */
  rateLimit?: { now?: () => number, retryRedisMs?: number, memoryMaxKeys?: number }
  /** Idempotency internals (tests: the margin a Redis claim's lease has over its op's timeout, the bound of writes waiting for Redis). */
  idempotency?: { leaseMarginMs?: number, maxPending?: number }
  /**
   * What app.fatal does once it has logged: server.ts shuts the process down gracefully and exits
   * 1. Without it the app closes (its audit queue flushed, as at any close).
   */
  onFatal?: (err: Error) => void
  /** Audit timings (tests shorten them). */
  audit?: { retentionIntervalMs?: number, flushIntervalMs?: number, connectTimeoutMs?: number, probeIntervalMs?: number, schemaWaitMs?: number }
  /** Events timings and bound (tests shorten them). */
  events?: { probeIntervalMs?: number, maxSubscriptions?: number, maxPublishing?: number }
  /** What clients may leave unread, all and per tenant (default: defaultUnreadBytes; tests shrink it). */
  unreadBytes?: { max: number, perTenant: number }
  /** How long a reload waits to see the manifest file settled (default SETTLE_MS; tests that reload many times shorten it). */
  manifestSettleMs?: number
  /** Load-shedding sample interval in ms (default 1000; tests shorten it). */
  pressureSampleIntervalMs?: number
  /** /diagz: one call in `stageSampleEvery` is timed per stage (default 8; tests time every call); `cache`: its section shown (a stand-in cache stage). */
  diagz?: { stageSampleEvery?: number, cache?: boolean }
  /** Connections accepted at once (default connectionBound of the process's open-files limit; null: none; tests shrink it). */
  maxConnections?: number | null
  /**
   * Fastify's validator compiler (default: a pool of its own, `bodiesStrict()`). A test process
   * that builds hundreds of gateways shares one: each pool's two Ajv instances cost 20 to 30 ms of
   * CPU to make, and compiled the gateway's own route schemas again.
   */
  validators?: ValidatorFactory
  /** Fastify's serializer compiler (default: Fastify's own); tests share one, as `validators`. */
  serializers?: SerializerFactory
}

/**
 * Security headers on every answer (errors and 404s included), as helmet computes them. Without
 * CSP nonces they are the same for every response, so helmet runs once here: @fastify/helmet
 * runs helmet's middleware chain per request, which cost the spine 14 points of throughput
 * (0.86 -> 0.72 of the pass-through). No Content-Security-Policy: the gateway answers JSON,
 * where CSP protects nothing, and a strict one breaks the inline scripts of /docs and
 * /graphiql. HSTS, nosniff, X-Frame-Options, Referrer-Policy and the cross-origin policies stay.
 */
export const SECURITY_HEADERS: Readonly<Record<string, string>> = ((): Record<string, string> => {
  const headers: Record<string, string> = {}
  const res = {
    setHeader: (name: string, value: unknown) => { headers[name.toLowerCase()] = String(value) },
    removeHeader: (name: string) => { delete headers[name.toLowerCase()] },
    getHeader: () => undefined
  }
  helmet({ contentSecurityPolicy: false })({} as never, res as never, () => {})
  return Object.freeze(headers)
})()

/** How long one plugin may take to start (Fastify's pluginTimeout): see buildApp. */
const PLUGIN_TIMEOUT_MS = 30_000

/** The security headers as raw header lines, for answers written straight to a socket. */
const SECURITY_LINES = Object.entries(SECURITY_HEADERS).map(([name, value]) => `${name}: ${value}\r\n`).join('')

/** What every answer carries, routed or not: its request id and the security headers. */
function stamp (request: FastifyRequest, reply: FastifyReply): void {
  reply.header('x-request-id', request.id)
  reply.headers(SECURITY_HEADERS)
}

// A client's request id is kept only when it is short and plain: it goes into logs and headers.
const REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/

/**
 * A problem+json answer written straight to a socket, for requests that never become a Fastify
 * request (or whose request's answer is no longer Fastify's: `id` is then that request's); the
 * gateway then closes its side. Returns the request id it carries.
 */
function answerRaw (socket: Duplex, status: number, detail: string, extra: string = '', code: ErrorCode = 'BAD_REQUEST', id: string = uuidv7()): string {
  const body = rawProblem(status, detail, code, id)
  socket.end(`HTTP/1.1 ${status} ${STATUS_CODES[status] ?? ''}\r\nContent-Type: application/problem+json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nx-request-id: ${id}\r\n${SECURITY_LINES}${extra}Connection: close\r\n\r\n${body}`)
  return id
}

/**
 * The request id of an answer written past Fastify to a request whose head was read: the one
 * genReqId gave it, when it became a Fastify request; else the client's own x-request-id when it
 * is valid, as every answer's (README, "Request ids"); else a new one.
 */
function answeredId (req: IncomingMessage | null | undefined): string {
  return requestIdOf(req) ?? (req == null ? undefined : clientsRequestId(req)) ?? uuidv7()
}

/** The client's own x-request-id, when it is short and plain (REQUEST_ID); else undefined. */
function clientsRequestId (req: IncomingMessage): string | undefined {
  const id = req.headers['x-request-id']
  return typeof id === 'string' && REQUEST_ID.test(id) ? id : undefined
}

/**
 * The problem of an answer Fastify never sees. As every other answer: a request id the gateway
 * made (UUIDv7), in the body and the header, and the security headers (these had a v4 id in the
 * body alone, and no security header).
 */
function rawProblem (status: number, detail: string, code: ErrorCode, id: string): string {
  return JSON.stringify(toProblem(new MantleError(code, detail, { status }), id).problem)
}

/**
 * Fastify's clientErrorHandler: 408 for a request that took too long, 431 for a head over
 * Node's limit (or an upgrade offer with more fields than Node hands on: servePlainUpgrades),
 * 400 for anything else the parser refuses, each as problem+json. The parser goes on refusing
 * whatever else the socket brings while it lingers, which lands here again and is dropped.
 * Nothing is written in front of the answer of a call that runs on the connection, nor to a
 * connection that sent nothing.
 */
function answerClientError (err: NodeJS.ErrnoException, socket: Duplex): Refusal | null {
  if (lingering.has(socket)) return null
  if (err.code === 'ECONNRESET' || socket.destroyed || !socket.writable) {
    socket.destroy()
    return null
  }
  // A connection that never sent a byte (a browser's preconnect, a pool's spare) has its head
  // timed from the connect: nothing was asked, so nothing is answered. A 408 written to it was
  // read as the answer to the request a client sent it at that moment.
  if (err.code === 'ERR_HTTP_REQUEST_TIMEOUT' && (socket as Socket).bytesRead === 0) {
    socket.destroy()
    return null
  }
  const res = (socket as HttpSocket)._httpMessage
  if (res !== null && res !== undefined && !res.writableFinished) {
    if (inFlight(res.req)) {
      // The connection's answer under way is a call's that runs (a request pipelined behind it, or
      // its own body, never finished arriving): a 408 written now would be read as that call's
      // answer. That answer goes out, saying Connection: close, and the connection closes after it
      // (lingering, see lingeringClose); nothing queued behind it runs.
      keepNoLonger(res)
      return null
    } else if (res.headersSent) {
      // Another answer already begun: a 408 written now would land inside it.
      socket.destroy()
      return null
    }
    // Its request, still reading its body, is answered so (a 408, a chunk Node's parser refuses):
    // what it is recorded as. Not when its client stopped sending (the connection's end mid-body,
    // HPE_INVALID_EOF_STATE): it left, and is recorded so.
    const answered = answerRefusal(err, socket, answeredId(res.req))
    if (err.code !== 'HPE_INVALID_EOF_STATE') answeredStraight.set(res.req, [answered[0], answered[1]])
    return answered
  }
  return answerRefusal(err, socket)
}

/** The connection's answer under way is its last: Connection: close if not yet sent, and the socket ends after it. */
function keepNoLonger (res: ServerResponse): void {
  res.shouldKeepAlive = false
  // Node's own mark of an answer that ends its connection (it ends it once the answer is sent,
  // with socket.destroySoon: a lingering close), set too for an answer whose head is already out.
  ;(res as ServerResponse & { _last: boolean })._last = true
}

/** The clientErrorHandler's answers, by the error's code: its status, detail and problem code; any other is a 400. */
const REFUSALS = new Map<string | undefined, [number, string, ErrorCode]>([
  ['ERR_HTTP_REQUEST_TIMEOUT', [408, 'The request took too long to arrive', 'BAD_REQUEST']],
  ['HPE_HEADER_OVERFLOW', [431, 'The request head is larger than 16 KB', 'BAD_REQUEST']],
  [FIELDS_OVERFLOW, [431, FIELDS_OVERFLOW_DETAIL, 'BAD_REQUEST']],
  [OFFER_BODY_OVERFLOW, [413, 'The request body is larger than the limit', 'PAYLOAD_TOO_LARGE']]
])

/** A refusal written straight to a socket: its status, code and request id. */
type Refusal = [number, ErrorCode, string]

/** The clientErrorHandler's answer, as problem+json, and the lingering close; its status, code and request id. */
function answerRefusal (err: NodeJS.ErrnoException, socket: Duplex, requestId?: string): Refusal {
  const [status, detail, code] = REFUSALS.get(err.code) ?? [400, 'The request is not valid HTTP', 'BAD_REQUEST']
  const id = answerRaw(socket, status, detail, '', code, requestId)
  lingeringClose(socket)
  return [status, code, id]
}

/**
 * The refusal of a body sent coded, or null. A body is read as sent: one with a content coding
 * (gzip, br) was read as plain text, so a JSON body labelled gzip ran its call and a gzipped one
 * was refused for its bytes; a 415 names the one coding served (RFC 9110 §15.5.16). Node's
 * parser takes a transfer coding before chunked (`gzip, chunked`) and hands on the body still
 * coded: only chunked is served (RFC 9112 §6.1; Node refuses a coding without chunked last).
 */
function codingRefusal (headers: IncomingHttpHeaders): MantleError | null {
  const coding = headers['content-encoding']
  if (coding !== undefined && !IDENTITY.test(coding)) {
    return new MantleError('UNSUPPORTED_MEDIA_TYPE', 'A request body is sent without a content coding: no Content-Encoding but identity', { headers: { 'accept-encoding': 'identity' } })
  }
  const framing = headers['transfer-encoding']
  if (framing !== undefined && !CHUNKED.test(framing)) return new MantleError('BAD_REQUEST', 'A request body is sent with no transfer coding but chunked')
  return null
}

/**
 * Refuses a request in the gateway's root onRequest hook; a WebSocket upgrade's connection, or
 * one whose body has not all arrived, closes after the answer: Node would otherwise read the
 * refused body to its end, however long, to reach the next request.
 */
function refuseEarly (request: FastifyRequest, reply: FastifyReply, done: (err: Error) => void, err: MantleError): void {
  if (request.headers.upgrade !== undefined) closeAfterAnswer(request, reply)
  else if (framesBody(request.raw)) keepNoLonger(reply.raw)
  done(err)
}

/**
 * Node's mark of a request it handed to the 'upgrade' listeners (`Connection: upgrade` and an
 * `Upgrade` header, with a listener: @fastify/websocket's); false for one it serves as plain
 * HTTP, an `Upgrade` header without `Connection: upgrade` included. Not in @types/node.
 */
type Upgradable = IncomingMessage & { upgrade: boolean }

/** @fastify/ajv-compiler's pool, as Fastify builds its default validators (its types are a union of Ajv's and JTD's). */
type ValidatorPool = (externalSchemas: unknown, options?: { customOptions?: object }) => (route: { httpPart?: string }) => unknown

/**
 * Fastify's validator compiler (@fastify/ajv-compiler, its default, one pool per instance as
 * Fastify makes it), with Ajv's coercion off for bodies: Fastify has one Ajv for every part of a
 * request, coercing all alike.
 */
export function bodiesStrict (): ValidatorFactory {
  const pool = AjvCompiler() as unknown as ValidatorPool
  const build: ValidatorPool = (externalSchemas, options = {}) => {
    const coercing = pool(externalSchemas, options)
    const strict = pool(externalSchemas, { ...options, customOptions: { ...options.customOptions, coerceTypes: false } })
    return (route) => route.httpPart === 'body' ? strict(route) : coercing(route)
  }
  return build as unknown as ValidatorFactory
}

/** A Content-Encoding that says the body is as sent. */
const IDENTITY = /^\s*identity\s*$/i

/** A Transfer-Encoding that frames the body and codes nothing: chunked alone. */
const CHUNKED = /^\s*chunked\s*$/i

/** What Node's HTTP server keeps on a connection's socket: its answer under way, and its parser (null once upgraded). */
type HttpSocket = Socket & { _httpMessage?: ServerResponse | null, parser?: unknown }

// The methods Fastify runs a route's handler for without waiting for a body (handle-request.js).
const BODYLESS = new Set(['GET', 'HEAD', 'TRACE'])

/**
 * Whether a request's call runs, or will: it arrived whole, or Fastify runs its handler without
 * waiting for a body it announced (a GET). Otherwise it is still arriving: it never reached a
 * handler and never will without its body. From the method, not a mark made per request: a hook
 * on every route (a WeakSet add) had cost every GET a preValidation phase of its own.
 */
function inFlight (req: IncomingMessage): boolean {
  return req.complete || BODYLESS.has(req.method ?? '')
}

/**
 * The first preValidation of a route that takes a body, once it has arrived: a request whose
 * connection the gateway has already answered and is closing (408 for a body too slow to arrive,
 * 503 at shutdown) runs nothing. Its answer went out while its body still came, and the rest of
 * it could still arrive within the linger: the call would then have run, a mutation included,
 * behind a refusal.
 */
function notAnsweredAlready (request: FastifyRequest, reply: FastifyReply, done: () => void): void {
  if (lingering.has(request.raw.socket)) reply.hijack()
  done()
}

/** A HEAD route's last onSend: no Content-Length on a 304 or a 204, which carry no body length of their own. */
function withoutBodyLength (_request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (err: null, payload: unknown) => void): void {
  if (reply.statusCode === 304 || reply.statusCode === 204) reply.removeHeader('content-length')
  done(null, payload)
}

/**
 * A HEAD route's compression runs before Fastify's HEAD handler, so that HEAD carries the header
 * fields GET would (RFC 9110 §9.3.2): its Content-Encoding, `Vary: accept-encoding` and the
 * compressed Content-Length (none for a streamed body). After it, compression never saw a body
 * (the handler had dropped it) and HEAD gave the uncompressed length, no coding and no Vary.
 * @fastify/compress's onSend is the one its onRoute hook added: onSendBeforeCompression counts a
 * HEAD route's onSend hooks just before that hook runs, compressBeforeHead just after. A route
 * compression leaves alone (`compress: false`) has none added, and nothing is moved: its last
 * onSend (withoutBodyLength, say) stays after Fastify's HEAD handler.
 */
function compressBeforeHead (route: RouteOptions): void {
  if (route.method !== 'HEAD' || !Array.isArray(route.onSend)) return
  const hooks = route.onSend
  if (hooks.length !== onSendHooksBefore.get(route)! + 1) return
  const head = hooks.findIndex(hook => hook.name === 'headRouteOnSendHandler')
  if (head === -1 || head === hooks.length - 1) return
  hooks.splice(head, 0, hooks.pop()!)
}

/** A HEAD route's onSend hooks before compression's onRoute hook ran, for compressBeforeHead. */
const onSendHooksBefore = new WeakMap<RouteOptions, number>()

function onSendBeforeCompression (route: RouteOptions): void {
  if (route.method !== 'HEAD') return
  onSendHooksBefore.set(route, Array.isArray(route.onSend) ? route.onSend.length : route.onSend === undefined ? 0 : 1)
}

export async function buildApp (config: Readonly<Config>, options: BuildOptions = {}): Promise<FastifyInstance> {
  const refused = productionProblems(config)
  if (refused.length > 0) throw new ConfigError('Refusing to start in production: ' + refused.join('; '))
  const manifest = options.manifest ?? await loadManifestFile(config.BFF_MANIFEST)

  const timeouts = requestTimeouts(config.BFF_REQUEST_TIMEOUT_MS)
  // Set once the metrics are registered (below): the answers written before any route runs count too.
  let errorAnswered: (code: string, status: number) => void = () => {}
  // A refusal written straight to the socket (answerRaw, rawProblem) belongs to no Fastify request,
  // so it has no access-log line: one info line carries the request id its client was given
  // (nothing of the request itself, whose head may not even parse); the error is counted too.
  const refusedStraight = (reqId: string, code: ErrorCode, status: number): void => {
    app.log.info({ reqId, res: { statusCode: status }, code }, 'request refused')
    errorAnswered(code, status)
  }
  const app = Fastify({
    // Fastify's default (10 s) was no longer than the audit spool's watch of a lock another
    // container may hold (two heartbeats, 10 s): a container restarted after a crash or an OOM
    // kill (a new PID namespace, its predecessor's lock fresh) failed its start ("Plugin did not
    // start in time: 'mantle-audit'") until the lock was 30 s old. The watch and PostgreSQL's
    // first answer (5 s) fit, below the startup probe's 60 s.
    pluginTimeout: PLUGIN_TIMEOUT_MS,
    logger: options.logger ?? {
      level: config.LOG_LEVEL,
      redact: {
        paths: ['req.headers.authorization', 'req.headers.cookie', 'req.headers["proxy-authorization"]', 'req.headers["x-api-key"]', 'res.headers["set-cookie"]',
          // A call's input may hold what the AI firewall found (secrets, personal data): never logged.
          'input', 'body', 'req.body', '*.input', '*.body',
          // ioredis hangs the command Redis refused on its error, with its arguments: a refused
          // AUTH's are REDIS_URL's user and password, a SET's a cached answer or an outcome.
          'err.command.args', 'err.cause.command.args', 'err.aggregateErrors[*].command.args'],
        censor: '[redacted]'
      },
      serializers: { req: requestForLog },
      ...(options.logStream === undefined ? {} : { stream: options.logStream })
    },
    bodyLimit: config.BFF_BODY_LIMIT,
    // A request that never finishes arriving (a body or a head sent a byte at a time) is answered
    // 408 and its connection closed: without a bound it held the connection for ever, and the
    // shutdown with it (the process was killed at its grace, the audit never flushed).
    requestTimeout: timeouts.requestTimeout,
    // An HTTP/1.1 request without Host is refused by the gateway (headRefusal), as problem+json:
    // Node's own refusal was a bare 400 with no body, no request id and no security headers.
    http: { headersTimeout: timeouts.headersTimeout, connectionsCheckingInterval: timeouts.connectionsCheckingInterval, requireHostHeader: false },
    // The client's address (the guard's key before identity, logs) from X-Forwarded-For, through
    // the proxies named here only: believed from anyone, any client could pick its own key.
    ...(config.BFF_TRUST_PROXY === undefined ? {} : { trustProxy: trustedProxies(listEntries(config.BFF_TRUST_PROXY)) }),
    requestIdHeader: false,
    // A request's logger becomes a pino child only when the request writes a line (request-logger.ts).
    childLoggerFactory: requestLoggerFactory,
    genReqId: (req) => {
      const id = clientsRequestId(req)
      if (id === undefined) return keepRequestId(req, uuidv7())
      markClientRequestId(req)
      return keepRequestId(req, id)
    },
    // Refused below (onRequest) instead, as problem+json with a request id and the security
    // headers: Fastify's own 503 while closing had none of them.
    return503OnClosing: false,
    // A URL Fastify cannot route (bad percent-encoding, an overlong path segment) answers the
    // same problem+json, request id and security headers as every other refusal.
    frameworkErrors: (error, request, reply) => {
      stamp(request, reply)
      refusedByRouter(error, request, reply)
    },
    // Requests Node's HTTP parser refuses (junk in the head, a head over 16 KB, a timeout).
    clientErrorHandler: (err, socket) => {
      const answered = answerClientError(err, socket)
      if (answered !== null) refusedStraight(answered[2], answered[1], answered[0])
    },
    // A query string that is not valid percent-encoding is refused (onRequest below), not taken literally.
    routerOptions: { ignoreTrailingSlash: true, maxParamLength: MAX_PATH_PARAM_LENGTH, querystringParser: parseQuery },
    // An unknown key is refused, not dropped (Fastify's default removes it): a mistyped filter of
    // GET /admin/audit (`?tenant_id=acme`) answered every tenant's entries, a `tenantId` for
    // /admin/cache/invalidate invalidated the caller's own tenant, and a batch call's unknown key
    // went unnoticed. Only the gateway's own routes use this Ajv: a REST operation's input is
    // validated by the pipeline, with its manifest schema.
    ajv: { customOptions: { strict: false, removeAdditional: false } },
    // A body is JSON, whose values have their types: a `true` or `["x"]` where a string is due
    // is refused, not coerced (an invalidation of {"tags":true} dropped the tag "true", a tenant
    // ["x"] became "x"). A query string, a path or a header is text, coerced as Fastify does.
    schemaController: { compilersFactory: { buildValidator: options.validators ?? bodiesStrict(), ...(options.serializers === undefined ? {} : { buildSerializer: options.serializers }) } }
  })

  app.addSchema(ProblemSchema)
  // Every face speaks JSON: any other body is a 415, not a string handed to the pipeline.
  app.removeContentTypeParser('text/plain')
  // An empty body under a JSON content type is an absent body, as without one: many clients set
  // the type on every request. Fastify refused it (400 "The JSON body is empty"), a DELETE, whose
  // input is its path and query, included. A body that is not UTF-8, or that names another
  // charset, is refused (json-body.ts).
  addJsonBodyParser(app, 'error')
  // So is a body of no bytes under any other type (Content-Length: 0): it has no media type to be
  // wrong. `curl -d ''` labels it application/x-www-form-urlencoded, fetch's `body: ''`
  // text/plain, and a mutation without input was refused 415. Any other body is refused as
  // Fastify refused it, unread.
  app.addContentTypeParser('*', (request, _payload, done) => {
    if (request.headers['content-length'] === '0' && request.headers['transfer-encoding'] === undefined) done(null, undefined)
    else done(new BodyRefused('UNSUPPORTED_MEDIA_TYPE', 'The request body must be application/json'), undefined)
  })
  app.setErrorHandler(errorHandler)
  // Fastify serves HEAD with each GET route's handler (exposeHeadRoutes) and its HEAD onSend
  // sets content-length: 0 on any answer without a body: a HEAD revalidated to 304 said its
  // representation was empty, where RFC 9110 §8.6 allows a 304 no Content-Length but its 200's.
  // Added before any route, so that it applies to every one, and runs after Fastify's own.
  const routeMethods = new RouteMethods()
  app.addHook('onRoute', (route) => {
    routeMethods.add(route.method)
    if (route.wsHandler !== undefined || route.websocket === true) route.config = { ...route.config, servesWebSocket: true }
    if (route.method === 'HEAD') route.onSend = withHook(route.onSend, withoutBodyLength)
    // With CORS on, an OPTIONS that is no preflight (no Access-Control-Request-Method) is answered
    // 204 by CORS's route: it names the methods the path is served with in Allow, as RFC 9110
    // §9.3.7 asks of a successful OPTIONS and as the path's 405 does. It named none.
    if (route.method === 'OPTIONS') route.onSend = withHook(route.onSend, allowOnOptions)
    const methods = Array.isArray(route.method) ? route.method : [route.method]
    if (!methods.every(method => BODYLESS.has(method))) route.preValidation = withHook(route.preValidation, notAnsweredAlready, true)
  })
  function allowOnOptions (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (err: null, payload: unknown) => void): void {
    if (reply.statusCode === 204 && request.headers['access-control-request-method'] === undefined && !reply.hasHeader('allow')) {
      const allow = routeMethods.allowed(app, request.url.split('?')[0])
      if (allow !== null) reply.header('allow', allow)
    }
    done(null, payload)
  }
  // A path that is served, but not with this method, is a 405 naming those it is served with
  // (RFC 9110 §15.5.6), not a 404: `PUT /api/v1/agents` said there was no such resource. Asked
  // of the router here only, on a request no route matched, or whose route found nothing to
  // answer (a file missing under /docs/static/*, whose route @fastify/static hands to this
  // handler): that path is served with the request's method, and stays a 404 (it was a 405
  // "GET is not served at /docs/static/x.js: GET, HEAD").
  const notFound = (request: FastifyRequest): MantleError => {
    const path = request.url.split('?')[0]
    const allow = routeMethods.allowed(app, path)
    if (allow === null) return new MantleError('NOT_FOUND', `No route ${request.method} ${path}`)
    if (allow.split(', ').includes(request.method)) return new MantleError('NOT_FOUND', `Nothing is served at ${request.method} ${path}`)
    return new MantleError('BAD_REQUEST', `${request.method} is not served at ${path}: ${allow}`, { status: 405, headers: { allow } })
  }
  app.setNotFoundHandler((request, reply) => {
    const error = notFound(request)
    // A path the router refuses to some method for a parameter too long is refused so to every
    // one (the router has no parametric route of this method there to refuse it with): a 404
    // said the path was served to no method where GET's answer was a 414. A path that is not
    // valid percent-encoding never comes here: the not-found router refuses it itself.
    if (error.code === 'NOT_FOUND' && routeMethods.refused(app, request.url.split('?')[0])) {
      refusedByRouter(new errorCodes.FST_ERR_MAX_PARAM_LENGTH(request.url.split('?')[0]), request, reply)
      return
    }
    errorHandler(error, request, reply)
  })
  // A REST path whose parameter is too long (414) or not valid percent-encoding (400) is recorded
  // under the operation it was made to, as the same call with a bad parameter the router takes is
  // (VALIDATION_FAILED); a path no operation serves is not, as a 404 is not.
  function refusedByRouter (error: FastifyError, request: FastifyRequest, reply: FastifyReply): void {
    if ((error.code === 'FST_ERR_MAX_PARAM_LENGTH' || error.code === 'FST_ERR_BAD_URL') && app.hasDecorator('audit')) {
      const op = overlongOperation(app, request.method, request.url, REST_PREFIX, MAX_PATH_PARAM_LENGTH)
      if (op !== null) {
        const { problem } = toProblem(error, request.id)
        app.audit.refused(request, reply, op.name, problem.code, problem.status, REST_PREFIX + op.path)
      }
    }
    errorHandler(error, request, reply)
  }
  // Node hands a CONNECT request to 'connect' listeners, and without one drops the connection
  // unanswered (found by `npm run fuzz`): the gateway is no proxy, so it answers 405.
  app.server.on('connect', (req: IncomingMessage, socket: Duplex) => {
    socket.on('error', () => {})
    // A 405 names the methods that are served (RFC 9110 §15.5.6).
    refusedStraight(answerRaw(socket, 405, 'CONNECT is not served', 'Allow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n', 'BAD_REQUEST', answeredId(req)), 'BAD_REQUEST', 405)
    lingeringClose(socket)
  })
  // An Expect other than 100-continue: Node answers a bare 417 (no body, no request id, no
  // security header) unless a listener answers it, so the gateway does, as problem+json.
  app.server.on('checkExpectation', (req, res) => {
    const id = answeredId(req)
    const body = rawProblem(417, 'The only expectation served is 100-continue', 'BAD_REQUEST', id)
    refusedStraight(id, 'BAD_REQUEST', 417)
    res.writeHead(417, { ...SECURITY_HEADERS, 'content-type': 'application/problem+json', 'content-length': Buffer.byteLength(body), 'x-request-id': id, connection: 'close' })
    res.end(body)
  })
  // Node answers Expect: 100-continue with a 100 as soon as the head arrives unless a listener
  // decides: a request whose body the gateway refuses for its coding (refusedEarly) was first
  // invited to send it. Such a one gets its refusal alone, its connection then closed; so does
  // one arriving while the gateway shuts down.
  app.server.on('checkContinue', (req: IncomingMessage, res: ServerResponse) => {
    if (!closing && codingRefusal(req.headers) === null && headRefusal(req) === null) res.writeContinue()
    app.server.emit('request', req, res)
  })
  // Node's server closes a connection after an answer that ends it (connection: close, as
  // Fastify answers a body it refused unread) with destroySoon: it lingers instead. Every open
  // connection is kept, for the shutdown to find those whose request is still arriving.
  const connections = new Set<Socket>()
  // Beyond the bound, Node closes a new connection at once ('drop'): the descriptors left are
  // the gateway's own connections' (connection-bound.ts).
  const maxConnections = options.maxConnections === undefined ? connectionBound(openFilesLimit(), manifest.kernel.connections) : options.maxConnections
  if (maxConnections !== null) app.server.maxConnections = maxConnections
  app.server.on('connection', (socket: Socket) => {
    socket.destroySoon = () => { lingeringClose(socket) }
    connections.add(socket)
    socket.once('close', () => { connections.delete(socket) })
  })
  // A connection whose answer is still not all taken by its client ANSWER_STALL_MS after it was
  // written out is closed: nothing else bounded it in time, as the request, headers and
  // keep-alive timeouts do not run while an answer is written, and clients that sent a request
  // each and read none of a large answer (Swagger UI's bundle, with no token) held their
  // connections for good, until every place the open-files limit leaves was taken and each new
  // connection was dropped. A socket with nothing to write (a call the Kernel takes long to
  // answer, an idle SSE stream) is left alone, as an upgraded WebSocket is (ws turns the timeout
  // off: its heartbeat bounds it). A listener here keeps Node from closing a socket whose timeout
  // runs out: one with no answer under way (the keep-alive timeout, which Node runs on the same
  // timer) is closed as Node would.
  app.server.timeout = ANSWER_STALL_MS
  app.server.on('timeout', (socket: HttpSocket) => {
    if (socket.writableLength > 0 || socket._httpMessage === null || socket._httpMessage === undefined) socket.destroy()
  })
  // A request parsed from what a lingering connection still brings (pipelined after the answer
  // that ended it, say after a refused body) is not served: its answer could not be sent, and
  // it must not run unseen. The connection is closed instead. A request pipelined behind an
  // answer still under way (its response has no socket yet: Node hands it the socket when that
  // answer is done) is served only then, and only if that answer left the connection open:
  // Node parses it at once, and behind a body that failed to parse (read whole, answered 400
  // with connection: close) a pipelined mutation reached the Kernel, its answer never sent.
  const serve = app.server.listeners('request') as Array<(req: IncomingMessage, res: ServerResponse) => void>
  if (serve.length !== 1) throw new Error('expected Fastify\'s one request listener')
  app.server.removeAllListeners('request')
  // Node stops reading a connection only once its queued answers hold 16 KB, and a request that
  // waits writes nothing: the requests waiting on one connection are bounded, in number and in
  // the bytes of their heads (one client wrote 500,000 behind a slow answer in 4 s, 820 MiB;
  // with a count alone, 1,000 heads of 14 KB each a connection, 300 MiB for 20). Beyond either
  // bound the connection is closed; Node itself had stopped reading after some 80 answers.
  const waiting = new WeakMap<Socket, { requests: number, bytes: number }>()
  app.server.on('request', (req: IncomingMessage, res: ServerResponse) => {
    const socket = req.socket
    if (lingering.has(socket)) {
      socket.destroy()
    } else if (res.socket !== null) {
      serve[0](req, res)
    } else {
      let queue = waiting.get(socket)
      if (queue === undefined) waiting.set(socket, queue = { requests: 0, bytes: 0 })
      // What the request holds, about: its message and answer objects (2 KB), its target, and
      // each header name and value a string of its own (32 bytes besides its text). By text
      // alone, a head of 2,000 empty headers (Node's most) was charged a sixth of its heap.
      let bytes = REQUEST_BYTES + (req.url?.length ?? 0)
      for (const text of req.rawHeaders) bytes += text.length + HEADER_STRING_BYTES
      queue.requests++
      queue.bytes += bytes
      if (queue.requests > MAX_PIPELINED || queue.bytes > MAX_PIPELINED_BYTES) {
        socket.destroy()
        return
      }
      const waited = queue
      res.once('socket', () => {
        waited.requests--
        waited.bytes -= bytes
        serve[0](req, res)
      })
    }
  })
  let closing = false
  app.decorate('shuttingDown', () => closing)
  let fatal = false
  app.decorate('fatal', (err: Error) => {
    if (fatal) return
    fatal = true
    app.log.fatal(err.message)
    if (options.onFatal !== undefined) options.onFatal(err)
    else app.close().catch((closeErr: Error) => app.log.error({ err: closeErr.message }, 'closing after a fatal condition failed'))
  })
  // The gateway's own refusals of a request, before any route's own hook (an upgrade's
  // credentials, the rate-limit guard), which run after every root hook; with CORS on, in a root
  // hook after CORS's (below), so that they carry its headers and a browser sees the refusal, not
  // a CORS failure. A preflight passed on (the guard on) reaches it; CORS answers one itself
  // otherwise. True when it refused the request (done called).
  const corsOn = config.BFF_CORS_ORIGINS !== undefined
  const crossSite = config.BFF_AUTH_ENABLED ? null : crossSiteUpgrade(config.BFF_CORS_ORIGINS === undefined ? [] : corsOrigins(config.BFF_CORS_ORIGINS))
  /**
   * The refusal of a request by its head alone, or null. A head of more fields than Node hands on
   * (its first 999; servePlainUpgrades): served without the rest, a request lost an Authorization
   * (a 401) or an Idempotency-Key (a keyed mutation ran twice) that came after them. Checked
   * first: its Host may be among the fields lost. Then an HTTP/1.1 request without Host (RFC 9112
   * §3.2; HTTP/1.0 may omit it), which Node refused itself with a bare 400 (requireHostHeader).
   * Also read before a 100 Continue, which must not invite a body the head refuses.
   */
  const headRefusal = (req: IncomingMessage): MantleError | null => {
    if (!wholeHead(app.server, req)) return new MantleError('BAD_REQUEST', FIELDS_OVERFLOW_DETAIL, { status: 431 })
    if (req.headers.host === undefined && req.httpVersionMajor === 1 && req.httpVersionMinor === 1) return new MantleError('BAD_REQUEST', 'An HTTP/1.1 request needs a Host header')
    return null
  }
  const refusedEarly = (request: FastifyRequest, reply: FastifyReply, done: (err?: Error) => void): boolean => {
    if (closing) {
      // A request that arrives on an open connection while the gateway shuts down runs nothing.
      refuseEarly(request, reply, done, new MantleError('OVERLOADED', 'The gateway is shutting down: retry on another instance', { headers: { 'retry-after': '1' } }))
      return true
    }
    // As a malformed JSON body: the query string is a call's input (REST, tRPC's and GraphQL's
    // GET). A probe takes it literally: a monitor's junk must not fail it. A preflight is
    // answered as any other: the request it asks for is the one refused, which a browser's
    // script then reads (a refused preflight is only a CORS failure to it, whatever its headers).
    if (request.query === MALFORMED_QUERY) {
      if (PROBE_PATHS.has(request.routeOptions.url ?? '')) {
        request.query = literalQuery(request.url)
      } else if (!(corsOn && request.method === 'OPTIONS')) {
        refuseEarly(request, reply, done, new MantleError('VALIDATION_FAILED', 'The query string is not valid percent-encoding (UTF-8)'))
        return true
      }
    }
    const coded = codingRefusal(request.headers)
    if (coded !== null) {
      refuseEarly(request, reply, done, coded)
      return true
    }
    // A path no route serves, or not with this method, is answered before its body is read:
    // Fastify read and parsed it first (any caller's 1 MB of JSON cost some 30 ms of CPU, and a
    // malformed one was a 400 rather than the 404 or 405).
    if (request.is404 && framesBody(request.raw)) {
      refuseEarly(request, reply, done, notFound(request))
      return true
    }
    // An upgrade of a route that serves no WebSocket (a probe, a REST route, a tRPC procedure,
    // GraphQL's POST) is refused before any 101, in its face's shape (the route's error handler).
    // @fastify/websocket, which has no option for it, accepted each one on a route declared
    // after it, then closed the socket at once and logged a line at info: any client could
    // fill the log. A path no route serves stays the 404 of a plain request. Only a WebSocket
    // upgrade: an offer of another protocol (`Upgrade: h2c`) is served as plain HTTP
    // (servePlainUpgrades), and never comes here marked as an upgrade.
    if ((request.raw as Upgradable).upgrade && request.routeOptions.config.servesWebSocket !== true && !request.is404 && WEBSOCKET_UPGRADE.test(request.headers.upgrade ?? '')) {
      refuseEarly(request, reply, done, new MantleError('BAD_REQUEST', 'This route serves no WebSocket: send it a plain HTTP request'))
      return true
    }
    // With identity off, a browser's upgrade from another site (its Origin) is refused before any
    // socket opens, as CORS keeps that site from reading REST's answers (crossSiteUpgrade).
    if (crossSite !== null && (request.raw as Upgradable).upgrade && request.routeOptions.config.servesWebSocket === true && WEBSOCKET_UPGRADE.test(request.headers.upgrade ?? '') && crossSite(request)) {
      refuseEarly(request, reply, done, new MantleError('FORBIDDEN', 'A WebSocket upgrade from another site\'s page is refused: its Origin is neither this gateway nor one BFF_CORS_ORIGINS names'))
      return true
    }
    return false
  }
  // Every request has the access log's two lines (README, "Errors"), but Fastify writes its second,
  // `request completed`, on the answer's 'finish' or 'error', neither of which comes once the
  // client has left (its connection closed while the call ran): such a request had only
  // `incoming request`. Written here instead, with the status its audit entry records (499
  // CLIENT_CLOSED, or the answer written straight to its connection: lingering.ts). Only when the
  // access log is written (LOG_LEVEL info or lower): at warn, Fastify adds no listener for it.
  if ((app.log as { isLevelEnabled?: (level: string) => boolean }).isLevelEnabled?.('info') === true) {
    app.addHook('onRequestAbort', (request, done) => {
      const straight = answeredStraight.get(request.raw)
      request.log.info({ res: { statusCode: straight?.[0] ?? 499 }, code: straight?.[1] ?? 'CLIENT_CLOSED' }, 'request completed')
      done()
    })
  }
  app.addHook('onRequest', (request, reply, done) => {
    stamp(request, reply)
    // With CORS on, refused once it has set its headers; a preflight CORS answers itself closes too.
    if (closing) reply.header('connection', 'close')
    // The head's own refusals, once per request and before CORS answers a preflight itself
    // (Node's requireHostHeader refused one without Host, now off); while closing, the
    // shutdown's refusal (refusedEarly) comes first.
    const head = closing ? null : headRefusal(request.raw)
    if (head !== null) {
      refuseEarly(request, reply, done, head)
      return
    }
    if (!corsOn && refusedEarly(request, reply, done)) return
    done()
  })
  // Fastify closes idle keep-alive sockets once, when closing starts; a socket busy then would
  // hold the shutdown until its keep-alive timeout. Reap sockets as they turn idle instead.
  // A request still arriving (its head, or its body, sent slowly or not at all) is not idle and
  // Node stops timing requests once its server closes: it held the close until the process was
  // killed at its grace, the audit never flushed. Once no call is in flight, each is answered
  // 503 OVERLOADED and its connection closed (lingering, so a client still sending reads it):
  // it never reached a handler and never will, a retry elsewhere is safe.
  const reap = (): void => {
    app.server.closeIdleConnections()
    const arriving: HttpSocket[] = []
    let calls = false
    for (const socket of connections as Set<HttpSocket>) {
      // Idle ones were just closed; an upgraded WebSocket (no parser) is closed by its face.
      if (socket.destroyed || lingering.has(socket) || socket.parser === null || socket.parser === undefined) continue
      const res = socket._httpMessage
      if (res === null || res === undefined) {
        // A connection that never sent a byte (a browser's preconnect) is not idle to Node
        // either: nothing was asked, so nothing is answered.
        if (socket.bytesRead === 0) socket.destroy()
        else arriving.push(socket)
      } else if (!res.writableEnded && streamMade(res)) {
        // A streamed answer (tRPC's jsonl batch) whose calls are all done, what is left of it the
        // client's to read: closed as Node closes an answer sent whole (closeIdleConnections).
        // Waited for as a call in flight, a client that read none of it held the shutdown until
        // the process was killed at its grace.
        socket.destroy()
      } else if (!res.writableEnded) {
        // A call in flight (its request whole, or its handler reached without the body it
        // announced): wait for it, it may still answer. One whose body is still awaited ends its
        // connection after its answer: the body would otherwise hold it, and be answered 503.
        if (inFlight(res.req)) {
          if (!res.req.complete) keepNoLonger(res)
          calls = true
        } else {
          arriving.push(socket)
        }
      }
    }
    if (calls) return
    for (const socket of arriving) {
      if (socket._httpMessage?.headersSent === true) {
        socket.destroy()
      } else {
        refusedStraight(answerRaw(socket, 503, 'The gateway is shutting down: retry on another instance', 'Retry-After: 1\r\n', 'OVERLOADED', answeredId(socket._httpMessage?.req)), 'OVERLOADED', 503)
        lingeringClose(socket)
      }
    }
  }
  let reaper: NodeJS.Timeout | null = null
  app.addHook('preClose', (done) => {
    closing = true
    reaper = setInterval(reap, 50)
    reaper.unref()
    done()
  })
  app.addHook('onClose', (_instance, done) => {
    if (reaper !== null) clearInterval(reaper)
    done()
  })

  // CORS only when origins are configured: unset, no CORS header at all (same-origin only).
  if (config.BFF_CORS_ORIGINS !== undefined) {
    const origins = corsOrigins(config.BFF_CORS_ORIGINS)
    await app.register(cors, {
      origin: origins.includes('*') ? '*' : origins,
      credentials: false,
      methods: ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'],
      // If-None-Match, ETag and x-cache: the response cache's conditional requests, from a browser.
      allowedHeaders: ['Authorization', 'Content-Type', 'Idempotency-Key', 'If-None-Match', 'traceparent', 'tracestate', 'trpc-accept', 'x-request-id'],
      exposedHeaders: ['x-request-id', 'Retry-After', 'RateLimit', 'RateLimit-Policy', 'RateLimit-Limit', 'RateLimit-Remaining', 'RateLimit-Reset', 'Idempotent-Replayed', 'ETag', 'x-cache', 'WWW-Authenticate'],
      maxAge: 600,
      strictPreflight: false,
      // With the rate-limit guard on, a preflight goes on past CORS's hook, its headers set, to
      // the guard, which counts it and answers it (plugins/rate-limit): CORS's own answer came
      // before any route's hooks, and no preflight was ever counted.
      preflightContinue: guardsRequests(config)
    })
  }

  if (corsOn) {
    app.addHook('onRequest', (request, reply, done) => {
      if (!refusedEarly(request, reply, done)) done()
    })
  }

  // Every concern, its order and its switch, in one place (ARCHITECTURE.md).
  await app.register(pipeline, { manifest })
  // Compression attaches itself to routes as they are declared: before any route.
  if (config.BFF_COMPRESSION_ENABLED) {
    // Compression's onRoute hook runs between these two: see compressBeforeHead.
    app.addHook('onRoute', onSendBeforeCompression)
    await app.register(compression)
    app.addHook('onRoute', compressBeforeHead)
  }
  let reloads: ((outcome: 'applied' | 'refused') => void) | null = null
  type Reload = { applied: boolean, reasons: string[] }
  const reloadOnce = async (): Promise<Reload> => {
    let reasons: string[]
    try {
      reasons = app.pipeline.reload(await loadManifestFile(config.BFF_MANIFEST, { settleMs: options.manifestSettleMs ?? SETTLE_MS }))
    } catch (err) {
      reasons = [(err as Error).message]
    }
    const applied = reasons.length === 0
    if (applied) app.log.info({ manifest: config.BFF_MANIFEST }, 'manifest reloaded')
    else app.log.warn({ manifest: config.BFF_MANIFEST, reasons }, 'manifest reload refused: the manifest in force is kept')
    reloads?.(applied ? 'applied' : 'refused')
    return { applied, reasons }
  }
  // One reload at a time, each reading the file when its turn comes, and at most one waiting
  // (those asked for meanwhile share it): two at once each read the file and applied what they
  // read when their read ended, so a slower read of the older file could be applied last.
  let current: Promise<Reload> | null = null
  let queued: Promise<Reload> | null = null
  const reloadManifest = async (): Promise<Reload> => {
    if (queued !== null) return await queued
    if (current === null) {
      current = reloadOnce().finally(() => { current = null })
      return await current
    }
    // Whether the one under way ends well or not (a log stream that throws): a rejection kept in
    // `queued` would have been every later reload's answer, and no SIGHUP applied a file again.
    const next = async (): Promise<Reload> => {
      queued = null
      return await reloadManifest()
    }
    queued = current.then(next, next)
    return await queued
  }
  app.decorate('reloadManifest', reloadManifest)
  // Tracing costs nothing unless an OTLP endpoint is configured.
  const traces = tracesUrl(config)
  if (traces !== null) {
    // Loaded only when on: OpenTelemetry is about 240 of the 1,170 modules the gateway loaded,
    // which every start (and every test process) paid for, tracing on or off.
    const { default: tracing } = await import('./plugins/tracing/index.js')
    await app.register(tracing, { url: traces, serviceName: config.OTEL_SERVICE_NAME, version: VERSION, sampleRatio: config.BFF_TRACE_SAMPLE_RATIO, ...(options.traceExporter === undefined ? {} : { exporter: options.traceExporter }) })
  }
  if (config.BFF_METRICS_ENABLED) {
    await app.register(metrics, config.BFF_METRICS_TOKEN === undefined ? {} : { token: config.BFF_METRICS_TOKEN })
    const counter = new Counter({ name: 'mantle_manifest_reloads_total', help: 'Manifest reloads, applied or refused', labelNames: ['outcome'] as const, registers: [app.metrics.registry] })
    reloads = outcome => counter.labels(outcome).inc()
    // Both outcomes from 0: a series first seen at 1 shows no increase() (Prometheus needs two
    // samples), and the one refused reload of an operator's SIGHUP was in none.
    for (const outcome of ['applied', 'refused'] as const) counter.labels(outcome).inc(0)
    // Every error answered over HTTP, by its code: the refusals no face's call metrics see (a 401
    // before the body, 404, 405, 413, 415, the guard's 429, a head Node's parser refuses, a tRPC
    // or GraphQL request refused whole) as well as REST's and the batch's. Before, a flood of
    // 401s or 413s showed in no metric. Labels: the contract's codes, and the statuses they
    // carry (a Kernel 4xx passed on, 400 to 499).
    const errors = new Counter({ name: 'mantle_http_errors_total', help: 'Errors answered over HTTP, by code and status: every problem+json answer (REST, the batch, the gateway\'s own routes, requests refused before any face: a 401 before the body, 404, 405, 413, 415, the HTTP guard\'s 429, a head Node refuses), and a tRPC or GraphQL request refused whole in its own shape', labelNames: ['code', 'status'] as const, registers: [app.metrics.registry] })
    errorAnswered = (code, status) => { errors.labels(code, String(status)).inc() }
    if (maxConnections !== null) {
      const dropped = new Counter({ name: 'mantle_connections_dropped_total', help: `Connections closed as soon as accepted: the instance held its bound of ${maxConnections} (the open-files limit less the descriptors its own connections need)`, registers: [app.metrics.registry] })
      app.server.on('drop', () => { dropped.inc() })
    }
  }
  // Labels: the manifest's op names (or `*`) and the three codes logLevelOf writes at warn.
  const suppressed = config.BFF_METRICS_ENABLED
    ? new Counter({ name: 'mantle_log_lines_suppressed_total', help: '`call failed` warn lines left out past the bound of 10 per operation and code in 10 s, by operation and code', labelNames: ['op', 'code'] as const, registers: [app.metrics.registry] })
    : null
  const callFailedLog = new CallFailedLog(app.log, suppressed === null ? {} : { onSuppressed: (op, code, n) => { suppressed.labels(op, code).inc(n) } })
  app.decorate('callFailedLog', callFailedLog)
  app.decorate('errorAnswered', (code: string, status: number) => { errorAnswered(code, status) })
  app.addHook('onClose', (_instance, done) => {
    callFailedLog.close()
    done()
  })
  // One shared Redis connection for the stores that use Redis; absent without REDIS_URL.
  // The channels its users subscribe to and a key of each store on it (a fresh tenant's), checked
  // at start-up: events always go through Redis with it.
  if (config.REDIS_URL !== undefined) {
    const cacheOnRedis = config.BFF_CACHE_ENABLED && storeFor(config, 'BFF_CACHE_STORE') === 'redis'
    const channels = cacheOnRedis ? [EVENTS_CHANNEL, INVALIDATE_CHANNEL] : [EVENTS_CHANNEL]
    const probe = `mantle-probe-${randomUUID()}`
    const rateLimitOnRedis = config.BFF_RATE_LIMIT_ENABLED && rateLimitStore(config) === 'redis'
    const idempotencyOnRedis = config.BFF_IDEMPOTENCY_ENABLED && storeFor(config, 'BFF_IDEMPOTENCY_STORE') === 'redis'
    const keys = [
      ...(rateLimitOnRedis ? [opKey(probe, probe, probe)] : []),
      ...(cacheOnRedis ? [sharedKey(probe, probe, '{}'), tagKey(probe, probe), ...tenantBudgetKeys(sharedKey(probe, probe, '{}'))] : []),
      ...(idempotencyOnRedis ? [storeKey(probe, probe, probe), tenantIndex(storeKey(probe, probe, probe))!.index] : [])
    ]
    // And the commands they run on them (each store's own list), asked for each key.
    const commands = [...new Set([...(rateLimitOnRedis ? RATE_LIMIT_COMMANDS : []), ...(cacheOnRedis ? CACHE_COMMANDS : []), ...(idempotencyOnRedis ? IDEMPOTENCY_COMMANDS : [])])]
    await app.register(redis, { url: config.REDIS_URL, commandTimeoutMs: config.BFF_REDIS_COMMAND_TIMEOUT_MS, channels, keys, commands })
  }
  if (config.BFF_LOAD_SHEDDING_ENABLED) {
    await app.register(pressure, {
      maxEventLoopDelayMs: config.BFF_MAX_EVENT_LOOP_DELAY_MS,
      maxHeapBytes: config.BFF_MAX_HEAP_BYTES,
      maxRssBytes: config.BFF_MAX_RSS_BYTES,
      ...(options.pressureSampleIntervalMs === undefined ? {} : { sampleIntervalMs: options.pressureSampleIntervalMs })
    })
  }
  // Before the concerns, so that each can add its store to /diagz (app.diagz.addStore); its
  // route comes after the rate-limit guard and the audit (diagzRoute).
  if (config.BFF_DIAGZ_ENABLED) {
    const faces = PROTOCOLS.filter(p => ({ trpc: config.BFF_TRPC_ENABLED, graphql: config.BFF_GRAPHQL_ENABLED, websocket: config.BFF_WEBSOCKET_ENABLED } as Partial<Record<Protocol, boolean>>)[p] !== false)
    await app.register(diagz, { version: VERSION, faces, cache: config.BFF_CACHE_ENABLED, ...options.diagz })
  }
  if (config.BFF_AUTH_ENABLED) {
    // The development secret is the fallback only when no key source is configured.
    const noKeys = config.BFF_JWT_SECRET === undefined && config.BFF_JWT_SECRETS === undefined && config.BFF_JWT_PUBLIC_KEYS === undefined && config.BFF_JWKS_URL === undefined
    if (noKeys) app.log.warn('no token key is configured: using the well-known development secret')
    // A secret read from a file often ends with that file's line break, which the gateway keeps
    // (a secret may hold any bytes) and many issuers trim: every token was then refused 401, with
    // nothing at start-up to say why.
    const secret = config.BFF_JWT_SECRET
    if (secret !== undefined && secret.trim() !== secret) app.log.warn('BFF_JWT_SECRET begins or ends with white space (a line break from a secret file?): tokens are verified with the secret as it is, white space included')
    const secrets = config.BFF_JWT_SECRETS === undefined ? undefined : parseSecrets(config.BFF_JWT_SECRETS)
    for (const [kid, s] of secrets ?? []) {
      if (s.trim() !== s) app.log.warn({ kid }, 'a secret of BFF_JWT_SECRETS begins or ends with white space: tokens of its kid are verified with the secret as it is, white space included')
    }
    await app.register(auth, {
      secret: noKeys ? DEV_JWT_SECRET : config.BFF_JWT_SECRET,
      secrets,
      publicKeys: config.BFF_JWT_PUBLIC_KEYS === undefined ? undefined : parsePublicKeys(config.BFF_JWT_PUBLIC_KEYS),
      jwksUrl: config.BFF_JWKS_URL,
      issuer: config.BFF_JWT_ISSUER,
      audience: config.BFF_JWT_AUDIENCE,
      ...options.identity
    })
  } else {
    app.decorate('identify', () => ANONYMOUS)
    // No identity, no roles: the gateway's own endpoints are open on a developer's machine and
    // closed in production, where nobody could prove the role they need.
    const production = config.NODE_ENV === 'production'
    app.decorate('requireRole', (role: string) => (_request, _reply, done) => {
      done(production ? new MantleError('FORBIDDEN', `identity is off: nobody holds the role ${role}`) : undefined)
    })
  }
  // After identity (the guard keys verified callers by tenant), before every route it guards.
  if (config.BFF_RATE_LIMIT_ENABLED) {
    await app.register(rateLimit, {
      store: rateLimitStore(config),
      globalMax: config.BFF_RATE_LIMIT_GLOBAL_MAX,
      globalWindowMs: config.BFF_RATE_LIMIT_GLOBAL_WINDOW_MS,
      perTenant: config.BFF_AUTH_ENABLED,
      preflights: config.BFF_CORS_ORIGINS !== undefined,
      internalToken: config.BFF_INTERNAL_TOKEN,
      ...options.rateLimit
    })
  }
  // What clients leave unread, HTTP answers and WebSocket frames of every face in one count, each
  // tenant a share of it (adapters/unread.ts). After identity, which names a request's tenant.
  const unread = options.unreadBytes === undefined ? defaultUnreadBytes(config.BFF_AUTH_ENABLED) : new UnreadBytes(options.unreadBytes.max, config.BFF_AUTH_ENABLED ? options.unreadBytes.perTenant : undefined)
  if (app.hasDecorator('metrics')) {
    new Gauge({ name: 'mantle_unread_bytes', help: 'Bytes of answers, tRPC SSE events and WebSocket frames the instance holds that its clients have not read yet (HTTP answers of 16 KiB or more, SSE events taken and not yet written out, and every frame, with 1 KiB for its queuing), against its bound of half the V8 heap limit', registers: [app.metrics.registry], collect () { this.set(unread.size) } }) // eslint-disable-line no-new
    // Every connection the HTTP server holds (WebSockets' included, and those lingering after an
    // answer that ended them): bounded in time by the request, headers and keep-alive timeouts
    // and ANSWER_STALL_MS, and in number by maxConnections (connection-bound.ts). Counted nowhere before: a client
    // holding thousands of idle keep-alive connections showed only as file descriptors.
    new Gauge({ name: 'mantle_http_connections', help: 'TCP connections the HTTP server holds open (WebSocket ones and lingering ones included)', registers: [app.metrics.registry], collect () { this.set(connections.size) } }) // eslint-disable-line no-new
    new Gauge({ name: 'mantle_compiled_schemas', help: `Schemas of operations compiled (input and answer checks, serializers) kept by their text for an operation that declares one again (a reload), at most ${COMPILED_SCHEMAS} and ${COMPILED_SCHEMA_TEXT} characters of schema text`, registers: [app.metrics.registry], collect () { this.set(compiledSchemas()) } }) // eslint-disable-line no-new
  }
  answerBounds(app, unread, (request) => {
    const authorization = requestAuthorization(request)
    try {
      return app.identify(authorization, request.raw).tenant
    } catch {
      return undefined
    }
  })
  if (config.BFF_AI_FIREWALL_ENABLED) await app.register(firewall, { cacheSize: config.BFF_FIREWALL_CACHE_SIZE, workers: config.BFF_FIREWALL_WORKERS })
  if (config.BFF_IDEMPOTENCY_ENABLED) {
    await app.register(idempotency, {
      store: storeFor(config, 'BFF_IDEMPOTENCY_STORE'),
      ttlSeconds: config.BFF_IDEMPOTENCY_TTL_SECONDS,
      maxKeys: config.BFF_IDEMPOTENCY_MAX_KEYS,
      maxKeysPerTenant: config.BFF_IDEMPOTENCY_REDIS_MAX_KEYS_PER_TENANT ?? config.BFF_IDEMPOTENCY_MAX_KEYS,
      waitMs: config.BFF_IDEMPOTENCY_WAIT_MS,
      ...options.idempotency
    })
  }
  // After identity (its admin routes use requireRole); its stage still runs outermost but metrics.
  if (config.BFF_AUDIT_ENABLED) {
    await app.register(audit, {
      store: config.BFF_AUDIT_STORE,
      databaseUrl: config.DATABASE_URL,
      production: config.NODE_ENV === 'production',
      retentionDays: config.BFF_AUDIT_RETENTION_DAYS,
      batchSize: config.BFF_AUDIT_BATCH_SIZE,
      queueMax: config.BFF_AUDIT_QUEUE_MAX,
      memoryMax: config.BFF_AUDIT_MEMORY_MAX,
      spoolDir: config.BFF_AUDIT_SPOOL_DIR,
      ...options.audit
    })
  }
  // After the rate-limit guard and the audit: both reach it through their onRoute hooks.
  if (config.BFF_DIAGZ_ENABLED) await app.register(diagzRoute)
  await app.register(kernel, {
    url: options.kernelUrl ?? config.KERNEL_URL,
    resilience: config.BFF_CIRCUIT_BREAKER_ENABLED,
    threshold: config.BFF_CIRCUIT_BREAKER_THRESHOLD,
    resetTimeoutMs: config.BFF_CIRCUIT_BREAKER_TIMEOUT,
    keepAliveTimeoutMs: config.BFF_KERNEL_KEEP_ALIVE_TIMEOUT_MS,
    ...(options.kernelBackoff === undefined ? {} : { backoff: options.kernelBackoff })
  })
  if (config.BFF_CACHE_ENABLED) {
    await app.register(cache, { store: storeFor(config, 'BFF_CACHE_STORE'), defaultTtlSeconds: config.BFF_CACHE_TTL, maxSize: config.BFF_CACHE_MAX_SIZE, maxBytes: config.BFF_CACHE_MAX_BYTES, maxBytesPerTenant: config.BFF_CACHE_REDIS_MAX_BYTES_PER_TENANT ?? config.BFF_CACHE_MAX_BYTES, now: options.cacheClock })
  }
  // A tenant's share of the instance's subscriptions: with identity off every caller is the one
  // tenant `public`, whose share would then only shrink the instance's bound.
  await app.register(events, {
    redisUrl: config.REDIS_URL,
    internalToken: config.BFF_INTERNAL_TOKEN,
    checkRoles: config.BFF_AUTH_ENABLED,
    maxSubscriptionsPerTenant: config.BFF_AUTH_ENABLED ? config.BFF_EVENTS_MAX_SUBSCRIPTIONS_PER_TENANT : undefined,
    ...options.events
  })
  if (config.BFF_OPENAPI_ENABLED) await app.register(openapi, { version: VERSION, secured: config.BFF_AUTH_ENABLED })
  await app.register(rest, { prefix: REST_PREFIX, secured: config.BFF_AUTH_ENABLED })
  await app.register(batch, { prefix: REST_PREFIX, maxCalls: config.BFF_BATCH_MAX_CALLS, secured: config.BFF_AUTH_ENABLED })
  const face: FaceOptions = {
    bodyLimit: config.BFF_BODY_LIMIT,
    maxCalls: config.BFF_BATCH_MAX_CALLS,
    maxDepth: config.BFF_GRAPHQL_MAX_DEPTH,
    introspection: config.BFF_GRAPHQL_INTROSPECTION ?? config.NODE_ENV !== 'production',
    secured: config.BFF_AUTH_ENABLED,
    development: config.NODE_ENV !== 'production',
    // As the events' share: with identity off every caller is the one tenant `public`.
    maxConnectionsPerTenant: config.BFF_AUTH_ENABLED ? config.BFF_WS_MAX_CONNECTIONS_PER_TENANT : undefined,
    // One count of what clients leave unread, for all three faces and HTTP answers.
    unread
  }
  // One WebSocket server for every face that upgrades (/ws, GraphQL and tRPC subscriptions).
  if (config.BFF_WEBSOCKET_ENABLED || config.BFF_GRAPHQL_ENABLED || config.BFF_TRPC_ENABLED) {
    await app.register(websocket, {
      // handleProtocols: /graphql answers the subprotocol it speaks among those offered (ws took
      // the first offered, and echoed one nobody speaks).
      options: { maxPayload: config.BFF_BODY_LIMIT, handleProtocols: chooseSubprotocol },
      preClose: closeWebSockets,
      // A frame ws refuses (too large, bad UTF-8) is the client's doing, and ws has already
      // closed with the right code: not a gateway error, or any client could fill the log.
      errorHandler: (err, socket, request) => {
        if (refusedByWs(err)) request.log.debug({ err }, 'websocket protocol error')
        else request.log.error({ err }, 'websocket error')
        socket.terminate()
      }
    })
    // Its 'upgrade' listener took every request offering an upgrade: those offering another
    // protocol (h2c) are served as plain HTTP again.
    servePlainUpgrades(app.server, config.BFF_BODY_LIMIT)
    // The 101 of an upgrade is written by ws, not through a reply: it gets the same headers here.
    const securityLines = Object.entries(SECURITY_HEADERS).map(([name, value]) => `${name}: ${value}`)
    app.websocketServer.on('headers', (headers: string[]) => { headers.push(...securityLines) })
    // A handshake ws refuses (no Sec-WebSocket-Key or a malformed one, a version other than 13 or
    // 8, a malformed Sec-WebSocket-Protocol or -Extensions): answered as every refusal is,
    // problem+json with a request id and the security headers, and counted. ws wrote a bare
    // text/html 400 of its own (found exploring the gateway).
    app.websocketServer.on('wsClientError', (err: Error, socket: Duplex, req: IncomingMessage) => {
      const version = /Sec-WebSocket-Version/i.test(err.message) ? 'Sec-WebSocket-Version: 13, 8\r\n' : ''
      const id = answerRaw(socket, 400, `The WebSocket handshake is refused: ${err.message}`, version, 'BAD_REQUEST', answeredId(req))
      lingeringClose(socket)
      refusedStraight(id, 'BAD_REQUEST', 400)
    })
  }
  if (config.BFF_TRPC_ENABLED) await app.register(trpc, face)
  if (config.BFF_GRAPHQL_ENABLED) await app.register(graphql, face)
  if (config.BFF_WEBSOCKET_ENABLED) await app.register(websocketFace, face)
  await app.register(health)
  return app
}

/** Whether the rate-limit plugin's HTTP guard is on (it then counts and answers CORS's preflights). */
const guardsRequests = (config: Readonly<Config>): boolean => config.BFF_RATE_LIMIT_ENABLED && config.BFF_RATE_LIMIT_GLOBAL_MAX !== undefined

/** Where the REST face and the batch route live (CONTRACT §3). */
const REST_PREFIX = '/api/v1'

/** The OTLP traces URL from the standard OpenTelemetry variables, or null: tracing off. */
export function tracesUrl (config: Readonly<Config>): string | null {
  if (config.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT !== undefined) return config.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
  if (config.OTEL_EXPORTER_OTLP_ENDPOINT !== undefined) return config.OTEL_EXPORTER_OTLP_ENDPOINT.replace(/\/+$/, '') + '/v1/traces'
  return null
}

/**
 * The request as logs show it. A query string carries a call's input (a REST query's fields,
 * tRPC's `input`, GraphQL's `query` and `variables`) and credentials (`?access_token=` on a
 * WebSocket upgrade or an EventSource, tRPC's `connectionParams`), and the default serializer
 * logs the raw URL, which redact paths cannot reach into. So does a REST path (its parameters
 * are input: a secret there was logged even when the firewall refused the call): such a route
 * is logged by its pattern, `/api/v1/search/:q`.
 */
export function requestForLog (req: FastifyRequest): Record<string, unknown> {
  const route = req.routeOptions
  let url = req.url
  // A target in absolute form (`GET http://user:pass@host/api/v1/... HTTP/1.1`), which the router
  // serves as its path, is read as its origin form: its credentials and host are never logged,
  // and the rules below apply to its path.
  if (url.charCodeAt(0) !== 47) url = originForm(url)
  // A path under the REST prefix that no route of its own took may hold the same input: only the
  // prefix is logged. So for a 404, a parameter over 256 characters (a 414), CORS's OPTIONS,
  // whose one route (`*`) takes every path (a preflight of `PUT /api/v1/agents/<id>` logged the
  // id), and a path whose slashes were doubled (a client's base URL ending in `/`: a 404 logged whole).
  const path = route?.config?.inputInPath === true && route.url !== undefined
    ? route.url
    : (route?.url === undefined || route.url === '*') && url.replace(SLASHES, '/').startsWith(REST_PREFIX + '/') ? REST_PREFIX + '/[redacted]' : null
  if (path !== null) {
    const q = url.indexOf('?')
    url = q === -1 ? path : path + url.slice(q)
  }
  return { method: req.method, url: cutForLog(redactUrl(url)), host: cutForLog(req.host), remoteAddress: req.ip, remotePort: req.socket?.remotePort }
}

/** Slashes in a row, which no route's path has. */
const SLASHES = /\/{2,}/g

/** The most characters of a request's URL or host that a log line holds (each may be ~16 KB). */
const LOGGED_TARGET_CHARS = 512
const CUT = '...[cut]'

/** `text` cut to LOGGED_TARGET_CHARS, marked as cut. */
function cutForLog (text: string): string {
  return text.length > LOGGED_TARGET_CHARS ? text.slice(0, LOGGED_TARGET_CHARS) + CUT : text
}

/** An absolute-form request target as its origin form (path and query); `[redacted]` if it is no URL. */
function originForm (target: string): string {
  try {
    const url = new URL(target)
    return url.pathname + url.search
  } catch {
    return '[redacted]'
  }
}

/**
 * The URL with every query value replaced by `[redacted]`: the parameters' names are kept (they
 * tell which face and options a call used), their values never (a call's input is never logged,
 * README "Logs"). A part with no `=` may be a value: it is replaced whole.
 */
export function redactUrl (url: string): string {
  const q = url.indexOf('?')
  if (q === -1 || q === url.length - 1) return url
  const parts = url.slice(q + 1).split('&').map(part => {
    const eq = part.indexOf('=')
    return eq === -1 ? (part === '' ? part : '[redacted]') : part.slice(0, eq) + '=[redacted]'
  })
  return url.slice(0, q + 1) + parts.join('&')
}

function errorHandler (err: FastifyError | MantleError | Error, request: FastifyRequest, reply: FastifyReply): void {
  const { problem, headers } = toProblem(err, request.id)
  const level = logLevelOf(problem, headers)
  // With the call's requestId, as every other face's lines (README, "Logs"): a query on it missed REST's.
  if (level === 'error') request.log.error({ err, requestId: problem.requestId }, 'unexpected error')
  else if (level === 'warn') request.server.callFailedLog.warn(request.log, request.routeOptions.config?.op ?? '-', problem.code, { code: problem.code, detail: detailForLog(err, problem), requestId: problem.requestId })
  if (headers !== null) reply.headers(headers)
  // A request answered on its connection already (a 408 for a body too slow) ends here as its
  // client's leaving: that answer was counted (clientErrorHandler), this one reaches no one.
  if (!answeredStraight.has(request.raw)) request.server.errorAnswered(problem.code, problem.status)
  reply.code(problem.status).type('application/problem+json').send(problem)
}
