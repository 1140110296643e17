// Scratch ACL users of the tests' Redis, each of its own name, deleted when the test ends (the
// default user is never touched).
import type { Test } from 'tap'
import { Redis } from 'ioredis'
import { randomUUID } from 'node:crypto'

export const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const target = new URL(REDIS_URL)

export interface AclUser {
  /** The user's name. */
  name: string
  /** REDIS_URL for the user, on database 3. */
  url: string
}

/**
 * Makes users (`rules` after `on >password`), deleted when `t` ends; `admin` is a connection of
 * the tests' own (the default user) to change them with.
 */
export function aclUsers (t: Test): { make: (...rules: string[]) => Promise<AclUser>, admin: Redis } {
  const admin = new Redis(REDIS_URL)
  const users: string[] = []
  t.teardown(async () => {
    for (const user of users) await admin.call('ACL', 'DELUSER', user)
    admin.disconnect()
  })
  return {
    admin,
    make: async (...rules) => {
      const name = `mantle-test-${randomUUID()}`
      users.push(name)
      await admin.call('ACL', 'SETUSER', name, 'on', '>s3cret-pw-0123', ...rules)
      return { name, url: `redis://${name}:s3cret-pw-0123@${target.host}/3` }
    }
  }
}
