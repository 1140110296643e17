import { compiled } from './jit-spy.js'
import t from 'tap'
import { JIT_MAX_FIELDS } from '../../../adapters/graphql/index.js'
import { buildDemoApp } from '../../helper.js'

// mercurius compiles a document with graphql-jit on its second request, whoever sends it and
// before any token is looked at: 50 root fields each spreading a fragment of 19 fields (1.4 KB)
// cost 20-50 ms of CPU to compile, a new text each time. A document of more than JIT_MAX_FIELDS
// fields (fragments counted where spread) runs uncompiled; smaller ones are compiled as before.

const times = (n: number, f: (i: number) => string): string => Array.from({ length: n }, (_, i) => f(i)).join(' ')

t.test('a document of more than JIT_MAX_FIELDS fields is never compiled; one within it is, once seen twice', async t => {
  t.equal(JIT_MAX_FIELDS, 200)
  const app = await buildDemoApp(t, { BFF_TRPC_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  const post = async (query: string) => await app.inject({ method: 'POST', url: '/graphql', payload: { query } })
  // 10 root fields x (1 + 19) = 200 fields: compiled on its second request.
  const within = `query Within { ${times(10, i => `r${i}: listAgents { ...F }`)} } fragment F on Agent { ${times(19, j => `a${j}: id`)} }`
  for (let i = 0; i < 3; i++) {
    const res = await post(within)
    t.equal(res.statusCode, 200)
    t.match(res.json(), { data: { r0: null }, errors: [{ extensions: { code: 'UNAUTHENTICATED' } }] })
  }
  t.same(compiled, ['Within'], 'compiled once, on its second request')
  // 50 x (1 + 19) = 1,000 fields (the bound on fields): run, never compiled.
  const over = `query Over { ${times(50, i => `r${i}: listAgents { ...F }`)} } fragment F on Agent { ${times(19, j => `a${j}: id`)} }`
  for (let i = 0; i < 3; i++) {
    const res = await post(over)
    t.equal(res.statusCode, 200)
    t.match(res.json(), { data: { r0: null, r49: null }, errors: [{ extensions: { code: 'UNAUTHENTICATED' } }] })
  }
  t.same(compiled, ['Within'], 'the larger document is not compiled')
})
