//! monitor-daemon: records the system calls of agent VMs' processes with eBPF, writes a
//! JSONL audit trail, and forwards it as CEF over syslog to a SIEM.
//!
//! - [`probe`] (from `clawos-syscall-probe`, shared with the guest's `clawos-audit`):
//!   the eBPF program (raw BTF tracepoints on `sys_exit`, fork and exit), filtering in
//!   the kernel by watched process or cgroup, one ring buffer, drop count.
//! - [`event`]: the kernel's record and the JSONL event.
//! - [`rules`]: per-agent deny/allow lists turning syscalls into alerts.
//! - [`cef`]: CEF encoding (and parsing, for tests and tools) and RFC 5424 framing.
//! - [`forward`]: the syslog forwarder, which tails the JSONL file from a persisted
//!   offset, so the file is its spool: nothing is lost while the SIEM is away, and a
//!   bounded backlog turns into counted, reported drops.
//! - [`ingest`]: the audit streams of the VMs' guests (`clawos-audit` inside each VM,
//!   over vsock, relayed by vm-launcher): async connections with a bounded handshake,
//!   one active stream per VM; checked, de-duplicated, gaps reported.
//! - [`quota`]: each VM's event and byte allowance, so that no guest can fill (and
//!   rotate away) the trail faster than it allows.
//! - [`recorder`]: the one thread that writes the JSONL trail (numbering, alerts, drop
//!   reports, acknowledgements to guests, rotation); [`trail`]: its files.
//! - [`skills`]: skill-manager's audit trail of skill calls, followed into this
//!   one (each record once, across restarts), so skill calls reach the SIEM too.
//! - [`watches`]: what the kernel follows, under which tag, persisted across restarts.
//! - [`http`]: the REST API (routes and wire types in `clawos-monitor-api`).
//! - [`daemon`]: configuration, start-up and shutdown of all of the above.

pub mod cef;
pub mod daemon;
pub mod event;
pub mod forward;
pub mod http;
pub mod ingest;
pub use clawos_syscall_probe::probe;
pub mod quota;
pub mod recorder;
pub mod rules;
pub mod skills;
pub mod trail;
pub mod watches;
