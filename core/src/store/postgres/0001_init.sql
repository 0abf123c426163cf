-- The PostgreSQL schema: the same tables, columns and meanings as the SQLite one. Times are
-- milliseconds since the epoch (BIGINT, from the engine's clock, never the server's), and JSON
-- is kept as text, exactly as the engine wrote it, so both backends read rows the same way.

CREATE TABLE templates (
    namespace     TEXT NOT NULL,
    name          TEXT NOT NULL,
    version       TEXT NOT NULL,
    content_hash  TEXT NOT NULL,
    definition    TEXT NOT NULL,
    registered_at BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (namespace, name, version)
);

CREATE TABLE template_snapshots (
    content_hash TEXT PRIMARY KEY,
    definition   TEXT NOT NULL
);

CREATE TABLE tasks (
    task_uuid             TEXT PRIMARY KEY,
    namespace             TEXT NOT NULL,
    name                  TEXT NOT NULL,
    version               TEXT NOT NULL,
    template_hash         TEXT NOT NULL,
    state                 TEXT NOT NULL,
    context               TEXT NOT NULL,
    initiator             TEXT NOT NULL,
    source_system         TEXT NOT NULL,
    reason                TEXT NOT NULL,
    tags                  TEXT NOT NULL,
    priority              BIGINT NOT NULL,
    correlation_id        TEXT NOT NULL,
    parent_correlation_id TEXT,
    idempotency_key       TEXT,
    identity_hash         TEXT UNIQUE,
    parent_task_uuid      TEXT,
    parent_step_uuid      TEXT,
    created_at            BIGINT NOT NULL,
    updated_at            BIGINT NOT NULL,
    state_entered_at      BIGINT NOT NULL,
    completed_at          BIGINT
);
CREATE INDEX tasks_by_created ON tasks (created_at);
CREATE INDEX tasks_by_state ON tasks (state);
CREATE INDEX tasks_by_parent_step ON tasks (parent_step_uuid) WHERE parent_step_uuid IS NOT NULL;
CREATE INDEX tasks_by_parent_task ON tasks (parent_task_uuid) WHERE parent_task_uuid IS NOT NULL;
CREATE INDEX tasks_open_children ON tasks (parent_step_uuid)
    WHERE parent_step_uuid IS NOT NULL AND completed_at IS NULL;

CREATE TABLE steps (
    step_uuid          TEXT PRIMARY KEY,
    task_uuid          TEXT NOT NULL REFERENCES tasks (task_uuid),
    seq                BIGINT NOT NULL,
    name               TEXT NOT NULL,
    namespace          TEXT NOT NULL,
    callable           TEXT NOT NULL,
    step_type          TEXT NOT NULL,
    definition         TEXT NOT NULL,
    inputs             TEXT NOT NULL,
    state              TEXT NOT NULL,
    attempts           BIGINT NOT NULL DEFAULT 0,
    max_attempts       BIGINT NOT NULL,
    priority           BIGINT NOT NULL,
    timeout_ms         BIGINT,
    enqueued_at        BIGINT,
    next_attempt_at    BIGINT,
    lease_expires_at   BIGINT,
    timeout_at         BIGINT,
    worker_id          TEXT,
    result             TEXT,
    error              TEXT,
    checkpoint         TEXT,
    checkpoint_history TEXT,
    started_at         BIGINT,
    completed_at       BIGINT,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    batch_group        TEXT,
    batch_parallelism  BIGINT,
    batch_strategy     TEXT,
    UNIQUE (task_uuid, name)
);
CREATE INDEX steps_ready ON steps (priority DESC, enqueued_at) WHERE state = 'enqueued';
-- The engine's own claim of workflow steps must not wade through every ready handler step.
CREATE INDEX steps_ready_workflows ON steps (priority DESC, enqueued_at)
    WHERE state = 'enqueued' AND step_type = 'workflow';
CREATE INDEX steps_retry ON steps (next_attempt_at) WHERE state = 'waiting_for_retry';
CREATE INDEX steps_running_lease ON steps (lease_expires_at) WHERE state = 'in_progress';
CREATE INDEX steps_running_timeout ON steps (timeout_at) WHERE state = 'in_progress';
CREATE INDEX steps_by_task ON steps (task_uuid, state);
CREATE INDEX steps_batch ON steps (task_uuid, batch_group, state) WHERE batch_group IS NOT NULL;

CREATE TABLE step_edges (
    task_uuid TEXT NOT NULL,
    from_step TEXT NOT NULL,
    to_step   TEXT NOT NULL,
    PRIMARY KEY (to_step, from_step)
);
CREATE INDEX step_edges_from ON step_edges (from_step);

CREATE TABLE task_transitions (
    id         BIGSERIAL PRIMARY KEY,
    task_uuid  TEXT NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    event      TEXT NOT NULL,
    actor      TEXT NOT NULL,
    reason     TEXT,
    metadata   TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX task_transitions_by_task ON task_transitions (task_uuid, id);

CREATE TABLE step_transitions (
    id         BIGSERIAL PRIMARY KEY,
    step_uuid  TEXT NOT NULL,
    task_uuid  TEXT NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    event      TEXT NOT NULL,
    actor      TEXT NOT NULL,
    reason     TEXT,
    attempt    BIGINT,
    metadata   TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX step_transitions_by_task ON step_transitions (task_uuid, id);

CREATE TABLE rejected_completions (
    id         BIGSERIAL PRIMARY KEY,
    step_uuid  TEXT NOT NULL,
    task_uuid  TEXT,
    attempt    BIGINT NOT NULL,
    worker_id  TEXT,
    reason     TEXT NOT NULL,
    outcome    TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX rejected_completions_by_task ON rejected_completions (task_uuid);

CREATE TABLE dlq_entries (
    dlq_entry_uuid    TEXT PRIMARY KEY,
    task_uuid         TEXT NOT NULL REFERENCES tasks (task_uuid),
    namespace         TEXT NOT NULL,
    name              TEXT NOT NULL,
    version           TEXT NOT NULL,
    reason            TEXT NOT NULL,
    message           TEXT NOT NULL,
    original_state    TEXT NOT NULL,
    snapshot          TEXT NOT NULL,
    resolution_status TEXT NOT NULL DEFAULT 'pending',
    resolution_notes  TEXT,
    resolved_by       TEXT,
    resolved_at       BIGINT,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL
);
CREATE INDEX dlq_entries_by_created ON dlq_entries (created_at);
CREATE INDEX dlq_entries_by_task ON dlq_entries (task_uuid);
CREATE INDEX dlq_entries_by_status ON dlq_entries (resolution_status, created_at);

CREATE TABLE domain_events (
    seq               BIGSERIAL PRIMARY KEY,
    event_id          TEXT NOT NULL UNIQUE,
    event_name        TEXT NOT NULL,
    delivery_mode     TEXT NOT NULL,
    task_uuid         TEXT NOT NULL,
    step_uuid         TEXT NOT NULL,
    payload           TEXT NOT NULL,
    metadata          TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    delivered_at      BIGINT,
    delivery_attempts BIGINT NOT NULL DEFAULT 0,
    next_delivery_at  BIGINT,
    claimed_until     BIGINT,
    last_error        TEXT
);
CREATE INDEX domain_events_undelivered ON domain_events (seq)
    WHERE delivered_at IS NULL AND delivery_mode = 'durable';
CREATE INDEX domain_events_by_task ON domain_events (task_uuid, seq);
