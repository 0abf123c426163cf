//! `/v1/tasks`: create, list, read, wait for, cancel and act on tasks.

use std::time::Duration;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{Json, Query};
use super::security::Caller;
use crate::state::{StepState, TaskState};
use crate::store::{OperatorAction, RejectedCompletion};
use crate::task::{Task, TaskFilter, TaskRequest, TaskSummary, Transition};
use crate::{ErrorKind, Tasker};

/// A task with its steps, their counts and where execution stands.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskResponse {
    /// The task's id (the same as `uuid`).
    pub task_uuid: String,
    /// The task and its steps.
    #[serde(flatten)]
    pub task: Task,
    /// How many steps are in each group of states.
    pub step_counts: StepCountsView,
    /// Where execution stands, in one word.
    pub execution_status: ExecutionStatus,
    /// Share of steps complete or resolved, 0–100.
    pub completion_percentage: f64,
}

/// Step counts by state group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StepCountsView {
    /// Every step.
    pub total: u32,
    /// Waiting for their dependencies.
    pub pending: u32,
    /// Enqueued, running, or handed back to the orchestrator.
    pub in_flight: u32,
    /// Backing off before another attempt.
    pub waiting_for_retry: u32,
    /// Complete.
    pub complete: u32,
    /// Resolved by an operator.
    pub resolved_manually: u32,
    /// Failed for good.
    pub error: u32,
    /// Cancelled.
    pub cancelled: u32,
}

/// Where a task's execution stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionStatus {
    /// Steps are enqueued or running.
    Processing,
    /// Nothing runs; steps wait for dependencies.
    WaitingForDependencies,
    /// A failed step backs off before its next attempt.
    WaitingForRetry,
    /// A step failed for good; an operator must act.
    BlockedByFailures,
    /// Every step is complete or resolved.
    AllComplete,
    /// The task ended in `error`.
    Failed,
    /// The task was cancelled.
    Cancelled,
}

impl TaskResponse {
    /// The response view of `task`.
    pub fn new(task: Task) -> Self {
        let mut c = StepCountsView::default();
        for s in &task.steps {
            c.total += 1;
            let group = match s.state {
                StepState::Pending => &mut c.pending,
                StepState::Enqueued
                | StepState::InProgress
                | StepState::EnqueuedForOrchestration
                | StepState::EnqueuedAsErrorForOrchestration => &mut c.in_flight,
                StepState::WaitingForRetry => &mut c.waiting_for_retry,
                StepState::Complete => &mut c.complete,
                StepState::ResolvedManually => &mut c.resolved_manually,
                StepState::Error => &mut c.error,
                StepState::Cancelled => &mut c.cancelled,
            };
            *group += 1;
        }
        let execution_status = match task.status {
            TaskState::Complete | TaskState::ResolvedManually => ExecutionStatus::AllComplete,
            TaskState::Error => ExecutionStatus::Failed,
            TaskState::Cancelled => ExecutionStatus::Cancelled,
            TaskState::BlockedByFailures => ExecutionStatus::BlockedByFailures,
            TaskState::WaitingForRetry => ExecutionStatus::WaitingForRetry,
            _ if c.in_flight > 0 => ExecutionStatus::Processing,
            TaskState::WaitingForDependencies => ExecutionStatus::WaitingForDependencies,
            _ => ExecutionStatus::Processing,
        };
        TaskResponse {
            task_uuid: task.uuid.clone(),
            completion_percentage: task.completion_percentage(),
            step_counts: c,
            execution_status,
            task,
        }
    }
}

pub(crate) async fn task_response(tasker: &Tasker, uuid: &str) -> ApiResult<TaskResponse> {
    Ok(TaskResponse::new(tasker.get_task(uuid).await?))
}

