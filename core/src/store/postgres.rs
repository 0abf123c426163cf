//! The PostgreSQL backend (production mode): any number of orchestrator and worker processes,
//! on any number of machines, share one database.
//!
//! - Every method is one transaction at `READ COMMITTED`. Writes that settle a task (results,
//!   retries coming due, operator actions, the lifecycle check) first lock the rows of the
//!   tasks they touch, in a fixed order: two processes finishing the two parents of one step
//!   then see each other's commit and exactly one of them enqueues the child.
//! - The claim is one statement that skips rows other claims hold (`FOR UPDATE SKIP LOCKED`).
//! - Commits that make steps ready or change a task's state announce it with `NOTIFY`; every
//!   process listens ([`Store::changes`]) and still polls as a fallback.
//! - Decisions are made in Rust (`store::apply`); the SQL only reads and writes rows.

mod extra;
mod read;
mod write;

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use tokio::sync::broadcast;

use super::{
    AttemptResult, CallableFilter, ClaimRequest, Completion, Created, ExpiredAttempt, FinishReport,
    NewTask, OperatorAction, RejectedCompletion, Store, StoreChange, TemplatePut,
};
use crate::clock::Millis;
use crate::job::{Checkpoint, StepJob};
use crate::state::TaskState;
use crate::task::{Task, TaskFilter, TaskSummary, Transition};
use crate::template::TaskTemplate;
use crate::{Error, ErrorKind, Result};

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("postgres/0001_init.sql")),
    (2, include_str!("postgres/0002_api_keys.sql")),
];

/// Channel announcing that steps became ready (payload unused).
pub(crate) const WORK_CHANNEL: &str = "tasker_work";
/// Channel announcing task state changes (payload `task_uuid state`).
pub(crate) const TASK_CHANNEL: &str = "tasker_task";

/// Advisory lock keys (transaction-scoped): migrations, and the outbox's commit order.
const MIGRATION_LOCK: i64 = 0x7461_736b_6572_0001;
pub(crate) const OUTBOX_LOCK: i64 = 0x7461_736b_6572_0002;

/// Pooled connections idle for this long are tested before they are handed out.
const IDLE_TEST: Duration = Duration::from_secs(10);
/// How long every pooled connection is tested after the server was seen dropping one.
const SUSPICION: Duration = Duration::from_secs(10);

/// Whether the server was seen dropping connections lately (a restart, a failover, an
/// administrator's `pg_terminate_backend`): until [`SUSPICION`] has passed, every pooled
/// connection is tested before use. The rest of the time none is, which saves a round trip on
/// every database call (sqlx's own test, a ping per acquire, was one of the hot path's seven).
#[derive(Debug)]
struct Suspicion {
    base: std::time::Instant,
    /// Milliseconds after `base` until which connections are tested.
    until_ms: std::sync::atomic::AtomicU64,
}

