// After a Redis outage: keys claimed in the memory store while Redis was away stay answered by the
// instance that holds them. README: a mutation with a key runs once "whichever face and whichever
// gateway instance the repeats reach"; the outage exceptions are only a repeat that reaches another
// instance, or repeats a call made before the outage. So a repeat on the instance that stored the
// outcome never reaches the Kernel again once Redis is back: it is replayed from memory, and the
// outcome is copied to Redis for the time it has left (never extended), so that other instances
// replay it from then on. A call still running in memory when Redis returns is waited for.
import t from 'tap'
import { randomUUID } from 'node:crypto'
import { Redis } from 'ioredis'
import { until, startTestKernel, json, type TestHandler } from '../../helper.js'
import type { BuildOptions } from '../../../app.js'
import { redisVia, startTcpProxy } from '../../proxy.js'
import { storeKey } from '../../../plugins/idempotency/index.js'
import { idemSetup, REDIS_URL } from './idempotency-helper.js'
import { metric, eventually } from '../cache/items.js'

const TTL_MS = 120_000 // the helper's BFF_IDEMPOTENCY_TTL_SECONDS

type Teardown = { teardown: (fn: () => unknown) => void }

/**
 * A gateway on Redis through a proxy the test cuts, with Redis already away; a direct client of
 * the same Redis to look at what it holds.
 */
async function duringOutage (t: Teardown): Promise<{ proxy: Awaited<ReturnType<typeof startTcpProxy>>, s: Awaited<ReturnType<typeof idemSetup>>, redis: Redis }> {
  const proxy = await startTcpProxy(t, 6379)
  const s = await idemSetup(t, 'redis', { REDIS_URL: redisVia(proxy.port) })
  const redis = new Redis(REDIS_URL, { lazyConnect: true })
  await redis.connect()
  t.teardown(() => redis.quit())
  proxy.cut('reset')
  await until(() => !s.app.redis.up(), 'the shared connection to notice the cut')
  return { proxy, s, redis }
}

t.test('a call made while Redis was away, repeated on the same instance after Redis is back, is replayed, not run again', async t => {
  const { proxy, s, redis } = await duringOutage(t)
  const key = randomUUID()
  const first = await s.create({ name: 'x' }, key)
  const answeredAt = Date.now()
  t.equal(first.statusCode, 201)
  const during = await s.create({ name: 'x' }, key)
  t.equal(during.headers['idempotent-replayed'], 'true', 'replayed from memory during the outage')
  t.equal(s.calls(), 1)
  // A second of the outcome's time passes before Redis is back: a copy for the full TTL would
  // then stand out from one for the time left by far more than the copy's own transit.
  await new Promise(resolve => setTimeout(resolve, 1000))
  proxy.restore()
  await until(() => s.app.redis.up(), 'Redis to be back', 10_000)
  await new Promise(resolve => setTimeout(resolve, 300))

  const after = await s.create({ name: 'x' }, key)
  t.equal(after.statusCode, 201)
  t.equal(after.headers['idempotent-replayed'], 'true', 'the instance that stored the outcome still replays it')
  t.equal(after.body, first.body, 'the first answer, not a new one')
  t.equal(s.calls(), 1, 'never a second Kernel call')

  const at = storeKey(s.tenant, 'createItem', key)
  const since = Date.now() - answeredAt
  const ttl = await redis.pttl(at)
  t.equal(JSON.parse((await redis.get(at))!).state, 'done', 'the outcome was copied to Redis')
  // The copy is sent with the time left (PX) and Redis starts counting when it arrives, so the
  // copy's transit is added (1-2 ms, more on a loaded machine: 2 ms over once). Within 250 ms;
  // a copy for the full TTL would be over by more than 1,000 ms.
  t.ok(ttl > 0 && ttl <= TTL_MS - since + 250, `with the time it had left, never extended (${ttl} ms left, ${since} ms after the answer)`)

  const other = await idemSetup(t, 'redis', {}, {}, s.kernel)
  const elsewhere = await other.create({ name: 'x' }, key, s.tenant)
  t.equal(elsewhere.headers['idempotent-replayed'], 'true', 'another instance replays it from Redis')
  t.equal(elsewhere.body, first.body)
  t.equal(s.calls(), 1)
  t.equal((await s.create({ name: 'y' }, key)).statusCode, 422, 'another input with the key is still refused')
})

