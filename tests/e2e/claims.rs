//! Claims the documentation makes that had no test of their own, on the real launcher
//! binary and (for the isolation claims) a real VM under QEMU:
//!
//! - a launcher with a pinned root hash (`CLAWOS_AGENT_ROOTHASH`) refuses an image with
//!   another one — HTTP 422, `image_root_hash_mismatch`, no VM process — and boots the
//!   image it pins; a bundle whose rootfs grew after signing (the signed manifest still
//!   verifies) is refused by its size, HTTP 422, `image_size_mismatch`;
//! - a VM has no network device and no host path shared into it: only `lo` in the guest,
//!   no network, 9p or virtio-fs device on its virtio or PCI buses (seen whether or not
//!   the guest kernel has a driver for one: its interface list alone would not show a
//!   virtio-net card the kernel cannot drive), no 9p or virtiofs mount, and none of
//!   `-netdev`, `-nic`, `-net`, `-virtfs`, `-fsdev`, a network or file-system device on
//!   the hypervisor's command line, which has `-nodefaults`;
//! - the per-boot control secret is in the guest's `/run/clawos/control.secret` (root,
//!   0600) and nowhere in the workspace: not in `/workspace/.env`, not on the
//!   workspace disk.

use std::time::Duration;

use clawos_e2e::{
    Launcher, artifacts, can_boot_vms, can_use_vsock, copy_image, hypervisor_running_for,
    image_ref, is, runtime, show, store_image, vms_on_disk,
};
use clawos_vm_launcher_api::{ClientError, StartVm, VmState};

const BOOT: Duration = Duration::from_secs(180);

fn start_req(name: &str, image: Option<String>) -> StartVm {
    StartVm {
        name: name.into(),
        model: None,
        mem_mib: 256,
        vcpus: 1,
        image,
        snapshots: false,
        idempotency_key: None,
        token_budget: None,
    }
}

/// Starts `req` through the typed client and expects a refusal: returns (HTTP status,
/// code, message).
fn refused(l: &Launcher, req: &StartVm) -> (u16, String, String) {
    match runtime().block_on(l.client().start(req)) {
        Err(ClientError::Api {
            status,
            code,
            message,
            ..
        }) => (status, code, message),
        other => panic!("{}: expected a refusal, got {other:?}", req.name),
    }
}

/// The real root hash with its first hex digit changed: well-formed, not the image's.
fn other_root_hash() -> String {
    let real = &artifacts().manifest.verity.root_hash;
    let first = if real.starts_with('0') { "1" } else { "0" };
    format!("{first}{}", &real[1..])
}

