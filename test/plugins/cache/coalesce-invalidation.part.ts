// Coalescing and invalidation: concurrent misses of one key wait for one Kernel call, but a read
// that begins after an invalidation of the key's tags never waits for a call that began before
// it (that call may have read what the mutation changed). It makes a call of its own.
import t from 'tap'
import { randomUUID } from 'node:crypto'
import { buildApp } from '../../../app.js'
import { StageOrder } from '../../../plugins/pipeline/index.js'
import { buildTestApp, bearer, testConfig, until } from '../../helper.js'
import { STORES, itemKernel, itemManifest, versionedItem } from './items.js'

const tenant = (): string => 'cache-' + randomUUID()

for (const { store, env } of STORES) {
  t.test(`${store}: a read begun after a mutation's invalidation does not get the answer of a Kernel call begun before it`, async t => {
    const kernel = await itemKernel(t)
    // The read of version 1 is slow to answer.
    const { release } = versionedItem(kernel, 1)
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
    const headers = bearer({ tenant: tenant() })

    // A cold read reaches the Kernel, which reads version 1 and is slow to answer.
    const slow = app.inject({ method: 'GET', url: '/api/v1/items/c', headers })
    await until(() => kernel.reads() === 1, 'the slow read at the Kernel')
    // The item is updated: the Kernel holds version 2 and the tag item:c is invalidated.
    t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/items/c', headers, payload: {} })).statusCode, 200)
    // Read again once the mutation has answered, while the first call is still in flight.
    const after = app.inject({ method: 'GET', url: '/api/v1/items/c', headers })
    await until(() => kernel.reads() === 2, 'the read after the mutation at the Kernel')
    release()
    const [first, read] = await Promise.all([slow, after])
    t.equal(first.json().n, 1, 'the read begun before the mutation gets what the Kernel said then')
    // Without a cache this read reaches the Kernel after the update and sees version 2.
    t.equal(read.headers['x-cache'], 'miss')
    t.equal(read.json().n, 2, 'the read begun after the mutation gets version 2')
    t.equal(kernel.reads(), 2, 'it made a Kernel call of its own')
    // That call, not the raced one, filled the cache.
    const next = await app.inject({ method: 'GET', url: '/api/v1/items/c', headers })
    t.equal(next.headers['x-cache'], 'hit')
    t.equal(next.json().n, 2)
  })

  t.test(`${store}: a read begun after an invalidation does not get the answer of a stale-while-revalidate refresh begun before it`, async t => {
    const kernel = await itemKernel(t)
    let now = Date.now()
    const app = await buildTestApp(t, env, { manifest: itemManifest(kernel.url), kernelUrl: kernel.url, cacheClock: () => now })
    const headers = bearer({ tenant: tenant() })
    t.equal((await app.inject({ method: 'GET', url: '/api/v1/fresh/c', headers })).json().n, 1)
    // The background refresh reads version 2 and is slow to answer.
    const { release } = versionedItem(kernel, 2)
    now += 15_000 // past the ttl (10 s), inside the swr window (20 s)
    const stale = await app.inject({ method: 'GET', url: '/api/v1/fresh/c', headers })
    t.equal(stale.headers['x-cache'], 'stale')
    await until(() => kernel.reads() === 2, 'the background refresh at the Kernel')
    // The item is updated while the refresh is in flight.
    t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/items/c', headers, payload: {} })).statusCode, 200)
    const after = app.inject({ method: 'GET', url: '/api/v1/fresh/c', headers })
    await until(() => kernel.reads() === 3, 'the read after the mutation at the Kernel')
    release()
    const read = await after
    t.equal(read.headers['x-cache'], 'miss', 'the invalidated entry is not served, not even stale')
    t.equal(read.json().n, 3, 'nor the refresh begun before the mutation')
  })

  t.test(`${store}: a call of a batch begun after an invalidation does not store the answer of its batch's identical call begun before it`, async t => {
    const kernel = await itemKernel(t)
    // The read of version 1 is slow to answer.
    const { release } = versionedItem(kernel, 1)
    const app = await buildApp(testConfig(env), { logger: false, manifest: itemManifest(kernel.url), kernelUrl: kernel.url })
    t.teardown(() => app.close())
    // The batch's second call reaches the cache later than its first (a stage before it that
    // takes its time: a rate limit's or a firewall's round trip), here once the mutation is over.
    let mutated!: () => void
    const after = new Promise<void>(resolve => { mutated = resolve })
    let lagging = false
    app.pipeline.addStage({ name: 'lag', order: StageOrder.firewall + 1, build: op => op.name === 'getItem' ? async (ctx, next) => { if (ctx.requestId.endsWith('.1')) { lagging = true; await after } return await next(ctx) } : null })
    await app.ready()
    const headers = bearer({ tenant: tenant() })
    const calls = [{ id: 'first', op: 'getItem', input: { id: 'c' } }, { id: 'second', op: 'getItem', input: { id: 'c' } }]
    const batch = app.inject({ method: 'POST', url: '/api/v1/batch', headers, payload: { calls } })
    await until(() => kernel.reads() === 1 && lagging, 'the first call at the Kernel, the second one held')
    // The item is updated: the Kernel holds version 2 and the tag item:c is invalidated.
    t.equal((await app.inject({ method: 'PATCH', url: '/api/v1/items/c', headers, payload: {} })).statusCode, 200)
    mutated()
    await new Promise(resolve => setTimeout(resolve, 50))
    release()
    t.equal((await batch).statusCode, 200)
    // A read sent once the mutation has answered never gets version 1: the batch's second call
    // began after the invalidation, and what it stored is the answer of its own Kernel call, not
    // the first call's (begun before the mutation) that the batch's calls shared.
    const read = await app.inject({ method: 'GET', url: '/api/v1/items/c', headers })
    t.equal(read.json().n, 2, `a read after the mutation gets version 2 (x-cache: ${String(read.headers['x-cache'])})`)
  })
}
