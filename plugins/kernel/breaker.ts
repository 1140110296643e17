// Hand-written on purpose: the breaker must share one state per Kernel origin across every
// operation, let exactly one probe through when half-open, and tell the retry loop whether a
// retry may go at all. Libraries such as opossum wrap one function with their own timeout and
// fallback logic, which would duplicate the client's deadline and status mapping.

import type { BreakerSettings, FailureRateRule } from '../../manifest.js'

export type BreakerState = 'closed' | 'open' | 'half-open'

/** What `acquire` grants: a normal call, the single half-open probe, or nothing (fail fast). */
export const DENIED = 0
export const NORMAL = 1
export const PROBE = 2
export type Permit = typeof DENIED | typeof NORMAL | typeof PROBE

/** Why the breaker opened: `threshold` failures in a row, the failure-rate rule, or a failed probe. */
export const OPEN_REASONS = ['consecutive', 'failure_rate', 'probe'] as const
export type OpenReason = typeof OPEN_REASONS[number]

/** Buckets of the failure-rate window: the window slides by a tenth of its length. */
const BUCKETS = 10

/**
 * The outcomes of the last `windowMs`, in ten buckets of a tenth each (so its memory is fixed,
 * whatever the rate of calls). Hand-written: it is a few lines, and a library's rolling counter
 * would bring timers of its own (opossum's runs an interval per breaker).
 */
class OutcomeWindow {
  private readonly calls = new Uint32Array(BUCKETS)
  private readonly failures = new Uint32Array(BUCKETS)
  private readonly width: number
  private head = 0
  private headEnds: number
  private totalCalls = 0
  private totalFailures = 0

  constructor (readonly rule: FailureRateRule, now: number) {
    this.width = rule.windowMs / BUCKETS
    this.headEnds = now + this.width
  }

  /** Records one attempt's outcome; true when the rule now says open. */
  record (failed: boolean, now: number): boolean {
    this.slide(now)
    this.calls[this.head]++
    this.totalCalls++
    if (!failed) return false
    this.failures[this.head]++
    this.totalFailures++
    // failures / calls, not rate * calls: 0.55 * 100 is 55.00000000000001, and 55 of 100 did not open it.
    return this.totalCalls >= this.rule.minimumCalls && this.totalFailures / this.totalCalls >= this.rule.failureRate
  }

  /** The outcomes of the last `windowMs` as of `now`. */
  counts (now: number): { calls: number, failures: number } {
    this.slide(now)
    return { calls: this.totalCalls, failures: this.totalFailures }
  }

  /** Forgets every outcome: the breaker opened, or the whole window passed without a call. */
  reset (now: number): void {
    this.calls.fill(0)
    this.failures.fill(0)
    this.totalCalls = 0
    this.totalFailures = 0
    this.headEnds = now + this.width
  }

  /** Moves the head to the bucket of `now`, emptying the buckets it passes (at most all ten). */
  private slide (now: number): void {
    if (now < this.headEnds) return
    const steps = Math.floor((now - this.headEnds) / this.width) + 1
    if (steps >= BUCKETS) {
      this.reset(now)
      return
    }
    for (let i = 0; i < steps; i++) {
      this.head = (this.head + 1) % BUCKETS
      this.totalCalls -= this.calls[this.head]
      this.totalFailures -= this.failures[this.head]
      this.calls[this.head] = 0
      this.failures[this.head] = 0
    }
    this.headEnds += steps * this.width
  }
}

/**
 * A circuit breaker. Closed: calls pass; `threshold` failures in a row open it, and so does the
 * failure-rate rule when the manifest sets one. Open: calls fail fast until `resetTimeoutMs` has
 * passed. Half-open: one probe passes while every other call fails fast; its success closes the
 * breaker, its failure opens it again. A probe still out after `resetTimeoutMs` lets one more
 * through: a probe is bounded only by its operation's timeout (up to 600 s), and one of a slow
 * operation, or one its Kernel hangs on, refused every call of every operation that long, on an
 * instance /readyz called ready (found by a review). A probe's outcome counts as a probe's while
 * the breaker is half-open, else (another probe closed or opened it meanwhile) as a call's. It
 * never queues or delays a call.
 */
export class CircuitBreaker {
  state: BreakerState = 'closed'
  readonly threshold: number
  readonly resetTimeoutMs: number
  private failures = 0
  private openedAt = 0
  /** Probes out, and when the last one went. */
  private probes = 0
  private probedAt = 0
  /** The failure-rate rule's window; null: consecutive failures only. */
  private readonly window: OutcomeWindow | null

