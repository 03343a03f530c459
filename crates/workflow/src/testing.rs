//! A scripted [`Executor`] for tests (this crate's, and the daemon's): outcomes per
//! step and attempt, delays on a [`FakeClock`], and a record of every call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::artifacts::{ArtifactRef, ArtifactStore};
use crate::clock::{Clock, FakeClock};
use crate::executor::{AgentOutcome, AgentTask, ErrorKind, Executor, StepError};

/// What one attempt does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scripted {
    /// Answers `output` after `after_ms` (fake) milliseconds, having written `files`
    /// (stored in the executor's store) and used `tokens`.
    Ok {
        output: String,
        tokens: u64,
        files: Vec<(String, Vec<u8>)>,
        after_ms: u64,
    },
    /// Fails with `kind` after `after_ms`.
    Err {
        kind: ErrorKind,
        message: String,
        after_ms: u64,
    },
    /// Never answers (until the engine's timeout or a cancel).
    Hang,
}

impl Scripted {
    /// Answers `output` at once.
    pub fn ok(output: impl Into<String>) -> Self {
        Self::Ok {
            output: output.into(),
            tokens: 10,
            files: Vec::new(),
            after_ms: 0,
        }
    }
    /// Fails with `kind` at once.
    pub fn err(kind: ErrorKind) -> Self {
        Self::Err {
            kind,
            message: format!("scripted {kind}"),
            after_ms: 0,
        }
    }
    /// The same, `ms` later.
    pub fn after(mut self, ms: u64) -> Self {
        match &mut self {
            Self::Ok { after_ms, .. } | Self::Err { after_ms, .. } => *after_ms = ms,
            Self::Hang => {}
        }
        self
    }
    /// The same, having written a file.
    pub fn with_file(mut self, name: &str, bytes: &[u8]) -> Self {
        if let Self::Ok { files, .. } = &mut self {
            files.push((name.to_owned(), bytes.to_vec()));
        }
        self
    }
}

/// What the executor was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    Run,
    Reattach,
    Cancel,
    RunFinished,
}

/// One call, with the fake time it was made at.
#[derive(Debug, Clone)]
pub struct Call {
    pub kind: CallKind,
    pub task: Option<AgentTask>,
    pub at_ms: u64,
}

/// What [`Executor::reattach`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reattach {
    /// The attempt is gone: `Lost` (the engine retries it).
    Lost,
    /// The attempt still runs: it plays its script again from now.
    Resume,
}

#[derive(Debug)]
struct State {
    /// Step name (`research`, or `per-file` for every item of a map) → outcome per
    /// attempt; past the end, the last one repeats.
    scripts: HashMap<String, Vec<Scripted>>,
    /// Per exact task step (`per-file[2]`), overriding `scripts`.
    exact: HashMap<String, Vec<Scripted>>,
    reattach: Reattach,
    calls: Vec<Call>,
    /// Per step name: attempts in flight now, and the most ever.
    in_flight: HashMap<String, (usize, usize)>,
    total_in_flight: (usize, usize),
}

/// A scripted executor. Clones share their script and record.
#[derive(Debug, Clone)]
pub struct ScriptedExecutor {
    clock: FakeClock,
    store: Option<ArtifactStore>,
    state: Arc<Mutex<State>>,
}

/// `per-file[3]` → `per-file`.
fn base(step: &str) -> &str {
    step.split_once('[').map_or(step, |(b, _)| b)
}

impl ScriptedExecutor {
    /// Every attempt answers `"<step> done"` at once unless scripted otherwise.
    pub fn new(clock: FakeClock) -> Self {
        Self {
            clock,
            store: None,
            state: Arc::new(Mutex::new(State {
                scripts: HashMap::new(),
                exact: HashMap::new(),
                reattach: Reattach::Lost,
                calls: Vec::new(),
                in_flight: HashMap::new(),
                total_in_flight: (0, 0),
            })),
        }
    }

    /// Stores scripted files here (needed for [`Scripted::with_file`]).
    pub fn with_store(mut self, store: ArtifactStore) -> Self {
        self.store = Some(store);
        self
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Scripts `step`'s attempts (a map step: each item's), first attempt first.
    pub fn script(&self, step: &str, outcomes: Vec<Scripted>) -> &Self {
        self.state().scripts.insert(step.to_owned(), outcomes);
        self
    }

    /// Scripts one map item's attempts (`per-file[2]`).
    pub fn script_exact(&self, task_step: &str, outcomes: Vec<Scripted>) -> &Self {
        self.state().exact.insert(task_step.to_owned(), outcomes);
        self
    }

