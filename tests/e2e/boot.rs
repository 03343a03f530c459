//! Boot real agent VMs under QEMU through the real launcher and CLI.

use std::time::Duration;

use clawos_e2e::{
    Launcher, artifacts, can_boot_vms, ext4_cat, flip_byte, hypervisor_running_for, image_ref, is,
    runtime, store_image,
};
use clawos_vm_launcher_api::{StartVm, VmState};

const BOOT: Duration = Duration::from_secs(180);

fn text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn start_list_conflict_stop_restart_keeps_workspace_and_env_has_no_key() {
    if !can_boot_vms("start_list_conflict_stop_restart_keeps_workspace_and_env_has_no_key") {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let secret = "sk-ant-host-only-secret-0123456789";
    let l = Launcher::start_with(state.path(), &[("ANTHROPIC_API_KEY", secret)]).expect("launcher");

    let o = l.clawos(&[
        "vm",
        "start",
        "agent-1",
        "--model",
        "claude-test-1",
        "--mem",
        "256",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("running"),
        "{}",
        text(&o)
    );

    let o = l.clawos(&["--json", "vm", "list"]);
    assert!(o.status.success(), "{}", text(&o));
    let vms: serde_json::Value = serde_json::from_slice(&o.stdout).expect("list --json is JSON");
    assert_eq!(vms[0]["name"], "agent-1");
    assert_eq!(vms[0]["state"], "running");
    assert_eq!(
        vms[0]["root_hash"],
        artifacts().manifest.verity.root_hash.as_str()
    );
    assert!(vms[0]["boot_ms"].as_u64().is_some_and(|ms| ms > 0));

    // Starting a running VM is a conflict (exit code 4), and changes nothing.
    let o = l.clawos(&["vm", "start", "agent-1", "--mem", "256"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already running"),
        "{}",
        text(&o)
    );

    let o = l.clawos(&["vm", "logs", "agent-1"]);
    let console = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        console.contains("CLAWOS_READY agent=agent-1 boot=1"),
        "{console}"
    );
    assert!(console.contains("rootfs verified"), "{console}");

    let o = l.clawos(&["vm", "stop", "agent-1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("stopped"),
        "{}",
        text(&o)
    );
    assert!(
        !hypervisor_running_for("agent-1"),
        "hypervisor still running after stop"
    );
    let o = l.clawos(&["vm", "logs", "agent-1"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("CLAWOS_POWEROFF"),
        "guest did not power off cleanly: {}",
        text(&o)
    );

    // What the guest wrote is on the VM's own workspace disk; the launcher's env file
    // carries the model and proxy address but never the host's API key.
    let ws = state.path().join("vms/agent-1/workspace.img");
    let env = ext4_cat(&ws, "/.env").expect("debugfs");
    assert!(env.contains("CLAWOS_MODEL=claude-test-1"), "{env}");
    assert!(
        env.contains("ANTHROPIC_BASE_URL=http://127.0.0.1:11435"),
        "{env}"
    );
    for f in ["workspace.img", "runtime.img", "config.img"] {
        // grep -F scans the (sparse, 1 GiB) images far faster than a debug-build loop.
        let found = std::process::Command::new("grep")
            .args(["-qaF", secret])
            .arg(state.path().join("vms/agent-1").join(f))
            .status()
            .expect("run grep");
        assert_eq!(
            found.code(),
            Some(1),
            "the host API key leaked into {f} (or grep failed)"
        );
    }
    assert_eq!(
        ext4_cat(&ws, "/.clawos/boots").expect("debugfs"),
        "boot 1\n"
    );

    // Start again: same disks, the guest sees its earlier file.
    let o = l.clawos(&["vm", "start", "agent-1", "--mem", "256"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = l.clawos(&["vm", "logs", "agent-1"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("boot=2"),
        "{}",
        text(&o)
    );
    let o = l.clawos(&["vm", "stop", "agent-1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        ext4_cat(&ws, "/.clawos/boots").expect("debugfs"),
        "boot 1\nboot 2\n"
    );

    let o = l.clawos(&["vm", "rm", "agent-1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!state.path().join("vms/agent-1").exists());
    let o = l.clawos(&["vm", "rm", "agent-1"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
}

#[test]
fn rootfs_block_flipped_after_signing_fails_the_vm_with_a_verity_reason() {
    if !can_boot_vms("rootfs_block_flipped_after_signing_fails_the_vm_with_a_verity_reason") {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let image = store_image(&state, "tampered").expect("store image");
    // A data block in the middle of the erofs image; the host does not hash the rootfs,
    // so only the guest's dm-verity can notice.
    let blocks = artifacts().manifest.verity.data_blocks;
    flip_byte(&image.join("rootfs.img"), (blocks / 2) * 4096 + 123).expect("flip");

    let l = Launcher::start(&state).expect("launcher");
    let rt = runtime();
    let vm = rt
        .block_on(l.client().start(&StartVm {
            name: "tampered".into(),
            model: None,
            mem_mib: 256,
            vcpus: 1,
            image: Some(image_ref(&state, "tampered")),
            snapshots: false,
            idempotency_key: None,
            token_budget: None,
        }))
        .expect("the host accepts it: signature and kernel/initramfs hashes match");
    assert_eq!(vm.state, VmState::Starting);
    let vm = l
        .wait_for("tampered", BOOT, |v| !v.state.is_active())
        .expect("VM ends");
    assert_eq!(vm.state, VmState::Failed, "{vm:?}");
    let reason = vm.reason.unwrap_or_default();
    assert!(
        reason.contains("dm-verity") && reason.contains("corrupted"),
        "{reason}"
    );
    assert!(!hypervisor_running_for("tampered"));
    let _ = is(VmState::Failed);
}
