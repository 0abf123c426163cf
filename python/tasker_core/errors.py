"""The one exception hierarchy of tasker-py, under :class:`TaskerError`.

Engine errors are raised by the native module as the class named for their kind (the mapping
lives in ``bindings/python/src/error.rs``); handlers raise :class:`PermanentError` or
:class:`RetryableError` to fail a step with that classification.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConflictError",
    "HandlerNotFoundError",
    "InternalError",
    "InvalidTransitionError",
    "NotFoundError",
    "PermanentError",
    "RetryableError",
    "ShutdownError",
    "StepError",
    "StoreError",
    "TaskCreationError",
    "TaskerError",
    "TaskerTimeoutError",
    "TemplateError",
    "ValidationError",
]


class TaskerError(Exception):
    """Base of every error tasker-py raises. ``code`` is stable and machine-readable."""

    code: str = "tasker_error"

    def __init__(self, message: str = "", *, code: str | None = None, details: Any = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details


class TaskCreationError(TaskerError):
    """Some tasks of a :meth:`Tasker.create_tasks` call were refused; the others were
    created and run. ``handles`` has, in the order of the call, a ``TaskHandle`` for each
    created task and ``None`` for each refused one; ``errors`` maps the index of each refused
    task to the exception that refused it."""

    code = "task_creation_error"

    def __init__(
        self,
        message: str = "",
        *,
        handles: list[Any] | None = None,
        errors: dict[int, TaskerError] | None = None,
        code: str | None = None,
        details: Any = None,
    ):
        super().__init__(message, code=code, details=details)
        self.handles: list[Any] = handles or []
        self.errors: dict[int, TaskerError] = errors or {}


class ValidationError(TaskerError):
    """Input failed validation (bad context, schema violations, bad arguments)."""

    code = "validation_error"


class TemplateError(TaskerError):
    """A task template could not be loaded or is invalid (``details`` lists every problem)."""

    code = "template_error"


class NotFoundError(TaskerError):
    """A task, step or template that does not exist."""

    code = "not_found"


class ConflictError(TaskerError):
    """The request conflicts with existing state."""

    code = "conflict"


class InvalidTransitionError(TaskerError):
    """A state machine refused the transition (e.g. resetting a step that did not fail)."""

    code = "invalid_transition"


class StoreError(TaskerError):
    """The database failed or is unreachable."""

    code = "store_error"


class TaskerTimeoutError(TaskerError, TimeoutError):
    """Waiting took longer than allowed."""

    code = "timeout"


class ShutdownError(TaskerError):
    """The engine is closed, or was opened in another process."""

    code = "shutdown"


class InternalError(TaskerError):
    """A bug or an unexpected condition inside the engine."""

    code = "internal_error"


class HandlerNotFoundError(TaskerError):
    """No handler could be resolved for a callable."""

    code = "handler_not_found"


class StepError(TaskerError):
    """Raised by a handler to fail its step with a classification (SPEC §5.4)."""

    error_type: str = "handler_error"
    retryable: bool = True

    def __init__(
        self,
        message: str = "",
        *,
        error_code: str | None = None,
        metadata: dict[str, Any] | None = None,
        retry_after_seconds: float | None = None,
    ):
        super().__init__(message, code=self.error_type)
        self.error_code = error_code
        self.metadata = metadata or {}
        self.retry_after_seconds = retry_after_seconds


class PermanentError(StepError):
    """A failure that must not be retried (``permanent_error``)."""

    error_type = "permanent_error"
    retryable = False


class RetryableError(StepError):
    """A transient failure, retried under the step's policy (``retryable_error``)."""

    error_type = "retryable_error"
    retryable = True
