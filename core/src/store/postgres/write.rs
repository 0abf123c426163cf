//! PostgreSQL writes: templates, task creation, claims, results, checkpoints, leases, retries
//! and operator actions. Each function runs inside the caller's transaction. Rows travel as
//! arrays (`unnest`) or JSON arrays (`json_array_elements`), so statement texts do not depend
//! on how many rows there are and stay prepared.

use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};

use super::{OUTBOX_LOCK, TASK_CHANNEL, WORK_CHANNEL};
use crate::clock::Millis;
use crate::job::{Checkpoint, StepJob};
use crate::orchestrator::SettleCause;
use crate::state::{StepEvent, StepState, TaskEvent, TaskState, step_transition, task_transition};
use crate::store::apply::{
    NewRows, Rejection, Rows, Tallies, Target, checkpoint_history, expansion_rows, finish_row,
    operator_expansion, rejected, settle_task, stale_checkpoint, start_new,
};
use crate::store::journal::{Drained, Journal};
use crate::store::rows::{self, CURRENT_COLUMNS, Cols, Current, json, parse_state};
use crate::store::{
    AttemptResult, CallableFilter, ClaimRequest, Completion, Created, FinishReport, NewTask,
    OperatorAction, Resolution, TemplatePut,
};
use crate::template::TaskTemplate;
use crate::{Error, ErrorKind, Result};

// ---------------------------------------------------------------- journal

/// The journal's writes as common table expressions, parameters `$1`–`$23`: step transitions
/// (`st`, one row per insert returned so that later inserts can be ordered after them), task
/// transitions (`tt`), task-state changes (`ts`) and their announcements (`n1`). A `SELECT`
/// CTE runs only if the statement's output needs it: the statement must return a value read
/// from `n1` (a subquery whose value goes nowhere is planned away, notifications and all). Bound by [`JournalArrays::bind`].
const JOURNAL_CTES: &str = "st AS (
            INSERT INTO step_transitions (step_uuid, task_uuid, from_state, to_state, event,
                actor, reason, attempt, created_at)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                $6::text[], $7::text[], $8::int8[], $9::int8[])
            RETURNING 1),
         tt AS (
            INSERT INTO task_transitions (task_uuid, from_state, to_state, event, actor, reason,
                metadata, created_at)
            SELECT * FROM unnest($10::text[], $11::text[], $12::text[], $13::text[], $14::text[],
                $15::text[], $16::text[], $17::int8[])),
         ts AS (
            UPDATE tasks t SET state = u.state, updated_at = u.at, state_entered_at = u.at,
                completed_at = COALESCE(u.done, t.completed_at)
            FROM unnest($18::text[], $19::text[], $20::int8[], $21::int8[])
                AS u(task_uuid, state, at, done)
            WHERE t.task_uuid = u.task_uuid),
         n1 AS (SELECT pg_notify($22, n) FROM unnest($23::text[]) n)";

/// Writes a journal: transitions, task-state changes and their announcements in one statement,
/// outbox records (in commit order, see [`OUTBOX_LOCK`]) in a second when there are any.
pub(super) async fn flush(tx: &mut PgConnection, j: &mut Journal) -> Result<()> {
    let d = j.drain();
    if d.steps.is_empty() && d.tasks.is_empty() && d.task_states.is_empty() && d.outbox.is_empty() {
        return Ok(());
    }
    let work = d.work_enqueued_before || d.steps.iter().any(|s| s.to == StepState::Enqueued);
    let a = JournalArrays::of(&d);
    a.bind(flush_sql())
        .bind(WORK_CHANNEL)
        .bind(work)
        .execute(&mut *tx)
        .await?;
    write_outbox(tx, &d).await
}

/// [`flush`]'s statement: the journal, and the work announcement (`$24`–`$25`: channel,
/// whether to send it).
fn flush_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        format!(
            "WITH {JOURNAL_CTES},
         n2 AS (SELECT pg_notify($24, '') WHERE $25)
         SELECT (SELECT COUNT(*) FROM n1) + (SELECT COUNT(*) FROM n2)"
        )
    })
}

