//! The attempt lifecycle in SQLite: claim, finish (with fencing), checkpoint, lease renewal
//! and promotion of due retries. Each function runs inside a transaction opened by the caller.

use serde_json::{Map, Value};
use sqlx::{AssertSqlSafe, Row, SqliteConnection};

use super::journal::Journal;
use super::write::{decode, json, move_step, parse_state, settle_many};
use crate::Result;
use crate::clock::Millis;
use crate::job::{Checkpoint, StepJob};
use crate::orchestrator::SettleCause;
use crate::state::{StepEvent, StepState, TaskState, step_transition};
use crate::store::{
    AttemptResult, CallableFilter, ClaimRequest, Completion, Expiry, FinishReport, Resolution,
};
use crate::template::StepDefinition;

/// How many checkpoints a step keeps (SPEC §7).
const CHECKPOINT_HISTORY: usize = 20;

/// Claims ready steps; their transitions go into `j`, which the caller flushes.
pub(super) async fn claim(
    tx: &mut SqliteConnection,
    j: &mut Journal,
    req: &ClaimRequest,
    now: Millis,
) -> Result<Vec<StepJob>> {
    if req.limit == 0 {
        return Ok(Vec::new());
    }
    let mut filter = String::new();
    let mut binds: Vec<&str> = Vec::new();
    let mut next = 5;
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
    if let Some(before) = req.enqueued_before {
        // A number, not user text: safe to inline.
        filter.push_str(&format!(" AND enqueued_at <= {before}"));
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
    // The claim is one statement. The task fields and the ancestors' results come back with
    // each row; `started_at` is never earlier than the enqueue that made the step ready (`now`
    // was read before this transaction waited for the write lock). The limit is a number we
    // computed, inlined rather than bound: SQLite plans around a bound LIMIT's value and then
    // re-prepares the statement whenever that value changes.
    let limit = req.limit;
    let sql = format!(
        "UPDATE steps SET state = 'in_progress', attempts = attempts + 1, worker_id = $1,
            lease_expires_at = $2 + $3, started_at = MAX($2, COALESCE(enqueued_at, $2)),
            updated_at = $2, next_attempt_at = NULL, timeout_at = $2 + COALESCE(timeout_ms, $4)
         WHERE step_uuid IN (
            SELECT step_uuid FROM steps WHERE state = 'enqueued'{filter}
            ORDER BY priority DESC, enqueued_at LIMIT {limit})
         RETURNING step_uuid, task_uuid, name, attempts, definition, inputs, checkpoint,
            timeout_at, started_at,
            namespace,
            (SELECT json_array(name, version, correlation_id, json(context))
             FROM tasks t WHERE t.task_uuid = steps.task_uuid) AS task,
            (WITH RECURSIVE anc(id) AS (
                SELECT from_step FROM step_edges WHERE to_step = steps.step_uuid
                UNION
                SELECT e.from_step FROM step_edges e JOIN anc ON e.to_step = anc.id)
             SELECT json_group_object(a.name, json(a.result)) FROM steps a JOIN anc ON a.step_uuid = anc.id
             WHERE a.state IN ('complete', 'resolved_manually')) AS dependency_results"
    );
    let mut q = sqlx::query(AssertSqlSafe(sql))
        .bind(&req.worker_id)
        .bind(now)
        .bind(req.lease_ms)
        .bind(req.default_timeout_ms);
    for b in binds {
        q = q.bind(b);
    }
    let rows = q.fetch_all(&mut *tx).await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }

    let mut jobs = Vec::with_capacity(rows.len());
    for row in rows {
        let step_uuid: String = row.try_get("step_uuid")?;
        let task_uuid: String = row.try_get("task_uuid")?;
        let attempt = row.try_get::<i64, _>("attempts")? as u32;
        let started_at: Millis = row.try_get("started_at")?;
        j.step_moves(
            &step_uuid,
            &task_uuid,
            StepState::Enqueued,
            &[StepEvent::Claim],
            Some(attempt),
            &req.worker_id,
            None,
            started_at,
        )?;
        let (task_name, task_version, correlation_id, context): (String, String, String, Value) =
            decode(&row.try_get::<String, _>("task")?)?;
        let definition: StepDefinition = decode(&row.try_get::<String, _>("definition")?)?;
        let inputs: Map<String, Value> = decode(&row.try_get::<String, _>("inputs")?)?;
        let checkpoint: Option<String> = row.try_get("checkpoint")?;
        let checkpoint: Option<Checkpoint> = checkpoint.map(|c| decode(&c)).transpose()?;
        jobs.push(StepJob {
            dependency_results: decode(&row.try_get::<String, _>("dependency_results")?)?,
            step_uuid,
            task_uuid,
            step_name: row.try_get("name")?,
            attempt,
            worker_id: req.worker_id.clone(),
            namespace: row.try_get("namespace")?,
            task_name,
            task_version,
            correlation_id,
            definition,
            context,
            inputs,
            checkpoint,
            started_at,
            timeout_at: row.try_get("timeout_at")?,
        });
    }
    Ok(jobs)
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
        return Some(format!(
            "attempt {attempt} is not current (current attempt is {})",
            c.attempts
        ));
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

/// A completion that arrived for an attempt that is no longer current.
struct Rejection<'a> {
    step_uuid: &'a str,
    task_uuid: Option<&'a str>,
    attempt: u32,
    worker: Option<&'a str>,
    reason: &'a str,
    /// The refused outcome, as JSON, for investigation.
    outcome: Option<String>,
}

