import fp from 'fastify-plugin'
import { randomUUID } from 'node:crypto'
import { requireStaticToken } from '../auth/static-token.js'
import type { FastifyInstance } from 'fastify'
import { Redis } from 'ioredis'
import { Counter, Gauge } from 'prom-client'
import { watchPings } from '../redis/index.js'
import { MAX_ANSWER_DEPTH, nestsDeeperThan } from '../pipeline/index.js'
import { MantleError } from '../../errors.js'
import { MAX_TOPIC_LENGTH } from '../../manifest.js'
import { EventBus, isKernelEvent, type KernelEventMessage, type BusCounters } from './bus.js'

export { EventBus, eventJsonOf, isKernelEvent, type KernelEventMessage, type Listener } from './bus.js'

/** The Redis channel Kernel events travel on (CONTRACT §4). */
export const EVENTS_CHANNEL = 'bff:events'

export interface EventsOptions {
  /** With a URL, events fan out through Redis to every gateway instance. */
  redisUrl?: string | undefined
  /** Bearer token for POST /internal/events; without one the route is not served. */
  internalToken?: string | undefined
  /** Role checks on subscribe (off when identity is off, like every role check). */
  checkRoles: boolean
  maxSubscriptions?: number
  /**
   * Subscriptions one tenant may hold on this instance, its share of `maxSubscriptions`
   * (BFF_EVENTS_MAX_SUBSCRIPTIONS_PER_TENANT); unset: no share (identity off: every caller is one tenant).
   */
  maxSubscriptionsPerTenant?: number | undefined
  /** How often the subscriber's connection is checked with a PING (ms; tests shorten it). */
  probeIntervalMs?: number
  /** Publishes waiting for Redis's answer at once (default MAX_PUBLISHING; tests shrink it). */
  maxPublishing?: number
}

/**
 * A command on the events connections that gets no answer within this fails (ms). Without it, a
 * Redis that froze, or a connection left half-open by a failover, still looked ready: every
 * publish waited for ever (POST /internal/events never answered, the event reached no one, and
 * each waiting publish stayed queued in memory), and so did quit() at shutdown.
 */
const COMMAND_TIMEOUT_MS = 1000
/** The parts of the gateway the publisher and the subscriber are to the shared Redis (its refusals, /readyz). */
const EVENTS = 'events'
const EVENTS_SUBSCRIBER = 'events subscriber'
const PROBE_INTERVAL_MS = 5000
/** Events delivered here after a publish that timed out are recognised on the subscriber this long (ms)… */
const UNCERTAIN_MS = 30_000
/** …and at most this many at once. */
const MAX_UNCERTAIN = 1000
/**
 * Publishes waiting for Redis's answer at once (each waits COMMAND_TIMEOUT_MS at most): past it a
 * publish is refused with OVERLOADED, counted. Each holds its message's JSON and an entry in
 * `publishing`: a Redis that answers late (not a closed one: enableOfflineQueue is off) let a
 * Kernel posting events as fast as it could grow them without a bound for a second at a time.
 */
const MAX_PUBLISHING = 10_000

export interface Events {
  readonly bus: EventBus
  /** Publishes to every instance (through Redis when configured, else in process). */
  publish: (message: KernelEventMessage) => Promise<void>
  /** `memory`, or Redis and whether its subscriber is up and subscribed to the channel, and its publisher's connection ready. */
  health: () => { store: 'memory' | 'redis', up: boolean }
}

declare module 'fastify' {
  interface FastifyInstance {
    events: Events
  }
}

interface EventsMetrics {
  bus: BusCounters
  published: (source: string) => void
  /** A publish refused at MAX_PUBLISHING. */
  publishRefused: () => void
}

