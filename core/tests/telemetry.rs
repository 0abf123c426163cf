//! The engine's tracing spans, seen through a capturing `tracing_subscriber` layer: handler
//! attempts (Rust handlers and dispatch-port jobs) carry the task's ids and their outcome,
//! what a handler logs is nested in its attempt's span, and task creation, result settling and
//! operator actions are spans with the task's uuid.
//!
//! The subscriber is process-global (the engine's tasks run on runtime threads), so each test
//! picks out its own task's spans by uuid.

mod common;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde_json::json;
use tasker_core::{StepOutcome, TaskRequest, TaskState, Tasker, handler_fn};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use common::{eventually, register};

/// A span as the layer saw it: name and fields (as text).
#[derive(Debug, Clone)]
struct Captured {
    name: String,
    fields: HashMap<String, String>,
}

impl Captured {
    fn get(&self, k: &str) -> &str {
        self.fields.get(k).map_or("", String::as_str)
    }
}

/// An event with the spans it was logged in, innermost first.
#[derive(Debug, Clone)]
struct CapturedEvent {
    fields: HashMap<String, String>,
    scope: Vec<Captured>,
}

#[derive(Default)]
struct Capture {
    closed: Mutex<Vec<Captured>>,
    events: Mutex<Vec<CapturedEvent>>,
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
}

struct CaptureLayer(&'static Capture);

impl<S> tracing_subscriber::Layer<S> for CaptureLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let span = ctx.span(id).unwrap();
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        span.extensions_mut().insert(Captured {
            name: span.name().to_string(),
            fields,
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).unwrap();
        if let Some(c) = span.extensions_mut().get_mut::<Captured>() {
            values.record(&mut Fields(&mut c.fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = HashMap::new();
        event.record(&mut Fields(&mut fields));
        let scope = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .filter_map(|s| s.extensions().get::<Captured>().cloned())
                    .collect()
            })
            .unwrap_or_default();
        self.0
            .events
            .lock()
            .unwrap()
            .push(CapturedEvent { fields, scope });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let span = ctx.span(&id).unwrap();
        if let Some(c) = span.extensions_mut().remove::<Captured>() {
            self.0.closed.lock().unwrap().push(c);
        }
    }
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::default());
        let subscriber = tracing_subscriber::registry()
            .with(CaptureLayer(capture))
            .with(tracing_subscriber::filter::LevelFilter::INFO);
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        capture
    })
}

/// The closed spans named `name` of task `task`.
fn closed(name: &str, task: &str) -> Vec<Captured> {
    capture()
        .closed
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.name == name && s.get("task_uuid") == task)
        .cloned()
        .collect()
}

/// Waits until `n` spans named `name` of `task` have closed (a span closes when the task that
/// ran it ends, which may be just after the task's state is visible).
async fn wait_closed(name: &str, task: &str, n: usize) -> Vec<Captured> {
    let (name, task) = (name.to_string(), task.to_string());
    eventually(|| {
        let (name, task) = (name.clone(), task.clone());
        async move {
            let spans = closed(&name, &task);
            (spans.len() >= n).then_some(spans)
        }
    })
    .await
}

