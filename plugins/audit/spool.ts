import { constants } from 'node:fs'
import { lstat, open, readFile, readlink, rename, link, mkdir, writeFile, unlink, stat, utimes, type FileHandle } from 'node:fs/promises'
import { hostname } from 'node:os'
import { hash, randomUUID } from 'node:crypto'
import { join, resolve } from 'node:path'
import type { AuditEntry } from './entry.js'

// An append-only file of batches, one JSON line each with its count and a SHA-256 of its
// entries, written with one fsync per batch. Written by hand: it is the gateway's own
// write-ahead log for the audit trail, and no library keeps these guarantees for us.

export const SPOOL_FILE = 'audit.spool'
/** Beside the spool: the entries the store refused for their own data, for an operator to read. */
export const QUARANTINE_FILE = 'audit.quarantine'
const LOCK_FILE = 'audit.lock'
/**
 * The spool's and quarantine's files are the owner's alone, as its directory when the spool makes
 * it: they hold audit entries (tenants, users, actions, request ids), which any local account
 * could read from the default directory in the shared tmpdir (0644 files in a 0755 directory).
 */
const FILE_MODE = 0o600
const DIR_MODE = 0o700
/**
 * The spool's files are opened through a symbolic link only if it is this process's user's own:
 * one another local account put in their place in a shared directory made the spool append audit
 * lines to the file it named, and truncate it once replayed. (A link of the gateway's own user is
 * followed: an operator's, or a test's pointing at /dev/full to stand for a full disk.)
 */
const APPEND = constants.O_APPEND | constants.O_CREAT | constants.O_RDWR
const NOFOLLOW = constants.O_NOFOLLOW ?? 0

/**
 * Opens a spool or quarantine file for appending, refusing a symbolic link (see APPEND) or a
 * regular file (ownedHere) this process's user does not own.
 */
async function openOwn (path: string): Promise<FileHandle> {
  let fh: FileHandle
  try {
    fh = await open(path, APPEND | NOFOLLOW, FILE_MODE)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ELOOP') throw err
    const uid = process.getuid?.()
    const owner = (await lstat(path)).uid
    if (uid !== undefined && owner !== uid) throw new Error(`${path} is a symbolic link of another user (uid ${owner}, the gateway runs as ${uid}): it is not followed; give the gateway a spool directory of its own (BFF_AUDIT_SPOOL_DIR)`)
    fh = await open(path, APPEND, FILE_MODE)
  }
  return await ownedHere(fh, path)
}

/**
 * Opens the compaction's copy, created anew: what is in its place (a copy a crash left, a symbolic
 * link or a file another local account put there in a shared directory) is removed first, never
 * opened. Opened with 'w' as any file is, the copy followed such a link, truncated and wrote the
 * file it named (one of the gateway's own), and the link was then renamed over the spool, whose
 * next open refused it: the spool unusable for the rest of the process. A link of this process's
 * user is followed, as for the spool's own file (see APPEND). O_EXCL follows no link: one put back
 * between the unlink and the open fails this compaction, and the next drain compacts again.
 */
async function openCopy (path: string): Promise<FileHandle> {
  const found = await lstat(path).catch(() => null)
  const uid = process.getuid?.()
  if (found !== null && found.isSymbolicLink() && (uid === undefined || found.uid === uid)) return await open(path, 'w', FILE_MODE)
  if (found !== null) await unlink(path).catch(() => {})
  return await open(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | NOFOLLOW, FILE_MODE)
}

/**
 * Refuses (closing it) a spool or quarantine file this process's user does not own: another local
 * account made it (in the default directory, in the shared tmpdir), and may have written batches
 * that the spool would replay into the audit trail as the gateway's own, hash-chained with them.
 * Only a regular file: a device (/dev/full, say) holds no batches, and only root makes one.
 */
