"""Functional handlers (``@step_handler``, ``@inputs``, ``@depends_on``): what they deliver,
how validation fails, what they may return, how they register; and the e-commerce example's
decorator-style handlers running the example template in a real engine."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from tasker_core import StepContext, StepHandler, StepHandlerResult, Tasker
from tasker_core.errors import PermanentError
from tasker_core.step_handler.functional import (
    FunctionalHandler,
    depends_on,
    handler_for,
    inputs,
    step_handler,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ecommerce"


def _load_example() -> Any:
    """The example's handlers as the module ``functional_handlers`` (so that a template can
    name its functions by import path), without putting the example directory on the path."""
    if "functional_handlers" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "functional_handlers", EXAMPLE / "python" / "functional_handlers.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["functional_handlers"] = module
        spec.loader.exec_module(module)
    return sys.modules["functional_handlers"]


fh = _load_example()


class Order(BaseModel):
    customer_email: str
    quantity: int


class Cart(BaseModel):
    total: float
    items: list[str] = []


def call(fn: Any, **context: Any) -> StepHandlerResult:
    handler = handler_for(fn)
    assert handler is not None
    result = handler.call(StepContext.build(**context))
    assert isinstance(result, StepHandlerResult)
    return result


# -- what the decorators deliver -------------------------------------------------------------
@step_handler("price_order")
@depends_on(cart=("validate_cart", Cart), raw="lookup")
@inputs(Order)
def price_order(cart: Cart, raw: Any, inputs: Order, context: StepContext) -> dict[str, Any]:
    return {
        "email": inputs.customer_email,
        "total": cart.total * inputs.quantity,
        "raw": raw,
        "step": context.step_name,
    }


def test_models_raw_results_and_the_context_are_delivered():
    result = call(
        price_order,
        step_name="price",
        input_data={"customer_email": "a@b.c", "quantity": "3"},
        dependency_results={"validate_cart": {"total": 2.5}, "lookup": [1, 2]},
    )
    assert result.success is True
    assert result.result == {"email": "a@b.c", "total": 7.5, "raw": [1, 2], "step": "price"}


def test_the_decorated_function_stays_callable_as_written():
    out = price_order(
        cart=Cart(total=2.0),
        raw=None,
        inputs=Order(customer_email="x@y.z", quantity=2),
        context=StepContext.build(step_name="direct"),
    )
    assert out == {"email": "x@y.z", "total": 4.0, "raw": None, "step": "direct"}
    assert price_order.handler_name == "price_order"  # type: ignore[attr-defined]
    cls = price_order._handler_class  # type: ignore[attr-defined]
    assert issubclass(cls, FunctionalHandler) and issubclass(cls, StepHandler)
    assert cls.handler_name == "price_order"


def test_input_fields_by_name():
    @step_handler
    @inputs("customer_email", "coupon")
    def greet(customer_email: str, coupon: str | None, missing_ok: str = "default"):
        return {"to": customer_email, "coupon": coupon, "default": missing_ok}

    assert greet.handler_name == "greet"  # type: ignore[attr-defined]
    result = call(greet, input_data={"customer_email": "a@b.c"})
    assert result.result == {"to": "a@b.c", "coupon": None, "default": "default"}


def test_a_parameter_default_stands_in_for_an_absent_value():
    @step_handler("defaults")
    @depends_on(prior="maybe_skipped")
    @inputs("region")
    def defaults(prior: Any = "none ran", region: str = "eu"):
        return {"prior": prior, "region": region}

    assert call(defaults).result == {"prior": "none ran", "region": "eu"}
    got = call(defaults, input_data={"region": "us"}, dependency_results={"maybe_skipped": {}})
    assert got.result == {"prior": {}, "region": "us"}


# -- validation ------------------------------------------------------------------------------
def test_invalid_inputs_fail_permanently_naming_every_violation():
    result = call(
        price_order,
        input_data={"quantity": "many"},
        dependency_results={"validate_cart": {"total": 1.0}, "lookup": None},
    )
    assert result.success is False
    assert str(result.error_type) == "validation_error"
    assert result.retryable is False
    assert result.message.startswith("price_order: invalid inputs: ")
    assert "inputs.customer_email: Field required" in result.message
    assert "inputs.quantity: Input should be a valid integer" in result.message
    fields = [v["field"] for v in result.metadata["violations"]]
    assert fields == ["inputs.customer_email", "inputs.quantity"]


def test_invalid_and_missing_dependency_results_are_named_with_their_step():
    bad = call(
        price_order,
        input_data={"customer_email": "a@b.c", "quantity": 1},
        dependency_results={"validate_cart": {"total": "lots", "items": "x"}},
    )
    assert str(bad.error_type) == "validation_error" and bad.retryable is False
    fields = [v["field"] for v in bad.metadata["violations"]]
    assert fields == ["cart (step validate_cart).total", "cart (step validate_cart).items"]

    missing = call(price_order, input_data={"customer_email": "a@b.c", "quantity": 1})
    assert "cart (step validate_cart): step 'validate_cart' has no result" in missing.message
    assert missing.metadata["violations"][0]["type"] == "missing_dependency"


def test_inputs_and_dependencies_violations_are_reported_together():
    result = call(price_order, input_data={}, dependency_results={})
    sources = {v["source"] for v in result.metadata["violations"]}
    assert sources == {"inputs", "cart (step validate_cart)"}
    assert "invalid inputs, cart (step validate_cart):" in result.message


# -- return values ---------------------------------------------------------------------------
class Receipt(BaseModel):
    amount: float
    currency: str = "EUR"


def test_return_values():
    @step_handler("as_model")
    def as_model():
        return Receipt(amount=3.5)

    @step_handler("as_none")
    def as_none():
        return None

    @step_handler("as_result")
    def as_result():
        return StepHandlerResult.failure("nope", error_code="NOPE", retryable=False)

    @step_handler("as_list")
    def as_list():
        return [1, 2]

    assert call(as_model).result == {"amount": 3.5, "currency": "EUR"}
    assert call(as_none).result == {}
    assert call(as_result).error_code == "NOPE"
    bad = call(as_list)
    assert (str(bad.error_type), bad.retryable) == ("invalid_result", False)
    assert "as_list returned list" in bad.message


def test_async_functions():
    import asyncio

    @step_handler("async_total")
    @depends_on(cart=("validate_cart", Cart))
    async def async_total(cart: Cart) -> Receipt:
        await asyncio.sleep(0)
        return Receipt(amount=cart.total)

    handler = handler_for(async_total)
    assert handler is not None
    pending = handler.call(StepContext.build(dependency_results={"validate_cart": {"total": 9}}))
    result = asyncio.run(pending)  # type: ignore[arg-type]
    assert result.result == {"amount": 9.0, "currency": "EUR"}
    # A validation failure needs no event loop: it is returned at once.
    failed = handler.call(StepContext.build())
    assert isinstance(failed, StepHandlerResult) and failed.success is False


def test_a_parameter_nothing_supplies_fails_the_step_permanently():
    @step_handler("unsupplied")
    def unsupplied(order_id: str):
        return {}

    result = call(unsupplied)
    assert (str(result.error_type), result.retryable) == ("handler_error", False)
    assert "nothing supplies the parameter(s) order_id" in result.message


# -- decorating mistakes --------------------------------------------------------------------
def test_decorating_mistakes_are_refused_at_once():
    with pytest.raises(TypeError, match="delivers the parameter 'inputs'"):

        @inputs(Order)
        def no_inputs_param(order: Order):
            return {}

    with pytest.raises(TypeError, match="delivers the parameter 'cart'"):

        @depends_on(cart="validate_cart")
        def no_cart_param(inputs: Any):
            return {}

    with pytest.raises(TypeError, match="takes a step name or"):
        depends_on(cart=("validate_cart", dict))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes one Pydantic model class or"):
        inputs()
    with pytest.raises(TypeError, match="takes one Pydantic model class or"):
        inputs(Order, "extra")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes a handler name"):
        step_handler("")
    with pytest.raises(TypeError, match="decorates a function"):
        step_handler("x")(Order)

    # **kwargs takes anything.
    @depends_on(cart="validate_cart")
    def flexible(**kwargs: Any):
        return {"keys": sorted(kwargs)}

    got = call(flexible, dependency_results={"validate_cart": {}})
    assert got.result == {"keys": ["cart", "context"]}


# -- in a real engine -------------------------------------------------------------------------
SIMPLE = """
name: functional_demo
namespace_name: functional
version: "1.0.0"
steps:
  - name: validate_cart
    handler: {{ callable: {first} }}
    dependencies: []
  - name: price
    handler: {{ callable: {second} }}
    dependencies: [validate_cart]
    retry: {{ retryable: true, max_attempts: 2, backoff: none }}
