//! [`TaskTemplate`] → YAML in the current dialect (what `tasker-ctl template convert` writes).

use serde_json::Value as Json;
use serde_yaml_ng::{Mapping, Value as Yaml};

use super::model::{
    Backoff, BatchConfig, FailureStrategy, IdentityStrategy, RetryPolicy, StepDefinition,
    TaskTemplate,
};

/// Writes `t` as current-dialect YAML that [`parse_str`](super::parse_str) reads back into an
/// equal template.
///
/// The output is the resolved template: environment overrides that were applied at load time
/// are part of the steps, and no `environments` block is written. Every retry field is
/// written out, so the file does not depend on defaults. (A template built in code with
/// `max_attempts: 0` reads back as one attempt without retry, the meaning the loader gives 0.)
pub fn to_yaml(t: &TaskTemplate) -> String {
    let mut top = Mapping::new();
    put(&mut top, "name", t.name.as_str());
    put(&mut top, "namespace_name", t.namespace.as_str());
    put(&mut top, "version", t.version.as_str());
    if let Some(description) = &t.description {
        put(&mut top, "description", description.as_str());
    }
    if !t.metadata.is_null() {
        put(&mut top, "metadata", json(&t.metadata));
    }
    let identity = match t.identity_strategy {
        IdentityStrategy::Strict => "strict",
        IdentityStrategy::CallerProvided => "caller_provided",
        IdentityStrategy::AlwaysUnique => "always_unique",
    };
    put(&mut top, "identity_strategy", identity);
    if let Some(schema) = &t.input_schema {
        put(&mut top, "input_schema", json(schema));
    }
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
    let mut lifecycle = Mapping::new();
    for (key, limit) in limits {
        if let Some(minutes) = limit {
            put(&mut lifecycle, key, minutes);
        }
    }
    if !lifecycle.is_empty() {
        put(&mut top, "lifecycle", lifecycle);
    }
    if !t.domain_events.is_empty() {
        let events: Vec<Yaml> = t.domain_events.iter().map(json).collect();
        put(&mut top, "domain_events", events);
    }
    let steps: Vec<Yaml> = t.steps.iter().map(step).collect();
    put(&mut top, "steps", steps);
    // Serialising a tree of plain YAML values cannot fail; keep the signature infallible.
    serde_yaml_ng::to_string(&Yaml::Mapping(top))
        .unwrap_or_else(|e| format!("# the template could not be written as YAML: {e}\n"))
}

fn put(map: &mut Mapping, key: &str, value: impl Into<Yaml>) {
    map.insert(Yaml::from(key), value.into());
}

fn json(value: &Json) -> Yaml {
    // Every JSON value has a YAML spelling, so this conversion does not fail in practice.
    serde_yaml_ng::to_value(value).unwrap_or(Yaml::Null)
}

fn step(s: &StepDefinition) -> Yaml {
    let mut map = Mapping::new();
    put(&mut map, "name", s.name.as_str());
    if let Some(description) = &s.description {
        put(&mut map, "description", description.as_str());
    }
    put(&mut map, "type", s.step_type.as_str());
    let mut handler = Mapping::new();
    put(&mut handler, "callable", s.handler.callable.as_str());
    put(&mut handler, "method", s.handler.method.as_str());
    if let Some(resolver) = &s.handler.resolver {
        put(&mut handler, "resolver", resolver.as_str());
    }
    put(
        &mut handler,
        "initialization",
        json(&Json::Object(s.handler.initialization.clone())),
    );
    put(&mut map, "handler", handler);
    let dependencies: Vec<Yaml> = s
        .dependencies
        .iter()
        .map(|d| Yaml::from(d.as_str()))
        .collect();
    put(&mut map, "dependencies", dependencies);
    put(&mut map, "retry", retry(&s.retry));
    if let Some(timeout) = s.timeout_seconds {
        put(&mut map, "timeout_seconds", timeout);
    }
    if !s.publishes_events.is_empty() {
        let events: Vec<Yaml> = s
            .publishes_events
            .iter()
            .map(|e| {
                let mut event = Mapping::new();
                put(&mut event, "name", e.name.as_str());
                put(&mut event, "condition", e.condition.as_str());
                put(&mut event, "delivery_mode", e.delivery_mode.as_str());
                if let Some(schema) = &e.schema {
                    put(&mut event, "schema", json(schema));
                }
                if let Some(publisher) = &e.publisher {
                    put(&mut event, "publisher", publisher.as_str());
                }
                Yaml::Mapping(event)
            })
            .collect();
        put(&mut map, "publishes_events", events);
    }
    if let Some(batch) = &s.batch_config {
        put(&mut map, "batch_config", batch_config(batch));
    }
    if let Some(schema) = &s.result_schema {
        put(&mut map, "result_schema", json(schema));
    }
    Yaml::Mapping(map)
}

fn retry(r: &RetryPolicy) -> Mapping {
    let backoff = match r.backoff {
        Backoff::None => "none",
        Backoff::Linear => "linear",
        Backoff::Exponential => "exponential",
        Backoff::Fibonacci => "fibonacci",
    };
    let mut map = Mapping::new();
    put(&mut map, "retryable", r.retryable);
    put(&mut map, "max_attempts", r.max_attempts);
    put(&mut map, "backoff", backoff);
    put(&mut map, "backoff_base_ms", r.backoff_base_ms);
    put(&mut map, "max_backoff_ms", r.max_backoff_ms);
    put(&mut map, "jitter", r.jitter);
    map
}

fn batch_config(b: &BatchConfig) -> Mapping {
    let strategy = match b.failure_strategy {
        FailureStrategy::ContinueOnFailure => "continue_on_failure",
        FailureStrategy::FailFast => "fail_fast",
        FailureStrategy::Isolate => "isolate",
    };
    let mut map = Mapping::new();
    put(&mut map, "batch_size", b.batch_size);
    put(&mut map, "parallelism", b.parallelism);
    put(&mut map, "cursor_field", b.cursor_field.as_str());
    put(&mut map, "failure_strategy", strategy);
    map
}
