// A redis-server of a test's own, for what the shared Redis must never undergo (CONFIG SET, a
// restart that empties it): started on a free port, no persistence, stopped when the test ends.
import { spawn } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Redis } from 'ioredis'
import { closedPort } from './helper.js'

interface Teardown { teardown: (fn: () => unknown) => void }

export interface OwnRedis {
  url: string
  /** A connection of the test's own to it (closed at teardown). */
  client: Redis
}

export async function startRedisServer (t: Teardown): Promise<OwnRedis> {
  const port = await closedPort()
  const dir = await mkdtemp(join(tmpdir(), 'mantle-redis-'))
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir], { stdio: 'ignore' })
  const exited = new Promise<void>(resolve => child.once('exit', () => resolve()))
  t.teardown(async () => {
    child.kill('SIGKILL')
    await exited
    await rm(dir, { recursive: true, force: true })
  })
  await new Promise<void>((resolve, reject) => {
    child.once('spawn', resolve)
    child.once('error', reject)
  })
  // Retried every 50 ms until the server listens.
  const client = new Redis({ port, host: '127.0.0.1', retryStrategy: () => 50, maxRetriesPerRequest: 0 })
  client.on('error', () => {})
  t.teardown(() => client.disconnect())
  const end = Date.now() + 10_000
  for (;;) {
    try {
      await client.ping()
      break
    } catch (err) {
      if (Date.now() > end) throw err
      await new Promise(resolve => setTimeout(resolve, 50))
    }
  }
  return { url: `redis://127.0.0.1:${port}`, client }
}
