//! Persistence: one object-safe [`Store`] trait of coarse operations, each one transaction, so
//! every atomicity promise of the SPEC is a single method. The backend is picked at run time
//! from the database URL.

pub(crate) mod apply;
pub(crate) mod journal;
#[cfg(feature = "postgres")]
pub mod postgres;
pub(crate) mod rows;
pub mod sqlite;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Result;
use crate::clock::Millis;
use crate::job::{Checkpoint, StepFailure, StepJob};
use crate::state::{StepState, TaskState};
use crate::task::{Task, TaskFilter, TaskSummary, Transition};
use crate::template::{StepDefinition, TaskTemplate};

/// Opens the store named by `url`: `sqlite::memory:`, `sqlite:PATH` (or a bare path), or
/// `postgres://…` (with the `postgres` feature). The schema is migrated unless
/// `config.migrate` is off.
pub async fn open(url: &str, config: &crate::Config) -> Result<std::sync::Arc<dyn Store>> {
    if is_postgres_url(url) {
        #[cfg(feature = "postgres")]
        return Ok(std::sync::Arc::new(
            postgres::PgStore::open(url, config.pg_max_connections, config.migrate).await?,
        ));
        #[cfg(not(feature = "postgres"))]
        return Err(crate::Error::validation(
            "this build has no PostgreSQL support (cargo feature `postgres`); use an sqlite: URL",
        ));
    }
    Ok(std::sync::Arc::new(
        sqlite::SqliteStore::open(url, config.sqlite_sync).await?,
    ))
}

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// A change committed to the store, announced to every process that listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChange {
    /// Steps became ready to claim.
    Work,
    /// A task reached `state`.
    Task {
        /// The task.
        task_uuid: String,
        /// Its new state.
        state: TaskState,
    },
    /// Announcements may have been missed (the listening connection was re-made): look again.
    Resync,
}

/// A task ready to be inserted: the row, its initial steps and edges.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// The new task's id.
    pub uuid: String,
    /// The template it runs (its snapshot is stored with the task).
    pub template: std::sync::Arc<TaskTemplate>,
    /// `template.content_hash()`, computed once per template rather than once per task.
    pub template_hash: String,
    /// `template` as JSON, for the stored snapshot.
    pub template_json: std::sync::Arc<str>,
    /// The creation request (context already validated).
    pub request: crate::task::TaskRequest,
    /// Correlation id (generated when the request had none).
    pub correlation_id: String,
    /// Identity hash for de-duplication; `None` for always-unique tasks.
    pub identity_hash: Option<String>,
    /// Whether the identity came from an idempotency key (vs the strict context hash).
    pub identity_from_key: bool,
    /// Steps to create now.
    pub steps: Vec<NewStep>,
    /// `(parent name, child name)` edges among `steps`.
    pub edges: Vec<(String, String)>,
    /// For a child task started by a workflow step: that step and its task.
    pub parent: Option<ParentLink>,
}

/// The workflow step (and its task) a child task was started by (SPEC §8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct ParentLink {
    /// The parent task.
    pub task_uuid: String,
    /// The parent's `workflow` step.
    pub step_uuid: String,
}

/// A child task whose parent has something to do: its workflow step is waiting and the child
/// has ended, or the child still runs though its parent step or task is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildTask {
    /// The parent task.
    pub parent_task_uuid: String,
    /// The parent's workflow step.
    pub parent_step_uuid: String,
    /// The step's current attempt.
    pub parent_attempt: u32,
    /// The step's state.
    pub parent_step_state: StepState,
    /// The parent task's state.
    pub parent_task_state: TaskState,
    /// The child task.
    pub child_task_uuid: String,
    /// The child's state.
    pub child_state: TaskState,
}

/// A step to create.
#[derive(Debug, Clone)]
pub struct NewStep {
    /// The step's id.
    pub uuid: String,
    /// Its definition (after environment overrides).
    pub definition: StepDefinition,
    /// Step inputs (batch cursors etc.).
    pub inputs: Map<String, Value>,
    /// For a batch worker: its `batch_worker` template's name. Workers of one group run at
    /// most `batch_config.parallelism` at a time and fail together under `fail_fast`.
    pub batch_group: Option<String>,
}

/// What `create_task` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// A new task was inserted.
    New(String),
    /// A task with the same identity exists.
    Existing {
        /// Its id.
        uuid: String,
        /// True when the identity came from an idempotency key.
        by_key: bool,
    },
}

/// Which callables a claim may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallableFilter {
    /// Only these callables.
    Only(Vec<String>),
    /// Every callable except these (used to fail steps nobody can run).
    AnyExcept(Vec<String>),
    /// Only these steps (by uuid), whatever their callable: the engine completing steps that
    /// need no handler, such as a `no_batches` placeholder.
    Steps(Vec<String>),
    /// Only `workflow` steps, which the engine itself runs (SPEC §8). Every other filter
    /// leaves them out: no handler ever runs a workflow step.
    Workflows,
}

