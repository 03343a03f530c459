//! `clawos up` / `status` / `down` with the real daemons: a host brought up from one
//! configuration file, wired together (an agent VM boots and runs a command through
//! it), brought up again without change, a bad file and a daemon that cannot start
//! refused with why (and what had started stopped again), and `down` leaving nothing
//! running — the VM's hypervisor included.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clawos_e2e::{artifacts, can_boot_vms, can_use_vsock, port, show};
use serde_json::Value;

const KEY: &str = "sk-ant-host-up-test-key";

struct HostDir {
    state: PathBuf,
    config: PathBuf,
    launcher_port: u16,
}

impl HostDir {
    fn clawos(&self, args: &[&str]) -> Output {
        Command::new(clawos_e2e::bin("clawos"))
            .args(args)
            .env("CLAWOS_STATE_DIR", &self.state)
            .env("CLAWOS_CONFIG", &self.config)
            .env(
                "CLAWOS_LAUNCHER_URL",
                format!("http://127.0.0.1:{}", self.launcher_port),
            )
            .env("ANTHROPIC_API_KEY", KEY)
            .output()
            .expect("clawos")
    }

    fn status(&self) -> (Option<i32>, Vec<Value>) {
        let o = self.clawos(&["--json", "status"]);
        let rows: Vec<Value> = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("status --json: {e}: {}", show(&o)));
        (o.status.code(), rows)
    }
}

impl Drop for HostDir {
    fn drop(&mut self) {
        let _ = self.clawos(&["down"]);
    }
}

/// Processes (not yet ended) whose command line names `needle`.
fn processes_naming(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
        {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(&needle) {
            out.push(format!("{pid}: {cmd}"));
        }
    }
    out
}

fn wait_until_none(needle: &Path) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = processes_naming(needle);
        if left.is_empty() || std::time::Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no {name} row: {rows:?}"))
}

