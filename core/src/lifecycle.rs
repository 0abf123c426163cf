//! Lifecycle limits and staleness (SPEC §9): which unfinished task has overstayed, and the
//! engine's periodic check that moves such tasks to `error` with a DLQ entry.
//!
//! Three kinds of limit apply to a task that is not terminal:
//! - `lifecycle.max_duration_minutes` of its template, counted from its creation;
//! - `lifecycle.max_waiting_for_dependencies_minutes` / `max_waiting_for_retry_minutes` /
//!   `max_steps_in_process_minutes`, counted from the moment it entered its current state (its
//!   latest transition, so each backoff of a retrying task is measured on its own);
//! - the engine-wide staleness threshold ([`Config::staleness_threshold`]) in every
//!   non-terminal state, counted from its last progress: its latest transition or the latest
//!   change of one of its steps (a claim, a lease renewal, a checkpoint, a result). A task
//!   whose handlers keep working is not stale; one nobody touches is.
//!
//! The rules are a pure function ([`exceeded`]) that every store backend calls on the facts it
//! read, so they are written and tested once.
//!
//! [`Config::staleness_threshold`]: crate::Config::staleness_threshold

use std::sync::atomic::{AtomicI64, Ordering};

use crate::clock::{Millis, human_duration};
use crate::dlq::{DlqReason, LifecycleExceeded};
use crate::engine::Inner;
use crate::state::TaskState;
use crate::template::LifecycleLimits;
use crate::{Result, Tasker};

/// What a store knows about an unfinished task, as the lifecycle rules need it.
#[derive(Debug, Clone, PartialEq)]
pub struct LifecycleFacts {
    /// The task's current state.
    pub state: TaskState,
    /// When it was created.
    pub created_at: Millis,
    /// When it entered its current state: the time of its latest transition.
    pub entered_at: Millis,
    /// Its last progress: the later of `entered_at` and its steps' latest change.
    pub active_at: Millis,
    /// Its template's limits (from the template snapshot the task runs).
    pub limits: LifecycleLimits,
}

/// A limit a task has exceeded.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Which limit.
    pub reason: DlqReason,
    /// The limit, its value and how long the task has been there, for people; recorded as the
    /// transition's reason and the DLQ entry's message.
    pub message: String,
    /// The limit in milliseconds.
    pub limit_ms: i64,
    /// How long the task has been there, in milliseconds.
    pub elapsed_ms: i64,
}

/// A limit in minutes (as templates write it, fractions allowed) in milliseconds.
pub fn minutes_to_ms(minutes: f64) -> i64 {
    // `as` saturates: an absurdly large limit is simply never reached.
    (minutes * 60_000.0).round() as i64
}

/// The first limit the task exceeds at `now`, if any, checked in this order: the template's
/// `max_duration_minutes`, its limit for the current state, the staleness threshold
/// (`None`: no threshold). A task exceeds a limit when it has been there strictly longer.
pub fn exceeded(
    facts: &LifecycleFacts,
    staleness_threshold_ms: Option<i64>,
    now: Millis,
) -> Option<Verdict> {
    if facts.state.is_terminal() {
        return None;
    }
    let limits = &facts.limits;
    if let Some(minutes) = limits.max_duration_minutes {
        let (limit_ms, elapsed_ms) = (minutes_to_ms(minutes), now - facts.created_at);
        if elapsed_ms > limit_ms {
            return Some(Verdict {
                reason: DlqReason::MaxDuration,
                message: format!(
                    "lifecycle.max_duration_minutes = {minutes} exceeded: the task has run for {} \
                     (now {})",
                    human_duration(elapsed_ms),
                    facts.state
                ),
                limit_ms,
                elapsed_ms,
            });
        }
    }
    let state_limit = match facts.state {
        TaskState::WaitingForDependencies => limits
            .max_waiting_for_dependencies_minutes
            .map(|m| (DlqReason::MaxWaitingForDependencies, m)),
        TaskState::WaitingForRetry => limits
            .max_waiting_for_retry_minutes
            .map(|m| (DlqReason::MaxWaitingForRetry, m)),
        TaskState::StepsInProcess => limits
            .max_steps_in_process_minutes
            .map(|m| (DlqReason::MaxStepsInProcess, m)),
        _ => None,
    };
    if let Some((reason, minutes)) = state_limit {
        let (limit_ms, elapsed_ms) = (minutes_to_ms(minutes), now - facts.entered_at);
        if elapsed_ms > limit_ms {
            return Some(Verdict {
                reason,
                message: format!(
                    "lifecycle.{reason} = {minutes} exceeded: {} in {}",
                    human_duration(elapsed_ms),
                    facts.state
                ),
                limit_ms,
                elapsed_ms,
            });
        }
    }
    if let Some(limit_ms) = staleness_threshold_ms {
        let elapsed_ms = now - facts.active_at.max(facts.entered_at);
        if elapsed_ms > limit_ms {
            return Some(Verdict {
                reason: DlqReason::Staleness,
                message: format!(
                    "staleness threshold of {} exceeded: no progress for {} in {}",
                    human_duration(limit_ms),
                    human_duration(elapsed_ms),
                    facts.state
                ),
                limit_ms,
                elapsed_ms,
            });
        }
    }
    None
}

