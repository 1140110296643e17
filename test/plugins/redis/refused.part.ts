// A Redis that refuses REDIS_URL's database (SELECT past its `databases`) or credentials: ioredis
// reported it as an error, then went ready on database 0 all the same, and every store ran there
// (maybe another app's data) while /readyz, /diagz and mantle_redis_up said up.
import t, { type Test } from 'tap'
import { createServer, connect, type Socket } from 'node:net'
import { Redis } from 'ioredis'
import { buildDemoApp, bearer, until } from '../../helper.js'
import { refusal } from '../../../plugins/redis/index.js'
import { aclUsers } from './acl.js'

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const target = new URL(REDIS_URL)

/** Lines of the gateway's log, parsed. */
function logLines (): { lines: Array<{ level: number, msg: string }>, logStream: { write: (line: string) => void } } {
  const lines: Array<{ level: number, msg: string }> = []
  return { lines, logStream: { write: line => { lines.push(JSON.parse(line)) } } }
}

/**
 * A proxy to Redis that, as `mode()` says, passes the SELECT of database 5 a client sends, asks
 * for database 99 in its place (refused: out of range), or has Redis answer it BUSY (as while a
 * script runs past busy-reply-threshold).
 */
async function selectProxy (t: Test, mode: () => 'pass' | 'refuse' | 'busy'): Promise<number> {
  const SELECT_5 = /\*2\r\n\$6\r\nselect\r\n\$1\r\n5\r\n/i
  const script = "return redis.error_reply('BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.')"
  const busy = `*3\r\n$4\r\nEVAL\r\n$${script.length}\r\n${script}\r\n$1\r\n0\r\n`
  const open = new Set<Socket>()
  const server = createServer(client => {
    const upstream = connect(Number(target.port || 6379), target.hostname)
    for (const s of [client, upstream]) { open.add(s); s.on('close', () => open.delete(s)); s.on('error', () => s.destroy()) }
    client.on('data', (chunk: Buffer) => {
      const now = mode()
      const text = chunk.toString('latin1')
      upstream.write(now === 'pass' ? chunk : Buffer.from(text.replace(SELECT_5, now === 'refuse' ? '*2\r\n$6\r\nselect\r\n$2\r\n99\r\n' : busy), 'latin1'))
    })
    upstream.on('data', (chunk: Buffer) => client.write(chunk))
    client.on('close', () => upstream.destroy())
    upstream.on('close', () => client.destroy())
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  t.teardown(async () => {
    for (const s of open) s.destroy()
    await new Promise(resolve => server.close(resolve))
  })
  cut = () => { for (const s of open) s.destroy() }
  return (server.address() as { port: number }).port
}

/** Cuts the connections through the last proxy made. */
let cut = (): void => {}

t.test('a database Redis does not have stops start-up, naming REDIS_URL', async t => {
  const { lines, logStream } = logLines()
  await t.rejects(buildDemoApp(t, { REDIS_URL: `redis://${target.host}/99`, LOG_LEVEL: 'warn' }, { logger: undefined, logStream }),
    /^Refusing to start: Redis refused the database 99 of REDIS_URL .*ERR DB index is out of range/)
  t.notOk(lines.some(l => /unreachable at start-up/.test(l.msg)), 'not taken for a Redis that is away')
})

t.test('credentials Redis refuses stop start-up, naming REDIS_URL, never the password', async t => {
  const err = await buildDemoApp(t, { REDIS_URL: `redis://mantle-no-such-user:s3cret-pw@${target.host}` }).then(() => null, (e: Error) => e)
  t.ok(err !== null, 'refused')
  t.match(err?.message, /credentials of REDIS_URL/)
  t.notMatch(err?.message, /s3cret-pw/)
})

// Redis 7 gives a new ACL user no channel (acl-pubsub-default resetchannels): the usual
// `ACL SETUSER mantle on >pw ~* +@all` takes every key and no channel. Such a gateway started and
// was not ready for ever (/readyz: "redis: down (memory stores)", every store on Redis all the
// same), no event crossed instances, and each cache invalidation failed its script.
/** Makes REDIS_URL's of scratch ACL users (each of its own name), deleted when `t` ends: `rules` after `on >password`. */
function aclUrls (t: Test): (...rules: string[]) => Promise<string> {
  const { make } = aclUsers(t)
  return async (...rules) => (await make(...rules)).url
}

t.test('a user Redis does not let use the gateway\'s channels stops start-up, naming REDIS_URL; one it lets starts', async t => {
  const users = aclUrls(t)
  const userWith = async (...rules: string[]): Promise<string> => await users('~*', '+@all', 'resetchannels', ...rules)
  const { lines, logStream } = logLines()
  const err = await buildDemoApp(t, { REDIS_URL: await userWith(), LOG_LEVEL: 'warn' }, { logger: undefined, logStream }).then(() => null, (e: Error) => e)
  t.ok(err !== null, 'refused')
  t.match(err?.message, /^Refusing to start: Redis refused the channels bff:events, bff:cache:invalidate to the user of REDIS_URL .*NOPERM/)
  t.notMatch(err?.message, /s3cret-pw/)
  t.notOk(lines.some(l => /unreachable at start-up/.test(l.msg)), 'not taken for a Redis that is away')
  // Events alone go through Redis with the cache on memory: only their channel is asked for.
  const eventsOnly = await buildDemoApp(t, { REDIS_URL: await userWith('&bff:events'), BFF_CACHE_STORE: 'memory' })
  await until(() => eventsOnly.events.health().up, 'the events subscriber')
  t.equal((await eventsOnly.inject({ method: 'GET', url: '/readyz' })).statusCode, 200, 'ready')
  const granted = await buildDemoApp(t, { REDIS_URL: await userWith('&bff:*') })
  await until(() => granted.events.health().up, 'the events subscriber')
  t.equal((await granted.inject({ method: 'GET', url: '/readyz' })).statusCode, 200, 'ready with the channels granted')
})

// A user whose ACL does not cover the stores' keys: every store command failed NOPERM and each
// store ran on memory for ever (rate limits and idempotency per instance: a repeat on another
// instance ran its call again), while /readyz and mantle_redis_up said up.
t.test('a user Redis does not let write the stores\' keys, or run scripts, stops start-up, naming REDIS_URL', async t => {
  const users = aclUrls(t)
  // Nor EVALSHA, which the stores' scripts run as (the check ran EVAL alone: started, every store
  // then failed NOPERM), nor a command a store's script runs, nor PUBLISH (each invalidation failed).
  for (const rules of [['~app:*', '+@all'], ['%R~*', '+@all'], ['~*', '+@all', '-@scripting'], ['~*', '+@all', '-evalsha'], ['~*', '+@all', '-hset'], ['~*', '+@all', '-publish']]) {
    const err = await buildDemoApp(t, { REDIS_URL: await users(...rules, 'allchannels') }).then(() => null, (e: Error) => e)
    t.ok(err !== null, `${rules.join(' ')}: refused`)
    t.match(err?.message, /^Refusing to start: Redis refused the user of REDIS_URL the stores' keys \(bff:ratelimit:\*, bff:cache:\*, bff:cache-tag:\*, bff:idem:\*; .*NOPERM/, rules.join(' '))
    t.notMatch(err?.message, /s3cret-pw/)
  }
  // Only the stores on Redis are asked for: with every store on memory, keys are not needed.
  const memory = await buildDemoApp(t, { REDIS_URL: await users('~app:*', '+@all', 'allchannels'), BFF_RATE_LIMIT_STORE: 'memory', BFF_CACHE_STORE: 'memory', BFF_IDEMPOTENCY_STORE: 'memory' })
  await until(() => memory.events.health().up, 'the events subscriber')
  t.equal((await memory.inject({ method: 'GET', url: '/readyz' })).statusCode, 200, 'ready')
  const granted = await buildDemoApp(t, { REDIS_URL: await users('resetkeys', '~bff:*', '+@all', 'resetchannels', '&bff:*') })
  t.ok(granted.redis.up(), 'a user granted ~bff:* starts, on Redis')
  // Granted exactly the stores' prefixes the README lists: a store's new key outside them (the
  // cache's per-tenant index had a prefix of its own) refused the start once upgraded.
  const listed = await buildDemoApp(t, { REDIS_URL: await users('resetkeys', '~bff:ratelimit:*', '~bff:cache:*', '~bff:cache-tag:*', '~bff:idem:*', '+@all', 'resetchannels', '&bff:*') })
  t.ok(listed.redis.up(), 'a user granted the prefixes the README lists starts, on Redis')
})

t.test('a Redis that refuses the database later (restarted with fewer) counts as down, until it takes it again', async t => {
  // A proxy that, while `refusing`, asks for database 99 where the client asked for database 5.
  let refusing = false
  const port = await selectProxy(t, () => refusing ? 'refuse' : 'pass')
  const { lines, logStream } = logLines()
  const app = await buildDemoApp(t, { REDIS_URL: `redis://127.0.0.1:${port}/5`, LOG_LEVEL: 'info', BFF_RATE_LIMIT_GLOBAL_MAX: 1000 }, { logger: undefined, logStream })
  await until(() => app.redis.up(), 'Redis up on database 5')
  // What the listeners of 'ready' after the gateway's own find: a refused connection must be
  // gone by then (ready on database 0, a store's command not asking up() ran there).
  const seenReady: string[] = []
  const probe = `mantle-refused-${process.pid}-${Date.now()}`
  app.redis.client.on('ready', () => {
    seenReady.push(app.redis.client.status)
    // As a store's command that does not ask up() (idempotency's outcome did): it must not land.
    app.redis.client.set(probe, '1').catch(() => {})
  })
  refusing = true
  const id = await app.redis.client.client('ID')
  cut()
  // The new connection is refused its SELECT (ioredis, which sent SELECT 5, names 5) and goes
  // ready on database 0 all the same: never up.
  await until(() => lines.some(l => l.level === 50), 'the refusal logged')
  await until(() => seenReady.length > 0, 'the connection ready on database 0')
  t.notOk(app.redis.up(), 'Redis counts as down')
  const db0 = new Redis(`redis://${target.host}/0`)
  t.teardown(async () => { await db0.del(probe); db0.disconnect() })
  // A guarded call counts in memory; the refused connections made anew each second do not end that.
  await app.inject({ method: 'GET', url: '/api/v1/agents?limit=1', headers: bearer() })
  t.ok(lines.some(l => /rate limits fall back to memory/.test(l.msg)), 'rate limits on memory')
  const made = lines.filter(l => /Redis refused/.test(l.msg)).length
  const tries = seenReady.length
  await until(() => seenReady.length > tries, 'made anew, refused again', 5000)
  await new Promise(resolve => setTimeout(resolve, 100))
  t.equal(await db0.exists(probe), 0, 'a command sent on the refused connection as it came ready never reached database 0')
  t.equal(lines.filter(l => /Redis refused/.test(l.msg)).length, made, 'the refusal logged once')
  t.notOk(lines.some(l => /counted in Redis again/.test(l.msg)), 'rate limits not said back in Redis')
  const ready = await app.inject({ method: 'GET', url: '/readyz' })
  t.equal(ready.statusCode, 503, 'not ready')
  t.match(ready.json(), { failing: ['redis'] })
  const diag = (await app.inject({ method: 'GET', url: '/diagz', headers: bearer({ roles: ['system'] }) })).json()
  t.match(diag.stores.redis, { healthy: false }, '/diagz says Redis is not healthy')
  t.match(lines.filter(l => l.level === 50).map(l => l.msg), [/^Redis refused the database 5 of REDIS_URL .*ERR DB index is out of range; stores fall back to memory/], 'logged at error, once')
  t.notOk(lines.some(l => /^(idempotency: )?Redis is back$/.test(l.msg)), 'never said back')
  refusing = false
  await until(() => app.redis.up(), 'up again once Redis takes the database', 10_000)
  t.not(await app.redis.client.client('ID'), id, 'on a new connection')
  t.ok(lines.some(l => /counted in Redis again/.test(l.msg)), 'rate limits back in Redis')
  await until(() => app.events.health().up, 'the events subscriber back (its connection was cut too)', 10_000)
  t.equal((await app.inject({ method: 'GET', url: '/readyz' })).statusCode, 200, 'ready again')
})

t.test('a Redis busy, loading or full during the handshake is away a moment, not refusing', async t => {
  // SELECT is not allowed while a script runs past busy-reply-threshold: a start-up then stopped,
  // blaming the database count.
  const reply = (message: string, name: string): Error => Object.assign(new Error(message), { name: 'ReplyError', command: { name, args: ['3'] } })
  t.notOk(refusal(reply('BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.', 'select')), 'BUSY')
  t.notOk(refusal(reply('LOADING Redis is loading the dataset in memory', 'select')), 'LOADING')
  t.notOk(refusal(reply('ERR max number of clients reached', 'auth')), 'full')
  t.notOk(refusal(Object.assign(new Error('Command timed out'), { command: { name: 'select' } })), 'a timeout is no reply')
  t.ok(refusal(reply('ERR DB index is out of range', 'select')), 'a database it does not have')
  t.ok(refusal(reply('WRONGPASS invalid username-password pair or user is disabled.', 'auth')), 'credentials')
  t.ok(refusal(reply('NOAUTH Authentication required.', 'select')), 'no credentials given')
})

t.test('a SELECT a busy Redis puts off leaves the connection unused, not on database 0, and does not stop start-up', async t => {
  let busy = true
  const port = await selectProxy(t, () => busy ? 'busy' : 'pass')
  const { lines, logStream } = logLines()
  const app = await buildDemoApp(t, { REDIS_URL: `redis://127.0.0.1:${port}/5`, LOG_LEVEL: 'info' }, { logger: undefined, logStream })
  t.notOk(app.redis.up(), 'started, with Redis counted as down')
  const probe = `mantle-busy-${process.pid}-${Date.now()}`
  const readies: boolean[] = []
  app.redis.client.on('ready', () => {
    readies.push(app.redis.up())
    app.redis.client.set(probe, '1').catch(() => {})
  })
  const db0 = new Redis(`redis://${target.host}/0`)
  t.teardown(async () => { await db0.del(probe); db0.disconnect() })
  await until(() => readies.length > 0, 'a connection made again, its SELECT put off again', 5000)
  await new Promise(resolve => setTimeout(resolve, 100))
  t.same(readies.filter(Boolean), [], 'never up')
  t.equal(await db0.exists(probe), 0, 'nothing written to database 0')
  t.notOk(lines.some(l => l.level === 50), 'not logged as a refusal')
  busy = false
  await until(() => app.redis.up(), 'up once Redis selects the database', 10_000)
  t.equal(await app.redis.client.set(probe + '-5', '1'), 'OK')
  t.equal(await db0.exists(probe + '-5'), 0, 'on database 5')
  await app.redis.client.del(probe + '-5')
})
