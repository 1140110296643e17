// Latency histograms for /diagz with bounded memory, written here because none of the installed
// libraries serves: prom-client's histograms are cumulative since start (no "last minute"), and
// hdr-histogram-js is not installed. The idea is HdrHistogram's: log-linear buckets (16 linear
// sub-buckets per power of two, so a percentile is known within 1/32 of its value), counted in
// fixed arrays, one array per time slot, slots recycled as time moves on.

/** Linear sub-buckets per power of two. */
const SUB_BITS = 4
const SUB = 1 << SUB_BITS
/** Largest recorded value, in microseconds (2^31 us, about 36 minutes); above it values are clamped. */
const MAX_EXPONENT = 30
/** Buckets of one histogram: [0, 16) exactly, then 16 per power of two up to 2^31. */
export const BUCKETS = SUB + (MAX_EXPONENT - SUB_BITS + 1) * SUB

/** The bucket of a duration in microseconds (non-negative). */
export function bucketOf (micros: number): number {
  if (!(micros >= 1)) return 0 // also NaN
  if (micros >= 2 ** (MAX_EXPONENT + 1)) return BUCKETS - 1
  const v = micros | 0
  if (v < SUB) return v
  const exponent = 31 - Math.clz32(v)
  return SUB + (exponent - SUB_BITS) * SUB + ((v >>> (exponent - SUB_BITS)) & (SUB - 1))
}

/** The middle of a bucket, in microseconds: what a percentile that falls in it reports. */
export function bucketMiddle (bucket: number): number {
  if (bucket < SUB) return bucket
  const exponent = SUB_BITS + Math.floor((bucket - SUB) / SUB)
  const width = 2 ** (exponent - SUB_BITS)
  const low = 2 ** exponent + ((bucket - SUB) % SUB) * width
  return low + width / 2
}

/** Percentiles (0..1) of summed bucket counts, in microseconds; null when nothing was counted. */
export function percentiles (counts: Uint32Array | Float64Array, total: number, quantiles: readonly number[]): Array<number | null> {
  if (total === 0) return quantiles.map(() => null)
  const out: Array<number | null> = []
  let bucket = 0
  let seen = counts[0]
  for (const q of quantiles) {
    // The rank of the value at quantile q (1-based), as HdrHistogram counts it.
    const rank = Math.max(1, Math.ceil(q * total))
    while (seen < rank && bucket < counts.length - 1) seen += counts[++bucket]
    out.push(bucketMiddle(bucket))
  }
  return out
}

/** Counts of one time slot: latencies, and calls, errors and refusals per kind (protocol). */
export class Slot {
  readonly latency = new Uint32Array(BUCKETS)
  readonly calls: Float64Array
  readonly errors: Float64Array
  readonly refused: Float64Array
  startedAt = 0

  constructor (kinds: number) {
    this.calls = new Float64Array(kinds)
    this.errors = new Float64Array(kinds)
    this.refused = new Float64Array(kinds)
  }

  clear (now: number): void {
    this.latency.fill(0)
    this.calls.fill(0)
    this.errors.fill(0)
    this.refused.fill(0)
    this.startedAt = now
  }
}

export interface WindowSummary {
  /** Seconds the summed slots cover (less than the window while the process is young). */
  seconds: number
  calls: number[]
  errors: number[]
  refused: number[]
  latency: Float64Array
  count: number
}

/**
 * A window of `slots` slots of `slotMs` each: the newest slot takes the records, `rotate()` (on a
 * timer) recycles the oldest. Memory is fixed at construction: slots x (BUCKETS + 3 x kinds).
 */
export class RollingWindow {
  private readonly ring: Slot[]
  private cursor = 0
  private used = 1
  current: Slot

  constructor (readonly slots: number, readonly slotMs: number, private readonly kinds: number, now: number) {
    this.ring = Array.from({ length: slots }, () => new Slot(kinds))
    this.current = this.ring[0]
    this.current.startedAt = now
  }

  record (kind: number, micros: number, outcome: 0 | 1 | 2): void {
    const slot = this.current
    slot.latency[bucketOf(micros)]++
    slot.calls[kind]++
    if (outcome === 2) slot.errors[kind]++
    else if (outcome === 1) slot.refused[kind]++
  }

  /** Starts a new slot, dropping the oldest one. */
  rotate (now: number): void {
    this.cursor = (this.cursor + 1) % this.slots
    this.current = this.ring[this.cursor]
    this.current.clear(now)
    if (this.used < this.slots) this.used++
  }

  /** Sums the slots in use: cheap (slots x BUCKETS additions) and allocation-light. */
  summary (now: number): WindowSummary {
    const latency = new Float64Array(BUCKETS)
    const calls = new Array<number>(this.kinds).fill(0)
    const errors = new Array<number>(this.kinds).fill(0)
    const refused = new Array<number>(this.kinds).fill(0)
    let count = 0
    let oldest = now
    for (let i = 0; i < this.used; i++) {
      const slot = this.ring[(this.cursor - i + this.slots) % this.slots]
      if (slot.startedAt < oldest) oldest = slot.startedAt
      for (let b = 0; b < BUCKETS; b++) {
        const c = slot.latency[b]
        if (c !== 0) { latency[b] += c; count += c }
      }
      for (let k = 0; k < this.kinds; k++) {
        calls[k] += slot.calls[k]
        errors[k] += slot.errors[k]
        refused[k] += slot.refused[k]
      }
    }
    return { seconds: Math.max(0.001, (now - oldest) / 1000), calls, errors, refused, latency, count }
  }
}
