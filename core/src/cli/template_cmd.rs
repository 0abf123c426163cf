//! `tasker-ctl template ...`: validate, convert, register and list task templates (SPEC §2).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;

use super::table::Table;
use super::{
    CliError, CliResult, DbArgs, EXIT_FAILED, EXIT_OK, Format, config, open_operator, print_json,
};
use crate::template::{TemplateError, collect_yaml_files, load_file, to_yaml};
use crate::{OpenOptions, Tasker};

/// `tasker-ctl template ...`
#[derive(Debug, Subcommand)]
pub(crate) enum TemplateCommand {
    /// Check template files (or directories of them): every error with its file, step and
    /// field, and every warning. Exits 1 when any file has an error.
    Validate(ValidateArgs),
    /// Print a template in the current dialect (converts the older dialect).
    Convert(ConvertArgs),
    /// Register template files (or directories) in a database.
    Register(RegisterArgs),
    /// List the templates registered in a database.
    List(ListArgs),
    /// Draw a template's step DAG: Mermaid (default) or DOT text, or SVG/PNG via Graphviz.
    Visualize(super::diagram::TemplateVisualizeArgs),
}

/// `template validate`
#[derive(Debug, Args)]
pub(crate) struct ValidateArgs {
    /// Template files or directories (searched recursively for *.yaml / *.yml).
    #[arg(required = true, value_name = "FILE")]
    paths: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// `template convert`
#[derive(Debug, Args)]
pub(crate) struct ConvertArgs {
    /// The template file.
    #[arg(value_name = "FILE")]
    path: PathBuf,
}

/// `template register`
#[derive(Debug, Args)]
pub(crate) struct RegisterArgs {
    /// Template files or directories.
    #[arg(required = true, value_name = "FILE")]
    paths: Vec<PathBuf>,
    /// Replace registered templates whose content differs under the same version.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    db: DbArgs,
}

/// `template list`
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    db: DbArgs,
}

/// Runs one `template` subcommand.
pub(crate) async fn dispatch(cmd: TemplateCommand) -> CliResult {
    match cmd {
        TemplateCommand::Validate(a) => validate(a),
        TemplateCommand::Convert(a) => convert(a),
        TemplateCommand::Register(a) => register(a).await,
        TemplateCommand::List(a) => list(a).await,
        TemplateCommand::Visualize(a) => super::diagram::template(a),
    }
}

/// The outcome of checking one file.
struct Checked {
    file: String,
    errors: Vec<TemplateError>,
    warnings: Vec<String>,
    key: Option<String>,
}

/// Expands the paths to files; a path that cannot be read becomes an error of its own so that
/// one bad path does not hide the verdict on the others.
fn check_paths(paths: &[PathBuf], env: &str) -> Vec<Checked> {
    let mut out = Vec::new();
    for path in paths {
        let files = match collect_yaml_files(path) {
            Ok(files) if files.is_empty() => {
                out.push(unreadable(
                    path,
                    "no *.yaml or *.yml file in this directory".into(),
                ));
                continue;
            }
            Ok(files) => files,
            Err(e) => {
                out.push(unreadable(path, format!("cannot read: {e}")));
                continue;
            }
        };
        for f in files {
            let file = f.display().to_string();
            out.push(match load_file(&f, env) {
                Ok(l) => Checked {
                    file,
                    errors: Vec::new(),
                    warnings: l.warnings,
                    key: Some(l.template.key()),
                },
                Err(e) => Checked {
                    file,
                    errors: e.0,
                    warnings: Vec::new(),
                    key: None,
                },
            });
        }
    }
    out
}

fn unreadable(path: &std::path::Path, message: String) -> Checked {
    let file = path.display().to_string();
    let error = TemplateError {
        file: Some(file.clone()),
        step: None,
        field: String::new(),
        message,
    };
    Checked {
        file,
        errors: vec![error],
        warnings: Vec::new(),
        key: None,
    }
}

