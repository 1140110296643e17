import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'

export interface JwksServer {
  url: string
  /** Requests it has had. */
  hits: () => number
  /** The document it answers from now on; null: 503, as an IdP that is failing. */
  set: (doc: { keys: unknown[] } | null) => void
  /** Answers 503 while true. */
  down: (d: boolean) => void
  /** While true: the headers, then a byte now and then, never the end (no undici timeout of its own fires). */
  trickle: (d: boolean) => void
}

/** A JWKS server on port 0 whose document and availability the test changes; it counts requests. */
export async function jwksServer (t: { teardown: (fn: () => unknown) => void }, initial: { keys: unknown[] }): Promise<JwksServer> {
  let doc: { keys: unknown[] } | null = initial
  let hits = 0
  let isDown = false
  let trickling = false
  const drips = new Set<NodeJS.Timeout>()
  t.teardown(() => { for (const d of drips) clearInterval(d) })
  const server = createServer((_req, res) => {
    hits++
    if (isDown || doc === null) {
      res.writeHead(503).end('down')
      return
    }
    if (trickling) {
      res.writeHead(200, { 'content-type': 'application/json' })
      res.write(' ')
      const drip = setInterval(() => { res.write(' ') }, 100)
      drips.add(drip)
      res.on('close', () => { clearInterval(drip); drips.delete(drip) })
      return
    }
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(doc))
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise(resolve => { server.close(resolve); server.closeAllConnections() }))
  const { port } = server.address() as AddressInfo
  return { url: `http://127.0.0.1:${port}/jwks.json`, hits: () => hits, set: d => { doc = d }, down: d => { isDown = d }, trickle: d => { trickling = d } }
}
