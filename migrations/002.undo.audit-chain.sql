-- Refused while the table holds entries: this drops seq and the chain's head and anchor, which
-- every entry's hash covers, so the chain could not be rebuilt by migrating up again (and up
-- would fail on the entries without a seq).
DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM bff_audit_entries) THEN
    RAISE EXCEPTION 'migration 002 is not undone while bff_audit_entries holds entries: it would drop their hash chain (seq), which cannot be rebuilt. Keep version 2 or above, or copy the entries elsewhere and delete them first (DELETE FROM bff_audit_entries)';
  END IF;
END $$;
DROP TABLE IF EXISTS bff_audit_chain;
DROP INDEX IF EXISTS bff_audit_entries_seq_key;
ALTER TABLE bff_audit_entries DROP COLUMN IF EXISTS seq;
