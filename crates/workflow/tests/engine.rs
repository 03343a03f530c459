//! The engine with a fake clock and a scripted executor.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use clawos_workflow::testing::{CallKind, Scripted};
use clawos_workflow::{EngineError, ErrorKind, Event, RunState, StepState};
use common::{Harness, T0, count, kinds};

fn spec(agents: &str, steps: &str) -> String {
    format!(
        "apiVersion: clawos.dev/v1\nkind: Workflow\nmetadata: {{ name: t }}\ninputs: {{ topic: {{ default: unikernels }} }}\nagents:\n{agents}\nsteps:\n{steps}"
    )
}

const AGENTS: &str = "  a: { model: m, budget_tokens: 500 }\n  b: { model: m2, vm: reuse }";

#[tokio::test]
async fn dag_order_templates_and_joins() {
    let h = Harness::new().await;
    h.exec.script("left", vec![Scripted::ok("L-out").after(50)]);
    h.exec
        .script("right", vec![Scripted::ok("R-out\nsecond").after(10)]);
    let run = h
        .submit(&spec(
            AGENTS,
            r#"
  - { id: root, agent: a, prompt: "start {{ inputs.topic }}" }
  - { id: left, needs: [root], agent: a, prompt: "left of {{ steps.root.output }}", budget_tokens: 7 }
  - { id: right, needs: [root], agent: b, prompt: "right" }
  - { id: join, needs: [left, right], agent: a, prompt: "{{ steps.left.output }}|{{ steps.right.output_lines }}|{{ steps.root.outcome }}" }
"#,
        ))
        .await;
    assert_eq!(h.run_to_end(&run, 10).await, RunState::Succeeded);

    let root = h.exec.runs_of("root");
    assert_eq!(root.len(), 1);
    assert_eq!(root[0].1.prompt, "start unikernels");
    assert_eq!(root[0].1.budget_tokens, Some(500), "the agent's budget");
    assert_eq!(root[0].1.idempotency_key, format!("{run}/root/1"));
    assert_eq!(root[0].1.agent_name, "a");
    let left = h.exec.runs_of("left");
    assert_eq!(left[0].1.prompt, "left of root done");
    assert_eq!(
        left[0].1.budget_tokens,
        Some(7),
        "the step's budget overrides"
    );
    assert_eq!(
        h.exec.runs_of("right")[0].1.agent.vm,
        clawos_workflow::VmMode::Reuse
    );
    let join = h.exec.runs_of("join");
    assert_eq!(join.len(), 1, "a join fires exactly once");
    assert_eq!(join[0].1.prompt, "L-out|R-out\nsecond|succeeded");
    assert_eq!(
        join[0].2,
        T0 + 50,
        "the join starts when its last need finished"
    );

    let ev = h.events(&run);
    for s in ["root", "left", "right", "join"] {
        assert_eq!(count(&ev, "step_started", s), 1, "{s}");
        assert_eq!(count(&ev, "step_succeeded", s), 1, "{s}");
    }
    let pos = |k: &str| kinds(&ev).iter().position(|x| x == k).unwrap();
    assert!(pos("step_succeeded:root") < pos("step_started:left"));
    assert!(pos("step_succeeded:left") < pos("step_started:join"));
    assert!(pos("step_succeeded:right") < pos("step_started:join"));
    assert_eq!(ev.first().unwrap().event.kind(), "run_submitted");
    assert_eq!(ev.last().unwrap().event.kind(), "run_finished");
    assert!(
        ev.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "seq has no gaps"
    );

    let st = h.engine().status(&run).unwrap();
    assert_eq!(st.tokens, 40);
    assert_eq!(st.duration_ms, 50);
    let left = &st.steps[1];
    assert_eq!(
        (
            left.state,
            left.attempts,
            left.started_ms,
            left.finished_ms,
            left.duration_ms
        ),
        (StepState::Succeeded, 1, Some(T0), Some(T0 + 50), Some(50))
    );
    assert_eq!(left.output, "L-out");
    assert!(left.vm.as_deref().unwrap().starts_with("vm-"));
    assert_eq!(h.engine().output(&run, "right").unwrap(), "R-out\nsecond");
    assert_eq!(h.engine().list().len(), 1);
    // The executor heard about the end once.
    assert_eq!(
        h.exec
            .calls()
            .iter()
            .filter(|c| c.kind == CallKind::RunFinished)
            .count(),
        1
    );
}

