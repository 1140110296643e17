import t, { type Test } from 'tap'
import { buildTestApp, startTestKernel, bearer, json, fixture } from './helper.js'
import { loadManifestFile } from '../manifest.js'

// The gateway is generic: a manifest of another domain, with other methods, param types,
// defaults and coercions, runs through the same code as the demo.

async function setup (t: Test) {
  const kernel = await startTestKernel(t, {
    'GET /books': (req, res) => json(res, 200, [{ isbn: '9780000000001', title: 'Dune', copies: 2, format: 'paperback', shelf: 'B4', query: req.url }]),
    'GET /books/9780000000001': (_req, res) => json(res, 200, { isbn: '9780000000001', title: 'Dune', authors: ['Herbert'], copies: 2 }),
    'PUT /members/m7/loans/9780000000001': (req, res) => json(res, 201, { id: 41, isbn: '9780000000001', member: 'm7', due: '2026-12-07', days: (JSON.parse(req.body) as { days: number }).days }),
    'POST /loans/41/return': (_req, res) => json(res, 200, { id: 41, isbn: '9780000000001', member: 'm7', due: '2026-12-07', returned: true }),
    'PATCH /loans/41': (req, res) => json(res, 200, { id: 41, isbn: '9780000000001', member: 'm7', due: '2026-12-20', body: req.body })
  })
  const manifest = await loadManifestFile(fixture('library-manifest.yaml'))
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  return { app, kernel, manifest }
}

t.test('every route of another domain works through the same gateway code', async t => {
  const { app, kernel, manifest } = await setup(t)
  const member = bearer({ roles: ['member'], zone: 'public' })

  const found = await app.inject({ method: 'GET', url: '/api/v1/catalogue?author=Herbert&format=paperback&format=ebook&available=true', headers: member })
  t.equal(found.statusCode, 200)
  t.same(found.json(), [{ isbn: '9780000000001', title: 'Dune', copies: 2, format: 'paperback' }])
  t.equal(kernel.requests[0].url, '/books?author=Herbert&format=paperback&format=ebook&available=true&page=1', 'arrays repeat, booleans coerce, defaults apply')

  const single = await app.inject({ method: 'GET', url: '/api/v1/catalogue?format=ebook', headers: member })
  t.equal(single.statusCode, 200, 'one value of an array parameter is an array of one')

  const book = await app.inject({ method: 'GET', url: '/api/v1/catalogue/9780000000001', headers: member })
  t.equal(book.statusCode, 200)
  t.same(book.json(), { isbn: '9780000000001', title: 'Dune', authors: ['Herbert'], copies: 2 })

  const borrowed = await app.inject({ method: 'POST', url: '/api/v1/members/m7/loans', headers: member, payload: { isbn: '9780000000001' } })
  t.equal(borrowed.statusCode, 201)
  t.same(borrowed.json(), { id: 41, isbn: '9780000000001', member: 'm7', due: '2026-12-07' })
  const put = kernel.requests.find(r => r.method === 'PUT')!
  t.same(JSON.parse(put.body), { days: 14 }, 'path params leave the body; the default fills days')

  const returned = await app.inject({ method: 'DELETE', url: '/api/v1/loans/41', headers: member })
  t.equal(returned.statusCode, 200)
  t.equal(returned.json().returned, true)
  const post = kernel.requests.find(r => r.method === 'POST')!
  t.equal(post.body, '{}', 'a DELETE face can call a POST Kernel route; the integer param is in the path only')

  const librarian = bearer({ roles: ['librarian'], zone: 'internal' })
  const changed = await app.inject({ method: 'PUT', url: '/api/v1/loans/41', headers: librarian, payload: { days: 20 } })
  t.equal(changed.statusCode, 200)
  t.same(JSON.parse(kernel.requests.find(r => r.method === 'PATCH')!.body), { days: 20 })

  t.equal(manifest.operations.length, 5)
  t.same(manifest.operations.map(o => app.pipeline.entry(o.name).stages.includes('validation')), [true, true, true, true, true])
})

t.test('its own roles, zones and schemas apply', async t => {
  const { app, kernel } = await setup(t)
  const member = bearer({ roles: ['member'], zone: 'public' })
  const badIsbn = await app.inject({ method: 'GET', url: '/api/v1/catalogue/123', headers: member })
  t.equal(badIsbn.statusCode, 400)
  t.match(badIsbn.json(), { code: 'VALIDATION_FAILED', detail: /input\.isbn must match pattern/ })
  const badId = await app.inject({ method: 'DELETE', url: '/api/v1/loans/abc', headers: member })
  t.equal(badId.statusCode, 400)
  t.match(badId.json(), { detail: /input\.id must be integer/ })
  const badEnum = await app.inject({ method: 'GET', url: '/api/v1/catalogue?format=scroll', headers: member })
  t.equal(badEnum.statusCode, 400)
  const notMember = await app.inject({ method: 'POST', url: '/api/v1/members/m7/loans', headers: bearer({ roles: ['guest'] }), payload: { isbn: '9780000000001' } })
  t.equal(notMember.statusCode, 403, 'defaults.roles applies')
  const anyone = await app.inject({ method: 'GET', url: '/api/v1/catalogue', headers: bearer({ roles: [] }) })
  t.equal(anyone.statusCode, 200, 'an op can override defaults.roles with []')
  const memberOnInternal = await app.inject({ method: 'PUT', url: '/api/v1/loans/41', headers: bearer({ roles: ['librarian'], zone: 'public' }), payload: { days: 3 } })
  t.equal(memberOnInternal.statusCode, 403)
  t.equal(kernel.requests.length, 1, 'refused calls never reached the Kernel')
})
