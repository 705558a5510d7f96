-- Facts every replica serving this database must share, recorded by the first start: the CA's
-- public-key fingerprint, so a replica started with another CA refuses to serve.
CREATE TABLE deployment_identity (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
