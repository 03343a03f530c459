//! The engine: runs as event-sourced state machines, driven by inputs, journaled
//! before anything takes effect.
//!
//! Each run has a slot with an inbox and a core (its [`Run`] state, the next `seq`,
//! the tasks working for it). Whatever happens to a run — an executor answers, a
//! timer fires, someone approves or cancels — becomes an [`Input`]; whoever delivers
//! it then takes the core's lock, drains the inbox, lets the machine plan the events
//! that follow, commits them to the journal in one transaction (fsynced), and only
//! then acts on them: spawns attempt tasks, arms timers, cancels attempts, publishes
//! the events. Inputs that pile up while a commit is in flight are planned together
//! and committed by the next one (group commit within a run).
//!
//! Because the state is a fold of the journal, a restarted engine rebuilds every
//! unfinished run by replaying its events, then re-attaches the attempts that were in
//! flight ([`Executor::reattach`]) and re-arms the timers (retry backoffs, approval
//! timeouts) from their journaled deadlines. A step whose completion was journaled is
//! never run again; an attempt that was started but whose outcome was not journaled
//! is re-attached, never started twice.
//!
//! The journal calls are blocking (SQLite, fsync) and run on whichever thread
//! delivers the input; they are short, and keeping them synchronous is what lets
//! [`Engine::approve`] and [`Engine::cancel`] answer only once their decision is on
//! disk.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;

use crate::artifacts::{ArtifactError, ArtifactRef, ArtifactStore, validate_ref};
use crate::clock::Clock;
use crate::event::{Event, JournalEvent, RunId, RunState};
use crate::executor::{AgentOutcome, AgentTask, Executor, StepError};
use crate::journal::{Journal, JournalConfig, JournalError, NewRun};
use crate::machine::{Input, Phase, Run, unit_name};
use crate::spec::{Limits, SpecError, StepKind, Workflow, human};
use crate::status::{RunStatus, RunSummary};

/// How an engine is set up.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Where the journal lives.
    pub journal: JournalConfig,
    /// The artifact store's directory.
    pub artifacts_dir: PathBuf,
    /// Spec and map limits.
    pub limits: Limits,
    /// How much of each output [`Engine::status`] shows (2 KiB).
    pub output_preview_bytes: usize,
    /// Live events a slow [`Engine::subscribe`]r may fall behind by before it sees
    /// `Lagged` and should catch up with [`Engine::events`] (4,096).
    pub event_buffer: usize,
    /// Longest approval reason accepted (16 KiB).
    pub max_reason_bytes: usize,
    /// Finished runs kept in memory (256, most recent); older ones are read back from
    /// the journal when asked about, so a long-lived daemon does not grow forever.
    pub max_finished_in_memory: usize,
}

impl EngineConfig {
    /// A journal file and an artifact directory, everything else default.
    pub fn new(journal_path: impl Into<PathBuf>, artifacts_dir: impl Into<PathBuf>) -> Self {
        Self {
            journal: JournalConfig::File(journal_path.into()),
            artifacts_dir: artifacts_dir.into(),
            limits: Limits::default(),
            output_preview_bytes: 2048,
            event_buffer: 4096,
            max_reason_bytes: 16 << 10,
            max_finished_in_memory: 256,
        }
    }
}

/// Why an engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The spec did not validate; nothing was journaled.
    #[error("invalid workflow spec: {0}")]
    Spec(#[from] SpecError),
    /// A run input is unknown, missing or too long; nothing was journaled.
    #[error("input {name:?}: {reason}")]
    Input { name: String, reason: String },
    /// No run with this id.
    #[error("unknown run {0}")]
    UnknownRun(String),
    /// The run's workflow has no such step.
    #[error("run {run} has no step {step:?}")]
    UnknownStep { run: RunId, step: String },
    /// `approve` on a step that is not an approval.
    #[error("step {step:?} of run {run} is a {kind} step, not an approval")]
    NotApproval {
        run: RunId,
        step: String,
        kind: &'static str,
    },
    /// `approve` on an approval that is not waiting (not reached yet, or decided).
    #[error("step {step:?} of run {run} is not waiting for approval ({state})")]
    NotWaiting {
        run: RunId,
        step: String,
        state: &'static str,
    },
    /// `approve`/`cancel` on a run that has finished.
    #[error("run {run} is {state}, not running")]
    NotRunning { run: RunId, state: RunState },
    /// An argument over its limit (e.g. an approval reason).
    #[error("{what} is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    /// The journal failed; what was being done did not happen.
    #[error("journal")]
    Journal(#[from] JournalError),
    /// The artifact store failed.
    #[error("artifact store")]
    Artifacts(#[from] ArtifactError),
    /// A journaled run could not be rebuilt.
    #[error("run {run} cannot be rebuilt from the journal: {reason}")]
    Replay { run: String, reason: String },
    /// A journal write failed for this run earlier; it is no longer driven until the
    /// engine is reopened (which resumes it from what was journaled).
    #[error(
        "run {run} stopped after a journal failure ({reason}); it resumes when the engine is reopened"
    )]
    Stalled { run: RunId, reason: String },
    /// [`Engine::shutdown`] was called.
    #[error("the engine is shut down")]
    ShutDown,
}

