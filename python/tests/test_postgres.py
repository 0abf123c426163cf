"""The engine handle against a fresh PostgreSQL database (production mode: every process
shares it; an engine serves only the callables it has handlers for)."""

import asyncio
import os
import textwrap

from tasker_core import StepContext, StepHandler, StepHandlerResult, Tasker
from tasker_core.errors import RetryableError

DIAMOND = """
name: diamond
namespace_name: pg
version: "1.0.0"
identity_strategy: always_unique
steps:
  - {name: start, handler: {callable: pg_add}}
  - {name: left, handler: {callable: pg_add}, dependencies: [start]}
  - {name: right, handler: {callable: pg_async_add}, dependencies: [start]}
  - {name: end, handler: {callable: pg_add}, dependencies: [left, right]}
"""

FLAKY = """
name: flaky
namespace_name: pg
version: "1.0.0"
identity_strategy: always_unique
steps:
  - name: only
    handler: {callable: pg_flaky}
    retry: {max_attempts: 1}
"""

BY_PATH = """
name: by_path
namespace_name: pg
version: "1.0.0"
identity_strategy: always_unique
steps:
  - {name: double, handler: {callable: sample_handlers.Double}}
"""


class Add(StepHandler):
    handler_name = "pg_add"

    def call(self, context: StepContext) -> StepHandlerResult:
        parents = [r["value"] for r in context.dependency_results.values()]
        return self.success({"value": sum(parents) + context.get_input_or("add", 1)})


class AsyncAdd(StepHandler):
    handler_name = "pg_async_add"

    async def call(self, context: StepContext) -> StepHandlerResult:
        await asyncio.sleep(0.01)
        return self.success({"value": context.get_dependency_field("start", "value") + 10})


class Flaky(StepHandler):
    """Fails while the task's context says so; operators fix the context's cause and retry."""

    handler_name = "pg_flaky"
    failures_left = 1

    def call(self, context: StepContext) -> StepHandlerResult:
        if Flaky.failures_left > 0:
            Flaky.failures_left -= 1
            raise RetryableError("gateway unavailable", error_code="gateway_503")
        return self.success({"attempt": context.attempts})


def test_a_diamond_with_an_async_branch_completes_on_postgres(postgres_url):
    with Tasker(postgres_url, handlers=[Add, AsyncAdd]) as tasker:
        tasker.register_template(DIAMOND)
        task = tasker.run_task("diamond", namespace="pg", context={"add": 1}, timeout=60)
    assert task.status == "complete", task.steps
    # Every ancestor's result reaches a step: start 1; left 1 + 1 = 2; right 1 + 10 = 11;
    # end 1 + 2 + 11 + 1 = 15.
    assert task.results == {
        "start": {"value": 1},
        "left": {"value": 2},
        "right": {"value": 11},
        "end": {"value": 15},
    }
    assert all(s.attempts == 1 for s in task.steps.values())


def test_a_failure_blocks_the_task_until_an_operator_resets_the_step(postgres_url):
    Flaky.failures_left = 1
    with Tasker(postgres_url, handlers=[Flaky]) as tasker:
        tasker.register_template(FLAKY)
        handle = tasker.create_task("flaky", namespace="pg")
        task = handle.wait(timeout=60)
        assert task.status == "blocked_by_failures"
        error = task.steps["only"].error
        assert error["error_type"] == "retryable_error"
        assert error["error_code"] == "gateway_503"
        handle.reset_step("only", reason="gateway is back")
        task = handle.wait(timeout=60)
        transitions = tasker.transitions(handle.uuid)
    assert task.status == "complete"
    assert Flaky.failures_left == 0  # it failed once, then ran again after the reset
    assert task.results["only"] == {"attempt": 1}  # a reset gives a fresh attempt budget
    assert any("gateway is back" in (t.get("reason") or "") for t in transitions["steps"])


def test_a_task_created_by_one_engine_runs_on_another_that_serves_it(postgres_url):
    # The client has no handlers: on a shared database it leaves the steps to others.
    with Tasker(postgres_url) as client:
        client.register_template(DIAMOND)
        handle = client.create_task("diamond", namespace="pg", context={"add": 2})
        assert client.get_task(handle.uuid).steps["start"].attempts == 0
        with Tasker(postgres_url, handlers=[Add, AsyncAdd], namespaces=["pg"]) as worker:
            task = handle.wait(timeout=60)
            assert task.status == "complete"
            # start 2, left 2 + 2, right 2 + 10, end 2 + 4 + 12 + 2
            assert task.results["end"] == {"value": 20}
            assert {s.name for s in task.steps.values()} == {"start", "left", "right", "end"}
            assert worker.worker_id != client.worker_id


def test_templates_registered_by_another_process_are_served_by_import_path(postgres_url):
    with Tasker(postgres_url) as client:
        client.register_template(BY_PATH)
        handle = client.create_task("by_path", namespace="pg", context={"n": 21})
        with Tasker(postgres_url) as worker:
            assert worker.served_callables == frozenset()
            infos = worker.serve_registered_templates(["pg"])
            assert [(t.name, t.callables) for t in infos] == [
                ("by_path", ("sample_handlers.Double",))
            ]
            assert worker.served_callables == {"sample_handlers.Double"}
            task = handle.wait(timeout=60)
    assert task.status == "complete"
    assert task.results["double"] == {"value": 42}


def test_a_forked_child_runs_tasks_on_postgres(postgres_url):
    with Tasker(postgres_url) as parent:
        parent.register_template(DIAMOND)
        handle = parent.create_task("diamond", namespace="pg", context={"add": 1})
        pid = os.fork()
        if pid == 0:  # the child: its own engine, the parent's is unusable here
            code = 1
            try:
                with Tasker(postgres_url, handlers=[Add, AsyncAdd]) as child:
                    done = child.task(handle.uuid).wait(timeout=60)
                    code = 0 if done.status == "complete" else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        task = handle.wait(timeout=10)
    assert task.status == "complete"
    assert task.results["end"] == {"value": 15}


def test_shutdown_reports_what_finished(postgres_url):
    tasker = Tasker(postgres_url, handlers=[Add])
    tasker.register_template(
        textwrap.dedent(
            """
            name: one
            namespace_name: pg
            version: "1.0.0"
            identity_strategy: always_unique
            steps:
              - {name: only, handler: {callable: pg_add}}
            """
        )
    )
    assert tasker.run_task("one", namespace="pg", timeout=60).status == "complete"
    assert tasker.shutdown(5.0) == (0, 0)  # nothing was running
    assert tasker.shutdown(5.0) == (0, 0)  # idempotent
