//! End-to-end tests of the real `tasker-ctl` binary: every command runs in a temporary
//! directory with its own `--db`, exactly as a user would type it.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::*;

fn ecommerce_template() -> String {
    workspace()
        .join("examples/ecommerce/templates/ecommerce_order_processing.yaml")
        .display()
        .to_string()
}

fn step<'a>(task: &'a Value, name: &str) -> &'a Value {
    task["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no step {name} in {task:#}"))
}

#[test]
fn ecommerce_happy_path_completes_with_json_output() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db").display().to_string();
    let out = ctl(
        dir.path(),
        &[
            "run",
            &ecommerce_template(),
            "--context",
            &example_file("sample_order.json"),
            "--db",
            &db,
            "--format",
            "json",
        ],
    );
    assert_code(&out, 0);
    let task = json_out(&out);
    assert_eq!(task["status"], "complete", "{task:#}");
    assert_eq!(task["replayed"], false);
    assert_eq!(task["initiator"], "tasker-ctl");
    assert_eq!(task["source_system"], "cli");
    let steps = task["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 5);
    for s in steps {
        assert_eq!(s["state"], "complete", "{s:#}");
        assert!(s["result"].is_object(), "{s:#}");
    }

    // The table form of the same (already complete) task: summary and results, exit 0.
    let out = ctl(
        dir.path(),
        &[
            "run",
            &ecommerce_template(),
            "--input",
            &example_file("sample_order.json"),
            "--db",
            &db,
        ],
    );
    assert_code(&out, 0);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("status: complete"), "{}", describe(&out));
    assert!(
        stdout.contains("send_confirmation  complete"),
        "{}",
        describe(&out)
    );
    assert!(
        text(&out.stderr).contains("attached to existing task"),
        "{}",
        describe(&out)
    );

    // `--new` starts a second task with the same context.
    let out = ctl(
        dir.path(),
        &[
            "run",
            &ecommerce_template(),
            "--context",
            &example_file("sample_order.json"),
            "--db",
            &db,
            "--format",
            "json",
            "--new",
        ],
    );
    assert_code(&out, 0);
    let again = json_out(&out);
    assert_eq!(again["replayed"], false);
    assert_ne!(again["uuid"], task["uuid"]);
}

