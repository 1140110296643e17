import type { AuditEntry, AuditStore } from './entry.js'
import type { QuarantineRecord, Spool } from './spool.js'

export interface WriterHooks {
  /** A batch reached the store: its size and how long the write took (s). */
  stored?: (n: number, seconds: number) => void
  spooled?: (n: number) => void
  replayed?: (n: number) => void
  /**
   * Entries a replay found stored already, which no count said the store had: a write whose
   * COMMIT went through but whose answer was lost looked failed, and its batch was counted
   * spooled only (so was one a crash caught between a replay's commit and its cut). Stored, not a flush.
   */
  found?: (n: number) => void
  failed?: (err: Error) => void
  /** Entries of a batch the store refused for their own data went to the quarantine file. */
  quarantined?: (n: number, sqlstate: string | null) => void
  /** An entry came while neither the store nor the spool took any and the backlog was full. */
  dropped?: (n: number) => void
  /**
   * Entries neither stored nor spooled at shutdown (the disk refused what `close` had left to
   * append, or they came once `close` had taken the queue for good), logged with their count.
   */
  lost?: (n: number) => void
}

/** What isolating a refused batch came to. */
interface Isolation {
  stored: number
  /** The entries not yet handled, from the first that could be neither stored nor quarantined. */
  rest: AuditEntry[]
  /** Why `rest` is not empty: the store went away, or the quarantine could not be written. */
  error: Error | null
}

export interface WriterOptions {
  store: AuditStore
  /** null for the memory store, which cannot fail. */
  spool: Spool | null
  batchSize: number
  queueMax: number
  /** The writer flushes at least this often (ms). */
  intervalMs?: number
  /**
   * How long `close` waits for the store (ms, 3000) before it spools what is not stored yet: a
   * shutdown has a grace of 10 s in all (server.ts), and a write to a PostgreSQL that does not
   * answer fails only after its query timeout (10 s).
   */
  closeTimeoutMs?: number
  /**
   * How long `close`, once it stopped waiting for the store, waits for the spool's disk (ms, 1000):
   * an append that does not settle (a hung volume) held the shutdown until it was killed at its
   * grace, every later onClose hook unrun and the entries lost without a word.
   */
  diskTimeoutMs?: number
  log: { warn: (obj: object, msg: string) => void, info: (obj: object | string, msg?: string) => void, error: (obj: object, msg: string) => void }
  hooks?: WriterHooks
}

const MAX_BACKOFF_MS = 2000
const CLOSE_TIMEOUT_MS = 3000
const DISK_TIMEOUT_MS = 1000
/** Entries that come after `close` took the queue are logged in one line at most this often (ms). */
const LATE_LOG_MS = 1000
/** After the spool refused a full queue, the next one is tried this much later (ms). */
const SPOOL_RETRY_MS = 1000
/** The backlog the writer holds in memory at most, in queues (BFF_AUDIT_QUEUE_MAX each). */
const BACKLOG_QUEUES = 2

/** A batch `deliver` is writing to the store (see AuditWriter.inFlight). */
interface Flight {
  batch: AuditEntry[]
  spooled: boolean
  quarantined: Set<string>
  onDisk: boolean
  counted: boolean
  /** Its write went through (isolation included): every entry is stored or quarantined. */
  done: boolean
  /** Entries the write stored while `counted` (not counted stored then: `close` counted them). */
  late: number
  /** How long that write took (s), for the flush it is counted as should `close` count `late` stored after all. */
  lateSeconds: number
  /** How many of its entries the append that took it holds. */
  taken: number
  /**
   * `close` could not put it on disk (the disk refused or did not answer) while its write ran:
   * the write's end counts it, stored what went through and lost (logged) the rest.
   */
  orphaned: string | null
  /**
   * Its write ended, taken to the spool by a full queue's append still under way: how many of its
   * entries (neither stored nor quarantined) wait for that append to be counted spooled.
   */
  waiting: number
}

/**
 * The writer's clock for its interval, backoff and pauses: monotonic. On the wall clock, a step
 * back (NTP setting right a clock that ran fast, a VM resumed) held a partial batch in memory,
 * and a store that had come back untried, until the clock came back to where it had been.
 */
const monotonic = (): number => performance.now()

/** Thrown into a spool replay that `close` has stopped waiting for: the rest stays spooled. */
class Abandoned extends Error {}

/**
 * Takes entries off the hot path: `enqueue` only pushes to a bounded array. One flush at a time
 * writes batches to the store; while the store fails (or the spool still holds batches, so that
 * order is kept) batches go to the spool, which is replayed once the store answers again. A full
 * queue is spooled at once. Guarantees: an entry enqueued is stored or spooled (fsynced) before
 * `close` resolves; it is never dropped. Only when the disk refuses at shutdown too is it lost,
 * logged with its count and counted (hooks.lost).
 */