/// A claim for ready steps.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// The claiming worker.
    pub worker_id: String,
    /// Namespaces served; empty means all.
    pub namespaces: Vec<String>,
    /// Callables handled.
    pub callables: CallableFilter,
    /// Claim at most this many.
    pub limit: usize,
    /// Lease length in ms.
    pub lease_ms: i64,
    /// Timeout for steps that set none, in ms.
    pub default_timeout_ms: i64,
    /// Only steps enqueued at or before this moment (`None`: any). Lets the engine fail
    /// unknown callables only after a grace period (docs/decisions/003-unknown-callables.md).
    pub enqueued_before: Option<Millis>,
}

/// How the orchestrator resolved a finished attempt (the retry decision is already made).
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// Success with a result.
    Succeeded {
        /// The result.
        result: Value,
        /// Metadata.
        metadata: Value,
    },
    /// Failure; retry at `next_attempt_at`.
    Retry {
        /// The failure.
        failure: StepFailure,
        /// When the retry is due.
        next_attempt_at: Millis,
    },
    /// Failure for good.
    Failed {
        /// The failure.
        failure: StepFailure,
    },
}

/// Why the engine itself ends an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expiry {
    /// The attempt ran past `timeout_at`.
    Timeout,
    /// Its lease ran out: the worker died or lost the database.
    LeaseExpired,
}

/// One finished attempt to apply.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    /// The step.
    pub step_uuid: String,
    /// The attempt the result belongs to.
    pub attempt: u32,
    /// The worker reporting it, or `None` when the engine expired the attempt.
    pub worker_id: Option<String>,
    /// For engine-made results: the condition that must still hold.
    pub expiry: Option<Expiry>,
    /// What to do.
    pub resolution: Resolution,
    /// Start of the attempt's handler run, as measured by the worker.
    pub started_at: Option<Millis>,
    /// Steps the result creates in its task (a decision's branches), applied in the same
    /// transaction, and only if the result is.
    pub expansion: Option<Expansion>,
}

/// Steps a result adds to its task.
#[derive(Debug, Clone, Default)]
pub struct Expansion {
    /// The steps to create; one whose name the task already has is left as it is.
    pub steps: Vec<NewStep>,
    /// `(parent name, child name)` edges. An edge is added when both steps exist (after the
    /// new ones are in) and the child has not started yet (`pending`); others are dropped, so
    /// a step waits only for dependencies that exist.
    pub edges: Vec<(String, String)>,
}

/// Whether a completion was applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", content = "reason", rename_all = "snake_case")]
pub enum Completion {
    /// Applied.
    Accepted,
    /// Not applied, with the reason (the attempt is no longer current).
    Rejected(String),
}

/// The effect of one applied result.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishReport {
    /// The step.
    pub step_uuid: String,
    /// Its task, when the step exists.
    pub task_uuid: Option<String>,
    /// Accepted or rejected.
    pub completion: Completion,
    /// The task's state after the transaction.
    pub task_state: Option<TaskState>,
    /// The domain events the result fired (SPEC §10); the durable and broadcast ones are in
    /// the outbox already, the fast and broadcast ones are for the caller to publish.
    pub events: Vec<crate::events::DomainEvent>,
}

/// An attempt the engine must end.
#[derive(Debug, Clone)]
pub struct ExpiredAttempt {
    /// The step.
    pub step_uuid: String,
    /// The attempt.
    pub attempt: u32,
    /// Why.
    pub expiry: Expiry,
    /// The step's definition (for the retry decision).
    pub definition: StepDefinition,
}

/// An operator action (SPEC §5.9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action_type", rename_all = "snake_case")]
pub enum OperatorAction {
    /// Cancel the task and every non-terminal step.
    Cancel,
    /// Move a blocked task to `error`.
    GiveUp,
    /// Move a blocked task to `resolved_manually`.
    ResolveManually,
    /// Put a failed step back to `pending` with attempts reset.
    ResetStep {
        /// Step name or uuid.
        step: String,
    },
    /// Mark a step `resolved_manually`.
    ResolveStep {
        /// Step name or uuid.
        step: String,
    },
    /// Mark a step `complete` with an operator-given result.
    CompleteStep {
        /// Step name or uuid.
        step: String,
        /// The result dependents see.
        result: Value,
    },
}

/// A completion that arrived for an attempt that was no longer current.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct RejectedCompletion {
    /// The step.
    pub step_uuid: String,
    /// The attempt the late result was for.
    pub attempt: u32,
    /// Who sent it.
    pub worker_id: Option<String>,
    /// Why it was rejected.
    pub reason: String,
    /// When.
    pub created_at: Millis,
}

