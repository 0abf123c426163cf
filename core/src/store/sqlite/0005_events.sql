-- The domain-event outbox (SPEC §10): one row per durable or broadcast event, written in the
-- transaction that commits the step result that fired it.
CREATE TABLE domain_events (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id          TEXT NOT NULL UNIQUE,
    event_name        TEXT NOT NULL,
    delivery_mode     TEXT NOT NULL,
    task_uuid         TEXT NOT NULL,
    step_uuid         TEXT NOT NULL,
    payload           TEXT NOT NULL,
    metadata          TEXT NOT NULL,
    created_at        INTEGER NOT NULL,
    -- Delivery to subscribers (durable events only).
    delivered_at      INTEGER,
    delivery_attempts INTEGER NOT NULL DEFAULT 0,
    next_delivery_at  INTEGER,
    claimed_until     INTEGER,
    last_error        TEXT
);
CREATE INDEX domain_events_undelivered ON domain_events (seq)
    WHERE delivered_at IS NULL AND delivery_mode = 'durable';
CREATE INDEX domain_events_by_task ON domain_events (task_uuid, seq);