impl Default for Suspicion {
    fn default() -> Self {
        Suspicion {
            base: std::time::Instant::now(),
            until_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Suspicion {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn raise(&self) {
        let until = self.now_ms().saturating_add(SUSPICION.as_millis() as u64);
        self.until_ms
            .fetch_max(until, std::sync::atomic::Ordering::Relaxed);
    }

    fn raised(&self) -> bool {
        self.now_ms() < self.until_ms.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Whether `e` says the connection is gone (rather than that a statement failed).
fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        // The server ends sessions with these on shutdown or termination
        // (admin_shutdown, crash_shutdown, cannot_connect_now).
        sqlx::Error::Database(d) => {
            matches!(d.code().as_deref(), Some("57P01" | "57P02" | "57P03"))
        }
        _ => false,
    }
}

/// The PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    changes: broadcast::Sender<StoreChange>,
    /// Alive while any clone of the store is; the listener stops with it.
    _alive: std::sync::Arc<()>,
    /// This store's name in work announcements (see `write::claim_and_write`).
    id: std::sync::Arc<str>,
    /// When pooled connections are tested before use (see [`Suspicion`]).
    suspicion: std::sync::Arc<Suspicion>,
}

impl PgStore {
    /// Connects to the database at `url` and migrates it (unless `migrate` is false, when a
    /// schema that is not current is an error).
    pub async fn open(url: &str, max_connections: u32, migrate: bool) -> Result<Self> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| Error::validation(format!("bad database URL: {e}")))?
            .application_name("tasker")
            // JIT compilation is for long analytic queries. The claim's recursive ancestor
            // walk is estimated at millions of rows (a recursive union is guessed, not
            // counted), which crosses the JIT thresholds: a claim that runs in 2 ms then spent
            // a second compiling itself, on every execution.
            .options([("jit", "off")])
            // Statements of variable shape are few (claim filters); keep them all prepared.
            .statement_cache_capacity(512);
        let suspicion = std::sync::Arc::new(Suspicion::default());
        let check = suspicion.clone();
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            // A connection the server dropped (a restart) is found out before it is handed
            // out, but a test costs a round trip: only connections idle for long, or all of
            // them while the server was seen dropping connections, are tested.
            .test_before_acquire(false)
            .before_acquire(move |conn, meta| {
                let test = meta.idle_for >= IDLE_TEST || check.raised();
                Box::pin(async move {
                    if test {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| open_error(url, e))?;
        let (changes, _) = broadcast::channel(1024);
        let store = PgStore {
            pool,
            changes,
            _alive: std::sync::Arc::new(()),
            id: crate::orchestrator::new_uuid().into(),
            suspicion,
        };
        if migrate {
            store.migrate().await?;
        } else {
            store.check_schema().await?;
        }
        store.spawn_listener();
        Ok(store)
    }

    /// Applies the migrations this build knows and the database lacks, one process at a time.
    pub async fn migrate(&self) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS tasker_migrations \
             (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM tasker_migrations")
            .fetch_all(&mut *tx)
            .await?;
        newer_schema(&applied)?;
        for (version, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            sqlx::raw_sql(*sql).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO tasker_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(version)
                .bind(crate::clock::Clock::now(&crate::clock::SystemClock))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Fails unless every migration this build knows has been applied.
    async fn check_schema(&self) -> Result<()> {
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM tasker_migrations")
            .fetch_all(&self.pool)
            .await
            .unwrap_or_default();
        newer_schema(&applied)?;
        let missing: Vec<i64> = MIGRATIONS
            .iter()
            .map(|(v, _)| *v)
            .filter(|v| !applied.contains(v))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Store,
                format!(
                    "the database schema is not current (missing migrations {missing:?}); \
                     run `tasker-ctl migrate` first"
                ),
            ))
        }
    }

    /// Listens for the changes other processes commit and re-broadcasts them. After the
    /// connection was lost (and re-made), a [`StoreChange::Resync`] tells listeners that
    /// announcements may have been missed.
    fn spawn_listener(&self) {
        let pool = self.pool.clone();
        let tx = self.changes.clone();
        let alive = std::sync::Arc::downgrade(&self._alive);
        let me = self.id.clone();
        let suspicion = self.suspicion.clone();
        tokio::spawn(async move {
            let mut listener: Option<PgListener> = None;
            while alive.strong_count() > 0 {
                let l = match listener.as_mut() {
                    Some(l) => l,
                    None => match PgListener::connect_with(&pool).await {
                        Ok(mut l) => match l.listen_all([WORK_CHANNEL, TASK_CHANNEL]).await {
                            Ok(()) => {
                                let _ = tx.send(StoreChange::Resync);
                                listener.insert(l)
                            }
                            Err(e) => {
                                tracing::warn!("cannot LISTEN: {e}");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                continue;
                            }
                        },
                        Err(e) => {
                            tracing::debug!("listener cannot connect: {e}");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    },
                };
                // Wake up now and then to notice that the store was dropped.
                let next = tokio::time::timeout(Duration::from_secs(1), l.try_recv()).await;
                match next {
                    Err(_) => {}
                    Ok(Ok(Some(n))) => {
                        let change = if n.channel() == TASK_CHANNEL {
                            let mut parts = n.payload().splitn(2, ' ');
                            match (parts.next(), parts.next().and_then(|s| s.parse().ok())) {
                                (Some(task_uuid), Some(state)) => StoreChange::Task {
                                    task_uuid: task_uuid.to_string(),
                                    state,
                                },
                                _ => continue,
                            }
                        } else if !me.is_empty() && n.payload() == &*me {
                            // This process claimed everything it could run of that work.
                            continue;
                        } else {
                            StoreChange::Work
                        };
                        let _ = tx.send(change);
                    }
                    // The connection was lost; the next call reconnects, and whatever was
                    // announced meanwhile is missed.
                    Ok(Ok(None)) => {
                        suspicion.raise();
                        let _ = tx.send(StoreChange::Resync);
                    }
                    Ok(Err(e)) => {
                        suspicion.raise();
                        tracing::debug!("listener lost its connection: {e}");
                        listener = None;
                        let _ = tx.send(StoreChange::Resync);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
    }

    /// Starts a transaction. A `BEGIN` that meets a connection the server dropped has done
    /// nothing, so it is retried (on a tested connection) instead of failing the caller.
    async fn begin(&self) -> Result<Transaction<'static, Postgres>> {
        let mut tries = 0;
        loop {
            match self.pool.begin().await {
                Ok(tx) => return Ok(tx),
                Err(e) if tries < 2 && connection_lost(&e) => {
                    self.suspicion.raise();
                    tries += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The connection pool (for tests and tools that inspect the database).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn newer_schema(applied: &[i64]) -> Result<()> {
    let newest = MIGRATIONS.iter().map(|(v, _)| *v).max().unwrap_or(0);
    match applied.iter().max() {
        Some(max) if *max > newest => Err(Error::new(
            ErrorKind::Store,
            format!("the database was migrated by a newer Tasker (schema version {max})"),
        )),
        _ => Ok(()),
    }
}

fn open_error(url: &str, e: sqlx::Error) -> Error {
    // The URL may carry a password: name only its host part.
    let shown = url.rsplit('@').next().unwrap_or(url);
    Error::new(
        ErrorKind::Store,
        format!("cannot open database {shown:?}: {e}"),
    )
}

/// The server the test suites use: `TASKER_TEST_DATABASE_URL`, else `DATABASE_URL`, else the
/// local server on the default port (`./run test` starts a throwaway one when none answers).
pub fn test_server_url() -> String {
    std::env::var("TASKER_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// Creates a new, empty database beside the one `admin_url` names (which must allow
/// `CREATE DATABASE`) and returns its URL: a scratch database for a test or a trial run.
pub async fn create_scratch_database(admin_url: &str, prefix: &str) -> Result<String> {
    use sqlx::Connection;
    let name = format!(
        "{prefix}_{}",
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..16)
            .unwrap_or("0")
    );
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .map_err(|e| open_error(admin_url, e))?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut conn)
        .await?;
    let _ = conn.close().await;
    Ok(with_database(admin_url, &name))
}

/// `url` naming database `name` instead (its query string kept).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let root = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    }
}

#[async_trait]
impl Store for PgStore {
    async fn put_template(
        &self,
        t: &TaskTemplate,
        force: bool,
        now: Millis,
    ) -> Result<TemplatePut> {
        let mut tx = self.begin().await?;
        let r = write::put_template(&mut tx, t, force, now).await?;
        tx.commit().await?;
        Ok(r)
    }

    async fn get_template(
        &self,
        namespace: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<TaskTemplate> {
        read::get_template(&self.pool, namespace, name, version).await
    }

    async fn list_templates(&self) -> Result<Vec<TaskTemplate>> {
        read::list_templates(&self.pool).await
    }

    async fn template_snapshot(&self, hash: &str) -> Result<TaskTemplate> {
        read::template_snapshot(&self.pool, hash).await
    }

    async fn create_task(&self, task: &NewTask, actor: &str, now: Millis) -> Result<Created> {
        let (mut created, _) = self
            .create_tasks(std::slice::from_ref(task), actor, None, now)
            .await?;
        created
            .pop()
            .ok_or_else(|| Error::internal("creation returned nothing"))
    }

    async fn create_tasks(
        &self,
        tasks: &[NewTask],
        actor: &str,
        claim: Option<&ClaimRequest>,
        now: Millis,
    ) -> Result<(Vec<Created>, Vec<StepJob>)> {
        let Some(claim) = claim else {
            let created = write::create_tasks_at_once(&self.pool, tasks, actor, now).await?;
            return Ok((created, Vec::new()));
        };
        let mut tx = self.begin().await?;
        let out = write::create_tasks(&mut tx, tasks, actor, claim, &self.id, now).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn claim(&self, req: &ClaimRequest, now: Millis) -> Result<Vec<StepJob>> {
        if req.limit == 0 {
            return Ok(Vec::new());
        }
        if req.callables != CallableFilter::Workflows {
            return write::claim_at_once(&self.pool, req, now).await;
        }
        let mut tx = self.begin().await?;
        let jobs = write::claim_and_flush(&mut tx, req, now).await?;
        tx.commit().await?;
        Ok(jobs)
    }

    async fn finish(
        &self,
        results: &[AttemptResult],
        actor: &str,
        now: Millis,
    ) -> Result<Vec<FinishReport>> {
        let mut tx = self.begin().await?;
        let (reports, _) = write::finish(&mut tx, results, actor, None, now).await?;
        tx.commit().await?;
        Ok(reports)
    }

    async fn finish_and_claim(
        &self,
        results: &[AttemptResult],
        actor: &str,
        claim: &ClaimRequest,
        now: Millis,
    ) -> Result<(Vec<FinishReport>, Vec<StepJob>)> {
        let mut tx = self.begin().await?;
        let out = write::finish(&mut tx, results, actor, Some((claim, &self.id)), now).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn checkpoint(
        &self,
        step_uuid: &str,
        attempt: u32,
        worker_id: &str,
        checkpoint: &Checkpoint,
        lease_until: Millis,
        timeout_at: Millis,
        now: Millis,
    ) -> Result<Completion> {
        let mut tx = self.begin().await?;
        let r = write::checkpoint(
            &mut tx,
            step_uuid,
            (attempt, worker_id),
            checkpoint,
            (lease_until, timeout_at),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(r)
    }

    async fn renew_leases(
        &self,
        worker_id: &str,
        attempts: &[(String, u32)],
        lease_until: Millis,
        now: Millis,
    ) -> Result<u64> {
        if attempts.is_empty() {
            return Ok(0);
        }
        write::renew_leases(&self.pool, worker_id, attempts, lease_until, now).await
    }

    async fn promote_due_retries(&self, actor: &str, now: Millis) -> Result<u64> {
        let mut tx = self.begin().await?;
        let n = write::promote_due_retries(&mut tx, actor, now).await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn expired_attempts(&self, now: Millis, limit: usize) -> Result<Vec<ExpiredAttempt>> {
        read::expired_attempts(&self.pool, now, limit).await
    }

    async fn next_due(&self) -> Result<Option<Millis>> {
        read::next_due(&self.pool).await
    }

    async fn operator_action(
        &self,
        task_uuid: &str,
        action: &OperatorAction,
        actor: &str,
        reason: &str,
        now: Millis,
    ) -> Result<TaskState> {
        let mut tx = self.begin().await?;
        let r = write::operator_action(&mut tx, task_uuid, action, actor, reason, now).await?;
        tx.commit().await?;
        Ok(r)
    }

    async fn get_task(&self, task_uuid: &str) -> Result<Task> {
        read::get_task(&self.pool, task_uuid).await
    }

    async fn task_state(&self, task_uuid: &str) -> Result<TaskState> {
        read::task_state(&self.pool, task_uuid).await
    }

    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskSummary>> {
        read::list_tasks(&self.pool, filter).await
    }

    async fn task_transitions(&self, task_uuid: &str) -> Result<Vec<Transition>> {
        read::task_transitions(&self.pool, task_uuid).await
    }

    async fn step_transitions(
        &self,
        task_uuid: &str,
        step: Option<&str>,
    ) -> Result<Vec<Transition>> {
        read::step_transitions(&self.pool, task_uuid, step).await
    }

    async fn rejected_completions(&self, task_uuid: &str) -> Result<Vec<RejectedCompletion>> {
        read::rejected_completions(&self.pool, task_uuid).await
    }

    async fn checkpoint_history(&self, step_uuid: &str) -> Result<Vec<serde_json::Value>> {
        read::checkpoint_history(&self.pool, step_uuid).await
    }

    async fn workflow_children(&self, limit: usize) -> Result<Vec<super::ChildTask>> {
        read::workflow_children(&self.pool, limit).await
    }

    async fn claim_events(
        &self,
        limit: usize,
        claimed_until: Millis,
        now: Millis,
    ) -> Result<Vec<crate::events::StoredEvent>> {
        extra::claim_events(&self.pool, limit, claimed_until, now).await
    }

    async fn record_deliveries(
        &self,
        outcomes: &[(i64, std::result::Result<(), String>, Millis)],
        now: Millis,
    ) -> Result<()> {
        extra::record_deliveries(&self.pool, outcomes, now).await
    }

    async fn list_events(
        &self,
        filter: &crate::events::EventFilter,
    ) -> Result<Vec<crate::events::StoredEvent>> {
        extra::list_events(&self.pool, filter).await
    }

    async fn next_event_due(&self) -> Result<Option<Millis>> {
        extra::next_event_due(&self.pool).await
    }

    async fn enforce_lifecycle(
        &self,
        now: Millis,
        staleness_threshold_ms: Option<i64>,
        actor: &str,
        limit: usize,
    ) -> Result<Vec<crate::dlq::LifecycleExceeded>> {
        let mut tx = self.begin().await?;
        let moved =
            extra::enforce_lifecycle(&mut tx, now, staleness_threshold_ms, actor, limit).await?;
        tx.commit().await?;
        Ok(moved)
    }

    async fn queue_depths(&self) -> Result<Vec<crate::metrics::QueueDepth>> {
        let found = sqlx::query(crate::store::rows::QUEUE_DEPTHS)
            .fetch_all(&self.pool)
            .await?;
        found.iter().map(crate::store::rows::queue_depth).collect()
    }

    async fn list_dlq(&self, filter: &crate::dlq::DlqFilter) -> Result<Vec<crate::dlq::DlqEntry>> {
        extra::list_dlq(&self.pool, filter).await
    }

    async fn get_dlq(&self, dlq_entry_uuid: &str) -> Result<crate::dlq::DlqEntry> {
        extra::get_dlq(&self.pool, dlq_entry_uuid).await
    }

    async fn dlq_stats(&self) -> Result<crate::dlq::DlqStats> {
        extra::dlq_stats(&self.pool).await
    }

    async fn resolve_dlq(
        &self,
        dlq_entry_uuid: &str,
        status: crate::dlq::DlqResolution,
        notes: Option<&str>,
        by: &str,
        now: Millis,
    ) -> Result<crate::dlq::DlqEntry> {
        extra::resolve_dlq(&self.pool, dlq_entry_uuid, status, notes, by, now).await
    }

    async fn create_api_key(&self, key: &crate::auth::ApiKey, secret_hash: &str) -> Result<()> {
        extra::create_api_key(&self.pool, key, secret_hash).await
    }

    async fn list_api_keys(&self) -> Result<Vec<crate::auth::ApiKey>> {
        extra::list_api_keys(&self.pool).await
    }

    async fn revoke_api_key(&self, key_id: &str, now: Millis) -> Result<crate::auth::ApiKey> {
        extra::revoke_api_key(&self.pool, key_id, now).await
    }

    async fn find_api_key(&self, key_id: &str) -> Result<Option<(crate::auth::ApiKey, String)>> {
        extra::find_api_key(&self.pool, key_id).await
    }

    fn changes(&self) -> Option<broadcast::Receiver<StoreChange>> {
        Some(self.changes.subscribe())
    }
}
