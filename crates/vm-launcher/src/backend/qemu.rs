//! QEMU `microvm` backend. Hardware KVM when the CPU has it, TCG (software emulation)
//! otherwise, with the timer setting a microvm guest needs under TCG.

use std::path::PathBuf;
use std::process::Stdio;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use clawos_guest::disk;

use super::{
    BackendError, BoxFuture, GUEST_CID, Hypervisor, LaunchSpec, Launched, VSOCK_SOCKET,
    connect_in_dir, log_file, wait_for_socket,
};
use crate::host::ProcessId;
use crate::store::VmDir;

/// QMP socket name inside the VM directory.
pub const QMP_SOCKET: &str = "qmp.sock";
/// vhost-user socket between QEMU and the vsock device process.
pub const VHOST_USER_SOCKET: &str = "vhost-vsock.sock";

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
}

impl Qemu {
    /// The full argument list for one VM (paths of per-VM files are relative to the VM
    /// directory, which is QEMU's working directory).
    pub fn args(&self, spec: &LaunchSpec) -> Vec<String> {
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
                "microvm,memory-backend=ram".into()
            } else {
                "microvm".into()
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
            "virtio-rng-device".into(),
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
        if self.vhost_vsock.is_some() {
            a.extend([
                "-object".into(),
                format!(
                    "memory-backend-memfd,id=ram,size={}M,share=on",
                    spec.mem_mib
                ),
                "-chardev".into(),
                format!("socket,id=vsock,path={VHOST_USER_SOCKET}"),
                "-device".into(),
                "vhost-user-vsock-device,chardev=vsock".into(),
            ]);
        }
        let disks = [
            (disk::ROOTFS, spec.rootfs.display().to_string(), true),
            (disk::RUNTIME, "runtime.img".to_owned(), false),
            (disk::WORKSPACE, "workspace.img".to_owned(), false),
            (disk::CONFIG, "config.img".to_owned(), true),
        ];
        for (serial, file, ro) in disks {
            // QEMU's option syntax escapes a comma by doubling it.
            let file = file.replace(',', ",,");
            let ro = if ro { ",readonly=on" } else { "" };
            a.push("-drive".into());
            a.push(format!("id={serial},file={file},format=raw,if=none{ro}"));
            a.push("-device".into());
            a.push(format!("virtio-blk-device,drive={serial},serial={serial}"));
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
                helpers.push(self.start_vsock_device(bin, spec).await?);
            }
            match self.spawn_qemu(spec) {
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
}

impl Qemu {
    /// Starts the per-VM `vhost-device-vsock` and waits for its vhost-user socket.
    async fn start_vsock_device(
        &self,
        bin: &std::path::Path,
        spec: &LaunchSpec,
    ) -> Result<ProcessId, BackendError> {
        let log = log_file(&spec.dir.root.join("vsock-device.log"))?;
        let log2 = log.try_clone().map_err(|source| BackendError::Spawn {
            bin: bin.to_owned(),
            source,
        })?;
        for s in [VHOST_USER_SOCKET, VSOCK_SOCKET] {
            let _ = std::fs::remove_file(spec.dir.root.join(s));
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
            .current_dir(&spec.dir.root)
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
            &spec.dir.root.join(VHOST_USER_SOCKET),
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

    fn spawn_qemu(&self, spec: &LaunchSpec) -> Result<Child, BackendError> {
        {
            let log = log_file(&spec.dir.hypervisor_log())?;
            let log2 = log.try_clone().map_err(|source| BackendError::Spawn {
                bin: self.bin.clone(),
                source,
            })?;
            let _ = std::fs::remove_file(spec.dir.root.join(QMP_SOCKET));
            Command::new(&self.bin)
                .args(self.args(spec))
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

/// A minimal QMP client: greeting, capabilities, then one command at a time.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

fn qmp_err(detail: impl std::fmt::Display) -> BackendError {
    BackendError::Control {
        backend: "qemu",
        detail: format!("QMP: {detail}"),
    }
}

impl Qmp {
    /// Connects to a VM's QMP socket and negotiates capabilities.
    pub async fn connect(dir: &VmDir) -> Result<Self, BackendError> {
        let stream = connect_in_dir(&dir.root, QMP_SOCKET)
            .await
            .map_err(qmp_err)?;
        let (r, w) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = qmp.read().await?;
        if greeting.get("QMP").is_none() {
            return Err(qmp_err(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read(&mut self) -> Result<Value, BackendError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await.map_err(qmp_err)? == 0 {
            return Err(qmp_err("connection closed"));
        }
        serde_json::from_str(&line).map_err(qmp_err)
    }

    /// Runs one command and returns its `return` value (events in between are skipped).
    pub async fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, BackendError> {
        let mut req = json!({ "execute": cmd });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        let mut line = req.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(qmp_err)?;
        loop {
            let v = self.read().await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(qmp_err(format!("{cmd}: {e}")));
            }
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
        }
    }

    #[test]
    fn tcg_args_carry_the_timer_and_readonly_rootfs() {
        let q = Qemu {
            bin: "qemu-system-x86_64".into(),
            kvm: false,
            tsc_khz: Some(2_596_146),
            vhost_vsock: Some("vhost-device-vsock".into()),
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
    fn kvm_args_skip_the_tcg_timer() {
        let q = Qemu {
            bin: "qemu-system-x86_64".into(),
            kvm: true,
            tsc_khz: Some(1),
            vhost_vsock: None,
        };
        let a = q.args(&spec()).join(" ");
        assert!(a.contains("-accel kvm") && a.contains("-cpu host"), "{a}");
        assert!(!a.contains("tsc_early_khz"), "{a}");
    }
}
