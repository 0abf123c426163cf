//! Store conformance: one suite written against `Arc<dyn Store>` only, instantiated per
//! backend at the bottom of the file. A new backend (PostgreSQL) adds one `suite!` line; the
//! test bodies must stay free of backend specifics.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tasker_core::clock::Millis;
use tasker_core::job::{ErrorType, StepFailure, StepJob};
use tasker_core::orchestrator::plan_task;
use tasker_core::store::{
    AttemptResult, CallableFilter, ClaimRequest, Completion, Created, Expiry, NewTask,
    OperatorAction, ParentLink, Resolution, Store, TemplatePut,
};
use tasker_core::template::{TaskTemplate, parse_str};
use tasker_core::{Checkpoint, ErrorKind, StepState, TaskFilter, TaskRequest, TaskState};

const T0: Millis = 1_700_000_000_000;
const LEASE: i64 = 30_000;
const DEFAULT_TIMEOUT: i64 = 300_000;
const ORCH: &str = "orch-1";

/// Handles onto one fresh database. Backends that can open several independent handles on
/// the same database (a file, a server) do so; others repeat one handle.
pub struct Db {
    stores: Vec<Arc<dyn Store>>,
    _dir: Option<tempfile::TempDir>,
}

impl Db {
    fn store(&self) -> &Arc<dyn Store> {
        &self.stores[0]
    }
}

type Opener = fn(usize) -> Pin<Box<dyn Future<Output = Db> + Send>>;

// ---------------------------------------------------------------- helpers

fn template(yaml: &str) -> TaskTemplate {
    parse_str(yaml, None, "test")
        .unwrap_or_else(|e| panic!("bad test template: {e}"))
        .template
}

fn linear(ns: &str, name: &str, callable: &str) -> TaskTemplate {
    template(&format!(
        r#"
name: {name}
namespace_name: {ns}
version: "1.0.0"
identity_strategy: always_unique
steps:
  - name: a
    handler: {{ callable: {callable} }}
  - name: b
    handler: {{ callable: {callable} }}
    dependencies: [a]
"#
    ))
}

fn diamond() -> TaskTemplate {
    template(
        r#"
name: diamond
namespace_name: conf
version: "1.0.0"
steps:
  - name: a
    handler: { callable: work }
  - name: b
    handler: { callable: work }
    dependencies: [a]
  - name: c
    handler: { callable: work }
    dependencies: [a]
  - name: d
    handler: { callable: work }
    dependencies: [b, c]
"#,
    )
}

fn plan(t: &TaskTemplate, request: TaskRequest) -> NewTask {
    plan_task(Arc::new(t.clone()), None, request, 1 << 20).expect("plan")
}

fn request(t: &TaskTemplate, context: Value) -> TaskRequest {
    TaskRequest::new(&t.namespace, &t.name, context)
}

async fn create(store: &Arc<dyn Store>, t: &TaskTemplate, context: Value, now: Millis) -> String {
    match store
        .create_task(&plan(t, request(t, context)), ORCH, now)
        .await
        .unwrap()
    {
        Created::New(uuid) => uuid,
        other => panic!("expected a new task, got {other:?}"),
    }
}

async fn create_with_priority(
    store: &Arc<dyn Store>,
    t: &TaskTemplate,
    priority: i32,
    now: Millis,
) -> String {
    let mut r = request(t, json!({ "p": priority, "now": now }));
    r.priority = priority;
    match store.create_task(&plan(t, r), ORCH, now).await.unwrap() {
        Created::New(uuid) => uuid,
        other => panic!("expected a new task, got {other:?}"),
    }
}

fn claim_req(
    worker: &str,
    namespaces: &[&str],
    callables: CallableFilter,
    limit: usize,
) -> ClaimRequest {
    ClaimRequest {
        worker_id: worker.into(),
        namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
        callables,
        limit,
        lease_ms: LEASE,
        default_timeout_ms: DEFAULT_TIMEOUT,
        enqueued_before: None,
    }
}

fn any() -> CallableFilter {
    CallableFilter::AnyExcept(Vec::new())
}

async fn claim(store: &Arc<dyn Store>, worker: &str, limit: usize, now: Millis) -> Vec<StepJob> {
    store
        .claim(&claim_req(worker, &[], any(), limit), now)
        .await
        .unwrap()
}

async fn claim_one(store: &Arc<dyn Store>, worker: &str, now: Millis) -> StepJob {
    let mut jobs = claim(store, worker, 1, now).await;
    assert_eq!(jobs.len(), 1, "expected one claimable step");
    jobs.pop().unwrap()
}

fn result(job: &StepJob, worker: Option<&str>, resolution: Resolution) -> AttemptResult {
    AttemptResult {
        step_uuid: job.step_uuid.clone(),
        attempt: job.attempt,
        worker_id: worker.map(str::to_string),
        expiry: None,
        resolution,
        started_at: Some(job.started_at),
        expansion: None,
    }
}

fn success(v: Value) -> Resolution {
    Resolution::Succeeded {
        result: v,
        metadata: Value::Null,
    }
}

fn failed(message: &str) -> Resolution {
    Resolution::Failed {
        failure: StepFailure::new(ErrorType::PermanentError, message),
    }
}

async fn finish_one(
    store: &Arc<dyn Store>,
    r: AttemptResult,
    now: Millis,
) -> (Completion, Option<TaskState>) {
    let mut reports = store.finish(&[r], ORCH, now).await.unwrap();
    assert_eq!(reports.len(), 1);
    let rep = reports.pop().unwrap();
    (rep.completion, rep.task_state)
}

async fn step_state(store: &Arc<dyn Store>, task: &str, step: &str) -> StepState {
    store
        .get_task(task)
        .await
        .unwrap()
        .step(step)
        .unwrap()
        .state
}

async fn assert_unchanged<F, Fut>(store: &Arc<dyn Store>, task: &str, f: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let before = store.get_task(task).await.unwrap();
    let tt = store.task_transitions(task).await.unwrap().len();
    let st = store.step_transitions(task, None).await.unwrap().len();
    f().await;
    let after = store.get_task(task).await.unwrap();
    assert_eq!(before.status, after.status, "task state changed");
    assert_eq!(before.steps, after.steps, "steps changed");
    assert_eq!(
        store.task_transitions(task).await.unwrap().len(),
        tt,
        "task transition written"
    );
    assert_eq!(
        store.step_transitions(task, None).await.unwrap().len(),
        st,
        "step transition written"
    );
}

/// A task whose only root step `a` failed for good: `blocked_by_failures`.
async fn blocked_task(store: &Arc<dyn Store>, now: Millis) -> String {
    // A callable of its own, so the claim below cannot pick up another task's step.
    let callable = format!("broken_{now}");
    let t = linear("conf", &format!("blocked_{now}"), &callable);
    store.put_template(&t, false, now).await.unwrap();
    let task = create(store, &t, json!({}), now).await;
    let mut jobs = store
        .claim(
            &claim_req("w1", &[], CallableFilter::Only(vec![callable]), 1),
            now,
        )
        .await
        .unwrap();
    let job = jobs.pop().expect("the blocked task's root step");
    let (c, state) = finish_one(store, result(&job, Some("w1"), failed("broken")), now + 1).await;
    assert_eq!(c, Completion::Accepted);
    assert_eq!(state, Some(TaskState::BlockedByFailures));
    task
}

// ---------------------------------------------------------------- the suite

async fn templates_register_version_and_conflict(db: Db) {
    let s = db.store();
    let mut t = linear("conf", "tpl", "work");
    assert_eq!(
        s.put_template(&t, false, T0).await.unwrap(),
        TemplatePut::Inserted
    );
    assert_eq!(
        s.put_template(&t, false, T0).await.unwrap(),
        TemplatePut::Unchanged
    );
    let mut changed = t.clone();
    changed.description = Some("different".into());
    let e = s.put_template(&changed, false, T0).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Conflict, "{e}");
    assert_eq!(
        s.get_template("conf", "tpl", Some("1.0.0")).await.unwrap(),
        t,
        "a refused put changes nothing"
    );
    assert_eq!(
        s.put_template(&changed, true, T0).await.unwrap(),
        TemplatePut::Replaced
    );
    assert_eq!(
        s.get_template("conf", "tpl", Some("1.0.0")).await.unwrap(),
        changed
    );
    for v in ["1.9.0", "1.10.0", "1.2.0"] {
        t.version = v.into();
        s.put_template(&t, false, T0).await.unwrap();
    }
    assert_eq!(
        s.get_template("conf", "tpl", None).await.unwrap().version,
        "1.10.0",
        "newest by semver"
    );
    let e = s
        .get_template("conf", "tpl", Some("9.9.9"))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(
        e.message.contains("1.10.0") && e.message.contains("1.0.0"),
        "{e}"
    );
    assert_eq!(
        e.details.unwrap()["known_versions"],
        json!(["1.0.0", "1.2.0", "1.9.0", "1.10.0"])
    );
    assert_eq!(
        s.get_template("conf", "nope", None).await.unwrap_err().kind,
        ErrorKind::NotFound
    );
    assert_eq!(s.list_templates().await.unwrap().len(), 4);
}

