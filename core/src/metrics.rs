//! Process metrics in the Prometheus text format: counters and histograms this process
//! updates as it works, and gauges read from the store when scraped (queue depth and the age
//! of the oldest ready step per namespace, which every process sees the same).
//!
//! Label values are namespaces and template names, which come from registered templates; a
//! process keeps at most [`MAX_SERIES`] label sets per metric and counts the rest under
//! `other`, so no client can make a series set grow without bound.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Label sets per metric at most; later ones are counted under `other`.
pub const MAX_SERIES: usize = 500;

/// Histogram bucket bounds, in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += s;
        self.count += 1;
    }
}

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
struct Family<T> {
    series: BTreeMap<Vec<(&'static str, String)>, T>,
}

impl<T: Default> Family<T> {
    fn get(&mut self, labels: Labels) -> &mut T {
        if !self.series.contains_key(&labels) && self.series.len() >= MAX_SERIES {
            let other = labels
                .iter()
                .map(|(k, _)| (*k, "other".to_string()))
                .collect();
            return self.series.entry(other).or_default();
        }
        self.series.entry(labels).or_default()
    }
}

#[derive(Default)]
struct State {
    tasks_created: Family<u64>,
    tasks_completed: Family<u64>,
    tasks_failed: Family<u64>,
    step_duration: Family<Histogram>,
    retries: Family<u64>,
    claim_latency: Histogram,
    steps_claimed: u64,
    leases_expired: u64,
    attempt_timeouts: u64,
}

/// One process's metrics.
#[derive(Default)]
pub struct Metrics {
    state: Mutex<State>,
}

/// Ready steps of one namespace, as the store counts them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    /// The namespace.
    pub namespace: String,
    /// Steps enqueued and not claimed.
    pub ready: u64,
    /// When the oldest of them became ready.
    pub oldest_enqueued_at: Option<crate::clock::Millis>,
}

