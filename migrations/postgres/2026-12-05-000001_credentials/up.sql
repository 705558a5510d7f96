-- Credentials for people and services calling the admin API, and the certificates issued for them.
-- `grants` is the JSON of a service credential's rights (a role it acts as, or a list of methods);
-- `scope` a label selector ('' for everything).
CREATE TABLE credentials (
    name TEXT PRIMARY KEY NOT NULL,
    role TEXT NOT NULL,
    scope TEXT NOT NULL,
    grants TEXT NOT NULL,
    validity_ms BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    last_used_ms BIGINT,
    revoked_ms BIGINT,
    revocation_reason TEXT
);

CREATE TABLE credential_certificates (
    serial TEXT PRIMARY KEY NOT NULL,
    credential TEXT NOT NULL REFERENCES credentials (name),
    key_fingerprint TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    certificate_pem TEXT NOT NULL,
    not_before_ms BIGINT NOT NULL,
    not_after_ms BIGINT NOT NULL,
    issued_ms BIGINT NOT NULL,
    revoked_ms BIGINT,
    revocation_reason TEXT
);
CREATE INDEX credential_certificates_credential ON credential_certificates (credential);

-- What an audit record is about, by name; '' on device-certificate records (see flotilla::audit).
ALTER TABLE certificate_audit ADD COLUMN target TEXT NOT NULL DEFAULT '';

-- A credential's change (created, renewed, revoked) reaches every replica's registry; its use
-- (last_used_ms) stays out of the feed.
CREATE CONSTRAINT TRIGGER credentials_written AFTER INSERT OR DELETE ON credentials
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION flotilla_record_change('credential', 'name');
CREATE CONSTRAINT TRIGGER credentials_changed AFTER UPDATE ON credentials
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN ((OLD.role, OLD.scope, OLD.grants, OLD.revoked_ms)
          IS DISTINCT FROM (NEW.role, NEW.scope, NEW.grants, NEW.revoked_ms))
    EXECUTE FUNCTION flotilla_record_change('credential', 'name');
CREATE CONSTRAINT TRIGGER credential_certificates_changed AFTER INSERT OR UPDATE ON credential_certificates
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION flotilla_record_change('credential', 'credential');