/// Creates a task of a registered template (SPEC §4).
///
/// A request with an `idempotency_key` that was seen before returns the existing task with
/// 200 and `Idempotent-Replayed: true`; a request whose context duplicates a running task's
/// under the template's `strict` identity is a 409 naming that task.
#[utoipa::path(
    post, path = "/v1/tasks", tag = "tasks",
    request_body = TaskRequest,
    responses(
        (status = 201, description = "Created", body = TaskResponse),
        (status = 200, description = "Replayed (same idempotency key)", body = TaskResponse,
            headers(("Idempotent-Replayed" = String, description = "`true`"))),
        (status = 404, description = "Unknown template", body = ErrorBody),
        (status = 409, description = "Duplicate of an existing task", body = ErrorBody),
        (status = 422, description = "Invalid request or context", body = ErrorBody),
    ),
)]
pub(crate) async fn create(
    State(s): State<AppState>,
    Json(request): Json<TaskRequest>,
) -> ApiResult<Response> {
    let by_key = request.idempotency_key.is_some();
    let handle = s.tasker.create_task(request).await?;
    let task = task_response(&s.tasker, &handle.uuid).await?;
    match (handle.replayed, by_key) {
        (false, _) => Ok(Json(task).with_status(StatusCode::CREATED)),
        (true, true) => {
            let mut r = Json(task).into_response();
            r.headers_mut()
                .insert("idempotent-replayed", "true".parse().expect("valid header"));
            Ok(r)
        }
        (true, false) => Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorKind::Conflict.code(),
            format!(
                "a task of this template with the same context exists: {} ({})",
                handle.uuid, task.task.status
            ),
        )
        .with_details(json!({"task_uuid": handle.uuid, "status": task.task.status}))),
    }
}

/// Filters and page of `GET /v1/tasks`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only this namespace.
    namespace: Option<String>,
    /// Only this template name.
    name: Option<String>,
    /// Only this state.
    #[param(value_type = Option<String>)]
    status: Option<TaskState>,
    /// Only this initiator.
    initiator: Option<String>,
    /// Only this source system.
    source_system: Option<String>,
    /// Created at or after (ms since the epoch).
    created_after: Option<i64>,
    /// Created before (ms since the epoch).
    created_before: Option<i64>,
    /// Page size, 1–1000 (default 50).
    limit: Option<u32>,
    /// Tasks to skip.
    offset: Option<u32>,
    /// Page number from 1 (with `per_page`), instead of `offset`.
    page: Option<u32>,
    /// Page size for `page` (default 50).
    per_page: Option<u32>,
}

/// A page of tasks.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct TaskList {
    /// Tasks, newest first.
    pub(crate) tasks: Vec<TaskSummary>,
    /// Where this page is.
    pub(crate) pagination: Pagination,
}

/// Where a page is in the whole list.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Pagination {
    /// Page size.
    pub(crate) limit: u32,
    /// Items skipped before this page.
    pub(crate) offset: u32,
    /// Items on this page.
    pub(crate) count: usize,
    /// Whether more items follow.
    pub(crate) has_more: bool,
    /// The `offset` of the next page, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) next_offset: Option<u32>,
}

/// Resolves `limit`/`offset` or `page`/`per_page` into `(limit, offset)`.
pub(crate) fn page(
    limit: Option<u32>,
    offset: Option<u32>,
    page: Option<u32>,
    per_page: Option<u32>,
) -> ApiResult<(u32, u32)> {
    let check = |field: &str, v: u32| {
        if (1..=1000).contains(&v) {
            Ok(v)
        } else {
            Err(ApiError::invalid_field(
                field,
                format!("query parameter `{field}`: {v} is outside 1..=1000"),
            ))
        }
    };
    match page {
        Some(0) => Err(ApiError::invalid_field(
            "page",
            "query parameter `page`: pages count from 1",
        )),
        Some(p) => {
            let size = check("per_page", per_page.or(limit).unwrap_or(50))?;
            Ok((size, (p - 1).saturating_mul(size)))
        }
        None => Ok((check("limit", limit.unwrap_or(50))?, offset.unwrap_or(0))),
    }
}

/// Runs a listing for a page of `limit` items, asking for one more to learn whether more
/// follow.
pub(crate) async fn paged<T, F, Fut>(
    limit: u32,
    offset: u32,
    fetch: F,
) -> crate::Result<(Vec<T>, Pagination)>
where
    F: Fn(u32, u32) -> Fut,
    Fut: std::future::Future<Output = crate::Result<Vec<T>>>,
{
    let mut items = fetch((limit + 1).min(1000), offset).await?;
    let has_more = if items.len() > limit as usize {
        items.truncate(limit as usize);
        true
    } else if limit == 1000 && items.len() == 1000 {
        !fetch(1, offset.saturating_add(limit)).await?.is_empty()
    } else {
        false
    };
    let pagination = Pagination {
        limit,
        offset,
        count: items.len(),
        has_more,
        next_offset: has_more.then(|| offset.saturating_add(limit)),
    };
    Ok((items, pagination))
}

