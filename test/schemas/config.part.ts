import t from 'tap'
import { fileURLToPath } from 'node:url'
import { readFileSync } from 'node:fs'
import { loadConfig, productionProblems, ConfigError, ConfigSchema, DEMO_MANIFEST, unknownVariables, startWarnings, FEATURE_SETTINGS, type Config } from '../../schemas/config.js'
import { randomUUID } from 'node:crypto'
import { testConfig } from '../helper.js'
import { refusal } from './refusal.js'
import { idemSetup } from '../plugins/idempotency/idempotency-helper.js'
import { storeKey } from '../../plugins/idempotency/store.js'

const demoPath = fileURLToPath(new URL('../../kernel/manifest.yaml', import.meta.url))

/** The ConfigError a bad environment throws, or null when it loads. */
function errorOf (env: Record<string, string | number | boolean | undefined>): ConfigError | null {
  try {
    loadConfig(env)
  } catch (err) {
    if (err instanceof ConfigError) return err
    throw err
  }
  return null
}

t.test('defaults: every concern on, port 3000, 1 MB bodies, the demo manifest', async t => {
  const c = loadConfig({})
  t.equal(c.PORT, 3000)
  t.equal(c.HOST, '127.0.0.1')
  t.equal(c.NODE_ENV, 'development')
  t.equal(c.LOG_LEVEL, 'info')
  t.equal(c.BFF_BODY_LIMIT, 1048576)
  t.equal(c.BFF_MANIFEST, DEMO_MANIFEST)
  t.equal(DEMO_MANIFEST, demoPath, 'DEMO_MANIFEST is kernel/manifest.yaml')
  t.equal(c.BFF_DEMO_KERNEL, true)
  t.equal(c.KERNEL_URL, undefined)
  t.equal(c.BFF_JWT_SECRET, undefined)
  t.equal(c.BFF_CIRCUIT_BREAKER_THRESHOLD, undefined)
  t.equal(c.BFF_CIRCUIT_BREAKER_TIMEOUT, undefined)
  t.equal(c.BFF_KERNEL_KEEP_ALIVE_TIMEOUT_MS, 4000, "below uvicorn's default idle timeout (5 s, with no Keep-Alive hint)")
  for (const flag of ['BFF_AUTH_ENABLED', 'BFF_METRICS_ENABLED', 'BFF_OPENAPI_ENABLED', 'BFF_CIRCUIT_BREAKER_ENABLED'] as const) {
    t.equal(c[flag], true, `${flag} defaults to true`)
  }
  const flags = Object.keys(ConfigSchema.properties).filter(k => /^BFF_.*_ENABLED$/.test(k))
  t.ok(flags.length >= 4)
  for (const flag of flags) t.equal((c as Record<string, unknown>)[flag], true, `${flag} (from the schema) defaults to true`)
})

t.test('strings are coerced to numbers and booleans', async t => {
  const c = loadConfig({
    PORT: '8080',
    BFF_BODY_LIMIT: '2048',
    BFF_AUTH_ENABLED: 'false',
    BFF_METRICS_ENABLED: 'true',
    BFF_OPENAPI_ENABLED: false,
    BFF_CIRCUIT_BREAKER_THRESHOLD: '7',
    BFF_CIRCUIT_BREAKER_TIMEOUT: 1500,
    NODE_ENV: 'production',
    LOG_LEVEL: 'silent',
    KERNEL_URL: 'https://kernel.internal:8443',
    BFF_MANIFEST: '/etc/mantle/manifest.json',
    HOST: '0.0.0.0'
  })
  t.equal(c.PORT, 8080)
  t.equal(c.BFF_BODY_LIMIT, 2048)
  t.equal(c.BFF_AUTH_ENABLED, false)
  t.equal(c.BFF_METRICS_ENABLED, true)
  t.equal(c.BFF_OPENAPI_ENABLED, false)
  t.equal(c.BFF_CIRCUIT_BREAKER_THRESHOLD, 7)
  t.equal(c.BFF_CIRCUIT_BREAKER_TIMEOUT, 1500)
  t.equal(c.NODE_ENV, 'production')
  t.equal(c.LOG_LEVEL, 'silent')
  t.equal(c.KERNEL_URL, 'https://kernel.internal:8443')
  t.equal(c.BFF_MANIFEST, '/etc/mantle/manifest.json')
  t.equal(c.HOST, '0.0.0.0')
  t.equal(loadConfig({ PORT: 0 }).PORT, 0, 'port 0 picks a free port')
  t.equal(loadConfig({ PORT: '65535' }).PORT, 65535)
})

t.test('an empty string is unset', async t => {
  const c = loadConfig({ PORT: '', BFF_AUTH_ENABLED: '', BFF_MANIFEST: '', KERNEL_URL: '', BFF_JWT_SECRET: '', HOST: '', BFF_BODY_LIMIT: '' })
  t.equal(c.PORT, 3000)
  t.equal(c.BFF_AUTH_ENABLED, true)
  t.equal(c.BFF_MANIFEST, DEMO_MANIFEST)
  t.equal(c.HOST, '127.0.0.1')
  t.equal(c.BFF_BODY_LIMIT, 1048576)
  t.notOk('KERNEL_URL' in c)
  t.notOk('BFF_JWT_SECRET' in c)
})

t.test('variables the schema does not know are not copied', async t => {
  const c = loadConfig({ PATH: '/usr/bin', SOMETHING_ELSE: 'x' })
  t.notOk('PATH' in c)
  t.notOk('SOMETHING_ELSE' in c)
})

t.test('the result is frozen', async t => {
  const c = loadConfig({ PORT: '1234' })
  t.ok(Object.isFrozen(c))
  t.throws(() => { (c as { PORT: number }).PORT = 1 }, TypeError)
  t.equal(c.PORT, 1234)
})

t.test('one error names every bad variable and what it accepts', async t => {
  const err = errorOf({ PORT: 'abc', LOG_LEVEL: 'loud', KERNEL_URL: 'ftp://x', BFF_AUTH_ENABLED: 'maybe', BFF_BODY_LIMIT: '0', HOST: 'fine' })
  t.type(err, ConfigError)
  t.equal(err?.name, 'ConfigError')
  t.equal(err?.message, 'Invalid configuration: ' + [
    'PORT="abc" is invalid: expected an integer (0..65535)',
    'LOG_LEVEL="loud" is invalid: expected fatal | error | warn | info | debug | trace | silent',
    'KERNEL_URL="ftp://x" is invalid: expected Kernel origin, http(s)://host:port, wins over the manifest',
    'BFF_AUTH_ENABLED="maybe" is invalid: expected true or false',
    'BFF_BODY_LIMIT="0" is invalid: expected an integer (1..268435456)'
  ].join('; '))
  t.notMatch(err?.message, /HOST/, 'a good variable is not named')
})

