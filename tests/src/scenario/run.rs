//! The Rust scenario runner: one fresh in-memory engine per scenario, the kit (and any other
//! handlers the caller adds) registered, the task created, actions applied as their
//! conditions come true, and the resting state compared with the expectations.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tasker_core::template::parse_str;
use tasker_core::{Config, DlqEntry, DlqFilter, OpenOptions, Task, TaskRequest, TaskState, Tasker};
use tokio::time::Instant;

use super::compare::{compare_created_steps, compare_dlq, compare_events, compare_task};
use super::format::{Action, ActionKind, CreateError, CreateOptions, Scenario, When};

/// How often the runner looks at the task while it waits for an action's condition. Short,
/// because conditions such as "step X is in_progress" may hold only briefly.
const CONDITION_POLL: Duration = Duration::from_millis(5);

type Setup = Arc<dyn Fn(&Tasker) + Send + Sync>;

/// Runs scenarios. Cheap to clone; scenarios may run concurrently (each gets its own engine).
#[derive(Clone)]
pub struct Runner {
    base: PathBuf,
    setups: Vec<Setup>,
    config: Config,
    backend: Backend,
}

/// Where a runner's engines keep their state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A fresh in-memory SQLite database per scenario.
    SqliteMemory,
    /// A fresh database per scenario on the PostgreSQL server at this URL.
    Postgres(String),
}

impl Backend {
    /// A short name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::SqliteMemory => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    async fn database_url(&self) -> Result<String, String> {
        match self {
            Backend::SqliteMemory => Ok("sqlite::memory:".into()),
            Backend::Postgres(server) => {
                tasker_core::store::postgres::create_scratch_database(server, "tasker_test")
                    .await
                    .map_err(|e| {
                        format!(
                            "cannot create a database on {server} (`./run test` starts one): {e}"
                        )
                    })
            }
        }
    }
}

/// The result of one scenario.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The scenario's name.
    pub name: String,
    /// The task, as last seen (none when creation failed).
    pub task: Option<Task>,
    /// Every mismatch with the expectations; empty when the scenario passed.
    pub diffs: Vec<String>,
    /// How long the scenario took.
    pub elapsed: Duration,
}

impl Outcome {
    /// Whether every expectation held.
    pub fn passed(&self) -> bool {
        self.diffs.is_empty()
    }

    /// A multi-line report: the mismatches, then the task's steps as they ended.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for d in &self.diffs {
            out.push_str(&format!("    - {d}\n"));
        }
        if let Some(task) = &self.task {
            out.push_str(&format!(
                "    task {} ended {}; steps:\n",
                task.uuid, task.status
            ));
            for s in &task.steps {
                out.push_str(&format!(
                    "      {:<24} {:<36} attempts {}",
                    s.name,
                    s.state.as_str(),
                    s.attempts
                ));
                if let Some(r) = &s.result {
                    out.push_str(&format!(" result {r}"));
                }
                if let Some(e) = &s.error {
                    out.push_str(&format!(
                        " error {}/{:?}: {}",
                        e.error_type, e.error_code, e.message
                    ));
                }
                out.push('\n');
            }
        }
        out
    }
}

impl Runner {
    /// A runner resolving template paths against `base` (normally `tests/`), with the kit
    /// registered in every engine.
    pub fn new(base: impl Into<PathBuf>) -> Self {
        Runner {
            base: base.into(),
            setups: vec![Arc::new(crate::kit::register_handlers)],
            config: Self::default_config(),
            backend: Backend::SqliteMemory,
        }
    }

    /// Engine settings for scenarios: a short polling fallback so nothing waits a full second
    /// on a missed wake-up, and a lifecycle check as often (scenarios use lifecycle limits of
    /// a fraction of a minute); everything else as shipped.
    pub fn default_config() -> Config {
        Config {
            poll_interval: Duration::from_millis(50),
            lifecycle_check_every: Duration::from_millis(50),
            ..Config::default()
        }
    }

