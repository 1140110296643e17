// The response cache through the whole gateway, for both stores (memory, and Redis in front of
// the machine's real Redis). Each test uses tenants of its own, so runs never share entries.
import t from 'tap'
import { randomUUID } from 'node:crypto'
import { WebSocket } from 'ws'
import { buildTestApp, bearer, json, until } from '../../helper.js'
import { redisVia, startTcpProxy } from '../../proxy.js'
import { REDIS_URL, STORES, itemKernel, itemManifest, metric, eventually, versionedItem } from './items.js'
import { localKey, tagKey } from '../../../plugins/cache/index.js'
import { canonicalJson } from '../../../plugins/pipeline/index.js'

const tenant = (): string => 'cache-' + randomUUID()

for (const { store, env } of STORES) {
  t.test(`${store}: a miss, then hits with ETag and Cache-Control, 304 on If-None-Match; undeclared fields stay out`, async t => {
    const kernel = await itemKernel(t)
    let now = Date.now()
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url, cacheClock: () => now })
    const headers = bearer({ tenant: tenant() })
    const first = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    t.equal(first.statusCode, 200)
    t.equal(first.headers['x-cache'], 'miss')
    t.equal(first.headers['cache-control'], 'private, max-age=10')
    t.equal(first.headers.vary, 'authorization', 'a browser reuses it only for the same token')
    t.match(first.headers.etag, /^W\/"[A-Za-z0-9_-]+"$/)
    t.same(first.json(), { id: 'a', n: 1, tenant: first.json().tenant })
    now += 4000
    const second = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    t.equal(second.headers['x-cache'], 'hit')
    t.equal(second.headers['cache-control'], 'private, max-age=6', 'the remaining freshness')
    t.equal(second.headers.etag, first.headers.etag)
    t.equal(second.body, first.body)
    t.equal(kernel.reads(), 1, 'one Kernel call')
    const notModified = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: { ...headers, 'if-none-match': `"other", ${String(first.headers.etag).slice(2)}` } })
    t.equal(notModified.statusCode, 304)
    t.equal(notModified.body, '')
    t.equal(notModified.headers.etag, first.headers.etag)
    t.equal(notModified.headers['x-cache'], 'hit')
    t.equal(notModified.headers.vary, first.headers.vary, 'the Vary of its 200: a small answer, no Accept-Encoding, compressed by no one')
    const star = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: { ...headers, 'if-none-match': '*' } })
    t.equal(star.statusCode, 304)
    const changed = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: { ...headers, 'if-none-match': '"stale-tag"' } })
    t.equal(changed.statusCode, 200)
    t.equal(changed.body, first.body)
    // The same input in another key order is the same entry; another input is not.
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a?q=x', headers })).headers['x-cache'], 'miss')
    t.equal(kernel.reads(), 2)
    // Ops without cache are not touched by it.
    const plain = await app.inject({ method: 'GET', url: '/api/v1/plain/a', headers: { ...headers, 'if-none-match': '*' } })
    t.equal(plain.statusCode, 200)
    t.equal(plain.headers['x-cache'], undefined)
    t.equal(plain.headers.etag, undefined)
    t.equal(plain.headers.vary, undefined)
    t.equal(await metric(app, 'mantle_cache_requests_total', { op: 'getItem', outcome: 'hit' }), 4)
    t.equal(await metric(app, 'mantle_cache_requests_total', { op: 'getItem', outcome: 'miss' }), 2)
    t.equal(await metric(app, 'mantle_cache_memory_entries'), 2)
  })

  // An entry's freshness is a time of day (instances share it through Redis), so a wall clock
  // stepped back an hour (an NTP correction) left an entry made before the step fresh for an hour
  // more by the clock: a hit then answered max-age=3606 for an op of a 10 s ttl, and a browser
  // kept it an hour. The max-age a hit says is at most the op's ttl.
  t.test(`${store}: a wall clock stepped back never makes a hit's max-age longer than the ttl`, async t => {
    const kernel = await itemKernel(t)
    let now = Date.now()
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url, cacheClock: () => now })
    const headers = bearer({ tenant: tenant() })
    const first = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    t.equal(first.headers['cache-control'], 'private, max-age=10')
    now += 4000 - 3_600_000
    const hit = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    t.equal(hit.headers['x-cache'], 'hit')
    t.equal(hit.headers['cache-control'], 'private, max-age=10', 'the ttl at most')
  })

  t.test(`${store}: a tenant never receives another tenant's entry`, async t => {
    const kernel = await itemKernel(t)
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
    const one = tenant()
    const two = tenant()
    const a1 = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: bearer({ tenant: one }) })
    const a2 = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: bearer({ tenant: two }) })
    t.equal(a1.json().tenant, one)
    t.equal(a2.json().tenant, two)
    t.equal(a2.headers['x-cache'], 'miss')
    t.equal(kernel.reads(), 2)
    // A tenant whose name holds the separator cannot reach into another key either.
    const tricky = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: bearer({ tenant: `${one}:x` }) })
    t.equal(tricky.headers['x-cache'], 'miss')
    t.equal(tricky.json().tenant, `${one}:x`)
    // An invalidation of one tenant's tag leaves the other's entries.
    t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/items/a', headers: bearer({ tenant: one }), payload: {} })).statusCode, 200)
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: bearer({ tenant: two }) })).headers['x-cache'], 'hit')
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: bearer({ tenant: one }) })).headers['x-cache'], 'miss')
  })

  t.test(`${store}: an op cached per user: each user of a tenant has entries of their own, and the tenant's tags drop them all`, async t => {
    const kernel = await itemKernel(t)
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
    const who = tenant()
    const as = (user: string) => bearer({ tenant: who, user })
    const mine = async (user: string) => await app.inject({ method: 'GET', url: '/api/v1/mine/a', headers: as(user) })
    const ann = await mine('ann')
    const bob = await mine('bob')
    t.same([ann.headers['x-cache'], ann.json().user, bob.headers['x-cache'], bob.json().user], ['miss', 'ann', 'miss', 'bob'], 'bob does not get ann\'s answer')
    t.same([(await mine('ann')).body, (await mine('bob')).body], [ann.body, bob.body], 'each gets their own, from the cache')
    t.equal(kernel.reads(), 2)
    const tricky = await mine('ann:a')
    t.same([tricky.headers['x-cache'], tricky.json().user], ['miss', 'ann:a'], 'a user whose name holds the separator has a key of their own')
    // The Kernel is told the roles too (x-user-roles): the same user under a token with other
    // roles gets an entry of their own (keyed by the user alone, the answer made for the first
    // token's roles was served to the second); the same roles in another order share one.
    const roles = async (list: string[]) => await app.inject({ method: 'GET', url: '/api/v1/mine/a', headers: bearer({ tenant: who, user: 'cy', roles: list }) })
    const admin = await roles(['viewer', 'system'])
    const viewer = await roles(['viewer'])
    t.same([admin.headers['x-cache'], viewer.headers['x-cache']], ['miss', 'miss'], 'fewer roles: not the answer made for more')
    t.notSame(viewer.json().n, admin.json().n)
    t.equal((await roles(['system', 'viewer'])).headers['x-cache'], 'hit', 'the same roles in another order')
    // An op shared by the tenant still is.
    await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: as('ann') })
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: as('bob') })).headers['x-cache'], 'hit')
    // A mutation by one user drops the tag for every user of the tenant.
    t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/items/a', headers: as('ann'), payload: {} })).statusCode, 200)
    t.equal((await mine('bob')).headers['x-cache'], 'miss')
    t.equal((await roles(['viewer'])).headers['x-cache'], 'miss', 'every role set\'s entries dropped')
  })

  t.test(`${store}: 100 concurrent cold reads of one key make exactly one Kernel call`, async t => {
    const kernel = await itemKernel(t)
    let release!: () => void
    const gate = new Promise<void>(resolve => { release = resolve })
    kernel.on('GET /v1/items/b', async (req, res) => { await gate; json(res, 200, { id: 'b', n: 7, tenant: req.headers['x-tenant-id'] }) })
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
    const headers = bearer({ tenant: tenant() })
    const calls = Array.from({ length: 100 }, async () => await app.inject({ method: 'GET', url: '/api/v1/items/b', headers }))
    // Every read but the first joins the one in flight before the Kernel answers.
    await until(() => kernel.reads() >= 1, 'the Kernel call')
    await eventually(async () => await metric(app, 'mantle_cache_coalesced_total', { op: 'getItem' }) === 99, '99 joined calls')
    release()
    const answers = await Promise.all(calls)
    t.equal(kernel.reads(), 1, 'one Kernel call')
    t.ok(answers.every(a => a.statusCode === 200 && a.json().n === 7 && a.headers['x-cache'] === 'miss'))
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/b', headers })).headers['x-cache'], 'hit')
    t.equal(kernel.reads(), 1)
  })

  t.test(`${store}: a successful mutation drops its tags (filled from input); a failed one does not`, async t => {
    const kernel = await itemKernel(t)
    kernel.on('POST /v1/broken/a', (_req, res) => json(res, 409, { message: 'no' }))
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
    const headers = bearer({ tenant: tenant() })
    await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    await app.inject({ method: 'GET', url: '/api/v1/items/b', headers })
    t.equal((await app.inject({ method: 'POST', url: '/api/v1/items/a/fail', headers, payload: {} })).statusCode, 409)
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], 'hit', 'a failed mutation invalidates nothing')
    t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/items/a', headers, payload: {} })).statusCode, 200)
    const after = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    t.equal(after.headers['x-cache'], 'miss')
    t.equal(after.json().n, 3)
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/b', headers })).headers['x-cache'], 'hit', 'item:b is another tag')
    t.equal(await metric(app, 'mantle_cache_invalidations_total', { source: 'mutation' }), 1)
  })

  t.test(`${store}: a tag filled from a field named as Object.prototype's (constructor) drops a REST query's entry when the field is absent`, async t => {
    const kernel = await itemKernel(t)
    const byMaker = { type: 'object', properties: { constructor: { type: 'string' }, q: { type: 'string' } } }
    const manifest = itemManifest(kernel.url, {
      // A REST GET's input is the query string's object (no prototype, once the query string holds
      // anything); a JSON body's has Object's, and its `constructor` is Object itself.
      getItem: { rest: 'GET /makers', kernel: 'GET /v1/items/a', input: byMaker, cache: { ttlSeconds: 10, tags: ['maker:{constructor}'] } },
      updateItem: { rest: 'PATCH /makers', kernel: 'PATCH /v1/items/a', input: byMaker, invalidates: ['maker:{constructor}'] }
    })
    const app = await buildTestApp(t, env, { manifest, kernelUrl: kernel.url })
    const headers = bearer({ tenant: tenant() })
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/makers?q=1', headers })).json().n, 1)
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/makers?q=1', headers })).headers['x-cache'], 'hit')
    t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/makers', headers, payload: {} })).statusCode, 200)
    const after = await app.inject({ method: 'GET', url: '/api/v1/makers?q=1', headers })
    t.equal(after.headers['x-cache'], 'miss', 'the mutation dropped the entry')
    t.equal(after.json().n, 2)
  })

  // Before, the tags went only with an answer the gateway accepted: a 2xx the Kernel answered
  // empty (or out of the output schema) was a 502 to the client, the change was made all the
  // same, and every instance went on serving the old entry as a hit for its ttl.
  t.test(`${store}: a mutation the Kernel answered 2xx drops its tags though its answer is refused, and one that timed out does too`, async t => {
    const kernel = await itemKernel(t)
    kernel.on('PATCH /v1/items/a', (_req, res) => { res.writeHead(200, { 'content-type': 'application/json' }); res.end() })
    kernel.on('POST /v1/broken/b', () => {}) // never answers
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url, { failItem: { timeoutMs: 200 } }), kernelUrl: kernel.url })
    const headers = bearer({ tenant: tenant() })
    await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    await app.inject({ method: 'GET', url: '/api/v1/items/b', headers })
    const refused = await app.inject({ method: 'PATCH', url: '/api/v1/items/a', headers, payload: {} })
    t.same([refused.statusCode, refused.json().code], [502, 'KERNEL_ERROR'])
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], 'miss', 'the change the Kernel made dropped item:a')
    const late = await app.inject({ method: 'POST', url: '/api/v1/items/b/fail', headers, payload: {} })
    t.same([late.statusCode, late.json().code], [504, 'KERNEL_TIMEOUT'])
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/b', headers })).headers['x-cache'], 'miss', 'a change that may have been made dropped item:b')
  })

  // The Kernel carried the change out, then the connection was lost before its answer: a 503
  // KERNEL_UNAVAILABLE, and no tag was dropped (only an answer or a timeout counted).
  t.test(`${store}: a mutation whose connection was lost after the request went out drops its tags`, async t => {
    const kernel = await itemKernel(t)
    let version = 1
    kernel.on('GET /v1/items/a', (_req, res) => json(res, 200, { id: 'a', n: version }))
    kernel.on('PATCH /v1/items/a', (_req, res) => { version++; res.destroy() })
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
    const headers = bearer({ tenant: tenant() })
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })).json().n, 1)
    const lost = await app.inject({ method: 'PATCH', url: '/api/v1/items/a', headers, payload: {} })
    t.same([lost.statusCode, lost.json().code], [503, 'KERNEL_UNAVAILABLE'])
    const after = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    t.same([after.headers['x-cache'], after.json().n], ['miss', 2], 'the change the Kernel made is read')
  })

  // A keyed mutation is retried after a Kernel failure; the retry's refusal does not show that
  // nothing changed: the first attempt may have been carried out. A create-only call
  // (If-None-Match: *, sent on to the Kernel since 7b68d9a) is refused 412 on its retry exactly
  // when its first attempt created the target, and the tags were then kept: every instance served
  // the old entry as a hit for its ttl.
  t.test(`${store}: a keyed mutation whose retry the Kernel refused, after a failed attempt it may have carried out, drops its tags`, async t => {
    const kernel = await itemKernel(t)
    let version = 1
    let attempts = 0
    kernel.on('GET /v1/items/a', (_req, res) => json(res, 200, { id: 'a', n: version }))
    kernel.on('PATCH /v1/items/a', (req, res) => {
      attempts++
      if (attempts === 1) {
        version++ // carried out, then the Kernel fails before answering
        json(res, 503, { message: 'restarting' })
      } else json(res, 412, { message: `${String(req.headers['if-none-match'])}: it exists` })
    })
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url, {}, { retries: 1 }), kernelUrl: kernel.url })
    const headers = bearer({ tenant: tenant() })
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })).json().n, 1)
    const refused = await app.inject({ method: 'PATCH', url: '/api/v1/items/a', headers: { ...headers, 'idempotency-key': 'k-' + randomUUID(), 'if-none-match': '*' }, payload: {} })
    t.same([refused.statusCode, refused.json().code, attempts], [412, 'KERNEL_REJECTED', 2], 'retried once, the retry refused')
    const after = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    t.same([after.headers['x-cache'], after.json().n], ['miss', 2], 'the change the first attempt made is read')
  })

  t.test(`${store}: a mutation that never reached the Kernel (connection refused) drops nothing`, async t => {
    const kernel = await itemKernel(t)
    const app = await buildTestApp(t, { ...env, BFF_CIRCUIT_BREAKER_ENABLED: false }, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
    const headers = bearer({ tenant: tenant() })
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], 'miss')
    await kernel.close()
    const refused = await app.inject({ method: 'PATCH', url: '/api/v1/items/a', headers, payload: {} })
    t.same([refused.statusCode, refused.json().code], [503, 'KERNEL_UNAVAILABLE'])
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], 'hit', 'the entry stays')
    t.equal(app.responseCache.cache.laterInvalidations, 0, 'and nothing is dropped later')
  })

  // A mutation that timed out dropped its tags when the gateway gave up; the Kernel made the
  // change later, and a read in between put the old answer back under the new tag versions: a
  // hit on every instance for its whole ttl.
  t.test(`${store}: a mutation that timed out drops its tags again after its timeout`, async t => {
    const kernel = await itemKernel(t)
    let version = 1
    let committed = false
    kernel.on('GET /v1/items/a', (_req, res) => json(res, 200, { id: 'a', n: version }))
    // The gateway gives up at 1.5 s, the Kernel makes the change when the test says (after the
    // read between), and the second invalidation comes 1.5 s after the gateway gave up. Timed by
    // the Kernel itself (the change at 800 ms of a 500 ms timeout), the read came after the
    // change on a loaded machine (a CI run sharing its two cores).
    let commit = (): void => {}
    kernel.on('PATCH /v1/items/a', (_req, res) => {
      commit = () => { version++; committed = true; json(res, 200, { id: 'a', n: version }) }
    })
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url, { updateItem: { timeoutMs: 1500 } }), kernelUrl: kernel.url })
    const headers = bearer({ tenant: tenant() })
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })).json().n, 1)
    const late = await app.inject({ method: 'PATCH', url: '/api/v1/items/a', headers, payload: {} })
    const gaveUp = performance.now()
    t.same([late.statusCode, late.json().code], [504, 'KERNEL_TIMEOUT'])
    const between = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    t.same([between.headers['x-cache'], between.json().n, committed], ['miss', 1, false], 'read again before the Kernel\'s change, and stored')
    t.equal(await metric(app, 'mantle_cache_later_invalidations', {}), 1, 'a second invalidation waits')
    commit()
    await until(() => committed && performance.now() - gaveUp > 1500, 'the Kernel made the change, and the timeout passed again')
    await eventually(async () => await metric(app, 'mantle_cache_invalidations_total', { source: 'mutation' }) === 2, 'the second invalidation')
    const after = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    t.same([after.headers['x-cache'], after.json().n], ['miss', 2], 'the old answer was dropped again')
    t.equal(await metric(app, 'mantle_cache_later_invalidations', {}), 0)
    t.equal(await metric(app, 'mantle_cache_invalidations_total', { source: 'mutation' }), 2, 'twice, no more')
  })

  t.test(`${store}: second invalidations still waiting at close are carried out then, while Redis is open, and none runs after`, async t => {
    const kernel = await itemKernel(t)
    kernel.on('PATCH /v1/items/a', () => {}) // never answers
    const app = await buildTestApp({ teardown: () => {} }, env, { manifest: itemManifest(kernel.url, { updateItem: { timeoutMs: 100 } }), kernelUrl: kernel.url })
    const headers = bearer({ tenant: tenant() })
    t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/items/a', headers, payload: {} })).statusCode, 504)
    const cache = app.responseCache.cache
    t.equal(cache.laterInvalidations, 1)
    const seen: string[] = []
    const invalidate = cache.invalidate.bind(cache)
    cache.invalidate = async (tenant, tags, source) => { seen.push(`${source} ${tags.join(',')} ${app.hasDecorator('redis') ? app.redis.client.status : 'memory'}`); await invalidate(tenant, tags, source) }
    await app.close()
    t.same(seen, [`mutation item:a ${store === 'redis' ? 'ready' : 'memory'}`], 'carried out at close, Redis still open')
    t.equal(cache.pendingInvalidations, 0, 'Redis took it')
    cache.invalidateLater('t', ['x'], 10)
    await new Promise(resolve => setTimeout(resolve, 300))
    t.equal(seen.length, 1, 'nothing scheduled or run after close')
  })

  // Entries were checked against the tags they were stored under: a reload that gave an op a
  // new tag left its entries from before out of that tag's invalidations.
  t.test(`${store}: after a reload changes an op's tags, an entry stored before it is not served`, async t => {
    const kernel = await itemKernel(t)
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
    const who = tenant()
    const headers = bearer({ tenant: who })
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })).json().n, 1)
    t.same(app.pipeline.reload(itemManifest(kernel.url, { getItem: { cache: { ttlSeconds: 10, tags: ['item:{id}', 'items', 'shelf'] } } })), [])
    t.equal((await app.inject({ method: 'POST', url: '/admin/cache/invalidate', headers: bearer({ tenant: who, roles: ['system'] }), payload: { tags: ['shelf'] } })).statusCode, 200)
    const after = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    t.same([after.headers['x-cache'], after.json().n], ['miss', 2], 'read again under the new tags')
  })

  t.test(`${store}: errors and non-2xx answers are never cached`, async t => {
    const kernel = await itemKernel(t)
    let calls = 0
    kernel.on('GET /v1/broken/x', (_req, res) => { calls++; json(res, calls === 1 ? 500 : calls === 2 ? 404 : 200, { id: 'x', n: calls }) })
    const app = await buildTestApp(t, { ...env, BFF_CIRCUIT_BREAKER_ENABLED: false }, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
    const headers = bearer({ tenant: tenant() })
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/broken/x', headers })).statusCode, 502)
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/broken/x', headers })).statusCode, 404)
    const ok = await app.inject({ method: 'GET', url: '/api/v1/broken/x', headers })
    t.equal(ok.statusCode, 200)
    t.equal(ok.headers['x-cache'], 'miss')
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/broken/x', headers })).headers['x-cache'], 'hit')
    t.equal(calls, 3)
  })

  t.test(`${store}: stale while revalidate serves stale once expired and refreshes in the background, once`, async t => {
    const kernel = await itemKernel(t)
    let now = Date.now()
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url, cacheClock: () => now })
    const headers = bearer({ tenant: tenant() })
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/fresh/a', headers })).json().n, 1)
    now += 15_000 // past the ttl (10 s), inside the swr window (20 s)
    let release!: () => void
    const gate = new Promise<void>(resolve => { release = resolve })
    kernel.on('GET /v1/items/a', async (_req, res) => { await gate; json(res, 200, { id: 'a', n: 2 }) })
    const stale = await app.inject({ method: 'GET', url: '/api/v1/fresh/a', headers })
    t.equal(stale.headers['x-cache'], 'stale')
    t.equal(stale.headers['cache-control'], 'private, max-age=0')
    t.equal(stale.json().n, 1)
    const again = await app.inject({ method: 'GET', url: '/api/v1/fresh/a', headers })
    t.equal(again.headers['x-cache'], 'stale', 'still stale while the refresh runs')
    await until(() => kernel.reads() === 2, 'the background refresh')
    release()
    let fresh = await app.inject({ method: 'GET', url: '/api/v1/fresh/a', headers })
    for (let i = 0; i < 200 && fresh.headers['x-cache'] !== 'hit'; i++) {
      await new Promise(resolve => setTimeout(resolve, 10))
      fresh = await app.inject({ method: 'GET', url: '/api/v1/fresh/a', headers })
    }
    t.equal(fresh.headers['x-cache'], 'hit')
    t.equal(fresh.json().n, 2)
    t.equal(kernel.reads(), 2, 'one refresh for every stale answer')
    now += 40_000 // past ttl + swr: a miss (the Kernel is up)
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/fresh/a', headers })).headers['x-cache'], 'miss')
  })

  t.test(`${store}: with the breaker open, or the Kernel unreachable, an expired entry answers, marked stale`, async t => {
    const kernel = await itemKernel(t)
    kernel.on('GET /v1/broken/z', (_req, res) => json(res, 500, {}))
    let now = Date.now()
    const app = await buildTestApp(t, { ...env, BFF_CIRCUIT_BREAKER_THRESHOLD: 1, BFF_CIRCUIT_BREAKER_TIMEOUT: 600000 }, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url, cacheClock: () => now })
    const headers = bearer({ tenant: tenant() })
    await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    now += 60_000 // expired (no swr on getItem)
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/broken/z', headers })).statusCode, 502)
    t.equal(app.kernel.breakerState(), 'open')
    const stale = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    t.equal(stale.statusCode, 200)
    t.equal(stale.headers['x-cache'], 'stale')
    t.equal(stale.json().n, 1)
    t.equal(kernel.reads(), 1, 'no Kernel call while the breaker is open')
    const none = await app.inject({ method: 'GET', url: '/api/v1/items/c', headers })
    t.equal(none.statusCode, 503, 'nothing cached: the open breaker answers')

    // Without a breaker: the Kernel is gone, the call fails with KERNEL_UNAVAILABLE, stale answers.
    const kernel2 = await itemKernel(t)
    let now2 = Date.now()
    const app2 = await buildTestApp(t, { ...env, BFF_CIRCUIT_BREAKER_ENABLED: false }, { manifest: itemManifest(kernel2.url), kernelUrl: kernel2.url, cacheClock: () => now2 })
    await app2.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    await kernel2.close()
    now2 += 60_000
    const down = await app2.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    t.equal(down.statusCode, 200)
    t.equal(down.headers['x-cache'], 'stale')
    now2 += 400_000 // beyond what is kept for a Kernel outage
    t.equal((await app2.inject({ method: 'GET', url: '/api/v1/items/a', headers })).statusCode, 503)
  })

  t.test(`${store}: a Kernel that fails (a 5xx, a 2xx that is not JSON: 502 KERNEL_ERROR), breaker still closed, has an expired entry answer, marked stale`, async t => {
    // RFC 5861's stale-if-error: a 502 is an error as a 503 or a 504 is. A Kernel that answers
    // 503 (restarting, or its proxy with no healthy upstream) is down as one that refuses
    // connections is; its expired entries answered 502 until the breaker opened, and never with
    // a Kernel failing some calls but not `threshold` in a row.
    const kernel = await itemKernel(t)
    let now = Date.now()
    const app = await buildTestApp(t, { ...env, BFF_CIRCUIT_BREAKER_THRESHOLD: 1000 }, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url, cacheClock: () => now })
    const headers = bearer({ tenant: tenant() })
    for (const id of ['a', 'b']) t.equal((await app.inject({ method: 'GET', url: `/api/v1/items/${id}`, headers })).statusCode, 200)
    kernel.on('GET /v1/items/a', (_req, res) => json(res, 503, { message: 'restarting' }))
    kernel.on('GET /v1/items/b', (_req, res) => { res.writeHead(200, { 'content-type': 'text/html' }); res.end('<html>maintenance</html>') })
    now += 60_000 // expired (no swr on getItem)
    for (const id of ['a', 'b']) {
      const stale = await app.inject({ method: 'GET', url: `/api/v1/items/${id}`, headers })
      t.equal(stale.statusCode, 200, `${id}: ${stale.body}`)
      t.equal(stale.headers['x-cache'], 'stale', id)
      t.equal(stale.json().n, id === 'a' ? 1 : 2, id)
    }
    t.equal(app.kernel.breakerState(), 'closed', 'the breaker did not open')
    t.equal(kernel.reads(), 4, 'the Kernel was asked')
    now += 400_000 // beyond what is kept for a Kernel outage
    const gone = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    t.equal(gone.statusCode, 502)
    t.equal(gone.json().code, 'KERNEL_ERROR')
  })

  t.test(`${store}: an invalidation racing a refill in flight does not let the refill put the old answer back`, async t => {
    const kernel = await itemKernel(t)
    const { release } = versionedItem(kernel, 1)
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
    const headers = bearer({ tenant: tenant() })
    const slow = app.inject({ method: 'GET', url: '/api/v1/items/c', headers })
    await until(() => kernel.reads() === 1, 'the slow read at the Kernel')
    t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/items/c', headers, payload: {} })).statusCode, 200)
    release()
    const racing = await slow
    t.equal(racing.json().n, 1, 'the racing caller gets what the Kernel said')
    t.equal(racing.headers['x-cache'], 'miss')
    t.equal(racing.headers['cache-control'], 'private, max-age=0', 'not kept by the gateway, nor by the browser: it may predate the change')
    const next = await app.inject({ method: 'GET', url: '/api/v1/items/c', headers })
    t.equal(next.headers['x-cache'], 'miss', 'the old answer was not stored')
    t.equal(next.json().n, 2)
    t.equal(await metric(app, 'mantle_cache_discarded_total', { op: 'getItem' }), 1)
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/c', headers })).json().n, 2)
  })

  t.test(`${store}: POST /admin/cache/invalidate needs the system role and drops the tags`, async t => {
    const kernel = await itemKernel(t)
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
    const mine = tenant()
    const other = tenant()
    const headers = bearer({ tenant: mine, roles: ['viewer'] })
    const system = bearer({ tenant: mine, roles: ['system'] })
    await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
    await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: bearer({ tenant: other }) })
    t.equal((await app.inject({ method: 'POST', url: '/admin/cache/invalidate', payload: { tags: ['items'] } })).statusCode, 401)
    const forbidden = await app.inject({ method: 'POST', url: '/admin/cache/invalidate', headers, payload: { tags: ['items'] } })
    t.equal(forbidden.statusCode, 403)
    t.equal(forbidden.json().code, 'FORBIDDEN')
    // A tenant no token could name (a lone surrogate made the key's encoding throw: 500), and an
    // unknown key (`tenantId`, dropped, invalidated the caller's own tenant instead).
    for (const payload of [{}, { tags: [] }, { tags: [''] }, { tags: [{}] }, { tags: ['x'], tenant: '' }, { tags: ['x'], tenant: '\ud800' }, { tags: ['x'], tenant: 'a\nb' }, { tags: ['x'], tenant: ' acme' }, { tags: ['x'], tenantId: 'acme' }]) {
      const bad = await app.inject({ method: 'POST', url: '/admin/cache/invalidate', headers: system, payload })
      t.equal(bad.statusCode, 400, JSON.stringify(payload))
      t.equal(bad.json().code, 'VALIDATION_FAILED')
    }
    const done = await app.inject({ method: 'POST', url: '/admin/cache/invalidate', headers: system, payload: { tags: ['items', 'items'] } })
    t.equal(done.statusCode, 200)
    t.same(done.json(), { tenant: mine, tags: ['items'] })
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], 'miss', 'the caller tenant\'s tag')
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: bearer({ tenant: other }) })).headers['x-cache'], 'hit', 'another tenant\'s is left')
    const named = await app.inject({ method: 'POST', url: '/admin/cache/invalidate', headers: system, payload: { tags: ['item:a'], tenant: other } })
    t.same(named.json(), { tenant: other, tags: ['item:a'] })
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: bearer({ tenant: other }) })).headers['x-cache'], 'miss', 'a named tenant')
    t.equal(await metric(app, 'mantle_cache_invalidations_total', { source: 'admin' }), 2)
  })

  t.test(`${store}: every face reports the outcome`, async t => {
    const kernel = await itemKernel(t)
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
    const who = tenant()
    const headers = bearer({ tenant: who })
    const trpc1 = await app.inject({ method: 'GET', url: '/trpc/getItem?input=' + encodeURIComponent('{"id":"d"}'), headers })
    t.equal(trpc1.statusCode, 200)
    t.equal(trpc1.headers['x-cache'], 'miss')
    t.equal(trpc1.headers.etag, undefined, 'ETag is REST\'s')
    const trpc2 = await app.inject({ method: 'GET', url: '/trpc/getItem?input=' + encodeURIComponent('{"id":"d"}'), headers })
    t.equal(trpc2.headers['x-cache'], 'hit')
    t.same(trpc2.json(), trpc1.json())
    const gql = await app.inject({ method: 'POST', url: '/graphql', headers, payload: { query: '{ getItem(id: "d") { id n } }' } })
    t.equal(gql.headers['x-cache'], 'hit')
    t.same(gql.json().data.getItem, { id: 'd', n: 1 })
    t.equal(gql.json().extensions, undefined, 'one call: its x-cache says it')
    const two = await app.inject({ method: 'POST', url: '/graphql', headers, payload: { query: '{ a: getItem(id: "d") { id } b: getItem(id: "a") { id } }' } })
    t.equal(two.statusCode, 200)
    t.equal(two.headers['x-cache'], undefined, 'two calls in one response: no single outcome')
    t.same(two.json().extensions, { cache: { a: 'hit', b: 'miss' } }, 'each field\'s outcome by its response key')
    const plainGql = await app.inject({ method: 'POST', url: '/graphql', headers, payload: { query: '{ a: getPlain(id: "p") { id } b: getPlain(id: "q") { id } }' } })
    t.equal(plainGql.json().extensions, undefined, 'no cache on the ops: no extensions')
    const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', headers, payload: { calls: [{ id: '1', op: 'getItem', input: { id: 'd' } }] } })
    t.same(batch.json().results[0], { id: '1', result: { id: 'd', n: 1, tenant: who }, cache: 'hit' }, 'each call of a batch says its outcome')

    await app.listen({ port: 0, host: '127.0.0.1' })
    const { port } = app.server.address() as { port: number }
    const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`, { headers })
    t.teardown(() => ws.close())
    await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
    const frames: string[] = []
    ws.on('message', m => frames.push(String(m)))
    ws.send(JSON.stringify({ id: '1', op: 'getItem', input: { id: 'd' } }))
    ws.send(JSON.stringify({ id: '2', op: 'getPlain', input: { id: 'd' } }))
    await until(() => frames.length === 2, 'two answers')
    const byId = Object.fromEntries(frames.map(f => JSON.parse(f)).map(f => [f.id, f]))
    t.same(byId['1'], { id: '1', result: { id: 'd', n: 1, tenant: who }, cache: 'hit' })
    t.equal(byId['2'].cache, undefined, 'no cache on the op: no field')
    t.equal(kernel.reads(), 5, 'getItem d once, getItem a once, getPlain p, q and d once each')

    // A tRPC batch: the outcome of each call in the calls' order, - for a call without one.
    const input = encodeURIComponent(JSON.stringify({ 0: { id: 'd' }, 1: { id: 'd' }, 2: { id: 'b' } }))
    const trpcBatch = await app.inject({ method: 'GET', url: `/trpc/getItem,getPlain,getItem?batch=1&input=${input}`, headers })
    t.equal(trpcBatch.statusCode, 200)
    t.equal(trpcBatch.headers['x-cache'], 'hit, -, miss')
    t.same(trpcBatch.json().map((r: { result: { data: { id: string } } }) => r.result.data.id), ['d', 'd', 'b'])
    const noneCached = await app.inject({ method: 'GET', url: `/trpc/getPlain,getPlain?batch=1&input=${encodeURIComponent(JSON.stringify({ 0: { id: 'x' }, 1: { id: 'y' } }))}`, headers })
    t.equal(noneCached.headers['x-cache'], undefined, 'no call with an outcome: no header')
  })

  t.test(`${store}: an op's cache without ttlSeconds lives BFF_CACHE_TTL`, async t => {
    const kernel = await itemKernel(t)
    const app = await buildTestApp(t, { ...env, BFF_CACHE_TTL: 7 }, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
    const res = await app.inject({ method: 'GET', url: '/api/v1/default/a', headers: bearer({ tenant: tenant() }) })
    t.equal(res.headers['cache-control'], 'private, max-age=7')
  })

  // The lists of tag versions were bounded but unseen: marks and floors pushed out make entries
  // miss, a known version pushed out is a tag whose going back in Redis is no longer seen.
  t.test(`${store}: the bounded lists of tag versions are gauged, and what their bounds push out counted`, async t => {
    const kernel = await itemKernel(t)
    // Each list holds 4 x BFF_CACHE_MAX_SIZE, 1,000 at the least.
    const app = await buildTestApp(t, { ...env, BFF_CACHE_MAX_SIZE: 10 }, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
    const cache = app.responseCache.cache
    const who = tenant()
    await cache.invalidate(who, Array.from({ length: 1001 }, (_, i) => `tag:${i}`), 'admin')
    // With Redis, other test processes' invalidations on the shared channel are heard meanwhile:
    // each marks a tag of another tenant here, and can only add marks and floors, and push out
    // more. So with Redis the counts are at least those of this test's own, exactly with memory.
    const count = (got: number, want: number, what: string): void => {
      if (store === 'memory') t.equal(got, want, what)
      else t.ok(got >= want, `${what} (${got}, at least ${want})`)
    }
    t.equal(await metric(app, 'mantle_cache_tag_versions', { list: 'marks' }), 1000, 'marks at their bound')
    // With Redis the tags are marked again once Redis has them: each pushes out the next.
    count(await metric(app, 'mantle_cache_tag_versions_evicted_total', { list: 'marks' }), store === 'memory' ? 1 : 1002, 'the marks pushed out')
    count(await metric(app, 'mantle_cache_tag_versions', { list: 'floors' }), 1, 'the tenant\'s floor raised')
    if (store === 'redis') {
      t.equal(await metric(app, 'mantle_cache_tag_versions', { list: 'known' }), 1000, 'known versions at their bound')
      t.ok(await metric(app, 'mantle_cache_tag_versions_evicted_total', { list: 'known' }) >= 1, 'a known version pushed out')
    }
    // A mark each of 2,001 other tenants: the first 1,000 push out the rest of the first tenant's
    // marks, the next 1,001 those of 1,001 other tenants, each a floor: 1,002 floors for 1,000.
    for (let i = 0; i < 2001; i++) cache.memory.clock.invalidate([tagKey(`${who}-${i}`, 'x')])
    t.equal(await metric(app, 'mantle_cache_tag_versions', { list: 'floors' }), 1000, 'floors at their bound')
    count(await metric(app, 'mantle_cache_tag_versions_evicted_total', { list: 'floors' }), 2, 'the floors pushed out')
    count(await metric(app, 'mantle_cache_tag_versions_evicted_total', { list: 'marks' }), (store === 'memory' ? 1 : 1002) + 2001, 'every mark pushed out')
  })

  // Before, the marks (1,000 at BFF_CACHE_MAX_SIZE=10) could not hold one invalidation of 1,001
  // tags: the mark pushed out raised the tenant's floor to the invalidation itself, and every
  // entry of the tenant in memory missed (with Redis, read from Redis again, one by one).
  t.test(`${store}: one invalidation of more tags than the marks hold leaves the tenant's other entries in memory`, async t => {
    const kernel = await itemKernel(t)
    const app = await buildTestApp(t, { ...env, BFF_CACHE_MAX_SIZE: 10 }, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
    const cache = app.responseCache.cache
    const who = tenant()
    const headers = bearer({ tenant: who })
    const get = async (id: string): Promise<unknown> => (await app.inject({ method: 'GET', url: `/api/v1/items/${id}`, headers })).headers['x-cache']
    const inMemory = (id: string): boolean => cache.memory.get(localKey('getItem', who, canonicalJson({ id }))) !== undefined
    t.same([await get('a'), await get('b'), await get('c')], ['miss', 'miss', 'miss'])
    // Its first tag is item:a, whose mark the next ones push out.
    await cache.invalidate(who, ['item:a', ...Array.from({ length: 1000 }, (_, i) => `tag:${i}`)], 'admin')
    t.ok(await metric(app, 'mantle_cache_tag_versions_evicted_total', { list: 'marks' }) >= 1, 'a mark of the invalidation pushed out')
    t.same([inMemory('a'), inMemory('b'), inMemory('c')], [false, true, true], 'only the invalidated tag\'s entry left memory')
    t.same([await get('a'), await get('b'), await get('c')], ['miss', 'hit', 'hit'])
    t.equal(kernel.reads(), 4, 'item a read again, no other')
  })
}

t.test('BFF_CACHE_ENABLED=false: no stage, no header, every read reaches the Kernel', async t => {
  const kernel = await itemKernel(t)
  const app = await buildTestApp(t, { BFF_CACHE_ENABLED: false }, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
  const headers = bearer({ tenant: tenant() })
  for (let i = 0; i < 2; i++) t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })).headers['x-cache'], undefined)
  t.equal(kernel.reads(), 2)
  t.notOk(app.pipeline.entry('getItem').stages.includes('cache'))
  t.equal((await app.inject({ method: 'POST', url: '/admin/cache/invalidate', headers, payload: { tags: ['x'] } })).statusCode, 404)
})

