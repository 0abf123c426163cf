//! The handler-side logic the Python mixins are thin wrappers of: error-type defaults,
//! decision and batch outcomes, a batch worker's view, aggregation, HTTP classification. Defined once in the core;
//! here each is one function taking and returning JSON.

use pyo3::prelude::*;
use serde_json::{Map, Value, json};
use tasker_core::batch::{BatchOutcome, BatchWorkerContext, CursorConfig};
use tasker_core::clock::{Clock, SystemClock};
use tasker_core::http_outcome::{self, HttpResponse};
use tasker_core::{BatchAggregationScenario, ErrorType, StepOutcome};

use crate::convert::{from_json, to_json};
use crate::error::{IntoPyResult, invalid_argument};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(error_types, m)?)?;
    m.add_function(wrap_pyfunction!(decision_success, m)?)?;
    m.add_function(wrap_pyfunction!(skip_branches, m)?)?;
    m.add_function(wrap_pyfunction!(decision_failure, m)?)?;
    m.add_function(wrap_pyfunction!(create_batch_outcome, m)?)?;
    m.add_function(wrap_pyfunction!(batch_analyzer_success, m)?)?;
    m.add_function(wrap_pyfunction!(no_batches, m)?)?;
    m.add_function(wrap_pyfunction!(batch_worker_success, m)?)?;
    m.add_function(wrap_pyfunction!(aggregation_scenario, m)?)?;
    m.add_function(wrap_pyfunction!(batch_worker_context, m)?)?;
    m.add_function(wrap_pyfunction!(http_status_class, m)?)?;
    m.add_function(wrap_pyfunction!(http_retry_after, m)?)?;
    m.add_function(wrap_pyfunction!(http_success, m)?)?;
    m.add_function(wrap_pyfunction!(http_failure, m)?)?;
    m.add_function(wrap_pyfunction!(http_connection_failure, m)?)?;
    m.add_function(wrap_pyfunction!(http_timeout_failure, m)?)?;
    Ok(())
}

/// Every error type's wire name with whether a failure of it is retried by default.
#[pyfunction]
fn error_types() -> Vec<(&'static str, bool)> {
    ErrorType::ALL
        .iter()
        .map(|t| (t.as_str(), t.default_retryable()))
        .collect()
}

/// A decision step's outcome creating `step_names` (JSON of a core `StepOutcome`).
#[pyfunction]
#[pyo3(signature = (step_names, routing_context=None))]
fn decision_success(step_names: Vec<String>, routing_context: Option<&str>) -> PyResult<String> {
    let routing = match routing_context {
        Some(text) => from_json(text, "routing context")?,
        None => Value::Null,
    };
    to_json(&StepOutcome::decision_success(step_names, routing))
}

/// A decision step's outcome creating no branch.
#[pyfunction]
fn skip_branches(reason: &str) -> PyResult<String> {
    to_json(&StepOutcome::skip_branches(reason))
}

/// A decision that could not be made (`decision_error`, permanent).
#[pyfunction]
fn decision_failure(message: &str) -> PyResult<String> {
    to_json(&StepOutcome::decision_failure(message))
}

/// Cursor ranges dividing `total_items` into batches of `batch_size` (the wire form of a
/// `batch_processing_outcome`).
#[pyfunction]
#[pyo3(signature = (total_items, batch_size, worker_template_name=None))]
fn create_batch_outcome(
    total_items: u64,
    batch_size: u64,
    worker_template_name: Option<String>,
) -> PyResult<String> {
    let mut outcome = tasker_core::batch::create_batch_outcome(total_items, batch_size);
    if let Some(name) = worker_template_name {
        outcome = outcome.with_worker_template(name);
    }
    to_json(&outcome.to_value())
}

fn parse_outcome(outcome: &str) -> PyResult<BatchOutcome> {
    let value: Value = from_json(outcome, "batch outcome")?;
    BatchOutcome::from_result(&json!({ "batch_processing_outcome": value }))
        .map_err(invalid_argument)
}

/// An analyzer's success carrying a batch outcome (as made by `create_batch_outcome`).
#[pyfunction]
fn batch_analyzer_success(outcome: &str) -> PyResult<String> {
    to_json(&StepOutcome::batch_analyzer_success(parse_outcome(
        outcome,
    )?))
}

/// An analyzer's success when there is nothing to process.
#[pyfunction]
fn no_batches(reason: &str) -> PyResult<String> {
    to_json(&StepOutcome::no_batches(reason))
}

/// A batch worker's success: `result` with its batch id added.
#[pyfunction]
fn batch_worker_success(batch_context: &str, result: &str) -> PyResult<String> {
    let ctx: Value = from_json(batch_context, "batch context")?;
    let cursor: CursorConfig =
        serde_json::from_value(ctx.get("cursor").cloned().unwrap_or_default())
            .map_err(|e| invalid_argument(format!("invalid batch cursor: {e}")))?;
    let batch = BatchWorkerContext {
        cursor,
        is_no_op: ctx.get("is_no_op").and_then(Value::as_bool) == Some(true),
        batch_metadata: ctx
            .get("batch_metadata")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default(),
        checkpoint: None,
    };
    let result: Value = from_json(result, "batch worker result")?;
    to_json(&StepOutcome::batch_worker_success(&batch, result))
}

