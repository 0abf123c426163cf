"""``python -m tasker_core`` as a user runs it: worker processes sharing one PostgreSQL
database, and the one-shot ``run``. Handlers append one line per invocation to a log file, so
every test counts what really ran, in which process and which attempt."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tasker_core import StepContext, StepHandler, StepHandlerResult, Tasker

HANDLERS = '''
"""Handlers of the command-line tests: each invocation appends a line to $TASKER_TEST_LOG."""

import os
import time

from tasker_core import StepHandler, StepHandlerResult
from tasker_core.errors import PermanentError


def log(context, what):
    line = f"{what} {context.step_uuid} {context.step_name} {context.attempts} {os.getpid()}\\n"
    with open(os.environ["TASKER_TEST_LOG"], "a") as f:
        f.write(line)


class Record(StepHandler):
    handler_name = "record"

    def call(self, context):
        log(context, "ran")
        time.sleep(float(context.get_input_or("sleep", 0.02)))
        total = sum(r["n"] for r in context.dependency_results.values()) + 1
        return StepHandlerResult.success(result={"n": total, "pid": os.getpid()})


class Stall(StepHandler):
    """Attempt 1 hangs (its process is killed or its steps handed back); later ones succeed."""

    handler_name = "stall"

    def call(self, context):
        log(context, "start")
        if context.attempts == 1:
            time.sleep(120)
        log(context, "ran")
        return StepHandlerResult.success(result={"attempt": context.attempts})


class Decline(StepHandler):
    handler_name = "decline"

    def call(self, context):
        log(context, "ran")
        raise PermanentError("card declined", error_code="card_declined")
'''

LINEAR = """
name: linear3
namespace_name: cli
version: "1.0.0"
identity_strategy: always_unique
steps:
  - {name: a, handler: {callable: record}}
  - {name: b, handler: {callable: cli_handlers.Record}, dependencies: [a]}
  - {name: c, handler: {callable: record}, dependencies: [b]}
"""

STALL = """
name: stall
namespace_name: cli
version: "1.0.0"
identity_strategy: always_unique
steps:
  - name: hang
    handler: {callable: stall}
    retry: {max_attempts: 3, backoff: none}
"""

RUN_OK = """
name: run_ok
namespace_name: cli
version: "1.0.0"
steps:
  - {name: first, handler: {callable: record}}
  - {name: second, handler: {callable: cli_handlers.Record}, dependencies: [first]}
"""

RUN_STALL = """
name: run_stall
namespace_name: cli
version: "1.0.0"
steps:
  - {name: first, handler: {callable: record}}
  - name: hang
    handler: {callable: cli_handlers.Stall}
    dependencies: [first]
    retry: {max_attempts: 3, backoff: none}
"""

RUN_DECLINE = """
name: run_decline
namespace_name: cli
version: "1.0.0"
steps:
  - {name: charge, handler: {callable: decline}, retry: {max_attempts: 2, backoff: none}}
