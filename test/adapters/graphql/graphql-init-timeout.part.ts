import t from 'tap'
import { WebSocket } from 'ws'
import { buildApp } from '../../../app.js'
import { createGraphqlFace } from '../../../adapters/graphql/index.js'
import { startKernel } from '../../../kernel/server.js'
import { createSigner } from 'fast-jwt'
import { testConfig, token, SECRET, until } from '../../helper.js'

/** A gateway whose GraphQL face closes sockets left uninitialised for 150 ms; its /graphql URL. */
async function shortTimeout (t: { teardown: (fn: () => unknown) => void }): Promise<string> {
  const kernel = await startKernel({ port: 0 })
  t.teardown(() => kernel.close())
  // The face is registered here with a short timeout, not by app.ts.
  const app = await buildApp(testConfig({ BFF_GRAPHQL_ENABLED: false }), { logger: false, kernelUrl: kernel.url })
  await app.register(createGraphqlFace({ initTimeoutMs: 150 }), { bodyLimit: 1048576, maxCalls: 50, maxDepth: 12, secured: true, development: false })
  t.teardown(() => app.close())
  await app.listen({ port: 0, host: '127.0.0.1' })
  return `ws://127.0.0.1:${(app.server.address() as { port: number }).port}/graphql`
}

t.test('a subscription socket that never sends connection_init is closed with 4408', async t => {
  const url = await shortTimeout(t)
  const idle = new WebSocket(url, 'graphql-transport-ws', { headers: { authorization: `Bearer ${token()}` } })
  const [code, reason] = await new Promise<[number, string]>(resolve => idle.once('close', (c, r) => resolve([c, String(r)])))
  t.equal(code, 4408)
  t.equal(reason, 'Connection initialisation timeout')
  // The same route with a trailing slash: its sockets were told apart by URL and went unscreened.
  const slashed = new WebSocket(url + '/', 'graphql-transport-ws', { headers: { authorization: `Bearer ${token()}` } })
  t.teardown(() => slashed.terminate())
  t.equal(await new Promise<number>(resolve => slashed.once('close', c => resolve(c))), 4408, '/graphql/ too')

  // A client that initialises in time is not touched.
  const active = new WebSocket(url, 'graphql-transport-ws', { headers: { authorization: `Bearer ${token()}` } })
  t.teardown(() => active.terminate())
  await new Promise(resolve => active.once('open', resolve))
  const ack = new Promise<string>(resolve => active.once('message', data => resolve(String(data))))
  active.send(JSON.stringify({ type: 'connection_init', payload: {} }))
  t.match(JSON.parse(await ack), { type: 'connection_ack' })
  await new Promise(resolve => setTimeout(resolve, 300))
  t.equal(active.readyState, WebSocket.OPEN, 'still open after the timeout')
})

// An upgrade needs no credentials (connection_init may bring them): a `ping` (allowed before
// init by graphql-transport-ws) or a junk frame must not keep the socket open (any first message
// once disarmed the timer). graphql-transport-ws: the server closes with 4408 when no
// ConnectionInit arrived within the waiting time, whatever else arrived.
for (const [name, first] of [['a ping', JSON.stringify({ type: 'ping' })], ['a pong', JSON.stringify({ type: 'pong' })]] as const) {
  t.test(`an anonymous socket that sends ${name} but never connection_init is still closed with 4408`, async t => {
    const idle = new WebSocket(await shortTimeout(t), 'graphql-transport-ws') // no credentials at all
    t.teardown(() => idle.terminate())
    let closed: number | null = null
    idle.on('close', c => { closed = c })
    idle.on('message', () => {})
    await new Promise(resolve => idle.once('open', resolve))
    idle.send(first)
    await new Promise(resolve => setTimeout(resolve, 1000))
    t.equal(closed, 4408, `closed with 4408 (readyState after 1 s: ${idle.readyState})`)
  })
}

// An initialised socket needs an identity: its own credentials are verified at connection_init
// and their expiry timed. Before, only a subscribe read them: a socket that never subscribed
// stayed open for ever, anonymous, forged or expired, holding one of the face's slots.
t.test('an initialised socket without an identity is closed with 4401; one whose connection_init token is refused at once with 4403; one whose token expires with 4403, subscribed or not', async t => {
  const url = await shortTimeout(t)
  const now = Math.floor(Date.now() / 1000)
  // exp 3 s ago; the 5 s clock tolerance leaves it good for 1 to 2 more seconds.
  const short = createSigner({ key: SECRET, algorithm: 'HS256', noTimestamp: true })({ sub: 'u', tid: 'T', roles: ['viewer'], exp: now - 3 })
  const open = async (payload: Record<string, unknown>, headers: Record<string, string> = {}): Promise<{ closed: () => number | null, at: () => number }> => {
    const socket = new WebSocket(url, 'graphql-transport-ws', { headers })
    t.teardown(() => socket.terminate())
    let closed: number | null = null
    let at = 0
    socket.on('close', c => { closed = c; at = Date.now() })
    await new Promise(resolve => socket.once('open', resolve))
    const ack = new Promise<string>(resolve => socket.once('message', data => resolve(String(data))))
    socket.send(JSON.stringify({ type: 'connection_init', payload }))
    t.match(JSON.parse(await ack), { type: 'connection_ack' })
    return { closed: () => closed, at: () => at }
  }
  // connection_init's own credentials refused: closed at once with 4403, never acked (before:
  // acked, then 4401 after the timeout). graphql-ws' client retries 4403 with its connectionParams.
  const refused = async (payload: Record<string, unknown>): Promise<{ code: number, reason: string, messages: string[] }> => {
    const socket = new WebSocket(url, 'graphql-transport-ws')
    t.teardown(() => socket.terminate())
    const messages: string[] = []
    socket.on('message', data => messages.push(String(data)))
    await new Promise(resolve => socket.once('open', resolve))
    socket.send(JSON.stringify({ type: 'connection_init', payload }))
    const [code, reason] = await new Promise<[number, string]>(resolve => socket.once('close', (c, r) => resolve([c, String(r)])))
    return { code, reason, messages }
  }
  t.same(await refused({ authorization: 'Bearer not-a-jwt' }), { code: 4403, reason: 'Forbidden: The token was refused: the token is malformed', messages: [] }, 'a forged token')
  t.same((await refused({ authorization: `Bearer ${token({ ttlSeconds: -60 })}` })).code, 4403, 'an expired token')
  t.same((await refused({ authorization: 42 })).code, 4403, 'an authorization that is no string')
  const started = Date.now()
  const anonymous = await open({})
  const expiringUpgrade = await open({}, { authorization: `Bearer ${short}` })
  const expiringInit = await open({ authorization: `Bearer ${short}` })
  const good = await open({ authorization: `Bearer ${token()}` })
  await until(() => anonymous.closed() !== null, 'the socket without an identity to close', 5000)
  t.equal(anonymous.closed(), 4401)
  t.ok(anonymous.at() - started < 1500, 'after the face\'s timeout, not at the token\'s expiry')
  await until(() => expiringUpgrade.closed() !== null && expiringInit.closed() !== null, 'the expired sockets to close', 5000)
  // 4403, which graphql-ws' client retries with a fresh token (graphql-ws-client-reconnect.part.ts).
  t.equal(expiringUpgrade.closed(), 4403, 'the upgrade\'s token expired')
  t.equal(expiringInit.closed(), 4403, 'connection_init\'s token expired')
  await new Promise(resolve => setTimeout(resolve, 300))
  t.equal(good.closed(), null, 'a socket with a valid token stays open')
})
