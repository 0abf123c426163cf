//! The production benchmark: `tasker-bench-ctl serve` (orchestration and the REST API, no
//! handlers) and `tasker-bench-ctl worker` (the `bench.add` handlers) as separate processes on
//! a fresh PostgreSQL database (durable commits: the server's defaults), driven over REST the
//! way the peer project was measured. Prints numbers; it is not a test.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tasker_core::api::client::Client;
use tasker_core::store::postgres::create_scratch_database;
use tasker_core::template::parse_str;
use tasker_core::{Config, OpenOptions, Tasker};

use crate::{DIAMOND, LINEAR};

/// What to run.
pub struct ProdArgs {
    /// The PostgreSQL server (a scratch database is created on it and dropped after).
    pub server: String,
    /// Tasks timed one at a time per template, after `warmup`.
    pub latency_tasks: usize,
    pub warmup: usize,
    /// Concurrent REST clients.
    pub clients: usize,
    /// Tasks of the short throughput run and of the sustained one.
    pub throughput_tasks: usize,
    pub sustained_tasks: usize,
    /// Run the handlers in a Python worker (`PYTHON -m tasker_core worker --module
    /// bench_handlers`, the module found through `PYTHONPATH`) instead of `tasker-bench-ctl
    /// worker`.
    pub python: Option<String>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A child process stopped (SIGTERM, then kill) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// POSTs one task of `name`; returns its uuid.
async fn post(client: &Client, name: &str, x: i64) -> Result<String, String> {
    let body = json!({"namespace": "bench", "name": name, "context": {"x": x}});
    let r = client
        .send(
            "POST",
            "/v1/tasks",
            Some(("application/json", body.to_string().into_bytes())),
            None,
        )
        .await
        .map_err(|e| e.message)?;
    if r.status != 201 {
        return Err(format!("POST /v1/tasks: {} {}", r.status, r.text()));
    }
    let v: Value = r.json().map_err(|e| e.message)?;
    v.get("task_uuid")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| "no task_uuid in the response".to_string())
}

/// Waits (server side) until the task ends; errors unless it completed.
async fn wait(client: &Client, uuid: &str) -> Result<(), String> {
    let r = client
        .send(
            "GET",
            &format!("/v1/tasks/{uuid}/wait?timeout_ms=120000"),
            None,
            Some(Duration::from_secs(130)),
        )
        .await
        .map_err(|e| e.message)?;
    if r.status != 200 {
        return Err(format!("wait: {} {}", r.status, r.text()));
    }
    let v: Value = r.json().map_err(|e| e.message)?;
    match v.get("status").and_then(Value::as_str) {
        Some("complete") => Ok(()),
        other => Err(format!("task {uuid} ended {other:?}")),
    }
}

async fn latency(client: &Client, name: &str, a: &ProdArgs) -> Result<(), BoxError> {
    let mut times = Vec::with_capacity(a.latency_tasks);
    let mut posts = Vec::with_capacity(a.latency_tasks);
    for i in 0..a.warmup + a.latency_tasks {
        let started = Instant::now();
        let uuid = post(client, name, i as i64).await?;
        let posted = started.elapsed();
        wait(client, &uuid).await?;
        if i >= a.warmup {
            times.push(started.elapsed());
            posts.push(posted);
        }
    }
    times.sort();
    posts.sort();
    println!(
        "{name:<12} POST -> complete over {} tasks (after {} warm-ups): p50 {}  p95 {}  max {}; \
         the POST alone (one client): p50 {}  p95 {}",
        times.len(),
        a.warmup,
        ms(pct(&times, 0.5)),
        ms(pct(&times, 0.95)),
        ms(*times.last().unwrap_or(&Duration::ZERO)),
        ms(pct(&posts, 0.5)),
        ms(pct(&posts, 0.95)),
    );
    Ok(())
}

