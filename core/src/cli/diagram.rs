//! `template visualize` and `task visualize`: a workflow picture as Mermaid or Graphviz DOT
//! text, or as SVG/PNG rendered by Graphviz's `dot` program (SPEC §11). The pictures themselves
//! are drawn by [`crate::visualize`]; this module only picks the format and writes the result.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use clap::{Args, ValueEnum};

use super::{CliError, CliResult, DbTarget, EXIT_FAILED, EXIT_OK, config, open_operator};
use crate::template::load_file;
use crate::visualize::{Diagram, task_diagram, template_diagram};

/// What `visualize` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DiagramFormat {
    /// Mermaid flowchart text (renders in GitHub, GitLab and most Markdown viewers).
    Mermaid,
    /// Graphviz DOT text.
    Dot,
    /// SVG, rendered by Graphviz (`dot`).
    Svg,
    /// PNG, rendered by Graphviz (`dot`); needs --output.
    Png,
}

impl DiagramFormat {
    /// Graphviz's name for a rendered format (`dot -T...`).
    fn graphviz_name(self) -> Option<&'static str> {
        match self {
            DiagramFormat::Svg => Some("svg"),
            DiagramFormat::Png => Some("png"),
            DiagramFormat::Mermaid | DiagramFormat::Dot => None,
        }
    }
}

/// Options of both `visualize` commands.
#[derive(Debug, Args)]
pub(crate) struct DiagramArgs {
    /// Picture format.
    #[arg(long, value_enum, default_value_t = DiagramFormat::Mermaid)]
    format: DiagramFormat,
    /// Write the picture to this file instead of stdout (required for png).
    #[arg(long, short, value_name = "PATH")]
    output: Option<PathBuf>,
}

/// `template visualize`
#[derive(Debug, Args)]
pub(crate) struct TemplateVisualizeArgs {
    /// The template file.
    #[arg(value_name = "FILE")]
    path: PathBuf,
    #[command(flatten)]
    diagram: DiagramArgs,
}

/// `task visualize`
#[derive(Debug, Args)]
pub(crate) struct TaskVisualizeArgs {
    /// The task's uuid.
    uuid: String,
    #[command(flatten)]
    db: DbTarget,
    #[command(flatten)]
    diagram: DiagramArgs,
}

/// Draws a template's step DAG. An invalid template fails as `template validate` does: every
/// error with its file, step and field, exit code 1.
pub(crate) fn template(a: TemplateVisualizeArgs) -> CliResult {
    a.diagram.check()?;
    let config = config()?;
    let loaded = load_file(&a.path, &config.environment).map_err(|e| {
        let n = e.0.len();
        let mut message = format!(
            "{} is not a valid template ({n} error{}):",
            a.path.display(),
            if n == 1 { "" } else { "s" }
        );
        for error in &e.0 {
            message.push_str(&format!("\n  error: {error}"));
        }
        CliError {
            code: EXIT_FAILED,
            message,
        }
    })?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    a.diagram.write(&template_diagram(&loaded.template))
}

/// Draws the steps a task has, coloured by state.
pub(crate) async fn task(a: TaskVisualizeArgs) -> CliResult {
    a.diagram.check()?;
    let tasker = open_operator(&a.db).await?;
    let task = tasker.get_task(&a.uuid).await?;
    a.diagram.write(&task_diagram(&task, tasker.now()))
}

impl DiagramArgs {
    /// Refuses what cannot work before any work is done.
    fn check(&self) -> CliResult<()> {
        if self.format == DiagramFormat::Png && self.output.is_none() {
            return Err(CliError::usage(
                "--format png writes a binary picture: name the file with --output PATH",
            ));
        }
        Ok(())
    }

    fn write(&self, diagram: &Diagram) -> CliResult {
        let bytes = match self.format.graphviz_name() {
            None if self.format == DiagramFormat::Dot => diagram.to_dot().into_bytes(),
            None => diagram.to_mermaid().into_bytes(),
            Some(format) => graphviz(&diagram.to_dot(), format)?,
        };
        match &self.output {
            Some(path) => {
                std::fs::write(path, &bytes).map_err(|e| {
                    CliError::usage(format!("cannot write {}: {e}", path.display()))
                })?;
                eprintln!("wrote {}", path.display());
            }
            // Mermaid, DOT and SVG are text; PNG always has an --output.
            None => out!("{}", String::from_utf8_lossy(&bytes)),
        }
        Ok(EXIT_OK)
    }
}

/// Renders DOT text with Graphviz: `dot -T<format>`, the text on its stdin, the picture from its
/// stdout. A missing `dot` says which package to install.
fn graphviz(dot: &str, format: &str) -> CliResult<Vec<u8>> {
    let mut child = Command::new("dot")
        .arg(format!("-T{format}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                CliError::failed(format!(
                    "--format {format} needs Graphviz, whose `dot` program was not found on \
                     PATH; install the Debian package `graphviz` (apt-get install graphviz), or \
                     use --format mermaid or --format dot for text"
                ))
            } else {
                CliError::failed(format!("cannot start Graphviz's `dot`: {e}"))
            }
        })?;
    let Some(mut stdin) = child.stdin.take() else {
        return Err(CliError::failed("cannot write to Graphviz's `dot`"));
    };
    // Fed from a second thread: on a large graph `dot` may fill its stdout pipe before it has
    // read all of its input, and both sides would wait on each other.
    let (written, output) = std::thread::scope(|s| {
        let feeder = s.spawn(move || stdin.write_all(dot.as_bytes()));
        let output = child.wait_with_output();
        (feeder.join(), output)
    });
    let output =
        output.map_err(|e| CliError::failed(format!("Graphviz's `dot` did not finish: {e}")))?;
    if !output.status.success() {
        return Err(CliError::failed(format!(
            "Graphviz's `dot -T{format}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    match written {
        Ok(Ok(())) => Ok(output.stdout),
        Ok(Err(e)) => Err(CliError::failed(format!(
            "cannot write to Graphviz's `dot`: {e}"
        ))),
        Err(_) => Err(CliError::failed("cannot write to Graphviz's `dot`")),
    }
}
