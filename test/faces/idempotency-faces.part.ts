import t from 'tap'
import { randomUUID } from 'node:crypto'
import { idemSetup } from '../plugins/idempotency/idempotency-helper.js'
import { connect } from '../adapters/websocket-helper.js'
import { callKey } from '../../adapters/rest/index.js'

// One key, one call, whichever face carries it: on the shared Redis store.

t.test('tRPC: the header keys a single call (with Idempotent-Replayed) and each call of a batch', async t => {
  const s = await idemSetup(t, 'redis')
  const key = randomUUID()
  const call = async (k: string) => await s.app.inject({ method: 'POST', url: '/trpc/createItem', headers: { ...s.headers(k), 'content-type': 'application/json' }, payload: { name: 't' } })
  const first = await call(key)
  t.equal(first.statusCode, 200)
  t.same(first.json(), { result: { data: { id: 'item-1', name: 't', n: 1 } } })
  const again = await call(key)
  t.equal(again.body, first.body)
  t.equal(again.headers['idempotent-replayed'], 'true')
  const reused = await s.app.inject({ method: 'POST', url: '/trpc/createItem', headers: { ...s.headers(key), 'content-type': 'application/json' }, payload: { name: 'other' } })
  t.equal(reused.statusCode, 422)
  t.match(reused.json(), { error: { data: { code: 'IDEMPOTENCY_KEY_REUSED', httpStatus: 422 } } })
  t.equal(s.calls(), 1)

  const batchKey = randomUUID()
  const batch = async () => await s.app.inject({ method: 'POST', url: '/trpc/createItem,createItem?batch=1', headers: { ...s.headers(batchKey), 'content-type': 'application/json' }, payload: { 0: { name: 'b0' }, 1: { name: 'b1' } } })
  const b1 = await batch()
  t.equal(b1.statusCode, 200)
  t.equal(s.calls(), 3, 'two calls of a batch are two keys')
  const b2 = await batch()
  t.equal(b2.body, b1.body, 'the batch replays call by call')
  t.equal(s.calls(), 3)
  t.same(s.kernel.requests.slice(1).map(r => r.headers['idempotency-key']).sort(), [`${batchKey} 0`, `${batchKey} 1`])
})

t.test('GraphQL: the header keys each mutation field of a document', async t => {
  const s = await idemSetup(t, 'redis')
  const key = randomUUID()
  const gql = async (query: string) => await s.app.inject({ method: 'POST', url: '/graphql', headers: s.headers(key), payload: { query } })
  const doc = 'mutation { one: createItem(name: "g1") { id n } two: createItem(name: "g2") { id n } }'
  const first = await gql(doc)
  t.equal(first.statusCode, 200)
  t.same(first.json(), { data: { one: { id: 'item-1', n: 1 }, two: { id: 'item-2', n: 2 } } })
  const again = await gql(doc)
  t.equal(again.body, first.body, 'the same document replays')
  t.equal(s.calls(), 2)
  t.same(s.kernel.requests.map(r => r.headers['idempotency-key']), [`${key} one`, `${key} two`])
  const reused = await gql('mutation { one: createItem(name: "changed") { id } two: createItem(name: "g2") { id n } }')
  t.match(reused.json(), { data: { one: null, two: { id: 'item-2', n: 2 } }, errors: [{ path: ['one'], extensions: { code: 'IDEMPOTENCY_KEY_REUSED', status: 422 } }] })
})

// A request of one call keeps the key as sent on every face: a GraphQL document of one field
// was keyed `<key>.<field>` and a tRPC batch of one call (httpBatchLink sends a lone mutation
// so) `<key>.0`, and a repeat over REST, or a retry sent another way, ran the Kernel call again.
t.test('a request of one call keeps its key as sent: GraphQL, a tRPC batch of one and REST make one call', async t => {
  const s = await idemSetup(t, 'redis')
  const key = randomUUID()
  const gql = await s.app.inject({ method: 'POST', url: '/graphql', headers: s.headers(key), payload: { query: 'mutation { made: createItem(name: "one") { id n } }' } })
  t.same(gql.json(), { data: { made: { id: 'item-1', n: 1 } } })
  const rest = await s.create({ name: 'one' }, key)
  t.same([rest.statusCode, rest.headers['idempotent-replayed'], rest.json().id], [201, 'true', 'item-1'])
  const batchOfOne = await s.app.inject({ method: 'POST', url: '/trpc/createItem?batch=1', headers: { ...s.headers(key), 'content-type': 'application/json' }, payload: { 0: { name: 'one' } } })
  t.match(batchOfOne.json(), [{ result: { data: { id: 'item-1', n: 1 } } }])
  // Its one call has the response's headers to itself, as REST's: before, no header said so.
  t.equal(batchOfOne.headers['idempotent-replayed'], 'true', 'a tRPC batch of one says it is a replay')
  t.equal(s.calls(), 1, 'one Kernel call')
  t.same(s.kernel.requests.map(r => r.headers['idempotency-key']), [key], 'under the key as sent')
})

