//! The `inference-proxy` binary and its development-only static tokens
//! (`CLAWOS_PROXY_STATIC_TOKENS`), which skip JWT verification: refused without
//! `--insecure-dev-tokens` (`CLAWOS_PROXY_INSECURE_DEV_TOKENS=1`), and loudly announced
//! at every start with it.

use clawos_test_ports::free_port;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The proxy with static tokens in `dir/tokens.json`, its upstream a closed port, its
/// output (stdout and stderr) in `log`; `env` and `args` add to that.
fn proxy(dir: &Path, port: u16, log: &Path, env: &[(&str, &str)], args: &[&str]) -> Child {
    let tokens = dir.join("tokens.json");
    std::fs::write(&tokens, r#"{"dev-token-a": "agent-a"}"#).expect("tokens");
    let out = std::fs::File::create(log).expect("log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_inference-proxy"));
    cmd.args(["--addr", &format!("127.0.0.1:{port}"), "--state-dir"])
        .arg(dir.join("state"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("ANTHROPIC_API_KEY", "sk-host-only")
        .env("CLAWOS_PROXY_ANTHROPIC_URL", "http://127.0.0.1:9")
        .env("CLAWOS_PROXY_STATIC_TOKENS", &tokens)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out);
    cmd.spawn().expect("spawn inference-proxy")
}

/// Status code of a `POST /v1/messages` with `key` as the agent credential.
fn status_with(port: u16, key: &str) -> u16 {
    let body =
        r#"{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        c,
        "POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-api-key: {key}\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"))
}

#[test]
fn static_tokens_without_the_insecure_flag_refuse_to_start_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tmp");
    // Absent, and explicitly off: both refuse.
    for env in [&[][..], &[("CLAWOS_PROXY_INSECURE_DEV_TOKENS", "0")][..]] {
        let port = free_port();
        let log = dir.path().join("proxy.log");
        let mut child = KillOnDrop(proxy(dir.path(), port, &log, env, &[]));
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.0.try_wait().expect("wait") {
                break s;
            }
            assert!(
                TcpStream::connect(("127.0.0.1", port)).is_err(),
                "the proxy listens with unverified static tokens ({env:?})"
            );
            assert!(
                Instant::now() < deadline,
                "the proxy still runs with unverified static tokens ({env:?})"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = std::fs::read_to_string(&log).expect("log");
        assert!(!status.success(), "{env:?}: {out}");
        for needle in [
            "--insecure-dev-tokens",
            "CLAWOS_PROXY_INSECURE_DEV_TOKENS=1",
            "CLAWOS_PROXY_STATIC_TOKENS",
            "not be verified",
        ] {
            assert!(
                out.contains(needle),
                "{env:?}: {needle:?} missing from {out}"
            );
        }
    }
}

#[test]
fn with_the_insecure_flag_static_tokens_start_and_every_start_warns() {
    let dir = tempfile::tempdir().expect("tmp");
    let tokens = dir.path().join("tokens.json");
    // The variable, then the flag: each start logs the warning again.
    for (i, (env, args)) in [
        (&[("CLAWOS_PROXY_INSECURE_DEV_TOKENS", "1")][..], &[][..]),
        (&[][..], &["--insecure-dev-tokens"][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let port = free_port();
        let log = dir.path().join(format!("proxy-{i}.log"));
        let mut child = KillOnDrop(proxy(dir.path(), port, &log, env, args));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(s) = child.0.try_wait().expect("wait") {
                panic!(
                    "exited with {s}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "the proxy did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The static token authenticates (the upstream is a closed port); others do not.
        assert_eq!(status_with(port, "not-a-token"), 401);
        assert_ne!(status_with(port, "dev-token-a"), 401);
        let out = std::fs::read_to_string(&log).expect("log");
        let warning = out
            .lines()
            .find(|l| l.contains("WARN") && l.contains("NOT verified"))
            .unwrap_or_else(|| panic!("start {i}: no warning in {out}"));
        assert!(
            warning.contains(tokens.to_str().expect("utf8")),
            "the warning names the file: {warning}"
        );
        assert!(warning.contains("--insecure-dev-tokens"), "{warning}");
    }
}
