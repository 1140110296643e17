import { readdir } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'

// Loads every *.part.ts file of the calling group file's directory (or of `dirs`, relative to
// it), in name order, into this one tap process; each part's top-level t.test() calls join the
// same root and run one after another. A tap process costs about 5 s of CPU before its first test
// (Node, the TypeScript loader and the gateway's ~1,100 modules loaded under coverage), and the
// suite is CPU-bound on two cores, so a directory's files share one process, unless one needs a
// process of its own (a spy loaded before the gateway, gc exposed) or would take the group past
// tap's per-file timeout; directories of one file share one group (test/plugins/parts.test.ts).
// Written here because tap runs one process per file and has no option to share one. A part
// runs alone as `npx tap <file>.part.ts`.
export async function runParts (groupUrl: string, dirs: readonly string[] = ['.']): Promise<void> {
  const here = dirname(fileURLToPath(groupUrl))
  let loaded = 0
  for (const dir of dirs.map(d => join(here, d))) {
    const parts = (await readdir(dir)).filter(name => name.endsWith('.part.ts')).sort()
    if (parts.length === 0) throw new Error(`no *.part.ts file in ${dir}`)
    for (const name of parts) await import(pathToFileURL(join(dir, name)).href)
    loaded += parts.length
  }
  if (loaded === 0) throw new Error(`no directory given for ${here}`)
}
