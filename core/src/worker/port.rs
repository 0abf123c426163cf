//! The dispatch port: how foreign handlers (Python, Ruby, TypeScript, C) pull work. Host code
//! never runs on tokio threads: it calls these methods from its own threads, which block (or
//! await) without holding anything of the engine's.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::oneshot;
use tracing::Span;

use super::{Claimed, Finished, Parked, Settled};
use crate::engine::Tasker;
use crate::job::{Checkpoint, StepJob, StepOutcome};
use crate::store::{CallableFilter, ClaimRequest, Completion};
use crate::{Error, ErrorKind, Result};

/// A worker serving some namespaces with handlers that live outside Rust.
///
/// Only steps whose callable is in `callables` are claimed: a step this worker cannot run is
/// left for one that can. Leases of handed-out jobs are renewed by the engine for as long as
/// the process lives; a job whose handler hangs is ended by its timeout.
pub struct Worker {
    tasker: Tasker,
    id: String,
    namespaces: Vec<String>,
    /// What it serves; a host that learns new handlers adds to it ([`Worker::serve_more`]).
    callables: std::sync::RwLock<Vec<String>>,
    /// Jobs held for this worker's threads, handed out before any claim: checkpointed ones
    /// to run again, and steps claimed along a transaction beyond what its threads took.
    ready: Mutex<VecDeque<StepJob>>,
    /// The `tasker.step` span of each job handed out, from its claim to its completion.
    spans: Mutex<HashMap<(String, u32), Span>>,
    /// Held by the one host thread that waits for work and claims; the others queue for it
    /// (see [`Worker::next_step_async`]).
    claimer: tokio::sync::Mutex<()>,
    /// Host threads queued for `claimer`: the parked claim asks for them too.
    waiting_threads: AtomicUsize,
    /// The "new work" generation at which a claim last took every ready step this worker
    /// serves, and when: until the generation moves, a new claim would find nothing that this
    /// process made ready (work of other processes sharing an SQLite file is never announced,
    /// so this knowledge lasts one polling period).
    exhausted: Mutex<Option<(u64, std::time::Instant)>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("callables", &self.callables())
            .finish()
    }
}