export class AuditWriter {
  private queue: AuditEntry[] = []
  private flushing: Promise<void> | null = null
  private readonly timer: NodeJS.Timeout
  /** A tick due before the interval's next one (tickAt). */
  private rest: NodeJS.Timeout | null = null
  /** When the last batch began (monotonic ms): the next partial one waits an interval from it. */
  private began = -Infinity
  private kicked = false
  private closed = false
  /** `close` stopped waiting for the store: what it had not stored was spooled. */
  private abandoned = false
  private retryAt = 0
  private backoff = 0
  private storeUp = true
  private lastError: string | null = null
  private readonly intervalMs: number
  /**
   * Ids quarantined from a spool line that is still to be replayed (the store went away while it
   * was being isolated): its replay skips them rather than quarantining them twice.
   */
  private readonly setAside = new Set<string>()
  /**
   * Ids of entries counted stored (or replayed) whose line is still to be replayed: the batch in
   * flight a full queue took to the spool while its write ran (takeInFlight), and what a replay's
   * isolation stored before the store went away, its line left in the spool. Left out of that
   * replay as the quarantined are (`kept`), so that it counts an entry it finds stored already
   * (`found`) only when no count said so. Cleared with setAside once the spool is replayed whole:
   * a batch at most per append of a full queue or failed replay, each followed by a replay.
   */
  private readonly storedAside = new Set<string>()
  /**
   * The last append of a full queue to the spool while it runs (appends run in order, so it
   * settles after every earlier one). The spool's size grows only once the append is fsynced:
   * meanwhile this stands for what is on its way there, and new batches follow it.
   */
  private overflowing: Promise<void> | null = null
  /**
   * The batch deliver is writing to the store, while it is. A queue that fills meanwhile takes it
   * ahead of itself to the spool (`spooled`): should the write fail, it is on disk before what was
   * enqueued after it. Before, it was appended after the full queue, out of order. `quarantined`:
   * the ids of its entries isolation has quarantined so far, which are not taken. `onDisk`: the
   * append that took it succeeded (its entries are counted spooled should the write fail).
   * `counted`: `close` counted its entries spooled, on disk at shutdown while the write had not
   * ended: the write's end counts them no more (neither stored nor spooled).
   */
  private inFlight: Flight | null = null
  /** Entries on their way to the spool in a full queue's append. */
  private held = 0
  /** Entries of a batch `deliver` is appending to the spool. */
  private appending = 0
  /** That append while it runs: `close` waits for it (should it fail, its batch comes back to the queue). */
  private appendDone: Promise<void> | null = null
  /** The batch in flight the full queue's append under way took ahead (`held` counts it). */
  private overflowFlight: Flight | null = null
  /** `close` took the queue for good: nothing writes entries put into it any more. */
  private drained = false
  /**
   * `close` stopped waiting for the spool's disk: the entries of the appends still under way are
   * counted lost, and those appends count nothing and put nothing back when they end.
   */
  private gaveUp = false
  /** Entries that came after `close` took the queue, counted lost but not logged yet, and the timer that logs them. */
  private lateLost = 0
  private lateTimer: NodeJS.Timeout | null = null
  /**
   * While something `close` left is still to be said (the late entries' line, the end of an
   * orphan's write), a listener of the process's exit that says it: the shutdown exits as soon
   * as the app has closed (close-with-grace's process.exit), before any timer or write ends.
   */
  private exitWatch: (() => void) | null = null
  /** Until when a full queue is not appended again, after the spool refused one. */
  private spoolRetryAt = 0
  /** The spool's last append failed (a full disk, say); its next success clears it. */
  private spoolFailing = false
  /** Until when the spool is not replayed again, after its replay failed on the spool's side (monotonic ms). */
  private replayAt = 0
  /** Appends to the spool under way (a full queue's, a flush's), and when the first of them began (monotonic ms). */
  private spoolBusy = 0
  private spoolBusySince = 0

  constructor (private readonly opts: WriterOptions) {
    this.intervalMs = opts.intervalMs ?? 50
    this.timer = setInterval(() => this.tick(), this.intervalMs)
    this.timer.unref()
  }

  /** Entries waiting: in the queue, in a full queue's append to the spool, in a write to the store. */
  get depth (): number {
    const flight = this.inFlight
    return this.queue.length + this.held + this.appending + (flight !== null && !flight.spooled ? flight.batch.length : 0)
  }

  /**
   * The backlog is full (two queues) while the spool refuses appends, or an append has not
   * settled for a second (spoolStalled): neither the store nor the spool takes entries. The audit
   * stage then refuses calls (a call is never served without its entry), and `enqueue` drops the
   * droppable entries that still come, counting them.
   */
  get saturated (): boolean { return (this.spoolFailing || this.spoolStalled()) && this.depth >= this.opts.queueMax * BACKLOG_QUEUES }

  /** A batch is off the queue and not yet stored or spooled (a flush or a replay is under way). */
  get writing (): boolean { return this.flushing !== null }
  get up (): boolean { return this.storeUp }
  get spoolBytes (): number { return this.opts.spool?.size ?? 0 }
  get error (): string | null { return this.lastError }

  /**
   * An append to the spool has not settled for SPOOL_RETRY_MS: a disk that does not answer (a hung
   * volume) takes entries no more than one that refuses them. Only a refusal counted, and an
   * append that never settled held every later one: while the store was away the backlog grew
   * without bound (27,000 entries within 3 s for a bound of 2 x 100), calls served on.
   */
  private spoolStalled (): boolean {
    return this.spoolBusy > 0 && monotonic() - this.spoolBusySince >= SPOOL_RETRY_MS
  }

  /** `append`, an append to the spool, counted as under way until it settles (spoolStalled). */
  private underWay (append: Promise<void>): Promise<void> {
    if (this.spoolBusy++ === 0) this.spoolBusySince = monotonic()
    return append.finally(() => { this.spoolBusy-- })
  }

  /**
   * `droppable`: the entry of a request refused before any face, dropped (and counted) while the
   * writer is saturated. Never a served call's: the audit stage refuses calls while saturated, so
   * the entries of those it admitted are bounded by the calls in flight, and each is kept.
   */
  enqueue (entry: AuditEntry, droppable = false): void {
    if (droppable && this.saturated) {
      this.opts.hooks?.dropped?.(1)
      return
    }
    if (this.drained) {
      this.late()
      return
    }
    const queue = this.queue
    queue.push(entry)
    // One append to the spool at a time (a batch `deliver` appends included), and no full queue
    // for a while after the spool refused one: each overflow encoded and hashed the whole
    // backlog, and two that failed were put back newest first (the chain's order was not the calls').
    if (queue.length >= this.opts.queueMax) this.overflowIfFree()
    else if (queue.length >= this.opts.batchSize && !this.kicked) {
      this.kicked = true
      setImmediate(() => { this.kicked = false; this.tick() })
    }
  }

  /** A full queue goes to the spool whole, unless an append is under way or the spool is paused after refusing one. */
  private overflowIfFree (): void {
    if (this.overflowing === null && this.appending === 0 && monotonic() >= this.spoolRetryAt) this.overflow()
  }

