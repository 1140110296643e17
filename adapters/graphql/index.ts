import type { FastifyInstance, FastifyRequest, FastifyReply } from 'fastify'
import mercurius from 'mercurius'
import { BREAK, Kind, NoSchemaIntrospectionCustomRule, getOperationAST, isInputType, parse, typeFromAST, validate, visit, type DocumentNode, type GraphQLInputObjectType, type GraphQLSchema, type OperationDefinitionNode, type GraphQLResolveInfo, type SelectionSetNode } from 'graphql'
// graphql-js's own field collection (16.x; no exports map, so its module is importable as is).
import { collectFields } from 'graphql/execution/collectFields.js'
import { AnswerBudget, MAX_ANSWER_CHARS, runCall, type FaceOptions } from '../face.js'
import { ErrorCodes, MantleError, shuttingDownRefusal } from '../../errors.js'
import { checkedUtf8 } from '../../json-body.js'
import { ConnectionSlots, UNIDENTIFIED_DEFAULTS, reportSlots } from '../connection-slots.js'
import { defaultUnreadBytes, type UnreadBytes } from '../unread.js'
import { callKey, idempotencyKeyOf, single } from '../rest/index.js'
import { buildSchema, inputsNamingInherited, withOwnFields } from './schema.js'
import { jsonLength, limitRules, subscriptionsOverHttp, MAX_FIELDS } from './limits.js'
import { errorFormatterOf, fieldError } from './errors.js'
import { createSubscriptions } from './subscriptions.js'
import { upgradeAuthorization } from '../upgrade.js'
import type { CacheOutcome } from '../../plugins/pipeline/index.js'

import type { WebSocket } from 'ws'
import type { IncomingMessage } from 'node:http'
import { withHook } from '../../route-hooks.js'
import { Heartbeat } from '../heartbeat.js'
import { countSlowReaderCuts, slowReaderCuts } from '../slow-reader.js'
import { clientRequestId } from '../../ids.js'
import { MAY_HOLD_FORBIDDEN_KEY, forbiddenKey, inheritedName } from '../../own-properties.js'

export { manifestSdl } from './schema.js'

// The GraphQL face (CONTRACT §3): /graphql over HTTP (GET and POST) with mercurius, and
// subscriptions over graphql-ws on the same path. It decodes GraphQL into calls and encodes
// their answers; every call runs through runCall, the one pipeline of every face.

/** Longest GraphQL document accepted (characters): mercurius caches parsed documents by text. */
export const MAX_QUERY_LENGTH = 65536
/** Tokens one document may hold: parsing stops beyond it (graphql-armor's default is 1,000). */
export const MAX_TOKENS = 2000
/**
 * How mercurius parses a document over HTTP: within MAX_TOKENS, and without `loc`. A parsed
 * document is kept in mercurius' caches, and with `loc` each node holds the lexer's tokens, all
 * of them linked: a document of 20,000 tokens kept 9.2 MB, and anonymous clients POSTing distinct
 * ones pinned gigabytes before any authentication. Syntax errors keep their `locations` (the
 * lexer's); validation and field errors have none.
 */
export const PARSE_OPTIONS = Object.freeze({ maxTokens: MAX_TOKENS, noLocation: true })
/**
 * Size of each of mercurius' two document caches (valid documents with their JIT, refused ones
 * with their errors), keyed by the document's text: a QuickLRU of maxSize S holds up to 2 S, so
 * at most 4 S documents are kept. At the bounds (MAX_TOKENS, MAX_QUERY_LENGTH of two-byte
 * characters), measured with `node --expose-gc` over /graphql: a refused document of 1,992
 * fields retains ~0.84 MB, a valid one with its JIT ~0.37 MB; so the caches hold at most
 * ~310 MB (2 S x 0.84 + 2 S x 0.37) whatever clients send. Documents that repeat stay cached.
 */
const DOCUMENT_CACHE = 128
const GRAPHQL_RESPONSE = 'application/graphql-response+json'
/** The media type of a body that is the document itself, as mercurius reads one. */
const GRAPHQL_BODY = /^\s*application\/graphql\s*(?:;|$)/i

/** One HTTP request's context: its calls share the memo; each gets `${request.id}.${n}`. */
interface RequestContext {
  requestId: string
  /** `requestId` is the client's own x-request-id (CallContext.clientRequestId). */
  clientRequestId: boolean
  authorization: string | undefined
  traceparent: string | undefined
  tracestate: string | undefined
  idempotencyKey: string | null | undefined
  memo: Map<string, Promise<unknown>>
  /**
   * The operation runs one root field (its call keeps the Idempotency-Key as sent, its response
   * carries its RateLimit-*); set by its first call with a key or with RateLimit-*.
   */
  oneCall?: boolean
  /** The document runs a mutation (its fields' errors past the answer's bound say they ran: see onResolution). */
  mutation?: boolean
  n: number
  /** The JSON size of the document's calls' inputs so far (bounded by the body limit). */
  inputChars: number
  /** Set by mercurius on HTTP requests. */
  reply?: FastifyReply
  /** A call over graphql-ws: its socket (the subscriptions' context). */
  connection?: { readonly socket: WebSocket }
  /** The response cache's outcome of each root field that had one, by response key. */
  cache?: Record<string, CacheOutcome>
  /** The bound on the document's answer, applied once it has run (onResolution below). */
  answer: AnswerBudget
  /** The request id of each root field's call that answered, by response key (its audit entry waits for the bound). */
  answered?: Map<string, string>
  /** The request's variables, taken out of it when the schema's input objects name inherited members (takeVariables). */
  variables?: Record<string, unknown>
}

