//! The Rust handler kit (SPEC §13): small, deterministic handlers that conformance scenarios
//! are built from. Every host language implements the same callables with the same
//! `handler.initialization` options and result shapes; `tests/README.md` is the contract.
//!
//! Arithmetic handlers read their input from the step's *direct* parents (the `dependencies`
//! of the step definition), not from every ancestor in `dependency_results`: a diamond's sink
//! must see `b` and `c`, not `start` as well.
//!
//! Every kit handler appends its invocation to an in-process log keyed by task uuid before it
//! does anything else, so runners can count how often a step really ran
//! ([`invocations`], [`executions`]). With `TASKER_KIT_INVOCATION_LOG=FILE` it also appends a
//! line `task_uuid step_name pid` to that file, so tests that run workers as separate processes
//! can count across them.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tasker_core::{
    BatchAggregationScenario, BatchWorkerContext, ErrorType, StepContext, StepHandler, StepOutcome,
    Tasker, handler_fn,
};

/// Largest magnitude the kit's arithmetic accepts: the largest integer every host language
/// (JavaScript included) represents exactly, so all kits agree on every result.
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// Error code of a kit handler that got input it cannot use (missing or non-integer value).
pub const BAD_INPUT: &str = "KIT_BAD_INPUT";
/// Error code of an arithmetic result beyond [`MAX_SAFE_INTEGER`].
pub const OVERFLOW: &str = "KIT_OVERFLOW";
/// Default error code of `kit.fail` and `kit.fail_always`.
pub const INJECTED: &str = "KIT_INJECTED_FAILURE";

/// Every callable the kit provides.
pub const CALLABLES: [&str; 14] = [
    "kit.square",
    "kit.sum_parents",
    "kit.multiply_parents",
    "kit.sleep",
    "kit.fail",
    "kit.fail_always",
    "kit.record",
    "kit.echo",
    "kit.decide",
    "kit.count",
    "kit.batch_analyze",
    "kit.batch_work",
    "kit.checkpointing_work",
    "kit.aggregate",
];

/// task uuid -> step names, one entry per handler invocation, in invocation order.
static LOG: LazyLock<Mutex<HashMap<String, Vec<String>>>> = LazyLock::new(Default::default);

/// Step names of every kit handler invocation of `task_uuid`, in the order they started.
pub fn invocations(task_uuid: &str) -> Vec<String> {
    LOG.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(task_uuid)
        .cloned()
        .unwrap_or_default()
}

/// How many times a kit handler ran for `step` of `task_uuid`.
pub fn executions(task_uuid: &str, step: &str) -> usize {
    LOG.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(task_uuid)
        .map_or(0, |v| v.iter().filter(|s| *s == step).count())
}

/// Records one invocation and returns how many times this step has run so far (1-based).
fn record(ctx: &StepContext) -> usize {
    if let Some(path) = std::env::var_os("TASKER_KIT_INVOCATION_LOG") {
        use std::io::Write;
        let line = format!(
            "{} {} {}\n",
            ctx.task_uuid(),
            ctx.step_name(),
            std::process::id()
        );
        // One append of a short line is atomic among processes appending to the same file.
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            tracing::error!("cannot append to TASKER_KIT_INVOCATION_LOG: {e}");
        }
    }
    let mut log = LOG.lock().unwrap_or_else(|e| e.into_inner());
    let entries = log.entry(ctx.task_uuid().to_string()).or_default();
    entries.push(ctx.step_name().to_string());
    entries.iter().filter(|s| *s == ctx.step_name()).count()
}

/// Registers every `kit.*` handler on `tasker`.
pub fn register_handlers(tasker: &Tasker) {
    for callable in CALLABLES {
        tasker.register_handler(callable, handler(callable));
    }
}