#[test]
fn declined_payment_blocks_and_operators_can_act() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db").display().to_string();
    let out = ctl(
        dir.path(),
        &[
            "run",
            &ecommerce_template(),
            "--context",
            &example_file("declined_order.json"),
            "--db",
            &db,
            "--format",
            "json",
        ],
    );
    assert_code(&out, 1);
    let task = json_out(&out);
    assert_eq!(task["status"], "blocked_by_failures", "{task:#}");
    let payment = step(&task, "process_payment");
    assert_eq!(payment["state"], "error");
    assert_eq!(payment["error"]["error_code"], "PAYMENT_DECLINED");
    assert_eq!(payment["error"]["error_type"], "permanent_error");
    let uuid = task["uuid"].as_str().unwrap().to_string();

    // The table form names the error type, code and message.
    let out = ctl(
        dir.path(),
        &[
            "run",
            &ecommerce_template(),
            "--context",
            &example_file("declined_order.json"),
            "--db",
            &db,
        ],
    );
    assert_code(&out, 1);
    assert!(
        text(&out.stdout).contains("permanent_error [PAYMENT_DECLINED]"),
        "{}",
        describe(&out)
    );

    let out = ctl(dir.path(), &["task", "steps", &uuid, "--db", &db]);
    assert_code(&out, 0);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("process_payment") && stdout.contains("PAYMENT_DECLINED"),
        "{}",
        describe(&out)
    );

    let out = ctl(
        dir.path(),
        &[
            "task",
            "audit",
            &uuid,
            "--db",
            &db,
            "--step",
            "process_payment",
        ],
    );
    assert_code(&out, 0);
    assert!(
        text(&out.stdout).contains("enqueued_as_error_for_orchestration"),
        "{}",
        describe(&out)
    );
    let out = ctl(
        dir.path(),
        &["task", "audit", &uuid, "--db", &db, "--format", "json"],
    );
    assert_code(&out, 0);
    let audit = json_out(&out);
    assert!(
        audit["transitions"].as_array().is_some_and(|t| t.len() > 5),
        "{audit:#}"
    );
    assert!(audit["rejected_completions"].is_array());

    let out = ctl(
        dir.path(),
        &[
            "task",
            "list",
            "--db",
            &db,
            "--status",
            "blocked_by_failures",
            "--format",
            "json",
        ],
    );
    assert_code(&out, 0);
    assert_eq!(json_out(&out)[0]["uuid"], uuid.as_str());

    // Resolving the failed step resumes the task; with no handlers running (operator
    // handle) the next step stays enqueued.
    let out = ctl(
        dir.path(),
        &[
            "task",
            "resolve-step",
            &uuid,
            "process_payment",
            "--db",
            &db,
            "--reason",
            "paid by phone",
            "--format",
            "json",
        ],
    );
    assert_code(&out, 0);
    let task = json_out(&out);
    assert_eq!(
        step(&task, "process_payment")["state"],
        "resolved_manually",
        "{task:#}"
    );
    assert_eq!(step(&task, "create_order")["state"], "enqueued", "{task:#}");
    assert_eq!(task["status"], "steps_in_process", "{task:#}");
    let out = ctl(
        dir.path(),
        &[
            "task",
            "audit",
            &uuid,
            "--db",
            &db,
            "--step",
            "process_payment",
            "--format",
            "json",
        ],
    );
    let audit = json_out(&out);
    let last = audit["transitions"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["to_state"], "resolved_manually", "{audit:#}");
    assert_eq!(last["reason"], "paid by phone", "{audit:#}");
    assert!(
        last["actor"].as_str().unwrap().starts_with("operator:"),
        "{audit:#}"
    );

    let out = ctl(dir.path(), &["task", "cancel", &uuid, "--db", &db]);
    assert_code(&out, 0);
    assert!(
        text(&out.stdout).contains("cancelled"),
        "{}",
        describe(&out)
    );
    let out = ctl(
        dir.path(),
        &["task", "get", &uuid, "--db", &db, "--format", "json"],
    );
    assert_code(&out, 0);
    let task = json_out(&out);
    assert_eq!(task["status"], "cancelled");
    assert!(task["completed_at"].is_i64(), "{task:#}");
    let out = ctl(dir.path(), &["task", "get", &uuid, "--db", &db]);
    assert_code(&out, 0);
    assert!(
        text(&out.stdout).contains("completed_at"),
        "{}",
        describe(&out)
    );

    // Refused actions exit 1 with the reason; a server that does not answer is named (exit 1).
    let out = ctl(dir.path(), &["task", "give-up", &uuid, "--db", &db]);
    assert_code(&out, 1);
    let out = ctl(
        dir.path(),
        &["task", "get", &uuid, "--url", "http://127.0.0.1:1"],
    );
    assert_code(&out, 1);
    assert!(
        text(&out.stderr).contains("cannot reach the Tasker server at http://127.0.0.1:1"),
        "{}",
        describe(&out)
    );
}

#[test]
fn template_validate_reports_every_error_with_file_step_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        r#"
name: bad
namespace_name: "bad-namespace!"
version: "1.0.0"
steps:
  - name: a
    handler: { callable: kit.echo }
    retry: { backoff_base_ms: 5000, max_backoff_ms: 100 }
  - name: a
    handler: { callable: kit.echo }
  - name: b
    handler: { callable: kit.echo }
    dependencies: [nowhere]
  - name: c
    type: decision
    handler: { callable: kit.echo }
"#,
    )
    .unwrap();
    let out = ctl(
        dir.path(),
        &["template", "validate", "bad.yaml", &ecommerce_template()],
    );
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = text(&out.stdout);
    for expected in [
        "bad.yaml: field `namespace_name`",
        "bad.yaml: step `a`: field `retry.backoff_base_ms`",
        "bad.yaml: step `a`: field `name`",
        "bad.yaml: step `b`: field `dependencies`: `nowhere`",
        "bad.yaml: step `c`: field `dependencies`",
        "ok     ",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in\n{}",
            describe(&out)
        );
    }
    let out = ctl(
        dir.path(),
        &["template", "validate", "bad.yaml", "--format", "json"],
    );
    let v = json_out(&out);
    assert_eq!(v["valid"], false);
    assert!(
        v["files"][0]["errors"].as_array().unwrap().len() >= 5,
        "{v:#}"
    );

    let out = ctl(dir.path(), &["template", "validate", &ecommerce_template()]);
    assert_code(&out, 0);
}

