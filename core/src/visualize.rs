//! Pictures of workflows: a template's step DAG, or a task's actual steps coloured by state, as
//! Mermaid flowchart text or Graphviz DOT text (SPEC §11, `visualize`).
//!
//! Pure text generation: no I/O and no clock (a task picture takes `now` for the running time
//! of steps in progress). Turning DOT into SVG or PNG is Graphviz's job; the command line pipes
//! the DOT text into the `dot` program. Both notations are written from one [`Diagram`], so they
//! always show the same nodes, shapes, edges and colours.
//!
//! A template picture shows what *may* exist: each step type has its own shape, the branches
//! below a decision hang on dashed `decides` edges (they exist only once chosen), and a batch
//! worker is one node standing for its N instances, between a `fan-out ×N` and a `fan-in` edge.
//! A task picture shows what *does* exist: the steps and edges of that task (decisions and
//! analyzers add steps as it runs), each coloured by its state and annotated with its attempts
//! and the duration of its latest attempt.
//!
//! ```
//! let yaml = "
//! name: greet
//! namespace_name: demo
//! version: 1.0.0
//! steps:
//!   - { name: hello, handler: { callable: Hello } }
//!   - { name: route, type: decision, dependencies: [hello], handler: { callable: Route } }
//!   - { name: goodbye, dependencies: [route], handler: { callable: Goodbye } }
//! ";
//! let template = tasker_core::template::parse_str(yaml, None, "test").unwrap().template;
//! let mermaid = tasker_core::visualize::template_diagram(&template).to_mermaid();
//! assert!(mermaid.contains("step_route{\"route<br/>decision\"}"));
//! assert!(mermaid.contains("step_route -. decides .-> step_goodbye"));
//! ```

mod dot;
mod mermaid;

use std::collections::{HashMap, HashSet};

use crate::clock::{Millis, human_duration};
use crate::state::StepState;
use crate::task::Task;
use crate::template::{StepDefinition, StepType, TaskTemplate};

/// A workflow picture, ready to be written as Mermaid ([`Diagram::to_mermaid`]) or Graphviz DOT
/// ([`Diagram::to_dot`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Diagram {
    /// What is drawn, e.g. `template ns/name/1.0.0`; a comment, and the DOT graph's caption.
    title: String,
    /// Whether colours stand for step types (template) or step states (task).
    kind: Kind,
    nodes: Vec<Node>,
    edges: Vec<Edge>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Template,
    Task,
}

/// One step.
#[derive(Debug, Clone, PartialEq)]
struct Node {
    /// An identifier safe in both notations: `step_` and the name's `[A-Za-z0-9_]` characters.
    id: String,
    /// The label, one entry per line, unescaped; the first is the step's name.
    lines: Vec<String>,
    /// Decides the shape.
    step_type: StepType,
    /// Decides the colours.
    class: Class,
}

/// What a node's colours stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Type(StepType),
    State(StepState),
}

impl Class {
    /// The class name: the step type's or the step state's canonical name.
    fn name(self) -> &'static str {
        match self {
            Class::Type(t) => t.as_str(),
            Class::State(s) => s.as_str(),
        }
    }

    fn palette(self) -> Palette {
        match self {
            Class::Type(t) => type_palette(t),
            Class::State(s) => state_palette(s),
        }
    }
}

/// One dependency: `from` is the parent, `to` the child (indices into the nodes).
#[derive(Debug, Clone, PartialEq)]
struct Edge {
    from: usize,
    to: usize,
    style: EdgeStyle,
    label: Option<&'static str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EdgeStyle {
    /// An ordinary dependency.
    Solid,
    /// A branch that exists only if its decision chooses it.
    Dashed,
    /// A batch fan-out or fan-in: one drawn edge for N real ones.
    Thick,
}

/// Fill, border and text colours of a node class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Palette {
    fill: &'static str,
    stroke: &'static str,
    text: &'static str,
    /// A dashed border (steps that will not run).
    dashed: bool,
}

const fn palette(fill: &'static str, stroke: &'static str) -> Palette {
    Palette {
        fill,
        stroke,
        text: "#1a1a1a",
        dashed: false,
    }
}

fn type_palette(t: StepType) -> Palette {
    match t {
        StepType::Standard => palette("#eceff1", "#546e7a"),
        StepType::Decision => palette("#fff3c4", "#b8860b"),
        StepType::Batchable => palette("#dbeafe", "#1d4ed8"),
        StepType::BatchWorker => palette("#d1fae5", "#047857"),
        StepType::DeferredConvergence => palette("#ede7f6", "#6a1b9a"),
        StepType::Workflow => palette("#d0f0f5", "#00796b"),
    }
}

