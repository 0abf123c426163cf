"""What a handler returns: :class:`StepHandlerResult` and the :class:`ErrorType` of a failure."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, overload

from tasker_core import _native

__all__ = ["ErrorType", "StepHandlerResult"]


class ErrorType(str, Enum):
    """Why a step attempt failed; the values are the engine's wire names (SPEC §5.4)."""

    VALIDATION_ERROR = "validation_error"
    PERMANENT_ERROR = "permanent_error"
    RETRYABLE_ERROR = "retryable_error"
    TIMEOUT = "timeout"
    HANDLER_ERROR = "handler_error"
    WORKER_LOST = "worker_lost"
    HANDLER_NOT_FOUND = "handler_not_found"
    INVALID_RESULT = "invalid_result"
    DECISION_ERROR = "decision_error"
    BATCH_ERROR = "batch_error"
    WORKFLOW_ERROR = "workflow_error"

    @property
    def default_retryable(self) -> bool:
        """Whether a failure of this type is retried when the handler does not say."""
        return _DEFAULT_RETRYABLE[self.value]

    def __str__(self) -> str:
        return self.value


# The engine decides which types retry by default; this table is read from it once.
_DEFAULT_RETRYABLE: dict[str, bool] = dict(_native.error_types())


class _SuccessAccessor:
    """``StepHandlerResult.success(...)`` builds a success; ``result.success`` is a bool."""

    @overload
    def __get__(
        self, obj: None, objtype: type[StepHandlerResult]
    ) -> Callable[..., StepHandlerResult]: ...

    @overload
    def __get__(self, obj: StepHandlerResult, objtype: type[StepHandlerResult] | None) -> bool: ...

    def __get__(
        self, obj: StepHandlerResult | None, objtype: type[StepHandlerResult] | None = None
    ) -> Callable[..., StepHandlerResult] | bool:
        if obj is None:
            return StepHandlerResult._success
        return obj.is_success


class StepHandlerResult:
    """The outcome of one step attempt: a success with a result object, or a failure."""

    success = _SuccessAccessor()

    def __init__(
        self,
        *,
        is_success: bool,
        result: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        error_message: str | None = None,
        error_type: ErrorType | str | None = None,
        retryable: bool | None = None,
        error_code: str | None = None,
        retry_after_seconds: float | None = None,
        backtrace: str | None = None,
        checkpoint: dict[str, Any] | None = None,
    ):
        self.is_success = is_success
        self.result = result
        self.metadata: dict[str, Any] = metadata or {}
        self.error_message = error_message
        self.error_type: ErrorType | None = None
        self.retryable = retryable
        if not is_success:
            etype = ErrorType(error_type or ErrorType.HANDLER_ERROR)
            self.error_type = etype
            self.retryable = etype.default_retryable if retryable is None else retryable
        self.error_code = error_code
        self.retry_after_seconds = retry_after_seconds
        self.backtrace = backtrace
        self.checkpoint = checkpoint

    @classmethod
    def _success(
        cls, result: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None
    ) -> StepHandlerResult:
        return cls(is_success=True, result={} if result is None else result, metadata=metadata)

    @classmethod
    def failure(
        cls,
        message: str,
        error_type: ErrorType | str = ErrorType.HANDLER_ERROR,
        retryable: bool | None = None,
        error_code: str | None = None,
        metadata: dict[str, Any] | None = None,
        retry_after_seconds: float | None = None,
    ) -> StepHandlerResult:
        """A failed attempt; ``retryable`` defaults from the error type (SPEC §5.4)."""
        return cls(
            is_success=False,
            error_message=message,
            error_type=error_type,
            retryable=retryable,
            error_code=error_code,
            metadata=metadata,
            retry_after_seconds=retry_after_seconds,
        )

    @property
    def message(self) -> str | None:
        """The failure's message (``None`` for a success)."""
        return self.error_message

    @property
    def is_checkpoint(self) -> bool:
        """True for a batch worker's ``checkpoint_yield``."""
        return self.checkpoint is not None

    def to_outcome(self) -> dict[str, Any]:
        """The engine's wire form of this result (a core ``StepOutcome``)."""
        if self.is_success:
            out: dict[str, Any] = {"outcome": "success", "result": self.result}
            if self.metadata:
                out["metadata"] = self.metadata
            return out
        out = {
            "outcome": "failure",
            "message": self.error_message or "",
            "error_type": str(self.error_type),
            "retryable": bool(self.retryable),
        }
        if self.error_code is not None:
            out["error_code"] = self.error_code
        if self.backtrace is not None:
            out["backtrace"] = self.backtrace
        if self.metadata:
            out["metadata"] = self.metadata
        if self.retry_after_seconds is not None:
            out["retry_after_seconds"] = float(self.retry_after_seconds)
        return out

    @classmethod
    def from_outcome(cls, outcome: Mapping[str, Any] | str) -> StepHandlerResult:
        """A result from the engine's wire form (JSON text or its parsed mapping)."""
        o: Mapping[str, Any] = json.loads(outcome) if isinstance(outcome, str) else outcome
        kind = o.get("outcome")
        if kind == "success":
            return cls._success(o.get("result"), o.get("metadata") or None)
        if kind == "failure":
            r = cls.failure(
                o.get("message", ""),
                error_type=o.get("error_type", "handler_error"),
                retryable=o.get("retryable"),
                error_code=o.get("error_code"),
                metadata=o.get("metadata") or None,
                retry_after_seconds=o.get("retry_after_seconds"),
            )
            r.backtrace = o.get("backtrace")
            return r
        raise ValueError(f"not a step outcome: {o!r}")

    def __repr__(self) -> str:
        if self.is_success:
            return f"StepHandlerResult.success(result={self.result!r})"
        return (
            f"StepHandlerResult.failure(message={self.error_message!r}, "
            f"error_type={self.error_type!s}, retryable={self.retryable})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepHandlerResult):
            return NotImplemented
        return self.to_outcome() == other.to_outcome() and self.checkpoint == other.checkpoint

    __hash__ = None  # type: ignore[assignment]
