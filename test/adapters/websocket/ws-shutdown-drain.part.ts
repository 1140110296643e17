// Shutdown and the calls in flight on a WebSocket (/ws, /trpc; GraphQL over WebSocket carries
// subscriptions alone): their answers are sent before the 1001 close, calls sent once the
// shutdown has begun are refused, tRPC's clients are told to reconnect first, and a call that
// hangs holds the close no longer than its operation's timeout. Before, every socket closed at
// once with 1001 and the answer of a call in flight was lost (a mutation carried out at the
// Kernel, its client never told; wsLink reported "WebSocket closed").
import t from 'tap'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import WebSocket from 'ws'
import { buildApp } from '../../../app.js'
import { startTestKernel, testManifest, testConfig, json, token, until } from '../../helper.js'
import type { AuditStore } from '../../../plugins/audit/entry.js'
import { loadManifestFile } from '../../../manifest.js'

/** The audit entries of `poke`, oldest first: read from the store, which outlives the closed app. */
async function pokes (store: AuditStore): Promise<string[]> {
  return (await store.query({ action: 'poke', limit: 10 })).entries.map(e => e.status).reverse()
}

interface Face {
  path: string
  env: Record<string, boolean>
  /** The face tells its clients to reconnect (tRPC's notification) when the shutdown begins. */
  notifies: boolean
  call: (id: number, op: string) => string
  /** The id of an answer frame, and whether it is a result (else the refusal's code). */
  answer: (frame: any) => { id: unknown, ok: boolean, code?: string }
}

const FACES: Face[] = [
  {
    path: '/ws',
    env: { BFF_TRPC_ENABLED: false, BFF_GRAPHQL_ENABLED: false },
    notifies: false,
    call: (id, op) => JSON.stringify({ id: String(id), op, input: {} }),
    answer: (f) => ({ id: Number(f.id), ok: 'result' in f, code: f.error?.code })
  },
  {
    path: '/trpc',
    env: { BFF_WEBSOCKET_ENABLED: false, BFF_GRAPHQL_ENABLED: false },
    notifies: true,
    call: (id, op) => JSON.stringify({ id, method: 'mutation', params: { path: op, input: {} } }),
    answer: (f) => ({ id: f.id, ok: 'result' in f, code: f.error?.data?.code })
  }
]

async function setup (t: { teardown: (fn: () => unknown) => void }, face: Face, kernelHandler: () => Promise<void>, timeoutMs: number) {
  let calls = 0
  const kernel = await startTestKernel(t, { 'POST /poke': async (_req, res) => { calls++; await kernelHandler(); json(res, 200, true) } })
  const manifest = testManifest({ poke: { type: 'mutation', rest: 'POST /poke', kernel: 'POST /poke', output: { type: 'boolean' }, timeoutMs } })
  const app = await buildApp(testConfig(face.env), { logger: false, manifest, kernelUrl: kernel.url })
  t.teardown(() => app.close())
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const ws = new WebSocket(`ws://127.0.0.1:${port}${face.path}?access_token=${token()}`)
  t.teardown(() => ws.terminate())
  await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
  // Everything the client saw, in order: answers and the close.
  const seen: Array<{ id: unknown, ok: boolean, code?: string } | { close: number } | { reconnect: true }> = []
  ws.on('message', (data) => {
    const frame = JSON.parse(data.toString())
    if (frame.method === 'reconnect') seen.push({ reconnect: true })
    else if (frame.id !== undefined && frame.id !== null) seen.push(face.answer(frame))
  })
  const closed = new Promise<void>(resolve => ws.once('close', (code: number) => { seen.push({ close: code }); resolve() }))
  return { app, ws, seen, closed, calls: () => calls }
}

