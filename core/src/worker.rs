//! Workers: the handler registry's run loop for Rust handlers, the completer that applies
//! results in batches, the sweeper (due retries, timeouts, expired leases), lease renewal, and
//! the dispatch port for foreign handlers.

mod handler;
mod port;

pub use handler::{FnHandler, StepContext, StepHandler, handler_fn};
pub use port::Worker;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tracing::Instrument;

use crate::Result;
use crate::batch::no_op_result;
use crate::clock::Millis;
use crate::engine::Inner;
use crate::job::{Checkpoint, ErrorType, StepFailure, StepJob, StepOutcome};
use crate::orchestrator::{decide_failure, plan_batches, plan_decision, resolve_outcome};
use crate::state::TaskState;
use crate::store::{
    AttemptResult, CallableFilter, ClaimRequest, Completion, Expiry, FinishReport, Resolution,
};
use crate::template::StepType;

/// What became of a result handed back through the dispatch port, and the host thread's next
/// job when one was claimed along with it.
pub(crate) struct Settled {
    pub(crate) completion: Completion,
    pub(crate) next: Option<StepJob>,
    /// Jobs claimed along beyond what the asking threads took, for the port's other threads.
    pub(crate) extra: Vec<StepJob>,
    /// The "new work" generation at which the claim along took every ready step the port
    /// serves (it came back short), if it did.
    pub(crate) exhausted_at: Option<u64>,
}

/// A finished attempt on its way to the completer.
pub(crate) struct Finished {
    pub(crate) job: StepJob,
    pub(crate) outcome: StepOutcome,
    /// A dispatch-port host waiting for the outcome's fate and, when it asked (`next`), for a
    /// job claimed in the same transaction.
    pub(crate) reply: Option<oneshot::Sender<Result<Settled>>>,
    /// The claim of the dispatch-port worker whose host thread wants its next job along with
    /// this result (`limit` is set by the completer).
    pub(crate) next: Option<ClaimRequest>,
}

/// Most results applied in one transaction.
const FINISH_BATCH: usize = 256;

/// How often a batch of results is retried after a transient database error.
const FINISH_RETRIES: u32 = 5;

/// Counts what applied results did: handler run times and retries per namespace, tasks this
/// process finished per template.
fn record_metrics(
    inner: &Inner,
    batch: &[Finished],
    results: &[AttemptResult],
    reports: &[crate::store::FinishReport],
    now: Millis,
) {
    let mut finished: Vec<&str> = Vec::new();
    for ((f, r), rep) in batch.iter().zip(results).zip(reports) {
        if rep.completion != Completion::Accepted {
            continue;
        }
        let outcome = match r.resolution {
            Resolution::Succeeded { .. } => "success",
            Resolution::Retry { .. } => "retry",
            Resolution::Failed { .. } => "failure",
        };
        let took = Duration::from_millis((now - f.job.started_at).max(0) as u64);
        inner.metrics.step_finished(&f.job.namespace, outcome, took);
        if let (Some(task), Some(state)) = (&rep.task_uuid, rep.task_state)
            && matches!(state, TaskState::Complete | TaskState::Error)
            && !finished.contains(&task.as_str())
        {
            finished.push(task);
            inner.metrics.task_finished(
                &f.job.namespace,
                &f.job.task_name,
                state == TaskState::Error,
            );
        }
    }
}

/// Applies finished attempts in batches: one transaction for everything that arrived while the
/// previous batch was being written.
pub(crate) fn spawn_completer(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Finished>) {
    tokio::spawn(async move {
        let mut shutdown = inner.shutdown.subscribe();
        let mut batch: Vec<Finished> = Vec::with_capacity(FINISH_BATCH);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, FINISH_BATCH) => if n == 0 { break },
                _ = shutdown.wait_for(|s| *s) => break,
            }
            apply_batch(&inner, std::mem::take(&mut batch)).await;
        }
    });
}