async function ownedHere (fh: FileHandle, path: string): Promise<FileHandle> {
  const uid = process.getuid?.()
  if (uid === undefined) return fh
  const stats = await fh.stat()
  if (!stats.isFile() || stats.uid === uid) return fh
  await fh.close().catch(() => {})
  throw new Error(`${path} belongs to another user (uid ${stats.uid}, the gateway runs as ${uid}): what it holds would be replayed into the audit trail as the gateway's own; give the gateway a spool directory of its own (BFF_AUDIT_SPOOL_DIR)`)
}
/** The holder of a lock touches it this often (SpoolLimits.heartbeatMs in tests). */
const LOCK_HEARTBEAT_MS = 5_000
/** A lock whose pid is alive here is another process's unless untouched this long (a reused pid). */
const LOCK_STALE_MS = 30_000

interface SpoolLine { n: number, sum: string, entries: AuditEntry[] }

/** How much of the spool a drain holds at once: a read's window, and the longest line kept. */
export interface SpoolLimits { window: number, line: number, heartbeatMs?: number }
// A line is one batch: BFF_AUDIT_BATCH_SIZE (at most 10,000) entries of a few hundred bytes.
export const SPOOL_LIMITS: SpoolLimits = { window: 1 << 20, line: 256 << 20 }

const checksum = (json: string): string => hash('sha256', json, 'hex')

export class SpoolInUseError extends Error {}

/** The spool directories this process holds open (resolved): a second open of one is refused. */
const OPEN_HERE = new Set<string>()

/**
 * Guarantees: a batch `append` resolved for is on disk; batches are read back in the order they
 * were appended; `drain` removes a batch only after its handler resolved (the store committed),
 * so a crash at any point replays it again rather than losing it. A torn last line (a crash
 * mid-write) and a line whose checksum fails are skipped and counted, never replayed half.
 */
export class Spool {
  private fh: FileHandle | null = null
  /** Touches the lock file, so that another host can tell it is held (Spool.open). */
  private heartbeat: NodeJS.Timeout | null = null
  /** The lock's text as this process wrote it, and whether another process has taken it since. */
  private lock = ''
  private lost = false
  private bytes = 0
  /** An append failed: its part may still be in the file (its cut failed too), see lineEnd. */
  private torn = false
  /** `close` was called: the file is not opened again. */
  private closed = false
  /** A drain reads the file (by offsets of this file: it is not replaced until its compaction). */
  private draining = false
  /** An append replacing a file removed under it (see appendMany), while it does. */
  private relinking: Promise<void> | null = null
  /** A compaction renamed the file and could not sync its directory: synced before the file is used again. */
  private unsynced = false
  // Appends, drains and compaction run one after another.
  private chain: Promise<unknown> = Promise.resolve()
  /** Bytes at the start of the file already committed to the store by this process. */
  private done = 0
  corrupt = 0
  /**
   * Where the corrupt lines counted end (bytes of the file): a drain whose commit failed leaves
   * `done` before the corrupt lines joined with batches it had not committed, and the next drain
   * reads them again; each was counted again at every retry of an outage.
   */
  private countedTo = 0
  /**
   * How often the file was found shorter than written (cut short from outside, see shortened): a
   * drain's offsets are those of the file before, so a drain stops once it changes.
   */
  private shrinks = 0

  /** Where the entries the store refused for their own data go, beside the spool. */
  readonly quarantine: Quarantine

  private constructor (readonly dir: string, private readonly limits: SpoolLimits) {
    this.quarantine = new Quarantine(dir)
  }

  get path (): string { return join(this.dir, SPOOL_FILE) }
  /** Bytes waiting to be replayed. */
  get size (): number { return this.bytes - this.done }

