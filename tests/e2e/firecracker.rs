//! The Firecracker backend boots a real VM where Firecracker can run: a `firecracker`
//! binary on PATH and hardware KVM (vmx/svm). Elsewhere it says so and skips.

use std::process::Command;
use std::time::Duration;

use clawos_e2e::{Launcher, can_build_images, is, runtime};
use clawos_vm_launcher_api::{StartVm, VmState};

fn firecracker_usable(test: &str) -> bool {
    let bin = Command::new("sh")
        .args(["-c", "command -v firecracker"])
        .output();
    if !bin.is_ok_and(|o| o.status.success()) {
        clawos_e2e::skip(
            test,
            "no firecracker binary on PATH; the Firecracker backend cannot boot a VM here",
        );
        return false;
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpu
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.contains(" vmx") || l.contains(" svm"));
    if !hw || std::fs::metadata("/dev/kvm").is_err() {
        clawos_e2e::skip(
            test,
            "no hardware KVM (vmx/svm + /dev/kvm); Firecracker cannot boot a guest here",
        );
        return false;
    }
    true
}

#[test]
fn firecracker_backend_boots_and_stops_a_vm() {
    let test = "firecracker_backend_boots_and_stops_a_vm";
    if !can_build_images(test) || !firecracker_usable(test) {
        return;
    }
    boot_and_stop(&[]);
}

#[test]
fn jailed_firecracker_boots_and_stops_a_vm() {
    let test = "jailed_firecracker_boots_and_stops_a_vm";
    if !can_build_images(test) || !firecracker_usable(test) {
        return;
    }
    let jailer = Command::new("sh")
        .args(["-c", "command -v jailer"])
        .output();
    if !jailer.is_ok_and(|o| o.status.success()) {
        clawos_e2e::skip(test, "no jailer binary on PATH");
        return;
    }
    boot_and_stop(&[
        ("CLAWOS_JAILER", "jailer"),
        ("CLAWOS_JAILER_USER", "10000:10000"),
    ]);
}

fn boot_and_stop(extra_env: &[(&str, &str)]) {
    let work = tempfile::tempdir().expect("tempdir");
    let image = work.path().join("image");
    let key = work.path().join("k");
    let clawos = |args: &[&str]| {
        Command::new(clawos_e2e::bin("clawos"))
            .args(args)
            .env("CLAWOS_STATE_DIR", work.path())
            .output()
            .expect("clawos")
    };
    let img = image.to_str().expect("utf8");
    assert!(
        clawos(&["image", "build", "--vmlinux", "--out", img])
            .status
            .success()
    );
    let pk =
        String::from_utf8_lossy(&clawos(&["keygen", "--out", key.to_str().expect("utf8")]).stdout)
            .trim()
            .to_owned();
    assert!(
        clawos(&["image", "sign", img, "--key", key.to_str().expect("utf8")])
            .status
            .success()
    );
    let mut env = vec![
        ("CLAWOS_BACKEND", "firecracker"),
        ("CLAWOS_SIGNING_PUBKEY", pk.as_str()),
    ];
    env.extend_from_slice(extra_env);
    let l = Launcher::start_with(&work.path().join("state"), &env).expect("launcher");
    let o = l
        .clawos_command(&["image", "add", "fc", img, "--pubkey", &pk])
        .output()
        .expect("clawos image add");
    assert!(o.status.success(), "{o:?}");
    let rt = runtime();
    let vm = rt
        .block_on(l.client().start(&StartVm {
            name: "fc1".into(),
            model: None,
            mem_mib: 256,
            vcpus: 1,
            image: Some("fc".into()),
            snapshots: false,
            idempotency_key: None,
            token_budget: None,
        }))
        .expect("start");
    assert_eq!(vm.backend, "firecracker");
    l.wait_for("fc1", Duration::from_secs(60), is(VmState::Running))
        .expect("running");
    let o = l.clawos(&["vm", "exec", "fc1", "--", "echo", "fc-exec"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "fc-exec\n", "{o:?}");
    let vm = rt.block_on(l.client().stop("fc1")).expect("stop");
    assert_eq!(vm.state, VmState::Stopped);
}
