//! Store conformance for lifecycle limits, staleness and the dead-letter record (SPEC §9):
//! written against `Arc<dyn Store>` only and instantiated per backend at the bottom, like
//! `store_conformance.rs`. Time is an argument (`now`), so nothing sleeps.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Value, json};
use tasker_core::clock::Millis;
use tasker_core::job::{ErrorType, StepFailure, StepJob};
use tasker_core::orchestrator::plan_task;
use tasker_core::store::{
    AttemptResult, CallableFilter, ClaimRequest, Completion, Created, NewTask, Resolution, Store,
};
use tasker_core::template::{TaskTemplate, parse_str};
use tasker_core::{
    DlqFilter, DlqReason, DlqResolution, ErrorKind, LifecycleExceeded, StepState, TaskRequest,
    TaskState,
};

const T0: Millis = 1_700_000_000_000;
const MIN: i64 = 60_000;
const ORCH: &str = "orch-1";

type Opener = fn() -> Pin<Box<dyn Future<Output = Db> + Send>>;

/// One fresh database (the directory of a file database lives as long as it).
pub struct Db {
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

// ---------------------------------------------------------------- helpers

/// A two-step chain `a → b` of `callable` with `lifecycle` (YAML flow mapping, or empty).
fn chain(name: &str, callable: &str, lifecycle: &str) -> TaskTemplate {
    let lifecycle = if lifecycle.is_empty() {
        String::new()
    } else {
        format!("lifecycle: {lifecycle}\n")
    };
    let yaml = format!(
        r#"
name: {name}
namespace_name: life
version: "1.0.0"
identity_strategy: always_unique
{lifecycle}steps:
  - name: a
    handler: {{ callable: {callable} }}
  - name: b
    handler: {{ callable: {callable} }}
    dependencies: [a]
"#
    );
    parse_str(&yaml, None, "test")
        .unwrap_or_else(|e| panic!("bad test template: {e}"))
        .template
}

fn plan(t: &TaskTemplate) -> NewTask {
    let request = TaskRequest::new(&t.namespace, &t.name, json!({}));
    plan_task(Arc::new(t.clone()), None, request, 1 << 20).expect("plan")
}

async fn insert(s: &Arc<dyn Store>, task: NewTask, now: Millis) -> String {
    match s.create_task(&task, ORCH, now).await.unwrap() {
        Created::New(uuid) => uuid,
        other => panic!("expected a new task, got {other:?}"),
    }
}

/// Registers `t` and creates one task of it at `now`.
async fn create(s: &Arc<dyn Store>, t: &TaskTemplate, now: Millis) -> String {
    s.put_template(t, false, now).await.unwrap();
    insert(s, plan(t), now).await
}

/// Claims the one enqueued step of `callable` (each test template has its own callable).
async fn claim(s: &Arc<dyn Store>, callable: &str, now: Millis) -> StepJob {
    let req = ClaimRequest {
        worker_id: "w1".into(),
        namespaces: Vec::new(),
        callables: CallableFilter::Only(vec![callable.to_string()]),
        limit: 1,
        lease_ms: 30_000,
        default_timeout_ms: 300_000,
        enqueued_before: None,
    };
    let mut jobs = s.claim(&req, now).await.unwrap();
    assert_eq!(jobs.len(), 1, "expected one claimable {callable} step");
    jobs.pop().unwrap()
}

async fn finish(s: &Arc<dyn Store>, job: &StepJob, resolution: Resolution, now: Millis) {
    let r = AttemptResult {
        step_uuid: job.step_uuid.clone(),
        attempt: job.attempt,
        worker_id: Some("w1".into()),
        expiry: None,
        resolution,
        started_at: Some(job.started_at),
        expansion: None,
    };
    let reports = s.finish(&[r], ORCH, now).await.unwrap();
    assert_eq!(reports[0].completion, Completion::Accepted);
}

fn failure(message: &str) -> StepFailure {
    StepFailure::new(ErrorType::RetryableError, message)
}

/// A task of `t` whose root step failed and backs off for an hour: `waiting_for_retry` since
/// `at`.
async fn backing_off(s: &Arc<dyn Store>, t: &TaskTemplate, at: Millis) -> String {
    let task = create(s, t, at).await;
    let job = claim(s, &t.steps[0].handler.callable, at).await;
    let retry = Resolution::Retry {
        failure: failure("upstream is down"),
        next_attempt_at: at + 60 * MIN,
    };
    finish(s, &job, retry, at).await;
    assert_eq!(
        s.task_state(&task).await.unwrap(),
        TaskState::WaitingForRetry
    );
    task
}

/// A task of `t` whose root step failed for good at `at`: `blocked_by_failures`.
async fn blocked(s: &Arc<dyn Store>, t: &TaskTemplate, at: Millis) -> String {
    let task = create(s, t, at).await;
    let job = claim(s, &t.steps[0].handler.callable, at).await;
    let failed = Resolution::Failed {
        failure: failure("broken for good"),
    };
    finish(s, &job, failed, at).await;
    assert_eq!(
        s.task_state(&task).await.unwrap(),
        TaskState::BlockedByFailures
    );
    task
}

async fn enforce(
    s: &Arc<dyn Store>,
    now: Millis,
    staleness_ms: Option<i64>,
) -> Vec<LifecycleExceeded> {
    s.enforce_lifecycle(now, staleness_ms, ORCH, 100)
        .await
        .unwrap()
}

fn moved(tasks: &[LifecycleExceeded]) -> Vec<(&str, TaskState, DlqReason)> {
    tasks
        .iter()
        .map(|m| (m.task_uuid.as_str(), m.original_state, m.reason))
        .collect()
}

// ---------------------------------------------------------------- the suite

async fn retry_limit_moves_the_task_to_error_through_the_state_machine(db: Db) {
    let s = &db.store;
    let t = chain(
        "retry_limit",
        "retry_work",
        "{max_waiting_for_retry_minutes: 5}",
    );
    let task = backing_off(s, &t, T0).await;
    let before = s.task_transitions(&task).await.unwrap().len();

    assert!(
        enforce(s, T0 + 5 * MIN, None).await.is_empty(),
        "exactly at the limit is not past it"
    );
    let out = enforce(s, T0 + 7 * MIN, None).await;
    assert_eq!(
        moved(&out),
        vec![(
            task.as_str(),
            TaskState::WaitingForRetry,
            DlqReason::MaxWaitingForRetry
        )]
    );

    let view = s.get_task(&task).await.unwrap();
    assert_eq!(
        (view.status, view.completed_at),
        (TaskState::Error, Some(T0 + 7 * MIN))
    );
    // Every unfinished step is cancelled; the retry never comes.
    for step in ["a", "b"] {
        assert_eq!(
            view.step(step).unwrap().state,
            StepState::Cancelled,
            "{step}"
        );
    }
    assert_eq!(s.promote_due_retries(ORCH, T0 + 61 * MIN).await.unwrap(), 0);

    let transitions = s.task_transitions(&task).await.unwrap();
    assert_eq!(
        transitions.len(),
        before + 1,
        "one transition, nothing else"
    );
    let last = transitions.last().unwrap();
    assert_eq!(
        (
            last.from_state.as_deref(),
            last.to_state.as_str(),
            last.event.as_str(),
            last.actor.as_str()
        ),
        (
            Some("waiting_for_retry"),
            "error",
            "lifecycle_exceeded",
            ORCH
        )
    );
    let reason = last.reason.as_deref().unwrap();
    assert_eq!(
        reason,
        "lifecycle.max_waiting_for_retry_minutes = 5 exceeded: 7m00s in waiting_for_retry"
    );
    assert_eq!(last.metadata["dlq_entry_uuid"], out[0].dlq_entry_uuid);
    assert_eq!(
        last.metadata["lifecycle_reason"],
        "max_waiting_for_retry_minutes"
    );
    let cancels: Vec<_> = s
        .step_transitions(&task, None)
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.event == "cancel")
        .map(|t| (t.step_name.unwrap(), t.from_state.unwrap(), t.reason))
        .collect();
    assert_eq!(
        cancels,
        vec![
            (
                "a".to_string(),
                "waiting_for_retry".to_string(),
                Some(reason.to_string())
            ),
            (
                "b".to_string(),
                "pending".to_string(),
                Some(reason.to_string())
            ),
        ]
    );

