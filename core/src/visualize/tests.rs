use serde_json::json;

use super::*;
use crate::state::TaskState;
use crate::task::StepView;
use crate::template::parse_str;

/// Every step type, and names that Mermaid or DOT would misread if written as they are.
const EVERY_TYPE: &str = r#"
name: everything
namespace_name: ns
version: 1.0.0
steps:
  - { name: extract, handler: { callable: X } }
  - { name: route, type: decision, dependencies: [extract], handler: { callable: R } }
  - { name: fast path, dependencies: [route], handler: { callable: F } }
  - { name: end, dependencies: [route], handler: { callable: E } }
  - { name: analyze, type: batchable, dependencies: [extract], handler: { callable: A } }
  - name: process_batch
    type: batch_worker
    dependencies: [analyze]
    handler: { callable: P }
    batch_config: { batch_size: 250 }
  - { name: aggregate, type: deferred_convergence, dependencies: [process_batch], handler: { callable: G } }
  - name: "say \"hi\" <b>#1</b>\n"
    dependencies: [aggregate]
    handler: { callable: S }
  - name: 'notify "ops"'
    type: workflow
    dependencies: [aggregate]
    handler: { callable: W, initialization: { task_template: notify_ops, namespace: alerts } }
  - name: legacy_child
    dependencies: [fast path, end]
    handler: { callable: WorkflowHandler, initialization: { task_template: child, version: 2.0.0 } }
"#;

fn every_type() -> TaskTemplate {
    match parse_str(EVERY_TYPE, None, "test") {
        Ok(loaded) => loaded.template,
        Err(e) => panic!("the fixture template should load: {e}"),
    }
}

fn assert_has_line(text: &str, line: &str) {
    assert!(
        text.lines().any(|l| l.trim_start() == line),
        "missing line {line:?} in\n{text}"
    );
}

#[test]
fn mermaid_draws_each_step_type_with_its_own_shape() {
    let m = template_diagram(&every_type()).to_mermaid();
    assert!(m.starts_with("flowchart TD\n"), "{m}");
    assert_has_line(&m, "%% Tasker template ns/everything/1.0.0");
    for line in [
        r#"step_extract["extract"]"#,
        r#"step_route{"route<br/>decision"}"#,
        r#"step_analyze[/"analyze<br/>batchable analyzer"\]"#,
        r#"step_process_batch[["process_batch<br/>batch_worker ×N, 250 items each"]]"#,
        r#"step_aggregate{{"aggregate<br/>deferred_convergence"}}"#,
        r#"step_notify__ops_(["notify #quot;ops#quot;<br/>workflow → alerts/notify_ops"])"#,
        r#"step_legacy_child(["legacy_child<br/>workflow → child 2.0.0"])"#,
    ] {
        assert_has_line(&m, line);
    }
}

#[test]
fn mermaid_edges_show_decisions_and_batches() {
    let m = template_diagram(&every_type()).to_mermaid();
    for line in [
        "step_extract --> step_route",
        "step_route -. decides .-> step_fast_path",
        "step_route -. decides .-> step_end",
        r#"step_analyze ==>|"fan-out ×N"| step_process_batch"#,
        r#"step_process_batch ==>|"fan-in"| step_aggregate"#,
        "step_fast_path --> step_legacy_child",
    ] {
        assert_has_line(&m, line);
    }
    assert_eq!(m.matches(" decides ").count(), 2, "{m}");
}

