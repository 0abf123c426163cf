//! The dead-letter record (SPEC §9): one entry per task that a lifecycle limit or the
//! staleness threshold moved to `error`, with the reason, the state it was in and a snapshot
//! of the task and its steps at that moment.
//!
//! An entry is an investigation record. Resolving it ([`Tasker::dlq_resolve`]) records what
//! an operator concluded; it never changes the task, which stays `error` (a new task is the
//! way to run the work again).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::Millis;
use crate::state::TaskState;
use crate::{Error, Result, Tasker};

/// Declares a fieldless enum with one snake_case name per variant, used by `as_str`,
/// `FromStr`, `Display` and serde alike.
macro_rules! text_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text)] $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The snake_case name, as stored in SQL and sent in JSON.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl FromStr for $name {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == s).ok_or_else(|| {
                    let names: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                    Error::validation(format!(
                        "unknown {} `{s}`; expected one of {}",
                        $what,
                        names.join(", ")
                    ))
                })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum! {
    /// Why a task was dead-lettered: the template `lifecycle` limit it exceeded (named like
    /// the template key) or the engine-wide staleness threshold.
    pub enum DlqReason ("DLQ reason") {
        /// `lifecycle.max_duration_minutes`: too long since the task was created.
        MaxDuration => "max_duration_minutes",
        /// `lifecycle.max_waiting_for_dependencies_minutes`.
        MaxWaitingForDependencies => "max_waiting_for_dependencies_minutes",
        /// `lifecycle.max_waiting_for_retry_minutes`.
        MaxWaitingForRetry => "max_waiting_for_retry_minutes",
        /// `lifecycle.max_steps_in_process_minutes`.
        MaxStepsInProcess => "max_steps_in_process_minutes",
        /// No progress for longer than the configured staleness threshold
        /// (`TASKER_STALENESS_THRESHOLD_MINUTES`), whatever the state.
        Staleness => "staleness",
    }
}

text_enum! {
    /// What an operator concluded about a DLQ entry.
    pub enum DlqResolution ("DLQ resolution status") {
        /// Not investigated yet (every new entry); setting it again re-opens an entry.
        Pending => "pending",
        /// The problem was dealt with by hand (e.g. the work was done elsewhere or re-run).
        ManuallyResolved => "manually_resolved",
        /// Investigated: the work cannot succeed and is abandoned for good.
        PermanentlyFailed => "permanently_failed",
        /// The work is no longer wanted.
        Cancelled => "cancelled",
    }
}

/// One dead-letter entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct DlqEntry {
    /// The entry's id.
    pub dlq_entry_uuid: String,
    /// The task that was moved to `error`.
    pub task_uuid: String,
    /// The task's namespace.
    pub namespace: String,
    /// The task's template name.
    pub name: String,
    /// The task's template version.
    pub version: String,
    /// Which limit was exceeded.
    pub reason: DlqReason,
    /// The limit, its value and how long the task had been there, for people.
    pub message: String,
    /// The task's state when the limit was found exceeded.
    pub original_state: TaskState,
    /// The task and every step as they were before the move: `{task, limits, steps}`.
    /// `None` in listings (read one entry for it: a task with many steps has a big snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Value>,
    /// The investigation's outcome so far.
    pub resolution_status: DlqResolution,
    /// The operator's notes.
    pub resolution_notes: Option<String>,
    /// Who recorded the resolution.
    pub resolved_by: Option<String>,
    /// When the resolution was recorded (`None` while pending).
    pub resolved_at: Option<Millis>,
    /// When the task was dead-lettered.
    pub created_at: Millis,
    /// Last change of the entry.
    pub updated_at: Millis,
}

/// Which entries [`Tasker::dlq_list`] returns (newest first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DlqFilter {
    /// Only entries with this resolution status.
    pub status: Option<DlqResolution>,
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Only this task's entries.
    pub task_uuid: Option<String>,
    /// Only this reason.
    pub reason: Option<DlqReason>,
    /// Page size (default 50, at most 1000).
    pub limit: Option<u32>,
    /// Entries to skip.
    pub offset: Option<u32>,
}

/// Counts over every DLQ entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct DlqStats {
    /// All entries.
    pub total: u64,
    /// By reason (`max_waiting_for_retry_minutes`, `staleness`, ...).
    pub by_reason: BTreeMap<String, u64>,
    /// By resolution status (`pending`, `manually_resolved`, ...).
    pub by_resolution_status: BTreeMap<String, u64>,
    /// By the state the task was in.
    pub by_original_state: BTreeMap<String, u64>,
    /// By namespace.
    pub by_namespace: BTreeMap<String, u64>,
    /// When the oldest entry still `pending` was created.
    pub oldest_pending_at: Option<Millis>,
}

/// A task that the lifecycle check moved to `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleExceeded {
    /// The task.
    pub task_uuid: String,
    /// The state it was in.
    pub original_state: TaskState,
    /// Which limit it exceeded.
    pub reason: DlqReason,
    /// The DLQ entry recording it.
    pub dlq_entry_uuid: String,
}

impl Tasker {
    /// DLQ entries matching `filter`, newest first, without their snapshots.
    pub async fn dlq_list(&self, filter: &DlqFilter) -> Result<Vec<DlqEntry>> {
        self.inner.store.list_dlq(filter).await
    }

    /// One DLQ entry with its snapshot; `not_found` for an unknown id.
    pub async fn dlq_get(&self, dlq_entry_uuid: &str) -> Result<DlqEntry> {
        self.inner.store.get_dlq(dlq_entry_uuid).await
    }

    /// Counts by reason, resolution status, original state and namespace.
    pub async fn dlq_stats(&self) -> Result<DlqStats> {
        self.inner.store.dlq_stats().await
    }

    /// Records an investigation outcome (`notes`, when given, replace earlier notes); the
    /// task is not changed. Returns the updated entry.
    pub async fn dlq_resolve(
        &self,
        dlq_entry_uuid: &str,
        status: DlqResolution,
        notes: Option<&str>,
        by: &str,
    ) -> Result<DlqEntry> {
        self.inner
            .store
            .resolve_dlq(dlq_entry_uuid, status, notes, by, self.now())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_agree_across_as_str_from_str_and_serde() {
        for r in DlqReason::ALL {
            assert_eq!(r.as_str().parse::<DlqReason>().unwrap(), *r);
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
        for s in DlqResolution::ALL {
            assert_eq!(s.as_str().parse::<DlqResolution>().unwrap(), *s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        let e = "resolved".parse::<DlqResolution>().unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Validation);
        assert!(e.message.contains("manually_resolved"), "{e}");
    }
}
