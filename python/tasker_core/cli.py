"""The command line of tasker-py: ``python -m tasker_core COMMAND``.

``worker``
    Serves the steps of some namespaces with Python handlers against a database (PostgreSQL
    in production, where any number of workers share one database) until SIGTERM or Ctrl-C,
    then drains: no new claims, running handlers get ``--shutdown-timeout`` seconds, the rest
    is handed back to other workers.

``run TEMPLATE --context JSON|@FILE``
    The one-shot run of ``tasker-ctl run`` (the core's own command: live progress, summary
    table, ``--format json``, exit 0 only when the task completes, re-running attaches to the
    same task) with the steps served by Python handlers.

Every other command (``task``, ``template``, ``dlq``, ``migrate`` ...) is ``tasker-ctl``'s.

Handlers are found by ``handler_name`` (classes and decorated functions of the modules named
with ``--module``, repeatable) or by the import path a template's ``callable`` names
(``package.module.Class``). Exit codes are ``tasker-ctl``'s: 0 success, 1 the task did not
complete (or the command was refused), 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType, ModuleType

from tasker_core import _native
from tasker_core.engine import Tasker
from tasker_core.errors import TaskerError
from tasker_core.registry import HandlerRegistry, HandlerSpec
from tasker_core.step_handler import StepHandler
from tasker_core.step_handler.functional import handler_for
from tasker_core.worker import WorkerPool

__all__ = ["CliError", "handlers_in", "import_handler_modules", "main"]

PROG = "python -m tasker_core"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Options of `tasker-ctl run` that take a value: the template is the first other argument.
_RUN_VALUE_OPTIONS = frozenset(
    {"--context", "--input", "--db", "--format", "--timeout", "--idempotency-key"}
)


_PREFACE = f"""tasker-py: Python handlers on the Tasker command line.

  {PROG} worker --database-url URL [--namespaces NS,...] [--templates PATH]...
      [--module MODULE]... [--threads N] [--shutdown-timeout S] [--processes N]
      serve steps with Python handlers until SIGTERM (see `{PROG} worker --help`)
  {PROG} run TEMPLATE --context JSON|@FILE [--db PATH] [--format table|json]
      [--module MODULE]... [--threads N]
      one task in this process, with Python handlers

The other commands are tasker-ctl's (the `worker` listed below is the Python one above):
"""


class CliError(Exception):
    """A command that cannot go on: the message for people and the exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.message = message
        self.code = code


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line ``argv`` (without the program name; default ``sys.argv[1:]``)
    and returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(_PREFACE, flush=True)
    try:
        if args and args[0] == "worker":
            return worker_command(args[1:])
        return ctl_command(args)
    except CliError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return e.code


# -- handler discovery -------------------------------------------------------------------------


def handlers_in(module: ModuleType) -> list[HandlerSpec]:
    """The handlers a module defines: its :class:`StepHandler` subclasses that implement
    ``call`` and its ``@step_handler`` functions (not those it imports from elsewhere)."""
    found: list[HandlerSpec] = []
    for obj in vars(module).values():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            if (
                issubclass(obj, StepHandler)
                and obj is not StepHandler
                and not inspect.isabstract(obj)
                and obj.call is not StepHandler.call
            ):
                found.append(obj)
        elif hasattr(obj, "handler_name") and handler_for(obj) is not None:
            # An @step_handler function (registered through the handler it runs as).
            found.append(obj)
    return found


def import_handler_modules(names: Sequence[str], registry: HandlerRegistry) -> list[str]:
    """Imports each module and registers the handlers it defines; returns the callables
    registered. A module that cannot be imported is a :class:`CliError` naming it."""
    # Handler modules are normally beside the command's working directory, as with `python -m`.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    served: list[str] = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise CliError(
                f"--module {name}: cannot import it: {e} (is its directory on PYTHONPATH or "
                "the working directory?)"
            ) from None
        except Exception as e:
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            raise CliError(
                f"--module {name}: importing it raised {type(e).__name__}:\n{tb}"
            ) from None
        handlers = handlers_in(module)
        if not handlers:
            raise CliError(
                f"--module {name}: it defines no handler (no StepHandler subclass with a "
                "call method, no @step_handler function)"
            )
        for h in handlers:
            try:
                served.extend(registry.register(h))
            except Exception as e:
                raise CliError(f"--module {name}: cannot register {h!r}: {e}") from None
    return served


