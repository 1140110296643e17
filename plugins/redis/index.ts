import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { Command, Redis } from 'ioredis'
import { Gauge } from 'prom-client'
import { setTimeout as sleep } from 'node:timers/promises'

// The one Redis command connection an instance shares between its stores (rate limits, cache,
// idempotency). Not @fastify/redis: it holds registration until Redis answers, and a gateway
// whose Redis is down at start-up must start degraded (memory stores, /readyz says so), not hang.
// Events keep their own two connections (a subscribed connection cannot run commands).

export interface SharedRedis {
  readonly client: Redis
  /**
   * True while the connection is ready and answers; stores fall back to memory when it is not.
   * A Redis that hangs with the connection open is found by the heartbeat (a PING each second).
   */
  up: () => boolean
  /**
   * Calls `listener` whenever Redis is known to answer again: the connection is ready (after a
   * reconnect), or the heartbeat's PING was answered in time. A store that marks itself failing
   * after a command failed (a timeout leaves the connection up) clears that mark here, so that
   * /diagz and its gauges do not say "fallback" until its next call of that kind.
   */
  onAnswer: (listener: () => void) => void
  /**
   * Reports a command of `part` (a store, the events' publisher or subscriber) that failed: true
   * when Redis refused it for want of permission (the ACL of REDIS_URL's user changed while the
   * gateway runs: NOPERM, or a script's "can't"), false for any other failure. A refusal is
   * logged once at error and makes /readyz and /diagz say Redis is not ready, naming it, until
   * `part` is allowed again (`allowed`), or Redis lets the gateway do what its parts need (the
   * heartbeat checks it each beat meanwhile, and tells `onAllowed`'s listeners).
   */
  denied: (part: string, err: unknown) => boolean
  /**
   * A command of `part` went through: a refusal of it reported before is over; with `command`
   * (ioredis' name of it: `mget`, `evalsha`), once each command refused it has gone through (a
   * part that runs plain reads and scripts, the cache, refused its scripts alone, is still refused
   * when a read goes through).
   */
  allowed: (part: string, command?: string) => void
  /** Whether Redis refuses `part` its commands now (reported by `denied`, not allowed since). */
  refuses: (part: string) => boolean
  /** What Redis refuses now, in its words, for /diagz (role system) and logs; null when it refuses nothing. */
  denial: () => string | null
  /**
   * What Redis refuses now, for /readyz (unauthenticated): each part and the command, never Redis'
   * words (Redis 7.2 names REDIS_URL's user in them); null when it refuses nothing.
   */
  denialSummary: () => string | null
  /** Whether a part Redis refuses runs on memory: any but the heartbeat's PING (HEARTBEAT_PART), which only watches. */
  denialOnMemory: () => boolean
  /** Calls `listener` when the heartbeat finds that Redis lets the gateway do what its parts need again. */
  onAllowed: (listener: () => void) => void
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
  /** How often the connection is checked with a PING (ms). */
  heartbeatMs?: number
  /**
   * The pub/sub channels the gateway's other connections use (events, cache invalidations): a
   * user REDIS_URL names that Redis does not let use them stops start-up, as refused credentials do.
   */
  channels?: readonly string[]
  /**
   * A key of each store on Redis, as the store makes them (a fresh tenant's: none exists): a user
   * REDIS_URL names that Redis does not let write them (or run scripts) stops start-up too.
   */
  keys?: readonly string[]
  /**
   * The commands the stores run on those keys (in their scripts or not): Redis 7 is asked, in a
   * script run as the stores run theirs (EVALSHA), whether the user may run each of them on each
   * key, and PUBLISH and SUBSCRIBE on each channel, at start-up and while a refusal is reported.
   */
  commands?: readonly string[]
}

const HEARTBEAT_MS = 1000
/** How long the shutdown waits for Redis to answer the shared connection's QUIT (the default command timeout). */
const QUIT_MS = 500

/**
 * The part the heartbeat's PING is to Redis' refusals: refused (`-ping`), nothing runs on memory
 * (the stores' commands go through), but a Redis that stops answering is no longer found.
 */
export const HEARTBEAT_PART = 'heartbeat PING'

