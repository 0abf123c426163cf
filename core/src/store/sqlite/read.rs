//! SQLite read queries.

use serde_json::Value;
use sqlx::{AssertSqlSafe, Row, SqlitePool};

use super::txn::Txn;
use crate::clock::Millis;
use crate::state::TaskState;
use crate::store::rows::{self, Cols, decode, opt_decode};
use crate::store::{ChildTask, ExpiredAttempt, RejectedCompletion};
use crate::task::{Task, TaskFilter, TaskSummary, Transition};
use crate::template::TaskTemplate;
use crate::{Error, Result};

pub(super) async fn get_template(
    pool: &SqlitePool,
    namespace: &str,
    name: &str,
    version: Option<&str>,
) -> Result<TaskTemplate> {
    let rows =
        sqlx::query("SELECT version, definition FROM templates WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .fetch_all(pool)
            .await?;
    let mut found: Vec<(String, String)> = Vec::new();
    for r in rows {
        found.push((r.try_get("version")?, r.try_get("definition")?));
    }
    rows::pick_template(namespace, name, version, &found)
}

pub(super) async fn list_templates(pool: &SqlitePool) -> Result<Vec<TaskTemplate>> {
    let defs: Vec<String> =
        sqlx::query_scalar("SELECT definition FROM templates ORDER BY namespace, name, version")
            .fetch_all(pool)
            .await?;
    defs.iter().map(|d| decode(d)).collect()
}

pub(super) async fn template_snapshot(pool: &SqlitePool, hash: &str) -> Result<TaskTemplate> {
    let def: Option<String> =
        sqlx::query_scalar("SELECT definition FROM template_snapshots WHERE content_hash = $1")
            .bind(hash)
            .fetch_optional(pool)
            .await?;
    decode(&def.ok_or_else(|| Error::not_found(format!("no template snapshot {hash}")))?)
}

pub(super) async fn expired_attempts(
    pool: &SqlitePool,
    now: Millis,
    limit: usize,
) -> Result<Vec<ExpiredAttempt>> {
    let rows = sqlx::query(
        "SELECT step_uuid, attempts, definition, timeout_at FROM steps
         WHERE state = 'in_progress' AND (lease_expires_at <= $1 OR timeout_at <= $1)
         LIMIT $2",
    )
    .bind(now)
    .bind(limit as i64)
    .fetch_all(pool)
    .await?;
    rows.iter().map(|r| rows::expired_attempt(r, now)).collect()
}

pub(super) async fn next_due(pool: &SqlitePool) -> Result<Option<Millis>> {
    let due: Option<Millis> = sqlx::query_scalar(
        "SELECT MIN(t) FROM (
            SELECT MIN(next_attempt_at) AS t FROM steps WHERE state = 'waiting_for_retry'
            UNION ALL SELECT MIN(lease_expires_at) FROM steps WHERE state = 'in_progress'
            UNION ALL SELECT MIN(timeout_at) FROM steps WHERE state = 'in_progress')",
    )
    .fetch_one(pool)
    .await?;
    Ok(due)
}

pub(super) async fn task_state(pool: &SqlitePool, task_uuid: &str) -> Result<TaskState> {
    let s: Option<String> = sqlx::query_scalar("SELECT state FROM tasks WHERE task_uuid = $1")
        .bind(task_uuid)
        .fetch_optional(pool)
        .await?;
    rows::task_state_of(s, task_uuid)
}

pub(super) async fn get_task(pool: &SqlitePool, task_uuid: &str) -> Result<Task> {
    // The task, its steps and its edges: one round trip, one snapshot.
    let mut t = Txn::acquire(pool).await?;
    let sql = format!(
        "{}SELECT 't' AS k, * FROM tasks WHERE task_uuid = ?;
         SELECT 's' AS k, step_uuid, name, step_type, callable, state, attempts, max_attempts,
                result, error, checkpoint, started_at, completed_at, next_attempt_at, worker_id
         FROM steps WHERE task_uuid = ? ORDER BY seq;
         SELECT 'e' AS k, p.name AS parent, c.step_uuid AS child FROM steps c
         JOIN step_edges e ON e.to_step = c.step_uuid JOIN steps p ON p.step_uuid = e.from_step
         WHERE c.task_uuid = ? ORDER BY p.seq;
         {}",
        Txn::BEGIN_READ,
        Txn::COMMIT
    );
    // The edges are reached through the task's steps (indexed by task), not
    // `step_edges.task_uuid` (not indexed): filtering the edges themselves would scan every
    // edge ever created.
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(task_uuid)
        .bind(task_uuid)
        .bind(task_uuid)
        .fetch_all(t.conn())
        .await;
    let rows = match rows {
        Ok(rows) => {
            t.committed();
            rows
        }
        Err(e) => {
            t.rollback().await;
            return Err(e.into());
        }
    };
    let (mut task_row, mut step_rows, mut edges) = (None, Vec::new(), Vec::new());
    for row in rows {
        match row.try_get::<String, _>("k")?.as_str() {
            "t" => task_row = Some(row),
            "s" => step_rows.push(row),
            _ => edges.push(row),
        }
    }
    let t = task_row.ok_or_else(|| Error::not_found(format!("no task {task_uuid}")))?;
    let mut steps = Vec::with_capacity(step_rows.len());
    for r in step_rows {
        let uuid = r.text("step_uuid")?;
        let mut dependencies = Vec::new();
        for e in &edges {
            if e.text("child")? == uuid {
                dependencies.push(e.text("parent")?);
            }
        }
        steps.push(rows::step_view(&r, dependencies)?);
    }
    rows::task(&t, steps)
}

