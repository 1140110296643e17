ALTER TABLE bff_audit_entries ADD CONSTRAINT bff_audit_entries_request_id_key UNIQUE (request_id);
DROP INDEX IF EXISTS bff_audit_entries_request_id_idx;
