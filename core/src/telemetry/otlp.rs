//! Export of tracing spans to an OpenTelemetry collector over OTLP/HTTP with JSON bodies.
//!
//! A [`OtlpLayer`] turns every closed span it is interested in into an OTLP span and queues it
//! (bounded; a full queue drops the span and counts it, it never blocks the engine). A thread
//! of its own batches the queue and POSTs `{endpoint}/v1/traces` about once a second or every
//! 512 spans; a failed export is logged (at most once per [`ERROR_LOG_EVERY`]) and its spans
//! are counted as dropped. The [`TelemetryGuard`] flushes what is queued when dropped.
//!
//! **One trace per task.** A span that carries a `task_uuid` field belongs to the trace whose
//! id *is* the task's uuid (its 16 bytes, so the trace id is the uuid written without dashes).
//! Every process and every attempt working on a task therefore reports into the same trace
//! without propagating any context, and a trace is found from a task uuid by removing the
//! dashes. When such a span opens inside a span of another trace (a task created by a REST
//! request), it starts the task's trace and links to the span it came from instead of naming
//! it as parent. Spans without a task keep their parent's trace, or start a random one.
//! The task's creation span (`tasker.task.create`) is the root of its trace, with the span id
//! made of the uuid's last 16 hex digits; every task span without a parent in the same trace
//! (a step attempt, a result being applied, an operator action) is its child, whichever
//! process reports it.
//!
//! Configuration follows the OpenTelemetry environment variables; see [`OtlpConfig::from_env`].
//! Only `http://` endpoints are supported (no TLS stack is linked): send to a collector or
//! agent on the same host or network and let it forward over TLS.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use super::TelemetryGuard;

mod config;
mod export;

pub use config::OtlpConfig;
use export::{AttrValue, Attrs, ExportState, FinishedSpan, export_loop};

/// `service.name` when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
pub const DEFAULT_SERVICE_NAME: &str = "tasker";
/// The variable holding the export's own filter (`TASKER_LOG` syntax).
pub const FILTER_ENV: &str = "TASKER_OTLP_LOG";
/// Which spans (and span events) are exported unless [`FILTER_ENV`] says otherwise: the
/// engine's and the bundled handlers' at `info`, anything else at `warn`.
pub const DEFAULT_FILTER: &str = "warn,tasker=info";
/// Export failures are logged at most this often.
pub const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);
/// Longest the shutdown flush waits, whatever the export timeout.
pub const MAX_FLUSH: Duration = Duration::from_secs(5);
/// Span events kept per span; more are counted as dropped.
const MAX_EVENTS: usize = 64;

/// The export's span filter: [`FILTER_ENV`], else [`DEFAULT_FILTER`]. A malformed value is
/// reported on stderr and the default is used.
pub fn filter_from_env() -> tracing_subscriber::EnvFilter {
    match std::env::var(FILTER_ENV) {
        Ok(v) if !v.trim().is_empty() => {
            tracing_subscriber::EnvFilter::try_new(&v).unwrap_or_else(|e| {
                eprintln!(
                    "warning: {FILTER_ENV}={v} is not a valid filter ({e}); using {DEFAULT_FILTER}"
                );
                tracing_subscriber::EnvFilter::new(DEFAULT_FILTER)
            })
        }
        _ => tracing_subscriber::EnvFilter::new(DEFAULT_FILTER),
    }
}

/// The layer configured from the environment and the guard that flushes it: `Ok(None)` when
/// export is off. Give the layer its filter ([`filter_from_env`]) and install it beside the
/// application's own layers; keep the guard until the process ends.
pub fn from_env() -> Result<Option<(OtlpLayer, TelemetryGuard)>, String> {
    match OtlpConfig::from_env()? {
        Some(config) => start(config).map(Some),
        None => Ok(None),
    }
}

/// Starts exporting to `config`: the layer to install and the guard that flushes it.
pub fn start(config: OtlpConfig) -> Result<(OtlpLayer, TelemetryGuard), String> {
    let (tx, rx) = mpsc::channel(config.queue_size);
    let dropped = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = oneshot::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let flush_deadline = config.flush_deadline();
    let state = ExportState {
        failed_since_log: 0,
        last_logged: None,
        dropped: dropped.clone(),
    };
    std::thread::Builder::new()
        .name("tasker-otlp".into())
        .spawn(move || {
            EXPORTER_THREAD.with(|t| t.set(true));
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(export_loop(config, rx, stop_rx, state)),
                Err(e) => eprintln!("warning: OTLP export is off: no runtime for it: {e}"),
            }
            let _ = done_tx.send(());
        })
        .map_err(|e| format!("cannot start the OTLP export thread: {e}"))?;
    let layer = OtlpLayer {
        tx,
        dropped: dropped.clone(),
    };
    let guard = TelemetryGuard {
        exporter: Some(Exporter {
            stop: Some(stop_tx),
            done: done_rx,
            dropped,
            flush_deadline,
        }),
    };
    Ok((layer, guard))
}

