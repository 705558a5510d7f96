-- Creating a fleet over 100,000 devices left 100,000 `device` changes, one per move, and every
-- replica reads every change. The writers of owners and pinned revisions now record their moves
-- themselves, a change per thousand devices carrying each one's owner and revision (as the
-- journal records session facts), and mark those statements with `flotilla.feed_written` so
-- this trigger leaves their rows alone. Any other move is still recorded by the trigger.
DROP TRIGGER devices_moved ON devices;
CREATE CONSTRAINT TRIGGER devices_moved AFTER UPDATE ON devices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN ((OLD.name, OLD.labels, OLD.spec, OLD.tpm_ek_fingerprint)
          IS NOT DISTINCT FROM
          (NEW.name, NEW.labels, NEW.spec, NEW.tpm_ek_fingerprint)
          AND (OLD.fleet, OLD.fleet_revision) IS DISTINCT FROM (NEW.fleet, NEW.fleet_revision)
          AND current_setting('flotilla.feed_written', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION flotilla_record_move();
