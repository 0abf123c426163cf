//! The one tokio runtime of the process, created on first use and rebuilt in a forked child.

use std::sync::Mutex;

use pyo3::PyResult;
use tokio::runtime::{Handle, Runtime};

/// The runtime and the process that built it.
static RUNTIME: Mutex<Option<(u32, &'static Runtime)>> = Mutex::new(None);

/// The runtime's handle for this process. After `fork()` the parent's runtime threads do not
/// exist in the child, so the child builds its own; the parent's is leaked there on purpose
/// (dropping it would wait for threads that will never answer).
pub(crate) fn handle() -> PyResult<Handle> {
    let pid = std::process::id();
    let mut slot = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((owner, rt)) = *slot
        && owner == pid
    {
        return Ok(rt.handle().clone());
    }
    let threads = std::env::var("TASKER_RUNTIME_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("tasker-runtime")
        .enable_all()
        .build()
        .map_err(|e| {
            crate::error::raise(
                "InternalError",
                "internal_error",
                &format!("cannot start the engine runtime: {e}"),
                None,
            )
        })?;
    let rt: &'static Runtime = Box::leak(Box::new(rt));
    *slot = Some((pid, rt));
    Ok(rt.handle().clone())
}
