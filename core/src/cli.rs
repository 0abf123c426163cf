//! The `tasker-ctl` command tree (SPEC §11 "CLI"), as a library function so that every host
//! package can ship the same command line with its own handlers registered.
//!
//! ```text
//! tasker-ctl run TEMPLATE --context JSON|@FILE [--db PATH] [--format table|json] [--timeout S]
//! tasker-ctl template validate|convert|list|register|visualize ...
//! tasker-ctl serve [--bind ADDR] [--db PATH] [--templates DIR] [--auth auto|required|off]
//! tasker-ctl task create|get|list|steps|audit|visualize|cancel|give-up|resolve|reset-step|resolve-step|complete-step ... [--url URL | --db PATH]
//! tasker-ctl auth create-key|list-keys|revoke-key ...
//! tasker-ctl dlq list|get|stats|resolve ...
//! ```
//!
//! Exit codes: `0` success (for `run`: the task is `complete`), `1` the command worked but the
//! answer is bad (the task ended in another state, a template is invalid, an operator action
//! was refused, the database failed), `2` bad input (usage, unreadable or malformed files,
//! context that is not a JSON object, schema violations, unknown task), `130` interrupted.
//!
//! Output for people goes to stdout as tables; progress, warnings and errors go to stderr, so
//! `--format json` leaves exactly one JSON document on stdout.

