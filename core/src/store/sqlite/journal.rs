//! Writing a [`Journal`] to SQLite: every statement is a round trip to SQLite's connection
//! thread, so one operation's audit rows go out together in multi-row inserts, in one
//! multi-statement batch.

use sqlx::{AssertSqlSafe, SqliteConnection};

use crate::Result;
use crate::clock::Millis;
use crate::state::TaskState;
pub(crate) use crate::store::journal::Journal;
use crate::store::journal::{StepRow, TaskRow};

/// Bind parameters per flushed statement batch, well under SQLite's limit of 32766.
const MAX_PARAMS: usize = 20_000;

/// Writes a journal to SQLite.
pub(super) trait Flush {
    /// Writes everything buffered, in order.
    async fn flush(&mut self, tx: &mut SqliteConnection) -> Result<()>;
    /// [`Flush::flush`], with `tail` (a statement without parameters, such as `COMMIT`) run
    /// in the same round trip as the last rows.
    async fn flush_then(&mut self, tx: &mut SqliteConnection, tail: &str) -> Result<()>;
}

impl Flush for Journal {
    async fn flush(&mut self, tx: &mut SqliteConnection) -> Result<()> {
        self.flush_then(tx, "").await
    }

    async fn flush_then(&mut self, tx: &mut SqliteConnection, tail: &str) -> Result<()> {
        let d = self.drain();
        let mut batch = Batch::default();
        for r in d.steps {
            batch.step(tx, r).await?;
        }
        batch.close_inserts();
        for r in d.tasks {
            batch.task(tx, r).await?;
        }
        batch.close_inserts();
        for (task, state, at) in d.task_states {
            batch.task_state(tx, task, state, at).await?;
        }
        batch.close_inserts();
        for e in d.outbox {
            batch.event(tx, e).await?;
        }
        batch.close_inserts();
        batch.sql.push_str(tail);
        batch.run(tx).await
    }
}

/// One multi-statement SQL text with its parameters. Parameters are anonymous (`?`), each used
/// once, in order: binding a named parameter makes SQLite search the statement's names, which
/// turns large multi-row inserts quadratic.
#[derive(Default)]
struct Batch {
    sql: String,
    params: Vec<Param>,
    /// The table whose multi-row INSERT is open (more rows may be appended to it).
    open: Option<&'static str>,
}

/// A bind parameter of a statement built at run time.
#[derive(Clone)]
pub(super) enum Param {
    Text(Option<String>),
    Int(Option<i64>),
}

/// Binds `params`, in order, to a query built at run time.
pub(super) fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    params: Vec<Param>,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    for p in params {
        q = match p {
            Param::Text(v) => q.bind(v),
            Param::Int(v) => q.bind(v),
        };
    }
    q
}

impl Batch {
    fn placeholders(&mut self, values: Vec<Param>) -> String {
        let mut out = Vec::with_capacity(values.len());
        for v in values {
            self.params.push(v);
            out.push("?");
        }
        out.join(", ")
    }

    async fn make_room(&mut self, tx: &mut SqliteConnection, n: usize) -> Result<()> {
        if self.params.len() + n > MAX_PARAMS {
            self.run(tx).await?;
        }
        Ok(())
    }

    fn close_inserts(&mut self) {
        if self.open.take().is_some() {
            self.sql.push_str(";\n");
        }
    }

    async fn step(&mut self, tx: &mut SqliteConnection, r: StepRow) -> Result<()> {
        self.make_room(tx, 9).await?;
        let values = self.placeholders(vec![
            Param::Text(Some(r.step_uuid)),
            Param::Text(Some(r.task_uuid)),
            Param::Text(r.from.map(|s| s.as_str().to_string())),
            Param::Text(Some(r.to.as_str().to_string())),
            Param::Text(Some(r.event.to_string())),
            Param::Text(Some(r.actor)),
            Param::Text(r.reason),
            Param::Int(r.attempt.map(i64::from)),
            Param::Int(Some(r.at)),
        ]);
        self.row(
            "step_transitions",
            "INSERT INTO step_transitions (step_uuid, task_uuid, from_state, to_state, event, actor, reason, attempt, created_at) VALUES ",
            &values,
        );
        Ok(())
    }

    async fn task(&mut self, tx: &mut SqliteConnection, r: TaskRow) -> Result<()> {
        self.make_room(tx, 8).await?;
        let values = self.placeholders(vec![
            Param::Text(Some(r.task_uuid)),
            Param::Text(r.from.map(|s| s.as_str().to_string())),
            Param::Text(Some(r.to.as_str().to_string())),
            Param::Text(Some(r.event.to_string())),
            Param::Text(Some(r.actor)),
            Param::Text(r.reason),
            Param::Text(r.metadata),
            Param::Int(Some(r.at)),
        ]);
        self.row(
            "task_transitions",
            "INSERT INTO task_transitions (task_uuid, from_state, to_state, event, actor, reason, metadata, created_at) VALUES ",
            &values,
        );
        Ok(())
    }

    async fn event(
        &mut self,
        tx: &mut SqliteConnection,
        e: crate::events::DomainEvent,
    ) -> Result<()> {
        self.make_room(tx, 9).await?;
        let values = self.placeholders(vec![
            Param::Text(Some(e.event_id)),
            Param::Text(Some(e.event_name)),
            Param::Text(Some(e.delivery_mode.as_str().to_string())),
            Param::Text(Some(e.metadata.task_uuid.clone())),
            Param::Text(Some(e.metadata.step_uuid.clone())),
            Param::Text(Some(super::write::json(&e.payload)?)),
            Param::Text(Some(super::write::json(&e.metadata)?)),
            Param::Int(Some(e.metadata.fired_at)),
            Param::Int(Some(e.metadata.fired_at)),
        ]);
        self.row(
            "domain_events",
            "INSERT OR IGNORE INTO domain_events (event_id, event_name, delivery_mode, task_uuid, step_uuid, payload, metadata, created_at, next_delivery_at) VALUES ",
            &values,
        );
        Ok(())
    }

    fn row(&mut self, table: &'static str, head: &str, values: &str) {
        if self.open == Some(table) {
            self.sql.push_str(", (");
        } else {
            self.close_inserts();
            self.sql.push_str(head);
            self.sql.push('(');
            self.open = Some(table);
        }
        self.sql.push_str(values);
        self.sql.push(')');
    }

    async fn task_state(
        &mut self,
        tx: &mut SqliteConnection,
        task: String,
        state: TaskState,
        at: Millis,
    ) -> Result<()> {
        self.make_room(tx, 6).await?;
        self.close_inserts();
        let completed_at = state.is_terminal().then_some(at);
        self.placeholders(vec![
            Param::Text(Some(state.as_str().to_string())),
            Param::Int(Some(at)),
            Param::Int(Some(at)),
            Param::Int(completed_at),
            Param::Text(Some(task)),
        ]);
        self.sql.push_str(
            "UPDATE tasks SET state = ?, updated_at = ?, state_entered_at = ?, \
             completed_at = COALESCE(?, completed_at) WHERE task_uuid = ?;\n",
        );
        Ok(())
    }

    async fn run(&mut self, tx: &mut SqliteConnection) -> Result<()> {
        self.close_inserts();
        if self.sql.is_empty() {
            return Ok(());
        }
        let sql = std::mem::take(&mut self.sql);
        let q = bind_all(
            sqlx::query(AssertSqlSafe(sql)),
            std::mem::take(&mut self.params),
        );
        q.execute(&mut *tx).await?;
        Ok(())
    }
}
