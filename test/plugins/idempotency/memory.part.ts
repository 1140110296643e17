import t from 'tap'
import { randomUUID } from 'node:crypto'
import { bearer, buildTestApp, json, startTestKernel, testManifest, until } from '../../helper.js'
import { redisVia, startTcpProxy } from '../../proxy.js'
import { idemSetup, REDIS_URL } from './idempotency-helper.js'
import { semantics } from './semantics.js'

semantics(t, 'memory')

t.test('idempotency off: no stage, every repeat reaches the Kernel', async t => {
  const s = await idemSetup(t, 'memory', { BFF_IDEMPOTENCY_ENABLED: false })
  const key = randomUUID()
  await s.create({ name: 'a' }, key)
  const again = await s.create({ name: 'a' }, key)
  t.notOk(again.headers['idempotent-replayed'])
  t.equal(s.calls(), 2)
  t.notOk(s.app.pipeline.entry('createItem').stages.includes('idempotency'))
  t.notOk(s.app.hasDecorator('idempotency'))
})

t.test('metrics count replays, conflicts, key reuse and the memory store size', async t => {
  const s = await idemSetup(t, 'memory', { BFF_IDEMPOTENCY_WAIT_MS: 0 })
  const key = randomUUID()
  await s.create({ name: 'a' }, key)
  await s.create({ name: 'a' }, key)
  await s.create({ name: 'b' }, key)
  const gate = s.hold()
  const slow = s.create({ name: 'c' }, 'k2')
  await until(() => s.calls() === 2, 'the second call to reach the Kernel')
  await s.create({ name: 'c' }, 'k2')
  gate.open()
  await slow
  const text = (await s.app.inject({ method: 'GET', url: '/metrics' })).body
  t.match(text, /mantle_idempotency_replays_total\{op="createItem"\} 1/)
  t.match(text, /mantle_idempotency_key_reused_total\{op="createItem"\} 1/)
  t.match(text, /mantle_idempotency_conflicts_total\{op="createItem"\} 1/)
  t.match(text, /mantle_idempotency_memory_keys 2/)
  t.match(text, /mantle_idempotency_store_fallbacks_total 0/)
  t.equal(s.app.idempotency.memoryKeys(), 2)
})

// The claims of keyed calls running had no metric (they are bounded by the calls in flight only).
t.test('the claims of keyed calls running are counted, by store, until their calls end', async t => {
  const s = await idemSetup(t, 'memory')
  const scrape = async () => (await s.app.inject({ method: 'GET', url: '/metrics' })).body
  const gate = s.hold()
  const slow = [s.create({ name: 'a' }, randomUUID()), s.create({ name: 'b' }, randomUUID())]
  await until(() => s.calls() === 2, 'both calls to reach the Kernel')
  const during = await scrape()
  t.match(during, /mantle_idempotency_running_claims\{store="memory"\} 2\n/, 'two claims running')
  t.match(during, /mantle_idempotency_running_claims\{store="redis"\} 0\n/)
  gate.open()
  await Promise.all(slow)
  t.match(await scrape(), /mantle_idempotency_running_claims\{store="memory"\} 0\n/, 'none once they ended')
})

// One LRU for all tenants: tenant A's keyed calls (three, with BFF_IDEMPOTENCY_MAX_KEYS=3)
// pushed out tenant B's outcome, and B's retry created a second item.
t.test('another tenant\'s keyed calls never evict a tenant\'s outcome: past the bound, the tenant holding the most gives up its oldest', async t => {
  const s = await idemSetup(t, 'memory', { BFF_IDEMPOTENCY_MAX_KEYS: 3 })
  const a = s.tenant + '-a'
  const b = s.tenant + '-b'
  const first = await s.create({ name: 'payment' }, 'order-42', b)
  t.equal(first.statusCode, 201)
  for (let i = 0; i < 10; i++) t.equal((await s.create({ name: 'flood' }, 'junk-' + i, a)).statusCode, 201)
  const retry = await s.create({ name: 'payment' }, 'order-42', b)
  t.equal(retry.statusCode, 201)
  t.equal(retry.headers['idempotent-replayed'], 'true', 'B\'s retry is replayed')
  t.same(retry.json(), first.json())
  t.equal(s.calls(), 11, 'B\'s creation reached the Kernel once')
  // A's own oldest went: its first keys run again, its two latest are replayed.
  t.notOk((await s.create({ name: 'flood' }, 'junk-0', a)).headers['idempotent-replayed'], 'A\'s oldest was evicted')
  t.equal((await s.create({ name: 'flood' }, 'junk-9', a)).headers['idempotent-replayed'], 'true', 'A\'s latest is kept')
  t.equal(s.calls(), 12)
  t.equal(s.app.idempotency.memoryKeys(), 3)
  const text = (await s.app.inject({ method: 'GET', url: '/metrics' })).body
  t.match(text, /mantle_idempotency_memory_evictions_total 9\n/)
})

// With the memory store and REDIS_URL set, a mutation's cache invalidation goes to Redis after its
// Kernel call. Its claim's lease was the op's timeout plus 5 s whatever BFF_REDIS_COMMAND_TIMEOUT_MS
// was: an invalidation Redis took late (within that timeout) outlasted the claim, and a repeat
// on the same instance claimed the key and ran the Kernel call a second time.
t.test('memory store, Redis set: a claim outlives the cache invalidation its call makes after the Kernel call', async t => {
  const port = Number(new URL(REDIS_URL).port || 6379)
  const proxy = await startTcpProxy(t, port)
  let calls = 0
  const kernel = await startTestKernel(t, { 'POST /v1/tagged': (_req, res) => json(res, 201, { id: 'tagged-' + ++calls }) })
  const manifest = testManifest({
    tagItem: { type: 'mutation', rest: 'POST /tagged', kernel: 'POST /v1/tagged', input: { type: 'object', properties: { name: { type: 'string' } } }, output: { type: 'object', properties: { id: { type: 'string' } } }, timeoutMs: 1000, invalidates: ['tagged'] }
  }, { retries: 0 })
  const app = await buildTestApp(t, { BFF_IDEMPOTENCY_STORE: 'memory', BFF_IDEMPOTENCY_TTL_SECONDS: 120, REDIS_URL: redisVia(proxy.port), BFF_REDIS_COMMAND_TIMEOUT_MS: 20000 }, { manifest, kernelUrl: kernel.url })
  const tenant = 'idem-' + randomUUID()
  const key = randomUUID()
  const call = async () => await app.inject({ method: 'POST', url: '/api/v1/tagged', headers: { ...bearer({ tenant }), 'idempotency-key': key }, payload: { name: 'n' } })
  // The call's invalidation of its tag does not reach Redis until released.
  proxy.holdSends(chunk => chunk.toString('latin1').includes(encodeURIComponent(tenant) + ':tagged'))
  const first = call()
  await until(() => proxy.holding > 0, 'the invalidation to be held on its way to Redis')
  t.equal(calls, 1)
  await new Promise(resolve => setTimeout(resolve, 6500))
  const repeat = call()
  // The repeat either waits for the first call (its claim still held) or, its lease lapsed, runs.
  await new Promise(resolve => setTimeout(resolve, 300))
  t.equal(calls, 1, 'the repeat did not run the call again')
  proxy.holdSends(null)
  proxy.release()
  t.equal((await first).statusCode, 201)
  await repeat
  t.equal(calls, 1, 'one Kernel call in all')
})