#[test]
fn clawos_up_brings_the_host_up_once_and_down_leaves_nothing_running() {
    let name = "clawos_up_brings_the_host_up_once_and_down_leaves_nothing_running";
    if !can_boot_vms(name) || !can_use_vsock(name) {
        return;
    }
    let a = artifacts();
    let work = tempfile::tempdir().expect("tmp");
    let state = work.path().join("state");
    let (launcher_port, skills_port) = (port(), port());
    let config = work.path().join("clawos.toml");
    std::fs::write(
        &config,
        format!(
            "stop_timeout_secs = 60\n\
             [identity]\naddr = \"127.0.0.1:{}\"\n\
             [proxy]\naddr = \"127.0.0.1:{}\"\nanthropic_url = \"http://127.0.0.1:9\"\n\
             [skills]\naddr = \"127.0.0.1:{skills_port}\"\n\
             [monitor]\naddr = \"127.0.0.1:{}\"\n\
             [launcher]\naddr = \"127.0.0.1:{launcher_port}\"\nimage = \"{}\"\nsigning_pubkey = \"{}\"\n\
             [orchestrator]\naddr = \"127.0.0.1:{}\"\n",
            port(),
            port(),
            port(),
            a.image_dir.display(),
            a.public_key,
            port(),
        ),
    )
    .expect("config");
    let host = HostDir {
        state: state.clone(),
        config: config.clone(),
        launcher_port,
    };

    // A mistake in the file: named, and nothing started.
    let bad = work.path().join("bad.toml");
    std::fs::write(&bad, "[proxy]\nrpm = \"lots\"\n").expect("bad");
    let o = host.clawos(&["up", "--config", bad.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("proxy.rpm must be an integer, not a string"),
        "{}",
        show(&o)
    );
    assert!(!state.join("run").exists(), "nothing was started");

    // A daemon whose address something else holds: refused before it is started (an
    // answer from another process would pass its health check), and what had
    // started before it is stopped again.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", skills_port)).expect("squat");
    let o = host.clawos(&["up"]);
    assert_eq!(o.status.code(), Some(7), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "skill-manager cannot listen on 127.0.0.1:{skills_port}: something else already does"
        )),
        "{}",
        show(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("identity-manager stopped"),
        "{}",
        show(&o)
    );
    let (code, rows) = host.status();
    assert_eq!(code, Some(7), "status says the host is not up");
    for r in &rows {
        assert!(r["pid"].is_null(), "nothing left running: {rows:?}");
    }
    assert!(wait_until_none(&state).is_empty(), "no daemon process left");
    drop(squatter);

    // A daemon that fails at start: why, from its own log, and the rest stopped.
    std::fs::write(state.join("skills"), "not a directory").expect("block skills/");
    let o = host.clawos(&["up"]);
    assert_eq!(o.status.code(), Some(7), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("skill-manager exited at start"),
        "{}",
        show(&o)
    );
    assert!(
        err.contains("skill-manager.log:\nError: "),
        "its Error line: {}",
        show(&o)
    );
    assert!(wait_until_none(&state).is_empty(), "no daemon process left");
    std::fs::remove_file(state.join("skills")).expect("unblock");

    // Up: every daemon, healthy, wired.
    let o = host.clawos(&["--json", "up"]);
    assert!(o.status.success(), "{}", show(&o));
    let rows: Vec<Value> = serde_json::from_slice(&o.stdout).expect("up --json");
    for d in [
        "identity-manager",
        "inference-proxy",
        "skill-manager",
        "vm-launcher",
        "orchestrator",
    ] {
        assert_eq!(row(&rows, d)["state"], "running", "{d}: {rows:?}");
    }
    let monitor = row(&rows, "monitor-daemon");
    assert!(
        monitor["state"] == "running" || monitor["state"] == "off",
        "{monitor}"
    );
    assert_eq!(row(&rows, "control-plane")["state"], "off");
    // The API key is in the proxy's environment alone, and on no command line.
    for r in &rows {
        let Some(pid) = r["pid"].as_u64() else {
            continue;
        };
        let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
        let has_key = String::from_utf8_lossy(&environ).contains(KEY);
        assert_eq!(has_key, r["name"] == "inference-proxy", "{r}");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        assert!(!String::from_utf8_lossy(&cmdline).contains(KEY), "{r}");
    }
    let pids: Vec<u64> = rows.iter().filter_map(|r| r["pid"].as_u64()).collect();

    // Up again: nothing restarted.
    let o = host.clawos(&["--json", "up"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("vm-launcher is already running"),
        "{}",
        show(&o)
    );
    let again: Vec<Value> = serde_json::from_slice(&o.stdout).expect("up --json");
    let pids_again: Vec<u64> = again.iter().filter_map(|r| r["pid"].as_u64()).collect();
    assert_eq!(pids, pids_again, "the same processes");
    let (code, _) = host.status();
    assert_eq!(code, Some(0));

    // The host works as one: a VM boots through the launcher `up` started, with its
    // identity from identity-manager and its skills relay.
    let o = host.clawos(&["vm", "start", "hu", "--mem", "256"]);
    assert!(o.status.success(), "{}", show(&o));
    let o = host.clawos(&["vm", "exec", "hu", "--", "cat", "/proc/version"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Linux"));
    assert!(
        !processes_naming(&state.join("vms")).is_empty(),
        "the VM's hypervisor runs"
    );

    // Down with the VM running: the launcher stops it, then everything ends.
    let o = host.clawos(&["down"]);
    assert!(o.status.success(), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("VM hu stopped"), "{}", show(&o));
    assert!(out.contains("vm-launcher stopped"), "{}", show(&o));
    assert!(
        !out.contains("killed"),
        "everything drained in time: {}",
        show(&o)
    );
    let left = wait_until_none(&state);
    assert!(left.is_empty(), "left running: {left:?}");
    let (code, rows) = host.status();
    assert_eq!(code, Some(7));
    assert!(rows.iter().all(|r| r["pid"].is_null()), "{rows:?}");
    assert!(
        std::fs::read_dir(state.join("run"))
            .expect("run dir")
            .next()
            .is_none(),
        "no stale records"
    );
}
