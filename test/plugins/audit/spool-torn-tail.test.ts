import t from 'tap'
import { randomUUID } from 'node:crypto'
import { appendFileSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import type { AuditEntry } from '../../../plugins/audit/entry.js'
import { Spool, SPOOL_FILE } from '../../../plugins/audit/spool.js'
import { spoolDir } from './db.js'

function entry (): AuditEntry {
  return { id: randomUUID(), requestId: randomUUID(), timestamp: Date.now(), tenantId: 't1', userId: 'u1', method: 'GET', path: '/api/v1/agents/:id', protocol: 'rest', action: 'getAgent', category: 'read', riskLevel: 'none', status: 'ok', statusCode: 200, durationMs: 1.5, metadata: {} }
}

// With BFF_AUDIT_BATCH_SIZE up to 10,000, the spool line of one batch is several MB, and a crash
// mid-append can leave a torn last line longer than the 1 MiB window the spool reads at a time.
// Opening the spool must still find the last newline and cut the torn line, or the next batch
// would be appended to it, fail its checksum with it and be lost although it was acknowledged.
function tornLine (bytes: number): string {
  const big = Array.from({ length: 5000 }, () => entry())
  return `{"n":5000,"sum":"x","entries":${JSON.stringify(big)}}`.slice(0, bytes)
}

t.test('spool: a torn last line longer than the read window is cut; the batch acknowledged after the restart is replayed', async t => {
  const dir = spoolDir(t)
  const first = await Spool.open(dir)
  const before = [entry()]
  await first.append(before)
  await first.close()
  const intact = statSync(join(dir, SPOOL_FILE)).size
  appendFileSync(join(dir, SPOOL_FILE), tornLine(1_500_000))

  const spool = await Spool.open(dir)
  t.equal(statSync(join(dir, SPOOL_FILE)).size, intact, 'cut at the end of the last whole line')
  t.equal(spool.corrupt, 1, 'the torn line is counted')
  const after = [entry()]
  await spool.append(after)
  const seen: AuditEntry[] = []
  await spool.drain(async batch => { seen.push(...batch) })
  t.same(seen.map(e => e.id), [...before, ...after].map(e => e.id), 'both batches replayed, in order')
  await spool.close()
})

t.test('spool: a file that is one torn line longer than the read window is cut whole', async t => {
  const dir = spoolDir(t)
  writeFileSync(join(dir, SPOOL_FILE), tornLine(2_500_000))
  const spool = await Spool.open(dir)
  t.equal(statSync(join(dir, SPOOL_FILE)).size, 0)
  t.equal(spool.corrupt, 1)
  const after = [entry()]
  await spool.append(after)
  const seen: AuditEntry[] = []
  await spool.drain(async batch => { seen.push(...batch) })
  t.same(seen.map(e => e.id), after.map(e => e.id))
  await spool.close()
})
