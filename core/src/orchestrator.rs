//! Orchestration decisions, kept pure so every store backend and every worker shares them:
//! how a task moves after a change, when a failed attempt is retried, how a task request
//! becomes a task.

mod batch;
mod decision;

pub use batch::{MAX_BATCH_WORKERS, plan_batches};
pub use decision::{DecisionOutcome, MAX_DECISION_STEPS, plan_decision};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::clock::Millis;
use crate::job::{ErrorType, StepFailure, StepJob, StepOutcome};
use crate::state::{StepCounts, TaskEvent, TaskState, evaluate};
use crate::store::{Expansion, NewStep, NewTask, Resolution};
use crate::task::TaskRequest;
use crate::template::{Backoff, CompiledSchema, IdentityStrategy, RetryPolicy, TaskTemplate};
use crate::{Error, ErrorKind, Result};

/// What prompted a task re-evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleCause {
    /// The task was just created (and `start` already applied).
    Start,
    /// A step attempt finished.
    StepResult,
    /// An operator reset, resolved or completed a step.
    OperatorFix,
    /// Backed-off retries became due.
    RetryReady,
}

/// The task events that take a task from `current` to its next resting state, given the tally
/// of its steps (after newly ready steps were enqueued).
pub fn settle_events(
    current: TaskState,
    counts: &StepCounts,
    cause: SettleCause,
) -> Vec<TaskEvent> {
    if current.is_terminal() {
        return Vec::new();
    }
    let verdict = evaluate(counts);
    let mut events = Vec::with_capacity(3);
    match cause {
        SettleCause::Start => {
            // From `initializing` the table has its own events for the first evaluation.
            events.push(match verdict {
                TaskEvent::AllStepsSuccessful => TaskEvent::NoStepsFound,
                TaskEvent::ReadyStepsFound => TaskEvent::ReadyStepsFound,
                _ => TaskEvent::NoDependenciesReady,
            });
            if verdict == TaskEvent::ReadyStepsFound {
                events.push(TaskEvent::StepsEnqueued);
            }
            return events;
        }
        SettleCause::RetryReady => {
            if current == TaskState::WaitingForRetry {
                events.push(TaskEvent::RetryReady);
                events.push(TaskEvent::StepsEnqueued);
            }
            return events;
        }
        SettleCause::OperatorFix if current == TaskState::BlockedByFailures => {
            events.push(TaskEvent::OperatorFixedStep)
        }
        SettleCause::OperatorFix | SettleCause::StepResult => events.push(TaskEvent::StepResult),
    }
    events.push(verdict);
    if verdict == TaskEvent::ReadyStepsFound {
        events.push(TaskEvent::StepsEnqueued);
    }
    events
}

/// Delay before attempt `attempts + 1`, after `attempts` attempts (SPEC §5.5), before jitter.
pub fn backoff_delay_ms(policy: &RetryPolicy, attempts: u32) -> u64 {
    let n = u64::from(attempts.max(1));
    let base = policy.backoff_base_ms;
    let raw = match policy.backoff {
        Backoff::None => 0,
        Backoff::Linear => base.saturating_mul(n),
        Backoff::Exponential => {
            base.saturating_mul(1u64.checked_shl((n - 1) as u32).unwrap_or(u64::MAX))
        }
        Backoff::Fibonacci => base.saturating_mul(fibonacci(n)),
    };
    raw.min(policy.max_backoff_ms)
}

fn fibonacci(n: u64) -> u64 {
    let (mut a, mut b) = (1u64, 1u64);
    for _ in 1..n {
        let next = a.saturating_add(b);
        a = b;
        b = next;
    }
    a
}

/// Applies ±15 % uniform jitter; `unit` is a uniform sample in `[0, 1)`.
pub fn jittered(delay_ms: u64, unit: f64) -> u64 {
    let factor = 0.85 + 0.30 * unit.clamp(0.0, 1.0);
    (delay_ms as f64 * factor).round() as u64
}

/// Decides what becomes of a failed attempt: retried at some time, or failed for good.
pub fn decide_failure(
    policy: &RetryPolicy,
    attempts: u32,
    failure: StepFailure,
    now: Millis,
    unit: f64,
) -> Resolution {
    if !(failure.retryable && policy.retryable && attempts < policy.max_attempts) {
        return Resolution::Failed { failure };
    }
    let delay = match failure.retry_after_seconds {
        Some(s) if s.is_finite() && s >= 0.0 => ((s * 1000.0) as u64).min(policy.max_backoff_ms),
        _ => {
            let d = backoff_delay_ms(policy, attempts);
            if policy.jitter { jittered(d, unit) } else { d }
        }
    };
    Resolution::Retry {
        failure,
        next_attempt_at: now.saturating_add(i64::try_from(delay).unwrap_or(i64::MAX)),
    }
}

