//! The export side: OTLP/JSON encoding of closed spans and the loop that batches and POSTs them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, USER_AGENT};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::{ERROR_LOG_EVERY, OtlpConfig};

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum AttrValue {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
}

pub(super) type Attrs = Vec<(&'static str, AttrValue)>;

/// A closed span on its way to the collector.
#[derive(Debug)]
pub(super) struct FinishedSpan {
    pub(super) trace_id: u128,
    pub(super) span_id: u64,
    pub(super) parent_span_id: Option<u64>,
    pub(super) links: Vec<(u128, u64)>,
    pub(super) name: &'static str,
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) attrs: Attrs,
    pub(super) events: Vec<(u64, String, Attrs)>,
    pub(super) dropped_events: u32,
}

fn attr_json(key: &str, value: &AttrValue) -> Value {
    let value = match value {
        AttrValue::Str(s) => json!({ "stringValue": s }),
        // 64-bit integers are strings in the JSON mapping of protobuf.
        AttrValue::Int(i) => json!({ "intValue": i.to_string() }),
        AttrValue::Double(d) => json!({ "doubleValue": d }),
        AttrValue::Bool(b) => json!({ "boolValue": b }),
    };
    json!({ "key": key, "value": value })
}

/// OTLP span kinds and status codes.
const KIND_INTERNAL: u8 = 1;
pub(super) const KIND_SERVER: u8 = 2;
const STATUS_UNSET: u8 = 0;
pub(super) const STATUS_ERROR: u8 = 2;

fn span_json(s: &FinishedSpan) -> Value {
    let text = |k: &str| {
        s.attrs.iter().find_map(|(key, v)| match v {
            AttrValue::Str(v) if *key == k => Some(v.as_str()),
            _ => None,
        })
    };
    // The engine's spans say how they ended in `outcome`; a failure is an error status,
    // with the error type as its message.
    let status = match text("outcome") {
        Some("failure" | "error") => json!({
            "code": STATUS_ERROR,
            "message": text("error_type").unwrap_or("failure"),
        }),
        _ => json!({ "code": STATUS_UNSET }),
    };
    let mut v = json!({
        "traceId": format!("{:032x}", s.trace_id),
        "spanId": format!("{:016x}", s.span_id),
        "name": s.name,
        "kind": if s.name == "tasker.request" { KIND_SERVER } else { KIND_INTERNAL },
        "startTimeUnixNano": s.start.to_string(),
        "endTimeUnixNano": s.end.max(s.start).to_string(),
        "attributes": s.attrs.iter().map(|(k, v)| attr_json(k, v)).collect::<Vec<_>>(),
        "status": status,
    });
    if let Some(parent) = s.parent_span_id {
        v["parentSpanId"] = json!(format!("{parent:016x}"));
    }
    if !s.links.is_empty() {
        v["links"] = s
            .links
            .iter()
            .map(
                |(t, id)| json!({ "traceId": format!("{t:032x}"), "spanId": format!("{id:016x}") }),
            )
            .collect();
    }
    if !s.events.is_empty() {
        v["events"] = s
            .events
            .iter()
            .map(|(time, name, attrs)| {
                json!({
                    "timeUnixNano": time.to_string(),
                    "name": name,
                    "attributes": attrs.iter().map(|(k, v)| attr_json(k, v)).collect::<Vec<_>>(),
                })
            })
            .collect();
    }
    if s.dropped_events > 0 {
        v["droppedEventsCount"] = json!(s.dropped_events);
    }
    v
}

/// The body of one export request.
fn request_json(config: &OtlpConfig, spans: &[FinishedSpan]) -> Value {
    let mut resource = vec![attr_json(
        "service.name",
        &AttrValue::Str(config.service_name.clone()),
    )];
    resource.extend(
        config
            .resource
            .iter()
            .map(|(k, v)| attr_json(k, &AttrValue::Str(v.clone()))),
    );
    json!({
        "resourceSpans": [{
            "resource": { "attributes": resource },
            "scopeSpans": [{
                "scope": { "name": "tasker", "version": env!("CARGO_PKG_VERSION") },
                "spans": spans.iter().map(span_json).collect::<Vec<_>>(),
            }],
        }],
    })
}

