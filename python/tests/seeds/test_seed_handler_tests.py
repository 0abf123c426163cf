"""The Python guide's own handler tests ("Building with Python", Testing), as the guide writes
them: MagicMock contexts, no engine."""

import uuid  # noqa: F401  (imported by the guide's test module)
from unittest.mock import MagicMock

from handlers.ecommerce import CreateOrderHandler, ValidateCartHandler


class TestValidateCartHandler:
    def test_validates_cart_successfully(self):
        handler = ValidateCartHandler()
        context = MagicMock()
        context.get_input = MagicMock(
            side_effect=lambda key: (
                [{"sku": "SKU-001", "name": "Widget", "quantity": 2, "unit_price": 29.99}]
                if key in ("items", "cart_items")
                else None
            )
        )

        result = handler.call(context)

        assert result.success is True
        assert result.result["total"] > 0
        assert result.result["item_count"] == 1

    def test_rejects_empty_cart(self):
        handler = ValidateCartHandler()
        context = MagicMock()
        context.get_input = MagicMock(return_value=None)

        result = handler.call(context)

        assert result.success is False


class TestCreateOrderHandler:
    def test_creates_order_from_upstream_data(self):
        handler = CreateOrderHandler()
        context = MagicMock()
        context.get_input = MagicMock(
            side_effect=lambda key: "test@example.com" if key == "customer_email" else None
        )
        context.get_dependency_result = MagicMock(
            side_effect=lambda step: {
                "validate_cart": {"total": 64.79, "validated_items": []},
                "process_payment": {"payment_id": "pay_abc", "transaction_id": "txn_xyz"},
                "update_inventory": {"inventory_log_id": "log_123"},
            }.get(step)
        )

        result = handler.call(context)

        assert result.success is True
        assert result.result["order_id"].startswith("ORD-")