#[test]
fn templates_convert_register_list_and_the_seed_task_create_form() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.yaml");
    std::fs::write(
        &old,
        "name: legacy\nnamespace: demo\nversion: 1.0.0\nstep_templates:\n  - name: one\n    handler: { callable: kit.echo }\n  - name: two\n    handler: { callable: kit.echo }\n    depends_on_step_name: one\n",
    )
    .unwrap();
    let out = ctl(dir.path(), &["template", "convert", "old.yaml"]);
    assert_code(&out, 0);
    let yaml = text(&out.stdout);
    assert!(
        yaml.contains("namespace_name: demo") && yaml.contains("dependencies"),
        "{}",
        describe(&out)
    );

    let out = ctl(
        dir.path(),
        &[
            "template",
            "register",
            &ecommerce_template(),
            "--db",
            "t.db",
        ],
    );
    assert_code(&out, 0);
    let out = ctl(
        dir.path(),
        &["template", "list", "--db", "t.db", "--format", "json"],
    );
    assert_code(&out, 0);
    assert_eq!(json_out(&out)[0]["name"], "ecommerce_order_processing");

    let context =
        std::fs::read_to_string(workspace().join("examples/ecommerce/sample_order.json")).unwrap();
    let out = ctl(
        dir.path(),
        &[
            "task",
            "create",
            "--name",
            "ecommerce_order_processing",
            "--namespace",
            "ecommerce",
            "--input",
            &context,
            "--db",
            "t.db",
        ],
    );
    assert_code(&out, 0);
    let uuid = text(&out.stdout).trim().to_string();
    let out = ctl(
        dir.path(),
        &["task", "get", &uuid, "--db", "t.db", "--format", "json"],
    );
    assert_code(&out, 0);
    // Created, not run: the first step waits for a worker.
    assert_eq!(step(&json_out(&out), "validate_cart")["state"], "enqueued");
}

#[test]
fn bad_input_is_named_and_exits_2_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.yaml"), "name: x\n  bad: [\n").unwrap();
    let template = ecommerce_template();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "broken.yaml"], "invalid YAML"),
        (
            vec!["run", "missing.yaml"],
            "missing.yaml: cannot read the file",
        ),
        (
            vec!["run", &template, "--context", "[1,2]"],
            "must be a JSON object",
        ),
        (
            vec!["run", &template, "--context", "not json"],
            "not valid JSON",
        ),
        (
            vec!["run", &template, "--context", "@nowhere.json"],
            "cannot read nowhere.json",
        ),
        (
            vec!["run", &template, "--context", "{}", "--timeout", "-3"],
            "--timeout",
        ),
        (
            vec!["run", &template, "--context", "{}", "--timeout", "0"],
            "--timeout",
        ),
        (
            vec![
                "run",
                &template,
                "--context",
                "{\"cart_items\": 3}",
                "--db",
                "s.db",
            ],
            "/cart_items",
        ),
        (vec!["run"], "Usage"),
        (
            vec!["task", "get", "x", "--db", "absent.db"],
            "no database at absent.db",
        ),
        (vec!["task", "list", "--status", "sleeping"], "--status"),
    ];
    for (args, expected) in cases {
        let out = ctl(dir.path(), &args);
        assert_code(&out, 2);
        assert!(
            text(&out.stderr).contains(expected),
            "{args:?}: missing {expected:?}\n{}",
            describe(&out)
        );
    }
    // Nothing was run against the default database.
    assert!(!dir.path().join("tasker.db").exists());
}