#[tokio::test]
async fn when_false_skips_and_skips_cascade() {
    let h = Harness::new().await;
    h.exec
        .script("check", vec![Scripted::ok("verdict: NEEDS WORK")]);
    let run = h
        .submit(&spec(
            AGENTS,
            r#"
  - { id: check, agent: a, prompt: check }
  - { id: ship, needs: [check], agent: a, prompt: ship, when: "steps.check.output contains 'LGTM'" }
  - { id: announce, needs: [ship], agent: a, prompt: "announce {{ steps.ship.output }}" }
  - { id: fix, needs: [check], agent: a, prompt: fix, when: "steps.check.output not contains LGTM" }
  - { id: report, needs: [ship, fix], agent: a, prompt: "[{{ steps.ship.output }}][{{ steps.ship.outcome }}][{{ steps.fix.output }}]" }
  - { id: by-input, needs: [check], agent: a, prompt: x, when: "inputs.topic != unikernels" }
"#,
        ))
        .await;
    assert_eq!(h.run_to_end(&run, 5).await, RunState::Succeeded);
    let st = h.engine().status(&run).unwrap();
    let state = |id: &str| st.steps.iter().find(|s| s.id == id).unwrap().clone();
    assert_eq!(state("ship").state, StepState::Skipped);
    assert_eq!(
        state("ship").skip_reason.as_deref(),
        Some("when `steps.check.output contains 'LGTM'` is false")
    );
    assert_eq!(state("announce").state, StepState::Skipped);
    assert_eq!(
        state("announce").skip_reason.as_deref(),
        Some("all its needs were skipped")
    );
    assert_eq!(state("fix").state, StepState::Succeeded);
    assert_eq!(state("by-input").state, StepState::Skipped);
    assert_eq!(
        h.exec.runs_of("report")[0].1.prompt,
        "[][skipped][fix done]",
        "a skipped step reads as empty"
    );
    assert!(h.exec.runs_of("ship").is_empty() && h.exec.runs_of("announce").is_empty());
}

const APPROVAL: &str = r#"
  - { id: draft, agent: a, prompt: draft }
  - { id: approve, kind: approval, needs: [draft], timeout: 1h, default: DEFAULT }
  - { id: publish, needs: [approve], agent: a, prompt: "publish ({{ steps.approve.output }})", when: "steps.approve.outcome == approved" }
"#;

#[tokio::test]
async fn approval_approved() {
    let h = Harness::new().await;
    let run = h
        .submit(&spec(AGENTS, &APPROVAL.replace("DEFAULT", "reject")))
        .await;
    h.settle().await;
    let st = h.engine().status(&run).unwrap();
    assert_eq!(st.state, RunState::Running);
    let ap = &st.steps[1];
    assert_eq!(ap.state, StepState::Waiting);
    assert_eq!(ap.deadline_ms, Some(T0 + 3_600_000));
    assert_eq!(ap.approval.as_ref().unwrap().approved, None);
    assert!(h.exec.runs_of("publish").is_empty());

    // Errors: not an approval, unknown step, unknown run.
    assert!(matches!(
        h.engine().approve(&run, "draft", true, None),
        Err(EngineError::NotApproval { .. })
    ));
    assert!(matches!(
        h.engine().approve(&run, "nope", true, None),
        Err(EngineError::UnknownStep { .. })
    ));
    let other = "0123456789ab0123456789abcdef".parse().unwrap();
    assert!(matches!(
        h.engine().approve(&other, "approve", true, None),
        Err(EngineError::UnknownRun(_))
    ));
    assert!(matches!(
        h.engine()
            .approve(&run, "approve", true, Some("x".repeat(17 << 10))),
        Err(EngineError::TooLarge { .. })
    ));

    h.engine()
        .approve(&run, "approve", true, Some("looks good".into()))
        .unwrap();
    // Acknowledged means journaled.
    let ev = h.events(&run);
    assert!(ev.iter().any(|e| matches!(&e.event, Event::ApprovalDecided { approved: true, by_timeout: false, reason: Some(r), .. } if r == "looks good")));
    assert!(matches!(
        h.engine().approve(&run, "approve", false, None),
        Err(EngineError::NotWaiting { .. })
    ));
    assert_eq!(h.run_to_end(&run, 3).await, RunState::Succeeded);
    assert_eq!(
        h.exec.runs_of("publish")[0].1.prompt,
        "publish (looks good)"
    );
    let ap = h.engine().status(&run).unwrap().steps[1].clone();
    assert_eq!(ap.state, StepState::Succeeded);
    assert_eq!(ap.approval.unwrap().approved, Some(true));
    assert!(matches!(
        h.engine().approve(&run, "approve", true, None),
        Err(EngineError::NotRunning { .. })
    ));
    // The approval timer is gone.
    assert_eq!(h.clock.sleepers(), 0);
}