/// One colour per step state: greens for done, red for failed, amber for running, blues for
/// queued, grey for not started; cancelled is grey with a dashed border.
fn state_palette(s: StepState) -> Palette {
    match s {
        StepState::Pending => palette("#f5f5f5", "#9e9e9e"),
        StepState::Enqueued => palette("#e3f2fd", "#42a5f5"),
        StepState::InProgress => palette("#ffe082", "#ff8f00"),
        StepState::EnqueuedForOrchestration => palette("#dcedc8", "#7cb342"),
        StepState::EnqueuedAsErrorForOrchestration => palette("#ffccbc", "#e64a19"),
        StepState::WaitingForRetry => palette("#b2ebf2", "#00838f"),
        StepState::Complete => palette("#a5d6a7", "#2e7d32"),
        StepState::Error => palette("#ef9a9a", "#c62828"),
        StepState::Cancelled => Palette {
            dashed: true,
            ..palette("#e0e0e0", "#616161")
        },
        StepState::ResolvedManually => palette("#c5e1a5", "#827717"),
    }
}

impl Diagram {
    /// The classes the nodes use, each once, in the order of [`StepType::ALL`] or
    /// [`StepState::ALL`] so that the output does not depend on the step order.
    fn classes(&self) -> Vec<Class> {
        let all: Vec<Class> = match self.kind {
            Kind::Template => StepType::ALL.into_iter().map(Class::Type).collect(),
            Kind::Task => StepState::ALL.into_iter().map(Class::State).collect(),
        };
        all.into_iter()
            .filter(|c| self.nodes.iter().any(|n| n.class == *c))
            .collect()
    }

    /// What the colours and edges mean, for the legend comment of either notation.
    fn notes(&self) -> &'static [&'static str] {
        match self.kind {
            Kind::Template => &[
                "colour = step type; a dashed `decides` edge is a branch that exists only once \
                 its decision chooses it",
                "fan-out ×N: the analyzer creates one worker per batch (N known at run time); \
                 fan-in: what follows waits for every worker",
            ],
            Kind::Task => &[
                "colour = step state; each node: name, state, attempts/max_attempts and the \
                 duration of its latest attempt",
                "only the steps this task has are drawn: decisions and batch analyzers add steps \
                 as the task runs",
            ],
        }
    }

    /// The diagram as a Mermaid `flowchart TD`.
    pub fn to_mermaid(&self) -> String {
        mermaid::write(self)
    }

    /// The diagram as a Graphviz `digraph` (feed it to `dot -Tsvg` for a picture).
    pub fn to_dot(&self) -> String {
        dot::write(self)
    }
}

/// The step DAG of a template: shapes and colours by step type, dashed edges out of
/// decisions, fan-out and fan-in edges around batch workers.
pub fn template_diagram(template: &TaskTemplate) -> Diagram {
    let ids = node_ids(template.steps.iter().map(|s| s.name.as_str()));
    let nodes: Vec<Node> = template
        .steps
        .iter()
        .zip(ids)
        .map(|(step, id)| {
            let step_type = drawn_type(step);
            let mut lines = vec![step.name.clone()];
            lines.extend(type_line(step, step_type));
            Node {
                id,
                lines,
                step_type,
                class: Class::Type(step_type),
            }
        })
        .collect();
    let edges = edges(
        template.steps.iter().map(|s| s.dependencies.as_slice()),
        &nodes,
        |parent, child| match (parent, child) {
            (StepType::Decision, _) => (EdgeStyle::Dashed, Some("decides")),
            (StepType::Batchable, StepType::BatchWorker) => (EdgeStyle::Thick, Some("fan-out ×N")),
            (StepType::BatchWorker, _) => (EdgeStyle::Thick, Some("fan-in")),
            _ => (EdgeStyle::Solid, None),
        },
    );
    Diagram {
        title: format!("template {}", template.key()),
        kind: Kind::Template,
        nodes,
        edges,
    }
}