/// Turns a handler's outcome into a resolution: checks the result's shape, size and schema,
/// then applies the retry policy to failures.
pub fn resolve_outcome(
    job: &StepJob,
    outcome: StepOutcome,
    result_schema: Option<&CompiledSchema>,
    max_payload_bytes: usize,
    now: Millis,
) -> Resolution {
    let failure = match outcome {
        StepOutcome::Success { result, metadata } => {
            match check_result(&result, result_schema, max_payload_bytes) {
                Ok(()) => return Resolution::Succeeded { result, metadata },
                Err(f) => *f,
            }
        }
        StepOutcome::Failure(f) => f,
        StepOutcome::Checkpoint(_) => StepFailure::new(
            ErrorType::InvalidResult,
            "a checkpoint yield cannot be applied as a final outcome",
        ),
    };
    decide_failure(
        &job.definition.retry,
        job.attempt,
        failure,
        now,
        fastrand::f64(),
    )
}

pub(crate) fn check_result(
    result: &Value,
    schema: Option<&CompiledSchema>,
    max_bytes: usize,
) -> std::result::Result<(), Box<StepFailure>> {
    if !result.is_object() {
        return Err(Box::new(StepFailure::new(
            ErrorType::InvalidResult,
            format!(
                "a step result must be a JSON object, got {}",
                json_kind(result)
            ),
        )));
    }
    let size = serde_json::to_vec(result)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > max_bytes {
        return Err(Box::new(StepFailure::new(
            ErrorType::InvalidResult,
            format!("the step result is {size} bytes of JSON, over the limit of {max_bytes}"),
        )));
    }
    if let Some(schema) = schema {
        let v = schema.violations(result);
        if !v.is_empty() {
            let list: Vec<String> = v
                .iter()
                .map(|x| format!("{}: {}", pointer(&x.pointer), x.message))
                .collect();
            let mut f = StepFailure::new(
                ErrorType::InvalidResult,
                format!(
                    "the step result violates its result_schema: {}",
                    list.join("; ")
                ),
            );
            f.metadata = serde_json::to_value(&v).unwrap_or(Value::Null);
            return Err(Box::new(f));
        }
    }
    Ok(())
}

fn pointer(p: &str) -> &str {
    if p.is_empty() { "/" } else { p }
}

/// The JSON type name of a value, for messages.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A registered template with what every task of it needs, computed once: its content hash,
/// its JSON snapshot and its compiled input schema.
#[derive(Debug, Clone)]
pub struct PreparedTemplate {
    /// The template.
    pub template: std::sync::Arc<TaskTemplate>,
    /// Its content hash.
    pub hash: String,
    /// Its JSON form.
    pub json: std::sync::Arc<str>,
    /// Its compiled `input_schema`.
    pub input_schema: Option<std::sync::Arc<CompiledSchema>>,
}

impl PreparedTemplate {
    /// Prepares `template`, compiling its input schema.
    pub fn new(template: TaskTemplate) -> Result<Self> {
        let mut prepared = Self::snapshot(std::sync::Arc::new(template))?;
        if let Some(s) = &prepared.template.input_schema {
            let compiled = CompiledSchema::compile(s).map_err(|e| {
                Error::new(ErrorKind::Template, format!("invalid input_schema: {e}"))
            })?;
            prepared.input_schema = Some(std::sync::Arc::new(compiled));
        }
        Ok(prepared)
    }

    /// Hash and JSON of `template`, without compiling its schema.
    fn snapshot(template: std::sync::Arc<TaskTemplate>) -> Result<Self> {
        let json = serde_json::to_string(template.as_ref())
            .map_err(|e| Error::internal(format!("cannot encode template: {e}")))?;
        Ok(PreparedTemplate {
            hash: template.content_hash(),
            json: json.into(),
            template,
            input_schema: None,
        })
    }
}

/// Checks a request against its template and builds the task to insert.
pub fn plan_task(
    template: std::sync::Arc<TaskTemplate>,
    input_schema: Option<&CompiledSchema>,
    request: TaskRequest,
    max_payload_bytes: usize,
) -> Result<NewTask> {
    let prepared = PreparedTemplate::snapshot(template)?;
    plan_prepared(&prepared, input_schema, request, max_payload_bytes)
}

