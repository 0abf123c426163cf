//! Reading rows the same way on every backend. Both schemas keep JSON as text and numbers and
//! times as 64-bit integers, so one decoder per domain type serves SQLite and PostgreSQL alike;
//! only the SQL that produces the rows differs.

use serde_json::Value;

use crate::clock::Millis;
use crate::job::{Checkpoint, StepFailure, StepJob};
use crate::state::{StepEvent, StepState, TaskState};
use crate::store::journal::Journal;
use crate::store::{
    ChildTask, ClaimRequest, ExpiredAttempt, Expiry, ParentLink, RejectedCompletion,
};
use crate::task::{StepView, Task, TaskSummary, Transition};
use crate::template::StepDefinition;
use crate::{Error, Result};

/// Typed access to a row's columns, by name or (`*_at`) by position.
pub(crate) trait Cols {
    fn text(&self, c: &str) -> Result<String>;
    fn opt_text(&self, c: &str) -> Result<Option<String>>;
    fn int(&self, c: &str) -> Result<i64>;
    fn opt_int(&self, c: &str) -> Result<Option<i64>>;
    fn opt_float(&self, c: &str) -> Result<Option<f64>>;
    fn flag(&self, c: &str) -> Result<bool>;
    fn text_at(&self, i: usize) -> Result<String>;
    fn opt_text_at(&self, i: usize) -> Result<Option<String>>;
    fn int_at(&self, i: usize) -> Result<i64>;
}

macro_rules! cols {
    ($row:ty) => {
        impl Cols for $row {
            fn text(&self, c: &str) -> Result<String> {
                Ok(sqlx::Row::try_get(self, c)?)
            }
            fn opt_text(&self, c: &str) -> Result<Option<String>> {
                Ok(sqlx::Row::try_get(self, c)?)
            }
            fn int(&self, c: &str) -> Result<i64> {
                Ok(sqlx::Row::try_get(self, c)?)
            }
            fn opt_int(&self, c: &str) -> Result<Option<i64>> {
                Ok(sqlx::Row::try_get(self, c)?)
            }
            fn opt_float(&self, c: &str) -> Result<Option<f64>> {
                Ok(sqlx::Row::try_get(self, c)?)
            }
            fn flag(&self, c: &str) -> Result<bool> {
                Ok(sqlx::Row::try_get(self, c)?)
            }
            fn text_at(&self, i: usize) -> Result<String> {
                Ok(sqlx::Row::try_get(self, i)?)
            }
            fn opt_text_at(&self, i: usize) -> Result<Option<String>> {
                Ok(sqlx::Row::try_get(self, i)?)
            }
            fn int_at(&self, i: usize) -> Result<i64> {
                Ok(sqlx::Row::try_get(self, i)?)
            }
        }
    };
}

cols!(sqlx::sqlite::SqliteRow);

/// A JSON object read like a row (rows aggregated into JSON by the database).
impl Cols for serde_json::Map<String, Value> {
    fn text(&self, c: &str) -> Result<String> {
        self.opt_text(c)?
            .ok_or_else(|| Error::internal(format!("column {c} is missing or NULL")))
    }
    fn opt_text(&self, c: &str) -> Result<Option<String>> {
        match self.get(c) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(Error::internal(format!("column {c} is not text: {other}"))),
        }
    }
    fn int(&self, c: &str) -> Result<i64> {
        self.opt_int(c)?
            .ok_or_else(|| Error::internal(format!("column {c} is missing or NULL")))
    }
    fn opt_int(&self, c: &str) -> Result<Option<i64>> {
        match self.get(c) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| Error::internal(format!("column {c} is not an integer: {v}"))),
        }
    }
    fn opt_float(&self, c: &str) -> Result<Option<f64>> {
        Ok(self.get(c).and_then(Value::as_f64))
    }
    fn flag(&self, c: &str) -> Result<bool> {
        self.get(c)
            .and_then(Value::as_bool)
            .ok_or_else(|| Error::internal(format!("column {c} is not a boolean")))
    }
    fn text_at(&self, _: usize) -> Result<String> {
        Err(Error::internal("a JSON row has no column positions"))
    }
    fn opt_text_at(&self, _: usize) -> Result<Option<String>> {
        Err(Error::internal("a JSON row has no column positions"))
    }
    fn int_at(&self, _: usize) -> Result<i64> {
        Err(Error::internal("a JSON row has no column positions"))
    }
}

