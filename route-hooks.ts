// Hooks added to a route as it is declared (onRoute), by the plugins that need them on some
// routes only: the rate-limit guard, /graphql's upgrade check, the audit of admin routes, HEAD's
// Content-Length. Fastify gives a route's hooks of one kind as none, one, or a list.

/** A route's hooks of one kind with `hook` added after them, or (`first`) before them. */
export function withHook<T> (own: T | T[] | undefined, hook: T, first = false): T[] {
  const list = own === undefined ? [] : Array.isArray(own) ? own : [own]
  return first ? [hook, ...list] : [...list, hook]
}
