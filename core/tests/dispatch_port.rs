//! The dispatch port driven the way a language binding drives it: the engine's tokio runtime
//! lives on its own threads, and plain `std::thread` host threads call the blocking `Worker`
//! methods (`next_step`, `complete`, `checkpoint`, `heartbeat`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tasker_core::clock::{Clock, SystemClock, TestClock};
use tasker_core::store::Completion;
use tasker_core::template::parse_str;
use tasker_core::{
    Config, ErrorKind, ErrorType, OpenOptions, StepOutcome, StepState, TaskRequest, TaskState,
    Tasker, handler_fn,
};

const WAIT: Option<Duration> = Some(Duration::from_secs(20));
const POLL: Duration = Duration::from_millis(200);

/// The engine and the runtime it runs on. Field order matters: the handle goes first.
struct Env {
    tasker: Tasker,
    rt: tokio::runtime::Runtime,
}

impl Env {
    fn new(config: Config) -> Env {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    fn with_clock(config: Config, clock: Arc<dyn Clock>) -> Env {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let tasker = rt
            .block_on(Tasker::open_with(
                "sqlite::memory:",
                OpenOptions {
                    config,
                    clock,
                    background: true,
                },
            ))
            .unwrap();
        Env { tasker, rt }
    }

    fn register(&self, yaml: &str) {
        let t = parse_str(yaml, None, "test")
            .unwrap_or_else(|e| panic!("{e}"))
            .template;
        self.rt.block_on(self.tasker.register_template(&t)).unwrap();
    }

    fn create(&self, name: &str, context: serde_json::Value) -> String {
        self.rt
            .block_on(
                self.tasker
                    .create_task(TaskRequest::new("port", name, context)),
            )
            .unwrap()
            .uuid
    }

    fn wait(&self, uuid: &str) -> tasker_core::Task {
        self.rt.block_on(self.tasker.wait(uuid, WAIT)).unwrap()
    }
}

fn config() -> Config {
    Config {
        poll_interval: POLL,
        ..Config::default()
    }
}

fn one_step(name: &str, callable: &str, extra: &str) -> String {
    format!(
        "name: {name}\nnamespace_name: port\nversion: \"1.0.0\"\nidentity_strategy: always_unique\nsteps:\n  - name: only\n    handler: {{ callable: {callable} }}\n{extra}\n"
    )
}

/// A template `name` of three steps `a` → `b` → `c`, each run by `callable`.
fn chain_of_three(name: &str, callable: &str) -> String {
    let step = |n: &str, deps: &str| {
        format!("  - name: {n}\n    handler: {{ callable: {callable} }}\n{deps}")
    };
    format!(
        "name: {name}\nnamespace_name: port\nversion: \"1.0.0\"\nidentity_strategy: always_unique\nsteps:\n{}{}{}",
        step("a", ""),
        step("b", "    dependencies: [a]\n"),
        step("c", "    dependencies: [b]\n"),
    )
}

/// Runs a Rust-handled task to completion: proves the engine's own worker loop has made at
/// least one full pass (including its unknown-callable pass) since earlier tasks were created.
fn cycle_engine_worker(env: &Env) {
    env.register(&one_step("rust_side", "rust.ok", ""));
    env.tasker.register_handler(
        "rust.ok",
        handler_fn(|_| async { StepOutcome::success(json!({})) }),
    );
    let uuid = env.create("rust_side", json!({}));
    assert_eq!(env.wait(&uuid).status, TaskState::Complete);
}

#[test]
fn host_threads_run_each_step_exactly_once() {
    const TASKS: usize = 20;
    const STEPS: usize = 3;
    let env = Env::new(config());
    env.register(&chain_of_three("chain", "py.square"));
    let workers: Vec<Arc<tasker_core::Worker>> = (0..2)
        .map(|_| {
            Arc::new(
                env.tasker
                    .worker(vec!["port".into()], vec!["py.square".into()]),
            )
        })
        .collect();
    let tasks: Vec<String> = (0..TASKS)
        .map(|i| env.create("chain", json!({"n": i})))
        .collect();
    let invocations: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let done = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for h in 0..4 {
        let worker = workers[h % 2].clone();
        let invocations = invocations.clone();
        let done = done.clone();
        threads.push(std::thread::spawn(move || {
            // Half the threads take their next job along with each result.
            let along = h % 2 == 0;
            let mut following = None;
            while done.load(Ordering::SeqCst) < TASKS * STEPS {
                let job = match following.take() {
                    Some(job) => job,
                    None => match worker.next_step(Duration::from_millis(100)).unwrap() {
                        Some(job) => job,
                        None => continue,
                    },
                };
                *invocations
                    .lock()
                    .unwrap()
                    .entry(job.step_uuid.clone())
                    .or_default() += 1;
                let n = job
                    .dependency_results
                    .values()
                    .filter_map(|v| v["n"].as_u64())
                    .max()
                    .unwrap_or_else(|| job.context["n"].as_u64().unwrap());
                let outcome = StepOutcome::success(json!({"n": n * n, "host": h}));
                let c = if along {
                    let (c, next) = worker.complete_and_next(&job, outcome).unwrap();
                    following = next;
                    c
                } else {
                    worker.complete(&job, outcome).unwrap()
                };
                assert_eq!(c, Completion::Accepted);
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for uuid in &tasks {
        let task = env.wait(uuid);
        assert_eq!(task.status, TaskState::Complete, "{task:#?}");
        assert!(task.steps.iter().all(|s| s.attempts == 1));
    }
    for t in threads {
        t.join().unwrap();
    }
    let inv = invocations.lock().unwrap();
    assert_eq!(inv.len(), TASKS * STEPS);
    assert!(inv.values().all(|n| *n == 1), "a step ran twice: {inv:?}");
    let last = env.wait(&tasks[3]);
    assert_eq!(
        last.step("c").unwrap().result.as_ref().unwrap()["n"],
        json!(6561)
    );
}

#[test]
fn an_abandoned_job_times_out_reruns_elsewhere_and_its_late_result_is_rejected() {
    let env = Env::new(config());
    env.register(&one_step(
        "abandon",
        "py.slow",
        "    timeout_seconds: 1\n    retry: { max_attempts: 2, backoff: none }",
    ));
    let host_a = env
        .tasker
        .worker(vec!["port".into()], vec!["py.slow".into()]);
    let host_b = Arc::new(
        env.tasker
            .worker(vec!["port".into()], vec!["py.slow".into()]),
    );
    let uuid = env.create("abandon", json!({}));
    let first = host_a
        .next_step(Duration::from_secs(5))
        .unwrap()
        .expect("a job for host A");
    assert_eq!(first.attempt, 1);
    // Host A hangs; host B keeps asking and gets the second attempt once the first times out.
    let b = host_b.clone();
    let rerun = std::thread::spawn(move || {
        let job = b
            .next_step(Duration::from_secs(15))
            .unwrap()
            .expect("the re-run");
        let c = b
            .complete(&job, StepOutcome::success(json!({"by": "b"})))
            .unwrap();
        (job, c)
    });
    let (second, c) = rerun.join().unwrap();
    assert_eq!(
        (second.step_uuid.as_str(), second.attempt),
        (first.step_uuid.as_str(), 2)
    );
    assert_eq!(c, Completion::Accepted);
    let task = env.wait(&uuid);
    assert_eq!(task.status, TaskState::Complete);
    assert_eq!(task.step("only").unwrap().attempts, 2);
    let tr = env
        .rt
        .block_on(env.tasker.step_transitions(&uuid, Some("only")))
        .unwrap();
    let fail = tr.iter().find(|t| t.event == "fail").unwrap();
    assert!(
        fail.reason.as_deref().unwrap().starts_with("timeout"),
        "{fail:?}"
    );
    assert_eq!(fail.attempt, Some(1));

    let late = host_a
        .complete(&first, StepOutcome::success(json!({"by": "a"})))
        .unwrap();
    assert!(
        matches!(&late, Completion::Rejected(r) if r.contains("not in_progress")),
        "{late:?}"
    );
    assert!(!host_a.heartbeat(&first).unwrap());
    let rejected = env
        .rt
        .block_on(env.tasker.store().rejected_completions(&uuid))
        .unwrap();
    assert_eq!(rejected.len(), 1);
    assert_eq!(
        (rejected[0].attempt, rejected[0].worker_id.as_deref()),
        (1, Some(host_a.id()))
    );
    assert_eq!(
        env.wait(&uuid).step("only").unwrap().result,
        Some(json!({"by": "b"}))
    );
}

#[test]
fn a_worker_only_receives_callables_it_serves() {
    let env = Env::new(Config {
        unknown_callable_grace: Duration::ZERO,
        ..config()
    });
    env.register(&one_step("routed", "rb.Billing", ""));
    let wrong_callable = env
        .tasker
        .worker(vec!["port".into()], vec!["rb.Other".into()]);
    let wrong_namespace = env
        .tasker
        .worker(vec!["elsewhere".into()], vec!["rb.Billing".into()]);
    let right = env
        .tasker
        .worker(vec!["port".into()], vec!["rb.Billing".into()]);
    let uuid = env.create("routed", json!({}));
    assert!(
        wrong_callable
            .next_step(Duration::from_millis(300))
            .unwrap()
            .is_none()
    );
    assert!(
        wrong_namespace
            .next_step(Duration::from_millis(300))
            .unwrap()
            .is_none()
    );
    let job = right
        .next_step(Duration::from_secs(5))
        .unwrap()
        .expect("the right worker gets it");
    assert_eq!(
        (
            job.task_uuid.as_str(),
            job.callable(),
            job.worker_id.as_str()
        ),
        (uuid.as_str(), "rb.Billing", right.id())
    );
    right
        .complete(&job, StepOutcome::success(json!({})))
        .unwrap();
    assert_eq!(env.wait(&uuid).status, TaskState::Complete);
}

#[test]
fn checkpoints_hand_the_job_out_again_without_spending_an_attempt() {
    let env = Env::new(config());
    env.register(&one_step("cp", "ts.batch", ""));
    let w = env
        .tasker
        .worker(vec!["port".into()], vec!["ts.batch".into()]);
    let uuid = env.create("cp", json!({}));
    let job = w.next_step(Duration::from_secs(5)).unwrap().unwrap();
    assert!(job.checkpoint.is_none());
    assert_eq!(
        w.checkpoint(&job, json!(10), 10, json!({"sum": 1}))
            .unwrap(),
        Completion::Accepted
    );
    let again = w
        .next_step(Duration::from_secs(1))
        .unwrap()
        .expect("resumed job");
    assert_eq!(
        (again.step_uuid.as_str(), again.attempt),
        (job.step_uuid.as_str(), 1)
    );
    assert_eq!(again.checkpoint.as_ref().unwrap().cursor, json!(10));
    assert!(
        w.heartbeat(&again).unwrap(),
        "a checkpointed job is still held"
    );
    let c = w
        .complete(
            &again,
            StepOutcome::checkpoint_yield(json!(20), 20, json!({"sum": 3})),
        )
        .unwrap();
    assert_eq!(c, Completion::Accepted);
    let third = w
        .next_step(Duration::from_secs(1))
        .unwrap()
        .expect("resumed again");
    assert_eq!(
        (
            third.attempt,
            third.checkpoint.as_ref().unwrap().items_processed
        ),
        (1, 20)
    );
    assert!(w.heartbeat(&third).unwrap());
    assert_eq!(
        w.complete(&third, StepOutcome::success(json!({"total": 20})))
            .unwrap(),
        Completion::Accepted
    );
    assert!(!w.heartbeat(&third).unwrap(), "released after completion");
    let task = env.wait(&uuid);
    assert_eq!(task.status, TaskState::Complete);
    let only = task.step("only").unwrap();
    assert_eq!(
        (
            only.attempts,
            only.checkpoint.as_ref().unwrap().cursor.clone()
        ),
        (1, json!(20))
    );
    assert!(w.next_step(Duration::from_millis(100)).unwrap().is_none());
}

#[test]
fn the_engine_renews_port_leases_while_the_host_works() {
    let env = Env::new(Config {
        lease: Duration::from_millis(300),
        lease_renew_every: Duration::from_millis(100),
        ..config()
    });
    env.register(&one_step(
        "long_hold",
        "py.held",
        "    retry: { max_attempts: 1 }",
    ));
    let w = env
        .tasker
        .worker(vec!["port".into()], vec!["py.held".into()]);
    let uuid = env.create("long_hold", json!({}));
    let job = w.next_step(Duration::from_secs(5)).unwrap().unwrap();
    // The host's handler works for over three lease lengths without a heartbeat.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        env.rt
            .block_on(env.tasker.get_task(&uuid))
            .unwrap()
            .step("only")
            .unwrap()
            .state,
        StepState::InProgress
    );
    assert_eq!(
        w.complete(&job, StepOutcome::success(json!({}))).unwrap(),
        Completion::Accepted
    );
    let task = env.wait(&uuid);
    assert_eq!(
        (task.status, task.step("only").unwrap().attempts),
        (TaskState::Complete, 1)
    );
}

#[test]
fn a_task_created_before_its_port_worker_is_not_failed() {
    let env = Env::new(config());
    env.register(&one_step("early", "py.late_worker", ""));
    let uuid = env.create("early", json!({}));
    // The engine's worker loop runs a full pass while nobody serves `py.late_worker`.
    cycle_engine_worker(&env);
    let w = env
        .tasker
        .worker(vec!["port".into()], vec!["py.late_worker".into()]);
    let job = w
        .next_step(Duration::from_secs(5))
        .unwrap()
        .expect("the step waited for its worker");
    w.complete(&job, StepOutcome::success(json!({}))).unwrap();
    assert_eq!(env.wait(&uuid).status, TaskState::Complete);
}

#[test]
fn a_callable_nobody_serves_fails_after_the_grace_period() {
    let clock = TestClock::default();
    let env = Env::with_clock(config(), Arc::new(clock.clone()));
    env.register(&one_step("orphan", "py.missing", ""));
    let uuid = env.create("orphan", json!({}));
    cycle_engine_worker(&env);
    assert_eq!(
        env.rt
            .block_on(env.tasker.get_task(&uuid))
            .unwrap()
            .step("only")
            .unwrap()
            .state,
        StepState::Enqueued
    );
    clock.advance(env.tasker.config().unknown_callable_grace);
    let task = env.wait(&uuid);
    assert_eq!(task.status, TaskState::BlockedByFailures);
    let err = task.step("only").unwrap().error.clone().unwrap();
    assert_eq!(
        (err.error_type, err.retryable),
        (ErrorType::HandlerNotFound, false)
    );
    assert!(err.message.contains("py.missing"), "{}", err.message);
}

#[test]
fn dropping_one_of_two_workers_keeps_the_callable_served() {
    let env = Env::new(Config {
        unknown_callable_grace: Duration::ZERO,
        ..config()
    });
    env.register(&one_step("shared", "py.shared", ""));
    let w1 = env
        .tasker
        .worker(vec!["port".into()], vec!["py.shared".into()]);
    let w2 = env
        .tasker
        .worker(vec!["port".into()], vec!["py.shared".into()]);
    drop(w1);
    let uuid = env.create("shared", json!({}));
    cycle_engine_worker(&env);
    let job = w2
        .next_step(Duration::from_secs(5))
        .unwrap()
        .expect("still served by w2");
    w2.complete(&job, StepOutcome::success(json!({}))).unwrap();
    assert_eq!(env.wait(&uuid).status, TaskState::Complete);
}

#[test]
fn heartbeat_is_true_while_held_and_false_after_completion() {
    let env = Env::new(config());
    env.register(&one_step("hb", "py.hb", ""));
    let w = env.tasker.worker(vec!["port".into()], vec!["py.hb".into()]);
    let uuid = env.create("hb", json!({}));
    let job = w.next_step(Duration::from_secs(5)).unwrap().unwrap();
    assert!(w.heartbeat(&job).unwrap());
    assert!(w.heartbeat(&job).unwrap());
    w.complete(
        &job,
        StepOutcome::failure("bad input", ErrorType::ValidationError),
    )
    .unwrap();
    assert!(!w.heartbeat(&job).unwrap());
    let task = env.wait(&uuid);
    assert_eq!(task.status, TaskState::BlockedByFailures);
    assert_eq!(
        task.step("only")
            .unwrap()
            .error
            .as_ref()
            .unwrap()
            .error_type,
        ErrorType::ValidationError
    );
}

#[test]
fn close_wakes_blocked_hosts_promptly() {
    let env = Env::new(config());
    let w = Arc::new(
        env.tasker
            .worker(vec!["port".into()], vec!["py.none".into()]),
    );
    let w2 = w.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let host = std::thread::spawn(move || {
        tx.send(()).unwrap();
        let started = Instant::now();
        (w2.next_step(Duration::from_secs(30)), started.elapsed())
    });
    rx.recv().unwrap();
    env.tasker.close();
    let (r, took) = host.join().unwrap();
    assert_eq!(r.unwrap_err().kind, ErrorKind::Shutdown);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let e = env
        .rt
        .block_on(env.tasker.wait("whatever", Some(Duration::from_secs(1))))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "reads still work after close");
}

/// A batch whose workers are served by host threads: each real batch is handed out once, with
/// its cursor, while a `no_batches` placeholder never reaches the host.
#[test]
fn batch_workers_reach_host_threads_and_placeholders_do_not() {
    let env = Env::new(config());
    env.register(
        r#"
name: port_batch
namespace_name: port
version: "1.0.0"
identity_strategy: always_unique
steps:
  - { name: analyze, type: batchable, handler: { callable: rs.analyze } }
  - name: work
    type: batch_worker
    dependencies: [analyze]
    handler: { callable: host.work }
    batch_config: { batch_size: 10, parallelism: 8 }
  - { name: total, type: deferred_convergence, dependencies: [work], handler: { callable: rs.total } }
"#,
    );
    env.tasker.register_handler(
        "rs.analyze",
        handler_fn(|ctx| async move {
            let n = ctx.get_input("items").and_then(|v| v.as_u64()).unwrap_or(0);
            StepOutcome::batch_analyzer_success(tasker_core::batch::create_batch_outcome(n, 10))
        }),
    );
    env.tasker.register_handler(
        "rs.total",
        handler_fn(|ctx| async move {
            let s = tasker_core::BatchAggregationScenario::from_context(&ctx, "analyze", "work_");
            let n: u64 = s
                .batch_results
                .values()
                .filter_map(|r| r["n"].as_u64())
                .sum();
            StepOutcome::success(json!({ "n": n, "no_batches": s.is_no_batches }))
        }),
    );
    let w = env
        .tasker
        .worker(vec!["port".into()], vec!["host.work".into()]);

    let uuid = env.create("port_batch", json!({ "items": 25 }));
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let job = w
            .next_step(Duration::from_secs(10))
            .unwrap()
            .expect("a batch");
        let batch = tasker_core::BatchWorkerContext::from_job(&job).expect("a batch worker");
        let n = batch.cursor.batch_size;
        seen.push(job.step_name.clone());
        w.complete(
            &job,
            StepOutcome::batch_worker_success(&batch, json!({ "n": n })),
        )
        .unwrap();
    }
    seen.sort();
    assert_eq!(seen, ["work_001", "work_002", "work_003"]);
    let task = env.wait(&uuid);
    assert_eq!(task.status, TaskState::Complete);
    assert_eq!(
        task.step("total").unwrap().result,
        Some(json!({ "n": 25, "no_batches": false }))
    );

    let uuid = env.create("port_batch", json!({ "items": 0 }));
    let task = env.wait(&uuid);
    assert_eq!(task.status, TaskState::Complete);
    assert_eq!(
        task.step("work_000").unwrap().result.as_ref().unwrap()["is_no_op"],
        json!(true)
    );
    assert!(
        w.next_step(Duration::from_millis(100)).unwrap().is_none(),
        "the placeholder was never handed out"
    );
}

/// Draining (graceful shutdown) stops a port's claims at once: a ready step is left for other
/// processes while the job already held finishes and is counted.
#[test]
fn a_draining_engine_hands_out_no_new_jobs() {
    let env = Env::new(config());
    env.register(&one_step("drained", "py.drain", ""));
    let w = env
        .tasker
        .worker(vec!["port".into()], vec!["py.drain".into()]);
    let first = env.create("drained", json!({}));
    let job = w
        .next_step(Duration::from_secs(10))
        .unwrap()
        .expect("the first step is handed out");
    assert_eq!(job.task_uuid, first);

    // Start the drain and poll it once, so it is under way before the next claim.
    let tasker = env.tasker.clone();
    let mut drain = Box::pin(async move { tasker.drain(Duration::from_secs(20)).await });
    env.rt.block_on(async {
        tokio::select! {
            biased;
            _ = &mut drain => panic!("the drain cannot end while a job is held"),
            _ = tokio::task::yield_now() => {}
        }
    });
    let drained = env.rt.spawn(drain);

    let second = env.create("drained", json!({}));
    assert!(
        w.next_step(Duration::from_millis(300)).unwrap().is_none(),
        "a draining engine claimed a new step"
    );
    assert_eq!(
        w.complete(&job, StepOutcome::success(json!({"ok": true})))
            .unwrap(),
        Completion::Accepted
    );
    let report = env.rt.block_on(drained).unwrap().unwrap();
    assert_eq!((report.finished, report.handed_back), (1, 0));
    let untouched = env.rt.block_on(env.tasker.get_task(&second)).unwrap();
    assert_eq!(untouched.steps[0].attempts, 0);
    assert_eq!(
        w.next_step(Duration::from_secs(1)).unwrap_err().kind,
        ErrorKind::Shutdown
    );
}

/// A host that learns a handler while its threads wait (`serve_more`) gets the steps of that
/// callable at once: the waiting threads look again with the larger set instead of sleeping
/// out their wait (here a poll of a minute and a wait of 30 s, so only the wake-up can pass).
#[test]
fn serving_more_callables_wakes_waiting_hosts() {
    let env = Env::new(Config {
        poll_interval: Duration::from_secs(60),
        ..Config::default()
    });
    env.register(&one_step("late", "py.Late", ""));
    let worker = Arc::new(
        env.tasker
            .worker(vec!["port".into()], vec!["py.Early".into()]),
    );
    let uuid = env.create("late", json!({}));
    let waiting = {
        let worker = worker.clone();
        std::thread::spawn(move || worker.next_step(Duration::from_secs(30)))
    };
    // Let the host thread make its first, empty claim and settle into its wait. (Were it
    // slower than this, it would find the step on its first claim and the test would prove
    // less, never fail wrongly.)
    std::thread::sleep(Duration::from_millis(300));
    worker.serve_more(&["py.Late".to_string()]);
    let job = waiting.join().unwrap().unwrap();
    let job = job.expect("the waiting thread got the step of the newly served callable");
    assert_eq!(job.callable(), "py.Late");
    assert_eq!(worker.callables(), ["py.Early", "py.Late"]);
    worker
        .complete(&job, StepOutcome::success(json!({})))
        .unwrap();
    assert_eq!(env.wait(&uuid).status, TaskState::Complete);
}

/// `complete_and_next` records a result and claims, in the same transaction, the step it made
/// ready for the same host thread: a chain runs on one thread without a claim of its own per
/// step. The poll is a minute and no other thread waits, so only the claim along can deliver
/// `b` and `c` within the test's time.
#[test]
fn complete_and_next_hands_a_chain_to_the_completing_thread() {
    let env = Env::new(Config {
        poll_interval: Duration::from_secs(60),
        ..Config::default()
    });
    env.register(&chain_of_three("along", "py.next"));
    let worker = env
        .tasker
        .worker(vec!["port".into()], vec!["py.next".into()]);
    let uuid = env.create("along", json!({}));
    let mut job = worker
        .next_step(Duration::from_secs(30))
        .unwrap()
        .expect("the first step");
    let mut ran = Vec::new();
    loop {
        ran.push(job.step_name.clone());
        let (c, next) = worker
            .complete_and_next(&job, StepOutcome::success(json!({"by": job.step_name})))
            .unwrap();
        assert_eq!(c, Completion::Accepted);
        match next {
            Some(n) => job = n,
            None => break,
        }
    }
    assert_eq!(ran, ["a", "b", "c"]);
    let task = env.wait(&uuid);
    assert_eq!(task.status, TaskState::Complete);
    assert!(task.steps.iter().all(|s| s.attempts == 1));
    // Each step's result is the one its thread handed back.
    assert_eq!(task.step("c").unwrap().result.as_ref().unwrap()["by"], "c");
}

/// When a result makes two steps ready, the completing thread takes one along and a thread
/// waiting in `next_step` is woken for the other, at once (the poll is a minute): both run
/// at the same time, each exactly once.
#[test]
fn complete_and_next_leaves_the_other_ready_steps_to_waiting_threads() {
    let env = Env::new(Config {
        poll_interval: Duration::from_secs(60),
        ..Config::default()
    });
    env.register(
        r#"
name: fork
namespace_name: port
version: "1.0.0"
identity_strategy: always_unique
steps:
  - name: start
    handler: { callable: py.fork }
  - name: left
    handler: { callable: py.fork }
    dependencies: [start]
  - name: right
    handler: { callable: py.fork }
    dependencies: [start]
  - name: join
    handler: { callable: py.fork }
    dependencies: [left, right]
"#,
    );
    let worker = Arc::new(
        env.tasker
            .worker(vec!["port".into()], vec!["py.fork".into()]),
    );
    let uuid = env.create("fork", json!({}));
    // Both branches must be running at once before either completes: proof that the second
    // one reached the waiting thread without the first finishing.
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let ran: Arc<Mutex<Vec<String>>> = Arc::default();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let worker = worker.clone();
            let barrier = barrier.clone();
            let ran = ran.clone();
            std::thread::spawn(move || {
                // Closing the engine ends the wait of the thread left over (an error).
                let mut job = worker.next_step(Duration::from_secs(30)).ok().flatten();
                while let Some(j) = job {
                    ran.lock().unwrap().push(j.step_name.clone());
                    if j.step_name == "left" || j.step_name == "right" {
                        barrier.wait();
                    }
                    let (c, next) = worker
                        .complete_and_next(&j, StepOutcome::success(json!({})))
                        .unwrap();
                    assert_eq!(c, Completion::Accepted);
                    job = next;
                    if job.is_none() && !ran.lock().unwrap().contains(&"join".to_string()) {
                        job = worker.next_step(Duration::from_secs(30)).ok().flatten();
                    }
                }
            })
        })
        .collect();
    let task = env.wait(&uuid);
    assert_eq!(task.status, TaskState::Complete, "{task:#?}");
    assert!(task.steps.iter().all(|s| s.attempts == 1));
    env.tasker.close();
    for t in threads {
        t.join().unwrap();
    }
    let mut ran = ran.lock().unwrap().clone();
    ran.sort();
    assert_eq!(ran, ["join", "left", "right", "start"]);
}

/// Claims of the dispatch port this engine has made on their own (not along a transaction),
/// from its metrics.
fn own_claims(env: &Env) -> u64 {
    let text = env.rt.block_on(env.tasker.metrics_text()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("tasker_claim_duration_seconds_count "))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// A host thread waiting for work has its claim parked on the engine: the transaction that
/// creates a task claims the task's first step for it, so the step reaches the thread without
/// a claim of its own (the poll is a minute; the claim count proves which way it came).
#[test]
fn a_waiting_thread_gets_a_new_tasks_step_from_the_creating_transaction() {
    let env = Env::new(Config {
        poll_interval: Duration::from_secs(60),
        ..Config::default()
    });
    env.register(&one_step("parked", "py.parked", ""));
    let worker = Arc::new(
        env.tasker
            .worker(vec!["port".into()], vec!["py.parked".into()]),
    );
    let waiting = {
        let worker = worker.clone();
        std::thread::spawn(move || worker.next_step(Duration::from_secs(30)))
    };
    // The thread's first claim finds nothing; then it parks.
    let t0 = Instant::now();
    while worker.parked_threads() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the host never parked"
        );
        std::thread::yield_now();
    }
    assert_eq!(own_claims(&env), 1);
    let uuid = env.create("parked", json!({}));
    let job = waiting
        .join()
        .unwrap()
        .unwrap()
        .expect("the parked thread got the new task's step");
    assert_eq!(job.task_uuid, uuid);
    assert_eq!(own_claims(&env), 1, "the step came along the creation");
    worker
        .complete(&job, StepOutcome::success(json!({})))
        .unwrap();
    assert_eq!(env.wait(&uuid).status, TaskState::Complete);
}

