// The harness's latency histogram (loadtest/histogram.ts): the suites (suite.ts) evaluate
// `p(99)<x` on it as k6 evaluates it on a Trend.
import t from 'tap'
import { Histogram, nearestRank } from '../../loadtest/histogram.js'

/** k6's TrendSink.P: linear interpolation at q·(n−1) over the sorted samples. */
function k6P (samples: readonly number[], q: number): number {
  const v = [...samples].sort((a, b) => a - b)
  if (v.length === 1) return v[0]
  const i = q * (v.length - 1)
  const j = v[Math.floor(i)]
  const k = v[Math.ceil(i)]
  return j + (k - j) * (i - Math.floor(i))
}

const of = (samples: readonly number[]): Histogram => {
  const h = new Histogram()
  for (const ms of samples) h.recordMs(ms)
  return h
}

t.test('p(q) is interpolated between neighbouring ranks, as k6 computes it', async (t) => {
  // 59 calls of 2 ms and one of 40 ms: k6's p(99) is 2 + 38 x 0.41 = 17.58 ms (nearest rank said 40).
  const samples = [...Array<number>(59).fill(2), 40]
  t.equal(Number(k6P(samples, 0.99).toFixed(6)), 17.58)
  const h = of(samples)
  t.ok(Math.abs(h.trendMs(0.99) - 17.58) / 17.58 < 0.004, `p(99) ${h.trendMs(0.99)} ms, k6 17.58 ms (within the buckets' 0.4 %)`)
  t.equal(h.trendMs(0.99) < 40 && h.trendMs(0.99) > 17, true)
  t.equal(h.trendMs(1), 40, 'p(100): the largest, exactly')
  t.equal(h.trendMs(0), 2, 'p(0): the smallest, exactly')
  t.equal(h.quantileMs(0.99), 40, 'quantileMs stays nearest rank (the faces section compares it with HTTP\'s)')
  t.ok(Number.isNaN(new Histogram().trendMs(0.99)), 'no sample: NaN, which passes no threshold')
  t.equal(of([7.5]).trendMs(0.99), 7.5, 'one sample')
})

t.test('where every sample has a bucket of its own, p(q) is exactly k6\'s', async (t) => {
  // Whole microseconds below 128 are recorded exactly.
  let seed = 7
  const random = (): number => { seed = (seed * 1103515245 + 12345) % 2 ** 31; return seed / 2 ** 31 }
  for (const n of [2, 3, 10, 60, 101, 1000]) {
    const samples = Array.from({ length: n }, () => Math.floor(random() * 128) / 1000)
    const h = of(samples)
    for (const q of [0.5, 0.9, 0.95, 0.99, 0.999]) {
      t.ok(Math.abs(h.trendMs(q) - k6P(samples, q)) < 1e-9, `n=${n} p(${q * 100}): ${h.trendMs(q)} = ${k6P(samples, q)}`)
    }
  }
})

t.test('a recorded value is reported within 0.4 % (its bucket\'s midpoint)', async (t) => {
  // 9.99 ms lies in the bucket [9984, 10047] µs, reported 10.0155 ms: p(99)<10 fails for it
  // among larger and smaller samples (alone, the exact minimum and maximum are used).
  const h = of([...Array<number>(50).fill(9.99), ...Array<number>(49).fill(1), 20])
  t.equal(h.trendMs(0.5), 10.0155)
  for (const ms of [0.2, 1.234, 9.99, 10.01, 47.3, 999.9, 12345]) {
    const got = of([0.001, ms, ms, 1e6]).trendMs(0.5)
    t.ok(Math.abs(got - ms) / ms <= 1 / 256, `${ms} ms reads ${got} ms`)
  }
})

t.test('nearestRank: the ceil(q·n)-th smallest of sorted samples', async (t) => {
  const hundred = Array.from({ length: 100 }, (_, i) => i + 1)
  // sorted[floor(q·n)] (the cache lookup's, the audit enqueue's and chaos's p99) read 100 here: the largest.
  t.equal(nearestRank(hundred, 0.99), 99)
  t.equal(nearestRank(hundred, 0.5), 50)
  t.equal(nearestRank(hundred, 1), 100)
  t.equal(nearestRank(hundred, 0), 1)
  t.equal(nearestRank(Float64Array.from(hundred), 0.99), 99, 'a typed array too')
  t.equal(nearestRank([7], 0.99), 7)
  t.ok(Number.isNaN(nearestRank([], 0.99)), 'no sample: no value')
  // The same rank as the histogram's quantile, which the WebSocket runner reads (1 to 100 µs: a bucket each).
  t.equal(of(hundred.map((us) => us / 1000)).quantileMs(0.99), nearestRank(hundred, 0.99) / 1000)
})
