import { LRUCache } from 'lru-cache'
import { FairLru } from '../../fair-lru.js'
import { TAG_PREFIX } from './keys.js'

/** The scope of a tag key (`tagKey`): its tenant, URI-encoded, so it holds no ':'. */
const tenantOfTag = (tagKey: string): string => tagKey.slice(0, tagKey.indexOf(':', TAG_PREFIX.length))

/** One cached answer: the Kernel's 2xx status and its output, shaped by the op's output schema. */
export interface CachedAnswer {
  /** The output, parsed from `json` (faces that need an object share it; nobody mutates it). */
  readonly value: unknown
  readonly json: string
  readonly status: number
  readonly etag: string
  /** Epoch ms: fresh until then, served stale (and refreshed) until `staleUntil`. */
  readonly freshUntil: number
  readonly staleUntil: number
  /** Epoch ms: kept until then, to be served stale while the Kernel is unavailable. */
  readonly keepUntil: number
  /**
   * What the answer was made under (see `policyOf`): an entry made under another output schema,
   * Kernel call or cache policy (another version during a rolling deploy, or before a reload)
   * is not served.
   */
  readonly policy: string
}

/**
 * Invalidation clock of this instance's tier. Each invalidation takes the next tick and marks
 * its tags with it; an entry stored from a read that began at tick `c` is valid while none of
 * its tags was marked after `c`. So a refill whose Kernel call raced an invalidation is never
 * served, whenever it lands. The marks are bounded: an evicted mark raises the floor of its
 * scope (a tenant), which every unmarked tag of that scope then counts as for a read still under
 * way (valid); that can only refuse more stores, never let a stale one in. With one floor for
 * all, a tenant invalidating enough distinct tags refused every other tenant's. The floors are
 * bounded the same way: an evicted one raises the floor of every scope.
 * An entry already stored is not held to the floors (validStored): the marks an invalidation
 * pushed out are told to `onForget` before it returns, and the memory tier drops the entries
 * stored under those tags before them, each tag's own, no other. Held to the floors, one
 * invalidation of more tags than the marks hold (an admin call of 1,000 tags, a replay of
 * pending ones at BFF_CACHE_MAX_SIZE=10) raised its tenant's floor to its own tick, and every
 * entry of that tenant missed, whatever its tags.
 */
export class TagClock {
  private tick = 0
  private floor = 0
  private epoch = 0
  /**
   * Made when first needed (the marks at the first invalidation, the floors at the first mark
   * evicted): lru-cache allocates its arrays for `max` entries when made, 30 ms of CPU each for
   * 40,000, paid at every start of the gateway (and by every app a test builds) though most hold
   * no mark for a while, and many never evict one.
   */
  private marks: LRUCache<string, number> | undefined
  private floors: LRUCache<string, number> | undefined
  /** The marks the invalidation under way pushed out (tag key -> its tick), told to `onForget` once it is done. */
  private forgotten: Map<string, number> | null = null

  /**
   * `onEvict`: called for each mark or floor its bound pushed out (the metric: each raises a
   * floor, and the reads under way under it store nothing). `onForget`: the marks one
   * invalidation pushed out (tag key -> its tick), to drop the entries stored under them before
   * that tick (validStored no longer sees them).
   */
  constructor (private readonly maxTags: number, private readonly scopeOf: (tagKey: string) => string = () => '', private readonly onEvict?: (list: 'marks' | 'floors') => void, private readonly onForget?: (marks: ReadonlyMap<string, number>) => void) {}

  private floorList (): LRUCache<string, number> {
    this.floors ??= new LRUCache<string, number>({
      max: this.maxTags,
      dispose: (value, _scope, reason) => {
        if (reason !== 'evict') return
        this.onEvict?.('floors')
        if (value > this.floor) this.floor = value
      }
    })
    return this.floors
  }

  private markList (): LRUCache<string, number> {
    this.marks ??= new LRUCache<string, number>({
      max: this.maxTags,
      dispose: (value, key, reason) => {
        if (reason !== 'evict') return
        this.onEvict?.('marks')
        const forgotten = this.forgotten
        if (forgotten !== null && value > (forgotten.get(key) ?? 0)) forgotten.set(key, value)
        const scope = this.scopeOf(key)
        const floors = this.floorList()
        if (value > (floors.peek(scope) ?? 0)) floors.set(scope, value)
      }
    })
    return this.marks
  }

