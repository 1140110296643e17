import t, { type Test } from 'tap'
import { mock } from 'node:test'
import { atExpiry } from '../../adapters/expiry.js'

// The expiry timer of /ws, /graphql and /trpc, on node:test's fake setTimeout and Date: the
// test moves time by hand, weeks in a tick, and nothing sleeps.
const MAX_TIMER_MS = 2 ** 31 - 1

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
