/**
 * Entries grouped by tenant, bounded by a count and a byte total shared by all, each expiring
 * after its TTL. Past a bound, the entry that goes is the least recently used of the tenant that
 * holds the most (entries past the count bound, bytes past the byte bound), not the least
 * recently used of all: one tenant's traffic never pushes out another tenant's entries while it
 * holds more than that tenant. Ties go to the tenant whose entry is being added, unless that
 * entry is all it holds (then to another tenant holding as much, if any).
 *
 * Every operation is O(1) but the byte index's, O(log tenants), and that of an entry set to
 * expire before one set earlier, O(log such entries): a tenant's entries in a Map in use order;
 * tenants by count in buckets (count -> tenants) with the largest count kept; by bytes in a
 * binary max-heap; entries set out of expiry order in a binary min-heap by expiry (none where
 * every entry has one TTL: the idempotency store's, the rate limiter's). Nothing holds more than the entries do: a tenant is forgotten with
 * its last entry, an empty bucket at once. No call walks all the entries: expired ones go a
 * bounded number at a time (set: as many as make room and PURGE_AHEAD more; purgeStale: a
 * slice), since one walk over 100,000 entries held the event loop, and every request, for
 * some 100 ms (2.4 s at a million).
 *
 * Written here because no cache library evicts by tenant: lru-cache (used elsewhere) evicts the
 * least recently used of all entries, which is the unfairness this replaces. Used by the memory
 * idempotency store and by the response cache's in-process tier; each caller says whose entry it
 * sets (the key is not parsed).
 */
interface Group<V> {
  readonly tenant: string
  /** Least recently used first. */
  readonly entries: Map<string, Entry<V>>
  bytes: number
  /** Its index in the byte heap. */
  at: number
}

interface Entry<V> {
  readonly key: string
  readonly value: V
  readonly bytes: number
  /** performance.now() at which it expires. */
  readonly until: number
  readonly group: Group<V>
  /** Its index in the heap of entries set out of expiry order (`early`), -1 when it is not there. */
  at: number
}

/**
 * A binary heap whose items keep their own index (`at`; -1 once removed), so that one can be
 * moved or removed where it is: `first(a, b)` when a goes above b. The byte index's (tenants,
 * largest first) and the expiry index's (entries set out of expiry order, soonest first).
 */
class PlacedHeap<T extends { at: number }> {
  readonly items: T[] = []

  constructor (private readonly first: (a: T, b: T) => boolean) {}

  push (item: T): void {
    item.at = this.items.length
    this.items.push(item)
    this.up(item.at)
  }

  remove (item: T): void {
    const last = this.items.pop()!
    if (last !== item) {
      this.items[item.at] = last
      last.at = item.at
      this.down(last.at)
      this.up(last.at)
    }
    item.at = -1
  }

  clear (): void { this.items.length = 0 }

  /** Moves the item at `i` up while it goes above its parent. */
  up (i: number): void {
    const items = this.items
    while (i > 0) {
      const parent = (i - 1) >> 1
      if (!this.first(items[i], items[parent])) return
      this.swap(i, parent)
      i = parent
    }
  }

  /** Moves the item at `i` down while a child goes above it. */
  down (i: number): void {
    const items = this.items
    for (;;) {
      const left = 2 * i + 1
      const right = left + 1
      let top = i
      if (left < items.length && this.first(items[left], items[top])) top = left
      if (right < items.length && this.first(items[right], items[top])) top = right
      if (top === i) return
      this.swap(i, top)
      i = top
    }
  }

  /** What is wrong with the heap's order (FairLru.check). */
  disorder (name: string): string[] {
    const wrong: string[] = []
    for (let i = 1; i < this.items.length; i++) {
      if (this.first(this.items[i], this.items[(i - 1) >> 1])) wrong.push(`the ${name} is out of order at ${i}`)
    }
    return wrong
  }

  private swap (i: number, j: number): void {
    const a = this.items[i]
    const b = this.items[j]
    this.items[i] = b
    this.items[j] = a
    a.at = j
    b.at = i
  }
}

