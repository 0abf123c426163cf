//! The `tasker-ctl` command tree (being written).

/// Runs `tasker-ctl` with `args`, registering handlers through `register`; returns the exit code.
pub fn run_cli(
    _args: Vec<std::ffi::OsString>,
    _register: impl Fn(&crate::Tasker) + Send + Sync + 'static,
) -> i32 {
    2
}
