"""The Python worker: a pool of threads pulling jobs from the engine's dispatch port,
running the handler each job names and handing its outcome back. Waiting for work releases
the GIL; ``async def`` handlers run on one event loop thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import logging
import threading
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from tasker_core import _native
from tasker_core.context import StepContext
from tasker_core.errors import ShutdownError, StepError
from tasker_core.registry import HandlerRegistry
from tasker_core.types import ErrorType, StepHandlerResult

__all__ = ["WorkerPool", "execute"]

log = logging.getLogger("tasker_core.worker")

# How long one wait for work lasts; only bounds how fast a stop or a change of the served
# callables is noticed (new work wakes waiting threads at once).
_WAIT_SECONDS = 0.5


class _Overran(Exception):
    """An ``async def`` handler ran past its step's timeout and was cancelled."""

    def __init__(self, seconds: float):
        super().__init__(seconds)
        self.seconds = seconds


class _EventLoop:
    """One asyncio loop on its own thread for ``async def`` handlers."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        """Runs ``coro`` on the loop and returns its value. When ``timeout`` seconds pass
        first, the coroutine is cancelled (it gets ``CancelledError`` at its current
        ``await``) and :class:`_Overran` is raised."""
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="tasker-asyncio", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            loop = self._loop
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.done():
                raise  # the coroutine itself raised TimeoutError
            future.cancel()
            raise _Overran(timeout or 0.0) from None

    def close(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            if not thread.is_alive():
                loop.close()


def _failure_from_exception(exc: BaseException) -> StepHandlerResult:
    """SPEC §5.4: a raised PermanentError / RetryableError keeps its type; anything else is a
    retryable ``handler_error``; the exception class, message and traceback are recorded."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if isinstance(exc, StepError):
        result = StepHandlerResult.failure(
            exc.message or type(exc).__name__,
            error_type=exc.error_type,
            retryable=exc.retryable,
            error_code=exc.error_code,
            metadata=exc.metadata or None,
            retry_after_seconds=exc.retry_after_seconds,
        )
    else:
        result = StepHandlerResult.failure(
            f"{type(exc).__name__}: {exc}",
            error_type=ErrorType.HANDLER_ERROR,
            metadata={"exception_class": f"{type(exc).__module__}.{type(exc).__qualname__}"},
        )
    result.backtrace = tb
    return result


def _as_result(value: Any) -> StepHandlerResult:
    if isinstance(value, StepHandlerResult):
        return value
    return StepHandlerResult.failure(
        f"the handler returned {type(value).__name__}, not a StepHandlerResult "
        "(return StepHandlerResult.success(result=...) or .failure(...))",
        error_type=ErrorType.INVALID_RESULT,
        retryable=False,
    )


def execute(
    registry: HandlerRegistry, context: StepContext, loop: _EventLoop | None = None
) -> StepHandlerResult:
    """Runs the handler for ``context``'s callable and returns its result; never raises."""
    callable_name = context.handler_callable
    handler = registry.resolve(callable_name)
    if handler is None:
        return StepHandlerResult.failure(
            f"no handler for callable {callable_name!r}: not registered "
            f"(registered: {', '.join(registry.names()) or 'none'}) and not importable "
            "as a module path",
            error_type=ErrorType.HANDLER_NOT_FOUND,
            retryable=False,
        )
    try:
        if callable(handler) and not hasattr(handler, context.handler_method):
            value = handler(context)
        else:
            method = getattr(handler, context.handler_method, None)
            if method is None:
                return StepHandlerResult.failure(
                    f"handler {type(handler).__name__} has no method {context.handler_method!r}",
                    error_type=ErrorType.HANDLER_NOT_FOUND,
                    retryable=False,
                )
            value = method(context)
        if inspect.isawaitable(value):
            value = (loop or _EventLoop()).run(_await(value), _seconds_left(context))
    except _Overran as overran:
        return StepHandlerResult.failure(
            f"async handler for step {context.step_name!r} ran past the step's timeout "
            f"(cancelled after {overran.seconds:.3f} s)",
            error_type=ErrorType.TIMEOUT,
        )
    except Exception as exc:
        return _failure_from_exception(exc)
    return _as_result(value)


def _seconds_left(context: StepContext) -> float | None:
    """Time left before the attempt's deadline (``None`` when it has none)."""
    if not context.timeout_at:
        return None
    return max(context.timeout_at / 1000.0 - time.time(), 0.001)


