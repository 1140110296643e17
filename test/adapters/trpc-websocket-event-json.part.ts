import t from 'tap'
import type { AddressInfo } from 'node:net'
import WebSocket from 'ws'
import { createTRPCUntypedClient, createWSClient, wsLink } from '@trpc/client'
import { buildDemoApp, token } from '../helper.js'

// The bus serializes an event once for all its subscribers (its schema's serializer), and /ws
// sends that JSON as it is. tRPC's WebSocket adapter encoded each subscriber's message whole,
// the event's payload with it: one JSON.stringify of the payload per subscriber, a 1 MB event to
// 1,000 subscribers of a tenant 1,000 encodings of 1 MB on the event loop, where /ws pays one.

const sleep = async (ms: number): Promise<void> => await new Promise(resolve => setTimeout(resolve, ms))

t.test('WebSocket at /trpc: an event\'s payload is encoded once, not once per subscriber', async t => {
  const app = await buildDemoApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const port = (app.server.address() as AddressInfo).port
  const seen: unknown[][] = []
  for (let i = 0; i < 3; i++) {
    const socket = createWSClient({ url: `ws://127.0.0.1:${port}/trpc`, WebSocket: WebSocket as unknown as typeof globalThis.WebSocket, connectionParams: { token: token({ tenant: 't1' }) }, retryDelayMs: () => 60_000 })
    t.teardown(async () => { await socket.close() })
    const client = createTRPCUntypedClient({ links: [wsLink({ client: socket })] })
    const data: unknown[] = []
    seen.push(data)
    const sub = client.subscription('runUpdated', undefined, { onData: (d: unknown) => { data.push(d) } })
    t.teardown(() => sub.unsubscribe())
  }
  const deadline = Date.now() + 5000
  while (app.events.bus.subscriptions < 3 && Date.now() < deadline) await sleep(5)
  t.equal(app.events.bus.subscriptions, 3)

  // The payload every subscriber is handed (the bus's, shared), and how often it is stringified.
  let shared: unknown = null
  app.events.bus.subscribe('runUpdated', 't1', payload => { shared = payload })
  const carries = (value: unknown, depth = 0): boolean => {
    if (value === shared) return true
    if (value === null || typeof value !== 'object' || depth > 3) return false
    return Object.values(value).some(v => carries(v, depth + 1))
  }
  let encodings = 0
  const stringify = JSON.stringify
  JSON.stringify = function (this: unknown, ...args: Parameters<typeof JSON.stringify>) {
    if (shared !== null && carries(args[0])) encodings++
    return stringify.apply(this, args)
  } as typeof JSON.stringify
  t.teardown(() => { JSON.stringify = stringify })

  const now = new Date().toISOString()
  await app.events.publish({ topic: 'runs.updated', tenantId: 't1', payload: { id: 'r1', agentId: 'a1', status: 'running', temperature: 0.7, promptChars: 5, output: 'x'.repeat(1000), error: null, createdAt: now, updatedAt: now, startedAt: null, finishedAt: null, secret: 'x' } })
  while (seen.some(s => s.length === 0) && Date.now() < deadline + 5000) await sleep(5)
  JSON.stringify = stringify
  t.same(seen.map(s => s.length), [1, 1, 1], 'each subscriber got the event')
  for (const s of seen) {
    t.match(s[0], { id: 'r1', status: 'running', output: 'x'.repeat(1000), startedAt: null })
    t.notOk('secret' in (s[0] as object), 'shaped by its schema')
  }
  t.equal(encodings, 0, 'the bus\'s JSON is sent as it is, not the payload encoded again per subscriber')
})
