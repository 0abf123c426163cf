//! Batch processing (SPEC §7): planning the worker steps an analyzer's outcome creates. The
//! store applies the plan in the transaction that records the analyzer's result.

use serde_json::{Map, Value, json};

use super::{add_created_steps, new_uuid};
use crate::batch::{BatchOutcome, CursorConfig, NO_OP_BATCH_ID};
use crate::job::{ErrorType, StepFailure};
use crate::store::{Expansion, NewStep};
use crate::template::{StepDefinition, StepType, TaskTemplate};

/// Most workers one analyzer outcome may create.
pub const MAX_BATCH_WORKERS: usize = 10_000;

/// The steps `analyzer`'s successful `result` creates in a task of `template`: one worker per
/// cursor named `{template}_{batch_id}` (or the no-op placeholder `{template}_000` for
/// `no_batches`), every `deferred_convergence` step that depends on the worker template
/// (depending on all the workers) and what follows those. An outcome that is malformed, has no
/// cursors, names an unknown worker template, repeats a batch id or asks for more than
/// [`MAX_BATCH_WORKERS`] gives the permanent `batch_error` that fails the analyzer instead.
pub fn plan_batches(
    template: &TaskTemplate,
    analyzer: &str,
    result: &Value,
) -> Result<Expansion, Box<StepFailure>> {
    let fail = |message: String| {
        let mut f = StepFailure::new(ErrorType::BatchError, message);
        f.retryable = false;
        Box::new(f)
    };
    let outcome = BatchOutcome::from_result(result)
        .map_err(|e| fail(format!("batchable step `{analyzer}`: {e}")))?;
    let worker = worker_template(template, analyzer, outcome.worker_template_name())
        .map_err(|e| fail(format!("batchable step `{analyzer}`: {e}")))?;
    let (cursors, total_items, no_op) = match outcome {
        BatchOutcome::CreateBatches {
            cursor_configs,
            total_items,
            ..
        } => {
            if cursor_configs.is_empty() {
                return Err(fail(format!(
                    "batchable step `{analyzer}` returned create_batches with no cursor_configs; \
                     return no_batches when there is nothing to process"
                )));
            }
            if cursor_configs.len() > MAX_BATCH_WORKERS {
                return Err(fail(format!(
                    "batchable step `{analyzer}` asked for {} workers; at most {MAX_BATCH_WORKERS} \
                     may be created by one analyzer (use larger batches)",
                    cursor_configs.len()
                )));
            }
            (cursor_configs, total_items, false)
        }
        BatchOutcome::NoBatches { .. } => {
            let placeholder = CursorConfig {
                batch_id: NO_OP_BATCH_ID.into(),
                start_cursor: json!(0),
                end_cursor: json!(0),
                batch_size: 0,
            };
            (vec![placeholder], 0, true)
        }
    };
    let names: Vec<String> = cursors
        .iter()
        .map(|c| format!("{}_{}", worker.name, c.batch_id))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let repeated: Vec<&str> = cursors
        .iter()
        .filter(|c| !seen.insert(c.batch_id.as_str()))
        .map(|c| c.batch_id.as_str())
        .collect();
    if !repeated.is_empty() {
        return Err(fail(format!(
            "batchable step `{analyzer}` repeated batch ids: {}",
            repeated.join(", ")
        )));
    }
    let clashes: Vec<&str> = names
        .iter()
        .filter(|n| template.step(n).is_some())
        .map(String::as_str)
        .collect();
    if !clashes.is_empty() {
        return Err(fail(format!(
            "batchable step `{analyzer}`: worker names clash with steps of the template: {}",
            clashes.join(", ")
        )));
    }
    let config = worker.batch_config.clone().unwrap_or_default();
    let worker_count = if no_op { 0 } else { cursors.len() };
    let mut x = Expansion::default();
    for (cursor, name) in cursors.into_iter().zip(&names) {
        let mut definition = worker.clone();
        definition.name = name.clone();
        let mut inputs = Map::new();
        inputs.insert("cursor".into(), json!(cursor));
        inputs.insert("is_no_op".into(), json!(no_op));
        inputs.insert(
            "batch_metadata".into(),
            json!({
                "analyzer": analyzer,
                "worker_template": worker.name,
                "worker_count": worker_count,
                "total_items": total_items,
                "cursor_field": config.cursor_field,
                "failure_strategy": config.failure_strategy,
            }),
        );
        for parent in &worker.dependencies {
            x.edges.push((parent.clone(), name.clone()));
        }
        x.steps.push(NewStep {
            uuid: new_uuid(),
            definition,
            inputs,
            batch_group: Some(worker.name.clone()),
        });
    }
    let aggregators: Vec<String> = template
        .steps
        .iter()
        .filter(|s| {
            s.step_type == StepType::DeferredConvergence && s.dependencies.contains(&worker.name)
        })
        .map(|s| s.name.clone())
        .collect();
    let creates = template.decision_creates(&aggregators);
    add_created_steps(&mut x, template, &creates, Some((&worker.name, &names)));
    Ok(x)
}

