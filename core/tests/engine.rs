//! The engine handle end to end with Rust handlers: retries, backoff (on a test clock),
//! timeouts, result checks, task creation rules, concurrency, cancellation and operator
//! actions. Tests wait on task state, never on a fixed sleep.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{eventually, register};
use serde_json::{Value, json};
use tasker_core::clock::{Clock, SystemClock, TestClock};
use tasker_core::{
    Config, ErrorKind, ErrorType, OpenOptions, StepOutcome, StepState, TaskRequest, TaskState,
    Tasker, handler_fn,
};
use tokio::sync::Notify;

const WAIT: Option<Duration> = Some(Duration::from_secs(20));

fn config() -> Config {
    Config {
        poll_interval: Duration::from_millis(200),
        unknown_callable_grace: Duration::ZERO,
        ..Config::default()
    }
}

async fn open() -> Tasker {
    Tasker::open_with(
        "sqlite::memory:",
        OpenOptions {
            config: config(),
            clock: Arc::new(SystemClock),
            background: true,
        },
    )
    .await
    .unwrap()
}

async fn open_with_clock(clock: &TestClock) -> Tasker {
    Tasker::open_with(
        "sqlite::memory:",
        OpenOptions {
            config: config(),
            clock: Arc::new(clock.clone()),
            background: true,
        },
    )
    .await
    .unwrap()
}

/// A one-step template `ns/name` whose step `only` runs `callable` with `extra` YAML lines.
fn one_step(name: &str, callable: &str, extra: &str) -> String {
    format!(
        r#"
name: {name}
namespace_name: eng
version: "1.0.0"
identity_strategy: always_unique
steps:
  - name: only
    handler: {{ callable: {callable} }}
{extra}
"#
    )
}

/// A two-step template: `a` (callable `first`) then `b` (callable `second`).
fn two_steps(name: &str, first: &str, second: &str, retry: &str) -> String {
    format!(
        r#"
name: {name}
namespace_name: eng
version: "1.0.0"
identity_strategy: always_unique
steps:
  - name: a
    handler: {{ callable: {first} }}
    retry: {retry}
  - name: b
    handler: {{ callable: {second} }}
    dependencies: [a]
"#
    )
}

fn ok() -> Arc<dyn tasker_core::StepHandler> {
    handler_fn(|_| async { StepOutcome::success(json!({"ok": true})) })
}

/// Fails the first `times` calls with `outcome`, then succeeds.
fn failing(
    times: u32,
    outcome: StepOutcome,
) -> (Arc<dyn tasker_core::StepHandler>, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let h = handler_fn(move |ctx| {
        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
        let outcome = outcome.clone();
        async move {
            if n <= times {
                outcome
            } else {
                StepOutcome::success(json!({"attempt": ctx.attempts()}))
            }
        }
    });
    (h, calls)
}