#[test]
fn a_pinned_root_hash_and_the_rootfs_size_are_enforced_before_anything_boots() {
    if !can_boot_vms("a_pinned_root_hash_and_the_rootfs_size_are_enforced_before_anything_boots") {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let real = artifacts().manifest.verity.root_hash.clone();

    // A launcher pinning another root hash refuses its own default image.
    let state = work.path().join("pinned-other");
    let pin = other_root_hash();
    let l =
        Launcher::start_with(&state, &[("CLAWOS_AGENT_ROOTHASH", pin.as_str())]).expect("launcher");
    let (status, code, message) = refused(&l, &start_req("pinned", None));
    assert_eq!(status, 422, "{code}: {message}");
    assert_eq!(code, "image_root_hash_mismatch", "{message}");
    assert!(message.contains("root hash mismatch"), "{message}");
    assert!(
        !message.contains(&real) && !message.contains(&pin),
        "the refusal says no hash: {message}"
    );
    assert!(
        l.log().contains(&real) && l.log().contains(&pin),
        "the launcher's log keeps both hashes: {}",
        l.log()
    );
    assert!(
        !hypervisor_running_for("pinned"),
        "a VM process was started"
    );
    assert!(vms_on_disk(&state).is_empty(), "{:?}", vms_on_disk(&state));
    // The CLI says the same with its image-refused status.
    let o = l.clawos(&["vm", "start", "pinned", "--mem", "256"]);
    assert_eq!(o.status.code(), Some(5), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("image_root_hash_mismatch"),
        "{}",
        show(&o)
    );
    assert!(
        !hypervisor_running_for("pinned"),
        "a VM process was started"
    );
    drop(l);

    // A rootfs that grew after the bundle was signed: the manifest and its signature
    // still verify, only the size tells. Pinned to the right root hash, so the size is
    // all that differs.
    let state = work.path().join("pinned-right");
    let l = Launcher::start_with(&state, &[("CLAWOS_AGENT_ROOTHASH", real.as_str())])
        .expect("launcher");
    let grow = |dir: &std::path::Path| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join(clawos_image::manifest::files::ROOTFS))
            .expect("open rootfs");
        f.write_all(&[0u8; 4096]).expect("grow rootfs");
    };
    // `clawos image add` checks it as the launcher would: it never gets in.
    let source = copy_image(&work.path().join("grown")).expect("copy");
    grow(&source);
    let o = l.add_image("grown", &source);
    assert_eq!(o.status.code(), Some(5), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("rootfs"),
        "{}",
        show(&o)
    );
    assert!(
        !state.join("images/grown").exists(),
        "the grown bundle was added"
    );
    // The store's copy grows after it was added: the launcher refuses it.
    let image = store_image(&state, "grown").expect("store");
    grow(&image);
    let (status, code, message) =
        refused(&l, &start_req("grown", Some(image_ref(&state, "grown"))));
    assert_eq!(status, 422, "{code}: {message}");
    assert_eq!(code, "image_size_mismatch", "{message}");
    assert!(message.contains("rootfs size mismatch"), "{message}");
    let size = artifacts().manifest.rootfs_size;
    assert!(
        !message.contains(&size.to_string()) && !message.contains(&(size + 4096).to_string()),
        "the refusal says no size: {message}"
    );
    assert!(!hypervisor_running_for("grown"), "a VM process was started");
    assert!(vms_on_disk(&state).is_empty(), "{:?}", vms_on_disk(&state));
}

