import t from 'tap'
import { createHmac, generateKeyPairSync } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { createIdentityVerifier, mintToken } from '../../../plugins/auth/identity.js'
import { loadConfig, productionProblems, ConfigError } from '../../../schemas/config.js'
import { buildTestApp, testConfig } from '../../helper.js'
import { tokenFromArgs } from '../../../scripts/token.js'
import { banner, type Started } from '../../../server.js'

// CONTRACT §2: HS256 secrets several at once by kid (BFF_JWT_SECRETS), so that a shared secret
// is rotated without a window of 401s while issuers and gateway pods disagree.
const first = 'first-hs256-secret-of-at-least-32-bytes'
const second = 'second-hs256-secret-of-at-least-32-bytes'
const legacy = 'legacy-hs256-secret-of-at-least-32-bytes!'
const claims = { tenant: 't1', user: 'u1', roles: ['viewer'] }

t.test('an HS256 token with a kid is verified with that kid\'s secret', async t => {
  const identify = createIdentityVerifier({ secrets: new Map([['k1', first], ['k2', second]]) })
  t.match(identify(`Bearer ${mintToken(first, { ...claims, kid: 'k1' })}`), { tenant: 't1', user: 'u1' }, 'k1 verifies')
  t.match(identify(`Bearer ${mintToken(second, { ...claims, user: 'u2', kid: 'k2' })}`), { tenant: 't1', user: 'u2' }, 'k2 verifies')
  t.throws(() => identify(`Bearer ${mintToken(first, { ...claims, kid: 'k2' })}`), { code: 'UNAUTHENTICATED', message: /signature is invalid/ }, 'signed with k1\'s secret, naming k2: refused')
  t.throws(() => identify(`Bearer ${mintToken(first, { ...claims, kid: 'k3' })}`), { code: 'UNAUTHENTICATED', message: /unknown key id \(kid\) "k3"/ }, 'an unknown kid: refused')
  t.throws(() => identify(`Bearer ${mintToken(first, claims)}`), { code: 'UNAUTHENTICATED', message: /HS256 token needs a key id/ }, 'no kid and no BFF_JWT_SECRET: refused')
  const b64 = (o: object): string => Buffer.from(JSON.stringify(o)).toString('base64url')
  const signing = `${b64({ alg: 'HS256', typ: 'JWT', kid: 7 })}.${b64({ sub: 'u', tid: 't', exp: Math.floor(Date.now() / 1000) + 60 })}`
  const numericKid = `${signing}.${createHmac('sha256', first).update(signing).digest('base64url')}`
  t.throws(() => identify(`Bearer ${numericKid}`), { code: 'UNAUTHENTICATED' }, 'a kid that is no string: refused')
})

t.test('an HS256 token without a kid is verified with BFF_JWT_SECRET, beside the secrets by kid', async t => {
  const identify = createIdentityVerifier({ secret: legacy, secrets: new Map([['k1', first]]) })
  t.match(identify(`Bearer ${mintToken(legacy, claims)}`), { user: 'u1' }, 'no kid: BFF_JWT_SECRET')
  t.match(identify(`Bearer ${mintToken(first, { ...claims, user: 'u3', kid: 'k1' })}`), { user: 'u3' }, 'kid k1: its secret')
  t.throws(() => identify(`Bearer ${mintToken(legacy, { ...claims, kid: 'k1' })}`), { code: 'UNAUTHENTICATED', message: /signature is invalid/ }, 'BFF_JWT_SECRET does not stand in for a kid')
  t.throws(() => identify(`Bearer ${mintToken(first, { ...claims, user: 'u4' })}`), { code: 'UNAUTHENTICATED', message: /signature is invalid/ }, 'a kid\'s secret does not verify a token without kid')
})

t.test('without BFF_JWT_SECRETS an HS256 token\'s kid is ignored, as before', async t => {
  const identify = createIdentityVerifier({ secret: legacy })
  t.match(identify(`Bearer ${mintToken(legacy, { ...claims, kid: 'whatever' })}`), { user: 'u1' })
})

t.test('the verifier refuses a key given as a secret by kid', async t => {
  const pem = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ type: 'spki', format: 'pem' }).toString()
  t.throws(() => createIdentityVerifier({ secrets: new Map([['k1', pem]]) }), /BFF_JWT_SECRETS: the secret "k1" cannot be an HS256 secret/)
})

/** The ConfigError a bad environment throws, or null when it loads. */
function errorOf (env: Record<string, string>): ConfigError | null {
  try {
    loadConfig({ BFF_AUDIT_ENABLED: 'false', ...env })
  } catch (err) {
    if (err instanceof ConfigError) return err
    throw err
  }
  return null
}