/** Expired entries set drops past those that make room for its entry (so that they go before live ones). */
const PURGE_AHEAD = 64
/** Entries one purgeStale call looks at, at most: about a millisecond. */
export const PURGE_SLICE = 1024
/**
 * Slices a metrics scrape looks at, at most (64 Ki entries): a whole pass over a store of a
 * million entries took seconds of a scrape (10 s under load: Prometheus' timeout, and the
 * instance's every metric lost with it); the next scrape goes on from where this one stopped.
 * What the gauges report is what the store holds, expired entries not yet looked at included.
 */
export const SCRAPE_SLICES = 64

export class FairLru<V> {
  private readonly entries = new Map<string, Entry<V>>()
  /** Where purgeStale goes on (a Map iterator sees the entries set and deleted since). */
  private sweep: Iterator<[string, Entry<V>]> | null = null
  /** The entries the current pass of purgeStale has left to look at (its size when it began). */
  private sweepLeft = 0
  /** The pass of purgeAllStale running, if one is. */
  private sweeping: Promise<void> | null = null
  private readonly groups = new Map<string, Group<V>>()
  /** Tenants by how many entries they hold (only counts some tenant holds). */
  private readonly byCount = new Map<number, Set<Group<V>>>()
  private mostCount = 0
  /** Tenants by bytes held, largest first. */
  private readonly byBytes = new PlacedHeap<Group<V>>((a, b) => a.bytes > b.bytes)
  private totalBytes = 0
  /**
   * The latest expiry set since the store was last empty: an entry set to expire at or after it
   * expires after every entry set before it, so those entries, in the order they were set,
   * expire in that order too.
   */
  private latest = -Infinity
  /**
   * The entries set to expire before `latest` (an operation with a shorter TTL than one set
   * before it), soonest first (a binary min-heap): the walk from the oldest stops at the first
   * live entry, and these could be behind it.
   */
  private readonly early = new PlacedHeap<Entry<V>>((a, b) => a.until < b.until)

  /** `onEvict`: called for each entry a bound pushed out (not for those that expired), with its key, tenant and value. */
  constructor (private readonly maxEntries: number, private readonly maxBytes: number, private readonly onEvict: (key: string, tenant: string, value: V) => void = () => {}) {}

  /** Entries held (expired ones until they are next touched or purged). */
  get size (): number { return this.entries.size }
  get bytes (): number { return this.totalBytes }

  /** The live entry under `key`, made its tenant's most recently used. */
  get (key: string): V | undefined {
    const entry = this.live(key)
    if (entry === undefined) return undefined
    entry.group.entries.delete(key)
    entry.group.entries.set(key, entry)
    return entry.value
  }

  has (key: string): boolean { return this.live(key) !== undefined }

  /** The live entry under `key`, its place in its tenant's use order left as it is. */
  peek (key: string): V | undefined { return this.live(key)?.value }

  /** The entries held, least recently set or used first within each tenant (expired ones until dropped). */
  * items (): IterableIterator<[string, V]> {
    for (const [key, entry] of this.entries) yield [key, entry.value]
  }

  /** The entries `tenant` holds, least recently used first (expired ones until dropped). */
  * itemsOf (tenant: string): IterableIterator<[string, V]> {
    const group = this.groups.get(tenant)
    if (group === undefined) return
    for (const [key, entry] of group.entries) yield [key, entry.value]
  }

  /** The most entries one tenant holds (0: none). */
  get most (): number { return this.mostCount }

  /** Milliseconds the entry under `key` has left (0 if there is none). */
  remainingTtl (key: string): number {
    const entry = this.live(key)
    return entry === undefined ? 0 : entry.until - performance.now()
  }

