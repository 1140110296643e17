import t from 'tap'
import { CircuitBreaker, RetryBudget, DENIED, NORMAL, PROBE, type BreakerState } from '../../../plugins/kernel/breaker.js'

/** A breaker on a fake clock that records every state change. */
function setup (threshold = 3, resetTimeoutMs = 1000) {
  const clock = { now: 10_000 }
  const changes: BreakerState[] = []
  const breaker = new CircuitBreaker({ threshold, resetTimeoutMs }, state => { changes.push(state) }, () => clock.now)
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
  const breaker = new CircuitBreaker({ threshold: 1, resetTimeoutMs: 60_000 })
  breaker.failure(breaker.acquire())
  t.equal(breaker.state, 'open')
  t.equal(breaker.acquire(), DENIED)
  const left = breaker.retryAfterMs()
  t.ok(left > 59_000 && left <= 60_000, `Date.now is the clock (${left})`)
})

/** A breaker with the failure-rate rule (threshold 100, so that only the rule opens it), recording why it opened. */
function rated (failureRate: number, minimumCalls: number, windowMs = 1000, threshold = 100) {
  const clock = { now: 10_000 }
  const opened: string[] = []
  const breaker = new CircuitBreaker({ threshold, resetTimeoutMs: 500, rate: { failureRate, minimumCalls, windowMs } }, (state, why) => { if (state === 'open') opened.push(String(why)) }, () => clock.now)
  const outcomes = (pattern: string): void => {
    for (const c of pattern) {
      if (c === 'f') breaker.failure(breaker.acquire())
      else breaker.success(breaker.acquire())
    }
  }
  return { breaker, clock, opened, outcomes }
}

t.test('the failure-rate rule opens a breaker that failures in a row never would', async t => {
  const { breaker, opened, outcomes } = rated(0.5, 10)
  outcomes('fsfsfsfsf')
  t.equal(breaker.state, 'closed', '5 failures of 9: fewer than minimumCalls outcomes')
  outcomes('s')
  t.equal(breaker.state, 'closed', 'a success never opens it, whatever the rate')
  outcomes('f')
  t.equal(breaker.state, 'open', '6 failures of 11, never two in a row')
  t.same(opened, ['failure_rate'])

  const consecutive = new CircuitBreaker({ threshold: 5, resetTimeoutMs: 500 })
  for (let i = 0; i < 1000; i++) {
    consecutive.failure(consecutive.acquire())
    consecutive.success(consecutive.acquire())
  }
  t.equal(consecutive.state, 'closed', 'without the rule, 500 failures in 1,000 calls leave it closed')
})

t.test('the failure-rate rule: below the rate stays closed, at it opens', async t => {
  const below = rated(0.5, 10)
  below.outcomes('ffffssssss' + 'ssss')
  below.outcomes('f')
  t.equal(below.breaker.state, 'closed', '5 of 15 is below 0.5')
  const at = rated(0.4, 10)
  at.outcomes('ssssssfff')
  t.equal(at.breaker.state, 'closed', '3 of 9: fewer than minimumCalls')
  at.outcomes('f')
  t.equal(at.breaker.state, 'open', '4 of 10 is the rate itself')
  const all = rated(1, 3)
  all.outcomes('ff')
  t.equal(all.breaker.state, 'closed')
  all.outcomes('f')
  t.equal(all.breaker.state, 'open', 'a rate of 1 opens once minimumCalls attempts all failed')
  t.same(all.opened, ['failure_rate'])
  const exact = rated(0.55, 100)
  exact.outcomes('s'.repeat(45) + 'f'.repeat(54))
  t.equal(exact.breaker.state, 'closed', '54 of 99: fewer than minimumCalls')
  exact.outcomes('f')
  t.equal(exact.breaker.state, 'open', '55 of 100 is 0.55 itself (0.55 * 100 is 55.00000000000001 in floating point)')
})

t.test('the failure-rate window forgets what is older than windowMs, a tenth at a time', async t => {
  const { breaker, clock, outcomes } = rated(0.5, 10, 1000)
  outcomes('fffff')
  clock.now += 500
  outcomes('ssss')
  clock.now += 499
  outcomes('f')
  t.equal(breaker.state, 'open', '6 of 10 within 999 ms')

  const slid = rated(0.5, 10, 1000)
  slid.outcomes('fffff')
  slid.clock.now += 500
  slid.outcomes('ssss')
  slid.clock.now += 500
  slid.outcomes('f')
  t.equal(slid.breaker.state, 'closed', 'at 1000 ms the first failures left the window: 1 of 5')
  slid.outcomes('fffff')
  t.equal(slid.breaker.state, 'open', '6 of 10 of the last second')

  const idle = rated(0.5, 10, 1000)
  idle.outcomes('fffffffff')
  idle.clock.now += 60_000
  idle.outcomes('f')
  t.equal(idle.breaker.state, 'closed', 'after a minute without calls the window is empty again')
  idle.outcomes('fffffffff')
  t.equal(idle.breaker.state, 'open')
})

t.test('the failure-rate rule starts again when the breaker opens and after it closes', async t => {
  const { breaker, clock, opened, outcomes } = rated(0.5, 4)
  outcomes('sfsf')
  t.equal(breaker.state, 'open')
  breaker.failure(NORMAL)
  breaker.success(NORMAL)
  t.equal(breaker.state, 'open', 'a late outcome of a call sent before it opened changes nothing')
  clock.now += 500
  breaker.success(breaker.acquire())
  t.equal(breaker.state, 'closed', 'the probe closed it')
  outcomes('fss')
  t.equal(breaker.state, 'closed', 'the failures before it opened are forgotten: 1 of 3')
  outcomes('f')
  t.equal(breaker.state, 'open', '2 of 4 since it closed')
  clock.now += 500
  breaker.failure(breaker.acquire())
  t.same(opened, ['failure_rate', 'failure_rate', 'probe'], 'a failed probe opens it again, as a probe')
})

t.test('with the rule on, failures in a row still open the breaker first', async t => {
  const { breaker, opened, outcomes } = rated(0.9, 1000, 1000, 3)
  outcomes('sssfff')
  t.equal(breaker.state, 'open')
  t.same(opened, ['consecutive'])
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