/// What a template registration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplatePut {
    /// First registration.
    Inserted,
    /// Same content was already registered.
    Unchanged,
    /// Different content replaced the old one (forced).
    Replaced,
}

/// The persistence port. Every method is one transaction.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Registers a template; different content under an existing key needs `force`.
    async fn put_template(&self, t: &TaskTemplate, force: bool, now: Millis)
    -> Result<TemplatePut>;
    /// A registered template; `version: None` means the newest.
    async fn get_template(
        &self,
        namespace: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<TaskTemplate>;
    /// Every registered template.
    async fn list_templates(&self) -> Result<Vec<TaskTemplate>>;
    /// The template snapshot a task runs, by content hash.
    async fn template_snapshot(&self, hash: &str) -> Result<TaskTemplate>;
    /// Inserts a task with its steps, starts it and enqueues its first steps — or returns the
    /// existing task with the same identity.
    async fn create_task(&self, task: &NewTask, actor: &str, now: Millis) -> Result<Created>;
    /// `create_task` for many tasks, then an optional claim (so a worker in the same process
    /// starts the first steps without another round trip), in one transaction where the
    /// backend can. All or none are created; on an error the caller may retry them one by one.
    async fn create_tasks(
        &self,
        tasks: &[NewTask],
        actor: &str,
        claim: Option<&ClaimRequest>,
        now: Millis,
    ) -> Result<(Vec<Created>, Vec<StepJob>)> {
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(self.create_task(t, actor, now).await?);
        }
        let jobs = match claim {
            Some(req) => self.claim(req, now).await?,
            None => Vec::new(),
        };
        Ok((out, jobs))
    }
    /// Claims ready steps in one statement and builds their jobs.
    async fn claim(&self, req: &ClaimRequest, now: Millis) -> Result<Vec<StepJob>>;
    /// Applies finished attempts, enqueues what became ready and re-evaluates their tasks.
    async fn finish(
        &self,
        results: &[AttemptResult],
        actor: &str,
        now: Millis,
    ) -> Result<Vec<FinishReport>>;
    /// `finish`, then a `claim`, in one transaction where the backend can: the worker that
    /// reports a result picks up the steps that result made ready without another round trip.
    async fn finish_and_claim(
        &self,
        results: &[AttemptResult],
        actor: &str,
        claim: &ClaimRequest,
        now: Millis,
    ) -> Result<(Vec<FinishReport>, Vec<StepJob>)> {
        let reports = self.finish(results, actor, now).await?;
        let jobs = self.claim(claim, now).await?;
        Ok((reports, jobs))
    }
    /// Stores a checkpoint for the current attempt, renews its lease to `lease_until` and
    /// moves its timeout to `timeout_at` (a re-dispatched attempt gets a fresh timeout).
    #[allow(clippy::too_many_arguments)]
    async fn checkpoint(
        &self,
        step_uuid: &str,
        attempt: u32,
        worker_id: &str,
        checkpoint: &Checkpoint,
        lease_until: Millis,
        timeout_at: Millis,
        now: Millis,
    ) -> Result<Completion>;
    /// Extends the leases of the listed `(step, attempt)`s held by `worker_id`; attempts that are
    /// no longer current are left alone.
    async fn renew_leases(
        &self,
        worker_id: &str,
        attempts: &[(String, u32)],
        lease_until: Millis,
        now: Millis,
    ) -> Result<u64>;
    /// Enqueues retries whose time has come; returns how many.
    async fn promote_due_retries(&self, actor: &str, now: Millis) -> Result<u64>;
    /// Attempts past their timeout or lease.
    async fn expired_attempts(&self, now: Millis, limit: usize) -> Result<Vec<ExpiredAttempt>>;
    /// The earliest future moment at which a retry, timeout or lease falls due.
    async fn next_due(&self) -> Result<Option<Millis>>;
    /// Applies an operator action and re-evaluates the task.
    async fn operator_action(
        &self,
        task_uuid: &str,
        action: &OperatorAction,
        actor: &str,
        reason: &str,
        now: Millis,
    ) -> Result<TaskState>;
    /// A task with its steps.
    async fn get_task(&self, task_uuid: &str) -> Result<Task>;
    /// A task's current state.
    async fn task_state(&self, task_uuid: &str) -> Result<TaskState>;
    /// Tasks matching a filter, newest first.
    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskSummary>>;
    /// A task's transitions, oldest first.
    async fn task_transitions(&self, task_uuid: &str) -> Result<Vec<Transition>>;
    /// Step transitions of a task (one step when `step` names it), oldest first.
    async fn step_transitions(
        &self,
        task_uuid: &str,
        step: Option<&str>,
    ) -> Result<Vec<Transition>>;
    /// Late completions that were rejected for a task.
    async fn rejected_completions(&self, task_uuid: &str) -> Result<Vec<RejectedCompletion>>;
    /// The bounded checkpoint history of a step (oldest first, at most 20 entries), each
    /// `{cursor, items_processed, attempt, at}`.
    async fn checkpoint_history(&self, step_uuid: &str) -> Result<Vec<Value>>;
    /// Child tasks whose parent must act (see [`ChildTask`]): ended children of waiting
    /// workflow steps, and running children whose parent step was cancelled or whose parent
    /// task has ended. At most `limit`.
    async fn workflow_children(&self, limit: usize) -> Result<Vec<ChildTask>>;
    /// Claims up to `limit` undelivered durable domain events that are due, oldest first, for
    /// delivery until `claimed_until` (SPEC §10); each claim counts a delivery attempt.
    async fn claim_events(
        &self,
        limit: usize,
        claimed_until: Millis,
        now: Millis,
    ) -> Result<Vec<crate::events::StoredEvent>>;
    /// Records delivery outcomes `(seq, outcome, retry_at)`: `Ok` marks the event delivered,
    /// `Err` keeps the error and makes it due again at `retry_at`.
    async fn record_deliveries(
        &self,
        outcomes: &[(i64, std::result::Result<(), String>, Millis)],
        now: Millis,
    ) -> Result<()>;
    /// Outbox records, in commit order (external consumers page with `after_seq`).
    async fn list_events(
        &self,
        filter: &crate::events::EventFilter,
    ) -> Result<Vec<crate::events::StoredEvent>>;
    /// When the next undelivered durable event falls due, if any.
    async fn next_event_due(&self) -> Result<Option<Millis>>;
    /// The lifecycle check (SPEC §9), in one transaction: every unfinished task past its
    /// template's `lifecycle` limits (read from the template snapshot it runs) or, when
    /// `staleness_threshold_ms` is given, without progress for longer than that (see
    /// [`crate::lifecycle::exceeded`] for the rules) moves to `error` by `lifecycle_exceeded`,
    /// its unfinished steps are cancelled (late results are fenced off) and a DLQ entry with
    /// the reason, the original state and a snapshot is inserted. At most `limit` tasks, oldest
    /// first; returns them.
    async fn enforce_lifecycle(
        &self,
        now: Millis,
        staleness_threshold_ms: Option<i64>,
        actor: &str,
        limit: usize,
    ) -> Result<Vec<crate::dlq::LifecycleExceeded>>;
    /// DLQ entries matching `filter`, newest first, without snapshots.
    async fn list_dlq(&self, filter: &crate::dlq::DlqFilter) -> Result<Vec<crate::dlq::DlqEntry>>;
    /// One DLQ entry with its snapshot; `not_found` for an unknown id.
    async fn get_dlq(&self, dlq_entry_uuid: &str) -> Result<crate::dlq::DlqEntry>;
    /// Counts of DLQ entries by reason, resolution status, original state and namespace.
    async fn dlq_stats(&self) -> Result<crate::dlq::DlqStats>;
    /// Records a DLQ entry's resolution (`notes`, when given, replace earlier notes); the task
    /// is not changed. `pending` re-opens an entry. Returns the updated entry.
    async fn resolve_dlq(
        &self,
        dlq_entry_uuid: &str,
        status: crate::dlq::DlqResolution,
        notes: Option<&str>,
        by: &str,
        now: Millis,
    ) -> Result<crate::dlq::DlqEntry>;
    /// Stores a new API key with the SHA-256 (hex) of its secret (see [`crate::auth`]); a
    /// duplicate `key_id` is a `conflict`.
    async fn create_api_key(&self, key: &crate::auth::ApiKey, secret_hash: &str) -> Result<()>;
    /// Every API key, revoked ones included, oldest first (never their secrets).
    async fn list_api_keys(&self) -> Result<Vec<crate::auth::ApiKey>>;
    /// Revokes a key (revoking again keeps the first time); `not_found` for an unknown id.
    /// Returns the key as it now is.
    async fn revoke_api_key(&self, key_id: &str, now: Millis) -> Result<crate::auth::ApiKey>;
    /// The key with `key_id` and the stored hash of its secret, for authentication.
    async fn find_api_key(&self, key_id: &str) -> Result<Option<(crate::auth::ApiKey, String)>>;
    /// Ready (enqueued, unclaimed) steps per namespace, with the oldest one's enqueue time.
    async fn queue_depths(&self) -> Result<Vec<crate::metrics::QueueDepth>>;
    /// Changes committed by any process, where the backend can announce them (PostgreSQL's
    /// `LISTEN`/`NOTIFY`); `None` when only this process writes (SQLite), whose own writes
    /// the engine announces itself.
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<StoreChange>> {
        None
    }
}
