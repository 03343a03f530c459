//! QEMU backend. Hardware KVM when the CPU has it, TCG (software emulation) otherwise,
//! with the timer setting a guest needs under TCG.
//!
//! VMs boot the `microvm` machine, or — when started snapshot-capable — the `pc`
//! machine with qboot firmware. The reason is the vsock device: QEMU refuses to
//! migrate (save) a VM with `vhost-user-vsock` ("non-migratable device"), and microvm's
//! virtio-mmio devices cannot be unplugged. On `pc` the launcher hot-unplugs the vsock
//! device (ACPI PCI hotplug, ~0.2 s), saves memory and device state with `migrate`,
//! then plugs a fresh device back in; a restore starts QEMU with `-incoming`, loads the
//! state and plugs the device in before the guest runs.
//!
//! Confinement ([`super::confine`]): QEMU runs `-sandbox on,obsolete=deny,spawn=deny,
//! resourcecontrol=deny` (seccomp) and, when the launcher is root, drops to the VM's own
//! uid with `-runas uid:gid` once its devices are set up, so it opens its files as root
//! first and can open nothing of the launcher's afterwards: whatever it needs later (a
//! migration stream, the re-plugged vsock device's socket) is handed to it as a
//! descriptor over QMP (`getfd`). The rootfs is never opened by path: QEMU gets the
//! descriptor the launcher checked (`-add-fd`, `/dev/fdset/N`); kernel and initramfs
//! are the launcher's verified copies in the VM directory. The vsock device process
//! runs as the same uid from exec, in `<vm>/vsock/` (owned by that uid, 0700). Both
//! join the VM's cgroup before exec.
//!
//! The vsock device process and plugging its device over QMP are in `qemu_vsock`;
//! saving, resuming after a save and restoring are in `qemu_snapshot`.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::{Child, Command};

use clawos_guest_protocol::disk;

use super::confine::{self, Cgroups, Limits};
use super::qemu_vsock::start_vsock_device;
use super::qmp::Qmp;
use super::{BackendError, BoxFuture, Hypervisor, LaunchSpec, Launched, log_file};
use crate::host::ProcessId;
use crate::store::VmDir;

/// QMP socket name inside the VM directory.
pub const QMP_SOCKET: &str = "qmp.sock";
/// vhost-user socket between QEMU and the vsock device process (in [`VSOCK_DIR`]).
pub const VHOST_USER_SOCKET: &str = "vhost-vsock.sock";
/// The VM directory's subdirectory for the vsock device's sockets, owned by the VM's
/// uid (0700): the only place the unprivileged device process can create them.
pub const VSOCK_DIR: &str = "vsock";
/// The `-add-fd` set the rootfs descriptor is in; the VM's own disks follow.
const ROOTFS_FDSET: u32 = 1;
/// seccomp filter: no obsolete system calls, no fork/exec (a migration stream is a
/// descriptor, not `exec:`), no scheduler or resource changes.
pub const SANDBOX: &str = "on,obsolete=deny,spawn=deny,resourcecontrol=deny";
/// QEMU id of the vsock device (the one that is unplugged around a save).
pub(super) const VSOCK_DEVICE_ID: &str = "vsock0";
/// PCI slots on the `pc` machine, fixed so that a restored VM's devices sit exactly
/// where the saved state expects them whatever was hot-plugged before.
const PCI_SLOT_RNG: u32 = 3;
const PCI_SLOT_FIRST_DISK: u32 = 4;
pub(super) const PCI_SLOT_VSOCK: u32 = 9;
/// The fast firmware for `pc` (Debian's qemu-system-x86 ships it); SeaBIOS otherwise.
pub const QBOOT_ROM: &str = "/usr/share/qemu/qboot.rom";
/// Longest wait for the guest to release the vsock device on unplug.
pub(super) const UNPLUG_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub bin: PathBuf,
    /// Use `-accel kvm` (hardware virtualization present).
    pub kvm: bool,
    /// Host TSC in kHz, for TCG guests.
    pub tsc_khz: Option<u64>,
    /// `vhost-device-vsock`, which gives QEMU Firecracker's hybrid vsock model. Without
    /// it VMs boot with no control channel.
    pub vhost_vsock: Option<PathBuf>,
    /// Its log level (`RUST_LOG` for it).
    pub vsock_device_log: &'static str,
    /// qboot firmware for snapshot-capable (`pc`) VMs, when installed.
    pub qboot: Option<PathBuf>,
}

