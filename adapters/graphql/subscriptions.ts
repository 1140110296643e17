import { uuidv7 } from '../../ids.js'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { WebSocket } from 'ws'
import type { IncomingMessage } from 'node:http'
import { GraphQLError, Kind, SingleFieldSubscriptionsRule, getOperationAST, getVariableValues, locatedError, parse, responsePathAsArray, specifiedRules, validate, type DocumentNode, type FragmentDefinitionNode, type SelectionNode, type GraphQLFieldResolver, type GraphQLFormattedError, type GraphQLSchema, type ValidationRule } from 'graphql'
import { collectFields } from 'graphql/execution/collectFields.js'
import type { EventDefinition } from '../../manifest.js'
import type { Identity, KeyLease } from '../../plugins/auth/index.js'
import type { MessageGuard } from '../../plugins/rate-limit/index.js'
import { ErrorCodes, MantleError, toProblem, type ErrorCode } from '../../errors.js'
import { fieldError, withoutSuggestion } from './errors.js'
import { MAX_BUFFERED_BYTES, slowReader, utf8Sends } from '../slow-reader.js'
import type { UnreadBytes } from '../unread.js'
import { upgradeAuthorization } from '../upgrade.js'
import { CLOSE_TRY_AGAIN_LATER } from '../connection-slots.js'
import { atExpiry } from '../expiry.js'
import { decisions, messageGuardOf, type Decision } from '../face.js'
import { clientAddress } from '../../address.js'
import { forbiddenKey, MAY_HOLD_FORBIDDEN_KEY } from '../../own-properties.js'
import { MAX_ID_LENGTH } from '../websocket/frames.js'

// Subscriptions ride on mercurius' graphql-ws server (`subscription` option). What this module
// adds: identity per connection, event streams from the events plugin's bus scoped to the
// caller's tenant, validation of subscription documents with the same rules as HTTP, and bounds
// (subscriptions per connection, one subscriber per id, one connection_init, token expiry).

/** A connection_init payload's `authorization` (not a string: '', refused); undefined: none. */
function initAuthorization (payload: unknown): string | undefined {
  if (payload === null || typeof payload !== 'object' || !('authorization' in payload)) return undefined
  const authorization = (payload as { authorization: unknown }).authorization
  return typeof authorization === 'string' ? authorization : ''
}

/**
 * What the guard knows of a socket's subscriptions before mercurius has set them up. mercurius
 * starts a subscription without waiting for it (its hooks, then graphql's subscribe()), and
 * reads the next message meanwhile: a `complete` in the same read as its `subscribe` came while
 * the operation was not there yet, and was lost (mercurius' own handling of it also runs before
 * the subscription exists). Such a `complete` is held here instead, and the subscription ends
 * as soon as it starts. `cancelled` and `ending` hold at most twice the connection's bound of ids.
 */
interface Early {
  /**
   * Ids of subscribes the guard let through that have not reached preSubscriptionExecution, nor
   * been completed by the client. At most the connection's bound of ids.
   */
  starting: Set<string>
  /** Ids the client completed while they were being set up. */
  cancelled: Set<string>
  /**
   * Ids the client completed whose mercurius loop has not ended yet (running, or still being set
   * up: in `cancelled`, ended as it starts), each with the `subscribe`
   * of the same id the client sent meanwhile, held (null: none). The loop ends a moment after
   * the client's complete, sends its own `complete` and then lets go of whatever iterator it holds
   * under that id: a subscribe of the id handed on before then had its new subscription ended
   * (and a `complete` sent for it). That `complete` is not sent (graphql-ws' own server sends
   * none after the client's), and the held subscribe is handed on once mercurius is done.
   */
  ending: Map<string, Buffer | null>
  /** Hands mercurius a message past the guard. */
  deliver: (message: Buffer) => void
  /** The `authorization` of the connection_init the guard let through (undefined: none). */
  init: string | undefined
}
const early = new WeakMap<WebSocket, Early>()

/** A subscription that ends before its first event (one the client completed while it started). */
const ENDED: AsyncIterableIterator<unknown> = {
  async next () { return { done: true, value: undefined } },
  async return () { return { done: true, value: undefined } },
  [Symbol.asyncIterator] () { return this }
}

/**
 * A subscription refused: a stream whose first `next()` rejects with the refusal. mercurius sends
 * it to the client as it sends a thrown one (an `error` message, the same payload), but a
 * resolver that throws makes graphql's subscribe() answer `{ errors }`, which mercurius also
 * logs whole at level error, one unnamed line per refusal: every client's FORBIDDEN,
 * UNAUTHENTICATED or OVERLOADED, with the text it chose (a token's `kid`), as often as it sends
 * `subscribe` messages. Refusals are the client's answer, not the gateway's errors (a gateway
 * bug, INTERNAL, is logged by the resolver itself).
 */
function refusedStream (error: GraphQLError): AsyncIterableIterator<never> {
  return {
    async next () { throw error },
    async return () { return { done: true, value: undefined } },
    [Symbol.asyncIterator] () { return this }
  }
}

/**
 * The close of a connection whose identity ended (its first accepted token expired, or the JWKS
 * withdrew the key of one of its tokens): graphql-transport-ws' 4403 Forbidden, the server's
 * refusal of a connection's credentials, which graphql-ws' client retries, asking its
 * connectionParams again (a fresh token), and then subscribes its sinks again. It was 4401, which
 * that client takes for fatal: at each token's expiry every subscription failed with the close,
 * and the client never reconnected. A connection that never had a valid identity still closes
 * with 4401: the same credentials again would be refused again.
 */
const CLOSE_IDENTITY_ENDED = 4403
/** graphql-transport-ws' close of a connection_init whose credentials are refused (see the guard). */
const CLOSE_FORBIDDEN = 4403

