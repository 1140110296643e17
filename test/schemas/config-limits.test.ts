// Numeric variables have a maximum wherever a huge value breaks something the gateway depends
// on: start-up refuses it naming the variable and its range, instead of the gateway failing
// later (silently, per call) in Redis, V8 or a Date.
import t from 'tap'
import { randomUUID } from 'node:crypto'
import { loadConfig } from '../../schemas/config.js'
import { testConfig } from '../helper.js'
import { refusal } from './refusal.js'
import { idemSetup } from '../plugins/idempotency/idempotency-helper.js'
import { storeKey } from '../../plugins/idempotency/store.js'

// Each bounded variable, its largest accepted value, and why there is a bound.
const MAXIMA: Array<[name: string, max: number, why: string]> = [
  ['BFF_IDEMPOTENCY_TTL_SECONDS', 2_592_000, '30 days; * 1000 is the PX of every stored outcome, which Redis refuses past its largest expiry'],
  ['BFF_RATE_LIMIT_GLOBAL_WINDOW_MS', 86_400_000, 'a day; Redis keys expire after twice the window'],
  ['BFF_BODY_LIMIT', 268_435_456, '256 MiB; a JSON body is read into one string, and V8 strings stop at 2^29 - 24 characters'],
  ['BFF_IDEMPOTENCY_MAX_KEYS', 10_000_000, 'the LRU allocates its arrays for max keys at start-up'],
  ['BFF_AUDIT_RETENTION_DAYS', 36_500, '100 years; far more days make the prune date an Invalid Date'],
  ['BFF_AUDIT_QUEUE_MAX', 1_000_000, 'the queue lives in the heap'],
  ['BFF_AUDIT_MEMORY_MAX', 10_000_000, 'the memory store indexes entries in Sets, capped by V8 at 2^24']
]

t.test('each bounded variable accepts its maximum and refuses one more, naming its range', async t => {
  for (const [name, max, why] of MAXIMA) {
    t.equal(loadConfig({ [name]: String(max) })[name as 'PORT'], max, `${name} accepts ${max} (${why})`)
    t.equal(refusal({ [name]: String(max + 1) }), `Invalid configuration: ${name}="${max + 1}" is invalid: expected an integer (1..${max})`)
  }
})

t.test('an idempotency TTL Redis cannot store is refused at start-up, not discovered at the first repeat', async t => {
  // 1e16 s is 1e19 ms, past Redis' largest expiry: every stored outcome failed (a warning per
  // call), so repeats waited, got 409, and finally ran again.
  const ttl = 10_000_000_000_000_000
  t.throws(() => testConfig({ BFF_IDEMPOTENCY_TTL_SECONDS: ttl }), { name: 'ConfigError', message: /BFF_IDEMPOTENCY_TTL_SECONDS="10000000000000000" is invalid: expected an integer \(1\.\.2592000\)/ })
})

t.test('the largest idempotency TTL is stored by Redis: a repeat is a replay', async t => {
  const s = await idemSetup(t, 'redis', { BFF_IDEMPOTENCY_TTL_SECONDS: 2_592_000, BFF_IDEMPOTENCY_WAIT_MS: 0 })
  const key = randomUUID()
  t.equal((await s.create({ name: 'a' }, key)).statusCode, 201)
  const repeat = await s.create({ name: 'a' }, key)
  t.equal(repeat.headers['idempotent-replayed'], 'true', `the repeat is a replay (got ${repeat.statusCode} ${repeat.json().code ?? ''})`)
  t.equal(s.calls(), 1, 'the Kernel ran the mutation once')
  const stored = storeKey(s.tenant, 'createItem', key)
  t.ok(await s.app.redis.client.pttl(stored) > 2_591_000_000, 'Redis keeps it for 30 days')
  await s.app.redis.client.del(stored) // not 30 days in the machine's shared Redis
})
