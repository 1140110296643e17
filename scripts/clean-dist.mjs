// Removes the previous build so dist/ never serves stale modules.
import { rm } from 'node:fs/promises'
await rm(new URL('../dist', import.meta.url), { recursive: true, force: true })
