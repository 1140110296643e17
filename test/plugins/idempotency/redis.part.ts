import t from 'tap'
import { randomUUID } from 'node:crypto'
import { Redis } from 'ioredis'
import { bearer, closedPort, json, until } from '../../helper.js'
import { redisVia, startTcpProxy } from '../../proxy.js'
import { inputHash, storeKey, tenantIndex } from '../../../plugins/idempotency/index.js'
import { idemSetup, REDIS_URL, type Answer } from './idempotency-helper.js'

async function redisClient (t: { teardown: (fn: () => unknown) => void }): Promise<Redis> {
  const client = new Redis(REDIS_URL, { lazyConnect: true })
  await client.connect()
  t.teardown(() => client.quit())
  return client
}

const metric = async (app: { inject: (o: { method: 'GET', url: string }) => Promise<{ body: string }> }, name: string): Promise<number> => {
  const m = new RegExp(`^${name} (\\d+)$`, 'm').exec((await app.inject({ method: 'GET', url: '/metrics' })).body)
  return m === null ? NaN : Number(m[1])
}

t.test('two instances sharing Redis: a repeat on the other instance replays, concurrent repeats across both make one call', async t => {
  const one = await idemSetup(t, 'redis')
  const two = await idemSetup(t, 'redis', {}, {}, one.kernel)
  const tenant = one.tenant
  const key = randomUUID()
  const first = await one.create({ name: 'shared' }, key, tenant)
  const repeat = await two.create({ name: 'shared' }, key, tenant)
  t.equal(repeat.statusCode, 201)
  t.equal(repeat.body, first.body)
  t.equal(repeat.headers['idempotent-replayed'], 'true')
  t.equal(one.calls(), 1)

  const burstKey = randomUUID()
  const gate = one.hold()
  const pending = Array.from({ length: 10 }, async (_, i) => await (i % 2 === 0 ? one : two).create({ name: 'burst' }, burstKey, tenant))
  await until(() => one.calls() === 2, 'the first burst call to reach the Kernel')
  await new Promise(resolve => setTimeout(resolve, 50))
  gate.open()
  const answers = await Promise.all(pending)
  t.same(answers.map(a => a.statusCode), Array(10).fill(201))
  t.equal(new Set(answers.map(a => a.body)).size, 1)
  t.equal(one.calls(), 2, 'one Kernel call for ten calls on two instances')
})

t.test('a keyed call claimed in Redis counts as a running claim of store redis until it ends', async t => {
  const s = await idemSetup(t, 'redis')
  const gate = s.hold()
  const slow = s.create({ name: 'a' }, randomUUID())
  await until(() => s.calls() === 1, 'the call to reach the Kernel')
  const text = (await s.app.inject({ method: 'GET', url: '/metrics' })).body
  t.match(text, /mantle_idempotency_running_claims\{store="redis"\} 1\n/, 'claimed in Redis, held here')
  t.match(text, /mantle_idempotency_running_claims\{store="memory"\} 0\n/)
  gate.open()
  await slow
  t.match((await s.app.inject({ method: 'GET', url: '/metrics' })).body, /mantle_idempotency_running_claims\{store="redis"\} 0\n/, 'none once it ended')
})

t.test('Redis is the default store when REDIS_URL is set, and keys are where the README says', async t => {
  const s = await idemSetup(t, 'redis', { BFF_IDEMPOTENCY_STORE: undefined })
  t.equal(s.app.idempotency.store, 'redis')
  const key = randomUUID()
  await s.create({ name: 'where' }, key)
  const redis = await redisClient(t)
  const stored = JSON.parse((await redis.get(storeKey(s.tenant, 'createItem', key)))!)
  t.same(stored, { state: 'done', hash: inputHash({ name: 'where' }), user: 'u1', status: 201, body: '{"id":"item-1","name":"where","n":1}', error: null }, 'the shaped answer, never undeclared fields')
  const ttl = await redis.pttl(storeKey(s.tenant, 'createItem', key))
  t.ok(ttl > 0 && ttl <= 120_000, 'kept for the TTL')
})

