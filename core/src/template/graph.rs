//! The step DAG of a template: lookups, traversal orders, cycles and the content hash.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::model::{StepDefinition, StepType, TaskTemplate};

/// Steps as indices with edges both ways. Dependencies naming no step are left out (validation
/// reports them); with duplicate names the first declaration wins.
pub(super) struct Graph {
    /// Parent → children (a child depends on its parent).
    pub children: Vec<Vec<usize>>,
    /// Child → parents, deduplicated.
    pub parents: Vec<Vec<usize>>,
}

impl Graph {
    pub fn new(t: &TaskTemplate) -> Self {
        let index = name_index(t);
        let mut children = vec![Vec::new(); t.steps.len()];
        let mut parents = vec![Vec::new(); t.steps.len()];
        for (child, step) in t.steps.iter().enumerate() {
            for dep in &step.dependencies {
                if let Some(&parent) = index.get(dep.as_str())
                    && !parents[child].contains(&parent)
                {
                    parents[child].push(parent);
                    children[parent].push(child);
                }
            }
        }
        Graph { children, parents }
    }

    /// Every step reachable from `roots` through child edges, roots excluded unless reachable.
    pub fn reachable(&self, roots: &[usize]) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut pending: Vec<usize> = roots
            .iter()
            .flat_map(|&r| self.children[r].clone())
            .collect();
        while let Some(i) = pending.pop() {
            if seen.insert(i) {
                pending.extend(&self.children[i]);
            }
        }
        seen
    }

    /// One cycle per distinct loop found by a depth-first search, each as the list of steps in
    /// parent → child order (the first step is not repeated at the end).
    pub fn cycles(&self) -> Vec<Vec<usize>> {
        const WHITE: u8 = 0;
        const GREY: u8 = 1;
        const BLACK: u8 = 2;
        let n = self.children.len();
        let mut colour = vec![WHITE; n];
        let mut found = Vec::new();
        let mut seen: HashSet<Vec<usize>> = HashSet::new();
        for start in 0..n {
            if colour[start] != WHITE {
                continue;
            }
            // Iterative so that a huge template cannot overflow the stack.
            let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
            colour[start] = GREY;
            while let Some(&mut (node, ref mut next)) = stack.last_mut() {
                if let Some(&child) = self.children[node].get(*next) {
                    *next += 1;
                    match colour[child] {
                        WHITE => {
                            colour[child] = GREY;
                            stack.push((child, 0));
                        }
                        GREY => {
                            let from = stack.iter().position(|&(s, _)| s == child).unwrap_or(0);
                            let mut cycle: Vec<usize> =
                                stack[from..].iter().map(|&(s, _)| s).collect();
                            // Rotate so the earliest-declared step leads; that makes the
                            // same loop found from two places compare equal.
                            let lead = (0..cycle.len()).min_by_key(|&k| cycle[k]).unwrap_or(0);
                            cycle.rotate_left(lead);
                            if seen.insert(cycle.clone()) {
                                found.push(cycle);
                            }
                        }
                        _ => {}
                    }
                } else {
                    colour[node] = BLACK;
                    stack.pop();
                }
            }
        }
        found
    }
}

fn name_index(t: &TaskTemplate) -> HashMap<&str, usize> {
    let mut index = HashMap::new();
    for (i, step) in t.steps.iter().enumerate() {
        index.entry(step.name.as_str()).or_insert(i);
    }
    index
}

