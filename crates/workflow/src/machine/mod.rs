//! A run as a pure state machine: [`Run::apply`] folds one event into the state, and
//! [`Run::plan`] turns inputs (an attempt finished, a timer fired, a decision, a
//! cancel) into the events that follow from them — applying each as it goes, so that
//! later decisions in the same batch see earlier ones.
//!
//! No I/O happens here. The engine journals what `plan` returns before acting on it,
//! and recovery rebuilds a run by `apply`ing its journaled events, which is why
//! `apply` is the only place state changes and why it needs nothing but the event and
//! its timestamp.
//!
//! Here: a run's state and `apply`; `plan` decides what follows an input; `view` is what
//! a run shows (outputs, the next task, status, what is in flight).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::artifacts::ArtifactRef;
use crate::event::{Event, RunId, RunState};
use crate::executor::{AgentOutcome, AgentTask, StepError};
use crate::spec::{ApprovalDefault, MapOver, StepKind, Workflow};
use crate::status::{ApprovalStatus, ItemStatus, RunStatus, StepState, StepStatus, preview};
use crate::template::{Ref, output_lines};

mod plan;
mod view;

/// Something that happened to a run, to be turned into events.
#[derive(Debug)]
pub(crate) enum Input {
    /// [`crate::Engine::cancel`].
    Cancel,
    /// [`crate::Engine::approve`].
    Approve {
        step: usize,
        approved: bool,
        reason: Option<String>,
    },
    /// A retry backoff elapsed.
    Retry {
        step: usize,
        item: Option<u32>,
        attempt: u32,
    },
    /// An approval's timeout elapsed.
    ApprovalDeadline { step: usize },
    /// An executor answered (or the engine's timeout did).
    AttemptDone {
        step: usize,
        item: Option<u32>,
        attempt: u32,
        result: Result<AgentOutcome, StepError>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UnitPhase {
    Pending,
    Running {
        attempt: u32,
        started_ms: u64,
        deadline_ms: u64,
    },
    Backoff {
        next_attempt: u32,
        at_ms: u64,
    },
    Succeeded,
    Failed,
    Cancelled,
}

/// One attempt sequence: an agent step's, or one map item's.
#[derive(Debug, Clone)]
pub(crate) struct Unit {
    pub phase: UnitPhase,
    pub attempts: u32,
    pub tokens: u64,
    pub output: String,
    pub artifacts: Vec<ArtifactRef>,
    pub vm: Option<String>,
    pub error: Option<StepError>,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
}

impl Default for Unit {
    fn default() -> Self {
        Self {
            phase: UnitPhase::Pending,
            attempts: 0,
            tokens: 0,
            output: String::new(),
            artifacts: Vec::new(),
            vm: None,
            error: None,
            started_ms: None,
            finished_ms: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Pending,
    Waiting,
    Running,
    Succeeded,
    Skipped,
    Failed,
    Rejected,
    Cancelled,
}

#[derive(Debug, Clone)]
pub(crate) struct Decision {
    pub approved: bool,
    pub reason: Option<String>,
    pub by_timeout: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct StepRt {
    pub phase: Phase,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub skip_reason: Option<String>,
    pub error: Option<String>,
    pub approval_deadline_ms: Option<u64>,
    pub decision: Option<Decision>,
    /// A map step's items.
    pub items: Vec<String>,
    /// One for an agent step, one per item for a map step, none for an approval.
    pub units: Vec<Unit>,
    /// Units running or waiting to retry (a map's `max_parallel` counts both, so a
    /// retry never pushes it over).
    active: usize,
    /// Units that have left `Pending`.
    started_units: usize,
    succeeded_units: usize,
}

impl StepRt {
    fn new() -> Self {
        Self {
            phase: Phase::Pending,
            started_ms: None,
            finished_ms: None,
            skip_reason: None,
            error: None,
            approval_deadline_ms: None,
            decision: None,
            items: Vec::new(),
            units: Vec::new(),
            active: 0,
            started_units: 0,
            succeeded_units: 0,
        }
    }
}

/// A run's whole state.
#[derive(Debug)]
pub(crate) struct Run {
    pub id: RunId,
    pub wf: Arc<Workflow>,
    pub inputs: BTreeMap<String, String>,
    pub state: RunState,
    pub reason: Option<String>,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
    pub steps: Vec<StepRt>,
    /// Per step, needs not finished yet.
    remaining: Vec<usize>,
    /// Steps whose needs have all finished and that have not started, by topological
    /// rank: a skip cascades down a chain within one pass.
    ready: BTreeSet<(usize, usize)>,
    /// Steps finished (succeeded or skipped).
    done: usize,
    max_map_items: usize,
}

/// A journaled event that does not fit the run (a corrupt or foreign journal).
#[derive(Debug, Clone, thiserror::Error)]
#[error("event {kind} does not fit the run: {why}")]
pub(crate) struct ApplyError {
    pub kind: &'static str,
    pub why: String,
}

/// The name a map item has in tasks and messages: `per-file[3]`.
pub(crate) fn unit_name(step: &str, item: Option<u32>) -> String {
    match item {
        Some(i) => format!("{step}[{i}]"),
        None => step.to_owned(),
    }
}

impl Run {
    pub fn new(id: RunId, wf: Arc<Workflow>, max_map_items: usize) -> Self {
        let n = wf.steps.len();
        let remaining: Vec<usize> = wf.needs.iter().map(Vec::len).collect();
        let ready = (0..n)
            .filter(|&i| remaining[i] == 0)
            .map(|i| (wf.rank[i], i))
            .collect();
        Self {
            id,
            inputs: BTreeMap::new(),
            state: RunState::Running,
            reason: None,
            created_ms: 0,
            finished_ms: None,
            steps: vec![StepRt::new(); n],
            remaining,
            ready,
            done: 0,
            max_map_items,
            wf,
        }
    }

    pub(super) fn idx(&self, ev: &Event, step: &str) -> Result<usize, ApplyError> {
        self.wf.step_index(step).ok_or_else(|| ApplyError {
            kind: ev.kind(),
            why: format!("no step {step:?}"),
        })
    }

    pub(super) fn unit_mut(
        &mut self,
        ev: &Event,
        s: usize,
        item: Option<u32>,
    ) -> Result<&mut Unit, ApplyError> {
        let i = item.map_or(0, |i| i as usize);
        let n = self.steps[s].units.len();
        self.steps[s].units.get_mut(i).ok_or_else(|| ApplyError {
            kind: ev.kind(),
            why: format!("step {s} has {n} units, not {}", i + 1),
        })
    }

    pub(super) fn step_done(&mut self, s: usize) {
        self.done += 1;
        for &c in &self.wf.children[s] {
            self.remaining[c] = self.remaining[c].saturating_sub(1);
            if self.remaining[c] == 0 && self.steps[c].phase == Phase::Pending {
                self.ready.insert((self.wf.rank[c], c));
            }
        }
    }

    /// Folds one event into the state. The only place state changes.
    pub fn apply(&mut self, t: u64, ev: &Event) -> Result<(), ApplyError> {
        match ev {
            Event::RunSubmitted { inputs, .. } => {
                self.inputs = inputs.clone();
                self.created_ms = t;
            }
            Event::StepStarted { step, items } => {
                let s = self.idx(ev, step)?;
                self.ready.remove(&(self.wf.rank[s], s));
                let st = &mut self.steps[s];
                st.phase = Phase::Running;
                st.started_ms = Some(t);
                match items {
                    Some(items) => {
                        st.items = items.clone();
                        st.units = vec![Unit::default(); items.len()];
                    }
                    None => st.units = vec![Unit::default()],
                }
            }
            Event::StepSkipped { step, reason } => {
                let s = self.idx(ev, step)?;
                self.ready.remove(&(self.wf.rank[s], s));
                let st = &mut self.steps[s];
                st.phase = Phase::Skipped;
                st.skip_reason = Some(reason.clone());
                st.started_ms = Some(t);
                st.finished_ms = Some(t);
                self.step_done(s);
            }
            Event::ApprovalRequested { step, deadline_ms } => {
                let s = self.idx(ev, step)?;
                self.ready.remove(&(self.wf.rank[s], s));
                let st = &mut self.steps[s];
                st.phase = Phase::Waiting;
                st.started_ms = Some(t);
                st.approval_deadline_ms = Some(*deadline_ms);
            }
            Event::ApprovalDecided {
                step,
                approved,
                reason,
                by_timeout,
            } => {
                let s = self.idx(ev, step)?;
                let st = &mut self.steps[s];
                st.decision = Some(Decision {
                    approved: *approved,
                    reason: reason.clone(),
                    by_timeout: *by_timeout,
                });
                if !approved {
                    st.phase = Phase::Rejected;
                    st.finished_ms = Some(t);
                }
            }
            Event::AttemptStarted {
                step,
                item,
                attempt,
                deadline_ms,
                ..
            } => {
                let s = self.idx(ev, step)?;
                let u = self.unit_mut(ev, s, *item)?;
                let fresh = u.phase == UnitPhase::Pending;
                u.phase = UnitPhase::Running {
                    attempt: *attempt,
                    started_ms: t,
                    deadline_ms: *deadline_ms,
                };
                u.attempts = *attempt;
                u.started_ms.get_or_insert(t);
                if fresh {
                    let st = &mut self.steps[s];
                    st.started_units += 1;
                    st.active += 1;
                }
            }
            Event::AttemptSucceeded {
                step,
                item,
                output,
                artifacts,
                tokens,
                vm,
                ..
            } => {
                let s = self.idx(ev, step)?;
                let u = self.unit_mut(ev, s, *item)?;
                u.phase = UnitPhase::Succeeded;
                u.output = output.clone();
                u.artifacts = artifacts.clone();
                u.tokens += tokens;
                u.vm = Some(vm.clone());
                u.error = None;
                u.finished_ms = Some(t);
                let st = &mut self.steps[s];
                st.active = st.active.saturating_sub(1);
                st.succeeded_units += 1;
            }
            Event::AttemptFailed {
                step,
                item,
                attempt,
                error,
                retry_at_ms,
            } => {
                let s = self.idx(ev, step)?;
                let u = self.unit_mut(ev, s, *item)?;
                u.error = Some(error.clone());
                match retry_at_ms {
                    Some(at) => {
                        u.phase = UnitPhase::Backoff {
                            next_attempt: attempt.saturating_add(1),
                            at_ms: *at,
                        }
                    }
                    None => {
                        u.phase = UnitPhase::Failed;
                        u.finished_ms = Some(t);
                        let st = &mut self.steps[s];
                        st.active = st.active.saturating_sub(1);
                    }
                }
            }
            Event::AttemptCancelled { step, item, .. } => {
                let s = self.idx(ev, step)?;
                let u = self.unit_mut(ev, s, *item)?;
                u.phase = UnitPhase::Cancelled;
                u.finished_ms = Some(t);
                let st = &mut self.steps[s];
                st.active = st.active.saturating_sub(1);
            }
            Event::StepSucceeded { step } => {
                let s = self.idx(ev, step)?;
                let st = &mut self.steps[s];
                st.phase = Phase::Succeeded;
                st.finished_ms = Some(t);
                self.step_done(s);
            }
            Event::StepFailed { step, error } => {
                let s = self.idx(ev, step)?;
                let st = &mut self.steps[s];
                st.phase = Phase::Failed;
                st.error = Some(error.clone());
                st.finished_ms = Some(t);
            }
            Event::RunFinished { state, reason } => {
                self.state = *state;
                self.reason = reason.clone();
                self.finished_ms = Some(t);
                self.ready.clear();
                for st in &mut self.steps {
                    if matches!(st.phase, Phase::Running | Phase::Waiting) {
                        st.phase = Phase::Cancelled;
                        st.finished_ms = Some(t);
                    }
                    for u in &mut st.units {
                        if matches!(
                            u.phase,
                            UnitPhase::Running { .. } | UnitPhase::Backoff { .. }
                        ) {
                            u.phase = UnitPhase::Cancelled;
                            u.finished_ms = Some(t);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Records `ev` in `out` and applies it. Planned events always fit the run, so an
    /// error here is a bug; it is logged rather than turned into a panic.
    pub(super) fn emit(&mut self, t: u64, out: &mut Vec<Event>, ev: Event) {
        if let Err(e) = self.apply(t, &ev) {
            tracing::error!(run = %self.id, error = %e, "planned an event that does not apply");
        }
        out.push(ev);
    }
}
