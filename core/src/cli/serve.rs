//! `tasker-ctl serve`: orchestration and the REST API in one process.
//!
//! The engine runs with background work on (the bundled Rust handlers, retries, sweeps) and
//! the API serves it. On SIGTERM or Ctrl-C the server stops accepting connections, the engine
//! closes (so long waits and event streams end at once instead of holding the shutdown), and
//! in-flight requests get a few seconds to finish.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::{CliError, CliResult, DEFAULT_DB, EXIT_OK, config, open_failed};
use crate::api::{ApiOptions, AuthMode, DEFAULT_BODY_LIMIT, router};
use crate::{OpenOptions, Tasker};

/// How `--auth` decides whether requests need a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum AuthChoice {
    /// Required when the database holds any unrevoked API key (decided at start).
    Auto,
    /// Always required.
    Required,
    /// Never asked for (refused beyond loopback unless --insecure).
    Off,
}

/// `tasker-ctl serve`
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on (`HOST:PORT`; port 0 picks a free one).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    bind: String,
    /// Database: `sqlite:PATH`, `sqlite::memory:` or a file path (created and migrated if
    /// needed).
    #[arg(long, value_name = "URL", default_value = DEFAULT_DB)]
    db: String,
    /// Register the task templates in these files or directories at start (repeatable).
    #[arg(long = "templates", value_name = "DIR")]
    templates: Vec<PathBuf>,
    /// Whether requests need an API key (`tasker-ctl auth create-key` makes one).
    #[arg(long, value_enum, default_value_t = AuthChoice::Auto)]
    auth: AuthChoice,
    /// Allow listening beyond loopback without authentication.
    #[arg(long)]
    insecure: bool,
    /// Largest request body accepted, in bytes (larger ones get 413).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_BODY_LIMIT)]
    max_body_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM or Ctrl-C.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    shutdown_timeout: u64,
    /// Do not migrate the database: refuse to start unless its schema is current (run
    /// `tasker-ctl migrate` first).
    #[arg(long)]
    no_migrate: bool,
    /// Namespaces whose steps this process's bundled handlers take (comma separated; default:
    /// all).
    #[arg(long, value_delimiter = ',', value_name = "NS,...")]
    namespaces: Vec<String>,
}

async fn resolve(bind: &str) -> CliResult<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(bind)
        .await
        .map_err(|e| CliError::usage(format!("--bind {bind}: {e} (expected HOST:PORT)")))?
        .collect();
    if addrs.is_empty() {
        return Err(CliError::usage(format!("--bind {bind}: no address")));
    }
    Ok(addrs)
}

/// Resolves when the process is asked to stop.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the server until a stop signal.
pub(crate) async fn serve(
    args: ServeArgs,
    register: &(dyn Fn(&Tasker) + Send + Sync),
) -> CliResult {
    let mut config = config()?;
    // Workers of other processes may serve callables this process does not know; their steps
    // wait for them instead of failing (docs/decisions/003-unknown-callables.md).
    config.fail_unknown_callables = false;
    if args.no_migrate {
        config.migrate = false;
    }
    if !args.namespaces.is_empty() {
        config.namespaces = args.namespaces.clone();
    }
    let addrs = resolve(&args.bind).await?;
    let loopback = addrs.iter().all(|a| a.ip().is_loopback());
    let tasker = Tasker::open_with(
        &args.db,
        OpenOptions {
            config,
            ..OpenOptions::default()
        },
    )
    .await
    .map_err(|e| open_failed(&args.db, e))?;
    register(&tasker);
    for dir in &args.templates {
        let loaded = tasker.register_templates(dir).await.map_err(|e| {
            let mut e = CliError::from(e);
            e.message = format!("--templates {}: {}", dir.display(), e.message);
            e
        })?;
        eprintln!(
            "registered {} template(s) from {}",
            loaded.len(),
            dir.display()
        );
    }
    let active_keys = tasker
        .store()
        .list_api_keys()
        .await?
        .iter()
        .filter(|k| k.revoked_at.is_none())
        .count();
    let auth = match args.auth {
        AuthChoice::Required => AuthMode::Required,
        AuthChoice::Off => AuthMode::Disabled,
        AuthChoice::Auto if active_keys > 0 => AuthMode::Required,
        AuthChoice::Auto => AuthMode::Disabled,
    };
    if auth == AuthMode::Disabled && !loopback && !args.insecure {
        tasker.close();
        return Err(CliError::usage(format!(
            "refusing to listen on {} without authentication: create a key with `tasker-ctl \
             auth create-key --name NAME --permissions '*' --db {}` (then the server asks for \
             keys), or pass --insecure",
            args.bind, args.db
        )));
    }
    if auth == AuthMode::Required && active_keys == 0 {
        eprintln!(
            "warning: authentication is required but the database has no API key: every API \
             request will be refused until one is created with `tasker-ctl auth create-key`"
        );
    }
    let listener = tokio::net::TcpListener::bind(&addrs[..])
        .await
        .map_err(|e| CliError::failed(format!("cannot listen on {}: {e}", args.bind)))?;
    let local = listener
        .local_addr()
        .map_err(|e| CliError::failed(format!("cannot listen on {}: {e}", args.bind)))?;
    let app = router(
        tasker.clone(),
        ApiOptions {
            auth,
            body_limit: args.max_body_bytes,
        },
    );
    // The first line on stdout says where to connect (scripts and tests read it).
    outln!("listening on http://{local}");
    eprintln!(
        "tasker-ctl serve: database {}, authentication {}; stop with Ctrl-C or SIGTERM",
        args.db,
        if auth == AuthMode::Required {
            "required"
        } else {
            "off"
        }
    );

    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let closer = tasker.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        stop_signal().await;
        eprintln!("tasker-ctl serve: stopping");
        // Long waits and event streams end now rather than holding the shutdown.
        closer.close();
        let _ = stopping_tx.send(true);
    });
    let grace = Duration::from_secs(args.shutdown_timeout);
    let result = tokio::select! {
        r = server => r.map_err(|e| CliError::failed(format!("the server failed: {e}"))),
        _ = async {
            let _ = stopping_rx.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => {
            eprintln!("tasker-ctl serve: requests still in flight after {grace:?}; exiting");
            Ok(())
        }
    };
    tasker.close();
    result.map(|()| EXIT_OK)
}
