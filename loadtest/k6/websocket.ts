// k6 WebSocket suite: getAgent(id a1) as calls on /ws (CONTRACT §3), the same shape as the
// harness's ws-runner.ts, under one of the suites' connection stages (PROFILE: smoke, load,
// stress, spike or soak; default load). Each virtual user holds one connection with exactly one
// call in flight: {"id":"<n>","op":"getAgent","input":{"id":"a1"}}, and on the answer frame
// {"id":"<n>","result":{...}} the next. A connection lives SESSION seconds, then the VU opens
// a new one (so connection set-up is exercised too, and measured by k6 as ws_connecting).
//
//   k6 run -e BASE_URL=http://127.0.0.1:3000 -e TOKEN="$(npm run -s token)" \
//          -e PROFILE=stress -e SESSION=10 loadtest/k6/websocket.ts
//
// SCALE multiplies the stages' durations, CONNECTIONS_SCALE their connection counts (default 1).
// The token goes in ?access_token= (browsers cannot set headers on an upgrade). Uses k6's
// `k6/websockets` module (the browser-like WebSocket API; k6 v0.57+).
//
// The scenario (frame, answer check) and the profile (wsStages, thresholds) come from ./common.ts.
import { WebSocket } from 'k6/websockets'
import { setTimeout } from 'k6/timers'
import { Counter, Rate, Trend } from 'k6/metrics'
import type { Options } from 'k6/options'
import { positiveInt, positiveNumber, PROFILES, rampingConnections, runSeconds, valueAt, WS_GET_AGENT, wsSuiteThresholds, type LoadProfile } from './common.ts'
import { refuseShortToken } from './token.ts'

const BASE_URL = (__ENV.BASE_URL ?? 'http://127.0.0.1:3000').replace(/\/+$/, '')
const TOKEN = __ENV.TOKEN ?? ''
const SESSION_SECONDS = positiveInt(__ENV.SESSION, 10)
const SCALE = positiveNumber(__ENV.SCALE, 1)
const CONNECTIONS_SCALE = positiveNumber(__ENV.CONNECTIONS_SCALE, 1)
const PROFILE_NAME = __ENV.PROFILE ?? 'load'
if (!(PROFILE_NAME in PROFILES)) throw new Error(`PROFILE=${PROFILE_NAME}: one of ${Object.keys(PROFILES).join(', ')}`)
const PROFILE: LoadProfile = PROFILES[PROFILE_NAME as LoadProfile['name']]

/** Send -> answer of one call, in ms (k6 clocks have millisecond resolution). */
const callDuration = new Trend('ws_call_duration', true)
/** A call whose answer was not the expected result (an error frame, another id, no answer). */
const callFailed = new Rate('ws_call_failed')
const callsDone = new Counter('ws_calls')

const tags = { op: WS_GET_AGENT.operation, face: WS_GET_AGENT.face, name: WS_GET_AGENT.name }

export const options: Options = {
  scenarios: {
    // A closed model, as in the harness: one connection per VU, one call in flight each.
    wsGetAgent: rampingConnections('wsGetAgent', PROFILE, SESSION_SECONDS, SCALE, CONNECTIONS_SCALE)
  },
  thresholds: wsSuiteThresholds(PROFILE, WS_GET_AGENT.operation, SCALE)
}

/**
 * Refuses to start when TOKEN expires before the run ends: each session's new connection
 * would be refused 401 from then on, and open ones closed with 4401.
 */
export function setup (): void { refuseShortToken(TOKEN, runSeconds(PROFILE.wsStages, SCALE, SESSION_SECONDS + 5)) }

const url = BASE_URL.replace(/^http/, 'ws') + WS_GET_AGENT.path + (TOKEN === '' ? '' : '?access_token=' + encodeURIComponent(TOKEN))

function answerOk (data: unknown, id: string): boolean {
  if (typeof data !== 'string') return false
  try {
    const answer = JSON.parse(data) as { id?: unknown, result?: Record<string, unknown> }
    return answer.id === id && valueAt(answer.result, WS_GET_AGENT.check.path) === WS_GET_AGENT.check.equals
  } catch {
    return false
  }
}

export function wsGetAgent (): void {
  const ws = new WebSocket(url)
  let n = 0
  let id = ''
  let sentAt = 0
  let waiting = false
  let ending = false

  const send = (): void => {
    id = String(n++)
    waiting = true
    sentAt = Date.now()
    ws.send(JSON.stringify({ id, ...WS_GET_AGENT.frame }))
  }

  ws.onopen = () => {
    send()
    setTimeout(() => { ending = true }, SESSION_SECONDS * 1000)
  }
  ws.onmessage = (event) => {
    const at = Date.now()
    if (!waiting) return
    waiting = false
    const ok = answerOk(event?.data, id)
    callDuration.add(at - sentAt, tags)
    callFailed.add(!ok, tags)
    callsDone.add(1, tags)
    if (ending) ws.close()
    else send()
  }
  ws.onerror = () => {
    // A refused upgrade (401, 503) or a dropped connection: the call in flight failed.
    callFailed.add(true, tags)
    waiting = false
  }
  ws.onclose = () => {
    if (waiting) callFailed.add(true, tags)
    waiting = false
  }
}

export default function (): void {
  wsGetAgent()
}
