import { Pool, type Dispatcher } from 'undici'
import { checkedTracestate, parseTraceparent, randomHex } from '../../ids.js'
import { setTimeout as sleep } from 'node:timers/promises'
import type { EventEmitter } from 'node:events'
import { MantleError } from '../../errors.js'
import type { BreakerSettings, Operation } from '../../manifest.js'
import { Leave, callerGone, watchCaller, unwatchCaller, type CallContext, type Next } from '../pipeline/index.js'
import { CircuitBreaker, RetryBudget, DENIED, NORMAL, PROBE, type BreakerState, type OpenReason, type Permit } from './breaker.js'
import { getHeapStatistics } from 'node:v8'
import { INVALID, OVER_BUDGET, readJson, type ByteBudget } from '../../read-json.js'

export interface KernelClientOptions {
  origin: string
  connections: number
  retries: number
  /**
   * The bulkhead: calls in flight at once, those waiting for a connection included; beyond it a
   * call fails fast. It applies whatever the breaker flag: it is what bounds the calls waiting.
   */
  maxInFlight: number
  /** null: retries and the breaker are off (BFF_CIRCUIT_BREAKER_ENABLED=false). */
  resilience: BreakerSettings | null
  /** Largest Kernel answer read, in bytes; a larger one is a KERNEL_ERROR. */
  maxResponseBytes?: number
  /**
   * The bytes of 2xx answers being read at once, all calls together (an eighth of V8's heap limit
   * by default, never below maxResponseBytes): a call whose answer finds no room is answered
   * 503 OVERLOADED, its answer cut (answerBytes).
   */
  maxAnswerBytes?: number
  /**
   * How long an idle connection is kept for reuse when the Kernel's answer has no Keep-Alive
   * timeout (4000 ms by default). It must stay below the Kernel's own idle timeout: a Kernel that
   * closes an idle connection first races the next call onto it, which then fails (a mutation
   * without a key as 503, a breaker failure each).
   */
  keepAliveTimeoutMs?: number
  /** Backoff before retry n (0-based) is a random delay in [0, min(cap, base * 2^n)]. */
  backoff?: { baseMs: number, capMs: number }
  metrics?: KernelMetrics
  /** Told of each change of the breaker's state, with why it opened (null for any other change). */
  onBreakerChange?: (state: BreakerState, why: OpenReason | null) => void
}

/** `client_closed`: the caller left, and the attempt was aborted or gave up waiting for a connection. */
export type Outcome = 'ok' | 'client_error' | 'redirect' | 'bad_answer' | 'server_error' | 'timeout' | 'unavailable' | 'client_closed'

/** What the client reports; a no-op implementation when metrics are off. */
export interface KernelMetrics {
  /** Resolved once per operation: an observer per outcome, so no label lookup per call. */
  forOperation: (op: string) => { call: Record<Outcome, (seconds: number) => void>, retry: () => void }

  budgetExhausted: () => void
  rejected: (reason: 'breaker_open' | 'bulkhead_full' | 'queue_timeout' | 'queue_shed') => void
  /** A 2xx answer cut for want of room among the answers being read (answerBytes). */
  answerDropped: () => void
  connected: () => void
}

const nothing = (): void => {}
const noOpMetrics = { call: { ok: nothing, client_error: nothing, redirect: nothing, bad_answer: nothing, server_error: nothing, timeout: nothing, unavailable: nothing, client_closed: nothing }, retry: nothing }
const noMetrics: KernelMetrics = { forOperation: () => noOpMetrics, budgetExhausted: nothing, rejected: nothing, answerDropped: nothing, connected: nothing }

// undici's own error codes, by what they mean for a call. Unknown codes count as unreachable.
const TIMEOUT_CODES = new Set(['UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT'])

/** A W3C traceparent for the Kernel call: the caller's trace, with a new span as parent. */
export function childTraceparent (incoming: string | undefined): string {
  const span = randomHex(8)
  const parent = parseTraceparent(incoming)
  if (parent !== null) return `00-${parent.traceId}-${span}-${parent.flags}`
  return `00-${randomHex(16)}-${span}-01`
}

interface Attempt {
  outcome: Outcome
  status: number
  value: unknown
  message: string | undefined
  /** The request did not go out: no connection was made (refused, no such host, still opening), or none came free in time. */
  unsent?: true
  /** A 4xx's or 5xx's Retry-After, as whole seconds (a 429 or 503 of the Kernel's asks for a wait). */
  retryAfter?: string
}