/// A handle on the engine. Clones share it; the engine stops driving runs once the
/// last handle is dropped (as if killed: runs resume at the next open) or at
/// [`Engine::shutdown`].
pub struct Engine<E: Executor, C: Clock> {
    inner: Arc<Inner<E, C>>,
}

impl<E: Executor, C: Clock> Clone for Engine<E, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<E: Executor, C: Clock> std::fmt::Debug for Engine<E, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("journal", &self.inner.cfg.journal)
            .field("artifacts_dir", &self.inner.cfg.artifacts_dir)
            .finish_non_exhaustive()
    }
}

struct Inner<E: Executor, C: Clock> {
    cfg: EngineConfig,
    journal: Journal,
    store: ArtifactStore,
    exec: Arc<E>,
    clock: Arc<C>,
    runs: RwLock<BTreeMap<RunId, Entry>>,
    events: broadcast::Sender<JournalEvent>,
    stopped: AtomicBool,
    /// Runs finished while in memory, oldest first (see
    /// [`EngineConfig::max_finished_in_memory`]).
    finished: Mutex<VecDeque<RunId>>,
    /// Tasks hold this, not a strong reference: dropping every [`Engine`] handle
    /// drops the engine.
    me: Weak<Inner<E, C>>,
}

enum Entry {
    /// In memory: unfinished, or finished since the engine opened.
    Live(Arc<Slot>),
    /// Finished before the engine opened: rebuilt from the journal when asked.
    Archived(RunSummary),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotPhase {
    Running,
    Finished,
    /// Shut down or stalled: no longer driven by this engine.
    Stopped,
}

struct Slot {
    id: RunId,
    inbox: Mutex<Vec<Input>>,
    core: Mutex<Core>,
    phase: watch::Sender<SlotPhase>,
}

struct Core {
    run: Run,
    next_seq: u64,
    tasks: HashMap<TaskKey, Task>,
    stalled: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum TaskKey {
    Attempt(usize, Option<u32>),
    Timer(usize, Option<u32>),
}

struct Task {
    handle: JoinHandle<()>,
    /// For attempts: `send(())` cancels (the task then calls [`Executor::cancel`]);
    /// dropping it without sending abandons the attempt (shutdown).
    cancel: Option<oneshot::Sender<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // No entropy: no jitter, which is still a valid backoff.
        return u64::MAX;
    }
    u64::from_le_bytes(b)
}

impl<E: Executor, C: Clock> Engine<E, C> {
    /// Opens the journal and the artifact store, and recovers unfinished runs:
    /// replays their events, re-attaches attempts that were in flight
    /// ([`Executor::reattach`]), and re-arms approval timeouts and retry backoffs
    /// against `clock` (those whose moment passed while the engine was down fire at
    /// once). Must be called within a tokio runtime.
    pub async fn open(cfg: EngineConfig, executor: E, clock: C) -> Result<Self, EngineError> {
        let journal = Journal::open(&cfg.journal)?;
        let store = ArtifactStore::new(&cfg.artifacts_dir)?;
        let summaries = journal.runs()?;
        let (events, _) = broadcast::channel(cfg.event_buffer.max(1));
        let inner = Arc::new_cyclic(|me| Inner {
            cfg,
            journal,
            store,
            exec: Arc::new(executor),
            clock: Arc::new(clock),
            runs: RwLock::new(BTreeMap::new()),
            events,
            stopped: AtomicBool::new(false),
            finished: Mutex::new(VecDeque::new()),
            me: me.clone(),
        });
        let mut live = Vec::new();
        {
            let mut runs = inner.runs.write().unwrap_or_else(|p| p.into_inner());
            for summary in summaries {
                if summary.state != RunState::Running {
                    runs.insert(summary.run.clone(), Entry::Archived(summary));
                    continue;
                }
                match inner.load(&summary.run) {
                    Ok((run, next_seq)) => {
                        let slot = Arc::new(Slot::new(run, next_seq));
                        runs.insert(summary.run.clone(), Entry::Live(slot.clone()));
                        live.push(slot);
                    }
                    Err(e) => {
                        // A run that cannot be rebuilt would stay "running" forever:
                        // end it, in the journal, saying why.
                        tracing::error!(run = %summary.run, error = %e, "cannot recover run; failing it");
                        let mut summary = summary;
                        let reason = format!("cannot be recovered: {e}");
                        match inner.fail_unrecoverable(&summary.run, &reason) {
                            Ok(at) => {
                                summary.state = RunState::Failed;
                                summary.reason = Some(reason);
                                summary.finished_ms = Some(at);
                            }
                            Err(e) => {
                                tracing::error!(run = %summary.run, error = %e, "cannot journal the failure either");
                            }
                        }
                        runs.insert(summary.run.clone(), Entry::Archived(summary));
                    }
                }
            }
        }
        for slot in &live {
            inner.resume(slot);
        }
        if !live.is_empty() {
            tracing::info!(runs = live.len(), "recovered unfinished runs");
        }
        Ok(Self { inner })
    }

