//! vm-launcher registers each VM's processes with monitor-daemon, and `clawos audit
//! tail` shows what the hypervisor of that VM does, tagged with the VM.

use std::time::{Duration, Instant};

use clawos_e2e::{Launcher, can_audit_vms, port, start_monitor, static_c_program};
use clawos_monitor_api::{AuditEvent, Kind};

#[test]
fn a_vms_hypervisor_is_audited_and_audit_tail_shows_it() {
    let name = "a_vms_hypervisor_is_audited_and_audit_tail_shows_it";
    if !can_audit_vms(name) {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let mport = port();
    let monitor = start_monitor(state.path(), mport, "monitor.log").expect("monitor-daemon");
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
    drop(monitor);
}

/// A static workload run inside the VM: a failing `open` of a marker path, then `n`
/// `getppid` calls; prints its pid and the parent pid the calls returned.
const WORKLOAD_C: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int n = atoi(argv[2]);
    open(argv[1], O_RDONLY);
    long ppid = -1;
    for (int i = 0; i < n; i++) ppid = syscall(SYS_getppid);
    printf("%d %ld\n", getpid(), ppid);
    return 0;
}
"#;

/// What one run of the workload inside the VM left in the trail.
fn guest_run_events(events: &[AuditEvent], pid: u32) -> Vec<&AuditEvent> {
    events
        .iter()
        .filter(|e| e.guest_boot.is_some() && e.pid == Some(pid) && e.kind == Kind::Syscall)
        .collect()
}

