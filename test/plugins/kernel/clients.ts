// The Kernel clients and operations the Kernel client's tests share (client, shedding, recovery
// and learning tests): a file apart so that those tests run as several files, in parallel.
import type { Test } from 'tap'
import { startTestKernel, testManifest, type TestKernel } from '../../helper.js'
import type { KernelClient, KernelMetrics } from '../../../plugins/kernel/client.js'
import type { Operation } from '../../../manifest.js'

export const item = { type: 'object', required: ['id'], properties: { id: { type: 'string' }, name: { type: 'string' } } }
export const idInput = { type: 'object', required: ['id'], properties: { id: { type: 'string' } }, additionalProperties: false }

/** The requests the Kernel received on `path` (its query string aside). */
export const hits = (kernel: TestKernel, path: string): number => kernel.requests.filter(r => r.url.split('?')[0] === path).length

/** A KernelClient of its own on `kernel` and its op getItem (`timeoutMs`), refusals counted by reason. */
export async function itemClient (t: Test, kernel: TestKernel, o: { connections: number, retries: number, timeoutMs: number }): Promise<{ client: KernelClient, op: Operation, run: ReturnType<KernelClient['forOperation']>, rejected: Record<string, number> }> {
  const { KernelClient } = await import('../../../plugins/kernel/index.js')
  const rejected: Record<string, number> = {}
  const nothing = (): void => {}
  const calls = { ok: nothing, client_error: nothing, redirect: nothing, bad_answer: nothing, server_error: nothing, timeout: nothing, unavailable: nothing, client_closed: nothing }
  const metrics: KernelMetrics = { forOperation: () => ({ call: calls, retry: nothing }), budgetExhausted: nothing, rejected: (reason: string) => { rejected[reason] = (rejected[reason] ?? 0) + 1 }, answerDropped: nothing, connected: nothing }
  const client = new KernelClient({ origin: kernel.url, connections: o.connections, retries: o.retries, maxInFlight: 1000, resilience: { threshold: 5, resetTimeoutMs: 60_000 }, metrics })
  t.teardown(() => client.close())
  const op = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: item, timeoutMs: o.timeoutMs }
  }).byName.get('getItem')!
  return { client, op, run: client.forOperation(op), rejected }
}

/**
 * A client of 2 connections (no retry, its breaker open at 5 failures) on a Kernel serving
 * `routes`, with getItem (GET /v1/items/{id}) and slowItem (GET /v1/slow/{id}) of the timeouts
 * given, and `call`: one call of an operation through `run`, its outcome ('ok' or the error's code).
 */
export async function twoOperations (t: Test, routes: Parameters<typeof startTestKernel>[1], getItemTimeoutMs: number, slowItemTimeoutMs: number, connections = 2): Promise<{ client: KernelClient, getItem: Operation, slowItem: Operation, call: (run: ReturnType<KernelClient['forOperation']>, op: Operation, id: string) => Promise<string> }> {
  const { CallContext } = await import('../../../plugins/pipeline/index.js')
  const { KernelClient } = await import('../../../plugins/kernel/index.js')
  const kernel = await startTestKernel(t, routes)
  const client = new KernelClient({ origin: kernel.url, connections, retries: 0, maxInFlight: 1000, resilience: { threshold: 5, resetTimeoutMs: 60_000 } })
  t.teardown(() => client.close())
  const m = testManifest({
    getItem: { type: 'query', rest: 'GET /items/:id', kernel: 'GET /v1/items/{id}', input: idInput, output: item, timeoutMs: getItemTimeoutMs },
    slowItem: { type: 'query', rest: 'GET /slow/:id', kernel: 'GET /v1/slow/{id}', input: idInput, output: item, timeoutMs: slowItemTimeoutMs }
  })
  const call = async (run: ReturnType<KernelClient['forOperation']>, op: Operation, id: string): Promise<string> =>
    await run(new CallContext(id, 'rest', op, { id }, undefined, undefined, undefined)).then(() => 'ok', (err: { code: string }) => err.code)
  return { client, getItem: m.byName.get('getItem')!, slowItem: m.byName.get('slowItem')!, call }
}