impl Worker {
    pub(crate) fn new(tasker: Tasker, namespaces: Vec<String>, callables: Vec<String>) -> Worker {
        let inner = &tasker.inner;
        let n = inner
            .port_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}-port{n}", inner.worker_id);
        inner
            .live_ports
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // Counted, so dropping one of two workers serving a callable keeps it known.
        let mut known = inner
            .port_callables
            .write()
            .unwrap_or_else(|e| e.into_inner());
        for c in &callables {
            *known.entry(c.clone()).or_default() += 1;
        }
        drop(known);
        Worker {
            tasker,
            id,
            namespaces,
            callables: std::sync::RwLock::new(callables),
            ready: Mutex::new(VecDeque::new()),
            spans: Mutex::new(HashMap::new()),
            claimer: tokio::sync::Mutex::new(()),
            waiting_threads: AtomicUsize::new(0),
            exhausted: Mutex::new(None),
        }
    }

    /// Runs `f` to completion for a blocking caller. Host threads are never tokio threads;
    /// calling from one would deadlock the runtime, so it is refused instead.
    fn block_on<T>(&self, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::new(
                ErrorKind::Internal,
                "the blocking dispatch-port calls cannot run on a tokio thread; use the *_async forms",
            ));
        }
        self.tasker.inner.runtime.block_on(f)
    }

    /// This worker's id (recorded as the actor of its claims).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The callables this worker serves.
    pub fn callables(&self) -> Vec<String> {
        self.callables
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many of this worker's host threads wait for work with their claim parked on the
    /// engine (at most one: the others queue behind it). Introspection for hosts and tests.
    pub fn parked_threads(&self) -> usize {
        self.tasker
            .inner
            .parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|p| p.req.worker_id == self.id)
            .count()
    }

    /// Serves `more` callables from now on, as well as those it served. Host threads waiting in
    /// [`Worker::next_step`] look again at once with the larger set, so a handler registered
    /// while they wait gets its steps without delay.
    pub fn serve_more(&self, more: &[String]) {
        let inner = &self.tasker.inner;
        {
            let mut mine = self.callables.write().unwrap_or_else(|e| e.into_inner());
            let mut known = inner
                .port_callables
                .write()
                .unwrap_or_else(|e| e.into_inner());
            for c in more {
                if !mine.contains(c) {
                    mine.push(c.clone());
                    *known.entry(c.clone()).or_default() += 1;
                }
            }
        }
        inner.work.send_modify(|g| *g += 1);
    }

    /// Waits up to `timeout` for a job. Blocking; call it from a host thread, never from a
    /// tokio thread.
    pub fn next_step(&self, timeout: Duration) -> Result<Option<StepJob>> {
        self.block_on(self.next_step_async(timeout))
    }

    /// Async form of [`Worker::next_step`].
    ///
    /// One host thread at a time waits for work and claims; the others queue behind it, in
    /// order. An announcement of new work then wakes one thread instead of all of them (which
    /// all claimed, and all but one came back empty), and the next in line takes over as soon
    /// as the one before has its job, so steps that became ready together still start
    /// together.
    pub async fn next_step_async(&self, timeout: Duration) -> Result<Option<StepJob>> {
        let deadline = tokio::time::Instant::now() + timeout;
        if let Some(job) = self.take_queued() {
            return Ok(Some(job));
        }
        let mut shutdown = self.tasker.inner.shutdown.subscribe();
        // Counted while queued (also if this future is dropped there): the parked claim asks
        // for these threads too.
        let waiting = Waiting::new(&self.waiting_threads);
        let _turn = tokio::select! {
            turn = self.claimer.lock() => turn,
            _ = shutdown.wait_for(|s| *s) => {
                return Err(Error::new(ErrorKind::Shutdown, "the engine is closed"));
            }
            _ = tokio::time::sleep_until(deadline) => return Ok(None),
        };
        drop(waiting);
        self.claim_until(deadline).await
    }

    /// A job already claimed for this worker's threads (queued along a transaction, or
    /// checkpointed), without claiming or waiting. A stopping host runs these before its
    /// threads leave; otherwise they stay held until a drain's deadline hands them back.
    pub fn take_queued(&self) -> Option<StepJob> {
        self.ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    /// Claims, and waits for announcements of new work to claim again, until a job comes or
    /// `deadline` passes.
    async fn claim_until(&self, deadline: tokio::time::Instant) -> Result<Option<StepJob>> {
        let inner = &self.tasker.inner;
        let mut work = inner.work.subscribe();
        let mut shutdown = inner.shutdown.subscribe();
        // Whether to claim even if the last claim took everything and nothing was announced
        // since: after the polling fallback (work another process made is not announced
        // here) or a failed transaction.
        let mut force = false;
        loop {
            if let Some(job) = self.take_queued() {
                return Ok(Some(job));
            }
            if *shutdown.borrow() {
                return Err(Error::new(ErrorKind::Shutdown, "the engine is closed"));
            }
            if inner.draining.load(Ordering::SeqCst) {
                // A draining engine claims nothing new: what it holds finishes or is handed
                // back, and the rest is left to other processes.
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => continue,
                    _ = tokio::time::sleep_until(deadline) => return Ok(None),
                }
            }
            work.mark_unchanged();
            let generation = *work.borrow();
            let req = super::claim_request(
                inner,
                &self.id,
                self.namespaces.clone(),
                CallableFilter::Only(self.callables()),
                1,
            );
            if force || !self.nothing_new_since(generation) {
                let started = std::time::Instant::now();
                let mut jobs = inner.store.claim(&req, inner.clock.now()).await?;
                inner.metrics.claimed(jobs.len(), started.elapsed());
                match jobs.pop() {
                    // A no-op batch placeholder never reaches the host: the engine completes it.
                    Some(job) => {
                        if let Some(job) = super::finish_if_no_op(inner, job) {
                            inner.hold(&job);
                            self.open_span(&job);
                            return Ok(Some(job));
                        }
                    }
                    None => self.exhausted_at(Some(generation)),
                }
            }
            match self.park(req, &mut work, &mut shutdown, deadline).await {
                Woken::Job(job) => return Ok(Some(*job)),
                Woken::Look { force: f } => force = f,
                Woken::Deadline => return Ok(None),
            }
        }
    }

    /// Waits for work with this thread's claim parked on the engine: the next write
    /// transaction (a result batch or a task creation) claims along for it and for the threads
    /// queued behind it, so steps made ready there reach them without a wake-up and a claim of
    /// their own. Returns a job so claimed (the others' wait in the port's queue, which they
    /// look at first), or when the thread should claim for itself (new work announced, the
    /// polling fallback, a transaction that failed), or the deadline.
    async fn park(
        &self,
        mut req: ClaimRequest,
        work: &mut tokio::sync::watch::Receiver<u64>,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
        deadline: tokio::time::Instant,
    ) -> Woken {
        let inner = &self.tasker.inner;
        let poll = tokio::time::sleep(inner.config.poll_interval);
        tokio::pin!(poll);
        loop {
            let ticket = inner.park_seq.fetch_add(1, Ordering::Relaxed);
            req.limit = (1 + self.waiting_threads.load(Ordering::SeqCst))
                .min(inner.config.claim_batch.max(1));
            let (tx, mut rx) = oneshot::channel();
            inner
                .parked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Parked {
                    ticket,
                    req: req.clone(),
                    reply: tx,
                });
            // Removes the claim if no transaction has taken it yet, also when this future is
            // dropped; a taken one is answered on `rx`.
            let guard = Unpark { inner, ticket };
            let stop = tokio::select! {
                r = &mut rx => {
                    drop(guard);
                    match r {
                        Ok(claimed) => match self.receive(claimed) {
                            Some(job) => return Woken::Job(Box::new(job)),
                            // The claim along found nothing: wait again, without a claim.
                            None => continue,
                        },
                        // The transaction failed: look for ourselves.
                        Err(_) => return Woken::Look { force: true },
                    }
                }
                _ = work.changed() => Woken::Look { force: false },
                _ = shutdown.wait_for(|s| *s) => Woken::Look { force: false },
                _ = &mut poll => Woken::Look { force: true },
                _ = tokio::time::sleep_until(deadline) => Woken::Deadline,
            };
            if guard.remove() {
                return stop;
            }
            // A transaction took the claim just now: its answer comes at once.
            return match rx.await {
                Ok(claimed) => match self.receive(claimed) {
                    Some(job) => Woken::Job(Box::new(job)),
                    None => stop,
                },
                Err(_) => Woken::Look { force: true },
            };
        }
    }

    /// Takes what a transaction claimed for this worker's parked thread: the first job for
    /// the thread, the others queued for the threads behind it.
    fn receive(&self, claimed: Claimed) -> Option<StepJob> {
        self.exhausted_at(claimed.exhausted_at);
        let mut jobs = claimed.jobs.into_iter();
        let first = jobs.next()?;
        self.open_span(&first);
        self.queue(jobs);
        Some(first)
    }

    /// Queues jobs claimed for this worker's next threads (they look at the queue first);
    /// whether there were any.
    fn queue(&self, jobs: impl IntoIterator<Item = StepJob>) -> bool {
        let jobs: Vec<StepJob> = jobs.into_iter().collect();
        for job in &jobs {
            self.open_span(job);
        }
        let any = !jobs.is_empty();
        self.ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(jobs);
        any
    }

    /// Records that a claim at "new work" generation `g` took every ready step.
    fn exhausted_at(&self, g: Option<u64>) {
        if let Some(g) = g {
            *self.exhausted.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((g, std::time::Instant::now()));
        }
    }

    /// Whether a claim now would find nothing: one took everything at generation `g`, within
    /// the last polling period.
    fn nothing_new_since(&self, g: u64) -> bool {
        let poll = self.tasker.inner.config.poll_interval;
        self.exhausted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|(at, when)| at == g && when.elapsed() < poll)
    }

    /// Hands back the outcome of a job: accepted, or rejected when the attempt is no longer
    /// current (timed out, cancelled, lease lost). A checkpoint outcome stores the checkpoint
    /// and the job comes out of `next_step` again.
    pub fn complete(&self, job: &StepJob, outcome: StepOutcome) -> Result<Completion> {
        self.block_on(self.complete_async(job, outcome))
    }

    /// Async form of [`Worker::complete`].
    pub async fn complete_async(&self, job: &StepJob, outcome: StepOutcome) -> Result<Completion> {
        if let StepOutcome::Checkpoint(cp) = outcome {
            return self.store_checkpoint(job, cp).await;
        }
        Ok(self.settle(job, outcome, false).await?.0)
    }

    /// Hands back the outcome of a job, like [`Worker::complete`], and takes this host
    /// thread's next job in the same transaction when one is ready: a thread that runs steps
    /// one after another then costs one write per step instead of two (a completion, then a
    /// claim). `None` means nothing was ready for it then; the thread goes on with
    /// [`Worker::next_step`]. On PostgreSQL it only records the result and returns `None`:
    /// there the thread's own claim, on another connection, runs in parallel with the
    /// completer's transactions, which measured faster under load. Blocking; call it from a
    /// host thread.
    pub fn complete_and_next(
        &self,
        job: &StepJob,
        outcome: StepOutcome,
    ) -> Result<(Completion, Option<StepJob>)> {
        self.block_on(self.complete_and_next_async(job, outcome))
    }

    /// Async form of [`Worker::complete_and_next`].
    pub async fn complete_and_next_async(
        &self,
        job: &StepJob,
        outcome: StepOutcome,
    ) -> Result<(Completion, Option<StepJob>)> {
        if let StepOutcome::Checkpoint(cp) = outcome {
            let c = self.store_checkpoint(job, cp).await?;
            return Ok((c, self.take_queued()));
        }
        // A job already held for this worker goes first.
        let queued = self.take_queued();
        let want = queued.is_none() && self.tasker.inner.single_writer;
        let (c, next) = self.settle(job, outcome, want).await?;
        Ok((c, queued.or(next)))
    }

    /// Sends an outcome to the completer and waits for its fate, with the next job claimed
    /// along when `want_next`.
    async fn settle(
        &self,
        job: &StepJob,
        outcome: StepOutcome,
        want_next: bool,
    ) -> Result<(Completion, Option<StepJob>)> {
        let inner = &self.tasker.inner;
        // The job's span ends once its result is applied (or refused).
        let span = self
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(job.step_uuid.clone(), job.attempt))
            .unwrap_or_else(|| crate::telemetry::step_span(job));
        crate::telemetry::record_outcome(&span, &outcome);
        let next = want_next.then(|| {
            super::claim_request(
                inner,
                &self.id,
                self.namespaces.clone(),
                CallableFilter::Only(self.callables()),
                1,
            )
        });
        let (tx, rx) = oneshot::channel();
        inner
            .results
            .send(Finished {
                job: job.clone(),
                outcome,
                reply: Some(tx),
                next,
            })
            .map_err(|_| Error::new(ErrorKind::Shutdown, "the engine is closed"))?;
        let Settled {
            completion,
            next,
            extra,
            exhausted_at,
        } = rx
            .await
            .map_err(|_| Error::new(ErrorKind::Shutdown, "the engine is closed"))??;
        self.exhausted_at(exhausted_at);
        // The spare step claimed along: the next thread takes it from the queue; a parked one
        // is woken to look there.
        if self.queue(extra) {
            inner.work.send_modify(|g| *g += 1);
        }
        crate::telemetry::record_completion(&span, &completion);
        if let Some(job) = &next {
            self.open_span(job);
        }
        Ok((completion, next))
    }

    /// The `tracing` span of a job this worker handed out (`tasker.step`, with the task's
    /// ids), open until the job is completed. A host enters it around its handler call so
    /// that what it logs through `tracing` carries the ids; a disabled span when the job is
    /// not (or no longer) held by this worker.
    pub fn span(&self, job: &StepJob) -> Span {
        self.spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(job.step_uuid.clone(), job.attempt))
            .cloned()
            .unwrap_or_else(Span::none)
    }

    /// Opens the span of a job just claimed, and ends those of jobs this process no longer
    /// holds (expired, cancelled, or never completed by the host).
    fn open_span(&self, job: &StepJob) {
        let span = crate::telemetry::step_span(job);
        let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        if !spans.is_empty() {
            let held = self
                .tasker
                .inner
                .held
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            spans.retain(|(step, attempt), span| {
                let kept = held.get(step).is_some_and(|(_, a)| a == attempt);
                if !kept {
                    span.record("outcome", "abandoned");
                }
                kept
            });
        }
        if !span.is_disabled() {
            spans.insert((job.step_uuid.clone(), job.attempt), span);
        }
    }

    /// Stores a checkpoint (`checkpoint_yield`); the job is handed out again by `next_step`
    /// with the checkpoint in its context, without spending an attempt.
    pub fn checkpoint(
        &self,
        job: &StepJob,
        cursor: Value,
        items_processed: u64,
        accumulated: Value,
    ) -> Result<Completion> {
        let cp = Checkpoint {
            cursor,
            items_processed,
            accumulated,
        };
        self.block_on(self.store_checkpoint(job, cp))
    }

    async fn store_checkpoint(&self, job: &StepJob, cp: Checkpoint) -> Result<Completion> {
        let inner = &self.tasker.inner;
        let mut again = job.clone();
        let c = super::store_checkpoint(inner, &mut again, cp).await?;
        if c == Completion::Accepted {
            self.ready
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back(again);
        } else {
            inner.release(&job.step_uuid, job.attempt);
            // The attempt is over for this worker: its span ends here.
            if let Some(span) = self
                .spans
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(job.step_uuid.clone(), job.attempt))
            {
                span.record("outcome", "checkpoint");
                crate::telemetry::record_completion(&span, &c);
            }
        }
        Ok(c)
    }

    /// Renews the job's lease now (the engine also does this on its own). Returns false when
    /// the attempt is no longer held.
    pub fn heartbeat(&self, job: &StepJob) -> Result<bool> {
        let inner = &self.tasker.inner;
        self.block_on(async {
            let now = inner.clock.now();
            let until = now + inner.config.lease.as_millis() as i64;
            let n = inner
                .store
                .renew_leases(
                    &job.worker_id,
                    &[(job.step_uuid.clone(), job.attempt)],
                    until,
                    now,
                )
                .await?;
            Ok(n == 1)
        })
    }
}

