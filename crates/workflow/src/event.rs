//! Run ids, run states and the journal's events.
//!
//! A run's state is nothing but the fold of its events: every change is an [`Event`]
//! journaled before it takes effect, and replaying a run's events rebuilds exactly
//! the state the engine had (the engine's `machine` module).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::artifacts::ArtifactRef;
use crate::executor::StepError;

/// A run's id, 28 lowercase hex digits: 12 of its creation time in milliseconds, 4 of
/// a per-process sequence, 12 random — so ids sort by creation and are not guessable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RunId(String);

/// Not a run id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a run id: {0:?} (want 28 lowercase hex characters)")]
pub struct BadRunId(pub String);

impl RunId {
    pub(crate) fn generate(now_ms: u64) -> Self {
        use std::sync::atomic::{AtomicU16, Ordering};
        // Orders ids made within one millisecond by this process.
        static SEQ: AtomicU16 = AtomicU16::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let mut r = [0u8; 6];
        if getrandom::fill(&mut r).is_err() {
            // No entropy source: the time and the sequence still make ids unique
            // within the process, which is what matters.
            r = [0; 6];
        }
        Self(format!(
            "{:012x}{seq:04x}{}",
            now_ms & 0xffff_ffff_ffff,
            hex::encode(r)
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RunId {
    type Err = BadRunId;
    fn from_str(s: &str) -> Result<Self, BadRunId> {
        if s.len() == 28
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Self(s.to_owned()))
        } else {
            Err(BadRunId(s.chars().take(64).collect()))
        }
    }
}

impl TryFrom<String> for RunId {
    type Error = BadRunId;
    fn try_from(s: String) -> Result<Self, BadRunId> {
        s.parse()
    }
}

impl From<RunId> for String {
    fn from(r: RunId) -> String {
        r.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    /// Every step succeeded or was skipped.
    Succeeded,
    /// A step failed after its retries.
    Failed,
    /// An approval was rejected (or timed out with `default: reject`).
    Rejected,
    /// [`crate::Engine::cancel`].
    Cancelled,
}

impl RunState {
    pub fn is_final(self) -> bool {
        self != RunState::Running
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Rejected => "rejected",
            RunState::Cancelled => "cancelled",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => RunState::Running,
            "succeeded" => RunState::Succeeded,
            "failed" => RunState::Failed,
            "rejected" => RunState::Rejected,
            "cancelled" => RunState::Cancelled,
            _ => return None,
        })
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One state change of a run. `step` is a step id; `item` the index of a map item
/// (absent for agent steps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The run was accepted: its inputs (defaults applied) and the hash of its spec
    /// (the spec itself is in the journal's `runs` table).
    RunSubmitted {
        name: String,
        inputs: BTreeMap<String, String>,
        spec_sha256: String,
    },
    /// An agent or map step started; a map step with its items, resolved now.
    StepStarted {
        step: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        items: Option<Vec<String>>,
    },
    /// A step will not run: its `when` was false or all its needs were skipped.
    StepSkipped { step: String, reason: String },
    /// An approval step started waiting; `deadline_ms` applies its default.
    ApprovalRequested { step: String, deadline_ms: u64 },
    /// An approval was decided, by a person or by its timeout.
    ApprovalDecided {
        step: String,
        approved: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        by_timeout: bool,
    },
    /// An attempt was handed to the executor; it times out at `deadline_ms`.
    AttemptStarted {
        step: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        item: Option<u32>,
        attempt: u32,
        idempotency_key: String,
        deadline_ms: u64,
    },
    /// An attempt succeeded.
    AttemptSucceeded {
        step: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        item: Option<u32>,
        attempt: u32,
        output: String,
        artifacts: Vec<ArtifactRef>,
        tokens: u64,
        vm: String,
    },
    /// An attempt failed; with `retry_at_ms` the next attempt starts then, without it
    /// the step (or map item) has failed for good.
    AttemptFailed {
        step: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        item: Option<u32>,
        attempt: u32,
        error: StepError,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_at_ms: Option<u64>,
    },
    /// A running attempt was stopped because its run ended (failed, rejected,
    /// cancelled).
    AttemptCancelled {
        step: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        item: Option<u32>,
        attempt: u32,
    },
    /// A step finished successfully (for an approval: approved).
    StepSucceeded { step: String },
    /// A step failed for good.
    StepFailed { step: String, error: String },
    /// The run reached a final state.
    RunFinished {
        state: RunState,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl Event {
    /// The event's `type` tag (`step_started`, …), also the journal's `kind` column.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::RunSubmitted { .. } => "run_submitted",
            Event::StepStarted { .. } => "step_started",
            Event::StepSkipped { .. } => "step_skipped",
            Event::ApprovalRequested { .. } => "approval_requested",
            Event::ApprovalDecided { .. } => "approval_decided",
            Event::AttemptStarted { .. } => "attempt_started",
            Event::AttemptSucceeded { .. } => "attempt_succeeded",
            Event::AttemptFailed { .. } => "attempt_failed",
            Event::AttemptCancelled { .. } => "attempt_cancelled",
            Event::StepSucceeded { .. } => "step_succeeded",
            Event::StepFailed { .. } => "step_failed",
            Event::RunFinished { .. } => "run_finished",
        }
    }

    /// The step the event is about, if any.
    pub fn step(&self) -> Option<&str> {
        match self {
            Event::RunSubmitted { .. } | Event::RunFinished { .. } => None,
            Event::StepStarted { step, .. }
            | Event::StepSkipped { step, .. }
            | Event::ApprovalRequested { step, .. }
            | Event::ApprovalDecided { step, .. }
            | Event::AttemptStarted { step, .. }
            | Event::AttemptSucceeded { step, .. }
            | Event::AttemptFailed { step, .. }
            | Event::AttemptCancelled { step, .. }
            | Event::StepSucceeded { step }
            | Event::StepFailed { step, .. } => Some(step),
        }
    }
}

/// An event as journaled: which run, its place in the run (`seq`, from 1, no gaps)
/// and when (Unix ms, the engine's clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEvent {
    pub run: RunId,
    pub seq: u64,
    pub time_ms: u64,
    pub event: Event,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn run_ids() {
        let a = RunId::generate(0x0123_4567_89ab);
        assert_eq!(a.as_str().len(), 28);
        assert!(a.as_str().starts_with("0123456789ab"));
        assert_eq!(a.as_str().parse::<RunId>(), Ok(a.clone()));
        assert_ne!(RunId::generate(1), RunId::generate(1));
        for bad in ["", "../x", &"A".repeat(28), &"a".repeat(27)] {
            assert!(bad.parse::<RunId>().is_err());
        }
        let j = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<RunId>(&j).unwrap(), a);
        assert!(serde_json::from_str::<RunId>("\"nope\"").is_err());
    }

    #[test]
    fn events_round_trip_with_type_tags() {
        let e = Event::AttemptFailed {
            step: "a".into(),
            item: Some(2),
            attempt: 1,
            error: StepError::transient("boot"),
            retry_at_ms: Some(5),
        };
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(j["type"], "attempt_failed");
        assert_eq!(j["error"]["kind"], "transient");
        assert_eq!(serde_json::from_value::<Event>(j).unwrap(), e);
        assert_eq!(e.kind(), "attempt_failed");
    }
}