    // The DLQ entry: reason, original state and a snapshot taken before the steps were
    // cancelled.
    let entry = s.get_dlq(&out[0].dlq_entry_uuid).await.unwrap();
    assert_eq!(entry.task_uuid, task);
    assert_eq!(
        (
            entry.namespace.as_str(),
            entry.name.as_str(),
            entry.version.as_str()
        ),
        ("life", "retry_limit", "1.0.0")
    );
    assert_eq!(entry.reason, DlqReason::MaxWaitingForRetry);
    assert_eq!(entry.original_state, TaskState::WaitingForRetry);
    assert_eq!(entry.message, reason);
    assert_eq!(entry.resolution_status, DlqResolution::Pending);
    assert_eq!(
        (entry.resolved_by.as_deref(), entry.resolved_at),
        (None, None)
    );
    assert_eq!(
        (entry.created_at, entry.updated_at),
        (T0 + 7 * MIN, T0 + 7 * MIN)
    );
    let snap = entry.snapshot.expect("get returns the snapshot");
    assert_eq!(snap["task"]["state"], "waiting_for_retry");
    assert_eq!(snap["task"]["task_uuid"], task.as_str());
    assert_eq!(snap["task"]["entered_state_at"], T0);
    assert_eq!(snap["limits"]["max_waiting_for_retry_minutes"], 5.0);
    assert_eq!(snap["detected_at"], T0 + 7 * MIN);
    let steps = snap["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(
        (&steps[0]["name"], &steps[0]["state"], &steps[0]["attempts"]),
        (&json!("a"), &json!("waiting_for_retry"), &json!(1))
    );
    assert_eq!(steps[0]["error"]["message"], "upstream is down");
    assert_eq!(steps[0]["next_attempt_at"], T0 + 60 * MIN);
    assert_eq!(steps[0]["has_result"], false);
    assert_eq!(
        (&steps[1]["name"], &steps[1]["state"], &steps[1]["error"]),
        (&json!("b"), &json!("pending"), &Value::Null)
    );

