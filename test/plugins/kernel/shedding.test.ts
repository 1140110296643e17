// The Kernel client past capacity: calls refused unsent rather than sent with too little time.
import t, { type Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { spawn } from 'node:child_process'
import { connect, type Socket } from 'node:net'
import { buildTestApp, startTestKernel, testManifest, bearer, json } from '../../helper.js'
import type { KernelClient, KernelMetrics } from '../../../plugins/kernel/client.js'
import type { Operation } from '../../../manifest.js'
import { item, idInput, hits, itemClient } from './clients.js'

// Calls of a burst share about one deadline: the holder that timed out handed its connection on
// before the next one's timer fired, and that call went out with no time left, was aborted while
// undici reconnected, and counted as a Kernel timeout. Three such calls opened the breaker on a
// Kernel that answered each request in 100 ms.
/**
 * A host that drops connection attempts (a blackholed address): a process listening with a
 * backlog of one, stopped, its backlog filled: the system completes no further handshake.
 */
async function blackhole (t: Test): Promise<{ port: number, release: () => void }> {
  const child = spawn(process.execPath, ['-e', "const s = require('net').createServer().listen({ port: 0, host: '127.0.0.1', backlog: 1 }, () => { console.log(s.address().port); process.kill(process.pid, 'SIGSTOP') })"], { stdio: ['ignore', 'pipe', 'inherit'] })
  const port = await new Promise<number>(resolve => child.stdout.once('data', (d: Buffer) => resolve(Number(String(d).trim()))))
  await sleep(100)
  const fill: Socket[] = []
  for (let i = 0; i < 4; i++) { const s = connect(port, '127.0.0.1'); s.on('error', () => {}); fill.push(s) }
  const release = (): void => { child.kill('SIGKILL'); for (const s of fill) s.destroy() }
  t.teardown(release)
  await sleep(100)
  return { port, release }
}

t.test('a Kernel host that drops connection attempts opens the breaker, whatever the timeout (the calls were never sent)', async t => {
  const { port, release } = await blackhole(t)
  const m = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: item, timeoutMs: 300 }
  }, { retries: 0, connections: 4, circuitBreaker: { threshold: 3, resetTimeoutMs: 60_000 } })
  const app = await buildTestApp(t, {}, { manifest: m, kernelUrl: `http://127.0.0.1:${port}` })
  // Teardowns run last registered first: the host goes away before the app closes, which refuses
  // the connection attempts still pending (closing the app waited out undici's 2 s connect timeout).
  t.teardown(release)
  const codes: string[] = []
  for (let i = 0; i < 5; i++) codes.push((await app.inject({ url: '/api/v1/items/x', headers: bearer() })).json().code)
  // Before, a call whose time ran out while undici still opened its connection (connect timeout
  // 2 s) was a queue timeout, no breaker failure: the breaker never opened, /readyz stayed up.
  t.same(codes, ['KERNEL_TIMEOUT', 'KERNEL_TIMEOUT', 'KERNEL_TIMEOUT', 'KERNEL_UNAVAILABLE', 'KERNEL_UNAVAILABLE'], 'three timeouts open the breaker')
  t.equal(app.kernel.breakerState(), 'open')
  t.equal((await app.inject({ url: '/readyz' })).statusCode, 503, 'not ready')
})

