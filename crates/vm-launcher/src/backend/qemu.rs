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

use std::path::PathBuf;
use std::process::Stdio;

use serde_json::json;
use tokio::process::{Child, Command};

use clawos_guest_protocol::disk;

use super::qmp::{Qmp, qmp_err};
use super::{
    BackendError, BoxFuture, GUEST_CID, Hypervisor, LaunchSpec, Launched, VSOCK_SOCKET, log_file,
    wait_for_socket,
};
use crate::host::ProcessId;
use crate::store::VmDir;

/// QMP socket name inside the VM directory.
pub const QMP_SOCKET: &str = "qmp.sock";
/// vhost-user socket between QEMU and the vsock device process.
pub const VHOST_USER_SOCKET: &str = "vhost-vsock.sock";
/// QEMU id of the vsock device (the one that is unplugged around a save).
const VSOCK_DEVICE_ID: &str = "vsock0";
/// PCI slots on the `pc` machine, fixed so that a restored VM's devices sit exactly
/// where the saved state expects them whatever was hot-plugged before.
const PCI_SLOT_RNG: u32 = 3;
const PCI_SLOT_FIRST_DISK: u32 = 4;
const PCI_SLOT_VSOCK: u32 = 9;
/// The fast firmware for `pc` (Debian's qemu-system-x86 ships it); SeaBIOS otherwise.
pub const QBOOT_ROM: &str = "/usr/share/qemu/qboot.rom";
/// Longest wait for the guest to release the vsock device on unplug.
const UNPLUG_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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

impl Qemu {
    /// The full argument list for one VM (paths of per-VM files are relative to the VM
    /// directory, which is QEMU's working directory).
    pub fn args(&self, spec: &LaunchSpec) -> Vec<String> {
        self.args_with(spec, VsockAt::Boot)
    }

    /// The argument list of a restore: no vsock device yet, and waiting for the saved
    /// state (`-incoming defer`).
    pub fn restore_args(&self, spec: &LaunchSpec) -> Vec<String> {
        let mut a = self.args_with(spec, VsockAt::Later);
        a.extend(["-incoming".into(), "defer".into()]);
        a
    }

    fn args_with(&self, spec: &LaunchSpec, vsock_at: VsockAt) -> Vec<String> {
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
            if self.kvm { "kvm" } else { "tcg" }.into(),
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
            "file,id=console,path=console.log".into(),
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
                    format!("socket,id=vsock,path={VHOST_USER_SOCKET}"),
                    "-device".into(),
                    format!(
                        "{},chardev=vsock,id={VSOCK_DEVICE_ID}",
                        device("vhost-user-vsock", PCI_SLOT_VSOCK)
                    ),
                ]);
            }
        }
        let disks = [
            (disk::ROOTFS, spec.rootfs.display().to_string(), true),
            (disk::RUNTIME, "runtime.img".to_owned(), false),
            (disk::WORKSPACE, "workspace.img".to_owned(), false),
            (disk::CONFIG, "config.img".to_owned(), true),
        ];
        for (slot, (serial, file, ro)) in (PCI_SLOT_FIRST_DISK..).zip(disks) {
            // QEMU's option syntax escapes a comma by doubling it.
            let file = file.replace(',', ",,");
            let ro = if ro { ",readonly=on" } else { "" };
            a.push("-drive".into());
            a.push(format!("id={serial},file={file},format=raw,if=none{ro}"));
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
            let mut helpers = Vec::new();
            if let Some(bin) = &self.vhost_vsock {
                helpers.push(start_vsock_device(bin, &spec.dir).await?);
            }
            match self.spawn_qemu(spec, self.args(spec)) {
                Ok(child) => Ok(Launched {
                    child,
                    vsock: !helpers.is_empty(),
                    helpers,
                    socket_dir: None,
                }),
                Err(e) => {
                    for h in helpers {
                        h.signal(libc::SIGKILL);
                    }
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
        Box::pin(async move {
            let mut qmp = Qmp::connect(dir).await?;
            if self.vhost_vsock.is_some() {
                qmp.execute("device_del", Some(json!({ "id": VSOCK_DEVICE_ID })))
                    .await?;
                qmp.wait_event("DEVICE_DELETED", Some(VSOCK_DEVICE_ID), UNPLUG_TIMEOUT)
                    .await?;
            }
            qmp.execute("stop", None).await?;
            // The stream goes to a temporary name and is renamed by the same shell once
            // `cat` has written all of it: the final name appearing means complete.
            let part = format!("{snap}/{}.part", crate::snapshot::QEMU_STATE);
            let done = format!("{snap}/{}", crate::snapshot::QEMU_STATE);
            qmp.execute(
                "migrate",
                Some(json!({ "uri": format!("exec:cat > {part} && mv {part} {done}") })),
            )
            .await?;
            qmp.wait_migration().await?;
            let path = dir.root.join(&done);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                if let Ok(m) = std::fs::metadata(&path) {
                    return Ok(m.len());
                }
                if std::time::Instant::now() > deadline {
                    return Err(qmp_err("the saved state file never appeared"));
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
    }

    fn after_save<'a>(
        &'a self,
        dir: &'a VmDir,
        helpers: &'a [ProcessId],
        resume: bool,
    ) -> BoxFuture<'a, Result<Vec<ProcessId>, BackendError>> {
        Box::pin(async move {
            let mut qmp = Qmp::connect(dir).await?;
            let mut new_helpers = helpers.to_vec();
            if let Some(bin) = &self.vhost_vsock {
                // vhost-device-vsock serves one vhost-user session: the unplugged device
                // ended it, so a fresh process backs the new device.
                for h in helpers {
                    end_process(*h).await;
                }
                let h = start_vsock_device(bin, dir).await?;
                new_helpers = vec![h];
                if let Err(e) = plug_vsock(&mut qmp).await {
                    h.signal(libc::SIGKILL);
                    return Err(e);
                }
            }
            if resume {
                qmp.execute("cont", None).await?;
            }
            Ok(new_helpers)
        })
    }

    fn restore<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        snap: &'a str,
    ) -> BoxFuture<'a, Result<Launched, BackendError>> {
        Box::pin(async move {
            let mut helpers = Vec::new();
            if let Some(bin) = &self.vhost_vsock {
                helpers.push(start_vsock_device(bin, &spec.dir).await?);
            }
            let mut child = match self.spawn_qemu(spec, self.restore_args(spec)) {
                Ok(c) => c,
                Err(e) => {
                    for h in &helpers {
                        h.signal(libc::SIGKILL);
                    }
                    return Err(e);
                }
            };
            let loaded = async {
                if !wait_for_socket(
                    &spec.dir.root.join(QMP_SOCKET),
                    std::time::Duration::from_secs(10),
                )
                .await
                {
                    return Err(qmp_err("QEMU did not open its QMP socket"));
                }
                let mut qmp = Qmp::connect(&spec.dir).await?;
                let state = format!("{snap}/{}", crate::snapshot::QEMU_STATE);
                qmp.execute(
                    "migrate-incoming",
                    Some(json!({ "uri": format!("exec:cat {state}") })),
                )
                .await?;
                qmp.wait_migration().await?;
                if self.vhost_vsock.is_some() {
                    plug_vsock(&mut qmp).await?;
                }
                qmp.execute("cont", None).await.map(drop)
            }
            .await;
            match loaded {
                Ok(()) => Ok(Launched {
                    child,
                    vsock: !helpers.is_empty(),
                    helpers,
                    socket_dir: None,
                }),
                Err(e) => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    for h in &helpers {
                        h.signal(libc::SIGKILL);
                    }
                    Err(e)
                }
            }
        })
    }
}