t.test('each bad value alone', async t => {
  t.equal(errorOf({ PORT: '70000' })?.message, 'Invalid configuration: PORT="70000" is invalid: expected an integer (0..65535)')
  t.equal(errorOf({ PORT: '-1' })?.message, 'Invalid configuration: PORT="-1" is invalid: expected an integer (0..65535)')
  t.equal(errorOf({ PORT: '80.5' })?.message, 'Invalid configuration: PORT="80.5" is invalid: expected an integer (0..65535)')
  t.equal(errorOf({ NODE_ENV: 'prod' })?.message, 'Invalid configuration: NODE_ENV="prod" is invalid: expected development | production | test')
  t.equal(errorOf({ KERNEL_URL: 'http://kernel:4001/v1' })?.message, 'Invalid configuration: KERNEL_URL="http://kernel:4001/v1" is invalid: expected Kernel origin, http(s)://host:port, wins over the manifest', 'an origin, without a path')
  // A query or a fragment passed, and undici refused the origin at start-up without naming the variable.
  for (const url of ['http://kernel:4001?x=1', 'http://kernel:4001#a']) {
    t.equal(errorOf({ KERNEL_URL: url })?.message, `Invalid configuration: KERNEL_URL="${url}" is invalid: expected Kernel origin, http(s)://host:port, wins over the manifest`, 'an origin, without a query or fragment')
  }
  // Credentials too: undici never sent them, and the origin went into /metrics labels as given.
  const credentials = errorOf({ KERNEL_URL: 'http://svc:s3cr3t@kernel:4001' })?.message
  t.match(credentials, /KERNEL_URL=".*" is invalid: expected Kernel origin/, 'an origin, without credentials')
  t.notMatch(credentials, /s3cr3t/, 'the password not shown')
  t.equal(errorOf({ BFF_CIRCUIT_BREAKER_THRESHOLD: '0' })?.message, 'Invalid configuration: BFF_CIRCUIT_BREAKER_THRESHOLD="0" is invalid: expected an integer (1..1000000)')
  t.equal(errorOf({ BFF_CIRCUIT_BREAKER_TIMEOUT: 'soon' })?.message, 'Invalid configuration: BFF_CIRCUIT_BREAKER_TIMEOUT="soon" is invalid: expected an integer (1..86400000)')
  t.equal(errorOf({ BFF_CIRCUIT_BREAKER_TIMEOUT: '86400001' })?.message, 'Invalid configuration: BFF_CIRCUIT_BREAKER_TIMEOUT="86400001" is invalid: expected an integer (1..86400000)', 'at most a day, as in the manifest')
  t.equal(errorOf({ BFF_KERNEL_KEEP_ALIVE_TIMEOUT_MS: '0' })?.message, 'Invalid configuration: BFF_KERNEL_KEEP_ALIVE_TIMEOUT_MS="0" is invalid: expected an integer (100..600000)')
  t.equal(errorOf({ BFF_CIRCUIT_BREAKER_THRESHOLD: '1000001' })?.message, 'Invalid configuration: BFF_CIRCUIT_BREAKER_THRESHOLD="1000001" is invalid: expected an integer (1..1000000)')
  t.equal(errorOf({ BFF_METRICS_ENABLED: 'yes' })?.message, 'Invalid configuration: BFF_METRICS_ENABLED="yes" is invalid: expected true or false')
  t.equal(errorOf({ BFF_DEMO_KERNEL: 'off' })?.message, 'Invalid configuration: BFF_DEMO_KERNEL="off" is invalid: expected true or false')
})

t.test('loadConfig() with no argument reads process.env', async t => {
  const before = process.env.PORT
  const beforeLimit = process.env.BFF_BODY_LIMIT
  t.teardown(() => {
    if (before === undefined) delete process.env.PORT
    else process.env.PORT = before
    if (beforeLimit === undefined) delete process.env.BFF_BODY_LIMIT
    else process.env.BFF_BODY_LIMIT = beforeLimit
  })
  process.env.PORT = '4321'
  process.env.BFF_BODY_LIMIT = '777'
  const c = loadConfig()
  t.equal(c.PORT, 4321)
  t.equal(c.BFF_BODY_LIMIT, 777)
  process.env.PORT = 'not-a-port'
  t.throws(() => loadConfig(), { name: 'ConfigError', message: /^Invalid configuration: PORT="not-a-port" is invalid: expected an integer \(0\.\.65535\)$/ })
})

t.test('production problems', async t => {
  const prod = (env: Record<string, string>): Config => loadConfig({ NODE_ENV: 'production', BFF_AUDIT_ENABLED: 'false', ...env })
  t.same(productionProblems(prod({})), ['BFF_JWT_SECRET is missing (or set BFF_JWT_SECRETS, BFF_JWT_PUBLIC_KEYS or BFF_JWKS_URL)'])
  t.same(productionProblems(prod({ BFF_JWT_SECRET: 'a'.repeat(31) })), ['BFF_JWT_SECRET is shorter than 32 bytes'])
  t.same(productionProblems(prod({ BFF_JWT_SECRET: 'a'.repeat(32) })), [], '32 bytes is enough')
  t.same(productionProblems(prod({ BFF_JWT_SECRET: 'é'.repeat(16) })), [], 'bytes, not characters: 16 × é is 32 bytes')
  t.same(productionProblems(prod({ BFF_JWT_SECRET: 'é'.repeat(15) + 'a' })), ['BFF_JWT_SECRET is shorter than 32 bytes'], '31 bytes')
  t.same(productionProblems(prod({ BFF_AUTH_ENABLED: 'false' })), [], 'no key needed when auth is off')
  const plainJwks = ['BFF_JWKS_URL is plain http to another host (keys fetched in clear can be replaced on the way, and whoever replaces them can sign tokens): use https']
  t.same(productionProblems(prod({ BFF_JWKS_URL: 'http://idp.internal/.well-known/jwks.json' })), plainJwks, 'a JWKS over plain http')
  t.same(productionProblems(prod({ BFF_JWKS_URL: 'http://127.0.0.1.nip.io/jwks' })), plainJwks, 'a host that merely starts like loopback')
  for (const safe of ['https://idp.example/jwks', 'http://127.0.0.1:8080/jwks', 'http://localhost/jwks', 'http://[::1]:9000/jwks']) {
    t.same(productionProblems(prod({ BFF_JWKS_URL: safe })), [], `${safe} is accepted`)
  }
  t.same(productionProblems(loadConfig({ NODE_ENV: 'development', BFF_JWKS_URL: 'http://idp.internal/jwks' })), [], 'plain http is fine outside production')
  t.same(productionProblems(loadConfig({ NODE_ENV: 'development' })), [], 'nothing outside production')
  t.same(productionProblems(loadConfig({ NODE_ENV: 'test', BFF_JWT_SECRET: 'short' })), [], 'nothing in test')
  t.same(productionProblems(loadConfig({})), [], 'development is the default')
})

