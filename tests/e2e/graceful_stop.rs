//! SIGTERM under load, as a service manager's stop sends it, to the real daemon
//! binaries: requests in flight finish, the process exits 0 within its drain time, and
//! nothing is lost (the proxy's ledger has a row per request, the monitor's trail every
//! event recorded before the stop).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clawos_e2e::fake_llm::FakeAnthropic;
use clawos_e2e::{bin, port, runtime};
use serde_json::{Value, json};

/// Requests in flight when the signal arrives.
const IN_FLIGHT: usize = 40;

fn sigterm(child: &Child) {
    // SAFETY: kill with plain integers on our own child.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
}

/// The exit status of `child`, which must end within `limit`.
fn exits_within(child: &mut Child, limit: Duration, log: &Path) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "still running {limit:?} after SIGTERM:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until nothing accepts connections on `port` any more: the daemon has begun
/// its drain.
fn wait_until_refused(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting connections 5 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills a daemon left running by a failed assertion.
struct Reap(Option<Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Reap {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("running")
    }
}

#[test]
fn inference_proxy_finishes_every_request_in_flight_and_ledgers_each_on_sigterm() {
    const HOST_KEY: &str = "sk-ant-host-graceful-2b7e";
    const AGENT_TOKEN: &str = "agent-token-graceful-0001";
    let work = tempfile::tempdir().expect("tmp");
    let state = work.path().join("state");
    std::fs::create_dir_all(&state).expect("state");
    let tokens = work.path().join("tokens.json");
    std::fs::write(&tokens, json!({ AGENT_TOKEN: "graceful" }).to_string()).expect("tokens");
    // The fake upstream holds each `slow-model` request for 4 s before it answers.
    let upstream = FakeAnthropic::start(HOST_KEY);
    let px_port = port();
    let log = work.path().join("proxy.log");
    let mut proxy = Reap(Some(
        clawos_e2e::spawn_proxy_with_static_tokens(
            &state,
            px_port,
            (upstream.url.as_str(), HOST_KEY),
            &tokens,
            &[
                ("CLAWOS_PROXY_RATE_LIMIT_RPM", "1000"),
                // One agent with 40 requests in flight at once: above the default
                // per-agent cap, which is not what this test is about.
                ("CLAWOS_PROXY_MAX_IN_FLIGHT", "64"),
            ],
            &log,
        )
        .expect("inference-proxy"),
    ));
    // The requests run on their own threads while this one watches and signals.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{px_port}/v1/messages");
    // Half of them stream: their ledger rows are written by the task that reads the
    // upstream to its end, after the handler has returned.
    let calls: Vec<_> = (0..IN_FLIGHT)
        .map(|i| {
            let (http, url) = (http.clone(), url.clone());
            rt.spawn(async move {
                let body = json!({
                    "model": "slow-model", "max_tokens": 16, "stream": i % 2 == 0,
                    "messages": [{"role": "user", "content": format!("request number {i}")}],
                });
                let resp = http
                    .post(url)
                    .header("x-api-key", AGENT_TOKEN)
                    .json(&body)
                    .send()
                    .await?;
                let status = resp.status().as_u16();
                Ok::<_, reqwest::Error>((status, resp.text().await?))
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while upstream.seen().2 < IN_FLIGHT {
        assert!(
            Instant::now() < deadline,
            "only {} of {IN_FLIGHT} requests reached the upstream",
            upstream.seen().2
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    sigterm(proxy.child());
    wait_until_refused(px_port);
    let finished = calls.iter().filter(|c| c.is_finished()).count();
    assert_eq!(
        finished, 0,
        "requests ended before the upstream answered: the test proves nothing"
    );
    for (i, call) in calls.into_iter().enumerate() {
        let (status, body) = rt
            .block_on(call)
            .expect("task")
            .unwrap_or_else(|e| panic!("request {i} was cut off by the shutdown: {e}"));
        assert_eq!(status, 200, "request {i}: {body}");
        if i % 2 == 0 {
            assert!(body.contains("event: message_stop"), "request {i}: {body}");
        } else {
            let v: Value = serde_json::from_str(&body).expect("json answer");
            assert_eq!(v["usage"]["output_tokens"], 4, "request {i}: {v}");
        }
    }
    let status = exits_within(proxy.child(), Duration::from_secs(15), &log);
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    proxy.0 = None;
    let db = rusqlite::Connection::open(state.join("proxy/ledger.db")).expect("ledger");
    let (rows, ok): (i64, i64) = db
        .query_row(
            "SELECT COUNT(*), SUM(status = 200 AND error IS NULL AND output_tokens = 4) \
             FROM requests WHERE agent = 'graceful'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("count");
    assert_eq!(
        (rows, ok),
        (IN_FLIGHT as i64, IN_FLIGHT as i64),
        "one complete ledger row per request"
    );
}

/// Starts identity-manager with its own master key file in `state`.
fn start_identity(state: &Path, port: u16, log: &Path) -> Child {
    let logf = std::fs::File::create(log).expect("log");
    let mut child = Command::new(bin("identity-manager"))
        .args(["--addr", &format!("127.0.0.1:{port}"), "--state-dir"])
        .arg(state)
        .env_remove("CLAWOS_MASTER_KEY")
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("log"))
        .stderr(logf)
        .spawn()
        .expect("identity-manager");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "identity-manager exited {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "identity-manager did not listen");
        std::thread::sleep(Duration::from_millis(30));
    }
    child
}

#[test]
fn identity_manager_answers_every_issue_in_flight_on_sigterm() {
    let work = tempfile::tempdir().expect("tmp");
    let state = work.path().join("state");
    let id_port = port();
    let log = work.path().join("identity.log");
    let mut identity = Reap(Some(start_identity(&state, id_port, &log)));
    let svc = std::fs::read_to_string(state.join("identity/service.token"))
        .expect("service token")
        .trim()
        .to_owned();
    // Each request is in flight in the server: its head has been read and its handler
    // waits for the rest of the body, which is sent only after the signal.
    let mut pending: Vec<(TcpStream, Vec<u8>)> = (0..IN_FLIGHT)
        .map(|i| {
            let body = json!({"agent": format!("agent-{i}"), "vm_id": format!("vm-{i}"), "audience": "inference-proxy"})
                .to_string();
            let head = format!(
                "POST /v1/tokens HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {svc}\r\n\
                 content-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let (first, rest) = body.as_bytes().split_at(body.len() / 2);
            let mut s = TcpStream::connect(("127.0.0.1", id_port)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            s.write_all(head.as_bytes()).expect("head");
            s.write_all(first).expect("first half");
            (s, rest.to_vec())
        })
        .collect();
    // Every request's head has been read once the daemon counts them in flight (the
    // `/metrics` request asking is one more).
    let rt = runtime();
    let heads_read = Instant::now();
    loop {
        let in_flight = clawos_e2e::metric(
            &clawos_e2e::metrics_text(&format!("http://127.0.0.1:{id_port}")),
            "clawos_identity_requests_in_flight",
        );
        if in_flight > IN_FLIGHT as u64 {
            break;
        }
        assert!(
            heads_read.elapsed() < Duration::from_secs(20),
            "the daemon read {} of {IN_FLIGHT} request heads in 20 s",
            in_flight.saturating_sub(1)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    sigterm(identity.child());
    wait_until_refused(id_port);
    let mut tokens = Vec::new();
    for (i, (s, rest)) in pending.iter_mut().enumerate() {
        s.write_all(rest).expect("second half");
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .unwrap_or_else(|e| panic!("request {i} was cut off by the shutdown: {e}"));
        assert!(answer.starts_with("HTTP/1.1 201"), "request {i}: {answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: Value = serde_json::from_str(body).expect("issued token");
        tokens.push(v["token"].as_str().expect("token").to_owned());
    }
    let status = exits_within(identity.child(), Duration::from_secs(10), &log);
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // What was issued during the drain stays valid: its keys reached the store.
    identity.0 = Some(start_identity(
        &state,
        id_port,
        &work.path().join("again.log"),
    ));
    let http = reqwest::Client::new();
    for t in &tokens {
        let v: Value = rt
            .block_on(async {
                http.post(format!("http://127.0.0.1:{id_port}/v1/introspect"))
                    .bearer_auth(&svc)
                    .json(&json!({ "token": t }))
                    .send()
                    .await?
                    .json()
                    .await
            })
            .expect("introspect");
        assert_eq!(v["active"], true, "{v}");
    }
}

#[test]
fn monitor_daemon_writes_every_event_recorded_before_sigterm() {
    const TEST: &str = "graceful_stop monitor";
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/sys/kernel/btf/vmlinux").exists() {
        clawos_e2e::skip(
            TEST,
            "monitor-daemon loads eBPF programs: needs root and a kernel with BTF",
        );
        return;
    }
    const FILES: usize = 300;
    let state = tempfile::tempdir().expect("tmp");
    let mon_port = port();
    let mut monitor =
        clawos_e2e::start_monitor(state.path(), mon_port, "monitor.log").expect("monitor-daemon");
    let log = state.path().join("monitor.log");
    let token = std::fs::read_to_string(clawos_monitor_api::token_path(state.path()))
        .expect("token")
        .trim()
        .to_owned();
    let client =
        clawos_monitor_api::MonitorClient::new(&format!("http://127.0.0.1:{mon_port}"), &token);
    // Waits for "go", then opens FILES missing files, one system call each.
    let mut work = match Command::new("python3")
        .args([
            "-c",
            "import os, sys\nsys.stdin.readline()\nfor i in range(int(sys.argv[1])):\n    try:\n        os.open(f'/nonexistent-graceful/f{i}', os.O_RDONLY)\n    except FileNotFoundError:\n        pass\n",
            &FILES.to_string(),
        ])
        .stdin(Stdio::piped())
        .spawn()
    {
        Ok(w) => w,
        Err(e) => {
            clawos_e2e::skip(TEST, &format!("python3 (the workload): {e}"));
            return;
        }
    };
    let rt = runtime();
    rt.block_on(client.watch(&clawos_monitor_api::WatchRequest {
        pid: Some(work.id()),
        cgroup: None,
        agent: "graceful".into(),
        vm: None,
    }))
    .expect("watch");
    work.stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("go");
    assert!(work.wait().expect("workload").success());
    // At once: what the recorder has not written yet must still reach the trail.
    sigterm(&monitor.0);
    let status = exits_within(&mut monitor.0, Duration::from_secs(15), &log);
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let text = std::fs::read_to_string(state.path().join("monitor/audit.jsonl")).expect("trail");
    assert!(text.ends_with('\n'), "a torn last line");
    let events: Vec<clawos_monitor_api::AuditEvent> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a whole JSONL line"))
        .collect();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "numbered without holes"
    );
    let opened: std::collections::BTreeSet<&str> = events
        .iter()
        .filter(|e| e.agent.as_deref() == Some("graceful"))
        .filter_map(|e| e.path.as_deref())
        .filter(|p| p.starts_with("/nonexistent-graceful/f"))
        .collect();
    let reports: Vec<_> = events
        .iter()
        .filter(|e| e.kind != clawos_monitor_api::Kind::Syscall)
        .collect();
    assert!(reports.is_empty(), "nothing was dropped: {reports:?}");
    assert_eq!(
        opened.len(),
        FILES,
        "every open of the workload is in the trail"
    );
}
