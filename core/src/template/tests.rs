//! Loading and validation tests: both dialects, environments, every rule of SPEC §2.

use super::*;
use serde_json::json;

fn load(yaml: &str) -> LoadedTemplate {
    match parse_str(yaml, Some("t.yaml"), "test") {
        Ok(loaded) => loaded,
        Err(e) => panic!("template should load, got:\n{e}"),
    }
}

fn errors(yaml: &str) -> Vec<TemplateError> {
    match parse_str(yaml, Some("t.yaml"), "test") {
        Ok(_) => panic!("template should be rejected"),
        Err(e) => e.0,
    }
}

/// Asserts that exactly one error concerns `step`/`field` and returns its message.
fn only_error(yaml: &str, step: Option<&str>, field: &str) -> String {
    let errs = errors(yaml);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    assert_eq!(errs[0].step.as_deref(), step, "{errs:#?}");
    assert_eq!(errs[0].field, field, "{errs:#?}");
    assert_eq!(errs[0].file.as_deref(), Some("t.yaml"));
    errs[0].message.clone()
}

/// A template header followed by the given step list.
fn with_steps(steps: &str) -> String {
    format!("name: t\nnamespace_name: ns\nversion: 1.0.0\nsteps:\n{steps}")
}

const CURRENT: &str = r#"
name: order_processing
namespace_name: ecommerce
version: "1.0.0"
description: "Order processing workflow"
metadata: { author: me, tags: [a, b] }
identity_strategy: caller_provided
system_dependencies: { primary: default, secondary: [] }
domain_events: [{ name: order.done }]
task_handler: { callable: Ignored, initialization: {} }
input_schema: { type: object, required: [order_id] }
lifecycle:
  max_duration_minutes: 60
  max_waiting_for_retry_minutes: 2.5
  auto_fail_on_timeout: true
steps:
  - name: validate_order
    description: "Validate the incoming order"
    handler:
      callable: ValidateOrderHandler
      initialization: { strict: true }
    dependencies: []
    retry:
      max_attempts: 3
      backoff: exponential
      backoff_base_ms: 2000
    system_dependency:
    lifecycle: { max_retries: 3, backoff_multiplier: 2 }
  - name: charge
    step_type: standard
    handler: { callable: Charge, method: run, resolver: explicit_mapping }
    depends_on: [validate_order]
    retry: { retryable: false, max_attempts: 1, backoff: none, backoff_base_ms: 0, max_backoff_ms: 0, jitter: false }
    timeout_seconds: 30
    publishes_events:
      - name: payment.charged
        description: informational
        condition: success
        delivery_mode: fast
        schema: { type: object }
        publisher: custom
    result_schema: { type: object }
"#;

const OLDER: &str = r#"
name: order_processing
namespace: ecommerce
version: "1.0.0"
description: "Order processing workflow"
step_templates:
  - name: validate_order
    description: "Validate the incoming order"
    handler:
      callable: ValidateOrderHandler
      initialization: {}
    depends_on_step_name: []
    retry:
      max_attempts: 3
      backoff_strategy: exponential
      backoff_base_seconds: 2
  - name: charge
    handler: { callable: Charge }
    depends_on_step_name: validate_order
  - name: ship
    handler: { callable: Ship }
    depends_on_steps: [charge, validate_order]
"#;

const OLDER_AS_CURRENT: &str = r#"
name: order_processing
namespace_name: ecommerce
version: 1.0.0
description: Order processing workflow
steps:
  - name: validate_order
    description: Validate the incoming order
    handler: { callable: ValidateOrderHandler }
    retry: { backoff_base_ms: 2000 }
  - name: charge
    handler: { callable: Charge, method: call }
    dependencies: [validate_order]
  - name: ship
    type: standard
    handler: { callable: Ship, initialization: {} }
    dependencies: [charge, validate_order]
"#;

