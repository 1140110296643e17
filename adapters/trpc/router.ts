import { uuidv7 } from '../../ids.js'
import type { FastifyInstance } from 'fastify'
import { initTRPC, TRPCError, type AnyTRPCProcedure, type AnyTRPCRouter } from '@trpc/server'
import { WebSocket } from 'ws'
import { decisions, runCall, type Decision } from '../face.js'
import { callKey } from '../rest/index.js'
import { MantleError, shuttingDownRefusal } from '../../errors.js'
import { isSocket, requestOf } from '../../plugins/pipeline/index.js'
import type { TrpcContext } from './context.js'
import { ProblemError, errorShape, type MantleErrorShape } from './errors.js'
import { pulledSafely, type LiveSubscriptions } from './subscriptions.js'
import { SLOW_READER, slowReader } from '../slow-reader.js'

export interface RouterLimits {
  /** Calls one WebSocket connection may run at once. */
  maxInFlight: number
  /** Event subscriptions one WebSocket connection may hold. */
  maxSubscriptions: number
  /**
   * Bytes a WebSocket may hold for its client before its subscriptions stop pulling events;
   * a call that would answer beyond it closes the socket with 1013.
   */
  maxBufferedBytes: number
  /** SSE keep-alive comment interval. */
  ssePingMs: number
}

/**
 * Request ids of errors tRPC raises before a context exists (a malformed request), set by
 * the adapter's onError, which tRPC calls before it formats the error.
 */
export const earlyRequestIds = new WeakMap<object, string>()

/**
 * While a WebSocket message is handed to @trpc/server (the face sets `watching`), the request id
 * of its refusal of the message as one it cannot parse, which it formats within that same call:
 * the face records it when the message names a procedure; `idless`: the refusal was of its calls
 * whose id is null alone, the others run. One slot for the process: a message is handled
 * synchronously up to that refusal.
 */
export const unparsed: { watching: boolean, requestId: string | null, idless: boolean } = { watching: false, requestId: null, idless: false }

/** Each misdirected call's refusal (wrongMethod), made once for the face's onError and the formatter. */
const misdirected = new WeakMap<TRPCError, TRPCError>()

/**
 * A WebSocket call whose method is not its procedure's type (`query` of a mutation,
 * `subscription` of a query, `query` of an event): @trpc/server refuses it NOT_FOUND (`No
 * "query"-procedure on path "x"`), as if there were no such procedure. The refusal it gets
 * instead, METHOD_NOT_SUPPORTED (405), as over HTTP, where tRPC refuses a mutation over GET so
 * (CONTRACT: the same mistake, the same error on every face); null for any other error. Both
 * the error formatter (the answer) and the face's onError (the audit entry) ask here.
 */
export function wrongMethod (procedures: Readonly<Record<string, unknown>>, error: TRPCError, path: string | undefined, type: string | undefined): TRPCError | null {
  if (error.code !== 'NOT_FOUND' || error instanceof ProblemError || path === undefined || !Object.hasOwn(procedures, path)) return null
  const found = misdirected.get(error)
  if (found !== undefined) return found
  const procedure = procedures[path] as AnyTRPCProcedure
  const own = procedure._def.type
  if (own === type || error.message !== `No "${type}"-procedure on path "${path}"`) return null
  const refusal = new TRPCError({ code: 'METHOD_NOT_SUPPORTED', message: `Unsupported ${type} call to ${own} procedure at path "${path}"` })
  misdirected.set(error, refusal)
  return refusal
}

/** @trpc/server's refusal of one call of a message whose id is null (the others run). */
const ID_REQUIRED = '`id` is required'

// No validation here: the pipeline validates with the op's compiled schema and answers
// VALIDATION_FAILED naming the field, as on every face.
const rawInput = (input: unknown): unknown => input

/**
 * A subscription takes no input (codegen types it `void`; /ws refuses a subscribe frame that
 * carries one, GraphQL an argument): any but none, or null (no input to every call of this
 * face), is refused VALIDATION_FAILED before the subscription starts. Input that is not JSON
 * is refused by tRPC first, as a query's is. Before, any input was taken and ignored.
 * Checked inside the subscription's decision, after its token and roles as a call's input is
 * after them: as tRPC's input parser, the refusal came before the decision and left no audit
 * entry, while the same subscription refused for its roles left one.
 */
