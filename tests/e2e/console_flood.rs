//! A hostile program inside a real VM writes to its serial console as fast as it can.
//! The launcher keeps the live console log under its cap (here 1 MiB) by cutting it
//! while the hypervisor runs, keeping the earlier part as `console.log.1`: the guest
//! cannot fill the host's disk, and the VM keeps running.

use std::time::Duration;

use clawos_e2e::{Launcher, can_boot_vms, can_use_vsock, is, runtime};
use clawos_vm_launcher_api::{StartVm, VmState};

#[test]
fn a_guest_flooding_its_console_stays_within_the_cap() {
    let name = "a_guest_flooding_its_console_stays_within_the_cap";
    if !can_boot_vms(name) || !can_use_vsock(name) {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let l =
        Launcher::start_with(state.path(), &[("CLAWOS_CONSOLE_MAX_MIB", "1")]).expect("launcher");
    runtime()
        .block_on(l.client().start(&StartVm {
            name: "noisy".into(),
            model: None,
            mem_mib: 256,
            vcpus: 1,
            image: None,
            snapshots: false,
            idempotency_key: None,
            token_budget: None,
        }))
        .expect("start");
    l.wait_for("noisy", Duration::from_secs(240), is(VmState::Running))
        .expect("running");
    // 4 MiB of text straight to the serial port, four times the cap.
    let o = l.clawos(&[
        "vm",
        "exec",
        "noisy",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero bs=65536 count=64 2>/dev/null | tr '\\000' x > /dev/ttyS0",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The supervisor looks every 250 ms; give it a few looks after the last byte.
    std::thread::sleep(Duration::from_secs(1));
    let vm_dir = state.path().join("vms/noisy");
    let live = std::fs::metadata(vm_dir.join("console.log"))
        .expect("console.log")
        .len();
    let older = std::fs::metadata(vm_dir.join("console.log.1"))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!("console.log {live} bytes, console.log.1 {older} bytes");
    // The cap, plus what a guest writes between two looks (≈ 0.5 MB/s under TCG).
    let bound = (1 << 20) + (512 << 10);
    assert!(live <= bound, "console.log is {live} bytes, over the cap");
    assert!(
        older <= bound,
        "console.log.1 is {older} bytes, over the cap"
    );
    assert!(older > 0, "the log was never cut (4 MiB were written)");
    assert!(
        l.log().contains("console log capped"),
        "the launcher did not report the cut: {}",
        l.log()
    );
    let vm = runtime().block_on(l.client().get("noisy")).expect("get");
    assert_eq!(vm.state, VmState::Running, "{vm:?}");
    let o = l.clawos(&["vm", "exec", "noisy", "--", "true"]);
    assert!(o.status.success(), "the VM still answers");
}
