"""The checkout workflow's five handlers in the decorator style (``@step_handler``,
``@inputs``, ``@depends_on``): the same steps, results and failures as the class handlers of
the guide and the Rust example beside this directory.

    validate_cart -> (process_payment || update_inventory) -> create_order -> send_confirmation

Each function receives what it declares, validated into Pydantic models: the order from the
task context, the results of the steps before it. ``process_payment`` is ``async def``; the
others are plain functions.

Run with the example's template (its callables name the class handlers, so map them):

    from tasker_core import Tasker
    import functional_handlers as h

    with Tasker("sqlite::memory:", templates="examples/ecommerce/templates") as tasker:
        for callable_name, fn in h.BY_TEMPLATE_CALLABLE.items():
            tasker.register_handler(fn, name=callable_name)
        task = tasker.run_task("ecommerce_order_processing", namespace="ecommerce",
                               context={...})
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from tasker_core import ErrorType, StepContext, StepHandlerResult
from tasker_core.step_handler.functional import depends_on, inputs, step_handler

TAX_RATE = 0.08
FREE_SHIPPING_THRESHOLD = 100.00
STANDARD_SHIPPING = 9.99
DECLINED_TOKEN = "tok_test_declined"
GATEWAY_ERROR_TOKEN = "tok_test_gateway_error"
DEFAULT_TOKEN = "tok_test_success"


# -- what the steps read and produce -------------------------------------------------------
class CartItem(BaseModel):
    sku: str = ""
    name: str | None = None
    quantity: int = 0
    unit_price: float = 0.0


class OrderInput(BaseModel):
    """The task context of an order."""

    cart_items: list[CartItem] = Field(default_factory=list)
    customer_email: str | None = None
    payment_token: str | None = None


class ValidatedItem(BaseModel):
    sku: str
    name: str | None
    quantity: int
    unit_price: float
    line_total: float


class CartResult(BaseModel):
    """What ``validate_cart`` computes."""

    validated_items: list[ValidatedItem]
    item_count: int
    subtotal: float
    tax: float
    shipping: float
    total: float


class PaymentResult(BaseModel):
    payment_id: str
    transaction_id: str
    amount_charged: float
    status: str


class Reservation(BaseModel):
    sku: str
    quantity_reserved: int
    reservation_id: str
    warehouse: str


class InventoryResult(BaseModel):
    reservations: list[Reservation]
    total_items_reserved: int
    inventory_log_id: str


class OrderResult(BaseModel):
    order_id: str
    customer_email: str | None
    items: list[ValidatedItem]
    total: float
    payment_id: str
    transaction_id: str
    inventory_log_id: str
    status: str


# -- the steps --------------------------------------------------------------------------------
@step_handler("validate_cart")
@inputs(OrderInput)
def validate_cart(inputs: OrderInput, context: StepContext) -> CartResult | StepHandlerResult:
    """Validates the cart items and computes subtotal, tax, shipping and total."""
    if not inputs.cart_items:
        return StepHandlerResult.failure(
            message="Cart is empty or items field is missing",
            error_type=ErrorType.VALIDATION_ERROR,
            retryable=False,
            error_code="EMPTY_CART",
        )
    items: list[ValidatedItem] = []
    for idx, item in enumerate(inputs.cart_items):
        if not item.sku or item.quantity < 1 or item.unit_price <= 0:
            return StepHandlerResult.failure(
                message=f"Invalid item at index {idx}",
                error_type=ErrorType.VALIDATION_ERROR,
                retryable=False,
                error_code="INVALID_ITEM",
            )
        items.append(
            ValidatedItem(
                sku=item.sku,
                name=item.name if item.name is not None else item.sku,
                quantity=item.quantity,
                unit_price=item.unit_price,
                line_total=round(item.quantity * item.unit_price, 2),
            )
        )
    subtotal = round(sum(i.line_total for i in items), 2)
    tax = round(subtotal * TAX_RATE, 2)
    shipping = 0.0 if subtotal >= FREE_SHIPPING_THRESHOLD else STANDARD_SHIPPING
    return CartResult(
        validated_items=items,
        item_count=len(items),
        subtotal=subtotal,
        tax=tax,
        shipping=shipping,
        total=round(subtotal + tax + shipping, 2),
    )


@step_handler("process_payment")
@depends_on(cart=("validate_cart", CartResult))
@inputs(OrderInput)
async def process_payment(
    cart: CartResult, inputs: OrderInput, context: StepContext
) -> PaymentResult | StepHandlerResult:
    """Authorises the payment of the cart total through the (simulated) gateway."""
    await asyncio.sleep(_simulated_latency(context))
    token = inputs.payment_token or DEFAULT_TOKEN
    if token == DECLINED_TOKEN:
        return StepHandlerResult.failure(
            message="Payment declined",
            error_type=ErrorType.PERMANENT_ERROR,
            retryable=False,
            error_code="PAYMENT_DECLINED",
        )
    if token == GATEWAY_ERROR_TOKEN:
        return StepHandlerResult.failure(
            message="Payment gateway error, will retry",
            error_type=ErrorType.RETRYABLE_ERROR,
            retryable=True,
            error_code="GATEWAY_ERROR",
        )
    return PaymentResult(
        payment_id="pay_abc123",
        transaction_id="txn_def456",
        amount_charged=cart.total,
        status="completed",
    )


@step_handler("update_inventory")
@depends_on(cart=("validate_cart", CartResult))
def update_inventory(cart: CartResult, context: StepContext) -> InventoryResult:
    """Reserves stock for every validated item in the (simulated) warehouse."""
    time.sleep(_simulated_latency(context))
    reservations = [
        Reservation(
            sku=item.sku,
            quantity_reserved=item.quantity,
            reservation_id=f"res_{item.sku.lower()}",
            warehouse="WH-EAST-01",
        )
        for item in cart.validated_items
    ]
    return InventoryResult(
        reservations=reservations,
        total_items_reserved=sum(r.quantity_reserved for r in reservations),
        inventory_log_id="log_inv_001",
    )


@step_handler("create_order")
@depends_on(
    cart=("validate_cart", CartResult),
    payment=("process_payment", PaymentResult),
    inventory=("update_inventory", InventoryResult),
)
@inputs("customer_email")
def create_order(
    cart: CartResult,
    payment: PaymentResult,
    inventory: InventoryResult,
    customer_email: str | None,
) -> OrderResult:
    """Records the order once payment and inventory have both succeeded."""
    return OrderResult(
        order_id="ORD-20260218-ABC",
        customer_email=customer_email,
        items=cart.validated_items,
        total=cart.total,
        payment_id=payment.payment_id,
        transaction_id=payment.transaction_id,
        inventory_log_id=inventory.inventory_log_id,
        status="confirmed",
    )


@step_handler("send_confirmation")
@depends_on(order=("create_order", OrderResult))
def send_confirmation(order: OrderResult) -> dict[str, Any]:
    """Emails the order confirmation to the customer (simulated)."""
    return {
        "email_sent": True,
        "recipient": order.customer_email,
        "subject": f"Order Confirmation - {order.order_id}",
        "status": "sent",
    }


def _simulated_latency(context: StepContext) -> float:
    """Seconds the simulated external call takes (the step's ``simulated_latency_ms``)."""
    ms = context.get_config("simulated_latency_ms", 0)
    return max(float(ms), 0.0) / 1000.0


HANDLERS: list[Callable[..., Any]] = [
    validate_cart,
    process_payment,
    update_inventory,
    create_order,
    send_confirmation,
]

# The example template names the class handlers; these serve the same steps.
BY_TEMPLATE_CALLABLE: dict[str, Callable[..., Any]] = {
    "handlers.ecommerce.ValidateCartHandler": validate_cart,
    "handlers.ecommerce.ProcessPaymentHandler": process_payment,
    "handlers.ecommerce.UpdateInventoryHandler": update_inventory,
    "handlers.ecommerce.CreateOrderHandler": create_order,
    "handlers.ecommerce.SendConfirmationHandler": send_confirmation,
}
