// After a Redis blip (one command slower than the command timeout, the connection left up), /diagz
// said the idempotency and cache stores were unhealthy until their next call of that kind, while
// /readyz said Redis was up: they now hear, as the rate limiter does, that Redis answers again.
import t from 'tap'
import { randomUUID } from 'node:crypto'
import type { FastifyInstance } from 'fastify'
import { bearer, buildTestApp, until } from '../../helper.js'
import { redisVia, startTcpProxy } from '../../proxy.js'
import { idemSetup } from '../idempotency/idempotency-helper.js'
import { itemKernel, itemManifest } from '../cache/items.js'

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const REDIS_PORT = Number(new URL(REDIS_URL).port || 6379)

const stores = async (app: FastifyInstance): Promise<Record<string, { healthy: boolean }>> =>
  (await app.inject({ method: 'GET', url: '/diagz', headers: bearer({ roles: ['system'] }) })).json().stores

t.test('idempotency: healthy again once Redis answers, without another keyed call', async t => {
  const proxy = await startTcpProxy(t, REDIS_PORT)
  const s = await idemSetup(t, 'redis', { REDIS_URL: redisVia(proxy.port) })
  await until(() => s.app.redis.up(), 'connected')
  proxy.delay(700)
  t.equal((await s.create({ name: 'x' }, randomUUID())).statusCode, 201)
  proxy.restore()
  t.equal((await stores(s.app)).idempotency.healthy, false, 'unhealthy right after the slow claim')
  const deadline = Date.now() + 3000
  while (!(await stores(s.app)).idempotency.healthy && Date.now() < deadline) await new Promise(resolve => setTimeout(resolve, 100))
  t.equal((await stores(s.app)).idempotency.healthy, true, 'healthy within 3 s, no keyed call since')
  t.ok(s.app.redis.up())
})

t.test('cache: healthy again once Redis answers, without another cached call', async t => {
  const kernel = await itemKernel(t)
  const proxy = await startTcpProxy(t, REDIS_PORT)
  const app = await buildTestApp(t, { REDIS_URL: redisVia(proxy.port) }, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
  await until(() => app.redis.up(), 'connected')
  proxy.delay(700)
  t.equal((await app.inject({ method: 'GET', url: '/api/v1/items/a', headers: bearer({ tenant: 'blip-' + randomUUID() }) })).statusCode, 200)
  proxy.restore()
  t.equal((await stores(app)).cache.healthy, false, 'unhealthy right after the slow read')
  const deadline = Date.now() + 3000
  while (!(await stores(app)).cache.healthy && Date.now() < deadline) await new Promise(resolve => setTimeout(resolve, 100))
  t.equal((await stores(app)).cache.healthy, true, 'healthy within 3 s, no cached call since')
})
