//! Spec validation: every kind of refusal, with its line and field.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use clawos_workflow::{
    ApprovalDefault, Limits, MapOver, SpecError, SpecErrorKind, StepKind, VmMode, Workflow,
};

/// The brief's example, line numbers fixed (line 1 is `apiVersion`).
const SPEC: &str = r#"apiVersion: clawos.dev/v1
kind: Workflow
metadata: { name: research-report }
inputs: { topic: { default: "unikernels" } }
agents:
  researcher: { image: default, model: claude-sonnet-4-5, mem_mib: 512, budget_tokens: 50000, vm: fresh }
  writer: { model: claude-sonnet-4-5 }
  reviewer: { model: claude-haiku-4-5, vm: reuse }
steps:
  - id: research
    agent: researcher
    prompt: "Research {{ inputs.topic }}. Write notes to /workspace/out/notes.md"
    timeout: 10m
    retry: { max_attempts: 3, initial: 1s, factor: 2, max_interval: 30s, jitter: true }
    budget_tokens: 20000
  - id: approve
    kind: approval
    needs: [research]
    timeout: 1h
    default: reject
  - id: write
    needs: [approve]
    agent: writer
    prompt: "Write a report from: {{ steps.research.output }}"
    inputs: [research]
    when: "steps.approve.outcome == approved"
  - id: per-file
    kind: map
    needs: [write]
    over: ["a.md", "b.md"]
    max_parallel: 2
    agent: reviewer
    prompt: "Review {{ item }}"
"#;

fn parse(src: &str) -> Result<Workflow, SpecError> {
    Workflow::parse(src, &Limits::default())
}

/// The spec with `from` replaced by `to` (which must occur exactly once).
fn edit(from: &str, to: &str) -> String {
    assert_eq!(SPEC.matches(from).count(), 1, "{from:?} must occur once");
    SPEC.replacen(from, to, 1)
}

#[track_caller]
fn refused(src: &str) -> SpecError {
    match parse(src) {
        Ok(_) => panic!("accepted:\n{src}"),
        Err(e) => e,
    }
}

#[track_caller]
fn assert_err(src: &str, line: usize, path: &str, contains: &str) -> SpecError {
    let e = refused(src);
    assert_eq!(e.line, Some(line), "line of: {e}");
    assert_eq!(e.path, path, "path of: {e}");
    assert!(
        e.to_string().contains(contains),
        "{e:?} does not say {contains:?}"
    );
    assert!(e.to_string().starts_with(&format!("line {line}, ")), "{e}");
    e
}

#[test]
fn the_example_is_valid() {
    let wf = parse(SPEC).unwrap();
    assert_eq!(wf.name, "research-report");
    assert_eq!(wf.inputs["topic"].default.as_deref(), Some("unikernels"));
    assert_eq!(wf.agents["researcher"].budget_tokens, Some(50_000));
    assert_eq!(wf.agents["writer"].image, "default");
    assert_eq!(wf.agents["writer"].mem_mib, 512);
    assert_eq!(wf.agents["reviewer"].vm, VmMode::Reuse);
    assert_eq!(wf.steps.len(), 4);
    let StepKind::Agent(research) = &wf.steps[0].kind else {
        panic!()
    };
    assert_eq!(wf.steps[0].timeout, Duration::from_secs(600));
    assert_eq!(research.retry.max_attempts, 3);
    assert_eq!(research.retry.backoff(1), Duration::from_secs(1));
    assert_eq!(research.retry.backoff(3), Duration::from_secs(4));
    assert_eq!(research.retry.backoff(10), Duration::from_secs(30));
    assert_eq!(research.budget_tokens, Some(20_000));
    assert!(matches!(
        wf.steps[1].kind,
        StepKind::Approval {
            default: ApprovalDefault::Reject
        }
    ));
    assert_eq!(wf.steps[1].timeout, Duration::from_secs(3600));
    assert_eq!(wf.steps[2].timeout, Duration::from_secs(900), "default 15m");
    assert_eq!(
        wf.steps[2].when.as_ref().unwrap().source(),
        "steps.approve.outcome == approved"
    );
    let StepKind::Map {
        over: MapOver::Items(items),
        max_parallel,
        ..
    } = &wf.steps[3].kind
    else {
        panic!()
    };
    assert_eq!((items.len(), *max_parallel), (2, 2));
}

#[test]
fn unknown_step_in_needs_names_line_and_known_steps() {
    let e = refused(&edit("needs: [approve]", "needs: [reserch]"));
    assert_eq!(
        e.to_string(),
        r#"line 22, steps[2].needs[0]: unknown step "reserch" (steps are: research, approve, write, per-file)"#
    );
    assert_eq!(e.column, Some(13));
}

