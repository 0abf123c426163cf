//! What crosses the boundary between the engine and a handler: the job handed out and the
//! outcome handed back. Every host language wraps these same types.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::clock::Millis;
use crate::template::StepDefinition;

/// Why a step attempt failed (SPEC §5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// Bad input that will not get better on retry.
    ValidationError,
    /// A failure that must not be retried.
    PermanentError,
    /// A transient failure.
    RetryableError,
    /// The attempt ran past its timeout.
    Timeout,
    /// The handler raised or panicked (the default).
    HandlerError,
    /// The worker holding the attempt died or lost its lease.
    WorkerLost,
    /// No handler is registered for the step's callable.
    HandlerNotFound,
    /// The handler's result was not acceptable (not JSON, too big, schema violations).
    InvalidResult,
    /// A decision step returned an invalid outcome.
    DecisionError,
    /// A batchable step returned an invalid outcome.
    BatchError,
    /// A workflow step's child task could not be started, or ended in `error` or `cancelled`.
    WorkflowError,
}

impl ErrorType {
    /// Every variant.
    pub const ALL: [ErrorType; 11] = [
        ErrorType::ValidationError,
        ErrorType::PermanentError,
        ErrorType::RetryableError,
        ErrorType::Timeout,
        ErrorType::HandlerError,
        ErrorType::WorkerLost,
        ErrorType::HandlerNotFound,
        ErrorType::InvalidResult,
        ErrorType::DecisionError,
        ErrorType::BatchError,
        ErrorType::WorkflowError,
    ];

    /// Whether a failure of this type is retried when the handler does not say.
    pub fn default_retryable(self) -> bool {
        matches!(
            self,
            ErrorType::RetryableError
                | ErrorType::Timeout
                | ErrorType::HandlerError
                | ErrorType::WorkerLost
        )
    }

    /// The snake_case wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::ValidationError => "validation_error",
            ErrorType::PermanentError => "permanent_error",
            ErrorType::RetryableError => "retryable_error",
            ErrorType::Timeout => "timeout",
            ErrorType::HandlerError => "handler_error",
            ErrorType::WorkerLost => "worker_lost",
            ErrorType::HandlerNotFound => "handler_not_found",
            ErrorType::InvalidResult => "invalid_result",
            ErrorType::DecisionError => "decision_error",
            ErrorType::BatchError => "batch_error",
            ErrorType::WorkflowError => "workflow_error",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<ErrorType> {
        ErrorType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for ErrorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed attempt, as reported by a handler or set by the engine; also the stored step error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct StepFailure {
    /// What went wrong, for people.
    pub message: String,
    /// The classification.
    pub error_type: ErrorType,
    /// Whether another attempt may help.
    pub retryable: bool,
    /// A short machine-readable code (`PAYMENT_DECLINED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// Backtrace or traceback, when the failure came from an exception or panic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backtrace: Option<String>,
    /// Extra structured data.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub metadata: Value,
    /// Overrides the computed backoff (capped at the policy's `max_backoff_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<f64>,
}

impl StepFailure {
    /// A failure of `error_type` with the type's default retryability.
    pub fn new(error_type: ErrorType, message: impl Into<String>) -> Self {
        StepFailure {
            message: message.into(),
            error_type,
            retryable: error_type.default_retryable(),
            error_code: None,
            backtrace: None,
            metadata: Value::Null,
            retry_after_seconds: None,
        }
    }
}

/// What a handler hands back for one attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum StepOutcome {
    /// The step succeeded with `result` (a JSON object).
    Success {
        /// The result visible to dependents.
        result: Value,
        /// Extra data recorded with the result.
        #[serde(default, skip_serializing_if = "Value::is_null")]
        metadata: Value,
    },
    /// The attempt failed.
    Failure(StepFailure),
    /// The handler yields mid-way: store the checkpoint and hand the job out again.
    Checkpoint(Checkpoint),
}

/// The Rust handler API's name for an outcome.
pub type StepHandlerResult = StepOutcome;

impl StepOutcome {
    /// A success with `result` and no metadata.
    pub fn success(result: Value) -> Self {
        StepOutcome::Success {
            result,
            metadata: Value::Null,
        }
    }

    /// A success with metadata.
    pub fn success_with_metadata(result: Value, metadata: Value) -> Self {
        StepOutcome::Success { result, metadata }
    }

    /// A failure of `error_type`, retryable as the type's default says.
    pub fn failure(message: impl Into<String>, error_type: ErrorType) -> Self {
        StepOutcome::Failure(StepFailure::new(error_type, message))
    }

    /// A `permanent_error` failure.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::failure(message, ErrorType::PermanentError)
    }