  /**
   * Adds `value` under `key` for `tenant`, then evicts as the bounds require (perhaps this entry,
   * when its tenant holds the most and has nothing older). An entry over the byte bound alone is
   * not kept. Returns whether it is held.
   */
  set (key: string, tenant: string, value: V, bytes: number, ttlMs: number): boolean {
    this.delete(key)
    if (bytes > this.maxBytes) return false
    // Expired entries go before any live one: they counted toward their tenant's holding, and a
    // quiet tenant's dead entries made an active tenant give up live ones.
    if (this.entries.size >= this.maxEntries || this.totalBytes + bytes > this.maxBytes) this.dropExpired(bytes)
    // An entry the byte bound would push out itself takes nothing with it: found after the
    // others had given up theirs, it cost them outcomes for nothing.
    if (this.totalBytes + bytes > this.maxBytes && !this.survives(tenant, bytes)) {
      // Dropped to stay within the bound, as an evicted entry is (a repeat of its call runs again).
      this.onEvict(key, tenant, value)
      return false
    }
    let group = this.groups.get(tenant)
    if (group === undefined) {
      group = { tenant, entries: new Map(), bytes: 0, at: -1 }
      this.groups.set(tenant, group)
      this.byBytes.push(group)
    }
    const entry: Entry<V> = { key, value, bytes, until: performance.now() + ttlMs, group, at: -1 }
    if (entry.until >= this.latest) this.latest = entry.until
    else this.early.push(entry)
    this.entries.set(key, entry)
    group.entries.set(key, entry)
    this.counted(group, group.entries.size - 1)
    group.bytes += bytes
    this.totalBytes += bytes
    this.byBytes.up(group.at)
    while (this.entries.size > this.maxEntries || this.totalBytes > this.maxBytes) {
      const victim = this.entries.size > this.maxEntries ? this.mostEntries(group) : this.mostBytes(group)
      const [oldest, gone] = victim.entries.entries().next().value!
      this.delete(oldest)
      this.onEvict(oldest, victim.tenant, gone.value)
    }
    return this.entries.has(key)
  }

  delete (key: string): void {
    const entry = this.entries.get(key)
    if (entry === undefined) return
    const group = entry.group
    this.entries.delete(key)
    if (entry.at >= 0) this.early.remove(entry)
    if (this.entries.size === 0) this.latest = -Infinity
    group.entries.delete(key)
    this.counted(group, group.entries.size + 1)
    group.bytes -= entry.bytes
    this.totalBytes -= entry.bytes
    if (group.entries.size > 0) {
      this.byBytes.down(group.at)
      return
    }
    this.groups.delete(group.tenant)
    this.byBytes.remove(group)
  }

  /** Drops every entry. */
  clear (): void {
    this.entries.clear()
    this.groups.clear()
    this.byCount.clear()
    this.mostCount = 0
    this.byBytes.clear()
    this.totalBytes = 0
    this.sweep = null
    this.latest = -Infinity
    this.early.clear()
  }

  /**
   * Looks at the next `slice` entries (from where the last call stopped, the oldest first) and
   * drops the expired ones; returns whether that ended a pass over all of them. So a call costs
   * O(slice) however many entries are held: a store up to `slice` is swept whole by each call.
   */
  purgeStale (slice = PURGE_SLICE): boolean {
    if (this.sweep === null) {
      this.sweep = this.entries.entries()
      this.sweepLeft = this.entries.size
    }
    const now = performance.now()
    for (let i = 0; i < slice; i++) {
      // Entries set since the pass began (sweepLeft spent) are newer than all it looked at.
      const next = this.sweepLeft-- > 0 ? this.sweep.next() : undefined
      if (next === undefined || next.done === true) {
        this.sweep = null
        return true
      }
      const [key, entry] = next.value
      if (entry.until <= now) this.delete(key)
    }
    return false
  }

  /**
   * Drops expired entries, a slice at a time with the event loop let go between slices, until a
   * pass over all of them ends or `maxSlices` slices are looked at (a metrics scrape: SCRAPE_SLICES;
   * the next call goes on from there); calls made while one runs wait for that one.
   */
  async purgeAllStale (maxSlices = Infinity): Promise<void> {
    this.sweeping ??= (async () => {
      try {
        for (let i = 1; !this.purgeStale() && i < maxSlices; i++) await new Promise(resolve => setImmediate(resolve))
      } finally {
        this.sweeping = null
      }
    })()
    await this.sweeping
  }

