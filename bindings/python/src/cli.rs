//! The `tasker-ctl` command tree of the core, run from Python (`python -m tasker_core run ...`)
//! so that the one-shot run, its live progress, tables, JSON and exit codes are the core's own,
//! with the steps served by Python handlers.

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::convert::to_json;
use crate::engine::Engine;

/// Runs the command line `args` (program name first) and returns its exit code. The command
/// runs on this process's engine runtime with the GIL released; when it opens an engine that
/// runs handlers (`run`, `serve`), `on_engine(engine)` is called with that engine's handle so
/// Python can start its worker threads on it. `on_engine` runs inside the runtime: it may open
/// dispatch-port workers (`Engine.worker`) and start threads, but any other engine call would
/// block the runtime and raises instead. An exception it raises is printed and the command
/// goes on (its steps then wait for a worker that serves them).
#[pyfunction]
pub(crate) fn run_cli(py: Python<'_>, args: Vec<String>, on_engine: Py<PyAny>) -> PyResult<i32> {
    let runtime = crate::runtime::handle()?;
    let rt = runtime.clone();
    let args = args.into_iter().map(Into::into).collect();
    let code = py.detach(move || {
        tasker_core::cli::run_cli_on(args, &runtime, move |tasker| {
            let engine = Engine::from_tasker(tasker.clone(), rt.clone());
            Python::attach(|py| {
                if let Err(e) = on_engine.call1(py, (engine,)) {
                    e.print(py);
                }
            });
        })
    });
    Ok(code)
}

/// Loads a template file as `tasker-ctl run` does (either dialect, `TASKER_ENV` overrides);
/// returns its summary as JSON (`{namespace, name, version, callables}`). Raises
/// `TemplateError` naming every problem.
#[pyfunction]
pub(crate) fn load_template(path: PathBuf) -> PyResult<String> {
    let config = tasker_core::Config::from_env().map_err(crate::error::to_py)?;
    let loaded = tasker_core::template::load_file(&path, &config.environment).map_err(|e| {
        crate::error::raise(
            "TemplateError",
            "template",
            &format!("cannot load the template {}: {e}", path.display()),
            None,
        )
    })?;
    to_json(&crate::engine::summary(&loaded.template))
}
