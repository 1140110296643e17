import t, { type Test } from 'tap'
import { mock } from 'node:test'
import { atExpiry, untilIdentityEnds, type IdentityEnd } from '../../adapters/expiry.js'
import { KeyLease } from '../../plugins/auth/identity.js'

// The expiry timer of /ws, /graphql and /trpc, on node:test's fake setTimeout and Date: the
// test moves time by hand, weeks in a tick, and nothing sleeps.
const MAX_TIMER_MS = 2 ** 31 - 1
/** How often a deadline is looked at again (the wall clock may have stepped meanwhile). */
const RECHECK_MS = 60_000

/** Fake timers from `now` for the rest of the subtest; `armed()` counts the timers set since. */
function fakeTime (t: Test, now: number): { armed: () => number } {
  mock.timers.enable({ apis: ['setTimeout', 'Date'], now })
  const setTimeout = mock.method(globalThis, 'setTimeout')
  t.teardown(() => {
    setTimeout.mock.restore()
    mock.timers.reset()
  })
  return { armed: () => setTimeout.mock.callCount() }
}

t.test('a deadline beyond one timer fires only after re-arming, at the deadline', async t => {
  const { armed } = fakeTime(t, 0)
  const expiresAt = MAX_TIMER_MS + 1000
  const fired: number[] = []
  atExpiry(expiresAt, () => fired.push(Date.now()))
  t.same(fired, [], 'not at once')
  mock.timers.tick(MAX_TIMER_MS)
  t.same(fired, [], 'not when the first timer ends, 1000 ms early')
  t.equal(armed(), 2, 'the timer was armed again for the rest')
  mock.timers.tick(999)
  t.same(fired, [], 'not 1 ms before the deadline')
  mock.timers.tick(1)
  t.same(fired, [expiresAt], 'at the deadline')
  mock.timers.tick(3 * MAX_TIMER_MS)
  t.same(fired, [expiresAt], 'once')
})

// Timers run on the monotonic clock, a token's exp on the wall clock. A wall clock stepped
// forward (an NTP correction; a VM resumed after a pause, during which the monotonic clock
// stood still) past the deadline: the connection's token has expired, but the one timer armed
// for its time left fired that long after it (an hour's step, a connection open an hour on an
// expired token). The deadline is looked at again every minute.
t.test('a wall clock stepped forward past the deadline ends it within one re-check, not when the old timer would have fired', async t => {
  fakeTime(t, 0)
  const fired: number[] = []
  atExpiry(3_600_000, () => fired.push(Date.now()))
  mock.timers.tick(1000)
  const MockDate = Date
  const mocked = MockDate.now
  MockDate.now = () => mocked() + 3_600_000
  t.teardown(() => { MockDate.now = mocked })
  mock.timers.tick(RECHECK_MS)
  t.equal(fired.length, 1, 'ended within a re-check of the step')
  t.ok(fired[0] >= 3_600_000, 'at a wall time past the deadline')
  mock.timers.tick(3_600_000)
  t.equal(fired.length, 1, 'once')
})

// A step back leaves the deadline where the token puts it (its exp, on the wall clock).
t.test('a wall clock stepped back delays the end until the wall clock reaches the deadline', async t => {
  fakeTime(t, 0)
  const fired: number[] = []
  atExpiry(60_000, () => fired.push(Date.now()))
  const MockDate = Date
  const mocked = MockDate.now
  MockDate.now = () => mocked() - 3_600_000
  t.teardown(() => { MockDate.now = mocked })
  mock.timers.tick(3_600_000 + 59_999)
  t.same(fired, [], 'not before the wall clock reaches the deadline')
  mock.timers.tick(RECHECK_MS)
  t.equal(fired.length, 1)
})

t.test('a deadline already past fires from a timer, never from the call itself', async t => {
  fakeTime(t, 10_000)
  let fired = 0
  atExpiry(9_000, () => { fired++ })
  t.equal(fired, 0, 'not during the call')
  mock.timers.tick(1)
  t.equal(fired, 1)
})