// Failures to connect: the request never went out, so the Kernel did nothing.
const CONNECT_CODES = new Set(['ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'UND_ERR_CONNECT_TIMEOUT'])

export class KernelClient {
  readonly origin: string
  readonly pool: Pool
  readonly breaker: CircuitBreaker | null
  readonly budget: RetryBudget | null
  private readonly retries: number
  private readonly maxInFlight: number
  private readonly maxBytes: number
  private readonly backoff: { baseMs: number, capMs: number }
  private readonly metrics: KernelMetrics
  inFlight = 0
  /**
   * The bytes of the 2xx answers being read now, all calls together, bounded by maxAnswerBytes
   * (mantle_kernel_answer_bytes). Each call's answer was bounded (maxResponseBytes, 10 MB) but not
   * their sum: 24 calls answered 9.4 MB lists at once took the heap past 384 MB (the Deployment's
   * --max-old-space-size) and the process died of it, every call of every tenant with it; load
   * shedding refuses new requests only, not the answers of those already sent.
   */
  answerBytes = 0
  private readonly maxAnswerBytes: number
  private readonly answerBudget: ByteBudget
  /**
   * Connections free for an attempt, and the attempts waiting for one, first come first served
   * (fewer than the calls in flight, so under maxInFlight, breaker or not: with the bulkhead off
   * along with the breaker, a slow Kernel let them grow by rate x timeout). They wait here, each
   * bounded by its call's deadline, not in undici's queue: undici aborts a queued request whose
   * signal fired only once it gets a connection, and destroys that connection. A slow operation
   * filling the pool made every call queued behind it tear down a healthy keep-alive connection,
   * and count as a Kernel timeout for the breaker. A linked list: one whose time ran out leaves
   * it in O(1) (indexOf and splice in an array were O(n) each, O(n^2) for a queue timing out).
   */
  private free: number
  /** What any operation's Kernel calls need: an operation's estimate before its first answer (Need). */
  private readonly anyNeed = new Need(null)
  /**
   * Each operation's Need, by name, with the Kernel route it was learnt on: a manifest reload
   * builds every operation's call again (forOperation), and each built a new one, so what the
   * operation had learnt was lost and it asked the client's estimate again (another operation's
   * slow answers refused its calls past capacity after every reload; found by a review). As many
   * as the manifest has operations (a reload adds or removes none).
   */
  private readonly needs = new Map<string, { route: string, need: Need }>()
  private head: Waiter | null = null
  private tail: Waiter | null = null
  private waiting = 0

  /** Attempts waiting for a free connection (mantle_kernel_pool{state="queued"}). */
  get queued (): number {
    return this.waiting
  }

  constructor (opts: KernelClientOptions) {
    this.origin = opts.origin
    this.metrics = opts.metrics ?? noMetrics
    this.free = opts.connections
    // No headersTimeout/bodyTimeout of undici's (300 s by default): each attempt's Deadline
    // bounds both, and an operation may allow up to 600 s.
    this.pool = new Pool(opts.origin, { connections: opts.connections, pipelining: 1, keepAliveTimeout: opts.keepAliveTimeoutMs ?? 4_000, connectTimeout: 2_000, headersTimeout: 0, bodyTimeout: 0 })
    this.pool.on('connect', () => this.metrics.connected())
    const r = opts.resilience
    this.breaker = r === null ? null : new CircuitBreaker(r, opts.onBreakerChange)
    this.budget = r === null ? null : new RetryBudget()
    this.retries = r === null ? 0 : opts.retries
    this.maxInFlight = opts.maxInFlight
    this.maxBytes = opts.maxResponseBytes ?? 10 * 1024 * 1024
    this.maxAnswerBytes = Math.max(this.maxBytes, opts.maxAnswerBytes ?? Math.floor(getHeapStatistics().heap_size_limit / 8))
    this.answerBudget = {
      take: (bytes) => {
        if (this.answerBytes + bytes > this.maxAnswerBytes) return false
        this.answerBytes += bytes
        return true
      },
      give: (bytes) => { this.answerBytes -= bytes }
    }
    this.backoff = opts.backoff ?? { baseMs: 25, capMs: 500 }
  }

  /** Builds the terminal stage of an operation: path template, query and body plans once. */
  forOperation (op: Operation): Next {
    const method = op.kernel.method
    const parts = op.kernel.path.split(/\{([^}]+)\}/) // even indexes: literal text, odd: param names
    // Only the Kernel path's own {x}: a field the REST path carries (`:x`) that the Kernel path does
    // not is input like any other, for the query or the body (CONTRACT §1). It was left out.
    const pathParams = new Set(op.kernel.pathParams)
    const sendsBody = op.kernel.sendsBody
    // A mutation the Kernel serves over GET changes state all the same: no retry without a key.
    const idempotentMethod = method === 'GET' && op.type === 'query'
    // A query's conditions are the gateway's own (its cache's ETags); a mutation's are the Kernel's.
    const conditional = op.type === 'mutation'
    const metrics = this.metrics.forOperation(op.name)
    const route = `${method} ${op.kernel.path}`
    let kept = this.needs.get(op.name)
    if (kept === undefined || kept.route !== route) {
      kept = { route, need: new Need(this.anyNeed) }
      this.needs.set(op.name, kept)
    }
    const need = kept.need
    const client = this

    return function callKernel (ctx: CallContext) {
      const input = ctx.input
      let path = parts[0]
      for (let i = 1; i < parts.length; i += 2) {
        const value = input[parts[i]]
        // JSON's null has no form in a path: String(null) named the resource "null".
        if (value === null) throw new MantleError('VALIDATION_FAILED', `input.${parts[i]} must not be null: it is a segment of the Kernel's path`)
        const segment = pathSegment(value)
        // An empty one names another Kernel route: `DELETE /v1/items/{id}` with id "" is
        // `DELETE /v1/items/`, which a Kernel ignoring trailing slashes takes for the collection.
        if (segment === '') throw new MantleError('VALIDATION_FAILED', `input.${parts[i]} must not be empty: it is a segment of the Kernel's path`)
        path += segment + parts[i + 1]
      }
      // encodeURIComponent leaves dots: only a parameter can make a segment `.` or `..` (the
      // manifest refuses one of its own, manifest.ts).
      if (parts.length > 1 && path.includes('.')) refuseDotSegments(path, parts, input)
      let body: string | undefined
      if (sendsBody) {
        // The input as it is when the path takes none of it (no `__proto__` key reaches here: the
        // pipeline refuses one): the copy cost 38 ms of the event loop for 60,000 keys.
        if (pathParams.size === 0) body = JSON.stringify(input)
        else {
          const rest: Record<string, unknown> = {}
          for (const key in input) if (!pathParams.has(key)) rest[key] = input[key]
          body = JSON.stringify(rest)
        }
      } else {
        const query = new URLSearchParams()
        for (const key in input) {
          if (pathParams.has(key)) continue
          const v = input[key]
          if (v === undefined || v === null) continue
          // A field the input schema does not declare may be anything: an object cannot go in a
          // query string (it went as "[object Object]", and one whose toString is not a function
          // threw, a 500). Declared fields are held to scalars when the manifest compiles.
          if (Array.isArray(v)) {
            for (let i = 0; i < v.length; i++) {
              const item: unknown = v[i]
              // A null item has no form in a query string: it went as the text "null".
              if (item === null) throw new MantleError('VALIDATION_FAILED', `input.${key}.${i} is null, which the Kernel's query string cannot carry`)
              if (typeof item === 'object') throw notInQuery(key)
              query.append(key, String(item))
            }
          } else if (typeof v === 'object') {
            throw notInQuery(key)
          } else {
            query.append(key, String(v))
          }
        }
        const qs = query.toString()
        if (qs !== '') path += '?' + qs
      }
      const headers: Record<string, string> = {
        'x-request-id': ctx.requestId,
        'x-tenant-id': ctx.tenant,
        'x-user-id': ctx.user,
        'x-user-roles': ctx.roles.join(','),
        traceparent: ctx.traced ? ctx.traceparent! : childTraceparent(ctx.traceparent)
      }
      // The caller's tracestate goes on with its trace, when it is well formed and within its
      // bounds; not with a trace started here (its traceparent was absent or invalid: the tracing
      // stage has then dropped it, and childTraceparent started a new trace). Nothing to do
      // without one.
      if (ctx.tracestate !== undefined && (ctx.traced || parseTraceparent(ctx.traceparent) !== null)) {
        const tracestate = checkedTracestate(ctx.tracestate)
        if (tracestate !== undefined) headers.tracestate = tracestate
      }
      if (body !== undefined) headers['content-type'] = 'application/json'
      if (ctx.idempotencyKey != null) headers['idempotency-key'] = ctx.idempotencyKey
      if (conditional) {
        if (ctx.ifNoneMatch !== undefined) headers['if-none-match'] = ctx.ifNoneMatch
        if (ctx.ifMatch !== undefined) headers['if-match'] = ctx.ifMatch
      }
      return client.execute(ctx, op, metrics, need, method, path, headers, body, idempotentMethod || ctx.idempotencyKey != null)
    }
  }

  async execute (ctx: CallContext, op: Operation, metrics: ReturnType<KernelMetrics['forOperation']>, need: Need, method: Dispatcher.HttpMethod, path: string, headers: Record<string, string>, body: string | undefined, idempotent: boolean): Promise<unknown> {
    const caller = ctx.caller
    // A caller already gone takes no slot (a call of a batch whose client left while the calls
    // before it ran, say).
    if (caller !== null && callerGone(caller)) throw clientClosed()
    if (this.inFlight >= this.maxInFlight) {
      this.metrics.rejected('bulkhead_full')
      throw new MantleError('KERNEL_UNAVAILABLE', 'Too many calls are in flight to the Kernel', { headers: { 'retry-after': '1' } })
    }
    this.inFlight++
    // Made here, for a call about to wait on the Kernel, not per request: a cache hit, a refusal
    // or a call without a caller (a cache refresh) pays nothing for it.
    const leave = caller === null ? null : new Leave()
    if (leave !== null) watchCaller(caller!, leave.onLeave)
    try {
      this.budget?.deposit()
      const deadline = ctx.startedAt + op.timeoutMs
      // The failure a retry is made for: what the call answers should the retry not be sent, and
      // how long that attempt took (the least time left a retry is sent with).
      let retried: Attempt | null = null
      let retriedMs = 0
      for (let attempt = 0; ; attempt++) {
        // The caller left during the backoff: no retry for no one.
        if (leave?.gone() === true) throw clientClosed()
        const permit: Permit = this.breaker === null ? NORMAL : this.breaker.acquire()
        if (permit === DENIED) {
          this.metrics.rejected('breaker_open')
          const seconds = Math.max(1, Math.ceil(this.breaker!.retryAfterMs() / 1000))
          throw new MantleError('KERNEL_UNAVAILABLE', 'The Kernel circuit breaker is open', { headers: { 'retry-after': String(seconds) } })
        }
        const remaining = deadline - performance.now()
        if (retried !== null && remaining < retriedMs) {
          // The backoff ended later than planned (a busy event loop fires timers late): the retry
          // no longer has the failed attempt's time left, and is not sent. It went out with what
          // was left, or not at all, and the call answered 504 KERNEL_TIMEOUT for the Kernel's 5xx.
          this.breaker?.release(permit)
          throw failure(retried, op)
        }
        if (remaining <= 0 || (remaining < MIN_SEND_MS && op.timeoutMs - remaining >= MIN_SEND_MS)) {
          // The call's time ran out, or all but MIN_SEND_MS of it, before it reached the Kernel
          // (waiting behind an idempotent first call, say): the Kernel was not asked, so this is no
          // failure of the Kernel's. Sent with a few ms left, as a call handed a connection so is
          // not, it timed out, sent: the Kernel carried a mutation out for a 504, and three such
          // calls opened the breaker (threshold 3) on a Kernel answering in 30 ms (found by a review).
          this.breaker?.release(permit)
          throw failure(retried ?? timedOut, op)
        }
        const started = performance.now()
        let result: Attempt
        try {
          // A half-open breaker's probe, once sent, is let finish as a mutation is (attempt): aborted
          // when its caller left, it was handed back (release) as never sent, and the next call
          // went out as another probe at once, one per client that left (a load balancer giving up
          // before the operation's timeout), to a Kernel that may hang on each; and no probe's
          // outcome ever closed or opened the breaker.
          result = await this.attempt(method, path, headers, body, remaining, op.timeoutMs, need, leave, op.type === 'mutation' || permit === PROBE)
        } catch (err) {
          // undici refused to send what the gateway built (a header value it cannot carry): the
          // gateway's fault, not the Kernel's. Neither retried nor a breaker failure; before, it
          // counted as the Kernel being down, and a few such calls opened the breaker for all.
          this.breaker?.release(permit)
          throw err
        }
        if (result.unsent !== true) ctx.sent = true
        if (result === leftQueued || result === leftSent) {
          // Cancelled because its caller left: no failure of the Kernel's, and no retry. Counted
          // (outcome client_closed): before, such a call left no Kernel metric at all.
          metrics.call.client_closed((performance.now() - started) / 1000)
          this.breaker?.release(permit)
          throw clientClosed()
        }
        if (result === queuedOut) {
          // Its time ran out waiting for a connection: never sent, so no failure of the Kernel's.
          this.breaker?.release(permit)
          // A retry so ended answers the failure it was made for, as a retry shed does.
          if (retried !== null) throw failure(retried, op)
          this.metrics.rejected('queue_timeout')
          throw failure(timedOut, op)
        }
        if (result === answerDropped) {
          // The Kernel answered, and did its work (a mutation was carried out): no breaker failure,
          // no retry (it would fetch the same answer again). The instance is at its bound, as when
          // its clients leave too many answers unread.
          this.breaker?.success(permit)
          this.metrics.answerDropped()
          throw new MantleError('OVERLOADED', 'The Kernel\'s answer was left out: the answers being read from the Kernel on this instance are at their bound. The call did run (a mutation was carried out)', { headers: { 'retry-after': '1' } })
        }
        if (result === shed) {
          // Handed a connection with less time left than the Kernel needs: the gateway sheds load
          // (the queue for a connection is too long), as a full bulkhead does. No breaker failure.
          this.breaker?.release(permit)
          // A retry so refused answers the failure it was made for, as a retry not made for want
          // of time does: a 503 for calls waiting hid the Kernel's own answer.
          if (retried !== null) throw failure(retried, op)
          this.metrics.rejected('queue_shed')
          throw new MantleError('KERNEL_UNAVAILABLE', 'Too many calls are waiting for the Kernel: this one could not be answered in time', { headers: { 'retry-after': '1' } })
        }
        metrics.call[result.outcome]((performance.now() - started) / 1000)
        // The Kernel answered: it is up, whatever it said. A redirect, or a 2xx body that is not
        // JSON or is too large, is the call's own (a kernel path out of date, one tenant's huge
        // list): retried it would come back the same, and as a breaker failure a few such calls
        // would open the breaker on every other operation, and take /readyz down with it.
        if (result.outcome === 'ok' || result.outcome === 'client_error' || result.outcome === 'redirect' || result.outcome === 'bad_answer') {
          this.breaker?.success(permit)
          if (result.outcome === 'ok') {
            // A 206 or a 226 answers a Range or an A-IM request, which the gateway never sends, and
            // goes with headers it does not pass on (Content-Range, IM): passed on, the client got a
            // 206 without a Content-Range (RFC 9110 §15.3.7), which caches and the Cache API take
            // for part of a representation. It is the whole answer: 200.
            ctx.status = result.status === 206 || result.status === 226 ? 200 : result.status
            return result.value
          }
          if (result.outcome === 'bad_answer') throw new MantleError('KERNEL_ERROR', result.message!)
          // A 304 to a mutation's If-None-Match (one the Kernel serves over GET or HEAD, RFC 9110
          // §13.1.2) is its condition not holding, the method not performed: to the client's
          // method, a 412 (§13.1.2 for any other). It was taken for a redirect: 502 KERNEL_ERROR.
          if (result.status === 304 && op.type === 'mutation' && ctx.ifNoneMatch !== undefined) throw conditionFailed()
          throw result.outcome === 'redirect' ? redirected(result, op) : clientError(result)
        }
        this.breaker?.failure(permit)
        if (result.outcome !== 'timeout' && idempotent && attempt < this.retries) {
          const jitter = Math.random() * Math.min(this.backoff.capMs, this.backoff.baseMs * 2 ** attempt)
          // Never sooner than the Kernel's Retry-After asked (RFC 9110 §10.2.3); a wait the deadline
          // leaves no time after means no retry, and the 502 carries the wait on.
          const wait = result.retryAfter === undefined ? jitter : Math.max(jitter, Number(result.retryAfter) * 1000)
          // Only with at least the failed attempt's own time left after the backoff: a retry sent
          // with a few ms left could not be answered in time, and turned the 5xx into a timeout.
          const now = performance.now()
          retriedMs = Math.max(1, now - started)
          if (deadline - now - wait >= retriedMs) {
            if (leave?.gone() === true) throw clientClosed()
            if (this.budget!.withdraw()) {
              metrics.retry()
              retried = result
              if (result.unsent !== true) ctx.retriedSent = true
              await (leave === null ? sleep(wait) : leave.pause(wait))
              continue
            }
            this.metrics.budgetExhausted()
          }
        }
        throw failure(result, op)
      }
    } finally {
      this.inFlight--
      if (leave !== null) unwatchCaller(caller!, leave.onLeave)
    }
  }

  /** `letFinish`: once sent, the attempt is not aborted when its caller leaves (a mutation, the breaker's probe). */
  private async attempt (method: Dispatcher.HttpMethod, path: string, headers: Record<string, string>, body: string | undefined, remaining: number, timeoutMs: number, need: Need, leave: Leave | null, letFinish: boolean): Promise<Attempt> {
    // One precise timer bounds headers and body together by the op's deadline. undici's own
    // headersTimeout/bodyTimeout run on its coarse timer wheel (a 150 ms timeout fired after
    // more than 600 ms here), too loose for short per-op timeouts.
    const deadline = new Deadline(remaining)
    // The caller leaving ends the attempt as its deadline would: out of the connection queue, and
    // a query's request aborted (its connection closed, so the Kernel sees it too).
    if (leave !== null) leave.cancel = deadline
    let sentAt = deadline.start
    if (this.free > 0) this.free--
    else if (!await this.connection(deadline)) {
      deadline.clear()
      if (leave !== null) leave.cancel = null
      return deadline.cancelled ? leftQueued : queuedOut
    } else {
      sentAt = performance.now()
      const left = remaining - (sentAt - deadline.start)
      // What it asks (Need.asks): its estimate, the client's before its first answer, halved for
      // each spell it has gone stale.
      const asked = need.asks(sentAt, timeoutMs)
      if (left < MIN_SEND_MS || left < asked) {
        // Handed a connection with its time (nearly) gone: calls of a burst share about one
        // deadline, and the holder that timed out hands its connection on before the next one's
        // timer fires. Sent, that call was aborted while undici reconnected: a Kernel timeout.
        // Or with less time left than the Kernel needs: past capacity the queue grew until its
        // head had waited nearly its whole timeout, and every call went out to time out (the
        // Kernel did the work, its answer was thrown away, its connection closed, the breaker
        // opened on a healthy Kernel). Given up unsent, it hands its connection on at once to a
        // call that can still be answered.
        deadline.clear()
        if (leave !== null) leave.cancel = null
        this.releaseConnection()
        return left < MIN_SEND_MS ? queuedOut : shed
      }
      // Sent with less than its estimate (gone stale): its answer starts the estimate again.
      if (left < need.ms) need.probe(asked)
    }
    need.out++
    try {
      if (deadline.cancelled) return leftQueued
      // A mutation that goes out is let finish: its outcome is what idempotency stores and the
      // audit records, and a Kernel that got it may act on it whatever the gateway does. So is the
      // breaker's probe: its outcome is what closes or opens the breaker (execute).
      if (leave !== null && letFinish) leave.cancel = null
      const request = this.pool.request({ method, path, headers, body, signal: deadline as unknown as EventEmitter })
      // undici acts on the signal only once the request has a connection: a call queued behind
      // busy connections, or waiting for one that does not open, would outlive its deadline.
      let res: Dispatcher.ResponseData
      try {
        res = await Promise.race([request, deadline.expiry()])
      } catch (err) {
        if (!deadline.aborted) throw err
        // Given up on: should undici still answer it, its body is let go (the socket is freed).
        let settled = false
        request.then(late => { settled = true; late.body.destroy() }, () => { settled = true })
        // undici fails a request it had written within microtasks of the abort; one still waiting
        // for its connection to open it holds until then: that one never reached the Kernel. It
        // is still the Kernel's timeout, and a breaker failure (CONTRACT §4): a Kernel host that
        // drops connection attempts (a blackholed address) answers every call so, within any
        // timeout under undici's connect timeout, and must open the breaker.
        await new Promise(resolve => setImmediate(resolve))
        if (!settled) return deadline.cancelled ? leftQueued : connectTimedOut
        throw err
      }
      const status = res.statusCode
      if (status >= 200 && status < 300) {
        const value = await readJson(res, this.maxBytes, this.answerBudget)
        if (value === OVER_BUDGET) return answerDropped
        // Every answer is learnt, waiting calls or not (one update, no allocation): learnt only
        // while calls waited, a need above their time left refused them all at once, and the
        // answers of the calls already sent then came back to an empty queue, unlearnt.
        if (value !== INVALID) need.observe(performance.now() - sentAt)
        return value === INVALID
          ? { outcome: 'bad_answer', status: 502, value: undefined, message: `The Kernel answered with a body that is not JSON or is over ${this.maxBytes} bytes` }
          : { outcome: 'ok', status, value, message: undefined }
      }
      // Any other status classifies the attempt by itself, whatever its body does next: a 4xx's
      // or 5xx's body read under the call's deadline made one that trickled a 504 and a breaker
      // failure, and one cut mid-body a 503, retried, for an answer the Kernel had given.
      if (status >= 400 && status < 500) {
        const retryAfter = secondsToWait(res.headers['retry-after'])
        const message = await rejectionMessage(res, Math.min(REJECTION_READ_MS, remaining - (performance.now() - deadline.start)))
        // Learnt like a 2xx, an answer to the request: an operation the Kernel answers with 4xx (a
        // lookup of what is not there) learnt nothing, asked the client's estimate for good, and
        // another operation's slow answers refused every call of it handed a connection. (Not a
        // 429's, the Kernel shedding load, nor a 5xx's or 3xx's: a failure or a refusal, fast or
        // not, tells nothing of what an answer needs.) Only while none of its last answers was a
        // 2xx: see Need.rejected.
        if (status !== 429) need.rejected(performance.now() - sentAt)
        return { outcome: 'client_error', status, value: undefined, message, ...(retryAfter === undefined ? {} : { retryAfter }) }
      }
      // Not read: a body still coming is cut (its connection with it), one already here costs nothing.
      discard(res)
      if (status >= 300 && status < 400) return { outcome: 'redirect', status, value: undefined, message: undefined }
      // A 5xx's Retry-After (a 503 of a Kernel restarting or shedding load) is the wait before a
      // retry (execute), and goes on to the client with the 502 (failure): it was ignored, the
      // retries went out within milliseconds of a Kernel asking for seconds, and the client, told
      // nothing, called again at once.
      const retryAfter = secondsToWait(res.headers['retry-after'])
      return { outcome: 'server_error', status, value: undefined, message: undefined, ...(retryAfter === undefined ? {} : { retryAfter }) }
    } catch (err) {
      const code = (err as { code?: string }).code ?? ''
      if (code === 'UND_ERR_INVALID_ARG') throw new MantleError('INTERNAL', 'The gateway could not form the Kernel request')
      if (deadline.cancelled) return leftSent
      if (deadline.aborted || TIMEOUT_CODES.has(code)) {
        need.timedOut(performance.now() - sentAt, timeoutMs - MIN_SEND_MS)
        return timedOut
      }
      // The Kernel answered, with headers over undici's 16 KiB: it will answer so every time.
      if (code === 'UND_ERR_HEADERS_OVERFLOW') return { outcome: 'bad_answer', status: 502, value: undefined, message: 'The Kernel answered with headers over 16 KiB' }
      return { outcome: 'unavailable', status: 503, value: undefined, message: (err as Error).message, ...(CONNECT_CODES.has(code) ? { unsent: true } : {}) }
    } finally {
      deadline.clear()
      need.ended()
      if (leave !== null) leave.cancel = null
      this.releaseConnection()
    }
  }

  /** Waits for a connection to come free until the deadline passes (false then). */
  private async connection (deadline: Deadline): Promise<boolean> {
    const waiter = new Waiter(this.tail)
    const woken = new Promise<boolean>(resolve => { waiter.wake = resolve })
    if (this.tail === null) this.head = waiter
    else this.tail.next = waiter
    this.tail = waiter
    this.waiting++
    if (await Promise.race([woken, deadline.expiry().catch(() => false)])) return true
    // Handed a connection in the same turn as the deadline passed: handed on.
    if (waiter.wake === handedOn) this.releaseConnection()
    else this.unlink(waiter)
    return false
  }

  private unlink (waiter: Waiter): void {
    if (waiter.prev === null) this.head = waiter.next
    else waiter.prev.next = waiter.next
    if (waiter.next === null) this.tail = waiter.prev
    else waiter.next.prev = waiter.prev
    waiter.prev = waiter.next = null
    this.waiting--
  }

  private releaseConnection (): void {
    const next = this.head
    if (next === null) {
      this.free++
      return
    }
    this.unlink(next)
    const wake = next.wake
    next.wake = handedOn
    wake(true)
  }

  async close (): Promise<void> {
    await this.pool.close()
  }
}

/** An attempt waiting for a connection: a node of KernelClient's FIFO list. */
class Waiter {
  next: Waiter | null = null
  /** handedOn once it has been given a connection (and left the list). */
  wake: (got: boolean) => void = handedOn
  constructor (public prev: Waiter | null) {}
}

function handedOn (): void {}

/**
 * An attempt's deadline, handed to undici as its `signal`: undici accepts any EventEmitter-shaped
 * signal (`on`/`once`/`removeListener`, `aborted`). Under load an AbortController cost about 5 µs
 * of CPU per call (EventTarget listeners and garbage); this costs one timer.
 */
class Deadline {
  aborted = false
  readonly start = performance.now()
  /** Fired because the call's caller left (Leave), not because its time ran out. */
  cancelled = false
  private listener: (() => void) | null = null
  private reject: ((err: Error) => void) | null = null
  private readonly timer: NodeJS.Timeout

  constructor (ms: number) {
    this.timer = setTimeout(fire, ms, this)
  }

  on (_event: 'abort', listener: () => void): this {
    this.listener = listener
    return this
  }

  once (event: 'abort', listener: () => void): this {
    return this.on(event, listener)
  }

  removeListener (): this {
    this.listener = null
    return this
  }

  /** Rejects when the deadline passes: for the wait undici does not bound (see attempt). */
  expiry (): Promise<never> {
    return new Promise<never>((_resolve, reject) => { this.reject = reject })
  }

  fire (): void {
    this.aborted = true
    const listener = this.listener
    this.listener = null
    if (listener !== null) listener()
    if (this.reject !== null) this.reject(DEADLINE_PASSED)
  }

  /** Fires it now: the caller left. */
  cancel (): void {
    if (this.aborted) return
    this.cancelled = true
    this.fire()
  }

  clear (): void {
    clearTimeout(this.timer)
  }
}

function fire (deadline: Deadline): void {
  deadline.fire()
}

const timedOut: Attempt = { outcome: 'timeout', status: 504, value: undefined, message: undefined }
/** An attempt whose deadline passed while its connection to the Kernel was opening: never sent. */
const connectTimedOut: Attempt = { outcome: 'timeout', status: 504, value: undefined, message: undefined, unsent: true }
/** An attempt whose deadline passed while it waited for a connection: never sent. */
const queuedOut: Attempt = { outcome: 'timeout', status: 504, value: undefined, message: undefined, unsent: true }
/** Less time left than this once handed a connection: the call gives up unsent (a queue timeout). */
const MIN_SEND_MS = 10
/** A 2xx whose answer found no room among those being read (answerBytes): cut, unread. */
const answerDropped: Attempt = { outcome: 'bad_answer', status: 503, value: undefined, message: undefined }
/** Less time left than its operation's Kernel needs (Need) once handed a connection: refused unsent, load shed. */
const shed: Attempt = { outcome: 'unavailable', status: 503, value: undefined, message: undefined, unsent: true }

/** An operation's Need goes stale once none of its attempts has been out for this long, or for 4 of its timeouts if longer (STALE_MAX_MS at most): halved for each such spell. */
const STALE_MS = 1000
/**
 * The longest stale spell. 4 of its timeouts keep the probe of an operation whose Kernel still does
 * not answer (sent once its estimate, about its whole timeout, is halved, and out until it times out)
 * out a fifth of the time at most; unbounded, the spell grew with the timeout, and one timeout of an
 * operation allowed 600 s refused every call of it that waited for a connection for 40 minutes,
 * though its Kernel answered again at once (found by a review). Past 1.25 s of timeout, such a probe
 * now holds one connection longer (a 600 s operation's, nearly all the time while its Kernel
 * hangs): what any one call of it sent below capacity holds anyway, and the breaker sees each
 * timeout; in exchange, once its Kernel answers again its calls are refused 5 s a halving at most,
 * and 5 s more once while the client's fresh estimate is above the halving (Need.asks).
 */
const STALE_MAX_MS = 5000
/** How many recent answers bound what an operation's Kernel calls need (Need). */
const PEAK_ANSWERS = 32

/**
 * What an operation's Kernel calls currently need once sent, in ms (0 until known): RFC 6298's
 * estimator of a round trip (a mean and a mean deviation, gains 1/8 and 1/4), the mean plus twice
 * the deviation, learnt from every answer of the Kernel, 2xx, or 4xx but 429 (see rejected), and never above the slowest of the last 32
 * answers; a call handed a connection with less time left is not sent. An attempt sent that timed
 * out counts as an answer of the time it had (its latency was more), so that a Kernel getting
 * slower while calls wait raises it: learnt from answers alone, it stayed low, every call went out
 * to time out and the breaker opened. What a call is asked for is asks(): before a first answer the
 * client's estimate (every operation's answers), and an estimate gone stale is halved.
 * (Each found by a review; a mean that fell faster than it rose settled near the 75th percentile,
 * and a quarter of the calls sent past capacity timed out.)
 */
export class Need {
  ms = 0
  private mean = -1
  private deviation = 0
  /** Its attempts sent and not yet ended, and when it last learnt (an answer, a timeout; or when it was made). */
  out = 0
  private learntAt: number
  /** One of its calls went out with less time left than it (gone stale): the next answer starts it again. */
  probing = false
  /** What that call was asked for (the stale estimate, halved). */
  private probedMs = 0
  /** The last PEAK_ANSWERS answers (ms), a ring: what it asks is never above the slowest of them. */
  private readonly recent = new Float64Array(PEAK_ANSWERS)
  private at = 0
  /** 4xx answers since its last 2xx (PEAK_ANSWERS before any): fewer, and a 4xx is not learnt. */
  private rejectedSinceOk = PEAK_ANSWERS
  /**
   * What a timeout backed it off to (timedOut; the most, after several), until an answer it learns
   * from or the descent of rejected() reaches its 4xx's own time (0 then): asked while one of its
   * calls is out, however far that descent has taken it down. Asked the halved estimate, every
   * call of an operation whose Kernel hung on its 2xx went out while the first one hung, after a
   * probe answered 404: one hung call per connection, a timeout each (8 connections: the breaker
   * opened; found by a review).
   */
  private backedOffMs = 0

  /** `prior`: the client's, which every answer and timeout of the operation's teaches too (null for the client's own). */
  constructor (private readonly prior: Need | null = null) {
    this.learntAt = performance.now()
  }

  observe (ms: number): void {
    this.rejectedSinceOk = 0
    this.backedOffMs = 0
    this.prior?.observe(ms)
    this.learn(ms)
  }

  /**
   * A 4xx answer (not a 429) `ms` after it was sent: learnt as an answer only once none of the
   * operation's last PEAK_ANSWERS answers was a 2xx (an operation the Kernel answers with 4xx
   * alone, a lookup of what is not there). Learnt beside its 2xx, fast 4xx (a 404 in 5 ms) pulled
   * the estimate far below what its 2xx take (300 ms, one call in 20): past capacity its 2xx calls
   * went out with too little time and timed out, sent, breaker failures (found by a review).
   */
  rejected (ms: number): void {
    if (this.rejectedSinceOk < PEAK_ANSWERS) {
      this.rejectedSinceOk++
      // A stale estimate's probe answered so starts the estimate again at what that probe was
      // asked for (its stale estimate, halved), not at the 4xx's time, and the spell with it: the
      // next calls go out as it did. Still probing, each such 4xx after it halves it again, down to
      // that 4xx's own time, until a 2xx (its time alone), a timeout (raised) or a 4xx learnt sets
      // it. Ending the spell with the whole estimate, such a 4xx refused the operation's calls for
      // another spell; left stale, the whole estimate was asked while a call was out, one call went
      // out at a time, the rest refused, until 32 such 4xx had come back (an operation whose 2xx
      // took 250 ms, then answered 404 in 10 ms: 148 of 171 refused over 6 s; reviews).
      if (this.probing) {
        const from = Math.max(ms, this.probedMs)
        this.learn(from)
        this.probing = true
        this.probedMs = from / 2
        // Down to that 4xx's own time: the 2xx the backoff was for are no longer asked for.
        if (ms >= from) this.backedOffMs = 0
      }
      return
    }
    this.backedOffMs = 0
    this.prior?.observe(ms)
    this.learn(ms)
  }

  private learn (ms: number): void {
    // What it asks is fresh from its last lesson: an attempt that taught nothing (a 4xx not learnt,
    // a 5xx, a call whose caller left) does not end a stale spell.
    this.learntAt = performance.now()
    if (this.probing) {
      // The answer to a stale estimate's probe: what it knew is out of date, it starts again from
      // this answer, as from a cold start (one answer of a Kernel that recovered, against an
      // estimate of the timeouts it had, would have taken it down only a little).
      this.probing = false
      this.mean = -1
      this.recent.fill(0)
    }
    this.recent[this.at] = ms
    this.at = (this.at + 1) % PEAK_ANSWERS
    if (this.mean < 0) {
      this.mean = ms
      this.ms = ms
      return
    }
    const d = ms - this.mean
    this.deviation += (Math.abs(d) - this.deviation) / 4
    this.mean += d / 8
    // Never above the slowest recent answer: the deviation that a faster answer adds made a Kernel
    // getting faster ask more than any answer took (800 ms answers, then one of 20 ms: 1,092), as
    // did one slow answer among fast ones, and calls that had waited a moment were refused.
    let peak = 0
    for (let i = 0; i < PEAK_ANSWERS; i++) if (this.recent[i] > peak) peak = this.recent[i]
    this.ms = Math.min(this.mean + 2 * this.deviation, peak)
  }

  /**
   * An attempt sent `ms` before its deadline that timed out: its Kernel needed more, how much more
   * is not known. As RFC 6298 §5.5 backs its timer off on a timeout, what it asks doubles (to
   * `capMs` at most, the operation's timeout less the least a call is sent with) until the next
   * answer sets it again from the mean and deviation. Raised to `ms` alone, it rose only to the
   * time such a call had: past capacity, the next call sent had barely more, and against a Kernel
   * getting slower answer by answer timeouts followed one another and opened the breaker (found
   * by a review).
   */
  timedOut (ms: number, capMs = Infinity): void {
    // A probe that timed out tells that the estimate was not too high: it stands, raised if need be.
    this.probing = false
    this.prior?.timedOut(ms, capMs)
    if (ms > this.ms) this.learn(ms)
    else this.learntAt = performance.now()
    this.ms = Math.max(this.ms, Math.min(2 * ms, capMs))
    // Never lowered by a timeout: one of a call sent with little time left (100 ms, during a 4xx
    // descent) set it to twice that, the 490 ms the operation's calls were known to hang for was
    // lost, and its next calls went out to hang one per connection again (found by a review).
    this.backedOffMs = Math.max(this.backedOffMs, this.ms)
  }

  /**
   * What a call of the operation handed a connection at `now` needs left to be sent (ms). Before
   * its first answer, the client's estimate, going stale as its own does: every operation's answers
   * (a cold start with many operations sent every operation's first calls whatever they had left,
   * they timed out, and the breaker opened), never above its own timeout less MIN_SEND_MS. Once
   * none of its attempts has been out, and it has learnt nothing, for STALE_MS, or 4 of its
   * timeouts if longer (STALE_MAX_MS at most), its estimate is stale, and halved for each such
   * spell: sampled only by calls sent, an estimate too high (about its whole timeout after its
   * calls timed out) refused every call of an operation that waited behind other operations'
   * calls, for good once its Kernel recovered. A
   * call sent so starts the estimate again from its answer (probing). Past capacity with many
   * operations, each one's calls are answered far apart: a call sent whatever it had left whenever
   * none of its operation's calls had been out for 100 ms timed out, nearly every one, and the
   * breaker opened; halved once a second at most, what it asks stays near what the Kernel takes.
   * (Each found by a review.)
   */
  asks (now: number, timeoutMs: number): number {
    // The client's, no more than a timeout raises its own to: other operations' answers (2 s) made
    // one of 200 ms ask more than any of its calls could have, and it was refused everything until
    // that was halved below their time left, a halving a second (4 s; found by a review).
    const ms = this.mean < 0 ? Math.min(this.prior?.ms ?? 0, timeoutMs - MIN_SEND_MS) : this.ms
    if (this.out > 0) return Math.max(ms, this.backedOffMs)
    // Stale since its last lesson, or since it was made: the client's too (another operation's
    // timeouts may have raised it) would otherwise refuse an operation for good.
    const spell = Math.max(STALE_MS, Math.min(4 * timeoutMs, STALE_MAX_MS))
    const spells = Math.floor((now - this.learntAt) / spell)
    if (spells === 0) return ms
    const halved = ms / 2 ** Math.min(spells, 30)
    // A halving below the client's estimate, while that one is fresh (learnt within the spell) and
    // within what its timeout lets the operation have, waits one more spell: past capacity with 32
    // operations, one's calls rarely go out, its estimate (right, about 110 ms, as every operation's
    // answers showed) went stale every 2 s and its probe went out with half of it, to time out:
    // up to 16 a second against a capacity of 20 (8 to 16 of some 70 calls sent under load, and the
    // breaker opened in some runs; 0 to 7 now). One spell late at most: never refused for good.
    const client = this.prior
    if (client !== null && halved < client.ms && client.ms <= timeoutMs - MIN_SEND_MS && now - client.learntAt < spell) return Math.min(2 * halved, client.ms)
    return halved
  }

  /** One of its calls goes out with `asked` ms, less than its estimate (gone stale): the next answer starts the estimate again. */
  probe (asked: number): void {
    this.probing = true
    this.probedMs = asked
  }

  /** One of its attempts sent has ended, answered or not. */
  ended (): void {
    this.out--
  }
}

/** An attempt cancelled because its caller left: waiting for a connection (never sent), or sent and aborted. */
const leftQueued: Attempt = { outcome: 'client_closed', status: 499, value: undefined, message: undefined, unsent: true }
const leftSent: Attempt = { outcome: 'client_closed', status: 499, value: undefined, message: undefined }
const DEADLINE_PASSED = new Error('the attempt\'s deadline passed')

/** A path parameter as (part of) one segment of the Kernel's path: `/` and the rest encodeURIComponent encodes are percent-encoded. */
function pathSegment (value: unknown): string {
  return encodeURIComponent(String(value))
}

/**
 * Refuses a Kernel path one of whose segments is `.` or `..`, which only a parameter can make: a
 * Kernel or a proxy before it resolves them (`/v1/agents/../runs` is `/v1/runs`, another
 * resource, reached under this operation's roles). No encoding sends them safely: they went as
 * `%2E%2E`, which the WHATWG URL parser (Node's `new URL(req.url, base)`, Deno, Bun, Workers)
 * resolves as `..`, and so does RFC 3986 normalization (`%2E` is an unreserved character's).
 */
function refuseDotSegments (path: string, parts: readonly string[], input: Record<string, unknown>): void {
  if (!path.split('/').some(s => s === '.' || s === '..')) return
  const fields: string[] = []
  for (let i = 1; i < parts.length; i += 2) if (/^\.+$/.test(String(input[parts[i]])) && !fields.includes(`input.${parts[i]}`)) fields.push(`input.${parts[i]}`)
  throw new MantleError('VALIDATION_FAILED', `${fields.join(', ')} must not make a segment of the Kernel's path '.' or '..'`)
}
/** The longest a Kernel 4xx's body is waited for, for its message, within the call's deadline. */
const REJECTION_READ_MS = 250

/**
 * A Kernel 4xx's `message` (at most 300 characters), from a JSON body of at most 64 KiB read
 * within `ms`: undefined when there is none, or the body is not there in time or breaks off
 * (the body is then cut). The 4xx stands either way.
 */
async function rejectionMessage (res: Dispatcher.ResponseData, ms: number): Promise<string | undefined> {
  let timer: NodeJS.Timeout | undefined
  const read = readJson(res, 64 * 1024)
  const late = new Promise<typeof INVALID>(resolve => { timer = setTimeout(resolve, Math.max(0, ms), INVALID) })
  try {
    const value = await Promise.race([read, late])
    if (value === INVALID) {
      read.catch(nothing)
      discard(res)
      return undefined
    }
    const message = (value as { message?: unknown } | null)?.message
    return typeof message === 'string' ? message.slice(0, 300) : undefined
  } catch {
    discard(res)
    return undefined
  } finally {
    clearTimeout(timer)
  }
}

/** Lets an answer's body go unread: destroyed unless it has ended, with the error that raises ignored. */
function discard (res: Dispatcher.ResponseData): void {
  res.body.on('error', nothing)
  res.body.destroy()
}

function clientError (result: Attempt): MantleError {
  if (result.status === 404) return new MantleError('NOT_FOUND', result.message ?? 'The Kernel has no such resource')
  return new MantleError('KERNEL_REJECTED', result.message ?? `The Kernel refused the call (status ${result.status})`, {
    status: result.status,
    ...(result.retryAfter === undefined ? {} : { headers: { 'retry-after': result.retryAfter } })
  })
}

/** The longest wait passed on from the Kernel's Retry-After (a day). */
const RETRY_AFTER_MAX_S = 86_400

/**
 * A Kernel's Retry-After (delta-seconds or an HTTP-date, RFC 9110 §10.2.3) as whole seconds from
 * now, at most a day; undefined when absent or neither. Passed on with its 4xx or 5xx (a 429 of
 * the Kernel's reached clients without it), as seconds: the faces that have no headers carry it
 * as a number (retryAfterOf).
 */
export function secondsToWait (value: string | string[] | undefined): string | undefined {
  if (typeof value !== 'string') return undefined
  const text = value.trim()
  let seconds: number
  // Any run of digits (delta-seconds, RFC 9110 §10.2.3): one too long for a number is Infinity,
  // capped below like any other. Cut at 10 digits, a longer one was read as no wait at all.
  if (/^\d+$/.test(text)) seconds = Number(text)
  else {
    const at = httpDate(text)
    if (Number.isNaN(at)) return undefined
    seconds = Math.max(0, Math.ceil((at - Date.now()) / 1000))
  }
  return String(Math.min(seconds, RETRY_AFTER_MAX_S))
}

const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec']
const RFC850_DATE = /^(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), (\d{2})-([A-Z][a-z]{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2}) GMT$/
const ASCTIME_DATE = /^(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) ([A-Z][a-z]{2}) ([ \d]\d) (\d{2}):(\d{2}):(\d{2}) (\d{4})$/

/**
 * An HTTP-date as milliseconds since the epoch (NaN: none). A recipient MUST accept all three of
 * its formats (RFC 9110 §5.6.7): the IMF-fixdate alone was read, and a Retry-After in the obsolete
 * RFC 850 or asctime form reached the client as no wait at all. asctime is GMT (Date.parse read it
 * as local time); an RFC 850 two-digit year more than 50 years ahead is the last such year past.
 * Written here: undici reads the three forms (lib/util/date.js) but does not export the reading,
 * and Date.parse takes asctime as local time and much that is no HTTP-date.
 */
function httpDate (text: string): number {
  if (/^[A-Za-z]{3}, /.test(text)) return Date.parse(text)
  const rfc850 = RFC850_DATE.exec(text)
  if (rfc850 !== null) {
    const thisYear = new Date().getUTCFullYear()
    let year = thisYear - (thisYear % 100) + Number(rfc850[3])
    if (year > thisYear + 50) year -= 100
    return utc(year, rfc850[2], rfc850[1], rfc850[4], rfc850[5], rfc850[6])
  }
  const asctime = ASCTIME_DATE.exec(text)
  if (asctime !== null) return utc(Number(asctime[6]), asctime[1], asctime[2], asctime[3], asctime[4], asctime[5])
  return NaN
}

function utc (year: number, month: string, day: string, hours: string, minutes: string, seconds: string): number {
  const m = MONTHS.indexOf(month)
  return m < 0 ? NaN : Date.UTC(year, m, Number(day), Number(hours), Number(minutes), Number(seconds))
}

// Without the Location: it may name hosts inside the network, which clients have no need of.
function notInQuery (key: string): MantleError {
  return new MantleError('VALIDATION_FAILED', `input.${key} holds an object, which the Kernel's query string cannot carry`)
}

function conditionFailed (): MantleError {
  return new MantleError('KERNEL_REJECTED', 'The Kernel says the If-None-Match condition does not hold (it answered 304): the mutation was not performed', { status: 412 })
}

function redirected (result: Attempt, op: Operation): MantleError {
  return new MantleError('KERNEL_ERROR', `The Kernel redirected ${op.name} (status ${result.status}); redirects are not followed: the operation's kernel path may be out of date`)
}

/** Nobody reads it: it is how a cancelled call ends, for its audit entry and metrics. */
function clientClosed (): MantleError {
  return new MantleError('CLIENT_CLOSED', 'The caller left before the Kernel answered: the call was cancelled')
}

function failure (result: Attempt, op: Operation): MantleError {
  if (result.outcome === 'timeout') return new MantleError('KERNEL_TIMEOUT', `The Kernel did not answer within ${op.timeoutMs} ms`)
  if (result.outcome === 'unavailable') return new MantleError('KERNEL_UNAVAILABLE', 'The Kernel cannot be reached')
  return new MantleError('KERNEL_ERROR', result.message ?? `The Kernel failed (status ${result.status})`, result.retryAfter === undefined ? undefined : { headers: { 'retry-after': result.retryAfter } })
}
