"""What a handler reads: :class:`StepContext` (SPEC §5.3)."""

from __future__ import annotations

import uuid
from typing import Any

__all__ = ["StepContext"]

_MISSING: Any = object()


class StepContext:
    """One step attempt as its handler sees it: the task's input, the step's configuration,
    the results of every completed ancestor, retry and checkpoint information."""

    def __init__(self, job: dict[str, Any]):
        self._job = job
        definition = job.get("definition") or {}
        handler = definition.get("handler") or {}
        retry = definition.get("retry") or {}
        self.task_uuid: str = job.get("task_uuid", "")
        self.step_uuid: str = job.get("step_uuid", "")
        self.step_name: str = job.get("step_name", "")
        self.correlation_id: str = job.get("correlation_id", "")
        self.namespace: str = job.get("namespace", "")
        self.task_name: str = job.get("task_name", "")
        self.task_version: str = job.get("task_version", "")
        self.handler_callable: str = handler.get("callable", "")
        self.handler_method: str = handler.get("method") or "call"
        self.input_data: dict[str, Any] = job.get("context") or {}
        self.step_config: dict[str, Any] = handler.get("initialization") or {}
        self.step_inputs: dict[str, Any] = job.get("inputs") or {}
        self.dependency_results: dict[str, Any] = job.get("dependency_results") or {}
        self.failed_dependencies: dict[str, Any] = job.get("failed_dependencies") or {}
        self.attempts: int = int(job.get("attempt", 1))
        self.max_attempts: int = int(retry.get("max_attempts", 1))
        self.checkpoint: dict[str, Any] | None = job.get("checkpoint")
        self.timeout_at: int | None = job.get("timeout_at")

    @classmethod
    def build(
        cls,
        *,
        input_data: dict[str, Any] | None = None,
        dependency_results: dict[str, Any] | None = None,
        step_config: dict[str, Any] | None = None,
        step_inputs: dict[str, Any] | None = None,
        step_name: str = "step",
        handler_callable: str = "",
        namespace: str = "default",
        task_name: str = "task",
        attempt: int = 1,
        max_attempts: int = 3,
        checkpoint: dict[str, Any] | None = None,
    ) -> StepContext:
        """A context made by hand, for unit tests of handlers."""
        return cls(
            {
                "task_uuid": str(uuid.uuid4()),
                "step_uuid": str(uuid.uuid4()),
                "step_name": step_name,
                "correlation_id": str(uuid.uuid4()),
                "namespace": namespace,
                "task_name": task_name,
                "task_version": "1.0.0",
                "attempt": attempt,
                "definition": {
                    "name": step_name,
                    "handler": {
                        "callable": handler_callable or step_name,
                        "initialization": step_config or {},
                    },
                    "retry": {"max_attempts": max_attempts},
                },
                "context": input_data or {},
                "inputs": step_inputs or {},
                "dependency_results": dependency_results or {},
                "checkpoint": checkpoint,
            }
        )

    # -- task input -------------------------------------------------------------------------
    @property
    def task_context(self) -> dict[str, Any]:
        """The task's context (same as ``input_data``)."""
        return self.input_data

    def get_input(self, key: str) -> Any:
        """A top-level field of the task context, or ``None``."""
        return self.input_data.get(key)

    def get_input_or(self, key: str, default: Any) -> Any:
        """A top-level field of the task context, or ``default`` when it is absent or null."""
        value = self.input_data.get(key)
        return default if value is None else value

    # -- step configuration -----------------------------------------------------------------
    def get_config(self, key: str, default: Any = None) -> Any:
        """A field of the step's ``handler.initialization``."""
        return self.step_config.get(key, default)

    # -- dependencies -----------------------------------------------------------------------
    def get_dependency_result(self, step_name: str) -> Any:
        """The result object of a completed ancestor step, or ``None``."""
        return self.dependency_results.get(step_name)

    def get_dependency_field(self, step_name: str, *path: str | int) -> Any:
        """A nested field of an ancestor's result: ``get_dependency_field("cart", "total")``;
        ``None`` when any part of the path is missing."""
        value: Any = self.dependency_results.get(step_name)
        for key in path:
            if isinstance(value, dict):
                value = value.get(key) if isinstance(key, str) else None
            elif (
                isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value)
            ):
                value = value[key]
            else:
                return None
        return value

    def get_all_dependency_results(self, prefix: str) -> dict[str, Any]:
        """Results of the ancestors whose step names start with ``prefix`` (batch workers
        ``process_batch_001``, ``process_batch_002``, ...), by name in name order."""
        return {
            name: self.dependency_results[name]
            for name in sorted(self.dependency_results)
            if name.startswith(prefix)
        }

    # -- retries ----------------------------------------------------------------------------
    @property
    def attempt(self) -> int:
        """This attempt's number, from 1."""
        return self.attempts

    @property
    def retry_count(self) -> int:
        """Attempts before this one."""
        return self.attempts - 1

    @property
    def is_retry(self) -> bool:
        return self.attempts > 1

    @property
    def is_last_retry(self) -> bool:
        return self.attempts >= self.max_attempts

    # -- checkpoints ------------------------------------------------------------------------
    @property
    def has_checkpoint(self) -> bool:
        return self.checkpoint is not None

    @property
    def checkpoint_cursor(self) -> Any:
        """Where the last checkpoint said to resume (``None`` without one)."""
        return self.checkpoint.get("cursor") if self.checkpoint else None

    @property
    def checkpoint_items_processed(self) -> int:
        return int(self.checkpoint.get("items_processed", 0)) if self.checkpoint else 0

    @property
    def accumulated_results(self) -> Any:
        return self.checkpoint.get("accumulated") if self.checkpoint else None

    @property
    def raw(self) -> dict[str, Any]:
        """The whole job as the engine handed it out."""
        return self._job

    def __repr__(self) -> str:
        return (
            f"StepContext(step={self.step_name!r}, task={self.task_uuid!r}, "
            f"attempt={self.attempts}/{self.max_attempts})"
        )
