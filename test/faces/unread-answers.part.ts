// What HTTP answers hold unread, per tenant (adapters/unread.ts, answerBounds). A connection holds
// an answer or two that its client has not read (Node reads no further pipelined request meanwhile),
// but nothing bounded the connections, nor what they held together: one token's client that sent
// 40 REST batches of 50 cached 208 KB answers on 40 connections (120 KB sent) and read none made a
// gateway with a 256 MiB heap run out of memory and die, with every tenant's calls. Now a tenant
// whose clients hold more than its share unread is refused 503 OVERLOADED, and answers that find
// it so are left out (503 too), while other tenants are served.
import t, { type Test } from 'tap'
import type { Socket } from 'node:net'
import { unreadGet as unreadClient } from './unread-client.js'
import { buildApp } from '../../app.js'
import { startTestKernel, testManifest, testConfig, json, token, type TestHandler } from '../helper.js'

const big = 'x'.repeat(8 * 1024 * 1024)
const SHARE = 1024 * 1024
const HOGS = 3

type Teardown = { teardown: (fn: () => unknown) => void }
const output = { type: 'object', properties: { data: { type: 'string' } } }

/** A gateway listening, in front of a Kernel serving `routes` (GET /v1/<name>) as queries GET /api/v1/<name>; a tenant's share of unread bytes `perTenant`. */
async function gatewayOf (t: Teardown, routes: Record<string, TestHandler>, perTenant: number, lines?: string[]): Promise<{ port: number, base: string, held: () => Promise<number> }> {
  const kernel = await startTestKernel(t, Object.fromEntries(Object.entries(routes).map(([name, route]) => [`GET /v1/${name}`, route])))
  const ops = Object.fromEntries(Object.keys(routes).map(name => [`get${name[0].toUpperCase()}${name.slice(1)}`, { type: 'query', rest: `GET /${name}`, kernel: `GET /v1/${name}`, output, timeoutMs: 10000 }]))
  const manifest = testManifest(ops, { url: kernel.url })
  const logs = lines === undefined ? { logger: false as const } : { logger: undefined, logStream: { write: (line: string) => { lines.push(line) } } }
  const app = await buildApp(testConfig({ BFF_WEBSOCKET_ENABLED: false, LOG_LEVEL: 'warn' }), { ...logs, manifest, kernelUrl: kernel.url, unreadBytes: { max: 64 * 1024 * 1024, perTenant } })
  t.teardown(() => app.close())
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const base = `http://127.0.0.1:${port}`
  const held = async (): Promise<number> => Number(/^mantle_unread_bytes (\d+)$/m.exec(await (await fetch(`${base}/metrics`)).text())?.[1])
  return { port, base, held }
}

/** A client that sends GET `path` with `authorization`, reads its answer's status line, then nothing more. */
const unreadGet = async (t: Teardown, port: number, path: string, authorization: string): Promise<{ socket: Socket, status: string }> => await unreadClient(t, port, path, `Authorization: ${authorization}\r\n`)

/** What `held` reads once `enough` says so, or after 5 s of reading (every 20 ms). */
async function heldOnce (held: () => Promise<number>, enough: (bytes: number) => boolean): Promise<number> {
  let now = await held()
  for (let i = 0; i < 250 && !enough(now); i++) {
    await new Promise(resolve => setTimeout(resolve, 20))
    now = await held()
  }
  return now
}

/** The status `ask` gets once it is 200, or after 5 s of asking (every 20 ms). */
async function servedAgain (ask: () => Promise<Response>): Promise<number> {
  let again = 0
  for (let i = 0; i < 250 && again !== 200; i++) {
    again = (await ask()).status
    if (again !== 200) await new Promise(resolve => setTimeout(resolve, 20))
  }
  return again
}

/**
 * The tenant of `authorization` is refused a tRPC call while `socket` leaves its `what` unread,
 * served again once the socket is closed, and nothing is held then.
 */
async function refusedUntilClosed (t: Test, base: string, authorization: string, socket: Socket, held: () => Promise<number>, what: string): Promise<void> {
  const small = async (): Promise<Response> => await fetch(`${base}/trpc/getSmall`, { headers: { authorization } })
  const refused = await small()
  t.equal(refused.status, 503, `the tenant's next request is refused while its ${what} is unread`)
  t.match(await refused.json(), { error: { data: { code: 'OVERLOADED' } } })
  socket.destroy()
  t.equal(await servedAgain(small), 200, 'served again once the connection closed')
  t.equal(await held(), 0, 'nothing held')
}