export interface GraphqlFaceSettings {
  /**
   * A subscription socket that sends nothing (no connection_init) within this time is closed
   * with 4408; one initialised without a valid identity that no subscribe brings, with 4401.
   */
  initTimeoutMs: number
  /** WebSocket connections at /graphql on this instance; beyond it an upgrade gets 503 OVERLOADED. */
  maxConnections: number
  /** Ping interval of its sockets; one that has not answered the previous ping is dropped (as on /ws). */
  heartbeatMs: number
  /**
   * Connections at /graphql opened without a token and not identified yet (by connection_init):
   * on this instance, and from one client address; beyond either an upgrade without a token gets
   * 503 OVERLOADED. With identity off, not applied.
   */
  maxUnidentified: number
  maxUnidentifiedPerAddress: number
}

export const DEFAULT_SETTINGS: Readonly<GraphqlFaceSettings> = Object.freeze({
  initTimeoutMs: 10_000,
  maxConnections: 100_000,
  heartbeatMs: 30_000,
  maxUnidentified: UNIDENTIFIED_DEFAULTS.max,
  maxUnidentifiedPerAddress: UNIDENTIFIED_DEFAULTS.perAddress
})

/** What a root field's audit entry records when the bound on the answer left its result out. */
const LEFT_OUT = Object.freeze({ code: 'PAYLOAD_TOO_LARGE', status: 413 })

/** graphql-ws's own close code for a connection that never initialised. */
const CLOSE_INIT_TIMEOUT = 4408

/**
 * The upgrades this face's route took (its onRequest hook saw them): their sockets are screened.
 * Told apart by the route, not by the URL: with ignoreTrailingSlash, `/graphql/` is the same
 * route, and its sockets (compared by URL to `/graphql`) went unscreened, with no 4408 timer.
 */
const GRAPHQL_UPGRADES = new WeakSet<IncomingMessage>()

/** Whether an Accept header names application/graphql-response+json (in any case). */
const GRAPHQL_RESPONSE_NAMED = /application\/graphql-response\+json/i

/**
 * Whether `accept` asks for GraphQL over HTTP's own media type rather than application/json:
 * named (not by a wildcard), with a weight above 0 and at least application/json's (the most
 * specific of its ranges that match it: `application/json`, `application/*`, `*\/*`), as RFC 9110
 * §12.5.1 reads weights. A tie goes to it, as the spec asks clients to prefer it. Any mention
 * of it chose it, `;q=0` ("not acceptable") and a lower weight than application/json's too.
 * Read here: `negotiator` breaks a tie by the header's order (`application/json,
 * application/graphql-response+json` chose JSON), and @fastify/accept-negotiator reads no media
 * ranges. A header that does not name the type is not parsed at all.
 */
export function prefersGraphqlResponse (accept: string | undefined): boolean {
  if (accept === undefined || !GRAPHQL_RESPONSE_NAMED.test(accept)) return false
  let own = -1
  let json = -1
  let jsonRank = -1
  for (const range of accept.split(',')) {
    const [type = '', ...params] = range.split(';')
    const name = type.trim().toLowerCase()
    let q = 1
    for (const param of params) {
      const [key = '', value = ''] = param.split('=')
      if (key.trim().toLowerCase() === 'q') q = /^\s*(?:0(?:\.\d{0,3})?|1(?:\.0{0,3})?)\s*$/.test(value) ? Number(value) : 0
    }
    if (name === GRAPHQL_RESPONSE) own = Math.max(own, q)
    const rank = name === 'application/json' ? 2 : name === 'application/*' ? 1 : name === '*/*' ? 0 : -1
    if (rank > jsonRank) { jsonRank = rank; json = q } else if (rank >= 0 && rank === jsonRank) json = Math.max(json, q)
  }
  return own > 0 && own >= json
}

/** The WebSocket subprotocols mercurius speaks (graphql-ws's and the legacy subscriptions-transport-ws's). */
const SUBPROTOCOLS: ReadonlySet<string> = new Set(['graphql-transport-ws', 'graphql-ws'])

/** The first of `offered` that /graphql speaks (both the upgrade's check and ws's choice ask it). */
function spoken (offered: Iterable<string>): string | undefined {
  for (const protocol of offered) if (SUBPROTOCOLS.has(protocol)) return protocol
  return undefined
}

/**
 * ws's handleProtocols for the WebSocket server every face shares: an upgrade of /graphql gets
 * the first offered subprotocol it speaks (its onRequest hook refused an offer with none);
 * any other keeps ws's own choice, the first offered.
 */
export function chooseSubprotocol (protocols: Set<string>, request: IncomingMessage): string | false {
  if (!GRAPHQL_UPGRADES.has(request)) return protocols.values().next().value ?? false
  return spoken(protocols) ?? false
}

