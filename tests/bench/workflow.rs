//! The orchestrator on real VMs: a 3-step chain (each step in its own fresh VM, the
//! scripted stand-in model) run through the orchestrator, against the same three steps
//! done directly with the launcher's client (start the VM and wait for it, copy the
//! input in, the agent's turn, copy the output out, stop and delete the VM),
//! alternating, R rounds. The difference is what the orchestrator adds: journal
//! writes, scheduling, its polling of the launcher, the CLI submitting the run.
//!
//! ```sh
//! cargo build --release -p clawos-vm-launcher -p clawos-cli -p clawos-identity-manager \
//!   -p clawos-inference-proxy -p clawos-scripted-model -p clawos-orchestrator && scripts/build-guest.sh
//! cargo bench -p clawos-e2e --bench workflow [-- ROUNDS]
//! ```

use std::time::Duration;

use std::time::Instant;

use clawos_agentd_api::{ChatMessage, ChatRequest};
use clawos_e2e::stack::WorkflowStack;
use clawos_e2e::{can_boot_vms_unrecorded, is, runtime};
use clawos_vm_launcher_api::{StartVm, VmState};

const SPEC: &str = "apiVersion: clawos.dev/v1
kind: Workflow
metadata: {name: chain}
agents:
  a: {model: claude-sonnet-4-5, mem_mib: 384}
steps:
  - id: one
    agent: a
    prompt: first
  - id: two
    needs: [one]
    agent: a
    inputs: [one]
    prompt: \"second, after {{ steps.one.output }}\"
  - id: three
    needs: [two]
    agent: a
    inputs: [two]
    prompt: third
";

fn main() {
    if !can_boot_vms_unrecorded("bench workflow") {
        return;
    }
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    let script: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/workflows/scripted-model.json"
        ))
        .expect("script"),
    )
    .expect("json");
    let s = WorkflowStack::start(&script).expect("stack");
    let spec = s.dir().join("chain.yaml");
    std::fs::write(&spec, SPEC).expect("spec");
    let (l, o) = (&s.launcher, &s.orchestrator);
    let rt = runtime();
    let client = l.client();
    let by_hand = |round: usize| -> Duration {
        let t = Instant::now();
        let mut input: Option<Vec<u8>> = None;
        for (i, prompt) in ["first", "second", "third"].iter().enumerate() {
            let name = format!("hand-{round}-{i}");
            let req = StartVm {
                name: name.clone(),
                model: Some("claude-sonnet-4-5".into()),
                mem_mib: 384,
                vcpus: 1,
                image: Some("default".into()),
                snapshots: false,
                idempotency_key: None,
                token_budget: None,
            };
            rt.block_on(client.start(&req)).expect("start");
            l.wait_for(&name, Duration::from_secs(180), is(VmState::Running))
                .expect("running");
            if let Some(data) = input.take() {
                rt.block_on(client.put_file(&name, "/workspace/in/prev/result.md", data))
                    .expect("copy in");
            }
            let chat = ChatRequest {
                model: None,
                messages: vec![ChatMessage::new("user", prompt)],
                stream: false,
                session: None,
                tool_events: None,
            };
            rt.block_on(client.agent_chat(&name, &chat))
                .expect("agent turn");
            let files = rt
                .block_on(client.list_files(&name, "/workspace/out"))
                .expect("list out");
            for f in files {
                input = Some(
                    rt.block_on(client.get_file(&name, &format!("/workspace/out/{}", f.name)))
                        .expect("copy out"),
                );
            }
            rt.block_on(client.stop(&name)).expect("stop");
            rt.block_on(client.delete(&name)).expect("delete");
        }
        t.elapsed()
    };
    let mut ratios = Vec::new();
    for r in 0..rounds {
        let hand = by_hand(r);
        let t = Instant::now();
        let out = o.clawos(l, &["workflow", "run", spec.to_str().expect("utf8")]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let run = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let st = o.wait_for(l, &run, Duration::from_secs(600), |st| {
            st["state"] != "running"
        });
        let wall = t.elapsed();
        assert_eq!(st["state"], "succeeded", "{st:#}");
        let ratio = wall.as_secs_f64() / hand.as_secs_f64();
        ratios.push(ratio);
        println!(
            "round {r}: by hand {} ms, through the orchestrator {} ms (ratio {ratio:.3})",
            hand.as_millis(),
            wall.as_millis()
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "median ratio over {rounds} rounds: {:.3} (orchestrator overhead {:.1} %, aim ≤ 5 %)",
        ratios[ratios.len() / 2],
        (ratios[ratios.len() / 2] - 1.0) * 100.0
    );
}
