import t from 'tap'
import { readdirSync, readFileSync } from 'node:fs'
import { join, relative } from 'node:path'
import { fileURLToPath } from 'node:url'

// A *.part.ts file runs only through its directory's parts.test.ts (test/parts.ts): without that
// file beside it, its tests would never run and nothing would say so.
t.test('every directory with *.part.ts files has a parts.test.ts that runs them', async t => {
  const root = fileURLToPath(new URL('.', import.meta.url))
  const lonely: string[] = []
  let groups = 0
  const walk = (dir: string): void => {
    const names = readdirSync(dir, { withFileTypes: true })
    const hasParts = names.some(e => e.isFile() && e.name.endsWith('.part.ts'))
    const group = names.some(e => e.isFile() && e.name === 'parts.test.ts')
    if (group) {
      groups++
      t.match(readFileSync(join(dir, 'parts.test.ts'), 'utf8'), /await runParts\(import\.meta\.url\)/, `${relative(root, dir) || '.'}/parts.test.ts runs its parts`)
    }
    if (hasParts && !group) lonely.push(relative(root, dir) || '.')
    for (const e of names) if (e.isDirectory() && e.name !== 'fixtures') walk(join(dir, e.name))
  }
  walk(root)
  t.same(lonely, [], 'no part is left without a group')
  t.ok(groups > 1, 'the groups were found')
})
