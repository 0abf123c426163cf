//! The backend-independent half of the store's writes: what a finished attempt does to its
//! step, how rows returned by a write are journaled (in causal order), how a task moves on
//! from its tally of steps, and the rows that new tasks, steps and DLQ entries insert. Each
//! backend runs the SQL; the decisions and the audit trail are made here, once.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::clock::Millis;
use crate::dlq::LifecycleExceeded;
use crate::events::{DomainEvent, EventSource, emitted};
use crate::job::StepJob;
use crate::lifecycle::{LifecycleFacts, Verdict, exceeded};
use crate::orchestrator::{SettleCause, new_uuid, settle_events};
use crate::state::{StepCounts, StepEvent, StepState, TaskEvent, TaskState, step_transition};
use crate::store::journal::Journal;
use crate::store::rows::{Cols, claimed_job, decode, json as to_json, parse_state};
use crate::store::{AttemptResult, ClaimRequest, Expansion, Expiry, NewTask, Resolution};
use crate::template::{EventDeclaration, LifecycleLimits};
use crate::{Error, Result};

/// A completion that arrived for an attempt that is no longer current.
pub(crate) struct Rejection<'a> {
    pub(crate) step_uuid: &'a str,
    pub(crate) task_uuid: Option<&'a str>,
    pub(crate) attempt: u32,
    pub(crate) worker: Option<&'a str>,
    pub(crate) reason: String,
    /// The refused outcome, as JSON, for investigation.
    pub(crate) outcome: Option<String>,
}

/// The report of a result that did not apply (`c` is its step's current attempt, if the step
/// exists), and the late completion to record: every refused result except engine-made
/// expiries that lost a race.
pub(crate) fn rejected<'a>(
    r: &'a AttemptResult,
    c: Option<&'a crate::store::rows::Current>,
    now: Millis,
) -> (crate::store::FinishReport, Option<Rejection<'a>>) {
    let report = |task_uuid: Option<String>, reason: String| crate::store::FinishReport {
        step_uuid: r.step_uuid.clone(),
        task_uuid,
        completion: crate::store::Completion::Rejected(reason),
        task_state: None,
        events: Vec::new(),
    };
    let Some(c) = c else {
        return (report(None, "no such step".into()), None);
    };
    let reason = crate::store::rows::staleness(c, r.attempt, r.worker_id.as_deref(), r.expiry, now)
        .unwrap_or_else(|| format!("attempt {} is not current", r.attempt));
    let late = r.expiry.is_none().then(|| Rejection {
        step_uuid: &r.step_uuid,
        task_uuid: Some(&c.task_uuid),
        attempt: r.attempt,
        worker: r.worker_id.as_deref(),
        reason: reason.clone(),
        outcome: serde_json::to_string(&r.resolution_summary()).ok(),
    });
    (report(Some(c.task_uuid.clone()), reason), late)
}

/// The late checkpoint to record when `cp` for `attempt` by `worker` does not apply to the
/// step's current attempt `c` (its `reason` is what the worker is told).
pub(crate) fn stale_checkpoint<'a>(
    step_uuid: &'a str,
    c: &'a crate::store::rows::Current,
    attempt: u32,
    worker: &'a str,
    cp: &crate::job::Checkpoint,
    now: Millis,
) -> Option<Rejection<'a>> {
    let reason = crate::store::rows::staleness(c, attempt, Some(worker), None, now)?;
    Some(Rejection {
        step_uuid,
        task_uuid: Some(&c.task_uuid),
        attempt,
        worker: Some(worker),
        reason,
        outcome: to_json(cp).ok(),
    })
}

impl AttemptResult {
    pub(crate) fn resolution_summary(&self) -> Value {
        match &self.resolution {
            Resolution::Succeeded { result, .. } => {
                json!({"outcome": "success", "result": result})
            }
            Resolution::Retry { failure, .. } | Resolution::Failed { failure } => {
                json!({"outcome": "failure", "error": failure})
            }
        }
    }
}

