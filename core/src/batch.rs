//! Batch processing (SPEC §7), the handler-facing half: cursor ranges, the outcome a
//! `batchable` analyzer returns, a batch worker's view of its batch, and how an aggregator
//! finds its workers' results. Every host language's Batchable mixin wraps these; the steps an
//! outcome creates are planned by the orchestrator ([`crate::orchestrator::plan_batches`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::job::{Checkpoint, StepJob};

/// The batch id of the placeholder worker a `no_batches` outcome creates.
pub const NO_OP_BATCH_ID: &str = "000";

/// One batch of work: items from `start_cursor` (inclusive) to `end_cursor` (exclusive).
/// Cursors are any JSON (numbers, keys, timestamps); only the handler interprets them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CursorConfig {
    /// `"001"`, `"002"`, …; names the worker step `{template}_{batch_id}`.
    pub batch_id: String,
    /// First item of the batch.
    pub start_cursor: Value,
    /// Item after the last one of the batch.
    pub end_cursor: Value,
    /// Items in the batch.
    #[serde(default)]
    pub batch_size: u64,
}

/// The batch id of batch number `n` (1-based): three digits at least, `"001"`.
pub fn batch_id(n: usize) -> String {
    format!("{n:03}")
}

/// What an analyzer decided (the wire form is its result's `batch_processing_outcome`).
#[derive(Debug, Clone, PartialEq)]
pub enum BatchOutcome {
    /// Create one worker per cursor.
    CreateBatches {
        /// The `batch_worker` step the workers are made from; `None`: the one that depends on
        /// the analyzer.
        worker_template_name: Option<String>,
        /// One entry per worker.
        cursor_configs: Vec<CursorConfig>,
        /// Items over all batches.
        total_items: u64,
    },
    /// Nothing to do: one no-op placeholder worker is created so aggregators still run.
    NoBatches {
        /// Why, for people.
        reason: Option<String>,
        /// As for `CreateBatches`.
        worker_template_name: Option<String>,
    },
}

/// Cursor ranges that split `total_items` integer-indexed items (`0..total_items`) into
/// batches of `batch_size` (the last one may be smaller); `no_batches` when there is nothing
/// to do. A `batch_size` of 0 is taken as 1.
pub fn create_batch_outcome(total_items: u64, batch_size: u64) -> BatchOutcome {
    if total_items == 0 {
        return BatchOutcome::NoBatches {
            reason: Some("no items to process".into()),
            worker_template_name: None,
        };
    }
    let size = batch_size.max(1);
    let cursor_configs = (0..total_items.div_ceil(size))
        .map(|i| {
            let start = i * size;
            let end = (start + size).min(total_items);
            CursorConfig {
                batch_id: batch_id(i as usize + 1),
                start_cursor: json!(start),
                end_cursor: json!(end),
                batch_size: end - start,
            }
        })
        .collect();
    BatchOutcome::CreateBatches {
        worker_template_name: None,
        cursor_configs,
        total_items,
    }
}

impl BatchOutcome {
    /// The same outcome with the worker template named.
    pub fn with_worker_template(mut self, name: impl Into<String>) -> Self {
        match &mut self {
            BatchOutcome::CreateBatches {
                worker_template_name,
                ..
            }
            | BatchOutcome::NoBatches {
                worker_template_name,
                ..
            } => *worker_template_name = Some(name.into()),
        }
        self
    }

    /// The worker template named by the outcome, if any.
    pub fn worker_template_name(&self) -> Option<&str> {
        match self {
            BatchOutcome::CreateBatches {
                worker_template_name,
                ..
            }
            | BatchOutcome::NoBatches {
                worker_template_name,
                ..
            } => worker_template_name.as_deref(),
        }
    }

