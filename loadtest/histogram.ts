// A latency histogram of fixed size, in the manner of HdrHistogram: values (microseconds) below
// 128 get a bucket each; above, every power of two is split into 128 buckets, so a recorded
// value is known to within 1/128 (< 0.8 %) whatever the number of samples, and is reported as
// its bucket's midpoint (within 1/256, < 0.4 %, of the value). 26 octaves cover
// 0 µs .. 2^32 µs (71 minutes); larger values land in the last bucket. The runners of the
// WebSocket face record millions of calls in it at constant memory (3,328 counters).

const SUB_BITS = 7
const SUB_BUCKETS = 1 << SUB_BITS
const OCTAVES = 32 - SUB_BITS + 1
const MAX_VALUE = 2 ** 32 - 1

function indexOf (value: number): number {
  const v = value <= 0 ? 0 : value >= MAX_VALUE ? MAX_VALUE : Math.round(value)
  if (v < SUB_BUCKETS) return v
  const exponent = 31 - Math.clz32(v)
  const shift = exponent - SUB_BITS
  return (shift + 1) * SUB_BUCKETS + ((v >>> shift) - SUB_BUCKETS)
}

/** The midpoint of a bucket's range, in the recorded unit. */
function valueOf (index: number): number {
  if (index < 2 * SUB_BUCKETS) return index
  const shift = Math.floor(index / SUB_BUCKETS) - 1
  const low = ((index % SUB_BUCKETS) + SUB_BUCKETS) * 2 ** shift
  return low + (2 ** shift - 1) / 2
}

/**
 * The q-quantile (0..1) of samples sorted in ascending order, by nearest rank: the ceil(q·n)-th
 * smallest; NaN when there is none. (The sorted[floor(q·n)] some sections read was one rank
 * high: of 100 samples their p99 was the largest.)
 */
export function nearestRank (sorted: ArrayLike<number>, q: number): number {
  return sorted.length === 0 ? Number.NaN : sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(sorted.length * q) - 1))]
}

export class Histogram {
  readonly counts = new Float64Array(OCTAVES * SUB_BUCKETS)
  total = 0
  min = Number.POSITIVE_INFINITY
  max = 0
  private sum = 0

  /** Records a latency given in milliseconds (kept at microsecond resolution). */
  recordMs (ms: number): void {
    const us = ms * 1000
    this.counts[indexOf(us)]++
    this.total++
    this.sum += us
    if (us < this.min) this.min = us
    if (us > this.max) this.max = us
  }

  /** The q-quantile (0..1) in milliseconds by nearest rank (the ceil(q·n)-th smallest); NaN when empty. */
  quantileMs (q: number): number {
    if (this.total === 0) return Number.NaN
    const rank = Math.max(1, Math.ceil(q * this.total))
    let seen = 0
    for (let i = 0; i < this.counts.length; i++) {
      seen += this.counts[i]
      if (seen >= rank) return Math.min(Math.max(valueOf(i), this.min), this.max) / 1000
    }
    return this.max / 1000
  }

  /**
   * The q-quantile (0..1) in milliseconds as k6's Trend computes p(q): linear interpolation
   * between the (0-based) ranks floor(q·(n−1)) and ceil(q·(n−1)) of the sorted samples. Each rank
   * reads as its bucket's midpoint (within 0.4 %; the smallest and the largest samples are known
   * exactly). NaN when empty (k6 reports 0, but has no threshold to pass with no samples either).
   */
  trendMs (q: number): number {
    if (this.total === 0) return Number.NaN
    const at = q * (this.total - 1)
    const lo = Math.floor(at)
    const hi = Math.ceil(at)
    const a = this.rankValue(lo)
    const b = hi === lo ? a : this.rankValue(hi)
    return (a + (b - a) * (at - lo)) / 1000
  }

  /** The value (µs) of the sample of 0-based rank `rank` in sorted order. */
  private rankValue (rank: number): number {
    if (rank <= 0) return this.min
    if (rank >= this.total - 1) return this.max
    let seen = 0
    for (let i = 0; i < this.counts.length; i++) {
      seen += this.counts[i]
      if (seen > rank) return Math.min(Math.max(valueOf(i), this.min), this.max)
    }
    return this.max
  }

  meanMs (): number {
    return this.total === 0 ? Number.NaN : this.sum / this.total / 1000
  }
}