/// One host thread queued for the claimer, counted for as long as this lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What ended a parked wait.
enum Woken {
    Job(Box<StepJob>),
    /// Claim again; `force`: even if nothing was announced since the last claim came back
    /// short.
    Look {
        force: bool,
    },
    Deadline,
}

/// Takes a parked claim off the engine unless a transaction has taken it.
struct Unpark<'a> {
    inner: &'a crate::engine::Inner,
    ticket: u64,
}

impl Unpark<'_> {
    /// Whether the claim was still parked (and is no more).
    fn remove(self) -> bool {
        let removed = self.take();
        std::mem::forget(self);
        removed
    }

    fn take(&self) -> bool {
        let mut parked = self.inner.parked.lock().unwrap_or_else(|e| e.into_inner());
        match parked.iter().position(|p| p.ticket == self.ticket) {
            Some(i) => {
                parked.swap_remove(i);
                true
            }
            None => false,
        }
    }
}

impl Drop for Unpark<'_> {
    fn drop(&mut self) {
        self.take();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.tasker
            .inner
            .live_ports
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        let mut known = self
            .tasker
            .inner
            .port_callables
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let mine = self.callables.read().unwrap_or_else(|e| e.into_inner());
        for c in mine.iter() {
            if let Some(n) = known.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    known.remove(c);
                }
            }
        }
    }
}