t.test('a call still running in memory when Redis comes back: a repeat waits for it, never a second Kernel call', async t => {
  const { proxy, s, redis } = await duringOutage(t)
  const key = randomUUID()
  const gate = s.hold()
  const first = s.create({ name: 'slow' }, key)
  await until(() => s.calls() === 1, 'the call, claimed in memory, to reach the Kernel')
  proxy.restore()
  await until(() => s.app.redis.up(), 'Redis to be back', 10_000)

  const repeat = s.create({ name: 'slow' }, key)
  await new Promise(resolve => setTimeout(resolve, 100))
  t.equal(s.calls(), 1, 'the repeat waits for the call running on this instance')
  gate.open()
  const [a, b] = await Promise.all([first, repeat])
  t.equal(a.statusCode, 201)
  t.equal(b.statusCode, 201)
  t.equal(b.headers['idempotent-replayed'], 'true')
  t.equal(b.body, a.body)
  t.equal(s.calls(), 1, 'one Kernel call')
  t.equal(JSON.parse((await redis.get(storeKey(s.tenant, 'createItem', key)))!).state, 'done', 'the outcome reached Redis with the replay')
})

t.test('a claim Redis carried out but never answered in time: the outcome held in memory is copied over it, another instance replays it', async t => {
  // The claim's command timed out at the gateway (a latency spike over the 500 ms command timeout)
  // while Redis ran it: Redis held a running claim nobody knew. The call ran from memory, its
  // outcome was never copied over that claim, and a repeat on another instance waited out the
  // conflict (409), then ran the Kernel call a second time once the claim's lease ended.
  const proxy = await startTcpProxy(t, new URL(REDIS_URL).port === '' ? 6379 : Number(new URL(REDIS_URL).port), new URL(REDIS_URL).hostname)
  const a = await idemSetup(t, 'redis', { REDIS_URL: redisVia(proxy.port) })
  const b = await idemSetup(t, 'redis', {}, {}, a.kernel)
  const redis = new Redis(REDIS_URL)
  t.teardown(() => redis.quit())
  await until(() => a.app.redis.up() && b.app.redis.up(), 'both instances connected')
  const key = randomUUID()
  proxy.delay(700)
  const first = await a.create({ name: 'x' }, key)
  t.equal(first.statusCode, 201)
  t.match(await redis.get(storeKey(a.tenant, 'createItem', key)), /"state":"running"/, 'Redis carried the claim out')
  proxy.restore()
  const repeat = await b.create({ name: 'x' }, key, a.tenant)
  t.equal(repeat.statusCode, 201, repeat.body)
  t.equal(repeat.headers['idempotent-replayed'], 'true')
  t.same(repeat.json(), first.json(), 'the first call\'s answer')
  t.equal(a.calls(), 1, 'one Kernel call for one key')
})

t.test('a claim Redis carried out but never answered, of a call that failed: the claim is released there, a repeat on another instance runs', async t => {
  // README: a call that failed otherwise than definitively releases its key, and a repeat runs
  // as a new call. The call ran from memory (its claim timed out at the gateway); the claim Redis
  // made all the same must go too, or a repeat on another instance finds it running: 409, or a
  // wait for its lease (the op's timeout plus 5 s) before it may run.
  const { open, state, proxy, a, b, redis } = await failingCall(t)
  open()
  const key = randomUUID()
  const at = storeKey(a.tenant, 'createItem', key)
  proxy.delay(700)
  const first = await a.create({ name: 'x' }, key)
  t.match([first.statusCode, first.json()], [502, { code: 'KERNEL_ERROR' }])
  proxy.restore()
  // Redis got the claim, and the release after it, at once: only their answers were held back.
  let held: number | null = null
  const poll = setInterval(() => { redis.exists(at).then(n => { held = n }, () => {}) }, 10)
  t.teardown(() => clearInterval(poll))
  await until(() => held === 0, 'the claim Redis made to be released')
  clearInterval(poll)
  state.failing = false
  const repeat = await b.create({ name: 'x' }, key, a.tenant)
  t.equal(repeat.statusCode, 201, repeat.body)
  t.notOk(repeat.headers['idempotent-replayed'], 'a new call, not a replay')
  t.equal(a.calls(), 2, 'the repeat reached the Kernel')
})

