//! `tasker-ctl task ...`: inspect and operate tasks (SPEC §5.9, §11), through a Tasker server
//! or straight on a database (see [`super::task_target`] for which).
//!
//! On a database every command opens the store as an operator (`background: false`): the
//! handle never runs a handler, never claims a step and never expires another process's
//! attempts, so it is safe next to a running `tasker-ctl run` or server on the same database.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;

use super::run::{step_outcome, summary_table};
use super::table::{self, Table, human_duration, paint, step_color, task_color, time_or_dash};
use super::task_target::TaskTarget;
use super::{CliError, CliResult, EXIT_OK, Format, json_arg, json_object_arg, print_json};
use crate::state::TaskState;
use crate::store::OperatorAction;
use crate::task::{TaskFilter, TaskRequest};

/// `tasker-ctl task ...`
#[derive(Debug, Subcommand)]
pub(crate) enum TaskCommand {
    /// Create a task without running it (a worker or `tasker-ctl run` runs it); prints its uuid.
    Create(CreateArgs),
    /// Show a task: its state and every step with result or error.
    Get(UuidArgs),
    /// List tasks, newest first.
    List(ListArgs),
    /// Show a task's steps: state, attempts, times.
    Steps(UuidArgs),
    /// Show a task's step transitions (attempt, actor, reason) and rejected late completions.
    Audit(AuditArgs),
    /// Draw a task's steps as they exist, coloured by state: Mermaid (default) or DOT text, or
    /// SVG/PNG via Graphviz.
    Visualize(super::diagram::TaskVisualizeArgs),
    /// Cancel a task and its unfinished steps.
    Cancel(ActionArgs),
    /// Give up on a blocked task (it moves to `error`).
    GiveUp(ActionArgs),
    /// Close a blocked task as resolved manually.
    Resolve(ActionArgs),
    /// Put a failed step back to `pending` with its attempts reset.
    ResetStep(StepActionArgs),
    /// Mark a step resolved manually (its dependents may run).
    ResolveStep(StepActionArgs),
    /// Complete a step with an operator-given result (its dependents see it).
    CompleteStep(CompleteStepArgs),
}

/// `task create`
#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// Template name.
    #[arg(long)]
    name: String,
    /// Template namespace.
    #[arg(long)]
    namespace: String,
    /// Template version (default: the newest registered).
    #[arg(long = "template-version", value_name = "VERSION")]
    version: Option<String>,
    /// The task context: inline JSON, `@FILE` or `@-`; must be a JSON object.
    #[arg(
        long,
        visible_alias = "context",
        value_name = "JSON|@FILE",
        default_value = "{}"
    )]
    input: String,
    /// Caller-chosen identity: creating again with the same key returns the same task.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Register this template file (or directory) first.
    #[arg(long, value_name = "PATH")]
    template: Option<PathBuf>,
    #[command(flatten)]
    db: TaskTarget,
}

/// A command about one task.
#[derive(Debug, Args)]
pub(crate) struct UuidArgs {
    /// The task's uuid.
    uuid: String,
    #[command(flatten)]
    db: TaskTarget,
}

/// `task list`
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Only this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only this template name.
    #[arg(long)]
    name: Option<String>,
    /// Only this state (`complete`, `blocked_by_failures`, ...).
    #[arg(long)]
    status: Option<String>,
    /// At most this many tasks (default 50, at most 1000).
    #[arg(long)]
    limit: Option<u32>,
    #[command(flatten)]
    db: TaskTarget,
}

/// `task audit`
#[derive(Debug, Args)]
pub(crate) struct AuditArgs {
    /// The task's uuid.
    uuid: String,
    /// Only this step (name or uuid).
    #[arg(long)]
    step: Option<String>,
    #[command(flatten)]
    db: TaskTarget,
}

/// An operator action on a task.
#[derive(Debug, Args)]
pub(crate) struct ActionArgs {
    /// The task's uuid.
    uuid: String,
    #[command(flatten)]
    who: Who,
    #[command(flatten)]
    db: TaskTarget,
}