  /**
   * Opens the spool of `dir`, taking its lock file (`<pid> <hostname> <pid namespace> <nonce>`):
   * two processes on one spool would replay, and truncate, each other's batches. Its holder
   * touches it every LOCK_HEARTBEAT_MS. A lock written on this host in this PID namespace names a
   * process here: it holds the spool while that process is alive (and is not this one, which has
   * not opened it: an earlier process's pid, reused) and has touched it within LOCK_STALE_MS. Any
   * other lock (another host's, another container's, an older version's without a namespace, an
   * empty one) is told by its heartbeat: one touched within LOCK_STALE_MS is watched for two
   * heartbeats, and held if touched meanwhile. The hostname and pid alone did not tell:
   * containers on one volume may share the hostname (host networking, a fixed one) and each be
   * PID 1, so a live twin's lock was taken as this process's own earlier run's and both wrote the
   * spool; a container restarted after a crash, a new PID namespace, waits at most that long for
   * its predecessor's lock.
   */
  static async open (dir: string, limits: SpoolLimits = SPOOL_LIMITS): Promise<Spool> {
    const inUse = (owner: number | string): SpoolInUseError => new SpoolInUseError(`BFF_AUDIT_SPOOL_DIR=${dir} is in use by process ${owner}: give each gateway instance its own spool directory`)
    const beat = limits.heartbeatMs ?? LOCK_HEARTBEAT_MS
    const here = resolve(dir)
    if (OPEN_HERE.has(here)) throw inUse(process.pid)
    OPEN_HERE.add(here)
    try {
      await mkdir(dir, { recursive: true, mode: DIR_MODE })
      const lock = join(dir, LOCK_FILE)
      const namespace = await pidNamespace()
      // The nonce tells this holder's lock from any other's, a twin's with the same pid included.
      const mine = `${process.pid} ${hostname()} ${namespace} ${randomUUID()}`
      if (!await create(lock, mine)) {
        const read = await readFile(lock, 'utf8').then(text => ({ text }), () => null)
        const judged = read?.text ?? ''
        const [pid, host, ns] = judged.split(' ')
        const owner = pid === '' ? 'unknown' : pid
        const touchedAt = await stat(lock).then(st => st.mtimeMs, () => null)
        // Read, then gone: another process is taking it over this moment (and may put it back).
        if (read !== null && touchedAt === null) throw inUse(`${owner} (its lock is being taken over by another process)`)
        if (touchedAt !== null) {
          if (host === hostname() && ns === namespace) {
            const holder = Number(pid)
            if (Number.isInteger(holder) && holder > 0 && holder !== process.pid && alive(holder) && Date.now() - touchedAt < LOCK_STALE_MS) throw inUse(holder)
          } else if (Date.now() - touchedAt < LOCK_STALE_MS && await touchedSince(lock, touchedAt, 2 * beat)) {
            throw inUse(`${owner} on ${host ?? 'an unnamed host'} (it touched its lock while this one waited)`)
          }
        }
        // Gone when read (its holder closed): created anew, only if no other process did meanwhile.
        // There (an empty one included: a write that failed, a crash before it), taken over.
        const taken = read === null ? await create(lock, mine) : await takeOver(lock, judged, mine)
        if (!taken) throw inUse(`${owner} (another process took the lock over at the same time)`)
      }
      const spool = new Spool(dir, limits)
      spool.lock = mine
      spool.fh = await openOwn(spool.path)
      // One an earlier version made (0644) is the owner's alone from now on.
      await spool.fh.chmod(FILE_MODE).catch(() => {})
      // The file's directory entry on disk (it may have just been created): batches fsynced into
      // a file a crash then loses from its directory would be lost with it.
      await syncDir(dir)
      spool.bytes = (await spool.fh.stat()).size
      await spool.cutTornTail()
      // Each beat, the lock is read first: a holder whose lock another process took (its event
      // loop stalled past the other's watch, say) stops using the spool rather than share it.
      spool.heartbeat = setInterval(() => {
        spool.held().then(held => {
          if (!held) return
          const now = new Date()
          return utimes(lock, now, now)
        }).catch(() => {})
      }, beat)
      spool.heartbeat.unref()
      return spool
    } catch (err) {
      OPEN_HERE.delete(here)
      throw err
    }
  }