async fn apply_batch(inner: &Arc<Inner>, mut batch: Vec<Finished>) {
    let now = inner.clock.now();
    let mut results: Vec<AttemptResult> = batch
        .iter_mut()
        .map(|f| {
            // The outcome is consumed here; results can be large, so it is moved, not cloned.
            let outcome = std::mem::replace(&mut f.outcome, StepOutcome::success(Value::Null));
            let schema = f
                .job
                .definition
                .result_schema
                .as_ref()
                .and_then(|s| inner.schema(s).ok());
            AttemptResult {
                step_uuid: f.job.step_uuid.clone(),
                attempt: f.job.attempt,
                worker_id: Some(f.job.worker_id.clone()),
                expiry: None,
                resolution: resolve_outcome(
                    &f.job,
                    outcome,
                    schema.as_deref(),
                    inner.config.max_payload_bytes,
                    now,
                ),
                started_at: Some(f.job.started_at),
                expansion: None,
            }
        })
        .collect();
    for (f, r) in batch.iter().zip(results.iter_mut()) {
        if matches!(
            f.job.definition.step_type,
            StepType::Decision | StepType::Batchable
        ) {
            plan_step_creation(inner, &f.job, r, now).await;
        }
    }
    let spans = crate::telemetry::result_spans(
        batch
            .iter()
            .zip(&results)
            .map(|(f, r)| (&f.job, &r.resolution)),
    );
    // Claim ahead: take the permits for Rust handlers now, so the steps these results make
    // ready are claimed in the same transaction and start without waking the worker loop.
    // On PostgreSQL only for a lone result (a task running on its own: the claim along saves
    // its next step a wake-up and a round trip); under load the worker loop's claims, on
    // their own connection, run in parallel with these transactions instead of after them
    // (5,000 tasks: 2,275–2,360 steps/s against 1,383–1,741 with claims along every batch).
    // Without Rust handlers, the host threads of a dispatch-port worker that asked for their
    // next job along with their result, or wait with a parked claim, get it the same way.
    let mut ahead = None;
    if inner.single_writer || batch.len() == 1 {
        ahead = claim_ahead(inner).map(|(req, permits)| Ahead::Rust(req, permits));
        if ahead.is_none() {
            ahead = port_ahead(inner, &mut batch);
        }
    }
    // A transient database failure (a lock held too long by another process, say) must not
    // throw away finished work: the batch is retried a few times before the attempts are left
    // to expire and re-run.
    let mut tries = 0;
    let reports = loop {
        let r = match &ahead {
            Some(a) => {
                inner
                    .store
                    .finish_and_claim(&results, &inner.worker_id, a.request(), now)
                    .await
            }
            None => inner
                .store
                .finish(&results, &inner.worker_id, now)
                .await
                .map(|r| (r, Vec::new())),
        };
        match r {
            Err(e)
                if e.kind.is_retryable() && tries < FINISH_RETRIES && !*inner.shutdown.borrow() =>
            {
                tries += 1;
                tracing::warn!(
                    "recording {} step results failed (try {tries}): {e}",
                    results.len()
                );
                ahead = None;
                tokio::time::sleep(Duration::from_millis(50 << tries)).await;
            }
            other => break other,
        }
    };
    for f in &batch {
        inner.release(&f.job.step_uuid, f.job.attempt);
    }
    // Whether the worker loop and waiting host threads must look for steps: not when this
    // transaction's claim already took every ready step this process serves (it got fewer
    // than it asked for, and it was the only kind of claimer here). Waking them anyway costs
    // a write transaction.
    let mut wake_workers = true;
    let mut handed: Vec<StepJob> = Vec::new();
    let mut extra: Vec<StepJob> = Vec::new();
    let mut exhausted_at = None;
    let reports = reports.map(|(reports, jobs)| {
        match ahead {
            Some(Ahead::Rust(req, permits)) => {
                wake_workers = jobs.len() >= req.limit || inner.has_port_workers();
                inner.metrics.claimed_along(jobs.len());
                spawn_jobs(inner, jobs, permits);
            }
            Some(Ahead::Port(req, parked, generation)) => {
                let short = jobs.len() < req.limit;
                wake_workers = !short || others_may_claim(inner);
                exhausted_at = short.then_some(generation);
                inner.metrics.claimed_along(jobs.len());
                let asked = batch.iter().filter(|f| f.next.is_some()).count();
                (handed, extra) = hand_out(inner, jobs, asked, parked, exhausted_at);
            }
            None => {}
        }
        reports
    });
    match reports {
        Ok(reports) => {
            inner.after_finish(&reports);
            complete_placeholders(inner, &results, &reports).await;
            let changed: Vec<_> = reports
                .iter()
                .filter_map(|r| Some((r.task_uuid.clone()?, r.task_state?)))
                .collect();
            inner.after_change(&changed, wake_workers);
            if results
                .iter()
                .any(|r| matches!(r.resolution, Resolution::Retry { .. }))
            {
                inner.sweep.notify_one();
            }
            record_metrics(inner, &batch, &results, &reports, now);
            for (span, r) in spans.iter().zip(&reports) {
                crate::telemetry::record_settled(span, r);
            }
            let mut handed = handed.into_iter();
            for (i, (f, r)) in batch.into_iter().zip(reports).enumerate() {
                if let Completion::Rejected(reason) = &r.completion {
                    let _in_span = spans.get(i).map(|s| s.enter());
                    tracing::warn!(step = %f.job.step_uuid, attempt = f.job.attempt, "completion rejected: {reason}");
                }
                // Jobs claimed along go, in order, to the hosts that asked for one; what the
                // claim learnt concerns only their port.
                let (next, extra, exhausted_at) = if f.next.is_some() {
                    (handed.next(), std::mem::take(&mut extra), exhausted_at)
                } else {
                    (None, Vec::new(), None)
                };
                if let Some(reply) = f.reply
                    && let Err(Ok(settled)) = reply.send(Ok(Settled {
                        completion: r.completion,
                        next,
                        extra,
                        exhausted_at,
                    }))
                {
                    // The host is gone: its jobs are left to their leases, as if it had died.
                    abandon(inner, settled.next.into_iter().chain(settled.extra));
                }
            }
        }
        Err(e) => {
            // The attempts stay in progress; their leases expire and they are retried.
            tracing::error!("cannot record {} step results: {e}", batch.len());
            for span in &spans {
                span.record("outcome", "error");
            }
            for f in batch {
                if let Some(reply) = f.reply {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The claim a result batch makes along: for this process's Rust handlers, or for host threads
/// of one dispatch-port worker (those that asked for their next job with their result, then
/// those parked waiting for work).
enum Ahead {
    Rust(ClaimRequest, Vec<OwnedSemaphorePermit>),
    /// With the "new work" generation read before the transaction.
    Port(ClaimRequest, Vec<Parked>, u64),
}

impl Ahead {
    fn request(&self) -> &ClaimRequest {
        match self {
            Ahead::Rust(req, _) | Ahead::Port(req, _, _) => req,
        }
    }
}

/// A dispatch-port host thread waiting for work: the claim it would make (for itself and the
/// threads queued behind it), and where the jobs go when a write transaction claims for it.
pub(crate) struct Parked {
    pub(crate) ticket: u64,
    pub(crate) req: ClaimRequest,
    pub(crate) reply: oneshot::Sender<Claimed>,
}

/// What a transaction claimed for a parked thread (possibly nothing), and the "new work"
/// generation at which that claim took every ready step the port serves, if it did.
pub(crate) struct Claimed {
    pub(crate) jobs: Vec<StepJob>,
    pub(crate) exhausted_at: Option<u64>,
}

/// A claim along a write transaction for host threads of one dispatch-port worker: those in
/// `batch` that asked for their next job with their result, then those parked waiting for work
/// (up to `claim_batch` in all; there are rarely more threads than that, so few claim texts get
/// prepared). Other requests in `batch` are dropped: they get no job and ask the port as usual.
fn port_ahead(inner: &Inner, batch: &mut [Finished]) -> Option<Ahead> {
    if *inner.shutdown.borrow() || inner.draining.load(std::sync::atomic::Ordering::SeqCst) {
        for f in batch.iter_mut() {
            f.next = None;
        }
        return None;
    }
    // Read before the claim: an announcement after it may be of work the claim did not see.
    let generation = *inner.work.borrow();
    let mut parked = inner.parked.lock().unwrap_or_else(|e| e.into_inner());
    let first = batch
        .iter()
        .find_map(|f| f.next.clone())
        .or_else(|| parked.first().map(|p| p.req.clone()))?;
    let most = inner.config.claim_batch.max(1);
    let mut limit = 0;
    for f in batch.iter_mut() {
        let mine = f
            .next
            .as_ref()
            .is_some_and(|n| n.worker_id == first.worker_id);
        if !mine || limit == most {
            f.next = None;
        } else {
            limit += 1;
        }
    }
    // One step more than the asking threads take, when no parked thread would take it: a
    // claim that comes back short tells that nothing else is ready (no announcement needed);
    // a step it does get waits in the port's queue for its next thread.
    let spare =
        usize::from(limit > 0 && !parked.iter().any(|p| p.req.worker_id == first.worker_id));
    limit += spare;
    let mut riding = Vec::new();
    let mut i = 0;
    while i < parked.len() && limit < most {
        if parked[i].req.worker_id == first.worker_id {
            limit += parked[i].req.limit;
            riding.push(parked.swap_remove(i));
        } else {
            i += 1;
        }
    }
    let limit = limit.min(most);
    Some(Ahead::Port(
        ClaimRequest { limit, ..first },
        riding,
        generation,
    ))
}

/// Hands jobs claimed along a transaction to host threads: those that asked with their result
/// (their share is returned first, in order, then what is left over) and then parked ones (up
/// to what each asked for; an empty answer when nothing was left for them).
fn hand_out(
    inner: &Inner,
    jobs: Vec<StepJob>,
    asked: usize,
    parked: Vec<Parked>,
    exhausted_at: Option<u64>,
) -> (Vec<StepJob>, Vec<StepJob>) {
    let mut jobs = jobs
        .into_iter()
        .filter_map(|job| finish_if_no_op(inner, job))
        .inspect(|job| inner.hold(job));
    let handed: Vec<StepJob> = jobs.by_ref().take(asked).collect();
    for p in parked {
        let mine: Vec<StepJob> = jobs.by_ref().take(p.req.limit).collect();
        if let Err(c) = p.reply.send(Claimed {
            jobs: mine,
            exhausted_at,
        }) {
            // The thread stopped waiting: its jobs are left to their leases, as if it had died.
            abandon(inner, c.jobs);
        }
    }
    (handed, jobs.collect())
}

/// Jobs claimed for a host thread that is no longer there: no longer held (so their leases
/// are not renewed), they expire and run again.
fn abandon(inner: &Inner, jobs: impl IntoIterator<Item = StepJob>) {
    for job in jobs {
        tracing::warn!(step = %job.step_uuid, "a job claimed for a host thread that left");
        inner.release(&job.step_uuid, job.attempt);
    }
}

/// Whether, after a claim for dispatch-port threads that came back short, anything else in
/// this process may still want to look for work: other port workers, or Rust handlers.
fn others_may_claim(inner: &Inner) -> bool {
    inner.live_ports.load(std::sync::atomic::Ordering::SeqCst) > 1
        || !inner
            .handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
}

/// A successful decision's or analyzer's result gets the steps it creates, or becomes the
/// permanent `decision_error` / `batch_error` its outcome deserves. When the task's template
/// cannot be read, the attempt fails as retryable and the step runs again.
async fn plan_step_creation(inner: &Inner, job: &StepJob, r: &mut AttemptResult, now: Millis) {
    let Resolution::Succeeded { result, .. } = &r.resolution else {
        return;
    };
    let planned = match inner.snapshot(&job.template_hash).await {
        Ok(template) if job.definition.step_type == StepType::Batchable => {
            plan_batches(&template, &job.step_name, result)
        }
        Ok(template) => plan_decision(&template, &job.step_name, result),
        Err(e) => Err(Box::new(StepFailure::new(
            ErrorType::HandlerError,
            format!(
                "cannot read the task's template to create the steps `{}` asked for: {e}",
                job.step_name
            ),
        ))),
    };
    match planned {
        Ok(expansion) if expansion.steps.is_empty() => {}
        Ok(expansion) => r.expansion = Some(expansion),
        Err(failure) => {
            r.resolution = decide_failure(
                &job.definition.retry,
                job.attempt,
                *failure,
                now,
                fastrand::f64(),
            )
        }
    }
}

/// Stores a checkpoint yielded by `job`'s handler (SPEC §7): the attempt keeps its number,
/// its lease is renewed and its timeout starts afresh, since it is dispatched again. On
/// acceptance `job` carries the checkpoint and its new deadline.
pub(crate) async fn store_checkpoint(
    inner: &Inner,
    job: &mut StepJob,
    cp: Checkpoint,
) -> Result<Completion> {
    let now = inner.clock.now();
    let lease_until = now + inner.config.lease.as_millis() as Millis;
    let window = job.definition.timeout_seconds.map_or(
        inner.config.default_step_timeout.as_millis() as Millis,
        |s| (s as Millis).saturating_mul(1000),
    );
    let timeout_at = now.saturating_add(window);
    let c = inner
        .store
        .checkpoint(
            &job.step_uuid,
            job.attempt,
            &job.worker_id,
            &cp,
            lease_until,
            timeout_at,
            now,
        )
        .await?;
    if c == Completion::Accepted {
        job.checkpoint = Some(cp);
        job.timeout_at = timeout_at;
    }
    Ok(c)
}

/// The outcome of one attempt by a Rust handler: the handler runs again after each checkpoint
/// it yields; a no-op batch placeholder completes without it. `None` when the attempt stopped
/// being this worker's while it ran (a checkpoint was rejected): there is nothing to report.
async fn run_attempt(inner: &Inner, job: &mut StepJob) -> Option<StepOutcome> {
    if let Some(result) = no_op_result(job) {
        return Some(StepOutcome::success(result));
    }
    loop {
        let cp = match run_rust_handler(inner, job).await {
            StepOutcome::Checkpoint(cp) => cp,
            other => return Some(other),
        };
        match store_checkpoint(inner, job, cp).await {
            Ok(Completion::Accepted) => {}
            Ok(Completion::Rejected(reason)) => {
                tracing::warn!(step = %job.step_uuid, attempt = job.attempt, "checkpoint rejected: {reason}");
                inner.release(&job.step_uuid, job.attempt);
                return None;
            }
            Err(e) => {
                return Some(StepOutcome::Failure(StepFailure::new(
                    ErrorType::HandlerError,
                    format!("the checkpoint could not be stored: {e}"),
                )));
            }
        }
    }
}

/// Completes the no-op placeholders that accepted `no_batches` results created, so that
/// their aggregators run whether or not any worker serves the placeholder's callable.
async fn complete_placeholders(inner: &Inner, results: &[AttemptResult], reports: &[FinishReport]) {
    let ids: Vec<String> = results
        .iter()
        .zip(reports)
        .filter(|(_, rep)| rep.completion == Completion::Accepted)
        .filter_map(|(r, _)| r.expansion.as_ref())
        .flat_map(|x| &x.steps)
        .filter(|s| s.inputs.get("is_no_op") == Some(&Value::Bool(true)))
        .map(|s| s.uuid.clone())
        .collect();
    if ids.is_empty() {
        return;
    }
    let n = ids.len();
    let req = claim_request(
        inner,
        &inner.worker_id,
        Vec::new(),
        CallableFilter::Steps(ids),
        n,
    );
    match inner.store.claim(&req, inner.clock.now()).await {
        Ok(jobs) => {
            for job in jobs {
                finish_if_no_op(inner, job);
            }
        }
        // A host worker or the unknown-callable pass completes them later.
        Err(e) => tracing::warn!("cannot complete no-op batch placeholders now: {e}"),
    }
}

/// Sends a claimed no-op batch placeholder to the completer with its result and returns
/// `None`; any other job comes back to be run.
pub(crate) fn finish_if_no_op(inner: &Inner, job: StepJob) -> Option<StepJob> {
    let Some(result) = no_op_result(&job) else {
        return Some(job);
    };
    let _ = inner.results.send(Finished {
        job,
        outcome: StepOutcome::success(result),
        reply: None,
        next: None,
    });
    None
}

/// The claim a completer makes alongside its results, with the permits it may fill.
fn claim_ahead(inner: &Arc<Inner>) -> Option<(ClaimRequest, Vec<OwnedSemaphorePermit>)> {
    if !inner.runs_handlers
        || *inner.shutdown.borrow()
        || inner.draining.load(std::sync::atomic::Ordering::SeqCst)
    {
        return None;
    }
    let callables = rust_callables(inner);
    if callables.is_empty() {
        return None;
    }
    let mut permits = Vec::new();
    while permits.len() < inner.config.claim_batch {
        match inner.permits.clone().try_acquire_owned() {
            Ok(p) => permits.push(p),
            Err(_) => break,
        }
    }
    if permits.is_empty() {
        return None;
    }
    // Claims ask for a power of two steps: the limit is part of the claim statement's text,
    // so a handful of texts stay prepared instead of one per possible count.
    let keep = 1 << permits.len().ilog2();
    permits.truncate(keep);
    let req = claim_request(
        inner,
        &inner.worker_id,
        inner.config.namespaces.clone(),
        CallableFilter::Only(callables),
        permits.len(),
    );
    Some((req, permits))
}

fn rust_callables(inner: &Inner) -> Vec<String> {
    inner
        .handlers
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect()
}

/// Runs claimed jobs, each on its own task holding one permit; permits left over are freed.
fn spawn_jobs(inner: &Arc<Inner>, jobs: Vec<StepJob>, mut permits: Vec<OwnedSemaphorePermit>) {
    for job in jobs {
        let Some(permit) = permits.pop() else {
            // Claims never ask for more steps than they hold permits for.
            tracing::error!(step = %job.step_uuid, "no permit for a claimed step; its lease will expire");
            continue;
        };
        inner.hold(&job);
        let inner = inner.clone();
        // What the handler logs runs inside this span, so it carries the task's ids.
        let span = crate::telemetry::step_span(&job);
        let attempt_span = span.clone();
        tokio::spawn(
            async move {
                // The attempt's recorded start is when its handler begins, not when it was
                // claimed.
                let mut job = job;
                job.started_at = inner.clock.now();
                let outcome = run_attempt(&inner, &mut job).await;
                drop(permit);
                match outcome {
                    Some(outcome) => {
                        crate::telemetry::record_outcome(&attempt_span, &outcome);
                        let _ = inner.results.send(Finished {
                            job,
                            outcome,
                            reply: None,
                            next: None,
                        });
                    }
                    None => {
                        attempt_span.record("outcome", "abandoned");
                    }
                }
            }
            .instrument(span),
        );
    }
}

/// A planned task and where to send what became of it.
pub(crate) type Creation = (
    crate::store::NewTask,
    oneshot::Sender<Result<crate::store::Created>>,
);

/// Commits task creations in groups: every creation that arrives while a transaction is being
/// written goes into the next one, so many concurrent callers share commits.
pub(crate) fn spawn_creator(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Creation>) {
    tokio::spawn(async move {
        let mut shutdown = inner.shutdown.subscribe();
        let mut batch: Vec<Creation> = Vec::with_capacity(FINISH_BATCH);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, FINISH_BATCH) => if n == 0 { break },
                _ = shutdown.wait_for(|s| *s) => break,
            }
            let batch = std::mem::take(&mut batch);
            let (tasks, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let now = inner.clock.now();
            let mut ahead = claim_ahead(&inner).map(|(req, permits)| Ahead::Rust(req, permits));
            if ahead.is_none() {
                ahead = port_ahead(&inner, &mut []);
            }
            let req = ahead.as_ref().map(Ahead::request);
            // As in the completer: a claim that came back short took everything ready.
            let mut wake_workers = true;
            match inner
                .store
                .create_tasks(&tasks, &inner.worker_id, req, now)
                .await
            {
                Ok((created, jobs)) => {
                    for (t, c) in tasks.iter().zip(&created) {
                        if matches!(c, crate::store::Created::New(_)) {
                            inner
                                .metrics
                                .task_created(&t.template.namespace, &t.template.name);
                        }
                    }
                    match ahead {
                        Some(Ahead::Rust(req, permits)) => {
                            wake_workers = jobs.len() >= req.limit || inner.has_port_workers();
                            inner.metrics.claimed_along(jobs.len());
                            spawn_jobs(&inner, jobs, permits);
                        }
                        Some(Ahead::Port(req, parked, generation)) => {
                            let short = jobs.len() < req.limit;
                            wake_workers = !short || others_may_claim(&inner);
                            inner.metrics.claimed_along(jobs.len());
                            let (_, extra) =
                                hand_out(&inner, jobs, 0, parked, short.then_some(generation));
                            // A creation claims no spare step (nobody asked), so none is left.
                            debug_assert!(extra.is_empty());
                        }
                        None => {}
                    }
                    for (reply, c) in replies.into_iter().zip(created) {
                        let _ = reply.send(Ok(c));
                    }
                }
                // One bad creation must not fail the others: retry them one by one.
                Err(_) if tasks.len() > 1 => {
                    for (task, reply) in tasks.iter().zip(replies) {
                        let r = inner.store.create_task(task, &inner.worker_id, now).await;
                        let _ = reply.send(r);
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
            if wake_workers {
                inner.work.send_modify(|g| *g += 1);
            }
        }
    });
}

/// Starts the in-process worker loop, the sweeper and lease renewal.
pub(crate) fn spawn_background(inner: &Arc<Inner>) {
    tokio::spawn(run_loop(inner.clone()));
    tokio::spawn(sweeper(inner.clone()));
    tokio::spawn(lease_renewal(inner.clone()));
    tokio::spawn(crate::workflow::workflow_loop(inner.clone()));
    tokio::spawn(crate::events::delivery_loop(inner.clone()));
}

fn claim_request(
    inner: &Inner,
    worker_id: &str,
    namespaces: Vec<String>,
    callables: CallableFilter,
    limit: usize,
) -> ClaimRequest {
    ClaimRequest {
        worker_id: worker_id.to_string(),
        namespaces,
        callables,
        limit,
        lease_ms: inner.config.lease.as_millis() as i64,
        default_timeout_ms: inner.config.default_step_timeout.as_millis() as i64,
        enqueued_before: None,
    }
}

/// The worker loop for Rust handlers: claim as many steps as there are free permits, run each
/// on its own task, sleep until new work, a free permit, or the polling fallback.
async fn run_loop(inner: Arc<Inner>) {
    let mut work = inner.work.subscribe();
    let mut shutdown = inner.shutdown.subscribe();
    // Steps nobody serves are looked for on the polling cadence, not on every wake-up: the
    // grace period they get is far longer than a poll.
    let mut next_unknown_check = tokio::time::Instant::now();
    loop {
        if *shutdown.borrow() {
            break;
        }
        work.mark_unchanged();
        if inner.config.fail_unknown_callables && tokio::time::Instant::now() >= next_unknown_check
        {
            next_unknown_check = tokio::time::Instant::now()
                + unknown_check_every(
                    inner.config.unknown_callable_grace,
                    inner.config.poll_interval,
                );
            if let Err(e) = fail_unknown_callables(&inner, inner.clock.now()).await {
                tracing::error!("checking for unserved steps failed: {e}");
            }
        }
        let mut more = false;
        match claim_and_spawn(&inner).await {
            Ok(filled) => more = filled,
            Err(e) => tracing::error!("claiming steps failed: {e}"),
        }
        if more {
            continue;
        }
        // The next unserved-steps check bounds the sleep only where there is one: without it
        // the check's time stays in the past, and the loop would poll every millisecond.
        let nap = if inner.config.fail_unknown_callables {
            let until_check =
                next_unknown_check.saturating_duration_since(tokio::time::Instant::now());
            inner
                .config
                .poll_interval
                .min(until_check.max(Duration::from_millis(1)))
        } else {
            inner.config.poll_interval
        };
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            _ = work.changed() => {}
            _ = tokio::time::sleep(nap) => {}
        }
    }
}

/// How often steps nobody serves are looked for: a quarter of their grace period, at least
/// every poll, and not more often than every 10 ms unless the poll is shorter still.
fn unknown_check_every(grace: Duration, poll: Duration) -> Duration {
    (grace / 4).max(Duration::from_millis(10)).min(poll)
}

/// Returns true when the claim took every step it asked for (more may be waiting).
async fn claim_and_spawn(inner: &Arc<Inner>) -> Result<bool> {
    let Some((req, permits)) = claim_ahead(inner) else {
        return Ok(false);
    };
    let asked = permits.len();
    let started = std::time::Instant::now();
    let jobs = inner.store.claim(&req, inner.clock.now()).await?;
    inner.metrics.claimed(jobs.len(), started.elapsed());
    // A full claim means more may be ready; the next round finds out (or finds no permit).
    let filled = jobs.len() == asked;
    spawn_jobs(inner, jobs, permits);
    Ok(filled)
}

/// Fails steps whose callable no Rust handler and no dispatch-port worker of this process
/// serves, once they have waited `unknown_callable_grace` (so a host may create a task before
/// it starts the worker that runs it; see docs/decisions/003-unknown-callables.md).
async fn fail_unknown_callables(inner: &Arc<Inner>, now: Millis) -> Result<()> {
    let known = inner.known_callables();
    let mut req = claim_request(
        inner,
        &inner.worker_id,
        Vec::new(),
        CallableFilter::AnyExcept(known.clone()),
        inner.config.claim_batch,
    );
    req.enqueued_before = Some(now - inner.config.unknown_callable_grace.as_millis() as Millis);
    for job in inner.store.claim(&req, now).await? {
        // A no-op batch placeholder needs no handler.
        let Some(job) = finish_if_no_op(inner, job) else {
            continue;
        };
        let searched = if known.is_empty() {
            "none registered".to_string()
        } else {
            known.join(", ")
        };
        let mut f = StepFailure::new(
            ErrorType::HandlerNotFound,
            format!(
                "no handler for callable `{}`: searched the Rust handlers and dispatch-port workers of this process ({searched})",
                job.callable(),
            ),
        );
        f.retryable = false;
        let _ = inner.results.send(Finished {
            job,
            outcome: StepOutcome::Failure(f),
            reply: None,
            next: None,
        });
    }
    Ok(())
}

/// Runs one Rust handler attempt with its timeout; a panic becomes a `handler_error`.
async fn run_rust_handler(inner: &Inner, job: &StepJob) -> StepOutcome {
    let handler = inner
        .handlers
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(job.callable())
        .cloned();
    let Some(handler) = handler else {
        return StepOutcome::Failure(StepFailure::new(
            ErrorType::HandlerNotFound,
            format!(
                "no Rust handler registered for callable `{}`",
                job.callable()
            ),
        ));
    };
    let ctx = StepContext::new(job.clone());
    let timeout = Duration::from_millis((job.timeout_at - inner.clock.now()).max(1) as u64);
    // The handler runs on this task (no task of its own to spawn and join); a panic is caught
    // at each poll, and on timeout the future is dropped, which cancels it at its next await.
    let call = CatchUnwind::new(async move { handler.call(&ctx).await });
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(panic)) => {
            let mut f = StepFailure::new(
                ErrorType::HandlerError,
                format!("handler `{}` panicked: {}", job.callable(), panic.message),
            );
            f.backtrace = panic.backtrace;
            StepOutcome::Failure(f)
        }
        Err(_) => StepOutcome::Failure(StepFailure::new(
            ErrorType::Timeout,
            format!(
                "step `{}` ran past its timeout of {} ms",
                job.step_name,
                timeout.as_millis()
            ),
        )),
    }
}

/// A caught panic: its message and, when the panic hook ran on this thread, its backtrace.
#[derive(Debug, Clone)]
pub(crate) struct Panic {
    pub(crate) message: String,
    pub(crate) backtrace: Option<String>,
}

thread_local! {
    /// Set while a [`CatchUnwind`] polls its future on this thread.
    static CATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The backtrace of the last panic caught on this thread.
    static BACKTRACE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Installs (once per process) a panic hook that records the backtrace of panics raised inside
/// a [`CatchUnwind`] and then runs the hook that was installed before, so an application's
/// own hook keeps working.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CATCHING.with(|c| c.get()) {
                let bt = std::backtrace::Backtrace::force_capture();
                let at = info
                    .location()
                    .map(|l| format!("panicked at {}:{}:{}\n", l.file(), l.line(), l.column()))
                    .unwrap_or_default();
                BACKTRACE.with(|b| *b.borrow_mut() = Some(format!("{at}{bt}")));
            }
            previous(info);
        }));
    });
}

