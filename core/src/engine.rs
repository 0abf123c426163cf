//! The engine handle (SPEC §12a): open a store, register templates and handlers, create, run
//! and wait for tasks, act as an operator. Handlers run in-process while the handle is open.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tracing::Instrument;
use tracing::field::Empty;

use crate::clock::{Clock, Millis, SystemClock};
use crate::config::Config;
use crate::job::StepJob;
use crate::orchestrator::PreparedTemplate;
use crate::state::TaskState;
use crate::store::{Created, OperatorAction, Store, TemplatePut};
use crate::task::{Task, TaskFilter, TaskRequest, TaskSummary, Transition};
use crate::template::{CompiledSchema, TaskTemplate};
use crate::worker::{Finished, StepHandler};
use crate::{Error, ErrorKind, Result};

/// The engine handle. Cheap to clone; background work stops when [`Tasker::close`] is called
/// or the last clone is dropped.
#[derive(Clone)]
pub struct Tasker {
    pub(crate) inner: Arc<Inner>,
    _guard: Arc<ShutdownGuard>,
}

/// Background tasks hold the engine's `Inner`; this guard, held only by handles, stops them
/// when the last handle goes away.
struct ShutdownGuard(watch::Sender<bool>);

impl Drop for ShutdownGuard {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

impl std::fmt::Debug for Tasker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasker")
            .field("worker_id", &self.inner.worker_id)
            .finish()
    }
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: Config,
    pub(crate) worker_id: String,
    pub(crate) handlers: RwLock<HashMap<String, Arc<dyn StepHandler>>>,
    /// Callables served by dispatch-port workers of this process.
    pub(crate) port_callables: RwLock<HashMap<String, usize>>,
    pub(crate) schemas: Mutex<HashMap<String, Arc<CompiledSchema>>>,
    /// Template snapshots that tasks run, by content hash (immutable, so kept).
    pub(crate) snapshots: Mutex<HashMap<String, Arc<TaskTemplate>>>,
    /// Templates recently read for task creation, by (namespace, name, version asked for).
    pub(crate) templates: Mutex<HashMap<TemplateKey, (Arc<PreparedTemplate>, std::time::Instant)>>,
    /// Bumped whenever steps may have become claimable.
    pub(crate) work: watch::Sender<u64>,
    pub(crate) sweep: Notify,
    pub(crate) watchers: Mutex<HashMap<String, watch::Sender<TaskState>>>,
    pub(crate) shutdown: watch::Sender<bool>,
    /// Attempts handed out by this process: step uuid -> (worker id, attempt).
    pub(crate) held: Mutex<HashMap<String, (String, u32)>>,
    /// Dispatch-port host threads waiting for work, whose claims ride along the next write
    /// transaction (`worker::Parked`).
    pub(crate) parked: Mutex<Vec<crate::worker::Parked>>,
    pub(crate) park_seq: std::sync::atomic::AtomicU64,
    pub(crate) results: mpsc::UnboundedSender<Finished>,
    /// Task creations on their way to the creator, which commits them in groups.
    pub(crate) creations: mpsc::UnboundedSender<crate::worker::Creation>,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) port_seq: std::sync::atomic::AtomicU64,
    /// Dispatch-port workers alive.
    pub(crate) live_ports: std::sync::atomic::AtomicUsize,
    /// Bounds how many Rust handlers run at once.
    pub(crate) permits: Arc<tokio::sync::Semaphore>,
    /// Whether this handle runs Rust handlers (`OpenOptions::background`).
    pub(crate) runs_handlers: bool,
    /// Whether the store has a single writer (SQLite): there a host thread's next claim is
    /// cheapest along its result; on PostgreSQL a claim of its own, on another connection, runs
    /// in parallel with the completer's transactions (measured: 809 against 203–277 steps/s
    /// sustained with a Python worker).
    pub(crate) single_writer: bool,
    /// Wakes the workflow-step runner ([`crate::workflow`]).
    pub(crate) workflows: Notify,
    /// Set once this process has met a template with a workflow step: from then on every
    /// task change wakes the runner (before, it only polls).
    pub(crate) workflows_seen: std::sync::atomic::AtomicBool,
    /// Domain-event subscribers of this process (SPEC §10).
    pub(crate) bus: crate::events::Bus,
    /// Wakes the durable-event delivery loop.
    pub(crate) events_wake: Notify,
    /// When the sweeper last ran the lifecycle check.
    pub(crate) lifecycle_checks: crate::lifecycle::CheckSchedule,
    /// This process's metrics.
    pub(crate) metrics: crate::metrics::Metrics,
    /// Set by [`Tasker::drain`]: no new steps are claimed.
    pub(crate) draining: std::sync::atomic::AtomicBool,
}

