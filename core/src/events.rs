//! Domain events (SPEC §10): what a step's `publishes_events` declarations emit once its
//! result is committed, and how they reach subscribers.
//!
//! - **`durable`** events are written to the outbox (`domain_events`) in the transaction that
//!   commits the result, one record per matching declaration per committed result (the store
//!   applies a result at most once, and the record's id is derived from the step, attempt and
//!   declaration). The engine delivers them to this process's subscribers at least once, in
//!   commit order, retrying with backoff while a subscriber fails; every delivery carries the
//!   same `event_id`, so subscribers de-duplicate on it. External consumers read the outbox
//!   ([`crate::Tasker::domain_events`]).
//! - **`fast`** events go only to the in-process bus after the commit: at most once, dropped
//!   (and counted) when a subscriber's queue is full.
//! - **`broadcast`** events do both: the bus delivers them to subscribers at once, and the
//!   outbox keeps a record for external consumers (the engine does not deliver those records
//!   to subscribers a second time).
//!
//! Subscribers never slow steps down: each runs on its own task behind its own queue, and
//! publishing never changes a step's outcome.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::clock::Millis;
use crate::store::Resolution;
use crate::template::EventDeclaration;

/// When a declaration fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventCondition {
    /// The step succeeded.
    Success,
    /// An attempt failed (retried or not).
    Failure,
    /// An attempt failed and will be retried.
    RetryableFailure,
    /// The step failed for good.
    PermanentFailure,
    /// Every committed result.
    Always,
}

impl EventCondition {
    /// Parses a template's `condition` (validated at load).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "success" => Self::Success,
            "failure" => Self::Failure,
            "retryable_failure" => Self::RetryableFailure,
            "permanent_failure" => Self::PermanentFailure,
            "always" => Self::Always,
            _ => return None,
        })
    }

    /// Whether a result resolved as `r` fires this condition.
    pub fn matches(self, r: &Resolution) -> bool {
        matches!(
            (self, r),
            (Self::Always, _)
                | (Self::Success, Resolution::Succeeded { .. })
                | (
                    Self::Failure,
                    Resolution::Retry { .. } | Resolution::Failed { .. }
                )
                | (Self::RetryableFailure, Resolution::Retry { .. })
                | (Self::PermanentFailure, Resolution::Failed { .. })
        )
    }
}

/// How an event travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    /// Outbox, delivered at least once.
    Durable,
    /// In-process bus, at most once.
    Fast,
    /// Both: the bus for subscribers, the outbox for external consumers.
    Broadcast,
}

impl DeliveryMode {
    /// Parses a template's `delivery_mode` (validated at load).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "durable" => Self::Durable,
            "fast" => Self::Fast,
            "broadcast" => Self::Broadcast,
            _ => return None,
        })
    }

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Durable => "durable",
            Self::Fast => "fast",
            Self::Broadcast => "broadcast",
        }
    }

    /// Whether events of this mode get an outbox record.
    pub fn in_outbox(self) -> bool {
        self != Self::Fast
    }

    /// Whether events of this mode go on the in-process bus.
    pub fn on_bus(self) -> bool {
        self != Self::Durable
    }
}

/// Where an event came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// The task.
    pub task_uuid: String,
    /// The step whose result fired the event.
    pub step_uuid: String,
    /// Its name.
    pub step_name: String,
    /// The task's namespace.
    pub namespace: String,
    /// The task's correlation id.
    pub correlation_id: String,
    /// The attempt whose result fired it.
    pub attempt: u32,
    /// The condition that matched.
    pub condition: EventCondition,
    /// When the result was committed (ms since epoch).
    pub fired_at: Millis,
    /// The worker (or engine) that reported the result.
    pub fired_by: String,
}

/// One emitted event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainEvent {
    /// Stable id: the same for every delivery of this event (de-duplicate on it).
    pub event_id: String,
    /// `ns.action`.
    pub event_name: String,
    /// How it travels.
    pub delivery_mode: DeliveryMode,
    /// The step's result on success; on failure `{"error": {message, error_type, ...}}`.
    pub payload: Value,
    /// Where it came from.
    pub metadata: EventMetadata,
}

