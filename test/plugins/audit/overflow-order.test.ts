import t from 'tap'
import { randomUUID } from 'node:crypto'
import type { AuditEntry, AuditStore } from '../../../plugins/audit/entry.js'
import { Spool } from '../../../plugins/audit/spool.js'
import { AuditWriter } from '../../../plugins/audit/writer.js'
import { until } from '../../helper.js'
import { spoolDir } from './db.js'

function entry (): AuditEntry {
  return { id: randomUUID(), requestId: randomUUID(), timestamp: Date.now(), tenantId: 't1', userId: 'u1', method: 'GET', path: '/api/v1/agents/:id', protocol: 'rest', action: 'getAgent', category: 'read', riskLevel: 'none', status: 'ok', statusCode: 200, durationMs: 1.5, metadata: {} }
}
const quiet = { warn: () => {}, info: () => {}, error: () => {} }

// A store that is up the whole time and records the order entries reach it (the chain order).
function recordingStore (): AuditStore & { stored: AuditEntry[] } {
  const ids = new Set<string>()
  const s = {
    kind: 'postgres' as const,
    stored: [] as AuditEntry[],
    async write (batch: AuditEntry[]) {
      for (const e of batch) {
        if (ids.has(e.id)) continue
        ids.add(e.id)
        s.stored.push(e)
      }
    },
    verify: async () => ({ ok: true, checked: 0, firstBroken: null }),
    query: async () => ({ entries: [], nextSeq: null }),
    prune: async () => 0,
    close: async () => {}
  }
  return s
}

// A full queue goes to the spool at once, but the spool's size grows only once that append is
// fsynced. A flush in between must treat the append on its way as a spool that holds batches and
// send newer entries after it, or they would reach the store (and the chain) before older ones.
t.test('writer: after a full queue goes to the spool, later entries reach the store after it', async t => {
  const store = recordingStore()
  const spool = await Spool.open(spoolDir(t))
  const writer = new AuditWriter({ store, spool, batchSize: 500, queueMax: 20_000, intervalMs: 5, log: quiet })
  const early = Array.from({ length: 20_000 }, () => entry())
  for (const e of early) writer.enqueue(e) // the 20,000th fills the queue: it goes to the spool
  const late = Array.from({ length: 5 }, () => entry())
  for (const e of late) writer.enqueue(e)
  await until(() => store.stored.length === 20_005, 'everything stored', 20_000)
  t.same(store.stored.map(e => e.id), [...early, ...late].map(e => e.id), 'stored in the order enqueued')
  await writer.close()
  await spool.close()
})

// close waits for a full queue still on its way to the spool: an entry enqueued is on disk (or
// stored) before close resolves.
t.test('writer: close resolves only once a full queue on its way to the spool is on disk', async t => {
  const store = recordingStore()
  const spool = await Spool.open(spoolDir(t))
  const writer = new AuditWriter({ store, spool, batchSize: 500, queueMax: 5000, intervalMs: 5, log: quiet })
  for (let i = 0; i < 5000; i++) writer.enqueue(entry())
  t.equal(spool.size, 0, 'the append is not fsynced yet')
  await writer.close()
  t.ok(spool.size > 0, 'on disk once close resolved')
  await spool.close()
})