#[test]
fn syntax_and_type_errors_carry_serde_locations() {
    // Unknown field.
    assert_err(
        &edit("    agent: writer\n", "    agnet: writer\n"),
        23,
        "steps[2]",
        "unknown field `agnet`",
    );
    assert_err(
        &edit(
            "metadata: { name: research-report }",
            "metadata: { name: research-report, owner: x }",
        ),
        3,
        "metadata",
        "unknown field `owner`",
    );
    // Wrong type.
    assert_err(
        &edit("max_parallel: 2", "max_parallel: two"),
        31,
        "steps[3].max_parallel",
        "invalid type",
    );
    assert_err(
        &edit("needs: [approve]", "needs: approve"),
        22,
        "steps[2].needs",
        "invalid type",
    );
    assert_err(
        &edit("jitter: true", "jitter: maybe"),
        14,
        "steps[0].retry.jitter",
        "invalid type",
    );
    // Unknown enum values.
    assert_err(
        &edit("kind: approval", "kind: aproval"),
        17,
        "steps[1].kind",
        "unknown variant `aproval`",
    );
    assert_err(
        &edit("vm: reuse", "vm: shared"),
        8,
        "agents.reviewer.vm",
        "unknown variant `shared`",
    );
    // Missing required fields.
    let e = refused(&edit("metadata: { name: research-report }\n", ""));
    assert!(e.to_string().contains("missing field `metadata`"), "{e}");
    assert_err(
        &edit(
            "  writer: { model: claude-sonnet-4-5 }",
            "  writer: { image: x }",
        ),
        7,
        "agents.writer",
        "missing field `model`",
    );
    // Not YAML at all.
    let e = refused("apiVersion: [unclosed\n");
    assert!(e.line.is_some(), "{e}");
}

#[test]
fn kind_specific_fields() {
    assert_err(
        &edit("    agent: writer\n", ""),
        21,
        "steps[2]",
        "missing field `agent` (required on agent steps)",
    );
    assert_err(
        &edit("    prompt: \"Review {{ item }}\"\n", ""),
        27,
        "steps[3]",
        "missing field `prompt`",
    );
    assert_err(
        &edit("    over: [\"a.md\", \"b.md\"]\n", ""),
        27,
        "steps[3]",
        "missing field `over` (required on map steps)",
    );
    assert_err(
        &edit(
            "    default: reject\n",
            "    default: reject\n    prompt: hi\n",
        ),
        21,
        "steps[1].prompt",
        "field `prompt` is not allowed on approval steps",
    );
    assert_err(
        &edit(
            "    budget_tokens: 20000\n",
            "    budget_tokens: 20000\n    max_parallel: 3\n",
        ),
        16,
        "steps[0].max_parallel",
        "not allowed on agent steps",
    );
}

#[test]
fn duplicate_ids_and_keys() {
    assert_err(
        &edit("id: write", "id: research"),
        21,
        "steps[2].id",
        r#"duplicate step id "research" (first used by steps[0])"#,
    );
    assert_err(
        &edit(
            "  reviewer: { model: claude-haiku-4-5, vm: reuse }",
            "  writer: { model: claude-haiku-4-5 }",
        ),
        8,
        "agents.writer",
        r#"duplicate key "writer""#,
    );
}

#[test]
fn references_in_templates_and_inputs() {
    // A step that does not exist.
    assert_err(
        &edit("{{ steps.research.output }}", "{{ steps.reserch.output }}"),
        24,
        "steps[2].prompt",
        r#"unknown step "reserch""#,
    );
    // An input that does not exist.
    assert_err(
        &edit("{{ inputs.topic }}", "{{ inputs.subject }}"),
        12,
        "steps[0].prompt",
        r#"unknown input "subject" (inputs are: topic)"#,
    );
    // A step that exists but is not among the transitive needs (not guaranteed done).
    let src = edit("    needs: [approve]\n", "    needs: []\n")
        .replace("    when: \"steps.approve.outcome == approved\"\n", "");
    assert_err(
        &src,
        24,
        "steps[2].prompt",
        r#"step "write" reads step "research", which is not among its needs"#,
    );
    // Transitive needs are fine: write → approve → research.
    assert!(parse(SPEC).is_ok());
    // `inputs:` artifacts from a step not among the needs.
    let src = SPEC
        .replace("    needs: [approve]\n", "    needs: []\n")
        .replace("    when: \"steps.approve.outcome == approved\"\n", "")
        .replace("{{ steps.research.output }}", "x");
    assert_err(
        &src,
        25,
        "steps[2].inputs[0]",
        r#"reads step "research", which is not among its needs"#,
    );
    // {{ item }} outside a map.
    assert_err(
        &edit("Research {{ inputs.topic }}", "Research {{ item }}"),
        12,
        "steps[0].prompt",
        "only available in a map step's prompt",
    );
    // Bad reference syntax and unclosed placeholders.
    assert_err(
        &edit("{{ inputs.topic }}", "{{ input.topic }}"),
        12,
        "steps[0].prompt",
        "unknown reference `input.topic`",
    );
    assert_err(
        &edit("{{ inputs.topic }}", "{{ inputs.topic"),
        12,
        "steps[0].prompt",
        "never closed",
    );
}

