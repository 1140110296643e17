import t from 'tap'
import WebSocket from 'ws'
import { buildDemoApp, bearer } from './helper.js'

// One body limit (BFF_BODY_LIMIT) on every face: beyond it a 413 in the face's own shape, or a
// WebSocket close 1009; never a 5xx.
const LIMIT = 4096
const pad = 'x'.repeat(LIMIT * 2)
const jsonHeaders = { ...bearer(), 'content-type': 'application/json' }

t.test('an oversized body is refused on every HTTP face, in its own shape', async t => {
  const app = await buildDemoApp(t, { BFF_BODY_LIMIT: LIMIT })

  const rest = await app.inject({ method: 'POST', url: '/api/v1/agents', headers: jsonHeaders, payload: JSON.stringify({ name: 'a', model: 'm', pad }) })
  t.equal(rest.statusCode, 413, 'REST')
  t.match(rest.headers['content-type'], /^application\/problem\+json/)
  t.match(rest.json(), { code: 'PAYLOAD_TOO_LARGE', status: 413 })

  const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: jsonHeaders, payload: JSON.stringify({ calls: [{ op: 'getAgent', input: { id: 'a1', pad } }] }) })
  t.equal(batch.statusCode, 413, 'batch')
  t.match(batch.json(), { code: 'PAYLOAD_TOO_LARGE', status: 413 })

  const trpc = await app.inject({ method: 'POST', url: '/trpc/createAgent', headers: jsonHeaders, payload: JSON.stringify({ name: 'a', model: 'm', pad }) })
  t.equal(trpc.statusCode, 413, 'tRPC')
  t.match(trpc.headers['content-type'], /^application\/json/)
  t.match(trpc.json(), { error: { code: Number, data: { code: 'PAYLOAD_TOO_LARGE', httpStatus: 413 } } }, 'tRPC-shaped')

  const gql = await app.inject({ method: 'POST', url: '/graphql', headers: jsonHeaders, payload: JSON.stringify({ query: '{ listAgents { id } }', variables: { pad } }) })
  t.equal(gql.statusCode, 413, 'GraphQL')
  t.match(gql.json(), { errors: [{ message: String, extensions: { code: 'PAYLOAD_TOO_LARGE', status: 413 } }] }, 'GraphQL-shaped')

  // Just under the limit is not refused by the limit (the check is the limit, not any body).
  const small = await app.inject({ method: 'POST', url: '/graphql', headers: jsonHeaders, payload: JSON.stringify({ query: '{ listAgents { id } }' }) })
  t.equal(small.statusCode, 200, 'a small GraphQL body passes')
})

t.test('an oversized WebSocket frame closes with 1009 on every face that upgrades', async t => {
  const app = await buildDemoApp(t, { BFF_BODY_LIMIT: LIMIT })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const faces: Array<[string, string, string | undefined]> = [
    ['/ws', '/ws', undefined],
    ['GraphQL subscriptions', '/graphql', 'graphql-transport-ws'],
    ['tRPC subscriptions', '/trpc', undefined]
  ]
  for (const [name, path, protocol] of faces) {
    const ws = new WebSocket(`ws://127.0.0.1:${port}${path}`, protocol, { headers: bearer() })
    t.teardown(() => ws.terminate())
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve())
      ws.once('error', reject)
    })
    const closed = new Promise<number>(resolve => ws.once('close', (code: number) => resolve(code)))
    ws.send(JSON.stringify({ pad }))
    t.equal(await closed, 1009, name)
  }
})
