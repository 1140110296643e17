-- The index on tenant_id becomes one on (tenant_id, seq). GET /admin/audit?tenant=X with no time
-- range asks for a tenant's entries newest first by position (tenant_id = X, seq below the
-- cursor, ORDER BY seq DESC): no index served that order, and the page was read from windows of
-- the newest positions by the seq index, passing over other tenants' entries (up to 60,003 rows
-- for a first page at a million rows), then from the tenant's whole index, sorted. One backward
-- scan of (tenant_id, seq) reads the page's rows and no other. It replaces the (tenant_id) index
-- rather than adding one: an index whose leading column is tenant_id serves every lookup by
-- tenant_id (issue 6's "indexes on request_id, tenant_id, timestamp, hash, and tenant_id +
-- timestamp" are all still served), and every index costs every insert: the table keeps 7.
-- A run of the migrations is one transaction, where PostgreSQL refuses CREATE INDEX
-- CONCURRENTLY: the index is built while the table is locked against writes (reads go on),
-- about 1 s per million entries; the gateway's writes wait meanwhile (a write that waits past
-- its query timeout is spooled). It is built before the old index is dropped: DROP INDEX locks
-- the table against reads too, until the run commits, which is then at once.
CREATE INDEX bff_audit_entries_tenant_id_seq_idx ON bff_audit_entries (tenant_id, seq);
DROP INDEX IF EXISTS bff_audit_entries_tenant_id_idx;
