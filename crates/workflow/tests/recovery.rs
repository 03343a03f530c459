//! Crash recovery: the engine is dropped mid-run without shutdown (as a kill would
//! leave it) and reopened on the same journal. The real `kill -9` of a process is in
//! `crates/orchestrator/tests/api.rs` (the daemon) and `tests/e2e/workflow.rs` (with VMs).
#![allow(clippy::unwrap_used)]

mod common;

use clawos_workflow::testing::{CallKind, Reattach, Scripted, ScriptedExecutor};
use clawos_workflow::{
    Engine, EngineError, ErrorKind, Event, FakeClock, JournalError, RunState, StepState,
};
use common::{Harness, T0, config, count};

fn spec(steps: &str) -> String {
    format!(
        "apiVersion: clawos.dev/v1\nkind: Workflow\nmetadata: {{ name: r }}\nagents: {{ a: {{ model: m }} }}\nsteps:\n{steps}"
    )
}

#[tokio::test]
async fn completed_steps_are_not_rerun_and_in_flight_attempts_reattach() {
    let mut h = Harness::new().await;
    h.exec.script("b", vec![Scripted::ok("b-out").after(1000)]);
    let run = h
        .submit(&spec(
            "  - { id: a, agent: a, prompt: p }\n  - { id: b, needs: [a], agent: a, prompt: \"{{ steps.a.output }}\" }\n  - { id: c, needs: [b], agent: a, prompt: \"{{ steps.b.output }}\" }\n",
        ))
        .await;
    h.settle().await;
    assert_eq!(h.exec.in_flight(), 1, "b is running");
    h.crash().await;
    assert_eq!(
        h.exec.in_flight(),
        0,
        "the dead engine's attempt future is gone"
    );
    h.exec.set_reattach(Reattach::Resume);
    h.reopen().await;
    assert_eq!(h.run_to_end(&run, 5).await, RunState::Succeeded);
    assert_eq!(
        h.exec.runs_of("a").len(),
        1,
        "a finished before the crash: never re-run"
    );
    let b = h.exec.runs_of("b");
    assert_eq!(b.len(), 2);
    assert_eq!((b[1].0, b[1].1.attempt), (CallKind::Reattach, 1));
    assert_eq!(
        b[1].1.idempotency_key, b[0].1.idempotency_key,
        "same attempt, same key"
    );
    assert_eq!(b[1].1.prompt, "a done", "the task is rebuilt identically");
    let c = h.exec.runs_of("c");
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].1.prompt, "b-out");
    let ev = h.events(&run);
    assert_eq!(count(&ev, "attempt_started", "b"), 1);
    assert!(ev.windows(2).all(|w| w[1].seq == w[0].seq + 1));
}

#[tokio::test]
async fn lost_attempts_are_retried() {
    let mut h = Harness::new().await;
    h.exec
        .script("b", vec![Scripted::Hang, Scripted::ok("second")]);
    let run = h
        .submit(&spec(
            "  - { id: b, agent: a, prompt: p, retry: { initial: 2s, jitter: false } }\n",
        ))
        .await;
    h.settle().await;
    h.crash().await;
    h.advance(5000).await;
    h.reopen().await; // Reattach::Lost
    h.settle().await;
    let st = h.engine().status(&run).unwrap();
    assert_eq!(st.steps[0].state, StepState::Retrying);
    assert_eq!(st.steps[0].retry_at_ms, Some(T0 + 5000 + 2000));
    assert_eq!(h.run_to_end(&run, 5).await, RunState::Succeeded);
    let b = h.exec.runs_of("b");
    let seen: Vec<(CallKind, u32, u64)> = b.iter().map(|(k, t, at)| (*k, t.attempt, *at)).collect();
    assert_eq!(
        seen,
        vec![
            (CallKind::Run, 1, T0),
            (CallKind::Reattach, 1, T0 + 5000),
            (CallKind::Run, 2, T0 + 7000)
        ]
    );
    assert_eq!(b[2].1.idempotency_key, format!("{run}/b/2"));
}

#[tokio::test]
async fn attempt_deadlines_survive_a_restart() {
    let mut h = Harness::new().await;
    h.exec.script("b", vec![Scripted::Hang, Scripted::ok("x")]);
    h.exec.set_reattach(Reattach::Resume);
    let run = h.submit(&spec("  - { id: b, agent: a, prompt: p, timeout: 30s, retry: { initial: 1s, jitter: false } }\n")).await;
    h.advance(10_000).await;
    h.crash_and_reopen().await;
    h.advance(19_999).await;
    assert!(h.exec.cancelled().is_empty());
    h.advance(1).await;
    assert_eq!(
        h.exec.cancelled(),
        vec!["b".to_string()],
        "timed out at the journaled deadline"
    );
    assert_eq!(h.run_to_end(&run, 5).await, RunState::Succeeded);
    assert_eq!(h.exec.runs_of("b").last().unwrap().2, T0 + 31_000);
}