async fn create_task_inserts_steps_edges_transitions(db: Db) {
    let s = db.store();
    let t = diamond();
    s.put_template(&t, false, T0).await.unwrap();
    let uuid = create(s, &t, json!({"x": 1}), T0).await;
    let task = s.get_task(&uuid).await.unwrap();
    assert_eq!(task.status, TaskState::StepsInProcess);
    assert_eq!(task.created_at, T0);
    assert_eq!(task.completed_at, None);
    let names: Vec<&str> = task.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "d"]);
    assert_eq!(task.step("a").unwrap().state, StepState::Enqueued);
    for n in ["b", "c", "d"] {
        assert_eq!(task.step(n).unwrap().state, StepState::Pending, "{n}");
    }
    let mut deps = task.step("d").unwrap().dependencies.clone();
    deps.sort();
    assert_eq!(deps, ["b", "c"]);
    assert_eq!(task.step("b").unwrap().dependencies, ["a"]);

    let tt = s.task_transitions(&uuid).await.unwrap();
    let rows: Vec<(Option<&str>, &str, &str)> = tt
        .iter()
        .map(|t| {
            (
                t.from_state.as_deref(),
                t.to_state.as_str(),
                t.event.as_str(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (None, "pending", "create"),
            (Some("pending"), "initializing", "start"),
            (Some("initializing"), "enqueuing_steps", "ready_steps_found"),
            (
                Some("enqueuing_steps"),
                "steps_in_process",
                "steps_enqueued"
            ),
        ]
    );
    assert!(tt.iter().all(|t| t.actor == ORCH && t.created_at == T0));
    assert!(
        tt.windows(2).all(|w| w[0].sort_key < w[1].sort_key),
        "sort keys increase"
    );

    let st = s.step_transitions(&uuid, None).await.unwrap();
    let created: Vec<&str> = st
        .iter()
        .filter(|t| t.event == "create")
        .map(|t| {
            assert_eq!(t.from_state, None);
            assert_eq!(t.to_state, "pending");
            t.step_name.as_deref().unwrap()
        })
        .collect();
    assert_eq!(created, ["a", "b", "c", "d"]);
    let enq: Vec<_> = st.iter().filter(|t| t.event == "enqueue").collect();
    assert_eq!(enq.len(), 1);
    assert_eq!(enq[0].step_name.as_deref(), Some("a"));
    assert_eq!(
        (enq[0].from_state.as_deref(), enq[0].to_state.as_str()),
        (Some("pending"), "enqueued")
    );
    assert_eq!(enq[0].actor, ORCH);
    assert_eq!(s.step_transitions(&uuid, Some("a")).await.unwrap().len(), 2);
}

/// A creation that also claims runs in a transaction, one that does not may be written at
/// once (PostgreSQL does it in one statement): both leave the same task, steps and audit.
async fn creation_records_the_same_whether_or_not_it_claims(db: Db) {
    let s = db.store();
    let t = diamond();
    s.put_template(&t, false, T0).await.unwrap();
    let at_once = create(s, &t, json!({"x": 1}), T0).await;
    let nothing = claim_req(
        "w-none",
        &[],
        CallableFilter::Only(vec!["no.such.callable".into()]),
        4,
    );
    let (created, jobs) = s
        .create_tasks(
            &[plan(&t, request(&t, json!({"x": 2})))],
            ORCH,
            Some(&nothing),
            T0,
        )
        .await
        .unwrap();
    assert!(jobs.is_empty());
    let [Created::New(claiming)] = created.as_slice() else {
        panic!("expected a new task, got {created:?}");
    };
    let shape = |uuid: String| async move {
        let task = s.get_task(&uuid).await.unwrap();
        let steps: Vec<(String, StepState, Vec<String>)> = task
            .steps
            .iter()
            .map(|st| (st.name.clone(), st.state, st.dependencies.clone()))
            .collect();
        let tt: Vec<(Option<String>, String, String, String, Millis)> = s
            .task_transitions(&uuid)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.from_state, r.to_state, r.event, r.actor, r.created_at))
            .collect();
        type StepRow = (Option<String>, Option<String>, String, String, String);
        let st: Vec<StepRow> = s
            .step_transitions(&uuid, None)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.step_name, r.from_state, r.to_state, r.event, r.actor))
            .collect();
        (task.status, task.completed_at, steps, tt, st)
    };
    assert_eq!(shape(at_once.clone()).await, shape(claiming.clone()).await);
    // Both roots are claimable.
    let claimed: HashSet<String> = claim(s, "w", 4, T0 + 1)
        .await
        .into_iter()
        .map(|j| j.task_uuid)
        .collect();
    assert_eq!(claimed, HashSet::from([at_once, claiming.clone()]));
}

async fn identity_duplicates_return_existing(db: Db) {
    let s = db.store();
    let t = diamond();
    s.put_template(&t, false, T0).await.unwrap();
    let first = create(s, &t, json!({"b": 1, "a": 2}), T0).await;
    // Same context with keys in another order: same strict identity.
    let again = s
        .create_task(&plan(&t, request(&t, json!({"a": 2, "b": 1}))), ORCH, T0)
        .await
        .unwrap();
    assert_eq!(
        again,
        Created::Existing {
            uuid: first.clone(),
            by_key: false
        }
    );
    let keyed = create_keyed(s, &t, json!({"n": 1}), "k-1").await;
    let dup = s
        .create_task(
            &plan(&t, request(&t, json!({"n": 2})).idempotency_key("k-1")),
            ORCH,
            T0,
        )
        .await
        .unwrap();
    assert_eq!(
        dup,
        Created::Existing {
            uuid: keyed,
            by_key: true
        }
    );
    assert_eq!(
        s.get_task(&first).await.unwrap().steps.len(),
        4,
        "no steps were added by the duplicate"
    );
}

/// A group of creations in one call: each existing identity, and each repeat of an identity
/// earlier in the group, comes back as the task that holds it; only new tasks get rows.
async fn group_creation_resolves_identities_within_the_group(db: Db) {
    let s = db.store();
    let t = diamond();
    s.put_template(&t, false, T0).await.unwrap();
    let old = create_keyed(s, &t, json!({"n": 0}), "k-old").await;
    let keyed = |ctx: Value, key: &str| plan(&t, request(&t, ctx).idempotency_key(key));
    let group = [
        keyed(json!({"n": 1}), "k-new"),
        keyed(json!({"n": 2}), "k-old"),
        keyed(json!({"n": 3}), "k-new"),
        plan(&t, request(&t, json!({"strict": true}))),
        plan(&t, request(&t, json!({"strict": true}))),
    ];
    let (created, jobs) = s
        .create_tasks(&group, ORCH, Some(&claim_req("w1", &[], any(), 8)), T0)
        .await
        .unwrap();
    let first = group[0].uuid.clone();
    let strict = group[3].uuid.clone();
    assert_eq!(
        created,
        [
            Created::New(first.clone()),
            Created::Existing {
                uuid: old.clone(),
                by_key: true
            },
            Created::Existing {
                uuid: first.clone(),
                by_key: true
            },
            Created::New(strict.clone()),
            Created::Existing {
                uuid: strict.clone(),
                by_key: false
            },
        ]
    );
    // The claim in the same call took every ready first step: the two new tasks' and the
    // one the earlier task left enqueued.
    let mut claimed: Vec<(&str, &str)> = jobs
        .iter()
        .map(|j| (j.task_uuid.as_str(), j.step_name.as_str()))
        .collect();
    claimed.sort();
    let mut expected = vec![
        (old.as_str(), "a"),
        (first.as_str(), "a"),
        (strict.as_str(), "a"),
    ];
    expected.sort();
    assert_eq!(claimed, expected);
    for uuid in [&first, &strict] {
        let task = s.get_task(uuid).await.unwrap();
        assert_eq!(task.status, TaskState::StepsInProcess);
        assert_eq!(task.steps.len(), 4);
        assert_eq!(task.step("d").unwrap().dependencies, ["b", "c"]);
        let events: Vec<String> = s
            .task_transitions(uuid)
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.event)
            .collect();
        assert_eq!(
            events,
            ["create", "start", "ready_steps_found", "steps_enqueued"]
        );
    }
    let (repeat, _) = s
        .create_tasks(&group[..1], ORCH, None, T0 + 1)
        .await
        .unwrap();
    assert_eq!(
        repeat,
        [Created::Existing {
            uuid: first,
            by_key: true
        }],
        "the group's tasks were committed with their identities"
    );
}

/// One `finish_and_claim` with an accepted success, an accepted permanent failure and a
/// stale result: each gets its own report, and the claim sees what the success made ready.
async fn group_finish_reports_each_result_and_claims_what_became_ready(db: Db) {
    let s = db.store();
    let t = diamond();
    s.put_template(&t, false, T0).await.unwrap();
    let t1 = create(s, &t, json!({"t": 1}), T0).await;
    let t2 = create(s, &t, json!({"t": 2}), T0).await;
    let jobs = claim(s, "w1", 2, T0 + 1).await;
    assert_eq!(jobs.len(), 2);
    let (j1, j2) = if jobs[0].task_uuid == t1 {
        (&jobs[0], &jobs[1])
    } else {
        (&jobs[1], &jobs[0])
    };
    let mut stale = result(j1, Some("w1"), success(json!({"late": true})));
    stale.attempt = 7;
    let results = [
        result(j1, Some("w1"), success(json!({"v": 1}))),
        result(j2, Some("w1"), failed("no")),
        stale,
    ];
    let (reports, claimed) = s
        .finish_and_claim(&results, ORCH, &claim_req("w1", &[], any(), 4), T0 + 2)
        .await
        .unwrap();
    assert_eq!(reports.len(), 3);
    assert_eq!(reports[0].completion, Completion::Accepted);
    assert_eq!(reports[0].task_state, Some(TaskState::StepsInProcess));
    assert_eq!(reports[1].completion, Completion::Accepted);
    assert_eq!(reports[1].task_state, Some(TaskState::BlockedByFailures));
    assert!(
        matches!(&reports[2].completion, Completion::Rejected(r) if r.contains("not in_progress")),
        "{:?}",
        reports[2].completion
    );
    let mut names: Vec<&str> = claimed.iter().map(|j| j.step_name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["b", "c"]);
    assert!(claimed.iter().all(|j| j.task_uuid == t1));
    // The claim's audit rows come after those of the settle that made the step ready.
    let audit = s.step_transitions(&t1, Some("b")).await.unwrap();
    let moves: Vec<(Option<&str>, &str)> = audit
        .iter()
        .map(|t| (t.from_state.as_deref(), t.to_state.as_str()))
        .collect();
    assert_eq!(
        moves,
        [
            (None, "pending"),
            (Some("pending"), "enqueued"),
            (Some("enqueued"), "in_progress")
        ],
        "{audit:#?}"
    );
    let view = s.get_task(&t1).await.unwrap();
    assert_eq!(view.step("a").unwrap().result, Some(json!({"v": 1})));
    assert_eq!(
        s.get_task(&t2).await.unwrap().step("a").unwrap().state,
        StepState::Error
    );
    assert_eq!(s.rejected_completions(&t1).await.unwrap().len(), 1);
}