def _take_option(args: list[str], name: str) -> list[str]:
    """Removes every ``name VALUE`` / ``name=VALUE`` from ``args``; returns the values."""
    values: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            rest.extend(args[i:])
            break
        if a == name:
            if i + 1 >= len(args):
                raise CliError(f"{name} needs a value")
            values.append(args[i + 1])
            i += 2
            continue
        if a.startswith(name + "="):
            values.append(a[len(name) + 1 :])
        else:
            rest.append(a)
        i += 1
    args[:] = rest
    return values


def _positive_int(raw: str, option: str) -> int:
    try:
        n = int(raw)
    except ValueError:
        raise CliError(f"{option} {raw}: expected a whole number") from None
    if n < 1:
        raise CliError(f"{option} {raw}: expected at least 1")
    return n


# -- tasker-ctl commands (run, and the operator commands) ---------------------------------------


def _run_template(args: Sequence[str]) -> str | None:
    """The TEMPLATE argument of ``run ...`` (``args`` without ``run``)."""
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return args[i + 1] if i + 1 < len(args) else None
        if a.startswith("-") and a != "-":
            i += 2 if a in _RUN_VALUE_OPTIONS else 1
            continue
        return a
    return None


def ctl_command(args: list[str]) -> int:
    """``run`` and the other ``tasker-ctl`` commands, on the core's command line, with the
    Python handlers of ``--module`` (and of the template's import paths) serving ``run``."""
    command = args[0] if args else ""
    modules: list[str] = []
    threads = 4
    if command in ("run", "serve"):
        modules = _take_option(args, "--module")
        raw_threads = _take_option(args, "--threads")
        if raw_threads:
            threads = _positive_int(raw_threads[-1], "--threads")
    registry = HandlerRegistry()
    callables = set(import_handler_modules(modules, registry))
    template = _run_template(args[1:]) if command == "run" else None
    if template is not None:
        try:
            info = json.loads(_native.load_template(template))
        except TaskerError:
            info = None  # the command itself reports every problem of the template
        if info is not None:
            callables.update(c for c in info["callables"] if registry.resolve(c) is not None)

    started: list[tuple[WorkerPool, _native.Engine]] = []

    def on_engine(engine: _native.Engine) -> None:
        pool = WorkerPool(engine, registry, concurrency=threads)
        started.append((pool, engine))
        if callables:
            pool.serve(callables)

    # Ctrl-C belongs to the command while it runs (it stops waiting and exits 130); Python's
    # own handler would raise KeyboardInterrupt in the middle of the clean-up afterwards.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = _native.run_cli([PROG, *args], on_engine)
    finally:
        # The task is over (or no longer waited for): handlers still running are abandoned
        # as the core abandons its own, their attempts retried once their leases run out.
        for pool, engine in started:
            pool.request_stop()
            engine.close()
            pool.stop(0.2)
        signal.signal(signal.SIGINT, previous)
    return code


# -- worker ---------------------------------------------------------------------------------------


