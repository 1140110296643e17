import t, { type Test } from 'tap'
import { createHash } from 'node:crypto'
import { appendFileSync, chownSync, truncateSync, lchownSync, existsSync, mkdirSync, readFileSync, readlinkSync, renameSync, rmSync, statSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs'
import { hostname } from 'node:os'
import { join } from 'node:path'
import type { FileHandle } from 'node:fs/promises'
import { categoryOf, hashEntry, isoTime, storableEntry, GENESIS, VERIFY_MAX_ENTRIES, type AuditEntry, type AuditStore, type StoredEntry } from '../../../plugins/audit/entry.js'
import { canonicalJson as canonical } from '../../../plugins/pipeline/index.js'
import { MemoryAuditStore } from '../../../plugins/audit/memory-store.js'
import { Spool, SpoolInUseError, SPOOL_FILE, SPOOL_LIMITS, type QuarantineRecord } from '../../../plugins/audit/spool.js'
import { numbersAsWritten } from '../../../plugins/audit/postgres-store.js'
import { AuditWriter, type WriterHooks } from '../../../plugins/audit/writer.js'
import { uuidv7 as entryId } from '../../../ids.js'
import { until } from '../../helper.js'
import { spoolDir } from './db.js'
import { entry, quiet, resumedVerifies } from './entries.js'

t.test('categories: identity refusals are auth, blocks, limits and high risk are security, the rest read or write', async t => {
  t.equal(categoryOf('query', null, 'none'), 'read')
  t.equal(categoryOf('mutation', null, 'low'), 'write')
  t.equal(categoryOf('mutation', 'KERNEL_ERROR', 'none'), 'write')
  t.equal(categoryOf('query', 'UNAUTHENTICATED', 'none'), 'auth')
  t.equal(categoryOf('mutation', 'FORBIDDEN', 'none'), 'auth')
  t.equal(categoryOf('mutation', 'FIREWALL_BLOCKED', 'critical'), 'security')
  t.equal(categoryOf('query', 'RATE_LIMITED', 'none'), 'security')
  t.equal(categoryOf('mutation', null, 'high'), 'security', 'monitored high-risk input')
})

t.test('entry ids: UUIDv7, the time in ms in the first 48 bits, random after', async t => {
  const V7 = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/
  for (const ms of [0, 1, 255, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 12345, 1_796_000_000_000, 2 ** 48 - 1]) {
    const id = entryId(ms)
    t.match(id, V7, `${ms}: version 7, RFC 9562 variant`)
    t.equal(parseInt(id.slice(0, 8) + id.slice(9, 13), 16), ms, `${ms}: the time, read back`)
  }
  const same = new Set(Array.from({ length: 1000 }, () => entryId(1_796_000_000_000)))
  t.equal(same.size, 1000, 'ids of one millisecond differ (across several draws of random bytes)')
  // Every random digit takes its values: none is stuck at a constant (a slice off by one would be).
  const digits = (at: number): Set<string> => new Set([...same].map(id => id[at]))
  t.same([...digits(19)].sort(), ['8', '9', 'a', 'b'], 'the variant digit: 10xx')
  for (const at of [15, 16, 17, 20, 21, 22, 24, 30, 35]) t.equal(digits(at).size, 16, `digit ${at} takes all 16 values`)
  const now = entryId()
  t.ok(Math.abs(parseInt(now.slice(0, 8) + now.slice(9, 13), 16) - Date.now()) < 60_000, 'the default is now')
  const ids = [entryId(1000), entryId(1001), entryId(70_000), entryId(2 ** 40)]
  t.same([...ids].sort(), ids, 'later ids sort after earlier ones')
})

t.test('the hash covers the link, the position and every field, whatever the key order of the metadata', async t => {
  t.equal(canonical({ b: 1, a: [{ d: 2, c: null }], u: undefined }), '{"a":[{"c":null,"d":2}],"b":1}')
  const e = entry({ metadata: { cache: 'hit', replayed: true } })
  const h = hashEntry(GENESIS, 1, e)
  t.match(h, /^[0-9a-f]{64}$/)
  t.equal(hashEntry(GENESIS, 1, { ...e, metadata: { replayed: true, cache: 'hit' } }), h)
  t.not(hashEntry(GENESIS, 2, e), h)
  t.not(hashEntry('1'.repeat(64), 1, e), h)
  for (const [k, v] of Object.entries({ requestId: 'x', tenantId: 't2', status: 'FORBIDDEN', statusCode: 403, durationMs: 1.6, timestamp: e.timestamp + 1, method: null, metadata: {} })) {
    t.not(hashEntry(GENESIS, 1, { ...e, [k]: v }), h, k)
  }
  // The README's formula, computed apart: chains written by earlier versions still verify.
  const fields = [1, e.id, e.requestId, new Date(e.timestamp).toISOString(), e.tenantId, e.userId, e.method, e.path, e.protocol, e.action,
    e.category, e.riskLevel, e.status, e.statusCode, e.durationMs, '{"cache":"hit","replayed":true}']
  t.equal(h, createHash('sha256').update(GENESIS + '\n' + JSON.stringify(fields)).digest('hex'))
})

t.test('storableEntry: NUL and lone surrogates become U+FFFD in every text, keys included; a clean entry is kept as it is', async t => {
  const clean = entry({ metadata: { tags: ['a', '\u{1F600}'], n: 3, nested: { ok: true } } })
  t.equal(storableEntry(clean), clean, 'no copy when nothing needs repair (a surrogate pair is well formed)')
  const odd = entry({ requestId: 'r\u0000', userId: 'u\ud800', path: '/p\udc00', metadata: { 'k\u0000': ['x\u0000', { y: '\udfffz' }], n: 1, none: null } })
  const fixed = storableEntry(odd)
  t.match(fixed, { requestId: 'r\uFFFD', userId: 'u\uFFFD', path: '/p\uFFFD', tenantId: odd.tenantId, id: odd.id })
  t.same(fixed.metadata, { 'k\uFFFD': ['x\uFFFD', { y: '\uFFFDz' }], n: 1, none: null })
  t.equal(odd.userId, 'u\ud800', 'the entry given is not changed')
})

t.test('numbersAsWritten: a number jsonb holds is the decimal JavaScript wrote, in any notation; strings are not numbers', async t => {
  t.ok(numbersAsWritten('{"a": 3, "b": 1000000000000000000000, "c": 0.0000001, "d": -2.5, "e": [0, 1.5e+300, 0.30000000000000004], "s": "3.00000000000000000001", "k\\"1": 2}'))
  t.notOk(numbersAsWritten('{"a": 3.00000000000000000001}'))
  t.notOk(numbersAsWritten('[1e400]'), 'not a double')
  t.notOk(numbersAsWritten('{"a": 0.1000000000000000055511151231257827}'), 'the exact value of 0.1 is not what the gateway wrote')
  t.ok(numbersAsWritten('{"a": 3.0}'), 'the same decimal (jsonb: equal)')
})

t.test('isoTime is toISOString, the reused second included', async t => {
  const now = Date.now()
  const samples = [0, 1, 9, 10, 99, 100, 999, 1000, 1001, now, now + 1, now + 999, now - now % 1000, now - now % 1000 - 1, 951782400000, 253402300799999,
    253402300800000, -1, -62198755200000, 1.5, now + 0.25]
  for (let i = 0; i < 2000; i++) samples.push(Math.floor(Math.random() * 4_102_444_800_000))
  for (const ms of samples) t.equal(isoTime(ms), new Date(ms).toISOString(), String(ms))
  // The same second twice in a row, then the next one: the reused text is replaced.
  t.equal(isoTime(1_700_000_000_123), '2023-11-14T22:13:20.123Z')
  t.equal(isoTime(1_700_000_000_007), '2023-11-14T22:13:20.007Z')
  t.equal(isoTime(1_700_000_001_050), '2023-11-14T22:13:21.050Z')
})

t.test('memory store: a bounded ring with the same chain, verify, query and retention', async t => {
  let evicted = 0
  const store = new MemoryAuditStore({ max: 5, onEvict: n => { evicted += n } })
  const base = Date.now() - 10_000
  const batch = Array.from({ length: 8 }, (_, i) => entry({ timestamp: base + i * 1000, requestId: i === 7 ? 'same' : `r${i}` }))
  await store.write(batch.slice(0, 4))
  t.same(await store.verify({}), { ok: true, checked: 4, firstBroken: null })
  await store.write([...batch.slice(4), batch[0], entry({ requestId: 'same' })])
  t.equal(store.size, 5, 'never more than max')
  t.equal(evicted, 4, 'the oldest went, counted (a repeated id is not stored twice)')
  t.same(await store.verify({}), { ok: true, checked: 5, firstBroken: null }, 'verified from the last dropped entry')
  t.same(await store.verify({ from: new Date(base + 6500) }), { ok: true, checked: 2, firstBroken: null })
  t.same(await store.verify({ to: new Date(base - 1) }), { ok: true, checked: 0, firstBroken: null })
  t.same(await store.verify({ from: new Date(base + 4500), to: new Date(base + 5500) }), { ok: true, checked: 1, firstBroken: null })

  const same = await store.query({ limit: 10, requestId: 'same' })
  t.equal(same.entries.length, 2, 'a repeated request id is kept, with a suffix')
  t.match(same.entries[0].requestId, /^same~[0-9a-f-]{36}$/)
  t.equal((await store.query({ limit: 10, tenant: 'nobody' })).entries.length, 0)
  t.equal((await store.query({ limit: 10, action: 'getAgent', status: 'ok', from: new Date(base + 5500), to: new Date(Date.now()) })).entries.length, 3)
  t.equal((await store.query({ limit: 10, action: 'other' })).entries.length, 0)
  t.equal((await store.query({ limit: 10, status: 'FORBIDDEN' })).entries.length, 0)
  t.equal((await store.query({ limit: 10, to: new Date(base + 5500) })).entries.length, 2)
  const first = await store.query({ limit: 2 })
  t.equal(first.entries.length, 2)
  t.not(first.nextSeq, null)
  const second = await store.query({ limit: 2, beforeSeq: first.nextSeq! })
  t.ok(second.entries.every(e => e.seq < first.nextSeq!))

  // Tampering in memory is found too.
  const victim = (await store.query({ limit: 1, requestId: 'r6' })).entries[0]
  victim.status = 'FORBIDDEN'
  t.same(await store.verify({}), { ok: false, checked: 3, firstBroken: { id: victim.id, requestId: 'r6' } })
  victim.status = 'ok'

  t.equal(await store.prune(Date.now() - (base + 5500), 1), 1, 'at most the batch')
  t.equal(await store.prune(Date.now() - (base + 5500), 10), 1)
  t.equal(await store.prune(Date.now() - (base + 5500), 10), 0)
  t.same(await store.verify({}), { ok: true, checked: 3, firstBroken: null })
  await store.close()
})

t.test('memory store: rows removed at the end of a range, the whole range or the tail are found', async t => {
  const store = new MemoryAuditStore({ max: 100 })
  const base = Date.now() - 60_000
  const batch = Array.from({ length: 10 }, (_, i) => entry({ timestamp: base + i * 1000 }))
  await store.write(batch)
  const named = (i: number): { id: string, requestId: string } => ({ id: batch[i].id, requestId: batch[i].requestId })
  const at = (s: number): Date => new Date(base + s * 1000)
  t.same(await store.verify({ from: at(3.5), to: at(3.7) }), { ok: true, checked: 0, firstBroken: null }, 'a range with no entry, nothing removed: ok')
  t.same(await store.verify({ from: at(20) }), { ok: true, checked: 0, firstBroken: null })
  // The ring is the store's own: removing from it is what tampering with memory would be.
  const ring = (store as unknown as { ring: { removeOne: (i: number) => unknown, pop: () => unknown } }).ring
  ring.removeOne(6)
  t.same(await store.verify({ from: at(3), to: at(5) }), { ok: false, checked: 3, firstBroken: named(7) }, 'the last row of a range: found at the entry after the gap')
  t.same(await store.verify({ from: at(6), to: at(6.5) }), { ok: false, checked: 0, firstBroken: named(7) }, 'the whole range')
  ring.pop()
  ring.pop()
  t.same(await store.verify({ from: at(8) }), { ok: false, checked: 0, firstBroken: named(7) }, 'a removed tail that was the range: at the last entry left')
})

t.test('memory store: a long verify lets other calls run, and keeps its place while entries are dropped', async t => {
  const base = Date.now() - 60_000
  const fill = (store: MemoryAuditStore, n: number, from: number): number => store.writeNow(Array.from({ length: n }, (_, i) => entry({ timestamp: base + from + i })))

  const store = new MemoryAuditStore({ max: 6000 })
  fill(store, 6000, 0)
  let ran = false
  const verifying = store.verify({}).then(result => ({ result, ran }))
  setImmediate(() => { ran = true })
  const { result, ran: ranBefore } = await verifying
  t.same(result, { ok: true, checked: 6000, firstBroken: null })
  t.ok(ranBefore, 'other work ran before the verify ended (in one piece, 100,000 entries held the event loop for 205 ms)')

  // Entries written while the walk waits at its first turn (after 2000) drop those it walked and
  // some it had not: it goes on from the oldest kept, and a changed entry after them is found.
  const changed = new MemoryAuditStore({ max: 6000 })
  fill(changed, 6000, 0)
  const victim = (await changed.query({ limit: 1, beforeSeq: 5501 })).entries[0]
  t.equal(victim.seq, 5500)
  victim.status = 'FORGED'
  setImmediate(() => { fill(changed, 4000, 6000) })
  t.same(await changed.verify({}), { ok: false, checked: 3500, firstBroken: { id: victim.id, requestId: victim.requestId }, skipped: 2000 }, '2000 walked, 2000 dropped unwalked, then the 5001st to the changed one')
  victim.status = 'ok'
  // The ring now holds the 4001st to the 10000th; a range of its first 3000, whose whole rest is
  // dropped at the first turn: the walk ends, and the oldest kept links to the last dropped.
  setImmediate(() => { fill(changed, 3500, 10_000) })
  t.same(await changed.verify({ to: new Date(base + 6999) }), { ok: true, checked: 2000, firstBroken: null, skipped: 1000 }, 'a range whose rest was dropped meanwhile (the answer says how many)')
})

t.test('memory store: verify is bounded per call and resumes with the cursor it answered', async t => {
  await resumedVerifies(t, async () => {
    const store = new MemoryAuditStore({ max: 100 })
    const base = Date.now() - 60_000
    const batch = Array.from({ length: 10 }, (_, i) => entry({ timestamp: base + i * 1000 }))
    await store.write(batch)
    // The ring is the store's own: changing it is what tampering with memory would be.
    const ring = (store as unknown as { ring: { toArray: () => StoredEntry[], removeOne: (i: number) => unknown } }).ring
    const index = (seq: number): number => ring.toArray().findIndex(e => e.seq === seq)
    return {
      store,
      base,
      named: i => ({ id: batch[i].id, requestId: batch[i].requestId }),
      change: async seq => { ring.toArray()[index(seq)].status = 'FORGED' },
      remove: async seq => { ring.removeOne(index(seq)) }
    }
  })
})

t.test('memory store: one verify call walks at most VERIFY_MAX_ENTRIES, then answers where to go on', async t => {
  const store = new MemoryAuditStore({ max: VERIFY_MAX_ENTRIES + 10 })
  const base = Date.now() - 60_000
  store.writeNow(Array.from({ length: VERIFY_MAX_ENTRIES + 10 }, (_, i) => entry({ timestamp: base + i })))
  // The walk's clock held still: a call also stops at VERIFY_MAX_MS (5 s), and a loaded CI machine
  // (a second of hashing here when quiet) could reach that first, short of the bound shown here.
  // The walk times it on the monotonic clock (performance.now()), held here with the wall clock.
  const now = Date.now
  const monotonic = performance.now
  const held = now()
  const heldMonotonic = monotonic.call(performance)
  Date.now = () => held
  performance.now = () => heldMonotonic
  t.teardown(() => { Date.now = now; performance.now = monotonic })
  const first = await store.verify({}, { limit: VERIFY_MAX_ENTRIES + 10 })
  t.match(first, { ok: true, checked: VERIFY_MAX_ENTRIES, next: { seq: VERIFY_MAX_ENTRIES + 1, end: VERIFY_MAX_ENTRIES + 10 }, through: VERIFY_MAX_ENTRIES }, 'a larger limit is held to the most')
  t.same(await store.verify({}, { next: first.next }), { ok: true, checked: 10, firstBroken: null })
})

// The per-call bound is a duration: on the wall clock, one stepped forward an hour (an NTP
// correction) while a verify walked stopped it at its first page, and one stepped back let it run
// an hour past its bound. Timed on a monotonic clock, a step changes nothing.
t.test('memory store: a wall clock stepped forward while a verify walks does not cut it short', async t => {
  const store = new MemoryAuditStore({ max: 10_000 })
  const base = Date.now() - 60_000
  store.writeNow(Array.from({ length: 10_000 }, (_, i) => entry({ timestamp: base + i })))
  const now = Date.now
  let reads = 0
  // The first read is the walk's start; every one after it is an hour later.
  Date.now = () => reads++ === 0 ? now() : now() + 3_600_000
  t.teardown(() => { Date.now = now })
  const walked = store.verify({})
  t.same(await walked, { ok: true, checked: 10_000, firstBroken: null }, 'all 10,000 (5 pages) in one call')
})

t.test('memory store: a changed row moved just out of a range is found at the range\'s edge', async t => {
  const base = Date.now() - 60_000
  const batch = Array.from({ length: 10 }, (_, i) => entry({ timestamp: base + i * 1000 }))
  const at = (s: number): Date => new Date(base + s * 1000)
  const named = (i: number): { id: string, requestId: string } => ({ id: batch[i].id, requestId: batch[i].requestId })
  for (const [i, shift, name] of [[3, -10_000, 'the first row, moved before the range'], [6, 10_000, 'the last row, moved after it']] as const) {
    const store = new MemoryAuditStore({ max: 100 })
    await store.write(batch)
    t.same(await store.verify({ from: at(3), to: at(6) }), { ok: true, checked: 4, firstBroken: null })
    const victim = (await store.query({ limit: 1, requestId: batch[i].requestId })).entries[0]
    victim.status = 'FORGED'
    victim.timestamp += shift
    t.match(await store.verify({ from: at(3), to: at(6) }), { ok: false, firstBroken: named(i) }, name)
  }
})

// The spool and the quarantine hold audit entries (tenants, users, actions, request ids), and the
// default directory is in the shared tmpdir: they were made 0644 in a 0755 directory, readable by
// every local account. They are the owner's alone now, and a spool an earlier version made too.
t.test('spool: its directory, spool and quarantine files are readable by their owner only', async t => {
  const parent = spoolDir(t)
  const dir = join(parent, 'made-by-the-spool')
  const spool = await Spool.open(dir)
  await spool.append([entry()])
  await spool.quarantine.append([{ time: 'x', sqlstate: null, error: 'e', entry: entry() }])
  const others = (path: string): number => statSync(path).mode & 0o077
  t.equal(others(dir), 0, 'the directory it made')
  t.equal(others(spool.path), 0, 'audit.spool')
  t.equal(others(spool.quarantine.path), 0, 'audit.quarantine')
  await spool.close()
  const older = join(parent, 'older')
  mkdirSync(older)
  writeFileSync(join(older, SPOOL_FILE), '', { mode: 0o644 })
  const reopened = await Spool.open(older)
  t.teardown(() => reopened.close())
  t.equal(others(reopened.path), 0, 'a spool an earlier version made 0644')
})

// The default spool directory is in the shared tmpdir: another local account could put a file of
// its own there, holding batches the spool replayed into the audit trail as the gateway's (chained
// with the rest), or a symbolic link, and the spool appended its lines to the file it named (and
// truncated it once they were replayed).
t.test('spool: a spool file that is a symbolic link, or another user\'s, is refused', async t => {
  const parent = spoolDir(t)
  const linked = join(parent, 'linked')
  mkdirSync(linked)
  const victim = join(parent, 'victim.txt')
  writeFileSync(victim, 'precious\n')
  symlinkSync(victim, join(linked, SPOOL_FILE))
  if (process.getuid?.() !== 0) {
    t.comment('another user\'s link or file: only root can make one, not checked here')
    return
  }
  lchownSync(join(linked, SPOOL_FILE), 4242, 4242)
  await t.rejects(Spool.open(linked), /audit\.spool is a symbolic link of another user \(uid 4242, the gateway runs as 0\): it is not followed/, 'another user\'s link is not followed')
  t.equal(readFileSync(victim, 'utf8'), 'precious\n', 'the file it names is untouched')
  const planted = join(parent, 'planted')
  mkdirSync(planted)
  writeFileSync(join(planted, SPOOL_FILE), JSON.stringify({ n: 1, sum: 'x', entries: [entry()] }) + '\n', { mode: 0o666 })
  chownSync(join(planted, SPOOL_FILE), 4242, 4242)
  await t.rejects(Spool.open(planted), /audit\.spool belongs to another user \(uid 4242, the gateway runs as 0\)/)
  const own = await Spool.open(join(parent, 'own'))
  t.teardown(() => own.close())
  writeFileSync(own.quarantine.path, '', { mode: 0o666 })
  chownSync(own.quarantine.path, 4242, 4242)
  await t.rejects(own.quarantine.append([{ time: 'x', sqlstate: null, error: 'e', entry: entry() }]), /audit\.quarantine belongs to another user/)
})

t.test('spool: batches come back in order, replayed ones are cut, a failing commit keeps the rest', async t => {
  const dir = spoolDir(t)
  const spool = await Spool.open(dir)
  const a = [entry(), entry()]
  const b = [entry()]
  const c = [entry(), entry(), entry()]
  await spool.append(a)
  await spool.append(b)
  t.equal(spool.size, statSync(spool.path).size)
  const seen: AuditEntry[][] = []
  let fail = true
  await t.rejects(spool.drain(async batch => {
    if (batch.length === 1 && fail) throw new Error('down')
    seen.push(batch)
  }), /down/)
  t.same(seen, [a], 'the first batch was committed before the failure')
  t.ok(spool.size > 0)
  fail = false
  // What arrives during a drain stays for the next one.
  const replayed = await spool.drain(async batch => { seen.push(batch); if (batch === seen[1]) await spool.append(c) })
  t.equal(replayed, 1)
  t.same(seen, [a, b])
  t.same(JSON.parse(readFileSync(spool.path, 'utf8')).entries, c, 'only the batch appended meanwhile is left')
  t.equal(await spool.drain(async batch => { seen.push(batch) }), 3)
  t.equal(spool.size, 0)
  t.equal(statSync(spool.path).size, 0, 'truncated after the commit')
  t.equal(await spool.drain(async () => { throw new Error('never called') }), 0)
  await spool.close()
  await spool.close()
  await t.rejects(spool.append(a), /closed/)
})

t.test('spool: a drain reads a window at a time; a line longer than the bound is skipped as corrupt', async t => {
  // Before, a drain read everything not yet replayed in one buffer: a spool over 2 GiB aborted
  // the process (a native assertion in fs), at every replay and after every restart. Small
  // limits here stand for the 1 MiB window and the 256 MiB line of a deployed gateway.
  const dir = spoolDir(t)
  const spool = await Spool.open(dir, { window: 64, line: 3000 })
  const a = [entry(), entry()]
  const b = [entry()]
  const c = [entry(), entry(), entry()]
  await spool.append(a)
  appendFileSync(spool.path, 'x'.repeat(10_000) + '\n') // a line no batch makes: skipped, never held whole
  appendFileSync(spool.path, 'y'.repeat(2000) + '\n') // within the bound, but not a batch
  const reopened = await (async () => { await spool.close(); return await Spool.open(dir, { window: 64, line: 3000 }) })()
  await reopened.append(b)
  const seen: AuditEntry[][] = []
  let fail = true
  await t.rejects(reopened.drain(async batch => {
    if (batch.length === 1 && fail) throw new Error('down')
    seen.push(batch)
  }), /down/)
  t.same(seen, [a], 'each batch spans many windows and comes back whole')
  t.equal(reopened.corrupt, 2, 'the overlong line and the junk line')
  fail = false
  t.equal(await reopened.drain(async batch => { seen.push(batch); await reopened.append(c) }), 1, 'the next drain goes on from the batch that failed')
  t.same(seen, [a, b])
  t.same(JSON.parse(readFileSync(reopened.path, 'utf8')).entries, c, 'compacted a window at a time: only the batch appended meanwhile is left')
  t.equal(await reopened.drain(async batch => { seen.push(batch) }), 3)
  t.equal(statSync(reopened.path).size, 0)
  await reopened.close()
})

t.test('spool: a short write is completed; a failed append leaves nothing behind to join the next', async t => {
  const dir = spoolDir(t)
  const spool = await Spool.open(dir)
  // The file handle as a full disk would make it: the first write takes 10 bytes, a later one fails.
  const fh = (spool as unknown as { fh: FileHandle }).fh
  const write = fh.write.bind(fh) as (data: Buffer, offset: number, length: number) => Promise<{ bytesWritten: number }>
  let calls = 0
  let failNext = false
  ;(fh as unknown as { write: typeof write }).write = async (data, offset, length) => {
    calls++
    if (failNext) { failNext = false; await write(data, offset, 7); throw new Error('ENOSPC: no space left on device') }
    return await write(data, offset, calls === 1 ? Math.min(10, length) : length)
  }
  const a = [entry(), entry()]
  await spool.append(a)
  t.ok(calls >= 2, 'the short write was followed by the rest')
  t.equal(spool.size, statSync(spool.path).size)
  failNext = true
  await t.rejects(spool.append([entry()]), /ENOSPC/)
  t.equal(statSync(spool.path).size, spool.size, 'the part the failed append wrote is cut')
  const c = [entry()]
  await spool.append(c)
  const seen: AuditEntry[][] = []
  t.equal(await spool.drain(async batch => { seen.push(batch) }), 3)
  t.same(seen, [a, c], 'both acknowledged batches come back whole')
  t.equal(spool.corrupt, 0)
  await spool.close()
})

t.test('spool: a compaction that fails to copy (a full disk) leaves no partial copy; the next drain compacts', async t => {
  const dir = spoolDir(t)
  const spool = await Spool.open(dir)
  const a = [entry(), entry()]
  const c = [entry()]
  await spool.append(a)
  // The copy's file is /dev/full: its first write fails with ENOSPC, as on a full disk.
  const tmp = spool.path + '.tmp'
  symlinkSync('/dev/full', tmp)
  const seen: AuditEntry[][] = []
  // A batch appended during the drain: the compaction copies it rather than truncating.
  await t.rejects(spool.drain(async batch => { seen.push(batch); await spool.append(c) }), /ENOSPC|no space/)
  t.notOk(existsSync(tmp), 'the partial copy is removed')
  t.same(seen, [a])
  t.equal(await spool.drain(async batch => { seen.push(batch) }), 1, 'the next drain replays what is left, once')
  t.same(seen, [a, c], 'nothing replayed twice, nothing lost')
  t.equal(statSync(spool.path).size, 0, 'and compacts')
  t.notOk(existsSync(tmp))
  await spool.close()
})

// The compaction closes the file before it renames the copy over it: a step that failed from
// there on (an I/O error, no file descriptor left) left the closed handle, and every append and
// drain after failed ("file closed") for the life of the process.
t.test('spool: a compaction that fails after closing the file (its rename refused) leaves the spool usable', async t => {
  const dir = spoolDir(t)
  const spool = await Spool.open(dir)
  const a = [entry(), entry()]
  const c = [entry()]
  await spool.append(a)
  const aside = spool.path + '.aside'
  const seen: AuditEntry[][] = []
  // A batch appended during the drain (the compaction copies it), then a directory where the
  // file was: the rename of the copy over it fails.
  await t.rejects(spool.drain(async batch => {
    seen.push(batch)
    await spool.append(c)
    renameSync(spool.path, aside)
    mkdirSync(join(spool.path, 'x'), { recursive: true })
  }), /EISDIR|ENOTEMPTY|EEXIST|directory/)
  rmSync(spool.path, { recursive: true })
  renameSync(aside, spool.path)
  const d = [entry()]
  await spool.append(d)
  t.equal(await spool.drain(async batch => { seen.push(batch) }), 2, 'the next drain replays what is left, once')
  t.same(seen, [a, c, d], 'nothing replayed twice, nothing lost')
  t.equal(statSync(spool.path).size, 0, 'and compacts')
  await spool.append([entry()])
  t.equal(spool.size, statSync(spool.path).size, 'the spool knows where its file ends')
  await spool.close()
})

// The compaction's copy, audit.spool.tmp, was opened as any file is: through a symbolic link
// another local account put there (in a shared directory, as for the spool's own file) it wrote the
// spool's batches into the file the link named, truncating it first, and then renamed the link
// over audit.spool, where the next open refused it: the gateway's own file clobbered, the spool
// unusable for the rest of the process.
t.test('spool: the compaction\'s copy is never written through a link or a file someone put in its place', async t => {
  const parent = spoolDir(t)
  const victim = join(parent, 'victim.txt')
  writeFileSync(victim, 'precious\n')
  const dir = join(parent, 'spool')
  const spool = await Spool.open(dir)
  t.teardown(() => spool.close())
  // A link of the gateway's own user is followed (the test before points one at /dev/full).
  if (process.getuid?.() !== 0) {
    t.comment('another user\'s link: only root can make one, not checked here')
    return
  }
  symlinkSync(victim, spool.path + '.tmp')
  lchownSync(spool.path + '.tmp', 4242, 4242)
  const a = [entry(), entry()]
  const c = [entry()]
  await spool.append(a)
  const seen: AuditEntry[][] = []
  // A batch appended during the drain: the compaction copies it to the new file.
  t.equal(await spool.drain(async batch => { seen.push(batch); await spool.append(c) }), 2)
  t.equal(readFileSync(victim, 'utf8'), 'precious\n', 'the file the link names is untouched')
  const d = [entry()]
  await spool.append(d)
  t.equal(await spool.drain(async batch => { seen.push(batch) }), 2, 'the spool is still usable')
  t.same(seen, [a, c, d], 'nothing replayed twice, nothing lost')
  t.equal(statSync(spool.path).size, 0, 'and compacts')
  t.notOk(existsSync(spool.path + '.tmp'), 'no copy left behind')
})

// A cleaner of the tmpdir (the spool's default directory) removes files by age, open or not: an
// idle, empty spool is old. The spool went on appending to the file it had open, which no
// directory named any more: each batch fsynced and acknowledged, and lost with the process.
t.test('spool: a spool file removed under it is made again; what it held and what follows is on disk', async t => {
  const dir = spoolDir(t)
  const spool = await Spool.open(dir)
  t.teardown(() => spool.close())
  const onDisk = (): string[][] => readFileSync(spool.path, 'utf8').split('\n').filter(l => l !== '').map(l => (JSON.parse(l) as { entries: AuditEntry[] }).entries.map(e => e.id))
  // Idle and empty, removed; then an outage.
  rmSync(spool.path)
  const a = [entry(), entry()]
  await spool.append(a)
  t.same(onDisk(), [a.map(e => e.id)], 'the batch is in a file the directory names')
  // Removed while it holds a batch not yet replayed: that batch is carried over.
  rmSync(spool.path)
  const b = [entry()]
  await spool.append(b)
  t.same(onDisk(), [a.map(e => e.id), b.map(e => e.id)], 'the batch not yet replayed, then the new one')
  t.equal(spool.size, statSync(spool.path).size)
  // Removed during a drain, appended to meanwhile: the drain's compaction makes it again.
  const c = [entry()]
  const seen: AuditEntry[][] = []
  t.equal(await spool.drain(async batch => {
    seen.push(batch)
    if (seen.length === 1) { rmSync(spool.path); await spool.append(c) }
  }), 3)
  t.same(onDisk(), [c.map(e => e.id)], 'what came during the drain is on disk')
  t.equal(await spool.drain(async batch => { seen.push(batch) }), 1)
  t.same(seen, [a, b, c], 'each once, in order')
  t.equal(statSync(spool.path).size, 0)
})

// A spool file cut short from outside (an operator's `: > audit.spool` to clear it, a
// logrotate copytruncate, a restore): the spool went on by the length it had written. Its next
// append landed (O_APPEND) at the file's real end, joined to a line cut mid-way there (the
// acknowledged batch lost with it as one corrupt line), and every compaction after failed
// ("shorter than written"): each replay said failed, the file never cut again while every new
// batch went through it.
t.test('spool: a spool file cut short from outside: the batches appended after come back whole, and it is compacted again', async t => {
  const dir = spoolDir(t)
  const spool = await Spool.open(dir)
  t.teardown(() => spool.close())
  const a = [entry(), entry()]
  const b = [entry()]
  await spool.append(a)
  const aEnd = statSync(spool.path).size
  await spool.append(b)
  // Cut in the middle of b's line.
  truncateSync(spool.path, aEnd + 10)
  const c = [entry()]
  await spool.append(c)
  t.equal(spool.size, statSync(spool.path).size, 'the spool knows where its file ends')
  const seen: AuditEntry[][] = []
  t.equal(await spool.drain(async batch => { seen.push(batch) }), 3)
  t.same(seen, [a, c], 'the batch acknowledged after the cut comes back whole')
  t.equal(spool.corrupt, 1, 'what is left of the batch cut mid-way is one corrupt line')
  t.equal(statSync(spool.path).size, 0, 'compacted')
  // Emptied from outside, then appended to: replayed, and compacted.
  await spool.append(a)
  truncateSync(spool.path, 0)
  await spool.append(b)
  t.equal(await spool.drain(async batch => { seen.push(batch) }), 1)
  t.same(seen.slice(2), [b])
  t.equal(spool.size, 0)
  t.equal(statSync(spool.path).size, 0, 'compacted')
  // Emptied during a drain (b gone with it): its compaction does not fail, and the batch appended after is kept.
  await spool.append(a)
  await spool.append(b)
  const d = [entry()]
  const during: AuditEntry[][] = []
  t.equal(await spool.drain(async batch => {
    during.push(batch)
    if (during.length === 1) { truncateSync(spool.path, 0); await spool.append(d) }
  }), 2)
  t.same(during, [a], 'the drain stops at the cut')
  t.equal(await spool.drain(async batch => { during.push(batch) }), 1)
  t.same(during, [a, d], 'the batch appended after the cut, once')
  t.equal(statSync(spool.path).size, 0, 'compacted')
})

t.test('quarantine: a quarantine file removed under it is made again, with the records it held', async t => {
  const dir = spoolDir(t)
  const spool = await Spool.open(dir)
  t.teardown(() => spool.close())
  const record = (e: AuditEntry): QuarantineRecord => ({ time: new Date().toISOString(), sqlstate: '22P02', error: 'refused', entry: e })
  const a = entry()
  const b = entry()
  await spool.quarantine.append([record(a)])
  rmSync(spool.quarantine.path)
  await spool.quarantine.append([record(b)])
  const ids = readFileSync(spool.quarantine.path, 'utf8').split('\n').filter(l => l !== '').map(l => (JSON.parse(l) as QuarantineRecord).entry.id)
  t.same(ids, [a.id, b.id], 'the records it held, then the new one, in a file the directory names')
})

// An operator empties the quarantine once its entries are stored by hand (`: > audit.quarantine`):
// the quarantine went on by the length it had written. An append that failed then (a full disk)
// was cut back to that length, past the file's end: the file grew a run of NUL bytes, and the
// next record followed them on its line, unreadable as JSON.
t.test('quarantine: a quarantine file emptied from outside: a failed append after leaves nothing, the next record is a line of its own', async t => {
  const dir = spoolDir(t)
  const spool = await Spool.open(dir)
  t.teardown(() => spool.close())
  const record = (time: string): QuarantineRecord => ({ time, sqlstate: '22P02', error: 'refused', entry: entry() })
  await spool.quarantine.append([record('a'), record('b')])
  truncateSync(spool.quarantine.path, 0)
  // The disk takes 7 bytes of the next append, then fails.
  const fh = (spool.quarantine as unknown as { fh: FileHandle }).fh
  const write = fh.write.bind(fh) as (data: Buffer, offset: number, length: number) => Promise<{ bytesWritten: number }>
  let failNext = true
  ;(fh as unknown as { write: typeof write }).write = async (data, offset, length) => {
    if (failNext) { failNext = false; await write(data, offset, 7); throw new Error('ENOSPC: no space left on device, write') }
    return await write(data, offset, length)
  }
  await t.rejects(spool.quarantine.append([record('c')]), /ENOSPC/)
  t.equal(statSync(spool.quarantine.path).size, 0, 'nothing of the failed append is left')
  await spool.quarantine.append([record('d')])
  const text = readFileSync(spool.quarantine.path, 'utf8')
  t.notOk(text.includes('\u0000'), 'no NUL bytes')
  t.same(text.split('\n').filter(l => l !== '').map(l => (JSON.parse(l) as QuarantineRecord).time), ['d'], 'the record after, on a line of its own')
})

t.test('spool: a failed append whose cut fails too leaves a torn line of its own; the next batch is whole', async t => {
  const dir = spoolDir(t)
  for (const target of ['spool', 'quarantine'] as const) {
    const spool = await Spool.open(join(dir, target))
    const a = [entry(), entry()]
    const first = async (): Promise<void> => { target === 'spool' ? await spool.append(a) : await spool.quarantine.append([{ time: 'x', sqlstate: null, error: 'e', entry: a[0] }]) }
    await first()
    // The disk takes 7 bytes of the next append, then fails, and so does the cut after it.
    const fh = (target === 'spool' ? spool as unknown : spool.quarantine) as { fh: FileHandle }
    const write = fh.fh.write.bind(fh.fh) as (data: Buffer, offset: number, length: number) => Promise<{ bytesWritten: number }>
    const truncate = fh.fh.truncate.bind(fh.fh)
    let failNext = true
    ;(fh.fh as unknown as { write: typeof write }).write = async (data, offset, length) => {
      if (failNext) { failNext = false; await write(data, offset, 7); throw new Error('EIO: i/o error, write') }
      return await write(data, offset, length)
    }
    ;(fh.fh as unknown as { truncate: (n: number) => Promise<void> }).truncate = async () => { throw new Error('EIO: i/o error, ftruncate') }
    const b = [entry()]
    if (target === 'spool') await t.rejects(spool.append(b), /EIO/)
    else await t.rejects(spool.quarantine.append([{ time: 'y', sqlstate: null, error: 'e', entry: b[0] }]), /EIO/)
    ;(fh.fh as unknown as { truncate: typeof truncate }).truncate = truncate
    const c = [entry()]
    if (target === 'spool') {
      await spool.append(c)
      t.equal(spool.size, statSync(spool.path).size, 'the spool knows where its file ends')
      const seen: AuditEntry[][] = []
      t.equal(await spool.drain(async batch => { seen.push(batch) }), 3)
      t.same(seen, [a, c], 'both acknowledged batches come back whole')
      t.equal(spool.corrupt, 1, 'the torn part is a corrupt line of its own')
    } else {
      await spool.quarantine.append([{ time: 'z', sqlstate: null, error: 'e', entry: c[0] }])
      const lines = readFileSync(spool.quarantine.path, 'utf8').split('\n')
      t.same(lines.map(l => { try { return (JSON.parse(l) as { time: string }).time } catch { return null } }), ['x', null, 'z', null], 'the record after the torn part is on a line of its own')
    }
    await spool.close()
  }
})

t.test('spool: a corrupt line among joined batches is counted once, however often their commit fails', async t => {
  // Joined, the batches around it are committed together: until they are, the drain's place
  // stays before the corrupt line, and each retry of an outage read it, and counted it, again.
  const dir = spoolDir(t)
  const first = await Spool.open(dir)
  const a = [entry(), entry()]
  const b = [entry()]
  await first.append(a)
  appendFileSync(first.path, 'not json\n')
  await first.close()
  // Opened again, as after a restart: the spool knows the file's size from the file.
  const spool = await Spool.open(dir)
  await spool.append(b)
  for (let i = 0; i < 3; i++) await t.rejects(spool.drain(async () => { throw new Error('down') }, 10), /down/)
  t.equal(spool.corrupt, 1, 'counted once over three failed drains')
  const seen: AuditEntry[][] = []
  t.equal(await spool.drain(async batch => { seen.push(batch) }, 10), 3)
  t.same(seen, [[...a, ...b]], 'the two batches, joined, past the corrupt line')
  t.equal(spool.corrupt, 1, 'and not again when they are replayed')
  await spool.append([entry()])
  appendFileSync(spool.path, 'junk\n')
  await spool.close()
  const reopened = await Spool.open(dir)
  t.equal(await reopened.drain(async () => {}, 10), 1)
  t.equal(reopened.corrupt, 1, 'a corrupt line of the file as it is now is counted')
  await reopened.close()
})

t.test('spool: one process per directory; a torn or corrupt line is skipped, never half replayed', async t => {
  const dir = spoolDir(t)
  const spool = await Spool.open(dir)
  await t.rejects(Spool.open(dir), /is in use by process \d+: give each gateway instance its own spool directory/)
  t.ok(await Spool.open(dir).catch(err => err instanceof SpoolInUseError))
  await spool.append([entry()])
  await spool.close()
  t.notOk(existsSync(join(dir, 'audit.lock')))

  // A lock naming this very process, in its PID namespace, on a spool it has not opened, is an
  // earlier process's whose pid was reused.
  const ns = readlinkSync('/proc/self/ns/pid')
  writeFileSync(join(dir, 'audit.lock'), `${process.pid} ${hostname()} ${ns}`)
  const restarted = await Spool.open(dir)
  await t.rejects(Spool.open(dir), /is in use by process \d+/, 'while it is open here, a second open is refused')
  await restarted.close()
  t.notOk(existsSync(join(dir, 'audit.lock')))

  // Another host's lock (two containers on one volume, each PID 1: the pid alone let the second
  // in, and each truncated the other's batches): refused while its holder touches it, taken
  // over once it has not for two heartbeats, and at once when untouched for 30 s.
  writeFileSync(join(dir, 'audit.lock'), `${process.pid} another-host`)
  const beating = touching(join(dir, 'audit.lock'))
  await t.rejects(Spool.open(dir, QUICK), /is in use by process \d+ on another-host \(it touched its lock while this one waited\)/)
  beating()
  const takenOver = await Spool.open(dir, QUICK)
  t.match(readFileSync(join(dir, 'audit.lock'), 'utf8'), new RegExp(`^${process.pid} ${hostname()} ${ns.replace(/[[\]]/g, '\\$&')} [0-9a-f-]{36}$`), 'ours now')
  await takenOver.close()
  writeFileSync(join(dir, 'audit.lock'), `${process.pid} another-host`)
  const old = new Date(Date.now() - 31_000)
  utimesSync(join(dir, 'audit.lock'), old, old)
  const abandoned = await Spool.open(dir)
  await abandoned.close()

  // A lock left by a process that is gone is taken over; a torn last line is cut.
  writeFileSync(join(dir, 'audit.lock'), `2147483646 ${hostname()} ${ns}`)
  const good = [entry()]
  appendFileSync(join(dir, SPOOL_FILE), JSON.stringify({ n: 1, sum: 'bad', entries: [entry()] }) + '\n')
  appendFileSync(join(dir, SPOOL_FILE), 'not json\n')
  appendFileSync(join(dir, SPOOL_FILE), '{"n":1,"sum":"abc","entr')
  const again = await Spool.open(dir)
  t.equal(again.corrupt, 1, 'the torn tail')
  await again.append(good)
  const seen: AuditEntry[][] = []
  t.equal(await again.drain(async batch => { seen.push(batch) }), 2)
  t.equal(seen.length, 2)
  t.same(seen[1], good)
  t.equal(again.corrupt, 3, 'the bad checksum and the garbage line')
  await again.close()

  // A file that is one torn line only.
  writeFileSync(join(dir, SPOOL_FILE), '{"n":1')
  const torn = await Spool.open(dir)
  t.equal(torn.size, 0)
  await torn.close()
})

/** Spool limits with a heartbeat of 40 ms: a lock not its own is watched for 80 ms. */
const QUICK = { ...SPOOL_LIMITS, heartbeatMs: 40 }

/** Touches `lock` every 10 ms, as a live holder would, until the returned function is called. */
function touching (lock: string): () => void {
  const timer = setInterval(() => { const now = new Date(); utimesSync(lock, now, now) }, 10)
  return () => clearInterval(timer)
}

t.test('spool: a pid in the lock is trusted only in the PID namespace it was written in; another lock is told by its heartbeat', async t => {
  const dir = spoolDir(t)
  const lock = join(dir, 'audit.lock')
  const stale = (): void => { const old = new Date(Date.now() - 31_000); utimesSync(lock, old, old) }
  // Another container with this hostname on the same volume (host networking, a fixed hostname),
  // its gateway PID 1 as this one may be: its pid is not this process, whatever the number.
  writeFileSync(lock, `${process.pid} ${hostname()} pid:[1]`)
  let beating = touching(lock)
  await t.rejects(Spool.open(dir, QUICK), /is in use by process \d+ on .* \(it touched its lock while this one waited\)/, 'a twin container\'s live lock is not this process\'s own')
  beating()
  // The same lock, its holder gone (a container restarted after a crash: a new PID namespace):
  // taken over after two heartbeats without a touch.
  const restarted = await Spool.open(dir, QUICK)
  await restarted.close()
  // A lock without a namespace (written by an older version) is told by its heartbeat too.
  writeFileSync(lock, String(process.pid))
  beating = touching(lock)
  await t.rejects(Spool.open(dir, QUICK), /in use by process \d+ on an unnamed host/)
  beating()
  const after = await Spool.open(dir, QUICK)
  await after.close()
  // A live pid here that has not touched the lock for 30 s is not its holder (a pid reused after a
  // reboot, say): taken over, where it refused every start for good.
  writeFileSync(lock, `${process.ppid} ${hostname()} ${readlinkSync('/proc/self/ns/pid')}`)
  await t.rejects(Spool.open(dir), new RegExp(`in use by process ${process.ppid}:`), 'while it is touched, a live pid holds it')
  stale()
  const reused = await Spool.open(dir)
  await reused.close()
})

// The watch on another host's lock is two heartbeats long, a duration: on the wall clock, one
// stepped back an hour (an NTP correction) while it watched kept the start-up watching a lock
// nobody touched for that hour (stepped forward, it judged a live holder's lock stale at once).
t.test('spool: a wall clock stepped back while another host\'s lock is watched does not hold up the start', async t => {
  const dir = spoolDir(t)
  const lock = join(dir, 'audit.lock')
  writeFileSync(lock, '4242 another-host pid:[1]')
  // Watched two heartbeats (2 s): the step comes while it watches.
  const opening = Spool.open(dir, { ...SPOOL_LIMITS, heartbeatMs: 1000 })
  await new Promise(resolve => setTimeout(resolve, 500))
  const now = Date.now
  Date.now = () => now() - 3_600_000
  t.teardown(() => { Date.now = now })
  let timer: NodeJS.Timeout | undefined
  const opened = await Promise.race([opening, new Promise<null>(resolve => { timer = setTimeout(() => resolve(null), 5000) })])
  clearTimeout(timer)
  t.not(opened, null, 'the untouched lock is taken over after two heartbeats')
  if (opened !== null) await opened.close()
  else opening.then(async spool => { await spool.close() }, () => {})
})

t.test('spool: of two processes taking one stale lock over at once, one does; a holder whose lock was taken stops writing', async t => {
  const dir = spoolDir(t)
  const lock = join(dir, 'audit.lock')
  writeFileSync(lock, '1 oldhost pid:[999]')
  const old = new Date(Date.now() - 60_000)
  utimesSync(lock, old, old)
  // A second path to the same directory: this process counts it as another (as a second process would be).
  const alias = dir + '-alias'
  symlinkSync(dir, alias)
  t.teardown(() => { rmSync(alias, { force: true }) })
  const opened = await Promise.allSettled([Spool.open(dir, QUICK), Spool.open(alias, QUICK)])
  t.equal(opened.filter(o => o.status === 'fulfilled').length, 1, 'one took the lock over')
  t.match(opened.find(o => o.status === 'rejected'), { reason: { message: /took the lock over at the same time|in use/ } })
  const holder = (opened.find(o => o.status === 'fulfilled') as PromiseFulfilledResult<Spool>).value
  await holder.append([entry()])
  // Another process taking the lock over moves it aside a moment, and puts back one that is not
  // the stale lock it judged: the holder, reading it meanwhile, keeps it.
  renameSync(lock, lock + '.aside')
  t.ok(await holder.held(), 'absent a moment: still held')
  renameSync(lock + '.aside', lock)
  t.ok(await holder.held())
  // Another process takes it (the holder stalled past its watch, say): the holder notices and
  // neither appends, nor cuts, nor removes the other's lock.
  writeFileSync(lock, `2 elsewhere pid:[7] ${'0'.repeat(36)}`)
  await t.rejects(holder.append([entry()]), /was taken over by another process/)
  await t.rejects(holder.drain(async () => {}), /was taken over by another process/)
  await holder.close()
  t.equal(readFileSync(lock, 'utf8'), `2 elsewhere pid:[7] ${'0'.repeat(36)}`, 'the other\'s lock stays')
  // An empty lock (a write that failed on a full disk, a crash before it): watched, then taken
  // over, old or new; it was refused at every start.
  for (const age of [60_000, 0]) {
    writeFileSync(lock, '')
    const at = new Date(Date.now() - age)
    utimesSync(lock, at, at)
    const taken = await Spool.open(dir, QUICK)
    t.match(readFileSync(lock, 'utf8'), new RegExp(`^${process.pid} `), `an empty lock ${age / 1000} s old is taken over`)
    await taken.close()
  }
  t.equal(readFileSync(join(dir, SPOOL_FILE), 'utf8').split('\n').length, 2, 'one line, from before')
})

t.test('spool: its holder touches the lock, so that another host can tell it is held', async t => {
  const dir = spoolDir(t)
  const spool = await Spool.open(dir)
  const lock = join(dir, 'audit.lock')
  const old = new Date(Date.now() - 25_000)
  utimesSync(lock, old, old)
  await until(() => Date.now() - statSync(lock).mtimeMs < 10_000, 'the heartbeat to touch the lock', 8000)
  await spool.close()
})

/** A store that fails while `down` is set and records what it stored. */
/** A store that fails while `down` and records the order entries reach it (the chain order). */
/** `store`'s first write hangs (PostgreSQL up to its query timeout) until released: then it fails, or goes on. */
function holdFirstWrite (store: AuditStore): { readonly held: boolean, release: (ok: boolean) => void } {
  const write = store.write.bind(store)
  let release: ((ok: boolean) => void) | null = null
  let hang = true
  store.write = async (batch) => {
    if (hang) {
      hang = false
      if (!await new Promise<boolean>(resolve => { release = resolve })) throw new Error('query read timeout')
    }
    return await write(batch)
  }
  return { get held () { return release !== null }, release: (ok) => { release!(ok) } }
}

function flakyStore (): AuditStore & { down: boolean, stored: AuditEntry[], writes: number } {
  const ids = new Set<string>()
  const s = {
    kind: 'postgres' as const,
    down: false,
    stored: [] as AuditEntry[],
    writes: 0,
    async write (batch: AuditEntry[]) {
      s.writes++
      if (s.down) throw new Error('connection refused')
      let n = 0
      for (const e of batch) {
        if (ids.has(e.id)) continue
        ids.add(e.id)
        s.stored.push(e)
        n++
      }
      return n
    },
    verify: async () => ({ ok: true, checked: 0, firstBroken: null }),
    query: async () => ({ entries: [], nextSeq: null }),
    prune: async () => 0,
    close: async () => {}
  }
  return s
}

t.test('writer: batches while the store is up, spools while it is down, replays in order, never loses one', async t => {
  const store = flakyStore()
  const spool = await Spool.open(spoolDir(t))
  const events: string[] = []
  const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 1000, intervalMs: 5, log: quiet, hooks: { stored: () => events.push('stored'), spooled: () => events.push('spooled'), replayed: () => events.push('replayed'), failed: () => events.push('failed') } })
  const all = Array.from({ length: 60 }, () => entry())
  for (const e of all.slice(0, 25)) writer.enqueue(e)
  await until(() => store.stored.length === 25, 'the first entries stored')
  t.equal(writer.up, true)
  store.down = true
  for (const e of all.slice(25, 45)) writer.enqueue(e)
  await until(() => writer.spoolBytes > 0 && writer.depth === 0, 'entries spooled')
  t.equal(writer.up, false)
  t.equal(writer.error, 'connection refused')
  store.down = false
  for (const e of all.slice(45)) writer.enqueue(e)
  await until(() => store.stored.length === 60 && writer.spoolBytes === 0 && writer.up, 'everything stored', 10_000)
  t.same(store.stored.map(e => e.id), all.map(e => e.id), 'in the order of the calls')
  t.equal(writer.up, true)
  t.ok(events.includes('failed') && events.includes('spooled') && events.includes('replayed'))
  await writer.close()
  await writer.close()
  await spool.close()
})