#[test]
fn current_dialect_loads_every_field() {
    let loaded = load(CURRENT);
    assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);
    let t = loaded.template;
    assert_eq!(t.key(), "ecommerce/order_processing/1.0.0");
    assert_eq!(t.description.as_deref(), Some("Order processing workflow"));
    assert_eq!(t.metadata, json!({"author": "me", "tags": ["a", "b"]}));
    assert_eq!(t.identity_strategy, IdentityStrategy::CallerProvided);
    assert_eq!(t.domain_events, vec![json!({"name": "order.done"})]);
    assert_eq!(
        t.input_schema,
        Some(json!({"type": "object", "required": ["order_id"]}))
    );
    assert_eq!(t.lifecycle.max_duration_minutes, Some(60.0));
    assert_eq!(t.lifecycle.max_waiting_for_retry_minutes, Some(2.5));
    assert_eq!(t.lifecycle.max_steps_in_process_minutes, None);

    let validate = &t.steps[0];
    assert_eq!(validate.handler.method, "call");
    assert_eq!(
        validate.handler.initialization.get("strict"),
        Some(&json!(true))
    );
    assert_eq!(validate.retry.backoff_base_ms, 2000);
    assert_eq!(validate.retry.max_backoff_ms, 30_000);
    assert!(validate.retry.retryable && validate.retry.jitter);

    let charge = &t.steps[1];
    assert_eq!(charge.handler.method, "run");
    assert_eq!(charge.handler.resolver.as_deref(), Some("explicit_mapping"));
    assert_eq!(charge.dependencies, ["validate_order"]);
    assert_eq!(
        charge.retry,
        RetryPolicy {
            retryable: false,
            max_attempts: 1,
            backoff: Backoff::None,
            backoff_base_ms: 0,
            max_backoff_ms: 0,
            jitter: false,
        }
    );
    assert_eq!(charge.timeout_seconds, Some(30));
    assert_eq!(
        charge.publishes_events,
        vec![EventDeclaration {
            name: "payment.charged".into(),
            condition: "success".into(),
            delivery_mode: "fast".into(),
            schema: Some(json!({"type": "object"})),
            publisher: Some("custom".into()),
        }]
    );
    assert_eq!(charge.result_schema, Some(json!({"type": "object"})));
}

#[test]
fn both_dialects_produce_equal_templates() {
    let older = load(OLDER);
    assert!(older.warnings.is_empty(), "{:#?}", older.warnings);
    assert_eq!(older.template, load(OLDER_AS_CURRENT).template);
}

#[test]
fn older_retry_spellings_are_understood() {
    let t = load(&with_steps(
        "  - name: a\n    handler: { callable: A }\n    retry: { limit: 5, initial_delay: 2, max_delay: 30 }\n",
    ))
    .template;
    let retry = &t.steps[0].retry;
    assert_eq!(retry.max_attempts, 5);
    assert_eq!(retry.backoff_base_ms, 2000);
    assert_eq!(retry.max_backoff_ms, 30_000);
}

#[test]
fn a_base_delay_above_the_default_cap_raises_the_cap() {
    let t = load(&with_steps(
        "  - name: a\n    handler: { callable: A }\n    retry: { initial_delay: 60 }\n",
    ))
    .template;
    assert_eq!(t.steps[0].retry.backoff_base_ms, 60_000);
    assert_eq!(t.steps[0].retry.max_backoff_ms, 60_000);
}

#[test]
fn deferred_is_an_alias_and_event_defaults_apply() {
    let t = load(&with_steps(
        "  - { name: a, handler: { callable: A }, publishes_events: [{ name: x.y }] }
  - { name: b, type: deferred, dependencies: [a], handler: { callable: B } }
",
    ))
    .template;
    assert_eq!(t.steps[1].step_type, StepType::DeferredConvergence);
    assert_eq!(t.steps[0].publishes_events[0].condition, "success");
    assert_eq!(t.steps[0].publishes_events[0].delivery_mode, "durable");
}