    // A terminal task is never touched again, whatever the limits say.
    assert!(enforce(s, T0 + 1000 * MIN, Some(MIN)).await.is_empty());
    assert_eq!(s.task_transitions(&task).await.unwrap().len(), before + 1);
    assert_eq!(s.list_dlq(&DlqFilter::default()).await.unwrap().len(), 1);
}

async fn each_state_limit_counts_from_the_latest_transition(db: Db) {
    let s = &db.store;
    // Two roots running side by side: the task rests in steps_in_process.
    let yaml = r#"
name: in_process_limit
namespace_name: life
version: "1.0.0"
lifecycle: { max_steps_in_process_minutes: 5 }
steps:
  - name: a
    handler: { callable: sip_a }
  - name: b
    handler: { callable: sip_b }
"#;
    let t = parse_str(yaml, None, "test").unwrap().template;
    let task = create(s, &t, T0).await;
    let a = claim(s, "sip_a", T0).await;
    let b = claim(s, "sip_b", T0).await;
    assert_eq!(
        s.task_state(&task).await.unwrap(),
        TaskState::StepsInProcess
    );
    // `a` finishing at +4 min takes the task through evaluation and back into
    // steps_in_process: the limit counts from there.
    let ok = Resolution::Succeeded {
        result: json!({}),
        metadata: Value::Null,
    };
    finish(s, &a, ok.clone(), T0 + 4 * MIN).await;
    assert_eq!(
        s.task_state(&task).await.unwrap(),
        TaskState::StepsInProcess
    );
    assert!(enforce(s, T0 + 9 * MIN, None).await.is_empty());
    let out = enforce(s, T0 + 9 * MIN + 1, None).await;
    assert_eq!(
        moved(&out),
        vec![(
            task.as_str(),
            TaskState::StepsInProcess,
            DlqReason::MaxStepsInProcess
        )]
    );
    let view = s.get_task(&task).await.unwrap();
    assert_eq!(
        view.step("a").unwrap().state,
        StepState::Complete,
        "finished steps stay"
    );
    assert_eq!(view.step("b").unwrap().state, StepState::Cancelled);
    // The running handler's late result is fenced off and recorded.
    let late = AttemptResult {
        step_uuid: b.step_uuid.clone(),
        attempt: b.attempt,
        worker_id: Some("w1".into()),
        expiry: None,
        resolution: ok,
        started_at: Some(b.started_at),
        expansion: None,
    };
    let reports = s.finish(&[late], ORCH, T0 + 10 * MIN).await.unwrap();
    assert!(matches!(reports[0].completion, Completion::Rejected(_)));
    assert_eq!(s.rejected_completions(&task).await.unwrap().len(), 1);
    assert_eq!(s.task_state(&task).await.unwrap(), TaskState::Error);

    // waiting_for_dependencies: a task whose pending steps wait on each other (a cycle the
    // planner would refuse, built here to reach the state).
    let t = chain(
        "deps_limit",
        "deps_work",
        "{max_waiting_for_dependencies_minutes: 1.5}",
    );
    s.put_template(&t, false, T0).await.unwrap();
    let mut stuck = plan(&t);
    stuck.edges.push(("b".into(), "a".into()));
    let waiting = insert(s, stuck, T0).await;
    assert_eq!(
        s.task_state(&waiting).await.unwrap(),
        TaskState::WaitingForDependencies
    );
    assert!(enforce(s, T0 + 90_000, None).await.is_empty());
    let out = enforce(s, T0 + 90_001, None).await;
    assert_eq!(
        moved(&out),
        vec![(
            waiting.as_str(),
            TaskState::WaitingForDependencies,
            DlqReason::MaxWaitingForDependencies
        )]
    );
}