  /** The tick a read starts at: entries it stores are checked against later invalidations. */
  now (): number {
    return this.tick
  }

  invalidate (tagKeys: readonly string[]): void {
    const t = ++this.tick
    const marks = this.markList()
    // Only here are marks set, so only here pushed out.
    const forgotten = this.forgotten = new Map<string, number>()
    try {
      for (const k of tagKeys) marks.set(k, t)
    } finally {
      this.forgotten = null
    }
    if (forgotten.size > 0) this.onForget?.(forgotten)
  }

  /** Every entry stored so far becomes invalid (invalidations may have been missed). */
  invalidateAll (): void {
    this.epoch = ++this.tick
  }

  /**
   * `epoch` false: whether the tags alone hold since `since`, whatever invalidateAll said since
   * (the messages it stands for were other instances' invalidations, which Redis has had).
   */
  valid (tagKeys: readonly string[], since: number, epoch = true): boolean {
    if (epoch && since < this.epoch) return false
    for (const k of tagKeys) if ((this.marks?.get(k) ?? this.floorOf(k)) > since) return false
    return true
  }

  /**
   * Whether an entry stored (as `valid` said then) holds since `since`: its tags' marks and
   * invalidateAll, not the floors. A mark pushed out since it was stored was told to `onForget`,
   * which dropped it if the mark came after `since`; one stored after the mark went was held to
   * the floor it raised. Only for a clock whose `onForget` drops entries so (the memory tier's).
   */
  validStored (tagKeys: readonly string[], since: number): boolean {
    if (since < this.epoch) return false
    if (this.marks === undefined) return true
    for (const k of tagKeys) if ((this.marks.get(k) ?? 0) > since) return false
    return true
  }

  /** What an unmarked tag counts as: its scope's floor, or the floor of all when higher. */
  private floorOf (tagKey: string): number {
    if (this.floors === undefined || this.floors.size === 0) return this.floor
    const own = this.floors.get(this.scopeOf(tagKey)) ?? 0
    return own > this.floor ? own : this.floor
  }

  get size (): number {
    return this.marks?.size ?? 0
  }

  /** Scopes (tenants) with a floor of their own, raised by a mark pushed out. */
  get floorsSize (): number {
    return this.floors?.size ?? 0
  }
}

interface LocalEntry {
  readonly answer: CachedAnswer
  readonly tagKeys: readonly string[]
  readonly since: number
}

/**
 * What an entry costs the process, about: its key, its JSON, and the parsed value beside it, as
 * twice the JSON plus 48 bytes for each object, array, member and element in it (read from its
 * `{ [ : ,` outside strings: a CSV text is one string). Counted by characters alone, an answer of
 * many small arrays cost the heap 6 times what was counted. One pass over the JSON, when the
 * entry is stored, never on a hit.
 */
function entryBytes (entry: LocalEntry, key: string): number {
  const json = entry.answer.json
  let parts = 0
  let inString = false
  for (let i = 0; i < json.length; i++) {
    const c = json.charCodeAt(i)
    if (inString) {
      if (c === 92) i++ // a backslash escapes the next character
      else if (c === 34) inString = false
    } else if (c === 34) {
      inString = true
    } else if (c === 44 || c === 58 || c === 91 || c === 123) {
      parts++
    }
  }
  return key.length + 3 * json.length + 48 * parts + 64
}

