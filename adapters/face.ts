import type { FastifyInstance } from 'fastify'
import type { LoadShedding } from '../plugins/pressure/index.js'
import { CallContext, isSocket, type AnswerHold, type Protocol, type CacheOutcome, type Caller } from '../plugins/pipeline/index.js'
import { toProblem, logLevelOf, detailForLog, retryAfterOf, MantleError, type Problem } from '../errors.js'
import type { Decision } from '../plugins/audit/index.js'
import type { MessageGuard } from '../plugins/rate-limit/index.js'
import type { UnreadBytes } from './unread.js'
export type { Decision }

/** What app.ts hands every face besides REST. */
export interface FaceOptions {
  /** Largest request body or frame, in bytes (BFF_BODY_LIMIT). */
  bodyLimit: number
  /** Most calls one request may carry (BFF_BATCH_MAX_CALLS). */
  maxCalls: number
  /** Deepest GraphQL query (BFF_GRAPHQL_MAX_DEPTH). */
  maxDepth: number
  /** Whether GraphQL answers introspection (BFF_GRAPHQL_INTROSPECTION); unset: as `development`. */
  introspection?: boolean | undefined
  /** Whether identity is on (faces then document and require a bearer token). */
  secured: boolean
  /** GraphiQL and other developer aids, outside production only. */
  development: boolean
  /**
   * WebSocket connections one tenant may hold on each face that upgrades, its share of the
   * face's maxConnections (BFF_WS_MAX_CONNECTIONS_PER_TENANT); unset: no share (identity off:
   * every caller is one tenant).
   */
  maxConnectionsPerTenant?: number | undefined
  /**
   * What every WebSocket of the instance holds unread, all faces together, and each tenant's
   * share (app.ts makes one for all the faces); unset: the face makes its own (defaultUnreadBytes).
   */
  unread?: UnreadBytes | undefined
}

export interface FaceCall {
  requestId: string
  /**
   * The id of the HTTP request that carried the call (`requestId` without its `.n`), or of a
   * /ws connection's upgrade request: the call's `call failed` and `unexpected error` lines carry
   * it as `reqId`, as the access log's lines do.
   */
  reqId?: string | undefined
  protocol: Protocol
  op: string
  input: unknown
  authorization: string | undefined
  traceparent?: string | undefined
  /** The caller's tracestate, forwarded with the traceparent (CallContext.tracestate). */
  tracestate?: string | undefined
  idempotencyKey?: string | null | undefined
  /** A refusal the face decided (a bound of its own): the pipeline's validation stage throws it. */
  refusal?: MantleError | undefined
  /** Shared by the calls of one request: identical queries reach the Kernel once. */
  memo?: Map<string, Promise<unknown>> | null
  /** The response or the WebSocket the answer goes to: a call whose caller left is cancelled. */
  caller?: Caller | null
  /** `requestId` is (or derives from) the client's own x-request-id (CallContext.clientRequestId). */
  clientRequestId?: boolean
  /** The bound on the answer of a request of several calls, which decides on this call's result after it (CallContext.answer). */
  answer?: AnswerBudget | null
}

/** A call's answer as JSON shaped by the op's output schema; `value` parses it on first use. */
export class FaceValue {
  readonly ok = true
  private parsed: unknown = undefined
  private done = false
  /**
   * @param headers the response headers the stages set (null: none), for faces that answer one
   *   call per HTTP response
   * @param cache the response cache's outcome (null: the cache does not apply)
   */
  constructor (readonly json: string, readonly status: number, readonly headers: Record<string, string> | null = null, readonly cache: CacheOutcome | null = null) {}
  get value (): unknown {
    if (!this.done) {
      this.parsed = JSON.parse(this.json)
      this.done = true
    }
    return this.parsed
  }
}

/**
 * What the stages decided about a call, as the members a JSON envelope carries after its
 * result or error (`,"replayed":true` for a stored idempotent outcome, a refusal's too;
 * `,"cache":"hit|miss|stale"`), as REST's headers say it. For the faces that answer several
 * calls in one message: the REST batch and WebSocket frames.
 */
function resultMarkers (outcome: FaceResult): string {
  const replayed = outcome.headers?.['idempotent-replayed'] === 'true' ? ',"replayed":true' : ''
  return outcome.ok && outcome.cache !== null ? replayed + ',"cache":"' + outcome.cache + '"' : replayed
}

