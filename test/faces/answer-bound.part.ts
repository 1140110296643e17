import t, { type Test } from 'tap'
import { MAX_ANSWER_CHARS } from '../../adapters/face.js'
import { jsonLength } from '../../adapters/graphql/limits.js'
import { buildTestApp, startTestKernel, testManifest, bearer, json } from '../helper.js'
import { entries } from '../plugins/audit/entries.js'

// Identical queries of one request share one Kernel call: 30 tRPC batch calls or GraphQL fields
// of one 3 MB query made a 94 MB answer, from a request of under 1 KB (as the REST batch's did).
const blob = 'x'.repeat(3 * 1024 * 1024)
const FIT = Math.floor(MAX_ANSWER_CHARS / blob.length)

async function bigApp (t: Test) {
  const kernel = await startTestKernel(t, {
    'GET /v1/big': (_req, res) => json(res, 200, { blob }),
    'POST /v1/big': (_req, res) => json(res, 200, { blob })
  })
  const output = { type: 'object', properties: { blob: { type: 'string' } } }
  const manifest = testManifest({
    getBig: { type: 'query', rest: 'GET /big', kernel: 'GET /v1/big', output },
    makeBig: { type: 'mutation', rest: 'POST /big', kernel: 'POST /v1/big', output }
  })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  return { app, kernel }
}

t.test('a tRPC batch answers at most MAX_ANSWER_CHARS of query results, the rest PAYLOAD_TOO_LARGE', async t => {
  const { app, kernel } = await bigApp(t)
  const n = FIT + 4
  const input = JSON.stringify(Object.fromEntries(Array.from({ length: n }, (_, i) => [i, {}])))
  const res = await app.inject({ method: 'GET', url: `/trpc/${Array(n).fill('getBig').join(',')}?batch=1&input=${encodeURIComponent(input)}`, headers: bearer() })
  t.ok(res.body.length <= MAX_ANSWER_CHARS + 100_000, `${res.body.length} characters`)
  const results = res.json() as Array<{ result?: { data: { blob: string } }, error?: { data: { code: string, httpStatus: number } } }>
  t.equal(results.length, n, 'every call answered')
  t.equal(results.filter(r => r.result?.data.blob === blob).length, FIT, 'the query results that fit')
  t.equal(results.filter(r => r.error?.data.code === 'PAYLOAD_TOO_LARGE' && r.error.data.httpStatus === 413).length, n - FIT, 'the rest left out')
  t.equal(kernel.requests.length, 1, 'one Kernel call for the identical queries')
  // Each call's audit entry records what its client got (counted as calls complete: any order).
  const id = res.headers['x-request-id'] as string
  const recorded = await answeredAs(app, 'trpc')
  t.same(results.map((_, n) => recorded.get(`${id}.${n}`)), results.map(r => r.error === undefined ? ['ok', 200, undefined] : [r.error.data.code, r.error.data.httpStatus, true]), 'each entry as its call was answered')
  // And its metrics: the calls left out were counted 2xx.
  t.same(await countedAs(app, 'trpc', 'getBig'), { '2xx': FIT, '4xx': n - FIT }, 'each call counted once, as it was answered')
})

/** mantle_request_duration_seconds_count of `protocol`'s calls of `op`, by status class. */
async function countedAs (app: Awaited<ReturnType<typeof bigApp>>['app'], protocol: string, op: string): Promise<Record<string, number>> {
  const body = (await app.inject({ method: 'GET', url: '/metrics' })).body
  const counted: Record<string, number> = {}
  for (const [, statusClass, count] of body.matchAll(new RegExp(`^mantle_request_duration_seconds_count\\{protocol="${protocol}",op="${op}",status_class="(\\w+)"\\} (\\d+)$`, 'gm'))) counted[statusClass] = Number(count)
  return counted
}

/** The audit entries of `protocol`'s calls, by request id: [status, statusCode, metadata.leftOut]. */
async function answeredAs (app: Awaited<ReturnType<typeof bigApp>>['app'], protocol: string): Promise<Map<string, unknown[]>> {
  return new Map((await entries(app)).filter(e => e.protocol === protocol).map(e => [e.requestId, [e.status, e.statusCode, e.metadata.leftOut]]))
}