/// Lists tasks, newest first.
#[utoipa::path(
    get, path = "/v1/tasks", tag = "tasks", params(ListQuery),
    responses(
        (status = 200, description = "A page of tasks", body = TaskList),
        (status = 422, description = "Bad query parameter", body = ErrorBody),
    ),
)]
pub(crate) async fn list(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<TaskList>> {
    let (limit, offset) = page(q.limit, q.offset, q.page, q.per_page)?;
    let filter = TaskFilter {
        namespace: q.namespace,
        name: q.name,
        status: q.status,
        initiator: q.initiator,
        source_system: q.source_system,
        created_after: q.created_after,
        created_before: q.created_before,
        ..TaskFilter::default()
    };
    let (tasks, pagination) = paged(limit, offset, |limit, offset| {
        let f = TaskFilter {
            limit: Some(limit),
            offset: Some(offset),
            ..filter.clone()
        };
        let tasker = s.tasker.clone();
        async move { tasker.list_tasks(&f).await }
    })
    .await?;
    Ok(Json(TaskList { tasks, pagination }))
}

/// A task with its steps, step counts, execution status and completion percentage.
#[utoipa::path(
    get, path = "/v1/tasks/{uuid}", tag = "tasks",
    params(("uuid" = String, Path, description = "The task's id")),
    responses(
        (status = 200, description = "The task", body = TaskResponse),
        (status = 404, description = "Unknown task", body = ErrorBody),
    ),
)]
pub(crate) async fn get(
    State(s): State<AppState>,
    Path(uuid): Path<String>,
) -> ApiResult<Json<TaskResponse>> {
    Ok(Json(task_response(&s.tasker, &uuid).await?))
}

/// Why an operator acts (`DELETE` takes it from the query string).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ReasonQuery {
    /// Why (recorded on the transitions).
    reason: Option<String>,
    /// Who, recorded with the API key's name.
    by: Option<String>,
}

/// The actor recorded for an operator action: who the request says, and the key that sent it.
pub(crate) fn actor(caller: &Caller, by: Option<&str>) -> String {
    match by.map(str::trim).filter(|b| !b.is_empty()) {
        Some(by) => format!("{by} ({})", caller.actor),
        None => caller.actor.clone(),
    }
}

pub(crate) const DEFAULT_REASON: &str = "operator action via the REST API";

/// Cancels a task and its unfinished steps.
#[utoipa::path(
    delete, path = "/v1/tasks/{uuid}", tag = "tasks",
    params(("uuid" = String, Path, description = "The task's id"), ReasonQuery),
    responses(
        (status = 200, description = "The cancelled task", body = TaskResponse),
        (status = 404, description = "Unknown task", body = ErrorBody),
        (status = 409, description = "The task has ended already", body = ErrorBody),
    ),
)]
pub(crate) async fn cancel(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(uuid): Path<String>,
    Query(q): Query<ReasonQuery>,
) -> ApiResult<Json<TaskResponse>> {
    let reason = q.reason.as_deref().unwrap_or(DEFAULT_REASON);
    s.tasker
        .operator(
            &uuid,
            OperatorAction::Cancel,
            &actor(&caller, q.by.as_deref()),
            reason,
        )
        .await?;
    Ok(Json(task_response(&s.tasker, &uuid).await?))
}

/// What an operator does to a blocked task.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum TaskActionType {
    /// Move it to `error`.
    GiveUp,
    /// Close it as `resolved_manually`.
    ResolveManually,
}

/// Body of `PATCH /v1/tasks/{uuid}`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TaskAction {
    /// The action.
    pub(crate) action_type: TaskActionType,
    /// Why (recorded on the transitions).
    #[serde(default)]
    pub(crate) reason: Option<String>,
    /// Who, recorded with the API key's name.
    #[serde(default)]
    pub(crate) by: Option<String>,
}

/// Gives up on a blocked task (⇒ `error`) or resolves it manually.
#[utoipa::path(
    patch, path = "/v1/tasks/{uuid}", tag = "tasks",
    params(("uuid" = String, Path, description = "The task's id")),
    request_body = TaskAction,
    responses(
        (status = 200, description = "The task after the action", body = TaskResponse),
        (status = 404, description = "Unknown task", body = ErrorBody),
        (status = 409, description = "Not allowed in the task's state", body = ErrorBody),
        (status = 422, description = "Bad body", body = ErrorBody),
    ),
)]
pub(crate) async fn act(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(uuid): Path<String>,
    Json(body): Json<TaskAction>,
) -> ApiResult<Json<TaskResponse>> {
    let action = match body.action_type {
        TaskActionType::GiveUp => OperatorAction::GiveUp,
        TaskActionType::ResolveManually => OperatorAction::ResolveManually,
    };
    let reason = body.reason.as_deref().unwrap_or(DEFAULT_REASON);
    s.tasker
        .operator(&uuid, action, &actor(&caller, body.by.as_deref()), reason)
        .await?;
    Ok(Json(task_response(&s.tasker, &uuid).await?))
}

