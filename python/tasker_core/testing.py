"""pytest helpers (loaded as a pytest plugin when tasker-py is installed): an embedded
engine per test and a StepContext factory.

    def test_order(tasker):
        tasker.register_templates("templates/")
        tasker.register_handler(ValidateCartHandler)
        task = tasker.run_task("ecommerce_order_processing", namespace="ecommerce",
                               context={...})
        assert task.status == "complete"
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tasker_core.context import StepContext
from tasker_core.engine import Tasker

__all__ = ["step_context", "tasker"]


@pytest.fixture
def tasker(tmp_path: Path) -> Iterator[Tasker]:
    """An embedded engine on an SQLite file of its own, closed after the test."""
    engine = Tasker(f"sqlite:{tmp_path / 'tasker.db'}", poll_interval_ms=50)
    try:
        yield engine
    finally:
        engine.close(drain_timeout=5.0)


@pytest.fixture
def step_context() -> Callable[..., StepContext]:
    """A factory of hand-made contexts: ``step_context(input_data={...},
    dependency_results={...}, step_config={...})``."""

    def make(**kwargs: Any) -> StepContext:
        return StepContext.build(**kwargs)

    return make