impl<T: Cols> Cols for &T {
    fn text(&self, c: &str) -> Result<String> {
        (*self).text(c)
    }
    fn opt_text(&self, c: &str) -> Result<Option<String>> {
        (*self).opt_text(c)
    }
    fn int(&self, c: &str) -> Result<i64> {
        (*self).int(c)
    }
    fn opt_int(&self, c: &str) -> Result<Option<i64>> {
        (*self).opt_int(c)
    }
    fn opt_float(&self, c: &str) -> Result<Option<f64>> {
        (*self).opt_float(c)
    }
    fn flag(&self, c: &str) -> Result<bool> {
        (*self).flag(c)
    }
    fn text_at(&self, i: usize) -> Result<String> {
        (*self).text_at(i)
    }
    fn opt_text_at(&self, i: usize) -> Result<Option<String>> {
        (*self).opt_text_at(i)
    }
    fn int_at(&self, i: usize) -> Result<i64> {
        (*self).int_at(i)
    }
}
#[cfg(feature = "postgres")]
cols!(sqlx::postgres::PgRow);

/// JSON text of a value, as stored.
pub(crate) fn json(v: &impl serde::Serialize) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::internal(format!("cannot encode JSON: {e}")))
}

/// A stored JSON text, decoded.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s)
        .map_err(|e| Error::internal(format!("corrupt JSON in the database: {e}")))
}

pub(crate) fn opt_decode<T: serde::de::DeserializeOwned>(s: Option<String>) -> Result<Option<T>> {
    s.map(|s| decode(&s)).transpose()
}

/// A stored state name (or other enumerated text), parsed.
pub(crate) fn parse_state<T: std::str::FromStr>(s: &str) -> Result<T> {
    s.parse()
        .map_err(|_| Error::internal(format!("unknown state {s:?} in the database")))
}

/// Picks the registered template `version` (`None`: the newest) among `found`
/// `(version, definition)` rows of one namespace and name.
pub(crate) fn pick_template(
    namespace: &str,
    name: &str,
    version: Option<&str>,
    found: &[(String, String)],
) -> Result<crate::template::TaskTemplate> {
    let pick = match version {
        Some(v) => found.iter().find(|(fv, _)| fv == v),
        None => found.iter().max_by(|a, b| compare_versions(&a.0, &b.0)),
    };
    match pick {
        Some((_, def)) => decode(def),
        None => {
            let mut known: Vec<&str> = found.iter().map(|(v, _)| v.as_str()).collect();
            known.sort_by(|a, b| compare_versions(a, b));
            let what = match version {
                Some(v) => format!("{namespace}/{name} version {v}"),
                None => format!("{namespace}/{name}"),
            };
            let msg = if known.is_empty() {
                format!("no template {what} is registered")
            } else {
                format!(
                    "no template {what} is registered; known versions: {}",
                    known.join(", ")
                )
            };
            Err(Error::not_found(msg).with_details(serde_json::json!({"known_versions": known})))
        }
    }
}

