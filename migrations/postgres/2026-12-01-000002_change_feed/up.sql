-- The change feed that keeps replicas coherent: every committed change to devices, fleets,
-- certificates, rollouts and enrollment requests leaves a row here, written by triggers in the
-- same transaction (no code path can forget one), and wakes the other replicas with NOTIFY.
-- Replicas read rows after the last id they applied, so a missed NOTIFY (a lost connection, a
-- restart) never means a missed change.
CREATE TABLE changes (
    id BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    origin TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

-- Which replica holds each device's session (no row: none).
CREATE TABLE device_sessions (
    device_id TEXT PRIMARY KEY NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    replica TEXT NOT NULL,
    since_ms BIGINT NOT NULL
);
CREATE INDEX device_sessions_replica ON device_sessions (replica);

-- Row triggers are deferred to commit: the feed lock below is then taken after every row lock
-- the transaction needs, so it cannot take part in a deadlock. The lock makes ids commit in
-- order, so a reader that saw id N has seen every id below N.
CREATE FUNCTION flotilla_record_change() RETURNS trigger AS $$
DECLARE
    changed JSONB;
BEGIN
    IF TG_OP = 'DELETE' THEN
        changed := to_jsonb(OLD);
    ELSE
        changed := to_jsonb(NEW);
    END IF;
    PERFORM pg_advisory_xact_lock(5076548640735657985);
    INSERT INTO changes (kind, subject, origin, created_ms)
    VALUES (
        TG_ARGV[0],
        changed ->> TG_ARGV[1],
        COALESCE(current_setting('flotilla.replica', true), ''),
        (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT
    );
    PERFORM pg_notify('flotilla_changes', '');
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE CONSTRAINT TRIGGER devices_written AFTER INSERT OR DELETE ON devices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION flotilla_record_change('device', 'id');
-- Heartbeats (last_seen_ms) stay local: an idle fleet writes no feed rows.
CREATE CONSTRAINT TRIGGER devices_changed AFTER UPDATE ON devices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN ((OLD.name, OLD.labels, OLD.spec, OLD.acked_version, OLD.nacked_version, OLD.last_error,
           OLD.agent_version, OLD.cert_serial, OLD.cert_not_after_ms, OLD.fleet, OLD.fleet_revision,
           OLD.tpm_ek_fingerprint)
          IS DISTINCT FROM
          (NEW.name, NEW.labels, NEW.spec, NEW.acked_version, NEW.nacked_version, NEW.last_error,
           NEW.agent_version, NEW.cert_serial, NEW.cert_not_after_ms, NEW.fleet, NEW.fleet_revision,
           NEW.tpm_ek_fingerprint))
    EXECUTE FUNCTION flotilla_record_change('device', 'id');
CREATE CONSTRAINT TRIGGER device_sessions_changed AFTER INSERT OR UPDATE OR DELETE ON device_sessions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION flotilla_record_change('device', 'device_id');
CREATE CONSTRAINT TRIGGER fleets_changed AFTER INSERT OR UPDATE OR DELETE ON fleets
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION flotilla_record_change('fleet', 'name');
CREATE CONSTRAINT TRIGGER certificates_revoked AFTER UPDATE ON certificates
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.revoked_ms IS DISTINCT FROM NEW.revoked_ms)
    EXECUTE FUNCTION flotilla_record_change('certificate', 'serial');
CREATE CONSTRAINT TRIGGER rollouts_changed AFTER INSERT OR UPDATE OR DELETE ON rollouts
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION flotilla_record_change('rollout', 'id');
CREATE CONSTRAINT TRIGGER enrollments_changed AFTER INSERT OR UPDATE OR DELETE ON enrollment_requests
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION flotilla_record_change('enrollment', 'name');
