// Warm-up failures (loadtest/measure.ts warmupFailures): the rounds flag their own failed calls,
// a warm-up's are reported as a note ("warm-up: N of M calls failed") so that a target set up
// wrong (every call a 401) is said before its rounds show it; none failed, no note.
import t from 'tap'
import { httpWarmup, warmupFailures, type RunFigures } from '../../loadtest/measure.js'

const run = (over: Partial<RunFigures>): RunFigures => ({
  reqPerSec: 1000,
  p50Ms: 1,
  p99Ms: 2,
  p50FineMs: 1,
  p99FineMs: 2,
  requests: 1000,
  non2xx: 0,
  errors: 0,
  timeouts: 0,
  mismatches: 0,
  generatorCpuPct: 50,
  rssKiB: null,
  cpuUsPerRequest: null,
  watchedCpuUsPerRequest: null,
  ...over
})

t.test('an autocannon warm-up: every answer and every error is a call; non-2xx, errors and other bodies failed', async (t) => {
  t.strictSame(httpWarmup('a', run({})), { name: 'a', calls: 1000, failed: 0 })
  t.strictSame(httpWarmup('b', run({ requests: 900, non2xx: 900 })), { name: 'b', calls: 900, failed: 900 }, 'every call a 401')
  t.strictSame(httpWarmup('c', run({ requests: 100, non2xx: 10, errors: 5, timeouts: 5, mismatches: 3 })), { name: 'c', calls: 105, failed: 18 })
})

t.test('no failed warm-up call: no note', async (t) => {
  t.equal(warmupFailures([httpWarmup('a', run({})), httpWarmup('b', run({}))]), null)
  t.equal(warmupFailures([]), null)
})

t.test('failed warm-up calls: N of M, by target', async (t) => {
  const f = warmupFailures([httpWarmup('passthrough', run({})), httpWarmup('gateway-spine', run({ requests: 800, non2xx: 800 })), httpWarmup('gateway-off', run({ requests: 50, errors: 2 }))])
  t.strictSame(f, { calls: 1852, failed: 802, byTarget: { 'gateway-spine': 800, 'gateway-off': 2 }, text: 'warm-up: 802 of 1852 calls failed (gateway-spine 800, gateway-off 2)' })
})