t.test('a key held by a crashed instance frees itself when its lease lapses', async t => {
  const s = await idemSetup(t, 'redis', { BFF_IDEMPOTENCY_WAIT_MS: 0 })
  const key = randomUUID()
  const redis = await redisClient(t)
  // What an instance that died mid-call leaves behind: a running claim with a short lease.
  await redis.set(storeKey(s.tenant, 'createItem', key), JSON.stringify({ state: 'running', hash: inputHash({ name: 'orphan' }), token: 'dead' }), 'PX', 300)
  const blocked = await s.create({ name: 'orphan' }, key)
  t.equal(blocked.statusCode, 409, 'while the lease runs')
  t.equal(s.calls(), 0)
  let answer = blocked
  const end = Date.now() + 5000
  while (answer.statusCode === 409 && Date.now() < end) {
    await new Promise(resolve => setTimeout(resolve, 50))
    answer = await s.create({ name: 'orphan' }, key)
  }
  t.equal(answer.statusCode, 201, 'claimed again after the lease')
  t.equal(s.calls(), 1)
})

t.test('a record Redis holds that this version cannot read takes the key: 409, never a Kernel call, not an outage', async t => {
  // It was taken for a Redis outage: the call was claimed in memory, ran, counted a fallback,
  // logged "Redis is unavailable", and its outcome was offered to Redis every 250 ms, never taken.
  const s = await idemSetup(t, 'redis')
  const redis = await redisClient(t)
  const hash = inputHash({ name: 'x' })
  const records = {
    garbage: 'garbage',
    'a done record without its error member': JSON.stringify({ state: 'done', hash, status: 201, body: '{"id":"item-9"}' }),
    'a done record whose body is not JSON': JSON.stringify({ state: 'done', hash, status: 201, body: '{"id":', error: null })
  }
  for (const [what, record] of Object.entries(records)) {
    const key = randomUUID()
    await redis.set(storeKey(s.tenant, 'createItem', key), record, 'PX', 60_000)
    for (const attempt of [1, 2]) {
      const answer = await s.create({ name: 'x' }, key)
      t.match([answer.statusCode, answer.json()], [409, { code: 'IDEMPOTENCY_CONFLICT' }], `${what}, attempt ${attempt}`)
      t.equal(answer.headers['retry-after'], '1')
    }
  }
  t.equal(s.calls(), 0, 'never a Kernel call')
  t.equal(await metric(s.app, 'mantle_idempotency_store_fallbacks_total'), 0, 'not a fallback')
  t.equal(await metric(s.app, 'mantle_idempotency_pending_redis_writes'), 0, 'nothing waits for Redis')
  t.equal(await metric(s.app, 'mantle_idempotency_memory_keys'), 0)
  const diagz = (await s.app.inject({ method: 'GET', url: '/diagz', headers: bearer({ roles: ['system'] }) })).json()
  t.match(diagz.stores.idempotency, { type: 'redis', healthy: true }, 'Redis is healthy')
})

t.test('a key of another type under a record\'s name takes the key as an unreadable record does; under a tenant\'s index, it is made anew', async t => {
  // Some other program wrote a hash or a string there: the scripts failed WRONGTYPE, taken for a
  // Redis outage. A record's key: the call ran from memory, on each instance (a second Kernel call
  // for a repeat on another), and its outcome was offered to Redis every 250 ms for its TTL. A
  // tenant's index: every keyed call of that tenant ran so, for as long as the index was there.
  const one = await idemSetup(t, 'redis')
  const two = await idemSetup(t, 'redis', {}, {}, one.kernel)
  const redis = await redisClient(t)
  const taken = randomUUID()
  const record = storeKey(one.tenant, 'createItem', taken)
  await redis.hset(record, 'some', 'hash')
  await redis.pexpire(record, 60_000)
  for (const s of [one, two]) {
    const answer = await s.create({ name: 'x' }, taken, one.tenant)
    t.match([answer.statusCode, answer.json()], [409, { code: 'IDEMPOTENCY_CONFLICT' }], 'a record of another type: 409')
  }
  t.equal(one.calls(), 0, `never a Kernel call (${one.calls()})`)

  const tenant = 'idem-' + randomUUID()
  const key = randomUUID()
  const index = tenantIndex(storeKey(tenant, 'createItem', key))!.index
  await redis.set(index, 'a string', 'PX', 60_000)
  t.teardown(async () => { await redis.del(index) })
  const first = await one.create({ name: 'y' }, key, tenant)
  t.equal(first.statusCode, 201)
  const repeat = await two.create({ name: 'y' }, key, tenant)
  t.equal(repeat.headers['idempotent-replayed'], 'true', 'a repeat on another instance replays')
  t.equal(one.calls(), 1, `one Kernel call (${one.calls()})`)
  t.equal(await redis.type(index), 'zset', 'the index is made anew')
  for (const s of [one, two]) {
    t.equal(await metric(s.app, 'mantle_idempotency_store_fallbacks_total'), 0, 'not a fallback')
    t.equal(await metric(s.app, 'mantle_idempotency_pending_redis_writes'), 0, 'nothing waits for Redis')
  }
})