async function redisPlugin (app: FastifyInstance, opts: RedisOptions): Promise<void> {
  // No offline queue: a command while Redis is away fails at once instead of piling up in memory.
  const client = new Redis(opts.url, {
    lazyConnect: true,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    // A command left unanswered by a dropped connection has failed to its caller (which went on
    // from memory); ioredis would send it again on the new connection: a rate-limit check counted
    // twice, an idempotency claim taken with no caller left to finish it. maxRetriesPerRequest 0
    // flushes them at each drop already; this says so where a change of that would not.
    autoResendUnfulfilledCommands: false,
    connectTimeout: opts.connectTimeoutMs ?? 1000,
    commandTimeout: opts.commandTimeoutMs ?? 500,
    retryStrategy: (n: number) => Math.min(n * 100, 1000),
    connectionName: 'mantle'
  })
  let warned = false
  // A Redis that refuses the connection's AUTH or SELECT (a database past its `databases`, a
  // password it does not take): ioredis reports it as an `error` during the handshake, and then,
  // for SELECT, goes `ready` all the same, on database 0: every store ran in another database,
  // maybe another app's or environment's, while /readyz said up. `refused` is the refusal of the
  // connection now made (cleared as each connection starts); such a connection is never up.
  let refused: Error | null = null
  let refusalLogged = false
  client.on('connect', () => { refused = null })
  client.on('error', (err: Error) => {
    // Any SELECT that failed leaves the connection on database 0: never used (dropped as it
    // comes ready, made again each second). A refusal (refusal()) is a misconfiguration; a
    // SELECT a busy Redis put off (BUSY) is not, and is only warned about.
    const refusing = refusal(err)
    if (client.status === 'connect' && (refusing || selectFailed(err))) {
      refused = err
      if (!refusing) {
        if (!warned) app.log.warn({ err: err.message }, 'Redis did not select the database of REDIS_URL: stores fall back to memory until it does')
      } else if (!refusalLogged) {
        app.log.error({ err: err.message }, `${refusalOf(err)}; stores fall back to memory until it takes it`)
        refusalLogged = true
      }
      warned = true
      return
    }
    if (!warned) app.log.warn({ err: err.message }, 'Redis connection error: stores fall back to memory until it is back')
    warned = true
  })
  const answering: Array<() => void> = []
  const answered = (): void => { for (const listener of answering) listener() }
  client.on('ready', () => {
    // Dropped at once, before any store's command: ready on database 0, it took an idempotency
    // outcome written without asking up() until the heartbeat dropped it. The heartbeat makes
    // it anew, a second later.
    if (refused !== null) {
      client.disconnect(false)
      return
    }
    if (warned) app.log.info('Redis is back')
    warned = false
    refusalLogged = false
    answered()
  })
  const up = (): boolean => client.status === 'ready' && refused === null

  // Commands Redis refused the gateway's parts for want of permission, by part (a handful of
  // names, fixed in code): an ACL changed while the gateway runs (`ACL SETUSER mantle -evalsha`,
  // `resetkeys`, `-publish`). Every store failed NOPERM and ran on memory (rate limits and
  // idempotency per instance, invalidations and events never reaching the other instances) while
  // /readyz, /diagz and mantle_redis_up said up; the idempotency store said "Redis is back" at
  // each PING and "unavailable" at its next claim, a pair of lines each second.
  // Each part's refusal: Redis' words, and the commands it refused (their names as ioredis gives
  // them; ANY_COMMAND when it gave none), which must each go through to end it (allowed).
  const denials = new Map<string, { message: string, commands: Set<string> }>()
  /** Refusals reported so far: a check that began before the latest one does not end it. */
  let reported = 0
  const allowing: Array<() => void> = []
  const denied = (part: string, err: unknown): boolean => {
    if (!(err instanceof Error) || !permissionRefused(err)) return false
    reported++
    if (!denials.has(part)) {
      app.log.error({ err: err.message, part }, part === HEARTBEAT_PART
        ? 'Redis refused the heartbeat its PING for want of permission (the ACL of REDIS_URL\'s user): the stores still run on Redis, but a Redis that stops answering is not found, and /readyz fails naming redis, until Redis permits it'
        : `Redis refused ${part} a command for want of permission (the ACL of REDIS_URL's user): it runs as if Redis were away, and /readyz fails naming redis, until Redis permits it`)
    }
    const command = commandOf(err)
    const held = denials.get(part)
    if (held === undefined) denials.set(part, { message: err.message, commands: new Set([command]) })
    else {
      held.message = err.message
      held.commands.add(command)
    }
    return true
  }
  const allowed = (part: string, command?: string): void => {
    const held = denials.get(part)
    if (held === undefined) return
    if (command !== undefined) {
      held.commands.delete(command)
      held.commands.delete(ANY_COMMAND)
      if (held.commands.size > 0) return
    }
    denials.delete(part)
    app.log.info({ part }, `Redis permits ${part} its commands again`)
  }
  const denial = (): string | null => denials.size === 0 ? null : [...denials].map(([part, { message }]) => `${part}: ${message}`).join('; ')
  const denialSummary = (): string | null => denials.size === 0 ? null : [...denials].map(([part, { message }]) => `${part}: ${refusedCommand(message)}`).join('; ')
  const denialOnMemory = (): boolean => denials.size > (denials.has(HEARTBEAT_PART) ? 1 : 0)
  // While a refusal stands, Redis is asked each beat (one check at a time) whether it lets the
  // gateway do what its parts need: without calls, nothing else would find the permission back.
  let checking = false
  const recheck = (): void => {
    if (denials.size === 0 || checking || !up()) return
    checking = true
    const since = reported
    checkPermissions(client, opts.keys ?? [], opts.channels ?? [], opts.commands ?? []).then(asked => {
      // Redis 6 cannot say (no redis.acl_check_cmd): each part then ends its refusal itself, when
      // a command of it goes through (ended here, a part refused `-publish` was refused and
      // logged again at its next command, each second).
      if (!asked || reported !== since || denials.size === 0) return
      const parts = [...denials.keys()]
      denials.clear()
      app.log.info({ parts }, 'Redis permits the gateway\'s commands again')
      for (const listener of allowing) listener()
    }, () => {}).finally(() => { checking = false })
  }

  // A Redis that stops answering with its connection open (hung, or a partition that leaves the
  // TCP connection up) stayed "ready": every keyed mutation waited out the command timeout, and
  // /readyz and mantle_redis_up said up. Two PINGs in a row (each sent a second after the last
  // one ended) not answered within the command timeout drop the connection (one alone could be
  // a Redis busy for a moment: a fork, a long script): up() is false at once, ioredis connects
  // anew, and 'ready' tells every store it is back (on the connection it left, a late answer
  // could have been taken for a later command's).
  const heartbeat = watchPings(client, opts.heartbeatMs ?? HEARTBEAT_MS, 2, {
    // A connection Redis refused (dropped as it came ready) is made anew each beat, until Redis takes it.
    skip: () => {
      if (refused === null || client.status !== 'end') return false
      client.connect().catch(() => {})
      return true
    },
    heard: () => {
      allowed(HEARTBEAT_PART)
      answered()
    },
    refused: (err) => { denied(HEARTBEAT_PART, err) },
    deaf: (err) => {
      app.log.warn({ err: err.message }, 'Redis did not answer two PINGs in time: reconnecting; stores fall back to memory meanwhile')
      warned = true
    }
  })

  const rechecks = setInterval(recheck, opts.heartbeatMs ?? HEARTBEAT_MS)
  rechecks.unref()

  if (app.hasDecorator('metrics')) {
    new Gauge({ name: 'mantle_redis_up', help: '1 when the shared Redis connection is ready and Redis refuses none of the gateway\'s commands (absent without Redis)', registers: [app.metrics.registry], collect () { this.set(up() && denials.size === 0 ? 1 : 0) } }) // eslint-disable-line no-new
  }
  app.decorate('redis', {
    client,
    up,
    onAnswer: (listener: () => void) => { answering.push(listener) },
    denied,
    allowed,
    refuses: (part: string) => denials.size > 0 && denials.has(part),
    denial,
    denialSummary,
    denialOnMemory,
    onAllowed: (listener: () => void) => { allowing.push(listener) }
  })

  // A Redis down at start-up leaves the gateway up and degraded; ioredis keeps reconnecting.
  await client.connect().catch((err: Error) => {
    if (refused === null) app.log.warn({ err: err.message }, 'Redis is unreachable at start-up: running on memory stores until it is back')
  })
  // A misconfiguration, unlike a Redis that is away: start-up stops, naming REDIS_URL.
  if (refused !== null && refusal(refused)) {
    clearInterval(heartbeat)
    clearInterval(rechecks)
    client.disconnect()
    throw new Error(`Refusing to start: ${refusalOf(refused)}`)
  }
  // A user whose ACL takes the keys but not the channels (Redis 7 gives a new user none:
  // acl-pubsub-default resetchannels, so `ACL SETUSER mantle on >pw ~* +@all` has none) started,
  // and was not ready for ever: /readyz said "redis: down (memory stores)" with every store on
  // Redis, no event crossed instances, and each cache invalidation failed its script (replayed
  // each second, never heard by the other instances).
  // So did a user whose ACL does not cover the stores' keys (`~app:*`, read-only, no scripting):
  // every store command failed NOPERM, each store ran on memory for ever (rate limits and
  // idempotency per instance: a repeat on another instance ran the call again), while /readyz
  // and mantle_redis_up said up.
  if (client.status === 'ready' && opts.channels !== undefined && opts.channels.length > 0) {
    const denied = await channelsRefused(client, opts.channels)
    if (denied !== null) {
      clearInterval(heartbeat)
      clearInterval(rechecks)
      client.disconnect()
      throw new Error(`Refusing to start: Redis refused the channels ${opts.channels.join(', ')} to the user of REDIS_URL (grant them, e.g. &bff:*): ${denied.message}`)
    }
  }
  // And, Redis 7, the commands the stores and the events run (checkPermissions): EVALSHA (ioredis
  // sends a script's first call as EVAL: the stores worked a call each, then failed), a command
  // a store's script runs (`-hset`), PUBLISH (`-publish`: every event and invalidation failed).
  if (client.status === 'ready' && opts.keys !== undefined && opts.keys.length > 0) {
    const denied = await keysRefused(client, opts.keys, opts.channels ?? [], opts.commands ?? [])
    if (denied !== null) {
      clearInterval(heartbeat)
      clearInterval(rechecks)
      client.disconnect()
      throw new Error(`Refusing to start: Redis refused the user of REDIS_URL the stores' keys (${[...new Set(opts.keys.map(k => k.slice(0, k.indexOf(':', 4) + 1) + '*'))].join(', ')}; grant them, the commands the stores run on them, scripts and PUBLISH, e.g. ~bff:* +@all): ${denied.message}`)
    }
  }
  // quit() waits for the server: a client still retrying a Redis that is away must disconnect.
  // A Redis that hangs (connected, answering nothing) is waited for QUIT_MS at most, then cut:
  // quit() alone waited BFF_REDIS_COMMAND_TIMEOUT_MS (up to 60 s), where the shutdown's grace
  // allows the Redis connections half a second (server.ts, GRACE_MARGIN_MS), and a gateway whose
  // timeout was 20 s was killed at its grace (exit 1) on every shutdown while Redis hung.
  app.addHook('onClose', async () => {
    clearInterval(heartbeat)
    clearInterval(rechecks)
    if (client.status !== 'ready') {
      client.disconnect()
      return
    }
    const said = await Promise.race([client.quit().then(() => true, () => false), sleep(QUIT_MS, false, { ref: false })])
    if (!said) client.disconnect()
  })
}

