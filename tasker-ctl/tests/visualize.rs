//! End-to-end tests of `tasker-ctl template visualize` and `tasker-ctl task visualize`, with the
//! real binary and the real Graphviz (`./run test` installs it when `dot` is missing).

use std::path::PathBuf;

mod common;

use common::*;

fn approval_template() -> String {
    workspace()
        .join("tests/templates/conditional_approval.yaml")
        .display()
        .to_string()
}

fn assert_lines(output: &str, lines: &[&str]) {
    for line in lines {
        assert!(
            output.lines().any(|l| l.trim() == *line),
            "missing line {line:?} in\n{output}"
        );
    }
}

/// Every step type, so that Graphviz is shown every shape and edge style the DOT text uses.
const EVERY_TYPE: &str = r#"
name: every_type
namespace_name: cli
version: "1.0.0"
steps:
  - { name: extract, handler: { callable: kit.echo } }
  - { name: route, type: decision, dependencies: [extract], handler: { callable: kit.decide } }
  - { name: "fast \"lane\"", dependencies: [route], handler: { callable: kit.echo } }
  - { name: analyze, type: batchable, dependencies: [extract], handler: { callable: kit.echo } }
  - name: process_batch
    type: batch_worker
    dependencies: [analyze]
    handler: { callable: kit.echo }
    batch_config: { batch_size: 100 }
  - { name: aggregate, type: deferred_convergence, dependencies: [process_batch], handler: { callable: kit.echo } }
  - name: notify
    type: workflow
    dependencies: [aggregate]
    handler: { callable: kit.echo, initialization: { task_template: notify_ops } }
"#;

#[test]
fn template_visualize_prints_mermaid_and_renders_through_graphviz() {
    let dir = tempfile::tempdir().unwrap();
    let approval = approval_template();

    let out = ctl(dir.path(), &["template", "visualize", &approval]);
    assert_code(&out, 0);
    let mermaid = text(&out.stdout);
    assert!(mermaid.starts_with("flowchart TD\n"), "{}", describe(&out));
    assert_lines(
        &mermaid,
        &[
            r#"step_routing_decision{"routing_decision<br/>decision"}"#,
            "step_validate_request --> step_routing_decision",
            "step_routing_decision -. decides .-> step_auto_approve",
            "step_routing_decision -. decides .-> step_finance_review",
            r#"step_finalize_approval{{"finalize_approval<br/>deferred_convergence"}}"#,
            "class step_routing_decision decision",
        ],
    );

    let out = ctl(
        dir.path(),
        &[
            "template",
            "visualize",
            &approval,
            "--format",
            "dot",
            "--output",
            "a.dot",
        ],
    );
    assert_code(&out, 0);
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    let dot = std::fs::read_to_string(dir.path().join("a.dot")).unwrap();
    assert_lines(
        &dot,
        &[r#"step_routing_decision -> step_manager_approval [style=dashed, label="decides"];"#],
    );

    std::fs::write(dir.path().join("every.yaml"), EVERY_TYPE).unwrap();
    let out = ctl(
        dir.path(),
        &["template", "visualize", "every.yaml", "--format", "svg"],
    );
    assert_code(&out, 0);
    let svg = text(&out.stdout);
    assert!(
        svg.starts_with("<?xml") || svg.starts_with("<svg"),
        "{}",
        describe(&out)
    );
    for expected in [
        "<svg",
        "process_batch",
        "fan&#45;out ×N",
        "fast &quot;lane&quot;",
        "workflow → notify_ops",
    ] {
        assert!(svg.contains(expected), "missing {expected:?} in\n{svg}");
    }

    let out = ctl(
        dir.path(),
        &[
            "template",
            "visualize",
            "every.yaml",
            "--format",
            "png",
            "-o",
            "every.png",
        ],
    );
    assert_code(&out, 0);
    let png = std::fs::read(dir.path().join("every.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG"),
        "not a PNG: {} bytes",
        png.len()
    );

    let out = ctl(
        dir.path(),
        &["template", "visualize", &approval, "--format", "png"],
    );
    assert_code(&out, 2);
    assert!(text(&out.stderr).contains("--output"), "{}", describe(&out));
}

#[test]
fn template_visualize_fails_like_validate_on_an_invalid_template() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "name: bad\nnamespace_name: cli\nversion: \"1.0.0\"\nsteps:\n  - name: b\n    handler: { callable: kit.echo }\n    dependencies: [nowhere]\n",
    )
    .unwrap();
    let expected = "bad.yaml: step `b`: field `dependencies`: `nowhere`";
    let validate = ctl(dir.path(), &["template", "validate", "bad.yaml"]);
    assert_code(&validate, 1);
    assert!(
        text(&validate.stdout).contains(expected),
        "{}",
        describe(&validate)
    );
    let out = ctl(dir.path(), &["template", "visualize", "bad.yaml"]);
    assert_code(&out, 1);
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    assert!(text(&out.stderr).contains(expected), "{}", describe(&out));

    let out = ctl(dir.path(), &["template", "visualize", "missing.yaml"]);
    assert_code(&out, 1);
    assert!(
        text(&out.stderr).contains("missing.yaml: cannot read the file"),
        "{}",
        describe(&out)
    );
}

