//! Workflow steps (SPEC §8): a step that runs a whole child task of another template. No
//! handler runs them; the engine does:
//!
//! 1. It claims an enqueued `workflow` step (the claim of every handler leaves these out),
//!    builds the child's request from `handler.initialization` and creates the child, linked
//!    to the step and carrying the parent's correlation id. The child's idempotency key is the
//!    step's id, so a retried or re-claimed step attaches to the child it already started.
//! 2. Once the child exists the core holds the step's lease until the child ends; the step
//!    stays `in_progress`. A process that dies before that point lets the lease expire, and
//!    the retry attaches to the same child.
//! 3. When the child ends, the step finishes: `complete` / `resolved_manually` ⇒ success with
//!    `{child_task_uuid, child_status, results}`; `error` / `cancelled` ⇒ a permanent
//!    `workflow_error` with the child's reason. A child in `blocked_by_failures` is not over:
//!    the step keeps waiting for an operator (or the child's lifecycle limit).
//! 4. A child still running when its parent step was cancelled or its parent task ended is
//!    cancelled. (Cancelling the parent task cancels its children in the same transaction;
//!    this catches the other ways a parent ends.)

use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::clock::Millis;
use crate::engine::Inner;
use crate::job::{ErrorType, StepFailure, StepJob};
use crate::orchestrator::{check_result, decide_failure};
use crate::state::{StepState, TaskState};
use crate::store::{
    AttemptResult, CallableFilter, ChildTask, ClaimRequest, Created, OperatorAction, ParentLink,
    Resolution,
};
use crate::task::{Task, TaskRequest};
use crate::{ErrorKind, Result};

/// The worker id the engine claims workflow steps under. Any engine process may finish them.
pub(crate) const WORKFLOW_WORKER: &str = "tasker-workflow";

/// How long the core holds a workflow step whose child exists: in effect, until the child ends
/// (100 years). A `timeout_seconds` on the step still bounds the wait.
const HELD_MS: Millis = 100 * 365 * 24 * 3600 * 1000;

/// What a workflow step's `handler.initialization` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildSpec {
    /// The child's template name (`task_template`).
    pub task_template: String,
    /// Its namespace (default: the parent's).
    pub namespace: String,
    /// Its version (default: the newest).
    pub version: Option<String>,
    /// The child's context: the parent's context merged with the `context` mapping.
    pub context: Value,
}

/// Reads a workflow step's `initialization` and builds the child's context from the parent's
/// context and the results of the step's ancestors. Errors name the field or reference that
/// is wrong.
pub fn child_spec(
    initialization: &Map<String, Value>,
    parent_namespace: &str,
    parent_context: &Value,
    results: &Map<String, Value>,
) -> std::result::Result<ChildSpec, String> {
    let text = |key: &str| -> std::result::Result<Option<String>, String> {
        match initialization.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(other) => Err(format!(
                "handler.initialization.{key} must be a non-empty string, got {}",
                crate::orchestrator::json_kind(other)
            )),
        }
    };
    let task_template =
        text("task_template")?.ok_or("handler.initialization.task_template names no template")?;
    let namespace = text("namespace")?.unwrap_or_else(|| parent_namespace.to_string());
    let version = text("version")?;
    let mut context = match parent_context {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    match initialization.get("context") {
        None | Some(Value::Null) => {}
        Some(Value::Object(mapping)) => {
            for (key, value) in mapping {
                let resolved = resolve(value, parent_context, results)
                    .map_err(|e| format!("handler.initialization.context.{key}: {e}"))?;
                context.insert(key.clone(), resolved);
            }
        }
        Some(other) => {
            return Err(format!(
                "handler.initialization.context must be a mapping, got {}",
                crate::orchestrator::json_kind(other)
            ));
        }
    }
    Ok(ChildSpec {
        task_template,
        namespace,
        version,
        context: Value::Object(context),
    })
}

