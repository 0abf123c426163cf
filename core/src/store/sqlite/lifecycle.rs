//! The lifecycle check in SQLite (SPEC §9), one write transaction:
//!
//! 1. one query finds the unfinished tasks that may be past a limit: their template's limits
//!    come from the template snapshot they run (parsed by SQLite once per distinct template,
//!    not per task), and a cheap test on `state_entered_at` (never later than the latest
//!    transition) keeps the per-task look-ups — the latest transition, the steps' latest
//!    change — to the few tasks that may qualify;
//! 2. [`crate::lifecycle::exceeded`] decides, in Rust, which of them are past a limit;
//! 3. for those: a snapshot of the task and its steps, the cancel of every unfinished step,
//!    the task's `lifecycle_exceeded` move to `error` and the DLQ entry.

use std::sync::LazyLock;

use sqlx::{AssertSqlSafe, SqliteConnection};

use super::journal::{Flush, Journal};
use super::write::json as to_json;
use crate::Result;
use crate::clock::Millis;
use crate::dlq::LifecycleExceeded;
use crate::state::TaskState;
use crate::store::apply::{Candidate, SnapStep, lifecycle_plan, overdue};

/// Parameters: `$1` now, `$2` the staleness threshold in ms (NULL: none). `{open}` is the list
/// of non-terminal states. A limit column is NULL when the template sets none, which makes its
/// test NULL, i.e. false.
const CANDIDATES: &str = "
WITH open AS (
  SELECT task_uuid, namespace, name, version, state, priority, initiator, source_system,
         reason, correlation_id, template_hash, created_at, state_entered_at
  FROM tasks WHERE state IN ({open})
),
limits AS (
  SELECT content_hash,
    CAST(json_extract(definition, '$.lifecycle.max_duration_minutes') AS REAL) AS max_duration,
    CAST(json_extract(definition, '$.lifecycle.max_waiting_for_dependencies_minutes') AS REAL)
      AS max_waiting_for_dependencies,
    CAST(json_extract(definition, '$.lifecycle.max_waiting_for_retry_minutes') AS REAL)
      AS max_waiting_for_retry,
    CAST(json_extract(definition, '$.lifecycle.max_steps_in_process_minutes') AS REAL)
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
SELECT c.*, MAX(c.entered_at, COALESCE(
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

const STEPS: &str = "SELECT task_uuid, step_uuid, name, step_type, state, attempts, max_attempts,
        result IS NOT NULL AS has_result, error, next_attempt_at, started_at, completed_at,
        worker_id
     FROM steps WHERE task_uuid IN (SELECT value FROM json_each($1)) ORDER BY task_uuid, seq";

/// Cancels the listed steps (their transitions are journaled by the caller) like an operator's
/// cancel: no lease or timeout is left to expire, and a late result no longer matches.
const CANCEL_STEPS: &str = "UPDATE steps SET state = 'cancelled', lease_expires_at = NULL,
        timeout_at = NULL, completed_at = $1, updated_at = $1
     WHERE step_uuid IN (SELECT value FROM json_each($2))";

const INSERT_ENTRIES: &str = "INSERT INTO dlq_entries (dlq_entry_uuid, task_uuid, namespace, name,
        version, reason, message, original_state, snapshot, resolution_status, created_at,
        updated_at)
     SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6,
        value->>7, value->>8, 'pending', $1, $1
     FROM json_each($2)";

pub(super) async fn enforce(
    tx: &mut SqliteConnection,
    now: Millis,
    staleness_threshold_ms: Option<i64>,
    actor: &str,
    limit: usize,
) -> Result<Vec<LifecycleExceeded>> {
    let rows = sqlx::query(AssertSqlSafe(CANDIDATES_SQL.as_str()))
        .bind(now)
        .bind(staleness_threshold_ms)
        .fetch_all(&mut *tx)
        .await?;
    let candidates = rows.iter().map(Candidate::of).collect::<Result<Vec<_>>>()?;
    let overdue = overdue(candidates, staleness_threshold_ms, now, limit);
    if overdue.is_empty() {
        return Ok(Vec::new());
    }
    let uuids: Vec<&str> = overdue.iter().map(|(c, _)| c.task_uuid()).collect();
    let steps = sqlx::query(STEPS)
        .bind(to_json(&uuids)?)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(SnapStep::of)
        .collect::<Result<Vec<_>>>()?;
    let mut j = Journal::default();
    let plan = lifecycle_plan(&mut j, &overdue, &steps, staleness_threshold_ms, actor, now)?;
    if !plan.cancelled.is_empty() {
        sqlx::query(CANCEL_STEPS)
            .bind(now)
            .bind(to_json(&plan.cancelled)?)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(INSERT_ENTRIES)
        .bind(now)
        .bind(to_json(&plan.entries)?)
        .execute(&mut *tx)
        .await?;
    j.flush(tx).await?;
    Ok(plan.moved)
}
