"""Every conformance scenario of ``tests/scenarios`` with the Python kit, on SQLite (a fresh
in-memory database each) and on PostgreSQL (a fresh database each on the server
``TASKER_TEST_DATABASE_URL`` names, dropped afterwards)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasker_core import StepContext, Tasker, _native

from . import ecommerce_handlers, kit, runner

#: Scenarios that cannot pass with the Python binding yet: (scenario name, backend or None for
#: both) -> why. A listed scenario that passes fails its test, so the list stays true.
KNOWN_FAILURES: dict[tuple[str, str | None], str] = {}

#: Scenarios not run at all, with the precise reason: (scenario name, backend) -> why.
SKIPS: dict[tuple[str, str], str] = {}

FILES = runner.scenario_files()


def _register_ecommerce(tasker: Tasker) -> None:
    ecommerce_handlers().register_handlers(tasker)


def _check(name: str, backend: str, database_url: str) -> None:
    skip = SKIPS.get((name, backend))
    if skip is not None:
        pytest.skip(skip)
    path = runner.SCENARIOS_DIR / f"{name}.yaml"
    scenario = runner.load(path)
    assert scenario["name"] == name, f"{path}: name {scenario['name']!r} differs from the file"
    outcome = runner.run(scenario, database_url, [_register_ecommerce])
    known = KNOWN_FAILURES.get((name, backend)) or KNOWN_FAILURES.get((name, None))
    print(
        f"{backend:<8} scenario {name:<40} {'ok' if outcome.passed else 'FAILED'} "
        f"({outcome.elapsed * 1000:.0f} ms)"
    )
    if known is not None:
        if outcome.passed:
            pytest.fail(f"{name} passes on {backend} but is listed in KNOWN_FAILURES; remove it")
        pytest.xfail(f"known failure: {known}\n{outcome.report()}")
    assert outcome.passed, f"{name} on {backend}:\n{outcome.report()}"


def test_scenario_files_exist_and_load() -> None:
    assert FILES, f"no scenario files in {runner.SCENARIOS_DIR}"
    for path in FILES:
        runner.load(path)


@pytest.mark.parametrize("name", [p.stem for p in FILES])
def test_scenario_on_sqlite(name: str) -> None:
    _check(name, "sqlite", "sqlite::memory:")


@pytest.fixture
def postgres_database() -> Iterator[str]:
    server = os.environ.get("TASKER_TEST_DATABASE_URL")
    if not server:
        pytest.skip("TASKER_TEST_DATABASE_URL is not set (./run test sets it)")
    url = _native.create_scratch_database(server, "tasker_pytest_conf")
    try:
        yield url
    finally:
        _native.drop_database(server, url)


@pytest.mark.parametrize("name", [p.stem for p in FILES])
def test_scenario_on_postgres(name: str, postgres_database: str) -> None:
    _check(name, "postgres", postgres_database)


def test_kit_counts_executions_per_task_and_step() -> None:
    ctx = StepContext.build(handler_callable="kit.record", step_name="r")
    handler = kit.KitHandler("kit.record")
    first = handler.call(ctx)
    second = handler.call(ctx)
    assert first.result == {"recorded": True, "execution": 1}
    assert second.result == {"recorded": True, "execution": 2}
    assert kit.executions(ctx.task_uuid, "r") == 2
    assert kit.invocations(ctx.task_uuid) == ["r", "r"]


def test_kit_bad_input_and_overflow_fail_with_the_kit_codes() -> None:
    square = kit.KitHandler("kit.square")
    missing = square.call(StepContext.build(handler_callable="kit.square"))
    assert (missing.error_type, missing.error_code) == ("validation_error", kit.BAD_INPUT)
    assert "even_number" in (missing.error_message or "")
    big = square.call(StepContext.build(input_data={"even_number": 2**27}))
    assert (big.error_type, big.error_code) == ("permanent_error", kit.OVERFLOW)
    assert big.retryable is False


def test_runner_rejects_unknown_keys_and_bad_states(tmp_path: Path) -> None:
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("name: bad_key\ntemplate: x.yaml\nexpect: { stpes: {} }\n")
    with pytest.raises(runner.ScenarioError, match=r"unknown key.*stpes"):
        runner.load(bad_key)
    bad_state = tmp_path / "bad_state.yaml"
    bad_state.write_text("name: bad_state\ntemplate: x.yaml\nexpect: { task: finished }\n")
    with pytest.raises(runner.ScenarioError, match="'finished' is not one of"):
        runner.load(bad_state)


def test_subset_match_locates_every_mismatch() -> None:
    diffs: list[str] = []
    runner.subset_match({"value": 4}, {"value": 4.0, "other": 1}, "", diffs)
    assert diffs == []
    runner.subset_match({"a": 1, "b": [1, 2], "c": "x"}, {"a": 2, "b": [1]}, "", diffs)
    assert diffs == [
        "/a: expected 1, found 2",
        "/b: expected [1,2], found [1]",
        '/c: expected "x", key missing',
    ]


def test_runner_reports_every_mismatch() -> None:
    """A scenario whose expectations are wrong fails with one line per mismatch."""
    scenario = runner.load(runner.SCENARIOS_DIR / "linear.yaml")
    scenario["expect"] = {
        "task": "error",
        "step_count": 3,
        "steps": {
            "linear_step_2": {"state": "complete", "result": {"value": 1297}},
            "linear_step_4": {"error_code": "NOPE"},
            "missing_step": {"state": "complete"},
        },
        "absent_steps": ["linear_step_1"],
        "executions": {"linear_step_3": 2},
    }
    outcome = runner.run(scenario, "sqlite::memory:", [])
    assert not outcome.passed
    assert outcome.task is not None and outcome.task.status == "complete"
    assert outcome.diffs == [
        "task: expected state error, found complete",
        "step linear_step_2 result /value: expected 1297, found 1296",
        "step linear_step_4: expected an error, has none",
        "step missing_step: expected to exist, absent",
        "step linear_step_1: expected absent, exists in state complete",
        "step_count: expected 3, found 4 (linear_step_1, linear_step_2, linear_step_3, "
        "linear_step_4)",
        "executions of linear_step_3: expected 2, found 1",
    ]
    assert "linear_step_4" in outcome.report() and "2821109907456" in outcome.report()


def test_runner_reports_a_creation_that_should_have_failed() -> None:
    scenario = runner.load(runner.SCENARIOS_DIR / "linear.yaml")
    scenario["expect"] = {"create_error": {"kind": "validation_error"}}
    outcome = runner.run(scenario, "sqlite::memory:", [])
    assert len(outcome.diffs) == 1
    assert outcome.diffs[0].startswith("create: expected a validation_error error, created task")


def test_kit_decide_routes_by_the_first_matching_route() -> None:
    decide = kit.KitHandler("kit.decide")
    config = {
        "field": "amount",
        "routes": [{"below": 1000, "steps": ["auto"]}, {"below": 5000, "steps": []}],
    }
    auto = decide.call(StepContext.build(input_data={"amount": 999.99}, step_config=config))
    assert auto.success is True
    assert auto.result is not None
    assert auto.result["decision_point_outcome"]["step_names"] == ["auto"]
    skipped = decide.call(StepContext.build(input_data={"amount": 1000}, step_config=config))
    assert skipped.success is True
    none = decide.call(StepContext.build(input_data={"amount": 5000.0}, step_config=config))
    assert (none.success, none.error_type) == (False, "decision_error")
    assert none.error_message == "kit.decide: no route for amount = 5000"
