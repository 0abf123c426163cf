//! The engine handle (SPEC §12a) as the Python class `Engine`; `tasker_core.Tasker` wraps it.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use pyo3::prelude::*;
use serde_json::{Value, json};
use tasker_core::store::OperatorAction;
use tasker_core::template::TaskTemplate;
use tasker_core::{Config, OpenOptions, TaskRequest, Tasker};

use crate::convert::{from_json, seconds, to_json};
use crate::error::{IntoPyResult, invalid_argument, raise};

/// An open engine: a store, its background work, and the tasks it runs.
#[pyclass(frozen, module = "tasker_core._native")]
pub(crate) struct Engine {
    tasker: Tasker,
    runtime: tokio::runtime::Handle,
    pid: u32,
}

impl Engine {
    /// Runs `f(tasker)` on the engine's runtime with the GIL released.
    fn run<T, F>(&self, py: Python<'_>, f: impl FnOnce(Tasker) -> F + Send) -> PyResult<T>
    where
        T: Send,
        F: Future<Output = tasker_core::Result<T>>,
    {
        self.check_process()?;
        let tasker = self.tasker.clone();
        let runtime = self.runtime.clone();
        py.detach(move || runtime.block_on(f(tasker))).py()
    }

    /// An engine opened before `fork()` belongs to the parent: its runtime does not exist here.
    pub(crate) fn check_process(&self) -> PyResult<()> {
        check_process(self.pid)
    }

    pub(crate) fn tasker(&self) -> &Tasker {
        &self.tasker
    }

    /// An engine handle over a `Tasker` opened elsewhere (by the command line of `cli.rs`) on
    /// `runtime`.
    pub(crate) fn from_tasker(tasker: Tasker, runtime: tokio::runtime::Handle) -> Engine {
        Engine {
            tasker,
            runtime,
            pid: std::process::id(),
        }
    }
}

pub(crate) fn check_process(pid: u32) -> PyResult<()> {
    if pid == std::process::id() {
        return Ok(());
    }
    Err(raise(
        "ShutdownError",
        "shutdown",
        "this engine was opened in another process (before fork()); open a new Tasker in this process",
        None,
    ))
}

/// What a registration tells Python about a template: enough to route its steps.
pub(crate) fn summary(t: &TaskTemplate) -> Value {
    let mut callables: Vec<&str> = t
        .steps
        .iter()
        .map(|s| s.handler.callable.as_str())
        .collect();
    callables.sort_unstable();
    callables.dedup();
    json!({
        "namespace": t.namespace,
        "name": t.name,
        "version": t.version,
        "callables": callables,
    })
}

#[pymethods]
impl Engine {
    /// Opens the store at `url` (`sqlite:PATH`, `sqlite::memory:`, `postgres://...`) with the
    /// configuration from the environment (`TASKER_*`) and the overrides given.
    #[new]
    #[pyo3(signature = (url, *, poll_interval_ms=None, unknown_callable_grace_ms=None, fail_unknown_callables=None))]
    fn open(
        py: Python<'_>,
        url: &str,
        poll_interval_ms: Option<u64>,
        unknown_callable_grace_ms: Option<u64>,
        fail_unknown_callables: Option<bool>,
    ) -> PyResult<Engine> {
        let runtime = crate::runtime::handle()?;
        let mut config = Config::from_env().py()?;
        // On a shared database another process may serve a callable this one does not know.
        if tasker_core::store::is_postgres_url(url) {
            config.fail_unknown_callables = false;
        }
        if let Some(ms) = poll_interval_ms {
            config.poll_interval = Duration::from_millis(ms.max(1));
        }
        if let Some(ms) = unknown_callable_grace_ms {
            config.unknown_callable_grace = Duration::from_millis(ms);
        }
        if let Some(f) = fail_unknown_callables {
            config.fail_unknown_callables = f;
        }
        let url = url.to_string();
        let rt = runtime.clone();
        let tasker = py
            .detach(move || {
                rt.block_on(Tasker::open_with(
                    &url,
                    OpenOptions {
                        config,
                        ..OpenOptions::default()
                    },
                ))
            })
            .py()?;
        Ok(Engine {
            tasker,
            runtime,
            pid: std::process::id(),
        })
    }

    /// This process's worker id (the actor recorded on transitions).
    #[getter]
    fn worker_id(&self) -> String {
        self.tasker.worker_id().to_string()
    }

    /// Registers every template in a YAML file or a directory of them; returns JSON: a list
    /// of `{namespace, name, version, callables}`.
    fn register_templates(&self, py: Python<'_>, path: PathBuf) -> PyResult<String> {
        let loaded = self.run(
            py,
            move |t| async move { t.register_templates(&path).await },
        )?;
        to_json(&loaded.iter().map(summary).collect::<Vec<_>>())
    }

    /// The templates registered in the database (every version); returns JSON: a list of
    /// `{namespace, name, version, callables}`.
    fn templates(&self, py: Python<'_>) -> PyResult<String> {
        let all = self.run(py, |t| async move { t.store().list_templates().await })?;
        to_json(&all.iter().map(summary).collect::<Vec<_>>())
    }

