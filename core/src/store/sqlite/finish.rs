//! Applying finished attempts in SQLite, with the claim of what they made ready, in two round
//! trips to the connection thread whatever the number of results:
//!
//! 1. `BEGIN IMMEDIATE`, one fenced `UPDATE` per result, the `UPDATE` that enqueues the steps
//!    of the results' tasks that became ready, the tally of those tasks' steps, and the claim;
//! 2. the journal's audit rows and task-state changes, and `COMMIT`.
//!
//! Between them the engine decides, in Rust, each task's next state from its tally. Round
//! trips, not SQLite's own work, are the hot path's cost (see `journal.rs`), which is why the
//! statements travel together and their rows are told apart by a leading tag column.

use sqlx::{AssertSqlSafe, SqliteConnection};

use super::attempts::{claim_statement, current, record_rejection};
use super::journal::{Journal, Param, bind_all};
use super::write::{SETTLE, json, settle_params, settle_task};
use crate::Result;
use crate::clock::Millis;
use crate::job::StepJob;
use crate::orchestrator::SettleCause;
use crate::store::apply::{FinishRow, Target, finish_row, rejected};
pub(super) use crate::store::apply::{Rows, expansion_rows};
use crate::store::{AttemptResult, ClaimRequest, Completion, FinishReport, Resolution};

/// One result, applied and fenced in one statement: the row changes only while the attempt is
/// still the current one (held by the reporting worker, when one reports; still expired, for
/// engine-made expiries). Every result uses this one shape, unused parts bound to NULL, so the
/// statement text depends only on how many results there are. A step that declares
/// `publishes_events` returns its declarations with what the events' metadata needs; the
/// events go into the outbox with the journal (SPEC §10).
const FINISH_ONE: &str = "UPDATE steps SET state = ?, result = COALESCE(?, result),
        error = COALESCE(?, error), completed_at = COALESCE(?, completed_at),
        next_attempt_at = ?, lease_expires_at = NULL, timeout_at = NULL,
        started_at = COALESCE(?, started_at), updated_at = ?
     WHERE step_uuid = ? AND state = 'in_progress' AND attempts = ?
       AND (? IS NULL OR worker_id = ?)
       AND (? IS NULL OR timeout_at <= ?)
       AND (? IS NULL OR lease_expires_at <= ?)
     RETURNING 'f', ?, task_uuid,
        CASE WHEN instr(definition, '\"publishes_events\"') > 0 THEN json_array(name, namespace,
            (SELECT correlation_id FROM tasks t WHERE t.task_uuid = steps.task_uuid),
            json(json_extract(definition, '$.publishes_events'))) END;\n";

/// Parameters of [`FINISH_ONE`].
const FINISH_PARAMS: usize = 16;

/// The tasks a settle after results looks at: those of the results' steps (a JSON array).
const RESULT_TASKS: &str =
    "SELECT task_uuid FROM steps WHERE step_uuid IN (SELECT value FROM json_each(?))";

