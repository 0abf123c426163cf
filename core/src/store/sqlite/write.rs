//! SQLite writes shared by every transaction: templates, task creation, recorded state moves
//! and task settling. Each function runs inside a transaction opened by the caller; business
//! decisions (retry, evaluation) come from `orchestrator` and `state`.

use std::collections::HashMap;

use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Row, SqliteConnection};

use super::journal::Journal;

use crate::clock::Millis;
use crate::orchestrator::{SettleCause, settle_events};
use crate::state::{StepCounts, StepEvent, StepState, TaskEvent, TaskState};
use crate::store::{Created, NewTask, TemplatePut};
use crate::template::TaskTemplate;
use crate::{Error, ErrorKind, Result};

pub(super) fn json(v: &impl serde::Serialize) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::internal(format!("cannot encode JSON: {e}")))
}

pub(super) async fn put_template(
    tx: &mut SqliteConnection,
    t: &TaskTemplate,
    force: bool,
    now: Millis,
) -> Result<TemplatePut> {
    let hash = t.content_hash();
    let existing: Option<String> = sqlx::query_scalar(
        "SELECT content_hash FROM templates WHERE namespace = $1 AND name = $2 AND version = $3",
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
    sqlx::query(
        "INSERT INTO templates (namespace, name, version, content_hash, definition, registered_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $6)
         ON CONFLICT (namespace, name, version)
         DO UPDATE SET content_hash = excluded.content_hash, definition = excluded.definition,
                       updated_at = excluded.updated_at",
    )
    .bind(&t.namespace)
    .bind(&t.name)
    .bind(&t.version)
    .bind(&hash)
    .bind(&def)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT OR IGNORE INTO template_snapshots (content_hash, definition) VALUES ($1, $2)",
    )
    .bind(&hash)
    .bind(&def)
    .execute(&mut *tx)
    .await?;
    Ok(outcome)
}

/// Creates one task; its transitions go into `j`, which the caller flushes.
pub(super) async fn create_task(
    tx: &mut SqliteConnection,
    j: &mut Journal,
    task: &NewTask,
    actor: &str,
    now: Millis,
) -> Result<Created> {
    if let Some(identity) = &task.identity_hash {
        let existing: Option<String> =
            sqlx::query_scalar("SELECT task_uuid FROM tasks WHERE identity_hash = $1")
                .bind(identity)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(uuid) = existing {
            return Ok(Created::Existing {
                uuid,
                by_key: task.identity_from_key,
            });
        }
    }
    let t = &task.template;
    let hash = &task.template_hash;
    let r = &task.request;
    // The snapshot and the task row go in one round trip.
    sqlx::query(
        "INSERT OR IGNORE INTO template_snapshots (content_hash, definition) VALUES ($5, $17);
         INSERT INTO tasks (task_uuid, namespace, name, version, template_hash, state, context,
            initiator, source_system, reason, tags, priority, correlation_id, parent_correlation_id,
            idempotency_key, identity_hash, created_at, updated_at, state_entered_at)
         VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $16, $16)",
    )
    .bind(&task.uuid)
    .bind(&t.namespace)
    .bind(&t.name)
    .bind(&t.version)
    .bind(hash)
    .bind(json(&r.context)?)
    .bind(&r.initiator)
    .bind(&r.source_system)
    .bind(&r.reason)
    .bind(json(&r.tags)?)
    .bind(r.priority)
    .bind(&task.correlation_id)
    .bind(&r.parent_correlation_id)
    .bind(&r.idempotency_key)
    .bind(&task.identity_hash)
    .bind(now)
    .bind(task.template_json.as_ref())
    .execute(&mut *tx)
    .await?;
    j.task_created(&task.uuid, actor, now);
    insert_steps(
        tx,
        j,
        &task.uuid,
        &t.namespace,
        r.priority,
        &task.steps,
        &task.edges,
        actor,
        now,
    )
    .await?;
    settle(tx, j, &task.uuid, SettleCause::Start, actor, None, now).await?;
    Ok(Created::New(task.uuid.clone()))
}

