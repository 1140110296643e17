import t from 'tap'
import { semantics } from './semantics.js'

// The same semantics as memory.part.ts, against the machine's real Redis.
semantics(t, 'redis')
