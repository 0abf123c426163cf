//! The scenario file format, as Rust types. Unknown keys are rejected (a misspelt expectation
//! must not silently pass) and state names parse into the engine's own enums, so a typo in a
//! state is a load error, not a failing comparison.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use tasker_core::{DlqReason, DlqResolution, StepState, TaskState};

/// One scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Unique name (conventionally the file name without extension).
    pub name: String,
    /// What the scenario checks, for people.
    #[serde(default)]
    pub description: Option<String>,
    /// The task template: an inline mapping or a path relative to `tests/`.
    pub template: TemplateRef,
    /// Further templates registered before the task is created (same forms as `template`),
    /// e.g. a same-named template in another namespace.
    #[serde(default)]
    pub extra_templates: Vec<TemplateRef>,
    /// Files the runner writes into a fresh directory before creating the task; a context
    /// string `$file/NAME` becomes the path of file `NAME`.
    #[serde(default)]
    pub files: std::collections::BTreeMap<String, GeneratedFile>,
    /// The task context (default `{}`).
    #[serde(default = "empty_object")]
    pub context: Value,
    /// Creation options of the task.
    #[serde(default)]
    pub create: CreateOptions,
    /// A second creation right after the first (before any action), of the same template:
    /// context defaults to the first one's; `version` and `idempotency_key` are its own.
    #[serde(default)]
    pub second_create: Option<SecondCreate>,
    /// Operator actions, applied in order, each once its condition holds.
    #[serde(default)]
    pub actions: Vec<Action>,
    /// The expected end state.
    #[serde(default)]
    pub expect: Expect,
    /// Overall deadline for the scenario in seconds (default 30).
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
}

/// A file a scenario has the runner generate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratedFile {
    /// A CSV file with the header `id,amount` and `csv_rows` rows `i,i` for `i` = 1..=N.
    pub csv_rows: usize,
}

impl GeneratedFile {
    /// The file's content.
    pub fn content(&self) -> String {
        let mut s = String::from("id,amount\n");
        for i in 1..=self.csv_rows {
            s.push_str(&format!("{i},{i}\n"));
        }
        s
    }
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

fn default_timeout() -> u64 {
    30
}

/// Where the template comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TemplateRef {
    /// A path relative to `tests/`.
    Path(String),
    /// The template itself, in either YAML dialect.
    Inline(serde_yaml_ng::Mapping),
}

impl TemplateRef {
    /// The template's YAML text and a label for messages; paths resolve against `base`.
    ///
    /// # Errors
    /// When the file cannot be read or the mapping cannot be written back as YAML.
    pub fn yaml(&self, base: &Path) -> Result<(String, String), String> {
        match self {
            TemplateRef::Path(p) => {
                let path = base.join(p);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read template {}: {e}", path.display()))?;
                Ok((text, path.display().to_string()))
            }
            TemplateRef::Inline(m) => serde_yaml_ng::to_string(m)
                .map(|t| (t, "inline template".to_string()))
                .map_err(|e| format!("cannot re-emit the inline template: {e}")),
        }
    }
}

/// Options of a task creation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOptions {
    /// Create in this namespace instead of the template's.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Create from this template name instead of the template's.
    #[serde(default)]
    pub name: Option<String>,
    /// Pin a template version.
    #[serde(default)]
    pub version: Option<String>,
    /// Caller-chosen identity.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// The second creation of an idempotency scenario.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecondCreate {
    /// Context of the second creation (default: the scenario's `context`).
    #[serde(default)]
    pub context: Option<Value>,
    /// Pin a template version.
    #[serde(default)]
    pub version: Option<String>,
    /// Caller-chosen identity.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

impl SecondCreate {
    /// The creation options (the template's namespace and name are those of the first).
    pub fn options(&self, first: &CreateOptions) -> CreateOptions {
        CreateOptions {
            namespace: first.namespace.clone(),
            name: first.name.clone(),
            version: self.version.clone(),
            idempotency_key: self.idempotency_key.clone(),
        }
    }
}

/// An operator action and the condition that triggers it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// When to act.
    pub when: When,
    /// What to do.
    #[serde(rename = "do")]
    pub action: ActionKind,
    /// The step acted on (step actions).
    #[serde(default)]
    pub step: Option<String>,
    /// The operator's result (`complete_step`; default `{}`).
    #[serde(default)]
    pub result: Option<Value>,
    /// Act on the child task that this workflow step started instead of the task.
    #[serde(default)]
    pub child: Option<String>,
}

/// The condition of an action: the task or one step has reached a state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    /// The task's state.
    #[serde(default)]
    pub task: Option<TaskState>,
    /// A step's name (with `state`).
    #[serde(default)]
    pub step: Option<String>,
    /// The step's state (with `step`).
    #[serde(default)]
    pub state: Option<StepState>,
    /// The condition is about the child task that this workflow step started, not the task.
    #[serde(default)]
    pub child: Option<String>,
}

/// Operator actions (SPEC §5.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// Cancel the task.
    CancelTask,
    /// Give up on a blocked task.
    GiveUp,
    /// Resolve a blocked task manually.
    ResolveTask,
    /// `reset_for_retry` a failed step.
    ResetStep,
    /// Resolve a step manually.
    ResolveStep,
    /// Complete a step with `result`.
    CompleteStep,
}

impl ActionKind {
    /// Whether the action names a step.
    pub fn needs_step(self) -> bool {
        matches!(
            self,
            ActionKind::ResetStep | ActionKind::ResolveStep | ActionKind::CompleteStep
        )
    }
}

