import t from 'tap'
import { WebSocket, type RawData } from 'ws'
import { buildDemoApp, bearer, token } from '../../helper.js'

// 5xx answers found by `npm run fuzz` (loadtest/fuzz.ts), each a client's mistake that must be
// a 400 VALIDATION_FAILED:
// - a `query` that is not GraphQL but parses as JSON ("true", "{}", "[1]") was taken by
//   mercurius for a ready-made AST, whose validation then threw: a 500 INTERNAL;
// - a document without a required variable, once mercurius had JIT-compiled it (after its first
//   run): graphql-jit's error has no `extensions`, and the error formatter threw on it;
// - over GET, an `operationName` the document does not define, or several operations without
//   one: mercurius looked the operation up (to refuse mutations over GET) and threw on null;
// - over GET, `variables` (or `extensions`) that is JSON but not an object (`variables="d1"`).

const JSON_QUERIES = ['true', 'false', 'null', '0', '-1', '"x"', '{}', ' { } ', '[]', '[1,{"kind":"Document"}]', '{"kind":"Document","definitions":[{}]}', '\n{"kind":"Document","definitions":"x"}']

t.test('a query that is JSON, not GraphQL, is a 400 VALIDATION_FAILED', async t => {
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  for (const query of JSON_QUERIES) {
    for (const method of ['POST', 'GET'] as const) {
      const res = method === 'POST'
        ? await app.inject({ method, url: '/graphql', headers: { ...bearer(), 'content-type': 'application/json' }, payload: { query } })
        : await app.inject({ method, url: '/graphql?query=' + encodeURIComponent(query), headers: bearer() })
      t.equal(res.statusCode, 400, `${method} ${JSON.stringify(query)}: ${res.body.slice(0, 200)}`)
      t.match(res.json(), { errors: [{ message: 'The `query` must be a GraphQL document', extensions: { code: 'VALIDATION_FAILED', status: 400 } }] })
    }
  }
})

t.test('GraphQL documents that merely look like JSON at first still run or fail as GraphQL', async t => {
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  const ok = await app.inject({ method: 'POST', url: '/graphql', headers: { ...bearer(), 'content-type': 'application/json' }, payload: { query: '{ getAgent(id: "a1") { id } }' } })
  t.equal(ok.statusCode, 200)
  t.same(ok.json(), { data: { getAgent: { id: 'a1' } } })
  // Starts like JSON (a literal), is neither JSON nor GraphQL: GraphQL's own syntax error.
  for (const query of ['true {', 'null { getAgent }', '{ "a" }', '[']) {
    const res = await app.inject({ method: 'POST', url: '/graphql', headers: { ...bearer(), 'content-type': 'application/json' }, payload: { query } })
    t.equal(res.statusCode, 400, JSON.stringify(query))
    t.match(res.json(), { errors: [{ message: /^Syntax Error/, extensions: { code: 'VALIDATION_FAILED' } }] })
  }
})

t.test('a JIT-compiled document run without its required variable is a 400, not a 500', async t => {
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  const query = 'query Q($id: String!) { getAgent(id: $id) { id } }'
  const send = async (variables?: unknown) => await app.inject({ method: 'POST', url: '/graphql', headers: { ...bearer(), 'content-type': 'application/json' }, payload: { query, ...(variables === undefined ? {} : { variables }) } })
  // mercurius compiles a document with graphql-jit once it has run (jit: 1).
  for (let i = 0; i < 3; i++) t.equal((await send({ id: 'a1' })).statusCode, 200)
  for (const variables of [undefined, {}, null, { id: null }]) {
    const res = await send(variables)
    t.equal(res.statusCode, 400, `variables ${JSON.stringify(variables)}: ${res.body.slice(0, 200)}`)
    t.match(res.json(), { errors: [{ message: /\$id/, extensions: { code: 'VALIDATION_FAILED', status: 400, requestId: String } }] })
  }
  t.equal((await send({ id: 'a1' })).statusCode, 200, 'the compiled document still runs')
})

t.test('over GET, an operationName the document does not define is a 400, not a 500', async t => {
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  const get = async (query: string, operationName?: string) => await app.inject({
    method: 'GET',
    url: '/graphql?query=' + encodeURIComponent(query) + (operationName === undefined ? '' : '&operationName=' + encodeURIComponent(operationName)),
    headers: bearer()
  })
  for (const [query, name] of [['{ getAgent(id: "a1") { id } }', 'prototype'], ['query A { getAgent(id: "a1") { id } }', 'B'], ['query A { getAgent(id: "a1") { id } }', ''], ['query A { listAgents { id } } query B { getAgent(id: "a1") { id } }', undefined]] as const) {
    const res = await get(query, name)
    t.equal(res.statusCode, 400, `${query} operationName ${String(name)}: ${res.body.slice(0, 200)}`)
    t.match(res.json(), { errors: [{ message: /operation/, extensions: { code: 'VALIDATION_FAILED', status: 400 } }] })
  }
  // The same documents with a name they define run; a mutation over GET is still refused.
  t.same((await get('query A { listAgents { id } } query B { getAgent(id: "a1") { id } }', 'B')).json(), { data: { getAgent: { id: 'a1' } } })
  t.same((await get('query A { getAgent(id: "a1") { id } }', 'A')).json(), { data: { getAgent: { id: 'a1' } } })
  t.equal((await get('mutation M { deleteAgent(id: "a1") { id } }', 'M')).statusCode, 405)
  t.equal((await get('{ getAgent(id: ')).statusCode, 400, 'a syntax error is still mercurius\' own')
})

