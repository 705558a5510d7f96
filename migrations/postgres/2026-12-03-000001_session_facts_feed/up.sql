-- Session facts (what a device answered, which replica holds its session, which certificate it
-- holds) get a change kind of their own, 'session': the other replicas then re-read just those few
-- columns instead of the whole device, and know nothing about its rendering changed. A fan-out or a
-- renewal of a large fleet is followed by one such change per device, so this is the feed's bulk.
DROP TRIGGER devices_changed ON devices;
DROP TRIGGER device_sessions_changed ON device_sessions;

-- What renders or identifies a device.
CREATE CONSTRAINT TRIGGER devices_changed AFTER UPDATE ON devices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN ((OLD.name, OLD.labels, OLD.spec, OLD.fleet, OLD.fleet_revision, OLD.tpm_ek_fingerprint)
          IS DISTINCT FROM
          (NEW.name, NEW.labels, NEW.spec, NEW.fleet, NEW.fleet_revision, NEW.tpm_ek_fingerprint))
    EXECUTE FUNCTION flotilla_record_change('device', 'id');
-- Only what the device answered or the certificate it holds. Heartbeats (last_seen_ms) stay local,
-- as before.
CREATE CONSTRAINT TRIGGER devices_answered AFTER UPDATE ON devices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN ((OLD.name, OLD.labels, OLD.spec, OLD.fleet, OLD.fleet_revision, OLD.tpm_ek_fingerprint)
          IS NOT DISTINCT FROM
          (NEW.name, NEW.labels, NEW.spec, NEW.fleet, NEW.fleet_revision, NEW.tpm_ek_fingerprint)
          AND (OLD.acked_version, OLD.nacked_version, OLD.last_error, OLD.agent_version,
               OLD.cert_serial, OLD.cert_not_after_ms)
          IS DISTINCT FROM
          (NEW.acked_version, NEW.nacked_version, NEW.last_error, NEW.agent_version,
           NEW.cert_serial, NEW.cert_not_after_ms))
    EXECUTE FUNCTION flotilla_record_change('session', 'id');
CREATE CONSTRAINT TRIGGER device_sessions_changed AFTER INSERT OR UPDATE OR DELETE ON device_sessions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION flotilla_record_change('session', 'device_id');

-- The feed is followed in two lanes (session facts, everything else), each in id order; these let
-- either lane skip the other's rows.
CREATE INDEX changes_sessions ON changes (id) WHERE kind = 'session';
CREATE INDEX changes_others ON changes (id) WHERE kind <> 'session';