async fn record_rejection(tx: &mut SqliteConnection, r: Rejection<'_>, now: Millis) -> Result<()> {
    sqlx::query(
        "INSERT INTO rejected_completions (step_uuid, task_uuid, attempt, worker_id, reason, outcome, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(r.step_uuid)
    .bind(r.task_uuid)
    .bind(r.attempt as i64)
    .bind(r.worker)
    .bind(r.reason)
    .bind(r.outcome)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Applies finished attempts; their transitions go into `j`, which the caller flushes.
pub(super) async fn finish(
    tx: &mut SqliteConnection,
    j: &mut Journal,
    results: &[AttemptResult],
    actor: &str,
    now: Millis,
) -> Result<Vec<FinishReport>> {
    let mut reports = Vec::with_capacity(results.len());
    let mut touched: Vec<String> = Vec::new();
    for r in results {
        let who = r.worker_id.as_deref().unwrap_or(actor);
        let (events, set, payload, reason): (&[StepEvent], &str, String, Option<String>) =
            match &r.resolution {
                Resolution::Succeeded { result, .. } => (
                    &[StepEvent::Succeed, StepEvent::Complete],
                    "result = $7, completed_at = $4, next_attempt_at = NULL",
                    json(result)?,
                    None,
                ),
                Resolution::Retry { failure, .. } => (
                    &[StepEvent::Fail, StepEvent::RetryDecided],
                    "error = $7, next_attempt_at = $8",
                    json(failure)?,
                    Some(format!("{}: {}", failure.error_type, failure.message)),
                ),
                Resolution::Failed { failure } => (
                    &[StepEvent::Fail, StepEvent::GiveUp],
                    "error = $7, completed_at = $4, next_attempt_at = NULL",
                    json(failure)?,
                    Some(format!("{}: {}", failure.error_type, failure.message)),
                ),
            };
        let next_attempt_at = match &r.resolution {
            Resolution::Retry {
                next_attempt_at, ..
            } => Some(*next_attempt_at),
            _ => None,
        };
        // The final state comes from the state table, checked before anything is written.
        let to = events
            .iter()
            .try_fold(StepState::InProgress, |s, e| step_transition(s, *e))?;
        // Applying and fencing are one statement: it changes the row only while this attempt
        // is still the current one (and, for engine-made expiries, still expired).
        // Only the guards that apply are in the statement, so each shape keeps a simple plan.
        let worker_guard = if r.worker_id.is_some() {
            "AND worker_id = $5"
        } else {
            ""
        };
        let expiry_guard = match r.expiry {
            None => "",
            Some(Expiry::Timeout) => "AND timeout_at <= $4",
            Some(Expiry::LeaseExpired) => "AND lease_expires_at <= $4",
        };
        let sql = format!(
            "UPDATE steps SET state = $6, {set}, lease_expires_at = NULL, timeout_at = NULL,
                started_at = COALESCE($3, started_at), updated_at = $4
             WHERE step_uuid = $1 AND state = 'in_progress' AND attempts = $2
               {worker_guard} {expiry_guard}
             RETURNING task_uuid"
        );
        let applied: Option<String> = sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(&r.step_uuid)
            .bind(i64::from(r.attempt))
            .bind(r.started_at)
            .bind(now)
            .bind(r.worker_id.as_deref())
            .bind(to.as_str())
            .bind(payload)
            .bind(next_attempt_at)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(task_uuid) = applied else {
            reports.push(reject(tx, r, now).await?);
            continue;
        };
        j.step_moves(
            &r.step_uuid,
            &task_uuid,
            StepState::InProgress,
            events,
            Some(r.attempt),
            who,
            reason.as_deref(),
            now,
        )?;
        if !touched.contains(&task_uuid) {
            touched.push(task_uuid.clone());
        }
        reports.push(FinishReport {
            step_uuid: r.step_uuid.clone(),
            task_uuid: Some(task_uuid),
            completion: Completion::Accepted,
            task_state: None,
        });
    }
    let settled = settle_many(tx, j, &touched, SettleCause::StepResult, actor, None, now).await?;
    let states: Vec<(String, TaskState)> = touched.into_iter().zip(settled).collect();
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

/// The slow path of `finish`: explains why a result did not apply and records late
/// completions (engine-made expiries that lost a race are not late completions).
async fn reject(tx: &mut SqliteConnection, r: &AttemptResult, now: Millis) -> Result<FinishReport> {
    let Some(c) = current(tx, &r.step_uuid).await? else {
        return Ok(FinishReport {
            step_uuid: r.step_uuid.clone(),
            task_uuid: None,
            completion: Completion::Rejected("no such step".into()),
            task_state: None,
        });
    };
    let reason = staleness(&c, r.attempt, r.worker_id.as_deref(), r.expiry, now)
        .unwrap_or_else(|| format!("attempt {} is not current", r.attempt));
    if r.expiry.is_none() {
        let rejection = Rejection {
            step_uuid: &r.step_uuid,
            task_uuid: Some(&c.task_uuid),
            attempt: r.attempt,
            worker: r.worker_id.as_deref(),
            reason: &reason,
            outcome: serde_json::to_string(&r.resolution_summary()).ok(),
        };
        record_rejection(tx, rejection, now).await?;
    }
    Ok(FinishReport {
        step_uuid: r.step_uuid.clone(),
        task_uuid: Some(c.task_uuid),
        completion: Completion::Rejected(reason),
        task_state: None,
    })
}

impl AttemptResult {
    fn resolution_summary(&self) -> Value {
        match &self.resolution {
            Resolution::Succeeded { result, .. } => {
                serde_json::json!({"outcome": "success", "result": result})
            }
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
        let rejection = Rejection {
            step_uuid,
            task_uuid: Some(&c.task_uuid),
            attempt,
            worker: Some(worker_id),
            reason: &reason,
            outcome: json(cp).ok(),
        };
        record_rejection(tx, rejection, now).await?;
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
    let mut j = Journal::default();
    move_step(
        tx,
        &mut j,
        step_uuid,
        &c.task_uuid,
        c.state,
        &[StepEvent::Checkpoint],
        Some(attempt),
        worker_id,
        None,
        now,
    )
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
    j.flush(tx).await?;
    Ok(Completion::Accepted)
}

pub(super) async fn renew_leases(
    tx: &mut SqliteConnection,
    worker_id: &str,
    attempts: &[(String, u32)],
    lease_until: Millis,
    now: Millis,
) -> Result<u64> {
    let mut n = 0;
    for chunk in attempts.chunks(500) {
        let list: Vec<String> = (0..chunk.len())
            .map(|i| format!("(${}, ${})", 4 + 2 * i, 5 + 2 * i))
            .collect();
        // Only the attempt that was handed out is renewed: a superseded one stays expired.
        let sql = format!(
            "UPDATE steps SET lease_expires_at = $1, updated_at = $2
             WHERE worker_id = $3 AND state = 'in_progress'
               AND (step_uuid, attempts) IN (VALUES {})",
            list.join(", ")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .bind(lease_until)
            .bind(now)
            .bind(worker_id);
        for (step, attempt) in chunk {
            q = q.bind(step).bind(i64::from(*attempt));
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
        "UPDATE steps SET state = 'enqueued', enqueued_at = $1, updated_at = $1
         WHERE state = 'waiting_for_retry' AND next_attempt_at <= $1
         RETURNING step_uuid, task_uuid",
    )
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    let mut j = Journal::default();
    let mut tasks: Vec<String> = Vec::new();
    for row in &rows {
        let step: String = row.try_get("step_uuid")?;
        let task: String = row.try_get("task_uuid")?;
        j.step_moves(
            &step,
            &task,
            StepState::WaitingForRetry,
            &[StepEvent::RetryReady],
            None,
            actor,
            None,
            now,
        )?;
        if !tasks.contains(&task) {
            tasks.push(task);
        }
    }
    settle_many(
        tx,
        &mut j,
        &tasks,
        SettleCause::RetryReady,
        actor,
        None,
        now,
    )
    .await?;
    j.flush(tx).await?;
    Ok(rows.len() as u64)
}
