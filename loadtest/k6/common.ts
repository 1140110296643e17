// What the k6 scripts share: the scenarios they run, as plain data, and the helpers that turn
// them into k6 options. No imports from 'k6' and no Node APIs: k6 loads this file at run time
// (`import { ... } from './common.ts'`) and Node loads it in the tests.
//
// The scenario numbers (method, path, body or frame, expected status, answer check,
// thresholds) are held equal to loadtest/scenarios.ts by test/loadtest/suite.part.ts.

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
  /** The upgrade path; websocket.ts sends the token in the Authorization header (not in the URL, which k6 puts in its tags). */
  path: string
  /** The call frame without its id: `{"id":"<n>", ...frame}` is sent. */
  frame: { op: string, input: Record<string, unknown> }
  /** In the answer `{"id":"<n>","result":{...}}`, the value at result + path. */
  check: AnswerCheck
  /** A call unanswered this long (ms) has failed, with this as its duration; the connection is closed and another opened. */
  callTimeoutMs: number
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
export const WS_GET_AGENT: WsCallScenario = { name: 'ws-getAgent', operation: 'getAgent', face: 'websocket', path: '/ws', frame: { op: 'getAgent', input: { id: 'a1' } }, check: { path: ['id'], equals: 'a1' }, callTimeoutMs: 2000, thresholds: { p99Ms: 10, errorRate: 0.001 } }

/** One stage: over `durationS` seconds the level moves linearly to `target` (k6's stages). */
export interface Stage {
  durationS: number
  target: number
}

/** The thresholds of a suite, applied to every face on its own (tag `face`). */
export interface SuiteThresholds extends Thresholds {
  /** Stop the run as soon as a threshold is crossed (k6 `abortOnFail`). */
  abortOnFail: boolean
  /** With abortOnFail: seconds into the run before a crossing may stop it (k6 `delayAbortEval`). */
  delayAbortEvalS: number
}

/** A suite: the arrival-rate stages of the HTTP faces, the connection stages of WebSocket, the thresholds. */
export interface LoadProfile {
  name: 'smoke' | 'load' | 'stress' | 'spike' | 'soak'
  startRate: number
  stages: readonly Stage[]
  wsStages: readonly Stage[]
  thresholds: SuiteThresholds
}

/** Smoke: a trickle on every face. */
export const SMOKE: LoadProfile = { name: 'smoke', startRate: 2, stages: [{ durationS: 30, target: 2 }], wsStages: [{ durationS: 1, target: 1 }, { durationS: 29, target: 1 }], thresholds: { p99Ms: 10, errorRate: 0.001, abortOnFail: false, delayAbortEvalS: 0 } }

/** Load: a sustained arrival rate after a short ramp. */
export const LOAD: LoadProfile = { name: 'load', startRate: 10, stages: [{ durationS: 30, target: 100 }, { durationS: 270, target: 100 }], wsStages: [{ durationS: 30, target: 50 }, { durationS: 270, target: 50 }], thresholds: { p99Ms: 10, errorRate: 0.001, abortOnFail: false, delayAbortEvalS: 0 } }

/** Stress: steps up to 30x the load rate; stops at the first crossing (the breaking point). */
export const STRESS: LoadProfile = {
  name: 'stress',
  startRate: 100,
  stages: [{ durationS: 60, target: 300 }, { durationS: 60, target: 1000 }, { durationS: 60, target: 2000 }, { durationS: 60, target: 3000 }],
  wsStages: [{ durationS: 60, target: 100 }, { durationS: 60, target: 500 }, { durationS: 60, target: 1000 }, { durationS: 60, target: 2000 }],
  thresholds: { p99Ms: 50, errorRate: 0.01, abortOnFail: true, delayAbortEvalS: 10 }
}

/** Spike: a quiet baseline, a jump to 20x, then the baseline again: recovery is the point. */
export const SPIKE: LoadProfile = {
  name: 'spike',
  startRate: 50,
  stages: [{ durationS: 30, target: 50 }, { durationS: 5, target: 1000 }, { durationS: 30, target: 1000 }, { durationS: 5, target: 50 }, { durationS: 60, target: 50 }],
  wsStages: [{ durationS: 30, target: 10 }, { durationS: 5, target: 500 }, { durationS: 30, target: 500 }, { durationS: 5, target: 10 }, { durationS: 60, target: 10 }],
  thresholds: { p99Ms: 100, errorRate: 0.01, abortOnFail: false, delayAbortEvalS: 0 }
}

