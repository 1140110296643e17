import t from 'tap'
import type { AddressInfo } from 'node:net'
import { buildDemoApp, drained, token, until } from '../helper.js'
import { connect } from './websocket-helper.js'

// CONTRACT: the same input gives the same result and the same error code on every face. A tRPC
// call of an operation with a method that is not its type is refused over HTTP 405
// (METHOD_NOT_SUPPORTED: a mutation over GET) and recorded (65f4bac). Over the WebSocket the same
// mistake (`query` of a mutation, `subscription` of a query, `query` of an event) was answered
// NOT_FOUND 404, as if the procedure did not exist, and left no entry.

t.test('tRPC WebSocket: a call with a method not its procedure\'s type is refused 405 and recorded, as over HTTP', async t => {
  const app = await buildDemoApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as AddressInfo).port
  const who = { tenant: 'tmethod', user: 'umethod', roles: ['admin'] }
  const overHttp = await app.inject({ method: 'GET', url: '/trpc/createAgent?input=' + encodeURIComponent('{"name":"x"}'), headers: { authorization: `Bearer ${token(who)}` } })
  t.equal(overHttp.statusCode, 405)
  const httpError = JSON.parse(overHttp.body).error
  const client = await connect(t, `ws://127.0.0.1:${port}/trpc`, who)
  const frames: Array<Record<string, any>> = []
  client.ws.on('message', d => frames.push(JSON.parse(String(d)) as Record<string, any>))
  const calls: Array<[number, string, string]> = [[1, 'query', 'createAgent'], [2, 'subscription', 'getAgent'], [3, 'mutation', 'getAgent'], [4, 'query', 'runUpdated'], [5, 'query', 'noSuchThing']]
  for (const [id, method, path] of calls) client.send({ id, method, params: { path, input: { id: 'a1', name: 'x' } } })
  await until(() => calls.every(([id]) => frames.some(f => f.id === id && f.error !== undefined)), 'every call answered')
  const errorOf = (id: number): Record<string, any> => frames.find(f => f.id === id && f.error !== undefined)!.error
  for (const [id, method, path] of calls.slice(0, 4)) {
    const error = errorOf(id)
    t.match(error, { code: httpError.code, data: { code: httpError.data.code, httpStatus: 405, path } }, `${method} of ${path}: 405, as a mutation over GET`)
  }
  t.match(errorOf(5), { data: { code: 'NOT_FOUND', httpStatus: 404 } }, 'a procedure that is none: 404')
  await drained(app)
  const rows = (await app.audit.store.query({ tenant: 'tmethod', limit: 100 })).entries
  for (const [id, method, path] of calls.slice(0, 4)) {
    const of = rows.filter(r => r.requestId === errorOf(id).data.requestId)
    t.match(of, [{ category: 'security', status: 'BAD_REQUEST', statusCode: 405, userId: 'umethod', protocol: 'trpc', action: path, path: '/trpc/' + path }], `${method} of ${path} recorded once`)
  }
  t.equal(rows.filter(r => r.action === 'noSuchThing' || r.requestId === errorOf(5).data.requestId).length, 0, 'a procedure that is none: unrecorded, as over HTTP')
})