t.test('one tenant\'s answers left unread are bounded by its share; other tenants are served', async t => {
  let arrived = 0
  let release: () => void = () => {}
  const gate = new Promise<void>(resolve => { release = resolve })
  const { port, base, held } = await gatewayOf(t, {
    // The three large answers leave together, once all three were asked for: each finds the others.
    big: async (_req, res) => {
      if (++arrived === HOGS) release()
      await gate
      json(res, 200, { data: big })
    },
    small: (_req, res) => json(res, 200, { data: 'small' })
  }, SHARE)
  const hog = `Bearer ${token({ tenant: 'hog' })}`

  // Clients that read their answer's status line, then nothing more.
  const clients = await Promise.all(Array.from({ length: HOGS }, async () => await unreadGet(t, port, '/api/v1/big', hog)))
  const statuses = clients.map(c => c.status)
  t.same(statuses.map(line => line.split(' ')[1]).sort(), ['200', '503', '503'], `one large answer held for the tenant, the others left out (${statuses.join(', ')})`)

  t.ok(await held() >= big.length, 'the answer held is in /metrics')
  const small = async (authorization: string): Promise<Response> => await fetch(`${base}/api/v1/small`, { headers: { authorization } })
  const refused = await small(hog)
  t.equal(refused.status, 503, 'the tenant\'s next request is refused while its answers are unread')
  t.equal(refused.headers.get('retry-after'), '5')
  t.match(await refused.json(), { code: 'OVERLOADED', detail: /answers unread/ })
  // In each face's own shape.
  const graphql = await fetch(`${base}/graphql`, { method: 'POST', headers: { authorization: hog, 'content-type': 'application/json' }, body: JSON.stringify({ query: '{ getSmall { data } }' }) })
  t.equal(graphql.status, 503)
  t.match(await graphql.json(), { errors: [{ extensions: { code: 'OVERLOADED', retryAfter: 5 } }] }, 'GraphQL')
  const trpc = await fetch(`${base}/trpc/getSmall`, { headers: { authorization: hog } })
  t.equal(trpc.status, 503)
  t.match(await trpc.json(), { error: { data: { code: 'OVERLOADED' } } }, 'tRPC')
  const other = await small(`Bearer ${token({ tenant: 'other' })}`)
  t.equal(other.status, 200, 'another tenant is served')
  t.same(await other.json(), { data: 'small' })

  // The share comes back with the connections that held it.
  for (const { socket } of clients) socket.destroy()
  t.equal(await servedAgain(async () => await small(hog)), 200, 'the tenant is served again once its connections closed')
  t.equal(await held(), 0, 'nothing held in /metrics')

  // A large answer read to its end is let go then, with its connection kept open (keep-alive):
  // three of 8 MiB would otherwise hold the tenant at three times its share for good.
  const reader = `Bearer ${token({ tenant: 'reader' })}`
  for (let i = 0; i < 3; i++) {
    const answer = await fetch(`${base}/api/v1/big`, { headers: { authorization: reader } })
    t.equal((await answer.json() as { data: string }).data.length, big.length, `large answer ${i + 1} read`)
  }
  t.equal((await small(reader)).status, 200, 'answers read are no longer counted')
})

t.test('a tRPC batch\'s answer left unread counts against its tenant as any other answer', async t => {
  const { port, base, held } = await gatewayOf(t, {
    big: (_req, res) => json(res, 200, { data: big }),
    small: (_req, res) => json(res, 200, { data: 'small' })
  }, SHARE)
  const hog = `Bearer ${token({ tenant: 'hog' })}`

  // A client that sends a batch of two large answers (httpBatchLink's, not streamed), reads the
  // answer's status line, then nothing more.
  const { socket, status } = await unreadGet(t, port, '/trpc/getBig,getBig?batch=1', hog)
  t.equal(status.split(' ')[1], '200', status)
  t.ok(await held() >= 2 * big.length, 'the batch\'s answer held is counted')
  await refusedUntilClosed(t, base, hog, socket, held, 'batch')
  // A batch read to its end is let go, its answer whole.
  const reader = await fetch(`${base}/trpc/getBig,getSmall?batch=1`, { headers: { authorization: `Bearer ${token({ tenant: 'reader' })}` } })
  t.equal(reader.status, 200)
  t.match(reader.headers.get('content-type'), /^application\/json\b/, 'JSON, as a single call\'s answer')
  const results = await reader.json() as Array<{ result: { data: { data: string } } }>
  t.same(results.map(r => r.result.data.data.length), [big.length, 5])
  t.equal(await held(), 0, 'nothing held once read')
})

