// The sliding window every rate limit of Mantle counts with, in memory and in Redis (the Lua
// script below is this function, line for line). Written here because no library offers a
// sliding window that runs the same in process and as one atomic Redis script: @fastify/rate-limit's
// own stores are fixed windows, and it takes custom stores for exactly this.
//
// Two buckets per key: the current fixed window's count `c` and the previous one's `p`. The
// calls "in the last windowMs" are estimated as p weighted by how much of the previous window
// still lies inside the sliding one, plus c. O(1) memory per key whatever the limit, where a
// log of timestamps (a sorted set) grows with `max`; the estimate assumes the previous window's
// calls were spread evenly.

import { FOREIGN_LUA } from '../redis/lua.js'

/** What @fastify/rate-limit's store contract answers: refused when `current > max`. */
export interface WindowCount {
  /** Calls in the window with this one; `max + 1` when this one is refused. */
  current: number
  /**
   * Allowed: ms until the current window ends, or, for the call that used the last place, until
   * a call would be allowed again. Refused: ms until a call would be allowed.
   */
  ttl: number
}

/** One key's counters: the fixed window's index and the two buckets, and the window's length they count in. */
export interface WindowState {
  w: number
  c: number
  p: number
  /** The window's length `w` counts in (absent: a key counted before it was kept, taken as the length asked now). */
  m?: number
  /**
   * The counts in other window lengths asked of this key lately, the most recently asked first
   * (absent: only one length was ever asked, the normal case). See hit.
   */
  o?: WindowSlot[]
}

/** A key's counts in another window length than the one asked last: `k` is when it was last asked (or left for another). */
export interface WindowSlot {
  w: number
  c: number
  p: number
  m: number
  k: number
}

/**
 * Window lengths a key counts in at once (the one asked last and MAX_LENGTHS - 1 others): the
 * oldest asked goes beyond it. The Lua script's fields w2..k2, w3..k3 are the others.
 */
export const MAX_LENGTHS = 3

/** Counts one call in another length's slot, its window moved as hit moves the key's. */
function countIn (slot: WindowSlot, now: number): void {
  let index = Math.floor(now / slot.m)
  if (index < slot.w && slot.w - index <= 1) index = slot.w
  if (slot.w !== index) {
    slot.p = slot.w === index - 1 ? slot.c : 0
    slot.c = 0
    slot.w = index
  }
  slot.c++
}

/**
 * The key is asked in `windowMs` and was last asked in `was`: the counts in `windowMs` kept
 * since it was last asked become the key's, or, for a length not kept, the calls of `was` are
 * carried over (rescale). The counts in `was` are kept among the others.
 */
function switchLength (state: WindowState, now: number, windowMs: number, was: number): void {
  const others = state.o ?? []
  const at = others.findIndex(slot => slot.m === windowMs)
  const left: WindowSlot = { w: state.w, c: state.c, p: state.p, m: was, k: now }
  if (at !== -1) {
    const slot = others.splice(at, 1)[0]
    state.w = slot.w
    state.c = slot.c
    state.p = slot.p
  } else {
    rescale(state, now, windowMs, was)
  }
  others.unshift(left)
  if (others.length > MAX_LENGTHS - 1) others.length = MAX_LENGTHS - 1
  state.o = others
}

/**
 * A key counted in windows of another length (a manifest reload changed the operation's
 * `windowMs`) in windows of `windowMs`: the calls its sliding window held at `now` go into the
 * current window of the new length, scaled down to its share when it is shorter (the calls taken
 * as spread evenly). Without it the key's window index read as foreign and the key started at 0:
 * a reload that tightened 2 calls a minute to 2 an hour gave every caller that had just spent its
 * 2 calls 2 more at once.
 */
function rescale (state: WindowState, now: number, windowMs: number, was: number): void {
  const at = Math.floor(now / was)
  const elapsed = now - at * was
  let used = 0
  if (state.w === at) used = state.p * (was - elapsed) / was + state.c
  else if (state.w === at - 1) used = state.c * (was - elapsed) / was
  // A clock stepped back by less than a window (see hit): the counts stand.
  else if (state.w === at + 1) used = state.c + state.p
  if (windowMs < was) used = used * windowMs / was
  state.w = Math.floor(now / windowMs)
  state.c = Math.ceil(used)
  state.p = 0
}