/// A backend that announces changes to other processes (PostgreSQL) announces a task-state
/// change made by a result batch whatever its claim-ahead took, and steps a creation made
/// ready. A backend that announces nothing (SQLite, one process) has nothing to check.
async fn result_batches_and_creations_are_announced(db: Db) {
    use tasker_core::store::StoreChange;
    let Some(mut changes) = db.stores[db.stores.len() - 1].changes() else {
        return;
    };
    let s = db.store();
    let t = linear("conf", "announced", "work");
    s.put_template(&t, false, T0).await.unwrap();
    let task = create(s, &t, json!({}), T0).await;
    announced(&mut changes, "the created task's first step", |c| {
        matches!(c, StoreChange::Work)
    })
    .await;
    let a = claim_one(s, "w1", T0 + 1).await;
    // Finishing `a` makes `b` ready, and the claim-ahead takes it.
    let (_, jobs) = s
        .finish_and_claim(
            &[result(&a, Some("w1"), success(json!({})))],
            ORCH,
            &claim_req("w1", &[], any(), 4),
            T0 + 2,
        )
        .await
        .unwrap();
    assert_eq!(jobs.len(), 1);
    // Finishing `b` completes the task; the claim-ahead finds nothing.
    let (reports, jobs) = s
        .finish_and_claim(
            &[result(&jobs[0], Some("w1"), success(json!({})))],
            ORCH,
            &claim_req("w1", &[], any(), 4),
            T0 + 3,
        )
        .await
        .unwrap();
    assert!(jobs.is_empty());
    assert_eq!(reports[0].task_state, Some(TaskState::Complete));
    announced(&mut changes, "the task's completion", |c| {
        matches!(c, StoreChange::Task { task_uuid, state: TaskState::Complete } if *task_uuid == task)
    })
    .await;
}

/// Waits (10 s at most) for a change that `want` accepts.
async fn announced(
    changes: &mut tokio::sync::broadcast::Receiver<tasker_core::store::StoreChange>,
    what: &str,
    want: impl Fn(&tasker_core::store::StoreChange) -> bool,
) {
    use tokio::sync::broadcast::error::RecvError;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, changes.recv()).await {
            Ok(Ok(c)) if want(&c) => return,
            Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("changes ended: {e}"),
            Err(_) => panic!("not announced within 10 s: {what}"),
        }
    }
}

/// A result's expansion goes in with the result, only if the result applies; steps the task
/// already has are left alone, and edges reach only steps that exist and have not started.
async fn expansion_creates_steps_with_the_result(db: Db) {
    let s = db.store();
    let t = template(
        r#"
name: routed
namespace_name: conf
version: "1.0.0"
steps:
  - { name: start, handler: { callable: work } }
  - { name: route, type: decision, dependencies: [start], handler: { callable: work } }
  - { name: yes, dependencies: [route], handler: { callable: work } }
  - { name: no, dependencies: [route], handler: { callable: work } }
  - { name: join, type: deferred_convergence, dependencies: [yes, no], handler: { callable: work } }
"#,
    );
    s.put_template(&t, false, T0).await.unwrap();
    let task = create(s, &t, json!({}), T0).await;
    assert_eq!(s.get_task(&task).await.unwrap().steps.len(), 2);
    let start = claim_one(s, "w1", T0).await;
    finish_one(s, result(&start, Some("w1"), success(json!({}))), T0).await;
    let job = claim_one(s, "w1", T0).await;
    assert_eq!(job.step_name, "route");
    let outcome =
        json!({"decision_point_outcome": {"type": "create_steps", "step_names": ["yes"]}});
    let expansion = tasker_core::orchestrator::plan_decision(&t, "route", &outcome).unwrap();
    // A stale copy of the result with the same expansion: rejected, creates nothing.
    let mut stale = result(&job, Some("w1"), success(outcome.clone()));
    stale.attempt += 1;
    stale.expansion = Some(expansion.clone());
    let (reports, _) = s
        .finish_and_claim(&[stale], ORCH, &claim_req("w1", &[], any(), 4), T0 + 1)
        .await
        .unwrap();
    assert!(matches!(reports[0].completion, Completion::Rejected(_)));
    assert_eq!(s.get_task(&task).await.unwrap().steps.len(), 2);

    let mut r = result(&job, Some("w1"), success(outcome));
    r.expansion = Some(expansion.clone());
    let (reports, jobs) = s
        .finish_and_claim(&[r], ORCH, &claim_req("w1", &[], any(), 4), T0 + 2)
        .await
        .unwrap();
    assert_eq!(reports[0].completion, Completion::Accepted);
    assert_eq!(reports[0].task_state, Some(TaskState::StepsInProcess));
    let names: Vec<&str> = jobs.iter().map(|j| j.step_name.as_str()).collect();
    assert_eq!(
        names,
        ["yes"],
        "the new step is claimed in the same transaction"
    );
    let view = s.get_task(&task).await.unwrap();
    let mut steps: Vec<&str> = view.steps.iter().map(|s| s.name.as_str()).collect();
    steps.sort();
    assert_eq!(steps, ["join", "route", "start", "yes"]);
    assert_eq!(view.step("join").unwrap().dependencies, ["yes"]);
    assert_eq!(view.step("yes").unwrap().dependencies, ["route"]);
    let created: Vec<(String, String)> = s
        .step_transitions(&task, None)
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.event == "create")
        .map(|t| (t.step_name.unwrap(), t.actor))
        .collect();
    assert_eq!(created.len(), 4, "{created:?}");

    // A result carrying the same expansion again: nothing doubles.
    let mut r = result(&jobs[0], Some("w1"), success(json!({})));
    r.expansion = Some(expansion);
    finish_one(s, r, T0 + 4).await;
    let view = s.get_task(&task).await.unwrap();
    assert_eq!(view.steps.len(), 4);
    assert_eq!(view.step("join").unwrap().dependencies, ["yes"]);
    let join = claim_one(s, "w1", T0 + 5).await;
    assert_eq!(join.step_name, "join");
    assert_eq!(join.dependency_results.get("yes"), Some(&json!({})));
}

fn batch_template(strategy: &str, parallelism: u32) -> TaskTemplate {
    template(&format!(
        r#"
name: batch_{strategy}
namespace_name: conf
version: "1.0.0"
steps:
  - {{ name: analyze, type: batchable, handler: {{ callable: work }} }}
  - name: part
    type: batch_worker
    dependencies: [analyze]
    handler: {{ callable: work }}
    batch_config: {{ batch_size: 1, parallelism: {parallelism}, failure_strategy: {strategy} }}
  - {{ name: sum, type: deferred_convergence, dependencies: [part], handler: {{ callable: work }} }}
"#
    ))
}

/// Creates a task of `t`, runs its analyzer to an outcome of `workers` batches and returns the
/// task.
async fn fan_out(s: &Arc<dyn Store>, t: &TaskTemplate, workers: u64) -> String {
    s.put_template(t, false, T0).await.unwrap();
    let task = create(s, t, json!({}), T0).await;
    let job = claim_one(s, "w1", T0).await;
    let outcome = json!({ "batch_processing_outcome":
        tasker_core::batch::create_batch_outcome(workers, 1).to_value() });
    let mut r = result(&job, Some("w1"), success(outcome.clone()));
    r.expansion = Some(tasker_core::orchestrator::plan_batches(t, "analyze", &outcome).unwrap());
    finish_one(s, r, T0 + 1).await;
    task
}

async fn batch_parallelism_caps_running_workers(db: Db) {
    let s = db.store();
    let t = batch_template("continue_on_failure", 2);
    let task = fan_out(s, &t, 5).await;
    let view = s.get_task(&task).await.unwrap();
    assert_eq!(view.steps.len(), 7);
    assert_eq!(
        view.step("sum").unwrap().dependencies.len(),
        5,
        "the aggregator waits for every worker"
    );
    let first = claim(s, "w1", 10, T0 + 2).await;
    let names: Vec<&str> = first.iter().map(|j| j.step_name.as_str()).collect();
    assert_eq!(names, ["part_001", "part_002"], "two at a time");
    assert_eq!(first[0].inputs["cursor"]["start_cursor"], 0);
    assert!(claim(s, "w1", 10, T0 + 3).await.is_empty());
    // A worker waiting to retry keeps its slot.
    let retry = Resolution::Retry {
        failure: StepFailure::new(ErrorType::RetryableError, "again"),
        next_attempt_at: T0 + 100,
    };
    finish_one(s, result(&first[0], Some("w1"), retry), T0 + 4).await;
    assert!(claim(s, "w1", 10, T0 + 5).await.is_empty());
    // A finished worker frees one.
    finish_one(s, result(&first[1], Some("w1"), success(json!({}))), T0 + 6).await;
    let next = claim(s, "w1", 10, T0 + 7).await;
    let names: Vec<&str> = next.iter().map(|j| j.step_name.as_str()).collect();
    assert_eq!(names, ["part_003"]);
}

