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

use std::collections::HashMap;
use std::sync::LazyLock;

use serde_json::{Value, json};
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Row, SqliteConnection};

use super::journal::Journal;
use super::write::{decode, json as to_json, parse_state};
use crate::Result;
use crate::clock::Millis;
use crate::dlq::LifecycleExceeded;
use crate::lifecycle::{LifecycleFacts, Verdict, exceeded};
use crate::orchestrator::new_uuid;
use crate::state::{StepEvent, StepState, TaskEvent, TaskState};
use crate::template::LifecycleLimits;

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

/// An unfinished task past a limit.
struct Overdue {
    row: SqliteRow,
    state: TaskState,
    facts: LifecycleFacts,
    verdict: Verdict,
}

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
    let mut overdue = Vec::new();
    for row in rows {
        if overdue.len() >= limit {
            break;
        }
        let state: TaskState = parse_state(&row.try_get::<String, _>("state")?)?;
        let facts = LifecycleFacts {
            state,
            created_at: row.try_get("created_at")?,
            entered_at: row.try_get("entered_at")?,
            active_at: row.try_get("active_at")?,
            limits: LifecycleLimits {
                max_duration_minutes: row.try_get("max_duration")?,
                max_waiting_for_dependencies_minutes: row
                    .try_get("max_waiting_for_dependencies")?,
                max_waiting_for_retry_minutes: row.try_get("max_waiting_for_retry")?,
                max_steps_in_process_minutes: row.try_get("max_steps_in_process")?,
            },
        };
        if let Some(verdict) = exceeded(&facts, staleness_threshold_ms, now) {
            overdue.push(Overdue {
                row,
                state,
                facts,
                verdict,
            });
        }
    }
    if overdue.is_empty() {
        return Ok(Vec::new());
    }

    let uuids: Vec<String> = overdue
        .iter()
        .map(|o| o.row.try_get("task_uuid"))
        .collect::<Result<_, _>>()?;
    let mut steps: HashMap<String, Vec<SqliteRow>> = HashMap::new();
    for r in sqlx::query(STEPS)
        .bind(to_json(&uuids)?)
        .fetch_all(&mut *tx)
        .await?
    {
        steps.entry(r.try_get("task_uuid")?).or_default().push(r);
    }

    let mut j = Journal::default();
    let mut cancelled: Vec<String> = Vec::new();
    let mut entries: Vec<Value> = Vec::with_capacity(overdue.len());
    let mut out = Vec::with_capacity(overdue.len());
    for (o, task_uuid) in overdue.iter().zip(&uuids) {
        let task_steps = steps.get(task_uuid).map(Vec::as_slice).unwrap_or_default();
        let snapshot = snapshot(o, task_steps, staleness_threshold_ms, now)?;
        let message = o.verdict.message.as_str();
        for s in task_steps {
            let state: StepState = parse_state(&s.try_get::<String, _>("state")?)?;
            if state.is_terminal() {
                continue;
            }
            let step_uuid: String = s.try_get("step_uuid")?;
            j.step_moves(
                &step_uuid,
                task_uuid,
                state,
                &[StepEvent::Cancel],
                None,
                actor,
                Some(message),
                now,
            )?;
            cancelled.push(step_uuid);
        }
        let dlq_entry_uuid = new_uuid();
        let metadata = json!({
            "dlq_entry_uuid": dlq_entry_uuid,
            "lifecycle_reason": o.verdict.reason,
            "limit_ms": o.verdict.limit_ms,
            "elapsed_ms": o.verdict.elapsed_ms,
        });
        j.task_move_with_metadata(
            task_uuid,
            o.state,
            TaskEvent::LifecycleExceeded,
            actor,
            Some(message),
            &metadata,
            now,
        )?;
        entries.push(json!([
            dlq_entry_uuid,
            task_uuid,
            o.row.try_get::<String, _>("namespace")?,
            o.row.try_get::<String, _>("name")?,
            o.row.try_get::<String, _>("version")?,
            o.verdict.reason.as_str(),
            message,
            o.state.as_str(),
            snapshot.to_string(),
        ]));
        out.push(LifecycleExceeded {
            task_uuid: task_uuid.clone(),
            original_state: o.state,
            reason: o.verdict.reason,
            dlq_entry_uuid,
        });
    }
    if !cancelled.is_empty() {
        sqlx::query(CANCEL_STEPS)
            .bind(now)
            .bind(to_json(&cancelled)?)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(INSERT_ENTRIES)
        .bind(now)
        .bind(to_json(&entries)?)
        .execute(&mut *tx)
        .await?;
    j.flush(tx).await?;
    Ok(out)
}

/// The task and its steps as they were when the limit was found exceeded.
fn snapshot(
    o: &Overdue,
    steps: &[SqliteRow],
    staleness_threshold_ms: Option<i64>,
    now: Millis,
) -> Result<Value> {
    let r = &o.row;
    let mut limits = serde_json::to_value(&o.facts.limits).unwrap_or_else(|_| json!({}));
    limits["staleness_threshold_ms"] = json!(staleness_threshold_ms);
    let mut step_views = Vec::with_capacity(steps.len());
    for s in steps {
        let error: Option<Value> = s
            .try_get::<Option<String>, _>("error")?
            .map(|e| decode(&e))
            .transpose()?;
        step_views.push(json!({
            "name": s.try_get::<String, _>("name")?,
            "step_uuid": s.try_get::<String, _>("step_uuid")?,
            "step_type": s.try_get::<String, _>("step_type")?,
            "state": s.try_get::<String, _>("state")?,
            "attempts": s.try_get::<i64, _>("attempts")?,
            "max_attempts": s.try_get::<i64, _>("max_attempts")?,
            "has_result": s.try_get::<bool, _>("has_result")?,
            "error": error,
            "next_attempt_at": s.try_get::<Option<i64>, _>("next_attempt_at")?,
            "started_at": s.try_get::<Option<i64>, _>("started_at")?,
            "completed_at": s.try_get::<Option<i64>, _>("completed_at")?,
            "worker_id": s.try_get::<Option<String>, _>("worker_id")?,
        }));
    }
    Ok(json!({
        "detected_at": now,
        "task": {
            "task_uuid": r.try_get::<String, _>("task_uuid")?,
            "namespace": r.try_get::<String, _>("namespace")?,
            "name": r.try_get::<String, _>("name")?,
            "version": r.try_get::<String, _>("version")?,
            "state": o.state.as_str(),
            "priority": r.try_get::<i64, _>("priority")?,
            "initiator": r.try_get::<String, _>("initiator")?,
            "source_system": r.try_get::<String, _>("source_system")?,
            "reason": r.try_get::<String, _>("reason")?,
            "correlation_id": r.try_get::<String, _>("correlation_id")?,
            "created_at": o.facts.created_at,
            "entered_state_at": o.facts.entered_at,
            "last_progress_at": o.facts.active_at,
        },
        "limits": limits,
        "steps": step_views,
    }))
}
