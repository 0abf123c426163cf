//! The one place engine errors become HTTP responses: `{"error": {"code", "message",
//! "details"?}}` with the status their kind calls for. Server-side failures are logged in
//! full and answered with a generic message and the request id, never with database text.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{Error, ErrorKind};

tokio::task_local! {
    /// The id of the request being served (set by the request middleware).
    pub(crate) static REQUEST_ID: String;
}

/// The current request's id, when called while serving one.
pub(crate) fn request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// Stable snake_case code.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// Structured details (the field at fault, schema violations, ...).
    pub details: Option<Value>,
    /// Extra top-level members of the body (the current task of a timed-out wait).
    pub extra: Option<Box<(&'static str, Value)>>,
}

/// The body of every error response.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorInfo,
}

/// What an error response says.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorInfo {
    /// Stable snake_case code (`validation_error`, `not_found`, `unauthorized`, ...).
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// Structured details: `field` for a bad body or query member, `violations`, the
    /// `request_id` of a server-side failure, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            details: None,
            extra: None,
        }
    }

    /// Attaches details.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// 400 for a request the server cannot read (malformed JSON, bad query string).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 422 naming the member of the body or query string at fault.
    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_error",
            message,
        )
        .with_details(json!({ "field": field }))
    }
}

/// The status for each engine error kind. Exhaustive on purpose: a new kind must be mapped.
fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::Validation | ErrorKind::Template => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict | ErrorKind::InvalidTransition => StatusCode::CONFLICT,
        ErrorKind::Timeout => StatusCode::REQUEST_TIMEOUT,
        ErrorKind::Store | ErrorKind::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = status_of(e.kind);
        match e.kind {
            // The message of these may carry SQL, file paths or panics: log, do not send.
            ErrorKind::Store | ErrorKind::Internal => {
                let request_id = request_id().unwrap_or_default();
                tracing::error!(request_id = %request_id, kind = e.kind.code(), "{}", e.message);
                let message = if e.kind == ErrorKind::Store {
                    "the database is unavailable; try again later"
                } else {
                    "internal server error"
                };
                ApiError::new(status, e.kind.code(), message)
                    .with_details(json!({ "request_id": request_id }))
            }
            _ => ApiError {
                status,
                code: e.kind.code(),
                message: e.message,
                details: e.details,
                extra: None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": { "code": self.code, "message": self.message } });
        if let Some(d) = self.details {
            body["error"]["details"] = d;
        }
        if let Some(extra) = self.extra {
            let (k, v) = *extra;
            body[k] = v;
        }
        let mut response = super::extract::Json(body).with_status(self.status);
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Handler result.
pub type ApiResult<T> = std::result::Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_side_errors_hide_their_text() {
        let e: ApiError =
            Error::new(ErrorKind::Store, "database error: no such table: tasks").into();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!e.message.contains("no such table"));
        let e: ApiError = Error::internal("poisoned lock at engine.rs:12").into();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.message, "internal server error");
        let e: ApiError = Error::not_found("no task x").into();
        assert_eq!(
            (e.status, e.message.as_str()),
            (StatusCode::NOT_FOUND, "no task x")
        );
    }
}
