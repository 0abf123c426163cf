//! Where `tasker-ctl task ...` acts: straight on a database, or through a Tasker server's
//! REST API. Both answer with the same types, so every command prints the same either way.
//!
//! The target is, in order: `--url [URL]` (a server; without a value
//! `http://127.0.0.1:8080`), `--db PATH`, the `TASKER_URL` variable, the default database
//! `./tasker.db` when it exists, and otherwise the default server.

use std::path::Path;

use clap::Args;
use serde_json::{Value, json};

use super::{CliError, CliResult, DEFAULT_DB, DbTarget, Format, open_failed, open_operator};
use crate::api::client::{Client, query, segment};
use crate::state::TaskState;
use crate::store::{OperatorAction, RejectedCompletion};
use crate::task::{Task, TaskFilter, TaskRequest, TaskSummary, Transition};
use crate::{OpenOptions, Tasker};

/// The server `--url` names when given without a value.
pub(crate) const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// Options of every `task` command that reads or acts: where, and how to print.
#[derive(Debug, Clone, Args)]
pub(crate) struct TaskTarget {
    /// Act straight on this database: `sqlite:PATH`, `sqlite::memory:` or a file path
    /// (default ./tasker.db when it exists and no server is named).
    #[arg(long, value_name = "PATH", conflicts_with = "url")]
    db: Option<String>,
    /// Act through this Tasker server (without a value: http://127.0.0.1:8080; default from
    /// TASKER_URL, else the server when ./tasker.db does not exist).
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = DEFAULT_URL)]
    url: Option<String>,
    /// API key for the server (default: the TASKER_API_KEY variable).
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub(crate) format: Format,
}

/// A database or a server.
pub(crate) enum Backend {
    /// An operator handle on a database.
    Db(Tasker),
    /// A server.
    Api(Client),
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl TaskTarget {
    /// Connects to the target. `create_db`: a database that does not exist yet may be
    /// created (only `task create` does that: it is how a task gets into a fresh one).
    pub(crate) async fn open(&self, create_db: bool) -> CliResult<Backend> {
        let url = match (&self.url, &self.db) {
            (Some(u), _) => Some(u.clone()),
            (None, Some(_)) => None,
            (None, None) => env("TASKER_URL")
                .or_else(|| (!Path::new(DEFAULT_DB).exists()).then(|| DEFAULT_URL.to_string())),
        };
        if let Some(url) = url {
            let key = self.api_key.clone().or_else(|| env("TASKER_API_KEY"));
            return Client::new(&url, key)
                .map(Backend::Api)
                .map_err(|e| CliError::usage(format!("--url: {}", e.message)));
        }
        let db = self.db.clone().unwrap_or_else(|| DEFAULT_DB.to_string());
        if create_db {
            let options = OpenOptions {
                config: super::config()?,
                background: false,
                ..OpenOptions::default()
            };
            return Tasker::open_with(&db, options)
                .await
                .map(Backend::Db)
                .map_err(|e| open_failed(&db, e));
        }
        let target = DbTarget { db, url: None };
        Ok(Backend::Db(open_operator(&target).await?))
    }
}

fn decode<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> CliResult<T> {
    serde_json::from_value(v)
        .map_err(|e| CliError::failed(format!("the server sent an unexpected {what}: {e}")))
}

fn task_path(uuid: &str) -> String {
    format!("/v1/tasks/{}", segment(uuid))
}

impl Backend {
    /// Registers the templates at `path` (a file or a directory).
    pub(crate) async fn register_templates(&self, path: &Path) -> CliResult<()> {
        match self {
            Backend::Db(t) => {
                t.register_templates(path).await?;
            }
            Backend::Api(c) => {
                let files = crate::template::collect_yaml_files(path).map_err(|e| {
                    CliError::usage(format!("cannot read templates at {}: {e}", path.display()))
                })?;
                for f in files {
                    let yaml = std::fs::read_to_string(&f).map_err(|e| {
                        CliError::usage(format!("cannot read {}: {e}", f.display()))
                    })?;
                    c.call("POST", "/v1/templates", Some(&json!({ "yaml": yaml })))
                        .await
                        .map_err(|e| {
                            let mut e = CliError::from(e);
                            e.message = format!("{}: {}", f.display(), e.message);
                            e
                        })?;
                }
            }
        }
        Ok(())
    }

    /// Creates a task; returns its uuid and whether it existed already.
    pub(crate) async fn create(&self, request: TaskRequest) -> CliResult<(String, bool)> {
        match self {
            Backend::Db(t) => {
                let h = t.create_task(request).await?;
                Ok((h.uuid, h.replayed))
            }
            Backend::Api(c) => {
                let body =
                    serde_json::to_value(&request).map_err(|e| CliError::failed(e.to_string()))?;
                let r = c
                    .send(
                        "POST",
                        "/v1/tasks",
                        Some(("application/json", body.to_string().into_bytes())),
                        None,
                    )
                    .await?;
                match r.status {
                    200 | 201 => {
                        let v = r.json()?;
                        let uuid = v["task_uuid"].as_str().unwrap_or_default().to_string();
                        Ok((uuid, r.status == 200))
                    }
                    // A strict duplicate: the same task, as a database target reports it.
                    409 => {
                        let e = r.error();
                        match e.details.as_ref().and_then(|d| d["task_uuid"].as_str()) {
                            Some(uuid) => Ok((uuid.to_string(), true)),
                            None => Err(e.into()),
                        }
                    }
                    _ => Err(r.error().into()),
                }
            }
        }
    }

