//! `tasker-ctl dlq ...`: the dead-letter record (SPEC §9, §11): tasks that a lifecycle limit
//! or the staleness threshold moved to `error`, and what operators concluded about them.
//!
//! Like `task` commands these open the database as an operator (no background work), so they
//! are safe next to a running engine on the same database. Resolving an entry records an
//! investigation outcome; it never changes the task.

use clap::{Args, Subcommand};
use serde_json::Value;

use super::table::{self, Color, Table, paint, task_color, time_or_dash};
use super::{CliError, CliResult, DbArgs, EXIT_OK, Format, open_operator, print_json};
use crate::dlq::{DlqEntry, DlqFilter, DlqReason, DlqResolution, DlqStats};

/// `tasker-ctl dlq ...`
#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// List dead-letter entries, newest first.
    List(ListArgs),
    /// Show one entry: why, from which state, and the task's steps at that moment.
    Get(GetArgs),
    /// Count entries by reason, resolution status, original state and namespace.
    Stats(StatsArgs),
    /// Record what an investigation concluded (the task itself is not changed).
    Resolve(ResolveArgs),
}

/// `dlq list`
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Only entries with this resolution status (pending, manually_resolved,
    /// permanently_failed, cancelled).
    #[arg(long)]
    status: Option<String>,
    /// Only this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only this task's entries.
    #[arg(long, value_name = "UUID")]
    task: Option<String>,
    /// Only this reason (max_duration_minutes, max_waiting_for_dependencies_minutes,
    /// max_waiting_for_retry_minutes, max_steps_in_process_minutes, staleness).
    #[arg(long)]
    reason: Option<String>,
    /// At most this many entries (default 50, at most 1000).
    #[arg(long)]
    limit: Option<u32>,
    /// Skip this many entries.
    #[arg(long)]
    offset: Option<u32>,
    #[command(flatten)]
    db: DbArgs,
}

/// `dlq get`
#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    /// The entry's id (`dlq_entry_uuid`).
    id: String,
    #[command(flatten)]
    db: DbArgs,
}

/// `dlq stats`
#[derive(Debug, Args)]
pub(crate) struct StatsArgs {
    #[command(flatten)]
    db: DbArgs,
}

/// `dlq resolve`
#[derive(Debug, Args)]
pub(crate) struct ResolveArgs {
    /// The entry's id (`dlq_entry_uuid`).
    id: String,
    /// The outcome: manually_resolved, permanently_failed, cancelled, or pending to re-open.
    #[arg(long)]
    status: String,
    /// What was found or done (replaces earlier notes).
    #[arg(long)]
    notes: Option<String>,
    /// Who records it (default `operator:$USER`).
    #[arg(long)]
    by: Option<String>,
    #[command(flatten)]
    db: DbArgs,
}

/// Runs one `dlq` subcommand.
pub(crate) async fn dispatch(cmd: DlqCommand) -> CliResult {
    match cmd {
        DlqCommand::List(a) => list(a).await,
        DlqCommand::Get(a) => get(a).await,
        DlqCommand::Stats(a) => stats(a).await,
        DlqCommand::Resolve(a) => resolve(a).await,
    }
}

fn parse_status(raw: &str) -> CliResult<DlqResolution> {
    raw.parse()
        .map_err(|e: crate::Error| CliError::usage(format!("--status: {}", e.message)))
}

fn status_color(s: DlqResolution) -> Option<Color> {
    match s {
        DlqResolution::Pending => Some(Color::Yellow),
        DlqResolution::ManuallyResolved => Some(Color::Green),
        DlqResolution::PermanentlyFailed => Some(Color::Red),
        DlqResolution::Cancelled => Some(Color::Dim),
    }
}

fn template(e: &DlqEntry) -> String {
    format!("{}/{} {}", e.namespace, e.name, e.version)
}

async fn list(a: ListArgs) -> CliResult {
    let status = a.status.as_deref().map(parse_status).transpose()?;
    let reason = a
        .reason
        .as_deref()
        .map(|r| {
            r.parse::<DlqReason>()
                .map_err(|e| CliError::usage(format!("--reason: {}", e.message)))
        })
        .transpose()?;
    let tasker = open_operator(&a.db.target).await?;
    let filter = DlqFilter {
        status,
        namespace: a.namespace,
        task_uuid: a.task,
        reason,
        limit: a.limit,
        offset: a.offset,
    };
    let entries = tasker.dlq_list(&filter).await?;
    if a.db.format == Format::Json {
        print_json(&entries)?;
        return Ok(EXIT_OK);
    }
    if entries.is_empty() {
        eprintln!("no DLQ entries");
        return Ok(EXIT_OK);
    }
    let mut t = Table::new(&[
        "entry",
        "task",
        "template",
        "reason",
        "original_state",
        "status",
        "created_at",
    ]);
    for e in &entries {
        t.row_colored(vec![
            (e.dlq_entry_uuid.clone(), None),
            (e.task_uuid.clone(), None),
            (template(e), None),
            (e.reason.as_str().into(), None),
            (
                e.original_state.as_str().into(),
                task_color(e.original_state),
            ),
            (
                e.resolution_status.as_str().into(),
                status_color(e.resolution_status),
            ),
            (time_or_dash(Some(e.created_at)), None),
        ]);
    }
    t.print();
    Ok(EXIT_OK)
}

