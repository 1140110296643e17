import { runParts } from '../parts.js'

// The directories of one test file each (the demo Kernel's among them), in one tap process (see
// test/parts.ts): each of them alone paid a process's start for 0.1 to 27 s of tests.
await runParts(import.meta.url, ['compression', 'events', '../kernel', 'metrics', 'pressure', 'tracing'])
