import t from 'tap'
import { TagClock, MemoryTier, tagTemplate, matchesIfNoneMatch, entryKey, sharedKey, localKey, LOCAL_KEY_MAX_INPUT, tagKey, etagOf, type CachedAnswer } from '../../../plugins/cache/index.js'
import { canonicalJson } from '../../../plugins/pipeline/index.js'
import { loadConfig, ConfigError } from '../../../schemas/config.js'

const answer = (keepUntil: number): CachedAnswer => ({ value: { a: 1 }, json: '{"a":1}', status: 200, etag: etagOf('{"a":1}'), freshUntil: keepUntil, staleUntil: keepUntil, keepUntil, policy: 'p' })

t.test('tag templates fill {x} from input; absent values fill as empty', async t => {
  t.equal(tagTemplate('agents')({}), 'agents')
  t.equal(tagTemplate('agent:{id}')({ id: 'a1' }), 'agent:a1')
  t.equal(tagTemplate('{a}/{b}!')({ a: 1, b: true }), '1/true!')
  t.equal(tagTemplate('agent:{id}')({}), 'agent:')
  t.equal(tagTemplate('agent:{id}')({ id: null }), 'agent:')
  // An object fills as its canonical JSON: String() gave every object one tag, and threw for this.
  t.equal(tagTemplate('t:{x}')({ x: { toString: 1 } }), 't:{"toString":1}')
  t.equal(tagTemplate('t:{x}')({ x: { b: 1, a: [2] } }), 't:{"a":[2],"b":1}')
  t.equal(tagTemplate('t:{x}')({ x: [1, 'a'] }), 't:[1,"a"]')
})

t.test('keys: the same input in any key order is one key; tenants are encoded so keys never collide', async t => {
  t.equal(entryKey('op', 't', { a: 1, b: 2 }), entryKey('op', 't', { b: 2, a: 1 }))
  t.not(entryKey('op', 't', { a: 1 }), entryKey('op', 't', { a: '1' }))
  t.not(entryKey('op', 'a:b', {}), entryKey('op', 'a', {}))
  t.equal(tagKey('a:b', 'x'), 'bff:cache-tag:a%3Ab:x')
  t.not(tagKey('a:b', 'c'), tagKey('a', 'b:c'))
})

t.test('keys of the in-process tier: the canonical input as it is, or the shared key past the bound', async t => {
  const input = { id: 'a1', q: 'x:y' }
  t.equal(localKey('getItem', 'a:b', canonicalJson(input)), 'getItem:a%3Ab:{"id":"a1","q":"x:y"}')
  t.equal(sharedKey('getItem', 'a:b', canonicalJson(input)), entryKey('getItem', 'a:b', input), 'the shared key of a canonical input is the entry key')
  // A tenant whose name ends like another tenant's input can never share a key with it.
  t.not(localKey('op', 'a:b', canonicalJson({})), localKey('op', 'a', canonicalJson({})))
  t.not(localKey('op', 't', canonicalJson({ a: 1 })), localKey('op', 't', canonicalJson({ a: '1' })))
  const long = canonicalJson({ text: 'x'.repeat(LOCAL_KEY_MAX_INPUT) })
  t.equal(localKey('op', 't', long), sharedKey('op', 't', long), 'a long input is keyed by its hash')
  t.ok(localKey('op', 't', long).length < 100)
  const edge = 'x'.repeat(LOCAL_KEY_MAX_INPUT)
  t.equal(localKey('op', 't', edge), 'op:t:' + edge, 'an input of exactly the bound is kept as it is')
})