    /// Also runs `setup` on every engine (e.g. to register an example's handlers).
    pub fn with_handlers(mut self, setup: impl Fn(&Tasker) + Send + Sync + 'static) -> Self {
        self.setups.push(Arc::new(setup));
        self
    }

    /// Runs the engines on `backend`.
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Replaces the engine settings.
    pub fn with_config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Runs one scenario to its end and compares. Never panics on a scenario failure: every
    /// problem (engine errors included) becomes a line in [`Outcome::diffs`].
    pub async fn run(&self, scenario: &Scenario) -> Outcome {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(scenario.timeout_seconds);
        let mut outcome = Outcome {
            name: scenario.name.clone(),
            task: None,
            diffs: Vec::new(),
            elapsed: Duration::ZERO,
        };
        let options = OpenOptions {
            config: self.config.clone(),
            ..OpenOptions::default()
        };
        let opened = match self.backend.database_url().await {
            Ok(url) => Tasker::open_with(&url, options)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match opened {
            Ok(tasker) => {
                if let Err(e) = self.drive(&tasker, scenario, deadline, &mut outcome).await {
                    outcome.diffs.push(e);
                }
                tasker.close();
            }
            Err(e) => outcome.diffs.push(format!("cannot open the engine: {e}")),
        }
        outcome.elapsed = started.elapsed();
        outcome
    }

    /// Everything after opening the engine; `Err` is a problem that stops the scenario.
    async fn drive(
        &self,
        tasker: &Tasker,
        s: &Scenario,
        deadline: Instant,
        out: &mut Outcome,
    ) -> Result<(), String> {
        for setup in &self.setups {
            setup(tasker);
        }
        for extra in &s.extra_templates {
            self.register(tasker, extra).await?;
        }
        let (namespace, name) = self.register(tasker, &s.template).await?;
        let files = write_files(s)?;
        let context = match &files {
            Some(dir) => with_file_paths(&s.context, dir.path()),
            None => s.context.clone(),
        };
        let request = |context: &Value, o: &CreateOptions| {
            let mut r = TaskRequest::new(
                o.namespace.clone().unwrap_or_else(|| namespace.clone()),
                o.name.clone().unwrap_or_else(|| name.clone()),
                context.clone(),
            )
            .origin("conformance", "tasker-conformance", s.name.clone());
            r.version = o.version.clone();
            r.idempotency_key = o.idempotency_key.clone();
            r
        };

        // Every event id a subscriber received (for `expect.events`).
        let delivered: Arc<std::sync::Mutex<std::collections::HashSet<String>>> = Arc::default();
        if s.expect.events.is_some() {
            let d = delivered.clone();
            tasker.subscribe(
                "*",
                tasker_core::events::subscriber_fn(move |e| {
                    let d = d.clone();
                    async move {
                        d.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(e.event_id);
                        Ok(())
                    }
                }),
            );
        }
        let created = tasker.create_task(request(&context, &s.create)).await;
        if let Some(expected) = &s.expect.create_error {
            match created {
                Ok(h) => out.diffs.push(format!(
                    "create: expected a {} error, created task {}",
                    expected.kind, h.uuid
                )),
                Err(e) => compare_create_error(expected, &e, &mut out.diffs),
            }
            return Ok(());
        }
        let handle = created.map_err(|e| format!("create failed: {} ({e})", e.kind.code()))?;

        if let Some(second) = &s.second_create {
            let context = second.context.as_ref().unwrap_or(&context);
            let again = tasker
                .create_task(request(context, &second.options(&s.create)))
                .await
                .map_err(|e| format!("second create failed: {} ({e})", e.kind.code()))?;
            if let Some(e) = &s.expect.second_create {
                if let Some(r) = e.replayed
                    && again.replayed != r
                {
                    out.diffs.push(format!(
                        "second create: expected replayed {r}, found {}",
                        again.replayed
                    ));
                }
                if let Some(same) = e.same_task
                    && (again.uuid == handle.uuid) != same
                {
                    out.diffs.push(format!(
                        "second create: expected same_task {same}, got {} (first {})",
                        again.uuid, handle.uuid
                    ));
                }
            }
        }

        for (i, action) in s.actions.iter().enumerate() {
            let task = wait_for(tasker, &handle.uuid, &action.when, deadline)
                .await
                .map_err(|e| format!("actions[{i}] ({:?}): {e}", action.action))?;
            let target = match &action.child {
                None => handle.uuid.clone(),
                Some(step) => {
                    let parent = tasker
                        .get_task(&handle.uuid)
                        .await
                        .map_err(|e| e.to_string())?;
                    child_of(tasker, &parent, step)
                        .await?
                        .ok_or_else(|| format!("actions[{i}]: step {step} started no child task"))?
                        .uuid
                }
            };
            out.task = Some(task);
            apply(tasker, &target, action, &s.name)
                .await
                .map_err(|e| format!("actions[{i}] ({:?}) failed: {e}", action.action))?;
        }

        let remaining = deadline.saturating_duration_since(Instant::now());
        let task = match tasker.wait(&handle.uuid, Some(remaining)).await {
            Ok(t) => t,
            Err(e) => {
                out.task = tasker.get_task(&handle.uuid).await.ok();
                return Err(format!(
                    "the task did not come to rest within {}s: {e}",
                    s.timeout_seconds
                ));
            }
        };
        out.diffs.extend(compare_task(&s.expect, &task, |step| {
            crate::kit::executions(&task.uuid, step)
        }));
        for (step, expected) in &s.expect.child_tasks {
            match child_of(tasker, &task, step).await? {
                Some(child) => {
                    let at = format!("child of {step}: ");
                    out.diffs.extend(
                        compare_task(expected, &child, |name| {
                            crate::kit::executions(&child.uuid, name)
                        })
                        .into_iter()
                        .map(|d| format!("{at}{d}")),
                    );
                    if let Some(dlq) = &expected.dlq {
                        let entries = dlq_entries(tasker, &child.uuid).await?;
                        out.diffs.extend(
                            compare_dlq(dlq, &entries)
                                .into_iter()
                                .map(|d| format!("{at}{d}")),
                        );
                    }
                    if child.parent_correlation_id.as_deref() != Some(task.correlation_id.as_str())
                    {
                        out.diffs.push(format!(
                            "{at}parent_correlation_id {:?}, expected the task's correlation id {:?}",
                            child.parent_correlation_id, task.correlation_id
                        ));
                    }
                }
                None => out
                    .diffs
                    .push(format!("child of {step}: the step started no child task")),
            }
        }
        if let Some(expected) = &s.expect.created_steps {
            let audit = tasker
                .step_transitions(&task.uuid, None)
                .await
                .map_err(|e| format!("cannot read the audit trail: {e}"))?;
            out.diffs.extend(compare_created_steps(expected, &audit));
        }
        if let Some(expected) = &s.expect.events {
            let filter = tasker_core::events::EventFilter {
                task_uuid: Some(task.uuid.clone()),
                limit: Some(1000),
                ..Default::default()
            };
            let records = tasker
                .domain_events(&filter)
                .await
                .map_err(|e| format!("cannot read the outbox: {e}"))?;
            out.diffs.extend(compare_events(expected, &records));
            // Durable records are delivered after their commit: wait for them, within the
            // scenario's deadline.
            let durable: Vec<&tasker_core::events::StoredEvent> = records
                .iter()
                .filter(|r| r.event.delivery_mode == tasker_core::events::DeliveryMode::Durable)
                .collect();
            loop {
                let missing: Vec<&str> = {
                    let seen = delivered.lock().unwrap_or_else(|p| p.into_inner());
                    durable
                        .iter()
                        .filter(|r| !seen.contains(&r.event.event_id))
                        .map(|r| r.event.event_name.as_str())
                        .collect()
                };
                if missing.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    out.diffs.push(format!(
                        "events: durable records never reached the subscriber: {}",
                        missing.join(", ")
                    ));
                    break;
                }
                tokio::time::sleep(CONDITION_POLL).await;
            }
        }
        if let Some(expected) = &s.expect.dlq {
            out.diffs.extend(compare_dlq(
                expected,
                &dlq_entries(tasker, &task.uuid).await?,
            ));
        }
        out.task = Some(task);
        Ok(())
    }

