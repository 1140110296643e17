// The load suites run by the Node harness (loadtest/suite.ts): the smoke profile, scaled tiny,
// against a real gateway on the demo Kernel. Nothing here asserts a latency: the machine is
// shared. What is checked is that every face is driven, every threshold of the profile is
// evaluated and reported, and that a threshold nobody can meet fails the suite (and, with
// abortOnFail, stops it).
import t, { type Test } from 'tap'
import { buildDemoApp, token } from '../helper.js'
import { smoke, type LoadProfile, FACE_SCENARIOS, PROFILES, SCENARIOS, SUITE_HTTP_SCENARIOS } from '../../loadtest/scenarios.js'
import { evaluate, formatSuite, levelAt, runSuite, scaleStages, SUITE_FACES, type SuiteOptions } from '../../loadtest/suite.js'
import { Histogram } from '../../loadtest/histogram.js'
import * as k6 from '../../loadtest/k6/common.js'
import { spineGoal } from '../../loadtest/measure.js'
import { breakdown, formatBreakdown } from '../../loadtest/perf-profile.js'
import { nginxConfig } from '../../loadtest/nginx-proxy.js'
import { REST_TARGETS } from '../../loadtest/harness.js'
import { existsSync, readFileSync } from 'node:fs'
import { createServer, type IncomingMessage } from 'node:http'
import { WebSocketServer, type RawData } from 'ws'

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

t.test('p(99) thresholds are evaluated as k6 evaluates them: interpolated between ranks', async (t) => {
  // 59 answers of 2 ms and one of 40 ms: k6's p(99) is 17.58 ms, and p(99)<20 passes; nearest
  // rank read 40 ms and failed it.
  const histogram = new Histogram()
  for (let i = 0; i < 59; i++) histogram.recordMs(2)
  histogram.recordMs(40)
  const c = { histogram, requests: 60, failed: 0, checkFailures: 0, outcomes: {} }
  const profile: LoadProfile = { ...smoke, thresholds: { ...smoke.thresholds, p99Ms: 20 } }
  const results = evaluate(profile, [{ face: 'rest', c }, { face: 'websocket', c }])
  for (const metric of ['http_req_duration{face:rest}', 'ws_call_duration{op:getAgent}']) {
    const r = results.find((x) => x.metric === metric)
    t.ok(r !== undefined && Math.abs(r.observed - 17.58) < 0.07 && r.pass, `${metric} p(99)<20: observed ${String(r?.observed)}, passes`)
  }
})

