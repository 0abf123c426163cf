//! PostgreSQL: the domain-event outbox (SPEC §10), the lifecycle check and the dead-letter
//! record (SPEC §9), API keys.

use std::sync::LazyLock;

use sqlx::{AssertSqlSafe, PgConnection, PgPool};

use super::write::flush;
use crate::Result;
use crate::clock::Millis;
use crate::dlq::{DlqEntry, DlqFilter, DlqResolution, DlqStats, LifecycleExceeded};
use crate::events::{EventFilter, StoredEvent};
use crate::state::TaskState;
use crate::store::apply::{Candidate, SnapStep, lifecycle_plan, overdue};
use crate::store::journal::Journal;
use crate::store::rows::{
    self, API_KEY_COLUMNS, Cols, DLQ_COLUMNS, DLQ_STATS, EVENT_COLUMNS, dlq_entry, json,
    stored_event,
};
use crate::{Error, Result as R};

// ---------------------------------------------------------------- outbox

/// Claims up to `limit` undelivered durable events that are due and not claimed by a live
/// delivery (another process's claims are skipped), oldest first, until `claimed_until`.
pub(super) async fn claim_events(
    pool: &PgPool,
    limit: usize,
    claimed_until: Millis,
    now: Millis,
) -> Result<Vec<StoredEvent>> {
    let sql = format!(
        "UPDATE domain_events SET claimed_until = $1, delivery_attempts = delivery_attempts + 1
         WHERE seq IN (
            SELECT seq FROM domain_events
            WHERE delivered_at IS NULL AND delivery_mode = 'durable'
              AND next_delivery_at <= $2 AND (claimed_until IS NULL OR claimed_until <= $2)
            ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED)
         RETURNING {EVENT_COLUMNS}"
    );
    let found = sqlx::query(AssertSqlSafe(sql))
        .bind(claimed_until)
        .bind(now)
        .bind(limit as i64)
        .fetch_all(pool)
        .await?;
    let mut events = found.iter().map(stored_event).collect::<R<Vec<_>>>()?;
    events.sort_by_key(|e| e.seq);
    Ok(events)
}

/// Records delivery outcomes `(seq, outcome, retry_at)` in one statement.
pub(super) async fn record_deliveries(
    pool: &PgPool,
    outcomes: &[(i64, std::result::Result<(), String>, Millis)],
    now: Millis,
) -> Result<()> {
    if outcomes.is_empty() {
        return Ok(());
    }
    let seqs: Vec<i64> = outcomes.iter().map(|(s, _, _)| *s).collect();
    let errors: Vec<Option<&str>> = outcomes
        .iter()
        .map(|(_, o, _)| o.as_ref().err().map(String::as_str))
        .collect();
    let retry: Vec<i64> = outcomes.iter().map(|(_, _, r)| *r).collect();
    sqlx::query(
        "UPDATE domain_events d SET claimed_until = NULL,
            delivered_at = CASE WHEN o.error IS NULL THEN $1 ELSE d.delivered_at END,
            next_delivery_at = CASE WHEN o.error IS NULL THEN d.next_delivery_at ELSE o.retry_at END,
            last_error = COALESCE(o.error, d.last_error)
         FROM unnest($2::int8[], $3::text[], $4::int8[]) AS o(seq, error, retry_at)
         WHERE d.seq = o.seq",
    )
    .bind(now)
    .bind(&seqs)
    .bind(&errors)
    .bind(&retry)
    .execute(pool)
    .await?;
    Ok(())
}

pub(super) async fn list_events(pool: &PgPool, f: &EventFilter) -> Result<Vec<StoredEvent>> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM domain_events
         WHERE ($1::text IS NULL OR task_uuid = $1) AND seq > $2
         ORDER BY seq LIMIT $3"
    );
    let found = sqlx::query(AssertSqlSafe(sql))
        .bind(&f.task_uuid)
        .bind(f.after_seq.unwrap_or(0))
        .bind(i64::from(f.limit.unwrap_or(100).clamp(1, 1000)))
        .fetch_all(pool)
        .await?;
    found.iter().map(stored_event).collect()
}