fn req(name: &str, context: Value) -> TaskRequest {
    TaskRequest::new("eng", name, context)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_until_success() {
    let t = open().await;
    register(
        &t,
        &one_step(
            "flaky",
            "flaky",
            "    retry: { max_attempts: 3, backoff: none }",
        ),
    )
    .await;
    let (h, calls) = failing(2, StepOutcome::retryable("not yet"));
    t.register_handler("flaky", h);
    let task = t.run_task(req("flaky", json!({})), WAIT).await.unwrap();
    assert_eq!(task.status, TaskState::Complete, "{task:#?}");
    let only = task.step("only").unwrap();
    assert_eq!((only.state, only.attempts), (StepState::Complete, 3));
    assert_eq!(only.result, Some(json!({"attempt": 3})));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(task.completed_at.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_exhaustion_blocks_the_task_and_wait_returns() {
    let t = open().await;
    register(
        &t,
        &two_steps(
            "exhaust",
            "always_fails",
            "ok",
            "{ max_attempts: 2, backoff: none }",
        ),
    )
    .await;
    let (h, calls) = failing(
        u32::MAX,
        StepOutcome::retryable("still broken").with_error_code("E42"),
    );
    t.register_handler("always_fails", h);
    t.register_handler("ok", ok());
    let task = t.run_task(req("exhaust", json!({})), WAIT).await.unwrap();
    assert_eq!(task.status, TaskState::BlockedByFailures);
    assert_eq!(task.completed_at, None, "blocked is not terminal");
    let a = task.step("a").unwrap();
    assert_eq!((a.state, a.attempts), (StepState::Error, 2));
    let err = a.error.as_ref().unwrap();
    assert_eq!(
        (err.error_type, err.retryable, err.error_code.as_deref()),
        (ErrorType::RetryableError, true, Some("E42"))
    );
    assert_eq!(err.message, "still broken");
    assert_eq!(task.step("b").unwrap().state, StepState::Pending);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_error_is_not_retried() {
    let t = open().await;
    register(
        &t,
        &one_step(
            "perm",
            "perm",
            "    retry: { max_attempts: 5, backoff: none }",
        ),
    )
    .await;
    let (h, calls) = failing(u32::MAX, StepOutcome::permanent("card declined"));
    t.register_handler("perm", h);
    let task = t.run_task(req("perm", json!({})), WAIT).await.unwrap();
    assert_eq!(task.status, TaskState::BlockedByFailures);
    let only = task.step("only").unwrap();
    assert_eq!((only.state, only.attempts), (StepState::Error, 1));
    assert_eq!(
        only.error.as_ref().unwrap().error_type,
        ErrorType::PermanentError
    );
    assert!(!only.error.as_ref().unwrap().retryable);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exponential_backoff_follows_the_test_clock() {
    let clock = TestClock::default();
    let t0 = clock.now();
    let t = open_with_clock(&clock).await;
    register(
        &t,
        &one_step(
            "backoff",
            "flaky",
            "    retry: { max_attempts: 3, backoff: exponential, backoff_base_ms: 1000, jitter: false }",
        ),
    )
    .await;
    let (h, calls) = failing(1, StepOutcome::retryable("later"));
    t.register_handler("flaky", h);
    let handle = t.create_task(req("backoff", json!({}))).await.unwrap();
    let task = handle
        .wait_until(|s| s == TaskState::WaitingForRetry, WAIT)
        .await
        .unwrap();
    let only = task.step("only").unwrap();
    assert_eq!(
        (only.state, only.next_attempt_at),
        (StepState::WaitingForRetry, Some(t0 + 1000))
    );
    clock.advance(Duration::from_millis(999));
    t.sweep().await.unwrap();
    let task = handle.get().await.unwrap();
    assert_eq!(task.status, TaskState::WaitingForRetry, "not due yet");
    assert_eq!(task.step("only").unwrap().state, StepState::WaitingForRetry);
    clock.advance(Duration::from_millis(1));
    t.sweep().await.unwrap();
    let task = handle.wait(WAIT).await.unwrap();
    assert_eq!(task.status, TaskState::Complete);
    assert_eq!(task.step("only").unwrap().attempts, 2);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let ready = t
        .step_transitions(&handle.uuid, Some("only"))
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.event == "retry_ready")
        .unwrap();
    assert_eq!(ready.created_at, t0 + 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_overrides_the_backoff_and_is_capped() {
    let clock = TestClock::default();
    let t0 = clock.now();
    let t = open_with_clock(&clock).await;
    register(
        &t,
        &one_step(
            "retry_after",
            "throttled",
            "    retry: { max_attempts: 3, backoff: exponential, backoff_base_ms: 100, max_backoff_ms: 3000, jitter: false }",
        ),
    )
    .await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    t.register_handler(
        "throttled",
        handler_fn(move |_| {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                match n {
                    1 => StepOutcome::retryable("429").with_retry_after(2.0),
                    2 => StepOutcome::retryable("429").with_retry_after(3600.0),
                    _ => StepOutcome::success(json!({})),
                }
            }
        }),
    );
    let handle = t.create_task(req("retry_after", json!({}))).await.unwrap();
    let task = handle
        .wait_until(|s| s == TaskState::WaitingForRetry, WAIT)
        .await
        .unwrap();
    assert_eq!(
        task.step("only").unwrap().next_attempt_at,
        Some(t0 + 2000),
        "Retry-After wins over 100 ms"
    );
    clock.advance(Duration::from_millis(2000));
    t.sweep().await.unwrap();
    // `sweep` enqueued the retry before returning, so this waits for the second failure.
    let task = handle
        .wait_until(|s| s == TaskState::WaitingForRetry, WAIT)
        .await
        .unwrap();
    assert_eq!(task.step("only").unwrap().attempts, 2);
    assert_eq!(
        task.step("only").unwrap().next_attempt_at,
        Some(t0 + 2000 + 3000),
        "capped at max_backoff_ms"
    );
    clock.advance(Duration::from_millis(3000));
    t.sweep().await.unwrap();
    let task = handle.wait(WAIT).await.unwrap();
    assert_eq!(
        (task.status, task.step("only").unwrap().attempts),
        (TaskState::Complete, 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_its_step_and_the_engine_keeps_going() {
    let t = open().await;
    register(
        &t,
        &one_step("panics", "boom", "    retry: { max_attempts: 1 }"),
    )
    .await;
    register(&t, &one_step("fine", "ok", "")).await;
    t.register_handler(
        "boom",
        handler_fn(|_| async {
            if true {
                panic!("kaboom at step");
            }
            StepOutcome::success(json!({}))
        }),
    );
    t.register_handler("ok", ok());
    let bad = t.create_task(req("panics", json!({}))).await.unwrap();
    let good = t.create_task(req("fine", json!({}))).await.unwrap();
    let bad = bad.wait(WAIT).await.unwrap();
    let err = bad.step("only").unwrap().error.clone().unwrap();
    assert_eq!(err.error_type, ErrorType::HandlerError);
    assert!(err.message.contains("kaboom at step"), "{}", err.message);
    // The backtrace is recorded with the failure: where it panicked, then the frames.
    let bt = err.backtrace.as_deref().expect("a backtrace");
    assert!(bt.contains("core/tests/engine.rs"), "{bt}");
    assert!(bt.lines().count() > 3, "{bt}");
    assert_eq!(bad.status, TaskState::BlockedByFailures);
    assert_eq!(good.wait(WAIT).await.unwrap().status, TaskState::Complete);
    assert_eq!(
        t.run_task(req("fine", json!({})), WAIT)
            .await
            .unwrap()
            .status,
        TaskState::Complete
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_callable_fails_with_handler_not_found() {
    let t = open().await;
    register(
        &t,
        &one_step(
            "orphan",
            "nobody.Serves",
            "    retry: { max_attempts: 3, backoff: none }",
        ),
    )
    .await;
    t.register_handler("ok", ok());
    let task = t.run_task(req("orphan", json!({})), WAIT).await.unwrap();
    assert_eq!(task.status, TaskState::BlockedByFailures);
    let only = task.step("only").unwrap();
    assert_eq!(only.attempts, 1, "handler_not_found is permanent");
    let err = only.error.as_ref().unwrap();
    assert_eq!(
        (err.error_type, err.retryable),
        (ErrorType::HandlerNotFound, false)
    );
    assert!(
        err.message.contains("nobody.Serves") && err.message.contains("ok"),
        "{}",
        err.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_handler_times_out_and_is_retried() {
    let t = open().await;
    register(
        &t,
        &one_step(
            "hangs",
            "hang",
            "    timeout_seconds: 1\n    retry: { max_attempts: 2, backoff: none }",
        ),
    )
    .await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    t.register_handler(
        "hang",
        handler_fn(move |_| {
            c.fetch_add(1, Ordering::SeqCst);
            std::future::pending()
        }),
    );
    let task = t.run_task(req("hangs", json!({})), WAIT).await.unwrap();
    assert_eq!(task.status, TaskState::BlockedByFailures);
    let only = task.step("only").unwrap();
    assert_eq!(only.attempts, 2);
    assert_eq!(only.error.as_ref().unwrap().error_type, ErrorType::Timeout);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_checked() {
    let t = open().await;
    let schema = r#"    result_schema: { type: object, required: [total], properties: { total: { type: integer }, label: { type: string } } }"#;
    register(&t, &one_step("schema", "bad_result", schema)).await;
    register(&t, &one_step("not_object", "array_result", "")).await;
    t.register_handler(
        "bad_result",
        handler_fn(|_| async { StepOutcome::success(json!({"label": 7})) }),
    );
    t.register_handler(
        "array_result",
        handler_fn(|_| async { StepOutcome::success(json!([1, 2])) }),
    );
    let task = t.run_task(req("schema", json!({})), WAIT).await.unwrap();
    let only = task.step("only").unwrap();
    let err = only.error.as_ref().unwrap();
    assert_eq!(
        (err.error_type, err.retryable, only.attempts),
        (ErrorType::InvalidResult, false, 1)
    );
    assert!(
        err.message.contains("total") && err.message.contains("/label"),
        "{}",
        err.message
    );
    assert_eq!(
        err.metadata.as_array().map(Vec::len),
        Some(2),
        "{:?}",
        err.metadata
    );
    let task = t
        .run_task(req("not_object", json!({})), WAIT)
        .await
        .unwrap();
    let err = task.step("only").unwrap().error.clone().unwrap();
    assert_eq!(err.error_type, ErrorType::InvalidResult);
    assert!(err.message.contains("array"), "{}", err.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_validates_the_context() {
    let t = open().await;
    let yaml = r#"
name: typed
namespace_name: eng
version: "1.0.0"
input_schema:
  type: object
  required: [order_id, items]
  properties:
    order_id: { type: integer }
    items: { type: array, items: { type: object, required: [sku] } }
steps:
  - name: only
    handler: { callable: ok }
"#;
    register(&t, yaml).await;
    let e = t.create_task(req("typed", json!([1]))).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Validation);
    let e = t
        .create_task(req(
            "typed",
            json!({"order_id": "x", "items": [{"qty": 1}]}),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Validation, "{e}");
    let violations = e.details.as_ref().unwrap()["violations"]
        .as_array()
        .unwrap()
        .clone();
    let pointers: Vec<&str> = violations
        .iter()
        .map(|v| v["pointer"].as_str().unwrap())
        .collect();
    assert!(pointers.contains(&"/order_id"), "{violations:?}");
    assert!(pointers.contains(&"/items/0"), "{violations:?}");
    assert_eq!(violations.len(), 2, "{violations:?}");
    assert!(
        e.message.contains("/order_id") && e.message.contains("/items/0"),
        "{e}"
    );
    assert!(
        t.list_tasks(&Default::default()).await.unwrap().is_empty(),
        "nothing was created"
    );
}

/// `create_tasks` submits many at once: each is created or refused on its own, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_tasks_creates_each_on_its_own_in_order() {
    let t = open().await;
    let yaml = r#"
name: counted
namespace_name: eng
version: "1.0.0"
identity_strategy: always_unique
input_schema:
  type: object
  required: [i]
  properties: { i: { type: integer } }
steps:
  - name: only
    handler: { callable: ok }
"#;
    register(&t, yaml).await;
    t.register_handler("ok", ok());
    let contexts: Vec<Value> = (0..50)
        .map(|i| {
            if i % 10 == 7 {
                json!({"i": "seven"})
            } else {
                json!({ "i": i })
            }
        })
        .collect();
    let results = t
        .create_tasks(contexts.iter().map(|c| req("counted", c.clone())).collect())
        .await;
    assert_eq!(results.len(), 50);
    for (i, r) in results.into_iter().enumerate() {
        if i % 10 == 7 {
            assert_eq!(r.unwrap_err().kind, ErrorKind::Validation);
            continue;
        }
        let task = r.unwrap().wait(WAIT).await.unwrap();
        assert_eq!(task.status, TaskState::Complete);
        assert_eq!(task.context, json!({ "i": i }));
    }
    assert_eq!(t.list_tasks(&Default::default()).await.unwrap().len(), 45);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_strategies() {
    let t = open().await;
    t.register_handler("ok", ok());
    let tpl = |name: &str, strategy: &str| {
        format!(
            "name: {name}\nnamespace_name: eng\nversion: \"1.0.0\"\nidentity_strategy: {strategy}\nsteps:\n  - name: only\n    handler: {{ callable: ok }}\n"
        )
    };
    register(&t, &tpl("strict", "strict")).await;
    register(&t, &tpl("caller", "caller_provided")).await;
    register(&t, &tpl("unique", "always_unique")).await;
    let a = t
        .create_task(req("strict", json!({"x": 1, "y": [1, 2]})))
        .await
        .unwrap();
    let b = t
        .create_task(req("strict", json!({"y": [1, 2], "x": 1})))
        .await
        .unwrap();
    assert!(!a.replayed && b.replayed);
    assert_eq!(a.uuid, b.uuid);
    assert!(b.wait(WAIT).await.unwrap().replayed);
    let c = t.create_task(req("strict", json!({"x": 2}))).await.unwrap();
    assert_ne!(c.uuid, a.uuid);

    let k1 = t
        .create_task(req("caller", json!({"n": 1})).idempotency_key("order-7"))
        .await
        .unwrap();
    let k2 = t
        .create_task(req("caller", json!({"n": 2})).idempotency_key("order-7"))
        .await
        .unwrap();
    assert_eq!(
        (k1.uuid.clone(), k1.replayed, k2.replayed),
        (k2.uuid.clone(), false, true)
    );
    let e = t
        .create_task(req("caller", json!({"n": 1})))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Validation);
    assert!(e.message.contains("idempotency_key"), "{e}");
    // A key also de-duplicates under other strategies.
    let s1 = t
        .create_task(req("unique", json!({})).idempotency_key("k"))
        .await
        .unwrap();
    let s2 = t
        .create_task(req("unique", json!({})).idempotency_key("k"))
        .await
        .unwrap();
    assert_eq!(s1.uuid, s2.uuid);

    let u1 = t
        .create_task(req("unique", json!({"same": true})))
        .await
        .unwrap();
    let u2 = t
        .create_task(req("unique", json!({"same": true})))
        .await
        .unwrap();
    assert_ne!(u1.uuid, u2.uuid);
    assert!(!u2.replayed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_template_lists_known_versions() {
    let t = open().await;
    register(&t, &one_step("versioned", "ok", "")).await;
    let e = t
        .create_task(req("versioned", json!({})).version("2.0.0"))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("1.0.0"), "{e}");
    let e = t
        .create_task(req("nothing_here", json!({})))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_see_every_completed_ancestor() {
    let t = open().await;
    register(
        &t,
        r#"
name: chain
namespace_name: eng
version: "1.0.0"
steps:
  - name: a
    handler: { callable: record, initialization: { tag: first } }
  - name: b
    handler: { callable: record }
    dependencies: [a]
  - name: c
    handler: { callable: record }
    dependencies: [b]
"#,
    )
    .await;
    t.register_handler(
        "record",
        handler_fn(|ctx| async move {
            let seen: Vec<String> = ctx.dependency_results().keys().cloned().collect();
            StepOutcome::success(json!({
                "me": ctx.step_name(),
                "seen": seen,
                "tag": ctx.get_config("tag"),
                "input": ctx.get_input("n"),
            }))
        }),
    );
    let task = t
        .run_task(req("chain", json!({"n": 5})), WAIT)
        .await
        .unwrap();
    assert_eq!(task.status, TaskState::Complete);
    let c = task.step("c").unwrap().result.clone().unwrap();
    let mut seen: Vec<String> = serde_json::from_value(c["seen"].clone()).unwrap();
    seen.sort();
    assert_eq!(seen, ["a", "b"], "grandparent a is visible to c");
    assert_eq!(
        task.step("a").unwrap().result.as_ref().unwrap()["tag"],
        json!("first")
    );
    assert_eq!(c["input"], json!(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_steps_run_concurrently() {
    let t = open().await;
    register(
        &t,
        r#"
name: fork
namespace_name: eng
version: "1.0.0"
steps:
  - name: root
    handler: { callable: ok }
  - name: left
    handler: { callable: slow }
    dependencies: [root]
  - name: right
    handler: { callable: slow }
    dependencies: [root]
"#,
    )
    .await;
    t.register_handler("ok", ok());
    t.register_handler(
        "slow",
        handler_fn(|_| async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            StepOutcome::success(json!({}))
        }),
    );
    let task = t.run_task(req("fork", json!({})), WAIT).await.unwrap();
    assert_eq!(task.status, TaskState::Complete);
    let (l, r) = (task.step("left").unwrap(), task.step("right").unwrap());
    let (ls, le) = (l.started_at.unwrap(), l.completed_at.unwrap());
    let (rs, re) = (r.started_at.unwrap(), r.completed_at.unwrap());
    assert!(le - ls >= 150 && re - rs >= 150);
    assert!(
        ls < re && rs < le,
        "intervals [{ls},{le}] and [{rs},{re}] do not overlap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_task_fences_off_the_late_result() {
    let t = open().await;
    register(
        &t,
        &two_steps("cancel_me", "gated", "ok", "{ max_attempts: 1 }"),
    )
    .await;
    let started = Arc::new(Notify::new());
    let gate = Arc::new(Notify::new());
    let (s, g) = (started.clone(), gate.clone());
    t.register_handler(
        "gated",
        handler_fn(move |_| {
            let (s, g) = (s.clone(), g.clone());
            async move {
                s.notify_one();
                g.notified().await;
                StepOutcome::success(json!({"late": true}))
            }
        }),
    );
    t.register_handler("ok", ok());
    let handle = t.create_task(req("cancel_me", json!({}))).await.unwrap();
    started.notified().await;
    assert_eq!(
        handle.get().await.unwrap().step("a").unwrap().state,
        StepState::InProgress
    );
    assert_eq!(
        t.cancel(&handle.uuid, "changed my mind").await.unwrap(),
        TaskState::Cancelled
    );
    let task = handle.wait(WAIT).await.unwrap();
    assert_eq!(task.status, TaskState::Cancelled);
    assert!(task.completed_at.is_some());
    assert!(task.steps.iter().all(|s| s.state == StepState::Cancelled));
    gate.notify_one();
    // The late result goes through the completer; wait for its rejection to be recorded.
    let rejected = eventually(|| async {
        let r = t.store().rejected_completions(&handle.uuid).await.unwrap();
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(rejected.len(), 1);
    assert!(
        rejected[0].reason.contains("cancelled"),
        "{}",
        rejected[0].reason
    );
    let task = handle.get().await.unwrap();
    assert_eq!(task.status, TaskState::Cancelled);
    assert_eq!(
        task.step("a").unwrap().result,
        None,
        "the late result was not applied"
    );
}

/// Re-checks `probe` on every engine-state change (bounded), for effects that no task state
/// reflects (a rejected late completion).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_resolution_unblocks_dependents() {
    let t = open().await;
    register(
        &t,
        &two_steps("resolve", "perm", "ok", "{ max_attempts: 1 }"),
    )
    .await;
    t.register_handler("perm", failing(u32::MAX, StepOutcome::permanent("no")).0);
    t.register_handler("ok", ok());
    let handle = t.create_task(req("resolve", json!({}))).await.unwrap();
    assert_eq!(
        handle.wait(WAIT).await.unwrap().status,
        TaskState::BlockedByFailures
    );
    let state = t
        .resolve_step(&handle.uuid, "a", "done by hand")
        .await
        .unwrap();
    assert!(
        !state.is_terminal() && state != TaskState::BlockedByFailures,
        "{state}"
    );
    let task = handle.wait(WAIT).await.unwrap();
    assert_eq!(task.status, TaskState::Complete);
    assert_eq!(task.step("a").unwrap().state, StepState::ResolvedManually);
    assert_eq!(task.step("b").unwrap().state, StepState::Complete);
    let tr = t.step_transitions(&handle.uuid, Some("a")).await.unwrap();
    let r = tr.iter().find(|t| t.event == "resolve_manually").unwrap();
    assert_eq!(
        (r.actor.as_str(), r.reason.as_deref()),
        ("operator", Some("done by hand"))
    );
    let fix = t
        .task_transitions(&handle.uuid)
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.event == "operator_fixed_step")
        .unwrap();
    assert_eq!(
        (fix.actor.as_str(), fix.reason.as_deref()),
        ("operator", Some("done by hand"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_step_resumes_a_blocked_task() {
    let t = open().await;
    register(&t, &two_steps("reset", "once", "ok", "{ max_attempts: 1 }")).await;
    let (h, calls) = failing(1, StepOutcome::permanent("first time fails"));
    t.register_handler("once", h);
    t.register_handler("ok", ok());
    let handle = t.create_task(req("reset", json!({}))).await.unwrap();
    assert_eq!(
        handle.wait(WAIT).await.unwrap().status,
        TaskState::BlockedByFailures
    );
    t.operator(
        &handle.uuid,
        tasker_core::store::OperatorAction::ResetStep { step: "a".into() },
        "alice",
        "upstream fixed",
    )
    .await
    .unwrap();
    let task = handle.wait(WAIT).await.unwrap();
    assert_eq!(task.status, TaskState::Complete);
    assert_eq!(
        task.step("a").unwrap().attempts,
        1,
        "attempts restarted from 0"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let reset = t
        .step_transitions(&handle.uuid, Some("a"))
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.event == "reset")
        .unwrap();
    assert_eq!(
        (reset.actor.as_str(), reset.reason.as_deref()),
        ("alice", Some("upstream fixed"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_times_out_with_a_timeout_error() {
    let t = open().await;
    register(&t, &one_step("long", "forever", "")).await;
    t.register_handler("forever", handler_fn(|_| std::future::pending()));
    let handle = t.create_task(req("long", json!({}))).await.unwrap();
    let e = handle
        .wait(Some(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Timeout, "{e}");
    assert_eq!(e.details.unwrap()["task_uuid"], json!(handle.uuid));
    t.cancel(&handle.uuid, "cleanup").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_at_is_set_on_every_terminal_state() {
    let t = open().await;
    register(&t, &one_step("ends_ok", "ok", "")).await;
    register(
        &t,
        &one_step("ends_bad", "perm", "    retry: { max_attempts: 1 }"),
    )
    .await;
    register(&t, &one_step("ends_never", "forever", "")).await;
    t.register_handler("ok", ok());
    t.register_handler("perm", failing(u32::MAX, StepOutcome::permanent("no")).0);
    t.register_handler("forever", handler_fn(|_| std::future::pending()));

    let done = t.run_task(req("ends_ok", json!({})), WAIT).await.unwrap();
    assert_eq!(
        (done.status, done.completed_at.is_some()),
        (TaskState::Complete, true)
    );
    let gave_up = t.run_task(req("ends_bad", json!({})), WAIT).await.unwrap();
    assert_eq!(gave_up.completed_at, None);
    assert_eq!(
        t.give_up(&gave_up.uuid, "hopeless").await.unwrap(),
        TaskState::Error
    );
    let resolved = t.run_task(req("ends_bad", json!({})), WAIT).await.unwrap();
    assert_eq!(
        t.resolve(&resolved.uuid, "elsewhere").await.unwrap(),
        TaskState::ResolvedManually
    );
    let cancelled = t.create_task(req("ends_never", json!({}))).await.unwrap();
    t.cancel(&cancelled.uuid, "stop").await.unwrap();
    for (uuid, state) in [
        (&gave_up.uuid, TaskState::Error),
        (&resolved.uuid, TaskState::ResolvedManually),
        (&cancelled.uuid, TaskState::Cancelled),
    ] {
        let task = t.task(uuid.clone()).wait(WAIT).await.unwrap();
        assert_eq!(task.status, state);
        assert!(task.completed_at.is_some(), "{state} without completed_at");
    }
    let e = t.give_up(&gave_up.uuid, "again").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidTransition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_without_steps_completes_at_creation() {
    let t = open().await;
    register(
        &t,
        "name: empty\nnamespace_name: eng\nversion: \"1.0.0\"\nsteps: []\n",
    )
    .await;
    let handle = t.create_task(req("empty", json!({}))).await.unwrap();
    let task = handle.get().await.unwrap();
    assert_eq!(task.status, TaskState::Complete);
    assert!(task.completed_at.is_some());
    let events: Vec<String> = t
        .task_transitions(&handle.uuid)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.event)
        .collect();
    assert_eq!(events, ["create", "start", "no_steps_found"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_result_obeys_the_rules_of_a_handler_result() {
    let t = open().await;
    register(
        &t,
        &two_steps("by_hand", "perm", "ok", "{ max_attempts: 1 }"),
    )
    .await;
    t.register_handler("perm", failing(u32::MAX, StepOutcome::permanent("no")).0);
    t.register_handler("ok", ok());
    let handle = t.create_task(req("by_hand", json!({}))).await.unwrap();
    assert_eq!(
        handle.wait(WAIT).await.unwrap().status,
        TaskState::BlockedByFailures
    );
    let e = t
        .complete_step(&handle.uuid, "a", json!([1, 2]), "by hand")
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Validation, "{e}");
    assert!(e.message.contains("JSON object"), "{e}");
    assert_eq!(
        handle.get().await.unwrap().step("a").unwrap().state,
        StepState::Error
    );
    t.complete_step(&handle.uuid, "a", json!({"value": 7}), "by hand")
        .await
        .unwrap();
    let task = handle.wait(WAIT).await.unwrap();
    assert_eq!(task.status, TaskState::Complete);
    assert_eq!(task.step("a").unwrap().result, Some(json!({"value": 7})));
}

/// A parent whose workflow step `child` runs `eng/{child_template}` after `start`.
fn workflow_parent(name: &str, child_template: &str, step_extra: &str) -> String {
    format!(
        r#"
name: {name}
namespace_name: eng
version: "1.0.0"
identity_strategy: always_unique
steps:
  - {{ name: start, handler: {{ callable: ok }} }}
  - name: child
    type: workflow
    dependencies: [start]
    handler:
      callable: WorkflowHandler
      initialization: {{ task_template: {child_template}, context: {{ from_parent: $context/n }} }}
{step_extra}
"#
    )
}

async fn children(t: &Tasker, parent: &str) -> Vec<tasker_core::TaskSummary> {
    t.list_tasks(&tasker_core::TaskFilter {
        parent_task_uuid: Some(parent.to_string()),
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_step_that_cannot_start_its_child_fails_for_good() {
    let t = open().await;
    t.register_handler("ok", ok());
    register(&t, &workflow_parent("orphaned", "missing_child", "")).await;
    let task = t
        .run_task(req("orphaned", json!({"n": 1})), WAIT)
        .await
        .unwrap();
    assert_eq!(task.status, TaskState::BlockedByFailures);
    let step = task.step("child").unwrap();
    assert_eq!((step.state, step.attempts), (StepState::Error, 1));
    let e = step.error.as_ref().unwrap();
    assert_eq!(e.error_type, ErrorType::WorkflowError);
    assert!(!e.retryable);
    assert!(e.message.contains("eng/missing_child"), "{}", e.message);
    // A mapping that points at nothing names the reference.
    register(&t, &one_step("kid", "ok", "")).await;
    register(&t, &workflow_parent("bad_ref", "kid", "")).await;
    let task = t.run_task(req("bad_ref", json!({})), WAIT).await.unwrap();
    let e = task.step("child").unwrap().error.clone().unwrap();
    assert!(
        e.message.contains("context.from_parent") && e.message.contains("/n"),
        "{}",
        e.message
    );
    assert!(children(&t, &task.uuid).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_child_keeps_its_parent_waiting_until_an_operator_acts() {
    let t = open().await;
    t.register_handler("ok", ok());
    t.register_handler(
        "perm",
        failing(u32::MAX, StepOutcome::permanent("broken")).0,
    );
    register(&t, &two_steps("kid", "ok", "perm", "{ max_attempts: 1 }")).await;
    register(&t, &workflow_parent("waits", "kid", "")).await;
    let handle = t.create_task(req("waits", json!({"n": 5}))).await.unwrap();
    let kid = eventually(|| async {
        let c = children(&t, &handle.uuid).await;
        let c = c.first()?;
        (c.status == TaskState::BlockedByFailures).then(|| c.uuid.clone())
    })
    .await;
    let child = t.get_task(&kid).await.unwrap();
    assert_eq!(child.context["from_parent"], json!(5));
    // The parent does not move while its child needs an operator.
    let parent = handle.get().await.unwrap();
    assert_eq!(parent.status, TaskState::StepsInProcess);
    assert_eq!(parent.step("child").unwrap().state, StepState::InProgress);
    // Resolving the child completes the step with what the child has.
    t.resolve(&kid, "accepted as is").await.unwrap();
    let parent = handle.wait(WAIT).await.unwrap();
    assert_eq!(parent.status, TaskState::Complete);
    let r = parent.step("child").unwrap().result.clone().unwrap();
    assert_eq!(r["child_task_uuid"], json!(kid));
    assert_eq!(r["child_status"], json!("resolved_manually"));
    assert_eq!(r["results"], json!({"a": {"ok": true}}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_workflow_step_waits_for_the_child_it_already_started() {
    let clock = TestClock::new(1_700_000_000_000);
    let t = open_with_clock(&clock).await;
    t.register_handler("ok", ok());
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    t.register_handler(
        "gated",
        handler_fn(move |_ctx| {
            let g = g.clone();
            async move {
                g.notified().await;
                StepOutcome::success(json!({"released": true}))
            }
        }),
    );
    register(&t, &one_step("kid", "gated", "")).await;
    register(
        &t,
        &workflow_parent(
            "timed",
            "kid",
            "    timeout_seconds: 1\n    retry: { max_attempts: 3, backoff: none }",
        ),
    )
    .await;
    let handle = t.create_task(req("timed", json!({"n": 1}))).await.unwrap();
    eventually(|| async {
        let p = handle.get().await.ok()?;
        (p.step("child")?.state == StepState::InProgress).then_some(())
    })
    .await;
    eventually(|| async { (children(&t, &handle.uuid).await.len() == 1).then_some(()) }).await;
    // The wait for the child times out; the retry attaches to the same child.
    clock.advance(Duration::from_secs(2));
    t.sweep().await.unwrap();
    eventually(|| async {
        let p = handle.get().await.ok()?;
        let s = p.step("child")?;
        (s.state == StepState::InProgress && s.attempts == 2).then_some(())
    })
    .await;
    gate.notify_one();
    let parent = handle.wait(WAIT).await.unwrap();
    assert_eq!(parent.status, TaskState::Complete);
    let kids = children(&t, &handle.uuid).await;
    assert_eq!(kids.len(), 1);
    let step = parent.step("child").unwrap();
    assert_eq!(step.attempts, 2);
    assert_eq!(
        step.result.as_ref().unwrap()["child_task_uuid"],
        json!(kids[0].uuid)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_starts_itself_stops_at_the_nesting_limit() {
    let t = open().await;
    t.register_handler("ok", ok());
    register(&t, &workflow_parent("recursive", "recursive", "")).await;
    let top = t
        .create_task(req("recursive", json!({"n": 1})))
        .await
        .unwrap();
    // The deepest task's workflow step fails; each level above waits on the one below.
    let deepest = eventually(|| async {
        let mut uuid = top.uuid.clone();
        let mut levels = 0;
        loop {
            let kids = children(&t, &uuid).await;
            match kids.first() {
                Some(k) => {
                    uuid = k.uuid.clone();
                    levels += 1;
                }
                None => break,
            }
        }
        let task = t.get_task(&uuid).await.ok()?;
        (task.status == TaskState::BlockedByFailures).then_some((levels, task))
    })
    .await;
    let (levels, task) = deepest;
    assert_eq!(levels, tasker_core::workflow::MAX_WORKFLOW_DEPTH);
    let e = task.step("child").unwrap().error.clone().unwrap();
    assert_eq!(e.error_type, ErrorType::WorkflowError);
    assert!(e.message.contains("nest at most"), "{}", e.message);
    // Cancelling the top task ends the whole chain.
    t.cancel(&top.uuid, "stop the recursion").await.unwrap();
    assert_eq!(
        t.get_task(&task.uuid).await.unwrap().status,
        TaskState::Cancelled
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_completing_a_decision_or_analyzer_creates_its_steps() {
    let t = open().await;
    t.register_handler("ok", ok());
    t.register_handler("perm", failing(u32::MAX, StepOutcome::permanent("down")).0);
    register(
        &t,
        r#"
name: manual_fanout
namespace_name: eng
version: "1.0.0"
identity_strategy: always_unique
steps:
  - { name: start, handler: { callable: ok } }
  - { name: route, type: decision, dependencies: [start], handler: { callable: perm }, retry: { max_attempts: 1 } }
  - { name: yes, dependencies: [route], handler: { callable: ok } }
  - { name: analyze, type: batchable, dependencies: [yes], handler: { callable: perm }, retry: { max_attempts: 1 } }
  - name: work
    type: batch_worker
    dependencies: [analyze]
    handler: { callable: ok }
    batch_config: { batch_size: 10 }
  - { name: total, type: deferred_convergence, dependencies: [work], handler: { callable: ok } }
"#,
    )
    .await;
    let handle = t
        .create_task(req("manual_fanout", json!({})))
        .await
        .unwrap();
    let blocked = handle.wait(WAIT).await.unwrap();
    assert_eq!(blocked.status, TaskState::BlockedByFailures);
    // An outcome naming a step outside the decision's branches is refused; nothing changes.
    let e = t
        .complete_step(
            &handle.uuid,
            "route",
            json!({"decision_point_outcome": {"type": "create_steps", "step_names": ["nope"]}}),
            "try",
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Validation, "{e}");
    assert!(e.message.contains("nope"), "{e}");
    let still = handle.get().await.unwrap();
    assert_eq!(still.step("route").unwrap().state, StepState::Error);
    assert_eq!(still.steps.len(), 2);
    // A valid outcome creates the branch; its analyzer fails in turn and is completed by hand
    // with batches: the workers and the aggregator are created and run.
    t.complete_step(
        &handle.uuid,
        "route",
        json!({"decision_point_outcome": {"type": "create_steps", "step_names": ["yes"]}}),
        "route by hand",
    )
    .await
    .unwrap();
    let blocked = handle.wait(WAIT).await.unwrap();
    assert_eq!(blocked.step("analyze").unwrap().state, StepState::Error);
    let outcome = tasker_core::batch::create_batch_outcome(25, 10).to_value();
    t.complete_step(
        &handle.uuid,
        "analyze",
        json!({ "batch_processing_outcome": outcome }),
        "batches by hand",
    )
    .await
    .unwrap();
    let done = handle.wait(WAIT).await.unwrap();
    assert_eq!(done.status, TaskState::Complete);
    let mut names: Vec<&str> = done.steps.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "analyze", "route", "start", "total", "work_001", "work_002", "work_003", "yes"
        ]
    );
}
