import type { Redis } from 'ioredis'
import { SLIDING_WINDOW_LUA, type WindowCount } from './window.js'

/** The commands the store runs on its keys (SLIDING_WINDOW_LUA's), which Redis must permit (plugins/redis checks them). */
export const RATE_LIMIT_COMMANDS: readonly string[] = ['time', 'hmget', 'hset', 'pexpire', 'del']

type Callback = (err: Error | null | undefined, result?: [number, number]) => void
interface WithScript { mantleRateLimit: (key: string, windowMs: number, max: number, cb: Callback) => void }

/**
 * The sliding window in Redis, shared by every gateway instance: one atomic Lua script per
 * check (ioredis' defineCommand sends EVALSHA and falls back to EVAL on NOSCRIPT, after a
 * restart or a SCRIPT FLUSH). Each key expires two windows after its last counted call (the
 * clock stepped back, after the start of the key's window that call was counted in: two windows
 * from the call, the key went while its count still weighed).
 * Guarantees nothing when Redis is away: a check then rejects (no offline queue, the shared
 * connection's command timeout), and the limiter answers from memory instead.
 */
export class RedisWindowStore {
  private readonly client: WithScript

  constructor (client: Redis) {
    if (typeof (client as unknown as Partial<WithScript>).mantleRateLimit !== 'function') {
      client.defineCommand('mantleRateLimit', { numberOfKeys: 1, lua: SLIDING_WINDOW_LUA })
    }
    this.client = client as unknown as WithScript
  }

  check (key: string, windowMs: number, max: number): Promise<WindowCount> {
    return new Promise((resolve, reject) => {
      this.client.mantleRateLimit(key, windowMs, max, (err, result) => {
        if (err !== null && err !== undefined) reject(err)
        else resolve({ current: result![0], ttl: result![1] })
      })
    })
  }
}
