-- The audit trail: one row per call through the gateway (README, "Audit trail").
-- request_id is UNIQUE: its constraint's index is the request_id index. A request id that is
-- already stored gets the suffix "~<entry id>" when written (the gateway never loses an entry
-- to a client re-using its own x-request-id).
CREATE TABLE bff_audit_entries (
  id uuid PRIMARY KEY,
  request_id text NOT NULL,
  "timestamp" timestamptz NOT NULL,
  hash text NOT NULL,
  previous_hash text NOT NULL,
  tenant_id text NOT NULL,
  user_id text NOT NULL,
  method text,
  path text,
  protocol text NOT NULL,
  action text NOT NULL,
  category text NOT NULL CHECK (category IN ('read', 'write', 'auth', 'admin', 'security')),
  risk_level text NOT NULL,
  status text NOT NULL,
  status_code integer NOT NULL,
  duration_ms double precision NOT NULL,
  metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
  created_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT bff_audit_entries_request_id_key UNIQUE (request_id)
);
CREATE INDEX bff_audit_entries_tenant_id_idx ON bff_audit_entries (tenant_id);
CREATE INDEX bff_audit_entries_timestamp_idx ON bff_audit_entries ("timestamp");
CREATE INDEX bff_audit_entries_hash_idx ON bff_audit_entries (hash);
CREATE INDEX bff_audit_entries_tenant_id_timestamp_idx ON bff_audit_entries (tenant_id, "timestamp");