async fn max_duration_counts_from_creation_in_any_state(db: Db) {
    let s = &db.store;
    let t = chain(
        "duration_limit",
        "duration_work",
        "{max_duration_minutes: 10}",
    );
    let task = blocked(s, &t, T0 + 9 * MIN).await;
    assert!(enforce(s, T0 + 19 * MIN, None).await.is_empty());
    let out = enforce(s, T0 + 19 * MIN + 1, None).await;
    assert_eq!(
        moved(&out),
        vec![(
            task.as_str(),
            TaskState::BlockedByFailures,
            DlqReason::MaxDuration
        )]
    );
    let view = s.get_task(&task).await.unwrap();
    assert_eq!(view.status, TaskState::Error);
    assert_eq!(
        view.step("a").unwrap().state,
        StepState::Error,
        "error stays error"
    );
    assert_eq!(view.step("b").unwrap().state, StepState::Cancelled);
    let entry = s.get_dlq(&out[0].dlq_entry_uuid).await.unwrap();
    assert!(
        entry
            .message
            .starts_with("lifecycle.max_duration_minutes = 10 exceeded"),
        "{}",
        entry.message
    );
    assert_eq!(entry.snapshot.unwrap()["steps"][0]["state"], "error");
}

async fn staleness_covers_states_without_a_template_limit(db: Db) {
    let s = &db.store;
    // No lifecycle block: only the staleness threshold applies.
    let t = chain("stale", "stale_work", "");
    let task = blocked(s, &t, T0).await;
    assert!(
        enforce(s, T0 + 1000 * MIN, None).await.is_empty(),
        "no threshold, no limit"
    );
    assert!(enforce(s, T0 + 30 * MIN, Some(30 * MIN)).await.is_empty());
    let out = enforce(s, T0 + 30 * MIN + 1, Some(30 * MIN)).await;
    assert_eq!(
        moved(&out),
        vec![(
            task.as_str(),
            TaskState::BlockedByFailures,
            DlqReason::Staleness
        )]
    );
    let entry = s.get_dlq(&out[0].dlq_entry_uuid).await.unwrap();
    assert_eq!(
        entry.message,
        "staleness threshold of 30m00s exceeded: no progress for 30m00s in blocked_by_failures"
    );
    assert_eq!(
        entry.snapshot.unwrap()["limits"]["staleness_threshold_ms"],
        30 * MIN
    );

    // A task whose handler keeps its lease renewed is making progress, not stale.
    let t = chain("busy", "busy_work", "");
    let busy = create(s, &t, T0).await;
    let job = claim(s, "busy_work", T0).await;
    let renewed = s
        .renew_leases(
            "w1",
            &[(job.step_uuid.clone(), job.attempt)],
            T0 + 26 * MIN,
            T0 + 25 * MIN,
        )
        .await
        .unwrap();
    assert_eq!(renewed, 1);
    assert!(enforce(s, T0 + 50 * MIN, Some(30 * MIN)).await.is_empty());
    let out = enforce(s, T0 + 55 * MIN + 1, Some(30 * MIN)).await;
    assert_eq!(
        moved(&out),
        vec![(
            busy.as_str(),
            TaskState::StepsInProcess,
            DlqReason::Staleness
        )]
    );
}