const noInput = (input: unknown): void => {
  if (input !== undefined && input !== null) throw new MantleError('VALIDATION_FAILED', 'A subscription takes no input')
}

function callId (ctx: TrpcContext, batchIndex: number | undefined): string {
  if (ctx.requestId === null) return uuidv7()
  return ctx.batch ? `${ctx.requestId}.${batchIndex ?? 0}` : ctx.requestId
}

/**
 * The HTTP guard's count of a subscription a WebSocket starts, as one request of its connection
 * (MessageGuard; null: no guard). Over SSE the subscription is an HTTP request, counted as such.
 */
export type SocketGuard = (socket: WebSocket) => MantleError | null | Promise<MantleError | null>

/**
 * One procedure per manifest operation (query or mutation, named as the op) and one
 * subscription per event, built once at registration. Resolvers only decode and encode:
 * runCall runs the whole pipeline, and its problem becomes the tRPC error.
 */
export function buildRouter (app: FastifyInstance, live: LiveSubscriptions, limits: RouterLimits, guard: SocketGuard | null = null): AnyTRPCRouter {
  const t = initTRPC.context<TrpcContext>().create({
    isDev: false,
    isServer: true,
    errorFormatter: ({ error, ctx, path, type }): MantleErrorShape => {
      const shape = errorShape(wrongMethod(procedures, error, path, type) ?? error, ctx?.requestId ?? earlyRequestIds.get(error) ?? undefined, path)
      if (unparsed.watching && error.code === 'PARSE_ERROR' && path === undefined) {
        unparsed.requestId = shape.data.requestId
        unparsed.idless = error.message === ID_REQUIRED
      }
      return shape
    },
    sse: {
      ping: { enabled: true, intervalMs: limits.ssePingMs },
      client: { reconnectAfterInactivityMs: limits.ssePingMs * 3 }
    }
  })
  const procedures: Record<string, AnyTRPCProcedure> = {}
  const decide = decisions(app)
  // WebSocket subscriptions granted and not yet on the bus (grantedSlot), which counts them from
  // their first pull: the bus's bounds count them as held.
  const granted: Granted = { total: 0, byTenant: new Map() }

  for (const op of app.pipeline.manifest.operations) {
    const name = op.name
    const resolve = async ({ ctx, input, batchIndex }: { ctx: TrpcContext, input: unknown, batchIndex?: number }): Promise<unknown> => {
      const requestId = callId(ctx, batchIndex)
      // Beyond a bound the pipeline refuses the call before anything that costs, so that the
      // refusal has its audit entry like every other. A socket closed as a slow reader holds
      // its client's unread bytes until ws gives up on it: the calls still arriving on it run
      // nothing either. Over HTTP a batch is bounded by BFF_BATCH_MAX_CALLS alone: counted
      // here too, a batch's calls past the 64th were refused OVERLOADED.
      // Once the shutdown has begun a call on a socket is refused too: the socket is going away
      // (its client was told to reconnect), and the shutdown waits only for the calls in flight.
      const refusal = ctx.socket === null
        ? undefined
        : app.shuttingDown()
          ? shuttingDownRefusal()
          : ctx.inFlight >= limits.maxInFlight
            ? new MantleError('OVERLOADED', `A connection runs at most ${limits.maxInFlight} calls at once`, { headers: { 'retry-after': '1' } })
            : slowReader(ctx.socket, limits.maxBufferedBytes) ? new MantleError('OVERLOADED', SLOW_READER) : undefined
      if (refusal === undefined) ctx.inFlight++
      try {
        const key = ctx.keyPerCall ? callKey(ctx.idempotencyKey, String(batchIndex ?? 0)) : ctx.idempotencyKey
        const outcome = await runCall(app, { requestId, reqId: ctx.requestId ?? undefined, protocol: 'trpc', op: name, input, authorization: ctx.authorization, traceparent: ctx.traceparent, tracestate: ctx.tracestate, idempotencyKey: key, memo: ctx.memo, refusal, caller: ctx.caller, clientRequestId: ctx.clientRequestId, answer: ctx.answer })
        // Counted as calls complete, not in the batch's order (README): a streamed batch sends each
        // result as it comes, and waiting for the calls before it would hold every result back.
        const result = ctx.answer?.admit(outcome, op.type === 'query', requestId) ?? outcome
        // The answer, or the error, goes out next (tRPC's respond() sends it whatever the socket
        // holds), so the bound is checked again here: the calls of a batch all start on the same
        // socket. Once closed, tRPC sends the socket nothing more. Calls that end in the same turn
        // (a batch's identical queries, coalesced by the cache) pass this before any of them is
        // sent: the socket may then hold the bound plus their answers, at most maxInFlight. Before,
        // answers went out whatever the socket held: a client that sent small batched queries and
        // never read made the gateway hold their answers without bound (56 MiB for 0.02 MiB sent).
        slowReader(ctx.socket, limits.maxBufferedBytes)
        // The call's header fields, for a response that carries it alone (responseMeta).
        const own = result.ok ? result.headers : result.callHeaders ?? null
        if (own !== null && ctx.requestId !== null) ctx.headers = own
        if (result.ok) {
          if (result.cache !== null && ctx.requestId !== null) (ctx.cache ??= [])[batchIndex ?? 0] = result.cache
          return result.value
        }
        throw ProblemError.of(result.problem, result.headers)
      } finally {
        // The shutdown waits for a socket's calls in flight (adapters/trpc/index.ts).
        if (refusal === undefined && --ctx.inFlight === 0) ctx.idle?.()
      }
    }
    const base = t.procedure.input(rawInput)
    procedures[name] = op.type === 'query' ? base.query(resolve) : base.mutation(resolve)
  }

  for (const event of app.pipeline.manifest.events) {
    const name = event.name
    procedures[name] = t.procedure.input(rawInput).subscription(async ({ ctx, input, signal }) => {
      const requestId = ctx.requestId ?? uuidv7()
      // Checked before the stream starts: a refusal is the subscription's error, not an event.
      // One audit entry for the decision, accepted or refused.
      const decision: Decision = { requestId, protocol: 'trpc', path: '/trpc/' + name, action: name, category: 'read', caller: null, clientRequestId: ctx.clientRequestId }
      const counted = guard === null || ctx.socket === null ? null : guard(ctx.socket)
      const beyond = counted instanceof Promise ? await counted : counted
      // Stopped (subscription.stop) or its socket closed while the guard counted it on Redis:
      // nothing is decided, as a GraphQL subscription completed meanwhile never starts. It was
      // recorded as granted, a subscription tRPC never started.
      if (counted instanceof Promise && (signal?.aborted === true || ctx.socket?.readyState !== WebSocket.OPEN)) return stopped()
      let identity
      try {
        identity = decide(decision, () => {
          // Over SSE, with its HTTP request: a token the guard refused at the request's head is not
          // checked again here (a signature check). A WebSocket's subscriptions name none, as its
          // calls do (requestOf): its token passed createContext, and is found verified.
          const id = decision.caller = app.identify(ctx.authorization, requestOf(ctx.caller))
          if (beyond !== null) throw beyond
          app.events.bus.authorize(name, id)
          noInput(input)
          // The bus checks its bound again at the first pull, once the SSE response's headers are
          // out; a WebSocket's own bound too (overSocket): both are checked here first, so that
          // the refusal is the one recorded.
          app.events.bus.checkRoom(id.tenant, granted.total, granted.byTenant.get(id.tenant) ?? 0)
          if (ctx.socket !== null) socketRoom(ctx, limits)
          return id
        })
      } catch (err) {
        const error = ProblemError.from(err, requestId)
        if (ctx.socket === null) ctx.refused = error.headers
        throw error
      }
      // Over WebSocket the connection itself closes when its token expires (adapters/trpc/index.ts).
      const socket = ctx.socket
      const stream = live.stream(name, identity, signal, requestId, socket === null && !isSocket(ctx.caller) ? ctx.caller : null)
      return socket === null ? pulledSafely(stream) : overSocket(stream, socket, signal, limits, subscriptionSlot(ctx, signal), grantedSlot(granted, identity.tenant, signal))
    })
  }

  return t.router(procedures)
}