// A replay whose batches the store committed, and whose spool then failed (its compaction's copy
// refused by a full disk, a read's I/O error), was taken for the store failing: the store was said
// down (/readyz 503 "postgres: down", mantle_audit_store_up 0, a write failure counted) with the
// disk's error as the store's, though PostgreSQL had just taken every batch.
t.test('writer: a replay the store took whose spool then fails says the spool failed, not the store', async t => {
  const store = flakyStore()
  const dir = spoolDir(t)
  const spool = await Spool.open(dir)
  const errors: string[] = []
  const log = { ...quiet, error: (obj: object, msg: string) => { errors.push(msg) } }
  let failures = 0
  const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 1000, intervalMs: 5, log, hooks: { failed: () => { failures++ } } })
  t.teardown(async () => { await writer.close(); await spool.close() })
  store.down = true
  const early = Array.from({ length: 10 }, () => entry())
  for (const e of early) writer.enqueue(e)
  await until(() => writer.spoolBytes > 0 && writer.depth === 0, 'spooled')
  // The compaction's copy is /dev/full (a full disk), and a batch reaches the spool while the
  // replay runs (a full queue): the compaction copies it, and fails.
  const tmp = spool.path + '.tmp'
  symlinkSync('/dev/full', tmp)
  const late = [entry()]
  const write = store.write.bind(store)
  let appended = false
  store.write = async (batch: AuditEntry[]) => {
    if (!appended) { appended = true; await spool.append(late) }
    return await write(batch)
  }
  const before = failures
  store.down = false
  await until(() => store.stored.length === 10, 'the replay stored')
  await until(() => errors.length > 0 || failures > before, 'the replay\'s end')
  t.equal(writer.up, true, 'the store took the replay: it is up')
  t.equal(failures, before, 'no store failure counted')
  t.equal(writer.error, null)
  t.ok(errors.some(m => /audit spool/.test(m)), 'the spool\'s failure is logged as the spool\'s')
  // The failed copy was removed with the link: the next replay compacts.
  rmSync(tmp, { force: true })
  await until(() => store.stored.length === 11 && writer.spoolBytes === 0, 'the rest replayed once the disk takes the copy')
  t.same(store.stored.map(e => e.id), [...early, ...late].map(e => e.id), 'each once, in order')
})

