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
  if (state.m !== undefined && state.m !== windowMs) rescale(state, now, windowMs, state.m)
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
 * limit's key, a hash {w, c, p, m}; ARGV: windowMs, max. Returns {current, ttl}.
 */
export const SLIDING_WINDOW_LUA = `
local window = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local index = math.floor(now / window)
local elapsed = now - index * window
local s = redis.call('HMGET', KEYS[1], 'w', 'c', 'p', 'm')
local w = tonumber(s[1])
local c = tonumber(s[2]) or 0
local p = tonumber(s[3]) or 0
local m = tonumber(s[4])
local rescaled = false
if w ~= nil and m ~= nil and m ~= window then
  local at = math.floor(now / m)
  local e = now - at * m
  local used = 0
  if w == at then
    used = p * (m - e) / m + c
  elseif w == at - 1 then
    used = c * (m - e) / m
  elseif w == at + 1 then
    used = c + p
  end
  if window < m then used = used * window / m end
  w = index
  c = math.ceil(used)
  p = 0
  rescaled = true
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
local used = p * (window - elapsed) / window + c
if used + 1 <= max then
  c = c + 1
  redis.call('HSET', KEYS[1], 'w', index, 'c', c, 'p', p, 'm', window)
  redis.call('PEXPIRE', KEYS[1], window * 2 + ahead)
  local current = math.ceil(used) + 1
  if current >= max then return {current, retryAfter()} end
  return {current, ahead + window - elapsed}
end
if w ~= index or rescaled or m == nil then
  redis.call('HSET', KEYS[1], 'w', index, 'c', c, 'p', p, 'm', window)
  redis.call('PEXPIRE', KEYS[1], window * 2 + ahead)
end
return {max + 1, retryAfter()}
`