#[test]
fn self_reads_are_refused_as_not_a_need() {
    let e = refused(&edit(
        "Review {{ item }}",
        "Review {{ steps.per-file.output }}",
    ));
    assert_eq!(e.path, "steps[3].prompt");
    assert!(matches!(e.kind, SpecErrorKind::NotANeed { .. }), "{e}");
}

#[test]
fn conditions() {
    assert_err(
        &edit(
            "steps.approve.outcome == approved",
            "steps.aprove.outcome == approved",
        ),
        26,
        "steps[2].when",
        r#"unknown step "aprove""#,
    );
    assert_err(
        &edit(
            "steps.approve.outcome == approved",
            "steps.approve.outcome == aproved",
        ),
        26,
        "steps[2].when",
        "not an outcome",
    );
    assert_err(
        &edit(
            "steps.approve.outcome == approved",
            "steps.approve.outcome contains app",
        ),
        26,
        "steps[2].when",
        "compared with == or !=",
    );
    assert_err(
        &edit(
            "steps.approve.outcome == approved",
            "steps.approve.outcome ~ approved",
        ),
        26,
        "steps[2].when",
        "no operator",
    );
    assert_err(
        &edit("steps.approve.outcome == approved", "inputs.nope == x"),
        26,
        "steps[2].when",
        "unknown input",
    );
    assert!(
        parse(&edit(
            "steps.approve.outcome == approved",
            "steps.research.output not contains 'TODO'"
        ))
        .is_ok()
    );
}

#[test]
fn cycles_are_named() {
    let src = edit(
        "  - id: research\n",
        "  - id: research\n    needs: [per-file]\n",
    );
    let e = assert_err(
        &src,
        11,
        "steps[0].needs[0]",
        "cycle: research -> per-file -> write -> approve -> research",
    );
    assert!(matches!(e.kind, SpecErrorKind::Cycle { .. }));
    let e = refused(&edit("needs: [research]", "needs: [approve]"));
    assert!(e.to_string().contains("needs itself"), "{e}");
}

#[test]
fn unknown_agents_and_bad_names() {
    assert_err(
        &edit("agent: writer", "agent: author"),
        23,
        "steps[2].agent",
        r#"unknown agent "author" (agents are: researcher, reviewer, writer)"#,
    );
    assert_err(
        &edit("name: research-report", "name: Research_Report"),
        3,
        "metadata.name",
        "bad name \"Research_Report\"",
    );
    assert_err(
        &edit("id: per-file", "id: per file"),
        27,
        "steps[3].id",
        "bad name",
    );
    assert_err(
        &edit("id: per-file", &format!("id: {}", "x".repeat(64))),
        27,
        "steps[3].id",
        "1-63 characters",
    );
    let long = "a".repeat(41);
    assert_err(
        &edit("  writer: {", &format!("  {long}: {{")),
        7,
        &format!("agents.{long}"),
        "1-40 characters",
    );
    assert_err(
        &edit("apiVersion: clawos.dev/v1", "apiVersion: clawos.dev/v2"),
        1,
        "apiVersion",
        "expected \"clawos.dev/v1\"",
    );
    assert_err(
        &edit("kind: Workflow", "kind: Pipeline"),
        2,
        "kind",
        "expected \"Workflow\"",
    );
}

#[test]
fn bad_durations_and_ranges() {
    assert_err(
        &edit("timeout: 10m", "timeout: 10x"),
        13,
        "steps[0].timeout",
        "unknown unit",
    );
    assert_err(
        &edit("timeout: 10m", "timeout: 30"),
        13,
        "steps[0].timeout",
        "needs a unit",
    );
    assert_err(
        &edit("timeout: 10m", "timeout: 0s"),
        13,
        "steps[0].timeout",
        "longer than 0s",
    );
    assert_err(
        &edit("initial: 1s", "initial: soon"),
        14,
        "steps[0].retry.initial",
        "bad duration",
    );
    assert_err(
        &edit("max_attempts: 3", "max_attempts: 0"),
        14,
        "steps[0].retry.max_attempts",
        "out of range",
    );
    assert_err(
        &edit("factor: 2", "factor: 0.5"),
        14,
        "steps[0].retry.factor",
        "out of range",
    );
    assert_err(
        &edit("mem_mib: 512", "mem_mib: 1"),
        6,
        "agents.researcher.mem_mib",
        "out of range",
    );
    assert_err(
        &edit("max_parallel: 2", "max_parallel: 65"),
        31,
        "steps[3].max_parallel",
        "out of range (1-64)",
    );
    assert_err(
        &edit("max_parallel: 2", "max_parallel: 0"),
        31,
        "steps[3].max_parallel",
        "out of range",
    );
}

