//! Per-VM state on disk: `<state>/vms/<name>/` holds `vm.json` (the record),
//! `hypervisor.pid` (pid + start time), `console.log`, `hypervisor.log`, the VM's own
//! `runtime.img` and `workspace.img`, `config.img` (the agent's environment), and
//! `boot/` (0700): this boot's verified copies of the image's kernel and initramfs.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use clawos_vm_launcher_api::{Vm, VmState};

use crate::LauncherError;
use crate::host::ProcessId;
use crate::names::VmName;

/// What the launcher persists about a VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmRecord {
    pub name: String,
    pub model: Option<String>,
    pub mem_mib: u32,
    pub vcpus: u32,
    pub image: String,
    pub root_hash: String,
    pub backend: String,
    pub state: VmState,
    pub reason: Option<String>,
    pub boot_ms: Option<u64>,
    pub started_at: Option<u64>,
    pub process: Option<ProcessId>,
    /// Helper processes that live and die with the VM (the vsock device).
    #[serde(default)]
    pub helpers: Vec<ProcessId>,
    /// Whether the VM has the vsock control channel.
    #[serde(default)]
    pub vsock: bool,
    /// Where the VM's sockets live if not in its directory (jailed Firecracker).
    #[serde(default)]
    pub socket_dir: Option<PathBuf>,
    /// Started snapshot-capable (QEMU: `pc` machine with a hot-pluggable vsock).
    #[serde(default)]
    pub snapshots: bool,
    /// The idempotency key of the start that booted it last (a start with the same key
    /// answers the VM as it is instead of booting it again).
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Total LLM tokens its agent may spend: the `clawos.budget.total` scope of every
    /// agent token the launcher holds for it.
    #[serde(default)]
    pub token_budget: Option<u64>,
    /// The agent runtime its image names (`openclaw`), when the image's manifest names
    /// one; `None`: the built-in runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_runtime: Option<String>,
    /// How long that runtime may take to answer after boot (the image's
    /// `ready_timeout_secs`): the boot deadline grows to fit it
    /// ([`crate::supervisor::boot_deadline`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_secs: Option<u64>,
}

impl VmRecord {
    /// The API view.
    pub fn view(&self) -> Vm {
        Vm {
            name: self.name.clone(),
            state: self.state,
            reason: self.reason.clone(),
            model: self.model.clone(),
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            image: self.image.clone(),
            root_hash: self.root_hash.clone(),
            backend: self.backend.clone(),
            pid: self
                .process
                .filter(|_| self.state.is_active())
                .map(|p| p.pid),
            boot_ms: self.boot_ms,
            started_at: self.started_at,
            snapshots: self.snapshots,
            idempotency_key: self.idempotency_key.clone(),
            token_budget: self.token_budget,
            agent_runtime: self.agent_runtime.clone(),
        }
    }

    /// Records what the launcher needs of the image's agent runtime (its name for the
    /// view, its readiness timeout for the boot deadline).
    pub fn set_agent_runtime(&mut self, runtime: Option<&clawos_image::manifest::AgentRuntime>) {
        self.agent_runtime = runtime.map(|r| r.name.clone());
        self.ready_timeout_secs = runtime.map(|r| r.ready_timeout_secs);
    }
}

/// Paths of one VM's directory.
#[derive(Debug, Clone)]
pub struct VmDir {
    pub root: PathBuf,
}

