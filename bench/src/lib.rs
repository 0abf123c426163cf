//! The benchmark workloads: the peer project's `linear_add` and `diamond_add` templates and the
//! `bench.add` handler they run (each step adds its `add` to the sum of its parents' values, or
//! to the context's `x` when it has none).

pub mod prod;

use serde_json::json;
use tasker_core::{StepOutcome, Tasker, handler_fn};

/// Four steps in sequence, adding 1, 2, 3 and 4 to the context's `x`.
pub const LINEAR: &str = include_str!("../templates/linear_add.yaml");

/// `x + 1`, then `+ 2` and `+ 3` in parallel, then their sum.
pub const DIAMOND: &str = include_str!("../templates/diamond_add.yaml");

/// Registers `bench.add` on `tasker`.
pub fn register_handlers(tasker: &Tasker) {
    tasker.register_handler(
        "bench.add",
        handler_fn(|ctx| async move {
            let add = ctx.get_config("add").and_then(|v| v.as_i64()).unwrap_or(0);
            let parents = &ctx.job().definition.dependencies;
            let base: i64 = if parents.is_empty() {
                ctx.get_input("x").and_then(|v| v.as_i64()).unwrap_or(0)
            } else {
                parents
                    .iter()
                    .filter_map(|p| ctx.get_dependency_result(p)?.get("value")?.as_i64())
                    .sum()
            };
            StepOutcome::success(json!({ "value": base + add }))
        }),
    );
}