    /// Validates `spec_yaml` and `inputs` and starts a run. Nothing is journaled for
    /// an invalid spec or inputs. Returns once the run's first events are on disk.
    pub async fn submit(
        &self,
        spec_yaml: &str,
        inputs: BTreeMap<String, String>,
    ) -> Result<RunId, EngineError> {
        self.inner.submit(spec_yaml, inputs)
    }

    /// Decides an approval step that is waiting. Returns once the decision is on disk.
    pub fn approve(
        &self,
        run: &RunId,
        step: &str,
        approved: bool,
        reason: Option<String>,
    ) -> Result<(), EngineError> {
        let limit = self.inner.cfg.max_reason_bytes;
        if let Some(r) = &reason
            && r.len() > limit
        {
            return Err(EngineError::TooLarge {
                what: "the reason",
                size: r.len(),
                limit,
            });
        }
        let slot = self.inner.live(run)?;
        let step = step.to_owned();
        let result = self.inner.drive(
            &slot,
            Some(&move |r: &Run| {
                if r.state.is_final() {
                    return Err(EngineError::NotRunning {
                        run: r.id.clone(),
                        state: r.state,
                    });
                }
                let s =
                    r.wf.step_index(&step)
                        .ok_or_else(|| EngineError::UnknownStep {
                            run: r.id.clone(),
                            step: step.clone(),
                        })?;
                if !matches!(r.wf.steps[s].kind, StepKind::Approval { .. }) {
                    return Err(EngineError::NotApproval {
                        run: r.id.clone(),
                        step: step.clone(),
                        kind: r.wf.steps[s].kind.name(),
                    });
                }
                let phase = r.steps[s].phase;
                if phase != Phase::Waiting {
                    return Err(EngineError::NotWaiting {
                        run: r.id.clone(),
                        step: step.clone(),
                        state: phase_name(phase),
                    });
                }
                Ok(Input::Approve {
                    step: s,
                    approved,
                    reason: reason.clone(),
                })
            }),
        );
        self.inner.trim();
        result
    }

    /// Cancels a running run: running attempts get [`Executor::cancel`], nothing
    /// starts after, the run ends `cancelled`. Returns once that is on disk.
    pub fn cancel(&self, run: &RunId) -> Result<(), EngineError> {
        let slot = self.inner.live(run)?;
        let result = self.inner.drive(
            &slot,
            Some(&|r: &Run| {
                if r.state.is_final() {
                    return Err(EngineError::NotRunning {
                        run: r.id.clone(),
                        state: r.state,
                    });
                }
                Ok(Input::Cancel)
            }),
        );
        self.inner.trim();
        result
    }

    /// The run's state and every step's.
    pub fn status(&self, run: &RunId) -> Result<RunStatus, EngineError> {
        let now = self.inner.clock.now_ms();
        let preview = self.inner.cfg.output_preview_bytes;
        self.inner.with_run(run, |r| r.status(now, preview))
    }

    /// A step's whole output (a map step: the JSON array of its items' outputs).
    pub fn output(&self, run: &RunId, step: &str) -> Result<String, EngineError> {
        self.inner.with_run(run, |r| {
            let s =
                r.wf.step_index(step)
                    .ok_or_else(|| EngineError::UnknownStep {
                        run: r.id.clone(),
                        step: step.to_owned(),
                    })?;
            Ok(r.output(s).into_owned())
        })?
    }

    /// Every run the journal holds, oldest first.
    pub fn list(&self) -> Vec<RunSummary> {
        let entries: Vec<(RunId, Option<Arc<Slot>>, Option<RunSummary>)> = {
            let runs = self.inner.runs.read().unwrap_or_else(|p| p.into_inner());
            runs.iter()
                .map(|(id, e)| match e {
                    Entry::Live(s) => (id.clone(), Some(s.clone()), None),
                    Entry::Archived(s) => (id.clone(), None, Some(s.clone())),
                })
                .collect()
        };
        entries
            .into_iter()
            .filter_map(|(_, slot, archived)| match (slot, archived) {
                (Some(slot), _) => Some(summary(&lock(&slot.core).run)),
                (None, archived) => archived,
            })
            .collect()
    }

