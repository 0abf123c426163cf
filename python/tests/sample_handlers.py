"""Handlers the workflow tests name by import path (``sample_handlers.Double``)."""

from tasker_core import StepContext, StepHandler, StepHandlerResult


class Double(StepHandler):
    def call(self, context: StepContext) -> StepHandlerResult:
        return StepHandlerResult.success(result={"value": context.get_input("n") * 2})