// Node's refusal of a connection to a name with several addresses (an AggregateError: code
// ECONNREFUSED, no message) was the store's error as it was: logged, and kept for /diagz, as ''.
t.test('writer: a store failure with no message is said by its code', async t => {
  const store = flakyStore()
  store.write = async () => { throw Object.assign(new AggregateError([], ''), { code: 'ECONNREFUSED' }) }
  const spool = await Spool.open(spoolDir(t))
  const warned: Array<{ err?: unknown }> = []
  const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 1000, intervalMs: 5, log: { ...quiet, warn: (obj: object) => { warned.push(obj) } } })
  t.teardown(async () => { await writer.close(); await spool.close() })
  writer.enqueue(entry())
  await until(() => !writer.up, 'the write failed')
  t.equal(writer.error, 'ECONNREFUSED')
  t.same(warned, [{ err: 'ECONNREFUSED' }])
})

t.test('writer: a full queue goes to the spool at once; close spools what the store cannot take', async t => {
  const store = flakyStore()
  store.down = true
  const spool = await Spool.open(spoolDir(t))
  const writer = new AuditWriter({ store, spool, batchSize: 1000, queueMax: 5, intervalMs: 60_000, log: quiet })
  for (let i = 0; i < 12; i++) writer.enqueue(entry())
  // One full queue at a time goes to the spool: five on their way, seven in the queue behind them.
  t.equal(writer.depth, 12, 'every entry waits')
  await until(() => writer.spoolBytes > 0, 'the full queue spooled')
  await writer.close()
  const seen: AuditEntry[] = []
  await spool.drain(async batch => { seen.push(...batch) })
  t.equal(seen.length, 12, 'nothing lost at close')
  await spool.close()
})

