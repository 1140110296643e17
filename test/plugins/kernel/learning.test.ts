// The Kernel client's load shedding: what an operation's Kernel calls need, learnt from its answers (2xx and 4xx).
import t, { type Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { startTestKernel, json } from '../../helper.js'
import type { KernelClient } from '../../../plugins/kernel/client.js'
import type { Operation } from '../../../manifest.js'
import { itemClient, twoOperations } from './clients.js'

// Found by a review of f30a6d4: an operation learnt what its Kernel calls need from its 2xx
// answers alone, so one the Kernel answers with a 4xx (a lookup of what is not there, a
// conflict) never had an estimate of its own and asked the client's for good: another
// operation's slow answers (600 ms) refused every call of it handed a connection past capacity,
// though the Kernel answered it in 10 ms, while before f30a6d4 it asked nothing.
t.test('an operation its Kernel answers with 4xx learns its own need: another operation\'s slow answers do not refuse it', async t => {
  const { client, getItem, slowItem, call } = await twoOperations(t, {
    'GET /v1/slow/s1': (_req, res) => { setTimeout(() => json(res, 200, { id: 's1' }), 600) },
    'GET /v1/items/x1': (_req, res) => { setTimeout(() => json(res, 404, { message: 'no such item' }), 10) }
  }, 300, 2000)
  const fast = client.forOperation(getItem)
  const slow = client.forOperation(slowItem)
  // slowItem answers in 600 ms on one connection, again and again: the client's estimate is 600.
  const load = { running: true }
  const slowWorker = (async () => { while (load.running) await call(slow, slowItem, 's1') })()
  await sleep(1300)
  // Six callers of getItem share the other connection: each call waits a few of its 10 ms answers.
  const outcomes: Record<string, number> = {}
  const fastWorkers = Array.from({ length: 6 }, async () => {
    for (let i = 0; i < 30; i++) {
      const outcome = await call(fast, getItem, 'x1')
      outcomes[outcome] = (outcomes[outcome] ?? 0) + 1
    }
  })
  await Promise.all(fastWorkers)
  load.running = false
  await slowWorker
  t.ok((outcomes.NOT_FOUND ?? 0) >= 150, `getItem's calls are answered, 404 (${JSON.stringify(outcomes)})`)
  t.equal(client.breaker!.state, 'closed')
})

// Found by a review of 1ce2a29: a 4xx answer taught its operation's estimate as a 2xx does, so an
// operation the Kernel answers with fast 4xx and slow 2xx (a 404 in 5 ms for ids not there, a 200
// in 300 ms for the others, one call in 20) asked far less than its 2xx take: past capacity its
// 2xx calls went out with too little time left and timed out, sent (6 to 8 of 13 to 15 here, the
// Kernel's work thrown away, breaker failures), where before 1ce2a29 none did. A 4xx is now learnt
// only by an operation none of whose last 32 answers was a 2xx.
t.test('an operation the Kernel answers with fast 4xx and slow 2xx: its 2xx calls are not sent with too little time', async t => {
  const { CallContext } = await import('../../../plugins/pipeline/index.js')
  const kernel = await startTestKernel(t, {
    'GET /v1/items/p1': (_req, res) => { setTimeout(() => json(res, 200, { id: 'p1' }), 300) },
    'GET /v1/items/x1': (_req, res) => { setTimeout(() => json(res, 404, { message: 'no such item' }), 5) }
  })
  /** One run of 4 s on a new client: what the calls made after its first second came to. */
  const scenario = async (): Promise<{ late: Record<string, number>, client: KernelClient }> => {
    const { client, op, run } = await itemClient(t, kernel, { connections: 2, retries: 0, timeoutMs: 1000 })
    // About 20 ms a call on average, 100 a second on 2 connections: 140 a second are made for 4 s.
    const late: Record<string, number> = {}
    const pending: Array<Promise<void>> = []
    const start = performance.now()
    let made = 0
    while (performance.now() - start < 4000) {
      for (const due = Math.floor((performance.now() - start) / 7); made < due; made++) {
        const id = made % 20 === 0 ? 'p1' : 'x1'
        const after = performance.now() - start > 1000
        const count = (key: string): void => { if (after) late[`${id} ${key}`] = (late[`${id} ${key}`] ?? 0) + 1 }
        pending.push(run(new CallContext(`r${made}`, 'rest', op, { id }, undefined, undefined, undefined)).then(() => { count('ok') }, (err: { code: string }) => { count(err.code) }))
      }
      await sleep(5)
    }
    await Promise.all(pending)
    return { late, client }
  }
  const fewTimedOut = (late: Record<string, number>): boolean => (late['p1 KERNEL_TIMEOUT'] ?? 0) <= (late['p1 ok'] ?? 0) / 4
  // Up to three runs: on a loaded machine (the suite's other files on the same two cores) a
  // stalled event loop times a few calls out, sent in time, in one run and not the next; the
  // defect timed out about half of them in every run (6 to 8 of 13 to 15).
  let { late, client } = await scenario()
  for (let attempt = 1; attempt < 3 && !fewTimedOut(late); attempt++) ({ late, client } = await scenario())
  t.ok((late['p1 ok'] ?? 0) >= 4, `its 2xx calls are answered (${JSON.stringify(late)})`)
  t.ok(fewTimedOut(late), `few of those sent time out (${JSON.stringify(late)})`)
  t.ok((late['x1 NOT_FOUND'] ?? 0) >= 100, `its 4xx calls are answered (${JSON.stringify(late)})`)
  t.equal(client.breaker!.state, 'closed', 'the breaker never opened: the Kernel was healthy')
})

/**
 * getItem (timeout `timeoutMs`) answered 200 in `slowMs`, three calls learnt, then 404 in 10 ms
 * from now on, while four callers of slowItem (100 ms) keep both connections busy and the queue
 * never empty until `stop`.
 */
async function goneAfterSlow (t: Test, slowMs: number, timeoutMs: number): Promise<{ client: KernelClient, getItem: Operation, fast: ReturnType<KernelClient['forOperation']>, call: (run: ReturnType<KernelClient['forOperation']>, op: Operation, id: string) => Promise<string>, stop: () => Promise<void> }> {
  const state = { found: true }
  const { client, getItem, slowItem, call } = await twoOperations(t, {
    'GET /v1/slow/s1': (_req, res) => { setTimeout(() => json(res, 200, { id: 's1' }), 100) },
    'GET /v1/items/x1': (_req, res) => {
      if (state.found) setTimeout(() => json(res, 200, { id: 'x1' }), slowMs)
      else setTimeout(() => json(res, 404, { message: 'no such item' }), 10)
    }
  }, timeoutMs, 2000)
  const fast = client.forOperation(getItem)
  const slow = client.forOperation(slowItem)
  const first: string[] = []
  for (let i = 0; i < 3; i++) first.push(await call(fast, getItem, 'x1'))
  t.ok(first.includes('ok'), `getItem answered 200 (${first.join(', ')})`)
  state.found = false
  const load = { running: true }
  const slowWorkers = Array.from({ length: 4 }, async () => { while (load.running) await call(slow, slowItem, 's1') })
  return { client, getItem, fast, call, stop: async () => { load.running = false; await Promise.all(slowWorkers) } }
}

// Found by a review of 6df832b: a 4xx is learnt only once none of the operation's last 32 answers
// was a 2xx, and the answer to a stale estimate's probe that was such a 4xx, unlearnt, still ended
// the stale spell: an operation whose 2xx had been slow (250 ms) and which the Kernel then answered
// with 404 in 10 ms sent one call per stale spell (1.2 s here) while another operation's calls kept
// the connections busy, the rest refused, until 32 such 404s had come back (half a minute): 1 or 2
// of some 120 calls over 4 s answered. Such a probe's 4xx now leaves the estimate stale.
t.test('an operation answered with slow 2xx and then fast 4xx is not refused for long behind another operation', async t => {
  // getItem's Kernel answers it in 250 ms (its estimate about 250), then 404 in 10 ms; six callers
  // of getItem wait among slowItem's.
  const { client, getItem, fast, call, stop } = await goneAfterSlow(t, 250, 300)
  await sleep(700)
  const outcomes: Record<string, number> = {}
  const start = performance.now()
  const fastWorkers = Array.from({ length: 6 }, async () => {
    while (performance.now() - start < 6000) {
      const outcome = await call(fast, getItem, 'x1')
      outcomes[outcome] = (outcomes[outcome] ?? 0) + 1
      if (outcome !== 'NOT_FOUND') await sleep(5)
    }
  })
  await Promise.all(fastWorkers)
  await stop()
  // A probe's 404 now starts its estimate again at what the probe was asked for, halved by each 404
  // after it (73 to 133 answered); left stale, one call went out at a time (22 answered, 148
  // refused); before 3415ba0, one per stale spell.
  t.ok((outcomes.NOT_FOUND ?? 0) >= 12, `getItem's calls are answered, 404 (${JSON.stringify(outcomes)})`)
  t.equal(client.breaker!.state, 'closed')
})

// Found by a review of 6df832b: each manifest reload builds every operation's Kernel call again
// (forOperation), and each built a new estimate, so whatever an operation had learnt was lost and it
// asked the client's again, another operation's slow answers (600 ms): past capacity its calls
// were refused for spells after every reload, though its Kernel answered it in 10 ms.
t.test('a manifest reload keeps what an operation\'s Kernel calls need', async t => {
  const { client, getItem, slowItem, call } = await twoOperations(t, {
    'GET /v1/slow/s1': (_req, res) => { setTimeout(() => json(res, 200, { id: 's1' }), 600) },
    'GET /v1/items/x1': (_req, res) => { setTimeout(() => json(res, 200, { id: 'x1' }), 10) }
  }, 1000, 2000)
  const slow = client.forOperation(slowItem)
  // getItem learns 10 ms; four callers of slowItem (600 ms) keep both connections busy.
  const before = client.forOperation(getItem)
  for (let i = 0; i < 5; i++) await call(before, getItem, 'x1')
  const load = { running: true }
  const slowWorkers = Array.from({ length: 4 }, async () => { while (load.running) await call(slow, slowItem, 's1') })
  await sleep(3000)
  // A reload builds getItem's call again; six callers of it wait among four of slowItem's.
  const after = client.forOperation(getItem)
  const outcomes: Record<string, number> = {}
  await Promise.all(Array.from({ length: 6 }, async () => {
    for (let i = 0; i < 10; i++) {
      const outcome = await call(after, getItem, 'x1')
      outcomes[outcome] = (outcomes[outcome] ?? 0) + 1
    }
  }))
  load.running = false
  await Promise.all(slowWorkers)
  // Kept, as without a reload: none refused, 30 answered (the rest wait their whole timeout behind
  // slowItem's calls). Lost, 30 were refused for another operation's slow answers, 12 answered.
  // Halfway between: on a machine loaded by other work (a CI run beside four test sessions), the
  // event loop's lag made some of the 10 ms answers look slow, and 10 were refused, the estimate
  // kept all the same.
  t.ok((outcomes.KERNEL_UNAVAILABLE ?? 0) <= 15, `getItem's calls are not refused after the reload (${JSON.stringify(outcomes)})`)
  t.ok((outcomes.ok ?? 0) >= 20, `getItem's calls are answered after the reload (${JSON.stringify(outcomes)})`)
  t.equal(client.breaker!.state, 'closed')
})

// Found by a review of 4076ed6: before its first answer an operation asks the client's estimate,
// which other operations' answers teach, uncapped by its own timeout: an operation of 200 ms whose
// calls waited behind other calls asked 2,000 ms (another operation's answers), more than any of its
// calls could ever have, and was refused everything until that was halved below its calls' time
// left, one halving a second: 4 s here, though its Kernel answered it in 10 ms. (A free connection
// sends a call whatever it asks; here 429s of slowItem's, which teach nothing, keep both busy.)
t.test('an operation with no answer yet and a short timeout is not refused for long for another operation\'s slow answers', async t => {
  const scenario = async (): Promise<{ outcomes: Record<string, number>, breaker: string }> => {
    const { client, getItem, slowItem, call } = await twoOperations(t, {
      'GET /v1/slow/s1': (_req, res) => { setTimeout(() => json(res, 200, { id: 's1' }), 2000) },
      'GET /v1/slow/b1': (_req, res) => { setTimeout(() => json(res, 429, { message: 'slow down' }), 40) },
      'GET /v1/items/x1': (_req, res) => { setTimeout(() => json(res, 200, { id: 'x1' }), 10) }
    }, 200, 5000)
    const slow = client.forOperation(slowItem)
    // slowItem answered in 2 s: the client's estimate is 2,000 ms.
    t.equal(await call(slow, slowItem, 's1'), 'ok')
    // Six callers of slowItem answered 429 in 40 ms keep both connections busy and the queue never
    // empty; then getItem's first calls (an operation whose Kernel call was just built: a start)
    // wait among them, for about 100 ms of their 200.
    const load = { running: true }
    const busy = Array.from({ length: 6 }, async () => { while (load.running) await call(slow, slowItem, 'b1') })
    await sleep(200)
    const fast = client.forOperation(getItem)
    const outcomes: Record<string, number> = {}
    const start = performance.now()
    await Promise.all(Array.from({ length: 6 }, async () => {
      while (performance.now() - start < 3000) {
        const outcome = await call(fast, getItem, 'x1')
        outcomes[outcome] = (outcomes[outcome] ?? 0) + 1
        if (outcome !== 'ok') await sleep(5)
      }
    }))
    load.running = false
    await Promise.all(busy)
    return { outcomes, breaker: client.breaker!.state }
  }
  // Capped by its own timeout (less 10 ms), what it asks is below its calls' time left after one or
  // two halvings; uncapped, it stays over its timeout for 3 s, and none is sent. (65 answered on a
  // quiet machine, 18 and 19 in two loaded CI runs, 3 in a third: at least 5, against none without
  // the cap.) Up to three runs, as above: the clean-clone run of f644e27 on this slow AMD VM failed
  // it with 3 answered (107 refused, 6 timed out), its calls' time eaten by a loaded event loop;
  // without the cap every run answers none.
  let { outcomes, breaker } = await scenario()
  for (let attempt = 1; attempt < 3 && (outcomes.ok ?? 0) < 5; attempt++) ({ outcomes, breaker } = await scenario())
  t.ok((outcomes.ok ?? 0) >= 5, `getItem's calls are answered within 3 s (${JSON.stringify(outcomes)})`)
  t.equal(breaker, 'closed')
})

// Found by a review of 3415ba0: a stale estimate's probe answered with a 4xx not learnt (fewer than
// 32 since its last 2xx) left the estimate stale, halved, but asked in full while the probe was out,
// so after the first stale spell one call of the operation went out at a time, each once the one
// before was answered, and every other call of it was refused, until 32 such 4xx had come back: an
// operation whose 2xx took 250 ms, then answered 404 in 10 ms, had 148 of 171 calls refused over
// 6 s. Such a probe's 4xx now starts the estimate again at what the probe was asked for, and each
// such 4xx after it halves it again (down to the 4xx's own time) until a 2xx, a timeout or a 4xx
// learnt sets it. Here, of the calls made after the first 404: 67 of 111 and 85 of 123 refused
// without, 0 of 101 and 9 of 85 with.
t.test('an operation answered with slow 2xx and then fast 4xx: once a probe is answered 404, its calls are no longer refused', async t => {
  // getItem learns 400 ms (of its 500); then its item is gone (404 in 10 ms); ten callers of
  // getItem wait among slowItem's (some 150 ms each) for 5 s: refused until its estimate goes
  // stale (2 s).
  const { client, getItem, fast, call, stop } = await goneAfterSlow(t, 400, 500)
  const before: Record<string, number> = {}
  const after: Record<string, number> = {}
  const start = performance.now()
  await Promise.all(Array.from({ length: 10 }, async () => {
    while (performance.now() - start < 5000) {
      const outcome = await call(fast, getItem, 'x1')
      // Counted from the first 404 on: the first stale spell refuses them all, by design.
      const counts = (after.NOT_FOUND ?? 0) > 0 || outcome === 'NOT_FOUND' ? after : before
      counts[outcome] = (counts[outcome] ?? 0) + 1
      if (outcome !== 'NOT_FOUND') await sleep(5)
    }
  }))
  await stop()
  const outcomes = JSON.stringify({ before, after })
  t.ok((after.NOT_FOUND ?? 0) > 0, `one of getItem's calls goes out and is answered 404 (${outcomes})`)
  t.ok((after.KERNEL_UNAVAILABLE ?? 0) <= (after.NOT_FOUND ?? 0) / 4, `then few of its calls are refused (${outcomes})`)
  t.equal(client.breaker!.state, 'closed')
})

/**
 * getItem (500 ms timeout, 4 connections) answered 200 three times (so its 404s are not learnt),
 * then a call of it that hangs, timed out: its estimate backed off to its timeout less 10 ms.
 * Then eight callers of slowItem keep the connections busy, getItem's calls waiting among them,
 * through its stale spell (2 s), which halves its estimate. `kernel.hung`: getItem's calls sent
 * to hang since (h1); x1 is answered 404 in 10 ms. `hangSix`: six calls of h1 at once, their outcomes by code.
 */
async function timedOutBehindLoad (t: Test): Promise<Awaited<ReturnType<typeof twoOperations>> & { fast: ReturnType<KernelClient['forOperation']>, kernel: { hung: number }, stopLoad: () => Promise<void>, hangSix: () => Promise<Record<string, number>> }> {
  const kernel = { hung: 0 }
  const two = await twoOperations(t, {
    'GET /v1/slow/s1': (_req, res) => { setTimeout(() => json(res, 200, { id: 's1' }), 100) },
    'GET /v1/items/p1': (_req, res) => { setTimeout(() => json(res, 200, { id: 'p1' }), 20) },
    'GET /v1/items/h1': () => { kernel.hung++ },
    'GET /v1/items/x1': (_req, res) => { setTimeout(() => json(res, 404, { message: 'no such item' }), 10) }
  }, 500, 2000, 4)
  const { client, getItem, slowItem, call } = two
  const fast = client.forOperation(getItem)
  const slow = client.forOperation(slowItem)
  for (let i = 0; i < 3; i++) t.equal(await call(fast, getItem, 'p1'), 'ok')
  t.equal(await call(fast, getItem, 'h1'), 'KERNEL_TIMEOUT')
  kernel.hung = 0
  const load = { running: true }
  const slowWorkers = Array.from({ length: 8 }, async () => { while (load.running) await call(slow, slowItem, 's1') })
  await sleep(2100)
  const hangSix = async (): Promise<Record<string, number>> => {
    const outcomes: Record<string, number> = {}
    await Promise.all(Array.from({ length: 6 }, async () => {
      const outcome = await call(fast, getItem, 'h1')
      outcomes[outcome] = (outcomes[outcome] ?? 0) + 1
    }))
    return outcomes
  }
  return { ...two, fast, kernel, hangSix, stopLoad: async () => { load.running = false; await Promise.all(slowWorkers) } }
}

// Left open by the review of 16f8183: a stale estimate's probe answered with a 4xx not learnt
// starts the estimate again at what the probe was asked for (half the stale estimate), and the
// operation then asked that while its calls were out. After a timeout had backed its estimate off
// (its Kernel hanging on the 2xx calls), every call of it handed a connection with half that left
// went out while the first of them hung: one hung call per connection, each a timeout. While one
// of its calls is out it now asks what the timeout backed it off to, until an answer it learns
// from (or the descent reaches its 4xx's own time). Here, 4 connections, 6 calls that hang after
// such a probe: 4 sent and timed out without (8 connections: 6, and the breaker opened); 1 with.
t.test('after a timeout, a probe answered 404 does not send an operation\'s calls to hang on every connection', async t => {
  const { client, fast, getItem, call, kernel, stopLoad, hangSix } = await timedOutBehindLoad(t)
  // The probe that goes out after its stale spell is answered 404.
  t.equal(await call(fast, getItem, 'x1'), 'NOT_FOUND', 'the probe is answered 404')
  const outcomes = await hangSix()
  await stopLoad()
  const hung = kernel.hung
  t.ok(hung <= 1, `one call at most goes out to hang (${hung} sent, ${JSON.stringify(outcomes)})`)
  t.ok((outcomes.KERNEL_UNAVAILABLE ?? 0) >= 5, `the others are refused unsent (${JSON.stringify(outcomes)})`)
  t.equal(client.breaker!.state, 'closed')
})

// A later timeout of a call sent with little time left (it had waited for a connection, or came
// late from the pipeline) during that descent set the remembered backoff to twice that call's
// time: the 490 ms the operation's calls were known to hang for was lost, and its next calls, with
// more than that left, went out to hang one per connection while the first hung. A timeout never
// lowers it now.
t.test('during a 404 descent after a timeout, a call timed out with little time left keeps what the first timeout backed the estimate off to', async t => {
  const { CallContext } = await import('../../../plugins/pipeline/index.js')
  const { fast, getItem, call, kernel, stopLoad, hangSix } = await timedOutBehindLoad(t)
  // The probe (asked 245 ms) and the 404s after it take the estimate down to 61 ms.
  for (let i = 0; i < 3; i++) t.equal(await call(fast, getItem, 'x1'), 'NOT_FOUND', 'a 404')
  kernel.hung = 0
  // A call that comes 220 ms late hangs with what it has left once handed a connection (80 to 180 ms).
  // On a loaded machine the wait for a connection can be foreseen past that, and the call refused
  // unsent (KERNEL_UNAVAILABLE, nothing learnt from it): another late call is made then, up to 5.
  let lateOutcome = ''
  for (let attempt = 0; attempt < 5 && lateOutcome !== 'KERNEL_TIMEOUT'; attempt++) {
    const late = new CallContext('h1', 'rest', getItem, { id: 'h1' }, undefined, undefined, undefined)
    ;(late as { startedAt: number }).startedAt -= 220
    lateOutcome = await fast(late).then(() => 'ok', (err: { code: string }) => err.code)
    if (lateOutcome !== 'KERNEL_UNAVAILABLE' || kernel.hung > 0) break
  }
  t.equal(lateOutcome, 'KERNEL_TIMEOUT', `the late call goes out and times out (${lateOutcome}, ${kernel.hung} sent)`)
  const sentLate = kernel.hung
  const outcomes = await hangSix()
  await stopLoad()
  const hung = kernel.hung
  t.ok(hung - sentLate <= 1, `one call at most of the next 6 goes out to hang (${hung - sentLate} sent, ${JSON.stringify(outcomes)})`)
  t.ok((outcomes.KERNEL_UNAVAILABLE ?? 0) >= 5, `the others are refused unsent (${JSON.stringify(outcomes)})`)
})
