// The ceiling of the cache section: a bare Fastify 5 route that answers getAgent's JSON from
// memory (fetched once from the Kernel at start-up, so the body is the same bytes), with no
// auth, validation, metrics, headers or logging. No gateway can answer a cache hit faster on
// the same machine; the gap between this and gateway-cache is what Mantle's policy costs a hit.
import Fastify from 'fastify'

const kernelUrl = process.env.KERNEL_URL
const port = Number(process.env.PORT ?? 0)
const host = process.env.HOST ?? '127.0.0.1'
if (kernelUrl === undefined || kernelUrl === '') {
  console.error('static-answer: KERNEL_URL is required')
  process.exit(1)
}

const res = await fetch(new URL('/v1/agents/a1', kernelUrl), { headers: { 'x-tenant-id': 'bench' } })
const body = await res.text()
if (!res.ok) {
  console.error(`static-answer: the Kernel answered ${res.status}`)
  process.exit(1)
}

const app = Fastify({ logger: false })
app.get('/api/v1/agents/:id', async (_req, reply) => {
  reply.type('application/json; charset=utf-8')
  return body
})

await app.listen({ port, host })
console.log(`static-answer listening on http://${host}:${port}`)

const shutdown = (): void => {
  app.close().then(() => process.exit(0), (err: unknown) => {
    console.error('static-answer: close failed', err)
    process.exit(1)
  })
}
process.once('SIGTERM', shutdown)
process.once('SIGINT', shutdown)