  /** The queue is full: it goes to disk (or, for memory, straight to the store) now. */
  private overflow (): void {
    const batch = this.kept(this.queue)
    this.queue = []
    const spool = this.opts.spool
    if (spool === null) {
      const started = performance.now()
      this.opts.store.write(batch).then(n => {
        this.opts.hooks?.stored?.(n, (performance.now() - started) / 1000)
      }, err => this.fail(err as Error))
      return
    }
    const flight = this.inFlight
    const ahead = this.takeInFlight()
    const lines = this.lines(batch, ahead)
    this.held = batch.length + (ahead?.length ?? 0)
    if (ahead !== null && flight !== null) flight.taken = ahead.length
    this.overflowFlight = ahead !== null ? flight : null
    const append: Promise<void> = this.underWay(spool.appendMany(lines)).then(() => {
      // `close` gave up on the disk: it counted these entries lost.
      if (this.gaveUp) return
      this.spoolFailing = false
      // The batch taken ahead is counted by deliver, once its write failed: stored otherwise.
      if (ahead !== null && flight !== null) flight.onDisk = true
      this.opts.hooks?.spooled?.(batch.length)
    }, (err: Error) => {
      // The disk refused too: keep the entries in memory, at the front, for the next flush. The
      // batch taken ahead, its write still running, is left in flight, untaken: its write's end
      // (or close) handles it, once. Put back into the queue as well, it was counted twice should
      // its write go through (stored, and spooled from the queue: close's, or the next flush's
      // while the store was away). Its write ended: put back unless it went through.
      if (this.gaveUp) return
      this.opts.log.error({ err: err.message }, 'audit spool write failed')
      this.spoolRetryAt = monotonic() + SPOOL_RETRY_MS
      this.spoolFailing = true
      if (ahead !== null && flight !== null && this.inFlight === flight) flight.spooled = false
      const back = ahead === null || flight === null || this.inFlight === flight || flight.done ? batch : ahead.concat(batch)
      this.putBack(back, err)
    }).finally(() => {
      this.held = 0
      if (this.overflowing === append) {
        this.overflowing = null
        this.overflowFlight = null
      }
    })
    this.overflowing = append
  }

  /**
   * The batch being written to the store, taken ahead of what goes to the spool now (a copy
   * that replay skips should its write succeed: the store skips entries already stored); null
   * when none is, or it was taken already. Without the entries its isolation quarantined
   * already: the replay of the copy quarantined them a second time.
   */
  private takeInFlight (): AuditEntry[] | null {
    const flight = this.inFlight
    if (flight === null || flight.spooled) return null
    flight.spooled = true
    if (flight.quarantined.size === 0 && this.setAside.size === 0 && this.storedAside.size === 0) return flight.batch
    // `setAside` too: an entry quarantined while an earlier copy was away that came back.
    const rest = this.kept(flight.batch).filter(e => !flight.quarantined.has(e.id))
    return rest.length > 0 ? rest : null
  }

  /**
   * `entries` without those quarantined while a copy of their batch was away (see deliver): on
   * disk, they would be quarantined again by a replay after a restart, which knows none of them;
   * replayed, they are skipped. Nor those stored and counted while a copy was away (storedAside).
   */
  private kept (entries: AuditEntry[]): AuditEntry[] {
    return this.setAside.size === 0 && this.storedAside.size === 0 ? entries : entries.filter(e => !this.setAside.has(e.id) && !this.storedAside.has(e.id))
  }

  /**
   * The store's write of `batch`; with `found`, what it skipped as stored already is added to
   * `found.n`. The store counts only the entries it added: it skips an id it holds and an id met
   * earlier in the batch alike, so those it held are the batch's distinct ids less what it added.
   */
  private async write (batch: AuditEntry[], found: { n: number } | null): Promise<number> {
    const n = await this.opts.store.write(batch)
    if (found !== null && n < batch.length) found.n += new Set(batch.map(e => e.id)).size - n
    return n
  }

  /** Spool lines of at most one batch each (a replay never writes more than a batch per transaction), `ahead` first. */
  private lines (entries: AuditEntry[], ahead: AuditEntry[] | null = null): AuditEntry[][] {
    const size = this.opts.batchSize
    const lines = ahead === null ? [] : [ahead]
    for (let i = 0; i < entries.length; i += size) lines.push(entries.slice(i, i + size))
    return lines
  }

  /** Whether the spool holds batches, or a full queue is being appended to it. */
  private spooling (spool: Spool): boolean {
    return spool.size > 0 || this.overflowing !== null
  }

  private tick (): void {
    if (this.flushing !== null || this.drained) return
    const spool = this.opts.spool
    if (this.queue.length === 0 && (spool === null || !this.spooling(spool))) return
    // A flush begins at most once an interval, unless a full batch waits (or close); also while
    // the spool holds batches. Started at every tick then, two chains of ticks (the interval's,
    // and the one after each flush) made two flushes an interval while the store was away or the
    // spool was replayed: a line appended and fsynced each, of a few entries every other time.
    const now = monotonic()
    if (!this.due(now)) {
      this.tickAt(this.began + this.intervalMs - now)
      return
    }
    this.began = now
    this.flushing = this.run().catch(() => {}).finally(() => {
      this.flushing = null
      if (this.queue.length > 0 && !this.closed) this.tickAt(this.began + this.intervalMs - monotonic())
    })
  }

  /**
   * Whether the queue is written now: a full batch waits, the writer closes, or an interval has
   * passed since the last batch began.
   */
  private due (now: number): boolean {
    return this.queue.length >= this.opts.batchSize || this.closed || now - this.began >= this.intervalMs
  }

  /** One tick after `ms`, for what waits in the queue (the interval's own ticks may come later). */
  private tickAt (ms: number): void {
    if (this.rest !== null) return
    this.rest = setTimeout(() => { this.rest = null; this.tick() }, Math.max(0, ms))
    this.rest.unref()
  }

