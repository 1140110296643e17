import t from 'tap'
import { runChaos, chaosTable } from '../../loadtest/chaos.js'

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
