//! The REST API end to end: a real server on 127.0.0.1:0 over an SQLite file, real HTTP
//! requests through the crate's client.

mod common;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tasker_core::api::client::{Client, Response};
use tasker_core::api::{ApiOptions, AuthMode, router};
use tasker_core::clock::TestClock;
use tasker_core::{Config, ErrorType, OpenOptions, StepOutcome, Tasker, handler_fn};
use tokio::sync::{Notify, Semaphore};

const PIPELINE: &str = r#"
name: pipeline
namespace_name: api_test
version: "1.0.0"
input_schema:
  type: object
  required: [x]
  properties: { x: { type: integer } }
steps:
  - name: first
    handler: { callable: double }
  - name: second
    handler: { callable: double }
    dependencies: [first]
"#;

const BROKEN: &str = r#"
name: broken
namespace_name: api_test
version: "1.0.0"
identity_strategy: always_unique
steps:
  - name: boom
    handler: { callable: fail }
  - name: after
    handler: { callable: double }
    dependencies: [boom]
"#;

const GATED: &str = r#"
name: gated
namespace_name: api_test
version: "1.0.0"
identity_strategy: always_unique
steps:
  - name: hold
    handler: { callable: gate }
"#;

const OVERDUE: &str = r#"
name: overdue
namespace_name: api_test
version: "1.0.0"
lifecycle: { max_waiting_for_retry_minutes: 5 }
steps:
  - name: call_partner
    handler: { callable: flaky }
    retry: { max_attempts: 5, backoff: linear, backoff_base_ms: 3600000, max_backoff_ms: 3600000, jitter: false }
"#;

struct Server {
    client: Client,
    tasker: Tasker,
    /// Permits released to the `gate` handler: each lets one attempt finish.
    gate: Arc<Semaphore>,
    /// Notified when a `gate` attempt has started.
    entered: Arc<Notify>,
    clock: TestClock,
    _dir: tempfile::TempDir,
}