  /**
   * A crash mid-append leaves a line without its newline: cut it, or the next batch would join it.
   * The file is searched backwards for the last newline one window at a time: a line of one batch
   * can be several MiB (BFF_AUDIT_BATCH_SIZE up to 10,000), and a file with no newline at all is
   * one torn line, cut whole.
   */
  private async cutTornTail (): Promise<void> {
    const fh = this.fh
    if (this.bytes === 0 || fh === null) return
    const window = Buffer.alloc(Math.min(this.bytes, this.limits.window))
    let keep = 0
    for (let end = this.bytes; end > 0;) {
      const start = Math.max(0, end - window.length)
      await fh.read(window, 0, end - start, start)
      const nl = window.subarray(0, end - start).lastIndexOf(10)
      if (nl !== -1) {
        keep = start + nl + 1
        break
      }
      end = start
    }
    if (keep === this.bytes) return
    await fh.truncate(keep)
    this.bytes = keep
    this.corrupt++
  }

  private serial<T> (fn: () => Promise<T>): Promise<T> {
    const run = this.chain.then(fn, fn)
    this.chain = run.catch(() => {})
    return run
  }

  /** Appends one batch and fsyncs it. */
  async append (batch: AuditEntry[]): Promise<void> {
    await this.appendMany([batch])
  }

  /** Appends batches, one line each, with one fsync for them all. */
  async appendMany (batches: AuditEntry[][]): Promise<void> {
    const text = batches.map(batch => {
      const entries = JSON.stringify(batch)
      return `{"n":${batch.length},"sum":"${checksum(entries)}","entries":${entries}}\n`
    }).join('')
    const data = Buffer.from(text)
    await this.serial(async () => {
      let fh = await this.handle()
      await this.mustHold()
      // The file was removed under the open handle (a cleaner of the tmpdir, the default
      // directory, removes files by age: an idle, empty spool is old): appended to as it was,
      // a batch was fsynced into a file no directory named, acknowledged, and lost with the
      // process. What it holds not yet replayed goes to a new file first. (During a drain, its
      // compaction does that, after the drain's last read of the old file.)
      const st = await fh.stat()
      if (!this.draining && st.nlink === 0) {
        const relink = this.rewrite(fh)
        this.relinking = relink.catch(() => {})
        try {
          await relink
        } finally {
          this.relinking = null
        }
        this.torn = false
        fh = await this.handle()
      } else if (st.size < this.bytes) {
        this.shortened(st.size)
      }
      try {
        this.bytes = await appendWhole(fh, data, this.bytes, this.torn)
      } catch (err) {
        this.torn = true
        throw err
      }
      this.torn = false
    })
  }

  /**
   * Hands the batches not yet replayed to `commit`, in order: consecutive ones joined while they
   * hold at most `join` entries together (a batch of more stays alone), so that a spool of many
   * small batches (a flush every 50 ms while the store was away) is replayed in few transactions;
   * by default each alone. A batch is cut only once the commit it was part of resolved: when every
   * batch is committed the replayed part is cut from the file (what was appended meanwhile stays);
   * when `commit` throws, its batches and the rest stay for the next drain. Returns the entries
   * replayed.
   *
   * The file is read a window at a time, never whole: a spool grows for as long as the store is
   * away, and one read of a spool over 2 GiB aborted the process (a native assertion in Node's
   * fs), at every replay and again after every restart. A line longer than any batch can make
   * (`limits.line`) is skipped as corrupt without being held in memory.
   */
  async drain (commit: (batch: AuditEntry[]) => Promise<void>, join = 1): Promise<number> {
    // No append replaces the file while a drain reads it by its offsets; one replacing it now ends first.
    this.draining = true
    try {
      if (this.relinking !== null) await this.relinking
      return await this.drainNow(commit, join)
    } finally {
      this.draining = false
    }
  }

