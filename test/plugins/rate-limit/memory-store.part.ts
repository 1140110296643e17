import t from 'tap'
import { MemoryWindowStore, RateLimiter, hit, type WindowState, keyPart, opKey, tenantKey, ipKey, fastifyStore } from '../../../plugins/rate-limit/index.js'

// The sliding window on a clock the test moves by hand: no sleeping, no timed assertion.

const clock = (start = 0): { now: () => number, at: (ms: number) => void } => {
  let now = start
  return { now: () => now, at: (ms) => { now = ms } }
}

t.test('exactly max calls per window pass; the refused ones are not counted', async t => {
  const c = clock(10_000)
  const store = new MemoryWindowStore({ now: c.now })
  const results = Array.from({ length: 15 }, () => store.check('k', 1000, 10))
  t.same(results.map(r => r.current), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11, 11, 11, 11])
  t.equal(results.filter(r => r.current <= 10).length, 10)
  t.equal(results[0].ttl, 1000, 'allowed: ms until the window ends')
  t.ok(results[10].ttl > 0)
  t.equal(store.size, 1)
})

t.test('the window slides: the previous window weighs in as it slides out', async t => {
  const c = clock(0)
  const store = new MemoryWindowStore({ now: c.now })
  for (let i = 0; i < 10; i++) t.ok(store.check('k', 1000, 10).current <= 10)
  // A fixed window would let 10 more through at 1000; the sliding one lets none.
  c.at(1000)
  const refused = store.check('k', 1000, 10)
  t.equal(refused.current, 11)
  t.equal(refused.ttl, 100, 'at 1100 the previous window weighs 9: one call fits')
  c.at(1099)
  t.equal(store.check('k', 1000, 10).current, 11, 'still refused 1 ms before')
  c.at(1100)
  t.equal(store.check('k', 1000, 10).current, 10, 'allowed exactly when the retry time said')
  // Halfway through: the previous 10 weigh 5, one is counted in this window: 4 more fit.
  c.at(1500)
  let allowed = 0
  for (let i = 0; i < 10; i++) if (store.check('k', 1000, 10).current <= 10) allowed++
  t.equal(allowed, 4)
  // Two windows later nothing weighs any more.
  c.at(3000)
  allowed = 0
  for (let i = 0; i < 12; i++) if (store.check('k', 1000, 10).current <= 10) allowed++
  t.equal(allowed, 10)
})

t.test('a full window: Retry-After reaches into the next one', async t => {
  const state = { w: 0, c: 0, p: 0 }
  t.equal(hit(state, 0, 1000, 1).current, 1)
  const refused = hit(state, 250, 1000, 1)
  t.same(refused, { current: 2, ttl: 750 + 1000 }, 'one call per window: wait until it has slid out')
  t.equal(hit(state, 1999, 1000, 1).current, 2)
  t.equal(hit(state, 2000, 1000, 1).current, 1)
  const two = { w: 0, c: 0, p: 0 }
  hit(two, 0, 1000, 2)
  hit(two, 0, 1000, 2)
  t.same(hit(two, 400, 1000, 2), { current: 3, ttl: 600 + 500 }, 'at 1500 the previous 2 weigh 1: one more fits')
  t.equal(hit(two, 1500, 1000, 2).current, 2)
})

t.test('a clock stepped back never moves a window back: the calls counted stand', async t => {
  const state = { w: 0, c: 0, p: 0 }
  for (let i = 0; i < 10; i++) t.equal(hit(state, 10_002, 1000, 10).current, i + 1)
  t.equal(hit(state, 9998, 1000, 10).current, 11, 'refused 4 ms back, in the window before')
  t.equal(state.w, 10)
  t.equal(hit(state, 10_003, 1000, 10).current, 11, 'and refused when the clock is back')
  // Back by more than a window (a clock that had jumped ahead, set right): the key starts anew,
  // rather than refuse until the clock catches up.
  t.equal(hit(state, 5000, 1000, 10).current, 1)
  t.equal(state.w, 5)
})