/// Tasks moved per store call at most; the check repeats until a call moves fewer.
const ENFORCE_BATCH: usize = 100;

/// When the engine last ran the lifecycle check, by its clock.
#[derive(Debug)]
pub(crate) struct CheckSchedule(AtomicI64);

impl Default for CheckSchedule {
    fn default() -> Self {
        CheckSchedule(AtomicI64::new(Millis::MIN))
    }
}

impl CheckSchedule {
    /// Whether a check is due at `now` (the first one always is, and so is one after the clock
    /// went back); when it is, `now` is recorded, so concurrent sweeps run it once.
    fn claim(&self, now: Millis, every_ms: i64) -> bool {
        let last = self.0.load(Ordering::SeqCst);
        let due = last == Millis::MIN || now < last || now - last >= every_ms;
        due && self
            .0
            .compare_exchange(last, now, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

/// The sweeper's hook: runs the check when `lifecycle_check_every` has passed on the engine's
/// clock since the last one.
pub(crate) async fn sweep(inner: &Inner, now: Millis) -> Result<()> {
    let every = inner.config.lifecycle_check_every.as_millis() as i64;
    if !inner.lifecycle_checks.claim(now, every) {
        return Ok(());
    }
    enforce(inner, now).await.map(drop)
}

/// Moves every task past a limit at `now` to `error` (with its DLQ entry) and wakes whoever
/// waits on those tasks.
async fn enforce(inner: &Inner, now: Millis) -> Result<Vec<LifecycleExceeded>> {
    let threshold = match inner.config.staleness_threshold.as_millis() as i64 {
        0 => None,
        ms => Some(ms),
    };
    let mut all = Vec::new();
    loop {
        let moved = inner
            .store
            .enforce_lifecycle(now, threshold, &inner.worker_id, ENFORCE_BATCH)
            .await?;
        for m in &moved {
            tracing::warn!(
                task = %m.task_uuid,
                "task moved from {} to error: {} exceeded (DLQ entry {})",
                m.original_state,
                m.reason,
                m.dlq_entry_uuid
            );
        }
        let changed: Vec<(String, TaskState)> = moved
            .iter()
            .map(|m| (m.task_uuid.clone(), TaskState::Error))
            .collect();
        inner.after_change(&changed, false);
        let full = moved.len() >= ENFORCE_BATCH;
        all.extend(moved);
        if !full {
            return Ok(all);
        }
    }
}

impl Tasker {
    /// Runs the lifecycle check now, whenever it last ran: every unfinished task past its
    /// template's `lifecycle` limits or the staleness threshold moves to `error` through the
    /// state machine (`lifecycle_exceeded`), its unfinished steps are cancelled and a DLQ
    /// entry records why. The sweeper does this every `lifecycle_check_every` on its own.
    pub async fn enforce_lifecycle(&self) -> Result<Vec<LifecycleExceeded>> {
        enforce(&self.inner, self.now()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    const NOW: Millis = 1_000 * MIN;

    fn facts(state: TaskState, minutes_ago: i64) -> LifecycleFacts {
        LifecycleFacts {
            state,
            created_at: NOW - 100 * MIN,
            entered_at: NOW - minutes_ago * MIN,
            active_at: NOW - minutes_ago * MIN,
            limits: LifecycleLimits::default(),
        }
    }

    #[test]
    fn each_state_limit_applies_only_to_its_state() {
        let limits = LifecycleLimits {
            max_waiting_for_dependencies_minutes: Some(5.0),
            max_waiting_for_retry_minutes: Some(5.0),
            max_steps_in_process_minutes: Some(5.0),
            ..LifecycleLimits::default()
        };
        for (state, reason) in [
            (
                TaskState::WaitingForDependencies,
                Some(DlqReason::MaxWaitingForDependencies),
            ),
            (
                TaskState::WaitingForRetry,
                Some(DlqReason::MaxWaitingForRetry),
            ),
            (
                TaskState::StepsInProcess,
                Some(DlqReason::MaxStepsInProcess),
            ),
            (TaskState::BlockedByFailures, None),
            (TaskState::EvaluatingResults, None),
        ] {
            let f = LifecycleFacts {
                limits: limits.clone(),
                ..facts(state, 7)
            };
            assert_eq!(exceeded(&f, None, NOW).map(|v| v.reason), reason, "{state}");
        }
    }

    #[test]
    fn a_limit_is_exceeded_only_past_it_and_the_message_names_it() {
        let limits = LifecycleLimits {
            max_waiting_for_retry_minutes: Some(5.0),
            ..LifecycleLimits::default()
        };
        let at_limit = LifecycleFacts {
            limits: limits.clone(),
            ..facts(TaskState::WaitingForRetry, 5)
        };
        assert_eq!(exceeded(&at_limit, None, NOW), None);
        let v = exceeded(&at_limit, None, NOW + 1).unwrap();
        assert_eq!((v.limit_ms, v.elapsed_ms), (5 * MIN, 5 * MIN + 1));
        assert_eq!(
            v.message,
            "lifecycle.max_waiting_for_retry_minutes = 5 exceeded: 5m00s in waiting_for_retry"
        );
    }

    #[test]
    fn max_duration_counts_from_creation_in_any_state() {
        let limits = LifecycleLimits {
            max_duration_minutes: Some(2.5),
            ..LifecycleLimits::default()
        };
        let mut f = LifecycleFacts {
            limits,
            ..facts(TaskState::BlockedByFailures, 0)
        };
        f.created_at = NOW - 3 * MIN;
        let v = exceeded(&f, None, NOW).unwrap();
        assert_eq!(v.reason, DlqReason::MaxDuration);
        assert_eq!(v.limit_ms, 150_000);
        assert!(
            v.message
                .starts_with("lifecycle.max_duration_minutes = 2.5 exceeded"),
            "{}",
            v.message
        );
        f.state = TaskState::Complete;
        assert_eq!(exceeded(&f, None, NOW), None, "terminal tasks never exceed");
    }

    #[test]
    fn staleness_covers_every_unfinished_state_and_counts_from_the_last_progress() {
        for state in TaskState::ALL {
            let f = facts(state, 30);
            let v = exceeded(&f, Some(20 * MIN), NOW);
            if state.is_terminal() {
                assert_eq!(v, None, "{state}");
            } else {
                let v = v.unwrap_or_else(|| panic!("{state} is not covered"));
                assert_eq!(v.reason, DlqReason::Staleness);
                assert!(v.message.contains(state.as_str()), "{}", v.message);
            }
        }
        let mut busy = facts(TaskState::StepsInProcess, 30);
        busy.active_at = NOW - 10 * MIN;
        assert_eq!(exceeded(&busy, Some(20 * MIN), NOW), None);
        assert_eq!(exceeded(&facts(TaskState::Pending, 30), None, NOW), None);
    }

    #[test]
    fn the_template_limit_wins_over_staleness() {
        let f = LifecycleFacts {
            limits: LifecycleLimits {
                max_steps_in_process_minutes: Some(5.0),
                ..LifecycleLimits::default()
            },
            ..facts(TaskState::StepsInProcess, 30)
        };
        let v = exceeded(&f, Some(20 * MIN), NOW).unwrap();
        assert_eq!(v.reason, DlqReason::MaxStepsInProcess);
    }

    #[test]
    fn the_schedule_runs_once_per_interval() {
        let s = CheckSchedule::default();
        assert!(s.claim(NOW, 10_000), "the first check is due");
        assert!(!s.claim(NOW + 9_999, 10_000));
        assert!(s.claim(NOW + 10_000, 10_000));
        assert!(s.claim(NOW, 10_000), "a clock that went back runs it again");
    }
}
