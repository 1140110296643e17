import t from 'tap'
import { gunzipSync } from 'node:zlib'
import { bearer, buildDemoApp } from '../../helper.js'
import { entries } from './entries.js'

// A GraphQL document refused before any of its fields ran leaves one entry whose status is the
// code its client got (README, "Audit trail"). The code was read from the answer's body in an
// onSend hook that ran after compression's and HEAD's: a body compressed (over 1 KB, a client
// accepting gzip: every browser) or left out (HEAD) was read as no code, and the entry said
// VALIDATION_FAILED beside a 413 or 405.

const ROOTS = Array.from({ length: 80 }, (_, i) => `f${i}: listAgents { id }`).join(' ')

t.test('a document refused 413, its answer compressed: the entry says PAYLOAD_TOO_LARGE, as the client was told', async t => {
  const app = await buildDemoApp(t, { BFF_COMPRESSION_ENABLED: true })
  // A long operation name makes the error's message, and so the answer, pass 1 KB.
  const query = `query Q${'x'.repeat(1200)} { ${ROOTS} }`
  const res = await app.inject({ method: 'POST', url: '/graphql', headers: { ...bearer(), 'x-request-id': 'gz413', 'accept-encoding': 'gzip' }, payload: { query } })
  t.equal(res.statusCode, 413)
  t.equal(res.headers['content-encoding'], 'gzip', 'the answer went out compressed')
  t.equal(JSON.parse(gunzipSync(res.rawPayload).toString()).errors[0].extensions.code, 'PAYLOAD_TOO_LARGE')
  const rows = (await entries(app)).filter(r => r.requestId === 'gz413')
  t.equal(rows.length, 1)
  t.match(rows[0], { action: 'http', status: 'PAYLOAD_TOO_LARGE', statusCode: 413 })
})

t.test('a document refused 413 over HEAD: the entry says PAYLOAD_TOO_LARGE, as the same GET does', async t => {
  const app = await buildDemoApp(t)
  const url = `/graphql?query=${encodeURIComponent(`{ ${ROOTS} }`)}`
  const get = await app.inject({ method: 'GET', url, headers: { ...bearer(), 'x-request-id': 'get413' } })
  const head = await app.inject({ method: 'HEAD', url, headers: { ...bearer(), 'x-request-id': 'head413' } })
  t.equal(get.statusCode, 413)
  t.equal(head.statusCode, 413)
  const rows = await entries(app)
  t.match(rows.filter(r => r.requestId === 'get413'), [{ status: 'PAYLOAD_TOO_LARGE', statusCode: 413 }], 'control: GET')
  t.match(rows.filter(r => r.requestId === 'head413'), [{ status: 'PAYLOAD_TOO_LARGE', statusCode: 413 }], 'HEAD')
  t.equal(rows.filter(r => r.requestId === 'head413').length, 1)
})
