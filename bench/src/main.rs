//! `tasker-bench`: latency and throughput of the embedded engine (SQLite file, WAL,
//! `synchronous=NORMAL` unless `TASKER_SQLITE_SYNC=full`) with in-process Rust handlers.
//!
//! Prints numbers; it is not a test. Run it with `./run bench` (a release build).

use std::time::{Duration, Instant};

use serde_json::json;
use tasker_core::template::parse_str;
use tasker_core::{Config, OpenOptions, TaskRequest, TaskState, Tasker};

use tasker_bench::{DIAMOND, LINEAR, register_handlers};

struct Args {
    runtimes: Vec<Flavor>,
    latency_tasks: usize,
    warmup: usize,
    throughput_tasks: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        runtimes: vec![Flavor::Multi, Flavor::Current],
        latency_tasks: 200,
        warmup: 20,
        throughput_tasks: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> Result<usize, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a whole number"))
        };
        match flag.as_str() {
            "--latency-tasks" => a.latency_tasks = value("--latency-tasks")?.max(1),
            "--warmup" => a.warmup = value("--warmup")?,
            "--throughput-tasks" => a.throughput_tasks = value("--throughput-tasks")?.max(1),
            "--runtime" => {
                a.runtimes = match it.next().as_deref() {
                    Some("multi") => vec![Flavor::Multi],
                    Some("current") => vec![Flavor::Current],
                    Some("both") => vec![Flavor::Multi, Flavor::Current],
                    _ => return Err("--runtime takes multi, current or both".into()),
                }
            }
            "-h" | "--help" => {
                return Err(
                    "usage: tasker-bench [--runtime multi|current|both] [--latency-tasks N] [--warmup N] [--throughput-tasks N]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn engine(dir: &std::path::Path) -> tasker_core::Result<Tasker> {
    let config = Config::from_env()?;
    let url = format!("sqlite:{}", dir.join("bench.db").display());
    let tasker = Tasker::open_with(
        &url,
        OpenOptions {
            config,
            ..OpenOptions::default()
        },
    )
    .await?;
    for t in [LINEAR, DIAMOND] {
        tasker
            .register_template(&parse_str(t, None, "bench")?.template)
            .await?;
    }
    register_handlers(&tasker);
    Ok(tasker)
}

async fn latency(
    tasker: &Tasker,
    name: &str,
    n: usize,
    warmup: usize,
    expect: fn(i64) -> i64,
) -> tasker_core::Result<()> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..(n + warmup) {
        let start = Instant::now();
        let task = tasker
            .run_task(
                TaskRequest::new("bench", name, json!({ "x": i })),
                Some(Duration::from_secs(30)),
            )
            .await?;
        let took = start.elapsed();
        let last = task
            .steps
            .last()
            .and_then(|s| s.result.as_ref())
            .and_then(|r| r["value"].as_i64());
        if task.status != TaskState::Complete || last != Some(expect(i as i64)) {
            return Err(tasker_core::Error::internal(format!(
                "{name} task {} ended {} with {last:?}",
                task.uuid, task.status
            )));
        }
        if i >= warmup {
            samples.push(took);
        }
    }
    samples.sort();
    println!(
        "{name:<12} single-task latency over {n} tasks: p50 {}  p95 {}  max {}",
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.95)),
        ms(*samples.last().unwrap_or(&Duration::ZERO)),
    );
    Ok(())
}

async fn throughput(tasker: &Tasker, n: usize) -> tasker_core::Result<()> {
    // All tasks are submitted at once, as concurrent callers would; the engine commits
    // concurrent creations in groups.
    let start = Instant::now();
    let mut submits = tokio::task::JoinSet::new();
    for i in 0..n {
        let tasker = tasker.clone();
        submits.spawn(async move {
            tasker
                .create_task(TaskRequest::new("bench", "linear_add", json!({ "x": i })))
                .await
        });
    }
    let mut handles = Vec::with_capacity(n);
    for h in submits.join_all().await {
        handles.push(h?);
    }
    let created = start.elapsed();
    let mut failed = 0;
    for h in handles {
        if h.wait(Some(Duration::from_secs(300))).await?.status != TaskState::Complete {
            failed += 1;
        }
    }
    let wall = start.elapsed();
    let steps = (n * 4) as f64;
    println!(
        "linear_add   throughput, {n} concurrent tasks: {:.0} tasks/s, {:.0} steps/s (wall {}, creation {}, not complete: {failed})",
        n as f64 / wall.as_secs_f64(),
        steps / wall.as_secs_f64(),
        ms(wall),
        ms(created),
    );
    Ok(())
}

