"""The handler API without an engine: import paths, results, contexts."""

from tasker_core import _native


def test_the_documented_import_paths_import():
    from tasker_core import ErrorType, StepContext, StepHandler, StepHandlerResult
    from tasker_core.batch_processing import Batchable, BatchAggregationScenario
    from tasker_core.errors import PermanentError, RetryableError, TaskerError
    from tasker_core.step_handler import StepHandler as Base
    from tasker_core.step_handler.mixins import DecisionMixin

    assert Base is StepHandler
    assert issubclass(PermanentError, TaskerError) and issubclass(RetryableError, TaskerError)
    assert all([ErrorType, StepContext, StepHandlerResult, Batchable, BatchAggregationScenario])
    assert DecisionMixin


def test_the_api_mixin_and_functional_import_paths_import():
    from tasker_core.step_handler.functional import depends_on, inputs, step_handler
    from tasker_core.step_handler.mixins import APIMixin

    assert all([APIMixin, depends_on, inputs, step_handler])


def test_error_types_match_the_engine():
    from tasker_core import ErrorType

    engine = dict(_native.error_types())
    assert {e.value for e in ErrorType} == set(engine)
    for e in ErrorType:
        assert e.default_retryable is engine[e.value]


def test_results_expose_success_as_a_bool_and_a_constructor():
    from tasker_core import ErrorType, StepHandlerResult

    ok = StepHandlerResult.success(result={"total": 3}, metadata={"n": 1})
    assert ok.success is True and ok.is_success is True
    assert ok.result == {"total": 3} and ok.metadata == {"n": 1}
    bad = StepHandlerResult.failure(
        message="declined", error_type=ErrorType.PERMANENT_ERROR, error_code="DECLINED"
    )
    assert bad.success is False and bad.is_success is False
    assert bad.retryable is False and bad.error_code == "DECLINED"
    # retryable defaults from the type, as the engine says
    assert StepHandlerResult.failure("x").retryable is True
    assert StepHandlerResult.failure("x", error_type=ErrorType.VALIDATION_ERROR).retryable is False
    assert StepHandlerResult.from_outcome(bad.to_outcome()) == bad


def test_context_accessors(step_context):
    ctx = step_context(
        input_data={"items": [1, 2], "email": None},
        dependency_results={
            "cart": {"total": 9.5, "lines": [{"sku": "A"}]},
            "batch_002": {"n": 2},
            "batch_001": {"n": 1},
        },
        step_config={"rate": 0.1},
        attempt=2,
        max_attempts=3,
    )
    assert ctx.get_input("items") == [1, 2]
    assert ctx.get_input("missing") is None
    assert ctx.get_input_or("email", "x@y") == "x@y"
    assert ctx.get_dependency_result("cart")["total"] == 9.5
    assert ctx.get_dependency_field("cart", "lines", 0, "sku") == "A"
    assert ctx.get_dependency_field("cart", "nope", "deeper") is None
    assert list(ctx.get_all_dependency_results("batch_")) == ["batch_001", "batch_002"]
    assert ctx.get_config("rate") == 0.1 and ctx.step_config == {"rate": 0.1}
    assert ctx.is_retry and not ctx.is_last_retry and ctx.retry_count == 1
    assert not ctx.has_checkpoint and ctx.checkpoint_cursor is None


def test_decision_and_batch_helpers_use_the_engine_shapes():
    from tasker_core.batch_processing import Batchable, BatchAggregationScenario
    from tasker_core.step_handler import StepHandler
    from tasker_core.step_handler.mixins import DecisionMixin

    class Route(DecisionMixin, StepHandler):
        pass

    r = Route().decision_success(["a", "b"], routing_context={"k": 1})
    assert r.result == {
        "decision_point_outcome": {"type": "create_steps", "step_names": ["a", "b"]},
        "routing_context": {"k": 1},
    }
    assert Route().decision_failure("no").error_type == "decision_error"

    class Analyze(StepHandler, Batchable):
        pass

    outcome = Analyze().create_batch_outcome(total_items=250, batch_size=100)
    assert [c["batch_id"] for c in outcome.cursor_configs] == ["001", "002", "003"]
    assert outcome.cursor_configs[2]["end_cursor"] == 250
    scenario = BatchAggregationScenario.detect(
        {
            "analyze": Analyze().batch_analyzer_success(outcome).result,
            "work_001": {"rows": 100},
            "work_002": {"rows": 100},
        },
        "analyze",
        "work_",
    )
    assert scenario.worker_count == 3 and not scenario.is_no_batches
    assert sorted(scenario.batch_results) == ["work_001", "work_002"]
