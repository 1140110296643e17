DROP INDEX IF EXISTS bff_audit_entries_hash_idx;
CREATE INDEX bff_audit_entries_hash_idx ON bff_audit_entries (hash);