/// Applies `results`, settles their tasks and runs `claim`; transitions go into `j`, which the
/// caller flushes. `prefix` (e.g. `BEGIN IMMEDIATE;`) is run first, in the same round trip.
///
/// The number of statements is rounded up to a power of two with updates that match nothing,
/// so that a few statement texts serve every batch size and stay prepared.
pub(super) async fn finish(
    tx: &mut SqliteConnection,
    j: &mut Journal,
    results: &[AttemptResult],
    actor: &str,
    claim: Option<&ClaimRequest>,
    prefix: &str,
    now: Millis,
) -> Result<(Vec<FinishReport>, Vec<StepJob>)> {
    let mut sql = String::from(prefix);
    let mut params: Vec<Param> = Vec::new();
    let mut targets = Vec::with_capacity(results.len());
    let slots = if results.is_empty() {
        0
    } else {
        results.len().next_power_of_two()
    };
    for i in 0..slots {
        sql.push_str(FINISH_ONE);
        match results.get(i) {
            Some(r) => {
                let (events, p) = finish_params(r, i, now)?;
                params.extend(p);
                targets.push(events);
            }
            None => params.extend((0..FINISH_PARAMS).map(|_| Param::Int(None))),
        }
    }
    // A result that creates steps needs to know whether it applied before its steps go in:
    // the updates go first, in a round trip of their own (decisions and batches only).
    let mut applied: Vec<Option<String>> = vec![None; results.len()];
    let mut rows = Rows::new(results, &targets, &mut applied, claim, actor, now);
    if results.iter().any(|r| r.expansion.is_some()) {
        let found = bind_all(sqlx::query(AssertSqlSafe(std::mem::take(&mut sql))), params)
            .fetch_all(&mut *tx)
            .await?;
        rows.absorb(j, &found)?;
        params = Vec::new();
        let mut new_steps = Vec::new();
        let mut new_edges = Vec::new();
        for (r, task) in results.iter().zip(rows.applied.iter()) {
            if let (Some(x), Some(task)) = (&r.expansion, task) {
                expansion_rows(task, x, &mut new_steps, &mut new_edges)?;
            }
        }
        if !new_steps.is_empty() {
            sql.push_str(INSERT_STEPS);
            params.extend([Param::Int(Some(now)), Param::Int(Some(now))]);
            params.push(Param::Text(Some(json(&new_steps)?)));
        }
        if !new_edges.is_empty() {
            sql.push_str(INSERT_EDGES);
            params.push(Param::Text(Some(json(&new_edges)?)));
        }
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| matches!(r.resolution, Resolution::Failed { .. }))
        .map(|r| r.step_uuid.as_str())
        .collect();
    if !failed.is_empty() {
        sql.push_str(FAIL_FAST);
        let failed = json(&failed)?;
        params.extend([
            Param::Int(Some(now)),
            Param::Text(Some(failed.clone())),
            Param::Int(Some(now)),
            Param::Int(Some(now)),
            Param::Int(Some(now)),
            Param::Text(Some(failed)),
        ]);
    }
    if slots > 0 {
        sql.push_str(&SETTLE.replace("{tasks}", RESULT_TASKS));
        let steps: Vec<&str> = results.iter().map(|r| r.step_uuid.as_str()).collect();
        let steps = json(&steps)?;
        params.extend(settle_params(now, Param::Text(Some(steps))));
    }
    if let Some(req) = claim
        && let Some((claim_sql, claim_params)) = claim_statement(req, now, "'j', ")
    {
        sql.push_str(&claim_sql);
        params.extend(claim_params);
    }
    let found = bind_all(sqlx::query(AssertSqlSafe(sql)), params)
        .fetch_all(&mut *tx)
        .await?;
    rows.absorb(j, &found)?;
    let mut events = std::mem::take(&mut rows.events);
    let (tallies, jobs) = rows.into_parts();

    // Each task with an applied result moves on; its state goes into every report of it.
    let mut settled: Vec<(String, crate::state::TaskState)> = Vec::new();
    for task_uuid in applied.iter().flatten() {
        if !settled.iter().any(|(t, _)| t == task_uuid) {
            let state = settle_task(
                j,
                &tallies,
                task_uuid,
                SettleCause::StepResult,
                actor,
                None,
                now,
            )?;
            settled.push((task_uuid.clone(), state));
        }
    }
    let mut reports = Vec::with_capacity(results.len());
    for (i, (r, applied)) in results.iter().zip(applied).enumerate() {
        reports.push(match applied {
            Some(task_uuid) => FinishReport {
                step_uuid: r.step_uuid.clone(),
                task_state: settled
                    .iter()
                    .find(|(t, _)| *t == task_uuid)
                    .map(|(_, s)| *s),
                task_uuid: Some(task_uuid),
                completion: Completion::Accepted,
                events: std::mem::take(&mut events[i]),
            },
            None => reject(tx, r, now).await?,
        });
    }
    Ok((reports, jobs))
}