impl TaskTemplate {
    /// `namespace/name/version`, the template's identity in the registry.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.name, self.version)
    }

    /// The step definition called `name`.
    pub fn step(&self, name: &str) -> Option<&StepDefinition> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// Hex SHA-256 of the canonical JSON of the template (object keys sorted at every level),
    /// so that two registrations of the same content compare equal whatever their YAML looked
    /// like, and any change of content is noticed.
    pub fn content_hash(&self) -> String {
        // Serialising plain data with string keys cannot fail; `Null` would still hash stably.
        let value = serde_json::to_value(self).unwrap_or(Value::Null);
        let mut canonical = String::new();
        write_canonical(&value, &mut canonical);
        let digest = Sha256::digest(canonical.as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The steps created when a task starts, in declaration order: every step except
    /// `batch_worker` templates and the steps that descend (transitively) from a `decision` or a
    /// `batch_worker` step — those are created later by their decision or analyzer.
    pub fn initial_step_names(&self) -> Vec<String> {
        let graph = Graph::new(self);
        let deferred_roots: Vec<usize> = self
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.step_type, StepType::Decision | StepType::BatchWorker))
            .map(|(i, _)| i)
            .collect();
        let later = graph.reachable(&deferred_roots);
        self.steps
            .iter()
            .enumerate()
            .filter(|(i, s)| s.step_type != StepType::BatchWorker && !later.contains(i))
            .map(|(_, s)| s.name.clone())
            .collect()
    }

    /// The steps a decision may name (SPEC §6): everything reachable from `decision` through
    /// child edges, not going past nested decisions (which are included) and leaving out batch
    /// workers (only their analyzer creates them). Declaration order; empty for an unknown step.
    pub fn decision_subgraph(&self, decision: &str) -> Vec<String> {
        let Some(root) = self.steps.iter().position(|s| s.name == decision) else {
            return Vec::new();
        };
        let graph = Graph::new(self);
        self.names(&self.decision_walk(&graph, &graph.children[root]))
    }

    /// What a decision that requests `requested` (names inside its sub-graph) creates: those
    /// steps and their descendants, stopping at nested decisions and batch workers as
    /// [`TaskTemplate::decision_subgraph`] does. Declaration order.
    pub fn decision_creates(&self, requested: &[String]) -> Vec<String> {
        let graph = Graph::new(self);
        let roots: Vec<usize> = requested
            .iter()
            .filter_map(|n| self.steps.iter().position(|s| &s.name == n))
            .collect();
        self.names(&self.decision_walk(&graph, &roots))
    }

    /// `roots` and what they reach, expanding only through steps that are not decisions and
    /// never entering batch workers.
    fn decision_walk(&self, graph: &Graph, roots: &[usize]) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut pending: Vec<usize> = roots.to_vec();
        while let Some(i) = pending.pop() {
            if self.steps[i].step_type == StepType::BatchWorker || !seen.insert(i) {
                continue;
            }
            if self.steps[i].step_type != StepType::Decision {
                pending.extend(&graph.children[i]);
            }
        }
        seen
    }

    fn names(&self, set: &BTreeSet<usize>) -> Vec<String> {
        set.iter().map(|&i| self.steps[i].name.clone()).collect()
    }

    /// The transitive children of `step` (not `step` itself), in declaration order; empty for
    /// an unknown step.
    pub fn descendants(&self, step: &str) -> Vec<String> {
        let Some(root) = self.steps.iter().position(|s| s.name == step) else {
            return Vec::new();
        };
        let graph = Graph::new(self);
        graph
            .reachable(&[root])
            .into_iter()
            .filter(|&i| i != root)
            .map(|i| self.steps[i].name.clone())
            .collect()
    }

    /// Every step after all of its dependencies; among steps that could come next, the one
    /// declared first. Meant for valid templates: steps on a cycle (which validation rejects)
    /// are appended at the end in declaration order.
    pub fn topological_order(&self) -> Vec<String> {
        let graph = Graph::new(self);
        let mut waiting: Vec<usize> = graph.parents.iter().map(Vec::len).collect();
        let mut ready: BTreeSet<usize> =
            (0..self.steps.len()).filter(|&i| waiting[i] == 0).collect();
        let mut placed = vec![false; self.steps.len()];
        let mut order = Vec::with_capacity(self.steps.len());
        while let Some(i) = ready.pop_first() {
            placed[i] = true;
            order.push(self.steps[i].name.clone());
            for &child in &graph.children[i] {
                waiting[child] -= 1;
                if waiting[child] == 0 {
                    ready.insert(child);
                }
            }
        }
        order.extend(
            (0..self.steps.len())
                .filter(|&i| !placed[i])
                .map(|i| self.steps[i].name.clone()),
        );
        order
    }
}