/** The GraphQL face with the given bounds; the default export uses the defaults. */
export function createGraphqlFace (settings: Partial<GraphqlFaceSettings> = {}) {
  const limits = { ...DEFAULT_SETTINGS, ...settings }
  return async function graphqlFace (app: FastifyInstance, opts: FaceOptions): Promise<void> {
    const slots = new ConnectionSlots('graphql', limits.maxConnections, opts.maxConnectionsPerTenant, { max: limits.maxUnidentified, perAddress: limits.maxUnidentifiedPerAddress })
    const unread = opts.unread ?? defaultUnreadBytes(opts.maxConnectionsPerTenant !== undefined)
    const guard = await graphqlAdapter(app, opts, slots, limits.initTimeoutMs)
    // mercurius keeps a socket that never sends connection_init open for ever: a client could
    // hold sockets at no cost. graphql-ws prescribes closing it with 4408 when no
    // connection_init came in time, whatever else did (a ping or a junk frame does not count).
    if (!app.hasDecorator('websocketServer')) return
    reportSlots(app, slots)
    // mercurius sends no keep-alive: a client that vanished kept its slot and its subscriptions
    // until its token expired (for ever with identity off).
    const heartbeat = new Heartbeat(limits.heartbeatMs)
    app.addHook('preClose', async () => { heartbeat.stop() })
    const cuts = slowReaderCuts(app, 'graphql')
    app.websocketServer.on('connection', (socket: WebSocket, request: IncomingMessage) => {
      if (!GRAPHQL_UPGRADES.has(request)) return
      countSlowReaderCuts(socket, cuts)
      const timer = setTimeout(() => socket.close(CLOSE_INIT_TIMEOUT, 'Connection initialisation timeout'), limits.initTimeoutMs)
      timer.unref()
      const disarm = (): void => clearTimeout(timer)
      // Before mercurius (the route's handler) listens to the socket; the screen reads each
      // message's type, and connection_init disarms the timer.
      const tcp = request.socket
      guard(socket, disarm, { unread, tenant: () => slots.ownerOf(tcp) }, request)
      // Runs before the guard's screen: a connection without a token may send little until one
      // identifies it.
      slots.screen(socket, tcp)
      heartbeat.watch(socket)
      socket.once('close', disarm)
    })
  }
}

export default createGraphqlFace()