def _worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} worker",
        description="Serve the steps of some namespaces with Python handlers until SIGTERM or "
        "Ctrl-C, then finish running steps and hand the rest back. Any number of workers "
        "share one PostgreSQL database.",
    )
    p.add_argument(
        "--database-url",
        "--db",
        metavar="URL",
        help="postgres://... or sqlite:PATH (default: $TASKER_DATABASE_URL, else $DATABASE_URL)",
    )
    p.add_argument(
        "--namespaces",
        metavar="NS,...",
        default="",
        help="namespaces whose steps this worker takes, comma separated (default: all)",
    )
    p.add_argument(
        "--templates",
        metavar="PATH",
        action="append",
        default=[],
        help="register the task templates of this file or directory first (repeatable); "
        "templates already in the database are served too",
    )
    p.add_argument(
        "--module",
        metavar="MODULE",
        action="append",
        default=[],
        help="import this module and serve the handlers it defines (repeatable)",
    )
    p.add_argument(
        "--threads",
        metavar="N",
        type=int,
        default=8,
        help="handlers running at once at most (threads; async handlers share one event loop)",
    )
    p.add_argument(
        "--shutdown-timeout",
        metavar="SECONDS",
        type=float,
        default=30.0,
        help="on SIGTERM or Ctrl-C, how long running handlers may take to finish before "
        "their steps are handed back (default: 30)",
    )
    p.add_argument(
        "--processes",
        metavar="N",
        type=int,
        default=1,
        help="prefork N worker processes after importing the handler modules (default: 1)",
    )
    p.add_argument(
        "--refresh",
        metavar="SECONDS",
        type=float,
        default=5.0,
        help="how often templates registered in the database by others are looked for",
    )
    return p


@dataclass
class WorkerOptions:
    """What ``python -m tasker_core worker`` was asked to do."""

    database_url: str
    namespaces: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    threads: int = 8
    shutdown_timeout: float = 30.0
    processes: int = 1
    refresh: float = 5.0