for (const face of FACES) {
  t.test(`${face.path}: at shutdown the answer of a call in flight is sent before the 1001 close, a call sent meanwhile is refused`, async t => {
    let release!: () => void
    const gate = new Promise<void>(resolve => { release = resolve })
    const s = await setup(t, face, async () => { await gate }, 5000)
    s.ws.send(face.call(1, 'poke'))
    await until(() => s.calls() === 1, 'the call at the Kernel')
    const closing = s.app.close()
    await until(() => s.app.shuttingDown(), 'the shutdown to begin')
    const told = face.notifies ? [{ reconnect: true }] : []
    if (face.notifies) await until(() => s.seen.length > 0, 'the reconnect notification')
    s.ws.send(face.call(2, 'poke'))
    await until(() => s.seen.length > told.length, 'the refusal of the call sent once the shutdown began')
    release()
    await s.closed
    await closing
    t.equal(s.calls(), 1, 'the call sent during the shutdown never reached the Kernel')
    t.same(s.seen, [...told, { id: 2, ok: false, code: 'OVERLOADED' }, { id: 1, ok: true, code: undefined }, { close: 1001 }])
    t.same(await pokes(s.app.audit.store), ['OVERLOADED', 'ok'], 'one audit entry per call, the refused one and the answered one')
  })

  t.test(`${face.path}: a call that hangs at shutdown ends by its timeout, answered, and the close goes on`, async t => {
    const s = await setup(t, face, async () => { await new Promise(() => {}) }, 300)
    s.ws.send(face.call(1, 'poke'))
    await until(() => s.calls() === 1, 'the call at the Kernel')
    await s.app.close()
    await s.closed
    const told = face.notifies ? [{ reconnect: true }] : []
    t.equal(s.seen.length, told.length + 2)
    t.same(s.seen.slice(0, told.length), told)
    t.match(s.seen[told.length], { id: 1, ok: false })
    t.same(s.seen[told.length + 1], { close: 1001 })
    t.equal((await pokes(s.app.audit.store)).length, 1, 'one audit entry')
  })

  // The event loop held past both the call's timeout and the drain's bound (a loaded gateway):
  // both timers are due at once when it runs again. The drain's bound alone was the longest
  // timeout, due a moment after the call's, and closed the socket before the timed-out call's
  // answer went out: the client saw the 1001 close and no answer.
  t.test(`${face.path}: a call that times out while the event loop lags at shutdown is still answered before the close`, async t => {
    const s = await setup(t, face, async () => { await new Promise(() => {}) }, 300)
    s.ws.send(face.call(1, 'poke'))
    await until(() => s.calls() === 1, 'the call at the Kernel')
    const closing = s.app.close()
    await until(() => s.app.shuttingDown(), 'the shutdown to begin')
    // The face's drain has started (its preClose follows the root's within a few turns).
    for (let i = 0; i < 5; i++) await new Promise(resolve => setImmediate(resolve))
    const until500 = Date.now() + 500
    while (Date.now() < until500) { /* the event loop held, as a loaded gateway's is */ }
    await closing
    await s.closed
    const told = face.notifies ? [{ reconnect: true }] : []
    t.same(s.seen, [...told, { id: 1, ok: false, code: 'KERNEL_TIMEOUT' }, { close: 1001 }])
  })
}

// A reload that shortened an operation's timeoutMs, then a shutdown: a call that started before
// the reload runs on the chain it started on, with its old, longer deadline (README, "Changing
// the manifest without a restart"). The drain waited only for the timeouts of the manifest in
// force, closed the socket with 1001 while that call still ran, and its answer was lost (a
// mutation carried out at the Kernel, its client never told). server.ts' grace already kept
// the longest of every manifest applied since start-up; the faces' drains did not.
for (const face of FACES) {
  t.test(`${face.path}: at shutdown after a reload shortened the timeout, a call that started before it is still answered before the close`, async t => {
    const dir = mkdtempSync(join(tmpdir(), 'mantle-drain-reload-'))
    t.teardown(() => rmSync(dir, { recursive: true, force: true }))
    const file = join(dir, 'manifest.yaml')
    const doc = (timeoutMs: number): string => `version: 1
kernel: { url: "http://127.0.0.1:1" }
operations:
  poke: { type: mutation, rest: POST /poke, kernel: POST /poke, output: { type: boolean }, timeoutMs: ${timeoutMs} }
`
    writeFileSync(file, doc(8000))
    let release!: () => void
    const gate = new Promise<void>(resolve => { release = resolve })
    let calls = 0
    const kernel = await startTestKernel(t, { 'POST /poke': async (_req, res) => { calls++; await gate; json(res, 200, true) } })
    const app = await buildApp(testConfig({ ...face.env, BFF_MANIFEST: file }), { logger: false, manifest: await loadManifestFile(file), kernelUrl: kernel.url, manifestSettleMs: 10 })
    t.teardown(() => app.close())
    await app.listen({ port: 0, host: '127.0.0.1' })
    const { port } = app.server.address() as { port: number }
    const ws = new WebSocket(`ws://127.0.0.1:${port}${face.path}?access_token=${token()}`)
    t.teardown(() => ws.terminate())
    await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
    const seen: Array<{ id: unknown, ok: boolean, code?: string } | { close: number }> = []
    ws.on('message', (data) => {
      const frame = JSON.parse(data.toString())
      if (frame.id !== undefined && frame.id !== null) seen.push(face.answer(frame))
    })
    const closed = new Promise<void>(resolve => ws.once('close', (code: number) => { seen.push({ close: code }); resolve() }))
    ws.send(face.call(1, 'poke'))
    await until(() => calls === 1, 'the call at the Kernel')
    writeFileSync(file, doc(100))
    t.same(await app.reloadManifest(), { applied: true, reasons: [] })
    const closing = app.close()
    // Past the drain's bound under the new manifest (100 ms and the answer's margin, 1 s), well
    // within the old one's: the call's own deadline is 8 s.
    await Promise.race([closed, new Promise(resolve => setTimeout(resolve, 3000))])
    release()
    await closed
    await closing
    t.same(seen, [{ id: 1, ok: true, code: undefined }, { close: 1001 }], 'the answer, then the close')
  })
}
