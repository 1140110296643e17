import t, { type Test } from 'tap'
import { randomUUID } from 'node:crypto'
import { Redis } from 'ioredis'
import { MemoryIdempotencyStore, RedisIdempotencyStore, TenantFullError, tenantIndex, decode, storeKey, inputHash, type IdempotencyStore, type DoneRecord } from '../../../plugins/idempotency/index.js'
import { FairLru, PURGE_SLICE, SCRAPE_SLICES } from '../../../fair-lru.js'
import { tenantOfKey } from '../../../plugins/idempotency/store.js'
import { testConfig } from '../../helper.js'
import { REDIS_URL, STORES } from './idempotency-helper.js'

const done = (hash: string, body = '{"id":"1"}'): DoneRecord => ({ state: 'done', hash, status: 201, body, error: null })

async function makeStore (t: Test, kind: typeof STORES[number]): Promise<IdempotencyStore> {
  if (kind === 'memory') return new MemoryIdempotencyStore({ maxKeys: 100, maxBytes: 1 << 20 })
  const client = new Redis(REDIS_URL, { lazyConnect: true })
  await client.connect()
  t.teardown(() => client.quit())
  return new RedisIdempotencyStore(client, { maxKeysPerTenant: 1000 })
}

for (const kind of STORES) {
  t.test(`${kind} store: claim, complete, release and the lease`, async t => {
    const store = await makeStore(t, kind)
    const key = storeKey('tenant-' + randomUUID(), 'createItem', randomUUID())
    const first = await store.claim(key, 'h1', 60_000)
    t.ok(first.won, 'the first claim wins')
    const second = await store.claim(key, 'h1', 60_000)
    t.match(second, { won: false, record: { state: 'running', hash: 'h1' } }, 'a repeat sees the running call')
    if (!first.won) throw new Error('unreachable')
    await store.release(key, 'not-the-holder')
    t.match(await store.claim(key, 'h1', 60_000), { won: false }, 'only the holder releases')
    await store.complete(key, 'not-the-holder', done('h1'), 60_000)
    t.match(await store.claim(key, 'h1', 60_000), { won: false, record: { state: 'running' } }, 'only the holder completes')
    await store.complete(key, first.token, done('h1'), 60_000)
    t.match(await store.claim(key, 'h1', 60_000), { won: false, record: done('h1') }, 'the outcome is stored')
    await store.release(key, first.token)
    t.match(await store.claim(key, 'h1', 60_000), { won: false, record: { state: 'done' } }, 'a done record is not released')

    const other = storeKey('tenant-' + randomUUID(), 'createItem', 'k')
    const held = await store.claim(other, 'h2', 60_000)
    if (!held.won) throw new Error('unreachable')
    await store.release(other, held.token)
    t.ok((await store.claim(other, 'h2', 60_000)).won, 'a released key is claimed again')

    // A holder that crashed: its lease lapses and another call may claim the key.
    const crashed = storeKey('tenant-' + randomUUID(), 'createItem', 'k')
    const lost = await store.claim(crashed, 'h3', 50)
    t.ok(lost.won)
    let reclaimed = await store.claim(crashed, 'h3', 60_000)
    const end = Date.now() + 5000
    while (!reclaimed.won && Date.now() < end) {
      await new Promise(resolve => setTimeout(resolve, 20))
      reclaimed = await store.claim(crashed, 'h3', 60_000)
    }
    t.ok(reclaimed.won, 'the lapsed lease is reclaimed')
    if (!lost.won || !reclaimed.won) throw new Error('unreachable')
    await store.complete(crashed, lost.token, done('h3', '"late"'), 60_000)
    t.match(await store.claim(crashed, 'h3', 60_000), { won: false, record: { state: 'running' } }, 'the late holder does not overwrite the new claim')
    await store.complete(crashed, reclaimed.token, done('h3'), 60_000)

    // A holder whose lease lapsed with nobody else claiming still stores its outcome.
    const lapsed = storeKey('tenant-' + randomUUID(), 'createItem', 'k')
    const slow = await store.claim(lapsed, 'h4', 30)
    if (!slow.won) throw new Error('unreachable')
    await new Promise(resolve => setTimeout(resolve, 100))
    await store.complete(lapsed, slow.token, done('h4'), 60_000)
    t.match(await store.claim(lapsed, 'h4', 60_000), { won: false, record: { state: 'done' } })
  })
}

