DROP INDEX devices_fleet;
ALTER TABLE devices DROP COLUMN fleet;
DROP TABLE fleet_revisions;
DROP TABLE fleets;
