//! Every conversion between Rust values and Python: JSON text both ways. Python parses and
//! serialises with its own `json` module, so what a handler returns is checked there and a
//! value that is not JSON never reaches the engine.

use std::time::Duration;

use pyo3::prelude::*;
use serde::Serialize;
use serde_json::Value;

/// A value as JSON text.
pub(crate) fn to_json<T: Serialize>(v: &T) -> PyResult<String> {
    serde_json::to_string(v)
        .map_err(|e| crate::error::invalid_argument(format!("cannot serialise: {e}")))
}

/// JSON text from Python, parsed into `T`; `what` names it in the error.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> PyResult<T> {
    serde_json::from_str(text)
        .map_err(|e| crate::error::invalid_argument(format!("invalid {what}: {e}")))
}

/// A JSON value as a Python object (through `json.loads`).
pub(crate) fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    let text = to_json(v)?;
    py.import("json")?.call_method1("loads", (text,))
}

/// A timeout in seconds from Python (`None` = no limit).
pub(crate) fn seconds(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(Duration::from_secs_f64(s))),
        Some(s) if s == f64::INFINITY => Ok(None),
        Some(s) => Err(crate::error::invalid_argument(format!(
            "a timeout must be a non-negative number of seconds, got {s}"
        ))),
    }
}
