CREATE TABLE templates (
    namespace     TEXT NOT NULL,
    name          TEXT NOT NULL,
    version       TEXT NOT NULL,
    content_hash  TEXT NOT NULL,
    definition    TEXT NOT NULL,
    registered_at INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
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
    priority              INTEGER NOT NULL,
    correlation_id        TEXT NOT NULL,
    parent_correlation_id TEXT,
    idempotency_key       TEXT,
    identity_hash         TEXT UNIQUE,
    created_at            INTEGER NOT NULL,
    updated_at            INTEGER NOT NULL,
    state_entered_at      INTEGER NOT NULL,
    completed_at          INTEGER
);
CREATE INDEX tasks_by_created ON tasks (created_at);
CREATE INDEX tasks_by_state ON tasks (state);

CREATE TABLE steps (
    step_uuid        TEXT PRIMARY KEY,
    task_uuid        TEXT NOT NULL REFERENCES tasks (task_uuid),
    seq              INTEGER NOT NULL,
    name             TEXT NOT NULL,
    namespace        TEXT NOT NULL,
    callable         TEXT NOT NULL,
    step_type        TEXT NOT NULL,
    definition       TEXT NOT NULL,
    inputs           TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    priority         INTEGER NOT NULL,
    timeout_ms       INTEGER,
    enqueued_at      INTEGER,
    next_attempt_at  INTEGER,
    lease_expires_at INTEGER,
    timeout_at       INTEGER,
    worker_id        TEXT,
    result           TEXT,
    error            TEXT,
    checkpoint       TEXT,
    checkpoint_history TEXT,
    started_at       INTEGER,
    completed_at     INTEGER,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    UNIQUE (task_uuid, name)
);
CREATE INDEX steps_ready ON steps (priority DESC, enqueued_at) WHERE state = 'enqueued';
CREATE INDEX steps_retry ON steps (next_attempt_at) WHERE state = 'waiting_for_retry';
CREATE INDEX steps_running_lease ON steps (lease_expires_at) WHERE state = 'in_progress';
CREATE INDEX steps_running_timeout ON steps (timeout_at) WHERE state = 'in_progress';
CREATE INDEX steps_by_task ON steps (task_uuid, state);

CREATE TABLE step_edges (
    task_uuid TEXT NOT NULL,
    from_step TEXT NOT NULL,
    to_step   TEXT NOT NULL,
    PRIMARY KEY (to_step, from_step)
);
CREATE INDEX step_edges_from ON step_edges (from_step);

CREATE TABLE task_transitions (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_uuid  TEXT NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    event      TEXT NOT NULL,
    actor      TEXT NOT NULL,
    reason     TEXT,
    metadata   TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX task_transitions_by_task ON task_transitions (task_uuid, id);

CREATE TABLE step_transitions (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    step_uuid  TEXT NOT NULL,
    task_uuid  TEXT NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    event      TEXT NOT NULL,
    actor      TEXT NOT NULL,
    reason     TEXT,
    attempt    INTEGER,
    metadata   TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX step_transitions_by_task ON step_transitions (task_uuid, id);

CREATE TABLE rejected_completions (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    step_uuid  TEXT NOT NULL,
    task_uuid  TEXT,
    attempt    INTEGER NOT NULL,
    worker_id  TEXT,
    reason     TEXT NOT NULL,
    outcome    TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX rejected_completions_by_task ON rejected_completions (task_uuid);
