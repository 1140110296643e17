// k6 load test of the WebSocket face: getAgent(id a1) as calls on /ws (CONTRACT §3), the same
// shape as the harness's ws-runner.ts. Each virtual user holds one connection with exactly one
// call in flight: {"id":"<n>","op":"getAgent","input":{"id":"a1"}}, and on the answer frame
// {"id":"<n>","result":{...}} the next. A connection lives SESSION seconds, then the VU opens
// a new one (so connection set-up is exercised too, and measured by k6 as ws_connecting).
//
//   k6 run -e BASE_URL=http://127.0.0.1:3000 -e TOKEN="$(npm run -s token)" \
//          -e CONNECTIONS=50 -e DURATION=1m -e SESSION=10 loadtest/k6/websocket.ts
//
// The token goes in ?access_token= (browsers cannot set headers on an upgrade). Uses k6's
// `k6/websockets` module (the browser-like WebSocket API; k6 v0.57+).
//
// The scenario (frame, answer check, thresholds) comes from ./common.ts.
import { WebSocket } from 'k6/websockets'
import { setTimeout } from 'k6/timers'
import { Counter, Rate, Trend } from 'k6/metrics'
import type { Options } from 'k6/options'
import { positiveInt, valueAt, WS_GET_AGENT } from './common.ts'

const BASE_URL = (__ENV.BASE_URL ?? 'http://127.0.0.1:3000').replace(/\/+$/, '')
const TOKEN = __ENV.TOKEN ?? ''
const CONNECTIONS = positiveInt(__ENV.CONNECTIONS, 50)
const DURATION = __ENV.DURATION ?? '1m'
const SESSION_SECONDS = positiveInt(__ENV.SESSION, 10)

/** Send -> answer of one call, in ms (k6 clocks have millisecond resolution). */
const callDuration = new Trend('ws_call_duration', true)
/** A call whose answer was not the expected result (an error frame, another id, no answer). */
const callFailed = new Rate('ws_call_failed')
const callsDone = new Counter('ws_calls')

const tags = { op: WS_GET_AGENT.operation, face: WS_GET_AGENT.face, name: WS_GET_AGENT.name }

export const options: Options = {
  scenarios: {
    wsGetAgent: {
      // A closed model, as in the harness: CONNECTIONS connections, one call in flight each.
      executor: 'constant-vus',
      exec: 'wsGetAgent',
      vus: CONNECTIONS,
      duration: DURATION,
      // A VU ends its session at most SESSION seconds after it began.
      gracefulStop: `${SESSION_SECONDS + 5}s`
    }
  },
  thresholds: {
    [`ws_call_duration{op:${WS_GET_AGENT.operation}}`]: [`p(99)<${WS_GET_AGENT.thresholds.p99Ms}`],
    [`ws_call_failed{op:${WS_GET_AGENT.operation}}`]: [`rate<${WS_GET_AGENT.thresholds.errorRate}`],
    // At least one call answered: a gateway that refuses every upgrade must not pass.
    ws_calls: ['count>0']
  }
}

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
