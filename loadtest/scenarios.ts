// The scenarios, as plain data: the one definition of each request, its expected status and
// its thresholds. The Node harness (bench.ts) reads them from here. The k6 scripts read theirs
// from k6/common.ts, which loads under k6 (no Node APIs); test/loadtest/suite.part.ts
// fails when the two differ.
import type { Scenario } from './harness.js'

export interface Thresholds {
  /** 99th percentile latency, in ms, a run must stay under. */
  p99Ms: number
  /** Share of failed requests (non-expected status or transport error) allowed, 0..1. */
  errorRate: number
}

export interface ScenarioDefinition extends Scenario {
  /** The manifest operation the request reaches. */
  operation: string
  expectedStatus: number
  thresholds: Thresholds
}

/** REST getAgent: a seeded agent (a1..a3 exist for every tenant). Any authenticated caller. */
export const getAgent: ScenarioDefinition = {
  name: 'rest-getAgent',
  operation: 'getAgent',
  method: 'GET',
  path: '/api/v1/agents/a1',
  expectedStatus: 200,
  thresholds: { p99Ms: 10, errorRate: 0.001 }
}

/** REST listAgents: the seeded catalogue (3 agents). Any authenticated caller. */
export const listAgents: ScenarioDefinition = {
  name: 'rest-listAgents',
  operation: 'listAgents',
  method: 'GET',
  path: '/api/v1/agents?limit=20',
  expectedStatus: 200,
  thresholds: { p99Ms: 10, errorRate: 0.001 }
}

/**
 * REST runAgent: starts a run (role operator). Not in the default benchmark: every call adds a
 * run and two status timers to the Kernel, so its cost grows with the request rate.
 */
export const runAgent: ScenarioDefinition = {
  name: 'rest-runAgent',
  operation: 'runAgent',
  method: 'POST',
  path: '/api/v1/agents/a1/runs',
  body: { prompt: 'Summarise the latest incident report in three sentences.' },
  expectedStatus: 201,
  thresholds: { p99Ms: 15, errorRate: 0.001 }
}

export const SCENARIOS: readonly ScenarioDefinition[] = [getAgent, listAgents, runAgent]

// --- the other faces (CONTRACT §3): the same operation, getAgent(id a1), over every face ---

/** What a correct answer carries: the JSON value at `path` equals `equals`. */
export interface AnswerCheck {
  path: readonly string[]
  equals: string
}

export interface FaceScenarioDefinition extends ScenarioDefinition {
  face: 'rest' | 'trpc' | 'graphql'
  /** A 200 is not enough (GraphQL answers errors with 200): the answer must carry this. */
  check: AnswerCheck
}

/** The getAgent input every face sends. */
export const GET_AGENT_INPUT = { id: 'a1' } as const

/** REST getAgent as a face scenario: the baseline of the faces section. */
export const restGetAgent: FaceScenarioDefinition = {
  ...getAgent,
  face: 'rest',
  check: { path: ['id'], equals: 'a1' }
}

/** tRPC getAgent: standard tRPC HTTP, a query over GET with ?input=, no data transformer. */
export const trpcGetAgent: FaceScenarioDefinition = {
  name: 'trpc-getAgent',
  operation: 'getAgent',
  face: 'trpc',
  method: 'GET',
  path: '/trpc/getAgent?input=' + encodeURIComponent(JSON.stringify(GET_AGENT_INPUT)),
  expectedStatus: 200,
  check: { path: ['result', 'data', 'id'], equals: 'a1' },
  thresholds: { p99Ms: 10, errorRate: 0.001 }
}

/**
 * The argument type of getAgent's `id` in the generated SDL. The input schema says
 * `{ type: string, pattern }`: the GraphQL face maps it to `String!` (required string). The
 * harness reads the type from the schema by introspection and uses that if it differs.
 */
export const GRAPHQL_ID_TYPE = 'String!'

/** GraphQL getAgent: GraphQL over HTTP, POST /graphql, the id as a variable. */
export const graphqlGetAgent: FaceScenarioDefinition = {
  name: 'graphql-getAgent',
  operation: 'getAgent',
  face: 'graphql',
  method: 'POST',
  path: '/graphql',
  body: { query: `query($id:${GRAPHQL_ID_TYPE}){ getAgent(id:$id){ id name model } }`, variables: GET_AGENT_INPUT },
  expectedStatus: 200,
  check: { path: ['data', 'getAgent', 'id'], equals: 'a1' },
  thresholds: { p99Ms: 10, errorRate: 0.001 }
}

/** A call over one WebSocket connection: a frame out, an answer frame with the same id back. */
export interface WsCallScenarioDefinition {
  name: string
  operation: string
  face: 'websocket'
  /**
   * The upgrade path. The faces section's runner sends the token in ?access_token= (as a browser
   * must); the suites send it in the Authorization header (k6 tags every sample with the URL).
   */
  path: string
  /** The call frame without its id: `{"id":"<n>", ...frame}` is sent. */
  frame: { op: string, input: Record<string, unknown> }
  /** In the answer `{"id":"<n>","result":{...}}`, the value at result + path. */
  check: AnswerCheck
  /**
   * A call unanswered this long (ms) has failed: the suites record it in the failure rate with
   * this as its duration, close the connection and open another (one call in flight per
   * connection: without a deadline, a stalled call would block its connection for the rest of
   * the run and never be counted). 20x the loosest suite p99 (spike, 100 ms).
   */
  callTimeoutMs: number
  thresholds: Thresholds
}

