// The fuzzer (loadtest/fuzz.ts), CI-sized: a seeded run of generated bad requests over every
// face against a real gateway on the demo Kernel. No 5xx, no connection dropped without an
// answer or a deliberate close code, and the gateway still healthy afterwards.
import t from 'tap'
import { buildDemoApp, SECRET } from '../helper.js'
import { deliberateClose, formatFuzz, FUZZ_FACES, generateCases, prng, runFuzz, type FuzzCase } from '../../loadtest/fuzz.js'

t.test('the same seed gives the same cases', async t => {
  const first = (seed: number): string[] => {
    const gen = generateCases(seed, SECRET, 'token', 1_800_000_000)
    return Array.from({ length: 300 }, () => JSON.stringify(gen.next().value as FuzzCase))
  }
  t.strictSame(first(3), first(3))
  t.not(first(3).join(), first(4).join(), 'another seed, other cases')
  const a = prng(9)
  const b = prng(9)
  for (let i = 0; i < 100; i++) t.equal(a(), b())
  t.ok(deliberateClose(1009) && deliberateClose(4401) && deliberateClose(1005))
  t.notOk(deliberateClose(1006) || deliberateClose(1011), 'a cut connection or an internal error is not deliberate')
})

t.test('a share of the cases carry a value nested thousands deep, on every face and WebSocket protocol', async t => {
  // The nesting of JSON text, read without parsing it (brackets inside strings do not count).
  const depthOf = (text: string): number => {
    let depth = 0
    let max = 0
    let inString = false
    for (let i = 0; i < text.length; i++) {
      const c = text[i]
      if (inString) {
        if (c === '\\') i++
        else if (c === '"') inString = false
      } else if (c === '"') inString = true
      else if (c === '[' || c === '{') max = Math.max(max, ++depth)
      else if (c === ']' || c === '}') depth--
    }
    return max
  }
  const gen = generateCases(5, SECRET, 'token', 1_800_000_000)
  const deepest = new Map<string, number>()
  let deep = 0
  const total = 4000
  for (let i = 0; i < total; i++) {
    const c = gen.next().value as FuzzCase
    if (!c.kind.startsWith('deep ')) continue
    deep++
    const texts = 'ws' in c
      ? c.ws.frames.filter((f): f is string => typeof f === 'string')
      : [decodeURIComponent(c.path), String(c.body ?? ''), Buffer.from(c.headers.authorization?.split('.')[1] ?? '', 'base64url').toString()]
    const kind = `${c.face} ${'ws' in c ? c.kind : c.kind.replace(/ \/api\/v1\/agents.*/, ' /api/v1/agents')}`
    deepest.set(kind, Math.max(deepest.get(kind) ?? 0, ...texts.map(depthOf)))
    // Valid JSON (JSON.parse has no depth limit): it gets past the parser to what reads it.
    if ('ws' in c) for (const text of texts) JSON.parse(text)
  }
  t.ok(deep > total * 0.03 && deep < total * 0.1, `${deep} of ${total} cases`)
  for (const kind of ['websocket deep /ws', 'graphql deep graphql-transport-ws', 'graphql deep graphql-ws', 'trpc deep trpc-ws', 'rest deep POST /api/v1/agents', 'rest deep PATCH /api/v1/agents',
    'batch deep POST /api/v1/batch', 'trpc deep GET query', 'trpc deep GET batch', 'trpc deep POST mutation', 'graphql deep GET', 'graphql deep POST']) {
    t.ok((deepest.get(kind) ?? 0) >= 5000, `${kind}: nested ${deepest.get(kind) ?? 0} deep`)
  }
})

// A seeded run is a fixed amount of work, but the machine is shared: generous (it takes about a
// minute under the suite's load), within tap's per-file timeout of the group it runs in.
t.test('1,000 bad requests over every face: no 5xx, no drop, still healthy', { timeout: 300_000 }, async t => {
  // The HTTP guard on, at a limit the run never reaches: its count of every request and of the
  // WebSocket messages it counts (subscribe, auth) is fuzzed with the rest.
  const app = await buildDemoApp(t, { BFF_RATE_LIMIT_GLOBAL_MAX: 100_000_000 })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const url = `http://127.0.0.1:${port}`
  const report = await runFuzz({ url, secret: SECRET, seed: 20261126, count: 1000, concurrency: 16, silentMs: 500 })
  t.ok(report.requests >= 1000, `${report.requests} requests`)
  for (const face of FUZZ_FACES) t.ok(report.faces[face].requests > 0, `${face}: ${report.faces[face].requests} requests`)
  t.ok(report.total.classes['4xx'] > report.requests / 2, 'most are refused with a 4xx')
  const text = formatFuzz(report, null, 0)
  t.equal(report.total.classes['5xx'], 0, `no 5xx:\n${text}`)
  t.equal(report.total.dropped, 0, 'no connection dropped without an answer or a deliberate close code')
  t.equal(report.unhealthy, 0, 'every health check during the run answered 200')
  t.match(text, 'fuzz: ok (no 5xx, no dropped connection, no crash)')
  const health = await fetch(url + '/healthz')
  t.equal(health.status, 200, 'the gateway still answers')
  const agent = await app.inject({ method: 'GET', url: '/api/v1/agents/a2', headers: { authorization: `Bearer ${(await import('../helper.js')).token({ tenant: 'after-fuzz' })}` } })
  t.equal(agent.statusCode, 200, 'and still serves calls')
})