/// Plugs a vsock device backed by the (new) device process into a `pc` VM.
async fn plug_vsock(qmp: &mut Qmp) -> Result<(), BackendError> {
    // The chardev of the unplugged device is still there (it is not in a restored VM).
    let _ = qmp
        .execute("chardev-remove", Some(json!({ "id": "vsock" })))
        .await;
    qmp.execute(
        "chardev-add",
        Some(json!({
            "id": "vsock",
            "backend": { "type": "socket", "data": {
                "addr": { "type": "unix", "data": { "path": VHOST_USER_SOCKET } },
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
async fn end_process(p: ProcessId) {
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

/// Starts the per-VM `vhost-device-vsock` and waits for its vhost-user socket.
async fn start_vsock_device(bin: &std::path::Path, dir: &VmDir) -> Result<ProcessId, BackendError> {
    {
        let log = log_file(&dir.root.join("vsock-device.log"))?;
        let log2 = log.try_clone().map_err(|source| BackendError::Spawn {
            bin: bin.to_owned(),
            source,
        })?;
        for s in [VHOST_USER_SOCKET, VSOCK_SOCKET] {
            let _ = std::fs::remove_file(dir.root.join(s));
        }
        let child = Command::new(bin)
            .args([
                "--guest-cid",
                &GUEST_CID.to_string(),
                "--socket",
                VHOST_USER_SOCKET,
                "--uds-path",
                VSOCK_SOCKET,
            ])
            .current_dir(&dir.root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .map_err(|source| BackendError::Spawn {
                bin: bin.to_owned(),
                source,
            })?;
        let pid = child.id().unwrap_or(0);
        // The device outlives this handle (and the launcher): it is tracked by pid and
        // start time like the hypervisor.
        drop(child);
        let id = ProcessId::of(pid).ok_or_else(|| BackendError::Control {
            backend: "qemu",
            detail: "vhost-device-vsock exited at once (see vsock-device.log)".into(),
        })?;
        if !wait_for_socket(
            &dir.root.join(VHOST_USER_SOCKET),
            std::time::Duration::from_secs(5),
        )
        .await
        {
            id.signal(libc::SIGKILL);
            return Err(BackendError::Control {
                backend: "qemu",
                detail: "vhost-device-vsock did not create its socket (see vsock-device.log)"
                    .into(),
            });
        }
        Ok(id)
    }
}

impl Qemu {
    fn spawn_qemu(&self, spec: &LaunchSpec, args: Vec<String>) -> Result<Child, BackendError> {
        {
            let log = log_file(&spec.dir.hypervisor_log())?;
            let log2 = log.try_clone().map_err(|source| BackendError::Spawn {
                bin: self.bin.clone(),
                source,
            })?;
            let _ = std::fs::remove_file(spec.dir.root.join(QMP_SOCKET));
            Command::new(&self.bin)
                .args(args)
                .current_dir(&spec.dir.root)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                // Own process group: a Ctrl-C to the launcher's terminal, or the launcher
                // dying, does not take the VM down.
                .process_group(0)
                .spawn()
                .map_err(|source| BackendError::Spawn {
                    bin: self.bin.clone(),
                    source,
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LaunchSpec {
        LaunchSpec {
            name: "a1".into(),
            dir: VmDir {
                root: "/state/vms/a1".into(),
            },
            mem_mib: 512,
            vcpus: 2,
            kernel: "/img/vmlinuz".into(),
            vmlinux: None,
            initramfs: "/img/initramfs.cpio.gz".into(),
            rootfs: "/img,odd/rootfs.img".into(),
            image_cmdline: "panic=-1 clawos.root_hash=ab".into(),
            snapshots: false,
        }
    }

    #[test]
    fn tcg_args_carry_the_timer_and_readonly_rootfs() {
        let q = Qemu {
            bin: "qemu-system-x86_64".into(),
            kvm: false,
            tsc_khz: Some(2_596_146),
            vhost_vsock: Some("vhost-device-vsock".into()),
            qboot: None,
        };
        let a = q.args(&spec()).join(" ");
        assert!(a.contains("-accel tcg"), "{a}");
        assert!(a.contains("tsc_early_khz=2596146"), "{a}");
        assert!(
            a.contains(
                "console=ttyS0 tsc_early_khz=2596146 tsc=reliable panic=-1 clawos.root_hash=ab"
            ),
            "{a}"
        );
        assert!(
            a.contains("id=rootfs,file=/img,,odd/rootfs.img,format=raw,if=none,readonly=on"),
            "{a}"
        );
        assert!(
            a.contains("virtio-blk-device,drive=workspace,serial=workspace"),
            "{a}"
        );
        assert!(a.contains("-m 512 -smp 2"), "{a}");
        assert!(a.contains("-M microvm,memory-backend=ram"), "{a}");
        assert!(
            a.contains("memory-backend-memfd,id=ram,size=512M,share=on"),
            "{a}"
        );
        assert!(a.contains("vhost-user-vsock-device,chardev=vsock"), "{a}");
    }

    #[test]
    fn snapshot_capable_vms_use_pc_with_fixed_pci_slots_and_a_restorable_vsock() {
        let q = Qemu {
            bin: "qemu-system-x86_64".into(),
            kvm: false,
            tsc_khz: Some(1),
            vhost_vsock: Some("vhost-device-vsock".into()),
            qboot: Some(QBOOT_ROM.into()),
        };
        let mut s = spec();
        s.snapshots = true;
        let boot = q.args(&s).join(" ");
        assert!(boot.contains("-M pc,memory-backend=ram"), "{boot}");
        assert!(boot.contains(&format!("-bios {QBOOT_ROM}")), "{boot}");
        assert!(boot.contains("virtio-rng-pci,addr=0x3"), "{boot}");
        assert!(
            boot.contains("virtio-blk-pci,addr=0x4,drive=rootfs,serial=rootfs"),
            "{boot}"
        );
        assert!(
            boot.contains("virtio-blk-pci,addr=0x7,drive=config,serial=config"),
            "{boot}"
        );
        assert!(
            boot.contains("vhost-user-vsock-pci,addr=0x9,chardev=vsock,id=vsock0"),
            "{boot}"
        );
        assert!(!boot.contains("-device virtio-blk-device"), "{boot}");
        // A restore starts without the vsock device (it was unplugged when the state
        // was saved) and waits for the state; everything else is identical.
        let restore = q.restore_args(&s);
        let mut expected = q.args(&s);
        let at = expected
            .iter()
            .position(|a| a == "socket,id=vsock,path=vhost-vsock.sock");
        let at = at.expect("vsock chardev") - 1;
        expected.drain(at..at + 4);
        expected.extend(["-incoming".into(), "defer".into()]);
        assert_eq!(restore, expected);
    }

    #[test]
    fn kvm_args_skip_the_tcg_timer() {
        let q = Qemu {
            bin: "qemu-system-x86_64".into(),
            kvm: true,
            tsc_khz: Some(1),
            vhost_vsock: None,
            qboot: None,
        };
        let a = q.args(&spec()).join(" ");
        assert!(a.contains("-accel kvm") && a.contains("-cpu host"), "{a}");
        assert!(!a.contains("tsc_early_khz"), "{a}");
    }
}
