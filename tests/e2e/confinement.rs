//! The hypervisor is confined (issue 12, item 3): QEMU and its vsock device run as an
//! unprivileged uid of their VM's own, without capabilities, QEMU under seccomp, both in
//! a per-VM cgroup that limits memory (guest RAM + overhead), CPU, tasks and IO, which is
//! gone once the VM has stopped.
//!
//! Read from the running processes' `/proc/<pid>/status` and `/proc/<pid>/cgroup`.
//! Against a launcher from before (`CLAWOS_E2E_BIN_DIR`) it fails: QEMU ran as uid 0
//! with every capability, no seccomp and no cgroup of its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clawos_e2e::{Launcher, can_boot_vms, can_use_vsock, is, skip};
use clawos_vm_launcher_api::VmState;

const TEST: &str = "the_hypervisor_and_its_vsock_device_run_unprivileged_in_a_limited_cgroup";

/// `Key:` fields of `/proc/<pid>/status`.
fn status(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// The VM's recorded hypervisor and helper pids.
fn pids(state: &Path, vm: &str) -> (u32, Vec<u32>) {
    let r: serde_json::Value = serde_json::from_slice(
        &std::fs::read(state.join("vms").join(vm).join("vm.json")).expect("record"),
    )
    .expect("json");
    let pid = r["process"]["pid"].as_u64().expect("a running hypervisor") as u32;
    let helpers = r["helpers"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter_map(|p| p["pid"].as_u64())
                .map(|p| p as u32)
                .collect()
        })
        .unwrap_or_default();
    (pid, helpers)
}

/// The directories of a process's cgroups: (controllers, directory).
fn cgroups(pid: u32) -> Vec<(String, PathBuf)> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mount_of = |want: &str| {
        mounts.lines().find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            let ok = match want {
                "" => post.first() == Some(&"cgroup2"),
                c => post.first() == Some(&"cgroup") && post.get(2)?.split(',').any(|o| o == c),
            };
            ok.then(|| (pre[3].to_owned(), PathBuf::from(pre[4])))
        })
    };
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
            let first = ctrls.split(',').next().unwrap_or("");
            let (root, point) = mount_of(first)?;
            let rel = path
                .strip_prefix(root.trim_end_matches('/'))?
                .trim_start_matches('/');
            Some((ctrls.to_owned(), point.join(rel)))
        })
        .collect()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The VM's cgroup limits as (memory bytes, pids.max, cpu quota) and its directories.
fn limits(pid: u32) -> (u64, String, String, Vec<PathBuf>) {
    let cg = cgroups(pid);
    let dir = |c: &str| {
        cg.iter()
            .find(|(ctrls, _)| ctrls.split(',').any(|x| x == c))
            .map(|(_, d)| d.clone())
    };
    let v2 = cg
        .iter()
        .find(|(c, _)| c.is_empty())
        .map(|(_, d)| d.clone());
    let mut dirs = Vec::new();
    let (mem, pids, cpu) = match (dir("memory"), v2) {
        (Some(m), _) => {
            let p = dir("pids").expect("a pids cgroup");
            let c = dir("cpu").expect("a cpu cgroup");
            dirs.extend([m.clone(), p.clone(), c.clone()]);
            (
                read(&m.join("memory.limit_in_bytes")),
                read(&p.join("pids.max")),
                read(&c.join("cpu.cfs_quota_us")),
            )
        }
        (None, Some(d)) => {
            dirs.push(d.clone());
            (
                read(&d.join("memory.max")),
                read(&d.join("pids.max")),
                read(&d.join("cpu.max")),
            )
        }
        (None, None) => panic!("process {pid} is in no cgroup of its own: {cg:?}"),
    };
    (mem.parse().unwrap_or(0), pids, cpu, dirs)
}

