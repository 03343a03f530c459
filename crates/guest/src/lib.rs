//! Guest-side pieces shared by `clawos-init` and the guest agent: the console protocol
//! the host reads, the kernel command line, and thin syscall wrappers.

pub mod agent;
pub mod cmdline;
pub mod devmapper;
pub mod protocol;
pub mod sys;
pub mod workspace;

/// Console markers the host launcher watches for. They are the wire format between
/// guest and host until the vsock channel carries readiness; keep them stable.
pub mod marker {
    /// The guest agent is up: the VM is ready.
    pub const READY: &str = "CLAWOS_READY";
    /// A fatal guest error follows on the same line; the guest panics right after.
    pub const FATAL: &str = "CLAWOS_FATAL:";
    /// Clean shutdown finished; the guest powers off right after.
    pub const POWEROFF: &str = "CLAWOS_POWEROFF";
}

/// Cgroup (v2) of every command the guest agent starts: `clawos-init` creates it,
/// `clawos-audit` watches it (children included).
pub const AGENT_CGROUP: &str = "/sys/fs/cgroup/agent";

/// The guest's syscall audit binary, started by the agent.
pub const AUDIT_BIN: &str = "/sbin/clawos-audit";

/// The line `clawos-audit` prints on stdout once its probe is attached and watching
/// [`AGENT_CGROUP`]; the agent waits for it before it serves commands.
pub const AUDIT_READY: &str = "clawos-audit: ready";

/// Virtio block serial numbers the launcher gives each disk.
pub mod disk {
    /// The read-only erofs rootfs with its verity tree.
    pub const ROOTFS: &str = "rootfs";
    /// Per-VM ext4 mounted at `/var`.
    pub const RUNTIME: &str = "runtime";
    /// Per-VM ext4 mounted at `/workspace`.
    pub const WORKSPACE: &str = "workspace";
    /// A small raw disk holding the agent's environment file (NUL padded).
    pub const CONFIG: &str = "config";
}