/// Options for [`Tasker::open_with`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Engine settings.
    pub config: Config,
    /// The clock (tests pass a `TestClock`).
    pub clock: Arc<dyn Clock>,
    /// Run the in-process worker, sweeper and lease renewal (false for a handle that only
    /// reads and acts as an operator).
    pub background: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            config: Config::default(),
            clock: Arc::new(SystemClock),
            background: true,
        }
    }
}

/// What [`Tasker::drain`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Attempts that finished (and committed) within the deadline.
    pub finished: usize,
    /// Attempts handed back unfinished (their leases ended).
    pub handed_back: usize,
}

/// A created (or re-attached) task.
#[derive(Debug, Clone)]
pub struct TaskHandle {
    /// The task's id.
    pub uuid: String,
    /// True when an existing task was returned instead of a new one.
    pub replayed: bool,
    tasker: Tasker,
}

impl TaskHandle {
    /// Waits until the task is terminal or `blocked_by_failures`; `None` waits without limit.
    pub async fn wait(&self, timeout: Option<Duration>) -> Result<Task> {
        let mut t = self.tasker.wait(&self.uuid, timeout).await?;
        t.replayed = self.replayed;
        Ok(t)
    }

    /// Waits until the task's state satisfies `done` (see [`Tasker::wait_until`]).
    pub async fn wait_until(
        &self,
        done: impl Fn(TaskState) -> bool,
        timeout: Option<Duration>,
    ) -> Result<Task> {
        self.tasker.wait_until(&self.uuid, done, timeout).await
    }

    /// The task as it is now.
    pub async fn get(&self) -> Result<Task> {
        self.tasker.get_task(&self.uuid).await
    }
}

