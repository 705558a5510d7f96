DROP TRIGGER devices_moved ON devices;
DROP TRIGGER devices_changed ON devices;
CREATE CONSTRAINT TRIGGER devices_changed AFTER UPDATE ON devices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN ((OLD.name, OLD.labels, OLD.spec, OLD.fleet, OLD.fleet_revision, OLD.tpm_ek_fingerprint)
          IS DISTINCT FROM
          (NEW.name, NEW.labels, NEW.spec, NEW.fleet, NEW.fleet_revision, NEW.tpm_ek_fingerprint))
    EXECUTE FUNCTION flotilla_record_change('device', 'id');
DROP FUNCTION flotilla_record_move();
