//! Tasks as callers see them: the creation request and read-only views.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::clock::Millis;
use crate::job::{Checkpoint, StepFailure};
use crate::state::{StepState, TaskState};

/// A request to create one task (SPEC §1, §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct TaskRequest {
    /// Template name.
    pub name: String,
    /// Template namespace.
    pub namespace: String,
    /// Template version; `None` means the newest registered.
    #[serde(default)]
    pub version: Option<String>,
    /// The task's input: a JSON object.
    #[serde(default = "empty_object")]
    pub context: Value,
    /// Who asked.
    #[serde(default = "default_initiator")]
    pub initiator: String,
    /// Which system asked.
    #[serde(default = "default_source")]
    pub source_system: String,
    /// Why.
    #[serde(default = "default_reason")]
    pub reason: String,
    /// Free-form tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// −100..100; higher runs first.
    #[serde(default)]
    pub priority: i32,
    /// Correlation id; generated when absent.
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// The parent workflow's correlation id.
    #[serde(default)]
    pub parent_correlation_id: Option<String>,
    /// Caller-chosen identity (SPEC §4).
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}
fn default_initiator() -> String {
    "unknown".into()
}
fn default_source() -> String {
    "tasker".into()
}
fn default_reason() -> String {
    "not given".into()
}

impl TaskRequest {
    /// A request for `namespace/name` (newest version) with `context`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, context: Value) -> Self {
        TaskRequest {
            name: name.into(),
            namespace: namespace.into(),
            version: None,
            context,
            initiator: default_initiator(),
            source_system: default_source(),
            reason: default_reason(),
            tags: Vec::new(),
            priority: 0,
            correlation_id: None,
            parent_correlation_id: None,
            idempotency_key: None,
        }
    }

    /// Pins the template version.
    pub fn version(mut self, v: impl Into<String>) -> Self {
        self.version = Some(v.into());
        self
    }

    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, k: impl Into<String>) -> Self {
        self.idempotency_key = Some(k.into());
        self
    }

    /// Sets initiator, source system and reason.
    pub fn origin(
        mut self,
        initiator: impl Into<String>,
        source_system: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        self.initiator = initiator.into();
        self.source_system = source_system.into();
        self.reason = reason.into();
        self
    }
}

/// One persisted state transition (task or step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct Transition {
    /// The step's name, for step transitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_name: Option<String>,
    /// State before (`None` for the initial row).
    pub from_state: Option<String>,
    /// State after.
    pub to_state: String,
    /// The event that caused it.
    pub event: String,
    /// Who did it: an orchestrator, worker or operator id.
    pub actor: String,
    /// Why, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Step attempt the transition belongs to (step transitions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Extra data.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub metadata: Value,
    /// When (ms since epoch).
    pub created_at: Millis,
    /// Total order among the rows of one entity.
    pub sort_key: i64,
}

/// A step as seen from outside.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct StepView {
    /// The step's id.
    pub uuid: String,
    /// The step's name.
    pub name: String,
    /// `standard`, `decision`, ...
    pub step_type: String,
    /// The handler callable.
    pub callable: String,
    /// Current state.
    pub state: StepState,
    /// Attempts started so far.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// The success result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The last failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StepFailure>,
    /// The last checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// Start of the latest attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Millis>,
    /// When the step reached `complete`/`error`/... .
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Millis>,
    /// When the next retry is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Millis>,
    /// Worker holding the current attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// Names of the steps this one depends on.
    pub dependencies: Vec<String>,
}

/// A task with its steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct Task {
    /// The task's id.
    pub uuid: String,
    /// Template namespace.
    pub namespace: String,
    /// Template name.
    pub name: String,
    /// Template version.
    pub version: String,
    /// Current state (`status` in every host).
    pub status: TaskState,
    /// The task's input.
    pub context: Value,
    /// Who asked.
    pub initiator: String,
    /// Which system asked.
    pub source_system: String,
    /// Why.
    pub reason: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Priority.
    pub priority: i32,
    /// Correlation id.
    pub correlation_id: String,
    /// Parent workflow correlation id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_correlation_id: Option<String>,
    /// For a child task: the workflow step (and its task) that started it (SPEC §8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<crate::store::ParentLink>,
    /// Idempotency key, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Created.
    pub created_at: Millis,
    /// Last changed.
    pub updated_at: Millis,
    /// Reached a terminal state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Millis>,
    /// Steps in creation order.
    pub steps: Vec<StepView>,
    /// True when a create call returned this existing task instead of making a new one.
    #[serde(default)]
    pub replayed: bool,
}

impl Task {
    /// The step called `name`.
    pub fn step(&self, name: &str) -> Option<&StepView> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// Results of the steps that have one, by name.
    pub fn results(&self) -> Map<String, Value> {
        self.steps
            .iter()
            .filter_map(|s| s.result.clone().map(|r| (s.name.clone(), r)))
            .collect()
    }

    /// Share of steps that are complete or resolved, 0–100.
    pub fn completion_percentage(&self) -> f64 {
        if self.steps.is_empty() {
            return 100.0;
        }
        let done = self
            .steps
            .iter()
            .filter(|s| s.state.satisfies_dependency())
            .count();
        (done as f64 * 100.0 / self.steps.len() as f64 * 10.0).round() / 10.0
    }
}

/// A task row without its steps, for listings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct TaskSummary {
    /// The task's id.
    pub uuid: String,
    /// Template namespace.
    pub namespace: String,
    /// Template name.
    pub name: String,
    /// Template version.
    pub version: String,
    /// Current state.
    pub status: TaskState,
    /// Who asked.
    pub initiator: String,
    /// Which system asked.
    pub source_system: String,
    /// Created.
    pub created_at: Millis,
    /// Reached a terminal state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Millis>,
}

/// Filters for listing tasks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskFilter {
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Only this template name.
    pub name: Option<String>,
    /// Only this state.
    pub status: Option<TaskState>,
    /// Only this initiator.
    pub initiator: Option<String>,
    /// Only this source system.
    pub source_system: Option<String>,
    /// Only the child tasks that workflow steps of this task started.
    #[serde(default)]
    pub parent_task_uuid: Option<String>,
    /// Created at or after (ms).
    pub created_after: Option<Millis>,
    /// Created before (ms).
    pub created_before: Option<Millis>,
    /// Page size (default 50, at most 1000).
    pub limit: Option<u32>,
    /// Rows to skip.
    pub offset: Option<u32>,
}
