DROP TABLE IF EXISTS bff_audit_chain;
DROP INDEX IF EXISTS bff_audit_entries_seq_key;
ALTER TABLE bff_audit_entries DROP COLUMN IF EXISTS seq;