/// The entry as a field/value table.
fn entry_table(e: &DlqEntry) -> Table {
    let or_dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    let mut t = Table::new(&["field", "value"]);
    t.row(vec!["entry".into(), e.dlq_entry_uuid.clone()]);
    t.row(vec!["task".into(), e.task_uuid.clone()]);
    t.row(vec!["template".into(), template(e)]);
    t.row(vec!["reason".into(), e.reason.as_str().into()]);
    t.row(vec!["message".into(), e.message.clone()]);
    t.row_colored(vec![
        ("original_state".into(), None),
        (
            e.original_state.as_str().into(),
            task_color(e.original_state),
        ),
    ]);
    t.row_colored(vec![
        ("status".into(), None),
        (
            e.resolution_status.as_str().into(),
            status_color(e.resolution_status),
        ),
    ]);
    t.row(vec!["notes".into(), or_dash(&e.resolution_notes)]);
    t.row(vec!["resolved_by".into(), or_dash(&e.resolved_by)]);
    t.row(vec!["resolved_at".into(), time_or_dash(e.resolved_at)]);
    t.row(vec!["created_at".into(), time_or_dash(Some(e.created_at))]);
    t.row(vec!["updated_at".into(), time_or_dash(Some(e.updated_at))]);
    t
}

async fn get(a: GetArgs) -> CliResult {
    let tasker = open_operator(&a.db.target).await?;
    let entry = tasker.dlq_get(&a.id).await?;
    if a.db.format == Format::Json {
        print_json(&entry)?;
        return Ok(EXIT_OK);
    }
    entry_table(&entry).print();
    let steps = entry
        .snapshot
        .as_ref()
        .and_then(|s| s.get("steps"))
        .and_then(Value::as_array);
    if let Some(steps) = steps {
        outln!();
        outln!("steps when the limit was exceeded:");
        let mut t = Table::new(&["step", "state", "attempts", "error"]);
        for s in steps {
            let text = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
            let error = s
                .get("error")
                .filter(|e| !e.is_null())
                .map(|e| {
                    let kind = e.get("error_type").and_then(Value::as_str).unwrap_or("");
                    let message = e.get("message").and_then(Value::as_str).unwrap_or("");
                    table::truncate(&format!("{kind}: {message}"), 80)
                })
                .unwrap_or_default();
            t.row(vec![
                text("name"),
                text("state"),
                format!(
                    "{}/{}",
                    s.get("attempts").unwrap_or(&Value::Null),
                    s.get("max_attempts").unwrap_or(&Value::Null)
                ),
                error,
            ]);
        }
        t.print();
        outln!();
        outln!("(the whole snapshot: --format json)");
    }
    Ok(EXIT_OK)
}

fn stats_table(s: &DlqStats) -> Table {
    let mut t = Table::new(&["by", "value", "count"]);
    for (by, counts) in [
        ("reason", &s.by_reason),
        ("status", &s.by_resolution_status),
        ("original_state", &s.by_original_state),
        ("namespace", &s.by_namespace),
    ] {
        for (value, n) in counts {
            t.row(vec![by.into(), value.clone(), n.to_string()]);
        }
    }
    t
}

async fn stats(a: StatsArgs) -> CliResult {
    let tasker = open_operator(&a.db.target).await?;
    let s = tasker.dlq_stats().await?;
    if a.db.format == Format::Json {
        print_json(&s)?;
        return Ok(EXIT_OK);
    }
    outln!("total: {}", s.total);
    outln!("oldest pending: {}", time_or_dash(s.oldest_pending_at));
    if s.total > 0 {
        outln!();
        stats_table(&s).print();
    }
    Ok(EXIT_OK)
}

async fn resolve(a: ResolveArgs) -> CliResult {
    let status = parse_status(&a.status)?;
    let by = a.by.clone().unwrap_or_else(|| {
        let user = std::env::var("USER").or_else(|_| std::env::var("USERNAME"));
        format!("operator:{}", user.unwrap_or_else(|_| "unknown".into()))
    });
    let tasker = open_operator(&a.db.target).await?;
    let entry = tasker
        .dlq_resolve(&a.id, status, a.notes.as_deref(), &by)
        .await?;
    match a.db.format {
        Format::Json => print_json(&entry)?,
        Format::Table => {
            let colors = table::stdout_colors();
            outln!(
                "DLQ entry {}: {} (task {} stays {})",
                entry.dlq_entry_uuid,
                paint(
                    entry.resolution_status.as_str(),
                    status_color(entry.resolution_status),
                    colors
                ),
                entry.task_uuid,
                tasker.get_task(&entry.task_uuid).await?.status
            );
        }
    }
    Ok(EXIT_OK)
}