// While the store was away, the flush appended the queue to the spool a batch (and an fsync) at a
// time, and an entry that filled the queue did not send it to the spool while such an append ran:
// on a disk slower than the calls came (20 ms an fsync, 10,000 calls a second, batches of 10) the
// queue grew past BFF_AUDIT_QUEUE_MAX without bound (13,470 entries for a bound of 100 within 1.5 s).
t.test('writer: a queue that fills while the flush appends a batch to the spool goes there whole, next: the queue stays bounded', async t => {
  const store = flakyStore()
  store.down = true
  const spool = await Spool.open(spoolDir(t))
  const appendMany = spool.appendMany.bind(spool)
  // Each append to the spool waits until the test lets it go on: the disk is as slow as the test says.
  const appends: Array<{ entries: number, go: () => void }> = []
  spool.appendMany = async (batches: AuditEntry[][]) => {
    await new Promise<void>(resolve => { appends.push({ entries: batches.reduce((n, b) => n + b.length, 0), go: resolve }) })
    await appendMany(batches)
  }
  const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 100, intervalMs: 5, log: quiet })
  const all = Array.from({ length: 310 }, () => entry())
  for (const e of all.slice(0, 10)) writer.enqueue(e)
  await until(() => appends.length === 1, 'the first batch on its way to the spool')
  // The queue fills, and more, while that append runs.
  for (const e of all.slice(10)) writer.enqueue(e)
  t.equal(writer.depth, 310)
  appends[0].go()
  await until(() => appends.length === 2, 'the next append')
  t.equal(appends[1].entries, 300, 'the full queue, in one append, not the next batch of 10')
  appends[1].go()
  await until(() => writer.depth === 0 && writer.spoolBytes > 0, 'everything spooled')
  t.equal(appends.length, 2, 'two appends (two fsyncs) for 310 entries')
  const closing = writer.close()
  for (const a of appends) a.go()
  await closing
  const seen: AuditEntry[] = []
  await spool.drain(async batch => { seen.push(...batch) })
  t.same(seen.map(e => e.id), all.map(e => e.id), 'each once, in order')
  await spool.close()
})

