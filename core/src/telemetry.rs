//! Tracing spans that carry a task's ids, and (feature `otlp`) their export to an
//! OpenTelemetry collector.
//!
//! The engine opens these spans (all at `INFO`, so a subscriber that filters them out pays a
//! callsite check, nothing more):
//!
//! | span | where | fields |
//! |---|---|---|
//! | `tasker.step` | one handler attempt: a Rust handler's run, or a dispatch-port job from `next_step` to its applied `complete` | `task_uuid, step_uuid, step_name, namespace, task_name, correlation_id, attempt, callable, worker_id`, then `outcome` (`success`, `failure`, `checkpoint`, `abandoned`), `error_type`, `retryable`, `completion` |
//! | `tasker.step.result` | an attempt's result being applied and its task settled (one transaction for a batch of results) | `task_uuid, step_uuid, step_name, correlation_id, attempt, resolution, error_type`, then `completion`, `task_state` (`outcome = error` when the database refused the batch) |
//! | `tasker.task.create` | a task being planned and committed | `namespace, task_name, task_uuid, correlation_id`, then `replayed`, `outcome` |
//! | `tasker.operator` | an operator action | `task_uuid, action, actor`, then `task_state`, `outcome` |
//! | `tasker.request` | one REST request | `method, route, path, request_id`, then `status` |
//!
//! Events a handler logs (`tracing::info!`) run inside its `tasker.step` span, so every
//! subscriber sees them with the task's ids. Foreign hosts get the span of a job from
//! [`crate::Worker::span`] to enter it around their own logging.

#[cfg(feature = "otlp")]
pub mod otlp;

use tracing::Span;
use tracing::field::Empty;

use crate::job::{StepJob, StepOutcome};
use crate::store::{Completion, FinishReport, Resolution};

/// The span of one handler attempt (see the module docs). A root span: it belongs to the
/// task, not to whatever the worker was doing when it claimed the step.
pub(crate) fn step_span(job: &StepJob) -> Span {
    tracing::info_span!(
        parent: None,
        "tasker.step",
        task_uuid = job.task_uuid.as_str(),
        step_uuid = job.step_uuid.as_str(),
        step_name = job.step_name.as_str(),
        namespace = job.namespace.as_str(),
        task_name = job.task_name.as_str(),
        correlation_id = job.correlation_id.as_str(),
        attempt = job.attempt,
        callable = job.callable(),
        worker_id = job.worker_id.as_str(),
        outcome = Empty,
        error_type = Empty,
        retryable = Empty,
        completion = Empty,
    )
}

/// Records what a handler handed back on its step span.
pub(crate) fn record_outcome(span: &Span, outcome: &StepOutcome) {
    if span.is_disabled() {
        return;
    }
    match outcome {
        StepOutcome::Success { .. } => {
            span.record("outcome", "success");
        }
        StepOutcome::Failure(f) => {
            span.record("outcome", "failure");
            span.record("error_type", f.error_type.as_str());
            span.record("retryable", f.retryable);
        }
        StepOutcome::Checkpoint(_) => {
            span.record("outcome", "checkpoint");
        }
    }
}

/// The spans of a batch of results being applied, one per result (see the module docs); empty
/// when no subscriber wants them, so a batch costs one callsite check.
pub(crate) fn result_spans<'a>(
    results: impl ExactSizeIterator<Item = (&'a StepJob, &'a Resolution)>,
) -> Vec<Span> {
    let mut spans = Vec::new();
    for (job, resolution) in results {
        let span = tracing::info_span!(
            parent: None,
            "tasker.step.result",
            task_uuid = job.task_uuid.as_str(),
            step_uuid = job.step_uuid.as_str(),
            step_name = job.step_name.as_str(),
            correlation_id = job.correlation_id.as_str(),
            attempt = job.attempt,
            resolution = match resolution {
                Resolution::Succeeded { .. } => "succeeded",
                Resolution::Retry { .. } => "retry",
                Resolution::Failed { .. } => "failed",
            },
            error_type = Empty,
            completion = Empty,
            task_state = Empty,
            outcome = Empty,
        );
        if span.is_disabled() {
            return Vec::new();
        }
        if let Resolution::Retry { failure, .. } | Resolution::Failed { failure } = resolution {
            span.record("error_type", failure.error_type.as_str());
        }
        spans.push(span);
    }
    spans
}

/// Records what applying a result did: accepted or not, and the task's state after it.
pub(crate) fn record_settled(span: &Span, report: &FinishReport) {
    record_completion(span, &report.completion);
    if let Some(state) = report.task_state {
        span.record("task_state", state.as_str());
    }
}

/// Records whether the engine accepted an attempt's result.
pub(crate) fn record_completion(span: &Span, completion: &Completion) {
    if span.is_disabled() {
        return;
    }
    span.record(
        "completion",
        match completion {
            Completion::Accepted => "accepted",
            Completion::Rejected(_) => "rejected",
        },
    );
}

/// What the process's tracing set-up left running: the OTLP exporter, when one was started.
/// Dropping it (or calling [`TelemetryGuard::shutdown`]) exports the spans still queued,
/// waiting at most a few seconds, so a process flushes its last spans before it exits.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    #[cfg(feature = "otlp")]
    exporter: Option<otlp::Exporter>,
}

impl TelemetryGuard {
    /// A guard with nothing to flush.
    pub fn none() -> Self {
        TelemetryGuard::default()
    }

    /// Whether spans are being exported.
    pub fn is_exporting(&self) -> bool {
        #[cfg(feature = "otlp")]
        {
            self.exporter.is_some()
        }
        #[cfg(not(feature = "otlp"))]
        {
            false
        }
    }

    /// Exports what is queued and stops the exporter, waiting at most the exporter's flush
    /// deadline.
    pub fn shutdown(self) {
        #[cfg(feature = "otlp")]
        {
            let mut guard = self;
            if let Some(exporter) = guard.exporter.take() {
                exporter.shutdown();
            }
        }
    }

    /// Spans dropped so far because the export queue was full or an export failed.
    pub fn dropped_spans(&self) -> u64 {
        #[cfg(feature = "otlp")]
        {
            self.exporter.as_ref().map_or(0, otlp::Exporter::dropped)
        }
        #[cfg(not(feature = "otlp"))]
        {
            0
        }
    }
}

#[cfg(feature = "otlp")]
impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(exporter) = self.exporter.take() {
            exporter.shutdown();
        }
    }
}