def parse_worker_args(argv: Sequence[str]) -> WorkerOptions:
    """Parses the ``worker`` arguments; bad ones are a :class:`CliError` (exit 2)."""
    parser = _worker_parser()
    try:
        ns = parser.parse_args(list(argv))
    except SystemExit as e:  # argparse printed the usage and the problem
        raise CliError("invalid arguments (see above)", int(e.code or 0)) from None
    url = ns.database_url or os.environ.get("TASKER_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if not url:
        raise CliError(
            "no database: pass --database-url postgres://... (or sqlite:PATH), or set "
            "TASKER_DATABASE_URL or DATABASE_URL"
        )
    if not url.startswith(("postgres://", "postgresql://", "sqlite:")):
        raise CliError(
            f"--database-url {url}: not a database URL (expected postgres://..., "
            "postgresql://... or sqlite:PATH)"
        )
    for option, value in (("--threads", ns.threads), ("--processes", ns.processes)):
        if value < 1:
            raise CliError(f"{option} {value}: expected at least 1")
    if not ns.shutdown_timeout >= 0:
        raise CliError(f"--shutdown-timeout {ns.shutdown_timeout}: expected seconds >= 0")
    if not ns.refresh > 0:
        raise CliError(f"--refresh {ns.refresh}: expected seconds > 0")
    for path in ns.templates:
        if not os.path.exists(path):
            raise CliError(f"--templates {path}: no such file or directory")
    return WorkerOptions(
        database_url=url,
        namespaces=[n.strip() for n in ns.namespaces.split(",") if n.strip()],
        templates=list(ns.templates),
        modules=list(ns.module),
        threads=ns.threads,
        shutdown_timeout=ns.shutdown_timeout,
        processes=ns.processes,
        refresh=ns.refresh,
    )


class _Stop:
    """SIGTERM / SIGINT set this; the main thread waits on it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = "SIGTERM" if signum == signal.SIGTERM else "interrupted"
        self.event.set()


def worker_command(argv: Sequence[str]) -> int:
    """``python -m tasker_core worker ...``; returns the exit code."""
    options = parse_worker_args(argv)
    if not logging.getLogger().handlers:
        # The worker's own warnings (a result not applied, a loop error) with a timestamp;
        # TASKER_PY_LOG=INFO|DEBUG shows more.
        level = os.environ.get("TASKER_PY_LOG", "WARNING").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise CliError(f"TASKER_PY_LOG={level}: expected DEBUG, INFO, WARNING or ERROR")
        logging.basicConfig(
            level=level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    # Imported once, before any fork: a prefork parent shares the imported code.
    registry = HandlerRegistry()
    import_handler_modules(options.modules, registry)
    if options.processes == 1:
        return serve(options, registry)
    return prefork(options, registry)


def _open(options: WorkerOptions, registry: HandlerRegistry) -> Tasker:
    try:
        tasker = Tasker(
            options.database_url,
            concurrency=options.threads,
            namespaces=options.namespaces,
            # Another process may serve what this one does not (on SQLite too).
            fail_unknown_callables=False,
        )
    except TaskerError as e:
        raise CliError(f"cannot open the database {options.database_url}: {e}") from None
    try:
        for name in registry.names():
            handler = registry.get(name)
            if handler is not None:
                tasker.register_handler(handler, name)
        for path in options.templates:
            tasker.register_templates(path)
        known = tasker.serve_registered_templates(options.namespaces)
    except TaskerError as e:
        tasker.close(0)
        raise CliError(str(e)) from None
    registered = {t.namespace for t in tasker.registered_templates()}
    unknown = [n for n in options.namespaces if n not in registered]
    if unknown:
        tasker.close(0)
        raise CliError(
            f"unknown namespace{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: no "
            f"template of {'them' if len(unknown) > 1 else 'it'} is registered in the database "
            f"(registered: {', '.join(sorted(registered)) or 'none'}); pass --templates PATH"
        )
    if not tasker.served_callables:
        tasker.close(0)
        callables = sorted({c for t in known for c in t.callables})
        raise CliError(
            "nothing to serve: no handler from --module and no template callable importable "
            f"as a handler (template callables: {', '.join(callables) or 'none'})"
        )
    return tasker


def serve(options: WorkerOptions, registry: HandlerRegistry) -> int:
    """Serves until SIGTERM / SIGINT, then drains; returns the exit code."""
    stop = _Stop()
    stop.install()
    tasker = _open(options, registry)
    scope = ", ".join(options.namespaces) if options.namespaces else "all namespaces"
    served = sorted(tasker.served_callables)
    print(
        f"worker {tasker.worker_id} (pid {os.getpid()}) serving {scope} with "
        f"{options.threads} threads: {', '.join(served)}",
        file=sys.stderr,
        flush=True,
    )
    while not stop.event.wait(options.refresh):
        # Templates registered by others since: their import-path callables may be ours.
        try:
            tasker.serve_registered_templates(options.namespaces)
        except TaskerError as e:
            print(f"warning: cannot list the registered templates: {e}", file=sys.stderr)
    print(
        f"{stop.signal_name}: finishing running steps (up to {options.shutdown_timeout:g} s)",
        file=sys.stderr,
        flush=True,
    )
    finished, handed_back = tasker.shutdown(options.shutdown_timeout)
    print(f"stopped: {finished} finished, {handed_back} handed back", file=sys.stderr, flush=True)
    return EXIT_OK


def prefork(options: WorkerOptions, registry: HandlerRegistry) -> int:
    """Forks ``options.processes`` workers (each opens its own engine) and waits for them;
    SIGTERM / SIGINT are passed on, and a worker that exits on its own stops the others.
    Exit 0 when every worker exited 0, else the first failure's code."""
    stop = _Stop()
    stop.install()
    children: list[int] = []
    for _ in range(options.processes):
        pid = os.fork()
        if pid == 0:
            code = EXIT_FAILED
            try:
                code = serve(options, registry)
            except CliError as e:
                print(f"error: {e.message}", file=sys.stderr, flush=True)
                code = e.code
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)
    codes: dict[int, int] = {}
    forwarded = False
    while len(codes) < len(children):
        if stop.event.is_set() and not forwarded:
            forwarded = True
            for pid in children:
                if pid not in codes:
                    _signal(pid, signal.SIGTERM)
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            stop.event.wait(0.2)
            continue
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] != 0 and not stop.event.is_set():
            # A worker died on its own: stop the others rather than run short-handed.
            print(f"worker process {pid} exited with {codes[pid]}; stopping", file=sys.stderr)
            stop.signal_name = "worker exited"
            stop.event.set()
    # The first failure's code (2 for bad input, as a single worker would exit).
    return next((c if c > 0 else EXIT_FAILED for c in codes.values() if c != 0), EXIT_OK)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it already exited
        os.kill(pid, sig)
