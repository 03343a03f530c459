//! What [`crate::Engine::status`] and [`crate::Engine::list`] report: plain,
//! serializable snapshots for the daemon to hand out as JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::artifacts::ArtifactRef;
use crate::event::{RunId, RunState};
use crate::spec::ApprovalDefault;

/// A run at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStatus {
    pub run: RunId,
    /// The workflow's `metadata.name`.
    pub name: String,
    pub state: RunState,
    /// Why it failed, was rejected or was cancelled.
    pub reason: Option<String>,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
    /// Until it finished, or until now.
    pub duration_ms: u64,
    /// The inputs, defaults applied.
    pub inputs: BTreeMap<String, String>,
    /// Tokens of every attempt of every step.
    pub tokens: u64,
    /// In spec order.
    pub steps: Vec<StepStatus>,
}

/// Where a step (or a map item) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Not started: its needs have not all finished (or the run ended first).
    Pending,
    /// An approval waiting for a decision.
    Waiting,
    /// An attempt is running (a map: items are in progress).
    Running,
    /// Between a failed attempt and the next.
    Retrying,
    Succeeded,
    /// `when` was false, or all its needs were skipped.
    Skipped,
    Failed,
    /// An approval that was rejected.
    Rejected,
    /// Stopped because the run ended.
    Cancelled,
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepStatus {
    pub id: String,
    /// `agent`, `approval` or `map`.
    pub kind: String,
    pub state: StepState,
    pub needs: Vec<String>,
    /// Attempts started (a map: over all items).
    pub attempts: u32,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// Until it finished, or until now.
    pub duration_ms: Option<u64>,
    pub tokens: u64,
    /// The start of the output (see [`crate::EngineConfig::output_preview_bytes`]);
    /// [`crate::Engine::output`] has all of it.
    pub output: String,
    /// The whole output's length in bytes.
    pub output_bytes: usize,
    /// The last error (of the last attempt, or why the step failed).
    pub error: Option<String>,
    /// Why it was skipped.
    pub skip_reason: Option<String>,
    /// While retrying: when the next attempt starts.
    pub retry_at_ms: Option<u64>,
    /// While running: when the attempt times out; while waiting: when the approval
    /// default applies.
    pub deadline_ms: Option<u64>,
    /// The VM of the last successful attempt.
    pub vm: Option<String>,
    pub approval: Option<ApprovalStatus>,
    /// A map step's items.
    pub items: Vec<ItemStatus>,
    /// What the step produced (a map: every item's).
    pub artifacts: Vec<ArtifactRef>,
}

/// An approval step's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalStatus {
    pub deadline_ms: u64,
    /// What the timeout decides.
    pub default: ApprovalDefault,
    /// `None` while waiting.
    pub approved: Option<bool>,
    pub reason: Option<String>,
    /// Decided by the timeout rather than a person.
    pub by_timeout: bool,
}

/// One item of a map step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemStatus {
    pub index: u32,
    pub item: String,
    pub state: StepState,
    pub attempts: u32,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub tokens: u64,
    /// Preview, as for steps.
    pub output: String,
    pub error: Option<String>,
    pub retry_at_ms: Option<u64>,
    pub vm: Option<String>,
}

/// A line of [`crate::Engine::list`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSummary {
    pub run: RunId,
    pub name: String,
    pub state: RunState,
    pub reason: Option<String>,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
}

/// The first `max` bytes of `s`, cut at a character boundary.
pub(crate) fn preview(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