t.test('Redis refusing the store a command (an ACL changed) is still a refusal: the call runs from memory, never 409 for an unreadable record', async t => {
  // The scripts read with pcall to tell a key of another type: any other failure is raised as before.
  const admin = await redisClient(t)
  const name = `mantle-test-${randomUUID()}`
  await admin.call('ACL', 'SETUSER', name, 'on', '>s3cret-pw-0123', '~bff:*', '&bff:*', '+@all')
  t.teardown(async () => { await admin.call('ACL', 'DELUSER', name) })
  const url = new URL(REDIS_URL)
  const s = await idemSetup(t, 'redis', { REDIS_URL: `redis://${name}:s3cret-pw-0123@${url.host}${url.pathname}` })
  t.equal((await s.create({ name: 'a' }, randomUUID())).statusCode, 201, 'claimed in Redis')
  await admin.call('ACL', 'SETUSER', name, '-get')
  const answer = await s.create({ name: 'b' }, randomUUID())
  t.equal(answer.statusCode, 201, 'the call runs, claimed in memory')
  t.equal(await metric(s.app, 'mantle_idempotency_store_fallbacks_total'), 1, 'as a fallback')
})

t.test('Redis cut through a proxy: no 5xx, keys held in memory, back to Redis after the cut', async t => {
  const proxy = await startTcpProxy(t, 6379)
  const s = await idemSetup(t, 'redis', { REDIS_URL: redisVia(proxy.port) })
  const redis = await redisClient(t)
  const before = randomUUID()
  t.equal((await s.create({ name: 'before' }, before)).statusCode, 201)
  t.ok(await redis.exists(storeKey(s.tenant, 'createItem', before)), 'claimed in Redis')

  for (const mode of ['reset', 'stall'] as const) {
    proxy.cut(mode)
    await until(() => !s.app.redis.up(), 'the shared connection to notice the cut')
    const key = randomUUID()
    const answers = await Promise.all(Array.from({ length: 5 }, async () => await s.create({ name: mode }, key)))
    t.same(answers.map(a => a.statusCode), Array(5).fill(201), `no 5xx while Redis is cut (${mode})`)
    t.equal(answers.filter(a => a.headers['idempotent-replayed'] === 'true').length, 4, 'still once per key, from memory')
    t.notOk(await redis.exists(storeKey(s.tenant, 'createItem', key)), 'nothing reached Redis')
    proxy.restore()
    await until(() => s.app.redis.up(), 'Redis to be back', 10_000)
  }
  t.equal(await metric(s.app, 'mantle_idempotency_store_fallbacks_total'), 10, 'each call counted once, the waiting repeats too')
  const after = randomUUID()
  t.equal((await s.create({ name: 'after' }, after)).statusCode, 201)
  t.ok(await redis.exists(storeKey(s.tenant, 'createItem', after)), 'back to Redis')
  t.equal((await s.create({ name: 'before' }, before)).headers['idempotent-replayed'], 'true', 'keys from before the cut still replay')
})