  /**
   * Drops expired entries until an entry of `bytes` fits and PURGE_AHEAD more at most (the rest
   * go with the next calls): the oldest set first, up to the first live one, then those set out
   * of expiry order (`early`), soonest first. Those two find every expired entry: an entry set
   * after a live one and not out of order expires after it (set moves a key to the end). Before
   * `early`, one TTL per operation (the response cache's) left an answer expired behind a live
   * one of a longer-lived operation counting toward its tenant's share, and a bound took a live
   * entry in its place.
   */
  private dropExpired (bytes: number): void {
    const now = performance.now()
    let ahead = PURGE_AHEAD
    const enough = (): boolean => this.entries.size < this.maxEntries && this.totalBytes + bytes <= this.maxBytes && ahead-- <= 0
    for (const [key, entry] of this.entries) {
      if (entry.until > now) break
      if (enough()) return
      this.delete(key)
    }
    const early = this.early.items
    while (early.length > 0 && early[0].until <= now) {
      if (enough()) return
      this.delete(early[0].key)
    }
  }

  /**
   * Whether an entry of `bytes` for `tenant` would outlast the evictions of set. Past the count
   * bound, one entry goes first (mostEntries, with this one added): it is found here the same way.
   * Then, past the byte bound, the one that goes is always of a tenant holding the most, ties
   * going to another tenant than the new entry's while it holds that entry alone: the new entry
   * goes only once its tenant holds nothing else and every other tenant holds less than it, each
   * having given up its oldest until it did. So it stays if it fits beside what the others hold
   * at that point. Only tenants holding `bytes` or more give anything up: found from the heap's
   * root (a node holding less has no child holding more). The walk stops once it fits.
   */
  private survives (tenant: string, bytes: number): boolean {
    const own = this.groups.get(tenant)
    let kept = bytes + this.totalBytes - (own?.bytes ?? 0)
    // The count bound's victim, when it is another tenant's (the new entry's tenant's own older
    // entries are left out of `kept` already).
    let counted: Group<V> | undefined
    if (this.entries.size >= this.maxEntries) {
      const size = (own?.entries.size ?? 0) + 1
      const most = Math.max(this.mostCount, size)
      if (!(size === most && size > 1)) {
        for (const group of this.byCount.get(most) ?? []) {
          if (group !== own) { counted = group; break }
        }
        if (counted === undefined) return false
        kept -= counted.entries.values().next().value!.bytes
      }
    }
    const heap = this.byBytes.items
    const stack = heap.length > 0 ? [0] : []
    while (stack.length > 0 && kept > this.maxBytes) {
      const i = stack.pop()!
      const group = heap[i]
      if (group.bytes < bytes) continue
      if (2 * i + 1 < heap.length) stack.push(2 * i + 1)
      if (2 * i + 2 < heap.length) stack.push(2 * i + 2)
      if (group === own) continue
      let left = group.bytes
      let first = group === counted
      for (const entry of group.entries.values()) {
        if (first) {
          // Gone to the count bound already.
          first = false
          left -= entry.bytes
          continue
        }
        if (left < bytes || kept <= this.maxBytes) break
        left -= entry.bytes
        kept -= entry.bytes
      }
    }
    return kept <= this.maxBytes
  }

  /** Entries and bytes `tenant` holds. */
  held (tenant: string): { count: number, bytes: number } {
    const group = this.groups.get(tenant)
    return { count: group?.entries.size ?? 0, bytes: group?.bytes ?? 0 }
  }

