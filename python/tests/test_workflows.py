"""Python handlers running real workflows on an embedded SQLite file."""

import asyncio
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from tasker_core import ErrorType, StepContext, StepHandler, StepHandlerResult, Tasker
from tasker_core.errors import (
    NotFoundError,
    PermanentError,
    ShutdownError,
    TaskCreationError,
    TemplateError,
    ValidationError,
)

LINEAR = """
name: linear
namespace_name: py
version: "1.0.0"
identity_strategy: always_unique
steps:
  - {name: a, handler: {callable: square}}
  - {name: b, handler: {callable: square}, dependencies: [a]}
  - {name: c, handler: {callable: square}, dependencies: [b]}
  - {name: d, handler: {callable: square}, dependencies: [c]}
"""

DIAMOND = """
name: diamond
namespace_name: py
version: "1.0.0"
identity_strategy: always_unique
steps:
  - {name: start, handler: {callable: square}}
  - {name: left, handler: {callable: square}, dependencies: [start]}
  - {name: right, handler: {callable: async_square}, dependencies: [start]}
  - {name: end, handler: {callable: multiply_parents}, dependencies: [left, right]}
"""


def one_step(name, callable_, retry="{max_attempts: 1}"):
    return textwrap.dedent(
        f"""
        name: {name}
        namespace_name: py
        version: "1.0.0"
        identity_strategy: always_unique
        steps:
          - name: only
            handler: {{callable: {callable_}}}
            retry: {retry}
        """
    )


class Square(StepHandler):
    handler_name = "square"

    def call(self, context: StepContext) -> StepHandlerResult:
        parents = list(context.dependency_results.values())
        direct = [context.get_dependency_result(d) for d in ("a", "b", "c", "start")]
        n = context.get_input("n")
        for name in ("c", "b", "a", "start"):
            if name in context.dependency_results and context.step_name != name:
                n = context.get_dependency_result(name)["value"]
                break
        assert parents or direct is not None
        return StepHandlerResult.success(result={"value": n * n})


class AsyncSquare(StepHandler):
    handler_name = "async_square"

    async def call(self, context: StepContext) -> StepHandlerResult:
        await asyncio.sleep(0.01)
        n = context.get_dependency_field("start", "value")
        return StepHandlerResult.success(result={"value": n * n})


class MultiplyParents(StepHandler):
    handler_name = "multiply_parents"

    def call(self, context):
        left = context.get_dependency_field("left", "value")
        right = context.get_dependency_field("right", "value")
        return self.success({"value": left * right})


def test_linear_workflow_squares_four_times(tasker):
    tasker.register_template(LINEAR)
    tasker.register_handler(Square)
    task = tasker.run_task("linear", namespace="py", context={"n": 2}, timeout=30)
    assert task.status == "complete"
    assert task.results["d"] == {"value": 2**16}
    assert [task.steps[s].state for s in "abcd"] == ["complete"] * 4
    assert all(task.steps[s].attempts == 1 for s in "abcd")


def test_create_tasks_creates_many_at_once_in_order(tasker):
    tasker.register_template(LINEAR)
    tasker.register_handler(Square)
    contexts = [{"n": 1 + i % 8, "i": i} for i in range(40)]
    handles = tasker.create_tasks("linear", contexts, namespace="py")
    assert len(handles) == 40
    assert len({h.uuid for h in handles}) == 40
    for context, handle in zip(contexts, handles, strict=True):
        task = handle.wait(timeout=60)
        assert task.status == "complete"
        assert task.context == context
        assert task.results["d"] == {"value": context["n"] ** 16}


def test_create_tasks_reports_each_refusal_and_keeps_the_others(tasker):
    tasker.register_template(
        LINEAR.replace("name: linear", "name: checked").replace(
            "steps:",
            "input_schema:\n  type: object\n  required: [n]\n"
            "  properties: {n: {type: integer}}\nsteps:",
        )
    )
    tasker.register_handler(Square)
    with pytest.raises(TaskCreationError) as caught:
        tasker.create_tasks("checked", [{"n": 2}, {"n": "two"}, {"n": 3}, {}], namespace="py")
    error = caught.value
    assert sorted(error.errors) == [1, 3]
    assert all(isinstance(e, ValidationError) for e in error.errors.values())
    assert "/n" in str(error.errors[1].details) or "n" in error.errors[1].message
    assert "2 of 4 tasks were refused" in error.message
    assert error.handles[1] is None and error.handles[3] is None
    for i, n in ((0, 2), (2, 3)):
        task = error.handles[i].wait(timeout=30)
        assert task.status == "complete"
        assert task.results["d"] == {"value": n**16}


def test_diamond_workflow_with_an_async_handler(tasker):
    tasker.register_template(DIAMOND)
    for h in (Square, AsyncSquare, MultiplyParents):
        tasker.register_handler(h)
    task = tasker.run_task("diamond", namespace="py", context={"n": 3}, timeout=30)
    assert task.status == "complete", task.steps
    # start = 9; left = right = 81; end = 81 * 81
    assert task.results["end"] == {"value": 81 * 81}


def test_a_raised_exception_fails_the_step_with_message_and_traceback(tasker):
    class Boom(StepHandler):
        handler_name = "boom"

        def call(self, context):
            raise KeyError("no such sku")

    tasker.register_template(one_step("boom", "boom"))
    tasker.register_handler(Boom)
    task = tasker.run_task("boom", namespace="py", timeout=30)
    assert task.status == "blocked_by_failures"
    error = task.steps["only"].error
    assert error["error_type"] == "handler_error"
    assert "KeyError" in error["message"] and "no such sku" in error["message"]
    assert "Traceback" in error["backtrace"] and "raise KeyError" in error["backtrace"]


