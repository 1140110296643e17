import t from 'tap'
import { WebSocket } from 'ws'
import { buildApp } from '../../app.js'
import { createGraphqlFace } from '../../adapters/graphql/index.js'
import { startKernel } from '../../kernel/server.js'
import { testConfig, token } from '../helper.js'

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
for (const [name, first] of [['a ping', JSON.stringify({ type: 'ping' })], ['a junk frame', 'not json']] as const) {
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
