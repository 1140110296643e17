import t from 'tap'
import { WebSocket } from 'ws'
import { buildApp } from '../../app.js'
import { createGraphqlFace } from '../../adapters/graphql/index.js'
import { startKernel } from '../../kernel/server.js'
import { testConfig, token } from '../helper.js'

t.test('a subscription socket that never sends connection_init is closed with 4408', async t => {
  const kernel = await startKernel({ port: 0 })
  t.teardown(() => kernel.close())
  // The face is registered here with a short timeout, not by app.ts.
  const app = await buildApp(testConfig({ BFF_GRAPHQL_ENABLED: false }), { logger: false, kernelUrl: kernel.url })
  await app.register(createGraphqlFace({ initTimeoutMs: 150 }), { bodyLimit: 1048576, maxCalls: 50, maxDepth: 12, secured: true, development: false })
  t.teardown(() => app.close())
  await app.listen({ port: 0, host: '127.0.0.1' })
  const url = `ws://127.0.0.1:${(app.server.address() as { port: number }).port}/graphql`

  const idle = new WebSocket(url, 'graphql-transport-ws', { headers: { authorization: `Bearer ${token()}` } })
  const [code, reason] = await new Promise<[number, string]>(resolve => idle.once('close', (c, r) => resolve([c, String(r)])))
  t.equal(code, 4408)
  t.equal(reason, 'Connection initialisation timeout')

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