  /**
   * @param onChange told of each change of state, with why it opened (null for any other change)
   */
  constructor (
    settings: BreakerSettings,
    private readonly onChange: (state: BreakerState, why: OpenReason | null) => void = () => {},
    private readonly now: () => number = () => performance.now()
  ) {
    this.threshold = settings.threshold
    this.resetTimeoutMs = settings.resetTimeoutMs
    const rate = settings.rate ?? null
    this.window = rate === null ? null : new OutcomeWindow(rate, now())
  }

  acquire (): Permit {
    if (this.state === 'closed') return NORMAL
    if (this.state === 'open') {
      if (this.now() - this.openedAt < this.resetTimeoutMs) return DENIED
      this.set('half-open', null)
    }
    if (this.probes > 0 && this.now() - this.probedAt < this.resetTimeoutMs) return DENIED
    this.probes++
    this.probedAt = this.now()
    return PROBE
  }

  /**
   * The state as of now: an open breaker whose reset time has passed is half-open (its next call
   * is the probe), though `state` changes only when a call comes. Readiness and the metric read
   * this: reading `state`, an instance taken out of its Service for an open breaker got no call,
   * so its breaker never left open and the instance never became ready again.
   */
  current (): BreakerState {
    return this.state === 'open' && this.now() - this.openedAt >= this.resetTimeoutMs ? 'half-open' : this.state
  }

  /**
   * With the failure-rate rule, its window as of now: the attempts that ended in the last
   * `windowMs` and how many failed (both 0 while the breaker is open, and just after); else null.
   */
  failureWindow (): { calls: number, failures: number, failureRate: number, minimumCalls: number, windowMs: number } | null {
    if (this.window === null) return null
    return { ...this.window.counts(this.now()), ...this.window.rule }
  }

  /** Milliseconds until an open breaker lets a probe through (0 when it is not open). */
  retryAfterMs (): number {
    return this.state === 'open' ? Math.max(0, this.resetTimeoutMs - (this.now() - this.openedAt)) : 0
  }

  success (permit: Permit): void {
    if (permit === PROBE) this.probes--
    if (permit === PROBE && this.state === 'half-open') {
      this.failures = 0
      this.set('closed', null)
    } else if (this.state === 'closed') {
      this.failures = 0
      this.window?.record(false, this.now())
    }
  }

  /** A permit whose call never reached the Kernel: a probe is handed back, nothing is counted. */
  release (permit: Permit): void {
    if (permit === PROBE) this.probes--
  }

  failure (permit: Permit): void {
    if (permit === PROBE) this.probes--
    if (permit === PROBE && this.state === 'half-open') {
      this.open('probe')
    } else if (this.state === 'closed') {
      if (++this.failures >= this.threshold) this.open('consecutive')
      else if (this.window?.record(true, this.now()) === true) this.open('failure_rate')
    }
    // A late failure of a call that started before the breaker opened changes nothing.
  }

  /** Opens the breaker, forgetting the failures counted so far (both rules start again once it closes). */
  private open (why: OpenReason): void {
    this.openedAt = this.now()
    this.failures = 0
    this.window?.reset(this.openedAt)
    this.set('open', why)
  }

  private set (state: BreakerState, why: OpenReason | null): void {
    if (this.state === state) return
    this.state = state
    this.onChange(state, why)
  }
}

/**
 * A retry budget (as in Finagle and Envoy): every first attempt deposits `ratio` of a token,
 * every retry withdraws one, and the balance never exceeds `cap`. Under a failing Kernel,
 * retries stay below `ratio` of the traffic (plus the initial reserve) instead of multiplying it.
 * No maintained Node library offers this; it is a few lines.
 */
export class RetryBudget {
  private tokens: number
  // The cap is the reserve: with a cap of 100, a calm spell banked 100 retries, and a Kernel that
  // then failed saw 100 retries plus 20% of the traffic, not the 10 the README promises.
  constructor (private readonly ratio = 0.2, private readonly cap = 10, reserve = 10) {
    this.tokens = Math.min(reserve, cap)
  }

  deposit (): void {
    this.tokens = Math.min(this.cap, this.tokens + this.ratio)
  }

  withdraw (): boolean {
    if (this.tokens < 1) return false
    this.tokens -= 1
    return true
  }

  get balance (): number {
    return this.tokens
  }
}
