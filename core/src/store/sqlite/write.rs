//! The SQLite write transactions. Each function runs inside a transaction opened by the
//! caller; business decisions (retry, evaluation) come from `orchestrator` and `state`.

use serde_json::{Map, Value};
use sqlx::{AssertSqlSafe, Row, SqliteConnection};

use crate::clock::Millis;
use crate::job::{Checkpoint, StepJob};
use crate::orchestrator::{SettleCause, settle_events};
use crate::state::{StepCounts, StepEvent, StepState, TaskEvent, TaskState, step_transition, task_transition};
use crate::store::{
    AttemptResult, CallableFilter, ClaimRequest, Completion, Created, Expiry, FinishReport,
    NewTask, OperatorAction, Resolution, TemplatePut,
};
use crate::template::{StepDefinition, TaskTemplate};
use crate::{Error, ErrorKind, Result};

/// How many checkpoints a step keeps (SPEC §7).
const CHECKPOINT_HISTORY: usize = 20;

fn json(v: &impl serde::Serialize) -> Result<String> {
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
    sqlx::query("INSERT OR IGNORE INTO template_snapshots (content_hash, definition) VALUES ($1, $2)")
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
            return Ok(Created::Existing { uuid, by_key: task.identity_from_key });
        }
    }
    let t = &task.template;
    let hash = t.content_hash();
    sqlx::query("INSERT OR IGNORE INTO template_snapshots (content_hash, definition) VALUES ($1, $2)")
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
    insert_task_transition(tx, &task.uuid, None, TaskState::Pending, "create", actor, None, now)
        .await?;
    insert_steps(tx, &task.uuid, &t.namespace, r.priority, &task.steps, &task.edges, actor, now)
        .await?;
    settle(tx, &task.uuid, SettleCause::Start, actor, now).await?;
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
            tx, &s.uuid, task_uuid, None, StepState::Pending, "create", actor, None, None, now,
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
            return Err(Error::internal(format!("edge {parent} → {child} names a missing step")));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn insert_task_transition(
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
async fn insert_step_transition(
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
async fn move_step(
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
            tx, step_uuid, task_uuid, Some(state), to, ev.as_str(), actor, reason, attempt, now,
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
async fn move_task(
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
        insert_task_transition(tx, task_uuid, Some(state), to, ev.as_str(), actor, reason, now)
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

async fn task_state(tx: &mut SqliteConnection, task_uuid: &str) -> Result<TaskState> {
    let s: Option<String> = sqlx::query_scalar("SELECT state FROM tasks WHERE task_uuid = $1")
        .bind(task_uuid)
        .fetch_optional(&mut *tx)
        .await?;
    let s = s.ok_or_else(|| Error::not_found(format!("no task {task_uuid}")))?;
    parse_state(&s)
}

fn parse_state<T: std::str::FromStr>(s: &str) -> Result<T> {
    s.parse().map_err(|_| Error::internal(format!("unknown state {s:?} in the database")))
}

/// Enqueues the task's pending steps whose parents are all satisfied, then evaluates the task
/// and walks it to its next resting state.
pub(super) async fn settle(
    tx: &mut SqliteConnection,
    task_uuid: &str,
    cause: SettleCause,
    actor: &str,
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
        move_step(tx, step, task_uuid, StepState::Pending, &[StepEvent::Enqueue], None, actor, None, now)
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
    let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM steps WHERE task_uuid = $1 GROUP BY state")
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
    move_task(tx, task_uuid, state, &events, actor, None, now).await
}

pub(super) async fn claim(
    tx: &mut SqliteConnection,
    req: &ClaimRequest,
    now: Millis,
) -> Result<Vec<StepJob>> {
    if req.limit == 0 {
        return Ok(Vec::new());
    }
    let mut filter = String::new();
    let mut binds: Vec<&str> = Vec::new();
    let mut next = 6;
    let mut in_list = |filter: &mut String, column: &str, negate: bool, values: &[String]| {
        let list: Vec<String> = values
            .iter()
            .map(|_| {
                let p = format!("${next}");
                next += 1;
                p
            })
            .collect();
        filter.push_str(&format!(
            " AND {column} {}IN ({})",
            if negate { "NOT " } else { "" },
            list.join(", ")
        ));
    };
    if !req.namespaces.is_empty() {
        in_list(&mut filter, "namespace", false, &req.namespaces);
        binds.extend(req.namespaces.iter().map(String::as_str));
    }
    match &req.callables {
        CallableFilter::Only(c) if c.is_empty() => return Ok(Vec::new()),
        CallableFilter::Only(c) => {
            in_list(&mut filter, "callable", false, c);
            binds.extend(c.iter().map(String::as_str));
        }
        CallableFilter::AnyExcept(c) if c.is_empty() => {}
        CallableFilter::AnyExcept(c) => {
            in_list(&mut filter, "callable", true, c);
            binds.extend(c.iter().map(String::as_str));
        }
    }
    let sql = format!(
        "UPDATE steps SET state = 'in_progress', attempts = attempts + 1, worker_id = $1,
            lease_expires_at = $2 + $3, started_at = $2, updated_at = $2, next_attempt_at = NULL,
            timeout_at = $2 + COALESCE(timeout_ms, $4)
         WHERE step_uuid IN (
            SELECT step_uuid FROM steps WHERE state = 'enqueued'{filter}
            ORDER BY priority DESC, enqueued_at LIMIT $5)
         RETURNING step_uuid, task_uuid, name, attempts, definition, inputs, checkpoint, timeout_at"
    );
    let mut q = sqlx::query(AssertSqlSafe(sql))
        .bind(&req.worker_id)
        .bind(now)
        .bind(req.lease_ms)
        .bind(req.default_timeout_ms)
        .bind(req.limit as i64);
    for b in binds {
        q = q.bind(b);
    }
    let rows = q.fetch_all(&mut *tx).await?;
    let to = step_transition(StepState::Enqueued, StepEvent::Claim)?;
    let mut jobs = Vec::with_capacity(rows.len());
    let mut task_cache: std::collections::HashMap<String, (String, String, String, String, Value)> =
        std::collections::HashMap::new();
    for row in rows {
        let step_uuid: String = row.try_get("step_uuid")?;
        let task_uuid: String = row.try_get("task_uuid")?;
        let attempt = row.try_get::<i64, _>("attempts")? as u32;
        insert_step_transition(
            tx,
            &step_uuid,
            &task_uuid,
            Some(StepState::Enqueued),
            to,
            StepEvent::Claim.as_str(),
            &req.worker_id,
            None,
            Some(attempt),
            now,
        )
        .await?;
        if !task_cache.contains_key(&task_uuid) {
            let t = sqlx::query(
                "SELECT namespace, name, version, correlation_id, context FROM tasks WHERE task_uuid = $1",
            )
            .bind(&task_uuid)
            .fetch_one(&mut *tx)
            .await?;
            let context: Value = decode(&t.try_get::<String, _>("context")?)?;
            task_cache.insert(
                task_uuid.clone(),
                (
                    t.try_get("namespace")?,
                    t.try_get("name")?,
                    t.try_get("version")?,
                    t.try_get("correlation_id")?,
                    context,
                ),
            );
        }
        let (namespace, task_name, task_version, correlation_id, context) = &task_cache[&task_uuid];
        let definition: StepDefinition = decode(&row.try_get::<String, _>("definition")?)?;
        let inputs: Map<String, Value> = decode(&row.try_get::<String, _>("inputs")?)?;
        let checkpoint: Option<String> = row.try_get("checkpoint")?;
        let checkpoint: Option<Checkpoint> = checkpoint.map(|c| decode(&c)).transpose()?;
        let dependency_results = ancestor_results(tx, &step_uuid).await?;
        jobs.push(StepJob {
            task_uuid: task_uuid.clone(),
            step_uuid,
            step_name: row.try_get("name")?,
            attempt,
            worker_id: req.worker_id.clone(),
            namespace: namespace.clone(),
            task_name: task_name.clone(),
            task_version: task_version.clone(),
            correlation_id: correlation_id.clone(),
            definition,
            context: context.clone(),
            inputs,
            dependency_results,
            checkpoint,
            started_at: now,
            timeout_at: row.try_get("timeout_at")?,
        });
    }
    Ok(jobs)
}

fn decode<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| Error::internal(format!("corrupt JSON in the database: {e}")))
}

/// Results of every satisfied ancestor of a step, by name.
pub(super) async fn ancestor_results(
    tx: &mut SqliteConnection,
    step_uuid: &str,
) -> Result<Map<String, Value>> {
    let rows = sqlx::query(
        "WITH RECURSIVE anc(id) AS (
            SELECT from_step FROM step_edges WHERE to_step = $1
            UNION
            SELECT e.from_step FROM step_edges e JOIN anc ON e.to_step = anc.id)
         SELECT s.name, s.result FROM steps s JOIN anc ON s.step_uuid = anc.id
         WHERE s.state IN ('complete', 'resolved_manually') ORDER BY s.seq",
    )
    .bind(step_uuid)
    .fetch_all(&mut *tx)
    .await?;
    let mut out = Map::new();
    for r in rows {
        let result: Option<String> = r.try_get("result")?;
        let v = match result {
            Some(s) => decode(&s)?,
            None => Value::Null,
        };
        out.insert(r.try_get("name")?, v);
    }
    Ok(out)
}

struct Current {
    task_uuid: String,
    state: StepState,
    attempts: u32,
    worker_id: Option<String>,
    lease_expires_at: Option<Millis>,
    timeout_at: Option<Millis>,
}

async fn current(tx: &mut SqliteConnection, step_uuid: &str) -> Result<Option<Current>> {
    let row = sqlx::query(
        "SELECT task_uuid, state, attempts, worker_id, lease_expires_at, timeout_at
         FROM steps WHERE step_uuid = $1",
    )
    .bind(step_uuid)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(Current {
        task_uuid: row.try_get("task_uuid")?,
        state: parse_state(&row.try_get::<String, _>("state")?)?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        worker_id: row.try_get("worker_id")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        timeout_at: row.try_get("timeout_at")?,
    }))
}

