// Invalidations kept while Redis is away are bounded: past the bounds they are folded into a
// coarser one (a tenant's into its tenant tag, every one into the tag of all entries), never
// lost. Before, the tags past 10,000 were dropped, and one tenant's many invalidations made
// another tenant's lost: other instances served its pre-mutation entry as a hit for its ttl.
import t from 'tap'
import { randomUUID } from 'node:crypto'
import { buildTestApp, bearer } from '../../helper.js'
import { startTcpProxy } from '../../proxy.js'
import { REDIS_URL, itemKernel, itemManifest, metric, eventually } from './items.js'
import { ResponseCache, TagClock, MemoryTier, tagKey, localKey, etagOf, policyOf, type RedisTier, type CachedAnswer } from '../../../plugins/cache/index.js'
import { ALL_TAG_KEY, tenantTagKey } from '../../../plugins/cache/keys.js'
import { MAX_PENDING_TAGS, MAX_PENDING_TAGS_PER_TENANT, MAX_PENDING_TENANTS, MAX_LATER_INVALIDATIONS } from '../../../plugins/cache/cache.js'
import { CallContext, canonicalJson } from '../../../plugins/pipeline/index.js'
import type { Operation } from '../../../manifest.js'

const REDIS_PORT = Number(new URL(REDIS_URL).port || 6379)

t.test('one tenant\'s many invalidations during a Redis outage do not make another tenant\'s lost', async t => {
  const kernel = await itemKernel(t)
  const manifest = itemManifest(kernel.url)
  const proxy = await startTcpProxy(t, REDIS_PORT)
  const app = await buildTestApp(t, { REDIS_URL: `redis://127.0.0.1:${proxy.port}`, BFF_CACHE_STORE: 'redis', BFF_IDEMPOTENCY_STORE: 'memory', BFF_RATE_LIMIT_STORE: 'memory' }, { manifest, kernelUrl: kernel.url })
  // Another instance, straight on Redis.
  const other = await buildTestApp(t, { REDIS_URL, BFF_CACHE_STORE: 'redis' }, { manifest, kernelUrl: kernel.url })
  const [noisy, victim, quiet] = ['noisy', 'victim', 'quiet'].map(n => `cache-${n}-` + randomUUID())
  const read = async (instance: typeof app, tenant: string, id: string): Promise<{ cache: unknown, n: number }> => {
    const res = await instance.inject({ method: 'GET', url: `/api/v1/items/${id}`, headers: bearer({ tenant }) })
    return { cache: res.headers['x-cache'], n: res.json().n }
  }
  const before: Record<string, number> = {}
  for (const tenant of [noisy, victim, quiet]) {
    const first = await read(app, tenant, 'a')
    t.equal(first.cache, 'miss')
    before[tenant] = first.n
    t.same(await read(other, tenant, 'a'), { cache: 'hit', n: first.n }, 'shared through Redis')
  }

  proxy.cut('reset')
  await eventually(async () => !app.redis.up(), 'the connection to drop')
  // The noisy tenant invalidates as many distinct tags as the pending set holds.
  for (let i = 0; i < MAX_PENDING_TAGS; i += 100) {
    await app.responseCache.cache.invalidate(noisy, Array.from({ length: 100 }, (_, j) => `item:x${i + j}`), 'mutation')
  }
  // Then the victim changes its item a.
  t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/items/a', headers: bearer({ tenant: victim }), payload: {} })).statusCode, 200)
  t.equal(await metric(app, 'mantle_cache_pending_invalidations'), 2, 'the noisy tenant\'s folded into its tenant tag, the victim\'s tag kept')
  t.equal((await read(app, victim, 'a')).cache, 'miss', 'dropped at once on this instance')

  proxy.restore()
  await eventually(async () => app.redis.up() && app.responseCache.cache.pendingInvalidations === 0, 'the replay', 10000)
  const key = localKey('getItem', victim, canonicalJson({ id: 'a' }))
  await eventually(async () => other.responseCache.cache.memory.get(key) === undefined, 'the other instance to drop the victim\'s entry', 3000)
  const after = await read(other, victim, 'a')
  t.equal(after.cache, 'miss', 'the other instance does not serve the victim\'s old entry')
  t.not(after.n, before[victim])
  const folded = await read(other, noisy, 'a')
  t.equal(folded.cache, 'miss', 'the fold dropped every entry of the noisy tenant, on the other instance and in Redis')
  t.not(folded.n, before[noisy])
  t.same(await read(other, quiet, 'a'), { cache: 'hit', n: before[quiet] }, 'a tenant that invalidated nothing keeps its entries')
})

/** A Redis tier that fails while `down`, and records what each invalidation that reached it sent. */
function tierStandIn (): { tier: RedisTier, sent: string[][], setDown: (d: boolean) => void } {
  let down = false
  const sent: string[][] = []
  const tier = {
    read: async () => { if (down) throw new Error('Connection is closed.'); return { answer: null, versions: '1' } },
    write: async () => { if (down) throw new Error('Connection is closed.'); return true },
    invalidate: async (keys: string[]) => { if (down) throw new Error('Connection is closed.'); sent.push([...keys]) }
  } as unknown as RedisTier
  return { tier, sent, setDown: d => { down = d } }
}