    /// The wire form (SPEC §7), the value of a result's `batch_processing_outcome`.
    pub fn to_value(&self) -> Value {
        let mut v = match self {
            BatchOutcome::CreateBatches {
                cursor_configs,
                total_items,
                ..
            } => json!({
                "type": "create_batches",
                "worker_count": cursor_configs.len(),
                "cursor_configs": cursor_configs,
                "total_items": total_items,
            }),
            BatchOutcome::NoBatches { reason, .. } => {
                let mut v = json!({ "type": "no_batches" });
                if let Some(r) = reason {
                    v["reason"] = json!(r);
                }
                v
            }
        };
        if let Some(name) = self.worker_template_name() {
            v["worker_template_name"] = json!(name);
        }
        v
    }

    /// Reads the outcome from an analyzer's result; the error says what is wrong with it.
    pub fn from_result(result: &Value) -> Result<Self, String> {
        const SHAPE: &str = "a batchable step's result must hold batch_processing_outcome: \
             {\"type\": \"create_batches\", \"cursor_configs\": [...], ...} or \
             {\"type\": \"no_batches\"}";
        let Some(outcome) = result.get("batch_processing_outcome") else {
            return Err(format!("{SHAPE}; it has none"));
        };
        let worker_template_name = match outcome.get("worker_template_name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => return Err(format!("worker_template_name {other} is not a step name")),
        };
        match outcome.get("type").and_then(Value::as_str) {
            Some("no_batches") => Ok(BatchOutcome::NoBatches {
                reason: outcome
                    .get("reason")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                worker_template_name,
            }),
            Some("create_batches") => {
                let Some(list) = outcome.get("cursor_configs").and_then(Value::as_array) else {
                    return Err(format!(
                        "{SHAPE}; create_batches has no cursor_configs list"
                    ));
                };
                let mut cursor_configs = Vec::with_capacity(list.len());
                for (i, c) in list.iter().enumerate() {
                    let mut c = c.clone();
                    // A missing batch id is the cursor's position; a numeric one is padded.
                    match c.get("batch_id") {
                        None | Some(Value::Null) => c["batch_id"] = json!(batch_id(i + 1)),
                        Some(Value::Number(n)) => {
                            c["batch_id"] = json!(batch_id(n.as_u64().unwrap_or(0) as usize))
                        }
                        _ => {}
                    }
                    let cursor: CursorConfig = serde_json::from_value(c.clone())
                        .map_err(|e| format!("cursor_configs[{i}] = {c} is not a cursor: {e}"))?;
                    cursor_configs.push(cursor);
                }
                let total_items = outcome
                    .get("total_items")
                    .and_then(Value::as_u64)
                    .unwrap_or_else(|| cursor_configs.iter().map(|c| c.batch_size).sum());
                Ok(BatchOutcome::CreateBatches {
                    worker_template_name,
                    cursor_configs,
                    total_items,
                })
            }
            _ => Err(format!("{SHAPE}; got {outcome}")),
        }
    }
}

/// A batch worker's view of its batch, read from its step inputs (`cursor`,
/// `batch_metadata`, `is_no_op`) and the last checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchWorkerContext {
    /// The batch this worker processes.
    pub cursor: CursorConfig,
    /// True for the placeholder of a `no_batches` outcome (its handler is never called: the
    /// engine completes it).
    pub is_no_op: bool,
    /// `analyzer`, `worker_template`, `worker_count`, `total_items`, `cursor_field`,
    /// `failure_strategy`.
    pub batch_metadata: Map<String, Value>,
    /// The last checkpoint, when the worker yielded one before (in this attempt or an earlier
    /// one).
    pub checkpoint: Option<Checkpoint>,
}

impl BatchWorkerContext {
    /// The batch of a job; `None` for a step that is not a batch worker.
    pub fn from_job(job: &StepJob) -> Option<Self> {
        let cursor: CursorConfig =
            serde_json::from_value(job.inputs.get("cursor")?.clone()).ok()?;
        Some(BatchWorkerContext {
            cursor,
            is_no_op: job.inputs.get("is_no_op").and_then(Value::as_bool) == Some(true),
            batch_metadata: job
                .inputs
                .get("batch_metadata")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
            checkpoint: job.checkpoint.clone(),
        })
    }

