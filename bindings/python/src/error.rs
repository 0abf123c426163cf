//! The one mapping from core errors to the exceptions of `tasker_core.errors`. The classes are
//! declared in Python; this module names them.

use pyo3::prelude::*;
use tasker_core::{Error, ErrorKind};

/// The `tasker_core.errors` class for a core error kind. Exhaustive on purpose: a new kind
/// must be mapped here before the workspace builds again.
fn class_for(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Validation => "ValidationError",
        ErrorKind::Template => "TemplateError",
        ErrorKind::NotFound => "NotFoundError",
        ErrorKind::Conflict => "ConflictError",
        ErrorKind::InvalidTransition => "InvalidTransitionError",
        ErrorKind::Store => "StoreError",
        ErrorKind::Timeout => "TaskerTimeoutError",
        ErrorKind::Shutdown => "ShutdownError",
        ErrorKind::Internal => "InternalError",
    }
}

/// A core error as the matching Python exception, with `code` and `details`.
pub(crate) fn to_py(e: Error) -> PyErr {
    raise(
        class_for(e.kind),
        e.kind.code(),
        &e.message,
        e.details.as_ref(),
    )
}

/// An exception of class `class` of `tasker_core.errors`, built as
/// `class(message, code=code, details=details)`.
pub(crate) fn raise(
    class: &str,
    code: &str,
    message: &str,
    details: Option<&serde_json::Value>,
) -> PyErr {
    Python::attach(|py| {
        let built = (|| -> PyResult<PyErr> {
            let cls = py.import("tasker_core.errors")?.getattr(class)?;
            let kwargs = pyo3::types::PyDict::new(py);
            kwargs.set_item("code", code)?;
            if let Some(d) = details {
                kwargs.set_item("details", crate::convert::to_py(py, d)?)?;
            }
            Ok(PyErr::from_value(cls.call((message,), Some(&kwargs))?))
        })();
        // Only a broken installation gets here (the errors module did not import).
        built.unwrap_or_else(|e| e)
    })
}

/// A call that got bad arguments (a bug in the Python package or a caller's mistake).
pub(crate) fn invalid_argument(message: impl Into<String>) -> PyErr {
    pyo3::exceptions::PyValueError::new_err(message.into())
}

pub(crate) trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for tasker_core::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