"""


def wait_for(condition, timeout, what):
    """Polls ``condition`` until it is true; fails naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Workspace:
    """A directory with the handler module, templates and the invocation log."""

    def __init__(self, root: Path):
        self.root = root
        (root / "cli_handlers.py").write_text(HANDLERS)
        self.templates = root / "templates"
        self.templates.mkdir()
        self.log = root / "invocations.log"
        self.log.touch()
        self.procs: list[subprocess.Popen] = []

    def template(self, name, text):
        path = self.templates / f"{name}.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    def env(self, **extra):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.root), env.get("PYTHONPATH", "")])
        env["TASKER_TEST_LOG"] = str(self.log)
        env.pop("TASKER_DATABASE_URL", None)
        env.pop("DATABASE_URL", None)
        env.update(extra)
        return env

    def start(self, name, *args, **env):
        """Starts ``python -m tasker_core ARGS``; its stdout/stderr go to files."""
        out = open(self.root / f"{name}.out", "w")  # noqa: SIM115 (closed with the process)
        err = open(self.root / f"{name}.err", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasker_core", *args],
            cwd=self.root,
            env=self.env(**env),
            stdout=out,
            stderr=err,
        )
        proc.name = name
        self.procs.append(proc)
        return proc

    def run(self, *args, timeout=90, **env):
        """Runs ``python -m tasker_core ARGS`` to the end."""
        return subprocess.run(
            [sys.executable, "-m", "tasker_core", *args],
            cwd=self.root,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stderr(self, name):
        return (self.root / f"{name}.err").read_text()

    def worker(self, name, url, *args, **env):
        """Starts a worker and waits until it serves."""
        proc = self.start(name, "worker", "--database-url", url, *args, **env)
        wait_for(
            lambda: "serving" in self.stderr(name) or proc.poll() is not None,
            60,
            f"worker {name} to start",
        )
        assert proc.poll() is None, self.stderr(name)
        return proc

    def invocations(self):
        """(what, step_uuid, step, attempt, pid) per line of the log."""
        rows = []
        for line in self.log.read_text().splitlines():
            what, step_uuid, step, attempt, pid = line.split()
            rows.append((what, step_uuid, step, int(attempt), int(pid)))
        return rows

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.fixture
def ws(tmp_path):
    w = Workspace(tmp_path)
    try:
        yield w
    finally:
        w.stop_all()


def terminate(proc, timeout=30, sig=signal.SIGTERM):
    proc.send_signal(sig)
    return proc.wait(timeout)


# -- workers on PostgreSQL -----------------------------------------------------------------------


def test_two_workers_share_a_database_and_run_every_step_exactly_once(ws, postgres_url):
    ws.template("linear3", LINEAR)
    # One worker registers the templates; the other learns them from the database.
    a = ws.worker(
        "a",
        postgres_url,
        "--templates",
        str(ws.templates),
        "--module",
        "cli_handlers",
        "--namespaces",
        "cli",
        "--threads",
        "2",
    )
    # No --module: b serves only what the templates in the database name by import path.
    b = ws.worker("b", postgres_url, "--threads", "2")
    assert ws.stderr("b").rstrip().endswith("with 2 threads: cli_handlers.Record")

    with Tasker(postgres_url) as client:
        handles = [
            client.create_task("linear3", namespace="cli", context={"i": i, "sleep": 0.03})
            for i in range(20)
        ]
        tasks = [h.wait(timeout=90) for h in handles]
    assert [t.status for t in tasks] == ["complete"] * 20
    assert all(t.results["c"]["n"] == 4 for t in tasks)  # a 1, b 1+1, c 1+2+1
    assert all(s.attempts == 1 for t in tasks for s in t.steps.values())

    rows = ws.invocations()
    step_uuids = [r[1] for r in rows]
    expected = {s.uuid for t in tasks for s in t.steps.values()}
    assert len(step_uuids) == 60
    assert set(step_uuids) == expected  # every step ran, none twice
    assert {r[4] for r in rows} == {a.pid, b.pid}  # both processes took work
    assert {r[2] for r in rows if r[4] == b.pid} == {"b"}  # b only what it serves

    assert terminate(a) == 0
    assert terminate(b) == 0
    for name in ("a", "b"):
        err = ws.stderr(name)
        assert "SIGTERM: finishing running steps" in err
        assert "stopped:" in err


def test_a_killed_worker_step_reruns_on_the_other_after_its_lease(ws, postgres_url):
    ws.template("stall", STALL)
    lease = {"TASKER_LEASE_MS": "1500", "TASKER_LEASE_RENEW_MS": "300"}
    a = ws.worker(
        "a", postgres_url, "--templates", str(ws.templates), "--module", "cli_handlers", **lease
    )
    with Tasker(postgres_url) as client:
        handle = client.create_task("stall", namespace="cli")
        wait_for(lambda: ws.invocations(), 30, "the step to start on worker a")
        a.kill()
        a.wait(10)
        b = ws.worker("b", postgres_url, "--module", "cli_handlers", **lease)
        task = handle.wait(timeout=60)
    assert task.status == "complete", task.steps
    step = task.steps["hang"]
    assert step.attempts == 2
    assert step.result == {"attempt": 2}
    rows = ws.invocations()
    assert [(r[0], r[3], r[4]) for r in rows] == [
        ("start", 1, a.pid),
        ("start", 2, b.pid),
        ("ran", 2, b.pid),
    ]
    assert terminate(b) == 0


def test_sigterm_lets_a_running_step_finish_then_exits_0(ws, postgres_url):
    ws.template("linear3", LINEAR)
    a = ws.worker(
        "a",
        postgres_url,
        "--templates",
        str(ws.templates),
        "--module",
        "cli_handlers",
        "--shutdown-timeout",
        "30",
    )
    with Tasker(postgres_url) as client:
        handle = client.create_task("linear3", namespace="cli", context={"sleep": 1.5})
        wait_for(lambda: ws.invocations(), 30, "step a to start")
        code = terminate(a)
        task = client.get_task(handle.uuid)
    assert code == 0
    # Step a finished during the drain; nothing new was claimed after SIGTERM.
    assert task.steps["a"].state == "complete"
    assert task.steps["b"].attempts == 0
    assert [r[2] for r in ws.invocations()] == ["a"]
    assert "stopped: 1 finished, 0 handed back" in ws.stderr("a")


def test_ctrl_c_hands_back_what_does_not_finish_in_time(ws, postgres_url):
    ws.template("stall", STALL)
    a = ws.worker(
        "a",
        postgres_url,
        "--templates",
        str(ws.templates),
        "--module",
        "cli_handlers",
        "--shutdown-timeout",
        "0.5",
    )
    with Tasker(postgres_url) as client:
        handle = client.create_task("stall", namespace="cli")
        wait_for(lambda: ws.invocations(), 30, "the step to start")
        assert terminate(a, sig=signal.SIGINT) == 0
        assert "interrupted: finishing running steps (up to 0.5 s)" in ws.stderr("a")
        assert "stopped: 0 finished, 1 handed back" in ws.stderr("a")
        # Handed back means its lease ended now: the next worker re-runs it at once, long
        # before the default lease (30 s) could have run out.
        ws.worker("b", postgres_url, "--module", "cli_handlers")
        task = handle.wait(timeout=20)
    assert task.status == "complete"
    assert task.steps["hang"].attempts == 2


def test_prefork_workers_serve_and_stop_on_sigterm(ws, postgres_url):
    ws.template("linear3", LINEAR)
    parent = ws.start(
        "pre",
        "worker",
        "--database-url",
        postgres_url,
        "--templates",
        str(ws.templates),
        "--module",
        "cli_handlers",
        "--processes",
        "2",
        "--threads",
        "2",
    )
    wait_for(lambda: ws.stderr("pre").count("serving") == 2, 60, "two forked workers")
    with Tasker(postgres_url) as client:
        handles = [
            client.create_task("linear3", namespace="cli", context={"sleep": 0.03})
            for _ in range(10)
        ]
        assert all(h.wait(timeout=60).status == "complete" for h in handles)
    pids = {r[4] for r in ws.invocations()}
    assert parent.pid not in pids and len(pids) == 2
    assert terminate(parent) == 0
    assert ws.stderr("pre").count("stopped:") == 2


def test_a_worker_serves_templates_registered_after_it_started(ws, postgres_url):
    ws.template("linear3", LINEAR)
    (ws.root / "late_handlers.py").write_text(
        "from tasker_core import StepHandler, StepHandlerResult\n\n\n"
        "class Triple(StepHandler):\n"
        "    def call(self, context):\n"
        "        return StepHandlerResult.success(result={'n': 3 * context.get_input('n')})\n"
    )
    w = ws.worker(
        "w",
        postgres_url,
        "--templates",
        str(ws.templates),
        "--module",
        "cli_handlers",
        "--refresh",
        "0.2",
    )
    assert "late_handlers.Triple" not in ws.stderr("w")
    with Tasker(postgres_url) as client:
        client.register_template(
            textwrap.dedent(
                """
                name: late
                namespace_name: cli
                version: "1.0.0"
                steps:
                  - {name: triple, handler: {callable: late_handlers.Triple}}
                """
            )
        )
        task = client.run_task("late", namespace="cli", context={"n": 5}, timeout=30)
    assert task.status == "complete"
    assert task.results["triple"] == {"n": 15}
    assert terminate(w) == 0


def test_a_worker_serves_an_sqlite_file_too(ws):
    ws.template("linear3", LINEAR)
    url = f"sqlite:{ws.root / 'shared.db'}"
    w = ws.worker("w", url, "--templates", str(ws.templates), "--module", "cli_handlers")
    # The client runs no handler and, like the worker, leaves unknown callables to others.
    with Tasker(url, fail_unknown_callables=False) as client:
        task = client.create_task("linear3", namespace="cli").wait(timeout=60)
    assert task.status == "complete"
    assert {r[4] for r in ws.invocations()} == {w.pid}
    assert terminate(w) == 0


def test_worker_errors_are_clear(ws, postgres_url, tmp_path):
    ws.template("linear3", LINEAR)
    r = ws.run("worker", "--database-url", postgres_url, "--module", "no_such_handlers")
    assert r.returncode == 2
    assert "--module no_such_handlers: cannot import it" in r.stderr

    r = ws.run("worker", "--database-url", "mysql://x@localhost/db", "--module", "cli_handlers")
    assert r.returncode == 2
    assert "not a database URL" in r.stderr

    bad = postgres_url.rsplit("/", 1)[0] + "/tasker_no_such_database"
    r = ws.run("worker", "--database-url", bad, "--module", "cli_handlers")
    assert r.returncode == 2
    assert "cannot open the database" in r.stderr
    r = ws.run("worker", "--database-url", bad, "--module", "cli_handlers", "--processes", "2")
    assert r.returncode == 2  # the forked workers' own exit code
    assert "cannot open the database" in r.stderr

    r = ws.run(
        "worker",
        "--database-url",
        postgres_url,
        "--templates",
        str(ws.templates),
        "--module",
        "cli_handlers",
        "--namespaces",
        "cli,nowhere",
    )
    assert r.returncode == 2
    assert "unknown namespace nowhere" in r.stderr and "registered: cli" in r.stderr

    r = ws.run("worker", "--module", "cli_handlers")
    assert r.returncode == 2
    assert "no database" in r.stderr


# -- python -m tasker_core run --------------------------------------------------------------------


def test_run_happy_path_prints_the_summary_and_exits_0(ws):
    template = ws.template("run_ok", RUN_OK)
    db = ws.root / "run.db"
    r = ws.run(
        "run",
        str(template),
        "--context",
        '{"sleep": 0}',
        "--db",
        str(db),
        "--module",
        "cli_handlers",
    )
    assert r.returncode == 0, r.stderr
    assert "status: complete" in r.stdout
    for line in ("first", "second"):
        assert any(row.split()[:3] == [line, "complete", "1/3"] for row in r.stdout.splitlines())
    assert '"n":2' in r.stdout.replace(" ", "")  # second's result
    assert "created task" in r.stderr and "-> complete" in r.stderr  # progress lines
    assert len(ws.invocations()) == 2


def test_run_json_format_prints_one_task_document(ws):
    template = ws.template("run_ok", RUN_OK)
    r = ws.run(
        "run",
        str(template),
        "--context",
        '{"sleep": 0}',
        "--db",
        str(ws.root / "run.db"),
        "--module",
        "cli_handlers",
        "--format",
        "json",
    )
    assert r.returncode == 0, r.stderr
    task = json.loads(r.stdout)
    assert task["status"] == "complete"
    steps = {s["name"]: s for s in task["steps"]}
    assert steps["second"]["result"]["n"] == 2
    assert steps["first"]["result"]["pid"] != os.getpid()


def test_run_exits_1_when_the_task_does_not_complete(ws):
    template = ws.template("run_decline", RUN_DECLINE)
    r = ws.run("run", str(template), "--db", str(ws.root / "run.db"), "--module", "cli_handlers")
    assert r.returncode == 1
    assert "blocked_by_failures" in r.stdout
    assert "card declined" in r.stdout and "card_declined" in r.stdout
    assert len(ws.invocations()) == 1  # a permanent error is not retried


def test_run_bad_input_exits_2(ws):
    template = ws.template("run_ok", RUN_OK)
    r = ws.run("run", str(template), "--context", "[1]", "--module", "cli_handlers")
    assert r.returncode == 2
    assert "must be a JSON object" in r.stderr
    r = ws.run("run", str(template), "--module", "missing_mod")
    assert r.returncode == 2
    assert "--module missing_mod: cannot import it" in r.stderr


def test_run_again_after_sigkill_attaches_to_the_same_task_and_finishes_it(ws):
    template = ws.template("run_stall", RUN_STALL)
    db = str(ws.root / "run.db")
    args = (
        "run",
        str(template),
        "--context",
        '{"order": 7}',
        "--db",
        db,
        "--module",
        "cli_handlers",
    )
    lease = {"TASKER_LEASE_MS": "1000", "TASKER_LEASE_RENEW_MS": "200"}
    first = ws.start("first", *args, **lease)
    wait_for(lambda: any(r[0] == "start" for r in ws.invocations()), 60, "the hang step")
    first.kill()
    first.wait(10)

    r = ws.run(*args, "--format", "json", **lease)
    assert r.returncode == 0, r.stderr
    assert "attached to existing task" in r.stderr
    task = json.loads(r.stdout)
    assert task["status"] == "complete"
    steps = {s["name"]: s for s in task["steps"]}
    assert steps["first"]["attempts"] == 1  # not re-run: its result was committed
    assert steps["hang"]["attempts"] == 2
    assert steps["hang"]["result"] == {"attempt": 2}
    rows = ws.invocations()
    assert [(r[0], r[2], r[3]) for r in rows] == [
        ("ran", "first", 1),
        ("start", "hang", 1),
        ("start", "hang", 2),
        ("ran", "hang", 2),
    ]
    assert rows[1][4] == first.pid and rows[2][4] != first.pid


def test_run_ctrl_c_exits_130_and_the_task_keeps_its_state(ws):
    template = ws.template("run_stall", RUN_STALL)
    db = ws.root / "run.db"
    proc = ws.start("ctrl_c", "run", str(template), "--db", str(db), "--module", "cli_handlers")
    wait_for(lambda: any(r[0] == "start" for r in ws.invocations()), 60, "the hang step")
    started = time.monotonic()
    assert terminate(proc, sig=signal.SIGINT) == 130
    assert time.monotonic() - started < 5  # the hanging handler does not hold the exit
    assert "run the same command again to attach to it" in ws.stderr("ctrl_c")
    r = ws.run("task", "list", "--db", str(db), "--format", "json")
    assert r.returncode == 0, r.stderr
    assert [t["status"] for t in json.loads(r.stdout)] == ["steps_in_process"]


# -- async handlers past their timeout ----------------------------------------------------------


def test_an_async_handler_past_its_timeout_is_cancelled(tasker):
    cancelled = threading.Event()
    finished = threading.Event()

    class Slow(StepHandler):
        handler_name = "slow_async"

        async def call(self, context: StepContext) -> StepHandlerResult:
            import asyncio

            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            finished.set()
            return StepHandlerResult.success(result={})

    tasker.register_template(
        textwrap.dedent(
            """
            name: slow
            namespace_name: py
            version: "1.0.0"
            identity_strategy: always_unique
            steps:
              - name: only
                handler: {callable: slow_async}
                timeout_seconds: 1
                retry: {max_attempts: 1}
            """
        )
    )
    tasker.register_handler(Slow)
    started = time.monotonic()
    task = tasker.run_task("slow", namespace="py", timeout=30)
    assert task.status == "blocked_by_failures"
    assert task.steps["only"].error["error_type"] == "timeout"
    assert cancelled.wait(10), "the coroutine never got CancelledError"
    assert not finished.is_set()
    assert time.monotonic() - started < 10