    /// A task with its steps.
    pub(crate) async fn get_task(&self, uuid: &str) -> CliResult<Task> {
        match self {
            Backend::Db(t) => Ok(t.get_task(uuid).await?),
            Backend::Api(c) => decode(c.call("GET", &task_path(uuid), None).await?, "task"),
        }
    }

    /// Tasks matching `filter`, newest first.
    pub(crate) async fn list_tasks(&self, filter: &TaskFilter) -> CliResult<Vec<TaskSummary>> {
        match self {
            Backend::Db(t) => Ok(t.list_tasks(filter).await?),
            Backend::Api(c) => {
                let q = query([
                    ("namespace", filter.namespace.clone()),
                    ("name", filter.name.clone()),
                    ("status", filter.status.map(|s| s.as_str().to_string())),
                    ("limit", filter.limit.map(|l| l.clamp(1, 1000).to_string())),
                ]);
                let v = c.call("GET", &format!("/v1/tasks{q}"), None).await?;
                decode(v["tasks"].clone(), "task list")
            }
        }
    }

    /// Step transitions (one step's when `step` is given) and refused late completions.
    pub(crate) async fn audit(
        &self,
        uuid: &str,
        step: Option<&str>,
    ) -> CliResult<(Vec<Transition>, Vec<RejectedCompletion>)> {
        match self {
            Backend::Db(t) => {
                let task = t.get_task(uuid).await?;
                let transitions = t.step_transitions(uuid, step).await?;
                let step_uuid = step.and_then(|s| {
                    task.steps
                        .iter()
                        .find(|v| v.name == s || v.uuid == s)
                        .map(|v| v.uuid.clone())
                });
                let rejected = t
                    .store()
                    .rejected_completions(uuid)
                    .await?
                    .into_iter()
                    .filter(|r| step_uuid.as_ref().is_none_or(|s| s == &r.step_uuid))
                    .collect();
                Ok((transitions, rejected))
            }
            Backend::Api(c) => {
                let (v, key) = match step {
                    Some(s) => (
                        c.call(
                            "GET",
                            &format!("{}/workflow_steps/{}/audit", task_path(uuid), segment(s)),
                            None,
                        )
                        .await?,
                        "transitions",
                    ),
                    None => (
                        c.call(
                            "GET",
                            &format!("{}/transitions?include_steps=true", task_path(uuid)),
                            None,
                        )
                        .await?,
                        "step_transitions",
                    ),
                };
                Ok((
                    decode(v[key].clone(), "transition list")?,
                    decode(
                        v["rejected_completions"].clone(),
                        "rejected completion list",
                    )?,
                ))
            }
        }
    }

    /// Applies an operator action; returns the task's new state.
    pub(crate) async fn act(
        &self,
        uuid: &str,
        action: &OperatorAction,
        actor: &str,
        reason: &str,
    ) -> CliResult<TaskState> {
        let c = match self {
            Backend::Db(t) => return Ok(t.operator(uuid, action.clone(), actor, reason).await?),
            Backend::Api(c) => c,
        };
        let who = json!({"reason": reason, "by": actor});
        let step_action = |action_type: &str, step: &str, extra: Option<&Value>| {
            let mut body = who.clone();
            body["action_type"] = json!(action_type);
            if let Some(result) = extra {
                body["result"] = result.clone();
            }
            (
                format!("{}/workflow_steps/{}", task_path(uuid), segment(step)),
                body,
            )
        };
        let (method, path, body) = match action {
            OperatorAction::Cancel => {
                let q = query([
                    ("reason", Some(reason.to_string())),
                    ("by", Some(actor.to_string())),
                ]);
                ("DELETE", format!("{}{q}", task_path(uuid)), None)
            }
            OperatorAction::GiveUp | OperatorAction::ResolveManually => {
                let mut body = who.clone();
                body["action_type"] = json!(if *action == OperatorAction::GiveUp {
                    "give_up"
                } else {
                    "resolve_manually"
                });
                ("PATCH", task_path(uuid), Some(body))
            }
            OperatorAction::ResetStep { step } => {
                let (p, b) = step_action("reset_for_retry", step, None);
                ("PATCH", p, Some(b))
            }
            OperatorAction::ResolveStep { step } => {
                let (p, b) = step_action("resolve_manually", step, None);
                ("PATCH", p, Some(b))
            }
            OperatorAction::CompleteStep { step, result } => {
                let (p, b) = step_action("complete_manually", step, Some(result));
                ("PATCH", p, Some(b))
            }
        };
        let v = c.call(method, &path, body.as_ref()).await?;
        let status = v.get("task_status").or_else(|| v.get("status"));
        decode(status.cloned().unwrap_or(Value::Null), "task state")
    }
}
