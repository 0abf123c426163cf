-- API keys for the REST server (SPEC §11 "Auth"). Only the SHA-256 of each key's secret is
-- kept; `permissions` is a JSON array of `resource:action` strings.
CREATE TABLE api_keys (
    key_id      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    permissions TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
