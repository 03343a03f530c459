//! A run as a pure state machine: [`Run::apply`] folds one event into the state, and
//! [`Run::plan`] turns inputs (an attempt finished, a timer fired, a decision, a
//! cancel) into the events that follow from them — applying each as it goes, so that
//! later decisions in the same batch see earlier ones.
//!
//! No I/O happens here. The engine journals what `plan` returns before acting on it,
//! and recovery rebuilds a run by `apply`ing its journaled events, which is why
//! `apply` is the only place state changes and why it needs nothing but the event and
//! its timestamp.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::artifacts::ArtifactRef;
use crate::event::{Event, RunId, RunState};
use crate::executor::{AgentOutcome, AgentTask, StepError};
use crate::spec::{ApprovalDefault, MapOver, StepKind, Workflow};
use crate::status::{ApprovalStatus, ItemStatus, RunStatus, StepState, StepStatus, preview};
use crate::template::{Ref, output_lines};

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

    fn idx(&self, ev: &Event, step: &str) -> Result<usize, ApplyError> {
        self.wf.step_index(step).ok_or_else(|| ApplyError {
            kind: ev.kind(),
            why: format!("no step {step:?}"),
        })
    }

    fn unit_mut(
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

    fn step_done(&mut self, s: usize) {
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
    fn emit(&mut self, t: u64, out: &mut Vec<Event>, ev: Event) {
        if let Err(e) = self.apply(t, &ev) {
            tracing::error!(run = %self.id, error = %e, "planned an event that does not apply");
        }
        out.push(ev);
    }

    /// Turns `inputs` into events (already applied), then starts whatever became
    /// ready. `rand` gives uniform random u64s for retry jitter.
    pub fn plan(
        &mut self,
        now: u64,
        inputs: Vec<Input>,
        rand: &mut dyn FnMut() -> u64,
    ) -> Vec<Event> {
        let mut out = Vec::new();
        for input in inputs {
            if self.state.is_final() {
                break;
            }
            self.input(now, input, rand, &mut out);
        }
        if !self.state.is_final() {
            self.schedule(now, &mut out);
        }
        out
    }

    fn input(
        &mut self,
        now: u64,
        input: Input,
        rand: &mut dyn FnMut() -> u64,
        out: &mut Vec<Event>,
    ) {
        match input {
            Input::Cancel => {
                self.finish(now, RunState::Cancelled, Some("cancelled".to_owned()), out)
            }
            Input::Approve {
                step,
                approved,
                reason,
            } => {
                if self
                    .steps
                    .get(step)
                    .is_some_and(|s| s.phase == Phase::Waiting)
                {
                    self.decide(now, step, approved, reason, false, out);
                }
            }
            Input::ApprovalDeadline { step } => {
                let Some(st) = self.steps.get(step) else {
                    return;
                };
                if st.phase != Phase::Waiting {
                    return;
                }
                let StepKind::Approval { default } = self.wf.steps[step].kind else {
                    return;
                };
                let timeout = crate::spec::human(self.wf.steps[step].timeout);
                self.decide(
                    now,
                    step,
                    default == ApprovalDefault::Approve,
                    Some(format!("no decision within {timeout}")),
                    true,
                    out,
                );
            }
            Input::Retry {
                step,
                item,
                attempt,
            } => {
                let Some(u) = self.unit(step, item) else {
                    return;
                };
                if !matches!(u.phase, UnitPhase::Backoff { next_attempt, .. } if next_attempt == attempt)
                {
                    return;
                }
                self.start_attempt(now, step, item, attempt, out);
            }
            Input::AttemptDone {
                step,
                item,
                attempt,
                result,
            } => {
                let Some(u) = self.unit(step, item) else {
                    return;
                };
                if !matches!(u.phase, UnitPhase::Running { attempt: a, .. } if a == attempt) {
                    // A stale answer: the attempt was cancelled or already answered.
                    return;
                }
                let id = self.wf.steps[step].id.clone();
                match result {
                    Ok(o) => {
                        self.emit(
                            now,
                            out,
                            Event::AttemptSucceeded {
                                step: id,
                                item,
                                attempt,
                                output: o.output,
                                artifacts: o.artifacts,
                                tokens: o.tokens,
                                vm: o.vm,
                            },
                        );
                        self.unit_succeeded(now, step, out);
                    }
                    Err(error) => {
                        let Some(agent) = self.wf.steps[step].kind.agent_step() else {
                            return;
                        };
                        let retry = &agent.retry;
                        let retry_at_ms = (error.kind.retryable() && attempt < retry.max_attempts)
                            .then(|| {
                                let max = u64::try_from(retry.backoff(attempt).as_millis())
                                    .unwrap_or(u64::MAX);
                                let wait = if retry.jitter && max > 0 {
                                    max.checked_add(1).map_or(max, |m| rand() % m)
                                } else {
                                    max
                                };
                                now.saturating_add(wait)
                            });
                        let message = error.to_string();
                        self.emit(
                            now,
                            out,
                            Event::AttemptFailed {
                                step: id.clone(),
                                item,
                                attempt,
                                error,
                                retry_at_ms,
                            },
                        );
                        if retry_at_ms.is_none() {
                            let what = match item {
                                Some(i) => {
                                    let it = self.steps[step]
                                        .items
                                        .get(i as usize)
                                        .cloned()
                                        .unwrap_or_default();
                                    format!(
                                        "item {i} ({it:?}) failed after {attempt} attempt(s): {message}"
                                    )
                                }
                                None => format!("failed after {attempt} attempt(s): {message}"),
                            };
                            self.emit(
                                now,
                                out,
                                Event::StepFailed {
                                    step: id.clone(),
                                    error: what.clone(),
                                },
                            );
                            self.finish(
                                now,
                                RunState::Failed,
                                Some(format!("step {id:?} {what}")),
                                out,
                            );
                        }
                    }
                }
            }
        }
    }

    fn unit(&self, step: usize, item: Option<u32>) -> Option<&Unit> {
        self.steps
            .get(step)?
            .units
            .get(item.map_or(0, |i| i as usize))
    }

    fn decide(
        &mut self,
        now: u64,
        step: usize,
        approved: bool,
        reason: Option<String>,
        by_timeout: bool,
        out: &mut Vec<Event>,
    ) {
        let id = self.wf.steps[step].id.clone();
        self.emit(
            now,
            out,
            Event::ApprovalDecided {
                step: id.clone(),
                approved,
                reason: reason.clone(),
                by_timeout,
            },
        );
        if approved {
            self.emit(now, out, Event::StepSucceeded { step: id });
        } else {
            let why = match reason {
                Some(r) => format!("step {id:?} was rejected: {r}"),
                None => format!("step {id:?} was rejected"),
            };
            self.finish(now, RunState::Rejected, Some(why), out);
        }
    }

    fn unit_succeeded(&mut self, now: u64, step: usize, out: &mut Vec<Event>) {
        let st = &self.steps[step];
        if st.succeeded_units == st.units.len() {
            let id = self.wf.steps[step].id.clone();
            self.emit(now, out, Event::StepSucceeded { step: id });
        } else {
            self.start_items(now, step, out);
        }
    }

    /// Ends the run: stops running attempts, then the final event.
    fn finish(&mut self, now: u64, state: RunState, reason: Option<String>, out: &mut Vec<Event>) {
        let mut cancels = Vec::new();
        for (s, st) in self.steps.iter().enumerate() {
            for (i, u) in st.units.iter().enumerate() {
                if let UnitPhase::Running { attempt, .. } = u.phase {
                    let item =
                        matches!(self.wf.steps[s].kind, StepKind::Map { .. }).then_some(i as u32);
                    cancels.push(Event::AttemptCancelled {
                        step: self.wf.steps[s].id.clone(),
                        item,
                        attempt,
                    });
                }
            }
        }
        for c in cancels {
            self.emit(now, out, c);
        }
        self.emit(now, out, Event::RunFinished { state, reason });
    }

    fn start_attempt(
        &mut self,
        now: u64,
        step: usize,
        item: Option<u32>,
        attempt: u32,
        out: &mut Vec<Event>,
    ) {
        let spec = &self.wf.steps[step];
        let key = format!("{}/{}/{attempt}", self.id, unit_name(&spec.id, item));
        let timeout_ms = u64::try_from(spec.timeout.as_millis()).unwrap_or(u64::MAX);
        self.emit(
            now,
            out,
            Event::AttemptStarted {
                step: spec.id.clone(),
                item,
                attempt,
                idempotency_key: key,
                deadline_ms: now.saturating_add(timeout_ms),
            },
        );
    }

    /// Starts a map's next items while it is under `max_parallel`.
    fn start_items(&mut self, now: u64, step: usize, out: &mut Vec<Event>) {
        let StepKind::Map { max_parallel, .. } = &self.wf.steps[step].kind else {
            return;
        };
        let max = *max_parallel as usize;
        while self.steps[step].active < max
            && self.steps[step].started_units < self.steps[step].units.len()
        {
            let i = self.steps[step].started_units as u32;
            self.start_attempt(now, step, Some(i), 1, out);
        }
    }

    /// Starts or skips every ready step, in topological order, then finishes the run
    /// if nothing is left.
    fn schedule(&mut self, now: u64, out: &mut Vec<Event>) {
        while let Some((_, s)) = self.ready.pop_first() {
            if self.state.is_final() {
                return;
            }
            if self.steps[s].phase != Phase::Pending {
                continue;
            }
            let wf = self.wf.clone();
            let spec = &wf.steps[s];
            let needs = &wf.needs[s];
            if !needs.is_empty() && needs.iter().all(|&k| self.steps[k].phase == Phase::Skipped) {
                self.emit(
                    now,
                    out,
                    Event::StepSkipped {
                        step: spec.id.clone(),
                        reason: "all its needs were skipped".to_owned(),
                    },
                );
                continue;
            }
            if let Some(cond) = &spec.when {
                let actual = self.lookup(&cond.left, None);
                if !cond.eval(&actual) {
                    self.emit(
                        now,
                        out,
                        Event::StepSkipped {
                            step: spec.id.clone(),
                            reason: format!("when `{}` is false", cond.source()),
                        },
                    );
                    continue;
                }
            }
            match &spec.kind {
                StepKind::Agent(_) => {
                    self.emit(
                        now,
                        out,
                        Event::StepStarted {
                            step: spec.id.clone(),
                            items: None,
                        },
                    );
                    self.start_attempt(now, s, None, 1, out);
                }
                StepKind::Approval { .. } => {
                    let timeout_ms = u64::try_from(spec.timeout.as_millis()).unwrap_or(u64::MAX);
                    self.emit(
                        now,
                        out,
                        Event::ApprovalRequested {
                            step: spec.id.clone(),
                            deadline_ms: now.saturating_add(timeout_ms),
                        },
                    );
                }
                StepKind::Map { over, .. } => {
                    let items: Vec<String> = match over {
                        MapOver::Items(ts) => ts
                            .iter()
                            .map(|t| t.render(|r| self.lookup(r, None)))
                            .collect(),
                        MapOver::Lines { step } => {
                            let k = wf.step_index(step).unwrap_or(s);
                            output_lines(&self.output(k))
                                .into_iter()
                                .map(str::to_owned)
                                .collect()
                        }
                    };
                    if items.len() > self.max_map_items {
                        let n = items.len();
                        self.emit(
                            now,
                            out,
                            Event::StepStarted {
                                step: spec.id.clone(),
                                items: Some(Vec::new()),
                            },
                        );
                        let error =
                            format!("{n} items, more than the limit of {}", self.max_map_items);
                        self.emit(
                            now,
                            out,
                            Event::StepFailed {
                                step: spec.id.clone(),
                                error: error.clone(),
                            },
                        );
                        self.finish(
                            now,
                            RunState::Failed,
                            Some(format!("step {:?}: {error}", spec.id)),
                            out,
                        );
                        return;
                    }
                    let empty = items.is_empty();
                    self.emit(
                        now,
                        out,
                        Event::StepStarted {
                            step: spec.id.clone(),
                            items: Some(items),
                        },
                    );
                    if empty {
                        self.emit(
                            now,
                            out,
                            Event::StepSucceeded {
                                step: spec.id.clone(),
                            },
                        );
                    } else {
                        self.start_items(now, s, out);
                    }
                }
            }
        }
        if self.done == self.steps.len() && !self.state.is_final() {
            self.emit(
                now,
                out,
                Event::RunFinished {
                    state: RunState::Succeeded,
                    reason: None,
                },
            );
        }
    }

    /// A step's output as templates read it: the reply (a map: a JSON array of its
    /// items' replies; an approval: the decision's reason), "" when it did not run.
    pub fn output(&self, s: usize) -> Cow<'_, str> {
        let st = &self.steps[s];
        match &self.wf.steps[s].kind {
            StepKind::Agent(_) => Cow::Borrowed(st.units.first().map_or("", |u| u.output.as_str())),
            StepKind::Approval { .. } => Cow::Borrowed(
                st.decision
                    .as_ref()
                    .and_then(|d| d.reason.as_deref())
                    .unwrap_or(""),
            ),
            StepKind::Map { .. } => {
                if st.phase != Phase::Succeeded {
                    return Cow::Borrowed("");
                }
                let outs: Vec<&str> = st.units.iter().map(|u| u.output.as_str()).collect();
                Cow::Owned(serde_json::to_string(&outs).unwrap_or_default())
            }
        }
    }

    fn outcome(&self, s: usize) -> &'static str {
        let approval = matches!(self.wf.steps[s].kind, StepKind::Approval { .. });
        match self.steps[s].phase {
            Phase::Succeeded if approval => "approved",
            Phase::Succeeded => "succeeded",
            Phase::Skipped => "skipped",
            Phase::Rejected => "rejected",
            _ => "",
        }
    }

    /// What a reference reads. Validation guarantees every step referenced has
    /// finished; a skipped one reads as "".
    pub fn lookup(&self, r: &Ref, item: Option<(u32, &str)>) -> Cow<'_, str> {
        let step = |id: &str| self.wf.step_index(id);
        match r {
            Ref::Input(n) => Cow::Borrowed(self.inputs.get(n).map_or("", String::as_str)),
            Ref::Output(id) => step(id).map_or(Cow::Borrowed(""), |s| self.output(s)),
            Ref::OutputLines(id) => step(id).map_or(Cow::Borrowed(""), |s| {
                Cow::Owned(output_lines(&self.output(s)).join("\n"))
            }),
            Ref::Outcome(id) => Cow::Borrowed(step(id).map_or("", |s| self.outcome(s))),
            Ref::Item => Cow::Owned(item.map_or(String::new(), |(_, v)| v.to_owned())),
            Ref::Index => Cow::Owned(item.map_or(String::new(), |(i, _)| i.to_string())),
        }
    }

    /// The executor's task for an attempt: everything derived from finished steps,
    /// so it is the same when rebuilt after a restart.
    pub fn task(&self, s: usize, item: Option<u32>, attempt: u32) -> Option<AgentTask> {
        let spec = &self.wf.steps[s];
        let agent_step = spec.kind.agent_step()?;
        let agent = self.wf.agents.get(&agent_step.agent)?;
        let name = unit_name(&spec.id, item);
        let item_text = item.map(|i| {
            (
                i,
                self.steps[s]
                    .items
                    .get(i as usize)
                    .map_or("", String::as_str),
            )
        });
        let prompt = agent_step.prompt.render(|r| self.lookup(r, item_text));
        let mut inputs = Vec::new();
        for dep in &agent_step.inputs {
            let Some(k) = self.wf.step_index(dep) else {
                continue;
            };
            if self.steps[k].phase != Phase::Succeeded {
                continue;
            }
            let is_map = matches!(self.wf.steps[k].kind, StepKind::Map { .. });
            for (i, u) in self.steps[k].units.iter().enumerate() {
                let dir = if is_map {
                    format!("{dep}/{i}")
                } else {
                    dep.clone()
                };
                inputs.extend(u.artifacts.iter().map(|a| (dir.clone(), a.clone())));
            }
        }
        Some(AgentTask {
            run: self.id.clone(),
            step: name.clone(),
            attempt,
            idempotency_key: format!("{}/{name}/{attempt}", self.id),
            agent_name: agent_step.agent.clone(),
            agent: agent.clone(),
            prompt,
            inputs,
            timeout: spec.timeout,
            budget_tokens: agent_step.budget_tokens.or(agent.budget_tokens),
        })
    }

    /// The artifacts of every step that succeeded, in spec order.
    pub fn artifacts(&self) -> Vec<ArtifactRef> {
        let mut out = Vec::new();
        for st in &self.steps {
            if st.phase == Phase::Succeeded {
                for u in &st.units {
                    out.extend(u.artifacts.iter().cloned());
                }
            }
        }
        out
    }

    /// A snapshot for [`crate::Engine::status`].
    pub fn status(&self, now: u64, preview_bytes: usize) -> RunStatus {
        let end = self.finished_ms.unwrap_or(now);
        let mut tokens = 0;
        let steps = self
            .steps
            .iter()
            .enumerate()
            .map(|(s, st)| {
                let spec = &self.wf.steps[s];
                let is_map = matches!(spec.kind, StepKind::Map { .. });
                let unit_state = |u: &Unit| match u.phase {
                    UnitPhase::Pending => StepState::Pending,
                    UnitPhase::Running { .. } => StepState::Running,
                    UnitPhase::Backoff { .. } => StepState::Retrying,
                    UnitPhase::Succeeded => StepState::Succeeded,
                    UnitPhase::Failed => StepState::Failed,
                    UnitPhase::Cancelled => StepState::Cancelled,
                };
                let state = match st.phase {
                    Phase::Pending => StepState::Pending,
                    Phase::Waiting => StepState::Waiting,
                    Phase::Running => {
                        if !is_map
                            && st
                                .units
                                .first()
                                .is_some_and(|u| matches!(u.phase, UnitPhase::Backoff { .. }))
                        {
                            StepState::Retrying
                        } else {
                            StepState::Running
                        }
                    }
                    Phase::Succeeded => StepState::Succeeded,
                    Phase::Skipped => StepState::Skipped,
                    Phase::Failed => StepState::Failed,
                    Phase::Rejected => StepState::Rejected,
                    Phase::Cancelled => StepState::Cancelled,
                };
                let step_tokens: u64 = st.units.iter().map(|u| u.tokens).sum();
                tokens += step_tokens;
                let output = self.output(s);
                let single = (!is_map).then(|| st.units.first()).flatten();
                let retry_at_ms = single.and_then(|u| match u.phase {
                    UnitPhase::Backoff { at_ms, .. } => Some(at_ms),
                    _ => None,
                });
                let deadline_ms = match (st.phase, single.map(|u| &u.phase)) {
                    (Phase::Waiting, _) => st.approval_deadline_ms,
                    (_, Some(UnitPhase::Running { deadline_ms, .. })) => Some(*deadline_ms),
                    _ => None,
                };
                let error = st
                    .error
                    .clone()
                    .or_else(|| single.and_then(|u| u.error.as_ref().map(ToString::to_string)));
                let approval = match spec.kind {
                    StepKind::Approval { default } => {
                        st.approval_deadline_ms.map(|deadline_ms| ApprovalStatus {
                            deadline_ms,
                            default,
                            approved: st.decision.as_ref().map(|d| d.approved),
                            reason: st.decision.as_ref().and_then(|d| d.reason.clone()),
                            by_timeout: st.decision.as_ref().is_some_and(|d| d.by_timeout),
                        })
                    }
                    _ => None,
                };
                let items = if is_map {
                    st.units
                        .iter()
                        .enumerate()
                        .map(|(i, u)| ItemStatus {
                            index: i as u32,
                            item: st.items.get(i).cloned().unwrap_or_default(),
                            state: unit_state(u),
                            attempts: u.attempts,
                            started_ms: u.started_ms,
                            finished_ms: u.finished_ms,
                            tokens: u.tokens,
                            output: preview(&u.output, preview_bytes),
                            error: u.error.as_ref().map(ToString::to_string),
                            retry_at_ms: match u.phase {
                                UnitPhase::Backoff { at_ms, .. } => Some(at_ms),
                                _ => None,
                            },
                            vm: u.vm.clone(),
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                StepStatus {
                    id: spec.id.clone(),
                    kind: spec.kind.name().to_owned(),
                    state,
                    needs: spec.needs.clone(),
                    attempts: st.units.iter().map(|u| u.attempts).sum(),
                    started_ms: st.started_ms,
                    finished_ms: st.finished_ms,
                    duration_ms: st
                        .started_ms
                        .map(|a| st.finished_ms.unwrap_or(end).saturating_sub(a)),
                    tokens: step_tokens,
                    output: preview(&output, preview_bytes),
                    output_bytes: output.len(),
                    error,
                    skip_reason: st.skip_reason.clone(),
                    retry_at_ms,
                    deadline_ms,
                    vm: single.and_then(|u| u.vm.clone()),
                    approval,
                    items,
                    artifacts: st
                        .units
                        .iter()
                        .flat_map(|u| u.artifacts.iter().cloned())
                        .collect(),
                }
            })
            .collect();
        RunStatus {
            run: self.id.clone(),
            name: self.wf.name.clone(),
            state: self.state,
            reason: self.reason.clone(),
            created_ms: self.created_ms,
            finished_ms: self.finished_ms,
            duration_ms: end.saturating_sub(self.created_ms),
            inputs: self.inputs.clone(),
            tokens,
            steps,
        }
    }

    /// Attempts running now: (step, item, attempt, deadline).
    pub fn running(&self) -> Vec<(usize, Option<u32>, u32, u64)> {
        let mut v = Vec::new();
        for (s, st) in self.steps.iter().enumerate() {
            let is_map = matches!(self.wf.steps[s].kind, StepKind::Map { .. });
            for (i, u) in st.units.iter().enumerate() {
                if let UnitPhase::Running {
                    attempt,
                    deadline_ms,
                    ..
                } = u.phase
                {
                    v.push((s, is_map.then_some(i as u32), attempt, deadline_ms));
                }
            }
        }
        v
    }

    /// Units waiting to retry: (step, item, next attempt, when).
    pub fn backoffs(&self) -> Vec<(usize, Option<u32>, u32, u64)> {
        let mut v = Vec::new();
        for (s, st) in self.steps.iter().enumerate() {
            let is_map = matches!(self.wf.steps[s].kind, StepKind::Map { .. });
            for (i, u) in st.units.iter().enumerate() {
                if let UnitPhase::Backoff {
                    next_attempt,
                    at_ms,
                } = u.phase
                {
                    v.push((s, is_map.then_some(i as u32), next_attempt, at_ms));
                }
            }
        }
        v
    }

    /// Approvals waiting: (step, deadline).
    pub fn waiting(&self) -> Vec<(usize, u64)> {
        self.steps
            .iter()
            .enumerate()
            .filter(|(_, st)| st.phase == Phase::Waiting)
            .filter_map(|(s, st)| st.approval_deadline_ms.map(|d| (s, d)))
            .collect()
    }
}