t.test('calls of a burst handed a connection as their time runs out are refused unsent, not Kernel timeouts', async t => {
  // Answers in 400 ms against a 1000 ms deadline: two answered; the third, handed the connection
  // with 200 ms left, less than the 400 ms the Kernel needs, is refused unsent (it went out and
  // timed out), and so are the last three (a margin a busy machine's timers keep; at 100 against
  // 250 ms, a loaded run failed it).
  const kernel = await startTestKernel(t, { 'GET /v1/items/b1': (_req, res) => { setTimeout(() => json(res, 200, { id: 'b1' }), 400) } })
  const manifest = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: item, timeoutMs: 1000 }
  }, { retries: 0, connections: 1, maxInFlight: 100, circuitBreaker: { threshold: 3, resetTimeoutMs: 60_000 } })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  const res = await Promise.all(Array.from({ length: 6 }, async () => await app.inject({ url: '/api/v1/items/b1', headers: bearer() })))
  const codes = res.map(r => r.statusCode)
  // Two answered on a quiet machine ([200, 200, 503, 503, 503, 503]); on a loaded one the first
  // answer may come late enough that the second is refused too: what holds either way is that
  // what went out was answered, and what could not be was refused unsent, from some call on.
  const answered = codes.lastIndexOf(200) + 1
  t.ok(answered >= 1 && answered <= 2, `the first ${answered} answered (${codes.join(', ')})`)
  t.same(codes, [...Array(answered).fill(200), ...Array(6 - answered).fill(503)], 'then every other refused')
  t.same(res.slice(answered).map(r => [r.json().code, r.headers['retry-after']]), Array(6 - answered).fill(['KERNEL_UNAVAILABLE', '1']), 'load shed, as by a full bulkhead')
  t.equal(hits(kernel, '/v1/items/b1'), answered, 'the refused ones never went out')
  t.equal(app.kernel.breakerState(), 'closed', 'no Kernel timeout')
  const metrics = (await app.inject({ url: '/metrics' })).body.split('\n')
  t.same(metrics.filter(l => /^mantle_kernel_(rejected_total\{reason="queue_(timeout|shed)"\}|request_duration_seconds_count\{op="getItem",outcome="timeout"\}) /.test(l)).sort(),
    [`mantle_kernel_rejected_total{reason="queue_shed"} ${6 - answered}`])
})

// Congestion collapse (found by a review): past capacity, the queue for a connection grew until
// its head had waited nearly its whole timeout; from then on every call went out with less time
// left than the Kernel needs and timed out (sent: the Kernel did the work, its answer was thrown
// away, its connection closed), the breaker opened on a healthy Kernel, and no call was answered.
t.test('past capacity, a call handed a connection with less time left than the Kernel needs is refused unsent: answers keep coming, the breaker stays closed', async t => {
  const { CallContext } = await import('../../../plugins/pipeline/index.js')
  // 100 ms a call on 2 connections: 20 calls a second; 40 a second are sent for 2.5 s.
  const kernel = await startTestKernel(t, { 'GET /v1/items/q1': (_req, res) => { setTimeout(() => json(res, 200, { id: 'q1' }), 100) } })
  const { client, op, run, rejected } = await itemClient(t, kernel, { connections: 2, retries: 0, timeoutMs: 500 })
  // Outcomes of the calls made once the queue has filled (its head waits 400 ms after 0.4 s).
  const late: Record<string, number> = {}
  const refusals: Array<Record<string, string> | undefined> = []
  const pending: Array<Promise<void>> = []
  const start = performance.now()
  let made = 0
  while (performance.now() - start < 2500) {
    for (const due = Math.floor((performance.now() - start) / 25); made < due; made++) {
      const after = performance.now() - start > 1000
      const count = (key: string): void => { if (after) late[key] = (late[key] ?? 0) + 1 }
      pending.push(run(new CallContext(`r${made}`, 'rest', op, { id: 'q1' }, undefined, undefined, undefined)).then(() => { count('ok') }, (err: { code: string, headers?: Record<string, string> }) => {
        count(err.code)
        if (err.code === 'KERNEL_UNAVAILABLE') refusals.push(err.headers)
      }))
    }
    await sleep(5)
  }
  await Promise.all(pending)
  t.ok((late.ok ?? 0) >= 10, `calls made after the queue filled are still answered (${JSON.stringify(late)})`)
  t.equal(client.breaker!.state, 'closed', 'the breaker never opened: the Kernel was healthy')
  t.equal(rejected.breaker_open, undefined, 'no call was refused for an open breaker')
  t.ok((rejected.queue_shed ?? 0) > 0, `the calls that could not finish were refused unsent (${JSON.stringify(rejected)})`)
  t.equal(refusals.length, rejected.queue_shed, 'as KERNEL_UNAVAILABLE')
  t.ok(refusals.every(h => h?.['retry-after'] === '1'), 'with Retry-After, as a full bulkhead')
})