t.test('a GraphQL answer holds at most MAX_ANSWER_CHARS, as serialized: root fields past it are null, PAYLOAD_TOO_LARGE', async t => {
  const { app, kernel } = await bigApp(t)
  const n = FIT + 4
  const query = await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query: `{ ${Array.from({ length: n }, (_, i) => `a${i}: getBig { blob }`).join(' ')} }` } })
  t.ok(query.body.length <= MAX_ANSWER_CHARS + 100_000, `${query.body.length} characters`)
  const { data, errors } = query.json() as { data: Record<string, { blob: string } | null>, errors: Array<{ path: string[], message: string, extensions: { code: string, status: number } }> }
  t.equal(Object.values(data).filter(v => v?.blob === blob).length, FIT, 'the query results that fit')
  t.same(errors.map(e => [e.path[0], e.extensions.code, e.extensions.status]), Array.from({ length: n - FIT }, (_, i) => [`a${FIT + i}`, 'PAYLOAD_TOO_LARGE', 413]), 'the rest left out, each named')
  t.equal(kernel.requests.length, 1, 'one Kernel call for the identical queries')

  // One root field, one call, its large value selected under 30 aliases: counted once per call,
  // it made a 94 MB answer.
  const aliases = await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query: `{ one: getBig { ${Array.from({ length: 30 }, (_, i) => `b${i}: blob`).join(' ')} } }` } })
  t.ok(aliases.body.length < 10_000, `${aliases.body.length} characters`)
  t.match(aliases.json(), { data: { one: null }, errors: [{ path: ['one'], message: /ask for it again/, extensions: { code: 'PAYLOAD_TOO_LARGE', status: 413 } }] })

  const mutation = await app.inject({ method: 'POST', url: '/graphql', headers: bearer({ roles: ['viewer', 'operator', 'admin'] }), payload: { query: `mutation { ${Array.from({ length: FIT + 1 }, (_, i) => `m${i}: makeBig { blob }`).join(' ')} }` } })
  const made = mutation.json() as { data: Record<string, { blob: string } | null>, errors: Array<{ path: string[], message: string, extensions: { code: string } }> }
  t.equal(kernel.requests.filter(r => r.method === 'POST').length, FIT + 1, 'every mutation carried out')
  t.equal(Object.values(made.data).filter(v => v?.blob === blob).length, FIT, 'the results that fit')
  t.match(made.errors, [{ path: [`m${FIT}`], message: /mutation was carried out/, extensions: { code: 'PAYLOAD_TOO_LARGE' } }], 'the one past it says the mutation ran')

  // Each root field's audit entry records what its client got; one left out, that its call ran
  // (leftOut), a mutation's too: the entries said ok/200 for them all.
  const recorded = await answeredAs(app, 'graphql')
  // Each answer is parsed once (tens of MB): parsed again per field, they were 5 s of this file's CPU.
  const dataOf = (res: typeof query): Record<string, unknown> => (res.json() as { data: Record<string, unknown> }).data
  const asSent = (res: typeof query, keys: string[]): unknown[] => {
    const data = dataOf(res)
    return keys.map(key => data[key] === null ? ['PAYLOAD_TOO_LARGE', 413, true] : ['ok', 200, undefined])
  }
  const calls = (res: typeof query, keys: string[]): unknown[] => keys.map((_, n) => recorded.get(`${res.headers['x-request-id'] as string}.${n}`))
  const fields = Array.from({ length: n }, (_, i) => `a${i}`)
  t.same(calls(query, fields), asSent(query, fields), 'the query fields')
  t.same(calls(aliases, ['one']), [['PAYLOAD_TOO_LARGE', 413, true]], 'the field selected under 30 aliases')
  const mutated = Array.from({ length: FIT + 1 }, (_, i) => `m${i}`)
  t.same(calls(mutation, mutated), asSent(mutation, mutated), 'the mutation fields')
  // Each left-out field's error names its own call, as the audit entry and every field error do.
  const ids = (res: typeof query): unknown[] => (res.json() as { errors: Array<{ path: string[], extensions: { requestId: string } }> }).errors.map(e => [e.path[0], e.extensions.requestId])
  const own = (res: typeof query, keys: string[]): unknown[] => {
    const data = dataOf(res)
    return keys.flatMap((key, n) => data[key] === null ? [[key, `${res.headers['x-request-id'] as string}.${n}`]] : [])
  }
  t.same(ids(query), own(query, fields), 'the query fields\' errors name their calls')
  t.same(ids(aliases), own(aliases, ['one']), 'the field selected under 30 aliases names its call')
  t.same(ids(mutation), own(mutation, mutated), 'the mutation field\'s error names its call')
  // And the metrics count each as the entries record it (the fields left out were 2xx).
  t.same(await countedAs(app, 'graphql', 'getBig'), { '2xx': FIT, '4xx': n - FIT + 1 }, 'the query fields, counted')
  t.same(await countedAs(app, 'graphql', 'makeBig'), { '2xx': FIT, '4xx': 1 }, 'the mutation fields, counted')
})