/**
 * A problem as the JSON error object of a face that carries several calls in one message, with
 * `retryAfter` (seconds) when the refusal asks for a wait (RATE_LIMITED, OVERLOADED, ...): a
 * WebSocket frame has no Retry-After header to say it in.
 */
export function problemJson (problem: Problem, headers: Record<string, string> | null): string {
  const retryAfter = retryAfterOf(headers)
  return JSON.stringify(retryAfter === undefined ? problem : { ...problem, retryAfter })
}

/** A call's answer in the envelope of a face that carries several calls: `{"id":…,"result"|"error":…}` and its markers. */
export function callEnvelope (id: string, outcome: FaceResult): string {
  return (outcome.ok ? '{"id":' + id + ',"result":' + outcome.json : '{"id":' + id + ',"error":' + problemJson(outcome.problem, outcome.headers)) + resultMarkers(outcome) + '}'
}

export interface FaceProblem {
  ok: false
  problem: Problem
  /** The refusal's own header fields (Retry-After, ...). */
  headers: Record<string, string> | null
  /**
   * The header fields the stages had set when the call failed (an operation's RateLimit-*: the
   * call used part of its limit), for a face whose answer carries this call alone, under the
   * refusal's own, as REST's does.
   */
  callHeaders?: Record<string, string> | null
}
export type FaceResult = FaceValue | FaceProblem

/**
 * The most characters of results that the calls of one request answer together: a REST or
 * tRPC batch (AnswerBudget), a GraphQL document (measured on its answer as sent, where aliases
 * repeat values: adapters/graphql). Each call's answer is bounded (the Kernel's, 10 MB), but
 * identical queries share one Kernel call: 50 calls of one 9.5 MB query made a 475 MB answer
 * from a 2.4 KB request, on each of the three faces.
 */
export const MAX_ANSWER_CHARS = 32 * 1024 * 1024

/**
 * The results the calls of one request have answered so far. A query's result that would take
 * them past MAX_ANSWER_CHARS is left out, its call answered PAYLOAD_TOO_LARGE, to be asked again;
 * a mutation's result is always kept, since its effect has happened. The audit entry of each call
 * that succeeded waits here for that decision (CallContext.answer), so that it records what the
 * client gets: every call the face hands it must be decided (admit, or decide), and a
 * face that may not reach each one releases them once its answer is made.
 */
export class AnswerBudget implements AnswerHold {
  private used = 0
  // What the stages hold by request id (the audit's entry, the metrics' observation: a list
  // once there are two); null until the first (none with the audit and the metrics off).
  private held: Map<string, Held | Held[]> | null = null
  private released = false

  hold (requestId: string, record: Held): void {
    if (this.released) {
      record(null)
      return
    }
    const held = this.held ??= new Map()
    const before = held.get(requestId)
    if (before === undefined) held.set(requestId, record)
    else if (Array.isArray(before)) before.push(record)
    else held.set(requestId, [before, record])
  }

  /** `outcome`, counted, or PAYLOAD_TOO_LARGE in its place when it is a query's result that does not fit. */
  admit (outcome: FaceResult, query: boolean, requestId: string): FaceResult {
    if (!outcome.ok) {
      this.decide(requestId, null)
      return outcome
    }
    if (query && this.used + outcome.json.length > MAX_ANSWER_CHARS) {
      const { problem, headers } = toProblem(new MantleError('PAYLOAD_TOO_LARGE', `The answer would pass ${MAX_ANSWER_CHARS} characters: this query's result is left out, ask for it again`), requestId)
      this.decide(requestId, problem)
      return { ok: false, problem, headers }
    }
    this.used += outcome.json.length
    this.decide(requestId, null)
    return outcome
  }

  /** The characters still free in the answer. */
  room (): number {
    return MAX_ANSWER_CHARS - this.used
  }

  /** Counts `chars` when they fit in the answer; false, and nothing counted, when they do not. */
  take (chars: number): boolean {
    if (this.used + chars > MAX_ANSWER_CHARS) return false
    this.used += chars
    return true
  }

  /** Records every entry still held as its call ended, and any held after: the answer is made. */
  release (): void {
    this.released = true
    const held = this.held
    this.held = null
    if (held !== null) for (const records of held.values()) recordAll(records, null)
  }