#[test]
fn batch_config_defaults() {
    let t = load(&with_steps(
        "  - { name: a, type: batchable, handler: { callable: A } }
  - name: w
    type: batch_worker
    dependencies: [a]
    handler: { callable: W }
    batch_config: { failure_strategy: fail_fast, worker_template: w }
",
    ))
    .template;
    assert_eq!(
        t.steps[1].batch_config,
        Some(BatchConfig {
            failure_strategy: FailureStrategy::FailFast,
            ..BatchConfig::default()
        })
    );
    assert_eq!(BatchConfig::default().batch_size, 1000);
    assert_eq!(BatchConfig::default().parallelism, 10);
    assert_eq!(BatchConfig::default().cursor_field, "id");
}

#[test]
fn merge_keys_are_resolved() {
    let t = load(
        "name: t
namespace_name: ns
version: 1.0.0
defaults: &retry { max_attempts: 7, backoff: linear }
steps:
  - name: a
    handler: { callable: A }
    retry: { <<: *retry, jitter: false }
",
    )
    .template;
    assert_eq!(t.steps[0].retry.max_attempts, 7);
    assert_eq!(t.steps[0].retry.backoff, Backoff::Linear);
    assert!(!t.steps[0].retry.jitter);
}

const ENVIRONMENTS: &str = "
name: t
namespace_name: ns
version: 1.0.0
steps:
  - name: fetch
    handler: { callable: F, initialization: { url: prod, keep: 1 } }
    retry: { max_attempts: 5, backoff: linear, backoff_base_ms: 50 }
    timeout_seconds: 30
  - name: store
    handler: { callable: S }
environments:
  test:
    steps:
      - name: fetch
        handler: { initialization: { url: local, debug: true } }
        timeout_seconds: 5
        retry: { max_attempts: 1 }
      - name: ALL
        timeout_seconds: 9
        retry:
  production:
    steps:
      - name: fetch
        timeout_seconds: 600
";

#[test]
fn environment_overrides_merge_init_and_replace_retry() {
    let t = load(ENVIRONMENTS).template;
    let fetch = &t.steps[0];
    assert_eq!(
        serde_json::Value::Object(fetch.handler.initialization.clone()),
        json!({"url": "local", "keep": 1, "debug": true})
    );
    // The named entry wins over ALL even though ALL is listed after it.
    assert_eq!(fetch.timeout_seconds, Some(5));
    assert_eq!(
        fetch.retry,
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    );
    assert_eq!(t.steps[1].timeout_seconds, Some(9));
    assert_eq!(t.steps[1].retry, RetryPolicy::default());
}

#[test]
fn only_the_selected_environment_applies() {
    let Ok(prod) = parse_str(ENVIRONMENTS, None, "production") else {
        panic!("production should load")
    };
    assert_eq!(prod.template.steps[0].timeout_seconds, Some(600));
    assert_eq!(prod.template.steps[0].retry.max_attempts, 5);
    let Ok(dev) = parse_str(ENVIRONMENTS, None, "development") else {
        panic!("development should load")
    };
    assert_eq!(dev.template.steps[0].timeout_seconds, Some(30));
    assert_eq!(dev.template.steps[1].timeout_seconds, None);
}

#[test]
fn environment_override_of_an_unknown_step_is_an_error() {
    let yaml = format!(
        "{}environments:\n  staging:\n    steps:\n      - name: nope\n        timeout_seconds: 3\n",
        with_steps("  - { name: a, handler: { callable: A } }\n")
    );
    only_error(&yaml, Some("nope"), "environments.staging.steps[0].name");
}

// ---- validation rules, one test each ----

#[test]
fn rule_duplicate_step_names() {
    let msg = only_error(
        &with_steps(
            "  - { name: a, handler: { callable: A } }\n  - { name: a, handler: { callable: B } }\n",
        ),
        Some("a"),
        "name",
    );
    assert!(msg.contains("duplicate"), "{msg}");
}

#[test]
fn rule_dependency_naming_no_step() {
    let msg = only_error(
        &with_steps("  - { name: a, dependencies: [ghost], handler: { callable: A } }\n"),
        Some("a"),
        "dependencies",
    );
    assert!(msg.contains("`ghost`"), "{msg}");
}