/// The outbox records of a drained journal, in commit order (see [`OUTBOX_LOCK`]).
async fn write_outbox(tx: &mut PgConnection, d: &Drained) -> Result<()> {
    if !d.outbox.is_empty() {
        // Sequence numbers are taken at insert, not at commit: holding this lock to the
        // commit makes the outbox's order the commit order, so a consumer paging by `seq`
        // never skips a record that commits late.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(OUTBOX_LOCK)
            .execute(&mut *tx)
            .await?;
        let mut rows = Vec::with_capacity(d.outbox.len());
        for e in &d.outbox {
            rows.push(serde_json::json!([
                e.event_id,
                e.event_name,
                e.delivery_mode.as_str(),
                e.metadata.task_uuid,
                e.metadata.step_uuid,
                json(&e.payload)?,
                json(&e.metadata)?,
                e.metadata.fired_at,
            ]));
        }
        sqlx::query(
            "INSERT INTO domain_events (event_id, event_name, delivery_mode, task_uuid, step_uuid,
                payload, metadata, created_at, next_delivery_at)
             SELECT v->>0, v->>1, v->>2, v->>3, v->>4, v->>5, v->>6, (v->>7)::int8, (v->>7)::int8
             FROM json_array_elements($1::json) v
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(json(&rows)?)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// A drained journal as the parameters of [`JOURNAL_CTES`].
struct JournalArrays<'a> {
    transitions: TransitionArrays<'a>,
    u_task: Vec<&'a str>,
    u_state: Vec<&'a str>,
    u_at: Vec<i64>,
    u_done: Vec<Option<i64>>,
    notes: Vec<String>,
}

impl<'a> JournalArrays<'a> {
    fn of(d: &'a Drained) -> JournalArrays<'a> {
        let n = d.task_states.len();
        let mut a = JournalArrays {
            transitions: TransitionArrays::of(d),
            u_task: Vec::with_capacity(n),
            u_state: Vec::with_capacity(n),
            u_at: Vec::with_capacity(n),
            u_done: Vec::with_capacity(n),
            notes: Vec::with_capacity(n),
        };
        for (task, state, at) in &d.task_states {
            a.u_task.push(task.as_str());
            a.u_state.push(state.as_str());
            a.u_at.push(*at);
            a.u_done.push(state.is_terminal().then_some(*at));
            a.notes.push(format!("{task} {}", state.as_str()));
        }
        a
    }

    /// `sql` with the journal bound as its parameters 1 to 23.
    fn bind<'q>(
        &'q self,
        sql: impl sqlx::SqlSafeStr,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>
    where
        'a: 'q,
    {
        self.transitions
            .query(sql)
            .bind(&self.u_task)
            .bind(&self.u_state)
            .bind(&self.u_at)
            .bind(&self.u_done)
            .bind(TASK_CHANNEL)
            .bind(&self.notes)
    }
}

/// A journal's transitions as column arrays, for `unnest`.
struct TransitionArrays<'a> {
    s_step: Vec<&'a str>,
    s_task: Vec<&'a str>,
    s_from: Vec<Option<&'a str>>,
    s_to: Vec<&'a str>,
    s_event: Vec<&'a str>,
    s_actor: Vec<&'a str>,
    s_reason: Vec<Option<&'a str>>,
    s_attempt: Vec<Option<i64>>,
    s_at: Vec<i64>,
    t_task: Vec<&'a str>,
    t_from: Vec<Option<&'a str>>,
    t_to: Vec<&'a str>,
    t_event: Vec<&'a str>,
    t_actor: Vec<&'a str>,
    t_reason: Vec<Option<&'a str>>,
    t_meta: Vec<Option<&'a str>>,
    t_at: Vec<i64>,
}

impl<'a> TransitionArrays<'a> {
    /// `sql` with these arrays bound as its parameters 1 to 17: step transitions (`$1`–`$9`:
    /// step, task, from, to, event, actor, reason, attempt, at), then task transitions
    /// (`$10`–`$17`: task, from, to, event, actor, reason, metadata, at).
    fn query<'q>(
        &'q self,
        sql: impl sqlx::SqlSafeStr,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>
    where
        'a: 'q,
    {
        sqlx::query(sql)
            .bind(&self.s_step)
            .bind(&self.s_task)
            .bind(&self.s_from)
            .bind(&self.s_to)
            .bind(&self.s_event)
            .bind(&self.s_actor)
            .bind(&self.s_reason)
            .bind(&self.s_attempt)
            .bind(&self.s_at)
            .bind(&self.t_task)
            .bind(&self.t_from)
            .bind(&self.t_to)
            .bind(&self.t_event)
            .bind(&self.t_actor)
            .bind(&self.t_reason)
            .bind(&self.t_meta)
            .bind(&self.t_at)
    }

    fn of(d: &'a Drained) -> TransitionArrays<'a> {
        TransitionArrays {
            s_step: d.steps.iter().map(|r| r.step_uuid.as_str()).collect(),
            s_task: d.steps.iter().map(|r| r.task_uuid.as_str()).collect(),
            s_from: d.steps.iter().map(|r| r.from.map(|s| s.as_str())).collect(),
            s_to: d.steps.iter().map(|r| r.to.as_str()).collect(),
            s_event: d.steps.iter().map(|r| r.event).collect(),
            s_actor: d.steps.iter().map(|r| r.actor.as_str()).collect(),
            s_reason: d.steps.iter().map(|r| r.reason.as_deref()).collect(),
            s_attempt: d.steps.iter().map(|r| r.attempt.map(i64::from)).collect(),
            s_at: d.steps.iter().map(|r| r.at).collect(),
            t_task: d.tasks.iter().map(|r| r.task_uuid.as_str()).collect(),
            t_from: d.tasks.iter().map(|r| r.from.map(|s| s.as_str())).collect(),
            t_to: d.tasks.iter().map(|r| r.to.as_str()).collect(),
            t_event: d.tasks.iter().map(|r| r.event).collect(),
            t_actor: d.tasks.iter().map(|r| r.actor.as_str()).collect(),
            t_reason: d.tasks.iter().map(|r| r.reason.as_deref()).collect(),
            t_meta: d.tasks.iter().map(|r| r.metadata.as_deref()).collect(),
            t_at: d.tasks.iter().map(|r| r.at).collect(),
        }
    }
}

// ---------------------------------------------------------------- templates

pub(super) async fn put_template(
    tx: &mut PgConnection,
    t: &TaskTemplate,
    force: bool,
    now: Millis,
) -> Result<TemplatePut> {
    let hash = t.content_hash();
    let existing: Option<String> = sqlx::query_scalar(
        "SELECT content_hash FROM templates WHERE namespace = $1 AND name = $2 AND version = $3
         FOR UPDATE",
    )
    .bind(&t.namespace)
    .bind(&t.name)
    .bind(&t.version)
    .fetch_optional(&mut *tx)
    .await?;
    let outcome = match existing {
        Some(h) if h == hash => return Ok(TemplatePut::Unchanged),
        Some(_) if !force => {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "template {} is already registered with different content; \
                     bump its version or register with force",
                    t.key()
                ),
            ));
        }
        Some(_) => TemplatePut::Replaced,
        None => TemplatePut::Inserted,
    };
    let def = json(t)?;
    // A concurrent first registration of the same key: the later one keeps the earlier row
    // when the content is the same, and is refused otherwise (unless forced).
    let stored: Option<String> = sqlx::query_scalar(
        "INSERT INTO templates (namespace, name, version, content_hash, definition, registered_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $6)
         ON CONFLICT (namespace, name, version)
         DO UPDATE SET content_hash = excluded.content_hash, definition = excluded.definition,
                       updated_at = excluded.updated_at
         WHERE $7 OR templates.content_hash = excluded.content_hash
         RETURNING content_hash",
    )
    .bind(&t.namespace)
    .bind(&t.name)
    .bind(&t.version)
    .bind(&hash)
    .bind(&def)
    .bind(now)
    .bind(force)
    .fetch_optional(&mut *tx)
    .await?;
    if stored.is_none() {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "template {} was just registered with different content; \
                 bump its version or register with force",
                t.key()
            ),
        ));
    }
    sqlx::query(
        "INSERT INTO template_snapshots (content_hash, definition) VALUES ($1, $2)
         ON CONFLICT (content_hash) DO NOTHING",
    )
    .bind(&hash)
    .bind(&def)
    .execute(&mut *tx)
    .await?;
    Ok(outcome)
}

// ---------------------------------------------------------------- settle

/// Enqueues the `pending` steps of `tasks` whose parents are all satisfied (rows tagged `e`)
/// and tallies those tasks' steps by state after that (rows tagged `c`), in one statement.
///
/// A parent satisfies its child when `complete` or `resolved_manually`, and also when it is a
/// batch worker that failed for good under the `isolate` strategy. Batch workers are enqueued
/// in creation order while fewer than their group's `parallelism` are busy. The tally is a
/// per-task lateral aggregate so that it reads each task's steps by index: a plain join is
/// planned as a scan of every step once the table has grown.
const SETTLE: &str = "
WITH e AS (
  UPDATE steps SET state = 'enqueued', enqueued_at = $1, updated_at = $1
  WHERE task_uuid = ANY($2) AND state = 'pending'
    AND NOT EXISTS (
      SELECT 1 FROM step_edges e JOIN steps p ON p.step_uuid = e.from_step
      WHERE e.to_step = steps.step_uuid AND p.state NOT IN ('complete', 'resolved_manually')
        AND NOT (p.state = 'error' AND COALESCE(p.batch_strategy, '') = 'isolate'))
    AND (SELECT state FROM tasks t WHERE t.task_uuid = steps.task_uuid)
        NOT IN ('complete', 'error', 'cancelled', 'resolved_manually')
    AND (steps.batch_parallelism IS NULL OR steps.step_uuid IN (
      SELECT step_uuid FROM (
        SELECT w.step_uuid, w.batch_parallelism AS cap,
          ROW_NUMBER() OVER (PARTITION BY w.task_uuid, w.batch_group ORDER BY w.seq) AS rank,
          (SELECT COUNT(*) FROM steps b
           WHERE b.task_uuid = w.task_uuid AND b.batch_group = w.batch_group
             AND b.state IN ('enqueued', 'in_progress', 'waiting_for_retry')) AS busy
        FROM steps w
        WHERE w.task_uuid = ANY($2) AND w.state = 'pending' AND w.batch_group IS NOT NULL) r
      WHERE rank + busy <= cap))
  RETURNING step_uuid, task_uuid)
SELECT 'e' AS tag, step_uuid AS a, task_uuid AS b, NULL::text AS c, NULL::int8 AS d FROM e
UNION ALL
SELECT 'c', t.task_uuid, t.state, x.state, COALESCE(x.n, 0)
FROM tasks t LEFT JOIN LATERAL (
  SELECT CASE WHEN e.step_uuid IS NOT NULL THEN 'enqueued' ELSE s.state END AS state,
         COUNT(*) AS n
  FROM steps s LEFT JOIN e ON e.step_uuid = s.step_uuid
  WHERE s.task_uuid = t.task_uuid
  GROUP BY 1) x ON true
WHERE t.task_uuid = ANY($2)";

/// Runs [`SETTLE`] for `tasks`.
async fn settle_rows(tx: &mut PgConnection, tasks: &[&str], now: Millis) -> Result<Vec<PgRow>> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query(SETTLE)
        .bind(now)
        .bind(tasks)
        .fetch_all(&mut *tx)
        .await?)
}

