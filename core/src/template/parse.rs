//! YAML → [`TaskTemplate`], by hand, for both dialects of SPEC §2.
//!
//! Mapping by hand rather than deriving `Deserialize` is what lets one pass accept aliases
//! (`steps`/`step_templates`, `dependencies`/`depends_on`, ...), warn about unknown keys
//! instead of failing, and collect every type error instead of stopping at the first.

use serde_json::{Map, Value};

use super::model::{
    Backoff, BatchConfig, EventDeclaration, FailureStrategy, HandlerSpec, IdentityStrategy,
    LifecycleLimits, RetryPolicy, StepDefinition, StepType, TaskTemplate, WORKFLOW_HANDLER,
};
use super::{TemplateError, TemplateErrors};

/// What one parse produced: a template (placeholders where fields were wrong) and the problems.
pub(super) struct Parsed {
    pub template: TaskTemplate,
    pub errors: Vec<TemplateError>,
    pub warnings: Vec<String>,
}

const TOP_KEYS: &[&str] = &[
    "name",
    "namespace_name",
    "namespace",
    "version",
    "description",
    "metadata",
    "identity_strategy",
    "input_schema",
    "lifecycle",
    "domain_events",
    "environments",
    "steps",
    "step_templates",
];
/// Documented as informational: accepted without a warning and not kept.
const TOP_IGNORED: &[&str] = &["system_dependencies", "task_handler"];

const STEP_KEYS: &[&str] = &[
    "name",
    "description",
    "handler",
    "type",
    "step_type",
    "dependencies",
    "depends_on",
    "depends_on_steps",
    "depends_on_step_name",
    "retry",
    "timeout_seconds",
    "publishes_events",
    "batch_config",
    "result_schema",
];
const STEP_IGNORED: &[&str] = &["system_dependency", "lifecycle", "composition"];
/// Every spelling of a step's dependency list; all given lists are merged.
const DEPENDENCY_KEYS: &[&str] = &[
    "dependencies",
    "depends_on",
    "depends_on_steps",
    "depends_on_step_name",
];

const HANDLER_KEYS: &[&str] = &["callable", "method", "resolver", "initialization"];
const RETRY_KEYS: &[&str] = &[
    "retryable",
    "max_attempts",
    "limit",
    "backoff",
    "backoff_strategy",
    "backoff_base_ms",
    "backoff_base_seconds",
    "initial_delay",
    "max_backoff_ms",
    "max_delay",
    "jitter",
];
const BATCH_KEYS: &[&str] = &[
    "batch_size",
    "parallelism",
    "cursor_field",
    "failure_strategy",
];
/// The worker template is the step that carries the batch config, so its name is redundant.
const BATCH_IGNORED: &[&str] = &["worker_template"];
const EVENT_KEYS: &[&str] = &["name", "condition", "delivery_mode", "schema", "publisher"];
const EVENT_IGNORED: &[&str] = &["description"];

/// Parses `yaml`; `Err` only when nothing usable came out (bad YAML, top level not a mapping).
pub(super) fn parse_template(
    yaml: &str,
    file: Option<&str>,
    env: &str,
) -> Result<Parsed, TemplateErrors> {
    let mut cx = Cx {
        file,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let root = super::yaml::read_yaml(yaml, file)?;
    let Value::Object(top) = root else {
        let message = match root {
            Value::Null => "the file holds no template (empty document)".to_string(),
            other => format!(
                "the top level of a template must be a mapping, found {}",
                kind(&other)
            ),
        };
        return Err(TemplateError::new(file, None, "", message).into());
    };
    let template = cx.template(&top, env);
    Ok(Parsed {
        template,
        errors: cx.errors,
        warnings: cx.warnings,
    })
}

/// `prefix.key`, or `key` at the root.
pub(super) fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// The value under `key`, treating an explicit `null` (`key:` with nothing after it, common in
/// the corpus) the same as an absent key.
pub(super) fn get<'v>(map: &'v Map<String, Value>, key: &str) -> Option<&'v Value> {
    map.get(key).filter(|v| !v.is_null())
}