async fn batch_fail_fast_cancels_unfinished_siblings(db: Db) {
    let s = db.store();
    let t = batch_template("fail_fast", 2);
    let task = fan_out(s, &t, 4).await;
    let running = claim(s, "w1", 10, T0 + 2).await;
    assert_eq!(running.len(), 2);
    let (c, state) = finish_one(s, result(&running[0], Some("w1"), failed("broken")), T0 + 3).await;
    assert_eq!(c, Completion::Accepted);
    assert_eq!(state, Some(TaskState::BlockedByFailures));
    let view = s.get_task(&task).await.unwrap();
    let states: Vec<(&str, StepState)> = view
        .steps
        .iter()
        .filter(|s| s.name.starts_with("part_"))
        .map(|s| (s.name.as_str(), s.state))
        .collect();
    assert_eq!(
        states,
        [
            ("part_001", StepState::Error),
            ("part_002", StepState::Cancelled),
            ("part_003", StepState::Cancelled),
            ("part_004", StepState::Cancelled),
        ]
    );
    let cancels: Vec<_> = s
        .step_transitions(&task, None)
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.event == "cancel")
        .collect();
    assert_eq!(cancels.len(), 3);
    assert!(
        cancels
            .iter()
            .all(|t| t.reason.as_deref().is_some_and(|r| r.contains("part_001")))
    );
    // The running sibling's late result is rejected.
    let (c, _) = finish_one(
        s,
        result(&running[1], Some("w1"), success(json!({}))),
        T0 + 4,
    )
    .await;
    assert!(matches!(c, Completion::Rejected(_)));
}

async fn batch_isolate_lets_the_aggregator_run_with_the_failures(db: Db) {
    let s = db.store();
    let t = batch_template("isolate", 10);
    let task = fan_out(s, &t, 2).await;
    let running = claim(s, "w1", 10, T0 + 2).await;
    finish_one(s, result(&running[0], Some("w1"), failed("broken")), T0 + 3).await;
    finish_one(
        s,
        result(&running[1], Some("w1"), success(json!({"n": 1}))),
        T0 + 4,
    )
    .await;
    let sum = claim_one(s, "w1", T0 + 5).await;
    assert_eq!(sum.step_name, "sum");
    assert_eq!(
        sum.dependency_results.get("part_002"),
        Some(&json!({"n": 1}))
    );
    assert_eq!(
        sum.failed_dependencies["part_001"]["message"],
        json!("broken")
    );
    let (_, state) = finish_one(s, result(&sum, Some("w1"), success(json!({}))), T0 + 6).await;
    assert_eq!(
        state,
        Some(TaskState::BlockedByFailures),
        "the failed worker still needs an operator"
    );
    assert_eq!(step_state(s, &task, "sum").await, StepState::Complete);
}

async fn create_keyed(s: &Arc<dyn Store>, t: &TaskTemplate, ctx: Value, key: &str) -> String {
    match s
        .create_task(&plan(t, request(t, ctx).idempotency_key(key)), ORCH, T0)
        .await
        .unwrap()
    {
        Created::New(u) => u,
        o => panic!("{o:?}"),
    }
}

async fn claim_respects_namespaces_and_callables(db: Db) {
    let s = db.store();
    let ta = linear("ns_a", "job", "x");
    let tb = linear("ns_b", "job", "y");
    for t in [&ta, &tb] {
        s.put_template(t, false, T0).await.unwrap();
        create(s, t, json!({}), T0).await;
    }
    let only_y = s
        .claim(
            &claim_req("w", &["ns_a"], CallableFilter::Only(vec!["y".into()]), 10),
            T0,
        )
        .await
        .unwrap();
    assert!(only_y.is_empty(), "ns_a has no `y` step");
    let except_x = s
        .claim(
            &claim_req(
                "w",
                &["ns_a"],
                CallableFilter::AnyExcept(vec!["x".into()]),
                10,
            ),
            T0,
        )
        .await
        .unwrap();
    assert!(except_x.is_empty());
    let empty_only = s
        .claim(&claim_req("w", &[], CallableFilter::Only(vec![]), 10), T0)
        .await
        .unwrap();
    assert!(empty_only.is_empty(), "Only([]) claims nothing");
    let b = s
        .claim(&claim_req("w", &["ns_b"], any(), 10), T0)
        .await
        .unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!((b[0].namespace.as_str(), b[0].callable()), ("ns_b", "y"));
    let a = s
        .claim(
            &claim_req("w", &[], CallableFilter::AnyExcept(vec!["y".into()]), 10),
            T0,
        )
        .await
        .unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!((a[0].namespace.as_str(), a[0].callable()), ("ns_a", "x"));
    assert!(
        claim(s, "w", 10, T0).await.is_empty(),
        "pending children are not claimable"
    );
}