async def _await(value: Any) -> Any:
    return await value


def outcome_json(result: StepHandlerResult) -> str:
    """The result's wire form as JSON; a result that is not JSON (an object, NaN, a set)
    becomes an ``invalid_result`` failure naming the reason."""
    try:
        return json.dumps(result.to_outcome(), allow_nan=False)
    except (TypeError, ValueError) as exc:
        failure = StepHandlerResult.failure(
            f"the step result is not JSON-serialisable: {exc}",
            error_type=ErrorType.INVALID_RESULT,
            retryable=False,
        )
        return json.dumps(failure.to_outcome())


class WorkerPool:
    """Threads serving the callables of a registry through one dispatch-port worker."""

    def __init__(
        self,
        engine: _native.Engine,
        registry: HandlerRegistry,
        *,
        concurrency: int = 4,
        namespaces: Sequence[str] = (),
    ):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._engine = engine
        self._registry = registry
        self._concurrency = concurrency
        self._namespaces = list(namespaces)
        self._callables: frozenset[str] = frozenset()
        self._port: _native.Worker | None = None
        self._port_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._loop = _EventLoop()

    @property
    def callables(self) -> frozenset[str]:
        return self._callables

    def serve(self, callables: set[str] | frozenset[str]) -> None:
        """Serves (at least) ``callables`` from now on and starts the threads if needed."""
        wanted = frozenset(callables) | self._callables
        with self._port_lock:
            if self._port is None:
                self._port = self._engine.worker(self._namespaces, sorted(wanted))
            elif wanted != self._callables:
                # One port for the pool's life: threads waiting in it look again at once.
                self._port.serve_more(sorted(wanted - self._callables))
            self._callables = wanted
        if not self._threads:
            self._stop.clear()
            for i in range(self._concurrency):
                t = threading.Thread(target=self._run, name=f"tasker-worker-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def request_stop(self) -> None:
        """Stops taking new work; running handlers finish and hand their results back."""
        self._stop.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stops taking work and waits for running handlers to finish, for ``timeout``
        seconds in all at most (the threads are daemons: a handler still running after
        that does not keep the process alive)."""
        self._stop.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        self._threads = []
        self._loop.close()

    def _current(self) -> _native.Worker | None:
        with self._port_lock:
            return self._port

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                port = self._current()
                if port is None:
                    return
                job = port.next_step(_WAIT_SECONDS)
                # A completion brings the thread's next job along when one is ready.
                while job is not None:
                    job = self._handle(port, job)
            except ShutdownError:
                return
            except Exception:
                log.exception("tasker worker loop error (continuing)")
        self._finish_queued()

    def _finish_queued(self) -> None:
        """Runs the jobs already claimed for the pool (along other threads' transactions)
        before the thread leaves: left queued, they would be held until the drain's deadline
        hands them back."""
        port = self._current()
        if port is None:
            return
        try:
            while (job := port.take_queued()) is not None:
                self._handle(port, job)
        except ShutdownError:
            return
        except Exception:
            log.exception("tasker worker error while finishing queued jobs")

    def _handle(self, port: _native.Worker, job: _native.Job) -> _native.Job | None:
        """Runs one job and hands its outcome back; returns the next job claimed along with
        it, if any (never once the pool is stopping)."""
        context = StepContext(json.loads(job.payload))
        result = execute(self._registry, context, self._loop)
        following: _native.Job | None = None
        if result.checkpoint is not None:
            cp = result.checkpoint
            try:
                cursor = json.dumps(cp.get("cursor"))
                accumulated = json.dumps(cp.get("accumulated"))
            except (TypeError, ValueError) as exc:
                bad = StepHandlerResult.failure(
                    f"the checkpoint is not JSON-serialisable: {exc}",
                    error_type=ErrorType.INVALID_RESULT,
                    retryable=False,
                )
                port.complete(job, outcome_json(bad))
                return None
            # The job comes out of this same port again, with its checkpoint.
            accepted, reason = port.checkpoint(
                job, cursor, int(cp.get("items_processed", 0)), accumulated
            )
        elif self._stop.is_set():
            accepted, reason = port.complete(job, outcome_json(result))
        else:
            accepted, reason, following = port.complete_and_next(job, outcome_json(result))
        if not accepted:
            log.info("result of %r attempt %d not applied: %s", job.step_name, job.attempt, reason)
        return following
