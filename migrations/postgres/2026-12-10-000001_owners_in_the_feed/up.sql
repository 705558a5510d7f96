-- Creating a fleet, or changing its selector, moves up to every device of the fleet in one
-- transaction, and rollouts move devices between revisions batch by batch. Each move left a
-- `device` change that the other replicas answered by re-reading the whole device (labels, spec,
-- certificate, session), 100,000 rows per replica for a fleet of 100,000. A device whose owner or
-- pinned revision alone changed now gets a `device` change carrying the new owner and revision,
-- which the other replicas apply as they are; any other change of what renders or identifies a
-- device is recorded and re-read as before.
CREATE FUNCTION flotilla_record_move() RETURNS trigger AS $$
BEGIN
    -- The feed lock, as in flotilla_record_change: ids commit in order.
    PERFORM pg_advisory_xact_lock(5076548640735657985);
    INSERT INTO changes (kind, subject, origin, created_ms, facts)
    VALUES (
        'device',
        NEW.id,
        COALESCE(current_setting('flotilla.replica', true), ''),
        (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT,
        json_build_object('fleet', NEW.fleet, 'revision', NEW.fleet_revision)::text
    );
    PERFORM pg_notify('flotilla_changes', '');
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

DROP TRIGGER devices_changed ON devices;
CREATE CONSTRAINT TRIGGER devices_changed AFTER UPDATE ON devices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN ((OLD.name, OLD.labels, OLD.spec, OLD.tpm_ek_fingerprint)
          IS DISTINCT FROM
          (NEW.name, NEW.labels, NEW.spec, NEW.tpm_ek_fingerprint))
    EXECUTE FUNCTION flotilla_record_change('device', 'id');
CREATE CONSTRAINT TRIGGER devices_moved AFTER UPDATE ON devices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN ((OLD.name, OLD.labels, OLD.spec, OLD.tpm_ek_fingerprint)
          IS NOT DISTINCT FROM
          (NEW.name, NEW.labels, NEW.spec, NEW.tpm_ek_fingerprint)
          AND (OLD.fleet, OLD.fleet_revision) IS DISTINCT FROM (NEW.fleet, NEW.fleet_revision))
    EXECUTE FUNCTION flotilla_record_move();