async fn terminal_tasks_are_never_touched(db: Db) {
    let s = &db.store;
    let t = chain(
        "finished",
        "finished_work",
        "{max_duration_minutes: 1, max_steps_in_process_minutes: 1}",
    );
    let done = create(s, &t, T0).await;
    let ok = Resolution::Succeeded {
        result: json!({}),
        metadata: Value::Null,
    };
    let a = claim(s, "finished_work", T0).await;
    finish(s, &a, ok.clone(), T0).await;
    let b = claim(s, "finished_work", T0).await;
    finish(s, &b, ok, T0).await;
    assert_eq!(s.task_state(&done).await.unwrap(), TaskState::Complete);
    let gone = create(s, &t, T0).await;
    s.operator_action(
        &gone,
        &tasker_core::store::OperatorAction::Cancel,
        "op",
        "x",
        T0,
    )
    .await
    .unwrap();
    let before: Vec<usize> = [
        s.task_transitions(&done).await.unwrap().len(),
        s.task_transitions(&gone).await.unwrap().len(),
    ]
    .into();
    assert!(enforce(s, T0 + 10_000 * MIN, Some(MIN)).await.is_empty());
    assert_eq!(s.task_state(&done).await.unwrap(), TaskState::Complete);
    assert_eq!(s.task_state(&gone).await.unwrap(), TaskState::Cancelled);
    let after: Vec<usize> = [
        s.task_transitions(&done).await.unwrap().len(),
        s.task_transitions(&gone).await.unwrap().len(),
    ]
    .into();
    assert_eq!(before, after);
    assert!(s.list_dlq(&DlqFilter::default()).await.unwrap().is_empty());
}

async fn the_check_moves_at_most_limit_tasks_oldest_first(db: Db) {
    let s = &db.store;
    let t = chain("many", "many_work", "");
    let mut tasks = Vec::new();
    for i in 0..3 {
        tasks.push(blocked(s, &t, T0 + i).await);
    }
    let first = s
        .enforce_lifecycle(T0 + 100 * MIN, Some(MIN), ORCH, 2)
        .await
        .unwrap();
    let ids: Vec<&str> = first.iter().map(|m| m.task_uuid.as_str()).collect();
    assert_eq!(ids, vec![tasks[0].as_str(), tasks[1].as_str()]);
    let rest = enforce(s, T0 + 100 * MIN, Some(MIN)).await;
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].task_uuid, tasks[2]);
}