/** Registers the face; answers the screen of each subscription socket's messages. */
/** `authTimeoutMs`: how long an initialised connection may stay without a valid identity. */
async function graphqlAdapter (app: FastifyInstance, opts: FaceOptions, slots: ConnectionSlots, authTimeoutMs: number): Promise<(socket: WebSocket, initialised: () => void, budget: { unread: UnreadBytes, tenant: () => string | undefined }, upgrade: IncomingMessage) => void> {
  // Introspection off (production's default): the schema, every operation, argument and type of
  // the manifest, is not handed to whoever asks; __typename stays (clients need it).
  const introspection = opts.introspection ?? opts.development
  // The face's limits, checked before graphql-js' own rules (limitRules), then those rules.
  const first = limitRules({ maxDepth: opts.maxDepth, maxRootFields: opts.maxCalls, maxFields: MAX_FIELDS })
  const rules = introspection ? [] : [NoSchemaIntrospectionCustomRule]
  const maxQuery = Math.min(MAX_QUERY_LENGTH, opts.bodyLimit)
  const subscriptions = createSubscriptions(app, { maxOperations: opts.maxCalls, first, rules, suggest: introspection, maxQuery, maxTokens: MAX_TOKENS, authTimeoutMs, claim: (request, tenant) => { slots.claim(request.raw.socket, tenant) } })
  // HTTP validation results are cached by mercurius per document, so this costs nothing per request.
  const overHttp = subscriptionsOverHttp()
  const httpRules = [...rules, overHttp.rule]
  const reached = app.hasDecorator('audit') ? app.audit.reached : null
  // With the audit on, each HTTP request's context, so that a document refused before any of its
  // fields ran is recorded (refusedDocument).
  const contexts = reached === null ? null : new WeakMap<FastifyRequest, RequestContext>()
  /**
   * A document over HTTP that mercurius refused before any of its fields ran (it does not parse
   * or validate, the face's limits, variables that do not fit, a subscription over HTTP) leaves
   * one entry, as a GraphQL request refused before its document is read does (`http`, category
   * `security`, the code and status the client got). Before, it left none: an argument REST
   * refuses VALIDATION_FAILED, recorded (`?limit=abc`), written in a document (`limit: "abc"`) is
   * refused by GraphQL's validation, and a caller probing an operation's input over GraphQL left no
   * trace. Never the document. A refusal for load is not recorded, as on every face.
   */
  const refusedDocument = function refusedDocument (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (err: null, payload: unknown) => void): void {
    const ctx = contexts?.get(request)
    if (ctx !== undefined) {
      contexts?.delete(request)
      if (ctx.n === 0 && reply.statusCode >= 400 && reply.statusCode < 500) app.audit.refused(request, reply, 'http', problemCode(payload), reply.statusCode)
    }
    done(null, payload)
  }

  const schema = buildSchema(app.pipeline.manifest, {
    operation: (op, toInput) => async (_source, args: Record<string, unknown>, ctx: RequestContext, info) => {
      const n = ctx.n++
      const input = toInput(args)
      const requestId = `${ctx.requestId}.${n}`
      const result = await runCall(app, {
        // A document's mutations run one after the other: those not begun when the shutdown
        // starts are refused (audited as such), lest the document outlive the grace and the
        // process be killed with a mutation carried out and neither answered nor audited. Inputs
        // over the body limit as JSON, the document's calls together, are refused: GraphQL makes
        // one value of a variable used many times ([$a, $a, ...]), which went on to the Kernel
        // once per use (a 57 KB request sent 144 MB; 50 calls of a 33 KB one, 48 MB).
        refusal: n > 0 && op.type === 'mutation' && app.shuttingDown()
          ? shuttingDownRefusal('mutation')
          : overInputBudget(ctx, input, opts.bodyLimit) ? new MantleError('PAYLOAD_TOO_LARGE', `The document's inputs are over the body limit (${opts.bodyLimit}) as JSON`) : undefined,
        requestId,
        reqId: ctx.requestId,
        clientRequestId: ctx.clientRequestId,
        protocol: 'graphql',
        op: op.name,
        input,
        authorization: ctx.authorization,
        traceparent: ctx.traceparent,
        tracestate: ctx.tracestate,
        // Each mutation field of a document of several is its own call: the key names the
        // field, as a batch's key names the call. A document of one field keeps the key as sent,
        // as REST does: a repeat over another face found no outcome under `<key> <field>`, and
        // the Kernel ran it again.
        idempotencyKey: ctx.idempotencyKey == null || (ctx.oneCall ??= runsOneField(info))
          ? ctx.idempotencyKey
          : callKey(ctx.idempotencyKey, String(info.path.key)),
        memo: ctx.memo,
        // Over HTTP the response, over graphql-ws the socket: a call whose caller left is cancelled.
        caller: ctx.reply?.raw ?? ctx.connection?.socket ?? null,
        answer: ctx.answer
      })
      if (op.type === 'mutation') ctx.mutation = true
      // A document of one operation field answers that call's RateLimit-* (also when it was
      // counted, then failed), as REST and a tRPC call alone do: it answered the HTTP guard's
      // while the operation's limit counted the call. A refusal's own (errorFormatter) have the
      // last word. So does it say a replay (Idempotent-Replayed), a replayed refusal's too: a
      // client retrying a keyed mutation could not tell the stored answer from a new run. A
      // document of several fields has no one call's to carry.
      const own = ctx.reply === undefined ? null : oneCallHeadersOf(result.ok ? result.headers : result.callHeaders, result.ok ? null : result.headers)
      if (own !== null && (ctx.oneCall ??= runsOneField(info)) && ctx.reply?.sent === false) ctx.reply.headers(own)
      if (result.ok) {
        (ctx.answered ??= new Map()).set(String(info.path.key), requestId)
        // Reported once the document has run (onResolution below).
        if (result.cache !== null && ctx.reply !== undefined) (ctx.cache ??= {})[String(info.path.key)] = result.cache
        return result.value
      }
      throw fieldError(result.problem, result.headers)
    },
    subscribe: subscriptions.subscribe
  })

  // Input object types with a field named as an Object.prototype member, which graphql-js and
  // graphql-jit read from a variable's object inherited when it is left out (withOwnFields): a
  // request's variables are then taken from it before mercurius checks them, and handed back,
  // such objects copied with their own fields only, by the preExecution hook below. Most
  // manifests have none, and their requests pay nothing.
  const inherited = inputsNamingInherited(schema)

  // A WebSocket upgrade beyond the instance's bound is refused at once (503), and so is one with
  // credentials when they are bad (a 401), or whose tenant holds its share of the connections
  // (503); without any, connection_init may still bring them (the share is then checked there).
  // mercurius offers no hook of its own before the upgrade (its verifyClient only applies to a
  // WebSocket server it registers itself; app.ts registers the one every face shares).
  const checkUpgrade = async (request: FastifyRequest): Promise<void> => {
    if (!request.ws) return
    // mercurius speaks graphql-transport-ws and graphql-ws, and takes none other (without its
    // wsDefaultSubprotocol, which the gateway leaves unset, not an upgrade offering none): it
    // accepted the upgrade, closed with 1002 and wrote a warn line and a console.log of its own.
    if (spoken((request.headers['sec-websocket-protocol'] ?? '').split(',').map(name => name.trim())) === undefined) {
      throw new MantleError('BAD_REQUEST', 'A WebSocket at /graphql speaks graphql-transport-ws or graphql-ws: offer one in Sec-WebSocket-Protocol')
    }
    GRAPHQL_UPGRADES.add(request.raw)
    slots.reserve(request)
    const authorization = upgradeAuthorization(request)
    if (authorization !== undefined) slots.claim(request.raw.socket, app.identify(authorization, request.raw).tenant)
    else slots.awaitIdentity(request)
  }
  app.addHook('onRoute', (route) => {
    // The face's routes stay out of the OpenAPI document, which describes REST.
    route.schema = { ...route.schema, hide: true }
    // A hook of the route, after the HTTP guard's (which goes first on every route), as on /ws
    // and /trpc. As a hook of this instance it ran before every route hook: forged-token
    // upgrades of /graphql were refused 401 without the guard counting them.
    if (route.url === '/graphql') {
      route.onRequest = withHook(route.onRequest, checkUpgrade)
      // First of the route's onSend hooks: it reads the code from the answer as the handler made
      // it. Last, it ran after compression's (a body over 1 KB, compressed, was read as no code)
      // and HEAD's (no body), and the entry said VALIDATION_FAILED beside a 413 or a 405.
      if (contexts !== null) route.onSend = withHook(route.onSend, refusedDocument, true)
    }
  })
  // GraphQL over HTTP's own media type, for clients that ask for it (the status codes are
  // already those it prescribes: 4xx for a refused document, 200 once calls ran).
  app.addHook('onSend', async (request, reply, payload) => {
    if (prefersGraphqlResponse(request.headers.accept) && String(reply.getHeader('content-type')).startsWith('application/json')) {
      reply.header('content-type', GRAPHQL_RESPONSE + '; charset=utf-8')
    }
    return payload
  })
  app.addHook('preValidation', async (request) => {
    if (!request.ws && request.routeOptions.url === '/graphql') checkRequest(request, maxQuery)
  })
  // An `application/graphql` body is mercurius's to parse (as text): its bytes are checked as
  // every JSON body's are, as they pass (json-body.ts).
  app.addHook('preParsing', async (request, _reply, payload) => {
    const type = request.headers['content-type']
    return type !== undefined && GRAPHQL_BODY.test(type) ? checkedUtf8(type, payload) : payload
  })

  await app.register(mercurius, {
    schema,
    path: '/graphql',
    // A token sent is checked before the body is read (a refused one is a 401); none may be
    // sent, for a document that calls no operation (`__typename`).
    additionalRouteOptions: { config: { identity: 'presented' } },
    jit: 1,
    cache: DOCUMENT_CACHE,
    graphiql: opts.development,
    validationRules: httpRules,
    graphql: { parseOptions: PARSE_OPTIONS },
    // Without introspection, graphql's suggestions of names near a misspelt one are left out.
    errorFormatter: errorFormatterOf(introspection),
    // Made where mercurius's handler begins: a document it refuses from here on (syntax,
    // validation) is the face's own answer, and its calls' refusals the audit stage's (Audit.reached).
    context: (request): RequestContext => {
      // mercurius makes a context for its error handler too: a request refused before its
      // handler (recorded by the audit then) or a second context of one is not looked at again.
      const first = reached?.(request) === true
      const ctx: RequestContext = {
        requestId: request.id,
        clientRequestId: clientRequestId(request.raw),
        authorization: request.headers.authorization,
        traceparent: single(request.headers.traceparent),
        tracestate: single(request.headers.tracestate),
        idempotencyKey: idempotencyKeyOf(request),
        memo: new Map(),
        answer: new AnswerBudget(),
        n: 0,
        inputChars: 0
      }
      if (first) contexts?.set(request, ctx)
      if (inherited.size > 0) ctx.variables = takeVariables(request)
      return ctx
    },
    subscription: app.pipeline.manifest.events.length === 0
      ? false
      // Event queues are the bus's streams, bounded (a slow subscriber loses the oldest events).
      : { context: subscriptions.context, onConnect: subscriptions.onConnect }
  })
  // The answer as the client gets it holds at most MAX_ANSWER_CHARS: root fields in order, a
  // field whose result would pass it answered null with PAYLOAD_TOO_LARGE. Measured on the result
  // as serialized, not on the calls' answers: identical query fields share one Kernel call, and
  // one field's selection may name a large value under many aliases (30 aliases of a 3 MB field,
  // one call, made a 94 MB answer from a request of under 1 KB). A mutation's result too, though
  // the mutation was carried out: selected once, it fits. Each field's audit entry then records
  // what was answered (AnswerBudget): the entries of those left out, PAYLOAD_TOO_LARGE.
  app.graphql.addHook('onResolution', async (execution, context) => {
    const { requestId, mutation, answer, answered } = context as unknown as RequestContext
    const data = execution.data as Record<string, unknown> | null | undefined
    if (data !== null && data !== undefined) {
      // What the walks may measure, fields left out included: each of those is walked up to the
      // room left, and 50 of them held the event loop for 23 s. Past it, fields are left out unmeasured.
      let walk = 2 * MAX_ANSWER_CHARS
      for (const key of Object.keys(data)) {
        if (data[key] === null) continue
        const size = walk <= 0 ? Infinity : jsonLength(data[key], answer.room())
        walk -= size
        if (answer.take(size)) continue
        data[key] = null
        // The field's own call's id (`<request id>.<n>`), as its audit entry and every other field error carry it.
        const call = answered?.get(key)
        const message = mutation === true
          ? `This mutation was carried out; its result would take the answer past ${MAX_ANSWER_CHARS} characters and is left out (select its fields once)`
          : `The answer would pass ${MAX_ANSWER_CHARS} characters: this field's result is left out, ask for it again`
        ;(execution as { errors?: unknown[] }).errors = [...(execution.errors ?? []), { message, path: [key], extensions: { code: 'PAYLOAD_TOO_LARGE', status: 413, requestId: call ?? requestId } }]
        if (call !== undefined) answer.decide(call, LEFT_OUT)
      }
    }
    // The fields answered as their calls ended.
    answer.release()
  })
  // The cache's outcomes, once every call of the document has run: a document of one call says
  // it in x-cache, as REST does; one of several has one header for them all, so each cached
  // field's outcome goes in the response's `extensions.cache`, by response key, instead.
  if (app.hasPlugin('mantle-cache')) {
    app.graphql.addHook('onResolution', async (execution, context) => {
      const { cache, n, reply } = context as unknown as RequestContext
      if (cache === undefined) return
      if (n === 1) reply?.header('x-cache', Object.values(cache)[0])
      else execution.extensions = { ...execution.extensions, cache }
    })
  }
  // mercurius keeps one compiled (JIT) form per document text, compiled for the operation the
  // request that reached the count named, and runs it for every later request of that text
  // whatever its operationName: with a document of a query and a mutation, the mutation ran for
  // a client that named the query (over GET and HEAD too, past the checks of the named one), and
  // two requests naming the mutation, refused for want of a token, chose it for everyone. A
  // document of several operations is handed back as its own modified form, which mercurius
  // never compiles; one of a single operation keeps the JIT.
  // Nor is one of more than JIT_MAX_FIELDS fields: compiling it costs more than running it ever
  // saves a client that sends it twice (any caller, before any token is looked at).
  // Nor is a document whose literals or variables the compiled form misreads (jitMisreads): a
  // variable inside a list or object literal, a text holding graphql-jit's markers (which ran as
  // JavaScript), an object key `__proto__`, a variable named as an Object.prototype member.
  // Nor is the request that names an operation the document does not define: the compiled form
  // ran its one operation whatever the name (mercurius checks it only with the request's
  // variables), so a request without any was refused on the text's first run and answered 200
  // once it was compiled. graphql-js refuses it, on every run.
  const compilable = (document: DocumentNode, name: string | undefined): boolean => {
    let operation: OperationDefinitionNode | undefined
    for (const definition of document.definitions) {
      if (definition.kind !== Kind.OPERATION_DEFINITION) continue
      if (operation !== undefined) return false
      operation = definition
    }
    if (name !== undefined && name !== operation?.name?.value) return false
    return !jitMisreads(document) && fieldsOf(document) <= JIT_MAX_FIELDS
  }
  // The variables taken from the request (takeVariables) are handed back here, their input
  // objects read as their own fields.
  app.graphql.addHook('preExecution', async (schema, document, context) => {
    const ctx = context as unknown as RequestContext
    const name = operationNameOf(ctx.reply?.request)
    overHttp.refuseSelected(document, name)
    const variables = ctx.variables === undefined ? undefined : ownFieldsOf(schema, document, name, ctx.variables, inherited)
    if (!compilable(document, name)) return { document, variables }
    if (variables !== undefined) return { variables }
  })
  // The face's limits before graphql-js' validation (mercurius runs this hook on a document it has
  // not cached, right before): a document they refuse is answered with their errors alone, and
  // never costs graphql-js' rules (OverlappingFieldsCanBeMerged took 200 ms on a 4.6 KB document
  // of 660 `x: id` / `x: name`, any caller, each text anew). Such a document is not cached:
  // parsed again when sent again, and refused again by these cheap walks.
  app.graphql.addHook('preValidation', async (schema, document) => {
    const errors = validate(schema, document, first)
    if (errors.length > 0) throw Object.assign(new Error('Graphql validation error'), { errors, statusCode: 400 })
  })
  app.graphql.addHook('preSubscriptionExecution', subscriptions.preSubscriptionExecution)
  app.graphql.addHook('onSubscriptionEnd', subscriptions.onSubscriptionEnd)
  return subscriptions.guard
}