  /** For the tests: what is wrong with the indexes, if anything (O(entries)). */
  check (): string[] {
    const wrong: string[] = []
    let count = 0
    let bytes = 0
    let most = 0
    for (const [tenant, group] of this.groups) {
      if (group.entries.size === 0) wrong.push(`${tenant} is held with no entries`)
      let sum = 0
      for (const [key, entry] of group.entries) {
        if (this.entries.get(key) !== entry) wrong.push(`${key} is not indexed`)
        sum += entry.bytes
      }
      if (sum !== group.bytes) wrong.push(`${tenant} counts ${group.bytes} bytes, holds ${sum}`)
      if (this.byCount.get(group.entries.size)?.has(group) !== true) wrong.push(`${tenant} is not in its count's bucket`)
      if (this.byBytes.items[group.at] !== group) wrong.push(`${tenant} is not at its place in the heap`)
      count += group.entries.size
      bytes += sum
      most = Math.max(most, group.entries.size)
    }
    if (count !== this.entries.size) wrong.push(`${this.entries.size} entries, ${count} in tenants`)
    if (bytes !== this.totalBytes) wrong.push(`${this.totalBytes} bytes counted, ${bytes} held`)
    if (most !== this.mostCount) wrong.push(`the largest count is ${most}, not ${this.mostCount}`)
    let bucketed = 0
    for (const [n, set] of this.byCount) {
      if (set.size === 0) wrong.push(`bucket ${n} is empty`)
      for (const group of set) if (group.entries.size !== n) wrong.push(`${group.tenant} in bucket ${n} holds ${group.entries.size}`)
      bucketed += set.size
    }
    if (bucketed !== this.groups.size) wrong.push(`${bucketed} tenants in buckets, ${this.groups.size} held`)
    if (this.byBytes.items.length !== this.groups.size) wrong.push(`${this.byBytes.items.length} tenants in the heap, ${this.groups.size} held`)
    wrong.push(...this.byBytes.disorder('heap'))
    let early = 0
    for (const [key, entry] of this.entries) {
      if (entry.at < 0) continue
      early++
      if (this.early.items[entry.at] !== entry) wrong.push(`${key} is not at its place in the expiry heap`)
    }
    if (early !== this.early.items.length) wrong.push(`${this.early.items.length} entries in the expiry heap, ${early} held there`)
    wrong.push(...this.early.disorder('expiry heap'))
    if (count > this.maxEntries) wrong.push(`${count} entries past the bound`)
    if (bytes > this.maxBytes) wrong.push(`${bytes} bytes past the bound`)
    return wrong
  }

  private live (key: string): Entry<V> | undefined {
    const entry = this.entries.get(key)
    if (entry === undefined || entry.until > performance.now()) return entry
    this.delete(key)
    return undefined
  }

  /**
   * The tenant that gives up an entry over the count bound: one holding the most, `adding` if
   * it does and has an older entry than the one it adds, else another holding as many, else
   * `adding` (the entry it adds goes).
   */
  private mostEntries (adding: Group<V>): Group<V> {
    const size = adding.entries.size
    if (size === this.mostCount && size > 1) return adding
    const most = this.byCount.get(this.mostCount)!
    for (const group of most) if (group !== adding) return group
    return adding
  }

  /** The same over the byte bound. A tenant tied for the most is the heap's root or a child of it. */
  private mostBytes (adding: Group<V>): Group<V> {
    const heap = this.byBytes.items
    const top = heap[0]
    if (adding.entries.size > 0 && adding.bytes === top.bytes) {
      if (adding.entries.size > 1) return adding
      for (let i = 0; i < 3 && i < heap.length; i++) {
        if (heap[i] !== adding && heap[i].bytes === top.bytes) return heap[i]
      }
      return adding
    }
    return top
  }

  /** Moves `group` to its count's bucket from `was`'s. */
  private counted (group: Group<V>, was: number): void {
    const now = group.entries.size
    if (was > 0) {
      const from = this.byCount.get(was)!
      from.delete(group)
      if (from.size === 0) {
        this.byCount.delete(was)
        if (this.mostCount === was && now < was) this.mostCount = now
      }
    }
    if (now > 0) {
      let to = this.byCount.get(now)
      if (to === undefined) this.byCount.set(now, to = new Set())
      to.add(group)
    }
    if (now > this.mostCount) this.mostCount = now
  }
}
