-- Rollouts: a fleet's optional rollout policy, each device's pinned revision while a rollout
-- moves it, the persisted progress of each rollout and its events.
ALTER TABLE fleets ADD COLUMN rollout_policy TEXT;
ALTER TABLE devices ADD COLUMN fleet_revision BIGINT;

CREATE TABLE rollouts (
    id TEXT PRIMARY KEY NOT NULL,
    fleet TEXT NOT NULL,
    from_revision BIGINT NOT NULL,
    to_revision BIGINT NOT NULL,
    state TEXT NOT NULL,
    batch BIGINT NOT NULL,
    members TEXT NOT NULL,
    batch_started_ms BIGINT NOT NULL,
    reason TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX rollouts_fleet ON rollouts (fleet, state);

CREATE TABLE rollout_events (
    rollout_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL,
    PRIMARY KEY (rollout_id, seq)
);
