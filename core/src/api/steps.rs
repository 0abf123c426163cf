//! `/v1/tasks/{uuid}/workflow_steps`: a task's steps, operator fixes and step audit trails.

use axum::Extension;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::Json;
use super::security::Caller;
use super::tasks::{DEFAULT_REASON, actor};
use crate::state::{StepState, TaskState};
use crate::store::{OperatorAction, RejectedCompletion};
use crate::task::{StepView, Task, Transition};

/// The step of `task` named or identified by `step`.
fn find_step(task: &Task, step: &str) -> ApiResult<StepView> {
    task.steps
        .iter()
        .find(|s| s.uuid == step || s.name == step)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("task {} has no step {step:?}", task.uuid)))
}

/// Every step of a task, in creation order.
#[utoipa::path(
    get, path = "/v1/tasks/{uuid}/workflow_steps", tag = "steps",
    params(("uuid" = String, Path, description = "The task's id")),
    responses(
        (status = 200, description = "The steps", body = Vec<StepView>),
        (status = 404, description = "Unknown task", body = ErrorBody),
    ),
)]
pub(crate) async fn list(
    State(s): State<AppState>,
    Path(uuid): Path<String>,
) -> ApiResult<Json<Vec<StepView>>> {
    Ok(Json(s.tasker.get_task(&uuid).await?.steps))
}

/// One step, by uuid or by name.
#[utoipa::path(
    get, path = "/v1/tasks/{uuid}/workflow_steps/{step}", tag = "steps",
    params(
        ("uuid" = String, Path, description = "The task's id"),
        ("step" = String, Path, description = "The step's uuid or name"),
    ),
    responses(
        (status = 200, description = "The step", body = StepView),
        (status = 404, description = "Unknown task or step", body = ErrorBody),
    ),
)]
pub(crate) async fn get(
    State(s): State<AppState>,
    Path((uuid, step)): Path<(String, String)>,
) -> ApiResult<Json<StepView>> {
    let task = s.tasker.get_task(&uuid).await?;
    Ok(Json(find_step(&task, &step)?))
}

/// An operator fix on a step (SPEC §5.9).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(tag = "action_type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum StepAction {
    /// A failed step goes back to `pending` with its attempts reset.
    ResetForRetry {
        /// Why.
        #[serde(default)]
        reason: Option<String>,
        /// Who, recorded with the API key's name.
        #[serde(default)]
        by: Option<String>,
    },
    /// The step counts as done without a result; dependents may run.
    ResolveManually {
        /// Why.
        #[serde(default)]
        reason: Option<String>,
        /// Who, recorded with the API key's name.
        #[serde(default)]
        by: Option<String>,
    },
    /// The step completes with `result`, which dependents see.
    CompleteManually {
        /// The step's result: a JSON object.
        result: Value,
        /// Why.
        #[serde(default)]
        reason: Option<String>,
        /// Who, recorded with the API key's name.
        #[serde(default)]
        by: Option<String>,
    },
}

/// The step and its task after an operator fix.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct StepActionResponse {
    /// The task.
    pub(crate) task_uuid: String,
    /// The task's state after the fix (it is re-evaluated at once).
    pub(crate) task_status: TaskState,
    /// The step after the fix.
    pub(crate) step: StepView,
}