/// Each task's state and the tally of its steps by state, as read by a settle.
pub(crate) type Tallies = HashMap<String, (Option<TaskState>, StepCounts)>;

/// Adds one row of a tally query — task uuid, task state, step state (or NULL for a task
/// without steps), count — whose columns start at `first`.
pub(crate) fn add_count_row(tallies: &mut Tallies, row: &impl Cols, first: usize) -> Result<()> {
    let entry = tallies.entry(row.text_at(first)?).or_default();
    entry.0 = Some(parse_state(&row.text_at(first + 1)?)?);
    if let Some(s) = row.opt_text_at(first + 2)? {
        let s: StepState = parse_state(&s)?;
        for _ in 0..row.int_at(first + 3)? {
            entry.1.add(s);
        }
    }
    Ok(())
}

/// Moves a task to its next resting state from its tally (read after its ready steps were
/// enqueued), recording the transitions in `j`.
pub(crate) fn settle_task(
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

/// The events a result takes its step through (from `in_progress`) and the reason recorded
/// with them.
pub(crate) type Target = (&'static [StepEvent], Option<String>);

/// One result as the fenced update applies it.
pub(crate) struct FinishRow {
    /// The step's final state.
    pub(crate) to: StepState,
    pub(crate) result: Option<String>,
    pub(crate) error: Option<String>,
    pub(crate) completed_at: Option<Millis>,
    pub(crate) next_attempt_at: Option<Millis>,
    pub(crate) started_at: Option<Millis>,
    pub(crate) step_uuid: String,
    pub(crate) attempt: i64,
    /// The reporting worker, which must still hold the attempt.
    pub(crate) worker: Option<String>,
    /// For an engine-made timeout: the attempt must still be past its timeout at this moment.
    pub(crate) timeout_guard: Option<Millis>,
    /// For an engine-made lease expiry: the lease must still be expired at this moment.
    pub(crate) lease_guard: Option<Millis>,
}

/// What applying `r` at `now` writes, and the transitions it records.
#[allow(clippy::type_complexity)]
pub(crate) fn finish_row(r: &AttemptResult, now: Millis) -> Result<(Target, FinishRow)> {
    let (events, result, error, completed_at, next_attempt_at, reason): (
        &'static [StepEvent],
        Option<String>,
        Option<String>,
        Option<Millis>,
        Option<Millis>,
        Option<String>,
    ) = match &r.resolution {
        Resolution::Succeeded { result, .. } => (
            &[StepEvent::Succeed, StepEvent::Complete],
            Some(to_json(result)?),
            None,
            Some(now),
            None,
            None,
        ),
        Resolution::Retry {
            failure,
            next_attempt_at,
            ..
        } => (
            &[StepEvent::Fail, StepEvent::RetryDecided],
            None,
            Some(to_json(failure)?),
            None,
            Some(*next_attempt_at),
            Some(format!("{}: {}", failure.error_type, failure.message)),
        ),
        Resolution::Failed { failure } => (
            &[StepEvent::Fail, StepEvent::GiveUp],
            None,
            Some(to_json(failure)?),
            Some(now),
            None,
            Some(format!("{}: {}", failure.error_type, failure.message)),
        ),
    };
    // The final state comes from the state table, checked before anything is written.
    let to = events
        .iter()
        .try_fold(StepState::InProgress, |s, e| step_transition(s, *e))?;
    Ok((
        (events, reason),
        FinishRow {
            to,
            result,
            error,
            completed_at,
            next_attempt_at,
            started_at: r.started_at,
            step_uuid: r.step_uuid.clone(),
            attempt: i64::from(r.attempt),
            worker: r.worker_id.clone(),
            timeout_guard: (r.expiry == Some(Expiry::Timeout)).then_some(now),
            lease_guard: (r.expiry == Some(Expiry::LeaseExpired)).then_some(now),
        },
    ))
}

/// The rows (JSON arrays) of the steps and edges `x` adds to `task`: a step is
/// `[uuid, task, name, callable, step_type, definition, inputs, max_attempts, timeout_ms,
/// batch_group, batch_parallelism, batch_strategy]`, an edge `[task, parent name, child name]`.
pub(crate) fn expansion_rows(
    task: &str,
    x: &Expansion,
    steps: &mut Vec<Value>,
    edges: &mut Vec<Value>,
) -> Result<()> {
    for st in &x.steps {
        let d = &st.definition;
        let batch = st
            .batch_group
            .as_ref()
            .map(|_| d.batch_config.clone().unwrap_or_default());
        steps.push(json!([
            st.uuid,
            task,
            d.name,
            d.handler.callable,
            d.step_type.as_str(),
            to_json(d)?,
            to_json(&st.inputs)?,
            d.retry.max_attempts,
            d.timeout_seconds.map(|t| (t as i64).saturating_mul(1000)),
            st.batch_group,
            batch.as_ref().map(|b| b.parallelism),
            batch.as_ref().map(|b| b.failure_strategy),
        ]));
    }
    for (p, c) in &x.edges {
        edges.push(json!([task, p, c]));
    }
    Ok(())
}

/// The rows to insert for a group of new tasks, one JSON array per table: a snapshot is
/// `[hash, definition]`; a task `[uuid, namespace, name, version, template_hash, context,
/// initiator, source_system, reason, tags, priority, correlation_id, parent_correlation_id,
/// idempotency_key, identity_hash, parent_task_uuid, parent_step_uuid]`; a step `[uuid, task,
/// seq, name, namespace, callable, step_type, definition, inputs, max_attempts, priority,
/// timeout_ms]`; an edge `[task, parent uuid, child uuid]`. JSON columns travel as JSON text.
pub(crate) struct NewRows {
    pub(crate) snapshots: Vec<Value>,
    pub(crate) tasks: Vec<Value>,
    pub(crate) steps: Vec<Value>,
    pub(crate) edges: Vec<Value>,
}

impl NewRows {
    pub(crate) fn of(new: &[&NewTask]) -> Result<NewRows> {
        let mut rows = NewRows {
            snapshots: Vec::new(),
            tasks: Vec::with_capacity(new.len()),
            steps: Vec::new(),
            edges: Vec::new(),
        };
        let mut snapshots: Vec<&str> = Vec::new();
        for t in new {
            let tpl = &t.template;
            let r = &t.request;
            if !snapshots.contains(&t.template_hash.as_str()) {
                snapshots.push(&t.template_hash);
                rows.snapshots
                    .push(json!([t.template_hash, t.template_json.as_ref()]));
            }
            rows.tasks.push(json!([
                t.uuid,
                tpl.namespace,
                tpl.name,
                tpl.version,
                t.template_hash,
                to_json(&r.context)?,
                r.initiator,
                r.source_system,
                r.reason,
                to_json(&r.tags)?,
                r.priority,
                t.correlation_id,
                r.parent_correlation_id,
                r.idempotency_key,
                t.identity_hash,
                t.parent.as_ref().map(|p| &p.task_uuid),
                t.parent.as_ref().map(|p| &p.step_uuid),
            ]));
            let mut uuids: HashMap<&str, &str> = HashMap::with_capacity(t.steps.len());
            for (i, s) in t.steps.iter().enumerate() {
                let d = &s.definition;
                uuids.insert(d.name.as_str(), s.uuid.as_str());
                rows.steps.push(json!([
                    s.uuid,
                    t.uuid,
                    i + 1,
                    d.name,
                    tpl.namespace,
                    d.handler.callable,
                    d.step_type.as_str(),
                    to_json(d)?,
                    to_json(&s.inputs)?,
                    d.retry.max_attempts,
                    r.priority,
                    d.timeout_seconds.map(|t| (t as i64).saturating_mul(1000)),
                ]));
            }
            for (parent, child) in &t.edges {
                let (Some(p), Some(c)) = (uuids.get(parent.as_str()), uuids.get(child.as_str()))
                else {
                    return Err(Error::internal(format!(
                        "task {} has an edge {parent} -> {child} between steps it does not create",
                        t.uuid
                    )));
                };
                rows.edges.push(json!([t.uuid, p, c]));
            }
        }
        Ok(rows)
    }
}

/// Journals the creation and start of tasks that are all new — what the transactional path
/// (insert, then [`settle_task`] over a tally read back from the database) records, computed
/// without reading anything back: a new task's steps are all `pending` and exactly those with
/// no parent among them are ready. For a backend that writes a creation in one statement.
/// Returns each task's state after starting.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn start_new(
    j: &mut Journal,
    new: &[&NewTask],
    actor: &str,
    now: Millis,
) -> Result<Vec<TaskState>> {
    let mut tallies = Tallies::new();
    for t in new {
        j.task_created(&t.uuid, actor, now);
        for s in &t.steps {
            j.step_created(&s.uuid, &t.uuid, actor, now);
        }
    }
    for t in new {
        let mut counts = StepCounts::default();
        for s in &t.steps {
            let name = s.definition.name.as_str();
            if t.edges.iter().any(|(_, child)| child == name) {
                counts.add(StepState::Pending);
            } else {
                j.step_enqueued(&s.uuid, &t.uuid, actor, now)?;
                counts.add(StepState::Enqueued);
            }
        }
        tallies.insert(t.uuid.clone(), (Some(TaskState::Pending), counts));
    }
    new.iter()
        .map(|t| settle_task(j, &tallies, &t.uuid, SettleCause::Start, actor, None, now))
        .collect()
}

/// What the tagged rows of a write say (results applied, steps created and enqueued, task
/// tallies, claimed jobs), gathered across its statements. Every row starts with a tag:
/// - `f`: a result applied — index, task, and (for a step that declares events) a JSON array
///   `[step name, namespace, correlation id, declarations]`;
/// - `x`: a step created — step, task;
/// - `e`: a step enqueued — step, task;
/// - `k`: a fail-fast sibling cancelled — step, task, its state before, the failed worker;
/// - `c`: a tally row (see [`add_count_row`]);
/// - `j`: a claimed job (named columns, see [`claimed_job`]).
pub(crate) struct Rows<'a> {
    results: &'a [AttemptResult],
    targets: &'a [Target],
    pub(crate) applied: &'a mut Vec<Option<String>>,
    tallies: Tallies,
    jobs: Vec<StepJob>,
    claim: Option<&'a ClaimRequest>,
    actor: &'a str,
    now: Millis,
    /// The domain events each applied result fired, by result.
    pub(crate) events: Vec<Vec<DomainEvent>>,
}