/// An operator action on a step.
#[derive(Debug, Args)]
pub(crate) struct StepActionArgs {
    /// The task's uuid.
    uuid: String,
    /// The step (name or uuid).
    step: String,
    #[command(flatten)]
    who: Who,
    #[command(flatten)]
    db: TaskTarget,
}

/// `task complete-step`
#[derive(Debug, Args)]
pub(crate) struct CompleteStepArgs {
    /// The task's uuid.
    uuid: String,
    /// The step (name or uuid).
    step: String,
    /// The step's result: inline JSON, `@FILE` or `@-`.
    #[arg(long, value_name = "JSON|@FILE")]
    result: String,
    #[command(flatten)]
    who: Who,
    #[command(flatten)]
    db: TaskTarget,
}

/// Who acts and why: every operator action is recorded with both (SPEC §5.9).
#[derive(Debug, Args)]
pub(crate) struct Who {
    /// Why (recorded on the transitions).
    #[arg(long, default_value = "operator action via tasker-ctl")]
    reason: String,
    /// Who (recorded as the actor; default `operator:$USER`).
    #[arg(long)]
    by: Option<String>,
}

impl Who {
    fn actor(&self) -> String {
        self.by.clone().unwrap_or_else(|| {
            let user = std::env::var("USER").or_else(|_| std::env::var("USERNAME"));
            format!("operator:{}", user.unwrap_or_else(|_| "unknown".into()))
        })
    }
}

/// Runs one `task` subcommand.
pub(crate) async fn dispatch(cmd: TaskCommand) -> CliResult {
    match cmd {
        TaskCommand::Create(a) => create(a).await,
        TaskCommand::Get(a) => get(a).await,
        TaskCommand::List(a) => list(a).await,
        TaskCommand::Steps(a) => steps(a).await,
        TaskCommand::Audit(a) => audit(a).await,
        TaskCommand::Visualize(a) => super::diagram::task(a).await,
        TaskCommand::Cancel(a) => act(a.uuid, OperatorAction::Cancel, a.who, a.db).await,
        TaskCommand::GiveUp(a) => act(a.uuid, OperatorAction::GiveUp, a.who, a.db).await,
        TaskCommand::Resolve(a) => act(a.uuid, OperatorAction::ResolveManually, a.who, a.db).await,
        TaskCommand::ResetStep(a) => {
            act(
                a.uuid,
                OperatorAction::ResetStep { step: a.step },
                a.who,
                a.db,
            )
            .await
        }
        TaskCommand::ResolveStep(a) => {
            act(
                a.uuid,
                OperatorAction::ResolveStep { step: a.step },
                a.who,
                a.db,
            )
            .await
        }
        TaskCommand::CompleteStep(a) => {
            let result = json_arg(&a.result, "--result")?;
            act(
                a.uuid,
                OperatorAction::CompleteStep {
                    step: a.step,
                    result,
                },
                a.who,
                a.db,
            )
            .await
        }
    }
}

async fn create(a: CreateArgs) -> CliResult {
    let context = json_object_arg(&a.input, "--input")?;
    // Unlike the other task commands this one may create the database: it is how a task gets
    // into a fresh one. Still no background work: creating must not run anything.
    let backend = a.db.open(true).await?;
    if let Some(path) = &a.template {
        backend.register_templates(path).await?;
    }
    let mut request = TaskRequest::new(&a.namespace, &a.name, context).origin(
        "tasker-ctl",
        "cli",
        "tasker-ctl task create",
    );
    request.version = a.version;
    request.idempotency_key = a.idempotency_key;
    let (uuid, replayed) = backend.create(request).await?;
    match a.db.format {
        Format::Json => {
            let task = backend.get_task(&uuid).await?;
            print_json(&json!({"task_uuid": uuid, "replayed": replayed, "status": task.status}))?;
        }
        Format::Table => {
            if replayed {
                eprintln!("a task with the same identity exists: {uuid}");
            }
            outln!("{uuid}");
        }
    }
    Ok(EXIT_OK)
}

