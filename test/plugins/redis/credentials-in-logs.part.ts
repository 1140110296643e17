// ioredis sets `command` on the error of a reply it rejects, with the command's arguments: a
// refused AUTH (HELLO 3 AUTH user password) carries REDIS_URL's password. The events plugin
// logged its connections' errors whole ({ err }) at debug, so a password changed on Redis while
// the gateway ran wrote the old one into the log at each reconnect. Every log line says what
// Redis said (err.message), and the logger never writes a command's arguments.
import t from 'tap'
import { buildTestApp, until } from '../../helper.js'
import { itemKernel, itemManifest } from '../cache/items.js'
import { aclUsers } from './acl.js'

const PASSWORD = 's3cret-pw-0123'

t.test('a password Redis refuses on a reconnect never reaches a log line, at any level', async t => {
  const acl = aclUsers(t)
  const user = await acl.make('~bff:*', '&bff:*', '+@all')
  const kernel = await itemKernel(t)
  const lines: string[] = []
  const app = await buildTestApp(t, { REDIS_URL: user.url, LOG_LEVEL: 'trace' }, {
    manifest: itemManifest(kernel.url),
    kernelUrl: kernel.url,
    logger: undefined,
    logStream: { write: line => { lines.push(line) } }
  })
  await until(() => app.events.health().up, 'the events subscriber')
  // The password changes on Redis, and the gateway's connections are dropped: each reconnect
  // presents the old one, which Redis refuses (WRONGPASS).
  await acl.admin.call('ACL', 'SETUSER', user.name, 'resetpass', '>another-pw-4567')
  await acl.admin.call('CLIENT', 'KILL', 'USER', user.name)
  await until(() => lines.some(l => l.includes('WRONGPASS') && l.includes('redis events connection error')), 'the events connections\' refused reconnect logged', 10_000)
  // Back, so that the gateway closes cleanly.
  await acl.admin.call('ACL', 'SETUSER', user.name, '>' + PASSWORD)
  const leaking = lines.filter(l => l.includes(PASSWORD))
  t.same(leaking, [], 'no line holds the password')
})

t.test('the logger never writes a Redis command\'s arguments, of an error, its cause or an aggregate\'s errors', async t => {
  const lines: Array<Record<string, any>> = []
  const app = await buildTestApp(t, { LOG_LEVEL: 'debug' }, { logger: undefined, logStream: { write: line => { lines.push(JSON.parse(line)) } } })
  const replyError = (): Error => Object.assign(new Error('WRONGPASS invalid username-password pair'), { command: { name: 'hello', args: ['3', 'AUTH', 'u', PASSWORD] } })
  app.log.debug({ err: replyError() }, 'an error')
  app.log.debug({ err: new Error('wrapped', { cause: replyError() }) }, 'a cause')
  app.log.debug({ err: new AggregateError([replyError()], 'several') }, 'an aggregate')
  t.equal(lines.length, 3)
  t.same(lines.filter(l => JSON.stringify(l).includes(PASSWORD)), [], 'no line holds the arguments')
  t.equal(lines[0].err.command.name, 'hello', 'the command is still named')
})