    /// The batch id (`"001"`).
    pub fn batch_id(&self) -> &str {
        &self.cursor.batch_id
    }

    /// Where to start: the last checkpoint's cursor, or the batch's start.
    pub fn resume_cursor(&self) -> &Value {
        self.checkpoint
            .as_ref()
            .map_or(&self.cursor.start_cursor, |c| &c.cursor)
    }

    /// Items already processed according to the last checkpoint (0 without one).
    pub fn items_processed(&self) -> u64 {
        self.checkpoint.as_ref().map_or(0, |c| c.items_processed)
    }

    /// Partial results carried by the last checkpoint (`null` without one).
    pub fn accumulated(&self) -> &Value {
        self.checkpoint
            .as_ref()
            .map_or(&Value::Null, |c| &c.accumulated)
    }
}

/// The result the engine records for a no-op placeholder worker.
pub(crate) fn no_op_result(job: &StepJob) -> Option<Value> {
    let ctx = BatchWorkerContext::from_job(job)?;
    ctx.is_no_op.then(|| {
        json!({
            "batch_id": ctx.cursor.batch_id,
            "is_no_op": true,
            "items_processed": 0,
        })
    })
}

/// What an aggregator sees of its analyzer's fan-out.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchAggregationScenario {
    /// The analyzer decided `no_batches` (only the placeholder ran).
    pub is_no_batches: bool,
    /// The analyzer's result.
    pub analyzer_result: Option<Value>,
    /// Results of the real workers, by step name.
    pub batch_results: BTreeMap<String, Value>,
    /// How many workers the analyzer asked for (`worker_count` of its outcome).
    pub worker_count: usize,
    /// Errors of workers that failed for good (`failure_strategy: isolate`), by step name.
    pub failed_batches: BTreeMap<String, Value>,
}