t.test('the memory store is bounded by keys and bytes of outcomes, and never evicts a running claim', async t => {
  const store = new MemoryIdempotencyStore({ maxKeys: 2, maxBytes: 4096 })
  for (const k of ['a', 'b', 'c']) {
    const claim = await store.claim(k, 'h', 60_000)
    if (!claim.won) throw new Error('unreachable')
    await store.complete(k, claim.token, done('h'), 60_000)
  }
  t.equal(store.size, 2, 'the least recently used outcome went')
  t.ok((await store.claim('a', 'h', 60_000)).won, 'the evicted key is claimed again')
  // Other keys' outcomes, beyond both bounds, while a call runs: its claim stays.
  const held = await store.claim('held', 'h', 60_000)
  for (let i = 0; i < 5; i++) {
    const claim = await store.claim('k' + i, 'h', 60_000)
    if (claim.won) await store.complete('k' + i, claim.token, done('h', 'x'.repeat(1500)), 60_000)
  }
  t.match(await store.claim('held', 'h', 60_000), { won: false, record: { state: 'running' } }, 'the running call is still known (a repeat waits for it)')
  if (!held.won) throw new Error('unreachable')
  await store.complete('held', held.token, done('h'), 60_000)
  t.match(await store.claim('held', 'h', 60_000), { won: false, record: { state: 'done' } }, 'its outcome is stored')
  const big = await store.claim('big', 'h', 60_000)
  if (!big.won) throw new Error('unreachable')
  await store.complete('big', big.token, done('h', 'x'.repeat(10_000)), 60_000)
  t.ok((await store.claim('big', 'h', 60_000)).won, 'an answer over the byte bound is not kept')
  const small = new MemoryIdempotencyStore({ maxKeys: 10, maxBytes: 4096 })
  await small.claim('gone', 'h', 20)
  await new Promise(resolve => setTimeout(resolve, 60))
  await small.purgeAll()
  t.equal(small.size, 0, 'purge drops lapsed claims')
})

