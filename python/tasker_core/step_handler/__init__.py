"""The handler base class (SPEC §12)."""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import Any, ClassVar

from tasker_core.context import StepContext
from tasker_core.types import ErrorType, StepHandlerResult

__all__ = ["StepHandler"]


class StepHandler:
    """Base class of class-style handlers: set ``handler_name`` and implement ``call``,
    plain or ``async def``, returning a :class:`StepHandlerResult`.

    One instance serves every step of its callable and may be called from several worker
    threads at once: keep per-step state in locals, not on ``self``.
    """

    handler_name: ClassVar[str] = ""
    handler_version: ClassVar[str] = "1.0.0"

    def __init__(self, config: dict[str, Any] | None = None):
        self.config: dict[str, Any] = config or {}

    def call(self, context: StepContext) -> StepHandlerResult | Awaitable[StepHandlerResult]:
        raise NotImplementedError(f"{type(self).__name__} must implement call(context)")

    @classmethod
    def registered_name(cls) -> str:
        """The callable this class serves: ``handler_name``, else the class name in
        snake_case without a ``Handler`` suffix."""
        if cls.handler_name:
            return cls.handler_name
        base = re.sub(r"Handler$", "", cls.__name__) or cls.__name__
        return re.sub(r"(?<!^)(?=[A-Z])", "_", base).lower()

    def success(
        self, result: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None
    ) -> StepHandlerResult:
        """A success with ``result``."""
        return StepHandlerResult.success(result=result, metadata=metadata)

    def failure(
        self,
        message: str,
        error_type: ErrorType | str = ErrorType.HANDLER_ERROR,
        retryable: bool | None = None,
        error_code: str | None = None,
        metadata: dict[str, Any] | None = None,
        retry_after_seconds: float | None = None,
    ) -> StepHandlerResult:
        """A failure; ``retryable`` defaults from the error type."""
        return StepHandlerResult.failure(
            message,
            error_type=error_type,
            retryable=retryable,
            error_code=error_code,
            metadata=metadata,
            retry_after_seconds=retry_after_seconds,
        )