/** One graphql-ws connection: its credentials, its operations as mercurius holds them, its expiry. */
export class GraphqlConnection {
  /**
   * Operation ids mercurius keeps for this connection: a running stream's controller, or null
   * for one being set up (a failed one is let go once its error is out: `failed`). Bounded.
   */
  readonly operations = new Map<string, AbortController | null>()
  /** Cancels the one timer pending: the wait for a valid identity (open), then the expiry. */
  private cancelTimer: (() => void) | null = null
  /** The earliest expiry of the tokens the connection accepted (ms; Infinity: none). */
  private expiresAt = Infinity
  /**
   * The JWKS keys of the tokens it accepted, each with the remover of its withdrawal listener:
   * the connection ends when any of them is withdrawn, as when the first of its tokens expires.
   * Bounded by the keys the JWKS has published (a token of an unknown key is refused).
   */
  private readonly leases = new Map<KeyLease, () => void>()
  /** The caller the first accepted token named: every later one must name the same. */
  private caller: { tenant: string, user: string } | null = null
  private closed = false
  /**
   * UTF-8 bytes of the events its subscriptions have queued and mercurius has not taken yet (and
   * of those they lost meanwhile): mercurius waits for each frame to be written before it takes
   * the next, so what its client has not read waits there, not on the socket.
   */
  private backlog = 0
  /**
   * Set while the guard counts, on Redis, a subscribe of a connection that speaks for no one yet
   * (one that brings its first token): it settles once that subscribe has been decided.
   */
  firstCount: Promise<void> | null = null

  /**
   * @param claim counts the connection against its tenant (see SubscriptionSettings.claim)
   * @param upgrade the upgrade's request: a token refused for the connection is refused again
   *   without another signature check (app.identify keeps the last one, for that token only)
   * @param address the upgrade's client address (clientAddress): the HTTP guard's key for its
   *   subscribes while it speaks for no one, or with identity off ('' without a guard)
   */
  constructor (readonly socket: WebSocket, readonly upgradeAuthorization: string | undefined, private readonly claim: (tenant: string) => void = () => {}, private readonly upgrade?: IncomingMessage, readonly address = '') {
    socket.once('close', () => this.dispose())
  }

  /**
   * Once connection_init is in, its credentials (`own`: connection_init's, else the upgrade's)
   * are verified and their expiry timed (over graphql-transport-ws, connection_init's own were
   * verified by the guard first: refused, the socket was closed with 4403 and never got here). A
   * connection left without a valid identity (none, or refused) is closed with 4401 after
   * `authTimeoutMs`, unless a subscribe brings one first
   * (mercurius' connectionInit extension); one that does subscribe with bad credentials gets the
   * reason, then 4401, as before. Before, only a subscribe read them: a socket that never
   * subscribed stayed open for ever, anonymous, forged or expired, holding one of the face's
   * connection slots (the tRPC face closes such a socket the same way).
   */
  open (app: FastifyInstance, own: string | undefined, authTimeoutMs: number): void {
    try {
      this.accept(app.identify(own, this.upgrade))
    } catch {
      if (this.closed) return
      const timer = setTimeout(() => {
        if (this.caller === null) this.close(4401, 'Unauthorized')
      }, authTimeoutMs)
      timer.unref()
      this.cancelTimer = () => clearTimeout(timer)
    }
  }

  /**
   * Verifies a subscription's token (cached by the identity plugin). mercurius lets each
   * `subscribe` message carry its own credentials: they must name the connection's tenant and
   * user (those of its own credentials, `own`: connection_init's, else the upgrade's; with none,
   * those of its first subscription), as /ws's `auth` frame must, and the connection ends (4403)
   * when the first of the tokens it accepted expires.
   */
  identify (app: FastifyInstance, authorization: string | undefined, own: string | undefined): Identity {
    // With the upgrade's request: the subscribes sent before a refused connection_init's 4401
    // took effect checked its token again, each (51 checks for 50 subscribes in one read).
    if (this.caller === null && own !== undefined && own !== authorization) this.accept(app.identify(own, this.upgrade))
    return this.accept(app.identify(authorization, this.upgrade))
  }

  /** The tenant and user the connection speaks for: its first accepted token's (null: none yet). */
  get speaksFor (): { tenant: string, user: string } | null {
    return this.caller
  }

  private accept (identity: Identity): Identity {
    if (this.caller === null) {
      // The connection counts against its tenant from its first identity on (its upgrade's
      // token, when it had one, was counted then). Beyond the tenant's share it is closed with
      // 1013 (try again later), as one too far behind is: the refusal is the close's reason, and
      // a subscribe that brought the identity gets it too.
      try {
        this.claim(identity.tenant)
      } catch (err) {
        this.close(CLOSE_TRY_AGAIN_LATER, (err as Error).message)
        throw err
      }
      this.caller = { tenant: identity.tenant, user: identity.user }
    } else if (identity.tenant !== this.caller.tenant || identity.user !== this.caller.user) {
      throw new MantleError('FORBIDDEN', 'A subscription\'s token must be for the same tenant and user as the connection')
    }
    if (identity.expiresAt < this.expiresAt) {
      this.expiresAt = identity.expiresAt
      this.armExpiry()
    }
    const lease = identity.lease
    if (lease !== undefined && !this.closed && !this.leases.has(lease)) {
      this.leases.set(lease, lease.onWithdrawn(() => this.close(CLOSE_IDENTITY_ENDED, 'Forbidden: the token\'s signing key was withdrawn')))
    }
    return identity
  }

  /** Times the earliest expiry (4403), in place of the timer pending (the wait, or a later expiry). */
  private armExpiry (): void {
    if (this.closed) return
    this.cancelTimer?.()
    this.cancelTimer = atExpiry(this.expiresAt, () => this.close(CLOSE_IDENTITY_ENDED, 'Forbidden: the token has expired'))
  }

  /**
   * Lets go of an operation that failed, once its `error` message is out (mercurius sends it in
   * this same turn of the event loop). In graphql-transport-ws an `error` ends the operation, and
   * graphql-ws' client never completes one after it: failed ids were held until the bound closed
   * the connection (1008), its running subscriptions with it. mercurius keeps state per id too
   * (a queue) until a `complete`, so it is handed one, as if from the client but past the guard,
   * and runs onSubscriptionEnd (the id leaves `operations`) and frees its own. `rawId` as
   * mercurius has it: its maps are keyed by it.
   */
  failed (rawId: string | number): void {
    setImmediate(() => {
      if (this.closed || this.operations.get(String(rawId)) !== null) return
      const type = this.socket.protocol === 'graphql-transport-ws' ? 'complete' : 'stop'
      const message = Buffer.from(JSON.stringify({ id: rawId, type }))
      const state = early.get(this.socket)
      if (state === undefined) this.socket.emit('message', message, false)
      else state.deliver(message)
    })
  }

