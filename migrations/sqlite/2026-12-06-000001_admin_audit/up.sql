-- Admin calls in the audit trail: the caller's role, the gRPC method, and the revision or version the
-- change produced ('' where none; see flotilla::audit for how they are hashed).
ALTER TABLE certificate_audit ADD COLUMN role TEXT NOT NULL DEFAULT '';
ALTER TABLE certificate_audit ADD COLUMN method TEXT NOT NULL DEFAULT '';
ALTER TABLE certificate_audit ADD COLUMN revision TEXT NOT NULL DEFAULT '';
CREATE INDEX certificate_audit_target ON certificate_audit (target);
CREATE INDEX certificate_audit_actor ON certificate_audit (actor);

-- The chain head signed with a timestamp, periodically: deleting the newest records is detectable
-- against any head kept elsewhere.
CREATE TABLE audit_heads (
    seq BIGINT PRIMARY KEY NOT NULL,
    hash TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    signature TEXT NOT NULL
);

-- Which enrollment credential a request came with and from where.
ALTER TABLE enrollment_requests ADD COLUMN credential TEXT NOT NULL DEFAULT '';
ALTER TABLE enrollment_requests ADD COLUMN source_address TEXT NOT NULL DEFAULT '';