t.test('Redis cut while the first call runs: one Kernel call for every repeat, on this instance during the cut and on every instance after it', async t => {
  const proxy = await startTcpProxy(t, 6379)
  const s = await idemSetup(t, 'redis', { REDIS_URL: redisVia(proxy.port) })
  const other = await idemSetup(t, 'redis', {}, {}, s.kernel)
  const redis = await redisClient(t)
  const key = randomUUID()
  const stored = storeKey(s.tenant, 'createItem', key)
  const gate = s.hold()
  const pending = s.create({ name: 'mid' }, key)
  await until(() => s.calls() === 1, 'the call to reach the Kernel')
  t.equal(await metric(s.app, 'mantle_idempotency_memory_keys'), 0, 'a call claimed in Redis is no key of the memory store')
  proxy.cut('reset')
  await until(() => !s.app.redis.up(), 'the shared connection to notice the cut')
  // A repeat while the first runs waits for it: the instance knows its own call, Redis or not
  // (it claimed the key in memory and ran a second call).
  const repeat = s.create({ name: 'mid' }, key)
  await new Promise(resolve => setTimeout(resolve, 200))
  t.equal(s.calls(), 1, 'the repeat waits')
  gate.open()
  const [answer, again] = await Promise.all([pending, repeat])
  t.equal(answer.statusCode, 201, 'the outcome could not be stored in Redis, and the client still gets it')
  t.same([again.statusCode, again.headers['idempotent-replayed'], again.json()], [201, 'true', answer.json()], 'the repeat replays it')
  // Redis did not take the outcome: this instance keeps it (before, a repeat here ran again).
  const later = await s.create({ name: 'mid' }, key)
  t.same([later.statusCode, later.headers['idempotent-replayed'], s.calls()], [201, 'true', 1], 'a repeat during the cut replays')
  t.equal(JSON.parse((await redis.get(stored))!).state, 'running', 'Redis still holds the claim of the call')
  t.ok(await redis.pttl(stored) <= 15_000, 'leased for the op timeout plus 5 s')

  t.equal(await metric(s.app, 'mantle_idempotency_memory_keys'), 1, 'the outcome kept in memory')

  proxy.restore()
  // Copied over the claim in Redis as soon as Redis takes it, without waiting for a repeat to
  // come back to this instance (before, one reaching another instance waited for the lease,
  // then ran the call again).
  let copied: Record<string, unknown> = {}
  for (const began = Date.now(); Date.now() - began < 10_000; await new Promise(resolve => setTimeout(resolve, 50))) {
    copied = JSON.parse((await redis.get(stored))!) as Record<string, unknown>
    if (copied.state === 'done') break
  }
  t.match(copied, { state: 'done', status: 201, body: answer.body }, 'the outcome is copied over the call\'s claim in Redis')
  t.notOk('heldAs' in copied, 'without the claim it answers')
  t.ok(await redis.pttl(stored) > 60_000, 'for the TTL it has left, not the lease')
  const elsewhere = await other.create({ name: 'mid' }, key, s.tenant)
  t.same([elsewhere.statusCode, elsewhere.headers['idempotent-replayed'], elsewhere.json(), s.calls()], [201, 'true', answer.json(), 1], 'another instance replays it at once, not after the lease')
  t.equal((await s.create({ name: 'mid' }, key)).headers['idempotent-replayed'], 'true', 'and so does this one')
  await redis.del(stored)
})

// The outcome Redis did not take was offered to it again only while the call's claim there was
// leased (the op's timeout plus the margin): a Redis away for longer (a failover takes 30 s and
// more) came back with the claim gone and the key free, the outcome still kept here for its TTL but
// no longer offered, and a repeat on another instance claimed the key and ran the Kernel call again.
t.test('an outcome Redis did not take, Redis away for longer than its claim\'s lease: copied once Redis is back, another instance replays it', async t => {
  const proxy = await startTcpProxy(t, 6379)
  // quickItem: a 1 s timeout, so a lease of 1.5 s with this margin.
  const s = await idemSetup(t, 'redis', { REDIS_URL: redisVia(proxy.port) }, {}, undefined, { idempotency: { leaseMarginMs: 500 } })
  const other = await idemSetup(t, 'redis', {}, {}, s.kernel)
  const redis = await redisClient(t)
  let answer!: () => void
  const answered = new Promise<void>(resolve => { answer = resolve })
  s.kernel.on('POST /v1/quick', async (_req, res) => {
    await answered
    json(res, 201, { id: 'q-' + s.calls('POST /v1/quick') })
  })
  const key = randomUUID()
  const stored = storeKey(s.tenant, 'quickItem', key)
  t.teardown(() => redis.del(stored))
  const quick = async (app: typeof s.app) => await app.inject({ method: 'POST', url: '/api/v1/quick', headers: s.headers(key), payload: { name: 'long' } })
  const first = quick(s.app)
  await until(() => s.calls('POST /v1/quick') === 1, 'the call to reach the Kernel')
  t.equal(JSON.parse((await redis.get(stored))!).state, 'running', 'claimed in Redis')
  proxy.cut('reset')
  await until(() => !s.app.redis.up(), 'the shared connection to notice the cut')
  answer()
  const done = await first
  t.equal(done.statusCode, 201, 'the client gets its answer, Redis away')
  // Past the claim's lease, Redis still away: the claim is gone from Redis, the key free there.
  await new Promise(resolve => setTimeout(resolve, 2500))
  t.equal(await redis.get(stored), null, 'the claim lapsed in Redis')
  proxy.restore()
  await until(() => s.app.redis.up(), 'the shared connection to be back', 10_000)
  let copied: string | null = null
  for (const began = Date.now(); copied === null && Date.now() - began < 3000; await new Promise(resolve => setTimeout(resolve, 50))) copied = await redis.get(stored)
  t.match(JSON.parse(copied ?? 'null'), { state: 'done', status: 201, body: done.body }, 'the outcome kept here is copied to Redis, the key being free there')
  const elsewhere = await quick(other.app)
  t.same([elsewhere.statusCode, elsewhere.headers['idempotent-replayed'], elsewhere.body], [201, 'true', done.body], 'another instance replays it')
  t.equal(s.calls('POST /v1/quick'), 1, 'never a second Kernel call')
})