  private async drainNow (commit: (batch: AuditEntry[]) => Promise<void>, join: number): Promise<number> {
    const start = this.done
    const end = this.bytes
    if (end <= start || this.closed) return 0
    const fh = this.fh ?? await this.serial(async () => await this.handle())
    const { window, line: maxLine } = this.limits
    // The file this drain reads by its offsets: cut short from outside meanwhile, it is not.
    const shrinks = this.shrinks
    // Appends only ever write past `end`: reading up to it needs no lock.
    let replayed = 0
    // The start of a line that runs on past the window, held until its newline; none while
    // skipping an overlong line, whose bytes are dropped up to its newline.
    let held: Buffer[] = []
    let heldBytes = 0
    let skipping = false
    // Batches read and not yet committed, joined; `mark`: the end of the last line read, where
    // `done` goes once they are committed (corrupt lines among them are passed over with them).
    let pending: AuditEntry[] = []
    let mark = start
    const flush = async (): Promise<void> => {
      const batch = pending
      pending = []
      await commit(batch)
      replayed += batch.length
      if (this.shrinks === shrinks) this.done = mark
    }
    for (let at = start; at < end && this.shrinks === shrinks;) {
      const { bytesRead, buffer } = await fh.read(Buffer.allocUnsafe(Math.min(window, end - at)), 0, Math.min(window, end - at), at)
      if (bytesRead === 0) break
      const data = buffer.subarray(0, bytesRead)
      const base = at
      at += bytesRead
      let pos = 0
      for (let nl = data.indexOf(10); nl !== -1 && this.shrinks === shrinks; nl = data.indexOf(10, pos)) {
        if (skipping) skipping = false
        else {
          const piece = data.subarray(pos, nl)
          const batch = parse((heldBytes === 0 ? piece : Buffer.concat([...held, piece])).toString('utf8'))
          if (batch === null) {
            if (base + nl + 1 > this.countedTo) this.corrupt++
          } else {
            const entries = batch.entries
            if (pending.length > 0 && pending.length + entries.length > join) await flush()
            if (pending.length === 0) pending = entries
            else for (const e of entries) pending.push(e)
          }
        }
        held = []
        heldBytes = 0
        pos = nl + 1
        mark = base + pos
        if (mark > this.countedTo) this.countedTo = mark
        if (pending.length >= join) await flush()
        else if (pending.length === 0 && this.shrinks === shrinks) this.done = mark
      }
      if (skipping || pos === data.length) continue
      if (heldBytes + data.length - pos > maxLine) {
        if (base + data.length > this.countedTo) this.corrupt++
        skipping = true
        held = []
        heldBytes = 0
      } else {
        held.push(data.subarray(pos))
        heldBytes += data.length - pos
      }
    }
    if (pending.length > 0 && this.shrinks === shrinks) await flush()
    await this.serial(async () => { await this.compact() })
    return replayed
  }

  /** Cuts the replayed part: truncates, or copies what was appended since (a window at a time) through a rename. */
  private async compact (): Promise<void> {
    if (this.closed || this.done === 0) return
    const fh = await this.handle()
    // The file is another process's now: its batches appended since must not be cut.
    await this.mustHold()
    const st = await fh.stat()
    if (st.size < this.bytes) this.shortened(st.size)
    if (this.done === 0) return
    if (this.bytes === this.done && st.nlink !== 0) {
      await fh.truncate(0)
      await fh.datasync()
      this.cut()
      return
    }
    await this.rewrite(fh)
  }

  /**
   * Copies what is not replayed yet (from `done`) into a new file that takes the spool's place,
   * a window at a time, and goes on with it: the compaction of a spool appended to meanwhile, and
   * a spool whose file was removed under it (see appendMany).
   */
  private async rewrite (fh: FileHandle): Promise<void> {
    const tmp = this.path + '.tmp'
    const out = await openCopy(tmp)
    try {
      if (await copyRange(fh, out, this.done, this.bytes, this.limits.window) < this.bytes - this.done) throw new Error('the audit spool is shorter than written')
      await out.datasync()
    } catch (err) {
      // A copy cut short (a full disk, mostly) is removed: left, it held the space the spool's
      // next appends need until the next compaction. The spool itself is whole; the next
      // drain compacts again.
      await out.close().catch(() => {})
      await unlink(tmp).catch(() => {})
      throw err
    }
    await out.close()
    // From here until the new file is open the spool has no handle: should a step fail (an I/O
    // error, no file descriptor left), the next use opens the file again (handle), the old one
    // whole if the rename failed, else the new one. Before, the closed handle stayed, and every
    // append and drain after failed for the life of the process: the writer took the store
    // for down, its backlog filled, calls were refused 503, and what it held at shutdown was lost.
    this.fh = null
    await fh.close()
    await rename(tmp, this.path)
    this.cut()
    // The rename on disk before batches are appended to the new file (a crash could else bring
    // back the old file, replayed part and all, without them).
    this.unsynced = true
    await this.handle()
  }

