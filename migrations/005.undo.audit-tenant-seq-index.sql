CREATE INDEX bff_audit_entries_tenant_id_idx ON bff_audit_entries (tenant_id);
DROP INDEX IF EXISTS bff_audit_entries_tenant_id_seq_idx;
