// k6 load test of the HTTP faces: the same operation, getAgent(id a1), over REST, tRPC and
// GraphQL, each at a constant arrival rate (open model, like load.ts), with thresholds per face.
// The WebSocket face has its own script (websocket.ts): k6 drives it with another API.
//
//   k6 run -e BASE_URL=http://127.0.0.1:3000 -e TOKEN="$(npm run -s token)" \
//          -e RATE=200 -e DURATION=2m loadtest/k6/faces.ts
//
// RATE is per face, per second (default 100); DURATION defaults to 1m.
//
// The scenarios (requests, expected statuses, answer checks), their thresholds and the executor
// come from ./common.ts.
import http from 'k6/http'
import { check } from 'k6'
import type { Options } from 'k6/options'
import { arrival, GRAPHQL_GET_AGENT, positiveInt, REST_GET_AGENT, thresholdsByFace, TRPC_GET_AGENT, valueAt, type FaceScenario } from './common.ts'

const BASE_URL = (__ENV.BASE_URL ?? 'http://127.0.0.1:3000').replace(/\/+$/, '')
const TOKEN = __ENV.TOKEN ?? ''
const RATE = positiveInt(__ENV.RATE, 100)
const DURATION = __ENV.DURATION ?? '1m'

const SCENARIOS = [REST_GET_AGENT, TRPC_GET_AGENT, GRAPHQL_GET_AGENT] as const

export const options: Options = {
  scenarios: {
    restGetAgent: arrival('restGetAgent', RATE, DURATION),
    trpcGetAgent: arrival('trpcGetAgent', RATE, DURATION),
    graphqlGetAgent: arrival('graphqlGetAgent', RATE, DURATION)
  },
  thresholds: thresholdsByFace(SCENARIOS)
}

const auth: Record<string, string> = TOKEN === '' ? {} : { authorization: `Bearer ${TOKEN}` }

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
