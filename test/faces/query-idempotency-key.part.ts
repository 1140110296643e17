// "Queries ignore the key" (README, Idempotency keys) and "the same input gives
// the same result and the same error code on every face" (CONTRACT §3). A query sent with an
// Idempotency-Key the stores would refuse is answered on every face, as by REST (tRPC,
// GraphQL and the REST batch once refused it with 400).
import t from 'tap'
import { json, token, until } from '../helper.js'
import { idemSetup } from '../plugins/idempotency/idempotency-helper.js'
import WebSocket from 'ws'

t.test('a query ignores a malformed Idempotency-Key on every face', async t => {
  const s = await idemSetup(t, 'memory')
  s.kernel.on('GET /v1/items/x', (_req, res) => json(res, 200, { id: 'x', name: 'x' }))
  const headers = s.headers('two words') // a space: not a visible ASCII character
  const rest = await s.app.inject({ method: 'GET', url: '/api/v1/items/x', headers })
  t.equal(rest.statusCode, 200, 'REST: the query ignores the key')
  const trpc = await s.app.inject({ method: 'GET', url: '/trpc/getItem?input=' + encodeURIComponent('{"id":"x"}'), headers })
  t.equal(trpc.statusCode, 200, 'tRPC: the same query, the same answer')
  const gql = await s.app.inject({ method: 'POST', url: '/graphql', headers, payload: { query: '{ getItem(id: "x") { id } }' } })
  t.equal(gql.statusCode, 200, 'GraphQL: the same query, the same answer')
  t.same(gql.json().data?.getItem, { id: 'x' })
  const batch = await s.app.inject({ method: 'POST', url: '/api/v1/batch', headers, payload: { calls: [{ id: '1', op: 'getItem', input: { id: 'x' } }] } })
  t.equal(batch.statusCode, 200, 'batch: the same query, the same answer')
})

// A WebSocket call frame's idempotencyKey follows the Idempotency-Key header's rule: a query
// ignores a malformed one (the frame schema once refused it before the op was looked at).

t.test('WebSocket: a query frame ignores a malformed idempotencyKey, as REST, tRPC, GraphQL and batch do', async t => {
  // README: "Queries ignore the key, malformed or not"; CONTRACT §3: the same input gives the
  // same result on every face.
  const s = await idemSetup(t, 'memory')
  s.kernel.on('GET /v1/items/x', (_req, res) => json(res, 200, { id: 'x', name: 'x' }))
  const rest = await s.app.inject({ method: 'GET', url: '/api/v1/items/x', headers: s.headers('two words') })
  t.equal(rest.statusCode, 200, 'REST ignores the malformed key on a query')
  await s.app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = s.app.server.address() as { port: number }
  const ws = new WebSocket(`ws://127.0.0.1:${port}/ws?access_token=${token({ tenant: s.tenant })}`)
  t.teardown(() => ws.close())
  const frames: any[] = []
  ws.on('message', m => frames.push(JSON.parse(String(m))))
  await new Promise(resolve => ws.on('open', resolve))
  ws.send(JSON.stringify({ id: '1', op: 'getItem', input: { id: 'x' }, idempotencyKey: 'two words' }))
  await until(() => frames.length >= 1, 'the answer frame')
  t.same(frames[0], { id: '1', result: { id: 'x', name: 'x' } }, 'the query is answered')
})