t.test('over GET, variables or extensions that are JSON but not an object are a 400, not a 500', async t => {
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  const query = encodeURIComponent('query Q($id: String!) { getAgent(id: $id) { id } }')
  for (const [key, value] of [['variables', '"d1"'], ['variables', '[1]'], ['variables', '5'], ['variables', 'true'], ['extensions', '"x"'], ['extensions', '[]']]) {
    const res = await app.inject({ method: 'GET', url: `/graphql?query=${query}&${key}=${encodeURIComponent(value)}`, headers: bearer() })
    t.equal(res.statusCode, 400, `${key}=${value}: ${res.body.slice(0, 200)}`)
    t.match(res.json(), { errors: [{ message: `\`${key}\` must be a JSON object`, extensions: { code: 'VALIDATION_FAILED' } }] })
  }
  const notJson = await app.inject({ method: 'GET', url: `/graphql?query=${query}&variables=%7Bnope`, headers: bearer() })
  t.equal(notJson.statusCode, 400, 'text that is not JSON is mercurius\' own 400')
  const ok = await app.inject({ method: 'GET', url: `/graphql?query=${query}&variables=${encodeURIComponent('{"id":"a1"}')}`, headers: bearer() })
  t.same(ok.json(), { data: { getAgent: { id: 'a1' } } })
})

t.test('over GET, an empty variables or extensions is none: answered on the first run as on the next, never a 500', async t => {
  // `variables=` (a URL built with no variables) reached graphql-js's execute as the text '',
  // which it asserts against: a 500 INTERNAL on a document's first run, and an answer once
  // mercurius had compiled it (graphql-jit reads '' as no variables).
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  for (const [document, key] of [['{ getAgent(id: "a1") { id } }', 'variables'], ['query Q($id: String = "a1") { getAgent(id: $id) { id } }', 'variables'], ['query R($id: String = "a1") { getAgent(id: $id) { id } }', 'extensions']]) {
    for (const run of [1, 2, 3]) {
      const res = await app.inject({ method: 'GET', url: `/graphql?query=${encodeURIComponent(document)}&${key}=`, headers: bearer() })
      t.same([res.statusCode, res.json()], [200, { data: { getAgent: { id: 'a1' } } }], `${document} ${key}=, run ${run}`)
    }
  }
})

t.test('over GET, variables or extensions that are not JSON are refused naming the parameter, not a body the GET has not', async t => {
  // mercurius's own refusal said "The body is not valid JSON" of a query string parameter.
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  const query = encodeURIComponent('query Q($id: String!) { getAgent(id: $id) { id } }')
  for (const [key, value] of [['variables', '{nope'], ['variables', ' '], ['variables', 'undefined'], ['extensions', '{']]) {
    const res = await app.inject({ method: 'GET', url: `/graphql?query=${query}&${key}=${encodeURIComponent(value)}`, headers: bearer() })
    t.same([res.statusCode, res.json().errors[0].message, res.json().errors[0].extensions.code], [400, `\`${key}\` is not valid JSON`, 'VALIDATION_FAILED'], `${key}=${value}`)
  }
})

t.test('over graphql-ws, a subscribe whose query is not a GraphQL string does not bring the gateway down', async t => {
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  for (const query of [true, {}, { kind: 'Document', definitions: [{}] }, 'true', '{}']) {
    const socket = new WebSocket(`ws://127.0.0.1:${port}/graphql`, 'graphql-transport-ws')
    const frames: string[] = []
    const closed = new Promise<number>(resolve => socket.on('close', code => resolve(code)))
    socket.on('message', (data: RawData) => {
      const text = (data as Buffer).toString()
      frames.push(text)
      if (text.includes('connection_ack')) socket.send(JSON.stringify({ id: '1', type: 'subscribe', payload: { query } }))
      else socket.close(1000)
    })
    socket.on('open', () => socket.send(JSON.stringify({ type: 'connection_init', payload: { authorization: `Bearer ${token()}` } })))
    const code = await closed
    t.not(code, 1006, `${JSON.stringify(query)}: the connection ends with a close code (${code}), not a drop; frames ${frames.join(' ')}`)
    t.not(code, 1011, `${JSON.stringify(query)}: not an internal error`)
  }
  const health = await app.inject({ method: 'GET', url: '/healthz' })
  t.equal(health.statusCode, 200)
})