/**
 * Two instances on one Redis, `a` through a proxy the test cuts, `b` without waiting for a running
 * claim (409 at once); a Kernel whose item creations (createItem, quickItem) are held until `open()` and answers 503 while
 * `failing`; a direct client of the Redis.
 */
async function failingCall (t: Teardown, options: BuildOptions = {}) {
  let open!: () => void
  const gate = new Promise<void>(resolve => { open = resolve })
  const state = { failing: true }
  const create: TestHandler = async (req, res) => {
    await gate
    if (state.failing) json(res, 503, { message: 'down' })
    else json(res, 201, { id: 'item-1', name: (JSON.parse(req.body) as { name: string }).name, n: 1 })
  }
  const kernel = await startTestKernel(t, { 'POST /v1/items': create, 'POST /v1/quick': create })
  const proxy = await startTcpProxy(t, new URL(REDIS_URL).port === '' ? 6379 : Number(new URL(REDIS_URL).port), new URL(REDIS_URL).hostname)
  const a = await idemSetup(t, 'redis', { REDIS_URL: redisVia(proxy.port) }, {}, kernel, options)
  const b = await idemSetup(t, 'redis', { BFF_IDEMPOTENCY_WAIT_MS: 0 }, {}, kernel)
  const redis = new Redis(REDIS_URL)
  t.teardown(() => redis.quit())
  await until(() => a.app.redis.up() && b.app.redis.up(), 'both instances connected')
  return { open, state, proxy, a, b, redis }
}

for (const answered of [true, false]) {
  const what = answered ? 'a claim Redis answered' : 'a claim Redis carried out but never answered'
  t.test(`${what}, of a call that failed as Redis went away: the release Redis refused is done once it is back, a repeat on another instance runs`, async t => {
    // README: a call that failed otherwise than definitively releases its key. The release failed
    // (Redis away as the call ended) and was never retried: the claim stayed for its lease (the
    // op's timeout plus 5 s), and a repeat on another instance got 409 meanwhile.
    const { open, state, proxy, a, b, redis } = await failingCall(t)
    const key = randomUUID()
    const at = storeKey(a.tenant, 'createItem', key)
    if (!answered) proxy.delay(700) // over the 500 ms command timeout: the claim runs from memory
    const first = a.create({ name: 'x' }, key)
    await until(() => a.calls() === 1, 'the call to reach the Kernel')
    t.match(await redis.get(at), /"state":"running"/, 'Redis holds the call\'s claim')
    proxy.cut('reset')
    await until(() => !a.app.redis.up(), 'the instance to notice the cut')
    open()
    t.match([(await first).statusCode, (await first).json()], [502, { code: 'KERNEL_ERROR' }])
    t.match(await redis.get(at), /"state":"running"/, 'the release failed: the claim is still there')
    const lease = await redis.pttl(at)
    t.ok(lease > 8000, `its lease has ${lease} ms left`)
    t.equal(await metric(a.app, 'mantle_idempotency_pending_redis_writes'), 1, 'the release waits for Redis')
    proxy.restore()
    // Well within the lease: gone because it was released, not because it lapsed.
    await eventually(async () => await redis.exists(at) === 0, 'the claim to be released', 5000)
    // The unanswered claim's own release may still wait for its next try (every 250 ms): it
    // finds the key gone, and is dropped then.
    await eventually(async () => await metric(a.app, 'mantle_idempotency_pending_redis_writes') === 0, 'nothing left to retry', 2000)
    state.failing = false
    const repeat = await b.create({ name: 'x' }, key, a.tenant)
    t.equal(repeat.statusCode, 201, repeat.body)
    t.notOk(repeat.headers['idempotent-replayed'], 'a new call, not a replay')
    t.equal(a.calls(), 2, 'the repeat reached the Kernel')
  })
}