    /// The run's journaled events with `seq > after_seq`, in order. To follow a run
    /// without gaps: [`Engine::subscribe`] first, then read this, then skip live
    /// events with a `seq` already seen.
    pub fn events(&self, run: &RunId, after_seq: u64) -> Result<Vec<JournalEvent>, EngineError> {
        self.events_page(run, after_seq, usize::MAX)
    }

    /// As [`Engine::events`], at most `limit` events.
    pub fn events_page(
        &self,
        run: &RunId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<JournalEvent>, EngineError> {
        self.inner.known(run)?;
        Ok(self.inner.journal.events(run, after_seq, limit)?)
    }

    /// Live events of every run, as they are journaled (for SSE). A receiver that
    /// falls more than [`EngineConfig::event_buffer`] behind gets `Lagged`.
    pub fn subscribe(&self) -> broadcast::Receiver<JournalEvent> {
        self.inner.events.subscribe()
    }

    /// The artifacts of every step of the run that succeeded, in spec order (per
    /// step: [`RunStatus`]'s `steps[].artifacts`).
    pub fn artifacts(&self, run: &RunId) -> Result<Vec<ArtifactRef>, EngineError> {
        self.inner.with_run(run, Run::artifacts)
    }

    /// The run's spec, as submitted.
    pub fn spec(&self, run: &RunId) -> Result<String, EngineError> {
        self.inner.known(run)?;
        self.inner
            .journal
            .spec(run)?
            .ok_or_else(|| EngineError::UnknownRun(run.to_string()))
    }

    /// Waits until the run has finished, then returns its status.
    pub async fn wait(&self, run: &RunId) -> Result<RunStatus, EngineError> {
        let slot = match self.inner.entry(run)? {
            Entry::Live(slot) => slot,
            Entry::Archived(_) => return self.status(run),
        };
        let mut rx = slot.phase.subscribe();
        loop {
            let phase = *rx.borrow_and_update();
            match phase {
                SlotPhase::Finished => break,
                SlotPhase::Stopped => {
                    let stalled = lock(&slot.core).stalled.clone();
                    return Err(match stalled {
                        Some(reason) => EngineError::Stalled {
                            run: run.clone(),
                            reason,
                        },
                        None => EngineError::ShutDown,
                    });
                }
                SlotPhase::Running => {}
            }
            if rx.changed().await.is_err() {
                return Err(EngineError::ShutDown);
            }
        }
        self.status(run)
    }

    /// Stops driving runs: running attempts are abandoned (not cancelled: the next
    /// open re-attaches them), timers are dropped, nothing is journaled after this
    /// returns. Waiters get [`EngineError::ShutDown`].
    pub async fn shutdown(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        for slot in self.inner.slots() {
            let mut core = lock(&slot.core);
            for (_, t) in core.tasks.drain() {
                t.handle.abort();
            }
            slot.phase.send_replace(SlotPhase::Stopped);
        }
        tracing::info!("workflow engine shut down");
    }

    /// The artifact store (executors put what agents wrote here).
    pub fn store(&self) -> &ArtifactStore {
        &self.inner.store
    }

    /// The configuration the engine was opened with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    /// The executor.
    pub fn executor(&self) -> &E {
        &self.inner.exec
    }

    /// The clock.
    pub fn clock(&self) -> &C {
        &self.inner.clock
    }
}

fn summary(r: &Run) -> RunSummary {
    RunSummary {
        run: r.id.clone(),
        name: r.wf.name.clone(),
        state: r.state,
        reason: r.reason.clone(),
        created_ms: r.created_ms,
        finished_ms: r.finished_ms,
    }
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Pending => "it has not started",
        Phase::Waiting => "waiting",
        Phase::Running => "running",
        Phase::Succeeded => "it was approved",
        Phase::Skipped => "it was skipped",
        Phase::Failed => "it failed",
        Phase::Rejected => "it was rejected",
        Phase::Cancelled => "it was cancelled",
    }
}

impl Slot {
    fn new(run: Run, next_seq: u64) -> Self {
        let phase = if run.state.is_final() {
            SlotPhase::Finished
        } else {
            SlotPhase::Running
        };
        Self {
            id: run.id.clone(),
            inbox: Mutex::new(Vec::new()),
            core: Mutex::new(Core {
                run,
                next_seq,
                tasks: HashMap::new(),
                stalled: None,
            }),
            phase: watch::Sender::new(phase),
        }
    }
}

impl<E: Executor, C: Clock> Inner<E, C> {
    fn entry(&self, run: &RunId) -> Result<Entry, EngineError> {
        let runs = self.runs.read().unwrap_or_else(|p| p.into_inner());
        match runs.get(run) {
            Some(Entry::Live(s)) => Ok(Entry::Live(s.clone())),
            Some(Entry::Archived(s)) => Ok(Entry::Archived(s.clone())),
            None => Err(EngineError::UnknownRun(run.to_string())),
        }
    }