async fn dlq_list_stats_and_resolve(db: Db) {
    let s = &db.store;
    let retry = chain(
        "dlq_retry",
        "dlq_retry_work",
        "{max_waiting_for_retry_minutes: 1}",
    );
    let stale = chain("dlq_stale", "dlq_stale_work", "");
    let r1 = backing_off(s, &retry, T0).await;
    let b1 = blocked(s, &stale, T0).await;
    let r2 = backing_off(s, &retry, T0 + 10 * MIN).await;
    let first = enforce(s, T0 + 5 * MIN, Some(60 * MIN)).await;
    assert_eq!(moved(&first)[0].0, r1);
    let second = enforce(s, T0 + 70 * MIN, Some(60 * MIN)).await;
    let mut got: Vec<_> = moved(&second);
    got.sort_by_key(|m| m.0);
    let mut want = vec![
        (
            b1.as_str(),
            TaskState::BlockedByFailures,
            DlqReason::Staleness,
        ),
        (
            r2.as_str(),
            TaskState::WaitingForRetry,
            DlqReason::MaxWaitingForRetry,
        ),
    ];
    want.sort_by_key(|m| m.0);
    assert_eq!(got, want);

    // Newest first, without snapshots; filters and paging.
    let all = s.list_dlq(&DlqFilter::default()).await.unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[2].task_uuid, r1, "the oldest entry comes last");
    assert!(all.iter().all(|e| e.snapshot.is_none()));
    let by_reason = DlqFilter {
        reason: Some(DlqReason::Staleness),
        ..DlqFilter::default()
    };
    let stale_entries = s.list_dlq(&by_reason).await.unwrap();
    assert_eq!(stale_entries.len(), 1);
    assert_eq!(stale_entries[0].task_uuid, b1);
    let by_task = DlqFilter {
        task_uuid: Some(r2.clone()),
        ..DlqFilter::default()
    };
    assert_eq!(s.list_dlq(&by_task).await.unwrap().len(), 1);
    let other_ns = DlqFilter {
        namespace: Some("elsewhere".into()),
        ..DlqFilter::default()
    };
    assert!(s.list_dlq(&other_ns).await.unwrap().is_empty());
    let page = DlqFilter {
        limit: Some(1),
        offset: Some(2),
        ..DlqFilter::default()
    };
    let page = s.list_dlq(&page).await.unwrap();
    assert_eq!((page.len(), page[0].task_uuid.as_str()), (1, r1.as_str()));

    let stats = s.dlq_stats().await.unwrap();
    assert_eq!(stats.total, 3);
    assert_eq!(stats.by_reason["max_waiting_for_retry_minutes"], 2);
    assert_eq!(stats.by_reason["staleness"], 1);
    assert_eq!(stats.by_resolution_status["pending"], 3);
    assert_eq!(stats.by_original_state["waiting_for_retry"], 2);
    assert_eq!(stats.by_original_state["blocked_by_failures"], 1);
    assert_eq!(stats.by_namespace["life"], 3);
    assert_eq!(stats.oldest_pending_at, Some(T0 + 5 * MIN));

    // Resolving records the outcome and leaves the task alone.
    let id = first[0].dlq_entry_uuid.clone();
    let transitions = s.task_transitions(&r1).await.unwrap().len();
    let e = s
        .resolve_dlq(
            &id,
            DlqResolution::ManuallyResolved,
            Some("re-ran the order by hand"),
            "alice",
            T0 + 80 * MIN,
        )
        .await
        .unwrap();
    assert_eq!(e.resolution_status, DlqResolution::ManuallyResolved);
    assert_eq!(
        e.resolution_notes.as_deref(),
        Some("re-ran the order by hand")
    );
    assert_eq!(
        (e.resolved_by.as_deref(), e.resolved_at, e.updated_at),
        (Some("alice"), Some(T0 + 80 * MIN), T0 + 80 * MIN)
    );
    assert!(e.snapshot.is_some());
    assert_eq!(s.task_state(&r1).await.unwrap(), TaskState::Error);
    assert_eq!(s.task_transitions(&r1).await.unwrap().len(), transitions);
    let stats = s.dlq_stats().await.unwrap();
    assert_eq!(stats.by_resolution_status["pending"], 2);
    assert_eq!(stats.by_resolution_status["manually_resolved"], 1);
    assert_eq!(stats.oldest_pending_at, Some(T0 + 70 * MIN));
    let pending = DlqFilter {
        status: Some(DlqResolution::Pending),
        ..DlqFilter::default()
    };
    assert_eq!(s.list_dlq(&pending).await.unwrap().len(), 2);

    // Re-opening clears who resolved it and when; notes stay unless replaced.
    let e = s
        .resolve_dlq(&id, DlqResolution::Pending, None, "bob", T0 + 90 * MIN)
        .await
        .unwrap();
    assert_eq!(
        (
            e.resolution_status,
            e.resolved_by.as_deref(),
            e.resolved_at,
            e.resolution_notes.as_deref()
        ),
        (
            DlqResolution::Pending,
            None,
            None,
            Some("re-ran the order by hand")
        )
    );

    // Unknown ids and anonymous resolutions are refused.
    let e = s.get_dlq("no-such-entry").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("no-such-entry"), "{e}");
    let e = s
        .resolve_dlq("no-such-entry", DlqResolution::Cancelled, None, "alice", T0)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    let e = s
        .resolve_dlq(&id, DlqResolution::Cancelled, None, " ", T0)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Validation);
}