t.test('a release Redis refused is dropped when the claim\'s lease ends, Redis still away: nothing is retried for a claim gone from Redis', async t => {
  // quickItem: a 1 s timeout, and a margin of 2 s (5 s by default: the test waited out a 6 s
  // lease), so a 3 s lease. Past it the claim lapsed in Redis, and the key may be another call's
  // by now (a release is guarded by the claim's token all the same).
  const { open, proxy, a, redis } = await failingCall(t, { idempotency: { leaseMarginMs: 2000 } })
  const key = randomUUID()
  const at = storeKey(a.tenant, 'quickItem', key)
  const first = a.app.inject({ method: 'POST', url: '/api/v1/quick', headers: a.headers(key), payload: { name: 'q' } })
  await until(() => a.calls('POST /v1/quick') === 1, 'the call to reach the Kernel')
  proxy.cut('reset')
  await until(() => !a.app.redis.up(), 'the instance to notice the cut')
  open()
  t.equal((await first).statusCode, 502)
  t.equal(await metric(a.app, 'mantle_idempotency_pending_redis_writes'), 1, 'the release waits for Redis')
  await eventually(async () => await redis.exists(at) === 0, 'the claim\'s lease to end', 10_000)
  await eventually(async () => await metric(a.app, 'mantle_idempotency_pending_redis_writes') === 0, 'the release to be dropped', 5000)
  t.notOk(a.app.redis.up(), 'dropped while Redis was still away')
})

t.test('a repeat waiting for a call that holds its key in Redis never claims it in memory when a poll fails: never a second Kernel call', async t => {
  // The repeat (on b) found the key running in Redis (the first call, on a). One of its polls
  // slower than the 500 ms command timeout sent it to b's memory store, which had never seen the
  // key: it won it there and called the Kernel again, and each instance replayed its own answer.
  const a = await idemSetup(t, 'redis')
  const proxy = await startTcpProxy(t, new URL(REDIS_URL).port === '' ? 6379 : Number(new URL(REDIS_URL).port), new URL(REDIS_URL).hostname)
  const b = await idemSetup(t, 'redis', { REDIS_URL: redisVia(proxy.port) }, {}, a.kernel)
  await until(() => a.app.redis.up() && b.app.redis.up(), 'both instances connected')
  const key = randomUUID()
  const gate = a.hold()
  const first = a.create({ name: 'x' }, key)
  await until(() => a.calls() === 1, 'the first call to reach the Kernel')
  const repeat = b.create({ name: 'x' }, key, a.tenant)
  await new Promise(resolve => setTimeout(resolve, 300))
  proxy.delay(700)
  await new Promise(resolve => setTimeout(resolve, 900))
  proxy.restore()
  t.equal(a.calls(), 1, 'the repeat still waits')
  gate.open()
  const [one, two] = await Promise.all([first, repeat])
  t.equal(one.statusCode, 201)
  t.equal(two.statusCode, 201, two.body)
  t.equal(two.headers['idempotent-replayed'], 'true')
  t.equal(two.body, one.body, 'the first call\'s answer')
  t.equal(a.calls(), 1, 'one Kernel call')
  t.equal(await metric(b.app, 'mantle_idempotency_store_fallbacks_total'), 0, 'not a fallback')
  t.equal((await b.create({ name: 'x' }, key, a.tenant)).body, one.body, 'b replays the first answer')
  t.equal((await a.create({ name: 'x' }, key)).body, one.body, 'a too')
})

t.test('a repeat waiting for a call that holds its key in Redis, Redis failing until its wait ends: 409, never a second Kernel call', async t => {
  const a = await idemSetup(t, 'redis')
  const proxy = await startTcpProxy(t, new URL(REDIS_URL).port === '' ? 6379 : Number(new URL(REDIS_URL).port), new URL(REDIS_URL).hostname)
  const b = await idemSetup(t, 'redis', { REDIS_URL: redisVia(proxy.port), BFF_IDEMPOTENCY_WAIT_MS: 1500 }, {}, a.kernel)
  await until(() => a.app.redis.up() && b.app.redis.up(), 'both instances connected')
  const key = randomUUID()
  const gate = a.hold()
  t.teardown(() => gate.open())
  const first = a.create({ name: 'x' }, key)
  await until(() => a.calls() === 1, 'the first call to reach the Kernel')
  const repeat = b.create({ name: 'x' }, key, a.tenant)
  await new Promise(resolve => setTimeout(resolve, 200))
  proxy.cut('reset')
  const answer = await repeat
  t.match([answer.statusCode, answer.json()], [409, { code: 'IDEMPOTENCY_CONFLICT' }])
  t.equal(answer.headers['retry-after'], '1')
  t.equal(a.calls(), 1, 'never a second Kernel call')
  t.equal(await metric(b.app, 'mantle_idempotency_store_fallbacks_total'), 0, 'not a fallback')
  gate.open()
  t.equal((await first).statusCode, 201)
})