impl VmDir {
    pub fn new(vms: &Path, name: &VmName) -> Self {
        Self {
            root: vms.join(name),
        }
    }
    pub fn record(&self) -> PathBuf {
        self.root.join("vm.json")
    }
    pub fn pid(&self) -> PathBuf {
        self.root.join("hypervisor.pid")
    }
    pub fn console(&self) -> PathBuf {
        self.root.join("console.log")
    }
    pub fn hypervisor_log(&self) -> PathBuf {
        self.root.join("hypervisor.log")
    }
    pub fn runtime_disk(&self) -> PathBuf {
        self.root.join("runtime.img")
    }
    pub fn workspace_disk(&self) -> PathBuf {
        self.root.join("workspace.img")
    }
    pub fn config_disk(&self) -> PathBuf {
        self.root.join("config.img")
    }
    /// This boot's verified copies of the image's kernel and initramfs (and a link to
    /// its rootfs for a backend that needs a path), made by the launcher from the
    /// descriptors it hashed.
    pub fn boot(&self) -> PathBuf {
        self.root.join("boot")
    }
    /// The per-boot secret the guest agent checks on every control request.
    pub fn secret(&self) -> PathBuf {
        self.root.join("control.secret")
    }

    /// Creates a fresh control secret for a boot (0600).
    pub fn new_secret(&self) -> io::Result<String> {
        let mut bytes = [0u8; 32];
        let mut f = fs::File::open("/dev/urandom")?;
        std::io::Read::read_exact(&mut f, &mut bytes)?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        clawos_service::atomic_write(&self.secret(), hex.as_bytes(), 0o600)?;
        Ok(hex)
    }

    /// The VM's snapshots, one directory per tag.
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    pub fn read_secret(&self) -> io::Result<String> {
        Ok(fs::read_to_string(self.secret())?.trim().to_owned())
    }

    /// Writes the record atomically (temp file, fsync, rename).
    pub fn save(&self, record: &VmRecord) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        clawos_service::atomic_write(&self.record(), &json, 0o600)
    }

    pub fn load(&self) -> io::Result<VmRecord> {
        let bytes = fs::read(self.record())?;
        serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    pub fn write_pid(&self, p: ProcessId) -> io::Result<()> {
        clawos_service::atomic_write(
            &self.pid(),
            format!("{} {}\n", p.pid, p.start_time).as_bytes(),
            0o600,
        )
    }

    pub fn read_pid(&self) -> Option<ProcessId> {
        let text = fs::read_to_string(self.pid()).ok()?;
        let mut it = text.split_ascii_whitespace();
        Some(ProcessId {
            pid: it.next()?.parse().ok()?,
            start_time: it.next()?.parse().ok()?,
        })
    }

    pub fn remove_pid(&self) {
        let _ = fs::remove_file(self.pid());
    }
}

fn mkfs_ext4(path: &Path, label: &str, mib: u64) -> Result<(), LauncherError> {
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| LauncherError::io(path, e))?;
    f.set_len(mib << 20)
        .map_err(|e| LauncherError::io(path, e))?;
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            label,
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
        ])
        .arg(path)
        .output()
        .map_err(|e| LauncherError::Internal(format!("mkfs.ext4 (install e2fsprogs): {e}")))?;
    if !out.status.success() {
        return Err(LauncherError::Internal(format!(
            "mkfs.ext4 {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Creates a new VM directory with empty ext4 disks. Built under a temporary name and
/// renamed, so a failure leaves nothing behind.
pub fn create(
    vms: &Path,
    name: &VmName,
    runtime_mib: u64,
    workspace_mib: u64,
) -> Result<VmDir, LauncherError> {
    let dir = VmDir::new(vms, name);
    let staging = VmDir {
        root: vms.join(format!(".{name}.creating")),
    };
    let _ = fs::remove_dir_all(&staging.root);
    let result = (|| {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging.root)
            .map_err(|e| LauncherError::io(&staging.root, e))?;
        mkfs_ext4(&staging.runtime_disk(), "runtime", runtime_mib)?;
        mkfs_ext4(&staging.workspace_disk(), "workspace", workspace_mib)?;
        fs::rename(&staging.root, &dir.root).map_err(|e| LauncherError::io(&dir.root, e))
    })();
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&staging.root);
        return Err(e);
    }
    Ok(dir)
}

/// Writes the agent's environment as a small raw disk (NUL padded to 4 KiB) that
/// `clawos-init` copies to `/workspace/.env`. It never holds an API key.
pub fn write_config_disk(dir: &VmDir, env: &str) -> Result<(), LauncherError> {
    let mut data = env.as_bytes().to_vec();
    if data.len() > 4096 {
        return Err(LauncherError::Invalid(
            "agent environment exceeds 4 KiB".into(),
        ));
    }
    data.resize(4096, 0);
    clawos_service::atomic_write(&dir.config_disk(), &data, 0o600)
        .map_err(|e| LauncherError::io(&dir.config_disk(), e))
}

/// Starts a fresh console log for a boot, keeping the previous one as `console.log.1`.
pub fn rotate_console(dir: &VmDir) -> Result<(), LauncherError> {
    let c = dir.console();
    if c.exists() {
        fs::rename(&c, c.with_extension("log.1")).map_err(|e| LauncherError::io(&c, e))?;
    }
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&c)
        .map_err(|e| LauncherError::io(&c, e))?;
    Ok(())
}