/**
 * PINGs `client` every `everyMs`, one at a time, while it is ready: `misses` in a row unanswered
 * (within its command timeout) drop the connection (`deaf` says so first), and ioredis makes it
 * anew; `heard` runs on each answer, `skip` before each beat (true: none this time). For a
 * connection that stays "ready" while nothing comes back (a hung Redis, a flow a failover left
 * half-open): the shared connection's heartbeat and the subscribers' probes (events, cache).
 * Returns the timer (unref'd), to clear at close.
 */
export function watchPings (client: Redis, everyMs: number, misses: number, on: { deaf: (err: Error) => void, heard?: () => void, skip?: () => boolean, refused?: (err: Error) => void }): NodeJS.Timeout {
  let pinging = false
  // PINGs missed in a row on the connection now ready: a new one starts at none.
  let missed = 0
  client.on('ready', () => { missed = 0 })
  const timer = setInterval(() => {
    if (on.skip?.() === true || pinging || client.status !== 'ready') return
    pinging = true
    // A process paused past the command timeout (CPU throttling under a container's CPU limit, a
    // long GC, a big synchronous parse) runs ioredis' timeout timer before it reads the PONG
    // Redis sent in time: a healthy connection missed its PING, and two such pauses a beat apart
    // dropped it (every store on memory, the cache emptied). A PING that fails counts as missed
    // only if its own answer has not been read once the poll phase has run (setImmediate): a PONG
    // that came during the pause has been by then. Not "anything read meanwhile": on a busy
    // connection to an overloaded Redis (or over a saturated link) every answer came later than
    // the timeout, the answers to the commands sent before the PING kept coming while it waited,
    // and a connection on which every command waited out the timeout stayed up.
    const stream = client.stream
    const ping = new Command('ping', [], { replyEncoding: 'utf8' })
    client.sendCommand(ping)
    ping.promise.then(() => {
      missed = 0
      on.heard?.()
    }, async (err: Error) => {
      await new Promise(resolve => setImmediate(resolve))
      // Its answer read (late, or an error reply): neither a miss nor an answer heard. Refused
      // for want of permission (`-ping`), it is told (`refused`).
      if (err.name === 'ReplyError') on.refused?.(err)
      const unanswered = client.commandQueue.toArray().some(item => item.command === ping)
      if (client.status !== 'ready' || client.stream !== stream || !unanswered || ++missed < misses) return
      missed = 0
      on.deaf(err)
      client.disconnect(true)
    }).finally(() => { pinging = false })
  }, everyMs)
  timer.unref()
  return timer
}