// Before, close waited for the store whatever it took: a PostgreSQL that stopped answering, or a
// long replay of the spool, ran past the shutdown's grace, and the queue was neither stored nor
// spooled when the process was killed.
t.test('writer: close waits for a store that hangs only closeTimeoutMs, then spools the batch in flight and the queue, in order', async t => {
  const store = flakyStore()
  const write = store.write.bind(store)
  let hang = false
  store.write = async (batch: AuditEntry[]) => hang ? await new Promise<number>(() => {}) : await write(batch)
  const dir = spoolDir(t)
  const spool = await Spool.open(dir)
  const warnings: string[] = []
  const log = { ...quiet, warn: (_: object, msg: string) => { warnings.push(msg) } }
  const writer = new AuditWriter({ store, spool, batchSize: 5, queueMax: 1000, intervalMs: 5, closeTimeoutMs: 100, log })
  const stored = [entry(), entry()]
  for (const e of stored) writer.enqueue(e)
  await until(() => store.stored.length === 2, 'the first entries stored')
  hang = true
  const flight = Array.from({ length: 5 }, () => entry())
  for (const e of flight) writer.enqueue(e)
  await until(() => writer.writing && writer.depth === flight.length, 'a batch in flight (counted in the depth), the queue empty')
  const queued = Array.from({ length: 7 }, () => entry())
  for (const e of queued) writer.enqueue(e)
  await writer.close()
  t.match(warnings, [/did not finish in time at shutdown/])
  await spool.close()
  const again = await Spool.open(dir)
  const seen: AuditEntry[] = []
  await again.drain(async batch => { seen.push(...batch) })
  t.same(seen.map(e => e.id), [...flight, ...queued].map(e => e.id), 'the batch in flight, then the queue')
  await again.close()
})

t.test('writer: close does not wait for a long replay of the spool; its rest stays spooled, the queue after it', async t => {
  const store = flakyStore()
  const write = store.write.bind(store)
  // 25 ms a write: the replay joins the 200 lines into 20 batches, 500 ms in all.
  store.write = async (batch: AuditEntry[]) => { await new Promise(resolve => setTimeout(resolve, 25)); return await write(batch) }
  const dir = spoolDir(t)
  const spool = await Spool.open(dir)
  const spooled = Array.from({ length: 200 }, () => entry())
  for (const e of spooled) await spool.append([e])
  const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 1000, intervalMs: 5, closeTimeoutMs: 100, log: quiet })
  await until(() => store.stored.length > 0, 'the replay under way')
  const queued = Array.from({ length: 3 }, () => entry())
  for (const e of queued) writer.enqueue(e)
  await writer.close()
  t.ok(store.stored.length < spooled.length, `close did not wait for the whole replay (${store.stored.length} of ${spooled.length} stored)`)
  await new Promise(resolve => setTimeout(resolve, 50))
  const storedBefore = store.stored.length
  await spool.close()
  const again = await Spool.open(dir)
  const seen: AuditEntry[] = []
  await again.drain(async batch => { seen.push(...batch) })
  await again.close()
  const ids = new Set([...store.stored, ...seen].map(e => e.id))
  t.same([...spooled, ...queued].filter(e => !ids.has(e.id)), [], 'every entry stored or spooled')
  t.same(seen.slice(-3).map(e => e.id), queued.map(e => e.id), 'the queue after the spool\'s rest')
  t.equal(store.stored.length, storedBefore, 'the replay stopped')
})

t.test('writer over the memory store: no spool, a full queue is written at once', async t => {
  const store = new MemoryAuditStore({ max: 100 })
  const writer = new AuditWriter({ store, spool: null, batchSize: 3, queueMax: 4, intervalMs: 60_000, log: quiet })
  for (let i = 0; i < 4; i++) writer.enqueue(entry())
  await until(() => store.size === 4, 'written when full')
  for (let i = 0; i < 3; i++) writer.enqueue(entry())
  await writer.close()
  t.equal(store.size, 7)
  t.same(await store.verify({}), { ok: true, checked: 7, firstBroken: null })
})

// A full queue over the memory store is written at once, outside the flushes: the write was
// counted nowhere (neither stored in /metrics and /diagz nor anything else).
t.test('writer over the memory store: a full queue written at once is counted stored', async t => {
  const store = new MemoryAuditStore({ max: 100 })
  let stored = 0
  const writer = new AuditWriter({ store, spool: null, batchSize: 3, queueMax: 4, intervalMs: 60_000, log: quiet, hooks: { stored: n => { stored += n } } })
  for (let i = 0; i < 4; i++) writer.enqueue(entry())
  await until(() => store.size === 4, 'written when full')
  await writer.close()
  t.equal(stored, 4, 'each entry counted stored once')
})

t.test('writer: a full batch is written at once, a partial one once an interval after the last flush began', async t => {
  const starts: Array<{ n: number, at: number }> = []
  const stored: AuditEntry[] = []
  const store: AuditStore = {
    kind: 'memory',
    write: async (batch: AuditEntry[]) => { starts.push({ n: batch.length, at: performance.now() }); await new Promise(resolve => setTimeout(resolve, 3)); stored.push(...batch); return batch.length },
    verify: async () => ({ ok: true, checked: 0, firstBroken: null }),
    query: async () => ({ entries: [], nextSeq: null }),
    close: async () => {}
  } as unknown as AuditStore
  // No interval tick within the test: only full batches, the flush of what a flush left and close write.
  const idle = new AuditWriter({ store, spool: null, batchSize: 50, queueMax: 10_000, intervalMs: 60_000, log: quiet })
  for (let i = 0; i < 50; i++) idle.enqueue(entry())
  await until(() => stored.length === 50, 'a full batch written without waiting for the interval')
  for (let i = 0; i < 120; i++) idle.enqueue(entry())
  await until(() => stored.length === 150, 'the two full batches written at once')
  await new Promise(resolve => setTimeout(resolve, 50))
  t.equal(stored.length, 150, 'the 20 left wait for the interval')
  t.same(starts.map(s => s.n), [50, 50, 50])
  await idle.close()
  t.equal(stored.length, 170, 'close writes them')

  // A trickle of calls: a flush begins at most once an interval, each writing what came meanwhile.
  starts.length = 0
  stored.length = 0
  const writer = new AuditWriter({ store, spool: null, batchSize: 500, queueMax: 10_000, intervalMs: 40, log: quiet })
  const first = performance.now()
  for (let i = 0; i < 40; i++) {
    writer.enqueue(entry())
    writer.enqueue(entry())
    await new Promise(resolve => setTimeout(resolve, 4))
  }
  await until(() => stored.length === 80, 'every entry of the trickle stored')
  const gaps = starts.slice(1).map((s, i) => s.at - starts[i].at)
  t.ok(gaps.every(g => g >= 39), `flushes began an interval apart or more (${gaps.map(g => g.toFixed(1)).join(', ')} ms)`)
  t.ok(starts.length <= Math.ceil((starts[starts.length - 1].at - first) / 40) + 1, `${starts.length} flushes for 80 entries`)
  await writer.close()
})

t.test('writer: after a write longer than the interval, batches still begin an interval apart', async t => {
  // The flush went on writing, a batch every few milliseconds, once one write had outlasted the
  // interval: each batch after it was due by the time the flush began.
  // Timed by the writer's clock (monotonic): the wall clock moved against it by a few ms here, and
  // a gap of 14 ms showed between batches the writer had begun 20 ms apart.
  const starts: number[] = []
  let stored = 0
  const store: AuditStore = {
    kind: 'memory',
    write: async (batch: AuditEntry[]) => {
      starts.push(performance.now())
      await new Promise(resolve => setTimeout(resolve, starts.length === 1 ? 60 : 2))
      stored += batch.length
      return batch.length
    },
    verify: async () => ({ ok: true, checked: 0, firstBroken: null }),
    query: async () => ({ entries: [], nextSeq: null }),
    close: async () => {}
  } as unknown as AuditStore
  const writer = new AuditWriter({ store, spool: null, batchSize: 500, queueMax: 10_000, intervalMs: 20, log: quiet })
  for (let i = 0; i < 60; i++) {
    writer.enqueue(entry())
    await new Promise(resolve => setTimeout(resolve, 2))
  }
  await until(() => stored === 60, 'every entry stored')
  const gaps = starts.slice(1).map((at, i) => at - starts[i])
  t.ok(starts.length >= 3, `${starts.length} batches`)
  t.ok(gaps.every(g => g >= 19), `batches began an interval apart or more (${gaps.map(g => g.toFixed(1)).join(', ')} ms)`)
  await writer.close()
})

// The writer timed its interval and its retries with the wall clock: stepped back (NTP setting a
// clock that ran fast, a VM resumed), a partial batch waited until the clock came back to where it
// had been, in memory all the while, and a store that came back was not tried again until then.
t.test('writer: a wall clock stepped back an hour delays neither a partial batch nor a retry of the store', async t => {
  const realNow = Date.now
  t.teardown(() => { Date.now = realNow })
  const store = flakyStore()
  const spool = await Spool.open(spoolDir(t))
  const writer = new AuditWriter({ store, spool, batchSize: 100, queueMax: 1000, intervalMs: 20, log: quiet })
  writer.enqueue(entry())
  await until(() => store.stored.length === 1, 'the first entry stored')
  Date.now = () => realNow() - 3_600_000
  writer.enqueue(entry())
  await until(() => store.stored.length === 2, 'a partial batch after the step', 2000)
  store.down = true
  writer.enqueue(entry())
  await until(() => writer.spoolBytes > 0 && writer.depth === 0, 'the entry spooled')
  Date.now = () => realNow() - 7_200_000
  store.down = false
  await until(() => store.stored.length === 3 && writer.spoolBytes === 0, 'the store tried again and the spool replayed', 2000)
  await writer.close()
  await spool.close()
})