/// Host threads that run tasks one after another, as a binding's pool does (`next_step`, then
/// `complete_and_next` while it hands out jobs), make almost no claims of their own: a new
/// task's first step comes along its creation (a thread is parked), every later one along the
/// result before it, and a thread taking its turn after a claim that took everything does not
/// look again until new work is announced. (Without these, every task costs at least one claim
/// of its own, and usually three.)
#[test]
fn pooled_host_threads_claim_along_transactions_not_on_their_own() {
    const TASKS: usize = 30;
    let env = Env::new(Config {
        poll_interval: Duration::from_secs(60),
        ..Config::default()
    });
    env.register(&chain_of_three("pooled", "py.pooled"));
    let worker = Arc::new(
        env.tasker
            .worker(vec!["port".into()], vec!["py.pooled".into()]),
    );
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let worker = worker.clone();
            std::thread::spawn(move || {
                // Closing the engine ends the thread (an error from the port).
                while let Ok(job) = worker.next_step(Duration::from_secs(30)) {
                    let mut job = job;
                    while let Some(j) = job {
                        job = worker
                            .complete_and_next(&j, StepOutcome::success(json!({})))
                            .ok()
                            .and_then(|(_, next)| next);
                    }
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    while worker.parked_threads() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "no thread parked");
        std::thread::yield_now();
    }
    let before = own_claims(&env);
    for _ in 0..TASKS {
        let uuid = env.create("pooled", json!({}));
        assert_eq!(env.wait(&uuid).status, TaskState::Complete);
    }
    let claims = own_claims(&env) - before;
    env.tasker.close();
    for t in threads {
        t.join().unwrap();
    }
    // Usually 0–2; the bound is the property itself (fewer than one per task), so that a
    // loaded machine's unlucky hand-offs do not fail it.
    assert!(
        claims < TASKS as u64,
        "{claims} claims of their own for {TASKS} tasks"
    );
}

/// On an SQLite file shared with another process, nothing announces that process's work here:
/// host threads that wait for less than the polling period (as a binding's pool does, to
/// notice a stop) still claim at least once per period, even after a claim that took
/// everything. (Skipping claims until an announcement would starve them for good.)
#[test]
fn work_of_another_engine_on_a_shared_file_reaches_short_waits() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("shared.db").display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let open = |background| {
        rt.block_on(Tasker::open_with(
            &url,
            OpenOptions {
                config: Config {
                    poll_interval: Duration::from_millis(300),
                    fail_unknown_callables: false,
                    ..Config::default()
                },
                clock: Arc::new(SystemClock),
                background,
            },
        ))
        .unwrap()
    };
    let served = open(true);
    let client = open(false);
    let t = parse_str(&one_step("shared", "py.shared", ""), None, "test")
        .unwrap()
        .template;
    rt.block_on(client.register_template(&t)).unwrap();
    let worker = served.worker(vec!["port".into()], vec!["py.shared".into()]);
    // A first wait finds nothing and learns that everything was taken.
    assert!(
        worker
            .next_step(Duration::from_millis(100))
            .unwrap()
            .is_none()
    );
    let uuid = rt
        .block_on(client.create_task(TaskRequest::new("port", "shared", json!({}))))
        .unwrap()
        .uuid;
    let t0 = Instant::now();
    let job = loop {
        if let Some(job) = worker.next_step(Duration::from_millis(100)).unwrap() {
            break job;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the other engine's step never reached the short waits"
        );
    };
    assert_eq!(job.task_uuid, uuid);
    worker
        .complete(&job, StepOutcome::success(json!({})))
        .unwrap();
    let task = rt.block_on(client.wait(&uuid, WAIT)).unwrap();
    assert_eq!(task.status, TaskState::Complete);
    drop(worker);
    served.close();
    client.close();
}

