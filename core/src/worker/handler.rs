//! The Rust handler API: the [`StepHandler`] trait, the [`StepContext`] a handler reads, and
//! closures as handlers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::job::{Checkpoint, StepHandlerResult, StepJob};

/// User code that runs one step.
#[async_trait]
pub trait StepHandler: Send + Sync + 'static {
    /// Runs one attempt. Returning a failure (or panicking) fails the attempt; the retry
    /// policy decides what happens next.
    async fn call(&self, ctx: &StepContext) -> StepHandlerResult;
}

/// A closure-backed handler (see [`handler_fn`]).
pub struct FnHandler<F>(F);

/// Wraps an async closure `|ctx: StepContext| async move { ... }` as a handler.
pub fn handler_fn<F, Fut>(f: F) -> Arc<dyn StepHandler>
where
    F: Fn(StepContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = StepHandlerResult> + Send + 'static,
{
    Arc::new(FnHandler(
        move |ctx: StepContext| -> Pin<Box<dyn Future<Output = StepHandlerResult> + Send>> {
            Box::pin(f(ctx))
        },
    ))
}

#[async_trait]
impl<F> StepHandler for FnHandler<F>
where
    F: Fn(StepContext) -> Pin<Box<dyn Future<Output = StepHandlerResult> + Send>>
        + Send
        + Sync
        + 'static,
{
    async fn call(&self, ctx: &StepContext) -> StepHandlerResult {
        (self.0)(ctx.clone()).await
    }
}

/// What a handler sees of its step (SPEC §5.3). Cheap to clone.
#[derive(Debug, Clone)]
pub struct StepContext {
    job: Arc<StepJob>,
}

impl StepContext {
    /// A context for `job`.
    pub fn new(job: StepJob) -> Self {
        StepContext { job: Arc::new(job) }
    }

    /// The underlying job.
    pub fn job(&self) -> &StepJob {
        &self.job
    }

    /// The task's id.
    pub fn task_uuid(&self) -> &str {
        &self.job.task_uuid
    }

    /// The step's id.
    pub fn step_uuid(&self) -> &str {
        &self.job.step_uuid
    }

    /// The step's name.
    pub fn step_name(&self) -> &str {
        &self.job.step_name
    }

    /// The task's correlation id.
    pub fn correlation_id(&self) -> &str {
        &self.job.correlation_id
    }

    /// Task namespace.
    pub fn namespace(&self) -> &str {
        &self.job.namespace
    }

    /// Task (template) name.
    pub fn task_name(&self) -> &str {
        &self.job.task_name
    }

    /// Template version.
    pub fn task_version(&self) -> &str {
        &self.job.task_version
    }

    /// The whole task context.
    pub fn input_data(&self) -> &Value {
        &self.job.context
    }

    /// One top-level field of the task context.
    pub fn get_input(&self, key: &str) -> Option<&Value> {
        self.job.context.get(key)
    }

    /// A context field deserialized into `T`; `None` when absent or of another shape.
    pub fn get_input_as<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.get_input(key)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    /// The step's `handler.initialization`.
    pub fn step_config(&self) -> &Map<String, Value> {
        &self.job.definition.handler.initialization
    }

    /// One `handler.initialization` entry.
    pub fn get_config(&self, key: &str) -> Option<&Value> {
        self.job.definition.handler.initialization.get(key)
    }

    /// Step inputs (batch cursor etc.).
    pub fn inputs(&self) -> &Map<String, Value> {
        &self.job.inputs
    }

    /// Results of every completed ancestor, by step name.
    pub fn dependency_results(&self) -> &Map<String, Value> {
        &self.job.dependency_results
    }

    /// For a convergence step: errors of direct parents that failed for good and still let
    /// it run (batch workers under `failure_strategy: isolate`), by step name.
    pub fn failed_dependencies(&self) -> &Map<String, Value> {
        &self.job.failed_dependencies
    }

    /// This batch worker's batch (cursor, metadata, last checkpoint); `None` for other steps.
    pub fn batch(&self) -> Option<crate::batch::BatchWorkerContext> {
        crate::batch::BatchWorkerContext::from_job(&self.job)
    }

    /// The result of ancestor `step`, as its handler returned it.
    pub fn get_dependency_result(&self, step: &str) -> Option<&Value> {
        self.job.dependency_results.get(step)
    }

    /// A field inside an ancestor's result, by a path of keys / array indices.
    pub fn get_dependency_field(&self, step: &str, path: &[&str]) -> Option<&Value> {
        let mut v = self.get_dependency_result(step)?;
        for p in path {
            v = match v {
                Value::Array(a) => a.get(p.parse::<usize>().ok()?)?,
                other => other.get(*p)?,
            };
        }
        Some(v)
    }

    /// Results of every ancestor whose name starts with `prefix`, sorted by step name.
    pub fn get_all_dependency_results(&self, prefix: &str) -> Vec<(&str, &Value)> {
        self.job
            .dependency_results
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.as_str(), v))
            .collect()
    }

    /// This attempt's number, starting at 1.
    pub fn attempts(&self) -> u32 {
        self.job.attempt
    }

    /// Attempts allowed.
    pub fn max_attempts(&self) -> u32 {
        self.job.max_attempts()
    }

    /// True from the second attempt on.
    pub fn is_retry(&self) -> bool {
        self.job.attempt > 1
    }

    /// True on the last allowed attempt.
    pub fn is_last_retry(&self) -> bool {
        self.job.attempt >= self.job.max_attempts()
    }

    /// The last stored checkpoint.
    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        self.job.checkpoint.as_ref()
    }

    /// The cursor of the last checkpoint.
    pub fn checkpoint_cursor(&self) -> Option<&Value> {
        self.job.checkpoint.as_ref().map(|c| &c.cursor)
    }

    /// Whether a checkpoint exists.
    pub fn has_checkpoint(&self) -> bool {
        self.job.checkpoint.is_some()
    }
}