  /**
   * Replays the spool when it is due, then writes the queue batch by batch: every full batch at
   * once, the rest of the queue only once the interval has passed since the last batch began.
   * Writing the rest as soon as a write ended made batches of a few dozen entries under load, and
   * each batch costs PostgreSQL a transaction (lock, plan, commit) whatever its size.
   */
  private async run (): Promise<void> {
    const spool = this.opts.spool
    if (spool !== null && spool.size > 0 && this.began >= this.retryAt && this.began >= this.replayAt) await this.replay(spool)
    let first = true
    while (this.queue.length > 0) {
      // Each batch after the first begins an interval of its own: measured from the flush's
      // beginning, a write that took longer than the interval made every later check due, and
      // the flush went on writing whatever a few milliseconds had brought, a transaction each.
      if (!first) {
        const now = monotonic()
        if (!this.due(now)) break
        this.began = now
      }
      first = false
      // A queue that filled while the batch before was appended to the spool goes there whole
      // now, as `enqueue` sends a full queue: it could not then (one append at a time), and the
      // flush went on appending it a batch and an fsync at a time. While the store was away on
      // a disk slower than the calls came, no entry ever found the spool free, and the queue grew
      // past BFF_AUDIT_QUEUE_MAX without bound (13,470 entries for a bound of 100 within 1.5 s:
      // 20 ms an fsync, 10,000 calls a second, batches of 10).
      if (this.queue.length >= this.opts.queueMax) this.overflowIfFree()
      // A full queue's append goes first: a batch taken behind it and appended meanwhile came
      // back, should both fail, ahead of it.
      if (this.overflowing !== null) await this.overflowing
      // `close` stopped waiting for the flushes: it takes the queue itself.
      if (this.queue.length === 0 || this.abandoned) break
      const batch = this.queue.length <= this.opts.batchSize ? this.queue : this.queue.slice(0, this.opts.batchSize)
      this.queue = batch === this.queue ? [] : this.queue.slice(this.opts.batchSize)
      await this.deliver(batch)
    }
  }

  private async replay (spool: Spool): Promise<void> {
    // The entries the replay stored: not those the store had already (a crash between a commit
    // and the cut, the copy of a batch whose write succeeded after a full queue took it to the
    // spool), nor those quarantined from a line the store refused for its data.
    let n = 0
    // The entries it found stored already, which no count said were (see `found`).
    const found = { n: 0 }
    // Whether the store took a batch of this replay, and whether the failure (if any) is the
    // store's: thrown by a commit, not by the spool itself (reading it, cutting what was replayed).
    let committed = false
    let storeFailed = false
    try {
      // Consecutive lines joined up to a batch, a transaction each: a line is what one flush
      // found (a few dozen entries every 50 ms while the store was away), and replayed a
      // transaction each, a spool took ten times the transactions live traffic does, while that
      // traffic went on to the spool until it was empty. Isolation keeps the joined lines whole
      // as it kept one: none is cut until all of them are stored or quarantined.
      await spool.drain(async joined => {
        // A replay `close` gave up on stops between batches: the rest stays in the spool, the
        // queue behind it, in order.
        if (this.abandoned) throw new Abandoned('the writer closed during the replay')
        const batch = this.kept(joined)
        try {
          n += await this.write(batch, found)
        } catch (err) {
          if (!this.refused(err)) { storeFailed = true; throw err }
          const isolated = await this.isolate(spool, batch, err, id => this.setAside.add(id), undefined, found)
          n += isolated.stored
          if (isolated.error !== null) {
            // The line stays in the spool: what the isolation stored (counted replayed) is left
            // out of its next replay, as what it quarantined is.
            for (const e of batch.slice(0, batch.length - isolated.rest.length)) this.storedAside.add(e.id)
            storeFailed = true
            throw isolated.error
          }
        }
        committed = true
      }, this.opts.batchSize)
      this.setAside.clear()
      this.storedAside.clear()
      if (n > 0) this.opts.log.info(`audit spool replayed: ${n} entries`)
      if (found.n > 0) this.opts.hooks?.found?.(found.n)
      this.opts.hooks?.replayed?.(n)
      this.recovered()
    } catch (err) {
      if (found.n > 0) this.opts.hooks?.found?.(found.n)
      if (n > 0) this.opts.hooks?.replayed?.(n)
      if (err instanceof Abandoned) return
      if (storeFailed) {
        this.fail(err as Error)
        return
      }
      // The spool failed, not the store (a compaction's copy the disk refused, a read's I/O
      // error): what the store committed stays committed, and the next replay goes on from there,
      // a second later. Before, the store was said down (/readyz 503 "postgres: down", the
      // store-up gauge 0, a write failure counted) with the disk's error as its own, though it had
      // just taken every batch.
      this.opts.log.error({ err: (err as Error).message }, 'audit spool replay failed: the spool is replayed again a second later')
      this.replayAt = monotonic() + SPOOL_RETRY_MS
      if (committed) this.recovered()
    }
  }

  private refused (err: unknown): boolean {
    return this.opts.store.refuses?.(err) === true
  }

