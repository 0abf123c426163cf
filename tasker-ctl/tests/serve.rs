//! `tasker-ctl serve`, `auth` and the `task` commands through the server, as real processes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Output, Stdio};

use serde_json::Value;
use tasker_core::api::client::Client;

mod common;

use common::*;

/// A running `tasker-ctl serve`; killed when dropped.
struct Serve {
    child: Child,
    url: String,
}

impl Serve {
    fn start(dir: &Path, args: &[&str]) -> Serve {
        let mut all = vec!["serve", "--bind", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let mut child = command(dir, &all)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tasker-ctl serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(url) = line.trim().strip_prefix("listening on ") else {
            let out = child.wait_with_output().unwrap();
            panic!("serve did not start: {line:?}\n{}", describe(&out));
        };
        Serve {
            url: url.to_string(),
            child,
        }
    }

    /// Sends SIGTERM and returns how the process ended.
    fn terminate(mut self) -> Output {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let child = std::mem::replace(
            &mut self.child,
            std::process::Command::new("true").spawn().unwrap(),
        );
        child.wait_with_output().unwrap()
    }

    /// Waits (server side, no polling) until the task is terminal or blocked.
    fn wait(&self, uuid: &str) -> Value {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = Client::new(&self.url, std::env::var("TEST_KEY").ok()).unwrap();
        rt.block_on(client.call(
            "GET",
            &format!("/v1/tasks/{uuid}/wait?timeout_ms=20000"),
            None,
        ))
        .unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn templates_dir() -> String {
    workspace()
        .join("examples/ecommerce/templates")
        .display()
        .to_string()
}

fn stdout_line(o: &Output) -> String {
    text(&o.stdout).trim().to_string()
}

#[test]
fn task_commands_work_through_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Serve::start(
        dir.path(),
        &["--db", "srv.db", "--templates", &templates_dir()],
    );
    let url = server.url.as_str();
    let create = |input: &str, key: &str| {
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
                input,
                "--idempotency-key",
                key,
                "--url",
                url,
            ],
        );
        assert_code(&out, 0);
        stdout_line(&out)
    };

    // The seeds' form, with the server named by TASKER_URL.
    let out = command(
        dir.path(),
        &[
            "task",
            "create",
            "--name",
            "ecommerce_order_processing",
            "--namespace",
            "ecommerce",
            "--input",
            &example_file("sample_order.json"),
        ],
    )
    .env("TASKER_URL", url)
    .output()
    .unwrap();
    assert_code(&out, 0);
    let happy = stdout_line(&out);
    assert_eq!(server.wait(&happy)["status"], "complete");
    assert!(
        !dir.path().join("tasker.db").exists(),
        "the server was used"
    );