impl<'a> Rows<'a> {
    /// Rows of a write applying `results` (whose targets are `targets`).
    pub(crate) fn new(
        results: &'a [AttemptResult],
        targets: &'a [Target],
        applied: &'a mut Vec<Option<String>>,
        claim: Option<&'a ClaimRequest>,
        actor: &'a str,
        now: Millis,
    ) -> Self {
        Rows {
            results,
            targets,
            applied,
            tallies: Tallies::new(),
            jobs: Vec::new(),
            claim,
            actor,
            now,
            events: vec![Vec::new(); results.len()],
        }
    }

    /// The tallies and claimed jobs gathered.
    pub(crate) fn into_parts(self) -> (Tallies, Vec<StepJob>) {
        (self.tallies, self.jobs)
    }

    /// Takes in rows in statement order, journaling in that order, which keeps the audit trail
    /// causal.
    pub(crate) fn absorb(&mut self, j: &mut Journal, rows: &[impl Cols]) -> Result<()> {
        let (actor, now) = (self.actor, self.now);
        for row in rows {
            let tag = row.text_at(0)?;
            match tag.as_str() {
                "f" => {
                    let i = row.int_at(1)? as usize;
                    let task_uuid = row.text_at(2)?;
                    let (Some(r), Some((events, reason))) =
                        (self.results.get(i), self.targets.get(i))
                    else {
                        return Err(Error::internal(format!(
                            "finish returned unknown result {i}"
                        )));
                    };
                    j.step_moves(
                        &r.step_uuid,
                        &task_uuid,
                        StepState::InProgress,
                        events,
                        Some(r.attempt),
                        r.worker_id.as_deref().unwrap_or(actor),
                        reason.as_deref(),
                        now,
                    )?;
                    if let Some(source) = row.opt_text_at(3)? {
                        // The text test that selects this column is only a cheap pre-filter:
                        // the text may also appear in a handler's initialization, and then
                        // there are no declarations.
                        let (step_name, namespace, correlation_id, declarations): (
                            String,
                            String,
                            String,
                            Option<Vec<EventDeclaration>>,
                        ) = decode(&source)?;
                        let declarations = declarations.unwrap_or_default();
                        let fired = emitted(
                            &declarations,
                            &r.resolution,
                            &EventSource {
                                task_uuid: &task_uuid,
                                step_uuid: &r.step_uuid,
                                step_name: &step_name,
                                namespace: &namespace,
                                correlation_id: &correlation_id,
                                attempt: r.attempt,
                                fired_by: r.worker_id.as_deref().unwrap_or(actor),
                                fired_at: now,
                            },
                        );
                        for e in fired.iter().filter(|e| e.delivery_mode.in_outbox()) {
                            j.outbox(e.clone());
                        }
                        self.events[i] = fired;
                    }
                    self.applied[i] = Some(task_uuid);
                }
                "x" => {
                    j.step_created(&row.text_at(1)?, &row.text_at(2)?, actor, now);
                }
                "e" => {
                    j.step_enqueued(&row.text_at(1)?, &row.text_at(2)?, actor, now)?;
                }
                "k" => {
                    let from: StepState = parse_state(&row.text_at(3)?)?;
                    let failed = row.text_at(4)?;
                    j.step_moves(
                        &row.text_at(1)?,
                        &row.text_at(2)?,
                        from,
                        &[StepEvent::Cancel],
                        None,
                        actor,
                        Some(&format!(
                            "fail_fast: batch worker `{failed}` failed for good"
                        )),
                        now,
                    )?;
                }
                "c" => add_count_row(&mut self.tallies, row, 1)?,
                "j" => {
                    let req = self
                        .claim
                        .ok_or_else(|| Error::internal("claim rows without a claim"))?;
                    self.jobs.push(claimed_job(row, j, req)?);
                }
                other => return Err(Error::internal(format!("unexpected row tag {other:?}"))),
            }
        }
        Ok(())
    }
}