/// The handler for one kit callable. A name outside [`CALLABLES`] gives a handler that fails
/// with `handler_not_found` naming the known callables.
pub fn handler(callable: &str) -> Arc<dyn StepHandler> {
    let name = callable.to_string();
    handler_fn(move |ctx| {
        let name = name.clone();
        async move {
            let execution = record(&ctx);
            match run(&name, &ctx, execution).await {
                Ok(result) => StepOutcome::success(result),
                Err(outcome) => *outcome,
            }
        }
    })
}

/// A kit handler's result; the failure is boxed because a `StepOutcome` is large.
type KitResult = Result<Value, Box<StepOutcome>>;

async fn run(callable: &str, ctx: &StepContext, execution: usize) -> KitResult {
    match callable {
        "kit.square" => square(ctx),
        "kit.sum_parents" => fold_parents(ctx, 0, i64::checked_add),
        "kit.multiply_parents" => fold_parents(ctx, 1, i64::checked_mul),
        "kit.sleep" => sleep(ctx).await,
        "kit.fail" => fail(ctx, execution),
        "kit.fail_always" => Err(failure(ctx, "kit.fail_always: failing as configured")),
        "kit.record" => Ok(json!({ "recorded": true, "execution": execution })),
        "kit.echo" => Ok(echo(ctx)),
        "kit.decide" => decide(ctx),
        "kit.count" => count(ctx),
        "kit.batch_analyze" => batch_analyze(ctx),
        "kit.batch_work" => batch_work(ctx),
        "kit.checkpointing_work" => checkpointing_work(ctx),
        "kit.aggregate" => aggregate(ctx),
        other => Err(Box::new(StepOutcome::failure(
            format!(
                "`{other}` is not a kit callable (known: {})",
                CALLABLES.join(", ")
            ),
            ErrorType::HandlerNotFound,
        ))),
    }
}

/// `kit.square`: the single direct parent's `value`, or with no parents the context field
/// named by `field` (default `even_number`), squared.
fn square(ctx: &StepContext) -> KitResult {
    let parents = &ctx.job().definition.dependencies;
    let x = match parents.as_slice() {
        [] => {
            let field = ctx
                .get_config("field")
                .and_then(Value::as_str)
                .unwrap_or("even_number");
            let v = ctx.get_input(field).ok_or_else(|| {
                bad_input(format!("kit.square: the task context has no `{field}`"))
            })?;
            integer(v).ok_or_else(|| {
                bad_input(format!(
                    "kit.square: context `{field}` = {v} is not an integer"
                ))
            })?
        }
        [parent] => parent_value(ctx, parent)?
            .ok_or_else(|| bad_input(format!("kit.square: parent `{parent}` has no result")))?,
        many => {
            return Err(bad_input(format!(
                "kit.square takes one parent, this step has {} ({}); use kit.multiply_parents",
                many.len(),
                many.join(", ")
            )));
        }
    };
    checked(x.checked_mul(x)).map(|v| json!({ "value": v }))
}

/// `kit.sum_parents` / `kit.multiply_parents`: folds the `value` of every direct parent that
/// has a result (a parent resolved manually has none and is skipped), then squares the total
/// when `then_square: true`.
fn fold_parents(ctx: &StepContext, start: i64, op: fn(i64, i64) -> Option<i64>) -> KitResult {
    let mut acc = start;
    for parent in &ctx.job().definition.dependencies {
        if let Some(v) = parent_value(ctx, parent)? {
            acc = checked(op(acc, v))?;
        }
    }
    if ctx
        .get_config("then_square")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        acc = checked(acc.checked_mul(acc))?;
    }
    Ok(json!({ "value": acc }))
}

/// `kit.sleep {ms}`: sleeps, then succeeds. Cancellation (timeout) simply drops the future.
async fn sleep(ctx: &StepContext) -> KitResult {
    let ms = ctx.get_config("ms").and_then(Value::as_u64).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(json!({ "slept_ms": ms }))
}