/// [`plan_task`] for a prepared template (its own input schema is used when `input_schema` is
/// `None`).
pub fn plan_prepared(
    prepared: &PreparedTemplate,
    input_schema: Option<&CompiledSchema>,
    request: TaskRequest,
    max_payload_bytes: usize,
) -> Result<NewTask> {
    let template = prepared.template.clone();
    let input_schema = input_schema.or(prepared.input_schema.as_deref());
    if !request.context.is_object() {
        return Err(Error::validation(format!(
            "the task context must be a JSON object, got {}",
            json_kind(&request.context)
        )));
    }
    if !(-100..=100).contains(&request.priority) {
        return Err(Error::validation(format!(
            "priority must be between -100 and 100, got {}",
            request.priority
        )));
    }
    let canonical = canonical_json(&request.context);
    if canonical.len() > max_payload_bytes {
        return Err(Error::validation(format!(
            "the task context is {} bytes of JSON, over the limit of {max_payload_bytes}",
            canonical.len()
        )));
    }
    if let Some(schema) = input_schema {
        let violations = schema.violations(&request.context);
        if !violations.is_empty() {
            let list: Vec<String> = violations
                .iter()
                .map(|v| format!("{}: {}", pointer(&v.pointer), v.message))
                .collect();
            return Err(Error::validation(format!(
                "the task context does not match the input_schema of {}: {}",
                template.key(),
                list.join("; ")
            ))
            .with_details(serde_json::json!({ "violations": violations })));
        }
    }
    let template_key = template.key();
    let (identity_hash, identity_from_key) = match (
        &request.idempotency_key,
        template.identity_strategy,
    ) {
        (Some(key), _) => (Some(sha256(&format!("{template_key}\nkey\n{key}"))), true),
        (None, IdentityStrategy::CallerProvided) => {
            return Err(Error::new(
                ErrorKind::Validation,
                format!(
                    "template {template_key} uses identity_strategy caller_provided: an idempotency_key is required"
                ),
            ));
        }
        (None, IdentityStrategy::Strict) => (
            Some(sha256(&format!("{template_key}\ncontext\n{canonical}"))),
            false,
        ),
        (None, IdentityStrategy::AlwaysUnique) => (None, false),
    };
    let initial = template.initial_step_names();
    let steps: Vec<NewStep> = initial
        .iter()
        .filter_map(|name| template.step(name))
        .map(|d| NewStep {
            uuid: new_uuid(),
            definition: d.clone(),
            inputs: Map::new(),
            batch_group: None,
        })
        .collect();
    let edges = steps
        .iter()
        .flat_map(|s| {
            s.definition
                .dependencies
                .iter()
                .filter(|p| initial.contains(p))
                .map(|p| (p.clone(), s.definition.name.clone()))
        })
        .collect();
    Ok(NewTask {
        uuid: new_uuid(),
        correlation_id: request.correlation_id.clone().unwrap_or_else(new_uuid),
        template,
        template_hash: prepared.hash.clone(),
        template_json: prepared.json.clone(),
        request,
        identity_hash,
        identity_from_key,
        steps,
        edges,
        parent: None,
    })
}

/// Adds the template steps `creates` to `x` with the edges that tie them in: from each
/// dependency (the store keeps an edge only when its parent exists), and out of each into the
/// steps that depend on it and are not created here (a waiting convergence step, say).
/// `instances` maps a `batch_worker` template to the worker steps made from it, so a step that
/// depends on the template depends on every worker.
fn add_created_steps(
    x: &mut Expansion,
    template: &TaskTemplate,
    creates: &[String],
    instances: Option<(&str, &[String])>,
) {
    for name in creates {
        let Some(def) = template.step(name) else {
            continue;
        };
        x.steps.push(NewStep {
            uuid: new_uuid(),
            definition: def.clone(),
            inputs: Map::new(),
            batch_group: None,
        });
        for parent in &def.dependencies {
            match instances {
                Some((tpl, workers)) if tpl == parent => {
                    x.edges
                        .extend(workers.iter().map(|w| (w.clone(), name.clone())));
                }
                _ => x.edges.push((parent.clone(), name.clone())),
            }
        }
        for child in template
            .steps
            .iter()
            .filter(|s| s.dependencies.contains(name))
        {
            if !creates.contains(&child.name) {
                x.edges.push((name.clone(), child.name.clone()));
            }
        }
    }
}