  /**
   * Its subscriptions are `bytes` more behind (less, when negative). A client that has left more
   * than the bound unread, on the socket and in these queues, before this event is closed with
   * 1013, its subscriptions ended at once.
   */
  behind (bytes: number): void {
    const before = this.backlog
    this.backlog += bytes
    if (bytes > 0 && !this.closed && slowReader(this.socket, MAX_BUFFERED_BYTES, before)) this.dispose()
  }

  close (code: number, reason: string): void {
    if (!this.closed) this.socket.close(code, reason)
    this.dispose()
  }

  private dispose (): void {
    this.closed = true
    this.cancelTimer?.()
    this.cancelTimer = null
    for (const release of this.leases.values()) release()
    this.leases.clear()
    for (const controller of this.operations.values()) controller?.abort()
    this.operations.clear()
  }
}

/** The context mercurius gives subscription resolvers and hooks (ours plus its own). */
interface SubscriptionContext {
  connection: GraphqlConnection
  initAuthorization?: string
  /** connection_init's payload (mercurius keeps it on the connection's context). */
  _connectionInit?: unknown
  id: string | number
}

export interface SubscriptionSettings {
  /** Operations one connection may hold at once. */
  maxOperations: number
  /** The face's limits, checked first (a document they refuse is not validated further), as over HTTP. */
  first: readonly ValidationRule[]
  /** The validation rules of HTTP documents (beyond GraphQL's standard ones). */
  rules: readonly ValidationRule[]
  /** Whether a refusal keeps graphql's suggestions of names near a misspelt one (introspection on), as over HTTP. */
  suggest: boolean
  /** Longest document (characters) and most tokens one may hold, as over HTTP. */
  maxQuery: number
  maxTokens: number
  /** How long a connection may stay without a valid identity once initialised (then 4401). */
  authTimeoutMs: number
  /**
   * Counts the connection of the upgrade `request` against `tenant` once it is identified, or
   * throws OVERLOADED when the tenant holds its share of the face's connections.
   */
  claim: (request: FastifyRequest, tenant: string) => void
}

// A message that mentions "__proto__" or "constructor" is looked at for such a key (the text is
// the cheap test: the others pay nothing). mercurius parses with secure-json-parse, which refuses
// one, and answered in its own words: an `error` message with id null ("Message must be a JSON
// string"), which graphql-transport-ws does not define, and a subscribe that held one in its
// variables never heard of its id again.
const FORBIDDEN_KEY = 'Invalid message: a "__proto__" key, or a "constructor" holding a "prototype"'

/** The messages a client may send, per subprotocol (graphql-transport-ws, and the legacy graphql-ws). */
const TRANSPORT_MESSAGES = new Set(['connection_init', 'ping', 'pong', 'subscribe', 'complete'])
const LEGACY_MESSAGES = new Set(['connection_init', 'connection_terminate', 'start', 'stop'])

/**
 * `text` cut to at most `bytes` bytes of UTF-8, by whole characters: a close reason holds at
 * most 123 bytes, and ws throws on a longer one (the connection then stayed open).
 */
function upTo (text: string, bytes: number): string {
  if (Buffer.byteLength(text) <= bytes) return text
  let cut = ''
  let size = 0
  for (const char of text) {
    size += Buffer.byteLength(char)
    if (size > bytes) break
    cut += char
  }
  return cut
}

/** Tenant and user of a token when it is a valid one (identity's cache answers a token seen), else null. */
function tokenOwner (app: FastifyInstance, authorization: string | undefined): { tenant: string, user: string } | null {
  if (authorization === undefined) return null
  try {
    const { tenant, user } = app.identify(authorization)
    return { tenant, user }
  } catch {
    return null
  }
}

/** A refusal of a client's message, in the contract's shape. */
function refusal (code: ErrorCode, message: string, error?: GraphQLError): GraphQLFormattedError {
  return { ...error?.toJSON(), message, extensions: { code, status: ErrorCodes[code].status, requestId: uuidv7() } }
}

/** `error` without graphql's suggestion unless `suggest` (errorFormatterOf, over HTTP). */
function suggested (error: GraphQLFormattedError | null, suggest: boolean): GraphQLFormattedError | null {
  return error === null || suggest ? error : { ...error, message: withoutSuggestion(error.message) }
}

/**
 * The event a subscription's document names: its one root field written as such (no fragment,
 * not an alias of another), when that is a field of the schema's subscription type; else null.
 * What a refusal of the document is recorded under (see the guard).
 */
function rootEvent (schema: GraphQLSchema, selections: readonly SelectionNode[]): string | null {
  if (selections.length !== 1 || selections[0].kind !== Kind.FIELD) return null
  const name = selections[0].name.value
  const fields = schema.getSubscriptionType()?.getFields()
  return fields !== undefined && Object.hasOwn(fields, name) ? name : null
}

/**
 * What is wrong with a `subscribe` message, or null. mercurius reads the payload without
 * checking it: a payload that is not an object, a document it cannot run or a query instead of
 * a subscription got an error with mercurius' or JavaScript's own message (`Cannot destructure
 * property 'query' of 'payload' as it is null.`) and none of the contract's extensions.
 */