/** WebSocket getAgent: `{"id":"<n>","op":"getAgent","input":{"id":"a1"}}` on /ws. */
export const wsGetAgent: WsCallScenarioDefinition = {
  name: 'ws-getAgent',
  operation: 'getAgent',
  face: 'websocket',
  path: '/ws',
  frame: { op: 'getAgent', input: GET_AGENT_INPUT },
  check: { path: ['id'], equals: 'a1' },
  callTimeoutMs: 2000,
  thresholds: { p99Ms: 10, errorRate: 0.001 }
}

/** The faces section of `npm run bench`: one row each, REST first (the baseline). */
export const FACE_SCENARIOS: readonly [FaceScenarioDefinition, FaceScenarioDefinition, FaceScenarioDefinition, WsCallScenarioDefinition] =
  [restGetAgent, trpcGetAgent, graphqlGetAgent, wsGetAgent]

/** The faces goals: a face's req/s (calls/s for WebSocket) over REST's, measured side by side. */
export const FACE_GOALS = { trpc: 0.85, graphql: 0.70, websocket: 1.0 } as const

/** The WebSocket scale run: every connection holds this one subscription (role viewer). */
export const wsSubscribeRunUpdated = {
  name: 'ws-subscribe-runUpdated',
  event: 'runUpdated',
  topic: 'runs.updated',
  path: '/ws',
  frame: { id: 's', subscribe: 'runUpdated' },
  /** The answer that confirms the subscription. */
  subscribed: { id: 's', subscribed: 'runUpdated' }
} as const

// --- the load suites: smoke, load, stress, spike, soak (k6/<name>.ts; npm run bench -- --scenario <name>) ---

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

export interface LoadProfile {
  name: 'smoke' | 'load' | 'stress' | 'spike' | 'soak'
  /** HTTP faces: arrival rate, requests per second per face, at the start of the first stage. */
  startRate: number
  /** HTTP faces: `target` is the arrival rate (requests/s per face) an open model keeps up. */
  stages: readonly Stage[]
  /** WebSocket: `target` is the number of connections, each with one call in flight. */
  wsStages: readonly Stage[]
  thresholds: SuiteThresholds
}

/** Smoke: a trickle on every face. Proves the target answers correctly before load is worth it. */
export const smoke: LoadProfile = {
  name: 'smoke',
  startRate: 2,
  stages: [{ durationS: 30, target: 2 }],
  // k6's ramping-vus starts from 0 connections: the first second ramps to 1.
  wsStages: [{ durationS: 1, target: 1 }, { durationS: 29, target: 1 }],
  thresholds: { p99Ms: 10, errorRate: 0.001, abortOnFail: false, delayAbortEvalS: 0 }
}

/** Load: a sustained arrival rate after a short ramp, held long enough to see steady state. */
export const load: LoadProfile = {
  name: 'load',
  startRate: 10,
  stages: [{ durationS: 30, target: 100 }, { durationS: 270, target: 100 }],
  wsStages: [{ durationS: 30, target: 50 }, { durationS: 270, target: 50 }],
  thresholds: { p99Ms: 10, errorRate: 0.001, abortOnFail: false, delayAbortEvalS: 0 }
}

/**
 * Stress: the rate climbs in steps past the load rate until the gateway breaks. It must hold up
 * to the last stage (30x the load rate); the run stops at the first crossing, and the level at
 * which it stopped is the breaking point.
 */
export const stress: LoadProfile = {
  name: 'stress',
  startRate: 100,
  stages: [
    { durationS: 60, target: 300 },
    { durationS: 60, target: 1000 },
    { durationS: 60, target: 2000 },
    { durationS: 60, target: 3000 }
  ],
  wsStages: [
    { durationS: 60, target: 100 },
    { durationS: 60, target: 500 },
    { durationS: 60, target: 1000 },
    { durationS: 60, target: 2000 }
  ],
  thresholds: { p99Ms: 50, errorRate: 0.01, abortOnFail: true, delayAbortEvalS: 10 }
}

/**
 * Spike: a quiet baseline, a sudden jump to 20x, then the baseline again for a minute: the
 * gateway may shed some of the spike (503 OVERLOADED), but must recover without a pile-up.
 */
export const spike: LoadProfile = {
  name: 'spike',
  startRate: 50,
  stages: [
    { durationS: 30, target: 50 },
    { durationS: 5, target: 1000 },
    { durationS: 30, target: 1000 },
    { durationS: 5, target: 50 },
    { durationS: 60, target: 50 }
  ],
  wsStages: [
    { durationS: 30, target: 10 },
    { durationS: 5, target: 500 },
    { durationS: 30, target: 500 },
    { durationS: 5, target: 10 },
    { durationS: 60, target: 10 }
  ],
  thresholds: { p99Ms: 100, errorRate: 0.01, abortOnFail: false, delayAbortEvalS: 0 }
}

/** Soak: a moderate rate for an hour: leaks, growing queues and slow drift show up here. */
export const soak: LoadProfile = {
  name: 'soak',
  startRate: 10,
  stages: [{ durationS: 60, target: 50 }, { durationS: 3540, target: 50 }],
  wsStages: [{ durationS: 60, target: 50 }, { durationS: 3540, target: 50 }],
  thresholds: { p99Ms: 10, errorRate: 0.001, abortOnFail: true, delayAbortEvalS: 120 }
}

export const PROFILES: readonly LoadProfile[] = [smoke, load, stress, spike, soak]

/** The requests every suite sends: getAgent over each HTTP face, and over WebSocket. */
export const SUITE_HTTP_SCENARIOS: readonly FaceScenarioDefinition[] = [restGetAgent, trpcGetAgent, graphqlGetAgent]