fn validate(a: ValidateArgs) -> CliResult {
    let config = config()?;
    let checked = check_paths(&a.paths, &config.environment);
    let failed = checked.iter().filter(|c| !c.errors.is_empty()).count();
    if a.format == Format::Json {
        let files: Vec<_> = checked
            .iter()
            .map(|c| {
                let errors: Vec<_> = c
                    .errors
                    .iter()
                    .map(|e| json!({"file": e.file, "step": e.step, "field": e.field, "message": e.message}))
                    .collect();
                json!({"file": c.file, "valid": c.errors.is_empty(), "template": c.key,
                       "errors": errors, "warnings": c.warnings})
            })
            .collect();
        print_json(&json!({"valid": failed == 0, "files": files}))?;
    } else {
        for c in &checked {
            if c.errors.is_empty() {
                outln!("ok     {} ({})", c.file, c.key.as_deref().unwrap_or("?"));
            } else {
                let n = c.errors.len();
                outln!(
                    "error  {} ({n} error{})",
                    c.file,
                    if n == 1 { "" } else { "s" }
                );
            }
            for e in &c.errors {
                // The Display form names file, step and field; the file is already the heading.
                let step = e
                    .step
                    .as_deref()
                    .map(|s| format!("step `{s}`: "))
                    .unwrap_or_default();
                let field = if e.field.is_empty() {
                    String::new()
                } else {
                    format!("field `{}`: ", e.field)
                };
                outln!(
                    "  error: {}: {step}{field}{}",
                    e.file.as_deref().unwrap_or(&c.file),
                    e.message
                );
            }
            for w in &c.warnings {
                outln!("  warning: {w}");
            }
        }
        let warnings: usize = checked.iter().map(|c| c.warnings.len()).sum();
        let errors: usize = checked.iter().map(|c| c.errors.len()).sum();
        outln!(
            "{} file(s) checked: {} valid, {failed} invalid; {errors} error(s), {warnings} warning(s)",
            checked.len(),
            checked.len() - failed
        );
    }
    Ok(if failed == 0 { EXIT_OK } else { EXIT_FAILED })
}

fn convert(a: ConvertArgs) -> CliResult {
    let config = config()?;
    let loaded = load_file(&a.path, &config.environment).map_err(|e| {
        let mut msg = format!("cannot convert {}:", a.path.display());
        for x in &e.0 {
            msg.push_str(&format!("\n  {x}"));
        }
        CliError::usage(msg)
    })?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    out!("{}", to_yaml(&loaded.template));
    Ok(EXIT_OK)
}

async fn register(a: RegisterArgs) -> CliResult {
    a.db.target.reject_url()?;
    let config = config()?;
    let checked = check_paths(&a.paths, &config.environment);
    let errors: Vec<String> = checked
        .iter()
        .flat_map(|c| c.errors.iter().map(|e| format!("  {e}")))
        .collect();
    if !errors.is_empty() {
        return Err(CliError::usage(format!(
            "nothing registered; invalid templates:\n{}",
            errors.join("\n")
        )));
    }
    let env = config.environment.clone();
    // Registering may create the database: it is the first step of `task create`.
    let options = OpenOptions {
        config,
        background: false,
        ..OpenOptions::default()
    };
    let tasker = Tasker::open_with(&a.db.target.db, options)
        .await
        .map_err(|e| super::open_failed(&a.db.target.db, e))?;
    let mut rows = Vec::new();
    for c in &checked {
        let loaded = load_file(std::path::Path::new(&c.file), &env)
            .map_err(|e| CliError::usage(e.to_string()))?;
        let put = tasker
            .store()
            .put_template(&loaded.template, a.force, tasker.now())
            .await?;
        rows.push((
            c.file.clone(),
            loaded.template.key(),
            format!("{put:?}").to_lowercase(),
        ));
    }
    if a.db.format == Format::Json {
        let v: Vec<_> = rows
            .iter()
            .map(|(f, k, p)| json!({"file": f, "template": k, "outcome": p}))
            .collect();
        print_json(&v)?;
    } else {
        let mut t = Table::new(&["template", "outcome", "file"]);
        for (f, k, p) in rows {
            t.row(vec![k, p, f]);
        }
        t.print();
    }
    Ok(EXIT_OK)
}

async fn list(a: ListArgs) -> CliResult {
    let tasker = open_operator(&a.db.target).await?;
    let mut templates = tasker.store().list_templates().await?;
    templates.sort_by_key(|x| x.key());
    if a.db.format == Format::Json {
        let v: Vec<_> = templates
            .iter()
            .map(|t| {
                json!({"namespace": t.namespace, "name": t.name, "version": t.version,
                       "description": t.description, "steps": t.steps.iter().map(|s| &s.name).collect::<Vec<_>>()})
            })
            .collect();
        print_json(&v)?;
        return Ok(EXIT_OK);
    }
    if templates.is_empty() {
        eprintln!("no templates registered");
        return Ok(EXIT_OK);
    }
    let mut t = Table::new(&["namespace", "name", "version", "steps", "description"]);
    for x in &templates {
        t.row(vec![
            x.namespace.clone(),
            x.name.clone(),
            x.version.clone(),
            x.steps.len().to_string(),
            super::table::truncate(x.description.as_deref().unwrap_or(""), 60),
        ]);
    }
    t.print();
    Ok(EXIT_OK)
}