/// An unfinished task that may be past a lifecycle limit, as the candidates query returns it
/// (`task_uuid, namespace, name, version, state, priority, initiator, source_system, reason,
/// correlation_id, created_at, entered_at, active_at` and the four limits).
pub(crate) struct Candidate {
    task: Value,
    task_uuid: String,
    namespace: String,
    name: String,
    version: String,
    state: TaskState,
    facts: LifecycleFacts,
}

impl Candidate {
    pub(crate) fn task_uuid(&self) -> &str {
        &self.task_uuid
    }

    /// The state the task was found in.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn state_name(&self) -> &'static str {
        self.state.as_str()
    }

    pub(crate) fn of(row: &impl Cols) -> Result<Candidate> {
        let state: TaskState = parse_state(&row.text("state")?)?;
        let facts = LifecycleFacts {
            state,
            created_at: row.int("created_at")?,
            entered_at: row.int("entered_at")?,
            active_at: row.int("active_at")?,
            limits: LifecycleLimits {
                max_duration_minutes: row.opt_float("max_duration")?,
                max_waiting_for_dependencies_minutes: row
                    .opt_float("max_waiting_for_dependencies")?,
                max_waiting_for_retry_minutes: row.opt_float("max_waiting_for_retry")?,
                max_steps_in_process_minutes: row.opt_float("max_steps_in_process")?,
            },
        };
        let task_uuid = row.text("task_uuid")?;
        let task = json!({
            "task_uuid": task_uuid,
            "namespace": row.text("namespace")?,
            "name": row.text("name")?,
            "version": row.text("version")?,
            "state": state.as_str(),
            "priority": row.int("priority")?,
            "initiator": row.text("initiator")?,
            "source_system": row.text("source_system")?,
            "reason": row.text("reason")?,
            "correlation_id": row.text("correlation_id")?,
            "created_at": facts.created_at,
            "entered_state_at": facts.entered_at,
            "last_progress_at": facts.active_at,
        });
        Ok(Candidate {
            task,
            task_uuid,
            namespace: row.text("namespace")?,
            name: row.text("name")?,
            version: row.text("version")?,
            state,
            facts,
        })
    }
}