/// Steps a result creates: inserted unless the task has a step of that name (rows tagged `x`
/// for those inserted), numbered after the task's last step, with the task's namespace and
/// priority.
pub(super) const INSERT_STEPS: &str =
    "INSERT INTO steps (step_uuid, task_uuid, seq, name, namespace,
        callable, step_type, definition, inputs, state, max_attempts, priority, timeout_ms,
        batch_group, batch_parallelism, batch_strategy, created_at, updated_at)
     SELECT j.value->>0, t.task_uuid,
        (SELECT COALESCE(MAX(seq), 0) FROM steps s WHERE s.task_uuid = t.task_uuid) + j.key + 1,
        j.value->>2, t.namespace, j.value->>3, j.value->>4, j.value->>5, j.value->>6, 'pending',
        j.value->>7, t.priority, j.value->>8, j.value->>9, j.value->>10, j.value->>11, ?, ?
     FROM json_each(?) j JOIN tasks t ON t.task_uuid = j.value->>1
     WHERE true
     ON CONFLICT (task_uuid, name) DO NOTHING
     RETURNING 'x', step_uuid, task_uuid;\n";

/// The unfinished siblings of the fail-fast workers that failed for good at `now`, as `s`
/// (`f` is the failed worker). Parameters: `now`, the JSON array of result step ids.
macro_rules! fail_fast_siblings {
    () => {
        "FROM steps f JOIN steps s ON s.task_uuid = f.task_uuid AND s.batch_group = f.batch_group
         WHERE f.updated_at = ? AND f.step_uuid IN (SELECT value FROM json_each(?))
           AND f.state = 'error' AND f.batch_strategy = 'fail_fast' AND s.step_uuid != f.step_uuid
           AND s.state IN ('pending', 'enqueued', 'in_progress', 'waiting_for_retry')"
    };
}

/// Batch workers (SPEC §7, `failure_strategy: fail_fast`) that failed for good in this
/// transaction (their row changed at `now`) cancel the other workers of their group that have
/// not finished: the siblings are listed (rows tagged `k`, with their state before and the
/// failed worker's name, for the audit trail) and then cancelled.
const FAIL_FAST: &str = concat!(
    "SELECT 'k', s.step_uuid, s.task_uuid, s.state, f.name ",
    fail_fast_siblings!(),
    ";\nUPDATE steps SET state = 'cancelled', lease_expires_at = NULL, timeout_at = NULL,
        next_attempt_at = NULL, completed_at = ?, updated_at = ?
     WHERE step_uuid IN (SELECT s.step_uuid ",
    fail_fast_siblings!(),
    ");\n"
);

/// Edges `[task, parent name, child name]` between steps that exist, into children that have
/// not started.
pub(super) const INSERT_EDGES: &str =
    "INSERT OR IGNORE INTO step_edges (task_uuid, from_step, to_step)
     SELECT p.task_uuid, p.step_uuid, c.step_uuid FROM json_each(?) j
     JOIN steps p ON p.task_uuid = j.value->>0 AND p.name = j.value->>1
     JOIN steps c ON c.task_uuid = j.value->>0 AND c.name = j.value->>2
     WHERE c.state = 'pending';\n";

/// The events result number `index` takes its step through and the parameters of
/// [`FINISH_ONE`] for it.
fn finish_params(r: &AttemptResult, index: usize, now: Millis) -> Result<(Target, Vec<Param>)> {
    let (target, f): (Target, FinishRow) = finish_row(r, now)?;
    let params = vec![
        Param::Text(Some(f.to.as_str().to_string())),
        Param::Text(f.result),
        Param::Text(f.error),
        Param::Int(f.completed_at),
        Param::Int(f.next_attempt_at),
        Param::Int(f.started_at),
        Param::Int(Some(now)),
        Param::Text(Some(f.step_uuid)),
        Param::Int(Some(f.attempt)),
        Param::Text(f.worker.clone()),
        Param::Text(f.worker),
        Param::Int(f.timeout_guard),
        Param::Int(f.timeout_guard),
        Param::Int(f.lease_guard),
        Param::Int(f.lease_guard),
        Param::Int(Some(index as i64)),
    ];
    debug_assert_eq!(params.len(), FINISH_PARAMS);
    Ok((target, params))
}

/// The slow path of `finish`: explains why a result did not apply and records late
/// completions (engine-made expiries that lost a race are not late completions).
async fn reject(tx: &mut SqliteConnection, r: &AttemptResult, now: Millis) -> Result<FinishReport> {
    let c = current(tx, &r.step_uuid).await?;
    let (report, late) = rejected(r, c.as_ref(), now);
    if let Some(rejection) = late {
        record_rejection(tx, rejection, now).await?;
    }
    Ok(report)
}
