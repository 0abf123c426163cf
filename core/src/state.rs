//! The task and step state machines (SPEC §3) and task evaluation (SPEC §5.8).
//!
//! Everything here is pure: no I/O, no clock, no async. The transition tables are data
//! ([`TASK_TRANSITIONS`], [`STEP_TRANSITIONS`]) so that the SPEC's tables can be read off the
//! source row by row, and [`task_transition`] / [`step_transition`] only look them up. A
//! (state, event) pair that is not in a table is an [`InvalidTransition`] error, never a
//! silent no-op: the store records every transition, and a quietly ignored event would leave
//! a hole in that history.
//!
//! State and event names are the snake_case strings stored in SQL and sent in JSON; they are
//! identical in every host language, so `as_str`, `FromStr`, `Display` and serde all agree.

// The whole module is public API consumed by every other layer; keep it fully documented.
#![warn(missing_docs)]

use std::fmt;
use std::str::FromStr;

/// The error of parsing a state or event name that does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownName {
    /// What was being parsed: `"task state"`, `"task event"`, `"step state"` or `"step event"`.
    pub kind: &'static str,
    /// The string that matched no name.
    pub value: String,
}

impl fmt::Display for UnknownName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown {} `{}`", self.kind, self.value)
    }
}

impl std::error::Error for UnknownName {}

/// Declares a fieldless enum whose variants have one canonical snake_case name each, with
/// `ALL`, `as_str`, `FromStr` and `Display` derived from that one list, so the four can never
/// disagree. Serde uses `rename_all = "snake_case"`; a unit test checks it matches `as_str`.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident ($kind:literal, $count:literal) {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
        )]
        #[serde(rename_all = "snake_case")]
        #[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: [Self; $count] = [$(Self::$variant),+];

            /// The canonical snake_case name, as stored in SQL and sent in JSON.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(UnknownName { kind: $kind, value: s.to_owned() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named_enum! {
    /// The state of a task (SPEC §3, 12 states).
    pub enum TaskState ("task state", 12) {
        /// Created, not started yet.
        Pending => "pending",
        /// Started; the initial step set is being examined.
        Initializing => "initializing",
        /// Ready steps are being enqueued.
        EnqueuingSteps => "enqueuing_steps",
        /// Steps are enqueued or running.
        StepsInProcess => "steps_in_process",
        /// A step result arrived; the next state is being decided.
        EvaluatingResults => "evaluating_results",
        /// Nothing is running and no pending step has its parents satisfied.
        WaitingForDependencies => "waiting_for_dependencies",
        /// A step is backing off before its next attempt.
        WaitingForRetry => "waiting_for_retry",
        /// A step failed for good and nothing else is running; needs an operator or a
        /// lifecycle limit.
        BlockedByFailures => "blocked_by_failures",
        /// Every step is satisfied (terminal).
        Complete => "complete",
        /// Failed for good: enqueue failure, give-up or lifecycle limit (terminal).
        Error => "error",
        /// Cancelled (terminal).
        Cancelled => "cancelled",
        /// Closed by an operator (terminal).
        ResolvedManually => "resolved_manually",
    }
}

impl TaskState {
    /// `complete`, `error`, `cancelled` or `resolved_manually`: no event leaves these.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Complete | Self::Error | Self::Cancelled | Self::ResolvedManually
        )
    }

    /// The SPEC's "active" group: `enqueuing_steps`, `steps_in_process`,
    /// `evaluating_results` — the states in which the engine is working on the task, as
    /// opposed to the initial (`pending`, `initializing`), waiting and terminal groups.
    /// Use `!is_terminal()` for "not finished".
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Self::EnqueuingSteps | Self::StepsInProcess | Self::EvaluatingResults
        )
    }

    /// The SPEC's "waiting" group: `waiting_for_dependencies`, `waiting_for_retry`,
    /// `blocked_by_failures`.
    pub fn is_waiting(self) -> bool {
        matches!(
            self,
            Self::WaitingForDependencies | Self::WaitingForRetry | Self::BlockedByFailures
        )
    }
}