/**
 * Whether an error is Redis refusing what REDIS_URL asks of it (AUTH or HELLO's credentials, the
 * SELECT of its database, or a command refused for want of them), not a network error or a
 * passing one (too many clients).
 */
export function refusal (err: Error): boolean {
  // A Redis busy with a script (SELECT is not allowed then), loading, or full is away a moment,
  // not refusing: taken for a refused database, BUSY stopped a start-up with a wrong message.
  if (err.name !== 'ReplyError' || /max number of clients/i.test(err.message) || /^(BUSY|LOADING|MASTERDOWN|TRYAGAIN)\b/.test(err.message)) return false
  if (/^(NOAUTH|WRONGPASS|NOPERM)\b/.test(err.message)) return true
  const command = (err as Error & { command?: { name?: string } }).command?.name
  return command === 'auth' || command === 'hello' || (command === 'select' && /DB index/i.test(err.message))
}

/**
 * A refusal of permission (permissionRefused) told without Redis' words: `NOPERM` and what was
 * refused, when Redis' text says it (the command, PUBLISH or SUBSCRIBE on a channel, keys,
 * channels). Redis 7.2 names the user in its text ("User mantle has no permissions ..."), which
 * /readyz, unauthenticated, showed.
 */
export function refusedCommand (message: string): string {
  const command = /'([a-z][a-z|-]*)' command/i.exec(message)?.[1]
  if (command !== undefined) return `NOPERM (${command.toLowerCase()})`
  const onChannel = /\b(publish|subscribe)\b[^']*\bchannel\b/i.exec(message)?.[1]
  if (onChannel !== undefined) return `NOPERM (${onChannel.toLowerCase()} on a channel)`
  if (/\bkeys?\b/i.test(message)) return 'NOPERM (keys)'
  if (/\bchannels?\b/i.test(message)) return 'NOPERM (channels)'
  if (/\bscript\b/i.test(message)) return 'NOPERM (a command of a script)'
  return 'NOPERM'
}

/**
 * Whether an error is Redis refusing a command for want of permission (the ACL of REDIS_URL's
 * user): NOPERM, or a script's command refused (Redis words it "The user executing the script can't ...").
 */
export function permissionRefused (err: Error): boolean {
  return err.name === 'ReplyError' && (/^NOPERM\b/.test(err.message) || /user executing the script can't/i.test(err.message))
}

// KEYS: a key of each store (none exists: a DEL of each changes nothing); ARGV[1]: how many
// commands follow, then the commands, then the channels. Redis 7 says whether the user may run
// PING (the heartbeat's), EVALSHA and EVAL (the stores' scripts: ioredis sends a script's first
// call on a connection as EVAL, its next ones as EVALSHA) and each command on each key
// (redis.acl_check_cmd runs nothing), and PUBLISH and SUBSCRIBE on each channel; Redis 6 has no
// such check, and the DEL alone asks for the keys.
const PERMISSIONS_LUA = `
local n = tonumber(ARGV[1])
local check = redis.acl_check_cmd
if check then
  if not check('ping') then return redis.error_reply('NOPERM this user has no permissions to run the \\'ping\\' command') end
  for k = 1, #KEYS do
    for _, command in ipairs({'evalsha', 'eval'}) do
      if not check(command, '0', '1', KEYS[k]) then return redis.error_reply('NOPERM this user has no permissions to run the \\'' .. command .. '\\' command on ' .. KEYS[k]) end
    end
  end
  for i = 2, n + 1 do
    for k = 1, #KEYS do
      if not check(ARGV[i], KEYS[k]) then return redis.error_reply('NOPERM this user has no permissions to run the \\'' .. ARGV[i] .. '\\' command on ' .. KEYS[k]) end
    end
  end
  for i = n + 2, #ARGV do
    if not check('publish', ARGV[i], '') then return redis.error_reply('NOPERM this user has no permissions to publish to the channel ' .. ARGV[i]) end
    if not check('subscribe', ARGV[i]) then return redis.error_reply('NOPERM this user has no permissions to subscribe to the channel ' .. ARGV[i]) end
  end
end
for k = 1, #KEYS do redis.call('DEL', KEYS[k]) end
if check then return 1 end
return 0
`

interface WithPermissions { mantlePermissions: (numberOfKeys: number, ...args: string[]) => Promise<number> }

/**
 * Resolves when Redis lets the user of REDIS_URL run `commands` on `keys` (as the stores do, in a
 * script) and publish and subscribe on `channels`: true when Redis could say so of each (Redis 7),
 * false when only the keys' DEL was asked (Redis 6); rejects with Redis' refusal, or any failure.
 */
async function checkPermissions (client: Redis, keys: readonly string[], channels: readonly string[], commands: readonly string[]): Promise<boolean> {
  if (typeof (client as unknown as Partial<WithPermissions>).mantlePermissions !== 'function') client.defineCommand('mantlePermissions', { lua: PERMISSIONS_LUA })
  return await (client as unknown as WithPermissions).mantlePermissions(keys.length, ...keys, String(commands.length), ...commands, ...channels) === 1
}

/**
 * Redis' refusal of the stores' commands on `keys`, or of PUBLISH and SUBSCRIBE on `channels`
 * (checkPermissions); null when Redis takes them, or could not be asked (away, a timeout: the
 * gateway starts degraded, as it would).
 */
async function keysRefused (client: Redis, keys: readonly string[], channels: readonly string[], commands: readonly string[]): Promise<Error | null> {
  try {
    await checkPermissions(client, keys, channels, commands)
    return null
  } catch (err) {
    return err instanceof Error && (refusal(err) || permissionRefused(err)) ? err : null
  }
}

/**
 * Redis' refusal of a SUBSCRIBE of `channels` (the ACL of REDIS_URL's user), on a connection of
 * its own made for it and closed after; null when Redis takes it, or could not be asked (it went
 * away meanwhile: the gateway starts degraded, as it would).
 */
async function channelsRefused (client: Redis, channels: readonly string[]): Promise<Error | null> {
  const probe = client.duplicate({ lazyConnect: true, enableOfflineQueue: false, maxRetriesPerRequest: 0, retryStrategy: () => null, connectionName: 'mantle-probe' })
  probe.on('error', () => {})
  try {
    await probe.connect()
    await probe.subscribe(...channels)
    return null
  } catch (err) {
    return err instanceof Error && refusal(err) ? err : null
  } finally {
    probe.disconnect()
  }
}

/** Whether an error is Redis' answer to the handshake's SELECT (whatever it says). */
function selectFailed (err: Error): boolean {
  return err.name === 'ReplyError' && (err as Error & { command?: { name?: string } }).command?.name === 'select'
}

/** A refused command's name as ioredis gives it (a script's, `eval` when resent after NOSCRIPT, as `evalsha`); ANY_COMMAND when it gave none. */
const ANY_COMMAND = '*'
function commandOf (err: Error): string {
  const name = (err as { command?: { name?: unknown } }).command?.name
  return typeof name !== 'string' ? ANY_COMMAND : name === 'eval' ? 'evalsha' : name
}

/** How a refusal is told: what Redis refused of REDIS_URL, in its words (never the password). */
function refusalOf (err: Error): string {
  const command = (err as Error & { command?: { name?: string, args?: unknown[] } }).command
  const what = command?.name === 'select' ? `the database ${String(command.args?.[0])} of REDIS_URL (Redis has fewer databases, 16 by default: see its \`databases\` setting)` : 'the credentials of REDIS_URL'
  return `Redis refused ${what}: ${err.message}`
}

export default fp(redisPlugin, { name: 'mantle-redis', fastify: '5.x' })
