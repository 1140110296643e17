import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { Redis } from 'ioredis'
import { Gauge } from 'prom-client'

// The one Redis command connection an instance shares between its stores (rate limits, cache,
// idempotency). Not @fastify/redis: it holds registration until Redis answers, and a gateway
// whose Redis is down at start-up must start degraded (memory stores, /readyz says so), not hang.
// Events keep their own two connections (a subscribed connection cannot run commands).

export interface SharedRedis {
  readonly client: Redis
  /** True while the connection is ready; stores fall back to memory when it is not. */
  up: () => boolean
}

declare module 'fastify' {
  interface FastifyInstance {
    /** Present only when REDIS_URL is set. */
    redis: SharedRedis
  }
}

export interface RedisOptions {
  url: string
  /** A command that takes longer fails, so a stalled Redis costs a call at most this (ms). */
  commandTimeoutMs?: number
  connectTimeoutMs?: number
}

async function redisPlugin (app: FastifyInstance, opts: RedisOptions): Promise<void> {
  // No offline queue: a command while Redis is away fails at once instead of piling up in memory.
  const client = new Redis(opts.url, {
    lazyConnect: true,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    connectTimeout: opts.connectTimeoutMs ?? 1000,
    commandTimeout: opts.commandTimeoutMs ?? 500,
    retryStrategy: (n: number) => Math.min(n * 100, 1000),
    connectionName: 'mantle'
  })
  let warned = false
  client.on('error', (err: Error) => {
    if (!warned) app.log.warn({ err: err.message }, 'Redis connection error: stores fall back to memory until it is back')
    warned = true
  })
  client.on('ready', () => {
    if (warned) app.log.info('Redis is back')
    warned = false
  })
  const up = (): boolean => client.status === 'ready'

  if (app.hasDecorator('metrics')) {
    new Gauge({ name: 'mantle_redis_up', help: '1 when the shared Redis connection is ready (absent without Redis)', registers: [app.metrics.registry], collect () { this.set(up() ? 1 : 0) } }) // eslint-disable-line no-new
  }
  app.decorate('redis', { client, up })

  // A Redis down at start-up leaves the gateway up and degraded; ioredis keeps reconnecting.
  await client.connect().catch((err: Error) => {
    app.log.warn({ err: err.message }, 'Redis is unreachable at start-up: running on memory stores until it is back')
  })

  // quit() waits for the server: a client still retrying a Redis that is away must disconnect.
  app.addHook('onClose', async () => {
    if (client.status === 'ready') await client.quit().catch(() => client.disconnect())
    else client.disconnect()
  })
}

export default fp(redisPlugin, { name: 'mantle-redis', fastify: '5.x' })
