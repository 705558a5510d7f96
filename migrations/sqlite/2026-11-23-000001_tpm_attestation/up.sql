-- TPM attestation: which endorsement key vouched for an enrollment request and its device, and
-- the one-time credential challenges that prove the TPM is present.
ALTER TABLE enrollment_requests ADD COLUMN tpm_ek_fingerprint TEXT;
ALTER TABLE devices ADD COLUMN tpm_ek_fingerprint TEXT;
CREATE INDEX enrollment_requests_tpm ON enrollment_requests (tpm_ek_fingerprint);

CREATE TABLE tpm_challenges (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    ek_fingerprint TEXT NOT NULL,
    secret_digest TEXT NOT NULL,
    expires_ms BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX tpm_challenges_expiry ON tpm_challenges (expires_ms);