t.test('an outcome Redis did not take as the gateway closed: nothing of the plugin runs after close, no retry timer is started', async t => {
  // The call ends after the idempotency plugin's onClose has run (the Kernel pool's close waits
  // for it, before): its outcome, which Redis did not take in time, was put up for a retry, and
  // that started a 250 ms timer after close, ticking until the claim's lease ended (the op's
  // timeout plus 5 s), Redis's connection closed or not.
  const proxy = await startTcpProxy(t, new URL(REDIS_URL).port === '' ? 6379 : Number(new URL(REDIS_URL).port), new URL(REDIS_URL).hostname)
  const s = await idemSetup(t, 'redis', { REDIS_URL: redisVia(proxy.port) })
  await until(() => s.app.redis.up(), 'Redis to be connected')
  const gate = s.hold()
  const first = s.create({ name: 'x' }, randomUUID())
  await until(() => s.calls() === 1, 'the call, claimed in Redis, to reach the Kernel')
  proxy.delay(700) // over the 500 ms command timeout: the outcome's write fails
  const closing = s.app.close()
  await new Promise(resolve => setTimeout(resolve, 50))
  gate.open()
  t.equal((await first).statusCode, 201)
  await closing
  let asked = 0
  const up = s.app.redis.up
  s.app.redis.up = () => { asked++; return up() }
  await new Promise(resolve => setTimeout(resolve, 800))
  t.equal(asked, 0, 'nothing asks Redis anything after close')
  t.equal(await metric(s.app, 'mantle_idempotency_pending_redis_writes'), 0, 'nothing is held for a retry that will not come')
})

/**
 * A gateway on Redis through a proxy (command timeout `commandTimeoutMs`) holding, for Redis to
 * take, the outcome of a call whose write Redis refused (gone as the call ended), Redis back and
 * answering; its retries (every 250 ms) see Redis away, so that only the close can offer it.
 * `closing()` lets the close see Redis as it is, right after a retry (the next is 250 ms away).
 */
async function outcomeAtClose (t: Teardown, commandTimeoutMs = 500) {
  const proxy = await startTcpProxy(t, new URL(REDIS_URL).port === '' ? 6379 : Number(new URL(REDIS_URL).port), new URL(REDIS_URL).hostname)
  const s = await idemSetup(t, 'redis', { REDIS_URL: redisVia(proxy.port), BFF_REDIS_COMMAND_TIMEOUT_MS: commandTimeoutMs })
  const redis = new Redis(REDIS_URL)
  t.teardown(() => redis.quit())
  await until(() => s.app.redis.up(), 'Redis to be connected')
  const key = randomUUID()
  const at = storeKey(s.tenant, 'createItem', key)
  const gate = s.hold()
  const first = s.create({ name: 'x' }, key)
  await until(() => s.calls() === 1, 'the call, claimed in Redis, to reach the Kernel')
  proxy.cut('reset')
  await until(() => !s.app.redis.up(), 'the instance to notice the cut')
  gate.open()
  const answer = await first
  const up = s.app.redis.up
  let open = false
  let retries = 0
  s.app.redis.up = () => {
    if (open) return up()
    retries++
    return false
  }
  proxy.restore()
  await until(() => up(), 'Redis to be back', 10_000)
  const closing = async (): Promise<void> => {
    const seen = retries
    await until(() => retries > seen, 'a retry')
    open = true
  }
  return { proxy, s, redis, key, at, answer, closing }
}