t.test('If-None-Match: *, lists, weak tags', async t => {
  const etag = '"abc"'
  t.ok(matchesIfNoneMatch('*', etag))
  t.ok(matchesIfNoneMatch('"x", "abc"', etag))
  t.ok(matchesIfNoneMatch('W/"abc"', etag))
  t.notOk(matchesIfNoneMatch('"abcd"', etag))
  t.notOk(matchesIfNoneMatch('abc', etag))
  t.notOk(matchesIfNoneMatch('', etag))
  // The gateway's own tags are weak: either form of one matches.
  const weak = etagOf('{"a":1}')
  t.match(weak, /^W\/"[A-Za-z0-9_-]{27}"$/)
  t.ok(matchesIfNoneMatch(weak, weak))
  t.ok(matchesIfNoneMatch(weak.slice(2), weak))
  t.notOk(matchesIfNoneMatch(etagOf('{"a":2}'), weak))
})

t.test('the tag clock: invalidations after a read began invalidate what it stores; evicted marks only over-invalidate', async t => {
  const clock = new TagClock(2)
  const before = clock.now()
  clock.invalidate(['x'])
  t.notOk(clock.valid(['x'], before), 'invalidated after the read began')
  t.ok(clock.valid(['y'], before), 'another tag')
  t.ok(clock.valid(['x'], clock.now()), 'a read that began after it')
  const since = clock.now()
  clock.invalidate(['y'])
  clock.invalidate(['z']) // evicts the mark of x, raising the floor to its tick
  clock.invalidate(['w']) // evicts y: the floor is now y's tick, after `since`
  t.equal(clock.size, 2, 'bounded')
  t.notOk(clock.valid(['y'], since), 'an evicted mark still invalidates')
  t.notOk(clock.valid(['never-marked'], since), 'unknown tags count as the floor: conservative')
  t.ok(clock.valid(['never-marked'], clock.now()))
  const all = clock.now()
  clock.invalidateAll()
  t.notOk(clock.valid([], all), 'invalidateAll drops entries without tags too')
  t.ok(clock.valid([], clock.now()))
})

t.test('the tag clock: evicted marks raise their own tenant\'s floor, not another\'s', async t => {
  // One floor for all: a tenant invalidating enough distinct tags pushed out marks and dropped
  // every other tenant's entries (a forced Kernel refill for each).
  const clock = new TagClock(2, tagKey => tagKey.split(':')[0])
  const since = clock.now()
  for (let i = 0; i < 5; i++) clock.invalidate([`noisy:item${i}`])
  t.notOk(clock.valid(['noisy:item0'], since), 'the noisy tenant\'s evicted mark still invalidates')
  t.notOk(clock.valid(['noisy:other'], since), 'and its unmarked tags count as its floor')
  t.ok(clock.valid(['quiet:doc'], since), 'another tenant\'s entry stays valid')
  // Floors are bounded too (2 here): an evicted floor raises the floor of all.
  clock.invalidate(['a:x']); clock.invalidate(['a:y']); clock.invalidate(['b:x']); clock.invalidate(['b:y']); clock.invalidate(['c:x'])
  t.notOk(clock.valid(['quiet:doc'], since), 'once floors themselves are evicted, every scope counts as the highest evicted')

  // The memory tier's clock scopes tag keys by tenant (1000 marks at least).
  const tier = new MemoryTier(10, 1_000_000, () => 0)
  const before = tier.clock.now()
  for (let i = 0; i <= 1000; i++) tier.clock.invalidate([tagKey('no:isy', `item:${i}`)])
  t.ok(tier.clock.valid([tagKey('quiet', 'doc')], before), 'a quiet tenant keeps its entries')
  t.ok(tier.clock.valid([tagKey('no', 'isy:doc')], before), 'a tenant whose id is a prefix of the noisy one\'s too')
  t.notOk(tier.clock.valid([tagKey('no:isy', 'doc')], before), 'the noisy tenant\'s unmarked tags count as its floor')
})