#[test]
fn rule_cycle_is_named() {
    let msg = only_error(
        &with_steps(
            "  - { name: a, dependencies: [c], handler: { callable: A } }
  - { name: b, dependencies: [a], handler: { callable: B } }
  - { name: c, dependencies: [b], handler: { callable: C } }
  - { name: d, dependencies: [a], handler: { callable: D } }
",
        ),
        Some("a"),
        "dependencies",
    );
    assert_eq!(msg, "dependency cycle: a → b → c → a");
}

#[test]
fn rule_self_dependency_is_a_cycle() {
    let msg = only_error(
        &with_steps("  - { name: a, dependencies: [a], handler: { callable: A } }\n"),
        Some("a"),
        "dependencies",
    );
    assert_eq!(msg, "dependency cycle: a → a");
}

#[test]
fn rule_decision_needs_a_dependency() {
    only_error(
        &with_steps("  - { name: d, type: decision, handler: { callable: D } }\n"),
        Some("d"),
        "dependencies",
    );
}

#[test]
fn rule_deferred_convergence_needs_a_dependency() {
    only_error(
        &with_steps("  - { name: c, type: deferred_convergence, handler: { callable: C } }\n"),
        Some("c"),
        "dependencies",
    );
}

#[test]
fn rule_batch_worker_needs_batch_config() {
    only_error(
        &with_steps(
            "  - { name: a, type: batchable, handler: { callable: A } }
  - { name: w, type: batch_worker, dependencies: [a], handler: { callable: W } }
",
        ),
        Some("w"),
        "batch_config",
    );
}

#[test]
fn rule_backoff_base_above_max() {
    let msg = only_error(
        &with_steps(
            "  - name: a\n    handler: { callable: A }\n    retry: { backoff_base_ms: 5000, max_backoff_ms: 100 }\n",
        ),
        Some("a"),
        "retry.backoff_base_ms",
    );
    assert!(msg.contains("5000") && msg.contains("100"), "{msg}");
}

#[test]
fn rule_namespace_too_long() {
    let yaml = format!(
        "name: t\nnamespace_name: {}\nversion: 1.0.0\nsteps: []\n",
        "n".repeat(30)
    );
    let msg = only_error(&yaml, None, "namespace_name");
    assert!(msg.contains("30 characters"), "{msg}");
}

#[test]
fn rule_namespace_bad_characters() {
    let msg = only_error(
        "name: t\nnamespace_name: my-ns.x\nversion: 1.0.0\nsteps: []\n",
        None,
        "namespace_name",
    );
    assert!(msg.contains("'-'") && msg.contains("'.'"), "{msg}");
}

#[test]
fn rule_unknown_step_type() {
    let msg = only_error(
        &with_steps("  - { name: a, type: parallel, handler: { callable: A } }\n"),
        Some("a"),
        "type",
    );
    assert!(
        msg.contains("`parallel`") && msg.contains("batch_worker"),
        "{msg}"
    );
}

#[test]
fn rule_input_schema_must_be_a_json_schema() {
    only_error(
        "name: t\nnamespace_name: ns\nversion: 1.0.0\ninput_schema: { type: objekt }\nsteps: []\n",
        None,
        "input_schema",
    );
}

#[test]
fn rule_result_schema_must_be_a_json_schema() {
    only_error(
        &with_steps("  - { name: a, handler: { callable: A }, result_schema: { required: x } }\n"),
        Some("a"),
        "result_schema",
    );
}

#[test]
fn rule_workflow_step_needs_task_template() {
    only_error(
        &with_steps("  - { name: sub, type: workflow, handler: { callable: WorkflowHandler } }\n"),
        Some("sub"),
        "handler.initialization.task_template",
    );
    load(&with_steps(
        "  - name: sub\n    type: workflow\n    handler: { callable: W, initialization: { task_template: child } }\n",
    ));
    // The WorkflowHandler callable makes a step a workflow step without a declared type.
    only_error(
        &with_steps("  - { name: sub, handler: { callable: WorkflowHandler } }\n"),
        Some("sub"),
        "handler.initialization.task_template",
    );
    let loaded = load(&with_steps(
        "  - { name: sub, handler: { callable: WorkflowHandler, initialization: { task_template: c } } }\n",
    ));
    assert_eq!(loaded.template.steps[0].step_type, StepType::Workflow);
}