/// A result's claim along asks one spare step: when it gets it, the step waits in the port's
/// queue, where `take_queued` (what a stopping host calls) or the next `next_step` finds it
/// without a claim.
#[test]
fn a_spare_step_claimed_along_waits_in_the_queue() {
    let env = Env::new(Config {
        poll_interval: Duration::from_secs(60),
        ..Config::default()
    });
    env.register(&one_step("spare", "py.spare", ""));
    let worker = env
        .tasker
        .worker(vec!["port".into()], vec!["py.spare".into()]);
    let tasks: Vec<String> = (0..3).map(|_| env.create("spare", json!({}))).collect();
    let first = worker
        .next_step(Duration::from_secs(30))
        .unwrap()
        .expect("a step");
    let (c, next) = worker
        .complete_and_next(&first, StepOutcome::success(json!({})))
        .unwrap();
    assert_eq!(c, Completion::Accepted);
    let next = next.expect("the next step, along the result");
    let queued = worker.take_queued().expect("the spare step, queued");
    assert!(worker.take_queued().is_none());
    let mut ran = vec![
        first.task_uuid,
        next.task_uuid.clone(),
        queued.task_uuid.clone(),
    ];
    for job in [next, queued] {
        worker
            .complete(&job, StepOutcome::success(json!({})))
            .unwrap();
    }
    ran.sort();
    let mut expected = tasks.clone();
    expected.sort();
    assert_eq!(ran, expected);
    for uuid in &tasks {
        assert_eq!(env.wait(uuid).status, TaskState::Complete);
    }
}