t.test('the memory tier: one invalidation of more tags than the marks hold drops what it invalidated, and no other entry of the tenant', async t => {
  // The marks hold 1,000 tags (BFF_CACHE_MAX_SIZE 10). Before, the invalidation pushed out its
  // own first mark, which raised its tenant's floor to the invalidation's tick: every entry of the
  // tenant stored before it missed, whatever its tags.
  const tier = new MemoryTier(10, 1 << 20, () => 0)
  const who = 'ten:ant'
  const other = 'other'
  const since = tier.clock.now()
  t.ok(tier.set('kept', who, answer(2000), [tagKey(who, 'doc'), tagKey(who, 'docs')], since))
  t.ok(tier.set('first', who, answer(2000), [tagKey(who, 'item:0')], since), 'under the tag whose mark is pushed out')
  t.ok(tier.set('last', who, answer(2000), [tagKey(who, 'item:1000')], since), 'under a tag whose mark stays')
  t.ok(tier.set('theirs', other, answer(2000), [tagKey(other, 'item:0')], since), 'another tenant\'s, under a tag of the same name')
  const reading = tier.clock.now() // a read under way, whose store comes after the invalidation
  tier.clock.invalidate(Array.from({ length: 1001 }, (_, i) => tagKey(who, `item:${i}`)))
  t.equal(tier.clock.size, 1000, 'the marks stay bounded')
  t.ok(tier.get('kept'), 'an entry under tags not invalidated is still served')
  t.equal(tier.get('first'), undefined, 'the entry of the tag whose mark was pushed out is dropped')
  t.equal(tier.get('last'), undefined, 'the entry of a tag still marked is dropped')
  t.ok(tier.get('theirs'), 'another tenant\'s entry is left')
  t.notOk(tier.set('late', who, answer(2000), [tagKey(who, 'item:0')], reading), 'a read that began before the invalidation stores nothing under a tag it pushed out')
  t.ok(tier.set('fresh', who, answer(2000), [tagKey(who, 'item:0')], tier.clock.now()), 'a read that began after it stores')
  t.ok(tier.get('fresh'))
  // A later invalidation pushes out another of those marks (of its own tick): still no entry of
  // the tenant but those of the tags drops.
  tier.clock.invalidate([tagKey(other, 'x')])
  t.ok(tier.get('kept'), 'still served after the next invalidation pushes out a mark')
  t.ok(tier.get('fresh'), 'stored after the invalidation: kept')
  t.equal(tier.clock.floorsSize, 1, 'the tenant\'s floor, for reads under way')
  // Another instance's message may name tag keys no tenant's entry is under (not URI-encoded).
  tier.clock.invalidate(Array.from({ length: 1001 }, (_, i) => `bff:cache-tag:%E0%A4%A:item:${i}`))
  t.ok(tier.get('kept'), 'a mangled tag key pushed out drops nothing')
})

t.test('the memory tier is bounded, drops expired and invalidated entries, and refuses a raced store', async t => {
  let now = 1000
  const tier = new MemoryTier(2, 1 << 20, () => now)
  tier.set('a', 'tenant', answer(2000), ['t'], tier.clock.now())
  tier.set('b', 'tenant', answer(2000), [], tier.clock.now())
  tier.set('c', 'tenant', answer(2000), [], tier.clock.now())
  t.equal(tier.size, 2)
  t.equal(tier.get('a'), undefined, 'the least recently used went')
  t.ok(tier.get('c'))
  now = 2000
  t.equal(tier.get('c'), undefined, 'past keepUntil')
  const since = tier.clock.now()
  tier.clock.invalidate(['t'])
  t.notOk(tier.set('d', 'tenant', answer(5000), ['t'], since), 'a store that raced an invalidation is refused')
  t.ok(tier.set('d', 'tenant', answer(5000), ['t'], tier.clock.now()))
  tier.clock.invalidate(['t'])
  t.equal(tier.get('d'), undefined)
  tier.set('e', 'tenant', answer(5000), [], tier.clock.now())
  tier.clear()
  t.equal(tier.size, 0)
})