#[test]
fn rule_max_attempts_zero_means_one_attempt_with_a_warning() {
    let loaded = load(&with_steps(
        "  - name: a\n    handler: { callable: A }\n    retry: { retryable: true, max_attempts: 0 }\n",
    ));
    let retry = &loaded.template.steps[0].retry;
    assert_eq!((retry.max_attempts, retry.retryable), (1, false));
    assert_eq!(loaded.warnings.len(), 1, "{:#?}", loaded.warnings);
    assert!(loaded.warnings[0].contains("retry.max_attempts"));
    assert!(loaded.warnings[0].contains("step `a`"));
}

#[test]
fn rule_empty_steps_list_is_allowed() {
    let t = load("name: t\nnamespace_name: ns\nversion: 1.0.0\nsteps: []\n").template;
    assert!(t.steps.is_empty());
    assert!(t.initial_step_names().is_empty());
}

#[test]
fn rule_missing_version() {
    only_error("name: t\nnamespace_name: ns\nsteps: []\n", None, "version");
}

#[test]
fn rule_missing_callable() {
    only_error(
        &with_steps("  - { name: a, handler: { method: run } }\n"),
        Some("a"),
        "handler.callable",
    );
    only_error(&with_steps("  - { name: a }\n"), Some("a"), "handler");
}

#[test]
fn version_given_as_a_number_is_stringified_with_a_warning() {
    let loaded = load("name: t\nnamespace_name: ns\nversion: 1.5\nsteps: []\n");
    assert_eq!(loaded.template.version, "1.5");
    assert!(
        loaded.warnings[0].contains("field `version`"),
        "{:?}",
        loaded.warnings
    );
}

#[test]
fn all_errors_are_reported_at_once() {
    let errs = errors(
        "name: t
namespace_name: bad-ns
version: 1.0.0
identity_strategy: sometimes
steps:
  - name: a
    handler: { callable: A }
    retry: { retryable: 'yes', backoff: quadratic }
    timeout_seconds: ten
  - name: b
    type: decision
    handler: { callable: B, initialization: [1] }
    dependencies: [ghost, 3]
  - handler: { callable: C }
  - name: a
    handler: { callable: A2 }
",
    );
    let found: Vec<(Option<&str>, &str)> = errs
        .iter()
        .map(|e| (e.step.as_deref(), e.field.as_str()))
        .collect();
    let expected = [
        (None, "identity_strategy"),
        (Some("a"), "retry.retryable"),
        (Some("a"), "retry.backoff"),
        (Some("a"), "timeout_seconds"),
        (Some("b"), "handler.initialization"),
        (Some("b"), "dependencies[1]"),
        (Some("steps[2]"), "name"),
        (None, "namespace_name"),
        (Some("b"), "dependencies"),
        (Some("a"), "name"),
    ];
    for item in expected {
        assert!(found.contains(&item), "missing {item:?} in {found:#?}");
    }
    assert_eq!(errs.len(), expected.len(), "{errs:#?}");
    let text = TemplateErrors(errs).to_string();
    assert_eq!(text.lines().count(), expected.len());
    assert!(text.lines().all(|l| l.starts_with("t.yaml: ")), "{text}");
}