/// A step of an overdue task, as the DLQ snapshot records it (`task_uuid, step_uuid, name,
/// step_type, state, attempts, max_attempts, has_result, error, next_attempt_at, started_at,
/// completed_at, worker_id`).
pub(crate) struct SnapStep {
    task_uuid: String,
    step_uuid: String,
    state: StepState,
    view: Value,
}

impl SnapStep {
    pub(crate) fn of(s: &impl Cols) -> Result<SnapStep> {
        let error: Option<Value> = s.opt_text("error")?.map(|e| decode(&e)).transpose()?;
        let step_uuid = s.text("step_uuid")?;
        let state = s.text("state")?;
        Ok(SnapStep {
            task_uuid: s.text("task_uuid")?,
            step_uuid: step_uuid.clone(),
            state: parse_state(&state)?,
            view: json!({
                "name": s.text("name")?,
                "step_uuid": step_uuid,
                "step_type": s.text("step_type")?,
                "state": state,
                "attempts": s.int("attempts")?,
                "max_attempts": s.int("max_attempts")?,
                "has_result": s.flag("has_result")?,
                "error": error,
                "next_attempt_at": s.opt_int("next_attempt_at")?,
                "started_at": s.opt_int("started_at")?,
                "completed_at": s.opt_int("completed_at")?,
                "worker_id": s.opt_text("worker_id")?,
            }),
        })
    }
}