  /**
   * The store refused `batch` (with `err`) for the data of some of its entries: stores the others
   * in their order and quarantines each entry the store refuses on its own. The batch is split in
   * halves, recursively, the left half first: a batch of n entries with k refused costs about
   * 2k·log2(n) writes (a few dozen for one bad entry in 10,000), where one entry at a time would
   * cost n transactions. Stops at the first failure that is not a refusal (the store went away)
   * or a quarantine that cannot be written: everything from there on is `rest`, in order (a
   * line of the spool stays whole: `quarantined` is told each id set aside, for its replay to skip).
   * Stops too, with no error, once `handedOff` says a copy of the batch went to the spool (a full
   * queue or `close` took it): from there on the copy's replay isolates the rest, once. Before,
   * isolation went on, and what it quarantined after the copy was taken was quarantined again by
   * the replay of a process that had not seen it (the ids set aside live in memory only).
   */
  private async isolate (spool: Spool, batch: AuditEntry[], err: unknown, quarantined: (id: string) => void, handedOff: () => boolean = () => false, found: { n: number } | null = null): Promise<Isolation> {
    let stored = 0
    const refusals = new Map<string | null, number>()
    // Spans still to handle, the next one last; each with the error the store gave it, if tried.
    const spans: Array<[number, number, unknown]> = [[0, batch.length, err]]
    let failure: Error | null = null
    let at = batch.length
    while (spans.length > 0) {
      const [from, to, known] = spans.pop() as [number, number, unknown]
      if (handedOff()) {
        at = from
        break
      }
      let error = known
      if (error === undefined) {
        const part = from === 0 && to === batch.length ? batch : batch.slice(from, to)
        try {
          stored += await this.write(part, found)
          continue
        } catch (e) {
          error = e
        }
      }
      if (!this.refused(error)) {
        failure = error as Error
        at = from
        break
      }
      if (to - from > 1) {
        const mid = (from + to) >>> 1
        spans.push([mid, to, undefined], [from, mid, undefined])
        continue
      }
      const e = batch[from]
      const sqlstate = codeOf(error)
      const record: QuarantineRecord = { time: new Date().toISOString(), sqlstate, error: (error as Error).message, entry: e }
      try {
        await spool.quarantine.append([record])
      } catch (qerr) {
        this.opts.log.error({ err: (qerr as Error).message, file: spool.quarantine.path }, 'audit quarantine write failed: the refused entry stays with its batch (in the spool, or counted lost with it at shutdown)')
        failure = qerr as Error
        at = from
        break
      }
      quarantined(e.id)
      refusals.set(sqlstate, (refusals.get(sqlstate) ?? 0) + 1)
    }
    for (const [sqlstate, n] of refusals) {
      this.opts.log.error({ entries: n, sqlstate, file: spool.quarantine.path }, 'audit entries refused by the store for their own data: quarantined, never retried (an operator replays them by hand)')
      this.opts.hooks?.quarantined?.(n, sqlstate)
    }
    return { stored, rest: at === batch.length ? [] : batch.slice(at), error: failure }
  }

  private async deliver (batch: AuditEntry[]): Promise<void> {
    // Entries quarantined while a copy of their batch was away: one the disk refused came back
    // to the queue, and its entries quarantined meanwhile were refused and quarantined again.
    batch = this.kept(batch)
    if (batch.length === 0) return
    const spool = this.opts.spool
    if (spool === null || (!this.spooling(spool) && monotonic() >= this.retryAt)) {
      const started = performance.now()
      const flight: Flight = { batch, spooled: false, quarantined: new Set<string>(), onDisk: false, counted: false, done: false, late: 0, lateSeconds: 0, taken: 0, orphaned: null, waiting: 0 }
      this.inFlight = flight
      try {
        // What the store took anew: a batch the disk refused after its write succeeded comes
        // back in the queue, and is written (and skipped) again.
        const stored = await this.opts.store.write(batch)
        flight.done = true
        // A full queue took a copy of it to the spool meanwhile: its replay leaves them out.
        if (flight.spooled) for (const e of batch) this.storedAside.add(e.id)
        if (!flight.counted) this.opts.hooks?.stored?.(stored, (performance.now() - started) / 1000)
        else this.storedLate(flight, stored, started)
        // Every entry it took is in the store now, those it had already included (an earlier
        // write committed without its answer): said as stored, not as the few it stored anew.
        // (An orphan is not counted: its end counts it, above.)
        if (flight.orphaned !== null) this.orphanStored(flight, flight.taken)
        this.recovered()
        return
      } catch (err) {
        if (spool === null || !this.refused(err)) {
          this.fail(err as Error)
          if (spool === null) return
        } else {
          // Its entries quarantined are left out of a copy a full queue takes to the spool later,
          // and skipped by the replay of one it took already.
          // An entry quarantined while the batch was being taken (its quarantine's append under
          // way) is set aside: the copy holds it.
          const isolated = await this.isolate(spool, batch, err, id => (flight.spooled ? this.setAside : flight.quarantined).add(id), () => flight.spooled)
          // Those it stored before a full queue took a copy to the spool: left out of its replay.
          if (flight.spooled) for (const e of batch.slice(0, batch.length - isolated.rest.length)) this.storedAside.add(e.id)
          if (isolated.stored > 0 && !flight.counted) this.opts.hooks?.stored?.(isolated.stored, (performance.now() - started) / 1000)
          else if (isolated.stored > 0) this.storedLate(flight, isolated.stored, started)
          if (flight.orphaned !== null) this.orphanStored(flight, isolated.stored)
          if (isolated.error === null) {
            this.recovered()
            // Isolated whole; or handed off to the copy taken to the spool (`rest`, its entries
            // not yet stored nor quarantined), counted below.
            if (isolated.rest.length === 0) {
              flight.done = true
              return
            }
          } else {
            this.fail(isolated.error)
          }
          batch = isolated.rest
        }
      } finally {
        this.inFlight = null
        if (flight.orphaned !== null) this.unwatchExit()
      }
      // A full queue went to the spool meanwhile and took this batch ahead of itself: it is there
      // (or, should the disk have refused, back in the queue) in its place.
      // Its entries neither stored nor quarantined (`batch`) are counted spooled once on disk:
      // they were not counted at all, and came back as replayed only.
      if (flight.spooled) {
        // `close` could not put it on disk: what its write did not store is lost, said with the
        // ids its first line gave (it said only the count).
        if (flight.orphaned !== null) {
          this.lose(batch.length, flight.orphaned, idsOf(flight.batch))
          return
        }
        flight.waiting = batch.length
        await this.overflowing
        if (flight.onDisk && !flight.counted) this.opts.hooks?.spooled?.(batch.length)
        return
      }
    }
    this.appending = batch.length
    const append = this.underWay(spool.append(batch))
    this.appendDone = append.catch(() => {})
    try {
      await append
      if (this.gaveUp) return
      this.spoolFailing = false
      this.opts.hooks?.spooled?.(batch.length)
    } catch (err) {
      if (this.gaveUp) return
      this.spoolFailing = true
      this.opts.log.error({ err: (err as Error).message }, 'audit spool write failed')
      this.putBack(batch, err as Error)
      throw err
    } finally {
      this.appending = 0
      this.appendDone = null
    }
  }

