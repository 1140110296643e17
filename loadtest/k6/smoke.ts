// k6 smoke test: one virtual user for 30 s through the REST getAgent and listAgents scenarios.
// Proves the gateway answers correctly and quickly before a load test is worth running.
//
//   k6 run -e BASE_URL=http://127.0.0.1:3000 -e TOKEN="$(npm run -s token)" loadtest/k6/smoke.ts
//
// Self-contained on purpose: plain k6 cannot import loadtest/scenarios.ts at run time. The
// paths, expected statuses and thresholds below are the same numbers as in loadtest/scenarios.ts
// (getAgent, listAgents): change both together.
import http from 'k6/http'
import { check } from 'k6'
import type { Options } from 'k6/options'

const BASE_URL = (__ENV.BASE_URL ?? 'http://127.0.0.1:3000').replace(/\/+$/, '')
const TOKEN = __ENV.TOKEN ?? ''

// = loadtest/scenarios.ts
const SCENARIOS = [
  { name: 'rest-getAgent', operation: 'getAgent', method: 'GET', path: '/api/v1/agents/a1', expectedStatus: 200, thresholds: { p99Ms: 10, errorRate: 0.001 } },
  { name: 'rest-listAgents', operation: 'listAgents', method: 'GET', path: '/api/v1/agents?limit=20', expectedStatus: 200, thresholds: { p99Ms: 10, errorRate: 0.001 } }
] as const

const thresholds: Record<string, string[]> = {
  http_req_failed: ['rate<0.001'],
  http_req_duration: ['p(99)<10']
}
// The same limits per operation, so a slow one is not hidden by a fast one in the totals.
for (const s of SCENARIOS) {
  thresholds[`http_req_failed{op:${s.operation}}`] = [`rate<${s.thresholds.errorRate}`]
  thresholds[`http_req_duration{op:${s.operation}}`] = [`p(99)<${s.thresholds.p99Ms}`]
}

export const options: Options = {
  vus: 1,
  duration: '30s',
  thresholds
}

// No token: a gateway with BFF_AUTH_ENABLED=false (or the pass-through) is the target.
const headers: Record<string, string> = TOKEN === '' ? {} : { authorization: `Bearer ${TOKEN}` }

export default function (): void {
  for (const s of SCENARIOS) {
    const res = http.request(s.method, BASE_URL + s.path, null, {
      headers,
      tags: { op: s.operation, name: s.name },
      // Only the expected status counts as a success in http_req_failed.
      responseCallback: http.expectedStatuses(s.expectedStatus)
    })
    check(res, {
      [`${s.operation} status ${s.expectedStatus}`]: (r) => r.status === s.expectedStatus,
      [`${s.operation} JSON body`]: (r) => typeof r.body === 'string' && (r.body.startsWith('{') || r.body.startsWith('['))
    }, { op: s.operation })
  }
}