// The lease was the op's timeout plus 5 s whatever BFF_REDIS_COMMAND_TIMEOUT_MS was (up to 60 s):
// a call whose Kernel call had ended but whose outcome Redis took late (a Redis slow within that
// timeout) lost its claim, and a repeat on another instance claimed the key and ran the Kernel
// call a second time. Shown with the outcome held back 6.5 s, past the old 6 s lease of quickItem.
t.test('a claim outlives the Redis commands a call makes after its Kernel call, each up to BFF_REDIS_COMMAND_TIMEOUT_MS', async t => {
  const proxy = await startTcpProxy(t, 6379)
  const s = await idemSetup(t, 'redis', { REDIS_URL: redisVia(proxy.port), BFF_REDIS_COMMAND_TIMEOUT_MS: 20000 })
  const other = await idemSetup(t, 'redis', {}, {}, s.kernel)
  s.kernel.on('POST /v1/quick', (_req, res) => json(res, 201, { id: 'q-' + s.calls('POST /v1/quick') }))
  const key = randomUUID()
  const call = async (on: typeof s) => await on.app.inject({ method: 'POST', url: '/api/v1/quick', headers: s.headers(key), payload: { name: 'slow redis' } })
  // The outcome of the call (and any copy of it) does not reach Redis until released.
  proxy.holdSends(chunk => chunk.toString('latin1').includes('"state":"done"'))
  const first = call(s)
  await until(() => proxy.holding > 0, 'the outcome to be held on its way to Redis')
  t.equal(s.calls('POST /v1/quick'), 1)
  await new Promise(resolve => setTimeout(resolve, 6500))
  const repeat = await call(other)
  t.equal(s.calls('POST /v1/quick'), 1, 'the repeat on the other instance did not run the call again')
  t.not(repeat.statusCode, 201, 'it waited for the claim, then was refused (409) or replayed')
  proxy.holdSends(null)
  proxy.release()
  t.equal((await first).statusCode, 201)
  let replayed: Answer | null = null
  for (const began = Date.now(); Date.now() - began < 10_000; await new Promise(resolve => setTimeout(resolve, 100))) {
    replayed = await call(other)
    if (replayed.headers['idempotent-replayed'] === 'true') break
  }
  t.same([replayed?.statusCode, replayed?.headers['idempotent-replayed'], s.calls('POST /v1/quick')], [201, 'true', 1], 'then the outcome is replayed, one Kernel call in all')
})

t.test('a Redis unreachable at start-up: the gateway starts and keys are held in memory', async t => {
  const s = await idemSetup(t, 'redis', { REDIS_URL: `redis://127.0.0.1:${await closedPort()}` })
  const key = randomUUID()
  t.equal((await s.create({ name: 'x' }, key)).statusCode, 201)
  t.equal((await s.create({ name: 'x' }, key)).headers['idempotent-replayed'], 'true')
  t.equal(s.calls(), 1)
})