/// A durable event as the outbox holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Position in the outbox (commit order).
    pub seq: i64,
    /// The event.
    pub event: DomainEvent,
    /// When every subscriber of the delivering process accepted it, if it was delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<Millis>,
    /// Deliveries tried so far.
    pub delivery_attempts: u32,
    /// The last subscriber failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Which outbox records to list.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventFilter {
    /// Only this task's events.
    pub task_uuid: Option<String>,
    /// Only records after this position (a consumer's cursor).
    pub after_seq: Option<i64>,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<u32>,
}

/// The step a result belongs to, as the store knows it when the result commits.
#[derive(Debug, Clone)]
pub struct EventSource<'a> {
    /// The task.
    pub task_uuid: &'a str,
    /// The step.
    pub step_uuid: &'a str,
    /// Its name.
    pub step_name: &'a str,
    /// The task's namespace.
    pub namespace: &'a str,
    /// The task's correlation id.
    pub correlation_id: &'a str,
    /// The attempt.
    pub attempt: u32,
    /// Who reported the result.
    pub fired_by: &'a str,
    /// Commit time.
    pub fired_at: Millis,
}

/// The events `declarations` emit for a result resolved as `resolution`, in declaration order.
/// Declarations whose condition or delivery mode is unknown (the loader rejects them) emit
/// nothing.
pub fn emitted(
    declarations: &[EventDeclaration],
    resolution: &Resolution,
    source: &EventSource<'_>,
) -> Vec<DomainEvent> {
    let mut out = Vec::new();
    for (i, d) in declarations.iter().enumerate() {
        let (Some(condition), Some(mode)) = (
            EventCondition::parse(&d.condition),
            DeliveryMode::parse(&d.delivery_mode),
        ) else {
            continue;
        };
        if !condition.matches(resolution) {
            continue;
        }
        let payload = match resolution {
            Resolution::Succeeded { result, .. } => result.clone(),
            Resolution::Retry { failure, .. } | Resolution::Failed { failure } => {
                json!({ "error": failure })
            }
        };
        out.push(DomainEvent {
            event_id: event_id(source.step_uuid, source.attempt, i, &d.name),
            event_name: d.name.clone(),
            delivery_mode: mode,
            payload,
            metadata: EventMetadata {
                task_uuid: source.task_uuid.to_string(),
                step_uuid: source.step_uuid.to_string(),
                step_name: source.step_name.to_string(),
                namespace: source.namespace.to_string(),
                correlation_id: source.correlation_id.to_string(),
                attempt: source.attempt,
                condition,
                fired_at: source.fired_at,
                fired_by: source.fired_by.to_string(),
            },
        });
    }
    out
}

