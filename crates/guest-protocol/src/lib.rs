//! The host ↔ guest wire, and nothing else: the control protocol's frames
//! ([`frames`]), the vsock ports, the console markers the host reads, and the disk
//! serials the host gives, and the image's description of its agent runtime
//! ([`runtime`]). `clawos-guest` (PID 1, the guest agent) and vm-launcher both
//! depend on this crate and on nothing of each other.

pub mod frames;
pub mod runtime;

pub use frames::{AUDIT_PORT, CONTROL_PORT, GATEWAY_PORT, PROXY_PORT, SKILLS_PORT};

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
