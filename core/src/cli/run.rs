//! `tasker-ctl run`: the embedded one-shot. Loads a template file, runs one task of it in this
//! process with live progress, prints the outcome and exits 0 only when the task is complete.
//!
//! Running the same command again after a crash attaches to the task the first run created:
//! the template's strict identity (template + canonical context) makes `create_task` return
//! the existing task (`replayed`), its dead attempt's lease expires and the sweeper retries it.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::table::{self, Color, Table, human_duration, paint, step_color, task_color};
use super::{
    CliError, CliResult, DEFAULT_DB, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, Format, config,
    json_object_arg, open_failed, print_json,
};
use crate::state::{StepState, TaskState};
use crate::task::{StepView, Task, TaskRequest};
use crate::template::{TemplateErrors, load_file};
use crate::{ErrorKind, OpenOptions, Tasker};

/// Arguments of `tasker-ctl run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The task template file (YAML, either dialect).
    #[arg(value_name = "TEMPLATE")]
    template: PathBuf,
    /// The task context: inline JSON, `@FILE` or `@-` (stdin); must be a JSON object.
    #[arg(
        long,
        visible_alias = "input",
        value_name = "JSON|@FILE",
        default_value = "{}"
    )]
    context: String,
    /// Database: `sqlite:PATH`, `sqlite::memory:` or a plain file path (created if missing).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_DB)]
    db: String,
    /// Output format: tables for people, or one JSON document (the task) for scripts.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Give up waiting after this many seconds (the task itself keeps its state; running the
    /// same command again attaches to it).
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    timeout: Option<f64>,
    /// Replace a registered template with the same namespace/name/version but different
    /// content (tasks already running keep the content they started with).
    #[arg(long)]
    force: bool,
    /// Task identity chosen by the caller: running again with the same key attaches to the
    /// same task whatever the context (default: the template's identity strategy, normally
    /// template + context).
    #[arg(long, value_name = "KEY", conflicts_with = "new")]
    idempotency_key: Option<String>,
    /// Always start a new task, even when one with the same template and context exists.
    #[arg(long)]
    new: bool,
    /// No live progress on stderr.
    #[arg(long, short)]
    quiet: bool,
}

/// Runs the command; returns the exit code.
pub(crate) async fn run(args: RunArgs, register: &(dyn Fn(&Tasker) + Send + Sync)) -> CliResult {
    let config = config()?;
    // Every input is checked before the database is opened: a typo must not leave an empty
    // database file behind, and must exit 2 with the problem named.
    let context = json_object_arg(&args.context, "--context")?;
    let timeout = match args.timeout {
        Some(s) if !(s.is_finite() && s > 0.0) => {
            return Err(CliError::usage(format!(
                "--timeout {s}: expected a positive number of seconds"
            )));
        }
        Some(s) => Some(Duration::try_from_secs_f64(s).map_err(|_| {
            CliError::usage(format!("--timeout {s}: too large a number of seconds"))
        })?),
        None => None,
    };
    let loaded = load_file(&args.template, &config.environment)
        .map_err(|e| invalid_template(&args.template, e))?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let template = loaded.template;

    let tasker = Tasker::open_with(
        &args.db,
        OpenOptions {
            config,
            ..OpenOptions::default()
        },
    )
    .await
    .map_err(|e| open_failed(&args.db, e))?;
    if args.force {
        tasker
            .store()
            .put_template(&template, true, tasker.now())
            .await?;
    } else {
        tasker.register_template(&template).await.map_err(|e| {
            let mut e = CliError::from(e);
            if e.message.contains("different content") {
                e.message
                    .push_str("\nhint: pass --force to replace it, or bump `version`");
            }
            e
        })?;
    }
    // Handlers first: the in-process worker must know them before the task's steps appear.
    register(&tasker);

    let mut request = TaskRequest::new(&template.namespace, &template.name, context)
        .version(&template.version)
        .origin(
            "tasker-ctl",
            "cli",
            format!("tasker-ctl run {}", args.template.display()),
        );
    // `--new` needs an identity no other task has: a fresh key does it under every strategy.
    request.idempotency_key = match (args.idempotency_key, args.new) {
        (Some(key), _) => Some(key),
        (None, true) => Some(format!(
            "tasker-ctl-run-{}",
            crate::orchestrator::new_uuid()
        )),
        (None, false) => None,
    };
    let handle = tasker.create_task(request).await?;
    if handle.replayed {
        let status = tasker
            .get_task(&handle.uuid)
            .await
            .map(|t| t.status.to_string());
        eprintln!(
            "attached to existing task {} ({}; pass --new for a new task)",
            handle.uuid,
            status.unwrap_or_else(|_| "state unknown".into())
        );
    } else if !args.quiet {
        eprintln!("created task {} ({})", handle.uuid, template.key());
    }

    let mut progress = Progress::new(if args.quiet {
        Mode::Off
    } else if args.format == Format::Table && table::stderr_is_tty() {
        Mode::Live {
            colors: table::stderr_colors(),
        }
    } else {
        Mode::Lines
    });
    let wait = handle.wait(timeout);
    let mut wait = std::pin::pin!(wait);
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let mut tick = tokio::time::interval(progress.interval());
    let waited = loop {
        tokio::select! {
            r = &mut wait => break Some(r),
            _ = &mut ctrl_c => break None,
            _ = tick.tick() => progress.update(&tasker, &handle.uuid).await,
        }
    };
    progress.update(&tasker, &handle.uuid).await;
    progress.finish();

    let task = match waited {
        None => {
            eprintln!(
                "interrupted: task {} keeps its state in {}; run the same command again to attach to it",
                handle.uuid, args.db
            );
            return Ok(EXIT_INTERRUPTED);
        }
        Some(Ok(task)) => task,
        Some(Err(e)) if e.kind == ErrorKind::Timeout => {
            let mut task = tasker.get_task(&handle.uuid).await?;
            task.replayed = handle.replayed;
            report(&task, args.format)?;
            eprintln!(
                "timed out: task {} is still {} after {:?}; run the same command again to keep waiting",
                task.uuid,
                task.status,
                timeout.unwrap_or_default()
            );
            return Ok(EXIT_FAILED);
        }
        Some(Err(e)) => return Err(e.into()),
    };
    report(&task, args.format)?;
    if task.status == TaskState::BlockedByFailures && args.format == Format::Table {
        eprintln!(
            "the task needs an operator: `tasker-ctl task reset-step|resolve-step|complete-step {} STEP --db {}`, \
             or `task give-up` / `task resolve`",
            task.uuid, args.db
        );
    }
    Ok(if task.status == TaskState::Complete {
        EXIT_OK
    } else {
        EXIT_FAILED
    })
}

