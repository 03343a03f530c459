//! vm-launcher registers each VM's processes with monitor-daemon, and `clawos audit
//! tail` shows what the hypervisor of that VM does, tagged with the VM.

use std::time::{Duration, Instant};

use clawos_e2e::{Launcher, can_boot_vms, can_use_vsock, port, skip, spawn_daemon};
use clawos_monitor_api::{AuditEvent, Kind};

#[test]
fn a_vms_hypervisor_is_audited_and_audit_tail_shows_it() {
    let name = "a_vms_hypervisor_is_audited_and_audit_tail_shows_it";
    if !can_boot_vms() || !can_use_vsock(name) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/sys/kernel/btf/vmlinux").exists()
    {
        skip(
            name,
            "monitor-daemon loads eBPF programs: needs root and a kernel with BTF",
        );
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let mport = port();
    let mut monitor = spawn_daemon(
        "monitor-daemon",
        &[
            "--addr",
            &format!("127.0.0.1:{mport}"),
            "--state-dir",
            state.path().to_str().expect("utf8"),
        ],
        &[],
        &state.path().join("monitor.log"),
        mport,
    )
    .expect("monitor-daemon");
    let murl = format!("http://127.0.0.1:{mport}");
    let l = Launcher::start_with(state.path(), &[("CLAWOS_MONITOR_URL", &murl)]).expect("launcher");
    let o = l.clawos(&["vm", "start", "aud", "--mem", "256"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = l.clawos(&["vm", "exec", "aud", "--", "echo", "hi"]);
    assert!(o.status.success());
    let pid = l
        .hypervisor_pids()
        .first()
        .copied()
        .expect("a hypervisor pid");

    let tail = |extra: &[&str]| {
        let mut args = vec![
            "--json", "audit", "tail", "--agent", "aud", "--limit", "5000",
        ];
        args.extend_from_slice(extra);
        let o = std::process::Command::new(clawos_e2e::bin("clawos"))
            .args(&args)
            .env("CLAWOS_STATE_DIR", state.path())
            .env("CLAWOS_MONITOR_URL", &murl)
            .output()
            .expect("clawos audit tail");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str::<AuditEvent>(l).expect("JSON line"))
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let events = loop {
        let ev = tail(&[]);
        if ev.iter().any(|e| e.pid == Some(pid)) || Instant::now() > deadline {
            break ev;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mine: Vec<&AuditEvent> = events.iter().filter(|e| e.pid == Some(pid)).collect();
    assert!(
        !mine.is_empty(),
        "no events from the hypervisor (pid {pid})"
    );
    for e in &mine {
        assert_eq!(e.agent.as_deref(), Some("aud"));
        assert_eq!(e.vm.as_deref(), Some("aud"));
        assert_eq!(e.kind, Kind::Syscall);
        assert!(e.syscall.is_some() && e.ret.is_some());
    }
    // --agent filters: another agent's view is empty.
    let o = std::process::Command::new(clawos_e2e::bin("clawos"))
        .args(["--json", "audit", "tail", "--agent", "someone-else"])
        .env("CLAWOS_STATE_DIR", state.path())
        .env("CLAWOS_MONITOR_URL", &murl)
        .output()
        .expect("clawos");
    assert!(o.status.success());
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Human output names the VM and the syscalls.
    let o = std::process::Command::new(clawos_e2e::bin("clawos"))
        .args(["audit", "tail", "--agent", "aud", "--limit", "3"])
        .env("CLAWOS_STATE_DIR", state.path())
        .env("CLAWOS_MONITOR_URL", &murl)
        .output()
        .expect("clawos");
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.lines().all(|l| l.contains(" aud/aud ")), "{text}");
    let o = l.clawos(&["vm", "stop", "aud"]);
    assert!(o.status.success());
    let _ = monitor.kill();
    let _ = monitor.wait();
}