/** Soak: a moderate rate for an hour. */
export const SOAK: LoadProfile = { name: 'soak', startRate: 10, stages: [{ durationS: 60, target: 50 }, { durationS: 3540, target: 50 }], wsStages: [{ durationS: 60, target: 50 }, { durationS: 3540, target: 50 }], thresholds: { p99Ms: 10, errorRate: 0.001, abortOnFail: true, delayAbortEvalS: 120 } }

export const PROFILES: Readonly<Record<LoadProfile['name'], LoadProfile>> = { smoke: SMOKE, load: LOAD, stress: STRESS, spike: SPIKE, soak: SOAK }

/**
 * A positive number from the environment variable `name` (its value `raw`), or `fallback` when
 * it is not set (or set empty). Any other value that is not a positive number stops the run:
 * SCALE=0,1 falling back to 1 would run the whole suite unscaled without a word.
 */
export function positiveNumber (raw: string | undefined, fallback: number, name = 'value'): number {
  if (raw === undefined || raw === '') return fallback
  const n = Number(raw)
  if (!Number.isFinite(n) || n <= 0) throw new Error(`${name}=${raw}: a positive number (e.g. 0.1), or unset for ${fallback}`)
  return n
}

/** A stage list with durations times `timeScale` (at least 1 s each) and levels times `levelScale`. */
export function scaleStages (stages: readonly Stage[], timeScale: number, levelScale: number): Stage[] {
  return stages.map((s) => ({ durationS: Math.max(1, Math.round(s.durationS * timeScale)), target: Math.round(s.target * levelScale) }))
}

/**
 * The k6 scenario of one HTTP face under a suite: ramping-arrival-rate (an open model: requests
 * keep arriving at the stage's rate however slow the gateway gets, so a slowdown shows up as
 * latency and dropped_iterations, not as a politely lower rate). `SCALE` multiplies durations,
 * `RATE_SCALE` the rates.
 */
export function rampingArrival (exec: string, profile: LoadProfile, timeScale = 1, rateScale = 1) {
  const stages = scaleStages(profile.stages, timeScale, rateScale)
  const peak = Math.max(1, Math.round(profile.startRate * rateScale), ...stages.map((s) => s.target))
  return {
    executor: 'ramping-arrival-rate' as const,
    exec,
    startRate: Math.max(1, Math.round(profile.startRate * rateScale)),
    timeUnit: '1s',
    preAllocatedVUs: Math.max(5, Math.ceil(peak / 10)),
    maxVUs: Math.max(50, peak),
    stages: stages.map((s) => ({ duration: `${s.durationS}s`, target: s.target }))
  }
}

/** The k6 scenario of the WebSocket face under a suite: ramping-vus, one connection per VU. */
export function rampingConnections (exec: string, profile: LoadProfile, sessionSeconds: number, timeScale = 1, levelScale = 1) {
  return {
    executor: 'ramping-vus' as const,
    exec,
    startVUs: 0,
    stages: scaleStages(profile.wsStages, timeScale, levelScale).map((s) => ({ duration: `${s.durationS}s`, target: s.target })),
    // A VU ends its session at most `sessionSeconds` after it began.
    gracefulRampDown: `${sessionSeconds + 5}s`,
    gracefulStop: `${sessionSeconds + 5}s`
  }
}

/** One k6 threshold expression, with abortOnFail when the suite asks for it. */
export type K6Threshold = string | { threshold: string, abortOnFail: boolean, delayAbortEval: string }

// The grace before a crossing may abort the run is scaled with the stages, as the harness
// scales it: unscaled, a stress run at SCALE=0.05 (12 s) had 10 s of it. (A Go duration: "0.5s".)
function threshold (expr: string, t: SuiteThresholds, timeScale: number): K6Threshold {
  return t.abortOnFail ? { threshold: expr, abortOnFail: true, delayAbortEval: `${Number((t.delayAbortEvalS * timeScale).toFixed(3))}s` } : expr
}

/**
 * A suite's thresholds for the HTTP faces, per face (tag `face`): failed requests, p99 and the
 * answer checks (a GraphQL error answered with 200 fails its check).
 */
export function suiteThresholds (profile: LoadProfile, faces: ReadonlyArray<FaceScenario['face']>, timeScale = 1): Record<string, K6Threshold[]> {
  const t = profile.thresholds
  const out: Record<string, K6Threshold[]> = {}
  for (const face of faces) {
    out[`http_req_failed{face:${face}}`] = [threshold(`rate<${t.errorRate}`, t, timeScale)]
    out[`http_req_duration{face:${face}}`] = [threshold(`p(99)<${t.p99Ms}`, t, timeScale)]
    out[`checks{face:${face}}`] = [threshold(`rate>${1 - t.errorRate}`, t, timeScale)]
  }
  return out
}

