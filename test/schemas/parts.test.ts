import { runParts } from '../parts.js'

// This directory's *.part.ts files, in one tap process (see test/parts.ts).
await runParts(import.meta.url)