/// `println!` for command output: a reader that goes away (`tasker-ctl task list | head`)
/// ends the command quietly instead of panicking.
macro_rules! outln {
    () => {
        $crate::cli::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` counterpart of [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!($($arg)*))
    };
}

mod auth_cmd;
mod diagram;
mod dlq_cmd;
mod process_cmd;
mod run;
mod serve;
mod table;
mod task_cmd;
mod task_target;
mod template_cmd;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;

use crate::telemetry::TelemetryGuard;
use crate::{Config, Error, ErrorKind, OpenOptions, Tasker};

/// The database used when `--db` is not given: an SQLite file in the working directory.
pub const DEFAULT_DB: &str = "./tasker.db";

/// Exit code: success (for `run`, the task is `complete`).
pub const EXIT_OK: i32 = 0;
/// Exit code: the command ran but the outcome is a failure (task not complete, invalid
/// template, refused action, database error).
pub const EXIT_FAILED: i32 = 1;
/// Exit code: bad input (usage, files, JSON, schema violations, unknown names).
pub const EXIT_USAGE: i32 = 2;
/// Exit code: interrupted by Ctrl-C (the conventional 128 + SIGINT).
pub const EXIT_INTERRUPTED: i32 = 130;

/// Runs `tasker-ctl` with `args` (including the program name, as `std::env::args_os` gives
/// them) and returns the process exit code. `register` is called on the engine handle of
/// `run` so that the host's bundled handlers serve the task; operator commands never run
/// handlers and never call it.
///
/// Builds its own tokio runtime, so it must not be called from inside one. Logging goes to
/// stderr through `tracing-subscriber`, filtered by `TASKER_LOG` (default `warn`); with the
/// `otlp` feature, spans are exported when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (see
/// [`crate::telemetry`]) and flushed before this function returns.
pub fn run_cli(args: Vec<OsString>, register: impl Fn(&Tasker) + Send + Sync + 'static) -> i32 {
    run_cli_with(args, None, &register)
}

/// [`run_cli`] on a runtime the host owns, for hosts whose handlers pull work on their own
/// threads through the dispatch port ([`crate::worker::Worker`]): those calls need a runtime
/// that outlives the command, so the host can stop its threads after this returns. `register`
/// is called inside `runtime`'s `block_on`: it may start threads and open dispatch-port
/// workers, but must not block on the runtime itself. Must not be called from inside a
/// runtime.
pub fn run_cli_on(
    args: Vec<OsString>,
    runtime: &tokio::runtime::Handle,
    register: impl Fn(&Tasker) + Send + Sync + 'static,
) -> i32 {
    run_cli_with(args, Some(runtime), &register)
}

fn run_cli_with(
    args: Vec<OsString>,
    host_runtime: Option<&tokio::runtime::Handle>,
    register: &(dyn Fn(&Tasker) + Send + Sync),
) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // `--help` and `--version` are "errors" too, with exit code 0.
            let _ = e.print();
            return e.exit_code();
        }
    };
    let telemetry = init_logging();
    let (owned, handle) = match host_runtime {
        Some(h) => (None, h.clone()),
        None => match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => {
                let h = rt.handle().clone();
                (Some(rt), h)
            }
            Err(e) => {
                eprintln!("error: cannot start the async runtime: {e}");
                return EXIT_FAILED;
            }
        },
    };
    let result = handle.block_on(async move {
        match cli.command {
            Command::Run(args) => run::run(args, register).await,
            Command::Serve(args) => serve::serve(args, register).await,
            Command::Auth(cmd) => auth_cmd::dispatch(cmd).await,
            Command::Task(cmd) => task_cmd::dispatch(cmd).await,
            Command::Template(cmd) => template_cmd::dispatch(cmd).await,
            Command::Dlq(cmd) => dlq_cmd::dispatch(cmd).await,
            Command::Worker(args) => process_cmd::worker(args, register).await,
            Command::Migrate(args) => process_cmd::migrate(args).await,
        }
    });
    // Handlers abandoned by an interrupted or timed-out run must not keep the process alive.
    if let Some(rt) = owned {
        rt.shutdown_timeout(std::time::Duration::from_millis(200));
    }
    // The spans of the last steps are still queued: export them before the process exits.
    telemetry.shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", e.message);
            e.code
        }
    }
}

/// Logs to stderr filtered by `TASKER_LOG`, and (feature `otlp`) exports spans when an OTLP
/// endpoint is configured, filtered by `TASKER_OTLP_LOG`. The guard flushes the export.
fn init_logging() -> TelemetryGuard {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = tracing_subscriber::EnvFilter::try_from_env("TASKER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(table::stderr_is_tty())
        .with_filter(filter);
    #[cfg(feature = "otlp")]
    let (otlp, guard) = match crate::telemetry::otlp::from_env() {
        Ok(Some((layer, guard))) => (
            Some(layer.with_filter(crate::telemetry::otlp::filter_from_env())),
            guard,
        ),
        Ok(None) => (None, TelemetryGuard::none()),
        Err(e) => {
            eprintln!("warning: OTLP export is off: {e}");
            (None, TelemetryGuard::none())
        }
    };
    #[cfg(not(feature = "otlp"))]
    let (otlp, guard) = (
        None::<tracing_subscriber::layer::Identity>,
        TelemetryGuard::none(),
    );
    // `try_init`: a host process may call `run_cli` more than once; the first call's
    // subscriber stays, and this call's exporter (fed by nothing) is stopped by the guard.
    match tracing_subscriber::registry()
        .with(fmt)
        .with(otlp)
        .try_init()
    {
        Ok(()) => guard,
        Err(_) => TelemetryGuard::none(),
    }
}

/// A failed command: what to print and which exit code to return.
#[derive(Debug)]
pub(crate) struct CliError {
    pub(crate) code: i32,
    pub(crate) message: String,
}

impl CliError {
    /// Bad input: exit code 2.
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        CliError {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }

    /// The command could not do its job: exit code 1.
    pub(crate) fn failed(message: impl Into<String>) -> Self {
        CliError {
            code: EXIT_FAILED,
            message: message.into(),
        }
    }
}

impl From<Error> for CliError {
    /// Engine errors caused by what the user typed are usage errors (exit 2); the rest
    /// (refused transitions, database trouble, timeouts) are failures (exit 1).
    fn from(e: Error) -> Self {
        let code = match e.kind {
            ErrorKind::Validation
            | ErrorKind::Template
            | ErrorKind::NotFound
            | ErrorKind::Conflict => EXIT_USAGE,
            ErrorKind::InvalidTransition
            | ErrorKind::Store
            | ErrorKind::Timeout
            | ErrorKind::Shutdown
            | ErrorKind::Internal => EXIT_FAILED,
        };
        CliError {
            code,
            message: describe_error(&e),
        }
    }
}

/// An engine error for people: the message, then structured details one per line (schema
/// violations with their JSON pointers, known template versions) instead of a JSON blob.
fn describe_error(e: &Error) -> String {
    let mut out = format!("{} ({})", e.message, e.kind.code());
    let Some(details) = &e.details else {
        return out;
    };
    if let Some(violations) = details.get("violations").and_then(Value::as_array) {
        // The message already inlines the violations after its first `: `; list them one per
        // line instead of twice.
        let headline = e.message.split(": ").next().unwrap_or(&e.message);
        out = format!("{headline} ({}); violations:", e.kind.code());
        for v in violations {
            let pointer = v.get("pointer").and_then(Value::as_str).unwrap_or("");
            let message = v.get("message").and_then(Value::as_str).unwrap_or("");
            let pointer = if pointer.is_empty() { "/" } else { pointer };
            out.push_str(&format!("\n  {pointer}: {message}"));
        }
    } else if let Some(known) = details.get("known_versions") {
        out.push_str(&format!("\nknown versions: {known}"));
    }
    out
}

pub(crate) type CliResult<T = i32> = Result<T, CliError>;

#[derive(Debug, Parser)]
#[command(
    name = "tasker-ctl",
    version,
    about = "Run Tasker workflows and operate the tasks of a Tasker database",
    after_help = "Exit codes: 0 success (run: task complete), 1 task not complete or command \
                  refused, 2 bad input, 130 interrupted.\nLogging: TASKER_LOG=info|debug|... \
                  (stderr). Traces: OTEL_EXPORTER_OTLP_ENDPOINT=http://HOST:4318 exports spans \
                  (OTLP/HTTP JSON), filtered by TASKER_OTLP_LOG. Engine settings: TASKER_* variables (TASKER_LEASE_MS, TASKER_ENV, ...)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one task of a template file in this process, showing live progress.
    Run(run::RunArgs),
    /// Serve orchestration and the REST API: runs tasks with the bundled handlers.
    Serve(serve::ServeArgs),
    /// Inspect and operate tasks, through a Tasker server or straight on a database.
    #[command(subcommand)]
    Task(task_cmd::TaskCommand),
    /// Manage the API keys the server accepts.
    #[command(subcommand)]
    Auth(auth_cmd::AuthCommand),
    /// Validate, convert, register and list task templates.
    #[command(subcommand)]
    Template(template_cmd::TemplateCommand),
    /// Inspect the dead-letter record (tasks a lifecycle limit moved to `error`) and record
    /// resolutions.
    #[command(subcommand)]
    Dlq(dlq_cmd::DlqCommand),
    /// Serve steps with the bundled Rust handlers until SIGTERM (production mode: any number
    /// of workers share one PostgreSQL database).
    Worker(process_cmd::WorkerArgs),
    /// Bring a database's schema up to date.
    Migrate(process_cmd::MigrateArgs),
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// Tables for people.
    Table,
    /// One JSON document on stdout, for scripts.
    Json,
}

/// Where the tasks are: a database, or a Tasker server.
#[derive(Debug, Clone, Args)]
pub(crate) struct DbTarget {
    /// Database: `sqlite:PATH`, `sqlite::memory:` or a plain file path.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_DB)]
    pub(crate) db: String,
    /// A Tasker server (only the `task` commands talk to one).
    #[arg(long, value_name = "URL")]
    pub(crate) url: Option<String>,
}

/// Options shared by every command that reads a database and prints tables or JSON.
#[derive(Debug, Clone, Args)]
pub(crate) struct DbArgs {
    #[command(flatten)]
    pub(crate) target: DbTarget,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub(crate) format: Format,
}

impl DbTarget {
    /// Refuses `--url` clearly rather than pretending to talk to a server.
    pub(crate) fn reject_url(&self) -> CliResult<()> {
        match &self.url {
            Some(url) => Err(CliError::usage(format!(
                "--url {url}: this command works on a database only; use --db PATH"
            ))),
            None => Ok(()),
        }
    }
}

/// The file a database URL designates, when it designates one (`None` for in-memory and
/// server databases).
pub(crate) fn db_file(url: &str) -> Option<PathBuf> {
    if url.contains(":memory:") || url.contains("mode=memory") || crate::store::is_postgres_url(url)
    {
        return None;
    }
    let path = match url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        Some(rest) => rest.split('?').next().unwrap_or(rest),
        None => url,
    };
    Some(PathBuf::from(path))
}

/// Reads engine settings from `TASKER_*`; a bad value is a usage error naming the variable.
pub(crate) fn config() -> CliResult<Config> {
    Config::from_env().map_err(|e| CliError::usage(e.message))
}

/// Opens a database as an operator: no in-process worker, sweeper or lease renewal, so the
/// handle never runs a handler or expires another process's attempts. Refuses a file that
/// does not exist rather than creating an empty database for a mistyped path.
pub(crate) async fn open_operator(db: &DbTarget) -> CliResult<Tasker> {
    db.reject_url()?;
    if let Some(path) = db_file(&db.db)
        && !path.exists()
    {
        return Err(CliError::usage(format!(
            "no database at {} (pass --db PATH; `tasker-ctl run` creates one)",
            path.display()
        )));
    }
    let options = OpenOptions {
        config: config()?,
        background: false,
        ..OpenOptions::default()
    };
    Tasker::open_with(&db.db, options)
        .await
        .map_err(|e| open_failed(&db.db, e))
}

/// The database could not be opened: name it, and treat it as bad input (wrong path or URL).
pub(crate) fn open_failed(url: &str, e: Error) -> CliError {
    CliError::usage(format!("cannot open the database {url}: {}", e.message))
}

/// Parses a JSON argument given inline or as `@FILE` (`@-` reads stdin). `what` names the
/// option in messages.
pub(crate) fn json_arg(raw: &str, what: &str) -> CliResult<Value> {
    let (text, source) = match raw.strip_prefix('@') {
        Some("-") => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .map_err(|e| CliError::usage(format!("{what}: cannot read stdin: {e}")))?;
            (s, "stdin".to_string())
        }
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::usage(format!("{what}: cannot read {path}: {e}")))?;
            (text, path.to_string())
        }
        None => (raw.to_string(), String::new()),
    };
    serde_json::from_str(&text).map_err(|e| {
        let source = if source.is_empty() {
            String::new()
        } else {
            format!(" ({source})")
        };
        CliError::usage(format!("{what}: not valid JSON{source}: {e}"))
    })
}

/// Like [`json_arg`], and the value must be a JSON object (a task context).
pub(crate) fn json_object_arg(raw: &str, what: &str) -> CliResult<Value> {
    let v = json_arg(raw, what)?;
    if v.is_object() {
        Ok(v)
    } else {
        Err(CliError::usage(format!(
            "{what}: the task context must be a JSON object ({{...}}), got {}",
            crate::orchestrator::json_kind(&v)
        )))
    }
}

/// Prints `v` as pretty JSON on stdout.
pub(crate) fn print_json(v: &impl serde::Serialize) -> CliResult<()> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| CliError::failed(format!("cannot serialize the output: {e}")))?;
    outln!("{text}");
    Ok(())
}

/// Writes command output; when stdout is a closed pipe the process ends as a shell would end
/// it (status 141, SIGPIPE's), without a panic.
pub(crate) fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout.write_fmt(args).and_then(|()| stdout.flush());
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_file_understands_every_spelling() {
        assert_eq!(db_file("sqlite::memory:"), None);
        assert_eq!(
            db_file("sqlite:/tmp/x.db"),
            Some(PathBuf::from("/tmp/x.db"))
        );
        assert_eq!(
            db_file("sqlite:///tmp/x.db?mode=rwc"),
            Some(PathBuf::from("/tmp/x.db"))
        );
        assert_eq!(db_file("./tasker.db"), Some(PathBuf::from("./tasker.db")));
    }

    #[test]
    fn json_object_arg_rejects_non_objects_clearly() {
        assert!(json_object_arg("{\"a\": 1}", "--context").is_ok());
        let e = json_object_arg("[1,2]", "--context").unwrap_err();
        assert_eq!(e.code, EXIT_USAGE);
        assert!(e.message.contains("an array"), "{}", e.message);
        let e = json_object_arg("not json", "--context").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = json_object_arg("@/nonexistent/x.json", "--context").unwrap_err();
        assert!(e.message.contains("cannot read"), "{}", e.message);
    }

    #[test]
    fn the_command_tree_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
