import t from 'tap'
import { CircuitBreaker, RetryBudget, DENIED, NORMAL, PROBE, type BreakerState } from '../../../plugins/kernel/breaker.js'

/** A breaker on a fake clock that records every state change. */
function setup (threshold = 3, resetTimeoutMs = 1000) {
  const clock = { now: 10_000 }
  const changes: BreakerState[] = []
  const breaker = new CircuitBreaker(threshold, resetTimeoutMs, state => { changes.push(state) }, () => clock.now)
  const fail = (n: number): void => {
    for (let i = 0; i < n; i++) breaker.failure(breaker.acquire())
  }
  return { breaker, clock, changes, fail }
}

t.test('the permits are distinct', async t => {
  t.same([DENIED, NORMAL, PROBE], [0, 1, 2])
})

t.test('closed: calls pass; threshold consecutive failures open it', async t => {
  const { breaker, changes, fail } = setup(3)
  t.equal(breaker.state, 'closed')
  t.equal(breaker.threshold, 3)
  t.equal(breaker.resetTimeoutMs, 1000)
  t.equal(breaker.acquire(), NORMAL)
  fail(2)
  t.equal(breaker.state, 'closed', 'two failures of three')
  t.same(changes, [])
  t.equal(breaker.acquire(), NORMAL)
  fail(1)
  t.equal(breaker.state, 'open', 'the third in a row opens it')
  t.same(changes, ['open'])
  t.equal(breaker.acquire(), DENIED)
})

t.test('a success resets the count of consecutive failures', async t => {
  const { breaker, changes, fail } = setup(3)
  fail(2)
  breaker.success(breaker.acquire())
  fail(2)
  t.equal(breaker.state, 'closed', '2 + success + 2 is not 3 in a row')
  fail(1)
  t.equal(breaker.state, 'open')
  t.same(changes, ['open'])
})

t.test('a threshold of 1 opens on the first failure', async t => {
  const { breaker, fail } = setup(1)
  fail(1)
  t.equal(breaker.state, 'open')
})

t.test('open: denied until the reset timeout, then exactly one probe', async t => {
  const { breaker, clock, changes, fail } = setup(2, 1000)
  fail(2)
  t.equal(breaker.acquire(), DENIED)
  clock.now += 999
  t.equal(breaker.acquire(), DENIED, '1 ms before the timeout')
  t.equal(breaker.state, 'open')
  clock.now += 1
  t.equal(breaker.acquire(), PROBE, 'at the timeout, one probe')
  t.equal(breaker.state, 'half-open')
  t.equal(breaker.acquire(), DENIED, 'a second call while the probe is out')
  t.equal(breaker.acquire(), DENIED)
  clock.now += 999
  t.equal(breaker.acquire(), DENIED, 'still one probe, until it has been out for the reset timeout')
  t.same(changes, ['open', 'half-open'])
})

// A probe was bounded only by its operation's timeout (up to 600 s): one of a slow operation, or
// one its Kernel hung on, refused every call of every operation that long, while /readyz called
// the instance ready (half-open).
t.test('a probe still out after the reset timeout lets one more through; late outcomes count as calls\'', async t => {
  const { breaker, clock, changes, fail } = setup(2, 1000)
  fail(2)
  clock.now += 1000
  const hung = breaker.acquire()
  t.equal(hung, PROBE)
  clock.now += 60_000
  const second = breaker.acquire()
  t.equal(second, PROBE, 'the probe has been out for the reset timeout: another one goes')
  t.equal(breaker.acquire(), DENIED, 'one at a time again')
  breaker.success(second)
  t.equal(breaker.state, 'closed', 'its success closes the breaker')
  breaker.failure(hung)
  t.equal(breaker.state, 'closed', 'the hung probe\'s late failure counts as one call\'s')
  fail(1)
  t.equal(breaker.state, 'open', 'with the next one, two in a row')
  t.same(changes, ['open', 'half-open', 'closed', 'open'])

  // Both probes fail: the first failure opens it, the late one changes nothing.
  const again = setup(1, 1000)
  again.fail(1)
  again.clock.now += 1000
  const first = again.breaker.acquire()
  again.clock.now += 1000
  const next = again.breaker.acquire()
  t.same([first, next], [PROBE, PROBE])
  again.breaker.failure(next)
  t.equal(again.breaker.state, 'open')
  again.clock.now += 500
  again.breaker.failure(first)
  t.equal(again.breaker.retryAfterMs(), 500, 'the late probe failure does not restart the timeout')
  again.breaker.success(first)
  t.equal(again.breaker.state, 'open', 'nor does a late success close it')
  again.clock.now += 500
  t.equal(again.breaker.acquire(), PROBE, 'a probe once the timeout has passed: none is counted out')
})

t.test('a probe success closes the breaker', async t => {
  const { breaker, clock, changes, fail } = setup(2, 1000)
  fail(2)
  clock.now += 1000
  const permit = breaker.acquire()
  t.equal(permit, PROBE)
  breaker.success(permit)
  t.equal(breaker.state, 'closed')
  t.same(changes, ['open', 'half-open', 'closed'])
  t.equal(breaker.acquire(), NORMAL)
  t.equal(breaker.acquire(), NORMAL)
  fail(1)
  t.equal(breaker.state, 'closed', 'the failure count starts again from zero')
  fail(1)
  t.equal(breaker.state, 'open')
  t.same(changes, ['open', 'half-open', 'closed', 'open'])
})