  /**
   * Entries an append to the spool refused, back at the front of the queue for the next flush;
   * lost (logged and counted) once `close` has taken the queue for good, as nothing writes it
   * any more. `close` waits for the appends under way before it takes it: this is the last resort.
   */
  private putBack (entries: AuditEntry[], err: Error): void {
    if (this.gaveUp) return
    if (this.drained) this.lose(entries.length, err.message)
    else this.queue = entries.concat(this.queue)
  }

  /** `n` entries neither stored nor spooled, for good: said and counted. */
  private lose (n: number, why: string, ids: ReturnType<typeof idsOf> | null = null): void {
    if (n <= 0) return
    this.opts.log.error({ entries: n, ...ids, err: why }, 'audit entries lost at shutdown: neither the store nor the spool took them')
    this.opts.hooks?.lost?.(n)
  }

  /**
   * An entry came once `close` had taken the queue for good: counted lost at once, logged with the
   * others that come within a second in one line (one line each flooded the log should something
   * go on auditing after the audit closed). The first is logged at once.
   */
  private late (): void {
    this.opts.hooks?.lost?.(1)
    if (this.lateTimer !== null) {
      this.lateLost++
      return
    }
    this.sayLate(1)
    // Not unref'd: the line is written before the process ends, should it end by itself; should
    // it exit first (a shutdown exits once the app has closed), the exit's listener says it.
    // Before, the entries that came within that second were counted and never said.
    this.lateTimer = setTimeout(() => {
      this.lateTimer = null
      if (this.lateLost > 0) this.sayLate(this.lateLost)
      this.lateLost = 0
      this.unwatchExit()
    }, LATE_LOG_MS)
    this.watchExit()
  }

  private watchExit (): void {
    if (this.exitWatch !== null) return
    this.exitWatch = () => { this.atExit() }
    // Ahead of the logger's own (pino flushes its buffer at exit): what is said here is flushed with it.
    process.prependListener('exit', this.exitWatch)
  }

  /** The batch in flight `close` left to its write's end (orphan), while that write runs (it is the one in flight until it ends). */
  private orphanWriting (): Flight | null {
    const flight = this.inFlight
    return flight !== null && flight.orphaned !== null ? flight : null
  }

  /** Nothing left to say at exit: the listener goes (one per writer at most, and only while needed). */
  private unwatchExit (): void {
    if (this.exitWatch === null || this.lateTimer !== null || this.orphanWriting() !== null) return
    process.removeListener('exit', this.exitWatch)
    this.exitWatch = null
  }

  /**
   * The process exits: the entries that came after close and are not said yet are said, and the
   * batch close left to a write that has not ended is said unknown (its write may have committed
   * in PostgreSQL, its answer not come): counted under no outcome, as neither stored nor lost is
   * known, and a count at exit is read by no one (/metrics closed with the server).
   */
  private atExit (): void {
    if (this.exitWatch !== null) process.removeListener('exit', this.exitWatch)
    this.exitWatch = null
    if (this.lateLost > 0) this.sayLate(this.lateLost)
    this.lateLost = 0
    const flight = this.orphanWriting()
    if (flight === null) return
    this.opts.log.error({ entries: flight.taken, ...idsOf(flight.batch), err: flight.orphaned }, 'audit entries not known to be stored: the process exited before their write to the store ended (look them up by id)')
  }

  /** The write `close` left to its end went through: the `n` entries it put in the store are said (it was said lost unless it did). */
  private orphanStored (flight: Flight, n: number): void {
    if (n > 0) this.opts.log.info({ entries: n, ...idsOf(flight.batch) }, 'audit entries left to their write at shutdown: stored, the write went through')
  }

  private sayLate (n: number): void {
    this.opts.log.error({ entries: n, err: 'they came after the writer closed' }, 'audit entries lost at shutdown: neither the store nor the spool took them')
  }

  /**
   * A write went through. Once `close` has taken the queue for good (`drained`) the writer writes
   * nothing more: a write it had stopped waiting for that goes through says what it stored itself
   * (see orphan), and "audit store is back" read, after the shutdown lines, as if the audit went on.
   */
  private recovered (): void {
    if (!this.storeUp && !this.drained) this.opts.log.info('audit store is back')
    // The store takes entries: whatever the spool did, nothing need be refused.
    this.spoolFailing = false
    this.storeUp = true
    this.backoff = 0
    this.retryAt = 0
    this.lastError = null
  }

  /**
   * A write failed. Once `close` has taken the queue for good nothing is spooled any more: what
   * the write held is counted and said by close (spooled) or by the write's end (lost), and
   * "spooling to disk until it is back", said then, was not true.
   */
  private fail (err: Error): void {
    // An error with no message is said by its code: Node's refusal of a connection to a name with
    // several addresses (an AggregateError, code ECONNREFUSED) was logged, and kept for /diagz, as ''.
    const why = err.message !== '' ? err.message : codeOf(err) ?? String(err)
    if (this.storeUp && !this.drained) this.opts.log.warn({ err: why }, 'audit store write failed: spooling to disk until it is back')
    this.storeUp = false
    this.lastError = why
    this.backoff = Math.min(this.backoff === 0 ? 100 : this.backoff * 2, MAX_BACKOFF_MS)
    this.retryAt = monotonic() + this.backoff
    this.opts.hooks?.failed?.(err)
  }