/// What the vsock device of a command line looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VsockAt {
    /// Plugged at boot.
    Boot,
    /// Left out: a restore plugs it in after loading the saved state.
    Later,
}

/// The VM's own disks as descriptors the launcher opened, one `-add-fd` set per disk
/// holding a read-write and a read-only descriptor (the config disk: read-only only).
/// QEMU re-opens a disk read-only when a migration completes (`bdrv_inactivate`); once
/// it runs as the VM's uid it could not open the root-owned file again, but it can pick
/// the read-only descriptor from the set.
#[derive(Debug, Default)]
pub struct Disks {
    sets: Vec<(&'static str, u32, Vec<std::fs::File>)>,
}

impl Disks {
    /// Opens the disks of the VM in `dir`.
    pub fn open(dir: &VmDir) -> std::io::Result<Self> {
        let open = |p: PathBuf, rw: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(rw)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&p)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
        };
        let mut sets = Vec::new();
        for (i, (serial, path, writable)) in [
            (disk::RUNTIME, dir.runtime_disk(), true),
            (disk::WORKSPACE, dir.workspace_disk(), true),
            (disk::CONFIG, dir.config_disk(), false),
        ]
        .into_iter()
        .enumerate()
        {
            let mut fds = Vec::new();
            if writable {
                fds.push(open(path.clone(), true)?);
            }
            fds.push(open(path, false)?);
            sets.push((serial, ROOTFS_FDSET + 1 + i as u32, fds));
        }
        Ok(Self { sets })
    }

    fn fds(&self, serial: &str) -> Option<(u32, Vec<i32>)> {
        self.sets
            .iter()
            .find(|(s, _, _)| *s == serial)
            .map(|(_, set, fds)| (*set, fds.iter().map(AsRawFd::as_raw_fd).collect()))
    }

    /// Every descriptor, for the child to inherit.
    fn raw(&self) -> Vec<i32> {
        self.sets
            .iter()
            .flat_map(|(_, _, fds)| fds.iter().map(AsRawFd::as_raw_fd))
            .collect()
    }
}

impl Qemu {
    /// The full argument list for one VM (paths of per-VM files are relative to the VM
    /// directory, which is QEMU's working directory), running as `run_as` (uid = gid)
    /// once set up, when given.
    pub fn args(&self, spec: &LaunchSpec, run_as: Option<u32>, disks: &Disks) -> Vec<String> {
        self.args_with(spec, VsockAt::Boot, run_as, disks)
    }

    /// The argument list of a restore: no vsock device yet, and waiting for the saved
    /// state (`-incoming defer`).
    pub fn restore_args(
        &self,
        spec: &LaunchSpec,
        run_as: Option<u32>,
        disks: &Disks,
    ) -> Vec<String> {
        let mut a = self.args_with(spec, VsockAt::Later, run_as, disks);
        a.extend(["-incoming".into(), "defer".into()]);
        a
    }

