"""The decision handler type (SPEC §6, §12): the wire shapes of decision outcomes come from
the engine; this mixin only adapts them to Python."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tasker_core import _native
from tasker_core.types import StepHandlerResult

__all__ = ["DecisionMixin"]


class DecisionMixin:
    """For ``decision`` steps: choose which downstream steps to create."""

    def decision_success(
        self, steps: Sequence[str], routing_context: dict[str, Any] | None = None
    ) -> StepHandlerResult:
        """Creates the named steps (and what follows them in the decision's branches)."""
        names = [steps] if isinstance(steps, str) else list(steps)
        routing = None if routing_context is None else json.dumps(routing_context)
        return StepHandlerResult.from_outcome(_native.decision_success(names, routing))

    def skip_branches(self, reason: str = "no branch applies") -> StepHandlerResult:
        """A successful decision that creates no step."""
        return StepHandlerResult.from_outcome(_native.skip_branches(reason))

    def decision_failure(self, message: str) -> StepHandlerResult:
        """The decision could not be made: the step fails permanently (``decision_error``)."""
        return StepHandlerResult.from_outcome(_native.decision_failure(message))
