//! Conformance scenarios (SPEC §13): the language-neutral file format and the Rust runner.
//!
//! A scenario file describes one task: its template (inline or a path), its context, operator
//! actions applied while it runs, and what must be true at the end. `tests/README.md` is the
//! format's contract for every language's runner; [`format`] mirrors it in Rust types and
//! [`run`] executes a scenario on an in-memory engine.

pub mod compare;
pub mod format;
pub mod run;

pub use format::{
    Action, ActionKind, CreateError, CreateOptions, DlqExpect, Expect, Scenario, SecondCreate,
    SecondCreateExpect, StepExpect, TemplateRef, When,
};
pub use run::{Backend, Outcome, Runner};

use std::path::{Path, PathBuf};

/// Every `*.yaml` / `*.yml` scenario file directly inside `dir`, sorted by file name.
///
/// # Errors
/// When `dir` cannot be read.
pub fn scenario_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

/// The directory holding this crate (`tests/`): scenario template paths are relative to it.
pub fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The scenario directory (`tests/scenarios`).
pub fn scenarios_dir() -> PathBuf {
    tests_dir().join("scenarios")
}