t.test('writer: while the store is away, one append to the spool an interval, not two', async t => {
  // While the spool held anything, every tick began a flush: once a full batch had begun one
  // between two of the interval's ticks, those and the one each flush set for the next made two
  // flushes an interval, an fsynced line each (of ~45 entries and ~5).
  const store = flakyStore()
  store.down = true
  const spool = await Spool.open(spoolDir(t))
  const appends: Array<{ n: number, at: number }> = []
  const writer = new AuditWriter({ store, spool, batchSize: 100, queueMax: 10_000, intervalMs: 50, log: quiet, hooks: { spooled: n => appends.push({ n, at: Date.now() }) } })
  await new Promise(resolve => setTimeout(resolve, 25))
  const first = Date.now()
  for (let i = 0; i < 100; i++) writer.enqueue(entry())
  let n = 100
  while (Date.now() - first < 1000) {
    writer.enqueue(entry())
    n++
    await new Promise(resolve => setTimeout(resolve, 1))
  }
  const last = Date.now()
  await until(() => writer.depth === 0, 'every entry spooled')
  const during = appends.filter(a => a.at <= last)
  const intervals = Math.ceil((last - first) / 50)
  t.ok(during.length <= intervals + 2, `${during.length} appends in ${intervals} intervals (${during.map(a => a.n).join(',')})`)
  await writer.close()
  t.equal(appends.reduce((sum, a) => sum + a.n, 0), n, 'every entry spooled once')
  await spool.close()
})

t.test('writer: a spool of many small lines is replayed in batches of up to batchSize, in order, cut once stored', async t => {
  // Each line was a transaction of its own: after an outage, ~25 entries each where 500 fit.
  const dir = spoolDir(t)
  const before = await Spool.open(dir)
  const all = Array.from({ length: 300 }, () => entry())
  for (let i = 0; i < all.length; i += 7) await before.append(all.slice(i, i + 7))
  await before.close()
  const store = flakyStore()
  const sizes: number[] = []
  const write = store.write.bind(store)
  store.write = async batch => { sizes.push(batch.length); return await write(batch) }
  const spool = await Spool.open(dir)
  let replayed = 0
  const writer = new AuditWriter({ store, spool, batchSize: 100, queueMax: 10_000, intervalMs: 5, log: quiet, hooks: { replayed: n => { replayed += n } } })
  writer.enqueue(entry())
  await until(() => spool.size === 0 && store.stored.length === 301, 'the spool replayed and the live entry stored')
  t.same(sizes.slice(0, -1), [98, 98, 98, 6], 'whole lines joined up to a batch, a write each')
  t.same(store.stored.slice(0, 300).map(e => e.id), all.map(e => e.id), 'in order')
  t.equal(replayed, 300)
  await writer.close()
  await spool.close()

  // A write that fails midway keeps the batches it held, and the rest, for the next drain.
  const again = await Spool.open(dir)
  const some = Array.from({ length: 30 }, () => entry())
  for (let i = 0; i < some.length; i += 5) await again.append(some.slice(i, i + 5))
  const seen: number[] = []
  await t.rejects(again.drain(async batch => { seen.push(batch.length); if (seen.length === 2) throw new Error('down') }, 12), /down/)
  t.same(seen, [10, 10], 'two lines of 5 a commit')
  const rest: AuditEntry[] = []
  t.equal(await again.drain(async batch => { rest.push(...batch) }, 12), 20)
  t.same(rest.map(e => e.id), some.slice(10).map(e => e.id), 'the failed commit\'s lines and the rest, once each')
  t.equal(again.size, 0)
  await again.close()
})

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

// A full queue goes to the spool at once, but the spool's size grows only once that append is
// fsynced. A flush in between must treat the append on its way as a spool that holds batches and
// send newer entries after it, or they would reach the store (and the chain) before older ones.
t.test('writer: after a full queue goes to the spool, later entries reach the store after it', async t => {
  const store = flakyStore()
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

// A write that hangs while the queue fills (PostgreSQL up to its query timeout): the full queue
// went to the spool at once, and the batch in flight, should its write then fail, was appended
// after it: older entries chained after newer ones.
t.test('writer: the batch being written when a full queue is spooled keeps its place, whether its write fails or succeeds', async t => {
  for (const outcome of ['fails', 'succeeds'] as const) {
    const store = flakyStore()
    const first = holdFirstWrite(store)
    const spool = await Spool.open(spoolDir(t))
    const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 100, intervalMs: 5, log: quiet })
    const early = Array.from({ length: 10 }, () => entry())
    for (const e of early) writer.enqueue(e)
    await until(() => first.held, 'the first batch in flight')
    const later = Array.from({ length: 100 }, () => entry()) // the 100th fills the queue: spooled at once
    for (const e of later) writer.enqueue(e)
    await until(() => spool.size > 0, 'the full queue on disk')
    first.release(outcome === 'succeeds')
    await until(() => store.stored.length === 110, 'everything stored', 10_000)
    t.same(store.stored.map(e => e.id), [...early, ...later].map(e => e.id), `${outcome}: stored once each, in the order enqueued`)
    await writer.close()
    await spool.close()
  }
})

// The batch in flight that a full queue takes to the spool ahead of itself: should its write
// fail, its entries are counted spooled (they were counted nowhere, then replayed), and should it
// succeed, stored only. Each entry enqueued is counted stored or spooled once.
t.test('writer: the batch in flight taken to the spool by a full queue is counted spooled when its write fails, stored when it succeeds', async t => {
  for (const outcome of ['fails', 'succeeds'] as const) {
    const store = flakyStore()
    const first = holdFirstWrite(store)
    const spool = await Spool.open(spoolDir(t))
    const count = { stored: 0, spooled: 0, replayed: 0 }
    // `found` counts stored, as the gateway's hooks do (the copy's replay finds nothing it did not count).
    const hooks = { stored: (n: number) => { count.stored += n }, found: (n: number) => { count.stored += n }, spooled: (n: number) => { count.spooled += n }, replayed: (n: number) => { count.replayed += n } }
    const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 100, intervalMs: 5, log: quiet, hooks })
    for (let i = 0; i < 10; i++) writer.enqueue(entry())
    await until(() => first.held, 'the first batch in flight')
    for (let i = 0; i < 100; i++) writer.enqueue(entry()) // the 100th fills the queue: spooled at once, the batch in flight ahead
    await until(() => spool.size > 0, 'the full queue on disk')
    first.release(outcome === 'succeeds')
    await until(() => store.stored.length === 110 && spool.size === 0, 'everything stored, the spool replayed', 10_000)
    await writer.close()
    await spool.close()
    t.same(count, outcome === 'fails' ? { stored: 0, spooled: 110, replayed: 110 } : { stored: 10, spooled: 100, replayed: 100 }, `${outcome}: each entry counted stored or spooled once`)
  }
})

// close, once it stops waiting for a store that hangs, spools the batch in flight: it counted it
// spooled, and the write, ending after (the pool's end fails it, or it goes through), counted it
// stored too. A batch a full queue had taken to the spool before close was counted nowhere while
// its write hung. Each entry spooled at shutdown is counted spooled once, whatever its write does.
t.test('writer: close counts spooled once each entry it spools, the batch in flight included, whatever its write does after', async t => {
  for (const outcome of ['fails', 'succeeds'] as const) {
    for (const takenBy of ['close', 'a full queue'] as const) {
      const store = flakyStore()
      const first = holdFirstWrite(store)
      const spool = await Spool.open(spoolDir(t))
      const count = { stored: 0, spooled: 0 }
      const hooks = { stored: (n: number) => { count.stored += n }, spooled: (n: number) => { count.spooled += n } }
      const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 100, intervalMs: 5, closeTimeoutMs: 50, log: quiet, hooks })
      for (let i = 0; i < 10; i++) writer.enqueue(entry())
      await until(() => first.held, 'the first batch in flight')
      // 7 queued behind it, or 100: the 100th fills the queue, spooled at once with the batch in flight ahead.
      const behind = takenBy === 'close' ? 7 : 100
      for (let i = 0; i < behind; i++) writer.enqueue(entry())
      if (takenBy === 'a full queue') await until(() => count.spooled === 100, 'the full queue on disk')
      await writer.close()
      t.same(count, { stored: 0, spooled: 10 + behind }, `taken by ${takenBy}: every entry counted spooled once close resolved`)
      first.release(outcome === 'succeeds')
      await until(() => !writer.writing, 'the write in flight ended')
      t.same(count, { stored: 0, spooled: 10 + behind }, `taken by ${takenBy}, its write ${outcome} after close: not counted again`)
      await spool.close()
    }
  }
})

// What close spools itself once the flushes are over (entries a flush put back when the disk
// refused them) was counted nowhere.
t.test('writer: what close appends to the spool after the last flush is counted spooled', async t => {
  const store = flakyStore()
  store.down = true
  const spool = await Spool.open(spoolDir(t))
  const append = spool.append.bind(spool)
  let refusals = 2
  spool.append = async (batch: AuditEntry[]) => {
    if (refusals-- > 0) throw new Error('EIO: i/o error, write')
    await append(batch)
  }
  let spooled = 0
  const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 100, intervalMs: 60_000, log: quiet, hooks: { spooled: n => { spooled += n } } })
  const all = Array.from({ length: 5 }, () => entry())
  for (const e of all) writer.enqueue(e)
  await writer.close()
  t.equal(refusals, 0, 'each flush\'s append was refused')
  await spool.close()
  const again = await Spool.open(spool.dir)
  const seen: AuditEntry[] = []
  await again.drain(async batch => { seen.push(...batch) })
  await again.close()
  t.same(seen.map(e => e.id), all.map(e => e.id), 'on disk once close resolved')
  t.equal(spooled, all.length, 'counted spooled once each')
})

// close, once it stopped waiting for the store, took the queue while a flush's append to the
// spool was still running: that append then failed, and its batch was put back into a queue no
// one writes any more, lost without a word. close now waits for that append (the disk, not the
// store) and spools its batch should it fail.
t.test('writer: a flush\'s append to the spool that fails after close took the queue: its batch is spooled by close, not lost', async t => {
  const store = flakyStore()
  store.down = true
  const spool = await Spool.open(spoolDir(t))
  const append = spool.append.bind(spool)
  let fail: (() => void) | null = null
  let appends = 0
  // The flush's append hangs until the test fails it; close's own appendMany goes through.
  spool.append = async (batch: AuditEntry[]) => {
    if (appends++ === 0) await new Promise<void>((resolve, reject) => { fail = () => reject(new Error('EIO: i/o error, write')) })
    await append(batch)
  }
  const count = { spooled: 0, lost: 0 }
  const errors: string[] = []
  const log = { ...quiet, error: (_: object, msg: string) => { errors.push(msg) } }
  const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 100, intervalMs: 5, closeTimeoutMs: 20, log, hooks: { spooled: n => { count.spooled += n }, lost: n => { count.lost += n } } })
  const flushed = Array.from({ length: 5 }, () => entry())
  for (const e of flushed) writer.enqueue(e)
  await until(() => fail !== null, 'the flush appending to the spool')
  const queued = Array.from({ length: 3 }, () => entry())
  for (const e of queued) writer.enqueue(e)
  // As the plugin's onClose does: the spool is closed once close resolved.
  const closing = writer.close().then(async () => { await spool.close() })
  await until(() => (writer as unknown as { abandoned: boolean }).abandoned, 'close stopped waiting for the flush')
  // Close resolved (and the spool closed) before the append failed, or close waits for it.
  await Promise.race([closing, new Promise(resolve => setTimeout(resolve, 100))])
  fail!()
  await closing
  const again = await Spool.open(spool.dir)
  const seen: AuditEntry[] = []
  await again.drain(async batch => { seen.push(...batch) })
  await again.close()
  t.same(seen.map(e => e.id), [...flushed, ...queued].map(e => e.id), 'on disk in order once close resolved')
  t.same(count, { spooled: 8, lost: 0 }, 'each counted spooled once')
})

// What neither the store nor the disk takes at shutdown is lost: close rejected, and the plugin
// logged it without a count, counted nowhere. The writer logs it with its count and counts it.
t.test('writer: what the disk refuses at shutdown is logged lost with its count and counted lost', async t => {
  const store = flakyStore()
  store.down = true
  const spool = await Spool.open(spoolDir(t))
  spool.appendMany = async () => { throw new Error('ENOSPC: no space left on device, write') }
  const count = { spooled: 0, lost: 0 }
  const errors: Array<{ obj: object, msg: string }> = []
  const log = { ...quiet, error: (obj: object, msg: string) => { errors.push({ obj, msg }) } }
  const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 100, intervalMs: 60_000, log, hooks: { spooled: n => { count.spooled += n }, lost: n => { count.lost += n } } })
  for (let i = 0; i < 5; i++) writer.enqueue(entry())
  await writer.close().catch(() => {})
  await spool.close()
  t.same(count, { spooled: 0, lost: 5 }, 'each entry counted lost once')
  t.match(errors.filter(e => /lost/.test(e.msg)), [{ obj: { entries: 5 }, msg: 'audit entries lost at shutdown: neither the store nor the spool took them' }], 'logged once with the count')
})