pub(super) async fn list_tasks(pool: &SqlitePool, f: &TaskFilter) -> Result<Vec<TaskSummary>> {
    let mut sql = format!("SELECT {} FROM tasks WHERE 1 = 1", rows::SUMMARY_COLUMNS);
    let mut texts: Vec<String> = Vec::new();
    let mut n = 1;
    let mut push = |sql: &mut String, clause: &str| {
        sql.push_str(&format!(" AND {clause} ${n}"));
        n += 1;
    };
    for (value, clause) in [
        (&f.namespace, "namespace ="),
        (&f.name, "name ="),
        (&f.initiator, "initiator ="),
        (&f.source_system, "source_system ="),
        (&f.parent_task_uuid, "parent_task_uuid ="),
    ] {
        if let Some(v) = value {
            push(&mut sql, clause);
            texts.push(v.clone());
        }
    }
    if let Some(s) = f.status {
        push(&mut sql, "state =");
        texts.push(s.as_str().to_string());
    }
    let mut ints: Vec<i64> = Vec::new();
    if let Some(a) = f.created_after {
        push(&mut sql, "created_at >=");
        ints.push(a);
    }
    if let Some(b) = f.created_before {
        push(&mut sql, "created_at <");
        ints.push(b);
    }
    sql.push_str(&format!(
        " ORDER BY created_at DESC, task_uuid LIMIT ${n} OFFSET ${}",
        n + 1
    ));
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for t in texts {
        q = q.bind(t);
    }
    for i in ints {
        q = q.bind(i);
    }
    q = q
        .bind(i64::from(f.limit.unwrap_or(50).clamp(1, 1000)))
        .bind(i64::from(f.offset.unwrap_or(0)));
    let rows = q.fetch_all(pool).await?;
    rows.iter().map(rows::task_summary).collect()
}

pub(super) async fn task_transitions(
    pool: &SqlitePool,
    task_uuid: &str,
) -> Result<Vec<Transition>> {
    task_state(pool, task_uuid).await?;
    let rows = sqlx::query("SELECT * FROM task_transitions WHERE task_uuid = $1 ORDER BY id")
        .bind(task_uuid)
        .fetch_all(pool)
        .await?;
    rows.iter().map(|r| rows::transition(r, false)).collect()
}

pub(super) async fn step_transitions(
    pool: &SqlitePool,
    task_uuid: &str,
    step: Option<&str>,
) -> Result<Vec<Transition>> {
    task_state(pool, task_uuid).await?;
    let rows = sqlx::query(
        "SELECT t.*, s.name AS step_name FROM step_transitions t JOIN steps s ON s.step_uuid = t.step_uuid
         WHERE t.task_uuid = $1 AND ($2 IS NULL OR s.step_uuid = $2 OR s.name = $2) ORDER BY t.id",
    )
    .bind(task_uuid)
    .bind(step)
    .fetch_all(pool)
    .await?;
    if rows.is_empty()
        && let Some(s) = step
    {
        return Err(Error::not_found(format!(
            "task {task_uuid} has no step {s:?}"
        )));
    }
    rows.iter().map(|r| rows::transition(r, true)).collect()
}

pub(super) async fn rejected_completions(
    pool: &SqlitePool,
    task_uuid: &str,
) -> Result<Vec<RejectedCompletion>> {
    let rows = sqlx::query("SELECT * FROM rejected_completions WHERE task_uuid = $1 ORDER BY id")
        .bind(task_uuid)
        .fetch_all(pool)
        .await?;
    rows.iter().map(rows::rejected_completion).collect()
}

pub(super) async fn checkpoint_history(pool: &SqlitePool, step_uuid: &str) -> Result<Vec<Value>> {
    let row: Option<Option<String>> =
        sqlx::query_scalar("SELECT checkpoint_history FROM steps WHERE step_uuid = $1")
            .bind(step_uuid)
            .fetch_optional(pool)
            .await?;
    let history = row.ok_or_else(|| Error::not_found(format!("no step {step_uuid}")))?;
    Ok(opt_decode::<Vec<Value>>(history)?.unwrap_or_default())
}

/// Ended children of waiting workflow steps, then running children whose parent step was
/// cancelled or whose parent task ended.
const WORKFLOW_CHILDREN: &str = "
    SELECT s.task_uuid AS parent_task, s.step_uuid AS parent_step, s.attempts,
           s.state AS step_state, p.state AS parent_state, c.task_uuid AS child, c.state AS child_state
    FROM steps s
    JOIN tasks c ON c.parent_step_uuid = s.step_uuid
    JOIN tasks p ON p.task_uuid = s.task_uuid
    WHERE s.state = 'in_progress' AND s.step_type = 'workflow'
      AND c.state IN ('complete', 'error', 'cancelled', 'resolved_manually')
    UNION ALL
    SELECT s.task_uuid, s.step_uuid, s.attempts, s.state, p.state, c.task_uuid, c.state
    FROM tasks c
    JOIN steps s ON s.step_uuid = c.parent_step_uuid
    JOIN tasks p ON p.task_uuid = s.task_uuid
    WHERE c.parent_step_uuid IS NOT NULL AND c.completed_at IS NULL
      AND (s.state = 'cancelled' OR p.completed_at IS NOT NULL)
    LIMIT $1";

pub(super) async fn workflow_children(pool: &SqlitePool, limit: usize) -> Result<Vec<ChildTask>> {
    let rows = sqlx::query(WORKFLOW_CHILDREN)
        .bind(limit as i64)
        .fetch_all(pool)
        .await?;
    rows.iter().map(rows::child_task).collect()
}