async fn claim_sets_attempt_lease_and_timeout(db: Db) {
    let s = db.store();
    let t = template(
        r#"
name: timed
namespace_name: conf
version: "1.0.0"
identity_strategy: always_unique
steps:
  - name: quick
    handler: { callable: work }
    timeout_seconds: 5
  - name: slow
    handler: { callable: work }
"#,
    );
    s.put_template(&t, false, T0).await.unwrap();
    let task = create(s, &t, json!({"k": "v"}), T0).await;
    let now = T0 + 100;
    let mut jobs = claim(s, "w1", 10, now).await;
    jobs.sort_by(|a, b| a.step_name.cmp(&b.step_name));
    assert_eq!(jobs.len(), 2);
    for j in &jobs {
        assert_eq!(j.attempt, 1);
        assert_eq!(j.worker_id, "w1");
        assert_eq!(j.started_at, now);
        assert_eq!(j.task_uuid, task);
        assert_eq!(j.context, json!({"k": "v"}));
        assert_eq!(
            (j.task_name.as_str(), j.task_version.as_str()),
            ("timed", "1.0.0")
        );
    }
    assert_eq!(jobs[0].step_name, "quick");
    assert_eq!(jobs[0].timeout_at, now + 5_000);
    assert_eq!(jobs[1].timeout_at, now + DEFAULT_TIMEOUT);
    let view = s.get_task(&task).await.unwrap();
    for n in ["quick", "slow"] {
        let st = view.step(n).unwrap();
        assert_eq!((st.state, st.attempts), (StepState::InProgress, 1));
        assert_eq!(st.worker_id.as_deref(), Some("w1"));
        assert_eq!(st.started_at, Some(now));
    }
    let claims: Vec<_> = s
        .step_transitions(&task, None)
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.event == "claim")
        .collect();
    assert_eq!(claims.len(), 2);
    assert!(
        claims
            .iter()
            .all(|c| c.actor == "w1" && c.attempt == Some(1) && c.to_state == "in_progress")
    );
    // The timeout of `quick` falls due before any lease.
    assert_eq!(s.next_due().await.unwrap(), Some(now + 5_000));
    assert!(
        s.expired_attempts(now + 4_999, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let x = s.expired_attempts(now + 5_000, 10).await.unwrap();
    assert_eq!(x.len(), 1);
    assert_eq!(
        (x[0].step_uuid.as_str(), x[0].expiry),
        (jobs[0].step_uuid.as_str(), Expiry::Timeout)
    );
    // Leases run out at now + LEASE (renewal would have pushed them).
    s.renew_leases(
        "w1",
        &[(jobs[0].step_uuid.clone(), jobs[0].attempt)],
        now + 10 * LEASE,
        now,
    )
    .await
    .unwrap();
    let x = s.expired_attempts(now + LEASE - 1, 10).await.unwrap();
    assert_eq!(
        x.len(),
        1,
        "only quick, past its timeout; slow's lease still runs"
    );
    assert_eq!(x[0].step_uuid, jobs[0].step_uuid);
    let x = s.expired_attempts(now + LEASE, 10).await.unwrap();
    assert_eq!(
        x.len(),
        2,
        "slow's lease ran out; quick is past its timeout"
    );
    let slow = x.iter().find(|e| e.step_uuid == jobs[1].step_uuid).unwrap();
    assert_eq!((slow.expiry, slow.attempt), (Expiry::LeaseExpired, 1));
    assert!(
        claim(s, "w2", 10, now).await.is_empty(),
        "in-progress steps are not claimable"
    );
}

async fn claim_orders_by_priority_then_enqueued_at_and_limits(db: Db) {
    let s = db.store();
    let t = linear("conf", "prio", "work");
    s.put_template(&t, false, T0).await.unwrap();
    let low = create_with_priority(s, &t, 0, T0).await;
    let high = create_with_priority(s, &t, 10, T0 + 5).await;
    let mid_late = create_with_priority(s, &t, 5, T0 + 20).await;
    let mid_early = create_with_priority(s, &t, 5, T0 + 10).await;
    let batch = claim(s, "w", 2, T0 + 100).await;
    assert_eq!(batch.len(), 2, "limit is honoured");
    let mut order: Vec<String> = batch.iter().map(|j| j.task_uuid.clone()).collect();
    for _ in 0..2 {
        order.push(claim_one(s, "w", T0 + 100).await.task_uuid);
    }
    assert!(claim(s, "w", 5, T0 + 100).await.is_empty());
    assert_eq!(order[2..], [mid_late, low]);
    let mut first_two = order[..2].to_vec();
    first_two.sort();
    let mut expect = vec![high.clone(), mid_early.clone()];
    expect.sort();
    assert_eq!(first_two, expect);
    // Within one claim the order holds as well.
    assert_eq!(batch[0].task_uuid, high);
    assert_eq!(batch[1].task_uuid, mid_early);
}

async fn concurrent_claims_take_each_step_exactly_once(db: Db) {
    const STEPS: usize = 200;
    const CLAIMERS_PER_HANDLE: usize = 4;
    let t = template(
        r#"
name: fanout
namespace_name: conf
version: "1.0.0"
identity_strategy: always_unique
steps:
  - name: only
    handler: { callable: work }
"#,
    );
    db.store().put_template(&t, false, T0).await.unwrap();
    let mut tasks = HashSet::new();
    for i in 0..STEPS {
        tasks.insert(create(db.store(), &t, json!({ "i": i }), T0).await);
    }
    let seen = Arc::new(Mutex::new(Vec::<(String, u32)>::new()));
    let mut joins = tokio::task::JoinSet::new();
    for (h, store) in db.stores.iter().enumerate() {
        for c in 0..CLAIMERS_PER_HANDLE {
            let store = store.clone();
            let seen = seen.clone();
            let worker = format!("w{h}-{c}");
            joins.spawn(async move {
                loop {
                    let jobs = store
                        .claim(&claim_req(&worker, &[], any(), 3), T0 + 1)
                        .await
                        .unwrap();
                    if jobs.is_empty() {
                        break;
                    }
                    let results: Vec<AttemptResult> = jobs
                        .iter()
                        .map(|j| result(j, Some(&worker), success(json!({"by": worker}))))
                        .collect();
                    seen.lock()
                        .unwrap()
                        .extend(jobs.iter().map(|j| (j.step_uuid.clone(), j.attempt)));
                    for rep in store.finish(&results, &worker, T0 + 2).await.unwrap() {
                        assert_eq!(rep.completion, Completion::Accepted);
                        assert_eq!(rep.task_state, Some(TaskState::Complete));
                    }
                }
            });
        }
    }
    while let Some(r) = joins.join_next().await {
        r.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    let distinct: HashSet<&String> = seen.iter().map(|(s, _)| s).collect();
    assert_eq!(
        seen.len(),
        STEPS,
        "claimed {} times for {STEPS} steps",
        seen.len()
    );
    assert_eq!(distinct.len(), STEPS);
    assert!(seen.iter().all(|(_, a)| *a == 1));
    for task in &tasks {
        assert_eq!(
            db.store().task_state(task).await.unwrap(),
            TaskState::Complete
        );
        assert!(
            db.store()
                .rejected_completions(task)
                .await
                .unwrap()
                .is_empty()
        );
    }
}

async fn success_enqueues_children_in_the_same_transaction(db: Db) {
    let s = db.store();
    let t = diamond();
    s.put_template(&t, false, T0).await.unwrap();
    let task = create(s, &t, json!({}), T0).await;
    let a = claim_one(s, "w1", T0).await;
    assert_eq!(a.step_name, "a");
    assert!(a.dependency_results.is_empty());
    let (c, state) = finish_one(s, result(&a, Some("w1"), success(json!({"v": 1}))), T0 + 10).await;
    assert_eq!(c, Completion::Accepted);
    assert_eq!(state, Some(TaskState::StepsInProcess));
    let view = s.get_task(&task).await.unwrap();
    let a_view = view.step("a").unwrap();
    assert_eq!(
        (a_view.state, a_view.result.clone()),
        (StepState::Complete, Some(json!({"v": 1})))
    );
    assert_eq!(a_view.completed_at, Some(T0 + 10));
    assert_eq!(view.step("b").unwrap().state, StepState::Enqueued);
    assert_eq!(view.step("c").unwrap().state, StepState::Enqueued);
    assert_eq!(view.step("d").unwrap().state, StepState::Pending);
    let a_tr: Vec<(String, String, String)> = s
        .step_transitions(&task, Some("a"))
        .await
        .unwrap()
        .into_iter()
        .skip(2)
        .map(|t| (t.from_state.unwrap(), t.to_state, t.event))
        .collect();
    assert_eq!(
        a_tr,
        [
            ("enqueued".into(), "in_progress".into(), "claim".into()),
            (
                "in_progress".into(),
                "enqueued_for_orchestration".into(),
                "succeed".into()
            ),
            (
                "enqueued_for_orchestration".into(),
                "complete".into(),
                "complete".into()
            ),
        ]
    );
    let tt: Vec<String> = s
        .task_transitions(&task)
        .await
        .unwrap()
        .into_iter()
        .skip(4)
        .map(|t| t.event)
        .collect();
    assert_eq!(tt, ["step_result", "ready_steps_found", "steps_enqueued"]);
    let bc = claim(s, "w1", 10, T0 + 20).await;
    assert_eq!(bc.len(), 2);
    for j in &bc {
        assert_eq!(j.dependency_results.get("a"), Some(&json!({"v": 1})));
    }
    let results: Vec<_> = bc
        .iter()
        .map(|j| result(j, Some("w1"), success(json!({"s": j.step_name}))))
        .collect();
    s.finish(&results, ORCH, T0 + 30).await.unwrap();
    let d = claim_one(s, "w1", T0 + 40).await;
    let mut deps: Vec<&String> = d.dependency_results.keys().collect();
    deps.sort();
    assert_eq!(
        deps,
        ["a", "b", "c"],
        "all completed ancestors, grandparents too"
    );
    let (_, state) = finish_one(s, result(&d, Some("w1"), success(json!({}))), T0 + 50).await;
    assert_eq!(state, Some(TaskState::Complete));
    assert_eq!(s.get_task(&task).await.unwrap().completed_at, Some(T0 + 50));
}

async fn stale_completions_are_fenced_and_recorded(db: Db) {
    let s = db.store();
    let t = linear("conf", "fence", "work");
    s.put_template(&t, false, T0).await.unwrap();
    let task = create(s, &t, json!({}), T0).await;
    let job = claim_one(s, "w1", T0).await;
    let mut stale = result(&job, Some("w1"), success(json!({})));
    stale.attempt = 2;
    assert_unchanged(s, &task, || async {
        let (c, state) = finish_one(s, stale.clone(), T0 + 1).await;
        assert!(
            matches!(&c, Completion::Rejected(r) if r.contains("attempt 2")),
            "{c:?}"
        );
        assert_eq!(state, None);
        let (c, _) = finish_one(s, result(&job, Some("w2"), success(json!({}))), T0 + 1).await;
        assert!(
            matches!(&c, Completion::Rejected(r) if r.contains("w1")),
            "{c:?}"
        );
    })
    .await;
    let rejected = s.rejected_completions(&task).await.unwrap();
    assert_eq!(rejected.len(), 2);
    assert_eq!(
        (rejected[0].attempt, rejected[0].worker_id.as_deref()),
        (2, Some("w1"))
    );
    assert_eq!(
        (rejected[1].attempt, rejected[1].worker_id.as_deref()),
        (1, Some("w2"))
    );
    let (c, _) = finish_one(
        s,
        result(&job, Some("w1"), success(json!({"ok": true}))),
        T0 + 2,
    )
    .await;
    assert_eq!(c, Completion::Accepted);
    assert_unchanged(s, &task, || async {
        let (c, _) = finish_one(
            s,
            result(&job, Some("w1"), success(json!({"again": true}))),
            T0 + 3,
        )
        .await;
        assert!(
            matches!(&c, Completion::Rejected(r) if r.contains("not in_progress")),
            "{c:?}"
        );
    })
    .await;
    assert_eq!(s.rejected_completions(&task).await.unwrap().len(), 3);
    assert_eq!(
        s.get_task(&task).await.unwrap().step("a").unwrap().result,
        Some(json!({"ok": true}))
    );
    let (c, _) = finish_one(
        s,
        AttemptResult {
            step_uuid: "no-such-step".into(),
            ..result(&job, Some("w1"), success(json!({})))
        },
        T0,
    )
    .await;
    assert!(matches!(c, Completion::Rejected(_)));
}

/// The fencing case that matters most: attempt 1's worker comes back while attempt 2 runs.
async fn late_attempt_is_fenced_while_its_successor_runs(db: Db) {
    let s = db.store();
    let t = linear("conf", "successor", "work");
    s.put_template(&t, false, T0).await.unwrap();
    let task = create(s, &t, json!({}), T0).await;
    let first = claim_one(s, "w1", T0).await;
    let lost = AttemptResult {
        step_uuid: first.step_uuid.clone(),
        attempt: first.attempt,
        worker_id: None,
        expiry: Some(Expiry::LeaseExpired),
        resolution: Resolution::Retry {
            failure: StepFailure::new(ErrorType::WorkerLost, "lease expired"),
            next_attempt_at: T0 + LEASE + 1,
        },
        started_at: None,
        expansion: None,
    };
    let (c, _) = finish_one(s, lost, T0 + LEASE + 1).await;
    assert_eq!(c, Completion::Accepted);
    assert_eq!(
        s.promote_due_retries(ORCH, T0 + LEASE + 1).await.unwrap(),
        1
    );
    let second = claim_one(s, "w2", T0 + LEASE + 2).await;
    assert_eq!(
        (second.step_uuid.as_str(), second.attempt),
        (first.step_uuid.as_str(), 2)
    );
    assert_unchanged(s, &task, || async {
        let late = result(&first, Some("w1"), success(json!({"late": true})));
        let (c, state) = finish_one(s, late, T0 + LEASE + 3).await;
        assert!(
            matches!(&c, Completion::Rejected(r) if r.contains("attempt 1")),
            "{c:?}"
        );
        assert_eq!(state, None);
    })
    .await;
    let step = s.get_task(&task).await.unwrap().step("a").unwrap().clone();
    assert_eq!(
        (step.state, step.attempts, step.result),
        (StepState::InProgress, 2, None)
    );
    let rejected = s.rejected_completions(&task).await.unwrap();
    assert_eq!(
        (
            rejected.len(),
            rejected[0].attempt,
            rejected[0].worker_id.as_deref()
        ),
        (1, 1, Some("w1"))
    );
    let (c, _) = finish_one(
        s,
        result(&second, Some("w2"), success(json!({"ok": true}))),
        T0 + LEASE + 4,
    )
    .await;
    assert_eq!(c, Completion::Accepted);
}

async fn engine_expiry_is_rejected_when_the_lease_was_renewed(db: Db) {
    let s = db.store();
    let t = linear("conf", "expiry", "work");
    s.put_template(&t, false, T0).await.unwrap();
    let task = create(s, &t, json!({}), T0).await;
    let job = claim_one(s, "w1", T0).await;
    let lost = |job: &StepJob| AttemptResult {
        worker_id: None,
        expiry: Some(Expiry::LeaseExpired),
        started_at: None,
        expansion: None,
        ..result(
            job,
            None,
            Resolution::Retry {
                failure: StepFailure::new(ErrorType::WorkerLost, "lease expired"),
                next_attempt_at: T0 + LEASE + 10,
            },
        )
    };
    assert_eq!(
        s.renew_leases(
            "w1",
            &[(job.step_uuid.clone(), job.attempt)],
            T0 + 2 * LEASE,
            T0 + 10
        )
        .await
        .unwrap(),
        1
    );
    // A superseded attempt number renews nothing, even for the right worker.
    assert_eq!(
        s.renew_leases(
            "w1",
            &[(job.step_uuid.clone(), job.attempt + 1)],
            T0 + 9 * LEASE,
            T0 + 10
        )
        .await
        .unwrap(),
        0
    );
    assert_eq!(
        s.renew_leases(
            "w2",
            &[(job.step_uuid.clone(), job.attempt)],
            T0 + 9 * LEASE,
            T0 + 10
        )
        .await
        .unwrap(),
        0
    );
    assert!(
        s.expired_attempts(T0 + LEASE, 10).await.unwrap().is_empty(),
        "renewed"
    );
    assert_unchanged(s, &task, || async {
        let (c, _) = finish_one(s, lost(&job), T0 + LEASE).await;
        assert!(
            matches!(&c, Completion::Rejected(r) if r.contains("renewed")),
            "{c:?}"
        );
        let timeout = AttemptResult {
            expiry: Some(Expiry::Timeout),
            ..lost(&job)
        };
        let (c, _) = finish_one(s, timeout, T0 + LEASE).await;
        assert!(
            matches!(c, Completion::Rejected(_)),
            "not yet timed out: {c:?}"
        );
    })
    .await;
    assert!(
        s.rejected_completions(&task).await.unwrap().is_empty(),
        "lost races of the engine are not late completions"
    );
    let x = s.expired_attempts(T0 + 2 * LEASE, 10).await.unwrap();
    assert_eq!(x.len(), 1);
    let (c, state) = finish_one(s, lost(&job), T0 + 2 * LEASE).await;
    assert_eq!(c, Completion::Accepted);
    assert_eq!(state, Some(TaskState::WaitingForRetry));
    let a = s.get_task(&task).await.unwrap();
    let a = a.step("a").unwrap();
    assert_eq!(a.state, StepState::WaitingForRetry);
    assert_eq!(a.error.as_ref().unwrap().error_type, ErrorType::WorkerLost);
}

async fn retry_waits_until_due(db: Db) {
    let s = db.store();
    let t = linear("conf", "retry", "work");
    s.put_template(&t, false, T0).await.unwrap();
    let task = create(s, &t, json!({}), T0).await;
    let job = claim_one(s, "w1", T0).await;
    let failure = StepFailure::new(ErrorType::RetryableError, "flaky");
    let (c, state) = finish_one(
        s,
        result(
            &job,
            Some("w1"),
            Resolution::Retry {
                failure: failure.clone(),
                next_attempt_at: T0 + 1_000,
            },
        ),
        T0 + 5,
    )
    .await;
    assert_eq!(c, Completion::Accepted);
    assert_eq!(state, Some(TaskState::WaitingForRetry));
    let view = s.get_task(&task).await.unwrap();
    let a = view.step("a").unwrap();
    assert_eq!(
        (a.state, a.attempts, a.next_attempt_at),
        (StepState::WaitingForRetry, 1, Some(T0 + 1_000))
    );
    assert_eq!(a.error.as_ref(), Some(&failure));
    let tr: Vec<String> = s
        .step_transitions(&task, Some("a"))
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.event)
        .collect();
    assert_eq!(tr[tr.len() - 2..], ["fail", "retry_decided"]);
    assert_eq!(s.next_due().await.unwrap(), Some(T0 + 1_000));
    assert!(
        claim(s, "w1", 10, T0 + 2_000).await.is_empty(),
        "not claimable before promotion"
    );
    assert_unchanged(s, &task, || async {
        assert_eq!(s.promote_due_retries(ORCH, T0 + 999).await.unwrap(), 0);
    })
    .await;
    assert_eq!(s.promote_due_retries(ORCH, T0 + 1_000).await.unwrap(), 1);
    assert_eq!(
        s.task_state(&task).await.unwrap(),
        TaskState::StepsInProcess
    );
    let tt: Vec<String> = s
        .task_transitions(&task)
        .await
        .unwrap()
        .into_iter()
        .rev()
        .take(2)
        .map(|t| t.event)
        .collect();
    assert_eq!(tt, ["steps_enqueued", "retry_ready"]);
    assert_eq!(s.next_due().await.unwrap(), None);
    let again = claim_one(s, "w2", T0 + 1_001).await;
    assert_eq!((again.step_name.as_str(), again.attempt), ("a", 2));
}

async fn checkpoint_keeps_the_attempt_and_bounds_history(db: Db) {
    let s = db.store();
    let t = linear("conf", "cp", "work");
    s.put_template(&t, false, T0).await.unwrap();
    let task = create(s, &t, json!({}), T0).await;
    let job = claim_one(s, "w1", T0).await;
    for i in 0..25u64 {
        let cp = Checkpoint {
            cursor: json!(i * 10),
            items_processed: i * 10,
            accumulated: json!({"sum": i}),
        };
        let c = s
            .checkpoint(
                &job.step_uuid,
                1,
                "w1",
                &cp,
                T0 + 2 * DEFAULT_TIMEOUT + i as i64,
                T0 + DEFAULT_TIMEOUT + i as i64,
                T0 + i as i64,
            )
            .await
            .unwrap();
        assert_eq!(c, Completion::Accepted);
    }
    let view = s.get_task(&task).await.unwrap();
    let a = view.step("a").unwrap();
    assert_eq!((a.state, a.attempts), (StepState::InProgress, 1));
    assert_eq!(a.checkpoint.as_ref().unwrap().cursor, json!(240));
    let history = s.checkpoint_history(&job.step_uuid).await.unwrap();
    assert_eq!(history.len(), 20);
    assert_eq!(history[0]["cursor"], json!(50));
    assert_eq!(history[19]["cursor"], json!(240));
    assert!(
        s.expired_attempts(T0 + LEASE + 23, 10)
            .await
            .unwrap()
            .is_empty(),
        "lease renewed by the checkpoint"
    );
    assert!(
        s.expired_attempts(T0 + DEFAULT_TIMEOUT + 23, 10)
            .await
            .unwrap()
            .is_empty(),
        "timeout moved by the checkpoint"
    );
    let expired = s
        .expired_attempts(T0 + DEFAULT_TIMEOUT + 24, 10)
        .await
        .unwrap();
    assert_eq!(
        expired.iter().map(|x| x.expiry).collect::<Vec<_>>(),
        [Expiry::Timeout],
        "the last checkpoint's timeout holds"
    );
    let cps = s.step_transitions(&task, Some("a")).await.unwrap();
    let cps: Vec<_> = cps.iter().filter(|t| t.event == "checkpoint").collect();
    assert_eq!(cps.len(), 25);
    assert!(
        cps.iter()
            .all(|t| t.from_state.as_deref() == Some("in_progress")
                && t.to_state == "in_progress"
                && t.attempt == Some(1))
    );
    let cp = Checkpoint {
        cursor: json!(1),
        items_processed: 1,
        accumulated: Value::Null,
    };
    assert_unchanged(s, &task, || async {
        let c = s
            .checkpoint(&job.step_uuid, 2, "w1", &cp, T0, T0, T0)
            .await
            .unwrap();
        assert!(matches!(c, Completion::Rejected(_)));
        let c = s
            .checkpoint(&job.step_uuid, 1, "w2", &cp, T0, T0, T0)
            .await
            .unwrap();
        assert!(matches!(c, Completion::Rejected(_)));
    })
    .await;
    assert_eq!(s.rejected_completions(&task).await.unwrap().len(), 2);
    // A retry after a real failure resumes from the checkpoint.
    finish_one(
        s,
        result(
            &job,
            Some("w1"),
            Resolution::Retry {
                failure: StepFailure::new(ErrorType::RetryableError, "x"),
                next_attempt_at: T0 + 100,
            },
        ),
        T0 + 50,
    )
    .await;
    s.promote_due_retries(ORCH, T0 + 100).await.unwrap();
    let again = claim_one(s, "w1", T0 + 100).await;
    assert_eq!(again.attempt, 2);
    assert_eq!(again.checkpoint.unwrap().cursor, json!(240));
}

async fn operator_reset_only_from_error(db: Db) {
    let s = db.store();
    let t = linear("conf", "reset", "work");
    s.put_template(&t, false, T0).await.unwrap();
    let running = create(s, &t, json!({"r": 1}), T0).await;
    assert_unchanged(s, &running, || async {
        let e = s
            .operator_action(
                &running,
                &OperatorAction::ResetStep { step: "a".into() },
                "op",
                "why",
                T0,
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidTransition, "{e}");
        let e = s
            .operator_action(&running, &OperatorAction::GiveUp, "op", "why", T0)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidTransition, "{e}");
        let e = s
            .operator_action(&running, &OperatorAction::ResolveManually, "op", "why", T0)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidTransition, "{e}");
        let e = s
            .operator_action(
                &running,
                &OperatorAction::ResetStep { step: "zz".into() },
                "op",
                "why",
                T0,
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    })
    .await;

    let task = blocked_task(s, T0).await;
    let state = s
        .operator_action(
            &task,
            &OperatorAction::ResetStep { step: "a".into() },
            "alice",
            "fixed the db",
            T0 + 10,
        )
        .await
        .unwrap();
    assert_eq!(state, TaskState::StepsInProcess);
    let view = s.get_task(&task).await.unwrap();
    let a = view.step("a").unwrap();
    assert_eq!((a.state, a.attempts), (StepState::Enqueued, 0));
    let tr = s.step_transitions(&task, Some("a")).await.unwrap();
    let reset = tr.iter().find(|t| t.event == "reset").unwrap();
    assert_eq!(
        (reset.from_state.as_deref(), reset.to_state.as_str()),
        (Some("error"), "pending")
    );
    assert_eq!(
        (reset.actor.as_str(), reset.reason.as_deref()),
        ("alice", Some("fixed the db"))
    );
    let tt: Vec<String> = s
        .task_transitions(&task)
        .await
        .unwrap()
        .into_iter()
        .rev()
        .take(4)
        .map(|t| t.event)
        .collect();
    assert_eq!(
        tt,
        [
            "steps_enqueued",
            "ready_steps_found",
            "operator_fixed_step",
            "permanent_failure"
        ]
    );
    let fix = s
        .task_transitions(&task)
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.event == "operator_fixed_step")
        .unwrap();
    assert_eq!(
        (fix.from_state.as_deref(), fix.to_state.as_str()),
        (Some("blocked_by_failures"), "evaluating_results")
    );
    assert_eq!(fix.actor, "alice");
    let again = claim_one(s, "w1", T0 + 20).await;
    assert_eq!(again.attempt, 1, "attempts start over after a reset");
}

