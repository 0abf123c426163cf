//! Production mode with real processes: `tasker-ctl serve` and `tasker-ctl worker` processes
//! sharing one PostgreSQL database (a scratch database per test on the test server, see `./run test`). The test
//! process creates tasks and watches them through an engine handle that runs no handlers; the
//! kit handlers in the workers append every invocation to a file, so runs are counted across
//! processes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::json;
use tasker_core::store::postgres::{create_scratch_database, test_server_url};
use tasker_core::template::parse_str;
use tasker_core::{Config, OpenOptions, StepState, TaskRequest, TaskState, Tasker};

mod common;

use common::*;

/// `nap` sleeps (as configured per test), then `after` runs; quick linear retries.
fn template(nap_ms: u64) -> String {
    format!(
        r#"
name: napper
namespace_name: procs
version: "1.0.0"
steps:
  - name: nap
    handler: {{ callable: kit.sleep, initialization: {{ ms: {nap_ms} }} }}
    retry: {{ max_attempts: 3, backoff: linear, backoff_base_ms: 10, max_backoff_ms: 10, jitter: false }}
  - name: after
    handler: {{ callable: kit.record }}
    dependencies: [nap]
"#
    )
}

const CHAIN: &str = r#"
name: chain
namespace_name: procs
version: "1.0.0"
steps:
  - { name: s1, handler: { callable: kit.record } }
  - { name: s2, handler: { callable: kit.record }, dependencies: [s1] }
  - { name: s3, handler: { callable: kit.record }, dependencies: [s2] }
  - { name: s4, handler: { callable: kit.record }, dependencies: [s3] }
"#;

/// A scratch database, a directory for logs, and an engine handle that runs nothing.
struct Setup {
    db: String,
    dir: tempfile::TempDir,
    tasker: Tasker,
    /// The lease of the processes it starts: one second where a test kills or freezes one
    /// (so that takeovers come quickly), longer where none is, so that a loaded machine's
    /// delays cannot pass for a lost worker there.
    lease_ms: &'static str,
}

impl Setup {
    async fn new(templates: &[&str]) -> Setup {
        Setup::on(&test_server_url(), templates).await
    }

    /// A scratch database on the server at `server`.
    async fn on(server: &str, templates: &[&str]) -> Setup {
        let server = server.to_string();
        let db = create_scratch_database(&server, "tasker_test")
            .await
            .unwrap_or_else(|e| {
                panic!("PostgreSQL at {server} is needed (`./run test` starts one): {e}")
            });
        let tasker = Tasker::open_with(
            &db,
            OpenOptions {
                config: Config {
                    poll_interval: Duration::from_millis(100),
                    pg_max_connections: 4,
                    ..Config::default()
                },
                background: false,
                ..OpenOptions::default()
            },
        )
        .await
        .unwrap();
        for yaml in templates {
            let t = parse_str(yaml, None, "test").unwrap().template;
            tasker.register_template(&t).await.unwrap();
        }
        Setup {
            db,
            dir: tempfile::tempdir().unwrap(),
            tasker,
            lease_ms: "1000",
        }
    }

    /// The same with the processes' leases at ten seconds.
    async fn unhurried(templates: &[&str]) -> Setup {
        Setup {
            lease_ms: "10000",
            ..Setup::new(templates).await
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("invocations.log")
    }

    /// Starts a server (API and orchestration, the bundled handlers too) on a free port;
    /// returns it and its base URL.
    fn server(&self, name: &str) -> (Worker, String) {
        use std::io::{BufRead, BufReader};
        let mut child = command(
            self.dir.path(),
            &[
                "serve",
                "--db",
                &self.db,
                "--bind",
                "127.0.0.1:0",
                "--auth",
                "off",
            ],
        )
        .env("TASKER_LEASE_MS", self.lease_ms)
        .env("TASKER_POLL_INTERVAL_MS", "100")
        .env("TASKER_PG_MAX_CONNECTIONS", "6")
        .env("TASKER_KIT_INVOCATION_LOG", self.log())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap(),
        ))
        .spawn()
        .expect("tasker-ctl serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("serve printed {line:?}"))
            .to_string();
        let w = Worker {
            child,
            name: name.to_string(),
            dir: self.dir.path().to_path_buf(),
        };
        (w, url)
    }

