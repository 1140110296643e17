// k6 load test: REST getAgent and listAgents, each at a constant arrival rate (open model: new
// requests keep arriving at the set rate however slow the gateway gets, so a slowdown shows up
// as latency and dropped iterations instead of being hidden by clients that wait).
//
//   k6 run -e BASE_URL=http://127.0.0.1:3000 -e TOKEN="$(npm run -s token)" \
//          -e RATE=200 -e DURATION=2m loadtest/k6/load.ts
//
// RATE is per operation, per second (default 100); DURATION defaults to 1m.
//
// The scenarios, their thresholds and the executor come from ./common.ts.
import http from 'k6/http'
import { check } from 'k6'
import type { Options } from 'k6/options'
import { arrival, GET_AGENT, LIST_AGENTS, positiveInt, thresholdsByOp, type HttpScenario } from './common.ts'

const BASE_URL = (__ENV.BASE_URL ?? 'http://127.0.0.1:3000').replace(/\/+$/, '')
const TOKEN = __ENV.TOKEN ?? ''
const RATE = positiveInt(__ENV.RATE, 100)
const DURATION = __ENV.DURATION ?? '1m'

const SCENARIOS = [GET_AGENT, LIST_AGENTS] as const

export const options: Options = {
  scenarios: {
    getAgent: arrival('getAgent', RATE, DURATION),
    listAgents: arrival('listAgents', RATE, DURATION)
  },
  thresholds: thresholdsByOp(SCENARIOS)
}

const headers: Record<string, string> = TOKEN === '' ? {} : { authorization: `Bearer ${TOKEN}` }

function call (s: HttpScenario): void {
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