// Found by a review of the test above: what an operation needs was learnt only while calls
// waited, and its deviation grew on a faster answer as on a slower one. After a cold burst at
// 800 ms the estimate rose above the time a waiting call has left on the Kernel's first fast
// answer; every waiting call was refused at once, so no call waited when the others came back,
// and nothing more was learnt: every burst had its waiting calls refused against a Kernel
// answering in 20 ms, for as long as it went on.
t.test('after a cold burst of slow answers, a Kernel that gets fast has its bursts answered', async t => {
  const { CallContext } = await import('../../../plugins/pipeline/index.js')
  let served = 0
  const kernel = await startTestKernel(t, { 'GET /v1/items/w1': (_req, res) => { setTimeout(() => json(res, 200, { id: 'w1' }), served++ < 2 ? 800 : 20) } })
  const { op, run } = await itemClient(t, kernel, { connections: 2, retries: 0, timeoutMs: 1000 })
  let made = 0
  const burst = async (n: number): Promise<string[]> => await Promise.all(Array.from({ length: n }, async () =>
    await run(new CallContext(`c${made++}`, 'rest', op, { id: 'w1' }, undefined, undefined, undefined)).then(() => 'ok', (err: { code: string }) => err.code)))
  // Cold: two answered in 800 ms; the third, handed a connection with 200 ms left, is refused.
  t.same(await burst(3), ['ok', 'ok', 'KERNEL_UNAVAILABLE'], 'the cold burst: the call that could not be answered in time is refused')
  const outcomes: Record<string, number> = {}
  for (let i = 0; i < 6; i++) {
    for (const outcome of await burst(6)) outcomes[outcome] = (outcomes[outcome] ?? 0) + 1
    await sleep(200)
  }
  t.same(outcomes, { ok: 36 }, 'every call of the fast bursts is answered')
})

t.test('what an operation needs falls with a faster Kernel, and rises with a slower one', async t => {
  const { Need } = await import('../../../plugins/kernel/client.js')
  const need = new Need()
  for (let i = 0; i < 3; i++) need.observe(800)
  t.equal(need.ms, 800)
  need.observe(20)
  t.ok(need.ms <= 800, `a faster answer never raises it (${need.ms})`)
  let samples = 1
  while (need.ms > 100 && samples < 100) { need.observe(20); samples++ }
  t.ok(samples <= 40, `fast answers bring it down (${samples} to below 100 ms)`)
  need.observe(800)
  t.ok(need.ms > 400 && need.ms <= 800, `a slow answer raises it at once, never above the slowest answer (${need.ms})`)
  const slower = new Need()
  for (let i = 0; i < 20; i++) slower.observe(100)
  const before = slower.ms
  for (let i = 0; i < 5; i++) slower.timedOut(before + 50 * (i + 1))
  t.ok(slower.ms > before + 100, `attempts sent that timed out raise it, as the Kernel gets slower (${before} to ${slower.ms})`)
  // Answers spread over 50-150 ms: what it asks is above nearly all of them (the estimator whose
  // mean fell faster than it rose asked less than a quarter of them took).
  const spread = new Need()
  let above = 0
  let x = 7
  for (let i = 0; i < 4000; i++) {
    x = (x * 1103515245 + 12345) % 2147483648
    const ms = 50 + 100 * x / 2147483648
    if (i >= 1000 && ms > spread.ms) above++
    spread.observe(ms)
  }
  t.ok(above / 3000 < 0.12, `answers over it: ${(100 * above / 3000).toFixed(1)}%`)
})

