-- Devices, enrollment requests and issued certificates. Instants are Unix milliseconds (BIGINT);
-- label sets and specs are JSON text, so both backends share one schema and one store code path.
CREATE TABLE devices (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL UNIQUE,
    labels TEXT NOT NULL,
    spec TEXT NOT NULL,
    acked_version TEXT,
    nacked_version TEXT,
    last_error TEXT,
    agent_version TEXT,
    last_seen_ms BIGINT,
    cert_serial TEXT,
    cert_not_after_ms BIGINT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE enrollment_requests (
    name TEXT PRIMARY KEY NOT NULL,
    key_fingerprint TEXT NOT NULL,
    csr_pem TEXT NOT NULL,
    labels TEXT NOT NULL,
    system_info TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    device_id TEXT,
    certificate_serial TEXT,
    created_ms BIGINT NOT NULL,
    decided_ms BIGINT,
    decided_by TEXT
);
CREATE INDEX enrollment_requests_state ON enrollment_requests (state);

CREATE TABLE certificates (
    serial TEXT PRIMARY KEY NOT NULL,
    device_id TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    certificate_pem TEXT NOT NULL,
    not_before_ms BIGINT NOT NULL,
    not_after_ms BIGINT NOT NULL,
    issued_ms BIGINT NOT NULL,
    revoked_ms BIGINT,
    revocation_reason TEXT
);
CREATE INDEX certificates_device ON certificates (device_id);
