//! Transitions, task-state changes and outbox records buffered during one store operation
//! (each transition checked against the state tables as it is recorded) and written by the
//! backend, when the operation ends, in as few statements as it can: round trips, not the
//! database's own work, dominate the engine's hot path.

use crate::Result;
use crate::clock::Millis;
use crate::state::{StepEvent, StepState, TaskEvent, TaskState, step_transition, task_transition};

pub(crate) struct StepRow {
    pub(crate) step_uuid: String,
    pub(crate) task_uuid: String,
    pub(crate) from: Option<StepState>,
    pub(crate) to: StepState,
    pub(crate) event: &'static str,
    pub(crate) actor: String,
    pub(crate) reason: Option<String>,
    pub(crate) attempt: Option<u32>,
    pub(crate) at: Millis,
}

pub(crate) struct TaskRow {
    pub(crate) task_uuid: String,
    pub(crate) from: Option<TaskState>,
    pub(crate) to: TaskState,
    pub(crate) event: &'static str,
    pub(crate) actor: String,
    pub(crate) reason: Option<String>,
    pub(crate) metadata: Option<String>,
    pub(crate) at: Millis,
}

/// The buffer. Create one per operation and `flush` it before the transaction commits.
#[derive(Default)]
pub(crate) struct Journal {
    steps: Vec<StepRow>,
    tasks: Vec<TaskRow>,
    /// Latest state per task changed in this operation, not yet written to `tasks`.
    task_states: Vec<(String, TaskState, Millis)>,
    /// Domain events for the outbox (SPEC §10), written with the results that fired them.
    outbox: Vec<crate::events::DomainEvent>,
    /// An earlier statement of this operation enqueued steps without announcing them: the
    /// flush announces them.
    pub(crate) work_enqueued_before: bool,
}

impl Journal {
    /// Records a `pending` step's move to `enqueued`.
    pub(crate) fn step_enqueued(
        &mut self,
        step_uuid: &str,
        task_uuid: &str,
        actor: &str,
        at: Millis,
    ) -> Result<()> {
        self.step_moves(
            step_uuid,
            task_uuid,
            StepState::Pending,
            &[StepEvent::Enqueue],
            None,
            actor,
            None,
            at,
        )
        .map(|_| ())
    }

    /// Records a new step's first row (`create`, into `pending`).
    pub(crate) fn step_created(
        &mut self,
        step_uuid: &str,
        task_uuid: &str,
        actor: &str,
        at: Millis,
    ) {
        self.steps.push(StepRow {
            step_uuid: step_uuid.to_string(),
            task_uuid: task_uuid.to_string(),
            from: None,
            to: StepState::Pending,
            event: "create",
            actor: actor.to_string(),
            reason: None,
            attempt: None,
            at,
        });
    }

    /// Records a new task's first row (`create`, into `pending`).
    pub(crate) fn task_created(&mut self, task_uuid: &str, actor: &str, at: Millis) {
        self.tasks.push(TaskRow {
            task_uuid: task_uuid.to_string(),
            from: None,
            to: TaskState::Pending,
            event: "create",
            actor: actor.to_string(),
            reason: None,
            metadata: None,
            at,
        });
    }

    /// Walks a step through `events` (each checked against the state table) and records every
    /// transition; returns the final state, which the caller writes to the step row.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn step_moves(
        &mut self,
        step_uuid: &str,
        task_uuid: &str,
        from: StepState,
        events: &[StepEvent],
        attempt: Option<u32>,
        actor: &str,
        reason: Option<&str>,
        at: Millis,
    ) -> Result<StepState> {
        let mut state = from;
        for ev in events {
            let to = step_transition(state, *ev)?;
            self.steps.push(StepRow {
                step_uuid: step_uuid.to_string(),
                task_uuid: task_uuid.to_string(),
                from: Some(state),
                to,
                event: ev.as_str(),
                actor: actor.to_string(),
                reason: reason.map(str::to_string),
                attempt,
                at,
            });
            state = to;
        }
        Ok(state)
    }

    /// Walks a task through `events`, recording every transition; the task row is updated at
    /// flush time.
    pub(crate) fn task_moves(
        &mut self,
        task_uuid: &str,
        from: TaskState,
        events: &[TaskEvent],
        actor: &str,
        reason: Option<&str>,
        at: Millis,
    ) -> Result<TaskState> {
        let mut state = from;
        for ev in events {
            let to = task_transition(state, *ev)?;
            self.tasks.push(TaskRow {
                task_uuid: task_uuid.to_string(),
                from: Some(state),
                to,
                event: ev.as_str(),
                actor: actor.to_string(),
                reason: reason.map(str::to_string),
                metadata: None,
                at,
            });
            state = to;
        }
        if state != from {
            match self.task_states.iter_mut().find(|(t, _, _)| t == task_uuid) {
                Some(entry) => *entry = (task_uuid.to_string(), state, at),
                None => self.task_states.push((task_uuid.to_string(), state, at)),
            }
        }
        Ok(state)
    }

    /// Queues an event's outbox record.
    pub(crate) fn outbox(&mut self, event: crate::events::DomainEvent) {
        self.outbox.push(event);
    }

    /// [`Journal::task_moves`] for one event, recording `metadata` (a JSON object) on the
    /// transition.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn task_move_with_metadata(
        &mut self,
        task_uuid: &str,
        from: TaskState,
        event: TaskEvent,
        actor: &str,
        reason: Option<&str>,
        metadata: &serde_json::Value,
        at: Millis,
    ) -> Result<TaskState> {
        let state = self.task_moves(task_uuid, from, &[event], actor, reason, at)?;
        if let Some(row) = self.tasks.last_mut() {
            row.metadata = Some(metadata.to_string());
        }
        Ok(state)
    }

    /// The task's state as changed earlier in this operation, if it was.
    pub(crate) fn task_state(&self, task_uuid: &str) -> Option<TaskState> {
        self.task_states
            .iter()
            .find(|(t, _, _)| t == task_uuid)
            .map(|(_, s, _)| *s)
    }

    /// Takes everything buffered, in write order: step rows, task rows, task-state changes,
    /// outbox records.
    pub(crate) fn drain(&mut self) -> Drained {
        Drained {
            steps: std::mem::take(&mut self.steps),
            tasks: std::mem::take(&mut self.tasks),
            task_states: std::mem::take(&mut self.task_states),
            outbox: std::mem::take(&mut self.outbox),
            work_enqueued_before: std::mem::take(&mut self.work_enqueued_before),
        }
    }
}

/// What a journal held, for a backend to write.
pub(crate) struct Drained {
    pub(crate) steps: Vec<StepRow>,
    pub(crate) tasks: Vec<TaskRow>,
    pub(crate) task_states: Vec<(String, TaskState, Millis)>,
    pub(crate) outbox: Vec<crate::events::DomainEvent>,
    /// Only PostgreSQL announces work to other processes.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) work_enqueued_before: bool,
}
