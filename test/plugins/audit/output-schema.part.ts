import t from 'tap'
import { bearer, buildTestApp, startTestKernel, testManifest, json } from '../../helper.js'
import { entries } from './entries.js'

// An uncached query without idempotency: the op's output serializer runs as the pipeline's
// innermost step, so an answer it refuses is a KERNEL_ERROR the audit stage records (it once ran
// in the face, after the audit stage had settled with "ok").
t.test('an answer the output schema refuses: the client gets 502 KERNEL_ERROR, and so does its entry', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/items/i1': (_req, res) => { json(res, 200, { nope: 1 }) } })
  const op = { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, output: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }, timeoutMs: 5000 }
  const app = await buildTestApp(t, {}, { manifest: testManifest({ getItem: op }), kernelUrl: kernel.url })
  const rest = await app.inject({ method: 'GET', url: '/api/v1/items/i1', headers: { ...bearer(), 'x-request-id': 'badout' } })
  t.equal(rest.statusCode, 502)
  t.equal(rest.json().code, 'KERNEL_ERROR')
  const trpc = await app.inject({ method: 'GET', url: `/trpc/getItem?input=${encodeURIComponent('{"id":"i1"}')}`, headers: { ...bearer(), 'x-request-id': 'badout-trpc' } })
  t.equal(trpc.statusCode, 502)
  const batch = await app.inject({ method: 'POST', url: '/api/v1/batch', headers: { ...bearer(), 'x-request-id': 'badout-batch' }, payload: { calls: [{ id: 'a', op: 'getItem', input: { id: 'i1' } }] } })
  t.match(batch.json(), { results: [{ id: 'a', error: { code: 'KERNEL_ERROR' } }] })
  const rows = await entries(app)
  t.match(rows.find(r => r.requestId === 'badout'), { status: 'KERNEL_ERROR', statusCode: 502 }, 'REST entry records what the client got')
  t.match(rows.find(r => r.requestId === 'badout-batch.0'), { status: 'KERNEL_ERROR', statusCode: 502 }, 'batch entry records what the client got')
  t.match(rows.find(r => r.requestId === 'badout-trpc'), { status: 'KERNEL_ERROR', statusCode: 502 }, 'tRPC entry records what the client got')
})
