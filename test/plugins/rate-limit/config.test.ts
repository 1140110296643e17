import t from 'tap'
import { loadConfig, rateLimitStore, ConfigError } from '../../../schemas/config.js'
import { buildApp } from '../../../app.js'
import { testConfig } from '../../helper.js'

t.test('rate-limit configuration', async t => {
  const base = { NODE_ENV: 'test' }
  const plain = loadConfig(base)
  t.equal(plain.BFF_RATE_LIMIT_ENABLED, true, 'on by default')
  t.equal(plain.BFF_RATE_LIMIT_GLOBAL_MAX, undefined, 'no guard by default')
  t.equal(plain.BFF_RATE_LIMIT_GLOBAL_WINDOW_MS, 60000)
  t.equal(rateLimitStore(plain), 'memory', 'no REDIS_URL: memory')
  t.equal(rateLimitStore(loadConfig({ ...base, REDIS_URL: 'redis://127.0.0.1:6379' })), 'redis', 'REDIS_URL: Redis')
  t.equal(rateLimitStore(loadConfig({ ...base, REDIS_URL: 'redis://127.0.0.1:6379', BFF_RATE_LIMIT_STORE: 'memory' })), 'memory', 'unless told otherwise')
  t.throws(() => loadConfig({ ...base, BFF_RATE_LIMIT_STORE: 'redis' }), { name: 'ConfigError', message: /BFF_RATE_LIMIT_STORE="redis" needs REDIS_URL/ })
  t.throws(() => loadConfig({ ...base, BFF_RATE_LIMIT_STORE: 'postgres' }), { message: /BFF_RATE_LIMIT_STORE="postgres" is invalid: expected memory \| redis/ })
  t.throws(() => loadConfig({ ...base, BFF_RATE_LIMIT_GLOBAL_MAX: '0' }), { message: /BFF_RATE_LIMIT_GLOBAL_MAX="0" is invalid: expected an integer \(1 or more\)/ })
  t.throws(() => loadConfig({ ...base, BFF_RATE_LIMIT_GLOBAL_WINDOW_MS: 'soon' }), { message: /BFF_RATE_LIMIT_GLOBAL_WINDOW_MS="soon" is invalid/ })
  t.throws(() => loadConfig({ ...base, BFF_RATE_LIMIT_ENABLED: 'maybe' }), { message: /BFF_RATE_LIMIT_ENABLED="maybe" is invalid: expected true or false/ })
  t.equal(loadConfig({ ...base, BFF_RATE_LIMIT_GLOBAL_MAX: '100' }).BFF_RATE_LIMIT_GLOBAL_MAX, 100)
  t.ok(ConfigError)
})

t.test('the plugin refuses a Redis store without the Redis connection', async t => {
  const config = { ...testConfig(), BFF_RATE_LIMIT_STORE: 'redis' as const }
  await t.rejects(buildApp(config, { logger: false }), /BFF_RATE_LIMIT_STORE=redis needs REDIS_URL/)
})