/// `kit.fail {times, count}`: fails while the count is at most `times`, then succeeds. The
/// count is the attempt number (`count: attempts`, the default: stateless, survives a worker
/// restart) or the number of executions of this step in this task (`count: executions`: keeps
/// counting across an operator's `reset_step`, which sets attempts back to 0).
fn fail(ctx: &StepContext, execution: usize) -> KitResult {
    let times = ctx.get_config("times").and_then(Value::as_u64).unwrap_or(1);
    let count = match ctx
        .get_config("count")
        .and_then(Value::as_str)
        .unwrap_or("attempts")
    {
        "attempts" => u64::from(ctx.attempts()),
        "executions" => execution as u64,
        other => {
            return Err(bad_input(format!(
                "kit.fail: `count: {other}`: expected attempts or executions"
            )));
        }
    };
    if count <= times {
        Err(failure(
            ctx,
            &format!("kit.fail: failing {count} of {times}"),
        ))
    } else {
        Ok(json!({ "attempt": ctx.attempts(), "execution": execution }))
    }
}

/// `kit.decide`: a decision on the number at context field `field`. `routes` is a list of
/// `{below: N, steps: [...]}` tried in order (a route without `below` always matches); the
/// first route whose `below` is greater than the value names the steps to create. A route
/// with `steps: []` creates nothing (`no_branches`). No matching route is a
/// `decision_failure`.
fn decide(ctx: &StepContext) -> KitResult {
    if let Some(routes) = ctx.get_config("by_largest_parent") {
        return decide_by_parent(ctx, routes);
    }
    let field = ctx
        .get_config("field")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_input("kit.decide needs `field`".into()))?;
    let value = ctx
        .get_input(field)
        .and_then(Value::as_f64)
        .ok_or_else(|| bad_input(format!("kit.decide: context `{field}` is not a number")))?;
    let routes = ctx
        .get_config("routes")
        .and_then(Value::as_array)
        .ok_or_else(|| bad_input("kit.decide needs `routes`".into()))?;
    for route in routes {
        let matches = match route.get("below") {
            None => true,
            Some(b) => b.as_f64().is_some_and(|b| value < b),
        };
        if !matches {
            continue;
        }
        let steps: Vec<&str> = route
            .get("steps")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let outcome = if steps.is_empty() {
            StepOutcome::skip_branches(format!("{field} = {value}: no route creates steps"))
        } else {
            StepOutcome::decision_success(steps, json!({ field: value }))
        };
        return match outcome {
            StepOutcome::Success { result, .. } => Ok(result),
            other => Err(Box::new(other)),
        };
    }
    Err(Box::new(StepOutcome::decision_failure(format!(
        "kit.decide: no route for {field} = {value}"
    ))))
}

/// `kit.decide` with `by_largest_parent: {parent: [steps]}`: the direct parent with the largest
/// `value` (the first listed on a tie) decides which steps to create.
fn decide_by_parent(ctx: &StepContext, routes: &Value) -> KitResult {
    let routes = routes.as_object().ok_or_else(|| {
        bad_input("kit.decide: `by_largest_parent` must map parents to steps".into())
    })?;
    let mut best: Option<(&String, i64)> = None;
    for parent in routes.keys() {
        let v = parent_value(ctx, parent)?.unwrap_or(i64::MIN);
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((parent, v));
        }
    }
    let (parent, value) =
        best.ok_or_else(|| bad_input("kit.decide: `by_largest_parent` is empty".into()))?;
    let steps: Vec<&str> = routes[parent]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    match StepOutcome::decision_success(steps, json!({ "largest_parent": parent, "value": value }))
    {
        StepOutcome::Success { result, .. } => Ok(result),
        other => Err(Box::new(other)),
    }
}

