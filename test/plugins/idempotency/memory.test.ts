import t from 'tap'
import { randomUUID } from 'node:crypto'
import { until } from '../../helper.js'
import { idemSetup } from './idempotency-helper.js'
import { semantics } from './semantics.js'

semantics(t, 'memory')

t.test('idempotency off: no stage, every repeat reaches the Kernel', async t => {
  const s = await idemSetup(t, 'memory', { BFF_IDEMPOTENCY_ENABLED: false })
  const key = randomUUID()
  await s.create({ name: 'a' }, key)
  const again = await s.create({ name: 'a' }, key)
  t.notOk(again.headers['idempotent-replayed'])
  t.equal(s.calls(), 2)
  t.notOk(s.app.pipeline.entry('createItem').stages.includes('idempotency'))
  t.notOk(s.app.hasDecorator('idempotency'))
})

t.test('metrics count replays, conflicts, key reuse and the memory store size', async t => {
  const s = await idemSetup(t, 'memory', { BFF_IDEMPOTENCY_WAIT_MS: 0 })
  const key = randomUUID()
  await s.create({ name: 'a' }, key)
  await s.create({ name: 'a' }, key)
  await s.create({ name: 'b' }, key)
  const gate = s.hold()
  const slow = s.create({ name: 'c' }, 'k2')
  await until(() => s.calls() === 2, 'the second call to reach the Kernel')
  await s.create({ name: 'c' }, 'k2')
  gate.open()
  await slow
  const text = (await s.app.inject({ method: 'GET', url: '/metrics' })).body
  t.match(text, /mantle_idempotency_replays_total\{op="createItem"\} 1/)
  t.match(text, /mantle_idempotency_key_reused_total\{op="createItem"\} 1/)
  t.match(text, /mantle_idempotency_conflicts_total\{op="createItem"\} 1/)
  t.match(text, /mantle_idempotency_memory_keys 2/)
  t.match(text, /mantle_idempotency_store_fallbacks_total 0/)
  t.equal(s.app.idempotency.memoryKeys(), 2)
})