/// Replaces every string `$context/<pointer>` or `$results/<step>/<pointer>` inside `value`
/// (at any depth) by the value it points at.
fn resolve(
    value: &Value,
    context: &Value,
    results: &Map<String, Value>,
) -> std::result::Result<Value, String> {
    match value {
        Value::String(s) => {
            if let Some(ptr) = s.strip_prefix("$context") {
                return lookup(context, ptr, s, "the parent's context");
            }
            if let Some(rest) = s.strip_prefix("$results/") {
                let (step, ptr) = match rest.find('/') {
                    Some(i) => (&rest[..i], &rest[i..]),
                    None => (rest, ""),
                };
                let Some(result) = results.get(step) else {
                    return Err(format!(
                        "{s:?} names step `{step}`, which is not a completed ancestor of this \
                         step (only the results of the steps it depends on, directly or not, \
                         can be mapped)"
                    ));
                };
                return lookup(result, ptr, s, &format!("the result of `{step}`"));
            }
            Ok(value.clone())
        }
        Value::Array(items) => items
            .iter()
            .map(|v| resolve(v, context, results))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(Value::Array),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| Ok((k.clone(), resolve(v, context, results)?)))
            .collect::<std::result::Result<Map<_, _>, String>>()
            .map(Value::Object),
        _ => Ok(value.clone()),
    }
}

fn lookup(
    root: &Value,
    ptr: &str,
    reference: &str,
    what: &str,
) -> std::result::Result<Value, String> {
    if !ptr.is_empty() && !ptr.starts_with('/') {
        return Err(format!(
            "{reference:?} is not a reference: expected `$context/<json-pointer>` or \
             `$results/<step>/<json-pointer>`"
        ));
    }
    root.pointer(ptr)
        .cloned()
        .ok_or_else(|| format!("{reference:?}: {what} has nothing at {ptr:?}"))
}

/// The step result for a child that ended `complete` or `resolved_manually`.
pub fn child_result(child: &Task) -> Value {
    json!({
        "child_task_uuid": child.uuid,
        "child_status": child.status,
        "results": child.results(),
    })
}

/// The failure for a child that ended `error` or `cancelled`: permanent, with the child's
/// reason and its failed steps.
pub fn child_failure(child: &Task, reason: Option<&str>) -> StepFailure {
    let failed: Map<String, Value> = child
        .steps
        .iter()
        .filter(|s| s.state == StepState::Error)
        .filter_map(|s| {
            Some((
                s.name.clone(),
                serde_json::to_value(s.error.as_ref()?).ok()?,
            ))
        })
        .collect();
    let mut message = format!(
        "child task {} ({}/{} {}) ended {}",
        child.uuid, child.namespace, child.name, child.version, child.status
    );
    if let Some(r) = reason {
        message.push_str(": ");
        message.push_str(r);
    }
    if !failed.is_empty() {
        let names: Vec<&str> = failed.keys().map(String::as_str).collect();
        message.push_str(&format!("; failed steps: {}", names.join(", ")));
    }
    let mut f = StepFailure::new(ErrorType::WorkflowError, message);
    f.retryable = false;
    f.metadata = json!({
        "child_task_uuid": child.uuid,
        "child_status": child.status,
        "failed_steps": failed,
    });
    f
}

/// How deep workflow steps may nest: a template that (through others) starts itself would
/// otherwise create tasks until someone cancels the first.
pub const MAX_WORKFLOW_DEPTH: usize = 16;

/// How many workflow steps above `task_uuid` started it and its ancestors.
async fn nesting_depth(inner: &Inner, task_uuid: &str) -> Result<usize> {
    let mut depth = 0;
    let mut current = inner.store.get_task(task_uuid).await?;
    while let Some(parent) = current.parent.take() {
        depth += 1;
        if depth > MAX_WORKFLOW_DEPTH {
            break;
        }
        current = inner.store.get_task(&parent.task_uuid).await?;
    }
    Ok(depth)
}