/// Times the store operations of the hot path on their own (no worker running), so a latency
/// regression can be traced to the database or to the engine around it.
async fn store_ops(dir: &std::path::Path) -> tasker_core::Result<()> {
    use tasker_core::store::{AttemptResult, CallableFilter, ClaimRequest, Resolution};
    let config = Config::from_env()?;
    let url = format!("sqlite:{}", dir.join("store-ops.db").display());
    let tasker = Tasker::open_with(
        &url,
        OpenOptions {
            config,
            background: false,
            ..OpenOptions::default()
        },
    )
    .await?;
    tasker
        .register_template(&parse_str(LINEAR, None, "bench")?.template)
        .await?;
    let store = tasker.store().clone();
    let n = 300;
    let (mut create, mut claim, mut finish) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for i in 0..n {
        let t0 = Instant::now();
        tasker
            .create_task(TaskRequest::new("bench", "linear_add", json!({ "x": i })))
            .await?;
        create += t0.elapsed();
        let req = ClaimRequest {
            worker_id: "bench".into(),
            namespaces: vec![],
            callables: CallableFilter::Only(vec!["bench.add".into()]),
            limit: 1,
            lease_ms: 30_000,
            default_timeout_ms: 300_000,
            enqueued_before: None,
        };
        let t1 = Instant::now();
        let jobs = store.claim(&req, tasker.now()).await?;
        claim += t1.elapsed();
        let results: Vec<AttemptResult> = jobs
            .iter()
            .map(|j| AttemptResult {
                step_uuid: j.step_uuid.clone(),
                attempt: j.attempt,
                worker_id: Some("bench".into()),
                expiry: None,
                resolution: Resolution::Succeeded {
                    result: json!({"value": 1}),
                    metadata: json!(null),
                },
                started_at: Some(j.started_at),
                expansion: None,
            })
            .collect();
        let t2 = Instant::now();
        store.finish(&results, "bench", tasker.now()).await?;
        finish += t2.elapsed();
    }
    let avg = |d: Duration| ms(d / n);
    println!(
        "store ops (mean of {n}): create_task {}  claim 1 {}  finish 1 {}",
        avg(create),
        avg(claim),
        avg(finish)
    );
    tasker.close();
    Ok(())
}

/// The tokio runtime the engine runs in: the embedding application's choice.
#[derive(Clone, Copy, PartialEq)]
enum Flavor {
    /// Worker threads, one per core (`#[tokio::main]`'s default; `tasker-ctl` uses it).
    Multi,
    /// Everything on one thread (`#[tokio::main(flavor = "current_thread")]`).
    Current,
}

impl Flavor {
    fn name(self) -> &'static str {
        match self {
            Flavor::Multi => "multi-thread",
            Flavor::Current => "current-thread",
        }
    }
}

fn run(flavor: Flavor, args: &Args, store_ops_too: bool) -> tasker_core::Result<()> {
    let mut builder = match flavor {
        Flavor::Multi => tokio::runtime::Builder::new_multi_thread(),
        Flavor::Current => tokio::runtime::Builder::new_current_thread(),
    };
    let rt = builder.enable_all().build().expect("tokio runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().map_err(|e| tasker_core::Error::internal(e.to_string()))?;
        let tasker = engine(dir.path()).await?;
        println!(
            "embedded SQLite (WAL, synchronous={}), in-process Rust handlers, {} cores, {} tokio runtime",
            std::env::var("TASKER_SQLITE_SYNC").unwrap_or_else(|_| "normal".into()),
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            flavor.name(),
        );
        if store_ops_too {
            store_ops(dir.path()).await?;
        }
        latency(
            &tasker,
            "linear_add",
            args.latency_tasks,
            args.warmup,
            |x| x + 10,
        )
        .await?;
        latency(
            &tasker,
            "diamond_add",
            args.latency_tasks,
            args.warmup,
            |x| 2 * x + 7,
        )
        .await?;
        throughput(&tasker, args.throughput_tasks).await?;
        tasker.close();
        Ok(())
    })
}

/// `tasker-bench prod [--server URL] [--latency-tasks N] [--warmup N] [--clients N]
/// [--throughput-tasks N] [--sustained-tasks N] [--python PYTHON]`.
fn prod_args(rest: &[String]) -> Result<tasker_bench::prod::ProdArgs, String> {
    let mut a = tasker_bench::prod::ProdArgs {
        server: std::env::var("TASKER_BENCH_DATABASE_URL")
            .or_else(|_| std::env::var("DATABASE_URL"))
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        latency_tasks: 30,
        warmup: 3,
        clients: 8,
        throughput_tasks: 200,
        sustained_tasks: 5000,
        python: None,
    };
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let mut number = || -> Result<usize, String> {
            value()?
                .parse()
                .map_err(|_| format!("{flag} needs a whole number"))
        };
        match flag.as_str() {
            "--server" => a.server = value()?,
            "--python" => a.python = Some(value()?),
            "--latency-tasks" => a.latency_tasks = number()?.max(1),
            "--warmup" => a.warmup = number()?,
            "--clients" => a.clients = number()?.max(1),
            "--throughput-tasks" => a.throughput_tasks = number()?.max(1),
            "--sustained-tasks" => a.sustained_tasks = number()?.max(1),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(a)
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("prod") {
        let code = match prod_args(&argv[1..]) {
            Ok(a) => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                match rt.block_on(tasker_bench::prod::run(a)) {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("benchmark failed: {e}");
                        1
                    }
                }
            }
            Err(e) => {
                eprintln!("{e}");
                2
            }
        };
        std::process::exit(code);
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    for (i, flavor) in args.runtimes.iter().enumerate() {
        if i > 0 {
            println!();
        }
        if let Err(e) = run(*flavor, &args, i == 0) {
            eprintln!("benchmark failed: {e}");
            std::process::exit(1);
        }
    }
}