#[test]
fn what_the_agent_does_inside_its_vm_is_audited_even_across_a_monitor_crash() {
    let name = "what_the_agent_does_inside_its_vm_is_audited_even_across_a_monitor_crash";
    if !can_audit_vms(name) {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let work = static_c_program(state.path(), "audwork", WORKLOAD_C).expect("workload");
    let mport = port();
    let monitor = start_monitor(state.path(), mport, "monitor.log").expect("monitor-daemon");
    let murl = format!("http://127.0.0.1:{mport}");
    let l = Launcher::start_with(state.path(), &[("CLAWOS_MONITOR_URL", &murl)]).expect("launcher");
    let o = l.clawos(&["vm", "start", "gaud", "--mem", "256"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The launcher registered the hypervisor's processes too; under software
    // emulation they make thousands of events a second, which this test does not need
    // to wade through. Only the guest's stream remains.
    let unwatched = clawos_e2e::monitor_unwatch_all(state.path(), &murl).expect("unwatch");
    assert_eq!(unwatched, 2, "the hypervisor and its vsock device");
    let o = l.clawos(&["vm", "cp", work.to_str().expect("utf8"), "gaud:audwork"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = l.clawos(&[
        "vm",
        "exec",
        "gaud",
        "--",
        "chmod",
        "755",
        "/workspace/audwork",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Runs the workload; returns (pid, ppid) as it printed them.
    let run = |marker: &str, n: u32| -> (u32, u32) {
        let o = l.clawos(&[
            "vm",
            "exec",
            "gaud",
            "--",
            "/workspace/audwork",
            marker,
            &n.to_string(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = String::from_utf8_lossy(&o.stdout);
        let mut it = out
            .split_whitespace()
            .map(|v| v.parse::<u32>().expect("pid"));
        (it.next().expect("pid"), it.next().expect("ppid"))
    };
    // The guest's part of the trail (the hypervisor's own events, recorded too, are
    // many more), once the run's last event (its `write` of the result) is in and
    // nothing more arrives.
    let trail = state.path().join("monitor/audit.jsonl");
    let trail_after = |pid: u32| -> Vec<AuditEvent> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last_len = usize::MAX;
        loop {
            let text = std::fs::read_to_string(&trail).unwrap_or_default();
            // Complete lines only: the recorder may be mid-write.
            let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            let events: Vec<AuditEvent> = complete
                .lines()
                .filter(|l| l.contains("\"guest_"))
                .map(|l| serde_json::from_str(l).expect("JSON line"))
                .collect();
            let done = guest_run_events(&events, pid)
                .iter()
                .any(|e| e.syscall.as_deref() == Some("write"));
            if done && events.len() == last_len {
                return events;
            }
            last_len = events.len();
            assert!(
                Instant::now() < deadline,
                "the guest's events of pid {pid} did not arrive:\n{}\n{}\n{}",
                std::fs::read_to_string(state.path().join("monitor-2.log")).unwrap_or_default(),
                l.log(),
                std::fs::read_to_string(state.path().join("vms/gaud/console.log"))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let check_run = |events: &[AuditEvent], pid: u32, ppid: u32, marker: &str, n: usize| {
        let mine = guest_run_events(events, pid);
        let getppid: Vec<_> = mine
            .iter()
            .filter(|e| e.syscall.as_deref() == Some("getppid"))
            .collect();
        assert_eq!(getppid.len(), n, "getppid events of pid {pid}");
        assert!(getppid.iter().all(|e| e.ret == Some(i64::from(ppid))));
        let opens: Vec<_> = mine
            .iter()
            .filter(|e| e.path.as_deref() == Some(marker))
            .collect();
        assert_eq!(opens.len(), 1, "the marker open of pid {pid}");
        assert_eq!(opens[0].syscall.as_deref(), Some("openat"));
        assert_eq!(opens[0].ret, Some(-2), "ENOENT");
        // The command joins the audited cgroup between fork and exec: its first
        // events are the agent's child finishing that, then the exec, then its own.
        let exec = mine
            .iter()
            .position(|e| e.syscall.as_deref() == Some("execve") && e.ret == Some(0))
            .expect("the command's execve");
        for (i, e) in mine.iter().enumerate() {
            assert_eq!(e.vm.as_deref(), Some("gaud"));
            assert_eq!(e.agent.as_deref(), Some("gaud"));
            let comm = if i < exec { "clawos-agent" } else { "audwork" };
            assert_eq!(e.comm.as_deref(), Some(comm), "{e:?}");
            assert_eq!(e.tid, Some(pid));
        }
    };

    let (pid, ppid) = run("/workspace/begin-marker", 37);
    let events = trail_after(pid);
    check_run(&events, pid, ppid, "/workspace/begin-marker", 37);
    // The guest agent (the workload's parent) and clawos-audit themselves are not in
    // the audited cgroup.
    assert!(
        !events
            .iter()
            .any(|e| e.pid == Some(ppid) || e.comm.as_deref() == Some("clawos-audit")),
        "the guest's own services were audited"
    );

    // The monitor is killed outright (SIGKILL, by the drop); the agent keeps working;
    // the monitor comes back.
    drop(monitor);
    let (pid2, ppid2) = run("/workspace/while-down", 23);
    let monitor =
        start_monitor(state.path(), mport, "monitor-2.log").expect("monitor-daemon restart");
    let events = trail_after(pid2);
    check_run(&events, pid2, ppid2, "/workspace/while-down", 23);
    check_run(&events, pid, ppid, "/workspace/begin-marker", 37);
    // Every guest event exactly once, none missing, nothing reported lost.
    let mut seqs: Vec<u64> = events
        .iter()
        .filter(|e| e.kind == Kind::Syscall)
        .filter_map(|e| e.guest_seq)
        .collect();
    let n = seqs.len();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), n, "a guest event was recorded twice");
    assert_eq!(
        seqs.last().copied(),
        Some(seqs[0] + n as u64 - 1),
        "a gap in the guest's sequence numbers"
    );
    assert_eq!(seqs[0], 1, "the guest's first events are missing");
    assert!(
        !events.iter().any(|e| e.kind == Kind::GuestDrops),
        "guest drops reported"
    );
    // `clawos audit tail` marks what happened inside the VM.
    let o = std::process::Command::new(clawos_e2e::bin("clawos"))
        .args(["audit", "tail", "--agent", "gaud", "--limit", "1000000"])
        .env("CLAWOS_STATE_DIR", state.path())
        .env("CLAWOS_MONITOR_URL", &murl)
        .output()
        .expect("clawos audit tail");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains(" gaud/gaud:guest audwork[") && l.contains("getppid(")),
        "no guest line in audit tail"
    );
    let o = l.clawos(&["vm", "stop", "gaud"]);
    assert!(o.status.success());
    drop(monitor);
}
