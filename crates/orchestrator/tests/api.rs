//! The orchestrator's API as a client sees it, against the real binary on loopback:
//! who may call it, and specs refused before anything runs. No VM is needed: nothing
//! here reaches vm-launcher (a spec that is refused starts nothing).

use clawos_test_ports::free_port;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Daemon {
    child: Child,
    url: String,
    token: String,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(state: &std::path::Path, port: u16) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args([
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--launcher-url",
            "http://127.0.0.1:9",
        ])
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn orchestrator");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "orchestrator did not listen");
        std::thread::sleep(Duration::from_millis(30));
    }
    child
}

fn start() -> Daemon {
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path();
    // A launcher credential to read; the launcher itself is never called here.
    std::fs::create_dir_all(state.join("launcher")).expect("dir");
    std::fs::write(state.join("launcher/admin.token"), "launcher-token").expect("token");
    let port = free_port();
    let child = spawn(state, port);
    let token_path = clawos_orchestrator_api::token_path(state);
    let mode = std::fs::metadata(&token_path)
        .expect("token")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        mode, 0o600,
        "the operator credential must be the owner's only"
    );
    let token = std::fs::read_to_string(&token_path)
        .expect("token")
        .trim()
        .to_owned();
    Daemon {
        child,
        url: format!("http://127.0.0.1:{port}"),
        token,
        port,
        dir,
    }
}