t.test('an answer left unread is counted in the UTF-8 bytes it is sent as, not in characters', async t => {
  // Three bytes a character: 9 MiB sent for 3 Mi characters.
  const euros = '€'.repeat(3 * 1024 * 1024)
  const { port, held } = await gatewayOf(t, { euros: (_req, res) => json(res, 200, { data: euros }) }, 32 * 1024 * 1024)
  const { socket, status } = await unreadGet(t, port, '/api/v1/euros', `Bearer ${token({ tenant: 'euro' })}`)
  t.equal(status.split(' ')[1], '200', status)
  const bytes = Buffer.byteLength(JSON.stringify({ data: euros }))
  const now = await held()
  t.ok(now >= bytes, `the answer counted as its ${bytes} bytes (${now})`)
  socket.destroy()
  t.equal(await heldOnce(held, bytes => bytes === 0), 0, 'let go with its connection')
})

t.test('a streamed tRPC batch (httpBatchStreamLink\'s jsonl) counts as it is made, and is cut past the share', async t => {
  const lines: string[] = []
  const { port, base, held } = await gatewayOf(t, {
    big: (_req, res) => json(res, 200, { data: big }),
    small: (_req, res) => json(res, 200, { data: 'small' })
  }, 12 * 1024 * 1024, lines)
  const hog = `Bearer ${token({ tenant: 'hog' })}`
  const streamed = `${hog}\r\ntrpc-accept: application/jsonl`

  // Two large results made, none read: both held, and counted, though the client read none.
  const { socket, status } = await unreadGet(t, port, '/trpc/getBig,getBig?batch=1', streamed)
  t.equal(status.split(' ')[1], '200', status)
  const now = await heldOnce(held, bytes => bytes >= 2 * big.length)
  t.ok(now >= 2 * big.length, `the streamed batch's results made are counted (${now})`)
  await refusedUntilClosed(t, base, hog, socket, held, 'stream')

  // Read to its end, it is whole and lets go of what it held.
  const reader = await fetch(`${base}/trpc/getBig,getSmall?batch=1`, { headers: { authorization: `Bearer ${token({ tenant: 'reader' })}`, 'trpc-accept': 'application/jsonl' } })
  t.equal(reader.status, 200)
  t.equal(reader.headers.get('transfer-encoding'), 'chunked', 'streamed')
  const text = await reader.text()
  t.ok(text.includes(big) && text.includes('"small"'), 'both results streamed whole')
  t.equal(await held(), 0, 'nothing held once read')

  // Three large results for a share of 12 MiB: the third finds the tenant over it, and the
  // answer is cut there, as a WebSocket past its bound is closed.
  const cutOff = await unreadGet(t, port, '/trpc/getBig,getBig,getBig?batch=1', `Bearer ${token({ tenant: 'cut' })}\r\ntrpc-accept: application/jsonl`)
  t.equal(cutOff.status.split(' ')[1], '200', cutOff.status)
  let received = 0
  let last = ''
  cutOff.socket.on('data', (chunk: Buffer) => {
    received += chunk.length
    last = (last + chunk.toString('latin1')).slice(-16)
  })
  cutOff.socket.resume()
  await new Promise(resolve => cutOff.socket.once('close', resolve))
  t.ok(received < 3 * big.length, `the answer was cut (${received} bytes received)`)
  t.notOk(last.endsWith('0\r\n\r\n'), 'its chunked body never ended')
  t.equal(await heldOnce(held, bytes => bytes === 0), 0, 'what it held is let go')
  t.equal((await fetch(`${base}/trpc/getSmall`, { headers: { authorization: `Bearer ${token({ tenant: 'cut' })}` } })).status, 200, 'the tenant is served again')
  // As a WebSocket or an SSE stream cut past its bound: counted, and no warn line (a refusal for
  // load writes none). It wrote one warn line per stream cut, and was counted nowhere.
  t.match((await (await fetch(`${base}/metrics`)).text()), /^mantle_slow_reader_cuts_total\{face="trpc",transport="stream"\} 1$/m, 'the cut is counted')
  t.same(lines.filter(line => (JSON.parse(line) as { level: number }).level >= 40), [], 'no warn line')
})
