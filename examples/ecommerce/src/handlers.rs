//! The five step handlers of the checkout workflow.
//!
//! Each mirrors the guide's Python handler of the same name: same result fields and values,
//! same failure messages, error types and error codes. Where the Python code would raise on
//! malformed data (a cart item that is not an object, an upstream result missing a field) it
//! would fail with a retryable `handler_error`; these handlers instead return a non-retryable
//! failure naming the problem, because retrying cannot repair data. The template's
//! `input_schema` keeps such data out of tasks in the first place.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value, json};
use tasker_core::{ErrorType, StepContext, StepHandler, StepHandlerResult};

use crate::money::round_cents;

/// Sales tax applied to the subtotal.
pub const TAX_RATE: f64 = 0.08;
/// Subtotal from which shipping is free.
pub const FREE_SHIPPING_THRESHOLD: f64 = 100.00;
/// Shipping charged below [`FREE_SHIPPING_THRESHOLD`].
pub const STANDARD_SHIPPING: f64 = 9.99;
/// The payment token the simulated gateway declines for good.
pub const DECLINED_TOKEN: &str = "tok_test_declined";
/// The payment token for which the simulated gateway fails transiently.
pub const GATEWAY_ERROR_TOKEN: &str = "tok_test_gateway_error";
/// The payment token used when the task context has none.
pub const DEFAULT_TOKEN: &str = "tok_test_success";

/// Validates the cart items and computes subtotal, tax, shipping and total.
///
/// Reads `cart_items` from the task context. An empty or missing cart fails with
/// `EMPTY_CART`, an item without a SKU, with a quantity below 1 or a non-positive price with
/// `INVALID_ITEM` (both `validation_error`, not retryable: bad data does not improve).
#[derive(Debug, Default, Clone, Copy)]
pub struct ValidateCartHandler;

impl ValidateCartHandler {
    /// The handler's name, as in the guide.
    pub const HANDLER_NAME: &'static str = "validate_cart";
    /// The handler's version.
    pub const HANDLER_VERSION: &'static str = "1.0.0";
}

#[async_trait]
impl StepHandler for ValidateCartHandler {
    async fn call(&self, ctx: &StepContext) -> StepHandlerResult {
        let cart_items = ctx.get_input("cart_items");
        if !truthy(cart_items) {
            return validation_failure("Cart is empty or items field is missing", "EMPTY_CART");
        }
        let Some(Value::Array(cart_items)) = cart_items else {
            return validation_failure("Cart items must be a list", "INVALID_ITEM");
        };

        let mut validated_items = Vec::with_capacity(cart_items.len());
        let mut subtotal = 0.0;
        for (idx, item) in cart_items.iter().enumerate() {
            let Some(line) = validate_item(item) else {
                return validation_failure(format!("Invalid item at index {idx}"), "INVALID_ITEM");
            };
            subtotal += line.total_f64;
            validated_items.push(line.json);
        }

        let subtotal = round_cents(subtotal);
        let tax = round_cents(subtotal * TAX_RATE);
        let shipping = if subtotal >= FREE_SHIPPING_THRESHOLD {
            0.0
        } else {
            STANDARD_SHIPPING
        };
        let total = round_cents(subtotal + tax + shipping);
        StepHandlerResult::success(json!({
            "item_count": validated_items.len(),
            "validated_items": validated_items,
            "subtotal": subtotal,
            "tax": tax,
            "shipping": shipping,
            "total": total,
        }))
    }
}

/// One validated cart line: its JSON form and its total as a float for the subtotal.
struct Line {
    json: Value,
    total_f64: f64,
}

