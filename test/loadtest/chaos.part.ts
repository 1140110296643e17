import t from 'tap'
import { runChaos, chaosOptions, chaosPassed, chaosTable, chaosTokenTtl, type PhaseFigures } from '../../loadtest/chaos.js'

// `npm run chaos` in CI, with short phases: under steady load through proxies this test cuts
// Redis, cuts PostgreSQL, slows and then stops the Kernel, and sends SIGTERM. No 5xx while
// Redis or PostgreSQL are away, and no audit entry lost; the Kernel phases answer 503s as
// the contract says, and the gateway recovers after each restore.
t.test('chaos, short: no 5xx while Redis or PostgreSQL are away, no audit entry lost', { timeout: 240_000 }, async t => {
  const report = await runChaos({
    phaseSeconds: 1,
    concurrency: 4,
    redisPort: Number(new URL(process.env.REDIS_URL ?? 'redis://127.0.0.1:6379').port || 6379),
    postgresUrl: process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test',
    log: () => {}
  })
  t.comment(chaosTable(report))
  const phase = (name: string) => report.phases.find(p => p.phase === name)!
  for (const name of ['steady', 'redis cut', 'redis back', 'postgres cut', 'postgres back']) {
    t.ok(phase(name).calls > 0, `${name}: calls made`)
    t.equal(phase(name).c5xx, 0, `${name}: no 5xx`)
  }
  t.same(Object.keys(phase('kernel down').codes).filter(c => c !== 'KERNEL_UNAVAILABLE' && c !== 'KERNEL_ERROR'), [], 'the Kernel down answers only the contract codes')
  t.ok(report.answered > 0)
  t.equal(report.auditLost, 0, 'every answered call has its audit entry')
  t.ok(report.passed)
})

t.test('the chaos verdict fails a call lost (unanswered, or not a 2xx while the Kernel is up), and a 5xx the contract does not name', async t => {
  const names = ['steady', 'redis cut', 'redis back', 'postgres cut', 'postgres back', 'kernel slow', 'kernel down', 'kernel back', 'sigterm']
  const phases = (change: Partial<Record<string, Partial<PhaseFigures>>> = {}): PhaseFigures[] => names.map(phase => ({
    phase, calls: 100, ok: 100, c4xx: 0, c5xx: 0, codes: {}, noAnswer: 0, p99Ms: 5, recoverMs: null, ...change[phase]
  }))
  t.equal(chaosPassed(phases(), 0), true, 'every call answered, no 5xx')
  t.equal(chaosPassed(phases({ 'kernel down': { c5xx: 50, codes: { KERNEL_UNAVAILABLE: 50 } }, sigterm: { noAnswer: 30 } }), 0), true,
    'the Kernel phases may answer 5xx, and calls after the SIGTERM may find the port closed')
  t.equal(chaosPassed(phases(), 1), false, 'an audit entry lost')
  t.equal(chaosPassed(phases({ 'redis cut': { ok: 99, c5xx: 1 } }), 0), false, 'a 5xx while Redis is away')
  // The rate limits answer from memory while Redis is away: a 429 (or a 401) there is a call lost.
  t.equal(chaosPassed(phases({ 'redis cut': { ok: 95, c4xx: 5 } }), 0), false, 'a 4xx while Redis is away')
  t.equal(chaosPassed(phases({ 'postgres back': { ok: 99, c4xx: 1 } }), 0), false, 'a 4xx after PostgreSQL came back')
  // A gateway that crashed (or hung) when Redis went away answered no 5xx, and its calls without
  // an answer have no audit entry to miss: it passed.
  t.equal(chaosPassed(phases({ 'redis cut': { ok: 3, noAnswer: 97 } }), 0), false, 'calls without an answer while Redis is away')
  t.equal(chaosPassed(phases({ 'kernel down': { noAnswer: 1 } }), 0), false, 'a call without an answer while the Kernel is down')
  t.equal(chaosPassed(phases({ steady: { ok: 98, c5xx: 2 } }), 0), false, 'a 5xx with every dependency up')
  // A 500 INTERNAL (or a 5xx without a code) while the Kernel is down is the gateway failing, not the Kernel.
  t.equal(chaosPassed(phases({ 'kernel down': { c5xx: 3, codes: { KERNEL_UNAVAILABLE: 2, INTERNAL: 1 } } }), 0), false, 'a 500 INTERNAL while the Kernel is down')
  t.equal(chaosPassed(phases({ 'kernel slow': { c5xx: 1, codes: { 502: 1 } } }), 0), false, 'a 5xx without a contract code')
  t.equal(chaosPassed(phases({ 'kernel slow': { c5xx: 1, codes: { KERNEL_TIMEOUT: 1 } }, sigterm: { c5xx: 4, codes: { OVERLOADED: 4 } } }), 0), true,
    'a Kernel timeout, and 503 OVERLOADED while closing')
  t.equal(chaosPassed(phases({ 'postgres cut': { calls: 0, ok: 0 } }), 0), false, 'a phase that made no call tested nothing')
})

t.test('the chaos token outlives the run, however long its phases', async t => {
  // 8 phases and the SIGTERM: with 10-minute phases the hour-long token expired in the sixth, and
  // every later call was a 401 (a 4xx: the Kernel phases passed untested).
  t.ok(chaosTokenTtl(9, 600) >= 9 * 600 + 600, `10-minute phases: ${chaosTokenTtl(9, 600)} s`)
  t.equal(chaosTokenTtl(9, 1), 3600, 'short phases: an hour')
})

t.test('npm run chaos refuses options that are not numbers, rather than testing nothing', async t => {
  t.match(chaosOptions([], {}), { phaseSeconds: 5, concurrency: 16, redisPort: 6379, postgresUrl: 'postgres://postgres@127.0.0.1:5432/test' })
  t.match(chaosOptions(['--phase-seconds', '0.5', '--concurrency', '4', '--redis-port', '6380'], { DATABASE_URL: 'postgres://x/y' }), { phaseSeconds: 0.5, concurrency: 4, redisPort: 6380, postgresUrl: 'postgres://x/y' })
  // --phase-seconds 5s was NaN: every phase slept 1 ms and made no call, and the run passed.
  t.throws(() => chaosOptions(['--phase-seconds', '5s']), { message: '--phase-seconds must be a positive number of seconds, got "5s"' })
  t.throws(() => chaosOptions(['--phase-seconds', '0']), { message: /^--phase-seconds must be/ })
  t.throws(() => chaosOptions(['--concurrency', '1.5']), { message: '--concurrency must be a positive integer, got "1.5"' })
  t.throws(() => chaosOptions(['--redis-port', 'x']), { message: /^--redis-port must be a port number/ })
})
