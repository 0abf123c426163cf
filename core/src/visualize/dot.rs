//! Graphviz DOT text.

use std::fmt::Write;

use super::{Diagram, Edge, EdgeStyle, Node, one_line};
use crate::template::StepType;

fn shape(t: StepType) -> &'static str {
    match t {
        StepType::Standard => "box",
        StepType::Decision => "diamond",
        StepType::Batchable => "trapezium",
        StepType::BatchWorker => "box3d",
        StepType::DeferredConvergence => "hexagon",
        StepType::Workflow => "component",
    }
}

fn shape_name(t: StepType) -> &'static str {
    match t {
        StepType::Standard => "rounded box",
        StepType::Decision => "diamond",
        StepType::Batchable => "trapezium",
        StepType::BatchWorker => "stacked box (one node for its N workers)",
        StepType::DeferredConvergence => "hexagon",
        StepType::Workflow => "component (runs a child task)",
    }
}

pub(super) fn write(d: &Diagram) -> String {
    // `fmt::Write` into a `String` cannot fail.
    let mut out = String::new();
    let _ = writeln!(out, "// Tasker {}", one_line(&d.title));
    let shapes: Vec<String> = StepType::ALL
        .iter()
        .map(|&t| format!("{} {}", t.as_str(), shape_name(t)))
        .collect();
    let _ = writeln!(out, "// legend: {}", shapes.join(", "));
    for note in d.notes() {
        let _ = writeln!(out, "// {note}");
    }
    out.push_str("digraph tasker {\n");
    let _ = writeln!(
        out,
        "    graph [rankdir=TB, labelloc=t, fontname=\"Helvetica\", label=\"{}\"];",
        escape(&d.title)
    );
    out.push_str("    node [fontname=\"Helvetica\", fontsize=11];\n");
    out.push_str("    edge [fontname=\"Helvetica\", fontsize=10, color=\"#455a64\"];\n");
    for node in &d.nodes {
        let _ = writeln!(out, "    {}", node_line(node));
    }
    for edge in &d.edges {
        let _ = writeln!(out, "    {}", edge_line(d, edge));
    }
    out.push_str("}\n");
    out
}

fn node_line(node: &Node) -> String {
    let p = node.class.palette();
    let mut style = vec!["filled"];
    if node.step_type == StepType::Standard {
        style.push("rounded");
    }
    if p.dashed {
        style.push("dashed");
    }
    let label: Vec<String> = node.lines.iter().map(|l| escape(l)).collect();
    format!(
        "{} [label=\"{}\", shape={}, style=\"{}\", fillcolor=\"{}\", color=\"{}\", fontcolor=\"{}\", class=\"{}\"];",
        node.id,
        label.join("\\n"),
        shape(node.step_type),
        style.join(","),
        p.fill,
        p.stroke,
        p.text,
        node.class.name()
    )
}

fn edge_line(d: &Diagram, edge: &Edge) -> String {
    let mut attrs = Vec::new();
    match edge.style {
        EdgeStyle::Solid => {}
        EdgeStyle::Dashed => attrs.push("style=dashed".to_string()),
        EdgeStyle::Thick => attrs.push("penwidth=2.5".to_string()),
    }
    if let Some(label) = edge.label {
        attrs.push(format!("label=\"{}\"", escape(label)));
    }
    let attrs = if attrs.is_empty() {
        String::new()
    } else {
        format!(" [{}]", attrs.join(", "))
    };
    format!(
        "{} -> {}{attrs};",
        d.nodes[edge.from].id, d.nodes[edge.to].id
    )
}

/// Text safe inside a quoted DOT string: backslashes and quotes escaped (so that no `\N`-style
/// label escape is triggered), line breaks as spaces.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}
