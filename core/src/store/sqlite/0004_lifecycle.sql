-- The dead-letter record (SPEC §9): one entry per task that a lifecycle limit or the staleness
-- threshold moved to `error`. The limits themselves are not copied here or onto the task: they
-- are read from the template snapshot each task runs (`template_snapshots`), which never changes.
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
    resolved_at       INTEGER,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);
CREATE INDEX dlq_entries_by_created ON dlq_entries (created_at);
CREATE INDEX dlq_entries_by_task ON dlq_entries (task_uuid);
CREATE INDEX dlq_entries_by_status ON dlq_entries (resolution_status, created_at);