t.test('BFF_CORS_ORIGINS: * or http(s) origins without a path; * refused in production only', async t => {
  t.equal(loadConfig({}).BFF_CORS_ORIGINS, undefined, 'unset by default')
  for (const good of ['https://app.example.com', 'http://localhost:5173', '*', 'https://a.example, https://b.example:8443', 'http://[::1]:3000']) {
    t.equal(errorOf({ BFF_CORS_ORIGINS: good }), null, `accepts ${good}`)
  }
  for (const bad of ['https://app.example.com/', 'https://app.example.com/path', 'app.example.com', 'ftp://app.example.com', 'https://user@app.example.com', 'https://a.example,null', ' , ', 'https://a.example?x=1']) {
    t.match(errorOf({ BFF_CORS_ORIGINS: bad })?.message, /^Invalid configuration: BFF_CORS_ORIGINS=.* is invalid: expected a comma-separated list of \* or http\(s\) origins/, `refuses ${JSON.stringify(bad)}`)
  }
  // @fastify/cors compares exactly, and a browser sends its origin in one form only: these matched
  // no request, and the front end got opaque CORS errors.
  for (const [bad, origin] of [['https://App.Example.com', 'https://app.example.com'], ['https://app.example.com:443', 'https://app.example.com'], ['http://localhost:80', 'http://localhost'], ['http://[0:0:0:0:0:0:0:1]:3000', 'http://[::1]:3000']]) {
    t.equal(errorOf({ BFF_CORS_ORIGINS: `https://ok.example, ${bad}` })?.message,
      `Invalid configuration: BFF_CORS_ORIGINS="https://ok.example, ${bad}" is invalid: expected a comma-separated list of * or http(s) origins without a path, as browsers send them ("${bad}" matches no browser's Origin: write "${origin}")`, `refuses ${bad}, naming ${origin}`)
  }
  const prod = (origins: string): string[] => productionProblems(loadConfig({ NODE_ENV: 'production', BFF_AUDIT_ENABLED: 'false', BFF_JWT_SECRET: 'a'.repeat(32), BFF_CORS_ORIGINS: origins }))
  t.same(prod('https://app.example.com'), [], 'a listed origin is fine in production')
  t.match(prod('*'), [/^BFF_CORS_ORIGINS contains \*/])
  t.match(prod('https://app.example.com, *'), [/^BFF_CORS_ORIGINS contains \*/], '* anywhere in the list')
  t.same(productionProblems(loadConfig({ NODE_ENV: 'development', BFF_CORS_ORIGINS: '*' })), [], '* is allowed outside production')
})

// Numeric variables have a maximum wherever a huge value breaks something the gateway depends
// on: start-up refuses it naming the variable and its range, instead of the gateway failing
// later (silently, per call) in Redis, V8 or a Date.

