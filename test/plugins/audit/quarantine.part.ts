// A batch PostgreSQL refuses for its own data (SQLSTATE class 22) must not hold the spool: its
// refused entries go to the quarantine file, the others are stored in order, the writer goes on.
import t from 'tap'
import { randomUUID } from 'node:crypto'
import { existsSync, mkdirSync, readFileSync, rmdirSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import type { AuditEntry, AuditStore } from '../../../plugins/audit/entry.js'
import { PostgresAuditStore } from '../../../plugins/audit/postgres-store.js'
import { MemoryAuditStore } from '../../../plugins/audit/memory-store.js'
import { Spool, SPOOL_FILE, QUARANTINE_FILE } from '../../../plugins/audit/spool.js'
import { AuditWriter, type WriterHooks } from '../../../plugins/audit/writer.js'
import { buildApp } from '../../../app.js'
import { testConfig, bearer, until, closedPort } from '../../helper.js'
import { postgresAvailable, createTestDatabase, databaseUrl, sql, spoolDir, pgStore, storedIds } from './db.js'
import { entries, entry } from './entries.js'

interface Teardown { teardown: (fn: () => unknown) => void }

/** `store` whose `n`th write waits until `release` (set once it waits) is called. */
function holding (store: PostgresAuditStore, n: number): { store: AuditStore, release: (() => void) | null } {
  let writes = 0
  const held: { store: AuditStore, release: (() => void) | null } = {
    release: null,
    store: {
      kind: 'postgres',
      write: async batch => {
        if (++writes === n) await new Promise<void>(resolve => { held.release = resolve })
        return await store.write(batch)
      },
      refuses: err => store.refuses(err),
      verify: async range => await store.verify(range),
      query: async q => await store.query(q),
      prune: async (ageMs, limit) => await store.prune(ageMs, limit),
      close: async () => {}
    }
  }
  return held
}

/** A writer on `store` and a spool of its own, counting what its hooks report. */
async function writerOn (t: Teardown, store: AuditStore, batchSize = 10, dir = spoolDir(t)): Promise<{ writer: AuditWriter, spool: Spool, dir: string, counts: Record<string, number>, errors: Array<{ obj: Record<string, unknown>, msg: string }> }> {
  const spool = await Spool.open(dir)
  const counts: Record<string, number> = { stored: 0, spooled: 0, replayed: 0, failed: 0, quarantined: 0, found: 0 }
  const errors: Array<{ obj: Record<string, unknown>, msg: string }> = []
  const hooks: WriterHooks = {
    stored: n => { counts.stored += n },
    spooled: n => { counts.spooled += n },
    replayed: n => { counts.replayed += n },
    found: n => { counts.found += n },
    failed: () => { counts.failed++ },
    quarantined: n => { counts.quarantined += n }
  }
  const log = { warn: () => {}, info: () => {}, error: (obj: object, msg: string) => { errors.push({ obj: obj as Record<string, unknown>, msg }) } }
  const writer = new AuditWriter({ store, spool, batchSize, queueMax: 1000, intervalMs: 5, log, hooks })
  t.teardown(async () => { await writer.close(); await spool.close() })
  return { writer, spool, dir, counts, errors }
}

interface QuarantineLine { time: string, sqlstate: string, error: string, entry: AuditEntry }
function quarantined (dir: string): QuarantineLine[] {
  const file = join(dir, QUARANTINE_FILE)
  if (!existsSync(file)) return []
  return readFileSync(file, 'utf8').split('\n').filter(l => l !== '').map(l => JSON.parse(l) as QuarantineLine)
}

t.test('quarantine file: appended line by line; a line torn by a crash stays on a line of its own', async t => {
  const dir = spoolDir(t)
  writeFileSync(join(dir, QUARANTINE_FILE), '{"time":"2020-01-01T00:00:00.000Z","sqlstate":"22021","error":"x","entry":{"id":"a"}}\n{"time":"2020-')
  const spool = await Spool.open(dir)
  t.teardown(() => spool.close())
  const e = entry({ userId: 'a\u0000b' })
  await spool.quarantine.append([{ time: new Date().toISOString(), sqlstate: '22021', error: 'invalid byte sequence', entry: e }])
  const lines = readFileSync(join(dir, QUARANTINE_FILE), 'utf8').split('\n')
  t.equal(lines.length, 4)
  t.equal(lines[1], '{"time":"2020-', 'the torn line left as it was')
  t.same(JSON.parse(lines[2]).entry, e)
  t.equal(lines[3], '')
  t.equal(spool.size, 0, 'the spool is not touched')
})

const available = await postgresAvailable()
if (!available) t.comment('PostgreSQL is not reachable on 127.0.0.1:5432: skipped (CI fails instead)')

if (available) {
  t.test('a lone surrogate in a text column is stored as U+FFFD, and the chain still verifies', async t => {
    // Not a refusal: PostgreSQL stores the text, with U+FFFD in its place (UTF-8 has no form for
    // a lone surrogate). The hash covers the same, so verify does not report the entry as changed.
    const { url, store } = await pgStore(t)
    const odd = entry({ userId: 'u\ud800x', tenantId: 't\udfff', status: 'ok' })
    // A backslash before "ud", as text: the hash looks at it again and finds nothing to change.
    const backslash = entry({ userId: 'u\\ud800x' })
    await store.write([entry(), odd, backslash])
    const rows = await sql<{ user_id: string, tenant_id: string }>(url, 'SELECT user_id, tenant_id FROM bff_audit_entries ORDER BY seq')
    t.same(rows[1], { user_id: 'u\ufffdx', tenant_id: 't\ufffd' })
    t.equal(rows[2].user_id, 'u\\ud800x', 'stored as given')
    t.same(await store.verify({}), { ok: true, checked: 3, firstBroken: null })
    const memory = new MemoryAuditStore({ max: 10 })
    await memory.write([entry(), odd])
    t.same(await memory.verify({}), { ok: true, checked: 2, firstBroken: null }, 'the memory store, which keeps the text as given, agrees')
  })

  t.test('live path: a refused entry is quarantined, the good ones around it are stored in order and the store stays up', async t => {
    const { url, store } = await pgStore(t)
    const { writer, spool, dir, counts, errors } = await writerOn(t, store)
    const batch = [entry(), entry({ userId: 'a\u0000b' }), entry()]
    for (const e of batch) writer.enqueue(e)
    await until(() => counts.quarantined === 1 && counts.stored === 2, 'the batch isolated')
    t.same(await storedIds(url), [batch[0].id, batch[2].id], 'the good entries, in order')
    t.same(await store.verify({}), { ok: true, checked: 2, firstBroken: null })
    const lines = quarantined(dir)
    t.equal(lines.length, 1)
    t.same(lines[0].entry, batch[1], 'the entry as it was, NUL and all')
    t.equal(lines[0].sqlstate, '22021')
    t.match(lines[0].error, /0x00/)
    t.ok(Math.abs(Date.parse(lines[0].time) - Date.now()) < 60_000, 'when')
    t.equal(spool.size, 0, 'nothing spooled')
    t.equal(statSync(join(dir, SPOOL_FILE)).size, 0)
    t.equal(counts.spooled, 0)
    t.equal(writer.up, true)
    t.equal(writer.error, null)
    t.match(errors, [{ obj: { entries: 1, sqlstate: '22021' } }], 'one error line naming the count and the SQLSTATE')

    // Later entries are stored as usual, after the chain's head.
    const later = entry()
    writer.enqueue(later)
    await until(() => counts.stored === 3, 'a later entry stored')
    t.same(await storedIds(url), [batch[0].id, batch[2].id, later.id])
    t.same(await store.verify({}), { ok: true, checked: 3, firstBroken: null })
  })

  t.test('the store says which errors are the batch\'s own: data exceptions, not connection failures', async t => {
    const { store } = await pgStore(t)
    const refusal = await store.write([entry({ userId: 'a\u0000b' })]).then(() => null, (err: unknown) => err)
    t.equal((refusal as { code?: string }).code, '22021')
    t.equal(store.refuses(refusal), true)
    const away = new PostgresAuditStore({ databaseUrl: databaseUrl('test', await closedPort()), connectTimeoutMs: 300 })
    t.teardown(() => away.close())
    const down = await away.write([entry()]).then(() => null, (err: unknown) => err)
    t.ok(down instanceof Error)
    t.equal(store.refuses(down), false)
    t.equal(store.refuses(Object.assign(new Error('unique'), { code: '23505' })), false, 'integrity is not the batch\'s own in general')
    t.equal(store.refuses(Object.assign(new Error('deadlock'), { code: '40P01' })), false)
    t.equal(store.refuses(Object.assign(new Error('admin shutdown'), { code: '57P01' })), false)
    t.equal(store.refuses(new Error('Query read timeout')), false)
  })

  t.test('replay path: a refused entry in the spool is quarantined and no longer holds the batches behind it', async t => {
    const { url, store } = await pgStore(t)
    const dir = spoolDir(t)
    // Written while PostgreSQL was away (a spool left by an earlier process).
    const before = await Spool.open(dir)
    const first = [entry(), entry({ userId: 'a\u0000b' }), entry()]
    const second = [entry(), entry()]
    await before.append(first)
    await before.append(second)
    await before.close()

    const spool = await Spool.open(dir)
    const counts = { quarantined: 0, replayed: 0, stored: 0 }
    const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 1000, intervalMs: 5, log: { warn: () => {}, info: () => {}, error: () => {} }, hooks: { replayed: n => { counts.replayed += n }, stored: n => { counts.stored += n }, quarantined: n => { counts.quarantined += n } } })
    t.teardown(async () => { await writer.close(); await spool.close() })
    const live = entry()
    writer.enqueue(live)
    await until(() => spool.size === 0 && counts.stored === 1, 'the spool replayed and the live entry stored')
    t.same(await storedIds(url), [first[0].id, first[2].id, ...second.map(e => e.id), live.id], 'in order, the refused entry left out')
    t.same(await store.verify({}), { ok: true, checked: 5, firstBroken: null })
    const lines = quarantined(dir)
    t.equal(lines.length, 1)
    t.equal(lines[0].entry.id, first[1].id)
    t.equal(lines[0].sqlstate, '22021')
    t.equal(counts.quarantined, 1)
    t.equal(counts.replayed, 4, 'replayed counts what was stored')
    t.equal(writer.up, true)
  })

  t.test('metadata jsonb refuses (a NUL escape, a lone surrogate) is quarantined; a large batch keeps its order', async t => {
    const { url, store } = await pgStore(t)
    const { writer, dir, counts, errors } = await writerOn(t, store, 50)
    const batch = Array.from({ length: 40 }, () => entry())
    batch[0] = entry({ metadata: { cache: 'a\u0000b' } })
    batch[17] = entry({ metadata: { note: '\ud800' } })
    batch[18] = entry({ path: '/x\u0000' })
    batch[39] = entry({ metadata: { deep: [{ v: '\u0000' }] } })
    for (const e of batch) writer.enqueue(e)
    await until(() => counts.quarantined === 4 && counts.stored === 36, 'the batch isolated')
    const bad = new Set([0, 17, 18, 39])
    t.same(await storedIds(url), batch.filter((_, i) => !bad.has(i)).map(e => e.id), 'the good entries, in order')
    t.same(await store.verify({}), { ok: true, checked: 36, firstBroken: null })
    const lines = quarantined(dir)
    t.same(lines.map(l => l.entry.id), [0, 17, 18, 39].map(i => batch[i].id), 'quarantined in order')
    t.same(lines.map(l => l.sqlstate), ['22P05', '22P02', '22021', '22P05'])
    t.same(lines[0].entry.metadata, { cache: 'a\u0000b' })
    t.same(lines[1].entry.metadata, { note: '\ud800' }, 'the lone surrogate kept (JSON escapes it)')
    t.equal(writer.up, true)
    t.equal(counts.spooled, 0)
    t.equal(errors.reduce((n, e) => n + (e.obj.entries as number), 0), 4, 'the error lines count every quarantined entry')
  })

  t.test('a store that is away still spools, whole and in order, and quarantines nothing', async t => {
    const store = new PostgresAuditStore({ databaseUrl: databaseUrl('test', await closedPort()), connectTimeoutMs: 300 })
    t.teardown(() => store.close())
    const { writer, spool, dir, counts } = await writerOn(t, store)
    const batch = [entry(), entry({ userId: 'a\u0000b' }), entry()]
    for (const e of batch) writer.enqueue(e)
    await until(() => spool.size > 0 && writer.depth === 0, 'the batch spooled')
    t.equal(writer.up, false)
    t.equal(counts.quarantined, 0)
    t.equal(counts.spooled, 3)
    t.notOk(existsSync(join(dir, QUARANTINE_FILE)), 'no quarantine file')
    await writer.close()
    const seen: string[] = []
    await spool.drain(async b => { seen.push(...b.map(e => e.id)) })
    t.same(seen, batch.map(e => e.id), 'the whole batch in the spool, in order')
    t.equal(store.refuses(new Error('connect ECONNREFUSED')), false)
  })

  // Writes of a batch [good, refused, good, good]: 1 the batch (refused), 2 its left half
  // (refused), 3 the first entry, 4 the refused one (quarantined), 5 the right half.
  const midway = [
    { name: 'live path, before anything is stored', replay: false, awayAt: 2, before: { stored: [], quarantined: 0 } },
    { name: 'live path, after an entry is quarantined', replay: false, awayAt: 5, before: { stored: [0], quarantined: 1 } },
    { name: 'replay path, after an entry is quarantined', replay: true, awayAt: 5, before: { stored: [0], quarantined: 1 } }
  ]
  for (const c of midway) {
    t.test(`the store goes away midway through isolation (${c.name}): the rest waits in the spool, in order, and is isolated once it is back; nothing is quarantined twice`, async t => {
      const { url, store: pgs } = await pgStore(t)
      // The real store, but from its write number `awayAt` on every write fails as a connection
      // would, until `away` is cleared.
      const state = { away: false, writes: 0 }
      const store: AuditStore = {
        kind: 'postgres',
        write: async batch => {
          if (++state.writes === c.awayAt) state.away = true
          if (state.away) throw Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:5432'), { code: 'ECONNREFUSED' })
          return await pgs.write(batch)
        },
        refuses: err => pgs.refuses(err),
        verify: async range => await pgs.verify(range),
        query: async q => await pgs.query(q),
        prune: async (ageMs, limit) => await pgs.prune(ageMs, limit),
        close: async () => {}
      }
      const batch = [entry(), entry({ userId: 'a\u0000b' }), entry(), entry()]
      const dir = spoolDir(t)
      if (c.replay) {
        const earlier = await Spool.open(dir)
        await earlier.append(batch)
        await earlier.close()
      }
      const { writer, spool, counts } = await writerOn(t, store, 10, dir)
      if (!c.replay) for (const e of batch) writer.enqueue(e)
      await until(() => state.away && spool.size > 0 && writer.depth === 0 && !writer.up, 'the store away, the rest spooled')
      t.equal(state.writes, c.awayAt)
      t.same(await storedIds(url), c.before.stored.map(i => batch[i].id))
      t.equal(counts.quarantined, c.before.quarantined)
      t.equal(quarantined(dir).length, c.before.quarantined)
      const queued = entry()
      writer.enqueue(queued)
      await until(() => writer.depth === 0, 'the next entry follows into the spool')
      t.same(await storedIds(url), c.before.stored.map(i => batch[i].id), 'not before the spool')
      state.away = false
      await until(() => spool.size === 0 && counts.quarantined === 1 && writer.up, 'the spool replayed', 10_000)
      t.same(await storedIds(url), [batch[0].id, batch[2].id, batch[3].id, queued.id], 'in order, each once')
      t.same(quarantined(dir).map(l => l.entry.id), [batch[1].id], 'quarantined once')
      t.same(await pgs.verify({}), { ok: true, checked: 4, firstBroken: null })
      // The entries an isolation stored before the store went away were counted then: the
      // replay of the rest finds none stored that no count said was.
      t.equal(counts.stored + counts.replayed, 4, 'each stored entry counted once, stored or replayed')
      t.equal(counts.found, 0, 'none found stored uncounted')
    })
  }

  t.test('a full queue takes the batch being isolated to the spool after an entry of it was quarantined: the replay does not quarantine it again', async t => {
    const { url, store: pgs } = await pgStore(t)
    // Writes of [good, refused, good, good]: 1 the batch, 2 its left half, 3 the first entry, 4
    // the refused one (quarantined), 5 the right half, held until a full queue took the batch.
    const held = holding(pgs, 5)
    const store = held.store
    const dir = spoolDir(t)
    const spool = await Spool.open(dir)
    const counts = { quarantined: 0, stored: 0, replayed: 0 }
    const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 5, intervalMs: 5, log: { warn: () => {}, info: () => {}, error: () => {} }, hooks: { quarantined: n => { counts.quarantined += n }, stored: n => { counts.stored += n }, found: n => { counts.stored += n }, replayed: n => { counts.replayed += n } } })
    t.teardown(async () => { await writer.close(); await spool.close() })
    const batch = [entry(), entry({ userId: 'a\u0000b' }), entry(), entry()]
    for (const e of batch) writer.enqueue(e)
    await until(() => held.release !== null, 'the refused entry quarantined, the right half being written')
    t.equal(quarantined(dir).length, 1)
    const full = Array.from({ length: 5 }, () => entry())
    for (const e of full) writer.enqueue(e)
    await until(() => spool.size > 0, 'the full queue on disk, the batch being isolated ahead of it')
    held.release!()
    await until(() => spool.size === 0 && counts.replayed === full.length && writer.depth === 0 && !writer.writing, 'the spool replayed')
    t.same(await storedIds(url), [batch[0], batch[2], batch[3], ...full].map(e => e.id), 'in order, each once')
    t.same(quarantined(dir).map(l => l.entry.id), [batch[1].id], 'quarantined once')
    t.equal(counts.quarantined, 1)
    // `found` counted stored, as the gateway's hooks do: the copy's replay finds none it did not count.
    t.same(counts, { quarantined: 1, stored: 3, replayed: full.length }, 'each entry counted once: the three its isolation stored, not again by the replay of the copy')
    t.same(await pgs.verify({}), { ok: true, checked: 8, firstBroken: null })
  })

  t.test('a full queue takes the batch being isolated, the disk refuses it, and it comes back to the queue: its entries quarantined meanwhile are not quarantined again', async t => {
    const { url, store: pgs } = await pgStore(t)
    // Writes of [good, good, refused, refused]: 1 the batch, 2 its left half, 3 the right half,
    // 4 the first refused one, held until a full queue took the batch and the disk refused it.
    const held = holding(pgs, 4)
    const store = held.store
    const dir = spoolDir(t)
    const spool = await Spool.open(dir)
    const append = spool.appendMany.bind(spool)
    let refusals = 0
    spool.appendMany = async (batches) => { if (refusals++ === 0) throw new Error('no space left on device'); await append(batches) }
    const counts = { quarantined: 0, stored: 0 }
    const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 5, intervalMs: 5, log: { warn: () => {}, info: () => {}, error: () => {} }, hooks: { quarantined: n => { counts.quarantined += n }, stored: n => { counts.stored += n } } })
    t.teardown(async () => { await writer.close(); await spool.close() })
    const batch = [entry(), entry(), entry({ userId: 'a\u0000b' }), entry({ userId: 'c\u0000d' })]
    for (const e of batch) writer.enqueue(e)
    await until(() => held.release !== null, 'the first refused entry being written alone')
    const full = Array.from({ length: 5 }, () => entry())
    for (const e of full) writer.enqueue(e)
    await until(() => refusals === 1, 'the full queue and the batch ahead of it refused by the disk')
    held.release!()
    await until(() => counts.stored === 2 + full.length && writer.depth === 0 && !writer.writing, 'everything stored')
    t.same(await storedIds(url), [batch[0], batch[1], ...full].map(e => e.id), 'in order, each once')
    t.same(quarantined(dir).map(l => l.entry.id), [batch[2].id, batch[3].id], 'each quarantined once')
    t.equal(counts.quarantined, 2)
  })

  // Once a copy of the batch being isolated went to the spool (taken by close, which stopped
  // waiting for the store, or by a full queue), isolation went on and quarantined the rest of its
  // refused entries; the ids set aside live in memory only, so the next process's replay of the
  // copy quarantined them again: two lines for one entry in the file an operator reads. Now the
  // copy's replay isolates what is left, once.
  for (const takenBy of ['close', 'a full queue'] as const) {
    t.test(`the batch being isolated taken to the spool by ${takenBy}: the next process's replay quarantines none of its entries a second time`, async t => {
      const { url, store: pgs } = await pgStore(t)
      const batch = [entry(), entry({ userId: 'a\u0000b' }), entry(), entry({ userId: 'c\u0000d' })]
      const full = Array.from({ length: 5 }, () => entry())
      const fullIds = new Set(full.map(e => e.id))
      // Writes of the batch: 1 whole, 2 its left half, 3 its first entry, 4 the first refused one
      // (quarantined), 5 the right half, held until the batch was taken. A write holding an entry
      // of the full queue (the replay of the spool) fails as PostgreSQL gone would: the spool is
      // left to the next process.
      const held = holding(pgs, 5)
      const store: AuditStore = {
        ...held.store,
        write: async b => {
          if (b.some(e => fullIds.has(e.id))) throw Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:5432'), { code: 'ECONNREFUSED' })
          return await held.store.write(b)
        }
      }
      const dir = spoolDir(t)
      const spool = await Spool.open(dir)
      const quiet = { warn: () => {}, info: () => {}, error: () => {} }
      const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 5, intervalMs: 5, closeTimeoutMs: 50, log: quiet })
      for (const e of batch) writer.enqueue(e)
      await until(() => held.release !== null, 'the right half being written')
      t.same(quarantined(dir).map(l => l.entry.id), [batch[1].id], 'the first refused entry quarantined')
      if (takenBy === 'close') {
        await writer.close()
        held.release!()
        await until(() => !writer.writing, 'the write in flight ended')
      } else {
        for (const e of full) writer.enqueue(e)
        await until(() => spool.size > 0, 'the full queue on disk, the batch being isolated ahead of it')
        held.release!()
        await until(() => !writer.writing && writer.depth === 0, 'the isolation ended')
        await writer.close()
      }
      await spool.close()
      // The next process, PostgreSQL answering.
      const next = await writerOn(t, pgs, 10, dir)
      await until(() => next.spool.size === 0 && !next.writer.writing, 'the spool replayed')
      t.same(quarantined(dir).map(l => l.entry.id), [batch[1].id, batch[3].id], 'each refused entry quarantined once')
      t.same(await storedIds(url), [batch[0], batch[2], ...(takenBy === 'close' ? [] : full)].map(e => e.id), 'the others stored in order, each once')
      t.same(await pgs.verify({}), { ok: true, checked: takenBy === 'close' ? 2 : 7, firstBroken: null })
    })
  }

  t.test('a quarantine file that cannot be written: the entries stay in the spool until it can, none is dropped', async t => {
    const { url, store } = await pgStore(t)
    const { writer, spool, dir, counts } = await writerOn(t, store)
    // A directory where the file should be: every append to it fails.
    mkdirSync(join(dir, QUARANTINE_FILE))
    const batch = [entry(), entry({ userId: 'a\u0000b' }), entry()]
    for (const e of batch) writer.enqueue(e)
    await until(() => spool.size > 0 && writer.depth === 0, 'the refused entry and the rest spooled')
    t.equal(writer.up, false)
    const queued = entry()
    writer.enqueue(queued)
    await new Promise(resolve => setTimeout(resolve, 300))
    t.equal(counts.quarantined, 0)
    t.ok(spool.size > 0, 'still spooled while the quarantine cannot be written')
    rmdirSync(join(dir, QUARANTINE_FILE))
    await until(() => spool.size === 0 && counts.quarantined === 1 && writer.up, 'the spool replayed', 10_000)
    t.same(await storedIds(url), [batch[0].id, batch[2].id, queued.id], 'in order, each once')
    t.same(quarantined(dir).map(l => l.entry.id), [batch[1].id])
    t.same(await store.verify({}), { ok: true, checked: 3, firstBroken: null })
  })

  t.test('gateway: the quarantined count is in /metrics and /diagz, and the error is logged', async t => {
    const url = databaseUrl(await createTestDatabase(t, { migrated: true }))
    const dir = spoolDir(t)
    const lines: string[] = []
    const app = await buildApp(testConfig({ LOG_LEVEL: 'warn', BFF_AUDIT_STORE: 'postgres', DATABASE_URL: url, BFF_AUDIT_SPOOL_DIR: dir }),
      { logger: undefined, logStream: { write: (line: string) => { lines.push(line) } } })
    t.teardown(() => app.close())
    await app.ready()
    const good = entry({ requestId: `q-${randomUUID()}` })
    // A time before PostgreSQL's first (4713 BC): its timestamptz refuses it (22008). A NUL in a
    // text no longer is one: the gateway stores it as U+FFFD (storableEntry).
    const bad = entry({ requestId: `q-${randomUUID()}`, timestamp: -300_000_000_000_000 })
    app.audit.enqueue(good)
    app.audit.enqueue(bad)
    await until(() => quarantined(dir).length === 1, 'the refused entry quarantined')
    t.match(await entries(app, `&requestId=${good.requestId}`), [{ id: good.id }], 'the good entry stored')
    t.match((await app.inject({ method: 'GET', url: '/metrics' })).body, /mantle_audit_quarantined_total 1\b/)
    const diagz = (await app.inject({ method: 'GET', url: '/diagz', headers: bearer() })).json()
    t.match(diagz.audit, { up: true, spoolBytes: 0, quarantined: 1 })
    t.match(diagz.stores.audit, { healthy: true })
    const logged = lines.map(l => JSON.parse(l) as Record<string, unknown>).filter(l => l.sqlstate === '22008')
    t.match(logged, [{ level: 50, entries: 1, sqlstate: '22008' }])
  })
}
