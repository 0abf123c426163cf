"""The seeds' e-commerce checkout with the guide's Python handlers (class style,
``examples/ecommerce/python/handlers.py``) on the shipped template
``examples/ecommerce/templates/ecommerce_order_processing.yaml``, end to end in an embedded
engine: the happy path and its results, the parallel branches, and the guide's failure cases
(empty cart, declined payment, gateway error retried with backoff until exhausted)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conformance import ECOMMERCE_DIR, ecommerce_handlers

from tasker_core import StepHandlerResult, Tasker
from tasker_core.engine import StepView, Task

handlers = ecommerce_handlers()

TIMEOUT = 30.0
DOWNSTREAM_OF_VALIDATION = (
    "process_payment",
    "update_inventory",
    "create_order",
    "send_confirmation",
)
VALIDATED_ITEMS = [
    {
        "sku": "WIDGET-A",
        "name": "Widget A",
        "quantity": 2,
        "unit_price": 29.99,
        "line_total": 59.98,
    },
    {
        "sku": "GADGET-B",
        "name": "Gadget B",
        "quantity": 1,
        "unit_price": 49.99,
        "line_total": 49.99,
    },
]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Tasker]:
    """An engine on a fresh SQLite file with the example's template. Its callables are the
    guide's import paths (``handlers.ecommerce.ValidateCartHandler``, ...): the engine finds
    the Python handlers by them, with no explicit registration."""
    with Tasker(f"sqlite:{tmp_path / 'ecommerce.db'}", poll_interval_ms=50) as tasker:
        infos = tasker.register_templates(ECOMMERCE_DIR / "templates")
        assert [(i.namespace, i.name, i.version) for i in infos] == [
            ("ecommerce", "ecommerce_order_processing", "1.0.0")
        ]
        assert set(infos[0].callables) == set(handlers.CALLABLES)
        yield tasker


def order(file: str) -> dict[str, Any]:
    """One of the sample orders shipped with the example."""
    data: dict[str, Any] = json.loads((ECOMMERCE_DIR / file).read_text(encoding="utf-8"))
    return data


def run(tasker: Tasker, context: dict[str, Any]) -> Task:
    return tasker.run_task(
        "ecommerce_order_processing",
        namespace="ecommerce",
        version="1.0.0",
        context=context,
        timeout=TIMEOUT,
    )


def interval(step: StepView) -> tuple[int, int]:
    assert step.started_at is not None, f"{step.name} never started"
    assert step.completed_at is not None, f"{step.name} never completed"
    return step.started_at, step.completed_at


def test_happy_path_completes_with_the_guides_results(engine: Tasker) -> None:
    task = run(engine, order("sample_order.json"))
    assert task.status == "complete", task
    for s in task.steps.values():
        assert (s.state, s.attempts) == ("complete", 1), s
    # subtotal 59.98 + 49.99 = 109.97; tax round(8.7976, 2) = 8.8; free shipping from 100.
    assert task.results == {
        "validate_cart": {
            "validated_items": VALIDATED_ITEMS,
            "item_count": 2,
            "subtotal": 109.97,
            "tax": 8.8,
            "shipping": 0.0,
            "total": 118.77,
        },
        "process_payment": {
            "payment_id": "pay_abc123",
            "transaction_id": "txn_def456",
            "amount_charged": 118.77,
            "status": "completed",
        },
        "update_inventory": {
            "reservations": [
                {
                    "sku": "WIDGET-A",
                    "quantity_reserved": 2,
                    "reservation_id": "res_widget-a",
                    "warehouse": "WH-EAST-01",
                },
                {
                    "sku": "GADGET-B",
                    "quantity_reserved": 1,
                    "reservation_id": "res_gadget-b",
                    "warehouse": "WH-EAST-01",
                },
            ],
            "total_items_reserved": 3,
            "inventory_log_id": "log_inv_001",
        },
        "create_order": {
            "order_id": "ORD-20260218-ABC",
            "customer_email": "customer@example.com",
            "items": VALIDATED_ITEMS,
            "total": 118.77,
            "payment_id": "pay_abc123",
            "transaction_id": "txn_def456",
            "inventory_log_id": "log_inv_001",
            "status": "confirmed",
        },
        "send_confirmation": {
            "email_sent": True,
            "recipient": "customer@example.com",
            "subject": "Order Confirmation - ORD-20260218-ABC",
            "status": "sent",
        },
    }


def test_payment_and_inventory_run_in_parallel(engine: Tasker) -> None:
    task = run(engine, order("sample_order.json"))
    assert task.status == "complete", task
    # Each branch spends 100 ms in its simulated external call: one after the other, their
    # intervals could not intersect.
    pay_start, pay_end = interval(task.steps["process_payment"])
    inv_start, inv_end = interval(task.steps["update_inventory"])
    assert pay_start < inv_end and inv_start < pay_end, (
        f"process_payment [{pay_start}, {pay_end}] and update_inventory "
        f"[{inv_start}, {inv_end}] do not overlap"
    )
    assert pay_end - pay_start >= 100 and inv_end - inv_start >= 100, "the latency was skipped"
    # The DAG's ordering around the parallel pair, from the recorded order of transitions.
    transitions = engine.transitions(task.uuid)["steps"]

    def seq(step: str, event: str) -> int:
        for i, t in enumerate(transitions):
            if t.get("step_name") == step and t["event"] == event:
                return i
        raise AssertionError(f"no {event} of {step}: {transitions}")

    for branch in ("process_payment", "update_inventory"):
        assert seq(branch, "claim") > seq("validate_cart", "complete"), transitions
        assert seq("create_order", "claim") > seq(branch, "complete"), transitions


def test_empty_cart_fails_validation_without_retry(engine: Tasker) -> None:
    task = run(engine, order("empty_cart_order.json"))
    assert task.status == "blocked_by_failures", task
    cart = task.steps["validate_cart"]
    assert (cart.state, cart.attempts) == ("error", 1), cart
    assert cart.error is not None
    assert cart.error["message"] == "Cart is empty or items field is missing"
    assert cart.error["error_type"] == "validation_error"
    assert cart.error["error_code"] == "EMPTY_CART"
    assert cart.error["retryable"] is False
    for name in DOWNSTREAM_OF_VALIDATION:
        s = task.steps[name]
        assert (s.state, s.attempts, s.started_at) == ("pending", 0, None), s


def test_invalid_item_is_reported_with_its_index(engine: Tasker) -> None:
    context = order("sample_order.json")
    context["cart_items"][1]["quantity"] = 0
    task = run(engine, context)
    assert task.status == "blocked_by_failures", task
    cart = task.steps["validate_cart"]
    assert (cart.state, cart.attempts) == ("error", 1), cart
    assert cart.error is not None
    assert cart.error["message"] == "Invalid item at index 1"
    assert cart.error["error_code"] == "INVALID_ITEM"
    assert cart.error["retryable"] is False


def test_declined_payment_is_a_permanent_failure(engine: Tasker) -> None:
    task = run(engine, order("declined_order.json"))
    assert task.status == "blocked_by_failures", task
    payment = task.steps["process_payment"]
    assert (payment.state, payment.attempts) == ("error", 1), payment
    assert payment.error is not None
    assert payment.error["message"] == "Payment declined"
    assert payment.error["error_type"] == "permanent_error"
    assert payment.error["error_code"] == "PAYMENT_DECLINED"
    assert payment.error["retryable"] is False
    # The parallel branch does not depend on the payment and finishes; the convergence point
    # and everything after it never run.
    assert task.steps["update_inventory"].state == "complete"
    for name in ("create_order", "send_confirmation"):
        s = task.steps[name]
        assert (s.state, s.attempts) == ("pending", 0), s


def test_gateway_errors_are_retried_with_backoff_until_exhausted(engine: Tasker) -> None:
    # The template's backoff is 100 ms exponential (100, then 200 ms): no override needed.
    task = run(engine, order("gateway_error_order.json"))
    assert task.status == "blocked_by_failures", task
    payment = task.steps["process_payment"]
    assert payment.max_attempts == 3
    assert (payment.state, payment.attempts) == ("error", 3), payment
    assert payment.error is not None
    assert payment.error["message"] == "Payment gateway error, will retry"
    assert payment.error["error_type"] == "retryable_error"
    assert payment.error["error_code"] == "GATEWAY_ERROR"
    assert payment.error["retryable"] is True
    assert task.steps["update_inventory"].state == "complete"
    assert task.steps["create_order"].state == "pending"

    transitions = [
        t for t in engine.transitions(task.uuid)["steps"] if t.get("step_name") == "process_payment"
    ]
    retries = [t for t in transitions if t["event"] == "retry_decided"]
    assert len(retries) == 2, f"two waits between three attempts: {transitions}"
    assert all(t["to_state"] == "waiting_for_retry" for t in retries), retries
    assert sum(1 for t in transitions if t["event"] == "give_up") == 1, transitions
    # Exponential backoff from 100 ms (±15 % jitter): the step is enqueued again only once
    # the wait is over, and the next attempt is claimed after that.
    ready = [t for t in transitions if t["event"] == "retry_ready"]
    assert len(ready) == 2, transitions
    for n, min_gap in ((0, 85), (1, 170)):
        waited = ready[n]["created_at"] - retries[n]["created_at"]
        assert waited >= min_gap, f"retry {n + 1} enqueued {waited} ms after the decision"
    for n, attempt in ((0, 2), (1, 3)):
        claim = next(
            i
            for i, t in enumerate(transitions)
            if t["event"] == "claim" and t.get("attempt") == attempt
        )
        assert claim > transitions.index(ready[n]), transitions


def test_explicitly_registered_handlers_run_the_order(tmp_path: Path) -> None:
    """``register_handlers`` (for a module not importable as ``handlers``) serves the same
    callables."""
    with Tasker(f"sqlite:{tmp_path / 'explicit.db'}", poll_interval_ms=50) as tasker:
        handlers.register_handlers(tasker)
        tasker.register_templates(ECOMMERCE_DIR / "templates")
        task = run(tasker, order("sample_order.json"))
    assert task.status == "complete", task
    assert task.results["send_confirmation"]["recipient"] == "customer@example.com"


def test_handlers_unit_tested_with_a_built_context() -> None:
    """The handlers as plain classes, with a hand-made context and no engine."""
    from tasker_core import StepContext

    cart = handlers.ValidateCartHandler().call(
        StepContext.build(
            input_data={"cart_items": [{"sku": "A", "quantity": 3, "unit_price": 10.0}]}
        )
    )
    assert isinstance(cart, StepHandlerResult)
    assert cart.success is True
    assert cart.result is not None
    assert (cart.result["subtotal"], cart.result["tax"], cart.result["shipping"]) == (
        30.0,
        2.4,
        9.99,
    )
    assert cart.result["total"] == 42.39
    missing = handlers.SendConfirmationHandler().call(StepContext.build())
    assert missing.success is False
    assert missing.error_type == "handler_error" and missing.retryable is False
