import t from 'tap'
import { MAX_SAME_KEY, MAX_SPREAD_FRAGMENTS } from '../../../adapters/graphql/limits.js'
import { buildDemoApp, bearer, until } from '../../helper.js'
import { openGraphqlWs } from '../websocket-helper.js'

// What a document may make graphql-js' validation spend, before any token is looked at: its
// OverlappingFieldsCanBeMerged compares every two fields of one response key in a selection set
// (fragments merged in), and 660 of them (`x: id x: name ...`, 4.6 KB, within the bound on
// tokens) held the event loop for about 200 ms, a new text each time past mercurius' cache, and
// every time over WebSocket, where no document is cached. The face's limits are now checked
// before graphql-js' rules, and a response key selected more than MAX_SAME_KEY times (but as the
// same field without arguments or selections) is refused 413 before them.

const ONLY_GRAPHQL = { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false }
const times = (n: number, f: (i: number) => string): string => Array.from({ length: n }, (_, i) => f(i)).join(' ')

t.test('a response key selected more than MAX_SAME_KEY times is refused 413 before graphql-js validates the document', async t => {
  t.equal(MAX_SAME_KEY, 20)
  const app = await buildDemoApp(t, ONLY_GRAPHQL)
  const post = async (query: string, headers: Record<string, string> = {}) => await app.inject({ method: 'POST', url: '/graphql', headers, payload: { query } })
  const refused = (key: string, count: number) => ({
    errors: [{ message: `The operation selects "${key}" ${count} times in one selection set; at most 20 are allowed, unless each is the same field without arguments or selections`, extensions: { code: 'PAYLOAD_TOO_LARGE', status: 413 } }]
  })

  // Without a token: 21 fields of `x`, each two of which graphql-js would find in conflict.
  const over = await post(`{ listAgents { ${times(21, i => i % 2 === 0 ? 'x: id' : 'x: name')} } }`)
  t.equal(over.statusCode, 413)
  t.match(over.json(), refused('x', 21))
  t.equal(over.json().errors.length, 1, 'graphql-js\' rules did not run: none of its 110 conflicts is reported')
  // Unknown fields too: graphql-js would report each, and each two in conflict.
  const unknown = await post(`{ listAgents { ${times(660, i => `x: f${i}`)} } }`)
  t.equal(unknown.statusCode, 413)
  t.match(unknown.json(), refused('x', 660))
  t.equal(unknown.json().errors.length, 1)

  // Counted as the executor merges them: inline fragments, fragments (each once where spread)
  // and the sub-selections of the fields of one key together.
  const merged = await post(`{ listAgents { ...A ...A ... on Agent { x: id } } } fragment A on Agent { ${times(10, () => 'x: name')} ...B } fragment B on Agent { ${times(10, () => 'x: model')} }`)
  t.equal(merged.statusCode, 413)
  t.match(merged.json(), refused('x', 21))
  const nested = await post(`query Q { listAgents { ${times(11, () => 'x: id')} } listAgents { ${times(10, () => 'x: name')} } }`)
  t.equal(nested.statusCode, 413)
  t.match(nested.json(), { errors: [{ message: /^Operation Q selects "x" 21 times in one selection set/, extensions: { code: 'PAYLOAD_TOO_LARGE' } }] })
  t.equal(nested.json().errors.length, 1)

  // At the bound, graphql-js' own refusal.
  const at = await post(`{ listAgents { ${times(20, i => i % 2 === 0 ? 'x: id' : 'x: name')} } }`)
  t.equal(at.statusCode, 400)
  t.match(at.json(), { errors: [{ message: /^Fields "x" conflict because "id" and "name" are different fields/, extensions: { code: 'VALIDATION_FAILED' } }] })

  // One field without arguments or selections may be repeated (clients add `__typename` and `id`
  // to every fragment): those cost graphql-js nothing.
  const same = await post(`{ listAgents(limit: 1) { ${times(30, () => 'id')} ${times(30, () => 'key: id')} ...T ...U } } fragment T on Agent { __typename id } fragment U on Agent { __typename id @include(if: true) }`, bearer())
  t.equal(same.statusCode, 200)
  t.match(same.json(), { data: { listAgents: [{ id: String, key: String, __typename: 'Agent' }] } })
  t.notOk('errors' in same.json())
})