  /**
   * While the writer is idle (nothing queued, spooled or being written), asks the store whether
   * it answers, so that `up` (readiness, /diagz, the store-up gauge) tells the truth without
   * traffic: it was true from start-up until a write failed, so a PostgreSQL unreachable since
   * start-up, or gone while no call came, read as up. Busy, the writes tell. Not a write failure.
   */
  async probe (ping: () => Promise<void>): Promise<void> {
    const spool = this.opts.spool
    if (this.closed || this.flushing !== null || this.queue.length > 0 || (spool !== null && this.spooling(spool))) return
    try {
      await ping()
    } catch (err) {
      // What the ping met, as it is: a store that answered with an error (a missing relation, a
      // pooler refusing the connection) was logged as one that does not answer. Logged once; the
      // error kept (/readyz, /diagz) is the latest: the first one alone (the end of a connection)
      // hid the cause that followed (a server that takes no writes) for as long as no call came.
      const message = (err as Error).message
      if (this.storeUp) {
        this.opts.log.warn({ err: message }, 'audit store fails: entries go to the spool until it is back')
        this.storeUp = false
      }
      this.lastError = message
      return
    }
    this.recovered()
  }

  /**
   * Writes everything still queued: to the store when it is up, else to the spool. Retries the
   * spool's replay once while the store is up. A store that has not taken it all within
   * `closeTimeoutMs` (it hangs, or a long replay is under way) is not waited for: the batch being
   * written and the queue go to the spool, after whatever it still holds. Before, close waited
   * for the store: a PostgreSQL that stopped answering failed a write after 10 s, past the
   * shutdown's grace, and the process was killed with the queue neither stored nor spooled.
   * Each entry it spools is counted spooled once, before it resolves: the batch in flight too,
   * whether it takes it now or a full queue took it before, as the write's end may come after the
   * process's (that end then counts it no more; should the write have gone through, the replay
   * skips the copy and counts it not). Before, the batch it took was counted stored as well when
   * its write went through after, and one a full queue took was counted nowhere. It waits for the
   * appends to the spool under way (the disk's, not the store's) before it takes the queue for
   * good: what one of them put back when refused is appended with the queue. What the disk refuses
   * then is lost, logged and counted; close resolves all the same. The batch in flight close took
   * and could not put on disk is counted by its write's end (stored if it went through, else
   * lost): counted lost at once, it was never counted stored when its write went through after.
   * Once it stops waiting for the store, close waits diskTimeoutMs at most for the disk: what a
   * disk that does not answer holds is counted lost then, and its appends count nothing when they
   * end. Before, close awaited them for ever, and the shutdown was killed at its grace.
   */
  async close (): Promise<void> {
    if (this.closed) return
    this.closed = true
    clearInterval(this.timer)
    if (this.rest !== null) clearTimeout(this.rest)
    const spool = this.opts.spool
    const orderly = this.finish()
    if (spool === null) return await orderly
    let timer: NodeJS.Timeout | undefined
    const late = new Promise<boolean>(resolve => { timer = setTimeout(resolve, this.opts.closeTimeoutMs ?? CLOSE_TIMEOUT_MS, true) })
    const timedOut = await Promise.race([orderly.then(() => false), late])
    clearTimeout(timer)
    if (!timedOut) return
    orderly.catch(() => {})
    this.abandoned = true
    // The disk is waited for diskTimeoutMs at most from here: an append that does not settle held
    // the shutdown until it was killed at its grace.
    let diskTimer: NodeJS.Timeout | undefined
    const diskLate = new Promise<'late'>(resolve => { diskTimer = setTimeout(resolve, this.opts.diskTimeoutMs ?? DISK_TIMEOUT_MS, 'late') })
    const noAnswer = `the spool's disk did not answer within ${this.opts.diskTimeoutMs ?? DISK_TIMEOUT_MS} ms at shutdown`
    try {
      // The appends to the spool under way (a full queue's, a flush's) end first: should the disk
      // refuse one, its entries come back to the queue, in their place, and are appended below.
      // Before, a flush's append that failed once the queue was taken put its batch back into a
      // queue no one wrote any more: lost without a word.
      for (let pending = this.overflowing ?? this.appendDone; pending !== null; pending = this.overflowing ?? this.appendDone) {
        if (await Promise.race([pending.then(() => 'ok', () => 'ok'), diskLate]) === 'late') {
          this.giveUp(null, [], noAnswer)
          return
        }
      }
      // The batch in flight, its write not ended, is counted here once on disk, and its write's end
      // counts it no more: taken now (also when a full queue had taken it and the disk refused that
      // append: left in flight), or taken by a full queue whose append succeeded (its entries not
      // quarantined before, as takeInFlight took them). Claimed with no await between the check and
      // the claim: a write that ends first counts its batch itself.
      const flight = this.inFlight
      const ahead = this.takeInFlight()
      if (ahead !== null && flight !== null) {
        flight.counted = true
        flight.taken = ahead.length
      }
      let taken = 0
      if (ahead === null && flight !== null && flight.onDisk && !flight.counted) {
        flight.counted = true
        taken = flight.batch.filter(e => !flight.quarantined.has(e.id)).length
      }
      const rest = this.kept(this.queue)
      this.queue = []
      this.drained = true
      const entries = (ahead?.length ?? 0) + rest.length
      // Said before the append: what the disk then refuses or does not take in time is said lost
      // below. "is spooled", said here, stood before those lines.
      this.opts.log.warn({ entries, waitedMs: this.opts.closeTimeoutMs ?? CLOSE_TIMEOUT_MS }, 'audit store did not finish in time at shutdown: what it had not stored goes to the spool')
      if (taken > 0) this.opts.hooks?.spooled?.(taken)
      if (entries === 0) return
      const outcome = await Promise.race([spool.appendMany(this.lines(rest, ahead)).then(() => null, (err: Error) => err), diskLate])
      if (outcome === 'late') {
        this.giveUp(ahead, rest, noAnswer)
        return
      }
      if (outcome === null) {
        this.opts.hooks?.spooled?.(entries)
        return
      }
      // The batch in flight is lost only if its write does not go through: it was counted lost
      // here, and stored (uncounted) when its write went through after.
      this.lose(rest.length + this.unvouched(flight, ahead, outcome.message), outcome.message)
    } finally {
      clearTimeout(diskTimer)
    }
  }

