//! # Tasker core
//!
//! A workflow orchestration engine: task templates declare a DAG of steps, the engine runs
//! them with retries, leases, timeouts and operator actions, persisting every state
//! transition. This crate is the engine; language bindings wrap it.
//!
//! ```no_run
//! use tasker_core::{Tasker, TaskRequest, StepOutcome, handler_fn};
//! use serde_json::json;
//!
//! # async fn demo() -> tasker_core::Result<()> {
//! let tasker = Tasker::open("sqlite::memory:").await?;
//! tasker.register_templates("templates/").await?;
//! tasker.register_handler("greet", handler_fn(|ctx| async move {
//!     let name = ctx.get_input("name").cloned().unwrap_or(json!("world"));
//!     StepOutcome::success(json!({ "greeting": format!("hello {}", name) }))
//! }));
//! let task = tasker
//!     .run_task(TaskRequest::new("demo", "hello", json!({"name": "Ada"})), None)
//!     .await?;
//! println!("{:?}: {:?}", task.status, task.results());
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

#[cfg(feature = "server")]
pub mod api;
pub mod auth;
pub mod batch;
#[cfg(feature = "cli")]
pub mod cli;
pub mod clock;
pub mod config;
pub mod dlq;
pub mod engine;
pub mod error;
pub mod events;
pub mod http_outcome;
pub mod job;
pub mod lifecycle;
pub mod metrics;
pub mod orchestrator;
pub mod state;
pub mod store;
pub mod task;
pub mod telemetry;
pub mod template;
pub mod visualize;
pub mod worker;
pub mod workflow;

pub use batch::{BatchAggregationScenario, BatchOutcome, BatchWorkerContext, CursorConfig};
pub use config::Config;
pub use dlq::{DlqEntry, DlqFilter, DlqReason, DlqResolution, DlqStats, LifecycleExceeded};
pub use engine::{DrainReport, OpenOptions, TaskHandle, Tasker};
pub use error::{Error, ErrorKind, Result};
pub use events::{DomainEvent, EventFilter, EventSubscriber, StoredEvent, subscriber_fn};
pub use job::{Checkpoint, ErrorType, StepFailure, StepHandlerResult, StepJob, StepOutcome};
pub use state::{StepState, TaskState};
pub use task::{Task, TaskFilter, TaskRequest, TaskSummary, Transition};
pub use worker::{StepContext, StepHandler, Worker, handler_fn};