/// Removes a VM directory (renamed away first, so a crash mid-delete leaves no
/// half-deleted VM that looks real).
pub fn remove(vms: &Path, name: &VmName) -> Result<(), LauncherError> {
    let dir = vms.join(name);
    let doomed = vms.join(format!(".{name}.deleting"));
    fs::rename(&dir, &doomed).map_err(|e| LauncherError::io(&dir, e))?;
    fs::remove_dir_all(&doomed).map_err(|e| LauncherError::io(&doomed, e))
}

/// Creates the state directories (0700): `vms/` and the image store `images/` (which
/// must then belong to the launcher's user or root and be writable by nobody else, or
/// images registered there could be swapped).
pub fn init_state(state: &Path) -> io::Result<PathBuf> {
    let vms = state.join("vms");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&vms)?;
    let images = clawos_image::store::images_dir(state);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&images)?;
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let m = fs::metadata(&images)?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        // Made by `clawos image build` with the default umask: tighten it.
        if m.uid() == me && m.mode() & 0o077 != 0 {
            fs::set_permissions(&images, fs::Permissions::from_mode(0o700))?;
        }
    }
    clawos_image::store::clean_leftovers(&images);
    // Leftovers of a create or delete interrupted by a crash.
    for e in fs::read_dir(&vms)?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with('.') && (n.ends_with(".creating") || n.ends_with(".deleting")) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    Ok(vms)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record written before the agent-runtime fields existed.
    fn old_record() -> serde_json::Value {
        serde_json::json!({
            "name": "a1", "model": null, "mem_mib": 512, "vcpus": 1,
            "image": "default", "root_hash": "ab".repeat(32), "backend": "qemu",
            "state": "running", "reason": null, "boot_ms": 900,
            "started_at": 1_700_000_000u64, "process": null,
        })
    }

    #[test]
    fn old_records_load_and_the_runtime_reaches_the_view() {
        let mut r: VmRecord = serde_json::from_value(old_record()).expect("old record");
        assert_eq!(
            (r.agent_runtime.as_deref(), r.ready_timeout_secs),
            (None, None)
        );
        assert_eq!(r.view().agent_runtime, None);
        // Nothing new is written for a VM of the built-in runtime.
        let json = serde_json::to_value(&r).expect("json");
        assert!(json.get("agent_runtime").is_none(), "{json}");

        r.set_agent_runtime(Some(&clawos_image::manifest::AgentRuntime {
            name: "openclaw".into(),
            version: "2026.9.6".into(),
            min_mem_mib: 2048,
            ready_timeout_secs: 600,
        }));
        assert_eq!(r.view().agent_runtime.as_deref(), Some("openclaw"));
        let back: VmRecord =
            serde_json::from_value(serde_json::to_value(&r).expect("json")).expect("parse");
        assert_eq!(back, r);
        assert_eq!(back.ready_timeout_secs, Some(600));
        r.set_agent_runtime(None);
        assert_eq!((r.agent_runtime, r.ready_timeout_secs), (None, None));
    }
}