/// A future whose panics become an `Err` with the panic's message and backtrace.
pub(crate) struct CatchUnwind<F>(std::pin::Pin<Box<F>>);

impl<F> CatchUnwind<F> {
    pub(crate) fn new(f: F) -> Self {
        install_panic_hook();
        CatchUnwind(Box::pin(f))
    }
}

impl<F: std::future::Future> std::future::Future for CatchUnwind<F> {
    type Output = std::result::Result<F::Output, Panic>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = &mut self.get_mut().0;
        let was = CATCHING.with(|c| c.replace(true));
        let polled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.as_mut().poll(cx)));
        CATCHING.with(|c| c.set(was));
        match polled {
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Err(payload) => {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".into());
                let backtrace = BACKTRACE.with(|b| b.borrow_mut().take());
                std::task::Poll::Ready(Err(Panic { message, backtrace }))
            }
        }
    }
}

/// One maintenance pass: enqueue due retries; end attempts past their timeout or lease; move
/// tasks past their lifecycle limits to `error` (at most every `lifecycle_check_every`).
pub(crate) async fn sweep_once(inner: &Inner) -> Result<()> {
    let now = inner.clock.now();
    let promoted = inner
        .store
        .promote_due_retries(&inner.worker_id, now)
        .await?;
    let expired = inner.store.expired_attempts(now, 500).await?;
    if !expired.is_empty() {
        let results: Vec<AttemptResult> = expired
            .into_iter()
            .map(|x| {
                let failure = match x.expiry {
                    Expiry::Timeout => StepFailure::new(
                        ErrorType::Timeout,
                        format!("attempt {} ran past its timeout", x.attempt),
                    ),
                    Expiry::LeaseExpired => StepFailure::new(
                        ErrorType::WorkerLost,
                        format!(
                            "the lease of attempt {} expired: its worker died or lost the database",
                            x.attempt
                        ),
                    ),
                };
                // The attempt is over whoever wins the race below: stop renewing its lease.
                inner.release(&x.step_uuid, x.attempt);
                AttemptResult {
                    step_uuid: x.step_uuid,
                    attempt: x.attempt,
                    worker_id: None,
                    expiry: Some(x.expiry),
                    resolution: decide_failure(
                        &x.definition.retry,
                        x.attempt,
                        failure,
                        now,
                        fastrand::f64(),
                    ),
                    started_at: None,
                    expansion: None,
                }
            })
            .collect();
        let reports = inner.finish_and_announce(&results).await?;
        let ended = |e: Expiry| {
            results
                .iter()
                .zip(&reports)
                .filter(|(r, rep)| r.expiry == Some(e) && rep.completion == Completion::Accepted)
                .count()
        };
        inner
            .metrics
            .expired(ended(Expiry::LeaseExpired), ended(Expiry::Timeout));
    } else if promoted > 0 {
        inner.after_change(&[], true);
    }
    crate::lifecycle::sweep(inner, now).await
}

