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
//! ([`invocations`], [`executions`]).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tasker_core::{ErrorType, StepContext, StepHandler, StepOutcome, Tasker, handler_fn};

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
pub const CALLABLES: [&str; 9] = [
    "kit.square",
    "kit.sum_parents",
    "kit.multiply_parents",
    "kit.sleep",
    "kit.fail",
    "kit.fail_always",
    "kit.record",
    "kit.echo",
    "kit.decide",
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