t.test('a selection set that spreads more than MAX_SPREAD_FRAGMENTS fragments is refused 413 before graphql-js validates the document', async t => {
  // graphql-js compares a selection set's fields with every fragment it reaches, and fragments two
  // by two: a chain of 220 fragments, all of whose fields are `id`, cost it 50 ms.
  t.equal(MAX_SPREAD_FRAGMENTS, 50)
  const app = await buildDemoApp(t, ONLY_GRAPHQL)
  const post = async (query: string, headers: Record<string, string> = {}) => await app.inject({ method: 'POST', url: '/graphql', headers, payload: { query } })
  const chain = (n: number): string => '{ listAgents(limit: 1) { ...F0 } } ' + times(n, i => `fragment F${i} on Agent { id ${i + 1 < n ? `...F${i + 1}` : ''} }`)
  const over = await post(chain(220))
  t.equal(over.statusCode, 413)
  t.match(over.json(), { errors: [{ message: 'The operation spreads 220 fragments in one selection set, those they spread included; at most 50 are allowed', extensions: { code: 'PAYLOAD_TOO_LARGE', status: 413 } }] })
  t.equal(over.json().errors.length, 1)
  const wide = await post(`{ listAgents { id ${times(51, i => `...F${i}`)} } } ` + times(51, i => `fragment F${i} on Agent { id }`))
  t.equal(wide.statusCode, 413)
  t.match(wide.json(), { errors: [{ message: /^The operation spreads 51 fragments in one selection set/ }] })
  // Each once: spread again, or in another selection set, a fragment is not counted again.
  const at = await post('{ listAgents(limit: 1) { ...F0 ...F0 ...F49 } getAgent(id: "a1") { ...F0 } } ' + times(50, i => `fragment F${i} on Agent { id ${i + 1 < 50 ? `...F${i + 1}` : ''} }`), bearer())
  t.equal(at.statusCode, 200)
  t.match(at.json(), { data: { listAgents: [{ id: String }], getAgent: { id: 'a1' } } })
  t.notOk('errors' in at.json())
})

t.test('fragments graphql-js would refuse are refused before its other rules run on them', async t => {
  const app = await buildDemoApp(t, ONLY_GRAPHQL)
  const post = async (query: string) => await app.inject({ method: 'POST', url: '/graphql', payload: { query } })
  // An unused fragment is validated all the same: 660 conflicting fields in one.
  const unused = await post(`{ __typename } fragment X on Agent { ${times(660, i => i % 2 === 0 ? 'x: id' : 'x: name')} }`)
  t.equal(unused.statusCode, 400)
  t.match(unused.json(), { errors: [{ message: 'Fragment "X" is never used.', extensions: { code: 'VALIDATION_FAILED', status: 400 } }] })
  t.equal(unused.json().errors.length, 1, 'the conflicts in it were not looked for')
  // A cycle through a field: the walk of response keys stops at the deepest level allowed.
  const cycle = await post('{ listAgents { ...C } } fragment C on Agent { id x: id { ...C } }')
  t.equal(cycle.statusCode, 400)
  t.match(cycle.json(), { errors: [{ message: 'Cannot spread fragment "C" within itself.', extensions: { code: 'VALIDATION_FAILED' } }] })
  // The other limits too: too many root fields, before graphql-js compares them two by two.
  const roots = await post(`{ ${times(300, () => 'a: listAgents { id }')} }`)
  t.equal(roots.statusCode, 413)
  t.match(roots.json(), { errors: [{ message: 'The operation selects 300 root fields; at most 50 are allowed (each one is a call)', extensions: { code: 'PAYLOAD_TOO_LARGE' } }, { message: /^The operation selects "a" 300 times/ }] })
  t.equal(roots.json().errors.length, 2)
  // The walk of response keys has its own bound, over all the operations: 8 operations of 1,534
  // fields each (a tree of fragments, each spread twice), each also over the bound on fields.
  const tree = 'fragment T0 on Agent { id } ' + times(9, i => `fragment T${i + 1} on Agent { a { ...T${i} } b { ...T${i} } }`)
  const walk = await post(`${times(8, i => `query Q${i} { listAgents { ...T9 } }`)} ${tree}`)
  t.equal(walk.statusCode, 413)
  t.match(walk.json().errors.at(-1), { message: 'The document\'s operations select more than 10000 fields and fragments, a fragment counted in each selection set that spreads it', extensions: { code: 'PAYLOAD_TOO_LARGE', status: 413 } })
})

t.test('over WebSocket, a subscribe is checked against the same limits first', async t => {
  const app = await buildDemoApp(t, ONLY_GRAPHQL)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const c = await openGraphqlWs(t, `ws://127.0.0.1:${port}/graphql`)
  c.send({ id: '1', type: 'subscribe', payload: { query: `subscription { runUpdated { ${times(21, i => i % 2 === 0 ? 'x: id' : 'x: status')} } }` } })
  await until(() => c.frames.some(f => f.id === '1'), 'the error')
  t.match(c.frames.find(f => f.id === '1'), { type: 'error', payload: [{ message: 'The operation selects "x" 21 times in one selection set; at most 20 are allowed, unless each is the same field without arguments or selections', extensions: { code: 'PAYLOAD_TOO_LARGE', status: 413 } }] })
  t.equal(c.closed(), null, 'the connection stays open')
})
