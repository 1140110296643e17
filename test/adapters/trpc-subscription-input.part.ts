import t from 'tap'
import type { AddressInfo } from 'node:net'
import WebSocket from 'ws'
import { EventSource } from 'eventsource'
import { createTRPCUntypedClient, httpSubscriptionLink, TRPCClientError } from '@trpc/client'
import type { AnyTRPCRouter } from '@trpc/server'
import type { FastifyInstance } from 'fastify'
import { buildDemoApp, bearer, until } from '../helper.js'

// A subscription takes no input (codegen types it `void`): the same subscription on /ws refuses
// a frame that carries one, and GraphQL an argument. The tRPC face took any input, JSON or not,
// and ignored it: `?input=notjson` got a live SSE stream, and over WebSocket `started`, where a
// query with the same input is refused VALIDATION_FAILED. No input, or null (the face's "no
// input" for every call), still subscribes.

const viewer = (): Record<string, string> => bearer({ roles: ['viewer'] })

/**
 * What an SSE response sent up to its error event, or up to the moment its subscription is on
 * the bus (accepted: it would send nothing more for a while), then null.
 */
async function refusal (res: Response, app: FastifyInstance): Promise<string | null> {
  const reader = res.body!.getReader()
  let text = ''
  let live = false
  const read = new AbortController()
  const watch = (async () => {
    while (!read.signal.aborted && app.events.bus.subscriptions === 0) await new Promise(resolve => setTimeout(resolve, 10))
    if (!read.signal.aborted) { live = true; await reader.cancel() }
  })()
  while (!text.includes('serialized-error')) {
    const chunk = await reader.read()
    if (chunk.done) break
    text += Buffer.from(chunk.value).toString()
  }
  read.abort()
  await watch
  return live ? null : text
}

t.test('SSE: a subscription with any input is refused VALIDATION_FAILED, the stream\'s one event', async t => {
  const app = await buildDemoApp(t, { BFF_GRAPHQL_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const base = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}/trpc/runUpdated`
  const headers = { ...viewer(), accept: 'text/event-stream' }
  const inputs: Array<[string, RegExp]> = [
    ['notjson', /The input is not valid JSON/],
    ['{"x":1}', /A subscription takes no input/],
    ['{}', /A subscription takes no input/],
    ['5', /A subscription takes no input/],
    ['"s"', /A subscription takes no input/]
  ]
  for (const [input, message] of inputs) {
    const controller = new AbortController()
    t.teardown(() => controller.abort())
    const res = await fetch(`${base}?input=${encodeURIComponent(input)}`, { headers, signal: controller.signal })
    // As every refusal of an SSE subscription: a 200 whose one event is the error (README).
    t.equal(res.status, 200, `input=${input}`)
    const text = await refusal(res, app)
    t.match(text, /"code":"VALIDATION_FAILED","httpStatus":400/, `input=${input}: refused`)
    t.match(text, message, `input=${input}: why`)
    controller.abort()
    await until(() => app.events.bus.subscriptions === 0, 'nothing on the bus')
  }
  t.equal(app.events.bus.subscriptions, 0, 'none reached the bus')

  // httpSubscriptionLink: the error is the subscription's.
  const client = createTRPCUntypedClient<AnyTRPCRouter>({
    links: [httpSubscriptionLink({
      url: base.replace(/\/runUpdated$/, ''),
      EventSource,
      eventSourceOptions: { fetch: async (url, init) => await fetch(url, { ...init, headers: { ...init?.headers as Record<string, string>, ...viewer() } }) }
    })]
  })
  const errors: unknown[] = []
  const sub = client.subscription('runUpdated', { x: 1 }, { onError: (err: unknown) => errors.push(err) })
  t.teardown(() => sub.unsubscribe())
  await until(() => errors.length === 1, 'the refusal')
  const error = errors[0] as TRPCClientError<AnyTRPCRouter>
  t.ok(error instanceof TRPCClientError)
  t.match(error.data, { code: 'VALIDATION_FAILED', httpStatus: 400, requestId: String })
  t.equal(error.message, 'A subscription takes no input')

  for (const input of ['', '?input=null']) {
    const controller = new AbortController()
    t.teardown(() => controller.abort())
    const res = await fetch(base + input, { headers, signal: controller.signal })
    t.equal(res.status, 200)
    await until(() => app.events.bus.subscriptions === 1, `subscribed with ${input === '' ? 'no input' : 'input null'}`)
    controller.abort()
    await until(() => app.events.bus.subscriptions === 0, 'unsubscribed')
  }
})

t.test('WebSocket: a subscription with any input is refused VALIDATION_FAILED, never started', async t => {
  const app = await buildDemoApp(t, { BFF_GRAPHQL_ENABLED: false, BFF_WEBSOCKET_ENABLED: false })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const socket = new WebSocket(`ws://127.0.0.1:${(app.server.address() as AddressInfo).port}/trpc`, { headers: viewer() })
  t.teardown(() => socket.terminate())
  const messages: Array<{ id: number, result?: { type?: string }, error?: { message: string, data: Record<string, unknown> } }> = []
  socket.on('message', (data: Buffer) => messages.push(JSON.parse(data.toString())))
  await new Promise<void>((resolve, reject) => { socket.once('open', resolve); socket.once('error', reject) })

  const refused: unknown[] = ['notjson', { x: 1 }, {}, 5, [], false]
  refused.forEach((input, i) => socket.send(JSON.stringify({ id: i + 1, method: 'subscription', params: { path: 'runUpdated', input } })))
  await until(() => messages.length === refused.length, 'the refusals')
  for (let id = 1; id <= refused.length; id++) {
    const answer = messages.find(m => m.id === id)
    t.match(answer, { error: { message: 'A subscription takes no input', data: { code: 'VALIDATION_FAILED', httpStatus: 400 } } }, `input ${JSON.stringify(refused[id - 1])}`)
  }
  t.notOk(messages.some(m => m.result?.type === 'started'), 'none started')
  t.equal(app.events.bus.subscriptions, 0)

  // No input, and null, still subscribe.
  socket.send(JSON.stringify({ id: 20, method: 'subscription', params: { path: 'runUpdated' } }))
  socket.send(JSON.stringify({ id: 21, method: 'subscription', params: { path: 'runUpdated', input: null } }))
  await until(() => messages.filter(m => m.result?.type === 'started').length === 2, 'both started')
  await until(() => app.events.bus.subscriptions === 2, 'both on the bus')
  t.same(messages.filter(m => m.result?.type === 'started').map(m => m.id).sort(), [20, 21])
})