t.test('an outcome Redis did not take, still waiting as the gateway closes, Redis answering: offered to Redis once more, another instance replays it', async t => {
  // Dropped at close, another instance's repeat waited for the claim's lease (the op's timeout
  // plus 5 s), then ran the call a second time, Redis up all along.
  const { s, redis, key, at, answer, closing } = await outcomeAtClose(t)
  t.equal(answer.statusCode, 201)
  t.match(await redis.get(at), /"state":"running"/, 'Redis did not take the outcome')
  t.equal(await metric(s.app, 'mantle_idempotency_pending_redis_writes'), 1, 'the outcome waits for Redis')
  await closing()
  await s.app.close()
  t.match(JSON.parse((await redis.get(at)) ?? 'null'), { state: 'done' }, 'the outcome reached Redis as the gateway closed')
  const other = await idemSetup(t, 'redis', { BFF_IDEMPOTENCY_WAIT_MS: 0 }, {}, s.kernel)
  const repeat = await other.create({ name: 'x' }, key, s.tenant)
  t.equal(repeat.statusCode, 201, repeat.body)
  t.equal(repeat.headers['idempotent-replayed'], 'true', 'another instance replays it')
  t.equal(repeat.body, answer.body, 'the first answer')
  t.equal(s.calls(), 1, 'one Kernel call for one key')
})

t.test('an outcome still waiting as the gateway closes, Redis up but not answering: the close goes on after 0.5 s', async t => {
  // A command timeout of 5 s: the bound of the pass, not each command's, ends it.
  const { proxy, s, answer, closing } = await outcomeAtClose(t, 5000)
  t.equal(answer.statusCode, 201)
  proxy.delay(20_000)
  let quitAt = 0
  const client = s.app.redis.client
  // Redis's own onClose, after the idempotency plugin's: its QUIT would wait for the command timeout.
  client.quit = (async () => {
    quitAt = performance.now()
    client.disconnect()
    return 'OK'
  }) as typeof client.quit
  await closing()
  const start = performance.now()
  await s.app.close()
  const held = quitAt - start
  t.ok(quitAt > 0 && held >= 400, `the outcome was offered to Redis and waited for (${Math.round(held)} ms)`)
  t.ok(held < 2500, `well within the 5 s command timeout: the pass's bound of 0.5 s ended it (${Math.round(held)} ms)`)
})

// Review tenant-leak: the outcomes waiting to be copied to Redis were one pool for every tenant,
// the oldest dropped past its bound (10,000). One tenant's keyed mutations during an outage
// pushed another tenant's outcome out: once Redis was back, a repeat of that tenant's call on
// another instance found no record there and ran its mutation a second time. Past the bound, the
// tenant holding the most now gives up its oldest (the bound lowered to 3 here).
t.test('one tenant\'s calls during an outage never push another tenant\'s outcome out of those waiting for Redis', async t => {
  const proxy = await startTcpProxy(t, 6379)
  const s = await idemSetup(t, 'redis', { REDIS_URL: redisVia(proxy.port) }, {}, undefined, { idempotency: { maxPending: 3 } })
  const redis = new Redis(REDIS_URL, { lazyConnect: true })
  await redis.connect()
  t.teardown(() => redis.quit())
  proxy.cut('reset')
  await until(() => !s.app.redis.up(), 'the shared connection to notice the cut')
  const quiet = 'idem-' + randomUUID()
  const key = randomUUID()
  const first = await s.create({ name: 'quiet' }, key, quiet)
  t.equal(first.statusCode, 201)
  // Another tenant's keyed calls, more than the bound.
  for (let i = 0; i < 4; i++) t.equal((await s.create({ name: `flood-${i}` }, randomUUID())).statusCode, 201)
  t.equal(await metric(s.app, 'mantle_idempotency_pending_redis_writes'), 3, 'the bound holds')
  proxy.restore()
  await until(() => s.app.redis.up(), 'Redis to be back', 10_000)
  const at = storeKey(quiet, 'createItem', key)
  await eventually(async () => await metric(s.app, 'mantle_idempotency_pending_redis_writes') === 0, 'the writes waiting for Redis to land', 5000)
  t.match(JSON.parse((await redis.get(at)) ?? 'null'), { state: 'done' }, 'the quiet tenant\'s outcome was copied to Redis, not pushed out')
  const calls = s.calls()
  const other = await idemSetup(t, 'redis', {}, {}, s.kernel)
  const repeat = await other.create({ name: 'quiet' }, key, quiet)
  t.equal(repeat.headers['idempotent-replayed'], 'true', 'another instance replays it')
  t.equal(repeat.body, first.body, 'the first answer')
  t.equal(s.calls(), calls, 'never a second Kernel call')
})
