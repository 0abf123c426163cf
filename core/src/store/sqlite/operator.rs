//! Operator actions in SQLite (SPEC §5.9): each one transaction that checks the state
//! machines first, so a refused action changes nothing.

use sqlx::{Row, SqliteConnection};

use super::finish::{INSERT_EDGES, INSERT_STEPS, expansion_rows};
use super::journal::{Flush, Journal};
use super::write::{json, move_step, parse_state, settle, task_state};
use crate::clock::Millis;
use crate::orchestrator::SettleCause;
use crate::state::{StepEvent, StepState, TaskEvent, TaskState, task_transition};
use crate::store::OperatorAction;
use crate::store::apply::operator_expansion;
use crate::{Error, ErrorKind, Result};

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
    let row =
        row.ok_or_else(|| Error::not_found(format!("task {task_uuid} has no step {step:?}")))?;
    Ok((
        row.try_get("step_uuid")?,
        parse_state(&row.try_get::<String, _>("state")?)?,
    ))
}

pub(super) async fn operator_action(
    tx: &mut SqliteConnection,
    task_uuid: &str,
    action: &OperatorAction,
    actor: &str,
    reason: &str,
    now: Millis,
) -> Result<TaskState> {
    let mut j = Journal::default();
    let state = act(tx, &mut j, task_uuid, action, actor, reason, now).await?;
    j.flush(tx).await?;
    Ok(state)
}

async fn act(
    tx: &mut SqliteConnection,
    j: &mut Journal,
    task_uuid: &str,
    action: &OperatorAction,
    actor: &str,
    reason: &str,
    now: Millis,
) -> Result<TaskState> {
    let state = task_state(tx, task_uuid).await?;
    let given = reason;
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
                move_step(
                    tx,
                    j,
                    &step,
                    task_uuid,
                    s,
                    &[StepEvent::Cancel],
                    None,
                    actor,
                    reason,
                    now,
                )
                .await?;
                sqlx::query("UPDATE steps SET lease_expires_at = NULL, timeout_at = NULL, completed_at = $1 WHERE step_uuid = $2")
                    .bind(now)
                    .bind(&step)
                    .execute(&mut *tx)
                    .await?;
            }
            let cancelled =
                j.task_moves(task_uuid, state, &[TaskEvent::Cancel], actor, reason, now)?;
            // Cancelling a parent cancels the child workflows its steps started (SPEC §8),
            // in this same transaction, and theirs in turn.
            let children: Vec<String> = sqlx::query_scalar(
                "SELECT task_uuid FROM tasks WHERE parent_task_uuid = $1
                 AND state NOT IN ('complete', 'error', 'cancelled', 'resolved_manually')",
            )
            .bind(task_uuid)
            .fetch_all(&mut *tx)
            .await?;
            let why = format!("parent task {task_uuid} was cancelled: {given}");
            for child in children {
                Box::pin(act(tx, j, &child, action, actor, &why, now)).await?;
            }
            Ok(cancelled)
        }
        OperatorAction::GiveUp => {
            j.task_moves(task_uuid, state, &[TaskEvent::GiveUp], actor, reason, now)
        }
        OperatorAction::ResolveManually => j.task_moves(
            task_uuid,
            state,
            &[TaskEvent::ManualResolution],
            actor,
            reason,
            now,
        ),
        OperatorAction::ResetStep { step }
        | OperatorAction::ResolveStep { step }
        | OperatorAction::CompleteStep { step, .. } => {
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
            move_step(
                tx,
                j,
                &step_uuid,
                task_uuid,
                s,
                &[event],
                None,
                actor,
                reason,
                now,
            )
            .await?;
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
                    expand_completed(tx, j, task_uuid, &step_uuid, result, actor, now).await?;
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
            settle(
                tx,
                j,
                task_uuid,
                SettleCause::OperatorFix,
                actor,
                reason,
                now,
            )
            .await
        }
    }
}

/// A decision or analyzer completed by an operator creates the steps its result asks for (see
/// [`operator_expansion`]).
async fn expand_completed(
    tx: &mut SqliteConnection,
    j: &mut Journal,
    task_uuid: &str,
    step_uuid: &str,
    result: &serde_json::Value,
    actor: &str,
    now: Millis,
) -> Result<()> {
    let row = sqlx::query(
        "SELECT s.name, s.step_type, ts.definition AS template FROM steps s
         JOIN tasks t ON t.task_uuid = s.task_uuid
         JOIN template_snapshots ts ON ts.content_hash = t.template_hash
         WHERE s.step_uuid = $1 AND s.step_type IN ('decision', 'batchable')",
    )
    .bind(step_uuid)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else { return Ok(()) };
    let x = operator_expansion(
        &row.try_get::<String, _>("name")?,
        &row.try_get::<String, _>("step_type")?,
        &row.try_get::<String, _>("template")?,
        result,
    )?;
    if x.steps.is_empty() {
        return Ok(());
    }
    let (mut steps, mut edges) = (Vec::new(), Vec::new());
    expansion_rows(task_uuid, &x, &mut steps, &mut edges)?;
    let created = sqlx::query(INSERT_STEPS)
        .bind(now)
        .bind(now)
        .bind(json(&steps)?)
        .fetch_all(&mut *tx)
        .await?;
    for row in created {
        let step: String = row.try_get(1)?;
        j.step_created(&step, task_uuid, actor, now);
    }
    sqlx::query(INSERT_EDGES)
        .bind(json(&edges)?)
        .execute(&mut *tx)
        .await?;
    Ok(())
}