  /**
   * Records what is held of the call `requestId` (none held: nothing to do): `leftOut` null,
   * its result was answered; else the code and status answered in its place.
   */
  decide (requestId: string, leftOut: LeftOut | null): void {
    const records = this.held?.get(requestId)
    if (records === undefined) return
    this.held!.delete(requestId)
    recordAll(records, leftOut)
  }
}

type Held = (leftOut: LeftOut | null) => void

function recordAll (records: Held | Held[], leftOut: LeftOut | null): void {
  if (Array.isArray(records)) for (const record of records) record(leftOut)
  else records(leftOut)
}

/** Runs a face's decision outside the pipeline, and records it (Audit.decide). */
export type Decide = <T>(decision: Decision, decide: () => T) => T

/**
 * How a face runs a decision it makes outside the pipeline on behalf of a connection (a
 * subscription to an event, a /ws re-auth frame): through the audit trail, which records each
 * one, accepted or refused; with the audit off, it just runs. Taken once, at the face's
 * registration (after the audit plugin's).
 */
export function decisions (app: FastifyInstance): Decide {
  return app.hasDecorator('audit') ? app.audit.decide : (_decision, decide) => decide()
}

/**
 * The HTTP guard's count of a WebSocket message that is no operation's call (MessageGuard), or
 * null when there is no guard. Taken once, at the face's registration (after the rate-limit plugin's).
 */
export function messageGuardOf (app: FastifyInstance): MessageGuard | null {
  return app.hasDecorator('messageGuard') ? app.messageGuard : null
}

type LeftOut = Pick<Problem, 'code' | 'status'>

/**
 * One call through the pipeline, exactly as REST makes it, for the faces that carry calls in
 * their own envelopes. Never throws: the outcome is a value or the problem every face encodes.
 */
export async function runCall (app: FastifyInstance, call: FaceCall): Promise<FaceResult> {
  let ctx: CallContext | undefined
  try {
    const pipeline = app.pipeline
    // A call on a WebSocket already open never passed onRequest, where load shedding refuses
    // HTTP requests: while the instance sheds it is refused here, before any stage, as a shed
    // request is (OVERLOADED, the same wait as `retryAfter`; counted in mantle_load_shed_total,
    // not a call). With load shedding off there is no decorator: one undefined read.
    const shedding = (app.loadShedding as LoadShedding | undefined)?.refuse
    if (shedding !== undefined && call.caller != null && isSocket(call.caller)) {
      const shed = shedding()
      if (shed !== null) throw shed
    }
    const op = pipeline.manifest.byName.get(call.op)
    if (op === undefined) throw new MantleError('NOT_FOUND', `No operation ${call.op}`)
    // An input that is not an object goes on as it is: the validation stage refuses it, within
    // the pipeline, so that the refusal has its audit entry.
    const input = call.input === undefined || call.input === null ? {} : call.input
    ctx = new CallContext(call.requestId, call.protocol, op, input as Record<string, unknown>, call.authorization, call.traceparent, op.type === 'mutation' ? call.idempotencyKey : undefined)
    ctx.tracestate = call.tracestate
    if (call.clientRequestId === true) ctx.clientRequestId = true
    if (call.memo !== undefined) ctx.memo = call.memo
    if (call.refusal !== undefined) ctx.refusal = call.refusal
    if (call.caller != null) ctx.caller = call.caller
    if (call.answer != null) ctx.answer = call.answer
    const entry = pipeline.entry(op.name)
    const result = await entry.run(ctx)
    return new FaceValue(ctx.json ?? entry.serialize(result), ctx.status, ctx.headers, ctx.cache)
  } catch (err) {
    const { problem, headers } = toProblem(err, call.requestId)
    const level = logLevelOf(problem, headers)
    if (level === 'error') app.log.error(call.reqId === undefined ? { err, requestId: call.requestId } : { reqId: call.reqId, err, requestId: call.requestId }, 'unexpected error')
    else if (level === 'warn') {
      app.callFailedLog.warn(app.log, call.op, problem.code, call.reqId === undefined
        ? { code: problem.code, detail: detailForLog(err, problem), requestId: call.requestId }
        : { reqId: call.reqId, code: problem.code, detail: detailForLog(err, problem), requestId: call.requestId })
    }
    return { ok: false, problem, headers, callHeaders: ctx?.headers ?? null }
  }
}