function counters (app: FastifyInstance, bus: () => EventBus, redisUp: (() => number) | null, sizes: () => { publishing: number, uncertain: number }): EventsMetrics | undefined {
  if (!app.hasDecorator('metrics')) return undefined
  const registers = [app.metrics.registry]
  const published = new Counter({ name: 'mantle_events_published_total', help: 'Kernel events accepted, by source', labelNames: ['source'] as const, registers })
  const delivered = new Counter({ name: 'mantle_events_delivered_total', help: 'Event deliveries to subscribers on this instance', labelNames: ['event'] as const, registers })
  const dropped = new Counter({ name: 'mantle_events_dropped_total', help: 'Events not delivered: invalid payload, unknown topic, a slow consumer behind its bound, or a duplicate (an event delivered here after its publish timed out, or while the subscriber was not subscribed, coming back from Redis)', labelNames: ['reason'] as const, registers })
  const refused = new Counter({ name: 'mantle_event_subscriptions_refused_total', help: 'Event subscriptions refused with OVERLOADED at a bound: the instance\'s (bound="instance") or a tenant\'s share of it (bound="tenant")', labelNames: ['bound'] as const, registers })
  new Gauge({ name: 'mantle_event_subscriptions', help: 'Event subscriptions open on this instance', registers, collect () { this.set(bus().subscriptions) } }) // eslint-disable-line no-new
  // Absent without Redis, as mantle_redis_up: at 0 it set off MantleRedisFallbackActive on every
  // instance that runs on the embedded default.
  if (redisUp !== null) new Gauge({ name: 'mantle_events_redis_up', help: '1 when the Redis event subscriber is connected and subscribed (absent without Redis)', registers, collect () { this.set(redisUp()) } }) // eslint-disable-line no-new
  // Both stay at 0 without Redis (nothing is published to it).
  new Gauge({ name: 'mantle_events_publishing', help: 'Publishes of this instance waiting for Redis\'s answer (1 s at most each; bounded, 10,000: past it a publish is refused, mantle_events_publishes_refused_total)', registers, collect () { this.set(sizes().publishing) } }) // eslint-disable-line no-new
  new Gauge({ name: 'mantle_events_uncertain', help: 'Events whose publish to Redis timed out (or whose connection dropped on its way), delivered here, remembered to drop their echo from Redis (30 s each; bounded, 1,000: past it the oldest is forgotten)', registers, collect () { this.set(sizes().uncertain) } }) // eslint-disable-line no-new
  const publishRefused = new Counter({ name: 'mantle_events_publishes_refused_total', help: 'Events refused with OVERLOADED because 10,000 publishes of this instance already waited for Redis', registers })
  return {
    bus: { delivered: (event, n) => delivered.labels(event).inc(n), dropped: reason => dropped.labels(reason).inc(), refused: bound => refused.labels(bound).inc() },
    published: source => published.labels(source).inc(),
    publishRefused: () => publishRefused.inc()
  }
}