async fn operator_resolve_and_complete_step_unblock_dependents(db: Db) {
    let s = db.store();
    let task = blocked_task(s, T0).await;
    assert_eq!(step_state(s, &task, "b").await, StepState::Pending);
    let state = s
        .operator_action(
            &task,
            &OperatorAction::ResolveStep { step: "a".into() },
            "bob",
            "skip it",
            T0 + 10,
        )
        .await
        .unwrap();
    assert_eq!(state, TaskState::StepsInProcess);
    assert_eq!(step_state(s, &task, "a").await, StepState::ResolvedManually);
    assert_eq!(step_state(s, &task, "b").await, StepState::Enqueued);

    let task2 = blocked_task(s, T0 + 1).await;
    let state = s
        .operator_action(
            &task2,
            &OperatorAction::CompleteStep {
                step: "a".into(),
                result: json!({"manual": 42}),
            },
            "bob",
            "by hand",
            T0 + 10,
        )
        .await
        .unwrap();
    assert_eq!(state, TaskState::StepsInProcess);
    let view = s.get_task(&task2).await.unwrap();
    assert_eq!(view.step("a").unwrap().state, StepState::Complete);
    assert_eq!(view.step("a").unwrap().result, Some(json!({"manual": 42})));
    let mut jobs = claim(s, "w1", 10, T0 + 20).await;
    jobs.retain(|j| j.task_uuid == task2);
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        jobs[0].dependency_results.get("a"),
        Some(&json!({"manual": 42}))
    );
    let (_, st) = finish_one(s, result(&jobs[0], Some("w1"), success(json!({}))), T0 + 30).await;
    assert_eq!(st, Some(TaskState::Complete));
    // A completed step cannot be resolved or completed again.
    assert_unchanged(s, &task2, || async {
        let e = s
            .operator_action(
                &task2,
                &OperatorAction::ResolveStep { step: "a".into() },
                "bob",
                "x",
                T0 + 40,
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidTransition);
    })
    .await;
}