#[tokio::test]
async fn approval_rejected_ends_the_run() {
    let h = Harness::new().await;
    let run = h
        .submit(&spec(AGENTS, &APPROVAL.replace("DEFAULT", "approve")))
        .await;
    h.settle().await;
    h.engine()
        .approve(&run, "approve", false, Some("too thin".into()))
        .unwrap();
    h.settle().await;
    let st = h.engine().wait(&run).await.unwrap();
    assert_eq!(st.state, RunState::Rejected);
    assert_eq!(
        st.reason.as_deref(),
        Some("step \"approve\" was rejected: too thin")
    );
    assert_eq!(st.steps[1].state, StepState::Rejected);
    assert_eq!(st.steps[2].state, StepState::Pending, "never started");
    h.advance(10_000_000).await;
    assert!(h.exec.runs_of("publish").is_empty());
}

#[tokio::test]
async fn approval_timeout_applies_the_default() {
    for (default, want) in [
        ("approve", RunState::Succeeded),
        ("reject", RunState::Rejected),
    ] {
        let h = Harness::new().await;
        let run = h
            .submit(&spec(AGENTS, &APPROVAL.replace("DEFAULT", default)))
            .await;
        h.settle().await;
        h.advance(3_600_000 - 1).await;
        assert_eq!(
            h.engine().status(&run).unwrap().steps[1].state,
            StepState::Waiting
        );
        h.advance(1).await;
        assert_eq!(h.run_to_end(&run, 3).await, want, "default {default}");
        let ap = h.engine().status(&run).unwrap().steps[1]
            .approval
            .clone()
            .unwrap();
        assert!(ap.by_timeout);
        assert_eq!(ap.reason.as_deref(), Some("no decision within 1h"));
        assert_eq!(
            h.exec.runs_of("publish").len(),
            usize::from(default == "approve")
        );
    }
}

#[tokio::test]
async fn map_respects_max_parallel_and_collects_outputs() {
    let h = Harness::new().await;
    h.exec.script(
        "list",
        vec![Scripted::ok(
            "f0.md\n\n f1.md \nf2.md\nf3.md\nf4.md\nf5.md\nf6.md\n",
        )],
    );
    h.exec.script("review", vec![Scripted::ok("ok").after(100)]);
    h.exec
        .script_exact("review[4]", vec![Scripted::ok("slow").after(350)]);
    h.exec.script_exact(
        "review[5]",
        vec![
            Scripted::err(ErrorKind::Transient).after(10),
            Scripted::ok("retried").after(10),
        ],
    );
    let run = h
        .submit(&spec(
            AGENTS,
            r#"
  - { id: list, agent: a, prompt: list }
  - id: review
    kind: map
    needs: [list]
    over: "{{ steps.list.output_lines }}"
    max_parallel: 3
    agent: b
    prompt: "review {{ item }} #{{ index }} after {{ steps.list.outcome }}"
    retry: { initial: 1s, jitter: false }
  - { id: sum, needs: [review], agent: a, prompt: "{{ steps.review.output }}" }
"#,
        ))
        .await;
    assert_eq!(h.run_to_end(&run, 50).await, RunState::Succeeded);
    assert_eq!(
        h.exec.max_in_flight("review"),
        3,
        "never more than max_parallel"
    );
    let calls = h.exec.runs_of("review");
    assert_eq!(calls.len(), 8, "7 items, one retried");
    assert_eq!(calls[1].1.step, "review[1]");
    assert_eq!(calls[1].1.prompt, "review f1.md #1 after succeeded");
    assert_eq!(calls[1].1.idempotency_key, format!("{run}/review[1]/1"));
    let st = h.engine().status(&run).unwrap();
    let review = &st.steps[1];
    assert_eq!(review.items.len(), 7);
    assert_eq!(review.items[5].attempts, 2);
    assert_eq!(review.attempts, 8);
    assert_eq!(
        h.engine().output(&run, "review").unwrap(),
        r#"["ok","ok","ok","ok","slow","retried","ok"]"#
    );
    assert_eq!(
        h.exec.runs_of("sum")[0].1.prompt,
        r#"["ok","ok","ok","ok","slow","retried","ok"]"#
    );
}