#[test]
fn unknown_keys_are_warnings_naming_them() {
    let loaded = load(
        "name: t
namespace_name: ns
version: 1.0.0
loaded_from: /somewhere
steps:
  - name: a
    colour: blue
    handler: { callable: A, klass: X }
    retry: { max_attempts: 2, backof: linear }
    publishes_events: [{ name: a.b, priority: 1 }]
  - name: w
    type: batch_worker
    dependencies: [a]
    handler: { callable: W }
    batch_config: { batch_size: 5, chunking: yes }
environments:
  test:
    steps:
      - { name: a, timeout: 4 }
",
    );
    let w = loaded.warnings.join("\n");
    for expected in [
        "field `loaded_from`: unknown key ignored",
        "step `a`: field `colour`: unknown key ignored",
        "step `a`: field `handler.klass`: unknown key ignored",
        "step `a`: field `retry.backof`: unknown key ignored",
        "step `a`: field `publishes_events[0].priority`: unknown key ignored",
        "step `w`: field `batch_config.chunking`: unknown key ignored",
        "step `a`: field `environments.test.steps[0].timeout`: unknown key ignored",
    ] {
        assert!(w.contains(expected), "missing {expected:?} in\n{w}");
    }
    // batch worker without a batchable parent also warns
    assert_eq!(loaded.warnings.len(), 8, "{w}");
}