/// What must be true at the end.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The task's final state.
    #[serde(default)]
    pub task: Option<TaskState>,
    /// Per-step expectations, by step name.
    #[serde(default)]
    pub steps: BTreeMap<String, StepExpect>,
    /// Steps that must not exist.
    #[serde(default)]
    pub absent_steps: Vec<String>,
    /// The exact number of steps of the task.
    #[serde(default)]
    pub step_count: Option<usize>,
    /// Exactly the steps created with the task, before any step ran (the others come from
    /// decisions); read from the audit trail, any order.
    #[serde(default)]
    pub created_steps: Option<Vec<String>>,
    /// How many times each named step's kit handler ran.
    #[serde(default)]
    pub executions: BTreeMap<String, usize>,
    /// The creation must fail like this (nothing else is checked then).
    #[serde(default)]
    pub create_error: Option<CreateError>,
    /// What the second creation must return.
    #[serde(default)]
    pub second_create: Option<SecondCreateExpect>,
    /// The task must have exactly one dead-letter entry (SPEC §9), matching this.
    #[serde(default)]
    pub dlq: Option<DlqExpect>,
    /// The task's domain-event outbox records (SPEC §10): for each event name, the attempts
    /// of the results that fired one, exactly (any order); names not listed must have none.
    /// Each durable record must also reach a subscriber the runner registers.
    #[serde(default)]
    pub events: Option<BTreeMap<String, Vec<u32>>>,
    /// The child task each named workflow step started (SPEC §8), checked like the task
    /// (`task`, `steps`, `step_count`, `absent_steps`, `executions`); the child must also
    /// carry the task's correlation id as its `parent_correlation_id`.
    #[serde(default)]
    pub child_tasks: BTreeMap<String, Expect>,
}

/// Expectations on the task's one DLQ entry; every given field must match.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqExpect {
    /// The limit exceeded (`max_waiting_for_retry_minutes`, `staleness`, ...).
    #[serde(default)]
    pub reason: Option<DlqReason>,
    /// The state the task was in when the limit was found exceeded.
    #[serde(default)]
    pub original_state: Option<TaskState>,
    /// The entry's resolution status.
    #[serde(default)]
    pub resolution_status: Option<DlqResolution>,
    /// Substrings the entry's message must contain.
    #[serde(default)]
    pub message_contains: Vec<String>,
    /// The entry's snapshot, subset-matched (`{task: {...}, steps: [...]}`).
    #[serde(default)]
    pub snapshot: Option<Value>,
}

/// Expectations on one step; every given field must match.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepExpect {
    /// Its state.
    #[serde(default)]
    pub state: Option<StepState>,
    /// Attempts started.
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Its result, subset-matched.
    #[serde(default)]
    pub result: Option<Value>,
    /// Its last error's type.
    #[serde(default)]
    pub error_type: Option<String>,
    /// Its last error's code.
    #[serde(default)]
    pub error_code: Option<String>,
    /// Its last error's retryability.
    #[serde(default)]
    pub retryable: Option<bool>,
    /// Substrings its last error's message must contain.
    #[serde(default)]
    pub error_contains: Vec<String>,
    /// Exactly these dependencies (names, any order): for steps a decision created, the
    /// dependencies that exist.
    #[serde(default)]
    pub dependencies: Option<Vec<String>>,
}

/// An expected creation failure.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateError {
    /// The error code (`validation_error`, `not_found`, `conflict`, ...).
    pub kind: String,
    /// Substrings the message must contain.
    #[serde(default)]
    pub contains: Vec<String>,
    /// The JSON pointers of the schema violations (`details.violations[].pointer`), any
    /// order, exactly this set; `""` is the context itself.
    #[serde(default)]
    pub pointers: Option<Vec<String>>,
}

/// What the second creation returns.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecondCreateExpect {
    /// Whether the engine replayed an existing task.
    #[serde(default)]
    pub replayed: Option<bool>,
    /// Whether it is the first creation's task.
    #[serde(default)]
    pub same_task: Option<bool>,
}

impl Scenario {
    /// Parses and checks one scenario.
    ///
    /// # Errors
    /// YAML or shape errors, and inconsistencies serde cannot see (a step action without a
    /// step, a `when` that is neither a task nor a step condition).
    pub fn from_yaml(text: &str) -> Result<Scenario, String> {
        let s: Scenario = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        if !s.context.is_object() {
            return Err("`context` must be a mapping".into());
        }
        for (i, a) in s.actions.iter().enumerate() {
            let at = format!("actions[{i}]");
            match (&a.when.task, &a.when.step, &a.when.state) {
                (Some(_), None, None) | (None, Some(_), Some(_)) => {}
                _ => {
                    return Err(format!(
                        "{at}.when: give either `task: STATE` or `step: NAME, state: STATE`"
                    ));
                }
            }
            if a.action.needs_step() != a.step.is_some() {
                return Err(format!(
                    "{at}: `step` is required for step actions and only for them"
                ));
            }
            if a.result.is_some() && a.action != ActionKind::CompleteStep {
                return Err(format!("{at}: `result` only goes with complete_step"));
            }
        }
        if s.expect.second_create.is_some() != s.second_create.is_some() {
            return Err("`second_create` and `expect.second_create` go together".into());
        }
        Ok(s)
    }

    /// Reads and parses a scenario file.
    ///
    /// # Errors
    /// As [`Scenario::from_yaml`], prefixed with the file.
    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Scenario::from_yaml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}