/// How long `wait` may take.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct WaitQuery {
    /// Give up after this many milliseconds (default 30000, at most 600000).
    timeout_ms: Option<u64>,
}

/// Longest wait one request may ask for.
pub(crate) const MAX_WAIT_MS: u64 = 600_000;

/// Waits until the task is terminal or `blocked_by_failures` (it needs an operator then).
/// On timeout: 408, with the task as it is under `task`.
#[utoipa::path(
    get, path = "/v1/tasks/{uuid}/wait", tag = "tasks",
    params(("uuid" = String, Path, description = "The task's id"), WaitQuery),
    responses(
        (status = 200, description = "The task, terminal or blocked", body = TaskResponse),
        (status = 404, description = "Unknown task", body = ErrorBody),
        (status = 408, description = "Still running: `error` plus the current `task`", body = ErrorBody),
        (status = 422, description = "Bad timeout", body = ErrorBody),
    ),
)]
pub(crate) async fn wait(
    State(s): State<AppState>,
    Path(uuid): Path<String>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<Json<TaskResponse>> {
    let ms = q.timeout_ms.unwrap_or(30_000);
    if ms > MAX_WAIT_MS {
        return Err(ApiError::invalid_field(
            "timeout_ms",
            format!("query parameter `timeout_ms`: {ms} is over the limit of {MAX_WAIT_MS}"),
        ));
    }
    match s.tasker.wait(&uuid, Some(Duration::from_millis(ms))).await {
        Ok(task) => Ok(Json(TaskResponse::new(task))),
        Err(e) if e.kind == ErrorKind::Timeout => {
            let task = task_response(&s.tasker, &uuid).await?;
            let mut err = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                ErrorKind::Timeout.code(),
                format!("task {uuid} is still {} after {ms} ms", task.task.status),
            )
            .with_details(json!({"task_uuid": uuid, "status": task.task.status}));
            err.extra = Some(Box::new((
                "task",
                serde_json::to_value(&task).map_err(|e| crate::Error::internal(e.to_string()))?,
            )));
            Err(err)
        }
        Err(e) => Err(e.into()),
    }
}

/// What `transitions` includes.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct TransitionsQuery {
    /// Also the step transitions and rejected late completions (default false).
    include_steps: Option<bool>,
}

/// A task's transitions.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct TransitionList {
    /// The task.
    pub(crate) task_uuid: String,
    /// Task transitions, oldest first.
    pub(crate) transitions: Vec<Transition>,
    /// Step transitions, oldest first (with `include_steps=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) step_transitions: Option<Vec<Transition>>,
    /// Late completions that were refused (with `include_steps=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rejected_completions: Option<Vec<RejectedCompletion>>,
}

/// Every state transition of a task, oldest first.
#[utoipa::path(
    get, path = "/v1/tasks/{uuid}/transitions", tag = "tasks",
    params(("uuid" = String, Path, description = "The task's id"), TransitionsQuery),
    responses(
        (status = 200, description = "The transitions", body = TransitionList),
        (status = 404, description = "Unknown task", body = ErrorBody),
    ),
)]
pub(crate) async fn transitions(
    State(s): State<AppState>,
    Path(uuid): Path<String>,
    Query(q): Query<TransitionsQuery>,
) -> ApiResult<Json<TransitionList>> {
    // An unknown task is a 404, not an empty list.
    s.tasker.store().task_state(&uuid).await?;
    let transitions = s.tasker.task_transitions(&uuid).await?;
    let (step_transitions, rejected_completions) = if q.include_steps.unwrap_or(false) {
        (
            Some(s.tasker.step_transitions(&uuid, None).await?),
            Some(s.tasker.store().rejected_completions(&uuid).await?),
        )
    } else {
        (None, None)
    };
    Ok(Json(TransitionList {
        task_uuid: uuid,
        transitions,
        step_transitions,
        rejected_completions,
    }))
}
