//! The per-VM `vhost-device-vsock` process of the QEMU backend: starting it confined
//! (the VM's uid, no capabilities, the VM's cgroup), ending it, and plugging a device
//! backed by it into a running `pc` VM over QMP.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Stdio;

use serde_json::json;
use tokio::process::Command;

use super::confine;
use super::qemu::{Jail, PCI_SLOT_VSOCK, VHOST_USER_SOCKET, VSOCK_DEVICE_ID, VSOCK_DIR};
use super::qmp::{Qmp, qmp_err};
use super::{BackendError, GUEST_CID, VSOCK_SOCKET, log_file, wait_for_socket};
use crate::host::ProcessId;
use crate::store::VmDir;

/// Plugs a vsock device backed by the (new) device process into a `pc` VM. QEMU runs
/// unprivileged by now and cannot reach the socket itself: the launcher connects and
/// hands QEMU the connected socket.
pub(super) async fn plug_vsock(qmp: &mut Qmp, dir: &VmDir) -> Result<(), BackendError> {
    // The chardev of the unplugged device is still there (it is not in a restored VM).
    let _ = qmp
        .execute("chardev-remove", Some(json!({ "id": "vsock" })))
        .await;
    let sock = super::connect_in_dir(&dir.root.join(VSOCK_DIR), VHOST_USER_SOCKET)
        .await
        .map_err(|e| qmp_err(format!("connecting to the vsock device: {e}")))?;
    qmp.pass_fd("vsock", &sock).await?;
    drop(sock);
    qmp.execute(
        "chardev-add",
        Some(json!({
            "id": "vsock",
            "backend": { "type": "socket", "data": {
                "addr": { "type": "fd", "data": { "str": "vsock" } },
                "server": false,
            }},
        })),
    )
    .await?;
    qmp.execute(
        "device_add",
        Some(json!({
            "driver": "vhost-user-vsock-pci",
            "chardev": "vsock",
            "id": VSOCK_DEVICE_ID,
            "addr": format!("{PCI_SLOT_VSOCK:#x}"),
        })),
    )
    .await
    .map(drop)
}

/// SIGTERM, then SIGKILL after a second; returns once the process is gone.
pub(super) async fn end_process(p: ProcessId) {
    p.signal(libc::SIGTERM);
    for i in 0..200 {
        if !p.is_alive() {
            return;
        }
        if i == 100 {
            p.signal(libc::SIGKILL);
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Whether anyone may execute `bin` by its path: every directory on the way searchable
/// by others and the file executable by others.
fn executable_by_others(bin: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(full) = std::fs::canonicalize(bin) else {
        return false;
    };
    let x = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0);
    x(&full) && full.ancestors().skip(1).all(x)
}

/// Starts the per-VM `vhost-device-vsock` in `<vm>/vsock/` — as the VM's uid, without
/// capabilities, in the VM's cgroup, logging at `log_level` — and waits for its
/// vhost-user socket.
pub(super) async fn start_vsock_device(
    bin: &Path,
    log_level: &str,
    dir: &VmDir,
    jail: &Jail,
) -> Result<ProcessId, BackendError> {
    let sockets = dir.root.join(VSOCK_DIR);
    let log = log_file(&dir.root.join("vsock-device.log"))?;
    let log2 = log.try_clone().map_err(|source| BackendError::Spawn {
        bin: bin.to_owned(),
        source,
    })?;
    for s in [VHOST_USER_SOCKET, VSOCK_SOCKET] {
        let _ = std::fs::remove_file(sockets.join(s));
    }
    // Executed through a descriptor opened as root: after the drop the VM's uid may not
    // be able to reach the binary's directory (e.g. ~/.cargo/bin under a 0700 home),
    // only to execute the file itself.
    let exe = std::fs::File::open(bin).map_err(|source| BackendError::Spawn {
        bin: bin.to_owned(),
        source,
    })?;
    let mut cmd = match jail.uid {
        Some(_) if !executable_by_others(bin) => {
            let mut c = Command::new(format!("/proc/self/fd/{}", exe.as_raw_fd()));
            c.arg0(bin.file_name().unwrap_or(bin.as_os_str()));
            c
        }
        _ => Command::new(bin),
    };
    cmd.args([
        "--guest-cid",
        &GUEST_CID.to_string(),
        "--socket",
        VHOST_USER_SOCKET,
        "--uds-path",
        VSOCK_SOCKET,
    ])
    // Entered as root, before the drop: the VM's uid cannot traverse the VM directory,
    // only work in this one.
    .current_dir(&sockets)
    // Its level, not the launcher's: at debug it writes a line per packet.
    .env("RUST_LOG", log_level)
    .stdin(Stdio::null())
    .stdout(log)
    .stderr(log2)
    .process_group(0);
    let cgroup_fds = jail
        .cgroup
        .as_ref()
        .map(confine::VmCgroup::fds)
        .unwrap_or_default();
    let uid = jail.uid;
    // SAFETY: the closure runs between fork and exec and only makes raw system calls
    // (write, setgroups, setgid, setuid) on descriptors and values prepared before the
    // fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            confine::join_before_exec(&cgroup_fds)?;
            if let Some(u) = uid {
                confine::drop_to_before_exec(u, u)?;
            }
            // Nothing it executes can gain privileges (no setuid binaries, no file
            // capabilities).
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| BackendError::Spawn {
        bin: bin.to_owned(),
        source,
    })?;
    drop(exe);
    let pid = child.id().unwrap_or(0);
    // The device outlives this handle (and the launcher): it is tracked by pid and
    // start time like the hypervisor.
    drop(child);
    let id = ProcessId::of(pid).ok_or_else(|| BackendError::Control {
        backend: "qemu",
        detail: "vhost-device-vsock exited at once (see vsock-device.log)".into(),
    })?;
    // The file, not a connection: the device takes its first connection for its
    // frontend, so it cannot be probed. Its file appears at `bind()`, microseconds
    // before `listen()` in the same call; QEMU (an exec later) or QMP's `chardev-add`
    // (a round trip later) connects long after that.
    if !wait_for_socket(
        &sockets.join(VHOST_USER_SOCKET),
        std::time::Duration::from_secs(5),
    )
    .await
    {
        id.signal(libc::SIGKILL);
        return Err(BackendError::Control {
            backend: "qemu",
            detail: "vhost-device-vsock did not create its socket (see vsock-device.log)".into(),
        });
    }
    Ok(id)
}
