// The Kernel client's load shedding: an operation that timed out is answered again once its Kernel recovers.
import t, { type Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { json } from '../../helper.js'
import type { KernelClient } from '../../../plugins/kernel/client.js'
import { twoOperations } from './clients.js'

/**
 * slowItem's Kernel hangs until one of its calls times out (its need is then about its whole
 * timeout), then answers in 20 ms; `callers` callers of getItem (answered in 40 ms) keep the two
 * connections busy from then on. After `warmMs`, `calls` calls of slowItem, `gapMs` apart: their
 * outcomes.
 */
async function recovery (t: Test, o: { busyTimeoutMs: number, slowTimeoutMs: number, callers: number, warmMs: number, calls: number, gapMs: number }): Promise<{ outcomes: Record<string, number>, client: KernelClient }> {
  let hung = true
  const { client, getItem, slowItem, call } = await twoOperations(t, {
    'GET /v1/items/busy': (_req, res) => { setTimeout(() => json(res, 200, { id: 'busy' }), 40) },
    'GET /v1/slow/h1': (_req, res) => { if (!hung) setTimeout(() => json(res, 200, { id: 'h1' }), 20) }
  }, o.busyTimeoutMs, o.slowTimeoutMs)
  const busy = client.forOperation(getItem)
  const slow = client.forOperation(slowItem)
  t.equal(await call(slow, slowItem, 'h1'), 'KERNEL_TIMEOUT')
  hung = false
  const load = { running: true }
  const workers = Array.from({ length: o.callers }, async () => { while (load.running) await call(busy, getItem, 'busy') })
  await sleep(o.warmMs)
  const outcomes: Record<string, number> = {}
  for (let i = 0; i < o.calls; i++) {
    const outcome = await call(slow, slowItem, 'h1')
    outcomes[outcome] = (outcomes[outcome] ?? 0) + 1
    await sleep(o.gapMs)
  }
  load.running = false
  await Promise.all(workers)
  return { outcomes, client }
}

// Found by a review: an operation whose calls timed out learnt a need near its whole timeout, and
// was then sampled only by calls that found a connection free. While another operation's calls
// kept the connections busy, each of its calls waited a moment and was refused, nothing of it went
// out, nothing was learnt: refused for good against a Kernel answering it in 20 ms.
t.test('an operation that timed out is answered again once its Kernel recovers, while another keeps the connections busy', async t => {
  // Four callers keep getItem's calls coming on the two connections: one always waits.
  const { outcomes } = await recovery(t, { busyTimeoutMs: 2000, slowTimeoutMs: 300, callers: 4, warmMs: 200, calls: 20, gapMs: 150 })
  t.ok((outcomes.ok ?? 0) >= 10, `slowItem, answered in 20 ms again, is answered (${JSON.stringify(outcomes)})`)
})

// Found by a review of 5d09bc0: its probe goes out only with at least half the call's timeout
// left, so an operation whose calls timed out, and which then waits more than half its timeout
// behind other operations' calls (a queue those calls' longer timeouts let grow), was refused for
// good once its Kernel recovered, although it could be answered in the time it had left: nothing
// of it went out, so its estimate, about its whole timeout, never fell.
t.test('an operation that timed out is answered again once its Kernel recovers, while it waits over half its timeout for a connection', async t => {
  // 24 callers of getItem on two connections answering in 40 ms: each call waits about 440 ms,
  // over half slowItem's 800 ms, and has 360 left, far more than the 20 ms slowItem now takes.
  // Its estimate, 800 ms, is halved 3.2 s after the call that timed out (4 of its timeouts), and
  // again 3.2 s later, below the 360 ms its calls have left: from then on they go out.
  const { outcomes, client } = await recovery(t, { busyTimeoutMs: 5000, slowTimeoutMs: 800, callers: 24, warmMs: 1000, calls: 30, gapMs: 50 })
  t.ok((outcomes.ok ?? 0) >= 10, `slowItem, answered in 20 ms again, is answered (${JSON.stringify(outcomes)})`)
  t.equal(client.breaker!.state, 'closed')
})

// Found by a review of 4076ed6: an estimate goes stale once none of the operation's calls has been
// out for 4 of its timeouts (1 s at least), with no bound: one timeout of an operation allowed 600 s
// (its estimate then its whole timeout) refused every call of it that waited for a connection for
// 40 minutes, though its Kernel answered again at once. Here 4 s: 16 s uncapped.
t.test('an operation with a long timeout is answered again soon once its Kernel recovers, while another keeps the connections busy', async t => {
  const { outcomes, client } = await recovery(t, { busyTimeoutMs: 5000, slowTimeoutMs: 4000, callers: 6, warmMs: 5500, calls: 20, gapMs: 50 })
  t.ok((outcomes.ok ?? 0) >= 15, `slowItem, answered in 20 ms again, is answered (${JSON.stringify(outcomes)})`)
  t.equal(client.breaker!.state, 'closed')
})