impl BatchAggregationScenario {
    /// Finds the analyzer's outcome and the results of the workers whose step names start
    /// with `worker_prefix` (e.g. `process_csv_batch_`) among `dependency_results`.
    pub fn detect(
        dependency_results: &Map<String, Value>,
        analyzer: &str,
        worker_prefix: &str,
    ) -> Self {
        let analyzer_result = dependency_results.get(analyzer).cloned();
        let outcome = analyzer_result
            .as_ref()
            .and_then(|r| BatchOutcome::from_result(r).ok());
        let batch_results: BTreeMap<String, Value> = dependency_results
            .iter()
            .filter(|(name, result)| {
                name.starts_with(worker_prefix)
                    && result.get("is_no_op").and_then(Value::as_bool) != Some(true)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let (is_no_batches, worker_count) = match &outcome {
            Some(BatchOutcome::NoBatches { .. }) => (true, 0),
            Some(BatchOutcome::CreateBatches { cursor_configs, .. }) => {
                (false, cursor_configs.len())
            }
            None => (batch_results.is_empty(), batch_results.len()),
        };
        BatchAggregationScenario {
            is_no_batches,
            analyzer_result,
            batch_results,
            worker_count,
            failed_batches: BTreeMap::new(),
        }
    }

    /// [`BatchAggregationScenario::detect`] on an aggregator's context, with the workers that
    /// failed for good under `failure_strategy: isolate` in `failed_batches`.
    pub fn from_context(
        ctx: &crate::worker::StepContext,
        analyzer: &str,
        worker_prefix: &str,
    ) -> Self {
        let mut s = Self::detect(ctx.dependency_results(), analyzer, worker_prefix);
        s.failed_batches = ctx
            .failed_dependencies()
            .iter()
            .filter(|(name, _)| name.starts_with(worker_prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_ranges_cover_every_item_once() {
        let BatchOutcome::CreateBatches {
            cursor_configs,
            total_items,
            ..
        } = create_batch_outcome(1000, 200)
        else {
            panic!("expected batches");
        };
        assert_eq!(total_items, 1000);
        assert_eq!(cursor_configs.len(), 5);
        assert_eq!(cursor_configs[0].batch_id, "001");
        assert_eq!(cursor_configs[4].batch_id, "005");
        assert_eq!(cursor_configs[4].start_cursor, json!(800));
        assert_eq!(cursor_configs[4].end_cursor, json!(1000));
        let BatchOutcome::CreateBatches { cursor_configs, .. } = create_batch_outcome(7, 3) else {
            panic!("expected batches");
        };
        let sizes: Vec<u64> = cursor_configs.iter().map(|c| c.batch_size).collect();
        assert_eq!(sizes, [3, 3, 1]);
        assert!(matches!(
            create_batch_outcome(0, 10),
            BatchOutcome::NoBatches { .. }
        ));
    }

    #[test]
    fn the_wire_form_reads_back() {
        for outcome in [
            create_batch_outcome(10, 4).with_worker_template("work"),
            BatchOutcome::NoBatches {
                reason: Some("empty".into()),
                worker_template_name: None,
            },
        ] {
            let result = json!({ "batch_processing_outcome": outcome.to_value() });
            assert_eq!(BatchOutcome::from_result(&result).unwrap(), outcome);
        }
        let v = create_batch_outcome(10, 4).to_value();
        assert_eq!(v["type"], "create_batches");
        assert_eq!(v["worker_count"], 3);
    }

    #[test]
    fn malformed_outcomes_say_what_is_wrong() {
        for (result, expected) in [
            (json!({}), "it has none"),
            (
                json!({"batch_processing_outcome": {"type": "create_batches"}}),
                "no cursor_configs list",
            ),
            (
                json!({"batch_processing_outcome": {"type": "create_batches", "cursor_configs": [{"batch_id": "001"}]}}),
                "cursor_configs[0]",
            ),
            (
                json!({"batch_processing_outcome": {"type": "many"}}),
                "got {\"type\":\"many\"}",
            ),
        ] {
            let e = BatchOutcome::from_result(&result).unwrap_err();
            assert!(e.contains(expected), "{e} lacks {expected}");
        }
        // Batch ids default to positions and numbers are padded.
        let r = json!({"batch_processing_outcome": {"type": "create_batches", "cursor_configs": [
            {"start_cursor": 0, "end_cursor": 5}, {"batch_id": 7, "start_cursor": 5, "end_cursor": 9}]}});
        let BatchOutcome::CreateBatches { cursor_configs, .. } =
            BatchOutcome::from_result(&r).unwrap()
        else {
            panic!("expected batches");
        };
        assert_eq!(cursor_configs[0].batch_id, "001");
        assert_eq!(cursor_configs[1].batch_id, "007");
    }

    #[test]
    fn aggregation_tells_no_batches_from_batches() {
        let mut deps = Map::new();
        deps.insert(
            "analyze".into(),
            json!({"batch_processing_outcome": {"type": "no_batches"}}),
        );
        deps.insert("work_000".into(), json!({"is_no_op": true}));
        let s = BatchAggregationScenario::detect(&deps, "analyze", "work_");
        assert!(s.is_no_batches);
        assert!(s.batch_results.is_empty());

        let mut deps = Map::new();
        deps.insert(
            "analyze".into(),
            json!({"batch_processing_outcome": create_batch_outcome(4, 2).to_value()}),
        );
        deps.insert("work_001".into(), json!({"n": 2}));
        deps.insert("work_002".into(), json!({"n": 2}));
        deps.insert("other".into(), json!({"n": 9}));
        let s = BatchAggregationScenario::detect(&deps, "analyze", "work_");
        assert!(!s.is_no_batches);
        assert_eq!(s.worker_count, 2);
        assert_eq!(
            s.batch_results.keys().collect::<Vec<_>>(),
            ["work_001", "work_002"]
        );
    }
}