t.test('the store: memory without REDIS_URL, redis with it, memory when asked', async t => {
  const kernel = await itemKernel(t)
  const manifest = itemManifest(kernel.url)
  t.equal((await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })).responseCache.store, 'memory')
  t.equal((await buildTestApp(t, { REDIS_URL }, { manifest, kernelUrl: kernel.url })).responseCache.store, 'redis')
  t.equal((await buildTestApp(t, { REDIS_URL, BFF_CACHE_STORE: 'memory' }, { manifest, kernelUrl: kernel.url })).responseCache.store, 'memory')
})

t.test('with Redis up, the gateway starts once its invalidations subscriber is subscribed, 2 s at most', async t => {
  // Before, calls could be served before the first SUBSCRIBE: its resync then sent the callers of
  // a cold key after it to a second Kernel call (a CI run's 100 cold reads: 99 joined never came).
  const kernel = await itemKernel(t)
  const proxy = await startTcpProxy(t, Number(new URL(REDIS_URL).port))
  proxy.holdSends(chunk => chunk.includes('bff:cache:invalidate'))
  let ready = false
  const building = buildTestApp(t, { REDIS_URL: redisVia(proxy.port) }, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
  building.then(() => { ready = true }, () => {})
  await until(() => proxy.holding > 0, 'the SUBSCRIBE held')
  await new Promise(resolve => setTimeout(resolve, 500))
  t.notOk(ready, 'not started while its SUBSCRIBE waits')
  // Never answered: it starts all the same, not subscribed (/metrics says so), and subscribes
  // once Redis has its SUBSCRIBE.
  const app = await building
  t.equal(await metric(app, 'mantle_cache_subscriber_up'), 0, 'started, not subscribed')
  proxy.holdSends(null)
  proxy.release()
  await eventually(async () => await metric(app, 'mantle_cache_subscriber_up') === 1, 'the subscription')
  t.pass('subscribed once Redis has the SUBSCRIBE')
})

t.test('a cached query served over POST answers If-None-Match with its full answer, never a 304, and no ETag; its OpenAPI headers are the ones it carries', async t => {
  // RFC 9110 §13.1.2: to a method other than GET or HEAD, a matching If-None-Match is a 412,
  // never a 304. Before, a 304 told the client to reuse an answer to a POST. Then the answer
  // still carried an ETag, which no If-None-Match could use, and the OpenAPI document listed none
  // of the cache's headers (x-cache, Cache-Control, Vary) for it: they were documented on GET only.
  const kernel = await itemKernel(t)
  const app = await buildTestApp(t, {}, { manifest: itemManifest(kernel.url, { getItem: { rest: 'POST /items/:id/read' } }), kernelUrl: kernel.url })
  const headers = bearer({ tenant: tenant() })
  const first = await app.inject({ method: 'POST', url: '/api/v1/items/a/read', headers, payload: {} })
  t.equal(first.statusCode, 200)
  t.equal(first.headers['x-cache'], 'miss')
  t.equal(first.headers.etag, undefined, 'no ETag: If-None-Match is not read on POST')
  const again = await app.inject({ method: 'POST', url: '/api/v1/items/a/read', headers: { ...headers, 'if-none-match': '*' }, payload: {} })
  t.equal(again.statusCode, 200, 'the answer, not a 304')
  t.equal(again.headers['x-cache'], 'hit')
  t.equal(again.headers.etag, undefined)
  t.equal(again.body, first.body)
  const doc = (await app.inject({ url: '/openapi.json' })).json()
  const post = doc.paths['/api/v1/items/{id}/read'].post
  t.notOk(post.parameters?.some((p: { name: string }) => p.name === 'if-none-match'), 'nor does the OpenAPI document offer If-None-Match or a 304 there')
  t.notOk('304' in post.responses)
  const cacheHeaders = ['x-cache', 'etag', 'cache-control', 'vary']
  const documented = Object.keys(post.responses['2XX'].headers).map(h => h.toLowerCase()).filter(h => cacheHeaders.includes(h))
  t.same(documented, cacheHeaders.filter(h => again.headers[h] !== undefined), 'the cache headers documented are the ones the answer carries')
  t.same(documented, ['x-cache', 'cache-control', 'vary'])
})

t.test('a 304, to GET or HEAD, and a HEAD answered 204 carry no Content-Length; a HEAD 200 carries its GET\'s', async t => {
  // RFC 9110 §8.6: a 304 carries no Content-Length but its 200's, a 204 none. Fastify's HEAD
  // routes (exposeHeadRoutes) set content-length: 0 on any answer without a body: a HEAD
  // revalidated to 304 said the answer was empty.
  const kernel = await itemKernel(t)
  kernel.on('GET /v1/items/d', (_req, res) => { res.writeHead(204); res.end() })
  const app = await buildTestApp(t, {}, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
  const headers = bearer({ tenant: tenant() })
  const first = await app.inject({ method: 'GET', url: '/api/v1/items/a', headers })
  t.equal(first.headers['content-length'], String(Buffer.byteLength(first.body)))
  const head = await app.inject({ method: 'HEAD', url: '/api/v1/items/a', headers })
  t.equal(head.statusCode, 200)
  t.equal(head.headers['content-length'], first.headers['content-length'], 'a HEAD 200: its GET\'s length')
  for (const method of ['GET', 'HEAD'] as const) {
    const notModified = await app.inject({ method, url: '/api/v1/items/a', headers: { ...headers, 'if-none-match': String(first.headers.etag) } })
    t.equal(notModified.statusCode, 304, method)
    t.equal(notModified.headers['content-length'], undefined, `${method} 304: no Content-Length`)
  }
  const empty = await app.inject({ method: 'HEAD', url: '/api/v1/plain/d', headers })
  t.equal(empty.statusCode, 204)
  t.equal(empty.headers['content-length'], undefined, 'HEAD 204: no Content-Length')
})

// A 2xx the Kernel answers that HTTP does not let a cache keep by default (RFC 9110 §15.1: of the
// 2xx, only 200, 203, 204 and 206 are): a 202 Accepted says the work is under way and the answer
// not known yet. Before, it was stored like a 200 and replayed as a hit, max-age the ttl, so a
// client polling for the answer got the 202 until the entry expired.
for (const { store, env } of STORES) {
  t.test(`${store}: a 202 from the Kernel is answered uncached, not kept; a 200 after it is`, async t => {
    const kernel = await itemKernel(t)
    let pending = 2
    let reads = 0
    kernel.on('GET /v1/items/d', (_req, res) => {
      reads++
      if (pending-- > 0) json(res, 202, { id: 'd', n: 0 })
      else json(res, 200, { id: 'd', n: reads })
    })
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
    const headers = bearer({ tenant: tenant() })
    const answers = []
    for (let i = 0; i < 4; i++) answers.push(await app.inject({ method: 'GET', url: '/api/v1/items/d', headers }))
    t.same(answers.map(a => a.statusCode), [202, 202, 200, 200], 'the Kernel asked again until it had the answer')
    t.same(answers.map(a => a.headers['x-cache']), ['miss', 'miss', 'miss', 'hit'])
    t.same(answers.map(a => a.json().n), [0, 0, 3, 3])
    t.equal(reads, 3, 'the 202s were not kept: only the 200 was')
    t.equal(answers[0].headers['cache-control'], 'private, max-age=0', 'a browser does not keep the 202 either')
    t.equal(answers[2].headers['cache-control'], 'private, max-age=10')
    // A 304 stands for a 200 (RFC 9110 §15.4.5): If-None-Match does not turn a 202 into one.
    pending = 1
    const other = bearer({ tenant: tenant() })
    const accepted = await app.inject({ method: 'GET', url: '/api/v1/items/d', headers: { ...other, 'if-none-match': '*' } })
    t.equal(accepted.statusCode, 202, 'If-None-Match: * with a 202')
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/d', headers: { ...other, 'if-none-match': '*' } })).statusCode, 304, 'and with the 200 after it')
  })
}