function subscribeRefusal (message: Record<string, unknown>, settings: SubscriptionSettings, schema: GraphQLSchema, rules: readonly ValidationRule[], named: { event: string | null }): GraphQLFormattedError | null {
  const payload = message.payload
  if (payload === null || typeof payload !== 'object' || Array.isArray(payload)) return refusal('VALIDATION_FAILED', 'A subscribe message needs a `payload` object')
  const { query, operationName, variables } = payload as Record<string, unknown>
  if (typeof query !== 'string' || query === '') return refusal('VALIDATION_FAILED', 'The payload needs a `query` string holding a GraphQL document')
  if (query.length > settings.maxQuery) return refusal('PAYLOAD_TOO_LARGE', `The GraphQL document is longer than ${settings.maxQuery} characters`)
  if (operationName !== undefined && operationName !== null && typeof operationName !== 'string') return refusal('VALIDATION_FAILED', '`operationName` must be a string')
  if (variables !== undefined && variables !== null && (typeof variables !== 'object' || Array.isArray(variables))) return refusal('VALIDATION_FAILED', '`variables` must be a JSON object')
  // mercurius' extensions of a subscribe message: `connectionInit` is the only one it knows.
  const extensions = message.extensions
  // mercurius runs each one (onConnect, then a copy of the context), before any token is looked
  // at: 15,000 of them in an 870 KB frame took 200 ms of CPU, from any client. One is all a
  // client needs: the last one's token was the one used.
  if (Array.isArray(extensions) && extensions.length > 1) return refusal('VALIDATION_FAILED', 'A subscribe message carries at most one extension, `{ type: "connectionInit", payload }`')
  if (Array.isArray(extensions) && !extensions.every(e => (e as { type?: unknown } | null)?.type === 'connectionInit')) {
    return refusal('VALIDATION_FAILED', 'The only extension of a subscribe message is `{ type: "connectionInit", payload }`')
  }
  let document: DocumentNode
  try {
    document = parse(query, { maxTokens: settings.maxTokens })
  } catch (err) {
    // parse only throws GraphQL's syntax errors, whose message and locations help the client.
    const error = err instanceof GraphQLError ? err : new GraphQLError('The document does not parse')
    return refusal('VALIDATION_FAILED', error.message, error)
  }
  const operation = getOperationAST(document, operationName ?? undefined)
  if (operation == null) {
    return refusal('VALIDATION_FAILED', typeof operationName === 'string'
      ? 'The document defines no operation of that `operationName`'
      : 'The document does not define exactly one operation: name one in `operationName`')
  }
  if (operation.operation !== 'subscription') return refusal('VALIDATION_FAILED', `A subscribe message carries a subscription; a ${operation.operation} goes over HTTP`)
  named.event = rootEvent(schema, operation.selectionSet.selections)
  // Validated here, before anything is held, so that graphql's own message comes first: the
  // root fields are counted by a walk that skips what validation refuses (an unknown fragment,
  // one on the wrong type), and its refusal named @skip and @include instead.
  let invalid: GraphQLError | undefined
  try {
    // The face's limits first: graphql-js' rules may cost hundreds of milliseconds on a document
    // they refuse, and over WebSocket no document is cached (each subscribe is validated anew).
    invalid = validate(schema, document, settings.first)[0] ?? validate(schema, document, rules)[0]
  } catch (err) {
    // A rule that throws instead of reporting (none known): a refusal all the same.
    invalid = err instanceof GraphQLError ? err : new GraphQLError('The document cannot be validated')
  }
  // A limit's own code (PAYLOAD_TOO_LARGE for too many fields) is kept.
  if (invalid !== undefined) return { ...invalid.toJSON(), extensions: { code: 'VALIDATION_FAILED', status: 400, ...invalid.extensions, requestId: uuidv7() } }
  // graphql's subscribe() coerces the variables, and mercurius sends its errors as they are.
  const coerced = getVariableValues(schema, operation.variableDefinitions ?? [], (variables ?? {}) as Record<string, unknown>, { maxErrors: 1 })
  if (coerced.errors !== undefined) return refusal('VALIDATION_FAILED', coerced.errors[0].message, coerced.errors[0])
  return rootFieldRefusal(schema, document, operation, coerced.coerced)
}

/**
 * What is wrong with a subscription's root fields as the variables make them, or null: it must
 * select exactly one, not an introspection field. graphql-js' own rule
 * (SingleFieldSubscriptionsRule) applies @skip and @include without the variables: a variable in
 * a directive made validate() throw (not report an error), and a root field @skip or @include
 * left out made subscribe() throw a TypeError; either reached the client without the contract's
 * code, and its id stayed taken. Checked here with the variables, and left out of validation
 * (preSubscriptionExecution), so that such a document runs.
 */
function rootFieldRefusal (schema: GraphQLSchema, document: DocumentNode, operation: NonNullable<ReturnType<typeof getOperationAST>>, variables: Record<string, unknown>): GraphQLFormattedError | null {
  const type = schema.getSubscriptionType()
  if (type == null) return refusal('VALIDATION_FAILED', 'The schema has no subscriptions')
  const fragments: Record<string, FragmentDefinitionNode> = Object.create(null)
  for (const definition of document.definitions) {
    if (definition.kind === Kind.FRAGMENT_DEFINITION) fragments[definition.name.value] = definition
  }
  let fields: Map<string, readonly unknown[]>
  try {
    fields = collectFields(schema, fragments, variables, type, operation.selectionSet)
  } catch (err) {
    // A directive's argument of the wrong type: graphql's error, as validation would give it.
    const error = err instanceof GraphQLError ? err : new GraphQLError('The document\'s directives cannot be applied')
    return refusal('VALIDATION_FAILED', error.message, error)
  }
  const name = operation.name === undefined ? 'Anonymous Subscription' : `Subscription "${operation.name.value}"`
  if (fields.size === 0) return refusal('VALIDATION_FAILED', `${name} must select one top level field: its @skip and @include leave none`)
  if (fields.size > 1) return refusal('VALIDATION_FAILED', `${name} must select only one top level field.`)
  const [field] = fields.keys()
  const [node] = fields.get(field) as Array<{ name: { value: string } }>
  if (node.name.value.startsWith('__')) return refusal('VALIDATION_FAILED', `${name} must not select an introspection top level field.`)
  return null
}

/**
 * The event a valid subscription document names: its one subscription's root field (through a
 * fragment too, @skip and @include read without the variables), else null.
 */
function subscriptionEvent (schema: GraphQLSchema, document: DocumentNode): string | null {
  const operations = document.definitions.filter(d => d.kind === Kind.OPERATION_DEFINITION && d.operation === 'subscription')
  const type = schema.getSubscriptionType()
  if (operations.length !== 1 || operations[0].kind !== Kind.OPERATION_DEFINITION || type == null) return null
  const event = rootEvent(schema, operations[0].selectionSet.selections)
  if (event !== null) return event
  const fragments: Record<string, FragmentDefinitionNode> = Object.create(null)
  for (const definition of document.definitions) {
    if (definition.kind === Kind.FRAGMENT_DEFINITION) fragments[definition.name.value] = definition
  }
  try {
    const [nodes] = collectFields(schema, fragments, {}, type, operations[0].selectionSet).values()
    return nodes?.[0]?.name.value ?? null
  } catch {
    return null
  }
}