/// The `batch_worker` step an analyzer's workers are made from: the one its outcome names
/// (which must depend on the analyzer), or else the only one that depends on the analyzer.
fn worker_template<'t>(
    template: &'t TaskTemplate,
    analyzer: &str,
    named: Option<&str>,
) -> Result<&'t StepDefinition, String> {
    let own: Vec<&StepDefinition> = template
        .steps
        .iter()
        .filter(|s| {
            s.step_type == StepType::BatchWorker && s.dependencies.iter().any(|d| d == analyzer)
        })
        .collect();
    let list = || {
        if own.is_empty() {
            "none depends on it".to_string()
        } else {
            own.iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    match named {
        Some(name) => own.iter().find(|s| s.name == name).copied().ok_or_else(|| {
            format!(
                "unknown worker template `{name}`: a worker template is a batch_worker step \
                     that depends on the analyzer (this analyzer's: {})",
                list()
            )
        }),
        None => match own.as_slice() {
            [one] => Ok(one),
            [] => Err("no batch_worker step depends on it, so it has no workers to create".into()),
            _ => Err(format!(
                "several batch_worker steps depend on it ({}); name one in worker_template_name",
                list()
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::create_batch_outcome;
    use crate::template::parse_str;

    fn csv() -> TaskTemplate {
        parse_str(
            r#"
name: csv
namespace_name: t
version: "1.0.0"
steps:
  - { name: analyze, type: batchable, handler: { callable: k } }
  - name: work
    type: batch_worker
    dependencies: [analyze]
    handler: { callable: w }
    batch_config: { batch_size: 200, parallelism: 2, failure_strategy: fail_fast }
  - { name: aggregate, type: deferred_convergence, dependencies: [work], handler: { callable: k } }
  - { name: report, dependencies: [aggregate], handler: { callable: k } }
"#,
            None,
            "t",
        )
        .unwrap()
        .template
    }

    fn outcome(o: crate::batch::BatchOutcome) -> Value {
        json!({ "batch_processing_outcome": o.to_value() })
    }

    #[test]
    fn creates_one_worker_per_cursor_and_the_aggregator_after_all_of_them() {
        let x = plan_batches(&csv(), "analyze", &outcome(create_batch_outcome(1000, 200))).unwrap();
        let names: Vec<&str> = x.steps.iter().map(|s| s.definition.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "work_001",
                "work_002",
                "work_003",
                "work_004",
                "work_005",
                "aggregate",
                "report"
            ]
        );
        let w = &x.steps[4];
        assert_eq!(w.batch_group.as_deref(), Some("work"));
        assert_eq!(w.definition.handler.callable, "w");
        assert_eq!(w.inputs["cursor"]["start_cursor"], 800);
        assert_eq!(w.inputs["batch_metadata"]["worker_count"], 5);
        assert_eq!(w.inputs["is_no_op"], false);
        for n in ["work_001", "work_005"] {
            assert!(x.edges.contains(&("analyze".into(), n.into())));
            assert!(x.edges.contains(&(n.into(), "aggregate".into())));
        }
        assert!(x.edges.contains(&("aggregate".into(), "report".into())));
        assert!(!x.edges.iter().any(|(p, _)| p == "work"));
    }

    #[test]
    fn no_batches_creates_the_placeholder_also_without_a_named_template() {
        let x = plan_batches(
            &csv(),
            "analyze",
            &json!({"batch_processing_outcome": {"type": "no_batches"}}),
        )
        .unwrap();
        let names: Vec<&str> = x.steps.iter().map(|s| s.definition.name.as_str()).collect();
        assert_eq!(names, ["work_000", "aggregate", "report"]);
        assert_eq!(x.steps[0].inputs["is_no_op"], true);
    }

    #[test]
    fn bad_outcomes_fail_permanently_with_batch_error() {
        let t = csv();
        let cases = [
            (json!({}), "it has none"),
            (
                json!({"batch_processing_outcome": {"type": "create_batches", "cursor_configs": []}}),
                "no cursor_configs",
            ),
            (
                outcome(create_batch_outcome(4, 2).with_worker_template("nope")),
                "unknown worker template `nope`",
            ),
            (
                outcome(create_batch_outcome(4, 2).with_worker_template("aggregate")),
                "unknown worker template `aggregate`",
            ),
            (
                json!({"batch_processing_outcome": {"type": "create_batches", "cursor_configs": [
                    {"batch_id": "001", "start_cursor": 0, "end_cursor": 1},
                    {"batch_id": "001", "start_cursor": 1, "end_cursor": 2}]}}),
                "repeated batch ids: 001",
            ),
            (
                outcome(create_batch_outcome(MAX_BATCH_WORKERS as u64 + 1, 1)),
                "at most 10000",
            ),
        ];
        for (result, expected) in cases {
            let f = plan_batches(&t, "analyze", &result).unwrap_err();
            assert_eq!(f.error_type, ErrorType::BatchError);
            assert!(!f.retryable);
            assert!(
                f.message.contains(expected),
                "{} lacks {expected}",
                f.message
            );
        }
    }
}