t.test('Redis away: a repeat waiting for the first call counts one fallback, not one per poll', async t => {
  const s = await idemSetup(t, 'redis', { REDIS_URL: `redis://127.0.0.1:${await closedPort()}` })
  const key = randomUUID()
  const gate = s.hold()
  const first = s.create({ name: 'held' }, key)
  await until(() => s.calls() === 1, 'the first call to reach the Kernel')
  t.equal(await metric(s.app, 'mantle_idempotency_store_fallbacks_total'), 1)
  const repeat = s.create({ name: 'held' }, key)
  // The repeat polls the memory store many times meanwhile (every 5 ms at first, backing off).
  await new Promise(resolve => setTimeout(resolve, 600))
  gate.open()
  const [a, b] = await Promise.all([first, repeat])
  t.same([a.statusCode, b.statusCode, b.headers['idempotent-replayed']], [201, 201, 'true'])
  t.equal(s.calls(), 1)
  t.equal(await metric(s.app, 'mantle_idempotency_store_fallbacks_total'), 2, 'two calls, two fallbacks')
})

t.test('a repeat waiting on the instance that runs the first call, Redis failing once the outcome is there: never a second Kernel call', async t => {
  const proxy = await startTcpProxy(t, 6379)
  const s = await idemSetup(t, 'redis', { REDIS_URL: redisVia(proxy.port) })
  const key = randomUUID()
  const gate = s.hold()
  const first = s.create({ name: 'then' }, key)
  await until(() => s.calls() === 1, 'the first call to reach the Kernel')
  // The repeat finds the first call held on this instance, and polls every 200 ms by now.
  const repeat = s.create({ name: 'then' }, key)
  await new Promise(resolve => setTimeout(resolve, 1000))
  // Once the first call's outcome is on its way to Redis, the claims sent after it (the
  // repeat's next poll) get no answer: Redis fails after taking the outcome, before the poll.
  proxy.watch(chunk => {
    if (!chunk.toString('latin1').includes('"state":"done"')) return
    proxy.watch(null)
    proxy.holdSends(sent => {
      const text = sent.toString('latin1')
      return text.includes('"state":"running"') && !text.includes('"state":"done"')
    })
  })
  gate.open()
  const answer = await first
  t.equal(answer.statusCode, 201)
  await until(() => proxy.holding > 0, 'the repeat\'s poll to go unanswered')
  // Past the command timeout: the poll failed (before, the repeat claimed the key in memory and
  // ran the Kernel call a second time), and the next ones with it until Redis answers.
  await new Promise(resolve => setTimeout(resolve, 800))
  proxy.restore()
  const again = await repeat
  t.same([again.statusCode, again.headers['idempotent-replayed'], again.body, s.calls()], [201, 'true', answer.body, 1], 'the repeat replays the first call\'s outcome once Redis answers')
})

t.test('an outcome stored in memory while Redis was away reaches Redis once it is back: a repeat on another instance replays it', async t => {
  const proxy = await startTcpProxy(t, 6379)
  const s = await idemSetup(t, 'redis', { REDIS_URL: redisVia(proxy.port) })
  const other = await idemSetup(t, 'redis', {}, {}, s.kernel)
  const redis = await redisClient(t)
  proxy.cut('reset')
  await until(() => !s.app.redis.up(), 'the shared connection to notice the cut')
  const key = randomUUID()
  const stored = storeKey(s.tenant, 'createItem', key)
  const answer = await s.create({ name: 'away' }, key)
  t.equal(answer.statusCode, 201)
  t.equal(await metric(s.app, 'mantle_idempotency_pending_redis_writes'), 1, 'waiting for Redis')
  proxy.restore()
  // Copied without a repeat reaching this instance (before, only a repeat here copied it, and
  // one reaching another instance first ran the Kernel call a second time).
  await until(() => s.app.redis.up(), 'Redis to be back', 10_000)
  let copied: string | null = null
  for (const began = Date.now(); copied === null && Date.now() - began < 5_000; await new Promise(resolve => setTimeout(resolve, 50))) copied = await redis.get(stored)
  t.match(JSON.parse(copied ?? '{}'), { state: 'done', status: 201, body: answer.body }, 'the outcome is in Redis')
  t.ok(await redis.pttl(stored) > 60_000, 'for the TTL it has left')
  const elsewhere = await other.create({ name: 'away' }, key, s.tenant)
  t.same([elsewhere.statusCode, elsewhere.headers['idempotent-replayed'], elsewhere.body, s.calls()], [201, 'true', answer.body, 1], 'another instance replays it')
  await redis.del(stored)
})