/// Enqueues the ready steps of `tasks` and walks each to its next resting state.
#[allow(clippy::too_many_arguments)]
async fn settle_many(
    tx: &mut PgConnection,
    j: &mut Journal,
    tasks: &[String],
    cause: SettleCause,
    actor: &str,
    reason: Option<&str>,
    now: Millis,
) -> Result<Vec<TaskState>> {
    // A task this operation already finished keeps its state; its steps are not enqueued.
    let open: Vec<&str> = tasks
        .iter()
        .filter(|t| !j.task_state(t).is_some_and(|s| s.is_terminal()))
        .map(String::as_str)
        .collect();
    let found = settle_rows(tx, &open, now).await?;
    let mut none = Vec::new();
    let mut rows = Rows::new(&[], &[], &mut none, None, actor, now);
    rows.absorb(j, &found)?;
    let (tallies, _) = rows.into_parts();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        match j.task_state(t) {
            Some(s) if s.is_terminal() => out.push(s),
            _ => out.push(settle_task(j, &tallies, t, cause, actor, reason, now)?),
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- creation

/// Creates `tasks` as [`create_tasks_at_once`] does, within the caller's transaction, then runs
/// `claim`. The steps the creation made ready are announced with the claim's outcome (see
/// [`claim_and_write`]), not by the creating statement.
pub(super) async fn create_tasks(
    tx: &mut PgConnection,
    tasks: &[NewTask],
    actor: &str,
    claim_req: &ClaimRequest,
    me: &str,
    now: Millis,
) -> Result<(Vec<Created>, Vec<StepJob>)> {
    let (created, work) = insert_started(&mut *tx, tasks, actor, false, now).await?;
    let mut j = Journal::default();
    j.work_enqueued_before = work;
    let jobs = claim_and_write(tx, &mut j, claim_req, me, now).await?;
    Ok((created, jobs))
}

/// Creates and starts `tasks` in one statement, which is its own transaction: the rows of
/// every task, its steps (the ready ones already `enqueued`), its edges and transitions, and
/// the announcements, all computed beforehand ([`start_new`]) and each written only for tasks
/// whose insert went through. A task whose identity exists comes back as
/// [`Created::Existing`] as in [`create_tasks`], which is what a creation that also claims
/// runs.
pub(super) async fn create_tasks_at_once(
    pool: &PgPool,
    tasks: &[NewTask],
    actor: &str,
    now: Millis,
) -> Result<Vec<Created>> {
    let mut conn = pool.acquire().await?;
    Ok(insert_started(&mut conn, tasks, actor, true, now).await?.0)
}

/// The statement of [`create_tasks_at_once`], on `conn`; `announce` sends the work
/// announcement for the steps it enqueued. Returns what became of each task and whether any
/// step was enqueued.
async fn insert_started(
    conn: &mut PgConnection,
    tasks: &[NewTask],
    actor: &str,
    announce: bool,
    now: Millis,
) -> Result<(Vec<Created>, bool)> {
    let group = Group::of(tasks);
    let rows = NewRows::of(&group.candidates)?;
    let mut j = Journal::default();
    start_new(&mut j, &group.candidates, actor, now)?;
    let d = j.drain();
    if !d.outbox.is_empty() {
        return Err(Error::internal("starting a task fired outbox events"));
    }
    // Each step's state after starting (the ready ones moved on from `pending`).
    let mut moved: Vec<(&str, &str)> = Vec::new();
    for r in d.steps.iter().filter(|r| r.from.is_some()) {
        match moved.iter_mut().find(|(s, _)| *s == r.step_uuid) {
            Some(m) => m.1 = r.to.as_str(),
            None => moved.push((r.step_uuid.as_str(), r.to.as_str())),
        }
    }
    let work = moved
        .iter()
        .any(|(_, s)| *s == StepState::Enqueued.as_str());
    let (m_step, m_state): (Vec<&str>, Vec<&str>) = moved.into_iter().unzip();
    let mut u_task = Vec::with_capacity(d.task_states.len());
    let mut u_state = Vec::with_capacity(d.task_states.len());
    let mut u_done: Vec<Option<i64>> = Vec::with_capacity(d.task_states.len());
    let mut notes = Vec::with_capacity(d.task_states.len());
    for (task, state, at) in &d.task_states {
        u_task.push(task.as_str());
        u_state.push(state.as_str());
        u_done.push(state.is_terminal().then_some(*at));
        notes.push(format!("{task} {}", state.as_str()));
    }
    let a = TransitionArrays::of(&d);
    let inserted: Vec<String> = a
        .query(
            "WITH snap AS (
            INSERT INTO template_snapshots (content_hash, definition)
            SELECT v->>0, v->>1 FROM json_array_elements($19::json) v
            ON CONFLICT (content_hash) DO NOTHING),
         ins AS (
            INSERT INTO tasks (task_uuid, namespace, name, version, template_hash, state,
                context, initiator, source_system, reason, tags, priority, correlation_id,
                parent_correlation_id, idempotency_key, identity_hash, parent_task_uuid,
                parent_step_uuid, created_at, updated_at, state_entered_at, completed_at)
            SELECT v->>0, v->>1, v->>2, v->>3, v->>4, COALESCE(u.state, 'pending'), v->>5,
                v->>6, v->>7, v->>8, v->>9, (v->>10)::int8, v->>11, v->>12, v->>13, v->>14,
                v->>15, v->>16, $18, $18, $18, u.done
            FROM json_array_elements($20::json) v
            LEFT JOIN unnest($21::text[], $22::text[], $23::int8[]) AS u(task_uuid, state, done)
                ON u.task_uuid = v->>0
            ON CONFLICT (identity_hash) DO NOTHING
            RETURNING task_uuid),
         st AS (
            INSERT INTO steps (step_uuid, task_uuid, seq, name, namespace, callable, step_type,
                definition, inputs, state, max_attempts, priority, timeout_ms, enqueued_at,
                created_at, updated_at)
            SELECT v->>0, v->>1, (v->>2)::int8, v->>3, v->>4, v->>5, v->>6, v->>7, v->>8,
                COALESCE(m.state, 'pending'), (v->>9)::int8, (v->>10)::int8, (v->>11)::int8,
                CASE WHEN m.state = 'enqueued' THEN $18 END, $18, $18
            FROM json_array_elements($24::json) v
            LEFT JOIN unnest($25::text[], $26::text[]) AS m(step_uuid, state)
                ON m.step_uuid = v->>0
            WHERE v->>1 IN (SELECT task_uuid FROM ins)),
         ed AS (
            INSERT INTO step_edges (task_uuid, from_step, to_step)
            SELECT v->>0, v->>1, v->>2 FROM json_array_elements($27::json) v
            WHERE v->>0 IN (SELECT task_uuid FROM ins)),
         str AS (
            INSERT INTO step_transitions (step_uuid, task_uuid, from_state, to_state, event,
                actor, reason, attempt, created_at)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                $5::text[], $6::text[], $7::text[], $8::int8[], $9::int8[])
                AS r(step_uuid, task_uuid, from_state, to_state, event, actor, reason,
                    attempt, created_at)
            WHERE r.task_uuid IN (SELECT task_uuid FROM ins)),
         ttr AS (
            INSERT INTO task_transitions (task_uuid, from_state, to_state, event, actor,
                reason, metadata, created_at)
            SELECT * FROM unnest($10::text[], $11::text[], $12::text[], $13::text[],
                $14::text[], $15::text[], $16::text[], $17::int8[])
                AS r(task_uuid, from_state, to_state, event, actor, reason, metadata,
                    created_at)
            WHERE r.task_uuid IN (SELECT task_uuid FROM ins)),
         n1 AS (
            SELECT pg_notify($28, n) FROM unnest($29::text[]) n
            WHERE split_part(n, ' ', 1) IN (SELECT task_uuid FROM ins)),
         n2 AS (
            SELECT pg_notify($30, '') WHERE $31 AND EXISTS (SELECT 1 FROM ins))
         SELECT task_uuid FROM ins
         WHERE (SELECT COUNT(*) FROM n1) + (SELECT COUNT(*) FROM n2) >= 0",
        )
        .bind(now)
        .bind(json(&rows.snapshots)?)
        .bind(json(&rows.tasks)?)
        .bind(&u_task)
        .bind(&u_state)
        .bind(&u_done)
        .bind(json(&rows.steps)?)
        .bind(&m_step)
        .bind(&m_state)
        .bind(json(&rows.edges)?)
        .bind(TASK_CHANNEL)
        .bind(&notes)
        .bind(WORK_CHANNEL)
        .bind(work && announce)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()?;
    let known = known_identities(&mut *conn, &group.lost(&inserted)).await?;
    let created = group.resolve(tasks, &inserted, &known)?;
    Ok((created, work && !inserted.is_empty()))
}