#[tokio::test]
async fn map_fails_when_an_item_fails_and_empty_maps_succeed() {
    let h = Harness::new().await;
    h.exec.script("m", vec![Scripted::ok("ok").after(100)]);
    h.exec
        .script_exact("m[1]", vec![Scripted::err(ErrorKind::Fatal).after(10)]);
    let run = h
        .submit(&spec(
            AGENTS,
            r#"
  - { id: m, kind: map, over: [x, y, z, w], max_parallel: 2, agent: a, prompt: "{{ item }}" }
  - { id: empty, kind: map, over: [], agent: a, prompt: "{{ item }}" }
"#,
        ))
        .await;
    assert_eq!(h.run_to_end(&run, 10).await, RunState::Failed);
    let st = h.engine().status(&run).unwrap();
    assert_eq!(st.steps[0].state, StepState::Failed);
    assert!(
        st.reason
            .as_deref()
            .unwrap()
            .contains("item 1 (\"y\") failed after 1 attempt(s): fatal: scripted fatal"),
        "{:?}",
        st.reason
    );
    assert_eq!(
        h.exec.cancelled(),
        vec!["m[0]".to_string()],
        "the other running item is cancelled"
    );
    assert!(
        h.exec.runs_of("m").len() == 2,
        "nothing starts after the failure"
    );
    assert_eq!(
        st.steps[1].state,
        StepState::Succeeded,
        "an empty map succeeds at once"
    );
}

#[tokio::test]
async fn retries_back_off_on_the_clock() {
    let h = Harness::new().await;
    h.exec.script(
        "flaky",
        vec![
            Scripted::err(ErrorKind::Transient),
            Scripted::err(ErrorKind::Lost).after(500),
            Scripted::err(ErrorKind::Transient),
            Scripted::ok("finally"),
        ],
    );
    let run = h
        .submit(&spec(
            AGENTS,
            "  - { id: flaky, agent: a, prompt: p, retry: { max_attempts: 4, initial: 1s, factor: 3, max_interval: 5s, jitter: false } }\n",
        ))
        .await;
    h.settle().await;
    let st = h.engine().status(&run).unwrap();
    assert_eq!(st.steps[0].state, StepState::Retrying);
    assert_eq!(st.steps[0].retry_at_ms, Some(T0 + 1000));
    assert_eq!(
        st.steps[0].error.as_deref(),
        Some("transient: scripted transient")
    );
    h.advance(999).await;
    assert_eq!(h.exec.runs_of("flaky").len(), 1, "not before the backoff");
    assert_eq!(h.run_to_end(&run, 10).await, RunState::Succeeded);
    let at: Vec<(u32, String, u64)> = h
        .exec
        .runs_of("flaky")
        .into_iter()
        .map(|(_, t, at)| (t.attempt, t.idempotency_key, at))
        .collect();
    // 1s, then 3s after the 500ms attempt, then min(9s, 5s).
    assert_eq!(
        at,
        vec![
            (1, format!("{run}/flaky/1"), T0),
            (2, format!("{run}/flaky/2"), T0 + 1000),
            (3, format!("{run}/flaky/3"), T0 + 1000 + 500 + 3000),
            (4, format!("{run}/flaky/4"), T0 + 4500 + 5000),
        ]
    );
    assert_eq!(h.engine().status(&run).unwrap().steps[0].attempts, 4);
}

#[tokio::test]
async fn jitter_stays_within_the_backoff() {
    let h = Harness::new().await;
    h.exec.script(
        "j",
        vec![Scripted::err(ErrorKind::Transient), Scripted::ok("x")],
    );
    let run = h
        .submit(&spec(
            AGENTS,
            "  - { id: j, agent: a, prompt: p, retry: { initial: 10s } }\n",
        ))
        .await;
    h.settle().await;
    let at = h.engine().status(&run).unwrap().steps[0]
        .retry_at_ms
        .unwrap();
    assert!((T0..=T0 + 10_000).contains(&at), "{at}");
    assert_eq!(h.run_to_end(&run, 5).await, RunState::Succeeded);
}