  /**
   * `close` stopped waiting for the disk: what it cannot vouch for is counted lost now (the appends
   * under way, the queue, `rest`), the batch in flight by its write's end (see unvouched), and
   * what the appends under way do when they end counts nothing more.
   */
  private giveUp (ahead: AuditEntry[] | null, rest: AuditEntry[], why: string): void {
    this.gaveUp = true
    this.drained = true
    let n = this.held + this.appending + this.kept(this.queue).length + rest.length
    this.queue = []
    const flight = this.inFlight
    // The batch a full queue's append took ahead, its write ended since: `held` counts it whole,
    // though its write stored (counted stored) or quarantined some of it. Only what waits for the
    // append is lost.
    const over = this.overflowFlight
    if (this.overflowing !== null && over !== null && over !== flight) n += over.waiting - over.taken
    if (ahead !== null) {
      n += this.unvouched(flight, ahead, why)
    } else if (flight !== null && !flight.counted && !flight.done) {
      if (!flight.spooled) {
        // Not taken by any append: no append takes it now.
        flight.spooled = true
        flight.taken = flight.batch.filter(e => !flight.quarantined.has(e.id)).length
        this.orphan(flight, why)
      } else if (!flight.onDisk) {
        // In the append of a full queue that does not answer (`held` counts it).
        n -= flight.taken
        this.orphan(flight, why)
      } else {
        flight.counted = true
        this.opts.hooks?.spooled?.(flight.taken)
      }
    }
    this.lose(n, why)
  }

  /**
   * The batch in flight `close` took (`ahead`) and could not put on disk: how many of its entries
   * to count lost now. Its write not ended, none: its end counts them, stored if it went through,
   * lost otherwise. Ended while close appended, those it neither stored (`late`) nor quarantined.
   */
  private unvouched (flight: Flight | null, ahead: AuditEntry[] | null, why: string): number {
    if (ahead === null || flight === null) return 0
    if (this.inFlight === flight) {
      flight.counted = false
      this.orphan(flight, why)
      return 0
    }
    if (flight.late > 0) this.opts.hooks?.stored?.(flight.late, flight.lateSeconds)
    // Those its split quarantined once close had taken it (set aside) were counted quarantined.
    const quarantined = this.setAside.size === 0 ? 0 : ahead.filter(e => this.setAside.has(e.id)).length
    return Math.max(0, ahead.length - flight.late - quarantined)
  }

  /**
   * `n` entries of the batch in flight stored once `close` counted it spooled: counted stored only
   * should close's append fail (unvouched), as the flush it was, with the time its write took.
   * Before, that count was observed as a flush of 0 s (mantle_audit_flush_duration_seconds, and
   * /diagz's last flush time).
   */
  private storedLate (flight: Flight, n: number, started: number): void {
    flight.late += n
    flight.lateSeconds = (performance.now() - started) / 1000
  }

  /** The batch in flight is left to its write's end, said now (the process may end first). */
  private orphan (flight: Flight, why: string): void {
    flight.orphaned = why
    this.watchExit()
    this.opts.log.error({ entries: flight.taken, ...idsOf(flight.batch), err: why }, 'audit entries not on disk at shutdown: their write to the store has not ended, lost unless it goes through')
  }

  /** What `close` waits for: the running flush, what came meanwhile, the rest of the queue. */
  private async finish (): Promise<void> {
    // A flush already running finishes first; then whatever came meanwhile.
    for (let i = 0; i < 3 && (this.flushing !== null || this.queue.length > 0); i++) {
      if (this.flushing !== null) await this.flushing.catch(() => {})
      else this.tick()
    }
    // A full queue still on its way to the spool is on disk before close resolves (or, when the
    // disk refused it, back in the queue and appended again below); so is a flush an enqueue began
    // meanwhile (a full batch).
    while (!this.abandoned && (this.flushing !== null || this.overflowing !== null)) {
      if (this.flushing !== null) await this.flushing.catch(() => {})
      if (this.overflowing !== null) await this.overflowing
    }
    if (this.abandoned) return
    const spool = this.opts.spool
    const rest = this.kept(this.queue)
    this.queue = []
    this.drained = true
    if (rest.length === 0) return
    const started = performance.now()
    // Counted as every other write or append is: they were counted nowhere. `close` waits for the
    // append should it stop waiting for the store meanwhile.
    const last = spool === null ? this.opts.store.write(rest) : spool.appendMany(this.lines(rest)).then(() => rest.length)
    this.appendDone = last.then(() => {}, () => {})
    this.appending = rest.length
    try {
      const n = await last
      // `close` gave up on the disk meanwhile: it counted them lost.
      if (this.gaveUp) return
      if (spool === null) this.opts.hooks?.stored?.(n, (performance.now() - started) / 1000)
      else this.opts.hooks?.spooled?.(n)
    } catch (err) {
      if (!this.gaveUp) this.lose(rest.length, (err as Error).message)
    } finally {
      this.appending = 0
      this.appendDone = null
    }
  }
}

/** The first and last ids of a batch (UUIDv7, in time order), for an operator to look it up in the store. */
function idsOf (batch: AuditEntry[]): { firstId: string | undefined, lastId: string | undefined } {
  return { firstId: batch[0]?.id, lastId: batch[batch.length - 1]?.id }
}

/** The store's code for an error (PostgreSQL's SQLSTATE), null when it has none. */
function codeOf (err: unknown): string | null {
  const code = (err as { code?: unknown } | null)?.code
  return typeof code === 'string' ? code : null
}
