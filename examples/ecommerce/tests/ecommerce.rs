//! The e-commerce example end to end: the shipped template and sample orders run through the
//! engine handle on an in-memory store, with the Rust handlers of this crate.

use std::time::Duration;

use serde_json::{Value, json};
use tasker_core::task::StepView;
use tasker_core::{
    ErrorKind, ErrorType, StepState, Task, TaskRequest, TaskState, Tasker, Transition,
};
use tasker_examples::{
    NAMESPACE, TEMPLATE_NAME, TEMPLATE_VERSION, register_handlers, templates_dir,
};

/// Generous: the slowest scenario (three gateway attempts) needs well under a second, but the
/// machine is shared with other builds.
const TIMEOUT: Duration = Duration::from_secs(30);

const DOWNSTREAM_OF_VALIDATION: [&str; 4] = [
    "process_payment",
    "update_inventory",
    "create_order",
    "send_confirmation",
];

async fn engine() -> Tasker {
    let tasker = Tasker::open("sqlite::memory:")
        .await
        .expect("open the engine");
    let loaded = tasker
        .register_templates(templates_dir())
        .await
        .expect("register the templates");
    assert_eq!(loaded.len(), 1, "the example ships one template");
    register_handlers(&tasker);
    tasker
}

/// One of the sample contexts shipped beside the crate.
fn order(file: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn request(context: Value) -> TaskRequest {
    TaskRequest::new(NAMESPACE, TEMPLATE_NAME, context)
        .version(TEMPLATE_VERSION)
        .origin("test:ecommerce", "tests", "example end to end")
}

async fn run(tasker: &Tasker, file: &str) -> Task {
    tasker
        .run_task(request(order(file)), Some(TIMEOUT))
        .await
        .expect("the task runs")
}

fn step<'a>(task: &'a Task, name: &str) -> &'a StepView {
    task.step(name)
        .unwrap_or_else(|| panic!("no step {name} in {task:#?}"))
}

fn interval(s: &StepView) -> (i64, i64) {
    let started = s
        .started_at
        .unwrap_or_else(|| panic!("{} never started", s.name));
    let completed = s
        .completed_at
        .unwrap_or_else(|| panic!("{} never completed", s.name));
    (started, completed)
}

