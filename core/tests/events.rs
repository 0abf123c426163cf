//! Domain events (SPEC §10) end to end: what the outbox holds per committed result, what
//! subscribers receive, redelivery, and that subscribers never hold steps back. Waits are on
//! observable state, never on a fixed sleep.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, register};
use serde_json::{Value, json};
use tasker_core::clock::{SystemClock, TestClock};
use tasker_core::events::{DeliveryMode, DomainEvent, EventFilter, StoredEvent, subscriber_fn};
use tasker_core::{Config, OpenOptions, StepOutcome, TaskRequest, TaskState, Tasker, handler_fn};
use tokio::sync::Semaphore;

const WAIT: Option<Duration> = Some(Duration::from_secs(20));

async fn open_with(clock: Arc<dyn tasker_core::clock::Clock>) -> Tasker {
    Tasker::open_with(
        "sqlite::memory:",
        OpenOptions {
            config: Config {
                poll_interval: Duration::from_millis(50),
                unknown_callable_grace: Duration::ZERO,
                ..Config::default()
            },
            clock,
            background: true,
        },
    )
    .await
    .unwrap()
}

/// `flaky` fails once (retryably) then succeeds; `doomed` fails for good. Each declares
/// events of every condition.
const TEMPLATE: &str = r#"
name: evented
namespace_name: ev
version: "1.0.0"
identity_strategy: always_unique
steps:
  - name: flaky
    handler: { callable: flaky }
    retry: { max_attempts: 3, backoff: none }
    publishes_events:
      - { name: flaky.succeeded, condition: success, delivery_mode: durable }
      - { name: flaky.failed, condition: failure, delivery_mode: durable }
      - { name: flaky.retrying, condition: retryable_failure, delivery_mode: durable }
      - { name: flaky.gave_up, condition: permanent_failure, delivery_mode: durable }
      - { name: flaky.attempted, condition: always, delivery_mode: durable }
      - { name: flaky.fast, condition: always, delivery_mode: fast }
      - { name: flaky.broadcast, condition: success, delivery_mode: broadcast }
  - name: doomed
    handler: { callable: doomed }
    dependencies: [flaky]
    publishes_events:
      - { name: doomed.succeeded, condition: success }
      - { name: doomed.gave_up, condition: permanent_failure }
"#;

fn handlers(t: &Tasker) {
    let calls = Arc::new(Mutex::new(0u32));
    t.register_handler(
        "flaky",
        handler_fn(move |_ctx| {
            let calls = calls.clone();
            async move {
                let n = {
                    let mut c = calls.lock().unwrap();
                    *c += 1;
                    *c
                };
                if n == 1 {
                    StepOutcome::retryable("first try fails")
                } else {
                    StepOutcome::success(json!({"charged": 42}))
                }
            }
        }),
    );
    t.register_handler(
        "doomed",
        handler_fn(|_| async { StepOutcome::permanent("card declined") }),
    );
}

/// Every event a subscriber saw, in arrival order.
type Seen = Arc<Mutex<Vec<DomainEvent>>>;

fn recording(t: &Tasker, pattern: &str) -> Seen {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    t.subscribe(
        pattern,
        subscriber_fn(move |e| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push(e);
                Ok(())
            }
        }),
    );
    seen
}

async fn outbox(t: &Tasker, task: &str) -> Vec<StoredEvent> {
    t.domain_events(&EventFilter {
        task_uuid: Some(task.to_string()),
        ..Default::default()
    })
    .await
    .unwrap()
}