/// Why a completion for `attempt` by `worker` does not apply, if it does not.
fn staleness(
    c: &Current,
    attempt: u32,
    worker: Option<&str>,
    expiry: Option<Expiry>,
    now: Millis,
) -> Option<String> {
    if c.state != StepState::InProgress {
        return Some(format!("step is {}, not in_progress", c.state));
    }
    if c.attempts != attempt {
        return Some(format!("attempt {attempt} is not current (current attempt is {})", c.attempts));
    }
    if let Some(w) = worker
        && c.worker_id.as_deref() != Some(w)
    {
        return Some(format!(
            "attempt {attempt} is held by worker {}",
            c.worker_id.as_deref().unwrap_or("none")
        ));
    }
    match expiry {
        Some(Expiry::Timeout) if c.timeout_at.is_none_or(|t| t > now) => {
            Some("attempt has not timed out".into())
        }
        Some(Expiry::LeaseExpired) if c.lease_expires_at.is_none_or(|t| t > now) => {
            Some("lease was renewed".into())
        }
        _ => None,
    }
}

async fn record_rejection(
    tx: &mut SqliteConnection,
    step_uuid: &str,
    task_uuid: Option<&str>,
    attempt: u32,
    worker: Option<&str>,
    reason: &str,
    outcome: Option<String>,
    now: Millis,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO rejected_completions (step_uuid, task_uuid, attempt, worker_id, reason, outcome, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(step_uuid)
    .bind(task_uuid)
    .bind(attempt as i64)
    .bind(worker)
    .bind(reason)
    .bind(outcome)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

pub(super) async fn finish(
    tx: &mut SqliteConnection,
    results: &[AttemptResult],
    actor: &str,
    now: Millis,
) -> Result<Vec<FinishReport>> {
    let mut reports = Vec::with_capacity(results.len());
    let mut touched: Vec<String> = Vec::new();
    for r in results {
        let Some(c) = current(tx, &r.step_uuid).await? else {
            reports.push(FinishReport {
                step_uuid: r.step_uuid.clone(),
                task_uuid: None,
                completion: Completion::Rejected("no such step".into()),
                task_state: None,
            });
            continue;
        };
        let who = r.worker_id.as_deref().unwrap_or(actor);
        if let Some(reason) = staleness(&c, r.attempt, r.worker_id.as_deref(), r.expiry, now) {
            // Engine-made expiries that lost a race are not late completions: nothing to record.
            if r.expiry.is_none() {
                let outcome = serde_json::to_string(&r.resolution_summary()).ok();
                record_rejection(tx, &r.step_uuid, Some(&c.task_uuid), r.attempt, r.worker_id.as_deref(), &reason, outcome, now)
                    .await?;
            }
            reports.push(FinishReport {
                step_uuid: r.step_uuid.clone(),
                task_uuid: Some(c.task_uuid),
                completion: Completion::Rejected(reason),
                task_state: None,
            });
            continue;
        }
        let attempt = Some(r.attempt);
        match &r.resolution {
            Resolution::Succeeded { result, metadata } => {
                move_step(tx, &r.step_uuid, &c.task_uuid, c.state, &[StepEvent::Succeed, StepEvent::Complete], attempt, who, None, now)
                    .await?;
                let _ = metadata;
                sqlx::query(
                    "UPDATE steps SET result = $1, completed_at = $2, lease_expires_at = NULL,
                        timeout_at = NULL, started_at = COALESCE($3, started_at)
                     WHERE step_uuid = $4",
                )
                .bind(json(result)?)
                .bind(now)
                .bind(r.started_at)
                .bind(&r.step_uuid)
                .execute(&mut *tx)
                .await?;
            }
            Resolution::Retry { failure, next_attempt_at } => {
                let reason = format!("{}: {}", failure.error_type, failure.message);
                move_step(tx, &r.step_uuid, &c.task_uuid, c.state, &[StepEvent::Fail, StepEvent::RetryDecided], attempt, who, Some(&reason), now)
                    .await?;
                sqlx::query(
                    "UPDATE steps SET error = $1, next_attempt_at = $2, lease_expires_at = NULL,
                        timeout_at = NULL, started_at = COALESCE($3, started_at)
                     WHERE step_uuid = $4",
                )
                .bind(json(failure)?)
                .bind(next_attempt_at)
                .bind(r.started_at)
                .bind(&r.step_uuid)
                .execute(&mut *tx)
                .await?;
            }
            Resolution::Failed { failure } => {
                let reason = format!("{}: {}", failure.error_type, failure.message);
                move_step(tx, &r.step_uuid, &c.task_uuid, c.state, &[StepEvent::Fail, StepEvent::GiveUp], attempt, who, Some(&reason), now)
                    .await?;
                sqlx::query(
                    "UPDATE steps SET error = $1, completed_at = $2, lease_expires_at = NULL,
                        timeout_at = NULL, started_at = COALESCE($3, started_at)
                     WHERE step_uuid = $4",
                )
                .bind(json(failure)?)
                .bind(now)
                .bind(r.started_at)
                .bind(&r.step_uuid)
                .execute(&mut *tx)
                .await?;
            }
        }
        if !touched.contains(&c.task_uuid) {
            touched.push(c.task_uuid.clone());
        }
        reports.push(FinishReport {
            step_uuid: r.step_uuid.clone(),
            task_uuid: Some(c.task_uuid),
            completion: Completion::Accepted,
            task_state: None,
        });
    }
    let mut states = Vec::with_capacity(touched.len());
    for task in &touched {
        states.push((task.clone(), settle(tx, task, SettleCause::StepResult, actor, now).await?));
    }
    for rep in &mut reports {
        if rep.completion == Completion::Accepted {
            rep.task_state = states
                .iter()
                .find(|(t, _)| Some(t) == rep.task_uuid.as_ref())
                .map(|(_, s)| *s);
        }
    }
    Ok(reports)
}

impl AttemptResult {
    fn resolution_summary(&self) -> Value {
        match &self.resolution {
            Resolution::Succeeded { result, .. } => serde_json::json!({"outcome": "success", "result": result}),
            Resolution::Retry { failure, .. } | Resolution::Failed { failure } => {
                serde_json::json!({"outcome": "failure", "error": failure})
            }
        }
    }
}

pub(super) async fn checkpoint(
    tx: &mut SqliteConnection,
    step_uuid: &str,
    attempt: u32,
    worker_id: &str,
    cp: &Checkpoint,
    lease_until: Millis,
    now: Millis,
) -> Result<Completion> {
    let Some(c) = current(tx, step_uuid).await? else {
        return Ok(Completion::Rejected("no such step".into()));
    };
    if let Some(reason) = staleness(&c, attempt, Some(worker_id), None, now) {
        record_rejection(tx, step_uuid, Some(&c.task_uuid), attempt, Some(worker_id), &reason, json(cp).ok(), now)
            .await?;
        return Ok(Completion::Rejected(reason));
    }
    let history: Option<String> =
        sqlx::query_scalar("SELECT checkpoint_history FROM steps WHERE step_uuid = $1")
            .bind(step_uuid)
            .fetch_one(&mut *tx)
            .await?;
    let mut history: Vec<Value> = history.map(|h| decode(&h)).transpose()?.unwrap_or_default();
    history.push(serde_json::json!({"cursor": cp.cursor, "items_processed": cp.items_processed, "attempt": attempt, "at": now}));
    if history.len() > CHECKPOINT_HISTORY {
        history.drain(..history.len() - CHECKPOINT_HISTORY);
    }
    move_step(tx, step_uuid, &c.task_uuid, c.state, &[StepEvent::Checkpoint], Some(attempt), worker_id, None, now)
        .await?;
    sqlx::query(
        "UPDATE steps SET checkpoint = $1, checkpoint_history = $2, lease_expires_at = $3 WHERE step_uuid = $4",
    )
    .bind(json(cp)?)
    .bind(json(&history)?)
    .bind(lease_until)
    .bind(step_uuid)
    .execute(&mut *tx)
    .await?;
    Ok(Completion::Accepted)
}

pub(super) async fn renew_leases(
    tx: &mut SqliteConnection,
    worker_id: &str,
    step_uuids: &[String],
    lease_until: Millis,
    now: Millis,
) -> Result<u64> {
    let mut n = 0;
    for chunk in step_uuids.chunks(500) {
        let list: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 4)).collect();
        let sql = format!(
            "UPDATE steps SET lease_expires_at = $1, updated_at = $2
             WHERE worker_id = $3 AND state = 'in_progress' AND step_uuid IN ({})",
            list.join(", ")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(lease_until).bind(now).bind(worker_id);
        for s in chunk {
            q = q.bind(s);
        }
        n += q.execute(&mut *tx).await?.rows_affected();
    }
    Ok(n)
}

pub(super) async fn promote_due_retries(
    tx: &mut SqliteConnection,
    actor: &str,
    now: Millis,
) -> Result<u64> {
    let rows = sqlx::query(
        "SELECT step_uuid, task_uuid FROM steps
         WHERE state = 'waiting_for_retry' AND next_attempt_at <= $1 ORDER BY next_attempt_at",
    )
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    let mut tasks: Vec<String> = Vec::new();
    for row in &rows {
        let step: String = row.try_get("step_uuid")?;
        let task: String = row.try_get("task_uuid")?;
        move_step(tx, &step, &task, StepState::WaitingForRetry, &[StepEvent::RetryReady], None, actor, None, now)
            .await?;
        sqlx::query("UPDATE steps SET enqueued_at = $1 WHERE step_uuid = $2")
            .bind(now)
            .bind(&step)
            .execute(&mut *tx)
            .await?;
        if !tasks.contains(&task) {
            tasks.push(task);
        }
    }
    for task in &tasks {
        settle(tx, task, SettleCause::RetryReady, actor, now).await?;
    }
    Ok(rows.len() as u64)
}

/// Resolves a step reference (uuid or name) within a task.
async fn find_step(
    tx: &mut SqliteConnection,
    task_uuid: &str,
    step: &str,
) -> Result<(String, StepState)> {
    let row = sqlx::query(
        "SELECT step_uuid, state FROM steps WHERE task_uuid = $1 AND (step_uuid = $2 OR name = $2)",
    )
    .bind(task_uuid)
    .bind(step)
    .fetch_optional(&mut *tx)
    .await?;
    let row = row.ok_or_else(|| Error::not_found(format!("task {task_uuid} has no step {step:?}")))?;
    Ok((row.try_get("step_uuid")?, parse_state(&row.try_get::<String, _>("state")?)?))
}

pub(super) async fn operator_action(
    tx: &mut SqliteConnection,
    task_uuid: &str,
    action: &OperatorAction,
    actor: &str,
    reason: &str,
    now: Millis,
) -> Result<TaskState> {
    let state = task_state(tx, task_uuid).await?;
    let reason = Some(reason);
    match action {
        OperatorAction::Cancel => {
            // Check before touching steps, so a refused cancel changes nothing.
            task_transition(state, TaskEvent::Cancel)?;
            let rows = sqlx::query(
                "SELECT step_uuid, state FROM steps WHERE task_uuid = $1
                 AND state NOT IN ('complete', 'cancelled', 'resolved_manually', 'error')",
            )
            .bind(task_uuid)
            .fetch_all(&mut *tx)
            .await?;
            for row in rows {
                let step: String = row.try_get("step_uuid")?;
                let s: StepState = parse_state(&row.try_get::<String, _>("state")?)?;
                move_step(tx, &step, task_uuid, s, &[StepEvent::Cancel], None, actor, reason, now).await?;
                sqlx::query("UPDATE steps SET lease_expires_at = NULL, timeout_at = NULL, completed_at = $1 WHERE step_uuid = $2")
                    .bind(now)
                    .bind(&step)
                    .execute(&mut *tx)
                    .await?;
            }
            move_task(tx, task_uuid, state, &[TaskEvent::Cancel], actor, reason, now).await
        }
        OperatorAction::GiveUp => {
            move_task(tx, task_uuid, state, &[TaskEvent::GiveUp], actor, reason, now).await
        }
        OperatorAction::ResolveManually => {
            move_task(tx, task_uuid, state, &[TaskEvent::ManualResolution], actor, reason, now).await
        }
        OperatorAction::ResetStep { step } | OperatorAction::ResolveStep { step } | OperatorAction::CompleteStep { step, .. } => {
            if state.is_terminal() {
                return Err(Error::new(
                    ErrorKind::InvalidTransition,
                    format!("task {task_uuid} is {state}; its steps can no longer be changed"),
                ));
            }
            let (step_uuid, s) = find_step(tx, task_uuid, step).await?;
            let event = match action {
                OperatorAction::ResetStep { .. } => StepEvent::Reset,
                OperatorAction::ResolveStep { .. } => StepEvent::ResolveManually,
                _ => StepEvent::CompleteManually,
            };
            move_step(tx, &step_uuid, task_uuid, s, &[event], None, actor, reason, now).await?;
            match action {
                OperatorAction::ResetStep { .. } => {
                    sqlx::query(
                        "UPDATE steps SET attempts = 0, next_attempt_at = NULL, completed_at = NULL,
                            enqueued_at = NULL, worker_id = NULL WHERE step_uuid = $1",
                    )
                    .bind(&step_uuid)
                    .execute(&mut *tx)
                    .await?;
                }
                OperatorAction::CompleteStep { result, .. } => {
                    sqlx::query(
                        "UPDATE steps SET result = $1, completed_at = $2, lease_expires_at = NULL,
                            timeout_at = NULL WHERE step_uuid = $3",
                    )
                    .bind(json(result)?)
                    .bind(now)
                    .bind(&step_uuid)
                    .execute(&mut *tx)
                    .await?;
                }
                _ => {
                    sqlx::query(
                        "UPDATE steps SET completed_at = $1, lease_expires_at = NULL, timeout_at = NULL
                         WHERE step_uuid = $2",
                    )
                    .bind(now)
                    .bind(&step_uuid)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            settle(tx, task_uuid, SettleCause::OperatorFix, actor, now).await
        }
    }
}