    /// Starts a worker process.
    fn worker(&self, name: &str) -> Worker {
        let child = command(
            self.dir.path(),
            &["worker", "--db", &self.db, "--shutdown-timeout", "10"],
        )
        .env("TASKER_LEASE_MS", self.lease_ms)
        .env("TASKER_POLL_INTERVAL_MS", "100")
        .env("TASKER_PG_MAX_CONNECTIONS", "4")
        .env("TASKER_KIT_INVOCATION_LOG", self.log())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap(),
        ))
        .spawn()
        .expect("tasker-ctl worker starts");
        Worker {
            child,
            name: name.to_string(),
            dir: self.dir.path().to_path_buf(),
        }
    }

    async fn create(&self, name: &str, context: serde_json::Value) -> String {
        self.tasker
            .create_task(TaskRequest::new("procs", name, context))
            .await
            .unwrap()
            .uuid
    }

    async fn wait_complete(&self, uuid: &str) -> tasker_core::Task {
        let task = self
            .tasker
            .wait(uuid, Some(Duration::from_secs(60)))
            .await
            .unwrap_or_else(|e| panic!("task {uuid} did not finish: {e}"));
        assert_eq!(task.status, TaskState::Complete, "{task:#?}");
        task
    }

    /// Waits until `step` of `task` is running; returns the worker holding it.
    async fn running(&self, task: &str, step: &str) -> String {
        let key = (task.to_string(), step.to_string());
        for _ in 0..1000 {
            let t = self.tasker.get_task(task).await.unwrap();
            let s = t.steps.iter().find(|s| s.name == step).unwrap();
            // Claimed is not yet running: the handler has started once it logged itself.
            if s.state == StepState::InProgress && self.invocations().contains_key(&key) {
                return s.worker_id.clone().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("step {step} of {task} never started");
    }

    /// `(task, step) -> pids of the processes that ran it`, from the invocation log.
    fn invocations(&self) -> HashMap<(String, String), Vec<String>> {
        let mut out: HashMap<(String, String), Vec<String>> = HashMap::new();
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        for line in text.lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            assert_eq!(parts.len(), 3, "bad log line {line:?}");
            out.entry((parts[0].to_string(), parts[1].to_string()))
                .or_default()
                .push(parts[2].to_string());
        }
        out
    }
}

/// A worker process, killed when dropped.
struct Worker {
    child: Child,
    name: String,
    dir: PathBuf,
}