/// `n` linear_add tasks from `clients` concurrent clients: each POSTs its share, then waits
/// for each of them. Wall time runs from the first POST until the last task is complete.
async fn throughput(base: &str, n: usize, clients: usize, label: &str) -> Result<(), BoxError> {
    let started = Instant::now();
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut runs = tokio::task::JoinSet::new();
    for c in 0..clients {
        let share = n / clients + usize::from(c < n % clients);
        let client = Client::new(base, None)?;
        let errors = errors.clone();
        runs.spawn(async move {
            let mut posts = Vec::with_capacity(share);
            let mut uuids = Vec::with_capacity(share);
            for i in 0..share {
                let t = Instant::now();
                match post(&client, "linear_add", (c * 100_000 + i) as i64).await {
                    Ok(u) => {
                        posts.push(t.elapsed());
                        uuids.push(u);
                    }
                    Err(e) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        eprintln!("{e}");
                    }
                }
            }
            for u in &uuids {
                if let Err(e) = wait(&client, u).await {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    eprintln!("{e}");
                }
            }
            posts
        });
    }
    let mut posts: Vec<Duration> = runs.join_all().await.into_iter().flatten().collect();
    let wall = started.elapsed();
    posts.sort();
    let secs = wall.as_secs_f64();
    println!(
        "{label}: {n} linear_add tasks, {clients} clients: {:.0} tasks/s, {:.0} steps/s \
         (wall {}), POST p50 {} p95 {}, errors {}",
        n as f64 / secs,
        (n * 4) as f64 / secs,
        ms(wall),
        ms(pct(&posts, 0.5)),
        ms(pct(&posts, 0.95)),
        errors.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}

/// Runs the whole benchmark.
pub async fn run(a: ProdArgs) -> Result<(), BoxError> {
    let db = create_scratch_database(&a.server, "tasker_bench").await?;
    let result = measure(&a, &db).await;
    drop_database(&a.server, &db).await;
    result
}

async fn measure(a: &ProdArgs, db: &str) -> Result<(), BoxError> {
    // Migrates and registers the templates; runs nothing.
    let setup = Tasker::open_with(
        db,
        OpenOptions {
            config: Config::default(),
            background: false,
            ..OpenOptions::default()
        },
    )
    .await?;
    for t in [LINEAR, DIAMOND] {
        setup
            .register_template(&parse_str(t, None, "bench")?.template)
            .await?;
    }
    setup.close();
    drop(setup);

    let ctl = std::env::current_exe()?.with_file_name("tasker-bench-ctl");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let bind = format!("127.0.0.1:{port}");
    let spawn = |args: &[&str]| -> Result<Proc, BoxError> {
        Ok(Proc(
            Command::new(&ctl)
                .args(args)
                .env("TASKER_LOG", "error")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()?,
        ))
    };
    let _server = spawn(&["serve", "--db", db, "--bind", &bind, "--auth", "off"])?;
    let _worker = match &a.python {
        None => spawn(&["worker", "--db", db])?,
        Some(python) => Proc(
            Command::new(python)
                .args(["-m", "tasker_core", "worker", "--database-url", db])
                .args(["--namespaces", "bench", "--module", "bench_handlers"])
                .env("TASKER_LOG", "error")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()?,
        ),
    };
    let workers = match &a.python {
        None => "tasker-bench-ctl worker (bench.add in Rust)".to_string(),
        Some(python) => format!("{python} -m tasker_core worker (bench.add in Python)"),
    };
    let base = format!("http://{bind}");
    let client = Client::new(&base, None)?;
    let mut up = false;
    for _ in 0..400 {
        if let Ok(r) = client.send("GET", "/health/ready", None, None).await
            && r.status == 200
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    if !up {
        return Err("the server did not become ready".into());
    }
    println!(
        "PostgreSQL (durable commits), tasker-bench-ctl serve (API + orchestration) and \
         {workers} as separate processes, REST clients in this process, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    latency(&client, "linear_add", a).await?;
    latency(&client, "diamond_add", a).await?;
    throughput(&base, a.throughput_tasks, a.clients, "throughput").await?;
    throughput(&base, a.sustained_tasks, a.clients, "sustained ").await?;
    Ok(())
}

async fn drop_database(server: &str, db: &str) {
    use sqlx::Connection;
    let Some(name) = db
        .rsplit('/')
        .next()
        .map(|n| n.split('?').next().unwrap_or(n))
    else {
        return;
    };
    if let Ok(mut c) = sqlx::PgConnection::connect(server).await {
        let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut c)
            .await;
    }
}