/// A new time-ordered id.
pub fn new_uuid() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn sha256(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// JSON with object keys sorted at every level, so equal contexts hash equally.
pub fn canonical_json(v: &Value) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(
                    keys.into_iter()
                        .map(|k| (k.clone(), sorted(&m[k])))
                        .collect(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(v).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(backoff: Backoff, base: u64, max: u64) -> RetryPolicy {
        RetryPolicy {
            backoff,
            backoff_base_ms: base,
            max_backoff_ms: max,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn backoff_curves_follow_the_spec_and_are_capped() {
        let e = policy(Backoff::Exponential, 100, 1000);
        assert_eq!(
            [1, 2, 3, 4, 5].map(|n| backoff_delay_ms(&e, n)),
            [100, 200, 400, 800, 1000]
        );
        let l = policy(Backoff::Linear, 100, 1000);
        assert_eq!([1, 2, 3].map(|n| backoff_delay_ms(&l, n)), [100, 200, 300]);
        let f = policy(Backoff::Fibonacci, 100, 10_000);
        assert_eq!(
            [1, 2, 3, 4, 5, 6].map(|n| backoff_delay_ms(&f, n)),
            [100, 100, 200, 300, 500, 800]
        );
        let n = policy(Backoff::None, 100, 1000);
        assert_eq!(backoff_delay_ms(&n, 3), 0);
        assert_eq!(
            backoff_delay_ms(&e, 200),
            1000,
            "huge attempt counts saturate, not overflow"
        );
    }

    #[test]
    fn jitter_stays_within_fifteen_percent() {
        assert_eq!(jittered(1000, 0.0), 850);
        assert_eq!(jittered(1000, 0.5), 1000);
        assert_eq!(jittered(1000, 0.999_999), 1150);
    }

    #[test]
    fn retry_decision_honours_attempts_retryability_and_retry_after() {
        let p = RetryPolicy {
            jitter: false,
            backoff_base_ms: 100,
            ..RetryPolicy::default()
        };
        let f = StepFailure::new(ErrorType::RetryableError, "x");
        assert_eq!(
            decide_failure(&p, 1, f.clone(), 1000, 0.5),
            Resolution::Retry {
                failure: f.clone(),
                next_attempt_at: 1100
            }
        );
        assert!(matches!(
            decide_failure(&p, 3, f.clone(), 0, 0.5),
            Resolution::Failed { .. }
        ));
        let perm = StepFailure::new(ErrorType::PermanentError, "x");
        assert!(matches!(
            decide_failure(&p, 1, perm, 0, 0.5),
            Resolution::Failed { .. }
        ));
        let no_retry = RetryPolicy {
            retryable: false,
            ..p.clone()
        };
        assert!(matches!(
            decide_failure(&no_retry, 1, f.clone(), 0, 0.5),
            Resolution::Failed { .. }
        ));
        let mut after = f.clone();
        after.retry_after_seconds = Some(7.0);
        assert_eq!(
            decide_failure(&p, 1, after.clone(), 0, 0.5),
            Resolution::Retry {
                failure: after.clone(),
                next_attempt_at: 7000
            }
        );
        after.retry_after_seconds = Some(3600.0);
        assert!(matches!(
            decide_failure(&p, 1, after, 0, 0.5),
            Resolution::Retry {
                next_attempt_at: 30_000,
                ..
            }
        ));
    }

    #[test]
    fn settling_walks_the_task_table() {
        let mut c = StepCounts::default();
        c.add(crate::state::StepState::Enqueued);
        assert_eq!(
            settle_events(TaskState::Initializing, &c, SettleCause::Start),
            vec![TaskEvent::ReadyStepsFound, TaskEvent::StepsEnqueued]
        );
        assert_eq!(
            settle_events(
                TaskState::Initializing,
                &StepCounts::default(),
                SettleCause::Start
            ),
            vec![TaskEvent::NoStepsFound]
        );
        let mut blocked = StepCounts::default();
        blocked.add(crate::state::StepState::Error);
        assert_eq!(
            settle_events(TaskState::StepsInProcess, &blocked, SettleCause::StepResult),
            vec![TaskEvent::StepResult, TaskEvent::PermanentFailure]
        );
        assert_eq!(
            settle_events(TaskState::BlockedByFailures, &c, SettleCause::OperatorFix),
            vec![
                TaskEvent::OperatorFixedStep,
                TaskEvent::ReadyStepsFound,
                TaskEvent::StepsEnqueued
            ]
        );
        assert!(settle_events(TaskState::Complete, &c, SettleCause::StepResult).is_empty());
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let a: Value = serde_json::json!({"b": 1, "a": {"d": 2, "c": [ {"z": 1, "y": 2} ]}});
        assert_eq!(
            canonical_json(&a),
            r#"{"a":{"c":[{"y":2,"z":1}],"d":2},"b":1}"#
        );
    }
}