#[tokio::test]
async fn approval_waits_resume_and_can_be_decided_after_a_restart() {
    let mut h = Harness::new().await;
    let steps = "  - { id: a, agent: a, prompt: p }\n  - { id: ok, kind: approval, needs: [a], timeout: 1h, default: reject }\n  - { id: c, needs: [ok], agent: a, prompt: p }\n";
    let run = h.submit(&spec(steps)).await;
    h.settle().await;
    h.crash_and_reopen().await;
    h.settle().await;
    assert_eq!(
        h.engine().status(&run).unwrap().steps[1].state,
        StepState::Waiting
    );
    assert_eq!(
        h.clock.next_deadline(),
        Some(T0 + 3_600_000),
        "the timeout is re-armed"
    );
    h.engine().approve(&run, "ok", true, None).unwrap();
    assert_eq!(h.run_to_end(&run, 5).await, RunState::Succeeded);
    assert_eq!(h.exec.runs_of("a").len(), 1);
    assert_eq!(h.exec.runs_of("c").len(), 1);
}

#[tokio::test]
async fn approval_deadlines_that_passed_while_down_fire_at_open() {
    let mut h = Harness::new().await;
    let steps = "  - { id: ok, kind: approval, timeout: 1h, default: approve }\n  - { id: c, needs: [ok], agent: a, prompt: p }\n";
    let run = h.submit(&spec(steps)).await;
    h.settle().await;
    h.crash().await;
    h.advance(2 * 3_600_000).await;
    h.reopen().await;
    h.settle().await;
    let st = h.engine().status(&run).unwrap();
    assert_eq!(st.state, RunState::Succeeded);
    assert!(st.steps[0].approval.as_ref().unwrap().by_timeout);
}

#[tokio::test]
async fn retry_backoffs_resume() {
    let mut h = Harness::new().await;
    h.exec.script(
        "b",
        vec![Scripted::err(ErrorKind::Transient), Scripted::ok("x")],
    );
    let run = h
        .submit(&spec(
            "  - { id: b, agent: a, prompt: p, retry: { initial: 10s, jitter: false } }\n",
        ))
        .await;
    h.settle().await;
    h.crash_and_reopen().await;
    h.advance(9_999).await;
    assert_eq!(h.exec.runs_of("b").len(), 1);
    h.advance(1).await;
    assert_eq!(h.exec.runs_of("b").len(), 2);
    assert_eq!(
        h.engine().wait(&run).await.unwrap().state,
        RunState::Succeeded
    );
}

#[tokio::test]
async fn joins_fire_once_across_restarts() {
    let mut h = Harness::new().await;
    h.exec.script("slow", vec![Scripted::ok("s").after(100)]);
    h.exec.set_reattach(Reattach::Resume);
    let run = h
        .submit(&spec("  - { id: fast, agent: a, prompt: p }\n  - { id: slow, agent: a, prompt: p }\n  - { id: join, needs: [fast, slow], agent: a, prompt: p }\n"))
        .await;
    h.settle().await;
    for _ in 0..3 {
        h.crash_and_reopen().await;
        h.settle().await;
    }
    assert_eq!(h.run_to_end(&run, 5).await, RunState::Succeeded);
    assert_eq!(h.exec.runs_of("join").len(), 1);
    assert_eq!(count(&h.events(&run), "step_started", "join"), 1);
    assert_eq!(h.exec.runs_of("fast").len(), 1);
}

#[tokio::test]
async fn map_items_in_flight_resume() {
    let mut h = Harness::new().await;
    h.exec.script("m", vec![Scripted::ok("ok").after(100)]);
    h.exec.set_reattach(Reattach::Resume);
    let run = h
        .submit(&spec("  - { id: m, kind: map, over: [a, b, c, d, e], max_parallel: 2, agent: a, prompt: \"{{ item }}\" }\n"))
        .await;
    h.advance(100).await; // items 0 and 1 done, 2 and 3 started
    h.crash_and_reopen().await;
    assert_eq!(h.run_to_end(&run, 10).await, RunState::Succeeded);
    let calls: Vec<(CallKind, String)> = h
        .exec
        .runs_of("m")
        .into_iter()
        .map(|(k, t, _)| (k, t.step))
        .collect();
    let n = |step: &str| calls.iter().filter(|(_, s)| s == step).count();
    assert_eq!(
        (n("m[0]"), n("m[1]"), n("m[2]"), n("m[3]"), n("m[4]")),
        (1, 1, 2, 2, 1)
    );
    assert!(calls.contains(&(CallKind::Reattach, "m[2]".into())));
    assert!(h.exec.max_in_flight("m") <= 2);
    assert_eq!(
        h.engine().output(&run, "m").unwrap(),
        r#"["ok","ok","ok","ok","ok"]"#
    );
}