/// Sleeps until the next retry, timeout or lease falls due (or a change is announced), then
/// sweeps. Due retries are enqueued within milliseconds, not on a coarse poll.
async fn sweeper(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        if let Err(e) = sweep_once(&inner).await {
            tracing::error!("maintenance sweep failed: {e}");
        }
        let wait = match inner.store.next_due().await {
            Ok(Some(due)) => delay_until(inner.clock.now(), due).min(inner.config.poll_interval),
            _ => inner.config.poll_interval,
        };
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            _ = inner.sweep.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn delay_until(now: Millis, due: Millis) -> Duration {
    Duration::from_millis((due - now).max(0) as u64)
}

/// Renews the leases of every attempt this process holds, for as long as it lives.
async fn lease_renewal(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(inner.config.lease_renew_every) => {}
        }
        if let Err(e) = renew_held(&inner).await {
            tracing::error!("renewing leases failed: {e}");
        }
    }
}

pub(crate) async fn renew_held(inner: &Inner) -> Result<()> {
    let mut by_worker: std::collections::HashMap<String, Vec<(String, u32)>> = Default::default();
    for (step, (worker, attempt)) in inner.held.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        by_worker
            .entry(worker.clone())
            .or_default()
            .push((step.clone(), *attempt));
    }
    let now = inner.clock.now();
    let until = now + inner.config.lease.as_millis() as Millis;
    for (worker, steps) in by_worker {
        inner
            .store
            .renew_leases(&worker, &steps, until, now)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::unknown_check_every;
    use std::time::Duration;

    #[test]
    fn unknown_callables_are_checked_within_a_poll_whatever_the_settings() {
        let ms = Duration::from_millis;
        assert_eq!(unknown_check_every(ms(2000), ms(1000)), ms(500));
        assert_eq!(unknown_check_every(ms(8000), ms(1000)), ms(1000));
        assert_eq!(unknown_check_every(ms(0), ms(1000)), ms(10));
        // A poll shorter than the 10 ms floor wins (this used to panic in `clamp`).
        assert_eq!(unknown_check_every(ms(2000), ms(5)), ms(5));
        assert_eq!(unknown_check_every(ms(0), ms(1)), ms(1));
    }
}