    pub fn set_reattach(&self, r: Reattach) {
        self.state().reattach = r;
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// Tasks of `run`/`reattach` calls for `step` (a map's items too), in order.
    pub fn runs_of(&self, step: &str) -> Vec<(CallKind, AgentTask, u64)> {
        self.state()
            .calls
            .iter()
            .filter(|c| matches!(c.kind, CallKind::Run | CallKind::Reattach))
            .filter_map(|c| c.task.clone().map(|t| (c.kind, t, c.at_ms)))
            .filter(|(_, t, _)| base(&t.step) == step)
            .collect()
    }

    /// Cancelled task steps, in order.
    pub fn cancelled(&self) -> Vec<String> {
        self.state()
            .calls
            .iter()
            .filter(|c| c.kind == CallKind::Cancel)
            .filter_map(|c| c.task.as_ref().map(|t| t.step.clone()))
            .collect()
    }

    /// The most attempts of `step` (a map's items) that were ever in flight at once.
    pub fn max_in_flight(&self, step: &str) -> usize {
        self.state().in_flight.get(step).map_or(0, |x| x.1)
    }

    /// Attempts in flight now, over all steps.
    pub fn in_flight(&self) -> usize {
        self.state().total_in_flight.0
    }

    fn outcome(&self, task: &AgentTask) -> Scripted {
        let s = self.state();
        let list = s
            .exact
            .get(&task.step)
            .or_else(|| s.scripts.get(base(&task.step)));
        match list {
            Some(l) if !l.is_empty() => {
                let i = (task.attempt as usize).saturating_sub(1).min(l.len() - 1);
                l[i].clone()
            }
            _ => Scripted::ok(format!("{} done", task.step)),
        }
    }

    fn record(&self, kind: CallKind, task: Option<AgentTask>) {
        let at_ms = self.clock.now_ms();
        self.state().calls.push(Call { kind, task, at_ms });
    }

    async fn play(&self, task: AgentTask, kind: CallKind) -> Result<AgentOutcome, StepError> {
        self.record(kind, Some(task.clone()));
        let _guard = InFlight::enter(self, base(&task.step));
        let script = self.outcome(&task);
        let wait = |ms: u64| {
            let at = self.clock.now_ms() + ms;
            let clock = self.clock.clone();
            async move {
                if ms > 0 {
                    clock.sleep_until(at).await;
                }
            }
        };
        match script {
            Scripted::Hang => std::future::pending().await,
            Scripted::Err {
                kind,
                message,
                after_ms,
            } => {
                wait(after_ms).await;
                Err(StepError::new(kind, message))
            }
            Scripted::Ok {
                output,
                tokens,
                files,
                after_ms,
            } => {
                wait(after_ms).await;
                let mut artifacts: Vec<ArtifactRef> = Vec::new();
                for (name, bytes) in files {
                    let store = self
                        .store
                        .as_ref()
                        .ok_or_else(|| StepError::fatal("scripted files need a store"))?;
                    artifacts.push(
                        store
                            .put(&bytes, &name, "text/plain")
                            .map_err(|e| StepError::fatal(e.to_string()))?,
                    );
                }
                Ok(AgentOutcome {
                    output,
                    artifacts,
                    tokens,
                    vm: format!("vm-{}", task.idempotency_key.replace('/', "-")),
                })
            }
        }
    }
}

/// Counts an attempt in flight for as long as its future lives.
struct InFlight {
    exec: ScriptedExecutor,
    step: String,
}

impl InFlight {
    fn enter(exec: &ScriptedExecutor, step: &str) -> Self {
        let mut s = exec.state();
        let e = s.in_flight.entry(step.to_owned()).or_insert((0, 0));
        e.0 += 1;
        e.1 = e.1.max(e.0);
        s.total_in_flight.0 += 1;
        s.total_in_flight.1 = s.total_in_flight.1.max(s.total_in_flight.0);
        drop(s);
        Self {
            exec: exec.clone(),
            step: step.to_owned(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.exec.state();
        if let Some(e) = s.in_flight.get_mut(&self.step) {
            e.0 = e.0.saturating_sub(1);
        }
        s.total_in_flight.0 = s.total_in_flight.0.saturating_sub(1);
    }
}

impl Executor for ScriptedExecutor {
    async fn run(&self, task: AgentTask) -> Result<AgentOutcome, StepError> {
        self.play(task, CallKind::Run).await
    }

    async fn reattach(&self, task: AgentTask) -> Result<AgentOutcome, StepError> {
        let mode = self.state().reattach;
        match mode {
            Reattach::Resume => self.play(task, CallKind::Reattach).await,
            Reattach::Lost => {
                self.record(CallKind::Reattach, Some(task));
                Err(StepError::lost("the attempt is gone"))
            }
        }
    }

    async fn cancel(&self, task: &AgentTask) {
        self.record(CallKind::Cancel, Some(task.clone()));
    }

    async fn run_finished(&self, _run: &crate::RunId, _state: crate::RunState) {
        self.record(CallKind::RunFinished, None);
    }
}