/// Inserts steps in `pending` with their edges (edges name steps of `steps` or existing steps
/// of the task), in one multi-row statement each.
#[allow(clippy::too_many_arguments)]
pub(super) async fn insert_steps(
    tx: &mut SqliteConnection,
    j: &mut Journal,
    task_uuid: &str,
    namespace: &str,
    priority: i32,
    steps: &[crate::store::NewStep],
    edges: &[(String, String)],
    actor: &str,
    now: Millis,
) -> Result<()> {
    if steps.is_empty() && edges.is_empty() {
        return Ok(());
    }
    let base_seq: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM steps WHERE task_uuid = $1")
            .bind(task_uuid)
            .fetch_one(&mut *tx)
            .await?;
    // 9 parameters per row keeps a chunk of 500 rows far below SQLite's parameter limit.
    for (c, chunk) in steps.chunks(500).enumerate() {
        let rows: Vec<String> = (0..chunk.len())
            .map(|i| {
                let b = 4 + i * 9;
                format!(
                    "(${}, $1, ${}, ${}, $2, ${}, ${}, ${}, ${}, 'pending', ${}, $3, ${}, $4, $4)",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 7,
                    b + 8,
                    b + 9
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO steps (step_uuid, task_uuid, seq, name, namespace, callable, step_type,
                definition, inputs, state, max_attempts, priority, timeout_ms, created_at, updated_at)
             VALUES {}",
            rows.join(", ")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .bind(task_uuid)
            .bind(namespace)
            .bind(priority)
            .bind(now);
        for (i, s) in chunk.iter().enumerate() {
            let d = &s.definition;
            q = q
                .bind(&s.uuid)
                .bind(base_seq + 1 + (c * 500 + i) as i64)
                .bind(&d.name)
                .bind(&d.handler.callable)
                .bind(d.step_type.as_str())
                .bind(json(d)?)
                .bind(json(&s.inputs)?)
                .bind(d.retry.max_attempts as i64)
                .bind(d.timeout_seconds.map(|t| (t as i64).saturating_mul(1000)));
        }
        q.execute(&mut *tx).await?;
        for s in chunk {
            j.step_created(&s.uuid, task_uuid, actor, now);
        }
    }
    // Edge names resolve to the new steps first, then to steps the task already has.
    let mut known: std::collections::HashMap<&str, String> = steps
        .iter()
        .map(|s| (s.definition.name.as_str(), s.uuid.clone()))
        .collect();
    let missing: Vec<&str> = edges
        .iter()
        .flat_map(|(p, c)| [p.as_str(), c.as_str()])
        .filter(|n| !known.contains_key(n))
        .collect();
    for name in missing {
        let uuid: Option<String> =
            sqlx::query_scalar("SELECT step_uuid FROM steps WHERE task_uuid = $1 AND name = $2")
                .bind(task_uuid)
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let uuid = uuid.ok_or_else(|| {
            Error::internal(format!(
                "an edge names step {name}, which the task does not have"
            ))
        })?;
        known.insert(name, uuid);
    }
    for chunk in edges.chunks(1000) {
        let rows: Vec<String> = (0..chunk.len())
            .map(|i| format!("($1, ${}, ${})", 2 + 2 * i, 3 + 2 * i))
            .collect();
        let sql = format!(
            "INSERT INTO step_edges (task_uuid, from_step, to_step) VALUES {}",
            rows.join(", ")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(task_uuid);
        for (p, c) in chunk {
            q = q.bind(&known[p.as_str()]).bind(&known[c.as_str()]);
        }
        q.execute(&mut *tx).await?;
    }
    Ok(())
}

/// Moves a step through `events` (checked against the state table), journaling each
/// transition, and stores the final state.
#[allow(clippy::too_many_arguments)]
pub(super) async fn move_step(
    tx: &mut SqliteConnection,
    j: &mut Journal,
    step_uuid: &str,
    task_uuid: &str,
    from: StepState,
    events: &[StepEvent],
    attempt: Option<u32>,
    actor: &str,
    reason: Option<&str>,
    now: Millis,
) -> Result<StepState> {
    let state = j.step_moves(
        step_uuid, task_uuid, from, events, attempt, actor, reason, now,
    )?;
    sqlx::query("UPDATE steps SET state = $1, updated_at = $2 WHERE step_uuid = $3")
        .bind(state.as_str())
        .bind(now)
        .bind(step_uuid)
        .execute(&mut *tx)
        .await?;
    Ok(state)
}

pub(super) async fn task_state(tx: &mut SqliteConnection, task_uuid: &str) -> Result<TaskState> {
    let s: Option<String> = sqlx::query_scalar("SELECT state FROM tasks WHERE task_uuid = $1")
        .bind(task_uuid)
        .fetch_optional(&mut *tx)
        .await?;
    let s = s.ok_or_else(|| Error::not_found(format!("no task {task_uuid}")))?;
    parse_state(&s)
}

pub(super) fn parse_state<T: std::str::FromStr>(s: &str) -> Result<T> {
    s.parse()
        .map_err(|_| Error::internal(format!("unknown state {s:?} in the database")))
}

/// Enqueues the task's pending steps whose parents are all satisfied, then evaluates the task
/// and walks it to its next resting state. `reason` (an operator's) is recorded on the task
/// transitions it causes.
pub(super) async fn settle(
    tx: &mut SqliteConnection,
    j: &mut Journal,
    task_uuid: &str,
    cause: SettleCause,
    actor: &str,
    reason: Option<&str>,
    now: Millis,
) -> Result<TaskState> {
    let states = settle_many(tx, j, &[task_uuid.to_string()], cause, actor, reason, now).await?;
    Ok(states[0])
}

/// Tasks settled per round trip at most.
const SETTLE_CHUNK: usize = 64;

/// [`settle`] for several tasks, in one round trip per chunk: for each task, the update that
/// enqueues its ready steps and the count of its steps by state, as one multi-statement query
/// whose rows are told apart by their width (two columns: an enqueued step; four: a count).
pub(super) async fn settle_many(
    tx: &mut SqliteConnection,
    j: &mut Journal,
    tasks: &[String],
    cause: SettleCause,
    actor: &str,
    reason: Option<&str>,
    now: Millis,
) -> Result<Vec<TaskState>> {
    let mut out = Vec::with_capacity(tasks.len());
    for chunk in tasks.chunks(SETTLE_CHUNK) {
        // A task this operation already finished keeps its state; its steps are not enqueued.
        let open: Vec<&String> = chunk
            .iter()
            .filter(|t| !j.task_state(t).is_some_and(|s| s.is_terminal()))
            .collect();
        let mut sql = String::new();
        for _ in &open {
            sql.push_str(
                "UPDATE steps SET state = 'enqueued', enqueued_at = ?, updated_at = ?
                 WHERE task_uuid = ? AND state = 'pending'
                   AND NOT EXISTS (
                     SELECT 1 FROM step_edges e JOIN steps p ON p.step_uuid = e.from_step
                     WHERE e.to_step = steps.step_uuid
                       AND p.state NOT IN ('complete', 'resolved_manually'))
                   AND (SELECT state FROM tasks WHERE task_uuid = ?)
                       NOT IN ('complete', 'error', 'cancelled', 'resolved_manually')
                 RETURNING step_uuid, task_uuid;
                 SELECT t.task_uuid, t.state AS task_state, s.state AS step_state,
                        COUNT(s.step_uuid) AS n
                 FROM tasks t LEFT JOIN steps s ON s.task_uuid = t.task_uuid
                 WHERE t.task_uuid = ? GROUP BY s.state;\n",
            );
        }
        let mut ready: Vec<(String, String)> = Vec::new();
        let mut counts = Tallies::new();
        if !open.is_empty() {
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for t in &open {
                q = q.bind(now).bind(now).bind(*t).bind(*t).bind(*t);
            }
            for row in q.fetch_all(&mut *tx).await? {
                if row.len() == 2 {
                    ready.push((row.try_get(0)?, row.try_get(1)?));
                    continue;
                }
                add_count_row(&mut counts, &row, 0)?;
            }
        }
        for (step, task) in &ready {
            j.step_moves(
                step,
                task,
                StepState::Pending,
                &[StepEvent::Enqueue],
                None,
                actor,
                None,
                now,
            )?;
        }
        for task_uuid in chunk {
            if let Some(s) = j.task_state(task_uuid)
                && s.is_terminal()
            {
                out.push(s);
                continue;
            }
            out.push(settle_task(
                j, &counts, task_uuid, cause, actor, reason, now,
            )?);
        }
    }
    Ok(out)
}

/// Each task's state and the tally of its steps by state, as read by a settle.
pub(super) type Tallies = HashMap<String, (Option<TaskState>, StepCounts)>;

/// Adds one row of a tally query — task uuid, task state, step state (or NULL for a task
/// without steps), count — whose columns start at `first`.
pub(super) fn add_count_row(tallies: &mut Tallies, row: &SqliteRow, first: usize) -> Result<()> {
    let entry = tallies.entry(row.try_get(first)?).or_default();
    entry.0 = Some(parse_state(&row.try_get::<String, _>(first + 1)?)?);
    if let Some(s) = row.try_get::<Option<String>, _>(first + 2)? {
        let s: StepState = parse_state(&s)?;
        for _ in 0..row.try_get::<i64, _>(first + 3)? {
            entry.1.add(s);
        }
    }
    Ok(())
}

/// Moves a task to its next resting state from its tally (read after its ready steps were
/// enqueued), recording the transitions in `j`.
pub(super) fn settle_task(
    j: &mut Journal,
    tallies: &Tallies,
    task_uuid: &str,
    cause: SettleCause,
    actor: &str,
    reason: Option<&str>,
    now: Millis,
) -> Result<TaskState> {
    let Some((Some(db_state), step_counts)) = tallies.get(task_uuid) else {
        return Err(Error::not_found(format!("no task {task_uuid}")));
    };
    let current = j.task_state(task_uuid).unwrap_or(*db_state);
    if current.is_terminal() {
        return Ok(current);
    }
    let mut state = current;
    if cause == SettleCause::Start {
        state = j.task_moves(task_uuid, state, &[TaskEvent::Start], actor, None, now)?;
    }
    let events = settle_events(state, step_counts, cause);
    j.task_moves(task_uuid, state, &events, actor, reason, now)
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s)
        .map_err(|e| Error::internal(format!("corrupt JSON in the database: {e}")))
}
