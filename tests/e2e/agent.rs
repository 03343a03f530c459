//! The agent path end to end, on a real VM with real daemons: `clawos agent run` gives
//! the built-in runtime a task; it calls the (scripted) model through the guest relay,
//! the launcher's HTTP-aware relay (which attaches the VM's own JWT) and inference-proxy
//! (which holds the only API key), runs the write tool in its VM, and answers. Then the
//! attacks: a guest forging credentials, the agent trying to read the control secret,
//! kill the audit and leave its cgroup, a killed runtime, an exhausted token budget,
//! credentials searched for everywhere in the guest, and the token's revocation on stop.

use std::path::Path;
use std::time::{Duration, Instant};

use clawos_e2e::stack::{HOST_KEY, HostServices, RecordingForwarder, ScriptedModel};
use clawos_e2e::{Launcher, can_boot_vms, can_use_vsock, is, runtime, show};
use clawos_identity_manager_api::IdentityClient;
use clawos_vm_launcher_api::VmState;
use serde_json::{Value, json};

const HELLO: &str = "Hello from your ClawOS agent.\n";
const FINAL_TEXT: &str = "I wrote hello.txt in the workspace.";

/// What the agent does when it probes its own confinement (run by its bash tool, as the
/// agent user, in the real VM): each attempt reports `denied` or what it achieved.
const ATTACK: &str = r#"{
id -u
cat /run/clawos/control.secret >/dev/null 2>&1 && echo secret=READ || echo secret=denied
A=$(for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = clawos-audit ] && echo ${p#/proc/}; done)
echo audit_pids=$A
kill -9 $A 2>/dev/null && echo kill=DONE || echo kill=denied
echo $$ > /sys/fs/cgroup/cgroup.procs 2>/dev/null && echo cgroup=LEFT || echo cgroup=denied
mkdir /sys/fs/cgroup/escape 2>/dev/null && echo mkcgroup=DONE || echo mkcgroup=denied
echo cgroup_now=$(cat /proc/self/cgroup)
} > /workspace/attack.txt 2>&1"#;

fn introspect_active(identity: &IdentityClient, jwt: &str) -> bool {
    runtime()
        .block_on(identity.introspect(jwt))
        .expect("introspect")
        .active
}