/**
 * The envelope of an HTTP request, before mercurius reads it: a `query` string within bounds,
 * and `extensions: null` taken as absent (GraphQL over HTTP allows null; mercurius' schema not).
 */
function checkRequest (request: FastifyRequest, maxQuery: number): void {
  let params: Record<string, unknown>
  if (request.method === 'GET' || request.method === 'HEAD') {
    params = request.query as Record<string, unknown>
  } else {
    // A POST's parameters are its body's (mercurius reads nothing else): `variables` in its URL,
    // express-graphql's convention beside an `application/graphql` body, were dropped unread,
    // and the mutation ran with its arguments unset. Another URL parameter is let be.
    const url = request.query as Record<string, unknown>
    if (url.query !== undefined || url.variables !== undefined) throw new MantleError('VALIDATION_FAILED', 'A POST carries its `query` and `variables` in its body, not the URL: send them in the JSON body (or the document as an application/graphql body, with no variables)')
    const body = request.body
    if (body === null || typeof body !== 'object' || Array.isArray(body)) throw new MantleError('VALIDATION_FAILED', 'The body must be a JSON object')
    params = body as Record<string, unknown>
    if (params.extensions === null) delete params.extensions
  }
  const query = params.query
  if (typeof query !== 'string' || query === '') throw new MantleError('VALIDATION_FAILED', 'The request needs a `query` string holding a GraphQL document')
  if (query.length > maxQuery) throw new MantleError('PAYLOAD_TOO_LARGE', `The GraphQL document is longer than ${maxQuery} characters`)
  if (isJsonText(query)) throw new MantleError('VALIDATION_FAILED', 'The `query` must be a GraphQL document')
  // No operation has the empty name, so it names none (GraphQL's GetOperation: a request error).
  // graphql-js refused it on a text's first run over POST, and the form graphql-jit compiled on
  // its second ran the anonymous operation: the same request got a 400, then a 200.
  if (params.operationName === '') throw new MantleError('VALIDATION_FAILED', NO_SUCH_OPERATION)
  if (request.method === 'GET' || request.method === 'HEAD') checkGetOperation(query, params.operationName, request.method)
  // Checked before Fastify's schema, which would coerce a number or a boolean to a string.
  if (params.operationName !== undefined && params.operationName !== null && typeof params.operationName !== 'string') {
    throw new MantleError('VALIDATION_FAILED', '`operationName` must be a string')
  }
  for (const key of ['variables', 'extensions'] as const) {
    let value = params[key]
    // Over GET they are JSON text, which mercurius parses and then runs with whatever it is:
    // `variables="d1"` was a 500 (found by `npm run fuzz`). Text that is not JSON is a 400.
    if (request.method !== 'POST') {
      // An empty one is none (a URL built with no variables): mercurius handed `variables=` to
      // graphql-js's execute as the text '', which it asserts against, a 500 on a document's
      // first run (graphql-jit, compiled from the second, read it as none).
      if (value === '') {
        delete params[key]
        continue
      }
      if (typeof value !== 'string') continue
      // Refused here, naming the parameter: mercurius's refusal said "The body is not valid JSON".
      try { value = JSON.parse(value) } catch { throw new MantleError('VALIDATION_FAILED', `\`${key}\` is not valid JSON`) }
    }
    if (value !== undefined && value !== null && (typeof value !== 'object' || Array.isArray(value))) throw new MantleError('VALIDATION_FAILED', `\`${key}\` must be a JSON object`)
  }
}

