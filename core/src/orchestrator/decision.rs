//! Decision points (SPEC §6): reading a decision step's outcome and planning the steps it
//! creates. The store applies the plan in the transaction that records the decision's result.

use serde_json::Value;

use super::add_created_steps;
use crate::job::{ErrorType, StepFailure};
use crate::store::Expansion;
use crate::template::TaskTemplate;

/// Most step names one decision outcome may request.
pub const MAX_DECISION_STEPS: usize = 100;

/// A decision's outcome, as found in its result's `decision_point_outcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecisionOutcome {
    /// Create these steps (and what follows them inside the decision's branches).
    CreateSteps(Vec<String>),
    /// Create nothing.
    NoBranches,
}

impl DecisionOutcome {
    /// Reads the outcome from a decision step's result; the error says what is wrong with it.
    pub fn from_result(result: &Value) -> Result<Self, String> {
        const SHAPE: &str = "a decision step's result must hold decision_point_outcome: \
             {\"type\": \"create_steps\", \"step_names\": [...]} or {\"type\": \"no_branches\"}";
        let Some(outcome) = result.get("decision_point_outcome") else {
            return Err(format!("{SHAPE}; it has none"));
        };
        match outcome.get("type").and_then(Value::as_str) {
            Some("no_branches") => Ok(DecisionOutcome::NoBranches),
            Some("create_steps") => {
                let Some(names) = outcome.get("step_names").and_then(Value::as_array) else {
                    return Err(format!("{SHAPE}; create_steps has no step_names list"));
                };
                names
                    .iter()
                    .map(|n| {
                        n.as_str().map(str::to_string).ok_or_else(|| {
                            format!("{SHAPE}; step_names holds {n}, which is not a step name")
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(DecisionOutcome::CreateSteps)
            }
            _ => Err(format!("{SHAPE}; got {outcome}")),
        }
    }
}

/// The steps `decision`'s successful `result` creates in a task of `template`, with the edges
/// that tie them in; or, for an outcome that is malformed, names a step outside the decision's
/// branches, or names more than [`MAX_DECISION_STEPS`], the permanent `decision_error` that
/// fails the decision step instead.
pub fn plan_decision(
    template: &TaskTemplate,
    decision: &str,
    result: &Value,
) -> Result<Expansion, Box<StepFailure>> {
    let fail = |message: String| {
        let mut f = StepFailure::new(ErrorType::DecisionError, message);
        f.retryable = false;
        Box::new(f)
    };
    let requested = match DecisionOutcome::from_result(result) {
        Ok(DecisionOutcome::NoBranches) => return Ok(Expansion::default()),
        Ok(DecisionOutcome::CreateSteps(names)) => names,
        Err(e) => return Err(fail(format!("decision `{decision}`: {e}"))),
    };
    if requested.len() > MAX_DECISION_STEPS {
        return Err(fail(format!(
            "decision `{decision}` requested {} steps; at most {MAX_DECISION_STEPS} may be created by one decision",
            requested.len()
        )));
    }
    let allowed = template.decision_subgraph(decision);
    let mut unknown: Vec<&str> = requested
        .iter()
        .filter(|n| !allowed.contains(n))
        .map(String::as_str)
        .collect();
    unknown.dedup();
    if !unknown.is_empty() {
        return Err(fail(format!(
            "decision `{decision}` requested {} outside its branches: {}; it may create {}",
            if unknown.len() == 1 {
                "a step"
            } else {
                "steps"
            },
            unknown.join(", "),
            if allowed.is_empty() {
                "nothing".to_string()
            } else {
                allowed.join(", ")
            }
        )));
    }
    let creates = template.decision_creates(&requested);
    let mut expansion = Expansion::default();
    add_created_steps(&mut expansion, template, &creates, None);
    Ok(expansion)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::template::parse_str;

    fn approval() -> TaskTemplate {
        parse_str(
            r#"
name: approval
namespace_name: t
version: "1.0.0"
steps:
  - { name: validate, handler: { callable: k } }
  - { name: route, type: decision, dependencies: [validate], handler: { callable: k } }
  - { name: auto, dependencies: [route], handler: { callable: k } }
  - { name: manager, dependencies: [route], handler: { callable: k } }
  - { name: finance, dependencies: [route], handler: { callable: k } }
  - { name: notify_finance, dependencies: [finance], handler: { callable: k } }
  - name: finalize
    type: deferred_convergence
    dependencies: [auto, manager, notify_finance]
    handler: { callable: k }
"#,
            None,
            "t",
        )
        .unwrap()
        .template
    }

    fn names(x: &Expansion) -> Vec<&str> {
        x.steps.iter().map(|s| s.definition.name.as_str()).collect()
    }

    #[test]
    fn creates_requested_steps_their_descendants_and_convergence() {
        let t = approval();
        let x = plan_decision(
            &t,
            "route",
            &json!({"decision_point_outcome": {"type": "create_steps", "step_names": ["finance", "manager"]}}),
        )
        .unwrap();
        assert_eq!(
            names(&x),
            ["manager", "finance", "notify_finance", "finalize"]
        );
        assert!(x.edges.contains(&("route".into(), "finance".into())));
        assert!(
            x.edges
                .contains(&("notify_finance".into(), "finalize".into()))
        );
        // An edge to `auto`, which is not created, is offered; the store drops it.
        assert!(x.edges.contains(&("auto".into(), "finalize".into())));
    }

    #[test]
    fn no_branches_creates_nothing() {
        let t = approval();
        let x = plan_decision(
            &t,
            "route",
            &json!({"decision_point_outcome": {"type": "no_branches"}}),
        )
        .unwrap();
        assert!(x.steps.is_empty() && x.edges.is_empty());
    }

    #[test]
    fn bad_outcomes_fail_permanently_naming_what_is_wrong() {
        let t = approval();
        let cases = [
            (json!({"value": 1}), "has none"),
            (
                json!({"decision_point_outcome": {"type": "create_steps", "step_names": ["validate", "nope"]}}),
                "outside its branches: validate, nope",
            ),
            (
                json!({"decision_point_outcome": {"type": "create_steps", "step_names": "auto"}}),
                "no step_names list",
            ),
            (
                json!({"decision_point_outcome": {"type": "maybe"}}),
                "got {\"type\":\"maybe\"}",
            ),
            (
                json!({"decision_point_outcome": {"type": "create_steps", "step_names": vec!["auto"; 101]}}),
                "requested 101 steps; at most 100",
            ),
        ];
        for (result, expected) in cases {
            let f = plan_decision(&t, "route", &result).unwrap_err();
            assert_eq!(f.error_type, ErrorType::DecisionError);
            assert!(!f.retryable);
            assert!(
                f.message.contains(expected),
                "{} lacks {expected}",
                f.message
            );
        }
    }
}
