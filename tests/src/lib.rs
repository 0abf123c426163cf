//! Cross-language conformance (SPEC §13): the Rust handler kit and the Rust runner of the
//! language-neutral scenario files in `tests/scenarios/`. `tests/README.md` describes the
//! scenario format and the kit for the runners and kits of the other languages.

pub mod kit;
pub mod scenario;
