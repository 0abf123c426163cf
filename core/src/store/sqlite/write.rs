//! SQLite writes shared by every transaction: templates, task creation, recorded state moves
//! and task settling. Each function runs inside a transaction opened by the caller; business
//! decisions (retry, evaluation) come from `orchestrator` and `state`.

use sqlx::{AssertSqlSafe, Row, SqliteConnection};

use super::journal::{Journal, Param, bind_all};

use crate::clock::Millis;
use crate::orchestrator::SettleCause;
use crate::state::{StepEvent, StepState, TaskState};
use crate::store::TemplatePut;
pub(super) use crate::store::apply::{Tallies, add_count_row, settle_task};
pub(super) use crate::store::rows::{json, parse_state};
use crate::template::TaskTemplate;
use crate::{Error, ErrorKind, Result};

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
    crate::store::rows::task_state_of(s, task_uuid)
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

/// The statements of a settle run alongside other work: the `pending` steps of the tasks that
/// `{tasks}` (a subquery) selects whose parents are all satisfied are enqueued (rows tagged
/// `e`), then those tasks' steps are tallied by state (rows tagged `c`). Parameters: see
/// [`settle_params`].
///
/// A parent satisfies its child when `complete` or `resolved_manually`, and also when it is a
/// batch worker that failed for good under the `isolate` strategy (its aggregator runs
/// anyway). Batch workers are enqueued in creation order, only while fewer than their
/// group's `parallelism` are enqueued, running or waiting to retry: ranked among the group's
/// pending workers, a worker goes when its rank plus the busy count fits the cap, which holds
/// whether SQLite evaluates the rows before or during the update.
pub(super) const SETTLE: &str =
    "UPDATE steps SET state = 'enqueued', enqueued_at = ?, updated_at = ?
     WHERE task_uuid IN ({tasks}) AND state = 'pending'
       AND NOT EXISTS (
         SELECT 1 FROM step_edges e JOIN steps p ON p.step_uuid = e.from_step
         WHERE e.to_step = steps.step_uuid AND p.state NOT IN ('complete', 'resolved_manually')
           AND NOT (p.state = 'error' AND p.batch_strategy IS 'isolate'))
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
           WHERE w.task_uuid IN ({tasks}) AND w.state = 'pending' AND w.batch_group IS NOT NULL)
         WHERE rank + busy <= cap))
     RETURNING 'e', step_uuid, task_uuid;
     SELECT 'c', t.task_uuid, t.state, s.state, COUNT(s.step_uuid)
     FROM tasks t LEFT JOIN steps s ON s.task_uuid = t.task_uuid
     WHERE t.task_uuid IN ({tasks})
     GROUP BY t.task_uuid, s.state;\n";

/// The parameters of [`SETTLE`]: `now` twice, then `tasks` (the parameter of the `{tasks}`
/// subquery) for each of its three copies.
pub(super) fn settle_params(now: Millis, tasks: Param) -> [Param; 5] {
    [
        Param::Int(Some(now)),
        Param::Int(Some(now)),
        tasks.clone(),
        tasks.clone(),
        tasks,
    ]
}

/// Tasks settled per round trip at most.
const SETTLE_CHUNK: usize = 64;

/// [`settle`] for several tasks, in one round trip per chunk: for each task, [`SETTLE`]'s
/// update that enqueues its ready steps and count of its steps by state.
pub(super) async fn settle_many(
    tx: &mut SqliteConnection,
    j: &mut Journal,
    tasks: &[String],
    cause: SettleCause,
    actor: &str,
    reason: Option<&str>,
    now: Millis,
) -> Result<Vec<TaskState>> {
    let one = SETTLE.replace("{tasks}", "?");
    let mut out = Vec::with_capacity(tasks.len());
    for chunk in tasks.chunks(SETTLE_CHUNK) {
        // A task this operation already finished keeps its state; its steps are not enqueued.
        let open: Vec<&String> = chunk
            .iter()
            .filter(|t| !j.task_state(t).is_some_and(|s| s.is_terminal()))
            .collect();
        let mut ready: Vec<(String, String)> = Vec::new();
        let mut counts = Tallies::new();
        if !open.is_empty() {
            let sql = one.repeat(open.len());
            let mut params = Vec::new();
            for t in &open {
                params.extend(settle_params(now, Param::Text(Some((*t).clone()))));
            }
            for row in bind_all(sqlx::query(AssertSqlSafe(sql)), params)
                .fetch_all(&mut *tx)
                .await?
            {
                if row.try_get::<String, _>(0)? == "e" {
                    ready.push((row.try_get(1)?, row.try_get(2)?));
                } else {
                    add_count_row(&mut counts, &row, 1)?;
                }
            }
        }
        for (step, task) in &ready {
            j.step_enqueued(step, task, actor, now)?;
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
