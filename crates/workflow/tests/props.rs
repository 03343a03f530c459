//! Random DAGs with random outcomes and durations, random cancels and crashes:
//! a join fires exactly once, a step never starts before all its needs finished,
//! nothing starts after a cancel, and runs always end in the state they must.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use clawos_workflow::testing::{CallKind, Reattach, Scripted};
use clawos_workflow::{ErrorKind, Event, RunState};
use common::Harness;
use proptest::prelude::*;

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Ok(u64),
    FlakyThenOk(u64),
    Fatal(u64),
    /// Hangs on every attempt: times out twice, then fails.
    Hang,
    /// `when` is false.
    Skip,
}

impl Outcome {
    fn fails(self) -> bool {
        matches!(self, Outcome::Fatal(_) | Outcome::Hang)
    }
}

#[derive(Debug, Clone)]
struct Case {
    steps: Vec<(Vec<usize>, Outcome)>,
    cancel_at: Option<u64>,
    crash_at: Option<u64>,
}

fn outcome() -> impl Strategy<Value = Outcome> {
    let d = 0u64..5;
    prop_oneof![
        4 => d.clone().prop_map(|d| Outcome::Ok(d * 100)),
        2 => d.clone().prop_map(|d| Outcome::FlakyThenOk(d * 100)),
        1 => d.prop_map(|d| Outcome::Fatal(d * 100)),
        1 => Just(Outcome::Hang),
        2 => Just(Outcome::Skip),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..9)
        .prop_flat_map(|n| {
            let steps: Vec<_> = (0..n)
                .map(|i| (proptest::collection::vec(any::<bool>(), i), outcome()))
                .collect();
            (
                steps,
                proptest::option::of(0u64..3000),
                proptest::option::of(0u64..3000),
            )
        })
        .prop_map(|(steps, cancel_at, crash_at)| Case {
            steps: steps
                .into_iter()
                .map(|(mask, o)| {
                    (
                        mask.iter()
                            .enumerate()
                            .filter(|(_, b)| **b)
                            .map(|(i, _)| i)
                            .collect(),
                        o,
                    )
                })
                .collect(),
            cancel_at,
            crash_at,
        })
}

fn spec(case: &Case) -> String {
    let mut s = String::from(
        "apiVersion: clawos.dev/v1\nkind: Workflow\nmetadata: { name: p }\ninputs: { flag: { default: no } }\nagents: { a: { model: m } }\nsteps:\n",
    );
    for (i, (needs, o)) in case.steps.iter().enumerate() {
        let needs: Vec<String> = needs.iter().map(|n| format!("s{n}")).collect();
        let when = if matches!(o, Outcome::Skip) {
            ", when: \"inputs.flag == yes\""
        } else {
            ""
        };
        s.push_str(&format!(
            "  - {{ id: s{i}, needs: [{}], agent: a, prompt: p, timeout: 1s, retry: {{ max_attempts: 2, initial: 100ms, jitter: false }}{when} }}\n",
            needs.join(", ")
        ));
    }
    s
}

/// The state a run must end in without a cancel: failed iff some step that is not
/// skipped (by its `when` or because all its needs were) fails.
fn expected(case: &Case) -> RunState {
    let mut skipped = vec![false; case.steps.len()];
    for (i, (needs, o)) in case.steps.iter().enumerate() {
        skipped[i] =
            matches!(o, Outcome::Skip) || (!needs.is_empty() && needs.iter().all(|&n| skipped[n]));
    }
    if case
        .steps
        .iter()
        .enumerate()
        .any(|(i, (_, o))| !skipped[i] && o.fails())
    {
        RunState::Failed
    } else {
        RunState::Succeeded
    }
}

