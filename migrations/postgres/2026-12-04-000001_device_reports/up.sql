-- What each device last reported about itself (system info, resources, firing monitors), as the
-- JSON of `status::DeviceReport`. Written behind by the journal, and only when the content
-- changed; a change is a session fact for the other replicas.
CREATE TABLE device_reports (
    device_id TEXT PRIMARY KEY NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    report TEXT NOT NULL,
    reported_ms BIGINT NOT NULL
);
CREATE CONSTRAINT TRIGGER device_reports_changed AFTER INSERT OR UPDATE ON device_reports
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION flotilla_record_change('session', 'device_id');
