// The k6 scripts (loadtest/k6) load their scenarios from loadtest/k6/common.ts, which k6 can
// import at run time; the Node harness reads loadtest/scenarios.ts. This test holds the two equal:
// every scenario common.ts defines has the method, path, body or frame, expected status, answer
// check and thresholds of the scenario of the same name in scenarios.ts.
import t from 'tap'
import * as k6 from '../../loadtest/k6/common.js'
import { FACE_SCENARIOS, SCENARIOS } from '../../loadtest/scenarios.js'

type Fields = Record<string, unknown>

/** Every field a scenario of either side may carry that describes the request or its limits. */
const FIELDS = ['name', 'operation', 'face', 'method', 'path', 'body', 'frame', 'expectedStatus', 'check', 'thresholds'] as const

/** The FIELDS that `s` has (a field one side has and the other lacks is a difference). */
function fields (s: object): Fields {
  const out: Fields = {}
  for (const key of FIELDS) if (key in s) out[key] = (s as Fields)[key]
  return out
}

const isScenario = (v: unknown): v is Fields =>
  typeof v === 'object' && v !== null && typeof (v as Fields).name === 'string' && typeof (v as Fields).thresholds === 'object'

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

t.test('the thresholds the k6 scripts set come from those numbers', async (t) => {
  t.strictSame(k6.thresholdsByOp([k6.GET_AGENT, k6.LIST_AGENTS]), {
    http_req_failed: ['rate<0.001'],
    http_req_duration: ['p(99)<10'],
    'http_req_failed{op:getAgent}': ['rate<0.001'],
    'http_req_duration{op:getAgent}': ['p(99)<10'],
    'http_req_failed{op:listAgents}': ['rate<0.001'],
    'http_req_duration{op:listAgents}': ['p(99)<10']
  })
  t.strictSame(k6.thresholdsByFace([k6.REST_GET_AGENT, k6.TRPC_GET_AGENT, k6.GRAPHQL_GET_AGENT]), {
    'http_req_failed{face:rest}': ['rate<0.001'],
    'http_req_duration{face:rest}': ['p(99)<10'],
    'checks{face:rest}': ['rate>0.999'],
    'http_req_failed{face:trpc}': ['rate<0.001'],
    'http_req_duration{face:trpc}': ['p(99)<10'],
    'checks{face:trpc}': ['rate>0.999'],
    'http_req_failed{face:graphql}': ['rate<0.001'],
    'http_req_duration{face:graphql}': ['p(99)<10'],
    'checks{face:graphql}': ['rate>0.999']
  })
  t.strictSame(k6.arrival('getAgent', 200, '2m'), {
    executor: 'constant-arrival-rate', exec: 'getAgent', rate: 200, timeUnit: '1s', duration: '2m', preAllocatedVUs: 20, maxVUs: 200
  })
  t.equal(k6.positiveInt('12', 1), 12)
  for (const raw of [undefined, '', '0', '-3', '1.5', 'x']) t.equal(k6.positiveInt(raw, 7), 7, `positiveInt(${String(raw)}) falls back`)
})
