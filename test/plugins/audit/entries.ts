// Shared by the audit plugin's tests: an entry to write, and the entries a gateway stored once
// its queue has drained.
import { randomUUID } from 'node:crypto'
import type { FastifyInstance } from 'fastify'
import type { Test } from 'tap'
import type { AuditEntry, AuditStore } from '../../../plugins/audit/entry.js'
import { bearer, drained } from '../../helper.js'

export type Row = Record<string, any>

/** An entry as the gateway builds one for a REST read, with `over` in place. */
export function entry (over: Partial<AuditEntry> = {}): AuditEntry {
  return { id: randomUUID(), requestId: randomUUID(), timestamp: Date.now(), tenantId: 't1', userId: 'u1', method: 'GET', path: '/api/v1/agents/:id', protocol: 'rest', action: 'getAgent', category: 'read', riskLevel: 'none', status: 'ok', statusCode: 200, durationMs: 1.5, metadata: {}, ...over }
}

/** A writer's log that says nothing. */
export const quiet = { warn: () => {}, info: () => {}, error: () => {} }

/** The newest entries (GET /admin/audit, up to 500), `query` appended to its query string. */
export async function entries (app: FastifyInstance, query = ''): Promise<Row[]> {
  await drained(app)
  const res = await app.inject({ method: 'GET', url: '/admin/audit?limit=500' + query, headers: bearer() })
  if (res.statusCode !== 200) throw new Error(res.body)
  return res.json().entries
}

/** A store holding ten entries written one second apart from `base` (the i-th at position i + 1), and ways to tamper with it. */
export interface TenEntries {
  store: AuditStore
  base: number
  named: (i: number) => { id: string, requestId: string }
  /** Changes the status of the entry at `seq`, as someone with write access to the store would. */
  change: (seq: number) => Promise<void>
  /** Removes the entry at `seq`, as someone with write access to the store would. */
  remove: (seq: number) => Promise<void>
}

/**
 * A verify bounded to a few entries per call, resumed with the `next` it answered: the walk goes
 * on at the seam as one walk would, and a break there is reported at the entry a single walk of
 * the store as it is now reports. The same for every store.
 */
export async function resumedVerifies (t: Test, ten: () => Promise<TenEntries>): Promise<void> {
  t.test('a bounded call answers how far it got and where to go on; resumed, the calls add up to one walk', async t => {
    const { store, base } = await ten()
    const first = await store.verify({}, { limit: 4 })
    t.same(first, { ok: true, checked: 4, firstBroken: null, next: { seq: 5, hash: first.next?.hash, end: 10 }, through: 4 })
    t.match(first.next?.hash, /^[0-9a-f]{64}$/)
    const second = await store.verify({}, { next: first.next, limit: 4 })
    t.match(second, { ok: true, checked: 4, next: { seq: 9, end: 10 }, through: 8 })
    t.same(await store.verify({}, { next: second.next, limit: 4 }), { ok: true, checked: 2, firstBroken: null }, 'the last call: no next')
    // A range's end travels in the cursor: entries after it are not walked by the resumed call.
    const ranged = await store.verify({ to: new Date(base + 6000) }, { limit: 4 })
    t.match(ranged, { ok: true, checked: 4, next: { seq: 5, end: 7 } })
    t.same(await store.verify({}, { next: ranged.next }), { ok: true, checked: 3, firstBroken: null })
    t.same(await store.verify({}), { ok: true, checked: 10, firstBroken: null }, 'unbounded (below the most per call): one call, as before')
  })

  t.test('resumed: a row changed right after the seam is found there', async t => {
    const { store, named, change } = await ten()
    const first = await store.verify({}, { limit: 4 })
    await change(5)
    const fresh = await store.verify({})
    t.same(fresh.firstBroken, named(4), 'one walk of the store as it is now')
    t.same(await store.verify({}, { next: first.next }), { ok: false, checked: 1, firstBroken: named(4) })
  })

  t.test('resumed: a row deleted at the seam, after it or the last one walked, is found where one walk finds it', async t => {
    for (const [seq, name] of [[5, 'the first entry after the seam'], [4, 'the last entry walked']] as const) {
      const { store, named, remove } = await ten()
      const first = await store.verify({}, { limit: 4 })
      t.match(first, { ok: true, next: { seq: 5 } }, 'the first call stops at the seam')
      await remove(seq)
      t.same((await store.verify({})).firstBroken, named(seq), `${name}: one walk reports the entry after the gap`)
      t.match(await store.verify({}, { next: first.next }), { ok: false, firstBroken: named(seq) }, `${name}: so does the resumed call`)
    }
  })

  t.test('resumed: a position retention removed meanwhile is skipped, and the answer says how many', async t => {
    const { store, base } = await ten()
    const first = await store.verify({}, { limit: 4 })
    // Entries written (and stamped) one second apart: those written before base + 5.5 s.
    t.equal(await store.prune(Date.now() - (base + 5500), 100), 6, 'the 1st to the 6th entries removed')
    t.same(await store.verify({}, { next: first.next }), { ok: true, checked: 4, firstBroken: null, skipped: 2 }, 'the 5th and 6th skipped, the rest walked from the new anchor')
  })

  t.test('a verify whose caller left stops', async t => {
    const { store } = await ten()
    const left = new AbortController()
    left.abort()
    await t.rejects(store.verify({}, { signal: left.signal }), { name: 'AbortError' })
  })
}