fn names_by_attempt(records: &[StoredEvent]) -> Vec<(String, u32)> {
    let mut v: Vec<(String, u32)> = records
        .iter()
        .map(|r| (r.event.event_name.clone(), r.event.metadata.attempt))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_matching_declaration_emits_once_per_committed_result() {
    let t = open_with(Arc::new(SystemClock)).await;
    handlers(&t);
    register(&t, TEMPLATE).await;
    let seen = recording(&t, "*");
    let only_flaky = recording(&t, "flaky.*");
    let task = t
        .run_task(TaskRequest::new("ev", "evented", json!({})), WAIT)
        .await
        .unwrap();
    assert_eq!(task.status, TaskState::BlockedByFailures);
    // Attempt 1 of flaky failed and was retried, attempt 2 succeeded, doomed failed for good.
    let records = outbox(&t, &task.uuid).await;
    let expected: Vec<(String, u32)> = [
        ("doomed.gave_up", 1),
        ("flaky.attempted", 1),
        ("flaky.attempted", 2),
        ("flaky.broadcast", 2),
        ("flaky.failed", 1),
        ("flaky.retrying", 1),
        ("flaky.succeeded", 2),
    ]
    .into_iter()
    .map(|(n, a)| (n.to_string(), a))
    .collect();
    assert_eq!(names_by_attempt(&records), expected);
    // Metadata and payloads.
    let ok = records
        .iter()
        .find(|r| r.event.event_name == "flaky.succeeded")
        .unwrap();
    let m = &ok.event.metadata;
    assert_eq!(ok.event.payload, json!({"charged": 42}));
    assert_eq!(
        (
            m.task_uuid.as_str(),
            m.step_name.as_str(),
            m.namespace.as_str()
        ),
        (task.uuid.as_str(), "flaky", "ev")
    );
    assert_eq!(m.correlation_id, task.correlation_id);
    assert_eq!(m.step_uuid, task.step("flaky").unwrap().uuid);
    assert_eq!(m.fired_by, t.worker_id());
    let declined = records
        .iter()
        .find(|r| r.event.event_name == "doomed.gave_up")
        .unwrap();
    assert_eq!(
        declined.event.payload["error"]["message"],
        json!("card declined")
    );
    // Every durable record reaches each matching subscriber, exactly once in this healthy run;
    // fast and broadcast events come through the bus.
    eventually(|| async {
        let all = outbox(&t, &task.uuid).await;
        all.iter()
            .filter(|r| r.event.delivery_mode == DeliveryMode::Durable)
            .all(|r| r.delivered_at.is_some())
            .then_some(())
    })
    .await;
    let count = |seen: &Seen| -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for e in seen.lock().unwrap().iter() {
            *m.entry(e.event_id.clone()).or_default() += 1;
        }
        m
    };
    let all = count(&seen);
    for r in &records {
        assert_eq!(
            all.get(&r.event.event_id),
            Some(&1),
            "{}",
            r.event.event_name
        );
    }
    let fast: Vec<u32> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.event_name == "flaky.fast")
        .map(|e| e.metadata.attempt)
        .collect();
    assert_eq!(fast.len(), 2, "{fast:?}");
    assert_eq!(all.len(), records.len() + fast.len());
    assert!(
        only_flaky
            .lock()
            .unwrap()
            .iter()
            .all(|e| e.event_name.starts_with("flaky."))
    );
    assert_eq!(count(&only_flaky).len(), records.len() - 1 + 2);
    assert_eq!(t.dropped_fast_events(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_does_not_hold_steps_back() {
    let t = open_with(Arc::new(SystemClock)).await;
    t.register_handler(
        "ok",
        handler_fn(|_| async { StepOutcome::success(json!({"ok": true})) }),
    );
    register(
        &t,
        r#"
name: chain
namespace_name: ev
version: "1.0.0"
identity_strategy: always_unique
steps:
  - name: a
    handler: { callable: ok }
    publishes_events: [{ name: chain.step, delivery_mode: durable }, { name: chain.fast, delivery_mode: fast }]
  - name: b
    handler: { callable: ok }
    dependencies: [a]
    publishes_events: [{ name: chain.step, delivery_mode: durable }]
  - name: c
    handler: { callable: ok }
    dependencies: [b]
    publishes_events: [{ name: chain.step, delivery_mode: durable }]
"#,
    )
    .await;
    // The subscriber blocks until the test lets it go.
    let gate = Arc::new(Semaphore::new(0));
    let seen: Seen = Arc::default();
    let (g, s) = (gate.clone(), seen.clone());
    t.subscribe(
        "chain.*",
        subscriber_fn(move |e| {
            let (g, s) = (g.clone(), s.clone());
            async move {
                g.acquire().await.unwrap().forget();
                s.lock().unwrap().push(e);
                Ok(())
            }
        }),
    );
    let task = t
        .run_task(TaskRequest::new("ev", "chain", json!({})), WAIT)
        .await
        .unwrap();
    assert_eq!(task.status, TaskState::Complete);
    assert!(seen.lock().unwrap().is_empty());
    let records = outbox(&t, &task.uuid).await;
    assert_eq!(records.len(), 3);
    assert!(records.iter().all(|r| r.delivered_at.is_none()));
    gate.add_permits(4);
    eventually(|| async {
        let r = outbox(&t, &task.uuid).await;
        r.iter().all(|r| r.delivered_at.is_some()).then_some(())
    })
    .await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 4, "{seen:?}");
    // Durable events arrive in commit order.
    let durable: Vec<&str> = seen
        .iter()
        .filter(|e| e.delivery_mode == DeliveryMode::Durable)
        .map(|e| e.metadata.step_name.as_str())
        .collect();
    assert_eq!(durable, ["a", "b", "c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_subscriber_gets_the_same_event_again_and_steps_are_unaffected() {
    let clock = TestClock::new(1_700_000_000_000);
    let t = open_with(Arc::new(clock.clone())).await;
    t.register_handler(
        "ok",
        handler_fn(|_| async { StepOutcome::success(json!({"n": 1})) }),
    );
    register(
        &t,
        r#"
name: once
namespace_name: ev
version: "1.0.0"
identity_strategy: always_unique
steps:
  - name: only
    handler: { callable: ok }
    publishes_events: [{ name: once.done }]
"#,
    )
    .await;
    let deliveries: Seen = Arc::default();
    let d = deliveries.clone();
    t.subscribe(
        "once.done",
        subscriber_fn(move |e| {
            let d = d.clone();
            async move {
                let n = {
                    let mut d = d.lock().unwrap();
                    d.push(e);
                    d.len()
                };
                match n {
                    1 => Err("downstream unavailable".to_string()),
                    2 => panic!("subscriber bug"),
                    _ => Ok(()),
                }
            }
        }),
    );
    let task = t
        .run_task(TaskRequest::new("ev", "once", json!({})), WAIT)
        .await
        .unwrap();
    assert_eq!(task.status, TaskState::Complete);
    assert_eq!(task.step("only").unwrap().result, Some(json!({"n": 1})));
    // First delivery fails: the record keeps the error and waits for its backoff.
    let failed = eventually(|| async {
        let r = outbox(&t, &task.uuid).await.pop()?;
        r.last_error.is_some().then_some(r)
    })
    .await;
    assert!(failed.delivered_at.is_none());
    assert_eq!(failed.delivery_attempts, 1);
    assert!(
        failed
            .last_error
            .as_deref()
            .unwrap()
            .contains("downstream unavailable")
    );
    // The backoff passes on the test clock; the panic is a failed delivery too.
    clock.advance(Duration::from_secs(600));
    eventually(|| async {
        let r = outbox(&t, &task.uuid).await.pop()?;
        let e = r.last_error?;
        (r.delivery_attempts == 2 && e.contains("panicked")).then_some(())
    })
    .await;
    clock.advance(Duration::from_secs(600));
    eventually(|| async {
        let r = outbox(&t, &task.uuid).await.pop()?;
        (r.delivery_attempts == 3 && r.delivered_at.is_some()).then_some(())
    })
    .await;
    let r = outbox(&t, &task.uuid).await.pop().unwrap();
    assert!(r.delivered_at.is_some());
    let d = deliveries.lock().unwrap();
    assert_eq!(d.len(), 3);
    assert!(d.iter().all(|e| e.event_id == r.event.event_id));
    let payloads: Vec<&Value> = d.iter().map(|e| &e.payload).collect();
    assert!(payloads.iter().all(|p| **p == json!({"n": 1})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_only_mentions_publishes_events_fires_nothing() {
    let t = open_with(Arc::new(SystemClock)).await;
    t.register_handler(
        "ok",
        handler_fn(|_| async { StepOutcome::success(json!({"ok": true})) }),
    );
    register(
        &t,
        r#"
name: mentions
namespace_name: ev
version: "1.0.0"
identity_strategy: always_unique
steps:
  - name: only
    handler: { callable: ok, initialization: { note: "publishes_events", "publishes_events": 1 } }
"#,
    )
    .await;
    let task = t
        .run_task(TaskRequest::new("ev", "mentions", json!({})), WAIT)
        .await
        .unwrap();
    assert_eq!(task.status, TaskState::Complete);
    assert!(outbox(&t, &task.uuid).await.is_empty());
}