/// A group of creations with repeated identities folded: within the group, a later task with
/// the same identity gets the earlier one.
struct Group<'a> {
    first: std::collections::HashMap<&'a str, usize>,
    candidates: Vec<&'a NewTask>,
}

impl<'a> Group<'a> {
    fn of(tasks: &'a [NewTask]) -> Group<'a> {
        let mut first = std::collections::HashMap::new();
        let mut candidates: Vec<&NewTask> = Vec::new();
        for t in tasks {
            match &t.identity_hash {
                Some(h) if first.contains_key(h.as_str()) => {}
                Some(h) => {
                    first.insert(h.as_str(), candidates.len());
                    candidates.push(t);
                }
                None => candidates.push(t),
            }
        }
        Group { first, candidates }
    }

    /// The identities of the candidates whose insert did not go through.
    fn lost(&self, inserted: &[String]) -> Vec<&'a str> {
        self.candidates
            .iter()
            .filter(|t| !inserted.contains(&t.uuid))
            .filter_map(|t| t.identity_hash.as_deref())
            .collect()
    }

    /// What became of each of `tasks`: new, or the existing task with its identity (`known`
    /// maps the identities of [`Group::lost`] to their tasks).
    fn resolve(
        &self,
        tasks: &[NewTask],
        inserted: &[String],
        known: &std::collections::HashMap<String, String>,
    ) -> Result<Vec<Created>> {
        let is_new = |uuid: &str| inserted.iter().any(|i| i == uuid);
        let mut created = Vec::with_capacity(tasks.len());
        for t in tasks {
            if is_new(&t.uuid) {
                created.push(Created::New(t.uuid.clone()));
                continue;
            }
            let winner = t.identity_hash.as_ref().and_then(|h| {
                known.get(h).cloned().or_else(|| {
                    self.first
                        .get(h.as_str())
                        .map(|i| self.candidates[*i].uuid.clone())
                        .filter(|u| is_new(u))
                })
            });
            match winner {
                Some(uuid) => created.push(Created::Existing {
                    uuid,
                    by_key: t.identity_from_key,
                }),
                None => {
                    return Err(Error::internal(format!(
                        "task {} was neither inserted nor found by its identity",
                        t.uuid
                    )));
                }
            }
        }
        Ok(created)
    }
}

/// The tasks holding `identities`.
async fn known_identities<'c>(
    e: impl sqlx::PgExecutor<'c>,
    identities: &[&str],
) -> Result<std::collections::HashMap<String, String>> {
    let mut known = std::collections::HashMap::new();
    if identities.is_empty() {
        return Ok(known);
    }
    for r in sqlx::query("SELECT identity_hash, task_uuid FROM tasks WHERE identity_hash = ANY($1)")
        .bind(identities)
        .fetch_all(e)
        .await?
    {
        known.insert(r.try_get(0)?, r.try_get(1)?);
    }
    Ok(known)
}

// ---------------------------------------------------------------- claim

/// The claim statement and its text parameters (bound after the four fixed ones), or `None`
/// when the request cannot match anything. Other transactions' claims are skipped, not
/// waited for. The ancestors' results are gathered by key look-ups only: the `OFFSET 0`
/// subqueries cannot be turned into joins, which a planner misled about a table's size would
/// run as scans of every edge and step.
fn claim_parts(req: &ClaimRequest, base: usize) -> Option<ClaimParts> {
    if req.limit == 0 {
        return None;
    }
    let mut lists: Vec<Vec<String>> = Vec::new();
    let mut filter = String::new();
    let mut in_list = |filter: &mut String, column: &str, negate: bool, values: &[String]| {
        lists.push(values.to_vec());
        let n = base + 3 + lists.len();
        if negate {
            filter.push_str(&format!(" AND {column} <> ALL(${n})"));
        } else {
            filter.push_str(&format!(" AND {column} = ANY(${n})"));
        }
    };
    if !req.namespaces.is_empty() {
        in_list(&mut filter, "namespace", false, &req.namespaces);
    }
    match &req.callables {
        CallableFilter::Only(c) if c.is_empty() => return None,
        CallableFilter::Only(c) => in_list(&mut filter, "callable", false, c),
        CallableFilter::AnyExcept(c) if c.is_empty() => {}
        CallableFilter::AnyExcept(c) => in_list(&mut filter, "callable", true, c),
        CallableFilter::Steps(s) if s.is_empty() => return None,
        CallableFilter::Steps(s) => in_list(&mut filter, "step_uuid", false, s),
        CallableFilter::Workflows => filter.push_str(" AND step_type = 'workflow'"),
    }
    if req.callables != CallableFilter::Workflows {
        filter.push_str(" AND step_type <> 'workflow'");
    }
    if let Some(before) = req.enqueued_before {
        // A number, not user text: safe to inline.
        filter.push_str(&format!(" AND enqueued_at <= {before}"));
    }
    let limit = req.limit;
    let p = |i: usize| format!("${}", base + i - 1);
    let (worker, now, lease, timeout) = (p(1), p(2), p(3), p(4));
    let ctes = format!(
        "picked AS (
            SELECT step_uuid FROM steps WHERE state = 'enqueued'{filter}
            ORDER BY priority DESC, enqueued_at LIMIT {limit}
            FOR UPDATE SKIP LOCKED),
         claimed AS (
            UPDATE steps s SET state = 'in_progress', attempts = s.attempts + 1,
                worker_id = {worker}, lease_expires_at = {now} + {lease},
                started_at = GREATEST({now}, COALESCE(s.enqueued_at, {now})),
                updated_at = {now}, next_attempt_at = NULL,
                timeout_at = {now} + COALESCE(s.timeout_ms, {timeout})
            FROM picked WHERE s.step_uuid = picked.step_uuid
            RETURNING s.step_uuid, s.task_uuid, s.name, s.attempts, s.definition, s.inputs,
                s.checkpoint, s.timeout_at, s.started_at, s.namespace, s.step_type, s.priority,
                s.enqueued_at)"
    );
    // A claim that writes its own audit rows (instead of handing them to a journal).
    let recorded = format!(
        "recorded AS (
            INSERT INTO step_transitions (step_uuid, task_uuid, from_state, to_state, event,
                actor, reason, attempt, created_at)
            SELECT step_uuid, task_uuid, '{from}', '{to}', '{event}', {worker}, NULL, attempts,
                started_at
            FROM claimed",
        from = StepState::Enqueued.as_str(),
        to = step_transition(StepState::Enqueued, StepEvent::Claim)
            .map(StepState::as_str)
            .unwrap_or("in_progress"),
        event = StepEvent::Claim.as_str(),
    );
    let select = "SELECT c.step_uuid, c.task_uuid, c.name, c.attempts, c.definition,
            c.inputs, c.checkpoint, c.timeout_at, c.started_at, c.namespace, c.priority,
            c.enqueued_at,
            json_build_array(t.name, t.version, t.correlation_id, t.context::json,
                t.template_hash)::text AS task,
            (WITH RECURSIVE anc(id) AS (
                SELECT from_step FROM step_edges WHERE to_step = c.step_uuid
                UNION
                SELECT e.from_step FROM anc, LATERAL (
                    SELECT from_step FROM step_edges WHERE to_step = anc.id OFFSET 0) e)
             SELECT COALESCE(json_object_agg(a.name, a.result::json), '{}')::text
             FROM anc, LATERAL (
                SELECT name, result FROM steps WHERE step_uuid = anc.id
                  AND state IN ('complete', 'resolved_manually') OFFSET 0) a)
              AS dependency_results,
            CASE WHEN c.step_type = 'deferred_convergence' THEN
              (SELECT COALESCE(json_object_agg(p.name, p.error::json), '{}')::text
               FROM step_edges e JOIN steps p ON p.step_uuid = e.from_step
               WHERE e.to_step = c.step_uuid AND p.state = 'error') END AS failed_dependencies
         FROM claimed c JOIN tasks t ON t.task_uuid = c.task_uuid"
        .to_string();
    Some(ClaimParts {
        ctes,
        recorded,
        select,
        lists,
        limit,
    })
}