#[test]
fn mermaid_ids_and_labels_are_safe() {
    let m = template_diagram(&every_type()).to_mermaid();
    // `end` is a Mermaid keyword and `fast path` has a space: both get a prefixed, clean id.
    assert_has_line(&m, r#"step_end["end"]"#);
    assert_has_line(&m, r#"step_fast_path["fast path"]"#);
    // Quotes, `#`, HTML and the line break of a name are escaped.
    assert_has_line(
        &m,
        r#"step_say__hi___b__1__b__["say #quot;hi#quot; #lt;b#gt;#35;1#lt;/b#gt; "]"#,
    );
    // Each node line (an id, its shape, no blank before the label) holds exactly the two
    // quotes around its label.
    let nodes: Vec<&str> = m
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("step_") && !l.split('"').next().unwrap_or("").contains(' '))
        .collect();
    assert_eq!(nodes.len(), 10, "{m}");
    for line in nodes {
        assert_eq!(line.matches('"').count(), 2, "{line}");
    }
}

#[test]
fn mermaid_colours_step_types_and_explains_them() {
    let m = template_diagram(&every_type()).to_mermaid();
    assert_has_line(
        &m,
        "classDef decision fill:#fff3c4,stroke:#b8860b,color:#1a1a1a",
    );
    assert_has_line(&m, "class step_route decision");
    assert_has_line(&m, "class step_notify__ops_,step_legacy_child workflow");
    assert_has_line(
        &m,
        "class step_extract,step_fast_path,step_end,step_say__hi___b__1__b__ standard",
    );
    for t in StepType::ALL {
        assert!(m.contains(&format!("classDef {} ", t.as_str())), "{m}");
    }
    let legend = m.lines().find(|l| l.contains("%% legend:")).unwrap_or("");
    assert!(
        legend.contains("decision rhombus") && legend.contains("deferred_convergence hexagon"),
        "{legend}"
    );
}

#[test]
fn dot_has_the_same_distinctions() {
    let d = template_diagram(&every_type()).to_dot();
    assert!(d.contains("digraph tasker {"), "{d}");
    assert!(d.trim_end().ends_with('}'), "{d}");
    for (id, shape) in [
        ("step_extract", "box"),
        ("step_route", "diamond"),
        ("step_analyze", "trapezium"),
        ("step_process_batch", "box3d"),
        ("step_aggregate", "hexagon"),
        ("step_notify__ops_", "component"),
        ("step_legacy_child", "component"),
    ] {
        let line = d
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{id} [")))
            .unwrap_or_else(|| panic!("no node {id} in\n{d}"));
        assert!(line.contains(&format!("shape={shape},")), "{line}");
    }
    assert!(d.contains(
        r##"step_route [label="route\ndecision", shape=diamond, style="filled", fillcolor="#fff3c4", color="#b8860b""##
    ));
    assert!(d.contains(r#"step_extract [label="extract", shape=box, style="filled,rounded""#));
    assert!(
        d.contains(r#"step_notify__ops_ [label="notify \"ops\"\nworkflow → alerts/notify_ops""#)
    );
    for line in [
        "step_extract -> step_route;",
        r#"step_route -> step_fast_path [style=dashed, label="decides"];"#,
        r#"step_analyze -> step_process_batch [penwidth=2.5, label="fan-out ×N"];"#,
        r#"step_process_batch -> step_aggregate [penwidth=2.5, label="fan-in"];"#,
    ] {
        assert_has_line(&d, line);
    }
    assert!(
        d.contains("// legend: standard rounded box, decision diamond"),
        "{d}"
    );
}

#[test]
fn dot_escapes_quotes_and_backslashes() {
    let mut t = every_type();
    t.steps[0].name = r#"a\N "b""#.to_string();
    t.steps[1].dependencies = vec![t.steps[0].name.clone()];
    let d = template_diagram(&t).to_dot();
    assert!(d.contains(r#"step_a_N__b_ [label="a\\N \"b\"""#), "{d}");
    assert_has_line(&d, r#"step_a_N__b_ -> step_route;"#);
}

#[test]
fn ids_stay_unique_when_names_sanitise_alike() {
    let ids = node_ids(["a b", "a-b", "a_b", "a_b_2", "ünï"].into_iter());
    assert_eq!(
        ids,
        [
            "step_a_b",
            "step_a_b_2",
            "step_a_b_3",
            "step_a_b_2_2",
            "step__n_"
        ]
    );
}

#[test]
fn every_step_state_has_its_own_colour() {
    let fills: HashSet<&str> = StepState::ALL
        .iter()
        .map(|&s| state_palette(s).fill)
        .collect();
    assert_eq!(fills.len(), StepState::ALL.len());
    let fills: HashSet<&str> = StepType::ALL
        .iter()
        .map(|&t| type_palette(t).fill)
        .collect();
    assert_eq!(fills.len(), StepType::ALL.len());
}

const NOW: Millis = 1_700_000_100_000;

fn step(name: &str, step_type: &str, state: StepState, deps: &[&str]) -> StepView {
    StepView {
        uuid: format!("uuid-{name}"),
        name: name.to_string(),
        step_type: step_type.to_string(),
        callable: "kit.echo".to_string(),
        state,
        attempts: 0,
        max_attempts: 3,
        result: None,
        error: None,
        checkpoint: None,
        started_at: None,
        completed_at: None,
        next_attempt_at: None,
        worker_id: None,
        dependencies: deps.iter().map(|d| d.to_string()).collect(),
    }
}

fn timed(
    mut s: StepView,
    attempts: u32,
    started: Option<Millis>,
    completed: Option<Millis>,
) -> StepView {
    s.attempts = attempts;
    s.started_at = started;
    s.completed_at = completed;
    s
}

/// A task after its decision chose one branch: `manager_approval` and `finance_review` were
/// never created, so they are not drawn.
fn task() -> Task {
    let t0 = NOW - 10_000;
    Task {
        uuid: "0190-task".to_string(),
        namespace: "conformance".to_string(),
        name: "approval_routing".to_string(),
        version: "1.0.0".to_string(),
        status: TaskState::StepsInProcess,
        context: json!({}),
        initiator: "test".to_string(),
        source_system: "test".to_string(),
        reason: "test".to_string(),
        tags: Vec::new(),
        priority: 0,
        correlation_id: "c".to_string(),
        parent_correlation_id: None,
        parent: None,
        idempotency_key: None,
        created_at: t0,
        updated_at: NOW,
        completed_at: None,
        steps: vec![
            timed(
                step("validate", "standard", StepState::Complete, &[]),
                1,
                Some(t0),
                Some(t0 + 1_200),
            ),
            timed(
                step("route", "decision", StepState::Complete, &["validate"]),
                1,
                Some(t0 + 1_300),
                Some(t0 + 1_640),
            ),
            timed(
                step(
                    "auto_approve",
                    "standard",
                    StepState::InProgress,
                    &["route"],
                ),
                2,
                Some(NOW - 1_500),
                None,
            ),
            timed(
                step(
                    "flaky",
                    "standard",
                    StepState::WaitingForRetry,
                    &["validate"],
                ),
                1,
                Some(t0),
                None,
            ),
            timed(
                step("broken", "standard", StepState::Error, &["validate"]),
                3,
                Some(t0),
                Some(t0 + 340),
            ),
            step("skipped", "standard", StepState::Cancelled, &["broken"]),
            timed(
                step(
                    "fixed",
                    "standard",
                    StepState::ResolvedManually,
                    &["validate"],
                ),
                1,
                Some(t0),
                Some(t0 + 90),
            ),
            step(
                "finalize",
                "deferred_convergence",
                StepState::Pending,
                &["auto_approve", "fixed"],
            ),
            step("child", "workflow", StepState::Enqueued, &["validate"]),
            step("odd", "not_a_type", StepState::Pending, &[]),
        ],
        replayed: false,
    }
}

#[test]
fn task_nodes_show_state_attempts_and_duration() {
    let m = task_diagram(&task(), NOW).to_mermaid();
    for line in [
        r#"step_validate["validate<br/>complete<br/>attempts 1/3 · 1.20s"]"#,
        r#"step_route{"route<br/>complete<br/>attempts 1/3 · 340ms"}"#,
        r#"step_auto_approve["auto_approve<br/>in_progress<br/>attempts 2/3 · running 1.50s"]"#,
        r#"step_flaky["flaky<br/>waiting_for_retry<br/>attempts 1/3"]"#,
        r#"step_broken["broken<br/>error<br/>attempts 3/3 · 340ms"]"#,
        r#"step_finalize{{"finalize<br/>pending<br/>attempts 0/3"}}"#,
        r#"step_child(["child<br/>enqueued<br/>attempts 0/3"])"#,
        r#"step_odd["odd<br/>pending<br/>attempts 0/3"]"#,
    ] {
        assert_has_line(&m, line);
    }
    assert_has_line(
        &m,
        "%% Tasker task 0190-task (conformance/approval_routing 1.0.0): steps_in_process",
    );
}

#[test]
fn task_steps_are_coloured_by_state() {
    let m = task_diagram(&task(), NOW).to_mermaid();
    for (state, ids) in [
        ("complete", "step_validate,step_route"),
        ("in_progress", "step_auto_approve"),
        ("waiting_for_retry", "step_flaky"),
        ("error", "step_broken"),
        ("cancelled", "step_skipped"),
        ("resolved_manually", "step_fixed"),
        ("pending", "step_finalize,step_odd"),
        ("enqueued", "step_child"),
    ] {
        let p = state_palette(state.parse().unwrap_or(StepState::Pending));
        assert_has_line(
            &m,
            &format!(
                "classDef {state} fill:{},stroke:{},color:{}{}",
                p.fill,
                p.stroke,
                p.text,
                if state == "cancelled" {
                    ",stroke-dasharray:5 3"
                } else {
                    ""
                }
            ),
        );
        assert_has_line(&m, &format!("class {ids} {state}"));
    }
    // States no step is in get no class.
    assert!(!m.contains("classDef enqueued_for_orchestration"), "{m}");
    assert_has_line(
        &m,
        "classDef error fill:#ef9a9a,stroke:#c62828,color:#1a1a1a",
    );
}

#[test]
fn task_edges_are_the_ones_that_exist() {
    let diagram = task_diagram(&task(), NOW);
    let m = diagram.to_mermaid();
    assert_has_line(&m, r#"step_route -->|"chosen"| step_auto_approve"#);
    assert_has_line(&m, "step_auto_approve --> step_finalize");
    assert_has_line(&m, "step_fixed --> step_finalize");
    assert!(
        !m.contains("manager_approval") && !m.contains("decides"),
        "{m}"
    );
    assert_eq!(diagram.edges.len(), 9);

    let d = diagram.to_dot();
    assert!(d.contains(
        r##"step_broken [label="broken\nerror\nattempts 3/3 · 340ms", shape=box, style="filled,rounded", fillcolor="#ef9a9a", color="#c62828", fontcolor="#1a1a1a", class="error"];"##
    ), "{d}");
    assert!(d.contains(r#"step_skipped [label="skipped\ncancelled\nattempts 0/3", shape=box, style="filled,rounded,dashed""#), "{d}");
    assert_has_line(&d, r#"step_route -> step_auto_approve [label="chosen"];"#);
}