/// Starts (or re-attaches to) the child of a claimed workflow step.
async fn start_child(inner: &Inner, job: &StepJob) -> std::result::Result<(), StepFailure> {
    let depth = nesting_depth(inner, &job.task_uuid).await.map_err(|e| {
        let mut f = StepFailure::new(
            ErrorType::WorkflowError,
            format!(
                "workflow step `{}`: cannot read its task's ancestry: {e}",
                job.step_name
            ),
        );
        f.retryable = e.kind.is_retryable();
        f
    })?;
    if depth >= MAX_WORKFLOW_DEPTH {
        return Err(permanent(format!(
            "workflow step `{}` would start a child {} levels deep; workflow steps nest at most \
             {MAX_WORKFLOW_DEPTH} levels (does a template start itself?)",
            job.step_name,
            depth + 1
        )));
    }
    let spec = child_spec(
        &job.definition.handler.initialization,
        &job.namespace,
        &job.context,
        &job.dependency_results,
    )
    .map_err(|m| permanent(format!("workflow step `{}`: {m}", job.step_name)))?;
    let mut request = TaskRequest::new(&spec.namespace, &spec.task_template, spec.context).origin(
        "tasker",
        "workflow_step",
        format!(
            "workflow step `{}` of task {} ({}/{})",
            job.step_name, job.task_uuid, job.namespace, job.task_name
        ),
    );
    request.version = spec.version;
    request.parent_correlation_id = Some(job.correlation_id.clone());
    request.idempotency_key = Some(format!("workflow_step:{}", job.step_uuid));
    let parent = ParentLink {
        task_uuid: job.task_uuid.clone(),
        step_uuid: job.step_uuid.clone(),
    };
    match inner.create_task(request, Some(parent)).await {
        Ok(Created::New(_)) | Ok(Created::Existing { .. }) => Ok(()),
        Err(e) => {
            let mut f = StepFailure::new(
                ErrorType::WorkflowError,
                format!(
                    "workflow step `{}` could not start a task of {}/{}: {}",
                    job.step_name, spec.namespace, spec.task_template, e.message
                ),
            );
            // A store outage may pass; a missing template or a context the child's
            // input_schema refuses will not.
            f.retryable = e.kind.is_retryable() || e.kind == ErrorKind::Shutdown;
            if let Some(d) = e.details {
                f.metadata = d;
            }
            Err(f)
        }
    }
}

fn permanent(message: String) -> StepFailure {
    let mut f = StepFailure::new(ErrorType::WorkflowError, message);
    f.retryable = false;
    f
}

/// What to do for one [`ChildTask`].
async fn settle_child(inner: &Inner, c: &ChildTask, now: Millis) -> Result<Option<AttemptResult>> {
    if c.parent_step_state != StepState::InProgress || !c.child_state.is_terminal() {
        // The parent no longer waits for a child that still runs.
        let why = if c.parent_task_state.is_terminal() {
            format!(
                "its parent task {} ended {}",
                c.parent_task_uuid, c.parent_task_state
            )
        } else {
            format!(
                "its parent step {} of task {} is {}",
                c.parent_step_uuid, c.parent_task_uuid, c.parent_step_state
            )
        };
        match inner
            .store
            .operator_action(
                &c.child_task_uuid,
                &OperatorAction::Cancel,
                WORKFLOW_WORKER,
                &why,
                now,
            )
            .await
        {
            Ok(state) => inner.after_change(&[(c.child_task_uuid.clone(), state)], false),
            // It ended meanwhile: nothing to cancel.
            Err(e) if e.kind == ErrorKind::InvalidTransition => {}
            Err(e) => return Err(e),
        }
        return Ok(None);
    }
    let child = inner.store.get_task(&c.child_task_uuid).await?;
    let resolution = match c.child_state {
        TaskState::Complete | TaskState::ResolvedManually => {
            let result = child_result(&child);
            match check_result(&result, None, inner.config.max_payload_bytes) {
                Ok(()) => Resolution::Succeeded {
                    result,
                    metadata: Value::Null,
                },
                Err(f) => Resolution::Failed { failure: *f },
            }
        }
        _ => {
            let reason = inner
                .store
                .task_transitions(&c.child_task_uuid)
                .await?
                .pop()
                .and_then(|t| t.reason);
            Resolution::Failed {
                failure: child_failure(&child, reason.as_deref()),
            }
        }
    };
    Ok(Some(AttemptResult {
        step_uuid: c.parent_step_uuid.clone(),
        attempt: c.parent_attempt,
        worker_id: Some(WORKFLOW_WORKER.to_string()),
        expiry: None,
        resolution,
        started_at: None,
        expansion: None,
    }))
}

