import t from 'tap'
import { once } from 'node:events'
import WebSocket from 'ws'
import { buildDemoApp, bearer } from '../../helper.js'

// Every face that upgrades reports its WebSocket connections (mantle_websocket_connections
// counts those of /ws alone: GraphQL's and tRPC's were in no metric).

t.test('mantle_websocket_slots reports the connections of each face', async t => {
  const app = await buildDemoApp(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const base = `ws://127.0.0.1:${(app.server.address() as { port: number }).port}`
  const scrape = async (): Promise<Record<string, number>> => {
    const text = (await app.inject({ method: 'GET', url: '/metrics' })).body
    return Object.fromEntries([...text.matchAll(/^mantle_websocket_slots\{face="(\w+)"\} (\d+)$/gm)].map(m => [m[1], Number(m[2])]))
  }
  t.same(await scrape(), { graphql: 0, trpc: 0, ws: 0 })
  const sockets = [
    new WebSocket(`${base}/ws`, { headers: bearer() }),
    new WebSocket(`${base}/graphql`, 'graphql-transport-ws', { headers: bearer() }),
    new WebSocket(`${base}/graphql`, 'graphql-transport-ws', { headers: bearer() }),
    new WebSocket(`${base}/trpc`, { headers: bearer() })
  ]
  await Promise.all(sockets.map(async s => await once(s, 'open')))
  t.same(await scrape(), { graphql: 2, trpc: 1, ws: 1 })
  await Promise.all(sockets.map(async s => { s.close(); await once(s, 'close') }))
  let now = await scrape()
  for (let i = 0; i < 100 && Object.values(now).some(n => n !== 0); i++) now = await new Promise(resolve => setTimeout(resolve, 20)).then(scrape)
  t.same(now, { graphql: 0, trpc: 0, ws: 0 }, 'every place given back')
})