/// Polls `tasker-ctl task ... --format json` until `ready` accepts the answer.
fn poll(dir: &Path, args: &[&str], ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = ctl(dir, args);
        if out.status.success() {
            let v = json_out(&out);
            if ready(&v) {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out polling {args:?}: {}",
            describe(&out)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const SLEEPY: &str = r#"
name: sleepy
namespace_name: cli_test
version: "1.0.0"
steps:
  - name: first
    handler: { callable: kit.sleep, initialization: { ms: 1500 } }
    retry: { max_attempts: 3, backoff: none }
  - name: second
    handler: { callable: kit.sleep, initialization: { ms: 1500 } }
    dependencies: [first]
    retry: { max_attempts: 3, backoff: none }
"#;

#[test]
fn a_timeout_exits_1_with_the_current_task() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sleepy.yaml"), SLEEPY).unwrap();
    let out = ctl(
        dir.path(),
        &[
            "run",
            "sleepy.yaml",
            "--db",
            "t.db",
            "--timeout",
            "0.3",
            "--format",
            "json",
            "-q",
        ],
    );
    assert_code(&out, 1);
    assert!(
        text(&out.stderr).contains("timed out"),
        "{}",
        describe(&out)
    );
    assert_eq!(step(&json_out(&out), "first")["state"], "in_progress");
}

#[test]
fn a_killed_run_is_resumed_by_running_the_same_command_again() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sleepy.yaml"), SLEEPY).unwrap();
    let args = [
        "run",
        "sleepy.yaml",
        "--context",
        r#"{"order": 7}"#,
        "--db",
        "k.db",
        "--format",
        "json",
    ];
    let mut child = command(dir.path(), &args)
        .env("TASKER_LEASE_MS", "1000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tasks = poll(
        dir.path(),
        &["task", "list", "--db", "k.db", "--format", "json"],
        |v| v.as_array().is_some_and(|a| !a.is_empty()),
    );
    let uuid = tasks[0]["uuid"].as_str().unwrap().to_string();
    poll(
        dir.path(),
        &["task", "get", &uuid, "--db", "k.db", "--format", "json"],
        |t| step(t, "first")["state"] == "in_progress",
    );
    child.kill().unwrap();
    child.wait().unwrap();

    let out = command(dir.path(), &args)
        .env("TASKER_LEASE_MS", "1000")
        .output()
        .unwrap();
    assert_code(&out, 0);
    assert!(
        text(&out.stderr).contains(&format!("attached to existing task {uuid}")),
        "{}",
        describe(&out)
    );
    let task = json_out(&out);
    assert_eq!(task["uuid"], uuid.as_str());
    assert_eq!(task["replayed"], true);
    assert_eq!(task["status"], "complete", "{task:#}");
    assert_eq!(step(&task, "first")["attempts"], 2, "{task:#}");
    assert_eq!(step(&task, "second")["attempts"], 1, "{task:#}");

    let out = ctl(
        dir.path(),
        &[
            "task", "audit", &uuid, "--step", "first", "--db", "k.db", "--format", "json",
        ],
    );
    assert_code(&out, 0);
    let audit = json_out(&out);
    let lost = audit["transitions"].as_array().unwrap().iter().any(|t| {
        t["attempt"] == 1
            && t["to_state"] == "enqueued_as_error_for_orchestration"
            && t["reason"]
                .as_str()
                .is_some_and(|r| r.contains("worker_lost"))
    });
    assert!(lost, "no worker_lost first attempt in {audit:#}");
    let tasks = ctl(
        dir.path(),
        &["task", "list", "--db", "k.db", "--format", "json"],
    );
    assert_eq!(
        json_out(&tasks).as_array().unwrap().len(),
        1,
        "a second task was created"
    );
}

#[test]
fn a_reader_that_goes_away_ends_the_command_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    // Far more output than a pipe holds, so the command meets the closed pipe whatever the
    // timing: it blocks on the full pipe until the reader is gone.
    let mut yaml = String::from("name: big\nnamespace_name: cli\nversion: \"1.0.0\"\nsteps:\n");
    for i in 0..2000 {
        yaml.push_str(&format!(
            "  - {{ name: step_{i}, handler: {{ callable: kit.echo }} }}\n"
        ));
    }
    let template = dir.path().join("big.yaml");
    std::fs::write(&template, yaml).unwrap();
    let template = template.to_string_lossy().to_string();
    let mut child = command(dir.path(), &["template", "convert", &template])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
}
