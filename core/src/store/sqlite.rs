//! The embedded SQLite backend: one file (or memory), WAL, migrations run on open.
//!
//! All writes go through one connection and open with `BEGIN IMMEDIATE`, so writers inside
//! this process never contend and writers in other processes (an operator's `tasker-ctl task
//! cancel` while `tasker-ctl run` works) wait on the busy timeout instead of failing on a lock
//! upgrade.

mod attempts;
mod auth;
mod create;
mod dlq;
mod events;
mod finish;
mod journal;
mod lifecycle;
mod txn;

use journal::{Flush, Journal};
use txn::Txn;
mod operator;
mod read;
mod write;

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use super::{
    AttemptResult, ClaimRequest, Completion, Created, ExpiredAttempt, FinishReport, NewTask,
    OperatorAction, RejectedCompletion, Store, TemplatePut,
};
use crate::clock::Millis;
use crate::config::SqliteSync;
use crate::job::{Checkpoint, StepJob};
use crate::state::TaskState;
use crate::task::{Task, TaskFilter, TaskSummary, Transition};
use crate::template::TaskTemplate;
use crate::{Error, ErrorKind, Result};

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("sqlite/0001_init.sql")),
    (2, include_str!("sqlite/0002_batches.sql")),
    (3, include_str!("sqlite/0003_workflows.sql")),
    (4, include_str!("sqlite/0004_lifecycle.sql")),
    (5, include_str!("sqlite/0005_events.sql")),
    (6, include_str!("sqlite/0006_api_keys.sql")),
    (7, include_str!("sqlite/0007_workflow_ready.sql")),
];

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    /// Alive while any clone of the store is; the background checkpointer stops with it.
    _alive: std::sync::Arc<()>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database named by `url` and migrates it.
    pub async fn open(url: &str, sync: SqliteSync) -> Result<Self> {
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let base = if url.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url)
                .map_err(|e| Error::validation(format!("bad database URL {url:?}: {e}")))?
        } else {
            SqliteConnectOptions::new().filename(url)
        };
        let options = base
            .create_if_missing(true)
            .journal_mode(if in_memory {
                SqliteJournalMode::Memory
            } else {
                SqliteJournalMode::Wal
            })
            .synchronous(match sync {
                SqliteSync::Normal => SqliteSynchronous::Normal,
                SqliteSync::Full => SqliteSynchronous::Full,
            })
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            // Statements of variable shape (multi-row inserts) are cached too; room for them
            // keeps the hot fixed statements from being evicted and re-prepared.
            .statement_cache_capacity(1024)
            .pragma("temp_store", "memory")
            .pragma("cache_size", "-16000")
            // Checkpoints fsync the database file; run inside a commit they stall the writer for
            // milliseconds. A background task checkpoints instead (see `spawn_checkpointer`).
            .pragma("wal_autocheckpoint", if in_memory { "1000" } else { "0" });
        let writer = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(options.clone())
            .await
            .map_err(|e| open_error(url, e))?;
        // An in-memory database exists once per connection: reads must share the writer's.
        let reader = if in_memory {
            writer.clone()
        } else {
            SqlitePoolOptions::new()
                .test_before_acquire(false)
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(60))
                .connect_with(options.clone().read_only(true))
                .await
                .map_err(|e| open_error(url, e))?
        };
        let store = SqliteStore {
            writer,
            reader,
            _alive: std::sync::Arc::new(()),
        };
        store.migrate().await?;
        if !in_memory {
            store
                .spawn_checkpointer(options)
                .await
                .map_err(|e| open_error(url, e))?;
        }
        Ok(store)
    }

    /// Copies the write-ahead log into the database file in the background, off the writer's
    /// path, for as long as the store is open. `PASSIVE` never blocks writers or readers.
    async fn spawn_checkpointer(&self, options: SqliteConnectOptions) -> sqlx::Result<()> {
        let pool = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(1)
            .connect_with(options)
            .await?;
        let alive = std::sync::Arc::downgrade(&self._alive);
        tokio::spawn(async move {
            while alive.strong_count() > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Err(e) = checkpoint(&pool).await {
                    tracing::warn!("background WAL checkpoint failed: {e}");
                }
            }
            // The last connection to close checkpoints what is left.
            pool.close().await;
        });
        Ok(())
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS tasker_migrations \
             (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM tasker_migrations")
            .fetch_all(&mut *tx)
            .await?;
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
        // Versions need not be contiguous (branches number their migrations independently);
        // only a version newer than every one this build knows means a newer Tasker.
        let newest = MIGRATIONS.iter().map(|(v, _)| *v).max().unwrap_or(0);
        if let Some(max) = applied.iter().max()
            && *max > newest
        {
            return Err(Error::new(
                ErrorKind::Store,
                format!("the database was migrated by a newer Tasker (schema version {max})"),
            ));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn begin(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Task creation in one transaction of two or three round trips (see `create.rs`).
    async fn create_with(
        &self,
        tasks: &[NewTask],
        actor: &str,
        claim: Option<&ClaimRequest>,
        now: Millis,
    ) -> Result<(Vec<Created>, Vec<StepJob>)> {
        let mut t = Txn::acquire(&self.writer).await?;
        let mut j = Journal::default();
        let r = async {
            let out = create::create_tasks(t.conn(), &mut j, tasks, actor, claim, Txn::BEGIN, now)
                .await?;
            j.flush_then(t.conn(), Txn::COMMIT).await?;
            Ok(out)
        }
        .await;
        t.finish(r).await
    }

    /// The hot path: results applied, their tasks settled and the next steps claimed in one
    /// transaction of two round trips (see `finish.rs`).
    async fn finish_with(
        &self,
        results: &[AttemptResult],
        actor: &str,
        claim: Option<&ClaimRequest>,
        now: Millis,
    ) -> Result<(Vec<FinishReport>, Vec<StepJob>)> {
        let mut t = Txn::acquire(&self.writer).await?;
        let mut j = Journal::default();
        let r = async {
            let out =
                finish::finish(t.conn(), &mut j, results, actor, claim, Txn::BEGIN, now).await?;
            j.flush_then(t.conn(), Txn::COMMIT).await?;
            Ok(out)
        }
        .await;
        t.finish(r).await
    }
}

/// WAL frames (4 KiB pages; 64 MiB) beyond which the checkpointer restarts the log.
const WAL_RESTART_FRAMES: i64 = 16_384;

/// One background checkpoint. A passive checkpoint copies the log into the database without
/// blocking anyone, but under a steady stream of writes the log is never found fully copied at
/// the start of a write, so it is never rewound and grows without bound (and every page lookup
/// in it slows down). Once it is long, a `RESTART` checkpoint makes the next writer start the
/// log over; writers wait for it (milliseconds) through their busy timeout.
async fn checkpoint(pool: &SqlitePool) -> sqlx::Result<()> {
    use sqlx::Row;
    let row = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(pool)
        .await?;
    let frames: i64 = row.try_get(1)?;
    if frames > WAL_RESTART_FRAMES {
        sqlx::query("PRAGMA wal_checkpoint(RESTART)")
            .execute(pool)
            .await?;
    }
    Ok(())
}

fn open_error(url: &str, e: sqlx::Error) -> Error {
    Error::new(
        ErrorKind::Store,
        format!("cannot open database {url:?}: {e}"),
    )
}

#[async_trait]
impl Store for SqliteStore {
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
        read::get_template(&self.reader, namespace, name, version).await
    }

    async fn list_templates(&self) -> Result<Vec<TaskTemplate>> {
        read::list_templates(&self.reader).await
    }

    async fn template_snapshot(&self, hash: &str) -> Result<TaskTemplate> {
        read::template_snapshot(&self.reader, hash).await
    }

    async fn create_task(&self, task: &NewTask, actor: &str, now: Millis) -> Result<Created> {
        let (mut created, _) = self
            .create_with(std::slice::from_ref(task), actor, None, now)
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
        self.create_with(tasks, actor, claim, now).await
    }

    async fn claim(&self, req: &ClaimRequest, now: Millis) -> Result<Vec<StepJob>> {
        let mut tx = self.begin().await?;
        let mut j = Journal::default();
        let jobs = attempts::claim(&mut tx, &mut j, req, now).await?;
        j.flush(&mut tx).await?;
        tx.commit().await?;
        Ok(jobs)
    }

    async fn finish(
        &self,
        results: &[AttemptResult],
        actor: &str,
        now: Millis,
    ) -> Result<Vec<FinishReport>> {
        Ok(self.finish_with(results, actor, None, now).await?.0)
    }

    async fn finish_and_claim(
        &self,
        results: &[AttemptResult],
        actor: &str,
        claim: &ClaimRequest,
        now: Millis,
    ) -> Result<(Vec<FinishReport>, Vec<StepJob>)> {
        self.finish_with(results, actor, Some(claim), now).await
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
        let r = attempts::checkpoint(
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
        let mut tx = self.begin().await?;
        let n = attempts::renew_leases(&mut tx, worker_id, attempts, lease_until, now).await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn promote_due_retries(&self, actor: &str, now: Millis) -> Result<u64> {
        let mut tx = self.begin().await?;
        let n = attempts::promote_due_retries(&mut tx, actor, now).await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn expired_attempts(&self, now: Millis, limit: usize) -> Result<Vec<ExpiredAttempt>> {
        read::expired_attempts(&self.writer, now, limit).await
    }

    async fn next_due(&self) -> Result<Option<Millis>> {
        read::next_due(&self.writer).await
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
        let r = operator::operator_action(&mut tx, task_uuid, action, actor, reason, now).await?;
        tx.commit().await?;
        Ok(r)
    }

    async fn get_task(&self, task_uuid: &str) -> Result<Task> {
        read::get_task(&self.reader, task_uuid).await
    }

    async fn task_state(&self, task_uuid: &str) -> Result<TaskState> {
        read::task_state(&self.reader, task_uuid).await
    }

    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskSummary>> {
        read::list_tasks(&self.reader, filter).await
    }

    async fn task_transitions(&self, task_uuid: &str) -> Result<Vec<Transition>> {
        read::task_transitions(&self.reader, task_uuid).await
    }

    async fn step_transitions(
        &self,
        task_uuid: &str,
        step: Option<&str>,
    ) -> Result<Vec<Transition>> {
        read::step_transitions(&self.reader, task_uuid, step).await
    }

    async fn rejected_completions(&self, task_uuid: &str) -> Result<Vec<RejectedCompletion>> {
        read::rejected_completions(&self.reader, task_uuid).await
    }

    async fn checkpoint_history(&self, step_uuid: &str) -> Result<Vec<serde_json::Value>> {
        read::checkpoint_history(&self.reader, step_uuid).await
    }

    async fn workflow_children(&self, limit: usize) -> Result<Vec<super::ChildTask>> {
        read::workflow_children(&self.reader, limit).await
    }

    async fn claim_events(
        &self,
        limit: usize,
        claimed_until: Millis,
        now: Millis,
    ) -> Result<Vec<crate::events::StoredEvent>> {
        let mut tx = self.begin().await?;
        let events = events::claim_events(&mut tx, limit, claimed_until, now).await?;
        tx.commit().await?;
        Ok(events)
    }

    async fn record_deliveries(
        &self,
        outcomes: &[(i64, std::result::Result<(), String>, Millis)],
        now: Millis,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        events::record_deliveries(&mut tx, outcomes, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_events(
        &self,
        filter: &crate::events::EventFilter,
    ) -> Result<Vec<crate::events::StoredEvent>> {
        events::list_events(&self.reader, filter).await
    }

    async fn next_event_due(&self) -> Result<Option<Millis>> {
        events::next_event_due(&self.writer).await
    }

    async fn enforce_lifecycle(
        &self,
        now: Millis,
        staleness_threshold_ms: Option<i64>,
        actor: &str,
        limit: usize,
    ) -> Result<Vec<crate::dlq::LifecycleExceeded>> {
        let mut tx = self.begin().await?;
        let moved = lifecycle::enforce(&mut tx, now, staleness_threshold_ms, actor, limit).await?;
        tx.commit().await?;
        Ok(moved)
    }

    async fn queue_depths(&self) -> Result<Vec<crate::metrics::QueueDepth>> {
        let found = sqlx::query(crate::store::rows::QUEUE_DEPTHS)
            .fetch_all(&self.reader)
            .await?;
        found.iter().map(crate::store::rows::queue_depth).collect()
    }

    async fn list_dlq(&self, filter: &crate::dlq::DlqFilter) -> Result<Vec<crate::dlq::DlqEntry>> {
        dlq::list(&self.reader, filter).await
    }

    async fn get_dlq(&self, dlq_entry_uuid: &str) -> Result<crate::dlq::DlqEntry> {
        dlq::get(&self.reader, dlq_entry_uuid).await
    }

    async fn dlq_stats(&self) -> Result<crate::dlq::DlqStats> {
        dlq::stats(&self.reader).await
    }

    async fn resolve_dlq(
        &self,
        dlq_entry_uuid: &str,
        status: crate::dlq::DlqResolution,
        notes: Option<&str>,
        by: &str,
        now: Millis,
    ) -> Result<crate::dlq::DlqEntry> {
        let mut tx = self.begin().await?;
        let entry = dlq::resolve(&mut tx, dlq_entry_uuid, status, notes, by, now).await?;
        tx.commit().await?;
        Ok(entry)
    }

    async fn create_api_key(&self, key: &crate::auth::ApiKey, secret_hash: &str) -> Result<()> {
        let mut tx = self.begin().await?;
        auth::create(&mut tx, key, secret_hash).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_api_keys(&self) -> Result<Vec<crate::auth::ApiKey>> {
        auth::list(&self.reader).await
    }

    async fn revoke_api_key(&self, key_id: &str, now: Millis) -> Result<crate::auth::ApiKey> {
        let mut tx = self.begin().await?;
        let key = auth::revoke(&mut tx, key_id, now).await?;
        tx.commit().await?;
        Ok(key)
    }

    async fn find_api_key(&self, key_id: &str) -> Result<Option<(crate::auth::ApiKey, String)>> {
        auth::find(&self.reader, key_id).await
    }
}