// One LRU for all tenants: one tenant's keyed calls evicted every other tenant's outcomes, whose
// retries then ran their mutations again. Past a bound, the tenant holding the most gives one up.
t.test('the memory store is shared fairly: past a bound, the tenant holding the most keys or bytes gives up its oldest', async t => {
  const complete = async (store: MemoryIdempotencyStore, key: string, body = '{"id":"1"}'): Promise<void> => {
    const claim = await store.claim(key, 'h', 60_000)
    if (!claim.won) throw new Error('unreachable')
    await store.complete(key, claim.token, done('h', body), 60_000)
  }
  const held = async (store: MemoryIdempotencyStore, key: string): Promise<boolean> => store.peek(key)?.record.state === 'done'

  let evictions = 0
  const byKeys = new MemoryIdempotencyStore({ maxKeys: 4, maxBytes: 1 << 20, onEvict: () => { evictions++ } })
  const b = storeKey('tenant-b', 'createItem', 'order-42')
  await complete(byKeys, b)
  const a = (i: number): string => storeKey('tenant-a', 'deleteItem', 'junk-' + i)
  for (let i = 0; i < 20; i++) await complete(byKeys, a(i))
  t.ok(await held(byKeys, b), 'A\'s flood does not evict B\'s outcome')
  t.equal(byKeys.size, 4)
  t.same(await Promise.all([17, 18, 19].map(async i => await held(byKeys, a(i)))), [true, true, true], 'A keeps its latest')
  t.notOk(await held(byKeys, a(16)), 'A\'s oldest go first')
  t.equal(evictions, 17)
  // C arrives: A, holding the most, gives up its oldest, never B or C.
  const c = storeKey('tenant-c', 'createItem', 'k')
  await complete(byKeys, c)
  t.ok(await held(byKeys, b))
  t.ok(await held(byKeys, c))
  t.notOk(await held(byKeys, a(17)), 'A\'s oldest went for C\'s')
  // B adds a second: B and A hold 2 each, and the tie goes to B, whose own oldest goes.
  const b2 = storeKey('tenant-b', 'createItem', 'order-43')
  await complete(byKeys, b2)
  t.notOk(await held(byKeys, b), 'B\'s own traffic evicts its oldest when it holds as many as any')
  t.same(await Promise.all([a(18), a(19), c, b2].map(async k => await held(byKeys, k))), [true, true, true, true])
  // D arrives: A, holding the most, gives up its oldest.
  const d = storeKey('tenant-d', 'createItem', 'k')
  await complete(byKeys, d)
  t.same(await Promise.all([a(18), a(19), c, b2, d].map(async k => await held(byKeys, k))), [false, true, true, true, true])
  t.equal(evictions, 20)

  // The byte bound: A's large answers never push out B's small one.
  const byBytes = new MemoryIdempotencyStore({ maxKeys: 1000, maxBytes: 8192 })
  await complete(byBytes, b)
  for (let i = 0; i < 20; i++) await complete(byBytes, a(i), '"' + 'x'.repeat(1500) + '"')
  t.ok(await held(byBytes, b), 'A\'s large answers do not evict B\'s')
  t.ok(await held(byBytes, a(19)), 'A keeps its latest')
  t.notOk(await held(byBytes, a(0)), 'A\'s oldest go first')
  t.equal(byBytes.size, 1 + 5, 'A holds what fits beside B\'s outcome (5 of some 1.6 KB in 8 KB)')
  // One tenant alone holds the most by bytes with its single answer: that answer is the one that goes.
  const lone = new MemoryIdempotencyStore({ maxKeys: 1000, maxBytes: 8192 })
  for (let i = 0; i < 4; i++) await complete(lone, a(i), '"' + 'x'.repeat(1000) + '"')
  const big = storeKey('tenant-b', 'createItem', 'big')
  await complete(lone, big, '"' + 'x'.repeat(6000) + '"')
  t.notOk(await held(lone, big), 'a tenant holding the most gives up its own answer')
  t.same(await Promise.all([0, 1, 2, 3].map(async i => await held(lone, a(i)))), [true, true, true, true], 'not another tenant\'s')
})

t.test('the fair LRU: an entry that would not stay takes nothing with it; expired entries go before live ones', async t => {
  // B holds 60 of 64 bytes in 1-byte entries; A's 40 would stay only with B under 24, less than
  // A then: it goes, and B keeps all of its (before: B gave up 21, and A's was not kept either).
  let evicted = 0
  const lru = new FairLru<number>(1000, 64, () => { evicted++ })
  for (let i = 0; i < 60; i++) lru.set('b' + i, 'B', i, 1, 60_000)
  t.notOk(lru.set('a', 'A', 0, 40, 60_000), 'A\'s entry is not kept (counted as an eviction: a repeat runs again)')
  t.same([lru.held('B').count, evicted], [60, 1], 'and nothing else was evicted for it')
  // One that stays once B gives up some: B's oldest go, down to A's.
  t.ok(lru.set('a', 'A', 0, 30, 60_000))
  t.same([lru.held('B').count, lru.held('A').count, evicted], [34, 1, 27])
  t.same(lru.check(), [])
  // Both bounds full: the count bound's victim is another tenant's, and the bytes it frees count
  // (the new entry was refused as if they did not).
  const both = new FairLru<number>(3, 64)
  for (const tenant of ['a', 'b', 'c']) both.set(tenant, tenant, 0, 20, 60_000)
  t.ok(both.set('d', 'd', 0, 22, 60_000), 'd\'s entry is kept')
  t.same(['a', 'b', 'c', 'd'].map(k => both.has(k)), [false, true, true, true], 'a\'s went, to the count bound')
  t.same(lru.check(), [])

  // X's two entries expired: Y's three live ones fill the bound, and X's dead ones go first.
  const ttl = new FairLru<number>(4, 1 << 20, () => { evicted++ })
  evicted = 0
  ttl.set('x1', 'X', 1, 1, 20)
  ttl.set('x2', 'X', 2, 1, 20)
  await new Promise(resolve => setTimeout(resolve, 60))
  for (let i = 0; i < 3; i++) ttl.set('y' + i, 'Y', i, 1, 60_000)
  t.same([0, 1, 2].map(i => ttl.has('y' + i)), [true, true, true], 'Y\'s live entries stay')
  t.same([ttl.size, ttl.held('X').count, evicted], [3, 0, 0], 'the expired ones went, not counted as evictions')
  t.same(ttl.check(), [])
})

