-- Agent releases published by operators: which build a version names (content-addressed by the
-- binary's SHA-256), the operator's signature over it, and who published it. A release published
-- with a url is downloaded from there; otherwise its bytes are in artifact_chunks, so every
-- replica can serve it.
CREATE TABLE agent_releases (
    version TEXT PRIMARY KEY NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    size BIGINT NOT NULL,
    signature TEXT NOT NULL,
    url TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    published_ms BIGINT NOT NULL,
    published_by TEXT NOT NULL
);

-- The bytes of stored artifacts in order, at most 1 MiB a row.
CREATE TABLE artifact_chunks (
    sha256 TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (sha256, seq)
);