/**
 * Counts one call at `now` against `max` per `windowMs`, updating `state` in place. A refused
 * call is not counted: a client that keeps knocking is let back in as soon as its rate allows.
 */
export function hit (state: WindowState, now: number, windowMs: number, max: number): WindowCount {
  // A length not asked for two of its windows is no longer in use (a reload or a deploy done):
  // its counts go, and the key no longer pays for them.
  if (state.o !== undefined) {
    state.o = state.o.filter(slot => !(now - slot.k > 2 * slot.m))
    if (state.o.length === 0) state.o = undefined
  }
  if (state.m !== undefined && state.m !== windowMs) switchLength(state, now, windowMs, state.m)
  state.m = windowMs
  let index = Math.floor(now / windowMs)
  let elapsed = now - index * windowMs
  // A clock stepped back (NTP; a Redis failover to a replica behind) by less than a window does
  // not move a key's window back: taken as a jump ahead, it forgot the calls counted, and let
  // twice the limit through. By more (a clock that had jumped ahead and was set right), the key
  // starts anew: kept in a window far ahead, it would refuse until the clock caught up.
  // Counted as at the start of the key's window, which the clock reaches `ahead` ms from now: a
  // wait named from that start alone was short by the step, and a client that kept to it refused.
  let ahead = 0
  if (index < state.w && state.w - index <= 1) {
    ahead = state.w * windowMs - now
    index = state.w
    elapsed = 0
  }
  if (state.w !== index) {
    state.p = state.w === index - 1 ? state.c : 0
    state.c = 0
    state.w = index
  }
  const used = state.p * (windowMs - elapsed) / windowMs + state.c
  if (used + 1 <= max) {
    state.c++
    // Counted in every length in use too: each configuration's limit holds against every call.
    if (state.o !== undefined) for (const slot of state.o) countIn(slot, now)
    const current = Math.ceil(used) + 1
    // The window slides: after the last place is taken, the previous window's calls still weigh
    // once the current one ends. Its end as RateLimit-Reset sent a client that waited for it
    // into a refusal; the wait a refusal would name is the honest reset.
    return { current, ttl: ahead + (current >= max ? retryAfter(state, elapsed, windowMs, max) : windowMs - elapsed) }
  }
  return { current: max + 1, ttl: ahead + retryAfter(state, elapsed, windowMs, max) }
}

/**
 * ms until `p * (W - e - d) / W + c + 1 <= max` holds, in this window or the next: one division of
 * whole numbers, exact when the wait is whole (`1 - (max - 1) / c` in floating point named 80,001 ms
 * for 80,000, and a Retry-After of 81 s).
 */
function retryAfter (state: WindowState, elapsed: number, windowMs: number, max: number): number {
  if (state.c + 1 <= max) {
    // Refused because of the previous window's weight: wait until enough of it slides out.
    return Math.max(1, windowMs - elapsed - Math.floor((max - state.c - 1) * windowMs / state.p))
  }
  // The current window is full: in the next one it becomes the previous bucket.
  return Math.max(1, windowMs - elapsed + Math.ceil(windowMs * (state.c - max + 1) / state.c))
}

/**
 * `hit` as one Redis script: one round trip, atomic across every gateway instance. The clock is
 * Redis's own (TIME), so instances with skewed clocks still share one window. KEYS[1] is the
 * limit's key, a hash {w, c, p, m}, and, while other window lengths are in use for it (state.o),
 * {w2, c2, p2, m2, k2} and {w3, c3, p3, m3, k3} (an empty m2 or m3: none); ARGV: windowMs, max.
 * Returns {current, ttl}. A key of another type at that name (a string or a list some other
 * program wrote) is dropped and counted anew, as a key never counted: HMGET failed WRONGTYPE, and
 * the script with it, on every check of that key, each failure holding every key of the instance
 * in memory for a second (the limiter's pause), an outage logged and counted each time. Any other
 * error of HMGET (NOPERM: an ACL changed) is the script's, as before.
 */
