//! QEMU snapshots of `pc` VMs: saving memory and device state (the vsock device
//! unplugged first, `migrate` into a descriptor the launcher opened), bringing the VM
//! back after a save (a fresh vsock device plugged in), and restoring a saved state
//! into a new QEMU (`-incoming`, the state loaded and the device plugged in before the
//! guest runs). [`super::qemu`] explains why the vsock device must go.

use std::os::unix::fs::OpenOptionsExt;

use serde_json::json;

use super::qemu::{Disks, Jail, Qemu, UNPLUG_TIMEOUT, VSOCK_DEVICE_ID};
use super::qemu_vsock::{end_process, plug_vsock, start_vsock_device};
use super::qmp::{Qmp, qmp_err};
use super::{BackendError, Hypervisor, LaunchSpec, Launched};
use crate::host::ProcessId;
use crate::store::VmDir;

impl Qemu {
    /// [`Hypervisor::save`]: unplugs the vsock device, stops the VM and migrates its
    /// state into `<snap>/` under a temporary name, renamed once complete. Returns the
    /// state's size.
    pub(super) async fn save_snapshot(&self, dir: &VmDir, snap: &str) -> Result<u64, BackendError> {
        let mut qmp = Qmp::connect(dir).await?;
        if self.vhost_vsock.is_some() {
            qmp.execute("device_del", Some(json!({ "id": VSOCK_DEVICE_ID })))
                .await?;
            qmp.wait_event("DEVICE_DELETED", Some(VSOCK_DEVICE_ID), UNPLUG_TIMEOUT)
                .await?;
        }
        qmp.execute("stop", None).await?;
        // The stream goes to a temporary name through a descriptor the launcher
        // opened (QEMU may neither spawn `cat` nor open files of the launcher's),
        // and is renamed once QEMU reports the migration complete: the final name
        // appearing means complete.
        let part = dir
            .root
            .join(snap)
            .join(format!("{}.part", crate::snapshot::QEMU_STATE));
        let done = dir.root.join(snap).join(crate::snapshot::QEMU_STATE);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&part)
            .map_err(|e| qmp_err(format!("{}: {e}", part.display())))?;
        qmp.pass_fd("migration", &file).await?;
        qmp.execute("migrate", Some(json!({ "uri": "fd:migration" })))
            .await?;
        qmp.wait_migration().await?;
        let size = file
            .sync_all()
            .and_then(|()| file.metadata())
            .map(|m| m.len())
            .map_err(|e| qmp_err(format!("{}: {e}", part.display())))?;
        drop(file);
        std::fs::rename(&part, &done).map_err(|e| qmp_err(format!("{}: {e}", done.display())))?;
        Ok(size)
    }

    /// [`Hypervisor::after_save`]: a fresh vsock device process and device for the
    /// saved VM, then `cont` when `resume`. Returns the VM's helper processes now.
    pub(super) async fn after_snapshot(
        &self,
        dir: &VmDir,
        helpers: &[ProcessId],
        resume: bool,
    ) -> Result<Vec<ProcessId>, BackendError> {
        let mut qmp = Qmp::connect(dir).await?;
        let mut new_helpers = helpers.to_vec();
        if let Some(bin) = &self.vhost_vsock {
            // vhost-device-vsock serves one vhost-user session: the unplugged device
            // ended it, so a fresh process backs the new device.
            for h in helpers {
                end_process(*h).await;
            }
            // The same uid and cgroup as the rest of the VM.
            let jail = Jail::existing(dir).map_err(|e| qmp_err(format!("VM cgroup: {e}")))?;
            let h = start_vsock_device(bin, self.vsock_device_log, dir, &jail).await?;
            new_helpers = vec![h];
            if let Err(e) = plug_vsock(&mut qmp, dir).await {
                h.signal(libc::SIGKILL);
                return Err(e);
            }
        }
        if resume {
            qmp.execute("cont", None).await?;
        }
        Ok(new_helpers)
    }

    /// [`Hypervisor::restore`]: starts QEMU waiting for state, loads `<snap>/`'s, plugs
    /// the vsock device in and lets the guest run.
    pub(super) async fn restore_snapshot(
        &self,
        spec: &LaunchSpec,
        snap: &str,
    ) -> Result<Launched, BackendError> {
        let jail = self.confine(spec)?;
        let mut helpers = Vec::new();
        if let Some(bin) = &self.vhost_vsock {
            match start_vsock_device(bin, self.vsock_device_log, &spec.dir, &jail).await {
                Ok(h) => helpers.push(h),
                Err(e) => {
                    self.cleanup(&spec.dir);
                    return Err(e);
                }
            }
        }
        let spawned = Disks::open(&spec.dir)
            .map_err(|e| BackendError::Spawn {
                bin: self.bin.clone(),
                source: e,
            })
            .and_then(|disks| {
                self.spawn_qemu(
                    spec,
                    self.restore_args(spec, jail.uid, &disks),
                    &jail,
                    &disks,
                )
            });
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                for h in &helpers {
                    h.signal(libc::SIGKILL);
                }
                self.cleanup(&spec.dir);
                return Err(e);
            }
        };
        let loaded = async {
            let mut qmp =
                Qmp::connect_new(&spec.dir, &mut child, std::time::Duration::from_secs(10)).await?;
            let state = spec.dir.root.join(snap).join(crate::snapshot::QEMU_STATE);
            let file = std::fs::File::open(&state)
                .map_err(|e| qmp_err(format!("{}: {e}", state.display())))?;
            qmp.pass_fd("migration", &file).await?;
            drop(file);
            qmp.execute("migrate-incoming", Some(json!({ "uri": "fd:migration" })))
                .await?;
            qmp.wait_migration().await?;
            if self.vhost_vsock.is_some() {
                plug_vsock(&mut qmp, &spec.dir).await?;
            }
            qmp.execute("cont", None).await.map(drop)
        }
        .await;
        match loaded {
            Ok(()) => Ok(Launched {
                child,
                vsock: !helpers.is_empty(),
                helpers,
                socket_dir: self.socket_dir(&spec.dir),
            }),
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                for h in &helpers {
                    h.signal(libc::SIGKILL);
                }
                self.cleanup(&spec.dir);
                Err(e)
            }
        }
    }
}