t.test('BFF_JWT_SECRETS: bad values stop the start, naming the variable and the kid, never the secret', async t => {
  const pem = generateKeyPairSync('rsa', { modulusLength: 2048 }).publicKey.export({ type: 'spki', format: 'pem' }).toString()
  const cases: Array<[string, string, RegExp]> = [
    ['not JSON', 'k1=' + first, /BFF_JWT_SECRETS is not valid JSON/],
    ['an array', JSON.stringify([first]), /BFF_JWT_SECRETS must be a JSON object/],
    ['a string', JSON.stringify(first), /BFF_JWT_SECRETS must be a JSON object/],
    ['an empty object', '{}', /BFF_JWT_SECRETS holds no secret/],
    ['an empty kid', JSON.stringify({ '': first }), /BFF_JWT_SECRETS: the secret "" is not a non-empty string/],
    ['a secret that is no string', JSON.stringify({ k1: 12345 }), /BFF_JWT_SECRETS: the secret "k1" is not a non-empty string/],
    ['an empty secret', JSON.stringify({ k1: '' }), /BFF_JWT_SECRETS: the secret "k1" is not a non-empty string/],
    ['a PEM', JSON.stringify({ k1: first, k2: pem }), /BFF_JWT_SECRETS: the secret "k2" .*public key.*BFF_JWT_PUBLIC_KEYS/]
  ]
  for (const env of ['development', 'production']) {
    for (const [what, value, expected] of cases) {
      const err = errorOf({ NODE_ENV: env, BFF_JWT_SECRETS: value })
      t.match(err?.message, expected, `${env}: ${what} refused`)
      t.notOk(err?.message.includes(first), `${env}: ${what}: the secret is not shown`)
      t.notOk(err?.message.includes(pem.slice(30, 60)), `${env}: ${what}: the PEM is not shown`)
    }
  }
  // The schema's own refusal (an empty value) shows no value either.
  t.match(errorOf({ BFF_JWT_SECRETS: '' }), null, 'empty: unset, as every variable')
})

t.test('BFF_JWT_SECRETS in production: each secret held to BFF_JWT_SECRET\'s checks, and a key source', async t => {
  const prod = (env: Record<string, string>): string[] => productionProblems(loadConfig({ NODE_ENV: 'production', BFF_AUDIT_ENABLED: 'false', ...env }))
  t.same(prod({ BFF_JWT_SECRETS: JSON.stringify({ k1: first, k2: second }) }), [], 'a key source of its own: no "missing"')
  t.same(prod({ BFF_JWT_SECRETS: JSON.stringify({ k1: first, k2: 'short-' + 'x'.repeat(20) }) }), ['BFF_JWT_SECRETS: the secret "k2" is shorter than 32 bytes'])
  t.same(prod({ BFF_JWT_SECRETS: JSON.stringify({ k1: 'mantle-dev-secret-not-for-production-0000' }) }), ['BFF_JWT_SECRETS: the secret "k1" is the development secret, which is published in the source (anyone could sign tokens): set a secret of your own'])
  t.same(prod({ BFF_JWT_SECRETS: JSON.stringify({ k1: 'change-me-to-32-or-more-random-bytes' }) }), ['BFF_JWT_SECRETS: the secret "k1" is the example\'s placeholder, which is published in the repository (anyone could sign tokens): set a secret of your own'])
  for (const problem of prod({ BFF_JWT_SECRETS: JSON.stringify({ k1: 'short-secret-xyz' }) })) t.notOk(problem.includes('short-secret-xyz'), 'the secret is not shown')
  t.same(prod({}), ['BFF_JWT_SECRET is missing (or set BFF_JWT_SECRETS, BFF_JWT_PUBLIC_KEYS or BFF_JWKS_URL)'])
})

t.test('the gateway takes tokens of each kid of BFF_JWT_SECRETS and keeps BFF_JWT_SECRET for tokens without one', async t => {
  const app = await buildTestApp(t, { BFF_JWT_SECRET: legacy, BFF_JWT_SECRETS: JSON.stringify({ k1: first, k2: second }) })
  const call = async (token: string): Promise<number> => (await app.inject({ method: 'GET', url: '/readyz', headers: { authorization: `Bearer ${token}` } })).statusCode
  t.equal(await call('x'), 200, '/readyz is ready (identity holds keys)')
  const diagz = async (token: string): Promise<number> => (await app.inject({ method: 'GET', url: '/diagz', headers: { authorization: `Bearer ${token}` } })).statusCode
  const sys = { ...claims, roles: ['system'] }
  t.equal(await diagz(mintToken(first, { ...sys, kid: 'k1' })), 200, 'k1')
  t.equal(await diagz(mintToken(second, { ...sys, kid: 'k2' })), 200, 'k2')
  t.equal(await diagz(mintToken(legacy, sys)), 200, 'no kid: BFF_JWT_SECRET')
  t.equal(await diagz(mintToken(first, { ...sys, kid: 'k2' })), 401, 'k1\'s secret under k2')
  t.equal(await diagz(mintToken(first, { ...sys, kid: 'k9' })), 401, 'an unknown kid')
})