/// A UUID-shaped id derived from the step, the attempt and the declaration: one result emits
/// one id per declaration, however often anything is retried.
fn event_id(step_uuid: &str, attempt: u32, index: usize, name: &str) -> String {
    let digest = Sha256::digest(format!("{step_uuid}\n{attempt}\n{index}\n{name}").as_bytes());
    let h: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Whether `name` matches a subscription pattern: `*` (everything), `prefix.*` (names under
/// a prefix) or an exact name.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// Receives domain events. Return `Err` to have a durable event delivered again later (fast
/// events are not redelivered).
#[async_trait]
pub trait EventSubscriber: Send + Sync {
    /// Handles one event.
    async fn handle(&self, event: &DomainEvent) -> std::result::Result<(), String>;
}

struct FnSubscriber<F>(F);

#[async_trait]
impl<F, Fut> EventSubscriber for FnSubscriber<F>
where
    F: Fn(DomainEvent) -> Fut + Send + Sync,
    Fut: std::future::Future<Output = std::result::Result<(), String>> + Send,
{
    async fn handle(&self, event: &DomainEvent) -> std::result::Result<(), String> {
        (self.0)(event.clone()).await
    }
}

/// A subscriber from an async closure.
pub fn subscriber_fn<F, Fut>(f: F) -> Arc<dyn EventSubscriber>
where
    F: Fn(DomainEvent) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::result::Result<(), String>> + Send + 'static,
{
    Arc::new(FnSubscriber(f))
}

/// Events queued for one subscriber at most; beyond, fast events are dropped (durable ones
/// wait).
const QUEUE: usize = 1024;

/// One delivery to a subscriber; durable deliveries want the outcome back.
struct Delivery {
    event: Arc<DomainEvent>,
    done: Option<oneshot::Sender<std::result::Result<(), String>>>,
}

struct Subscription {
    pattern: String,
    queue: mpsc::Sender<Delivery>,
}

/// The in-process side of events: subscriptions, each served by its own task.
#[derive(Default)]
pub(crate) struct Bus {
    subs: Mutex<Vec<Subscription>>,
    /// Fast events dropped because a subscriber's queue was full.
    pub(crate) dropped: std::sync::atomic::AtomicU64,
}

impl Bus {
    /// Adds a subscriber; its task runs on `runtime` until the bus goes away.
    pub(crate) fn subscribe(
        &self,
        pattern: String,
        subscriber: Arc<dyn EventSubscriber>,
        runtime: &tokio::runtime::Handle,
    ) {
        let (tx, mut rx) = mpsc::channel::<Delivery>(QUEUE);
        runtime.spawn(async move {
            while let Some(d) = rx.recv().await {
                // A panicking subscriber fails this delivery, not the subscription.
                let call = crate::worker::CatchUnwind::new(subscriber.handle(&d.event));
                let outcome = match call.await {
                    Ok(outcome) => outcome,
                    Err(p) => Err(format!(
                        "the subscriber panicked on {}: {}",
                        d.event.event_name, p.message
                    )),
                };
                if let Err(e) = &outcome
                    && d.done.is_none()
                {
                    tracing::warn!(
                        "subscriber failed on fast event {} ({}): {e}",
                        d.event.event_name,
                        d.event.event_id
                    );
                }
                if let Some(done) = d.done {
                    let _ = done.send(outcome);
                }
            }
        });
        self.subs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Subscription { pattern, queue: tx });
    }

    /// Whether anyone subscribed.
    pub(crate) fn has_subscribers(&self) -> bool {
        !self
            .subs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Publishes bus events (fast and broadcast) without waiting: a full queue drops the event
    /// for that subscriber.
    pub(crate) fn publish(&self, events: &[DomainEvent]) {
        let subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        for e in events.iter().filter(|e| e.delivery_mode.on_bus()) {
            let e = Arc::new(e.clone());
            for s in subs
                .iter()
                .filter(|s| pattern_matches(&s.pattern, &e.event_name))
            {
                let d = Delivery {
                    event: e.clone(),
                    done: None,
                };
                if s.queue.try_send(d).is_err() {
                    self.dropped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(
                        "dropped fast event {} for a subscriber whose queue is full",
                        e.event_name
                    );
                }
            }
        }
    }

    /// Delivers one durable event to every matching subscriber and waits for them all; `Err`
    /// lists the failures.
    pub(crate) async fn deliver(&self, event: DomainEvent) -> std::result::Result<(), String> {
        let event = Arc::new(event);
        let queues: Vec<mpsc::Sender<Delivery>> = self
            .subs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|s| pattern_matches(&s.pattern, &event.event_name))
            .map(|s| s.queue.clone())
            .collect();
        let mut waits = Vec::with_capacity(queues.len());
        for q in queues {
            let (tx, rx) = oneshot::channel();
            let d = Delivery {
                event: event.clone(),
                done: Some(tx),
            };
            match q.send(d).await {
                Ok(()) => waits.push(rx),
                Err(_) => return Err("a subscriber stopped".into()),
            }
        }
        let mut errors = Vec::new();
        for w in waits {
            match w.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(_) => errors.push("the subscriber stopped".into()),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// How long a claimed batch of durable events is reserved for this process's delivery.
const DELIVERY_CLAIM_MS: Millis = 60_000;

/// Durable events claimed per round.
const DELIVERY_BATCH: usize = 100;

/// When a failed delivery is tried again: 1 s, doubling, at most 5 minutes.
fn redelivery_delay_ms(attempts: u32) -> Millis {
    let exp = attempts.saturating_sub(1).min(20);
    (1000i64 << exp).min(300_000)
}

/// One delivery round: claims due durable events and hands each to every matching
/// subscriber, in commit order. Returns how many events it claimed.
pub(crate) async fn deliver_once(inner: &crate::engine::Inner) -> crate::Result<usize> {
    if !inner.bus.has_subscribers() {
        return Ok(0);
    }
    let now = inner.clock.now();
    let claimed = inner
        .store
        .claim_events(DELIVERY_BATCH, now + DELIVERY_CLAIM_MS, now)
        .await?;
    let n = claimed.len();
    let mut outcomes = Vec::with_capacity(n);
    for stored in claimed {
        let outcome = inner.bus.deliver(stored.event).await;
        let retry_at = inner.clock.now() + redelivery_delay_ms(stored.delivery_attempts);
        if let Err(e) = &outcome {
            tracing::warn!(
                "delivering event {} failed (attempt {}), retrying later: {e}",
                stored.seq,
                stored.delivery_attempts
            );
        }
        outcomes.push((stored.seq, outcome, retry_at));
    }
    if !outcomes.is_empty() {
        inner
            .store
            .record_deliveries(&outcomes, inner.clock.now())
            .await?;
    }
    Ok(n)
}

/// Delivers durable events while the engine runs: woken by committed results that fired
/// some, and by the next redelivery falling due.
pub(crate) async fn delivery_loop(inner: Arc<crate::engine::Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let claimed = match deliver_once(&inner).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("delivering domain events failed: {e}");
                0
            }
        };
        if claimed >= DELIVERY_BATCH {
            continue;
        }
        let wait = match inner.store.next_event_due().await {
            Ok(Some(due)) if inner.bus.has_subscribers() => {
                let ms = (due - inner.clock.now()).max(1) as u64;
                std::time::Duration::from_millis(ms).min(inner.config.poll_interval)
            }
            _ => inner.config.poll_interval,
        };
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            _ = inner.events_wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{ErrorType, StepFailure};

    fn decl(name: &str, condition: &str, mode: &str) -> EventDeclaration {
        EventDeclaration {
            name: name.into(),
            condition: condition.into(),
            delivery_mode: mode.into(),
            schema: None,
            publisher: None,
        }
    }

    fn source(attempt: u32) -> EventSource<'static> {
        EventSource {
            task_uuid: "t",
            step_uuid: "s",
            step_name: "charge",
            namespace: "shop",
            correlation_id: "c",
            attempt,
            fired_by: "w",
            fired_at: 5,
        }
    }

    #[test]
    fn conditions_pick_the_events_of_each_resolution() {
        let decls = [
            decl("a.success", "success", "durable"),
            decl("a.failure", "failure", "fast"),
            decl("a.retry", "retryable_failure", "durable"),
            decl("a.perm", "permanent_failure", "broadcast"),
            decl("a.always", "always", "durable"),
        ];
        let f = StepFailure::new(ErrorType::RetryableError, "boom");
        let names = |r: &Resolution| -> Vec<String> {
            emitted(&decls, r, &source(1))
                .into_iter()
                .map(|e| e.event_name)
                .collect()
        };
        let ok = Resolution::Succeeded {
            result: json!({"x": 1}),
            metadata: Value::Null,
        };
        assert_eq!(names(&ok), ["a.success", "a.always"]);
        let retry = Resolution::Retry {
            failure: f.clone(),
            next_attempt_at: 9,
        };
        assert_eq!(names(&retry), ["a.failure", "a.retry", "a.always"]);
        let failed = Resolution::Failed { failure: f };
        assert_eq!(names(&failed), ["a.failure", "a.perm", "a.always"]);
        let e = &emitted(&decls, &ok, &source(1))[0];
        assert_eq!(e.payload, json!({"x": 1}));
        assert_eq!(e.metadata.step_name, "charge");
        assert_eq!(e.metadata.condition, EventCondition::Success);
        let e = &emitted(&decls, &failed, &source(1))[0];
        assert_eq!(e.payload["error"]["message"], json!("boom"));
    }

    #[test]
    fn event_ids_are_stable_per_result_and_declaration() {
        let decls = [
            decl("a", "always", "durable"),
            decl("a", "always", "durable"),
        ];
        let ok = Resolution::Succeeded {
            result: json!({}),
            metadata: Value::Null,
        };
        let first = emitted(&decls, &ok, &source(1));
        let again = emitted(&decls, &ok, &source(1));
        let next = emitted(&decls, &ok, &source(2));
        assert_eq!(first[0].event_id, again[0].event_id);
        assert_ne!(first[0].event_id, first[1].event_id);
        assert_ne!(first[0].event_id, next[0].event_id);
        assert_eq!(first[0].event_id.len(), 36);
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "order.paid"));
        assert!(pattern_matches("order.*", "order.paid"));
        assert!(!pattern_matches("order.*", "orders.paid"));
        assert!(pattern_matches("order.paid", "order.paid"));
        assert!(!pattern_matches("order.paid", "order.paid.late"));
    }
}