/** The stream of a subscription stopped before it was decided: it ends at once, having sent nothing. */
async function * stopped (): AsyncGenerator<never, void, unknown> {}

/**
 * A WebSocket subscription's slot among its connection's, taken as soon as it is decided, given
 * back (the returned function, once) when it ends or is stopped. Counted from the first pull, the
 * subscriptions of one message (wsLink sends every call started in one tick in one message) were
 * all decided before any was counted: past the bound each was answered `started`, recorded as
 * granted, then ended with OVERLOADED. tRPC aborts `signal` when it drops a subscription before
 * starting it (the socket closed meanwhile), whose stream is then never pulled: the slot comes
 * back then too.
 */
function subscriptionSlot (ctx: TrpcContext, signal: AbortSignal | undefined): () => void {
  return heldUntil(signal, () => { ctx.subscriptions++ }, () => { ctx.subscriptions-- })
}

/** `take` now, then `give` once: when the returned function is called, or when `signal` aborts. */
function heldUntil (signal: AbortSignal | undefined, take: () => void, give: () => void): () => void {
  take()
  let held = true
  const release = (): void => {
    if (!held) return
    held = false
    give()
    signal?.removeEventListener('abort', release)
  }
  signal?.addEventListener('abort', release, { once: true })
  return release
}

