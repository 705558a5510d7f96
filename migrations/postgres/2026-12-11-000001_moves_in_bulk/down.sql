DROP TRIGGER devices_moved ON devices;
CREATE CONSTRAINT TRIGGER devices_moved AFTER UPDATE ON devices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN ((OLD.name, OLD.labels, OLD.spec, OLD.tpm_ek_fingerprint)
          IS NOT DISTINCT FROM
          (NEW.name, NEW.labels, NEW.spec, NEW.tpm_ek_fingerprint)
          AND (OLD.fleet, OLD.fleet_revision) IS DISTINCT FROM (NEW.fleet, NEW.fleet_revision))
    EXECUTE FUNCTION flotilla_record_move();