    fn known(&self, run: &RunId) -> Result<(), EngineError> {
        self.entry(run).map(|_| ())
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        let runs = self.runs.read().unwrap_or_else(|p| p.into_inner());
        runs.values()
            .filter_map(|e| match e {
                Entry::Live(s) => Some(s.clone()),
                Entry::Archived(_) => None,
            })
            .collect()
    }

    /// The slot of a run this engine drives, or why there is none.
    fn live(&self, run: &RunId) -> Result<Arc<Slot>, EngineError> {
        match self.entry(run)? {
            Entry::Live(s) => Ok(s),
            Entry::Archived(s) => Err(EngineError::NotRunning {
                run: run.clone(),
                state: s.state,
            }),
        }
    }

    /// Runs `f` on the run's state: the live one, or one rebuilt from the journal.
    fn with_run<T>(&self, run: &RunId, f: impl FnOnce(&Run) -> T) -> Result<T, EngineError> {
        match self.entry(run)? {
            Entry::Live(slot) => {
                let core = lock(&slot.core);
                if core.stalled.is_none() {
                    return Ok(f(&core.run));
                }
                // After a failed journal write the memory may be ahead of the
                // journal: answer from the journal.
                drop(core);
                let (r, _) = self.load(run)?;
                Ok(f(&r))
            }
            Entry::Archived(_) => {
                let (r, _) = self.load(run)?;
                Ok(f(&r))
            }
        }
    }

    /// Journals the end of a run that cannot be rebuilt; returns when.
    fn fail_unrecoverable(&self, id: &RunId, reason: &str) -> Result<u64, EngineError> {
        let now = self.clock.now_ms();
        let seq = self.journal.last_seq(id)? + 1;
        let event = JournalEvent {
            run: id.clone(),
            seq,
            time_ms: now,
            event: Event::RunFinished {
                state: RunState::Failed,
                reason: Some(reason.to_owned()),
            },
        };
        self.journal
            .append(id, std::slice::from_ref(&event), None)?;
        Ok(now)
    }

    /// Rebuilds a run from its journaled spec and events.
    fn load(&self, id: &RunId) -> Result<(Run, u64), EngineError> {
        let spec = self
            .journal
            .spec(id)?
            .ok_or_else(|| EngineError::UnknownRun(id.to_string()))?;
        // The spec was valid when submitted; limits lowered since must not strand it.
        let wf = Workflow::parse(&spec, &Limits::unlimited()).map_err(|e| EngineError::Replay {
            run: id.to_string(),
            reason: format!("its spec no longer validates: {e}"),
        })?;
        let mut run = Run::new(id.clone(), Arc::new(wf), self.cfg.limits.max_map_items);
        let mut next_seq = 1;
        for e in self.journal.events(id, 0, usize::MAX)? {
            if e.seq != next_seq {
                return Err(EngineError::Replay {
                    run: id.to_string(),
                    reason: format!("event {} follows {}", e.seq, next_seq - 1),
                });
            }
            run.apply(e.time_ms, &e.event)
                .map_err(|err| EngineError::Replay {
                    run: id.to_string(),
                    reason: err.to_string(),
                })?;
            next_seq = e.seq + 1;
        }
        Ok((run, next_seq))
    }