// The response cache keeps each operation's answers for its own time: an answer that expired
// behind a live one of a longer-lived operation still counted toward its tenant's share, and a
// bound then took that tenant's (or another's) live entry while the dead one stayed.
t.test('the fair LRU: an expired entry set after a longer-lived one goes before any live entry', async t => {
  let evicted = 0
  const byCount = new FairLru<number>(3, 1 << 20, () => { evicted++ })
  byCount.set('long', 'A', 0, 1, 60_000)
  byCount.set('short', 'A', 1, 1, 0) // expired as soon as set
  byCount.set('b0', 'B', 0, 1, 60_000)
  byCount.set('a1', 'A', 2, 1, 60_000)
  t.same([byCount.has('long'), byCount.has('b0'), byCount.has('a1'), evicted], [true, true, true, 0], 'past the count bound, the expired entry went, no live one')
  t.same(byCount.check(), [])
  const byBytes = new FairLru<number>(1000, 100, () => { evicted++ })
  byBytes.set('long', 'A', 0, 30, 60_000)
  for (let i = 0; i < 3; i++) byBytes.set('short' + i, 'A', i, 20, 0)
  byBytes.set('b0', 'B', 0, 40, 60_000)
  t.same([byBytes.has('long'), byBytes.has('b0'), byBytes.held('A'), evicted], [true, true, { count: 1, bytes: 30 }, 0], 'past the byte bound, the same')
  t.same(byBytes.check(), [])
  // Many of them, behind a live one: dropped a bounded number at a time, each set making room.
  const many = new FairLru<number>(1000, 1 << 20, () => { evicted++ })
  many.set('long', 'A', 0, 1, 60_000)
  for (let i = 0; i < 999; i++) many.set('x' + i, 'A', i, 1, 0)
  for (let i = 0; i < 100; i++) many.set('y' + i, 'B', i, 1, 60_000)
  t.same([many.has('long'), many.held('B').count, evicted], [true, 100, 0], 'no live entry went for 100 sets at the bound')
  t.ok(many.size < 1000, `expired entries went ahead of need (${many.size} held)`)
  t.same(many.check(), [])
  // One TTL for all (the idempotency store's) or none (the rate limiter's): in the order they were set.
  const same = new FairLru<number>(2, 1 << 20, () => { evicted++ })
  evicted = 0
  same.set('i0', 'A', 0, 1, Infinity)
  same.set('i1', 'A', 1, 1, Infinity)
  same.set('i2', 'A', 2, 1, Infinity)
  t.same([same.has('i0'), same.has('i1'), same.has('i2'), evicted], [false, true, true, 1], 'the oldest goes past the bound')
  t.same(same.check(), [])
  // Mixed TTLs at random: the indexes stay true, and no bound takes a live entry while an expired one is held.
  let seed = 7
  const random = (n: number): number => { seed = (seed * 1103515245 + 12345) % 2 ** 31; return seed % n }
  const dead = new Set<string>()
  const wrong: string[] = []
  // (The entry being set is not one: ttl 0 here has it expire as soon as it is set.)
  let setting = ''
  const mixed = new FairLru<number>(20, 2000, key => {
    if (!dead.has(key) && [...mixed.items()].some(([k]) => k !== setting && dead.has(k))) wrong.push(`${key} evicted beside an expired entry`)
  })
  for (let i = 0; i < 3000 && wrong.length === 0; i++) {
    const key = 'k' + random(60)
    const op = random(10)
    if (op < 7) {
      const ttl = [0, 60_000, Infinity][random(3)]
      setting = key
      mixed.set(key, 't' + random(3), i, 20 + random(200), ttl)
      if (ttl === 0) dead.add(key)
      else dead.delete(key)
    } else if (op < 8) mixed.get(key)
    else if (op < 9) mixed.delete(key)
    else mixed.purgeStale(random(30))
    wrong.push(...mixed.check().map(w => `after op ${i}: ${w}`))
  }
  t.same(wrong, [], 'mixed TTLs')
})