    /// Parses, validates and registers one template; returns its namespace and name.
    async fn register(
        &self,
        tasker: &Tasker,
        t: &super::format::TemplateRef,
    ) -> Result<(String, String), String> {
        let (yaml, label) = t.yaml(&self.base)?;
        let loaded = parse_str(&yaml, Some(&label), &self.config.environment)
            .map_err(|e| format!("template: {e}"))?;
        tasker
            .register_template(&loaded.template)
            .await
            .map_err(|e| format!("registering {label}: {e}"))?;
        Ok((loaded.template.namespace, loaded.template.name))
    }
}

/// The task's DLQ entries, each read with its snapshot.
async fn dlq_entries(tasker: &Tasker, task_uuid: &str) -> Result<Vec<DlqEntry>, String> {
    let filter = DlqFilter {
        task_uuid: Some(task_uuid.to_string()),
        ..DlqFilter::default()
    };
    let listed = tasker
        .dlq_list(&filter)
        .await
        .map_err(|e| format!("cannot list the DLQ: {e}"))?;
    let mut entries = Vec::with_capacity(listed.len());
    for e in listed {
        entries.push(
            tasker
                .dlq_get(&e.dlq_entry_uuid)
                .await
                .map_err(|e| format!("cannot read a DLQ entry: {e}"))?,
        );
    }
    Ok(entries)
}