#[tokio::test]
async fn timeouts_are_enforced_cancelled_and_retried() {
    let h = Harness::new().await;
    h.exec.script(
        "slow",
        vec![Scripted::Hang, Scripted::ok("done").after(100)],
    );
    let run = h
        .submit(&spec(AGENTS, "  - { id: slow, agent: a, prompt: p, timeout: 30s, retry: { initial: 2s, jitter: false } }\n"))
        .await;
    h.settle().await;
    assert_eq!(
        h.engine().status(&run).unwrap().steps[0].deadline_ms,
        Some(T0 + 30_000)
    );
    assert_eq!(h.run_to_end(&run, 10).await, RunState::Succeeded);
    let runs = h.exec.runs_of("slow");
    assert_eq!(
        runs.iter().map(|r| r.2).collect::<Vec<_>>(),
        vec![T0, T0 + 32_000]
    );
    assert_eq!(h.exec.cancelled(), vec!["slow".to_string()]);
    let ev = h.events(&run);
    assert!(ev.iter().any(|e| matches!(&e.event, Event::AttemptFailed { error, attempt: 1, .. } if error.kind == ErrorKind::Timeout && error.message == "no answer within 30s")));
}

#[tokio::test]
async fn budget_and_fatal_errors_are_not_retried() {
    for kind in [ErrorKind::Budget, ErrorKind::Fatal] {
        let h = Harness::new().await;
        h.exec
            .script("spend", vec![Scripted::err(kind), Scripted::ok("never")]);
        h.exec.script("other", vec![Scripted::Hang]);
        let run = h
            .submit(&spec(
                AGENTS,
                "  - { id: other, agent: a, prompt: p }\n  - { id: spend, agent: a, prompt: p }\n  - { id: after, needs: [spend], agent: a, prompt: p }\n",
            ))
            .await;
        h.settle().await;
        let st = h.engine().wait(&run).await.unwrap();
        assert_eq!(st.state, RunState::Failed);
        assert_eq!(h.exec.runs_of("spend").len(), 1, "{kind} is not retried");
        assert_eq!(
            st.reason.as_deref(),
            Some(
                format!("step \"spend\" failed after 1 attempt(s): {kind}: scripted {kind}")
                    .as_str()
            )
        );
        assert_eq!(st.steps[1].state, StepState::Failed);
        assert_eq!(
            st.steps[0].state,
            StepState::Cancelled,
            "other running steps are cancelled"
        );
        h.settle().await;
        assert_eq!(h.exec.cancelled(), vec!["other".to_string()]);
        assert!(h.exec.runs_of("after").is_empty());
    }
}

#[tokio::test]
async fn cancel_stops_everything() {
    let h = Harness::new().await;
    h.exec.script("long", vec![Scripted::ok("x").after(60_000)]);
    h.exec
        .script("flaky", vec![Scripted::err(ErrorKind::Transient)]);
    let run = h
        .submit(&spec(
            AGENTS,
            r#"
  - { id: long, agent: a, prompt: p }
  - { id: flaky, agent: a, prompt: p, retry: { initial: 5s, jitter: false } }
  - { id: next, needs: [long], agent: a, prompt: p }
  - { id: gate, kind: approval }
"#,
        ))
        .await;
    h.settle().await;
    h.advance(1000).await;
    h.engine().cancel(&run).unwrap();
    h.settle().await;
    let st = h.engine().status(&run).unwrap();
    assert_eq!(st.state, RunState::Cancelled);
    assert_eq!(st.steps[0].state, StepState::Cancelled);
    assert_eq!(
        st.steps[1].state,
        StepState::Cancelled,
        "a retry wait is cancelled too"
    );
    assert_eq!(st.steps[3].state, StepState::Cancelled);
    assert_eq!(h.exec.cancelled(), vec!["long".to_string()]);
    let before = h.exec.calls().len();
    let events = h.events(&run).len();
    // Nothing starts after a cancel, however long we wait.
    h.advance(10_000_000).await;
    assert_eq!(h.exec.calls().len(), before);
    assert_eq!(h.events(&run).len(), events);
    assert_eq!(h.clock.sleepers(), 0, "no timers left");
    assert!(matches!(
        h.engine().cancel(&run),
        Err(EngineError::NotRunning {
            state: RunState::Cancelled,
            ..
        })
    ));
    assert!(matches!(
        h.engine().approve(&run, "gate", true, None),
        Err(EngineError::NotRunning { .. })
    ));
}