t.test('the fair LRU keeps its indexes true under random traffic', async t => {
  let seed = 42
  const random = (n: number): number => { seed = (seed * 1103515245 + 12345) % 2 ** 31; return seed % n }
  for (const [maxEntries, maxBytes] of [[10, 1 << 20], [1000, 3000], [20, 2000]]) {
    let evicted = 0
    const lru = new FairLru<number>(maxEntries, maxBytes, () => { evicted++ })
    const wrong: string[] = []
    for (let i = 0; i < 5000; i++) {
      const key = 'k' + random(60)
      const op = random(10)
      if (op < 6) {
        const tenant = 't' + random(random(2) === 0 ? 2 : 8)
        const before = lru.held(tenant).count
        const others = lru.size - before
        lru.set(key, tenant, i, 50 + random(400), 60_000)
        if (lru.size - lru.held(tenant).count > others) wrong.push(`set ${i}: other tenants grew`)
      } else if (op < 8) lru.get(key)
      else lru.delete(key)
      wrong.push(...lru.check().map(w => `after op ${i}: ${w}`))
      if (wrong.length > 0) break
    }
    t.same(wrong, [], `${maxEntries} entries, ${maxBytes} bytes`)
    t.ok(evicted > 0, 'the bounds were reached')
  }
  // Expiry and purge keep them true too, and a tenant goes with its last entry.
  const lru = new FairLru<number>(10, 1000)
  lru.set('a', 'x', 1, 100, 20)
  lru.set('b', 'y', 2, 100, 60_000)
  await new Promise(resolve => setTimeout(resolve, 60))
  t.equal(lru.get('a'), undefined)
  t.same(lru.held('x'), { count: 0, bytes: 0 })
  lru.set('c', 'x', 3, 100, 20)
  await new Promise(resolve => setTimeout(resolve, 60))
  lru.purgeStale()
  t.equal(lru.size, 1)
  t.same(lru.check(), [])
  t.notOk(lru.set('d', 'x', 4, 1001, 60_000), 'an entry over the byte bound is not kept')
  t.same(lru.check(), [])
})

// One walk over every entry held the event loop, and so every request, for some 100 ms at
// 100,000 entries (a set at the bound after a quiet spell, a metrics scrape): expired entries now
// go a bounded number at a time, still before any live one.
t.test('the fair LRU drops expired entries a bounded number at a time, before any live one', async t => {
  let evicted = 0
  const lru = new FairLru<number>(10_000, 20_000, () => { evicted++ })
  for (let i = 0; i < 10_000; i++) lru.set('x' + i, 'X', i, 1, 0) // expired as soon as set
  lru.set('y0', 'Y', 0, 1, 60_000)
  const dropped = 10_000 - lru.held('X').count
  t.ok(dropped >= 1 && dropped <= 100, `a set at the count bound dropped ${dropped} expired entries, not all 10,000`)
  for (let i = 1; i < 100; i++) lru.set('y' + i, 'Y', i, 1, 60_000)
  t.same([lru.held('Y').count, evicted], [100, 0], 'no live entry went for the sets that followed')
  // Past the byte bound, as many expired entries go as make room (here 5,000 bytes' worth).
  lru.set('big', 'Z', 0, 20_000 - lru.bytes + 5000, 60_000)
  t.same([lru.has('big'), lru.held('Y').count, evicted], [true, 100, 0], 'a large entry took expired ones\' room, no live one\'s')
  t.same(lru.check(), [])
  // purgeStale looks at one slice; purgeAllStale at all, a slice at a time, one pass for callers at once.
  const before = lru.size
  t.notOk(lru.purgeStale(100), 'a slice of 100 does not end a pass')
  t.ok(before - lru.size <= 100, `it dropped ${before - lru.size}`)
  await Promise.all([lru.purgeAllStale(), lru.purgeAllStale()])
  t.same([lru.held('X').count, lru.held('Y').count, lru.has('big')], [0, 100, true], 'every expired entry went, every live one stayed')
  t.same(lru.check(), [])
  // The idempotency store's gauge purges the whole store (more outcomes than one slice).
  const store = new MemoryIdempotencyStore({ maxKeys: 20_000, maxBytes: 1 << 30 })
  for (let i = 0; i < 10_000; i++) {
    const key = storeKey('t', 'op', 'k' + i)
    const claim = await store.claim(key, 'h', 60_000)
    if (claim.won) await store.complete(key, claim.token, done('h'), i % 10 === 0 ? 60_000 : 0)
  }
  await store.purgeAll()
  t.equal(store.size, 1000, 'the 9,000 expired outcomes went, the 1,000 live ones stayed')
})

