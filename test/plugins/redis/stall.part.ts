// A process paused past the command timeout (CPU throttling under a container's CPU limit, a long
// GC, a big synchronous parse) after its PING was sent and before it reads the PONG: ioredis'
// timeout timer runs first, and the PING fails though Redis answered at once. Counted as missed,
// two such pauses a beat apart dropped a healthy connection (every store on memory, the cache
// emptied, the events subscriber made anew).
import t from 'tap'
import { type Command, Redis } from 'ioredis'
import { watchPings } from '../../../plugins/redis/index.js'
import { until } from '../../helper.js'
import { redisVia, startTcpProxy } from '../../proxy.js'

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const target = new URL(REDIS_URL)
const COMMAND_TIMEOUT_MS = 200
const STALL_MS = 500

/**
 * Makes each of `client`'s PINGs be followed by a pause of the process: sent from the check phase
 * and the loop held there, so that the next loop turn runs its timers (the command timeout, past
 * by then) before it reads the PONG. Returns each PING's outcome, as it ends.
 */
function stallAfterEachPing (t: { teardown: (fn: () => void) => void }, client: Redis): string[] {
  const outcomes: string[] = []
  const send = client.sendCommand.bind(client)
  client.sendCommand = (command: Command, stream?: never) => {
    if (command.name !== 'ping') return send(command, stream)
    setImmediate(() => {
      command.promise.then(() => { outcomes.push('answered') }, (err: Error) => { outcomes.push(err.message) })
      ;(send(command, stream) as Promise<unknown>).catch(() => {})
      const end = Date.now() + STALL_MS
      while (Date.now() < end) { /* the process paused */ }
    })
    return command.promise
  }
  t.teardown(() => { client.sendCommand = send })
  return outcomes
}

t.test('PINGs answered in time but read after a pause of the process longer than the command timeout do not drop the connection', async t => {
  const client = new Redis(REDIS_URL, { commandTimeout: COMMAND_TIMEOUT_MS })
  t.teardown(() => client.disconnect())
  await client.ping()
  const id = await client.client('ID')
  const outcomes = stallAfterEachPing(t, client)
  const deaf: string[] = []
  let heard = 0
  const timer = watchPings(client, 50, 2, { deaf: err => deaf.push(err.message), heard: () => { heard++ } })
  t.teardown(() => clearInterval(timer))
  await until(() => outcomes.length >= 8, '8 PINGs', 30_000)
  clearInterval(timer)
  t.same(outcomes.filter(o => o !== 'Command timed out'), [], 'each PING timed out: its PONG was read after the timeout ran')
  t.same(deaf, [], 'never taken for deaf')
  t.equal(heard, 0, 'nor for an answer heard')
  t.equal(client.status, 'ready', 'still ready')
  t.equal(await client.client('ID'), id, 'the same connection throughout')
})

t.test('a connection that hears nothing more is still dropped when the process pauses after each PING', async t => {
  const proxy = await startTcpProxy(t, Number(target.port || 6379), target.hostname)
  const client = new Redis(redisVia(proxy.port), { commandTimeout: COMMAND_TIMEOUT_MS, connectionName: 'mantle-test-stall' })
  t.teardown(() => client.disconnect())
  await client.ping()
  const connections = proxy.connections
  const outcomes = stallAfterEachPing(t, client)
  const deaf: string[] = []
  const timer = watchPings(client, 50, 2, { deaf: err => deaf.push(err.message) })
  t.teardown(() => clearInterval(timer))
  // A flow a failover left half-open: the PINGs reach Redis, nothing comes back.
  proxy.deafen(sent => sent.includes('mantle-test-stall'))
  await until(() => deaf.length > 0, 'the connection found deaf', 10_000)
  t.same(outcomes.slice(0, 2), ['Command timed out', 'Command timed out'], 'two PINGs missed')
  t.same(deaf, ['Command timed out'], 'dropped after two in a row')
  proxy.restore()
  await until(() => client.status === 'ready' && proxy.connections > connections, 'a new connection ready', 10_000)
  clearInterval(timer)
})

t.test('a connection whose answers all come later than the command timeout is dropped, though the answers to earlier commands keep coming', async t => {
  // An overloaded Redis or a saturated link: every answer comes, 400 ms late. On a busy
  // connection the answers to the commands sent before each PING arrive while it waits, so
  // "something was read meanwhile" held for every PING, and a connection on which every command
  // waits out the timeout stayed up (the stores waited the timeout on each call, up() said so).
  const proxy = await startTcpProxy(t, Number(target.port || 6379), target.hostname)
  const client = new Redis(redisVia(proxy.port), { commandTimeout: COMMAND_TIMEOUT_MS })
  t.teardown(() => client.disconnect())
  client.on('error', () => {})
  await until(() => client.status === 'ready', 'the connection ready')
  const connections = proxy.connections
  // The stores' calls, each 20 ms (one alone may fail: the timeout, as every call then).
  const traffic = setInterval(() => { if (client.status === 'ready') client.get('mantle-test-stall-traffic').catch(() => {}) }, 20)
  t.teardown(() => clearInterval(traffic))
  const deaf: string[] = []
  const timer = watchPings(client, 50, 2, { deaf: err => deaf.push(err.message) })
  t.teardown(() => clearInterval(timer))
  proxy.delay(2 * COMMAND_TIMEOUT_MS)
  await until(() => deaf.length > 0, 'the connection found deaf', 10_000).catch(() => {})
  t.same(deaf, ['Command timed out'], 'dropped after two PINGs answered too late')
  proxy.restore()
  await until(() => client.status === 'ready' && proxy.connections > connections, 'a new connection ready', 10_000)
  clearInterval(traffic)
  clearInterval(timer)
})