/// The child task the workflow step `step` of `task` started, if any.
async fn child_of(tasker: &Tasker, task: &Task, step: &str) -> Result<Option<Task>, String> {
    let Some(step) = task.step(step) else {
        return Ok(None);
    };
    let filter = tasker_core::TaskFilter {
        parent_task_uuid: Some(task.uuid.clone()),
        limit: Some(1000),
        ..Default::default()
    };
    let children = tasker
        .list_tasks(&filter)
        .await
        .map_err(|e| format!("cannot list child tasks: {e}"))?;
    for c in children {
        let child = tasker
            .get_task(&c.uuid)
            .await
            .map_err(|e| format!("cannot read child task {}: {e}", c.uuid))?;
        if child
            .parent
            .as_ref()
            .is_some_and(|p| p.step_uuid == step.uuid)
        {
            return Ok(Some(child));
        }
    }
    Ok(None)
}

/// Polls the task until `when` holds. Fails when the deadline passes or the task comes to
/// rest (terminal, or blocked without the condition being about that) first: it would never
/// hold then.
async fn wait_for(
    tasker: &Tasker,
    uuid: &str,
    when: &When,
    deadline: Instant,
) -> Result<Task, String> {
    loop {
        let parent = tasker.get_task(uuid).await.map_err(|e| e.to_string())?;
        // A condition about a child waits for the child to exist first; until then the
        // parent's rest ends the wait.
        let child = match &when.child {
            None => None,
            Some(step) => child_of(tasker, &parent, step).await?,
        };
        let subject = match (&when.child, child) {
            (None, _) => Some(parent.clone()),
            (Some(_), c) => c,
        };
        if let Some(task) = &subject {
            let holds = match (&when.task, &when.step, &when.state) {
                (Some(state), _, _) => task.status == *state,
                (None, Some(step), Some(state)) => {
                    task.step(step).is_some_and(|s| s.state == *state)
                }
                _ => false,
            };
            if holds {
                return Ok(task.clone());
            }
        }
        let resting = subject.as_ref().unwrap_or(&parent);
        if resting.status.is_terminal() || resting.status == TaskState::BlockedByFailures {
            return Err(format!(
                "waiting for {}, but the task came to rest in {}",
                describe(when),
                resting.status
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "waiting for {}: deadline passed with the task {}",
                describe(when),
                resting.status
            ));
        }
        tokio::time::sleep(CONDITION_POLL).await;
    }
}

