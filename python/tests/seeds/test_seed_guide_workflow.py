"""The Python guide's template (the five steps chained) run end to end with the guide's own
handlers, found by their ``handler_name``."""

from itertools import pairwise
from pathlib import Path

from handlers import ecommerce

TEMPLATES = Path(__file__).parent / "templates"

ORDER = {
    "customer_email": "customer@example.com",
    "items": [
        {"sku": "WIDGET-A", "name": "Widget A", "quantity": 2, "unit_price": 29.99},
        {"sku": "GADGET-B", "name": "Gadget B", "quantity": 1, "unit_price": 49.99},
    ],
}

HANDLERS = [
    ecommerce.ValidateCartHandler,
    ecommerce.ProcessPaymentHandler,
    ecommerce.UpdateInventoryHandler,
    ecommerce.CreateOrderHandler,
    ecommerce.SendConfirmationHandler,
]


def test_the_guides_chained_workflow_runs_with_the_guides_handlers(tasker):
    tasker.register_templates(TEMPLATES)
    for handler in HANDLERS:
        tasker.register_handler(handler)

    task = tasker.run_task(
        "ecommerce_order_processing", namespace="ecommerce_py", context=ORDER, timeout=30
    )

    assert task.status == "complete", task
    cart = task.results["validate_cart"]
    assert cart["item_count"] == 2
    assert cart["subtotal"] == 109.97
    assert cart["total"] == round(109.97 + round(109.97 * 0.08, 2), 2)
    assert task.results["process_payment"]["amount_charged"] == cart["total"]
    assert task.results["update_inventory"]["total_items_reserved"] == 3
    assert task.results["create_order"]["order_id"] == "ORD-20260218-ABC"
    assert task.results["send_confirmation"] == {
        "email_sent": True,
        "recipient": "customer@example.com",
        "subject": "Order Confirmation - ORD-20260218-ABC",
        "status": "sent",
    }
    # Chained: each step starts after the one before it completed.
    steps = [task.steps[n] for n in ("validate_cart", "process_payment", "update_inventory")]
    for before, after in pairwise(steps):
        assert before.completed_at <= after.started_at


def test_the_guides_empty_cart_fails_without_retry(tasker):
    tasker.register_templates(TEMPLATES)
    for handler in HANDLERS:
        tasker.register_handler(handler)

    task = tasker.run_task(
        "ecommerce_order_processing",
        namespace="ecommerce_py",
        context={**ORDER, "items": []},
        timeout=30,
    )

    assert task.status == "blocked_by_failures", task
    cart = task.steps["validate_cart"]
    assert (cart.state, cart.attempts) == ("error", 1)
    assert cart.error["error_code"] == "EMPTY_CART"
    assert cart.error["error_type"] == "validation_error"
    assert task.steps["process_payment"].state == "pending"