def test_a_permanent_error_is_not_retried(tasker):
    class Declined(StepHandler):
        handler_name = "declined"

        def call(self, context):
            raise PermanentError("card declined", error_code="DECLINED")

    tasker.register_template(one_step("declined", "declined", "{max_attempts: 3}"))
    tasker.register_handler(Declined)
    task = tasker.run_task("declined", namespace="py", timeout=30)
    step = task.steps["only"]
    assert step.state == "error" and step.attempts == 1
    assert step.error["error_type"] == "permanent_error"
    assert step.error["error_code"] == "DECLINED" and step.error["retryable"] is False


def test_a_retryable_failure_retries_until_success(tasker):
    calls = []

    class Flaky(StepHandler):
        handler_name = "flaky"

        def call(self, context):
            calls.append(context.attempts)
            if context.attempts < 3:
                return StepHandlerResult.failure(
                    message="gateway busy",
                    error_type=ErrorType.RETRYABLE_ERROR,
                    retryable=True,
                    error_code="BUSY",
                )
            return StepHandlerResult.success(result={"attempt": context.attempts})

    tasker.register_template(one_step("flaky", "flaky", "{max_attempts: 3, backoff: none}"))
    tasker.register_handler(Flaky)
    task = tasker.run_task("flaky", namespace="py", timeout=30)
    assert task.status == "complete"
    assert task.steps["only"].attempts == 3 and calls == [1, 2, 3]
    assert task.results["only"] == {"attempt": 3}


def test_a_non_serialisable_result_fails_with_invalid_result_and_the_worker_goes_on(tasker):
    class Bad(StepHandler):
        handler_name = "bad"

        def call(self, context):
            return StepHandlerResult.success(result={"lock": threading.Lock()})

    tasker.register_template(one_step("bad", "bad", "{max_attempts: 3}"))
    tasker.register_template(LINEAR)
    tasker.register_handler(Bad)
    tasker.register_handler(Square)
    task = tasker.run_task("bad", namespace="py", timeout=30)
    step = task.steps["only"]
    assert step.state == "error" and step.attempts == 1
    assert step.error["error_type"] == "invalid_result"
    assert "not JSON-serialisable" in step.error["message"] and "lock" in step.error["message"]
    # the same worker threads still run work
    again = tasker.run_task("linear", namespace="py", context={"n": 1}, timeout=30)
    assert again.status == "complete"


def test_a_handler_named_by_import_path_is_resolved(tasker):
    tasker.register_template(one_step("by_path", "sample_handlers.Double"))
    task = tasker.run_task("by_path", namespace="py", context={"n": 21}, timeout=30)
    assert task.status == "complete"
    assert task.results["only"] == {"value": 42}


def test_a_handler_registered_after_the_workers_started_is_served(tasker):
    tasker.register_template(LINEAR)
    tasker.register_handler(Square)
    assert tasker.run_task("linear", namespace="py", context={"n": 1}, timeout=30).is_complete
    tasker.register_template(DIAMOND)
    tasker.register_handler(AsyncSquare)
    tasker.register_handler(MultiplyParents)
    task = tasker.run_task("diamond", namespace="py", context={"n": 2}, timeout=30)
    assert task.results["end"] == {"value": 256}


def test_engine_errors_are_tasker_errors(tasker):
    with pytest.raises(NotFoundError):
        tasker.get_task("00000000-0000-0000-0000-000000000000")
    with pytest.raises(TemplateError) as info:
        tasker.register_template(
            "name: x\nnamespace_name: py\nversion: '1'\nsteps:\n"
            "  - {name: a, handler: {callable: c}, dependencies: [zz]}\n"
        )
    assert info.value.code == "template_error"


def test_tasks_survive_on_the_sqlite_file_across_engines(tmp_path):
    url = f"sqlite:{tmp_path / 'shared.db'}"
    with Tasker(url, poll_interval_ms=50) as first:
        first.register_template(LINEAR)
        first.register_handler(Square)
        uuid = first.run_task("linear", namespace="py", context={"n": 3}, timeout=30).uuid
    with Tasker(url) as second:
        assert second.get_task(uuid).results["a"] == {"value": 9}


def test_a_script_runs_a_workflow_in_a_fresh_interpreter(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from tasker_core import StepHandler, StepHandlerResult, Tasker

            class Square(StepHandler):
                handler_name = "square"
                def call(self, context):
                    deps = context.dependency_results
                    n = deps[sorted(deps)[-1]]["value"] if deps else context.get_input("n")
                    return StepHandlerResult.success(result={{"value": n * n}})

            with Tasker("sqlite:{tmp_path / "script.db"}", handlers=[Square]) as t:
                t.register_template({LINEAR!r})
                task = t.run_task("linear", namespace="py", context={{"n": 2}}, timeout=30)
                print(task.status, task.results["d"]["value"])
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["complete", str(2**16)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_opens_its_own_engine(tasker, tmp_path):
    tasker.register_template(LINEAR)
    tasker.register_handler(Square)
    assert tasker.run_task("linear", namespace="py", context={"n": 1}, timeout=30).is_complete
    pid = os.fork()
    if pid == 0:  # the child: the parent's engine refuses, a new one works
        code = 1
        try:
            try:
                tasker.get_task("x")
            except ShutdownError:
                with Tasker(f"sqlite:{tmp_path / 'child.db'}", handlers=[Square]) as child:
                    child.register_template(LINEAR)
                    task = child.run_task("linear", namespace="py", context={"n": 2}, timeout=30)
                    code = 0 if task.results["d"] == {"value": 2**16} else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # the parent's engine is unaffected
    assert tasker.run_task("linear", namespace="py", context={"n": 3}, timeout=30).is_complete