// A metrics scrape waited for a whole pass over the entries: seconds at a million (10 s under
// load, Prometheus' timeout, and every metric of the instance lost with it). A scrape now looks
// at SCRAPE_SLICES slices at most, and the next goes on from there.
t.test('a metrics scrape\'s purge looks at a bounded number of entries, the next going on from there', async t => {
  const lru = new FairLru<number>(200_000, 1 << 30, () => {})
  const n = SCRAPE_SLICES * PURGE_SLICE + 30_000
  for (let i = 0; i < n; i++) lru.set('x' + i, 'X', i, 1, 0) // expired as soon as set
  await lru.purgeAllStale(SCRAPE_SLICES)
  t.equal(n - lru.size, SCRAPE_SLICES * PURGE_SLICE, 'one scrape dropped the entries of its slices, no more')
  await lru.purgeAllStale(SCRAPE_SLICES)
  t.equal(lru.size, 0, 'the next scrape went on where it stopped, to the end')
  t.same(lru.check(), [])
})

t.test('store keys name their tenant', async t => {
  t.equal(tenantOfKey(storeKey('a:b', 'op', 'k:1')), 'a%3Ab')
  t.not(tenantOfKey(storeKey('a', 'op', 'k')), tenantOfKey(storeKey('ab', 'op', 'k')))
  t.equal(tenantOfKey('other'), '')
})

// lru-cache given a `max` allocates its arrays for that many entries at once: the store took
// some 5 MB at the default bound and 500 MB at BFF_IDEMPOTENCY_MAX_KEYS=10000000 before its
// first key, in every instance (with Redis up too, as its fallback).
t.test('the memory store takes memory as keys come, not for its whole bound at start-up', async t => {
  const taken = (): number => { const m = process.memoryUsage(); return m.heapUsed + m.arrayBuffers }
  const before = taken()
  const store = new MemoryIdempotencyStore({ maxKeys: 2_000_000, maxBytes: 64 << 20 })
  const claim = await store.claim('k', 'h', 60_000)
  if (!claim.won) throw new Error('unreachable')
  await store.complete('k', claim.token, done('h'), 60_000)
  // 2 million preallocated entries took about 100 MB; one key takes bytes.
  t.ok(taken() - before < 20 << 20, `${Math.round((taken() - before) / 1e6)} MB for one key`)
  t.equal(store.size, 1)
})

t.test('store keys: the tenant is encoded, so no tenant spells another tenant\'s key', async t => {
  t.equal(storeKey('acme', 'createItem', 'k1'), 'bff:idem:acme:createItem:k1')
  t.not(storeKey('a:createItem', 'x', 'k'), storeKey('a', 'createItem', 'x:k'))
  t.equal(storeKey('a:b', 'op', 'k'), 'bff:idem:a%3Ab:op:k')
})

