// loadtest/bench-idempotency.ts's table: a row whose calls failed is FLAGGED (an error is
// answered fast, p50/p99 are read from 2xx answers alone), and so is a row read against a
// flagged baseline; the script exits 1 when any row is.
import t from 'tap'
import { MODES, summarise, type Figures } from '../../loadtest/bench-idempotency.js'

const f = (over: Partial<Figures> = {}): Figures => ({ reqPerSec: 1000, p50Ms: 2, p99Ms: 5, non2xx: 0, errors: 0, ...over })
const figures = (over: Record<string, Figures[]> = {}): Map<string, Figures[]> => {
  const m = new Map<string, Figures[]>()
  for (const store of ['redis', 'memory']) for (const mode of MODES) m.set(`${store} / ${mode}`, [f(), f()])
  for (const [k, v] of Object.entries(over)) m.set(k, v)
  return m
}
const status = (rows: string[][], name: string): string => rows.find((r) => r[0] === name)!.at(-1)!

t.test('every call 2xx: nothing flagged', async (t) => {
  const { rows, flagged } = summarise(['redis', 'memory'], figures())
  t.strictSame(flagged, [])
  t.equal(rows.length, 6)
  for (const r of rows) t.equal(r.at(-1), 'ok', r[0])
})

t.test('a mode whose rounds had non-2xx answers or errors is flagged, with the counts', async (t) => {
  const { rows, flagged } = summarise(['redis', 'memory'], figures({
    'redis / fresh key': [f({ reqPerSec: 40_000, non2xx: 1200 }), f({ errors: 3 })],
    'memory / same key (replay)': [f(), f({ errors: 7 })]
  }))
  t.strictSame(flagged, ['redis / fresh key', 'memory / same key (replay)'])
  t.equal(status(rows, 'redis / fresh key'), 'FLAGGED: 1200 non-2xx, 3 errors')
  t.equal(status(rows, 'memory / same key (replay)'), 'FLAGGED: 0 non-2xx, 7 errors')
  t.equal(status(rows, 'redis / no key'), 'ok')
})

t.test('a flagged baseline flags every ratio read against it', async (t) => {
  const { rows, flagged } = summarise(['redis', 'memory'], figures({ 'memory / no key': [f({ non2xx: 5 }), f()] }))
  t.strictSame(flagged, ['memory / no key', 'memory / fresh key', 'memory / same key (replay)'])
  t.equal(status(rows, 'memory / fresh key'), 'FLAGGED: its baseline (no key) is')
  t.equal(status(rows, 'redis / fresh key'), 'ok')
})
