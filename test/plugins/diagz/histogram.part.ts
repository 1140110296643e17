import t from 'tap'
import { BUCKETS, bucketOf, bucketMiddle, percentiles, RollingWindow } from '../../../plugins/diagz/histogram.js'

t.test('buckets are ordered and a bucket middle is within 1/32 of any value in it', async t => {
  let previous = -1
  const bad: string[] = []
  for (let v = 0; v < 2 ** 31; v = v < 64 ? v + 1 : Math.ceil(v * 1.013)) {
    const b = bucketOf(v)
    if (b < previous) bad.push(`bucket of ${v} is below the previous one`)
    previous = b
    if (v >= 1 && Math.abs(bucketMiddle(b) - v) / v > 1 / 32 + 1e-9) bad.push(`value ${v}: middle ${bucketMiddle(b)}`)
  }
  t.same(bad, [], 'every value from 0 to 2^31 us')
  t.equal(bucketOf(2 ** 31 - 1), BUCKETS - 1)
  t.equal(bucketOf(1e15), BUCKETS - 1, 'beyond the range: clamped into the last bucket')
  t.equal(bucketOf(-5), 0)
  t.equal(bucketOf(Number.NaN), 0)
  t.equal(bucketOf(0.4), 0)
  t.equal(bucketMiddle(7), 7, 'small values are exact')
})

t.test('percentiles match the exact ones from the raw samples within the bucket precision', async t => {
  // A skewed, deterministic distribution: mostly fast, a long tail.
  let seed = 42
  const random = (): number => { seed = (seed * 1103515245 + 12345) % 2 ** 31; return seed / 2 ** 31 }
  const samples: number[] = []
  const counts = new Uint32Array(BUCKETS)
  for (let i = 0; i < 20000; i++) {
    const v = Math.floor(200 + (random() < 0.98 ? random() * 800 : random() * 50000))
    samples.push(v)
    counts[bucketOf(v)]++
  }
  samples.sort((a, b) => a - b)
  const qs = [0.5, 0.95, 0.99, 0.999]
  const got = percentiles(counts, samples.length, qs)
  for (const [i, q] of qs.entries()) {
    const exact = samples[Math.ceil(q * samples.length) - 1]
    t.ok(Math.abs(got[i]! - exact) / exact <= 1 / 32 + 1e-9, `p${q * 100}: ${got[i]} vs exact ${exact}`)
  }
  t.same(percentiles(new Uint32Array(BUCKETS), 0, qs), [null, null, null, null], 'nothing counted: null')
})

t.test('a rolling window forgets the slots that rotate out, and its memory is fixed', async t => {
  const w = new RollingWindow(3, 1000, 2, 0)
  w.record(0, 100, 0)
  w.record(1, 5000, 2)
  let s = w.summary(500)
  t.equal(s.count, 2)
  t.same(s.calls, [1, 1])
  t.same(s.errors, [0, 1])
  t.equal(s.seconds, 0.5)
  w.rotate(1000)
  w.record(0, 100, 1)
  s = w.summary(1500)
  t.equal(s.count, 3)
  t.same(s.refused, [1, 0])
  t.equal(s.seconds, 1.5)
  w.rotate(2000)
  w.rotate(3000)
  s = w.summary(3500)
  t.equal(s.count, 1, 'the first slot rotated out; the second is still in')
  t.same(s.calls, [1, 0])
  t.equal(s.seconds, 2.5, 'three slots: 2 full and the current half')
  w.rotate(4000)
  s = w.summary(4200)
  t.equal(s.count, 0)
  t.same(s.calls, [0, 0])
  t.equal(w.summary(0).seconds, 0.001, 'never divides by zero')
})
