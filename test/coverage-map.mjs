// tap coverage map: every test instruments the gateway's own TypeScript sources and nothing
// else. Without it, the production-build test would also count dist/ (tap follows spawned
// processes), and the load tooling would be counted as untested product code.
import { readdirSync } from 'node:fs'
import { join, relative } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('..', import.meta.url))
// The gateway's own JavaScript modules (a worker thread's, run with no loader); the other .mjs
// files are tooling (eslint.config.mjs, scripts/*.mjs).
const PRODUCT_JS = new Set(['manifest-patterns-worker.mjs'])
const skip = new Set(['node_modules', 'dist', 'test', 'loadtest', 'coverage', '.tap', '.git', 'tmp'])

function walk (dir, out) {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    if (entry.isDirectory()) {
      if (!skip.has(entry.name)) walk(join(dir, entry.name), out)
    } else if ((entry.name.endsWith('.ts') && !entry.name.endsWith('.d.ts')) || PRODUCT_JS.has(entry.name)) {
      out.push(relative(root, join(dir, entry.name)))
    }
  }
  return out
}

const sources = walk(root, [])
export default () => sources
