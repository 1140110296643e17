// The k6 scripts (loadtest/k6) load their scenarios from loadtest/k6/common.ts, which k6 can
// import at run time; the Node harness reads loadtest/scenarios.ts. This test holds the two equal:
// every scenario common.ts defines has the method, path, body or frame, expected status, answer
// check and thresholds of the scenario of the same name in scenarios.ts.
import t from 'tap'
import * as k6 from '../../loadtest/k6/common.js'
import { FACE_SCENARIOS, PROFILES, SCENARIOS, SUITE_HTTP_SCENARIOS } from '../../loadtest/scenarios.js'

type Fields = Record<string, unknown>

/** Every field a scenario of either side may carry that describes the request or its limits. */
const FIELDS = ['name', 'operation', 'face', 'method', 'path', 'body', 'frame', 'expectedStatus', 'check', 'thresholds'] as const

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
  for (const raw of [undefined, '', '0', '-3', '1.5', 'x']) t.equal(k6.positiveInt(raw, 7), 7, `positiveInt(${String(raw)}) falls back`)
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
  t.equal(k6.positiveNumber('0.05', 1), 0.05)
  for (const raw of [undefined, '', '0', '-1', 'x']) t.equal(k6.positiveNumber(raw, 3), 3, `positiveNumber(${String(raw)}) falls back`)
})
