-- Refused while the table holds entries: this would drop the audit trail.
DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM bff_audit_entries) THEN
    RAISE EXCEPTION 'migration 001 is not undone while bff_audit_entries holds entries: it would drop the audit trail. Keep version 1 or above, or copy the entries elsewhere and delete them first (DELETE FROM bff_audit_entries)';
  END IF;
END $$;
DROP TABLE IF EXISTS bff_audit_entries;
