/**
 * `foreign(r)` for the Lua scripts of the rate limiter, idempotency and the cache: given what
 * `redis.pcall` answered, true when the command failed WRONGTYPE (a key of another type, which
 * some other program wrote under one of Mantle's names: the script then replaces the key), false
 * when it answered; any other failure (NOPERM: an ACL changed) is raised as `redis.call` raises
 * it, so that it still reads as Redis refusing the gateway. A successful answer that is a table
 * (HMGET's, ZRANGE's) has no `err`.
 */
export const FOREIGN_LUA = `
local function foreign (r)
  if type(r) ~= 'table' or r.err == nil then return false end
  if string.find(r.err, 'WRONGTYPE', 1, true) then return true end
  error(r)
end`