/// The candidates past a limit at `now` (at most `limit`), with the verdict on each.
pub(crate) fn overdue(
    candidates: Vec<Candidate>,
    staleness_threshold_ms: Option<i64>,
    now: Millis,
    limit: usize,
) -> Vec<(Candidate, Verdict)> {
    candidates
        .into_iter()
        .filter_map(|c| exceeded(&c.facts, staleness_threshold_ms, now).map(|v| (c, v)))
        .take(limit)
        .collect()
}

/// What the lifecycle check writes for its overdue tasks.
pub(crate) struct LifecyclePlan {
    /// Steps to cancel (their transitions are journaled already).
    pub(crate) cancelled: Vec<String>,
    /// DLQ rows `[uuid, task, namespace, name, version, reason, message, original state,
    /// snapshot]`.
    pub(crate) entries: Vec<Value>,
    pub(crate) moved: Vec<LifecycleExceeded>,
}

/// Journals the moves of overdue tasks to `error` (and of their unfinished steps to
/// `cancelled`) and builds their DLQ entries with a snapshot of the task as it was.
pub(crate) fn lifecycle_plan(
    j: &mut Journal,
    overdue: &[(Candidate, Verdict)],
    steps: &[SnapStep],
    staleness_threshold_ms: Option<i64>,
    actor: &str,
    now: Millis,
) -> Result<LifecyclePlan> {
    let mut plan = LifecyclePlan {
        cancelled: Vec::new(),
        entries: Vec::with_capacity(overdue.len()),
        moved: Vec::with_capacity(overdue.len()),
    };
    for (c, verdict) in overdue {
        let task_steps: Vec<&SnapStep> = steps
            .iter()
            .filter(|s| s.task_uuid == c.task_uuid)
            .collect();
        let mut limits = serde_json::to_value(&c.facts.limits).unwrap_or_else(|_| json!({}));
        limits["staleness_threshold_ms"] = json!(staleness_threshold_ms);
        let snapshot = json!({
            "detected_at": now,
            "task": c.task,
            "limits": limits,
            "steps": task_steps.iter().map(|s| &s.view).collect::<Vec<_>>(),
        });
        let message = verdict.message.as_str();
        for s in task_steps.iter().filter(|s| !s.state.is_terminal()) {
            j.step_moves(
                &s.step_uuid,
                &c.task_uuid,
                s.state,
                &[StepEvent::Cancel],
                None,
                actor,
                Some(message),
                now,
            )?;
            plan.cancelled.push(s.step_uuid.clone());
        }
        let dlq_entry_uuid = new_uuid();
        let metadata = json!({
            "dlq_entry_uuid": dlq_entry_uuid,
            "lifecycle_reason": verdict.reason,
            "limit_ms": verdict.limit_ms,
            "elapsed_ms": verdict.elapsed_ms,
        });
        j.task_move_with_metadata(
            &c.task_uuid,
            c.state,
            TaskEvent::LifecycleExceeded,
            actor,
            Some(message),
            &metadata,
            now,
        )?;
        plan.entries.push(json!([
            dlq_entry_uuid,
            c.task_uuid,
            c.namespace,
            c.name,
            c.version,
            verdict.reason.as_str(),
            message,
            c.state.as_str(),
            snapshot.to_string(),
        ]));
        plan.moved.push(LifecycleExceeded {
            task_uuid: c.task_uuid.clone(),
            original_state: c.state,
            reason: verdict.reason,
            dlq_entry_uuid,
        });
    }
    Ok(plan)
}