#[test]
fn over_forms() {
    let src = edit(
        "over: [\"a.md\", \"b.md\"]",
        "over: \"{{ steps.write.output_lines }}\"",
    );
    let wf = parse(&src).unwrap();
    assert!(
        matches!(&wf.steps[3].kind, StepKind::Map { over: MapOver::Lines { step }, .. } if step == "write")
    );
    assert_err(
        &edit(
            "over: [\"a.md\", \"b.md\"]",
            "over: \"{{ steps.write.output }}\"",
        ),
        30,
        "steps[3].over",
        "must be exactly",
    );
    assert_err(
        &edit(
            "over: [\"a.md\", \"b.md\"]",
            "over: \"{{ steps.nope.output_lines }}\"",
        ),
        30,
        "steps[3].over",
        "unknown step",
    );
    assert_err(
        &edit("over: [\"a.md\", \"b.md\"]", "over: [\"{{ item }}\"]"),
        30,
        "steps[3].over[0]",
        "only available",
    );
    let items: Vec<String> = (0..1001).map(|i| format!("\"{i}\"")).collect();
    assert_err(
        &edit(
            "over: [\"a.md\", \"b.md\"]",
            &format!("over: [{}]", items.join(", ")),
        ),
        30,
        "steps[3].over",
        "1001 items, more than the limit of 1000",
    );
}

#[test]
fn ten_thousand_steps_are_refused_quickly() {
    let mut src = String::from(
        "apiVersion: clawos.dev/v1\nkind: Workflow\nmetadata: { name: big }\nagents: { a: { model: m } }\nsteps:\n",
    );
    for i in 0..10_000 {
        src.push_str(&format!("  - {{ id: s{i}, agent: a, prompt: p }}\n"));
    }
    let t = Instant::now();
    let e = refused(&src);
    let took = t.elapsed();
    assert_eq!(
        e.kind,
        SpecErrorKind::TooManySteps {
            count: 10_000,
            limit: 1000
        }
    );
    assert_eq!(e.line, Some(6 + 1000), "the first step over the limit");
    assert_eq!(
        e.to_string(),
        "line 1006, steps[1000]: 10000 steps, more than the limit of 1000"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // Raised limits accept it.
    let limits = Limits {
        max_steps: 10_000,
        ..Limits::default()
    };
    assert_eq!(Workflow::parse(&src, &limits).unwrap().steps.len(), 10_000);
}

#[test]
fn a_one_mib_prompt_is_refused_quickly() {
    let prompt = "x".repeat(1 << 20);
    let src = edit(
        "prompt: \"Review {{ item }}\"",
        &format!("prompt: \"{prompt}\""),
    );
    let t = Instant::now();
    // Over the spec limit first.
    let e = refused(&src);
    assert!(
        matches!(e.kind, SpecErrorKind::TooLarge { limit: 1048576, .. }),
        "{e}"
    );
    assert!(e.to_string().starts_with("the spec is "), "{e}");
    // With the spec limit raised, the prompt limit names the line and field.
    let limits = Limits {
        max_spec_bytes: 4 << 20,
        ..Limits::default()
    };
    let e = Workflow::parse(&src, &limits).unwrap_err();
    assert_eq!(e.line, Some(33));
    assert_eq!(e.path, "steps[3].prompt");
    assert_eq!(
        e.kind,
        SpecErrorKind::PromptTooLarge {
            size: 1 << 20,
            limit: 256 << 10
        }
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn inputs_without_default_and_with_description() {
    let src = edit(
        "inputs: { topic: { default: \"unikernels\" } }",
        "inputs:\n  topic: { description: what to research }\n  extra:",
    );
    let wf = parse(&src).unwrap();
    assert_eq!(wf.inputs["topic"].default, None);
    assert_eq!(
        wf.inputs["topic"].description.as_deref(),
        Some("what to research")
    );
    assert_eq!(wf.inputs["extra"].default, None);
    let e = refused(&edit("inputs: { topic:", "inputs: { Topic:"));
    assert_eq!((e.line, e.path.as_str()), (Some(4), "inputs.Topic"));
}
