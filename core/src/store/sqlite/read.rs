//! SQLite read queries.

use serde_json::Value;
use sqlx::{AssertSqlSafe, Row, SqlitePool};

use super::txn::Txn;
use crate::clock::Millis;
use crate::job::{Checkpoint, StepFailure};
use crate::state::{StepState, TaskState};
use crate::store::{ChildTask, ExpiredAttempt, Expiry, ParentLink, RejectedCompletion};
use crate::task::{StepView, Task, TaskFilter, TaskSummary, Transition};
use crate::template::{StepDefinition, TaskTemplate};
use crate::{Error, Result};

fn decode<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s)
        .map_err(|e| Error::internal(format!("corrupt JSON in the database: {e}")))
}

fn opt_decode<T: serde::de::DeserializeOwned>(s: Option<String>) -> Result<Option<T>> {
    s.map(|s| decode(&s)).transpose()
}

fn parse<T: std::str::FromStr>(s: &str) -> Result<T> {
    s.parse()
        .map_err(|_| Error::internal(format!("unknown state {s:?} in the database")))
}

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
    let pick = match version {
        Some(v) => found.iter().find(|(fv, _)| fv == v),
        None => found.iter().max_by(|a, b| compare_versions(&a.0, &b.0)),
    };
    match pick {
        Some((_, def)) => decode(def),
        None => {
            let mut known: Vec<&str> = found.iter().map(|(v, _)| v.as_str()).collect();
            known.sort_by(|a, b| compare_versions(a, b));
            let what = match version {
                Some(v) => format!("{namespace}/{name} version {v}"),
                None => format!("{namespace}/{name}"),
            };
            let msg = if known.is_empty() {
                format!("no template {what} is registered")
            } else {
                format!(
                    "no template {what} is registered; known versions: {}",
                    known.join(", ")
                )
            };
            Err(Error::not_found(msg).with_details(serde_json::json!({"known_versions": known})))
        }
    }
}

/// Orders versions numerically part by part (`1.10.0` > `1.9.2`), falling back to text.
pub(crate) fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| -> Vec<Result<u64, String>> {
        s.split(['.', '-', '+'])
            .map(|p| p.parse::<u64>().map_err(|_| p.to_string()))
            .collect()
    };
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let o = match (x, y) {
            (Ok(x), Ok(y)) => x.cmp(y),
            (Ok(_), Err(_)) => std::cmp::Ordering::Greater,
            (Err(_), Ok(_)) => std::cmp::Ordering::Less,
            (Err(x), Err(y)) => x.cmp(y),
        };
        if o.is_ne() {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
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
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let timeout_at: Option<Millis> = r.try_get("timeout_at")?;
        out.push(ExpiredAttempt {
            step_uuid: r.try_get("step_uuid")?,
            attempt: r.try_get::<i64, _>("attempts")? as u32,
            expiry: if timeout_at.is_some_and(|t| t <= now) {
                Expiry::Timeout
            } else {
                Expiry::LeaseExpired
            },
            definition: decode::<StepDefinition>(&r.try_get::<String, _>("definition")?)?,
        });
    }
    Ok(out)
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
    parse(&s.ok_or_else(|| Error::not_found(format!("no task {task_uuid}")))?)
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
        let uuid: String = r.try_get("step_uuid")?;
        let mut dependencies = Vec::new();
        for e in &edges {
            if e.try_get::<String, _>("child")? == uuid {
                dependencies.push(e.try_get("parent")?);
            }
        }
        steps.push(StepView {
            uuid,
            name: r.try_get("name")?,
            step_type: r.try_get("step_type")?,
            callable: r.try_get("callable")?,
            state: parse::<StepState>(&r.try_get::<String, _>("state")?)?,
            attempts: r.try_get::<i64, _>("attempts")? as u32,
            max_attempts: r.try_get::<i64, _>("max_attempts")? as u32,
            result: opt_decode::<Value>(r.try_get("result")?)?,
            error: opt_decode::<StepFailure>(r.try_get("error")?)?,
            checkpoint: opt_decode::<Checkpoint>(r.try_get("checkpoint")?)?,
            started_at: r.try_get("started_at")?,
            completed_at: r.try_get("completed_at")?,
            next_attempt_at: r.try_get("next_attempt_at")?,
            worker_id: r.try_get("worker_id")?,
            dependencies,
        });
    }
    Ok(Task {
        uuid: t.try_get("task_uuid")?,
        namespace: t.try_get("namespace")?,
        name: t.try_get("name")?,
        version: t.try_get("version")?,
        status: parse(&t.try_get::<String, _>("state")?)?,
        context: decode(&t.try_get::<String, _>("context")?)?,
        initiator: t.try_get("initiator")?,
        source_system: t.try_get("source_system")?,
        reason: t.try_get("reason")?,
        tags: decode(&t.try_get::<String, _>("tags")?)?,
        priority: t.try_get::<i64, _>("priority")? as i32,
        correlation_id: t.try_get("correlation_id")?,
        parent_correlation_id: t.try_get("parent_correlation_id")?,
        parent: match (
            t.try_get::<Option<String>, _>("parent_task_uuid")?,
            t.try_get::<Option<String>, _>("parent_step_uuid")?,
        ) {
            (Some(task_uuid), Some(step_uuid)) => Some(ParentLink {
                task_uuid,
                step_uuid,
            }),
            _ => None,
        },
        idempotency_key: t.try_get("idempotency_key")?,
        created_at: t.try_get("created_at")?,
        updated_at: t.try_get("updated_at")?,
        completed_at: t.try_get("completed_at")?,
        steps,
        replayed: false,
    })
}