named_enum! {
    /// An event that moves a task between states (SPEC §3).
    pub enum TaskEvent ("task event", 17) {
        /// `pending` → `initializing`.
        Start => "start",
        /// Steps are ready to enqueue (or already enqueued and running).
        ReadyStepsFound => "ready_steps_found",
        /// The template produced no initial steps.
        NoStepsFound => "no_steps_found",
        /// Nothing is running and no pending step can start.
        NoDependenciesReady => "no_dependencies_ready",
        /// Ready steps were enqueued.
        StepsEnqueued => "steps_enqueued",
        /// Enqueueing failed.
        EnqueueFailed => "enqueue_failed",
        /// A step attempt finished (success or failure).
        StepResult => "step_result",
        /// Every step is `complete` or `resolved_manually`.
        AllStepsSuccessful => "all_steps_successful",
        /// A step is backing off before a retry.
        RetryPending => "retry_pending",
        /// A step failed for good (or was cancelled) and nothing else can run.
        PermanentFailure => "permanent_failure",
        /// A waiting task's dependencies became satisfied.
        DependenciesReady => "dependencies_ready",
        /// A retry backoff elapsed.
        RetryReady => "retry_ready",
        /// An operator reset, resolved or completed a step of a blocked task.
        OperatorFixedStep => "operator_fixed_step",
        /// An operator gave up on a blocked task.
        GiveUp => "give_up",
        /// An operator resolved a blocked task by hand.
        ManualResolution => "manual_resolution",
        /// A template lifecycle limit or the staleness threshold was exceeded.
        LifecycleExceeded => "lifecycle_exceeded",
        /// The task was cancelled.
        Cancel => "cancel",
    }
}

named_enum! {
    /// The state of a workflow step (SPEC §3, 10 states).
    pub enum StepState ("step state", 10) {
        /// Created; waiting for its parents.
        Pending => "pending",
        /// Ready to be claimed by a worker.
        Enqueued => "enqueued",
        /// Claimed by a worker (leased).
        InProgress => "in_progress",
        /// A success result was committed; orchestration has not processed it yet.
        EnqueuedForOrchestration => "enqueued_for_orchestration",
        /// A failure (or timeout, or lost lease) was committed; orchestration decides between
        /// retry and give-up.
        EnqueuedAsErrorForOrchestration => "enqueued_as_error_for_orchestration",
        /// Backing off until `next_attempt_at`.
        WaitingForRetry => "waiting_for_retry",
        /// Succeeded.
        Complete => "complete",
        /// Failed for good (an operator may still reset it).
        Error => "error",
        /// Cancelled.
        Cancelled => "cancelled",
        /// Closed by an operator without a result; satisfies dependents.
        ResolvedManually => "resolved_manually",
    }
}

impl StepState {
    /// `complete`, `cancelled`, `resolved_manually` or `error`: the step will not move again
    /// by itself, so task evaluation treats it as finished. `error` is included although an
    /// operator may `reset` it (and `resolve_manually`/`complete_manually` still apply to
    /// `error` and `resolved_manually`): those are operator actions, not engine progress, and
    /// `cancel` is not legal from any of these states.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Complete | Self::Cancelled | Self::ResolvedManually | Self::Error
        )
    }

    /// `complete` or `resolved_manually`: the states that let a child step start.
    pub fn satisfies_dependency(self) -> bool {
        matches!(self, Self::Complete | Self::ResolvedManually)
    }

    /// Enqueued, running, or with a result waiting for orchestration: work is still under
    /// way, so the task must not be judged stuck or blocked.
    pub fn is_in_flight(self) -> bool {
        matches!(
            self,
            Self::Enqueued
                | Self::InProgress
                | Self::EnqueuedForOrchestration
                | Self::EnqueuedAsErrorForOrchestration
        )
    }
}

named_enum! {
    /// An event that moves a step between states (SPEC §3).
    pub enum StepEvent ("step event", 13) {
        /// All parents are satisfied (or a retry is due): `pending` → `enqueued`.
        Enqueue => "enqueue",
        /// A worker claimed the step (attempts += 1, lease set).
        Claim => "claim",
        /// The handler yielded a checkpoint: stays `in_progress` without spending an attempt.
        Checkpoint => "checkpoint",
        /// The attempt succeeded.
        Succeed => "succeed",
        /// The attempt failed, timed out, or its lease expired.
        Fail => "fail",
        /// Orchestration accepted the success result.
        Complete => "complete",
        /// Orchestration decided to retry the failed attempt.
        RetryDecided => "retry_decided",
        /// Orchestration decided the failure is final.
        GiveUp => "give_up",
        /// The retry backoff elapsed.
        RetryReady => "retry_ready",
        /// Operator: `error` → `pending` (attempts = 0).
        Reset => "reset",
        /// Operator: close the step without a result.
        ResolveManually => "resolve_manually",
        /// Operator: complete the step with a supplied result.
        CompleteManually => "complete_manually",
        /// The step (or its task) was cancelled.
        Cancel => "cancel",
    }
}

/// An event that is not legal in the current state. Always an error, never ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTransition {
    /// Which machine: `"task"` or `"step"`.
    pub machine: &'static str,
    /// The state's name.
    pub from: String,
    /// The event's name.
    pub event: String,
}

impl fmt::Display for InvalidTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} transition: event `{}` from state `{}`",
            self.machine, self.event, self.from
        )
    }
}

