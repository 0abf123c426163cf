//! Semantic rules of SPEC §2, applied to a template however it was built.

use std::collections::HashSet;

use super::graph::Graph;
use super::model::{StepDefinition, StepType, TaskTemplate};
use super::schema::CompiledSchema;
use super::{MAX_NAMESPACE_LEN, TemplateError, TemplateErrors};

/// Longest attempt timeout a template may ask for; beyond it timestamps stop being meaningful.
pub const MAX_TIMEOUT_SECONDS: u64 = 7 * 24 * 3600;
/// Longest retry backoff a template may ask for.
pub const MAX_BACKOFF_MS: u64 = 24 * 3600 * 1000;

const EVENT_CONDITIONS: &[&str] = &[
    "success",
    "failure",
    "retryable_failure",
    "permanent_failure",
    "always",
];
const DELIVERY_MODES: &[&str] = &["durable", "fast", "broadcast"];

/// Checks `t` against every semantic rule of SPEC §2 and returns the warnings.
///
/// Usable on a template built in code as well as on one parsed from YAML (`parse_str` calls
/// it). `file` only labels the messages.
///
/// # Errors
/// Every rule that fails, all at once: duplicate step names, unknown dependencies, cycles
/// (named `a → b → a`), decision or deferred-convergence steps without dependencies, batch
/// workers without `batch_config`, `backoff_base_ms > max_backoff_ms`, a bad namespace, schemas
/// that are not valid JSON Schemas, workflow steps without `initialization.task_template`, and
/// a few sanity checks (empty names, zero timeouts or batch sizes, unknown event modes).
pub fn validate(t: &TaskTemplate, file: Option<&str>) -> Result<Vec<String>, TemplateErrors> {
    let mut v = Checker {
        file,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    v.template_fields(t);
    let labels: Vec<String> = t
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if s.name.is_empty() {
                format!("steps[{i}]")
            } else {
                s.name.clone()
            }
        })
        .collect();
    let mut seen_names: HashSet<&str> = HashSet::new();
    for (i, step) in t.steps.iter().enumerate() {
        let label = labels[i].as_str();
        if step.name.is_empty() {
            v.error(Some(label), "name", "missing required field");
        } else if !seen_names.insert(step.name.as_str()) {
            // Positions would mislead here: steps that failed to parse are not in the list.
            v.error(
                Some(label),
                "name",
                format!(
                    "duplicate step name: `{}` is declared more than once",
                    step.name
                ),
            );
        }
        v.step(t, step, label);
    }
    let graph = Graph::new(t);
    for cycle in graph.cycles() {
        let mut names: Vec<&str> = cycle.iter().map(|&i| labels[i].as_str()).collect();
        names.push(names[0]);
        v.error(
            Some(names[0]),
            "dependencies",
            format!("dependency cycle: {}", names.join(" → ")),
        );
    }
    if v.errors.is_empty() {
        Ok(v.warnings)
    } else {
        Err(TemplateErrors(v.errors))
    }
}

struct Checker<'f> {
    file: Option<&'f str>,
    errors: Vec<TemplateError>,
    warnings: Vec<String>,
}

