import t from 'tap'
import { randomUUID } from 'node:crypto'
import type { AddressInfo } from 'node:net'
import type { FastifyInstance } from 'fastify'
import { json, startTestKernel, until } from '../../helper.js'
import { redisVia, startTcpProxy } from '../../proxy.js'
import { storeReads } from './store-reads.js'
import { idemSetup, REDIS_URL, STORES, type IdemSetup } from './idempotency-helper.js'

// A repeat waiting for the first call with its Idempotency-Key, as the gateway shuts down. The
// shutdown's grace (server.ts) is the longest operation's timeout plus 13 s: it lets the calls in
// flight finish, each within its timeout. A waiting repeat is in flight too, and it waited on for a
// call another instance runs: until that call ended, or its claim's lease lapsed (the timeout plus
// 5 s, a crashed instance's), or, Redis away, until its wait ended, BFF_IDEMPOTENCY_WAIT_MS (600 s
// at most). Past the grace, the process was killed (exit 1, the audit not flushed), the repeat's
// client reset. Now it is answered 409 IDEMPOTENCY_CONFLICT at its next poll; one waiting for a
// call this instance runs waits on (that call ends within the grace).

// Every read of the stores a waiting repeat makes (one per poll), to know that it waits.
const claims = storeReads

/** A call over HTTP (the shutdown waits for requests in flight on its connections). */
async function post (app: FastifyInstance, s: IdemSetup, key: string): Promise<{ status: number, headers: Headers, body: any }> {
  const port = (app.server.address() as AddressInfo).port
  const res = await fetch(`http://127.0.0.1:${port}/api/v1/items`, { method: 'POST', headers: { ...s.headers(key), 'content-type': 'application/json' }, body: JSON.stringify({ name: 'a' }) })
  return { status: res.status, headers: res.headers, body: await res.json() }
}

/** A Kernel whose item creations wait for `open()`, then answer `status` (the first) and 201 (later ones). */
async function heldKernel (t: Parameters<typeof startTestKernel>[0], status: number): Promise<{ kernel: Awaited<ReturnType<typeof startTestKernel>>, open: () => void }> {
  let open!: () => void
  const gate = new Promise<void>(resolve => { open = resolve })
  let n = 0
  const kernel = await startTestKernel(t, {
    'POST /v1/items': async (_req, res) => {
      const call = ++n
      await gate
      if (call === 1 && status >= 400) json(res, status, { message: 'try again' })
      else json(res, 201, { id: `item-${call}`, name: 'a', n: call })
    }
  })
  return { kernel, open }
}

/** Starts a repeat of `key` on `app` and waits until it polls for the first call (its answer in an object: awaited, it would be awaited too). */
async function waitingRepeat (app: FastifyInstance, s: IdemSetup, key: string): Promise<{ answer: Promise<{ status: number, headers: Headers, body: any }> }> {
  const before = claims()
  const answer = post(app, s, key)
  await until(() => claims() - before >= 3, 'the repeat to wait for the first call')
  return { answer }
}

for (const store of STORES) {
  t.test(`${store}: shutting down, a repeat waiting for a call this instance runs still gets its answer`, async t => {
    const { kernel, open } = await heldKernel(t, 201)
    const s = await idemSetup(t, store, {}, {}, kernel)
    await s.app.listen({ port: 0, host: '127.0.0.1' })
    const key = randomUUID()
    const first = post(s.app, s, key)
    await until(() => s.calls() === 1, 'the first call to reach the Kernel')
    const { answer: repeat } = await waitingRepeat(s.app, s, key)
    const closing = s.app.close()
    await until(() => s.app.shuttingDown(), 'the shutdown to begin')
    // Polling on through the shutdown: the first call ends within the grace.
    const polled = claims()
    await until(() => claims() - polled >= 3, 'the repeat to wait on')
    open()
    t.equal((await first).status, 201)
    const answer = await repeat
    t.equal(answer.status, 201, 'the first call\'s answer')
    t.equal(answer.headers.get('idempotent-replayed'), 'true')
    t.equal(s.calls(), 1)
    await closing
  })
}