/** A fake /ws that answers the first `answers` calls (across connections) and then none. */
async function stallingWs (t: Test, answers: number): Promise<{ url: string, upgrades: IncomingMessage[] }> {
  const upgrades: IncomingMessage[] = []
  let answered = 0
  const server = createServer((_req, res) => { res.statusCode = 404; res.end() })
  const wss = new WebSocketServer({ server, path: '/ws' })
  wss.on('connection', (socket, req) => {
    upgrades.push(req)
    socket.on('message', (data: RawData) => {
      const call = JSON.parse((data as Buffer).toString('utf8')) as { id: string }
      if (answered++ < answers) socket.send(JSON.stringify({ id: call.id, result: { id: 'a1', name: 'x', model: 'y' } }))
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(async () => {
    for (const c of wss.clients) c.terminate()
    wss.close()
    await new Promise((resolve) => server.close(resolve))
  })
  return { url: `http://127.0.0.1:${(server.address() as { port: number }).port}`, upgrades }
}

t.test('a WebSocket call never answered fails at its deadline, with its time, and the user connects again', async (t) => {
  // One connection, one call in flight: without a deadline the stalled call blocked its
  // connection to the end of the run, was never timed, and counted once at most.
  const fake = await stallingWs(t, 20)
  const started = Date.now()
  // 30 s x 0.1 = 3 s: the 21st call times out at ~2 s, the next one's connection is opened then.
  const report = await runSuite({ profile: smoke, timeScale: 0.1, rateScale: 1, target: { name: 'fake', url: fake.url, headers: {} }, token: 'tok', faces: ['websocket'], stepSeconds: 0.2 })
  const ws = report.faces[0]
  t.equal(ws.outcomes.result, 20, 'the answered calls')
  t.ok((ws.outcomes.timeout ?? 0) >= 1, `the stalled calls failed at their deadline: ${JSON.stringify(ws.outcomes)}`)
  t.equal(ws.failed, ws.outcomes.timeout, 'every failure a timeout')
  // Within the histogram's resolution (0.4 %: a 2,000.4 ms call was read as 1,999.9 ms once).
  t.ok(ws.maxMs >= k6.WS_GET_AGENT.callTimeoutMs * 0.995 && ws.maxMs < k6.WS_GET_AGENT.callTimeoutMs + 500, `timed, as the deadline: max ${ws.maxMs} ms`)
  t.ok(fake.upgrades.length >= 2, `the user opened another connection after the timeout (${fake.upgrades.length})`)
  const failed = report.thresholds.find((r) => r.metric === 'ws_call_failed{op:getAgent}')
  t.equal(failed?.pass, false, `ws_call_failed crossed: ${String(failed?.observed)}`)
  t.equal(report.passed, false, 'the suite fails')
  t.ok(Date.now() - started < 3000 + k6.WS_GET_AGENT.callTimeoutMs + 1500, 'the run ends by the last deadline')
  // The token goes in the upgrade's Authorization header, as k6/websocket.ts sends it, not in the URL.
  t.strictSame(fake.upgrades.map((r) => [r.url, r.headers.authorization]), fake.upgrades.map(() => ['/ws', 'Bearer tok']))
})

t.test('a WebSocket connection refused without an answer is a failed call, each time, as k6 counts it', async (t) => {
  // The gateway goes away 0.5 s into a 3 s run, and each of the user's new connections is refused.
  // Only the call in flight when it went was counted: gone for the rest of a long run, it failed
  // one call per connection against every call answered before, and ws_call_failed passed.
  const server = createServer((_req, res) => { res.statusCode = 404; res.end() })
  const wss = new WebSocketServer({ server, path: '/ws' })
  wss.on('connection', (socket) => {
    socket.on('message', (data: RawData) => {
      const call = JSON.parse((data as Buffer).toString('utf8')) as { id: string }
      socket.send(JSON.stringify({ id: call.id, result: { id: 'a1', name: 'x', model: 'y' } }))
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const url = `http://127.0.0.1:${(server.address() as { port: number }).port}`
  const gone = setTimeout(() => {
    for (const c of wss.clients) c.terminate()
    wss.close()
    server.close()
  }, 500)
  t.teardown(() => {
    clearTimeout(gone)
    for (const c of wss.clients) c.terminate()
    wss.close()
    server.close()
  })
  const report = await runSuite({ profile: smoke, timeScale: 0.1, rateScale: 1, target: { name: 'fake', url, headers: {} }, token: null, faces: ['websocket'], stepSeconds: 0.2 })
  const ws = report.faces[0]
  t.ok((ws.outcomes.result ?? 0) > 0, `calls answered before it went: ${JSON.stringify(ws.outcomes)}`)
  // 2.5 s without the gateway, a new connection every 100 ms after each refusal.
  t.ok((ws.outcomes['connect ECONNREFUSED'] ?? 0) >= 5, `each refused connection failed: ${JSON.stringify(ws.outcomes)}`)
  t.equal(ws.failed, ws.requests - (ws.outcomes.result ?? 0), 'every call but the answered ones failed')
})

// k6 cannot run here: what k6/websocket.ts must do is checked in its source (type-checked
// against @types/k6 by `npx tsc -p loadtest/k6/tsconfig.json`).
t.test('k6/websocket.ts: the token in the header, a deadline per call, a pause after a failure', async (t) => {
  const src = readFileSync(new URL('../../loadtest/k6/websocket.ts', import.meta.url), 'utf8')
  const code = src.split('\n').filter((l) => !l.trimStart().startsWith('//')).join('\n')
  // k6 tags every ws_* sample with the URL (`url`, and `name` by default): a token in
  // ?access_token= went to every output.
  t.notMatch(code, 'access_token', 'no token in the URL')
  t.match(code, "const url = BASE_URL.replace(/^http/, 'ws') + WS_GET_AGENT.path\n")
  t.match(code, 'headers: TOKEN === \'\' ? {} : { authorization: `Bearer $' + '{TOKEN}` }, tags: { name: WS_GET_AGENT.name }')
  t.match(code, 'new WebSocket(url, null, params)')
  t.match(code, "from 'k6/websockets'", 'k6/websockets: k6 v1.6.0 or later, as loadtest/README.md says')
  // Each call has its deadline; past it, the call fails, timed, and the connection is closed.
  t.match(code, /deadline = setTimeout\(timedOut, WS_GET_AGENT\.callTimeoutMs\)/)
  t.match(code, /const timedOut = \(\): void => \{[^}]*callDuration\.add\(Date\.now\(\) - sentAt, tags\)\s+callFailed\.add\(true, tags\)\s+ws\.close\(\)/)
  // A refused upgrade ended the iteration at once: the next one retried in a tight loop.
  t.match(code, /if \(failed\) setTimeout\(\(\) => \{\}, 100\)/)
  t.match(code, "profileNamed(__ENV.PROFILE, 'load')")
  t.match(code, "positiveInt(__ENV.SESSION, 10, 'SESSION')")
})

// The k6 scripts (loadtest/k6) load their scenarios from loadtest/k6/common.ts, which k6 can
// import at run time; the Node harness reads loadtest/scenarios.ts. This test holds the two equal:
// every scenario common.ts defines has the method, path, body or frame, expected status, answer
// check and thresholds of the scenario of the same name in scenarios.ts.

type Fields = Record<string, unknown>

/** Every field a scenario of either side may carry that describes the request or its limits. */
const FIELDS = ['name', 'operation', 'face', 'method', 'path', 'body', 'frame', 'expectedStatus', 'check', 'callTimeoutMs', 'thresholds'] as const

/** The FIELDS that `s` has (a field one side has and the other lacks is a difference). */
function fields (s: object): Fields {
  const out: Fields = {}
  for (const key of FIELDS) if (key in s) out[key] = (s as Fields)[key]
  return out
}

// A suite profile (smoke, load, ...) has stages; it is compared below, as a whole.
const isScenario = (v: unknown): v is Fields =>
  typeof v === 'object' && v !== null && typeof (v as Fields).name === 'string' && typeof (v as Fields).thresholds === 'object' && !('stages' in v)

// Every exported scenario of common.ts, so one added there is checked without touching this test.
const k6Scenarios = (Object.entries(k6) as Array<[string, unknown]>).filter((e): e is [string, Fields] => isScenario(e[1]))
const reference: readonly Fields[] = [...SCENARIOS, ...FACE_SCENARIOS].map(fields)

t.test('common.ts defines the scenarios the k6 scripts run', async (t) => {
  t.strictSame(k6Scenarios.map(([name]) => name).sort(),
    ['GET_AGENT', 'GRAPHQL_GET_AGENT', 'LIST_AGENTS', 'REST_GET_AGENT', 'TRPC_GET_AGENT', 'WS_GET_AGENT'])
})

for (const [exported, scenario] of k6Scenarios) {
  t.test(`${exported} (${String(scenario.name)}) = loadtest/scenarios.ts`, async (t) => {
    const mine = fields(scenario)
    // rest-getAgent is both a plain scenario (getAgent) and a face one (restGetAgent): the one
    // of the same kind (with or without a face) is the reference.
    const same = reference.filter((r) => r.name === mine.name && r.face === mine.face)
    t.equal(same.length, 1, `one scenario named ${String(mine.name)}${mine.face === undefined ? '' : ` (face ${String(mine.face)})`} in scenarios.ts`)
    if (same.length === 1) t.strictSame(mine, same[0], 'same method, path, body or frame, expected status, check and thresholds')
  })
}

t.test('positiveInt reads a positive integer from the environment', async (t) => {
  t.equal(k6.positiveInt('12', 1), 12)
  for (const raw of [undefined, '']) t.equal(k6.positiveInt(raw, 7), 7, `positiveInt(${String(raw)}): not set, the default`)
  // SESSION=2.5 ran with the default 10 s without a word.
  for (const raw of ['0', '-3', '2.5', 'x', '1e400']) t.throws(() => k6.positiveInt(raw, 7, 'SESSION'), { message: `SESSION=${raw}: a positive whole number, or unset for 7` }, `positiveInt(${raw}) throws`)
})

t.test('a set but invalid SCALE or PROFILE stops the k6 script', async (t) => {
  t.equal(k6.positiveNumber('0.05', 1, 'SCALE'), 0.05)
  for (const raw of [undefined, '']) t.equal(k6.positiveNumber(raw, 3), 3, `positiveNumber(${String(raw)}): not set, the default`)
  // SCALE=0,1 (a decimal comma) ran the whole suite unscaled.
  for (const raw of ['0,1', '0', '-1', 'x', 'Infinity']) t.throws(() => k6.positiveNumber(raw, 1, 'SCALE'), { message: `SCALE=${raw}: a positive number (e.g. 0.1), or unset for 1` }, `positiveNumber(${raw}) throws`)
  t.equal(k6.profileNamed(undefined, 'load'), k6.LOAD)
  t.equal(k6.profileNamed('stress', 'load'), k6.STRESS)
  // `in` accepted the keys PROFILES inherits from Object.prototype.
  for (const raw of ['toString', 'constructor', '__proto__', 'Smoke']) t.throws(() => k6.profileNamed(raw, 'load'), { message: `PROFILE=${raw}: one of smoke, load, stress, spike, soak` }, `PROFILE=${raw} throws`)
})

t.test('FACES names the HTTP faces a k6 suite loads; a name that is no face stops it', async (t) => {
  t.strictSame(k6.facesNamed(undefined), ['rest', 'trpc', 'graphql'], 'unset: every face')
  t.strictSame(k6.facesNamed('graphql, rest,'), ['rest', 'graphql'], 'in the order the scenarios run')
  // FACES=rest,grpahql loaded REST alone, without a word: its thresholds passed, read as GraphQL's too.
  t.throws(() => k6.facesNamed('rest,grpahql'), { message: 'FACES=rest,grpahql: unknown face grpahql: name at least one of rest, trpc, graphql' })
  t.throws(() => k6.facesNamed('websocket'), { message: /^FACES=websocket: unknown face websocket/ }, 'websocket.ts is its own script')
  for (const raw of ['', ',']) t.throws(() => k6.facesNamed(raw), { message: `FACES=${raw}: name at least one of rest, trpc, graphql` })
  const src = readFileSync(new URL('../../loadtest/k6/http-faces.ts', import.meta.url), 'utf8')
  t.match(src, 'const wanted = facesNamed(__ENV.FACES)\n', 'http-faces.ts reads FACES with it')
})

t.test('the k6 suites (smoke, load, stress, spike, soak) = the profiles of loadtest/scenarios.ts', async (t) => {
  t.strictSame(Object.keys(k6.PROFILES).sort(), PROFILES.map((p) => p.name).sort(), 'the same suites')
  for (const profile of PROFILES) {
    t.strictSame(k6.PROFILES[profile.name], profile, `${profile.name}: same start rate, stages, WebSocket stages and thresholds`)
  }
  // Every exported profile of common.ts is one of PROFILES (none defined but left out of the map).
  const exported = Object.values(k6).filter((v) => typeof v === 'object' && v !== null && 'stages' in v)
  t.equal(exported.length, PROFILES.length, 'every profile common.ts exports is in its PROFILES map')
  t.strictSame([k6.REST_GET_AGENT, k6.TRPC_GET_AGENT, k6.GRAPHQL_GET_AGENT].map(fields), SUITE_HTTP_SCENARIOS.map(fields), 'the suites load the same face scenarios')
})

t.test('a profile becomes k6 scenarios and thresholds', async (t) => {
  t.strictSame(k6.rampingArrival('restGetAgent', k6.STRESS, 0.5, 2), {
    executor: 'ramping-arrival-rate',
    exec: 'restGetAgent',
    startRate: 200,
    timeUnit: '1s',
    preAllocatedVUs: 600,
    maxVUs: 6000,
    stages: [{ duration: '30s', target: 600 }, { duration: '30s', target: 2000 }, { duration: '30s', target: 4000 }, { duration: '30s', target: 6000 }]
  })
  t.strictSame(k6.rampingArrival('x', k6.SMOKE, 0.001, 0.1).stages, [{ duration: '1s', target: 0 }], 'a stage lasts at least 1 s')
  t.strictSame(k6.rampingConnections('wsGetAgent', k6.SPIKE, 10, 1, 1), {
    executor: 'ramping-vus',
    exec: 'wsGetAgent',
    startVUs: 0,
    stages: [{ duration: '30s', target: 10 }, { duration: '5s', target: 500 }, { duration: '30s', target: 500 }, { duration: '5s', target: 10 }, { duration: '60s', target: 10 }],
    gracefulRampDown: '15s',
    gracefulStop: '15s'
  })
  t.strictSame(k6.suiteThresholds(k6.LOAD, ['rest']), {
    'http_req_failed{face:rest}': ['rate<0.001'],
    'http_req_duration{face:rest}': ['p(99)<10'],
    'checks{face:rest}': ['rate>0.999']
  }, 'plain expressions without abortOnFail')
  t.strictSame(k6.suiteThresholds(k6.STRESS, ['trpc']), {
    'http_req_failed{face:trpc}': [{ threshold: 'rate<0.01', abortOnFail: true, delayAbortEval: '10s' }],
    'http_req_duration{face:trpc}': [{ threshold: 'p(99)<50', abortOnFail: true, delayAbortEval: '10s' }],
    'checks{face:trpc}': [{ threshold: 'rate>0.99', abortOnFail: true, delayAbortEval: '10s' }]
  }, 'abortOnFail and delayAbortEval when the suite asks for them')
  t.strictSame(k6.wsSuiteThresholds(k6.SOAK, 'getAgent'), {
    'ws_call_duration{op:getAgent}': [{ threshold: 'p(99)<10', abortOnFail: true, delayAbortEval: '120s' }],
    'ws_call_failed{op:getAgent}': [{ threshold: 'rate<0.001', abortOnFail: true, delayAbortEval: '120s' }],
    ws_calls: ['count>0']
  })
  t.strictSame(k6.suiteThresholds(k6.STRESS, ['rest'], 0.05)['checks{face:rest}'], [{ threshold: 'rate>0.99', abortOnFail: true, delayAbortEval: '0.5s' }],
    'the grace before an abort is scaled with the stages, as the harness scales it (10 s of a 12 s run at SCALE=0.05)')
  t.strictSame(k6.wsSuiteThresholds(k6.SOAK, 'getAgent', 0.5)['ws_call_failed{op:getAgent}'], [{ threshold: 'rate<0.001', abortOnFail: true, delayAbortEval: '60s' }])
})

// `perf script -F ip,sym` output: a sample's frames one a line, leaf first, a blank line after.
const sample = (...frames: string[]): string => frames.map((f, i) => `\t    ${(0x7f00 + i).toString(16)} ${f}`).join('\n') + '\n\n'

t.test('a sample belongs to the kernel in a system call, else to its nearest JavaScript frame', async t => {
  const script = [
    sample('_raw_spin_unlock_irqrestore', 'tcp_sendmsg', 'entry_SYSCALL_64_after_hwframe', '__GI___writev', 'JS:*clearBuffer node:internal/streams/writable:744:21'),
    sample('Builtins_KeyedLoadIC_Megamorphic', 'JS:*processHeader node:_http_outgoing:546:23'),
    sample('JS:*answer file:///repo/.bench-build/plugins/cache/cache.js:1:3093', 'JS:*routeHandler /repo/node_modules/fastify/lib/route.js:465:25'),
    sample('Builtins_StringAdd_CheckNone', 'JS:* file:///repo/app.ts:6:2774', 'JS:*routeHandler /repo/node_modules/fastify/lib/route.js:465:25'),
    sample('JS:*onSend /repo/node_modules/@fastify/compress/index.js:331:19'),
    sample('RegExp:^[\\^_`a-zA-Z\\-0-9!#$%&\'*+.|~]+$', 'JS:*processHeader node:_http_outgoing:546:23'),
    sample('v8::internal::ScavengerCollector::CollectGarbage', 'v8::internal::Heap::Scavenge'),
    sample('JS:*x file:///elsewhere/lib.js:1:1'),
    // The last sample may come without its blank line.
    sample('JS:*answer file:///repo/plugins/cache/cache.ts:1:3093').trimEnd()
  ].join('')
  const b = breakdown(script, ['/repo/.bench-build/', '/repo/'])
  t.equal(b.samples, 9)
  const share = Object.fromEntries(b.parts.map(p => [p.name, Math.round(p.share * 9)]))
  t.same(share, {
    'kernel: system calls': 1,
    'Node (JavaScript)': 1,
    Mantle: 3,
    'package @fastify/compress': 1,
    'regular expressions': 1,
    'V8 and Node native code': 1,
    'other JavaScript': 1
  })
  t.same(b.mantle.map(p => [p.name, Math.round(p.share * 9)]), [['plugins/cache/cache.js', 1], ['app.ts', 1], ['plugins/cache/cache.ts', 1]], 'Mantle by file, from the build or the sources (ties in order met)')
  t.equal(b.parts[0].name, 'Mantle', 'parts largest first')
  const text = formatBreakdown('gateway-cache', b)
  t.match(text, /^perf: gateway-cache, 9 samples/)
  t.match(text, /33\.3% {2}Mantle\n/)
  t.match(text, /11\.1% {2}plugins\/cache\/cache\.js/)
})

t.test('no samples: no parts, no division by zero', async t => {
  t.same(breakdown('', ['/repo/']), { samples: 0, parts: [], mantle: [] })
  t.same(breakdown('\n\n\n', ['/repo/']), { samples: 0, parts: [], mantle: [] })
})

t.test('the nginx yardstick forwards /api/ to the Kernel root over a keep-alive upstream', async t => {
  const conf = nginxConfig('/tmp/x', '127.0.0.1', 8081, new URL('http://127.0.0.1:4001'))
  t.match(conf, 'listen 127.0.0.1:8081;')
  t.match(conf, 'upstream kernel { server 127.0.0.1:4001; keepalive 128; }')
  t.match(conf, /location \/api\/ \{\s+proxy_pass http:\/\/kernel\/;/)
  t.match(conf, 'proxy_set_header Connection "";')
  t.match(conf, 'access_log off;')
  t.equal(REST_TARGETS.some(d => d.name === 'nginx'), existsSync('/usr/sbin/nginx'), 'a target only when nginx is installed')
})

t.test('a k6 suite refuses a TOKEN that expires before the run can end', async (t) => {
  // The soak suite's stages last an hour, as long as `npm run token`'s default token: its last
  // part was all 401s (and WebSocket closes with 4401), read as the gateway failing.
  const soak = k6.runSeconds(k6.SOAK.stages, 1, k6.K6_GRACEFUL_STOP_S)
  t.equal(soak, 3600 + 30, 'the stages and the stop after them')
  t.equal(k6.runSeconds(k6.SOAK.stages, 0.1, 0), 6 + 354, 'scaled as k6 runs them')
  const now = 1_800_000_000
  t.match(k6.tokenShortfall(now + 3600, now, soak), /^TOKEN expires in 3600 s, before this run's 3630 s are over: mint one that lasts, e.g. TOKEN="\$\(npm run -s token -- --ttl 4260\)"$/)
  t.match(k6.tokenShortfall(now - 10, now, 30), /^TOKEN expires in 0 s/, 'one already expired')
  t.equal(k6.tokenShortfall(now + 7200, now, soak), null, 'one that lasts')
  t.equal(k6.tokenShortfall(null, now, soak), null, 'no token (a gateway without identity), or none that says')
})

t.test('the spine goal compares p99s at full resolution', async (t) => {
  // autocannon's p99 is cut to whole ms: 3.97 and 2.01 ms read 3 and 2, a difference of 1 that
  // met "+1.5 ms" for a true 1.96 ms.
  const row = (reqPerSec: number, p99FineMs: number, flagged = false) => ({ reqPerSec, p99FineMs, flagged })
  t.match(spineGoal(row(900, 3.97), row(1000, 2.01)), { evaluated: true, met: false, text: /goal NOT met — req\/s 90\.0% ok, p99 \+1\.96 ms too high$/ })
  t.match(spineGoal(row(900, 3.0), row(1000, 1.99)), { evaluated: true, met: true, text: /goal met — req\/s 90\.0% ok, p99 \+1\.01 ms ok$/ })
  t.match(spineGoal(row(700, 2.5), row(1000, 2.0)), { met: false, text: /req\/s 70\.0% too low/ })
  t.match(spineGoal(row(900, 2.5), row(1000, 2.0, true)), { met: false, text: /flagged targets/ })
  t.same(spineGoal(undefined, row(1000, 2)), { evaluated: false, met: false, text: 'spine goal not evaluated: needs both gateway-spine and passthrough' })
})