/// What an aggregator sees of its analyzer's fan-out, from its dependency results (and the
/// errors of workers that failed for good under `failure_strategy: isolate`).
#[pyfunction]
#[pyo3(signature = (dependency_results, analyzer, worker_prefix, failed_dependencies=None))]
fn aggregation_scenario(
    dependency_results: &str,
    analyzer: &str,
    worker_prefix: &str,
    failed_dependencies: Option<&str>,
) -> PyResult<String> {
    let deps: Map<String, Value> = from_json(dependency_results, "dependency results")?;
    let mut s = BatchAggregationScenario::detect(&deps, analyzer, worker_prefix);
    if let Some(text) = failed_dependencies {
        let failed: Map<String, Value> = from_json(text, "failed dependencies")?;
        s.failed_batches = failed
            .into_iter()
            .filter(|(name, _)| name.starts_with(worker_prefix))
            .collect();
    }
    to_json(&json!({
        "is_no_batches": s.is_no_batches,
        "analyzer_result": s.analyzer_result,
        "batch_results": s.batch_results,
        "worker_count": s.worker_count,
        "failed_batches": s.failed_batches,
    }))
}

/// A batch worker's view of its batch from its step inputs and last checkpoint (JSON), or
/// `None` for a step that is not a batch worker.
#[pyfunction]
#[pyo3(signature = (inputs, checkpoint=None))]
fn batch_worker_context(inputs: &str, checkpoint: Option<&str>) -> PyResult<Option<String>> {
    let inputs: Map<String, Value> = from_json(inputs, "step inputs")?;
    let checkpoint = match checkpoint {
        Some(text) => from_json(text, "checkpoint")?,
        None => None,
    };
    // The same reading as `BatchWorkerContext::from_job`, from the parts a context holds.
    let Some(Ok(cursor)) = inputs
        .get("cursor")
        .map(|c| serde_json::from_value::<CursorConfig>(c.clone()))
    else {
        return Ok(None);
    };
    let b = BatchWorkerContext {
        cursor,
        is_no_op: inputs.get("is_no_op").and_then(Value::as_bool) == Some(true),
        batch_metadata: inputs
            .get("batch_metadata")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default(),
        checkpoint,
    };
    to_json(&json!({
        "batch_id": b.batch_id(),
        "cursor": b.cursor,
        "is_no_op": b.is_no_op,
        "batch_metadata": b.batch_metadata,
        "checkpoint": b.checkpoint,
        "resume_cursor": b.resume_cursor(),
        "items_processed": b.items_processed(),
        "accumulated": b.accumulated(),
    }))
    .map(Some)
}

fn http_status(status: i64) -> PyResult<u16> {
    u16::try_from(status).map_err(|_| {
        crate::error::to_py(tasker_core::Error::validation(format!(
            "{status} is not an HTTP status code (100-599)"
        )))
    })
}

fn http_response(response: &str) -> PyResult<HttpResponse> {
    from_json(response, "HTTP response")
}

/// What a status says: `(ok, retryable, client_error, server_error)`.
#[pyfunction]
fn http_status_class(status: i64) -> PyResult<(bool, bool, bool, bool)> {
    let c = http_outcome::classify(http_status(status)?).py()?;
    Ok((c.ok, c.retryable, c.client_error, c.server_error))
}

/// The seconds a `Retry-After` header asks to wait from now, or `None` when it is neither
/// delay-seconds nor an HTTP-date.
#[pyfunction]
fn http_retry_after(header: &str) -> Option<f64> {
    http_outcome::retry_after_seconds(header, SystemClock.now())
}

/// The success outcome of a 2xx response (JSON of an `HttpResponse`), with `result` (JSON)
/// instead of the body when given.
#[pyfunction]
#[pyo3(signature = (response, result=None))]
fn http_success(response: &str, result: Option<&str>) -> PyResult<String> {
    let result: Option<Value> = match result {
        Some(text) => Some(from_json(text, "result")?),
        None => None,
    };
    to_json(&http_outcome::success_outcome(&http_response(response)?, result).py()?)
}

/// The classified failure outcome of a response that is not a success.
#[pyfunction]
#[pyo3(signature = (response, message=None))]
fn http_failure(response: &str, message: Option<&str>) -> PyResult<String> {
    let response = http_response(response)?;
    to_json(&http_outcome::failure_outcome(&response, SystemClock.now(), message).py()?)
}

/// A request that could not connect (retryable, `CONNECTION_ERROR`).
#[pyfunction]
#[pyo3(signature = (detail, operation=None))]
fn http_connection_failure(detail: &str, operation: Option<&str>) -> PyResult<String> {
    to_json(&http_outcome::connection_failure(detail, operation))
}

/// A request that timed out (`timeout`, retryable, `TIMEOUT`).
#[pyfunction]
#[pyo3(signature = (detail, operation=None))]
fn http_timeout_failure(detail: &str, operation: Option<&str>) -> PyResult<String> {
    to_json(&http_outcome::timeout_failure(detail, operation))
}
