import t from 'tap'
import { bearer, buildDemoApp } from '../../helper.js'
import { entries } from './entries.js'

// A call that names a known operation and is refused VALIDATION_FAILED (a body that is not an
// object, a malformed Idempotency-Key) is refused within the pipeline and has its audit entry,
// as the same call with an object input that fails the schema has.
t.test('REST mutation whose JSON body is an array: 400 VALIDATION_FAILED, one entry', async t => {
  const app = await buildDemoApp(t)
  const res = await app.inject({ method: 'POST', url: '/api/v1/agents', headers: { ...bearer(), 'x-request-id': 'arraybody', 'content-type': 'application/json' }, payload: '[1,2]' })
  t.equal(res.statusCode, 400)
  const control = await app.inject({ method: 'POST', url: '/api/v1/agents', headers: { ...bearer(), 'x-request-id': 'objectbody' }, payload: { bogus: 1 } })
  t.equal(control.statusCode, 400)
  const rows = await entries(app)
  t.equal(rows.filter(r => r.requestId === 'objectbody').length, 1, 'control: an object body failing the schema has its entry')
  t.equal(rows.filter(r => r.requestId === 'arraybody').length, 1, 'an array body has its entry')
})

t.test('REST mutation with an Idempotency-Key of 300 characters: 400 VALIDATION_FAILED, one entry', async t => {
  const app = await buildDemoApp(t)
  const res = await app.inject({ method: 'POST', url: '/api/v1/agents', headers: { ...bearer(), 'x-request-id': 'badkey', 'idempotency-key': 'x'.repeat(300) }, payload: { name: 'n', model: 'm' } })
  t.equal(res.statusCode, 400)
  t.equal((await entries(app)).filter(r => r.requestId === 'badkey').length, 1, 'one entry for the refused call')
})

t.test('tRPC mutation whose input is a string: VALIDATION_FAILED, one entry', async t => {
  const app = await buildDemoApp(t)
  const res = await app.inject({ method: 'POST', url: '/trpc/createAgent', headers: { ...bearer(), 'x-request-id': 'trpcstring', 'content-type': 'application/json' }, payload: '"x"' })
  t.equal(res.statusCode, 400, res.body)
  t.equal((await entries(app)).filter(r => r.requestId === 'trpcstring').length, 1, 'one entry for the refused call')
})