t.test('a probe failure opens it again and restarts the timeout', async t => {
  const { breaker, clock, changes, fail } = setup(2, 1000)
  fail(2)
  clock.now += 1500
  const permit = breaker.acquire()
  t.equal(permit, PROBE)
  breaker.failure(permit)
  t.equal(breaker.state, 'open')
  t.same(changes, ['open', 'half-open', 'open'])
  t.equal(breaker.retryAfterMs(), 1000, 'a full timeout from the probe failure')
  clock.now += 999
  t.equal(breaker.acquire(), DENIED, 'the timeout counts from the probe failure, not the first opening')
  clock.now += 1
  t.equal(breaker.acquire(), PROBE, 'then a new probe')
  t.same(changes, ['open', 'half-open', 'open', 'half-open'])
})

t.test('a late NORMAL outcome while open or half-open changes nothing', async t => {
  const { breaker, clock, changes } = setup(2, 1000)
  const early = [breaker.acquire(), breaker.acquire(), breaker.acquire(), breaker.acquire()]
  t.same(early, [NORMAL, NORMAL, NORMAL, NORMAL])
  breaker.failure(early[0])
  breaker.failure(early[1])
  t.equal(breaker.state, 'open')
  clock.now += 400
  breaker.failure(early[2])
  t.equal(breaker.state, 'open')
  t.equal(breaker.retryAfterMs(), 600, 'a late failure does not restart the timeout')
  breaker.success(early[3])
  t.equal(breaker.state, 'open', 'a late success does not close it')
  t.same(changes, ['open'])

  const late = setup(2, 1000)
  const slow = late.breaker.acquire()
  late.fail(2)
  late.clock.now += 1000
  const probe = late.breaker.acquire()
  t.equal(probe, PROBE)
  late.breaker.success(slow)
  t.equal(late.breaker.state, 'half-open', 'a late NORMAL success does not close a half-open breaker')
  late.breaker.failure(slow)
  t.equal(late.breaker.state, 'half-open', 'nor does a late NORMAL failure reopen it')
  t.equal(late.breaker.acquire(), DENIED, 'the probe is still out')
  late.breaker.success(probe)
  t.equal(late.breaker.state, 'closed')
  t.same(late.changes, ['open', 'half-open', 'closed'])
})

t.test('retryAfterMs counts down while open and is 0 otherwise', async t => {
  const { breaker, clock, fail } = setup(1, 30_000)
  t.equal(breaker.retryAfterMs(), 0, 'closed')
  fail(1)
  t.equal(breaker.retryAfterMs(), 30_000)
  clock.now += 10_000
  t.equal(breaker.retryAfterMs(), 20_000)
  clock.now += 20_000
  t.equal(breaker.retryAfterMs(), 0, 'the timeout has passed')
  clock.now += 5_000
  t.equal(breaker.retryAfterMs(), 0, 'never negative')
  t.equal(breaker.state, 'open', 'still open until a call asks')
  breaker.acquire()
  t.equal(breaker.state, 'half-open')
  t.equal(breaker.retryAfterMs(), 0, 'half-open')
})

t.test('the default onChange and clock work', async t => {
  const breaker = new CircuitBreaker(1, 60_000)
  breaker.failure(breaker.acquire())
  t.equal(breaker.state, 'open')
  t.equal(breaker.acquire(), DENIED)
  const left = breaker.retryAfterMs()
  t.ok(left > 59_000 && left <= 60_000, `Date.now is the clock (${left})`)
})

t.test('RetryBudget: reserve, deposits up to the cap, withdrawals of one token', async t => {
  const d = new RetryBudget()
  t.equal(d.balance, 10, 'default reserve 10')
  for (let i = 0; i < 10; i++) t.ok(d.withdraw())
  t.equal(d.balance, 0)
  t.notOk(d.withdraw(), 'refused at 0')
  for (let i = 0; i < 4; i++) d.deposit()
  t.notOk(d.withdraw(), 'refused at 0.8 (4 × 0.2): a whole token is needed')
  d.deposit()
  t.ok(d.withdraw(), '5 first attempts at ratio 0.2 buy one retry')
  const calm = new RetryBudget()
  for (let i = 0; i < 1000; i++) calm.deposit()
  t.equal(calm.balance, 10, 'a calm spell banks no more than the reserve: retries stay within 20% of traffic plus 10')

  const b = new RetryBudget(0.5, 3, 2)
  t.equal(b.balance, 2)
  b.deposit()
  t.equal(b.balance, 2.5)
  b.deposit()
  b.deposit()
  t.equal(b.balance, 3, 'capped')
  b.deposit()
  t.equal(b.balance, 3, 'still capped')
  t.ok(b.withdraw())
  t.equal(b.balance, 2)
  t.ok(b.withdraw())
  t.ok(b.withdraw())
  t.equal(b.balance, 0)
  t.notOk(b.withdraw())
  t.equal(b.balance, 0, 'a refused withdrawal takes nothing')
  b.deposit()
  t.notOk(b.withdraw(), 'refused below 1 (0.5)')
  t.equal(b.balance, 0.5)
  b.deposit()
  t.ok(b.withdraw(), 'allowed at exactly 1')
  t.equal(b.balance, 0)

  t.equal(new RetryBudget(0.25, 5, 50).balance, 5, 'the reserve never exceeds the cap')
  const none = new RetryBudget(0.5, 10, 0)
  t.equal(none.balance, 0)
  t.notOk(none.withdraw(), 'no reserve: no retry before any deposit')
})

t.test('current(): an open breaker past its reset time reads half-open before any call', async t => {
  const { breaker, clock, fail } = setup(1, 1000)
  t.equal(breaker.current(), 'closed')
  fail(1)
  t.equal(breaker.current(), 'open')
  clock.now += 999
  t.equal(breaker.current(), 'open')
  clock.now += 1
  t.equal(breaker.current(), 'half-open')
  t.equal(breaker.state, 'open', 'the stored state moves only when a call comes')
  t.equal(breaker.acquire(), PROBE)
  t.equal(breaker.current(), 'half-open')
})