    fn submit(
        &self,
        spec_yaml: &str,
        mut inputs: BTreeMap<String, String>,
    ) -> Result<RunId, EngineError> {
        let wf = Workflow::parse(spec_yaml, &self.cfg.limits)?;
        let known = || wf.inputs.keys().cloned().collect::<Vec<_>>().join(", ");
        for (name, value) in &inputs {
            if !wf.inputs.contains_key(name) {
                return Err(EngineError::Input {
                    name: name.clone(),
                    reason: format!(
                        "not an input of workflow {:?} (inputs are: {})",
                        wf.name,
                        known()
                    ),
                });
            }
            if value.len() > self.cfg.limits.max_prompt_bytes {
                return Err(EngineError::Input {
                    name: name.clone(),
                    reason: format!(
                        "{} bytes, more than the limit of {}",
                        value.len(),
                        self.cfg.limits.max_prompt_bytes
                    ),
                });
            }
        }
        for (name, spec) in &wf.inputs {
            if !inputs.contains_key(name) {
                match &spec.default {
                    Some(d) => {
                        inputs.insert(name.clone(), d.clone());
                    }
                    None => {
                        return Err(EngineError::Input {
                            name: name.clone(),
                            reason: "required (the spec gives no default)".to_owned(),
                        });
                    }
                }
            }
        }
        let now = self.clock.now_ms();
        let id = RunId::generate(now);
        let spec_sha256 = hex::encode(Sha256::digest(spec_yaml.as_bytes()));
        let name = wf.name.clone();
        let mut run = Run::new(id.clone(), Arc::new(wf), self.cfg.limits.max_map_items);
        let first = Event::RunSubmitted {
            name: name.clone(),
            inputs,
            spec_sha256: spec_sha256.clone(),
        };
        run.apply(now, &first).map_err(|e| EngineError::Replay {
            run: id.to_string(),
            reason: e.to_string(),
        })?;
        let mut events = vec![first];
        events.extend(run.plan(now, Vec::new(), &mut random_u64));
        let slot = Arc::new(Slot::new(run, 1));
        let mut core = lock(&slot.core);
        // Registered (locked) before anything is journaled: the tasks the effects
        // spawn look the slot up, and a concurrent shutdown either sees the slot (and
        // waits for this lock) or has set `stopped` before the check below.
        self.runs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), Entry::Live(slot.clone()));
        let unregister = || {
            self.runs
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        };
        if self.stopped.load(Ordering::SeqCst) {
            unregister();
            return Err(EngineError::ShutDown);
        }
        let batch = stamp(&mut core, &id, now, events);
        let new_run = NewRun {
            name: &name,
            spec: spec_yaml,
            spec_sha256: &spec_sha256,
            created_ms: now,
        };
        if let Err(e) = self.journal.append(&id, &batch, Some(new_run)) {
            unregister();
            return Err(e.into());
        }
        tracing::info!(run = %id, workflow = %name, "run submitted");
        self.effects(&mut core, &slot, &batch);
        drop(core);
        self.trim();
        Ok(id)
    }

    /// Delivers an input to a run and drives it.
    fn deliver(&self, run: &RunId, input: Input) {
        let Ok(slot) = self.live(run) else { return };
        lock(&slot.inbox).push(input);
        if let Err(e) = self.drive(&slot, None) {
            tracing::debug!(run = %run, error = %e, "input not applied");
        }
        self.trim();
    }

    /// Moves the oldest finished runs out of memory, beyond the configured number.
    /// Called with no lock held: it takes a run's lock, releases it, then takes the
    /// run table's.
    fn trim(&self) {
        loop {
            let id = {
                let mut q = lock(&self.finished);
                if q.len() <= self.cfg.max_finished_in_memory {
                    return;
                }
                match q.pop_front() {
                    Some(id) => id,
                    None => return,
                }
            };
            let Ok(Entry::Live(slot)) = self.entry(&id) else {
                continue;
            };
            let s = summary(&lock(&slot.core).run);
            self.runs
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, Entry::Archived(s));
        }
    }

    /// Takes the run's lock, plans everything in its inbox (plus `direct`, built and
    /// checked under the lock), journals the events, acts on them.
    #[allow(clippy::type_complexity)]
    fn drive(
        &self,
        slot: &Slot,
        direct: Option<&dyn Fn(&Run) -> Result<Input, EngineError>>,
    ) -> Result<(), EngineError> {
        let mut core = lock(&slot.core);
        if self.stopped.load(Ordering::SeqCst) {
            return Err(EngineError::ShutDown);
        }
        if let Some(reason) = &core.stalled {
            return Err(EngineError::Stalled {
                run: slot.id.clone(),
                reason: reason.clone(),
            });
        }
        // A direct input (approve, cancel) goes first: it was checked against the
        // current state, and once acknowledged it must not be overtaken by, say, an
        // approval timeout waiting in the inbox.
        let mut inputs = Vec::new();
        if let Some(f) = direct {
            inputs.push(f(&core.run)?);
        }
        inputs.append(&mut lock(&slot.inbox));
        if inputs.is_empty() {
            return Ok(());
        }
        self.commit(&mut core, slot, inputs)
    }

    fn commit(&self, core: &mut Core, slot: &Slot, inputs: Vec<Input>) -> Result<(), EngineError> {
        let now = self.clock.now_ms();
        let events = core.run.plan(now, inputs, &mut random_u64);
        if events.is_empty() {
            return Ok(());
        }
        let batch = stamp(core, &slot.id, now, events);
        if let Err(e) = self.journal.append(&slot.id, &batch, None) {
            // The in-memory state is now ahead of the journal. Nothing of the batch
            // has taken effect; put the state back to what is journaled and stop
            // driving the run (the next open resumes it).
            tracing::error!(run = %slot.id, error = %e, "journal write failed; run stalled");
            core.next_seq -= batch.len() as u64;
            core.stalled = Some(e.to_string());
            for (_, t) in core.tasks.drain() {
                t.handle.abort();
            }
            // Best effort: `status` reads the journal while the run is stalled anyway.
            if let Ok((run, _)) = self.load(&slot.id) {
                core.run = run;
            }
            slot.phase.send_replace(SlotPhase::Stopped);
            return Err(EngineError::Journal(e));
        }
        self.effects(core, slot, &batch);
        Ok(())
    }

    /// Acts on journaled events: publishes them, starts and stops tasks.
    fn effects(&self, core: &mut Core, slot: &Slot, batch: &[JournalEvent]) {
        for je in batch {
            let _ = self.events.send(je.clone());
            let step = je.event.step().and_then(|id| core.run.wf.step_index(id));
            tracing::debug!(run = %slot.id, seq = je.seq, event = je.event.kind(), step = je.event.step().unwrap_or(""), "event");
            match (&je.event, step) {
                (
                    Event::AttemptStarted {
                        item,
                        attempt,
                        deadline_ms,
                        ..
                    },
                    Some(s),
                ) => {
                    if let Some(t) = core.tasks.remove(&TaskKey::Timer(s, *item)) {
                        t.handle.abort();
                    }
                    self.spawn_attempt(core, s, *item, *attempt, *deadline_ms, false);
                }
                (Event::AttemptSucceeded { item, .. }, Some(s)) => {
                    core.tasks.remove(&TaskKey::Attempt(s, *item));
                }
                (
                    Event::AttemptFailed {
                        item,
                        attempt,
                        retry_at_ms,
                        error,
                        step: id,
                    },
                    Some(s),
                ) => {
                    core.tasks.remove(&TaskKey::Attempt(s, *item));
                    tracing::info!(run = %slot.id, step = %unit_name(id, *item), attempt, error = %error, retry_at_ms, "attempt failed");
                    if let Some(at) = retry_at_ms {
                        let (item, attempt) = (*item, attempt.saturating_add(1));
                        self.spawn_timer(core, TaskKey::Timer(s, item), *at, move || {
                            Input::Retry {
                                step: s,
                                item,
                                attempt,
                            }
                        });
                    }
                }
                (Event::AttemptCancelled { item, .. }, Some(s)) => {
                    if let Some(t) = core.tasks.remove(&TaskKey::Attempt(s, *item))
                        && let Some(c) = t.cancel
                    {
                        let _ = c.send(());
                    }
                }
                (Event::ApprovalRequested { deadline_ms, .. }, Some(s)) => {
                    self.spawn_timer(core, TaskKey::Timer(s, None), *deadline_ms, move || {
                        Input::ApprovalDeadline { step: s }
                    });
                }
                (Event::ApprovalDecided { .. }, Some(s)) => {
                    if let Some(t) = core.tasks.remove(&TaskKey::Timer(s, None)) {
                        t.handle.abort();
                    }
                }
                (Event::RunFinished { state, reason }, _) => {
                    tracing::info!(run = %slot.id, state = %state, reason = reason.as_deref().unwrap_or(""), "run finished");
                    for (_, t) in core.tasks.drain() {
                        match t.cancel {
                            // Attempts still registered were cancelled above; anything
                            // else (timers) just stops.
                            Some(c) => {
                                let _ = c.send(());
                            }
                            None => t.handle.abort(),
                        }
                    }
                    slot.phase.send_replace(SlotPhase::Finished);
                    lock(&self.finished).push_back(slot.id.clone());
                    let exec = self.exec.clone();
                    let run = slot.id.clone();
                    let state = *state;
                    tokio::spawn(async move { exec.run_finished(&run, state).await });
                }
                _ => {}
            }
        }
    }

    /// After a restart: re-attach running attempts, re-arm timers, start anything
    /// ready.
    fn resume(&self, slot: &Arc<Slot>) {
        let mut core = lock(&slot.core);
        for (s, item, attempt, deadline_ms) in core.run.running() {
            tracing::info!(run = %slot.id, step = %unit_name(&core.run.wf.steps[s].id, item), attempt, "re-attaching attempt");
            self.spawn_attempt(&mut core, s, item, attempt, deadline_ms, true);
        }
        for (s, item, attempt, at) in core.run.backoffs() {
            self.spawn_timer(&mut core, TaskKey::Timer(s, item), at, move || {
                Input::Retry {
                    step: s,
                    item,
                    attempt,
                }
            });
        }
        for (s, deadline) in core.run.waiting() {
            self.spawn_timer(&mut core, TaskKey::Timer(s, None), deadline, move || {
                Input::ApprovalDeadline { step: s }
            });
        }
        // Nothing should be ready (every batch schedules to a fixpoint), but planning
        // once costs nothing and makes that a non-assumption.
        if let Err(e) = self.commit(&mut core, slot, Vec::new()) {
            tracing::error!(run = %slot.id, error = %e, "resuming run");
        }
    }

    fn spawn_attempt(
        &self,
        core: &mut Core,
        s: usize,
        item: Option<u32>,
        attempt: u32,
        deadline_ms: u64,
        reattach: bool,
    ) {
        let Some(task) = core.run.task(s, item, attempt) else {
            tracing::error!(run = %core.run.id, step = s, "no task for an agent attempt");
            return;
        };
        let (tx, rx) = oneshot::channel();
        let handle = tokio::spawn(attempt_task(
            self.me.clone(),
            self.exec.clone(),
            self.clock.clone(),
            self.store.clone(),
            AttemptJob {
                task,
                step: s,
                item,
                deadline_ms,
                reattach,
            },
            rx,
        ));
        core.tasks.insert(
            TaskKey::Attempt(s, item),
            Task {
                handle,
                cancel: Some(tx),
            },
        );
    }

    fn spawn_timer(
        &self,
        core: &mut Core,
        key: TaskKey,
        at_ms: u64,
        input: impl FnOnce() -> Input + Send + 'static,
    ) {
        let me = self.me.clone();
        let clock = self.clock.clone();
        let run = core.run.id.clone();
        let handle = tokio::spawn(async move {
            clock.sleep_until(at_ms).await;
            if let Some(inner) = me.upgrade() {
                inner.deliver(&run, input());
            }
        });
        if let Some(old) = core.tasks.insert(
            key,
            Task {
                handle,
                cancel: None,
            },
        ) {
            old.handle.abort();
        }
    }
}

