import t from 'tap'
import { WebSocket } from 'ws'
import { buildApp } from '../../app.js'
import { createGraphqlFace } from '../../adapters/graphql/index.js'
import { startKernel } from '../../kernel/server.js'
import { testConfig } from '../helper.js'

// adapters/graphql/index.ts closes a /graphql socket with 4408 when no connection_init came in
// time. An upgrade needs no credentials (connection_init may bring them): a `ping` (allowed
// before init by graphql-transport-ws) or a junk frame must not keep the socket open (any first
// message once disarmed the timer). graphql-transport-ws: the server closes with 4408 when no
// ConnectionInit arrived within the waiting time, whatever else arrived.

for (const [name, first] of [['a ping', JSON.stringify({ type: 'ping' })], ['a junk frame', 'not json']] as const) {
  t.test(`an anonymous socket that sends ${name} but never connection_init is still closed with 4408`, async t => {
    const kernel = await startKernel({ port: 0 })
    t.teardown(() => kernel.close())
    const app = await buildApp(testConfig({ BFF_GRAPHQL_ENABLED: false }), { logger: false, kernelUrl: kernel.url })
    await app.register(createGraphqlFace({ initTimeoutMs: 150 }), { bodyLimit: 1048576, maxCalls: 50, maxDepth: 12, secured: true, development: false })
    t.teardown(() => app.close())
    await app.listen({ port: 0, host: '127.0.0.1' })
    const url = `ws://127.0.0.1:${(app.server.address() as { port: number }).port}/graphql`

    const idle = new WebSocket(url, 'graphql-transport-ws') // no credentials at all
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
