// Small text helpers the firewall's modules share: character tables, the run pre-check, and a
// search for any of a list of literal strings.

/** A table of the ASCII characters given (1: in it), for hasRun and per-character lookups. */
export function charTable (chars: string): Uint8Array {
  const table = new Uint8Array(128)
  for (const c of chars) table[c.charCodeAt(0)] = 1
  return table
}

const inTable = (table: Uint8Array, text: string, i: number): boolean => { const c = text.charCodeAt(i); return c < 128 && table[c] === 1 }

/**
 * Whether the text holds a run of at least `min` characters of the table. No regex: a run of
 * `min` characters covers one of every `min` positions, so only those are probed, and a run is
 * measured only around a probe that falls in one. A pre-check, so that the regexes of rules
 * whose matches are such runs are not tried through texts that hold none.
 */
export function hasRun (text: string, table: Uint8Array, min: number): boolean {
  const n = text.length
  let i = min - 1
  while (i < n) {
    if (!inTable(table, text, i)) { i += min; continue }
    let start = i
    while (start > 0 && i - start + 1 < min && inTable(table, text, start - 1)) start--
    let end = i
    while (end + 1 < n && end - start + 1 < min && inTable(table, text, end + 1)) end++
    if (end - start + 1 >= min) return true
    // end + 1 is not in the table: the next run that can be long enough ends at end + 1 + min or later.
    i = end + 1 + min
  }
  return false
}

/** A regex matching any of these strings, taken literally. */
export function literalSearch (strings: readonly string[], flags: string): RegExp {
  return new RegExp(strings.map(s => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')).join('|'), flags)
}
