import type { Operation } from '../../manifest.js'
import type { Zone } from '../../schemas/manifest.js'
import type { Caller } from './caller.js'

export type Protocol = 'rest' | 'trpc' | 'graphql' | 'websocket' | 'batch'
export const PROTOCOLS: readonly Protocol[] = ['rest', 'trpc', 'graphql', 'websocket', 'batch']

const ANONYMOUS_ROLES: readonly string[] = Object.freeze([])

/** How risky a call's input looked to the AI firewall (none when it is off or found nothing). */
export type RiskLevel = 'none' | 'low' | 'medium' | 'high' | 'critical'
/** One kind of thing the AI firewall found in a call's input: never the matched text itself. */
export interface Finding {
  /** injection | secret | pii */
  readonly category: 'injection' | 'secret' | 'pii'
  /** The rule family, e.g. `aws-access-key`, `email`, `ignore-instructions`. */
  readonly type: string
  /** 0..1, how sure the rule is. */
  readonly score: number
  /** The input field it was found in. */
  readonly field: string
}
/** Where a query's answer came from, when the response cache applies to the op. */
export type CacheOutcome = 'hit' | 'miss' | 'stale'

/**
 * The answer of a request that carries several calls, bounded as a whole (adapters/face.ts,
 * AnswerBudget): once a call has run, its face decides whether its result goes in the answer or
 * PAYLOAD_TOO_LARGE goes in its place. The audit stage holds the entry of such a call that
 * succeeded until then, and the metrics stage its observation, so that both record what the
 * client gets.
 */
export interface AnswerHold {
  /**
   * Holds `record` until the face has decided on the call `requestId`: called with null when its
   * result is answered, else with the code and status answered in its place.
   */
  hold: (requestId: string, record: (leftOut: { code: string, status: number } | null) => void) => void
}

/**
 * The one object a call carries through the pipeline. Every field is set in the constructor,
 * in the same order, so all contexts share one hidden class. Stages fill identity and
 * outcome; they never reach back to the adapter's request.
 */
export class CallContext {
  readonly requestId: string
  readonly protocol: Protocol
  readonly op: Operation
  input: Record<string, unknown>
  /** The raw `Authorization` value (or the WebSocket's token), read by the identity stage. */
  readonly authorization: string | undefined
  /** The caller's W3C traceparent; the tracing stage replaces it with the call's own span. */
  traceparent: string | undefined
  /**
   * The caller's W3C tracestate, as received (undefined: none); forwarded with the traceparent
   * when both are valid (the tracing stage drops it when the traceparent was not).
   */
  tracestate: string | undefined
  /** True when `traceparent` is the call's own span, which the Kernel call then continues. */
  traced: boolean
  /** The mutation's Idempotency-Key; null: one was sent that no store could key on (validation refuses it). */
  readonly idempotencyKey: string | null | undefined
  tenant: string
  user: string
  roles: readonly string[]
  zone: Zone
  /** The Kernel's 2xx status for the answer (REST passes 201/202 on). */
  status: number
  /**
   * The Kernel answered 2xx: what it was asked is done, even should the answer be refused after
   * (empty, or breaking the output schema): a mutation's cache tags are dropped then too.
   */
  answered: boolean
  /**
   * The request went out to the Kernel (a connection took it): the Kernel may have acted on it,
   * whatever came back, a timeout or a lost connection included.
   */
  sent: boolean
  /**
   * An attempt the Kernel may have acted on (it went out, then a 5xx or a lost connection) was
   * retried: a refusal of a later attempt (a 412 to If-None-Match: *, the target made by the first
   * one) does not show that nothing changed.
   */
  retriedSent: boolean
  readonly startedAt: number
  /**
   * Shared by the calls of one request that carries several (a REST batch, a GraphQL document,
   * a tRPC batch): identical query calls reach the Kernel once. Each call still runs every
   * stage on its own. null for a call that comes alone.
   */
  memo: Map<string, Promise<unknown>> | null
  /**
   * The bound on the answer of the request the call is one of, which its face applies once the
   * call has run (a REST batch, a tRPC batch, a GraphQL document); null for a call alone.
   */
  answer: AnswerHold | null
  /**
   * Response headers stages add for the HTTP faces (x-cache, ETag, Cache-Control, RateLimit-*,
   * Idempotent-Replayed), applied by the adapter on success. null until a stage sets one.
   * Refusals carry their headers on the MantleError instead.
   */
  headers: Record<string, string> | null
  /** What the stages decided, for the audit entry and the faces: cache outcome (null: no cache). */
  cache: CacheOutcome | null
  /** True when the idempotency stage answered with a stored result. */
  replayed: boolean
  /** The firewall's verdict: the highest risk of its findings, and the findings (null: none). */
  risk: RiskLevel
  findings: readonly Finding[] | null
  /**
   * REST's `If-None-Match`: on a query the cache's (it answers 304 when it matches); on a mutation
   * the Kernel's, sent on to it (RFC 9110 §13.2.1). Else undefined.
   */
  ifNoneMatch: string | undefined
  /** REST's `If-Match: *` on a mutation, sent on to the Kernel (the adapter refuses any other); else undefined. */
  ifMatch: string | undefined
  /**
   * The answer already encoded by the op's output serializer, when a stage holds it so (a cache
   * hit): the faces send it as it is instead of serializing the value again. null: serialize.
   */
  json: string | null
  /**
   * A refusal a face decided before the call (a bound of its own, e.g. calls in flight on one
   * connection): thrown by the validation stage, within the pipeline, so that it is audited.
   */
  refusal: Error | null
  /**
   * Where the answer goes, set by the face (null: no one to leave, e.g. a cache refresh): the
   * Kernel call watches it, and a call whose caller left is cancelled (README, "Clients that leave").
   */
  caller: Caller | null
  /**
   * The request id is (or derives from) the client's own `x-request-id`, which it may send again:
   * its audit entry is looked up before it is stored (plugins/audit, "Request ids").
   */
  clientRequestId: boolean

  constructor (requestId: string, protocol: Protocol, op: Operation, input: Record<string, unknown>, authorization: string | undefined, traceparent: string | undefined, idempotencyKey: string | null | undefined) {
    this.requestId = requestId
    this.clientRequestId = false
    this.protocol = protocol
    this.op = op
    this.input = input
    this.authorization = authorization
    this.traceparent = traceparent
    this.tracestate = undefined
    this.traced = false
    this.idempotencyKey = idempotencyKey
    // With identity off every call is the public tenant's anonymous user.
    this.tenant = 'public'
    this.user = 'anonymous'
    this.roles = ANONYMOUS_ROLES
    this.zone = 'public'
    this.status = 200
    this.answered = false
    this.sent = false
    this.retriedSent = false
    this.startedAt = performance.now()
    this.memo = null
    this.answer = null
    this.headers = null
    this.cache = null
    this.replayed = false
    this.risk = 'none'
    this.findings = null
    this.ifNoneMatch = undefined
    this.ifMatch = undefined
    this.json = null
    this.refusal = null
    this.caller = null
  }

  /** Adds a response header for the HTTP faces. */
  setHeader (name: string, value: string): void {
    if (this.headers === null) this.headers = {}
    this.headers[name] = value
  }
}