/// Numbers events and stamps them with the run and time.
fn stamp(core: &mut Core, run: &RunId, now: u64, events: Vec<Event>) -> Vec<JournalEvent> {
    events
        .into_iter()
        .map(|event| {
            let seq = core.next_seq;
            core.next_seq += 1;
            JournalEvent {
                run: run.clone(),
                seq,
                time_ms: now,
                event,
            }
        })
        .collect()
}

struct AttemptJob {
    task: AgentTask,
    step: usize,
    item: Option<u32>,
    deadline_ms: u64,
    reattach: bool,
}

enum Race {
    Done(Result<AgentOutcome, StepError>),
    TimedOut,
    Cancelled,
    Abandoned,
}

async fn race<C: Clock>(
    fut: impl Future<Output = Result<AgentOutcome, StepError>>,
    clock: &C,
    deadline_ms: u64,
    cancel: &mut oneshot::Receiver<()>,
) -> Race {
    tokio::select! {
        biased;
        c = cancel => match c {
            Ok(()) => Race::Cancelled,
            Err(_) => Race::Abandoned,
        },
        r = fut => Race::Done(r),
        () = clock.sleep_until(deadline_ms) => Race::TimedOut,
    }
}

/// One attempt: the executor's future raced against the deadline and a cancel.
async fn attempt_task<E: Executor, C: Clock>(
    me: Weak<Inner<E, C>>,
    exec: Arc<E>,
    clock: Arc<C>,
    store: ArtifactStore,
    job: AttemptJob,
    mut cancel: oneshot::Receiver<()>,
) {
    // Cancelled (or abandoned) before it started: the executor never saw it.
    if !matches!(cancel.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
        return;
    }
    let task = job.task;
    let outcome = if job.reattach {
        race(
            exec.reattach(task.clone()),
            &*clock,
            job.deadline_ms,
            &mut cancel,
        )
        .await
    } else {
        race(
            exec.run(task.clone()),
            &*clock,
            job.deadline_ms,
            &mut cancel,
        )
        .await
    };
    let result = match outcome {
        Race::Abandoned => return,
        Race::Cancelled => {
            exec.cancel(&task).await;
            return;
        }
        Race::TimedOut => {
            exec.cancel(&task).await;
            Err(StepError::timeout(format!(
                "no answer within {}",
                human(task.timeout)
            )))
        }
        Race::Done(Ok(o)) => check_outcome(&store, o),
        Race::Done(Err(e)) => Err(e),
    };
    if let Some(inner) = me.upgrade() {
        inner.deliver(
            &task.run,
            Input::AttemptDone {
                step: job.step,
                item: job.item,
                attempt: task.attempt,
                result,
            },
        );
    }
}