// Each bounded variable, its largest accepted value, and why there is a bound.
const MAXIMA: Array<[name: string, max: number, why: string]> = [
  ['BFF_IDEMPOTENCY_TTL_SECONDS', 2_592_000, '30 days; * 1000 is the PX of every stored outcome, which Redis refuses past its largest expiry'],
  ['BFF_RATE_LIMIT_GLOBAL_WINDOW_MS', 86_400_000, 'a day; Redis keys expire after twice the window'],
  ['BFF_BODY_LIMIT', 268_435_456, '256 MiB; a JSON body is read into one string, and V8 strings stop at 2^29 - 24 characters'],
  ['BFF_IDEMPOTENCY_MAX_KEYS', 10_000_000, 'the LRU allocates its arrays for max keys at start-up'],
  ['BFF_AUDIT_RETENTION_DAYS', 36_500, '100 years; far more days put retention\'s cutoff before what a Date or PostgreSQL\'s timestamptz holds'],
  ['BFF_AUDIT_QUEUE_MAX', 1_000_000, 'the queue lives in the heap'],
  ['BFF_AUDIT_MEMORY_MAX', 10_000_000, 'the memory store indexes entries in Sets, capped by V8 at 2^24'],
  ['BFF_EVENTS_MAX_SUBSCRIPTIONS_PER_TENANT', 100_000, 'the instance\'s own bound on event subscriptions, which a larger share never reaches'],
  ['BFF_WS_MAX_CONNECTIONS_PER_TENANT', 100_000, 'each face\'s own bound on WebSocket connections, which a larger share never reaches']
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

t.test('numbers without a natural bound still have one: Infinity and 1e400 are refused', async t => {
  // env-schema's Ajv took them as integers, and @fastify/rate-limit made an infinite max its default 1000.
  for (const name of ['BFF_RATE_LIMIT_GLOBAL_MAX', 'BFF_MAX_EVENT_LOOP_DELAY_MS', 'BFF_MAX_HEAP_BYTES', 'BFF_MAX_RSS_BYTES']) {
    for (const value of ['Infinity', '1e400']) t.throws(() => loadConfig({ [name]: value }), ConfigError, `${name}=${value}`)
  }
})

t.test('an unknown BFF_ variable is named, with the known name nearest it', async t => {
  t.same(unknownVariables({ BFF_RATE_LIMIT_GLOBALMAX: '1', BFF_JWT_ISSUR: 'x', BFF_SOMETHING_ELSE_ENTIRELY: '1', BFF_AUTH_ENABLED: 'true', PATH: '/bin' }), [
    'BFF_JWT_ISSUR (did you mean BFF_JWT_ISSUER?)',
    'BFF_RATE_LIMIT_GLOBALMAX (did you mean BFF_RATE_LIMIT_GLOBAL_MAX?)',
    'BFF_SOMETHING_ELSE_ENTIRELY'
  ])
})

t.test('a number is written in decimal digits: 0x10, 1e3, " 80", "80.0", "+80" are refused, naming the variable', async t => {
  // Ajv's coercion read PORT=0x10 as 16, 1e3 as 1000, " 80", "+80" and "80.0" as 80.
  for (const text of ['0x10', '1e3', ' 80', '80 ', '80.0', '+80', '0b11', '-0']) {
    t.equal(errorOf({ PORT: text })?.message, `Invalid configuration: PORT=${JSON.stringify(text)} is invalid: expected an integer (0..65535) (written in decimal digits only)`, `PORT=${JSON.stringify(text)}`)
  }
  // Every numeric variable shares the parsing.
  t.equal(errorOf({ BFF_BODY_LIMIT: '0x400' })?.message, 'Invalid configuration: BFF_BODY_LIMIT="0x400" is invalid: expected an integer (1..268435456) (written in decimal digits only)')
  t.match(errorOf({ BFF_TRACE_SAMPLE_RATIO: '0x1' })?.message, /^Invalid configuration: BFF_TRACE_SAMPLE_RATIO="0x1" is invalid: expected .* \(written as a decimal number\)$/)
  t.equal(loadConfig({ PORT: '080' }).PORT, 80, 'decimal digits, a leading zero too')
  t.equal(loadConfig({ BFF_TRACE_SAMPLE_RATIO: '0.25' }).BFF_TRACE_SAMPLE_RATIO, 0.25)
  t.equal(loadConfig({ BFF_TRACE_SAMPLE_RATIO: '1' }).BFF_TRACE_SAMPLE_RATIO, 1)
  // A ratio is often written with an exponent (OpenTelemetry's examples): refused, an upgrade
  // stopped a deployment that ran with 1e-2.
  for (const [text, ratio] of [['1e-2', 0.01], ['5E-1', 0.5], ['1.', 1], ['.5', 0.5]] as const) {
    t.equal(loadConfig({ BFF_TRACE_SAMPLE_RATIO: text }).BFF_TRACE_SAMPLE_RATIO, ratio, `BFF_TRACE_SAMPLE_RATIO=${text}`)
  }
})

t.test('a blank HOST, or one with spaces, is refused at start-up, not at listen', async t => {
  for (const host of [' ', '\t', ' 127.0.0.1', 'local host']) {
    t.equal(errorOf({ HOST: host })?.message, `Invalid configuration: HOST=${JSON.stringify(host)} is invalid: expected address the gateway listens on, a host name or IP address (no spaces)`, `HOST=${JSON.stringify(host)}`)
  }
  t.equal(loadConfig({ HOST: '::' }).HOST, '::')
})

t.test('a path with spaces around it, or a line break in it, is refused, named', async t => {
  // " " was a file or directory so named in the working directory, and a templated value's trailing
  // newline part of the name (the spool kept beside the volume provisioned for it).
  for (const [name, value] of [['BFF_MANIFEST', ' '], ['BFF_MANIFEST', '/etc/mantle/manifest.yaml\n'], ['BFF_AUDIT_SPOOL_DIR', ' /var/lib/mantle/audit-spool'], ['BFF_AUDIT_SPOOL_DIR', '/var/lib/mantle\n/audit-spool']]) {
    const message = errorOf({ [name]: value })?.message ?? ''
    t.ok(message.startsWith(`Invalid configuration: ${name}=${JSON.stringify(value)} is invalid: expected `) && message.endsWith(', without spaces around it'), message)
  }
  const c = loadConfig({ BFF_MANIFEST: '/srv/my manifests/m.yaml', BFF_AUDIT_SPOOL_DIR: 'spool dir' })
  t.same([c.BFF_MANIFEST, c.BFF_AUDIT_SPOOL_DIR], ['/srv/my manifests/m.yaml', 'spool dir'], 'spaces inside are a path\'s own')
})

t.test('a HOST that is neither an IP address nor a host name is refused at start-up, named, not at listen', async t => {
  const expected = 'expected an IP address (0.0.0.0, ::, 127.0.0.1, ...) or a host name (localhost, ...), without a scheme or port'
  for (const [host, why] of [['0.0.0.0:3000', ' (the port goes in PORT)'], ['localhost:3000', ' (the port goes in PORT)'], ['http://0.0.0.0', ' (a URL, not an address)'], ['[::1]', ' (an IPv6 address is written without brackets)'], ['foo_bar!', ''], ['-gateway', ''], ['a..b', ''], ['a'.repeat(64), '']]) {
    t.equal(errorOf({ HOST: host })?.message, `Invalid configuration: HOST=${JSON.stringify(host)} is invalid: ${expected}${why}`, `HOST=${host}`)
  }
  for (const host of ['0.0.0.0', '::', '127.0.0.1', '::1', 'fe80::1%eth0', 'localhost', 'gateway-1.internal.example', 'gateway.internal.']) {
    t.equal(loadConfig({ HOST: host }).HOST, host, `HOST=${host}`)
  }
})

t.test('one error names the problems of every check at once, not one check at a time', async t => {
  // The schema's refusals stopped start-up before the checks it cannot express ran: fixing
  // PORT showed REDIS_URL, fixing that showed BFF_CORS_ORIGINS, and so on.
  const err = errorOf({ PORT: 'abc', HOST: ' ', BFF_BODY_LIMIT: '1e3', REDIS_URL: 'redis://h:99999', BFF_CORS_ORIGINS: 'ftp://x', BFF_TRUST_PROXY: '0.0.0.0/0', BFF_AUDIT_STORE: 'postgres', BFF_JWT_PUBLIC_KEYS: 'not json' })
  t.match(err?.message, /^Invalid configuration: /)
  for (const name of ['PORT="abc"', 'HOST=" "', 'BFF_BODY_LIMIT="1e3"', 'REDIS_URL="redis://h:99999"', 'BFF_CORS_ORIGINS="ftp://x"', 'BFF_TRUST_PROXY="0.0.0.0/0"', 'BFF_AUDIT_STORE=postgres needs DATABASE_URL', 'BFF_JWT_PUBLIC_KEYS']) {
    t.ok(err?.message.includes(name), `names ${name}`)
  }
  // A store that needs a REDIS_URL refused just above is not named again as needing one.
  t.notMatch(errorOf({ REDIS_URL: 'redis://h:99999', BFF_CACHE_STORE: 'redis' })?.message, /needs REDIS_URL/)
  t.match(errorOf({ PORT: 'abc', BFF_CACHE_STORE: 'redis' })?.message, /^Invalid configuration: PORT="abc" is invalid: .*; BFF_CACHE_STORE="redis" needs REDIS_URL/)
})

t.test('start-up warnings: unknown BFF_ variables, and a DATABASE_URL the audit does not use', async t => {
  const warned = /^DATABASE_URL is set but BFF_AUDIT_STORE is memory: .*set BFF_AUDIT_STORE=postgres/
  const db = { DATABASE_URL: 'postgres://u@h:5432/d' }
  t.match(startWarnings(loadConfig(db), {}), [warned], 'DATABASE_URL alone: the audit stays in memory')
  t.same(startWarnings(loadConfig({ ...db, BFF_AUDIT_STORE: 'postgres' }), {}), [], 'used by the audit')
  t.same(startWarnings(loadConfig({ ...db, BFF_AUDIT_ENABLED: 'false' }), {}), [], 'no audit, nothing to keep')
  t.same(startWarnings(loadConfig({}), {}), [], 'no DATABASE_URL')
  t.same(startWarnings(loadConfig({}), { BFF_RATE_LIMIT_GLOBALMAX: '1' }), ['BFF_RATE_LIMIT_GLOBALMAX (did you mean BFF_RATE_LIMIT_GLOBAL_MAX?) is not a setting of the gateway: it is ignored'])
})

t.test('start-up warnings: identity off in production is allowed, and said', async t => {
  // It started with no word, every call anonymous (an anonymous POST created an agent).
  const env = { NODE_ENV: 'production', BFF_AUTH_ENABLED: 'false', BFF_AUDIT_STORE: 'postgres', DATABASE_URL: 'postgres://u@h:5432/d', KERNEL_URL: 'http://k:1' }
  const config = loadConfig(env, { starting: true })
  t.match(startWarnings(config, env), [/^BFF_AUTH_ENABLED=false in production: .*every call is anonymous/], 'warned')
  t.same(startWarnings(loadConfig({ BFF_AUTH_ENABLED: 'false' }), { BFF_AUTH_ENABLED: 'false' }), [], 'not outside production')
  t.same(startWarnings(loadConfig({ ...env, BFF_AUTH_ENABLED: 'true', BFF_JWT_SECRET: 'x'.repeat(40) }), {}), [], 'not with identity on')
})

t.test('start-up warnings: a security setting set empty counts as unset, and is said', async t => {
  // BFF_JWT_AUDIENCE= (a template rendered empty) switched the aud check off with no word.
  const env = { BFF_JWT_AUDIENCE: '', BFF_JWT_ISSUER: '', BFF_METRICS_TOKEN: '', BFF_RATE_LIMIT_GLOBAL_MAX: '' }
  const config = loadConfig(env)
  t.equal(config.BFF_JWT_AUDIENCE, undefined, 'empty is unset')
  t.match(startWarnings(config, env), [
    /^BFF_JWT_ISSUER is set but empty, which counts as unset: the iss claim of tokens is not checked$/,
    /^BFF_JWT_AUDIENCE is set but empty, .*aud claim/,
    /^BFF_METRICS_TOKEN is set but empty, .*\/metrics is open/,
    /^BFF_RATE_LIMIT_GLOBAL_MAX is set but empty, .*no HTTP guard/
  ])
  t.same(startWarnings(loadConfig({ BFF_CORS_ORIGINS: '' }), { BFF_CORS_ORIGINS: '' }), [], 'an empty setting that opens nothing')
})

t.test('start-up warnings: a setting of a feature that is off is named with its switch, never refused', async t => {
  const cases: Array<[Record<string, string>, string]> = [
    [{ BFF_RATE_LIMIT_ENABLED: 'false', BFF_RATE_LIMIT_GLOBAL_MAX: '10' }, 'BFF_RATE_LIMIT_GLOBAL_MAX is set but BFF_RATE_LIMIT_ENABLED=false: it is not used'],
    [{ BFF_METRICS_ENABLED: 'false', BFF_METRICS_TOKEN: 'x'.repeat(20) }, 'BFF_METRICS_TOKEN is set but BFF_METRICS_ENABLED=false: it is not used'],
    [{ BFF_CIRCUIT_BREAKER_ENABLED: 'false', BFF_CIRCUIT_BREAKER_THRESHOLD: '3' }, 'BFF_CIRCUIT_BREAKER_THRESHOLD is set but BFF_CIRCUIT_BREAKER_ENABLED=false: it is not used'],
    [{ BFF_AUDIT_ENABLED: 'false', BFF_AUDIT_STORE: 'postgres' }, 'BFF_AUDIT_STORE is set but BFF_AUDIT_ENABLED=false: it is not used'],
    // Refused "needs REDIS_URL", for a Redis the cache off never uses.
    [{ BFF_CACHE_ENABLED: 'false', BFF_CACHE_STORE: 'redis' }, 'BFF_CACHE_STORE is set but BFF_CACHE_ENABLED=false: it is not used'],
    [{ BFF_IDEMPOTENCY_ENABLED: 'false', BFF_IDEMPOTENCY_STORE: 'redis' }, 'BFF_IDEMPOTENCY_STORE is set but BFF_IDEMPOTENCY_ENABLED=false: it is not used'],
    [{ BFF_RATE_LIMIT_ENABLED: 'false', BFF_RATE_LIMIT_STORE: 'redis' }, 'BFF_RATE_LIMIT_STORE is set but BFF_RATE_LIMIT_ENABLED=false: it is not used']
  ]
  for (const [env, warning] of cases) {
    t.same(startWarnings(loadConfig(env), env), [warning], JSON.stringify(env))
  }
  // A default restated (as .env.example writes them) is no warning.
  const restated = { BFF_AUDIT_ENABLED: 'false', BFF_AUDIT_STORE: 'memory', BFF_AUDIT_BATCH_SIZE: '500', BFF_AUDIT_QUEUE_MAX: '7' }
  t.same(startWarnings(loadConfig(restated), restated), ['BFF_AUDIT_QUEUE_MAX is set but BFF_AUDIT_ENABLED=false: it is not used'], 'defaults restated')
  // On, the same settings are used, and a redis store still needs its Redis.
  t.same(startWarnings(loadConfig({ BFF_RATE_LIMIT_GLOBAL_MAX: '10' }), { BFF_RATE_LIMIT_GLOBAL_MAX: '10' }), [])
  t.match(errorOf({ BFF_CACHE_STORE: 'redis' })?.message, /BFF_CACHE_STORE="redis" needs REDIS_URL/)
  // Every setting the table names is a setting, of one feature only, and its switch a flag.
  const named = FEATURE_SETTINGS.flatMap(f => f.settings)
  t.equal(new Set(named).size, named.length, 'each setting belongs to one feature')
  for (const { flag, settings } of FEATURE_SETTINGS) {
    t.equal((ConfigSchema.properties as Record<string, { type?: string }>)[flag]?.type, 'boolean', flag)
    for (const name of settings) t.ok(name in ConfigSchema.properties, name)
  }
})

t.test('starting in production: a bad value and what production refuses are named in one line', async t => {
  // PORT=abc BFF_JWT_SECRET=short named PORT only; the short secret was named on the next run.
  const starting = (env: Record<string, string>): string | undefined => {
    try {
      loadConfig({ NODE_ENV: 'production', ...env }, { starting: true })
    } catch (err) {
      if (err instanceof ConfigError) return err.message
      throw err
    }
    return undefined
  }
  t.equal(starting({ PORT: 'abc', BFF_JWT_SECRET: 'short', BFF_AUDIT_ENABLED: 'false', BFF_DEMO_KERNEL: 'false' }),
    'Invalid configuration: PORT="abc" is invalid: expected an integer (0..65535); Refusing to start in production: BFF_JWT_SECRET is shorter than 32 bytes')
  t.match(starting({ PORT: 'abc', BFF_JWT_SECRET: 'a'.repeat(32), BFF_CORS_ORIGINS: '*' }),
    /^Invalid configuration: PORT="abc" .*; Refusing to start in production: BFF_CORS_ORIGINS contains \*.*; BFF_AUDIT_STORE is memory .*; BFF_MANIFEST is the demo manifest and KERNEL_URL is unset/, 'the demo Kernel\'s refusal too')
  // A check reading a refused value (read as its default) is not made: it would name a wrong reason.
  t.equal(starting({ PORT: 'abc', BFF_JWKS_URL: 'ftp://x', KERNEL_URL: 'ftp://k', BFF_AUDIT_STORE: 'file' })?.match(/Refusing/g), null, 'no key source, demo Kernel or audit finding made on refused values')
  t.equal(starting({ NODE_ENV: 'prod', PORT: 'abc' })?.includes('Refusing'), false, 'nor with NODE_ENV refused')
  // Alone, production's refusals keep their place and words (start(), buildApp).
  t.equal(starting({ BFF_JWT_SECRET: 'short' }), undefined)
  t.equal(errorOf({ NODE_ENV: 'production', PORT: 'abc', BFF_JWT_SECRET: 'short' })?.message, 'Invalid configuration: PORT="abc" is invalid: expected an integer (0..65535)', 'not starting (npm run token): the values only')
  t.match(errorOf({ NODE_ENV: 'development', PORT: 'abc', BFF_JWT_SECRET: 'short' })?.message, /^Invalid configuration: PORT="abc" is invalid: [^;]*$/)
})

t.test('the environment is read once, as given: an empty value is unset, and every problem is named at once', async t => {
  const saved = { ...process.env }
  t.teardown(() => {
    for (const key of Object.keys(process.env)) if (!(key in saved)) Reflect.deleteProperty(process.env, key)
    Object.assign(process.env, saved)
  })
  // env-schema added the whole of process.env to the values given: an empty value came back
  // (REDIS_URL= stopped start-up), and the values refused were read again on the second pass.
  Object.assign(process.env, { REDIS_URL: '', PORT: '', BFF_RATE_LIMIT_GLOBAL_MAX: '' })
  const config = loadConfig()
  t.same([config.REDIS_URL, config.PORT, config.BFF_RATE_LIMIT_GLOBAL_MAX], [undefined, 3000, undefined], 'empty is unset')
  Object.assign(process.env, { HOST: ' ', BFF_BODY_LIMIT: '1e3', PORT: '0x10', BFF_TRACE_SAMPLE_RATIO: '2' })
  const names = [...(errorOf(process.env)?.message ?? '').matchAll(/([A-Z_]+)="/g)].map(m => m[1]).sort()
  t.same(names, ['BFF_BODY_LIMIT', 'BFF_TRACE_SAMPLE_RATIO', 'HOST', 'PORT'], 'all four in one message')
  t.equal(loadConfig({}).HOST, '127.0.0.1', 'values given, not the process environment')
})

// README says .env.example lists every variable: f565e83 wrote BFF_AUTH_ENABLED over the line of
// BFF_WEBSOCKET_ENABLED, which it then lacked, and listed BFF_AUTH_ENABLED twice.
t.test('.env.example lists every variable once', async t => {
  const lines = readFileSync(fileURLToPath(new URL('../../.env.example', import.meta.url)), 'utf8').split('\n')
  for (const name of Object.keys(ConfigSchema.properties)) {
    t.equal(lines.filter(line => line.startsWith(`${name}=`) || line.startsWith(`# ${name}=`)).length, 1, name)
  }
})

// A store's default is redis with REDIS_URL, else memory (README's table): restated with its
// feature off, it was named as a setting changed ("BFF_CACHE_STORE is set but BFF_CACHE_ENABLED=false").
t.test('a store restated at its default with its feature off is no warning', async t => {
  const stores = [['BFF_CACHE_ENABLED', 'BFF_CACHE_STORE'], ['BFF_IDEMPOTENCY_ENABLED', 'BFF_IDEMPOTENCY_STORE'], ['BFF_RATE_LIMIT_ENABLED', 'BFF_RATE_LIMIT_STORE']] as const
  for (const [flag, store] of stores) {
    const memory = { [flag]: 'false', [store]: 'memory' }
    t.same(startWarnings(loadConfig(memory), memory), [], `${store}=memory without REDIS_URL`)
    const redis = { [flag]: 'false', [store]: 'redis', REDIS_URL: 'redis://127.0.0.1:6379' }
    t.same(startWarnings(loadConfig(redis), redis), [], `${store}=redis with REDIS_URL`)
    // Other than its default, it is still named.
    const other = { [flag]: 'false', [store]: 'memory', REDIS_URL: 'redis://127.0.0.1:6379' }
    t.same(startWarnings(loadConfig(other), other), [`${store} is set but ${flag}=false: it is not used`], `${store}=memory with REDIS_URL`)
  }
})

// Tracing's switch is an OTLP endpoint: without one, BFF_TRACE_SAMPLE_RATIO samples nothing
// (the Kernel gets every new trace marked sampled), and it was accepted with no word.
t.test('BFF_TRACE_SAMPLE_RATIO without an OTLP endpoint is named in a warning', async t => {
  const alone = { BFF_TRACE_SAMPLE_RATIO: '0.1' }
  t.same(startWarnings(loadConfig(alone), alone), ['BFF_TRACE_SAMPLE_RATIO is set but neither OTEL_EXPORTER_OTLP_TRACES_ENDPOINT nor OTEL_EXPORTER_OTLP_ENDPOINT is: tracing is off, it is not used'], 'no endpoint')
  for (const endpoint of ['OTEL_EXPORTER_OTLP_TRACES_ENDPOINT', 'OTEL_EXPORTER_OTLP_ENDPOINT']) {
    const used = { BFF_TRACE_SAMPLE_RATIO: '0.1', [endpoint]: 'http://127.0.0.1:4318' }
    t.same(startWarnings(loadConfig(used), used), [], endpoint)
  }
  const restated = { BFF_TRACE_SAMPLE_RATIO: '1' }
  t.same(startWarnings(loadConfig(restated), restated), [], 'its default restated, as .env.example writes it')
})

// A browser's Origin of an IDN is in punycode, and has no path or trailing slash: such entries
// were refused as "bad" with no word of what to write, unlike https://App.Example.com.
// A page opened from disk (file://) or a sandboxed frame sends Origin: null; BFF_CORS_ORIGINS=null,
// the usual try for it, was refused as bad with no word of why.
t.test('BFF_CORS_ORIGINS=null is refused saying why', async t => {
  for (const value of ['null', 'http://localhost:3000,null']) {
    t.equal(errorOf({ BFF_CORS_ORIGINS: value })?.message,
      `Invalid configuration: BFF_CORS_ORIGINS="${value}" is invalid: expected a comma-separated list of * or http(s) origins without a path, as browsers send them (bad: "null") ("null", the Origin of file:// pages and sandboxed frames, which any site can open, is never allowed: serve the page from an http(s) origin and name that)`, value)
  }
})

t.test('BFF_CORS_ORIGINS names the origin to write for an IDN, a trailing slash or a path', async t => {
  for (const [bad, origin] of [['https://bücher.example', 'https://xn--bcher-kva.example'], ['https://app.example.com/', 'https://app.example.com'], ['https://App.Example.com/path', 'https://app.example.com'], ['HTTPS://app.example.com', 'https://app.example.com']]) {
    t.equal(errorOf({ BFF_CORS_ORIGINS: bad })?.message,
      `Invalid configuration: BFF_CORS_ORIGINS="${bad}" is invalid: expected a comma-separated list of * or http(s) origins without a path, as browsers send them ("${bad}" matches no browser's Origin: write "${origin}")`, `refuses ${bad}, naming ${origin}`)
  }
  t.equal(errorOf({ BFF_CORS_ORIGINS: 'https://xn--bcher-kva.example' }), null, 'the punycode origin is accepted')
  t.equal(errorOf({ BFF_CORS_ORIGINS: 'ftp://a.example, https://b.example/' })?.message,
    'Invalid configuration: BFF_CORS_ORIGINS="ftp://a.example, https://b.example/" is invalid: expected a comma-separated list of * or http(s) origins without a path, as browsers send them (bad: "ftp://a.example") ("https://b.example/" matches no browser\'s Origin: write "https://b.example")', 'a bad entry and one with a hint')
})

// A host name's last label is never all digits (RFC 3696 §2): HOST=3000 (the port in HOST) passed
// as a name and failed at listen with a bare "listen EADDRNOTAVAIL ... 0.0.11.184:3000", and
// HOST=127.0.1 listened on 127.0.0.1, read by inet_aton's shorthand.
t.test('a HOST of numbers that is not an IP address is refused at start-up, named', async t => {
  const expected = 'expected an IP address (0.0.0.0, ::, 127.0.0.1, ...) or a host name (localhost, ...), without a scheme or port'
  for (const [host, why] of [['3000', ' (the port goes in PORT)'], ['127.0.1', ' (an IPv4 address is four numbers 0..255)'], ['10.0.0.256', ' (an IPv4 address is four numbers 0..255)'], ['gateway.123.', ''], ['0', ' (every IPv4 address is 0.0.0.0, every address ::)']]) {
    t.equal(errorOf({ HOST: host })?.message, `Invalid configuration: HOST=${JSON.stringify(host)} is invalid: ${expected}${why}`, `HOST=${host}`)
  }
  for (const host of ['0.0.0.0', '10.0.0.255', 'gateway1', '1gateway', 'node-1.cluster.local', '123.example']) {
    t.equal(loadConfig({ HOST: host }).HOST, host, `HOST=${host}`)
  }
})

// getaddrinfo reads a HOST as an IPv4 address only when every label is a number (inet_aton:
// decimal, octal, 0x hex); any other name it looks up, search domains and all. RFC 1123 §2.1
// keeps digits out of a top-level label only: node-1.10, written without the final dot, is no
// top-level name (in Kubernetes, the service node-1 of the namespace 10), and it was refused.
// An underscore is in no host name of RFC 952/1123, but DNS names may hold it (RFC 2181 §11) and
// resolvers look it up (glibc's res_hnok takes [0-9A-Za-z_-]): docker compose's service my_service.
t.test('a HOST that getaddrinfo looks up as a name is accepted, digits in its last label or underscores in it', async t => {
  for (const host of ['node-1.10', 'gateway.123', 'web-0.nginx.10', 'my_service', 'my_service.my_net', '_gateway', 'a'.repeat(63)]) {
    t.equal(errorOf({ HOST: host }), null, `HOST=${host} is accepted`)
  }
  const expected = 'expected an IP address (0.0.0.0, ::, 127.0.0.1, ...) or a host name (localhost, ...), without a scheme or port'
  for (const [host, why] of [['0x7f.1', ' (an IPv4 address is four numbers 0..255)'], ['0x7f000001', ' (an IPv4 address is four numbers 0..255)'], ['017.0.0.1', ' (an IPv4 address is four numbers 0..255)'], ['1.2.3.4.5', ' (an IPv4 address is four numbers 0..255)'], ['node.10.', ''], ['my_service!', ''], ['my-service-', ''], ['a.-b', '']]) {
    t.equal(errorOf({ HOST: host })?.message, `Invalid configuration: HOST=${JSON.stringify(host)} is invalid: ${expected}${why}`, `HOST=${host}`)
  }
})

// BFF_JWT_ISSUER=" " (or a value a secret's trailing newline followed) was accepted: fast-jwt
// compares a token's iss and aud with the setting exactly, so every token an identity provider
// signed was refused 401, and only one minted with the blank (npm run token) was accepted.
t.test('a blank BFF_JWT_ISSUER or BFF_JWT_AUDIENCE, or one with spaces around it, is refused at start-up, named', async t => {
  for (const [name, claim] of [['BFF_JWT_ISSUER', 'iss'], ['BFF_JWT_AUDIENCE', 'aud']]) {
    for (const value of [' ', '\t', '  \n']) {
      t.equal(errorOf({ [name]: value })?.message, `Invalid configuration: ${name}=${JSON.stringify(value)} is invalid: expected the \`${claim}\` tokens must carry, without spaces around it (blank: no token carries it, so every token would be refused; leave ${name} unset for no ${claim} check)`, `${name}=${JSON.stringify(value)}`)
    }
    for (const value of ['https://issuer.example\n', ' mantle']) {
      t.equal(errorOf({ [name]: value })?.message, `Invalid configuration: ${name}=${JSON.stringify(value)} is invalid: expected the \`${claim}\` tokens must carry, without spaces around it (tokens carry it without them, so every token would be refused)`, `${name}=${JSON.stringify(value)}`)
    }
    for (const value of ['https://issuer.example', 'mantle api']) {
      t.equal(loadConfig({ [name]: value })[name as 'BFF_JWT_ISSUER'], value, `${name}=${JSON.stringify(value)} is accepted`)
    }
  }
  // Found by review: an invisible character (a zero-width space copied along, an inner newline)
  // and a list in BFF_JWT_AUDIENCE passed, and every token was refused 401.
  for (const [name, claim] of [['BFF_JWT_ISSUER', 'iss'], ['BFF_JWT_AUDIENCE', 'aud']]) {
    for (const [value, point] of [['mantle\u200b', '200B'], ['https://a\nb', '000A'], ['\u200bapi', '200B'], ['a\u00adb', '00AD']]) {
      t.match(errorOf({ [name]: value })?.message, `${name}=${JSON.stringify(value)} is invalid: expected the \`${claim}\` tokens must carry (it holds an invisible character, U+${point}: `, `${name}=${JSON.stringify(value)}`)
    }
  }
  for (const value of ['api-a,api-b', 'api-a, api-b']) {
    t.match(errorOf({ BFF_JWT_AUDIENCE: value })?.message, `BFF_JWT_AUDIENCE=${JSON.stringify(value)} is invalid: expected the one \`aud\` tokens must carry (a list is not supported: `, `BFF_JWT_AUDIENCE=${JSON.stringify(value)}`)
  }
  t.equal(loadConfig({ BFF_JWT_ISSUER: 'https://a.example/x,y' }).BFF_JWT_ISSUER, 'https://a.example/x,y', 'a comma in the issuer is its own')
  const both = errorOf({ BFF_JWT_ISSUER: ' ', BFF_JWT_AUDIENCE: 'mantle ', PORT: 'abc' })?.message ?? ''
  for (const name of ['BFF_JWT_ISSUER=" "', 'BFF_JWT_AUDIENCE="mantle "', 'PORT="abc"']) t.match(both, name, `${name} named with the others`)
})

// HS256 is an HMAC of the secret's text: a public key given as BFF_JWT_SECRET (an IdP's PEM, the
// bare base64 of its key as Keycloak's realm settings show it, its JWK) made a secret that anyone
// holding the public key had, and so could sign HS256 tokens of any tenant and role, which the
// gateway took. Such a value stops start-up, in every environment.
// A self-signed EC P-256 certificate (CN=idp.example), as an identity provider publishes its key.
const CERTIFICATE = [
  '-----BEGIN CERTIFICATE-----',
  'MIIBgTCCASegAwIBAgIUOO8JPVGj5laLXvjKrB2SB3gQUzwwCgYIKoZIzj0EAwIw',
  'FjEUMBIGA1UEAwwLaWRwLmV4YW1wbGUwHhcNMjYxMjA3MTkyMzAxWhcNMjYxMjA4',
  'MTkyMzAxWjAWMRQwEgYDVQQDDAtpZHAuZXhhbXBsZTBZMBMGByqGSM49AgEGCCqG',
  'SM49AwEHA0IABECg4Vg3klUMhvMJzrgRyD9BMxkVVdamsk2JNujetUSyXLTquyEv',
  'oYJIkxALTDwdgHmKYEHnt/5fsaz1xIJJiOmjUzBRMB0GA1UdDgQWBBQxLDyu9nFJ',
  'Xn47yA2xL5dd+RMq5DAfBgNVHSMEGDAWgBQxLDyu9nFJXn47yA2xL5dd+RMq5DAP',
  'BgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIFzOqc72Tjvr0+PpPvZR',
  'f3g7EXpvDLny/w+bvYwzcd2OAiEAo/Nqrfrau1/ZosJ8G1d6XLDx5swftdxZ+7Ww',
  'EOd9GN0=',
  '-----END CERTIFICATE-----'
].join('\n')
t.test('BFF_JWT_SECRET holding a public key (PEM, bare base64, JWK) is refused in every environment', async t => {
  const { generateKeyPairSync } = await import('node:crypto')
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 })
  const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' })
  const pem = rsa.publicKey.export({ type: 'spki', format: 'pem' }).toString()
  const keys: Array<[string, string]> = [
    ['an RSA public key (PEM)', pem],
    ['an EC public key (PEM)', ec.publicKey.export({ type: 'spki', format: 'pem' }).toString()],
    ['an RSA public key (PKCS#1 PEM)', rsa.publicKey.export({ type: 'pkcs1', format: 'pem' }).toString()],
    ['the PEM\'s bare base64 body', pem.replace(/-----[^-]+-----/g, '').replace(/\s/g, '')],
    ['the bare base64 body on several lines', pem.replace(/-----[^-]+-----/g, '').trim()],
    ['an RSA JWK', JSON.stringify({ ...rsa.publicKey.export({ format: 'jwk' }), kid: 'k1', use: 'sig' })],
    ['a JWKS', JSON.stringify({ keys: [ec.publicKey.export({ format: 'jwk' })] })],
    ['a private key (PEM)', rsa.privateKey.export({ type: 'pkcs8', format: 'pem' }).toString()],
    ['a certificate (PEM)', CERTIFICATE],
    ['a certificate\'s bare base64 (Keycloak\'s "Certificate")', CERTIFICATE.replace(/-----[^-]+-----/g, '').replace(/\s/g, '')]
  ]
  for (const env of ['development', 'production']) {
    for (const [what, value] of keys) {
      const err = errorOf({ NODE_ENV: env, BFF_AUDIT_ENABLED: 'false', BFF_JWT_SECRET: value })
      t.match(err?.message, /BFF_JWT_SECRET="\*\*\*" is invalid: .*public key.*BFF_JWT_PUBLIC_KEYS/, `${env}: ${what} refused`)
      t.notOk(err?.message.includes(value.slice(30, 60)), `${env}: ${what}: the value is not shown`)
    }
  }
  // Secrets that merely look alike are taken: random base64, JSON that is no key, a symmetric JWK's text.
  for (const value of [randomUUID() + randomUUID(), Buffer.alloc(48, 7).toString('base64'), 'MIIB' + 'A'.repeat(60), '{"not":"a key","x":"0123456789abcdef0123"}', JSON.stringify({ kty: 'oct', k: 'c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA' })]) {
    t.equal(loadConfig({ NODE_ENV: 'production', BFF_AUDIT_ENABLED: 'false', BFF_JWT_SECRET: value }).BFF_JWT_SECRET, value, `taken: ${value.slice(0, 24)}`)
  }
})

// An identity provider's keys sign tokens for every application it serves: without an audience
// to check, a production gateway on its JWKS (or its keys in BFF_JWT_PUBLIC_KEYS) took a token
// issued to any other of them, with the roles that application gives (with a multi-tenant
// provider's common keys, an application anyone may register), and started with no word of it.
t.test('start-up warnings: an identity provider\'s keys without BFF_JWT_AUDIENCE in production', async t => {
  const { generateKeyPairSync } = await import('node:crypto')
  const pem = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ type: 'spki', format: 'pem' }).toString()
  const base = { NODE_ENV: 'production', BFF_AUDIT_STORE: 'postgres', DATABASE_URL: 'postgres://u@h:5432/d', KERNEL_URL: 'http://k:1' }
  const warned = /^BFF_JWT_AUDIENCE is not set: .*any application/
  for (const [what, keys] of [['BFF_JWKS_URL', { BFF_JWKS_URL: 'https://idp.example/.well-known/jwks.json' }], ['BFF_JWT_PUBLIC_KEYS', { BFF_JWT_PUBLIC_KEYS: JSON.stringify({ k1: pem }) }]] as const) {
    const env = { ...base, ...keys }
    t.match(startWarnings(loadConfig(env, { starting: true }), env), [warned], `${what}: warned`)
    const aud = { ...env, BFF_JWT_AUDIENCE: 'mantle-api' }
    t.same(startWarnings(loadConfig(aud, { starting: true }), aud), [], `${what} with an audience: no word`)
    t.same(startWarnings(loadConfig({ ...env, NODE_ENV: 'development' }), {}), [], `${what}: not outside production`)
    const off = { ...env, BFF_AUTH_ENABLED: 'false' }
    t.notMatch(startWarnings(loadConfig(off, { starting: true }), off).join('\n'), warned, `${what}: not with identity off`)
  }
  // The gateway's own secret signs for nobody else.
  const hs = { ...base, BFF_JWT_SECRET: 'x'.repeat(40) }
  t.same(startWarnings(loadConfig(hs, { starting: true }), hs), [], 'BFF_JWT_SECRET alone: no word')
})