#[tokio::test]
async fn finished_runs_are_listed_and_readable_after_reopen() {
    let mut h = Harness::new().await;
    let done = h
        .submit(&spec("  - { id: a, agent: a, prompt: p }\n"))
        .await;
    h.settle().await;
    assert_eq!(h.state(&done), RunState::Succeeded);
    let before = h.engine().status(&done).unwrap();
    h.crash_and_reopen().await;
    let list = h.engine().list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].state, RunState::Succeeded);
    let after = h.engine().status(&done).unwrap();
    assert_eq!(before, after, "rebuilt from the journal");
    assert_eq!(
        h.engine().events(&done, 0).unwrap().len(),
        h.events(&done).len()
    );
    assert_eq!(h.engine().output(&done, "a").unwrap(), "a done");
    assert!(matches!(
        h.engine().cancel(&done),
        Err(EngineError::NotRunning { .. })
    ));
    assert_eq!(
        h.engine().wait(&done).await.unwrap().state,
        RunState::Succeeded
    );
    assert_eq!(h.exec.runs_of("a").len(), 1);
}

#[tokio::test]
async fn a_second_engine_on_the_same_journal_is_refused() {
    let h = Harness::new().await;
    let other = ScriptedExecutor::new(h.clock.clone());
    let e = Engine::open(config(h.dir.path()), other, FakeClock::new(T0))
        .await
        .unwrap_err();
    assert!(
        matches!(e, EngineError::Journal(JournalError::Locked { .. })),
        "{e}"
    );
}

#[tokio::test]
async fn a_failed_journal_write_stalls_the_run_until_reopen() {
    let mut h = Harness::new().await;
    let run = h
        .submit(&spec("  - { id: gate, kind: approval, timeout: 1h }\n  - { id: after, needs: [gate], agent: a, prompt: p }\n"))
        .await;
    h.settle().await;
    let engine = h.engine().clone();
    let waiter = tokio::spawn(async move { engine.wait(&run).await });
    let run = h.engine().list()[0].run.clone();
    // Break the journal behind the engine's back.
    let db = rusqlite::Connection::open(h.dir.path().join("journal.db")).unwrap();
    db.execute_batch("ALTER TABLE events RENAME TO events_away")
        .unwrap();
    let e = h.engine().approve(&run, "gate", true, None).unwrap_err();
    assert!(matches!(e, EngineError::Journal(_)), "{e}");
    assert!(matches!(
        waiter.await.unwrap(),
        Err(EngineError::Stalled { .. })
    ));
    assert!(matches!(
        h.engine().approve(&run, "gate", true, None),
        Err(EngineError::Stalled { .. })
    ));
    assert!(matches!(
        h.engine().cancel(&run),
        Err(EngineError::Stalled { .. })
    ));
    assert!(
        h.exec.runs_of("after").is_empty(),
        "nothing unjournaled took effect"
    );
    // Repaired: status answers from the journal (still waiting, no decision).
    db.execute_batch("ALTER TABLE events_away RENAME TO events")
        .unwrap();
    drop(db);
    assert_eq!(
        h.engine().status(&run).unwrap().steps[0].state,
        StepState::Waiting
    );
    // The next open resumes it.
    h.crash_and_reopen().await;
    h.engine().approve(&run, "gate", true, None).unwrap();
    assert_eq!(h.run_to_end(&run, 3).await, RunState::Succeeded);
}

#[tokio::test]
async fn runs_that_cannot_be_rebuilt_are_failed_not_left_running() {
    let mut h = Harness::new().await;
    h.exec.script("a", vec![Scripted::Hang]);
    let run = h
        .submit(&spec("  - { id: a, agent: a, prompt: p }\n"))
        .await;
    h.settle().await;
    h.crash().await;
    let db = rusqlite::Connection::open(h.dir.path().join("journal.db")).unwrap();
    db.execute(
        "UPDATE runs SET spec = 'not: a: spec' WHERE run_id = ?1",
        [run.as_str()],
    )
    .unwrap();
    drop(db);
    h.reopen().await;
    let list = h.engine().list();
    assert_eq!(list[0].state, RunState::Failed);
    assert!(
        list[0]
            .reason
            .as_deref()
            .unwrap()
            .starts_with("cannot be recovered: run"),
        "{:?}",
        list[0].reason
    );
    let ev = h.events(&run);
    assert!(matches!(
        ev.last().unwrap().event,
        Event::RunFinished {
            state: RunState::Failed,
            ..
        }
    ));
    assert!(ev.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    h.crash_and_reopen().await;
    assert_eq!(
        h.engine().list()[0].state,
        RunState::Failed,
        "and it stays so"
    );
}
