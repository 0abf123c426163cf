//! The dispatch port (`tasker_core::worker::Worker`) as the Python class `Worker`, and the
//! job it hands out. Host threads call it; waiting releases the GIL.

use pyo3::prelude::*;
use tasker_core::store::Completion;
use tasker_core::{StepJob, StepOutcome};

use crate::convert::{from_json, seconds, to_json};
use crate::error::{IntoPyResult, invalid_argument};

/// One step attempt handed to Python: the job and its JSON form (the context's data).
#[pyclass(frozen, module = "tasker_core._native")]
pub(crate) struct Job {
    pub(crate) job: StepJob,
    payload: String,
}

impl Job {
    fn new(job: StepJob) -> PyResult<Job> {
        let payload = to_json(&job)?;
        Ok(Job { job, payload })
    }
}

#[pymethods]
impl Job {
    /// The whole job as JSON (SPEC §5.3: task, step, context, inputs, dependency results...).
    #[getter]
    fn payload(&self) -> &str {
        &self.payload
    }

    /// The step's handler callable.
    #[getter]
    fn callable(&self) -> &str {
        self.job.callable()
    }

    #[getter]
    fn step_name(&self) -> &str {
        &self.job.step_name
    }

    #[getter]
    fn step_uuid(&self) -> &str {
        &self.job.step_uuid
    }

    #[getter]
    fn task_uuid(&self) -> &str {
        &self.job.task_uuid
    }

    #[getter]
    fn attempt(&self) -> u32 {
        self.job.attempt
    }

    /// The attempt's deadline (ms since the epoch).
    #[getter]
    fn timeout_at(&self) -> i64 {
        self.job.timeout_at
    }

    fn __repr__(&self) -> String {
        format!(
            "Job(step={:?}, callable={:?}, attempt={}, task={})",
            self.job.step_name,
            self.job.callable(),
            self.job.attempt,
            self.job.task_uuid
        )
    }
}

/// A worker pulling jobs for some callables of some namespaces.
#[pyclass(frozen, module = "tasker_core._native")]
pub(crate) struct Worker {
    port: tasker_core::Worker,
    pid: u32,
}

impl Worker {
    pub(crate) fn new(
        engine: &crate::engine::Engine,
        namespaces: Vec<String>,
        callables: Vec<String>,
    ) -> Worker {
        Worker {
            port: engine.tasker().worker(namespaces, callables),
            pid: std::process::id(),
        }
    }

    fn completion(c: Completion) -> (bool, Option<String>) {
        match c {
            Completion::Accepted => (true, None),
            Completion::Rejected(reason) => (false, Some(reason)),
        }
    }
}

#[pymethods]
impl Worker {
    /// This worker's id.
    #[getter]
    fn id(&self) -> &str {
        self.port.id()
    }

    /// The callables it serves.
    #[getter]
    fn callables(&self) -> Vec<String> {
        self.port.callables()
    }

    /// Serves `more` callables as well from now on; threads waiting in `next_step` look
    /// again at once.
    fn serve_more(&self, more: Vec<String>) {
        self.port.serve_more(&more);
    }

    /// Waits up to `timeout` seconds for a job (`None` when none came); the GIL is released
    /// while waiting. Raises `ShutdownError` once the engine is closed.
    fn next_step(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<Job>> {
        crate::engine::check_process(self.pid)?;
        let timeout = seconds(Some(timeout))?.unwrap_or(std::time::Duration::MAX);
        let job = py.detach(|| self.port.next_step(timeout)).py()?;
        job.map(Job::new).transpose()
    }

    /// A job already claimed for this worker's threads, without claiming or waiting (`None`
    /// when there is none): a stopping pool runs these before its threads leave.
    fn take_queued(&self) -> PyResult<Option<Job>> {
        crate::engine::check_process(self.pid)?;
        self.port.take_queued().map(Job::new).transpose()
    }

    /// Hands back a job's outcome, given as the JSON of a core `StepOutcome`
    /// (`{"outcome": "success", "result": {...}}` or `{"outcome": "failure", ...}`); returns
    /// `(accepted, reason_if_rejected)`.
    fn complete(
        &self,
        py: Python<'_>,
        job: &Job,
        outcome: &str,
    ) -> PyResult<(bool, Option<String>)> {
        crate::engine::check_process(self.pid)?;
        let outcome: StepOutcome = from_json(outcome, "step outcome")?;
        if matches!(outcome, StepOutcome::Checkpoint(_)) {
            return Err(invalid_argument(
                "a checkpoint goes through Worker.checkpoint",
            ));
        }
        let c = py.detach(|| self.port.complete(&job.job, outcome)).py()?;
        Ok(Self::completion(c))
    }

    /// Hands back a job's outcome like `complete` and returns, with `(accepted, reason)`,
    /// this thread's next job when one was ready: it is claimed in the same transaction that
    /// records the outcome (`None` when nothing was ready; then ask `next_step`).
    fn complete_and_next(
        &self,
        py: Python<'_>,
        job: &Job,
        outcome: &str,
    ) -> PyResult<(bool, Option<String>, Option<Job>)> {
        crate::engine::check_process(self.pid)?;
        let outcome: StepOutcome = from_json(outcome, "step outcome")?;
        if matches!(outcome, StepOutcome::Checkpoint(_)) {
            return Err(invalid_argument(
                "a checkpoint goes through Worker.checkpoint",
            ));
        }
        let (c, next) = py
            .detach(|| self.port.complete_and_next(&job.job, outcome))
            .py()?;
        let (accepted, reason) = Self::completion(c);
        Ok((accepted, reason, next.map(Job::new).transpose()?))
    }

    /// Stores a checkpoint (`checkpoint_yield`); the job comes out of `next_step` again.
    fn checkpoint(
        &self,
        py: Python<'_>,
        job: &Job,
        cursor: &str,
        items_processed: u64,
        accumulated: &str,
    ) -> PyResult<(bool, Option<String>)> {
        crate::engine::check_process(self.pid)?;
        let cursor = from_json(cursor, "checkpoint cursor")?;
        let accumulated = from_json(accumulated, "accumulated results")?;
        let c = py
            .detach(|| {
                self.port
                    .checkpoint(&job.job, cursor, items_processed, accumulated)
            })
            .py()?;
        Ok(Self::completion(c))
    }

    /// Renews the job's lease now; false when the attempt is no longer held.
    fn heartbeat(&self, py: Python<'_>, job: &Job) -> PyResult<bool> {
        crate::engine::check_process(self.pid)?;
        py.detach(|| self.port.heartbeat(&job.job)).py()
    }
}