/// Checks one cart item the way the guide does (`not sku or quantity < 1 or unit_price <= 0`);
/// `None` when it is invalid.
fn validate_item(item: &Value) -> Option<Line> {
    let item = item.as_object()?;
    let sku = item
        .get("sku")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())?;
    // Absent quantity / price default to 0 in the guide, which then fails the range check.
    let quantity = item.get("quantity").cloned().unwrap_or(json!(0));
    let unit_price = item.get("unit_price").cloned().unwrap_or(json!(0.0));
    let (q, p) = (quantity.as_f64()?, unit_price.as_f64()?);
    if q < 1.0 || p <= 0.0 {
        return None;
    }
    // Python keeps int × int as an int (round(int, 2) is that int), so a whole-number price
    // gives a whole-number line total; keep the same JSON number kind.
    let line_total = match (quantity.as_i64(), unit_price.as_i64()) {
        (Some(qi), Some(pi)) => qi
            .checked_mul(pi)
            .map_or_else(|| json!(q * p), |t| json!(t)),
        _ => json!(round_cents(q * p)),
    };
    let total_f64 = line_total.as_f64()?;
    Some(Line {
        json: json!({
            "sku": sku,
            // `item.get("name", sku)`: an explicit null name stays null.
            "name": item.get("name").cloned().unwrap_or_else(|| json!(sku)),
            "quantity": quantity,
            "unit_price": unit_price,
            "line_total": line_total,
        }),
        total_f64,
    })
}

/// Authorises the payment of the cart total through the (simulated) payment gateway.
///
/// `payment_token` from the task context decides the gateway's answer: [`DECLINED_TOKEN`] ⇒
/// `PAYMENT_DECLINED` (`permanent_error`, not retryable), [`GATEWAY_ERROR_TOKEN`] ⇒
/// `GATEWAY_ERROR` (`retryable_error`, retried), anything else ⇒ success.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessPaymentHandler;

impl ProcessPaymentHandler {
    /// The handler's name, as in the guide.
    pub const HANDLER_NAME: &'static str = "process_payment";
    /// The handler's version.
    pub const HANDLER_VERSION: &'static str = "1.0.0";
}

#[async_trait]
impl StepHandler for ProcessPaymentHandler {
    async fn call(&self, ctx: &StepContext) -> StepHandlerResult {
        // `get_input("payment_token") or "tok_test_success"`: an empty token means none.
        let payment_token = ctx
            .get_input("payment_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .unwrap_or(DEFAULT_TOKEN);

        let Some(cart_result) = dependency_object(ctx, "validate_cart") else {
            return missing_dependency("Missing validate_cart dependency result");
        };
        let total = cart_result.get("total").cloned().unwrap_or(json!(0.0));

        simulate_external_call(ctx).await;
        if payment_token == DECLINED_TOKEN {
            return StepHandlerResult::failure("Payment declined", ErrorType::PermanentError)
                .with_retryable(false)
                .with_error_code("PAYMENT_DECLINED");
        }
        if payment_token == GATEWAY_ERROR_TOKEN {
            return StepHandlerResult::failure(
                "Payment gateway error, will retry",
                ErrorType::RetryableError,
            )
            .with_retryable(true)
            .with_error_code("GATEWAY_ERROR");
        }
        StepHandlerResult::success(json!({
            "payment_id": "pay_abc123",
            "transaction_id": "txn_def456",
            "amount_charged": total,
            "status": "completed",
        }))
    }
}

/// Reserves stock for every validated cart item in the (simulated) warehouse.
#[derive(Debug, Default, Clone, Copy)]
pub struct UpdateInventoryHandler;

impl UpdateInventoryHandler {
    /// The handler's name, as in the guide.
    pub const HANDLER_NAME: &'static str = "update_inventory";
    /// The handler's version.
    pub const HANDLER_VERSION: &'static str = "1.0.0";
}

#[async_trait]
impl StepHandler for UpdateInventoryHandler {
    async fn call(&self, ctx: &StepContext) -> StepHandlerResult {
        let Some(cart_result) = dependency_object(ctx, "validate_cart") else {
            return missing_dependency("Missing validate_cart dependency result");
        };
        let empty = Vec::new();
        let validated_items = cart_result
            .get("validated_items")
            .and_then(Value::as_array)
            .unwrap_or(&empty);

        simulate_external_call(ctx).await;
        let mut reservations = Vec::with_capacity(validated_items.len());
        let mut reserved = Quantity::default();
        for item in validated_items {
            let (Some(sku), Some(quantity)) = (
                item.get("sku").and_then(Value::as_str),
                item.get("quantity"),
            ) else {
                return malformed(
                    "update_inventory",
                    "validate_cart",
                    "validated_items[].sku/quantity",
                );
            };
            let Some(()) = reserved.add(quantity) else {
                return malformed(
                    "update_inventory",
                    "validate_cart",
                    "validated_items[].quantity",
                );
            };
            reservations.push(json!({
                "sku": sku,
                "quantity_reserved": quantity,
                "reservation_id": format!("res_{}", sku.to_lowercase()),
                "warehouse": "WH-EAST-01",
            }));
        }
        StepHandlerResult::success(json!({
            "reservations": reservations,
            "total_items_reserved": reserved.into_json(),
            "inventory_log_id": "log_inv_001",
        }))
    }
}

/// A running sum that stays an integer while every addend is one, like Python's `sum`.
#[derive(Default)]
struct Quantity {
    int: i64,
    float: Option<f64>,
}

impl Quantity {
    fn add(&mut self, v: &Value) -> Option<()> {
        match (self.float, v.as_i64()) {
            (None, Some(i)) => match self.int.checked_add(i) {
                Some(sum) => self.int = sum,
                None => self.float = Some(self.int as f64 + i as f64),
            },
            (f, _) => self.float = Some(f.unwrap_or(self.int as f64) + v.as_f64()?),
        }
        Some(())
    }