impl std::error::Error for InvalidTransition {}

/// The task table of SPEC §3 as `(from, event, to)` rows. Rows the SPEC writes with several
/// `from` states ("any non-terminal", the `step_result` list) are expanded, one row per state.
#[rustfmt::skip] // One row per line, so the table reads like the SPEC's.
pub const TASK_TRANSITIONS: &[(TaskState, TaskEvent, TaskState)] = {
    use TaskEvent as E;
    use TaskState as S;
    &[
        (S::Pending, E::Start, S::Initializing),
        (S::Initializing, E::ReadyStepsFound, S::EnqueuingSteps),
        (S::Initializing, E::NoStepsFound, S::Complete),
        (S::Initializing, E::NoDependenciesReady, S::WaitingForDependencies),
        (S::EnqueuingSteps, E::StepsEnqueued, S::StepsInProcess),
        (S::EnqueuingSteps, E::EnqueueFailed, S::Error),
        // Parallel branches finish in any order, so a step result is legal in every
        // non-terminal state after `initializing` — including while the engine is still
        // enqueuing or evaluating — and evaluation then decides the next state.
        (S::EnqueuingSteps, E::StepResult, S::EvaluatingResults),
        (S::StepsInProcess, E::StepResult, S::EvaluatingResults),
        (S::EvaluatingResults, E::StepResult, S::EvaluatingResults),
        (S::WaitingForDependencies, E::StepResult, S::EvaluatingResults),
        (S::WaitingForRetry, E::StepResult, S::EvaluatingResults),
        (S::BlockedByFailures, E::StepResult, S::EvaluatingResults),
        (S::EvaluatingResults, E::AllStepsSuccessful, S::Complete),
        (S::EvaluatingResults, E::ReadyStepsFound, S::EnqueuingSteps),
        (S::EvaluatingResults, E::NoDependenciesReady, S::WaitingForDependencies),
        (S::EvaluatingResults, E::RetryPending, S::WaitingForRetry),
        (S::EvaluatingResults, E::PermanentFailure, S::BlockedByFailures),
        (S::WaitingForDependencies, E::DependenciesReady, S::EvaluatingResults),
        (S::WaitingForRetry, E::RetryReady, S::EnqueuingSteps),
        // Operator fixes resume the task instead of leaving it blocked.
        (S::BlockedByFailures, E::OperatorFixedStep, S::EvaluatingResults),
        (S::BlockedByFailures, E::GiveUp, S::Error),
        (S::BlockedByFailures, E::ManualResolution, S::ResolvedManually),
        // Lifecycle limits and staleness cover every non-terminal state, so no state can
        // hold a task forever.
        (S::Pending, E::LifecycleExceeded, S::Error),
        (S::Initializing, E::LifecycleExceeded, S::Error),
        (S::EnqueuingSteps, E::LifecycleExceeded, S::Error),
        (S::StepsInProcess, E::LifecycleExceeded, S::Error),
        (S::EvaluatingResults, E::LifecycleExceeded, S::Error),
        (S::WaitingForDependencies, E::LifecycleExceeded, S::Error),
        (S::WaitingForRetry, E::LifecycleExceeded, S::Error),
        (S::BlockedByFailures, E::LifecycleExceeded, S::Error),
        (S::Pending, E::Cancel, S::Cancelled),
        (S::Initializing, E::Cancel, S::Cancelled),
        (S::EnqueuingSteps, E::Cancel, S::Cancelled),
        (S::StepsInProcess, E::Cancel, S::Cancelled),
        (S::EvaluatingResults, E::Cancel, S::Cancelled),
        (S::WaitingForDependencies, E::Cancel, S::Cancelled),
        (S::WaitingForRetry, E::Cancel, S::Cancelled),
        (S::BlockedByFailures, E::Cancel, S::Cancelled),
    ]
};