const FLAKY: &str = r#"
name: flaky
namespace_name: telemetry
version: "1.0.0"
steps:
  - name: first
    handler: { callable: telemetry_log }
  - name: second
    handler: { callable: telemetry_flaky }
    dependencies: [first]
    retry: { max_attempts: 3, backoff: none }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_attempts_are_spans_with_the_task_ids_and_their_logs_inside() {
    capture();
    let tasker = Tasker::open("sqlite::memory:").await.unwrap();
    register(&tasker, FLAKY).await;
    tasker.register_handler(
        "telemetry_log",
        handler_fn(|ctx| async move {
            tracing::info!(marker = "inside-handler", "hello from {}", ctx.step_name());
            StepOutcome::success(json!({ "ok": true }))
        }),
    );
    tasker.register_handler(
        "telemetry_flaky",
        handler_fn(|ctx| async move {
            if ctx.attempts() == 1 {
                StepOutcome::retryable("the gateway is down")
            } else {
                StepOutcome::success(json!({ "ok": true }))
            }
        }),
    );
    let mut request = TaskRequest::new("telemetry", "flaky", json!({}));
    request.correlation_id = Some("corr-telemetry-1".into());
    let task = tasker
        .run_task(request, Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(task.status, TaskState::Complete, "{task:#?}");
    assert_eq!(task.correlation_id, "corr-telemetry-1");

    let steps = wait_closed("tasker.step", &task.uuid, 3).await;
    assert_eq!(steps.len(), 3, "{steps:#?}");
    let first = task.step("first").unwrap();
    let second = task.step("second").unwrap();
    let span = steps
        .iter()
        .find(|s| s.get("step_uuid") == first.uuid)
        .expect("a span for the first step");
    assert_eq!(span.get("step_name"), "first");
    assert_eq!(span.get("correlation_id"), "corr-telemetry-1");
    assert_eq!(span.get("namespace"), "telemetry");
    assert_eq!(span.get("task_name"), "flaky");
    assert_eq!(span.get("attempt"), "1");
    assert_eq!(span.get("callable"), "telemetry_log");
    assert_eq!(span.get("outcome"), "success");

    // One span per attempt of the flaky step, each with its own number and outcome.
    let mut attempts: Vec<_> = steps
        .iter()
        .filter(|s| s.get("step_uuid") == second.uuid)
        .map(|s| {
            (
                s.get("attempt").to_string(),
                s.get("outcome").to_string(),
                s.get("error_type").to_string(),
            )
        })
        .collect();
    attempts.sort();
    assert_eq!(
        attempts,
        vec![
            ("1".into(), "failure".into(), "retryable_error".into()),
            ("2".into(), "success".into(), String::new()),
        ]
    );

    // What the handler logged is inside its attempt's span, which carries the ids.
    let events = capture().events.lock().unwrap().clone();
    let logged = events
        .iter()
        .find(|e| {
            e.fields.get("marker").map(String::as_str) == Some("inside-handler")
                && e.scope
                    .first()
                    .is_some_and(|s| s.get("task_uuid") == task.uuid)
        })
        .expect("the handler's log line, inside its step span");
    assert_eq!(logged.fields["message"], "hello from first");
    let inner = &logged.scope[0];
    assert_eq!(inner.name, "tasker.step");
    assert_eq!(inner.get("step_uuid"), first.uuid);
    assert_eq!(inner.get("correlation_id"), "corr-telemetry-1");
    assert_eq!(inner.get("attempt"), "1");

    // Creation and settling are spans of the task too.
    let created = wait_closed("tasker.task.create", &task.uuid, 1).await;
    assert_eq!(created[0].get("correlation_id"), "corr-telemetry-1");
    assert_eq!(created[0].get("replayed"), "false");
    let results = wait_closed("tasker.step.result", &task.uuid, 3).await;
    let last = results
        .iter()
        .find(|r| r.get("step_uuid") == second.uuid && r.get("attempt") == "2")
        .expect("the second attempt's result being applied");
    assert_eq!(last.get("resolution"), "succeeded");
    assert_eq!(last.get("completion"), "accepted");
    assert_eq!(last.get("task_state"), "complete");
    let retried = results
        .iter()
        .find(|r| r.get("step_uuid") == second.uuid && r.get("attempt") == "1")
        .expect("the first attempt's result being applied");
    assert_eq!(retried.get("resolution"), "retry");
    assert_eq!(retried.get("error_type"), "retryable_error");
    tasker.close();
}

const FOREIGN: &str = r#"
name: foreign
namespace_name: telemetry
version: "1.0.0"
steps:
  - name: only
    handler: { callable: telemetry_foreign }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_port_jobs_are_spans_from_claim_to_completion() {
    capture();
    let tasker = Tasker::open("sqlite::memory:").await.unwrap();
    register(&tasker, FOREIGN).await;
    let worker = tasker.worker(vec!["telemetry".into()], vec!["telemetry_foreign".into()]);
    let handle = tasker
        .create_task(TaskRequest::new("telemetry", "foreign", json!({})))
        .await
        .unwrap();
    let job = worker
        .next_step_async(Duration::from_secs(10))
        .await
        .unwrap()
        .expect("a job");
    assert_eq!(job.task_uuid, handle.uuid);
    // A host enters the job's span around its handler, so its log lines carry the ids.
    worker
        .span(&job)
        .in_scope(|| tracing::info!(marker = "inside-foreign", "charging"));
    assert!(
        closed("tasker.step", &handle.uuid).is_empty(),
        "the span stays open until the job is completed"
    );
    let completion = worker
        .complete_async(&job, StepOutcome::permanent("card declined"))
        .await
        .unwrap();
    assert_eq!(completion, tasker_core::store::Completion::Accepted);
    let spans = wait_closed("tasker.step", &handle.uuid, 1).await;
    let span = &spans[0];
    assert_eq!(span.get("step_uuid"), job.step_uuid);
    assert_eq!(span.get("correlation_id"), job.correlation_id);
    assert_eq!(span.get("attempt"), "1");
    assert_eq!(span.get("outcome"), "failure");
    assert_eq!(span.get("error_type"), "permanent_error");
    assert_eq!(span.get("retryable"), "false");
    assert_eq!(span.get("completion"), "accepted");
    let events = capture().events.lock().unwrap().clone();
    let logged = events
        .iter()
        .find(|e| e.fields.get("marker").map(String::as_str) == Some("inside-foreign"))
        .expect("the host's log line");
    assert_eq!(logged.scope[0].get("step_uuid"), job.step_uuid);
    // The job is done: its span is gone from the worker.
    assert!(worker.span(&job).is_disabled());

    // The step failed for good: an operator gives up, in a span of the task.
    let task = handle.wait(Some(Duration::from_secs(10))).await.unwrap();
    assert_eq!(task.status, TaskState::BlockedByFailures);
    tasker.give_up(&handle.uuid, "declined").await.unwrap();
    let ops = wait_closed("tasker.operator", &handle.uuid, 1).await;
    assert_eq!(ops[0].get("action"), "give_up");
    assert_eq!(ops[0].get("task_state"), "error");
    tasker.close();
}

#[cfg(feature = "server")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_requests_are_spans_with_route_status_and_request_id() {
    use tasker_core::api::client::Client;
    use tasker_core::api::{ApiOptions, AuthMode, router};
    capture();
    let tasker = Tasker::open("sqlite::memory:").await.unwrap();
    register(&tasker, FOREIGN).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let options = ApiOptions {
        auth: AuthMode::Disabled,
        ..ApiOptions::default()
    };
    let app = router(tasker.clone(), options);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = Client::new(&base, None).unwrap();
    let body = json!({"namespace": "telemetry", "name": "foreign", "context": {}});
    let created = client
        .send(
            "POST",
            "/v1/tasks",
            Some(("application/json", serde_json::to_vec(&body).unwrap())),
            None,
        )
        .await
        .unwrap();
    assert!(created.status < 300, "{}", created.text());
    let uuid = created.json().unwrap()["task_uuid"]
        .as_str()
        .expect("task_uuid")
        .to_string();
    let got = client
        .send("GET", &format!("/v1/tasks/{uuid}"), None, None)
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    let request_id = got.header("x-request-id").unwrap().to_string();
    let span = eventually(|| {
        let request_id = request_id.clone();
        async move {
            capture()
                .closed
                .lock()
                .unwrap()
                .iter()
                .find(|s| s.name == "tasker.request" && s.get("request_id") == request_id)
                .cloned()
        }
    })
    .await;
    assert_eq!(span.get("method"), "GET");
    assert_eq!(span.get("route"), "/v1/tasks/{uuid}");
    assert_eq!(span.get("path"), format!("/v1/tasks/{uuid}"));
    assert_eq!(span.get("status"), "200");
    // The task created over REST has its creation span, with the task's ids.
    let create = wait_closed("tasker.task.create", &uuid, 1).await;
    assert_eq!(create[0].get("namespace"), "telemetry");
    assert!(!create[0].get("correlation_id").is_empty());
    tasker.close();
}
