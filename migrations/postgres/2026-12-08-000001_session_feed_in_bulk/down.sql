DROP TRIGGER devices_answered ON devices;
DROP TRIGGER device_sessions_changed ON device_sessions;
DROP TRIGGER device_reports_changed ON device_reports;

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
CREATE CONSTRAINT TRIGGER device_reports_changed AFTER INSERT OR UPDATE ON device_reports
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION flotilla_record_change('session', 'device_id');