/// Every template problem, one per line, each naming file, step and field.
fn invalid_template(path: &std::path::Path, errors: TemplateErrors) -> CliError {
    let n = errors.0.len();
    let mut msg = format!(
        "cannot load the template {} ({n} error{}):",
        path.display(),
        if n == 1 { "" } else { "s" }
    );
    for e in &errors.0 {
        msg.push_str(&format!("\n  {e}"));
    }
    CliError::usage(msg)
}

/// Prints the outcome: the task as JSON, or a summary table and each step's result or error.
fn report(task: &Task, format: Format) -> CliResult<()> {
    if format == Format::Json {
        return print_json(task);
    }
    let colors = table::stdout_colors();
    let took = task
        .completed_at
        .map(|c| format!(" in {}", human_duration(c - task.created_at)));
    outln!(
        "task {}  {}/{} {}",
        task.uuid,
        task.namespace,
        task.name,
        task.version
    );
    outln!(
        "status: {}{}{}",
        paint(task.status.as_str(), task_color(task.status), colors),
        took.unwrap_or_default(),
        if task.replayed {
            " (attached to an existing task)"
        } else {
            ""
        }
    );
    outln!();
    summary_table(&task.steps).print();
    outln!();
    outln!("results:");
    for s in &task.steps {
        outln!("  {}", step_outcome(s, colors));
    }
    Ok(())
}

/// step, state, attempts, duration of the latest attempt.
pub(crate) fn summary_table(steps: &[StepView]) -> Table {
    let mut t = Table::new(&["step", "state", "attempts", "duration"]);
    for s in steps {
        let duration = match (s.started_at, s.completed_at) {
            (Some(a), Some(b)) => human_duration(b - a),
            _ => "-".into(),
        };
        t.row_colored(vec![
            (s.name.clone(), None),
            (s.state.as_str().to_string(), step_color(s.state)),
            (format!("{}/{}", s.attempts, s.max_attempts), None),
            (duration, None),
        ]);
    }
    t
}

/// One step's result or error for people.
pub(crate) fn step_outcome(s: &StepView, colors: bool) -> String {
    if let Some(e) = s.error.as_ref().filter(|_| s.state != StepState::Complete) {
        let code = e
            .error_code
            .as_deref()
            .map(|c| format!(" [{c}]"))
            .unwrap_or_default();
        let retry = if e.retryable {
            "retryable"
        } else {
            "not retryable"
        };
        let label = paint("error", Some(Color::Red), colors);
        return format!(
            "{}: {label} {}{code}: {} ({retry})",
            s.name, e.error_type, e.message
        );
    }
    match &s.result {
        Some(r) => format!("{}: {}", s.name, table::truncate(&r.to_string(), 300)),
        None => format!("{}: ({}, no result)", s.name, s.state),
    }
}

/// How progress is shown while the task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A step table on stderr, redrawn in place (stderr is a terminal).
    Live { colors: bool },
    /// One line per state change (logs, pipes, CI).
    Lines,
    /// Nothing.
    Off,
}