  /**
   * The file is `size` bytes, shorter than written: cut short from outside (an operator's
   * `: > audit.spool`, a logrotate copytruncate). What it still holds is the start of what was
   * written; the rest is gone. The spool goes on from its real end, on a line of its own (the cut
   * may have left half a line: one corrupt line, skipped on replay), and replays what was not
   * replayed of what is left. Before, it went on by the length it had written: the next append
   * (O_APPEND: at the real end) joined a line cut mid-way, the acknowledged batch lost with it,
   * and every compaction failed ("shorter than written"), the file never cut again.
   */
  private shortened (size: number): void {
    this.bytes = size
    this.done = Math.min(this.done, size)
    this.countedTo = Math.min(this.countedTo, size)
    this.torn = true
    this.shrinks++
  }

  /** The replayed part is cut from the file: offsets from its new start. */
  private cut (): void {
    this.bytes -= this.done
    this.countedTo = Math.max(0, this.countedTo - this.done)
    this.done = 0
  }

  /**
   * The spool file's handle: opened again after a compaction that failed between closing the old
   * file and opening the new one, its directory synced first when a rename is not known on disk.
   */
  private async handle (): Promise<FileHandle> {
    if (this.fh !== null) return this.fh
    if (this.closed) throw new Error('the audit spool is closed')
    if (this.unsynced) {
      await syncDir(this.dir)
      this.unsynced = false
    }
    this.fh = await openOwn(this.path)
    return this.fh
  }

  /**
   * Whether the lock is still this process's: lost, for good, only when it holds another's text.
   * Absent or empty, it is still taken as this one's: another process taking a lock over moves it
   * aside a moment, and puts back one that is not the stale lock it judged.
   */
  async held (): Promise<boolean> {
    if (this.lost) return false
    const text = await readFile(join(this.dir, LOCK_FILE), 'utf8').catch(() => '')
    if (text !== '' && text !== this.lock) {
      this.lost = true
      if (this.heartbeat !== null) clearInterval(this.heartbeat)
    }
    return !this.lost
  }

  /** Throws when the lock is another process's: this one no longer writes or cuts the spool. */
  private async mustHold (): Promise<void> {
    if (!await this.held()) throw new SpoolInUseError(`the audit spool ${this.dir} was taken over by another process: this one no longer writes it`)
  }

  async close (): Promise<void> {
    if (this.heartbeat !== null) clearInterval(this.heartbeat)
    this.heartbeat = null
    await this.quarantine.close()
    this.closed = true
    await this.serial(async () => {
      try {
        await this.fh?.close()
        this.fh = null
        // Only its own: a lock another process took stays that process's.
        if (await this.held()) await unlink(join(this.dir, LOCK_FILE)).catch(() => {})
      } finally {
        OPEN_HERE.delete(resolve(this.dir))
      }
    })
  }
}

/**
 * Writes `data` at the end of `fh` (a file `bytes` long) and fsyncs it. Nothing of a failed
 * append stays: a part of a line left behind would join the next append's, and both be lost to
 * whoever reads the file line by line.
 */
async function appendSynced (fh: FileHandle, data: Buffer, bytes: number): Promise<void> {
  try {
    // A write may take fewer bytes than it was given (a full disk): the rest follows.
    for (let at = 0; at < data.length;) at += (await fh.write(data, at, data.length - at)).bytesWritten
    await fh.datasync()
  } catch (err) {
    await fh.truncate(bytes).catch(() => {})
    throw err
  }
}

const NEWLINE = Buffer.from('\n')

