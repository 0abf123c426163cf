//! Transitions and task-state changes buffered during one store operation and written, when
//! it ends, in as few statements as possible. Every statement is a round trip to SQLite's
//! connection thread, and those round trips, not SQLite's own work, dominate the engine's hot
//! path; so one operation's audit rows go out together in multi-row inserts.

use sqlx::{AssertSqlSafe, SqliteConnection};

use crate::Result;
use crate::clock::Millis;
use crate::state::{StepEvent, StepState, TaskEvent, TaskState, step_transition, task_transition};

/// Bind parameters per flushed statement batch, well under SQLite's limit of 32766.
const MAX_PARAMS: usize = 20_000;

struct StepRow {
    step_uuid: String,
    task_uuid: String,
    from: Option<StepState>,
    to: StepState,
    event: &'static str,
    actor: String,
    reason: Option<String>,
    attempt: Option<u32>,
    at: Millis,
}

struct TaskRow {
    task_uuid: String,
    from: Option<TaskState>,
    to: TaskState,
    event: &'static str,
    actor: String,
    reason: Option<String>,
    metadata: Option<String>,
    at: Millis,
}

/// The buffer. Create one per operation and `flush` it before the transaction commits.
#[derive(Default)]
pub(super) struct Journal {
    steps: Vec<StepRow>,
    tasks: Vec<TaskRow>,
    /// Latest state per task changed in this operation, not yet written to `tasks`.
    task_states: Vec<(String, TaskState, Millis)>,
    /// Domain events for the outbox (SPEC §10), written with the results that fired them.
    outbox: Vec<crate::events::DomainEvent>,
}

impl Journal {
    /// Records a new step's first row (`create`, into `pending`).
    pub(super) fn step_created(
        &mut self,
        step_uuid: &str,
        task_uuid: &str,
        actor: &str,
        at: Millis,
    ) {
        self.steps.push(StepRow {
            step_uuid: step_uuid.to_string(),
            task_uuid: task_uuid.to_string(),
            from: None,
            to: StepState::Pending,
            event: "create",
            actor: actor.to_string(),
            reason: None,
            attempt: None,
            at,
        });
    }

    /// Records a new task's first row (`create`, into `pending`).
    pub(super) fn task_created(&mut self, task_uuid: &str, actor: &str, at: Millis) {
        self.tasks.push(TaskRow {
            task_uuid: task_uuid.to_string(),
            from: None,
            to: TaskState::Pending,
            event: "create",
            actor: actor.to_string(),
            reason: None,
            metadata: None,
            at,
        });
    }

    /// Walks a step through `events` (each checked against the state table) and records every
    /// transition; returns the final state, which the caller writes to the step row.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn step_moves(
        &mut self,
        step_uuid: &str,
        task_uuid: &str,
        from: StepState,
        events: &[StepEvent],
        attempt: Option<u32>,
        actor: &str,
        reason: Option<&str>,
        at: Millis,
    ) -> Result<StepState> {
        let mut state = from;
        for ev in events {
            let to = step_transition(state, *ev)?;
            self.steps.push(StepRow {
                step_uuid: step_uuid.to_string(),
                task_uuid: task_uuid.to_string(),
                from: Some(state),
                to,
                event: ev.as_str(),
                actor: actor.to_string(),
                reason: reason.map(str::to_string),
                attempt,
                at,
            });
            state = to;
        }
        Ok(state)
    }

    /// Walks a task through `events`, recording every transition; the task row is updated at
    /// flush time.
    pub(super) fn task_moves(
        &mut self,
        task_uuid: &str,
        from: TaskState,
        events: &[TaskEvent],
        actor: &str,
        reason: Option<&str>,
        at: Millis,
    ) -> Result<TaskState> {
        let mut state = from;
        for ev in events {
            let to = task_transition(state, *ev)?;
            self.tasks.push(TaskRow {
                task_uuid: task_uuid.to_string(),
                from: Some(state),
                to,
                event: ev.as_str(),
                actor: actor.to_string(),
                reason: reason.map(str::to_string),
                metadata: None,
                at,
            });
            state = to;
        }
        if state != from {
            match self.task_states.iter_mut().find(|(t, _, _)| t == task_uuid) {
                Some(entry) => *entry = (task_uuid.to_string(), state, at),
                None => self.task_states.push((task_uuid.to_string(), state, at)),
            }
        }
        Ok(state)
    }

    /// Queues an event's outbox record.
    pub(super) fn outbox(&mut self, event: crate::events::DomainEvent) {
        self.outbox.push(event);
    }

    /// [`Journal::task_moves`] for one event, recording `metadata` (a JSON object) on the
    /// transition.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn task_move_with_metadata(
        &mut self,
        task_uuid: &str,
        from: TaskState,
        event: TaskEvent,
        actor: &str,
        reason: Option<&str>,
        metadata: &serde_json::Value,
        at: Millis,
    ) -> Result<TaskState> {
        let state = self.task_moves(task_uuid, from, &[event], actor, reason, at)?;
        if let Some(row) = self.tasks.last_mut() {
            row.metadata = Some(metadata.to_string());
        }
        Ok(state)
    }

    /// The task's state as changed earlier in this operation, if it was.
    pub(super) fn task_state(&self, task_uuid: &str) -> Option<TaskState> {
        self.task_states
            .iter()
            .find(|(t, _, _)| t == task_uuid)
            .map(|(_, s, _)| *s)
    }

    /// Writes everything buffered, in order.
    pub(super) async fn flush(&mut self, tx: &mut SqliteConnection) -> Result<()> {
        self.flush_then(tx, "").await
    }

    /// [`Journal::flush`], with `tail` (a statement without parameters, such as `COMMIT`) run
    /// in the same round trip as the last rows.
    pub(super) async fn flush_then(&mut self, tx: &mut SqliteConnection, tail: &str) -> Result<()> {
        let mut batch = Batch::default();
        for r in std::mem::take(&mut self.steps) {
            batch.step(tx, r).await?;
        }
        batch.close_inserts();
        for r in std::mem::take(&mut self.tasks) {
            batch.task(tx, r).await?;
        }
        batch.close_inserts();
        for (task, state, at) in std::mem::take(&mut self.task_states) {
            batch.task_state(tx, task, state, at).await?;
        }
        batch.close_inserts();
        for e in std::mem::take(&mut self.outbox) {
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