t.test('redis: shutting down, a repeat waiting for a call another instance runs is answered 409 at its next poll', async t => {
  // Before, it waited on for the other instance's call: here until it timed out (10 s), and then
  // claimed the key, its own time gone: a 504.
  const { kernel, open } = await heldKernel(t, 201)
  t.teardown(open)
  const one = await idemSetup(t, 'redis', {}, {}, kernel)
  const two = await idemSetup(t, 'redis', {}, {}, kernel)
  await two.app.listen({ port: 0, host: '127.0.0.1' })
  const key = randomUUID()
  const first = one.create({ name: 'a' }, key, two.tenant)
  await until(() => one.calls() === 1, 'the first call to reach the Kernel')
  const { answer: repeat } = await waitingRepeat(two.app, two, key)
  const closing = two.app.close()
  const answer = await repeat
  t.equal(answer.status, 409, 'the repeat is refused, to be sent again to another instance')
  t.match(answer.body, { code: 'IDEMPOTENCY_CONFLICT', detail: /another instance/ })
  t.equal(answer.headers.get('retry-after'), '1')
  await closing
  open()
  t.equal((await first).statusCode, 201, 'the first call ends on its instance')
  t.equal(one.calls(), 1, 'one Kernel call')
  const again = await one.create({ name: 'a' }, key, two.tenant)
  t.equal(again.headers['idempotent-replayed'], 'true', 'the repeat sent again is replayed')
})

t.test('redis: shutting down, Redis away, a repeat waiting for a call Redis holds stops at its next poll: not at BFF_IDEMPOTENCY_WAIT_MS, past the grace', async t => {
  // BFF_IDEMPOTENCY_WAIT_MS 30 s, the operations' timeouts 10 s at most: the grace is 20 s. With
  // Redis away, the repeat waits for the claim it found there until its wait ends (it never
  // claims the key in memory: a second Kernel call): before, 30 s of polls, the process killed at
  // 20 s.
  const { kernel, open } = await heldKernel(t, 201)
  t.teardown(open)
  const one = await idemSetup(t, 'redis', {}, {}, kernel)
  const proxy = await startTcpProxy(t, new URL(REDIS_URL).port === '' ? 6379 : Number(new URL(REDIS_URL).port), new URL(REDIS_URL).hostname)
  const two = await idemSetup(t, 'redis', { REDIS_URL: redisVia(proxy.port), BFF_IDEMPOTENCY_WAIT_MS: 30_000 }, {}, kernel)
  await until(() => two.app.redis.up(), 'Redis to be connected')
  await two.app.listen({ port: 0, host: '127.0.0.1' })
  const key = randomUUID()
  const first = one.create({ name: 'a' }, key, two.tenant)
  await until(() => one.calls() === 1, 'the first call to reach the Kernel')
  const { answer: repeat } = await waitingRepeat(two.app, two, key)
  proxy.cut('reset')
  await until(() => !two.app.redis.up(), 'Redis to be away')
  const polled = claims()
  await until(() => claims() - polled >= 3, 'the repeat to wait on, Redis away')
  const atClose = claims()
  const closing = two.app.close()
  const answer = await repeat
  // Two reads a poll at most (Redis away, the repeat looks at what this instance holds; shutting
  // down, once more), and one poll may be under way as the shutdown begins. Before, some 150.
  t.ok(claims() - atClose <= 4, `the repeat stopped at its next poll (${claims() - atClose} store reads after the shutdown began)`)
  t.equal(answer.status, 409)
  t.match(answer.body, { code: 'IDEMPOTENCY_CONFLICT', detail: /another instance/ })
  await closing
  open()
  t.equal((await first).statusCode, 201)
  t.equal(one.calls(), 1, 'one Kernel call')
})