/**
 * Where a file ends after a failed append (the part it wrote stays when the cut failed too), and
 * whether it ends inside a line: the next append then starts on a line of its own, so that the
 * torn part is one corrupt line, skipped on replay, rather than joined to the next batch's line
 * (both lost, an acknowledged batch with them).
 */
async function lineEnd (fh: FileHandle): Promise<{ size: number, open: boolean }> {
  const size = (await fh.stat()).size
  const last = Buffer.alloc(1)
  const open = size > 0 && (await fh.read(last, 0, 1, size - 1)).bytesRead === 1 && last[0] !== 10
  return { size, open }
}

/**
 * Appends `data` at `bytes`, the end of a file only this process appends to, and syncs it; after
 * a failed append (`torn`), at the file's real end and on a line of its own (lineEnd). The new end.
 */
async function appendWhole (fh: FileHandle, data: Buffer, bytes: number, torn: boolean): Promise<number> {
  let out = data
  if (torn) {
    const end = await lineEnd(fh)
    bytes = end.size
    if (end.open) out = Buffer.concat([NEWLINE, data])
  }
  await appendSynced(fh, out, bytes)
  return bytes + out.length
}

/** An entry the store refused for its own data (README, "Audit trail"). */
export interface QuarantineRecord {
  /** When it was set aside, ISO 8601. */
  time: string
  /** The store's error code (PostgreSQL's SQLSTATE), null when it gave none. */
  sqlstate: string | null
  error: string
  entry: AuditEntry
}

/**
 * The quarantine file of a spool directory: append-only, one JSON line per entry, fsynced before
 * `append` resolves, with the spool's discipline (a failed append leaves nothing). Never read back
 * by the gateway: an operator reads it, and replays what can be replayed by hand. Opened at its
 * first append, so that the file exists only when something was quarantined.
 */
export class Quarantine {
  private fh: FileHandle | null = null
  private bytes = 0
  /** An append failed: its part may still be in the file (its cut failed too), see lineEnd. */
  private torn = false
  private closed = false
  private chain: Promise<unknown> = Promise.resolve()

  constructor (readonly dir: string) {}

  get path (): string { return join(this.dir, QUARANTINE_FILE) }

  async append (records: QuarantineRecord[]): Promise<void> {
    const data = Buffer.from(records.map(r => JSON.stringify(r) + '\n').join(''))
    const run = this.chain.then(async () => {
      if (this.closed) throw new Error('the audit quarantine is closed')
      if (this.fh === null) {
        const fh = await openOwn(this.path)
        try {
          await fh.chmod(FILE_MODE).catch(() => {})
          // A line torn by a crash stays as it is (an operator reads it), on a line of its own.
          const end = await lineEnd(fh)
          this.bytes = end.size
          if (end.open) {
            await appendSynced(fh, NEWLINE, this.bytes)
            this.bytes++
          }
        } catch (err) {
          await fh.close()
          throw err
        }
        this.fh = fh
      } else {
        const st = await this.fh.stat()
        if (st.nlink === 0) {
          // Removed under the open handle (a cleaner of the tmpdir, as for the spool): its records,
          // which are nowhere else, go to a new file first, then this append. Before, records went
          // on into a file no directory named, and were lost with the process.
          this.fh = await this.relinked(this.fh)
          this.torn = false
        } else if (st.size < this.bytes) {
          // Emptied or cut short from outside (an operator who stored its entries by hand): it goes
          // on from its real end, on a line of its own. Before, an append that failed then was cut
          // back to the length written before, past the end: a run of NUL bytes the next record
          // followed on its line, unreadable as JSON.
          this.bytes = st.size
          this.torn = true
        }
      }
      try {
        this.bytes = await appendWhole(this.fh, data, this.bytes, this.torn)
      } catch (err) {
        this.torn = true
        throw err
      }
      this.torn = false
      // The file was empty: only then is its new end the data's length (a torn one is not empty).
      const created = this.bytes === data.length
      // A file just created is found after a crash only once its directory entry is on disk too.
      if (created) await syncDir(this.dir)
    })
    this.chain = run.catch(() => {})
    await run
  }

