//! Health checks: open to every caller, so load balancers and orchestrators need no key.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::AppState;
use super::extract::Json;
use crate::task::TaskFilter;

/// A health answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Health {
    /// `healthy`, `alive`, `ready` or `not_ready`.
    pub(crate) status: String,
    /// Individual checks (`database`: `ok` or `unavailable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) checks: Option<serde_json::Value>,
}

/// Overall health: the database answers.
#[utoipa::path(
    get, path = "/health", tag = "health",
    responses(
        (status = 200, description = "Healthy", body = Health),
        (status = 503, description = "The database does not answer", body = Health),
    )
)]
pub(crate) async fn health(State(s): State<AppState>) -> Response {
    check(&s, "healthy", "unhealthy").await
}

/// Liveness: the process serves requests.
#[utoipa::path(
    get, path = "/health/live", tag = "health",
    responses((status = 200, description = "Alive", body = Health))
)]
pub(crate) async fn live() -> Json<Health> {
    Json(Health {
        status: "alive".into(),
        checks: None,
    })
}

/// Readiness: the database answers a query.
#[utoipa::path(
    get, path = "/health/ready", tag = "health",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "The database does not answer", body = Health),
    )
)]
pub(crate) async fn ready(State(s): State<AppState>) -> Response {
    check(&s, "ready", "not_ready").await
}

async fn check(s: &AppState, good: &str, bad: &str) -> Response {
    let probe = TaskFilter {
        limit: Some(1),
        ..TaskFilter::default()
    };
    match s.tasker.list_tasks(&probe).await {
        Ok(_) => Json(Health {
            status: good.into(),
            checks: Some(json!({"database": "ok"})),
        })
        .with_status(StatusCode::OK),
        Err(e) => {
            tracing::warn!("health check: the database does not answer: {}", e.message);
            Json(Health {
                status: bad.into(),
                checks: Some(json!({"database": "unavailable"})),
            })
            .with_status(StatusCode::SERVICE_UNAVAILABLE)
        }
    }
}