// A full queue took the batch in flight ahead of itself and the disk refused both: the batch was
// put back into the queue while its write still ran. close then spooled it from the queue and
// counted it spooled, and its write, going through after, counted it stored as well (20 counts
// for 10 entries). The batch stays in flight instead: its write's end, or close, handles it once.
t.test('writer: the batch in flight a refused full queue had taken is counted once, whether close or its write ends it', async t => {
  for (const outcome of ['fails', 'succeeds'] as const) {
    const store = flakyStore()
    const first = holdFirstWrite(store)
    const spool = await Spool.open(spoolDir(t))
    const appendMany = spool.appendMany.bind(spool)
    let refusals = 1
    spool.appendMany = async (batches: AuditEntry[][]) => {
      if (refusals-- > 0) throw new Error('ENOSPC: no space left on device, write')
      await appendMany(batches)
    }
    const count = { stored: 0, spooled: 0 }
    const hooks = { stored: (n: number) => { count.stored += n }, spooled: (n: number) => { count.spooled += n } }
    const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 100, intervalMs: 5, closeTimeoutMs: 50, log: quiet, hooks })
    const flight = Array.from({ length: 10 }, () => entry())
    for (const e of flight) writer.enqueue(e)
    await until(() => first.held, 'the first batch in flight')
    const full = Array.from({ length: 100 }, () => entry())
    for (const e of full) writer.enqueue(e) // the 100th fills the queue: its append, the batch in flight ahead, is refused
    await until(() => refusals === 0 && (writer as unknown as { overflowing: unknown }).overflowing === null, 'the full queue refused by the disk')
    t.equal(writer.depth, 110, 'every entry waits')
    await writer.close()
    first.release(outcome === 'succeeds')
    await until(() => !writer.writing, 'the write in flight ended')
    t.same(count, { stored: 0, spooled: 110 }, `its write ${outcome} after close: each entry counted once`)
    await spool.close()
    const again = await Spool.open(spool.dir)
    const seen: AuditEntry[] = []
    await again.drain(async batch => { seen.push(...batch) })
    await again.close()
    t.same(seen.map(e => e.id), [...flight, ...full].map(e => e.id), 'on disk once, in order')
  }
})

// close waits for a full queue still on its way to the spool: an entry enqueued is on disk (or
// stored) before close resolves.
t.test('writer: close resolves only once a full queue on its way to the spool is on disk', async t => {
  const store = flakyStore()
  const spool = await Spool.open(spoolDir(t))
  const writer = new AuditWriter({ store, spool, batchSize: 500, queueMax: 5000, intervalMs: 5, log: quiet })
  for (let i = 0; i < 5000; i++) writer.enqueue(entry())
  t.equal(spool.size, 0, 'the append is not fsynced yet')
  await writer.close()
  t.ok(spool.size > 0, 'on disk once close resolved')
  await spool.close()
})

t.test('writer: when neither the store nor the spool takes entries, the backlog is bounded, kept in order, and saturated', async t => {
  // Each full queue was appended again on every enqueue while the disk refused (the whole backlog
  // encoded and hashed each time), their put-backs came in any order, and the backlog grew without bound.
  const store = flakyStore()
  store.down = true
  let appends = 0
  let diskFull = true
  const lines: AuditEntry[][] = []
  const spool = {
    size: 0,
    async appendMany (batches: AuditEntry[][]) { appends++; if (diskFull) throw new Error('ENOSPC: no space left on device'); lines.push(...batches) },
    async append (batch: AuditEntry[]) { await spool.appendMany([batch]) },
    async drain () { return 0 },
    quarantine: { async close () {} },
    async close () {}
  }
  const dropped: number[] = []
  const writer = new AuditWriter({ store, spool: spool as unknown as Spool, batchSize: 10, queueMax: 100, intervalMs: 5, log: quiet, hooks: { dropped: n => dropped.push(n) } })
  const all = Array.from({ length: 500 }, () => entry())
  for (const e of all.slice(0, 150)) writer.enqueue(e)
  // The first full queue's append fails meanwhile: the spool is known to refuse.
  await new Promise(resolve => setTimeout(resolve, 50))
  // Entries of requests refused before any face may be dropped once saturated; a served call's
  // never is (the audit stage refuses calls while saturated).
  for (const e of all.slice(150)) writer.enqueue(e, true)
  await new Promise(resolve => setTimeout(resolve, 50))
  t.ok(writer.depth <= 200, `at most two queues held (${writer.depth})`)
  t.equal(writer.saturated, true)
  t.equal(dropped.length, 500 - 200, 'what came past the bound was dropped and counted')
  const served = entry()
  writer.enqueue(served)
  t.equal(writer.depth, 201, 'a served call\'s entry is kept, saturated or not')
  t.ok(appends < 100, `the spool was not retried on every enqueue (${appends} appends for 400 entries past a full queue)`)
  // Back: what was held reaches the store in the order it came.
  diskFull = false
  store.down = false
  await writer.close()
  // What close spooled (the store was still backing off) comes first, as a replay would store it.
  const kept = [...lines.flat(), ...store.stored]
  t.same(kept.map(e => e.id), [...all.slice(0, 200), served].map(e => e.id), `kept in order (${lines.flat().length} spooled, ${store.stored.length} stored)`)
  t.equal(writer.saturated, false)
})

// The spool's disk that does not answer (a hung volume) while the store is away: the writer counted
// only a refused append as the spool failing, and an append that never settled held every later
// one. The backlog grew without bound (27,000 entries within 3 s for a bound of 2 x 100) and
// calls were served on, their entries nowhere but in memory.
t.test('writer: when the store is away and an append to the spool does not settle, the backlog is bounded and saturated', async t => {
  const store = flakyStore()
  store.down = true
  let appends = 0
  const spool = {
    size: 0,
    async appendMany () { appends++; await new Promise(() => {}) },
    async append (batch: AuditEntry[]) { await spool.appendMany() },
    async drain () { return 0 },
    quarantine: { async close () {} },
    async close () {}
  }
  const dropped: number[] = []
  const lost: number[] = []
  const writer = new AuditWriter({ store, spool: spool as unknown as Spool, batchSize: 10, queueMax: 100, intervalMs: 5, closeTimeoutMs: 50, diskTimeoutMs: 50, log: quiet, hooks: { dropped: n => dropped.push(n), lost: n => lost.push(n) } })
  for (let i = 0; i < 10; i++) writer.enqueue(entry())
  await until(() => appends === 1, 'the first batch on its way to the spool')
  for (let i = 0; i < 300; i++) writer.enqueue(entry())
  t.equal(writer.saturated, false, 'an append just begun is not taken for a disk that does not answer')
  await new Promise(resolve => setTimeout(resolve, 1100))
  t.equal(writer.saturated, true, 'an append unsettled for a second, two queues waiting: saturated (the stage refuses calls)')
  for (let i = 0; i < 100; i++) writer.enqueue(entry(), true)
  t.equal(writer.depth, 310, 'the droppable entries that came meanwhile were dropped')
  t.same(dropped, Array(100).fill(1))
  await writer.close()
  t.equal(lost.reduce((a, b) => a + b, 0), 310, 'what the disk did not take at shutdown is counted lost')
})

// close stopped waiting for a hung write, took its batch and the queue, and the disk refused that
// last append: every entry was counted lost, the batch in flight with them, so that when its write
// then went through its entries were stored and counted lost (never stored). What close cannot
// vouch for is left to the write's end: stored if it went through, lost (logged) if not.
t.test('writer: close\'s last append refused, the batch in flight is counted by its write\'s end: stored if it went through, lost if not', async t => {
  for (const outcome of ['fails', 'succeeds'] as const) {
    const store = flakyStore()
    const first = holdFirstWrite(store)
    const spool = await Spool.open(spoolDir(t))
    spool.appendMany = async () => { throw new Error('ENOSPC: no space left on device, write') }
    const count = { stored: 0, spooled: 0, lost: 0 }
    const errors: Array<{ obj: object, msg: string }> = []
    const log = { ...quiet, error: (obj: object, msg: string) => { errors.push({ obj, msg }) } }
    const hooks = { stored: (n: number) => { count.stored += n }, spooled: (n: number) => { count.spooled += n }, lost: (n: number) => { count.lost += n } }
    const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 100, intervalMs: 5, closeTimeoutMs: 50, log, hooks })
    for (let i = 0; i < 10; i++) writer.enqueue(entry())
    await until(() => first.held, 'the first batch in flight')
    for (let i = 0; i < 7; i++) writer.enqueue(entry())
    await writer.close()
    t.same(count, { stored: 0, spooled: 0, lost: 7 }, `${outcome}: the queue counted lost once close resolved, the batch in flight not yet`)
    t.ok(errors.some(e => (e.obj as { entries?: number }).entries === 10), `${outcome}: the batch in flight is named in an error line`)
    first.release(outcome === 'succeeds')
    await until(() => !writer.writing, 'the write in flight ended')
    t.same(count, outcome === 'succeeds' ? { stored: 10, spooled: 0, lost: 7 } : { stored: 0, spooled: 0, lost: 17 }, `its write ${outcome} after close: each entry counted once, by what became of it`)
    t.equal(store.stored.length, outcome === 'succeeds' ? 10 : 0)
    await spool.close()
  }
})

// A disk that does not answer at shutdown (an append never settles: a hung NFS mount, a stalled
// volume): close awaited the appends under way, and then its own behind them, for ever; the
// shutdown was killed at its grace, every later onClose hook unrun, the entries lost without a word.
t.test('writer: close resolves when the spool\'s disk hangs, the entries it could not vouch for logged and counted lost', async t => {
  const store = flakyStore()
  store.down = true
  const spool = await Spool.open(spoolDir(t))
  spool.appendMany = async () => { await new Promise(() => {}) }
  const count = { spooled: 0, lost: 0 }
  const errors: Array<{ obj: object, msg: string }> = []
  const log = { ...quiet, error: (obj: object, msg: string) => { errors.push({ obj, msg }) } }
  const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 100, intervalMs: 5, closeTimeoutMs: 50, diskTimeoutMs: 50, log, hooks: { spooled: n => { count.spooled += n }, lost: n => { count.lost += n } } })
  for (let i = 0; i < 5; i++) writer.enqueue(entry())
  await until(() => writer.depth === 5 && (writer as unknown as { appending: number }).appending === 5, 'the flush appending to the spool')
  for (let i = 0; i < 3; i++) writer.enqueue(entry())
  const resolved = await Promise.race([writer.close().then(() => true), new Promise<boolean>(resolve => setTimeout(resolve, 5000, false))])
  t.equal(resolved, true, 'close resolved')
  t.same(count, { spooled: 0, lost: 8 }, 'each entry counted lost once')
  t.equal(errors.filter(e => /lost/.test(e.msg)).reduce((n, e) => n + ((e.obj as { entries?: number }).entries ?? 0), 0), 8, 'logged with their count')
  await spool.close()
})

// Entries that came once close had taken the queue for good (an onClose hook of another plugin
// auditing after the audit's): one error line each.
t.test('writer: entries that come after close are counted lost each, logged in a line a second, not one an entry', async t => {
  const store = flakyStore()
  const spool = await Spool.open(spoolDir(t))
  let lost = 0
  const errors: Array<{ obj: object, msg: string }> = []
  const log = { ...quiet, error: (obj: object, msg: string) => { errors.push({ obj, msg }) } }
  const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 100, intervalMs: 5, log, hooks: { lost: n => { lost += n } } })
  await writer.close()
  for (let i = 0; i < 1000; i++) writer.enqueue(entry())
  t.equal(lost, 1000, 'each counted lost')
  const logged = (): number => errors.reduce((n, e) => n + ((e.obj as { entries?: number }).entries ?? 0), 0)
  await until(() => logged() === 1000, 'every one logged', 5000)
  t.ok(errors.length <= 2, `in two lines at most, the first at once (${errors.length} lines)`)
  await spool.close()
})

/**
 * A writer whose first batch's write is held (`first`) and whose spool's disk hangs, with that
 * batch in flight and 100 entries more: the 100th fills the queue, whose append, the batch in
 * flight ahead, hangs. Store, disk and close wait 50 ms; `count` adds up its hooks.
 */
async function hungFullQueue (t: Test): Promise<{ store: ReturnType<typeof flakyStore>, first: ReturnType<typeof holdFirstWrite>, spool: Spool, count: { stored: number, spooled: number, lost: number }, writer: AuditWriter }> {
  const store = flakyStore()
  const first = holdFirstWrite(store)
  const spool = await Spool.open(spoolDir(t))
  spool.appendMany = async () => { await new Promise(() => {}) }
  const count = { stored: 0, spooled: 0, lost: 0 }
  const hooks = { stored: (n: number) => { count.stored += n }, spooled: (n: number) => { count.spooled += n }, lost: (n: number) => { count.lost += n } }
  const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 100, intervalMs: 5, closeTimeoutMs: 50, diskTimeoutMs: 50, log: quiet, hooks })
  for (let i = 0; i < 10; i++) writer.enqueue(entry())
  await until(() => first.held, 'the first batch in flight')
  for (let i = 0; i < 100; i++) writer.enqueue(entry())
  return { store, first, spool, count, writer }
}

// The disk hangs while a full queue's append holds the batch in flight too (its write hung as
// well): close counts the queue lost, and leaves the batch in flight to its write's end.
t.test('writer: the disk hangs with the batch in flight in a full queue\'s append: each entry counted once, by what became of it', async t => {
  for (const outcome of ['fails', 'succeeds'] as const) {
    const { first, spool, count, writer } = await hungFullQueue(t)
    t.equal(await Promise.race([writer.close().then(() => true), new Promise<boolean>(resolve => setTimeout(resolve, 5000, false))]), true, `${outcome}: close resolved`)
    t.same(count, { stored: 0, spooled: 0, lost: 100 }, `${outcome}: the full queue counted lost once close resolved`)
    first.release(outcome === 'succeeds')
    await until(() => count.stored + count.lost === 110, 'the write in flight ended')
    await new Promise(resolve => setTimeout(resolve, 20))
    t.same(count, outcome === 'succeeds' ? { stored: 10, spooled: 0, lost: 100 } : { stored: 0, spooled: 0, lost: 110 }, `its write ${outcome} after close: each entry counted once`)
    await spool.close()
  }
})