/**
 * The in-process tier: a bounded LRU of answers, each valid while its tags were not
 * invalidated since the read that produced it began. It never holds more than `max` entries
 * nor, about, `maxBytes` of them (counted by entry count alone, 10,000 answers of a few MB each
 * took the process past its memory), keeps no answer over an eighth of that (it stays in Redis),
 * and never returns an entry past its `keepUntil` or invalidated.
 *
 * The bounds are shared fairly between tenants (FairLru): past one, the entry that goes is the
 * least recently used of the tenant holding the most entries (or bytes). Entries past their
 * `keepUntil` are dropped when read, at each metrics scrape (purgeAll, a slice at a time, SCRAPE_SLICES at most), and
 * before a bound takes a live entry, those set behind an older live one too (operations keep theirs
 * for different times: FairLru keeps the entries set out of expiry order apart). In one LRU for all, a
 * tenant's distinct reads (its input is part of the key: a filter value each) pushed every other
 * tenant's fresh entries out.
 */
export class MemoryTier {
  private readonly lru: FairLru<LocalEntry>
  private readonly maxEntryBytes: number
  readonly clock: TagClock

  /**
   * `onEvict`: called for each entry a bound pushed out (not for those expired or invalidated);
   * `onTagEvict`: for each mark or floor of the clock's pushed out.
   */
  constructor (max: number, maxBytes: number, private readonly now: () => number, onEvict?: () => void, onTagEvict?: (list: 'marks' | 'floors') => void) {
    this.lru = new FairLru<LocalEntry>(max, maxBytes, onEvict)
    this.maxEntryBytes = Math.max(1, Math.floor(maxBytes / 8))
    // Marks outlive the entries they guard by far: a tag mark per cached entry, and more.
    this.clock = new TagClock(Math.max(1000, max * 4), tenantOfTag, onTagEvict, marks => { this.forget(marks) })
  }

  /**
   * Drops the entries stored under a tag whose mark was pushed out before that mark's tick: those
   * of the tenants the tags name alone (each tenant's entries once), the others left as they are.
   */
  private forget (marks: ReadonlyMap<string, number>): void {
    const tenants = new Set<string>()
    for (const k of marks.keys()) tenants.add(tenantOfTag(k))
    for (const scope of tenants) {
      let tenant: string
      try {
        tenant = decodeURIComponent(scope.slice(TAG_PREFIX.length))
      } catch {
        continue // no tag key this tier makes (tagKey): another instance's message, mangled
      }
      const gone: string[] = []
      for (const [key, entry] of this.lru.itemsOf(tenant)) {
        for (const k of entry.tagKeys) {
          if ((marks.get(k) ?? 0) > entry.since) {
            gone.push(key)
            break
          }
        }
      }
      for (const key of gone) this.lru.delete(key)
    }
  }

  get (key: string): CachedAnswer | undefined {
    const entry = this.lru.get(key)
    if (entry === undefined) return undefined
    if (entry.answer.keepUntil <= this.now() || !this.clock.validStored(entry.tagKeys, entry.since)) {
      this.lru.delete(key)
      return undefined
    }
    return entry.answer
  }

  /**
   * Stores unless the tags were invalidated since `since`; says whether it stored (an answer too
   * large for the tier, or pushed out at once by the bounds, counts as stored: nothing raced it).
   * `tenant`: whose entry it is, whose share of the bounds it takes.
   */
  set (key: string, tenant: string, answer: CachedAnswer, tagKeys: readonly string[], since: number): boolean {
    if (!this.clock.valid(tagKeys, since)) return false
    const entry: LocalEntry = { answer, tagKeys, since }
    const bytes = entryBytes(entry, key)
    if (bytes > this.maxEntryBytes) {
      // The older entry under the key is not served in its place.
      this.lru.delete(key)
      return true
    }
    // Expires for the tier (performance.now()) when `keepUntil` comes by `now`, so that it goes
    // before live entries once past it; get checks `keepUntil` by `now` itself, and that decides.
    this.lru.set(key, tenant, entry, bytes, answer.keepUntil - this.now())
    return true
  }

  clear (): void {
    this.lru.clear()
  }

  get size (): number {
    return this.lru.size
  }

  /** Drops the entries past their keep time, a slice at a time, `maxSlices` slices at most (FairLru.purgeAllStale; a metrics scrape's, as the idempotency store's). */
  async purgeAll (maxSlices = Infinity): Promise<void> {
    await this.lru.purgeAllStale(maxSlices)
  }

  /** What the entries held cost, about (entryBytes). */
  get bytes (): number {
    return this.lru.bytes
  }
}
