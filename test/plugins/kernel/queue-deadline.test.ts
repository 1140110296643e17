import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { buildTestApp, startTestKernel, testManifest, bearer, json } from '../../helper.js'

const item = { type: 'object', required: ['id'], properties: { id: { type: 'string' } } }
const idInput = { type: 'object', required: ['id'], properties: { id: { type: 'string' } }, additionalProperties: false }

// README "The Kernel side": "An operation's timeoutMs bounds the whole call, retries and backoff
// included, from the moment the gateway received it." A call queued in the undici Pool behind
// busy connections answers 504 KERNEL_TIMEOUT at its own deadline (undici acts on an abort
// signal only once the request has a connection).
t.test('a call queued for a Kernel connection answers within its own timeoutMs', async t => {
  const kernel = await startTestKernel(t, {
    // A Kernel endpoint that takes its time (within the long op's 3 s budget).
    'GET /v1/long/l1': async (_req, res) => { await sleep(2500); json(res, 200, { id: 'l1' }) },
    'GET /v1/fast/f1': (_req, res) => json(res, 200, { id: 'f1' })
  })
  const manifest = testManifest({
    longOp: { type: 'query', rest: 'GET /long/:id', kernel: 'GET /v1/long/{id}', input: idInput, output: item, timeoutMs: 3000 },
    fastOp: { type: 'query', rest: 'GET /fast/:id', kernel: 'GET /v1/fast/{id}', input: idInput, output: item, timeoutMs: 200 }
  }, { connections: 1, retries: 0, circuitBreaker: { threshold: 100, resetTimeoutMs: 1000 } })
  const app = await buildTestApp(t, {}, { manifest, kernelUrl: kernel.url })
  let longDone = false
  const long = app.inject({ method: 'GET', url: '/api/v1/long/l1', headers: bearer() }).then(res => { longDone = true; return res })
  await sleep(50)
  const fast = await app.inject({ method: 'GET', url: '/api/v1/fast/f1', headers: bearer() })
  t.equal(fast.statusCode, 504, 'the queued call times out')
  t.match(fast.json(), { code: 'KERNEL_TIMEOUT' })
  t.notOk(longDone, 'at its own deadline, not when the connection it waited for came free')
  t.equal((await long).statusCode, 200)
})