    /// Registers one template given as YAML text; returns its summary as JSON.
    fn register_template_yaml(&self, py: Python<'_>, yaml: &str) -> PyResult<String> {
        let env = self.tasker.config().environment.clone();
        let loaded = tasker_core::template::parse_str(yaml, None, &env)
            .map_err(|e| crate::error::to_py(e.into()))?;
        let template = loaded.template;
        let t = template.clone();
        self.run(py, move |tasker| async move {
            tasker.register_template(&t).await.map(|_| ())
        })?;
        to_json(&summary(&template))
    }

    /// Creates a task from a JSON `TaskRequest`; returns `(uuid, replayed)`.
    fn create_task(&self, py: Python<'_>, request: &str) -> PyResult<(String, bool)> {
        let request: TaskRequest = from_json(request, "task request")?;
        let handle = self.run(py, move |t| async move { t.create_task(request).await })?;
        Ok((handle.uuid, handle.replayed))
    }

    /// Creates the tasks of a JSON array of requests at once (they commit in groups); for
    /// each, in order, `(uuid, replayed)` or the exception that refused it (not raised).
    fn create_tasks(&self, py: Python<'_>, requests: &str) -> PyResult<Vec<Py<PyAny>>> {
        let requests: Vec<TaskRequest> = from_json(requests, "task requests")?;
        let results = self.run(
            py,
            move |t| async move { Ok(t.create_tasks(requests).await) },
        )?;
        results
            .into_iter()
            .map(|r| match r {
                Ok(h) => Ok((h.uuid, h.replayed).into_pyobject(py)?.into_any().unbind()),
                Err(e) => Ok(crate::error::to_py(e).into_value(py).into_any()),
            })
            .collect()
    }

    /// Waits until the task is terminal or `blocked_by_failures` (raises `TaskerTimeoutError`
    /// when `timeout` seconds pass first); returns the task as JSON.
    #[pyo3(signature = (uuid, timeout=None))]
    fn wait(&self, py: Python<'_>, uuid: String, timeout: Option<f64>) -> PyResult<String> {
        let timeout = seconds(timeout)?;
        let task = self.run(py, move |t| async move { t.wait(&uuid, timeout).await })?;
        to_json(&task)
    }

    /// The task with its steps, as JSON.
    fn get_task(&self, py: Python<'_>, uuid: String) -> PyResult<String> {
        let task = self.run(py, move |t| async move { t.get_task(&uuid).await })?;
        to_json(&task)
    }

    /// The task's transitions (task and steps), as JSON.
    fn transitions(&self, py: Python<'_>, uuid: String) -> PyResult<String> {
        let (task, steps) = self.run(py, move |t| async move {
            let task = t.task_transitions(&uuid).await?;
            let steps = t.step_transitions(&uuid, None).await?;
            Ok((task, steps))
        })?;
        to_json(&json!({"task": task, "steps": steps}))
    }

    /// An operator action (`cancel`, `give_up`, `resolve`, `reset_step`, `resolve_step`,
    /// `complete_step`); returns the task's new state.
    #[pyo3(signature = (uuid, action, reason, step=None, result=None, actor="operator"))]
    #[allow(clippy::too_many_arguments)]
    fn operator(
        &self,
        py: Python<'_>,
        uuid: String,
        action: &str,
        reason: String,
        step: Option<String>,
        result: Option<&str>,
        actor: &str,
    ) -> PyResult<String> {
        let need_step = || {
            step.clone()
                .ok_or_else(|| invalid_argument(format!("{action} needs a step name")))
        };
        let action = match action {
            "cancel" => OperatorAction::Cancel,
            "give_up" => OperatorAction::GiveUp,
            "resolve" => OperatorAction::ResolveManually,
            "reset_step" => OperatorAction::ResetStep { step: need_step()? },
            "resolve_step" => OperatorAction::ResolveStep { step: need_step()? },
            "complete_step" => OperatorAction::CompleteStep {
                step: need_step()?,
                result: from_json(result.unwrap_or("{}"), "step result")?,
            },
            other => {
                return Err(invalid_argument(format!(
                    "unknown operator action {other:?}"
                )));
            }
        };
        let actor = actor.to_string();
        let state = self.run(py, move |t| async move {
            t.operator(&uuid, action, &actor, &reason).await
        })?;
        Ok(state.as_str().to_string())
    }

    /// A dispatch-port worker serving `callables` of `namespaces`.
    fn worker(
        &self,
        namespaces: Vec<String>,
        callables: Vec<String>,
    ) -> PyResult<crate::worker::Worker> {
        self.check_process()?;
        Ok(crate::worker::Worker::new(self, namespaces, callables))
    }

    /// Stops claiming, lets held attempts finish for up to `deadline` seconds, hands the rest
    /// back and closes the engine; returns `(finished, handed_back)`.
    fn drain(&self, py: Python<'_>, deadline: f64) -> PyResult<(usize, usize)> {
        let deadline = seconds(Some(deadline))?.unwrap_or(Duration::MAX);
        let report = self.run(py, move |t| async move { t.drain(deadline).await })?;
        Ok((report.finished, report.handed_back))
    }

    /// Stops the engine's background work; later calls raise `ShutdownError`.
    fn close(&self) {
        if self.pid == std::process::id() {
            self.tasker.close();
        }
    }
}
