//! Engine overhead per step, with an executor that answers at once and the real
//! SQLite journal (WAL, synchronous=FULL: every commit is fsynced), against the same
//! steps with an in-memory journal as the baseline; and recovery time after a
//! simulated kill with 100 runs in flight.
//!
//! `cargo bench -p clawos-workflow` (optionally `-- --steps 2000 --runs 20`).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clawos_workflow::{
    AgentOutcome, AgentTask, Engine, EngineConfig, Executor, JournalConfig, Limits, RunState,
    StepError, SystemClock, Workflow,
};

/// Answers every attempt at once, except steps named `hang`, which never answer.
#[derive(Clone, Default)]
struct InstantExec {
    hang: Option<String>,
    in_flight: Arc<AtomicUsize>,
    reattached: Arc<AtomicUsize>,
}

impl Executor for InstantExec {
    async fn run(&self, task: AgentTask) -> Result<AgentOutcome, StepError> {
        if self.hang.as_deref() == Some(task.step.as_str()) {
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        Ok(AgentOutcome {
            output: "ok".into(),
            artifacts: Vec::new(),
            tokens: 1,
            vm: "vm".into(),
        })
    }
    async fn reattach(&self, _task: AgentTask) -> Result<AgentOutcome, StepError> {
        self.reattached.fetch_add(1, Ordering::SeqCst);
        std::future::pending().await
    }
    async fn cancel(&self, _task: &AgentTask) {}
}

#[derive(Clone, Copy, Debug)]
enum Shape {
    /// s0 → s1 → … : one step at a time, every step its own commit.
    Chain,
    /// s0 … sN-1 in parallel, then one join: commits batch.
    Fan,
}

fn spec(shape: Shape, n: usize) -> String {
    let mut s = String::from(
        "apiVersion: clawos.dev/v1\nkind: Workflow\nmetadata: { name: bench }\nagents: { a: { model: m } }\nsteps:\n",
    );
    for i in 0..n {
        match (shape, i) {
            (Shape::Chain, 0) | (Shape::Fan, _) => {
                s.push_str(&format!("  - {{ id: s{i}, agent: a, prompt: p }}\n"))
            }
            (Shape::Chain, _) => s.push_str(&format!(
                "  - {{ id: s{i}, needs: [s{}], agent: a, prompt: p }}\n",
                i - 1
            )),
        }
    }
    if let Shape::Fan = shape {
        let all: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        s.push_str(&format!(
            "  - {{ id: join, needs: [{}], agent: a, prompt: p }}\n",
            all.join(", ")
        ));
    }
    s
}

fn limits() -> Limits {
    Limits {
        max_steps: 100_000,
        max_spec_bytes: 64 << 20,
        ..Limits::default()
    }
}

fn config(dir: &std::path::Path, memory: bool) -> EngineConfig {
    let mut cfg = EngineConfig::new(dir.join("journal.db"), dir.join("artifacts"));
    if memory {
        cfg.journal = JournalConfig::Memory;
    }
    cfg.limits = limits();
    cfg.event_buffer = 1 << 16;
    cfg
}

/// Submits one run of `n` steps and waits for it: (total, steps incl. join).
async fn run_once(shape: Shape, n: usize, memory: bool) -> (Duration, usize) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(
        config(dir.path(), memory),
        InstantExec::default(),
        SystemClock,
    )
    .await
    .unwrap();
    let src = spec(shape, n);
    let t = Instant::now();
    let run = engine.submit(&src, BTreeMap::new()).await.unwrap();
    let st = engine.wait(&run).await.unwrap();
    let took = t.elapsed();
    assert_eq!(st.state, RunState::Succeeded);
    engine.shutdown().await;
    (took, st.steps.len())
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn recovery(runs: usize) {
    let dir = tempfile::tempdir().unwrap();
    let steps = 10;
    let exec = InstantExec {
        hang: Some("s5".into()),
        ..InstantExec::default()
    };
    let engine = Engine::open(config(dir.path(), false), exec.clone(), SystemClock)
        .await
        .unwrap();
    let src = spec(Shape::Chain, steps);
    for _ in 0..runs {
        engine.submit(&src, BTreeMap::new()).await.unwrap();
    }
    while exec.in_flight.load(Ordering::SeqCst) < runs {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Simulated kill: the engine is dropped without shutdown.
    drop(engine);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let t = Instant::now();
    let engine = Engine::open(config(dir.path(), false), exec.clone(), SystemClock)
        .await
        .unwrap();
    let opened = t.elapsed();
    while exec.reattached.load(Ordering::SeqCst) < runs {
        tokio::task::yield_now().await;
    }
    let reattached = t.elapsed();
    let live = engine
        .list()
        .iter()
        .filter(|r| r.state == RunState::Running)
        .count();
    assert_eq!(live, runs);
    let events: usize = engine
        .list()
        .iter()
        .map(|r| engine.events(&r.run, 0).unwrap().len())
        .sum();
    println!(
        "recovery: {runs} runs in flight ({steps}-step chains, 5 steps done and 1 attempt in flight each, {events} events): open {:.1} ms ({:.0} µs/run), all {runs} attempts re-attached after {:.1} ms",
        opened.as_secs_f64() * 1e3,
        opened.as_secs_f64() * 1e6 / runs as f64,
        reattached.as_secs_f64() * 1e3,
    );
    engine.shutdown().await;
}

fn main() {
    let n = arg("--steps", 10_000);
    let runs = arg("--runs", 100);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let src = spec(Shape::Chain, n);
    let t = Instant::now();
    Workflow::parse(&src, &limits()).unwrap();
    println!(
        "validate: {n}-step chain spec ({} KiB) in {:.1} ms",
        src.len() >> 10,
        t.elapsed().as_secs_f64() * 1e3
    );

    rt.block_on(async {
        for shape in [Shape::Chain, Shape::Fan] {
            let (file, steps) = run_once(shape, n, false).await;
            let (mem, _) = run_once(shape, n, true).await;
            let per = |d: Duration| d.as_secs_f64() * 1e6 / steps as f64;
            println!(
                "{shape:?} of {steps} steps: sqlite+fsync {:.1} µs/step ({:.0} steps/s, {:.2} s) | in-memory journal {:.1} µs/step ({:.0} steps/s) | ratio {:.2}x",
                per(file),
                steps as f64 / file.as_secs_f64(),
                file.as_secs_f64(),
                per(mem),
                steps as f64 / mem.as_secs_f64(),
                file.as_secs_f64() / mem.as_secs_f64(),
            );
        }
        recovery(runs).await;
    });
}