pub(super) struct ExportState {
    /// Exports that failed since the last one was logged.
    pub(super) failed_since_log: u64,
    pub(super) last_logged: Option<Instant>,
    pub(super) dropped: Arc<AtomicU64>,
}

impl ExportState {
    fn failed(&mut self, spans: usize, error: &str) {
        self.dropped.fetch_add(spans as u64, Ordering::Relaxed);
        self.failed_since_log += 1;
        if self
            .last_logged
            .is_none_or(|at| at.elapsed() >= ERROR_LOG_EVERY)
        {
            self.log(error);
        }
    }

    fn log(&mut self, error: &str) {
        tracing::warn!(
            failed_exports = self.failed_since_log,
            dropped_spans = self.dropped.load(Ordering::Relaxed),
            "OTLP export failed: {error}"
        );
        self.failed_since_log = 0;
        self.last_logged = Some(Instant::now());
    }
}

type Http = HttpClient<HttpConnector, Full<Bytes>>;

pub(super) async fn export_loop(
    config: OtlpConfig,
    mut rx: mpsc::Receiver<FinishedSpan>,
    mut stop: oneshot::Receiver<Instant>,
    mut state: ExportState,
) {
    let http: Http = HttpClient::builder(TokioExecutor::new()).build_http();
    let mut buf: Vec<FinishedSpan> = Vec::with_capacity(config.batch_size);
    let mut tick = tokio::time::interval(config.export_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = loop {
        let room = config.batch_size - buf.len();
        tokio::select! {
            biased;
            d = &mut stop => break d.unwrap_or_else(|_| Instant::now() + config.flush_deadline()),
            n = rx.recv_many(&mut buf, room) => {
                if n == 0 {
                    break Instant::now() + config.flush_deadline();
                }
                if buf.len() >= config.batch_size {
                    send(&http, &config, &mut buf, &mut state, None).await;
                }
            }
            _ = tick.tick() => if !buf.is_empty() {
                send(&http, &config, &mut buf, &mut state, None).await;
            },
        }
    };
    // Shutdown: whatever was queued goes out in full batches until the deadline.
    rx.close();
    while let Ok(s) = rx.try_recv() {
        buf.push(s);
    }
    while !buf.is_empty() {
        if Instant::now() >= deadline {
            state.failed(
                buf.len(),
                "the flush deadline passed before every span was sent",
            );
            buf.clear();
            break;
        }
        let mut rest = buf.split_off(buf.len().min(config.batch_size));
        std::mem::swap(&mut buf, &mut rest);
        send(&http, &config, &mut rest, &mut state, Some(deadline)).await;
    }
    if state.failed_since_log > 0 {
        state.log("spans were lost (see the count)");
    }
}

/// POSTs `batch` (and empties it); a failure is counted and maybe logged, never retried.
async fn send(
    http: &Http,
    config: &OtlpConfig,
    batch: &mut Vec<FinishedSpan>,
    state: &mut ExportState,
    deadline: Option<Instant>,
) {
    let n = batch.len();
    let body = match serde_json::to_vec(&request_json(config, batch)) {
        Ok(b) => b,
        Err(e) => {
            batch.clear();
            state.failed(n, &format!("cannot encode spans: {e}"));
            return;
        }
    };
    batch.clear();
    let mut timeout = config.timeout;
    if let Some(d) = deadline {
        timeout = timeout.min(d.saturating_duration_since(Instant::now()));
    }
    match tokio::time::timeout(timeout, post(http, config, body)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => state.failed(n, &format!("{}: {e}", config.endpoint)),
        Err(_) => state.failed(
            n,
            &format!(
                "{}: no answer within {} ms",
                config.endpoint,
                timeout.as_millis()
            ),
        ),
    }
}

async fn post(http: &Http, config: &OtlpConfig, body: Vec<u8>) -> Result<(), String> {
    let mut req = hyper::Request::post(config.endpoint.as_str())
        .header(CONTENT_TYPE, "application/json")
        .header(USER_AGENT, concat!("tasker/", env!("CARGO_PKG_VERSION")));
    for (k, v) in &config.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = http.request(req).await.map_err(|e| {
        // The connector's error says why (refused, unknown host) in its source.
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg = format!("{msg}: {s}");
            source = s.source();
        }
        msg
    })?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if status.is_success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    Err(format!("the collector answered {status}: {text}"))
}
