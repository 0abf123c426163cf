//! `environments.<env>` blocks: per-environment overrides of step settings (SPEC §2).

use serde_json::{Map, Value};

use super::model::{RetryPolicy, StepDefinition};
use super::parse::{Cx, get, join};

/// One override entry of an `environments.<env>.steps` list.
struct StepOverride {
    /// `None` for the `ALL` entry.
    target: Option<String>,
    initialization: Option<Map<String, Value>>,
    timeout_seconds: Option<u64>,
    retry: Option<RetryPolicy>,
}

impl Cx<'_> {
    /// Checks every `environments.<name>` block, then applies the one named `env`.
    ///
    /// All blocks are checked so that a broken `production` block is caught on a developer's
    /// machine; warnings only come from the block that is applied.
    pub(super) fn environments(&mut self, v: &Value, env: &str, steps: &mut [StepDefinition]) {
        let Some(blocks) = self.mapping(v, None, "environments") else {
            return;
        };
        let names: Vec<String> = steps.iter().map(|s| s.name.clone()).collect();
        for (block_name, block) in blocks {
            let warnings_before = self.warnings.len();
            let overrides = self.environment(block_name, block, &names);
            if block_name == env {
                apply_overrides(steps, &overrides);
            } else {
                self.warnings.truncate(warnings_before);
            }
        }
    }

    fn environment(
        &mut self,
        block_name: &str,
        block: &Value,
        names: &[String],
    ) -> Vec<StepOverride> {
        let prefix = join("environments", block_name);
        let Some(map) = (match block {
            Value::Null => None,
            other => self.mapping(other, None, &prefix),
        }) else {
            return Vec::new();
        };
        self.unknown_keys(map, &["steps"], &[], None, &prefix);
        let Some(items) =
            get(map, "steps").and_then(|v| self.list(v, None, &join(&prefix, "steps")))
        else {
            return Vec::new();
        };
        let mut overrides = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let field = format!("{prefix}.steps[{i}]");
            let Some(entry) = self.mapping(item, None, &field) else {
                continue;
            };
            let target = match get(entry, "name") {
                Some(v) => self.string(v, None, &join(&field, "name")),
                None => {
                    self.missing(None, &join(&field, "name"));
                    None
                }
            };
            let Some(target) = target else { continue };
            let step = if target == "ALL" {
                None
            } else {
                Some(target.as_str())
            };
            if let Some(name) = step
                && !names.iter().any(|n| n == name)
            {
                self.error(
                    Some(name),
                    &join(&field, "name"),
                    "the environment override names a step that the template does not have",
                );
                continue;
            }
            overrides.push(self.step_override(entry, step, &field));
        }
        overrides
    }

    fn step_override(
        &mut self,
        entry: &Map<String, Value>,
        step: Option<&str>,
        field: &str,
    ) -> StepOverride {
        self.unknown_keys(
            entry,
            &["name", "handler", "timeout_seconds", "retry"],
            &[],
            step,
            field,
        );
        let initialization = get(entry, "handler")
            .and_then(|v| self.mapping(v, step, &join(field, "handler")))
            .and_then(|handler| {
                let handler_field = join(field, "handler");
                self.unknown_keys(handler, &["initialization"], &[], step, &handler_field);
                get(handler, "initialization")
                    .and_then(|v| self.mapping(v, step, &join(&handler_field, "initialization")))
                    .cloned()
            });
        let timeout_seconds = get(entry, "timeout_seconds")
            .and_then(|v| self.uint(v, step, &join(field, "timeout_seconds")));
        let retry_field = join(field, "retry");
        let retry = get(entry, "retry")
            .and_then(|v| self.mapping(v, step, &retry_field))
            .map(|m| self.retry(m, step, &retry_field));
        StepOverride {
            target: step.map(str::to_string),
            initialization,
            timeout_seconds,
            retry,
        }
    }
}

/// `ALL` entries first, then the named ones, so a named entry wins whatever the order.
fn apply_overrides(steps: &mut [StepDefinition], overrides: &[StepOverride]) {
    let ordered = overrides
        .iter()
        .filter(|o| o.target.is_none())
        .chain(overrides.iter().filter(|o| o.target.is_some()));
    for o in ordered {
        for step in steps
            .iter_mut()
            .filter(|s| o.target.as_ref().is_none_or(|t| *t == s.name))
        {
            if let Some(init) = &o.initialization {
                // Shallow merge: an override replaces whole top-level keys of the config.
                for (key, value) in init {
                    step.handler
                        .initialization
                        .insert(key.clone(), value.clone());
                }
            }
            if let Some(timeout) = o.timeout_seconds {
                step.timeout_seconds = Some(timeout);
            }
            if let Some(retry) = &o.retry {
                step.retry = retry.clone();
            }
        }
    }
}
