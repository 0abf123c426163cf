//! Comparing what happened with what a scenario expects. Every mismatch is collected (not
//! just the first) as one line naming where it is, what was expected and what was found.

use serde_json::Value;
use tasker_core::Task;

use super::format::{DlqExpect, Expect, StepExpect};

/// Whether `actual` contains `expected`: objects match when every expected key is present and
/// matches (extra keys are fine), arrays when they have the same length and match element by
/// element, numbers by numeric value (`4` matches `4.0`: some hosts only have doubles), other
/// values by equality. Mismatches are pushed to `diffs`, located by a JSON pointer under `at`.
pub fn subset_match(expected: &Value, actual: &Value, at: &str, diffs: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                let path = format!("{at}/{k}");
                match a.get(k) {
                    Some(av) => subset_match(ev, av, &path, diffs),
                    None => diffs.push(format!("{path}: expected {ev}, key missing")),
                }
            }
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => {
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                subset_match(ev, av, &format!("{at}/{i}"), diffs);
            }
        }
        (Value::Number(e), Value::Number(a)) => {
            let same = match (e.as_i64(), a.as_i64()) {
                (Some(x), Some(y)) => x == y,
                _ => e.as_f64() == a.as_f64(),
            };
            if !same {
                diffs.push(format!("{at}: expected {e}, found {a}"));
            }
        }
        (e, a) if e == a => {}
        (e, a) => diffs.push(format!("{at}: expected {e}, found {a}")),
    }
}

/// Every difference between the task's end state (plus the executions counted by the kit)
/// and `expect`.
pub fn compare_task(
    expect: &Expect,
    task: &Task,
    executions: impl Fn(&str) -> usize,
) -> Vec<String> {
    let mut diffs = Vec::new();
    if let Some(state) = expect.task
        && task.status != state
    {
        diffs.push(format!(
            "task: expected state {state}, found {}",
            task.status
        ));
    }
    for (name, e) in &expect.steps {
        match task.step(name) {
            Some(step) => compare_step(name, e, step, &mut diffs),
            None => diffs.push(format!("step {name}: expected to exist, absent")),
        }
    }
    for name in &expect.absent_steps {
        if let Some(step) = task.step(name) {
            diffs.push(format!(
                "step {name}: expected absent, exists in state {}",
                step.state
            ));
        }
    }
    if let Some(n) = expect.step_count
        && task.steps.len() != n
    {
        let names: Vec<&str> = task.steps.iter().map(|s| s.name.as_str()).collect();
        diffs.push(format!(
            "step_count: expected {n}, found {} ({})",
            names.len(),
            names.join(", ")
        ));
    }
    for (name, n) in &expect.executions {
        let found = executions(name);
        if found != *n {
            diffs.push(format!("executions of {name}: expected {n}, found {found}"));
        }
    }
    diffs
}

fn compare_step(
    name: &str,
    e: &StepExpect,
    step: &tasker_core::task::StepView,
    diffs: &mut Vec<String>,
) {
    let at = format!("step {name}");
    if let Some(deps) = &e.dependencies {
        let mut want: Vec<&str> = deps.iter().map(String::as_str).collect();
        let mut found: Vec<&str> = step.dependencies.iter().map(String::as_str).collect();
        want.sort_unstable();
        found.sort_unstable();
        if want != found {
            diffs.push(format!(
                "{at}: expected dependencies [{}], found [{}]",
                want.join(", "),
                found.join(", ")
            ));
        }
    }
    if let Some(state) = e.state
        && step.state != state
    {
        diffs.push(format!(
            "{at}: expected state {state}, found {}",
            step.state
        ));
    }
    if let Some(n) = e.attempts
        && step.attempts != n
    {
        diffs.push(format!(
            "{at}: expected attempts {n}, found {}",
            step.attempts
        ));
    }
    if let Some(expected) = &e.result {
        match &step.result {
            Some(actual) => subset_match(expected, actual, &format!("{at} result "), diffs),
            None => diffs.push(format!("{at}: expected result {expected}, has none")),
        }
    }
    let wants_error = e.error_type.is_some()
        || e.error_code.is_some()
        || e.retryable.is_some()
        || !e.error_contains.is_empty();
    if !wants_error {
        return;
    }
    let Some(err) = &step.error else {
        diffs.push(format!("{at}: expected an error, has none"));
        return;
    };
    if let Some(t) = &e.error_type
        && err.error_type.as_str() != t
    {
        diffs.push(format!(
            "{at}: expected error_type {t}, found {} ({})",
            err.error_type, err.message
        ));
    }
    if let Some(c) = &e.error_code
        && err.error_code.as_deref() != Some(c.as_str())
    {
        diffs.push(format!(
            "{at}: expected error_code {c}, found {:?} ({})",
            err.error_code, err.message
        ));
    }
    if let Some(r) = e.retryable
        && err.retryable != r
    {
        diffs.push(format!(
            "{at}: expected retryable {r}, found {}",
            err.retryable
        ));
    }
    for s in &e.error_contains {
        if !err.message.contains(s.as_str()) {
            diffs.push(format!(
                "{at}: expected the error message to contain {s:?}, found {:?}",
                err.message
            ));
        }
    }
}

