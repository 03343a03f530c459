//! Set-up shared by the launcher's tests on the fake hypervisor.

use std::path::Path;

use clawos_vm_launcher::RawConfig;
use clawos_vm_launcher::host::ProcessId;
use clawos_vm_launcher::store::VmDir;

/// A signed image bundle of small files: verification is real, nothing boots it.
/// Returns its public key (hex).
pub fn signed_bundle(dir: &Path) -> String {
    signed_bundle_with(dir, None)
}

/// [`signed_bundle`] whose manifest names `agent_runtime` (its memory and readiness
/// needs).
pub fn signed_bundle_with(
    dir: &Path,
    agent_runtime: Option<clawos_image::manifest::AgentRuntime>,
) -> String {
    let key = clawos_image::fixture::small_signed_bundle_with(
        dir,
        &dir.join("signing.key"),
        agent_runtime,
    )
    .expect("fixture bundle");
    clawos_image::keys::public_hex(&key)
}

/// Settings for a launcher over `state` whose VMs boot `image` on the fake hypervisor
/// (the QEMU binary is never run).
pub fn raw_config(state: &Path, image: &Path, pubkey: &str, boot_timeout_secs: u64) -> RawConfig {
    RawConfig {
        addr: "127.0.0.1:0".into(),
        state_dir: state.to_owned(),
        image_dir: Some(image.to_owned()),
        public_key: Some(pubkey.to_owned()),
        inference_proxy_url: "http://127.0.0.1:9".into(),
        backend: "qemu".into(),
        qemu_bin: "/bin/sh".into(),
        firecracker_bin: "firecracker-absent".into(),
        vhost_vsock_bin: "vhost-device-vsock-absent".into(),
        stop_timeout_secs: 1,
        boot_timeout_secs,
        ..RawConfig::default()
    }
}

/// Kills every fake VM left running under `state` (a test's end, also a failed one).
pub fn kill_fake_vms(state: &Path) {
    for e in std::fs::read_dir(state.join("vms"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let dir = VmDir { root: e.path() };
        if let Some(p) = dir.read_pid().filter(ProcessId::is_alive) {
            p.signal(libc::SIGKILL);
        }
    }
}