fn describe(when: &When) -> String {
    let what = match (&when.task, &when.step, &when.state) {
        (Some(t), _, _) => format!("task {t}"),
        (None, Some(step), Some(state)) => format!("step {step} {state}"),
        _ => "an impossible condition".into(),
    };
    match &when.child {
        Some(step) => format!("{what} in the child of {step}"),
        None => what,
    }
}

async fn apply(
    tasker: &Tasker,
    uuid: &str,
    a: &Action,
    scenario: &str,
) -> tasker_core::Result<TaskState> {
    let reason = format!("conformance scenario {scenario}");
    let step = a.step.as_deref().unwrap_or_default();
    match a.action {
        ActionKind::CancelTask => tasker.cancel(uuid, &reason).await,
        ActionKind::GiveUp => tasker.give_up(uuid, &reason).await,
        ActionKind::ResolveTask => tasker.resolve(uuid, &reason).await,
        ActionKind::ResetStep => tasker.reset_step(uuid, step, &reason).await,
        ActionKind::ResolveStep => tasker.resolve_step(uuid, step, &reason).await,
        ActionKind::CompleteStep => {
            let result = a
                .result
                .clone()
                .unwrap_or_else(|| Value::Object(Default::default()));
            tasker.complete_step(uuid, step, result, &reason).await
        }
    }
}

fn compare_create_error(expected: &CreateError, e: &tasker_core::Error, diffs: &mut Vec<String>) {
    if e.kind.code() != expected.kind {
        diffs.push(format!(
            "create: expected a {} error, got {}: {e}",
            expected.kind,
            e.kind.code()
        ));
    }
    for s in &expected.contains {
        if !e.message.contains(s.as_str()) {
            diffs.push(format!(
                "create: expected the message to contain {s:?}, got {:?}",
                e.message
            ));
        }
    }
    if let Some(want) = &expected.pointers {
        let mut found: Vec<String> = e
            .details
            .as_ref()
            .and_then(|d| d.get("violations"))
            .and_then(Value::as_array)
            .map(|v| {
                v.iter()
                    .filter_map(|x| x.get("pointer")?.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let mut want = want.clone();
        found.sort();
        found.dedup();
        want.sort();
        if found != want {
            diffs.push(format!(
                "create: expected violation pointers {want:?}, got {found:?} (details {:?})",
                e.details
            ));
        }
    }
}

/// A directory removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the scenario's `files` into a fresh directory (none without files).
fn write_files(s: &Scenario) -> Result<Option<TempDir>, String> {
    if s.files.is_empty() {
        return Ok(None);
    }
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "tasker-scenario-{}-{}-{n}",
        s.name,
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let dir = TempDir(dir);
    for (name, file) in &s.files {
        let path = dir.path().join(name);
        std::fs::write(&path, file.content())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(Some(dir))
}

/// `context` with every string `$file/NAME` replaced by the path of `NAME` in `dir`.
fn with_file_paths(context: &Value, dir: &std::path::Path) -> Value {
    match context {
        Value::String(v) => match v.strip_prefix("$file/") {
            Some(name) => Value::String(dir.join(name).display().to_string()),
            None => context.clone(),
        },
        Value::Array(a) => Value::Array(a.iter().map(|v| with_file_paths(v, dir)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), with_file_paths(v, dir)))
                .collect(),
        ),
        other => other.clone(),
    }
}
