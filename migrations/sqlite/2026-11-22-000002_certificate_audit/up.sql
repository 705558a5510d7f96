-- The certificate audit trail: append-only, each row chained to the previous by hash and signed by
-- the audit key (signature as hex). Certificates are looked up by device and key for idempotent
-- renewals.
CREATE TABLE certificate_audit (
    seq BIGINT PRIMARY KEY NOT NULL,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    device_id TEXT NOT NULL,
    serial TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    not_before_ms BIGINT NOT NULL,
    not_after_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    proof TEXT NOT NULL,
    outcome TEXT NOT NULL,
    previous_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE INDEX certificate_audit_device ON certificate_audit (device_id);
CREATE INDEX certificate_audit_at ON certificate_audit (at_ms);
CREATE INDEX certificates_device_key ON certificates (device_id, key_fingerprint);
