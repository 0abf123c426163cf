//! SQLite writes shared by every transaction: templates, task creation, recorded state moves
//! and task settling. Each function runs inside a transaction opened by the caller; business
//! decisions (retry, evaluation) come from `orchestrator` and `state`.

use sqlx::{Row, SqliteConnection};

use crate::clock::Millis;
use crate::orchestrator::{SettleCause, settle_events};
use crate::state::{
    StepCounts, StepEvent, StepState, TaskEvent, TaskState, step_transition, task_transition,
};
use crate::store::{Created, NewTask, TemplatePut};
use crate::template::TaskTemplate;
use crate::{Error, ErrorKind, Result};

pub(super) fn json(v: &impl serde::Serialize) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::internal(format!("cannot encode JSON: {e}")))
}

pub(super) async fn put_template(
    tx: &mut SqliteConnection,
    t: &TaskTemplate,
    force: bool,
    now: Millis,
) -> Result<TemplatePut> {
    let hash = t.content_hash();
    let existing: Option<String> = sqlx::query_scalar(
        "SELECT content_hash FROM templates WHERE namespace = $1 AND name = $2 AND version = $3",
    )
    .bind(&t.namespace)
    .bind(&t.name)
    .bind(&t.version)
    .fetch_optional(&mut *tx)
    .await?;
    let outcome = match existing {
        Some(h) if h == hash => return Ok(TemplatePut::Unchanged),
        Some(_) if !force => {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "template {} is already registered with different content; \
                     bump its version or register with force",
                    t.key()
                ),
            ));
        }
        Some(_) => TemplatePut::Replaced,
        None => TemplatePut::Inserted,
    };
    let def = json(t)?;
    sqlx::query(
        "INSERT INTO templates (namespace, name, version, content_hash, definition, registered_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $6)
         ON CONFLICT (namespace, name, version)
         DO UPDATE SET content_hash = excluded.content_hash, definition = excluded.definition,
                       updated_at = excluded.updated_at",
    )
    .bind(&t.namespace)
    .bind(&t.name)
    .bind(&t.version)
    .bind(&hash)
    .bind(&def)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT OR IGNORE INTO template_snapshots (content_hash, definition) VALUES ($1, $2)",
    )
    .bind(&hash)
    .bind(&def)
    .execute(&mut *tx)
    .await?;
    Ok(outcome)
}

pub(super) async fn create_task(
    tx: &mut SqliteConnection,
    task: &NewTask,
    actor: &str,
    now: Millis,
) -> Result<Created> {
    if let Some(identity) = &task.identity_hash {
        let existing: Option<String> =
            sqlx::query_scalar("SELECT task_uuid FROM tasks WHERE identity_hash = $1")
                .bind(identity)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(uuid) = existing {
            return Ok(Created::Existing {
                uuid,
                by_key: task.identity_from_key,
            });
        }
    }
    let t = &task.template;
    let hash = t.content_hash();
    sqlx::query(
        "INSERT OR IGNORE INTO template_snapshots (content_hash, definition) VALUES ($1, $2)",
    )
    .bind(&hash)
    .bind(json(t.as_ref())?)
    .execute(&mut *tx)
    .await?;
    let r = &task.request;
    sqlx::query(
        "INSERT INTO tasks (task_uuid, namespace, name, version, template_hash, state, context,
            initiator, source_system, reason, tags, priority, correlation_id, parent_correlation_id,
            idempotency_key, identity_hash, created_at, updated_at, state_entered_at)
         VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $16, $16)",
    )
    .bind(&task.uuid)
    .bind(&t.namespace)
    .bind(&t.name)
    .bind(&t.version)
    .bind(&hash)
    .bind(json(&r.context)?)
    .bind(&r.initiator)
    .bind(&r.source_system)
    .bind(&r.reason)
    .bind(json(&r.tags)?)
    .bind(r.priority)
    .bind(&task.correlation_id)
    .bind(&r.parent_correlation_id)
    .bind(&r.idempotency_key)
    .bind(&task.identity_hash)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    insert_task_transition(
        tx,
        &task.uuid,
        None,
        TaskState::Pending,
        "create",
        actor,
        None,
        now,
    )
    .await?;
    insert_steps(
        tx,
        &task.uuid,
        &t.namespace,
        r.priority,
        &task.steps,
        &task.edges,
        actor,
        now,
    )
    .await?;
    settle(tx, &task.uuid, SettleCause::Start, actor, None, now).await?;
    Ok(Created::New(task.uuid.clone()))
}