// The disk hangs with a full queue's append that took the batch in flight ahead, and that batch's
// write then went through (counted stored) before close gave up on the disk: close counted every
// entry of the append lost, the stored batch with them (stored and lost both). A write that failed
// leaves its batch to the append: lost with it.
t.test('writer: the disk hangs with a full queue\'s append whose batch ahead has ended its write since: counted once, stored or lost', async t => {
  for (const outcome of ['fails', 'succeeds'] as const) {
    const { store, first, spool, count, writer } = await hungFullQueue(t)
    first.release(outcome === 'succeeds')
    await until(() => (writer as unknown as { inFlight: unknown }).inFlight === null, 'the write in flight ended')
    t.equal(await Promise.race([writer.close().then(() => true), new Promise<boolean>(resolve => setTimeout(resolve, 5000, false))]), true, `${outcome}: close resolved`)
    t.same(count, outcome === 'succeeds' ? { stored: 10, spooled: 0, lost: 100 } : { stored: 0, spooled: 0, lost: 110 }, `${outcome}: each entry counted once (the stored batch not lost too)`)
    t.equal(store.stored.length, outcome === 'succeeds' ? 10 : 0)
    await spool.close()
  }
})

// close took the batch in flight while its write was being split (an entry's quarantine under
// way), and the disk then refused close's last append after that write had ended: the entry
// quarantined meanwhile was counted quarantined, and lost again with the rest of the batch.
t.test('writer: close\'s last append refused after the batch it took was split: an entry quarantined meanwhile is not counted lost too', async t => {
  const store = flakyStore()
  const bad = entry()
  const write = store.write.bind(store)
  store.write = async (batch) => {
    if (batch.some(e => e.id === bad.id)) throw Object.assign(new Error('invalid input'), { code: '22P02' })
    return await write(batch)
  }
  const refusing = store as AuditStore & { refuses?: (err: unknown) => boolean }
  refusing.refuses = err => (err as { code?: string }).code === '22P02'
  const spool = await Spool.open(spoolDir(t))
  let quarantine: (() => void) | null = null
  const append = spool.quarantine.append.bind(spool.quarantine)
  spool.quarantine.append = async (records) => {
    await new Promise<void>(resolve => { quarantine = resolve })
    await append(records)
  }
  let refuse: (() => void) | null = null
  spool.appendMany = async () => {
    await new Promise<void>(resolve => { refuse = resolve })
    throw new Error('ENOSPC: no space left on device, write')
  }
  const count = { stored: 0, spooled: 0, lost: 0, quarantined: 0 }
  const hooks = { stored: (n: number) => { count.stored += n }, spooled: (n: number) => { count.spooled += n }, lost: (n: number) => { count.lost += n }, quarantined: (n: number) => { count.quarantined += n } }
  const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 100, intervalMs: 5, closeTimeoutMs: 50, diskTimeoutMs: 5000, log: quiet, hooks })
  writer.enqueue(bad)
  for (let i = 0; i < 9; i++) writer.enqueue(entry())
  await until(() => quarantine !== null, 'the refused entry\'s quarantine under way')
  const closed = writer.close()
  await until(() => refuse !== null, 'close appending the batch in flight')
  quarantine!()
  await until(() => (writer as unknown as { inFlight: unknown }).inFlight === null, 'the split ended')
  refuse!()
  await closed
  t.same(count, { stored: 0, spooled: 0, lost: 9, quarantined: 1 }, 'each entry counted once: the quarantined one not lost too')
  await spool.close()
})

// close took the batch in flight, its write then went through while close's append ran, and the
// disk refused that append: the batch is counted stored after all, as the flush it was. It was
// observed as a flush of 0 s (the flush-time histogram, /diagz's last flush), whatever it took.
t.test('writer: a batch in flight stored while close\'s refused append ran is counted stored with the time its write took', async t => {
  const store = flakyStore()
  const first = holdFirstWrite(store)
  const spool = await Spool.open(spoolDir(t))
  let refuse: (() => void) | null = null
  spool.appendMany = async () => {
    await new Promise<void>(resolve => { refuse = resolve })
    throw new Error('ENOSPC: no space left on device, write')
  }
  const flushes: Array<[number, number]> = []
  const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 100, intervalMs: 5, closeTimeoutMs: 50, diskTimeoutMs: 5000, log: quiet, hooks: { stored: (n, s) => flushes.push([n, s]) } })
  for (let i = 0; i < 10; i++) writer.enqueue(entry())
  await until(() => first.held, 'the first batch in flight')
  const closed = writer.close()
  await until(() => refuse !== null, 'close appending the batch in flight')
  first.release(true)
  await until(() => (writer as unknown as { inFlight: unknown }).inFlight === null, 'the write went through')
  refuse!()
  await closed
  t.equal(flushes.length, 1, 'one flush')
  t.equal(flushes[0]?.[0], 10, 'of the 10 entries')
  t.ok((flushes[0]?.[1] ?? 0) >= 0.04, `with the time its write took (${flushes[0]?.[1] ?? 0} s, held over 50 ms)`)
  await spool.close()
})

t.test('writer: an idle probe that keeps failing says the latest error, logged once', async t => {
  const lines: string[] = []
  const log = { info: (obj: object | string, msg?: string) => lines.push(`info ${msg ?? String(obj)}`), warn: (_: object, msg: string) => lines.push(`warn ${msg}`), error: (_: object, msg: string) => lines.push(`error ${msg}`) }
  const writer = new AuditWriter({ store: new MemoryAuditStore({ max: 10 }), spool: null, batchSize: 10, queueMax: 100, intervalMs: 60_000, log })
  t.teardown(async () => { await writer.close() })
  await writer.probe(async () => { throw new Error('answered but failed: terminating connection due to administrator command') })
  t.equal(writer.error, 'answered but failed: terminating connection due to administrator command')
  await writer.probe(async () => { throw new Error('answered but failed: PostgreSQL takes no writes') })
  t.equal(writer.error, 'answered but failed: PostgreSQL takes no writes', 'the cause that followed, not the first error')
  t.same(lines, ['warn audit store fails: entries go to the spool until it is back'], 'logged once')
  await writer.probe(async () => {})
  t.equal(writer.error, null, 'none once it answers')
  t.equal(writer.up, true)
})

// close stopped waiting for a write and the disk refused its append: the lines said after were
// those of a writer that goes on ("audit store is back", "spooling to disk until it is back"), and
// close's own said "is spooled" before the lines saying the same entries lost.
t.test('writer: once close gave up, the write it left says no "store is back" nor "spooling until it is back", and close claims no spool the disk refused', async t => {
  for (const outcome of ['fails', 'succeeds'] as const) {
    const store = flakyStore()
    const first = holdFirstWrite(store)
    const spool = await Spool.open(spoolDir(t))
    spool.appendMany = async () => { throw new Error('ENOSPC: no space left on device, write') }
    const lines: string[] = []
    const log = { info: (obj: object | string, msg?: string) => lines.push(`info ${msg ?? String(obj)}`), warn: (_: object, msg: string) => lines.push(`warn ${msg}`), error: (_: object, msg: string) => lines.push(`error ${msg}`) }
    const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 100, intervalMs: 5, closeTimeoutMs: 50, log })
    // Up (a write that fails says so), or found down while idle by a probe (one that goes through
    // says it is back); then it answers no more: the write hangs.
    if (outcome === 'succeeds') await writer.probe(async () => { throw new Error('connection refused') })
    for (let i = 0; i < 10; i++) writer.enqueue(entry())
    await until(() => first.held, `${outcome}: the batch in flight`)
    const before = lines.length
    await writer.close()
    first.release(outcome === 'succeeds')
    await until(() => !writer.writing, `${outcome}: the write ended`)
    const after = lines.slice(before)
    t.notOk(after.some(l => /store is back|until it is back/.test(l)), `${outcome}: no line of a writer that goes on (${after.join(' | ')})`)
    t.notOk(after.some(l => /is spooled/.test(l)), `${outcome}: close does not say spooled what the disk refused`)
    await spool.close()
  }
})

/**
 * A writer over a flaky store whose first write hangs and a spool whose disk refuses every
 * append (what close leaves to the write's end), its log lines kept: 10 entries enqueued (in the
 * store already with `storedBefore`), their batch in flight.
 */
async function leftToItsWrite (t: Test, opts: { hooks?: WriterHooks, storedBefore?: boolean } = {}): Promise<{ first: ReturnType<typeof holdFirstWrite>, spool: Spool, lines: Array<{ level: string, obj: object, msg: string }>, writer: AuditWriter, batch: AuditEntry[] }> {
  const store = flakyStore()
  const batch = Array.from({ length: 10 }, () => entry())
  if (opts.storedBefore === true) await store.write(batch)
  const first = holdFirstWrite(store)
  const spool = await Spool.open(spoolDir(t))
  spool.appendMany = async () => { throw new Error('ENOSPC: no space left on device, write') }
  const lines: Array<{ level: string, obj: object, msg: string }> = []
  const log = {
    info: (obj: object | string, msg?: string) => lines.push({ level: 'info', obj: typeof obj === 'string' ? {} : obj, msg: msg ?? String(obj) }),
    warn: (obj: object, msg: string) => lines.push({ level: 'warn', obj, msg }),
    error: (obj: object, msg: string) => lines.push({ level: 'error', obj, msg })
  }
  const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 100, intervalMs: 5, closeTimeoutMs: 50, log, hooks: opts.hooks })
  for (const e of batch) writer.enqueue(e)
  await until(() => first.held, 'the batch in flight')
  return { first, spool, lines, writer, batch }
}

/** The process's exit listeners added since `before` (a writer's, while it has something to say at exit). */
function exitListenersSince (before: Function[]): Function[] {
  return process.listeners('exit').filter(l => !before.includes(l))
}

// Entries that came after close were said a line a second: the first at once, the rest when the
// second had passed; a shutdown exits as soon as the app has closed, and those were never said
// (counted lost, in a /metrics no one reads any more).
t.test('writer: entries that come after close and are not said yet are said at the process\'s exit, should it come first', async t => {
  const store = flakyStore()
  const spool = await Spool.open(spoolDir(t))
  const errors: Array<{ obj: object, msg: string }> = []
  const log = { ...quiet, error: (obj: object, msg: string) => { errors.push({ obj, msg }) } }
  const writer = new AuditWriter({ store, spool, batchSize: 10, queueMax: 100, intervalMs: 5, log })
  await writer.close()
  const before = process.listeners('exit')
  for (let i = 0; i < 50; i++) writer.enqueue(entry())
  const logged = (): number => errors.reduce((n, e) => n + ((e.obj as { entries?: number }).entries ?? 0), 0)
  t.equal(logged(), 1, 'the first said at once')
  const added = exitListenersSince(before)
  t.equal(added.length, 1, 'one exit listener while the rest is not said')
  for (const l of added) l(0)
  t.equal(logged(), 50, 'the rest said at exit')
  await new Promise(resolve => setTimeout(resolve, 1100))
  t.equal(logged(), 50, 'not said twice')
  t.equal(exitListenersSince(before).length, 0, 'the listener is gone')
  await spool.close()
})

// close left the batch in flight to its write's end (the disk refused its append): the line said
// "lost unless it goes through", and nothing more was said when it went through, nor when the
// process exited first: an operator could not tell stored from lost from not known.
t.test('writer: the batch close left to its write says it was stored when the write goes through, and unknown should the process exit first', async t => {
  for (const end of ['exit', 'stored'] as const) {
    const { first, spool, lines, writer, batch } = await leftToItsWrite(t)
    const before = process.listeners('exit')
    await writer.close()
    const added = exitListenersSince(before)
    t.equal(added.length, 1, `${end}: an exit listener while the write runs`)
    const ids = { firstId: batch[0]!.id, lastId: batch[9]!.id }
    if (end === 'exit') {
      for (const l of added) l(0)
      t.match(lines.at(-1), { level: 'error', obj: { entries: 10, ...ids }, msg: /not known to be stored/ }, 'said unknown at exit, with the ids to look up')
      first.release(false)
    } else {
      first.release(true)
      await until(() => !writer.writing, 'the write went through')
      t.match(lines.at(-1), { level: 'info', obj: { entries: 10, ...ids }, msg: /stored/ }, 'said stored')
    }
    await until(() => !writer.writing, `${end}: the write ended`)
    t.equal(exitListenersSince(before).length, 0, `${end}: the listener is gone`)
    await spool.close()
  }
})

// The README and the orphan's first line say the batch close left to its write is said with the
// ids of its first and last entries, then stored or lost when the write ends: the line saying it
// lost (its write failed) carried its count only, the ids of none.
t.test('writer: the batch close left to its write says it was lost, with its ids, when the write fails', async t => {
  let lost = 0
  const { first, spool, lines, writer, batch } = await leftToItsWrite(t, { hooks: { lost: n => { lost += n } } })
  await writer.close()
  t.equal(lost, 0, 'not counted lost while its write runs')
  first.release(false)
  await until(() => !writer.writing && lost > 0, 'the write failed')
  t.equal(lost, 10, 'counted lost once its write failed')
  t.match(lines.at(-1), { level: 'error', obj: { entries: 10, firstId: batch[0]!.id, lastId: batch[9]!.id }, msg: /lost at shutdown/ }, 'said lost, with the ids to look up')
  await spool.close()
})

// The write close left to its end went through, but its entries were in the store already (an
// earlier write committed without its answer, and the disk refused the batch it brought back):
// nothing was said after "lost unless it goes through", which then read as lost.
t.test('writer: the batch close left to its write is said stored when its write goes through, also when the store had its entries already', async t => {
  let stored = 0
  let lost = 0
  const { first, spool, lines, writer, batch } = await leftToItsWrite(t, { hooks: { stored: n => { stored += n }, lost: n => { lost += n } }, storedBefore: true })
  await writer.close()
  first.release(true)
  await until(() => !writer.writing, 'the write went through')
  t.same({ stored, lost }, { stored: 0, lost: 0 }, 'counted nowhere anew (stored before)')
  t.match(lines.at(-1), { level: 'info', obj: { entries: 10, firstId: batch[0]!.id, lastId: batch[9]!.id }, msg: /stored, the write went through/ }, 'said stored')
  await spool.close()
})
