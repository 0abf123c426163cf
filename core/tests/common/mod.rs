//! Helpers shared by the engine-level tests in `core/tests/`.

#![allow(dead_code)] // Each test file uses its own subset.

use std::time::Duration;

use tasker_core::Tasker;
use tasker_core::template::parse_str;

/// Parses `yaml` (panicking with the loader's errors) and registers it.
pub async fn register(tasker: &Tasker, yaml: &str) {
    let t = parse_str(yaml, None, "test")
        .unwrap_or_else(|e| panic!("{e}"))
        .template;
    tasker.register_template(&t).await.unwrap();
}

/// Polls `probe` every 10 ms until it returns a value; panics after 10 s.
pub async fn eventually<T, F, Fut>(probe: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..1000 {
        if let Some(v) = probe().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached within 10 s");
}
