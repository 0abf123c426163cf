"""The e-commerce handlers of the seeds, as the guides write them: ``ValidateCartHandler`` from
the Python guide ("Building with Python"), the other four from "Your First Workflow"."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from tasker_core import ErrorType, StepContext, StepHandler, StepHandlerResult


class ValidateCartHandler(StepHandler):
    handler_name = "validate_cart"
    handler_version = "1.0.0"

    TAX_RATE = 0.08

    def call(self, context: StepContext) -> StepHandlerResult:
        cart_items = context.get_input("items") or context.get_input("cart_items")
        if not cart_items or not isinstance(cart_items, list):
            return StepHandlerResult.failure(
                message="Cart is empty or items field is missing",
                error_type=ErrorType.VALIDATION_ERROR,
                retryable=False,
                error_code="EMPTY_CART",
            )

        validated_items: list[dict[str, Any]] = []
        subtotal = 0.0
        for item in cart_items:
            sku = item.get("sku")
            quantity = item.get("quantity", 0)
            unit_price = item.get("unit_price", 0.0)
            if quantity < 1:
                return StepHandlerResult.failure(
                    message=f"Item '{sku}' has invalid quantity: {quantity}",
                    error_type=ErrorType.VALIDATION_ERROR,
                    retryable=False,
                    error_code="INVALID_QUANTITY",
                )
            line_total = round(quantity * unit_price, 2)
            subtotal += line_total
            validated_items.append(
                {
                    "sku": sku,
                    "name": item.get("name"),
                    "quantity": quantity,
                    "unit_price": unit_price,
                    "line_total": line_total,
                }
            )

        tax = round(subtotal * self.TAX_RATE, 2)
        total = round(subtotal + tax, 2)

        return StepHandlerResult.success(
            result={
                "validated_items": validated_items,
                "item_count": len(validated_items),
                "subtotal": subtotal,
                "tax": tax,
                "total": total,
                "validated_at": datetime.now(timezone.utc).isoformat(),
            },
            metadata={"items_validated": len(validated_items)},
        )


class ProcessPaymentHandler(StepHandler):
    handler_name = "process_payment"
    handler_version = "1.0.0"

    def call(self, context: StepContext) -> StepHandlerResult:
        payment_token = context.get_input("payment_token") or "tok_test_success"

        # Read the total from the validate_cart step's result
        cart_result = context.get_dependency_result("validate_cart")
        if cart_result is None:
            return StepHandlerResult.failure(
                message="Missing validate_cart dependency result",
                error_type=ErrorType.HANDLER_ERROR,
                retryable=False,
            )

        total = cart_result.get("total", 0.0)

        # Call payment gateway (simulated here)
        if payment_token == "tok_test_declined":
            return StepHandlerResult.failure(
                message="Payment declined",
                error_type=ErrorType.PERMANENT_ERROR,
                retryable=False,
                error_code="PAYMENT_DECLINED",
            )

        if payment_token == "tok_test_gateway_error":
            return StepHandlerResult.failure(
                message="Payment gateway error, will retry",
                error_type=ErrorType.RETRYABLE_ERROR,
                retryable=True,
                error_code="GATEWAY_ERROR",
            )

        return StepHandlerResult.success(
            result={
                "payment_id": "pay_abc123",
                "transaction_id": "txn_def456",
                "amount_charged": total,
                "status": "completed",
            }
        )


class UpdateInventoryHandler(StepHandler):
    handler_name = "update_inventory"
    handler_version = "1.0.0"

    def call(self, context: StepContext) -> StepHandlerResult:
        cart_result = context.get_dependency_result("validate_cart")
        if cart_result is None:
            return StepHandlerResult.failure(
                message="Missing validate_cart dependency result",
                error_type=ErrorType.HANDLER_ERROR,
                retryable=False,
            )

        validated_items = cart_result.get("validated_items", [])
        reservations = []
        for item in validated_items:
            reservations.append(
                {
                    "sku": item["sku"],
                    "quantity_reserved": item["quantity"],
                    "reservation_id": f"res_{item['sku'].lower()}",
                    "warehouse": "WH-EAST-01",
                }
            )

        return StepHandlerResult.success(
            result={
                "reservations": reservations,
                "total_items_reserved": sum(r["quantity_reserved"] for r in reservations),
                "inventory_log_id": "log_inv_001",
            }
        )


class CreateOrderHandler(StepHandler):
    handler_name = "create_order"
    handler_version = "1.0.0"

    def call(self, context: StepContext) -> StepHandlerResult:
        customer_email = context.get_input("customer_email")

        # Gather results from all upstream steps
        cart_result = context.get_dependency_result("validate_cart")
        payment_result = context.get_dependency_result("process_payment")
        inventory_result = context.get_dependency_result("update_inventory")

        if not all([cart_result, payment_result, inventory_result]):
            return StepHandlerResult.failure(
                message="Missing upstream dependency results",
                error_type=ErrorType.HANDLER_ERROR,
                retryable=False,
            )

        return StepHandlerResult.success(
            result={
                "order_id": "ORD-20260218-ABC",
                "customer_email": customer_email,
                "items": cart_result["validated_items"],
                "total": cart_result["total"],
                "payment_id": payment_result["payment_id"],
                "transaction_id": payment_result["transaction_id"],
                "inventory_log_id": inventory_result["inventory_log_id"],
                "status": "confirmed",
            }
        )


class SendConfirmationHandler(StepHandler):
    handler_name = "send_confirmation"
    handler_version = "1.0.0"

    def call(self, context: StepContext) -> StepHandlerResult:
        order_result = context.get_dependency_result("create_order")
        if order_result is None:
            return StepHandlerResult.failure(
                message="Missing create_order dependency result",
                error_type=ErrorType.HANDLER_ERROR,
                retryable=False,
            )

        return StepHandlerResult.success(
            result={
                "email_sent": True,
                "recipient": order_result["customer_email"],
                "subject": f"Order Confirmation - {order_result['order_id']}",
                "status": "sent",
            }
        )
