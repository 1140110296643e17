// How the bench counts failed calls (loadtest/bench-faces.ts, measure.ts) and flags a ws-scale run
// (bench-ws-scale.ts): a failed call counts once, and a run whose calls or connections failed is
// flagged, so that no stated target or goal reads it as a result.
import t from 'tap'
import { fromHttp, fromWs } from '../../loadtest/bench-faces.js'
import { mismatchCounter, type RunFigures } from '../../loadtest/measure.js'
import { scaleProblems, type WsScaleReport } from '../../loadtest/bench-ws-scale.js'
import type { WsRunnerReport } from '../../loadtest/ws-runner.js'

const http = (over: Partial<RunFigures>): RunFigures => ({
  reqPerSec: 1000, p50Ms: 1, p99Ms: 2, p50FineMs: 1, p99FineMs: 2, requests: 1000, non2xx: 0, errors: 0, timeouts: 0, mismatches: 0, generatorCpuPct: 50, rssKiB: null, cpuUsPerRequest: null, watchedCpuUsPerRequest: null, ...over
})

const ws = (over: Partial<WsRunnerReport>): WsRunnerReport => ({
  connections: 10, opened: 10, openFailures: {}, durationSeconds: 5, calls: 1000, callsPerSec: 200, lateCalls: 0, errors: 0, mismatches: 0, unanswered: 0, closedEarly: 0, generatorCpuPct: 50, p50Ms: 1, p90Ms: 1, p99Ms: 2, meanMs: 1, maxMs: 3, probe: '', firstError: null, failure: null, ...over
})

t.test('autocannon\'s mismatches: only 2xx answers with another body; a non-2xx (in non2xx) is not counted again', async (t) => {
  const m = mismatchCounter()
  // autocannon emits 'response' and then, when the body is not the expected one, 'reqMismatch'.
  m.response(200)
  m.response(200); m.mismatch()
  m.response(503); m.mismatch()
  m.response(401); m.mismatch()
  m.response(204); m.mismatch()
  t.equal(m.count, 2, 'the two 2xx answers with another body')
  t.equal(fromHttp(http({ non2xx: 2, mismatches: m.count })).failures, 4, 'four failed answers of five')
})

t.test('a WebSocket round: a connection that closed with its call waiting is one failure, not two', async (t) => {
  t.equal(fromWs(ws({}), null).failures, 0)
  t.equal(fromWs(ws({ closedEarly: 1, unanswered: 1 }), null).failures, 1, 'its unanswered call')
  t.equal(fromWs(ws({ unanswered: 2 }), null).failures, 2, 'calls still waiting at the end')
  t.equal(fromWs(ws({ errors: 1, mismatches: 2, closedEarly: 1, unanswered: 1 }), null).failures, 4)
  t.equal(fromWs(ws({ opened: 8 }), null).failures, 2, 'connections not opened')
  t.equal(fromWs(ws({ opened: 0, calls: 0, failure: 'no connection could be opened: {}' }), null).failures, 10, 'no connection: its connections, not one more')
  t.equal(fromWs(ws({ calls: 0, failure: 'the probe call was answered with ...' }), null).failures, 1, 'a probe answered wrong')
})

t.test('a ws-scale run is flagged when connections failed or closed early, or delivery was not exactly once', async (t) => {
  const delivery = (over: Partial<WsScaleReport['delivery']>): WsScaleReport['delivery'] => ({ exactlyOnce: true, none: 0, more: 0, unexpectedFrames: 0, firstUnexpected: null, closedEarly: 0, ...over })
  t.strictSame(scaleProblems({ failed: 0, delivery: delivery({}) }), [], 'a clean run is a result')
  t.strictSame(scaleProblems({ failed: 3, delivery: delivery({}) }), ['3 connections not opened'])
  t.strictSame(scaleProblems({ failed: 0, delivery: delivery({ closedEarly: 2, exactlyOnce: false, none: 2 }) }), ['2 connections closed early', 'delivery not exactly once'])
  t.strictSame(scaleProblems({ failed: 0, delivery: delivery({ exactlyOnce: false, more: 1 }) }), ['delivery not exactly once'])
})