/// The validated cart of every sample order with items: 2 × 29.99 + 1 × 49.99.
fn validated_items() -> Value {
    json!([
        {"sku": "WIDGET-A", "name": "Widget A", "quantity": 2, "unit_price": 29.99, "line_total": 59.98},
        {"sku": "GADGET-B", "name": "Gadget B", "quantity": 1, "unit_price": 49.99, "line_total": 49.99},
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_completes_with_the_guides_results() {
    let tasker = engine().await;
    let task = run(&tasker, "sample_order.json").await;
    assert_eq!(task.status, TaskState::Complete, "{task:#?}");
    for s in &task.steps {
        assert_eq!((s.state, s.attempts), (StepState::Complete, 1), "{s:#?}");
    }

    // subtotal 59.98 + 49.99 = 109.97; tax round(109.97 × 0.08 = 8.7976) = 8.80;
    // free shipping from 100; total 109.97 + 8.80 = 118.77.
    let results = task.results();
    assert_eq!(
        results["validate_cart"],
        json!({
            "validated_items": validated_items(),
            "item_count": 2,
            "subtotal": 109.97,
            "tax": 8.8,
            "shipping": 0.0,
            "total": 118.77,
        })
    );
    assert_eq!(
        results["process_payment"],
        json!({
            "payment_id": "pay_abc123",
            "transaction_id": "txn_def456",
            "amount_charged": 118.77,
            "status": "completed",
        })
    );
    assert_eq!(
        results["update_inventory"],
        json!({
            "reservations": [
                {"sku": "WIDGET-A", "quantity_reserved": 2, "reservation_id": "res_widget-a", "warehouse": "WH-EAST-01"},
                {"sku": "GADGET-B", "quantity_reserved": 1, "reservation_id": "res_gadget-b", "warehouse": "WH-EAST-01"},
            ],
            "total_items_reserved": 3,
            "inventory_log_id": "log_inv_001",
        })
    );
    // The convergence step carries data from all three upstream steps.
    assert_eq!(
        results["create_order"],
        json!({
            "order_id": "ORD-20260218-ABC",
            "customer_email": "customer@example.com",
            "items": validated_items(),
            "total": 118.77,
            "payment_id": "pay_abc123",
            "transaction_id": "txn_def456",
            "inventory_log_id": "log_inv_001",
            "status": "confirmed",
        })
    );
    assert_eq!(
        results["send_confirmation"],
        json!({
            "email_sent": true,
            "recipient": "customer@example.com",
            "subject": "Order Confirmation - ORD-20260218-ABC",
            "status": "sent",
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_and_inventory_run_in_parallel() {
    let tasker = engine().await;
    let task = run(&tasker, "sample_order.json").await;
    assert_eq!(task.status, TaskState::Complete, "{task:#?}");

    // Each branch spends 100 ms in its simulated external call; run one after the other their
    // intervals could not intersect.
    let (pay_start, pay_end) = interval(step(&task, "process_payment"));
    let (inv_start, inv_end) = interval(step(&task, "update_inventory"));
    assert!(
        pay_start < inv_end && inv_start < pay_end,
        "process_payment [{pay_start}, {pay_end}] and update_inventory [{inv_start}, {inv_end}] do not overlap"
    );
    assert!(
        pay_end - pay_start >= 100 && inv_end - inv_start >= 100,
        "the simulated latency was skipped"
    );

    // The DAG's ordering around the parallel pair, read from the order in which the task's
    // transitions were recorded (the order `step_transitions` lists them in).
    let transitions = tasker.step_transitions(&task.uuid, None).await.unwrap();
    let seq = |step: &str, event: &str| {
        transitions
            .iter()
            .position(|t| t.step_name.as_deref() == Some(step) && t.event == event)
            .unwrap_or_else(|| panic!("no {event} of {step}: {transitions:#?}"))
    };
    for branch in ["process_payment", "update_inventory"] {
        assert!(
            seq(branch, "claim") > seq("validate_cart", "complete"),
            "{branch} started before validate_cart finished: {transitions:#?}"
        );
        assert!(
            seq("create_order", "claim") > seq(branch, "complete"),
            "create_order started before {branch} finished: {transitions:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_cart_fails_validation_without_retry() {
    let tasker = engine().await;
    let task = run(&tasker, "empty_cart_order.json").await;
    assert_eq!(task.status, TaskState::BlockedByFailures, "{task:#?}");

    let cart = step(&task, "validate_cart");
    assert_eq!(
        (cart.state, cart.attempts),
        (StepState::Error, 1),
        "{cart:#?}"
    );
    let error = cart.error.as_ref().expect("validate_cart has an error");
    assert_eq!(error.message, "Cart is empty or items field is missing");
    assert_eq!(error.error_type, ErrorType::ValidationError);
    assert_eq!(error.error_code.as_deref(), Some("EMPTY_CART"));
    assert!(!error.retryable);

    for name in DOWNSTREAM_OF_VALIDATION {
        let s = step(&task, name);
        assert_eq!(
            (s.state, s.attempts, s.started_at),
            (StepState::Pending, 0, None),
            "{s:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_item_is_reported_with_its_index() {
    // Schema-valid but not orderable: a quantity of zero on the second line.
    let tasker = engine().await;
    let mut context = order("sample_order.json");
    context["cart_items"][1]["quantity"] = json!(0);
    let task = tasker
        .run_task(request(context), Some(TIMEOUT))
        .await
        .unwrap();
    assert_eq!(task.status, TaskState::BlockedByFailures, "{task:#?}");

    let cart = step(&task, "validate_cart");
    assert_eq!(
        (cart.state, cart.attempts),
        (StepState::Error, 1),
        "{cart:#?}"
    );
    let error = cart.error.as_ref().unwrap();
    assert_eq!(error.message, "Invalid item at index 1");
    assert_eq!(error.error_type, ErrorType::ValidationError);
    assert_eq!(error.error_code.as_deref(), Some("INVALID_ITEM"));
    assert!(!error.retryable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_payment_is_a_permanent_failure() {
    let tasker = engine().await;
    let task = run(&tasker, "declined_order.json").await;
    assert_eq!(task.status, TaskState::BlockedByFailures, "{task:#?}");

    let payment = step(&task, "process_payment");
    assert_eq!(
        (payment.state, payment.attempts),
        (StepState::Error, 1),
        "{payment:#?}"
    );
    let error = payment
        .error
        .as_ref()
        .expect("process_payment has an error");
    assert_eq!(error.message, "Payment declined");
    assert_eq!(error.error_type, ErrorType::PermanentError);
    assert_eq!(error.error_code.as_deref(), Some("PAYMENT_DECLINED"));
    assert!(!error.retryable);

    // The parallel branch is independent of the payment and finishes; the convergence point
    // and everything after it never run.
    assert_eq!(step(&task, "update_inventory").state, StepState::Complete);
    for name in ["create_order", "send_confirmation"] {
        let s = step(&task, name);
        assert_eq!((s.state, s.attempts), (StepState::Pending, 0), "{s:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_errors_are_retried_with_backoff_until_exhausted() {
    let tasker = engine().await;
    let task = run(&tasker, "gateway_error_order.json").await;
    assert_eq!(task.status, TaskState::BlockedByFailures, "{task:#?}");

    let payment = step(&task, "process_payment");
    assert_eq!(payment.max_attempts, 3);
    assert_eq!(
        (payment.state, payment.attempts),
        (StepState::Error, 3),
        "{payment:#?}"
    );
    let error = payment
        .error
        .as_ref()
        .expect("process_payment has an error");
    assert_eq!(error.message, "Payment gateway error, will retry");
    assert_eq!(error.error_type, ErrorType::RetryableError);
    assert_eq!(error.error_code.as_deref(), Some("GATEWAY_ERROR"));
    assert!(error.retryable);

    assert_eq!(step(&task, "update_inventory").state, StepState::Complete);
    assert_eq!(step(&task, "create_order").state, StepState::Pending);

    let transitions = tasker
        .step_transitions(&task.uuid, Some("process_payment"))
        .await
        .unwrap();
    let retries: Vec<&Transition> = transitions
        .iter()
        .filter(|t| t.event == "retry_decided")
        .collect();
    assert_eq!(
        retries.len(),
        2,
        "two waits between three attempts: {transitions:#?}"
    );
    assert!(
        retries.iter().all(|t| t.to_state == "waiting_for_retry"),
        "{retries:#?}"
    );
    assert_eq!(
        transitions.iter().filter(|t| t.event == "give_up").count(),
        1,
        "{transitions:#?}"
    );

    // Exponential backoff from 100 ms: 100 ms after attempt 1, 200 ms after attempt 2, each
    // with ±15 % jitter. The wait runs from the retry decision to the moment the step is
    // enqueued again (`retry_ready`), which the engine records only once `next_attempt_at`
    // has passed.
    let ready: Vec<&Transition> = transitions
        .iter()
        .filter(|t| t.event == "retry_ready")
        .collect();
    assert_eq!(ready.len(), 2, "{transitions:#?}");
    for (n, min_gap) in [(0, 85), (1, 170)] {
        let waited = ready[n].created_at - retries[n].created_at;
        assert!(
            waited >= min_gap,
            "retry {} was enqueued {waited} ms after the decision, expected ≥ {min_gap} ms",
            n + 1
        );
    }
    // Each new attempt is claimed only after its backoff ended, and runs as attempt 2 and 3.
    let position = |needle: &Transition| transitions.iter().position(|t| t == needle).unwrap();
    for (n, attempt) in [(0, 2u32), (1, 3)] {
        let claim = transitions
            .iter()
            .position(|t| t.event == "claim" && t.attempt == Some(attempt))
            .unwrap_or_else(|| panic!("no claim of attempt {attempt}: {transitions:#?}"));
        assert!(claim > position(ready[n]), "{transitions:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_schema_rejects_an_order_without_customer_email() {
    let tasker = engine().await;
    let mut context = order("sample_order.json");
    context.as_object_mut().unwrap().remove("customer_email");
    // A second, nested violation shows that every violation is listed with its own pointer.
    context["cart_items"][1]["quantity"] = json!("one");

    let err = tasker
        .create_task(request(context))
        .await
        .expect_err("the schema rejects the order");
    assert_eq!(err.kind, ErrorKind::Validation, "{err:?}");
    assert!(err.message.contains("customer_email"), "{}", err.message);
    assert!(
        err.message.contains("/cart_items/1/quantity"),
        "{}",
        err.message
    );

    let details = err
        .details
        .as_ref()
        .expect("violations are attached as details");
    let violations = details["violations"]
        .as_array()
        .expect("a list of violations");
    let find = |pointer: &str| {
        violations
            .iter()
            .find(|v| v["pointer"] == pointer)
            .unwrap_or_else(|| panic!("no violation at {pointer:?}: {violations:#?}"))
    };
    // A missing property is reported at the object that lacks it: the context root.
    assert!(
        find("")["message"]
            .as_str()
            .unwrap()
            .contains("customer_email"),
        "{violations:#?}"
    );
    find("/cart_items/1/quantity");
    assert_eq!(violations.len(), 2, "{violations:#?}");

    // Nothing was created.
    let tasks = tasker.list_tasks(&Default::default()).await.unwrap();
    assert!(tasks.is_empty(), "{tasks:#?}");
}

#[test]
fn sample_orders_are_well_formed() {
    for file in [
        "sample_order.json",
        "declined_order.json",
        "gateway_error_order.json",
    ] {
        let o = order(file);
        assert_eq!(o["cart_items"].as_array().map(Vec::len), Some(2), "{file}");
    }
    assert_eq!(order("empty_cart_order.json")["cart_items"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_without_the_cart_result_fail_for_good() {
    // An operator closing the failed validation by hand satisfies the dependency without
    // producing a result, so the branches run but have no cart to work with.
    let tasker = engine().await;
    let task = run(&tasker, "empty_cart_order.json").await;
    assert_eq!(task.status, TaskState::BlockedByFailures, "{task:#?}");
    tasker
        .resolve_step(&task.uuid, "validate_cart", "skip validation")
        .await
        .unwrap();
    let task = tasker.wait(&task.uuid, Some(TIMEOUT)).await.unwrap();
    assert_eq!(task.status, TaskState::BlockedByFailures, "{task:#?}");

    assert_eq!(
        step(&task, "validate_cart").state,
        StepState::ResolvedManually
    );
    for name in ["process_payment", "update_inventory"] {
        let s = step(&task, name);
        assert_eq!((s.state, s.attempts), (StepState::Error, 1), "{s:#?}");
        let error = s.error.as_ref().unwrap();
        assert_eq!(error.message, "Missing validate_cart dependency result");
        assert_eq!(error.error_type, ErrorType::HandlerError);
        assert_eq!(error.error_code, None);
        assert!(!error.retryable);
    }
    assert_eq!(step(&task, "create_order").state, StepState::Pending);
}

#[test]
fn template_declares_the_guides_dag_and_retry_policies() {
    let path = templates_dir().join("ecommerce_order_processing.yaml");
    let loaded = tasker_core::template::load_file(&path, "test").expect("the template loads");
    assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);
    let t = loaded.template;
    assert_eq!(
        (t.namespace.as_str(), t.name.as_str(), t.version.as_str()),
        (NAMESPACE, TEMPLATE_NAME, TEMPLATE_VERSION)
    );

    let expected: [(&str, &str, &[&str], u32); 5] = [
        ("validate_cart", "ValidateCartHandler", &[], 2),
        (
            "process_payment",
            "ProcessPaymentHandler",
            &["validate_cart"],
            3,
        ),
        (
            "update_inventory",
            "UpdateInventoryHandler",
            &["validate_cart"],
            3,
        ),
        (
            "create_order",
            "CreateOrderHandler",
            &["process_payment", "update_inventory"],
            2,
        ),
        (
            "send_confirmation",
            "SendConfirmationHandler",
            &["create_order"],
            2,
        ),
    ];
    assert_eq!(t.steps.len(), expected.len());
    for (s, (name, class, deps, max_attempts)) in t.steps.iter().zip(expected) {
        assert_eq!(s.name, name);
        assert_eq!(s.handler.callable, format!("handlers.ecommerce.{class}"));
        assert_eq!(s.dependencies, deps);
        let r = &s.retry;
        assert_eq!(
            (
                r.retryable,
                r.max_attempts,
                r.backoff_base_ms,
                r.max_backoff_ms
            ),
            (true, max_attempts, 100, 5000),
            "{name}"
        );
        assert_eq!(
            r.backoff,
            tasker_core::template::Backoff::Exponential,
            "{name}"
        );
        let latency = s.handler.initialization.get("simulated_latency_ms");
        let external = matches!(name, "process_payment" | "update_inventory");
        assert_eq!(latency, external.then_some(&json!(100)), "{name}");
    }
    let schema = t.input_schema.expect("an input schema");
    assert_eq!(schema["required"], json!(["cart_items", "customer_email"]));
    assert!(
        schema["properties"]["cart_items"].get("minItems").is_none(),
        "an empty cart is schema-valid"
    );
}