pub(super) async fn list_tasks(pool: &SqlitePool, f: &TaskFilter) -> Result<Vec<TaskSummary>> {
    let mut sql = String::from(
        "SELECT task_uuid, namespace, name, version, state, initiator, source_system, created_at,
                completed_at FROM tasks WHERE 1 = 1",
    );
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
    rows.into_iter()
        .map(|r| {
            Ok(TaskSummary {
                uuid: r.try_get("task_uuid")?,
                namespace: r.try_get("namespace")?,
                name: r.try_get("name")?,
                version: r.try_get("version")?,
                status: parse(&r.try_get::<String, _>("state")?)?,
                initiator: r.try_get("initiator")?,
                source_system: r.try_get("source_system")?,
                created_at: r.try_get("created_at")?,
                completed_at: r.try_get("completed_at")?,
            })
        })
        .collect()
}

fn transition(r: &sqlx::sqlite::SqliteRow, with_step: bool) -> Result<Transition> {
    Ok(Transition {
        step_name: if with_step {
            r.try_get("step_name")?
        } else {
            None
        },
        from_state: r.try_get("from_state")?,
        to_state: r.try_get("to_state")?,
        event: r.try_get("event")?,
        actor: r.try_get("actor")?,
        reason: r.try_get("reason")?,
        attempt: if with_step {
            r.try_get::<Option<i64>, _>("attempt")?.map(|a| a as u32)
        } else {
            None
        },
        metadata: opt_decode(r.try_get("metadata")?)?.unwrap_or(Value::Null),
        created_at: r.try_get("created_at")?,
        sort_key: r.try_get("id")?,
    })
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
    rows.iter().map(|r| transition(r, false)).collect()
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
    rows.iter().map(|r| transition(r, true)).collect()
}

pub(super) async fn rejected_completions(
    pool: &SqlitePool,
    task_uuid: &str,
) -> Result<Vec<RejectedCompletion>> {
    let rows = sqlx::query("SELECT * FROM rejected_completions WHERE task_uuid = $1 ORDER BY id")
        .bind(task_uuid)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(RejectedCompletion {
                step_uuid: r.try_get("step_uuid")?,
                attempt: r.try_get::<i64, _>("attempt")? as u32,
                worker_id: r.try_get("worker_id")?,
                reason: r.try_get("reason")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect()
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
    rows.iter()
        .map(|r| {
            Ok(ChildTask {
                parent_task_uuid: r.try_get("parent_task")?,
                parent_step_uuid: r.try_get("parent_step")?,
                parent_attempt: r.try_get::<i64, _>("attempts")? as u32,
                parent_step_state: parse(&r.try_get::<String, _>("step_state")?)?,
                parent_task_state: parse(&r.try_get::<String, _>("parent_state")?)?,
                child_task_uuid: r.try_get("child")?,
                child_state: parse(&r.try_get::<String, _>("child_state")?)?,
            })
        })
        .collect()
}