function cacheOver (t: { teardown: (fn: () => unknown) => void }, tier: RedisTier, warnings: string[] = []): ResponseCache {
  const cache = new ResponseCache({ redis: { tier, up: () => true }, maxSize: 100, maxBytes: 1 << 20, defaultTtlSeconds: 60, breakerOpen: () => false, serializer: () => JSON.stringify, instanceId: 'one', log: { warn: (_o, m) => warnings.push(m), debug: () => {} } })
  t.teardown(() => cache.close())
  return cache
}

const tags = (n: number, prefix = 'item:'): string[] => Array.from({ length: n }, (_, i) => prefix + i)

t.test('folding: a tenant past its share becomes its tenant tag; past the tenants\' bound, every one becomes the tag of all', async t => {
  const { tier, sent, setDown } = tierStandIn()
  const warnings: string[] = []
  const cache = cacheOver(t, tier, warnings)
  setDown(true)
  await cache.invalidate('b', ['item:1'], 'mutation')
  await cache.invalidate('a', tags(MAX_PENDING_TAGS_PER_TENANT), 'mutation')
  t.equal(cache.pendingInvalidations, 1 + MAX_PENDING_TAGS_PER_TENANT, 'within its share, tag by tag')
  await cache.invalidate('a', ['item:more'], 'mutation')
  t.equal(cache.pendingInvalidations, 2, 'past it, a\'s tags are one: its tenant tag')
  await cache.invalidate('a', ['item:again'], 'mutation')
  t.equal(cache.pendingInvalidations, 2, 'what follows of a is covered by the fold')
  t.equal(warnings.filter(w => w.includes('all of the tenant')).length, 1, 'said once')
  // Many tenants within their share fill the set: the one that overflows it is folded.
  for (let i = 0; i < MAX_PENDING_TAGS / 100; i++) await cache.invalidate(`t${i}`, tags(100), 'mutation')
  t.ok(cache.pendingInvalidations <= MAX_PENDING_TAGS + 2, 'bounded')
  setDown(false)
  await cache.replayPending()
  t.equal(cache.pendingInvalidations, 0)
  const replayed = new Set(sent.flat())
  t.ok(replayed.has(tenantTagKey('a')), 'a\'s tenant tag is replayed')
  t.notOk(replayed.has(tagKey('a', 'item:0')), 'not its tags one by one')
  t.ok(replayed.has(tagKey('b', 'item:1')), 'b\'s tag is not lost')
  const covered = Array.from({ length: MAX_PENDING_TAGS / 100 }, (_, i) => replayed.has(tenantTagKey(`t${i}`)) || tags(100).every(g => replayed.has(tagKey(`t${i}`, g))))
  t.notOk(covered.includes(false), 'every other tenant\'s invalidations are replayed, folded or not')
  t.ok(replayed.has(tenantTagKey('t99')), 'the one that overflowed the set is folded')

  // Past MAX_PENDING_TENANTS tenant tags, everything folds into the tag of all entries.
  sent.length = 0
  setDown(true)
  await cache.invalidate('c', ['item:1'], 'mutation')
  // Once the set is full, each new tenant's first tag is folded into its tenant tag, until there
  // are as many tenant tags as the bound allows.
  for (let i = 0; i < MAX_PENDING_TAGS / MAX_PENDING_TAGS_PER_TENANT; i++) await cache.invalidate(`v${i}`, tags(MAX_PENDING_TAGS_PER_TENANT), 'mutation')
  let most = 0
  for (let i = 0; i < MAX_PENDING_TAGS + MAX_PENDING_TENANTS; i++) {
    await cache.invalidate(`u${i}`, ['item:1'], 'mutation')
    most = Math.max(most, cache.pendingInvalidations)
  }
  t.equal(most, MAX_PENDING_TAGS + MAX_PENDING_TENANTS, 'tags and tenant tags, each within its bound')
  t.equal(cache.pendingInvalidations, 1, 'one tag: of all entries')
  await cache.invalidate('d', ['item:1'], 'mutation')
  t.equal(cache.pendingInvalidations, 1, 'what follows is covered by it')
  setDown(false)
  await cache.replayPending()
  t.same(sent, [[ALL_TAG_KEY]], 'replayed as the tag of all entries')
})