#[test]
fn without_graphviz_svg_fails_naming_the_package() {
    let dir = tempfile::tempdir().unwrap();
    let empty: PathBuf = dir.path().join("no-programs");
    std::fs::create_dir(&empty).unwrap();
    let out = command(
        dir.path(),
        &[
            "template",
            "visualize",
            &approval_template(),
            "--format",
            "svg",
        ],
    )
    .env("PATH", &empty)
    .output()
    .unwrap();
    assert_code(&out, 1);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("graphviz") && stderr.contains("apt-get install graphviz"),
        "{}",
        describe(&out)
    );
    // Text formats need no Graphviz.
    let out = command(dir.path(), &["template", "visualize", &approval_template()])
        .env("PATH", &empty)
        .output()
        .unwrap();
    assert_code(&out, 0);
}

#[test]
fn task_visualize_draws_the_steps_the_task_has() {
    let dir = tempfile::tempdir().unwrap();
    let out = ctl(
        dir.path(),
        &[
            "run",
            &approval_template(),
            "--context",
            r#"{"amount": 2500}"#,
            "--db",
            "t.db",
            "--format",
            "json",
        ],
    );
    assert_code(&out, 0);
    let task: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(task["status"], "complete", "{task:#}");
    let uuid = task["uuid"].as_str().unwrap().to_string();

    let out = ctl(dir.path(), &["task", "visualize", &uuid, "--db", "t.db"]);
    assert_code(&out, 0);
    let mermaid = text(&out.stdout);
    assert_lines(
        &mermaid,
        &[
            r#"step_routing_decision -->|"chosen"| step_manager_approval"#,
            "step_manager_approval --> step_finalize_approval",
            "class step_validate_request,step_routing_decision,step_manager_approval,step_finalize_approval complete",
            "classDef complete fill:#a5d6a7,stroke:#2e7d32,color:#1a1a1a",
        ],
    );
    let validate = mermaid
        .lines()
        .find(|l| l.trim_start().starts_with("step_validate_request["))
        .unwrap_or_default();
    assert!(
        validate.contains("<br/>complete<br/>attempts 1/3 · ") && validate.ends_with("ms\"]"),
        "{validate}"
    );
    // The amount chose the manager branch: the other branches were never created.
    assert!(
        !mermaid.contains("auto_approve") && !mermaid.contains("finance_review"),
        "{mermaid}"
    );

    let out = ctl(
        dir.path(),
        &[
            "task",
            "visualize",
            &uuid,
            "--db",
            "t.db",
            "--format",
            "svg",
            "--output",
            "t.svg",
        ],
    );
    assert_code(&out, 0);
    let svg = std::fs::read_to_string(dir.path().join("t.svg")).unwrap();
    assert!(svg.starts_with("<?xml") || svg.starts_with("<svg"), "{svg}");
    assert!(svg.contains("manager_approval"), "{svg}");

    let out = ctl(
        dir.path(),
        &["task", "visualize", "no-such-task", "--db", "t.db"],
    );
    assert_code(&out, 2);
    let out = ctl(
        dir.path(),
        &["task", "visualize", &uuid, "--db", "absent.db"],
    );
    assert_code(&out, 2);
}
