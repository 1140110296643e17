// The semantics of idempotency keys, the same on both stores: each store's test file runs them
// (two files, so that each stays well inside tap's per-file timeout on a loaded machine).
import type { Test } from 'tap'
import { randomUUID } from 'node:crypto'
import { bearer, json, until } from '../../helper.js'
import { idemSetup, type StoreKind } from './idempotency-helper.js'

export function semantics (t: Test, store: StoreKind): void {
  t.test('a repeat replays the stored status and body with Idempotent-Replayed, and the Kernel runs once', async t => {
    const s = await idemSetup(t, store)
    const key = randomUUID()
    const first = await s.create({ name: 'a', tags: ['x'], size: 1 }, key)
    t.equal(first.statusCode, 201)
    t.same(first.json(), { id: 'item-1', name: 'a', n: 1 })
    t.notOk(first.headers['idempotent-replayed'], 'the first call is not a replay')
    // The same input with its keys in another order is the same input.
    const again = await s.create({ size: 1, tags: ['x'], name: 'a' }, key)
    t.equal(again.statusCode, 201, 'the stored status')
    t.equal(again.body, first.body, 'the same body')
    t.equal(again.headers['idempotent-replayed'], 'true')
    t.equal(s.calls(), 1, 'exactly one Kernel call')
    t.equal(s.kernel.requests[0].headers['idempotency-key'], key, 'the key reaches the Kernel')
  })

  t.test('the same key with another input is refused with 422 IDEMPOTENCY_KEY_REUSED', async t => {
    const s = await idemSetup(t, store)
    const key = randomUUID()
    t.equal((await s.create({ name: 'a' }, key)).statusCode, 201)
    const other = await s.create({ name: 'b' }, key)
    t.equal(other.statusCode, 422)
    t.match(other.json(), { code: 'IDEMPOTENCY_KEY_REUSED', status: 422 })
    t.equal(s.calls(), 1)
    const gate = s.hold()
    const key2 = randomUUID()
    const running = s.create({ name: 'c' }, key2)
    await until(() => s.calls() === 2, 'the second key to reach the Kernel')
    const whileRunning = await s.create({ name: 'd' }, key2)
    t.equal(whileRunning.statusCode, 422, 'refused at once while the first still runs')
    gate.open()
    t.equal((await running).statusCode, 201)
  })

  t.test('the key is per tenant and per operation', async t => {
    const s = await idemSetup(t, store)
    const key = randomUUID()
    const a = await s.create({ name: 'same' }, key)
    const other = 'idem-' + randomUUID()
    const b = await s.create({ name: 'same' }, key, other)
    t.equal(b.statusCode, 201)
    t.notOk(b.headers['idempotent-replayed'], 'tenant B runs its own call')
    t.not(b.json().id, a.json().id)
    t.equal(s.calls(), 2)
    t.equal(s.kernel.requests[1].headers['x-tenant-id'], other)
    const rename = await s.app.inject({ method: 'PATCH', url: '/api/v1/items/x', headers: s.headers(key), payload: { name: 'same' } })
    t.equal(rename.statusCode, 200)
    t.notOk(rename.headers['idempotent-replayed'], 'another op runs its own call')
    t.equal(s.calls('PATCH /v1/items/x'), 1)
  })

  // The key is the tenant's, but the answer is the user's: the Kernel made it for the first
  // user (its x-user-id and x-user-roles). Another user of the tenant sending the same key and
  // input got that answer replayed (a token the Kernel minted for the first user, say), or waited
  // for it while the first call ran: a leak to anyone who learnt or guessed the key.
  t.test('another user of the tenant with the same key and input is refused 422, never given the first user\'s answer', async t => {
    const s = await idemSetup(t, store)
    const key = randomUUID()
    const as = (user: string): Record<string, string> => ({ ...bearer({ tenant: s.tenant, user }), 'idempotency-key': key })
    const create = async (user: string) => await s.app.inject({ method: 'POST', url: '/api/v1/items', headers: as(user), payload: { name: 'mine' } })
    const gate = s.hold()
    const first = create('u1')
    await until(() => s.calls() === 1, 'the first call to reach the Kernel')
    const whileRunning = await create('u2')
    t.equal(whileRunning.statusCode, 422, 'refused at once while the first runs, not made to wait for its answer')
    t.match(whileRunning.json(), { code: 'IDEMPOTENCY_KEY_REUSED', status: 422 })
    gate.open()
    const answer = await first
    t.equal(answer.statusCode, 201)
    const other = await create('u2')
    t.equal(other.statusCode, 422)
    t.match(other.json(), { code: 'IDEMPOTENCY_KEY_REUSED', status: 422 })
    t.notOk(other.headers['idempotent-replayed'])
    t.notMatch(other.body, /item-1/, 'nothing of the first user\'s answer')
    const own = await create('u1')
    t.equal(own.headers['idempotent-replayed'], 'true', 'the first user\'s own repeat replays')
    t.equal(own.body, answer.body)
    t.equal(s.calls(), 1, 'one Kernel call')
  })

  t.test('20 concurrent repeats while the first runs make exactly one Kernel call and all get its answer', async t => {
    const s = await idemSetup(t, store)
    const key = randomUUID()
    const gate = s.hold()
    const pending = Array.from({ length: 20 }, async () => await s.create({ name: 'burst' }, key))
    await until(() => s.calls() === 1, 'the first call to reach the Kernel')
    // Let the repeats reach their wait before the first answers.
    await new Promise(resolve => setTimeout(resolve, 50))
    gate.open()
    const answers = await Promise.all(pending)
    t.same(answers.map(a => a.statusCode), Array(20).fill(201))
    t.equal(new Set(answers.map(a => a.body)).size, 1, 'one answer for all')
    t.equal(answers.filter(a => a.headers['idempotent-replayed'] === 'true').length, 19)
    t.equal(s.calls(), 1, 'exactly one Kernel call')
  })

  t.test('with BFF_IDEMPOTENCY_WAIT_MS=0 a repeat while the first runs gets 409 IDEMPOTENCY_CONFLICT, then the replay', async t => {
    const s = await idemSetup(t, store, { BFF_IDEMPOTENCY_WAIT_MS: 0 })
    const key = randomUUID()
    const gate = s.hold()
    const first = s.create({ name: 'slow' }, key)
    await until(() => s.calls() === 1, 'the first call to reach the Kernel')
    const repeats = await Promise.all([s.create({ name: 'slow' }, key), s.create({ name: 'slow' }, key)])
    for (const r of repeats) {
      t.equal(r.statusCode, 409)
      t.match(r.json(), { code: 'IDEMPOTENCY_CONFLICT', status: 409 })
      t.equal(r.headers['retry-after'], '1')
    }
    gate.open()
    t.equal((await first).statusCode, 201)
    const after = await s.create({ name: 'slow' }, key)
    t.equal(after.headers['idempotent-replayed'], 'true')
    t.equal(s.calls(), 1)
  })

  t.test('a Kernel 5xx releases the key: the repeat runs again, and its success is then stored', async t => {
    const s = await idemSetup(t, store)
    let fail = true
    s.kernel.on('POST /v1/safe', (_req, res) => { fail ? json(res, 500, { message: 'boom' }) : json(res, 201, { id: 'q1' }) })
    const key = randomUUID()
    const call = async () => await s.app.inject({ method: 'POST', url: '/api/v1/safe', headers: s.headers(key), payload: { name: 'q' } })
    const first = await call()
    t.equal(first.statusCode, 502)
    t.equal(first.json().code, 'KERNEL_ERROR')
    fail = false
    const second = await call()
    t.equal(second.statusCode, 201, 'the repeat ran again')
    t.notOk(second.headers['idempotent-replayed'])
    const third = await call()
    t.equal(third.headers['idempotent-replayed'], 'true')
    t.equal(s.calls('POST /v1/safe'), 2)
  })

  t.test('a Kernel answer that breaks the output schema is KERNEL_ERROR and releases the key', async t => {
    const s = await idemSetup(t, store)
    let broken = true
    s.kernel.on('POST /v1/safe', (_req, res) => json(res, 201, broken ? { name: 'no id' } : { id: 'q3' }))
    const key = randomUUID()
    const call = async () => await s.app.inject({ method: 'POST', url: '/api/v1/safe', headers: s.headers(key), payload: {} })
    t.equal((await call()).json().code, 'KERNEL_ERROR')
    broken = false
    const second = await call()
    t.equal(second.statusCode, 201)
    t.notOk(second.headers['idempotent-replayed'], 'the repeat ran again')
    t.equal(s.calls('POST /v1/safe'), 2)
  })

  t.test('a Kernel timeout releases the key: the repeat runs again carrying the same Idempotency-Key', async t => {
    const s = await idemSetup(t, store)
    let slow = true
    s.kernel.on('POST /v1/quick', async (_req, res) => {
      if (slow) await new Promise(resolve => setTimeout(resolve, 2500))
      json(res, 201, { id: 'q2' })
    })
    const key = randomUUID()
    const call = async () => await s.app.inject({ method: 'POST', url: '/api/v1/quick', headers: s.headers(key), payload: { name: 'q' } })
    const first = await call()
    t.equal(first.statusCode, 504)
    t.equal(first.json().code, 'KERNEL_TIMEOUT')
    slow = false
    const second = await call()
    t.equal(second.statusCode, 201)
    t.notOk(second.headers['idempotent-replayed'])
    const sent = s.kernel.requests.filter(r => r.url === '/v1/quick')
    t.same(sent.map(r => r.headers['idempotency-key']), [key, key], 'the Kernel can dedupe by the key it sees twice')
  })

  t.test('a definitive Kernel refusal is stored and replayed; 429 and 404 behave as documented', async t => {
    const s = await idemSetup(t, store)
    let status = 409
    s.kernel.on('POST /v1/safe', (_req, res) => json(res, status, { message: `refused ${status}` }))
    const call = async (key: string) => await s.app.inject({ method: 'POST', url: '/api/v1/safe', headers: s.headers(key), payload: { name: 'q' } })
    const key = randomUUID()
    const first = await call(key)
    t.equal(first.statusCode, 409)
    t.match(first.json(), { code: 'KERNEL_REJECTED', detail: 'refused 409' })
    const again = await call(key)
    t.equal(again.statusCode, 409)
    t.match(again.json(), { code: 'KERNEL_REJECTED', detail: 'refused 409' })
    t.equal(again.headers['idempotent-replayed'], 'true', 'a replayed refusal says so')
    t.equal(s.calls('POST /v1/safe'), 1)

    status = 404
    const gone = randomUUID()
    t.equal((await call(gone)).json().code, 'NOT_FOUND')
    t.equal((await call(gone)).headers['idempotent-replayed'], 'true', 'NOT_FOUND is final too')
    t.equal(s.calls('POST /v1/safe'), 2)

    status = 429
    const busy = randomUUID()
    t.equal((await call(busy)).statusCode, 429)
    const retried = await call(busy)
    t.equal(retried.statusCode, 429)
    t.notOk(retried.headers['idempotent-replayed'], 'a Kernel 429 means later: the key is released')
    t.equal(s.calls('POST /v1/safe'), 4)
  })

  // A Kernel 4xx with Retry-After (423 Locked, a 409 "busy") tells the client to send it again
  // later. It was stored as final: the client, retrying as told with the same key, got the
  // refusal replayed (without its Retry-After) for 24 h, and the key could never succeed.
  t.test('a Kernel refusal that asks for a retry (Retry-After) releases the key, as a 429 does', async t => {
    const s = await idemSetup(t, store)
    let status = 423
    s.kernel.on('POST /v1/safe', (_req, res) => {
      if (status !== 201) res.setHeader('retry-after', '2')
      json(res, status, status === 201 ? { id: 'l1' } : { message: 'locked' })
    })
    const key = randomUUID()
    const call = async () => await s.app.inject({ method: 'POST', url: '/api/v1/safe', headers: s.headers(key), payload: { name: 'q' } })
    const first = await call()
    t.same([first.statusCode, first.json().code, first.headers['retry-after']], [423, 'KERNEL_REJECTED', '2'])
    status = 201
    const retried = await call()
    t.equal(retried.statusCode, 201, 'the retry the Kernel asked for runs')
    t.notOk(retried.headers['idempotent-replayed'])
    t.equal((await call()).headers['idempotent-replayed'], 'true', 'and its success is stored')
    t.equal(s.calls('POST /v1/safe'), 2)
  })

  t.test('with a key the Kernel client retries a failing mutation, and the outcome is stored once', async t => {
    const s = await idemSetup(t, store, {}, { retries: 2 })
    let failures = 2
    s.kernel.on('POST /v1/safe', (_req, res) => { failures-- > 0 ? json(res, 503, {}) : json(res, 201, { id: 'r1' }) })
    const key = randomUUID()
    const call = async (withKey: boolean) => await s.app.inject({ method: 'POST', url: '/api/v1/safe', headers: s.headers(withKey ? key : undefined), payload: {} })
    const first = await call(true)
    t.equal(first.statusCode, 201, 'two 503s retried')
    const sent = s.kernel.requests.filter(r => r.url === '/v1/safe')
    t.same(sent.map(r => r.headers['idempotency-key']), [key, key, key], 'every attempt carries the key')
    t.equal((await call(true)).headers['idempotent-replayed'], 'true')
    t.equal(s.calls('POST /v1/safe'), 3)
    failures = 1
    t.equal((await call(false)).statusCode, 502, 'without a key a mutation is never retried')
    t.equal(s.calls('POST /v1/safe'), 4)
  })

  t.test('without a key every call runs; queries have no idempotency stage', async t => {
    const s = await idemSetup(t, store)
    t.notOk((await s.create({ name: 'a' })).headers['idempotent-replayed'])
    t.notOk((await s.create({ name: 'a' })).headers['idempotent-replayed'])
    t.equal(s.calls(), 2)
    t.ok(s.app.pipeline.entry('createItem').stages.includes('idempotency'))
    t.notOk(s.app.pipeline.entry('getItem').stages.includes('idempotency'))
    t.equal(s.app.idempotency.store, store)
  })

  t.test('a stored outcome expires after BFF_IDEMPOTENCY_TTL_SECONDS', async t => {
    const s = await idemSetup(t, store, { BFF_IDEMPOTENCY_TTL_SECONDS: 1 })
    const key = randomUUID()
    await s.create({ name: 'ttl' }, key)
    let replayed = true
    const end = Date.now() + 10_000
    while (replayed && Date.now() < end) {
      await new Promise(resolve => setTimeout(resolve, 100))
      replayed = (await s.create({ name: 'ttl' }, key)).headers['idempotent-replayed'] === 'true'
    }
    t.notOk(replayed, 'after the TTL the key runs again')
    t.equal(s.calls(), 2)
  })
}
