"""The Python conformance runner: reads the language-neutral scenario files of ``tests/``
(the same files as the Rust runner, ``tests/src/scenario/``), runs each in a real
``tasker_core.Tasker`` with the Python kit and the e-commerce example's Python handlers,
applies the operator actions and compares the resting state with the expectations, with the
same subset semantics and one readable line per mismatch (``tests/README.md``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasker_core import Tasker, _native
from tasker_core.engine import Task
from tasker_core.errors import TaskerError

from . import kit

#: ``tests/`` of the repository: ``python/`` is beside it.
TESTS_DIR = Path(__file__).resolve().parents[3] / "tests"
SCENARIOS_DIR = TESTS_DIR / "scenarios"

#: How often the runner looks at the task while waiting for an action's condition. Short,
#: because conditions such as "step X is in_progress" may hold only briefly.
CONDITION_POLL = 0.005

#: Engine settings of every scenario (``tests/README.md``, "What a runner does"): a short
#: polling fallback and a lifecycle check as often; a few connections per PostgreSQL engine.
ENGINE_ENV = {
    "TASKER_LIFECYCLE_CHECK_MS": "50",
    "TASKER_PG_MAX_CONNECTIONS": "3",
    "TASKER_ENV": "development",
}
POLL_INTERVAL_MS = 50

TASK_STATES = frozenset(
    [
        "pending",
        "initializing",
        "enqueuing_steps",
        "steps_in_process",
        "evaluating_results",
        "waiting_for_dependencies",
        "waiting_for_retry",
        "blocked_by_failures",
        "complete",
        "error",
        "cancelled",
        "resolved_manually",
    ]
)
STEP_STATES = frozenset(
    [
        "pending",
        "enqueued",
        "in_progress",
        "enqueued_for_orchestration",
        "enqueued_as_error_for_orchestration",
        "waiting_for_retry",
        "complete",
        "error",
        "cancelled",
        "resolved_manually",
    ]
)
DLQ_REASONS = frozenset(
    [
        "max_duration_minutes",
        "max_waiting_for_dependencies_minutes",
        "max_waiting_for_retry_minutes",
        "max_steps_in_process_minutes",
        "staleness",
    ]
)
DLQ_RESOLUTIONS = frozenset(["pending", "manually_resolved", "permanently_failed", "cancelled"])
ACTIONS = {
    "cancel_task": "cancel",
    "give_up": "give_up",
    "resolve_task": "resolve",
    "reset_step": "reset_step",
    "resolve_step": "resolve_step",
    "complete_step": "complete_step",
}
STEP_ACTIONS = frozenset({"reset_step", "resolve_step", "complete_step"})


class ScenarioError(ValueError):
    """A scenario file that does not follow the format (a load error, not a failure)."""


# -- loading ----------------------------------------------------------------------------------


def _check_keys(
    obj: Any, allowed: set[str], at: str, required: frozenset[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ScenarioError(f"{at}: expected a mapping, found {obj!r}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ScenarioError(
            f"{at}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(allowed))})"
        )
    missing = sorted(required - set(obj))
    if missing:
        raise ScenarioError(f"{at}: missing required key(s) {', '.join(missing)}")
    return obj


def _check_state(value: Any, states: frozenset[str], at: str) -> None:
    if value is not None and value not in states:
        raise ScenarioError(f"{at}: {value!r} is not one of {', '.join(sorted(states))}")


_STEP_EXPECT = {
    "state",
    "attempts",
    "result",
    "error_type",
    "error_code",
    "retryable",
    "error_contains",
    "dependencies",
}
_EXPECT = {
    "task",
    "steps",
    "absent_steps",
    "step_count",
    "created_steps",
    "executions",
    "create_error",
    "second_create",
    "dlq",
    "events",
    "child_tasks",
}


def _check_expect(e: Any, at: str) -> None:
    _check_keys(e, _EXPECT, at)
    _check_state(e.get("task"), TASK_STATES, f"{at}.task")
    for name, s in (e.get("steps") or {}).items():
        _check_keys(s, _STEP_EXPECT, f"{at}.steps.{name}")
        _check_state(s.get("state"), STEP_STATES, f"{at}.steps.{name}.state")
    if "create_error" in e:
        _check_keys(
            e["create_error"],
            {"kind", "contains", "pointers"},
            f"{at}.create_error",
            frozenset({"kind"}),
        )
    if "second_create" in e:
        _check_keys(e["second_create"], {"replayed", "same_task"}, f"{at}.second_create")
    if "dlq" in e:
        d = _check_keys(
            e["dlq"],
            {"reason", "original_state", "resolution_status", "message_contains", "snapshot"},
            f"{at}.dlq",
        )
        _check_state(d.get("reason"), DLQ_REASONS, f"{at}.dlq.reason")
        _check_state(d.get("original_state"), TASK_STATES, f"{at}.dlq.original_state")
        _check_state(d.get("resolution_status"), DLQ_RESOLUTIONS, f"{at}.dlq.resolution_status")
    for step, child in (e.get("child_tasks") or {}).items():
        _check_expect(child, f"{at}.child_tasks.{step}")


def load(path: Path) -> dict[str, Any]:
    """Reads and checks one scenario file (YAML parsed by the core's parser)."""
    try:
        s = json.loads(_native.yaml_to_json(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise ScenarioError(f"{path}: {e}") from e
    try:
        _check(s)
    except ScenarioError as e:
        raise ScenarioError(f"{path}: {e}") from e
    return s


def _check(s: Any) -> None:
    _check_keys(
        s,
        {
            "name",
            "description",
            "template",
            "extra_templates",
            "files",
            "context",
            "create",
            "second_create",
            "actions",
            "expect",
            "timeout_seconds",
        },
        "scenario",
        frozenset({"name", "template"}),
    )
    if not isinstance(s.get("context", {}), dict):
        raise ScenarioError("`context` must be a mapping")
    for name, f in (s.get("files") or {}).items():
        _check_keys(f, {"csv_rows"}, f"files.{name}", frozenset({"csv_rows"}))
    _check_keys(
        s.get("create") or {}, {"namespace", "name", "version", "idempotency_key"}, "create"
    )
    if s.get("second_create") is not None:
        _check_keys(s["second_create"], {"context", "version", "idempotency_key"}, "second_create")
    for i, a in enumerate(s.get("actions") or []):
        at = f"actions[{i}]"
        _check_keys(a, {"when", "do", "step", "result", "child"}, at, frozenset({"when", "do"}))
        w = _check_keys(a["when"], {"task", "step", "state", "child"}, f"{at}.when")
        if not (
            ("task" in w and "step" not in w and "state" not in w)
            or ("task" not in w and "step" in w and "state" in w)
        ):
            raise ScenarioError(
                f"{at}.when: give either `task: STATE` or `step: NAME, state: STATE`"
            )
        _check_state(w.get("task"), TASK_STATES, f"{at}.when.task")
        _check_state(w.get("state"), STEP_STATES, f"{at}.when.state")
        if a["do"] not in ACTIONS:
            raise ScenarioError(f"{at}.do: {a['do']!r} is not one of {', '.join(ACTIONS)}")
        if (a["do"] in STEP_ACTIONS) != ("step" in a):
            raise ScenarioError(f"{at}: `step` is required for step actions and only for them")
        if "result" in a and a["do"] != "complete_step":
            raise ScenarioError(f"{at}: `result` only goes with complete_step")
    expect = s.get("expect") or {}
    _check_expect(expect, "expect")
    if ("second_create" in expect) != (s.get("second_create") is not None):
        raise ScenarioError("`second_create` and `expect.second_create` go together")


def scenario_files() -> list[Path]:
    """Every ``*.yaml`` / ``*.yml`` scenario file in ``tests/scenarios``, by file name."""
    return sorted(p for p in SCENARIOS_DIR.iterdir() if p.suffix in (".yaml", ".yml"))


# -- comparing --------------------------------------------------------------------------------


def _show(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"))


def subset_match(expected: Any, actual: Any, at: str, diffs: list[str]) -> None:
    """Objects match when every expected key is present and matches (extra keys are fine),
    arrays when they have the same length and match element by element, numbers by value
    (``4`` matches ``4.0``), anything else by equality. Mismatches go to ``diffs``."""
    num = (int, float)
    if isinstance(expected, dict) and isinstance(actual, dict):
        for k, ev in expected.items():
            path = f"{at}/{k}"
            if k in actual:
                subset_match(ev, actual[k], path, diffs)
            else:
                diffs.append(f"{path}: expected {_show(ev)}, key missing")
    elif isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        for i, (ev, av) in enumerate(zip(expected, actual, strict=True)):
            subset_match(ev, av, f"{at}/{i}", diffs)
    elif (
        isinstance(expected, num)
        and isinstance(actual, num)
        and not isinstance(expected, bool)
        and not isinstance(actual, bool)
    ):
        if expected != actual:
            diffs.append(f"{at}: expected {_show(expected)}, found {_show(actual)}")
    elif type(expected) is not type(actual) or expected != actual:
        diffs.append(f"{at}: expected {_show(expected)}, found {_show(actual)}")


def compare_task(expect: dict[str, Any], task: Task, executions: Callable[[str], int]) -> list[str]:
    """Every difference between the task's end state (and the kit's executions) and
    ``expect``."""
    diffs: list[str] = []
    state = expect.get("task")
    if state is not None and task.status != state:
        diffs.append(f"task: expected state {state}, found {task.status}")
    for name, e in (expect.get("steps") or {}).items():
        step = task.steps.get(name)
        if step is None:
            diffs.append(f"step {name}: expected to exist, absent")
        else:
            _compare_step(name, e, step, diffs)
    for name in expect.get("absent_steps") or []:
        if name in task.steps:
            diffs.append(f"step {name}: expected absent, exists in state {task.steps[name].state}")
    n = expect.get("step_count")
    if n is not None and len(task.steps) != n:
        diffs.append(f"step_count: expected {n}, found {len(task.steps)} ({', '.join(task.steps)})")
    for name, want in (expect.get("executions") or {}).items():
        found = executions(name)
        if found != want:
            diffs.append(f"executions of {name}: expected {want}, found {found}")
    return diffs


def _compare_step(name: str, e: dict[str, Any], step: Any, diffs: list[str]) -> None:
    at = f"step {name}"
    if "dependencies" in e:
        want, found = sorted(e["dependencies"]), sorted(step.dependencies)
        if want != found:
            diffs.append(
                f"{at}: expected dependencies [{', '.join(want)}], found [{', '.join(found)}]"
            )
    if "state" in e and step.state != e["state"]:
        diffs.append(f"{at}: expected state {e['state']}, found {step.state}")
    if "attempts" in e and step.attempts != e["attempts"]:
        diffs.append(f"{at}: expected attempts {e['attempts']}, found {step.attempts}")
    if "result" in e:
        if step.result is None:
            diffs.append(f"{at}: expected result {_show(e['result'])}, has none")
        else:
            subset_match(e["result"], step.result, f"{at} result ", diffs)
    wants_error = any(k in e for k in ("error_type", "error_code", "retryable")) or bool(
        e.get("error_contains")
    )
    if not wants_error:
        return
    err = step.error
    if err is None:
        diffs.append(f"{at}: expected an error, has none")
        return
    message = err.get("message", "")
    if "error_type" in e and err.get("error_type") != e["error_type"]:
        diffs.append(
            f"{at}: expected error_type {e['error_type']}, found {err.get('error_type')} "
            f"({message})"
        )
    if "error_code" in e and err.get("error_code") != e["error_code"]:
        diffs.append(
            f"{at}: expected error_code {e['error_code']}, found {err.get('error_code')!r} "
            f"({message})"
        )
    if "retryable" in e and err.get("retryable") != e["retryable"]:
        diffs.append(f"{at}: expected retryable {e['retryable']}, found {err.get('retryable')}")
    for s in e.get("error_contains") or []:
        if s not in message:
            diffs.append(f"{at}: expected the error message to contain {s!r}, found {message!r}")


def compare_dlq(expected: dict[str, Any], entries: list[dict[str, Any]]) -> list[str]:
    """Differences between the task's DLQ entries (each read with its snapshot) and
    ``expected``: exactly one entry, matching."""
    if len(entries) != 1:
        return [f"dlq: expected exactly one entry for the task, found {len(entries)}"]
    entry = entries[0]
    diffs: list[str] = []
    for key in ("reason", "original_state", "resolution_status"):
        if key in expected and entry.get(key) != expected[key]:
            extra = f" ({entry.get('message')})" if key == "reason" else ""
            diffs.append(f"dlq: expected {key} {expected[key]}, found {entry.get(key)}{extra}")
    message = entry.get("message", "")
    for s in expected.get("message_contains") or []:
        if s not in message:
            diffs.append(f"dlq: expected the message to contain {s!r}, found {message!r}")
    if "snapshot" in expected:
        if entry.get("snapshot") is None:
            diffs.append("dlq: expected a snapshot, the entry has none")
        else:
            subset_match(expected["snapshot"], entry["snapshot"], "dlq snapshot ", diffs)
    return diffs


def compare_created_steps(expected: list[str], audit: list[dict[str, Any]]) -> list[str]:
    """The steps created with the task (the ``create`` transitions before any other step
    transition) against ``expected``, in any order."""
    found: list[str] = []
    for t in audit:
        if t.get("event") != "create":
            break
        if t.get("step_name"):
            found.append(t["step_name"])
    if sorted(found) == sorted(expected):
        return []
    return [
        f"created_steps: expected [{', '.join(sorted(expected))}], created with the task: "
        f"[{', '.join(sorted(found))}]"
    ]


def compare_events(expected: dict[str, list[int]], records: list[dict[str, Any]]) -> list[str]:
    """Outbox records of the task (event name -> attempts that fired one) against
    ``expected``; names not listed must have none."""
    found: dict[str, list[int]] = {}
    for r in records:
        ev = r["event"]
        found.setdefault(ev["event_name"], []).append(ev["metadata"]["attempt"])
    diffs = []
    for name, attempts in expected.items():
        want, got = sorted(attempts), sorted(found.pop(name, []))
        if want != got:
            diffs.append(f"events: {name}: expected records for attempts {want}, found {got}")
    for name, got in sorted(found.items()):
        diffs.append(f"events: unexpected {name} records (attempts {sorted(got)})")
    return diffs


# -- running ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """The result of one scenario: every mismatch (empty when it passed) and the task as
    last seen."""

    name: str
    task: Task | None = None
    diffs: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    #: The uuid of the task the scenario created (none when creation failed).
    task_uuid: str | None = None

    @property
    def passed(self) -> bool:
        return not self.diffs

    def report(self) -> str:
        """The mismatches, then the task's steps as they ended."""
        lines = [f"    - {d}" for d in self.diffs]
        if self.task is not None:
            lines.append(f"    task {self.task.uuid} ended {self.task.status}; steps:")
            for s in self.task.steps.values():
                line = f"      {s.name:<24} {s.state:<36} attempts {s.attempts}"
                if s.result is not None:
                    line += f" result {_show(s.result)}"
                if s.error is not None:
                    line += (
                        f" error {s.error.get('error_type')}/{s.error.get('error_code')!r}: "
                        f"{s.error.get('message')}"
                    )
                lines.append(line)
        return "\n".join(lines)


class _Stop(Exception):
    """A problem that ends the scenario (becomes one diff line)."""


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def open_engine(database_url: str, setups: list[Callable[[Tasker], None]]) -> Tasker:
    """A fresh engine with the scenario settings and the handlers of ``setups``."""
    with _environment(ENGINE_ENV):
        # The scenario's engine is the only worker of its database, so a step whose callable
        # nothing serves must fail with handler_not_found, as in the Rust runner (the binding
        # turns that check off on PostgreSQL unless told).
        tasker = Tasker(
            database_url,
            poll_interval_ms=POLL_INTERVAL_MS,
            concurrency=8,
            fail_unknown_callables=True,
        )
    try:
        for setup in setups:
            setup(tasker)
    except BaseException:
        tasker.close(drain_timeout=1.0)
        raise
    return tasker


def run(
    scenario: dict[str, Any], database_url: str, setups: list[Callable[[Tasker], None]]
) -> Outcome:
    """Runs one scenario on a fresh engine at ``database_url`` (its database must be
    empty) and compares. Never raises on a scenario failure: every problem, engine errors
    included, becomes a line of the outcome's diffs."""
    started = time.monotonic()
    out = Outcome(scenario["name"])
    deadline = started + float(scenario.get("timeout_seconds", 30))
    try:
        tasker = open_engine(database_url, [kit.register_handlers, *setups])
    except TaskerError as e:
        out.diffs.append(f"cannot open the engine: {e.code}: {e}")
        out.elapsed = time.monotonic() - started
        return out
    try:
        with _files(scenario) as files_dir:
            _drive(tasker, scenario, deadline, out, files_dir)
    except _Stop as e:
        out.diffs.append(str(e))
    except TaskerError as e:
        out.diffs.append(f"engine error: {e.code}: {e}")
    finally:
        if out.task_uuid is not None:
            kit.release([out.task_uuid, *_descendants(tasker, out.task_uuid)])
        tasker.close(drain_timeout=2.0)
    out.elapsed = time.monotonic() - started
    return out


def _register(tasker: Tasker, ref: Any) -> tuple[str, str]:
    """Registers one template (a path relative to ``tests/`` or an inline mapping); returns
    its namespace and name."""
    if isinstance(ref, str):
        path = TESTS_DIR / ref
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise _Stop(f"cannot read template {path}: {e}") from e
        label = str(path)
    else:
        # JSON is YAML: the engine's template parser reads it as written.
        text, label = json.dumps(ref), "inline template"
    try:
        info = tasker.register_template(text)
    except TaskerError as e:
        raise _Stop(f"registering {label}: {e}") from e
    return info.namespace, info.name


@contextlib.contextmanager
def _files(scenario: dict[str, Any]) -> Iterator[Path | None]:
    files = scenario.get("files") or {}
    if not files:
        yield None
        return
    d = Path(tempfile.mkdtemp(prefix=f"tasker-scenario-{scenario['name']}-"))
    try:
        for name, spec in files.items():
            rows = "".join(f"{i},{i}\n" for i in range(1, int(spec["csv_rows"]) + 1))
            (d / name).write_text("id,amount\n" + rows, encoding="utf-8")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _with_file_paths(value: Any, d: Path) -> Any:
    if isinstance(value, str) and value.startswith("$file/"):
        return str(d / value[len("$file/") :])
    if isinstance(value, list):
        return [_with_file_paths(v, d) for v in value]
    if isinstance(value, dict):
        return {k: _with_file_paths(v, d) for k, v in value.items()}
    return value


def _drive(
    tasker: Tasker,
    s: dict[str, Any],
    deadline: float,
    out: Outcome,
    files_dir: Path | None,
) -> None:
    for extra in s.get("extra_templates") or []:
        _register(tasker, extra)
    namespace, name = _register(tasker, s["template"])
    context = s.get("context") or {}
    if files_dir is not None:
        context = _with_file_paths(context, files_dir)
    create = s.get("create") or {}
    expect = s.get("expect") or {}

    def create_task(ctx: dict[str, Any], options: dict[str, Any]) -> Any:
        return tasker.create_task(
            create.get("name", name),
            namespace=create.get("namespace", namespace),
            context=ctx,
            version=options.get("version"),
            idempotency_key=options.get("idempotency_key"),
            initiator="conformance",
            source_system="tasker-conformance",
            reason=s["name"],
        )

    recorder = _native.record_events(tasker._engine) if "events" in expect else None
    try:
        handle = create_task(context, create)
    except TaskerError as e:
        if "create_error" in expect:
            out.diffs.extend(_compare_create_error(expect["create_error"], e))
            return
        raise _Stop(f"create failed: {e.code} ({e})") from e
    out.task_uuid = handle.uuid
    if "create_error" in expect:
        out.diffs.append(
            f"create: expected a {expect['create_error']['kind']} error, created task {handle.uuid}"
        )
        return

    second = s.get("second_create")
    if second is not None:
        try:
            again = create_task(second.get("context", context), second)
        except TaskerError as e:
            raise _Stop(f"second create failed: {e.code} ({e})") from e
        e2 = expect["second_create"]
        if "replayed" in e2 and again.replayed != e2["replayed"]:
            out.diffs.append(
                f"second create: expected replayed {e2['replayed']}, found {again.replayed}"
            )
        if "same_task" in e2 and (again.uuid == handle.uuid) != e2["same_task"]:
            out.diffs.append(
                f"second create: expected same_task {e2['same_task']}, got {again.uuid} "
                f"(first {handle.uuid})"
            )

    for i, action in enumerate(s.get("actions") or []):
        try:
            out.task = _wait_for(tasker, handle.uuid, action["when"], deadline)
        except _Stop as e:
            out.task = tasker.get_task(handle.uuid)
            raise _Stop(f"actions[{i}] ({action['do']}): {e}") from e
        target = handle.uuid
        if "child" in action:
            child = _child_of(tasker, tasker.get_task(handle.uuid), action["child"])
            if child is None:
                raise _Stop(f"actions[{i}]: step {action['child']} started no child task")
            target = child.uuid
        try:
            _apply(tasker, target, action, s["name"])
        except TaskerError as e:
            raise _Stop(f"actions[{i}] ({action['do']}) failed: {e.code}: {e}") from e

    try:
        task = handle.wait(max(0.0, deadline - time.monotonic()))
    except TaskerError as e:
        out.task = tasker.get_task(handle.uuid)
        raise _Stop(
            f"the task did not come to rest within {s.get('timeout_seconds', 30)}s: {e}"
        ) from e
    out.task = task
    out.diffs.extend(compare_task(expect, task, lambda step: kit.executions(task.uuid, step)))
    for step, child_expect in (expect.get("child_tasks") or {}).items():
        child = _child_of(tasker, task, step)
        if child is None:
            out.diffs.append(f"child of {step}: the step started no child task")
            continue
        at = f"child of {step}: "
        child_uuid = child.uuid
        out.diffs.extend(
            at + d
            for d in compare_task(child_expect, child, lambda n, u=child_uuid: kit.executions(u, n))
        )
        if "dlq" in child_expect:
            entries = json.loads(_native.dlq_entries(tasker._engine, child.uuid))
            out.diffs.extend(at + d for d in compare_dlq(child_expect["dlq"], entries))
        parent_correlation = child.raw.get("parent_correlation_id")
        if parent_correlation != task.correlation_id:
            out.diffs.append(
                f"{at}parent_correlation_id {parent_correlation!r}, expected the task's "
                f"correlation id {task.correlation_id!r}"
            )
    if "created_steps" in expect:
        audit = tasker.transitions(task.uuid)["steps"]
        out.diffs.extend(compare_created_steps(expect["created_steps"], audit))
    if "events" in expect:
        records = json.loads(_native.domain_events(tasker._engine, task.uuid))
        out.diffs.extend(compare_events(expect["events"], records))
        durable = [r["event"] for r in records if r["event"]["delivery_mode"] == "durable"]
        assert recorder is not None
        # Durable records are delivered after their commit: wait for them, within the
        # scenario's deadline.
        while True:
            seen = set(recorder.ids())
            missing = [e["event_name"] for e in durable if e["event_id"] not in seen]
            if not missing:
                break
            if time.monotonic() >= deadline:
                out.diffs.append(
                    "events: durable records never reached the subscriber: " + ", ".join(missing)
                )
                break
            time.sleep(CONDITION_POLL)
    if "dlq" in expect:
        entries = json.loads(_native.dlq_entries(tasker._engine, task.uuid))
        out.diffs.extend(compare_dlq(expect["dlq"], entries))


def _descendants(tasker: Tasker, uuid: str) -> list[str]:
    """The uuids of every task that workflow steps of ``uuid`` (and of its children) started."""
    found: list[str] = []
    try:
        for raw in json.loads(_native.child_tasks(tasker._engine, uuid)):
            found += [raw["uuid"], *_descendants(tasker, raw["uuid"])]
    except TaskerError:
        pass
    return found


def _child_of(tasker: Tasker, task: Task, step: str) -> Task | None:
    """The child task that workflow step ``step`` of ``task`` started, if any."""
    view = task.steps.get(step)
    if view is None:
        return None
    for raw in json.loads(_native.child_tasks(tasker._engine, task.uuid)):
        parent = raw.get("parent") or {}
        if parent.get("step_uuid") == view.uuid:
            return Task.from_json(json.dumps(raw))
    return None


def _describe(when: dict[str, Any]) -> str:
    what = f"task {when['task']}" if "task" in when else f"step {when['step']} {when['state']}"
    return f"{what} in the child of {when['child']}" if "child" in when else what


def _wait_for(tasker: Tasker, uuid: str, when: dict[str, Any], deadline: float) -> Task:
    """Looks at the task until ``when`` holds. Fails when the deadline passes or the task
    (or the child the condition is about) comes to rest first: it would never hold then."""
    while True:
        parent = tasker.get_task(uuid)
        subject: Task | None = parent
        if "child" in when:
            subject = _child_of(tasker, parent, when["child"])
        if subject is not None:
            if "task" in when:
                holds = subject.status == when["task"]
            else:
                step = subject.steps.get(when["step"])
                holds = step is not None and step.state == when["state"]
            if holds:
                return subject
        resting = subject or parent
        if resting.status in ("complete", "error", "cancelled", "resolved_manually") or (
            resting.status == "blocked_by_failures"
        ):
            raise _Stop(
                f"waiting for {_describe(when)}, but the task came to rest in {resting.status}"
            )
        if time.monotonic() >= deadline:
            raise _Stop(
                f"waiting for {_describe(when)}: deadline passed with the task {resting.status}"
            )
        time.sleep(CONDITION_POLL)


def _apply(tasker: Tasker, uuid: str, action: dict[str, Any], scenario: str) -> None:
    reason = f"conformance scenario {scenario}"
    handle = tasker.task(uuid)
    kind = action["do"]
    if kind == "cancel_task":
        handle.cancel(reason)
    elif kind == "give_up":
        handle.give_up(reason)
    elif kind == "resolve_task":
        handle.resolve(reason)
    elif kind == "reset_step":
        handle.reset_step(action["step"], reason)
    elif kind == "resolve_step":
        handle.resolve_step(action["step"], reason)
    else:
        result = action.get("result")
        handle.complete_step(action["step"], {} if result is None else result, reason)


def _compare_create_error(expected: dict[str, Any], e: TaskerError) -> list[str]:
    diffs = []
    if e.code != expected["kind"]:
        diffs.append(f"create: expected a {expected['kind']} error, got {e.code}: {e}")
    for s in expected.get("contains") or []:
        if s not in e.message:
            diffs.append(f"create: expected the message to contain {s!r}, got {e.message!r}")
    if "pointers" in expected:
        details = e.details if isinstance(e.details, dict) else {}
        found = sorted(
            {
                v["pointer"]
                for v in details.get("violations") or []
                if isinstance(v, dict) and isinstance(v.get("pointer"), str)
            }
        )
        want = sorted(expected["pointers"])
        if found != want:
            diffs.append(
                f"create: expected violation pointers {want}, got {found} (details {e.details!r})"
            )
    return diffs
