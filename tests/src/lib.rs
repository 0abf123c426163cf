//! Conformance scenarios: the Rust handler kit and the scenario runner (being written).

/// The Rust handler kit (SPEC §13).
pub mod kit {
    use tasker_core::Tasker;

    /// Registers every `kit.*` handler.
    pub fn register_handlers(_tasker: &Tasker) {}
}
