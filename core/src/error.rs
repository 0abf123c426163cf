//! The engine's one error type.

use std::fmt;

/// What went wrong, coarse enough for hosts to map to their own exception classes.
///
/// Deliberately exhaustive: every binding matches it without a wildcard arm, so a new kind
/// must be mapped everywhere before the workspace builds again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Input failed validation (bad context, schema violations, bad arguments).
    Validation,
    /// A template could not be loaded or is invalid.
    Template,
    /// Something named does not exist (task, step, template).
    NotFound,
    /// The request conflicts with existing state (duplicate task, template content clash).
    Conflict,
    /// A state machine refused the transition.
    InvalidTransition,
    /// The database failed or is unreachable.
    Store,
    /// Waiting for something took longer than allowed.
    Timeout,
    /// The engine is shutting down or was closed.
    Shutdown,
    /// A bug or an unexpected condition inside the engine.
    Internal,
}

impl ErrorKind {
    /// Whether retrying the same call later might succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Store | ErrorKind::Timeout)
    }

    /// Stable snake_case code for JSON bodies and host exceptions.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::Validation => "validation_error",
            ErrorKind::Template => "template_error",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::InvalidTransition => "invalid_transition",
            ErrorKind::Store => "store_error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Shutdown => "shutdown",
            ErrorKind::Internal => "internal_error",
        }
    }
}

/// An engine error: a kind, a human message and optional structured details.
#[derive(Debug, Clone)]
pub struct Error {
    /// The coarse kind.
    pub kind: ErrorKind,
    /// What happened, for people.
    pub message: String,
    /// Structured details (schema violations, known versions, existing task uuid...).
    pub details: Option<serde_json::Value>,
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            details: None,
        }
    }

    /// Attach structured details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// Shorthand for a validation error.
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Validation, message)
    }

    /// Shorthand for a not-found error.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// Shorthand for an internal error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::new(ErrorKind::Store, format!("database error: {e}"))
    }
}

impl From<crate::state::InvalidTransition> for Error {
    fn from(e: crate::state::InvalidTransition) -> Self {
        Error::new(ErrorKind::InvalidTransition, e.to_string())
    }
}

impl From<crate::template::TemplateErrors> for Error {
    fn from(e: crate::template::TemplateErrors) -> Self {
        let details = serde_json::Value::Array(
            e.0.iter()
                .map(|x| serde_json::Value::String(x.to_string()))
                .collect(),
        );
        Error::new(ErrorKind::Template, e.to_string()).with_details(details)
    }
}
