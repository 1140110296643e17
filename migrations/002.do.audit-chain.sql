-- One hash chain for every gateway instance. seq is the entry's position in the chain: gapless,
-- assigned by the writer while it holds the chain head's row lock, so a deleted or reordered row
-- shows as a gap or a wrong link. bff_audit_chain holds the head (the last entry written) and
-- the anchor (the last entry retention removed, where verification of the oldest kept row starts).
ALTER TABLE bff_audit_entries ADD COLUMN seq bigint NOT NULL;
CREATE UNIQUE INDEX bff_audit_entries_seq_key ON bff_audit_entries (seq);
CREATE TABLE bff_audit_chain (
  id smallint PRIMARY KEY CHECK (id = 1),
  head_seq bigint NOT NULL,
  head_hash text NOT NULL,
  anchor_seq bigint NOT NULL,
  anchor_hash text NOT NULL
);
INSERT INTO bff_audit_chain (id, head_seq, head_hash, anchor_seq, anchor_hash)
VALUES (1, 0, repeat('0', 64), 0, repeat('0', 64));