async fn get(a: UuidArgs) -> CliResult {
    let backend = a.db.open(false).await?;
    let task = backend.get_task(&a.uuid).await?;
    if a.db.format == Format::Json {
        let mut v = serde_json::to_value(&task).map_err(|e| CliError::failed(e.to_string()))?;
        v["completion_percentage"] = json!(task.completion_percentage());
        print_json(&v)?;
        return Ok(EXIT_OK);
    }
    let colors = table::stdout_colors();
    let mut t = Table::new(&["field", "value"]);
    t.row(vec!["uuid".into(), task.uuid.clone()]);
    t.row(vec![
        "template".into(),
        format!("{}/{} {}", task.namespace, task.name, task.version),
    ]);
    t.row_colored(vec![
        ("status".into(), None),
        (task.status.as_str().into(), task_color(task.status)),
    ]);
    t.row(vec![
        "completion".into(),
        format!("{}%", task.completion_percentage()),
    ]);
    t.row(vec![
        "initiator".into(),
        format!("{} ({})", task.initiator, task.source_system),
    ]);
    t.row(vec!["reason".into(), task.reason.clone()]);
    t.row(vec!["correlation_id".into(), task.correlation_id.clone()]);
    if let Some(p) = &task.parent_correlation_id {
        t.row(vec!["parent_correlation_id".into(), p.clone()]);
    }
    if let Some(p) = &task.parent {
        t.row(vec![
            "parent".into(),
            format!("step {} of task {}", p.step_uuid, p.task_uuid),
        ]);
    }
    t.row(vec![
        "created_at".into(),
        time_or_dash(Some(task.created_at)),
    ]);
    t.row(vec![
        "updated_at".into(),
        time_or_dash(Some(task.updated_at)),
    ]);
    t.row(vec!["completed_at".into(), time_or_dash(task.completed_at)]);
    if let Some(d) = task.completed_at.map(|c| c - task.created_at) {
        t.row(vec!["duration".into(), human_duration(d)]);
    }
    t.row(vec![
        "context".into(),
        table::truncate(&task.context.to_string(), 300),
    ]);
    t.print();
    outln!();
    summary_table(&task.steps).print();
    outln!();
    outln!("results:");
    for s in &task.steps {
        outln!("  {}", step_outcome(s, colors));
    }
    Ok(EXIT_OK)
}

async fn list(a: ListArgs) -> CliResult {
    let status = match &a.status {
        Some(s) => Some(s.parse::<TaskState>().map_err(|e| {
            let names: Vec<&str> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
            CliError::usage(format!(
                "--status: {e}; expected one of {}",
                names.join(", ")
            ))
        })?),
        None => None,
    };
    let backend = a.db.open(false).await?;
    let filter = TaskFilter {
        namespace: a.namespace,
        name: a.name,
        status,
        limit: a.limit,
        ..TaskFilter::default()
    };
    let tasks = backend.list_tasks(&filter).await?;
    if a.db.format == Format::Json {
        print_json(&tasks)?;
        return Ok(EXIT_OK);
    }
    if tasks.is_empty() {
        eprintln!("no tasks");
        return Ok(EXIT_OK);
    }
    let mut t = Table::new(&[
        "uuid",
        "template",
        "status",
        "created_at",
        "completed_at",
        "initiator",
    ]);
    for s in &tasks {
        t.row_colored(vec![
            (s.uuid.clone(), None),
            (format!("{}/{} {}", s.namespace, s.name, s.version), None),
            (s.status.as_str().into(), task_color(s.status)),
            (time_or_dash(Some(s.created_at)), None),
            (time_or_dash(s.completed_at), None),
            (s.initiator.clone(), None),
        ]);
    }
    t.print();
    Ok(EXIT_OK)
}