#[test]
fn the_hypervisor_and_its_vsock_device_run_unprivileged_in_a_limited_cgroup() {
    if !can_boot_vms(TEST) || !can_use_vsock(TEST) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(
            TEST,
            "only a root launcher can run its VMs as other uids and make cgroups",
        );
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let l = Launcher::start(&state).expect("launcher");
    for (vm, mem) in [("c1", "256"), ("c2", "384")] {
        let o = l.clawos(&["vm", "start", vm, "--mem", mem]);
        assert!(o.status.success(), "{vm}: {o:?}\n{}", l.log());
    }
    let mut uids = Vec::new();
    for (vm, mem_mib) in [("c1", 256u64), ("c2", 384)] {
        let (qemu, helpers) = pids(&state, vm);
        let uid = status(qemu, "Uid");
        let ids: Vec<&str> = uid.split_whitespace().collect();
        assert_eq!(ids.len(), 4, "{vm}: Uid: {uid}");
        assert!(
            ids.iter().all(|u| *u != "0" && *u == ids[0]),
            "{vm}: QEMU runs as Uid: {uid}"
        );
        assert!(
            status(qemu, "Gid").split_whitespace().all(|g| g != "0"),
            "{vm}"
        );
        assert_eq!(
            status(qemu, "CapEff"),
            "0000000000000000",
            "{vm}: QEMU CapEff"
        );
        assert_eq!(
            status(qemu, "CapPrm"),
            "0000000000000000",
            "{vm}: QEMU CapPrm"
        );
        assert_eq!(
            status(qemu, "Seccomp"),
            "2",
            "{vm}: QEMU is not under a seccomp filter"
        );
        assert_eq!(status(qemu, "NoNewPrivs"), "1", "{vm}");
        let (mem, pids_max, cpu, dirs) = limits(qemu);
        assert!(mem >= mem_mib << 20, "{vm}: memory limit {mem} < guest RAM");
        assert!(mem < 64 << 30, "{vm}: memory limit {mem} is no limit");
        assert!(
            pids_max.parse::<u64>().is_ok(),
            "{vm}: pids.max {pids_max:?}"
        );
        assert!(
            cpu.split_whitespace()
                .next()
                .and_then(|q| q.parse::<i64>().ok())
                .is_some_and(|q| q > 0),
            "{vm}: cpu quota {cpu:?}"
        );
        assert_eq!(helpers.len(), 1, "{vm}: one vsock device");
        for h in &helpers {
            assert_eq!(
                status(*h, "Uid"),
                uid,
                "{vm}: the vsock device runs as the VM's uid"
            );
            assert_eq!(
                status(*h, "CapEff"),
                "0000000000000000",
                "{vm}: vsock device CapEff"
            );
            assert_eq!(status(*h, "NoNewPrivs"), "1", "{vm}");
            assert_eq!(
                limits(*h).3,
                dirs,
                "{vm}: the vsock device is in the VM's cgroup"
            );
        }
        // The rootfs is a descriptor the launcher checked, the kernel a verified copy.
        let cmdline = std::fs::read(format!("/proc/{qemu}/cmdline")).expect("cmdline");
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(cmdline.contains("file=/dev/fdset/1,"), "{cmdline}");
        assert!(
            cmdline.contains(&format!("vms/{vm}/boot/vmlinuz")),
            "{cmdline}"
        );
        uids.push((vm, uid, dirs));
    }
    assert_ne!(uids[0].1, uids[1].1, "two VMs share a uid");
    // The channel works through the confined device.
    let o = l.clawos(&["vm", "exec", "c1", "--", "echo", "confined-ok"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "confined-ok\n", "{o:?}");
    // Stopped: its cgroup is gone.
    let o = l.clawos(&["vm", "stop", "c1"]);
    assert!(o.status.success(), "{o:?}");
    l.wait_for("c1", Duration::from_secs(30), is(VmState::Stopped))
        .expect("stopped");
    for d in &uids[0].2 {
        assert!(!d.exists(), "c1's cgroup {} is left behind", d.display());
    }
    let o = l.clawos(&["vm", "stop", "c2"]);
    assert!(o.status.success(), "{o:?}");
}
