//! Mermaid flowchart text.

use std::fmt::Write;

use super::{Diagram, Edge, EdgeStyle, Node, one_line};
use crate::template::StepType;

/// Opening and closing brackets of each step type's shape, around a quoted label.
fn brackets(t: StepType) -> (&'static str, &'static str) {
    match t {
        StepType::Standard => ("[", "]"),
        StepType::Decision => ("{", "}"),
        StepType::Batchable => ("[/", "\\]"),
        StepType::BatchWorker => ("[[", "]]"),
        StepType::DeferredConvergence => ("{{", "}}"),
        StepType::Workflow => ("([", "])"),
    }
}

fn shape_name(t: StepType) -> &'static str {
    match t {
        StepType::Standard => "rectangle",
        StepType::Decision => "rhombus",
        StepType::Batchable => "trapezoid",
        StepType::BatchWorker => "subroutine (one node for its N workers)",
        StepType::DeferredConvergence => "hexagon",
        StepType::Workflow => "stadium (runs a child task)",
    }
}

pub(super) fn write(d: &Diagram) -> String {
    // `fmt::Write` into a `String` cannot fail.
    let mut out = String::from("flowchart TD\n");
    let _ = writeln!(out, "    %% Tasker {}", one_line(&d.title));
    let shapes: Vec<String> = StepType::ALL
        .iter()
        .map(|&t| format!("{} {}", t.as_str(), shape_name(t)))
        .collect();
    let _ = writeln!(out, "    %% legend: {}", shapes.join(", "));
    for note in d.notes() {
        let _ = writeln!(out, "    %% {note}");
    }
    for node in &d.nodes {
        let _ = writeln!(out, "    {}", node_line(node));
    }
    for edge in &d.edges {
        let _ = writeln!(out, "    {}", edge_line(d, edge));
    }
    for class in d.classes() {
        let p = class.palette();
        let dash = if p.dashed {
            ",stroke-dasharray:5 3"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "    classDef {} fill:{},stroke:{},color:{}{dash}",
            class.name(),
            p.fill,
            p.stroke,
            p.text
        );
        let ids: Vec<&str> = d
            .nodes
            .iter()
            .filter(|n| n.class == class)
            .map(|n| n.id.as_str())
            .collect();
        let _ = writeln!(out, "    class {} {}", ids.join(","), class.name());
    }
    out
}

fn node_line(node: &Node) -> String {
    let (open, close) = brackets(node.step_type);
    let label: Vec<String> = node.lines.iter().map(|l| escape(l)).collect();
    format!("{}{open}\"{}\"{close}", node.id, label.join("<br/>"))
}

fn edge_line(d: &Diagram, edge: &Edge) -> String {
    let (from, to) = (&d.nodes[edge.from].id, &d.nodes[edge.to].id);
    let arrow = match (edge.style, edge.label) {
        (EdgeStyle::Solid, None) => "-->".to_string(),
        (EdgeStyle::Solid, Some(l)) => format!("-->|\"{}\"|", escape(l)),
        (EdgeStyle::Dashed, None) => "-.->".to_string(),
        (EdgeStyle::Dashed, Some(l)) => format!("-. {} .->", escape(l)),
        (EdgeStyle::Thick, None) => "==>".to_string(),
        (EdgeStyle::Thick, Some(l)) => format!("==>|\"{}\"|", escape(l)),
    };
    format!("{from} {arrow} {to}")
}

/// Text safe inside a quoted Mermaid label: the characters Mermaid would read as syntax or
/// HTML become its `#...;` entity codes, and line breaks become spaces.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("#quot;"),
            '#' => out.push_str("#35;"),
            '&' => out.push_str("#amp;"),
            '<' => out.push_str("#lt;"),
            '>' => out.push_str("#gt;"),
            '`' => out.push_str("#96;"),
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}
