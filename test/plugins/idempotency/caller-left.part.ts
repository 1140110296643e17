import t from 'tap'
import { request as httpRequest, type ClientRequest } from 'node:http'
import type { AddressInfo } from 'node:net'
import WebSocket from 'ws'
import { drained, token, until } from '../../helper.js'
import { storeReads } from './store-reads.js'
import { idemSetup, STORES, type IdemSetup } from './idempotency-helper.js'

// A repeat waiting for the first call with its Idempotency-Key stops waiting at once when its
// client leaves (README, "Clients that leave"): before, it polled the store until the first call
// ended or its wait (by default the op's timeout) ran out.

// Every read of the stores a waiting repeat makes (one per poll), to know that it waits.
const claims = storeReads

const pause = async (ms: number): Promise<void> => { await new Promise(resolve => setTimeout(resolve, ms)) }

async function auditOf (s: IdemSetup, requestId: string): Promise<Array<{ status: string, statusCode: number }>> {
  await drained(s.app)
  const res = await s.app.inject({ url: `/admin/audit?requestId=${requestId}`, headers: s.headers(undefined, s.tenant) })
  return res.json().entries
}

for (const store of STORES) {
  t.test(`${store}: a waiting repeat stops polling when its client leaves`, async t => {
    const s = await idemSetup(t, store)
    await s.app.listen({ port: 0, host: '127.0.0.1' })
    const port = (s.app.server.address() as AddressInfo).port
    const key = 'left-' + store
    const gate = s.hold()
    const first = s.create({ name: 'a' }, key)
    await until(() => s.calls() === 1, 'the first call to reach the Kernel')

    // Over HTTP: the repeat's request closes.
    const before = claims()
    const req: ClientRequest = httpRequest({ port, method: 'POST', path: '/api/v1/items', headers: { ...s.headers(key), 'content-type': 'application/json', 'x-request-id': 'repeat-http-' + store } })
    req.on('error', () => {})
    req.end(JSON.stringify({ name: 'a' }))
    await until(() => claims() - before >= 3, 'the repeat to poll')
    req.destroy()
    await pause(50)
    const atLeave = claims()
    await pause(600)
    t.equal(claims(), atLeave, 'HTTP: no store read after the client left (the wait would last 10 s)')

    // Over /ws: the socket closes.
    const ws = new WebSocket(`ws://127.0.0.1:${port}/ws?access_token=${token({ tenant: s.tenant })}`)
    await new Promise(resolve => ws.once('open', resolve))
    const wsBefore = claims()
    ws.send(JSON.stringify({ id: '1', op: 'createItem', input: { name: 'a' }, idempotencyKey: key }))
    await until(() => claims() - wsBefore >= 3, 'the WebSocket repeat to poll')
    ws.close()
    await pause(50)
    const atClose = claims()
    await pause(600)
    t.equal(claims(), atClose, 'WebSocket: no store read after the socket closed')

    t.match(await auditOf(s, 'repeat-http-' + store), [{ status: 'CLIENT_CLOSED', statusCode: 499 }], 'the repeat ends CLIENT_CLOSED')
    gate.open()
    t.equal((await first).statusCode, 201, 'the first call is let finish')
    t.equal(s.calls(), 1, 'one Kernel call')
    const repeat = await s.create({ name: 'a' }, key)
    t.equal(repeat.headers['idempotent-replayed'], 'true', 'a later repeat is replayed')
  })
}