t.test('the GraphQL bound counts characters as JSON writes them, escapes included', async t => {
  // Counted by their length, 30 aliases of a 1 M-character string of control characters (6 MB
  // as JSON) passed as 31 M characters and made a 188 MB answer.
  const escaped = '\u0001'.repeat(1024 * 1024)
  const kernel = await startTestKernel(t, { 'GET /v1/esc': (_req, res) => json(res, 200, { s: escaped }) })
  const manifest = testManifest({ getEsc: { type: 'query', rest: 'GET /esc', kernel: 'GET /v1/esc', output: { type: 'object', properties: { s: { type: 'string' } } } } })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const res = await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query: `{ one: getEsc { ${Array.from({ length: 30 }, (_, i) => `b${i}: s`).join(' ')} } }` } })
  t.ok(res.body.length < 10_000, `${res.body.length} characters`)
  t.match(res.json(), { data: { one: null }, errors: [{ path: ['one'], extensions: { code: 'PAYLOAD_TOO_LARGE' } }] })

  for (const value of [null, 0, -2.5e-7, true, 'plain', 'q"b\\s\n\t\u0001\u001f', '\ud83d\ude00 and a lone \ud800', [], {}, [null, [1, 'a'], { k: [{}] }], { 'k"ey': { n: null, l: [true, false] } }]) {
    t.equal(jsonLength(value, Infinity), JSON.stringify(value).length, JSON.stringify(value))
  }
})

t.test('the GraphQL bound measures at most twice its size per document: fields past that are left out unmeasured', async t => {
  // Each field left out was walked up to the room left: 50 of them, over a large JSON value,
  // held the event loop for 23 s for one small request.
  const kernel = await startTestKernel(t, {
    'GET /v1/big': (_req, res) => json(res, 200, { blob }),
    'GET /v1/small': (_req, res) => json(res, 200, { blob: 'small' })
  })
  const output = { type: 'object', properties: { blob: { type: 'string' } } }
  const manifest = testManifest({
    getBig: { type: 'query', rest: 'GET /big', kernel: 'GET /v1/big', output },
    getSmall: { type: 'query', rest: 'GET /small', kernel: 'GET /v1/small', output }
  })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const big = Array.from({ length: FIT + 1 }, (_, i) => `b${i}: blob`).join(' ')
  const res = await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query: `{ small: getSmall { blob } a: getBig { ${big} } b: getBig { ${big} } c: getBig { ${big} } last: getSmall { blob } }` } })
  const { data, errors } = res.json() as { data: Record<string, unknown>, errors: Array<{ path: string[], extensions: { code: string } }> }
  t.same(data, { small: { blob: 'small' }, a: null, b: null, c: null, last: null })
  t.same(errors.map(e => [e.path[0], e.extensions.code]), [['a', 'PAYLOAD_TOO_LARGE'], ['b', 'PAYLOAD_TOO_LARGE'], ['c', 'PAYLOAD_TOO_LARGE'], ['last', 'PAYLOAD_TOO_LARGE']])
})
