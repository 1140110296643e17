// The load suites run by the Node harness (loadtest/suite.ts): the smoke profile, scaled tiny,
// against a real gateway on the demo Kernel. Nothing here asserts a latency: the machine is
// shared. What is checked is that every face is driven, every threshold of the profile is
// evaluated and reported, and that a threshold nobody can meet fails the suite (and, with
// abortOnFail, stops it).
import t, { type Test } from 'tap'
import { buildDemoApp, token } from '../helper.js'
import { smoke, type LoadProfile } from '../../loadtest/scenarios.js'
import { formatSuite, levelAt, runSuite, scaleStages, SUITE_FACES, type SuiteOptions } from '../../loadtest/suite.js'

async function gateway (t: Test): Promise<Pick<SuiteOptions, 'target' | 'token'>> {
  const app = await buildDemoApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const jwt = token({ tenant: 'suite', roles: ['viewer'] })
  return { target: { name: 'test', url: `http://127.0.0.1:${port}`, headers: { authorization: `Bearer ${jwt}` } }, token: jwt }
}

const METRICS = [
  'http_req_failed{face:rest}', 'http_req_duration{face:rest}', 'checks{face:rest}',
  'http_req_failed{face:trpc}', 'http_req_duration{face:trpc}', 'checks{face:trpc}',
  'http_req_failed{face:graphql}', 'http_req_duration{face:graphql}', 'checks{face:graphql}',
  'ws_call_duration{op:getAgent}', 'ws_call_failed{op:getAgent}', 'ws_calls'
]

t.test('the stages are scaled and followed as k6 ramps them', async (t) => {
  t.strictSame(scaleStages([{ durationS: 30, target: 100 }, { durationS: 60, target: 10 }], 0.1, 2), [{ durationS: 3, target: 200 }, { durationS: 6, target: 20 }])
  const stages = [{ durationS: 10, target: 100 }, { durationS: 10, target: 100 }, { durationS: 0, target: 5 }]
  t.equal(levelAt(stages, 0, 0), 0)
  t.equal(levelAt(stages, 0, 5), 50, 'linear within a stage')
  t.equal(levelAt(stages, 0, 15), 100)
  t.equal(levelAt(stages, 0, 25), 5, 'past the end: the last target')
})

t.test('smoke, scaled tiny: every face driven, every threshold evaluated and reported', async (t) => {
  const gw = await gateway(t)
  // 30 s x 0.03 = 0.9 s at 2 x 5 = 10 requests/s per HTTP face, 5 WebSocket connections.
  const report = await runSuite({ ...gw, profile: smoke, timeScale: 0.03, rateScale: 5, faces: SUITE_FACES, stepSeconds: 0.2 })
  t.strictSame(report.faces.map((f) => f.face), ['rest', 'trpc', 'graphql', 'websocket'])
  for (const f of report.faces) {
    t.ok(f.requests > 0, `${f.face}: requests were sent (${f.requests})`)
    t.equal(f.failed, 0, `${f.face}: every answer had the expected status: ${JSON.stringify(f.outcomes)}`)
    t.equal(f.checkFailures, 0, `${f.face}: every answer carried the agent`)
  }
  t.strictSame(report.thresholds.map((r) => r.metric), METRICS, 'the thresholds of the profile, per face')
  for (const r of report.thresholds) {
    t.ok(Number.isFinite(r.observed), `${r.metric} ${r.expression}: observed ${r.observed}`)
    t.equal(typeof r.pass, 'boolean')
  }
  const byMetric = new Map(report.thresholds.map((r) => [r.metric, r]))
  // Correctness thresholds do not depend on the machine's speed: they pass.
  for (const m of ['http_req_failed{face:rest}', 'checks{face:graphql}', 'ws_call_failed{op:getAgent}', 'ws_calls']) t.equal(byMetric.get(m)?.pass, true, `${m} passes`)
  t.equal(byMetric.get('http_req_duration{face:trpc}')?.expression, 'p(99)<10', 'the profile\'s own p99')
  t.equal(report.aborted, null)
  t.equal(report.passed, report.thresholds.every((r) => r.pass), 'the verdict is the thresholds\' conjunction')
  const text = formatSuite(report)
  for (const r of report.thresholds) t.match(text, `${r.pass ? 'pass' : 'FAIL'}  ${r.metric} ${r.expression}`, `${r.metric} is printed with its verdict`)
  t.match(text, /suite smoke: (passed|FAILED)/)
})

t.test('a threshold nobody can meet fails the suite', async (t) => {
  const gw = await gateway(t)
  const impossible: LoadProfile = { ...smoke, thresholds: { ...smoke.thresholds, p99Ms: 0 } }
  const report = await runSuite({ ...gw, profile: impossible, timeScale: 0.02, rateScale: 5, faces: ['rest', 'websocket'], stepSeconds: 0.2 })
  const durations = report.thresholds.filter((r) => r.expression === 'p(99)<0')
  t.strictSame(durations.map((r) => [r.metric, r.pass]), [['http_req_duration{face:rest}', false], ['ws_call_duration{op:getAgent}', false]])
  t.equal(report.passed, false)
  t.equal(report.aborted, null, 'no abortOnFail: the run went to its end')
  const text = formatSuite(report)
  t.match(text, 'FAIL  http_req_duration{face:rest} p(99)<0')
  t.match(text, 'pass  http_req_failed{face:rest} rate<0.001')
  t.match(text, 'suite smoke: FAILED (2 of 6 thresholds crossed)')
})

t.test('with abortOnFail, the first crossing stops the run', async (t) => {
  const gw = await gateway(t)
  // 30 s at 10 requests/s would be 300 requests: the crossing stops it long before.
  const impossible: LoadProfile = { ...smoke, stages: [{ durationS: 30, target: 10 }], thresholds: { p99Ms: 0, errorRate: 0.001, abortOnFail: true, delayAbortEvalS: 0 } }
  const report = await runSuite({ ...gw, profile: impossible, timeScale: 1, rateScale: 1, faces: ['graphql'], stepSeconds: 0.1 })
  t.not(report.aborted, null)
  t.match(report.aborted, { metric: 'http_req_duration{face:graphql}', expression: 'p(99)<0' })
  t.ok(report.faces[0].requests > 0 && report.faces[0].requests < 300, `stopped after ${report.faces[0].requests} of 300 requests`)
  t.equal(report.passed, false)
  t.match(formatSuite(report), /suite smoke: FAILED, aborted at .* by http_req_duration\{face:graphql\} p\(99\)<0/)
})
