// Hand-written on purpose: the breaker must share one state per Kernel origin across every
// operation, let exactly one probe through when half-open, and tell the retry loop whether a
// retry may go at all. Libraries such as opossum wrap one function with their own timeout and
// fallback logic, which would duplicate the client's deadline and status mapping.

export type BreakerState = 'closed' | 'open' | 'half-open'

/** What `acquire` grants: a normal call, the single half-open probe, or nothing (fail fast). */
export const DENIED = 0
export const NORMAL = 1
export const PROBE = 2
export type Permit = typeof DENIED | typeof NORMAL | typeof PROBE

/**
 * A consecutive-failure circuit breaker. Closed: calls pass, `threshold` failures in a row open
 * it. Open: calls fail fast until `resetTimeoutMs` has passed. Half-open: one probe passes while
 * every other call fails fast; its success closes the breaker, its failure opens it again. A
 * probe still out after `resetTimeoutMs` lets one more through: a probe is bounded only by its
 * operation's timeout (up to 600 s), and one of a slow operation, or one its Kernel hangs on,
 * refused every call of every operation that long, on an instance /readyz called ready (found
 * by a review). A probe's outcome counts as a probe's while the breaker is half-open, else (another
 * probe closed or opened it meanwhile) as a call's.
 * It never queues or delays a call.
 */
export class CircuitBreaker {
  state: BreakerState = 'closed'
  private failures = 0
  private openedAt = 0
  /** Probes out, and when the last one went. */
  private probes = 0
  private probedAt = 0

  constructor (
    readonly threshold: number,
    readonly resetTimeoutMs: number,
    private readonly onChange: (state: BreakerState) => void = () => {},
    private readonly now: () => number = () => performance.now()
  ) {}

  acquire (): Permit {
    if (this.state === 'closed') return NORMAL
    if (this.state === 'open') {
      if (this.now() - this.openedAt < this.resetTimeoutMs) return DENIED
      this.set('half-open')
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

  /** Milliseconds until an open breaker lets a probe through (0 when it is not open). */
  retryAfterMs (): number {
    return this.state === 'open' ? Math.max(0, this.resetTimeoutMs - (this.now() - this.openedAt)) : 0
  }

  success (permit: Permit): void {
    if (permit === PROBE) this.probes--
    if (permit === PROBE && this.state === 'half-open') {
      this.failures = 0
      this.set('closed')
    } else if (this.state === 'closed') {
      this.failures = 0
    }
  }

  /** A permit whose call never reached the Kernel: a probe is handed back, nothing is counted. */
  release (permit: Permit): void {
    if (permit === PROBE) this.probes--
  }

  failure (permit: Permit): void {
    if (permit === PROBE) this.probes--
    if (permit === PROBE && this.state === 'half-open') {
      this.open()
    } else if (this.state === 'closed' && ++this.failures >= this.threshold) {
      this.open()
    }
    // A late failure of a call that started before the breaker opened changes nothing.
  }

  private open (): void {
    this.openedAt = this.now()
    this.failures = 0
    this.set('open')
  }

  private set (state: BreakerState): void {
    if (this.state === state) return
    this.state = state
    this.onChange(state)
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