/// The live progress view.
struct Progress {
    mode: Mode,
    /// Lines of the live table currently on screen (to move the cursor back over them).
    drawn: usize,
    /// Step transitions already printed in line mode (the store returns them in commit order).
    printed: usize,
    /// The last task state printed in line mode.
    last_status: Option<TaskState>,
}

impl Progress {
    fn new(mode: Mode) -> Self {
        Progress {
            mode,
            drawn: 0,
            printed: 0,
            last_status: None,
        }
    }

    fn interval(&self) -> Duration {
        match self.mode {
            Mode::Live { .. } => Duration::from_millis(100),
            Mode::Lines | Mode::Off => Duration::from_millis(200),
        }
    }

    /// Reads the task and shows what changed. Read errors are ignored: progress is cosmetic,
    /// and the wait reports real trouble.
    async fn update(&mut self, tasker: &Tasker, uuid: &str) {
        match self.mode {
            Mode::Off => {}
            Mode::Live { colors } => {
                if let Ok(task) = tasker.get_task(uuid).await {
                    self.redraw(&task, tasker.now(), colors);
                }
            }
            Mode::Lines => {
                let (Ok(task), Ok(transitions)) = (
                    tasker.get_task(uuid).await,
                    tasker.step_transitions(uuid, None).await,
                ) else {
                    return;
                };
                let mut err = std::io::stderr().lock();
                for t in transitions.iter().skip(self.printed) {
                    let at = human_duration(t.created_at - task.created_at);
                    let from = t.from_state.as_deref().unwrap_or("∅");
                    let step = t.step_name.as_deref().unwrap_or("?");
                    let attempt = t
                        .attempt
                        .map(|a| format!(", attempt {a}"))
                        .unwrap_or_default();
                    let reason = t
                        .reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default();
                    let _ = writeln!(
                        err,
                        "[+{at:>7}] {step}: {from} -> {} ({}{attempt}){reason}",
                        t.to_state, t.event
                    );
                }
                self.printed = self.printed.max(transitions.len());
                if self.last_status != Some(task.status) {
                    let at = human_duration(task.updated_at - task.created_at);
                    let _ = writeln!(err, "[+{at:>7}] task: {}", task.status);
                    self.last_status = Some(task.status);
                }
            }
        }
    }

    /// Redraws the step table in place: cursor up over the previous drawing, clear each line.
    fn redraw(&mut self, task: &Task, now: i64, colors: bool) {
        let mut t = Table::new(&["step", "state", "attempts", "elapsed", "note"]);
        for s in &task.steps {
            // A step backing off is not running: its clock would only count the wait.
            let running = matches!(
                s.state,
                StepState::InProgress | StepState::EnqueuedForOrchestration
            );
            let end = s.completed_at.or(running.then_some(now));
            let elapsed = s.started_at.zip(end).map(|(a, b)| human_duration(b - a));
            let note = match s.state {
                StepState::WaitingForRetry => s
                    .next_attempt_at
                    .map(|n| format!("retry in {}", human_duration(n - now)))
                    .unwrap_or_default(),
                StepState::Error | StepState::EnqueuedAsErrorForOrchestration => s
                    .error
                    .as_ref()
                    .map(|e| {
                        format!(
                            "{}{}",
                            e.error_type,
                            e.error_code
                                .as_deref()
                                .map(|c| format!(" {c}"))
                                .unwrap_or_default()
                        )
                    })
                    .unwrap_or_default(),
                _ => String::new(),
            };
            t.row_colored(vec![
                (s.name.clone(), None),
                (s.state.as_str().to_string(), step_color(s.state)),
                (format!("{}/{}", s.attempts, s.max_attempts), None),
                (elapsed.unwrap_or_else(|| "-".into()), None),
                (note, Some(Color::Dim)),
            ]);
        }
        let mut lines = vec![format!(
            "task {}  {}  {}",
            task.uuid,
            paint(task.status.as_str(), task_color(task.status), colors),
            human_duration(task.completed_at.unwrap_or(now) - task.created_at)
        )];
        lines.extend(t.lines(colors));
        let mut err = std::io::stderr().lock();
        let mut out = String::new();
        if self.drawn > 0 {
            out.push_str(&format!("\x1b[{}A", self.drawn));
        }
        for line in &lines {
            out.push_str("\r\x1b[2K");
            out.push_str(line);
            out.push('\n');
        }
        // Fewer lines than last time (cannot happen today, steps are only added): clear the rest.
        out.push_str("\x1b[J");
        let _ = err.write_all(out.as_bytes());
        let _ = err.flush();
        self.drawn = lines.len();
    }

    /// Removes the live table so the final summary on stdout is not a duplicate of it.
    fn finish(&mut self) {
        if let Mode::Live { .. } = self.mode
            && self.drawn > 0
        {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\x1b[{}A\x1b[J", self.drawn);
            let _ = err.flush();
            self.drawn = 0;
        }
    }
}