    fn args_with(
        &self,
        spec: &LaunchSpec,
        vsock_at: VsockAt,
        run_as: Option<u32>,
        disks: &Disks,
    ) -> Vec<String> {
        let pc = spec.snapshots;
        let machine = if pc { "pc" } else { "microvm" };
        // PCI devices on `pc` at fixed slots; virtio-mmio ones on microvm.
        let device = |kind: &str, slot: u32| {
            if pc {
                format!("{kind}-pci,addr={slot:#x}")
            } else {
                format!("{kind}-device")
            }
        };
        let mut cmdline = String::from("console=ttyS0 ");
        if !self.kvm
            && let Some(khz) = self.tsc_khz
        {
            // Without it the microvm guest never gets a timer tick under TCG.
            cmdline.push_str(&format!("tsc_early_khz={khz} tsc=reliable "));
        }
        cmdline.push_str(&spec.image_cmdline);
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("clawos-{},process=clawos-{}", spec.name, spec.name),
            "-accel".into(),
            if self.kvm {
                "kvm".into()
            } else {
                // A bounded translation cache, so the VM's memory limit can hold it.
                format!("tcg,tb-size={}", confine::TCG_TB_MIB)
            },
            "-M".into(),
            if self.vhost_vsock.is_some() {
                // vhost-user needs guest RAM the device process can map.
                format!("{machine},memory-backend=ram")
            } else {
                machine.into()
            },
            "-m".into(),
            spec.mem_mib.to_string(),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-chardev".into(),
            // Appending: the launcher caps the log by truncating it while QEMU runs,
            // and QEMU's next write must land at the new end, not leave a hole.
            "file,id=console,path=console.log,append=on".into(),
            "-serial".into(),
            "chardev:console".into(),
            "-qmp".into(),
            format!("unix:{QMP_SOCKET},server=on,wait=off"),
            // A guest panic (fatal init error, verity corruption) exits QEMU with 1.
            "-device".into(),
            "pvpanic".into(),
            "-action".into(),
            "panic=exit-failure".into(),
            "-device".into(),
            device("virtio-rng", PCI_SLOT_RNG),
            "-kernel".into(),
            spec.kernel.display().to_string(),
            "-initrd".into(),
            spec.initramfs.display().to_string(),
            "-append".into(),
            cmdline,
        ];
        if self.kvm {
            a.extend(["-cpu".into(), "host".into()]);
        }
        match run_as {
            // `-runas` drops privileges after the sandbox is installed, so the filter
            // must let QEMU's own setuid/setgid through (elevateprivileges stays
            // allowed; once QEMU is the VM's uid without capabilities, set*id cannot
            // raise it again).
            Some(uid) => a.extend([
                "-sandbox".into(),
                SANDBOX.into(),
                "-runas".into(),
                format!("{uid}:{uid}"),
            ]),
            None => a.extend([
                "-sandbox".into(),
                format!("{SANDBOX},elevateprivileges=deny"),
            ]),
        }
        if pc && let Some(rom) = &self.qboot {
            a.extend(["-bios".into(), rom.display().to_string()]);
        }
        if self.vhost_vsock.is_some() {
            a.extend([
                "-object".into(),
                format!(
                    "memory-backend-memfd,id=ram,size={}M,share=on",
                    spec.mem_mib
                ),
            ]);
            if vsock_at == VsockAt::Boot {
                a.extend([
                    "-chardev".into(),
                    format!("socket,id=vsock,path={VSOCK_DIR}/{VHOST_USER_SOCKET}"),
                    "-device".into(),
                    format!(
                        "{},chardev=vsock,id={VSOCK_DEVICE_ID}",
                        device("vhost-user-vsock", PCI_SLOT_VSOCK)
                    ),
                ]);
            }
        }
        // The rootfs through the descriptor the launcher checked, never by path.
        let rootfs = match &spec.rootfs_fd {
            Some(f) => {
                a.extend([
                    "-add-fd".into(),
                    format!("fd={},set={ROOTFS_FDSET},opaque=rootfs", f.as_raw_fd()),
                ]);
                format!("/dev/fdset/{ROOTFS_FDSET}")
            }
            None => spec.rootfs.display().to_string(),
        };
        // The VM's own disks through descriptors too when given (see [`Disks`]).
        let mut own = |serial: &str, path: &str| match disks.fds(serial) {
            Some((set, fds)) => {
                for fd in fds {
                    a.extend([
                        "-add-fd".into(),
                        format!("fd={fd},set={set},opaque={serial}"),
                    ]);
                }
                format!("/dev/fdset/{set}")
            }
            None => path.to_owned(),
        };
        // Descriptors of one disk are different open file descriptions; QEMU's OFD image
        // locks would then conflict with each other when it switches between them
        // around a migration. The launcher already keeps each disk to one VM (per-VM
        // directory, one operation at a time), which is what the locks guard against.
        let locking = if disks.sets.is_empty() {
            ""
        } else {
            ",file.locking=off"
        };
        let drives = [
            (disk::ROOTFS, rootfs, true),
            (disk::RUNTIME, own(disk::RUNTIME, "runtime.img"), false),
            (
                disk::WORKSPACE,
                own(disk::WORKSPACE, "workspace.img"),
                false,
            ),
            (disk::CONFIG, own(disk::CONFIG, "config.img"), true),
        ];
        for (slot, (serial, file, ro)) in (PCI_SLOT_FIRST_DISK..).zip(drives) {
            // QEMU's option syntax escapes a comma by doubling it.
            let file = file.replace(',', ",,");
            let ro = if ro { ",readonly=on" } else { "" };
            let lock = if serial == disk::ROOTFS { "" } else { locking };
            a.push("-drive".into());
            a.push(format!(
                "id={serial},file={file},format=raw,if=none{ro}{lock}"
            ));
            a.push("-device".into());
            a.push(format!(
                "{},drive={serial},serial={serial}",
                device("virtio-blk", slot)
            ));
        }
        a
    }
}

impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> BoxFuture<'a, Result<Launched, BackendError>> {
        Box::pin(async move {
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
            let disks = match Disks::open(&spec.dir) {
                Ok(d) => d,
                Err(e) => {
                    for h in helpers {
                        h.signal(libc::SIGKILL);
                    }
                    self.cleanup(&spec.dir);
                    return Err(BackendError::Spawn {
                        bin: self.bin.clone(),
                        source: e,
                    });
                }
            };
            match self.spawn_qemu(spec, self.args(spec, jail.uid, &disks), &jail, &disks) {
                Ok(child) => Ok(Launched {
                    child,
                    vsock: !helpers.is_empty(),
                    helpers,
                    socket_dir: self.socket_dir(&spec.dir),
                }),
                Err(e) => {
                    for h in helpers {
                        h.signal(libc::SIGKILL);
                    }
                    self.cleanup(&spec.dir);
                    Err(e)
                }
            }
        })
    }

    fn request_stop<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let mut qmp = Qmp::connect(dir).await?;
            // ACPI power button: clawos-init powers off cleanly on it.
            qmp.execute("system_powerdown", None).await.map(drop)
        })
    }

    fn pause<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            Qmp::connect(dir)
                .await?
                .execute("stop", None)
                .await
                .map(drop)
        })
    }

    fn resume<'a>(&'a self, dir: &'a VmDir) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            Qmp::connect(dir)
                .await?
                .execute("cont", None)
                .await
                .map(drop)
        })
    }

    fn snapshot_unsupported(&self, snapshots: bool) -> Option<String> {
        (!snapshots).then(|| {
            "it was started without snapshot support: QEMU cannot save a microvm with a \
             vsock device; start it with --snapshots (the pc machine) to snapshot it"
                .into()
        })
    }

    fn save<'a>(
        &'a self,
        dir: &'a VmDir,
        snap: &'a str,
    ) -> BoxFuture<'a, Result<u64, BackendError>> {
        Box::pin(self.save_snapshot(dir, snap))
    }

    fn after_save<'a>(
        &'a self,
        dir: &'a VmDir,
        helpers: &'a [ProcessId],
        resume: bool,
    ) -> BoxFuture<'a, Result<Vec<ProcessId>, BackendError>> {
        Box::pin(self.after_snapshot(dir, helpers, resume))
    }

    fn restore<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        snap: &'a str,
    ) -> BoxFuture<'a, Result<Launched, BackendError>> {
        Box::pin(self.restore_snapshot(spec, snap))
    }

    /// Ends what is left in the VM's cgroup and removes it, gives its uid back, and
    /// removes its vsock directory and the boot's verified copies.
    fn cleanup(&self, dir: &VmDir) {
        Cgroups::host().remove(&confine::cgroup_name(&dir.root));
        confine::release_uid(&dir.root);
        let _ = std::fs::remove_dir_all(dir.root.join(VSOCK_DIR));
        let _ = std::fs::remove_dir_all(dir.boot());
    }
}

