import t from 'tap'
import type { AddressInfo } from 'node:net'
import { buildTestApp, bearer, json, startTestKernel, testManifest } from '../helper.js'
import { connect } from './websocket-helper.js'

// tRPC's `lastEventId` resumes a subscription (its tracked events): over HTTP @trpc/server puts a
// `Last-Event-ID` into a subscription's input alone, but its WebSocket adapter put a message's
// `params.lastEventId` into every call's input, a query's and a mutation's too. The same call
// then differed by face: over /trpc's WebSocket an input schema without
// `additionalProperties: false` sent the Kernel a `lastEventId` its client never put in the
// input (a query string parameter, a body field), and one with it refused the call
// VALIDATION_FAILED (`input.lastEventId is not allowed`), where HTTP, /ws and GraphQL ran it.

const output = { type: 'object', properties: { seen: { type: 'string' } } }

t.test('WebSocket: a query\'s or mutation\'s lastEventId is no part of its input, as over HTTP', async t => {
  const kernel = await startTestKernel(t, {
    'GET /v1/notes': (req, res) => json(res, 200, { seen: req.url }),
    'POST /v1/notes': (req, res) => json(res, 200, { seen: req.body })
  })
  const manifest = testManifest({
    findNotes: { type: 'query', rest: 'GET /notes', kernel: 'GET /v1/notes', input: { type: 'object', properties: { q: { type: 'string' } } }, output },
    strictNotes: { type: 'query', rest: 'GET /strict-notes', kernel: 'GET /v1/notes', input: { type: 'object', additionalProperties: false, properties: { q: { type: 'string' } } }, output },
    addNote: { type: 'mutation', rest: 'POST /notes', kernel: 'POST /v1/notes', input: { type: 'object', properties: { text: { type: 'string' } } }, output }
  }, { url: kernel.url, retries: 0 })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as AddressInfo).port

  // Over HTTP, a Last-Event-ID header is no part of a query's input.
  const http = await fetch(`http://127.0.0.1:${port}/trpc/findNotes?input=${encodeURIComponent('{"q":"x"}')}`, { headers: { ...bearer(), 'last-event-id': '7' } })
  t.same(await http.json(), { result: { data: { seen: '/v1/notes?q=x' } } }, 'HTTP: the Kernel is sent the input alone')

  const client = await connect(t, `ws://127.0.0.1:${port}/trpc`)
  const calls: Array<[string, Record<string, unknown>, unknown]> = [
    ['query', { path: 'findNotes', input: { q: 'x' }, lastEventId: '7' }, { seen: '/v1/notes?q=x' }],
    ['query', { path: 'findNotes', lastEventId: '7' }, { seen: '/v1/notes' }],
    ['query', { path: 'strictNotes', input: { q: 'x' }, lastEventId: '7' }, { seen: '/v1/notes?q=x' }],
    ['mutation', { path: 'addNote', input: { text: 'hi' }, lastEventId: '7' }, { seen: '{"text":"hi"}' }]
  ]
  let id = 0
  for (const [method, params, seen] of calls) {
    const answer = await client.request({ id: ++id, method, params })
    t.same(answer, { id, result: { type: 'data', data: seen } }, `${method} ${String(params.path)}${params.input === undefined ? ' without input' : ''}: the Kernel is sent the input alone`)
  }
})
