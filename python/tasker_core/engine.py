"""The engine handle (SPEC §12a): open a store, register templates and handlers, create and
run tasks in-process, act as an operator."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tasker_core import _native
from tasker_core.errors import TaskCreationError, TaskerError
from tasker_core.registry import HandlerRegistry, HandlerSpec
from tasker_core.worker import WorkerPool

__all__ = ["StepView", "Task", "TaskHandle", "Tasker", "TemplateInfo"]


@dataclass(frozen=True)
class TemplateInfo:
    """A registered template: its identity and the callables its steps name."""

    namespace: str
    name: str
    version: str
    callables: tuple[str, ...]


@dataclass(frozen=True)
class StepView:
    """One step of a task as it is now."""

    name: str
    uuid: str
    state: str
    attempts: int
    max_attempts: int
    callable: str
    step_type: str
    result: Any
    error: dict[str, Any] | None
    started_at: int | None
    completed_at: int | None
    dependencies: tuple[str, ...]
    checkpoint: dict[str, Any] | None

    @classmethod
    def from_json(cls, s: dict[str, Any]) -> StepView:
        return cls(
            name=s["name"],
            uuid=s["uuid"],
            state=s["state"],
            attempts=s["attempts"],
            max_attempts=s["max_attempts"],
            callable=s["callable"],
            step_type=s["step_type"],
            result=s.get("result"),
            error=s.get("error"),
            started_at=s.get("started_at"),
            completed_at=s.get("completed_at"),
            dependencies=tuple(s.get("dependencies", ())),
            checkpoint=s.get("checkpoint"),
        )


@dataclass(frozen=True)
class Task:
    """A task with its steps (``status`` is the task's state name)."""

    uuid: str
    namespace: str
    name: str
    version: str
    status: str
    context: dict[str, Any]
    correlation_id: str
    steps: dict[str, StepView]
    created_at: int
    completed_at: int | None
    replayed: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, text: str, replayed: bool | None = None) -> Task:
        t = json.loads(text)
        return cls(
            uuid=t["uuid"],
            namespace=t["namespace"],
            name=t["name"],
            version=t["version"],
            status=t["status"],
            context=t.get("context") or {},
            correlation_id=t["correlation_id"],
            steps={s["name"]: StepView.from_json(s) for s in t.get("steps", [])},
            created_at=t["created_at"],
            completed_at=t.get("completed_at"),
            replayed=t.get("replayed", False) if replayed is None else replayed,
            raw=t,
        )

    @property
    def results(self) -> dict[str, Any]:
        """Step name -> result, for the steps that have one."""
        return {n: s.result for n, s in self.steps.items() if s.result is not None}

    @property
    def is_complete(self) -> bool:
        return self.status == "complete"


class TaskHandle:
    """A created (or re-attached) task."""

    def __init__(self, tasker: Tasker, uuid: str, replayed: bool = False):
        self._tasker = tasker
        self.uuid = uuid
        self.replayed = replayed

    def wait(self, timeout: float | None = None) -> Task:
        """Waits until the task is terminal or ``blocked_by_failures``; raises
        ``TaskerTimeoutError`` when ``timeout`` seconds pass first."""
        return Task.from_json(self._tasker._engine.wait(self.uuid, timeout), self.replayed)

    def get(self) -> Task:
        return self._tasker.get_task(self.uuid)

    def cancel(self, reason: str = "cancelled") -> str:
        return self._tasker._engine.operator(self.uuid, "cancel", reason)

    def give_up(self, reason: str = "given up") -> str:
        return self._tasker._engine.operator(self.uuid, "give_up", reason)

    def resolve(self, reason: str = "resolved manually") -> str:
        return self._tasker._engine.operator(self.uuid, "resolve", reason)

    def reset_step(self, step: str, reason: str = "reset for retry") -> str:
        return self._tasker._engine.operator(self.uuid, "reset_step", reason, step=step)

    def resolve_step(self, step: str, reason: str = "resolved manually") -> str:
        return self._tasker._engine.operator(self.uuid, "resolve_step", reason, step=step)

    def complete_step(
        self, step: str, result: dict[str, Any], reason: str = "completed manually"
    ) -> str:
        return self._tasker._engine.operator(
            self.uuid, "complete_step", reason, step=step, result=json.dumps(result)
        )

    def __repr__(self) -> str:
        return f"TaskHandle({self.uuid!r}, replayed={self.replayed})"


