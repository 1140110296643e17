// The stated targets of `npm run bench` (loadtest/targets.ts): a target is met only from rows
// whose calls all succeeded. An error is answered fast and p99 is read from 2xx answers alone,
// so a flagged row that reads "met" would be a bogus figure.
import t from 'tap'
import { statedTargets } from '../../loadtest/targets.js'

type Face = 'rest' | 'trpc' | 'graphql' | 'websocket'

const spineRow = (over: Partial<{ reqPerSec: number, p99FineMs: number, flagged: boolean, peakRssMiB: number | null }> = {}) =>
  ({ reqPerSec: 9000, p99FineMs: 4, flagged: false, peakRssMiB: 150, ...over })
const face = (name: Face, over: Partial<{ reqPerSec: number, p99Ms: number, flagged: boolean, skipped: string | null, peakRssMiB: number | null }> = {}) =>
  ({ face: name, skipped: null, reqPerSec: 12_000, p99Ms: 5, flagged: false, peakRssMiB: 160, ...over })
const allFaces = (over: Partial<Record<Face, Parameters<typeof face>[1]>> = {}) =>
  ({ faces: (['rest', 'trpc', 'graphql', 'websocket'] as const).map((f) => face(f, over[f])) })

const byName = (targets: ReturnType<typeof statedTargets>) => ({
  rest: targets.find((s) => s.text.startsWith('REST >'))!,
  trpc: targets.find((s) => s.text.startsWith('tRPC >'))!,
  p99: targets.find((s) => s.text.startsWith('p99 <'))!,
  rss: targets.find((s) => s.text.startsWith('RSS '))!
})

t.test('clean rows under every bound: every stated target met', async (t) => {
  const s = byName(statedTargets(spineRow(), allFaces()))
  for (const [name, target] of Object.entries(s)) t.match(target, { evaluated: true, met: true }, `${name}: ${target.text}`)
  t.match(s.p99.text, /^p99 < 10 ms on every face: met \(REST \(spine\) 4\.00, REST 5\.00, tRPC 5\.00, GraphQL 5\.00, WebSocket 5\.00\)$/)
})

t.test('a flagged face does not meet p99 on every face, however low its p99 (2xx answers only)', async (t) => {
  const s = byName(statedTargets(spineRow(), allFaces({ graphql: { flagged: true, p99Ms: 0.4 } })))
  t.match(s.p99, { evaluated: true, met: false, text: /^p99 < 10 ms on every face: NOT met: calls failed \(GraphQL flagged\)/ })
  t.match(s.rss, { met: false, text: /NOT met: calls failed \(GraphQL flagged\)/ }, 'RSS read from a run whose calls failed is not a result either')
  t.match(s.rest, { met: true }, 'REST reads the spine row, not GraphQL')
  t.match(s.trpc, { met: true })
})

t.test('a flagged spine row meets neither REST throughput, p99 nor RSS', async (t) => {
  const s = byName(statedTargets(spineRow({ flagged: true, reqPerSec: 50_000, p99FineMs: 0.5 }), allFaces()))
  t.match(s.rest, { met: false, text: /NOT met: calls failed \(REST \(spine\) flagged\)/ })
  t.match(s.p99, { met: false, text: /NOT met: calls failed \(REST \(spine\) flagged\)/ })
  t.match(s.rss, { met: false, text: /NOT met: calls failed/ })
  t.match(s.trpc, { met: true }, 'tRPC reads its own face')
})

t.test('only the faces section ran: REST and p99 read the faces, flagged ones do not meet', async (t) => {
  const s = byName(statedTargets(undefined, allFaces({ rest: { flagged: true }, trpc: { flagged: true } })))
  t.match(s.rest, { met: false, text: /NOT met: calls failed \(REST \(faces\) flagged\)/ })
  t.match(s.trpc, { met: false, text: /NOT met: calls failed \(tRPC flagged\)/ })
  t.match(s.p99, { met: false, text: /NOT met: calls failed \(REST, tRPC flagged\)/ })
})

t.test('a face not measured (its preflight failed) does not leave p99 on every face met', async (t) => {
  const s = byName(statedTargets(spineRow(), allFaces({ websocket: { skipped: 'status 401', p99Ms: Number.NaN, peakRssMiB: null } })))
  t.match(s.p99, { evaluated: true, met: false, text: /NOT met: WebSocket not measured/ })
  t.notMatch(s.p99.text, /WebSocket NaN/)
})

t.test('clean rows over the bounds: NOT met, without a failure named', async (t) => {
  const s = byName(statedTargets(spineRow({ reqPerSec: 7000, p99FineMs: 12, peakRssMiB: 300 }), allFaces({ trpc: { reqPerSec: 9000 } })))
  for (const target of Object.values(s)) t.match(target, { evaluated: true, met: false, text: /: NOT met \(/ })
})

t.test('neither section ran: nothing evaluated, nothing met', async (t) => {
  for (const target of statedTargets(undefined, undefined)) t.match(target, { evaluated: false, met: false })
})