/// An executor's artifacts must be well-formed and in the store: later steps copy
/// them by hash.
fn check_outcome(store: &ArtifactStore, o: AgentOutcome) -> Result<AgentOutcome, StepError> {
    for a in &o.artifacts {
        validate_ref(a)
            .map_err(|e| StepError::fatal(format!("the executor returned a bad artifact: {e}")))?;
        let size = store
            .path(&a.sha256)
            .ok()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.len());
        match size {
            None => {
                return Err(StepError::fatal(format!(
                    "artifact {} ({}) is not in the store",
                    a.sha256, a.name
                )));
            }
            Some(n) if n != a.size => {
                return Err(StepError::fatal(format!(
                    "artifact {} ({}) is {n} bytes in the store, the executor said {}",
                    a.sha256, a.name, a.size
                )));
            }
            Some(_) => {}
        }
    }
    Ok(o)
}

impl<E: Executor, C: Clock> Drop for Inner<E, C> {
    fn drop(&mut self) {
        // Like a kill: tasks stop, nothing more is journaled; the next open resumes.
        let runs = self.runs.get_mut().unwrap_or_else(|p| p.into_inner());
        for e in runs.values() {
            if let Entry::Live(slot) = e {
                let mut core = lock(&slot.core);
                for (_, t) in core.tasks.drain() {
                    t.handle.abort();
                }
            }
        }
    }
}