// A retry waits for a connection like any attempt; refused so, it answered 503 "Too many calls
// are waiting" and the Kernel's own failure was lost.
t.test('a retry that would be refused for want of time ends the call with the failure it retried', async t => {
  const { CallContext } = await import('../../../plugins/pipeline/index.js')
  const kernel = await startTestKernel(t, {
    'GET /v1/items/f1': (_req, res) => { setTimeout(() => json(res, 500, { message: 'boom' }), 100) },
    'GET /v1/items/s1': (_req, res) => { setTimeout(() => json(res, 200, { id: 's1' }), 700) },
    'GET /v1/items/s2': (_req, res) => { setTimeout(() => json(res, 200, { id: 's2' }), 1300) }
  })
  const { op, run, rejected } = await itemClient(t, kernel, { connections: 1, retries: 1, timeoutMs: 1000 })
  const outcome = async (id: string): Promise<unknown> => await run(new CallContext(id, 'rest', op, { id }, undefined, undefined, undefined)).then(() => 'ok', (err: { code: string, message: string }) => [err.code, err.message])
  // f1 fails in 100 ms; its retry waits behind s1, which needs 700 ms: handed the connection with
  // about 200 ms left, the retry is not sent.
  const [failed, slow] = await Promise.all([outcome('f1'), outcome('s1')])
  t.equal(slow, 'ok')
  t.same(failed, ['KERNEL_ERROR', 'The Kernel failed (status 500)'], 'the Kernel\'s 5xx, not a 503 for calls waiting')
  t.equal(hits(kernel, '/v1/items/f1'), 1, 'the retry was not sent')
  t.same(rejected, {}, 'the call reached the Kernel: no refusal counted')
  // Behind a call that holds the connection past the deadline, the retry's time runs out while it
  // waits: it answered 504 KERNEL_TIMEOUT, counted queue_timeout, and the 5xx was lost.
  const [failedAgain, held] = await Promise.all([outcome('f1'), outcome('s2')])
  t.same(held, ['KERNEL_TIMEOUT', 'The Kernel did not answer within 1000 ms'])
  t.same(failedAgain, ['KERNEL_ERROR', 'The Kernel failed (status 500)'], 'the Kernel\'s 5xx, not a timeout waiting for a connection')
  t.equal(rejected.queue_timeout, undefined, 'no refusal counted')
})

// The time a retry has left was checked before its backoff only, as planned: a busy event loop
// fires the backoff's timer late, and the retry went out with whatever was left (to time out, a
// breaker failure), or, with nothing left, the call answered 504 KERNEL_TIMEOUT for the Kernel's 5xx.
t.test('a retry whose backoff ends late, without the failed attempt\'s time left, is not sent: the call answers the 5xx', async t => {
  const { CallContext } = await import('../../../plugins/pipeline/index.js')
  const kernel = await startTestKernel(t, { 'GET /v1/items/f1': (_req, res) => { json(res, 500, { message: 'boom' }) } })
  const { op, run, client } = await itemClient(t, kernel, { connections: 1, retries: 1, timeoutMs: 1000 })
  // The backoff's draw blocks the event loop past the deadline once its timer is set (the loop's
  // next check phase): the timer fires late, as on a loaded machine.
  const random = Math.random
  t.teardown(() => { Math.random = random })
  Math.random = () => {
    Math.random = random
    setImmediate(() => { const until = performance.now() + 1500; while (performance.now() < until); })
    return 0.5
  }
  const outcome = await run(new CallContext('f1', 'rest', op, { id: 'f1' }, undefined, undefined, undefined)).then(() => 'ok', (err: { code: string, message: string }) => [err.code, err.message])
  t.same(outcome, ['KERNEL_ERROR', 'The Kernel failed (status 500)'], 'the Kernel\'s 5xx (before: 504 KERNEL_TIMEOUT)')
  t.equal(hits(kernel, '/v1/items/f1'), 1, 'the retry was not sent')
  t.equal(client.inFlight, 0)
})