/// The step table of SPEC §3 as `(from, event, to)` rows, with "any but complete/cancelled"
/// and "any non-terminal" expanded one row per state.
///
/// "Any but complete/cancelled" is taken literally: it includes `resolved_manually`, so an
/// operator may still supply a result for a resolved step (`complete_manually`, which makes
/// that result visible to dependents) and `resolve_manually` on a resolved step is a legal,
/// recorded self-transition rather than an error.
#[rustfmt::skip] // One row per line, so the table reads like the SPEC's.
pub const STEP_TRANSITIONS: &[(StepState, StepEvent, StepState)] = {
    use StepEvent as E;
    use StepState as S;
    &[
        (S::Pending, E::Enqueue, S::Enqueued),
        (S::Enqueued, E::Claim, S::InProgress),
        (S::InProgress, E::Checkpoint, S::InProgress),
        (S::InProgress, E::Succeed, S::EnqueuedForOrchestration),
        (S::InProgress, E::Fail, S::EnqueuedAsErrorForOrchestration),
        (S::EnqueuedForOrchestration, E::Complete, S::Complete),
        (S::EnqueuedAsErrorForOrchestration, E::RetryDecided, S::WaitingForRetry),
        (S::EnqueuedAsErrorForOrchestration, E::GiveUp, S::Error),
        (S::WaitingForRetry, E::RetryReady, S::Enqueued),
        (S::Error, E::Reset, S::Pending),
        (S::Pending, E::ResolveManually, S::ResolvedManually),
        (S::Enqueued, E::ResolveManually, S::ResolvedManually),
        (S::InProgress, E::ResolveManually, S::ResolvedManually),
        (S::EnqueuedForOrchestration, E::ResolveManually, S::ResolvedManually),
        (S::EnqueuedAsErrorForOrchestration, E::ResolveManually, S::ResolvedManually),
        (S::WaitingForRetry, E::ResolveManually, S::ResolvedManually),
        (S::Error, E::ResolveManually, S::ResolvedManually),
        (S::ResolvedManually, E::ResolveManually, S::ResolvedManually),
        (S::Pending, E::CompleteManually, S::Complete),
        (S::Enqueued, E::CompleteManually, S::Complete),
        (S::InProgress, E::CompleteManually, S::Complete),
        (S::EnqueuedForOrchestration, E::CompleteManually, S::Complete),
        (S::EnqueuedAsErrorForOrchestration, E::CompleteManually, S::Complete),
        (S::WaitingForRetry, E::CompleteManually, S::Complete),
        (S::Error, E::CompleteManually, S::Complete),
        (S::ResolvedManually, E::CompleteManually, S::Complete),
        (S::Pending, E::Cancel, S::Cancelled),
        (S::Enqueued, E::Cancel, S::Cancelled),
        (S::InProgress, E::Cancel, S::Cancelled),
        (S::EnqueuedForOrchestration, E::Cancel, S::Cancelled),
        (S::EnqueuedAsErrorForOrchestration, E::Cancel, S::Cancelled),
        (S::WaitingForRetry, E::Cancel, S::Cancelled),
    ]
};

/// Applies `event` to a task in state `from` using [`TASK_TRANSITIONS`].
pub fn task_transition(from: TaskState, event: TaskEvent) -> Result<TaskState, InvalidTransition> {
    lookup(TASK_TRANSITIONS, from, event).ok_or_else(|| InvalidTransition {
        machine: "task",
        from: from.as_str().to_owned(),
        event: event.as_str().to_owned(),
    })
}

/// Applies `event` to a step in state `from` using [`STEP_TRANSITIONS`].
pub fn step_transition(from: StepState, event: StepEvent) -> Result<StepState, InvalidTransition> {
    lookup(STEP_TRANSITIONS, from, event).ok_or_else(|| InvalidTransition {
        machine: "step",
        from: from.as_str().to_owned(),
        event: event.as_str().to_owned(),
    })
}

/// A linear scan: the tables have a few dozen rows, and a scan keeps them plain `const` data.
fn lookup<S: Copy + Eq, E: Copy + Eq>(table: &[(S, E, S)], from: S, event: E) -> Option<S> {
    table
        .iter()
        .find(|&&(f, e, _)| f == from && e == event)
        .map(|&(_, _, to)| to)
}

/// How many of a task's steps are in each group that matters for evaluation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCounts {
    /// Every step.
    pub total: u32,
    /// `complete` or `resolved_manually`.
    pub satisfied: u32,
    /// `enqueued`, `in_progress` or either `enqueued_*_for_orchestration`.
    pub in_flight: u32,
    /// `pending`.
    pub pending: u32,
    /// `waiting_for_retry`.
    pub waiting_for_retry: u32,
    /// `error`.
    pub error: u32,
    /// `cancelled`.
    pub cancelled: u32,
}

impl StepCounts {
    /// Tallies one step in `total` and in exactly one group.
    pub fn add(&mut self, s: StepState) {
        self.total += 1;
        let group = match s {
            StepState::Complete | StepState::ResolvedManually => &mut self.satisfied,
            StepState::Enqueued
            | StepState::InProgress
            | StepState::EnqueuedForOrchestration
            | StepState::EnqueuedAsErrorForOrchestration => &mut self.in_flight,
            StepState::Pending => &mut self.pending,
            StepState::WaitingForRetry => &mut self.waiting_for_retry,
            StepState::Error => &mut self.error,
            StepState::Cancelled => &mut self.cancelled,
        };
        *group += 1;
    }
}

