//! `GET /metrics`: this process's metrics and the store's queue gauges in the Prometheus text
//! format (permission `system:read` when keys are required).

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;

/// Prometheus metrics.
#[utoipa::path(
    get, path = "/metrics", tag = "health",
    responses(
        (status = 200, description = "Metrics in the Prometheus text format", content_type = "text/plain", body = String),
        (status = 401, description = "An API key is required"),
        (status = 403, description = "The key lacks `system:read`"),
    )
)]
pub(crate) async fn metrics(State(s): State<AppState>) -> Result<Response, ApiError> {
    let text = s.tasker.metrics_text().await?;
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