t.test('with BFF_JWT_SECRETS alone the gateway holds no development secret', async t => {
  const app = await buildTestApp(t, { BFF_JWT_SECRET: undefined, BFF_JWT_SECRETS: JSON.stringify({ k1: first }) })
  const diagz = async (token: string): Promise<number> => (await app.inject({ method: 'GET', url: '/diagz', headers: { authorization: `Bearer ${token}` } })).statusCode
  t.equal(await diagz(mintToken(first, { ...claims, roles: ['system'], kid: 'k1' })), 200)
  t.equal(await diagz(mintToken('mantle-dev-secret-not-for-production-0000', { ...claims, roles: ['system'] })), 401, 'the development secret is not taken')
  t.equal((await app.inject({ method: 'GET', url: '/readyz' })).statusCode, 200, '/readyz: identity holds keys')
})

t.test('npm run token signs with the secret of --kid, and says what it needs', async t => {
  const env = { BFF_JWT_SECRETS: JSON.stringify({ k1: first, k2: second }) }
  const identify = createIdentityVerifier({ secrets: new Map([['k1', first], ['k2', second]]) })
  t.match(identify(`Bearer ${tokenFromArgs(['--kid', 'k2', '--user', 'bob'], env)}`), { user: 'bob' }, '--kid k2: signed with k2\'s secret, kid in its header')
  const header = JSON.parse(Buffer.from(tokenFromArgs(['--kid', 'k1'], env).split('.')[0], 'base64url').toString()) as Record<string, unknown>
  t.match(header, { alg: 'HS256', kid: 'k1' })
  t.throws(() => tokenFromArgs(['--kid', 'k9'], env), /^cannot sign: BFF_JWT_SECRETS holds no secret "k9" \(it holds "k1", "k2"\)/)
  t.throws(() => tokenFromArgs([], env), /^cannot sign: .*give --kid, one of "k1", "k2"/, 'BFF_JWT_SECRETS alone: a kid is needed')
  t.throws(() => tokenFromArgs(['--kid', 'k1'], { BFF_JWT_SECRET: legacy }), /^cannot sign: --kid names a secret of BFF_JWT_SECRETS, which is not set/)
  const both = { ...env, BFF_JWT_SECRET: legacy }
  t.match(createIdentityVerifier({ secret: legacy })(`Bearer ${tokenFromArgs([], both)}`), { user: 'dev' }, 'no --kid: BFF_JWT_SECRET, as before')
  for (const bad of [['--kid', 'k9'], []]) {
    try {
      tokenFromArgs(bad, env)
    } catch (err) {
      t.notOk((err as Error).message.includes(first) || (err as Error).message.includes(second), 'no secret in the message')
    }
  }
})

t.test('.env.example\'s BFF_JWT_SECRETS loads, and production refuses each of its placeholders', async t => {
  const line = readFileSync(new URL('../../../.env.example', import.meta.url), 'utf8').split('\n').find(l => l.startsWith('# BFF_JWT_SECRETS='))
  const value = line?.slice('# BFF_JWT_SECRETS='.length) ?? ''
  const kids = Object.keys(JSON.parse(value) as object)
  t.ok(kids.length >= 2, 'several kids, as for a rotation')
  const problems = productionProblems(loadConfig({ NODE_ENV: 'production', BFF_AUDIT_ENABLED: 'false', BFF_JWT_SECRETS: value }))
  t.same(problems, kids.map(kid => `BFF_JWT_SECRETS: the secret ${JSON.stringify(kid)} is the example's placeholder, which is published in the repository (anyone could sign tokens): set a secret of your own`))
})

t.test('the start-up banner prints no dev token with BFF_JWT_SECRETS alone', async t => {
  const started = { url: 'http://127.0.0.1:1', kernelUrl: null } as unknown as Started
  t.notMatch(banner(started, testConfig({ BFF_JWT_SECRET: undefined, BFF_JWT_SECRETS: JSON.stringify({ k1: first }) })), /Dev token/, 'a configured key source: the gateway refuses the development secret')
})

t.test('a secret of BFF_JWT_SECRETS with white space around it is warned of by its kid, never shown', async t => {
  const lines: string[] = []
  const { buildApp } = await import('../../../app.js')
  const app = await buildApp(testConfig({ LOG_LEVEL: 'warn', BFF_JWT_SECRETS: JSON.stringify({ k1: first, k2: second + '\n' }) }), { logStream: { write: (line: string) => { lines.push(line) } } })
  t.teardown(() => app.close())
  await app.ready()
  const warned = lines.filter(line => line.includes('BFF_JWT_SECRETS begins or ends with white space'))
  t.equal(warned.length, 1, 'one warning, for k2')
  t.match(JSON.parse(warned[0]) as object, { kid: 'k2' })
  t.notOk(lines.join('').includes(second) || lines.join('').includes(first), 'no secret in the log')
})