/// `kit.count`: how many numbers of the context array `field` have parity `parity` (`even`,
/// `odd`, default every number).
fn count(ctx: &StepContext) -> KitResult {
    let field = ctx
        .get_config("field")
        .and_then(Value::as_str)
        .unwrap_or("numbers");
    let items = ctx
        .get_input(field)
        .and_then(Value::as_array)
        .ok_or_else(|| bad_input(format!("kit.count: context `{field}` is not an array")))?;
    let parity = ctx.get_config("parity").and_then(Value::as_str);
    let n = items
        .iter()
        .filter_map(integer)
        .filter(|v| match parity {
            Some("even") => v % 2 == 0,
            Some("odd") => v % 2 != 0,
            _ => true,
        })
        .count();
    Ok(json!({ "value": n }))
}

/// The data rows of the CSV file whose path is in context field `field` (the header row is
/// not counted).
fn csv_rows(ctx: &StepContext, field: &str) -> Result<Vec<String>, Box<StepOutcome>> {
    let path = ctx
        .get_input(field)
        .and_then(Value::as_str)
        .ok_or_else(|| bad_input(format!("context `{field}` is not a file path")))?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad_input(format!("cannot read the CSV file {path}: {e}")))?;
    Ok(text
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect())
}

/// `kit.batch_analyze`: splits the items into batches of `batch_size` (default 100). The
/// item count comes from `csv_field` (a context field holding a CSV file path: its data
/// rows), `total_parent` (a direct parent's `value`) or `total_field` (a context field holding
/// a number or an array). No items ⇒ `no_batches`. `worker_template` names the worker
/// template (default: the one that depends on this step).
fn batch_analyze(ctx: &StepContext) -> KitResult {
    let total = if let Some(field) = ctx.get_config("csv_field").and_then(Value::as_str) {
        csv_rows(ctx, field)?.len() as u64
    } else if let Some(parent) = ctx.get_config("total_parent").and_then(Value::as_str) {
        parent_value(ctx, parent)?.unwrap_or(0).max(0) as u64
    } else {
        let field = ctx
            .get_config("total_field")
            .and_then(Value::as_str)
            .unwrap_or("total_items");
        match ctx.get_input(field) {
            Some(Value::Array(a)) => a.len() as u64,
            Some(v) => integer(v).filter(|n| *n >= 0).ok_or_else(|| {
                bad_input(format!(
                    "kit.batch_analyze: context `{field}` = {v} is not a count"
                ))
            })? as u64,
            None => {
                return Err(bad_input(format!(
                    "kit.batch_analyze: the task context has no `{field}`"
                )));
            }
        }
    };
    let size = ctx
        .get_config("batch_size")
        .and_then(Value::as_u64)
        .unwrap_or(100);
    let mut outcome = tasker_core::batch::create_batch_outcome(total, size);
    if let Some(t) = ctx.get_config("worker_template").and_then(Value::as_str) {
        outcome = outcome.with_worker_template(t);
    }
    match StepOutcome::batch_analyzer_success(outcome) {
        StepOutcome::Success { result, .. } => Ok(result),
        other => Err(Box::new(other)),
    }
}

/// The batch of a batch worker, or a bad-input failure for any other step.
fn batch_of(ctx: &StepContext, callable: &str) -> Result<BatchWorkerContext, Box<StepOutcome>> {
    ctx.batch()
        .ok_or_else(|| bad_input(format!("{callable} runs only as a batch worker")))
}

/// An integer cursor.
fn cursor(v: &Value, what: &str) -> Result<u64, Box<StepOutcome>> {
    v.as_u64().ok_or_else(|| {
        bad_input(format!(
            "the {what} cursor {v} is not a non-negative integer"
        ))
    })
}