/** WebSocket subscriptions granted and not yet subscribed on the bus: in all, and by tenant. */
interface Granted { total: number, byTenant: Map<string, number> }

/**
 * A granted WebSocket subscription, counted in `granted` until it is on the bus (the returned
 * function, once: at its first pull, or tRPC's abort of `signal` when it drops it unstarted). The
 * bus counts a subscription from its first pull, and tRPC pulls none of a message's until it
 * has decided them all: subscriptions sent together all passed the bus's bounds (the instance's,
 * the tenant's share), each answered `started`, recorded granted, then ended OVERLOADED.
 */
function grantedSlot (granted: Granted, tenant: string, signal: AbortSignal | undefined): () => void {
  return heldUntil(signal, () => {
    granted.total++
    granted.byTenant.set(tenant, (granted.byTenant.get(tenant) ?? 0) + 1)
  }, () => {
    granted.total--
    const left = (granted.byTenant.get(tenant) ?? 1) - 1
    if (left > 0) granted.byTenant.set(tenant, left)
    else granted.byTenant.delete(tenant)
  })
}

/**
 * A subscription over WebSocket, holding its connection's slot (subscriptionSlot) until it ends.
 *
 * @trpc/server sends each event the moment the stream yields it, whatever the socket already
 * holds for its client. Over SSE the response is written only as fast as the client reads;
 * here the next event is not pulled while the socket holds more than `maxBufferedBytes`, so a
 * client that stops reading lets the bus's queue fill, which loses the oldest events
 * (slow_consumer), as the README promises, instead of the socket's buffer growing without end.
 */
async function * overSocket (stream: AsyncGenerator<unknown, void, unknown>, socket: WebSocket, signal: AbortSignal | undefined, limits: RouterLimits, release: () => void, subscribed: () => void): AsyncGenerator<unknown, void, unknown> {
  try {
    // The first pull subscribes on the bus in this same turn (the stream's first step, below).
    subscribed()
    for await (const payload of stream) {
      yield payload
      if (socket.bufferedAmount > limits.maxBufferedBytes) {
        await drained(socket, limits.maxBufferedBytes, signal)
        if (signal?.aborted === true) return
      }
    }
  } finally {
    subscribed()
    release()
  }
}

/** OVERLOADED when the connection holds its most subscriptions. */
function socketRoom (ctx: TrpcContext, limits: RouterLimits): void {
  if (ctx.subscriptions >= limits.maxSubscriptions) throw new MantleError('OVERLOADED', `A connection holds at most ${limits.maxSubscriptions} subscriptions`)
}

/**
 * How often a paused subscription looks at its socket again: ws has no event for a send buffer
 * that empties. Only paused subscriptions have a timer, one at a time.
 */
const DRAIN_POLL_MS = 25

/**
 * Resolves once the socket holds at most `max` bytes, or is no longer open, or the subscription
 * ends (tRPC aborts `signal` on `subscription.stop` and when the socket closes).
 */
async function drained (socket: WebSocket, max: number, signal: AbortSignal | undefined): Promise<void> {
  if (signal?.aborted === true) return
  await new Promise<void>(resolve => {
    let timer: NodeJS.Timeout
    const done = (): void => {
      clearTimeout(timer)
      signal?.removeEventListener('abort', done)
      resolve()
    }
    const later = (): void => {
      timer = setTimeout(check, DRAIN_POLL_MS)
      timer.unref()
    }
    const check = (): void => {
      if (socket.bufferedAmount <= max || socket.readyState !== socket.OPEN) done()
      else later()
    }
    signal?.addEventListener('abort', done, { once: true })
    later()
  })
}