#[tokio::test]
async fn artifacts_flow_between_steps() {
    let h = Harness::new().await;
    h.exec.script(
        "research",
        vec![
            Scripted::ok("notes written")
                .with_file("notes.md", b"# Notes")
                .with_file("data/x.csv", b"1,2"),
        ],
    );
    h.exec
        .script("m", vec![Scripted::ok("r").with_file("review.md", b"fine")]);
    let run = h
        .submit(&spec(
            AGENTS,
            r#"
  - { id: research, agent: a, prompt: p }
  - { id: m, kind: map, needs: [research], over: [a, b], agent: a, prompt: "{{ item }}", inputs: [research] }
  - { id: write, needs: [m], agent: a, prompt: p, inputs: [research, m] }
"#,
        ))
        .await;
    assert_eq!(h.run_to_end(&run, 5).await, RunState::Succeeded);
    let write = &h.exec.runs_of("write")[0].1;
    let dirs: Vec<(&str, &str)> = write
        .inputs
        .iter()
        .map(|(d, a)| (d.as_str(), a.name.as_str()))
        .collect();
    assert_eq!(
        dirs,
        vec![
            ("research", "notes.md"),
            ("research", "data/x.csv"),
            ("m/0", "review.md"),
            ("m/1", "review.md")
        ]
    );
    assert_eq!(h.exec.runs_of("m")[0].1.inputs.len(), 2);
    let arts = h.engine().artifacts(&run).unwrap();
    assert_eq!(arts.len(), 4);
    for a in &arts {
        assert_eq!(h.engine().store().verify(&a.sha256).unwrap(), a.size);
    }
    assert_eq!(h.engine().status(&run).unwrap().steps[0].artifacts.len(), 2);
}

#[tokio::test]
async fn artifacts_missing_from_the_store_fail_the_attempt() {
    use clawos_workflow::{AgentOutcome, AgentTask, ArtifactRef, Executor, StepError};
    struct Liar;
    impl Executor for Liar {
        async fn run(&self, _t: AgentTask) -> Result<AgentOutcome, StepError> {
            Ok(AgentOutcome {
                output: "x".into(),
                artifacts: vec![ArtifactRef {
                    sha256: "a".repeat(64),
                    size: 1,
                    media_type: "text/plain".into(),
                    name: "x".into(),
                }],
                tokens: 1,
                vm: "vm".into(),
            })
        }
        async fn reattach(&self, _t: AgentTask) -> Result<AgentOutcome, StepError> {
            Err(StepError::lost("gone"))
        }
        async fn cancel(&self, _t: &AgentTask) {}
    }
    let dir = tempfile::tempdir().unwrap();
    let clock = clawos_workflow::FakeClock::new(T0);
    let engine = clawos_workflow::Engine::open(common::config(dir.path()), Liar, clock)
        .await
        .unwrap();
    let run = engine
        .submit(
            &spec(AGENTS, "  - { id: s, agent: a, prompt: p }\n"),
            BTreeMap::new(),
        )
        .await
        .unwrap();
    let st = engine.wait(&run).await.unwrap();
    assert_eq!(st.state, RunState::Failed);
    assert!(st.reason.unwrap().contains("is not in the store"));
}

#[tokio::test]
async fn invalid_specs_and_inputs_journal_nothing() {
    let h = Harness::new().await;
    let bad = spec(AGENTS, "  - { id: s, agent: nobody, prompt: p }\n");
    let e = h.engine().submit(&bad, BTreeMap::new()).await.unwrap_err();
    assert!(matches!(e, EngineError::Spec(_)));
    assert_eq!(
        e.to_string(),
        "invalid workflow spec: line 9, steps[0].agent: unknown agent \"nobody\" (agents are: a, b)"
    );
    let required = spec(
        AGENTS,
        "  - { id: s, agent: a, prompt: \"{{ inputs.who }}\" }\n",
    )
    .replace(
        "inputs: { topic: { default: unikernels } }",
        "inputs: { who: }",
    );
    assert!(
        matches!(h.engine().submit(&required, BTreeMap::new()).await, Err(EngineError::Input { name, .. }) if name == "who")
    );
    let unknown = BTreeMap::from([("whom".to_string(), "x".to_string())]);
    assert!(
        matches!(h.engine().submit(&required, unknown).await, Err(EngineError::Input { name, .. }) if name == "whom")
    );
    assert!(h.engine().list().is_empty());
    // Given, it is used.
    let run = h
        .engine()
        .submit(
            &required,
            BTreeMap::from([("who".to_string(), "ada".to_string())]),
        )
        .await
        .unwrap();
    h.settle().await;
    assert_eq!(h.exec.runs_of("s")[0].1.prompt, "ada");
    assert_eq!(h.engine().status(&run).unwrap().inputs["who"], "ada");
    assert_eq!(h.engine().spec(&run).unwrap(), required);
}

