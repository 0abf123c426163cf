//! The REST API (SPEC §11): every endpoint under `/v1` and again under `/api/v1`, health
//! checks, the OpenAPI document, API-key authentication and per-route permissions.
//!
//! [`router`] builds the whole service around an engine handle, so tests and embedding
//! applications serve it on any listener:
//!
//! ```no_run
//! # async fn demo() -> tasker_core::Result<()> {
//! use tasker_core::api::{ApiOptions, AuthMode, router};
//! let tasker = tasker_core::Tasker::open("sqlite:tasker.db").await?;
//! let app = router(tasker, ApiOptions { auth: AuthMode::Required, ..ApiOptions::default() });
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await.unwrap();
//! axum::serve(listener, app).await.unwrap();
//! # Ok(()) }
//! ```

pub mod client;
mod dlq;
mod error;
mod events;
mod extract;
mod health;
mod metrics;
mod openapi;
mod security;
mod steps;
mod tasks;
mod templates;

use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::Response;
use axum::routing::{get, post};
use tracing::Instrument;

pub use error::{ApiError, ErrorBody, ErrorInfo};
pub use openapi::{document, openapi_json};
pub use security::AuthMode;
pub use tasks::{ExecutionStatus, StepCountsView, TaskResponse};

use crate::Tasker;

/// Largest request body accepted by default (1 MiB).
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// Whether requests need an API key.
    pub auth: AuthMode,
    /// Largest request body in bytes; larger ones get 413.
    pub body_limit: usize,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            auth: AuthMode::Required,
            body_limit: DEFAULT_BODY_LIMIT,
        }
    }
}

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) tasker: Tasker,
    pub(crate) auth: AuthMode,
}

/// The `/v1` routes (mounted twice).
fn v1(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/tasks", post(tasks::create).get(tasks::list))
        .route(
            "/tasks/{uuid}",
            get(tasks::get).delete(tasks::cancel).patch(tasks::act),
        )
        .route("/tasks/{uuid}/wait", get(tasks::wait))
        .route("/tasks/{uuid}/events", get(events::stream))
        .route("/tasks/{uuid}/transitions", get(tasks::transitions))
        .route("/tasks/{uuid}/workflow_steps", get(steps::list))
        .route(
            "/tasks/{uuid}/workflow_steps/{step}",
            get(steps::get).patch(steps::act),
        )
        .route(
            "/tasks/{uuid}/workflow_steps/{step}/audit",
            get(steps::audit),
        )
        .route("/templates", get(templates::list).post(templates::register))
        .route("/templates/validate", post(templates::validate))
        .route(
            "/templates/{namespace}/{name}/{version}",
            get(templates::get),
        )
        .route("/dlq", get(dlq::list))
        .route("/dlq/stats", get(dlq::stats))
        .route("/dlq/entry/{id}", get(dlq::get).patch(dlq::resolve))
        .route("/openapi.json", get(openapi::serve))
        .route_layer(from_fn_with_state(state.clone(), security::authorize))
}

/// The whole HTTP service around `tasker`.
pub fn router(tasker: Tasker, options: ApiOptions) -> Router {
    let state = AppState {
        tasker,
        auth: options.auth,
    };
    Router::new()
        .nest("/v1", v1(&state))
        .nest("/api/v1", v1(&state))
        .route("/health", get(health::health))
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .merge(
            Router::new()
                .route("/metrics", get(metrics::metrics))
                .route_layer(from_fn_with_state(state.clone(), security::authorize)),
        )
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .layer(DefaultBodyLimit::max(options.body_limit))
        .layer(from_fn(request_context))
        .with_state(state)
}

async fn no_route(req: Request) -> ApiError {
    ApiError::not_found(format!("no route {} {}", req.method(), req.uri().path()))
}

async fn no_method(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Gives every request an id (the caller's `X-Request-Id` when it sends a sane one), makes it
/// available to error responses, returns it in `X-Request-Id`, and runs the request in a
/// `tasker.request` span (method, route, path, request id, then status).
async fn request_context(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    // The route template (`/v1/tasks/{uuid}`), not the path, names what was called.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("", |m| m.as_str());
    let span = tracing::info_span!(
        "tasker.request",
        method = req.method().as_str(),
        route = route,
        path = req.uri().path(),
        request_id = id.as_str(),
        status = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let started = Instant::now();
    let mut response = error::REQUEST_ID
        .scope(id.clone(), next.run(req).instrument(span.clone()))
        .await;
    span.record("status", response.status().as_u16());
    if response.status().is_server_error() {
        span.record("outcome", "error");
    }
    span.in_scope(|| {
        tracing::debug!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "served"
        )
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}