t.test('the input hash is canonical', async t => {
  t.equal(inputHash({ a: 1, b: [1, { c: 2, d: 3 }] }), inputHash({ b: [1, { d: 3, c: 2 }], a: 1 }))
  t.not(inputHash({ a: 1 }), inputHash({ a: '1' }))
})

t.test('decode accepts the records the stores write and refuses anything else', async t => {
  const running = { state: 'running', hash: 'h', token: 't' }
  t.same(decode(JSON.stringify(running)), running)
  t.same(decode(JSON.stringify(done('h'))), done('h'))
  const refused = { state: 'done', hash: 'h', status: 404, body: null, error: { code: 'NOT_FOUND', status: 404, detail: 'gone' } }
  t.same(decode(JSON.stringify(refused)), refused)
  const risky = { ...done('h'), risk: 'high', findings: [{ category: 'injection', type: 'ignore-instructions', score: 0.9, field: 'prompt' }] }
  t.same(decode(JSON.stringify(risky)), risky, 'with the first call\'s firewall verdict')
  t.same(decode(JSON.stringify({ ...running, user: 'u1' })), { ...running, user: 'u1' }, 'with the user a call runs for')
  t.same(decode(JSON.stringify({ ...done('h'), user: 'u1' })), { ...done('h'), user: 'u1' })
  t.throws(() => decode(JSON.stringify({ ...done('h'), user: 7 })), { name: 'UnreadableRecordError' }, 'a user that is no string')
  for (const bad of ['not json', 'null', '{}', '{"state":"running","hash":"h"}', '{"state":"done","hash":"h","status":"201","body":null,"error":null}',
    '{"state":"done","hash":"h","status":201,"body":1,"error":null}', '{"state":"done","hash":"h","status":400,"body":null,"error":{"code":"INTERNAL"}}',
    '{"state":"other","hash":"h"}', '{"state":"done","hash":"h","status":201,"body":null,"error":null,"risk":"severe","findings":[]}', '{"state":"done","hash":"h","status":201,"body":null,"error":null,"risk":"high"}',
    '{"state":"done","hash":"h","status":201,"body":null,"error":null,"risk":"high","findings":[{"category":"pii","type":"email"}]}', '{"state":"done","hash":"h","status":201,"body":"{}"}', '{"state":"done","hash":"h","status":201,"body":"{\\"id\\":","error":null}']) {
    t.throws(() => decode(bad), { name: 'UnreadableRecordError', message: 'unreadable idempotency record' }, bad)
  }
})

