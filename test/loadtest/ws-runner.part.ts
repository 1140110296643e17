// The WebSocket runner (loadtest/ws-runner.ts, a child process) against a small server of the
// test's own: each call counts once, whatever becomes of its connection.
import t from 'tap'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import { WebSocketServer } from 'ws'
import type { WsRunnerConfig, WsRunnerReport } from '../../loadtest/ws-runner.js'
import { fromWs } from '../../loadtest/bench-faces.js'

async function runRunner (config: WsRunnerConfig): Promise<WsRunnerReport> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'loadtest/ws-runner.ts'], { env: { ...process.env, WS_RUNNER_CONFIG: JSON.stringify(config) }, stdio: ['ignore', 'pipe', 'inherit'] })
  let out = ''
  child.stdout.on('data', (chunk: Buffer) => { out += chunk.toString() })
  await once(child, 'exit')
  return JSON.parse(out.trim().split('\n').at(-1)!) as WsRunnerReport
}

t.test('a connection still waiting for its answer when the run ends is one unanswered call, not also one closed early', async t => {
  const server = new WebSocketServer({ port: 0, host: '127.0.0.1' })
  await once(server, 'listening')
  t.teardown(() => { for (const c of server.clients) c.terminate(); server.close() })
  let opened = 0
  server.on('connection', ws => {
    // The second connection answers its probe, then never again.
    const stalls = ++opened === 2
    let answered = 0
    ws.on('message', (data: Buffer) => {
      const { id } = JSON.parse(data.toString()) as { id: string }
      if (stalls && answered++ > 0) return
      ws.send(JSON.stringify({ id, result: { v: '1' } }))
    })
  })
  const { port } = server.address() as AddressInfo
  const report = await runRunner({ url: `ws://127.0.0.1:${port}/ws`, connections: 3, durationSeconds: 1, op: 'x', input: {}, check: { path: ['v'], equals: '1' } })
  t.equal(report.failure, null)
  t.equal(report.opened, 3)
  t.ok(report.calls > 0, 'the other connections made calls')
  t.equal(report.unanswered, 1, 'one call never answered')
  t.equal(report.closedEarly, 0, 'no connection closed during the run (the runner closed the stalled one at the end)')
  t.equal(fromWs(report, null).failures, 1, 'one failure')
})
