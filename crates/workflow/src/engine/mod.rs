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
//!
//! Here: the engine's configuration, errors and public API; `runs` finds, loads, submits
//! and archives runs; `drive` plans, journals and acts.

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

mod drive;
mod runs;

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