/// Resets, resolves or completes a step; the task is re-evaluated at once.
#[utoipa::path(
    patch, path = "/v1/tasks/{uuid}/workflow_steps/{step}", tag = "steps",
    params(
        ("uuid" = String, Path, description = "The task's id"),
        ("step" = String, Path, description = "The step's uuid or name"),
    ),
    request_body = StepAction,
    responses(
        (status = 200, description = "The step after the fix", body = StepActionResponse),
        (status = 404, description = "Unknown task or step", body = ErrorBody),
        (status = 409, description = "Not allowed in the step's state", body = ErrorBody),
        (status = 422, description = "Bad body", body = ErrorBody),
    ),
)]
pub(crate) async fn act(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((uuid, step)): Path<(String, String)>,
    Json(body): Json<StepAction>,
) -> ApiResult<Json<StepActionResponse>> {
    // The step must exist in this task before anything is recorded.
    let before = s.tasker.get_task(&uuid).await?;
    let target = find_step(&before, &step)?;
    let (action, reason, by) = match body {
        StepAction::ResetForRetry { reason, by } => (
            OperatorAction::ResetStep {
                step: target.uuid.clone(),
            },
            reason,
            by,
        ),
        StepAction::ResolveManually { reason, by } => (
            OperatorAction::ResolveStep {
                step: target.uuid.clone(),
            },
            reason,
            by,
        ),
        StepAction::CompleteManually { result, reason, by } => {
            if !result.is_object() {
                return Err(ApiError::invalid_field(
                    "result",
                    format!(
                        "body field `result`: a step result must be a JSON object, got {}",
                        crate::orchestrator::json_kind(&result)
                    ),
                ));
            }
            (
                OperatorAction::CompleteStep {
                    step: target.uuid.clone(),
                    result,
                },
                reason,
                by,
            )
        }
    };
    let reason = reason.as_deref().unwrap_or(DEFAULT_REASON);
    let task_status = s
        .tasker
        .operator(&uuid, action, &actor(&caller, by.as_deref()), reason)
        .await?;
    let after = s.tasker.get_task(&uuid).await?;
    Ok(Json(StepActionResponse {
        task_uuid: uuid,
        task_status,
        step: find_step(&after, &target.uuid)?,
    }))
}

/// One audit row: a step transition, with how long the attempt it ends ran.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct AuditEntry {
    /// The transition (its `actor` is the worker or operator, `attempt` the attempt).
    #[serde(flatten)]
    pub(crate) transition: Transition,
    /// For a transition out of `in_progress`: ms since the attempt entered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) duration_ms: Option<i64>,
}

/// A step's audit trail.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct StepAudit {
    /// The task.
    pub(crate) task_uuid: String,
    /// The step's id.
    pub(crate) step_uuid: String,
    /// The step's name.
    pub(crate) step_name: String,
    /// Every transition, oldest first.
    pub(crate) transitions: Vec<AuditEntry>,
    /// Late completions of this step that were refused (fencing).
    pub(crate) rejected_completions: Vec<RejectedCompletion>,
}

/// Adds attempt durations: a transition leaving `in_progress` ends the run that the latest
/// transition into `in_progress` began.
fn with_durations(transitions: Vec<Transition>) -> Vec<AuditEntry> {
    let in_progress = StepState::InProgress.as_str();
    let mut started: Option<i64> = None;
    transitions
        .into_iter()
        .map(|t| {
            let duration_ms = match (t.from_state.as_deref(), started) {
                (Some(from), Some(at)) if from == in_progress && t.to_state != in_progress => {
                    Some(t.created_at - at)
                }
                _ => None,
            };
            if t.to_state == in_progress && t.from_state.as_deref() != Some(in_progress) {
                started = Some(t.created_at);
            } else if t.to_state != in_progress {
                started = None;
            }
            AuditEntry {
                transition: t,
                duration_ms,
            }
        })
        .collect()
}

/// A step's transitions (with worker, attempt and duration) and its refused late completions.
#[utoipa::path(
    get, path = "/v1/tasks/{uuid}/workflow_steps/{step}/audit", tag = "steps",
    params(
        ("uuid" = String, Path, description = "The task's id"),
        ("step" = String, Path, description = "The step's uuid or name"),
    ),
    responses(
        (status = 200, description = "The audit trail", body = StepAudit),
        (status = 404, description = "Unknown task or step", body = ErrorBody),
    ),
)]
pub(crate) async fn audit(
    State(s): State<AppState>,
    Path((uuid, step)): Path<(String, String)>,
) -> ApiResult<Json<StepAudit>> {
    let task = s.tasker.get_task(&uuid).await?;
    let target = find_step(&task, &step)?;
    let transitions = s.tasker.step_transitions(&uuid, Some(&target.uuid)).await?;
    let rejected_completions = s
        .tasker
        .store()
        .rejected_completions(&uuid)
        .await?
        .into_iter()
        .filter(|r| r.step_uuid == target.uuid)
        .collect();
    Ok(Json(StepAudit {
        task_uuid: uuid,
        step_uuid: target.uuid,
        step_name: target.name,
        transitions: with_durations(transitions),
        rejected_completions,
    }))
}