/// Orders versions numerically part by part (`1.10.0` > `1.9.2`), falling back to text.
pub(crate) fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| -> Vec<Result<u64, String>> {
        s.split(['.', '-', '+'])
            .map(|p| p.parse::<u64>().map_err(|_| p.to_string()))
            .collect()
    };
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let o = match (x, y) {
            (Ok(x), Ok(y)) => x.cmp(y),
            (Ok(_), Err(_)) => std::cmp::Ordering::Greater,
            (Err(_), Ok(_)) => std::cmp::Ordering::Less,
            (Err(x), Err(y)) => x.cmp(y),
        };
        if o.is_ne() {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

/// An attempt past its timeout or lease: `step_uuid, attempts, definition, timeout_at`.
pub(crate) fn expired_attempt(r: &impl Cols, now: Millis) -> Result<ExpiredAttempt> {
    let timeout_at = r.opt_int("timeout_at")?;
    Ok(ExpiredAttempt {
        step_uuid: r.text("step_uuid")?,
        attempt: r.int("attempts")? as u32,
        expiry: if timeout_at.is_some_and(|t| t <= now) {
            Expiry::Timeout
        } else {
            Expiry::LeaseExpired
        },
        definition: decode::<StepDefinition>(&r.text("definition")?)?,
    })
}

/// A step of a task view: `step_uuid, name, step_type, callable, state, attempts,
/// max_attempts, result, error, checkpoint, started_at, completed_at, next_attempt_at,
/// worker_id`; `dependencies` are its parents' names.
pub(crate) fn step_view(r: &impl Cols, dependencies: Vec<String>) -> Result<StepView> {
    Ok(StepView {
        uuid: r.text("step_uuid")?,
        name: r.text("name")?,
        step_type: r.text("step_type")?,
        callable: r.text("callable")?,
        state: parse_state::<StepState>(&r.text("state")?)?,
        attempts: r.int("attempts")? as u32,
        max_attempts: r.int("max_attempts")? as u32,
        result: opt_decode::<Value>(r.opt_text("result")?)?,
        error: opt_decode::<StepFailure>(r.opt_text("error")?)?,
        checkpoint: opt_decode::<Checkpoint>(r.opt_text("checkpoint")?)?,
        started_at: r.opt_int("started_at")?,
        completed_at: r.opt_int("completed_at")?,
        next_attempt_at: r.opt_int("next_attempt_at")?,
        worker_id: r.opt_text("worker_id")?,
        dependencies,
    })
}

/// A task from its `tasks` row and its steps.
pub(crate) fn task(t: &impl Cols, steps: Vec<StepView>) -> Result<Task> {
    Ok(Task {
        uuid: t.text("task_uuid")?,
        namespace: t.text("namespace")?,
        name: t.text("name")?,
        version: t.text("version")?,
        status: parse_state(&t.text("state")?)?,
        context: decode(&t.text("context")?)?,
        initiator: t.text("initiator")?,
        source_system: t.text("source_system")?,
        reason: t.text("reason")?,
        tags: decode(&t.text("tags")?)?,
        priority: t.int("priority")? as i32,
        correlation_id: t.text("correlation_id")?,
        parent_correlation_id: t.opt_text("parent_correlation_id")?,
        parent: match (
            t.opt_text("parent_task_uuid")?,
            t.opt_text("parent_step_uuid")?,
        ) {
            (Some(task_uuid), Some(step_uuid)) => Some(ParentLink {
                task_uuid,
                step_uuid,
            }),
            _ => None,
        },
        idempotency_key: t.opt_text("idempotency_key")?,
        created_at: t.int("created_at")?,
        updated_at: t.int("updated_at")?,
        completed_at: t.opt_int("completed_at")?,
        steps,
        replayed: false,
    })
}

/// The columns [`task_summary`] reads.
pub(crate) const SUMMARY_COLUMNS: &str = "task_uuid, namespace, name, version, state, initiator, \
     source_system, created_at, completed_at";

pub(crate) fn task_summary(r: &impl Cols) -> Result<TaskSummary> {
    Ok(TaskSummary {
        uuid: r.text("task_uuid")?,
        namespace: r.text("namespace")?,
        name: r.text("name")?,
        version: r.text("version")?,
        status: parse_state(&r.text("state")?)?,
        initiator: r.text("initiator")?,
        source_system: r.text("source_system")?,
        created_at: r.int("created_at")?,
        completed_at: r.opt_int("completed_at")?,
    })
}

/// A row of `task_transitions` or (`with_step`, joined with the step's name as `step_name`)
/// `step_transitions`.
pub(crate) fn transition(r: &impl Cols, with_step: bool) -> Result<Transition> {
    Ok(Transition {
        step_name: if with_step {
            r.opt_text("step_name")?
        } else {
            None
        },
        from_state: r.opt_text("from_state")?,
        to_state: r.text("to_state")?,
        event: r.text("event")?,
        actor: r.text("actor")?,
        reason: r.opt_text("reason")?,
        attempt: if with_step {
            r.opt_int("attempt")?.map(|a| a as u32)
        } else {
            None
        },
        metadata: opt_decode(r.opt_text("metadata")?)?.unwrap_or(Value::Null),
        created_at: r.int("created_at")?,
        sort_key: r.int("id")?,
    })
}

pub(crate) fn rejected_completion(r: &impl Cols) -> Result<RejectedCompletion> {
    Ok(RejectedCompletion {
        step_uuid: r.text("step_uuid")?,
        attempt: r.int("attempt")? as u32,
        worker_id: r.opt_text("worker_id")?,
        reason: r.text("reason")?,
        created_at: r.int("created_at")?,
    })
}

/// A row of the workflow-children query: `parent_task, parent_step, attempts, step_state,
/// parent_state, child, child_state`.
pub(crate) fn child_task(r: &impl Cols) -> Result<ChildTask> {
    Ok(ChildTask {
        parent_task_uuid: r.text("parent_task")?,
        parent_step_uuid: r.text("parent_step")?,
        parent_attempt: r.int("attempts")? as u32,
        parent_step_state: parse_state(&r.text("step_state")?)?,
        parent_task_state: parse_state(&r.text("parent_state")?)?,
        child_task_uuid: r.text("child")?,
        child_state: parse_state(&r.text("child_state")?)?,
    })
}

/// The job of one row returned by a claim (named columns: `step_uuid, task_uuid, name,
/// attempts, definition, inputs, checkpoint, timeout_at, started_at, namespace, task` — a JSON
/// array of the task's name, version, correlation id, context and template hash —
/// `dependency_results` and `failed_dependencies`); its `claim` transition goes into `j`.
pub(crate) fn claimed_job(row: &impl Cols, j: &mut Journal, req: &ClaimRequest) -> Result<StepJob> {
    let step_uuid = row.text("step_uuid")?;
    let task_uuid = row.text("task_uuid")?;
    let attempt = row.int("attempts")? as u32;
    let started_at: Millis = row.int("started_at")?;
    j.step_moves(
        &step_uuid,
        &task_uuid,
        StepState::Enqueued,
        &[StepEvent::Claim],
        Some(attempt),
        &req.worker_id,
        None,
        started_at,
    )?;
    let (task_name, task_version, correlation_id, context, template_hash): (
        String,
        String,
        String,
        Value,
        String,
    ) = decode(&row.text("task")?)?;
    let failed = row.opt_text("failed_dependencies")?;
    Ok(StepJob {
        dependency_results: decode(&row.text("dependency_results")?)?,
        failed_dependencies: opt_decode(failed)?.unwrap_or_default(),
        step_uuid,
        task_uuid,
        step_name: row.text("name")?,
        attempt,
        worker_id: req.worker_id.clone(),
        namespace: row.text("namespace")?,
        task_name,
        task_version,
        template_hash,
        correlation_id,
        definition: decode(&row.text("definition")?)?,
        context,
        inputs: decode(&row.text("inputs")?)?,
        checkpoint: opt_decode(row.opt_text("checkpoint")?)?,
        started_at,
        timeout_at: row.int("timeout_at")?,
    })
}

/// The columns [`stored_event`] reads.
pub(crate) const EVENT_COLUMNS: &str = "seq, event_id, event_name, delivery_mode, payload, \
     metadata, delivered_at, delivery_attempts, last_error";

pub(crate) fn stored_event(row: &impl Cols) -> Result<crate::events::StoredEvent> {
    use crate::events::{DeliveryMode, DomainEvent, StoredEvent};
    let mode = row.text("delivery_mode")?;
    Ok(StoredEvent {
        seq: row.int("seq")?,
        event: DomainEvent {
            event_id: row.text("event_id")?,
            event_name: row.text("event_name")?,
            delivery_mode: DeliveryMode::parse(&mode).ok_or_else(|| {
                Error::internal(format!("unknown delivery mode {mode:?} in the outbox"))
            })?,
            payload: decode(&row.text("payload")?)?,
            metadata: decode(&row.text("metadata")?)?,
        },
        delivered_at: row.opt_int("delivered_at")?,
        delivery_attempts: row.int("delivery_attempts")? as u32,
        last_error: row.opt_text("last_error")?,
    })
}

/// The columns [`dlq_entry`] reads (besides `snapshot`).
pub(crate) const DLQ_COLUMNS: &str = "dlq_entry_uuid, task_uuid, namespace, name, version, \
     reason, message, original_state, resolution_status, resolution_notes, resolved_by, \
     resolved_at, created_at, updated_at";

pub(crate) fn dlq_entry(r: &impl Cols, with_snapshot: bool) -> Result<crate::dlq::DlqEntry> {
    fn parse<T: std::str::FromStr>(s: &str, what: &str) -> Result<T> {
        s.parse()
            .map_err(|_| Error::internal(format!("unknown {what} {s:?} in the database")))
    }
    Ok(crate::dlq::DlqEntry {
        dlq_entry_uuid: r.text("dlq_entry_uuid")?,
        task_uuid: r.text("task_uuid")?,
        namespace: r.text("namespace")?,
        name: r.text("name")?,
        version: r.text("version")?,
        reason: parse(&r.text("reason")?, "DLQ reason")?,
        message: r.text("message")?,
        original_state: parse(&r.text("original_state")?, "task state")?,
        snapshot: if with_snapshot {
            Some(decode(&r.text("snapshot")?)?)
        } else {
            None
        },
        resolution_status: parse(&r.text("resolution_status")?, "DLQ resolution status")?,
        resolution_notes: r.opt_text("resolution_notes")?,
        resolved_by: r.opt_text("resolved_by")?,
        resolved_at: r.opt_int("resolved_at")?,
        created_at: r.int("created_at")?,
        updated_at: r.int("updated_at")?,
    })
}

/// The DLQ statistics query: rows `k` (reason, status, state, namespace, total,
/// oldest_pending), `v` (the bucket, or NULL), `n` (the count or moment).
pub(crate) const DLQ_STATS: &str =
    "SELECT 'reason' AS k, reason AS v, COUNT(*) AS n FROM dlq_entries GROUP BY reason
     UNION ALL SELECT 'status', resolution_status, COUNT(*) FROM dlq_entries
       GROUP BY resolution_status
     UNION ALL SELECT 'state', original_state, COUNT(*) FROM dlq_entries
       GROUP BY original_state
     UNION ALL SELECT 'namespace', namespace, COUNT(*) FROM dlq_entries GROUP BY namespace
     UNION ALL SELECT 'total', NULL, COUNT(*) FROM dlq_entries
     UNION ALL SELECT 'oldest_pending', NULL, MIN(created_at) FROM dlq_entries
       WHERE resolution_status = 'pending'";

pub(crate) fn dlq_stats(rows: &[impl Cols]) -> Result<crate::dlq::DlqStats> {
    let mut s = crate::dlq::DlqStats::default();
    for r in rows {
        let key = r.text("k")?;
        let value = r.opt_text("v")?;
        let n = r.opt_int("n")?;
        let count = n.unwrap_or(0).max(0) as u64;
        let bucket = match key.as_str() {
            "total" => {
                s.total = count;
                continue;
            }
            "oldest_pending" => {
                s.oldest_pending_at = n;
                continue;
            }
            "reason" => &mut s.by_reason,
            "status" => &mut s.by_resolution_status,
            "state" => &mut s.by_original_state,
            _ => &mut s.by_namespace,
        };
        bucket.insert(value.unwrap_or_default(), count);
    }
    Ok(s)
}

/// The current attempt of a step, for fencing.
pub(crate) struct Current {
    pub(crate) task_uuid: String,
    pub(crate) state: StepState,
    pub(crate) attempts: u32,
    pub(crate) worker_id: Option<String>,
    pub(crate) lease_expires_at: Option<Millis>,
    pub(crate) timeout_at: Option<Millis>,
    /// The stored checkpoint history (JSON), which a checkpoint extends.
    pub(crate) checkpoint_history: Option<String>,
}

/// The columns [`current`] reads.
pub(crate) const CURRENT_COLUMNS: &str =
    "task_uuid, state, attempts, worker_id, lease_expires_at, timeout_at, checkpoint_history";

pub(crate) fn current(row: &impl Cols) -> Result<Current> {
    Ok(Current {
        task_uuid: row.text("task_uuid")?,
        state: parse_state(&row.text("state")?)?,
        attempts: row.int("attempts")? as u32,
        worker_id: row.opt_text("worker_id")?,
        lease_expires_at: row.opt_int("lease_expires_at")?,
        timeout_at: row.opt_int("timeout_at")?,
        checkpoint_history: row.opt_text("checkpoint_history")?,
    })
}

/// Why a completion for `attempt` by `worker` does not apply, if it does not.
pub(crate) fn staleness(
    c: &Current,
    attempt: u32,
    worker: Option<&str>,
    expiry: Option<Expiry>,
    now: Millis,
) -> Option<String> {
    if c.state != StepState::InProgress {
        return Some(format!("step is {}, not in_progress", c.state));
    }
    if c.attempts != attempt {
        return Some(format!(
            "attempt {attempt} is not current (current attempt is {})",
            c.attempts
        ));
    }
    if let Some(w) = worker
        && c.worker_id.as_deref() != Some(w)
    {
        return Some(format!(
            "attempt {attempt} is held by worker {}",
            c.worker_id.as_deref().unwrap_or("none")
        ));
    }
    match expiry {
        Some(Expiry::Timeout) if c.timeout_at.is_none_or(|t| t > now) => {
            Some("attempt has not timed out".into())
        }
        Some(Expiry::LeaseExpired) if c.lease_expires_at.is_none_or(|t| t > now) => {
            Some("lease was renewed".into())
        }
        _ => None,
    }
}

/// A task's row in a task state read.
pub(crate) fn task_state_of(state: Option<String>, task_uuid: &str) -> Result<TaskState> {
    parse_state(&state.ok_or_else(|| Error::not_found(format!("no task {task_uuid}")))?)
}

/// Ready steps per namespace (see [`crate::store::Store::queue_depths`]).
pub(crate) const QUEUE_DEPTHS: &str =
    "SELECT namespace, COUNT(*) AS ready, MIN(enqueued_at) AS oldest
     FROM steps WHERE state = 'enqueued' GROUP BY namespace ORDER BY namespace";

pub(crate) fn queue_depth(r: &impl Cols) -> Result<crate::metrics::QueueDepth> {
    Ok(crate::metrics::QueueDepth {
        namespace: r.text("namespace")?,
        ready: r.int("ready")?.max(0) as u64,
        oldest_enqueued_at: r.opt_int("oldest")?,
    })
}

/// The columns [`api_key`] reads.
pub(crate) const API_KEY_COLUMNS: &str = "key_id, name, permissions, created_at, revoked_at";

pub(crate) fn api_key(r: &impl Cols) -> Result<crate::auth::ApiKey> {
    Ok(crate::auth::ApiKey {
        key_id: r.text("key_id")?,
        name: r.text("name")?,
        permissions: serde_json::from_str(&r.text("permissions")?).map_err(|e| {
            Error::internal(format!("corrupt API key permissions in the database: {e}"))
        })?,
        created_at: r.int("created_at")?,
        revoked_at: r.opt_int("revoked_at")?,
    })
}
