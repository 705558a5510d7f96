DROP INDEX changes_others;
DROP INDEX changes_sessions;
DROP TRIGGER device_sessions_changed ON device_sessions;
DROP TRIGGER devices_answered ON devices;
DROP TRIGGER devices_changed ON devices;
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
