-- The journal writes the session facts of many devices in one statement per kind; a row trigger
-- then cost a PL/pgSQL call and an INSERT per device (about 30 µs each, at commit), the largest
-- part of the database's work in a fan-out or a reconnect of a large fleet. The journal now
-- writes those change rows itself, one INSERT for the whole batch, as the last statement of its
-- transaction (after every row lock it takes, as the deferred triggers do), and marks its bulk
-- statements with the setting `flotilla.feed_written` so the triggers leave those rows alone.
-- Every other writer is unchanged: the triggers still record its changes.
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
           NEW.cert_serial, NEW.cert_not_after_ms)
          AND current_setting('flotilla.feed_written', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION flotilla_record_change('session', 'id');
CREATE CONSTRAINT TRIGGER device_sessions_changed AFTER INSERT OR UPDATE OR DELETE ON device_sessions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('flotilla.feed_written', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION flotilla_record_change('session', 'device_id');
CREATE CONSTRAINT TRIGGER device_reports_changed AFTER INSERT OR UPDATE ON device_reports
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('flotilla.feed_written', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION flotilla_record_change('session', 'device_id');
