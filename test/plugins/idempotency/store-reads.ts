import { MemoryIdempotencyStore, RedisIdempotencyStore } from '../../../plugins/idempotency/index.js'

// Every read of the idempotency stores, counted for the tests that must know a repeat waits: a
// waiting repeat claims again at each poll (with Redis, a first call this instance runs is found
// held in memory: a peek). The stores' prototypes are wrapped once, however many parts import it.
const counted = { reads: 0 }
for (const proto of [MemoryIdempotencyStore.prototype, RedisIdempotencyStore.prototype] as Array<{ claim: (...args: unknown[]) => unknown }>) {
  const claim = proto.claim
  proto.claim = function (this: unknown, ...args: unknown[]) {
    counted.reads++
    return claim.apply(this, args)
  }
}
const peek = MemoryIdempotencyStore.prototype.peek
MemoryIdempotencyStore.prototype.peek = function (this: MemoryIdempotencyStore, ...args: Parameters<typeof peek>) {
  counted.reads++
  return peek.apply(this, args)
}

/** Reads of the stores so far. */
export const storeReads = (): number => counted.reads