export function createSubscriptions (app: FastifyInstance, settings: SubscriptionSettings): {
  context: (socket: WebSocket, request: FastifyRequest) => { connection: GraphqlConnection }
  onConnect: (data: { payload?: unknown }) => true | { initAuthorization: string }
  subscribe: (event: EventDefinition) => GraphQLFieldResolver<unknown, SubscriptionContext>
  preSubscriptionExecution: (schema: GraphQLSchema, document: DocumentNode, context: SubscriptionContext, id: string | number) => Promise<void>
  onSubscriptionEnd: (context: SubscriptionContext | null, id: string | number) => Promise<void>
  guard: (socket: WebSocket, initialised: () => void, budget?: { unread: UnreadBytes, tenant: () => string | undefined }, upgrade?: IncomingMessage) => void
} {
  const connections = new WeakMap<WebSocket, GraphqlConnection>()
  // The single-field rule without the variables threw on a variable in a directive: the guard
  // checks the root fields with them (rootFieldRefusal).
  const rules = [...specifiedRules.filter(rule => rule !== SingleFieldSubscriptionsRule), ...settings.rules]
  const decide = decisions(app)
  // Each subscribe is one request of its connection's tenant to the HTTP guard (MessageGuard).
  const guard = messageGuardOf(app)
  // With the audit off, a refused document is not looked at again for its entry (recordRefusal).
  const auditing = app.hasDecorator('audit')
  // A subscription past the connection's bound is refused OVERLOADED, recorded under its event as
  // /ws and tRPC record theirs (before, it closed the connection with no entry), under the
  // tenant and user the connection speaks for, else those of its valid token; then the
  // connection closes (1008), as before.
  const recordOverload = (socket: WebSocket, event: string | null, reason: string): void => {
    if (!auditing) return
    const connection = connections.get(socket)
    const caller = connection?.speaksFor ?? tokenOwner(app, early.get(socket)?.init ?? connection?.upgradeAuthorization)
    try {
      decide({ requestId: uuidv7(), protocol: 'graphql', path: '/graphql', action: event ?? 'http', category: event === null ? 'security' : 'read', caller, clientRequestId: false }, () => { throw new MantleError('OVERLOADED', reason) })
    } catch {
      // The refusal rethrown, or the trail's OVERLOADED when it cannot record: the connection
      // closes either way.
    }
  }

  return {
    // mercurius calls this on each connection_init: a second one breaks the protocol (4429).
    context (socket, request) {
      let connection = connections.get(socket)
      if (connection !== undefined) {
        connection.close(4429, 'Too many initialisation requests')
        return { connection }
      }
      connection = new GraphqlConnection(socket, upgradeAuthorization(request), tenant => { settings.claim(request, tenant) }, request.raw, guard === null ? '' : clientAddress(request))
      connections.set(socket, connection)
      connection.open(app, early.get(socket)?.init ?? connection.upgradeAuthorization, settings.authTimeoutMs)
      return { connection }
    },

    // `connection_init` may carry `{ authorization: "Bearer …" }`; it is verified on each
    // subscribe, where a refusal can carry its code (mercurius' own refusal of a connection
    // is not a message of the graphql-transport-ws protocol: there the guard refuses a bad one
    // first, 4403).
    onConnect (data) {
      const authorization = initAuthorization(data.payload)
      return authorization === undefined ? true : { initAuthorization: authorization }
    },

    // Before each subscription runs: one subscriber per id, a bounded number.
    async preSubscriptionExecution (schema, document, context, rawId) {
      const { connection } = context
      const id = String(rawId)
      early.get(connection.socket)?.starting.delete(id)
      if (connection.operations.has(id)) {
        connection.close(4409, `Subscriber for ${upTo(id, 64)} already exists`)
        throw new GraphQLError('Subscriber already exists', { extensions: { code: 'VALIDATION_FAILED', status: 400 } })
      }
      if (connection.operations.size >= settings.maxOperations) {
        const reason = `At most ${settings.maxOperations} subscriptions per connection`
        recordOverload(connection.socket, subscriptionEvent(schema, document), reason)
        connection.close(1008, reason)
        throw new GraphQLError('Too many subscriptions', { extensions: { code: 'PAYLOAD_TOO_LARGE', status: 413 } })
      }
      // The document was validated by the guard (subscribeRefusal), before anything was held.
      connection.operations.set(id, null)
    },

    // The client completed an operation, or `failed` did for it (a running one is returned by
    // mercurius itself).
    async onSubscriptionEnd (context, rawId) {
      // mercurius passes the context of the connection's last subscription, null before any.
      const connection = context?.connection
      const id = String(rawId)
      connection?.operations.get(id)?.abort()
      connection?.operations.delete(id)
      if (connection !== undefined) early.get(connection.socket)?.cancelled.delete(id)
    },

    /**
     * Screens a socket's messages before mercurius reads them (from its 'message' event, which
     * this wraps), at the opening of each /graphql socket:
     * - a `complete` for an id the connection does not hold is ignored, as graphql-transport-ws
     *   says. mercurius runs onSubscriptionEnd with the context of the connection's last
     *   subscription, null when none has started yet (a first subscribe that did not parse):
     *   its own hook runner then threw and closed the socket without a code. One for an id
     *   being set up is held until the subscription starts, which then ends (see Early);
     * - a malformed `subscribe` (see subscribeRefusal) is answered here with an `error` message
     *   in the contract's shape, and mercurius never sees it. Before connection_init mercurius
     *   refuses every subscribe itself (connection_error, then a close). "After" is as the
     *   guard saw the messages come in, not whether mercurius has built the connection yet (it
     *   does so asynchronously, while it handles connection_init): a subscribe sent right behind
     *   connection_init got through unscreened, and mercurius, which handles messages in order,
     *   ran it once initialised;
     * - a `connection_init` calls `initialised` (the face's 4408 timer), since this is the one
     *   place that reads each message's type. Over graphql-transport-ws, the first one whose
     *   credentials are refused closes the socket at once with 4403 (see refuseInit).
     */
    guard (socket, initialised, budget, upgrade) {
      // Every frame mercurius and this screen send goes out as UTF-8 bytes, and is not queued for
      // a client that has more than the bound unread, or whose tenant's sockets (or the
      // instance's) have more than theirs (see utf8Sends).
      utf8Sends(socket, MAX_BUFFERED_BYTES, budget)
      const transport = socket.protocol === 'graphql-transport-ws'
      const subscribe = transport ? 'subscribe' : 'start'
      const complete = transport ? 'complete' : 'stop'
      let initSeen = false
      // Set once connection_init's credentials were refused: the socket is closing (4403), and
      // nothing it sent after them reaches mercurius (a subscribe behind them would be decided,
      // and recorded, again).
      let refusedInit = false
      // Bytes of the messages handed to mercurius while it waits for a frame of its own to be
      // written (null: it reads on). It reads the socket's messages one at a time, and awaits its
      // connection_ack (its connection_error, for a legacy start before connection_init) before
      // the next: a client that does not read held that send up, and every message it sent
      // meanwhile waited in mercurius' queue of them, which has no bound (300 MB for 300 MB sent,
      // with no token, until ws gave up on the socket 40 s later). They count as what the client
      // has left unread: past the bound, it is closed with 1013 and they are not queued.
      let waiting: number | null = null
      // Bytes of the subscribes held in `ending`: each waits for mercurius' loop of the id to end,
      // which waits for its last event to be written, and may carry a megabyte of variables. They
      // count as unread too: before, a client that read nothing held 100 of them (twice its bound
      // of operations) on each of its connections, for as long as it kept them open.
      let held = 0
      // The event each held subscribe names, for its entry should it find the bound full.
      const heldEvents = new WeakMap<Buffer, string | null>()
      const emit = socket.emit
      const state: Early = { starting: new Set(), cancelled: new Set(), ending: new Map(), deliver: message => { emit.call(socket, 'message', message, false) }, init: undefined }
      early.set(socket, state)
      const known = transport ? TRANSPORT_MESSAGES : LEGACY_MESSAGES
      // The message mercurius is handed in place of the one admitted (a connection_init's, below).
      let replacement: Buffer | null = null
      // A subscription whose document names an event, refused for its form (an argument, a
      // variable, a directive: its input, which a subscription never takes, or a field the event
      // does not have) is that subscription's refusal, recorded as one refused for its roles is
      // (Audit.decide), as tRPC and /ws record theirs: before, it left no entry. A subscribe whose
      // document names no event (no `query`, one that does not parse or validate, a query) is
      // recorded as the same document over HTTP is: `http`, category security. Under the tenant
      // and user the connection speaks for, else those of its own valid token (connection_init's,
      // else the upgrade's), as a request refused before its face has it names them; never the
      // document. A message that is no subscribe (not JSON, an unknown type) is the protocol's,
      // unrecorded, as a bad frame on /ws.
      const recordRefusal = (event: string | null, error: GraphQLFormattedError): void => {
        const extensions = error.extensions as { code?: unknown, requestId?: unknown } | undefined
        const code = typeof extensions?.code === 'string' && extensions.code in ErrorCodes ? extensions.code as ErrorCode : 'VALIDATION_FAILED'
        const requestId = typeof extensions?.requestId === 'string' ? extensions.requestId : uuidv7()
        const connection = connections.get(socket)
        const caller = connection?.speaksFor ?? tokenOwner(app, state.init ?? connection?.upgradeAuthorization)
        try {
          decide({ requestId, protocol: 'graphql', path: '/graphql', action: event ?? 'http', category: event === null ? 'security' : 'read', caller, clientRequestId: false }, () => { throw new MantleError(code, error.message) })
        } catch {
          // The refusal rethrown, or the trail's OVERLOADED when it cannot record (no entry then,
          // as for any decision): the client gets the document's refusal either way.
        }
      }
      // `cancelled` and `ending` hold ids mercurius still holds: at most the bound starting, and
      // the bound it runs or sets up.
      const bound = 2 * settings.maxOperations
      // graphql-transport-ws closes the socket with 4400 on a message it does not define; the
      // legacy protocol answers an error. Before, mercurius answered with its own text and none
      // of the contract's extensions, and a `null` message threw in its handler (an error log, a
      // close without a code).
      const invalid = (id: unknown, reason: string): false => {
        if (transport) socket.close(4400, reason)
        else socket.send(JSON.stringify({ type: 'error', id: typeof id === 'string' || typeof id === 'number' ? id : null, payload: [refusal('VALIDATION_FAILED', reason)] }))
        return false
      }
      // mercurius' own `complete` of an id the client completed is not sent (see Early.ending);
      // mercurius lets go of the id once this send has called back, within this turn of the
      // event loop, and a subscribe held for it goes on after.
      const send = socket.send as (data: unknown, options?: unknown, cb?: unknown) => void
      socket.send = function (this: WebSocket, data: unknown, options?: unknown, cb?: unknown): void {
        if (state.ending.size > 0 && typeof data === 'string' && data.startsWith('{"type":"complete"')) {
          const key = String((JSON.parse(data) as { id?: unknown }).id)
          const subscribe = state.ending.get(key)
          if (subscribe !== undefined) {
            state.ending.delete(key)
            if (subscribe !== null) held -= subscribe.length
            const callback = typeof options === 'function' ? options : cb
            if (typeof callback === 'function') callback()
            if (subscribe !== null) {
              setImmediate(() => {
                if (socket.readyState === socket.OPEN && start(key, heldEvents.get(subscribe) ?? null)) state.deliver(subscribe)
              })
            }
            return
          }
        }
        if (waiting !== null && typeof data === 'string' && (data.startsWith('{"type":"connection_ack"') || data.startsWith('{"type":"connection_error"'))) {
          const callback = typeof options === 'function' ? options : cb
          const written = (err?: Error): void => {
            waiting = null
            if (typeof callback === 'function') callback(err)
          }
          send.call(this, data, typeof options === 'function' ? written : options, written)
          return
        }
        send.call(this, data, options, cb)
      } as WebSocket['send']
      // A subscribe handed to mercurius counts among those starting until it reaches
      // preSubscriptionExecution, or the client completes it. Each of them is an id the client
      // holds: one more than the bound of them is over the bound, and closes the connection as
      // preSubscriptionExecution would (before, it was not counted, and a complete of it before
      // it reached mercurius' hooks was ignored: it ran until the connection closed).
      const start = (key: string, event: string | null): boolean => {
        if (!state.starting.has(key) && state.starting.size >= settings.maxOperations) {
          const reason = `At most ${settings.maxOperations} subscriptions per connection`
          recordOverload(socket, event, reason)
          const connection = connections.get(socket)
          if (connection === undefined) socket.close(1008, reason)
          else connection.close(1008, reason)
          return false
        }
        state.starting.add(key)
        return true
      }
      // graphql-transport-ws: a connection_init whose credentials (its payload's `authorization`)
      // are refused closes the socket at once with 4403 Forbidden, before any connection_ack, as
      // graphql-ws' own server does when its onConnect refuses. Before, it was acked and closed
      // with 4401 about 10 s later (authTimeoutMs) or at its first subscribe: graphql-ws' client
      // takes 4401 for fatal, and one whose connectionParams gave a stale token on a reconnect
      // failed every subscription instead of asking for a fresh one (it retries 4403). Recorded
      // once, as the upgrade's own 401 for the same token is (`http` at /graphql, public /
      // anonymous): before, it left an entry only when a subscribe followed, one per subscribe.
      // One without credentials is left to the connection (the upgrade's token, else 4401 once
      // authTimeoutMs has passed without a subscribe bringing one).
      const refuseInit = (authorization: string): boolean => {
        try {
          app.identify(authorization, upgrade)
          return false
        } catch (err) {
          refusedInit = true
          socket.close(CLOSE_FORBIDDEN, upTo(`Forbidden: ${(err as Error).message}`, 123))
          if (auditing) {
            try {
              decide({ requestId: uuidv7(), protocol: 'graphql', path: '/graphql', action: 'http', category: 'auth', caller: null, clientRequestId: false }, () => { throw err })
            } catch {
              // The refusal rethrown, or the trail's OVERLOADED when it cannot record: the
              // connection is refused for its credentials either way.
            }
          }
          return true
        }
      }
      const admit = (data: unknown): boolean => {
        if (refusedInit) return false
        let message: unknown
        const text = String(data)
        try {
          message = JSON.parse(text)
        } catch {
          return invalid(null, 'Invalid message: not JSON')
        }
        if (message === null || typeof message !== 'object' || Array.isArray(message)) return invalid(null, 'Invalid message: not a JSON object')
        const { id, type } = message as { id?: unknown, type?: unknown }
        if (typeof type !== 'string' || !known.has(type)) return invalid(id, 'Invalid message: unknown type')
        // An id is text (or a number, which mercurius takes too). Any other value was read as
        // text (String(id)) or written back (JSON.stringify) here, outside any handler's catch:
        // an array nested 5,000 deep (10 KB), from a client with no token, overflowed the stack
        // and ended the process, every tenant's connections with it.
        if (id !== undefined && id !== null && typeof id !== 'string' && typeof id !== 'number') return invalid(null, 'Invalid message: an id must be a string')
        if (transport && (type === subscribe || type === complete) && (typeof id !== 'string' || id === '')) return invalid(id, `Invalid message: a ${type} needs an id string`)
        // A subscription's id goes into each of its frames: of any length up to the frame limit,
        // 50 subscriptions under 60 KB ids made each event of the tenant 3 MB of frames for that
        // one connection (8.4 KB with short ids). Bounded as /ws bounds its frame ids; not echoed.
        if (type === subscribe && typeof id === 'string' && id.length > MAX_ID_LENGTH) return invalid(null, `Invalid message: an id holds at most ${MAX_ID_LENGTH} characters`)
        // A subscribe is refused for its id, as a malformed one is, and the connection stays open
        // (graphql-transport-ws: one before connection_init closes with 4401, below); any other
        // such message is one the protocol does not define.
        const forbidden = MAY_HOLD_FORBIDDEN_KEY.test(text) && forbiddenKey(message)
        if (forbidden && (type !== subscribe || (!initSeen && !transport))) return invalid(id, FORBIDDEN_KEY)
        // graphql-transport-ws: the payload of a connection_init, ping or pong is an object, or
        // none (null or absent); any other closes the socket with 4400, as graphql-ws' own server
        // does. Before, mercurius acked (or ponged) it, and a connection_init's was read as none.
        if (transport && (type === 'connection_init' || type === 'ping' || type === 'pong')) {
          const payload = (message as { payload?: unknown }).payload
          if (payload !== undefined && payload !== null && (typeof payload !== 'object' || Array.isArray(payload))) return invalid(id, `Invalid message: a ${type} payload must be an object`)
        }
        if (type === 'connection_init') {
          const first = !initSeen
          initSeen = true
          state.init = initAuthorization((message as { payload?: unknown }).payload)
          initialised()
          if (transport && first && state.init !== undefined && refuseInit(state.init)) return false
          waiting ??= 0
          // mercurius copies this payload (or its `headers`) onto the upgrade request's headers,
          // key by key (a string's characters, one key each), on every subscribe, before any
          // token is looked at: 20 subscribes behind a payload of 60,000 keys held the event loop
          // 2.4 s, behind a 900 KB string 46 s, from a client without a token. The face reads
          // its `authorization` alone (onConnect, the resolvers): mercurius gets nothing else.
          replacement = Buffer.from(JSON.stringify({ type, payload: state.init === undefined ? undefined : { authorization: state.init } }))
        }
        if (type === complete) {
          const key = String(id)
          // A subscribe held behind an ending one is dropped: it never started.
          if (state.ending.has(key)) {
            held -= state.ending.get(key)?.length ?? 0
            state.ending.set(key, null)
            return false
          }
          const operation = connections.get(socket)?.operations.get(key)
          if (operation != null) {
            if (state.ending.size < bound) state.ending.set(key, null)
            return true
          }
          // One still starting ends as soon as it starts (ENDED), and mercurius holds its id
          // until then: a subscribe of the id meanwhile is held, as behind a running one. The
          // client has let go of the id: it no longer counts among those starting.
          if ((operation === null || state.starting.has(key)) && state.cancelled.size < bound) {
            state.starting.delete(key)
            state.cancelled.add(key)
            if (state.ending.size < bound) state.ending.set(key, null)
          }
          return false
        }
        if (type !== subscribe) return true
        // graphql-transport-ws: a subscribe before connection_init closes the socket with 4401
        // (mercurius answered a connection_error, a message of the legacy protocol only).
        if (!initSeen) {
          if (!transport) {
            waiting ??= 0
            return true
          }
          socket.close(4401, 'Unauthorized')
          return false
        }
        const named = { event: null as string | null }
        const error = forbidden ? refusal('VALIDATION_FAILED', FORBIDDEN_KEY) : suggested(subscribeRefusal(message as Record<string, unknown>, settings, app.graphql.schema, rules, named), settings.suggest)
        if (error !== null && auditing) recordRefusal(named.event, error)
        if (error === null) {
          const key = String(id)
          if (state.ending.has(key)) {
            // A second one is a duplicate of the held one, as of a running one.
            if (state.ending.get(key) !== null) connections.get(socket)?.close(4409, `Subscriber for ${upTo(key, 64)} already exists`)
            else {
              state.ending.set(key, data as Buffer)
              heldEvents.set(data as Buffer, named.event)
              held += (data as Buffer).length
            }
            return false
          }
          return start(key, named.event)
        }
        const send = (): void => socket.send(JSON.stringify({ type: 'error', id, payload: [error] }))
        // Before mercurius has taken up connection_init (a subscribe right behind it), the error
        // waits for its connection_ack, which mercurius sends within this turn of the event loop:
        // nothing may come before the ack (graphql-ws' client closes the connection, 4400).
        if (connections.has(socket)) send()
        else setImmediate(send)
        return false
      }
      socket.emit = function (this: WebSocket, event: string | symbol, ...args: unknown[]): boolean {
        // slowReader, as on /ws and /trpc: before, a client that sent frames and never read the
        // answers made the server buffer about 4 bytes for each byte it sent.
        if (event === 'message') {
          replacement = null
          if (slowReader(socket, MAX_BUFFERED_BYTES, (waiting ?? 0) + held) || !admit(args[0])) return false
          if (replacement !== null) {
            args[0] = replacement
            replacement = null
          }
          if (waiting !== null) waiting += (args[0] as Buffer).length
        }
        return emit.call(this, event, ...args)
      }
    },

    subscribe (event) {
      return (_source, _args, context, info) => {
        const { connection } = context
        if (guard === null) return begin(null)
        // A subscribe behind one that brings the connection's first token, whose count waits for
        // Redis, is counted once that one is decided, under the caller its token names: counted
        // at once, it went to the address as well (the memory store, whose count is immediate,
        // counts it towards the tenant).
        const before = connection.firstCount
        return before === null ? count(guard) : before.then(() => count(guard))

        function count (guard: MessageGuard): AsyncIterableIterator<unknown> | Promise<AsyncIterableIterator<unknown>> {
          // Under its upgrade's address while the connection speaks for no one (a subscribe that
          // brings its first token), as the guard counts a request without a verified one.
          const counted = guard(connection.speaksFor, connection.address)
          if (!(counted instanceof Promise)) return begin(counted)
          // On Redis: graphql-js takes the stream when it comes. A client that completed the id
          // meanwhile finds it in `cancelled`, as for any subscription still being set up; one that
          // left has nothing to be decided for it.
          const decided = counted.then(beyond => connection.socket.readyState === connection.socket.OPEN ? begin(beyond) : ENDED)
          if (connection.speaksFor === null) {
            const clear = (): void => { if (connection.firstCount === settled) connection.firstCount = null }
            const settled: Promise<void> = decided.then(clear, clear)
            connection.firstCount = settled
          }
          return decided
        }

        function begin (beyond: MantleError | null): AsyncIterableIterator<unknown> {
          const id = String(context.id)
          const state = early.get(connection.socket)
          if (state?.cancelled.delete(id) === true) {
            connection.operations.delete(id)
            // mercurius ends it at once and sends a `complete`, not wanted after the client's (a
            // subscribe of the id held meanwhile goes on after it).
            if (!state.ending.has(id)) state.ending.set(id, null)
            return ENDED
          }
          const requestId = uuidv7()
          let iterator: AsyncIterator<unknown>
          const controller = new AbortController()
          // One audit entry for the decision, accepted or refused, under the connection's caller.
          const decision: Decision = { requestId, protocol: 'graphql', path: '/graphql', action: event.name, category: 'read', get caller () { return connection.speaksFor }, clientRequestId: false }
          try {
            iterator = decide(decision, () => {
              const identity = connection.identify(app, context.initAuthorization ?? connection.upgradeAuthorization, initAuthorization(context._connectionInit) ?? connection.upgradeAuthorization)
              if (beyond !== null) throw beyond
              app.events.bus.authorize(event.name, identity)
              // The bus only ever delivers the caller's own tenant's events.
              return app.events.bus.stream(event.name, identity.tenant, controller.signal, undefined, bytes => { connection.behind(bytes) })[Symbol.asyncIterator]()
            })
          } catch (err) {
            const { problem, headers } = toProblem(err, requestId)
            if (problem.code === 'INTERNAL') app.log.error({ err, requestId }, 'unexpected error on a GraphQL subscription')
            // Nothing can succeed on a connection without a valid identity: once the error has
            // gone out (mercurius sends it in this same turn of the event loop), close it. One that
            // holds an identity loses only this subscription (a subscribe's own refused token), as
            // /ws keeps a connection whose `auth` frame is refused: it closed with its others.
            if (problem.code === 'UNAUTHENTICATED' && connection.speaksFor === null) setImmediate(() => connection.close(4401, 'Unauthorized'))
            else connection.failed(context.id)
            // Its headers for its Retry-After (extensions.retryAfter): a message has no header.
            // Located as graphql locates a thrown one (the field's path and locations).
            return refusedStream(locatedError(fieldError(problem, headers), info.fieldNodes, responsePathAsArray(info.path)))
          }
          connection.operations.set(id, controller)
          const end = (): void => {
            controller.abort()
            if (connection.operations.get(id) === controller) connection.operations.delete(id)
          }
          const stream: AsyncIterableIterator<unknown> = {
            async next () {
              // The next event is not taken while the client is that far behind: it is closed.
              if (slowReader(connection.socket)) {
                end()
                return { done: true, value: undefined }
              }
              const result = await iterator.next()
              if (result.done === true) end()
              return result
            },
            async return () {
              end()
              return await iterator.return!()
            },
            [Symbol.asyncIterator] () { return this }
          }
          return stream
        }
      }
    }
  }
}
