"""Functional handlers (``@step_handler``, ``@inputs``, ``@depends_on``) are not yet
supported in this tasker-py build: importing them raises ImportError."""

raise ImportError(
    "tasker_core.step_handler.functional (@step_handler, @inputs, @depends_on) is not yet "
    "supported in this tasker-py build; write a StepHandler subclass"
)
