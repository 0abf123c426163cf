//! End-to-end smoke test of the engine handle on an in-memory store.

use std::time::Duration;

use serde_json::json;
use tasker_core::template::parse_str;
use tasker_core::{StepOutcome, TaskRequest, TaskState, Tasker, handler_fn};

const LINEAR: &str = r#"
name: linear
namespace_name: smoke
version: "1.0.0"
steps:
  - name: a
    handler: { callable: square }
  - name: b
    handler: { callable: square }
    dependencies: [a]
  - name: c
    handler: { callable: square }
    dependencies: [b]
  - name: d
    handler: { callable: square }
    dependencies: [c]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linear_task_runs_to_completion() {
    let tasker = Tasker::open("sqlite::memory:").await.unwrap();
    let t = parse_str(LINEAR, None, "test").unwrap().template;
    tasker.register_template(&t).await.unwrap();
    tasker.register_handler(
        "square",
        handler_fn(|ctx| async move {
            let x = ctx
                .dependency_results()
                .values()
                .filter_map(|v| v.get("value").and_then(|v| v.as_f64()))
                .fold(None, |acc: Option<f64>, v| {
                    Some(acc.map_or(v, |a| a.max(v)))
                })
                .or_else(|| ctx.get_input("even_number").and_then(|v| v.as_f64()))
                .unwrap_or(0.0);
            StepOutcome::success(json!({ "value": x * x }))
        }),
    );
    let task = tasker
        .run_task(
            TaskRequest::new("smoke", "linear", json!({"even_number": 2})),
            Some(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    assert_eq!(task.status, TaskState::Complete, "{task:#?}");
    assert_eq!(
        task.step("d").unwrap().result,
        Some(json!({"value": 65536.0}))
    );
    let transitions = tasker.task_transitions(&task.uuid).await.unwrap();
    assert_eq!(transitions.last().unwrap().to_state, "complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_process_did() {
    let tasker = Tasker::open("sqlite::memory:").await.unwrap();
    let t = parse_str(LINEAR, None, "test").unwrap().template;
    tasker.register_template(&t).await.unwrap();
    tasker.register_handler(
        "square",
        handler_fn(|_ctx| async move { StepOutcome::success(json!({ "value": 1 })) }),
    );
    let task = tasker
        .run_task(
            TaskRequest::new("smoke", "linear", json!({})),
            Some(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    assert_eq!(task.status, TaskState::Complete);
    let text = tasker.metrics_text().await.unwrap();
    for line in [
        "tasker_tasks_created_total{namespace=\"smoke\",template=\"linear\"} 1",
        "tasker_tasks_completed_total{namespace=\"smoke\",template=\"linear\"} 1",
        "tasker_step_duration_seconds_count{namespace=\"smoke\",outcome=\"success\"} 4",
        "tasker_steps_claimed_total 4",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}