    let out = ctl(
        dir.path(),
        &["task", "get", &happy, "--url", url, "--format", "json"],
    );
    assert_code(&out, 0);
    let task = json_out(&out);
    assert_eq!(task["status"], "complete");
    assert_eq!(task["completion_percentage"], 100.0);
    let out = ctl(dir.path(), &["task", "get", &happy, "--url", url]);
    assert_code(&out, 0);
    assert!(
        text(&out.stdout).contains("send_confirmation"),
        "{}",
        describe(&out)
    );
    let out = ctl(
        dir.path(),
        &[
            "task",
            "list",
            "--url",
            url,
            "--namespace",
            "ecommerce",
            "--format",
            "json",
        ],
    );
    assert_code(&out, 0);
    assert!(
        json_out(&out)
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["uuid"] == happy)
    );
    let out = ctl(dir.path(), &["task", "steps", &happy, "--url", url]);
    assert_code(&out, 0);
    assert!(text(&out.stdout).contains("process_payment"));
    let out = ctl(
        dir.path(),
        &[
            "task",
            "audit",
            &happy,
            "--step",
            "validate_cart",
            "--url",
            url,
            "--format",
            "json",
        ],
    );
    assert_code(&out, 0);
    let audit = json_out(&out);
    assert!(
        audit["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["step_name"] == "validate_cart")
    );
    let out = ctl(dir.path(), &["task", "audit", &happy, "--url", url]);
    assert_code(&out, 0);
    assert!(text(&out.stdout).contains("create_order"));

    // Operator actions on blocked tasks.
    let declined = create(&example_file("declined_order.json"), "d1");
    assert_eq!(server.wait(&declined)["status"], "blocked_by_failures");
    let out = ctl(
        dir.path(),
        &[
            "task",
            "reset-step",
            &declined,
            "process_payment",
            "--url",
            url,
        ],
    );
    assert_code(&out, 0);
    assert!(
        text(&out.stdout).contains("step process_payment:"),
        "{}",
        describe(&out)
    );
    assert_eq!(server.wait(&declined)["status"], "blocked_by_failures");
    let out = ctl(
        dir.path(),
        &[
            "task",
            "complete-step",
            &declined,
            "process_payment",
            "--result",
            r#"{"payment_id": "manual", "amount_charged": 109.97}"#,
            "--url",
            url,
            "--reason",
            "paid by phone",
        ],
    );
    assert_code(&out, 0);
    let after = server.wait(&declined);
    let payment = after["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "process_payment")
        .unwrap();
    assert_eq!(payment["state"], "complete");

    let empty = create(&example_file("empty_cart_order.json"), "e1");
    assert_eq!(server.wait(&empty)["status"], "blocked_by_failures");
    let out = ctl(
        dir.path(),
        &["task", "give-up", &empty, "--url", url, "--format", "json"],
    );
    assert_code(&out, 0);
    assert_eq!(json_out(&out)["status"], "error");
    let out = ctl(dir.path(), &["task", "give-up", &empty, "--url", url]);
    assert_code(&out, 1);

    let empty2 = create(&example_file("empty_cart_order.json"), "e2");
    server.wait(&empty2);
    let out = ctl(
        dir.path(),
        &[
            "task",
            "resolve-step",
            &empty2,
            "validate_cart",
            "--url",
            url,
        ],
    );
    assert_code(&out, 0);
    assert!(
        text(&out.stdout).contains("resolved_manually"),
        "{}",
        describe(&out)
    );

    let empty3 = create(&example_file("empty_cart_order.json"), "e3");
    server.wait(&empty3);
    let out = ctl(dir.path(), &["task", "resolve", &empty3, "--url", url]);
    assert_code(&out, 0);
    assert!(text(&out.stdout).contains("resolved_manually"));

    let empty4 = create(&example_file("empty_cart_order.json"), "e4");
    server.wait(&empty4);
    let out = ctl(
        dir.path(),
        &["task", "cancel", &empty4, "--url", url, "--by", "ops"],
    );
    assert_code(&out, 0);
    assert!(text(&out.stdout).contains("cancelled"));

    // Unknown things are bad input, as against a database.
    let out = ctl(dir.path(), &["task", "get", "no-such-task", "--url", url]);
    assert_code(&out, 2);
    assert!(
        text(&out.stderr).contains("no task no-such-task"),
        "{}",
        describe(&out)
    );

    // SIGTERM stops the server cleanly.
    let out = server.terminate();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(text(&out.stderr).contains("stopping"), "{}", describe(&out));
}

#[test]
fn api_keys_guard_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let out = ctl(
        dir.path(),
        &[
            "auth",
            "create-key",
            "--name",
            "reader",
            "--permissions",
            "tasks:read,tasks:list",
            "--db",
            "k.db",
        ],
    );
    assert_code(&out, 0);
    let reader = stdout_line(&out);
    assert!(reader.starts_with("tsk_"), "{}", describe(&out));
    assert!(text(&out.stderr).contains("shown only now"));
    let out = ctl(
        dir.path(),
        &[
            "auth",
            "create-key",
            "--name",
            "admin",
            "--permissions",
            "*",
            "--db",
            "k.db",
            "--format",
            "json",
        ],
    );
    assert_code(&out, 0);
    let admin = json_out(&out);
    let admin_key = admin["key"].as_str().unwrap().to_string();
    let out = ctl(
        dir.path(),
        &[
            "auth",
            "create-key",
            "--name",
            "x",
            "--permissions",
            "tasks:fly",
            "--db",
            "k.db",
        ],
    );
    assert_code(&out, 2);
    assert!(
        text(&out.stderr).contains("tasks:fly"),
        "{}",
        describe(&out)
    );

    let out = ctl(
        dir.path(),
        &["auth", "list-keys", "--db", "k.db", "--format", "json"],
    );
    assert_code(&out, 0);
    let listed = text(&out.stdout);
    assert_eq!(json_out(&out).as_array().unwrap().len(), 2);
    let reader_secret = reader.rsplit('_').next().unwrap();
    assert!(!listed.contains(reader_secret), "secrets are never listed");
    let out = ctl(dir.path(), &["auth", "list-keys", "--db", "k.db"]);
    assert_code(&out, 0);
    assert!(text(&out.stdout).contains("reader"));

    // Keys exist, so the server asks for them.
    let server = Serve::start(dir.path(), &["--db", "k.db"]);
    let url = server.url.as_str();
    let out = ctl(dir.path(), &["task", "list", "--url", url]);
    assert_code(&out, 2);
    assert!(text(&out.stderr).contains("API key"), "{}", describe(&out));
    let out = ctl(
        dir.path(),
        &["task", "list", "--url", url, "--api-key", &reader],
    );
    assert_code(&out, 0);
    let out = command(dir.path(), &["task", "list", "--url", url])
        .env("TASKER_API_KEY", &reader)
        .output()
        .unwrap();
    assert_code(&out, 0);
    let out = ctl(
        dir.path(),
        &[
            "task",
            "cancel",
            "some-task",
            "--url",
            url,
            "--api-key",
            &reader,
        ],
    );
    assert_code(&out, 2);
    assert!(
        text(&out.stderr).contains("lacks the permission tasks:cancel"),
        "{}",
        describe(&out)
    );
    let out = ctl(
        dir.path(),
        &[
            "task",
            "cancel",
            "some-task",
            "--url",
            url,
            "--api-key",
            &admin_key,
        ],
    );
    assert_code(&out, 2);
    assert!(
        text(&out.stderr).contains("no task some-task"),
        "{}",
        describe(&out)
    );

    let out = ctl(
        dir.path(),
        &[
            "auth",
            "revoke-key",
            admin["key_id"].as_str().unwrap(),
            "--db",
            "k.db",
        ],
    );
    assert_code(&out, 0);
    let out = ctl(
        dir.path(),
        &["task", "list", "--url", url, "--api-key", &admin_key],
    );
    assert_code(&out, 2);
    assert!(
        text(&out.stderr).contains("not valid"),
        "{}",
        describe(&out)
    );
}

#[test]
fn serve_refuses_to_listen_beyond_loopback_without_auth() {
    let dir = tempfile::tempdir().unwrap();
    let out = ctl(
        dir.path(),
        &["serve", "--bind", "0.0.0.0:0", "--db", "x.db"],
    );
    assert_code(&out, 2);
    let err = text(&out.stderr);
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0"),
        "{}",
        describe(&out)
    );
    assert!(err.contains("--insecure"));
    let out = ctl(
        dir.path(),
        &["serve", "--bind", "not-an-address", "--db", "x.db"],
    );
    assert_code(&out, 2);
    assert!(text(&out.stderr).contains("--bind"), "{}", describe(&out));
}

#[test]
fn serve_limits_request_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let server = Serve::start(
        dir.path(),
        &[
            "--db",
            "b.db",
            "--templates",
            &templates_dir(),
            "--max-body-bytes",
            "256",
        ],
    );
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(1024));
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
            &big,
            "--url",
            &server.url,
        ],
    );
    assert_code(&out, 2);
    assert!(
        text(&out.stderr).contains("larger than this server accepts"),
        "{}",
        describe(&out)
    );
}
