//! # E-commerce order processing, in Rust
//!
//! The workflow of the "Your first workflow" guide: a checkout validates the cart, then
//! authorises the payment and reserves the stock **in parallel** (two independent external
//! systems), then records the order once both have succeeded and finally emails the customer.
//!
//! ```text
//! validate_cart ─┬─> process_payment ──┬─> create_order ─> send_confirmation
//!                └─> update_inventory ─┘
//! ```
//!
//! The task template lives in [`templates_dir`] (`ecommerce/ecommerce_order_processing`,
//! version 1.0.0). Its callables are the Python import paths of the guide
//! (`handlers.ecommerce.ValidateCartHandler`, ...) so the Python package can load the very
//! same file; [`register_handlers`] registers the Rust handlers of [`mod@handlers`] under those
//! names. The handlers behave like the guide's Python ones: same result fields and values,
//! same failure messages, error types and codes. The payment and inventory steps sleep for
//! `handler.initialization.simulated_latency_ms` (100 ms in the template) to stand in for the
//! gateway and warehouse calls, which makes the two branches' overlap measurable.
//!
//! The payment token in the task context picks the gateway's behaviour:
//! `tok_test_declined` is a permanent decline (`PAYMENT_DECLINED`, no retry),
//! `tok_test_gateway_error` a transient gateway failure (`GATEWAY_ERROR`, retried with
//! exponential backoff until `max_attempts`), anything else (or none) succeeds.
//!
//! ```no_run
//! use std::time::Duration;
//! use tasker_core::{TaskRequest, Tasker};
//!
//! # async fn demo() -> tasker_core::Result<()> {
//! let tasker = Tasker::open("sqlite::memory:").await?;
//! tasker.register_templates(tasker_examples::templates_dir()).await?;
//! tasker_examples::register_handlers(&tasker);
//! let context = serde_json::from_str(include_str!("../sample_order.json")).unwrap();
//! let task = tasker
//!     .run_task(
//!         TaskRequest::new("ecommerce", "ecommerce_order_processing", context),
//!         Some(Duration::from_secs(30)),
//!     )
//!     .await?;
//! println!("{}: {:#?}", task.status, task.results());
//! # Ok(()) }
//! ```

pub mod handlers;
mod money;

use std::path::PathBuf;
use std::sync::Arc;

use tasker_core::{StepHandler, Tasker};

pub use handlers::{
    CreateOrderHandler, ProcessPaymentHandler, SendConfirmationHandler, UpdateInventoryHandler,
    ValidateCartHandler,
};

/// The template's namespace.
pub const NAMESPACE: &str = "ecommerce";
/// The template's name.
pub const TEMPLATE_NAME: &str = "ecommerce_order_processing";
/// The template's version.
pub const TEMPLATE_VERSION: &str = "1.0.0";

/// Callable of the `validate_cart` step.
pub const VALIDATE_CART: &str = "handlers.ecommerce.ValidateCartHandler";
/// Callable of the `process_payment` step.
pub const PROCESS_PAYMENT: &str = "handlers.ecommerce.ProcessPaymentHandler";
/// Callable of the `update_inventory` step.
pub const UPDATE_INVENTORY: &str = "handlers.ecommerce.UpdateInventoryHandler";
/// Callable of the `create_order` step.
pub const CREATE_ORDER: &str = "handlers.ecommerce.CreateOrderHandler";
/// Callable of the `send_confirmation` step.
pub const SEND_CONFIRMATION: &str = "handlers.ecommerce.SendConfirmationHandler";

/// Every handler of the example with the callable the template names it by.
pub fn handlers() -> Vec<(&'static str, Arc<dyn StepHandler>)> {
    vec![
        (VALIDATE_CART, Arc::new(ValidateCartHandler)),
        (PROCESS_PAYMENT, Arc::new(ProcessPaymentHandler)),
        (UPDATE_INVENTORY, Arc::new(UpdateInventoryHandler)),
        (CREATE_ORDER, Arc::new(CreateOrderHandler)),
        (SEND_CONFIRMATION, Arc::new(SendConfirmationHandler)),
    ]
}

/// Registers the example's Rust handlers under the callables its template names.
pub fn register_handlers(tasker: &Tasker) {
    for (callable, handler) in handlers() {
        tasker.register_handler(callable, handler);
    }
}

/// The folder holding the example's task templates.
pub fn templates_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("templates")
}