/// The running export thread, as the [`TelemetryGuard`] holds it.
#[derive(Debug)]
pub(crate) struct Exporter {
    stop: Option<oneshot::Sender<Instant>>,
    done: std::sync::mpsc::Receiver<()>,
    dropped: Arc<AtomicU64>,
    flush_deadline: Duration,
}

impl Exporter {
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Asks the thread to export what is queued and waits for it, until the flush deadline.
    pub(crate) fn shutdown(mut self) {
        let deadline = Instant::now() + self.flush_deadline;
        if let Some(stop) = self.stop.take()
            && stop.send(deadline).is_ok()
        {
            // A little slack past the deadline for the thread to notice it and say so.
            let _ = self
                .done
                .recv_timeout(self.flush_deadline + Duration::from_millis(100));
        }
    }
}

thread_local! {
    /// Set on the export thread: spans opened there (by the HTTP client) are not exported,
    /// or exporting would feed itself.
    static EXPORTER_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A `tracing_subscriber` layer that queues closed spans for OTLP export. Built by [`start`].
#[derive(Debug)]
pub struct OtlpLayer {
    tx: mpsc::Sender<FinishedSpan>,
    dropped: Arc<AtomicU64>,
}

fn set_attr(attrs: &mut Attrs, key: &'static str, value: AttrValue) {
    match attrs.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => attrs.push((key, value)),
    }
}