/// Checkpoints a step keeps (SPEC §7).
pub(crate) const CHECKPOINT_HISTORY: usize = 20;

/// `history` (stored JSON, if any) with the checkpoint `cp` of `attempt` appended, bounded.
pub(crate) fn checkpoint_history(
    history: Option<String>,
    cp: &crate::job::Checkpoint,
    attempt: u32,
    now: Millis,
) -> Result<String> {
    let mut history: Vec<Value> = history.map(|h| decode(&h)).transpose()?.unwrap_or_default();
    history.push(json!({"cursor": cp.cursor, "items_processed": cp.items_processed, "attempt": attempt, "at": now}));
    if history.len() > CHECKPOINT_HISTORY {
        history.drain(..history.len() - CHECKPOINT_HISTORY);
    }
    to_json(&history)
}

/// The steps an operator's result for a decision or analyzer step (`step_type`, named `name`,
/// in a task running `template`, the snapshot's JSON) creates, as a handler's result would
/// (SPEC §6, §7). An outcome that cannot be applied refuses the whole action, naming what is
/// wrong, so the operator can correct the result.
pub(crate) fn operator_expansion(
    name: &str,
    step_type: &str,
    template: &str,
    result: &Value,
) -> Result<Expansion> {
    let template: crate::template::TaskTemplate = decode(template)?;
    let planned = if step_type == "batchable" {
        crate::orchestrator::plan_batches(&template, name, result)
    } else {
        crate::orchestrator::plan_decision(&template, name, result)
    };
    planned.map_err(|f| {
        Error::validation(format!(
            "the result given for step `{name}` cannot be applied: {}",
            f.message
        ))
    })
}
