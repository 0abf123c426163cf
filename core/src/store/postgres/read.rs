//! PostgreSQL read queries (rows decoded by `store::rows`, as for SQLite).

use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool};

use crate::clock::Millis;
use crate::state::TaskState;
use crate::store::rows::{self, Cols, decode, opt_decode};
use crate::store::{ChildTask, ExpiredAttempt, RejectedCompletion};
use crate::task::{Task, TaskFilter, TaskSummary, Transition};
use crate::template::TaskTemplate;
use crate::{Error, Result};

pub(super) async fn get_template(
    pool: &PgPool,
    namespace: &str,
    name: &str,
    version: Option<&str>,
) -> Result<TaskTemplate> {
    let found =
        sqlx::query("SELECT version, definition FROM templates WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| Ok((r.text("version")?, r.text("definition")?)))
            .collect::<Result<Vec<_>>>()?;
    rows::pick_template(namespace, name, version, &found)
}

pub(super) async fn list_templates(pool: &PgPool) -> Result<Vec<TaskTemplate>> {
    let defs: Vec<String> =
        sqlx::query_scalar("SELECT definition FROM templates ORDER BY namespace, name, version")
            .fetch_all(pool)
            .await?;
    defs.iter().map(|d| decode(d)).collect()
}

pub(super) async fn template_snapshot(pool: &PgPool, hash: &str) -> Result<TaskTemplate> {
    let def: Option<String> =
        sqlx::query_scalar("SELECT definition FROM template_snapshots WHERE content_hash = $1")
            .bind(hash)
            .fetch_optional(pool)
            .await?;
    decode(&def.ok_or_else(|| Error::not_found(format!("no template snapshot {hash}")))?)
}

pub(super) async fn expired_attempts(
    pool: &PgPool,
    now: Millis,
    limit: usize,
) -> Result<Vec<ExpiredAttempt>> {
    let found = sqlx::query(
        "SELECT step_uuid, attempts, definition, timeout_at FROM steps
         WHERE state = 'in_progress' AND lease_expires_at <= $1
         UNION
         SELECT step_uuid, attempts, definition, timeout_at FROM steps
         WHERE state = 'in_progress' AND timeout_at <= $1
         LIMIT $2",
    )
    .bind(now)
    .bind(limit as i64)
    .fetch_all(pool)
    .await?;
    found
        .iter()
        .map(|r| rows::expired_attempt(r, now))
        .collect()
}

pub(super) async fn next_due(pool: &PgPool) -> Result<Option<Millis>> {
    Ok(sqlx::query_scalar(
        "SELECT LEAST(
            (SELECT MIN(next_attempt_at) FROM steps WHERE state = 'waiting_for_retry'),
            (SELECT MIN(lease_expires_at) FROM steps WHERE state = 'in_progress'),
            (SELECT MIN(timeout_at) FROM steps WHERE state = 'in_progress'))",
    )
    .fetch_one(pool)
    .await?)
}

pub(super) async fn task_state(pool: &PgPool, task_uuid: &str) -> Result<TaskState> {
    let s: Option<String> = sqlx::query_scalar("SELECT state FROM tasks WHERE task_uuid = $1")
        .bind(task_uuid)
        .fetch_optional(pool)
        .await?;
    rows::task_state_of(s, task_uuid)
}

/// The task, its steps and its edges: one statement, so one snapshot and one round trip. The
/// edges are found by key look-ups from the task's steps (`OFFSET 0` keeps the planner from
/// turning them into a scan of every edge).
pub(super) async fn get_task(pool: &PgPool, task_uuid: &str) -> Result<Task> {
    let t = sqlx::query(
        "SELECT t.*,
            (SELECT COALESCE(json_agg(json_build_object(
                'step_uuid', s.step_uuid, 'name', s.name, 'step_type', s.step_type,
                'callable', s.callable, 'state', s.state, 'attempts', s.attempts,
                'max_attempts', s.max_attempts, 'result', s.result, 'error', s.error,
                'checkpoint', s.checkpoint, 'started_at', s.started_at,
                'completed_at', s.completed_at, 'next_attempt_at', s.next_attempt_at,
                'worker_id', s.worker_id) ORDER BY s.seq), '[]')::text
             FROM steps s WHERE s.task_uuid = t.task_uuid) AS steps_json,
            (SELECT COALESCE(json_agg(json_build_object('parent', p.name, 'child', c.step_uuid)
                ORDER BY p.seq), '[]')::text
             FROM steps c,
                LATERAL (SELECT from_step FROM step_edges WHERE to_step = c.step_uuid
                    OFFSET 0) e,
                LATERAL (SELECT name, seq FROM steps WHERE step_uuid = e.from_step OFFSET 0) p
             WHERE c.task_uuid = t.task_uuid) AS edges_json
         FROM tasks t WHERE t.task_uuid = $1",
    )
    .bind(task_uuid)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| Error::not_found(format!("no task {task_uuid}")))?;
    let step_rows: Vec<serde_json::Map<String, Value>> = decode(&t.text("steps_json")?)?;
    let edges: Vec<serde_json::Map<String, Value>> = decode(&t.text("edges_json")?)?;
    let mut steps = Vec::with_capacity(step_rows.len());
    for r in &step_rows {
        let uuid = r.text("step_uuid")?;
        let mut dependencies = Vec::new();
        for e in &edges {
            if e.text("child")? == uuid {
                dependencies.push(e.text("parent")?);
            }
        }
        steps.push(rows::step_view(r, dependencies)?);
    }
    rows::task(&t, steps)
}