// After a step back, the key is counted as at the start of its window, which the clock reaches
// only after the step: the waits named from that start alone were short by the step (up to a
// window), and a client that kept to its Retry-After was refused again.
t.test('after a clock stepped back, the waits named count the step: a call at the time given passes', async t => {
  const state = { w: 0, c: 0, p: 0 }
  for (let i = 0; i < 10; i++) hit(state, 60_000, 60_000, 10)
  const refused = hit(state, 30_000, 60_000, 10)
  t.same(refused, { current: 11, ttl: 30_000 + 60_000 + 6_000 }, 'back 30 s: the step, the window, and the previous 10 sliding to 9')
  t.equal(hit(state, 30_000 + refused.ttl - 1, 60_000, 10).current, 11, 'refused 1 ms before')
  t.equal(hit(state, 30_000 + refused.ttl, 60_000, 10).current, 10, 'allowed at the wait it named')
  const fresh = { w: 1, c: 0, p: 0, m: 60_000 }
  t.same(hit(fresh, 30_000, 60_000, 10), { current: 1, ttl: 90_000 }, 'allowed: until the key\'s window ends, not a window from now')
})

t.test('a key counted in windows of another length (a reload changed windowMs) keeps its calls, scaled to a shorter window', async t => {
  // Before, the key's window index read as foreign and the key started at 0: tightening 2 calls
  // a minute to 2 an hour gave back 2 calls at once.
  const longer = { w: 0, c: 0, p: 0 }
  t.equal(hit(longer, 120_000, 60_000, 2).current, 1)
  t.equal(hit(longer, 120_001, 60_000, 2).current, 2)
  t.equal(hit(longer, 130_000, 3_600_000, 2).current, 3, 'refused: the 2 of the last minute count in the hour')
  t.equal(hit(longer, 3_599_000, 3_600_000, 2).current, 3, 'and still at the hour\'s end')
  t.equal(hit(longer, 5_400_000, 3_600_000, 2).current, 2, 'halfway through the next hour they weigh 1: one more fits')
  // Shortened from an hour to a minute: 60 calls in the hour are 1 in a minute's share.
  const shorter = { w: 0, c: 0, p: 0 }
  for (let i = 0; i < 60; i++) hit(shorter, 1000 + i, 3_600_000, 100)
  t.equal(hit(shorter, 2000, 60_000, 2).current, 2, 'one call carried, one more fits')
  t.equal(hit(shorter, 2001, 60_000, 2).current, 3)
  // A key counted before the length was kept (m absent) is read as counted in the length asked.
  const legacy = { w: 2, c: 2, p: 0 }
  t.equal(hit(legacy, 120_000, 60_000, 2).current, 3)
})

t.test('two window lengths in use at once (a rolling deploy, a reload reaching instances apart): neither limit lapses', async t => {
  // Alternating 10 a minute and 10 an hour, one call a second for 10 minutes: each change of
  // length rescaled the key, a shortening divided its count, and all 600 passed.
  const state: WindowState = { w: 0, c: 0, p: 0 }
  let minute = 0
  let hour = 0
  const passedAt: number[] = []
  for (let i = 0; i < 600; i++) {
    const windowMs = i % 2 === 0 ? 60_000 : 3_600_000
    if (hit(state, 6_000_000 + i * 1000, windowMs, 10).current > 10) continue
    passedAt.push(i)
    if (windowMs === 60_000) minute++
    else hour++
  }
  t.ok(hour <= 10, `the hour's limit holds against every call: ${hour} passed under it`)
  t.ok(minute + hour <= 110, `about 10 a minute in all: ${minute + hour} of 600 passed`)
  const busiest = Math.max(...passedAt.map(i => passedAt.filter(j => j > i - 60 && j <= i).length))
  t.ok(busiest <= 10, `no 60 s hold more than the minute's limit: ${busiest} at most`)
  t.ok((state.o?.length ?? 0) <= 2, 'the other lengths kept are bounded')
})