#[tokio::test]
async fn subscribers_see_every_event_in_order() {
    let h = Harness::new().await;
    let mut rx = h.engine().subscribe();
    let run = h
        .submit(&spec(AGENTS, "  - { id: a1, agent: a, prompt: p }\n  - { id: a2, needs: [a1], agent: a, prompt: p }\n"))
        .await;
    h.engine().wait(&run).await.unwrap();
    let mut live = Vec::new();
    while let Ok(e) = rx.try_recv() {
        live.push(e);
    }
    assert_eq!(live, h.events(&run));
    let tail = h.engine().events(&run, 3).unwrap();
    assert_eq!(tail.first().unwrap().seq, 4);
    assert_eq!(h.engine().events_page(&run, 0, 2).unwrap().len(), 2);
}

#[tokio::test]
async fn shutdown_stops_driving_and_wait_says_so() {
    let mut h = Harness::new().await;
    h.exec.script("s", vec![Scripted::ok("x").after(1000)]);
    let run = h
        .submit(&spec(AGENTS, "  - { id: s, agent: a, prompt: p }\n"))
        .await;
    h.settle().await;
    let engine = h.engine().clone();
    let waiter = tokio::spawn(async move { engine.wait(&run).await });
    h.settle().await;
    h.engine().shutdown().await;
    assert!(matches!(waiter.await.unwrap(), Err(EngineError::ShutDown)));
    let run = h.engine().list()[0].run.clone();
    let n = h.events(&run).len();
    h.advance(5000).await;
    assert_eq!(h.events(&run).len(), n, "no events after shutdown");
    assert!(
        h.exec.cancelled().is_empty(),
        "shutdown abandons, never cancels"
    );
    assert!(matches!(
        h.engine()
            .submit(
                &spec(AGENTS, "  - { id: s, agent: a, prompt: p }\n"),
                BTreeMap::new()
            )
            .await,
        Err(EngineError::ShutDown)
    ));
    // The next open resumes it.
    h.crash_and_reopen().await;
    h.exec
        .set_reattach(clawos_workflow::testing::Reattach::Resume);
    assert_eq!(h.run_to_end(&run, 5).await, RunState::Succeeded);
}

#[tokio::test]
async fn map_items_over_the_limit_at_run_time_fail_the_step() {
    let h = Harness::with(|c| c.limits.max_map_items = 3).await;
    h.exec.script("list", vec![Scripted::ok("a\nb\nc\nd")]);
    let run = h
        .submit(&spec(
            AGENTS,
            "  - { id: list, agent: a, prompt: p }\n  - { id: m, kind: map, needs: [list], over: \"{{ steps.list.output_lines }}\", agent: a, prompt: \"{{ item }}\" }\n",
        ))
        .await;
    let st = h.engine().wait(&run).await.unwrap();
    assert_eq!(st.state, RunState::Failed);
    assert_eq!(
        st.steps[1].error.as_deref(),
        Some("4 items, more than the limit of 3")
    );
    assert!(h.exec.runs_of("m").is_empty());
}

#[tokio::test]
async fn finished_runs_leave_memory_but_stay_readable() {
    let h = Harness::with(|c| c.max_finished_in_memory = 1).await;
    let mut runs = Vec::new();
    for _ in 0..3 {
        let run = h
            .submit(&spec(AGENTS, "  - { id: s, agent: a, prompt: p }\n"))
            .await;
        h.engine().wait(&run).await.unwrap();
        runs.push(run);
    }
    h.settle().await;
    let list = h.engine().list();
    assert_eq!(list.iter().map(|r| r.run.clone()).collect::<Vec<_>>(), runs);
    for run in &runs {
        let st = h.engine().status(run).unwrap();
        assert_eq!(st.state, RunState::Succeeded);
        assert_eq!(st.steps[0].output, "s done");
        assert_eq!(
            h.engine().wait(run).await.unwrap().state,
            RunState::Succeeded
        );
    }
}
