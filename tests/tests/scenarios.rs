//! Runs every scenario in `tests/scenarios/` with the Rust kit, concurrently (each on its own
//! engine and fresh database), once on SQLite and once on PostgreSQL, prints one line per
//! scenario and fails once at the end listing every failure. `SCENARIO=name_substring` runs a
//! subset.

use tasker_conformance::scenario::{
    Backend, Outcome, Runner, Scenario, scenario_files, scenarios_dir, tests_dir,
};

/// Scenarios that fail because of a known engine bug: (scenario name, why). A listed scenario
/// that passes is reported too, so the list cannot go stale.
const KNOWN_FAILURES: &[(&str, &str)] = &[];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_scenarios_on_sqlite() {
    all_scenarios(Backend::SqliteMemory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_scenarios_on_postgres() {
    all_scenarios(Backend::Postgres(
        tasker_core::store::postgres::test_server_url(),
    ))
    .await;
}

async fn all_scenarios(backend: Backend) {
    let filter = std::env::var("SCENARIO").ok();
    let label = backend.name();
    let runner = Runner::new(tests_dir())
        .with_handlers(tasker_examples::register_handlers)
        .with_config(tasker_core::Config {
            pg_max_connections: 3,
            ..Runner::default_config()
        })
        .with_backend(backend);
    let files = scenario_files(&scenarios_dir()).expect("tests/scenarios is readable");
    assert!(
        !files.is_empty(),
        "no scenario files found in {}",
        scenarios_dir().display()
    );

    let mut problems = Vec::new();
    let mut runs = tokio::task::JoinSet::new();
    // Each PostgreSQL engine holds a few connections: a bounded number of scenarios at once
    // keeps the server under its connection limit.
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(if label == "postgres" {
        8
    } else {
        1024
    }));
    let mut names = Vec::new();
    for file in &files {
        let scenario = match Scenario::load(file) {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!("cannot load {e}"));
                continue;
            }
        };
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        if scenario.name != stem {
            problems.push(format!(
                "{}: name `{}` differs from the file name",
                file.display(),
                scenario.name
            ));
        }
        if filter
            .as_deref()
            .is_some_and(|f| !scenario.name.contains(f))
        {
            continue;
        }
        names.push(scenario.name.clone());
        let runner = runner.clone();
        let slots = slots.clone();
        runs.spawn(async move {
            let _slot = slots.acquire_owned().await;
            runner.run(&scenario).await
        });
    }
    if names.is_empty() {
        problems.push(format!("SCENARIO={filter:?} matches no scenario"));
    }
    let mut outcomes: Vec<Outcome> = runs.join_all().await;
    outcomes.sort_by_key(|o| names.iter().position(|n| *n == o.name));

    for o in &outcomes {
        let known = KNOWN_FAILURES.iter().find(|(n, _)| *n == o.name);
        let verdict = match (o.passed(), known) {
            (true, None) => "ok".to_string(),
            (false, Some((_, why))) => format!("known failure ({why})"),
            (true, Some(_)) => {
                problems.push(format!(
                    "{}: passes but is listed in KNOWN_FAILURES; remove it",
                    o.name
                ));
                "passed unexpectedly".to_string()
            }
            (false, None) => {
                problems.push(format!("{}:\n{}", o.name, o.report()));
                "FAILED".to_string()
            }
        };
        println!(
            "{label:<8} scenario {:<40} {verdict} ({} ms)",
            o.name,
            o.elapsed.as_millis()
        );
        if !o.passed() && known.is_some() {
            print!("{}", o.report());
        }
    }
    assert!(
        problems.is_empty(),
        "{} scenario problem(s) on {label}:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