/// Inserts steps in `pending` with their edges (edges name steps of `steps` or existing steps
/// of the task).
#[allow(clippy::too_many_arguments)]
pub(super) async fn insert_steps(
    tx: &mut SqliteConnection,
    task_uuid: &str,
    namespace: &str,
    priority: i32,
    steps: &[crate::store::NewStep],
    edges: &[(String, String)],
    actor: &str,
    now: Millis,
) -> Result<()> {
    let base_seq: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM steps WHERE task_uuid = $1")
            .bind(task_uuid)
            .fetch_one(&mut *tx)
            .await?;
    for (i, s) in steps.iter().enumerate() {
        let d = &s.definition;
        sqlx::query(
            "INSERT INTO steps (step_uuid, task_uuid, seq, name, namespace, callable, step_type,
                definition, inputs, state, max_attempts, priority, timeout_ms, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending', $10, $11, $12, $13, $13)",
        )
        .bind(&s.uuid)
        .bind(task_uuid)
        .bind(base_seq + 1 + i as i64)
        .bind(&d.name)
        .bind(namespace)
        .bind(&d.handler.callable)
        .bind(d.step_type.as_str())
        .bind(json(d)?)
        .bind(json(&s.inputs)?)
        .bind(d.retry.max_attempts as i64)
        .bind(priority)
        .bind(d.timeout_seconds.map(|t| (t as i64).saturating_mul(1000)))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        insert_step_transition(
            tx,
            &s.uuid,
            task_uuid,
            None,
            StepState::Pending,
            "create",
            actor,
            None,
            None,
            now,
        )
        .await?;
    }
    for (parent, child) in edges {
        let done = sqlx::query(
            "INSERT INTO step_edges (task_uuid, from_step, to_step)
             SELECT $1, p.step_uuid, c.step_uuid FROM steps p, steps c
             WHERE p.task_uuid = $1 AND p.name = $2 AND c.task_uuid = $1 AND c.name = $3",
        )
        .bind(task_uuid)
        .bind(parent)
        .bind(child)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(Error::internal(format!(
                "edge {parent} → {child} names a missing step"
            )));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn insert_task_transition(
    tx: &mut SqliteConnection,
    task_uuid: &str,
    from: Option<TaskState>,
    to: TaskState,
    event: &str,
    actor: &str,
    reason: Option<&str>,
    now: Millis,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO task_transitions (task_uuid, from_state, to_state, event, actor, reason, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(task_uuid)
    .bind(from.map(|s| s.as_str()))
    .bind(to.as_str())
    .bind(event)
    .bind(actor)
    .bind(reason)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn insert_step_transition(
    tx: &mut SqliteConnection,
    step_uuid: &str,
    task_uuid: &str,
    from: Option<StepState>,
    to: StepState,
    event: &str,
    actor: &str,
    reason: Option<&str>,
    attempt: Option<u32>,
    now: Millis,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO step_transitions (step_uuid, task_uuid, from_state, to_state, event, actor,
            reason, attempt, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(step_uuid)
    .bind(task_uuid)
    .bind(from.map(|s| s.as_str()))
    .bind(to.as_str())
    .bind(event)
    .bind(actor)
    .bind(reason)
    .bind(attempt.map(i64::from))
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Moves a step through `events` (checked against the state table), recording each transition,
/// and stores the final state.
#[allow(clippy::too_many_arguments)]
pub(super) async fn move_step(
    tx: &mut SqliteConnection,
    step_uuid: &str,
    task_uuid: &str,
    from: StepState,
    events: &[StepEvent],
    attempt: Option<u32>,
    actor: &str,
    reason: Option<&str>,
    now: Millis,
) -> Result<StepState> {
    let mut state = from;
    for ev in events {
        let to = step_transition(state, *ev)?;
        insert_step_transition(
            tx,
            step_uuid,
            task_uuid,
            Some(state),
            to,
            ev.as_str(),
            actor,
            reason,
            attempt,
            now,
        )
        .await?;
        state = to;
    }
    sqlx::query("UPDATE steps SET state = $1, updated_at = $2 WHERE step_uuid = $3")
        .bind(state.as_str())
        .bind(now)
        .bind(step_uuid)
        .execute(&mut *tx)
        .await?;
    Ok(state)
}

/// Moves the task through `events`, recording each transition.
pub(super) async fn move_task(
    tx: &mut SqliteConnection,
    task_uuid: &str,
    from: TaskState,
    events: &[TaskEvent],
    actor: &str,
    reason: Option<&str>,
    now: Millis,
) -> Result<TaskState> {
    let mut state = from;
    for ev in events {
        let to = task_transition(state, *ev)?;
        insert_task_transition(
            tx,
            task_uuid,
            Some(state),
            to,
            ev.as_str(),
            actor,
            reason,
            now,
        )
        .await?;
        state = to;
    }
    if state != from {
        sqlx::query(
            "UPDATE tasks SET state = $1, updated_at = $2, state_entered_at = $2,
                completed_at = CASE WHEN $3 THEN $2 ELSE completed_at END
             WHERE task_uuid = $4",
        )
        .bind(state.as_str())
        .bind(now)
        .bind(state.is_terminal())
        .bind(task_uuid)
        .execute(&mut *tx)
        .await?;
    }
    Ok(state)
}

pub(super) async fn task_state(tx: &mut SqliteConnection, task_uuid: &str) -> Result<TaskState> {
    let s: Option<String> = sqlx::query_scalar("SELECT state FROM tasks WHERE task_uuid = $1")
        .bind(task_uuid)
        .fetch_optional(&mut *tx)
        .await?;
    let s = s.ok_or_else(|| Error::not_found(format!("no task {task_uuid}")))?;
    parse_state(&s)
}

pub(super) fn parse_state<T: std::str::FromStr>(s: &str) -> Result<T> {
    s.parse()
        .map_err(|_| Error::internal(format!("unknown state {s:?} in the database")))
}

/// Enqueues the task's pending steps whose parents are all satisfied, then evaluates the task
/// and walks it to its next resting state. `reason` (an operator's) is recorded on the task
/// transitions it causes.
pub(super) async fn settle(
    tx: &mut SqliteConnection,
    task_uuid: &str,
    cause: SettleCause,
    actor: &str,
    reason: Option<&str>,
    now: Millis,
) -> Result<TaskState> {
    let current = task_state(tx, task_uuid).await?;
    if current.is_terminal() {
        return Ok(current);
    }
    let mut state = current;
    if cause == SettleCause::Start {
        state = move_task(tx, task_uuid, state, &[TaskEvent::Start], actor, None, now).await?;
    }
    let ready: Vec<String> = sqlx::query_scalar(
        "SELECT s.step_uuid FROM steps s
         WHERE s.task_uuid = $1 AND s.state = 'pending'
           AND NOT EXISTS (
             SELECT 1 FROM step_edges e JOIN steps p ON p.step_uuid = e.from_step
             WHERE e.to_step = s.step_uuid AND p.state NOT IN ('complete', 'resolved_manually'))
         ORDER BY s.seq",
    )
    .bind(task_uuid)
    .fetch_all(&mut *tx)
    .await?;
    for step in &ready {
        move_step(
            tx,
            step,
            task_uuid,
            StepState::Pending,
            &[StepEvent::Enqueue],
            None,
            actor,
            None,
            now,
        )
        .await?;
    }
    if !ready.is_empty() {
        sqlx::query(
            "UPDATE steps SET enqueued_at = $1 WHERE task_uuid = $2 AND state = 'enqueued' AND enqueued_at IS NULL",
        )
        .bind(now)
        .bind(task_uuid)
        .execute(&mut *tx)
        .await?;
    }
    let rows =
        sqlx::query("SELECT state, COUNT(*) AS n FROM steps WHERE task_uuid = $1 GROUP BY state")
            .bind(task_uuid)
            .fetch_all(&mut *tx)
            .await?;
    let mut counts = StepCounts::default();
    for row in rows {
        let s: StepState = parse_state(&row.try_get::<String, _>("state")?)?;
        let n: i64 = row.try_get("n")?;
        for _ in 0..n {
            counts.add(s);
        }
    }
    let events = settle_events(state, &counts, cause);
    move_task(tx, task_uuid, state, &events, actor, reason, now).await
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s)
        .map_err(|e| Error::internal(format!("corrupt JSON in the database: {e}")))
}
