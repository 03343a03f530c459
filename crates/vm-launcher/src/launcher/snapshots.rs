//! Snapshot and restore: a running or paused VM's memory, devices and disks saved
//! under a tag, and a stopped VM booted from one.

use std::time::{Duration, Instant};

use clawos_vm_launcher_api::{Snapshot, Vm, VmState};

use super::{Launcher, launch_spec, now_unix};
use crate::names::{SnapshotTag, VmName};
use crate::snapshot;
use crate::state::Event;
use crate::supervisor::wait_healthy;
use crate::vsock::GuestClient;
use crate::{LauncherError, relays, store};

impl Launcher {
    /// Saves a running or paused VM: memory and device state, and copies of the disks
    /// that state goes with. The guest is frozen meanwhile (reported `paused`) and
    /// returns to its previous state afterwards.
    pub async fn snapshot(&self, name: &str, tag: Option<&str>) -> Result<Snapshot, LauncherError> {
        let name = VmName::parse(name)?;
        let tag = match tag {
            Some(t) => SnapshotTag::parse(t)?,
            None => SnapshotTag::parse(&format!("snap-{}", now_unix()))?,
        };
        let _claim = self.registry().claim(&name)?;
        let record = self.record(&name)?;
        if !matches!(record.state, VmState::Running | VmState::Paused) {
            return Err(LauncherError::Conflict(format!(
                "cannot snapshot VM {name}: it is {}; only a running or paused VM can be saved",
                record.state
            )));
        }
        let backend = &self.shared.backend;
        if let Some(why) = backend.snapshot_unsupported(record.snapshots) {
            return Err(LauncherError::Conflict(format!(
                "cannot snapshot VM {name}: {why}"
            )));
        }
        let dir = self.registry().dir(&name);
        let kept = snapshot::list(&dir).len();
        if kept >= self.shared.cfg.max_snapshots_per_vm {
            return Err(LauncherError::Conflict(format!(
                "VM {name} keeps {kept} snapshots, the most it may; delete one first"
            )));
        }
        if snapshot::SnapshotDir::new(&dir, &tag).root.exists() {
            return Err(LauncherError::Conflict(format!(
                "VM {name} already has a snapshot tagged {tag}"
            )));
        }
        let staging = snapshot::begin(&dir, &tag)?;
        let was_paused = record.state == VmState::Paused;
        self.transition(&name, Event::SnapshotBegun)?;
        let frozen = Instant::now();
        let saved = async {
            let state_bytes = backend
                .save(&dir, &staging.relative)
                .await
                .map_err(|e| LauncherError::Internal(format!("saving VM {name}: {e}")))?;
            let (d, s) = (dir.clone(), staging.clone());
            let disk_bytes = tokio::task::spawn_blocking(move || snapshot::copy_disks_in(&d, &s))
                .await
                .map_err(|e| LauncherError::Internal(format!("disk copy task: {e}")))??;
            Ok::<_, LauncherError>((state_bytes, disk_bytes))
        }
        .await;
        // Whatever happened, bring the VM back.
        let back = backend.after_save(&dir, &record.helpers, !was_paused).await;
        let save_ms = frozen.elapsed().as_millis() as u64;
        if back.is_ok() && !was_paused && record.vsock {
            // The guest takes a moment to probe the re-plugged vsock device; answer
            // only once the control channel works again, so the next exec does not
            // race it.
            let guest = GuestClient {
                dir: record
                    .socket_dir
                    .clone()
                    .unwrap_or_else(|| dir.root.clone()),
                secret: dir.read_secret().unwrap_or_default(),
            };
            if !wait_healthy(&guest, Duration::from_secs(15)).await {
                tracing::warn!(vm = %name, "guest agent not answering after the snapshot");
            }
        }
        match &back {
            Ok(helpers) => {
                let _ = self.registry().apply(
                    &name,
                    Event::SnapshotEnded {
                        resume: !was_paused,
                    },
                    |r| r.helpers = helpers.clone(),
                );
                // The re-plugged vsock device has a new process: audit it too.
                if let Some(r) = self.registry().get(&name) {
                    relays::register_with_monitor(&self.shared.cfg, &r);
                }
            }
            Err(e) => {
                tracing::error!(vm = %name, error = %e, "VM could not be resumed after a snapshot");
            }
        }
        let result = match (saved, back) {
            (Ok((state_bytes, disk_bytes)), Ok(_)) => {
                let rec = Snapshot {
                    tag: tag.to_string(),
                    vm: name.to_string(),
                    created_at: now_unix(),
                    backend: backend.name().to_owned(),
                    mem_mib: record.mem_mib,
                    vcpus: record.vcpus,
                    root_hash: record.root_hash.clone(),
                    state_bytes,
                    disk_bytes,
                    save_ms,
                };
                snapshot::commit(&dir, &staging, &rec, &self.shared.snapshot_key).map(|_| rec)
            }
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(LauncherError::Internal(format!(
                "VM {name} was saved but could not be resumed ({e}); it stays paused"
            ))),
        };
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&staging.root);
        }
        let rec = result?;
        tracing::info!(vm = %name, tag = %rec.tag, save_ms, state_bytes = rec.state_bytes, disk_bytes = rec.disk_bytes, "snapshot taken");
        Ok(rec)
    }

    /// A VM's snapshots, oldest first.
    pub fn snapshots(&self, name: &str) -> Result<Vec<Snapshot>, LauncherError> {
        let name = VmName::parse(name)?;
        self.record(&name)?;
        Ok(snapshot::list(&self.registry().dir(&name)))
    }

    /// Deletes one snapshot.
    pub fn delete_snapshot(&self, name: &str, tag: &str) -> Result<(), LauncherError> {
        let name = VmName::parse(name)?;
        self.record(&name)?;
        let tag = SnapshotTag::parse(tag)?;
        let _claim = self.registry().claim(&name)?;
        let dir = self.registry().dir(&name);
        if !snapshot::SnapshotDir::new(&dir, &tag).record().exists() {
            return Err(LauncherError::NotFound(format!(
                "VM {name} has no snapshot tagged {tag}"
            )));
        }
        snapshot::remove(&dir, &tag)?;
        tracing::info!(vm = %name, %tag, "snapshot deleted");
        Ok(())
    }

    /// Boots a stopped VM from one of its snapshots: the disks return to the
    /// snapshot's copies, then the saved memory and devices are loaded and run.
    pub async fn restore(&self, name: &str, tag: &str) -> Result<Vm, LauncherError> {
        let name = VmName::parse(name)?;
        let tag = SnapshotTag::parse(tag)?;
        let _claim = self.registry().claim(&name)?;
        let record = self.inactive_record(&name, "restore")?;
        let dir = self.registry().dir(&name);
        let snap = snapshot::SnapshotDir::new(&dir, &tag);
        let meta = snap.load().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                LauncherError::NotFound(format!("VM {name} has no snapshot tagged {tag}"))
            }
            _ => LauncherError::io(&snap.record(), e),
        })?;
        let (root, key) = (snap.root.clone(), self.shared.snapshot_key.clone());
        let sealed = tokio::task::spawn_blocking(move || snapshot::check_seal(&root, &key))
            .await
            .map_err(|e| LauncherError::Internal(format!("seal check task: {e}")))?
            .map_err(|e| LauncherError::io(&snap.root, e))?;
        if !sealed {
            tracing::warn!(vm = %name, %tag, "snapshot files changed since it was taken; restore refused");
            return Err(LauncherError::Conflict(format!(
                "snapshot {tag} of VM {name} was changed since it was taken (its seal does not match); it will not be restored"
            )));
        }
        let backend = &self.shared.backend;
        if meta.backend != backend.name() {
            return Err(LauncherError::Conflict(format!(
                "snapshot {tag} was taken on {}, this launcher runs {}",
                meta.backend,
                backend.name()
            )));
        }
        // The image is verified again, by the name the VM was started with.
        let image_name = super::images::parse_name(Some(&record.image)).map_err(|_| {
            LauncherError::Conflict(format!(
                "VM {name} was started from an image given by path, which is no longer \
                 accepted; images are chosen by name (clawos image add NAME DIR)"
            ))
        })?;
        let image = self.verify_image(&image_name).await?;
        if image.manifest().verity.root_hash != meta.root_hash {
            return Err(LauncherError::Conflict(format!(
                "snapshot {tag} was taken on image root hash {}, but image {image_name} now \
                 has {}; the saved memory only runs on the image it was taken on",
                meta.root_hash,
                image.manifest().verity.root_hash
            )));
        }
        let runtime = image.manifest().agent_runtime.clone();
        let (d, s) = (dir.clone(), snap.clone());
        tokio::task::spawn_blocking(move || snapshot::copy_disks_out(&d, &s))
            .await
            .map_err(|e| LauncherError::Internal(format!("disk copy task: {e}")))??;
        store::rotate_console(&dir)?;
        let started = Instant::now();
        let files = self.stage_boot(&dir, image).await?;
        let spec = launch_spec(
            &name,
            &dir,
            meta.mem_mib,
            meta.vcpus,
            &files,
            record.snapshots,
        );
        let launched = backend
            .restore(&spec, &snap.relative)
            .await
            .map_err(|e| LauncherError::Internal(format!("restoring VM {name}: {e}")))?;
        tracing::info!(vm = %name, %tag, ms = started.elapsed().as_millis() as u64, "state loaded");
        let mut rec = record.clone();
        rec.mem_mib = meta.mem_mib;
        rec.vcpus = meta.vcpus;
        rec.process = None;
        rec.set_agent_runtime(runtime.as_ref());
        self.track(&name, rec, launched, started)
    }
}
