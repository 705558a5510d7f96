-- What each device last reported about itself (system info, resources, firing monitors), as the
-- JSON of `status::DeviceReport`. Written behind by the journal, and only when the content changed.
CREATE TABLE device_reports (
    device_id TEXT PRIMARY KEY NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    report TEXT NOT NULL,
    reported_ms BIGINT NOT NULL
);
