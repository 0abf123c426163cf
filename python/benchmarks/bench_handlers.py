"""The benchmarks' `bench.add` handler in Python: adds the step's `add` to the sum of its
parents' values, or to the task context's `x` when it has none (as the Rust one in
`bench/src/lib.rs`). `python -m tasker_core worker --module bench_handlers` serves it."""

from __future__ import annotations

from tasker_core import StepContext, StepHandler, StepHandlerResult


class Add(StepHandler):
    handler_name = "bench.add"

    def call(self, context: StepContext) -> StepHandlerResult:
        add = int(context.get_config("add", 0))
        parents = context.raw.get("definition", {}).get("dependencies") or []
        if parents:
            base = sum(int(context.get_dependency_field(p, "value") or 0) for p in parents)
        else:
            base = int(context.get_input_or("x", 0))
        return StepHandlerResult.success(result={"value": base + add})