    /// A `retryable_error` failure.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::failure(message, ErrorType::RetryableError)
    }

    /// A decision step's outcome (SPEC §6): create the steps named (and what follows them in
    /// the decision's branches). `routing_context` (anything but `null`) is kept in the result
    /// for dependents and operators.
    pub fn decision_success<S: Into<String>>(
        step_names: impl IntoIterator<Item = S>,
        routing_context: Value,
    ) -> Self {
        let names: Vec<String> = step_names.into_iter().map(Into::into).collect();
        let mut result = serde_json::json!({
            "decision_point_outcome": { "type": "create_steps", "step_names": names }
        });
        if !routing_context.is_null() {
            result["routing_context"] = routing_context;
        }
        Self::success(result)
    }

    /// A decision step's outcome that creates no branch.
    pub fn skip_branches(reason: impl Into<String>) -> Self {
        Self::success(serde_json::json!({
            "decision_point_outcome": { "type": "no_branches" },
            "reason": reason.into(),
        }))
    }

    /// A decision that could not be made: fails the decision step permanently
    /// (`decision_error`).
    pub fn decision_failure(message: impl Into<String>) -> Self {
        Self::failure(message, ErrorType::DecisionError).with_retryable(false)
    }

    /// An analyzer's outcome (SPEC §7): create the batches of `outcome` (see
    /// [`crate::batch::create_batch_outcome`]), or the no-op placeholder for `no_batches`.
    pub fn batch_analyzer_success(outcome: crate::batch::BatchOutcome) -> Self {
        Self::success(serde_json::json!({ "batch_processing_outcome": outcome.to_value() }))
    }

    /// An analyzer's outcome when there is nothing to process: one no-op placeholder worker
    /// is created so that aggregators still run.
    pub fn no_batches(reason: impl Into<String>) -> Self {
        Self::batch_analyzer_success(crate::batch::BatchOutcome::NoBatches {
            reason: Some(reason.into()),
            worker_template_name: None,
        })
    }

    /// A batch worker's success: `result` (an object) with the worker's `batch_id` added, so
    /// aggregators can tell batches apart.
    pub fn batch_worker_success(batch: &crate::batch::BatchWorkerContext, result: Value) -> Self {
        let mut result = result;
        if let Value::Object(m) = &mut result {
            m.entry("batch_id")
                .or_insert_with(|| Value::String(batch.batch_id().to_string()));
        }
        Self::success(result)
    }

    /// A checkpoint yield.
    pub fn checkpoint_yield(cursor: Value, items_processed: u64, accumulated: Value) -> Self {
        StepOutcome::Checkpoint(Checkpoint {
            cursor,
            items_processed,
            accumulated,
        })
    }

    /// Sets the error code of a failure (no effect on other outcomes).
    pub fn with_error_code(mut self, code: impl Into<String>) -> Self {
        if let StepOutcome::Failure(f) = &mut self {
            f.error_code = Some(code.into());
        }
        self
    }

    /// Overrides the retryability of a failure.
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        if let StepOutcome::Failure(f) = &mut self {
            f.retryable = retryable;
        }
        self
    }

    /// Sets `retry_after_seconds` of a failure.
    pub fn with_retry_after(mut self, seconds: f64) -> Self {
        if let StepOutcome::Failure(f) = &mut self {
            f.retry_after_seconds = Some(seconds);
        }
        self
    }

    /// Sets the metadata of a success or a failure.
    pub fn with_metadata(mut self, metadata: Value) -> Self {
        match &mut self {
            StepOutcome::Success { metadata: m, .. } => *m = metadata,
            StepOutcome::Failure(f) => f.metadata = metadata,
            StepOutcome::Checkpoint(_) => {}
        }
        self
    }

    /// True for a success.
    pub fn is_success(&self) -> bool {
        matches!(self, StepOutcome::Success { .. })
    }
}

/// A checkpoint stored for a step (SPEC §7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct Checkpoint {
    /// Where to resume.
    pub cursor: Value,
    /// How many items are done so far.
    pub items_processed: u64,
    /// Partial results carried to the next attempt.
    #[serde(default)]
    pub accumulated: Value,
}

/// One unit of work handed to a handler: a step attempt with everything its context needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepJob {
    /// The task.
    pub task_uuid: String,
    /// The step.
    pub step_uuid: String,
    /// The step's name.
    pub step_name: String,
    /// This attempt's number (1-based); with `step_uuid` it identifies the job.
    pub attempt: u32,
    /// The worker holding the lease.
    pub worker_id: String,
    /// Task namespace.
    pub namespace: String,
    /// Task (template) name.
    pub task_name: String,
    /// Template version.
    pub task_version: String,
    /// Content hash of the template snapshot the task runs.
    pub template_hash: String,
    /// The task's correlation id.
    pub correlation_id: String,
    /// The step's definition (handler, retry policy, timeout...).
    pub definition: StepDefinition,
    /// The task context.
    pub context: Value,
    /// Step inputs (batch cursor etc.); an empty object for plain steps.
    pub inputs: Map<String, Value>,
    /// Results of every completed ancestor, by step name.
    pub dependency_results: Map<String, Value>,
    /// For a convergence step: the errors of its direct parents that failed for good and
    /// still let it run (batch workers under `failure_strategy: isolate`), by step name.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub failed_dependencies: Map<String, Value>,
    /// The last stored checkpoint, if any.
    pub checkpoint: Option<Checkpoint>,
    /// When the attempt started (ms since epoch).
    pub started_at: Millis,
    /// Attempt deadline in ms since epoch.
    pub timeout_at: Millis,
}

impl StepJob {
    /// The callable that names the handler.
    pub fn callable(&self) -> &str {
        &self.definition.handler.callable
    }

    /// `max_attempts` of the step's retry policy.
    pub fn max_attempts(&self) -> u32 {
        self.definition.retry.max_attempts
    }
}
