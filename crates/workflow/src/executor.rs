//! What the engine asks of whoever runs agents: the [`Executor`] trait and the values
//! passing through it.
//!
//! The engine never starts a VM itself. For every attempt of an agent step (and of
//! every map item) it builds an [`AgentTask`] — the agent, the rendered prompt, the
//! artifacts to copy in, the timeout, the budget, and an idempotency key unique to
//! the attempt — and awaits [`Executor::run`]. The daemon's executor boots the VM,
//! talks to the agent, stores what it wrote under `/workspace/out/` in the
//! [`crate::ArtifactStore`], and answers with an [`AgentOutcome`] or a [`StepError`]
//! whose [`ErrorKind`] decides whether the engine retries.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::artifacts::ArtifactRef;
use crate::event::{RunId, RunState};
use crate::spec::AgentSpec;

/// One attempt of an agent step, or of one item of a map step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentTask {
    pub run: RunId,
    /// The step id (`research`), or `<id>[<index>]` for a map item (`per-file[3]`).
    pub step: String,
    /// 1-based.
    pub attempt: u32,
    /// `<run>/<step>/<attempt>`: the same for a re-attach after a restart, new for
    /// every retry. An executor uses it to recognise an attempt it already runs.
    pub idempotency_key: String,
    /// The key of `agent` in the spec's `agents`.
    pub agent_name: String,
    pub agent: AgentSpec,
    /// The prompt, templates rendered.
    pub prompt: String,
    /// Artifacts to copy in before the agent starts: (directory under
    /// `/workspace/in/`, artifact). The directory is the producing step's id, or
    /// `<id>/<index>` for a map item's files, so that items writing the same name do
    /// not collide; the file goes to `/workspace/in/<dir>/<artifact name>`.
    pub inputs: Vec<(String, ArtifactRef)>,
    /// The attempt's timeout. The engine enforces it (and calls
    /// [`Executor::cancel`]); an executor may pass it on to the VM as well.
    pub timeout: Duration,
    /// The step's budget, else the agent's; the executor enforces it and answers
    /// [`ErrorKind::Budget`] when it is spent.
    pub budget_tokens: Option<u64>,
}

/// What a successful attempt produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentOutcome {
    /// The agent's final reply.
    pub output: String,
    /// The files it wrote under `/workspace/out/`, already in the store.
    pub artifacts: Vec<ArtifactRef>,
    /// Tokens it used.
    pub tokens: u64,
    /// Which VM ran it (for the journal and for people reading it).
    pub vm: String,
}

/// How an attempt failed: decides whether the engine retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The attempt ran past its timeout. Retried.
    Timeout,
    /// The token budget is spent. Not retried: another attempt would spend it again.
    Budget,
    /// A failure that may pass (VM boot, network, model overloaded). Retried.
    Transient,
    /// After a restart, the attempt was no longer running. Retried.
    Lost,
    /// A failure that will not pass (bad image, agent refused, invalid output). Not
    /// retried.
    Fatal,
}

impl ErrorKind {
    /// Whether another attempt may succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Timeout | ErrorKind::Transient | ErrorKind::Lost
        )
    }

    /// `timeout`, `budget`, `transient`, `lost`, `fatal`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Budget => "budget",
            ErrorKind::Transient => "transient",
            ErrorKind::Lost => "lost",
            ErrorKind::Fatal => "fatal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct StepError {
    pub kind: ErrorKind,
    pub message: String,
}

impl StepError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transient, message)
    }
    pub fn fatal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Fatal, message)
    }
    pub fn budget(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Budget, message)
    }
    pub fn lost(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Lost, message)
    }
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }
}

/// Runs agent attempts. Implemented by the daemon (VMs) and by tests (scripts).
///
/// The engine may drop a `run`/`reattach` future at any time (timeout, cancel,
/// shutdown); after a timeout or a cancel it then calls [`Executor::cancel`] for the
/// same task, after a shutdown it does not (the attempt is re-attached at the next
/// open).
pub trait Executor: Send + Sync + 'static {
    /// Runs one attempt of an agent step (its VM, its prompt, its inputs); returns the
    /// reply text, the files it wrote under /workspace/out/ as artifacts, and the
    /// tokens it used.
    fn run(&self, task: AgentTask) -> impl Future<Output = Result<AgentOutcome, StepError>> + Send;

    /// After a restart: the attempt was in flight when the engine stopped. Wait for it
    /// again if it still runs (same idempotency key), or fail it (StepError kind Lost →
    /// retried like a transient error).
    fn reattach(
        &self,
        task: AgentTask,
    ) -> impl Future<Output = Result<AgentOutcome, StepError>> + Send;

    /// Stops an attempt (timed out, or its run was cancelled or failed): remove its
    /// VM. Called once the engine no longer awaits it.
    fn cancel(&self, task: &AgentTask) -> impl Future<Output = ()> + Send;

    /// A run reached a final state: release what the executor keeps per run (the
    /// long-lived VMs of `vm: reuse` agents). Called once per run, after its
    /// `run_finished` event is journaled; the default does nothing.
    fn run_finished(&self, run: &RunId, state: RunState) -> impl Future<Output = ()> + Send {
        let _ = (run, state);
        std::future::ready(())
    }
}