impl Daemon {
    /// SIGKILL, then a new daemon on the same journal and port.
    fn kill9_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(self.dir.path(), self.port);
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn every_route_but_liveness_needs_the_credential_and_browsers_are_refused() {
    let d = start();
    let rt = rt();
    let http = reqwest::Client::new();
    let (status, _) = rt.block_on(async {
        let r = http
            .get(format!("{}/healthz", d.url))
            .send()
            .await
            .expect("healthz");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    });
    assert_eq!(status, 200);
    for (method, path) in [
        ("GET", "/v1/runs"),
        ("POST", "/v1/runs"),
        ("GET", "/v1/runs/0123456789ab0011223344556677"),
        ("GET", "/v1/runs/0123456789ab0011223344556677/events"),
        ("POST", "/v1/runs/0123456789ab0011223344556677/cancel"),
        (
            "POST",
            "/v1/runs/0123456789ab0011223344556677/steps/x/approval",
        ),
        ("GET", "/v1/artifacts/00"),
    ] {
        for auth in [None, Some("Bearer wrong")] {
            let code = rt.block_on(async {
                let mut r =
                    http.request(method.parse().expect("method"), format!("{}{path}", d.url));
                if let Some(a) = auth {
                    r = r.header("authorization", a);
                }
                r.header("content-type", "application/json")
                    .body("{}")
                    .send()
                    .await
                    .expect("send")
                    .status()
                    .as_u16()
            });
            assert_eq!(code, 401, "{method} {path} with {auth:?}");
        }
    }
    // A web page's request, even carrying the credential: foreign Origin, rebinding
    // Host, a text/plain POST.
    let bearer = format!("Bearer {}", d.token);
    let cases: [(&str, &str, &str, u16); 3] = [
        ("origin", "http://evil.example", "application/json", 403),
        ("host", "evil.example:2081", "application/json", 403),
        ("x-none", "", "text/plain", 415),
    ];
    for (h, v, ct, want) in cases {
        let code = rt.block_on(async {
            let mut r = http
                .post(format!("{}/v1/runs", d.url))
                .header("authorization", &bearer)
                .header("content-type", ct);
            if !v.is_empty() {
                r = r.header(h, v);
            }
            r.body("{}").send().await.expect("send").status().as_u16()
        });
        assert_eq!(code, want, "{h}: {v} ({ct})");
    }
}

fn spec_with_steps(n: usize, prompt: &str) -> String {
    let mut s = String::from(
        "apiVersion: clawos.dev/v1\nkind: Workflow\nmetadata: {name: big}\nagents:\n  a: {model: m}\nsteps:\n",
    );
    for i in 0..n {
        s.push_str(&format!(
            "  - id: s{i}\n    agent: a\n    prompt: {prompt:?}\n"
        ));
    }
    s
}

#[test]
fn bad_specs_are_refused_naming_line_and_field_and_nothing_starts() {
    let d = start();
    let rt = rt();
    let c = clawos_orchestrator_api::OrchestratorClient::new(&d.url, &d.token);
    let submit = |spec: String| {
        rt.block_on(c.submit(&clawos_orchestrator_api::SubmitRun {
            spec,
            inputs: Default::default(),
        }))
    };
    let head = "apiVersion: clawos.dev/v1\nkind: Workflow\nmetadata: {name: bad}\nagents:\n  a: {model: m}\nsteps:\n";
    let cases: Vec<(String, &[&str])> = vec![
        (
            format!(
                "{head}  - id: x\n    agent: a\n    prompt: p\n    needs: [y]\n  - id: y\n    agent: a\n    prompt: p\n    needs: [x]\n"
            ),
            &["cycle", "line"],
        ),
        (
            format!("{head}  - id: x\n    agent: a\n    prompt: p\n    needs: [reserch]\n"),
            &["reserch", "line 10"],
        ),
        (
            format!("{head}  - id: x\n    agent: nobody\n    prompt: p\n"),
            &["nobody", "line 8"],
        ),
        (
            format!("{head}  - id: x\n    agent: a\n"),
            &["prompt", "line"],
        ),
        (
            format!("{head}  - id: x\n    agent: a\n    prompt: p\n    timeout: soon\n"),
            &["timeout", "line 10"],
        ),
        (spec_with_steps(10_000, "p"), &["10000", "steps"]),
        // A 1 MiB prompt makes the document itself too large; a 300 KiB one is a
        // prompt over its own limit, named with its line.
        (
            spec_with_steps(1, &"x".repeat(1 << 20)),
            &["bytes", "limit"],
        ),
        (
            spec_with_steps(1, &"x".repeat(300 << 10)),
            &["prompt", "line 9"],
        ),
    ];
    for (spec, wants) in cases {
        let e = submit(spec).expect_err("a bad spec was accepted");
        assert_eq!(e.status(), Some(400), "{e}");
        let msg = e.to_string();
        for w in wants {
            assert!(msg.contains(w), "{w:?} not in: {msg}");
        }
    }
    // Nothing was started, nothing journaled.
    let runs = rt.block_on(c.list()).expect("list");
    assert!(runs.is_empty(), "{runs:?}");
    let e = rt
        .block_on(c.get("0123456789ab0011223344556677"))
        .expect_err("unknown run");
    assert_eq!(e.status(), Some(404));
    let e = rt
        .block_on(c.get("..%2f..%2fetc"))
        .expect_err("not a run id");
    assert_eq!(e.status(), Some(404));
    let _ = json!({});
    let _: Option<Value> = None;
}

#[test]
fn a_non_loopback_address_is_refused_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(["--addr", "0.0.0.0:2081", "--state-dir", "/nonexistent"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not loopback"));
}

/// A run that needs only people (two approval steps): no VM, but the real daemon,
/// killed with SIGKILL at the two moments that matter.
#[test]
fn a_waiting_approval_and_an_acknowledged_decision_survive_kill_9() {
    let mut d = start();
    let rt = rt();
    let c = clawos_orchestrator_api::OrchestratorClient::new(&d.url, &d.token);
    let spec = "apiVersion: clawos.dev/v1\nkind: Workflow\nmetadata: {name: gates}\nsteps:\n  - {id: first, kind: approval, timeout: 1h}\n  - {id: second, kind: approval, needs: [first], timeout: 1h}\n";
    let run = rt
        .block_on(c.submit(&clawos_orchestrator_api::SubmitRun {
            spec: spec.into(),
            inputs: Default::default(),
        }))
        .expect("submit")
        .id;
    let step_state = |c: &clawos_orchestrator_api::OrchestratorClient, id: &str| {
        let st = rt.block_on(c.get(&run)).expect("status");
        st.steps
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.state.clone())
            .unwrap_or_default()
    };
    let wait_state = |c: &clawos_orchestrator_api::OrchestratorClient, id: &str, want: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while step_state(c, id) != want {
            assert!(
                Instant::now() < deadline,
                "{id} never {want}: {}",
                step_state(c, id)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_state(&c, "first", "waiting");
    // Killed while it waits for a person: it still waits afterwards. (A new client
    // each time: the old one's pooled connection died with the process.)
    d.kill9_and_restart();
    let c = clawos_orchestrator_api::OrchestratorClient::new(&d.url, &d.token);
    wait_state(&c, "first", "waiting");
    // Killed right after acknowledging a decision: the decision stands.
    rt.block_on(c.approve(
        &run,
        "first",
        &clawos_orchestrator_api::Approval {
            approved: true,
            reason: Some("looks right".into()),
        },
    ))
    .expect("approve");
    d.kill9_and_restart();
    let c = clawos_orchestrator_api::OrchestratorClient::new(&d.url, &d.token);
    assert_eq!(step_state(&c, "first"), "succeeded");
    wait_state(&c, "second", "waiting");
    rt.block_on(c.approve(
        &run,
        "second",
        &clawos_orchestrator_api::Approval {
            approved: false,
            reason: Some("not now".into()),
        },
    ))
    .expect("reject");
    let st = rt
        .block_on(c.wait(&run, Duration::from_secs(20)))
        .expect("wait");
    assert_eq!(
        st.run.state,
        clawos_orchestrator_api::RunState::Rejected,
        "{st:?}"
    );
    let events = rt.block_on(c.events(&run, 0)).expect("events");
    let decided: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "approval_decided")
        .collect();
    assert_eq!(decided.len(), 2, "each decision journaled once: {events:?}");
    // The journal as server-sent events (what `clawos workflow logs -f` and browsers
    // read): every event once, in order, ending after `run_finished`.
    let sse = rt.block_on(async {
        reqwest::Client::new()
            .get(format!("{}/v1/runs/{run}/events", d.url))
            .header("authorization", format!("Bearer {}", d.token))
            .header("accept", "text/event-stream")
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .expect("sse")
            .text()
            .await
            .expect("the stream ends with the run")
    });
    let kinds: Vec<&str> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(kinds.first(), Some(&"run_submitted"), "{sse}");
    assert_eq!(kinds.last(), Some(&"run_finished"), "{sse}");
    assert_eq!(kinds.len(), events.len(), "{sse}");
    // A decision on a step that no longer waits is a conflict, not a second decision.
    let e = rt
        .block_on(c.approve(
            &run,
            "first",
            &clawos_orchestrator_api::Approval {
                approved: false,
                reason: None,
            },
        ))
        .expect_err("decided twice");
    assert_eq!(e.status(), Some(409), "{e}");
}