/// JSON with object keys sorted at every level, independent of serde_json's map ordering
/// (which a `preserve_order` feature elsewhere in the build could change).
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::parse_str;

    fn template(yaml: &str) -> TaskTemplate {
        match parse_str(yaml, None, "test") {
            Ok(loaded) => loaded.template,
            Err(e) => panic!("template should load: {e}"),
        }
    }

    const DECISION: &str = "
name: approval
namespace_name: ns
version: 1.0.0
steps:
  - { name: validate, handler: { callable: V } }
  - { name: route, type: decision, dependencies: [validate], handler: { callable: R } }
  - { name: auto_approve, dependencies: [route], handler: { callable: A } }
  - { name: manager_approval, dependencies: [route], handler: { callable: M } }
  - { name: finance_review, dependencies: [manager_approval], handler: { callable: F } }
  - name: finalize
    type: deferred_convergence
    dependencies: [auto_approve, manager_approval, finance_review]
    handler: { callable: Z }
  - { name: audit_log, dependencies: [validate], handler: { callable: L } }
";

    const BATCH: &str = "
name: csv
namespace_name: ns
version: 1.0.0
steps:
  - { name: analyze, type: batchable, handler: { callable: A } }
  - name: process_batch
    type: batch_worker
    dependencies: [analyze]
    handler: { callable: P }
    batch_config: { batch_size: 100 }
  - name: aggregate
    type: deferred_convergence
    dependencies: [process_batch]
    handler: { callable: G }
  - { name: report, dependencies: [aggregate], handler: { callable: R } }
";

    #[test]
    fn initial_steps_of_a_decision_template_stop_at_the_decision() {
        let t = template(DECISION);
        assert_eq!(t.initial_step_names(), ["validate", "route", "audit_log"]);
    }

    #[test]
    fn initial_steps_of_a_batch_template_stop_at_the_analyzer() {
        let t = template(BATCH);
        assert_eq!(t.initial_step_names(), ["analyze"]);
    }

    #[test]
    fn descendants_are_transitive_and_in_declaration_order() {
        let t = template(DECISION);
        assert_eq!(
            t.descendants("route"),
            [
                "auto_approve",
                "manager_approval",
                "finance_review",
                "finalize"
            ]
        );
        assert_eq!(t.descendants("finalize"), Vec::<String>::new());
        assert_eq!(t.descendants("nope"), Vec::<String>::new());
    }

    #[test]
    fn topological_order_prefers_declaration_order() {
        let t = template(
            "
name: t
namespace_name: ns
version: '1'
steps:
  - { name: d, dependencies: [b, c], handler: { callable: X } }
  - { name: c, dependencies: [a], handler: { callable: X } }
  - { name: b, dependencies: [a], handler: { callable: X } }
  - { name: a, handler: { callable: X } }
",
        );
        assert_eq!(t.topological_order(), ["a", "c", "b", "d"]);
    }

    #[test]
    fn key_and_step_lookup() {
        let t = template(BATCH);
        assert_eq!(t.key(), "ns/csv/1.0.0");
        assert_eq!(
            t.step("aggregate").map(|s| s.step_type),
            Some(StepType::DeferredConvergence)
        );
        assert!(t.step("missing").is_none());
    }

    #[test]
    fn content_hash_is_stable_and_content_sensitive() {
        let a = template(BATCH);
        let b = template(BATCH);
        assert_eq!(a.content_hash(), b.content_hash());
        assert_eq!(a.content_hash().len(), 64);
        let mut c = a.clone();
        c.steps[0]
            .handler
            .initialization
            .insert("k".into(), Value::from(1));
        assert_ne!(a.content_hash(), c.content_hash());
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let v = serde_json::json!({"b": {"z": 1, "a": [{"y": 2, "x": 3}]}, "a": "q\"uote"});
        let mut out = String::new();
        write_canonical(&v, &mut out);
        assert_eq!(out, r#"{"a":"q\"uote","b":{"a":[{"x":3,"y":2}],"z":1}}"#);
    }

    #[test]
    fn cycles_are_found_once_each() {
        let mut t = template(DECISION);
        t.steps[0].dependencies = vec!["audit_log".into()];
        let cycles = Graph::new(&t).cycles();
        assert_eq!(cycles, vec![vec![0, 6]]);
    }
}
