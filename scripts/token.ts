import { parseArgs } from 'node:util'
import { pathToFileURL } from 'node:url'
import { resolve } from 'node:path'
import { answerHelp, refusedByParseArgs, refuseUsage } from '../cli.js'
import { ANONYMOUS, mintToken, parseSecrets } from '../plugins/auth/index.js'
import { HEADER_SAFE, carriesRole } from '../plugins/auth/claims.js'
import { DEV_JWT_SECRET, INTEGER_TEXT, loadConfig } from '../schemas/config.js'
import type { Zone } from '../schemas/manifest.js'

const USAGE = `Usage: npm run token -- [--tenant t1] [--user u1] [--roles viewer,editor] [--zone public|internal|restricted] [--ttl 3600] [--kid k1]
Mints an HS256 JWT with the Mantle claims, signed with BFF_JWT_SECRET (the development secret when no key source is set;
with BFF_JWT_PUBLIC_KEYS or BFF_JWKS_URL alone it cannot sign, and says so), or with --kid, with that kid's secret of
BFF_JWT_SECRETS, the kid in the token's header.`

/** Returns the token for argv, or throws with the usage text. */
export function tokenFromArgs (args: string[], env: NodeJS.ProcessEnv = process.env): string {
  const { values } = parseArgs({
    args,
    options: {
      tenant: { type: 'string', default: 'demo' },
      user: { type: 'string', default: 'dev' },
      roles: { type: 'string', default: 'viewer' },
      zone: { type: 'string', default: 'public' },
      ttl: { type: 'string', default: '3600' },
      kid: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false }
    },
    strict: true
  })
  if (values.help) throw new Error(USAGE)
  const zone = values.zone as Zone
  if (!['public', 'internal', 'restricted'].includes(zone)) throw new Error(`--zone must be public, internal or restricted\n${USAGE}`)
  const ttl = INTEGER_TEXT.test(values.ttl) ? Number(values.ttl) : NaN
  if (!Number.isSafeInteger(ttl) || ttl <= 0) throw new Error(`--ttl must be a positive number of seconds, in decimal digits\n${USAGE}`)
  // What the gateway takes (plugins/auth/identity.ts): it refuses 401 a token whose tid, sub or
  // a role cannot travel to the Kernel as a header, and such a token was printed all the same.
  for (const [option, value] of [['--tenant', values.tenant], ['--user', values.user]] as const) {
    if (!HEADER_SAFE.test(value)) throw new Error(`${option} must be 1 to 256 visible characters (Latin-1), without spaces around them: the gateway refuses a token with ${JSON.stringify(value)}\n${USAGE}`)
  }
  if (values.tenant === ANONYMOUS.tenant) throw new Error(`--tenant ${ANONYMOUS.tenant} is reserved for calls without a token: the gateway refuses a token with it\n${USAGE}`)
  const roles = values.roles.split(',').map(r => r.trim()).filter(r => r !== '')
  const refused = roles.find(role => !carriesRole(role))
  if (refused !== undefined) throw new Error(`--roles must be comma-separated roles of 1 to 256 visible characters (Latin-1): the gateway refuses a token with ${JSON.stringify(refused)}\n${USAGE}`)
  const config = loadConfig(env)
  // The kids are named, never a secret.
  const secrets = config.BFF_JWT_SECRETS === undefined ? undefined : parseSecrets(config.BFF_JWT_SECRETS)
  const kids = (): string => [...secrets?.keys() ?? []].map(kid => JSON.stringify(kid)).join(', ')
  let secret = config.BFF_JWT_SECRET
  if (values.kid !== undefined) {
    if (secrets === undefined) throw new Error('cannot sign: --kid names a secret of BFF_JWT_SECRETS, which is not set')
    secret = secrets.get(values.kid)
    if (secret === undefined) throw new Error(`cannot sign: BFF_JWT_SECRETS holds no secret ${JSON.stringify(values.kid)} (it holds ${kids()})`)
  } else if (secret === undefined && secrets !== undefined) {
    // A token without a kid is verified with BFF_JWT_SECRET alone: one of the development secret was refused 401.
    throw new Error(`cannot sign: BFF_JWT_SECRETS is set and BFF_JWT_SECRET is not, so the gateway takes HS256 tokens only with a kid: give --kid, one of ${kids()}`)
  }
  // With public keys or a JWKS and no secret, the gateway takes only tokens their private keys
  // sign, which this script does not hold: a token of the development secret was printed, and
  // refused 401.
  const keySources = (['BFF_JWT_PUBLIC_KEYS', 'BFF_JWKS_URL'] as const).filter(name => config[name] !== undefined)
  if (secret === undefined && keySources.length > 0) {
    throw new Error(`cannot sign: ${keySources.join(' and ')} ${keySources.length > 1 ? 'are' : 'is'} set and BFF_JWT_SECRET is not, so the gateway accepts only tokens signed with the matching private keys, which this script does not hold (and refuses the development secret); mint tokens with your identity provider, or set BFF_JWT_SECRET to sign HS256 ones`)
  }
  return mintToken(secret ?? DEV_JWT_SECRET, {
    tenant: values.tenant,
    user: values.user,
    roles,
    zone,
    ttlSeconds: ttl,
    issuer: config.BFF_JWT_ISSUER,
    audience: config.BFF_JWT_AUDIENCE,
    kid: values.kid
  })
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  try {
    if (!answerHelp(process.argv.slice(2), USAGE)) process.stdout.write(tokenFromArgs(process.argv.slice(2)) + '\n')
  } catch (err) {
    // An option it does not take (node:util's parseArgs) is said with the usage; its own refusals carry it already.
    if (refusedByParseArgs(err)) refuseUsage('token', (err as Error).message, USAGE)
    else {
      process.stderr.write((err as Error).message + '\n')
      process.exitCode = 2
    }
  }
}