fn task_labels(namespace: &str, template: &str) -> Labels {
    vec![
        ("namespace", namespace.to_string()),
        ("template", template.to_string()),
    ]
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn task_created(&self, namespace: &str, template: &str) {
        self.with(|s| *s.tasks_created.get(task_labels(namespace, template)) += 1);
    }

    /// A task this process moved to `complete` (or, `failed`, to `error`).
    pub(crate) fn task_finished(&self, namespace: &str, template: &str, failed: bool) {
        self.with(|s| {
            let family = if failed {
                &mut s.tasks_failed
            } else {
                &mut s.tasks_completed
            };
            *family.get(task_labels(namespace, template)) += 1;
        });
    }

    /// A handler run that ended with `outcome` (`success`, `retry`, `failure`).
    pub(crate) fn step_finished(&self, namespace: &str, outcome: &'static str, took: Duration) {
        self.with(|s| {
            s.step_duration
                .get(vec![
                    ("namespace", namespace.to_string()),
                    ("outcome", outcome.to_string()),
                ])
                .observe(took);
            if outcome == "retry" {
                *s.retries.get(vec![("namespace", namespace.to_string())]) += 1;
            }
        });
    }

    pub(crate) fn claimed(&self, steps: usize, took: Duration) {
        self.with(|s| {
            s.claim_latency.observe(took);
            s.steps_claimed += steps as u64;
        });
    }

    /// Steps claimed in the transaction of a finish or a creation (no claim of their own).
    pub(crate) fn claimed_along(&self, steps: usize) {
        self.with(|s| s.steps_claimed += steps as u64);
    }

    pub(crate) fn expired(&self, leases: usize, timeouts: usize) {
        self.with(|s| {
            s.leases_expired += leases as u64;
            s.attempt_timeouts += timeouts as u64;
        });
    }

    /// The Prometheus text exposition of these metrics and of `queues` (read at `now`).
    pub fn render(&self, queues: &[QueueDepth], now: crate::clock::Millis) -> String {
        let mut out = String::new();
        self.with(|s| {
            counter(
                &mut out,
                "tasker_tasks_created_total",
                "Tasks created by this process.",
                &s.tasks_created,
            );
            counter(
                &mut out,
                "tasker_tasks_completed_total",
                "Tasks this process moved to complete.",
                &s.tasks_completed,
            );
            counter(
                &mut out,
                "tasker_tasks_failed_total",
                "Tasks this process moved to error.",
                &s.tasks_failed,
            );
            counter(
                &mut out,
                "tasker_step_retries_total",
                "Failed attempts that will be retried.",
                &s.retries,
            );
            histograms(
                &mut out,
                "tasker_step_duration_seconds",
                "Handler run time of finished attempts.",
                &s.step_duration,
            );
            let mut claim = Family::<Histogram>::default();
            claim
                .series
                .insert(Vec::new(), std::mem::take(&mut s.claim_latency));
            histograms(
                &mut out,
                "tasker_claim_duration_seconds",
                "Time a claim of ready steps took.",
                &claim,
            );
            s.claim_latency = claim.series.remove(&Vec::new()).unwrap_or_default();
            scalar(
                &mut out,
                "tasker_steps_claimed_total",
                "counter",
                "Steps claimed by this process.",
                s.steps_claimed as f64,
            );
            scalar(
                &mut out,
                "tasker_leases_expired_total",
                "counter",
                "Attempts this process ended because their lease expired.",
                s.leases_expired as f64,
            );
            scalar(
                &mut out,
                "tasker_attempt_timeouts_total",
                "counter",
                "Attempts this process ended at their timeout.",
                s.attempt_timeouts as f64,
            );
        });
        let _ = writeln!(
            out,
            "# HELP tasker_queue_depth Steps ready and not yet claimed."
        );
        let _ = writeln!(out, "# TYPE tasker_queue_depth gauge");
        for q in queues {
            let _ = writeln!(
                out,
                "tasker_queue_depth{{namespace=\"{}\"}} {}",
                escape(&q.namespace),
                q.ready
            );
        }
        let _ = writeln!(
            out,
            "# HELP tasker_queue_oldest_ready_age_seconds Age of the oldest ready step."
        );
        let _ = writeln!(out, "# TYPE tasker_queue_oldest_ready_age_seconds gauge");
        for q in queues {
            let age = q
                .oldest_enqueued_at
                .map_or(0.0, |t| ((now - t).max(0)) as f64 / 1000.0);
            let _ = writeln!(
                out,
                "tasker_queue_oldest_ready_age_seconds{{namespace=\"{}\"}} {age}",
                escape(&q.namespace)
            );
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(l: &[(&'static str, String)], extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = l
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn counter(out: &mut String, name: &str, help: &str, f: &Family<u64>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (l, v) in &f.series {
        let _ = writeln!(out, "{name}{} {v}", labels(l, None));
    }
}

fn scalar(out: &mut String, name: &str, kind: &str, help: &str, v: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
    );
}

fn histograms(out: &mut String, name: &str, help: &str, f: &Family<Histogram>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (l, h) in &f.series {
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{} {}",
                labels(l, Some(("le", b.to_string()))),
                h.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{} {}",
            labels(l, Some(("le", "+Inf".into()))),
            h.count
        );
        let _ = writeln!(out, "{name}_sum{} {}", labels(l, None), h.sum);
        let _ = writeln!(out, "{name}_count{} {}", labels(l, None), h.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_queues() {
        let m = Metrics::default();
        m.task_created("shop", "order");
        m.task_created("shop", "order");
        m.task_finished("shop", "order", false);
        m.step_finished("shop", "retry", Duration::from_millis(3));
        m.claimed(4, Duration::from_micros(700));
        m.expired(1, 2);
        let text = m.render(
            &[QueueDepth {
                namespace: "shop".into(),
                ready: 7,
                oldest_enqueued_at: Some(1_000),
            }],
            3_500,
        );
        for line in [
            "tasker_tasks_created_total{namespace=\"shop\",template=\"order\"} 2",
            "tasker_tasks_completed_total{namespace=\"shop\",template=\"order\"} 1",
            "tasker_step_retries_total{namespace=\"shop\"} 1",
            "tasker_step_duration_seconds_bucket{namespace=\"shop\",outcome=\"retry\",le=\"0.0025\"} 0",
            "tasker_step_duration_seconds_bucket{namespace=\"shop\",outcome=\"retry\",le=\"0.005\"} 1",
            "tasker_step_duration_seconds_count{namespace=\"shop\",outcome=\"retry\"} 1",
            "tasker_claim_duration_seconds_bucket{le=\"0.001\"} 1",
            "tasker_steps_claimed_total 4",
            "tasker_leases_expired_total 1",
            "tasker_attempt_timeouts_total 2",
            "tasker_queue_depth{namespace=\"shop\"} 7",
            "tasker_queue_oldest_ready_age_seconds{namespace=\"shop\"} 2.5",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn label_sets_are_bounded() {
        let m = Metrics::default();
        for i in 0..MAX_SERIES + 10 {
            m.task_created(&format!("ns{i}"), "t");
        }
        let text = m.render(&[], 0);
        let series = text
            .lines()
            .filter(|l| l.starts_with("tasker_tasks_created_total{"))
            .count();
        assert_eq!(series, MAX_SERIES + 1);
        assert!(
            text.contains("tasker_tasks_created_total{namespace=\"other\",template=\"other\"} 10")
        );
    }
}