/// Relays the changes other processes commit (where the store announces them) to this
/// process's workers and waiters, as its own changes are.
fn spawn_change_listener(inner: &Arc<Inner>) {
    let Some(mut changes) = inner.store.changes() else {
        return;
    };
    let inner = Arc::downgrade(inner);
    let mut shutdown = match inner.upgrade() {
        Some(i) => i.shutdown.subscribe(),
        None => return,
    };
    tokio::spawn(async move {
        loop {
            let change = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                c = changes.recv() => c,
            };
            let Some(inner) = inner.upgrade() else { break };
            match change {
                Ok(crate::store::StoreChange::Task { task_uuid, state }) => {
                    inner.after_change(&[(task_uuid, state)], false);
                }
                // Missed announcements: workers look for work; waiters rely on their poll.
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    inner.work.send_modify(|g| *g += 1);
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
}

impl Tasker {
    /// Opens the engine on `url` (`sqlite::memory:`, `sqlite:PATH`) with configuration from
    /// the environment. Must be called inside a tokio runtime.
    pub async fn open(url: &str) -> Result<Tasker> {
        let mut config = Config::from_env()?;
        // On a shared database another process may serve a callable this one does not know.
        if crate::store::is_postgres_url(url) {
            config.fail_unknown_callables = false;
        }
        Self::open_with(
            url,
            OpenOptions {
                config,
                ..OpenOptions::default()
            },
        )
        .await
    }

    /// Opens the engine with explicit options.
    pub async fn open_with(url: &str, options: OpenOptions) -> Result<Tasker> {
        let store = crate::store::open(url, &options.config).await?;
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let (creations_tx, creations_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            store,
            clock: options.clock,
            config: options.config.clone(),
            worker_id: format!("worker-{}", &crate::orchestrator::new_uuid()[24..]),
            handlers: RwLock::new(HashMap::new()),
            port_callables: RwLock::new(HashMap::new()),
            schemas: Mutex::new(HashMap::new()),
            snapshots: Mutex::new(HashMap::new()),
            templates: Mutex::new(HashMap::new()),
            work: watch::Sender::new(0),
            sweep: Notify::new(),
            watchers: Mutex::new(HashMap::new()),
            shutdown: watch::Sender::new(false),
            held: Mutex::new(HashMap::new()),
            parked: Mutex::new(Vec::new()),
            park_seq: std::sync::atomic::AtomicU64::new(0),
            results: results_tx,
            creations: creations_tx,
            runtime: tokio::runtime::Handle::try_current().map_err(|_| {
                Error::new(
                    ErrorKind::Internal,
                    "Tasker::open must be called inside a tokio runtime",
                )
            })?,
            port_seq: std::sync::atomic::AtomicU64::new(0),
            live_ports: std::sync::atomic::AtomicUsize::new(0),
            permits: Arc::new(tokio::sync::Semaphore::new(options.config.concurrency)),
            runs_handlers: options.background,
            single_writer: !crate::store::is_postgres_url(url),
            workflows: Notify::new(),
            workflows_seen: std::sync::atomic::AtomicBool::new(false),
            bus: crate::events::Bus::default(),
            events_wake: Notify::new(),
            lifecycle_checks: Default::default(),
            draining: std::sync::atomic::AtomicBool::new(false),
            metrics: Default::default(),
        });
        crate::worker::spawn_completer(inner.clone(), results_rx);
        crate::worker::spawn_creator(inner.clone(), creations_rx);
        spawn_change_listener(&inner);
        if options.background {
            crate::worker::spawn_background(&inner);
        }
        let guard = Arc::new(ShutdownGuard(inner.shutdown.clone()));
        Ok(Tasker {
            inner,
            _guard: guard,
        })
    }

    /// Graceful shutdown: stops claiming steps, lets the attempts this process holds finish
    /// (and their results commit) for up to `deadline`, hands the rest back — their leases are
    /// ended now, so any process re-runs them without waiting for the lease to run out — and
    /// closes the engine.
    pub async fn drain(&self, deadline: Duration) -> Result<DrainReport> {
        let inner = &self.inner;
        inner
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let held = |i: &Inner| i.held.lock().unwrap_or_else(|e| e.into_inner()).len();
        let at_start = held(inner);
        let until = tokio::time::Instant::now() + deadline;
        // Results commit through the completer, which releases each attempt: a short poll
        // of the held set is the simplest exact test.
        while held(inner) > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left: Vec<(String, String, u32)> = inner
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(step, (worker, attempt))| (worker.clone(), step.clone(), *attempt))
            .collect();
        let now = inner.clock.now();
        let mut handed_back = 0;
        for (worker, step, attempt) in &left {
            // No longer renewed by this process.
            inner.release(step, *attempt);
            handed_back += inner
                .store
                .renew_leases(worker, &[(step.clone(), *attempt)], now, now)
                .await?;
        }
        if handed_back > 0 {
            // Whoever sweeps first (this process included) ends them as a lost worker's
            // attempts, retried under the step's policy.
            if let Err(e) = crate::worker::sweep_once(inner).await {
                tracing::warn!("expiring handed-back attempts failed (another process will): {e}");
            }
        }
        self.close();
        Ok(DrainReport {
            finished: at_start.saturating_sub(left.len()),
            handed_back: handed_back as usize,
        })
    }

    /// This process's metrics and the store's queue gauges, in the Prometheus text format.
    pub async fn metrics_text(&self) -> Result<String> {
        let queues = self.inner.store.queue_depths().await?;
        Ok(self.inner.metrics.render(&queues, self.inner.clock.now()))
    }

    /// Stops background work. In-flight Rust handlers are abandoned; their leases expire.
    pub fn close(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// This process's worker id (the actor recorded on transitions).
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// The engine's configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The store (for tools and tests).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Now, by the engine's clock.
    pub fn now(&self) -> Millis {
        self.inner.clock.now()
    }

    /// Registers a Rust handler for `callable`.
    pub fn register_handler(&self, callable: impl Into<String>, handler: Arc<dyn StepHandler>) {
        self.inner
            .handlers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(callable.into(), handler);
        self.inner.work.send_modify(|g| *g += 1);
    }

    /// Callables with a Rust handler in this process.
    pub fn handler_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inner
            .handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Validates and registers a template built in code.
    pub async fn register_template(&self, t: &TaskTemplate) -> Result<TemplatePut> {
        crate::template::validate(t, None)?;
        let put = self.inner.store.put_template(t, false, self.now()).await;
        self.inner.forget_templates();
        put
    }

    /// Loads and registers every template in a file or directory (YAML, recursively). Every
    /// file is tried; all errors are reported together.
    pub async fn register_templates(&self, path: impl AsRef<Path>) -> Result<Vec<TaskTemplate>> {
        let path = path.as_ref();
        let files = crate::template::collect_yaml_files(path).map_err(|e| {
            Error::new(
                ErrorKind::Template,
                format!("cannot read templates at {}: {e}", path.display()),
            )
        })?;
        if files.is_empty() {
            return Err(Error::new(
                ErrorKind::Template,
                format!(
                    "no task template (*.yaml, *.yml) found at {}",
                    path.display()
                ),
            ));
        }
        let mut loaded = Vec::new();
        let mut errors = Vec::new();
        for f in files {
            match crate::template::load_file(&f, &self.inner.config.environment) {
                Ok(l) => {
                    for w in &l.warnings {
                        tracing::warn!("{}: {w}", f.display());
                    }
                    loaded.push(l.template)
                }
                Err(e) => errors.extend(e.0),
            }
        }
        if !errors.is_empty() {
            return Err(crate::template::TemplateErrors(errors).into());
        }
        for t in &loaded {
            let put = self.inner.store.put_template(t, false, self.now()).await;
            self.inner.forget_templates();
            put?;
        }
        Ok(loaded)
    }

    /// Creates a task, or returns the existing one with the same identity (`replayed`).
    pub async fn create_task(&self, request: TaskRequest) -> Result<TaskHandle> {
        let (uuid, replayed) = match self.inner.create_task(request, None).await? {
            Created::New(uuid) => (uuid, false),
            Created::Existing { uuid, .. } => (uuid, true),
        };
        Ok(TaskHandle {
            uuid,
            replayed,
            tasker: self.clone(),
        })
    }

    /// Creates many tasks at once: they are submitted together, so they commit in a few
    /// group transactions instead of one each. Each is created (or replayed) or refused on
    /// its own; the results are in the order of `requests`.
    pub async fn create_tasks(&self, requests: Vec<TaskRequest>) -> Vec<Result<TaskHandle>> {
        let mut set = tokio::task::JoinSet::new();
        for (i, request) in requests.into_iter().enumerate() {
            let tasker = self.clone();
            set.spawn(async move { (i, tasker.create_task(request).await) });
        }
        let mut results: Vec<Option<Result<TaskHandle>>> = (0..set.len()).map(|_| None).collect();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((i, r)) => results[i] = Some(r),
                // A creation task cannot panic short of a bug; its slot reports it below.
                Err(e) => tracing::error!("a task creation did not finish: {e}"),
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::internal("the task creation did not finish"))))
            .collect()
    }

    /// Creates a task and waits for it (terminal or blocked).
    pub async fn run_task(&self, request: TaskRequest, timeout: Option<Duration>) -> Result<Task> {
        self.create_task(request).await?.wait(timeout).await
    }

    /// Subscribes to domain events (SPEC §10) whose name matches `pattern`: `*`, a prefix
    /// such as `order.*`, or an exact name. The subscriber gets `durable` events at least once
    /// (again while it returns `Err`; de-duplicate on `event_id`) and `fast` / `broadcast`
    /// events at most once. It runs on its own task: a slow subscriber never slows steps.
    pub fn subscribe(
        &self,
        pattern: impl Into<String>,
        subscriber: Arc<dyn crate::events::EventSubscriber>,
    ) {
        self.inner
            .bus
            .subscribe(pattern.into(), subscriber, &self.inner.runtime);
        self.inner.events_wake.notify_one();
    }

    /// Outbox records of durable and broadcast events, in commit order: for external
    /// consumers (page with `after_seq`, de-duplicate on `event_id`) and for investigation.
    pub async fn domain_events(
        &self,
        filter: &crate::events::EventFilter,
    ) -> Result<Vec<crate::events::StoredEvent>> {
        self.inner.store.list_events(filter).await
    }

    /// Fast events dropped so far because a subscriber's queue was full.
    pub fn dropped_fast_events(&self) -> u64 {
        self.inner
            .bus
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A handle for an existing task.
    pub fn task(&self, uuid: impl Into<String>) -> TaskHandle {
        TaskHandle {
            uuid: uuid.into(),
            replayed: false,
            tasker: self.clone(),
        }
    }

    /// A task with its steps.
    pub async fn get_task(&self, uuid: &str) -> Result<Task> {
        self.inner.store.get_task(uuid).await
    }

    /// Tasks matching `filter`, newest first.
    pub async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskSummary>> {
        self.inner.store.list_tasks(filter).await
    }

    /// A task's transitions.
    pub async fn task_transitions(&self, uuid: &str) -> Result<Vec<Transition>> {
        self.inner.store.task_transitions(uuid).await
    }

    /// Step transitions of a task, optionally of one step (name or uuid).
    pub async fn step_transitions(
        &self,
        uuid: &str,
        step: Option<&str>,
    ) -> Result<Vec<Transition>> {
        self.inner.store.step_transitions(uuid, step).await
    }

    /// Waits until the task is terminal or `blocked_by_failures`.
    pub async fn wait(&self, uuid: &str, timeout: Option<Duration>) -> Result<Task> {
        self.wait_until(
            uuid,
            |s| s.is_terminal() || s == TaskState::BlockedByFailures,
            timeout,
        )
        .await
    }

    /// Waits until the task's state satisfies `done` (for tools and tests that act on an
    /// intermediate state, e.g. "once it waits for a retry"). A state that is passed through
    /// between two looks may be missed; terminal states never are.
    pub async fn wait_until(
        &self,
        uuid: &str,
        done: impl Fn(TaskState) -> bool,
        timeout: Option<Duration>,
    ) -> Result<Task> {
        // A timeout too large to represent is no timeout at all.
        let deadline = timeout.and_then(|t| tokio::time::Instant::now().checked_add(t));
        let mut rx = self.inner.watch(uuid);
        let mut shutdown = self.inner.shutdown.subscribe();
        // The store is asked on entry, on the polling fallback, and when a change announced in
        // this process reaches a state the caller waits for; other announced changes need no
        // query (the announcement carries the state).
        let mut ask_store = true;
        let mut state = TaskState::Pending;
        let result = loop {
            if ask_store {
                rx.mark_unchanged();
                // After an announcement that the wait is over, read the whole task at once;
                // otherwise the cheap state read decides.
                if done(state) {
                    match self.inner.store.get_task(uuid).await {
                        Ok(task) if done(task.status) => break Ok(task),
                        Ok(task) => state = task.status,
                        Err(e) => break Err(e),
                    }
                } else {
                    state = match self.inner.store.task_state(uuid).await {
                        Ok(s) => s,
                        Err(e) => break Err(e),
                    };
                    if done(state) {
                        break self.inner.store.get_task(uuid).await;
                    }
                }
            }
            let poll = tokio::time::sleep(self.inner.config.poll_interval);
            let until = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = rx.changed() => {
                    state = *rx.borrow_and_update();
                    ask_store = done(state);
                }
                _ = poll => ask_store = true,
                _ = shutdown.wait_for(|s| *s) => {
                    break Err(Error::new(ErrorKind::Shutdown, "the engine is closed"));
                }
                _ = until => {
                    break Err(Error::new(
                        ErrorKind::Timeout,
                        format!("task {uuid} is still {state} after {:?}", timeout.unwrap_or_default()),
                    ).with_details(serde_json::json!({"task_uuid": uuid, "status": state.as_str()})));
                }
            }
        };
        drop(rx);
        self.inner.unwatch(uuid);
        result
    }

    /// Applies an operator action, recording `actor` and `reason`; the task is re-evaluated
    /// at once. Returns the task's new state.
    pub async fn operator(
        &self,
        uuid: &str,
        action: OperatorAction,
        actor: &str,
        reason: &str,
    ) -> Result<TaskState> {
        let (name, step) = match &action {
            OperatorAction::Cancel => ("cancel", None),
            OperatorAction::GiveUp => ("give_up", None),
            OperatorAction::ResolveManually => ("resolve_manually", None),
            OperatorAction::ResetStep { step } => ("reset_step", Some(step.as_str())),
            OperatorAction::ResolveStep { step } => ("resolve_step", Some(step.as_str())),
            OperatorAction::CompleteStep { step, .. } => ("complete_step", Some(step.as_str())),
        };
        let span = tracing::info_span!(
            "tasker.operator",
            task_uuid = uuid,
            action = name,
            step = step,
            actor = actor,
            task_state = Empty,
            outcome = Empty,
            error = Empty,
        );
        let applied = async {
            // An operator's result reaches dependents like a handler's: same shape and size
            // rules.
            if let OperatorAction::CompleteStep { result, .. } = &action {
                crate::orchestrator::check_result(
                    result,
                    None,
                    self.inner.config.max_payload_bytes,
                )
                .map_err(|f| Error::validation(f.message))?;
            }
            self.inner
                .store
                .operator_action(uuid, &action, actor, reason, self.now())
                .await
        }
        .instrument(span.clone())
        .await;
        match &applied {
            Ok(state) => {
                span.record("task_state", state.as_str());
            }
            Err(e) => {
                span.record("outcome", "error");
                span.record("error", e.kind.code());
            }
        }
        let state = applied?;
        self.inner.after_change(&[(uuid.to_string(), state)], true);
        Ok(state)
    }

    /// Cancels a task and its unfinished steps.
    pub async fn cancel(&self, uuid: &str, reason: &str) -> Result<TaskState> {
        self.operator(uuid, OperatorAction::Cancel, "operator", reason)
            .await
    }

    /// Gives up on a blocked task (⇒ `error`).
    pub async fn give_up(&self, uuid: &str, reason: &str) -> Result<TaskState> {
        self.operator(uuid, OperatorAction::GiveUp, "operator", reason)
            .await
    }

    /// Resolves a blocked task manually.
    pub async fn resolve(&self, uuid: &str, reason: &str) -> Result<TaskState> {
        self.operator(uuid, OperatorAction::ResolveManually, "operator", reason)
            .await
    }

    /// Puts a failed step back to `pending` with its attempts reset.
    pub async fn reset_step(&self, uuid: &str, step: &str, reason: &str) -> Result<TaskState> {
        self.operator(
            uuid,
            OperatorAction::ResetStep { step: step.into() },
            "operator",
            reason,
        )
        .await
    }

    /// Marks a step resolved manually (dependents may run).
    pub async fn resolve_step(&self, uuid: &str, step: &str, reason: &str) -> Result<TaskState> {
        self.operator(
            uuid,
            OperatorAction::ResolveStep { step: step.into() },
            "operator",
            reason,
        )
        .await
    }

    /// Completes a step with an operator-given result.
    pub async fn complete_step(
        &self,
        uuid: &str,
        step: &str,
        result: serde_json::Value,
        reason: &str,
    ) -> Result<TaskState> {
        let action = OperatorAction::CompleteStep {
            step: step.into(),
            result,
        };
        self.operator(uuid, action, "operator", reason).await
    }

    /// Runs the maintenance pass now: enqueue due retries, end timed-out and lease-expired
    /// attempts, and (when `lifecycle_check_every` has passed on the engine's clock) enforce
    /// lifecycle limits. The background sweeper does this on its own; tests with a test clock
    /// call it after moving time.
    pub async fn sweep(&self) -> Result<()> {
        crate::worker::sweep_once(&self.inner).await
    }

    /// A dispatch-port worker for foreign handlers (see [`crate::worker::Worker`]).
    pub fn worker(&self, namespaces: Vec<String>, callables: Vec<String>) -> crate::worker::Worker {
        crate::worker::Worker::new(self.clone(), namespaces, callables)
    }
}

