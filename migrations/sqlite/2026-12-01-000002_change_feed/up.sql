-- The change feed exists for replicas, which need PostgreSQL; SQLite (one process) keeps the same
-- schema and never writes to it.
CREATE TABLE changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    origin TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE device_sessions (
    device_id TEXT PRIMARY KEY NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    replica TEXT NOT NULL,
    since_ms BIGINT NOT NULL
);
CREATE INDEX device_sessions_replica ON device_sessions (replica);