export const SLIDING_WINDOW_LUA = `${FOREIGN_LUA}
local window = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local index = math.floor(now / window)
local elapsed = now - index * window
local s = redis.pcall('HMGET', KEYS[1], 'w', 'c', 'p', 'm', 'w2', 'c2', 'p2', 'm2', 'k2', 'w3', 'c3', 'p3', 'm3', 'k3')
if foreign(s) then
  redis.call('DEL', KEYS[1])
  s = {}
end
local w = tonumber(s[1])
local c = tonumber(s[2]) or 0
local p = tonumber(s[3]) or 0
local m = tonumber(s[4])
local others = {}
local held = false
local changed = false
for j = 0, 1 do
  local b = 5 + j * 5
  local om = tonumber(s[b + 3])
  if om ~= nil then
    held = true
    local o = {w = tonumber(s[b]), c = tonumber(s[b + 1]), p = tonumber(s[b + 2]), m = om, k = tonumber(s[b + 4])}
    if now - o.k > 2 * o.m then changed = true else others[#others + 1] = o end
  end
end
if w ~= nil and m ~= nil and m ~= window then
  local at = nil
  for i = 1, #others do
    if others[i].m == window then
      at = i
      break
    end
  end
  local left = {w = w, c = c, p = p, m = m, k = now}
  if at ~= nil then
    local o = table.remove(others, at)
    w = o.w
    c = o.c
    p = o.p
  else
    local was = math.floor(now / m)
    local e = now - was * m
    local used = 0
    if w == was then
      used = p * (m - e) / m + c
    elseif w == was - 1 then
      used = c * (m - e) / m
    elseif w == was + 1 then
      used = c + p
    end
    if window < m then used = used * window / m end
    w = index
    c = math.ceil(used)
    p = 0
  end
  table.insert(others, 1, left)
  while #others > 2 do table.remove(others) end
  changed = true
end
local ahead = 0
if w ~= nil and w > index and w - index <= 1 then
  ahead = w * window - now
  index = w
  elapsed = 0
end
if w ~= index then
  if w == index - 1 then p = c else p = 0 end
  c = 0
end
local function retryAfter ()
  local ttl
  if c + 1 <= max then
    ttl = window - elapsed - math.floor((max - c - 1) * window / p)
  else
    ttl = window - elapsed + math.ceil(window * (c - max + 1) / c)
  end
  if ttl < 1 then ttl = 1 end
  return ahead + ttl
end
local function save ()
  redis.call('HSET', KEYS[1], 'w', index, 'c', c, 'p', p, 'm', window)
  local expiry = window * 2 + ahead
  if held or #others > 0 then
    for j = 1, 2 do
      local o = others[j]
      local n = tostring(j + 1)
      if o ~= nil then
        redis.call('HSET', KEYS[1], 'w' .. n, o.w, 'c' .. n, o.c, 'p' .. n, o.p, 'm' .. n, o.m, 'k' .. n, o.k)
        local e = o.m * 2 + math.max(0, o.w * o.m - now)
        if e > expiry then expiry = e end
      else
        redis.call('HSET', KEYS[1], 'w' .. n, '', 'c' .. n, '', 'p' .. n, '', 'm' .. n, '', 'k' .. n, '')
      end
    end
  end
  redis.call('PEXPIRE', KEYS[1], expiry)
end
local used = p * (window - elapsed) / window + c
if used + 1 <= max then
  c = c + 1
  for i = 1, #others do
    local o = others[i]
    local oi = math.floor(now / o.m)
    if oi < o.w and o.w - oi <= 1 then oi = o.w end
    if o.w ~= oi then
      if o.w == oi - 1 then o.p = o.c else o.p = 0 end
      o.c = 0
      o.w = oi
    end
    o.c = o.c + 1
  end
  save()
  local current = math.ceil(used) + 1
  if current >= max then return {current, retryAfter()} end
  return {current, ahead + window - elapsed}
end
if w ~= index or changed or m == nil then save() end
return {max + 1, retryAfter()}
`
