// URL-valued variables are checked in full by loadConfig, not only by their scheme: a URL the
// gateway cannot use stops start-up with one line naming the variable and why (CONTRACT §7),
// never a crash with a stack trace or a bare "Invalid URL" from a client later on.
import t from 'tap'
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { testConfig, buildTestApp, startTestKernel, testManifest, bearer, json } from '../helper.js'
import { refusal } from './refusal.js'

const root = fileURLToPath(new URL('../..', import.meta.url))

/** Runs server.ts as `npm start` does, until it exits (a bad configuration exits at once). */
async function startServer (env: Record<string, string>): Promise<{ code: number | null, output: string }> {
  // Through env(1) without NODE_OPTIONS and NODE_V8_COVERAGE: tap instruments the processes a
  // test spawns, and this one's sources, compiled by tsx, would be mapped onto the wrong lines
  // of tap's coverage of the same files.
  const child = spawn('/usr/bin/env', ['-u', 'NODE_OPTIONS', '-u', 'NODE_V8_COVERAGE', process.execPath, '--import', 'tsx', 'server.ts'], {
    cwd: root,
    env: { PATH: process.env.PATH, PORT: '0', LOG_LEVEL: 'warn', BFF_AUDIT_ENABLED: 'false', BFF_MAX_EVENT_LOOP_DELAY_MS: '0', ...env },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  let output = ''
  child.stdout.on('data', (d: Buffer) => { output += d.toString() })
  child.stderr.on('data', (d: Buffer) => { output += d.toString() })
  const timer = setTimeout(() => child.kill('SIGKILL'), 60_000)
  const code = await new Promise<number | null>(resolve => child.on('exit', resolve))
  clearTimeout(timer)
  return { code, output }
}

// Side by side: each start loads the gateway's ~1,100 modules through tsx, seconds of waiting on
// the machine each; one after another they were most of this file's time. Each subtest awaits its
// own start (the safety kill above is no assertion: 60 s, as four load at once).
const badRedis = startServer({ REDIS_URL: 'redis://127.0.0.1:6379/abc' })
const badKernel = startServer({ KERNEL_URL: 'http://127.0.0.1:99999' })
const badProduction = startServer({ NODE_ENV: 'production', PORT: 'abc', BFF_JWT_SECRET: 'short' })

t.test('start-up: a DATABASE_URL the memory audit store does not use is warned of, once', async t => {
  // BFF_AUDIT_STORE defaults to memory whatever DATABASE_URL says: setting DATABASE_URL alone
  // kept the audit in the process without a word.
  const child = spawn('/usr/bin/env', ['-u', 'NODE_OPTIONS', '-u', 'NODE_V8_COVERAGE', process.execPath, '--import', 'tsx', 'server.ts'], {
    cwd: root,
    env: { PATH: process.env.PATH, PORT: '0', LOG_LEVEL: 'warn', BFF_MAX_EVENT_LOOP_DELAY_MS: '0', DATABASE_URL: 'postgres://postgres@127.0.0.1:5432/test' },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  let output = ''
  const listening = new Promise<void>(resolve => {
    child.stdout.on('data', (d: Buffer) => { output += d.toString(); if (output.includes('Mantle is listening')) resolve() })
  })
  child.stderr.on('data', (d: Buffer) => { output += d.toString() })
  const exited = new Promise<number | null>(resolve => child.on('exit', resolve))
  const timer = setTimeout(() => child.kill('SIGKILL'), 60_000)
  await Promise.race([listening, exited])
  // The warnings follow the banner in the same tick of main().
  await new Promise(resolve => setTimeout(resolve, 200))
  child.kill('SIGTERM')
  t.equal(await exited, 0)
  clearTimeout(timer)
  t.equal(output.match(/DATABASE_URL is set but BFF_AUDIT_STORE is memory: the audit trail is kept in this process only/g)?.length, 1, 'warned once')
})

t.test('start-up: a REDIS_URL with a non-numeric database stops the process with one line, no stack', async t => {
  // The database is the path's number: ioredis would send SELECT NaN, whose error nothing catches.
  const { code, output } = await badRedis
  t.equal(code, 1)
  t.match(output, /^mantle: Invalid configuration: REDIS_URL=.*the database "abc" is not a non-negative integer/m, 'one line naming the variable and why')
  t.notMatch(output, /\n\s+at /, 'no stack trace')
})

t.test('start-up: a KERNEL_URL with an out-of-range port names the variable, not a bare "Invalid URL"', async t => {
  const { code, output } = await badKernel
  t.equal(code, 1)
  t.match(output, /^mantle: Invalid configuration: KERNEL_URL="http:\/\/127\.0\.0\.1:99999" is invalid: .*the port "99999" is not 1\.\.65535/m)
  t.notMatch(output, /\n\s+at /, 'no stack trace')
})

t.test('start-up in production: a bad value and production\'s refusals stop the process in one line', async t => {
  const { code, output } = await badProduction
  t.equal(code, 1)
  t.match(output, /^mantle: Invalid configuration: PORT="abc" is invalid: [^\n]*; Refusing to start in production: BFF_JWT_SECRET is shorter than 32 bytes; [^\n]*BFF_MANIFEST is the demo manifest/m)
})

t.test('REDIS_URL: redis or rediss, a host, a port 1..65535, no path or a database number', async t => {
  for (const good of ['redis://127.0.0.1:6379', 'redis://127.0.0.1:6379/', 'redis://127.0.0.1:6379/0', 'redis://cache:6379/15', 'rediss://user:pw@cache.example', 'redis://:pw@[::1]:6379/2', 'redis://cache:6379?db=3']) {
    t.equal(refusal({ REDIS_URL: good }), null, `accepts ${good}`)
  }
  const expected = 'expected redis://[user:password@]host[:port][/db] or rediss://...'
  t.equal(refusal({ REDIS_URL: 'redis://127.0.0.1:6379/abc' }), `Invalid configuration: REDIS_URL="redis://127.0.0.1:6379/abc" is invalid: ${expected} (the database "abc" is not a non-negative integer)`)
  t.equal(refusal({ REDIS_URL: 'redis://127.0.0.1:99999' }), `Invalid configuration: REDIS_URL="redis://127.0.0.1:99999" is invalid: ${expected} (the port "99999" is not 1..65535)`)
  t.match(refusal({ REDIS_URL: 'redis://127.0.0.1:0' }), /REDIS_URL=.*\(the port "0" is not 1\.\.65535\)$/)
  t.match(refusal({ REDIS_URL: 'redis://cache:abc' }), /REDIS_URL=.*\(the port "abc" is not 1\.\.65535\)$/)
  t.match(refusal({ REDIS_URL: 'redis://' }), /REDIS_URL=.*\(no host\)$/)
  t.match(refusal({ REDIS_URL: 'redis://cache:6379/-1' }), /REDIS_URL=.*\(the database "-1" is not a non-negative integer\)$/)
  t.match(refusal({ REDIS_URL: 'redis://cache:6379/1/' }), /REDIS_URL=.*\(the database "1\/" is not a non-negative integer\)$/)
  t.match(refusal({ REDIS_URL: 'redis://cache:6379?db=x' }), /REDIS_URL=.*\(the database db="x" is not a non-negative integer\)$/, 'ioredis takes ?db= too')
  t.match(refusal({ REDIS_URL: 'http://cache:6379' }), /^Invalid configuration: REDIS_URL="http:\/\/cache:6379" is invalid/, 'the schema still refuses another scheme')
  t.equal(testConfig({ REDIS_URL: 'redis://127.0.0.1:6379/1' }).REDIS_URL, 'redis://127.0.0.1:6379/1', 'a good URL is kept as given')
})

t.test('DATABASE_URL: postgres or postgresql, parseable, a port 1..65535', async t => {
  for (const good of ['postgres://mantle:pw@127.0.0.1:5432/mantle', 'postgresql://db.internal/mantle', 'postgres:///mantle?host=/var/run/postgresql']) {
    t.equal(refusal({ DATABASE_URL: good }), null, `accepts ${good}`)
  }
  t.equal(refusal({ DATABASE_URL: 'postgres://mantle@db:70000/mantle' }), 'Invalid configuration: DATABASE_URL="postgres://mantle@db:70000/mantle" is invalid: expected postgres://[user:password@]host[:port]/database (or postgresql://) (the port "70000" is not 1..65535)')
  t.match(refusal({ DATABASE_URL: 'postgres://%zz@db/mantle' }), /DATABASE_URL=.*\(the user or password is not valid percent-encoding\)$/)
})

t.test('a password in a refused URL is masked', async t => {
  const redis = refusal({ REDIS_URL: 'redis://:s3cret@cache:6379/abc' })
  t.match(redis, /REDIS_URL="redis:\/\/:\*\*\*@cache:6379\/abc"/)
  t.notMatch(redis, /s3cret/)
  const pg = refusal({ DATABASE_URL: 'postgres://mantle:s3cret@db:99999/mantle' })
  t.match(pg, /DATABASE_URL="postgres:\/\/mantle:\*\*\*@db:99999\/mantle"/)
  t.notMatch(pg, /s3cret/)
  t.notMatch(refusal({ DATABASE_URL: 'mysql://mantle:s3cret@db/mantle' }), /s3cret/, 'also when the schema refuses the scheme')
})

// pg (pg-connection-string) and ioredis both take `?password=` as the password, and a JWKS or
// OTLP URL may carry a token in its query: such a value was shown as written in the refusal,
// which start-up prints (a crash-looping pod's log). So was the whole of `redis:pw@cache`, which
// the schema refuses for its missing `//`.
t.test('a credential in a refused URL\'s query, or before the @ of one without //, is masked', async t => {
  for (const [env, shownAs] of [
    [{ DATABASE_URL: 'postgres://mantle@db:99999/mantle?sslmode=require&password=s3cret' }, 'DATABASE_URL="postgres://mantle@db:99999/mantle?sslmode=require&password=***"'],
    [{ REDIS_URL: 'redis://cache:6379/x?password=s3cret' }, 'REDIS_URL="redis://cache:6379/x?password=***"'],
    [{ BFF_JWKS_URL: 'https://idp.example:0/jwks?access_token=s3cret' }, 'BFF_JWKS_URL="https://idp.example:0/jwks?access_token=***"'],
    [{ OTEL_EXPORTER_OTLP_ENDPOINT: 'https://collector:99999/?sig=s3cret&x=1' }, 'OTEL_EXPORTER_OTLP_ENDPOINT="https://collector:99999/?sig=***&x=1"'],
    [{ REDIS_URL: 'redis:s3cret@cache' }, 'REDIS_URL="redis:***@cache"']
  ] as const) {
    const message = refusal(env) ?? ''
    t.ok(message.includes(shownAs), `${shownAs} in ${message}`)
    t.notMatch(message, /s3cret/, `${Object.keys(env)[0]}: the credential is not shown`)
  }
  t.equal(refusal({ REDIS_URL: 'redis://cache/x?db=7' }), 'Invalid configuration: REDIS_URL="redis://cache/x?db=7" is invalid: expected redis://[user:password@]host[:port][/db] or rediss://... (the database "x" is not a non-negative integer)', 'other parameters are shown')
})

t.test('a password with an @, / or # left unencoded is masked whole, in the value and in the reason', async t => {
  // Such a password is the usual reason a URL is refused; its part after the first @, or all of
  // it, was shown (`postgres://mantle:***@cret@db:99999`, `the port "se"` of `se/cret`).
  for (const [env, secret] of [
    [{ DATABASE_URL: 'postgres://mantle:s3@cr3t@db:99999/mantle' }, 'cr3t'],
    [{ DATABASE_URL: 'postgres://mantle:s3/cr3t@db/mantle' }, 's3'],
    [{ DATABASE_URL: 'postgres://mantle:s3#cr3t@db:0/mantle' }, 's3'],
    [{ DATABASE_URL: 'postgres://mantle:s3@x:cr3t@db:0/mantle' }, 'cr3t'],
    [{ REDIS_URL: 'redis://:s3@cr3t@cache:70000' }, 'cr3t']
  ] as const) {
    const message = refusal(env) ?? ''
    t.match(message, /:\*\*\*@/, `${Object.values(env)[0]}: masked`)
    t.notMatch(message, secret, `${Object.values(env)[0]}: no part of the password shown`)
  }
  t.match(refusal({ DATABASE_URL: 'postgres://mantle:s3@cr3t@db:99999/mantle' }), /DATABASE_URL="postgres:\/\/mantle:\*\*\*@db:99999\/mantle" .*\(the port "99999" is not 1\.\.65535\)$/)
})

t.test('KERNEL_URL, BFF_JWKS_URL and the OTLP endpoints: http(s) URLs with a port 1..65535', async t => {
  t.equal(refusal({ KERNEL_URL: 'http://127.0.0.1:99999' }), 'Invalid configuration: KERNEL_URL="http://127.0.0.1:99999" is invalid: expected an http(s)://host[:port] origin (the port "99999" is not 1..65535)')
  t.match(refusal({ KERNEL_URL: 'http://127.0.0.1:0' }), /KERNEL_URL=.*\(the port "0" is not 1\.\.65535\)$/)
  t.equal(refusal({ KERNEL_URL: 'http://[::1]:4001' }), null, 'an IPv6 origin')
  // Refused, while the manifest's kernel.url took http://kernel:4001/ as that origin.
  t.equal(refusal({ KERNEL_URL: 'http://kernel:4001/' }), null, 'an origin with the slash after it, as kernel.url takes it')
  t.match(refusal({ KERNEL_URL: 'http://kernel:4001//' }), /KERNEL_URL="http:\/\/kernel:4001\/\/" is invalid/, 'not a path')
  for (const name of ['BFF_JWKS_URL', 'OTEL_EXPORTER_OTLP_TRACES_ENDPOINT', 'OTEL_EXPORTER_OTLP_ENDPOINT']) {
    t.equal(refusal({ [name]: 'https://host.example:8443/path' }), null, `${name} accepts a URL with a path`)
    t.equal(refusal({ [name]: 'https://host.example:99999/path' }), `Invalid configuration: ${name}="https://host.example:99999/path" is invalid: expected an http(s) URL (the port "99999" is not 1..65535)`)
    t.match(refusal({ [name]: 'http://[::1:4318/x' }), new RegExp(`^Invalid configuration: ${name}=.*\\(not a valid URL\\)$`))
  }
})

t.test('a KERNEL_URL with the slash after its origin reaches the Kernel at the operation\'s path', async t => {
  const kernel = await startTestKernel(t, { 'GET /v1/a': (_req, res) => { json(res, 200, { ok: true }) } })
  const manifest = testManifest({ a: { type: 'query', rest: 'GET /a', kernel: 'GET /v1/a', output: { type: 'object' } } })
  const app = await buildTestApp(t, { KERNEL_URL: kernel.url + '/', BFF_AUDIT_ENABLED: false }, { manifest })
  const res = await app.inject({ method: 'GET', url: '/api/v1/a', headers: bearer() })
  t.equal(res.statusCode, 200, res.body)
  t.same(kernel.requests.map(r => r.url), ['/v1/a'])
})

t.test('every bad URL is named in one error', async t => {
  const message = refusal({ KERNEL_URL: 'http://kernel:99999', REDIS_URL: 'redis://cache/x', BFF_JWKS_URL: 'https://idp:0/jwks' })
  t.match(message, /^Invalid configuration: KERNEL_URL=.*; REDIS_URL=.*; BFF_JWKS_URL=.*$/)
})

t.test('BFF_CORS_ORIGINS: an origin whose port is past 65535 is refused', async t => {
  t.equal(refusal({ BFF_CORS_ORIGINS: 'http://localhost:65535' }), null)
  t.match(refusal({ BFF_CORS_ORIGINS: 'https://app.example, http://localhost:99999' }), /^Invalid configuration: BFF_CORS_ORIGINS=.* \(bad: "http:\/\/localhost:99999"\)$/)
})

t.test('a refused secret is never shown in the message', async t => {
  const token = refusal({ BFF_INTERNAL_TOKEN: 'short-secret' })
  t.match(token, /BFF_INTERNAL_TOKEN="\*\*\*" is invalid/)
  t.notMatch(token, /short-secret/)
})
