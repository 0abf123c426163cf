//! Creating tasks in SQLite. A whole group of creations — identity checks, task rows, steps,
//! edges, the first settle of each task and the claim of their first steps — costs two or
//! three round trips to the connection thread, and the statements' texts never change: rows
//! travel as one JSON array per table, unpacked by `json_each`, so they stay prepared.
//! Text columns that hold JSON travel as JSON strings (`->>` returns them byte for byte).

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, Row, SqliteConnection};

use super::attempts::claim_statement;
use super::journal::{Journal, Param, bind_all};
use super::write::{SETTLE, json as to_json, settle_params, settle_task};
use crate::Result;
use crate::clock::Millis;
use crate::job::StepJob;
use crate::orchestrator::SettleCause;
use crate::store::apply::{NewRows, Rows};
use crate::store::{ClaimRequest, Created, NewTask};

const IDENTITIES: &str = "SELECT identity_hash, task_uuid FROM tasks
     WHERE identity_hash IN (SELECT value FROM json_each(?));\n";

const INSERT_SNAPSHOTS: &str = "INSERT OR IGNORE INTO template_snapshots (content_hash, definition)
     SELECT value->>0, value->>1 FROM json_each(?);\n";

const INSERT_TASKS: &str = "INSERT INTO tasks (task_uuid, namespace, name, version, template_hash,
        state, context, initiator, source_system, reason, tags, priority, correlation_id,
        parent_correlation_id, idempotency_key, identity_hash, parent_task_uuid,
        parent_step_uuid, created_at, updated_at, state_entered_at)
     SELECT value->>0, value->>1, value->>2, value->>3, value->>4, 'pending', value->>5,
        value->>6, value->>7, value->>8, value->>9, value->>10, value->>11, value->>12,
        value->>13, value->>14, value->>15, value->>16, ?, ?, ?
     FROM json_each(?);\n";

const INSERT_STEPS: &str =
    "INSERT INTO steps (step_uuid, task_uuid, seq, name, namespace, callable,
        step_type, definition, inputs, state, max_attempts, priority, timeout_ms, created_at,
        updated_at)
     SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6,
        value->>7, value->>8, 'pending', value->>9, value->>10, value->>11, ?, ?
     FROM json_each(?);\n";

const INSERT_EDGES: &str = "INSERT INTO step_edges (task_uuid, from_step, to_step)
     SELECT value->>0, value->>1, value->>2 FROM json_each(?);\n";

/// The tasks a settle in creation looks at: the new ones, listed in a JSON array.
const NEW_TASKS: &str = "SELECT value FROM json_each(?)";

/// Creates `tasks` (those whose identity exists, or repeats one earlier in the group, come
/// back as [`Created::Existing`]) and runs `claim`; transitions go into `j`, which the caller
/// flushes. `prefix` (e.g. `BEGIN IMMEDIATE;`) runs first, in the same round trip.
pub(super) async fn create_tasks(
    tx: &mut SqliteConnection,
    j: &mut Journal,
    tasks: &[NewTask],
    actor: &str,
    claim: Option<&ClaimRequest>,
    prefix: &str,
    now: Millis,
) -> Result<(Vec<Created>, Vec<StepJob>)> {
    let mut sql = String::from(prefix);

    // Identity: tasks that already exist (read inside the transaction, so it holds).
    let hashes: Vec<&str> = tasks
        .iter()
        .filter_map(|t| t.identity_hash.as_deref())
        .collect();
    let mut known: HashMap<String, String> = HashMap::new();
    if !hashes.is_empty() {
        sql.push_str(IDENTITIES);
        let rows = sqlx::query(AssertSqlSafe(std::mem::take(&mut sql)))
            .bind(to_json(&hashes)?)
            .fetch_all(&mut *tx)
            .await?;
        for r in rows {
            known.insert(r.try_get(0)?, r.try_get(1)?);
        }
    }
    let mut created = Vec::with_capacity(tasks.len());
    let mut new: Vec<&NewTask> = Vec::new();
    for t in tasks {
        if let Some(h) = &t.identity_hash {
            if let Some(uuid) = known.get(h) {
                created.push(Created::Existing {
                    uuid: uuid.clone(),
                    by_key: t.identity_from_key,
                });
                continue;
            }
            // A later creation in this group with the same identity gets this task.
            known.insert(h.clone(), t.uuid.clone());
        }
        created.push(Created::New(t.uuid.clone()));
        new.push(t);
    }

    let mut params: Vec<Param> = Vec::new();
    if !new.is_empty() {
        let rows = NewRows::of(&new)?;
        sql.push_str(INSERT_SNAPSHOTS);
        params.push(Param::Text(Some(to_json(&rows.snapshots)?)));
        sql.push_str(INSERT_TASKS);
        params.extend([
            Param::Int(Some(now)),
            Param::Int(Some(now)),
            Param::Int(Some(now)),
        ]);
        params.push(Param::Text(Some(to_json(&rows.tasks)?)));
        sql.push_str(INSERT_STEPS);
        params.extend([Param::Int(Some(now)), Param::Int(Some(now))]);
        params.push(Param::Text(Some(to_json(&rows.steps)?)));
        if !rows.edges.is_empty() {
            sql.push_str(INSERT_EDGES);
            params.push(Param::Text(Some(to_json(&rows.edges)?)));
        }
        let uuids: Vec<&str> = new.iter().map(|t| t.uuid.as_str()).collect();
        let uuids = to_json(&uuids)?;
        sql.push_str(&SETTLE.replace("{tasks}", NEW_TASKS));
        params.extend(settle_params(now, Param::Text(Some(uuids))));
    }
    if let Some(req) = claim
        && let Some((claim_sql, claim_params)) = claim_statement(req, now, "'j', ")
    {
        sql.push_str(&claim_sql);
        params.extend(claim_params);
    }
    if sql.is_empty() {
        return Ok((created, Vec::new()));
    }
    let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), params)
        .fetch_all(&mut *tx)
        .await?;

    // The journal in causal order: creations, then enqueues, then claims.
    for t in &new {
        j.task_created(&t.uuid, actor, now);
        for s in &t.steps {
            j.step_created(&s.uuid, &t.uuid, actor, now);
        }
    }
    let mut none = Vec::new();
    let mut absorbed = Rows::new(&[], &[], &mut none, claim, actor, now);
    absorbed.absorb(j, &rows)?;
    let (tallies, jobs) = absorbed.into_parts();
    for t in &new {
        settle_task(j, &tallies, &t.uuid, SettleCause::Start, actor, None, now)?;
    }
    Ok((created, jobs))
}