/** A suite's thresholds for the WebSocket face (the runner's own metrics, tag `op`). */
export function wsSuiteThresholds (profile: LoadProfile, operation: string, timeScale = 1): Record<string, K6Threshold[]> {
  const t = profile.thresholds
  return {
    [`ws_call_duration{op:${operation}}`]: [threshold(`p(99)<${t.p99Ms}`, t, timeScale)],
    [`ws_call_failed{op:${operation}}`]: [threshold(`rate<${t.errorRate}`, t, timeScale)],
    // At least one call answered: a gateway that refuses every upgrade must not pass.
    ws_calls: ['count>0']
  }
}

/** k6's default gracefulStop of a scenario (s): iterations still running may finish in it. */
export const K6_GRACEFUL_STOP_S = 30

/** The longest a run of `stages` (scaled by `timeScale`) lasts, the stop after them included. */
export function runSeconds (stages: readonly Stage[], timeScale: number, stopS: number): number {
  return scaleStages(stages, timeScale, 1).reduce((sum, s) => sum + s.durationS, 0) + stopS
}

/**
 * Why a token whose `exp` is `exp` (s since the epoch; null: no token, or none that says) does
 * not last a run of `runS` seconds from `nowS`, or null when it does. A token that expires
 * mid-run turns the rest of the run into 401s (and WebSocket closes with 4401), which reads as
 * the gateway failing: `npm run token`'s default lasts one hour, and the soak suite as long.
 */
export function tokenShortfall (exp: number | null, nowS: number, runS: number): string | null {
  if (exp === null || exp - nowS >= runS) return null
  const left = Math.max(0, Math.floor(exp - nowS))
  return `TOKEN expires in ${left} s, before this run's ${Math.ceil(runS)} s are over: mint one that lasts, e.g. TOKEN="$(npm run -s token -- --ttl ${Math.ceil(runS / 60) * 60 + 600})"`
}

/** A positive integer from the environment variable `name`, or `fallback` when unset or empty; anything else throws. */
export function positiveInt (raw: string | undefined, fallback: number, name = 'value'): number {
  if (raw === undefined || raw === '') return fallback
  const n = Number(raw)
  if (!Number.isInteger(n) || n <= 0) throw new Error(`${name}=${raw}: a positive whole number, or unset for ${fallback}`)
  return n
}

/** The suite named `raw` (PROFILE), `fallback` when unset; an unknown name throws (an own key only: not `toString`). */
export function profileNamed (raw: string | undefined, fallback: LoadProfile['name']): LoadProfile {
  const name = raw === undefined || raw === '' ? fallback : raw
  if (!Object.prototype.hasOwnProperty.call(PROFILES, name)) throw new Error(`PROFILE=${name}: one of ${Object.keys(PROFILES).join(', ')}`)
  return PROFILES[name as LoadProfile['name']]
}

/** The HTTP faces a suite can load (FACES), in the order their scenarios run. */
export const HTTP_FACES: ReadonlyArray<FaceScenario['face']> = ['rest', 'trpc', 'graphql']

/**
 * The HTTP faces named in `raw` (FACES, comma-separated), every one when unset. A name that is not
 * a face stops the run, as does a list naming none: FACES=rest,grpahql loaded REST alone, and its
 * passed thresholds read as GraphQL's too.
 */
export function facesNamed (raw: string | undefined): Array<FaceScenario['face']> {
  if (raw === undefined) return [...HTTP_FACES]
  const names = raw.split(',').map((f) => f.trim()).filter((f) => f !== '')
  const unknown = names.filter((f) => !(HTTP_FACES as readonly string[]).includes(f))
  if (names.length === 0 || unknown.length > 0) throw new Error(`FACES=${raw}: ${unknown.length > 0 ? `unknown face ${unknown.join(', ')}: ` : ''}name at least one of ${HTTP_FACES.join(', ')}`)
  return HTTP_FACES.filter((f) => names.includes(f))
}

/** The value at `path` inside a parsed JSON answer, or undefined. */
export function valueAt (value: unknown, path: readonly string[]): unknown {
  let v = value
  for (const key of path) v = typeof v === 'object' && v !== null ? (v as Record<string, unknown>)[key] : undefined
  return v
}