t.test('a length no longer asked goes after two of its windows; one length alone keeps no others', async t => {
  const state: WindowState = { w: 0, c: 0, p: 0 }
  for (let i = 0; i < 5; i++) hit(state, 1000 * i, 60_000, 100)
  t.equal(state.o, undefined, 'one length: nothing else kept')
  hit(state, 10_000, 1000, 100)
  t.equal(state.o?.length, 1, 'the minute\'s counts kept while seconds are asked')
  hit(state, 130_001, 1000, 100)
  t.equal(state.o, undefined, 'not asked for two minutes: gone')
  // Lengths beyond MAX_LENGTHS: the one asked longest ago goes.
  hit(state, 140_000, 2000, 100)
  hit(state, 140_001, 3000, 100)
  hit(state, 140_002, 4000, 100)
  t.same(state.o?.map(o => o.m), [3000, 2000], 'the most recently asked first, 1000 dropped')
})

t.test('keys are separate and bounded', async t => {
  const store = new MemoryWindowStore({ maxKeys: 3 })
  for (const k of ['a', 'b', 'c', 'd']) store.check(k, 60_000, 1)
  t.equal(store.size, 3, 'the least recently used key is forgotten')
  t.equal(store.check('d', 60_000, 1).current, 2, 'a kept key still counts')
  t.equal(store.check('a', 60_000, 1).current, 1, 'an evicted key starts afresh')
})

t.test('past the bound, the addresses\' keys go first, a tenant named ip\'s kept apart from them', async t => {
  const store = new MemoryWindowStore({ maxKeys: 6 })
  const tenantIp = opKey('ip', 'ann', 'getAgent')
  const guardIp = tenantKey('ip')
  for (let i = 0; i < 3; i++) store.check(tenantIp, 60_000, 5)
  store.check(guardIp, 60_000, 5)
  for (let i = 0; i < 20; i++) store.check(ipKey(`2001:db8:${i.toString(16)}::1`), 60_000, 5)
  t.equal(store.size, 6)
  t.equal(store.check(tenantIp, 60_000, 5).current, 4, 'the tenant ip\'s operation count kept')
  t.equal(store.check(guardIp, 60_000, 5).current, 2, 'and its guard count')
  t.equal(store.check(ipKey('2001:db8:0::1'), 60_000, 5).current, 1, 'the oldest address\'s key went')
})

// Past the bound the key that went was the least recently used of whoever held the most: a tenant
// holding more keys than the addresses (many users, each with a count per operation) lost its
// oldest to every new address, until the addresses held as many. A client with a /48 of IPv6
// addresses (no token needed) so reset the spent limits of that tenant's users, its own among them.
t.test('a flood of new addresses never evicts a tenant\'s counts, even of a tenant holding the most keys', async t => {
  const store = new MemoryWindowStore({ maxKeys: 6 })
  const users = ['u1', 'u2', 'u3', 'u4', 'u5'].map(u => opKey('big', u, 'runAgent'))
  for (const key of users) store.check(key, 60_000, 1)
  store.check(ipKey('203.0.113.1'), 60_000, 5)
  for (let i = 0; i < 50; i++) store.check(ipKey(`2001:db8:${i.toString(16)}::1`), 60_000, 5)
  t.equal(store.size, 6, 'within the bound')
  t.same(users.map(key => store.check(key, 60_000, 1).current), [2, 2, 2, 2, 2], 'every user\'s spent limit still refuses')
  t.equal(store.check(ipKey('203.0.113.1'), 60_000, 5).current, 1, 'an address\'s key went instead (the least recently used)')
  // Tenants' keys still push out addresses' (the holder with the most), and each other fairly.
  const small = new MemoryWindowStore({ maxKeys: 4 })
  for (let i = 0; i < 4; i++) small.check(ipKey(`198.51.100.${i}`), 60_000, 5)
  small.check(opKey('t', 'u', 'op'), 60_000, 1)
  t.equal(small.check(opKey('t', 'u', 'op'), 60_000, 1).current, 2, 'a tenant\'s new key evicts an address\'s')
})

