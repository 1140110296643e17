// Refusals of a request by its head alone (README, Errors), where a review of their first version
// found them wrong: a refused WebSocket handshake held its connection (and the tenant's slot) for
// as long as the client kept its side open; with CORS on, a preflight without Host was answered
// 204; a head of 1,000 fields whose Host came after them was told it had none; and a request
// with `Expect: 100-continue` was invited to send the body it was then refused.
import t from 'tap'
import { connect } from 'node:net'
import { WebSocket } from 'ws'
import { bearer, buildDemoApp } from './helper.js'

/** Writes `request` on a raw socket; what comes back within `ms` (the client never closes its side). */
async function answer (port: number, request: string, ms = 1000): Promise<string> {
  return await new Promise<string>(resolve => {
    const socket = connect({ port, host: '127.0.0.1', allowHalfOpen: true })
    let data = ''
    socket.on('data', (chunk: Buffer) => { data += chunk.toString() })
    socket.on('error', () => {})
    setTimeout(() => { socket.destroy(); resolve(data) }, ms)
    socket.write(request)
  })
}
const listening = async (t: Parameters<typeof buildDemoApp>[0], env = {}): Promise<{ app: Awaited<ReturnType<typeof buildDemoApp>>, port: number }> => {
  const app = await buildDemoApp(t, env)
  await app.listen({ port: 0, host: '127.0.0.1' })
  return { app, port: (app.server.address() as { port: number }).port }
}
const first = (s: string): string => s.split('\r\n')[0]
const junk = Array.from({ length: 1000 }, (_, i) => `x-h${i}: 1\r\n`).join('')
const badHandshake = `GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: ${bearer({ tenant: 'slots' }).authorization}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n`

t.test('a refused WebSocket handshake closes its connection although the client keeps its side open: no slot held, the shutdown not held', async t => {
  const { app, port } = await listening(t, { BFF_WS_MAX_CONNECTIONS_PER_TENANT: 2 })
  const answers: string[] = []
  for (let i = 0; i < 2; i++) {
    const socket = connect({ port, host: '127.0.0.1', allowHalfOpen: true })
    t.teardown(() => socket.destroy())
    answers.push('')
    socket.on('data', (chunk: Buffer) => { answers[i] += chunk.toString() })
    socket.write(badHandshake)
  }
  await new Promise(resolve => setTimeout(resolve, 3000))
  t.match(answers, [/^HTTP\/1\.1 400 /, /^HTTP\/1\.1 400 /])
  const held = await new Promise<number>(resolve => app.server.getConnections((_e, n) => resolve(n)))
  t.equal(held, 0, `connections still held 3 s after the 400s: ${held}`)
  const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`, { headers: bearer({ tenant: 'slots' }) })
  ws.on('error', () => {})
  t.teardown(() => ws.terminate())
  const outcome = await new Promise<string>(resolve => {
    ws.once('open', () => resolve('open'))
    ws.once('unexpected-response', (_q, r) => resolve(`refused ${r.statusCode ?? 0}`))
  })
  t.equal(outcome, 'open', `the tenant's first real connection (limit 2): ${outcome}`)
  const closing = app.close()
  const ended = await Promise.race([closing.then(() => 'closed'), new Promise(resolve => setTimeout(() => resolve('still closing after 5 s'), 5000))])
  t.equal(ended, 'closed', 'app.close()')
})

t.test('with CORS on (the guard off, so CORS answers preflights itself), an HTTP/1.1 preflight without Host is a 400', async t => {
  const { port } = await listening(t, { BFF_CORS_ORIGINS: 'https://app.example' })
  const res = await answer(port, 'OPTIONS /api/v1/agents HTTP/1.1\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n')
  t.match(res, /^HTTP\/1\.1 400 /, `got ${first(res)}`)
})

t.test('a head of 1,000 fields whose Host comes after them: 431, not "needs a Host header"', async t => {
  const { port } = await listening(t)
  const res = await answer(port, `GET /healthz HTTP/1.1\r\n${junk}Host: x\r\nConnection: close\r\n\r\n`)
  t.match(res, /^HTTP\/1\.1 431 /, `got ${first(res)} ${res.slice(res.indexOf('{'))}`)
})

t.test('Expect: 100-continue on a request refused by its head: the refusal alone, no 100 Continue first', async t => {
  const { port } = await listening(t)
  const post = `POST /api/v1/agents HTTP/1.1\r\nAuthorization: ${bearer().authorization}\r\nContent-Type: application/json\r\nContent-Length: 12\r\nExpect: 100-continue\r\n`
  const hostless = await answer(port, `${post}\r\n`)
  t.match(hostless, /^HTTP\/1\.1 400 /, `no Host: got ${first(hostless)}`)
  const many = await answer(port, `${post}Host: x\r\n${junk}\r\n`)
  t.match(many, /^HTTP\/1\.1 431 /, `1,000 fields: got ${first(many)}`)
})