pub(super) async fn next_event_due(pool: &PgPool) -> Result<Option<Millis>> {
    Ok(sqlx::query_scalar(
        "SELECT MIN(GREATEST(next_delivery_at, COALESCE(claimed_until, 0))) FROM domain_events
         WHERE delivered_at IS NULL AND delivery_mode = 'durable'",
    )
    .fetch_one(pool)
    .await?)
}

// ---------------------------------------------------------------- lifecycle

/// Unfinished tasks that may be past a limit (the verdict is [`crate::lifecycle::exceeded`]'s):
/// limits come from the template snapshot each runs, parsed once per distinct template.
/// Parameters: `$1` now, `$2` the staleness threshold in ms (NULL: none).
const CANDIDATES: &str = "
WITH open AS (
  SELECT task_uuid, namespace, name, version, state, priority, initiator, source_system,
         reason, correlation_id, template_hash, created_at, state_entered_at
  FROM tasks WHERE state IN ({open})
),
limits AS (
  SELECT content_hash,
    (definition::json #>> '{lifecycle,max_duration_minutes}')::float8 AS max_duration,
    (definition::json #>> '{lifecycle,max_waiting_for_dependencies_minutes}')::float8
      AS max_waiting_for_dependencies,
    (definition::json #>> '{lifecycle,max_waiting_for_retry_minutes}')::float8
      AS max_waiting_for_retry,
    (definition::json #>> '{lifecycle,max_steps_in_process_minutes}')::float8
      AS max_steps_in_process
  FROM template_snapshots WHERE content_hash IN (SELECT template_hash FROM open)
),
candidates AS (
  SELECT o.*, l.max_duration, l.max_waiting_for_dependencies, l.max_waiting_for_retry,
    l.max_steps_in_process,
    COALESCE((SELECT tt.created_at FROM task_transitions tt WHERE tt.task_uuid = o.task_uuid
              ORDER BY tt.id DESC LIMIT 1), o.state_entered_at) AS entered_at
  FROM open o LEFT JOIN limits l ON l.content_hash = o.template_hash
  WHERE o.created_at + l.max_duration * 60000 < $1
     OR (o.state = 'waiting_for_dependencies'
         AND o.state_entered_at + l.max_waiting_for_dependencies * 60000 < $1)
     OR (o.state = 'waiting_for_retry' AND o.state_entered_at + l.max_waiting_for_retry * 60000 < $1)
     OR (o.state = 'steps_in_process' AND o.state_entered_at + l.max_steps_in_process * 60000 < $1)
     OR o.state_entered_at + $2 < $1
)
SELECT c.*, GREATEST(c.entered_at, COALESCE(
         (SELECT MAX(s.updated_at) FROM steps s WHERE s.task_uuid = c.task_uuid), c.entered_at))
       AS active_at
FROM candidates c ORDER BY c.created_at, c.task_uuid";

static CANDIDATES_SQL: LazyLock<String> = LazyLock::new(|| {
    let open: Vec<String> = TaskState::ALL
        .iter()
        .filter(|s| !s.is_terminal())
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    CANDIDATES.replace("{open}", &open.join(", "))
});

/// The lifecycle check (see [`crate::store::Store::enforce_lifecycle`]). The overdue tasks'
/// rows are locked and their states read again before anything moves: a task that a
/// concurrent transaction moved meanwhile is left for the next check.
pub(super) async fn enforce_lifecycle(
    tx: &mut PgConnection,
    now: Millis,
    staleness_threshold_ms: Option<i64>,
    actor: &str,
    limit: usize,
) -> Result<Vec<LifecycleExceeded>> {
    let found = sqlx::query(AssertSqlSafe(CANDIDATES_SQL.as_str()))
        .bind(now)
        .bind(staleness_threshold_ms)
        .fetch_all(&mut *tx)
        .await?;
    let candidates = found.iter().map(Candidate::of).collect::<R<Vec<_>>>()?;
    let mut overdue = overdue(candidates, staleness_threshold_ms, now, limit);
    if overdue.is_empty() {
        return Ok(Vec::new());
    }
    let uuids: Vec<&str> = overdue.iter().map(|(c, _)| c.task_uuid()).collect();
    let locked = sqlx::query(
        "SELECT task_uuid, state FROM tasks WHERE task_uuid = ANY($1)
         ORDER BY task_uuid FOR UPDATE",
    )
    .bind(&uuids)
    .fetch_all(&mut *tx)
    .await?;
    let mut still: Vec<(String, String)> = Vec::with_capacity(locked.len());
    for r in &locked {
        still.push((r.text("task_uuid")?, r.text("state")?));
    }
    overdue.retain(|(c, _)| {
        still
            .iter()
            .any(|(t, s)| t == c.task_uuid() && *s == c.state_name())
    });
    if overdue.is_empty() {
        return Ok(Vec::new());
    }
    let uuids: Vec<&str> = overdue.iter().map(|(c, _)| c.task_uuid()).collect();
    let steps = sqlx::query(
        "SELECT task_uuid, step_uuid, name, step_type, state, attempts, max_attempts,
            result IS NOT NULL AS has_result, error, next_attempt_at, started_at, completed_at,
            worker_id
         FROM steps WHERE task_uuid = ANY($1) ORDER BY task_uuid, seq",
    )
    .bind(&uuids)
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(SnapStep::of)
    .collect::<R<Vec<_>>>()?;
    let mut j = Journal::default();
    let plan = lifecycle_plan(&mut j, &overdue, &steps, staleness_threshold_ms, actor, now)?;
    if !plan.cancelled.is_empty() {
        sqlx::query(
            "UPDATE steps SET state = 'cancelled', lease_expires_at = NULL, timeout_at = NULL,
                completed_at = $1, updated_at = $1
             WHERE step_uuid = ANY($2)",
        )
        .bind(now)
        .bind(&plan.cancelled)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "INSERT INTO dlq_entries (dlq_entry_uuid, task_uuid, namespace, name, version, reason,
            message, original_state, snapshot, resolution_status, created_at, updated_at)
         SELECT v->>0, v->>1, v->>2, v->>3, v->>4, v->>5, v->>6, v->>7, v->>8, 'pending', $1, $1
         FROM json_array_elements($2::json) v",
    )
    .bind(now)
    .bind(json(&plan.entries)?)
    .execute(&mut *tx)
    .await?;
    flush(tx, &mut j).await?;
    Ok(plan.moved)
}

// ---------------------------------------------------------------- DLQ

pub(super) async fn list_dlq(pool: &PgPool, f: &DlqFilter) -> Result<Vec<DlqEntry>> {
    let sql = format!(
        "SELECT {DLQ_COLUMNS} FROM dlq_entries
         WHERE ($1::text IS NULL OR resolution_status = $1) AND ($2::text IS NULL OR namespace = $2)
           AND ($3::text IS NULL OR task_uuid = $3) AND ($4::text IS NULL OR reason = $4)
         ORDER BY created_at DESC, dlq_entry_uuid DESC LIMIT $5 OFFSET $6"
    );
    let found = sqlx::query(AssertSqlSafe(sql))
        .bind(f.status.map(DlqResolution::as_str))
        .bind(f.namespace.as_deref())
        .bind(f.task_uuid.as_deref())
        .bind(f.reason.map(|r| r.as_str()))
        .bind(i64::from(f.limit.unwrap_or(50).clamp(1, 1000)))
        .bind(i64::from(f.offset.unwrap_or(0)))
        .fetch_all(pool)
        .await?;
    found.iter().map(|r| dlq_entry(r, false)).collect()
}

pub(super) async fn get_dlq(pool: &PgPool, dlq_entry_uuid: &str) -> Result<DlqEntry> {
    let sql = format!("SELECT {DLQ_COLUMNS}, snapshot FROM dlq_entries WHERE dlq_entry_uuid = $1");
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(dlq_entry_uuid)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| Error::not_found(format!("no DLQ entry {dlq_entry_uuid}")))?;
    dlq_entry(&row, true)
}

pub(super) async fn dlq_stats(pool: &PgPool) -> Result<DlqStats> {
    let found = sqlx::query(DLQ_STATS).fetch_all(pool).await?;
    rows::dlq_stats(&found)
}

pub(super) async fn resolve_dlq(
    pool: &PgPool,
    dlq_entry_uuid: &str,
    status: DlqResolution,
    notes: Option<&str>,
    by: &str,
    now: Millis,
) -> Result<DlqEntry> {
    if by.trim().is_empty() {
        return Err(Error::validation(
            "a DLQ resolution must name who records it (`by`)",
        ));
    }
    // Re-opening (`pending`) clears who resolved it and when; the notes stay unless replaced.
    let reopened = status == DlqResolution::Pending;
    let changed = sqlx::query(
        "UPDATE dlq_entries SET resolution_status = $1,
            resolution_notes = COALESCE($2, resolution_notes),
            resolved_by = $3, resolved_at = $4, updated_at = $5
         WHERE dlq_entry_uuid = $6",
    )
    .bind(status.as_str())
    .bind(notes)
    .bind((!reopened).then_some(by))
    .bind((!reopened).then_some(now))
    .bind(now)
    .bind(dlq_entry_uuid)
    .execute(pool)
    .await?
    .rows_affected();
    if changed == 0 {
        return Err(Error::not_found(format!("no DLQ entry {dlq_entry_uuid}")));
    }
    get_dlq(pool, dlq_entry_uuid).await
}

// ---------------------------------------------------------------- API keys

pub(super) async fn create_api_key(
    pool: &PgPool,
    k: &crate::auth::ApiKey,
    secret_hash: &str,
) -> Result<()> {
    let inserted = sqlx::query(
        "INSERT INTO api_keys (key_id, name, secret_hash, permissions, created_at, revoked_at)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (key_id) DO NOTHING",
    )
    .bind(&k.key_id)
    .bind(&k.name)
    .bind(secret_hash)
    .bind(json(&k.permissions)?)
    .bind(k.created_at)
    .bind(k.revoked_at)
    .execute(pool)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Err(Error::new(
            crate::ErrorKind::Conflict,
            format!("an API key {} exists already", k.key_id),
        ));
    }
    Ok(())
}

pub(super) async fn list_api_keys(pool: &PgPool) -> Result<Vec<crate::auth::ApiKey>> {
    let sql = format!("SELECT {API_KEY_COLUMNS} FROM api_keys ORDER BY created_at, key_id");
    let found = sqlx::query(AssertSqlSafe(sql)).fetch_all(pool).await?;
    found.iter().map(rows::api_key).collect()
}

pub(super) async fn revoke_api_key(
    pool: &PgPool,
    key_id: &str,
    now: Millis,
) -> Result<crate::auth::ApiKey> {
    // Revoking twice keeps the first revocation time.
    let sql = format!(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE key_id = $1
         RETURNING {API_KEY_COLUMNS}"
    );
    match sqlx::query(AssertSqlSafe(sql))
        .bind(key_id)
        .bind(now)
        .fetch_optional(pool)
        .await?
    {
        Some(r) => rows::api_key(&r),
        None => Err(Error::not_found(format!("no API key {key_id}"))),
    }
}

pub(super) async fn find_api_key(
    pool: &PgPool,
    key_id: &str,
) -> Result<Option<(crate::auth::ApiKey, String)>> {
    let sql = format!("SELECT {API_KEY_COLUMNS}, secret_hash FROM api_keys WHERE key_id = $1");
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(key_id)
        .fetch_optional(pool)
        .await?;
    row.map(|r| Ok((rows::api_key(&r)?, r.text("secret_hash")?)))
        .transpose()
}
