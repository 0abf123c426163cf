"""Batch processing (SPEC §7): the :class:`Batchable` mixin for analyzers, workers and
aggregators, and :class:`BatchAggregationScenario`. Cursor maths, wire shapes and the
aggregation view come from the engine."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tasker_core import _native
from tasker_core.context import StepContext
from tasker_core.types import StepHandlerResult

__all__ = [
    "BatchAggregationScenario",
    "BatchCursor",
    "BatchOutcome",
    "BatchWorkerContext",
    "Batchable",
]


@dataclass(frozen=True)
class BatchOutcome:
    """What an analyzer decided: the wire form of a ``batch_processing_outcome``."""

    value: dict[str, Any]

    @property
    def is_no_batches(self) -> bool:
        return self.value.get("type") == "no_batches"

    @property
    def cursor_configs(self) -> list[dict[str, Any]]:
        configs: list[dict[str, Any]] = self.value.get("cursor_configs", [])
        return configs


@dataclass(frozen=True)
class BatchCursor:
    """One batch's range: ``start_cursor`` inclusive, ``end_cursor`` exclusive."""

    batch_id: str
    start_cursor: Any
    end_cursor: Any
    batch_size: int


@dataclass(frozen=True)
class BatchWorkerContext:
    """A batch worker's view of its batch."""

    batch_id: str
    cursor: BatchCursor
    is_no_op: bool
    batch_metadata: dict[str, Any]
    checkpoint: dict[str, Any] | None
    resume_cursor: Any
    items_processed: int
    accumulated: Any
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)


@dataclass(frozen=True)
class BatchAggregationScenario:
    """What an aggregator sees of its analyzer's fan-out."""

    is_no_batches: bool
    analyzer_result: Any
    batch_results: dict[str, Any]
    worker_count: int
    failed_batches: dict[str, Any]

    @classmethod
    def detect(
        cls,
        dependency_results: dict[str, Any],
        analyzer_step: str,
        worker_prefix: str,
        failed_dependencies: dict[str, Any] | None = None,
    ) -> BatchAggregationScenario:
        """Finds the analyzer's outcome and the results of the workers whose step names
        start with ``worker_prefix`` among ``dependency_results``."""
        failed = None if failed_dependencies is None else json.dumps(failed_dependencies)
        s = json.loads(
            _native.aggregation_scenario(
                json.dumps(dependency_results), analyzer_step, worker_prefix, failed
            )
        )
        return cls(
            is_no_batches=s["is_no_batches"],
            analyzer_result=s["analyzer_result"],
            batch_results=s["batch_results"],
            worker_count=s["worker_count"],
            failed_batches=s["failed_batches"],
        )


class Batchable:
    """Mixin for ``batchable`` analyzers, ``batch_worker`` steps and their aggregators."""

    def create_batch_outcome(
        self, total_items: int, batch_size: int, worker_template_name: str | None = None
    ) -> BatchOutcome:
        """Cursor ranges dividing ``total_items`` into batches of ``batch_size`` (no batches
        when there is nothing to do)."""
        return BatchOutcome(
            json.loads(_native.create_batch_outcome(total_items, batch_size, worker_template_name))
        )

    def batch_analyzer_success(self, outcome: BatchOutcome) -> StepHandlerResult:
        """The analyzer's result: create the outcome's batches."""
        return StepHandlerResult.from_outcome(
            _native.batch_analyzer_success(json.dumps(outcome.value))
        )

    def no_batches(self, reason: str = "nothing to process") -> StepHandlerResult:
        """The analyzer's result when there is nothing to process (aggregators still run)."""
        return StepHandlerResult.from_outcome(_native.no_batches(reason))

    def get_batch_worker_context(self, context: StepContext) -> BatchWorkerContext:
        """This batch worker's batch; raises ``ValueError`` for a step that is not one."""
        checkpoint = None if context.checkpoint is None else json.dumps(context.checkpoint)
        text = _native.batch_worker_context(json.dumps(context.step_inputs), checkpoint)
        if text is None:
            raise ValueError(f"step {context.step_name!r} is not a batch worker (no cursor)")
        b = json.loads(text)
        c = b["cursor"]
        return BatchWorkerContext(
            batch_id=b["batch_id"],
            cursor=BatchCursor(
                c["batch_id"], c["start_cursor"], c["end_cursor"], c.get("batch_size", 0)
            ),
            is_no_op=b["is_no_op"],
            batch_metadata=b["batch_metadata"],
            checkpoint=b["checkpoint"],
            resume_cursor=b["resume_cursor"],
            items_processed=b["items_processed"],
            accumulated=b["accumulated"],
            raw=b,
        )

    def batch_worker_success(
        self,
        batch_context: BatchWorkerContext,
        result: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> StepHandlerResult:
        """A batch worker's success: ``result`` with the batch id added."""
        r = StepHandlerResult.from_outcome(
            _native.batch_worker_success(json.dumps(batch_context.raw), json.dumps(result or {}))
        )
        if metadata:
            r.metadata = metadata
        return r

    def checkpoint_yield(
        self, cursor: Any, items_processed: int, accumulated_results: Any = None
    ) -> StepHandlerResult:
        """Stores progress and hands the step out again from ``cursor`` without spending an
        attempt; a retry after a real failure also resumes from here."""
        return StepHandlerResult(
            is_success=True,
            result=None,
            checkpoint={
                "cursor": cursor,
                "items_processed": items_processed,
                "accumulated": accumulated_results,
            },
        )
