import t from 'tap'
import { parse } from 'graphql'
import { MAX_TOKENS, PARSE_OPTIONS } from '../../../adapters/graphql/index.js'
import { buildDemoApp, bearer } from '../../helper.js'

// mercurius keeps every document it parsed, valid or refused by validation, in two caches keyed
// by its text, before any authentication: with 20,000 tokens and `loc` kept, a document held
// ~9 MB and anonymous clients pinned gigabytes. What one cached document may hold is bounded:
// at most MAX_TOKENS tokens, parsed without locations.

const ONLY_GRAPHQL = { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false }

t.test('a document past the token bound is refused with its error', async t => {
  t.equal(MAX_TOKENS, 2000)
  const app = await buildDemoApp(t, ONLY_GRAPHQL)
  const post = async (query: string) => await app.inject({ method: 'POST', url: '/graphql', headers: bearer(), payload: { query } })
  // `{ listAgents {` and `} }` are 5 tokens; `id @include(if: true)` 8 (249 of them 1992): 2000
  // tokens within the bound on fields (1000).
  const fields = 'id @include(if: true) '.repeat(249)
  const at = await post(`{ listAgents { ${fields}id id id } }`)
  t.equal(at.statusCode, 200, 'a document of MAX_TOKENS tokens runs')
  t.match(at.json(), { data: { listAgents: [{ id: String }] } })
  const over = await post(`{ listAgents { ${fields}id id id id } }`)
  t.equal(over.statusCode, 400)
  t.match(over.json(), { errors: [{ message: 'Syntax Error: Document contains more that 2000 tokens. Parsing aborted.', extensions: { code: 'VALIDATION_FAILED', status: 400 } }] })
})

t.test('documents are parsed without locations; syntax errors keep theirs', async t => {
  t.same(PARSE_OPTIONS, { maxTokens: MAX_TOKENS, noLocation: true })
  const document = parse('{ listAgents { id } }', PARSE_OPTIONS)
  t.equal(document.loc, undefined, 'no tokens kept')
  t.equal(document.definitions[0].loc, undefined)

  const app = await buildDemoApp(t, ONLY_GRAPHQL)
  const post = async (query: string, headers: Record<string, string> = bearer()) => await app.inject({ method: 'POST', url: '/graphql', headers, payload: { query } })
  // What mercurius parsed and cached: its validation errors have no locations.
  const invalid = await post('{ listAgents { nope } }')
  t.equal(invalid.statusCode, 400)
  t.match(invalid.json(), { errors: [{ message: 'Cannot query field "nope" on type "Agent".', extensions: { code: 'VALIDATION_FAILED' } }] })
  t.notOk('locations' in invalid.json().errors[0], 'a validation error has no locations')
  // A field's error, before and after the JIT compiles the document: no (empty) locations.
  for (let i = 0; i < 3; i++) {
    const denied = await post('{ listAgents { id } }', {})
    t.equal(denied.statusCode, 200)
    t.match(denied.json(), { data: { listAgents: null }, errors: [{ path: ['listAgents'], extensions: { code: 'UNAUTHENTICATED' } }] })
    t.notOk('locations' in denied.json().errors[0], `run ${i}: a field's error has no locations`)
  }
  const syntax = await post('{ listAgents { id }')
  t.equal(syntax.statusCode, 400)
  t.match(syntax.json(), { errors: [{ message: 'Syntax Error: Expected Name, found <EOF>.', locations: [{ line: 1, column: 20 }] }] })
})
