"""The Python handler kit of the conformance scenarios (``tests/README.md``, "The handler
kit"): the same ``kit.*`` callables as the Rust kit (``tests/src/kit.rs``), with the same
``handler.initialization`` options, result shapes and error codes, written as tasker_core
handlers and mixins.

Arithmetic handlers read the ``value`` of their *direct* parents only (the step definition's
``dependencies``), not of every ancestor. Every kit handler first appends its step name to
an in-process invocation log keyed by task uuid (:func:`executions` counts it); with
``TASKER_KIT_INVOCATION_LOG=FILE`` it also appends ``task_uuid step_name pid`` to that file.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from tasker_core import ErrorType, StepContext, StepHandler, StepHandlerResult, Tasker
from tasker_core.batch_processing import Batchable, BatchAggregationScenario, BatchWorkerContext
from tasker_core.step_handler.mixins import DecisionMixin

__all__ = [
    "BAD_INPUT",
    "CALLABLES",
    "INJECTED",
    "MAX_SAFE_INTEGER",
    "OVERFLOW",
    "executions",
    "invocations",
    "register_handlers",
    "release",
]

#: Largest magnitude the kit's arithmetic accepts (exact in every host language).
MAX_SAFE_INTEGER = (1 << 53) - 1
#: Error code of a kit handler that got input it cannot use.
BAD_INPUT = "KIT_BAD_INPUT"
#: Error code of an arithmetic result beyond ``MAX_SAFE_INTEGER``.
OVERFLOW = "KIT_OVERFLOW"
#: Default error code of ``kit.fail`` and ``kit.fail_always``.
INJECTED = "KIT_INJECTED_FAILURE"

_LOCK = threading.Lock()
_LOG: dict[str, list[str]] = {}
_ITEMS: dict[str, list[int]] = {}
# task uuid -> set once the runner is done with the task: its kit.sleep calls end at once.
_RELEASED: dict[str, threading.Event] = {}


def invocations(task_uuid: str) -> list[str]:
    """Step names of every kit handler invocation of ``task_uuid``, in the order they
    started."""
    with _LOCK:
        return list(_LOG.get(task_uuid, ()))


def executions(task_uuid: str, step: str) -> int:
    """How many times a kit handler ran for ``step`` of ``task_uuid``."""
    with _LOCK:
        return sum(1 for s in _LOG.get(task_uuid, ()) if s == step)


def processed_items(task_uuid: str, step: str) -> list[int]:
    """Items ``kit.checkpointing_work`` processed for ``step`` of ``task_uuid``, in order."""
    with _LOCK:
        return list(_ITEMS.get(f"{task_uuid}/{step}", ()))


def _released(task_uuid: str) -> threading.Event:
    with _LOCK:
        return _RELEASED.setdefault(task_uuid, threading.Event())


def release(task_uuids: list[str]) -> None:
    """Ends the ``kit.sleep`` calls of these tasks now and any later ones at once: a runner
    calls it once a task has come to rest, where the Rust kit's sleeping future would simply
    be dropped (a thread cannot be)."""
    for uuid in task_uuids:
        _released(uuid).set()


def _record(ctx: StepContext) -> int:
    """Records one invocation; returns how many times this step has run so far (from 1)."""
    path = os.environ.get("TASKER_KIT_INVOCATION_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{ctx.task_uuid} {ctx.step_name} {os.getpid()}\n")
    with _LOCK:
        entries = _LOG.setdefault(ctx.task_uuid, [])
        entries.append(ctx.step_name)
        return sum(1 for s in entries if s == ctx.step_name)


class _Fail(Exception):
    """Ends a kit handler with ``outcome`` (the Rust kit's ``Err(outcome)``)."""

    def __init__(self, outcome: StepHandlerResult):
        super().__init__(outcome.error_message)
        self.outcome = outcome


def _bad_input(message: str) -> _Fail:
    return _Fail(
        StepHandlerResult.failure(
            message, error_type=ErrorType.VALIDATION_ERROR, error_code=BAD_INPUT
        )
    )


def _integer(v: Any) -> int | None:
    """An integer, also from a float with no fractional part; ``None`` otherwise."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer() and abs(v) <= MAX_SAFE_INTEGER:
        return int(v)
    return None


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _checked(v: int) -> int:
    if abs(v) > MAX_SAFE_INTEGER:
        raise _Fail(
            StepHandlerResult.failure(
                f"result beyond ±{MAX_SAFE_INTEGER}",
                error_type=ErrorType.PERMANENT_ERROR,
                error_code=OVERFLOW,
            )
        )
    return v


def _parents(ctx: StepContext) -> list[str]:
    """The step's direct parents: the names in its definition's ``dependencies``."""
    definition = ctx.raw.get("definition") or {}
    return list(definition.get("dependencies") or [])


def _parent_value(ctx: StepContext, parent: str) -> int | None:
    """The integer ``value`` of a direct parent's result; ``None`` when the parent has no
    result (resolved manually)."""
    result = ctx.get_dependency_result(parent)
    if result is None:
        return None
    v = _integer(result.get("value")) if isinstance(result, dict) else None
    if v is None:
        raise _bad_input(f"parent `{parent}` result {result} has no integer `value`")
    return v


def _str_config(ctx: StepContext, key: str) -> str | None:
    v = ctx.get_config(key)
    return v if isinstance(v, str) else None


def _uint_config(ctx: StepContext, key: str) -> int | None:
    v = ctx.get_config(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


class KitHandler(StepHandler, DecisionMixin, Batchable):
    """One kit callable: records the invocation, then runs the kit function it names."""

    def __init__(self, callable_name: str):
        super().__init__()
        self.callable_name = callable_name
        self._run: Callable[[KitHandler, StepContext, int], Any] | None = _KIT.get(callable_name)

    def call(self, context: StepContext) -> StepHandlerResult:
        execution = _record(context)
        if self._run is None:
            return StepHandlerResult.failure(
                f"`{self.callable_name}` is not a kit callable (known: {', '.join(CALLABLES)})",
                error_type=ErrorType.HANDLER_NOT_FOUND,
            )
        try:
            value = self._run(self, context, execution)
        except _Fail as fail:
            return fail.outcome
        if isinstance(value, StepHandlerResult):
            return value
        return StepHandlerResult.success(result=value)


def _square(h: KitHandler, ctx: StepContext, _: int) -> Any:
    parents = _parents(ctx)
    if not parents:
        field = _str_config(ctx, "field") or "even_number"
        if field not in ctx.input_data:
            raise _bad_input(f"kit.square: the task context has no `{field}`")
        v = ctx.get_input(field)
        x = _integer(v)
        if x is None:
            raise _bad_input(f"kit.square: context `{field}` = {v} is not an integer")
    elif len(parents) == 1:
        x_or_none = _parent_value(ctx, parents[0])
        if x_or_none is None:
            raise _bad_input(f"kit.square: parent `{parents[0]}` has no result")
        x = x_or_none
    else:
        raise _bad_input(
            f"kit.square takes one parent, this step has {len(parents)} "
            f"({', '.join(parents)}); use kit.multiply_parents"
        )
    return {"value": _checked(x * x)}


def _fold(
    start: int, op: Callable[[int, int], int]
) -> Callable[[KitHandler, StepContext, int], Any]:
    def fold(h: KitHandler, ctx: StepContext, _: int) -> Any:
        acc = start
        for parent in _parents(ctx):
            v = _parent_value(ctx, parent)
            if v is not None:
                acc = _checked(op(acc, v))
        if ctx.get_config("then_square") is True:
            acc = _checked(acc * acc)
        return {"value": acc}

    return fold


def _sleep(h: KitHandler, ctx: StepContext, _: int) -> Any:
    """Sleeps ``ms``, cooperatively cancelled: a thread cannot be killed, so the sleep ends
    once the attempt's deadline has passed (its result is then refused) or the runner has
    released the task (:func:`release`)."""
    ms = _uint_config(ctx, "ms") or 0
    seconds = ms / 1000
    if ctx.timeout_at:
        seconds = min(seconds, max(0.0, ctx.timeout_at / 1000 - time.time()) + 0.05)
    _released(ctx.task_uuid).wait(seconds)
    return {"slept_ms": ms}


def _failure(ctx: StepContext, default_message: str) -> _Fail:
    """The configured failure of ``kit.fail`` / ``kit.fail_always``."""
    type_name = _str_config(ctx, "error_type") or "retryable_error"
    try:
        error_type = ErrorType(type_name)
    except ValueError:
        return _bad_input(f"`error_type: {type_name}` is not an error type")
    retryable = ctx.get_config("retryable")
    return _Fail(
        StepHandlerResult.failure(
            _str_config(ctx, "message") or default_message,
            error_type=error_type,
            retryable=retryable if isinstance(retryable, bool) else None,
            error_code=_str_config(ctx, "error_code") or INJECTED,
        )
    )


def _fail(h: KitHandler, ctx: StepContext, execution: int) -> Any:
    times = _uint_config(ctx, "times")
    times = 1 if times is None else times
    mode = _str_config(ctx, "count") or "attempts"
    if mode == "attempts":
        count = ctx.attempts
    elif mode == "executions":
        count = execution
    else:
        raise _bad_input(f"kit.fail: `count: {mode}`: expected attempts or executions")
    if count <= times:
        raise _failure(ctx, f"kit.fail: failing {count} of {times}")
    return {"attempt": ctx.attempts, "execution": execution}


def _fail_always(h: KitHandler, ctx: StepContext, _: int) -> Any:
    raise _failure(ctx, "kit.fail_always: failing as configured")


def _record_handler(h: KitHandler, ctx: StepContext, execution: int) -> Any:
    return {"recorded": True, "execution": execution}


def _echo(h: KitHandler, ctx: StepContext, _: int) -> Any:
    result = ctx.get_config("result")
    return {} if result is None else result


def _steps_of(route: Any) -> list[str]:
    steps = route.get("steps") if isinstance(route, dict) else None
    return [s for s in steps if isinstance(s, str)] if isinstance(steps, list) else []


def _decide(h: KitHandler, ctx: StepContext, _: int) -> Any:
    by_parent = ctx.get_config("by_largest_parent")
    if by_parent is not None:
        return _decide_by_parent(h, ctx, by_parent)
    field = _str_config(ctx, "field")
    if field is None:
        raise _bad_input("kit.decide needs `field`")
    value = _number(ctx.get_input(field))
    if value is None:
        raise _bad_input(f"kit.decide: context `{field}` is not a number")
    routes = ctx.get_config("routes")
    if not isinstance(routes, list):
        raise _bad_input("kit.decide needs `routes`")
    shown = _show_number(value)
    for route in routes:
        below = route.get("below") if isinstance(route, dict) else None
        if below is not None:
            b = _number(below)
            if b is None or not value < b:
                continue
        steps = _steps_of(route)
        if not steps:
            return h.skip_branches(f"{field} = {shown}: no route creates steps")
        return h.decision_success(steps, {field: value})
    return h.decision_failure(f"kit.decide: no route for {field} = {shown}")


def _show_number(v: float) -> str:
    """A number as the Rust kit prints an f64 in its messages (``5000``, ``0.01``)."""
    return str(int(v)) if v.is_integer() else repr(v)


def _decide_by_parent(h: KitHandler, ctx: StepContext, routes: Any) -> Any:
    if not isinstance(routes, dict):
        raise _bad_input("kit.decide: `by_largest_parent` must map parents to steps")
    best: tuple[str, int] | None = None
    for parent in routes:
        v = _parent_value(ctx, parent)
        v = -(1 << 63) if v is None else v
        if best is None or v > best[1]:
            best = (parent, v)
    if best is None:
        raise _bad_input("kit.decide: `by_largest_parent` is empty")
    parent, value = best
    steps = routes[parent]
    names = [s for s in steps if isinstance(s, str)] if isinstance(steps, list) else []
    return h.decision_success(names, {"largest_parent": parent, "value": value})


def _count(h: KitHandler, ctx: StepContext, _: int) -> Any:
    field = _str_config(ctx, "field") or "numbers"
    items = ctx.get_input(field)
    if not isinstance(items, list):
        raise _bad_input(f"kit.count: context `{field}` is not an array")
    parity = _str_config(ctx, "parity")
    ints = [i for i in (_integer(v) for v in items) if i is not None]
    if parity == "even":
        ints = [i for i in ints if i % 2 == 0]
    elif parity == "odd":
        ints = [i for i in ints if i % 2 != 0]
    return {"value": len(ints)}


def _csv_rows(ctx: StepContext, field: str) -> list[str]:
    """The data rows of the CSV file whose path is in context field ``field``."""
    path = ctx.get_input(field)
    if not isinstance(path, str):
        raise _bad_input(f"context `{field}` is not a file path")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise _bad_input(f"cannot read the CSV file {path}: {e}") from e
    return [line for line in text.splitlines()[1:] if line.strip()]


def _batch_analyze(h: KitHandler, ctx: StepContext, _: int) -> Any:
    csv_field = _str_config(ctx, "csv_field")
    total_parent = _str_config(ctx, "total_parent")
    if csv_field is not None:
        total = len(_csv_rows(ctx, csv_field))
    elif total_parent is not None:
        total = max(_parent_value(ctx, total_parent) or 0, 0)
    else:
        field = _str_config(ctx, "total_field") or "total_items"
        if field not in ctx.input_data:
            raise _bad_input(f"kit.batch_analyze: the task context has no `{field}`")
        v = ctx.get_input(field)
        if isinstance(v, list):
            total = len(v)
        else:
            n = _integer(v)
            if n is None or n < 0:
                raise _bad_input(f"kit.batch_analyze: context `{field}` = {v} is not a count")
            total = n
    size = _uint_config(ctx, "batch_size")
    outcome = h.create_batch_outcome(
        total, 100 if size is None else size, _str_config(ctx, "worker_template")
    )
    return h.batch_analyzer_success(outcome)


def _batch_of(h: KitHandler, ctx: StepContext, callable_name: str) -> BatchWorkerContext:
    try:
        return h.get_batch_worker_context(ctx)
    except ValueError as e:
        raise _bad_input(f"{callable_name} runs only as a batch worker") from e


def _cursor(v: Any, what: str) -> int:
    n = v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None
    if n is None:
        raise _bad_input(f"the {what} cursor {v} is not a non-negative integer")
    return n


def _batch_work(h: KitHandler, ctx: StepContext, _: int) -> Any:
    batch = _batch_of(h, ctx, "kit.batch_work")
    start = _cursor(batch.cursor.start_cursor, "start")
    end = _cursor(batch.cursor.end_cursor, "end")
    result: dict[str, Any] = {"batch_id": batch.batch_id}
    csv_field = _str_config(ctx, "csv_field")
    if csv_field is not None:
        rows = _csv_rows(ctx, csv_field)
        mine = rows[start : min(end, len(rows))] if start <= len(rows) else []
        result["items_processed"] = len(mine)
        col = _uint_config(ctx, "sum_column")
        if col is not None:
            total = 0
            for row in mine:
                cells = row.split(",")
                if col < len(cells):
                    with contextlib.suppress(ValueError):
                        total += int(cells[col].strip())
            result["sum"] = total
    else:
        result["items_processed"] = max(end - start, 0)
    return h.batch_worker_success(batch, result)


def _checkpointing_work(h: KitHandler, ctx: StepContext, _: int) -> Any:
    batch = _batch_of(h, ctx, "kit.checkpointing_work")
    end = _cursor(batch.cursor.end_cursor, "end")
    at = _cursor(batch.resume_cursor, "resume")
    every = max(_uint_config(ctx, "every") or 25, 1)
    fail_after = _uint_config(ctx, "fail_after")
    fail_on = _uint_config(ctx, "fail_on_attempt")
    fail_on = 1 if fail_on is None else fail_on
    done = batch.items_processed
    accumulated = batch.accumulated if isinstance(batch.accumulated, dict) else {}
    first_of_attempt = accumulated.get("attempt") != ctx.attempts
    resumed_from = at
    if not first_of_attempt:
        prior = accumulated.get("resumed_from")
        resumed_from = prior if isinstance(prior, int) else at
    key = f"{ctx.task_uuid}/{ctx.step_name}"
    processed_now = 0
    while at < end:
        if fail_after is not None and done >= fail_after and ctx.attempts == fail_on:
            return StepHandlerResult.failure(
                f"kit.checkpointing_work: failing after {done} items as configured",
                error_type=ErrorType.RETRYABLE_ERROR,
                error_code=INJECTED,
            )
        with _LOCK:
            _ITEMS.setdefault(key, []).append(at)
        at += 1
        done += 1
        processed_now += 1
        if processed_now == every and at < end:
            return h.checkpoint_yield(
                at, done, {"attempt": ctx.attempts, "resumed_from": resumed_from}
            )
    items = processed_items(ctx.task_uuid, ctx.step_name)
    result = {
        "batch_id": batch.batch_id,
        "items_processed": done,
        "resumed_from": resumed_from,
        "processed_twice": len(items) - len(set(items)),
    }
    return h.batch_worker_success(batch, result)


def _aggregate(h: KitHandler, ctx: StepContext, _: int) -> Any:
    analyzer = _str_config(ctx, "analyzer")
    if analyzer is None:
        raise _bad_input("kit.aggregate needs `analyzer`")
    prefix = _str_config(ctx, "prefix")
    if prefix is None:
        raise _bad_input("kit.aggregate needs `prefix`")
    scenario = BatchAggregationScenario.detect(
        ctx.dependency_results, analyzer, prefix, ctx.failed_dependencies
    )
    total = 0
    for r in scenario.batch_results.values():
        n = r.get("items_processed") if isinstance(r, dict) else None
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            total += n
    return {
        "total_processed": total,
        "worker_count": len(scenario.batch_results),
        "no_batches": scenario.is_no_batches,
        "failed_batches": sorted(scenario.failed_batches),
    }


_KIT: dict[str, Callable[[KitHandler, StepContext, int], Any]] = {
    "kit.square": _square,
    "kit.sum_parents": _fold(0, lambda a, b: a + b),
    "kit.multiply_parents": _fold(1, lambda a, b: a * b),
    "kit.sleep": _sleep,
    "kit.fail": _fail,
    "kit.fail_always": _fail_always,
    "kit.record": _record_handler,
    "kit.echo": _echo,
    "kit.decide": _decide,
    "kit.count": _count,
    "kit.batch_analyze": _batch_analyze,
    "kit.batch_work": _batch_work,
    "kit.checkpointing_work": _checkpointing_work,
    "kit.aggregate": _aggregate,
}

#: Every callable the kit provides.
CALLABLES: tuple[str, ...] = tuple(_KIT)


def register_handlers(tasker: Tasker) -> None:
    """Registers every ``kit.*`` handler on ``tasker``."""
    for name in CALLABLES:
        tasker.register_handler(KitHandler(name), name=name)
