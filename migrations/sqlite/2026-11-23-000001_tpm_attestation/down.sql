DROP TABLE tpm_challenges;
DROP INDEX enrollment_requests_tpm;
ALTER TABLE devices DROP COLUMN tpm_ek_fingerprint;
ALTER TABLE enrollment_requests DROP COLUMN tpm_ek_fingerprint;