async function eventsPlugin (app: FastifyInstance, opts: EventsOptions): Promise<void> {
  let subscriber: Redis | null = null
  let publisher: Redis | null = null
  let subscribed = false
  let probe: NodeJS.Timeout | undefined
  // The shared connection's record of what Redis refuses for want of permission (plugins/redis):
  // a publish or SUBSCRIBE it refuses (an ACL changed while the gateway runs, `-publish`) is
  // reported there, /readyz fails naming it, and it is logged once there. A publisher refused
  // each publish (each logged) while /readyz and /diagz said up: every event posted here reached
  // this instance alone.
  const shared = opts.redisUrl !== undefined && app.hasDecorator('redis') ? app.redis : null
  const metrics = counters(app, () => bus, opts.redisUrl === undefined ? null : () => subscribed ? 1 : 0, () => ({ publishing: publishing.size, uncertain: uncertain.size }))
  const maxPublishing = opts.maxPublishing ?? MAX_PUBLISHING
  /** A publish failed (Redis away, not a refusal) and none has reached Redis since: logged once. */
  let publishWarned = false
  const bus: EventBus = new EventBus(app.pipeline.manifest.events, opts.checkRoles, opts.maxSubscriptions, metrics?.bus, opts.maxSubscriptionsPerTenant, app.hasDecorator('loadShedding') ? app.loadShedding.refuse : null)

  // Events delivered here because their publish timed out, by the publish's own id, with when
  // they are forgotten: such a publish may still have reached Redis, and the event then comes
  // back on the subscriber (a Redis slower than the timeout delivered it here twice). By id, not
  // by text: by text, another event alike after a publish that never reached Redis was dropped,
  // and of two alike whose publishes both timed out, the second echo was delivered again.
  // Oldest first; bounded in number and in time. Time by performance.now(): a wall clock stepped
  // forward between a publish's timeout and its echo forgot the echo, delivered here again.
  const uncertain = new Map<string, number>()
  const deliveredHere = (id: string): void => {
    const now = performance.now()
    for (const [old, until] of uncertain) {
      if (until > now && uncertain.size < MAX_UNCERTAIN) break
      uncertain.delete(old)
    }
    uncertain.set(id, now + UNCERTAIN_MS)
  }
  // This instance's publishes waiting for Redis's answer, by id, each with whether it came back on
  // the subscriber meanwhile (and was delivered then): one whose answer comes late (a publisher's
  // flow half-open, or slow) may have. Delivered here again once its publish timed out, it reached
  // its subscribers twice. One entry per publish in flight (each waits COMMAND_TIMEOUT_MS at most),
  // maxPublishing at most.
  const publishing = new Map<string, boolean>()
  const seenHere = (id: unknown): boolean => {
    if (uncertain.size === 0 || typeof id !== 'string') return false
    const until = uncertain.get(id)
    if (until === undefined) return false
    uncertain.delete(id)
    return until > performance.now()
  }

  if (opts.redisUrl !== undefined) {
    // Two connections: a subscribed one cannot publish. No offline queue on the publisher: a
    // publish while Redis is away must not pile up in memory; it is delivered locally instead.
    const common = { lazyConnect: true, maxRetriesPerRequest: 1, commandTimeout: COMMAND_TIMEOUT_MS, retryStrategy: (n: number) => Math.min(n * 200, 2000) }
    // The subscriber subscribes itself on every 'ready' (below), so ioredis's own re-subscribe is
    // off: it only replays channels of a connection that had been ready, never the first one.
    subscriber = new Redis(opts.redisUrl, { ...common, autoResubscribe: false, connectionName: 'mantle-events-sub' })
    // Nor are a dropped connection's unanswered commands sent again once it is back (ioredis's
    // autoResendUnfulfilledCommands): a publish that timed out was delivered here alone, then sent
    // to Redis anyway on the reconnect, late, after newer events (other instances got a run's old
    // status after its new one), where its log line says it reached this instance only.
    // And they fail when it drops (maxRetriesPerRequest 0: ioredis rejects them at each close).
    // With 1, the publishes in flight at a first drop were neither sent again nor rejected: each
    // waited out its command timeout (1 s), and its timeout then dropped the publisher's new
    // connection, ready and answering, for another reconnect (events posted meanwhile reached
    // this instance alone).
    publisher = new Redis(opts.redisUrl, { ...common, maxRetriesPerRequest: 0, enableOfflineQueue: false, autoResendUnfulfilledCommands: false, connectionName: 'mantle-events-pub' })
    // What Redis said, not the error whole: ioredis hangs the refused command on it, and a refused
    // AUTH's arguments are REDIS_URL's user and password.
    for (const r of [subscriber, publisher]) r.on('error', (err: Error) => app.log.debug({ err: err.message }, 'redis events connection error'))
    // Subscribing on each 'ready', not after the first connect(): before, a Redis down at start-up
    // was reconnected to but never subscribed on, while 'ready' alone marked it up. The instance
    // then got no event at all (not even its own, published to Redis) and /readyz said redis up.
    // Up means SUBSCRIBE was acknowledged on the connection that is still ready.
    const sub = subscriber
    const subscribe = (): void => {
      sub.subscribe(EVENTS_CHANNEL).then(() => {
        subscribed = sub.status === 'ready'
        if (subscribed) shared?.allowed(EVENTS_SUBSCRIBER)
      }, (err: Error) => {
        if (shared?.denied(EVENTS_SUBSCRIBER, err) !== true) app.log.warn({ err: err.message }, 'Redis events subscribe failed: retried on the next probe')
      })
    }
    sub.on('ready', subscribe)
    // Redis permits the SUBSCRIBE again (an ACL put back): at once, not at the next probe.
    shared?.onAllowed(() => { if (!subscribed && sub.status === 'ready') subscribe() })
    sub.on('close', () => { subscribed = false })
    // The subscriber only listens: a connection that stopped answering would show nothing but
    // silence, and stay up. A PING (allowed while subscribed) that gets no answer drops the
    // connection, and ioredis makes it again (which subscribes anew); a ready connection that is
    // not subscribed (its SUBSCRIBE failed) subscribes again.
    probe = watchPings(sub, opts.probeIntervalMs ?? PROBE_INTERVAL_MS, 1, {
      heard: () => { if (!subscribed) subscribe() },
      deaf: (err) => {
        app.log.warn({ err: err.message }, 'Redis events subscriber did not answer: reconnecting')
        subscribed = false
      }
    })
    subscriber.on('message', (_channel: string, text: string) => {
      let message: unknown
      try {
        message = JSON.parse(text)
      } catch {
        message = null
      }
      if (!isKernelEvent(message)) metrics?.bus.dropped('invalid')
      else {
        const id = (message as { publishId?: unknown }).publishId
        if (seenHere(id)) {
          metrics?.bus.dropped('duplicate')
          return
        }
        if (typeof id === 'string' && publishing.has(id)) publishing.set(id, true)
        bus.dispatch(message)
      }
    })
    // A Redis that is down at start-up leaves the gateway up, with events delivered locally and
    // /readyz naming redis, until it comes back (ioredis keeps reconnecting; 'ready' subscribes).
    subscriber.connect().catch((err: Error) => {
      app.log.warn({ err: err.message }, 'Redis is unreachable: events stay on this instance until it is back')
    })
    publisher.connect().catch(() => {})
  }

  const publish = async (message: KernelEventMessage): Promise<void> => {
    if (publisher !== null && publishing.size >= maxPublishing) {
      metrics?.publishRefused()
      throw new MantleError('OVERLOADED', 'Too many event publishes waiting for Redis on this instance', { headers: { 'retry-after': '1' } })
    }
    metrics?.published(publisher === null ? 'memory' : 'redis')
    if (publisher !== null) {
      // An id of this publish's own, for its echo only (the bus reads topic, tenant and payload).
      const publishId = randomUUID()
      const text = JSON.stringify({ ...message, publishId })
      publishing.set(publishId, false)
      // Whether Redis may have taken the event and send it back on the subscriber after this.
      let mayComeBack = false
      let echoed: boolean
      try {
        await publisher.publish(EVENTS_CHANNEL, text)
        publishWarned = false
        shared?.allowed(EVENTS)
        // Through Redis, the event comes back to this instance only on its subscriber. Before, with
        // the subscriber down and the publisher up, it never did: deliver it here then.
        if (subscribed) return
        // Not subscribed as far as this instance knows, yet its SUBSCRIBE may have reached Redis
        // before this publish, its answer not read: the event then comes back on the subscriber
        // too, and was delivered twice.
        mayComeBack = true
      } catch (err) {
        // A refusal for want of permission is logged once, by the shared connection; an outage
        // once too, until a publish reaches Redis again (it was a line per event: as many a second
        // as the Kernel posted).
        if (shared?.denied(EVENTS, err) !== true) {
          if (!publishWarned) app.log.warn({ err: (err as Error).message }, 'Redis publish failed: events are delivered on this instance only until a publish reaches Redis again')
          else app.log.debug({ err: (err as Error).message }, 'Redis publish failed: event delivered on this instance only')
          publishWarned = true
        }
        // A connection that answers nothing is dropped, and ioredis makes it again. Only then
        // may Redis have taken the event: it timed out, or its connection dropped while it was
        // on its way (ioredis rejects it so, maxRetriesPerRequest 0; a publish it could not send
        // fails at once, without a connection: no offline queue).
        if ((err as Error).message === 'Command timed out') {
          if (publisher.status === 'ready') publisher.disconnect(true)
          mayComeBack = true
        } else if ((err as Error).name === 'MaxRetriesPerRequestError') mayComeBack = true
      } finally {
        echoed = publishing.get(publishId) === true
        publishing.delete(publishId)
      }
      // It came back on the subscriber while its publish waited, and was delivered then.
      if (echoed) return
      if (mayComeBack) deliveredHere(publishId)
    }
    bus.dispatch(message)
  }

  app.decorate('events', {
    bus,
    publish,
    // Up: subscribed, and able to publish. A publisher that could not get back (Redis full at
    // maxclients for new connections, a path that stays broken) left every event posted here on
    // this instance alone, never another's, while /readyz said ready and the balancer kept
    // sending it the Kernel's events.
    // Nor while Redis refuses it its publishes.
    health: () => subscriber === null ? { store: 'memory' as const, up: true } : { store: 'redis' as const, up: subscribed && publisher?.status === 'ready' && shared?.refuses(EVENTS) !== true }
  })

  if (opts.internalToken !== undefined) {
    // Audited as the admin routes are (plugins/audit: config.audit), refusals included: one entry
    // a request, naming the topic and tenant of a well-formed body (accepted, or refused after
    // its schema: a payload nested too deep, a publish that failed), never its payload. It left none.
    const audit = app.hasDecorator('audit') ? app.audit : null
    app.post('/internal/events', {
      config: { audit: 'admin.events.publish' },
      schema: {
        hide: true,
        body: {
          type: 'object',
          required: ['topic', 'tenantId', 'payload'],
          properties: { topic: { type: 'string', minLength: 1, maxLength: MAX_TOPIC_LENGTH }, tenantId: { type: 'string', minLength: 1, maxLength: 256 }, payload: {} }
        },
        response: { 202: { type: 'object', properties: { accepted: { type: 'boolean' } } } }
      },
      // The token is checked before the body is parsed: a stranger gets a 401, not a parse.
      onRequest: requireStaticToken(opts.internalToken, 'internal')
    }, async (request, reply) => {
      const message = request.body as KernelEventMessage
      audit?.describe(request, { topic: message.topic, tenant: message.tenantId })
      // Bounded as a call's answer is: with Redis, the publish's JSON.stringify overflowed the
      // stack past a few thousand levels (a 500 INTERNAL, logged as a gateway bug), while
      // without Redis the event was accepted and dropped unseen.
      if (nestsDeeperThan(message.payload, MAX_ANSWER_DEPTH)) throw new MantleError('VALIDATION_FAILED', `body.payload nests objects and arrays more than ${MAX_ANSWER_DEPTH} levels deep`)
      await publish(message)
      reply.code(202)
      return { accepted: true }
    })
  }

  // quit() waits for the server: a client still retrying a Redis that is away must disconnect.
  const close = async (r: Redis | null): Promise<void> => {
    if (r === null) return
    if (r.status === 'ready') await r.quit().catch(() => r.disconnect())
    else r.disconnect()
  }
  app.addHook('onClose', async () => {
    clearInterval(probe)
    await Promise.all([close(subscriber), close(publisher)])
  })
}

export default fp(eventsPlugin, { name: 'mantle-events', dependencies: ['mantle-pipeline'], fastify: '5.x' })
