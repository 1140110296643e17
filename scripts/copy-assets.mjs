// tsc copies only .ts output; the demo manifest and SQL migrations travel with a build: dist/,
// or the directory given (the bench's .bench-build/).
import { cp } from 'node:fs/promises'
const root = new URL('../', import.meta.url)
const out = new URL((process.argv[2] ?? 'dist').replace(/\/?$/, '/'), root)
await cp(new URL('kernel/manifest.yaml', root), new URL('kernel/manifest.yaml', out))
await cp(new URL('migrations/', root), new URL('migrations/', out), { recursive: true })
