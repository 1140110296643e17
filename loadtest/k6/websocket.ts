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
// SCALE multiplies the stages' durations (and delayAbortEval), CONNECTIONS_SCALE their connection counts (default 1);
// a set value that is not a positive number (SESSION: a whole number) stops the run.
// A call unanswered after WS_GET_AGENT.callTimeoutMs (2 s) fails, timed as that long: the
// connection is closed and the VU opens another (as the harness's suite.ts does).
// The token goes in the upgrade's Authorization header (CONTRACT §2 accepts it there), not in
// ?access_token=: k6 tags every sample of a connection with its URL (`url`, `name`), and the
// token would be written to every output. Uses k6's `k6/websockets` module (the browser-like
// WebSocket API), which k6 has under that name since v1.6.0 (before: k6/experimental/websockets).
//
// The scenario (frame, answer check) and the profile (wsStages, thresholds) come from ./common.ts.
import { WebSocket, type Params } from 'k6/websockets'
import { clearTimeout, setTimeout, type TimeoutID } from 'k6/timers'
import { Counter, Rate, Trend } from 'k6/metrics'
import type { Options } from 'k6/options'
import { positiveInt, positiveNumber, profileNamed, rampingConnections, runSeconds, valueAt, WS_GET_AGENT, wsSuiteThresholds, type LoadProfile } from './common.ts'
import { refuseShortToken } from './token.ts'

const BASE_URL = (__ENV.BASE_URL ?? 'http://127.0.0.1:3000').replace(/\/+$/, '')
const TOKEN = __ENV.TOKEN ?? ''
const SESSION_SECONDS = positiveInt(__ENV.SESSION, 10, 'SESSION')
const SCALE = positiveNumber(__ENV.SCALE, 1, 'SCALE')
const CONNECTIONS_SCALE = positiveNumber(__ENV.CONNECTIONS_SCALE, 1, 'CONNECTIONS_SCALE')
const PROFILE: LoadProfile = profileNamed(__ENV.PROFILE, 'load')

/** Send -> answer of one call, in ms (k6 clocks have millisecond resolution). */
const callDuration = new Trend('ws_call_duration', true)
/** A call whose answer was not the expected result (an error frame, another id, no answer by its deadline or before a close). */
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

const url = BASE_URL.replace(/^http/, 'ws') + WS_GET_AGENT.path
// The `name` tag of k6's own ws_* samples (it defaults to the URL).
const params: Params = { headers: TOKEN === '' ? {} : { authorization: `Bearer ${TOKEN}` }, tags: { name: WS_GET_AGENT.name } }

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
  const ws = new WebSocket(url, null, params)
  let n = 0
  let id = ''
  let sentAt = 0
  let waiting = false
  let ending = false
  /** A refused upgrade, a dropped connection or a call past its deadline. */
  let failed = false
  let deadline: TimeoutID | null = null
  let session: TimeoutID | null = null

  const timedOut = (): void => {
    deadline = null
    if (!waiting) return
    waiting = false
    failed = true
    callDuration.add(Date.now() - sentAt, tags)
    callFailed.add(true, tags)
    ws.close()
  }
  const send = (): void => {
    id = String(n++)
    waiting = true
    sentAt = Date.now()
    ws.send(JSON.stringify({ id, ...WS_GET_AGENT.frame }))
    deadline = setTimeout(timedOut, WS_GET_AGENT.callTimeoutMs)
  }

  ws.onopen = () => {
    send()
    session = setTimeout(() => { session = null; ending = true }, SESSION_SECONDS * 1000)
  }
  ws.onmessage = (event) => {
    const at = Date.now()
    if (!waiting) return
    waiting = false
    if (deadline !== null) clearTimeout(deadline)
    deadline = null
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
    failed = true
  }
  ws.onclose = () => {
    if (waiting) {
      callFailed.add(true, tags)
      failed = true
    }
    waiting = false
    // The iteration ends when no timer is left: the next one opens a new connection.
    if (deadline !== null) clearTimeout(deadline)
    if (session !== null) clearTimeout(session)
    deadline = session = null
    // After a failure, a pause before the next connection (as the harness's 100 ms): a refused
    // upgrade would otherwise be retried in a tight loop.
    if (failed) setTimeout(() => {}, 100)
  }
}

export default function (): void {
  wsGetAgent()
}