// Found by a review of 1cd5562: a call is refused for want of time only while its operation's
// estimate is learning (one of its calls out, or one ended within 100 ms). Past capacity with
// many operations sharing the connections, each operation's calls are far apart in the queue:
// none of its calls is out when its next one is handed a connection, so that call went out with
// the little time left it had and timed out, sent, as before the load shedding.
t.test('past capacity with many operations, a call handed a connection with less time left than the Kernel needs is still refused unsent', async t => {
  const { KernelClient } = await import('../../../plugins/kernel/index.js')
  // 100 ms a call on 2 connections: 20 calls a second; 40 a second, over 8 operations, for 2.5 s.
  const kernel = await startTestKernel(t, { 'GET /v1/items/q1': (_req, res) => { setTimeout(() => json(res, 200, { id: 'q1' }), 100) } })
  const rejected: Record<string, number> = {}
  const nothing = (): void => {}
  const calls = { ok: nothing, client_error: nothing, redirect: nothing, bad_answer: nothing, server_error: nothing, timeout: nothing, unavailable: nothing, client_closed: nothing }
  const metrics: KernelMetrics = { forOperation: () => ({ call: calls, retry: nothing }), budgetExhausted: nothing, rejected: (reason: string) => { rejected[reason] = (rejected[reason] ?? 0) + 1 }, answerDropped: nothing, connected: nothing }
  const client = new KernelClient({ origin: kernel.url, connections: 2, retries: 0, maxInFlight: 1000, resilience: { threshold: 5, resetTimeoutMs: 60_000 }, metrics })
  t.teardown(() => client.close())
  const names = Array.from({ length: 8 }, (_, i) => `get${i}`)
  const m = testManifest(Object.fromEntries(names.map(name =>
    [name, { type: 'query', rest: `GET /${name}/:id`, kernel: 'GET /v1/items/{id}', input: idInput, output: item, timeoutMs: 500 }])))
  const ops = names.map(name => m.byName.get(name)!)
  const late = await drive(client, ops, 2500, 'q1')
  t.ok((late.ok ?? 0) >= 10, `calls made after the queue filled are still answered (${JSON.stringify(late)})`)
  t.ok((late.KERNEL_TIMEOUT ?? 0) <= (late.ok ?? 0) / 4, `few of them time out (${JSON.stringify(late)}, ${JSON.stringify(rejected)})`)
  t.equal(client.breaker!.state, 'closed', 'the breaker never opened: the Kernel was healthy')
})

/** Calls of `ops` (round robin) on `client`, one every 25 ms for `ms`: the outcomes of those made after the first second. */
async function drive (client: KernelClient, ops: Operation[], ms: number, id: string): Promise<Record<string, number>> {
  const { CallContext } = await import('../../../plugins/pipeline/index.js')
  const runs = ops.map(op => client.forOperation(op))
  const late: Record<string, number> = {}
  const pending: Array<Promise<void>> = []
  const start = performance.now()
  let made = 0
  while (performance.now() - start < ms) {
    for (const due = Math.floor((performance.now() - start) / 25); made < due; made++) {
      const after = performance.now() - start > 1000
      const count = (key: string): void => { if (after) late[key] = (late[key] ?? 0) + 1 }
      const i = made % ops.length
      const ctx = new CallContext(`r${made}`, 'rest', ops[i], { id }, undefined, undefined, undefined)
      // A KERNEL_TIMEOUT never sent (a queue timeout) is counted apart from Kernel timeouts of calls sent.
      pending.push(runs[i](ctx).then(() => { count('ok') }, (err: { code: string }) => { count(err.code === 'KERNEL_TIMEOUT' && ctx.sent !== true ? 'KERNEL_TIMEOUT_unsent' : err.code) }))
    }
    await sleep(5)
  }
  await Promise.all(pending)
  return late
}

// Found by a review of 5d09bc0: with 32 operations from a cold start, each operation's first
// calls were sent whatever they had left (nothing is known of it before its first answer), and
// its calls are answered far apart, so that those sent on an estimate gone stale went out with
// the little time they had left: they timed out, the breaker opened, and nothing was answered
// (before 5d09bc0 and after it alike). An operation with no answer yet now asks what the client's
// answers of every operation need, and a stale estimate is halved, not dropped.
t.test('past capacity with 32 operations from a cold start, the calls sent are answered and the breaker stays closed', async t => {
  const { KernelClient } = await import('../../../plugins/kernel/index.js')
  // 100 ms a call on 2 connections: 20 calls a second; 40 a second, over 32 operations, for 5 s.
  const kernel = await startTestKernel(t, { 'GET /v1/items/q1': (_req, res) => { setTimeout(() => json(res, 200, { id: 'q1' }), 100) } })
  const client = new KernelClient({ origin: kernel.url, connections: 2, retries: 0, maxInFlight: 1000, resilience: { threshold: 5, resetTimeoutMs: 60_000 } })
  t.teardown(() => client.close())
  const names = Array.from({ length: 32 }, (_, i) => `get${i}`)
  const m = testManifest(Object.fromEntries(names.map(name =>
    [name, { type: 'query', rest: `GET /${name}/:id`, kernel: 'GET /v1/items/{id}', input: idInput, output: item, timeoutMs: 500 }])))
  const ops = names.map(name => m.byName.get(name)!)
  const late = await drive(client, ops, 5000, 'q1')
  t.ok((late.ok ?? 0) >= 20, `calls made after the queue filled are still answered (${JSON.stringify(late)})`)
  t.ok((late.KERNEL_TIMEOUT ?? 0) <= (late.ok ?? 0) / 4, `few of them time out (${JSON.stringify(late)})`)
  t.ok((late.KERNEL_UNAVAILABLE ?? 0) > 0, 'the excess is refused')
  t.equal(client.breaker!.state, 'closed', 'the breaker never opened: the Kernel was healthy')
})