/// Whether `needle` occurs in the file at `path` (grep: disks are large, and sparse).
fn file_contains(path: &Path, needle: &str) -> bool {
    assert!(path.is_file(), "{} is not there to search", path.display());
    let status = std::process::Command::new("grep")
        .args(["-q", "-a", "-F", "-e", needle])
        .arg(path)
        .status()
        .expect("grep");
    assert!(
        status.code() != Some(2),
        "grep failed on {}",
        path.display()
    );
    status.success()
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

#[test]
fn an_agent_does_a_task_with_a_host_held_identity_and_cannot_break_out() {
    let name = "an_agent_does_a_task_with_a_host_held_identity_and_cannot_break_out";
    if !can_boot_vms(name) || !can_use_vsock(name) {
        return;
    }
    let work = tempfile::tempdir().expect("tmp");
    let state = work.path().join("state");
    std::fs::create_dir_all(&state).expect("state");

    // Three upstream scripts, chosen by model name through the proxy's routing.
    let writer = ScriptedModel::start(
        work.path(),
        "writer",
        &json!({"turns": [
            {"tool_use": [{"name": "write_file", "input": {"path": "hello.txt", "content": HELLO}}]},
            {"text": FINAL_TEXT, "expect_tool_result": true}
        ]}),
    )
    .expect("writer model");
    let attacker = ScriptedModel::start(
        work.path(),
        "attacker",
        &json!({"turns": [
            {"tool_use": [{"name": "bash", "input": {"command": ATTACK}}]},
            {"text": "probed"}
        ]}),
    )
    .expect("attacker model");
    let looper = ScriptedModel::start(
        work.path(),
        "looper",
        &json!({"turns": [
            {"tool_use": [{"name": "bash", "input": {"command": "yes a | head -n 5000"}}]}
        ], "repeat_last": true}),
    )
    .expect("looper model");
    // Every agent may spend 80k tokens in all: plenty for the tasks below, not for a
    // task whose transcript grows by 5,000 tokens a step (the looper's), which runs out
    // after a few steps: its next call would fit the budget, but not what is left.
    let host = HostServices::start(
        &state,
        &[
            ("anthropic", &["claude-*"], &writer.url),
            ("attacker", &["attack-*"], &attacker.url),
            ("looper", &["loop-*"], &looper.url),
        ],
        &[("CLAWOS_PROXY_TOKENS_TOTAL", "80000")],
    )
    .expect("identity-manager and inference-proxy");
    // Between the relay and the proxy: what exactly does the relay send?
    let wire =
        RecordingForwarder::start(&format!("127.0.0.1:{}", host.proxy_port)).expect("forwarder");
    let proxy_via_wire = format!("http://127.0.0.1:{}", wire.port);
    let l = Launcher::start_with(
        &state,
        &[
            ("CLAWOS_INFERENCE_PROXY_URL", proxy_via_wire.as_str()),
            ("CLAWOS_IDENTITY_URL", host.identity_url.as_str()),
        ],
    )
    .expect("launcher");
    let identity = IdentityClient::with_service_token(
        &host.identity_url,
        &host.service_token().expect("service token"),
    );

    let o = l.clawos(&[
        "vm",
        "start",
        "worker",
        "--model",
        "claude-sonnet-4-5",
        "--mem",
        "384",
    ]);
    assert!(o.status.success(), "{}\n{}", show(&o), l.log());

    // 1. The task: two model calls, the write tool in the VM, the answer.
    let o = l.clawos(&[
        "agent",
        "run",
        "worker",
        "--message",
        "Write a greeting to hello.txt",
        "--json",
    ]);
    assert!(o.status.success(), "{}\nlauncher: {}", show(&o), l.log());
    let outcome: Value = serde_json::from_slice(&o.stdout).expect("agent run --json");
    assert_eq!(outcome["answer"], FINAL_TEXT, "{outcome}");
    assert_eq!(outcome["tool_calls"][0]["name"], "write_file", "{outcome}");
    assert_eq!(outcome["tool_calls"][0]["ok"], true, "{outcome}");
    let session = outcome["session"].as_str().expect("session").to_owned();
    let got = work.path().join("hello.txt");
    let o = l.clawos(&[
        "vm",
        "cp",
        "worker:/workspace/hello.txt",
        got.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(std::fs::read_to_string(&got).expect("copied out"), HELLO);
    // The proxy billed both calls to the VM's agent; the upstream saw only the host key.
    let rows = host.ledger(2);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (agent, vm_id, model, status) in &rows {
        assert_eq!(agent, "worker");
        assert!(vm_id.starts_with("worker-"), "{vm_id}");
        assert_eq!((model.as_str(), *status), ("claude-sonnet-4-5", 200));
    }
    let seen = writer.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen[1]["turn"], 1,
        "the second call carried the first's answer: {seen:?}"
    );
    for r in &seen {
        assert_eq!(r["x_api_key"], HOST_KEY, "{r}");
        assert!(r["authorization"].is_null(), "{r}");
    }
    // The relay sent the VM's JWT, and nothing the guest could have chosen.
    let bearers = wire.bearers();
    assert_eq!(bearers.len(), 2, "{:?}", wire.heads());
    let jwt = bearers[0].clone();
    assert!(
        introspect_active(&identity, &jwt),
        "the VM's token is live while it runs"
    );
    let claims = runtime()
        .block_on(identity.introspect(&jwt))
        .expect("introspect");
    assert_eq!(claims.agent.as_deref(), Some("worker"), "{claims:?}");

    // The same through `agent chat`: each line a task, one session; the second task
    // continues the first's transcript (the model is past its script's two turns).
    let mut chat = l
        .clawos_command(&["agent", "chat", "worker"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("agent chat");
    {
        use std::io::Write;
        let mut stdin = chat.stdin.take().expect("stdin");
        stdin
            .write_all(b"Write the greeting\nAnything else?\n")
            .expect("type");
    }
    let o = chat.wait_with_output().expect("agent chat");
    assert!(o.status.success(), "{}", show(&o));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains(FINAL_TEXT), "{}", show(&o));
    assert!(
        said.contains("(the script has no more turns)"),
        "{}",
        show(&o)
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stderr)
            .matches("→ write_file")
            .count(),
        1,
        "{}",
        show(&o)
    );
    let rows_before_forgery = host.ledger(5).len();
    assert_eq!(rows_before_forgery, 5);

    // 2. A guest that forges credentials is still billed as itself.
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;
    let o = l.clawos(&[
        "vm",
        "exec",
        "worker",
        "--",
        "wget",
        "-q",
        "-O-",
        "--header",
        "x-api-key: sk-ant-forged-by-guest",
        "--header",
        "Authorization: Bearer forged.jwt.token",
        "--header",
        "content-type: application/json",
        "--post-data",
        body,
        "http://127.0.0.1:11435/v1/messages",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let rows = host.ledger(rows_before_forgery + 1);
    assert_eq!(rows.len(), rows_before_forgery + 1, "{rows:?}");
    assert_eq!(rows[rows_before_forgery].0, "worker", "{rows:?}");
    for h in wire.heads() {
        assert!(
            !h.contains("forged"),
            "a guest credential reached the proxy: {h}"
        );
    }
    assert!(writer.requests().iter().all(|r| r["x_api_key"] == HOST_KEY));

    // 3. The agent probes its confinement with its own shell tool.
    let audit_before = l.clawos(&["vm", "exec", "worker", "--", "pidof", "clawos-audit"]);
    let o = l.clawos(&[
        "agent",
        "run",
        "worker",
        "--model",
        "attack-probe",
        "--message",
        "probe",
        "--json",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let report = work.path().join("attack.txt");
    let o = l.clawos(&[
        "vm",
        "cp",
        "worker:/workspace/attack.txt",
        report.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let report = std::fs::read_to_string(&report).expect("attack report");
    let uid = report.lines().next().unwrap_or("");
    assert_ne!(uid.trim(), "0", "the agent runs as root: {report}");
    for line in [
        "secret=denied",
        "kill=denied",
        "cgroup=denied",
        "mkcgroup=denied",
        "cgroup_now=0::/agent",
    ] {
        assert!(report.contains(line), "expected {line}: {report}");
    }
    assert!(
        !report.contains("audit_pids=\n"),
        "no audit process to attack: {report}"
    );
    let audit_after = l.clawos(&["vm", "exec", "worker", "--", "pidof", "clawos-audit"]);
    assert_eq!(
        audit_before.stdout, audit_after.stdout,
        "the audit process changed"
    );

    // 4. A killed runtime comes back and resumes its session: the model sees the
    // earlier transcript (two turns played), so it answers past its script's end rather
    // than starting over with the write tool.
    let pid_before = l.clawos(&["vm", "exec", "worker", "--", "pidof", "clawos-agentd"]);
    let o = l.clawos(&[
        "vm",
        "exec",
        "worker",
        "--",
        "sh",
        "-c",
        "kill -9 $(pidof clawos-agentd)",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        wait_until(Duration::from_secs(60), || {
            let p = l.clawos(&["vm", "exec", "worker", "--", "pidof", "clawos-agentd"]);
            p.status.success()
                && p.stdout != pid_before.stdout
                && l.clawos(&["agent", "sessions", "worker"]).status.success()
        }),
        "the runtime was not restarted: {}",
        l.log()
    );
    let o = l.clawos(&[
        "agent",
        "run",
        "worker",
        "--session",
        &session,
        "--message",
        "And now?",
        "--json",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let resumed: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(resumed["session"], session.as_str(), "{resumed}");
    assert_eq!(
        resumed["tool_calls"].as_array().map(Vec::len),
        Some(0),
        "{resumed}"
    );
    assert_ne!(resumed["answer"], FINAL_TEXT, "{resumed}");
    let o = l.clawos(&["agent", "sessions", "worker", "--json"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&session),
        "{}",
        show(&o)
    );

    // 5. No credential anywhere in the running guest: every process's environment,
    // /run and /workspace (transcripts included).
    let o = l.clawos(&[
        "vm",
        "exec",
        "worker",
        "--",
        "sh",
        "-c",
        "cat /proc/[0-9]*/environ; find /run /workspace -type f -exec cat {} + ; true",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let dump = String::from_utf8_lossy(&o.stdout);
    assert!(
        dump.contains("CLAWOS_MODEL"),
        "the search saw the guest's files"
    );
    for secret in [jwt.as_str(), HOST_KEY] {
        assert!(!dump.contains(secret), "a credential is in the guest");
    }

    // 6. A token budget that runs out mid-task stops the agent with the proxy's reason.
    let o = l.clawos(&[
        "agent",
        "run",
        "worker",
        "--model",
        "loop-forever",
        "--message",
        "count",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(8), "{}", show(&o));
    assert!(err.contains("budget"), "{}", show(&o));
    assert!(
        err.contains("→ bash"),
        "the task was refused before it began: {}",
        show(&o)
    );
    assert!(looper.requests().len() >= 2, "{:?}", looper.requests());

    // 7. Stop: the token is revoked; no credential on any of the VM's disks.
    let o = l.clawos(&["vm", "stop", "worker"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        !introspect_active(&identity, &jwt),
        "the stopped VM's token is still active"
    );
    let vm_dir = state.join("vms/worker");
    for disk in ["runtime.img", "workspace.img", "config.img"] {
        let p = vm_dir.join(disk);
        for secret in [jwt.as_str(), HOST_KEY] {
            assert!(
                !file_contains(&p, secret),
                "{} holds a credential",
                p.display()
            );
        }
    }

    // 8. Restart: a new token, live, and the old one stays dead.
    let o = l.clawos(&["vm", "start", "worker"]);
    assert!(
        o.status.success(),
        "{}\nconsole:\n{}\nlauncher:\n{}",
        show(&o),
        String::from_utf8_lossy(&l.clawos(&["vm", "logs", "worker"]).stdout),
        l.log()
    );
    l.wait_for("worker", Duration::from_secs(120), is(VmState::Running))
        .expect("running");
    let before = wire.bearers().len();
    // The budget is spent, so the proxy refuses — but the relay still shows its token.
    let _ = l.clawos(&["agent", "run", "worker", "--message", "hello again"]);
    let bearers = wire.bearers();
    assert!(bearers.len() > before, "no request after the restart");
    let new_jwt = bearers.last().expect("a token").clone();
    assert_ne!(new_jwt, jwt, "the restarted VM got its old token");
    assert!(introspect_active(&identity, &new_jwt));
    assert!(!introspect_active(&identity, &jwt));
    let o = l.clawos(&["vm", "stop", "worker"]);
    assert!(o.status.success(), "{}", show(&o));
}