async fn start(options: ApiOptions) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(1_700_000_000_000);
    let tasker = Tasker::open_with(
        &format!("sqlite:{}", dir.path().join("t.db").display()),
        OpenOptions {
            config: Config {
                poll_interval: Duration::from_millis(100),
                ..Config::default()
            },
            clock: Arc::new(clock.clone()),
            background: true,
        },
    )
    .await
    .unwrap();
    for t in [PIPELINE, BROKEN, GATED, OVERDUE] {
        common::register(&tasker, t).await;
    }
    tasker.register_handler(
        "double",
        handler_fn(|ctx| async move {
            let x = ctx
                .get_dependency_field("first", &["x"])
                .or_else(|| ctx.get_dependency_field("boom", &["x"]))
                .or_else(|| ctx.get_input("x"))
                .and_then(Value::as_i64)
                .unwrap_or(1);
            StepOutcome::success(json!({ "x": x * 2 }))
        }),
    );
    tasker.register_handler(
        "fail",
        handler_fn(|_| async { StepOutcome::failure("it broke", ErrorType::PermanentError) }),
    );
    tasker.register_handler(
        "flaky",
        handler_fn(|_| async { StepOutcome::retryable("partner API is down") }),
    );
    let gate = Arc::new(Semaphore::new(0));
    let entered = Arc::new(Notify::new());
    let (g, e) = (gate.clone(), entered.clone());
    tasker.register_handler(
        "gate",
        handler_fn(move |_| {
            let (g, e) = (g.clone(), e.clone());
            async move {
                e.notify_one();
                g.acquire().await.unwrap().forget();
                StepOutcome::success(json!({ "released": true }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(tasker.clone(), options);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server {
        client: Client::new(&base, None).unwrap(),
        tasker,
        gate,
        entered,
        clock,
        _dir: dir,
    }
}

async fn open_server() -> Server {
    start(ApiOptions {
        auth: AuthMode::Disabled,
        ..ApiOptions::default()
    })
    .await
}

impl Server {
    async fn req(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let r = self
            .raw(
                method,
                path,
                body.map(|b| b.to_string()),
                "application/json",
            )
            .await;
        let v = if r.body.is_empty() {
            Value::Null
        } else {
            r.json().unwrap()
        };
        (r.status, v)
    }

    async fn raw(&self, method: &str, path: &str, body: Option<String>, ct: &str) -> Response {
        self.client
            .send(method, path, body.map(|b| (ct, b.into_bytes())), None)
            .await
            .unwrap()
    }

    async fn create(&self, name: &str, context: Value) -> String {
        let (status, v) = self
            .req(
                "POST",
                "/v1/tasks",
                Some(json!({"namespace": "api_test", "name": name, "context": context})),
            )
            .await;
        assert_eq!(status, 201, "{v:#}");
        v["task_uuid"].as_str().unwrap().to_string()
    }

    async fn wait(&self, uuid: &str) -> Value {
        let (status, v) = self
            .req(
                "GET",
                &format!("/v1/tasks/{uuid}/wait?timeout_ms=20000"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{v:#}");
        v
    }
}

/// The error body's shape, code and (when given) the field it names.
fn assert_error(status: u16, v: &Value, want_status: u16, code: &str, field: Option<&str>) {
    assert_eq!(status, want_status, "{v:#}");
    assert_eq!(v["error"]["code"], code, "{v:#}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v:#}"
    );
    if let Some(f) = field {
        assert_eq!(v["error"]["details"]["field"], f, "{v:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_is_created_followed_and_read() {
    let s = open_server().await;
    let (status, created) = s
        .req(
            "POST",
            "/v1/tasks",
            Some(
                json!({"namespace": "api_test", "name": "pipeline", "context": {"x": 3},
                        "initiator": "tests", "source_system": "suite"}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{created:#}");
    let uuid = created["task_uuid"].as_str().unwrap().to_string();
    assert_eq!(created["uuid"], uuid);
    assert_eq!(created["step_counts"]["total"], 2);

    let done = s.wait(&uuid).await;
    assert_eq!(done["status"], "complete", "{done:#}");
    assert_eq!(done["execution_status"], "all_complete");
    assert_eq!(done["completion_percentage"], 100.0);
    assert_eq!(done["step_counts"]["complete"], 2);
    let second = done["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "second");
    assert_eq!(second.unwrap()["result"], json!({"x": 12}));

    // The same under /api/v1.
    let (status, again) = s.req("GET", &format!("/api/v1/tasks/{uuid}"), None).await;
    assert_eq!((status, &again["status"]), (200, &json!("complete")));

    // Listing with filters and pagination.
    s.create("pipeline", json!({"x": 4})).await;
    let (status, page) = s
        .req(
            "GET",
            "/v1/tasks?namespace=api_test&name=pipeline&limit=1",
            None,
        )
        .await;
    assert_eq!(status, 200, "{page:#}");
    assert_eq!(page["tasks"].as_array().unwrap().len(), 1);
    assert_eq!(page["pagination"]["has_more"], true);
    assert_eq!(page["pagination"]["next_offset"], 1);
    let (_, page2) = s
        .req(
            "GET",
            "/v1/tasks?namespace=api_test&page=2&per_page=1",
            None,
        )
        .await;
    assert_eq!(page2["pagination"]["offset"], 1);
    assert_eq!(page2["pagination"]["has_more"], false);
    let (_, by_status) = s
        .req(
            "GET",
            "/v1/tasks?status=complete&initiator=tests&source_system=suite",
            None,
        )
        .await;
    let tasks = by_status["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 1, "{by_status:#}");
    assert_eq!(tasks[0]["uuid"], uuid);
    let created_at = done["created_at"].as_i64().unwrap();
    let (_, none) = s
        .req(
            "GET",
            &format!("/v1/tasks?created_after={}", created_at + 1),
            None,
        )
        .await;
    assert!(
        none["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["uuid"] != uuid)
    );
    let (_, before) = s
        .req(
            "GET",
            &format!("/v1/tasks?created_before={}", created_at + 1),
            None,
        )
        .await;
    assert!(
        before["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["uuid"] == uuid)
    );

    // Transitions, steps, audit.
    let (_, tr) = s
        .req("GET", &format!("/v1/tasks/{uuid}/transitions"), None)
        .await;
    let states: Vec<&str> = tr["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["to_state"].as_str().unwrap())
        .collect();
    assert_eq!(states.first(), Some(&"pending"));
    assert_eq!(states.last(), Some(&"complete"));
    assert!(tr.get("step_transitions").is_none());
    let (_, tr) = s
        .req(
            "GET",
            &format!("/v1/tasks/{uuid}/transitions?include_steps=true"),
            None,
        )
        .await;
    assert!(!tr["step_transitions"].as_array().unwrap().is_empty());
    assert!(tr["rejected_completions"].as_array().unwrap().is_empty());

    let (status, steps) = s
        .req("GET", &format!("/v1/tasks/{uuid}/workflow_steps"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(steps.as_array().unwrap().len(), 2);
    let step_uuid = steps[0]["uuid"].as_str().unwrap();
    let (_, by_uuid) = s
        .req(
            "GET",
            &format!("/v1/tasks/{uuid}/workflow_steps/{step_uuid}"),
            None,
        )
        .await;
    let (_, by_name) = s
        .req(
            "GET",
            &format!("/v1/tasks/{uuid}/workflow_steps/first"),
            None,
        )
        .await;
    assert_eq!(by_uuid, by_name);
    assert_eq!(by_name["state"], "complete");
    let (status, audit) = s
        .req(
            "GET",
            &format!("/v1/tasks/{uuid}/workflow_steps/first/audit"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{audit:#}");
    assert_eq!(audit["step_name"], "first");
    let rows = audit["transitions"].as_array().unwrap();
    let finished = rows
        .iter()
        .find(|r| r["from_state"] == "in_progress")
        .expect("a transition out of in_progress");
    assert!(finished["duration_ms"].as_i64().is_some(), "{audit:#}");
    assert_eq!(finished["attempt"], 1);
    assert!(finished["actor"].as_str().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_answers_replays_duplicates_and_bad_requests() {
    let s = open_server().await;
    let body = json!({"namespace": "api_test", "name": "pipeline", "context": {"x": 5},
                      "idempotency_key": "order-5"});
    let (status, first) = s.req("POST", "/v1/tasks", Some(body.clone())).await;
    assert_eq!(status, 201);
    let r = s
        .raw(
            "POST",
            "/v1/tasks",
            Some(body.to_string()),
            "application/json",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("idempotent-replayed"), Some("true"));
    assert_eq!(r.json().unwrap()["task_uuid"], first["task_uuid"]);

    // A strict duplicate (same context, no key) is a conflict naming the existing task.
    let uuid = s.create("pipeline", json!({"x": 6})).await;
    let (status, dup) = s
        .req(
            "POST",
            "/v1/tasks",
            Some(json!({"namespace": "api_test", "name": "pipeline", "context": {"x": 6}})),
        )
        .await;
    assert_error(status, &dup, 409, "conflict", None);
    assert_eq!(dup["error"]["details"]["task_uuid"], uuid);

    let (status, v) = s
        .req(
            "POST",
            "/v1/tasks",
            Some(json!({"namespace": "api_test", "name": "nope"})),
        )
        .await;
    assert_error(status, &v, 404, "not_found", None);
    let (status, v) = s
        .req(
            "POST",
            "/v1/tasks",
            Some(json!({"namespace": "api_test", "name": "pipeline", "context": {"x": "six"}})),
        )
        .await;
    assert_error(status, &v, 422, "validation_error", None);
    assert!(v["error"]["details"].to_string().contains("/x"), "{v:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_wrong_typed_input_is_a_client_error_naming_the_field() {
    let s = open_server().await;
    let uuid = s.create("pipeline", json!({"x": 1})).await;
    s.wait(&uuid).await;
    // (method, path, body, status, code, field)
    type Case<'a> = (&'a str, String, &'a str, u16, &'a str, Option<&'a str>);
    let json_cases: Vec<Case> = vec![
        (
            "POST",
            "/v1/tasks".into(),
            "{\"name\": ",
            400,
            "bad_request",
            None,
        ),
        ("POST", "/v1/tasks".into(), "", 400, "bad_request", None),
        (
            "POST",
            "/v1/tasks".into(),
            "[1, 2]",
            422,
            "validation_error",
            Some("(body)"),
        ),
        (
            "POST",
            "/v1/tasks".into(),
            r#"{"name": 5, "namespace": "api_test"}"#,
            422,
            "validation_error",
            Some("name"),
        ),
        (
            "POST",
            "/v1/tasks".into(),
            r#"{"name": "pipeline"}"#,
            422,
            "validation_error",
            Some("namespace"),
        ),
        (
            "POST",
            "/v1/tasks".into(),
            r#"{"name": "pipeline", "namespace": "api_test", "priority": "high"}"#,
            422,
            "validation_error",
            Some("priority"),
        ),
        (
            "PATCH",
            format!("/v1/tasks/{uuid}"),
            r#"{"action_type": "explode"}"#,
            422,
            "validation_error",
            Some("action_type"),
        ),
        (
            "PATCH",
            format!("/v1/tasks/{uuid}"),
            r#"{"action_type": "give_up", "reason": 7}"#,
            422,
            "validation_error",
            Some("reason"),
        ),
        (
            "PATCH",
            format!("/v1/tasks/{uuid}/workflow_steps/first"),
            r#"{"action_type": "complete_manually"}"#,
            422,
            "validation_error",
            Some("result"),
        ),
        (
            "PATCH",
            format!("/v1/tasks/{uuid}/workflow_steps/first"),
            r#"{"action_type": "complete_manually", "result": [1]}"#,
            422,
            "validation_error",
            Some("result"),
        ),
        (
            "PATCH",
            "/v1/dlq/entry/x".into(),
            r#"{"resolution_status": "fixed"}"#,
            422,
            "validation_error",
            Some("resolution_status"),
        ),
        (
            "POST",
            "/v1/templates".into(),
            r#"{"yaml": 3}"#,
            422,
            "validation_error",
            Some("yaml"),
        ),
    ];
    for (method, path, body, want, code, field) in json_cases {
        let r = s
            .raw(method, &path, Some(body.to_string()), "application/json")
            .await;
        let v = r
            .json()
            .unwrap_or_else(|e| panic!("{method} {path} {body}: {e}"));
        assert_error(r.status, &v, want, code, field);
    }
    let r = s
        .raw(
            "POST",
            "/v1/tasks",
            Some("x=1".into()),
            "application/x-www-form-urlencoded",
        )
        .await;
    assert_error(
        r.status,
        &r.json().unwrap(),
        415,
        "unsupported_media_type",
        None,
    );

    for (path, field) in [
        ("/v1/tasks?limit=abc".to_string(), "limit"),
        ("/v1/tasks?limit=0".to_string(), "limit"),
        ("/v1/tasks?status=sleeping".to_string(), "status"),
        (
            "/v1/tasks?created_after=yesterday".to_string(),
            "created_after",
        ),
        ("/v1/tasks?page=0".to_string(), "page"),
        (format!("/v1/tasks/{uuid}/wait?timeout_ms=-1"), "timeout_ms"),
        (
            format!("/v1/tasks/{uuid}/wait?timeout_ms=99999999"),
            "timeout_ms",
        ),
        ("/v1/dlq?reason=slow".to_string(), "reason"),
    ] {
        let (status, v) = s.req("GET", &path, None).await;
        assert_error(status, &v, 422, "validation_error", Some(field));
    }

    // Unknown things are 404s in the same shape; a wrong method is a 405.
    for path in [
        "/v1/tasks/no-such-task".to_string(),
        "/v1/tasks/no-such-task/wait?timeout_ms=10".to_string(),
        "/v1/tasks/no-such-task/events".to_string(),
        "/v1/tasks/no-such-task/transitions".to_string(),
        "/v1/tasks/no-such-task/workflow_steps".to_string(),
        format!("/v1/tasks/{uuid}/workflow_steps/nope"),
        format!("/v1/tasks/{uuid}/workflow_steps/nope/audit"),
        "/v1/templates/api_test/pipeline/9.9.9".to_string(),
        "/v1/dlq/entry/nope".to_string(),
        "/v1/nothing-here".to_string(),
    ] {
        let (status, v) = s.req("GET", &path, None).await;
        assert_error(status, &v, 404, "not_found", None);
    }
    let (status, v) = s.req("DELETE", "/v1/tasks/no-such-task", None).await;
    assert_error(status, &v, 404, "not_found", None);
    let (status, v) = s.req("PUT", "/v1/tasks", None).await;
    assert_error(status, &v, 405, "method_not_allowed", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413() {
    let s = start(ApiOptions {
        auth: AuthMode::Disabled,
        body_limit: 1024,
    })
    .await;
    let big =
        json!({"namespace": "api_test", "name": "pipeline", "context": {"pad": "x".repeat(4096)}});
    let (status, v) = s.req("POST", "/v1/tasks", Some(big)).await;
    assert_error(status, &v, 413, "payload_too_large", None);
    let (status, _) = s
        .req(
            "POST",
            "/v1/tasks",
            Some(json!({"namespace": "api_test", "name": "pipeline", "context": {"x": 1}})),
        )
        .await;
    assert_eq!(status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_fix_steps_and_end_tasks() {
    let s = open_server().await;
    // complete_manually unblocks the dependent step, which sees the operator's result.
    let a = s.create("broken", json!({})).await;
    let blocked = s.wait(&a).await;
    assert_eq!(blocked["status"], "blocked_by_failures");
    assert_eq!(blocked["execution_status"], "blocked_by_failures");
    assert_eq!(blocked["step_counts"]["error"], 1);
    let (_, step) = s
        .req("GET", &format!("/v1/tasks/{a}/workflow_steps/boom"), None)
        .await;
    assert_eq!(step["state"], "error");
    assert_eq!(step["error"]["error_type"], "permanent_error");
    let (status, fixed) = s
        .req(
            "PATCH",
            &format!("/v1/tasks/{a}/workflow_steps/boom"),
            Some(
                json!({"action_type": "complete_manually", "result": {"x": 21},
                        "reason": "done by hand", "by": "ada"}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{fixed:#}");
    assert_eq!(fixed["step"]["state"], "complete");
    let done = s.wait(&a).await;
    assert_eq!(done["status"], "complete");
    let after = done["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "after")
        .unwrap();
    assert_eq!(after["result"], json!({"x": 42}));
    let (_, audit) = s
        .req(
            "GET",
            &format!("/v1/tasks/{a}/workflow_steps/boom/audit"),
            None,
        )
        .await;
    let by_operator = audit["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["to_state"] == "complete")
        .unwrap();
    assert_eq!(by_operator["actor"], "ada (api)");
    assert_eq!(by_operator["reason"], "done by hand");

    // resolve_manually on the step, then reset_for_retry on another task's step.
    let b = s.create("broken", json!({})).await;
    s.wait(&b).await;
    let (status, v) = s
        .req(
            "PATCH",
            &format!("/v1/tasks/{b}/workflow_steps/boom"),
            Some(json!({"action_type": "resolve_manually"})),
        )
        .await;
    assert_eq!(
        (status, &v["step"]["state"]),
        (200, &json!("resolved_manually")),
        "{v:#}"
    );
    assert_eq!(s.wait(&b).await["status"], "complete");

    let c = s.create("broken", json!({})).await;
    s.wait(&c).await;
    let (status, v) = s
        .req(
            "PATCH",
            &format!("/v1/tasks/{c}/workflow_steps/boom"),
            Some(json!({"action_type": "reset_for_retry"})),
        )
        .await;
    assert_eq!(status, 200, "{v:#}");
    let again = s.wait(&c).await;
    assert_eq!(again["status"], "blocked_by_failures");
    let boom = again["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "boom")
        .unwrap();
    assert_eq!(boom["attempts"], 1, "attempts were reset: {boom:#}");

    // Task-level: give up, resolve manually; acting on an ended task is a 409.
    let (status, v) = s
        .req(
            "PATCH",
            &format!("/v1/tasks/{c}"),
            Some(json!({"action_type": "give_up", "reason": "no"})),
        )
        .await;
    assert_eq!((status, &v["status"]), (200, &json!("error")), "{v:#}");
    let (status, v) = s
        .req(
            "PATCH",
            &format!("/v1/tasks/{c}"),
            Some(json!({"action_type": "resolve_manually"})),
        )
        .await;
    assert_error(status, &v, 409, "invalid_transition", None);
    let d = s.create("broken", json!({})).await;
    s.wait(&d).await;
    let (status, v) = s
        .req(
            "PATCH",
            &format!("/v1/tasks/{d}"),
            Some(json!({"action_type": "resolve_manually"})),
        )
        .await;
    assert_eq!(
        (status, &v["status"]),
        (200, &json!("resolved_manually")),
        "{v:#}"
    );
    assert_eq!(v["execution_status"], "all_complete");

    // Cancelling a running task.
    let e = s.create("gated", json!({})).await;
    s.entered.notified().await;
    let (status, v) = s
        .req("DELETE", &format!("/v1/tasks/{e}?reason=stop&by=ops"), None)
        .await;
    assert_eq!((status, &v["status"]), (200, &json!("cancelled")), "{v:#}");
    assert_eq!(v["execution_status"], "cancelled");
    let (status, v) = s.req("DELETE", &format!("/v1/tasks/{e}"), None).await;
    assert_error(status, &v, 409, "invalid_transition", None);
    s.gate.add_permits(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_at_completion_and_408_on_timeout() {
    let s = open_server().await;
    let uuid = s.create("gated", json!({})).await;
    s.entered.notified().await;
    let (status, v) = s
        .req("GET", &format!("/v1/tasks/{uuid}/wait?timeout_ms=50"), None)
        .await;
    assert_error(status, &v, 408, "timeout", None);
    assert_eq!(v["task"]["task_uuid"], uuid);
    assert_eq!(v["task"]["status"], "steps_in_process");
    assert_eq!(v["task"]["execution_status"], "processing");

    let waiter = {
        let client = s.client.clone();
        let path = format!("/v1/tasks/{uuid}/wait?timeout_ms=20000");
        tokio::spawn(async move { client.call("GET", &path, None).await })
    };
    s.gate.add_permits(1);
    let done = waiter.await.unwrap().unwrap();
    assert_eq!(done["status"], "complete");
}

/// Parses an event-stream body into `(event, data)` pairs.
fn events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter_map(|block| {
            let mut kind = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(k) = line.strip_prefix("event: ") {
                    kind = Some(k.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            Some((kind?, serde_json::from_str(&data).unwrap()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_sends_transitions_as_they_happen_and_ends() {
    let s = open_server().await;
    let uuid = s.create("gated", json!({})).await;
    s.entered.notified().await;
    let stream = {
        let client = s.client.clone();
        let path = format!("/v1/tasks/{uuid}/events");
        tokio::spawn(async move { client.send("GET", &path, None, None).await })
    };
    s.gate.add_permits(1);
    // The body is complete only when the server ends the stream.
    let r = stream.await.unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let evs = events(&r.text());
    let task_states: Vec<&str> = evs
        .iter()
        .filter(|(k, _)| k == "task_transition")
        .map(|(_, d)| d["to_state"].as_str().unwrap())
        .collect();
    assert_eq!(task_states.first(), Some(&"pending"), "{evs:#?}");
    assert!(task_states.contains(&"steps_in_process"));
    assert_eq!(task_states.last(), Some(&"complete"));
    // Each transition is sent once.
    let mut sorted = task_states.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), task_states.len(), "{task_states:?}");
    assert!(evs.iter().any(|(k, d)| k == "step_transition"
        && d["step_name"] == "hold"
        && d["to_state"] == "complete"));
    let (last, data) = evs.last().unwrap();
    assert_eq!(last, "end");
    assert_eq!(data["status"], "complete");

    // A task that has ended already: the history, then the end.
    let r = s
        .client
        .send("GET", &format!("/v1/tasks/{uuid}/events"), None, None)
        .await
        .unwrap();
    let again = events(&r.text());
    assert_eq!(again.len(), evs.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_are_listed_read_registered_and_validated() {
    let s = open_server().await;
    let (status, list) = s.req("GET", "/v1/templates?namespace=api_test", None).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["broken", "gated", "overdue", "pipeline"]);
    let (status, t) = s
        .req("GET", "/v1/templates/api_test/pipeline/1.0.0", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(t["steps"].as_array().unwrap().len(), 2);

    let yaml = "name: hello\nnamespace_name: api_new\nversion: \"1.0.0\"\nsteps:\n  - name: a\n    handler: { callable: double }\n";
    let (status, v) = s
        .req("POST", "/v1/templates", Some(json!({"yaml": yaml})))
        .await;
    assert_eq!((status, &v["status"]), (201, &json!("inserted")), "{v:#}");
    let (status, v) = s
        .req("POST", "/v1/templates", Some(json!({"yaml": yaml})))
        .await;
    assert_eq!((status, &v["status"]), (200, &json!("unchanged")), "{v:#}");
    let changed = yaml.replace("- name: a", "- name: b");
    let (status, v) = s
        .req("POST", "/v1/templates", Some(json!({"yaml": changed})))
        .await;
    assert_error(status, &v, 409, "conflict", None);
    let (status, v) = s
        .req(
            "POST",
            "/v1/templates",
            Some(json!({"yaml": changed, "force": true})),
        )
        .await;
    assert_eq!((status, &v["status"]), (201, &json!("replaced")), "{v:#}");
    // The older dialect as a JSON object, and raw YAML.
    let object = json!({"name": "obj", "namespace": "api_new", "version": "2.0.0",
        "step_templates": [{"name": "s", "handler": {"callable": "double"}}]});
    let (status, v) = s
        .req("POST", "/v1/templates", Some(json!({"template": object})))
        .await;
    assert_eq!(status, 201, "{v:#}");
    let raw = yaml.replace("hello", "raw");
    let r = s
        .raw("POST", "/v1/templates", Some(raw), "application/yaml")
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let (_, list) = s.req("GET", "/v1/templates?namespace=api_new", None).await;
    assert_eq!(list["templates"].as_array().unwrap().len(), 3);
    // A task of a template registered over the API runs.
    let (status, created) = s
        .req(
            "POST",
            "/v1/tasks",
            Some(json!({"namespace": "api_new", "name": "raw", "context": {"x": 2}})),
        )
        .await;
    assert_eq!(status, 201);
    let done = s.wait(created["task_uuid"].as_str().unwrap()).await;
    assert_eq!(done["status"], "complete");

    // Invalid templates: every problem listed, field by field.
    let bad = "name: bad\nnamespace_name: api_new\nversion: \"1.0.0\"\nsteps:\n  - name: a\n    handler: { callable: x }\n    dependencies: [ghost]\n  - name: a\n    handler: { callable: x }\n";
    let (status, v) = s
        .req("POST", "/v1/templates", Some(json!({"yaml": bad})))
        .await;
    assert_error(status, &v, 422, "template_error", None);
    let errors = v["error"]["details"]["errors"].as_array().unwrap();
    assert!(errors.len() >= 2, "{v:#}");
    assert!(errors.iter().any(|e| e["field"] == "dependencies"), "{v:#}");
    let (status, report) = s
        .req("POST", "/v1/templates/validate", Some(json!({"yaml": bad})))
        .await;
    assert_eq!(
        (status, &report["valid"]),
        (200, &json!(false)),
        "{report:#}"
    );
    let (_, report) = s
        .req(
            "POST",
            "/v1/templates/validate",
            Some(json!({"yaml": yaml})),
        )
        .await;
    assert_eq!(report["valid"], true);
    assert_eq!(report["key"], "api_new/hello/1.0.0");
    let (status, v) = s
        .req("POST", "/v1/templates/validate", Some(json!({})))
        .await;
    assert_error(status, &v, 422, "validation_error", Some("yaml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dlq_is_listed_counted_and_resolved() {
    let s = open_server().await;
    let (status, empty) = s.req("GET", "/v1/dlq", None).await;
    assert_eq!(status, 200);
    assert_eq!(empty["entries"], json!([]));
    assert_eq!(empty["pagination"]["has_more"], false);

    let uuid = s.create("overdue", json!({})).await;
    s.tasker
        .task(&uuid)
        .wait_until(
            |st| st == tasker_core::TaskState::WaitingForRetry,
            Some(Duration::from_secs(20)),
        )
        .await
        .unwrap();
    s.clock.advance(Duration::from_secs(6 * 60));
    s.tasker.sweep().await.unwrap();
    assert_eq!(s.wait(&uuid).await["status"], "error");

    let (_, list) = s
        .req("GET", "/v1/dlq?status=pending&namespace=api_test", None)
        .await;
    let entries = list["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{list:#}");
    assert_eq!(entries[0]["task_uuid"], uuid);
    assert_eq!(entries[0]["reason"], "max_waiting_for_retry_minutes");
    let id = entries[0]["dlq_entry_uuid"].as_str().unwrap();
    let (status, entry) = s.req("GET", &format!("/v1/dlq/entry/{id}"), None).await;
    assert_eq!(status, 200);
    assert!(entry["snapshot"].is_object());
    let (_, stats) = s.req("GET", "/v1/dlq/stats", None).await;
    assert_eq!(stats["total"], 1);
    assert_eq!(stats["by_resolution_status"]["pending"], 1);
    let (status, resolved) = s
        .req("PATCH", &format!("/v1/dlq/entry/{id}"),
             Some(json!({"resolution_status": "manually_resolved", "resolution_notes": "rerun", "resolved_by": "ada"})))
        .await;
    assert_eq!(status, 200, "{resolved:#}");
    assert_eq!(resolved["resolution_status"], "manually_resolved");
    assert_eq!(resolved["resolved_by"], "ada (api)");
    let (_, list) = s.req("GET", "/v1/dlq?status=pending", None).await;
    assert_eq!(list["entries"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_answer_and_are_open() {
    let s = start(ApiOptions::default()).await;
    for (path, status) in [
        ("/health", "healthy"),
        ("/health/live", "alive"),
        ("/health/ready", "ready"),
    ] {
        let (code, v) = s.req("GET", path, None).await;
        assert_eq!((code, &v["status"]), (200, &json!(status)), "{path}: {v:#}");
    }
}

/// Every route with a request that reaches its handler when authorized, and the permission
/// it needs.
fn routes(uuid: &str) -> Vec<(&'static str, String, Option<Value>, &'static str)> {
    let patch_task = json!({"action_type": "give_up"});
    let patch_step = json!({"action_type": "resolve_manually"});
    let yaml = json!({"yaml": "name: x\nnamespace_name: y\nversion: \"1\"\nsteps: []\n"});
    vec![
        (
            "POST",
            "/v1/tasks".into(),
            Some(json!({"namespace": "api_test", "name": "pipeline", "context": {"x": 9}})),
            "tasks:create",
        ),
        ("GET", "/v1/tasks".into(), None, "tasks:list"),
        ("GET", format!("/v1/tasks/{uuid}"), None, "tasks:read"),
        (
            "GET",
            format!("/v1/tasks/{uuid}/wait?timeout_ms=1"),
            None,
            "tasks:read",
        ),
        (
            "GET",
            format!("/v1/tasks/{uuid}/events"),
            None,
            "tasks:read",
        ),
        (
            "GET",
            format!("/v1/tasks/{uuid}/transitions"),
            None,
            "tasks:read",
        ),
        (
            "PATCH",
            format!("/v1/tasks/{uuid}"),
            Some(patch_task),
            "tasks:cancel",
        ),
        ("DELETE", format!("/v1/tasks/{uuid}"), None, "tasks:cancel"),
        (
            "GET",
            format!("/v1/tasks/{uuid}/workflow_steps"),
            None,
            "steps:read",
        ),
        (
            "GET",
            format!("/v1/tasks/{uuid}/workflow_steps/first"),
            None,
            "steps:read",
        ),
        (
            "GET",
            format!("/v1/tasks/{uuid}/workflow_steps/first/audit"),
            None,
            "steps:read",
        ),
        (
            "PATCH",
            format!("/v1/tasks/{uuid}/workflow_steps/first"),
            Some(patch_step),
            "steps:resolve",
        ),
        ("GET", "/v1/templates".into(), None, "templates:read"),
        (
            "GET",
            "/v1/templates/api_test/pipeline/1.0.0".into(),
            None,
            "templates:read",
        ),
        (
            "POST",
            "/v1/templates/validate".into(),
            Some(yaml.clone()),
            "templates:read",
        ),
        (
            "POST",
            "/v1/templates".into(),
            Some(yaml),
            "templates:write",
        ),
        ("GET", "/v1/dlq".into(), None, "dlq:read"),
        ("GET", "/v1/dlq/stats".into(), None, "dlq:read"),
        ("GET", "/v1/dlq/entry/x".into(), None, "dlq:read"),
        (
            "PATCH",
            "/v1/dlq/entry/x".into(),
            Some(json!({"resolution_status": "cancelled"})),
            "dlq:update",
        ),
        ("GET", "/v1/openapi.json".into(), None, "system:read"),
    ]
}

async fn key(s: &Server, name: &str, perms: &[&str]) -> String {
    let g = tasker_core::auth::generate_key(
        name,
        perms.iter().map(|p| p.to_string()).collect(),
        s.tasker.now(),
    )
    .unwrap();
    s.tasker
        .store()
        .create_api_key(&g.key, &g.secret_hash)
        .await
        .unwrap();
    g.token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_a_valid_key_with_its_permission() {
    let s = start(ApiOptions::default()).await;
    let uuid = s.create_as_admin().await;
    let base = s.client.base_url().to_string();
    let revoked = key(&s, "old", &["*"]).await;
    let (id, _) = tasker_core::auth::split_token(&revoked).unwrap();
    s.tasker
        .store()
        .revoke_api_key(id, s.tasker.now())
        .await
        .unwrap();
    let mut wrong_secret = key(&s, "w", &["*"]).await;
    let last = wrong_secret.pop().unwrap();
    wrong_secret.push(if last == '0' { '1' } else { '0' });
    for (method, path, body, permission) in routes(&uuid) {
        let body_bytes = body
            .as_ref()
            .map(|b| ("application/json", b.to_string().into_bytes()));
        let what = format!("{method} {path}");
        // No key, a malformed key, a revoked key, a wrong secret: 401.
        for token in [
            None,
            Some("nonsense".to_string()),
            Some(revoked.clone()),
            Some(wrong_secret.clone()),
        ] {
            let c = Client::new(&base, token.clone()).unwrap();
            let r = c
                .send(method, &path, body_bytes.clone(), None)
                .await
                .unwrap();
            assert_eq!(r.status, 401, "{what} with {token:?}: {}", r.text());
            assert_eq!(r.json().unwrap()["error"]["code"], "unauthorized");
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        }
        // The same under /api/v1.
        let r = Client::new(&base, None)
            .unwrap()
            .send(method, &format!("/api{path}"), body_bytes.clone(), None)
            .await
            .unwrap();
        assert_eq!(r.status, 401, "/api{what}");
        // A key with every permission but this one: 403 naming it.
        let others: Vec<&str> = tasker_core::auth::PERMISSIONS
            .iter()
            .copied()
            .filter(|p| *p != permission)
            .collect();
        let partial = key(&s, "partial", &others).await;
        let r = Client::new(&base, Some(partial))
            .unwrap()
            .send(method, &path, body_bytes.clone(), None)
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{what}: {}", r.text());
        let v = r.json().unwrap();
        assert_eq!(v["error"]["code"], "forbidden");
        assert_eq!(
            v["error"]["details"]["required_permission"], permission,
            "{what}"
        );
        // Exactly this permission, its resource wildcard, and `*` all get through; so does the
        // X-API-Key header.
        let resource = format!("{}:*", permission.split(':').next().unwrap());
        for perms in [vec![permission], vec![resource.as_str()], vec!["*"]] {
            let k = key(&s, "ok", &perms).await;
            let r = Client::new(&base, Some(k))
                .unwrap()
                .send(method, &path, body_bytes.clone(), None)
                .await
                .unwrap();
            assert!(
                r.status != 401 && r.status != 403,
                "{what} with {perms:?}: {} {}",
                r.status,
                r.text()
            );
        }
        let k = key(&s, "header", &[permission]).await;
        let plain = Client::new(&base, None).unwrap();
        let r = raw_with_header(&plain, method, &path, body, ("x-api-key", &k)).await;
        assert!(r != 401 && r != 403, "{what} with X-API-Key: {r}");
    }
}

/// Sends a request with one extra header through a bare hyper client.
async fn raw_with_header(
    c: &Client,
    method: &str,
    path: &str,
    body: Option<Value>,
    header: (&str, &str),
) -> u16 {
    use http_body_util::{BodyExt, Full};
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("{}{path}", c.base_url()))
        .header("content-type", "application/json")
        .header(header.0, header.1)
        .body(Full::new(bytes::Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let r = http.request(req).await.unwrap();
    let status = r.status().as_u16();
    // Event streams end only with their task; the status is all this needs.
    drop(r.into_body().boxed());
    status
}

impl Server {
    /// Creates a pipeline task straight through the engine (no credentials needed).
    async fn create_as_admin(&self) -> String {
        let h = self
            .tasker
            .create_task(tasker_core::TaskRequest::new(
                "api_test",
                "pipeline",
                json!({"x": 1}),
            ))
            .await
            .unwrap();
        h.wait(Some(Duration::from_secs(20))).await.unwrap();
        h.uuid
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_served_and_committed() {
    let s = open_server().await;
    let r = s
        .client
        .send("GET", "/v1/openapi.json", None, None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let generated = tasker_core::api::openapi_json();
    assert_eq!(r.text(), generated);
    let doc: Value = serde_json::from_str(&generated).unwrap();
    for path in [
        "/v1/tasks",
        "/v1/tasks/{uuid}/wait",
        "/v1/tasks/{uuid}/events",
        "/v1/dlq/entry/{id}",
        "/health/ready",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from the document"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());

    let committed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    if std::env::var_os("TASKER_BLESS").is_some() {
        std::fs::write(&committed, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(&committed).unwrap_or_default();
    assert!(
        on_disk == generated,
        "docs/openapi.json differs from the API's generated document; regenerate it with \
         `TASKER_BLESS=1 cargo test -p tasker-core --features server --test api openapi` and commit it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_failures_are_answered_without_their_text() {
    let s = start(ApiOptions::default()).await;
    let k = key(&s, "k", &["*"]).await;
    // Another connection breaks the database under the server.
    let db = s._dir.path().join("t.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", db.display()))
        .await
        .unwrap();
    sqlx::query("DROP TABLE api_keys")
        .execute(&pool)
        .await
        .unwrap();
    let c = Client::new(s.client.base_url(), Some(k)).unwrap();
    let r = c.send("GET", "/v1/tasks", None, None).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    let body = r.text();
    assert!(
        !body.contains("api_keys") && !body.contains("no such table"),
        "{body}"
    );
    let v = r.json().unwrap();
    assert_eq!(v["error"]["code"], "store_error");
    let id = r.header("x-request-id").unwrap();
    assert_eq!(v["error"]["details"]["request_id"], id);
}