pub(super) async fn list_tasks(pool: &PgPool, f: &TaskFilter) -> Result<Vec<TaskSummary>> {
    let sql = format!(
        "SELECT {} FROM tasks
         WHERE ($1::text IS NULL OR namespace = $1) AND ($2::text IS NULL OR name = $2)
           AND ($3::text IS NULL OR initiator = $3) AND ($4::text IS NULL OR source_system = $4)
           AND ($5::text IS NULL OR parent_task_uuid = $5) AND ($6::text IS NULL OR state = $6)
           AND ($7::int8 IS NULL OR created_at >= $7) AND ($8::int8 IS NULL OR created_at < $8)
         ORDER BY created_at DESC, task_uuid LIMIT $9 OFFSET $10",
        rows::SUMMARY_COLUMNS
    );
    let found = sqlx::query(AssertSqlSafe(sql))
        .bind(&f.namespace)
        .bind(&f.name)
        .bind(&f.initiator)
        .bind(&f.source_system)
        .bind(&f.parent_task_uuid)
        .bind(f.status.map(|s| s.as_str()))
        .bind(f.created_after)
        .bind(f.created_before)
        .bind(i64::from(f.limit.unwrap_or(50).clamp(1, 1000)))
        .bind(i64::from(f.offset.unwrap_or(0)))
        .fetch_all(pool)
        .await?;
    found.iter().map(rows::task_summary).collect()
}

pub(super) async fn task_transitions(pool: &PgPool, task_uuid: &str) -> Result<Vec<Transition>> {
    task_state(pool, task_uuid).await?;
    let found = sqlx::query("SELECT * FROM task_transitions WHERE task_uuid = $1 ORDER BY id")
        .bind(task_uuid)
        .fetch_all(pool)
        .await?;
    found.iter().map(|r| rows::transition(r, false)).collect()
}

pub(super) async fn step_transitions(
    pool: &PgPool,
    task_uuid: &str,
    step: Option<&str>,
) -> Result<Vec<Transition>> {
    task_state(pool, task_uuid).await?;
    let found = sqlx::query(
        "SELECT t.*, s.name AS step_name FROM step_transitions t JOIN steps s ON s.step_uuid = t.step_uuid
         WHERE t.task_uuid = $1 AND ($2::text IS NULL OR s.step_uuid = $2 OR s.name = $2)
         ORDER BY t.id",
    )
    .bind(task_uuid)
    .bind(step)
    .fetch_all(pool)
    .await?;
    if found.is_empty()
        && let Some(s) = step
    {
        return Err(Error::not_found(format!(
            "task {task_uuid} has no step {s:?}"
        )));
    }
    found.iter().map(|r| rows::transition(r, true)).collect()
}

pub(super) async fn rejected_completions(
    pool: &PgPool,
    task_uuid: &str,
) -> Result<Vec<RejectedCompletion>> {
    let found = sqlx::query("SELECT * FROM rejected_completions WHERE task_uuid = $1 ORDER BY id")
        .bind(task_uuid)
        .fetch_all(pool)
        .await?;
    found.iter().map(rows::rejected_completion).collect()
}

pub(super) async fn checkpoint_history(pool: &PgPool, step_uuid: &str) -> Result<Vec<Value>> {
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
pub(super) async fn workflow_children(pool: &PgPool, limit: usize) -> Result<Vec<ChildTask>> {
    let found = sqlx::query(
        "(SELECT s.task_uuid AS parent_task, s.step_uuid AS parent_step, s.attempts,
                s.state AS step_state, p.state AS parent_state, c.task_uuid AS child,
                c.state AS child_state
         FROM steps s
         JOIN tasks c ON c.parent_step_uuid = s.step_uuid
         JOIN tasks p ON p.task_uuid = s.task_uuid
         WHERE s.state = 'in_progress' AND s.step_type = 'workflow'
           AND c.state IN ('complete', 'error', 'cancelled', 'resolved_manually'))
         UNION ALL
         (SELECT s.task_uuid, s.step_uuid, s.attempts, s.state, p.state, c.task_uuid, c.state
         FROM tasks c
         JOIN steps s ON s.step_uuid = c.parent_step_uuid
         JOIN tasks p ON p.task_uuid = s.task_uuid
         WHERE c.parent_step_uuid IS NOT NULL AND c.completed_at IS NULL
           AND (s.state = 'cancelled' OR p.completed_at IS NOT NULL))
         LIMIT $1",
    )
    .bind(limit as i64)
    .fetch_all(pool)
    .await?;
    found.iter().map(rows::child_task).collect()
}