// One tenant's keyed mutations filled Redis: nothing bounded its records (24 h each by default),
// and with `noeviction` every tenant's claims were refused, with an LRU policy other tenants'
// outcomes were evicted and their repeats ran again.
t.test('redis store: one tenant holds at most its bound of records; expired and released ones leave the count', async t => {
  const client = new Redis(REDIS_URL, { lazyConnect: true })
  await client.connect()
  t.teardown(() => client.quit())
  const store = new RedisIdempotencyStore(client, { maxKeysPerTenant: 3 })
  const tenant = 'bound-' + randomUUID()
  const key = (k: string, who = tenant): string => storeKey(who, 'createItem', k)
  const a = await store.claim(key('a'), 'h', 60_000)
  const b = await store.claim(key('b'), 'h', 60_000)
  // 2 s: the checks below run while it still holds (300 ms had lapsed before them on a loaded machine).
  const c = await store.claim(key('c'), 'h', 2000)
  t.ok(a.won && b.won && c.won, 'three claims win')
  if (!a.won || !b.won || !c.won) throw new Error('unreachable')
  await store.complete(key('a'), a.token, done('h'), 60_000)
  const refused = await store.claim(key('d'), 'h', 60_000).then(() => null, (err: unknown) => err)
  t.type(refused, TenantFullError, 'a fourth key of the tenant is refused')
  t.ok(refused instanceof TenantFullError && refused.retryAfterMs >= 1 && refused.retryAfterMs <= 2000, 'until its first record (the 2 s claim) expires')
  t.equal(await client.get(key('d')), null, 'nothing claimed')
  t.match(await store.claim(key('a'), 'h', 60_000), { won: false, record: { state: 'done' } }, 'its stored outcomes still answer')
  t.match(await store.claim(key('b'), 'h', 60_000), { won: false, record: { state: 'running' } }, 'and its running claims')
  t.ok((await store.claim(key('d', 'other-' + randomUUID()), 'h', 60_000)).won, 'another tenant is not bounded by it')

  const { index, member } = tenantIndex(key('a'))!
  t.equal(index, 'bff:idem:' + encodeURIComponent(tenant), 'the index is in the store\'s key scheme')
  t.equal(member, 'createItem:a')
  t.same((await client.zrange(index, '0', '-1')).sort(), ['createItem:a', 'createItem:b', 'createItem:c'])
  t.teardown(() => client.del(index))
  const pttl = await client.pttl(index)
  t.ok(pttl > 2000 && pttl <= 60_000, 'the index expires with its last record')

  await store.release(key('b'), b.token)
  t.ok((await store.claim(key('d'), 'h', 60_000)).won, 'a released key leaves the count')
  t.type(await store.claim(key('e'), 'h', 60_000).then(() => null, (err: unknown) => err), TenantFullError)
  // The 2 s claim lapses (a crashed holder): its record is gone, and so is its place.
  const left = await client.pttl(key('c'))
  await new Promise(resolve => setTimeout(resolve, Math.max(0, left) + 50))
  t.ok((await store.claim(key('e'), 'h', 60_000)).won, 'a lapsed record leaves the count')
  t.same((await client.zrange(index, '0', '-1')).sort(), ['createItem:a', 'createItem:d', 'createItem:e'], 'trimmed at the claim')

  // An outcome copied from memory (seed) is kept whatever the bound: its call already ran.
  await store.seed(key('f'), done('h'), 60_000)
  t.match(await store.claim(key('f'), 'h', 60_000), { won: false, record: { state: 'done' } })
  t.equal(await client.zcard(index), 4, 'and counted')
})

t.test('configuration', async t => {
  t.throws(() => testConfig({ BFF_IDEMPOTENCY_REDIS_MAX_KEYS_PER_TENANT: '0' }), /BFF_IDEMPOTENCY_REDIS_MAX_KEYS_PER_TENANT="0" is invalid/)
  t.equal(testConfig({ BFF_IDEMPOTENCY_REDIS_MAX_KEYS_PER_TENANT: '5' }).BFF_IDEMPOTENCY_REDIS_MAX_KEYS_PER_TENANT, 5)
  t.throws(() => testConfig({ BFF_IDEMPOTENCY_STORE: 'redis' }), /BFF_IDEMPOTENCY_STORE="redis" needs REDIS_URL/)
  t.throws(() => testConfig({ BFF_IDEMPOTENCY_STORE: 'disk' }), /BFF_IDEMPOTENCY_STORE="disk" is invalid: expected memory \| redis/)
  t.throws(() => testConfig({ BFF_IDEMPOTENCY_TTL_SECONDS: 0 }), /BFF_IDEMPOTENCY_TTL_SECONDS="0" is invalid: expected an integer \(1\.\.2592000\)/)
  t.throws(() => testConfig({ BFF_IDEMPOTENCY_MAX_KEYS: 'many' }), /BFF_IDEMPOTENCY_MAX_KEYS/)
  t.throws(() => testConfig({ BFF_IDEMPOTENCY_WAIT_MS: -1 }), /BFF_IDEMPOTENCY_WAIT_MS/)
  const config = testConfig()
  t.equal(config.BFF_IDEMPOTENCY_ENABLED, true)
  t.equal(config.BFF_IDEMPOTENCY_TTL_SECONDS, 86400)
  t.equal(config.BFF_IDEMPOTENCY_STORE, undefined, 'chosen by REDIS_URL at start-up')
  t.equal(testConfig({ BFF_IDEMPOTENCY_STORE: 'memory', REDIS_URL }).BFF_IDEMPOTENCY_STORE, 'memory')
})
