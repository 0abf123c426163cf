//! `GET /v1/tasks/{uuid}/events`: a task's transitions as server-sent events.
//!
//! The stream sends every transition recorded so far, then new ones as they happen, and ends
//! with an `end` event once the task is terminal. It sleeps on the engine's task-change
//! notifications ([`crate::Tasker::wait_until`]); a change made by another process on the same
//! database is seen within the engine's poll interval, the bounded fallback.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde_json::json;

use super::AppState;
use super::error::{ApiResult, ErrorBody};
use crate::state::TaskState;
use crate::task::Transition;
use crate::{ErrorKind, Tasker};

struct Feed {
    tasker: Tasker,
    uuid: String,
    /// The highest task-transition sort key sent.
    task_seen: i64,
    /// Step transitions sent, by (step name, sort key).
    steps_seen: HashSet<(String, i64)>,
    queue: VecDeque<Event>,
    state: Option<TaskState>,
    started: bool,
    done: bool,
    poll: Duration,
}

fn event(kind: &str, data: &impl serde::Serialize) -> Event {
    Event::default()
        .event(kind)
        .data(serde_json::to_string(data).unwrap_or_else(|_| "{}".into()))
}

impl Feed {
    /// Queues what happened since the last look; ends the feed on a terminal state.
    async fn refill(&mut self) {
        // The state is read first: if it is terminal, the transitions read next include the
        // one that made it so.
        let state = match self.tasker.store().task_state(&self.uuid).await {
            Ok(s) => s,
            Err(e) => return self.fail(e),
        };
        let (tasks, steps) = match (
            self.tasker.task_transitions(&self.uuid).await,
            self.tasker.step_transitions(&self.uuid, None).await,
        ) {
            (Ok(t), Ok(s)) => (t, s),
            (Err(e), _) | (_, Err(e)) => return self.fail(e),
        };
        let mut fresh: Vec<(&str, Transition)> = Vec::new();
        for t in tasks {
            if t.sort_key > self.task_seen {
                self.task_seen = t.sort_key;
                fresh.push(("task_transition", t));
            }
        }
        for t in steps {
            let key = (t.step_name.clone().unwrap_or_default(), t.sort_key);
            if self.steps_seen.insert(key) {
                fresh.push(("step_transition", t));
            }
        }
        fresh.sort_by_key(|(_, t)| t.created_at);
        for (kind, t) in &fresh {
            self.queue.push_back(event(kind, t));
        }
        self.state = Some(state);
        if state.is_terminal() {
            self.queue.push_back(event(
                "end",
                &json!({"task_uuid": self.uuid, "status": state}),
            ));
            self.done = true;
        }
    }

    fn fail(&mut self, e: crate::Error) {
        let message = match e.kind {
            ErrorKind::Store | ErrorKind::Internal => {
                tracing::error!("event stream of task {}: {}", self.uuid, e.message);
                "the event stream failed; reconnect to resume".to_string()
            }
            _ => e.message,
        };
        self.queue.push_back(event(
            "error",
            &json!({"code": e.kind.code(), "message": message}),
        ));
        self.done = true;
    }

    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                return Some((Ok(e), self));
            }
            if self.done {
                return None;
            }
            if self.started {
                let last = self.state;
                // Returns on a change of state or after `poll` (the fallback that also picks
                // up step transitions that do not move the task).
                if let Err(e) = self
                    .tasker
                    .wait_until(&self.uuid, move |s| Some(s) != last, Some(self.poll))
                    .await
                    && e.kind != ErrorKind::Timeout
                {
                    self.fail(e);
                    continue;
                }
            }
            self.started = true;
            self.refill().await;
        }
    }
}

/// Server-sent events of a task's transitions: `task_transition` and `step_transition`
/// (data: the transition as JSON), then `end` (data: `{task_uuid, status}`) once the task is
/// terminal; `error` if the stream cannot go on.
#[utoipa::path(
    get, path = "/v1/tasks/{uuid}/events", tag = "tasks",
    params(("uuid" = String, Path, description = "The task's id")),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = String),
        (status = 404, description = "Unknown task", body = ErrorBody),
    ),
)]
pub(crate) async fn stream(
    State(s): State<AppState>,
    Path(uuid): Path<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    s.tasker.store().task_state(&uuid).await?;
    let feed = Feed {
        poll: s.tasker.config().poll_interval,
        tasker: s.tasker.clone(),
        uuid,
        task_seen: i64::MIN,
        steps_seen: HashSet::new(),
        queue: VecDeque::new(),
        state: None,
        started: false,
        done: false,
    };
    Ok(Sse::new(futures_util::stream::unfold(feed, Feed::next)).keep_alive(KeepAlive::default()))
}
