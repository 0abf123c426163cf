//! Task templates: loading both YAML dialects, validating the step DAG, JSON Schemas.
//!
//! The entry points are [`parse_str`] and [`load_file`]; both map the YAML by hand (not through
//! `#[derive(Deserialize)]`) so that the current and the older dialect land in the same
//! [`TaskTemplate`], unknown keys become warnings instead of failures, and every problem in a
//! file is reported at once, each naming the file, the step and the field.
//!
//! ```
//! let yaml = "
//! name: greet
//! namespace_name: demo
//! version: 1.0.0
//! steps:
//!   - name: hello
//!     handler: { callable: HelloHandler }
//!   - name: goodbye
//!     handler: { callable: GoodbyeHandler }
//!     dependencies: [hello]
//! ";
//! let loaded = tasker_core::template::parse_str(yaml, None, "test").expect("valid template");
//! assert_eq!(loaded.template.key(), "demo/greet/1.0.0");
//! assert_eq!(loaded.template.topological_order(), ["hello", "goodbye"]);
//! ```

mod emit;
mod environments;
mod graph;
pub mod model;
mod parse;
mod schema;
mod validate;
mod yaml;

use std::fmt;
use std::path::{Path, PathBuf};

pub use emit::to_yaml;
pub use model::*;
pub use schema::{CompiledSchema, SchemaViolation};
pub use validate::validate;

/// Longest namespace name accepted (it becomes part of queue names).
pub const MAX_NAMESPACE_LEN: usize = 29;

/// One problem found in a template, located by file, step and field.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateError {
    /// The file the template came from, when it came from one.
    pub file: Option<String>,
    /// The step concerned (its name, or `steps[i]` when the step has no usable name).
    pub step: Option<String>,
    /// Dotted path of the field inside the step (or the template); empty for file-level errors.
    pub field: String,
    /// What is wrong, in words.
    pub message: String,
}

impl TemplateError {
    pub(crate) fn new(
        file: Option<&str>,
        step: Option<&str>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        TemplateError {
            file: file.map(str::to_string),
            step: step.map(str::to_string),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}: ")?;
        }
        if let Some(step) = &self.step {
            write!(f, "step `{step}`: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "field `{}`: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for TemplateError {}

/// Every problem found in one template (never empty when returned as an error).
#[derive(Debug, Clone)]
pub struct TemplateErrors(pub Vec<TemplateError>);

impl fmt::Display for TemplateErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TemplateErrors {}

impl From<TemplateError> for TemplateErrors {
    fn from(error: TemplateError) -> Self {
        TemplateErrors(vec![error])
    }
}

/// A template that loaded, with the warnings produced on the way (unknown keys, odd values).
#[derive(Debug, Clone)]
pub struct LoadedTemplate {
    /// The validated template, environment overrides applied.
    pub template: TaskTemplate,
    /// Human-readable warnings, each located like a [`TemplateError`].
    pub warnings: Vec<String>,
}

/// Parses and validates one template from YAML text.
///
/// `file` only labels errors and warnings. `env` selects which `environments.<env>` block is
/// applied (normally the configured `TASKER_ENV`). Either dialect of SPEC §2 is accepted.
/// `version` may be written as a YAML number (`version: 1.0`); it is then stringified
/// (`"1.0"`) with a warning, because a float cannot keep spellings such as `1.10`.
///
/// # Errors
/// All problems found — YAML syntax (with line and column), wrong types, missing fields, bad
/// enum values and the semantic rules of [`validate`] — in one [`TemplateErrors`].
pub fn parse_str(
    yaml: &str,
    file: Option<&str>,
    env: &str,
) -> Result<LoadedTemplate, TemplateErrors> {
    let parsed = parse::parse_template(yaml, file, env)?;
    let mut errors = parsed.errors;
    let mut warnings = parsed.warnings;
    match validate::validate(&parsed.template, file) {
        Ok(more) => warnings.extend(more),
        Err(semantic) => {
            // A field that already failed to parse would otherwise be reported twice, the
            // second time about the placeholder that stands in for it.
            for error in semantic.0 {
                let duplicate = errors.iter().any(|e| {
                    e.step == error.step
                        && (e.field == error.field
                            || error.field.starts_with(&format!("{}.", e.field)))
                });
                if !duplicate {
                    errors.push(error);
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(LoadedTemplate {
            template: parsed.template,
            warnings,
        })
    } else {
        Err(TemplateErrors(errors))
    }
}

/// Reads, parses and validates one template file (see [`parse_str`]).
///
/// # Errors
/// A missing or unreadable file gives one error naming the file; otherwise as [`parse_str`].
pub fn load_file(path: &Path, env: &str) -> Result<LoadedTemplate, TemplateErrors> {
    let label = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        TemplateError::new(Some(&label), None, "", format!("cannot read the file: {e}"))
    })?;
    parse_str(&text, Some(&label), env)
}

/// The template files a path designates: a file is itself (whatever its extension); a
/// directory is every `*.yaml` / `*.yml` file below it, recursively, sorted by path.
///
/// # Errors
/// Any I/O error met while reading the path or a directory below it.
pub fn collect_yaml_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !std::fs::metadata(path)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut pending = vec![path.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry_path = entry?.path();
            if std::fs::metadata(&entry_path)?.is_dir() {
                pending.push(entry_path);
            } else if has_yaml_extension(&entry_path) {
                files.push(entry_path);
            }
        }
    }
    files.sort();
    Ok(files)
}

fn has_yaml_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

/// Whether `ns` is a usable namespace: 1 to 29 characters of `[A-Za-z0-9_]`.
pub fn namespace_is_valid(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= MAX_NAMESPACE_LEN
        && ns.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests;