/// The pieces of a claim statement whose parameters start at `$base`: the worker id, now,
/// the lease and the default timeout, then the filter's lists.
struct ClaimParts {
    /// `picked` (the rows taken, skipping those other claims hold) and `claimed` (updated).
    ctes: String,
    /// `recorded`, open-ended: its `FROM claimed` may be followed by a condition.
    recorded: String,
    /// The claimed jobs, with what a handler needs of their task and ancestors.
    select: String,
    lists: Vec<Vec<String>>,
    limit: usize,
}

/// The claim statement and its text parameters (bound after the four fixed ones), or `None`
/// when the request cannot match anything; `record` makes it write its own audit rows.
fn claim_statement(req: &ClaimRequest, record: bool) -> Option<(String, Vec<Vec<String>>)> {
    let c = claim_parts(req, 1)?;
    let recorded = if record {
        format!(", {})", c.recorded)
    } else {
        String::new()
    };
    let sql = format!(
        "WITH {}{recorded} {} ORDER BY c.priority DESC, c.enqueued_at",
        c.ctes, c.select
    );
    Some((sql, c.lists))
}

/// Claims ready steps and writes the journal `j` in one statement (and its outbox records, if
/// any, in a second, as [`flush`] does): the journal's audit rows, then the claim's (ordered after them, so that a
/// step's `enqueued` row precedes its `in_progress` one), the task-state changes and the
/// announcements.
///
/// When the claim came back short, it took every ready step this process's worker loop can
/// run: the work announcement then names this process (`me`), whose listener does not wake
/// its own workers for nothing (the process wakes them itself when they have something to
/// do). Other processes are woken as always.
async fn claim_and_write(
    tx: &mut PgConnection,
    j: &mut Journal,
    req: &ClaimRequest,
    me: &str,
    now: Millis,
) -> Result<Vec<StepJob>> {
    let Some(c) = claim_parts(req, 27) else {
        flush(tx, j).await?;
        return Ok(Vec::new());
    };
    let d = j.drain();
    let work = d.work_enqueued_before || d.steps.iter().any(|s| s.to == StepState::Enqueued);
    let sql = format!(
        "WITH {JOURNAL_CTES},
         {ctes},
         {recorded} WHERE (SELECT COUNT(*) FROM st) >= 0),
         n2 AS (SELECT pg_notify($24, CASE WHEN (SELECT COUNT(*) FROM claimed) < {limit}
                THEN $26 ELSE '' END) WHERE $25)
         SELECT n.sent, c.*
         FROM (SELECT (SELECT COUNT(*) FROM n1) + (SELECT COUNT(*) FROM n2) AS sent) n
         LEFT JOIN ({select}) c ON true
         ORDER BY c.priority DESC, c.enqueued_at",
        ctes = c.ctes,
        recorded = c.recorded,
        limit = c.limit,
        select = c.select,
    );
    let a = JournalArrays::of(&d);
    let mut q = a
        .bind(AssertSqlSafe(sql))
        .bind(WORK_CHANNEL)
        .bind(work)
        .bind(me)
        .bind(&req.worker_id)
        .bind(now)
        .bind(req.lease_ms)
        .bind(req.default_timeout_ms);
    for l in &c.lists {
        q = q.bind(l);
    }
    let found = q.fetch_all(&mut *tx).await?;
    // The statement wrote the claim's transitions; the journal only checks them.
    let mut recorded = Journal::default();
    let mut jobs = Vec::with_capacity(found.len());
    for row in &found {
        if row.try_get::<Option<String>, _>("step_uuid")?.is_some() {
            jobs.push(rows::claimed_job(row, &mut recorded, req)?);
        }
    }
    write_outbox(tx, &d).await?;
    Ok(jobs)
}

/// Claims ready steps; their transitions go into `j`.
async fn claim(
    tx: &mut PgConnection,
    j: &mut Journal,
    req: &ClaimRequest,
    now: Millis,
) -> Result<Vec<StepJob>> {
    let Some((sql, lists)) = claim_statement(req, false) else {
        return Ok(Vec::new());
    };
    // Every process looks for workflow steps on each poll; most of the time there are none,
    // and a plain read of the partial index says so without locking anything.
    if req.callables == CallableFilter::Workflows {
        let any: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM steps WHERE state = 'enqueued' AND step_type = 'workflow')",
        )
        .fetch_one(&mut *tx)
        .await?;
        if !any {
            return Ok(Vec::new());
        }
    }
    let mut q = sqlx::query(AssertSqlSafe(sql))
        .bind(&req.worker_id)
        .bind(now)
        .bind(req.lease_ms)
        .bind(req.default_timeout_ms);
    for l in lists {
        q = q.bind(l);
    }
    let found = q.fetch_all(&mut *tx).await?;
    found
        .iter()
        .map(|row| rows::claimed_job(row, j, req))
        .collect()
}

/// A claim as one statement, which is its own transaction and records its transitions: what
/// a worker looking for work runs (most of these find nothing, and then cost one round trip).
/// Workflow steps are claimed by [`claim_and_flush`].
pub(super) async fn claim_at_once(
    pool: &PgPool,
    req: &ClaimRequest,
    now: Millis,
) -> Result<Vec<StepJob>> {
    let Some((sql, lists)) = claim_statement(req, true) else {
        return Ok(Vec::new());
    };
    let mut q = sqlx::query(AssertSqlSafe(sql))
        .bind(&req.worker_id)
        .bind(now)
        .bind(req.lease_ms)
        .bind(req.default_timeout_ms);
    for l in lists {
        q = q.bind(l);
    }
    let found = q.fetch_all(pool).await?;
    // The statement wrote the transitions; the journal only checks them.
    let mut recorded = Journal::default();
    found
        .iter()
        .map(|row| rows::claimed_job(row, &mut recorded, req))
        .collect()
}

pub(super) async fn claim_and_flush(
    tx: &mut PgConnection,
    req: &ClaimRequest,
    now: Millis,
) -> Result<Vec<StepJob>> {
    let mut j = Journal::default();
    let jobs = claim(tx, &mut j, req, now).await?;
    flush(tx, &mut j).await?;
    Ok(jobs)
}

// ---------------------------------------------------------------- results

/// Every result applied and fenced in one statement: a row changes only while its attempt is
/// still the current one (held by the reporting worker, when one reports; still expired, for
/// engine-made expiries). A step that declares `publishes_events` returns what its events'
/// metadata needs.
///
/// First it locks the rows of the results' tasks in uuid order, by key look-ups (the one-time
/// condition runs before any step row is taken): the settling that follows, a
/// statement with a snapshot of its own, then sees every transaction that moved those tasks
/// before. Two processes finishing the two parents of a join would otherwise both miss it.
const FINISH: &str = "
WITH locked AS (
  SELECT 1 FROM tasks WHERE task_uuid IN (
    SELECT l.task_uuid FROM unnest($8::text[]) u(id),
      LATERAL (SELECT task_uuid FROM steps WHERE step_uuid = u.id OFFSET 0) l)
  ORDER BY task_uuid FOR UPDATE)
UPDATE steps s SET state = r.state, result = COALESCE(r.result, s.result),
    error = COALESCE(r.error, s.error), completed_at = COALESCE(r.completed_at, s.completed_at),
    next_attempt_at = r.next_attempt_at, lease_expires_at = NULL, timeout_at = NULL,
    started_at = COALESCE(r.started_at, s.started_at), updated_at = $1
FROM unnest($2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::int8[], $8::text[],
            $9::int8[], $10::text[], $11::int8[], $12::int8[], $13::int8[])
    AS r(state, result, error, completed_at, next_attempt_at, started_at, step_uuid, attempt,
         worker, timeout_guard, lease_guard, idx)
