//! The attempt lifecycle in SQLite: claim, finish (with fencing), checkpoint, lease renewal
//! and promotion of due retries. Each function runs inside a transaction opened by the caller.

use sqlx::{AssertSqlSafe, Row, SqliteConnection};

use super::journal::{Flush, Journal, Param, bind_all};
use super::write::{json, move_step, settle_many};
use crate::Result;
use crate::clock::Millis;
use crate::job::{Checkpoint, StepJob};
use crate::orchestrator::SettleCause;
use crate::state::{StepEvent, StepState};
pub(super) use crate::store::apply::Rejection;
use crate::store::apply::{self, stale_checkpoint};
pub(super) use crate::store::rows::{self, CURRENT_COLUMNS, Current, claimed_job};
use crate::store::{CallableFilter, ClaimRequest, Completion};

/// Claims ready steps; their transitions go into `j`, which the caller flushes.
pub(super) async fn claim(
    tx: &mut SqliteConnection,
    j: &mut Journal,
    req: &ClaimRequest,
    now: Millis,
) -> Result<Vec<StepJob>> {
    let Some((sql, params)) = claim_statement(req, now, "") else {
        return Ok(Vec::new());
    };
    let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), params)
        .fetch_all(&mut *tx)
        .await?;
    rows.iter().map(|row| claimed_job(row, j, req)).collect()
}

/// The claim statement and its parameters (anonymous, in order), or `None` when the request
/// cannot match anything. `tag` is prepended to each returned row's columns (e.g. `'j', `)
/// so the rows can be told apart from those of other statements run in the same round trip.
///
/// The claim is one statement. The task fields and the ancestors' results come back with each
/// row; `started_at` is never earlier than the enqueue that made the step ready (`now` was
/// read before the transaction waited for the write lock). The limit is a number we computed,
/// inlined rather than bound: SQLite plans around a bound LIMIT's value and then re-prepares
/// the statement whenever that value changes.
pub(super) fn claim_statement(
    req: &ClaimRequest,
    now: Millis,
    tag: &str,
) -> Option<(String, Vec<Param>)> {
    if req.limit == 0 {
        return None;
    }
    let mut params = vec![
        Param::Text(Some(req.worker_id.clone())),
        Param::Int(Some(now)),
        Param::Int(Some(req.lease_ms)),
        Param::Int(Some(now)),
        Param::Int(Some(now)),
        Param::Int(Some(now)),
        Param::Int(Some(now)),
        Param::Int(Some(req.default_timeout_ms)),
    ];
    let mut filter = String::new();
    let mut in_list = |filter: &mut String, column: &str, negate: bool, values: &[String]| {
        let marks = vec!["?"; values.len()].join(", ");
        let not = if negate { "NOT " } else { "" };
        filter.push_str(&format!(" AND {column} {not}IN ({marks})"));
        params.extend(values.iter().map(|v| Param::Text(Some(v.clone()))));
    };
    if !req.namespaces.is_empty() {
        in_list(&mut filter, "namespace", false, &req.namespaces);
    }
    match &req.callables {
        CallableFilter::Only(c) if c.is_empty() => return None,
        CallableFilter::Only(c) => in_list(&mut filter, "callable", false, c),
        CallableFilter::AnyExcept(c) if c.is_empty() => {}
        CallableFilter::AnyExcept(c) => in_list(&mut filter, "callable", true, c),
        CallableFilter::Steps(s) if s.is_empty() => return None,
        CallableFilter::Steps(s) => in_list(&mut filter, "step_uuid", false, s),
        CallableFilter::Workflows => filter.push_str(" AND step_type = 'workflow'"),
    }
    if req.callables != CallableFilter::Workflows {
        filter.push_str(" AND step_type <> 'workflow'");
    }
    if let Some(before) = req.enqueued_before {
        // A number, not user text: safe to inline.
        filter.push_str(&format!(" AND enqueued_at <= {before}"));
    }
    let limit = req.limit;
    let sql = format!(
        "UPDATE steps SET state = 'in_progress', attempts = attempts + 1, worker_id = ?,
            lease_expires_at = ? + ?, started_at = MAX(?, COALESCE(enqueued_at, ?)),
            updated_at = ?, next_attempt_at = NULL, timeout_at = ? + COALESCE(timeout_ms, ?)
         WHERE step_uuid IN (
            SELECT step_uuid FROM steps WHERE state = 'enqueued'{filter}
            ORDER BY priority DESC, enqueued_at LIMIT {limit})
         RETURNING {tag}step_uuid, task_uuid, name, attempts, definition, inputs, checkpoint,
            timeout_at, started_at,
            namespace,
            (SELECT json_array(name, version, correlation_id, json(context), template_hash)
             FROM tasks t WHERE t.task_uuid = steps.task_uuid) AS task,
            (WITH RECURSIVE anc(id) AS (
                SELECT from_step FROM step_edges WHERE to_step = steps.step_uuid
                UNION
                SELECT e.from_step FROM step_edges e JOIN anc ON e.to_step = anc.id)
             SELECT json_group_object(a.name, json(a.result)) FROM steps a JOIN anc ON a.step_uuid = anc.id
             WHERE a.state IN ('complete', 'resolved_manually')) AS dependency_results,
            CASE WHEN step_type = 'deferred_convergence' THEN
              (SELECT json_group_object(p.name, json(p.error))
               FROM step_edges e JOIN steps p ON p.step_uuid = e.from_step
               WHERE e.to_step = steps.step_uuid AND p.state = 'error') END
              AS failed_dependencies"
    );
    Some((sql, params))
}

pub(super) async fn current(tx: &mut SqliteConnection, step_uuid: &str) -> Result<Option<Current>> {
    let sql = format!("SELECT {CURRENT_COLUMNS} FROM steps WHERE step_uuid = $1");
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(step_uuid)
        .fetch_optional(&mut *tx)
        .await?;
    row.as_ref().map(rows::current).transpose()
}

pub(super) async fn record_rejection(
    tx: &mut SqliteConnection,
    r: Rejection<'_>,
    now: Millis,
) -> Result<()> {
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

/// Stores `cp` for attempt `attempt` held by `worker_id`, with the attempt's new lease and
/// timeout deadlines.
pub(super) async fn checkpoint(
    tx: &mut SqliteConnection,
    step_uuid: &str,
    (attempt, worker_id): (u32, &str),
    cp: &Checkpoint,
    (lease_until, timeout_at): (Millis, Millis),
    now: Millis,
) -> Result<Completion> {
    let Some(c) = current(tx, step_uuid).await? else {
        return Ok(Completion::Rejected("no such step".into()));
    };
    if let Some(rejection) = stale_checkpoint(step_uuid, &c, attempt, worker_id, cp, now) {
        let reason = rejection.reason.clone();
        record_rejection(tx, rejection, now).await?;
        return Ok(Completion::Rejected(reason));
    }
    let history = c.checkpoint_history.clone();
    let history = apply::checkpoint_history(history, cp, attempt, now)?;
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
        "UPDATE steps SET checkpoint = $1, checkpoint_history = $2, lease_expires_at = $3,
            timeout_at = $4 WHERE step_uuid = $5",
    )
    .bind(json(cp)?)
    .bind(history)
    .bind(lease_until)
    .bind(timeout_at)
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
