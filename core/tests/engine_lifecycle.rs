//! Lifecycle limits through the engine handle, on a test clock: the sweeper's periodic check,
//! waiters woken by the move to `error`, and the DLQ methods of `Tasker`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::register;
use serde_json::json;
use tasker_core::clock::{Clock, TestClock};
use tasker_core::{
    Config, DlqFilter, DlqReason, DlqResolution, ErrorKind, OpenOptions, StepOutcome, StepState,
    TaskRequest, TaskState, Tasker, handler_fn,
};

const WAIT: Option<Duration> = Some(Duration::from_secs(20));
const MIN: Duration = Duration::from_secs(60);

async fn open(clock: &TestClock, config: Config, background: bool) -> Tasker {
    let options = OpenOptions {
        config,
        clock: Arc::new(clock.clone()),
        background,
    };
    Tasker::open_with("sqlite::memory:", options).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_backing_off_past_its_limit_ends_in_error_with_a_dlq_entry() {
    let clock = TestClock::default();
    let config = Config {
        poll_interval: Duration::from_millis(100),
        ..Config::default()
    };
    let t = open(&clock, config, true).await;
    register(
        &t,
        r#"
name: backoff_limit
namespace_name: life
version: "1.0.0"
lifecycle: { max_waiting_for_retry_minutes: 5 }
steps:
  - name: call_partner
    handler: { callable: partner }
    retry: { max_attempts: 5, backoff: linear, backoff_base_ms: 3600000, max_backoff_ms: 3600000, jitter: false }
"#,
    )
    .await;
    t.register_handler(
        "partner",
        handler_fn(|_| async { StepOutcome::retryable("partner API is down") }),
    );
    let handle = t
        .create_task(TaskRequest::new("life", "backoff_limit", json!({})))
        .await
        .unwrap();
    handle
        .wait_until(|s| s == TaskState::WaitingForRetry, WAIT)
        .await
        .unwrap();

    clock.advance(6 * MIN);
    t.sweep().await.unwrap();
    // `wait` returns: the move to `error` wakes waiters.
    let task = handle.wait(WAIT).await.unwrap();
    assert_eq!(task.status, TaskState::Error);
    let step = task.step("call_partner").unwrap();
    assert_eq!((step.state, step.attempts), (StepState::Cancelled, 1));
    let last = t
        .task_transitions(&handle.uuid)
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(
        (last.event.as_str(), last.actor.as_str()),
        ("lifecycle_exceeded", t.worker_id())
    );

    let filter = DlqFilter {
        task_uuid: Some(handle.uuid.clone()),
        ..DlqFilter::default()
    };
    let listed = t.dlq_list(&filter).await.unwrap();
    assert_eq!(listed.len(), 1);
    let entry = t.dlq_get(&listed[0].dlq_entry_uuid).await.unwrap();
    assert_eq!(
        (entry.reason, entry.original_state),
        (DlqReason::MaxWaitingForRetry, TaskState::WaitingForRetry)
    );
    assert_eq!(entry.created_at, clock.now());
    let snapshot = entry.snapshot.unwrap();
    assert_eq!(snapshot["steps"][0]["state"], "waiting_for_retry");
    assert_eq!(
        snapshot["steps"][0]["error"]["message"],
        "partner API is down"
    );
    assert_eq!(
        t.dlq_stats().await.unwrap().by_reason["max_waiting_for_retry_minutes"],
        1
    );

    let resolved = t
        .dlq_resolve(
            &entry.dlq_entry_uuid,
            DlqResolution::PermanentlyFailed,
            Some("partner retired the API"),
            "ops",
        )
        .await
        .unwrap();
    assert_eq!(resolved.resolution_status, DlqResolution::PermanentlyFailed);
    assert_eq!(resolved.resolved_at, Some(clock.now()));
    assert_eq!(
        t.get_task(&handle.uuid).await.unwrap().status,
        TaskState::Error
    );
    let e = t.dlq_get("missing").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_checks_at_most_every_lifecycle_check_interval() {
    let clock = TestClock::default();
    let config = Config {
        lifecycle_check_every: 5 * MIN,
        staleness_threshold: 30 * MIN,
        ..Config::default()
    };
    // No background work: steps stay enqueued and only `sweep` runs the check.
    let t = open(&clock, config, false).await;
    register(
        &t,
        r#"
name: duration_limit
namespace_name: life
version: "1.0.0"
lifecycle: { max_duration_minutes: 1 }
steps:
  - name: only
    handler: { callable: nobody }
"#,
    )
    .await;
    register(
        &t,
        r#"
name: no_limits
namespace_name: life
version: "1.0.0"
steps:
  - name: only
    handler: { callable: nobody }
"#,
    )
    .await;
    let limited = t
        .create_task(TaskRequest::new("life", "duration_limit", json!({})))
        .await
        .unwrap();
    let plain = t
        .create_task(TaskRequest::new("life", "no_limits", json!({})))
        .await
        .unwrap();
    t.sweep().await.unwrap(); // the first check, at once: nothing is late yet
    clock.advance(2 * MIN);
    t.sweep().await.unwrap();
    assert_eq!(
        limited.get().await.unwrap().status,
        TaskState::StepsInProcess,
        "the next check is not due before 5 minutes"
    );
    clock.advance(3 * MIN);
    t.sweep().await.unwrap();
    assert_eq!(limited.get().await.unwrap().status, TaskState::Error);
    assert_eq!(plain.get().await.unwrap().status, TaskState::StepsInProcess);

    // Staleness catches the task without a template limit; `enforce_lifecycle` runs the check
    // whenever asked.
    clock.advance(26 * MIN);
    let moved = t.enforce_lifecycle().await.unwrap();
    assert_eq!(moved.len(), 1);
    assert_eq!(
        (moved[0].task_uuid.as_str(), moved[0].reason),
        (plain.uuid.as_str(), DlqReason::Staleness)
    );
    assert_eq!(plain.get().await.unwrap().status, TaskState::Error);
    assert_eq!(t.dlq_stats().await.unwrap().total, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_past_its_limit_ends_the_child_workflow_it_waits_for() {
    let config = Config {
        poll_interval: Duration::from_millis(50),
        lifecycle_check_every: Duration::from_millis(20),
        ..Config::default()
    };
    let options = OpenOptions {
        config,
        ..OpenOptions::default()
    };
    let t = Tasker::open_with("sqlite::memory:", options).await.unwrap();
    t.register_handler(
        "hang",
        handler_fn(|_| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            StepOutcome::success(json!({}))
        }),
    );
    register(
        &t,
        r#"
name: slow_kid
namespace_name: life
version: "1.0.0"
steps:
  - { name: hang, handler: { callable: hang } }
"#,
    )
    .await;
    register(
        &t,
        r#"
name: impatient_parent
namespace_name: life
version: "1.0.0"
lifecycle: { max_duration_minutes: 0.005 }
steps:
  - name: run_child
    type: workflow
    handler: { callable: WorkflowHandler, initialization: { task_template: slow_kid } }
"#,
    )
    .await;
    let handle = t
        .create_task(TaskRequest::new("life", "impatient_parent", json!({})))
        .await
        .unwrap();
    let parent = handle.wait(WAIT).await.unwrap();
    assert_eq!(parent.status, TaskState::Error);
    assert_eq!(
        parent.step("run_child").unwrap().state,
        StepState::Cancelled
    );
    let entry = &t
        .dlq_list(&DlqFilter {
            task_uuid: Some(handle.uuid.clone()),
            ..DlqFilter::default()
        })
        .await
        .unwrap()[0];
    assert_eq!(
        (entry.reason, entry.original_state),
        (DlqReason::MaxDuration, TaskState::StepsInProcess)
    );
    // The child nobody waits for any more is cancelled, its running step with it.
    let filter = tasker_core::TaskFilter {
        parent_task_uuid: Some(handle.uuid.clone()),
        ..Default::default()
    };
    let mut child = None;
    for _ in 0..1000 {
        let kids = t.list_tasks(&filter).await.unwrap();
        if let Some(k) = kids.first().filter(|k| k.status.is_terminal()) {
            child = Some(t.get_task(&k.uuid).await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let child = child.expect("the child ends within 10 s");
    assert_eq!(child.status, TaskState::Cancelled);
    assert_eq!(child.step("hang").unwrap().state, StepState::Cancelled);
}