// One call is judged by the root fields that run, not by how the document writes them: a single
// createItem inside a fragment, beside a skipped field or __typename, or written twice and merged,
// was keyed `<key> createItem`, and the Kernel ran again what REST had carried out under the key.
t.test('a document that runs one mutation field, however written, keeps its key as sent', async t => {
  const s = await idemSetup(t, 'redis')
  const documents: Array<[string, string, Record<string, unknown>?]> = [
    ['a fragment spread', 'mutation { ...F } fragment F on Mutation { createItem(name: "d") { id n } }'],
    ['an inline fragment', 'mutation { ... on Mutation { createItem(name: "d") { id n } } }'],
    ['an inline fragment without a type', 'mutation { ... { createItem(name: "d") { id n } } }'],
    ['a sibling skipped', 'mutation { createItem(name: "d") { id n } other: createItem(name: "e") @skip(if: true) { id } }'],
    ['a sibling not included (a variable)', 'mutation ($on: Boolean!) { createItem(name: "d") { id n } other: renameItem(id: "x", name: "e") @include(if: $on) { id } }', { on: false }],
    ['the field twice, merged', 'mutation { createItem(name: "d") { id } createItem(name: "d") { n } }'],
    ['__typename beside it', 'mutation { __typename createItem(name: "d") { id n } }']
  ]
  for (const [what, query, variables] of documents) {
    const key = randomUUID()
    const rest = await s.create({ name: 'd' }, key)
    t.equal(rest.statusCode, 201, what)
    const before = s.calls()
    // Twice: mercurius runs a document's first request as graphql-js does, the next JIT-compiled.
    for (const run of ['first', 'again']) {
      const gql = await s.app.inject({ method: 'POST', url: '/graphql', headers: s.headers(key), payload: { query, variables } })
      t.match(gql.json(), { data: { createItem: { id: rest.json().id, n: rest.json().n } } }, `${what} (${run}): REST's outcome`)
      t.notOk('errors' in gql.json(), what)
    }
    t.equal(s.calls(), before, `${what}: no Kernel call`)
  }
  // Two fields that run are two calls, each under its own key, fragments or not.
  const key = randomUUID()
  const two = await s.app.inject({ method: 'POST', url: '/graphql', headers: s.headers(key), payload: { query: 'mutation { ...F __typename } fragment F on Mutation { createItem(name: "f") { id } renameItem(id: "x", name: "r") { id } }' } })
  t.match(two.json(), { data: { createItem: { id: /^item-/ }, renameItem: { id: 'x' } } })
  t.same(s.kernel.requests.slice(-2).map(r => r.headers['idempotency-key']), [`${key} createItem`, `${key} renameItem`])
})

t.test('WebSocket: a call frame\'s idempotencyKey, and one key across faces', async t => {
  const s = await idemSetup(t, 'redis')
  await s.app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = s.app.server.address() as { port: number }
  const client = await connect(t, `ws://127.0.0.1:${port}/ws`, { tenant: s.tenant })
  const key = randomUUID()
  const first = await client.request({ id: '1', op: 'createItem', input: { name: 'w' }, idempotencyKey: key })
  t.same(first, { id: '1', result: { id: 'item-1', name: 'w', n: 1 } })
  const again = await client.request({ id: '2', op: 'createItem', input: { name: 'w' }, idempotencyKey: key })
  t.same(again, { id: '2', result: first.result, replayed: true }, 'a replay says so in the result frame')
  const reused = await client.request({ id: '3', op: 'createItem', input: { name: 'x' }, idempotencyKey: key })
  t.match(reused, { id: '3', error: { code: 'IDEMPOTENCY_KEY_REUSED', status: 422 } })
  t.equal(s.calls(), 1)

  // The same tenant, op, key and input through REST: the call the WebSocket made.
  const rest = await s.create({ name: 'w' }, key)
  t.equal(rest.statusCode, 201)
  t.same(rest.json(), first.result)
  t.equal(rest.headers['idempotent-replayed'], 'true')
  t.equal(s.calls(), 1)
})

