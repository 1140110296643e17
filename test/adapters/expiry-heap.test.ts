import t from 'tap'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { fileURLToPath } from 'node:url'

// In a process of its own, with gc exposed and nothing else running: the heap measures only the
// expiry timers. Node kept the list of timers of each delay after its last unref'd timer was
// cleared, until that delay would have passed: each connection's delay is its token's time left
// (ms), so each closed connection (/ws, /graphql, tRPC) left one, about 200 bytes, for up to its
// token's lifetime, and a client reconnecting in a loop grew the heap without bound.
const expiry = fileURLToPath(new URL('../../adapters/expiry.ts', import.meta.url))
const script = `
import { atExpiry } from ${JSON.stringify(expiry)}
const heap = () => { gc(); gc(); return process.memoryUsage().heapUsed }
const n = 50_000
const start = Date.now()
const round = (from) => { for (let i = 0; i < n; i++) atExpiry(start + from + i, () => {})() }
// A first round grows what Node keeps at its largest (its timer queue, its map's table), as a
// peak of connections would; the next, of other deadlines, must add nothing.
round(3_600_000)
const before = heap()
round(7_200_000)
process.stdout.write(String(heap() - before))
`

t.test('a cancelled expiry leaves nothing behind: 50,000 connections of distinct deadlines, closed', async t => {
  const { stdout } = await promisify(execFile)(process.execPath, ['--expose-gc', '--import', 'tsx', '--input-type=module', '-e', script])
  const grown = Number(stdout)
  t.ok(Number.isFinite(grown) && grown < 1_000_000, `the heap grew by ${grown} bytes (${Math.round(grown / 50_000)} a connection)`)
})
