// tsc copies only .ts output; the demo manifest and SQL migrations travel with dist/.
import { cp } from 'node:fs/promises'
const root = new URL('../', import.meta.url)
await cp(new URL('kernel/manifest.yaml', root), new URL('dist/kernel/manifest.yaml', root))
await cp(new URL('migrations/', root), new URL('dist/migrations/', root), { recursive: true })
