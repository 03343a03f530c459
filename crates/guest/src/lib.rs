//! Guest-side pieces shared by `clawos-init` and the guest agent: the kernel command
//! line, device-mapper, the workspace's file operations, the agent's services, and thin
//! syscall wrappers. The wire shared with the host is `clawos-guest-protocol`.

pub mod agent;
pub mod cmdline;
pub mod devmapper;
pub mod runtime;
pub mod sys;
pub mod workspace;

// The wire shared with the host lives in its own crate, so vm-launcher need not link
// PID 1 and device-mapper code to speak it.
pub use clawos_guest_protocol::{disk, frames as protocol, marker};

/// Cgroup (v2) of every command the guest agent starts: `clawos-init` creates it,
/// `clawos-audit` watches it (children included).
pub const AGENT_CGROUP: &str = "/sys/fs/cgroup/agent";

/// The guest's syscall audit binary, started by the agent.
pub const AUDIT_BIN: &str = "/sbin/clawos-audit";

/// The line `clawos-audit` prints on stdout once its probe is attached and watching
/// [`AGENT_CGROUP`]; the agent waits for it before it serves commands.
pub const AUDIT_READY: &str = "clawos-audit: ready";