t.test('the memory tier is bounded in bytes too: large answers evict others, and one over an eighth of the bound is not kept', async t => {
  // Bounded by entry count alone, 10,000 answers of a few MB each took the process past its memory.
  const tier = new MemoryTier(1000, 64 * 1024, () => 1000)
  const sized = (chars: number): CachedAnswer => { const json = JSON.stringify('x'.repeat(chars - 2)); return { ...answer(5000), json } }
  for (let i = 0; i < 20; i++) tier.set(`k${i}`, 'tenant', sized(2000), [], tier.clock.now())
  t.ok(tier.bytes <= 64 * 1024, `within the bound (${tier.bytes} bytes)`)
  t.ok(tier.size < 20 && tier.size >= 9, `the oldest went (${tier.size} kept)`)
  t.ok(tier.get('k19'), 'the newest is kept')
  t.equal(tier.get('k0'), undefined)
  tier.set('huge', 'tenant', sized(3000), [], tier.clock.now())
  t.equal(tier.get('huge'), undefined, 'an answer over an eighth of the bound stays out')
  t.ok(tier.get('k19'), 'and evicted nothing')
  // The parsed value of many small arrays costs far more than its characters: each is counted.
  const small = new MemoryTier(1000, 1 << 20, () => 1000)
  const json = JSON.stringify(Array.from({ length: 1000 }, (_, i) => [i]))
  small.set('arrays', 'tenant', { ...answer(5000), json }, [], small.clock.now())
  t.ok(small.bytes >= 1000 * 2 * 48, `1,000 arrays count at least 96 KB (${small.bytes})`)
  // Separators inside a string are text: a CSV answer counts as its characters.
  const csv = JSON.stringify({ csv: 'a,b:c,[d],{e}\\",'.repeat(1000) })
  const text = new MemoryTier(1000, 1 << 20, () => 1000)
  text.set('csv', 'tenant', { ...answer(5000), json: csv }, [], text.clock.now())
  t.ok(text.get('csv'), 'kept')
  t.ok(text.bytes > 0 && text.bytes < 4 * csv.length, `a CSV string counts as its text (${text.bytes} for ${csv.length} characters)`)
})

t.test('the memory tier shares its bounds fairly: a tenant past them evicts its own oldest, not another tenant\'s', async t => {
  // In one LRU for all, a tenant's distinct reads pushed every other tenant's entries out.
  let evicted = 0
  const sized = (chars: number): CachedAnswer => { const json = JSON.stringify('x'.repeat(chars - 2)); return { ...answer(5000), json } }
  const byCount = new MemoryTier(4, 1 << 20, () => 1000, () => { evicted++ })
  byCount.set('quiet', 'quiet', answer(5000), [], byCount.clock.now())
  for (let i = 0; i < 10; i++) byCount.set(`hog${i}`, 'hog', answer(5000), [], byCount.clock.now())
  t.equal(byCount.size, 4)
  t.ok(byCount.get('quiet'), 'the quiet tenant\'s entry stays past the count bound')
  t.ok(byCount.get('hog9'), 'the hog keeps its newest')
  t.equal(byCount.get('hog0'), undefined, 'and lost its oldest')
  t.equal(evicted, 7, 'each entry pushed out is counted')
  // Past the byte bound the same (64 KB: entries of about 6 KB each, an eighth being 8 KB).
  const byBytes = new MemoryTier(1000, 64 * 1024, () => 1000, () => { evicted++ })
  byBytes.set('quiet', 'quiet', sized(2000), [], byBytes.clock.now())
  for (let i = 0; i < 40; i++) byBytes.set(`hog${i}`, 'hog', sized(2000), [], byBytes.clock.now())
  t.ok(byBytes.bytes <= 64 * 1024, `within the bound (${byBytes.bytes} bytes)`)
  t.ok(byBytes.get('quiet'), 'the quiet tenant\'s entry stays past the byte bound')
  t.ok(byBytes.get('hog39'))
  // An entry past its keepUntil goes before any live one (the tier's own clock: real time here).
  const expiring = new MemoryTier(2, 1 << 20, () => 1000, () => { evicted++ })
  evicted = 0
  expiring.set('gone', 'quiet', answer(1000), [], expiring.clock.now())
  expiring.set('h0', 'hog', answer(5000), [], expiring.clock.now())
  expiring.set('h1', 'hog', answer(5000), [], expiring.clock.now())
  t.equal(evicted, 0, 'the expired entry made room, no live one was evicted')
  t.ok(expiring.get('h0') && expiring.get('h1'))
  // An expired entry set after a live one (operations keep theirs for different times): a
  // metrics scrape (purge) drops it, and so does a bound, before it takes a live entry.
  const shielded = new MemoryTier(10, 1 << 20, () => 1000)
  shielded.set('long', 'a', answer(5000), [], shielded.clock.now())
  shielded.set('dead', 'b', answer(1000), [], shielded.clock.now())
  t.equal(shielded.size, 2)
  await shielded.purgeAll()
  t.equal(shielded.size, 1, 'purge drops the expired entry behind a live one')
  t.ok(shielded.get('long'), 'and keeps the live one')
  const behind = new MemoryTier(3, 1 << 20, () => 1000, () => { evicted++ })
  evicted = 0
  behind.set('long', 'a', answer(5000), [], behind.clock.now())
  behind.set('dead', 'a', answer(1000), [], behind.clock.now())
  behind.set('b', 'b', answer(5000), [], behind.clock.now())
  behind.set('a1', 'a', answer(5000), [], behind.clock.now())
  t.equal(evicted, 0, 'the bound took the expired entry behind a live one, no live entry')
  t.ok(behind.get('long') && behind.get('b') && behind.get('a1'))
  // A stored answer over an eighth of the bytes replaces the one under its key, not kept itself.
  byBytes.set('quiet', 'quiet', sized(20_000), [], byBytes.clock.now())
  t.equal(byBytes.get('quiet'), undefined)
  byBytes.clear()
  t.equal(byBytes.size, 0)
  t.equal(byBytes.bytes, 0)
})

