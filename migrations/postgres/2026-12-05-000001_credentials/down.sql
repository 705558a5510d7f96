ALTER TABLE certificate_audit DROP COLUMN target;
DROP TABLE credential_certificates;
DROP TABLE credentials;