impl Worker {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {}", self.pid());
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", self.name))).unwrap_or_default()
    }

    /// Waits for the process to exit by itself; returns its exit code.
    async fn exit_code(&mut self) -> Option<i32> {
        for _ in 0..3000 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("worker {} did not exit:\n{}", self.name, self.stderr());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn step<'a>(task: &'a tasker_core::Task, name: &str) -> &'a tasker_core::task::StepView {
    task.steps.iter().find(|s| s.name == name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_step_reruns_on_another_worker_after_its_lease() {
    let s = Setup::new(&[&template(3000)]).await;
    let mut a = s.worker("a");
    let task = s.create("napper", json!({})).await;
    let holder = s.running(&task, "nap").await;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let b = s.worker("b");
    let done = s.wait_complete(&task).await;
    let nap = step(&done, "nap");
    assert_eq!(nap.attempts, 2, "{done:#?}");
    assert_ne!(nap.worker_id.as_deref(), Some(holder.as_str()));
    let audit = s.tasker.step_transitions(&task, Some("nap")).await.unwrap();
    assert!(
        audit
            .iter()
            .any(|t| t.event == "fail" && t.reason.as_deref().unwrap_or("").contains("worker_lost")),
        "{audit:#?}"
    );
    let runs = s.invocations();
    let nap_runs = &runs[&(task.clone(), "nap".to_string())];
    assert_eq!(nap_runs.len(), 2, "{runs:?}");
    assert_eq!(nap_runs[0], a.pid());
    assert_eq!(nap_runs[1], b.pid());
    assert_eq!(runs[&(task, "after".to_string())], vec![b.pid()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_running_step_finish_then_the_worker_exits() {
    let s = Setup::new(&[&template(1500)]).await;
    let mut a = s.worker("a");
    let task = s.create("napper", json!({})).await;
    s.running(&task, "nap").await;
    a.signal("-TERM");
    assert_eq!(a.exit_code().await, Some(0), "{}", a.stderr());
    assert!(
        a.stderr().contains("1 finished, 0 handed back"),
        "{}",
        a.stderr()
    );
    // The drained worker took nothing new: `after` waits for the next worker.
    let t = s.tasker.get_task(&task).await.unwrap();
    assert_eq!(step(&t, "nap").state, StepState::Complete);
    assert_eq!(step(&t, "after").state, StepState::Enqueued);
    let _b = s.worker("b");
    let done = s.wait_complete(&task).await;
    assert_eq!(step(&done, "nap").attempts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_completion_from_a_fenced_off_worker_is_rejected() {
    let s = Setup::new(&[&template(500)]).await;
    let a = s.worker("a");
    let task = s.create("napper", json!({})).await;
    let holder = s.running(&task, "nap").await;
    // Frozen, `a` can neither renew its lease nor report: `b` takes the step over.
    a.signal("-STOP");
    let _b = s.worker("b");
    let done = s.wait_complete(&task).await;
    assert_eq!(step(&done, "nap").attempts, 2);
    a.signal("-CONT");
    let mut rejected = Vec::new();
    for _ in 0..1000 {
        rejected = s.tasker.store().rejected_completions(&task).await.unwrap();
        if !rejected.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rejected.len(), 1, "{}", a.stderr());
    assert_eq!(rejected[0].attempt, 1);
    assert_eq!(rejected[0].worker_id.as_deref(), Some(holder.as_str()));
    assert!(
        rejected[0].reason.contains("not in_progress")
            || rejected[0].reason.contains("not current")
    );
    // The task kept the result of the attempt that held the step.
    let after = s.tasker.get_task(&task).await.unwrap();
    assert_eq!(after.status, TaskState::Complete);
    assert_eq!(step(&after, "nap").attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_run_every_step_of_200_tasks_exactly_once() {
    let s = Setup::unhurried(&[CHAIN]).await;
    let workers: Vec<Worker> = ["a", "b", "c"].iter().map(|n| s.worker(n)).collect();
    let mut tasks = Vec::new();
    for n in 0..200 {
        tasks.push(s.create("chain", json!({ "n": n })).await);
    }
    for t in &tasks {
        s.wait_complete(t).await;
    }
    let runs = s.invocations();
    assert_eq!(runs.len(), 800, "every step of every task ran");
    let mut by_pid: HashMap<String, usize> = HashMap::new();
    for ((task, step), pids) in &runs {
        assert_eq!(pids.len(), 1, "{task}/{step} ran {} times", pids.len());
        *by_pid.entry(pids[0].clone()).or_default() += 1;
    }
    assert!(
        by_pid.len() >= 2,
        "the work was shared among the workers: {by_pid:?}"
    );
    for w in &workers {
        assert!(!w.stderr().contains("panicked"), "{}", w.stderr());
    }
}

/// A private PostgreSQL cluster (initdb + pg_ctl in a temp dir, as the `postgres` user when
/// run as root), for the test that restarts the server. Stopped when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Cluster {
    fn start() -> Cluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .max()
            .expect("PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql");
        let dir = tempfile::tempdir().unwrap();
        let as_postgres = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| text(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if as_postgres {
            assert!(
                std::process::Command::new("chown")
                    .args(["postgres", &dir.path().display().to_string()])
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let c = Cluster {
            dir,
            bin,
            port,
            as_postgres,
        };
        c.pg(
            "initdb",
            &["-D", &c.data(), "-U", "postgres", "-A", "trust"],
        );
        c.ctl(&["start"]);
        c
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn pg(&self, program: &str, args: &[&str]) {
        let exe = self.bin.join(program).display().to_string();
        let mut cmd = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--", &exe]);
            c
        } else {
            std::process::Command::new(&exe)
        };
        let out = cmd.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            describe(&out)
        );
    }

    fn ctl(&self, action: &[&str]) {
        let log = self.dir.path().join("server.log").display().to_string();
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let data = self.data();
        let mut args = vec!["-D", &data, "-l", &log, "-w", "-o", &opts, "-m", "fast"];
        args.extend_from_slice(action);
        self.pg("pg_ctl", &args);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let exe = self.bin.join("pg_ctl").display().to_string();
        let data = self.data();
        let args = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let _ = if self.as_postgres {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--", &exe])
                .args(args)
                .output()
        } else {
            std::process::Command::new(&exe).args(args).output()
        };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_loses_no_task() {
    let cluster = Cluster::start();
    let s = Setup::on(&cluster.url(), &[CHAIN]).await;
    let workers: Vec<Worker> = ["a", "b"].iter().map(|n| s.worker(n)).collect();
    let mut tasks = Vec::new();
    for n in 0..150 {
        tasks.push(s.create("chain", json!({ "n": n })).await);
    }
    // Some finished, some running, some not started: restart the server under them.
    s.wait_complete(&tasks[10]).await;
    let done_before = s
        .tasker
        .list_tasks(&tasker_core::TaskFilter {
            status: Some(TaskState::Complete),
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap()
        .len();
    assert!(
        done_before < tasks.len(),
        "the restart must meet unfinished work"
    );
    cluster.ctl(&["restart"]);
    for t in &tasks {
        // The handle's own connections were cut too: a wait that met the restart is retried.
        let mut status = None;
        for _ in 0..20 {
            match s.tasker.wait(t, Some(Duration::from_secs(60))).await {
                Ok(task) => {
                    status = Some(task.status);
                    break;
                }
                Err(e) if e.kind == tasker_core::ErrorKind::Store => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("task {t}: {e}"),
            }
        }
        assert_eq!(status, Some(TaskState::Complete), "task {t}");
    }
    let runs = s.invocations();
    assert_eq!(runs.len(), 600, "every step of every task ran");
    for w in &workers {
        assert!(!w.stderr().contains("panicked"), "{}", w.stderr());
    }
}

/// POSTs a task over REST; returns its uuid, or the HTTP status of a refusal.
async fn post_task(
    client: &tasker_core::api::client::Client,
    name: &str,
    context: serde_json::Value,
) -> Result<String, u16> {
    let body = json!({"namespace": "procs", "name": name, "context": context});
    let r = client
        .send(
            "POST",
            "/v1/tasks",
            Some(("application/json", body.to_string().into_bytes())),
            None,
        )
        .await
        .map_err(|_| 0u16)?;
    if r.status != 201 {
        return Err(r.status);
    }
    Ok(r.json().unwrap()["task_uuid"].as_str().unwrap().to_string())
}

/// Waits over REST until the task ends; returns the HTTP status and the task's status.
async fn wait_task(client: &tasker_core::api::client::Client, uuid: &str) -> (u16, String) {
    let r = client
        .send(
            "GET",
            &format!("/v1/tasks/{uuid}/wait?timeout_ms=60000"),
            None,
            Some(Duration::from_secs(70)),
        )
        .await
        .unwrap();
    let status = r
        .json()
        .ok()
        .and_then(|v| v["status"].as_str().map(str::to_string));
    (r.status, status.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_and_three_workers_run_500_tasks_exactly_once_without_5xx() {
    use tasker_core::api::client::Client;
    let s = Setup::unhurried(&[CHAIN]).await;
    let (_s1, url1) = s.server("s1");
    let (_s2, url2) = s.server("s2");
    let _workers: Vec<Worker> = ["a", "b", "c"].iter().map(|n| s.worker(n)).collect();
    let mut runs = tokio::task::JoinSet::new();
    for c in 0..8usize {
        let url = if c % 2 == 0 {
            url1.clone()
        } else {
            url2.clone()
        };
        runs.spawn(async move {
            let client = Client::new(&url, None).unwrap();
            let mut out = Vec::new();
            for i in 0..500 / 8 + usize::from(c < 500 % 8) {
                let uuid = post_task(&client, "chain", json!({ "client": c, "n": i }))
                    .await
                    .unwrap_or_else(|status| panic!("POST answered {status}"));
                out.push(uuid);
            }
            for uuid in &out {
                let (http, status) = wait_task(&client, uuid).await;
                assert_eq!((http, status.as_str()), (200, "complete"), "task {uuid}");
            }
            out
        });
    }
    let tasks: Vec<String> = runs.join_all().await.into_iter().flatten().collect();
    assert_eq!(tasks.len(), 500);
    let runs = s.invocations();
    assert_eq!(runs.len(), 2000, "every step of every task ran");
    for ((task, step), pids) in &runs {
        assert_eq!(pids.len(), 1, "{task}/{step} ran {} times", pids.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_server_is_killed_the_other_carries_on() {
    use tasker_core::api::client::Client;
    // The first step fails once: its retry is promoted by whichever process sweeps.
    const FLAKY: &str = r#"
name: flaky
namespace_name: procs
version: "1.0.0"
steps:
  - name: first
    handler: { callable: kit.fail, initialization: { times: 1 } }
    retry: { max_attempts: 3, backoff: linear, backoff_base_ms: 200, max_backoff_ms: 200, jitter: false }
  - { name: second, handler: { callable: kit.record }, dependencies: [first] }
"#;
    let s = Setup::new(&[FLAKY]).await;
    let (mut s1, url1) = s.server("s1");
    let (_s2, url2) = s.server("s2");
    let c1 = Client::new(&url1, None).unwrap();
    let mut tasks = Vec::new();
    for n in 0..40 {
        tasks.push(post_task(&c1, "flaky", json!({ "n": n })).await.unwrap());
    }
    s1.child.kill().unwrap();
    s1.child.wait().unwrap();
    let c2 = Client::new(&url2, None).unwrap();
    for n in 40..60 {
        tasks.push(post_task(&c2, "flaky", json!({ "n": n })).await.unwrap());
    }
    for uuid in &tasks {
        assert_eq!(
            wait_task(&c2, uuid).await,
            (200, "complete".to_string()),
            "task {uuid}"
        );
    }
}
