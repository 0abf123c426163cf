//! End-to-end tests of `tasker-ctl dlq ...` on a database where `tasker-ctl run` saw a task
//! exceed its template's lifecycle limit.

use std::path::Path;

use serde_json::Value;

mod common;

use common::*;

/// A task whose only step backs off for a minute while its template allows 0.005 minutes
/// (300 ms) in `waiting_for_retry`.
const TEMPLATE: &str = r#"
name: partner_sync
namespace_name: dlq_cli
version: "1.0.0"
lifecycle: { max_waiting_for_retry_minutes: 0.005 }
steps:
  - name: call_partner
    handler: { callable: kit.fail_always, initialization: { error_type: retryable_error } }
    retry: { max_attempts: 3, backoff: linear, backoff_base_ms: 60000, max_backoff_ms: 60000, jitter: false }
  - name: notify
    handler: { callable: kit.record }
    dependencies: [call_partner]
"#;

/// Runs the template once (the lifecycle check every 50 ms) and returns the task.
fn run_past_the_limit(dir: &Path, db: &str) -> Value {
    std::fs::write(dir.join("partner_sync.yaml"), TEMPLATE).unwrap();
    let out = command(
        dir,
        &[
            "run",
            "partner_sync.yaml",
            "--context",
            "{}",
            "--db",
            db,
            "--format",
            "json",
            "--timeout",
            "20",
        ],
    )
    .env("TASKER_LIFECYCLE_CHECK_MS", "50")
    .env("TASKER_POLL_INTERVAL_MS", "50")
    .output()
    .expect("tasker-ctl runs");
    assert_code(&out, 1);
    json_out(&out)
}