#[test]
fn yaml_syntax_errors_give_line_and_column() {
    let errs = errors("name: t\nsteps: [a, b\nversion: 1\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].message.contains("line"), "{}", errs[0].message);
    assert!(errs[0].message.contains("column"), "{}", errs[0].message);
    assert_eq!(errs[0].field, "");
}

#[test]
fn top_level_must_be_a_mapping() {
    let errs = errors("- a\n- b\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].message.contains("mapping") && errs[0].message.contains("list"));
    let errs = errors("# only a comment\n");
    assert!(errs[0].message.contains("empty"), "{}", errs[0].message);
}

#[test]
fn contradicting_type_and_step_type() {
    only_error(
        &with_steps(
            "  - { name: a, handler: { callable: A } }\n  - { name: b, type: decision, step_type: standard, dependencies: [a], handler: { callable: B } }\n",
        ),
        Some("b"),
        "type",
    );
}

#[test]
fn to_yaml_round_trips() {
    for source in [CURRENT, OLDER, ENVIRONMENTS] {
        let t = load(source).template;
        let yaml = to_yaml(&t);
        let again = match parse_str(&yaml, None, "other") {
            Ok(l) => l,
            Err(e) => panic!("{e}\n---\n{yaml}"),
        };
        assert!(again.warnings.is_empty(), "{:#?}", again.warnings);
        assert_eq!(again.template, t, "{yaml}");
        assert!(yaml.contains("namespace_name:") && !yaml.contains("step_templates"));
    }
}

#[test]
fn to_yaml_keeps_strings_that_look_like_other_types() {
    let mut t = load(&with_steps("  - { name: a, handler: { callable: A } }\n")).template;
    t.version = "1.10".into();
    for (k, v) in [
        ("a", "yes"),
        ("b", "null"),
        ("c", "012"),
        ("d", "~"),
        ("e", "true"),
    ] {
        t.steps[0].handler.initialization.insert(k.into(), json!(v));
    }
    t.lifecycle.max_duration_minutes = Some(10.0);
    let again = load(&to_yaml(&t)).template;
    assert_eq!(again, t);
}

#[test]
fn validate_works_on_templates_built_in_code() {
    let step = |name: &str, deps: &[&str]| StepDefinition {
        name: name.into(),
        description: None,
        handler: HandlerSpec {
            callable: "H".into(),
            method: "call".into(),
            resolver: None,
            initialization: Default::default(),
        },
        step_type: StepType::Standard,
        dependencies: deps.iter().map(|d| d.to_string()).collect(),
        retry: RetryPolicy::default(),
        timeout_seconds: None,
        publishes_events: Vec::new(),
        batch_config: None,
        result_schema: None,
    };
    let mut t = TaskTemplate {
        name: "t".into(),
        namespace: "ns".into(),
        version: "1".into(),
        description: None,
        metadata: serde_json::Value::Null,
        identity_strategy: IdentityStrategy::Strict,
        input_schema: None,
        lifecycle: LifecycleLimits::default(),
        domain_events: Vec::new(),
        steps: vec![step("a", &[]), step("b", &["a"])],
    };
    assert_eq!(validate(&t, None).map(|w| w.len()).ok(), Some(0));
    t.steps[0].retry.max_attempts = 0;
    let warnings = validate(&t, None).unwrap_or_default();
    assert_eq!(warnings.len(), 1);
    t.steps[1].dependencies.push("zz".into());
    t.steps[0].publishes_events.push(EventDeclaration {
        name: "x".into(),
        condition: "sometimes".into(),
        delivery_mode: "durable".into(),
        schema: None,
        publisher: None,
    });
    let Err(e) = validate(&t, Some("code")) else {
        panic!("should fail")
    };
    assert_eq!(e.0.len(), 2, "{e}");
    assert_eq!(e.0[0].field, "publishes_events[0].condition");
    assert_eq!(e.0[1].step.as_deref(), Some("b"));
}

#[test]
fn error_display_omits_absent_parts() {
    let full = TemplateError::new(Some("f.yaml"), Some("s"), "retry.backoff", "bad");
    assert_eq!(
        full.to_string(),
        "f.yaml: step `s`: field `retry.backoff`: bad"
    );
    let bare = TemplateError::new(None, None, "", "oops");
    assert_eq!(bare.to_string(), "oops");
    let errs = TemplateErrors(vec![full, bare]);
    assert_eq!(
        errs.to_string(),
        "f.yaml: step `s`: field `retry.backoff`: bad\noops"
    );
}

#[test]
fn namespaces() {
    assert!(namespace_is_valid("payments_v2"));
    assert!(namespace_is_valid(&"x".repeat(29)));
    assert!(!namespace_is_valid(&"x".repeat(30)));
    assert!(!namespace_is_valid(""));
    assert!(!namespace_is_valid("a-b"));
    assert!(!namespace_is_valid("naïve"));
}

#[test]
fn load_file_names_a_missing_file() {
    let Err(e) = load_file(std::path::Path::new("/no/such/file.yaml"), "test") else {
        panic!("should fail")
    };
    assert_eq!(e.0.len(), 1);
    assert_eq!(e.0[0].file.as_deref(), Some("/no/such/file.yaml"));
}

#[test]
fn collect_yaml_files_walks_directories_sorted() -> std::io::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    std::fs::create_dir_all(root.join("b/c"))?;
    for f in ["z.yaml", "a.yml", "b/c/x.YAML", "b/notes.txt", "b/m.yaml"] {
        std::fs::write(root.join(f), "x: 1\n")?;
    }
    let files = collect_yaml_files(root)?;
    let rel: Vec<String> = files
        .iter()
        .filter_map(|p| p.strip_prefix(root).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(rel, ["a.yml", "b/c/x.YAML", "b/m.yaml", "z.yaml"]);
    assert_eq!(
        collect_yaml_files(&root.join("b/notes.txt"))?,
        [root.join("b/notes.txt")]
    );
    assert!(collect_yaml_files(&root.join("missing")).is_err());
    Ok(())
}

#[test]
fn load_file_reads_a_template() -> std::io::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("t.yaml");
    std::fs::write(
        &path,
        with_steps("  - { name: a, handler: { callable: A } }\n"),
    )?;
    let loaded = load_file(&path, "test");
    assert!(loaded.is_ok(), "{:?}", loaded.err());
    std::fs::write(&path, "name: [\n")?;
    let Err(e) = load_file(&path, "test") else {
        panic!("should fail")
    };
    assert_eq!(
        e.0[0].file.as_deref(),
        Some(path.display().to_string().as_str())
    );
    Ok(())
}

#[test]
fn rule_timeouts_and_backoffs_are_bounded() {
    // Larger values would overflow the millisecond timestamps computed from them.
    let msg = only_error(
        &with_steps(
            "  - { name: a, handler: { callable: A }, timeout_seconds: 18446744073709551615 }\n",
        ),
        Some("a"),
        "timeout_seconds",
    );
    assert!(msg.contains("at most"), "{msg}");
    let msg = only_error(
        &with_steps(
            "  - { name: a, handler: { callable: A }, retry: { max_backoff_ms: 9999999999999 } }\n",
        ),
        Some("a"),
        "retry.max_backoff_ms",
    );
    assert!(msg.contains("at most"), "{msg}");
}
