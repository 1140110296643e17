-- The request_id index becomes one a prefix search can use. GET /admin/audit?requestId=X looks
-- for X and for X~<entry id> (a taken request id stored with its suffix): request_id = X OR
-- request_id LIKE 'X~%'. A B-tree under the database's collation serves LIKE only with the "C"
-- collation; under any other (en_US.UTF-8, C.UTF-8) the lookup scanned the whole table (170 ms
-- at 300,000 rows, and growing with the 90 days kept). text_pattern_ops orders by bytes, serves
-- both the equality and the prefix, and keeps request_id unique: it replaces the constraint's
-- index rather than adding one to every insert. The index is built while the table is locked
-- against writes; the gateway's writes wait meanwhile (a write that waits past its query
-- timeout is spooled).
CREATE UNIQUE INDEX bff_audit_entries_request_id_idx ON bff_audit_entries (request_id text_pattern_ops);
ALTER TABLE bff_audit_entries DROP CONSTRAINT bff_audit_entries_request_id_key;
