-- Fleets: a selector, label defaults, and the current revision of the template. Every template
-- change is a new immutable row in fleet_revisions. A device records the fleet that owns it.
CREATE TABLE fleets (
    name TEXT PRIMARY KEY NOT NULL,
    selector TEXT NOT NULL,
    label_defaults TEXT NOT NULL,
    revision BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE fleet_revisions (
    fleet TEXT NOT NULL,
    revision BIGINT NOT NULL,
    template TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    PRIMARY KEY (fleet, revision)
);

ALTER TABLE devices ADD COLUMN fleet TEXT;
CREATE INDEX devices_fleet ON devices (fleet);
