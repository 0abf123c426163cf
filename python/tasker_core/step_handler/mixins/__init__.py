"""Mixins for the handler types of SPEC §12, combined with :class:`StepHandler` by multiple
inheritance. The logic behind them (HTTP classification, decision outcomes) lives in the
engine; these only adapt it to Python."""

from tasker_core.step_handler.mixins.api import APIMixin, ApiResponse
from tasker_core.step_handler.mixins.decision import DecisionMixin

__all__ = ["APIMixin", "ApiResponse", "DecisionMixin"]