WHERE s.step_uuid = r.step_uuid AND s.state = 'in_progress' AND s.attempts = r.attempt
  AND (r.worker IS NULL OR s.worker_id = r.worker)
  AND (r.timeout_guard IS NULL OR s.timeout_at <= r.timeout_guard)
  AND (r.lease_guard IS NULL OR s.lease_expires_at <= r.lease_guard)
  AND (SELECT COUNT(*) FROM locked) >= 0
RETURNING 'f', r.idx, s.task_uuid,
  CASE WHEN strpos(s.definition, '\"publishes_events\"') > 0 THEN json_build_array(s.name,
    s.namespace, (SELECT correlation_id FROM tasks t WHERE t.task_uuid = s.task_uuid),
    s.definition::json -> 'publishes_events')::text END";

/// Steps a result creates: inserted unless the task has a step of that name (rows tagged `x`
/// for those inserted), numbered after the task's last step, with the task's namespace and
/// priority. Rows: see [`expansion_rows`].
const INSERT_STEPS: &str = "
INSERT INTO steps (step_uuid, task_uuid, seq, name, namespace, callable, step_type, definition,
    inputs, state, max_attempts, priority, timeout_ms, batch_group, batch_parallelism,
    batch_strategy, created_at, updated_at)
SELECT v.value->>0, t.task_uuid,
    (SELECT COALESCE(MAX(seq), 0) FROM steps s WHERE s.task_uuid = t.task_uuid) + v.ord,
    v.value->>2, t.namespace, v.value->>3, v.value->>4, v.value->>5, v.value->>6, 'pending',
    (v.value->>7)::int8, t.priority, (v.value->>8)::int8, v.value->>9, (v.value->>10)::int8,
    v.value->>11, $1, $1
FROM json_array_elements($2::json) WITH ORDINALITY AS v(value, ord)
JOIN tasks t ON t.task_uuid = v.value->>1
ON CONFLICT (task_uuid, name) DO NOTHING
RETURNING 'x', step_uuid, task_uuid";

/// Edges `[task, parent name, child name]` between steps that exist, into children that have
/// not started.
const INSERT_EDGES: &str = "
INSERT INTO step_edges (task_uuid, from_step, to_step)
SELECT p.task_uuid, p.step_uuid, c.step_uuid FROM json_array_elements($1::json) v
JOIN steps p ON p.task_uuid = v->>0 AND p.name = v->>1
JOIN steps c ON c.task_uuid = v->>0 AND c.name = v->>2
WHERE c.state = 'pending'
ON CONFLICT DO NOTHING";

/// Batch workers (SPEC §7, `failure_strategy: fail_fast`) that failed for good in this
/// transaction (their row changed at `$1`) cancel the other unfinished workers of their group
/// (rows tagged `k`, with their state before and the failed worker's name).
const FAIL_FAST: &str = "
WITH k AS (
  SELECT DISTINCT ON (s.step_uuid) s.step_uuid, s.task_uuid, s.state, f.name
  FROM steps f JOIN steps s ON s.task_uuid = f.task_uuid AND s.batch_group = f.batch_group
  WHERE f.updated_at = $1 AND f.step_uuid = ANY($2) AND f.state = 'error'
    AND f.batch_strategy = 'fail_fast' AND s.step_uuid <> f.step_uuid
    AND s.state IN ('pending', 'enqueued', 'in_progress', 'waiting_for_retry')
  ORDER BY s.step_uuid, f.name),
u AS (
  UPDATE steps SET state = 'cancelled', lease_expires_at = NULL, timeout_at = NULL,
      next_attempt_at = NULL, completed_at = $1, updated_at = $1
  WHERE step_uuid IN (SELECT step_uuid FROM k))
SELECT 'k', step_uuid, task_uuid, state, name FROM k";

/// Applies `results`, settles their tasks and runs `claim`; everything is journaled and
/// flushed.
pub(super) async fn finish(
    tx: &mut PgConnection,
    results: &[AttemptResult],
    actor: &str,
    claim_req: Option<(&ClaimRequest, &str)>,
    now: Millis,
) -> Result<(Vec<FinishReport>, Vec<StepJob>)> {
    let (claim_req, me) = match claim_req {
        Some((req, me)) => (Some(req), Some(me)),
        None => (None, None),
    };
    let mut j = Journal::default();
    let mut targets: Vec<Target> = Vec::with_capacity(results.len());
    let mut applied: Vec<Option<String>> = vec![None; results.len()];
    let mut cols = FinishColumns::default();
    for (i, r) in results.iter().enumerate() {
        let (target, f) = finish_row(r, now)?;
        targets.push(target);
        cols.push(f, i as i64);
    }
    let mut rows = Rows::new(results, &targets, &mut applied, claim_req, actor, now);
    if !results.is_empty() {
        let found = sqlx::query(FINISH)
            .bind(now)
            .bind(&cols.state)
            .bind(&cols.result)
            .bind(&cols.error)
            .bind(&cols.completed_at)
            .bind(&cols.next_attempt_at)
            .bind(&cols.started_at)
            .bind(&cols.step_uuid)
            .bind(&cols.attempt)
            .bind(&cols.worker)
            .bind(&cols.timeout_guard)
            .bind(&cols.lease_guard)
            .bind(&cols.index)
            .fetch_all(&mut *tx)
            .await?;
        // The statement's rows come in no particular order: journal in result order.
        let mut found: Vec<&PgRow> = found.iter().collect();
        found.sort_by_key(|r| r.int_at(1).unwrap_or(i64::MAX));
        rows.absorb(&mut j, &found)?;
        let (mut new_steps, mut new_edges) = (Vec::new(), Vec::new());
        for (r, task) in results.iter().zip(rows.applied.iter()) {
            if let (Some(x), Some(task)) = (&r.expansion, task) {
                expansion_rows(task, x, &mut new_steps, &mut new_edges)?;
            }
        }
        if !new_steps.is_empty() {
            let created = sqlx::query(INSERT_STEPS)
                .bind(now)
                .bind(json(&new_steps)?)
                .fetch_all(&mut *tx)
                .await?;
            rows.absorb(&mut j, &created)?;
        }
        if !new_edges.is_empty() {
            sqlx::query(INSERT_EDGES)
                .bind(json(&new_edges)?)
                .execute(&mut *tx)
                .await?;
        }
        let failed: Vec<&str> = results
            .iter()
            .filter(|r| matches!(r.resolution, Resolution::Failed { .. }))
            .map(|r| r.step_uuid.as_str())
            .collect();
        if !failed.is_empty() {
            let killed = sqlx::query(FAIL_FAST)
                .bind(now)
                .bind(&failed)
                .fetch_all(&mut *tx)
                .await?;
            rows.absorb(&mut j, &killed)?;
        }
        let mut tasks: Vec<&str> = Vec::new();
        for t in rows.applied.iter().flatten() {
            if !tasks.contains(&t.as_str()) {
                tasks.push(t);
            }
        }
        let tasks: Vec<String> = tasks.into_iter().map(str::to_string).collect();
        let found = settle_rows(
            tx,
            &tasks.iter().map(String::as_str).collect::<Vec<_>>(),
            now,
        )
        .await?;
        rows.absorb(&mut j, &found)?;
    }
    let mut events = std::mem::take(&mut rows.events);
    let (tallies, _) = rows.into_parts();
    let reports = reports(
        tx,
        &mut j,
        results,
        applied,
        &tallies,
        &mut events,
        actor,
        now,
    )
    .await?;
    // The claim of what became ready and the journal travel together.
    let jobs = match (claim_req, me) {
        (Some(req), Some(me)) => claim_and_write(tx, &mut j, req, me, now).await?,
        (Some(req), None) => {
            let jobs = claim(tx, &mut j, req, now).await?;
            flush(tx, &mut j).await?;
            jobs
        }
        (None, _) => {
            flush(tx, &mut j).await?;
            Vec::new()
        }
    };
    Ok((reports, jobs))
}