type TemplateKey = (String, String, Option<String>);

/// How long a template read for task creation is reused. Registrations through this handle
/// clear the cache at once; a forced replacement by another process is seen within this time.
const TEMPLATE_CACHE_TTL: Duration = Duration::from_secs(1);

impl Inner {
    /// Plans a task (a workflow step's child when `parent` is given) and hands it to the
    /// creator, which commits creations in groups.
    pub(crate) async fn create_task(
        &self,
        request: TaskRequest,
        parent: Option<crate::store::ParentLink>,
    ) -> Result<Created> {
        let span = tracing::info_span!(
            "tasker.task.create",
            namespace = request.namespace.as_str(),
            task_name = request.name.as_str(),
            task_uuid = Empty,
            correlation_id = Empty,
            parent_task_uuid = parent.as_ref().map(|p| p.task_uuid.as_str()),
            replayed = Empty,
            existing_task_uuid = Empty,
            outcome = Empty,
            error = Empty,
        );
        let created = self
            .plan_and_create(request, parent, &span)
            .instrument(span.clone())
            .await;
        match &created {
            Ok(Created::New(_)) => {
                span.record("replayed", false);
            }
            Ok(Created::Existing { uuid, .. }) => {
                span.record("replayed", true);
                span.record("existing_task_uuid", uuid.as_str());
            }
            Err(e) => {
                span.record("outcome", "error");
                span.record("error", e.kind.code());
            }
        }
        created
    }