async fn steps(a: UuidArgs) -> CliResult {
    let backend = a.db.open(false).await?;
    let task = backend.get_task(&a.uuid).await?;
    if a.db.format == Format::Json {
        print_json(&task.steps)?;
        return Ok(EXIT_OK);
    }
    let mut t = Table::new(&[
        "step",
        "type",
        "state",
        "attempts",
        "depends_on",
        "started_at",
        "completed_at",
        "duration",
        "error",
    ]);
    for s in &task.steps {
        let duration = match (s.started_at, s.completed_at) {
            (Some(x), Some(y)) => human_duration(y - x),
            _ => "-".into(),
        };
        let error = s
            .error
            .as_ref()
            .map(|e| {
                let code = e
                    .error_code
                    .as_deref()
                    .map(|c| format!(" [{c}]"))
                    .unwrap_or_default();
                table::truncate(&format!("{}{code}: {}", e.error_type, e.message), 80)
            })
            .unwrap_or_default();
        t.row_colored(vec![
            (s.name.clone(), None),
            (s.step_type.clone(), None),
            (s.state.as_str().into(), step_color(s.state)),
            (format!("{}/{}", s.attempts, s.max_attempts), None),
            (
                if s.dependencies.is_empty() {
                    "-".into()
                } else {
                    s.dependencies.join(",")
                },
                None,
            ),
            (time_or_dash(s.started_at), None),
            (time_or_dash(s.completed_at), None),
            (duration, None),
            (error, None),
        ]);
    }
    t.print();
    Ok(EXIT_OK)
}

async fn audit(a: AuditArgs) -> CliResult {
    let backend = a.db.open(false).await?;
    let task = backend.get_task(&a.uuid).await?;
    let (transitions, rejected) = backend.audit(&a.uuid, a.step.as_deref()).await?;
    let name_of = |uuid: &str| {
        task.steps
            .iter()
            .find(|s| s.uuid == uuid)
            .map(|s| s.name.clone())
            .unwrap_or_else(|| uuid.to_string())
    };
    if a.db.format == Format::Json {
        let rejected: Vec<_> = rejected
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["step_name"] = json!(name_of(&r.step_uuid));
                v
            })
            .collect();
        print_json(
            &json!({"task_uuid": a.uuid, "transitions": transitions, "rejected_completions": rejected}),
        )?;
        return Ok(EXIT_OK);
    }
    let mut t = Table::new(&[
        "at", "step", "attempt", "from", "to", "event", "actor", "reason",
    ]);
    for tr in &transitions {
        let to_color = tr.to_state.parse().ok().and_then(step_color);
        t.row_colored(vec![
            (time_or_dash(Some(tr.created_at)), None),
            (tr.step_name.clone().unwrap_or_default(), None),
            (
                tr.attempt
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "-".into()),
                None,
            ),
            (tr.from_state.clone().unwrap_or_else(|| "-".into()), None),
            (tr.to_state.clone(), to_color),
            (tr.event.clone(), None),
            (tr.actor.clone(), None),
            (tr.reason.clone().unwrap_or_default(), None),
        ]);
    }
    t.print();
    if !rejected.is_empty() {
        outln!();
        outln!("rejected late completions:");
        let mut r = Table::new(&["at", "step", "attempt", "worker", "reason"]);
        for x in &rejected {
            r.row(vec![
                time_or_dash(Some(x.created_at)),
                name_of(&x.step_uuid),
                x.attempt.to_string(),
                x.worker_id.clone().unwrap_or_else(|| "-".into()),
                x.reason.clone(),
            ]);
        }
        r.print();
    }
    Ok(EXIT_OK)
}

/// Applies one operator action and prints the task's new state.
async fn act(uuid: String, action: OperatorAction, who: Who, db: TaskTarget) -> CliResult {
    let backend = db.open(false).await?;
    let state = backend
        .act(&uuid, &action, &who.actor(), &who.reason)
        .await?;
    match db.format {
        Format::Json => {
            let task = backend.get_task(&uuid).await?;
            let mut v = serde_json::to_value(&task).map_err(|e| CliError::failed(e.to_string()))?;
            v["action"] = serde_json::to_value(&action).unwrap_or_default();
            print_json(&v)?;
        }
        Format::Table => {
            let colors = table::stdout_colors();
            outln!(
                "task {uuid}: {}",
                paint(state.as_str(), task_color(state), colors)
            );
            if let OperatorAction::ResetStep { step }
            | OperatorAction::ResolveStep { step }
            | OperatorAction::CompleteStep { step, .. } = &action
            {
                let task = backend.get_task(&uuid).await?;
                if let Some(s) = task
                    .steps
                    .iter()
                    .find(|s| &s.name == step || &s.uuid == step)
                {
                    outln!(
                        "step {}: {}",
                        s.name,
                        paint(s.state.as_str(), step_color(s.state), colors)
                    );
                }
            }
        }
    }
    Ok(EXIT_OK)
}