// ---------------------------------------------------------------- backends

macro_rules! suite {
    ($backend:ident, $open:expr, [$($test:ident),* $(,)?]) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let open: super::Opener = $open;
                    super::$test(open().await).await;
                }
            )*
        }
    };
}

macro_rules! all_tests {
    ($backend:ident, $open:expr) => {
        suite!(
            $backend,
            $open,
            [
                retry_limit_moves_the_task_to_error_through_the_state_machine,
                each_state_limit_counts_from_the_latest_transition,
                max_duration_counts_from_creation_in_any_state,
                staleness_covers_states_without_a_template_limit,
                terminal_tasks_are_never_touched,
                the_check_moves_at_most_limit_tasks_oldest_first,
                dlq_list_stats_and_resolve,
            ]
        );
    };
}

fn sqlite_memory() -> Pin<Box<dyn Future<Output = Db> + Send>> {
    Box::pin(async move {
        let store = tasker_core::store::sqlite::SqliteStore::open(
            "sqlite::memory:",
            tasker_core::config::SqliteSync::Normal,
        )
        .await
        .unwrap();
        Db {
            store: Arc::new(store),
            _dir: None,
        }
    })
}

fn sqlite_file() -> Pin<Box<dyn Future<Output = Db> + Send>> {
    Box::pin(async move {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("tasker.db").display());
        let store = tasker_core::store::sqlite::SqliteStore::open(
            &url,
            tasker_core::config::SqliteSync::Normal,
        )
        .await
        .unwrap();
        Db {
            store: Arc::new(store),
            _dir: Some(dir),
        }
    })
}

#[cfg(feature = "postgres")]
fn postgres() -> Pin<Box<dyn Future<Output = Db> + Send>> {
    Box::pin(async move {
        use tasker_core::store::postgres::{PgStore, create_scratch_database, test_server_url};
        let server = test_server_url();
        let url = create_scratch_database(&server, "tasker_test")
            .await
            .unwrap_or_else(|e| {
                panic!("PostgreSQL at {server} is needed (`./run test` starts one): {e}")
            });
        Db {
            store: Arc::new(PgStore::open(&url, 4, true).await.unwrap()),
            _dir: None,
        }
    })
}

#[cfg(feature = "postgres")]
all_tests!(postgres_backend, super::postgres);
all_tests!(sqlite_memory_backend, super::sqlite_memory);
all_tests!(sqlite_file_backend, super::sqlite_file);
