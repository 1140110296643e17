DROP TABLE IF EXISTS bff_audit_entries;