  /** A new file at the path holding what `old` (removed) held, synced, its directory entry too. */
  private async relinked (old: FileHandle): Promise<FileHandle> {
    const fh = await openOwn(this.path)
    try {
      await fh.chmod(FILE_MODE).catch(() => {})
      await copyRange(old, fh, 0, this.bytes, SPOOL_LIMITS.window)
      await fh.datasync()
      await syncDir(this.dir)
      this.bytes = (await fh.stat()).size
    } catch (err) {
      await fh.close().catch(() => {})
      throw err
    }
    await old.close().catch(() => {})
    return fh
  }

  async close (): Promise<void> {
    await this.chain
    this.closed = true
    await this.fh?.close()
    this.fh = null
  }
}

/** Copies `from`'s bytes [start, end) to the end of `to`, a window at a time: how many it copied (fewer: `from` is shorter). */
async function copyRange (from: FileHandle, to: FileHandle, start: number, end: number, window: number): Promise<number> {
  const buf = Buffer.allocUnsafe(Math.max(1, Math.min(window, end - start)))
  let at = start
  while (at < end) {
    const { bytesRead } = await from.read(buf, 0, Math.min(buf.length, end - at), at)
    if (bytesRead === 0) break
    for (let w = 0; w < bytesRead;) w += (await to.write(buf, w, bytesRead - w)).bytesWritten
    at += bytesRead
  }
  return at - start
}

async function syncDir (dir: string): Promise<void> {
  const fh = await open(dir, 'r')
  try {
    await fh.sync()
  } finally {
    await fh.close()
  }
}

function parse (text: string): SpoolLine | null {
  try {
    const line = JSON.parse(text) as SpoolLine
    if (!Array.isArray(line.entries) || line.entries.length !== line.n || checksum(JSON.stringify(line.entries)) !== line.sum) return null
    return line
  } catch {
    return null
  }
}

/**
 * Replaces the lock `judged` (another's that is no longer used, or an empty one) with `mine`, and
 * whether it did: atomically, so that of two processes taking one lock over at once only one
 * does. The lock is moved aside (a rename: only one succeeds), checked to be the one judged
 * (else it is put back), and `mine` is created only if no lock is there (`wx`).
 */
async function takeOver (lock: string, judged: string, mine: string): Promise<boolean> {
  const aside = `${lock}.${randomUUID()}`
  try {
    await rename(lock, aside)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
  }
  const moved = await readFile(aside, 'utf8').catch(() => null)
  if (moved !== null && moved !== judged) {
    // Another's new lock, written since it was judged: it goes back where it was.
    await link(aside, lock).catch(() => {})
    await unlink(aside).catch(() => {})
    return false
  }
  await unlink(aside).catch(() => {})
  return await create(lock, mine)
}

/** Creates the lock as `mine` if there is none, and whether it did. */
async function create (lock: string, mine: string): Promise<boolean> {
  try {
    await writeFile(lock, mine, { flag: 'wx' })
    return true
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false
    throw err
  }
}

/**
 * Whether the lock is touched again (its mtime moves from `touchedAt`) within `ms` from now: its
 * holder is alive. Looked at every tenth of that. From now, not from the mtime: another host's
 * clock may be behind. By performance.now(): on the wall clock, one stepped back an hour while
 * this watched kept the start-up watching an untouched lock for that hour.
 */
async function touchedSince (lock: string, touchedAt: number, ms: number): Promise<boolean> {
  const until = performance.now() + ms
  while (performance.now() < until) {
    await new Promise(resolve => setTimeout(resolve, Math.min(ms / 10, Math.max(1, until - performance.now()))))
    const now = await stat(lock).then(s => s.mtimeMs, () => touchedAt)
    if (now !== touchedAt) return true
  }
  return false
}

/**
 * This process's PID namespace (Linux: `pid:[<inode>]`, one per container), `-` where there is
 * none to read: a pid in a lock means a process here only when written in the same one.
 */
async function pidNamespace (): Promise<string> {
  return await readlink('/proc/self/ns/pid').catch(() => '-')
}

function alive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}
