// What the HTTP suites (smoke.ts, load.ts, stress.ts, spike.ts, soak.ts) share: the request of
// each face, its checks, and the options a suite's profile becomes. Each suite script is its
// profile plus these exec functions.
//
// Environment (k6 run -e NAME=value):
//   BASE_URL    the gateway (default http://127.0.0.1:3000)
//   TOKEN       a bearer token (empty: a gateway with BFF_AUTH_ENABLED=false)
//   FACES       comma-separated faces to load (default rest,trpc,graphql)
//   SCALE       multiplies every stage's duration and delayAbortEval (default 1; 0.1 runs a tenth as long)
//   RATE_SCALE  multiplies every stage's rate (default 1)
import http from 'k6/http'
import { check } from 'k6'
import type { Options } from 'k6/options'
import {
  facesNamed, GRAPHQL_GET_AGENT, K6_GRACEFUL_STOP_S, positiveNumber, rampingArrival, REST_GET_AGENT, runSeconds, suiteThresholds, TRPC_GET_AGENT, valueAt,
  type FaceScenario, type LoadProfile
} from './common.ts'
import { refuseShortToken } from './token.ts'

const BASE_URL = (__ENV.BASE_URL ?? 'http://127.0.0.1:3000').replace(/\/+$/, '')
const TOKEN = __ENV.TOKEN ?? ''
const SCALE = positiveNumber(__ENV.SCALE, 1, 'SCALE')
const RATE_SCALE = positiveNumber(__ENV.RATE_SCALE, 1, 'RATE_SCALE')

/** Every HTTP face, by the exec function that loads it. */
const FACES: ReadonlyArray<{ exec: string, scenario: FaceScenario }> = [
  { exec: 'restGetAgent', scenario: REST_GET_AGENT },
  { exec: 'trpcGetAgent', scenario: TRPC_GET_AGENT },
  { exec: 'graphqlGetAgent', scenario: GRAPHQL_GET_AGENT }
]

const wanted = facesNamed(__ENV.FACES)
const SELECTED = FACES.filter((f) => wanted.includes(f.scenario.face))

/** How long the suite of this script runs at most (s), set by suiteOptions; for setup. */
let runS = 0

/** The options of a suite: one ramping-arrival-rate scenario per face, thresholds per face. */
export function suiteOptions (profile: LoadProfile): Options {
  const scenarios: NonNullable<Options['scenarios']> = {}
  for (const f of SELECTED) scenarios[f.exec] = rampingArrival(f.exec, profile, SCALE, RATE_SCALE)
  runS = runSeconds(profile.stages, SCALE, K6_GRACEFUL_STOP_S)
  return { scenarios, thresholds: suiteThresholds(profile, SELECTED.map((f) => f.scenario.face), SCALE) }
}

/** Refuses to start a suite whose TOKEN expires before it ends (see tokenShortfall). */
export function setup (): void { refuseShortToken(TOKEN, runS) }

const auth: Record<string, string> = TOKEN === '' ? {} : { authorization: `Bearer ${TOKEN}` }

function call (s: FaceScenario): void {
  const body = s.body === undefined ? null : JSON.stringify(s.body)
  const res = http.request(s.method, BASE_URL + s.path, body, {
    headers: body === null ? auth : { ...auth, 'content-type': 'application/json' },
    tags: { op: s.operation, face: s.face, name: s.name },
    // Only the expected status counts as a success in http_req_failed.
    responseCallback: http.expectedStatuses(s.expectedStatus)
  })
  // One check per request, as the harness counts: a status check beside the answer's made a
  // wrong answer cost half as much against the checks threshold.
  check(res, {
    [`${s.face} ${s.expectedStatus}, answer ${s.check.path.join('.')} = ${s.check.equals}`]: (r) => {
      if (r.status !== s.expectedStatus || typeof r.body !== 'string') return false
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

/** One request per selected face: the default function, for `k6 run --vus 10 --duration 30s`. */
export function everyFace (): void {
  for (const f of SELECTED) call(f.scenario)
}
