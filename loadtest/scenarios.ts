// The scenarios, as plain data: the one definition of each request, its expected status and
// its thresholds. The Node harness (bench.ts) reads them from here; the k6 scripts in ./k6 must
// stay self-contained at run time, so they repeat these numbers: change both together.
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