/// The steps and edges a task actually has, coloured by state; each node shows the state,
/// `attempts/max_attempts` and how long the latest attempt took (or has been running, measured
/// at `now`).
pub fn task_diagram(task: &Task, now: Millis) -> Diagram {
    let ids = node_ids(task.steps.iter().map(|s| s.name.as_str()));
    let nodes: Vec<Node> = task
        .steps
        .iter()
        .zip(ids)
        .map(|(step, id)| {
            let mut attempts = format!("attempts {}/{}", step.attempts, step.max_attempts);
            let duration = match (step.started_at, step.completed_at) {
                (Some(start), Some(end)) if end >= start => Some(human_duration(end - start)),
                (Some(start), None) if step.state == StepState::InProgress => {
                    Some(format!("running {}", human_duration(now - start)))
                }
                _ => None,
            };
            if let Some(d) = duration {
                attempts.push_str(&format!(" · {d}"));
            }
            Node {
                id,
                lines: vec![step.name.clone(), step.state.as_str().to_string(), attempts],
                step_type: StepType::from_name(&step.step_type).unwrap_or_default(),
                class: Class::State(step.state),
            }
        })
        .collect();
    let edges = edges(
        task.steps.iter().map(|s| s.dependencies.as_slice()),
        &nodes,
        |parent, child| match (parent, child) {
            (StepType::Decision, _) => (EdgeStyle::Solid, Some("chosen")),
            (StepType::Batchable, StepType::BatchWorker) | (StepType::BatchWorker, _) => {
                (EdgeStyle::Thick, None)
            }
            _ => (EdgeStyle::Solid, None),
        },
    );
    Diagram {
        title: format!(
            "task {} ({}/{} {}): {}",
            task.uuid, task.namespace, task.name, task.version, task.status
        ),
        kind: Kind::Task,
        nodes,
        edges,
    }
}

/// A workflow step may also be spelled as a standard step calling `WorkflowHandler` (SPEC §8).
fn drawn_type(step: &StepDefinition) -> StepType {
    if step.handler.callable == "WorkflowHandler" {
        StepType::Workflow
    } else {
        step.step_type
    }
}

/// The second label line of a template step: its type, with what makes it special.
fn type_line(step: &StepDefinition, step_type: StepType) -> Option<String> {
    let init = &step.handler.initialization;
    let text = |key: &str| init.get(key).and_then(|v| v.as_str()).unwrap_or("");
    Some(match step_type {
        StepType::Standard => return None,
        StepType::Decision => "decision".to_string(),
        StepType::Batchable => "batchable analyzer".to_string(),
        StepType::BatchWorker => match &step.batch_config {
            Some(b) => format!("batch_worker ×N, {} items each", b.batch_size),
            None => "batch_worker ×N".to_string(),
        },
        StepType::DeferredConvergence => "deferred_convergence".to_string(),
        StepType::Workflow => {
            let namespace = match text("namespace") {
                "" => String::new(),
                ns => format!("{ns}/"),
            };
            let version = match text("version") {
                "" => String::new(),
                v => format!(" {v}"),
            };
            format!("workflow → {namespace}{}{version}", text("task_template"))
        }
    })
}

/// Edges from each node's dependencies (names, in node order; unknown names are skipped,
/// repeated ones drawn once), styled by `style(parent type, child type)`.
fn edges<'a>(
    dependencies: impl Iterator<Item = &'a [String]>,
    nodes: &[Node],
    style: impl Fn(StepType, StepType) -> (EdgeStyle, Option<&'static str>),
) -> Vec<Edge> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        index.entry(node.lines[0].as_str()).or_insert(i);
    }
    let mut out = Vec::new();
    for (to, dependencies) in dependencies.enumerate() {
        let mut seen = HashSet::new();
        for dep in dependencies {
            let Some(&from) = index.get(dep.as_str()) else {
                continue;
            };
            if seen.insert(from) {
                let (style, label) = style(nodes[from].step_type, nodes[to].step_type);
                out.push(Edge {
                    from,
                    to,
                    style,
                    label,
                });
            }
        }
    }
    out
}

/// `s` on one line, for a comment (which ends at the line's end).
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// One identifier per name, usable unquoted in Mermaid and DOT: `step_` (which also keeps
/// Mermaid keywords such as `end` and the `o`/`x` edge endings away) followed by the name with
/// every character outside `[A-Za-z0-9_]` replaced by `_`; a suffix `_2`, `_3`, ... keeps
/// names that sanitise alike apart.
fn node_ids<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut used = HashSet::new();
    names
        .map(|name| {
            let base: String = "step_"
                .chars()
                .chain(name.chars().map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        c
                    } else {
                        '_'
                    }
                }))
                .collect();
            let mut id = base.clone();
            let mut n = 2;
            while !used.insert(id.clone()) {
                id = format!("{base}_{n}");
                n += 1;
            }
            id
        })
        .collect()
}

#[cfg(test)]
mod tests;
