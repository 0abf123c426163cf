//! The e-commerce order-processing example (being written).
use tasker_core::Tasker;

/// Registers the example's Rust handlers under the callables its template names.
pub fn register_handlers(_tasker: &Tasker) {}

/// The folder holding the example's task templates.
pub fn templates_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("templates")
}