#[test]
fn dlq_list_get_stats_and_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db").display().to_string();
    let task = run_past_the_limit(dir.path(), &db);
    assert_eq!(task["status"], "error", "{task:#}");
    let task_uuid = task["uuid"].as_str().unwrap();

    // list: JSON without snapshots, and a table for people.
    let out = ctl(
        dir.path(),
        &["dlq", "list", "--db", &db, "--format", "json"],
    );
    assert_code(&out, 0);
    let entries = json_out(&out);
    let entries = entries.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{entries:#?}");
    let e = &entries[0];
    assert_eq!(e["task_uuid"], task_uuid);
    assert_eq!(e["reason"], "max_waiting_for_retry_minutes");
    assert_eq!(e["original_state"], "waiting_for_retry");
    assert_eq!(e["resolution_status"], "pending");
    assert!(e.get("snapshot").is_none(), "{e:#}");
    let id = e["dlq_entry_uuid"].as_str().unwrap().to_string();
    let out = ctl(dir.path(), &["dlq", "list", "--db", &db]);
    assert_code(&out, 0);
    let table = text(&out.stdout);
    assert!(table.starts_with("entry "), "{}", describe(&out));
    for cell in [
        id.as_str(),
        "dlq_cli/partner_sync 1.0.0",
        "max_waiting_for_retry_minutes",
        "waiting_for_retry",
        "pending",
    ] {
        assert!(table.contains(cell), "{cell}: {}", describe(&out));
    }

    // get: the snapshot, as JSON and as the steps table.
    let out = ctl(
        dir.path(),
        &["dlq", "get", &id, "--db", &db, "--format", "json"],
    );
    assert_code(&out, 0);
    let entry = json_out(&out);
    assert!(
        entry["message"]
            .as_str()
            .unwrap()
            .starts_with("lifecycle.max_waiting_for_retry_minutes = 0.005 exceeded"),
        "{entry:#}"
    );
    assert_eq!(entry["snapshot"]["task"]["state"], "waiting_for_retry");
    assert_eq!(entry["snapshot"]["steps"][0]["name"], "call_partner");
    assert_eq!(entry["snapshot"]["steps"][0]["state"], "waiting_for_retry");
    assert_eq!(entry["snapshot"]["steps"][1]["state"], "pending");
    let out = ctl(dir.path(), &["dlq", "get", &id, "--db", &db]);
    assert_code(&out, 0);
    let shown = text(&out.stdout);
    assert!(
        shown.contains("steps when the limit was exceeded"),
        "{}",
        describe(&out)
    );
    assert!(
        shown.contains("call_partner  waiting_for_retry  1/3"),
        "{}",
        describe(&out)
    );

    // stats
    let out = ctl(
        dir.path(),
        &["dlq", "stats", "--db", &db, "--format", "json"],
    );
    assert_code(&out, 0);
    let stats = json_out(&out);
    assert_eq!(stats["total"], 1);
    assert_eq!(stats["by_reason"]["max_waiting_for_retry_minutes"], 1);
    assert_eq!(stats["by_resolution_status"]["pending"], 1);
    assert_eq!(stats["by_original_state"]["waiting_for_retry"], 1);
    assert_eq!(stats["oldest_pending_at"], entry["created_at"]);
    let out = ctl(dir.path(), &["dlq", "stats", "--db", &db]);
    assert_code(&out, 0);
    assert!(
        text(&out.stdout).starts_with("total: 1\n"),
        "{}",
        describe(&out)
    );

    // resolve: records the outcome, leaves the task in error.
    let out = ctl(
        dir.path(),
        &[
            "dlq",
            "resolve",
            &id,
            "--status",
            "manually_resolved",
            "--notes",
            "re-sent by hand",
            "--by",
            "alice",
            "--db",
            &db,
            "--format",
            "json",
        ],
    );
    assert_code(&out, 0);
    let resolved = json_out(&out);
    assert_eq!(resolved["resolution_status"], "manually_resolved");
    assert_eq!(resolved["resolution_notes"], "re-sent by hand");
    assert_eq!(resolved["resolved_by"], "alice");
    assert!(resolved["resolved_at"].is_i64(), "{resolved:#}");
    let out = ctl(
        dir.path(),
        &["task", "get", task_uuid, "--db", &db, "--format", "json"],
    );
    assert_code(&out, 0);
    assert_eq!(json_out(&out)["status"], "error");
    let out = ctl(
        dir.path(),
        &["dlq", "list", "--status", "pending", "--db", &db],
    );
    assert_code(&out, 0);
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    assert!(text(&out.stderr).contains("no DLQ entries"));
    let out = ctl(
        dir.path(),
        &[
            "dlq",
            "list",
            "--status",
            "manually_resolved",
            "--db",
            &db,
            "--format",
            "json",
        ],
    );
    assert_code(&out, 0);
    assert_eq!(json_out(&out).as_array().unwrap().len(), 1);
}

#[test]
fn bad_dlq_input_is_named_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db").display().to_string();
    run_past_the_limit(dir.path(), &db);
    for (args, needle) in [
        (
            vec!["dlq", "list", "--status", "done"],
            "--status: unknown DLQ resolution status `done`; expected one of pending, manually_resolved",
        ),
        (
            vec!["dlq", "list", "--reason", "slow"],
            "--reason: unknown DLQ reason `slow`",
        ),
        (
            vec!["dlq", "get", "no-such-entry"],
            "no DLQ entry no-such-entry",
        ),
        (
            vec!["dlq", "resolve", "no-such-entry", "--status", "cancelled"],
            "no DLQ entry no-such-entry",
        ),
        (
            vec!["dlq", "stats", "--url", "http://127.0.0.1:8080"],
            "--url http://127.0.0.1:8080",
        ),
    ] {
        let mut args = args.clone();
        args.extend(["--db", db.as_str()]);
        let out = ctl(dir.path(), &args);
        assert_code(&out, 2);
        assert!(
            text(&out.stderr).contains(needle),
            "{args:?}: {}",
            describe(&out)
        );
    }
    let out = ctl(dir.path(), &["dlq", "stats", "--db", "missing.db"]);
    assert_code(&out, 2);
    assert!(text(&out.stderr).contains("no database at missing.db"));
}