/// `kit.batch_work`: processes items `start_cursor..end_cursor`: with `csv_field`, reads those
/// data rows of the CSV file and counts them (and sums column `sum_column`, if given, into
/// `sum`); otherwise counts the range. Result `{batch_id, items_processed, sum?}`.
fn batch_work(ctx: &StepContext) -> KitResult {
    let batch = batch_of(ctx, "kit.batch_work")?;
    let start = cursor(&batch.cursor.start_cursor, "start")? as usize;
    let end = cursor(&batch.cursor.end_cursor, "end")? as usize;
    let mut result = json!({ "batch_id": batch.batch_id() });
    if let Some(field) = ctx.get_config("csv_field").and_then(Value::as_str) {
        let rows = csv_rows(ctx, field)?;
        let mine = rows.get(start..end.min(rows.len())).unwrap_or_default();
        result["items_processed"] = json!(mine.len());
        if let Some(col) = ctx.get_config("sum_column").and_then(Value::as_u64) {
            let sum: i64 = mine
                .iter()
                .filter_map(|r| r.split(',').nth(col as usize)?.trim().parse::<i64>().ok())
                .sum();
            result["sum"] = json!(sum);
        }
    } else {
        result["items_processed"] = json!(end.saturating_sub(start));
    }
    match StepOutcome::batch_worker_success(&batch, result) {
        StepOutcome::Success { result, .. } => Ok(result),
        other => Err(Box::new(other)),
    }
}

/// task uuid / step name -> items processed by `kit.checkpointing_work`, in order.
static ITEMS: LazyLock<Mutex<HashMap<String, Vec<u64>>>> = LazyLock::new(Default::default);

/// Items `kit.checkpointing_work` processed for `step` of `task_uuid`, in processing order.
pub fn processed_items(task_uuid: &str, step: &str) -> Vec<u64> {
    ITEMS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&format!("{task_uuid}/{step}"))
        .cloned()
        .unwrap_or_default()
}

/// `kit.checkpointing_work`: a batch worker that processes its items one by one from the last
/// checkpoint (or its start), yields a checkpoint every `every` items (default 25), and on
/// attempt `fail_on_attempt` (default 1) fails with a retryable error once `fail_after` items
/// (counted over all its runs) are done. Result `{batch_id, items_processed, resumed_from,
/// processed_twice}`, where `resumed_from` is the cursor the last attempt started at and
/// `processed_twice` counts items this step processed more than once (0 when checkpoints
/// work).
fn checkpointing_work(ctx: &StepContext) -> KitResult {
    let batch = batch_of(ctx, "kit.checkpointing_work")?;
    let end = cursor(&batch.cursor.end_cursor, "end")?;
    let mut at = cursor(batch.resume_cursor(), "resume")?;
    let every = ctx
        .get_config("every")
        .and_then(Value::as_u64)
        .unwrap_or(25)
        .max(1);
    let fail_after = ctx.get_config("fail_after").and_then(Value::as_u64);
    let fail_on = ctx
        .get_config("fail_on_attempt")
        .and_then(Value::as_u64)
        .unwrap_or(1);
    let mut done = batch.items_processed();
    let first_of_attempt = batch.accumulated().get("attempt").and_then(Value::as_u64)
        != Some(u64::from(ctx.attempts()));
    let resumed_from = if first_of_attempt {
        at
    } else {
        batch.accumulated()["resumed_from"].as_u64().unwrap_or(at)
    };
    let key = format!("{}/{}", ctx.task_uuid(), ctx.step_name());
    let mut processed_now = 0;
    while at < end {
        if fail_after.is_some_and(|f| done >= f) && u64::from(ctx.attempts()) == fail_on {
            return Err(Box::new(
                StepOutcome::retryable(format!(
                    "kit.checkpointing_work: failing after {done} items as configured"
                ))
                .with_error_code(INJECTED),
            ));
        }
        ITEMS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .push(at);
        at += 1;
        done += 1;
        processed_now += 1;
        if processed_now == every && at < end {
            return Err(Box::new(StepOutcome::checkpoint_yield(
                json!(at),
                done,
                json!({ "attempt": ctx.attempts(), "resumed_from": resumed_from }),
            )));
        }
    }
    let items = processed_items(ctx.task_uuid(), ctx.step_name());
    let distinct: std::collections::HashSet<&u64> = items.iter().collect();
    let result = json!({
        "batch_id": batch.batch_id(),
        "items_processed": done,
        "resumed_from": resumed_from,
        "processed_twice": items.len() - distinct.len(),
    });
    match StepOutcome::batch_worker_success(&batch, result) {
        StepOutcome::Success { result, .. } => Ok(result),
        other => Err(Box::new(other)),
    }
}