async fn operator_cancel_cancels_unfinished_steps(db: Db) {
    let s = db.store();
    let t = diamond();
    s.put_template(&t, false, T0).await.unwrap();
    let task = create(s, &t, json!({"c": 1}), T0).await;
    let a = claim_one(s, "w1", T0).await;
    let state = s
        .operator_action(
            &task,
            &OperatorAction::Cancel,
            "carol",
            "not needed",
            T0 + 5,
        )
        .await
        .unwrap();
    assert_eq!(state, TaskState::Cancelled);
    let view = s.get_task(&task).await.unwrap();
    assert_eq!(view.status, TaskState::Cancelled);
    assert_eq!(view.completed_at, Some(T0 + 5));
    assert!(
        view.steps.iter().all(|s| s.state == StepState::Cancelled),
        "{:?}",
        view.steps
    );
    let last = s.task_transitions(&task).await.unwrap().pop().unwrap();
    assert_eq!(
        (
            last.event.as_str(),
            last.actor.as_str(),
            last.reason.as_deref()
        ),
        ("cancel", "carol", Some("not needed"))
    );
    assert_unchanged(s, &task, || async {
        let (c, _) = finish_one(s, result(&a, Some("w1"), success(json!({}))), T0 + 6).await;
        assert!(matches!(c, Completion::Rejected(_)));
        for action in [
            OperatorAction::Cancel,
            OperatorAction::GiveUp,
            OperatorAction::ResolveManually,
            OperatorAction::ResolveStep { step: "b".into() },
        ] {
            let e = s
                .operator_action(&task, &action, "carol", "again", T0 + 7)
                .await
                .unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidTransition, "{action:?}: {e}");
        }
    })
    .await;
    assert_eq!(s.rejected_completions(&task).await.unwrap().len(), 1);
    assert!(claim(s, "w1", 10, T0 + 10).await.is_empty());
}

async fn operator_give_up_and_resolve_only_when_blocked(db: Db) {
    let s = db.store();
    let task = blocked_task(s, T0).await;
    assert_eq!(
        s.operator_action(&task, &OperatorAction::GiveUp, "dan", "hopeless", T0 + 9)
            .await
            .unwrap(),
        TaskState::Error
    );
    let view = s.get_task(&task).await.unwrap();
    assert_eq!(
        (view.status, view.completed_at),
        (TaskState::Error, Some(T0 + 9))
    );
    let task2 = blocked_task(s, T0 + 1).await;
    assert_eq!(
        s.operator_action(
            &task2,
            &OperatorAction::ResolveManually,
            "dan",
            "done elsewhere",
            T0 + 9
        )
        .await
        .unwrap(),
        TaskState::ResolvedManually
    );
    let view = s.get_task(&task2).await.unwrap();
    assert_eq!(
        (view.status, view.completed_at),
        (TaskState::ResolvedManually, Some(T0 + 9))
    );
    let tt = s.task_transitions(&task2).await.unwrap().pop().unwrap();
    assert_eq!(
        (
            tt.from_state.as_deref(),
            tt.to_state.as_str(),
            tt.event.as_str()
        ),
        (
            Some("blocked_by_failures"),
            "resolved_manually",
            "manual_resolution"
        )
    );
    assert_eq!(
        (tt.actor.as_str(), tt.reason.as_deref()),
        ("dan", Some("done elsewhere"))
    );
    assert_unchanged(s, &task2, || async {
        let e = s
            .operator_action(
                &task2,
                &OperatorAction::ResetStep { step: "a".into() },
                "dan",
                "x",
                T0 + 10,
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidTransition);
    })
    .await;
    let e = s
        .operator_action("no-such-task", &OperatorAction::Cancel, "dan", "x", T0)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
}

fn workflow_parent() -> TaskTemplate {
    template(
        r#"
name: parent
namespace_name: conf
version: "1.0.0"
identity_strategy: always_unique
steps:
  - name: run
    type: workflow
    handler: { callable: WorkflowHandler, initialization: { task_template: child } }
  - name: after
    handler: { callable: work }
    dependencies: [run]
"#,
    )
}

/// A child task of `parent`'s step `step`, as the workflow runner creates it.
async fn create_child(
    s: &Arc<dyn Store>,
    t: &TaskTemplate,
    parent: &str,
    step: &str,
    now: Millis,
) -> String {
    let mut new = plan(t, request(t, json!({ "parent": parent, "step": step })));
    new.parent = Some(ParentLink {
        task_uuid: parent.into(),
        step_uuid: step.into(),
    });
    match s.create_task(&new, ORCH, now).await.unwrap() {
        Created::New(uuid) => uuid,
        other => panic!("expected a new task, got {other:?}"),
    }
}

/// A `workflow_parent` task whose workflow step `run` was claimed by the engine (`core`) and
/// started a `child` task (registered as `conf/child`): `(child template, parent, [run], child)`.
async fn parent_and_child(s: &Arc<dyn Store>) -> (TaskTemplate, String, Vec<StepJob>, String) {
    let (p, child) = (workflow_parent(), linear("conf", "child", "work"));
    s.put_template(&p, false, T0).await.unwrap();
    s.put_template(&child, false, T0).await.unwrap();
    let task = create(s, &p, json!({}), T0).await;
    let run = s
        .claim(&claim_req("core", &[], CallableFilter::Workflows, 10), T0)
        .await
        .unwrap();
    let kid = create_child(s, &child, &task, &run[0].step_uuid, T0 + 1).await;
    (child, task, run, kid)
}

