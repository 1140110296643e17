// The floor for any Fastify gateway: one route that forwards to the Kernel through one undici
// Pool and returns the JSON. No auth, validation, metrics or logging. The gap between this and
// Mantle is what Mantle's own concerns cost.
import Fastify from 'fastify'
import { Pool } from 'undici'

const kernelUrl = process.env.KERNEL_URL
const port = Number(process.env.PORT ?? 0)
const host = process.env.HOST ?? '127.0.0.1'
if (kernelUrl === undefined || kernelUrl === '') {
  console.error('passthrough: KERNEL_URL is required')
  process.exit(1)
}

// 128 connections: the same as the demo manifest's kernel.connections, so both sides of the
// comparison may keep as many requests in flight. pool.request is undici's request API bound
// to this Pool, the call Mantle's Kernel client makes too.
const pool = new Pool(kernelUrl, { connections: 128 })
const app = Fastify({ logger: false })

app.get<{ Params: { id: string } }>('/api/v1/agents/:id', async (req, reply) => {
  const tenant = req.headers['x-tenant-id']
  const { statusCode, body } = await pool.request({
    method: 'GET',
    path: `/v1/agents/${encodeURIComponent(req.params.id)}`,
    headers: typeof tenant === 'string' ? { 'x-tenant-id': tenant } : {}
  })
  // The Kernel's JSON as it came: a pass-through has no reason to parse and write it again
  // (which cost it 3.6 µs a call, and flattered every ratio to it).
  reply.code(statusCode).type('application/json; charset=utf-8')
  return await body.text()
})

await app.listen({ port, host })
console.log(`passthrough listening on http://${host}:${port} -> ${kernelUrl}`)

const shutdown = (): void => {
  app.close()
    .then(async () => await pool.close())
    .then(() => process.exit(0), (err: unknown) => {
      console.error('passthrough: close failed', err)
      process.exit(1)
    })
}
process.once('SIGTERM', shutdown)
process.once('SIGINT', shutdown)