/// Parse context: where we are (file) and what went wrong so far.
pub(super) struct Cx<'f> {
    pub(super) file: Option<&'f str>,
    pub(super) errors: Vec<TemplateError>,
    pub(super) warnings: Vec<String>,
}

impl Cx<'_> {
    pub(super) fn error(&mut self, step: Option<&str>, field: &str, message: impl Into<String>) {
        self.errors
            .push(TemplateError::new(self.file, step, field, message));
    }

    pub(super) fn warn(&mut self, step: Option<&str>, field: &str, message: impl Into<String>) {
        self.warnings
            .push(TemplateError::new(self.file, step, field, message).to_string());
    }

    pub(super) fn missing(&mut self, step: Option<&str>, field: &str) {
        self.error(step, field, "missing required field");
    }

    pub(super) fn wrong_type(
        &mut self,
        step: Option<&str>,
        field: &str,
        expected: &str,
        found: &Value,
    ) {
        self.error(
            step,
            field,
            format!("expected {expected}, found {}", kind(found)),
        );
    }

    /// Warns about every key of `map` that is neither `known` nor `ignored`.
    pub(super) fn unknown_keys(
        &mut self,
        map: &Map<String, Value>,
        known: &[&str],
        ignored: &[&str],
        step: Option<&str>,
        prefix: &str,
    ) {
        for key in map.keys() {
            if !known.contains(&key.as_str()) && !ignored.contains(&key.as_str()) {
                self.warn(step, &join(prefix, key), "unknown key ignored");
            }
        }
    }

    /// The first of `names` present in `map`; warns about the others when several are given.
    pub(super) fn alias<'v>(
        &mut self,
        map: &'v Map<String, Value>,
        names: &[&'static str],
        step: Option<&str>,
        prefix: &str,
    ) -> Option<(&'static str, &'v Value)> {
        let mut found = names.iter().filter_map(|n| get(map, n).map(|v| (*n, v)));
        let first = found.next()?;
        for (other, _) in found {
            self.warn(
                step,
                &join(prefix, other),
                format!("ignored because `{}` is also given", first.0),
            );
        }
        Some(first)
    }

    pub(super) fn string(&mut self, v: &Value, step: Option<&str>, field: &str) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            other => {
                self.wrong_type(step, field, "a string", other);
                None
            }
        }
    }

    pub(super) fn opt_string(
        &mut self,
        map: &Map<String, Value>,
        key: &str,
        step: Option<&str>,
        prefix: &str,
    ) -> Option<String> {
        get(map, key).and_then(|v| self.string(v, step, &join(prefix, key)))
    }

    pub(super) fn boolean(&mut self, v: &Value, step: Option<&str>, field: &str) -> Option<bool> {
        match v {
            Value::Bool(b) => Some(*b),
            other => {
                self.wrong_type(step, field, "true or false", other);
                None
            }
        }
    }

    /// A non-negative number (fractions allowed).
    pub(super) fn number(&mut self, v: &Value, step: Option<&str>, field: &str) -> Option<f64> {
        match v.as_f64() {
            Some(f) if f >= 0.0 => Some(f),
            Some(_) => {
                self.error(step, field, "must not be negative");
                None
            }
            None => {
                self.wrong_type(step, field, "a number", v);
                None
            }
        }
    }

    /// A non-negative whole number; `30.0` is accepted as `30`.
    pub(super) fn uint(&mut self, v: &Value, step: Option<&str>, field: &str) -> Option<u64> {
        if let Some(u) = v.as_u64() {
            return Some(u);
        }
        match v.as_f64() {
            Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= u64::MAX as f64 => Some(f as u64),
            Some(f) => {
                self.error(
                    step,
                    field,
                    format!("expected a whole number ≥ 0, found {f}"),
                );
                None
            }
            None => {
                self.wrong_type(step, field, "a whole number", v);
                None
            }
        }
    }

    pub(super) fn uint32(&mut self, v: &Value, step: Option<&str>, field: &str) -> Option<u32> {
        let u = self.uint(v, step, field)?;
        match u32::try_from(u) {
            Ok(small) => Some(small),
            Err(_) => {
                self.error(step, field, format!("{u} is too large"));
                None
            }
        }
    }

    pub(super) fn mapping<'v>(
        &mut self,
        v: &'v Value,
        step: Option<&str>,
        field: &str,
    ) -> Option<&'v Map<String, Value>> {
        match v {
            Value::Object(map) => Some(map),
            other => {
                self.wrong_type(step, field, "a mapping", other);
                None
            }
        }
    }

    pub(super) fn list<'v>(
        &mut self,
        v: &'v Value,
        step: Option<&str>,
        field: &str,
    ) -> Option<&'v [Value]> {
        match v {
            Value::Array(items) => Some(items),
            other => {
                self.wrong_type(step, field, "a list", other);
                None
            }
        }
    }

    /// A `snake_case` enum value from `choices`.
    pub(super) fn choice<T: Copy>(
        &mut self,
        v: &Value,
        choices: &[(&str, T)],
        step: Option<&str>,
        field: &str,
    ) -> Option<T> {
        let text = self.string(v, step, field)?;
        if let Some((_, value)) = choices.iter().find(|(name, _)| *name == text) {
            return Some(*value);
        }
        let expected: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
        self.error(
            step,
            field,
            format!(
                "unknown value `{text}` (expected one of: {})",
                expected.join(", ")
            ),
        );
        None
    }

    fn template(&mut self, top: &Map<String, Value>, env: &str) -> TaskTemplate {
        self.unknown_keys(top, TOP_KEYS, TOP_IGNORED, None, "");
        let name = match get(top, "name") {
            Some(v) => self.string(v, None, "name").unwrap_or_default(),
            None => {
                self.missing(None, "name");
                String::new()
            }
        };
        let namespace = match self.alias(top, &["namespace_name", "namespace"], None, "") {
            Some((key, v)) => self.string(v, None, key).unwrap_or_default(),
            None => {
                self.missing(None, "namespace_name");
                String::new()
            }
        };
        let version = self.version(top);
        let description = self.opt_string(top, "description", None, "");
        let metadata = top.get("metadata").cloned().unwrap_or(Value::Null);
        let identity_strategy = get(top, "identity_strategy")
            .and_then(|v| {
                self.choice(
                    v,
                    &[
                        ("strict", IdentityStrategy::Strict),
                        ("caller_provided", IdentityStrategy::CallerProvided),
                        ("always_unique", IdentityStrategy::AlwaysUnique),
                    ],
                    None,
                    "identity_strategy",
                )
            })
            .unwrap_or_default();
        let input_schema = get(top, "input_schema").cloned();
        let lifecycle = get(top, "lifecycle")
            .and_then(|v| self.mapping(v, None, "lifecycle"))
            .map(|m| self.lifecycle(m))
            .unwrap_or_default();
        let domain_events = get(top, "domain_events")
            .and_then(|v| self.list(v, None, "domain_events"))
            .map(<[Value]>::to_vec)
            .unwrap_or_default();
        let mut steps = match self.alias(top, &["steps", "step_templates"], None, "") {
            Some((key, v)) => self.steps(v, key),
            None => {
                self.missing(None, "steps");
                Vec::new()
            }
        };
        if let Some(v) = get(top, "environments") {
            self.environments(v, env, &mut steps);
        }
        TaskTemplate {
            name,
            namespace,
            version,
            description,
            metadata,
            identity_strategy,
            input_schema,
            lifecycle,
            domain_events,
            steps,
        }
    }

    fn version(&mut self, top: &Map<String, Value>) -> String {
        match get(top, "version") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => {
                let text = n.to_string();
                self.warn(
                    None,
                    "version",
                    format!(
                        "given as the number {text}; read as \"{text}\" (quote the version to keep its exact spelling)"
                    ),
                );
                text
            }
            Some(other) => {
                self.wrong_type(None, "version", "a version string", other);
                String::new()
            }
            None => {
                self.missing(None, "version");
                String::new()
            }
        }
    }

    fn lifecycle(&mut self, map: &Map<String, Value>) -> LifecycleLimits {
        // Other keys are accepted silently: lifecycle blocks in the wild carry settings we do
        // not model (`max_retries`, `backoff_multiplier`, ...), and they change no limit.
        let mut limit =
            |key: &str| get(map, key).and_then(|v| self.number(v, None, &join("lifecycle", key)));
        LifecycleLimits {
            max_duration_minutes: limit("max_duration_minutes"),
            max_waiting_for_dependencies_minutes: limit("max_waiting_for_dependencies_minutes"),
            max_waiting_for_retry_minutes: limit("max_waiting_for_retry_minutes"),
            max_steps_in_process_minutes: limit("max_steps_in_process_minutes"),
        }
    }

    fn steps(&mut self, v: &Value, key: &str) -> Vec<StepDefinition> {
        let Some(items) = self.list(v, None, key) else {
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| self.step(item, i))
            .collect()
    }

    /// One step; `None` when it has no usable name (nothing could refer to it anyway).
    fn step(&mut self, item: &Value, index: usize) -> Option<StepDefinition> {
        let position = format!("steps[{index}]");
        let map = self.mapping(item, Some(&position), "")?;
        let name = match get(map, "name") {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::String(_)) => {
                self.error(Some(&position), "name", "must not be empty");
                None
            }
            Some(other) => {
                self.wrong_type(Some(&position), "name", "a string", other);
                None
            }
            None => {
                self.missing(Some(&position), "name");
                None
            }
        };
        let label = name.clone().unwrap_or(position);
        let step = Some(label.as_str());
        self.unknown_keys(map, STEP_KEYS, STEP_IGNORED, step, "");

        let description = self.opt_string(map, "description", step, "");
        let handler = match get(map, "handler") {
            Some(v) => self.handler(v, step),
            None => {
                self.missing(step, "handler");
                HandlerSpec::default()
            }
        };
        let mut step_type = self.step_type(map, step);
        // SPEC §8: `handler.callable: WorkflowHandler` is the other way to declare one.
        if step_type == StepType::Standard && handler.callable == WORKFLOW_HANDLER {
            step_type = StepType::Workflow;
        }
        let dependencies = self.dependencies(map, step);
        let retry = match get(map, "retry") {
            Some(v) => self
                .mapping(v, step, "retry")
                .map(|m| self.retry(m, step, "retry"))
                .unwrap_or_default(),
            None => RetryPolicy::default(),
        };
        let timeout_seconds =
            get(map, "timeout_seconds").and_then(|v| self.uint(v, step, "timeout_seconds"));
        let publishes_events = get(map, "publishes_events")
            .and_then(|v| self.list(v, step, "publishes_events"))
            .map(|items| self.events(items, step))
            .unwrap_or_default();
        let batch_config = get(map, "batch_config")
            .and_then(|v| self.mapping(v, step, "batch_config"))
            .map(|m| self.batch_config(m, step));
        let result_schema = get(map, "result_schema").cloned();

        Some(StepDefinition {
            name: name?,
            description,
            handler,
            step_type,
            dependencies,
            retry,
            timeout_seconds,
            publishes_events,
            batch_config,
            result_schema,
        })
    }

    fn handler(&mut self, v: &Value, step: Option<&str>) -> HandlerSpec {
        let mut handler = HandlerSpec {
            method: "call".to_string(),
            ..HandlerSpec::default()
        };
        let Some(map) = self.mapping(v, step, "handler") else {
            return handler;
        };
        self.unknown_keys(map, HANDLER_KEYS, &[], step, "handler");
        match get(map, "callable") {
            Some(v) => {
                handler.callable = self.string(v, step, "handler.callable").unwrap_or_default()
            }
            None => self.missing(step, "handler.callable"),
        }
        if let Some(method) = self.opt_string(map, "method", step, "handler") {
            handler.method = method;
        }
        handler.resolver = self.opt_string(map, "resolver", step, "handler");
        if let Some(v) = get(map, "initialization")
            && let Some(init) = self.mapping(v, step, "handler.initialization")
        {
            handler.initialization = init.clone();
        }
        handler
    }

    fn step_type(&mut self, map: &Map<String, Value>, step: Option<&str>) -> StepType {
        const TYPES: &[(&str, StepType)] = &[
            ("standard", StepType::Standard),
            ("decision", StepType::Decision),
            ("deferred_convergence", StepType::DeferredConvergence),
            ("deferred", StepType::DeferredConvergence),
            ("batchable", StepType::Batchable),
            ("batch_worker", StepType::BatchWorker),
            ("workflow", StepType::Workflow),
        ];
        let declared: Vec<(&str, StepType)> = ["type", "step_type"]
            .into_iter()
            .filter_map(|key| {
                let v = get(map, key)?;
                self.choice(v, TYPES, step, key).map(|t| (key, t))
            })
            .collect();
        match declared.as_slice() {
            [] => StepType::Standard,
            [(_, t)] => *t,
            [(_, a), (_, b), ..] => {
                if a != b {
                    self.error(
                        step,
                        "type",
                        format!(
                            "`type: {}` contradicts `step_type: {}`",
                            a.as_str(),
                            b.as_str()
                        ),
                    );
                }
                *a
            }
        }
    }

    fn dependencies(&mut self, map: &Map<String, Value>, step: Option<&str>) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for key in DEPENDENCY_KEYS {
            let Some(v) = get(map, key) else { continue };
            // The older dialect's `depends_on_step_name` names one step.
            let given: Vec<(String, &Value)> = match v {
                Value::String(_) => vec![(key.to_string(), v)],
                Value::Array(items) => items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| (format!("{key}[{i}]"), item))
                    .collect(),
                other => {
                    self.wrong_type(step, key, "a list of step names", other);
                    continue;
                }
            };
            for (field, item) in given {
                if let Some(dep) = self.string(item, step, &field)
                    && !names.contains(&dep)
                {
                    names.push(dep);
                }
            }
        }
        names
    }

    /// A retry block; fields it omits take the defaults of SPEC §2, except that an omitted
    /// `max_backoff_ms` is raised to a larger given base delay.
    pub(super) fn retry(
        &mut self,
        map: &Map<String, Value>,
        step: Option<&str>,
        prefix: &str,
    ) -> RetryPolicy {
        self.unknown_keys(map, RETRY_KEYS, &[], step, prefix);
        let mut policy = RetryPolicy::default();
        if let Some(v) = get(map, "retryable")
            && let Some(b) = self.boolean(v, step, &join(prefix, "retryable"))
        {
            policy.retryable = b;
        }
        if let Some((key, v)) = self.alias(map, &["max_attempts", "limit"], step, prefix)
            && let Some(n) = self.uint32(v, step, &join(prefix, key))
        {
            policy.max_attempts = n;
        }
        if let Some((key, v)) = self.alias(map, &["backoff", "backoff_strategy"], step, prefix) {
            let choices = [
                ("none", Backoff::None),
                ("linear", Backoff::Linear),
                ("exponential", Backoff::Exponential),
                ("fibonacci", Backoff::Fibonacci),
            ];
            if let Some(b) = self.choice(v, &choices, step, &join(prefix, key)) {
                policy.backoff = b;
            }
        }
        let base = ["backoff_base_ms", "backoff_base_seconds", "initial_delay"];
        if let Some(ms) = self.millis(map, &base, step, prefix) {
            policy.backoff_base_ms = ms;
        }
        match self.millis(map, &["max_backoff_ms", "max_delay"], step, prefix) {
            Some(ms) => policy.max_backoff_ms = ms,
            // A base above the default cap, with no cap given, means the author wants that
            // delay; the default cap must not turn it into an error about an unwritten field.
            None => policy.max_backoff_ms = policy.max_backoff_ms.max(policy.backoff_base_ms),
        }
        if let Some(v) = get(map, "jitter")
            && let Some(b) = self.boolean(v, step, &join(prefix, "jitter"))
        {
            policy.jitter = b;
        }
        if policy.max_attempts == 0 {
            policy.max_attempts = 1;
            policy.retryable = false;
            self.warn(
                step,
                &join(prefix, "max_attempts"),
                "0 is read as one attempt and no retry",
            );
        }
        policy
    }

    /// A delay under its first given spelling: `*_ms` keys are milliseconds, the older
    /// `*_seconds` / `initial_delay` / `max_delay` keys are seconds.
    fn millis(
        &mut self,
        map: &Map<String, Value>,
        names: &[&'static str],
        step: Option<&str>,
        prefix: &str,
    ) -> Option<u64> {
        let (key, v) = self.alias(map, names, step, prefix)?;
        let field = join(prefix, key);
        if key.ends_with("_ms") {
            self.uint(v, step, &field)
        } else {
            let seconds = self.number(v, step, &field)?;
            Some((seconds * 1000.0).round() as u64)
        }
    }

    fn events(&mut self, items: &[Value], step: Option<&str>) -> Vec<EventDeclaration> {
        let mut events = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let prefix = format!("publishes_events[{i}]");
            let Some(map) = self.mapping(item, step, &prefix) else {
                continue;
            };
            self.unknown_keys(map, EVENT_KEYS, EVENT_IGNORED, step, &prefix);
            let name = match get(map, "name") {
                Some(v) => self.string(v, step, &join(&prefix, "name")),
                None => {
                    self.missing(step, &join(&prefix, "name"));
                    None
                }
            };
            let condition = self.opt_string(map, "condition", step, &prefix);
            let delivery_mode = self.opt_string(map, "delivery_mode", step, &prefix);
            let publisher = self.opt_string(map, "publisher", step, &prefix);
            if let Some(name) = name {
                events.push(EventDeclaration {
                    name,
                    condition: condition.unwrap_or_else(|| "success".to_string()),
                    delivery_mode: delivery_mode.unwrap_or_else(|| "durable".to_string()),
                    schema: get(map, "schema").cloned(),
                    publisher,
                });
            }
        }
        events
    }

    fn batch_config(&mut self, map: &Map<String, Value>, step: Option<&str>) -> BatchConfig {
        self.unknown_keys(map, BATCH_KEYS, BATCH_IGNORED, step, "batch_config");
        let mut config = BatchConfig::default();
        if let Some(v) = get(map, "batch_size")
            && let Some(n) = self.uint(v, step, "batch_config.batch_size")
        {
            config.batch_size = n;
        }
        if let Some(v) = get(map, "parallelism")
            && let Some(n) = self.uint32(v, step, "batch_config.parallelism")
        {
            config.parallelism = n;
        }
        if let Some(field) = self.opt_string(map, "cursor_field", step, "batch_config") {
            config.cursor_field = field;
        }
        if let Some(v) = get(map, "failure_strategy") {
            let choices = [
                ("continue_on_failure", FailureStrategy::ContinueOnFailure),
                ("fail_fast", FailureStrategy::FailFast),
                ("isolate", FailureStrategy::Isolate),
            ];
            if let Some(s) = self.choice(v, &choices, step, "batch_config.failure_strategy") {
                config.failure_strategy = s;
            }
        }
        config
    }
}