struct Visitor<'a>(&'a mut Attrs);

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        set_attr(self.0, field.name(), AttrValue::Str(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        set_attr(self.0, field.name(), AttrValue::Int(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        let v = match i64::try_from(value) {
            Ok(v) => AttrValue::Int(v),
            Err(_) => AttrValue::Str(value.to_string()),
        };
        set_attr(self.0, field.name(), v);
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        set_attr(self.0, field.name(), AttrValue::Double(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        set_attr(self.0, field.name(), AttrValue::Bool(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        set_attr(self.0, field.name(), AttrValue::Str(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        set_attr(self.0, field.name(), AttrValue::Str(format!("{value:?}")));
    }
}

/// What the layer keeps in an open span's extensions.
struct SpanData {
    trace_id: u128,
    span_id: u64,
    parent_span_id: Option<u64>,
    /// The parent's trace and span, whichever trace this span ends up in.
    parent: Option<(u128, u64)>,
    links: Vec<(u128, u64)>,
    /// The trace is the task's (it came from `task_uuid`).
    task_trace: bool,
    /// A child span copied the trace id: it can no longer change.
    trace_fixed: bool,
    start: u64,
    attrs: Attrs,
    events: Vec<SpanEvent>,
    dropped_events: u32,
}

impl SpanData {
    /// Puts the span in `trace`; a parent in another trace becomes a link. In a task's trace,
    /// the task's creation span is the root and every span without a parent of its own hangs
    /// off it.
    fn place(&mut self, trace: u128, task_create: bool) {
        self.trace_id = trace;
        self.parent_span_id = None;
        self.links.retain(|l| Some(*l) != self.parent);
        match self.parent {
            Some((t, s)) if t == trace => self.parent_span_id = Some(s),
            Some(p) => self.links.push(p),
            None => {}
        }
        if self.task_trace {
            let root = task_root_span_id(trace);
            if task_create {
                self.span_id = root;
                self.parent_span_id = None;
            } else if self.parent_span_id.is_none() {
                self.parent_span_id = Some(root);
            }
        }
    }
}

struct SpanEvent {
    time: u64,
    name: String,
    attrs: Attrs,
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The trace of a task: its uuid's 128 bits.
pub fn task_trace_id(task_uuid: &str) -> Option<u128> {
    uuid::Uuid::parse_str(task_uuid)
        .ok()
        .map(|u| u.as_u128())
        .filter(|t| *t != 0)
}

/// The span id of a task's creation span, the root of its trace: the low 64 bits of the
/// task's uuid (the random ones of a v7 uuid), so any process can name it without asking.
pub fn task_root_span_id(trace: u128) -> u64 {
    (trace as u64).max(1)
}

/// The span name whose span is the root of its task's trace.
const TASK_CREATE_SPAN: &str = "tasker.task.create";

fn task_trace_of(attrs: &Attrs, key: &str) -> Option<u128> {
    attrs.iter().find_map(|(k, v)| match v {
        AttrValue::Str(s) if *k == key => task_trace_id(s),
        _ => None,
    })
}

fn random_trace_id() -> u128 {
    fastrand::u128(1..)
}

fn random_span_id() -> u64 {
    fastrand::u64(1..)
}

impl<S> tracing_subscriber::Layer<S> for OtlpLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if EXPORTER_THREAD.with(|t| t.get()) {
            return;
        }
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut own = Attrs::new();
        attrs.record(&mut Visitor(&mut own));
        let parent = span.parent().and_then(|p| {
            let mut ext = p.extensions_mut();
            let d = ext.get_mut::<SpanData>()?;
            d.trace_fixed = true;
            Some((d.trace_id, d.span_id))
        });
        let task = task_trace_of(&own, "task_uuid");
        // A sub-workflow's task links to the task that started it.
        let parent_task = task_trace_of(&own, "parent_task_uuid");
        let mut data = SpanData {
            trace_id: 0,
            span_id: random_span_id(),
            parent_span_id: None,
            parent,
            links: parent_task
                .map(|t| vec![(t, task_root_span_id(t))])
                .unwrap_or_default(),
            task_trace: task.is_some(),
            trace_fixed: false,
            start: now_nanos(),
            attrs: own,
            events: Vec::new(),
            dropped_events: 0,
        };
        let trace = task
            .or(parent.map(|(t, _)| t))
            .unwrap_or_else(random_trace_id);
        data.place(trace, span.metadata().name() == TASK_CREATE_SPAN);
        span.extensions_mut().insert(data);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut ext = span.extensions_mut();
        let Some(data) = ext.get_mut::<SpanData>() else {
            return;
        };
        values.record(&mut Visitor(&mut data.attrs));
        // A task uuid learnt after the span opened (a task being created) moves the span into
        // the task's trace, as long as no child has copied the old trace id yet.
        if !data.task_trace
            && !data.trace_fixed
            && let Some(trace) = task_trace_of(&data.attrs, "task_uuid")
        {
            data.task_trace = true;
            data.place(trace, span.metadata().name() == TASK_CREATE_SPAN);
        }
    }

    fn on_follows_from(&self, id: &Id, follows: &Id, ctx: Context<'_, S>) {
        let (Some(span), Some(cause)) = (ctx.span(id), ctx.span(follows)) else {
            return;
        };
        let link = cause
            .extensions()
            .get::<SpanData>()
            .map(|d| (d.trace_id, d.span_id));
        if let (Some(link), Some(data)) = (link, span.extensions_mut().get_mut::<SpanData>()) {
            data.links.push(link);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.event_span(event) else {
            return;
        };
        let mut ext = span.extensions_mut();
        let Some(data) = ext.get_mut::<SpanData>() else {
            return;
        };
        if data.events.len() >= MAX_EVENTS {
            data.dropped_events += 1;
            return;
        }
        let mut attrs = Attrs::new();
        event.record(&mut Visitor(&mut attrs));
        let meta = event.metadata();
        let name = match attrs.iter().position(|(k, _)| *k == "message") {
            Some(i) => match attrs.remove(i).1 {
                AttrValue::Str(s) => s,
                other => format!("{other:?}"),
            },
            None => meta.name().to_string(),
        };
        attrs.push(("level", AttrValue::Str(meta.level().as_str().to_string())));
        attrs.push(("target", AttrValue::Str(meta.target().to_string())));
        data.events.push(SpanEvent {
            time: now_nanos(),
            name,
            attrs,
        });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let Some(data) = span.extensions_mut().remove::<SpanData>() else {
            return;
        };
        let finished = FinishedSpan {
            trace_id: data.trace_id,
            span_id: data.span_id,
            parent_span_id: data.parent_span_id,
            links: data.links,
            name: span.metadata().name(),
            start: data.start,
            end: now_nanos(),
            attrs: data.attrs,
            events: data
                .events
                .into_iter()
                .map(|e| (e.time, e.name, e.attrs))
                .collect(),
            dropped_events: data.dropped_events,
        };
        if self.tx.try_send(finished).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::export::{KIND_SERVER, STATUS_ERROR};
    use super::*;
    use serde_json::Value;
    use tracing::field::Empty;

    /// A collector on a local port: every request body it gets, answered `200`.
    fn receiver() -> (String, Arc<std::sync::Mutex<Vec<Value>>>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = got.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        length = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                sink.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                );
            }
        });
        (url, got)
    }

    fn spans_of(bodies: &[Value]) -> Vec<Value> {
        bodies
            .iter()
            .flat_map(|b| {
                b["resourceSpans"][0]["scopeSpans"][0]["spans"]
                    .as_array()
                    .unwrap()
                    .clone()
            })
            .collect()
    }

    fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
        span["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == key)
            .map_or(&Value::Null, |a| &a["value"])
    }

    #[test]
    fn spans_reach_the_collector_in_their_task_trace() {
        use tracing_subscriber::layer::SubscriberExt;
        let (url, got) = receiver();
        let mut config = OtlpConfig::new(url);
        config.service_name = "orders".into();
        let (layer, guard) = start(config).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        let task = "0190b8c4-7d2e-7a3b-9c4d-5e6f708192a3";
        tracing::subscriber::with_default(subscriber, || {
            let request = tracing::info_span!("tasker.request", method = "POST");
            let _in_request = request.enter();
            let create = tracing::info_span!("tasker.task.create", task_uuid = Empty);
            create.record("task_uuid", task);
            drop(create);
            let step = tracing::info_span!(
                parent: None,
                "tasker.step",
                task_uuid = task,
                attempt = 2u32,
                outcome = Empty,
                error_type = Empty,
            );
            step.in_scope(|| tracing::info!(order = 7, "charging the card"));
            step.record("outcome", "failure");
            step.record("error_type", "retryable_error");
        });
        guard.shutdown();
        let bodies = got.lock().unwrap().clone();
        let resource = &bodies[0]["resourceSpans"][0]["resource"]["attributes"][0];
        assert_eq!(resource["key"], "service.name");
        assert_eq!(resource["value"]["stringValue"], "orders");
        let spans = spans_of(&bodies);
        let by_name = |n: &str| spans.iter().find(|s| s["name"] == n).unwrap().clone();
        let (request, create, step) = (
            by_name("tasker.request"),
            by_name("tasker.task.create"),
            by_name("tasker.step"),
        );
        let trace = task.replace('-', "");
        assert_eq!(request["kind"], KIND_SERVER);
        assert_ne!(request["traceId"], trace.as_str());
        // The creation span is the root of the task's trace and links to the request.
        assert_eq!(create["traceId"], trace.as_str());
        assert_eq!(create["spanId"], &trace[16..]);
        assert!(create.get("parentSpanId").is_none(), "{create:#}");
        assert_eq!(create["links"][0]["spanId"], request["spanId"]);
        assert_eq!(create["links"][0]["traceId"], request["traceId"]);
        // The step hangs off it, with its outcome as status and its log line as an event.
        assert_eq!(step["traceId"], trace.as_str());
        assert_eq!(step["parentSpanId"], &trace[16..]);
        assert_eq!(attr(&step, "attempt")["intValue"], "2");
        assert_eq!(step["status"]["code"], STATUS_ERROR);
        assert_eq!(step["status"]["message"], "retryable_error");
        assert_eq!(step["events"][0]["name"], "charging the card");
        assert_eq!(step["events"][0]["attributes"][0]["key"], "order");
        let start: u64 = step["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
        let end: u64 = step["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
        assert!(start > 0 && end >= start);
    }

    #[test]
    fn a_full_queue_drops_spans_and_counts_them() {
        // A collector that accepts connections and never answers keeps the exporter busy.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut config = OtlpConfig::new(format!(
            "http://{}/v1/traces",
            listener.local_addr().unwrap()
        ));
        config.queue_size = 4;
        config.batch_size = 4;
        config.timeout = Duration::from_secs(1);
        let (layer, guard) = start(config).unwrap();
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..20 {
                tracing::info_span!("work", i = i).in_scope(|| {});
            }
        });
        // At most one batch is being sent and one queue is waiting: 8 spans; the rest drop.
        let dropped = guard.dropped_spans();
        assert!((12..=20).contains(&dropped), "dropped {dropped}");
        let started = Instant::now();
        guard.shutdown();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        drop(listener);
    }

    #[test]
    fn a_task_uuid_is_its_trace_id() {
        let uuid = "0190b8c4-7d2e-7a3b-9c4d-5e6f708192a3";
        assert_eq!(
            format!("{:032x}", task_trace_id(uuid).unwrap()),
            uuid.replace('-', "")
        );
        assert_eq!(task_trace_id("not a uuid"), None);
        assert_eq!(task_trace_id("00000000-0000-0000-0000-000000000000"), None);
    }
}
