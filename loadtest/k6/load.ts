// k6 load test: REST getAgent and listAgents, each at a constant arrival rate (open model: new
// requests keep arriving at the set rate however slow the gateway gets, so a slowdown shows up
// as latency and dropped iterations instead of being hidden by clients that wait).
//
//   k6 run -e BASE_URL=http://127.0.0.1:3000 -e TOKEN="$(npm run -s token)" \
//          -e RATE=200 -e DURATION=2m loadtest/k6/load.ts
//
// RATE is per operation, per second (default 100); DURATION defaults to 1m.
//
// Self-contained on purpose: plain k6 cannot import loadtest/scenarios.ts at run time. The
// paths, expected statuses and thresholds below are the same numbers as in loadtest/scenarios.ts
// (getAgent, listAgents): change both together.
import http from 'k6/http'
import { check } from 'k6'
import type { Options } from 'k6/options'

const BASE_URL = (__ENV.BASE_URL ?? 'http://127.0.0.1:3000').replace(/\/+$/, '')
const TOKEN = __ENV.TOKEN ?? ''
const RATE = positiveInt(__ENV.RATE, 100)
const DURATION = __ENV.DURATION ?? '1m'

// = loadtest/scenarios.ts
const GET_AGENT = { name: 'rest-getAgent', operation: 'getAgent', method: 'GET', path: '/api/v1/agents/a1', expectedStatus: 200, thresholds: { p99Ms: 10, errorRate: 0.001 } } as const
const LIST_AGENTS = { name: 'rest-listAgents', operation: 'listAgents', method: 'GET', path: '/api/v1/agents?limit=20', expectedStatus: 200, thresholds: { p99Ms: 10, errorRate: 0.001 } } as const
const SCENARIOS = [GET_AGENT, LIST_AGENTS] as const

type ScenarioDef = typeof SCENARIOS[number]

function positiveInt (raw: string | undefined, fallback: number): number {
  const n = Number(raw)
  return raw !== undefined && Number.isInteger(n) && n > 0 ? n : fallback
}

const thresholds: Record<string, string[]> = {
  http_req_failed: ['rate<0.001'],
  http_req_duration: ['p(99)<10']
}
for (const s of SCENARIOS) {
  thresholds[`http_req_failed{op:${s.operation}}`] = [`rate<${s.thresholds.errorRate}`]
  thresholds[`http_req_duration{op:${s.operation}}`] = [`p(99)<${s.thresholds.p99Ms}`]
}

// VUs only carry the requests in flight: at a few ms per request, rate/10 of them suffice;
// maxVUs leaves room for a slowdown before k6 starts dropping iterations (dropped_iterations).
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
    getAgent: arrival('getAgent'),
    listAgents: arrival('listAgents')
  },
  thresholds
}

const headers: Record<string, string> = TOKEN === '' ? {} : { authorization: `Bearer ${TOKEN}` }

function call (s: ScenarioDef): void {
  const res = http.request(s.method, BASE_URL + s.path, null, {
    headers,
    tags: { op: s.operation, name: s.name },
    // Only the expected status counts as a success in http_req_failed.
    responseCallback: http.expectedStatuses(s.expectedStatus)
  })
  check(res, { [`${s.operation} status ${s.expectedStatus}`]: (r) => r.status === s.expectedStatus }, { op: s.operation })
}

export function getAgent (): void { call(GET_AGENT) }
export function listAgents (): void { call(LIST_AGENTS) }

// Used when the scenarios are overridden from the command line (e.g. k6 run --vus 10 --duration 30s).
export default function (): void {
  for (const s of SCENARIOS) call(s)
}