/// The columns of [`FINISH`]'s `unnest`.
#[derive(Default)]
struct FinishColumns {
    state: Vec<&'static str>,
    result: Vec<Option<String>>,
    error: Vec<Option<String>>,
    completed_at: Vec<Option<i64>>,
    next_attempt_at: Vec<Option<i64>>,
    started_at: Vec<Option<i64>>,
    step_uuid: Vec<String>,
    attempt: Vec<i64>,
    worker: Vec<Option<String>>,
    timeout_guard: Vec<Option<i64>>,
    lease_guard: Vec<Option<i64>>,
    index: Vec<i64>,
}

impl FinishColumns {
    fn push(&mut self, f: crate::store::apply::FinishRow, index: i64) {
        self.state.push(f.to.as_str());
        self.result.push(f.result);
        self.error.push(f.error);
        self.completed_at.push(f.completed_at);
        self.next_attempt_at.push(f.next_attempt_at);
        self.started_at.push(f.started_at);
        self.step_uuid.push(f.step_uuid);
        self.attempt.push(f.attempt);
        self.worker.push(f.worker);
        self.timeout_guard.push(f.timeout_guard);
        self.lease_guard.push(f.lease_guard);
        self.index.push(index);
    }
}

/// Settles each task with an applied result and reports every result (explaining and
/// recording those that did not apply).
#[allow(clippy::too_many_arguments)]
async fn reports(
    tx: &mut PgConnection,
    j: &mut Journal,
    results: &[AttemptResult],
    applied: Vec<Option<String>>,
    tallies: &Tallies,
    events: &mut [Vec<crate::events::DomainEvent>],
    actor: &str,
    now: Millis,
) -> Result<Vec<FinishReport>> {
    let mut settled: Vec<(String, TaskState)> = Vec::new();
    for task_uuid in applied.iter().flatten() {
        if !settled.iter().any(|(t, _)| t == task_uuid) {
            let state = settle_task(
                j,
                tallies,
                task_uuid,
                SettleCause::StepResult,
                actor,
                None,
                now,
            )?;
            settled.push((task_uuid.clone(), state));
        }
    }
    let mut out = Vec::with_capacity(results.len());
    for (i, (r, applied)) in results.iter().zip(applied).enumerate() {
        out.push(match applied {
            Some(task_uuid) => FinishReport {
                step_uuid: r.step_uuid.clone(),
                task_state: settled
                    .iter()
                    .find(|(t, _)| *t == task_uuid)
                    .map(|(_, s)| *s),
                task_uuid: Some(task_uuid),
                completion: Completion::Accepted,
                events: std::mem::take(&mut events[i]),
            },
            None => reject(tx, r, now).await?,
        });
    }
    Ok(out)
}

async fn current(tx: &mut PgConnection, step_uuid: &str) -> Result<Option<Current>> {
    let sql = format!("SELECT {CURRENT_COLUMNS} FROM steps WHERE step_uuid = $1 FOR UPDATE");
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(step_uuid)
        .fetch_optional(&mut *tx)
        .await?;
    row.as_ref().map(rows::current).transpose()
}