async fn workflow_steps_are_claimed_apart_and_children_are_linked(db: Db) {
    let s = db.store();
    let (p, child) = (workflow_parent(), linear("conf", "child", "work"));
    s.put_template(&p, false, T0).await.unwrap();
    s.put_template(&child, false, T0).await.unwrap();
    let task = create(s, &p, json!({}), T0).await;
    // No handler claim takes a workflow step, whatever its filter says.
    for filter in [any(), CallableFilter::Only(vec!["WorkflowHandler".into()])] {
        assert!(
            s.claim(&claim_req("w1", &[], filter, 10), T0)
                .await
                .unwrap()
                .is_empty()
        );
    }
    let run = s
        .claim(&claim_req("core", &[], CallableFilter::Workflows, 10), T0)
        .await
        .unwrap();
    assert_eq!(run.len(), 1);
    assert_eq!(run[0].step_name, "run");
    let kid = create_child(s, &child, &task, &run[0].step_uuid, T0 + 1).await;
    let view = s.get_task(&kid).await.unwrap();
    assert_eq!(
        view.parent,
        Some(ParentLink {
            task_uuid: task.clone(),
            step_uuid: run[0].step_uuid.clone()
        })
    );
    let listed = s
        .list_tasks(&TaskFilter {
            parent_task_uuid: Some(task.clone()),
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.iter().map(|t| &t.uuid).collect::<Vec<_>>(), [&kid]);
    // A running child of a waiting step needs nothing.
    assert!(s.workflow_children(10).await.unwrap().is_empty());
    // The child ends: its parent step is reported, still in progress.
    for at in [T0 + 2, T0 + 3] {
        let job = claim_one(s, "w1", at).await;
        assert_eq!(job.task_uuid, kid);
        finish_one(
            s,
            result(&job, Some("w1"), success(json!({"ok": true}))),
            at,
        )
        .await;
    }
    assert_eq!(s.task_state(&kid).await.unwrap(), TaskState::Complete);
    let ended = s.workflow_children(10).await.unwrap();
    assert_eq!(ended.len(), 1, "{ended:?}");
    let c = &ended[0];
    assert_eq!(
        (
            c.parent_task_uuid.as_str(),
            c.parent_step_uuid.as_str(),
            c.parent_attempt,
            c.parent_step_state,
            c.child_task_uuid.as_str(),
            c.child_state
        ),
        (
            task.as_str(),
            run[0].step_uuid.as_str(),
            1,
            StepState::InProgress,
            kid.as_str(),
            TaskState::Complete
        )
    );
    // Once the step has its result, the child is nobody's business.
    finish_one(s, result(&run[0], Some("core"), success(json!({}))), T0 + 4).await;
    assert!(s.workflow_children(10).await.unwrap().is_empty());
}

async fn cancelling_a_parent_cancels_its_children_in_the_same_transaction(db: Db) {
    let s = db.store();
    let (child, task, _, kid) = parent_and_child(s).await;
    // A grandchild, started by one of the child's steps.
    let a = claim_one(s, "w1", T0 + 2).await;
    let grandchild = create_child(s, &child, &kid, &a.step_uuid, T0 + 3).await;
    s.operator_action(&task, &OperatorAction::Cancel, "carol", "stop", T0 + 4)
        .await
        .unwrap();
    for t in [&task, &kid, &grandchild] {
        let view = s.get_task(t).await.unwrap();
        assert_eq!(view.status, TaskState::Cancelled, "{t}");
        assert!(
            view.steps.iter().all(|s| s.state == StepState::Cancelled),
            "{:?}",
            view.steps
        );
    }
    let why = s.task_transitions(&kid).await.unwrap().pop().unwrap();
    assert_eq!(why.event, "cancel");
    assert_eq!(why.actor, "carol");
    let reason = why.reason.unwrap();
    assert!(
        reason.contains(&task) && reason.contains("stop"),
        "{reason}"
    );
    // The child's late result is fenced off like any cancelled step's.
    let (c, _) = finish_one(s, result(&a, Some("w1"), success(json!({}))), T0 + 5).await;
    assert!(matches!(c, Completion::Rejected(_)));
    assert!(s.workflow_children(10).await.unwrap().is_empty());
}

async fn children_outliving_their_parent_are_reported(db: Db) {
    let s = db.store();
    let (_, task, _, kid) = parent_and_child(s).await;
    // An operator completes the workflow step by hand and the parent finishes without the
    // child: the child still runs, and is reported for cancelling.
    s.operator_action(
        &task,
        &OperatorAction::CompleteStep {
            step: "run".into(),
            result: json!({}),
        },
        "dan",
        "done by hand",
        T0 + 2,
    )
    .await
    .unwrap();
    let after = s
        .claim(
            &claim_req(
                "w1",
                &["conf"],
                CallableFilter::Only(vec!["work".into()]),
                10,
            ),
            T0 + 3,
        )
        .await
        .unwrap();
    let after: Vec<_> = after.into_iter().filter(|j| j.task_uuid == task).collect();
    assert_eq!(after.len(), 1);
    finish_one(s, result(&after[0], Some("w1"), success(json!({}))), T0 + 4).await;
    assert_eq!(s.task_state(&task).await.unwrap(), TaskState::Complete);
    let orphans = s.workflow_children(10).await.unwrap();
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    assert_eq!(orphans[0].child_task_uuid, kid);
    assert_eq!(orphans[0].parent_task_state, TaskState::Complete);
    assert!(!orphans[0].child_state.is_terminal());
}

// ---------------------------------------------------------------- backends

macro_rules! suite {
    ($backend:ident, $open:expr, [$($test:ident),* $(,)?]) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let open: super::Opener = $open;
                    super::$test(open(4).await).await;
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
                templates_register_version_and_conflict,
                create_task_inserts_steps_edges_transitions,
                creation_records_the_same_whether_or_not_it_claims,
                identity_duplicates_return_existing,
                group_creation_resolves_identities_within_the_group,
                group_finish_reports_each_result_and_claims_what_became_ready,
                result_batches_and_creations_are_announced,
                expansion_creates_steps_with_the_result,
                batch_parallelism_caps_running_workers,
                batch_fail_fast_cancels_unfinished_siblings,
                batch_isolate_lets_the_aggregator_run_with_the_failures,
                claim_respects_namespaces_and_callables,
                claim_sets_attempt_lease_and_timeout,
                claim_orders_by_priority_then_enqueued_at_and_limits,
                concurrent_claims_take_each_step_exactly_once,
                success_enqueues_children_in_the_same_transaction,
                stale_completions_are_fenced_and_recorded,
                late_attempt_is_fenced_while_its_successor_runs,
                engine_expiry_is_rejected_when_the_lease_was_renewed,
                retry_waits_until_due,
                checkpoint_keeps_the_attempt_and_bounds_history,
                operator_reset_only_from_error,
                operator_resolve_and_complete_step_unblock_dependents,
                operator_cancel_cancels_unfinished_steps,
                operator_give_up_and_resolve_only_when_blocked,
                workflow_steps_are_claimed_apart_and_children_are_linked,
                cancelling_a_parent_cancels_its_children_in_the_same_transaction,
                children_outliving_their_parent_are_reported,
            ]
        );
    };
}

fn sqlite_memory(handles: usize) -> Pin<Box<dyn Future<Output = Db> + Send>> {
    Box::pin(async move {
        let store: Arc<dyn Store> = Arc::new(
            tasker_core::store::sqlite::SqliteStore::open(
                "sqlite::memory:",
                tasker_core::config::SqliteSync::Normal,
            )
            .await
            .unwrap(),
        );
        // One in-memory database cannot be opened twice: every "handle" is the same store.
        Db {
            stores: vec![store; handles.max(1)],
            _dir: None,
        }
    })
}

fn sqlite_file(handles: usize) -> Pin<Box<dyn Future<Output = Db> + Send>> {
    Box::pin(async move {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("tasker.db").display());
        let mut stores: Vec<Arc<dyn Store>> = Vec::new();
        for _ in 0..handles.max(1) {
            stores.push(Arc::new(
                tasker_core::store::sqlite::SqliteStore::open(
                    &url,
                    tasker_core::config::SqliteSync::Normal,
                )
                .await
                .unwrap(),
            ));
        }
        Db {
            stores,
            _dir: Some(dir),
        }
    })
}

/// Handles onto a fresh database on the test server (each its own connection pool, like
/// separate processes).
#[cfg(feature = "postgres")]
fn postgres(handles: usize) -> Pin<Box<dyn Future<Output = Db> + Send>> {
    Box::pin(async move {
        use tasker_core::store::postgres::{PgStore, create_scratch_database, test_server_url};
        let server = test_server_url();
        let url = create_scratch_database(&server, "tasker_test")
            .await
            .unwrap_or_else(|e| {
                panic!("PostgreSQL at {server} is needed (`./run test` starts one): {e}")
            });
        let mut stores: Vec<Arc<dyn Store>> = Vec::new();
        for _ in 0..handles.max(1) {
            stores.push(Arc::new(PgStore::open(&url, 4, true).await.unwrap()));
        }
        Db { stores, _dir: None }
    })
}

#[cfg(feature = "postgres")]
all_tests!(postgres_backend, super::postgres);
all_tests!(sqlite_memory_backend, super::sqlite_memory);
all_tests!(sqlite_file_backend, super::sqlite_file);
