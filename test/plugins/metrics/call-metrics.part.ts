import t from 'tap'
import { Counter, Histogram, Registry } from 'prom-client'
import { CallCounter, CallHistogram } from '../../../plugins/metrics/call-metrics.js'

const BUCKETS = [0.001, 0.01, 0.1, 1]
// Bounds themselves (le is inclusive), values between them, past the last bound, and zero.
const VALUES: Array<[string, string, number]> = [
  ['rest', '2xx', 0], ['rest', '2xx', 0.001], ['rest', '2xx', 0.0011], ['rest', '2xx', 0.05],
  ['rest', '4xx', 1], ['rest', '4xx', 1.5], ['rest', '4xx', 250], ['trpc', '2xx', 0.01], ['trpc', '2xx', 0.1]
]

t.test('it writes out what prom-client\'s Histogram writes out for the same observations', async t => {
  const ours = new Registry()
  const theirs = new Registry()
  const fast = new CallHistogram({ name: 'calls_seconds', help: 'Calls', labelNames: ['protocol', 'op', 'status_class'], buckets: BUCKETS, registers: [ours] })
  const reference = new Histogram({ name: 'calls_seconds', help: 'Calls', labelNames: ['protocol', 'op', 'status_class'] as const, buckets: BUCKETS, registers: [theirs] })
  // A label set resolved but never observed is not written out, as with prom-client's labels().
  fast.series('websocket', 'getAgent', '5xx')
  reference.labels('websocket', 'getAgent', '5xx')
  for (const [protocol, statusClass, v] of VALUES) {
    fast.series(protocol, 'getAgent', statusClass).observe(v)
    reference.labels(protocol, 'getAgent', statusClass).observe(v)
  }
  const text = await ours.metrics()
  t.equal(text, await theirs.metrics())
  t.match(text, /calls_seconds_bucket\{le="0.001",protocol="rest",op="getAgent",status_class="2xx"\} 2\n/)
  t.match(text, /calls_seconds_bucket\{le="\+Inf",protocol="rest",op="getAgent",status_class="4xx"\} 3\n/)
  t.notMatch(text, /websocket/)
  const json = async (r: Registry): Promise<unknown> => JSON.parse(JSON.stringify(await r.getMetricsAsJSON()))
  t.same(await json(ours), await json(theirs), 'the JSON form too (as JSON: prom-client leaves undefined exemplars in)')

  // Reset: every series is empty again, and is written out again once observed.
  ours.resetMetrics()
  theirs.resetMetrics()
  t.equal(await ours.metrics(), await theirs.metrics())
  fast.series('rest', 'getAgent', '2xx').observe(0.002)
  reference.labels('rest', 'getAgent', '2xx').observe(0.002)
  t.equal(await ours.metrics(), await theirs.metrics())
})

t.test('a label set resolves to one series; no labels; values that are not numbers are dropped', async t => {
  const registry = new Registry()
  const h = new CallHistogram({ name: 'h_seconds', help: 'H', labelNames: ['op'], buckets: [1], registers: [registry] })
  t.equal(h.series('a'), h.series('a'))
  t.not(h.series('a'), h.series('b'))
  t.throws(() => h.series(), /expected 1 label values, got 0/)
  t.throws(() => h.series('a', 'b'), /expected 1 label values, got 2/)
  h.series('a').observe(Number.NaN)
  h.series('a').observe(Number.POSITIVE_INFINITY)
  t.equal(await registry.metrics(), '# HELP h_seconds H\n# TYPE h_seconds histogram\n', 'nothing observed')
  const observe = h.series('a').observe // used unbound, as the Kernel plugin does
  observe(0.5)
  t.match(await registry.metrics(), /h_seconds_count\{op="a"\} 1\n/)

  const plain = new CallHistogram({ name: 'p_seconds', help: 'P', labelNames: [], buckets: [1, 2], registers: [registry] }).series()
  t.match(await registry.metrics(), /p_seconds_count 0\n/, 'without labels it is written out from the start')
  plain.observe(1.5)
  t.match(await registry.metrics(), /p_seconds_bucket\{le="2"\} 1\np_seconds_bucket\{le="\+Inf"\} 1\np_seconds_sum 1.5\np_seconds_count 1/)
  t.throws(() => new CallHistogram({ name: 'x', help: 'x', labelNames: [], buckets: [1, 1], registers: [] }), /buckets must ascend/)
  t.throws(() => new CallHistogram({ name: 'h_seconds', help: 'again', labelNames: [], buckets: [1], registers: [registry] }), /already been registered/)
})