t.test('a tenant past its bound of records in Redis: its new keys are refused 429 before any Kernel call, others run', async t => {
  const s = await idemSetup(t, 'redis', { BFF_IDEMPOTENCY_REDIS_MAX_KEYS_PER_TENANT: 2 })
  const redis = await redisClient(t)
  t.teardown(() => redis.del(tenantIndex(storeKey(s.tenant, 'createItem', 'k'))!.index))
  const first = randomUUID()
  t.equal((await s.create({ name: 'a' }, first)).statusCode, 201)
  t.equal((await s.create({ name: 'b' }, randomUUID())).statusCode, 201)
  const refused = await s.create({ name: 'c' }, randomUUID())
  t.match([refused.statusCode, refused.json()], [429, { code: 'RATE_LIMITED' }], 'the third key is refused')
  const retryAfter = Number(refused.headers['retry-after'])
  t.ok(retryAfter >= 1 && retryAfter <= 120, 'until its oldest record expires (the test TTL, 120 s)')
  t.equal(s.calls(), 2, 'never a Kernel call for it')
  const repeat = await s.create({ name: 'a' }, first)
  t.match([repeat.statusCode, repeat.headers['idempotent-replayed']], [201, 'true'], 'its stored outcomes still replay')
  t.equal((await s.create({ name: 'd' })).statusCode, 201, 'a mutation without a key runs')
  t.equal((await s.create({ name: 'e' }, randomUUID(), 'idem-' + randomUUID())).statusCode, 201, 'another tenant\'s keys run')
  t.equal(s.calls(), 4)
  t.equal(await metric(s.app, 'mantle_idempotency_tenant_full_total\\{op="createItem"\\}'), 1, 'counted')
  t.equal(await metric(s.app, 'mantle_idempotency_store_fallbacks_total'), 0, 'not an outage: nothing claimed in memory')
})

// The refusal carried Retry-After alone, so the RateLimit-* already on the response stayed: the
// HTTP guard's (or the operation's limit's), with places left and an earlier reset. A 429 said
// "RateLimit-Remaining: 97, RateLimit-Reset: 26" beside "Retry-After: 60": a client that read
// RateLimit-* sent again at once, or at the reset, and was refused again.
t.test('a tenant past its bound of records: the 429 carries RateLimit-* of its own, never the guard\'s places left, on every face', async t => {
  const s = await idemSetup(t, 'redis', { BFF_IDEMPOTENCY_REDIS_MAX_KEYS_PER_TENANT: 1, BFF_RATE_LIMIT_GLOBAL_MAX: 1000 })
  const redis = await redisClient(t)
  t.teardown(() => redis.del(tenantIndex(storeKey(s.tenant, 'createItem', 'k'))!.index))
  t.equal((await s.create({ name: 'a' }, randomUUID())).statusCode, 201)
  const rest = await s.create({ name: 'b' }, randomUUID())
  const trpc = await s.app.inject({ method: 'POST', url: '/trpc/createItem', headers: { ...s.headers(randomUUID()), 'content-type': 'application/json' }, payload: { name: 'c' } })
  const gql = await s.app.inject({ method: 'POST', url: '/graphql', headers: s.headers(randomUUID()), payload: { query: 'mutation { createItem(name: "d") { id } }' } })
  t.match(gql.json(), { errors: [{ extensions: { code: 'RATE_LIMITED', status: 429 } }] })
  for (const [face, res] of [['REST', rest], ['tRPC', trpc], ['GraphQL', gql]] as const) {
    const h = res.headers
    t.ok(Number(h['retry-after']) >= 1, `${face}: Retry-After ${String(h['retry-after'])}`)
    t.same([h['ratelimit-limit'], h['ratelimit-remaining'], h['ratelimit-reset']], ['1', '0', h['retry-after']], `${face}: the bound, none left, reset when Retry-After says`)
  }
  t.equal(s.calls(), 1)
  // Rate limits off: nothing else sets RateLimit-*, and the OpenAPI document declares none then.
  const off = await idemSetup(t, 'redis', { BFF_IDEMPOTENCY_REDIS_MAX_KEYS_PER_TENANT: 1, BFF_RATE_LIMIT_ENABLED: false })
  t.teardown(() => redis.del(tenantIndex(storeKey(off.tenant, 'createItem', 'k'))!.index))
  await off.create({ name: 'a' }, randomUUID())
  const plain = await off.create({ name: 'b' }, randomUUID())
  t.same([plain.statusCode, Number(plain.headers['retry-after']) >= 1, 'ratelimit-limit' in plain.headers], [429, true, false], 'rate limits off: Retry-After alone')
})