t.test('key segments cannot forge another tenant\'s key', async t => {
  t.equal(opKey('acme', 'ann', 'getAgent'), 'bff:ratelimit:acme:ann:getAgent')
  t.not(opKey('a:b', 'c', 'op'), opKey('a', 'b:c', 'op'))
  t.equal(opKey('a:b', 'c', 'op'), 'bff:ratelimit:a%3Ab:c:op')
  t.equal(keyPart('50%'), '50%25')
  t.equal(keyPart('{x} *'), '%7Bx%7D%20%2A')
  t.equal(tenantKey('acme'), 'bff:ratelimit:acme:*')
  t.not(tenantKey('acme'), opKey('acme', '*', '*'), 'a user named * is not the guard')
  t.equal(ipKey('::1'), 'bff:ratelimit:ip:%3A%3A1')
  t.not(ipKey('1.2.3.4'), tenantKey('ip'))
})

t.test('the @fastify/rate-limit store contract over the memory limiter', async t => {
  const log = { warn: () => {}, info: () => {} }
  const limiter = new RateLimiter({ memory: new MemoryWindowStore(), redis: null, log })
  t.equal(limiter.store, 'memory')
  t.equal(limiter.fallbackActive, false)
  const Store = fastifyStore(limiter, 'global')
  const store = new Store({})
  const incr = async (s: typeof store, key: string): Promise<{ current: number, ttl: number }> =>
    await new Promise((resolve, reject) => s.incr(key, (err, res) => err === null ? resolve(res!) : reject(err), 60_000, 2))
  t.equal((await incr(store, 'k')).current, 1)
  t.equal((await incr(store, 'k')).current, 2)
  t.equal((await incr(store, 'k')).current, 3, 'over the limit: current > max')
  const child = store.child({ method: 'GET', url: '/x', path: '/x', prefix: '' } as never)
  t.equal((await incr(child, 'k')).current, 1, 'a route with its own limit counts apart')
  t.equal(limiter.memoryKeys, 2)
})

t.test('during an outage, one check at a time tries Redis again', async t => {
  // Before, with a Redis that stalls without closing its connection (so still "up"), every check
  // after each pause went to Redis and waited out the command timeout there.
  let sent = 0
  const stalled = { check: async () => { sent++; await new Promise(resolve => setTimeout(resolve, 20)); throw new Error('Command timed out') } }
  const limiter = new RateLimiter({ memory: new MemoryWindowStore(), redis: stalled as never, log: { warn: () => {}, info: () => {} }, retryRedisMs: 50 })
  await limiter.check('op', 'k', 60_000, 100)
  t.equal(sent, 1)
  t.ok(limiter.fallbackActive, 'the outage is on')
  await new Promise(resolve => setTimeout(resolve, 60))
  const counts = await Promise.all(Array.from({ length: 10 }, async () => await limiter.check('op', 'k', 60_000, 100)))
  t.equal(sent, 2, 'after the pause, one of ten concurrent checks went to Redis')
  t.same(counts.map(c => c.current).sort((a, b) => a - b), Array.from({ length: 10 }, (_, i) => i + 2), 'all ten answered, from memory')
})

t.test('during an outage, a check trying Redis again that waits longer than the pause keeps the others in memory', async t => {
  // The pause alone let one more check through to a stalled Redis each time it passed: with a
  // command timeout longer than the pause, one more call each second waited out that timeout.
  const waiting: Array<() => void> = []
  const answerAll = (): void => { for (const answer of waiting.splice(0)) answer() }
  let sent = 0
  const stalled = {
    check: async () => {
      sent++
      if (sent > 1) await new Promise<void>(resolve => { waiting.push(resolve) })
      throw new Error('Command timed out')
    }
  }
  t.teardown(answerAll)
  const limiter = new RateLimiter({ memory: new MemoryWindowStore(), redis: stalled as never, log: { warn: () => {}, info: () => {} }, retryRedisMs: 20 })
  await limiter.check('op', 'k', 60_000, 100)
  await new Promise(resolve => setTimeout(resolve, 30))
  const trying = limiter.check('op', 'k', 60_000, 100)
  t.equal(sent, 2, 'after the pause, a check tries Redis')
  await new Promise(resolve => setTimeout(resolve, 30))
  const other = limiter.check('op', 'k', 60_000, 100)
  t.equal(sent, 2, 'another, after the pause, is answered from memory while the first waits for Redis')
  t.notOk(other instanceof Promise)
  answerAll()
  t.ok((await trying).current <= 3, 'the one trying Redis falls back to memory when it fails')
  await new Promise(resolve => setTimeout(resolve, 30))
  const again = limiter.check('op', 'k', 60_000, 100)
  t.equal(sent, 3, 'and the pause after it passed, the next check tries Redis')
  answerAll()
  await again
})

