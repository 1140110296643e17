// What a token's claims may hold to travel to the Kernel as headers: identity refuses a token
// beyond it, and the manifest a role no token could carry. Its own module, with no imports: the
// manifest (and so server.ts, before the configuration is read) loads it without identity's.

/**
 * What a header value can carry unchanged: visible Latin-1 characters, inner spaces and tabs,
 * no surrounding whitespace. A control character or a code point above U+00FF made the Kernel
 * request fail before it left (a 503 that also tripped the breaker for every tenant), and
 * surrounding spaces are trimmed on the way, so " acme" would have reached acme's data.
 */
export const HEADER_SAFE = /^[\x21-\x7e\xa1-\xff](?:[\t\x20-\x7e\xa0-\xff]{0,254}[\x21-\x7e\xa1-\xff])?$/

/** Whether a token may carry `role`: HEADER_SAFE and no comma, as roles travel joined in x-user-roles. */
export const carriesRole = (role: string): boolean => HEADER_SAFE.test(role) && !role.includes(',')