/// How one VM's processes are confined: its uid (when the launcher can drop to one)
/// and its cgroup (when the host has them).
#[derive(Debug)]
pub struct Jail {
    pub uid: Option<u32>,
    pub cgroup: Option<confine::VmCgroup>,
}

impl Jail {
    /// The running VM's: the uid its vsock directory belongs to, its existing cgroup.
    pub(super) fn existing(dir: &VmDir) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let uid = std::fs::metadata(dir.root.join(VSOCK_DIR))
            .map(|m| m.uid())
            .ok()
            .filter(|&u| u != 0 && confine::can_drop_privileges());
        let cgroup = Cgroups::host().open(&confine::cgroup_name(&dir.root))?;
        Ok(Self { uid, cgroup })
    }
}

impl Qemu {
    /// Where a VM's vsock sockets are (when it has the device).
    pub(super) fn socket_dir(&self, dir: &VmDir) -> Option<PathBuf> {
        self.vhost_vsock.as_ref().map(|_| dir.root.join(VSOCK_DIR))
    }

    /// The VM's uid and cgroup for a new boot, and its vsock directory owned by that
    /// uid. Failing to make the cgroup fails the start when the launcher is root (it
    /// could, so it must); otherwise the VM runs without one, as the log said once.
    pub(super) fn confine(&self, spec: &LaunchSpec) -> Result<Jail, BackendError> {
        let err = |what: &str, e: std::io::Error| BackendError::Control {
            backend: "qemu",
            detail: format!("confining VM {}: {what}: {e}", spec.name),
        };
        let root = confine::can_drop_privileges();
        let uid = if root {
            Some(confine::allocate_uid(&spec.dir.root).map_err(|e| err("uid", e))?)
        } else {
            None
        };
        let limits = Limits::for_vm(spec.mem_mib, spec.vcpus, self.kvm, &spec.dir.root);
        let cgroup = match Cgroups::host().create(&confine::cgroup_name(&spec.dir.root), &limits) {
            Ok(c) => c,
            Err(e) if root => {
                confine::release_uid(&spec.dir.root);
                return Err(err("cgroup", e));
            }
            Err(e) => {
                tracing::warn!(vm = %spec.name, error = %e, "VM runs without a cgroup of its own");
                None
            }
        };
        if self.vhost_vsock.is_some() {
            let d = spec.dir.root.join(VSOCK_DIR);
            let _ = std::fs::remove_dir_all(&d);
            let made = std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&d)
                .and_then(|()| match uid {
                    Some(u) => std::os::unix::fs::chown(&d, Some(u), Some(u)),
                    None => Ok(()),
                });
            if let Err(e) = made {
                self.cleanup(&spec.dir);
                return Err(err("vsock directory", e));
            }
        }
        Ok(Jail { uid, cgroup })
    }
}

impl Qemu {
    pub(super) fn spawn_qemu(
        &self,
        spec: &LaunchSpec,
        args: Vec<String>,
        jail: &Jail,
        disks: &Disks,
    ) -> Result<Child, BackendError> {
        let log = log_file(&spec.dir.hypervisor_log())?;
        let log2 = log.try_clone().map_err(|source| BackendError::Spawn {
            bin: self.bin.clone(),
            source,
        })?;
        let _ = std::fs::remove_file(spec.dir.root.join(QMP_SOCKET));
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .current_dir(&spec.dir.root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Own process group: a Ctrl-C to the launcher's terminal, or the launcher
            // dying, does not take the VM down.
            .process_group(0);
        let cgroup_fds = jail
            .cgroup
            .as_ref()
            .map(confine::VmCgroup::fds)
            .unwrap_or_default();
        // The descriptors `-add-fd` names: inherited by QEMU alone (they stay
        // close-on-exec in the launcher, so no other child gets them).
        let mut keep = disks.raw();
        keep.extend(spec.rootfs_fd.as_ref().map(|f| f.as_raw_fd()));
        // SAFETY: the closure runs between fork and exec and only makes raw system calls
        // (write, fcntl) on descriptors prepared before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                confine::join_before_exec(&cgroup_fds)?;
                for &fd in &keep {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd.spawn().map_err(|source| BackendError::Spawn {
            bin: self.bin.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests;