t.test('folding: a read of a folded tenant does not use what Redis holds until the fold reaches it', async t => {
  const op = { name: 'getItem', cache: { ttlSeconds: 60, swrSeconds: 0, tags: ['item:{id}'] }, invalidates: [] } as unknown as Operation
  const json = '{"n":1}'
  const old: CachedAnswer = { value: { n: 1 }, json, status: 200, etag: etagOf(json), freshUntil: Date.now() + 60_000, staleUntil: Date.now() + 60_000, keepUntil: Date.now() + 60_000, policy: policyOf(op, op.cache!) }
  const seen: string[][] = []
  // Redis holds the old entry, and takes no invalidation (the replay stays pending).
  const tier = { read: async (_k: string, tagKeys: string[]) => { seen.push(tagKeys); return { answer: old, versions: '1' } }, write: async () => true, invalidate: async () => { throw new Error('Connection is closed.') } } as unknown as RedisTier
  const cache = cacheOver(t, tier)
  const stage = cache.stage(op)!
  const read = async (tenant: string): Promise<[unknown, string | null]> => {
    const ctx = new CallContext('r', 'rest', op, { id: 'z' }, undefined, undefined, undefined)
    ctx.tenant = tenant
    const value = await stage(ctx, async () => ({ n: 2 }))
    return [value, ctx.cache]
  }
  await cache.invalidate('a', tags(MAX_PENDING_TAGS_PER_TENANT + 1), 'mutation')
  t.equal(cache.pendingInvalidations, 1, 'folded into a\'s tenant tag')
  cache.redisAnswers() // the hold ends: reads go to Redis again
  t.same(await read('a'), [{ n: 2 }, 'miss'], 'the old entry Redis holds for a is not served')
  t.same(seen[0], [tagKey('a', 'item:z'), tenantTagKey('a'), ALL_TAG_KEY], 'an entry in Redis is read under its tags, its tenant\'s and the tag of all')
  t.same(await read('b'), [{ n: 1 }, 'hit'], 'another tenant\'s is')
})

t.test('the tag clock: a tenant tag drops every entry of its tenant, the tag of all every entry', async t => {
  const tier = new MemoryTier(10, 1_000_000, () => 0)
  const clock: TagClock = tier.clock
  const since = clock.now()
  clock.invalidate([tagKey('a', 'x')])
  const later = clock.now()
  clock.invalidate([tenantTagKey('a')])
  for (const s of [since, later]) {
    t.notOk(clock.valid([tagKey('a', 'x')], s), 'a marked tag of the tenant')
    t.notOk(clock.valid([tagKey('a', 'y')], s), 'an unmarked one')
  }
  t.ok(clock.valid([tagKey('b', 'x')], since), 'another tenant\'s')
  t.ok(clock.valid([tagKey('ab', 'x')], since), 'a tenant whose id begins as this one\'s')
  t.ok(clock.valid([tagKey('a', 'x')], clock.now()), 'stored after it')
  const now = clock.now()
  clock.invalidate([tagKey('a', 'x')])
  t.notOk(clock.valid([tagKey('a', 'x')], now), 'a tag invalidated after the fold')
  t.ok(clock.valid([tagKey('a', 'y')], now), 'another tag of the tenant stored after the fold')
  clock.invalidate([ALL_TAG_KEY])
  t.notOk(clock.valid([tagKey('b', 'x')], now), 'the tag of all drops every tenant\'s entries')
  t.ok(clock.valid([tagKey('b', 'x')], clock.now()))
})

t.test('second invalidations past their bound are folded, never carried out sooner than their time', async t => {
  const { tier, sent } = tierStandIn()
  const cache = cacheOver(t, tier)
  cache.invalidateLater('b', ['item:1'], 60_000)
  for (let i = 0; i < MAX_LATER_INVALIDATIONS; i++) cache.invalidateLater('a', [`item:${i}`], 60_000)
  t.equal(sent.length, 0, 'none carried out early')
  t.equal(cache.laterInvalidations, 2, 'a\'s folded into one of its tenant tag; b\'s kept')
  // Every tenant with one: all are folded into one of the tag of all entries.
  for (let i = 0; i < MAX_LATER_INVALIDATIONS; i++) cache.invalidateLater(`t${i}`, ['item:1'], 60_000)
  t.equal(sent.length, 0, 'none carried out early')
  t.ok(cache.laterInvalidations <= MAX_LATER_INVALIDATIONS, 'bounded')
  await cache.close()
  const done = new Set(sent.flat())
  t.ok(done.has(tagKey('b', 'item:1')) || done.has(tenantTagKey('b')) || done.has(ALL_TAG_KEY), 'b\'s is carried out')
  t.ok(done.has(tenantTagKey('a')) || done.has(ALL_TAG_KEY), 'a\'s, folded')
})

t.test('a folded second invalidation waits for the latest of the times folded', async t => {
  const { tier, sent } = tierStandIn()
  const cache = cacheOver(t, tier)
  for (let i = 0; i < MAX_LATER_INVALIDATIONS; i++) cache.invalidateLater('a', [`item:${i}`], i === 0 ? 60_000 : 10)
  cache.invalidateLater('a', ['item:last'], 10) // past the bound: a's are folded, at the latest time
  t.equal(cache.laterInvalidations, 1)
  await new Promise(resolve => setTimeout(resolve, 200))
  t.same(sent, [], 'not at the earliest of them')
  await cache.close()
  t.same(sent, [[tenantTagKey('a')]], 'carried out at close')
})
