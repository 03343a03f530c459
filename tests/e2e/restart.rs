//! vm-launcher killed with SIGKILL and restarted re-adopts what still runs, by pid *and*
//! process start time, and marks the rest as not running.

use std::time::Duration;

use clawos_e2e::{Launcher, can_boot_vms, hypervisor_running_for, is, runtime};
use clawos_vm_launcher_api::{StartVm, VmState};

fn start(l: &Launcher, name: &str) {
    runtime()
        .block_on(l.client().start(&StartVm {
            name: name.into(),
            model: Some("m".into()),
            mem_mib: 256,
            vcpus: 1,
            image: None,
            snapshots: false,
            idempotency_key: None,
            token_budget: None,
        }))
        .expect("start");
}

#[test]
fn sigkill_restart_readopts_live_vms_and_drops_dead_ones() {
    if !can_boot_vms("sigkill_restart_readopts_live_vms_and_drops_dead_ones") {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let mut l = Launcher::start(state.path()).expect("launcher");
    for n in ["keep", "dies", "reused"] {
        start(&l, n);
    }
    for n in ["keep", "dies", "reused"] {
        l.wait_for(n, Duration::from_secs(240), is(VmState::Running))
            .expect("running");
    }
    let pid_of = |n: &str| -> (u32, String) {
        let t = std::fs::read_to_string(state.path().join("vms").join(n).join("hypervisor.pid"))
            .expect("pid file");
        (
            t.split_whitespace()
                .next()
                .expect("pid")
                .parse()
                .expect("num"),
            t,
        )
    };
    let (keep_pid, _) = pid_of("keep");

    l.kill9();
    // While the launcher is down: one hypervisor dies, and another's pid file is made
    // to name a live process that is not its hypervisor (as after pid reuse).
    let (dies_pid, _) = pid_of("dies");
    // SAFETY: kill with plain integers, on this test's own VM.
    unsafe { libc::kill(dies_pid as i32, libc::SIGKILL) };
    let (reused_pid, _) = pid_of("reused");
    // SAFETY: as above.
    unsafe { libc::kill(reused_pid as i32, libc::SIGKILL) };
    let mut impostor = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("sleep");
    std::fs::write(
        state.path().join("vms/reused/hypervisor.pid"),
        format!("{} 1\n", impostor.id()),
    )
    .expect("write pid");
    // Killed is not yet gone: a hypervisor tears its guest's memory down before it
    // ends, and until then it is a live process. Wait for both to be gone (or zombies).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for pid in [dies_pid, reused_pid] {
        while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "hypervisor {pid} still alive 30 s after SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    l.spawn().expect("restart launcher");
    let vms = runtime().block_on(l.client().list()).expect("list");
    let by = |n: &str| vms.iter().find(|v| v.name == n).expect("listed").clone();
    let keep = by("keep");
    assert_eq!(keep.state, VmState::Running, "{keep:?}");
    assert_eq!(keep.pid, Some(keep_pid));
    for n in ["dies", "reused"] {
        let v = by(n);
        assert!(
            !v.state.is_active(),
            "{n} must not be listed running: {v:?}"
        );
        assert!(v.pid.is_none());
    }
    let _ = impostor.kill();
    let _ = impostor.wait();

    // The re-adopted VM is still fully controllable, and a service manager's stop
    // (SIGTERM) while its stop is in flight lets that request finish before exiting 0.
    let client = l.client();
    let stopping = std::thread::spawn(move || runtime().block_on(client.stop("keep")));
    l.wait_for("keep", Duration::from_secs(30), |v| {
        v.state != VmState::Running
    })
    .expect("stopping");
    let mut child = l.child.take().expect("launcher process");
    // SAFETY: kill with plain integers, on this test's own launcher process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let vm = stopping.join().expect("stop thread").expect("stop");
    assert_eq!(vm.state, VmState::Stopped, "{vm:?}");
    assert!(!hypervisor_running_for("keep"));
    let deadline = std::time::Instant::now() + Duration::from_secs(35);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "launcher did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "launcher exited with {status}: {}",
        l.log()
    );
    assert!(l.log().contains("re-adopted running VM"), "{}", l.log());
}