// How a JSON text may begin (JSON whitespace, then a value); a GraphQL document never does:
// it opens with a keyword other than true/false/null, `#`, or `{` followed by a name.
const JSON_START = /^[ \t\r\n]*(?:[[\d"-]|true|false|null|\{[ \t\r\n]*["}])/

/**
 * Whether `query` is JSON. mercurius takes a query that is not GraphQL but parses as JSON for a
 * ready-made AST and hands it to validation, which throws on it (a 500 on `"query":"true"`,
 * found by `npm run fuzz`). No GraphQL document is valid JSON, so such a query is refused.
 */
function isJsonText (query: string): boolean {
  if (!JSON_START.test(query)) return false
  try {
    JSON.parse(query)
    return true
  } catch {
    return false
  }
}

const NO_SUCH_OPERATION = 'The document defines no operation of that `operationName`'

/**
 * The variables of an HTTP request, taken out of it: mercurius checks them with graphql-js before
 * the preExecution hook runs, and graphql-js reads an input object's fields inherited members
 * included. POST's object; GET's JSON text parsed, unless it is not JSON or holds a key
 * secure-json-parse (mercurius' parser) refuses, which is left for mercurius to refuse.
 */
function takeVariables (request: FastifyRequest): Record<string, unknown> | undefined {
  const params = paramsOf(request) as { variables?: unknown }
  let value = params.variables
  if (typeof value === 'string' && request.method !== 'POST') {
    try {
      value = JSON.parse(value)
    } catch {
      return undefined
    }
    if (MAY_HOLD_FORBIDDEN_KEY.test(params.variables as string) && value !== null && typeof value === 'object' && forbiddenKey(value)) return undefined
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return undefined
  params.variables = undefined
  return value as Record<string, unknown>
}

/** `variables` with the input objects of `types` each holds copied with their own fields only (withOwnFields), by the named operation's definitions. */
function ownFieldsOf (schema: GraphQLSchema, document: DocumentNode, name: string | undefined, variables: Record<string, unknown>, types: ReadonlySet<GraphQLInputObjectType>): Record<string, unknown> {
  const operation = getOperationAST(document, name)
  if (operation == null) return variables
  const out = { ...variables }
  for (const definition of operation.variableDefinitions ?? []) {
    const variable = definition.variable.name.value
    const type = typeFromAST(schema, definition.type)
    if (Object.hasOwn(variables, variable) && type !== undefined && isInputType(type)) out[variable] = withOwnFields(variables[variable], type, types)
  }
  return out
}

/** The `operationName` an HTTP request names (checkRequest refused one that is not a string), or undefined. */
function operationNameOf (request: FastifyRequest | undefined): string | undefined {
  if (request === undefined) return undefined
  const name = (paramsOf(request) as { operationName?: unknown } | null | undefined)?.operationName
  return typeof name === 'string' ? name : undefined
}

/** An HTTP request's GraphQL parameters: POST's body, else the query string. */
function paramsOf (request: FastifyRequest): unknown {
  return request.method === 'POST' ? request.body : request.query
}

/**
 * Over GET, mercurius looks up the operation to run (to refuse a mutation) without checking that
 * there is one: an `operationName` the document does not define, or several operations and no
 * name, made it throw, a 500 (found by `npm run fuzz`). Checked here first; a document that does
 * not parse is left to mercurius, which reports the syntax error.
 */
function checkGetOperation (query: string, operationName: unknown, method: string): void {
  let document: DocumentNode
  try {
    document = parse(query, PARSE_OPTIONS)
  } catch {
    return
  }
  // The name as mercurius will look it up (a non-string one was refused above).
  const name = typeof operationName === 'string' ? operationName : undefined
  const operation = getOperationAST(document, name)
  if (operation == null) {
    throw new MantleError('VALIDATION_FAILED', name === undefined
      ? 'The document does not define exactly one operation: name one in `operationName`'
      : NO_SUCH_OPERATION)
  }
  // Only a query over a safe method. mercurius refuses a mutation over GET, but not over HEAD,
  // which Fastify serves by the GET route: HEAD /graphql?query=mutation... ran the mutation.
  // A 405 names the method that serves it (RFC 9110: its Allow header is a MUST).
  if (operation.operation !== 'query') throw new MantleError('BAD_REQUEST', `Operation cannot be performed via a ${method} request`, { status: 405, headers: { allow: 'POST' } })
}

// Per document: mercurius keeps one parsed document per text, so each is walked once.
const misread = new WeakMap<DocumentNode, boolean>()

/**
 * Most fields (fragments counted each time they are spread) of a document mercurius compiles
 * with graphql-jit. Compiling is paid once per document text, on its second request, by whoever
 * sends it: a document of 50 root fields each spreading a fragment of 19 (1,000 fields, 1.4 KB)
 * cost 20-50 ms of CPU to compile, 190 fields 6-7 ms. Larger documents run uncompiled.
 */
export const JIT_MAX_FIELDS = 200
const fieldCounts = new WeakMap<DocumentNode, number>()

/** The fields of `document`'s operations, fragments counted each time they are spread (it has passed validation: no cycles). */
function fieldsOf (document: DocumentNode): number {
  let total = fieldCounts.get(document)
  if (total !== undefined) return total
  const fragments = new Map<string, SelectionSetNode>()
  for (const definition of document.definitions) {
    if (definition.kind === Kind.FRAGMENT_DEFINITION) fragments.set(definition.name.value, definition.selectionSet)
  }
  const memo = new Map<string, number>()
  const count = (set: SelectionSetNode): number => {
    let n = 0
    for (const selection of set.selections) {
      if (selection.kind === Kind.FIELD) n += 1 + (selection.selectionSet === undefined ? 0 : count(selection.selectionSet))
      else if (selection.kind === Kind.INLINE_FRAGMENT) n += count(selection.selectionSet)
      else {
        const name = selection.name.value
        let m = memo.get(name)
        if (m === undefined) {
          memo.set(name, 0)
          const fragment = fragments.get(name)
          m = fragment === undefined ? 0 : count(fragment)
          memo.set(name, m)
        }
        n += m
      }
    }
    return n
  }
  total = 0
  for (const definition of document.definitions) {
    if (definition.kind === Kind.OPERATION_DEFINITION) total += count(definition.selectionSet)
  }
  fieldCounts.set(document, total)
  return total
}

/**
 * graphql-jit's markers of the values JSON cannot carry (`"__MAGIC_NAN__<uuid>"`, Infinity's,
 * -Infinity's, `"__MAGIC_DATE__<uuid><time>"`): it writes an argument's literal into the source it
 * compiles as JSON, then replaces each marker, wherever it is, with code.
 */
const JIT_MARKER = '__MAGIC_'

/**
 * Whether graphql-jit's compiled form of `document` would misread its literals, which it writes
 * into the JavaScript it compiles (such a document runs uncompiled, as graphql-js reads it):
 * - a variable inside a list or object literal (`[$a, $a]`, `{k: $a}`): the compiled form read
 *   the literal once, without the variables, and from the second request on the Kernel received
 *   `[null, null]` and `{}` for what the client sent;
 * - a text, enum value or object key holding a marker (JIT_MARKER): `"__MAGIC_DATE__<uuid>" + s`
 *   became `new Date(s)` in the source, `s` being the client's own text: any caller, without a
 *   token, ran JavaScript in the gateway by sending such an argument twice;
 * - an object key `__proto__` (in a `JSON` argument or a variable's default): the source's
 *   `{"__proto__": …}` set the object's prototype, where graphql-js keeps an own key, which the
 *   pipeline refuses as on every face: compiled, the key was dropped, the Kernel got `{}`, and
 *   the pipeline's checks read its members as the object's (inherited ones);
 * - a variable named as a member of Object.prototype (`$constructor`, `$toString`): the compiled
 *   form reads a variable from the request's without asking whether it is their own, and one
 *   left out was the inherited function (a 400, "String cannot represent a non string value");
 * - a directive's argument given by a variable of a nullable type with a default
 *   (`@skip(if: $v)`, `$v: Boolean = true`): sent as null, graphql-js refuses it (a 400, or the
 *   field's VALIDATION_FAILED below the root), and the compiled form left the field out, a 200:
 *   the same request was answered two ways, before and after the text was compiled.
 */
function jitMisreads (document: DocumentNode): boolean {
  let found = misread.get(document)
  if (found === undefined) {
    found = false
    let depth = 0
    // Variables of a nullable type with a default (`$v: Boolean = true`), which may stand in a
    // directive's `if: Boolean!`: graphql-jit reads one sent as null as false for @include and
    // for @skip (it compiles `$v === true`, `$v === false`), where graphql-js refuses the null.
    let defaulted: Set<string> | null = null
    for (const definition of document.definitions) {
      if (definition.kind !== Kind.OPERATION_DEFINITION) continue
      for (const variable of definition.variableDefinitions ?? []) {
        if (variable.defaultValue !== undefined && variable.type.kind !== Kind.NON_NULL_TYPE) (defaulted ??= new Set()).add(variable.variable.name.value)
      }
    }
    const nullable = defaulted
    const stop = (): typeof BREAK => {
      found = true
      return BREAK
    }
    visit(document, {
      ListValue: { enter () { depth++ }, leave () { depth-- } },
      ObjectValue: { enter () { depth++ }, leave () { depth-- } },
      Variable () { return depth === 0 ? undefined : stop() },
      StringValue (node) { return node.value.includes(JIT_MARKER) ? stop() : undefined },
      EnumValue (node) { return node.value.includes(JIT_MARKER) ? stop() : undefined },
      ObjectField (node) { return node.name.value === '__proto__' || node.name.value.includes(JIT_MARKER) ? stop() : undefined },
      VariableDefinition (node) { return inheritedName(node.variable.name.value) ? stop() : undefined },
      Directive (node) {
        if (nullable === null) return undefined
        for (const argument of node.arguments ?? []) {
          if (argument.value.kind === Kind.VARIABLE && nullable.has(argument.value.name.value)) return stop()
        }
        return undefined
      }
    })
    misread.set(document, found)
  }
  return found
}

/**
 * Whether the operation runs one root field, judged as the executor collects them: fragments
 * followed, @skip and @include applied with the request's variables, fields of one response key
 * merged, `__typename` left out (no call). Judged by the syntax of the root selection set, a
 * lone field inside a fragment, or beside a skipped field or `__typename`, took a derived key.
 */
function runsOneField (info: GraphQLResolveInfo): boolean {
  const fields = collectFields(info.schema, info.fragments, info.variableValues, info.parentType, info.operation.selectionSet)
  let calls = 0
  for (const [field] of fields.values()) {
    if (!field.name.value.startsWith('__') && ++calls > 1) return false
  }
  return calls === 1
}

/**
 * What a document of one call answers of that call's header fields, or null for none: its
 * RateLimit-* (`headers`, the call's), and Idempotent-Replayed from them or from its refusal's
 * (`refusal`: a replayed refusal carries it there).
 */
function oneCallHeadersOf (headers: Record<string, string> | null | undefined, refusal: Record<string, string> | null | undefined): Record<string, string> | null {
  let own: Record<string, string> | null = null
  if (headers != null) {
    for (const name in headers) {
      if (name.length > 10 && name.slice(0, 10).toLowerCase() === 'ratelimit-') (own ??= {})[name] = headers[name]
    }
  }
  if (headers?.['idempotent-replayed'] === 'true' || refusal?.['idempotent-replayed'] === 'true') (own ??= {})['idempotent-replayed'] = 'true'
  return own
}

/**
 * Whether `input` takes the inputs of the document's calls so far past `limit` as JSON (counted
 * in `ctx.inputChars`; the walk stops past what is left).
 */
function overInputBudget (ctx: RequestContext, input: unknown, limit: number): boolean {
  const left = limit - ctx.inputChars
  const size = jsonLength(input, left)
  if (size > left) return true
  ctx.inputChars += size
  return false
}

/** The contract code of the first error of a GraphQL answer's text (`VALIDATION_FAILED` when it names none). */
function problemCode (payload: unknown): string {
  if (typeof payload === 'string') {
    try {
      const code = (JSON.parse(payload) as { errors?: Array<{ extensions?: { code?: unknown } }> }).errors?.[0]?.extensions?.code
      if (typeof code === 'string' && Object.hasOwn(ErrorCodes, code)) return code
    } catch {}
  }
  return 'VALIDATION_FAILED'
}
