import t from 'tap'
import { readdirSync, readFileSync } from 'node:fs'
import { join, relative, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

// A *.part.ts file runs only through a parts.test.ts that names its directory (test/parts.ts):
// its own directory's, or a group of directories of one file each; without one, its tests would
// never run and nothing would say so.
t.test('every directory with *.part.ts files has a parts.test.ts that runs them', async t => {
  const root = resolve(fileURLToPath(new URL('.', import.meta.url)))
  const withParts: string[] = []
  const run = new Set<string>()
  let groups = 0
  const walk = (dir: string): void => {
    const names = readdirSync(dir, { withFileTypes: true })
    if (names.some(e => e.isFile() && e.name.endsWith('.part.ts'))) withParts.push(dir)
    if (names.some(e => e.isFile() && e.name === 'parts.test.ts')) {
      groups++
      const text = readFileSync(join(dir, 'parts.test.ts'), 'utf8')
      const call = /await runParts\(import\.meta\.url(?:, \[([^\]]*)\])?\)/.exec(text)
      t.ok(call, `${relative(root, dir) || '.'}/parts.test.ts runs its parts`)
      const dirs = call?.[1] === undefined ? ['.'] : [...call[1].matchAll(/'([^']+)'/g)].map(m => m[1])
      for (const d of dirs) run.add(resolve(dir, d))
    }
    for (const e of names) if (e.isDirectory() && e.name !== 'fixtures') walk(join(dir, e.name))
  }
  walk(root)
  t.same(withParts.filter(dir => !run.has(dir)).map(dir => relative(root, dir) || '.'), [], 'no part is left without a group')
  t.ok(groups > 1, 'the groups were found')
  t.ok(run.has(join(root, 'plugins', 'tracing')), 'a group of several directories is read')
})