def _default_url() -> str:
    return os.environ.get("TASKER_DATABASE_URL") or f"sqlite:{Path.cwd() / 'tasker.db'}"


def _request(
    name: str, namespace: str, tags: Sequence[str], priority: int, **optional: Any
) -> dict[str, Any]:
    """A core ``TaskRequest`` as JSON-ready data; options that are ``None`` are left out."""
    request: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "tags": list(tags),
        "priority": priority,
    }
    request.update({k: v for k, v in optional.items() if v is not None})
    return request


class Tasker:
    """An embedded engine with Python handlers running in-process on a thread pool.

    ``Tasker("sqlite:PATH")``, ``Tasker("sqlite::memory:")`` or ``Tasker("postgres://...")``;
    the default is ``$TASKER_DATABASE_URL``, else ``tasker.db`` in the working directory.
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        concurrency: int = 4,
        namespaces: Sequence[str] = (),
        templates: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
        handlers: Iterable[HandlerSpec] = (),
        poll_interval_ms: int | None = None,
        unknown_callable_grace_ms: int | None = None,
        fail_unknown_callables: bool | None = None,
    ):
        url = database_url or _default_url()
        if not url.startswith(("sqlite:", "postgres:", "postgresql:")):
            url = f"sqlite:{url}"
        self.database_url = url
        self._engine = _native.Engine(
            url,
            poll_interval_ms=poll_interval_ms,
            unknown_callable_grace_ms=unknown_callable_grace_ms,
            fail_unknown_callables=fail_unknown_callables,
        )
        self._registry = HandlerRegistry()
        self._pool = WorkerPool(
            self._engine, self._registry, concurrency=concurrency, namespaces=namespaces
        )
        self._template_callables: set[str] = set()
        self._closed = False
        for h in handlers:
            self.register_handler(h)
        if templates is not None:
            paths = [templates] if isinstance(templates, (str, os.PathLike)) else templates
            for p in paths:
                self.register_templates(p)

    # -- registration -----------------------------------------------------------------------
    def register_templates(self, path: str | os.PathLike[str]) -> list[TemplateInfo]:
        """Registers every task template in a YAML file or a directory (recursively)."""
        infos = [_template_info(t) for t in json.loads(self._engine.register_templates(path))]
        self._learn(infos)
        return infos

    def register_template(self, yaml_text: str) -> TemplateInfo:
        """Registers one task template given as YAML text."""
        info = _template_info(json.loads(self._engine.register_template_yaml(yaml_text)))
        self._learn([info])
        return info

    def registered_templates(self) -> list[TemplateInfo]:
        """Every template registered in the database (each version), whoever registered it."""
        return [_template_info(t) for t in json.loads(self._engine.templates())]

    def serve_registered_templates(self, namespaces: Sequence[str] = ()) -> list[TemplateInfo]:
        """Serves the callables of the templates already in the database (those of
        ``namespaces`` only, when given) that resolve to a handler here, by name or as an
        import path; returns the templates considered."""
        infos = [
            t for t in self.registered_templates() if not namespaces or t.namespace in namespaces
        ]
        self._learn(infos)
        return infos

    @property
    def served_callables(self) -> frozenset[str]:
        """The callables this engine's worker threads take steps of."""
        return self._pool.callables

    def register_handler(self, handler: HandlerSpec, name: str | None = None) -> list[str]:
        """Registers a handler class, instance or decorated function; returns the callables
        it serves. Handlers named by a template's ``callable`` as an import path are also
        resolved on their own."""
        names = self._registry.register(handler, name)
        self._refresh()
        return names

    def _learn(self, infos: list[TemplateInfo]) -> None:
        for info in infos:
            for c in info.callables:
                if self._registry.resolve(c) is not None:
                    self._template_callables.add(c)
        self._refresh()

    def _refresh(self) -> None:
        if self._closed:
            return
        served = set(self._registry.names()) | self._template_callables
        if served and not served <= self._pool.callables:
            self._pool.serve(served)

    # -- tasks ------------------------------------------------------------------------------
    def create_task(
        self,
        name: str,
        *,
        namespace: str = "default",
        context: dict[str, Any] | None = None,
        version: str | None = None,
        initiator: str | None = None,
        source_system: str | None = None,
        reason: str | None = None,
        idempotency_key: str | None = None,
        tags: Sequence[str] = (),
        priority: int = 0,
        correlation_id: str | None = None,
    ) -> TaskHandle:
        """Creates a task (or, for a duplicate under the template's identity strategy,
        returns the existing one with ``replayed = True``)."""
        request = _request(
            name,
            namespace,
            tags,
            priority,
            context={} if context is None else context,
            version=version,
            initiator=initiator,
            source_system=source_system,
            reason=reason,
            idempotency_key=idempotency_key,
            correlation_id=correlation_id,
        )
        uuid, replayed = self._engine.create_task(json.dumps(request))
        return TaskHandle(self, uuid, replayed)

    def create_tasks(
        self,
        name: str,
        contexts: Iterable[dict[str, Any]],
        *,
        namespace: str = "default",
        version: str | None = None,
        initiator: str | None = None,
        source_system: str | None = None,
        reason: str | None = None,
        tags: Sequence[str] = (),
        priority: int = 0,
    ) -> list[TaskHandle]:
        """Creates one task of template ``name`` per context, all at once: they commit
        together in a few transactions, much faster than a loop of :meth:`create_task`.
        Returns the handles in the order of ``contexts``. Each task is created or refused on
        its own; when any is refused, raises :class:`~tasker_core.errors.TaskCreationError`,
        whose ``handles`` and ``errors`` tell which (the others were created and run)."""
        common = _request(
            name,
            namespace,
            tags,
            priority,
            version=version,
            initiator=initiator,
            source_system=source_system,
            reason=reason,
        )
        requests = [{**common, "context": context} for context in contexts]
        handles: list[TaskHandle | None] = []
        errors: dict[int, TaskerError] = {}
        for i, outcome in enumerate(self._engine.create_tasks(json.dumps(requests))):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, TaskerError):
                    raise outcome
                handles.append(None)
                errors[i] = outcome
            else:
                handles.append(TaskHandle(self, outcome[0], outcome[1]))
        if errors:
            first = min(errors)
            raise TaskCreationError(
                f"{len(errors)} of {len(requests)} tasks were refused "
                f"(the others were created); the first, #{first}: {errors[first]}",
                handles=handles,
                errors=errors,
            )
        return [h for h in handles if h is not None]

    def run_task(
        self,
        name: str,
        *,
        namespace: str = "default",
        context: dict[str, Any] | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> Task:
        """Creates a task and waits until it is terminal or ``blocked_by_failures``."""
        handle = self.create_task(name, namespace=namespace, context=context, **options)
        return handle.wait(timeout)

    def get_task(self, uuid: str) -> Task:
        return Task.from_json(self._engine.get_task(uuid))

    def task(self, uuid: str) -> TaskHandle:
        """A handle for an existing task."""
        return TaskHandle(self, uuid)

    def transitions(self, uuid: str) -> dict[str, list[dict[str, Any]]]:
        """The task's transitions: ``{"task": [...], "steps": [...]}``."""
        result: dict[str, list[dict[str, Any]]] = json.loads(self._engine.transitions(uuid))
        return result

    # -- lifetime ---------------------------------------------------------------------------
    @property
    def worker_id(self) -> str:
        return self._engine.worker_id

    def close(self, drain_timeout: float = 10.0) -> None:
        """Stops taking work, lets running handlers finish (up to ``drain_timeout``
        seconds), hands the rest back and closes the engine. Idempotent."""
        self.shutdown(drain_timeout)

    def shutdown(self, drain_timeout: float = 10.0) -> tuple[int, int]:
        """:meth:`close`, returning ``(finished, handed_back)``: the attempts that finished
        within ``drain_timeout`` and those handed back for another worker to re-run (their
        leases end now). ``(0, 0)`` when already closed."""
        if self._closed:
            return (0, 0)
        self._closed = True
        self._pool.request_stop()
        try:
            report = self._engine.drain(drain_timeout)
        finally:
            self._pool.stop(drain_timeout)
            self._engine.close()
        return report

    def __enter__(self) -> Tasker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tasker({self.database_url!r})"


def _template_info(t: dict[str, Any]) -> TemplateInfo:
    return TemplateInfo(t["namespace"], t["name"], t["version"], tuple(t["callables"]))
