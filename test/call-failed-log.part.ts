import t from 'tap'
import pino from 'pino'
import { CallFailedLog } from '../call-failed-log.js'
import { until } from './helper.js'

function capture (): { log: pino.Logger, lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = []
  return { log: pino({ level: 'warn' }, { write: (line: string) => { lines.push(JSON.parse(line) as Record<string, unknown>) } }), lines }
}

t.test('at most `lines` per operation and code in an interval; its end says how many were left out, and the next interval writes again', async t => {
  const { log, lines } = capture()
  const told: Array<[string, string, number]> = []
  const bounded = new CallFailedLog(log, { lines: 2, intervalMs: 50, onSuppressed: (op, code, n) => { told.push([op, code, n]) } })
  t.teardown(() => { bounded.close() })
  for (let i = 0; i < 5; i++) bounded.warn(log, 'getItem', 'KERNEL_ERROR', { code: 'KERNEL_ERROR', i })
  bounded.warn(log, 'getItem', 'KERNEL_TIMEOUT', { code: 'KERNEL_TIMEOUT' })
  bounded.warn(log, 'other', 'KERNEL_ERROR', { code: 'KERNEL_ERROR' })
  t.same(lines.map(l => [l.msg, l.code, l.i]), [['call failed', 'KERNEL_ERROR', 0], ['call failed', 'KERNEL_ERROR', 1], ['call failed', 'KERNEL_TIMEOUT', undefined], ['call failed', 'KERNEL_ERROR', undefined]])
  await until(() => lines.length === 5, 'the interval\'s end')
  t.match(lines[4], { level: 40, msg: 'call failed lines suppressed', op: 'getItem', code: 'KERNEL_ERROR', suppressed: 3 })
  t.same(told, [['getItem', 'KERNEL_ERROR', 3]])
  bounded.warn(log, 'getItem', 'KERNEL_ERROR', { code: 'KERNEL_ERROR', i: 5 })
  t.equal(lines.at(-1)?.i, 5, 'a new interval writes again')
})

t.test('the timer runs only while lines are written; keys past the bound share op `*`', async t => {
  const { log, lines } = capture()
  const bounded = new CallFailedLog(log, { lines: 1, intervalMs: 20, maxKeys: 2 })
  t.teardown(() => { bounded.close() })
  const timer = (): unknown => (bounded as unknown as { timer: unknown }).timer
  t.equal(timer(), null, 'no timer before a line')
  bounded.warn(log, 'a', 'KERNEL_ERROR', {})
  bounded.warn(log, 'b', 'KERNEL_ERROR', {})
  bounded.warn(log, 'c', 'KERNEL_ERROR', {})
  bounded.warn(log, 'd', 'KERNEL_ERROR', {})
  t.equal(lines.length, 3, 'c and d share one key, and its one line')
  await until(() => lines.length === 4, 'the interval\'s end')
  t.match(lines[3], { op: '*', code: 'KERNEL_ERROR', suppressed: 1 })
  await until(() => timer() === null, 'the timer stopped after an interval without a line')
})
