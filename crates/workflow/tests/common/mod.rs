//! Shared set-up: an engine on a temp dir with a fake clock and a scripted executor.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use clawos_workflow::testing::ScriptedExecutor;
use clawos_workflow::{
    ArtifactStore, Clock, Engine, EngineConfig, Event, FakeClock, JournalEvent, RunId, RunState,
};

pub const T0: u64 = 1_700_000_000_000;

pub type TestEngine = Engine<ScriptedExecutor, FakeClock>;

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub clock: FakeClock,
    pub exec: ScriptedExecutor,
    pub cfg: EngineConfig,
    engine: Option<TestEngine>,
}

pub fn config(dir: &std::path::Path) -> EngineConfig {
    EngineConfig::new(dir.join("journal.db"), dir.join("artifacts"))
}

impl Harness {
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    /// With a tweaked configuration (kept for reopens).
    pub async fn with(tweak: impl FnOnce(&mut EngineConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        tweak(&mut cfg);
        let clock = FakeClock::new(T0);
        let store = ArtifactStore::new(dir.path().join("artifacts")).unwrap();
        let exec = ScriptedExecutor::new(clock.clone()).with_store(store);
        let engine = Engine::open(cfg.clone(), exec.clone(), clock.clone())
            .await
            .unwrap();
        Self {
            dir,
            clock,
            exec,
            cfg,
            engine: Some(engine),
        }
    }

    pub fn engine(&self) -> &TestEngine {
        self.engine.as_ref().expect("engine open")
    }

    /// Drops the engine without shutdown, as a kill would.
    pub async fn crash(&mut self) {
        drop(self.engine.take());
        settle().await;
    }

    /// Opens an engine on the same journal, same clock, same executor.
    pub async fn reopen(&mut self) {
        self.engine = Some(
            Engine::open(
                config(self.dir.path()),
                self.exec.clone(),
                self.clock.clone(),
            )
            .await
            .unwrap(),
        );
    }

    pub async fn crash_and_reopen(&mut self) {
        self.crash().await;
        self.reopen().await;
    }

    pub async fn submit(&self, spec: &str) -> RunId {
        self.engine().submit(spec, BTreeMap::new()).await.unwrap()
    }

    pub fn state(&self, run: &RunId) -> RunState {
        self.engine().status(run).unwrap().state
    }

    pub fn events(&self, run: &RunId) -> Vec<JournalEvent> {
        self.engine().events(run, 0).unwrap()
    }

    /// Lets every task run until nothing moves (the fake clock stands still).
    pub async fn settle(&self) {
        settle().await;
    }

    /// Advances the fake clock to the next pending deadline and settles.
    pub async fn next(&self) -> Option<u64> {
        settle().await;
        let d = self.clock.next_deadline()?;
        self.clock.set(d);
        settle().await;
        Some(d)
    }

    pub async fn advance(&self, ms: u64) {
        settle().await;
        self.clock.advance(Duration::from_millis(ms));
        settle().await;
    }

    /// Advances through deadlines until the run finishes (at most `max` times).
    pub async fn run_to_end(&self, run: &RunId, max: usize) -> RunState {
        for _ in 0..max {
            settle().await;
            let s = self.state(run);
            if s.is_final() {
                return s;
            }
            if self.next().await.is_none() {
                break;
            }
        }
        self.state(run)
    }

    pub fn now(&self) -> u64 {
        self.clock.now_ms()
    }
}

/// Yields long enough for every ready task to run to its next wait.
pub async fn settle() {
    for _ in 0..300 {
        tokio::task::yield_now().await;
    }
}

/// Events of one kind for one step.
pub fn kinds(events: &[JournalEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e.event.step() {
            Some(s) => format!("{}:{s}", e.event.kind()),
            None => e.event.kind().to_owned(),
        })
        .collect()
}

pub fn count(events: &[JournalEvent], kind: &str, step: &str) -> usize {
    events
        .iter()
        .filter(|e| e.event.kind() == kind && e.event.step() == Some(step))
        .count()
}

pub fn finished(events: &[JournalEvent]) -> Option<RunState> {
    events.iter().find_map(|e| match &e.event {
        Event::RunFinished { state, .. } => Some(*state),
        _ => None,
    })
}