"""


@step_handler("make_cart")
def make_cart() -> Cart:
    return Cart(total=4.0, items=["a"])


@step_handler("charge")
@depends_on(cart=("validate_cart", Cart))
@inputs("fail_with")
async def charge(cart: Cart, fail_with: str | None, context: StepContext):
    if fail_with == "permanent":
        raise PermanentError("card refused", error_code="REFUSED")
    return Receipt(amount=cart.total * context.attempts)


def test_registered_functions_run_by_name_in_an_engine(tasker):
    tasker.register_template(SIMPLE.format(first="make_cart", second="charge"))
    assert tasker.register_handler(make_cart) == ["make_cart", f"{__name__}.make_cart"]
    tasker.register_handler(charge)

    task = tasker.run_task("functional_demo", namespace="functional", timeout=30)
    assert task.status == "complete", task
    assert task.results == {
        "validate_cart": {"total": 4.0, "items": ["a"]},
        "price": {"amount": 4.0, "currency": "EUR"},
    }

    failed = tasker.run_task(
        "functional_demo", namespace="functional", context={"fail_with": "permanent"}, timeout=30
    )
    step = failed.steps["price"]
    assert (step.state, step.attempts) == ("error", 1)
    assert (step.error["error_type"], step.error["error_code"]) == ("permanent_error", "REFUSED")


def test_functions_given_to_the_engine_handle(tmp_path):
    with Tasker(f"sqlite:{tmp_path / 'handle.db'}", handlers=[make_cart, charge]) as engine:
        engine.register_template(SIMPLE.format(first="make_cart", second="charge"))
        task = engine.run_task("functional_demo", namespace="functional", timeout=30)
    assert task.status == "complete", task
    assert task.results["price"] == {"amount": 4.0, "currency": "EUR"}


def test_functions_named_by_import_path_are_found_unregistered(tasker):
    tasker.register_template(
        SIMPLE.format(first=f"{__name__}.make_cart", second=f"{__name__}.charge")
    )
    task = tasker.run_task("functional_demo", namespace="functional", timeout=30)
    assert task.status == "complete", task
    assert task.results["price"] == {"amount": 4.0, "currency": "EUR"}


def test_an_engine_validation_failure_is_permanent_with_its_violations(tasker):
    @step_handler("bad_cart")
    def bad_cart():
        return {"total": "not a number"}

    tasker.register_template(SIMPLE.format(first="bad_cart", second="charge"))
    tasker.register_handler(bad_cart)
    tasker.register_handler(charge)
    task = tasker.run_task("functional_demo", namespace="functional", timeout=30)
    step = task.steps["price"]
    assert (step.state, step.attempts) == ("error", 1)
    assert step.error["error_type"] == "validation_error"
    assert step.error["retryable"] is False
    assert "cart (step validate_cart).total" in step.error["message"]


# -- the e-commerce example in decorator style ----------------------------------------------
ORDER = {
    "customer_email": "customer@example.com",
    "payment_token": "tok_test_success",
    "cart_items": [
        {"sku": "WIDGET-A", "name": "Widget A", "quantity": 2, "unit_price": 29.99},
        {"sku": "GADGET-B", "name": "Gadget B", "quantity": 1, "unit_price": 49.99},
    ],
}

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
def shop(tasker):
    tasker.register_templates(EXAMPLE / "templates")
    for callable_name, fn in fh.BY_TEMPLATE_CALLABLE.items():
        tasker.register_handler(fn, name=callable_name)
    return tasker


def run_order(tasker, **changes: Any):
    return tasker.run_task(
        "ecommerce_order_processing",
        namespace="ecommerce",
        context={**ORDER, **changes},
        timeout=60,
    )


def test_ecommerce_happy_path(shop):
    task = run_order(shop)

    assert task.status == "complete", task
    assert task.results["validate_cart"] == {
        "validated_items": VALIDATED_ITEMS,
        "item_count": 2,
        "subtotal": 109.97,
        "tax": 8.8,
        "shipping": 0.0,
        "total": 118.77,
    }
    assert task.results["process_payment"] == {
        "payment_id": "pay_abc123",
        "transaction_id": "txn_def456",
        "amount_charged": 118.77,
        "status": "completed",
    }
    assert task.results["update_inventory"]["total_items_reserved"] == 3
    assert task.results["update_inventory"]["reservations"][0] == {
        "sku": "WIDGET-A",
        "quantity_reserved": 2,
        "reservation_id": "res_widget-a",
        "warehouse": "WH-EAST-01",
    }
    assert task.results["create_order"] == {
        "order_id": "ORD-20260218-ABC",
        "customer_email": "customer@example.com",
        "items": VALIDATED_ITEMS,
        "total": 118.77,
        "payment_id": "pay_abc123",
        "transaction_id": "txn_def456",
        "inventory_log_id": "log_inv_001",
        "status": "confirmed",
    }
    assert task.results["send_confirmation"] == {
        "email_sent": True,
        "recipient": "customer@example.com",
        "subject": "Order Confirmation - ORD-20260218-ABC",
        "status": "sent",
    }
    pay, inv = task.steps["process_payment"], task.steps["update_inventory"]
    for branch in (pay, inv):
        assert task.steps["validate_cart"].completed_at <= branch.started_at
        assert branch.completed_at <= task.steps["create_order"].started_at


def test_ecommerce_payment_and_inventory_overlap_in_time(shop):
    task = run_order(shop)
    assert task.status == "complete", task
    # Both branches take 100 ms (the template's simulated latency): they overlap in time.
    pay, inv = task.steps["process_payment"], task.steps["update_inventory"]
    assert pay.started_at < inv.completed_at and inv.started_at < pay.completed_at, (pay, inv)


def test_ecommerce_handlers_found_by_import_path(tasker):
    text = (EXAMPLE / "templates" / "ecommerce_order_processing.yaml").read_text()
    for callable_name, fn in fh.BY_TEMPLATE_CALLABLE.items():
        text = text.replace(callable_name, f"functional_handlers.{fn.__name__}")
    tasker.register_template(text)
    task = run_order(tasker)
    assert task.status == "complete", task
    assert task.results["send_confirmation"]["status"] == "sent"


def test_ecommerce_empty_cart(shop):
    task = run_order(shop, cart_items=[])

    assert task.status == "blocked_by_failures", task
    cart = task.steps["validate_cart"]
    assert (cart.state, cart.attempts) == ("error", 1)
    assert cart.error["message"] == "Cart is empty or items field is missing"
    assert (cart.error["error_type"], cart.error["error_code"]) == (
        "validation_error",
        "EMPTY_CART",
    )
    assert cart.error["retryable"] is False
    for name in ("process_payment", "update_inventory", "create_order", "send_confirmation"):
        assert (task.steps[name].state, task.steps[name].attempts) == ("pending", 0)


def test_ecommerce_declined_payment(shop):
    task = run_order(shop, payment_token="tok_test_declined")

    assert task.status == "blocked_by_failures", task
    pay = task.steps["process_payment"]
    assert (pay.state, pay.attempts) == ("error", 1)
    assert pay.error["message"] == "Payment declined"
    assert (pay.error["error_type"], pay.error["error_code"]) == (
        "permanent_error",
        "PAYMENT_DECLINED",
    )
    assert pay.error["retryable"] is False
    assert task.steps["update_inventory"].state == "complete"
    for name in ("create_order", "send_confirmation"):
        assert (task.steps[name].state, task.steps[name].attempts) == ("pending", 0)


def test_ecommerce_gateway_error_is_retried_until_exhausted(shop):
    task = run_order(shop, payment_token="tok_test_gateway_error")

    assert task.status == "blocked_by_failures", task
    pay = task.steps["process_payment"]
    assert (pay.state, pay.attempts, pay.max_attempts) == ("error", 3, 3)
    assert pay.error["message"] == "Payment gateway error, will retry"
    assert (pay.error["error_type"], pay.error["error_code"]) == (
        "retryable_error",
        "GATEWAY_ERROR",
    )
    assert pay.error["retryable"] is True
    assert task.steps["update_inventory"].state == "complete"
    assert task.steps["create_order"].state == "pending"