impl FromIterator<StepState> for StepCounts {
    /// Tallies every step of the iterator.
    fn from_iter<I: IntoIterator<Item = StepState>>(iter: I) -> Self {
        let mut counts = Self::default();
        iter.into_iter().for_each(|s| counts.add(s));
        counts
    }
}

/// Decides the event that takes a task out of `evaluating_results` (SPEC §5.8).
///
/// The caller counts the steps *after* enqueueing every step that became ready (SPEC §5.1
/// enqueues them in the transaction that satisfied their last parent), so a `pending` step
/// here is one whose parents are not all satisfied.
///
/// The checks run in this order, and the order is the policy:
/// 1. every step satisfied (also when there are no steps) ⇒ [`TaskEvent::AllStepsSuccessful`];
/// 2. anything in flight ⇒ [`TaskEvent::ReadyStepsFound`]: work is still under way, and its
///    results may unblock pending steps, so a failure elsewhere must not block the task yet;
/// 3. a step backing off ⇒ [`TaskEvent::RetryPending`]: it will run again by itself;
/// 4. a step in `error` or `cancelled` ⇒ [`TaskEvent::PermanentFailure`]: nothing is running
///    or due to run, and that step will never satisfy its dependents, so the task is
///    `blocked_by_failures` until an operator acts or a lifecycle limit ends it — it must
///    not wait for dependencies that can never arrive;
/// 5. otherwise only pending steps with unsatisfied parents are left ⇒
///    [`TaskEvent::NoDependenciesReady`].
pub fn evaluate(counts: &StepCounts) -> TaskEvent {
    if counts.satisfied == counts.total {
        TaskEvent::AllStepsSuccessful
    } else if counts.in_flight > 0 {
        TaskEvent::ReadyStepsFound
    } else if counts.waiting_for_retry > 0 {
        TaskEvent::RetryPending
    } else if counts.error > 0 || counts.cancelled > 0 {
        TaskEvent::PermanentFailure
    } else {
        TaskEvent::NoDependenciesReady
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// The SPEC §3 task table, written independently of `TASK_TRANSITIONS` (as patterns over
    /// state groups rather than expanded rows), so a wrong or missing row fails a test.
    fn spec_task(from: TaskState, event: TaskEvent) -> Option<TaskState> {
        use TaskEvent as E;
        use TaskState as S;
        let non_terminal = !matches!(
            from,
            S::Complete | S::Error | S::Cancelled | S::ResolvedManually
        );
        let after_initializing = non_terminal && !matches!(from, S::Pending | S::Initializing);
        match (from, event) {
            (S::Pending, E::Start) => Some(S::Initializing),
            (S::Initializing, E::ReadyStepsFound) => Some(S::EnqueuingSteps),
            (S::Initializing, E::NoStepsFound) => Some(S::Complete),
            (S::Initializing, E::NoDependenciesReady) => Some(S::WaitingForDependencies),
            (S::EnqueuingSteps, E::StepsEnqueued) => Some(S::StepsInProcess),
            (S::EnqueuingSteps, E::EnqueueFailed) => Some(S::Error),
            (_, E::StepResult) if after_initializing => Some(S::EvaluatingResults),
            (S::EvaluatingResults, E::AllStepsSuccessful) => Some(S::Complete),
            (S::EvaluatingResults, E::ReadyStepsFound) => Some(S::EnqueuingSteps),
            (S::EvaluatingResults, E::NoDependenciesReady) => Some(S::WaitingForDependencies),
            (S::EvaluatingResults, E::RetryPending) => Some(S::WaitingForRetry),
            (S::EvaluatingResults, E::PermanentFailure) => Some(S::BlockedByFailures),
            (S::WaitingForDependencies, E::DependenciesReady) => Some(S::EvaluatingResults),
            (S::WaitingForRetry, E::RetryReady) => Some(S::EnqueuingSteps),
            (S::BlockedByFailures, E::OperatorFixedStep) => Some(S::EvaluatingResults),
            (S::BlockedByFailures, E::GiveUp) => Some(S::Error),
            (S::BlockedByFailures, E::ManualResolution) => Some(S::ResolvedManually),
            (_, E::LifecycleExceeded) if non_terminal => Some(S::Error),
            (_, E::Cancel) if non_terminal => Some(S::Cancelled),
            _ => None,
        }
    }

    /// The SPEC §3 step table, written independently of `STEP_TRANSITIONS`.
    fn spec_step(from: StepState, event: StepEvent) -> Option<StepState> {
        use StepEvent as E;
        use StepState as S;
        let not_complete_or_cancelled = !matches!(from, S::Complete | S::Cancelled);
        let non_terminal = !matches!(
            from,
            S::Complete | S::Cancelled | S::ResolvedManually | S::Error
        );
        match (from, event) {
            (S::Pending, E::Enqueue) => Some(S::Enqueued),
            (S::Enqueued, E::Claim) => Some(S::InProgress),
            (S::InProgress, E::Checkpoint) => Some(S::InProgress),
            (S::InProgress, E::Succeed) => Some(S::EnqueuedForOrchestration),
            (S::InProgress, E::Fail) => Some(S::EnqueuedAsErrorForOrchestration),
            (S::EnqueuedForOrchestration, E::Complete) => Some(S::Complete),
            (S::EnqueuedAsErrorForOrchestration, E::RetryDecided) => Some(S::WaitingForRetry),
            (S::EnqueuedAsErrorForOrchestration, E::GiveUp) => Some(S::Error),
            (S::WaitingForRetry, E::RetryReady) => Some(S::Enqueued),
            (S::Error, E::Reset) => Some(S::Pending),
            (_, E::ResolveManually) if not_complete_or_cancelled => Some(S::ResolvedManually),
            (_, E::CompleteManually) if not_complete_or_cancelled => Some(S::Complete),
            (_, E::Cancel) if non_terminal => Some(S::Cancelled),
            _ => None,
        }
    }

    #[test]
    fn task_table_matches_spec_for_every_state_and_event() {
        let mut legal = 0;
        for from in TaskState::ALL {
            for event in TaskEvent::ALL {
                let got = task_transition(from, event);
                match spec_task(from, event) {
                    Some(to) => {
                        legal += 1;
                        assert_eq!(got, Ok(to), "task {from} --{event}-->");
                    }
                    None => assert_eq!(
                        got,
                        Err(InvalidTransition {
                            machine: "task",
                            from: from.as_str().to_owned(),
                            event: event.as_str().to_owned(),
                        }),
                        "task {from} --{event}--> must be invalid"
                    ),
                }
            }
        }
        // 1 + 3 + 2 + 6 step_result + 5 evaluation + 1 + 1 + 3 blocked + 8 lifecycle + 8 cancel.
        assert_eq!(legal, 38);
        assert_eq!(TASK_TRANSITIONS.len(), legal, "no duplicate or extra rows");
    }

    #[test]
    fn step_table_matches_spec_for_every_state_and_event() {
        let mut legal = 0;
        for from in StepState::ALL {
            for event in StepEvent::ALL {
                let got = step_transition(from, event);
                match spec_step(from, event) {
                    Some(to) => {
                        legal += 1;
                        assert_eq!(got, Ok(to), "step {from} --{event}-->");
                    }
                    None => assert_eq!(
                        got,
                        Err(InvalidTransition {
                            machine: "step",
                            from: from.as_str().to_owned(),
                            event: event.as_str().to_owned(),
                        }),
                        "step {from} --{event}--> must be invalid"
                    ),
                }
            }
        }
        // 10 single rows + 8 resolve_manually + 8 complete_manually + 6 cancel.
        assert_eq!(legal, 32);
        assert_eq!(STEP_TRANSITIONS.len(), legal, "no duplicate or extra rows");
    }

    #[test]
    fn tables_have_one_row_per_state_and_event() {
        let task: HashSet<_> = TASK_TRANSITIONS.iter().map(|&(f, e, _)| (f, e)).collect();
        assert_eq!(task.len(), TASK_TRANSITIONS.len());
        let step: HashSet<_> = STEP_TRANSITIONS.iter().map(|&(f, e, _)| (f, e)).collect();
        assert_eq!(step.len(), STEP_TRANSITIONS.len());
    }

    #[test]
    fn every_legal_row_is_accepted() {
        for &(from, event, to) in TASK_TRANSITIONS {
            assert_eq!(task_transition(from, event), Ok(to));
        }
        for &(from, event, to) in STEP_TRANSITIONS {
            assert_eq!(step_transition(from, event), Ok(to));
        }
    }

    #[test]
    fn terminal_tasks_accept_no_event() {
        for &(from, ..) in TASK_TRANSITIONS {
            assert!(
                !from.is_terminal(),
                "{from} is terminal but has an outgoing row"
            );
        }
    }

    #[test]
    fn parallel_step_results_are_legal_while_enqueuing_or_evaluating() {
        use TaskState as S;
        for from in [S::EnqueuingSteps, S::EvaluatingResults] {
            assert_eq!(
                task_transition(from, TaskEvent::StepResult),
                Ok(S::EvaluatingResults)
            );
        }
        for from in [S::Pending, S::Initializing, S::Complete] {
            assert!(task_transition(from, TaskEvent::StepResult).is_err());
        }
    }

    #[test]
    fn every_state_is_reachable_from_its_initial_state() {
        fn reachable<S: Copy + Eq + std::hash::Hash, E>(table: &[(S, E, S)], start: S) -> usize {
            let mut seen = HashSet::from([start]);
            let mut frontier = vec![start];
            while let Some(s) = frontier.pop() {
                for (f, _, to) in table {
                    if *f == s && seen.insert(*to) {
                        frontier.push(*to);
                    }
                }
            }
            seen.len()
        }
        assert_eq!(
            reachable(TASK_TRANSITIONS, TaskState::Pending),
            TaskState::ALL.len()
        );
        assert_eq!(
            reachable(STEP_TRANSITIONS, StepState::Pending),
            StepState::ALL.len()
        );
    }

    #[test]
    fn invalid_transition_message_names_machine_event_and_state() {
        let err = task_transition(TaskState::Complete, TaskEvent::Cancel).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid task transition: event `cancel` from state `complete`"
        );
        let err = step_transition(StepState::Pending, StepEvent::RetryDecided).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid step transition: event `retry_decided` from state `pending`"
        );
    }

    /// Checks `as_str`/`FromStr`/`Display`/serde agreement for one enum and returns its names.
    fn check_names<T>(all: &[T]) -> Vec<&'static str>
    where
        T: Copy
            + PartialEq
            + fmt::Debug
            + fmt::Display
            + FromStr<Err = UnknownName>
            + serde::Serialize
            + serde::de::DeserializeOwned,
        T: AsStr,
    {
        let mut names = Vec::new();
        for &v in all {
            let name = v.name();
            assert_eq!(name.parse::<T>(), Ok(v), "{name}");
            assert_eq!(v.to_string(), name);
            assert_eq!(serde_json::to_value(v).unwrap(), serde_json::json!(name));
            assert_eq!(
                serde_json::from_value::<T>(serde_json::json!(name)).unwrap(),
                v
            );
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name} is not snake_case"
            );
            names.push(name);
        }
        let unique: HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "duplicate names");
        names
    }

    /// Lets `check_names` call each enum's inherent `as_str`.
    trait AsStr {
        fn name(self) -> &'static str;
    }
    macro_rules! as_str_impl {
        ($($t:ty),*) => {
            $(impl AsStr for $t {
                fn name(self) -> &'static str {
                    self.as_str()
                }
            })*
        };
    }
    as_str_impl!(TaskState, TaskEvent, StepState, StepEvent);

    #[test]
    fn names_round_trip_and_match_the_spec() {
        assert_eq!(
            check_names(&TaskState::ALL),
            [
                "pending",
                "initializing",
                "enqueuing_steps",
                "steps_in_process",
                "evaluating_results",
                "waiting_for_dependencies",
                "waiting_for_retry",
                "blocked_by_failures",
                "complete",
                "error",
                "cancelled",
                "resolved_manually",
            ]
        );
        assert_eq!(
            check_names(&TaskEvent::ALL),
            [
                "start",
                "ready_steps_found",
                "no_steps_found",
                "no_dependencies_ready",
                "steps_enqueued",
                "enqueue_failed",
                "step_result",
                "all_steps_successful",
                "retry_pending",
                "permanent_failure",
                "dependencies_ready",
                "retry_ready",
                "operator_fixed_step",
                "give_up",
                "manual_resolution",
                "lifecycle_exceeded",
                "cancel",
            ]
        );
        assert_eq!(
            check_names(&StepState::ALL),
            [
                "pending",
                "enqueued",
                "in_progress",
                "enqueued_for_orchestration",
                "enqueued_as_error_for_orchestration",
                "waiting_for_retry",
                "complete",
                "error",
                "cancelled",
                "resolved_manually",
            ]
        );
        assert_eq!(
            check_names(&StepEvent::ALL),
            [
                "enqueue",
                "claim",
                "checkpoint",
                "succeed",
                "fail",
                "complete",
                "retry_decided",
                "give_up",
                "retry_ready",
                "reset",
                "resolve_manually",
                "complete_manually",
                "cancel",
            ]
        );
    }

    #[test]
    fn unknown_names_are_rejected_with_the_bad_string() {
        let err = "done".parse::<TaskState>().unwrap_err();
        assert_eq!(
            err,
            UnknownName {
                kind: "task state",
                value: "done".into()
            }
        );
        assert_eq!(err.to_string(), "unknown task state `done`");
        assert_eq!(
            "Pending".parse::<StepState>().unwrap_err().kind,
            "step state"
        );
        assert_eq!("".parse::<TaskEvent>().unwrap_err().kind, "task event");
        assert_eq!("retry".parse::<StepEvent>().unwrap_err().value, "retry");
        assert!(serde_json::from_value::<StepState>(serde_json::json!("done")).is_err());
    }

    #[test]
    fn task_predicates() {
        use TaskState as S;
        let terminal: Vec<_> = S::ALL.into_iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(
            terminal,
            [S::Complete, S::Error, S::Cancelled, S::ResolvedManually]
        );
        let active: Vec<_> = S::ALL.into_iter().filter(|s| s.is_active()).collect();
        assert_eq!(
            active,
            [S::EnqueuingSteps, S::StepsInProcess, S::EvaluatingResults]
        );
        let waiting: Vec<_> = S::ALL.into_iter().filter(|s| s.is_waiting()).collect();
        assert_eq!(
            waiting,
            [
                S::WaitingForDependencies,
                S::WaitingForRetry,
                S::BlockedByFailures
            ]
        );
    }

    #[test]
    fn step_predicates() {
        use StepState as S;
        let terminal: Vec<_> = S::ALL.into_iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(
            terminal,
            [S::Complete, S::Error, S::Cancelled, S::ResolvedManually]
        );
        let satisfied: Vec<_> = S::ALL
            .into_iter()
            .filter(|s| s.satisfies_dependency())
            .collect();
        assert_eq!(satisfied, [S::Complete, S::ResolvedManually]);
        let in_flight: Vec<_> = S::ALL.into_iter().filter(|s| s.is_in_flight()).collect();
        assert_eq!(
            in_flight,
            [
                S::Enqueued,
                S::InProgress,
                S::EnqueuedForOrchestration,
                S::EnqueuedAsErrorForOrchestration,
            ]
        );
        // Cancel is legal exactly from the non-terminal step states.
        for s in S::ALL {
            assert_eq!(
                step_transition(s, StepEvent::Cancel).is_ok(),
                !s.is_terminal(),
                "{s}"
            );
        }
    }

    #[test]
    fn counts_tally_each_state_in_total_and_one_group() {
        for s in StepState::ALL {
            let c: StepCounts = [s].into_iter().collect();
            let groups = [
                c.satisfied,
                c.in_flight,
                c.pending,
                c.waiting_for_retry,
                c.error,
                c.cancelled,
            ];
            assert_eq!(c.total, 1, "{s}");
            assert_eq!(
                groups.iter().sum::<u32>(),
                1,
                "{s} counted in exactly one group"
            );
            assert_eq!(c.satisfied == 1, s.satisfies_dependency(), "{s}");
            assert_eq!(c.in_flight == 1, s.is_in_flight(), "{s}");
        }
        let c: StepCounts = StepState::ALL.into_iter().collect();
        let expected = StepCounts {
            total: 10,
            satisfied: 2,
            in_flight: 4,
            pending: 1,
            waiting_for_retry: 1,
            error: 1,
            cancelled: 1,
        };
        assert_eq!(c, expected);
    }

    #[test]
    fn evaluate_picks_each_branch_in_order() {
        use StepState as S;
        use TaskEvent as E;
        let cases: &[(&[StepState], TaskEvent)] = &[
            (&[], E::AllStepsSuccessful),
            (&[S::Complete, S::ResolvedManually], E::AllStepsSuccessful),
            (&[S::Complete, S::InProgress], E::ReadyStepsFound),
            // Work in flight outranks a failure: its results may still matter.
            (&[S::Error, S::Enqueued, S::Pending], E::ReadyStepsFound),
            (
                &[S::Error, S::EnqueuedAsErrorForOrchestration],
                E::ReadyStepsFound,
            ),
            (
                &[S::Complete, S::WaitingForRetry, S::Pending],
                E::RetryPending,
            ),
            (&[S::Error, S::WaitingForRetry], E::RetryPending),
            // A failure with nothing running or due blocks the task.
            (&[S::Complete, S::Error, S::Pending], E::PermanentFailure),
            (&[S::Cancelled, S::Complete], E::PermanentFailure),
            (&[S::Complete, S::Pending], E::NoDependenciesReady),
            (&[S::Pending], E::NoDependenciesReady),
        ];
        for (steps, want) in cases {
            let counts: StepCounts = steps.iter().copied().collect();
            assert_eq!(evaluate(&counts), *want, "{steps:?}");
        }
    }

    #[test]
    fn every_evaluation_outcome_is_legal_from_evaluating_results() {
        let outcomes = [
            StepCounts::default(),
            [StepState::InProgress].into_iter().collect(),
            [StepState::WaitingForRetry].into_iter().collect(),
            [StepState::Error].into_iter().collect(),
            [StepState::Pending].into_iter().collect(),
        ];
        for counts in outcomes {
            let event = evaluate(&counts);
            assert!(
                task_transition(TaskState::EvaluatingResults, event).is_ok(),
                "{event}"
            );
        }
    }
}