#[test]
fn a_vm_has_no_network_or_shared_host_path_and_its_control_secret_stays_out_of_the_workspace() {
    let test =
        "a_vm_has_no_network_or_shared_host_path_and_its_control_secret_stays_out_of_the_workspace";
    if !can_boot_vms(test) || !can_use_vsock(test) {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    // Pinned to the image's own root hash: it boots.
    let real = artifacts().manifest.verity.root_hash.clone();
    let l = Launcher::start_with(&state, &[("CLAWOS_AGENT_ROOTHASH", real.as_str())])
        .expect("launcher");
    let vm = runtime()
        .block_on(l.client().start(&start_req("iso", None)))
        .expect("the pinned image boots");
    assert_eq!(vm.root_hash, real);
    l.wait_for("iso", BOOT, is(VmState::Running))
        .expect("running");

    // The hypervisor's command line, from the host.
    let pids = l.hypervisor_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let raw = std::fs::read(format!("/proc/{}/cmdline", pids[0])).expect("QEMU's cmdline");
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let cmdline = args.join(" ");
    assert!(
        args.iter().any(|a| a.contains("clawos-iso,")),
        "not the VM's hypervisor: {cmdline}"
    );
    for flag in ["-netdev", "-nic", "-net", "-virtfs", "-fsdev"] {
        assert!(
            !args.iter().any(|a| a == flag),
            "the hypervisor has {flag}: {cmdline}"
        );
    }
    for (i, a) in args.iter().enumerate() {
        if a == "-device" {
            let dev = args.get(i + 1).map(String::as_str).unwrap_or_default();
            for bad in [
                "virtio-net",
                "e1000",
                "rtl8139",
                "virtio-9p",
                "vhost-user-fs",
                "vhost-net",
            ] {
                assert!(
                    !dev.starts_with(bad),
                    "the hypervisor has -device {dev}: {cmdline}"
                );
            }
        }
    }
    // Without it QEMU adds its default devices, a network card among them.
    assert!(args.iter().any(|a| a == "-nodefaults"), "{cmdline}");

    // Inside the guest.
    let exec = |script: &str| {
        let o = l.clawos(&["vm", "exec", "iso", "--", "sh", "-c", script]);
        assert!(o.status.success(), "{script}: {}", show(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let nets = exec("ls /sys/class/net");
    assert_eq!(
        nets.split_whitespace().collect::<Vec<_>>(),
        ["lo"],
        "network interfaces in the guest"
    );
    // Whether or not the guest kernel has a driver for it: no virtio network (id 1),
    // 9p (9) or file-system (26) device on the virtio bus, no PCI network controller
    // (class 0x02).
    let devices = exec(
        "for d in /sys/bus/virtio/devices/*/device /sys/bus/pci/devices/*/class; do \
         [ -e \"$d\" ] && echo \"$d $(cat \"$d\")\"; done; true",
    );
    assert!(
        devices.contains("/sys/bus/virtio/devices/"),
        "no virtio device seen at all (the disks are virtio): {devices}"
    );
    for line in devices.lines() {
        let value = line.rsplit(' ').next().unwrap_or_default();
        let bad = if line.starts_with("/sys/bus/virtio/") {
            matches!(value, "0x0001" | "0x0009" | "0x001a")
        } else {
            value.starts_with("0x02")
        };
        assert!(!bad, "a network or shared file-system device: {line}");
    }
    let mounts = exec("cat /proc/mounts");
    for line in mounts.lines() {
        let fstype = line.split_whitespace().nth(2).unwrap_or_default();
        assert!(
            !matches!(
                fstype,
                "9p" | "virtiofs" | "nfs" | "nfs4" | "cifs" | "fuse.sshfs"
            ),
            "a host path is shared into the guest: {line}"
        );
    }
    assert!(mounts.contains(" /workspace ext4 "), "{mounts}");

    // The control secret: where the guest agent reads it, and nowhere in the workspace.
    let secret = std::fs::read_to_string(state.join("vms/iso/control.secret"))
        .expect("the host's copy")
        .trim()
        .to_owned();
    assert_eq!(secret.len(), 64, "a 32-byte hex secret");
    assert_eq!(
        exec("stat -c '%u %g %a %F' /run/clawos/control.secret").trim(),
        "0 0 600 regular file"
    );
    let host_sum = {
        let o = std::process::Command::new("sh")
            .arg("-c")
            .arg("printf %s \"$S\" | sha256sum")
            .env("S", &secret)
            .output()
            .expect("sha256sum");
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let guest_sum = exec("tr -d '\\n' </run/clawos/control.secret | sha256sum");
    assert_eq!(
        guest_sum.split_whitespace().next(),
        Some(host_sum.as_str()),
        "the guest's secret is this boot's"
    );
    let env = exec("cat /workspace/.env");
    assert!(
        env.contains("CLAWOS_AGENT_NAME=iso"),
        "the config disk's environment arrived: {env}"
    );
    assert!(
        !env.contains(&secret),
        "/workspace/.env holds the control secret"
    );
    assert!(!env.contains("CLAWOS_CONTROL_SECRET"), "{env}");
    let holding = exec(&format!(
        "find /workspace -type f -exec grep -lF {secret} {{}} + ; echo scanned"
    ));
    assert_eq!(
        holding, "scanned\n",
        "files under /workspace hold the secret"
    );

    // The workspace disk itself, from the host, once the guest has shut down cleanly.
    let o = l.clawos(&["vm", "stop", "iso"]);
    assert!(o.status.success(), "{}", show(&o));
    let ws = state.join("vms/iso/workspace.img");
    assert!(ws.is_file(), "{}", ws.display());
    let found = std::process::Command::new("grep")
        .args(["-qaF", &secret])
        .arg(&ws)
        .status()
        .expect("grep");
    assert_eq!(
        found.code(),
        Some(1),
        "the control secret is on the workspace disk (or grep failed)"
    );
}