async fn check(case: Case) -> Result<(), TestCaseError> {
    let mut h = Harness::new().await;
    h.exec.set_reattach(Reattach::Resume);
    for (i, (_, o)) in case.steps.iter().enumerate() {
        let script = match *o {
            Outcome::Ok(d) => vec![Scripted::ok(format!("out{i}")).after(d)],
            Outcome::FlakyThenOk(d) => vec![
                Scripted::err(ErrorKind::Transient).after(d),
                Scripted::ok("ok").after(d),
            ],
            Outcome::Fatal(d) => vec![Scripted::err(ErrorKind::Fatal).after(d)],
            Outcome::Hang | Outcome::Skip => vec![Scripted::Hang],
        };
        h.exec.script(&format!("s{i}"), script);
    }
    let t0 = h.now();
    let run = h.submit(&spec(&case)).await;
    let mut cancel_at = case.cancel_at.map(|c| t0 + c);
    let mut crash_at = case.crash_at.map(|c| t0 + c);
    let mut calls_at_cancel = None;
    let mut cancelled = false;
    for _ in 0..500 {
        h.settle().await;
        if h.state(&run).is_final() && cancel_at.is_none() && crash_at.is_none() {
            break;
        }
        let next = [h.clock.next_deadline(), cancel_at, crash_at]
            .into_iter()
            .flatten()
            .min();
        let Some(next) = next else { break };
        h.clock.set(next.max(h.now()));
        h.settle().await;
        if cancel_at.is_some_and(|c| h.now() >= c) {
            cancel_at = None;
            cancelled = h.engine().cancel(&run).is_ok();
            calls_at_cancel = Some(
                h.exec
                    .calls()
                    .iter()
                    .filter(|c| matches!(c.kind, CallKind::Run | CallKind::Reattach))
                    .count(),
            );
        }
        if crash_at.is_some_and(|c| h.now() >= c) {
            crash_at = None;
            h.crash_and_reopen().await;
        }
    }
    h.settle().await;

    let state = h.state(&run);
    let want = if cancelled {
        RunState::Cancelled
    } else {
        expected(&case)
    };
    prop_assert_eq!(state, want, "case {:?}", case);

    let ev = h.events(&run);
    // Exactly one end, and it is the last event.
    let ends: Vec<usize> = ev
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.event, Event::RunFinished { .. }))
        .map(|(i, _)| i)
        .collect();
    prop_assert_eq!(ends, vec![ev.len() - 1]);
    prop_assert!(ev.windows(2).all(|w| w[1].seq == w[0].seq + 1));

    // A step starts (or is skipped) at most once, and only after all its needs finished.
    let mut finished_at: HashMap<String, u64> = HashMap::new();
    let mut started: HashMap<String, usize> = HashMap::new();
    for e in &ev {
        match &e.event {
            Event::StepSucceeded { step } | Event::StepSkipped { step, .. } => {
                prop_assert!(
                    finished_at.insert(step.clone(), e.seq).is_none(),
                    "{} finished twice",
                    step
                );
            }
            _ => {}
        }
        if let Event::StepStarted { step, .. } | Event::StepSkipped { step, .. } = &e.event {
            *started.entry(step.clone()).or_default() += 1;
            let i: usize = step[1..].parse().unwrap();
            for n in &case.steps[i].0 {
                let need = format!("s{n}");
                prop_assert!(
                    finished_at.get(&need).is_some_and(|&s| s < e.seq),
                    "{} started at seq {} before its need {} finished",
                    step,
                    e.seq,
                    need
                );
            }
        }
        if let Event::AttemptStarted { step, .. } = &e.event {
            prop_assert!(
                started.contains_key(step),
                "attempt of {} before it started",
                step
            );
        }
    }
    prop_assert!(
        started.values().all(|&n| n == 1),
        "a join fired twice: {:?}",
        started
    );
    if state == RunState::Succeeded {
        prop_assert_eq!(started.len(), case.steps.len());
    }

    // Each attempt was handed to the executor once (re-attaches aside).
    let mut keys = HashMap::new();
    for c in h.exec.calls().iter().filter(|c| c.kind == CallKind::Run) {
        let k = c.task.as_ref().unwrap().idempotency_key.clone();
        *keys.entry(k).or_insert(0) += 1;
    }
    prop_assert!(
        keys.values().all(|&n| n == 1),
        "an attempt ran twice: {:?}",
        keys
    );

    // Nothing starts after a cancel.
    if let (true, Some(n)) = (cancelled, calls_at_cancel) {
        h.advance(100_000).await;
        let now = h
            .exec
            .calls()
            .iter()
            .filter(|c| matches!(c.kind, CallKind::Run | CallKind::Reattach))
            .count();
        prop_assert_eq!(now, n, "the executor was called after the cancel");
        prop_assert_eq!(h.events(&run).len(), ev.len());
    }
    Ok(())
}

proptest! {
    // PROPTEST_CASES=5000 for a longer soak.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_dags_behave(case in case()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(check(case))?;
    }
}
