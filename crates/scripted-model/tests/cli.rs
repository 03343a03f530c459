//! The `clawos-scripted-model` binary as tests and the demo run it: flags, the
//! `listening on` line, the record file, errors at start, and draining on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clawos_scripted_model::{Script, default_script};
use common::{body, post, post_json};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_clawos-scripted-model");

/// The binary with none of its environment variables inherited.
fn command() -> Command {
    let mut c = Command::new(BIN);
    for var in [
        "CLAWOS_SCRIPT",
        "CLAWOS_SCRIPTED_MODEL_ADDR",
        "CLAWOS_SCRIPTED_MODEL_KEY",
        "CLAWOS_SCRIPTED_MODEL_RECORD",
    ] {
        c.env_remove(var);
    }
    c
}

/// A running binary, killed if the test fails before stopping it.
struct Running {
    child: Child,
    url: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Running {
    /// Starts it with `args` on a free port, stderr to `log`; waits for the address line.
    fn start(args: &[&str], log: &Path) -> Self {
        let mut child = command()
            .args(["--addr", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).expect("log"))
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("an address line within 30 s");
        let url = line
            .trim_end()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        Self { child, url }
    }

    /// Sends SIGTERM (to this child only, by its pid) and waits for it to exit.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("still running 10 s after SIGTERM");
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.to_str().expect("utf8").to_owned()
}

#[tokio::test]
async fn serves_a_script_records_requests_and_drains_on_sigterm() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    let script = write(
        dir.path(),
        "script.json",
        r#"{"turns": [{"text": "slowly, then", "delay_ms": 600}]}"#,
    );
    let record = dir.path().join("record.jsonl");
    let log = dir.path().join("stderr.log");
    let run = Running::start(
        &[
            "--script",
            &script,
            "--api-key",
            "host-key",
            "--record",
            record.to_str().expect("utf8"),
        ],
        &log,
    );
    let mode = std::fs::metadata(&record)
        .expect("record")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let (status, _) = post_json(
        &run.url,
        Some("wrong"),
        &body(json!([{"role": "user", "content": "hi"}]), false),
    )
    .await;
    assert_eq!(status, 401);
    // A stream in flight when SIGTERM arrives still completes.
    let url = run.url.clone();
    let in_flight = tokio::spawn(async move {
        let (status, r) = post(
            &url,
            Some("host-key"),
            &body(json!([{"role": "user", "content": "hi"}]), true),
        )
        .await;
        (status, r.text().await.expect("whole stream"))
    });
    // In flight: the server records a request (the second line) before its turn's delay.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&record).map_or(0, |r| r.lines().count()) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the streaming request never reached the server"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = tokio::task::spawn_blocking(move || run.terminate())
        .await
        .expect("terminate");
    let (code, text) = in_flight.await.expect("request task");
    assert_eq!(code, 200);
    let events = common::parse_sse(&text);
    assert_eq!(events.last().map(|(n, _)| n.as_str()), Some("message_stop"));
    assert_eq!(
        common::reassemble(&events)["content"][0]["text"],
        "slowly, then"
    );
    assert!(status.success(), "{status:?}");

    let logs = std::fs::read_to_string(&log).expect("log");
    assert!(logs.contains("SIGTERM"), "{logs}");
    let lines: Vec<Value> = std::fs::read_to_string(&record)
        .expect("record")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let keys: Vec<&Value> = lines.iter().map(|l| &l["x_api_key"]).collect();
    assert_eq!(keys, [&json!("wrong"), &json!("host-key")]);
    assert_eq!(lines[1]["stream"], true);
    assert_eq!(lines[1]["turn"], 0);
}

#[tokio::test]
async fn without_a_script_it_plays_the_demo_and_prints_it_on_request() {
    let dir = tempfile::tempdir().expect("tmp");
    let run = Running::start(&[], &dir.path().join("stderr.log"));
    let (status, m) = post_json(
        &run.url,
        Some("anything"),
        &body(json!([{"role": "user", "content": "hi"}]), false),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(m["stop_reason"], "tool_use");
    assert_eq!(m["content"][0]["name"], "write_file");
    assert_eq!(
        m["content"][0]["input"],
        json!({"path": "hello.txt", "content": "Hello from your ClawOS agent.\n"})
    );
    drop(run);

    let out = command()
        .arg("--print-default-script")
        .output()
        .expect("run");
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).expect("utf8");
    assert_eq!(
        Script::from_json(&printed).expect("parses"),
        default_script()
    );
}

#[test]
fn a_bad_script_or_key_stops_it_at_start_saying_why() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad = write(
        dir.path(),
        "bad.json",
        r#"{"turns": [{"text": "ok"}, {"tool_use": [{"input": {"path": "x"}}]}]}"#,
    );
    // Given through the environment, as a service unit would.
    let out = command().env("CLAWOS_SCRIPT", &bad).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.json"), "{err}");
    assert!(
        err.contains("turn 2: tool_use without a name (call 1)"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "no address line before the script is loaded"
    );

    let missing = dir.path().join("missing.json");
    let out = command()
        .args(["--script", missing.to_str().expect("utf8")])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read the script") && err.contains("missing.json"),
        "{err}"
    );

    let out = command().args(["--api-key", ""]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("API key is empty"));
}

#[test]
fn help_says_what_it_is_and_is_not() {
    let out = command().arg("--help").output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for want in [
        "Not a model",
        "--script",
        "--api-key",
        "--record",
        "--addr",
        "CLAWOS_SCRIPT",
        "CLAWOS_SCRIPTED_MODEL_KEY",
        "listening on",
        "expect_tool_result",
    ] {
        assert!(help.contains(want), "--help lacks {want:?}:\n{help}");
    }
}