// Found by a helper measuring the test above on a loaded machine (two busy loops): 8 to 16 of
// some 70 calls sent timed out, 2 runs of 6 failed it, and a run opened the breaker. Nearly every
// one was a stale estimate's probe, sent with half an estimate that was right (about 110 ms asked
// 55, against a Kernel taking 100 ms or more): with 32 operations past capacity, an operation's
// calls rarely go out, so its estimate goes stale (2 s) though every operation's answers show what
// the Kernel takes, and 32 operations sent up to 16 such probes a second against a capacity of 20.
// A halving that would take an estimate below the client's, while that one is fresh (learnt
// within the stale spell) and within the operation's timeout, now waits one more spell: the
// probes that still go out are halved once, a spell late, so none is refused for good.
t.test('a stale estimate is not halved below the client\'s fresh estimate until a spell later', async t => {
  const { Need } = await import('../../../plugins/kernel/client.js')
  const client = new Need()
  const op = new Need(client)
  const other = new Need(client)
  op.observe(100)
  t.equal(op.asks(performance.now(), 200), 100, 'fresh: its estimate')
  // One stale spell (1 s for a 200 ms timeout) without a lesson of its own; another operation's
  // answer keeps the client's estimate fresh, at 100 ms.
  await sleep(1100)
  other.observe(100)
  t.equal(op.asks(performance.now(), 200), 100, 'stale one spell: not halved below the client\'s fresh estimate')
  t.equal(op.asks(performance.now(), 90), 50, 'unless the client\'s estimate is over what the operation\'s timeout lets it have')
  await sleep(1000)
  other.observe(100)
  t.equal(op.asks(performance.now(), 200), 50, 'stale two spells: halved once, a spell late (never refused for good)')
  // The client's estimate gone stale too: halved for each spell, as before.
  t.equal(op.asks(performance.now() + 1000, 200), 12.5, 'stale three spells, the client\'s estimate too: halved three times')
})

t.test('past capacity, a Kernel that gets slower bit by bit keeps answering: the estimate follows it', async t => {
  // From 40 to 240 ms over 4 s, on 2 connections, with calls coming 40 a second: past capacity
  // from 50 ms on, each call's Kernel answer a little slower than the one before.
  const start = performance.now()
  const kernel = await startTestKernel(t, {
    'GET /v1/items/g1': (_req, res) => { setTimeout(() => json(res, 200, { id: 'g1' }), 40 + 200 * Math.min(1, (performance.now() - start) / 4000)) }
  })
  const { client, op, rejected } = await itemClient(t, kernel, { connections: 2, retries: 0, timeoutMs: 500 })
  const late = await drive(client, [op], 4500, 'g1')
  t.ok((late.ok ?? 0) >= 20, `calls made after the first second are still answered (${JSON.stringify(late)})`)
  // Each answer a little slower than the one before: a timeout doubles what the operation asks
  // until its next answer (2 to 4 of about 37 sent time out here); raised only to the time the
  // timed-out call had, the estimate lagged, 2 to 13 timed out and the breaker opened in some runs.
  t.ok((late.KERNEL_TIMEOUT ?? 0) < (late.ok ?? 0), `most of those sent are answered (${JSON.stringify(late)})`)
  t.ok((rejected.queue_shed ?? 0) > 0, 'the excess is refused unsent')
  t.equal(client.breaker!.state, 'closed', 'the breaker never opened: the Kernel was slow, not down')
})
