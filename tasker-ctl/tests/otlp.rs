//! OTLP export from the real binary: `tasker-ctl run` with `OTEL_EXPORTER_OTLP_ENDPOINT`
//! pointing at a collector played by this test (a plain TCP listener that reads the HTTP
//! requests), and with a collector that is dead or never answers.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

/// How long the collector holds each answer: the process must wait for it before exiting.
const HOLD: Duration = Duration::from_millis(400);

/// One request the collector received.
#[derive(Debug, Clone)]
struct Received {
    at: Instant,
    path: String,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A collector on a local port that answers every request `200 {}` after [`HOLD`].
fn collector() -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                continue;
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .to_string();
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    headers.push((k.trim().to_string(), v.trim().to_string()));
                }
            }
            let length: usize = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.parse().unwrap());
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let body = serde_json::from_slice(&body).expect("the export body is JSON");
            sink.lock().unwrap().push(Received {
                at: Instant::now(),
                path,
                headers,
                body,
            });
            std::thread::sleep(HOLD);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
            );
        }
    });
    (base, got)
}

fn template() -> String {
    workspace()
        .join("examples/ecommerce/templates/ecommerce_order_processing.yaml")
        .display()
        .to_string()
}

/// `tasker-ctl run` of the e-commerce example with `envs`: its output and how long it took.
fn run(dir: &std::path::Path, envs: &[(&str, &str)]) -> (std::process::Output, Duration) {
    let db = dir.join("t.db").display().to_string();
    let mut cmd = command(
        dir,
        &[
            "run",
            &template(),
            "--context",
            &example_file("sample_order.json"),
            "--db",
            &db,
            "--format",
            "json",
        ],
    );
    for k in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
        "OTEL_SERVICE_NAME",
        "OTEL_SDK_DISABLED",
        "TASKER_OTLP_LOG",
    ] {
        cmd.env_remove(k);
    }
    cmd.envs(envs.iter().copied());
    let started = Instant::now();
    let out = cmd.output().expect("tasker-ctl runs");
    (out, started.elapsed())
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
fn run_exports_one_trace_per_task_and_flushes_before_exiting() {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, got) = collector();
    let (out, _) = run(
        dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "orders-test"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=s3cret%21"),
        ],
    );
    let exited = Instant::now();
    assert_code(&out, 0);
    let task = json_out(&out);
    let uuid = task["uuid"].as_str().unwrap().to_string();
    let trace = uuid.replace('-', "");

    let received = got.lock().unwrap().clone();
    assert!(!received.is_empty(), "nothing exported\n{}", describe(&out));
    // The process waited for the collector's answer to its last export before exiting.
    let last = received.iter().map(|r| r.at).max().unwrap();
    assert!(
        exited >= last + HOLD,
        "exited {:?} after the last export arrived, before the collector answered",
        exited - last
    );
    let mut spans = Vec::new();
    for r in &received {
        assert_eq!(r.path, "/v1/traces");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("x-api-key"), Some("s3cret!"));
        let resource = &r.body["resourceSpans"][0];
        let service = resource["resource"]["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == "service.name")
            .expect("service.name");
        assert_eq!(service["value"]["stringValue"], "orders-test");
        spans.extend(
            resource["scopeSpans"][0]["spans"]
                .as_array()
                .unwrap()
                .iter()
                .cloned(),
        );
    }

    // The task's creation span is the root of the trace whose id is the task's uuid.
    let create = spans
        .iter()
        .find(|s| s["name"] == "tasker.task.create")
        .expect("a task creation span");
    assert_eq!(create["traceId"], trace.as_str());
    assert_eq!(create["spanId"], &trace[16..]);
    assert_eq!(attr(create, "task_uuid")["stringValue"], uuid.as_str());

    // One step span per step, in the task's trace, under the creation span.
    let steps = task["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 5);
    for step in steps {
        let name = step["name"].as_str().unwrap();
        let matching: Vec<&Value> = spans
            .iter()
            .filter(|s| {
                s["name"] == "tasker.step" && attr(s, "step_uuid")["stringValue"] == step["uuid"]
            })
            .collect();
        assert_eq!(matching.len(), 1, "{name}: {matching:#?}");
        let span = matching[0];
        assert_eq!(span["traceId"], trace.as_str(), "{name}");
        assert_eq!(span["parentSpanId"], &trace[16..], "{name}");
        assert_eq!(span["spanId"].as_str().unwrap().len(), 16);
        assert_eq!(attr(span, "task_uuid")["stringValue"], uuid.as_str());
        assert_eq!(attr(span, "step_name")["stringValue"], name);
        assert_eq!(
            attr(span, "correlation_id")["stringValue"],
            task["correlation_id"]
        );
        assert_eq!(attr(span, "attempt")["intValue"], "1");
        assert_eq!(attr(span, "outcome")["stringValue"], "success");
        let start: u128 = span["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
        let end: u128 = span["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
        assert!(start > 0 && end >= start, "{name}: {start}..{end}");
    }
}

#[test]
fn a_dead_collector_changes_nothing_but_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let (out, took) = run(
        dir.path(),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    );
    assert_code(&out, 0);
    assert_eq!(json_out(&out)["status"], "complete");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("OTLP export failed"), "{}", describe(&out));
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn a_collector_that_never_answers_delays_exit_by_the_flush_deadline_only() {
    let dir = tempfile::tempdir().unwrap();
    // Connections are accepted by the kernel and never answered.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (out, took) = run(
        dir.path(),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    );
    assert_code(&out, 0);
    assert_eq!(json_out(&out)["status"], "complete");
    // The flush waits for the collector up to its 5 s deadline, then the process exits.
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(9),
        "took {took:?}\n{}",
        describe(&out)
    );
    drop(listener);
}

#[test]
fn an_https_endpoint_is_refused_with_a_warning_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = run(
        dir.path(),
        &[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "https://collector.invalid:4318",
        )],
    );
    assert_code(&out, 0);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("OTLP export is off") && stderr.contains("https is not supported"),
        "{}",
        describe(&out)
    );
}
