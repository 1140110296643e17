import t from 'tap'
import { buildTestApp, startTestKernel, testManifest, token, json } from '../helper.js'
import { declaresInheritedName, withoutPrototypes } from '../../own-properties.js'

// An input field named as a member of Object.prototype (`toString`, `constructor`, `valueOf`) is
// a field like any other: left out, it is left out. Ajv read `data.toString`, the inherited
// function, on every JSON face, and refused the call ("must be string").

t.test('an optional input field named as an Object.prototype member may be left out on every face', async t => {
  const kernel = await startTestKernel(t, { 'POST /v1/notes': (_req, res) => { json(res, 201, { id: 'n1' }) } })
  const input = { type: 'object', properties: { toString: { type: 'string' }, valueOf: { type: 'integer' }, text: { type: 'string' } } }
  const manifest = testManifest({ addNote: { type: 'mutation', rest: 'POST /notes', kernel: 'POST /v1/notes', input, output: { type: 'object', properties: { id: { type: 'string' } } } } }, { url: kernel.url })
  const app = await buildTestApp(t, {}, { manifest })
  const headers = { authorization: `Bearer ${token()}` }
  const rest = await app.inject({ method: 'POST', url: '/api/v1/notes', headers, payload: { text: 'a' } })
  t.equal(rest.statusCode, 201, rest.body)
  const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', headers, payload: { calls: [{ id: 'x', op: 'addNote', input: { text: 'a' } }] } })
  t.same(batch.json().results[0].result, { id: 'n1' }, batch.body)
  const trpc = await app.inject({ method: 'POST', url: '/trpc/addNote', headers, payload: { text: 'a' } })
  t.same(trpc.json().result?.data, { id: 'n1' }, trpc.body)
  const graphql = await app.inject({ method: 'POST', url: '/graphql', headers, payload: { query: 'mutation { addNote(text: "a") { id } }' } })
  t.same(graphql.json().data?.addNote, { id: 'n1' }, graphql.body)
  // Given, it is checked as declared.
  const wrong = await app.inject({ method: 'POST', url: '/api/v1/notes', headers, payload: { toString: 1 } })
  t.equal(wrong.statusCode, 400, wrong.body)
  t.same(kernel.requests.map(r => JSON.parse(r.body)), [{ text: 'a' }, { text: 'a' }, { text: 'a' }, { text: 'a' }])
})

t.test('an answer without an optional field named as an Object.prototype member is served as it is on every face', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/notes/n1': (_req, res) => { json(res, 200, { id: 'n1' }) } })
  const output = { type: 'object', properties: { id: { type: 'string' }, toString: { type: 'string' }, constructor: { type: 'object', properties: { a: { type: 'integer' } } } } }
  const input = { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }
  const manifest = testManifest({ getNote: { type: 'query', rest: 'GET /notes/:id', kernel: 'GET /v1/notes/{id}', input, output } }, { url: kernel.url })
  const app = await buildTestApp(t, { BFF_CACHE_ENABLED: false }, { manifest })
  const headers = { authorization: `Bearer ${token()}` }
  const rest = await app.inject({ method: 'GET', url: '/api/v1/notes/n1', headers })
  t.equal(rest.statusCode, 200)
  t.equal(rest.body, '{"id":"n1"}')
  const trpc = await app.inject({ method: 'GET', url: `/trpc/getNote?input=${encodeURIComponent('{"id":"n1"}')}`, headers })
  t.equal(trpc.body, '{"result":{"data":{"id":"n1"}}}')
  const graphql = await app.inject({ method: 'POST', url: '/graphql', headers, payload: { query: '{ getNote(id: "n1") { id toString } }' } })
  t.same(graphql.json(), { data: { getNote: { id: 'n1', toString: null } } })
  // Given, they are served.
  kernel.on('GET /v1/notes/n2', (_req, res) => { json(res, 200, { id: 'n2', toString: 'shown', constructor: { a: 1 } }) })
  const given = await app.inject({ method: 'GET', url: '/api/v1/notes/n2', headers })
  t.same(given.json(), { id: 'n2', toString: 'shown', constructor: { a: 1 } })
  const givenGraphql = await app.inject({ method: 'POST', url: '/graphql', headers, payload: { query: '{ getNote(id: "n2") { id toString } }' } })
  t.same(givenGraphql.json(), { data: { getNote: { id: 'n2', toString: 'shown' } } })
})

t.test('own-properties: which schemas name an inherited member, and answers copied without prototypes', async t => {
  t.equal(declaresInheritedName({ type: 'object', properties: { id: { type: 'string' } } }), false)
  t.equal(declaresInheritedName({ type: 'array', items: { type: 'object', properties: { valueOf: { type: 'number' } } } }), true)
  t.equal(declaresInheritedName({ type: 'object', properties: { x: { enum: [{ properties: { toString: {} } }] } } }), false, 'not in data')
  const copy = withoutPrototypes({ a: [{ b: 1 }, 2], c: null }) as { a: [Record<string, unknown>, number], c: null }
  t.equal(Object.getPrototypeOf(copy), null)
  t.equal(Object.getPrototypeOf(copy.a[0]), null)
  t.ok(Array.isArray(copy.a))
  t.equal(copy.a[0].toString, undefined)
  t.equal(JSON.stringify(copy), '{"a":[{"b":1},2],"c":null}')
})
