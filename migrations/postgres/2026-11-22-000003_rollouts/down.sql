DROP TABLE rollout_events;
DROP INDEX rollouts_fleet;
DROP TABLE rollouts;
ALTER TABLE devices DROP COLUMN fleet_revision;
ALTER TABLE fleets DROP COLUMN rollout_policy;