    async fn plan_and_create(
        &self,
        request: TaskRequest,
        parent: Option<crate::store::ParentLink>,
        span: &tracing::Span,
    ) -> Result<Created> {
        let prepared = self
            .template(
                &request.namespace,
                &request.name,
                request.version.as_deref(),
            )
            .await?;
        let mut plan = crate::orchestrator::plan_prepared(
            &prepared,
            None,
            request,
            self.config.max_payload_bytes,
        )?;
        plan.parent = parent;
        // The task's uuid puts this span in the task's trace (see `telemetry::otlp`).
        span.record("task_uuid", plan.uuid.as_str());
        span.record("correlation_id", plan.correlation_id.as_str());
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.creations
            .send((plan, tx))
            .map_err(|_| Error::new(ErrorKind::Shutdown, "the engine is closed"))?;
        rx.await
            .map_err(|_| Error::new(ErrorKind::Shutdown, "the engine is closed"))?
    }

    /// The template a new task of `namespace/name[/version]` runs, prepared once and reused
    /// briefly: creating a task must not re-read, re-parse and re-hash its template each time.
    pub(crate) async fn template(
        &self,
        namespace: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<PreparedTemplate>> {
        let key = (
            namespace.to_string(),
            name.to_string(),
            version.map(str::to_string),
        );
        if let Some((p, at)) = self
            .templates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            && at.elapsed() < TEMPLATE_CACHE_TTL
        {
            return Ok(p.clone());
        }
        let t = self.store.get_template(namespace, name, version).await?;
        let prepared = Arc::new(PreparedTemplate::new(t)?);
        if prepared
            .template
            .steps
            .iter()
            .any(|s| s.step_type == crate::template::StepType::Workflow)
        {
            self.workflows_seen
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.templates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (prepared.clone(), std::time::Instant::now()));
        Ok(prepared)
    }

    fn forget_templates(&self) {
        self.templates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub(crate) fn schema(&self, schema: &serde_json::Value) -> Result<Arc<CompiledSchema>> {
        let key = schema.to_string();
        let mut cache = self.schemas.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = cache.get(&key) {
            return Ok(s.clone());
        }
        let compiled =
            Arc::new(CompiledSchema::compile(schema).map_err(|e| {
                Error::new(ErrorKind::Template, format!("invalid JSON Schema: {e}"))
            })?);
        cache.insert(key, compiled.clone());
        Ok(compiled)
    }

    /// The template snapshot with content hash `hash`, from the store the first time.
    pub(crate) async fn snapshot(&self, hash: &str) -> Result<Arc<TaskTemplate>> {
        if let Some(t) = self
            .snapshots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash)
        {
            return Ok(t.clone());
        }
        let t = Arc::new(self.store.template_snapshot(hash).await?);
        let mut cache = self.snapshots.lock().unwrap_or_else(|e| e.into_inner());
        // Snapshots are few; a process that somehow meets thousands starts the cache over.
        if cache.len() >= 1024 {
            cache.clear();
        }
        cache.insert(hash.to_string(), t.clone());
        Ok(t)
    }

    fn watch(&self, uuid: &str) -> watch::Receiver<TaskState> {
        let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        w.entry(uuid.to_string())
            .or_insert_with(|| watch::Sender::new(TaskState::Pending))
            .subscribe()
    }

    fn unwatch(&self, uuid: &str) {
        let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if w.get(uuid).is_some_and(|s| s.receiver_count() == 0) {
            w.remove(uuid);
        }
    }

    /// Wakes whoever may care about changed tasks: waiters, and workers (new steps) unless
    /// `wake_workers` is false because the caller knows nothing was left for them. The sweeper
    /// is woken separately, only when a retry time was set: waking it on every change would
    /// cost a write transaction per batch of results.
    pub(crate) fn after_change(&self, tasks: &[(String, TaskState)], wake_workers: bool) {
        if wake_workers {
            self.work.send_modify(|g| *g += 1);
        }
        if self
            .workflows_seen
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            self.workflows.notify_one();
        }
        let w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        for (uuid, state) in tasks {
            if let Some(tx) = w.get(uuid) {
                tx.send_replace(*state);
            }
        }
    }

