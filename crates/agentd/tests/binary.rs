//! The `clawos-agentd` binary itself: its command line, a task through it, its
//! resident size, and a prompt exit on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clawos_agentd_api::ChatCompletion;
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_clawos-agentd");

#[test]
fn help_version_and_bad_flags() {
    let o = Command::new(BIN).arg("--help").output().expect("run");
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--listen",
        "--workspace",
        "--llm-url",
        "--model",
        "--env-file",
        "--max-steps",
        "--max-task-secs",
        "--max-shell-secs",
        "--output-cap",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    let o = Command::new(BIN).arg("--version").output().expect("run");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("clawos-agentd {}", env!("CARGO_PKG_VERSION"))
    );
    let o = Command::new(BIN)
        .args(["--max-steps", "lots"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim(),
        "clawos-agentd: --max-steps \"lots\": not a whole number"
    );
    let o = Command::new(BIN)
        .args(["--workspace", "/nonexistent/ws", "--listen", "127.0.0.1:0"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot open the workspace /nonexistent/ws"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} not in /proc status"))
}

#[tokio::test]
async fn serves_a_task_stays_small_and_stops_on_sigterm() {
    let model = model(
        r#"{"turns":[
        {"tool_use":[{"name":"bash","input":{"command":"head -c 3000000 /dev/urandom | od -x"}},
                     {"name":"write_file","input":{"path":"out/x.txt","content":"x"}}]},
        {"text":"done","expect_tool_result":true}]}"#,
    )
    .await;
    let ws = tempfile::tempdir().expect("tempdir");
    std::fs::write(ws.path().join(".env"), "CLAWOS_MODEL=claude-env\n").expect("env");
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--llm-url",
            &model.url,
            "--workspace",
        ])
        .arg(ws.path())
        .arg("--env-file")
        .arg(ws.path().join(".env"))
        .env_remove("CLAWOS_MODEL")
        .env_remove("ANTHROPIC_API_KEY")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut first = String::new();
    stderr.read_line(&mut first).expect("log line");
    let addr = first
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_owned();
    assert!(first.contains("model=claude-env"), "{first}");
    let url = format!("http://{addr}");

    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat("go"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let c: ChatCompletion = resp.json().await.expect("completion");
    assert_eq!(c.choices[0].message.content, "done");
    assert_eq!(c.model, "claude-env");
    assert!(ws.path().join("out/x.txt").exists());

    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hwm = kib(&status, "VmHWM:");
    eprintln!("clawos-agentd high-water RSS over a task: {hwm} KiB");
    // A debug build; the release binary is smaller still.
    assert!(hwm < 20 * 1024, "RSS high-water {hwm} KiB is over 20 MiB");

    let started = Instant::now();
    // SAFETY: kill(2) on the child we spawned; it touches no memory of ours.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    let exit = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).expect("log");
    assert!(rest.contains("SIGTERM"), "{rest}");
    // The log names ids, tools and statuses, never the conversation.
    assert!(rest.contains("name=bash ok=true"), "{rest}");
    assert!(!rest.contains("head -c"), "{rest}");
}