t.test('REST batch: each call\'s key is the header\'s, a space and its id', async t => {
  const s = await idemSetup(t, 'redis')
  const key = randomUUID()
  const batch = async () => await s.app.inject({ method: 'POST', url: '/api/v1/batch', headers: s.headers(key), payload: { calls: [{ id: 'a', op: 'createItem', input: { name: 'ba' } }, { id: 'b', op: 'createItem', input: { name: 'bb' } }] } })
  const first = await batch()
  t.equal(first.statusCode, 200)
  const again = await batch()
  // The same results, each marked as a replay (as Idempotent-Replayed says it on REST).
  t.same(again.json().results, first.json().results.map((r: Record<string, unknown>) => ({ ...r, replayed: true })))
  t.notOk(first.json().results.some((r: Record<string, unknown>) => 'replayed' in r), 'first answers are not replays')
  t.equal(s.calls(), 2)
  t.same(s.kernel.requests.map(r => r.headers['idempotency-key']).sort(), [`${key} a`, `${key} b`])
})

t.test('REST batch: a call id that cannot travel in a key is that call\'s refusal, never a Kernel call', async t => {
  // A call id is any text; `<key> <id>` goes to the Kernel as a header. Before, an id with a
  // newline or a non-ASCII character made undici refuse the header: 503 KERNEL_UNAVAILABLE,
  // counted towards the breaker (six such calls opened it for every tenant), and each refusal
  // kept one of undici's pool slots.
  const s = await idemSetup(t, 'memory')
  const key = randomUUID()
  const ids = ['日本', 'a\nb', '✓', 'x\u0000y', 'tab\rcr', '😀', 'sp ace']
  const calls = [...ids, 'ok'].map(id => ({ id, op: 'createItem', input: { name: 'a' } }))
  const res = await s.app.inject({ method: 'POST', url: '/api/v1/batch', headers: s.headers(key), payload: { calls } })
  t.equal(res.statusCode, 200)
  const results = res.json().results as Array<{ id: string, error?: { status: number, code: string, detail: string } }>
  t.same(results.slice(0, ids.length).map(r => [r.id, r.error?.status, r.error?.code]), ids.map(id => [id, 400, 'VALIDATION_FAILED']))
  t.match(results[0].error!.detail, /batch call's id/)
  t.notOk(results[ids.length].error, 'a call with a plain id runs')
  t.same(s.kernel.requests.map(r => r.headers['idempotency-key']), [`${key} ok`], 'only that one reached the Kernel')
  t.equal(s.app.kernel.breakerState(), 'closed')
  // Without a key the same ids run: they key nothing.
  const plain = await s.app.inject({ method: 'POST', url: '/api/v1/batch', headers: s.headers(undefined), payload: { calls: ids.map(id => ({ id, op: 'createItem', input: { name: 'b' } })) } })
  t.same((plain.json().results as Array<{ error?: unknown }>).filter(r => r.error !== undefined), [])
})

t.test('a replayed refusal is marked as a replayed answer is, and never marks a response of several calls', async t => {
  // renameItem of an id the Kernel does not know: 404, a definitive refusal, stored and replayed.
  const s = await idemSetup(t, 'memory')
  const nope = { id: 'nope', name: 'n' }
  const key = randomUUID()
  const batch = async () => await s.app.inject({ method: 'POST', url: '/api/v1/batch', headers: s.headers(key), payload: { calls: [{ id: 'r', op: 'renameItem', input: nope }] } })
  t.match((await batch()).json().results, [{ id: 'r', error: { code: 'NOT_FOUND' } }])
  t.notOk('replayed' in (await s.app.inject({ method: 'POST', url: '/api/v1/batch', headers: s.headers(randomUUID()), payload: { calls: [{ id: 'r', op: 'renameItem', input: nope }] } })).json().results[0], 'a first refusal is not a replay')
  t.match((await batch()).json().results, [{ id: 'r', error: { code: 'NOT_FOUND' }, replayed: true }], 'REST batch: the replayed refusal says so')

  await s.app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = s.app.server.address() as { port: number }
  const client = await connect(t, `ws://127.0.0.1:${port}/ws`, { tenant: s.tenant })
  const wsKey = randomUUID()
  t.notOk('replayed' in await client.request({ id: '1', op: 'renameItem', input: nope, idempotencyKey: wsKey }))
  t.match(await client.request({ id: '2', op: 'renameItem', input: nope, idempotencyKey: wsKey }), { id: '2', error: { code: 'NOT_FOUND' }, replayed: true }, 'WebSocket: the same')

  const trpcKey = randomUUID()
  const trpc = async (path: string, payload: unknown) => await s.app.inject({ method: 'POST', url: `/trpc/${path}`, headers: { ...s.headers(trpcKey), 'content-type': 'application/json' }, payload: payload as Record<string, unknown> })
  await trpc('renameItem,createItem?batch=1', { 0: nope, 1: { name: 'first' } })
  const before = s.calls()
  // Call 0 replays its refusal, call 1 its answer; call 2 is new and runs.
  const mixed = await trpc('renameItem,createItem,createItem?batch=1', { 0: nope, 1: { name: 'first' }, 2: { name: 'fresh' } })
  t.equal(s.calls(), before + 1, 'the new call ran')
  t.match(mixed.json(), [{ error: { data: { code: 'NOT_FOUND' } } }, { result: {} }, { result: { data: { name: 'fresh' } } }])
  t.notOk(mixed.headers['idempotent-replayed'], 'tRPC batch: no Idempotent-Replayed for the whole response (before, a replayed refusal marked the call that ran)')
  const single = async () => await s.app.inject({ method: 'POST', url: '/trpc/renameItem', headers: { ...s.headers(key + '.single'), 'content-type': 'application/json' }, payload: nope })
  t.notOk((await single()).headers['idempotent-replayed'])
  t.equal((await single()).headers['idempotent-replayed'], 'true', 'a single tRPC call\'s replayed refusal still says so')
  const ofOne = async () => await s.app.inject({ method: 'POST', url: '/trpc/renameItem?batch=1', headers: { ...s.headers(key + '.one'), 'content-type': 'application/json' }, payload: { 0: nope } })
  const firstOfOne = await ofOne()
  t.match(firstOfOne.json(), [{ error: { data: { code: 'NOT_FOUND' } } }])
  t.notOk(firstOfOne.headers['idempotent-replayed'], 'a tRPC batch of one: a first refusal is not a replay')
  t.equal((await ofOne()).headers['idempotent-replayed'], 'true', 'a tRPC batch of one: its replayed refusal says so, as a single call\'s')
  const gql = async () => await s.app.inject({ method: 'POST', url: '/graphql', headers: s.headers(key + '.gql'), payload: { query: 'mutation { renameItem(id: "nope", name: "n") { id } }' } })
  await gql()
  const replayed = await gql()
  t.match(replayed.json(), { errors: [{ extensions: { code: 'NOT_FOUND' } }] })
  t.equal(replayed.headers['idempotent-replayed'], 'true', 'a GraphQL document of one call: its replayed refusal says so, as a tRPC request of one call\'s (e2d176f)')
  const several = async () => await s.app.inject({ method: 'POST', url: '/graphql', headers: s.headers(key + '.gql2'), payload: { query: 'mutation { a: renameItem(id: "nope", name: "n") { id } b: renameItem(id: "nope", name: "m") { id } }' } })
  await several()
  t.notOk((await several()).headers['idempotent-replayed'], 'a GraphQL document of several calls is not marked')
})

t.test('REST batch: call ids are unique, and a key made of one never spells another', async t => {
  const s = await idemSetup(t, 'memory')
  const batch = async (key: string, calls: Array<{ id: string, name: string }>) => await s.app.inject({ method: 'POST', url: '/api/v1/batch', headers: s.headers(key), payload: { calls: calls.map(c => ({ id: c.id, op: 'createItem', input: { name: c.name } })) } })
  const dup = await batch(randomUUID(), [{ id: 'a', name: 'x' }, { id: 'a', name: 'y' }])
  t.same([dup.statusCode, dup.json().code], [400, 'VALIDATION_FAILED'], 'two calls with one id: refused whole (before, the second was a replay or a 422 of the first)')
  t.equal(s.calls(), 0)
  const k = 'k-' + randomUUID()
  const one = await batch(k, [{ id: 'a.b', name: 'first' }])
  const two = await batch(`${k}.a`, [{ id: 'b', name: 'first' }])
  t.notOk('replayed' in two.json().results[0], 'another key: not a replay of the first (before, both were `<k>.a.b`)')
  t.not(two.json().results[0].result.id, one.json().results[0].result.id)
  t.same(s.kernel.requests.map(r => r.headers['idempotency-key']), [`${k} a.b`, `${k}.a b`], 'the request\'s key ends at the space')
  t.same((await batch(k, [{ id: 'a.b', name: 'first' }])).json().results[0].replayed, true, 'and the same call replays')
})

// Before, a call of several under key K was keyed `K.<suffix>`: a single call keyed `K.0` (or
// `K.a`, `K.one`) was that call, so the batch's call replayed the single call's answer, with no
// Kernel call, or was refused 422 for an input it never sent under its own key.
t.test('a single call keyed `K.0` is never call 0 of a batch keyed K, on any face', async t => {
  const s = await idemSetup(t, 'redis')
  const trpc = async (path: string, key: string, payload: Record<string, unknown>) => await s.app.inject({ method: 'POST', url: `/trpc/${path}`, headers: { ...s.headers(key), 'content-type': 'application/json' }, payload })
  const k = randomUUID()
  t.same((await trpc('createItem', `${k}.0`, { name: 'same' })).json(), { result: { data: { id: 'item-1', name: 'same', n: 1 } } })
  const same = await trpc('createItem,createItem?batch=1', k, { 0: { name: 'same' }, 1: { name: 'b1' } })
  t.same(same.json(), [{ result: { data: { id: 'item-2', name: 'same', n: 2 } } }, { result: { data: { id: 'item-3', name: 'b1', n: 3 } } }], 'tRPC batch: call 0 runs, not a replay of `K.0`')
  const k2 = randomUUID()
  await trpc('createItem', `${k2}.0`, { name: 'single' })
  const other = await trpc('createItem,createItem?batch=1', k2, { 0: { name: 'other' }, 1: { name: 'b1' } })
  t.same([other.statusCode, other.json()[0].result?.data.name], [200, 'other'], 'tRPC batch: another input under K is no 422')

  const k3 = randomUUID()
  await s.create({ name: 'r' }, `${k3}.a`)
  const rest = await s.app.inject({ method: 'POST', url: '/api/v1/batch', headers: s.headers(k3), payload: { calls: [{ id: 'a', op: 'createItem', input: { name: 'r' } }] } })
  t.same(rest.json().results, [{ id: 'a', result: { id: 'item-8', name: 'r', n: 8 } }], 'REST batch: call a runs, unmarked')

  const k4 = randomUUID()
  const gql = async (key: string, query: string) => (await s.app.inject({ method: 'POST', url: '/graphql', headers: s.headers(key), payload: { query } })).json()
  t.same(await gql(`${k4}.one`, 'mutation { one: createItem(name: "g") { id } }'), { data: { one: { id: 'item-9' } } })
  t.same(await gql(k4, 'mutation { one: createItem(name: "g") { id } two: createItem(name: "h") { id } }'), { data: { one: { id: 'item-10' }, two: { id: 'item-11' } } }, 'GraphQL: field one runs')
  t.equal(s.calls(), 11, 'every call reached the Kernel')
})

// A GraphQL alias is bounded only by the document (64 KiB): its field's key `<key> <alias>` was
// as long, sent to the Kernel as its Idempotency-Key header (a Kernel answers 431 past ~16 KB,
// and that refusal was stored) and written in the store's keys. A call name over 128 characters
// (a REST batch call id's bound) is now its first 64, a space and the hash of it whole.
t.test('GraphQL: a long alias makes a bounded key, one per alias, that replays', async t => {
  const s = await idemSetup(t, 'redis')
  const key = randomUUID()
  const head = 'a'.repeat(64)
  const one = head + 'x'.repeat(20_000)
  const two = head + 'y'.repeat(20_000)
  const doc = `mutation { ${one}: createItem(name: "l1") { id } ${two}: createItem(name: "l2") { id } }`
  const gql = async () => await s.app.inject({ method: 'POST', url: '/graphql', headers: s.headers(key), payload: { query: doc } })
  const first = await gql()
  t.same(first.json(), { data: { [one]: { id: 'item-1' }, [two]: { id: 'item-2' } } })
  const sent = s.kernel.requests.map(r => String(r.headers['idempotency-key']))
  t.equal(sent.length, 2)
  t.ok(sent.every(k => k.length <= 255 + 1 + 128 + 1 + 43), `bounded keys (${sent.map(k => k.length).join(', ')} characters)`)
  t.ok(sent.every(k => k.startsWith(`${key} ${head} `)), 'the key, a space, the alias\'s first 64 characters, a space and its hash')
  t.not(sent[0], sent[1], 'two aliases with one head: two keys')
  t.equal((await gql()).body, first.body, 'the document replays')
  t.equal(s.calls(), 2)
})

t.test('callKey: call names up to 128 characters are kept as they are, longer ones shortened', async t => {
  const exact = 'n'.repeat(128)
  t.equal(callKey('K', exact), `K ${exact}`)
  const long = 'n'.repeat(129)
  const short = callKey('K', long)!
  t.match(short, new RegExp(`^K ${'n'.repeat(64)} [A-Za-z0-9_-]{43}$`))
  t.equal(callKey('K', long), short, 'the same name, the same key')
  t.not(callKey('K', long + 'm'), short)
  t.equal(callKey('K', 'a b'), null, 'a name with a space is still malformed: no kept name spells a shortened one')
  t.equal(callKey(undefined, long), undefined)
})