async fn record_rejection(tx: &mut PgConnection, r: Rejection<'_>, now: Millis) -> Result<()> {
    sqlx::query(
        "INSERT INTO rejected_completions (step_uuid, task_uuid, attempt, worker_id, reason, outcome, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(r.step_uuid)
    .bind(r.task_uuid)
    .bind(i64::from(r.attempt))
    .bind(r.worker)
    .bind(r.reason)
    .bind(r.outcome)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Explains why a result did not apply and records late completions.
async fn reject(tx: &mut PgConnection, r: &AttemptResult, now: Millis) -> Result<FinishReport> {
    let c = current(tx, &r.step_uuid).await?;
    let (report, late) = rejected(r, c.as_ref(), now);
    if let Some(rejection) = late {
        record_rejection(tx, rejection, now).await?;
    }
    Ok(report)
}

// ---------------------------------------------------------------- attempts

/// Stores a checkpoint for the current attempt, with its new lease and timeout.
pub(super) async fn checkpoint(
    tx: &mut PgConnection,
    step_uuid: &str,
    (attempt, worker_id): (u32, &str),
    cp: &Checkpoint,
    (lease_until, timeout_at): (Millis, Millis),
    now: Millis,
) -> Result<Completion> {
    let Some(c) = current(tx, step_uuid).await? else {
        return Ok(Completion::Rejected("no such step".into()));
    };
    if let Some(rejection) = stale_checkpoint(step_uuid, &c, attempt, worker_id, cp, now) {
        let reason = rejection.reason.clone();
        record_rejection(tx, rejection, now).await?;
        return Ok(Completion::Rejected(reason));
    }
    let history = c.checkpoint_history.clone();
    let history = checkpoint_history(history, cp, attempt, now)?;
    let mut j = Journal::default();
    let state = j.step_moves(
        step_uuid,
        &c.task_uuid,
        c.state,
        &[StepEvent::Checkpoint],
        Some(attempt),
        worker_id,
        None,
        now,
    )?;
    sqlx::query(
        "UPDATE steps SET state = $1, updated_at = $2, checkpoint = $3, checkpoint_history = $4,
            lease_expires_at = $5, timeout_at = $6 WHERE step_uuid = $7",
    )
    .bind(state.as_str())
    .bind(now)
    .bind(json(cp)?)
    .bind(history)
    .bind(lease_until)
    .bind(timeout_at)
    .bind(step_uuid)
    .execute(&mut *tx)
    .await?;
    flush(tx, &mut j).await?;
    Ok(Completion::Accepted)
}

/// Extends the leases of the listed attempts still held by `worker_id` (a superseded attempt
/// stays expired). A row another transaction holds is skipped, not waited for: that
/// transaction is recording the attempt's result or its expiry, and waiting could deadlock
/// with a batch of results that takes the same rows in another order.
pub(super) async fn renew_leases(
    pool: &PgPool,
    worker_id: &str,
    attempts: &[(String, u32)],
    lease_until: Millis,
    now: Millis,
) -> Result<u64> {
    let steps: Vec<&str> = attempts.iter().map(|(s, _)| s.as_str()).collect();
    let numbers: Vec<i64> = attempts.iter().map(|(_, a)| i64::from(*a)).collect();
    Ok(sqlx::query(
        "UPDATE steps s SET lease_expires_at = $1, updated_at = $2
         FROM (
            SELECT h.step_uuid FROM unnest($4::text[], $5::int8[]) AS a(step_uuid, attempt)
            JOIN steps h ON h.step_uuid = a.step_uuid AND h.attempts = a.attempt
            WHERE h.worker_id = $3 AND h.state = 'in_progress'
            FOR UPDATE OF h SKIP LOCKED) held
         WHERE s.step_uuid = held.step_uuid",
    )
    .bind(lease_until)
    .bind(now)
    .bind(worker_id)
    .bind(&steps)
    .bind(&numbers)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Enqueues retries whose time has come and settles their tasks.
pub(super) async fn promote_due_retries(
    tx: &mut PgConnection,
    actor: &str,
    now: Millis,
) -> Result<u64> {
    sqlx::query(
        "SELECT 1 FROM tasks WHERE task_uuid IN (
            SELECT task_uuid FROM steps WHERE state = 'waiting_for_retry' AND next_attempt_at <= $1)
         ORDER BY task_uuid FOR UPDATE",
    )
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let found = sqlx::query(
        "UPDATE steps SET state = 'enqueued', enqueued_at = $1, updated_at = $1
         WHERE state = 'waiting_for_retry' AND next_attempt_at <= $1
         RETURNING step_uuid, task_uuid",
    )
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    let mut j = Journal::default();
    let mut tasks: Vec<String> = Vec::new();
    for row in &found {
        let step = row.text("step_uuid")?;
        let task = row.text("task_uuid")?;
        j.step_moves(
            &step,
            &task,
            StepState::WaitingForRetry,
            &[StepEvent::RetryReady],
            None,
            actor,
            None,
            now,
        )?;
        if !tasks.contains(&task) {
            tasks.push(task);
        }
    }
    settle_many(
        tx,
        &mut j,
        &tasks,
        SettleCause::RetryReady,
        actor,
        None,
        now,
    )
    .await?;
    flush(tx, &mut j).await?;
    Ok(found.len() as u64)
}

// ---------------------------------------------------------------- operator actions

/// Applies an operator action (SPEC §5.9) after checking the state machines, so a refused
/// action changes nothing.
pub(super) async fn operator_action(
    tx: &mut PgConnection,
    task_uuid: &str,
    action: &OperatorAction,
    actor: &str,
    reason: &str,
    now: Millis,
) -> Result<TaskState> {
    let mut j = Journal::default();
    let state = act(tx, &mut j, task_uuid, action, actor, reason, now).await?;
    flush(tx, &mut j).await?;
    Ok(state)
}

async fn locked_state(tx: &mut PgConnection, task_uuid: &str) -> Result<TaskState> {
    let s: Option<String> =
        sqlx::query_scalar("SELECT state FROM tasks WHERE task_uuid = $1 FOR UPDATE")
            .bind(task_uuid)
            .fetch_optional(&mut *tx)
            .await?;
    rows::task_state_of(s, task_uuid)
}

/// Moves a step through `events`, journaling each transition, and stores the final state
/// with `extra` assignments (`SET` items using `$1` now and `$2` the step).
#[allow(clippy::too_many_arguments)]
async fn move_step(
    tx: &mut PgConnection,
    j: &mut Journal,
    step_uuid: &str,
    task_uuid: &str,
    from: StepState,
    event: StepEvent,
    actor: &str,
    reason: Option<&str>,
    extra: &str,
    now: Millis,
) -> Result<()> {
    let state = j.step_moves(
        step_uuid,
        task_uuid,
        from,
        &[event],
        None,
        actor,
        reason,
        now,
    )?;
    let sql = format!("UPDATE steps SET state = $3, updated_at = $1{extra} WHERE step_uuid = $2");
    sqlx::query(AssertSqlSafe(sql))
        .bind(now)
        .bind(step_uuid)
        .bind(state.as_str())
        .execute(&mut *tx)
        .await?;
    Ok(())
}

async fn act(
    tx: &mut PgConnection,
    j: &mut Journal,
    task_uuid: &str,
    action: &OperatorAction,
    actor: &str,
    reason: &str,
    now: Millis,
) -> Result<TaskState> {
    let state = locked_state(tx, task_uuid).await?;
    let given = reason;
    let reason = Some(reason);
    match action {
        OperatorAction::Cancel => {
            // Check before touching steps, so a refused cancel changes nothing.
            task_transition(state, TaskEvent::Cancel)?;
            let found = sqlx::query(
                "SELECT step_uuid, state FROM steps WHERE task_uuid = $1
                 AND state NOT IN ('complete', 'cancelled', 'resolved_manually', 'error')
                 ORDER BY seq",
            )
            .bind(task_uuid)
            .fetch_all(&mut *tx)
            .await?;
            for row in found {
                let s: StepState = parse_state(&row.text("state")?)?;
                move_step(
                    tx,
                    j,
                    &row.text("step_uuid")?,
                    task_uuid,
                    s,
                    StepEvent::Cancel,
                    actor,
                    reason,
                    ", lease_expires_at = NULL, timeout_at = NULL, completed_at = $1",
                    now,
                )
                .await?;
            }
            let cancelled =
                j.task_moves(task_uuid, state, &[TaskEvent::Cancel], actor, reason, now)?;
            // Cancelling a parent cancels the child workflows its steps started (SPEC §8), in
            // this same transaction, and theirs in turn.
            let children: Vec<String> = sqlx::query_scalar(
                "SELECT task_uuid FROM tasks WHERE parent_task_uuid = $1
                 AND state NOT IN ('complete', 'error', 'cancelled', 'resolved_manually')
                 ORDER BY task_uuid",
            )
            .bind(task_uuid)
            .fetch_all(&mut *tx)
            .await?;
            let why = format!("parent task {task_uuid} was cancelled: {given}");
            for child in children {
                Box::pin(act(tx, j, &child, action, actor, &why, now)).await?;
            }
            Ok(cancelled)
        }
        OperatorAction::GiveUp => {
            j.task_moves(task_uuid, state, &[TaskEvent::GiveUp], actor, reason, now)
        }
        OperatorAction::ResolveManually => j.task_moves(
            task_uuid,
            state,
            &[TaskEvent::ManualResolution],
            actor,
            reason,
            now,
        ),
        OperatorAction::ResetStep { step }
        | OperatorAction::ResolveStep { step }
        | OperatorAction::CompleteStep { step, .. } => {
            if state.is_terminal() {
                return Err(Error::new(
                    ErrorKind::InvalidTransition,
                    format!("task {task_uuid} is {state}; its steps can no longer be changed"),
                ));
            }
            let row = sqlx::query(
                "SELECT step_uuid, state FROM steps WHERE task_uuid = $1
                 AND (step_uuid = $2 OR name = $2) FOR UPDATE",
            )
            .bind(task_uuid)
            .bind(step)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::not_found(format!("task {task_uuid} has no step {step:?}")))?;
            let step_uuid = row.text("step_uuid")?;
            let s: StepState = parse_state(&row.text("state")?)?;
            let (event, extra) = match action {
                OperatorAction::ResetStep { .. } => (
                    StepEvent::Reset,
                    ", attempts = 0, next_attempt_at = NULL, completed_at = NULL, \
                     enqueued_at = NULL, worker_id = NULL",
                ),
                OperatorAction::ResolveStep { .. } => (
                    StepEvent::ResolveManually,
                    ", completed_at = $1, lease_expires_at = NULL, timeout_at = NULL",
                ),
                _ => (
                    StepEvent::CompleteManually,
                    ", completed_at = $1, lease_expires_at = NULL, timeout_at = NULL",
                ),
            };
            move_step(
                tx, j, &step_uuid, task_uuid, s, event, actor, reason, extra, now,
            )
            .await?;
            if let OperatorAction::CompleteStep { result, .. } = action {
                sqlx::query("UPDATE steps SET result = $1 WHERE step_uuid = $2")
                    .bind(json(result)?)
                    .bind(&step_uuid)
                    .execute(&mut *tx)
                    .await?;
                expand_completed(tx, j, task_uuid, &step_uuid, result, actor, now).await?;
            }
            let states = settle_many(
                tx,
                j,
                &[task_uuid.to_string()],
                SettleCause::OperatorFix,
                actor,
                reason,
                now,
            )
            .await?;
            Ok(states[0])
        }
    }
}

/// A decision or analyzer completed by an operator creates the steps its result asks for (see
/// [`operator_expansion`]).
async fn expand_completed(
    tx: &mut PgConnection,
    j: &mut Journal,
    task_uuid: &str,
    step_uuid: &str,
    result: &Value,
    actor: &str,
    now: Millis,
) -> Result<()> {
    let row = sqlx::query(
        "SELECT s.name, s.step_type, ts.definition AS template FROM steps s
         JOIN tasks t ON t.task_uuid = s.task_uuid
         JOIN template_snapshots ts ON ts.content_hash = t.template_hash
         WHERE s.step_uuid = $1 AND s.step_type IN ('decision', 'batchable')",
    )
    .bind(step_uuid)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else { return Ok(()) };
    let x = operator_expansion(
        &row.text("name")?,
        &row.text("step_type")?,
        &row.text("template")?,
        result,
    )?;
    if x.steps.is_empty() {
        return Ok(());
    }
    let (mut steps, mut edges) = (Vec::new(), Vec::new());
    expansion_rows(task_uuid, &x, &mut steps, &mut edges)?;
    let created = sqlx::query(INSERT_STEPS)
        .bind(now)
        .bind(json(&steps)?)
        .fetch_all(&mut *tx)
        .await?;
    for row in created {
        j.step_created(&row.text_at(1)?, task_uuid, actor, now);
    }
    sqlx::query(INSERT_EDGES)
        .bind(json(&edges)?)
        .execute(&mut *tx)
        .await?;
    Ok(())
}