t.test('config: BFF_CACHE_* are validated and redis needs REDIS_URL', async t => {
  const c = loadConfig({})
  t.equal(c.BFF_CACHE_ENABLED, true)
  t.equal(c.BFF_CACHE_STORE, undefined, 'decided from REDIS_URL at start-up')
  t.equal(c.BFF_CACHE_TTL, 60)
  t.equal(c.BFF_CACHE_MAX_SIZE, 10000)
  t.throws(() => loadConfig({ BFF_CACHE_STORE: 'redis' }), new ConfigError('Invalid configuration: BFF_CACHE_STORE="redis" needs REDIS_URL: set REDIS_URL, or BFF_CACHE_STORE=memory'))
  t.throws(() => loadConfig({ BFF_CACHE_STORE: 'disk' }), /BFF_CACHE_STORE="disk" is invalid/)
  t.throws(() => loadConfig({ BFF_CACHE_TTL: '0' }), /BFF_CACHE_TTL="0" is invalid: expected an integer \(1\.\.86400\)/)
  t.throws(() => loadConfig({ BFF_CACHE_MAX_SIZE: 'lots' }), /BFF_CACHE_MAX_SIZE="lots" is invalid/)
  t.equal(loadConfig({ BFF_CACHE_STORE: 'redis', REDIS_URL: 'redis://127.0.0.1:6379' }).BFF_CACHE_STORE, 'redis')
})

t.test('tag templates fill {x} from the input\'s own fields only: a name Object.prototype has is absent when the input lacks it', async t => {
  // A REST query's input is a null-prototype object (the query string's), a JSON body's is not:
  // the same absent field filled '' for the one and Object's constructor for the other.
  t.equal(tagTemplate('maker:{constructor}')({}), 'maker:')
  t.equal(tagTemplate('maker:{constructor}')(Object.create(null)), 'maker:')
  t.equal(tagTemplate('t:{toString}/{valueOf}')({}), 't:/')
  t.equal(tagTemplate('maker:{constructor}')({ constructor: 'ferrari' }), 'maker:ferrari')
})