    fn into_json(self) -> Value {
        self.float.map_or_else(|| json!(self.int), |f| json!(f))
    }
}

/// Records the order once payment and inventory have both succeeded (the convergence point).
#[derive(Debug, Default, Clone, Copy)]
pub struct CreateOrderHandler;

impl CreateOrderHandler {
    /// The handler's name, as in the guide.
    pub const HANDLER_NAME: &'static str = "create_order";
    /// The handler's version.
    pub const HANDLER_VERSION: &'static str = "1.0.0";
}

#[async_trait]
impl StepHandler for CreateOrderHandler {
    async fn call(&self, ctx: &StepContext) -> StepHandlerResult {
        let customer_email = ctx
            .get_input("customer_email")
            .cloned()
            .unwrap_or(Value::Null);
        let cart = ctx.get_dependency_result("validate_cart");
        let payment = ctx.get_dependency_result("process_payment");
        let inventory = ctx.get_dependency_result("update_inventory");
        // The guide's `not all([...])`: an absent or empty result counts as missing.
        if ![cart, payment, inventory].into_iter().all(truthy) {
            return missing_dependency("Missing upstream dependency results");
        }
        let required = [
            (cart, "validate_cart", "validated_items"),
            (cart, "validate_cart", "total"),
            (payment, "process_payment", "payment_id"),
            (payment, "process_payment", "transaction_id"),
            (inventory, "update_inventory", "inventory_log_id"),
        ];
        fn get<'a>(result: Option<&'a Value>, key: &str) -> Option<&'a Value> {
            result.and_then(|r| r.get(key))
        }
        if let Some((_, step, key)) = required.iter().find(|(r, _, k)| get(*r, k).is_none()) {
            return malformed("create_order", step, key);
        }
        let field =
            |result: Option<&Value>, key: &str| get(result, key).cloned().unwrap_or_default();
        StepHandlerResult::success(json!({
            "order_id": "ORD-20260218-ABC",
            "customer_email": customer_email,
            "items": field(cart, "validated_items"),
            "total": field(cart, "total"),
            "payment_id": field(payment, "payment_id"),
            "transaction_id": field(payment, "transaction_id"),
            "inventory_log_id": field(inventory, "inventory_log_id"),
            "status": "confirmed",
        }))
    }
}

/// Emails the order confirmation to the customer (simulated).
#[derive(Debug, Default, Clone, Copy)]
pub struct SendConfirmationHandler;

impl SendConfirmationHandler {
    /// The handler's name, as in the guide.
    pub const HANDLER_NAME: &'static str = "send_confirmation";
    /// The handler's version.
    pub const HANDLER_VERSION: &'static str = "1.0.0";
}

#[async_trait]
impl StepHandler for SendConfirmationHandler {
    async fn call(&self, ctx: &StepContext) -> StepHandlerResult {
        // The guide checks `is None` here (not truthiness): an empty result is not "missing".
        let Some(order) = ctx
            .get_dependency_result("create_order")
            .filter(|v| !v.is_null())
        else {
            return missing_dependency("Missing create_order dependency result");
        };
        let (Some(recipient), Some(order_id)) =
            (order.get("customer_email"), order.get("order_id"))
        else {
            return malformed(
                "send_confirmation",
                "create_order",
                "customer_email/order_id",
            );
        };
        // Python's f-string prints a string without quotes and other values as written.
        let order_id = order_id
            .as_str()
            .map_or_else(|| order_id.to_string(), str::to_owned);
        StepHandlerResult::success(json!({
            "email_sent": true,
            "recipient": recipient,
            "subject": format!("Order Confirmation - {order_id}"),
            "status": "sent",
        }))
    }
}