/// `kit.aggregate`: sums the `items_processed` of the workers of analyzer `analyzer` whose
/// names start with `prefix` (the no-op placeholder aside). Result `{total_processed,
/// worker_count, no_batches, failed_batches}`.
fn aggregate(ctx: &StepContext) -> KitResult {
    let analyzer = ctx
        .get_config("analyzer")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_input("kit.aggregate needs `analyzer`".into()))?;
    let prefix = ctx
        .get_config("prefix")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_input("kit.aggregate needs `prefix`".into()))?;
    let scenario = BatchAggregationScenario::from_context(ctx, analyzer, prefix);
    let total: u64 = scenario
        .batch_results
        .values()
        .filter_map(|r| r.get("items_processed").and_then(Value::as_u64))
        .sum();
    Ok(json!({
        "total_processed": total,
        "worker_count": scenario.batch_results.len(),
        "no_batches": scenario.is_no_batches,
        "failed_batches": scenario.failed_batches.keys().collect::<Vec<_>>(),
    }))
}

/// `kit.echo`: returns `initialization.result` (default `{}`) as the step's result.
fn echo(ctx: &StepContext) -> Value {
    ctx.get_config("result")
        .cloned()
        .unwrap_or_else(|| json!({}))
}

/// The configured failure of `kit.fail` / `kit.fail_always`: `error_type` (default
/// `retryable_error`), `error_code` (default `KIT_INJECTED_FAILURE`), `retryable` (default:
/// the type's default), `message` (default: a description).
fn failure(ctx: &StepContext, default_message: &str) -> Box<StepOutcome> {
    let type_name = ctx
        .get_config("error_type")
        .and_then(Value::as_str)
        .unwrap_or("retryable_error");
    let Some(error_type) = ErrorType::parse(type_name) else {
        return bad_input(format!("`error_type: {type_name}` is not an error type"));
    };
    let message = ctx
        .get_config("message")
        .and_then(Value::as_str)
        .unwrap_or(default_message);
    let code = ctx
        .get_config("error_code")
        .and_then(Value::as_str)
        .unwrap_or(INJECTED);
    let mut outcome = StepOutcome::failure(message, error_type).with_error_code(code);
    if let Some(r) = ctx.get_config("retryable").and_then(Value::as_bool) {
        outcome = outcome.with_retryable(r);
    }
    Box::new(outcome)
}

/// The integer `value` of a direct parent's result; `None` when the parent has no result
/// (resolved manually), an error when the result exists without an integer `value`.
fn parent_value(ctx: &StepContext, parent: &str) -> Result<Option<i64>, Box<StepOutcome>> {
    // A parent resolved manually has no result: absent or null, depending on the host.
    let Some(result) = ctx.get_dependency_result(parent).filter(|r| !r.is_null()) else {
        return Ok(None);
    };
    let v = result.get("value").and_then(integer);
    v.map(Some).ok_or_else(|| {
        bad_input(format!(
            "parent `{parent}` result {result} has no integer `value`"
        ))
    })
}

/// An integer, also from a float with no fractional part (some hosts only have doubles).
fn integer(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() <= MAX_SAFE_INTEGER as f64)
            .map(|f| f as i64)
    })
}

fn checked(v: Option<i64>) -> Result<i64, Box<StepOutcome>> {
    match v {
        Some(v) if v.abs() <= MAX_SAFE_INTEGER => Ok(v),
        _ => Err(Box::new(
            StepOutcome::permanent(format!("result beyond ±{MAX_SAFE_INTEGER}"))
                .with_error_code(OVERFLOW),
        )),
    }
}

fn bad_input(message: String) -> Box<StepOutcome> {
    Box::new(StepOutcome::failure(message, ErrorType::ValidationError).with_error_code(BAD_INPUT))
}