impl Checker<'_> {
    fn error(&mut self, step: Option<&str>, field: &str, message: impl Into<String>) {
        self.errors
            .push(TemplateError::new(self.file, step, field, message));
    }

    fn warn(&mut self, step: Option<&str>, field: &str, message: impl Into<String>) {
        self.warnings
            .push(TemplateError::new(self.file, step, field, message).to_string());
    }

    fn schema(&mut self, schema: Option<&serde_json::Value>, step: Option<&str>, field: &str) {
        if let Some(schema) = schema
            && let Err(e) = CompiledSchema::compile(schema)
        {
            self.error(step, field, format!("not a valid JSON Schema: {e}"));
        }
    }

    fn template_fields(&mut self, t: &TaskTemplate) {
        if t.name.is_empty() {
            self.error(None, "name", "missing required field");
        }
        if t.version.is_empty() {
            self.error(None, "version", "missing required field");
        }
        if let Some(problem) = namespace_problem(&t.namespace) {
            self.error(None, "namespace_name", problem);
        }
        self.schema(t.input_schema.as_ref(), None, "input_schema");
        let limits = [
            ("max_duration_minutes", t.lifecycle.max_duration_minutes),
            (
                "max_waiting_for_dependencies_minutes",
                t.lifecycle.max_waiting_for_dependencies_minutes,
            ),
            (
                "max_waiting_for_retry_minutes",
                t.lifecycle.max_waiting_for_retry_minutes,
            ),
            (
                "max_steps_in_process_minutes",
                t.lifecycle.max_steps_in_process_minutes,
            ),
        ];
        for (key, limit) in limits {
            if let Some(minutes) = limit
                && !(minutes.is_finite() && minutes > 0.0)
            {
                let field = format!("lifecycle.{key}");
                let message = format!("must be a positive number of minutes, not {minutes}");
                self.error(None, &field, message);
            }
        }
    }

    fn step(&mut self, t: &TaskTemplate, step: &StepDefinition, label: &str) {
        let at = Some(label);
        if step.handler.callable.is_empty() {
            self.error(at, "handler.callable", "missing required field");
        }
        if step.handler.method.is_empty() {
            self.error(
                at,
                "handler.method",
                "must not be empty (the default is `call`)",
            );
        }
        for dep in &step.dependencies {
            if t.step(dep).is_none() {
                self.error(
                    at,
                    "dependencies",
                    format!("`{dep}` is not a step of this template"),
                );
            }
        }
        match step.step_type {
            StepType::Decision if step.dependencies.is_empty() => {
                self.error(
                    at,
                    "dependencies",
                    "a decision step needs at least one dependency",
                );
            }
            StepType::DeferredConvergence if step.dependencies.is_empty() => self.error(
                at,
                "dependencies",
                "a deferred_convergence step needs at least one dependency",
            ),
            StepType::BatchWorker => self.batch_worker(t, step, label),
            _ => {}
        }
        if step.step_type == StepType::Workflow {
            let has_template = step
                .handler
                .initialization
                .get("task_template")
                .and_then(|v| v.as_str())
                .is_some_and(|s| !s.is_empty());
            if !has_template {
                self.error(
                    at,
                    "handler.initialization.task_template",
                    "a workflow step needs the name of the template to run",
                );
            }
        }
        let retry = &step.retry;
        if retry.backoff_base_ms > retry.max_backoff_ms {
            self.error(
                at,
                "retry.backoff_base_ms",
                format!(
                    "{} is larger than max_backoff_ms ({})",
                    retry.backoff_base_ms, retry.max_backoff_ms
                ),
            );
        }
        if retry.max_attempts == 0 {
            self.warn(
                at,
                "retry.max_attempts",
                "0 is read as one attempt and no retry",
            );
        }
        if step.timeout_seconds == Some(0) {
            self.error(at, "timeout_seconds", "must be at least 1 second");
        }
        if step
            .timeout_seconds
            .is_some_and(|t| t > MAX_TIMEOUT_SECONDS)
        {
            self.error(
                at,
                "timeout_seconds",
                format!("must be at most {MAX_TIMEOUT_SECONDS} (7 days)"),
            );
        }
        if retry.max_backoff_ms > MAX_BACKOFF_MS {
            self.error(
                at,
                "retry.max_backoff_ms",
                format!("must be at most {MAX_BACKOFF_MS} (1 day)"),
            );
        }
        if let Some(batch) = &step.batch_config {
            if batch.batch_size == 0 {
                self.error(at, "batch_config.batch_size", "must be at least 1");
            }
            if batch.parallelism == 0 {
                self.error(at, "batch_config.parallelism", "must be at least 1");
            }
        }
        for (i, event) in step.publishes_events.iter().enumerate() {
            let prefix = format!("publishes_events[{i}]");
            if event.name.is_empty() {
                self.error(at, &format!("{prefix}.name"), "missing required field");
            }
            if !EVENT_CONDITIONS.contains(&event.condition.as_str()) {
                self.error(
                    at,
                    &format!("{prefix}.condition"),
                    format!(
                        "unknown value `{}` (expected one of: {})",
                        event.condition,
                        EVENT_CONDITIONS.join(", ")
                    ),
                );
            }
            if !DELIVERY_MODES.contains(&event.delivery_mode.as_str()) {
                self.error(
                    at,
                    &format!("{prefix}.delivery_mode"),
                    format!(
                        "unknown value `{}` (expected one of: {})",
                        event.delivery_mode,
                        DELIVERY_MODES.join(", ")
                    ),
                );
            }
        }
        self.schema(step.result_schema.as_ref(), at, "result_schema");
    }

    fn batch_worker(&mut self, t: &TaskTemplate, step: &StepDefinition, label: &str) {
        if step.batch_config.is_none() {
            self.error(
                Some(label),
                "batch_config",
                "a batch_worker step needs a batch_config",
            );
        }
        // Only a batchable analyzer creates workers; without one this step would never run.
        let has_analyzer = step
            .dependencies
            .iter()
            .filter_map(|d| t.step(d))
            .any(|parent| parent.step_type == StepType::Batchable);
        if !has_analyzer {
            self.warn(
                Some(label),
                "dependencies",
                "a batch_worker step should depend on the batchable step that creates its workers",
            );
        }
    }
}

/// Why `ns` is not a valid namespace, if it is not.
fn namespace_problem(ns: &str) -> Option<String> {
    if ns.is_empty() {
        return Some("missing required field".to_string());
    }
    let mut problems = Vec::new();
    let length = ns.chars().count();
    if length > MAX_NAMESPACE_LEN {
        problems.push(format!(
            "is {length} characters long (at most {MAX_NAMESPACE_LEN})"
        ));
    }
    let mut bad: Vec<char> = ns
        .chars()
        .filter(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
        .collect();
    bad.dedup();
    if !bad.is_empty() {
        let shown: Vec<String> = bad.iter().map(|c| format!("{c:?}")).collect();
        problems.push(format!(
            "contains characters outside [A-Za-z0-9_]: {}",
            shown.join(" ")
        ));
    }
    if problems.is_empty() {
        None
    } else {
        Some(format!("`{ns}` {}", problems.join(" and ")))
    }
}