t.test('Infinity (a token that never expires) arms no timer', async t => {
  const { armed } = fakeTime(t, 0)
  let fired = 0
  const cancel = atExpiry(Infinity, () => { fired++ })
  t.equal(armed(), 0, 'no timer')
  mock.timers.tick(4 * MAX_TIMER_MS)
  t.equal(fired, 0)
  cancel()
})

t.test('a cancelled expiry never fires, before or after a re-arm', async t => {
  fakeTime(t, 0)
  let fired = 0
  const cancel = atExpiry(1000, () => { fired++ })
  mock.timers.tick(999)
  cancel()
  mock.timers.tick(2 * MAX_TIMER_MS)
  t.equal(fired, 0, 'cancelled within the first timer')

  // The canceller stops the timer armed last, not only the first.
  const rearmed = atExpiry(Date.now() + MAX_TIMER_MS + 1000, () => { fired++ })
  mock.timers.tick(MAX_TIMER_MS)
  rearmed()
  mock.timers.tick(2 * MAX_TIMER_MS)
  t.equal(fired, 0, 'cancelled after the timer was armed again')
})

// untilIdentityEnds: the expiry timer above plus the JWKS key's lease, one canceller for both.
const nextTurn = async (): Promise<void> => { await new Promise(resolve => setImmediate(resolve)) }
const noError = (err: unknown): void => { throw err }

t.test('a withdrawn key ends the identity once, and its expiry timer goes with it', async t => {
  const { armed } = fakeTime(t, 0)
  const lease = new KeyLease('A')
  const ends: IdentityEnd[] = []
  untilIdentityEnds({ expiresAt: 1000, lease }, why => ends.push(why))
  t.equal(lease.listeners, 1, 'one listener while the stream is open')
  lease.withdraw(noError)
  t.same(ends, ['withdrawn'])
  t.equal(lease.listeners, 0, 'let go once called')
  lease.withdraw(noError)
  mock.timers.tick(2000)
  t.same(ends, ['withdrawn'], 'once: not again at expiry, nor at a second withdrawal')
  t.equal(armed(), 1, 'the timer was not armed again')
})

t.test('cancelled, an identity leaves nothing on its lease and is never ended', async t => {
  fakeTime(t, 0)
  const lease = new KeyLease('A')
  let ended = 0
  const cancels = Array.from({ length: 100 }, () => untilIdentityEnds({ expiresAt: 1000, lease }, () => { ended++ }))
  t.equal(lease.listeners, 100)
  for (const cancel of cancels) cancel()
  t.equal(lease.listeners, 0, 'no listener is left per closed stream')
  lease.withdraw(noError)
  mock.timers.tick(2000)
  t.equal(ended, 0)
})

t.test('ended by its expiry, an identity lets go of its lease', async t => {
  fakeTime(t, 0)
  const lease = new KeyLease('A')
  const ends: IdentityEnd[] = []
  untilIdentityEnds({ expiresAt: 1000, lease }, why => ends.push(why))
  mock.timers.tick(1000)
  t.same(ends, ['expired'])
  t.equal(lease.listeners, 0)
  lease.withdraw(noError)
  t.same(ends, ['expired'], 'once')
})

t.test('a key already withdrawn ends the identity from a later turn, never from the call; cancelled first, never', async t => {
  const lease = new KeyLease('A')
  lease.withdraw(noError)
  const ends: IdentityEnd[] = []
  const cancel = untilIdentityEnds({ expiresAt: Infinity, lease }, why => ends.push(why))
  t.same(ends, [], 'not during the call')
  await nextTurn()
  t.same(ends, ['withdrawn'])
  cancel()
  untilIdentityEnds({ expiresAt: Infinity, lease }, why => ends.push(why))()
  await nextTurn()
  t.same(ends, ['withdrawn'], 'cancelled before its turn')
  t.equal(lease.listeners, 0)
})

t.test('a listener that throws does not keep the others from ending', async t => {
  const lease = new KeyLease('A')
  const errors: unknown[] = []
  let ended = 0
  untilIdentityEnds({ expiresAt: Infinity, lease }, () => { throw new Error('boom') })
  untilIdentityEnds({ expiresAt: Infinity, lease }, () => { ended++ })
  lease.withdraw(err => errors.push(err))
  t.equal(ended, 1)
  t.match(errors, [{ message: 'boom' }])
})