/// Every difference between the task's DLQ entries (`entries`, the one expected read with its
/// snapshot) and `expected`.
pub fn compare_dlq(expected: &DlqExpect, entries: &[tasker_core::DlqEntry]) -> Vec<String> {
    let [entry] = entries else {
        return vec![format!(
            "dlq: expected exactly one entry for the task, found {}",
            entries.len()
        )];
    };
    let mut diffs = Vec::new();
    if let Some(r) = expected.reason
        && entry.reason != r
    {
        diffs.push(format!(
            "dlq: expected reason {r}, found {} ({})",
            entry.reason, entry.message
        ));
    }
    if let Some(s) = expected.original_state
        && entry.original_state != s
    {
        diffs.push(format!(
            "dlq: expected original_state {s}, found {}",
            entry.original_state
        ));
    }
    if let Some(s) = expected.resolution_status
        && entry.resolution_status != s
    {
        diffs.push(format!(
            "dlq: expected resolution_status {s}, found {}",
            entry.resolution_status
        ));
    }
    for s in &expected.message_contains {
        if !entry.message.contains(s.as_str()) {
            diffs.push(format!(
                "dlq: expected the message to contain {s:?}, found {:?}",
                entry.message
            ));
        }
    }
    if let Some(want) = &expected.snapshot {
        match &entry.snapshot {
            Some(actual) => subset_match(want, actual, "dlq snapshot ", &mut diffs),
            None => diffs.push("dlq: expected a snapshot, the entry has none".into()),
        }
    }
    diffs
}

/// The difference between the steps created with the task (their `create` transitions before
/// the task's first other step transition) and `expected`.
pub fn compare_created_steps(
    expected: &[String],
    audit: &[tasker_core::Transition],
) -> Vec<String> {
    let mut found: Vec<&str> = audit
        .iter()
        .take_while(|t| t.event == "create")
        .filter_map(|t| t.step_name.as_deref())
        .collect();
    found.sort_unstable();
    let mut want: Vec<&str> = expected.iter().map(String::as_str).collect();
    want.sort_unstable();
    if found == want {
        Vec::new()
    } else {
        vec![format!(
            "created_steps: expected [{}], created with the task: [{}]",
            want.join(", "),
            found.join(", ")
        )]
    }
}

/// Differences between the outbox records of a task and `expected` (event name → attempts).
pub fn compare_events(
    expected: &std::collections::BTreeMap<String, Vec<u32>>,
    records: &[tasker_core::events::StoredEvent],
) -> Vec<String> {
    let mut found: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
    for r in records {
        found
            .entry(r.event.event_name.clone())
            .or_default()
            .push(r.event.metadata.attempt);
    }
    let mut diffs = Vec::new();
    for (name, attempts) in expected {
        let mut want = attempts.clone();
        want.sort_unstable();
        let mut got = found.remove(name).unwrap_or_default();
        got.sort_unstable();
        if want != got {
            diffs.push(format!(
                "events: {name}: expected records for attempts {want:?}, found {got:?}"
            ));
        }
    }
    for (name, got) in found {
        diffs.push(format!(
            "events: unexpected {name} records (attempts {got:?})"
        ));
    }
    diffs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn diffs(e: Value, a: Value) -> Vec<String> {
        let mut d = Vec::new();
        subset_match(&e, &a, "", &mut d);
        d
    }

    #[test]
    fn subset_match_ignores_extra_keys_and_number_representation() {
        assert!(diffs(json!({"value": 4}), json!({"value": 4.0, "other": 1})).is_empty());
        assert!(
            diffs(
                json!({"a": {"b": [1, {"c": 2}]}}),
                json!({"a": {"b": [1, {"c": 2, "d": 3}]}})
            )
            .is_empty()
        );
    }

    #[test]
    fn subset_match_locates_every_mismatch() {
        let d = diffs(
            json!({"a": 1, "b": [1, 2], "c": "x"}),
            json!({"a": 2, "b": [1]}),
        );
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].starts_with("/a: expected 1, found 2"), "{d:?}");
        assert!(d[2].starts_with("/c: expected \"x\", key missing"), "{d:?}");
    }
}
