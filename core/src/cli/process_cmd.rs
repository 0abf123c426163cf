//! Long-running processes of production mode: `tasker-ctl worker` (the bundled Rust handlers
//! serving some namespaces) and `tasker-ctl migrate`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{CliError, CliResult, EXIT_OK, config};
use crate::{OpenOptions, Tasker};

/// Where a process's database is: `--db`, else `DATABASE_URL`.
fn database(db: &Option<String>) -> CliResult<String> {
    db.clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .ok_or_else(|| {
            CliError::usage(
                "no database: pass --db postgres://… (or sqlite:PATH), or set DATABASE_URL",
            )
        })
}

#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// Database URL (default: $DATABASE_URL). Any number of workers and servers may share one
    /// PostgreSQL database.
    #[arg(long, value_name = "URL")]
    db: Option<String>,
    /// Namespaces whose steps this worker takes (comma separated; default: all).
    #[arg(long, value_delimiter = ',', value_name = "NS,...")]
    namespaces: Vec<String>,
    /// Handlers run at once at most (default: TASKER_CONCURRENCY or 32).
    #[arg(long, value_name = "N")]
    concurrency: Option<usize>,
    /// Also register the task templates found in these files or directories.
    #[arg(long, value_name = "PATH")]
    templates: Vec<PathBuf>,
    /// On SIGTERM or Ctrl-C, how long running handlers may take to finish before their
    /// steps are handed back.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    shutdown_timeout: u64,
}

/// Serves steps with the bundled Rust handlers until SIGTERM or Ctrl-C, then drains.
pub(crate) async fn worker(
    args: WorkerArgs,
    register: &(dyn Fn(&Tasker) + Send + Sync),
) -> CliResult {
    let url = database(&args.db)?;
    let mut config = config()?;
    if !args.namespaces.is_empty() {
        config.namespaces = args.namespaces.clone();
    }
    if let Some(n) = args.concurrency {
        config.concurrency = n.max(1);
    }
    // Another process may serve what this one does not: never fail unknown callables here.
    config.fail_unknown_callables = false;
    let tasker = Tasker::open_with(
        &url,
        OpenOptions {
            config,
            ..OpenOptions::default()
        },
    )
    .await?;
    register(&tasker);
    for path in &args.templates {
        tasker.register_templates(path).await?;
    }
    let namespaces = if args.namespaces.is_empty() {
        "all namespaces".to_string()
    } else {
        args.namespaces.join(", ")
    };
    eprintln!(
        "worker {} serving {namespaces} with {} handlers",
        tasker.worker_id(),
        tasker.handler_names().len()
    );
    let signal = shutdown_signal().await;
    eprintln!(
        "{signal}: finishing running steps (up to {} s)",
        args.shutdown_timeout
    );
    let report = tasker
        .drain(Duration::from_secs(args.shutdown_timeout))
        .await?;
    eprintln!(
        "stopped: {} finished, {} handed back",
        report.finished, report.handed_back
    );
    Ok(EXIT_OK)
}

/// Waits for SIGTERM or Ctrl-C and names it.
pub(crate) async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            return tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "interrupted",
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "interrupted"
}

#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// Database URL (default: $DATABASE_URL).
    #[arg(long, value_name = "URL")]
    db: Option<String>,
}

/// Brings the database schema up to date (any number of processes may run it at once).
pub(crate) async fn migrate(args: MigrateArgs) -> CliResult {
    let url = database(&args.db)?;
    let mut config = config()?;
    config.migrate = true;
    crate::store::open(&url, &config).await?;
    println!("the database schema is current");
    Ok(EXIT_OK)
}
