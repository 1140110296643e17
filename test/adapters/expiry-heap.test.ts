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
const identity = fileURLToPath(new URL('../../plugins/auth/identity.ts', import.meta.url))
/** The heap's growth over a second round of 50,000 streams opened and closed by `open(deadline)`. */
const script = (open: string): string => `
import { atExpiry, untilIdentityEnds } from ${JSON.stringify(expiry)}
import { KeyLease } from ${JSON.stringify(identity)}
const lease = new KeyLease('A')
const heap = () => { gc(); gc(); return process.memoryUsage().heapUsed }
const n = 50_000
const start = Date.now()
const round = (from) => { for (let i = 0; i < n; i++) (${open})(start + from + i)() }
// A first round grows what Node keeps at its largest (its timer queue, its map's table), as a
// peak of connections would; the next, of other deadlines, must add nothing.
round(3_600_000)
const before = heap()
round(7_200_000)
if (lease.listeners !== 0) throw new Error('listeners left: ' + lease.listeners)
process.stdout.write(String(heap() - before))
`

// The child measures a heap, nothing more: its coverage is not taken (tap's processinfo follows
// child processes), since its data for the gateway's files tsx transpiled there (identity.ts,
// keys.ts, errors.ts, ...) was merged with the test processes' own and reported most of their
// lines uncovered (identity.ts 93% -> 66%).
const env = { ...process.env, _TAPJS_PROCESSINFO_COVERAGE_: '0' }

const grown = async (open: string): Promise<number> => {
  const { stdout } = await promisify(execFile)(process.execPath, ['--expose-gc', '--import', 'tsx', '--input-type=module', '-e', script(open)], { env })
  return Number(stdout)
}

t.test('a cancelled expiry leaves nothing behind: 50,000 connections of distinct deadlines, closed', async t => {
  const bytes = await grown('(at) => atExpiry(at, () => {})')
  t.ok(Number.isFinite(bytes) && bytes < 1_000_000, `the heap grew by ${bytes} bytes (${Math.round(bytes / 50_000)} a connection)`)
})

// The same with the JWKS key's lease (untilIdentityEnds): each closed stream lets go of its
// listener on the key too, which every stream of that key shares.
t.test('a cancelled identity end leaves nothing behind on its key either: 50,000 streams of one key, closed', async t => {
  const bytes = await grown('(at) => untilIdentityEnds({ expiresAt: at, lease }, () => {})')
  t.ok(Number.isFinite(bytes) && bytes < 1_000_000, `the heap grew by ${bytes} bytes (${Math.round(bytes / 50_000)} a stream)`)
})