/// One pass: start the children of newly enqueued workflow steps, finish the steps whose
/// children ended, cancel children nobody waits for. Returns true when a batch was full (more
/// may be waiting).
pub(crate) async fn workflow_pass(inner: &Arc<Inner>) -> Result<bool> {
    let now = inner.clock.now();
    let limit = inner.config.claim_batch;
    let req = ClaimRequest {
        worker_id: WORKFLOW_WORKER.to_string(),
        namespaces: Vec::new(),
        callables: CallableFilter::Workflows,
        limit,
        lease_ms: inner.config.lease.as_millis() as i64,
        default_timeout_ms: HELD_MS,
        enqueued_before: None,
    };
    let jobs = inner.store.claim(&req, now).await?;
    let mut more = jobs.len() >= limit;
    let mut results = Vec::new();
    let mut held = Vec::new();
    for job in &jobs {
        match start_child(inner, job).await {
            Ok(()) => held.push((job.step_uuid.clone(), job.attempt)),
            Err(failure) => results.push(AttemptResult {
                step_uuid: job.step_uuid.clone(),
                attempt: job.attempt,
                worker_id: Some(WORKFLOW_WORKER.to_string()),
                expiry: None,
                resolution: decide_failure(
                    &job.definition.retry,
                    job.attempt,
                    failure,
                    now,
                    fastrand::f64(),
                ),
                started_at: None,
                expansion: None,
            }),
        }
    }
    if !held.is_empty() {
        let now = inner.clock.now();
        inner
            .store
            .renew_leases(WORKFLOW_WORKER, &held, now + HELD_MS, now)
            .await?;
    }
    let children = inner.store.workflow_children(limit).await?;
    more |= children.len() >= limit;
    for c in &children {
        if let Some(r) = settle_child(inner, c, inner.clock.now()).await? {
            results.push(r);
        }
    }
    if !results.is_empty() {
        inner.finish_and_announce(&results).await?;
    }
    Ok(more)
}

/// Runs [`workflow_pass`] whenever tasks change (once this process has seen a template with a
/// workflow step) and on the polling cadence (for tasks other processes created).
pub(crate) async fn workflow_loop(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let more = match workflow_pass(&inner).await {
            Ok(more) => more,
            Err(e) => {
                tracing::error!("running workflow steps failed: {e}");
                false
            }
        };
        if more {
            continue;
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            _ = inner.workflows.notified() => {}
            _ = tokio::time::sleep(inner.config.poll_interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn the_child_context_is_the_parents_merged_with_the_mapping() {
        let parent = json!({"order": {"id": 7, "lines": [1, 2]}, "region": "eu"});
        let results = init(json!({"price": {"total": 12.5, "currency": "EUR"}}));
        let spec = child_spec(
            &init(json!({
                "task_template": "ship",
                "version": "2.0.0",
                "context": {
                    "order_id": "$context/order/id",
                    "first_line": "$context/order/lines/0",
                    "total": "$results/price/total",
                    "price": "$results/price",
                    "nested": {"all": ["$context", "literal"]},
                    "region": "us",
                    "note": "plain $text is kept",
                }
            })),
            "shop",
            &parent,
            &results,
        )
        .unwrap();
        assert_eq!(spec.task_template, "ship");
        assert_eq!(spec.namespace, "shop");
        assert_eq!(spec.version.as_deref(), Some("2.0.0"));
        assert_eq!(spec.context["order"], parent["order"]);
        assert_eq!(spec.context["order_id"], json!(7));
        assert_eq!(spec.context["first_line"], json!(1));
        assert_eq!(spec.context["total"], json!(12.5));
        assert_eq!(spec.context["price"], results["price"]);
        assert_eq!(spec.context["nested"]["all"][0], parent);
        assert_eq!(spec.context["nested"]["all"][1], json!("literal"));
        // The mapping wins over the parent's key.
        assert_eq!(spec.context["region"], json!("us"));
        assert_eq!(spec.context["note"], json!("plain $text is kept"));
    }

    #[test]
    fn bad_initialization_and_references_are_named() {
        let parent = json!({"a": 1});
        let results = init(json!({"done": {"x": 1}}));
        let err = |i: Value| child_spec(&init(i), "ns", &parent, &results).unwrap_err();
        assert!(err(json!({})).contains("task_template"));
        assert!(err(json!({"task_template": 3})).contains("task_template must be a non-empty"));
        assert!(err(json!({"task_template": "c", "namespace": ""})).contains("namespace"));
        assert!(err(json!({"task_template": "c", "context": [1]})).contains("must be a mapping"));
        let e = err(json!({"task_template": "c", "context": {"k": "$context/missing"}}));
        assert!(e.contains("context.k") && e.contains("/missing"), "{e}");
        let e = err(json!({"task_template": "c", "context": {"k": "$results/later/x"}}));
        assert!(e.contains("`later`") && e.contains("ancestor"), "{e}");
        let e = err(json!({"task_template": "c", "context": {"k": "$results/done/y"}}));
        assert!(e.contains("result of `done`") && e.contains("/y"), "{e}");
        let e = err(json!({"task_template": "c", "context": {"k": "$contextual"}}));
        assert!(e.contains("not a reference"), "{e}");
    }
}
