//! The eBPF syscall probe, shared by the host's monitor-daemon and the guest's
//! `clawos-audit`, so both produce the same records:
//!
//! - [`probe`]: the eBPF program (`src/bpf/syscall_audit.bpf.c`, raw BTF tracepoints on
//!   `sys_exit`, fork and exit), filtering in the kernel by watched process or cgroup,
//!   one ring buffer, a drop count; and its loader.
//! - [`record`]: the kernel's record, byte for byte.
//! - [`stream`]: how a guest ships records to the host over vsock: framed records with
//!   a per-boot sequence number (gaps show losses) and the kernel's drop count.

pub mod probe;
pub mod record;
pub mod stream;

pub use probe::{Maps, ProbeError};
pub use record::{PATH_LEN, RawEvent, c_str};