t.test('a wall clock stepped back does not hold the checks in memory: Redis is tried again after the pause', async t => {
  // The pause was timed by the wall clock: stepped back an hour (NTP, a VM resumed) during an
  // outage, every check stayed in memory for that hour, Redis back or not.
  const realNow = Date.now
  t.teardown(() => { Date.now = realNow })
  let sent = 0
  let down = true
  const redis = { check: async () => { sent++; if (down) throw new Error('Connection is closed.'); return { current: 1, ttl: 1000 } } }
  const limiter = new RateLimiter({ memory: new MemoryWindowStore(), redis: redis as never, log: { warn: () => {}, info: () => {} }, retryRedisMs: 50 })
  await limiter.check('op', 'k', 60_000, 100)
  t.equal(sent, 1)
  Date.now = () => realNow() - 3_600_000
  down = false
  await new Promise(resolve => setTimeout(resolve, 60))
  await limiter.check('op', 'k', 60_000, 100)
  t.equal(sent, 2, 'tried again once the pause had passed')
  t.notOk(limiter.fallbackActive, 'the outage is over')
})

t.test('a Redis that refuses writes but answers reads does not end the outage: logged once, until a check is counted there', async t => {
  // Out of memory, Redis failed every check that writes and answered those it refused (they only
  // read): the outage ended and began again at every other check, each time logged.
  let full = true
  const redis = {
    check: async (key: string, _windowMs: number, max: number) => {
      if (key === 'spent') return { current: max + 1, ttl: 1000 }
      if (full) throw new Error('OOM command not allowed when used memory > \'maxmemory\'')
      return { current: 1, ttl: 1000 }
    }
  }
  const lines: string[] = []
  const log = { warn: () => { lines.push('warn') }, info: () => { lines.push('info') } }
  const limiter = new RateLimiter({ memory: new MemoryWindowStore(), redis: redis as never, log, retryRedisMs: 0 })
  for (let i = 0; i < 10; i++) await limiter.check('op', i % 2 === 0 ? 'fresh' + i : 'spent', 60_000, 5)
  t.same(lines, ['warn'], 'one outage, logged once')
  t.ok(limiter.fallbackActive)
  full = false
  await limiter.check('op', 'spent', 60_000, 5)
  t.ok(limiter.fallbackActive, 'a refused check answered does not end it')
  await limiter.check('op', 'fresh', 60_000, 5)
  t.same(lines, ['warn', 'info'], 'a counted one does')
  t.notOk(limiter.fallbackActive)
})

t.test('the call that takes the last place resets when a call would pass again, not at the window\'s end', async t => {
  // Before: its ttl (RateLimit-Reset) was the end of the fixed window, when the previous
  // window's calls still weigh: a client that waited for it was refused.
  const state = { w: 0, c: 0, p: 0 }
  t.equal(hit(state, 0, 60_000, 3).ttl, 60_000, 'places left: the window\'s end')
  hit(state, 0, 60_000, 3)
  const last = hit(state, 0, 60_000, 3)
  t.equal(last.current, 3)
  // Exactly: `1 - (max - 1) / c` in floating point made it 80,001 ms, a RateLimit-Reset of 81 s.
  t.equal(last.ttl, 80_000, 'the last place: 80 s, when the 3 calls weigh 2')
  t.equal(hit(state, 79_000, 60_000, 3).current, 4, 'refused before')
  t.equal(hit(state, last.ttl, 60_000, 3).current, 3, 'allowed at the reset it gave')
})
