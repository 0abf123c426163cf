"""tasker-py: Python step handlers and an embedded engine for Tasker workflows.

from tasker_core import StepHandler, StepContext, StepHandlerResult, Tasker

class Greet(StepHandler):
    handler_name = "greet"

    def call(self, context: StepContext) -> StepHandlerResult:
        return StepHandlerResult.success(result={"hello": context.get_input("name")})

with Tasker("sqlite:tasker.db", templates="templates/", handlers=[Greet]) as tasker:
    task = tasker.run_task("hello", namespace="demo", context={"name": "Ada"})
"""

from tasker_core import errors
from tasker_core.context import StepContext
from tasker_core.engine import StepView, Task, Tasker, TaskHandle, TemplateInfo
from tasker_core.errors import PermanentError, RetryableError, TaskerError
from tasker_core.step_handler import StepHandler
from tasker_core.types import ErrorType, StepHandlerResult

__version__ = "0.1.0"

__all__ = [
    "ErrorType",
    "PermanentError",
    "RetryableError",
    "StepContext",
    "StepHandler",
    "StepHandlerResult",
    "StepView",
    "Task",
    "TaskHandle",
    "Tasker",
    "TaskerError",
    "TemplateInfo",
    "errors",
]