    /// Applies results the engine itself made (expiries, workflow steps) and announces what
    /// they changed: events, waiters, workers.
    pub(crate) async fn finish_and_announce(
        &self,
        results: &[crate::store::AttemptResult],
    ) -> Result<Vec<crate::store::FinishReport>> {
        let reports = self
            .store
            .finish(results, &self.worker_id, self.clock.now())
            .await?;
        self.after_finish(&reports);
        let changed: Vec<_> = reports
            .iter()
            .filter_map(|r| Some((r.task_uuid.clone()?, r.task_state?)))
            .collect();
        self.after_change(&changed, true);
        Ok(reports)
    }

    /// Publishes the fast and broadcast events of committed results on the bus and wakes the
    /// delivery of durable ones. Never waits for a subscriber.
    pub(crate) fn after_finish(&self, reports: &[crate::store::FinishReport]) {
        let mut durable = false;
        for r in reports.iter().filter(|r| !r.events.is_empty()) {
            self.bus.publish(&r.events);
            durable |= r
                .events
                .iter()
                .any(|e| e.delivery_mode == crate::events::DeliveryMode::Durable);
        }
        if durable && self.bus.has_subscribers() {
            self.events_wake.notify_one();
        }
    }

    /// Whether any dispatch-port worker of this process is serving callables.
    pub(crate) fn has_port_workers(&self) -> bool {
        !self
            .port_callables
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    pub(crate) fn known_callables(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        v.extend(
            self.port_callables
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned(),
        );
        v.sort();
        v.dedup();
        v
    }

    pub(crate) fn hold(&self, job: &StepJob) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job.step_uuid.clone(), (job.worker_id.clone(), job.attempt));
    }

    pub(crate) fn release(&self, step_uuid: &str, attempt: u32) {
        let mut h = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if h.get(step_uuid).is_some_and(|(_, a)| *a == attempt) {
            h.remove(step_uuid);
        }
    }
}
