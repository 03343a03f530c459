//! Snapshot and restore on real QEMU VMs: a process and in-memory files survive
//! snapshot → stop → restore, the disks return to the snapshot's, and what cannot be
//! done is refused with an error that says why.

use std::process::Output;
use std::time::Duration;

use clawos_e2e::{Launcher, can_boot_vms, can_use_vsock, is, show};
use clawos_vm_launcher_api::{Snapshot, Vm, VmState};

const BOOT: Duration = Duration::from_secs(180);

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a shell command in the guest; asserts it succeeded, returns its stdout.
fn sh(l: &Launcher, vm: &str, script: &str) -> String {
    let o = l.clawos(&["vm", "exec", vm, "--", "sh", "-c", script]);
    assert!(
        o.status.success(),
        "{script}: {}\n{}",
        show(&o),
        clawos_e2e::deadline::state_logs(&l.state_dir)
    );
    stdout(&o)
}

#[test]
fn snapshot_stop_restore_brings_back_processes_memory_and_disks() {
    let name = "snapshot_stop_restore_brings_back_processes_memory_and_disks";
    if !can_boot_vms(name) || !can_use_vsock(name) {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let l = Launcher::start(state.path()).expect("launcher");
    let o = l.clawos(&["vm", "start", "sn", "--mem", "256", "--snapshots"]);
    assert!(o.status.success(), "{}", show(&o));
    // A VM started without --snapshots (microvm) refuses, and says how to get one.
    let o = l.clawos(&["vm", "start", "mv", "--mem", "256"]);
    assert!(o.status.success(), "{}", show(&o));
    let o = l.clawos(&["vm", "snapshot", "mv", "--tag", "t1"]);
    assert_eq!(o.status.code(), Some(4), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--snapshots"),
        "{}",
        show(&o)
    );
    assert_eq!(sh(&l, "mv", "echo still"), "still\n");
    assert!(
        !state.path().join("vms/mv/snapshots/t1").exists(),
        "a refused snapshot leaves nothing"
    );
    let o = l.clawos(&["vm", "stop", "mv"]);
    assert!(o.status.success(), "{}", show(&o));

    // Before the snapshot: a background process, a file in guest memory only (tmpfs),
    // and one on the workspace disk.
    let pid = sh(
        &l,
        "sn",
        "mkdir -p /run/e2e && echo in-memory > /run/e2e/mark && \
         echo on-disk > /workspace/before.txt && \
         sleep 100000 </dev/null >/dev/null 2>&1 & echo $!",
    );
    let pid = pid.trim().to_owned();
    assert!(pid.parse::<u32>().is_ok(), "pid {pid:?}");

    // Bad tags are refused before anything happens.
    for bad in ["../x", "A", "a/b", ""] {
        let o = l.clawos(&["vm", "snapshot", "sn", "--tag", bad]);
        assert_eq!(o.status.code(), Some(1), "{bad}: {}", show(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("invalid snapshot tag"),
            "{bad}: {}",
            show(&o)
        );
    }
    let o = l.clawos(&["--json", "vm", "snapshot", "sn", "--tag", "t1"]);
    assert!(o.status.success(), "{}", show(&o));
    let snap: Snapshot = serde_json::from_slice(&o.stdout).expect("snapshot json");
    assert_eq!((snap.tag.as_str(), snap.vm.as_str()), ("t1", "sn"));
    assert!(snap.state_bytes > 1 << 20, "{snap:?}");
    assert!(snap.disk_bytes > 0, "{snap:?}");

    // The VM runs on right away, with its channel.
    let vm: Vm =
        serde_json::from_slice(&l.clawos(&["--json", "vm", "show", "sn"]).stdout).expect("vm json");
    assert_eq!(vm.state, VmState::Running);
    sh(
        &l,
        "sn",
        "echo later > /workspace/after.txt && rm /run/e2e/mark",
    );

    let o = l.clawos(&["vm", "snapshot", "sn", "--tag", "t1"]);
    assert_eq!(o.status.code(), Some(4), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already has a snapshot tagged t1"),
        "{}",
        show(&o)
    );
    let o = l.clawos(&["vm", "restore", "sn", "--snapshot", "t1"]);
    assert_eq!(o.status.code(), Some(4), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("stop it first"),
        "{}",
        show(&o)
    );

    let o = l.clawos(&["vm", "stop", "sn"]);
    assert!(o.status.success(), "{}", show(&o));
    let o = l.clawos(&["vm", "restore", "sn", "--snapshot", "nope"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no snapshot tagged nope"),
        "{}",
        show(&o)
    );
    let o = l.clawos(&["vm", "restore", "sn", "--snapshot", "t1"]);
    assert!(o.status.success(), "{}", show(&o));
    l.wait_for("sn", BOOT, is(VmState::Running))
        .expect("restored VM running");

    // The process runs again, the tmpfs file is back, and the disk is the snapshot's.
    let got = sh(
        &l,
        "sn",
        &format!(
            "tr '\\0' ' ' < /proc/{pid}/cmdline; echo; cat /run/e2e/mark /workspace/before.txt; \
             test -e /workspace/after.txt && echo after-present || echo after-absent"
        ),
    );
    assert_eq!(
        got, "sleep 100000 \nin-memory\non-disk\nafter-absent\n",
        "restored guest"
    );

    let o = l.clawos(&["--json", "vm", "snapshots", "sn"]);
    let list: Vec<Snapshot> = serde_json::from_slice(&o.stdout).expect("list json");
    assert_eq!(list, vec![snap]);
    let o = l.clawos(&["vm", "snapshot-rm", "sn", "t1"]);
    assert!(o.status.success(), "{}", show(&o));
    let o = l.clawos(&["--json", "vm", "snapshots", "sn"]);
    assert_eq!(stdout(&o).trim(), "[]");
    assert!(
        std::fs::read_dir(state.path().join("vms/sn/snapshots"))
            .expect("snapshots dir")
            .next()
            .is_none(),
        "no leftovers"
    );
    let o = l.clawos(&["vm", "stop", "sn"]);
    assert!(o.status.success(), "{}", show(&o));
}