t.test('counters: what prom-client\'s Counter writes out, with and without labels, and after a reset', async t => {
  const ours = new Registry()
  const theirs = new Registry()
  const fast = new CallCounter({ name: 'verdicts_total', help: 'Verdicts', labelNames: ['action', 'outcome'], registers: [ours] })
  const reference = new Counter({ name: 'verdicts_total', help: 'Verdicts', labelNames: ['action', 'outcome'] as const, registers: [theirs] })
  const plainFast = new CallCounter({ name: 'fallbacks_total', help: 'Fallbacks', labelNames: [], registers: [ours] })
  const plainReference = new Counter({ name: 'fallbacks_total', help: 'Fallbacks', registers: [theirs] })
  const json = async (r: Registry): Promise<unknown> => JSON.parse(JSON.stringify(await r.getMetricsAsJSON()))
  // Nothing counted yet: the labelled counter writes no line, the plain one writes 0.
  fast.series('block', 'passed')
  reference.labels('block', 'passed')
  t.equal(await ours.metrics(), await theirs.metrics())
  t.match(await ours.metrics(), /^fallbacks_total 0$/m)
  for (const [action, outcome, n] of [['block', 'passed', 1], ['block', 'passed', 1], ['redact', 'redacted', 3], ['block', 'blocked', 0]] as const) {
    fast.series(action, outcome).inc(n)
    reference.labels(action, outcome).inc(n)
  }
  plainFast.series().inc()
  plainReference.inc()
  t.equal(await ours.metrics(), await theirs.metrics())
  t.match(await ours.metrics(), /verdicts_total\{action="block",outcome="passed"\} 2\n/)
  t.match(await ours.metrics(), /verdicts_total\{action="block",outcome="blocked"\} 0\n/, 'an increment by 0 writes the line out')
  t.same(await json(ours), await json(theirs))
  ours.resetMetrics()
  theirs.resetMetrics()
  t.equal(await ours.metrics(), await theirs.metrics())
  t.same(await json(ours), await json(theirs))
  // A counter only goes up: what prom-client throws on, this one drops.
  const s = fast.series('block', 'passed')
  s.inc(-1)
  s.inc(Number.NaN)
  s.inc(Number.POSITIVE_INFINITY)
  t.notMatch(await ours.metrics(), /verdicts_total\{/)
  s.inc()
  t.match(await ours.metrics(), /verdicts_total\{action="block",outcome="passed"\} 1\n/)
})

t.test('a histogram without labels: written out at 0 from the start, gone after a reset until observed, as prom-client\'s', async t => {
  const ours = new Registry()
  const theirs = new Registry()
  const fast = new CallHistogram({ name: 'scan_seconds', help: 'Scans', labelNames: [], buckets: [0.001, 0.01], registers: [ours] }).series()
  const reference = new Histogram({ name: 'scan_seconds', help: 'Scans', buckets: [0.001, 0.01], registers: [theirs] })
  t.equal(await ours.metrics(), await theirs.metrics())
  t.match(await ours.metrics(), /scan_seconds_count 0\n/)
  fast.observe(0.002)
  reference.observe(0.002)
  t.equal(await ours.metrics(), await theirs.metrics())
  ours.resetMetrics()
  theirs.resetMetrics()
  t.equal(await ours.metrics(), await theirs.metrics())
  t.notMatch(await ours.metrics(), /scan_seconds_count/)
  fast.observe(0.02)
  reference.observe(0.02)
  t.equal(await ours.metrics(), await theirs.metrics())
})
