// What the k6 scripts share: the scenarios they run, as plain data, and the helpers that turn
// them into k6 options. No imports from 'k6' and no Node APIs: k6 loads this file at run time
// (`import { ... } from './common.ts'`) and Node loads it in the tests.
//
// The scenario numbers (method, path, body or frame, expected status, answer check,
// thresholds) are held equal to loadtest/scenarios.ts by test/loadtest/k6-scenarios.test.ts.

export interface Thresholds {
  /** 99th percentile latency, in ms, a run must stay under. */
  p99Ms: number
  /** Share of failed requests (non-expected status or transport error) allowed, 0..1. */
  errorRate: number
}

/** What a correct answer carries: the JSON value at `path` equals `equals`. */
export interface AnswerCheck {
  path: readonly string[]
  equals: string
}

export interface HttpScenario {
  name: string
  /** The manifest operation the request reaches (the `op` tag). */
  operation: string
  method: 'GET' | 'POST'
  path: string
  body?: unknown
  expectedStatus: number
  thresholds: Thresholds
}

export interface FaceScenario extends HttpScenario {
  face: 'rest' | 'trpc' | 'graphql'
  /** The answer must carry `equals` at `path` (GraphQL answers its errors with a 200). */
  check: AnswerCheck
}

export interface WsCallScenario {
  name: string
  operation: string
  face: 'websocket'
  /** The upgrade path; the token goes in ?access_token=. */
  path: string
  /** The call frame without its id: `{"id":"<n>", ...frame}` is sent. */
  frame: { op: string, input: Record<string, unknown> }
  /** In the answer `{"id":"<n>","result":{...}}`, the value at result + path. */
  check: AnswerCheck
  thresholds: Thresholds
}

/** REST getAgent: a seeded agent (a1..a3 exist for every tenant). */
export const GET_AGENT: HttpScenario = { name: 'rest-getAgent', operation: 'getAgent', method: 'GET', path: '/api/v1/agents/a1', expectedStatus: 200, thresholds: { p99Ms: 10, errorRate: 0.001 } }

/** REST listAgents: the seeded catalogue. */
export const LIST_AGENTS: HttpScenario = { name: 'rest-listAgents', operation: 'listAgents', method: 'GET', path: '/api/v1/agents?limit=20', expectedStatus: 200, thresholds: { p99Ms: 10, errorRate: 0.001 } }

/** REST getAgent as a face scenario: the baseline of faces.ts. */
export const REST_GET_AGENT: FaceScenario = { ...GET_AGENT, face: 'rest', check: { path: ['id'], equals: 'a1' } }

/** tRPC getAgent: a query over GET with ?input=, no data transformer. */
export const TRPC_GET_AGENT: FaceScenario = { name: 'trpc-getAgent', operation: 'getAgent', face: 'trpc', method: 'GET', path: '/trpc/getAgent?input=' + encodeURIComponent(JSON.stringify({ id: 'a1' })), expectedStatus: 200, check: { path: ['result', 'data', 'id'], equals: 'a1' }, thresholds: { p99Ms: 10, errorRate: 0.001 } }

/** GraphQL getAgent: POST /graphql, the id as a variable (String!, the type of the generated SDL). */
export const GRAPHQL_GET_AGENT: FaceScenario = { name: 'graphql-getAgent', operation: 'getAgent', face: 'graphql', method: 'POST', path: '/graphql', body: { query: 'query($id:String!){ getAgent(id:$id){ id name model } }', variables: { id: 'a1' } }, expectedStatus: 200, check: { path: ['data', 'getAgent', 'id'], equals: 'a1' }, thresholds: { p99Ms: 10, errorRate: 0.001 } }

/** WebSocket getAgent: `{"id":"<n>","op":"getAgent","input":{"id":"a1"}}` on /ws. */
export const WS_GET_AGENT: WsCallScenario = { name: 'ws-getAgent', operation: 'getAgent', face: 'websocket', path: '/ws', frame: { op: 'getAgent', input: { id: 'a1' } }, check: { path: ['id'], equals: 'a1' }, thresholds: { p99Ms: 10, errorRate: 0.001 } }

/** A positive integer from an environment variable, or `fallback`. */
export function positiveInt (raw: string | undefined, fallback: number): number {
  const n = Number(raw)
  return raw !== undefined && Number.isInteger(n) && n > 0 ? n : fallback
}

/**
 * A constant-arrival-rate scenario running `exec` `rate` times a second for `duration` (open
 * model: new requests keep arriving at the set rate however slow the gateway gets, so a slowdown
 * shows up as latency and dropped iterations instead of being hidden by clients that wait).
 * VUs only carry the requests in flight: at a few ms per request, rate/10 of them suffice;
 * maxVUs leaves room for a slowdown before k6 starts dropping iterations (dropped_iterations).
 */
export function arrival (exec: string, rate: number, duration: string) {
  return {
    executor: 'constant-arrival-rate' as const,
    exec,
    rate,
    timeUnit: '1s',
    duration,
    preAllocatedVUs: Math.max(5, Math.ceil(rate / 10)),
    maxVUs: Math.max(50, rate)
  }
}

/**
 * The HTTP thresholds of smoke.ts and load.ts: overall, and the same limits per operation (tag
 * `op`), so a slow one is not hidden by a fast one in the totals.
 */
export function thresholdsByOp (scenarios: readonly HttpScenario[]): Record<string, string[]> {
  const thresholds: Record<string, string[]> = {
    http_req_failed: ['rate<0.001'],
    http_req_duration: ['p(99)<10']
  }
  for (const s of scenarios) {
    thresholds[`http_req_failed{op:${s.operation}}`] = [`rate<${s.thresholds.errorRate}`]
    thresholds[`http_req_duration{op:${s.operation}}`] = [`p(99)<${s.thresholds.p99Ms}`]
  }
  return thresholds
}

/**
 * The thresholds of faces.ts, per face (tag `face`): a slow or failing face is not hidden by a
 * fast one in the totals. `checks` holds the answer checks, which also catch a GraphQL error
 * answered with 200.
 */
export function thresholdsByFace (scenarios: readonly FaceScenario[]): Record<string, string[]> {
  const thresholds: Record<string, string[]> = {}
  for (const s of scenarios) {
    thresholds[`http_req_failed{face:${s.face}}`] = [`rate<${s.thresholds.errorRate}`]
    thresholds[`http_req_duration{face:${s.face}}`] = [`p(99)<${s.thresholds.p99Ms}`]
    thresholds[`checks{face:${s.face}}`] = [`rate>${1 - s.thresholds.errorRate}`]
  }
  return thresholds
}

/** The value at `path` inside a parsed JSON answer, or undefined. */
export function valueAt (value: unknown, path: readonly string[]): unknown {
  let v = value
  for (const key of path) v = typeof v === 'object' && v !== null ? (v as Record<string, unknown>)[key] : undefined
  return v
}
