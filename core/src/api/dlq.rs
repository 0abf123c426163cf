//! `/v1/dlq`: the dead-letter record (SPEC §9).

use axum::Extension;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiResult, ErrorBody};
use super::extract::{Json, Query};
use super::security::Caller;
use super::tasks::{Pagination, actor, page, paged};
use crate::dlq::{DlqEntry, DlqFilter, DlqReason, DlqResolution, DlqStats};

/// Filters of `GET /v1/dlq`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only this resolution status.
    #[param(value_type = Option<String>)]
    status: Option<DlqResolution>,
    /// Only this namespace.
    namespace: Option<String>,
    /// Only this task's entries.
    task_uuid: Option<String>,
    /// Only this reason.
    #[param(value_type = Option<String>)]
    reason: Option<DlqReason>,
    /// Page size, 1–1000 (default 50).
    limit: Option<u32>,
    /// Entries to skip.
    offset: Option<u32>,
}

/// A page of DLQ entries.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct DlqList {
    /// Entries, newest first, without snapshots.
    pub(crate) entries: Vec<DlqEntry>,
    /// Where this page is.
    pub(crate) pagination: Pagination,
}

/// Lists DLQ entries, newest first.
#[utoipa::path(
    get, path = "/v1/dlq", tag = "dlq", params(ListQuery),
    responses(
        (status = 200, description = "A page of entries", body = DlqList),
        (status = 422, description = "Bad query parameter", body = ErrorBody),
    ),
)]
pub(crate) async fn list(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<DlqList>> {
    let (limit, offset) = page(q.limit, q.offset, None, None)?;
    let filter = DlqFilter {
        status: q.status,
        namespace: q.namespace,
        task_uuid: q.task_uuid,
        reason: q.reason,
        ..DlqFilter::default()
    };
    let (entries, pagination) = paged(limit, offset, |limit, offset| {
        let f = DlqFilter {
            limit: Some(limit),
            offset: Some(offset),
            ..filter.clone()
        };
        let tasker = s.tasker.clone();
        async move { tasker.dlq_list(&f).await }
    })
    .await?;
    Ok(Json(DlqList {
        entries,
        pagination,
    }))
}

/// One DLQ entry with its snapshot.
#[utoipa::path(
    get, path = "/v1/dlq/entry/{id}", tag = "dlq",
    params(("id" = String, Path, description = "The entry's id")),
    responses(
        (status = 200, description = "The entry", body = DlqEntry),
        (status = 404, description = "Unknown entry", body = ErrorBody),
    ),
)]
pub(crate) async fn get(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<DlqEntry>> {
    Ok(Json(s.tasker.dlq_get(&id).await?))
}

/// Counts of DLQ entries by reason, status, original state and namespace.
#[utoipa::path(
    get, path = "/v1/dlq/stats", tag = "dlq",
    responses((status = 200, description = "The counts", body = DlqStats)),
)]
pub(crate) async fn stats(State(s): State<AppState>) -> ApiResult<Json<DlqStats>> {
    Ok(Json(s.tasker.dlq_stats().await?))
}

/// Body of `PATCH /v1/dlq/entry/{id}`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DlqUpdate {
    /// The investigation's outcome (`pending` re-opens the entry).
    pub(crate) resolution_status: DlqResolution,
    /// Notes (replace earlier notes when given).
    #[serde(default)]
    pub(crate) resolution_notes: Option<String>,
    /// Who, recorded with the API key's name.
    #[serde(default)]
    pub(crate) resolved_by: Option<String>,
}

/// Records what an operator concluded about an entry; the task is not changed.
#[utoipa::path(
    patch, path = "/v1/dlq/entry/{id}", tag = "dlq",
    params(("id" = String, Path, description = "The entry's id")),
    request_body = DlqUpdate,
    responses(
        (status = 200, description = "The updated entry", body = DlqEntry),
        (status = 404, description = "Unknown entry", body = ErrorBody),
        (status = 422, description = "Bad body", body = ErrorBody),
    ),
)]
pub(crate) async fn resolve(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Json(body): Json<DlqUpdate>,
) -> ApiResult<Json<DlqEntry>> {
    let by = actor(&caller, body.resolved_by.as_deref());
    Ok(Json(
        s.tasker
            .dlq_resolve(
                &id,
                body.resolution_status,
                body.resolution_notes.as_deref(),
                &by,
            )
            .await?,
    ))
}
