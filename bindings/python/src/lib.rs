//! `tasker_core._native`: the engine handle and the dispatch port of `tasker-core`, for the
//! `tasker-py` package. Everything Python-facing (handler classes, the worker thread pool,
//! exceptions) lives in the pure-Python package; this module only crosses the boundary.
//!
//! Data crosses as JSON strings, parsed by Python's `json` on the other side (see
//! `convert.rs`); core errors become the exceptions of `tasker_core.errors` (see `error.rs`).

mod cli;
mod convert;
mod engine;
mod error;
mod handler_api;
mod runtime;
mod testing;
mod worker;

use pyo3::prelude::*;

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<engine::Engine>()?;
    m.add_class::<worker::Worker>()?;
    m.add_class::<worker::Job>()?;
    handler_api::register(m)?;
    testing::register(m)?;
    m.add_function(wrap_pyfunction!(cli::run_cli, m)?)?;
    m.add_function(wrap_pyfunction!(cli::load_template, m)?)?;
    Ok(())
}
