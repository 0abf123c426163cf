//! The in-memory task template: what both YAML dialects load into.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A validated task template: `namespace/name/version` and its DAG of steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskTemplate {
    /// Template name (used when creating tasks).
    pub name: String,
    /// Namespace (`[A-Za-z0-9_]`, at most 29 characters).
    pub namespace: String,
    /// Semver-like version string.
    pub version: String,
    /// Free-text description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The `metadata` block, kept as given.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub metadata: Value,
    /// How task identity is derived when no idempotency key is given.
    #[serde(default)]
    pub identity_strategy: IdentityStrategy,
    /// JSON Schema the task context must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
    /// Lifecycle limits for tasks of this template.
    #[serde(default)]
    pub lifecycle: LifecycleLimits,
    /// The domain-event catalogue (`domain_events`), kept as given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domain_events: Vec<Value>,
    /// Steps in declaration order.
    pub steps: Vec<StepDefinition>,
}

/// `identity_strategy` of a template (SPEC §4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityStrategy {
    /// Identity = template + canonical context.
    #[default]
    Strict,
    /// The caller must give an idempotency key.
    CallerProvided,
    /// Every creation is a new task.
    AlwaysUnique,
}

/// Template-level lifecycle limits, in minutes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LifecycleLimits {
    /// Longest a task may take from creation to a terminal state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_minutes: Option<f64>,
    /// Longest a task may rest in `waiting_for_dependencies`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_waiting_for_dependencies_minutes: Option<f64>,
    /// Longest a task may rest in `waiting_for_retry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_waiting_for_retry_minutes: Option<f64>,
    /// Longest a task may rest in `steps_in_process`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps_in_process_minutes: Option<f64>,
}

/// The kind of a step (SPEC §2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepType {
    /// A plain step.
    #[default]
    Standard,
    /// Chooses which of its descendants to create.
    Decision,
    /// Waits only for those of its dependencies that exist.
    DeferredConvergence,
    /// Analyzes work and fans out batch workers.
    Batchable,
    /// Template for workers created by a batchable step.
    BatchWorker,
    /// Runs a child task of another template.
    Workflow,
}

/// The callable that marks a step as a `workflow` step whatever its declared type (SPEC §8).
pub const WORKFLOW_HANDLER: &str = "WorkflowHandler";

impl StepType {
    /// Every step type, in declaration order.
    pub const ALL: [StepType; 6] = [
        StepType::Standard,
        StepType::Decision,
        StepType::DeferredConvergence,
        StepType::Batchable,
        StepType::BatchWorker,
        StepType::Workflow,
    ];

    /// The step type whose canonical name ([`StepType::as_str`]) is `name`, as stored with
    /// each step of a task.
    pub fn from_name(name: &str) -> Option<StepType> {
        StepType::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// The snake_case name used in YAML, SQL and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            StepType::Standard => "standard",
            StepType::Decision => "decision",
            StepType::DeferredConvergence => "deferred_convergence",
            StepType::Batchable => "batchable",
            StepType::BatchWorker => "batch_worker",
            StepType::Workflow => "workflow",
        }
    }
}

/// Backoff curve between attempts (SPEC §5.5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backoff {
    /// Retry at once.
    None,
    /// `base · n`.
    Linear,
    /// `base · 2^(n−1)`.
    #[default]
    Exponential,
    /// `base · fib(n)`.
    Fibonacci,
}

/// A step's retry policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Whether the step may be retried at all.
    pub retryable: bool,
    /// Total attempts allowed (at least 1).
    pub max_attempts: u32,
    /// The backoff curve.
    pub backoff: Backoff,
    /// Base delay in milliseconds.
    pub backoff_base_ms: u64,
    /// Upper bound of any delay in milliseconds.
    pub max_backoff_ms: u64,
    /// ±15 % uniform jitter on computed delays.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retryable: true,
            max_attempts: 3,
            backoff: Backoff::Exponential,
            backoff_base_ms: 1000,
            max_backoff_ms: 30_000,
            jitter: true,
        }
    }
}

/// `handler:` of a step.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HandlerSpec {
    /// The handler's name or import path.
    pub callable: String,
    /// Method to dispatch to (default `call`).
    #[serde(default = "default_method")]
    pub method: String,
    /// Optional resolver hint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolver: Option<String>,
    /// Configuration handed to the handler (`step_config`).
    #[serde(default)]
    pub initialization: Map<String, Value>,
}

fn default_method() -> String {
    "call".to_string()
}

/// `batch_config:` of a batch worker template (SPEC §7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchConfig {
    /// Items per batch.
    pub batch_size: u64,
    /// How many of one analyzer's workers may run at once.
    pub parallelism: u32,
    /// Name of the cursor field.
    pub cursor_field: String,
    /// What a worker failing for good does to its siblings.
    pub failure_strategy: FailureStrategy,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            batch_size: 1000,
            parallelism: 10,
            cursor_field: "id".to_string(),
            failure_strategy: FailureStrategy::ContinueOnFailure,
        }
    }
}

/// Batch `failure_strategy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureStrategy {
    /// Others keep running; the task blocks like for any step.
    #[default]
    ContinueOnFailure,
    /// The first permanent failure cancels unfinished siblings.
    FailFast,
    /// As continue, and the aggregator runs anyway.
    Isolate,
}

/// One `publishes_events` declaration (SPEC §10).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventDeclaration {
    /// Event name (`ns.action`).
    pub name: String,
    /// `success | failure | retryable_failure | permanent_failure | always`.
    pub condition: String,
    /// `durable | fast | broadcast`.
    pub delivery_mode: String,
    /// Optional payload schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    /// Optional custom publisher name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<String>,
}

/// One step of a template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDefinition {
    /// Unique within the template.
    pub name: String,
    /// Free-text description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The handler that runs the step.
    pub handler: HandlerSpec,
    /// The step type.
    #[serde(default)]
    pub step_type: StepType,
    /// Names of the steps this one depends on.
    #[serde(default)]
    pub dependencies: Vec<String>,
    /// Retry policy (defaults filled in).
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Attempt timeout; `None` means the configured default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// Events this step publishes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publishes_events: Vec<EventDeclaration>,
    /// Batch settings (batch workers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_config: Option<BatchConfig>,
    /// JSON Schema a success result must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_schema: Option<Value>,
}