/// Python truthiness of an optional JSON value: absent, null, false, 0, "", [] and {} are false.
fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

/// An upstream result as an object; `None` when the ancestor has none (or not an object).
fn dependency_object<'a>(ctx: &'a StepContext, step: &str) -> Option<&'a Map<String, Value>> {
    ctx.get_dependency_result(step).and_then(Value::as_object)
}

/// Sleeps for `handler.initialization.simulated_latency_ms`, standing in for the external
/// system the step would call. Steps without the setting return at once.
async fn simulate_external_call(ctx: &StepContext) {
    let ms = ctx
        .get_config("simulated_latency_ms")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    if ms > 0.0 && ms.is_finite() {
        tokio::time::sleep(Duration::from_secs_f64(ms / 1000.0)).await;
    }
}

fn validation_failure(message: impl Into<String>, code: &str) -> StepHandlerResult {
    StepHandlerResult::failure(message, ErrorType::ValidationError)
        .with_retryable(false)
        .with_error_code(code)
}

/// The guide's failure for an upstream result that is not there: a bug in the workflow, not
/// something a retry fixes.
fn missing_dependency(message: &str) -> StepHandlerResult {
    StepHandlerResult::failure(message, ErrorType::HandlerError).with_retryable(false)
}

/// An upstream result exists but lacks a field this step needs.
fn malformed(step: &str, upstream: &str, field: &str) -> StepHandlerResult {
    missing_dependency(&format!(
        "{step}: the {upstream} result has no usable `{field}`"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truthiness_follows_python() {
        for falsy in [
            json!(null),
            json!(false),
            json!(0),
            json!(0.0),
            json!(""),
            json!([]),
            json!({}),
        ] {
            assert!(!truthy(Some(&falsy)), "{falsy} should be falsy");
        }
        assert!(!truthy(None));
        for truthy_v in [
            json!(true),
            json!(1),
            json!(-0.5),
            json!("x"),
            json!([0]),
            json!({"a": 0}),
        ] {
            assert!(truthy(Some(&truthy_v)), "{truthy_v} should be truthy");
        }
    }

    #[test]
    fn items_are_checked_like_the_guide() {
        let ok = json!({"sku": "A", "name": "A", "quantity": 2, "unit_price": 29.99});
        let line = validate_item(&ok).unwrap();
        assert_eq!(line.json["line_total"], json!(59.98));
        for bad in [
            json!({"name": "no sku", "quantity": 1, "unit_price": 1.0}),
            json!({"sku": "", "quantity": 1, "unit_price": 1.0}),
            json!({"sku": "A", "quantity": 0, "unit_price": 1.0}),
            json!({"sku": "A", "unit_price": 1.0}),
            json!({"sku": "A", "quantity": 1, "unit_price": 0}),
            json!({"sku": "A", "quantity": 1}),
            json!("not an object"),
        ] {
            assert!(validate_item(&bad).is_none(), "{bad} should be invalid");
        }
    }

    #[test]
    fn whole_number_prices_keep_integer_line_totals() {
        let line = validate_item(&json!({"sku": "A", "quantity": 3, "unit_price": 50})).unwrap();
        assert_eq!(line.json["line_total"], json!(150));
        assert_eq!(line.json["name"], json!("A"), "name defaults to the sku");
    }

    #[test]
    fn quantities_sum_as_integers_until_a_float_appears() {
        let mut q = Quantity::default();
        q.add(&json!(2)).unwrap();
        q.add(&json!(1)).unwrap();
        assert_eq!(q.into_json(), json!(3));
        let mut q = Quantity::default();
        q.add(&json!(2)).unwrap();
        q.add(&json!(0.5)).unwrap();
        assert_eq!(q.into_json(), json!(2.5));
        assert!(Quantity::default().add(&json!("x")).is_none());
    }
}
