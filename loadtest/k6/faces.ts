// k6 load test of the HTTP faces: the same operation, getAgent(id a1), over REST, tRPC and
// GraphQL, each at a constant arrival rate (open model, like load.ts), with thresholds per face.
// The WebSocket face has its own script (websocket.ts): k6 drives it with another API.
//
//   k6 run -e BASE_URL=http://127.0.0.1:3000 -e TOKEN="$(npm run -s token)" \
//          -e RATE=200 -e DURATION=2m loadtest/k6/faces.ts
//
// RATE is per face, per second (default 100); DURATION defaults to 1m.
//
// Self-contained on purpose: plain k6 cannot import loadtest/scenarios.ts at run time. The
// requests, expected statuses, answer checks and thresholds below are the same numbers as in
// loadtest/scenarios.ts (restGetAgent, trpcGetAgent, graphqlGetAgent): change both together.
import http from 'k6/http'
import { check } from 'k6'
import type { Options } from 'k6/options'

const BASE_URL = (__ENV.BASE_URL ?? 'http://127.0.0.1:3000').replace(/\/+$/, '')
const TOKEN = __ENV.TOKEN ?? ''
const RATE = positiveInt(__ENV.RATE, 100)
const DURATION = __ENV.DURATION ?? '1m'

interface FaceScenario {
  name: string
  operation: string
  face: 'rest' | 'trpc' | 'graphql'
  method: 'GET' | 'POST'
  path: string
  body?: unknown
  expectedStatus: number
  /** The answer must carry `equals` at `path` (GraphQL answers its errors with a 200). */
  check: { path: readonly string[], equals: string }
  thresholds: { p99Ms: number, errorRate: number }
}

// = loadtest/scenarios.ts
const REST_GET_AGENT: FaceScenario = { name: 'rest-getAgent', operation: 'getAgent', face: 'rest', method: 'GET', path: '/api/v1/agents/a1', expectedStatus: 200, check: { path: ['id'], equals: 'a1' }, thresholds: { p99Ms: 10, errorRate: 0.001 } }
// = loadtest/scenarios.ts
const TRPC_GET_AGENT: FaceScenario = { name: 'trpc-getAgent', operation: 'getAgent', face: 'trpc', method: 'GET', path: '/trpc/getAgent?input=' + encodeURIComponent(JSON.stringify({ id: 'a1' })), expectedStatus: 200, check: { path: ['result', 'data', 'id'], equals: 'a1' }, thresholds: { p99Ms: 10, errorRate: 0.001 } }
// = loadtest/scenarios.ts (the id argument's type is the one of the generated SDL: String!)
const GRAPHQL_GET_AGENT: FaceScenario = { name: 'graphql-getAgent', operation: 'getAgent', face: 'graphql', method: 'POST', path: '/graphql', body: { query: 'query($id:String!){ getAgent(id:$id){ id name model } }', variables: { id: 'a1' } }, expectedStatus: 200, check: { path: ['data', 'getAgent', 'id'], equals: 'a1' }, thresholds: { p99Ms: 10, errorRate: 0.001 } }
const SCENARIOS = [REST_GET_AGENT, TRPC_GET_AGENT, GRAPHQL_GET_AGENT] as const

function positiveInt (raw: string | undefined, fallback: number): number {
  const n = Number(raw)
  return raw !== undefined && Number.isInteger(n) && n > 0 ? n : fallback
}

// Per face: a slow or failing face is not hidden by a fast one in the totals. `checks` holds the
// answer checks, which also catch a GraphQL error answered with 200.
const thresholds: Record<string, string[]> = {}
for (const s of SCENARIOS) {
  thresholds[`http_req_failed{face:${s.face}}`] = [`rate<${s.thresholds.errorRate}`]
  thresholds[`http_req_duration{face:${s.face}}`] = [`p(99)<${s.thresholds.p99Ms}`]
  thresholds[`checks{face:${s.face}}`] = [`rate>${1 - s.thresholds.errorRate}`]
}

// VUs only carry the requests in flight (see load.ts).
const arrival = (exec: string) => ({
  executor: 'constant-arrival-rate' as const,
  exec,
  rate: RATE,
  timeUnit: '1s',
  duration: DURATION,
  preAllocatedVUs: Math.max(5, Math.ceil(RATE / 10)),
  maxVUs: Math.max(50, RATE)
})

export const options: Options = {
  scenarios: {
    restGetAgent: arrival('restGetAgent'),
    trpcGetAgent: arrival('trpcGetAgent'),
    graphqlGetAgent: arrival('graphqlGetAgent')
  },
  thresholds
}

const auth: Record<string, string> = TOKEN === '' ? {} : { authorization: `Bearer ${TOKEN}` }

function valueAt (value: unknown, path: readonly string[]): unknown {
  let v = value
  for (const key of path) v = typeof v === 'object' && v !== null ? (v as Record<string, unknown>)[key] : undefined
  return v
}

function call (s: FaceScenario): void {
  const body = s.body === undefined ? null : JSON.stringify(s.body)
  const res = http.request(s.method, BASE_URL + s.path, body, {
    headers: body === null ? auth : { ...auth, 'content-type': 'application/json' },
    tags: { op: s.operation, face: s.face, name: s.name },
    // Only the expected status counts as a success in http_req_failed.
    responseCallback: http.expectedStatuses(s.expectedStatus)
  })
  check(res, {
    [`${s.face} status ${s.expectedStatus}`]: (r) => r.status === s.expectedStatus,
    [`${s.face} answer ${s.check.path.join('.')} = ${s.check.equals}`]: (r) => {
      if (typeof r.body !== 'string') return false
      try {
        const answer = JSON.parse(r.body) as Record<string, unknown>
        return !('errors' in answer) && valueAt(answer, s.check.path) === s.check.equals
      } catch {
        return false
      }
    }
  }, { op: s.operation, face: s.face })
}

export function restGetAgent (): void { call(REST_GET_AGENT) }
export function trpcGetAgent (): void { call(TRPC_GET_AGENT) }
export function graphqlGetAgent (): void { call(GRAPHQL_GET_AGENT) }

// Used when the scenarios are overridden from the command line (e.g. k6 run --vus 10 --duration 30s).
export default function (): void {
  for (const s of SCENARIOS) call(s)
}
