//! Helpers shared by the `tasker-ctl` end-to-end tests: the real binary, run in a directory.

#![allow(dead_code)] // Each test file uses its own subset.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_tasker-ctl");

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `tasker-ctl ARGS` in `dir`, without log or colour settings from the environment.
pub fn command(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .current_dir(dir)
        .env_remove("TASKER_LOG")
        .env("NO_COLOR", "1");
    c
}

/// Runs `tasker-ctl ARGS` in `dir` to completion.
pub fn ctl(dir: &Path, args: &[&str]) -> Output {
    command(dir, args).output().expect("tasker-ctl runs")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Exit code, stdout and stderr, for assertion messages.
pub fn describe(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    )
}

/// The command exited with `code` and did not panic.
pub fn assert_code(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "{}", describe(o));
    assert!(!text(&o.stderr).contains("panicked"), "{}", describe(o));
}

/// The command's stdout as JSON.
pub fn json_out(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", describe(o)))
}

/// `@PATH` of a file of the e-commerce example (a `--context`/`--input` argument).
pub fn example_file(file: &str) -> String {
    format!(
        "@{}",
        workspace().join("examples/ecommerce").join(file).display()
    )
}
