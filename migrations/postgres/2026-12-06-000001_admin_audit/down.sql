ALTER TABLE enrollment_requests DROP COLUMN source_address;
ALTER TABLE enrollment_requests DROP COLUMN credential;
DROP TABLE audit_heads;
DROP INDEX certificate_audit_actor;
DROP INDEX certificate_audit_target;
ALTER TABLE certificate_audit DROP COLUMN revision;
ALTER TABLE certificate_audit DROP COLUMN method;
ALTER TABLE certificate_audit DROP COLUMN role;
