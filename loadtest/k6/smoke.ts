// k6 smoke test: one virtual user for 30 s through the REST getAgent and listAgents scenarios.
// Proves the gateway answers correctly and quickly before a load test is worth running.
//
//   k6 run -e BASE_URL=http://127.0.0.1:3000 -e TOKEN="$(npm run -s token)" loadtest/k6/smoke.ts
//
// The scenarios and their thresholds come from ./common.ts.
import http from 'k6/http'
import { check } from 'k6'
import type { Options } from 'k6/options'
import { GET_AGENT, LIST_AGENTS, thresholdsByOp } from './common.ts'

const BASE_URL = (__ENV.BASE_URL ?? 'http://127.0.0.1:3000').replace(/\/+$/, '')
const TOKEN = __ENV.TOKEN ?? ''

const SCENARIOS = [GET_AGENT, LIST_AGENTS] as const

export const options: Options = {
  vus: 1,
  duration: '30s',
  thresholds: thresholdsByOp(SCENARIOS)
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
