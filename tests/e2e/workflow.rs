//! Workflows on real VMs with the real daemons: identity-manager, inference-proxy (in
//! front of the scripted stand-in model), vm-launcher and the orchestrator, driven with
//! `clawos workflow`. Each step runs in its own agent VM with its own identity.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clawos_e2e::stack::{Orchestrator, WorkflowStack};
use clawos_e2e::{Launcher, can_boot_vms, can_use_vsock, show};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn step<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|x| x["id"] == id))
        .unwrap_or_else(|| panic!("no step {id} in {status:#}"))
}

fn submit(o: &Orchestrator, l: &Launcher, spec: &Path, inputs: &[&str]) -> String {
    let mut args = vec!["workflow", "run", spec.to_str().expect("utf8")];
    for i in inputs {
        args.extend(["--input", i]);
    }
    let out = o.clawos(l, &args);
    assert!(out.status.success(), "{}", show(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Lines of the launcher's log saying a VM whose name starts with `prefix` became ready.
fn boots(l: &Launcher, prefix: &str) -> usize {
    l.log()
        .lines()
        .filter(|line| line.contains("guest ready") && line.contains(&format!("vm={prefix}")))
        .count()
}

fn sha256_hex(data: &[u8]) -> String {
    use std::fmt::Write;
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().expect("stdin").write_all(data)?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    let mut s = String::new();
    let _ = write!(
        s,
        "{}",
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
    );
    s
}

fn stack() -> WorkflowStack {
    let script: Value = serde_json::from_slice(
        &std::fs::read(repo().join("examples/workflows/scripted-model.json")).expect("script"),
    )
    .expect("script json");
    WorkflowStack::start(&script).expect("workflow stack")
}

#[test]
fn research_write_review_with_an_approval_survives_kill_9_and_bills_each_step_to_its_own_agent() {
    let name = "research_write_review_with_an_approval_survives_kill_9_and_bills_each_step_to_its_own_agent";
    if !can_boot_vms(name) || !can_use_vsock(name) {
        return;
    }
    let mut s = stack();
    let (l, spec) = (
        &s.launcher,
        repo().join("examples/workflows/research-review.yaml"),
    );
    let run = submit(&s.orchestrator, l, &spec, &["topic=unikernels"]);
    assert_eq!(run.len(), 28, "{run}");

    // Research and write run, then the approval waits.
    s.orchestrator
        .wait_for(l, &run, Duration::from_secs(300), |st| {
            step(st, "approve")["state"] == "waiting"
        });
    // kill -9 while waiting for the person, then a new orchestrator on the journal.
    s.orchestrator.kill9_and_restart();
    let st = s.orchestrator.status(l, &run);
    assert_eq!(st["state"], "running", "{st:#}");
    assert_eq!(step(&st, "approve")["state"], "waiting", "{st:#}");
    let o = s
        .orchestrator
        .clawos(l, &["workflow", "approve", &run, "approve"]);
    assert!(o.status.success(), "{}", show(&o));
    let st = s
        .orchestrator
        .wait_for(l, &run, Duration::from_secs(300), |st| {
            st["state"] != "running"
        });
    assert_eq!(st["state"], "succeeded", "{st:#}");

    // Three agent steps, three VMs, each booted once (no completed step ran again
    // after the restart).
    let vms: Vec<String> = ["research", "write", "review"]
        .iter()
        .map(|id| step(&st, id)["vm"].as_str().expect("vm").to_owned())
        .collect();
    assert_eq!(vms.len(), 3);
    assert!(
        vms[0] != vms[1] && vms[1] != vms[2] && vms[0] != vms[2],
        "{vms:?}"
    );
    for vm in &vms {
        assert_eq!(boots(l, vm), 1, "{vm} booted {} times", boots(l, vm));
    }
    // Each step's tokens are in the proxy's ledger under that step's own agent.
    let rows = s.host.ledger(6);
    for vm in &vms {
        let mine: Vec<_> = rows.iter().filter(|r| &r.0 == vm).collect();
        assert_eq!(mine.len(), 2, "{vm}: {rows:?}");
        assert!(mine.iter().all(|r| r.3 == 200), "{rows:?}");
    }
    assert!(
        step(&st, "research")["tokens"].as_u64().unwrap_or(0) > 0,
        "{st:#}"
    );
    // The artifacts are what the agents wrote, byte for byte.
    let o = s
        .orchestrator
        .clawos(l, &["workflow", "artifacts", &run, "--json"]);
    assert!(o.status.success(), "{}", show(&o));
    let arts: Vec<Value> = serde_json::from_slice(&o.stdout).expect("artifacts");
    assert_eq!(arts.len(), 3, "{arts:?}");
    for a in &arts {
        let sha = a["sha256"].as_str().expect("sha");
        let o = s.orchestrator.clawos(l, &["workflow", "artifact", sha]);
        assert!(o.status.success(), "{}", show(&o));
        assert_eq!(sha256_hex(&o.stdout), sha);
        assert!(String::from_utf8_lossy(&o.stdout).contains("Written by a ClawOS agent step."));
        assert_eq!(a["name"], "result.md", "{a}");
    }
    // The write step's VM got the research step's file as its input.
    let events = s.orchestrator.events(l, &run);
    assert!(
        events.iter().any(|e| e["kind"] == "approval_decided"),
        "{events:?}"
    );
    // Fresh VMs are removed after their step.
    let o = l.clawos(&["vm", "list", "--json"]);
    let listed = String::from_utf8_lossy(&o.stdout);
    for vm in &vms {
        assert!(!listed.contains(vm.as_str()), "{vm} still exists: {listed}");
    }

    // The same workflow, rejected: the run ends `rejected` and review never starts.
    let run = submit(&s.orchestrator, l, &spec, &[]);
    s.orchestrator
        .wait_for(l, &run, Duration::from_secs(300), |st| {
            step(st, "approve")["state"] == "waiting"
        });
    let o = s.orchestrator.clawos(
        l,
        &[
            "workflow", "approve", &run, "approve", "--reject", "--reason", "not now",
        ],
    );
    assert!(o.status.success(), "{}", show(&o));
    let st = s
        .orchestrator
        .wait_for(l, &run, Duration::from_secs(60), |st| {
            st["state"] != "running"
        });
    assert_eq!(st["state"], "rejected", "{st:#}");
    assert_eq!(step(&st, "review")["attempts"], 0, "{st:#}");
    assert!(step(&st, "review")["vm"].is_null(), "{st:#}");
}

#[test]
fn budgets_timeouts_and_a_kill_9_mid_step() {
    let name = "budgets_timeouts_and_a_kill_9_mid_step";
    if !can_boot_vms(name) || !can_use_vsock(name) {
        return;
    }
    let mut s = stack();
    let l = &s.launcher;
    let dir = s.dir().join("specs");
    std::fs::create_dir_all(&dir).expect("specs");

    // A step whose agent's budget cannot cover one model call fails with the budget
    // error, once: it is not retried, and the run fails with that reason.
    let budget = dir.join("budget.yaml");
    std::fs::write(
        &budget,
        "apiVersion: clawos.dev/v1\nkind: Workflow\nmetadata: {name: tight}\nagents:\n  a: {model: claude-sonnet-4-5, mem_mib: 384, budget_tokens: 50}\nsteps:\n  - id: only\n    agent: a\n    prompt: hello\n",
    )
    .expect("spec");
    let run = submit(&s.orchestrator, l, &budget, &[]);
    let st = s
        .orchestrator
        .wait_for(l, &run, Duration::from_secs(300), |st| {
            st["state"] != "running"
        });
    assert_eq!(st["state"], "failed", "{st:#}");
    assert_eq!(step(&st, "only")["attempts"], 1, "retried: {st:#}");
    assert!(
        st["reason"].as_str().unwrap_or("").contains("budget"),
        "{st:#}"
    );

    // A step that times out is retried with backoff, each attempt in a fresh VM.
    let slow = dir.join("slow.yaml");
    std::fs::write(
        &slow,
        "apiVersion: clawos.dev/v1\nkind: Workflow\nmetadata: {name: slow}\nagents:\n  a: {model: claude-sonnet-4-5, mem_mib: 384}\nsteps:\n  - id: slow\n    agent: a\n    prompt: hello\n    timeout: 2s\n    retry: {max_attempts: 2, initial: 1s, factor: 2, max_interval: 5s, jitter: false}\n",
    )
    .expect("spec");
    let run = submit(&s.orchestrator, l, &slow, &[]);
    let st = s
        .orchestrator
        .wait_for(l, &run, Duration::from_secs(120), |st| {
            st["state"] != "running"
        });
    assert_eq!(st["state"], "failed", "{st:#}");
    assert_eq!(step(&st, "slow")["attempts"], 2, "{st:#}");
    let events = s.orchestrator.events(l, &run);
    let failed: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "attempt_failed")
        .collect();
    assert_eq!(failed.len(), 2, "{events:#?}");
    assert_eq!(
        failed[0]["detail"]["error"]["kind"], "timeout",
        "{events:#?}"
    );
    let started: Vec<u64> = events
        .iter()
        .filter(|e| e["kind"] == "attempt_started")
        .map(|e| e["time_ms"].as_u64().unwrap_or(0))
        .collect();
    let failed_at = failed[0]["time_ms"].as_u64().unwrap_or(0);
    assert!(started[1] >= failed_at + 1000, "no backoff: {events:#?}");

    // kill -9 while a step runs: the restarted orchestrator retries it in a new VM
    // (the old one is removed), and the run completes; steps that had completed before
    // the kill do not run again.
    let spec = dir.join("two.yaml");
    std::fs::write(
        &spec,
        "apiVersion: clawos.dev/v1\nkind: Workflow\nmetadata: {name: two}\nagents:\n  a: {model: claude-sonnet-4-5, mem_mib: 384}\nsteps:\n  - id: first\n    agent: a\n    prompt: one\n  - id: second\n    needs: [first]\n    agent: a\n    prompt: \"two after {{ steps.first.output }}\"\n",
    )
    .expect("spec");
    let run = submit(&s.orchestrator, l, &spec, &[]);
    s.orchestrator
        .wait_for(l, &run, Duration::from_secs(300), |st| {
            step(st, "first")["state"] == "succeeded" && step(st, "second")["state"] == "running"
        });
    s.orchestrator.kill9_and_restart();
    let st = s
        .orchestrator
        .wait_for(l, &run, Duration::from_secs(300), |st| {
            st["state"] != "running"
        });
    assert_eq!(st["state"], "succeeded", "{st:#}");
    let first_vm = step(&st, "first")["vm"].as_str().expect("vm").to_owned();
    assert_eq!(boots(l, &first_vm), 1, "the completed step ran again");
    let events = s.orchestrator.events(l, &run);
    let succeeded_first = events
        .iter()
        .filter(|e| e["kind"] == "attempt_succeeded" && e["step"] == "first")
        .count();
    assert_eq!(succeeded_first, 1, "{events:#?}");
    assert_eq!(step(&st, "second")["attempts"], 2, "{st:#}");

    // Cancel while a step runs: its VM is removed, the run ends `cancelled`, the next
    // step never starts.
    let run = submit(&s.orchestrator, l, &spec, &[]);
    s.orchestrator
        .wait_for(l, &run, Duration::from_secs(300), |st| {
            step(st, "first")["state"] == "running"
        });
    // The attempt's VM, named by the executor's rule, once the launcher has it.
    let vm = format!("wf-{}-first-a1", &run[12..20]);
    let mut listed = false;
    for _ in 0..100 {
        let o = l.clawos(&["vm", "list", "--json"]);
        if String::from_utf8_lossy(&o.stdout).contains(&vm) {
            listed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(listed, "{vm} never appeared");
    let o = s.orchestrator.clawos(l, &["workflow", "cancel", &run]);
    assert!(o.status.success(), "{}", show(&o));
    let st = s
        .orchestrator
        .wait_for(l, &run, Duration::from_secs(120), |st| {
            st["state"] != "running"
        });
    assert_eq!(st["state"], "cancelled", "{st:#}");
    assert_eq!(step(&st, "second")["attempts"], 0, "{st:#}");
    let gone = (0..100).any(|_| {
        let o = l.clawos(&["vm", "list", "--json"]);
        let listed = String::from_utf8_lossy(&o.stdout).contains(&vm);
        if listed {
            std::thread::sleep(Duration::from_millis(300));
        }
        !listed
    });
    assert!(gone, "the cancelled step's VM {vm} is still there");
}

#[test]
fn a_map_over_files_runs_each_item_in_its_own_vm_at_most_two_at_once() {
    let name = "a_map_over_files_runs_each_item_in_its_own_vm_at_most_two_at_once";
    if !can_boot_vms(name) || !can_use_vsock(name) {
        return;
    }
    let s = stack();
    let l = &s.launcher;
    let spec = repo().join("examples/workflows/review-files.yaml");
    let run = submit(&s.orchestrator, l, &spec, &[]);
    let st = s
        .orchestrator
        .wait_for(l, &run, Duration::from_secs(600), |st| {
            st["state"] != "running"
        });
    assert_eq!(st["state"], "succeeded", "{st:#}");
    let items: Vec<&Value> = st["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter(|x| x["kind"] == "item")
        .collect();
    assert_eq!(items.len(), 3, "{st:#}");
    let mut vms: Vec<&str> = items.iter().filter_map(|i| i["vm"].as_str()).collect();
    vms.sort_unstable();
    vms.dedup();
    assert_eq!(vms.len(), 3, "each item in its own VM: {st:#}");
    // Never more than max_parallel (2) items at once, from the journal's own order.
    let events = s.orchestrator.events(l, &run);
    let (mut running, mut peak) = (0i32, 0i32);
    for e in &events {
        if e["step"] != "review" || e["detail"]["item"].is_null() {
            continue;
        }
        match e["kind"].as_str() {
            Some("attempt_started") => {
                running += 1;
                peak = peak.max(running);
            }
            Some("attempt_succeeded" | "attempt_failed" | "attempt_cancelled") => running -= 1,
            _ => {}
        }
    }
    assert_eq!(peak, 2, "{events:#?}");
    // The summary step's VM received every item's file.
    let o = s
        .orchestrator
        .clawos(l, &["workflow", "artifacts", &run, "--json"]);
    let arts: Vec<Value> = serde_json::from_slice(&o.stdout).expect("artifacts");
    assert_eq!(
        arts.iter().filter(|a| a["step"] == "review").count(),
        3,
        "{arts:?}"
    );
    assert_eq!(step(&st, "summary")["state"], "succeeded", "{st:#}");
}
